"""Latency and peak memory of a detector's stages on one synthetic LiDAR input, CPU or CUDA, optionally
beside OpenPCDet's (:mod:`voxsparse.benchmark.compare`): what ``tools/benchmark.py`` runs.

The result is a JSON-ready dict (the tool's ``--json`` file); :func:`format_table` renders it.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import torch

from voxsparse.benchmark.compare import Alternation, compare_with_openpcdet
from voxsparse.benchmark.inputs import load_or_make_frames, scan_sweeps, synthetic_frames
from voxsparse.benchmark.stages import (
    TRAIN_STEP,
    RowReport,
    build_model,
    count_parameters,
    profile_backbone,
    time_inference,
    time_training,
)
from voxsparse.ops.sparse_backend import set_tf32
from voxsparse.structures import PointBatch


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What to benchmark; each field is the ``tools/benchmark.py`` option of the same name.

    Attributes:
        model: a config name in ``configs/model/``.
        points: points per frame, unless ``voxels`` sizes the frames by their voxel count instead.
        batch: frames per batch (different scans of the same size).
        input: a frames file, reused when it exists, else written (the same input across runs).
        scan, sweeps: a real scan file aggregated as ``sweeps`` sweeps of a moving ego instead of
            the synthetic frame (:func:`~voxsparse.benchmark.inputs.scan_sweeps`); batch 1.
        repeats, warmup: timed and untimed calls per row.
        amp: float16 autocast (CUDA only). tf32: fp32 products on TF32 tensor cores.
        train: also time forward+backward.
        compare: an OpenPCDet checkout to time beside ours (``rounds`` alternation rounds).
        profile: a folder for a torch.profiler table and trace of the backbone.
    """

    model: str = "voxelnext_small"
    device: str = "cpu"
    points: int = 120_000
    batch: int = 1
    voxels: int | None = None
    input: Path | None = None
    scan: Path | None = None
    sweeps: int = 1
    repeats: int = 15
    warmup: int = 3
    amp: bool = False
    tf32: bool = False
    train: bool = False
    compare: Path | None = None
    rounds: int = 5
    profile: Path | None = None


def run_benchmark(options: BenchmarkOptions, report: RowReport | None = None) -> dict:
    """Build the model, make (or read) its input, time its stages (and with ``train`` a training
    step), compare with OpenPCDet and profile where asked; ``report`` gets each of our rows as soon as
    it is measured.

    Raises:
        FrameCountError: ``options.input`` holds another number of frames than ``options.batch``.
        NeedsCuda: ``compare`` with a VoxelNeXt model on the CPU.
    """
    set_tf32(options.tf32)
    device = torch.device(options.device)
    torch.backends.cudnn.benchmark = True
    model = build_model(options.model).to(device).eval()
    num_features = model.voxel_encoder.in_channels
    if options.scan is not None:
        clouds = [scan_sweeps(options.scan, options.sweeps, num_features)] * options.batch
    else:
        clouds = load_or_make_frames(options.input, options.batch, lambda: synthetic_frames(
            options.batch, model.grid, num_features, options.points, options.voxels))
    points = PointBatch.from_frames([c.to(device) for c in clouds])
    amp = options.amp and device.type == "cuda"

    timings, voxels, bev = time_inference(model, points, amp, options.repeats, options.warmup, report)
    if options.train:
        timings |= time_training(model, points, voxels, amp, options.repeats, options.warmup, report)
    comparison = None
    if options.compare:
        alternation = Alternation.from_repeats(options.repeats, options.rounds, options.warmup)
        comparison = compare_with_openpcdet(model, voxels, points, options.compare, alternation, options.train)
    if options.profile:
        profile_backbone(model, voxels, amp, options.profile)
    info = {
        "model": options.model,
        "parameters_M": round(count_parameters(model) / 1e6, 3),
        "backbone_parameters_M": round(count_parameters(model.backbone) / 1e6, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": amp,
        "tf32": options.tf32,
        "batch": options.batch,
        "points": len(points.points),
        "voxels": len(voxels),
        "bev_cells": len(bev),
        "timings": {k: dataclasses.asdict(v) for k, v in timings.items()},
    }
    if comparison is not None:
        info["comparison"] = comparison
    return info


def format_table(info: dict) -> str:
    """:func:`run_benchmark`'s result (or its JSON file read back) as text: the comparison's numbers,
    a header, a markdown table of every timed row and the training throughput."""
    lines = [
        (
            f"model {info['model']} ({info['parameters_M']} M params, backbone {info['backbone_parameters_M']} M) "
            f"on {info['device']}, {info['threads']} threads, amp={info['amp']}, tf32={info['tf32']}"
        ),
        (f"input: {info['batch']} frame(s), {info['points']:,} points -> {info['voxels']:,} voxels -> "
         f"{info['bev_cells']:,} BEV cells"),
        "",
        "| stage | median ms | p10 ms | p90 ms | peak MB |",
        "|---|---|---|---|---|",
    ]
    timings = dict(info["timings"])
    if "comparison" in info:
        c = info["comparison"]
        lines[:0] = [f"compare: {k} = {v}" for k, v in c.items() if k != "timings"] + [""]
        timings |= {f"[compare] {k}": v for k, v in c["timings"].items()}
    for name, t in timings.items():
        peak = "n/a" if t["peak_memory_mb"] is None else f"{t['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['p10_ms']:.2f} | {t['p90_ms']:.2f} | {peak} |")
    step = info["timings"].get(TRAIN_STEP)
    if step is not None:
        lines.append(f"training throughput: {1e3 * info['batch'] / step['median_ms']:.1f} frames/s")
    return "\n".join(lines)
