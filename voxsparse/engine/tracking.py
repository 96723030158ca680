"""Detect, track and score: what ``tools/track.py`` runs.

The dataset config's ``tracking`` section builds its dataset module's tracking source
(:mod:`voxsparse.data.tracking`): the frames to detect and, after detection, their sequences in
time order, timestamps, the nuScenes tracking name of each class and the ground truth to score
against. The detector runs over every frame; :class:`voxsparse.models.trackers.VoxelNeXtTracker`
links the detections of each sequence in a fixed global frame, with the gate of each class's
tracking name (``tracker.max_distance``); the tracks are written as a nuScenes tracking submission
(``tracking_results.json``) and scored by the devkit's ``TrackingEval``. Where the dataset is not
nuScenes data, its ground truth is first written as a tiny nuScenes dataset (``nuscenes_gt/``), so
every dataset takes one scoring path.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.tracking import DevkitDataset, TrackingSequences
from voxsparse.engine.distributed import DistInfo
from voxsparse.engine.inference import DatasetPredictions, predict_dataset
from voxsparse.evaluation.nuscenes_tracking import (
    NuScenesTrackingMetrics,
    TrackingFrame,
    detections_to_global,
    evaluate_nuscenes_tracking,
    export_tracking_submission,
    write_tracking_dataset,
)
from voxsparse.geometry import RigidTransform
from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker
from voxsparse.structures import Detections3D

log = logging.getLogger(__name__)

_IDENTITY = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))


@dataclass
class TrackOptions:
    """``tools/track.py``'s own options (``configs/track.yaml``)."""

    checkpoint: str | None = None
    device: str = "auto"
    batch_size: int = 4
    class_range: dict[str, float] | None = None


@dataclass
class TrackingRun:
    """The tracks of a run and where they were scored.

    Attributes:
        predictions: the detector's output on every frame (LiDAR frame).
        tracks: per dataset index, its tracked detections (global frame; untracked classes removed).
        submission: the written ``tracking_results.json``.
        metrics: the devkit's numbers.
    """

    predictions: DatasetPredictions
    tracks: list[Detections3D | None]
    submission: Path
    metrics: NuScenesTrackingMetrics


def check_tracking(dataset: Mapping) -> None:
    """Raise ValueError unless the dataset config has a ``tracking`` section."""
    if dataset.get("tracking") is None:
        raise ValueError(
            "dataset config: no 'tracking' section naming its tracking source (a class of its dataset "
            "module with frames() and sequences(); see voxsparse.data.tracking)"
        )


def _inscribed_radius(point_cloud_range: Sequence[float]) -> float:
    r = point_cloud_range
    return float(min(-r[0], -r[1], r[3], r[4]))


def _scored_dataset(
    seq: TrackingSequences, predictions: DatasetPredictions, class_names: Sequence[str], output_dir: Path
) -> DevkitDataset:
    """The dataset to score against: the dataset's own, or its ground truth written in nuScenes format."""
    if seq.devkit is not None:
        return seq.devkit
    data = write_tracking_dataset(
        output_dir / "nuscenes_gt",
        [[TrackingFrame(predictions.annotations[i], seq.ego_poses[i], seq.timestamps[i]) for i in s] for s in seq.indices],
        class_names,
        seq.categories,
    )
    return DevkitDataset(
        data.tiny.dataroot, data.tiny.version, data.split,
        [t for tokens in data.sample_tokens for t in tokens], data.lidar_to_global,
    )


def run_tracking(
    model: Any,
    dataset: Mapping,
    tracker: TrackerConfig,
    info: DistInfo,
    output_dir: str | Path,
    batch_size: int = 4,
    class_range: Mapping[str, float] | None = None,
) -> TrackingRun:
    """Detect every frame of the dataset's tracking source with ``model``, track and score.

    Args:
        model: a detector (``class_names``, ``grid``).
        dataset: the dataset config (its ``tracking`` section).
        tracker: the tracker's settings; ``max_distance`` holds a gate per nuScenes tracking name.
        output_dir: where ``tracking_results.json``, ``devkit/`` (and ``nuscenes_gt/``) are written.
        class_range: evaluation radius per tracking name replacing the devkit's; None: the devkit's,
            or for a range-limited dataset the circle inscribed in the model's range.
    """
    output_dir = Path(output_dir)
    check_tracking(dataset)
    source = instantiate(dataset["tracking"])
    frames = source.frames()
    predictions = predict_dataset(model, DetectionDataset(frames, model.grid.point_cloud_range), info, batch_size)
    seq: TrackingSequences = source.sequences(frames, list(predictions.frame_ids))
    scored = _scored_dataset(seq, predictions, model.class_names, output_dir)

    # The tracker sees the tracked classes only, each named (and gated) by its tracking name.
    tracked = [label for label, name in enumerate(model.class_names) if name in seq.tracking_names]
    names = [seq.tracking_names[model.class_names[label]] for label in tracked]
    missing = sorted({n for n in names if n not in tracker.max_distance})
    if missing:
        raise ValueError(f"tracker.max_distance: no gate for the tracking names {missing}")
    config = dataclasses.replace(tracker, max_distance={n: tracker.max_distance[n] for n in names})
    to_tracked = torch.full((len(model.class_names),), -1, dtype=torch.int64)
    to_tracked[tracked] = torch.arange(len(tracked))

    def tracked_only(det: Detections3D) -> Detections3D:
        det = det[to_tracked[det.labels] >= 0]
        return dataclasses.replace(det, labels=to_tracked[det.labels])

    linker = VoxelNeXtTracker(names, config)
    tracks: list[Detections3D | None] = [None] * len(predictions.detections)
    for indices in seq.indices:
        world = [
            detections_to_global(tracked_only(predictions.detections[i]), scored.lidar_to_global[scored.sample_tokens[i]])
            for i in indices
        ]
        for i, out in zip(indices, linker.track_sequence(world, [seq.timestamps[i] for i in indices])):
            tracks[i] = out
    if class_range is not None:
        class_range = {k: float(v) for k, v in class_range.items()}
    elif seq.range_limited:
        # The detector sees the square point_cloud_range: ground truth beyond its inscribed circle
        # could never be found (the devkit's radii are 50 m for cars, 40 m for the others).
        class_range = dict.fromkeys(names, _inscribed_radius(model.grid.point_cloud_range))
    # Tracks are in the global frame already: they are exported unmoved.
    path = output_dir / "tracking_results.json"
    tokens = list(scored.sample_tokens)
    export_tracking_submission(tracks, tokens, names, dict.fromkeys(tokens, _IDENTITY), path)
    metrics = evaluate_nuscenes_tracking(
        scored.dataroot, scored.version, path, scored.eval_set, output_dir / "devkit", class_range=class_range
    )
    return TrackingRun(predictions, tracks, path, metrics)
