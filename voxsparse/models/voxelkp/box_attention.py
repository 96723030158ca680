"""Sparse box-attention (VoxelKP, Shi et al. 2023): multi-head self-attention among the voxels that
share a 3D box, and nothing else.

A human's keypoints are correlated (an elbow sits between a shoulder and a wrist), and the voxels
that carry them lie in one human-sized box. Attention restricted to a box learns those correlations
without mixing in the rest of the scene, and costs ``sum_boxes n_box^2`` instead of ``M^2``.

Which boxes. The paper's network is single-stage: box-attention runs inside the backbone, before any
detection exists. Its code (``SparseAttentionBlock`` over SpTr's ``VarLengthMultiheadSA``) therefore
uses fixed boxes that tile the scene, sized in voxels per stage; :func:`window_groups` builds those,
optionally shifted by half a box so that a person cut by one tiling is whole in the next. The
attention itself (:class:`BoxAttentionBlock`) takes any assignment of voxels to boxes
(:class:`VoxelGroups`), e.g. instance boxes; a voxel in no box (group -1) passes through unchanged.

Implementation: voxels are sorted by box; boxes are bucketed by their voxel count rounded up to a
power of two, and each bucket runs ``scaled_dot_product_attention`` on a padded ``(boxes, slots)``
batch with padding masked as keys. Padding is thus at most 2x the voxels, and no compiled extension
is needed. Every voxel's slot in those batches (:class:`GroupLayout`) comes from sorts, cumulative
sums and scatters on the device; the one host read is the number of boxes per bucket, taken once
for all the tilings of a stage (:func:`group_layouts`). Features enter the batches by a scatter to
distinct slots and leave by a gather from distinct slots, so the backward pass never accumulates
many gradients into one row (a gather that fills padding from one shared row does, and on CUDA
that accumulation runs serially).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.models.backbones.dsvt import PositionEmbedding
from voxsparse.ops.scatter import group_counts, run_starts


@dataclass(frozen=True)
class VoxelGroups:
    """The box each of M voxels lies in, and where inside it.

    Attributes:
        index: (M,) int64 box id (any non-negative ids; equal ids = same box), -1 for no box.
        position: (M, 3) float position (x, y, z) of the voxel inside its box, scaled to [-1, 1]
            (any value where ``index`` is -1).
    """

    index: torch.Tensor
    position: torch.Tensor

    def __post_init__(self) -> None:
        if self.index.ndim != 1 or self.index.dtype != torch.int64:
            raise ValueError(
                f"VoxelGroups.index: expected (M,) int64, got {tuple(self.index.shape)} {self.index.dtype}"
            )
        if self.position.shape != (self.index.shape[0], 3):
            m = self.index.shape[0]
            got = tuple(self.position.shape)
            raise ValueError(f"VoxelGroups.position: expected shape ({m}, 3), got {got}")


def window_groups(
    coords: torch.Tensor, spatial_shape: Sequence[int], box: Sequence[int], shifted: bool = False
) -> VoxelGroups:
    """Fixed boxes of ``box`` (x, y, z) voxels tiling each frame, shifted by half a box if ``shifted``.

    Args:
        coords: (M, 4) int (batch, z, y, x) voxel indices.
        spatial_shape: (Z, Y, X) grid extent.
        box: (bx, by, bz) box size in voxels, each >= 1.

    Box ids are row-major (batch, z, y, x) window indices, as DSVT's windows
    (:func:`~voxsparse.models.backbones.dsvt_partition.window_partition`); they are computed here
    with Python-integer sizes only, so no host-to-device copy waits for the device.
    """
    if len(box) != 3 or min(int(b) for b in box) < 1:
        raise ValueError(f"box: expected 3 sizes >= 1 voxel, got {tuple(box)}")
    c = coords.long()
    key = c[:, 0]
    position = {}
    for column, size, extent in zip((1, 2, 3), (int(box[2]), int(box[1]), int(box[0])), spatial_shape):
        shift = size // 2 if shifted else 0
        index = c[:, column] + shift
        window = torch.div(index, size, rounding_mode="floor")
        position[column] = ((index - window * size).float() + 0.5) / size * 2 - 1
        key = key * ((int(extent) - 1 + shift) // size + 1) + window  # partial windows included
    return VoxelGroups(key, torch.stack([position[3], position[2], position[1]], dim=1))


# Padded lengths 2**0 .. 2**(_BUCKETS - 1); a box never holds 2**31 voxels.
_BUCKETS = 32


@dataclass(frozen=True)
class GroupLayout:
    """Where each voxel sits in the padded per-bucket batches of :func:`grouped_attention`.

    The batches are concatenated into one buffer of ``size`` slots: bucket by bucket (ascending
    padded length), box after box (ascending box id), a box's voxels in their input order.

    Attributes:
        slot: (M,) int64, distinct: a voxel's slot in the buffer, or ``size + row`` for a voxel in no
            box (one slot of its own past the buffer).
        occupied: (size,) bool, the slots holding a voxel (the rest are padding).
        buckets: ``(length, boxes)`` of each non-empty bucket in buffer order, host integers.
    """

    slot: torch.Tensor
    occupied: torch.Tensor
    buckets: tuple[tuple[int, int], ...]

    @property
    def size(self) -> int:
        return sum(length * n for length, n in self.buckets)


def _bucket_runs(group: torch.Tensor):
    """Device part of a layout: per voxel its box's bucket, rank among that bucket's boxes and rank
    inside the box (all in sorted order), and (_BUCKETS,) boxes per bucket; no host read."""
    m = group.shape[0]
    device = group.device
    keys, order = torch.sort(group, stable=True)
    starts = run_starts(keys)
    run = torch.cumsum(starts.long(), 0) - 1  # run of equal ids (a box, or the voxels in no box)
    position = torch.arange(m, device=device)
    rank = position - torch.where(starts, position, torch.zeros_like(position)).cummax(0).values
    # Per-run arrays are sized M (at most M runs) so that nothing waits for a host read.
    count = group_counts(run, m)
    is_box = torch.zeros(m, dtype=torch.bool, device=device).scatter_(0, run, keys >= 0)
    # ceil(log2(count)) from the binary exponent of count - 1 (exact in float64).
    exponent = torch.frexp((count - 1).clamp(min=0).double()).exponent.long()
    bucket = torch.where(is_box, exponent, _BUCKETS)  # _BUCKETS: not a box, or an unused run
    sorted_bucket, by_bucket = torch.sort(bucket, stable=True)
    per_bucket = torch.zeros(_BUCKETS + 1, dtype=torch.long, device=device)
    per_bucket.scatter_add_(0, bucket, torch.ones_like(bucket))
    first = torch.cumsum(per_bucket, 0) - per_bucket
    box_rank = torch.empty_like(bucket).scatter_(0, by_bucket, position - first[sorted_bucket])
    return order, run, rank, bucket, box_rank, per_bucket[:_BUCKETS]


def group_layouts(groups: Sequence[torch.Tensor]) -> list[GroupLayout]:
    """The :class:`GroupLayout` of each (M_i,) int64 box-id tensor (-1 = no box), with one host read
    for all of them.

    Args:
        groups: box ids per voxel, e.g. the plain and the shifted tiling of one stage.
    """
    runs = [_bucket_runs(group) for group in groups]
    counts = torch.stack([r[-1] for r in runs]).tolist() if runs else []  # the one host read
    layouts = []
    for group, (order, run, rank, bucket, box_rank, per_bucket), host_count in zip(groups, runs, counts):
        length = 2 ** torch.arange(_BUCKETS, device=group.device)
        sizes = per_bucket * length
        base = torch.cumsum(sizes, 0) - sizes
        size = sum(n << b for b, n in enumerate(host_count))
        # A box's first slot, per run (-1 for runs that are no box).
        b = bucket.clamp(max=_BUCKETS - 1)
        start = torch.where(bucket < _BUCKETS, base[b] + box_rank * length[b], -1)[run]
        # Voxels in no box get one slot each past the buffer.
        sorted_slot = torch.where(start >= 0, start + rank, size + order)
        slot = torch.empty_like(sorted_slot).scatter_(0, order, sorted_slot)
        occupied = torch.zeros(size + group.shape[0], dtype=torch.bool, device=group.device)
        occupied[slot] = True
        buckets = tuple((1 << b, n) for b, n in enumerate(host_count) if n)
        layouts.append(GroupLayout(slot, occupied[:size], buckets))
    return layouts


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: torch.Tensor | GroupLayout, num_heads: int
) -> torch.Tensor:
    """Multi-head scaled dot-product attention within each group.

    Args:
        q, k, v: (M, C) projected queries, keys and values; C divisible by ``num_heads``.
        group: (M,) int64 group id per row, -1 for rows in no group; or its :class:`GroupLayout`
            (from :func:`group_layouts`, reused across calls on the same groups).
        num_heads: attention heads.

    Returns:
        (M, C) attention output (heads concatenated); zeros at rows in no group.
    """
    layout = group if isinstance(group, GroupLayout) else group_layouts([group])[0]
    m, c = q.shape
    d = c // num_heads
    size = layout.size
    # Every row to its own slot: the buffer's padding stays zero, and rows in no group land past it.
    padded = [t.new_zeros(size + m, c).index_put_((layout.slot,), t) for t in (q, k, v)]
    outputs = []
    start = 0
    for length, n in layout.buckets:  # n groups padded to ``length`` slots
        end = start + n * length
        q_b, k_b, v_b = (t[start:end].view(n, length, num_heads, d).transpose(1, 2) for t in padded)
        # (n, heads, length, d); padding slots are masked as keys (every group has a real row).
        valid = layout.occupied[start:end].view(n, 1, 1, length)
        attended = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=valid)
        outputs.append(attended.transpose(1, 2).reshape(n * length, c))
        start = end
    outputs.append(q.new_zeros(m, c))  # the slots of rows in no group
    return torch.cat(outputs)[layout.slot]


class BoxAttentionBlock(nn.Module):
    """Pre-norm transformer block over box groups:

        y = x + W_o Attn(q = k = LN(x) + pos, v = LN(x))     attention within the voxel's box
        out = y + FFN(LN(y))

    ``pos`` is a learned embedding of the voxel's position inside its box. Only voxels inside a box
    are touched; LayerNorm (not BatchNorm) keeps every box's output independent of all other voxels.

    Args:
        channels: C.
        num_heads: attention heads (C divisible by it).
        ffn_channels: hidden width of the feed-forward network (default 2C).

    Input: (M, C) features and :class:`VoxelGroups`. Output: (M, C).
    """

    def __init__(self, channels: int, num_heads: int = 4, ffn_channels: int | None = None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.norm_attn = nn.LayerNorm(channels)
        self.pos_embed = PositionEmbedding(3, channels)
        self.qk = nn.Linear(channels, 2 * channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.norm_ffn = nn.LayerNorm(channels)
        hidden = ffn_channels or 2 * channels
        self.ffn = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor, groups: VoxelGroups, layout: GroupLayout | None = None) -> torch.Tensor:
        """``layout``: of ``groups.index`` when already built (:func:`group_layouts`)."""
        if groups.index.shape[0] != x.shape[0]:
            raise ValueError(f"BoxAttentionBlock: {x.shape[0]} voxels but groups for {groups.index.shape[0]}")
        # Every row is computed and rows in no box keep their input: no host read picks the rows.
        inside = (groups.index >= 0)[:, None]
        position = torch.where(inside, groups.position, 0.0)  # any finite value outside a box
        h = self.norm_attn(x)
        q, k = self.qk(h + self.pos_embed(position.to(h.dtype))).chunk(2, dim=1)
        y = x + self.proj(grouped_attention(q, k, self.v(h), layout or groups.index, self.num_heads))
        y = y + self.ffn(self.norm_ffn(y))
        return torch.where(inside, y.to(x.dtype), x)
