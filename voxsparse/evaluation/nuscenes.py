"""nuScenes detection: export the official submission JSON and score it with the nuScenes devkit.

The metric itself is the devkit's ``DetectionEval`` (``pip install -e ".[nuscenes]"``); nothing of it
is re-implemented here. This module only converts our LiDAR-frame detections into the submission
format and turns the devkit's summary into a typed result.

Submission format (https://www.nuscenes.org/object-detection), one box::

    {"sample_token": str, "translation": [x, y, z], "size": [w, l, h], "rotation": [w, x, y, z],
     "velocity": [vx, vy], "detection_name": str, "detection_score": float, "attribute_name": str}

in the *global* frame: metres, a unit quaternion, m/s; ``translation`` is the box centre (as our
``z``), ``size`` is (width, length, height), i.e. our ``(dy, dx, dz)``.

Attributes: our models predict none, so each box gets the attribute the community exporters
(CenterPoint, OpenPCDet, MMDetection3D) use, chosen from the class and the predicted speed
(:func:`default_attribute`). The devkit scores it in mAAE only.

Splits: ``DetectionEval`` takes a predefined split name (``"val"``, ``"mini_val"``, ...) or the name
of a custom split listed in ``<dataroot>/<version>/splits.json`` (devkit 1.2.0, the pinned one); the tiny
dataset of :mod:`voxsparse.data.nuscenes_tiny` writes such a file, so no devkit code is patched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxsparse.data.nuscenes import NUSCENES_DETECTION_NAMES
from voxsparse.geometry import RigidTransform, quaternion_multiply, yaw_quaternion
from voxsparse.structures import Detections3D
from voxsparse.utils.io import atomic_write

__all__ = [
    "NuScenesClassMetrics",
    "NuScenesMetrics",
    "SubmissionMeta",
    "default_attribute",
    "evaluate_nuscenes",
    "export_submission",
]

#: (attribute when moving, attribute when still) per class; "" where the class has no attribute.
_ATTRIBUTES: Mapping[str, tuple[str, str]] = {
    "car": ("vehicle.moving", "vehicle.parked"),
    "truck": ("vehicle.moving", "vehicle.parked"),
    "bus": ("vehicle.moving", "vehicle.stopped"),
    "trailer": ("vehicle.moving", "vehicle.parked"),
    "construction_vehicle": ("vehicle.moving", "vehicle.parked"),
    "pedestrian": ("pedestrian.moving", "pedestrian.standing"),
    "motorcycle": ("cycle.with_rider", "cycle.without_rider"),
    "bicycle": ("cycle.with_rider", "cycle.without_rider"),
    "traffic_cone": ("", ""),
    "barrier": ("", ""),
}

_TP_METRICS = (
    ("trans_err", "ATE"),
    ("scale_err", "ASE"),
    ("orient_err", "AOE"),
    ("vel_err", "AVE"),
    ("attr_err", "AAE"),
)


@dataclass(frozen=True)
class SubmissionMeta:
    """The submission's ``meta`` block: which inputs the method used."""

    use_camera: bool = False
    use_lidar: bool = True
    use_radar: bool = False
    use_map: bool = False
    use_external: bool = False


def default_attribute(detection_name: str, speed: float, moving_threshold: float = 0.2) -> str:
    """The attribute given to a box of class ``detection_name`` moving at ``speed`` m/s.

    Above ``moving_threshold`` m/s: ``vehicle.moving`` / ``cycle.with_rider`` / ``pedestrian.moving``;
    at or below it: ``vehicle.stopped`` for buses, ``vehicle.parked`` for other vehicles,
    ``cycle.without_rider``, ``pedestrian.standing``. Barriers and traffic cones get ``""``.
    """
    if detection_name not in _ATTRIBUTES:
        raise ValueError(
            f"unknown nuScenes detection name {detection_name!r}; expected one of {NUSCENES_DETECTION_NAMES}"
        )
    moving, still = _ATTRIBUTES[detection_name]
    return moving if speed > moving_threshold else still


