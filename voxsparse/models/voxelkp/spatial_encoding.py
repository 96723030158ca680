"""Spatial encoding for the 3D-to-BEV projection (VoxelKP, Shi et al. 2023).

A fully sparse detector flattens its 3D voxels to a BEV grid by summing the features of each (y, x)
column (sparse height compression). The sum forgets where in the column a feature came from, yet a
keypoint head must tell a head from an ankle. VoxelKP therefore encodes each voxel's absolute 3D
position into its features before they are summed:

    f'_v = f_v + phi(p_v),      p_v = voxel centre (x, y, z) scaled to [-1, 1] over the grid range,
    bev(b, y, x) = sum over the voxels v of column (b, y, x), at every merged stride, of f'_v

``phi`` is a small MLP (Linear, LayerNorm, ReLU, Linear). Because ``phi`` is nonlinear, the column
sum keeps which heights are occupied. (The authors' code instead scales each voxel's features by its
relative height index before the sum; the learned encoding generalises that, and uses x and y too.)

Both steps are per voxel followed by a scatter-sum, so the result does not depend on voxel order.
"""

from __future__ import annotations

import torch
from torch import nn

from voxsparse.structures import VoxelGrid


class SpatialEncoding(nn.Module):
    """``phi``: absolute voxel centres to (M, C) features.

    Args:
        channels: C, the width of the features it is added to.

    ``forward(coords, stride, grid)``: coords (M, 4) int (batch, z, y, x) indices of voxels that are
    ``stride`` input voxels of ``grid`` wide; returns (M, C).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3, channels), nn.LayerNorm(channels), nn.ReLU(), nn.Linear(channels, channels)
        )

    def forward(self, coords: torch.Tensor, stride: int, grid: VoxelGrid) -> torch.Tensor:
        return self.mlp(normalized_centers(coords, stride, grid, self.mlp[0].weight.dtype))


def normalized_centers(
    coords: torch.Tensor, stride: int, grid: VoxelGrid, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(M, 3) centres (x, y, z) of ``stride``-wide voxels, scaled so the grid range maps to [-1, 1].

    Uses the nominal cell centre ``(i + 0.5) * stride * voxel_size + low``, the convention of
    ``SparseBEV.cell_centers``.
    """
    size = torch.tensor(grid.voxel_size, dtype=dtype, device=coords.device) * stride
    low = torch.tensor(grid.point_cloud_range[:3], dtype=dtype, device=coords.device)
    high = torch.tensor(grid.point_cloud_range[3:], dtype=dtype, device=coords.device)
    xyz = (coords[:, [3, 2, 1]].to(dtype) + 0.5) * size + low
    return (xyz - low) / (high - low) * 2 - 1
