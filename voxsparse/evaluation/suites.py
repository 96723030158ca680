"""Metric suites: what a dataset config names in ``evaluation`` to score its validation split.

A suite is a callable ``suite(predictions, dataset) -> SuiteResult``: ``predictions`` holds
``frame_ids``, ``detections`` (labels in the dataset's class order) and ``annotations``; ``dataset``
is the dataset config. A dataset config names it by its dotted path, e.g.
``evaluation: voxsparse.evaluation.suites.waymo``; a new metric is a new module of
``voxsparse.evaluation`` with such a function (``voxsparse.engine.evaluate.metric_suite`` resolves
names inside this package only).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from voxsparse.evaluation.detection import evaluate_detection_levels
from voxsparse.structures import Annotations3D, Detections3D


class SuiteResult(Protocol):
    """What a metric suite returns: a readable table and every number as JSON-ready values."""

    def table(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class SuiteInput(Protocol):
    """What a suite scores (``voxsparse.engine.inference.DatasetPredictions``)."""

    frame_ids: Sequence[str]
    detections: Sequence[Detections3D]
    annotations: Sequence[Annotations3D]


@dataclass
class GroupedResult:
    """Several results under names, one table after the other: Waymo's "LEVEL_1" / "LEVEL_2", or
    a keypoint model's "detection" / "keypoints"."""

    parts: dict[str, SuiteResult]

    def table(self) -> str:
        return "\n\n".join(part.table() for part in self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {name: part.to_dict() for name, part in self.parts.items()}


def score_predictions(
    predictions: SuiteInput, class_names: Sequence[str], iou_thresholds: Mapping[str, float]
) -> GroupedResult:
    """Waymo 3D AP / APH per class and range bin at LEVEL_1 and LEVEL_2.

    ``class_names`` names the labels of both the detections and the annotations.
    """
    levels = evaluate_detection_levels(
        predictions.detections, predictions.annotations, class_names, dict(iou_thresholds)
    )
    return GroupedResult({f"LEVEL_{level}": m for level, m in levels.items()})


def waymo(predictions: SuiteInput, dataset: Mapping) -> GroupedResult:
    """Waymo AP / APH (L1 / L2, range bins) with the config's ``class_names`` and ``iou_thresholds``."""
    return score_predictions(predictions, list(dataset["class_names"]), dataset["iou_thresholds"])


def nuscenes(predictions: SuiteInput, dataset: Mapping) -> SuiteResult:
    """The devkit's DetectionEval on the predictions, exported as a submission; frame ids are sample
    tokens, and the dataset config names the raw dataset (``raw_root``, ``version``, ``val_split``)."""
    from nuscenes import NuScenes

    from voxsparse.data.nuscenes import lidar_to_global_from_nusc
    from voxsparse.evaluation.nuscenes import evaluate_nuscenes, export_submission

    nusc = NuScenes(version=dataset["version"], dataroot=str(dataset["raw_root"]), verbose=False)
    tokens = list(predictions.frame_ids)
    with tempfile.TemporaryDirectory(prefix="voxsparse-nuscenes-") as work:
        path = Path(work) / "results_nusc.json"
        export_submission(
            predictions.detections, tokens, list(dataset["class_names"]), lidar_to_global_from_nusc(nusc, tokens), path
        )
        return evaluate_nuscenes(nusc, path, dataset["val_split"], work)
