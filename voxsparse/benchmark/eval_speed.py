"""The Waymo detection metric timed on a synthetic workload of many frames: what
``tools/benchmark_eval.py`` runs.

Each frame holds ``boxes`` GT boxes (60 % vehicles, 30 % pedestrians, 10 % cyclists, centres
uniform in +-75 m, a third LEVEL_2) and ``boxes`` predictions: 80 % noisy copies of GT boxes
(centre noise 0.05 x the object's length, 5 % size noise, heading noise 0.2 rad, a few flipped)
and 20 % false positives at random places; scores are higher for the copies. The timed call is
:func:`voxsparse.evaluation.detection.evaluate_detection_levels` (both levels, range breakdowns,
from the per-frame inputs to the metrics).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import resource

import torch

from voxsparse.evaluation.detection import (
    DetectionMetrics,
    FrameGroundTruth,
    FramePredictions,
    evaluate_detection_levels,
)
from voxsparse.utils.timing import measure

WORKLOAD_CLASSES = ("Vehicle", "Pedestrian", "Cyclist")  # the labels of make_workload's boxes
SIZES = torch.tensor([[4.5, 2.0, 1.6], [0.9, 0.9, 1.8], [1.8, 0.8, 1.7]])  # vehicle, pedestrian, cyclist
CLASS_SHARE = torch.tensor([0.6, 0.3, 0.1])


def make_workload(
    frames: int, boxes: int, seed: int = 0
) -> tuple[list[FramePredictions], list[FrameGroundTruth]]:
    """``frames`` frames of ``boxes`` GT boxes and ``boxes`` predictions (float32, as a model gives)."""
    g = torch.Generator().manual_seed(seed)
    predictions, ground_truths = [], []
    copies = round(0.8 * boxes)
    for _ in range(frames):
        labels = torch.multinomial(CLASS_SHARE, boxes, replacement=True, generator=g)
        gt = torch.zeros(boxes, 7)
        gt[:, :2] = torch.rand(boxes, 2, generator=g) * 150 - 75
        gt[:, 2] = torch.rand(boxes, generator=g) * 0.5
        gt[:, 3:6] = SIZES[labels] * (0.85 + 0.3 * torch.rand(boxes, 3, generator=g))
        gt[:, 6] = (torch.rand(boxes, generator=g) * 2 - 1) * math.pi
        difficulty = 1 + (torch.rand(boxes, generator=g) < 1 / 3).long()
        ground_truths.append(FrameGroundTruth(gt, labels, difficulty))

        source = torch.randperm(boxes, generator=g)[:copies]
        pred = gt[source].clone()
        pred[:, :3] += torch.randn(copies, 3, generator=g) * 0.05 * pred[:, 3:4]
        pred[:, 3:6] *= 1 + 0.05 * torch.randn(copies, 3, generator=g)
        pred[:, 6] += 0.2 * torch.randn(copies, generator=g) + math.pi * (
            torch.rand(copies, generator=g) < 0.05
        )
        stray_labels = torch.multinomial(CLASS_SHARE, boxes - copies, replacement=True, generator=g)
        stray = torch.zeros(boxes - copies, 7)
        stray[:, :2] = torch.rand(boxes - copies, 2, generator=g) * 150 - 75
        stray[:, 3:6] = SIZES[stray_labels]
        stray[:, 6] = (torch.rand(boxes - copies, generator=g) * 2 - 1) * math.pi
        scores = torch.cat(
            [0.3 + 0.7 * torch.rand(copies, generator=g), 0.6 * torch.rand(boxes - copies, generator=g)]
        )
        predictions.append(
            FramePredictions(torch.cat([pred, stray]), scores, torch.cat([labels[source], stray_labels]))
        )
    return predictions, ground_truths


@dataclasses.dataclass(frozen=True)
class EvalSpeed:
    """One measurement; ``dataclasses.asdict`` of it is the tool's JSON, in this field order.

    Attributes:
        median_s, p90_s: seconds per evaluation over ``repeats`` runs.
        peak_rss_mb: the process's peak resident memory, workload included.
        mAP_L2, mAPH_L2: the metric's LEVEL_2 means (a check that the workload is sensible).
    """

    frames: int
    boxes_per_frame: int
    threads: int
    device: str
    cpu: str
    median_s: float
    p90_s: float
    repeats: int
    peak_rss_mb: float
    mAP_L2: float
    mAPH_L2: float

    def summary(self) -> str:
        """The tool's one line."""
        return (
            f"{self.frames} frames x {self.boxes_per_frame} predictions x {self.boxes_per_frame} GT: "
            f"median {self.median_s:.2f} s (p90 {self.p90_s:.2f} s, {self.repeats} runs, "
            f"{self.threads} threads, {self.device}), peak RSS {self.peak_rss_mb:.0f} MB, "
            f"mAP_L2 {self.mAP_L2:.3f}, mAPH_L2 {self.mAPH_L2:.3f}"
        )


def measure_eval_speed(
    frames: int = 5000, boxes: int = 100, repeats: int = 3, warmup: int = 1, threads: int = 2,
    device: str = "cpu", seed: int = 0,
) -> EvalSpeed:
    """Median (of ``repeats`` after ``warmup``) of :func:`evaluate_detection_levels` on
    :func:`make_workload`'s frames, IoUs on ``device``; sets torch's CPU threads to ``threads``."""
    torch.set_num_threads(threads)
    predictions, ground_truths = make_workload(frames, boxes, seed)
    metrics: dict[int, DetectionMetrics] = {}

    def evaluate() -> None:
        metrics.update(evaluate_detection_levels(predictions, ground_truths, WORKLOAD_CLASSES, device=device))

    timing = measure(evaluate, torch.device(device), repeats=repeats, warmup=warmup)
    level2 = metrics[2]
    return EvalSpeed(
        frames=frames,
        boxes_per_frame=boxes,
        threads=threads,
        device=device,
        cpu=platform.processor() or platform.machine(),
        median_s=timing.median_ms / 1000,
        p90_s=timing.p90_ms / 1000,
        repeats=timing.repeats,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        mAP_L2=level2.mean_ap,
        mAPH_L2=level2.mean_aph,
    )
