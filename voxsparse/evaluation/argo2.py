"""The Argoverse 2 3D object detection metric, computed by the official ``av2`` package
(``av2.evaluation.detection.eval.evaluate``): AP averaged over the centre-distance thresholds
0.5, 1, 2 and 4 m (101 recall samples), the true-positive errors ATE, ASE and AOE at 2 m, and the
composite detection score CDS, per category and averaged over them.

This module only converts: detections (LiDAR = ego frame, labels indexing the dataset's class names)
become ``av2``'s detections table (:func:`detections_table`: cuboid centre, size, yaw quaternion,
score, log, timestamp, upper-case category); the ground truth is the raw ``annotations.feather`` of
each evaluated log (:func:`annotations_table`), restricted to the evaluated sweeps, so boxes the
prepared split dropped (no interior point, other categories) are scored as the official evaluation
scores them. ``av2`` itself then drops ground truth without interior points, both sides beyond
``max_range_m`` from the ego, and, with ``roi_only``, cuboids with no corner in the map's region of
interest (the drivable area dilated by 5 m, read from each log's ``map/`` folder).

The categories scored are the dataset's classes that occur in the ground truth (OpenPCDet's choice,
so the mean is not pulled down by absent classes); OpenPCDet's evaluation also uses
``max_range_m = 200`` (``av2``'s own default is 150 m). One difference: OpenPCDet keeps only the sweeps
with at least one detection, here every evaluated sweep's ground truth counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxsparse.data.argo2 import (
    ANNOTATION_COLUMNS,
    CUBOID_COLUMNS,
    INSTALL_HINT,
    category_to_name,
    name_to_category,
    parse_frame_id,
    read_feather,
)
from voxsparse.geometry import yaw_quaternion
from voxsparse.structures import Detections3D

__all__ = [
    "DETECTION_COLUMNS",
    "METRIC_NAMES",
    "Argo2Metrics",
    "annotations_table",
    "argo2",
    "detections_table",
    "evaluate_argo2",
]

#: Columns of the detections table ``av2`` evaluates.
DETECTION_COLUMNS: tuple[str, ...] = (*CUBOID_COLUMNS, "score", "log_id", "timestamp_ns", "category")
#: The columns of ``av2``'s summary table, in its order.
METRIC_NAMES: tuple[str, ...] = ("AP", "ATE", "ASE", "AOE", "CDS")
_AVERAGE = "AVERAGE_METRICS"


def _pandas() -> Any:
    try:
        import pandas
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return pandas


def detections_table(
    frame_ids: Sequence[str], detections: Sequence[Detections3D], class_names: Sequence[str]
) -> Any:
    """``av2``'s detections table (a pandas DataFrame, columns :data:`DETECTION_COLUMNS`).

    Args:
        frame_ids: per frame, ``<log_id>_<timestamp_ns>`` (:func:`voxsparse.data.argo2.frame_id`).
        detections: per frame, boxes (K, >=7) ``(x, y, z, dx, dy, dz, heading, ...)`` in the ego frame,
            scores (K,), labels (K,) indexing ``class_names``.
        class_names: class names (``Regular_vehicle``), written as ``av2`` categories (``REGULAR_VEHICLE``).

    Raises:
        ValueError: a frame id that is not an Argoverse 2 one, or frames and detections of different lengths.
    """
    pd = _pandas()
    if len(frame_ids) != len(detections):
        raise ValueError(f"{len(frame_ids)} frame ids but {len(detections)} detection sets")
    categories = np.asarray([name_to_category(n) for n in class_names], dtype=object)
    parts = []
    for frame, det in zip(frame_ids, detections):
        log_id, stamp = parse_frame_id(frame)
        boxes = det.boxes.tensor.detach().cpu().double().numpy()
        q = yaw_quaternion(boxes[:, 6])
        k = len(boxes)
        part = {name: boxes[:, i] for i, name in enumerate(CUBOID_COLUMNS[:6])}
        part.update({name: q[:, i] for i, name in enumerate(CUBOID_COLUMNS[6:])})
        part["score"] = det.scores.detach().cpu().double().numpy()
        part["log_id"] = np.full(k, log_id, dtype=object)
        part["timestamp_ns"] = np.full(k, stamp, dtype=np.int64)
        part["category"] = categories[det.labels.cpu().numpy()]
        parts.append(part)
    columns = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0) for c in DETECTION_COLUMNS}
    columns["timestamp_ns"] = columns["timestamp_ns"].astype(np.int64)
    return pd.DataFrame(columns)


def annotations_table(split_dir: str | Path, log_ids: Sequence[str]) -> Any:
    """The ``annotations.feather`` of each log under ``split_dir`` with a ``log_id`` column (the ground
    truth ``av2`` evaluates, as ``av2.utils.io.read_all_annotations`` builds it for a whole split)."""
    pd = _pandas()
    tables = []
    for log_id in log_ids:
        table = read_feather(Path(split_dir) / log_id / "annotations.feather", tuple(ANNOTATION_COLUMNS))
        tables.append(table.assign(log_id=log_id))
    if not tables:
        return pd.DataFrame({c: [] for c in (*ANNOTATION_COLUMNS, "log_id")})
    return pd.concat(tables, ignore_index=True)


@dataclass
class Argo2Metrics:
    """``av2``'s summary: per category and averaged (``AVERAGE_METRICS``), AP, ATE, ASE, AOE and CDS.

    Attributes:
        metrics: the (C + 1, 5) pandas DataFrame ``evaluate`` returns (rounded by ``av2`` to 3 decimals).
        max_range_m: the evaluated range; roi_only: whether cuboids outside the map's ROI were dropped.
    """

    metrics: Any
    max_range_m: float
    roi_only: bool

    def table(self) -> str:
        scope = f"within {self.max_range_m:g} m" + (
            ", in the map's region of interest" if self.roi_only else ""
        )
        shown = self.metrics.copy()
        shown.index = [category_to_name(c) if c != _AVERAGE else "mean" for c in shown.index]
        return f"Argoverse 2 detection (av2), {scope}\n{shown.to_string()}"

    def to_dict(self) -> dict[str, Any]:
        def value(v: float) -> float | None:
            return None if math.isnan(float(v)) else float(v)

        out: dict[str, Any] = {}
        for category, row in self.metrics.iterrows():
            if category == _AVERAGE:
                out.update({("CDS" if m == "CDS" else f"m{m}"): value(row[m]) for m in METRIC_NAMES})
            else:
                out.update({f"{m}/{category_to_name(category)}": value(row[m]) for m in METRIC_NAMES})
        out["max_range_m"] = self.max_range_m
        out["roi_only"] = self.roi_only
        return out


def evaluate_argo2(
    dts: Any,
    gts: Any,
    categories: Sequence[str],
    *,
    dataset_dir: str | Path | None = None,
    max_range_m: float = 200.0,
    roi_only: bool = True,
    workers: int = 1,
) -> Argo2Metrics:
    """``av2.evaluation.detection.eval.evaluate`` on the tables.

    Args:
        dts: :func:`detections_table`; gts: :func:`annotations_table`.
        categories: the ``av2`` categories scored (upper case).
        dataset_dir: the split folder whose ``<log_id>/map`` and poses give the region of interest
            (needed with ``roi_only``).
        workers: ``av2``'s processes (it always starts a pool; 1 is one extra process).
    """
    try:
        from av2.evaluation.detection.eval import evaluate
        from av2.evaluation.detection.utils import DetectionCfg
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    if roi_only and dataset_dir is None:
        raise ValueError(
            "roi_only: the region of interest needs dataset_dir (the split folder with each log's map/)"
        )
    cfg = DetectionCfg(
        categories=tuple(sorted(categories)),
        dataset_dir=None if dataset_dir is None else Path(dataset_dir),
        eval_only_roi_instances=roi_only,
        max_range_m=float(max_range_m),
    )
    _, _, metrics = evaluate(dts, gts, cfg, n_jobs=workers)
    return Argo2Metrics(metrics, float(max_range_m), bool(roi_only))


def argo2(predictions: Any, dataset: Mapping) -> Argo2Metrics:
    """The metric suite of ``configs/dataset/argo2.yaml``: frame ids name sweeps of the logs in
    ``<raw_root>/<val_split>``; the config's ``class_names``, ``max_range_m``, ``roi_only`` and
    ``eval_workers``."""
    split_dir = Path(dataset["raw_root"]) / dataset["val_split"]
    names = list(dataset["class_names"])
    frames = [parse_frame_id(f) for f in predictions.frame_ids]
    dts = detections_table(predictions.frame_ids, predictions.detections, names)
    gts = annotations_table(split_dir, sorted({log_id for log_id, _ in frames}))
    evaluated = set(frames)
    keep = [(log_id, int(t)) in evaluated for log_id, t in zip(gts["log_id"], gts["timestamp_ns"])]
    gts = gts[np.asarray(keep, dtype=bool)].reset_index(drop=True)
    present = set(gts["category"])
    categories = [name_to_category(n) for n in names if name_to_category(n) in present]
    return evaluate_argo2(
        dts,
        gts,
        categories,
        dataset_dir=split_dir,
        max_range_m=dataset.get("max_range_m", 200.0),
        roi_only=dataset.get("roi_only", True),
        workers=dataset.get("eval_workers", 1),
    )