def _sample_boxes(
    token: str,
    det: Detections3D,
    class_names: Sequence[str],
    lidar_to_global: RigidTransform,
    max_boxes: int,
) -> list[dict]:
    """The submission boxes of one sample, highest scores first; with ``tracking_id`` when ``det`` has track ids."""
    boxes = det.boxes.tensor.detach().cpu().double().numpy()
    scores = det.scores.detach().cpu().double().numpy()
    labels = det.labels.detach().cpu().numpy()
    where = f"sample {token}"
    if boxes.shape[0] != scores.shape[0] or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{where}: {boxes.shape[0]} boxes, {scores.shape[0]} scores, {labels.shape[0]} labels"
        )
    if not np.isfinite(boxes).all():
        raise ValueError(f"{where}: boxes hold NaN or inf")
    if not np.isfinite(scores).all():
        raise ValueError(f"{where}: scores hold NaN or inf")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"{where}: labels must lie in [0, {len(class_names)}), got {labels.min()}..{labels.max()}"
        )
    order = np.argsort(-scores, kind="stable")[:max_boxes]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    track_ids = None if det.track_ids is None else det.track_ids.cpu().numpy()[order]

    centers = lidar_to_global.apply(boxes[:, 0:3])
    sizes = boxes[:, [4, 3, 5]]  # (width, length, height) = (dy, dx, dz)
    quats = quaternion_multiply(np.asarray(lidar_to_global.rotation), yaw_quaternion(boxes[:, 6]))
    velocity_lidar = boxes[:, 7:9] if boxes.shape[1] == 9 else np.zeros((len(boxes), 2))
    # Velocities are over ground, in LiDAR axes: only the rotation applies (vz = 0).
    velocity = velocity_lidar @ lidar_to_global.matrix()[:2, :2].T
    speed = np.linalg.norm(velocity_lidar, axis=1)
    out = []
    for i in range(len(boxes)):
        name = class_names[int(labels[i])]
        box = {
            "sample_token": token,
            "translation": centers[i].tolist(),
            "size": sizes[i].tolist(),
            "rotation": quats[i].tolist(),
            "velocity": velocity[i].tolist(),
            "detection_name": name,
            "detection_score": float(scores[i]),
            "attribute_name": default_attribute(name, float(speed[i])),
        }
        if track_ids is not None:
            box["tracking_id"] = str(int(track_ids[i]))
        out.append(box)
    return out


def export_submission(
    detections_per_sample: Sequence[Detections3D],
    sample_tokens: Sequence[str],
    class_names: Sequence[str],
    lidar_to_global: Mapping[str, RigidTransform],
    path: str | os.PathLike | None = None,
    meta: SubmissionMeta = SubmissionMeta(),
    max_boxes_per_sample: int = 500,
) -> dict:
    """Convert LiDAR-frame detections to the nuScenes submission dict, and write it if ``path`` is given.

    Args:
        detections_per_sample: one :class:`Detections3D` per sample, boxes (K, 7 | 9)
            ``(x, y, z, dx, dy, dz, heading[, vx, vy])`` in that sample's LIDAR_TOP frame: metres,
            radians, m/s over ground in LiDAR axes (7 columns: velocity 0).
        sample_tokens: the nuScenes sample token of each entry; every sample of the evaluated split
            must be present, with an empty :class:`Detections3D` where nothing was found.
        class_names: label ``i`` is the nuScenes detection name ``class_names[i]``
            (one of :data:`voxsparse.data.nuscenes.NUSCENES_DETECTION_NAMES`).
        lidar_to_global: LIDAR_TOP-to-global transform per sample token
            (:func:`voxsparse.data.nuscenes.lidar_to_global_from_nusc`).
        path: where to write the JSON (atomically); nothing is written when None.
        meta: the submission's ``meta`` block.
        max_boxes_per_sample: the challenge's limit; the highest-scoring boxes are kept.

    Returns:
        ``{"meta": {...}, "results": {sample_token: [box, ...]}}``.

    Raises:
        ValueError: naming the sample or class at fault.
    """
    if len(detections_per_sample) != len(sample_tokens):
        raise ValueError(
            f"{len(detections_per_sample)} detection sets but {len(sample_tokens)} sample tokens"
        )
    unknown = [n for n in class_names if n not in NUSCENES_DETECTION_NAMES]
    if unknown:
        raise ValueError(
            f"class_names {unknown} are not nuScenes detection names; expected names from {NUSCENES_DETECTION_NAMES}"
        )
    results: dict[str, list[dict]] = {}
    for token, det in zip(sample_tokens, detections_per_sample):
        if token in results:
            raise ValueError(f"sample token {token} appears more than once")
        if token not in lidar_to_global:
            raise ValueError(
                f"sample token {token}: no LiDAR-to-global transform (not a sample of this dataset?)"
            )
        results[token] = _sample_boxes(token, det, class_names, lidar_to_global[token], max_boxes_per_sample)
    submission = {"meta": dataclasses.asdict(meta), "results": results}
    if path is not None:
        atomic_write(path, lambda f: f.write(json.dumps(submission).encode("utf-8")))
    return submission


