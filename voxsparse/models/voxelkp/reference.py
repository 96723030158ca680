"""The VoxelKP backbone as the authors' code computes it (``VoxelResBackBone8xVoxelNeXtEffv2Next4`` of
``backbones_3d/spconv_backbone_voxelnext_deBEV_effv2next4.py``, paper config
``kp_effv2next4_voxelnext_iou_aug_bev_channel.yaml``), exactly.

Where the paper's four modules are in that code:

- *selective kernels*: :class:`SelectiveKernelConv` (their ``SparseSKConv``): a 3x3x3 and a 5x5x5
  submanifold branch (BatchNorm + ReLU each), their sum averaged over each frame's voxels, squeezed
  (linear to C/8, BatchNorm, ReLU) and excited into two C-vectors, softmax across the two branches:
  per frame and channel weights of each branch. It sits in the middle of a residual block
  (:class:`SelectiveKernelBlock`, their ``SparseSKBlock``): conv-BN-ReLU, selective kernels,
  conv-BN, + input, ReLU; these blocks replace the residual blocks from stride 4 on;
- *hybrid feature learning*: :class:`PointMLPResidual` (their ``MLPResidual``): a stage's blocks
  plus a per-voxel MLP (three linear-BatchNorm-ReLU layers) of the stage's input, summed;
- *sparse box attention*: :class:`WindowAttentionBlock` (their ``SparseAttentionBlock`` over SpTr's
  ``VarLengthMultiheadSA``): pre-LayerNorm multi-head self-attention among the voxels of fixed
  ``window`` x ``window`` x ``window``-voxel boxes, then a pre-LayerNorm GELU MLP, both residual; the
  boxes tile each stage's grid from the smallest (z, y, x) index present in the batch (SpTr windows
  with ``torch_geometric``'s ``voxel_grid`` and no start); after each selective-kernel block of the
  stride-16 and stride-32 stages;
- *spatial encoding*: in the projection to BEV (:meth:`VoxelKPReferenceBackbone.bev_fusion`): the
  stride-8, 16 and 32 voxels are each reduced over their whole height by a (depth, 1, 1) sparse conv
  (BatchNorm, ReLU); the stride-16 and -32 cells land at ``2 i + 1`` and ``4 i + 2`` of the
  stride-8 grid (y and x) with height indices 1 and 2, every cell's features are multiplied by
  ``(height index + 1) / 1`` (so the three scales weigh 1, 2 and 3), and cells on the same (y, x)
  are summed.

Then a 3x3 *regular* (not submanifold) sparse 2D conv (its output dilates the active cells by one)
+ BatchNorm + ReLU, and a submanifold 3x3 2D conv with a bias + BatchNorm (PyTorch's defaults) +
ReLU (``shared_conv``). Every other BatchNorm is eps 1e-3, momentum 0.01 except the squeeze's and the
MLP path's (PyTorch's defaults); LayerNorms eps 1e-5; residual-block convs carry biases; the input
grid has one more z cell than the voxel grid (``grid_size[::-1] + [1, 0, 0]``).

Parameter names: :meth:`VoxelKPReferenceBackbone.openpcdet_keys` maps ours (``stem``, ``stages.i``,
``bev_levels.i``, ``bev_conv``, ``bev_subm``) to theirs (``conv_input``, ``conv{i+1}``,
``conv{4,5,6}_bev``, ``conv_out``, ``shared_conv``); inside a stage the module tree is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxsparse.models.backbones.voxelnext import SparseBasicBlock
from voxsparse.models.keys import KeyPair, identical_keys
from voxsparse.models.voxelkp.box_attention import grouped_attention
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import SparseBEV, SparseVoxels, VoxelGrid

#: The authors' BatchNorm settings for the convolutional layers.
REFERENCE_BN_EPS = 1e-3
REFERENCE_BN_MOMENTUM = 0.01


def _norm(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=REFERENCE_BN_EPS, momentum=REFERENCE_BN_MOMENTUM)


def frame_means(features: torch.Tensor, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, C) mean of each frame's rows of (M, C) ``features`` (``batch``: (M,) frame of each row);
    NaN for a frame without rows. ``torch.mean`` per frame, as the reference: its rounding matters,
    since in training the squeeze's BatchNorm normalises over just the B frame means."""
    return torch.stack([features[batch == b].mean(dim=0) for b in range(batch_size)])


