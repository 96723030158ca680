"""Per-frame latency of the stream (detection and tracking, voxsparse.stream) over a drive:
p50 / p99 after warm-up frames, CPU or CUDA.

    python tools/stream_benchmark.py --model voxelnext_small --device cpu --frames 30
    python tools/stream_benchmark.py --checkpoint last.pth --device cuda --frames 300 --fuse
    python tools/stream_benchmark.py --checkpoint last.pth --drive drive.mcap --topic /lidar/top --pose-topic /tf

The frames are one synthetic sequence of the default LiDAR (``--frames`` sweeps, ego poses included)
or a recorded drive's PointCloud2 topic (read before timing: the time is the stream's alone). A model
named by config has untrained weights (its few detections make tracking cheaper than a trained
model's): give a checkpoint for numbers that stand for a real run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import voxsparse
from voxsparse.benchmark.stages import build_model
from voxsparse.data.drives import read_drive
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.models.trackers import TrackerConfig
from voxsparse.stream import DetectionStream, LatencyStats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="voxelnext_small", help="a config name in configs/model/ (untrained)")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of --model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=30, help="synthetic frames (without --drive)")
    parser.add_argument("--warmup", type=int, default=3, help="first frames left out of the statistics")
    parser.add_argument("--drive", help="a recorded drive instead of synthetic frames (with --topic)")
    parser.add_argument("--topic", default="/lidar/top")
    parser.add_argument("--pose-topic")
    parser.add_argument("--fuse", action="store_true", help="BatchNorm folded into the sparse convs")
    parser.add_argument("--no-track", action="store_true", help="detection only")
    args = parser.parse_args()
    if args.checkpoint:
        model = voxsparse.load_model(args.checkpoint, args.device)
    else:
        model = build_model(args.model).to(args.device)
    if args.drive:
        frames = [(f.cloud, f.timestamp, f.ego_pose) for f in read_drive(args.drive, args.topic, args.pose_topic)]
    else:
        data = SyntheticDataset("val", args.frames, seed=0, sequence_length=args.frames)
        frames = [(f.points, f.timestamp, f.ego_pose) for f in (data[i] for i in range(len(data)))]
    if len(frames) <= args.warmup:
        raise SystemExit(f"{len(frames)} frames: need more than --warmup {args.warmup}")
    # CenterPoint's gates for the synthetic classes, 4 m for any other class.
    gates = {**dict.fromkeys(model.class_names, 4.0), **TrackerConfig().max_distance}
    tracker = None if args.no_track else TrackerConfig(max_distance=gates)
    stream = DetectionStream(model, args.device, tracker, fuse=args.fuse, latency_window=len(frames))
    results = [stream.step(cloud, t, pose) for cloud, t, pose in frames]
    timed = results[args.warmup:]
    stats = LatencyStats.of([r.latency_ms for r in timed])
    print(json.dumps({
        "model": args.checkpoint or args.model, "device": str(args.device),
        "gpu": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else None,
        "frames": stats.frames, "warmup": args.warmup, "fuse": args.fuse, "track": not args.no_track,
        "points_mean": float(np.mean([r.num_points for r in timed])),
        "detections_mean": float(np.mean([len(r.detections) for r in timed])),
        "p50_ms": round(stats.p50_ms, 2), "p99_ms": round(stats.p99_ms, 2), "mean_ms": round(stats.mean_ms, 2),
        "max_ms": round(stats.max_ms, 2), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
