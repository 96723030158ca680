"""Mean voxel feature encoder: the mean of the points in each voxel (VoxelNeXt, SECOND's simple VFE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxsparse.models.keys import KeyPair
from voxsparse.ops.voxelize import check_quantization, hard_voxelize_mean, voxelize_mean
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid


class MeanVFE(nn.Module):
    """Voxelization, then the per-voxel mean of every point column.

    Args:
        grid: the voxel grid.
        in_channels: columns per point, 3 + C (x, y, z, then C features such as intensity).
        max_points_per_voxel: None (default): dynamic voxelization, the mean over every point of a
            voxel. P: hard voxelization (:func:`~voxsparse.ops.voxelize.hard_voxelize`), the mean
            over the first P points of each voxel in input order, as OpenPCDet's data processor and
            ``MeanVFE`` compute it (OpenPCDet shuffles the points first).
        max_voxels: with P, the per-frame voxel cap in eval mode (voxels whose first point comes
            earliest are kept; None: no cap).
        max_voxels_train: the cap in training mode (None: ``max_voxels``).
        quantization: ``"float64"`` (voxsparse's rule) or ``"float32"`` (spconv's ``PointToVoxel``
            arithmetic, which OpenPCDet's models were trained with); see :mod:`voxsparse.ops.voxelize`.
        tanh_columns: point columns replaced by their tanh before voxelization: OpenPCDet's Waymo
            loader feeds tanh(intensity) (column 3), so a model given raw Waymo points computes what
            OpenPCDet computes from its loader's.

    ``forward``: ``PointBatch`` (N, in_channels) → ``SparseVoxels`` with (M, in_channels) features
    (mean x, y, z in metres, then mean features), in the points' dtype, voxels sorted by
    (b, z, y, x). No parameters.
    """

    def __init__(
        self,
        grid: VoxelGrid,
        in_channels: int = 4,
        max_points_per_voxel: int | None = None,
        max_voxels: int | None = None,
        max_voxels_train: int | None = None,
        quantization: str = "float64",
        tanh_columns: Sequence[int] = (),
    ) -> None:
        super().__init__()
        if in_channels < 3:
            raise ValueError(f"MeanVFE.in_channels: expected >= 3 (x, y, z first), got {in_channels}")
        if max_points_per_voxel is None and (max_voxels is not None or max_voxels_train is not None):
            raise ValueError("MeanVFE: max_voxels / max_voxels_train need max_points_per_voxel (hard voxelization)")
        for name, value in (("max_points_per_voxel", max_points_per_voxel), ("max_voxels", max_voxels),
                            ("max_voxels_train", max_voxels_train)):
            if value is not None and value < 1:
                raise ValueError(f"MeanVFE.{name}: expected >= 1 or None, got {value}")
        self.grid = grid
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels
        self.max_voxels_train = max_voxels if max_voxels_train is None else max_voxels_train
        self.quantization = quantization
        check_quantization(quantization, grid)
        self.tanh_columns = tuple(int(c) for c in tanh_columns)
        if any(not 3 <= c < in_channels for c in self.tanh_columns):
            raise ValueError(f"MeanVFE.tanh_columns: feature columns in [3, {in_channels}), got {list(self.tanh_columns)}")

    def prepared(self, points: PointBatch) -> PointBatch:
        """``points`` checked and with ``tanh_columns`` applied: what is voxelized."""
        _check_columns(self, points)
        if not self.tanh_columns:
            return points
        p = points.points.clone()
        p[:, self.tanh_columns] = torch.tanh(p[:, self.tanh_columns])
        return PointBatch(p, points.batch_index, points.batch_size)

    def forward(self, points: PointBatch) -> SparseVoxels:
        points = self.prepared(points)
        if self.max_points_per_voxel is None:
            coords, features = voxelize_mean(points, self.grid, self.quantization)
        else:
            cap = self.max_voxels_train if self.training else self.max_voxels
            coords, features = hard_voxelize_mean(points, self.grid, self.max_points_per_voxel, cap, self.quantization)
        return SparseVoxels(coords, features, self.grid, points.batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """No state: OpenPCDet's ``MeanVFE`` has none either."""
        return []

    def extra_repr(self) -> str:
        hard = ""
        if self.max_points_per_voxel is not None:
            hard = (f", max_points_per_voxel={self.max_points_per_voxel}, max_voxels={self.max_voxels}, "
                    f"max_voxels_train={self.max_voxels_train}")
        quantization = f", quantization={self.quantization!r}" if self.quantization != "float64" else ""
        tanh = f", tanh_columns={self.tanh_columns}" if self.tanh_columns else ""
        return f"in_channels={self.in_channels}, grid={self.grid}" + hard + quantization + tanh


def _check_columns(encoder: nn.Module, points: PointBatch) -> None:
    if points.num_features != encoder.in_channels:
        raise ValueError(
            f"{type(encoder).__name__}: expected points with {encoder.in_channels} columns, "
            f"got {points.num_features}"
        )
