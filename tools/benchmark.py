"""Latency and peak memory of a detector's stages on one synthetic LiDAR input, CPU or CUDA.

    python tools/benchmark.py --model voxelnext_small --device cpu
    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --points 300000 --amp --train
    python tools/benchmark.py --model dsvt_pillar_waymo --device cuda --voxels 100000   # Waymo scale
    python tools/benchmark.py ... --json bench.json     # also write the numbers as JSON
    python tools/benchmark.py ... --input cloud.pt      # reuse one input across runs (written if absent)

The input is one frame of the synthetic world scanned by a dense spinning LiDAR whose beam count
is chosen to give about ``--points`` returns, cut to exactly that many (or, with ``--voxels``, to
the fewest points that fill that many voxels of the model's grid); a time-lag channel of zeros
is appended when the model's config expects nuScenes' 5 point features. Each stage is timed
separately on that input (median of ``--repeats`` after ``--warmup``, CUDA synchronised), then the
whole detector end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from dataclasses import asdict
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from voxsparse.data.synthetic import LidarConfig, generate_frame
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.ops.voxelize import dynamic_voxelize
from voxsparse.structures import PointBatch, VoxelGrid
from voxsparse.utils.io import atomic_write
from voxsparse.utils.timing import Timing, measure

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def build_model(name: str) -> SparseDetector:
    """Instantiate ``configs/model/<name>.yaml`` with the synthetic dataset's classes."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    return instantiate(cfg.model)


def _dense_scan(enough, seed: int) -> torch.Tensor:
    """(N, 4) points of a synthetic frame, doubling the beam count until ``enough(points)`` holds."""
    beams = 64
    while True:
        # Horizontal resolution 0.1 degree; beams grow until the scan is dense enough.
        lidar = LidarConfig(beams=beams, azimuth_resolution=0.1)
        points = torch.from_numpy(generate_frame(seed, lidar=lidar).points)
        if enough(points) or beams >= 1024:
            return points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))]
        beams *= 2


def _with_features(points: torch.Tensor, num_features: int) -> torch.Tensor:
    if num_features > points.shape[1]:
        points = torch.cat([points, points.new_zeros(len(points), num_features - points.shape[1])], dim=1)
    return points[:, :num_features].contiguous()


def make_points(num_points: int, num_features: int, seed: int = 0) -> torch.Tensor:
    """(num_points, num_features) float32 from a synthetic frame scanned densely enough."""
    points = _dense_scan(lambda p: len(p) >= num_points, seed)
    return _with_features(points[:num_points], num_features)


