"""Dense bird's-eye-view feature maps, the input of dense 2D necks and heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxsparse.structures._validation import check_tensor
from voxsparse.structures.voxels import SparseBEV, VoxelGrid


@dataclass
class DenseBEV:
    """A dense BEV map over a voxel grid.

    Cell ``(y, x)`` covers ``[x, x + 1) * stride`` voxels of ``grid`` along x and likewise along y,
    so its lower corner lies at ``point_cloud_range[:2] + (x, y) * cell_size``.

    Attributes:
        features: (B, C, H, W) float; empty cells are zero.
        stride: cell size in voxels of ``grid`` (x and y).
        grid: the voxel grid of the backbone's input.
    """

    features: torch.Tensor
    stride: int
    grid: VoxelGrid

    def __post_init__(self) -> None:
        check_tensor("DenseBEV.features", self.features, ndim=4, floating=True)
        if self.stride < 1:
            raise ValueError(f"DenseBEV.stride: expected >= 1 voxels per cell, got {self.stride}")

    @property
    def batch_size(self) -> int:
        return self.features.shape[0]

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """(H, W) cells."""
        return (self.features.shape[2], self.features.shape[3])

    @property
    def cell_size(self) -> tuple[float, float]:
        """(x, y) size of one cell, metres."""
        return (self.grid.voxel_size[0] * self.stride, self.grid.voxel_size[1] * self.stride)

    @classmethod
    def from_sparse(cls, bev: SparseBEV) -> DenseBEV:
        """``bev``'s cells scattered into a zero map of its spatial shape: (B, C, H, W)."""
        h, w = bev.spatial_shape
        coords = bev.coords.long()
        dense = bev.features.new_zeros(bev.batch_size, h, w, bev.features.shape[1])
        dense[coords[:, 0], coords[:, 1], coords[:, 2]] = bev.features
        return cls(dense.permute(0, 3, 1, 2).contiguous(), bev.stride, bev.grid)
