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
power of two, and each bucket runs ``scaled_dot_product_attention`` on a padded
``(boxes, slots)`` batch with padding masked as keys. Padding is thus at most 2x the voxels, and no
compiled extension is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.models.backbones.dsvt import PositionEmbedding
from voxsparse.models.backbones.dsvt_partition import window_partition


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
    coords: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, box: Sequence[int],
    shifted: bool = False,
) -> VoxelGroups:
    """Fixed boxes of ``box`` (x, y, z) voxels tiling each frame, shifted by half a box if ``shifted``.

    Args:
        coords: (M, 4) int (batch, z, y, x) voxel indices.
        spatial_shape: (Z, Y, X) grid extent.
        batch_size: frames.
        box: (bx, by, bz) box size in voxels, each >= 1.
    """
    shift = tuple(b // 2 for b in box) if shifted else (0, 0, 0)
    windows = window_partition(coords, spatial_shape, batch_size, box, shift)
    return VoxelGroups(windows.window_key, windows.relative_position(3))


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: torch.Tensor, num_heads: int
) -> torch.Tensor:
    """Multi-head scaled dot-product attention within each group.

    Args:
        q, k, v: (M, C) projected queries, keys and values; C divisible by ``num_heads``.
        group: (M,) int64 group id per row, -1 for rows in no group.
        num_heads: attention heads.

    Returns:
        (M, C) attention output (heads concatenated); zeros at rows in no group.
    """
    m, c = q.shape
    d = c // num_heads
    out = q.new_zeros(m, c)
    rows = torch.nonzero(group >= 0).squeeze(1)
    if rows.numel() == 0:
        return out
    keys, order = torch.sort(group[rows], stable=True)
    rows = rows[order]
    _, counts = torch.unique_consecutive(keys, return_counts=True)
    group_of = torch.repeat_interleave(torch.arange(len(counts), device=q.device), counts)  # per sorted row
    slot = torch.arange(len(rows), device=q.device) - (torch.cumsum(counts, 0) - counts)[group_of]
    # Pad every group to the next power of two of its size: one padded batch per distinct length.
    padded = torch.pow(2, torch.ceil(torch.log2(counts.double()))).long()
    buckets = torch.stack(torch.unique(padded, return_counts=True), dim=1).tolist()  # read on the host
    for length, n in buckets:  # n groups padded to ``length`` slots
        in_bucket = padded == length
        local = (torch.cumsum(in_bucket.long(), 0) - 1)[group_of]  # group's row in the bucket
        member = in_bucket[group_of]
        r, g, s = rows[member], local[member], slot[member]
        index = torch.zeros(n, length, dtype=torch.long, device=q.device)
        index[g, s] = r
        valid = torch.zeros(n, length, dtype=torch.bool, device=q.device)
        valid[g, s] = True

        q_b, k_b, v_b = (t[index].view(n, length, num_heads, d).transpose(1, 2) for t in (q, k, v))
        # (n, heads, length, d); padding slots are masked as keys (every box has a real voxel).
        attended = F.scaled_dot_product_attention(q_b, k_b, v_b, attn_mask=valid[:, None, None, :])
        out[r] = attended.transpose(1, 2)[g, s].reshape(-1, c).to(out.dtype)
    return out


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

    def forward(self, x: torch.Tensor, groups: VoxelGroups) -> torch.Tensor:
        if groups.index.shape[0] != x.shape[0]:
            raise ValueError(f"BoxAttentionBlock: {x.shape[0]} voxels but groups for {groups.index.shape[0]}")
        inside = torch.nonzero(groups.index >= 0).squeeze(1)
        xi = x[inside]
        h = self.norm_attn(xi)
        q, k = self.qk(h + self.pos_embed(groups.position[inside].to(h.dtype))).chunk(2, dim=1)
        y = xi + self.proj(grouped_attention(q, k, self.v(h), groups.index[inside], self.num_heads))
        y = y + self.ffn(self.norm_ffn(y))
        return x.index_copy(0, inside, y.to(x.dtype))