@dataclass
class NuScenesClassMetrics:
    """One class's devkit metrics.

    Attributes:
        ap: AP averaged over the matching distances, in [0, 1].
        ap_by_distance: AP at each centre-distance threshold (metres).
        ate, ase, aoe, ave, aae: true-positive errors (metres, 1 - IoU, radians, m/s, 1 - accuracy);
            nan where the devkit leaves a metric undefined (e.g. AOE of traffic cones), 1.0 when
            the class reaches no more than the minimum recall.
    """

    ap: float
    ap_by_distance: dict[float, float]
    ate: float
    ase: float
    aoe: float
    ave: float
    aae: float


@dataclass
class NuScenesMetrics:
    """The devkit's summary: mean AP, NDS and mean TP errors over the ten classes, and each class's metrics."""

    mAP: float
    NDS: float
    mATE: float
    mASE: float
    mAOE: float
    mAVE: float
    mAAE: float
    per_class: dict[str, NuScenesClassMetrics]

    def table(self) -> str:
        """mAP, NDS and the mean TP errors, then one row per class (AP and TP errors)."""
        lines = [
            "nuScenes detection (devkit DetectionEval)",
            f"mAP {self.mAP:.4f}   NDS {self.NDS:.4f}   "
            + "   ".join(f"m{short} {getattr(self, 'm' + short):.4f}" for _, short in _TP_METRICS),
            "",
            f"{'class':<22}{'AP':>8}" + "".join(f"{short:>8}" for _, short in _TP_METRICS),
        ]
        for name, m in self.per_class.items():
            errors = "".join(f"{getattr(m, short.lower()):>8.4f}" for _, short in _TP_METRICS)
            lines.append(f"{name:<22}{m.ap:>8.4f}{errors}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, float]:
        """Flat scalars for loggers, e.g. ``{"mAP": 0.6, "NDS": 0.68, ..., "AP/car": 0.8, "ATE/car": 0.2}``."""
        out = {
            "mAP": self.mAP,
            "NDS": self.NDS,
            "mATE": self.mATE,
            "mASE": self.mASE,
            "mAOE": self.mAOE,
            "mAVE": self.mAVE,
            "mAAE": self.mAAE,
        }
        for name, m in self.per_class.items():
            out[f"AP/{name}"] = m.ap
            for dist, ap in m.ap_by_distance.items():
                out[f"AP@{dist:g}m/{name}"] = ap
            for _, short in _TP_METRICS:
                out[f"{short}/{name}"] = getattr(m, short.lower())
        return out


def _metrics_from_summary(summary: Mapping[str, Any]) -> NuScenesMetrics:
    """Build :class:`NuScenesMetrics` from ``DetectionEval.main``'s summary dict."""
    tp, per_class_tp = summary["tp_errors"], summary["label_tp_errors"]
    per_class = {
        name: NuScenesClassMetrics(
            ap=float(ap),
            ap_by_distance={float(d): float(v) for d, v in summary["label_aps"][name].items()},
            **{short.lower(): float(per_class_tp[name][key]) for key, short in _TP_METRICS},
        )
        for name, ap in summary["mean_dist_aps"].items()
    }
    return NuScenesMetrics(
        mAP=float(summary["mean_ap"]),
        NDS=float(summary["nd_score"]),
        **{f"m{short}": float(tp[key]) for key, short in _TP_METRICS},
        per_class=per_class,
    )


def _split_sample_tokens(nusc: Any, eval_set: str) -> list[str]:
    """Sample tokens of a predefined or custom (``splits.json``) split, via the devkit."""
    from nuscenes.eval.common.loaders import get_samples_of_scenes
    from nuscenes.utils.splits import get_scenes_of_split

    return get_samples_of_scenes(get_scenes_of_split(eval_set, nusc), nusc)


def _out_of_range_box(sample_token: str) -> dict[str, Any]:
    """A submission box 100 km from the origin, beyond every class's evaluation range."""
    return {
        "sample_token": sample_token, "translation": [1e5, 1e5, 0.0], "size": [1.0, 1.0, 1.0],
        "rotation": [1.0, 0.0, 0.0, 0.0], "velocity": [0.0, 0.0], "detection_name": "car",
        "detection_score": 0.01, "attribute_name": "vehicle.parked",
    }


def evaluate_nuscenes(
    nusc: Any,
    result_path: str | os.PathLike,
    eval_set: str,
    output_dir: str | os.PathLike,
    config_name: str = "detection_cvpr_2019",
    verbose: bool = False,
) -> NuScenesMetrics:
    """Score a submission file with the devkit's ``DetectionEval`` (no plots).

    Args:
        nusc: a loaded ``nuscenes.NuScenes``.
        result_path: submission JSON (:func:`export_submission`).
        eval_set: a predefined split (``"val"``, ``"mini_val"``, ...) or a custom one named in
            ``<dataroot>/<version>/splits.json``.
        output_dir: where the devkit writes ``metrics_summary.json`` and ``metrics_details.json``.
        config_name: the devkit's detection config.
        verbose: let the devkit print its progress and tables (silenced otherwise).

    Raises:
        ImportError: when nuscenes-devkit is not installed.
        ValueError: when the file is not a submission or does not cover exactly the split's samples
            (the devkit would fail later with a bare assertion).
    """
    try:
        from nuscenes.eval.common.config import config_factory
        from nuscenes.eval.detection.evaluate import DetectionEval
        from nuscenes.utils.splits import is_predefined_split
    except ImportError as exc:
        raise ImportError('nuScenes evaluation needs nuscenes-devkit: pip install -e ".[nuscenes]"') from exc

    result_path = Path(result_path)
    try:
        results = json.loads(result_path.read_text(encoding="utf-8"))["results"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"submission {result_path}: not a readable nuScenes submission JSON with a 'results' field ({exc})"
        ) from exc
    expected = set(_split_sample_tokens(nusc, eval_set))
    missing = sorted(expected - set(results))
    if missing:
        raise ValueError(
            f"submission {result_path}: {len(missing)} of the {len(expected)} samples of split {eval_set!r} are "
            f"missing, e.g. {missing[:3]}; give every sample an entry, an empty list where nothing was detected"
        )
    extra = sorted(set(results) - expected)
    if extra and is_predefined_split(eval_set):
        raise ValueError(
            f"submission {result_path}: {len(extra)} samples are not in split {eval_set!r}, e.g. {extra[:3]}"
        )

    if not any(results.values()):
        # The devkit cannot read a submission without a single box (it looks for one to learn the box
        # type). One box 100 km from every ego pose is dropped by its own range filter before
        # matching, so what it returns is its score of "nothing detected".
        content = json.loads(result_path.read_text(encoding="utf-8"))
        content["results"][next(iter(expected))] = [_out_of_range_box(next(iter(expected)))]
        result_path = Path(output_dir) / "submission_no_detections.json"
        atomic_write(result_path, lambda f: f.write(json.dumps(content).encode("utf-8")))

    quiet = contextlib.ExitStack()
    if not verbose:
        quiet.enter_context(contextlib.redirect_stdout(io.StringIO()))
        quiet.enter_context(contextlib.redirect_stderr(io.StringIO()))
    with quiet:
        evaluator = DetectionEval(
            nusc,
            config=config_factory(config_name),
            result_path=str(result_path),
            eval_set=eval_set,
            output_dir=str(output_dir),
            verbose=verbose,
        )
        summary = evaluator.main(plot_examples=0, render_curves=False)
    return _metrics_from_summary(summary)
