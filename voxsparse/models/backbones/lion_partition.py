"""LION's voxel index work: groups along X / Y orders, merging voxels to a coarser grid (with voxel
generation), and the reverse map (Liu et al., "LION: Linear Group RNN for 3D Object Detection in Point
Clouds", NeurIPS 2024).

Grouping: voxels are sorted window-major, windows of ``(wx, wy, wz)`` voxels (optionally shifted by
half a window), in one of two orders: ``x`` (window x, y, z, then in-window x, y, z) or ``y`` (window
y, x, z, then in-window y, x, z). The sorted voxels of each frame are cut into groups of ``group_size``
consecutive voxels, across window borders; the linear RNN runs over each group as one sequence. A
frame's last group is completed as the reference does: with the voxels at the same places of the
group before it, or, where the frame has a single group, by cycling through the frame's voxels. Only
each voxel's own slot gives its output.

All of it is index arithmetic on (batch, z, y, x) voxel coordinates; no host round trip beyond the
group count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from voxsparse.ops.scatter import group_counts
from voxsparse.ops.sparse_utils import linear_keys, unique_coords


@dataclass(frozen=True)
class GroupPartition:
    """Voxels arranged in equal-length groups.

    Attributes:
        slots: (G * group_size,) int64 voxel index of every group slot (padding slots repeat voxels).
        own_slot: (M,) int64 the slot whose output voxel i takes.
        group_size: slots per group.
    """

    slots: torch.Tensor
    own_slot: torch.Tensor
    group_size: int

    def gather(self, features: torch.Tensor) -> torch.Tensor:
        """(M, C) voxel features -> (G, group_size, C) sequences."""
        return features[self.slots].view(-1, self.group_size, features.shape[1])

    def scatter(self, sequences: torch.Tensor) -> torch.Tensor:
        """(G, group_size, C) outputs -> (M, C), each voxel's from its own slot."""
        return sequences.reshape(-1, sequences.shape[-1])[self.own_slot]


