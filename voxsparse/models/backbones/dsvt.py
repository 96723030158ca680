"""DSVT, the Dynamic Sparse Voxel Transformer (Wang et al., "DSVT: Dynamic Sparse Voxel Transformer
with Rotated Sets", CVPR 2023), in pure PyTorch: no compiled extension, CPU and CUDA from one code.

A backbone of *stages*; a stage is a run of DSVT blocks at one resolution, and stages are joined by
attention-style 3D pooling. One block = two set-attention layers: the first attends within x-major
sets, the second within y-major sets (rotated sets); consecutive blocks (counted across stages, as
in the reference) alternate the plain and the shifted window partition. The set machinery is in
:mod:`voxsparse.models.backbones.dsvt_partition`; attention runs through
``torch.nn.functional.scaled_dot_product_attention`` on a padded ``(num_sets, set_size)`` batch.

Layer structure (post-norm, as the paper's code; it reproduces the reference parameter counts,
2,684,928 for Waymo DSVT-Pillar and 3,133,824 for Waymo DSVT-Voxel, input projection excluded):

- set-attention layer: ``h = LN(x + Attn(q = k = x + pos, v = x))``, ``h = LN(h + FFN(h))``,
  ``out = LN(h + x)``; ``pos`` is a learned MLP of the voxel's position inside its window, one MLP
  per layer (Linear, LayerNorm, ReLU, Linear; the reference uses BatchNorm in the MLP).
- block: ``LN(x + layer_y(layer_x(x)))``.
- pooling (between stages): the voxels of a ``stride`` region become one voxel; query = max of the
  region's features, keys = features + a learned embedding of the place in the region, values =
  features; ``out = LN(query + Attn)``. The max runs over the occupied places only (the reference
  pads empty places with zeros first).

Variants. *Pillar*: the input grid has one z cell (pillars), windows are (wx, wy, 1), one stage.
*Voxel*: a 3D grid; windows span many z cells and pooling strides (1, 1, sz) compress z stage by
stage down to one cell. Whatever z extent is left after the last stage is summed into the BEV
(sparse height compression), so any configuration yields a ``SparseBEV``.

:class:`DSVTReferenceBackbone` is DSVT exactly as the reference implementation computes it (for the
reference configurations and their checkpoints); it shares the attention kernel and the window and
pooling partitions and lists its differences from the design above.

DSVT is single-stride: its BEV keeps the input (y, x) resolution unless a pooling stride has x/y
components. ``bev_stride > 1`` appends ``log2(bev_stride)`` sparse 3x3 stride-2 2D convolutions
(+BN+ReLU, spconv through ``voxsparse.ops.sparse_backend``) to coarsen the BEV for the heads,
e.g. on the CPU; ``out_channels`` then sets their width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from voxsparse.models.backbones.dsvt_partition import (
    AXES,
    PoolingPartition,
    SetPartition,
    StagePartition,
    WindowPositions,
    pooling_partition,
    reference_positions,
    reference_stage_partition,
    stage_partition,
)
from voxsparse.models.keys import KeyPair, prefixed
from voxsparse.models.layers import sparse_conv_block
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import merge_duplicates
from voxsparse.structures import SparseBEV, SparseVoxels

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def set_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sets: SetPartition, num_heads: int,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Multi-head attention inside every set, all sets at once; padding slots are masked as keys.

    Args:
        q, k, v: (M, C) per-voxel projected queries, keys and values (C divisible by ``num_heads``).
        sets: the set partition of the M voxels.
        num_heads: attention heads.
        dropout_p: attention dropout (pass 0 in evaluation).

    Returns:
        (M, C) attention output of each voxel (heads concatenated, before the output projection).
    """
    c = q.shape[1]
    n, s = sets.index.shape
    d = c // num_heads
    # Project on the M voxels first (done by the caller), then gather into the padded set batch.
    flat = sets.index.reshape(-1)

    def gather(t: torch.Tensor) -> torch.Tensor:  # (M, C) -> (n, h, s, d), a view of one gather
        return t.index_select(0, flat).view(n, s, num_heads, d).transpose(1, 2)

    # DSVT's sets are short (<= 48 keys, 24-dim heads): in fp32 on CUDA plain matmuls beat the fused
    # memory-efficient kernel that SDPA picks (docs/benchmarks.md); written out, so that no global
    # backend flag is needed. In fp16 SDPA's own choice is the faster.
    attention = _matmul_attention if q.is_cuda and q.dtype == torch.float32 else _sdpa
    out = attention(gather(q), gather(k), gather(v), sets.valid[:, None, None, :], dropout_p)  # (n, h, s, d)
    return out.transpose(1, 2).reshape(n * s, c).index_select(0, sets.position)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, dropout_p: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid, dropout_p=dropout_p)


