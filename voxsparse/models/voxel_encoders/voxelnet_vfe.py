"""VoxelNet's voxel feature encoding (Zhou & Tuzel, CVPR 2018) on dynamic voxels (no point cap)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxsparse.models.layers import batch_norm_1d
from voxsparse.models.voxel_encoders.mean_vfe import _check_columns
from voxsparse.ops.scatter import scatter_max, scatter_mean
from voxsparse.ops.voxelize import dynamic_voxelize
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid


class VoxelNetVFE(nn.Module):
    """Stacked VFE layers over the points of each voxel.

    Each point's input is its ``in_channels`` columns, then its offset (x, y, z) to the mean of its
    voxel's points, then (``with_voxel_center``) its offset to the voxel centre: ``in_channels + 3``
    or ``+ 6`` values. Layer i maps per point Linear → BatchNorm1d → ReLU to ``layer_channels[i]``
    and takes the per-voxel element-wise max; before the next layer that max is concatenated to each
    point of the voxel (point-wise ‖ aggregated, 2 x ``layer_channels[i]``). The last layer's
    per-voxel max is the voxel feature, so ``out_channels = layer_channels[-1]``.

    Args:
        grid: the voxel grid.
        in_channels: columns per point, 3 + C (x, y, z first).
        layer_channels: output width of each VFE layer.
        with_voxel_center: add the offset to the voxel centre.

    ``forward``: ``PointBatch`` (N, in_channels) → ``SparseVoxels`` with (M, out_channels) features.
    """

    def __init__(
        self,
        grid: VoxelGrid,
        in_channels: int = 4,
        layer_channels: Sequence[int] = (32, 64),
        with_voxel_center: bool = True,
    ) -> None:
        super().__init__()
        if in_channels < 3 or not layer_channels:
            got = f"in_channels={in_channels}, layer_channels={layer_channels}"
            raise ValueError(f"VoxelNetVFE: need in_channels >= 3 and at least one layer, got {got}")
        self.grid = grid
        self.in_channels = in_channels
        self.with_voxel_center = with_voxel_center
        self.out_channels = int(layer_channels[-1])
        widths = [in_channels + (6 if with_voxel_center else 3)] + [2 * int(c) for c in layer_channels[:-1]]
        self.layers = nn.ModuleList(
            # No Linear bias: BatchNorm's shift replaces it.
            nn.Sequential(
                nn.Linear(w, int(c), bias=False), batch_norm_1d(int(c)), nn.ReLU()
            )
            for w, c in zip(widths, layer_channels)
        )

    def forward(self, points: PointBatch) -> SparseVoxels:
        _check_columns(self, points)
        voxels = dynamic_voxelize(points, self.grid)
        point_feats = voxels.kept_rows(points.points)
        index, num_voxels = voxels.point_to_voxel, len(voxels)
        xyz = point_feats[:, :3]
        parts = [point_feats, xyz - scatter_mean(xyz, index, num_voxels, voxels.num_points)[index]]
        if self.with_voxel_center:
            parts.append(xyz - self._voxel_centers(voxels.coords, xyz)[index])
        x = torch.cat(parts, dim=1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            pooled = scatter_max(x, index, num_voxels)
            if i + 1 < len(self.layers):
                x = torch.cat([x, pooled[index]], dim=1)
        return SparseVoxels(voxels.coords, pooled, self.grid, points.batch_size)

    def _voxel_centers(self, coords: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(M, 3) centres (x, y, z) in metres of (M, 4) (b, z, y, x) ``coords``, dtype of ``like``."""
        size = like.new_tensor(self.grid.voxel_size)
        low = like.new_tensor(self.grid.point_cloud_range[:3])
        return (coords[:, [3, 2, 1]].to(like.dtype) + 0.5) * size + low

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, with_voxel_center={self.with_voxel_center}, grid={self.grid}"