def window_order(
    coords: torch.Tensor,
    spatial_shape: Sequence[int],
    window_shape: Sequence[int],
    batch_size: int,
    direction: str,
    shift: bool,
) -> torch.Tensor:
    """Voxel indices sorted window-major along ``direction`` (LION's ``FlattenedWindowMapping`` 'v2').

    Args:
        coords: (M, 4) int (batch, z, y, x).
        spatial_shape: (Z, Y, X) of the grid.
        window_shape: (wx, wy, wz) voxels.
        direction: ``"x"`` or ``"y"``.
        shift: shift windows by half their size (``w // 2`` along each axis).

    Returns:
        (M,) int64 permutation: position k holds the k-th voxel of the order.
    """
    if direction not in ("x", "y"):
        raise ValueError(f"window_order: direction must be 'x' or 'y', got {direction!r}")
    wx, wy, wz = (int(w) for w in window_shape)
    sz, sy, sx = (int(s) for s in spatial_shape)
    c = coords.long()
    half = (wx // 2, wy // 2, wz // 2) if shift else (0, 0, 0)
    x, y, z = c[:, 3] + half[0], c[:, 2] + half[1], c[:, 1] + half[2]
    # Window counts as the reference's (one extra per axis for the shift); they only bound the keys.
    nx, ny, nz = (math.ceil(s / w) + 1 for s, w in ((sx, wx), (sy, wy), (sz, wz)))
    if direction == "x":
        columns = (c[:, 0], x // wx, y // wy, z // wz, x % wx, y % wy, z % wz)
        extents = (batch_size, nx, ny, nz, wx, wy, wz)
    else:
        columns = (c[:, 0], y // wy, x // wx, z // wz, y % wy, x % wx, z % wz)
        extents = (batch_size, ny, nx, nz, wy, wx, wz)
    keys = linear_keys(torch.stack(columns, 1), extents)
    return torch.argsort(keys)


def group_partition(order: torch.Tensor, batch: torch.Tensor, batch_size: int, group_size: int) -> GroupPartition:
    """Cut each frame's voxels, in ``order``, into groups of ``group_size`` (see the module docstring).

    Args:
        order: (M,) int64 permutation from :func:`window_order` (frames contiguous, in batch order).
        batch: (M,) int frame of each voxel.
        batch_size: number of frames.
        group_size: voxels per group.
    """
    device = order.device
    counts = group_counts(batch, batch_size)
    padded = torch.div(counts + group_size - 1, group_size, rounding_mode="floor") * group_size
    starts = torch.cumsum(counts, 0) - counts
    padded_starts = torch.cumsum(padded, 0) - padded
    total = int(padded.sum())
    frame = torch.repeat_interleave(torch.arange(batch_size, device=device), padded, output_size=total)
    local = torch.arange(total, device=device) - padded_starts[frame]
    n = counts[frame]
    previous_group = local - group_size
    cycled = (local - n) % n.clamp(min=1)
    source = torch.where(local < n, local, torch.where(padded[frame] > group_size, previous_group, cycled))
    slots = order[starts[frame] + source]
    sorted_frame = batch.long()[order]
    own = padded_starts[sorted_frame] + torch.arange(len(order), device=device) - starts[sorted_frame]
    own_slot = torch.empty_like(own)
    own_slot[order] = own
    return GroupPartition(slots, own_slot, group_size)


@dataclass(frozen=True)
class Merged:
    """Voxels merged onto a coarser grid.

    Attributes:
        coords: (M', 4) int32 (batch, z, y, x) on the coarse grid, ordered by (batch, x, y, z).
        inverse: (R,) int64 coarse voxel of each merged row (R = M, or more with generated voxels).
        spatial_shape: (Z', Y', X') of the coarse grid, ``ceil`` of the fine one over the scale.
    """

    coords: torch.Tensor
    inverse: torch.Tensor
    spatial_shape: tuple[int, int, int]


def generate_voxels(
    coords: torch.Tensor, features: torch.Tensor, batch_size: int, spatial_shape: Sequence[int], ratio: float,
    neighbours: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LION's voxel generation: empty voxels beside the most foreground-like voxels of each frame.

    In each frame the ``int(n * ratio)`` voxels of highest mean feature each get ``neighbours`` (4 or
    2) copies with zero features at (x-1, y+1), (x+1, y+1)[, (x-1, y-1), (x+1, y-1)], clamped to the
    grid; merging sums them into the coarse grid, so they only add coarse voxels where there were none.

    Args:
        coords: (M, 4) int (batch, z, y, x); features: (M, C).
        spatial_shape: (Z, Y, X).

    Returns:
        (M + K * neighbours, 4) coords and features: the inputs, then the generated rows.
    """
    if neighbours not in (2, 4):
        raise ValueError(f"generate_voxels: neighbours must be 2 or 4, got {neighbours}")
    _, sy, sx = (int(s) for s in spatial_shape)
    score = features.detach().mean(-1)
    counts = group_counts(coords[:, 0], batch_size)
    picked = []
    for b in range(batch_size):  # top-k per frame: the reference's loop, one small kernel per frame
        rows = torch.nonzero(coords[:, 0] == b).squeeze(1)
        k = int(counts[b] * ratio)  # a float32 product, as the reference's
        picked.append(rows[torch.topk(score[rows], k).indices])
    seeds = coords[torch.cat(picked)].long() if picked else coords.new_zeros(0, 4).long()
    steps = ((-1, 1), (1, 1), (-1, -1), (1, -1))[:neighbours]
    copies = []
    for dx, dy in steps:
        moved = seeds.clone()
        moved[:, 3] = (seeds[:, 3] + dx).clamp(0, sx - 1)
        moved[:, 2] = (seeds[:, 2] + dy).clamp(0, sy - 1)
        copies.append(moved)
    new = torch.cat([coords.long(), *copies])
    return new, torch.cat([features, features.new_zeros(len(new) - len(features), features.shape[1])])


def merge_coords(
    coords: torch.Tensor, spatial_shape: Sequence[int], scale: Sequence[int], batch_size: int
) -> Merged:
    """Map voxels to a grid ``scale = (sx, sy, sz)`` times coarser (LION's ``PatchMerging3D`` indices).

    Args:
        coords: (R, 4) int (batch, z, y, x).
        spatial_shape: (Z, Y, X) of the fine grid.
    """
    sx, sy, sz = (int(s) for s in scale)
    z, y, x = (int(s) for s in spatial_shape)
    shape = (math.ceil(z / sz), math.ceil(y / sy), math.ceil(x / sx))
    c = coords.long()
    coarse = torch.stack((c[:, 0], c[:, 3] // sx, c[:, 2] // sy, c[:, 1] // sz), 1)  # (b, x, y, z) order
    unique, inverse = unique_coords(coarse, (batch_size, shape[2], shape[1], shape[0]))
    return Merged(unique[:, [0, 3, 2, 1]].contiguous(), inverse, shape)