def _matmul_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d), keys where ``valid``) v, as SDPA's math path computes it.

    Args:
        q, k, v: (n, h, s, d).
        valid: (n, 1, 1, s) bool, the keys each query may attend to (every set has one at least).
    """
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    weights = scores.masked_fill(~valid, float("-inf")).softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


class PositionEmbedding(nn.Module):
    """Learned embedding of a voxel's in-window position (x, y[, z]): Linear, norm, ReLU, Linear.

    ``norm="layer"`` (our design: positions in [-1, 1], so the MLP can run once per distinct place);
    ``"batch"`` is the reference's BatchNorm1d, which sees every voxel's position in training.
    """

    def __init__(self, dims: int, channels: int, norm: str = "layer") -> None:
        super().__init__()
        norm_layer = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}[norm](channels)
        self.mlp = nn.Sequential(
            nn.Linear(dims, channels), norm_layer, nn.ReLU(inplace=True), nn.Linear(channels, channels),
        )

    def forward(self, position: torch.Tensor) -> torch.Tensor:
        return self.mlp(position)

    def openpcdet_keys(self) -> list[KeyPair]:
        return [KeyPair(k, "position_embedding_head." + k.removeprefix("mlp.")) for k in self.state_dict()]


class SetAttentionLayer(nn.Module):
    """One DSVT encoder layer: set self-attention and a feed-forward network, post-norm.

    Args:
        channels: feature width C.
        num_heads: attention heads (C divisible by it).
        ffn_channels: hidden width of the feed-forward network.
        pos_dims: 2 (x, y) or 3 (x, y, z) in-window position inputs.
        dropout: attention and feed-forward dropout.
        activation: ``"gelu"`` or ``"relu"``.

    Input: (M, C) voxel features, a :class:`SetPartition`, the voxels' :class:`WindowPositions`.
    Output: (M, C).
    """

    def __init__(
        self, channels: int, num_heads: int, ffn_channels: int, pos_dims: int, dropout: float = 0.0,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.pos_embed = PositionEmbedding(pos_dims, channels)
        self.qk = nn.Linear(channels, 2 * channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.norm_attn = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(
            nn.Linear(channels, ffn_channels), _ACTIVATIONS[activation](), nn.Dropout(dropout),
            nn.Linear(ffn_channels, channels),
        )
        self.norm_ffn = nn.LayerNorm(channels)
        self.norm_out = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor, sets: SetPartition, position: WindowPositions) -> torch.Tensor:
        pos = position.embed(self.pos_embed)
        q, k = self.qk(x + pos).chunk(2, dim=1)
        attn = set_attention(q, k, self.v(x), sets, self.num_heads, self.dropout if self.training else 0.0)
        h = self.norm_attn(x + self.proj(attn))
        h = self.norm_ffn(h + self.ffn(h))
        return self.norm_out(h + x)


class DSVTBlock(nn.Module):
    """Two set-attention layers over the x-major then the y-major sets of one window partition,
    with a residual connection and LayerNorm around both."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int, pos_dims: int, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [SetAttentionLayer(channels, num_heads, ffn_channels, pos_dims, dropout, activation)
             for _ in AXES]
        )
        self.norm = nn.LayerNorm(channels)

    def forward(
        self, x: torch.Tensor, sets: tuple[SetPartition, SetPartition], position: WindowPositions
    ) -> torch.Tensor:
        out = x
        for layer, axis_sets in zip(self.layers, sets):
            out = layer(out, axis_sets, position)
        return self.norm(out + x)


class AttentionPooling(nn.Module):
    """DSVT's attention-style 3D pooling: each pooling region becomes one voxel.

    query = max over the region's voxels; keys = features + learned embedding of the place in the
    region; values = features; output ``LN(query + proj(Attn))`` (then a linear map when
    ``out_channels`` differs).

    Args:
        channels: input feature width C.
        volume: places in a pooling region (sx * sy * sz).
        num_heads: attention heads.
        out_channels: output width (default C).

    Input: (M, C) voxel features and a :class:`PoolingPartition`. Output: (P, out_channels).
    """

    def __init__(self, channels: int, volume: int, num_heads: int, out_channels: int | None = None) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.volume = volume
        self.pos_embed = nn.Parameter(torch.randn(volume, channels) * 0.02)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        out_channels = channels if out_channels is None else out_channels
        self.out = nn.Identity() if out_channels == channels else nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor, pool: PoolingPartition) -> torch.Tensor:
        if pool.volume != self.volume:
            raise ValueError(f"pooling regions of {pool.volume} places, the module expects {self.volume}")
        p, vol, c = pool.num_regions, pool.volume, x.shape[1]
        h, d = self.num_heads, c // self.num_heads
        flat = pool.region * vol + pool.slot
        dense = x.new_zeros(p * vol, c).index_copy_(0, flat, x).view(p, vol, c)
        valid = torch.zeros(p * vol, dtype=torch.bool, device=x.device).index_fill_(0, flat, True)
        valid = valid.view(p, vol)
        query = dense.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)  # (P, C)
        q = self.q(query).view(p, h, 1, d)
        k = self.k(dense + self.pos_embed)  # keys: features + place embedding; values: features
        v = self.v(dense)
        k = k.view(p, vol, h, d).transpose(1, 2)
        v = v.view(p, vol, h, d).transpose(1, 2)
        # One query over <= 4 keys: SDPA's fused kernels waste their 64-row tiles on it (in fp32 they
        # were most of DSVT's training time on an H100, docs/benchmarks.md); plain matmuls do not.
        out = _matmul_attention(q, k, v, valid[:, None, None, :], 0.0)  # (P, h, 1, d)
        return self.out(self.norm(query + self.proj(out.reshape(p, c))))


