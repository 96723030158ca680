"""Detect, track and score 3D multi-object tracking with the nuScenes devkit (AMOTA, AMOTP, MOTA, IDS).

    python tools/track.py checkpoint=outputs/voxelnext_small/<run>/last.pth
    python tools/track.py checkpoint=... dataset=nuscenes        # the val split of real nuScenes

What runs is :func:`voxsparse.engine.tracking.run_tracking`: the dataset config's ``tracking``
section names the frames and sequences (synthetic: held-out sequences of the test split), the
tracker links each sequence's detections, and the devkit's ``TrackingEval`` scores them. Writes
``tracking_results.json``, ``metrics.json`` and the devkit's files under ``devkit/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import voxsparse
from voxsparse.engine.cli import tool
from voxsparse.engine.config import check_types, parse_options
from voxsparse.engine.distributed import init_distributed
from voxsparse.engine.evaluate import report
from voxsparse.engine.tracking import TrackOptions, check_tracking, run_tracking
from voxsparse.models.trackers import TrackerConfig

log = logging.getLogger("voxsparse.track")


@tool("track")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, TrackOptions)
    tracker = parse_options(cfg.tracker, TrackerConfig, "tracker.", strict=True)
    if opts.checkpoint is None:
        raise ValueError("give checkpoint=PATH (the detector to track with)")
    check_types(cfg.dataset, "dataset")
    check_tracking(cfg.dataset)  # a dataset without a tracking section fails before any model loads
    info = init_distributed(opts.device)
    if info.world_size > 1:
        raise ValueError("tools/track.py runs in one process: tracking is sequential per sequence")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    model = voxsparse.load_model(opts.checkpoint, info.device)
    run = run_tracking(model, cfg.dataset, tracker, info, output_dir, opts.batch_size, opts.class_range)
    report(run.metrics, output_dir)
    log.info("tracks in %s, results in %s", run.submission, output_dir)


if __name__ == "__main__":
    main()
