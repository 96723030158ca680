"""Detect, track and score 3D multi-object tracking with the nuScenes devkit (AMOTA, AMOTP, MOTA, IDS).

    python tools/track.py checkpoint=outputs/voxelnext_small/<run>/last.pth
    python tools/track.py checkpoint=... dataset=nuscenes        # the val split of real nuScenes

The detector runs over every frame; :class:`voxsparse.models.trackers.VoxelNeXtTracker` links its
detections over each sequence in a fixed global frame; the tracks are written as a nuScenes tracking
submission (``tracking_results.json``) and scored by the devkit's ``TrackingEval``
(``metrics.json``, devkit files under ``devkit/``). Synthetic data: the held-out sequences of
``synthetic_sequences`` (the test split), whose ground truth is first written as a tiny nuScenes
dataset (``nuscenes_gt/``), so both kinds of data take one scoring path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import voxsparse

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.nuscenes import lidar_to_global_from_nusc
from voxsparse.engine.cli import tool
from voxsparse.engine.config import check_types, parse_options
from voxsparse.engine.distributed import init_distributed
from voxsparse.engine.evaluate import report
from voxsparse.engine.inference import DatasetPredictions, predict_dataset
from voxsparse.evaluation.nuscenes_tracking import (
    SYNTHETIC_TO_NUSCENES,
    TrackingFrame,
    detections_to_global,
    evaluate_nuscenes_tracking,
    export_tracking_submission,
    sequences_from_nusc,
    write_tracking_dataset,
)
from voxsparse.geometry import RigidTransform
from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker
from voxsparse.structures import Detections3D

log = logging.getLogger("voxsparse.track")

_IDENTITY = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


@dataclass
class TrackOptions:
    """The tool's own options (configs/track.yaml)."""

    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 4
    class_range: dict[str, float] | None = None


@dataclass
class SyntheticSequences:
    """The ``synthetic_sequences`` section: held-out sequences of the synthetic world."""

    split: str = "test"
    seed: int = 0
    num_sequences: int = 10
    sequence_length: int = 20


@dataclass
class Sequences:
    """Dataset frames grouped into sequences, and the nuScenes dataset that scores them.

    Attributes:
        indices: per sequence, dataset indices in time order.
        timestamps: per dataset index, seconds.
        sample_tokens: per dataset index, its nuScenes sample token.
        lidar_to_global: per sample token.
        export_names: per label, the nuScenes name it is exported with.
        tracked: per label, whether it is a nuScenes tracking class (others are not tracked).
        dataroot, version, eval_set: what ``TrackingEval`` loads.
        class_range: evaluation radius per tracking name replacing the devkit's, or None.
    """

    indices: list[list[int]]
    timestamps: list[float]
    sample_tokens: list[str]
    lidar_to_global: dict[str, RigidTransform]
    export_names: list[str]
    tracked: list[bool]
    dataroot: Path
    version: str
    eval_set: str
    class_range: dict[str, float] | None


def _synthetic(
    dataset: DictConfig, opts: TrackOptions, s: SyntheticSequences, model, info, output_dir: Path
) -> tuple[DatasetPredictions, Sequences]:
    raw = instantiate(
        dataset.val,
        split=s.split,
        seed=s.seed,
        num_frames=s.num_sequences * s.sequence_length,
        sequence_length=s.sequence_length,
    )
    predictions = predict_dataset(model, DetectionDataset(raw, model.grid.point_cloud_range), info, opts.batch_size)
    names = [SYNTHETIC_TO_NUSCENES[n][1] for n in model.class_names]
    frames = [raw[i] for i in range(len(raw))]  # ego poses and times (the frame cache makes this cheap)
    indices = [list(range(q * s.sequence_length, (q + 1) * s.sequence_length)) for q in range(s.num_sequences)]
    data = write_tracking_dataset(
        output_dir / "nuscenes_gt",
        [[TrackingFrame(predictions.annotations[i], frames[i].ego_pose, frames[i].timestamp) for i in seq] for seq in indices],
        model.class_names,
    )
    sequences = Sequences(
        indices=indices,
        timestamps=[f.timestamp for f in frames],
        sample_tokens=[t for tokens in data.sample_tokens for t in tokens],
        lidar_to_global=data.lidar_to_global,
        export_names=names,
        tracked=[True] * len(names),
        dataroot=data.tiny.dataroot,
        version=data.tiny.version,
        eval_set=data.split,
        # The detector sees the square point_cloud_range: ground truth beyond its inscribed circle
        # could never be found (the devkit's radii are 50 m for cars, 40 m for the others).
        class_range=_class_range(opts) or dict.fromkeys(names, _inscribed_radius(model)),
    )
    return predictions, sequences