def _per_stage(value, num_stages: int, name: str) -> list:
    """A scalar (or a single (x, y, z) triple) repeated per stage, or a list with one entry per stage."""
    if isinstance(value, (int, float)):
        return [value] * num_stages
    items = list(value)
    if items and isinstance(items[0], (int, float)) and name in ("window_shape", "window_shift"):
        return [tuple(int(v) for v in items)] * num_stages
    if len(items) != num_stages:
        raise ValueError(f"{name}: expected one entry per stage ({num_stages}), got {len(items)}")
    return [tuple(int(v) for v in item) if not isinstance(item, (int, float)) else item for item in items]


@dataclass(frozen=True)
class _StageSettings:
    """A DSVT configuration's per-stage settings, one entry per stage (``hybrid``: one (x, y, z))."""

    channels: list[int]
    blocks: list[int]
    heads: list[int]
    ffn: list[int]
    set_size: list[int]
    windows: list[tuple[int, int, int]]
    hybrid: tuple[int, ...]


def _stage_settings(channels, blocks, num_heads, ffn_channels, set_size, window_shape, hybrid_factor) -> _StageSettings:
    """The per-stage arguments both DSVT backbones take, expanded (:func:`_per_stage`) and checked."""
    widths = [int(c) for c in ([channels] if isinstance(channels, int) else channels)]
    n = len(widths)
    windows = [tuple(int(v) for v in w) for w in _per_stage(window_shape, n, "window_shape")]
    hybrid = tuple(int(v) for v in hybrid_factor)
    if any(len(w) != 3 or min(w) < 1 for w in windows) or len(hybrid) != 3 or min(hybrid) < 1:
        raise ValueError(f"window_shape {windows} and hybrid_factor {hybrid} need 3 positive values each")
    return _StageSettings(
        widths,
        [int(b) for b in _per_stage(blocks, n, "blocks")],
        [int(h) for h in _per_stage(num_heads, n, "num_heads")],
        [int(f) for f in _per_stage(ffn_channels, n, "ffn_channels")],
        [int(v) for v in _per_stage(set_size, n, "set_size")],
        windows,
        hybrid,
    )


