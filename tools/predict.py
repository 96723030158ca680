"""Run a checkpoint on your own scans (a point file, a folder of them, a glob pattern) or on a recorded drive.

    python tools/predict.py checkpoint=outputs/voxelnext_small/<run>/last.pth input=scan.bin
    python tools/predict.py checkpoint=... input=scans/ format=kitti render=true
    python tools/predict.py checkpoint=... input='sweeps/LIDAR_TOP/*.pcd.bin'
    python tools/predict.py checkpoint=... bag=drive.mcap topic=/lidar/top [pose_topic=/tf] [output=out.mcap]

Each scan is read (voxsparse.data.pointfile: .bin .npy .pcd .ply), converted to the model's point
convention, and detected. Writes to the run directory (outputs/predict/<date_time>/, or
hydra.run.dir=...): ``detections.jsonl`` (a line per scan: its detections with class names, scores
and boxes), ``predictions.pt`` (what ``tools/eval.py predictions=`` and ``tools/visualize.py
predictions=`` read) and, with ``render=true``, ``renders/<frame_id>.png``.

A drive (``bag=`` a ROS 1/2 bag or MCAP file, ``topic=`` its PointCloud2 topic) is streamed, detected and
tracked frame by frame (voxsparse.stream; its options and outputs: configs/predict.yaml).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import voxsparse
from voxsparse.data.pointfile import read_points
from voxsparse.engine.cli import tool
from voxsparse.engine.config import parse_options
from voxsparse.engine.predict import (
    ScanOptions,
    ScanPredictor,
    ScanResult,
    find_scans,
    frame_id_of,
    write_jsonl,
)
from voxsparse.evaluation.predictions_io import PredictionsFile, save_predictions
from voxsparse.models.trackers import TrackerConfig
from voxsparse.stream import DriveOptions, run_drive
from voxsparse.utils.progress import progress

log = logging.getLogger("voxsparse.predict")


def _render(result: ScanResult, points, model, opts: ScanOptions, backend: str, out: Path) -> None:
    """A bird's-eye view of the scan over the model's range, its detections drawn."""
    from voxsparse.viz import build_scene, camera_preset, render_scene, write_image

    scene = build_scene(points, None, result.detections, class_names=model.class_names,
                        score_threshold=opts.render_score, title=result.frame_id)
    r = model.grid.point_cloud_range
    camera = camera_preset("bev", extent=(r[0], r[1], r[3], r[4]))
    write_image(out / f"{result.frame_id}.png", render_scene(scene, camera, backend))


@tool("predict")
def main(cfg: DictConfig) -> None:
    opts, drive = parse_options(cfg, ScanOptions), parse_options(cfg, DriveOptions)
    if opts.checkpoint is None or (opts.input is None) == (drive.bag is None):
        raise ValueError("give checkpoint=PATH and either input=FILE|FOLDER|'GLOB' or bag=DRIVE topic=TOPIC")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if drive.bag is not None:
        tracker = parse_options(cfg.tracker, TrackerConfig, "tracker.", strict=True)
        model = voxsparse.load_model(opts.checkpoint, opts.device)
        return run_drive(model, drive, output_dir, tracker, opts.device, opts.min_score)
    scans = find_scans(opts.input)
    model = voxsparse.load_model(opts.checkpoint, opts.device)
    predictor = ScanPredictor(model, opts.device)
    backend = None
    if opts.render:
        from voxsparse.viz import resolve_backend

        backend = resolve_backend(opts.backend)
    log.info("%d scan(s); model %s; writing to %s", len(scans), opts.checkpoint, output_dir)
    results = []
    start = time.perf_counter()
    for path in progress(scans, "predict", unit="scan"):
        cloud = read_points(path, opts.format, opts.columns, opts.nonfinite)
        detections = predictor(cloud)
        detections = detections[detections.scores >= opts.min_score]
        result = ScanResult(frame_id_of(path), path, len(cloud), detections)
        results.append(result)
        log.info("%s: %d points, %d detections", path, len(cloud), len(detections))
        if backend is not None:
            _render(result, cloud.points, model, opts, backend, output_dir / "renders")
    frame_ids = [r.frame_id for r in results]
    if len(set(frame_ids)) != len(frame_ids):
        raise ValueError(f"input {opts.input}: two scans share a file name, so their frame ids clash: {frame_ids}")
    write_jsonl(output_dir / "detections.jsonl", results, model.class_names)
    save_predictions(
        output_dir / "predictions.pt",
        PredictionsFile(frame_ids, [r.detections for r in results], list(model.class_names), model.grid.point_cloud_range),
    )
    log.info("%d scans in %.1f s: %s", len(results), time.perf_counter() - start, output_dir / "detections.jsonl")


if __name__ == "__main__":
    main()
