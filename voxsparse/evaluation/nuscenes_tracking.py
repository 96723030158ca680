"""3D multi-object tracking metrics (AMOTA, AMOTP, MOTA, IDS, ...) from the nuScenes devkit's ``TrackingEval``.

Nothing of the metric is re-implemented here: tracks are written as a nuScenes tracking submission
(https://www.nuscenes.org/tracking: ``tracking_id``, ``tracking_name``, ``tracking_score`` per box)
and scored by ``nuscenes.eval.tracking.evaluate.TrackingEval`` (which counts with py-motmetrics).
Install with ``pip install -e ".[nuscenes]"`` (devkit 1.2.0, ``motmetrics==1.1.3``, pandas).

Sequences that are not nuScenes data (the synthetic world) take the same route:
:func:`write_tracking_dataset` writes their ground truth as a tiny nuScenes-format dataset
(:mod:`voxsparse.data.nuscenes_tiny`: one scene per sequence, one keyframe per frame, one instance
per ground-truth track id, the exact per-frame poses), so one code path scores both.

Frames: every box here is first taken to a fixed *global* frame (the tracker must not mistake ego
motion for object motion). :func:`detections_to_global` applies a LiDAR-to-global transform whose
rotation is taken as a yaw (as the devkit's own exporters do; sensors are mounted level).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import unittest
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from voxsparse.data.nuscenes import sequences_from_nusc
from voxsparse.data.nuscenes_tiny import (
    TinyNuScenes,
    TinyNuScenesSpec,
    TinyObject,
    TinyScene,
    write_tiny_nuscenes,
)
from voxsparse.evaluation.nuscenes import SubmissionMeta, export_submission
from voxsparse.geometry import RigidTransform, wrap_angle
from voxsparse.structures import Annotations3D, Boxes3D, Detections3D
from voxsparse.utils.io import atomic_write

__all__ = [
    "NuScenesTrackingMetrics",
    "TrackingDataset",
    "TrackingFrame",
    "detections_to_global",
    "evaluate_nuscenes_tracking",
    "export_tracking_submission",
    "sequences_from_nusc",
    "write_tracking_dataset",
]

#: The devkit's summary keys reported, with how :class:`NuScenesTrackingMetrics` names them.
_SUMMARY_KEYS = {
    "amota": "AMOTA",
    "amotp": "AMOTP",
    "recall": "recall",
    "motar": "MOTAR",
    "mota": "MOTA",
    "motp": "MOTP",
    "ids": "IDS",
    "frag": "FRAG",
    "tp": "TP",
    "fp": "FP",
    "fn": "FN",
    "mt": "MT",
    "ml": "ML",
}
_COUNTS = ("IDS", "FRAG", "TP", "FP", "FN", "MT", "ML")


def _yaw(transform: RigidTransform) -> float:
    r = transform.matrix()
    return math.atan2(r[1, 0], r[0, 0])


def detections_to_global(det: Detections3D, lidar_to_global: RigidTransform) -> Detections3D:
    """``det`` with boxes (centre, heading, velocity) and query voxels in the global frame (float64)."""
    boxes = det.boxes.tensor.detach().cpu().double().numpy().copy()
    yaw = _yaw(lidar_to_global)
    rot2 = lidar_to_global.matrix()[:2, :2]
    boxes[:, 0:3] = lidar_to_global.apply(boxes[:, 0:3])
    boxes[:, 6] = wrap_angle(boxes[:, 6] + yaw)
    if boxes.shape[1] == 9:
        boxes[:, 7:9] = boxes[:, 7:9] @ rot2.T
    query = None
    if det.query_xy is not None:
        q = det.query_xy.detach().cpu().double().numpy()
        query = torch.from_numpy(q @ rot2.T + np.asarray(lidar_to_global.translation[:2]))
    return Detections3D(
        Boxes3D(torch.from_numpy(boxes)), det.scores.cpu(), det.labels.cpu(), det.track_ids, query_xy=query
    )


def export_tracking_submission(
    tracks_per_sample: Sequence[Detections3D],
    sample_tokens: Sequence[str],
    tracking_names: Sequence[str],
    lidar_to_global: Mapping[str, RigidTransform],
    path: str | os.PathLike | None = None,
    meta: SubmissionMeta | None = None,
) -> dict:
    """Tracked detections -> the nuScenes tracking submission dict, written to ``path`` if given.

    Args:
        tracks_per_sample: per sample, detections with ``track_ids`` (boxes in that sample's frame,
            which ``lidar_to_global`` takes to the global frame; the tracking score is the score).
        sample_tokens: every sample of the evaluated split, in the same order.
        tracking_names: label ``i`` is the nuScenes tracking name ``tracking_names[i]``.
        lidar_to_global: per sample token.
    """
    for token, det in zip(sample_tokens, tracks_per_sample):
        if det.track_ids is None:
            raise ValueError(f"sample {token}: Detections3D.track_ids is None; run a tracker first")
    detection = export_submission(
        tracks_per_sample, sample_tokens, tracking_names, lidar_to_global, meta=meta or SubmissionMeta()
    )
    results = {
        token: [
            {
                **{k: v for k, v in box.items() if not k.startswith(("detection_", "attribute_"))},
                "tracking_name": box["detection_name"],
                "tracking_score": box["detection_score"],
            }
            for box in boxes
        ]
        for token, boxes in detection["results"].items()
    }
    submission = {"meta": detection["meta"], "results": results}
    if path is not None:
        atomic_write(path, lambda f: f.write(json.dumps(submission).encode("utf-8")))
    return submission


@dataclass(frozen=True)
class TrackingFrame:
    """One frame of a sequence to score.

    Attributes:
        annotations: ground truth in the LiDAR frame; ``track_ids`` identify objects over the sequence.
        lidar_to_world: (4, 4) float64 world-from-LiDAR transform (level: a rotation about z only).
        timestamp: seconds; frames of a sequence are equally spaced.
    """

    annotations: Annotations3D
    lidar_to_world: np.ndarray
    timestamp: float

    def __post_init__(self) -> None:
        pose = np.asarray(self.lidar_to_world, dtype=np.float64)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise ValueError(f"TrackingFrame.lidar_to_world: expected a finite (4, 4) matrix, got shape {pose.shape}")
        if abs(pose[2, 2] - 1.0) > 1e-6:
            raise ValueError("TrackingFrame.lidar_to_world: expected a rotation about z only (a level sensor)")


@dataclass(frozen=True)
class TrackingDataset:
    """Sequences written by :func:`write_tracking_dataset`.

    Attributes:
        tiny: the written dataset (``dataroot``, ``version``; its split ``"tracking"`` holds every scene).
        sample_tokens: per sequence, one token per frame.
        lidar_to_global: per sample token, the transform its detections are exported with.
    """

    tiny: TinyNuScenes
    sample_tokens: tuple[tuple[str, ...], ...]
    lidar_to_global: dict[str, RigidTransform]
    split: str = "tracking"


def write_tracking_dataset(
    root: str | os.PathLike,
    sequences: Sequence[Sequence[TrackingFrame]],
    class_names: Sequence[str],
    categories: Mapping[str, str],
) -> TrackingDataset:
    """Write the ground truth of ``sequences`` as a tiny nuScenes dataset the tracking devkit scores.

    The global frame is the world's x, y with the LiDAR's z (the tiny format's ego stays at z = 0;
    the tracking metrics use BEV centre distances only). The ego must move at constant velocity and
    heading over each sequence (true of the synthetic world); a ValueError says otherwise.

    Args:
        sequences: frames in time order per sequence (>= 1 frame each).
        class_names: label ``i`` is ``class_names[i]``.
        categories: class name -> nuScenes category (the dataset's, e.g.
            ``voxsparse.data.synthetic.NUSCENES_CLASSES``).
    """
    missing = [n for n in class_names if n not in categories]
    if missing:
        raise ValueError(f"categories: no nuScenes category for classes {missing}")
    scenes, interval = [], None
    for s, frames in enumerate(sequences):
        if not frames:
            raise ValueError(f"sequences[{s}]: empty")
        times = np.array([f.timestamp for f in frames])
        poses = np.stack([np.asarray(f.lidar_to_world, dtype=np.float64) for f in frames])
        steps = np.diff(times)
        if len(steps):
            if steps.min() <= 0 or np.ptp(steps) > 1e-6:
                raise ValueError(f"sequences[{s}]: timestamps must be equally spaced and increasing, got {times}")
            if interval is not None and abs(steps[0] - interval) > 1e-6:
                raise ValueError(f"sequences[{s}]: frame interval {steps[0]} differs from {interval}")
            interval = float(steps[0])
        yaw = np.arctan2(poses[:, 1, 0], poses[:, 0, 0])
        velocity = (poses[-1, :2, 3] - poses[0, :2, 3]) / max(times[-1] - times[0], 1e-9)
        scene_objects = _scene_objects(frames, poses, yaw, class_names, categories, f"sequences[{s}]")
        scene = TinyScene(
            name=f"scene-{s:04d}",
            num_samples=len(frames),
            objects=scene_objects,
            ego_translation=tuple(poses[0, :2, 3]),
            ego_yaw=float(yaw[0]),
            ego_velocity=tuple(velocity) if len(frames) > 1 else (0.0, 0.0),
        )
        for k in range(len(frames)):
            ego = scene.ego_pose(k * (interval or 0.0))
            if np.abs(np.asarray(ego.translation[:2]) - poses[k, :2, 3]).max() > 1e-3 or abs(
                wrap_angle(_yaw(ego) - yaw[k])
            ) > 1e-4:
                raise ValueError(f"sequences[{s}]: the ego does not move at constant velocity and heading")
        scenes.append(scene)
    spec = TinyNuScenesSpec(
        scenes=tuple(scenes),
        splits={"tracking": tuple(s.name for s in scenes)},
        keyframe_interval_s=interval or 0.5,
        lidar_translation=(0.0, 0.0, 0.0),
        lidar_rotation=(1.0, 0.0, 0.0, 0.0),
        points_per_object=1,
        ground_points=0,
    )
    tiny = write_tiny_nuscenes(root, spec)
    interval_s = round(spec.keyframe_interval_s * 1e6) * 1e-6  # as the writer rounds it
    lidar_to_global = {
        token: scene.ego_pose(k * interval_s)
        for scene, tokens in zip(scenes, tiny.sample_tokens)
        for k, token in enumerate(tokens)
    }
    return TrackingDataset(tiny, tiny.sample_tokens, lidar_to_global)


def _scene_objects(frames, poses, yaw, class_names, categories, where) -> tuple[TinyObject, ...]:
    """One TinyObject per ground-truth track id, with its exact pose in every frame it appears in."""
    seen: dict[int, dict] = {}
    for k, frame in enumerate(frames):
        a = frame.annotations
        boxes = a.boxes.tensor.detach().cpu().double().numpy()
        xy = boxes[:, :2] @ poses[k, :2, :2].T + poses[k, :2, 3]
        for i, tid in enumerate(a.track_ids.tolist()):
            obj = seen.setdefault(
                tid, {"label": int(a.labels[i]), "size": tuple(boxes[i, [4, 3, 5]]), "samples": [], "poses": []}
            )
            if obj["label"] != int(a.labels[i]):
                raise ValueError(f"{where}: track id {tid} changes class at frame {k}")
            if obj["samples"] and obj["samples"][-1] == k:
                raise ValueError(f"{where}: track id {tid} appears twice in frame {k}")
            obj["samples"].append(k)
            obj["poses"].append((xy[i, 0], xy[i, 1], boxes[i, 2], float(boxes[i, 6] + yaw[k])))
    return tuple(
        TinyObject(
            category=categories[class_names[o["label"]]],
            translation=o["poses"][0][:3],
            size=o["size"],
            samples=tuple(o["samples"]),
            poses=tuple(o["poses"]),
        )
        for o in seen.values()
    )


@dataclass
class NuScenesTrackingMetrics:
    """The devkit's tracking summary: class means (AMOTA, AMOTP, MOTA, ...) and sums (IDS, TP, FP, FN, ...).

    Attributes:
        overall: metric name -> value over the classes that have ground truth (``AMOTA``, ``AMOTP``
            (metres), ``recall``, ``MOTAR``, ``MOTA``, ``MOTP`` (metres), ``IDS``, ``FRAG``, ``TP``,
            ``FP``, ``FN``, ``MT``, ``ML``).
        per_class: tracking name -> the same metrics; classes without ground truth are left out.
    """

    overall: dict[str, float]
    per_class: dict[str, dict[str, float]]

    def table(self) -> str:
        """The overall numbers, then one row per class (rates to 4 decimals, counts whole)."""
        names = list(_SUMMARY_KEYS.values())

        def fmt(name: str, value: float) -> str:
            return f"{value:.0f}" if name in _COUNTS else f"{value:.4f}"

        lines = [
            "nuScenes tracking (devkit TrackingEval)",
            "   ".join(f"{n} {fmt(n, self.overall[n])}" for n in names),
            "",
            f"{'class':<12}" + "".join(f"{n:>8}" for n in names),
        ]
        for cls, m in self.per_class.items():
            lines.append(f"{cls:<12}" + "".join(f"{fmt(n, m[n]):>8}" for n in names))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, float]:
        out = dict(self.overall)
        for cls, m in self.per_class.items():
            out.update({f"{n}/{cls}": v for n, v in m.items()})
        return out


def evaluate_nuscenes_tracking(
    dataroot: str | os.PathLike,
    version: str,
    result_path: str | os.PathLike,
    eval_set: str,
    output_dir: str | os.PathLike,
    class_range: Mapping[str, float] | None = None,
    verbose: bool = False,
) -> NuScenesTrackingMetrics:
    """Score a tracking submission with the devkit's ``TrackingEval`` (config ``tracking_nips_2019``).

    Args:
        dataroot, version: the nuScenes dataset (``NuScenes(version=..., dataroot=...)``).
        result_path: submission JSON (:func:`export_tracking_submission`).
        eval_set: a predefined split or a custom one of ``<dataroot>/<version>/splits.json``.
        output_dir: where the devkit writes ``metrics_summary.json`` and ``metrics_details.json``.
        class_range: tracking name -> evaluation radius (m) replacing the config's (50 m vehicles,
            40 m others), e.g. to stay inside a detector's range.
        verbose: let the devkit print its progress and tables.

    Raises:
        ImportError: naming the extra when the devkit or py-motmetrics / pandas are missing.
    """
    try:
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.tracking.evaluate import TrackingEval
    except (ImportError, unittest.SkipTest) as exc:  # the devkit raises SkipTest without motmetrics / pandas
        raise ImportError(
            f'nuScenes tracking evaluation needs nuscenes-devkit, motmetrics and pandas ({exc}): pip install -e ".[nuscenes]"'
        ) from exc
    config = config_factory("tracking_nips_2019")
    if class_range is not None:
        unknown = sorted(set(class_range) - set(config.class_range))
        if unknown:
            raise ValueError(f"class_range: {unknown} are not nuScenes tracking names {sorted(config.class_range)}")
        config.class_range.update({k: float(v) for k, v in class_range.items()})
    quiet = contextlib.ExitStack()
    if not verbose:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    with quiet:
        evaluator = TrackingEval(
            config=config,
            result_path=str(result_path),
            eval_set=eval_set,
            output_dir=str(output_dir),
            nusc_version=version,
            nusc_dataroot=str(dataroot),
            verbose=verbose,
        )
        summary = evaluator.main(render_curves=False)
    return _metrics_from_summary(summary)


def _metrics_from_summary(summary: Mapping[str, Any]) -> NuScenesTrackingMetrics:
    label = summary["label_metrics"]
    overall = {name: float(summary[key]) for key, name in _SUMMARY_KEYS.items()}
    per_class = {
        cls: {name: float(label[key][cls]) for key, name in _SUMMARY_KEYS.items()}
        for cls, gt in label["gt"].items()
        if not np.isnan(gt) and gt > 0
    }
    return NuScenesTrackingMetrics(overall, per_class)

