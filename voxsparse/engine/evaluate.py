"""Score predictions with the dataset's metric suite and report the numbers (table, ``metrics.json``).

A dataset config names its suite in ``evaluation`` (``configs/dataset/*.yaml``): the dotted name of a
function of ``voxsparse.evaluation`` (:func:`metric_suite`; the suites are in
``voxsparse.evaluation.suites``). Predictions reach a suite with labels in the dataset's
class order: :func:`relabel` maps a model's or a file's class names onto it.

Rules for predictions files (``tools/eval.py predictions=PATH``), matched to the evaluated split by
frame id:

- class names the dataset does not have: ``ValueError`` listing them (no prediction is dropped
  silently); known names are mapped to the dataset's label order by name;
- a frame of the split missing from the file: ``ValueError`` by default (``missing_frames="error"``);
  with ``missing_frames="miss"`` the frame counts as having no detections, so its GT boxes are
  false negatives;
- a frame id listed twice: ``ValueError``;
- frames in the file but not in the split are ignored, so a subset of frames can be scored.

Waymo ``Objects`` files (``tools/eval.py gt=<.bin> predictions=<.bin>``): :func:`score_waymo_files`
scores them as they are, frames matched by (context name, timestamp) (the rules are in
``voxsparse.evaluation.waymo_submission``).

Box width, NaN/inf and out-of-range values are checked when the file is read
(``voxsparse.evaluation.predictions_io``) and when scored (``voxsparse.evaluation.detection``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from voxsparse.engine.inference import DatasetPredictions
from voxsparse.evaluation.predictions_io import PredictionsFile
from voxsparse.evaluation.suites import GroupedResult, SuiteResult
from voxsparse.structures import Boxes3D, Detections3D
from voxsparse.utils.io import atomic_write

log = logging.getLogger(__name__)

MISSING_FRAME_RULES = ("error", "miss")


#: The package a suite named in ``dataset.evaluation`` must live in (nothing else is imported).
SUITE_PACKAGE = "voxsparse.evaluation"


def metric_suite(dataset: Mapping) -> Callable[[DatasetPredictions, Mapping], SuiteResult]:
    """The suite the dataset config names in ``evaluation``: the dotted name of a function of
    :data:`SUITE_PACKAGE` (e.g. ``voxsparse.evaluation.suites.waymo``).

    Raises:
        ValueError: the config has no ``evaluation`` key, or it names nothing callable inside
            :data:`SUITE_PACKAGE`.
    """
    name = dataset.get("evaluation")
    example = "voxsparse.evaluation.suites.waymo"
    if name is None:
        raise ValueError(
            f"dataset config: no 'evaluation' key naming its metric suite (a function of {SUITE_PACKAGE}, "
            f"e.g. {example})"
        )
    where = f"dataset.evaluation={name!r}"
    if not isinstance(name, str) or not name.startswith(SUITE_PACKAGE + ".") or name.count(".") < 3:
        raise ValueError(
            f"{where}: a metric suite is named by the dotted path of a function in a module of "
            f"{SUITE_PACKAGE} (e.g. {example})"
        )
    module_name, _, attribute = name.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"{where}: no metric suite module {module_name} ({exc})") from exc
    suite = getattr(module, attribute, None)
    if not callable(suite) or isinstance(suite, type):
        raise ValueError(f"{where}: {module_name} has no metric suite function {attribute!r}")
    return suite


def relabel(
    detections: Sequence[Detections3D], from_names: Sequence[str], to_names: Sequence[str], source: str
) -> list[Detections3D]:
    """Map labels indexing ``from_names`` to the same names in ``to_names``.

    Raises:
        ValueError: naming ``source`` and listing the names of ``from_names`` absent from ``to_names``.
    """
    unknown = [n for n in from_names if n not in to_names]
    if unknown:
        raise ValueError(
            f"{source}: unknown class names {unknown}; the evaluated dataset has {list(to_names)}"
        )
    if list(from_names) == list(to_names):
        return list(detections)
    mapping = torch.tensor([list(to_names).index(n) for n in from_names], dtype=torch.int64)
    return [dataclasses.replace(d, labels=mapping.to(d.labels.device)[d.labels]) for d in detections]


def score_model_predictions(
    predictions: DatasetPredictions,
    class_names: Sequence[str],
    dataset: Mapping,
    source: str,
    keypoint_labels: Sequence[int] | None = None,
) -> SuiteResult:
    """Score a model's predictions (labels index ``class_names``) with the dataset's suite, and, for a
    keypoint model (``keypoint_labels``: its human classes), with the keypoint metrics too."""
    result = metric_suite(dataset)(in_dataset_order(predictions, class_names, dataset["class_names"], source), dataset)
    if keypoint_labels is None:
        return result
    from voxsparse.evaluation.keypoints import (
        evaluate_keypoints,
        keypoint_ground_truth_for_eval,
        keypoint_predictions_for_eval,
    )

    keypoints = evaluate_keypoints(
        keypoint_predictions_for_eval(predictions.detections, keypoint_labels),
        keypoint_ground_truth_for_eval(predictions.annotations, keypoint_labels),
    )
    return GroupedResult({"detection": result, "keypoints": keypoints})


def in_dataset_order(
    predictions: DatasetPredictions, from_names: Sequence[str], to_names: Sequence[str], source: str
) -> DatasetPredictions:
    """``predictions`` with labels mapped from a model's class names to the dataset's (:func:`relabel`)."""
    detections = relabel(predictions.detections, from_names, to_names, source)
    return DatasetPredictions(predictions.frame_ids, detections, predictions.annotations)


def check_frames(
    content: PredictionsFile, frame_ids: Sequence[str], missing_frames: str = "error", source: str = "predictions file"
) -> None:
    """Check that a predictions file lists each frame of ``frame_ids`` once (rules in the module docstring).

    Raises:
        ValueError: naming ``source`` and what the file holds, for repeated frame ids, or for missing
            frames when ``missing_frames="error"``.
    """
    listed = set(content.frame_ids)
    if len(listed) != len(content.frame_ids):
        repeated = sorted({f for f in content.frame_ids if content.frame_ids.count(f) > 1})
        raise ValueError(f"{source}: frame ids listed more than once: {repeated[:5]}")
    extra = len(listed - set(frame_ids))
    if extra:
        log.info("%s: %d frames are not in the evaluated split and are ignored", source, extra)
    missing = [f for f in frame_ids if f not in listed]
    if not missing:
        return
    shared = len(listed) - extra
    holds = (
        f"the file holds {len(content.frame_ids)} frames ({shared} of them in this split; first: "
        f"{content.frame_ids[:2]})"
    )
    if missing_frames == "error":
        raise ValueError(
            f"{source}: {len(missing)} of {len(frame_ids)} frames of the evaluated split have no entry "
            f"(first: {missing[:3]}); {holds}. Evaluate the split the predictions were made on (same "
            f"frames and frame count); a frame with no detections must still be listed; or pass "
            f"missing_frames=miss to count the ground truth of unlisted frames as missed"
        )
    log.warning("%s: %d of %d frames have no entry; %s; their ground truth counts as missed", source,
                len(missing), len(frame_ids), holds)


def frames_from_file(
    content: PredictionsFile,
    frame_ids: Sequence[str],
    class_names: Sequence[str],
    missing_frames: str = "error",
    source: str = "predictions file",
) -> list[Detections3D]:
    """Detections of each frame of ``frame_ids`` from a predictions file, labels in ``class_names``
    order (rules in the module docstring).

    Raises:
        ValueError: naming ``source``, for unknown class names, repeated frame ids, or missing
            frames when ``missing_frames="error"``; or for a ``missing_frames`` not in
            :data:`MISSING_FRAME_RULES`.
    """
    if missing_frames not in MISSING_FRAME_RULES:
        raise ValueError(f"missing_frames must be one of {MISSING_FRAME_RULES}, got {missing_frames!r}")
    detections = relabel(content.detections, content.class_names, class_names, source)
    check_frames(content, frame_ids, missing_frames, source)
    by_id = dict(zip(content.frame_ids, detections))
    width = max((d.boxes.tensor.shape[1] for d in detections), default=7)
    nothing = Detections3D(
        Boxes3D.empty(with_velocity=width == 9), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    )
    return [by_id.get(f, nothing) for f in frame_ids]


def _json_value(value: Any) -> Any:
    """nan (a metric with nothing to measure) becomes null: JSON has no nan."""
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def report(result: SuiteResult, output_dir: str | Path) -> dict[str, Any]:
    """Log the suite's table and write ``metrics.json`` atomically (nan as null); returns its content."""
    log.info("Evaluation:\n%s", result.table())
    content = _json_value(result.to_dict())
    text = json.dumps(content, indent=2, allow_nan=False).encode()
    atomic_write(Path(output_dir) / "metrics.json", lambda f: f.write(text))
    return content


def score_waymo_files(gt: str | Path, predictions: str | Path | None) -> SuiteResult:
    """Waymo AP / APH of a predictions ``Objects`` ``.bin`` against a ground-truth ``.bin``.

    Raises:
        ValueError: no predictions file, or a file that is not a serialized ``Objects``.
    """
    from voxsparse.evaluation.waymo_submission import read_objects, score_objects

    if predictions is None or Path(predictions).suffix != ".bin":
        raise ValueError(f"gt={gt}: give predictions=PATH, a Waymo Objects .bin file (got {predictions})")
    return score_objects(read_objects(gt), read_objects(predictions), f"predictions file {predictions}")
