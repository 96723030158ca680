"""Batched point clouds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from voxsparse.structures._validation import check_tensor, checking_values

#: Intensity scales a point column can carry: ``unit`` reflectance in [0, 1] (KITTI, the synthetic
#: world), ``uint8`` values in [0, 255] (nuScenes, Velodyne drivers), ``waymo`` the Waymo Open
#: Dataset's raw return intensity (>= 0, unbounded; OpenPCDet feeds its tanh).
INTENSITY_SCALES: tuple[str, ...] = ("unit", "uint8", "waymo")


@dataclass(frozen=True)
class PointConvention:
    """What a model expects in each point column; recorded in its config so raw files can be
    converted to it.

    Attributes:
        features: column names, ``x, y, z`` (metres, LiDAR frame) first, e.g. ``("x", "y", "z",
            "intensity")`` or ``(..., "intensity", "time_lag")`` (seconds before the keyframe).
        intensity: the scale of the ``intensity`` column, one of :data:`INTENSITY_SCALES`.
    """

    features: tuple[str, ...] = ("x", "y", "z", "intensity")
    intensity: str = "unit"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))
        if self.features[:3] != ("x", "y", "z"):
            raise ValueError(f"PointConvention.features: must start with x, y, z, got {list(self.features)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"PointConvention.features: repeated names in {list(self.features)}")
        if self.intensity not in INTENSITY_SCALES:
            raise ValueError(f"PointConvention.intensity: expected one of {INTENSITY_SCALES}, got {self.intensity!r}")


@dataclass
class PointBatch:
    """The points of ``batch_size`` frames, concatenated.

    Attributes:
        points: (N, 3 + C) float: x, y, z in metres (LiDAR frame) then C features (e.g. intensity);
            float32 for the models (float64 for numerical checks of float64 modules).
        batch_index: (N,) int64, the frame each point belongs to, in [0, batch_size).
        batch_size: number of frames (a frame may have no points).
    """

    points: torch.Tensor
    batch_index: torch.Tensor
    batch_size: int

    def __post_init__(self) -> None:
        check_tensor("PointBatch.points", self.points, ndim=2, min_last_dim=3, floating=True, finite=True)
        check_tensor("PointBatch.batch_index", self.batch_index, ndim=1, floating=False, length=len(self.points))
        if self.batch_size < 1:
            raise ValueError(f"PointBatch.batch_size: expected >= 1, got {self.batch_size}")
        if checking_values() and self.batch_index.numel() and (
            int(self.batch_index.min()) < 0 or int(self.batch_index.max()) >= self.batch_size
        ):
            raise ValueError(f"PointBatch.batch_index: values must lie in [0, {self.batch_size})")

    @classmethod
    def from_frames(cls, frames: Sequence[torch.Tensor]) -> PointBatch:
        """Concatenate per-frame (Ni, 3 + C) point tensors; all frames need the same C."""
        if not frames:
            raise ValueError("PointBatch.from_frames: expected at least one frame")
        widths = {f.shape[-1] if f.ndim == 2 else -1 for f in frames}
        if len(widths) != 1:
            shapes = [tuple(f.shape) for f in frames]
            raise ValueError(f"PointBatch.from_frames: frames must all be (Ni, D) with one D, got {shapes}")
        index = torch.cat(
            [torch.full((len(f),), i, dtype=torch.int64, device=f.device) for i, f in enumerate(frames)]
        )
        return cls(torch.cat(list(frames), dim=0), index, len(frames))

    @property
    def num_features(self) -> int:
        """Columns per point, xyz included."""
        return self.points.shape[1]

    def to(self, device: torch.device | str) -> PointBatch:
        return PointBatch(self.points.to(device), self.batch_index.to(device), self.batch_size)
