"""Waymo's submission format: ``Objects`` ``.bin`` files of predictions, and ground-truth ``.bin`` files,
through the official protos (``metrics_pb2``, ``label_pb2``) and no TensorFlow.

A ``.bin`` file is one serialized ``waymo.open_dataset.Objects`` message (``metrics.proto``): a list of
``Object`` entries, each a ``Label`` (``object``: box, type, id, ...) with the fields that place it,
which the submission server (and the official ``create_submission`` / ``compute_detection_metrics_main``
tools) read:

* ``context_name``: the segment (``Frame.context.name``), ``frame_timestamp_micros``: the frame;
* ``score`` in [0, 1] (predictions);
* ``object.box`` (center_x, center_y, center_z, length, width, height, heading) in the frame's vehicle
  frame, ``object.type`` (``TYPE_VEHICLE`` = 1, ``TYPE_PEDESTRIAN`` = 2, ``TYPE_CYCLIST`` = 4),
  ``object.id`` (tracking only), ``object.metadata.speed_x/y`` (when boxes carry velocities).

Ground-truth files (Waymo's ``gt.bin`` of a split) hold the ``laser_labels`` of each frame the same
way, with ``num_lidar_points_in_box`` and ``detection_difficulty_level``: they are read with the
rules of the v1 reader (:func:`voxsparse.data.waymo.frame.label_fields`: signs and unknowns dropped,
boxes without points dropped, LEVEL_2 when unlabelled and at most 5 points).

Frame ids are voxsparse's Waymo frame ids, ``"<context_name>_<timestamp_micros>"``.

For the submission server the ``Objects`` go into a ``Submission`` message (``submission.proto``)
with the method's metadata (:class:`SubmissionInfo`, :func:`submission_from_objects`), the message
the official ``create_submission`` tool writes; the server takes a ``.tar.gz`` of such files.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf.message import DecodeError

from voxsparse.data.waymo.classes import CLASS_NAMES
from voxsparse.data.waymo.frame import INSTALL_HINT, label_fields, stored_labels
from voxsparse.evaluation.detection import WAYMO_IOU_THRESHOLDS, FrameGroundTruth, FramePredictions
from voxsparse.evaluation.suites import GroupedResult, score_predictions
from voxsparse.structures import Detections3D
from voxsparse.utils.io import atomic_write

__all__ = [
    "TYPE_OF_CLASS",
    "SubmissionFrames",
    "SubmissionInfo",
    "frame_key",
    "ground_truth_from_objects",
    "objects_from_detections",
    "predictions_from_objects",
    "read_objects",
    "score_objects",
    "submission_from_objects",
    "write_objects",
]

log = logging.getLogger(__name__)

#: voxsparse Waymo class name -> ``label_pb2.Label.Type`` value.
TYPE_OF_CLASS: dict[str, int] = {"Vehicle": 1, "Pedestrian": 2, "Sign": 3, "Cyclist": 4}


@functools.lru_cache(maxsize=1)
def _metrics_pb2() -> Any:
    try:
        from waymo_open_dataset.protos import metrics_pb2
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return metrics_pb2


def frame_key(frame_id: str) -> tuple[str, int]:
    """``(context_name, timestamp_micros)`` of a Waymo frame id ``"<context_name>_<timestamp_micros>"``."""
    context, _, stamp = frame_id.rpartition("_")
    if not context or not stamp.isdigit():
        raise ValueError(f"frame id {frame_id!r}: expected '<context_name>_<timestamp_micros>'")
    return context, int(stamp)


def objects_from_detections(
    frame_ids: Sequence[str], detections: Sequence[Detections3D], class_names: Sequence[str]
) -> Any:
    """A ``metrics_pb2.Objects`` of the detections of each frame (labels index ``class_names``, Waymo names).

    Boxes are written with float64 fields from the detections' values; velocities (boxes of 9 columns)
    go to ``metadata.speed_x/y``, track ids (when set) to ``object.id``.

    Raises:
        ValueError: a class name Waymo does not have, a malformed frame id, mismatched lengths.
    """
    if len(frame_ids) != len(detections):
        raise ValueError(f"{len(frame_ids)} frame ids but {len(detections)} detection sets")
    unknown = [n for n in class_names if n not in TYPE_OF_CLASS]
    if unknown:
        raise ValueError(f"class names {unknown} have no Waymo object type (known: {list(TYPE_OF_CLASS)})")
    types = [TYPE_OF_CLASS[n] for n in class_names]
    objects = _metrics_pb2().Objects()
    for frame_id, found in zip(frame_ids, detections):
        context, stamp = frame_key(frame_id)
        boxes = found.boxes.tensor.detach().cpu().double().numpy()
        scores = found.scores.detach().cpu().float().numpy()
        labels = found.labels.detach().cpu().numpy()
        ids = None if found.track_ids is None else found.track_ids.detach().cpu().numpy()
        for i in range(len(boxes)):
            entry = objects.objects.add(
                context_name=context, frame_timestamp_micros=stamp, score=float(scores[i])
            )
            label = entry.object
            box = label.box
            box.center_x, box.center_y, box.center_z, box.length, box.width, box.height, box.heading = (
                float(v) for v in boxes[i, :7]
            )
            label.type = types[int(labels[i])]
            if boxes.shape[1] >= 9:
                label.metadata.speed_x, label.metadata.speed_y = float(boxes[i, 7]), float(boxes[i, 8])
            if ids is not None:
                label.id = str(int(ids[i]))
    return objects


@dataclass
class SubmissionInfo:
    """What a ``Submission`` says of the method besides its results (``submission.proto``'s fields).

    ``task``: a ``Submission.Task`` name (DETECTION_3D, TRACKING_3D, ...); ``sensor_type``: a
    ``Submission.SensorType`` name (LIDAR_ALL: all five LiDARs); the frame counts: past / future frames
    the method used besides the current one; ``latency_second``: the measured latency, if any.
    """

    account_name: str
    unique_method_name: str
    authors: Sequence[str] = ()
    affiliation: str = ""
    description: str = ""
    method_link: str = ""
    task: str = "DETECTION_3D"
    sensor_type: str = "LIDAR_ALL"
    number_past_frames_exclude_current: int = 0
    number_future_frames_exclude_current: int = 0
    object_types: Sequence[str] = ("Vehicle", "Pedestrian", "Cyclist")
    latency_second: float | None = None


def submission_from_objects(objects: Any, info: SubmissionInfo) -> Any:
    """A ``submission_pb2.Submission`` holding ``objects`` (``inference_results``) and ``info``."""
    try:
        from waymo_open_dataset.protos import submission_pb2
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    kind = submission_pb2.Submission
    submission = kind(
        task=kind.Task.Value(info.task),
        account_name=info.account_name,
        unique_method_name=info.unique_method_name,
        authors=list(info.authors),
        affiliation=info.affiliation,
        description=info.description,
        method_link=info.method_link,
        sensor_type=kind.SensorType.Value(info.sensor_type),
        number_past_frames_exclude_current=info.number_past_frames_exclude_current,
        number_future_frames_exclude_current=info.number_future_frames_exclude_current,
        object_types=[TYPE_OF_CLASS[name] for name in info.object_types],
    )
    if info.latency_second is not None:
        submission.latency_second = info.latency_second
    submission.inference_results.CopyFrom(objects)
    return submission


def write_objects(path: str | os.PathLike, objects: Any) -> Path:
    """Write a ``metrics_pb2.Objects`` (or any message, e.g. a ``Submission``) as a ``.bin`` file (atomically)."""
    data = objects.SerializeToString()
    return atomic_write(path, lambda f: f.write(data))


def read_objects(path: str | os.PathLike) -> Any:
    """The ``metrics_pb2.Objects`` of a ``.bin`` file (predictions or ground truth).

    Raises:
        ValueError: the file is not a serialized ``Objects`` (message: the file).
    """
    path = Path(path)
    try:
        return _metrics_pb2().Objects.FromString(path.read_bytes())
    except DecodeError as error:
        raise ValueError(f"{path}: not a waymo.open_dataset.Objects file ({error})") from None


def _by_frame(objects: Any) -> dict[str, list[Any]]:
    """Frame id -> its ``Object`` entries, in file order."""
    frames: dict[str, list[Any]] = {}
    for entry in objects.objects:
        frames.setdefault(f"{entry.context_name}_{entry.frame_timestamp_micros}", []).append(entry)
    return frames


def ground_truth_from_objects(objects: Any, keep_empty_boxes: bool = False) -> dict[str, FrameGroundTruth]:
    """Frame id -> ground truth (boxes (G, 9) float32, labels in ``CLASS_NAMES`` order, difficulty) of a
    ground-truth ``Objects``, by the v1 reader's label rules (module docstring)."""
    out = {}
    for frame_id, entries in _by_frame(objects).items():
        fields = label_fields(stored_labels([e.object for e in entries]), frame_id, keep_empty_boxes)
        out[frame_id] = FrameGroundTruth(
            torch.from_numpy(fields["boxes"]),
            torch.from_numpy(fields["labels"]),
            torch.from_numpy(fields["difficulty"]),
        )
    return out


def predictions_from_objects(objects: Any, source: str = "predictions") -> dict[str, FramePredictions]:
    """Frame id -> predictions (boxes (K, 7) float32, scores float32, labels in ``CLASS_NAMES`` order) of a
    predictions ``Objects``. Objects of other types (signs, unknown) are left out, and counted in the log."""
    class_of_type = {TYPE_OF_CLASS[name]: i for i, name in enumerate(CLASS_NAMES)}
    out, other = {}, 0
    for frame_id, entries in _by_frame(objects).items():
        kept = [e for e in entries if e.object.type in class_of_type]
        other += len(entries) - len(kept)
        boxes = np.array(
            [
                (b.center_x, b.center_y, b.center_z, b.length, b.width, b.height, b.heading)
                for b in (e.object.box for e in kept)
            ],
            dtype=np.float32,
        ).reshape(-1, 7)
        out[frame_id] = FramePredictions(
            torch.from_numpy(boxes),
            torch.tensor([e.score for e in kept], dtype=torch.float32),
            torch.tensor([class_of_type[e.object.type] for e in kept], dtype=torch.int64),
        )
    if other:
        log.info("%s: %d objects not of the types %s are not scored", source, other, list(CLASS_NAMES))
    return out


@dataclass
class SubmissionFrames:
    """Frames scored together (a ``voxsparse.evaluation.suites.SuiteInput``)."""

    frame_ids: list[str]
    detections: list[FramePredictions]
    annotations: list[FrameGroundTruth]


def score_objects(ground_truth: Any, predictions: Any, source: str = "predictions") -> GroupedResult:
    """Waymo AP / APH (LEVEL_1, LEVEL_2, range bins) of a predictions ``Objects`` against a ground-truth
    ``Objects`` with voxsparse's metric (``voxsparse.evaluation.detection``), Vehicle / Pedestrian /
    Cyclist at IoU 0.7 / 0.5 / 0.5.

    Frames are those of either file: a frame without ground-truth objects makes its predictions false
    positives; a frame without predictions makes its objects misses.
    """
    truth, found = ground_truth_from_objects(ground_truth), predictions_from_objects(predictions, source)
    frame_ids = sorted(set(truth) | set(found))
    empty_truth = FrameGroundTruth(
        torch.zeros(0, 9), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    )
    nothing = FramePredictions(torch.zeros(0, 7), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    frames = SubmissionFrames(
        frame_ids, [found.get(f, nothing) for f in frame_ids], [truth.get(f, empty_truth) for f in frame_ids]
    )
    return score_predictions(frames, CLASS_NAMES, WAYMO_IOU_THRESHOLDS)
