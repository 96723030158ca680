"""Predictions files: every frame's detections in one ``.pt`` file of plain tensors.

Layout (a dict, loadable with ``torch.load(..., weights_only=True)``):
    frame_ids:   list[str], F frames
    class_names: list[str]
    boxes:       (T, 7 or 9) float32, all frames' boxes concatenated
    scores:      (T,) float32
    labels:      (T,) int64
    frame_index: (T,) int64 row of ``frame_ids`` each box belongs to
    point_cloud_range: 6 floats, the range ground truth is cropped to when these are scored
    query_xy:    (T, 2) float32, optional: each box's query voxel (``Detections3D.query_xy``); written
                 when every frame has it, absent from older files
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from voxsparse.structures import Boxes3D, Detections3D
from voxsparse.utils.io import atomic_write, read_torch_file

_KEYS = ("frame_ids", "class_names", "boxes", "scores", "labels", "frame_index", "point_cloud_range")


@dataclass
class PredictionsFile:
    """The content of a predictions file, detections regrouped per frame (scores descending)."""

    frame_ids: list[str]
    detections: list[Detections3D]
    class_names: list[str]
    point_cloud_range: tuple[float, ...]


def save_predictions(path: str | os.PathLike, content: PredictionsFile) -> Path:
    """Write ``content`` atomically."""
    frame_ids, detections = content.frame_ids, content.detections
    if len(frame_ids) != len(detections):
        raise ValueError(f"{len(frame_ids)} frame ids but {len(detections)} detection sets")
    width = max((d.boxes.tensor.shape[1] for d in detections), default=7)
    boxes = [d.boxes.tensor.float().cpu() for d in detections]
    if any(b.shape[1] != width for b in boxes):
        raise ValueError("all frames' boxes must have the same number of columns")
    data = {
        "frame_ids": list(frame_ids),
        "class_names": list(content.class_names),
        "point_cloud_range": [float(v) for v in content.point_cloud_range],
        "boxes": torch.cat(boxes) if boxes else torch.zeros(0, width),
        "scores": torch.cat([d.scores.float().cpu() for d in detections]) if detections else torch.zeros(0),
        "labels": torch.cat([d.labels.long().cpu() for d in detections]) if detections else torch.zeros(0, dtype=torch.long),
        "frame_index": torch.cat([torch.full((len(d),), i, dtype=torch.int64) for i, d in enumerate(detections)])
        if detections
        else torch.zeros(0, dtype=torch.long),
    }
    if detections and all(d.query_xy is not None for d in detections):
        data["query_xy"] = torch.cat([d.query_xy.float().cpu() for d in detections])
    return atomic_write(path, lambda f: torch.save(data, f))


def load_predictions(path: str | os.PathLike) -> PredictionsFile:
    """Read a predictions file written by :func:`save_predictions`.

    Raises:
        ValueError: naming the file and field when the file is not a valid predictions file.
    """
    path = Path(path)
    data = read_torch_file(path, "predictions file")
    missing = [k for k in _KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"predictions file {path}: missing fields {missing}")
    n = len(data["frame_ids"])
    index = data["frame_index"]
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"predictions file {path}: frame_index outside [0, {n})")
    try:
        order = torch.argsort(index, stable=True)
        counts = torch.bincount(index, minlength=n).tolist()
        boxes, scores, labels = (data[k][order] for k in ("boxes", "scores", "labels"))
        query = data["query_xy"][order].split(counts) if "query_xy" in data else [None] * n
        detections = []
        for b, s, l, q in zip(boxes.split(counts), scores.split(counts), labels.split(counts), query):
            keep = torch.argsort(s, descending=True)
            detections.append(
                Detections3D(Boxes3D(b[keep]), s[keep], l[keep], query_xy=None if q is None else q[keep])
            )
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"predictions file {path}: {exc}") from exc
    return PredictionsFile(
        list(data["frame_ids"]), detections, list(data["class_names"]), tuple(data["point_cloud_range"])
    )
