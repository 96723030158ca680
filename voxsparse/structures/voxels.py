"""Sparse voxel tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxsparse.structures._validation import check_tensor


@dataclass(frozen=True)
class VoxelGrid:
    """A regular grid over a point-cloud range.

    Attributes:
        voxel_size: (dx, dy, dz) metres.
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) metres.
    """

    voxel_size: tuple[float, float, float]
    point_cloud_range: tuple[float, float, float, float, float, float]

    def __post_init__(self) -> None:
        if len(self.voxel_size) != 3 or min(self.voxel_size) <= 0:
            raise ValueError(f"VoxelGrid.voxel_size: expected 3 positive sizes, got {self.voxel_size}")
        r = self.point_cloud_range
        if len(r) != 6 or not all(r[i + 3] > r[i] for i in range(3)):
            raise ValueError(f"VoxelGrid.point_cloud_range: expected (min xyz, max xyz) with max > min, got {r}")
        object.__setattr__(self, "voxel_size", tuple(float(v) for v in self.voxel_size))
        object.__setattr__(self, "point_cloud_range", tuple(float(v) for v in r))
        if min(self.grid_size) < 1:
            extent = tuple(r[i + 3] - r[i] for i in range(3))
            raise ValueError(
                f"VoxelGrid.voxel_size: {self.voxel_size} leaves no whole voxel along some axis of the "
                f"range's extent {extent} m (grid size x, y, z {self.grid_size})"
            )

    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Voxels along (x, y, z)."""
        r, v = self.point_cloud_range, self.voxel_size
        return tuple(round((r[i + 3] - r[i]) / v[i]) for i in range(3))  # type: ignore[return-value]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """Voxels along (z, y, x), the order of sparse indices."""
        x, y, z = self.grid_size
        return (z, y, x)


@dataclass
class SparseVoxels:
    """Occupied voxels of a batch.

    Attributes:
        coords: (M, 4) int32 voxel indices (batch, z, y, x), as spconv expects.
        features: (M, C) float voxel features.
        grid: the voxel grid the indices refer to.
        batch_size: number of frames.
    """

    coords: torch.Tensor
    features: torch.Tensor
    grid: VoxelGrid
    batch_size: int

    def __post_init__(self) -> None:
        check_tensor("SparseVoxels.coords", self.coords, ndim=2, last_dim=4, floating=False)
        check_tensor("SparseVoxels.features", self.features, ndim=2, floating=True, length=len(self.coords))

    def __len__(self) -> int:
        return self.coords.shape[0]

    def voxel_centers(self) -> torch.Tensor:
        """(M, 3) voxel centres (x, y, z) in metres."""
        size = self.features.new_tensor(self.grid.voxel_size)
        low = self.features.new_tensor(self.grid.point_cloud_range[:3])
        xyz = self.coords[:, [3, 2, 1]].to(self.features.dtype)
        return (xyz + 0.5) * size + low

    def to(self, device: torch.device | str) -> SparseVoxels:
        return SparseVoxels(self.coords.to(device), self.features.to(device), self.grid, self.batch_size)


@dataclass
class SparseBEV:
    """Sparse bird's-eye-view features: the output of a backbone's height compression.

    Attributes:
        coords: (M, 3) int32 cell indices (batch, y, x); a cell is ``stride`` voxels wide.
        features: (M, C) float.
        spatial_shape: (H, W) cells.
        stride: BEV cell size in voxels of ``grid``.
        grid: the voxel grid of the backbone's input.
        batch_size: number of frames.
    """

    coords: torch.Tensor
    features: torch.Tensor
    spatial_shape: tuple[int, int]
    stride: int
    grid: VoxelGrid
    batch_size: int

    def __post_init__(self) -> None:
        check_tensor("SparseBEV.coords", self.coords, ndim=2, last_dim=3, floating=False)
        check_tensor("SparseBEV.features", self.features, ndim=2, floating=True, length=len(self.coords))

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def cell_size(self) -> tuple[float, float]:
        """(x, y) size of one cell, metres."""
        return (self.grid.voxel_size[0] * self.stride, self.grid.voxel_size[1] * self.stride)

    def cell_centers(self, coords: torch.Tensor | None = None) -> torch.Tensor:
        """(M, 2) centres (x, y) in metres of ``coords`` ((M, 3) batch, y, x; default: this tensor's cells)."""
        coords = self.coords if coords is None else coords
        size = self.features.new_tensor(self.cell_size)
        low = self.features.new_tensor(self.grid.point_cloud_range[:2])
        return (coords[:, [2, 1]].to(self.features.dtype) + 0.5) * size + low