def make_points_for_voxels(num_voxels: int, grid: VoxelGrid, num_features: int, seed: int = 0) -> torch.Tensor:
    """(N, num_features) float32 whose dynamic voxelization on ``grid`` has about ``num_voxels`` voxels.

    One synthetic street seen from one spot fills only its corridor (~20k pillars of 0.32 m), so
    scans of successive seeds, each turned by the golden angle and moved along a sunflower spiral
    inside the grid, are merged until the target is reached; the merged cloud is cut to the
    shortest prefix (of its shuffled points) that reaches it, found by bisection. Waymo-scale
    inputs ("100k voxels") are specified this way.
    """

    def voxels(points: torch.Tensor) -> int:
        return len(dynamic_voxelize(PointBatch.from_frames([points]), grid))

    lidar = LidarConfig(beams=64, azimuth_resolution=0.1)
    reach = 0.5 * min(grid.point_cloud_range[3] - grid.point_cloud_range[0], grid.point_cloud_range[4] - grid.point_cloud_range[1])
    golden = math.pi * (3.0 - math.sqrt(5.0))
    scans: list[torch.Tensor] = []
    while not scans or (voxels(torch.cat(scans)) < num_voxels and len(scans) < 64):
        i = len(scans)
        yaw, radius = i * golden, 0.6 * reach * math.sqrt(i / (i + 4.0))
        scan = torch.from_numpy(generate_frame(seed + i, lidar=lidar).points)
        c, s = math.cos(yaw), math.sin(yaw)
        scan[:, :2] = scan[:, :2] @ torch.tensor([[c, s], [-s, c]]) + torch.tensor([radius * c, radius * s])
        scans.append(scan)
    points = torch.cat(scans)
    points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))]
    lo, hi = 1, len(points)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if voxels(points[:mid]) >= num_voxels else (mid + 1, hi)
    return _with_features(points[:lo], num_features)


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build_model(args.model).to(device).eval()
    num_features = model.voxel_encoder.in_channels
    if args.input is not None and args.input.exists():
        cloud = torch.load(args.input)
    elif args.voxels:
        cloud = make_points_for_voxels(args.voxels, model.grid, num_features)
    else:
        cloud = make_points(args.points, num_features)
    if args.input is not None and not args.input.exists():
        atomic_write(args.input, lambda f: torch.save(cloud, f))
    points = PointBatch.from_frames([cloud.to(device)])
    amp = torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device.type == "cuda")

    results: dict[str, Timing] = {}
    with torch.no_grad(), amp:
        voxels = model.voxel_encoder(points)
        bev = model.backbone(voxels)
        preds = model.head(bev)
        results["voxelize + VFE"] = measure(lambda: model.voxel_encoder(points), device, args.repeats, args.warmup)
        results["backbone"] = measure(lambda: model.backbone(voxels), device, args.repeats, args.warmup)
        results["head"] = measure(lambda: model.head(bev), device, args.repeats, args.warmup)
        results["decode"] = measure(lambda: model.head.decode(preds), device, args.repeats, args.warmup)
        results["end to end"] = measure(lambda: model.predict(points), device, args.repeats, args.warmup)
    if args.train:
        model.train()
        annotations = [_dummy_annotations(device)]
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")

        def step():
            with amp:
                preds = model(points)
            loss = model.head.loss(preds, annotations).total
            scaler.scale(loss).backward()
            model.zero_grad(set_to_none=True)

        results["backbone fwd+bwd"] = measure(lambda: _backbone_step(model, voxels, amp), device, args.repeats, args.warmup)
        results["train step (loss + backward)"] = measure(step, device, args.repeats, args.warmup)
    info = {
        "model": args.model,
        "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "backbone_parameters_M": round(sum(p.numel() for p in model.backbone.parameters()) / 1e6, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": bool(args.amp and device.type == "cuda"),
        "points": len(points.points),
        "voxels": len(voxels),
        "bev_cells": len(bev),
        "timings": {k: asdict(v) for k, v in results.items()},
    }
    return info


def _backbone_step(model: SparseDetector, voxels, amp) -> None:
    with amp:
        bev = model.backbone(voxels)
    bev.features.float().sum().backward()
    model.zero_grad(set_to_none=True)


def _dummy_annotations(device):
    from voxsparse.structures import Annotations3D, Boxes3D

    boxes = torch.tensor([[10.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3, 0.0, 0.0]], device=device)
    one = torch.ones(1, dtype=torch.int64, device=device)
    return Annotations3D(Boxes3D(boxes), one * 0, one * 100, one, one)


def table(info: dict) -> str:
    lines = [
        (
            f"model {info['model']} ({info['parameters_M']} M params, backbone {info['backbone_parameters_M']} M) "
            f"on {info['device']}, {info['threads']} threads, amp={info['amp']}"
        ),
        f"input: {info['points']:,} points -> {info['voxels']:,} voxels -> {info['bev_cells']:,} BEV cells",
        "",
        "| stage | median ms | p10 ms | p90 ms | peak MB |",
        "|---|---|---|---|---|",
    ]
    for name, t in info["timings"].items():
        peak = "n/a" if t["peak_memory_mb"] is None else f"{t['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {t['median_ms']:.2f} | {t['p10_ms']:.2f} | {t['p90_ms']:.2f} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="voxelnext_small", help="a config name in configs/model/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--points", type=int, default=120_000)
    parser.add_argument("--voxels", type=int, help="size the input by its voxel count instead of --points")
    parser.add_argument("--input", type=Path, help="points file: reused when it exists, else written (same input across runs)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--train", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args()
    info = run(args)
    print(table(info))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