class DSVTBackbone(nn.Module):
    """Dynamic Sparse Voxel Transformer over ``SparseVoxels``, output ``SparseBEV``.

    Per-stage arguments take one value per stage (or one value for all).

    Args:
        in_channels: voxel feature channels from the voxel encoder (projected to ``channels[0]``
            by a Linear + LayerNorm).
        channels: feature width of each stage (paper: 192).
        blocks: DSVT blocks per stage (paper: 4 pillar, 1 per stage voxel).
        num_heads: attention heads per stage (paper: 8); pooling uses the heads of its input stage.
        ffn_channels: feed-forward hidden width per stage (paper: 384).
        set_size: maximum voxels per set, per stage (paper: 36 pillar, 48 voxel).
        window_shape: plain window (wx, wy, wz) voxels per stage (paper: (12, 12, 1) pillar;
            (12, 12, 32), (12, 12, 8), (12, 12, 2), (12, 12, 1) voxel).
        hybrid_factor: (x, y, z) factor from the plain to the shifted window (paper: (2, 2, 1)).
        window_shift: shift (x, y, z) of the shifted window, per stage; default (wx // 2, wy // 2, 0)
            of the plain window (paper: (6, 6, 0)).
        pool_stride: (sx, sy, sz) attention pooling between consecutive stages, one per gap
            (paper voxel: (1, 1, 4), (1, 1, 4), (1, 1, 2)); sx must equal sy.
        dropout: attention / feed-forward dropout.
        activation: feed-forward activation, ``"gelu"`` (paper) or ``"relu"``.
        bev_stride: power of two; > 1 appends log2(bev_stride) sparse 3x3 stride-2 2D convolutions
            (+BatchNorm+ReLU, spconv) that coarsen the BEV for the heads.
        out_channels: BEV feature width (default: the last stage's width).
        use_checkpoint: recompute each block in the backward pass (saves activation memory).

    Input: ``SparseVoxels`` with unique coordinates. Output: ``SparseBEV`` at stride
    ``(product of the x pooling strides) * bev_stride``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] | int = (192,),
        blocks: Sequence[int] | int = (4,),
        num_heads: Sequence[int] | int = 8,
        ffn_channels: Sequence[int] | int = 384,
        set_size: Sequence[int] | int = 36,
        window_shape: Sequence[Sequence[int]] | Sequence[int] = ((12, 12, 1),),
        hybrid_factor: Sequence[int] = (2, 2, 1),
        window_shift: Sequence[Sequence[int]] | Sequence[int] | None = None,
        pool_stride: Sequence[Sequence[int]] = (),
        dropout: float = 0.0,
        activation: str = "gelu",
        bev_stride: int = 1,
        out_channels: int | None = None,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        settings = _stage_settings(channels, blocks, num_heads, ffn_channels, set_size, window_shape, hybrid_factor)
        channels_list, heads, ffn, windows, hybrid = (
            settings.channels, settings.heads, settings.ffn, settings.windows, settings.hybrid
        )
        n = len(channels_list)
        self.num_stages = n
        self.channels = channels_list
        self.blocks_per_stage = settings.blocks
        self.set_size = settings.set_size
        if window_shift is None:
            shifts = [(w[0] // 2, w[1] // 2, 0) for w in windows]
        else:
            shifts = _per_stage(window_shift, n, "window_shift")
        self.pool_stride = [tuple(int(v) for v in s) for s in pool_stride]
        if len(self.pool_stride) != n - 1:
            raise ValueError(f"pool_stride: expected {n - 1} strides for {n} stages, got {self.pool_stride}")
        if any(len(s) != 3 or s[0] != s[1] or min(s) < 1 for s in self.pool_stride):
            raise ValueError(f"pool_stride: each must be (s, s, sz) with s, sz >= 1, got {self.pool_stride}")
        if bev_stride < 1 or bev_stride & (bev_stride - 1):
            raise ValueError(f"bev_stride must be a power of two, got {bev_stride}")

        # The window partitions (shape, shift) each stage uses, and which one each block uses:
        # blocks alternate plain / shifted, counted over the whole backbone as in the reference.
        self._stage_windows: list[list[tuple[tuple[int, int, int], tuple[int, int, int]]]] = []
        self._block_window: list[list[int]] = []
        block_id = 0
        for s in range(n):
            plain = (tuple(windows[s]), (0, 0, 0))
            shifted = (tuple(w * f for w, f in zip(windows[s], hybrid)), tuple(shifts[s]))
            if not all(0 <= sh < w for sh, w in zip(shifted[1], shifted[0])):
                raise ValueError(f"stage {s}: window_shift {shifted[1]} must lie in the window {shifted[0]}")
            kinds = [(block_id + b) % 2 for b in range(self.blocks_per_stage[s])]
            used = sorted(set(kinds))
            self._stage_windows.append([(plain, shifted)[k] for k in used])
            self._block_window.append([used.index(k) for k in kinds])
            block_id += self.blocks_per_stage[s]

        self.input_proj = nn.Sequential(
            nn.Linear(in_channels, channels_list[0]), nn.LayerNorm(channels_list[0])
        )
        self.stages = nn.ModuleList()
        self._pos_dims = []
        for s in range(n):
            pos_dims = 3 if any(w[2] > 1 for w, _ in self._stage_windows[s]) else 2
            self._pos_dims.append(pos_dims)
            self.stages.append(nn.ModuleList([
                DSVTBlock(channels_list[s], heads[s], ffn[s], pos_dims, dropout, activation)
                for _ in range(self.blocks_per_stage[s])
            ]))
        self.pools = nn.ModuleList([
            AttentionPooling(channels_list[s], math.prod(self.pool_stride[s]), heads[s], channels_list[s + 1])
            for s in range(n - 1)
        ])
        last = channels_list[-1]
        self.out_channels = last if out_channels is None else int(out_channels)
        self.bev_stride = bev_stride
        num_convs = bev_stride.bit_length() - 1
        if num_convs:
            widths = [last] + [self.out_channels] * num_convs
            self.bev_out = spnn.SparseSequential(*[
                sparse_conv_block(
                    widths[i], widths[i + 1], 3, stride=2, indice_key=f"dsvt_bev{i}", subm=False, dims=2
                )
                for i in range(num_convs)
            ])
        elif self.out_channels != last:
            self.bev_out = nn.Linear(last, self.out_channels)
        else:
            self.bev_out = None
        self.use_checkpoint = use_checkpoint
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in self.stages.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def stride(self) -> int:
        return math.prod([s[0] for s in self.pool_stride]) * self.bev_stride

    def stage_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """(Z, Y, X) grid of each stage for an input grid of ``spatial_shape`` (z, y, x)."""
        shapes = [tuple(int(v) for v in spatial_shape)]
        for sx, sy, sz in self.pool_stride:
            z, y, x = shapes[-1]
            shapes.append((-(-z // sz), -(-y // sy), -(-x // sx)))
        return shapes  # type: ignore[return-value]

    def partition(
        self, coords: torch.Tensor, sparse_shape: Sequence[int], batch_size: int, stage: int
    ) -> StagePartition:
        """The window and set partitions of ``stage`` for voxels at ``coords`` (built once per stage)."""
        configs = self._stage_windows[stage]
        shapes, shifts = [c[0] for c in configs], [c[1] for c in configs]
        return stage_partition(coords, sparse_shape, batch_size, shapes, shifts, self.set_size[stage])

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        if len(voxels) == 0:
            return self._empty_output(voxels)
        batch_size = voxels.batch_size
        coords = voxels.coords
        shape = tuple(voxels.grid.spatial_shape)
        x = self.input_proj(voxels.features)
        for s, blocks in enumerate(self.stages):
            part = self.partition(coords, shape, batch_size, s)
            positions = [w.positions(self._pos_dims[s], x.dtype) for w in part.windows]
            for block, w in zip(blocks, self._block_window[s]):
                if self.use_checkpoint and self.training:
                    x = checkpoint(block, x, part.sets[w], positions[w], use_reentrant=False)
                else:
                    x = block(x, part.sets[w], positions[w])
            if s < self.num_stages - 1:
                pool = pooling_partition(coords, shape, batch_size, self.pool_stride[s])
                x = self.pools[s](x, pool)
                coords, shape = pool.coords, pool.sparse_shape
        return self._to_bev(coords, x, shape, voxels)

    def _to_bev(
        self, coords: torch.Tensor, x: torch.Tensor, shape: tuple[int, int, int], voxels: SparseVoxels
    ) -> SparseBEV:
        depth, h, w = shape
        bev_coords = coords[:, [0, 2, 3]].int()
        if depth > 1:  # sparse height compression: sum the remaining z cells of a column
            bev_coords, x = merge_duplicates(bev_coords, x, (voxels.batch_size, h, w))
        if isinstance(self.bev_out, spnn.SparseSequential):
            out = self.bev_out(SparseConvTensor(x, bev_coords, [h, w], voxels.batch_size))
            bev_coords, x = out.indices, out.features
            h, w = out.spatial_shape
        elif self.bev_out is not None:
            x = self.bev_out(x)
        return SparseBEV(bev_coords, x, (int(h), int(w)), self.stride, voxels.grid, voxels.batch_size)

    def _empty_output(self, voxels: SparseVoxels) -> SparseBEV:
        _, h, w = self.stage_shapes(voxels.grid.spatial_shape)[-1]
        for _ in range(self.bev_stride.bit_length() - 1):  # each 3x3 stride-2 conv with padding 1 rounds up
            h, w = (h + 1) // 2, (w + 1) // 2
        coords = voxels.coords.new_zeros(0, 3).int()
        feats = voxels.features.new_zeros(0, self.out_channels)
        return SparseBEV(coords, feats, (h, w), self.stride, voxels.grid, voxels.batch_size)


# --------------------------------------------------------------------------------------------------
# DSVT as the reference implementation computes it (OpenPCDet's ``backbones_3d/dsvt.py``, the same
# modules as the authors' repository), for the reference configurations and their checkpoints.


def _packed_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, part: slice) -> torch.Tensor:
    """Rows ``part`` of a packed (3C, C) query / key / value projection applied to ``x``."""
    return F.linear(x, weight[part], bias[part])


class ReferenceSetAttentionLayer(nn.Module):
    """The reference's encoder layer (``DSVT_EncoderLayer`` around ``SetAttention``), post-norm:
    ``h = norm1(x + out_proj(Attn(q = k = x + pos, v = x)))``, ``h = norm2(h + linear2(act(linear1(h))))``,
    ``out = norm(h + x)``. Attention dropout ``dropout``; none in the feed-forward network.

    The packed projection (``in_proj_weight`` (3C, C), as ``nn.MultiheadAttention`` stores it) runs on
    the M voxels before they are gathered into sets (the reference projects every set slot): the
    same values, fewer rows.

    Input: (M, C) features, a :class:`SetPartition`, the voxels' :class:`WindowPositions`. Output (M, C).
    """

    def __init__(self, channels: int, num_heads: int, ffn_channels: int, pos_dims: int, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.num_heads = num_heads
        self.dropout = dropout
        self.pos_embed = PositionEmbedding(pos_dims, channels, norm="batch")
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        self.linear1 = nn.Linear(channels, ffn_channels)
        self.linear2 = nn.Linear(ffn_channels, channels)
        self.activation = _ACTIVATIONS[activation]()
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)
        self.norm = nn.LayerNorm(channels)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, sets: SetPartition, position: WindowPositions) -> torch.Tensor:
        c = self.channels
        pos = position.embed(self.pos_embed)
        q, k = _packed_projection(x + pos, self.in_proj_weight, self.in_proj_bias, slice(0, 2 * c)).chunk(2, dim=1)
        v = _packed_projection(x, self.in_proj_weight, self.in_proj_bias, slice(2 * c, 3 * c))
        attn = set_attention(q, k, v, sets, self.num_heads, self.dropout if self.training else 0.0)
        h = self.norm1(x + self.out_proj(attn))
        h = self.norm2(h + self.linear2(self.activation(self.linear1(h))))
        return self.norm(h + x)

    def reference_keys(self) -> tuple[list[KeyPair], list[KeyPair]]:
        """(pairs of the encoder layer, pairs of its position embedding), each relative to its own
        module on both sides: the reference keeps the embedding in its input layer, away from the
        layer (the backbone places both)."""
        pairs = []
        for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            pairs.append(KeyPair(name, "win_attn.self_attn." + name))
        for name in ("linear1", "linear2", "norm1", "norm2"):
            pairs += [KeyPair(f"{name}.{p}", f"win_attn.{name}.{p}") for p in ("weight", "bias")]
        pairs += [KeyPair(f"norm.{p}", f"norm.{p}") for p in ("weight", "bias")]
        return pairs, self.pos_embed.openpcdet_keys()


class ReferenceDSVTBlock(nn.Module):
    """Two reference encoder layers over one window partition's (y-major, x-major) sets, then
    ``norm(out + x)``. Layer i embeds the positions of window partition i (plain, shifted) whichever
    partition its sets come from, as the reference does."""

    def __init__(self, channels: int, num_heads: int, ffn_channels: int, pos_dims: int, dropout: float = 0.0,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [ReferenceSetAttentionLayer(channels, num_heads, ffn_channels, pos_dims, dropout, activation)
             for _ in range(2)]
        )
        self.norm = nn.LayerNorm(channels)

    def forward(
        self, x: torch.Tensor, sets: tuple[SetPartition, SetPartition], positions: Sequence[WindowPositions]
    ) -> torch.Tensor:
        out = x
        for layer, axis_sets, position in zip(self.layers, sets, positions):
            out = layer(out, axis_sets, position)
        return self.norm(out + x)


class ReferenceAttentionPooling(nn.Module):
    """The reference's attention pooling (``Stage_ReductionAtt_Block``): a region's places are filled
    with its voxels' features and zeros at empty places; query = max over all places (zeros
    included), keys = places + a learned place embedding, values = places, every place attended
    (no mask); output ``norm(query + MHA)``, ``num_heads`` heads (the reference: 8 whatever the stage).

    Input: (M, C) features and a :class:`PoolingPartition`. Output: (P, C).
    """

    def __init__(self, channels: int, volume: int, num_heads: int = 8) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.channels = channels
        self.volume = volume
        self.num_heads = num_heads
        self.pos_embedding = nn.Parameter(torch.empty(volume, channels))
        self.in_proj_weight = nn.Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * channels))
        self.out_proj = nn.Linear(channels, channels)
        self.norm = nn.LayerNorm(channels)
        nn.init.normal_(self.pos_embedding, std=0.01)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, pool: PoolingPartition) -> torch.Tensor:
        if pool.volume != self.volume:
            raise ValueError(f"pooling regions of {pool.volume} places, the module expects {self.volume}")
        p, vol, c = pool.num_regions, pool.volume, self.channels
        h, d = self.num_heads, c // self.num_heads
        dense = x.new_zeros(p * vol, c).index_copy_(0, pool.region * vol + pool.slot, x).view(p, vol, c)
        query = dense.amax(dim=1)  # (P, C)
        q = _packed_projection(query, self.in_proj_weight, self.in_proj_bias, slice(0, c)).view(p, h, 1, d)
        k = _packed_projection(dense + self.pos_embedding, self.in_proj_weight, self.in_proj_bias, slice(c, 2 * c))
        v = _packed_projection(dense, self.in_proj_weight, self.in_proj_bias, slice(2 * c, 3 * c))
        k = k.view(p, vol, h, d).transpose(1, 2)
        v = v.view(p, vol, h, d).transpose(1, 2)
        every = torch.ones(1, 1, 1, vol, dtype=torch.bool, device=x.device)
        out = _matmul_attention(q, k, v, every, 0.0)  # (P, h, 1, d)
        return self.norm(query + self.out_proj(out.reshape(p, c)))

    def openpcdet_keys(self) -> list[KeyPair]:
        pairs = [KeyPair("pos_embedding", "pos_embedding")]
        for name in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"):
            pairs.append(KeyPair(name, "self_attn." + name))
        return pairs + [KeyPair(f"norm.{p}", f"norm.{p}") for p in ("weight", "bias")]


class DSVTReferenceBackbone(nn.Module):
    """DSVT exactly as the reference implementation computes it (OpenPCDet 8caccce
    ``backbones_3d/dsvt.py`` with ``reduction_type: attention``; the DSVT repository's is the same).

    What differs from :class:`DSVTBackbone` (the reference's choices, kept here):

    - sets repeat voxels to fill ``set_size`` slots (:func:`reference_stage_partition`); the first
      layer of a block attends within the y-major sets, the second within the x-major sets;
    - position embeddings: one MLP per layer with BatchNorm (eps 1e-5), input ``offset - window / 2``
      (``normalize_pos`` scales it by ``2 * 3.1415 / window``); the first layer of every block embeds
      the plain window's offsets, the second the shifted window's, whichever window its sets come from;
    - attention: packed q/k/v projection (``nn.MultiheadAttention``'s), attention dropout only;
    - pooling: :class:`ReferenceAttentionPooling` (zeros at empty places in the max and as keys,
      8 heads), no linear map between stages (every stage has the same width);
    - no input projection (the voxel encoder's width is the first stage's) and no layer after the
      last stage: the output is the last stage's voxels, which must have one z cell;
    - initialisation: Xavier-uniform for every parameter of two or more dimensions, as the reference.

    Kept from the fast implementation, exact: projections on voxels rather than set slots, SDPA
    (plain matmuls in fp32 on CUDA), partitions built once per stage with one host read, the
    position MLP on the table of a window's places instead of every voxel in evaluation (in
    training its BatchNorm needs every voxel's row, so it runs per voxel there), and sorted
    (b, z, y, x) pooled voxels (the reference sorts them by (b, x, y, z): the blocks do not depend on
    the order).

    Args:
        in_channels: voxel feature width; must equal ``channels[0]``.
        channels: width per stage (``d_model``); all equal.
        blocks: blocks per stage (``set_info[s][1]``).
        num_heads: attention heads per stage (``nhead``).
        ffn_channels: feed-forward width per stage (``dim_feedforward``).
        set_size: voxels per set per stage (``set_info[s][0]``).
        window_shape: (wx, wy, wz) plain window per stage.
        hybrid_factor: (x, y, z) factor from the plain to the shifted window.
        shifts: per stage, the (x, y, z) shifts of the plain and of the shifted window
            (``shifts_list``); each in ``[0, window)``.
        pool_stride: (sx, sy, sz) between consecutive stages (``downsample_stride``).
        dropout: attention dropout.
        activation: ``"gelu"`` or ``"relu"``.
        normalize_pos: the reference's ``normalize_pos``.
        pool_heads: heads of the attention pooling (8 in the reference).
        use_checkpoint: recompute each block in the backward pass.

    Input: ``SparseVoxels`` (M, channels[0]) with unique coordinates. Output: ``SparseBEV`` of the last
    stage's voxels, stride = the product of the x pooling strides.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] | int = (192,),
        blocks: Sequence[int] | int = (4,),
        num_heads: Sequence[int] | int = 8,
        ffn_channels: Sequence[int] | int = 384,
        set_size: Sequence[int] | int = 36,
        window_shape: Sequence[Sequence[int]] | Sequence[int] = ((12, 12, 1),),
        hybrid_factor: Sequence[int] = (2, 2, 1),
        shifts: Sequence[Sequence[Sequence[int]]] = (((0, 0, 0), (6, 6, 0)),),
        pool_stride: Sequence[Sequence[int]] = (),
        dropout: float = 0.0,
        activation: str = "gelu",
        normalize_pos: bool = False,
        pool_heads: int = 8,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        settings = _stage_settings(channels, blocks, num_heads, ffn_channels, set_size, window_shape, hybrid_factor)
        widths, heads, ffn, windows, hybrid = (
            settings.channels, settings.heads, settings.ffn, settings.windows, settings.hybrid
        )
        n = len(widths)
        if len(set(widths)) != 1 or in_channels != widths[0]:
            raise ValueError(f"DSVTReferenceBackbone: in_channels {in_channels} and every stage width {widths} "
                             "must be equal (the reference has no projection between them)")
        self.num_stages = n
        self.channels = widths
        self.blocks_per_stage = settings.blocks
        self.set_size = settings.set_size
        shift_pairs = [[tuple(int(v) for v in shift) for shift in stage] for stage in shifts]
        if len(shift_pairs) != n or any(len(p) != 2 or any(len(s) != 3 for s in p) for p in shift_pairs):
            raise ValueError(f"shifts: expected per stage two (x, y, z) shifts, got {shifts}")
        self.pool_stride = [tuple(int(v) for v in s) for s in pool_stride]
        if len(self.pool_stride) != n - 1 or any(len(s) != 3 or min(s) < 1 for s in self.pool_stride):
            raise ValueError(f"pool_stride: expected {n - 1} (sx, sy, sz) strides >= 1, got {self.pool_stride}")
        self._windows = []
        for s in range(n):
            plain = windows[s]
            pair = [plain, tuple(w * f for w, f in zip(plain, hybrid))]
            for w, shift in zip(pair, shift_pairs[s]):
                if not all(0 <= sh < wi for sh, wi in zip(shift, w)):
                    raise ValueError(f"stage {s}: shift {shift} must lie in the window {w}")
            self._windows.append((pair, shift_pairs[s]))
        self.normalize_pos = normalize_pos
        # The reference embeds (x, y) for windows one cell high, else (x, y, z).
        self._pos_dims = [3 if windows[s][2] > 1 else 2 for s in range(n)]
        self.stages = nn.ModuleList([
            nn.ModuleList([
                ReferenceDSVTBlock(widths[s], heads[s], ffn[s], self._pos_dims[s], dropout, activation)
                for _ in range(self.blocks_per_stage[s])
            ])
            for s in range(n)
        ])
        self.pools = nn.ModuleList([
            ReferenceAttentionPooling(widths[s], math.prod(self.pool_stride[s]), pool_heads) for s in range(n - 1)
        ])
        self.out_channels = widths[-1]
        self.use_checkpoint = use_checkpoint
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)

    @property
    def stride(self) -> int:
        return math.prod([s[0] for s in self.pool_stride])

    def stage_shapes(self, spatial_shape: Sequence[int]) -> list[tuple[int, int, int]]:
        """(Z, Y, X) grid of each stage for an input grid of ``spatial_shape`` (z, y, x)."""
        shapes = [tuple(int(v) for v in spatial_shape)]
        for sx, sy, sz in self.pool_stride:
            z, y, x = shapes[-1]
            shapes.append((-(-z // sz), -(-y // sy), -(-x // sx)))
        return shapes  # type: ignore[return-value]

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        shapes = self.stage_shapes(voxels.grid.spatial_shape)
        if shapes[-1][0] != 1:
            raise ValueError(f"DSVTReferenceBackbone: the last stage has {shapes[-1][0]} z cells; the reference "
                             "configurations pool z down to one")
        coords, x = voxels.coords, voxels.features
        if len(voxels) == 0:
            _, h, w = shapes[-1]
            return SparseBEV(coords.new_zeros(0, 3).int(), x.new_zeros(0, self.out_channels), (h, w), self.stride,
                             voxels.grid, voxels.batch_size)
        block_id = 0
        for s, blocks in enumerate(self.stages):
            window_shapes, shifts = self._windows[s]
            part = reference_stage_partition(coords, shapes[s], voxels.batch_size, window_shapes, shifts,
                                             self.set_size[s])
            # BatchNorm in training normalises over every voxel's row: no table there.
            positions = [reference_positions(w, self._pos_dims[s], self.normalize_pos, x.dtype, not self.training)
                         for w in part.windows]
            for block in blocks:
                sets = part.sets[block_id % 2]
                if self.use_checkpoint and self.training:
                    x = checkpoint(block, x, sets, positions, use_reentrant=False)
                else:
                    x = block(x, sets, positions)
                block_id += 1
            if s < self.num_stages - 1:
                pool = pooling_partition(coords, shapes[s], voxels.batch_size, self.pool_stride[s])
                x = self.pools[s](x, pool)
                coords = pool.coords
        _, h, w = shapes[-1]
        return SparseBEV(coords[:, [0, 2, 3]].int(), x, (h, w), self.stride, voxels.grid, voxels.batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry against OpenPCDet's ``backbone_3d.`` names (relative to the backbone)."""
        pairs = []
        for s, blocks in enumerate(self.stages):
            for b, block in enumerate(blocks):
                for i, layer in enumerate(block.layers):
                    own, pos = layer.reference_keys()
                    ours = f"stages.{s}.{b}.layers.{i}."
                    pairs += prefixed(own, ours, f"stage_{s}.{b}.encoder_list.{i}.")
                    pairs += prefixed(pos, ours + "pos_embed.", f"input_layer.posembed_layers.{s}.{b}.{i}.")
                pairs += [KeyPair(f"stages.{s}.{b}.norm.{p}", f"residual_norm_stage_{s}.{b}.{p}")
                          for p in ("weight", "bias")]
        for s, pool in enumerate(self.pools):
            pairs += prefixed(pool.openpcdet_keys(), f"pools.{s}.", f"stage_{s}_reduction.")
        return pairs
