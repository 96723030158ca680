"""A trained model run on raw scans: point files found, read, converted to the model's point
convention, detected, and written as JSON lines and a predictions file.

Used by ``tools/predict.py`` and ``tools/visualize.py`` (a checkpoint on a point file).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxsparse.data.pointfile import (
    POINT_FILE_SUFFIXES,
    PointCloud,
    PointFileError,
    conform,
    feature_mismatch,
)
from voxsparse.structures import Detections3D, PointBatch
from voxsparse.utils.io import atomic_write

log = logging.getLogger(__name__)


def find_scans(inputs: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """The point files named by ``inputs``: files, folders (their point files, not recursive) and glob
    patterns, in the order given, each folder's and pattern's files sorted by name, no file twice.

    Raises:
        PointFileError: for an input that names nothing (the first such input), or no point file at all.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    found: dict[Path, None] = {}
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in POINT_FILE_SUFFIXES)
            if not matches:
                raise PointFileError(path, f"folder holds no point file ({', '.join(POINT_FILE_SUFFIXES)})")
        elif glob.has_magic(str(item)):
            matches = sorted(Path(p) for p in glob.glob(str(item)) if Path(p).is_file())
            if not matches:
                raise PointFileError(str(item), "the pattern matches no file")
        else:
            matches = [path]  # read_points names a missing or wrong file
        found.update(dict.fromkeys(matches))
    return list(found)


def frame_id_of(path: Path) -> str:
    """A scan's frame id: its file name without the point-file suffix (``.pcd.bin`` as one)."""
    name = path.name
    for suffix in (".pcd.bin", *POINT_FILE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class ScanPredictor:
    """Detections of a model on raw point clouds.

    Each cloud is converted to ``model.point_convention`` (:func:`~voxsparse.data.pointfile.conform`);
    a cloud whose intensity does not look like the model's scale is detected all the same, with one
    warning (the first such file's numbers) rather than one per file.

    Args:
        model: a detector in eval mode (``voxsparse.load_model``), with ``point_convention``.
        device: where the model is.
    """

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu") -> None:
        self.model = model
        self.device = torch.device(device)
        self._warned = False

    @torch.no_grad()
    def __call__(self, cloud: PointCloud) -> Detections3D:
        """The detections of one cloud, on the CPU, scores descending."""
        convention = self.model.point_convention
        points = conform(cloud, convention)
        if not self._warned:
            mismatch = feature_mismatch(points, convention)
            if mismatch is not None:
                self._warned = True
                log.warning("%s: %s (warned once; later files are not checked)", cloud.path, mismatch)
        return self.predict_points(points)

    @torch.no_grad()
    def predict_points(self, points: np.ndarray | torch.Tensor) -> Detections3D:
        """The detections of (N, len(point_convention.features)) points already in the model's convention."""
        tensor = torch.as_tensor(np.asarray(points, dtype=np.float32)).to(self.device)
        return self.model.predict(PointBatch.from_frames([tensor]))[0].to("cpu")


@dataclass
class ScanOptions:
    """``tools/predict.py``'s options for point files (``configs/predict.yaml``; a drive's:
    :class:`voxsparse.stream.DriveOptions`)."""

    checkpoint: str | None = None
    input: str | None = None
    format: str | None = None
    columns: int | None = None
    nonfinite: str = "error"
    min_score: float = 0.0
    render: bool = False
    render_score: float = 0.3
    backend: str = "auto"
    device: str = "cpu"


@dataclass
class ScanResult:
    """One scan's detections.

    Attributes:
        frame_id: the file name without its point-file suffix.
        path: the scan.
        num_points: points read from it.
        detections: boxes (K, 7 | 9) in the scan's frame (metres, radians), scores, labels.
    """

    frame_id: str
    path: Path
    num_points: int
    detections: Detections3D


def detection_records(result: ScanResult, class_names: Sequence[str]) -> dict:
    """One JSON-lines record: the frame and each detection with its class name, score and box
    (``x, y, z`` centre, ``dx, dy, dz`` size in metres, ``heading`` in radians, ``vx, vy`` in m/s
    when predicted), and its ``track_id`` when the detections carry track ids (-1: not tracked)."""
    keys = ("x", "y", "z", "dx", "dy", "dz", "heading", "vx", "vy")
    det = result.detections
    boxes = det.boxes.tensor.tolist()
    tracks = [{}] * len(det) if det.track_ids is None else [{"track_id": t} for t in det.track_ids.tolist()]
    return {
        "frame_id": result.frame_id,
        "file": str(result.path),
        "num_points": result.num_points,
        "detections": [
            {"class": class_names[label], "score": round(score, 6), **{k: round(v, 6) for k, v in zip(keys, box)}, **track}
            for box, score, label, track in zip(boxes, det.scores.tolist(), det.labels.tolist(), tracks)
        ],
    }


def write_jsonl(path: str | os.PathLike, results: Sequence[ScanResult], class_names: Sequence[str]) -> Path:
    """Write one JSON object per scan (:func:`detection_records`) atomically."""
    lines = "".join(json.dumps(detection_records(r, class_names)) + "\n" for r in results)
    return atomic_write(path, lambda f: f.write(lines.encode()))
