"""ScatterFormer's backbone (He et al., "ScatterFormer: Efficient Voxel Transformer with Scattered
Linear Attention", ECCV 2024), as its authors' OpenPCDet module ``backbones_3d/scatterformer.py``
computes it.

Windows are columns of ``window_size x window_size`` BEV cells over the full height, holding any
number of voxels: attention runs over each window's voxels as a segment of rows
(:mod:`voxsparse.ops.scattered_attention`), never padded to a common length nor split into sets.

- ``cpe``: a submanifold 3x3x3 conv, three residual blocks (biased convs), a (3, 1, 1) conv of
  stride (2, 1, 1) that halves z; the input grid has one more z cell on top, as OpenPCDet's.
- ``stage1``: a :class:`ScatterFormerLayers` block (three layers), BatchNorm, a 3x3x3 stride-2
  sparse conv; ``stage2``: a block, BatchNorm.
- A layer: BatchNorm, scattered linear attention (ReLU feature maps, 4 heads) added to its input;
  then the cross-window interaction (CWI) FFN: BatchNorm, the channels in four groups — a 3x3x3
  depthwise conv, a depthwise conv along x and one along y over ``window_size + 1`` cells (so
  neighbouring windows exchange features), identity — added to the normalised features, then a
  BatchNorm-MLP (x2 channels) residual.
- ``app``: attention pillar pooling: the voxels of each BEV column (``pillar_size`` z cells, all
  of them after the two z halvings) attend, as keys with a learned z embedding, from a query that
  is their channel-wise max (floored at 0, as spconv's sparse max pool), 8 heads, residual and
  LayerNorm: one feature per occupied column, at BEV stride 2.

The modules are laid out and named as the reference's, so the state-dict names are its own
(relative to OpenPCDet's ``backbone_3d``); the depthwise kernels are stored ``(*kernel, C)`` as
there. Within a block the voxels are sorted by window (coordinates travel with them), as the
reference sorts them; the output is per BEV cell, so voxel order does not reach it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from voxsparse.models.backbones.voxelnext import SparseBasicBlock
from voxsparse.models.keys import KeyPair, identical_keys
from voxsparse.ops.depthwise_sparse_conv import SparseDepthwiseConv3d, depthwise_pairs
from voxsparse.ops.scatter import scatter_max
from voxsparse.ops.scattered_attention import WindowSegments, scattered_linear_attention
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import unique_coords
from voxsparse.structures import SparseBEV, SparseVoxels, VoxelGrid

BN_EPS = 1e-3
#: BEV cells per voxel of the output: one stride-2 conv in x and y.
STRIDE = 2


class ScatteredLinearAttention(nn.Module):
    """Multi-head linear attention among the voxels of each window (the reference's ``SLALayer``).

    ``(x (N, C), segments) -> (N, C)``: q, k, v = one bias-free projection of x split into heads,
    ReLU on q and k, :func:`scattered_linear_attention`, an output projection.
    """

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"ScatteredLinearAttention: {channels} channels do not split into {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
        n, c = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, c // self.num_heads).unbind(1)
        y = scattered_linear_attention(F.relu(q), F.relu(k), v, segments)
        return self.proj(y.reshape(n, c))


class CrossWindowFFN(nn.Module):
    """The cross-window interaction FFN (the reference's ``CWI_FFN_Layer``).

    ``(x (N, C), pairs) -> (N, C)`` with ``pairs`` the depthwise pairs by kernel size
    (:meth:`ScatterFormerLayers.kernel_sizes`).
    """

    def __init__(self, channels: int, conv_size: int, bn_momentum: float) -> None:
        super().__init__()
        if channels % 4:
            raise ValueError(f"CrossWindowFFN: {channels} channels do not split into 4 groups")
        group = channels // 4
        self.bn = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=bn_momentum)
        self.conv_k = SparseDepthwiseConv3d(group, (3, 3, 3))
        self.conv_h = SparseDepthwiseConv3d(group, (1, 1, conv_size))  # along x
        self.conv_w = SparseDepthwiseConv3d(group, (1, conv_size, 1))  # along y
        self.bn2 = nn.BatchNorm1d(channels, eps=BN_EPS, momentum=bn_momentum)
        self.fc1 = nn.Linear(channels, 2 * channels)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(2 * channels, channels)

    def forward(self, x: torch.Tensor, pairs: dict) -> torch.Tensor:
        x = self.bn(x)
        k, h, w, rest = x.chunk(4, dim=1)
        mixed = torch.cat([self.conv_k(k, pairs[self.conv_k.kernel_size]), self.conv_h(h, pairs[self.conv_h.kernel_size]),
                           self.conv_w(w, pairs[self.conv_w.kernel_size]), rest], dim=1)
        x = x + mixed
        return x + self.fc2(self.act(self.fc1(self.bn2(x))))


class ScatterFormerLayers(spnn.SparseModule):
    """``num_layers`` ScatterFormer layers on one active set (the reference's ``ScatterFormerLayer3x``).

    ``(SparseConvTensor) -> SparseConvTensor`` on the same voxels, sorted by window: windows are
    (batch, y // window_size, x // window_size) columns.
    """

    def __init__(self, channels: int, num_heads: int, num_layers: int, window_size: int, bn_momentum: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm_layers = nn.ModuleList(
            nn.BatchNorm1d(channels, eps=BN_EPS, momentum=bn_momentum) for _ in range(num_layers))
        self.attn_layers = nn.ModuleList(ScatteredLinearAttention(channels, num_heads) for _ in range(num_layers))
        self.cffn_layers = nn.ModuleList(
            CrossWindowFFN(channels, window_size + 1, bn_momentum) for _ in range(num_layers))

    def kernel_sizes(self) -> set[tuple[int, int, int]]:
        return {conv.kernel_size for ffn in self.cffn_layers for conv in (ffn.conv_k, ffn.conv_h, ffn.conv_w)}

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        indices = x.indices.long()
        shape = x.spatial_shape
        windows = (x.batch_size, -(-shape[1] // self.window_size), -(-shape[2] // self.window_size))
        cells = torch.stack([indices[:, 0], indices[:, 2] // self.window_size, indices[:, 3] // self.window_size], 1)
        _, window = unique_coords(cells, windows)
        window, order = torch.sort(window, stable=True)
        features, indices = x.features[order], x.indices[order]
        segments = WindowSegments.from_sorted(window)
        pairs = {k: depthwise_pairs(indices, shape, x.batch_size, k) for k in self.kernel_sizes()}
        for norm, attn, ffn in zip(self.norm_layers, self.attn_layers, self.cffn_layers):
            features = features + attn(norm(features), segments)
            features = ffn(features, pairs)
        return SparseConvTensor(features, indices, shape, x.batch_size)


class AttentionPillarPool(nn.Module):
    """Each BEV column's voxels pooled into one feature by attention (the reference's ``AttnPillarPool``).

    Args:
        channels: C.
        pillar_size: z cells of the input (all in one column), the length of the z embedding.
        num_heads: attention heads.
    """

    def __init__(self, channels: int, pillar_size: int, num_heads: int = 8) -> None:
        super().__init__()
        self.pillar_size = pillar_size
        self.norm = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.pos_embedding = nn.Embedding(pillar_size, channels)
        nn.init.normal_(self.pos_embedding.weight, std=0.01)

    def forward(self, indices: torch.Tensor, features: torch.Tensor, shape: tuple[int, int, int],
                batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(M, 4) (batch, z, y, x) voxels with (M, C) features in a (Z, H, W) grid, Z = ``pillar_size``
        -> (P, 3) int32 sorted (batch, y, x) columns and their (P, C) features."""
        idx = indices.long()
        columns, pillar = unique_coords(idx[:, [0, 2, 3]], (batch_size, shape[1], shape[2]))
        p, c = len(columns), features.shape[1]
        query = scatter_max(features, pillar, p).clamp(min=0)  # spconv's max pool starts from 0
        values = features.new_zeros(p, self.pillar_size, c)
        values[pillar, idx[:, 1]] = features
        padding = torch.ones(p, self.pillar_size, dtype=torch.bool, device=features.device)
        padding[pillar, idx[:, 1]] = False
        keys = values + self.pos_embedding.weight[None]
        out = self.self_attn(query[:, None], keys, values, key_padding_mask=padding, need_weights=False)[0][:, 0]
        return columns, self.norm(out + query)


class ScatterFormerBackbone(nn.Module):
    """ScatterFormer's 3D backbone: voxels to one feature per occupied BEV column at stride 2.

    Args:
        in_channels: voxel features from the voxel encoder.
        channels: C of every layer (``FEATURE_DIM``).
        window_size: window side in cells (``WIN_SIZE``); the CWI convolutions span ``window_size + 1``.
        pillar_size: z cells left after the two z halvings, which the pooling covers in one column:
            ``(grid z cells + 1) // 4`` in the reference (8 on Waymo's 32, 10 on nuScenes' 40);
            checked against the grid at the first forward.
        num_heads: heads of the scattered attention (4 in the reference).
        num_layers: layers per block (3 in the reference).
        pool_heads: heads of the pillar pooling (8 in the reference).
        bn_momentum: BatchNorm momentum (0.01 in the reference).

    Input: ``SparseVoxels`` (M voxels). Output: ``SparseBEV`` at stride 2 with ``channels`` features
    per occupied cell, cells sorted.
    """

    stride = STRIDE

    def __init__(self, in_channels: int, channels: int = 128, window_size: int = 12, pillar_size: int = 8,
                 num_heads: int = 4, num_layers: int = 3, pool_heads: int = 8, bn_momentum: float = 0.01) -> None:
        super().__init__()

        def bn() -> nn.BatchNorm1d:
            return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=bn_momentum)

        blocks = [SparseBasicBlock(channels, indice_key="stem", bias=True) for _ in range(3)]
        for m in (m for block in blocks for m in block.modules()):
            if isinstance(m, nn.BatchNorm1d):
                m.momentum = bn_momentum
        self.cpe = spnn.SparseSequential(
            spnn.SparseSequential(spnn.SubMConv3d(in_channels, channels, 3, padding=1, bias=False, indice_key="subm1"),
                                  bn(), nn.ReLU()),
            *blocks,
            spnn.SparseSequential(spnn.SparseConv3d(channels, channels, (3, 1, 1), stride=(2, 1, 1), padding=0,
                                                    bias=False, indice_key="spconv1"), bn(), nn.ReLU()),
        )
        self.stage1 = spnn.SparseSequential(
            ScatterFormerLayers(channels, num_heads, num_layers, window_size, bn_momentum),
            bn(),
            spnn.SparseConv3d(channels, channels, 3, stride=2, padding=1, bias=False, indice_key="down"),
        )
        self.stage2 = spnn.SparseSequential(ScatterFormerLayers(channels, num_heads, num_layers, window_size, bn_momentum),
                                            bn())
        self.app = AttentionPillarPool(channels, pillar_size, pool_heads)
        self.out_channels = channels

    @staticmethod
    def input_shape(grid: VoxelGrid) -> list[int]:
        """(z, y, x) of the sparse input: the grid's with one more z cell, as the reference."""
        z, y, x = grid.spatial_shape
        return [z + 1, y, x]

    @classmethod
    def output_shape(cls, grid: VoxelGrid) -> tuple[int, int, int]:
        """(Z, H, W) before the pillar pooling: z halved twice, x and y once."""
        z, y, x = cls.input_shape(grid)
        z = (z - 3) // 2 + 1
        return ((z - 1) // 2 + 1, (y - 1) // 2 + 1, (x - 1) // 2 + 1)

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        z, h, w = self.output_shape(voxels.grid)
        if z != self.app.pillar_size:
            raise ValueError(f"{type(self).__name__}: the grid's {voxels.grid.spatial_shape[0]} z voxels leave {z} z "
                             f"cells for the pillar pooling, but pillar_size is {self.app.pillar_size}")
        if len(voxels) == 0:  # spconv cannot convolve an empty tensor; there is nothing to compute
            return SparseBEV(voxels.coords.new_zeros(0, 3), voxels.features.new_zeros(0, self.out_channels), (h, w),
                             STRIDE, voxels.grid, voxels.batch_size)
        x = SparseConvTensor(voxels.features, voxels.coords.int(), self.input_shape(voxels.grid), voxels.batch_size)
        x = self.stage2(self.stage1(self.cpe(x)))
        cells, features = self.app(x.indices, x.features, (z, h, w), voxels.batch_size)
        return SparseBEV(cells, features, (h, w), STRIDE, voxels.grid, voxels.batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return identical_keys(self)
