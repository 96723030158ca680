"""Time the Waymo detection metric on a synthetic workload of many frames.

    python tools/benchmark_eval.py                          # 5,000 frames x 100 predictions x 100 GT
    python tools/benchmark_eval.py --frames 500 --repeats 1 --json eval_bench.json

Each frame holds ``--boxes`` GT boxes (60 % vehicles, 30 % pedestrians, 10 % cyclists, centres
uniform in +-75 m, a third LEVEL_2) and ``--boxes`` predictions: 80 % noisy copies of GT boxes
(centre noise 0.05 x the object's length, 5 % size noise, heading noise 0.2 rad, a few flipped)
and 20 % false positives at random places; scores are higher for the copies. The timed call is
:func:`voxsparse.evaluation.detection.evaluate_detection_levels` (both levels, range breakdowns,
from the per-frame inputs to the metrics); the median of ``--repeats`` runs after ``--warmup`` is
reported, with the process's peak resident memory (workload included).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource

import torch

from voxsparse.evaluation.detection import FrameGroundTruth, FramePredictions, evaluate_detection_levels
from voxsparse.utils.timing import measure

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


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    predictions, ground_truths = make_workload(args.frames, args.boxes, args.seed)
    result: dict = {}

    def evaluate() -> None:
        result["metrics"] = evaluate_detection_levels(predictions, ground_truths, device=args.device)

    timing = measure(evaluate, torch.device(args.device), repeats=args.repeats, warmup=args.warmup)
    level2 = result["metrics"][2]
    return {
        "frames": args.frames,
        "boxes_per_frame": args.boxes,
        "threads": args.threads,
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "median_s": timing.median_ms / 1000,
        "p90_s": timing.p90_ms / 1000,
        "repeats": timing.repeats,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "mAP_L2": level2.mean_ap,
        "mAPH_L2": level2.mean_aph,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--boxes", type=int, default=100, help="GT boxes and predictions per frame")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="where IoUs are computed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    info = run(args)
    print(
        f"{info['frames']} frames x {info['boxes_per_frame']} predictions x {info['boxes_per_frame']} GT: "
        f"median {info['median_s']:.2f} s (p90 {info['p90_s']:.2f} s, {info['repeats']} runs, "
        f"{info['threads']} threads, {info['device']}), peak RSS {info['peak_rss_mb']:.0f} MB, "
        f"mAP_L2 {info['mAP_L2']:.3f}, mAPH_L2 {info['mAPH_L2']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
