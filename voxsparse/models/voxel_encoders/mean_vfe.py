"""Mean voxel feature encoder: the mean of the points in each voxel (VoxelNeXt, SECOND's simple VFE)."""

from __future__ import annotations

from torch import nn

from voxsparse.ops.voxelize import voxelize_mean
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid


class MeanVFE(nn.Module):
    """Dynamic voxelization, then the per-voxel mean of every point column.

    Args:
        grid: the voxel grid.
        in_channels: columns per point, 3 + C (x, y, z, then C features such as intensity).

    ``forward``: ``PointBatch`` (N, in_channels) → ``SparseVoxels`` with (M, in_channels) features
    (mean x, y, z in metres, then mean features), in the points' dtype. No parameters.
    """

    def __init__(self, grid: VoxelGrid, in_channels: int = 4) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"MeanVFE.in_channels: expected >= 3 (x, y, z first), got {in_channels}")
        self.grid = grid
        self.in_channels = in_channels
        self.out_channels = in_channels

    def forward(self, points: PointBatch) -> SparseVoxels:
        _check_columns(self, points)
        coords, features = voxelize_mean(points, self.grid)
        return SparseVoxels(coords, features, self.grid, points.batch_size)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, grid={self.grid}"


def _check_columns(encoder: nn.Module, points: PointBatch) -> None:
    if points.num_features != encoder.in_channels:
        raise ValueError(
            f"{type(encoder).__name__}: expected points with {encoder.in_channels} columns, "
            f"got {points.num_features}"
        )
