"""Per-frame ground truth and predictions."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from voxsparse.structures._validation import check_tensor
from voxsparse.structures.boxes import Boxes3D


def _move(obj, device):
    """Return a copy of dataclass ``obj`` with every tensor / Boxes3D field moved to ``device``."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, (torch.Tensor, Boxes3D)):
            changes[f.name] = value.to(device)
    return replace(obj, **changes)


@dataclass
class Annotations3D:
    """Ground truth of one frame (K objects).

    Attributes:
        boxes: K boxes, usually with velocity.
        labels: (K,) int64 class indices into the dataset's class names.
        num_points: (K,) int64 LiDAR points inside each box.
        difficulty: (K,) int64, 1 = LEVEL_1, 2 = LEVEL_2 (Waymo definition).
        track_ids: (K,) int64 object ids, stable over a sequence.
        keypoints: (K, 14, 3) float keypoints in metres (Waymo order), zeros where absent.
        keypoint_visibility: (K, 14) bool.
    """

    boxes: Boxes3D
    labels: torch.Tensor
    num_points: torch.Tensor
    difficulty: torch.Tensor
    track_ids: torch.Tensor
    keypoints: torch.Tensor | None = None
    keypoint_visibility: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = len(self.boxes)
        for name in ("labels", "num_points", "difficulty", "track_ids"):
            check_tensor(f"Annotations3D.{name}", getattr(self, name), ndim=1, floating=False, length=k)
        if self.keypoints is not None:
            check_tensor("Annotations3D.keypoints", self.keypoints, ndim=3, last_dim=3, floating=True, length=k)

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: torch.device | str) -> Annotations3D:
        return _move(self, device)


@dataclass
class Detections3D:
    """Predictions of one frame (K detections), sorted by decreasing score.

    Attributes:
        boxes: K boxes (with velocity when the head predicts it).
        scores: (K,) float confidence in [0, 1].
        labels: (K,) int64 class indices.
        track_ids: (K,) int64 set by a tracker, else None.
        query_xy: (K, 2) float, metres, LiDAR frame: the centre of the BEV cell (VoxelNeXt's query
            voxel) that predicted each box; None where unknown (ground truth, older files).
    """

    boxes: Boxes3D
    scores: torch.Tensor
    labels: torch.Tensor
    track_ids: torch.Tensor | None = None
    query_xy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = len(self.boxes)
        check_tensor("Detections3D.scores", self.scores, ndim=1, floating=True, length=k, finite=True)
        check_tensor("Detections3D.labels", self.labels, ndim=1, floating=False, length=k)
        if self.track_ids is not None:
            check_tensor("Detections3D.track_ids", self.track_ids, ndim=1, floating=False, length=k)
        if self.query_xy is not None:
            check_tensor(
                "Detections3D.query_xy", self.query_xy, ndim=2, last_dim=2, floating=True, length=k, finite=True
            )

    def __len__(self) -> int:
        return len(self.boxes)

    def to(self, device: torch.device | str) -> Detections3D:
        return _move(self, device)

    def __getitem__(self, index: torch.Tensor | slice) -> Detections3D:
        """The detections at ``index`` (a (K,) bool mask, int64 indices or a slice), every per-detection
        field (subclasses' too) indexed alike."""
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, Boxes3D)):
                changes[f.name] = value[index]
        return replace(self, **changes)
