"""Latency and peak memory of a detector's stages on one synthetic LiDAR input, CPU or CUDA.

    python tools/benchmark.py --model voxelnext_small --device cpu
    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --points 300000 --amp --train
    python tools/benchmark.py --model dsvt_pillar_waymo --device cuda --voxels 100000   # Waymo scale
    python tools/benchmark.py ... --json bench.json     # also write the numbers as JSON
    python tools/benchmark.py ... --input cloud.pt      # reuse one input across runs (written if absent)
    python tools/benchmark.py ... --scan LIDAR_TOP.pcd.bin --sweeps 10   # real scan geometry, 10 sweeps
    python tools/benchmark.py --model voxelnext_nuscenes --device cuda --voxels 153782 \
        --compare /path/to/OpenPCDet --train           # ours and OpenPCDet's backbone, same input
    python tools/benchmark.py --model dsvt_voxel_waymo --device cuda --voxels 100000 --compare /path/to/OpenPCDet
    python tools/benchmark.py ... --profile trace_dir   # torch.profiler table of the backbone
    python tools/benchmark.py ... --tf32                # fp32 products on TF32 tensor cores
    python tools/benchmark.py --voxelkp [MODULE,...] --device cuda [--compare /path/to/VoxelKP]   # VoxelKP speed
    python tools/benchmark.py --large-kernels --device cuda   # 5x5x5 convolutions: gather tables vs spconv's loop

The input is one frame of the synthetic world scanned by a dense spinning LiDAR whose beam count
is chosen to give about ``--points`` returns, cut to exactly that many (or, with ``--voxels``, to
the fewest points that fill that many voxels of the model's grid); a time-lag channel of zeros
is appended when the model's config expects nuScenes' 5 point features. Each stage is timed
separately on that input (median of ``--repeats`` after ``--warmup``, CUDA synchronised), then the
whole detector end to end. Each row goes to stderr as soon as it is measured, the table to stdout
at the end.

``--compare`` loads OpenPCDet's backbone from a checkout (:mod:`voxsparse.benchmark.openpcdet`) and times it
beside ours on the very voxels ours gets, in alternation in this process. VoxelNeXt configs: forward
in fp32 and under fp16 autocast; ours also layer by layer (the unoptimised path) and index-first
(:mod:`voxsparse.ops.sparse_plan`), unfused and BatchNorm-fused (:mod:`voxsparse.models.fusion`) in
fp32 and in pure fp16; with ``--train`` forward+backward; voxelization beside spconv's
``PointToVoxel``; and the whole detectors, points to boxes: ours (``predict``) against OpenPCDet's
VoxelNeXt with its nuScenes config and head, whose compiled NMS kernel is not run (so their time is
a lower bound; :mod:`voxsparse.benchmark.compare`). The optimised outputs are checked against the
layer-by-layer one and the largest difference is printed. DSVT configs: forward (and with
``--train`` forward+backward) in fp32 and under fp16 autocast, with the output pillars of both
checked to be the same cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from voxsparse.benchmark import large_kernels
from voxsparse.benchmark.compare import NeedsCuda
from voxsparse.benchmark.detector_speed import BenchmarkOptions, format_table, run_benchmark
from voxsparse.benchmark.inputs import FrameCountError
from voxsparse.benchmark.voxelkp import VoxelKPSpeedOptions, run_voxelkp_speed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="voxelnext_small", help="a config name in configs/model/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--points", type=int, default=120_000)
    parser.add_argument("--batch", type=int, default=1, help="frames per batch (different scans of the same size)")
    parser.add_argument("--voxels", type=int, help="size the input by its voxel count instead of --points")
    parser.add_argument("--input", type=Path, help="points file: reused when it exists, else written (same input across runs)")
    parser.add_argument("--scan", type=Path, help="a real scan file, aggregated as --sweeps sweeps of a moving ego, as the input")
    parser.add_argument("--sweeps", type=int, default=1, help="sweeps of --scan (each 0.75 m further back, 0.05 s older)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA only)")
    parser.add_argument("--tf32", action="store_true", help="fp32 products on TF32 tensor cores (torch and spconv)")
    parser.add_argument("--train", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--compare", type=Path, help="an OpenPCDet checkout: time its VoxelNeXt backbone beside ours")
    parser.add_argument("--rounds", type=int, default=5,
                        help="alternation rounds of --compare, and of the two CUDA paths for 5x5x5 convolutions")
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table and trace of the backbone here")
    parser.add_argument("--voxelkp", nargs="?", const="", metavar="MODULE,...", help="voxelkp_small training steps/s "
                        "(batch 4 unless --batch) with the given backbone modules off, and voxelkp_waymo_reference forward "
                        "(--voxels, default 100k) beside --compare's VoxelKP checkout (voxsparse.benchmark.voxelkp)")
    parser.add_argument("--large-kernels", action="store_true", help="5x5x5 convolutions on CUDA, gather tables "
                        "against spconv's loop over layer sizes (voxsparse.benchmark.large_kernels)")
    args = parser.parse_args()
    if args.large_kernels:
        if torch.device(args.device).type != "cuda":
            parser.error("--large-kernels compares the two CUDA paths of 5x5x5 convolutions: use --device cuda")
        print(large_kernels.HEADER, flush=True)
        for row in large_kernels.sweep(args.device, rounds=args.rounds, repeats=args.repeats, warmup=args.warmup):
            print(large_kernels.markdown_row(row), flush=True)
        return
    if args.voxelkp is not None:
        run_voxelkp_speed(VoxelKPSpeedOptions(
            args.device, batch=args.batch if args.batch > 1 else 4, voxels=args.voxels or 100_000, repeats=args.repeats,
            warmup=args.warmup, amp=args.amp, modules_off=tuple(m for m in args.voxelkp.split(",") if m),
            compare=args.compare, rounds=args.rounds), lambda text: print(text, flush=True))
        return
    if args.compare and args.batch != 1:
        parser.error("--compare times one frame: use --batch 1")
    options = BenchmarkOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BenchmarkOptions)})
    try:
        info = run_benchmark(options, lambda name, t: print(f"{name}: {t.median_ms:.2f} ms", file=sys.stderr, flush=True))
    except FrameCountError as error:
        raise SystemExit(f"--input {error.path} holds {error.found} frames, --batch asks for {error.expected}") from None
    except NeedsCuda as error:
        raise SystemExit(f"--compare needs --device cuda: {error}") from None
    print(format_table(info))
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
