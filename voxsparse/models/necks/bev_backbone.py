"""OpenPCDet's dense 2D BEV backbones (``backbones_2d/base_bev_backbone.py``, commit 8caccce).

A neck of :class:`~voxsparse.models.detectors.sparse_detector.SparseDetector`: the backbone's
:class:`~voxsparse.structures.SparseBEV` is scattered to a dense map (:meth:`DenseBEV.from_sparse`,
what OpenPCDet's parameter-free ``HeightCompression`` and ``PointPillarScatter3d`` produce from the
same cells), then run through levels of 3x3 convolutions; each level's output is brought to a
common resolution by a transposed convolution (or a strided one when its upsample stride is below
1 or, with ``use_conv_for_no_stride``, equal to 1), and the results are concatenated along channels.

The modules are laid out as the reference's, so their state-dict names are the reference's own
(relative to OpenPCDet's ``backbone_2d``). BatchNorm: eps 1e-3, momentum 0.01, as the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

from voxsparse.models.keys import KeyPair
from voxsparse.structures import DenseBEV, SparseBEV

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _upsampling(in_channels: int, out_channels: int, stride: float, conv_for_one: bool) -> tuple[nn.Sequential, Fraction]:
    """A deblock (conv, BatchNorm, ReLU) and the factor by which it scales the map's resolution."""
    if stride > 1 or (stride == 1 and not conv_for_one):
        factor = int(stride)
        if factor != stride:
            raise ValueError(f"upsample stride {stride}: expected an integer above 1, or 1 / an integer")
        conv: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, factor, stride=factor, bias=False)
        scale = Fraction(factor)
    else:
        factor = round(1 / stride)
        conv = nn.Conv2d(in_channels, out_channels, factor, stride=factor, bias=False)
        scale = Fraction(1, factor)
    return nn.Sequential(conv, _bn(out_channels), nn.ReLU()), scale


class BaseBEVBackbone(nn.Module):
    """OpenPCDet's ``BaseBEVBackbone``: per level a strided 3x3 conv (zero padding 1, no bias) and
    ``layer_nums[i]`` 3x3 convs, each followed by BatchNorm and ReLU; deblocks to a common resolution;
    concatenation; an optional last deblock when ``upsample_strides`` has one entry more than the
    levels.

    Args:
        in_channels: channels of the input BEV.
        layer_nums: extra 3x3 convs per level.
        layer_strides: stride of each level's first conv (relative to the level before).
        num_filters: channels of each level.
        upsample_strides: each level's deblock stride (> 1 or 1: transposed conv; 1 / k: a stride-k
            conv), plus optionally one for the last deblock.
        num_upsample_filters: each level's deblock channels; their sum is ``out_channels``.
        use_conv_for_no_stride: an upsample stride of 1 is a 1x1 conv instead of a transposed conv.

    Input: :class:`SparseBEV` (M cells, ``in_channels``) at stride s (H, W). Output:
    :class:`DenseBEV` (B, ``out_channels``, H', W') at stride ``s * layer_strides[0] /
    upsample_strides[0]`` (divided again by the last deblock's stride where there is one).
    """

    def __init__(
        self,
        in_channels: int,
        layer_nums: Sequence[int],
        layer_strides: Sequence[int],
        num_filters: Sequence[int],
        upsample_strides: Sequence[float],
        num_upsample_filters: Sequence[int],
        use_conv_for_no_stride: bool = False,
    ) -> None:
        super().__init__()
        levels = len(layer_nums)
        if not (levels >= 1 and len(layer_strides) == len(num_filters) == levels):
            raise ValueError("layer_nums, layer_strides and num_filters: expected equal non-empty lengths")
        if len(upsample_strides) not in (levels, levels + 1) or len(num_upsample_filters) != levels:
            raise ValueError(
                f"upsample_strides: expected {levels} or {levels + 1} values and num_upsample_filters "
                f"{levels}, got {len(upsample_strides)} and {len(num_upsample_filters)}"
            )
        inputs = [in_channels, *num_filters[:-1]]
        self.blocks = nn.ModuleList(
            self._level(c_in, c, s, n) for c_in, c, s, n in zip(inputs, num_filters, layer_strides, layer_nums)
        )
        self.deblocks = nn.ModuleList()
        scale = Fraction(1, layer_strides[0])
        for i in range(levels):
            deblock, factor = _upsampling(num_filters[i], num_upsample_filters[i], upsample_strides[i], use_conv_for_no_stride)
            self.deblocks.append(deblock)
            if i == 0:
                scale *= factor
        self.out_channels = sum(num_upsample_filters)
        if len(upsample_strides) > levels:
            deblock, factor = _upsampling(self.out_channels, self.out_channels, upsample_strides[-1], False)
            self.deblocks.append(deblock)
            scale *= factor
        #: Input cells per output cell (a fraction when the neck up-samples past its input).
        self.stride_factor = 1 / scale

    def _level(self, in_channels: int, channels: int, stride: int, extra: int) -> nn.Sequential:
        layers: list[nn.Module] = [
            nn.ZeroPad2d(1),
            nn.Conv2d(in_channels, channels, 3, stride=stride, padding=0, bias=False),
            _bn(channels),
            nn.ReLU(),
        ]
        for _ in range(extra):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), _bn(channels), nn.ReLU()]
        return nn.Sequential(*layers)

    def forward(self, bev: SparseBEV) -> DenseBEV:
        stride = bev.stride * self.stride_factor
        if stride.denominator != 1:
            raise ValueError(f"{type(self).__name__}: a BEV at stride {bev.stride} would come out at stride {stride}")
        x = DenseBEV.from_sparse(bev).features
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        x = torch.cat(ups, dim=1) if len(ups) > 1 else ups[0]
        if len(self.deblocks) > len(self.blocks):
            x = self.deblocks[-1](x)
        return DenseBEV(x, int(stride), bev.grid)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return [KeyPair(key, key) for key in self.state_dict()]


class BasicBlock(nn.Module):
    """Residual block of two 3x3 convs (the first strided), BatchNorm after each, ReLU after the
    first and after the sum; ``downsample``: a strided 1x1 conv + BatchNorm on the identity."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, downsample: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = _bn(channels)
        self.relu2 = nn.ReLU()
        self.downsample = downsample
        if downsample:
            self.downsample_layer = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), _bn(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = self.downsample_layer(x) if self.downsample else x
        return self.relu2(out + identity)


class BaseBEVResBackbone(BaseBEVBackbone):
    """OpenPCDet's ``BaseBEVResBackbone``: :class:`BaseBEVBackbone` whose levels are residual
    blocks: a :class:`BasicBlock` with stride ``layer_strides[i]`` and a 1x1 projection of the
    identity (always, even at stride 1 with equal channels), then ``layer_nums[i]`` plain
    :class:`BasicBlock` s. Upsample strides of 1 are transposed convs (the reference has no
    ``use_conv_for_no_stride`` here)."""

    def __init__(
        self,
        in_channels: int,
        layer_nums: Sequence[int],
        layer_strides: Sequence[int],
        num_filters: Sequence[int],
        upsample_strides: Sequence[float],
        num_upsample_filters: Sequence[int],
    ) -> None:
        super().__init__(in_channels, layer_nums, layer_strides, num_filters, upsample_strides, num_upsample_filters)

    def _level(self, in_channels: int, channels: int, stride: int, extra: int) -> nn.Sequential:
        return nn.Sequential(
            BasicBlock(in_channels, channels, stride, downsample=True),
            *[BasicBlock(channels, channels) for _ in range(extra)],
        )