class SelectiveKernelConv(spnn.SparseModule):
    """Selective kernels over a 3x3x3 and a 5x5x5 submanifold branch (the authors' ``SparseSKConv``).

    Args:
        channels: C (in and out).
        indice_key: of the 3x3x3 branch (the 5x5x5 uses ``indice_key + "_sk5"``).
        ratio: the squeeze keeps ``C // ratio`` channels.

    Input and output: a sparse tensor with (M, C) features.
    """

    def __init__(self, channels: int, indice_key: str, ratio: int = 8) -> None:
        super().__init__()
        self.conv1 = spnn.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn1 = _norm(channels)
        self.conv2 = spnn.SubMConv3d(channels, channels, 5, padding=2, bias=False, indice_key=indice_key + "_sk5")
        self.bn2 = _norm(channels)
        self.relu = nn.ReLU()
        squeezed = channels // ratio
        self.squeeze = nn.Sequential(nn.Linear(channels, squeezed, bias=False), nn.BatchNorm1d(squeezed),
                                     nn.ReLU(inplace=True))
        self.excitation3 = nn.Linear(squeezed, channels, bias=False)
        self.excitation5 = nn.Linear(squeezed, channels, bias=False)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        out3 = self.relu(self.bn1(self.conv1(x).features))
        out5 = self.relu(self.bn2(self.conv2(x).features))
        batch = x.indices[:, 0].long()
        summary = self.squeeze(frame_means(out3 + out5, batch, x.batch_size))
        weights = torch.softmax(torch.stack([self.excitation3(summary), self.excitation5(summary)], dim=1), dim=1)
        return x.replace_feature(out3 * weights[batch, 0] + out5 * weights[batch, 1])


class SelectiveKernelBlock(SparseBasicBlock):
    """Residual block with selective kernels between its two 3x3x3 convs (the authors' ``SparseSKBlock``):
    ``relu(bn2(conv2(SK(relu(bn1(conv1 x))))) + x)``; the convs carry biases."""

    def __init__(self, channels: int, indice_key: str) -> None:
        super().__init__(channels, indice_key, bias=True)
        for bn in (self.bn1, self.bn2):
            bn.momentum = REFERENCE_BN_MOMENTUM
        self.sk = SelectiveKernelConv(channels, indice_key)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        mid = self.conv1(x)
        mid = self.sk(mid.replace_feature(self.act1(self.bn1(mid.features))))
        out = self.conv2(mid)
        return out.replace_feature(self._add_identity(out.features, x.features))

    def forward_features(self, features: torch.Tensor, pairs: dict) -> torch.Tensor:
        raise NotImplementedError("selective-kernel blocks run layer by layer only")


class PointMLPResidual(spnn.SparseModule):
    """A stage's blocks plus a per-voxel MLP of their input (the authors' ``MLPResidual``):
    ``voxel_conv(x) + MLP(x)``, the MLP three (linear, BatchNorm, ReLU) layers of C channels.

    The MLP is ``point_conv.{0,1,2, 3,4,5, 6,7,8}`` as theirs (a ``SparseSequential`` there, applied to
    the features).
    """

    def __init__(self, voxel_conv: nn.Module, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(channels, channels), nn.BatchNorm1d(channels), nn.ReLU(inplace=True)]
        self.point_conv = nn.Sequential(*layers)
        self.voxel_conv = voxel_conv

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        point = self.point_conv(x.features)
        voxel = self.voxel_conv(x)
        return voxel.replace_feature(point + voxel.features)

    def openpcdet_keys(self) -> list[KeyPair]:
        pairs = identical_keys(self.point_conv)
        pairs = [KeyPair(f"point_conv.{p.ours}", f"point_conv.{p.theirs}", p.kind) for p in pairs]
        for i, block in enumerate(self.voxel_conv):
            inner = block.openpcdet_keys() if hasattr(block, "openpcdet_keys") else identical_keys(block)
            pairs += [KeyPair(f"voxel_conv.{i}.{p.ours}", f"voxel_conv.{i}.{p.theirs}", p.kind) for p in inner]
        return pairs