def _nuscenes(dataset: DictConfig, opts: TrackOptions, model, info) -> tuple[DatasetPredictions, Sequences]:
    from nuscenes import NuScenes
    from nuscenes.eval.tracking.constants import TRACKING_NAMES

    val_set = DetectionDataset(instantiate(dataset.val), model.grid.point_cloud_range)
    predictions = predict_dataset(model, val_set, info, opts.batch_size)
    nusc = NuScenes(version=dataset.version, dataroot=str(dataset.raw_root), verbose=False)
    tokens = list(predictions.frame_ids)  # prepared nuScenes frames are named by their sample token
    indices, timestamps = sequences_from_nusc(nusc, tokens)
    sequences = Sequences(
        indices=indices,
        timestamps=timestamps,
        sample_tokens=tokens,
        lidar_to_global=lidar_to_global_from_nusc(nusc, tokens),
        export_names=list(model.class_names),
        tracked=[n in TRACKING_NAMES for n in model.class_names],
        dataroot=Path(dataset.raw_root),
        version=dataset.version,
        eval_set=dataset.val_split,
        class_range=_class_range(opts),
    )
    return predictions, sequences


def _class_range(opts: TrackOptions) -> dict[str, float] | None:
    return None if opts.class_range is None else {k: float(v) for k, v in opts.class_range.items()}


def _inscribed_radius(model) -> float:
    r = model.grid.point_cloud_range
    return float(min(-r[0], -r[1], r[3], r[4]))


def _tracked_classes_only(det: Detections3D, tracked: list[bool]) -> Detections3D:
    return det[torch.tensor(tracked, dtype=torch.bool)[det.labels]]


@tool("track")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, TrackOptions)
    synthetic = parse_options(
        cfg.synthetic_sequences, SyntheticSequences, "synthetic_sequences.", strict=True
    )
    if opts.checkpoint is None:
        raise ValueError("give checkpoint=PATH (the detector to track with)")
    check_types(cfg.dataset, "dataset")
    info = init_distributed(opts.device)
    if info.world_size > 1:
        raise ValueError("tools/track.py runs in one process: tracking is sequential per sequence")
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    model = voxsparse.load_model(opts.checkpoint, info.device)
    if cfg.dataset.val._target_.endswith("SyntheticDataset"):
        predictions, seq = _synthetic(cfg.dataset, opts, synthetic, model, info, output_dir)
    else:
        predictions, seq = _nuscenes(cfg.dataset, opts, model, info)

    tracker = VoxelNeXtTracker(model.class_names, parse_options(cfg.tracker, TrackerConfig, "tracker.", strict=True))
    tracks: list[Detections3D | None] = [None] * len(predictions.detections)
    for indices in seq.indices:
        world = [
            detections_to_global(
                _tracked_classes_only(predictions.detections[i], seq.tracked),
                seq.lidar_to_global[seq.sample_tokens[i]],
            )
            for i in indices
        ]
        for i, out in zip(indices, tracker.track_sequence(world, [seq.timestamps[i] for i in indices])):
            tracks[i] = out
    # Tracks are in the global frame already: they are exported unmoved.
    path = output_dir / "tracking_results.json"
    export_tracking_submission(tracks, seq.sample_tokens, seq.export_names, {t: _IDENTITY for t in seq.sample_tokens}, path)
    metrics = evaluate_nuscenes_tracking(
        seq.dataroot, seq.version, path, seq.eval_set, output_dir / "devkit", class_range=seq.class_range
    )
    report(metrics, output_dir)
    log.info("tracks in %s, results in %s", path, output_dir)


if __name__ == "__main__":
    main()
