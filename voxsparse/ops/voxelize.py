"""Voxelization of point batches: dynamic (every point kept) and hard (VoxelNet / PointPillars caps).

Pure torch, vectorised, the same code on CPU and GPU.

Rules shared by both modes:

- A point is kept iff ``x_min <= x < x_max`` (and likewise y, z): the range is half-open.
- Its voxel index along each axis is ``floor((p - p_min) / voxel_size)``, computed in float64
  whatever the point dtype, so a point exactly on a voxel border belongs to the voxel whose min edge
  it lies on, and the result does not depend on float32 rounding of the quotient. The index is
  clamped to ``grid_size - 1`` so a point just below ``p_max`` never lands outside the grid.
  (``VoxelGrid.grid_size`` rounds ``range / voxel_size``: keep the range a multiple of the voxel
  size, or the last voxel silently grows or shrinks.)
- Voxels are listed sorted by (batch, z, y, x), so the output is deterministic and, for dynamic
  voxelization, independent of the order of the points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voxsparse.structures import PointBatch, VoxelGrid


@dataclass
class DynamicVoxels:
    """Occupied voxels and the point → voxel map of a batch (N points, N_kept in range, M voxels).

    Attributes:
        coords: (M, 4) int32 (batch, z, y, x), unique, sorted lexicographically.
        point_to_voxel: (N_kept,) int64 row of ``coords`` of each kept point, in input order
            (``coords[point_to_voxel]`` is each kept point's voxel).
        kept: (N,) bool, True for the points inside the range (``kept_rows`` selects them).
        num_points: (M,) int64 kept points per voxel (>= 1).
    """

    coords: torch.Tensor
    point_to_voxel: torch.Tensor
    kept: torch.Tensor
    num_points: torch.Tensor

    def __len__(self) -> int:
        return self.coords.shape[0]

    def kept_rows(self, values: torch.Tensor) -> torch.Tensor:
        """(N_kept, *) the rows of ``values`` (N, *) (e.g. the points) that belong to kept points."""
        return values.index_select(0, self.kept.nonzero().squeeze(1))


@dataclass
class HardVoxels:
    """Voxels with at most P points each (M voxels, D point columns).

    Attributes:
        voxels: (M, P, D) the voxel's first ``num_points`` points in input order, then zero rows.
        num_points: (M,) int64 points stored per voxel, in [1, P].
        coords: (M, 4) int32 (batch, z, y, x), unique, sorted lexicographically.
    """

    voxels: torch.Tensor
    num_points: torch.Tensor
    coords: torch.Tensor

    def __len__(self) -> int:
        return self.coords.shape[0]


def _quantize(points: PointBatch, grid: VoxelGrid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Voxel index of the in-range points.

    Returns:
        index: (3, N_kept) int64 voxel index, rows x, y, z.
        rows: (N_kept,) int64 row of each kept point in ``points``, ascending.
        kept: (N,) bool mask of the kept points.
    """
    device = points.points.device
    # Channels-first float64 copy: element-wise ops over (3, N) run as long contiguous loops,
    # 2-4x faster on the CPU than over (N, 3).
    xyz = torch.empty(3, len(points.points), dtype=torch.float64, device=device).copy_(points.points[:, :3].T)
    low, high, size, extent = (
        torch.tensor(v, dtype=dtype, device=device)[:, None]
        for v, dtype in (
            (grid.point_cloud_range[:3], torch.float64),
            (grid.point_cloud_range[3:], torch.float64),
            (grid.voxel_size, torch.float64),
            (grid.grid_size, torch.int64),
        )
    )
    inside = (xyz >= low) & (xyz < high)
    kept = inside[0] & inside[1] & inside[2]
    rows = kept.nonzero().squeeze(1)  # index_select is faster than boolean indexing on the CPU
    index = xyz.index_select(1, rows).sub_(low).div_(size).floor_().long()
    return index.clamp_(max=extent - 1), rows, kept


def _key_shape(batch_size: int, grid: VoxelGrid) -> tuple[int, int, int, int]:
    shape = (batch_size, *grid.spatial_shape)
    if batch_size * shape[1] * shape[2] * shape[3] >= 2**63:
        raise ValueError(f"voxelize: batch {batch_size} x grid {grid.spatial_shape} overflows int64 keys")
    return shape


def _decode_keys(keys: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(M, 4) int32 coordinates of row-major int64 ``keys`` over ``shape`` (b, z, y, x)."""
    columns = []
    for extent in reversed(shape[1:]):
        columns.append(keys % extent)
        keys = keys // extent
    columns.append(keys)
    return torch.stack(columns[::-1], dim=1).to(torch.int32)


def dynamic_voxelize(points: PointBatch, grid: VoxelGrid) -> DynamicVoxels:
    """Group the in-range points of ``points`` (N, 3 + C) by voxel of ``grid``; no point is dropped
    except out-of-range ones. See the module docstring for the rules."""
    shape = _key_shape(points.batch_size, grid)
    index, rows, kept = _quantize(points, grid)
    # Row-major key over (b, z, y, x), built in place: key order = lexicographic order.
    keys = points.batch_index.index_select(0, rows).long()
    keys.mul_(shape[1]).add_(index[2]).mul_(shape[2]).add_(index[1]).mul_(shape[3]).add_(index[0])
    # Sorted unique keys = voxels sorted by (b, z, y, x), whatever the point order.
    unique_keys, point_to_voxel, num_points = torch.unique(
        keys, sorted=True, return_inverse=True, return_counts=True
    )
    return DynamicVoxels(_decode_keys(unique_keys, shape), point_to_voxel, kept, num_points)


def hard_voxelize(
    points: PointBatch, grid: VoxelGrid, max_points_per_voxel: int, max_voxels: int | None = None
) -> HardVoxels:
    """VoxelNet / PointPillars voxelization with deterministic caps.

    - Within a voxel, the first ``max_points_per_voxel`` (P) points in input order are stored.
    - ``max_voxels`` (None: no cap) applies per frame: each frame keeps the voxels whose first point
      comes earliest in the input. Shuffling the input therefore changes which voxels (and points)
      are kept; the same input always gives the same result.
    - Kept voxels stay sorted by (b, z, y, x).

    Returns:
        HardVoxels with ``voxels`` (M, P, D), D = ``points.num_features``, in the points' dtype.
    """
    if max_points_per_voxel < 1 or (max_voxels is not None and max_voxels < 1):
        raise ValueError(f"hard_voxelize: caps must be >= 1, got {max_points_per_voxel}, {max_voxels}")
    dyn = dynamic_voxelize(points, grid)
    kept_points = dyn.kept_rows(points.points)
    device = kept_points.device
    num_kept, num_voxels = len(kept_points), len(dyn)

    # Stable sort by voxel: each voxel's points become one run, in input order.
    voxel_of_sorted, order = torch.sort(dyn.point_to_voxel, stable=True)
    run_start = torch.cumsum(dyn.num_points, 0) - dyn.num_points  # (M,)
    rank = torch.arange(num_kept, device=device) - run_start[voxel_of_sorted]  # rank within the voxel

    keep_voxel = torch.ones(num_voxels, dtype=torch.bool, device=device)
    if max_voxels is not None:
        first_point = order[run_start]  # (M,) input position of each voxel's first point
        frame = dyn.coords[:, 0].long()
        # Sort voxels by (frame, first appearance); the rank within the frame decides.
        by_appearance = torch.argsort(frame * max(num_kept, 1) + first_point)
        per_frame = torch.bincount(frame, minlength=points.batch_size)
        frame_start = torch.cumsum(per_frame, 0) - per_frame
        voxel_rank = torch.empty_like(frame)
        position = torch.arange(num_voxels, device=device)
        voxel_rank[by_appearance] = position - frame_start[frame[by_appearance]]
        keep_voxel = voxel_rank < max_voxels

    new_id = torch.cumsum(keep_voxel, 0) - 1  # renumbering that keeps the (b, z, y, x) order
    stored = (rank < max_points_per_voxel) & keep_voxel[voxel_of_sorted]
    num_out = int(keep_voxel.sum())
    voxels = kept_points.new_zeros(num_out, max_points_per_voxel, kept_points.shape[1])
    voxels[new_id[voxel_of_sorted[stored]], rank[stored]] = kept_points[order[stored]]
    return HardVoxels(
        voxels=voxels,
        num_points=dyn.num_points[keep_voxel].clamp(max=max_points_per_voxel),
        coords=dyn.coords[keep_voxel],
    )


class Voxelizer(nn.Module):
    """Configurable voxelization step (Hydra-friendly: plain lists and numbers).

    Args:
        voxel_size: (dx, dy, dz) metres.
        point_cloud_range: (x_min, y_min, z_min, x_max, y_max, z_max) metres.
        mode: ``'dynamic'`` → ``DynamicVoxels``; ``'hard'`` → ``HardVoxels``.
        max_points_per_voxel: P, required by ``'hard'``.
        max_voxels: per-frame voxel cap of ``'hard'`` (None: none).
    """

    MODES = ("dynamic", "hard")

    def __init__(
        self,
        voxel_size: Sequence[float],
        point_cloud_range: Sequence[float],
        mode: str = "dynamic",
        max_points_per_voxel: int | None = None,
        max_voxels: int | None = None,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Voxelizer.mode: expected one of {self.MODES}, got {mode!r}")
        if mode == "hard" and max_points_per_voxel is None:
            raise ValueError("Voxelizer: mode 'hard' needs max_points_per_voxel")
        self.grid = VoxelGrid(tuple(voxel_size), tuple(point_cloud_range))
        self.mode = mode
        self.max_points_per_voxel = max_points_per_voxel
        self.max_voxels = max_voxels

    def forward(self, points: PointBatch) -> DynamicVoxels | HardVoxels:
        if self.mode == "dynamic":
            return dynamic_voxelize(points, self.grid)
        return hard_voxelize(points, self.grid, self.max_points_per_voxel, self.max_voxels)

    def extra_repr(self) -> str:
        caps = f", max_points_per_voxel={self.max_points_per_voxel}, max_voxels={self.max_voxels}"
        return f"mode={self.mode!r}, grid={self.grid}" + (caps if self.mode == "hard" else "")