def window_index(coords: torch.Tensor, window: int) -> torch.Tensor:
    """(M,) int64 id of the ``window``-voxel cube each voxel lies in, cubes tiling from the smallest
    (z, y, x) index present (per axis, over the batch), frames apart (SpTr's windows).

    Args:
        coords: (M, 4) int (batch, z, y, x).
    """
    c = coords.long()
    cell = torch.div(c[:, 1:] - c[:, 1:].min(0).values, window, rounding_mode="floor")
    extent = cell.max(0).values + 1
    return ((c[:, 0] * extent[0] + cell[:, 0]) * extent[1] + cell[:, 1]) * extent[2] + cell[:, 2]


class WindowAttentionBlock(spnn.SparseModule):
    """Sparse box attention as the authors' ``SparseAttentionBlock`` computes it:

        y = x + proj(MHA_window(q = Wq LN1(x), k = Wk LN1(x), v = Wv LN1(x)))
        out = y + MLP(LN2(y)),    MLP = linear, GELU, linear (C -> C -> C)

    attention within cubes of ``window`` voxels (:func:`window_index`), no positional term, scores
    scaled by ``(C / heads) ** -0.5``.

    Args:
        channels: C; num_heads: attention heads; window: cube edge in voxels.
    """

    def __init__(self, channels: int, num_heads: int, window: int = 6) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels {channels} must be divisible by num_heads {num_heads}")
        self.num_heads, self.window = num_heads, window
        self.norm1 = nn.LayerNorm(channels)
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        h = self.norm1(x.features)
        group = window_index(x.indices, self.window)
        attended = grouped_attention(self.q(h), self.k(h), self.v(h), group, self.num_heads)
        y = x.features + self.proj(attended)
        return x.replace_feature(y + self.mlp(self.norm2(y)))

    def openpcdet_keys(self) -> list[KeyPair]:
        """``attn.attn.{q,k,v,proj}``, ``norm{1,2}.ln``, ``mlp.{0,2}`` in the reference."""
        rename = {"norm1.": "norm1.ln.", "norm2.": "norm2.ln.", "q.": "attn.attn.q.", "k.": "attn.attn.k.",
                  "v.": "attn.attn.v.", "proj.": "attn.attn.proj.", "mlp.": "mlp."}
        pairs = []
        for key in self.state_dict():
            prefix = next(p for p in rename if key.startswith(p))
            pairs.append(KeyPair(key, rename[prefix] + key[len(prefix):]))
        return pairs


def _down(in_channels: int, out_channels: int, kernel_size: int, indice_key: str) -> spnn.SparseSequential:
    """Stride-2 sparse conv (padding ``k // 2``, no bias) + BatchNorm + ReLU (their ``post_act_block``)."""
    return spnn.SparseSequential(
        spnn.SparseConv3d(in_channels, out_channels, kernel_size, stride=2, padding=kernel_size // 2, bias=False,
                          indice_key=indice_key),
        _norm(out_channels), nn.ReLU(),
    )


