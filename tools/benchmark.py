"""Latency and peak memory of a detector's stages on one synthetic LiDAR input, CPU or CUDA.

    python tools/benchmark.py --model voxelnext_small --device cpu
    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --points 300000 --amp --train
    python tools/benchmark.py --model dsvt_pillar_waymo --device cuda --voxels 100000   # Waymo scale
    python tools/benchmark.py ... --json bench.json     # also write the numbers as JSON
    python tools/benchmark.py ... --input cloud.pt      # reuse one input across runs (written if absent)
    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --voxels 153782 \
        --compare /path/to/OpenPCDet --train           # ours and OpenPCDet's backbone, same input
    python tools/benchmark.py --model dsvt_voxel_waymo --device cuda --voxels 100000 --compare /path/to/OpenPCDet
    python tools/benchmark.py ... --profile trace_dir   # torch.profiler table of the backbone
    python tools/benchmark.py ... --tf32                # fp32 products on TF32 tensor cores

The input is one frame of the synthetic world scanned by a dense spinning LiDAR whose beam count
is chosen to give about ``--points`` returns, cut to exactly that many (or, with ``--voxels``, to
the fewest points that fill that many voxels of the model's grid); a time-lag channel of zeros
is appended when the model's config expects nuScenes' 5 point features. Each stage is timed
separately on that input (median of ``--repeats`` after ``--warmup``, CUDA synchronised), then the
whole detector end to end.

``--compare`` loads OpenPCDet's backbone from a checkout (``tools/openpcdet_ref.py``) and times it
beside ours on the very voxels ours gets, in alternation in this process. VoxelNeXt configs: forward
in fp32 and under fp16 autocast; ours also layer by layer (the unoptimised path) and index-first
(:mod:`voxsparse.ops.sparse_plan`), unfused and BatchNorm-fused (:mod:`voxsparse.models.fusion`) in
fp32 and in pure fp16; with ``--train`` forward+backward; voxelization beside spconv's
``PointToVoxel``; and the whole detectors, points to boxes: ours (``predict``) against OpenPCDet's
VoxelNeXt with its nuScenes config and head, whose compiled NMS kernel is not run (so their time is
a lower bound; ``tools/openpcdet_ref.py``). The optimised outputs are checked against the
layer-by-layer one and the largest difference is printed. DSVT configs: forward (and with
``--train`` forward+backward) in fp32 and under fp16 autocast, with the output pillars of both
checked to be the same cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from openpcdet_ref import (  # tools/ is sys.path[0]
    OpenPCDetVoxelNeXt,
    compare_dsvt,
    count_parameters,
    load_openpcdet_voxelnext,
)

from voxsparse.data.synthetic import LidarConfig, generate_frame
from voxsparse.models.backbones.dsvt import DSVTBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.ops.sparse_backend import set_tf32
from voxsparse.ops.sparse_utils import linear_keys
from voxsparse.ops.voxelize import dynamic_voxelize, voxelize_mean_torch
from voxsparse.structures import PointBatch, VoxelGrid
from voxsparse.utils.io import atomic_write
from voxsparse.utils.timing import Timing, measure, measure_interleaved

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
        clouds = torch.load(args.input)
        clouds = [clouds] if isinstance(clouds, torch.Tensor) else clouds
    else:
        # Frame i of a batch is the scan of seed 1000 * i: different frames of the same size.
        clouds = [
            make_points_for_voxels(args.voxels, model.grid, num_features, seed=1000 * i)
            if args.voxels else make_points(args.points, num_features, seed=1000 * i)
            for i in range(args.batch)
        ]
        if args.input is not None:
            atomic_write(args.input, lambda f: torch.save(clouds, f))
    if len(clouds) != args.batch:
        raise SystemExit(f"--input {args.input} holds {len(clouds)} frames, --batch asks for {args.batch}")
    points = PointBatch.from_frames([c.to(device) for c in clouds])
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
        annotations = [_dummy_annotations(device)] * args.batch
        scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")

        def step():
            with amp:
                preds = model(points)
            loss = model.head.loss(preds, annotations).total
            scaler.scale(loss).backward()
            model.zero_grad(set_to_none=True)

        results["backbone fwd+bwd"] = measure(lambda: _backbone_step(model, voxels, amp), device, args.repeats, args.warmup)
        results["train step (loss + backward)"] = measure(step, device, args.repeats, args.warmup)
        model.eval()
    comparison = compare(model, voxels, points, args) if args.compare else None
    if args.profile:
        profile_backbone(model, voxels, amp, args.profile)
    info = {
        "model": args.model,
        "parameters_M": round(count_parameters(model) / 1e6, 3),
        "backbone_parameters_M": round(count_parameters(model.backbone) / 1e6, 3),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": bool(args.amp and device.type == "cuda"),
        "tf32": args.tf32,
        "batch": args.batch,
        "points": len(points.points),
        "voxels": len(voxels),
        "bev_cells": len(bev),
        "timings": {k: dataclasses.asdict(v) for k, v in results.items()},
    }
    if comparison is not None:
        info["comparison"] = comparison
    return info


def compare(model: SparseDetector, voxels, points: PointBatch, args: argparse.Namespace) -> dict:
    """Ours against OpenPCDet's backbone (VoxelNeXt or DSVT) on the same voxels, timed in alternation."""
    device = voxels.features.device
    if isinstance(model.backbone, DSVTBackbone):
        return compare_dsvt(model.backbone, voxels, args.compare, device, rounds=args.rounds,
                            per_round=args.repeats // args.rounds or 1, warmup=args.warmup, train=args.train)
    if device.type != "cuda":
        # OpenPCDet's residual convs have biases, which spconv's CPU kernels refuse in eval mode.
        raise SystemExit("--compare needs --device cuda: OpenPCDet's VoxelNeXt backbone cannot run inference on the CPU")
    grid = model.grid
    theirs_cls = load_openpcdet_voxelnext(args.compare)
    # OpenPCDet's grid_size is (x, y, z); it pads z by one (sparse_shape = grid_size[::-1] + [1, 0, 0]).
    theirs = theirs_cls({}, voxels.features.shape[1], np.array(grid.grid_size)).to(device).eval()
    ours = model.backbone.eval()
    fused = fuse_for_inference(model).backbone
    fused_half = fuse_for_inference(model).half().backbone
    half_voxels = dataclasses.replace(voxels, features=voxels.features.half())

    def run_theirs():
        out = theirs({"voxel_features": voxels.features, "voxel_coords": voxels.coords, "batch_size": voxels.batch_size})
        return out["encoded_spconv_tensor"]

    def layer_by_layer(backbone, inputs):
        def call():
            with backbone.layer_by_layer():
                return backbone(inputs)
        return call

    with torch.no_grad():
        ref = layer_by_layer(ours, voxels)()  # the unoptimised path
        diff_index_first = _max_abs_diff(ours(voxels), ref)
        diff_fused = _max_abs_diff(fused(voxels), ref)
        diff_half = _max_abs_diff(fused_half(half_voxels), ref)
        theirs_out = run_theirs()
        forward = {
            "ours fp32 layer by layer": layer_by_layer(ours, voxels),
            "ours fp32 index-first": lambda: ours(voxels),
            "ours fp32 fused, layer by layer": layer_by_layer(fused, voxels),
            "ours fp32 fused, index-first": lambda: fused(voxels),
            "OpenPCDet fp32": run_theirs,
            "ours fp16 autocast": _amp(lambda: ours(voxels)),
            "ours fp16 fused (half weights), layer by layer": layer_by_layer(fused_half, half_voxels),
            "ours fp16 fused (half weights), index-first": lambda: fused_half(half_voxels),
            "OpenPCDet fp16 autocast": _amp(run_theirs),
        }
        timings = measure_interleaved(forward, device, rounds=args.rounds, per_round=args.repeats // args.rounds or 1,
                                      warmup=args.warmup)
    if args.train:
        ours.train()
        theirs.train()

        def step(fn, use_amp):
            def call():
                with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                    out = fn()
                out.features.float().sum().backward()
            return call

        train = {
            "ours fwd+bwd fp32 layer by layer": step(layer_by_layer(ours, voxels), False),
            "ours fwd+bwd fp32 index-first": step(lambda: ours(voxels), False),
            "OpenPCDet fwd+bwd fp32": step(run_theirs, False),
            "ours fwd+bwd fp16 autocast layer by layer": step(layer_by_layer(ours, voxels), True),
            "ours fwd+bwd fp16 autocast index-first": step(lambda: ours(voxels), True),
            "OpenPCDet fwd+bwd fp16 autocast": step(run_theirs, True),
        }
        timings |= measure_interleaved(train, device, rounds=args.rounds, per_round=args.repeats // args.rounds or 1,
                                       warmup=args.warmup)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        ours.eval()
    voxelize = {
        "ours: dynamic voxelize + mean": lambda: model.voxel_encoder(points),
        "ours: torch unique + scatter mean (before)": lambda: voxelize_mean_torch(points, grid),
    }
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError:
        PointToVoxel = None
    if PointToVoxel is not None:
        gen = PointToVoxel(vsize_xyz=list(grid.voxel_size), coors_range_xyz=list(grid.point_cloud_range),
                           num_point_features=points.points.shape[1], max_num_voxels=len(voxels) + 1000,
                           max_num_points_per_voxel=10, device=device)
        voxelize["spconv PointToVoxel (no mean)"] = lambda: gen(points.points)
    with torch.no_grad():
        fast = model.voxel_encoder(points)
        before_coords, before_features = voxelize_mean_torch(points, grid)
        same_voxels = torch.equal(fast.coords, before_coords)
        diff_voxelize = (fast.features - before_features).abs().max().item() if same_voxels else math.inf
        timings |= measure_interleaved(voxelize, device, rounds=args.rounds, per_round=args.repeats // args.rounds or 1,
                                       warmup=args.warmup)
    detector = compare_detectors(model, points, args)
    timings |= detector.pop("timings")
    return {
        "openpcdet": str(args.compare),
        "ours_backbone_parameters_M": round(count_parameters(ours) / 1e6, 4),
        "openpcdet_backbone_parameters_M": round(count_parameters(theirs) / 1e6, 4),
        "ours_bev_cells": len(ref.coords),
        "openpcdet_bev_cells": len(theirs_out.indices),
        "max_abs_diff_index_first_fp32": diff_index_first,
        "max_abs_diff_fused_fp32": diff_fused,
        "max_abs_diff_fused_half": diff_half,
        "max_abs_output": ref.features.abs().max().item(),
        "voxelize_same_voxels_as_before": same_voxels,
        "voxelize_max_abs_diff_vs_before": diff_voxelize,
        **detector,
        "timings": {k: dataclasses.asdict(v) for k, v in timings.items()},
    }


def _amp(fn):
    """``fn`` called under CUDA fp16 autocast."""
    def wrapped():
        with torch.autocast("cuda", dtype=torch.float16):
            return fn()
    return wrapped


def compare_detectors(model: SparseDetector, points: PointBatch, args: argparse.Namespace) -> dict:
    """Whole detectors, points to boxes, on one frame: ours (``predict``) against OpenPCDet's VoxelNeXt
    with its nuScenes config (:class:`openpcdet_ref.OpenPCDetVoxelNeXt`, whose NMS kernel is not run)."""
    grid = model.grid
    theirs = OpenPCDetVoxelNeXt(args.compare, grid.voxel_size, grid.point_cloud_range, grid.grid_size,
                                points.points.shape[1]).to(points.points.device).eval()
    fused = fuse_for_inference(model)
    frame = points.points

    runners = {
        "detector: ours fp32": lambda: model.predict(points),
        "detector: ours fp32 fused": lambda: fused.predict(points),
        "detector: OpenPCDet fp32 (NMS kernel not run)": lambda: theirs(frame),
        "detector: ours fp16 autocast fused": _amp(lambda: fused.predict(points)),
        "detector: OpenPCDet fp16 autocast (NMS kernel not run)": _amp(lambda: theirs(frame)),
    }
    with torch.no_grad():
        ours_boxes = sum(len(d.scores) for d in model.predict(points))
        their_boxes = len(theirs(frame)[0]["pred_boxes"])
        timings = measure_interleaved(runners, points.points.device, rounds=args.rounds,
                                      per_round=args.repeats // args.rounds or 1, warmup=args.warmup)
    return {
        "ours_detector_parameters_M": round(count_parameters(model) / 1e6, 4),
        "openpcdet_detector_parameters_M": round(count_parameters(theirs) / 1e6, 4),
        "ours_detections": ours_boxes,
        "openpcdet_detections_without_nms": their_boxes,
        "timings": timings,
    }


def _max_abs_diff(a, b) -> float:
    """Largest feature difference of two BEV outputs over the same cells, matched by coordinate
    (spconv's CUDA index generation lists output cells in a run-dependent order)."""
    shape = (a.batch_size, *a.spatial_shape)
    order_a = torch.argsort(linear_keys(a.coords, shape))
    order_b = torch.argsort(linear_keys(b.coords, shape))
    if not torch.equal(a.coords[order_a], b.coords[order_b]):
        return math.inf
    return (a.features[order_a].float() - b.features[order_b].float()).abs().max().item()


def profile_backbone(model: SparseDetector, voxels, amp, out_dir: Path) -> None:
    """torch.profiler over five backbone forwards: a kernel table and a Chrome trace in ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if voxels.features.is_cuda else [])
    with torch.no_grad(), amp, profile(activities=activities, record_shapes=False) as prof:
        for _ in range(5):
            model.backbone(voxels)
        if voxels.features.is_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if voxels.features.is_cuda else "cpu_time_total"
    (out_dir / "backbone_profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    prof.export_chrome_trace(str(out_dir / "backbone_trace.json"))


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
    step = info["timings"].get("train step (loss + backward)")
    if step is not None:
        lines.append(f"training throughput: {1e3 * info['batch'] / step['median_ms']:.1f} frames/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="voxelnext_small", help="a config name in configs/model/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--points", type=int, default=120_000)
    parser.add_argument("--batch", type=int, default=1, help="frames per batch (different scans of the same size)")
    parser.add_argument("--voxels", type=int, help="size the input by its voxel count instead of --points")
    parser.add_argument("--input", type=Path, help="points file: reused when it exists, else written (same input across runs)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--tf32", action="store_true", help="fp32 products on TF32 tensor cores (torch and spconv)")
    parser.add_argument("--train", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--compare", type=Path, help="an OpenPCDet checkout: time its VoxelNeXt backbone beside ours")
    parser.add_argument("--rounds", type=int, default=5, help="alternation rounds of --compare")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table and trace of the backbone here")
    args = parser.parse_args()
    if args.compare and args.batch != 1:
        parser.error("--compare times one frame: use --batch 1")
    set_tf32(args.tf32)
    info = run(args)
    print(table(info))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
