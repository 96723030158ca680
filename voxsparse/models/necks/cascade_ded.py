"""The dense 2D neck of ScatterFormer's configs: ``CascadeDEDBackbone`` of its authors' OpenPCDet
(``backbones_2d/bev_backbone_ded.py``), a cascade of encoder-decoder (DED) blocks.

A DED block: encoder levels of residual :class:`~voxsparse.models.necks.bev_backbone.BasicBlock` s,
each level after the first starting with a strided block (a 1x1 projection on its identity); then,
from the coarsest level up, a transposed conv (kernel = stride, BatchNorm, ReLU) added to the
finer level's output and normalised by a BatchNorm. Every level has ``channels`` channels; the
output keeps the input's resolution (when the first level's stride is 1) and the cascade repeats
the block ``num_layers`` times.

Modules are laid out as the reference's, so state-dict names are its own (relative to OpenPCDet's
``backbone_2d``). BatchNorm: eps 1e-3, momentum 0.01.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from voxsparse.models.keys import KeyPair
from voxsparse.models.necks.bev_backbone import BN_EPS, BN_MOMENTUM, BasicBlock
from voxsparse.structures import DenseBEV, SparseBEV


class DEDBlock(nn.Module):
    """One encoder-decoder block: (B, in_channels, H, W) -> (B, channels, H / s0, W / s0)."""

    def __init__(self, in_channels: int, channels: int, num_blocks: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        if len(num_blocks) != len(strides) or not strides:
            raise ValueError(f"DEDBlock: num_blocks {list(num_blocks)} and strides {list(strides)} differ in length")
        first = [BasicBlock(in_channels, channels, strides[0], downsample=True)] if in_channels != channels else []
        first += [BasicBlock(channels, channels) for _ in range(num_blocks[0])]
        self.encoder = nn.ModuleList([nn.Sequential(*first)])
        for n, s in zip(num_blocks[1:], strides[1:]):
            self.encoder.append(nn.Sequential(BasicBlock(channels, channels, s, downsample=True),
                                              *[BasicBlock(channels, channels) for _ in range(n)]))
        self.decoder = nn.ModuleList()
        self.decoder_norm = nn.ModuleList()
        for s in reversed(strides[1:]):
            self.decoder.append(nn.Sequential(nn.ConvTranspose2d(channels, channels, s, stride=s, bias=False),
                                              nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM), nn.ReLU()))
            self.decoder_norm.append(nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM))
        for m in self.modules():  # the reference's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        levels = []
        for level in self.encoder:
            x = level(x)
            levels.append(x)
        for up, norm, skip in zip(self.decoder, self.decoder_norm, reversed(levels[:-1])):
            x = norm(up(x) + skip)
        return x


class CascadeDEDBackbone(nn.Module):
    """``num_layers`` :class:`DEDBlock` s on the dense map of the backbone's sparse BEV.

    Args:
        in_channels: channels of the input BEV.
        num_layers: DED blocks in the cascade (``NUM_LAYERS``).
        num_blocks: extra residual blocks per level (``NUM_SBB``).
        strides: each level's stride relative to the one before (``DOWN_STRIDES``); the first must
            be 1 for the output to keep the input's resolution when ``in_channels == channels``.
        channels: channels of every level and of the output (``FEATURE_DIM``).

    Input: :class:`SparseBEV` at stride s. Output: :class:`DenseBEV` (B, channels, H, W) at stride
    ``s * strides[0]``.
    """

    def __init__(self, in_channels: int, num_layers: int = 4, num_blocks: Sequence[int] = (2, 1, 1),
                 strides: Sequence[int] = (1, 2, 2), channels: int = 128) -> None:
        super().__init__()
        if in_channels == channels and strides[0] != 1:
            raise ValueError("CascadeDEDBackbone: with in_channels == channels the first level cannot stride")
        self.layers = nn.ModuleList(
            DEDBlock(in_channels if i == 0 else channels, channels, num_blocks, strides) for i in range(num_layers))
        self.out_channels = channels
        self.first_stride = int(strides[0]) if in_channels != channels else 1

    def forward(self, bev: SparseBEV) -> DenseBEV:
        x = DenseBEV.from_sparse(bev).features
        for layer in self.layers:
            x = layer(x)
        return DenseBEV(x, bev.stride * self.first_stride, bev.grid)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return [KeyPair(key, key) for key in self.state_dict()]