class VoxelKPReferenceBackbone(nn.Module):
    """The authors' VoxelKP backbone; see the module docstring for what it computes.

    Args:
        in_channels: voxel feature channels.
        channels: ``CHANNELS`` (five: strides 1, 2, 4, 8 and 16/32, the last two stages share it).
        out_channels: ``OUT_CHANNEL`` (BEV channels).
        down_kernel_sizes: ``SPCONV_KERNEL_SIZES`` (the stride-2 convs of stages 2, 3, 4 and 5; stage 6
            reuses the last).
        bev_depth: ``BEV_DEPTH``: height of the stride-8, 16 and 32 grids (the (depth, 1, 1) convs'
            kernels; the input grid's height must reduce to exactly these).
        num_heads: ``NUM_ATTENTION_HEADS``; window_size: ``ATTENTION_WINDOW_SIZE`` (stride 16, 32).

    Input: ``SparseVoxels``. Output: ``SparseBEV`` (stride 8) with ``out_channels`` features.
    """

    stride = 8

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (16, 32, 64, 128, 128),
        out_channels: int = 128,
        down_kernel_sizes: Sequence[int] = (3, 3, 3, 3),
        bev_depth: Sequence[int] = (8, 4, 2),
        num_heads: int = 4,
        window_size: Sequence[int] = (6, 6),
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(down_kernel_sizes) != 4 or len(bev_depth) != 3 or len(window_size) != 2:
            raise ValueError("expected 5 channels, 4 down_kernel_sizes, 3 bev_depth and 2 window_size values, got "
                             f"{list(channels)}, {list(down_kernel_sizes)}, {list(bev_depth)}, {list(window_size)}")
        c, k = list(channels), list(down_kernel_sizes)
        self.out_channels = out_channels
        self.bev_depth = tuple(int(d) for d in bev_depth)
        self.down_kernel_sizes = tuple(int(size) for size in k)
        self.stem = spnn.SparseSequential(
            spnn.SubMConv3d(in_channels, c[0], 3, padding=1, bias=False, indice_key="subm1"), _norm(c[0]), nn.ReLU(),
        )

        def basic(ch: int, key: str) -> SparseBasicBlock:
            block = SparseBasicBlock(ch, key, bias=True)
            block.bn1.momentum = block.bn2.momentum = REFERENCE_BN_MOMENTUM
            return block

        def hybrid(ch: int, key: str, window: int | None) -> PointMLPResidual:
            if window is None:
                blocks = [SelectiveKernelBlock(ch, key), SelectiveKernelBlock(ch, key)]
            else:
                blocks = [SelectiveKernelBlock(ch, key), WindowAttentionBlock(ch, num_heads, window),
                          SelectiveKernelBlock(ch, key), WindowAttentionBlock(ch, num_heads, window)]
            return PointMLPResidual(spnn.SparseSequential(*blocks), ch)

        self.stages = nn.ModuleList([
            spnn.SparseSequential(basic(c[0], "res1"), basic(c[0], "res1")),
            spnn.SparseSequential(_down(c[0], c[1], k[0], "spconv2"), basic(c[1], "res2"), basic(c[1], "res2")),
            spnn.SparseSequential(_down(c[1], c[2], k[1], "spconv3"), hybrid(c[2], "res3", None)),
            spnn.SparseSequential(_down(c[2], c[3], k[2], "spconv4"), hybrid(c[3], "res4", None)),
            spnn.SparseSequential(_down(c[3], c[4], k[3], "spconv5"), hybrid(c[4], "res5", window_size[0])),
            spnn.SparseSequential(_down(c[4], c[4], k[3], "spconv6"), hybrid(c[4], "res6", window_size[1])),
        ])
        self.bev_levels = nn.ModuleList([
            spnn.SparseSequential(
                spnn.SparseConv3d(ch, out_channels, (depth, 1, 1), bias=False, indice_key=f"conv{i + 4}_bev"),
                _norm(out_channels), nn.ReLU(),
            )
            for i, (ch, depth) in enumerate(zip((c[3], c[4], c[4]), self.bev_depth))
        ])
        self.bev_conv = spnn.SparseSequential(
            spnn.SparseConv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False,
                              indice_key="spconv_down_xy2"),
            _norm(out_channels), nn.ReLU(),
        )
        self.bev_subm = spnn.SparseSequential(
            spnn.SubMConv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=True),
            nn.BatchNorm1d(out_channels), nn.ReLU(True),
        )

    @staticmethod
    def input_shape(grid: VoxelGrid) -> list[int]:
        """(z, y, x) of the sparse input: the grid's with one more z cell, as the reference."""
        z, y, x = grid.spatial_shape
        return [z + 1, y, x]

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        if len(voxels) == 0:  # spconv cannot convolve an empty tensor; there is nothing to compute
            return SparseBEV(voxels.coords.new_zeros(0, 3), voxels.features.new_zeros(0, self.out_channels),
                             self._bev_shape(voxels.grid), self.stride, voxels.grid, voxels.batch_size)
        x = SparseConvTensor(voxels.features, voxels.coords.int(), self.input_shape(voxels.grid), voxels.batch_size)
        x = self.stem(x)
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        bev = self.bev_fusion(outputs[3:])
        bev = self.bev_subm(self.bev_conv(bev))
        h, w = bev.spatial_shape
        return SparseBEV(bev.indices, bev.features, (h, w), self.stride, voxels.grid, voxels.batch_size)

    def _bev_shape(self, grid: VoxelGrid) -> tuple[int, int]:
        """(H, W) of the stride-8 grid: three stride-2 convs with padding ``k // 2``."""
        _, h, w = self.input_shape(grid)
        for k in self.down_kernel_sizes[:3]:
            h, w = (h + 2 * (k // 2) - k) // 2 + 1, (w + 2 * (k // 2) - k) // 2 + 1
        return h, w

    def bev_fusion(self, levels: Sequence[SparseConvTensor]) -> SparseConvTensor:
        """The stride-8, 16 and 32 voxels reduced over height and summed on the stride-8 BEV grid
        with scale weights 1, 2, 3 (the reference's ``bev_conv`` + ``bev_out``)."""
        reduced = [module(level) for module, level in zip(self.bev_levels, levels)]
        shapes = [r.spatial_shape[0] for r in reduced]
        if shapes != [1, 1, 1]:
            raise ValueError(f"bev_depth {list(self.bev_depth)} does not reduce the grid heights to 1 "
                             f"(got {shapes}); the input grid's height does not fit this backbone")
        coords, feats = [], []
        for scale, r in enumerate(reduced):  # scale 0, 1, 2: strides 8, 16, 32
            c = r.indices[:, [0, 2, 3]].clone()
            c[:, 1:] = c[:, 1:] * 2**scale + 2**scale // 2
            coords.append(c)
            # The reference gives the scales height indices 0, 1, 2 and weighs by (index + 1).
            feats.append(r.features * float(scale + 1))
        unique, inverse = torch.unique(torch.cat(coords), dim=0, return_inverse=True)
        cat = torch.cat(feats)
        summed = cat.new_zeros(len(unique), cat.shape[1]).index_add_(0, inverse, cat)
        return SparseConvTensor(summed, unique, list(reduced[0].spatial_shape[1:]), reduced[0].batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry under its name in the authors' backbone (relative to ``backbone_3d.``)."""
        parts = [("stem.", "conv_input.", self.stem), ("bev_conv.", "conv_out.", self.bev_conv),
                 ("bev_subm.", "shared_conv.", self.bev_subm)]
        parts += [(f"stages.{i}.", f"conv{i + 1}.", s) for i, s in enumerate(self.stages)]
        parts += [(f"bev_levels.{i}.", f"conv{i + 4}_bev.", m) for i, m in enumerate(self.bev_levels)]
        pairs = []
        for ours, theirs, module in parts:
            for name, child in module.named_children():
                inner = child.openpcdet_keys() if hasattr(child, "openpcdet_keys") else identical_keys(child)
                pairs += [KeyPair(f"{ours}{name}.{p.ours}", f"{theirs}{name}.{p.theirs}", p.kind) for p in inner]
        return pairs
