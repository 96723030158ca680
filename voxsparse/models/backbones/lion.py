"""LION: a linear group RNN backbone over sparse voxels (Liu et al., "LION: Linear Group RNN for 3D
Object Detection in Point Clouds", NeurIPS 2024; reference: ``LION3DBackboneOneStride`` of the
authors' OpenPCDet fork, ``pcdet/models/backbones_3d/lion_backbone_one_stride.py``).

The backbone keeps one BEV resolution throughout (stride 1) and spends its depth on z:

- stages ``linear_1`` .. ``linear_S`` (:class:`LIONBlock`): a small U-Net of LION layers. Down the U,
  each level adds a learned embedding of the voxel position, runs a LION layer, and merges voxels
  2x2x2 (:class:`PatchMerging3D`); up the U, a LION layer, then each fine voxel adds its coarse
  voxel's features (voxel expanding) and a LayerNorm.
- a LION layer (:class:`LIONLayer`) groups voxels along the X order, runs a linear RNN block
  (:mod:`~voxsparse.models.backbones.lion_operators`) over every group, then regroups along the Y order
  and runs a second block; the second layer of each pair shifts its windows by half a window.
- between stages, ``dowS`` (:class:`PatchMerging3D` with voxel generation) halves z: a submanifold
  3x3x3 conv (the 3D spatial feature descriptor), then empty voxels are generated beside the
  20 % most foreground-like voxels of each frame, and voxels are merged (summed) to the coarser grid.
- ``linear_out``: one more LION layer (windows 13 x 13 x 2, groups of 256 by default).

The output is height-compressed as OpenPCDet's ``HeightCompression`` (channel ``c * D + z``) into a
:class:`SparseBEV` at stride 1, for a dense 2D neck and head.

Parameter names are the reference's, so its checkpoints convert with equal keys
(:meth:`LIONBackbone.openpcdet_keys`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from voxsparse.models.backbones.lion_operators import NUMBERED, OPERATORS
from voxsparse.models.backbones.lion_partition import (
    generate_voxels,
    group_partition,
    merge_coords,
    window_order,
)
from voxsparse.models.backbones.resnet3d import height_compression
from voxsparse.models.keys import KeyPair, identical_keys
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import sum_rows
from voxsparse.structures import SparseBEV, SparseVoxels

#: The reference's angle scale of normalised positions (a rounded 2 pi).
_TWO_PI = 2 * 3.1415


@dataclass(frozen=True)
class Level:
    """Voxels of one resolution inside the backbone.

    Attributes:
        coords: (M, 4) int32 (batch, z, y, x).
        features: (M, C).
        spatial_shape: (Z, Y, X).
        batch_size: frames.
    """

    coords: torch.Tensor
    features: torch.Tensor
    spatial_shape: tuple[int, int, int]
    batch_size: int

    def with_features(self, features: torch.Tensor) -> Level:
        return dataclasses.replace(self, features=features)


class LIONLayer(nn.Module):
    """One block per direction, each over the voxels grouped along that direction's order.

    Args:
        channels: C.
        window_shape: (wx, wy, wz) voxels.
        group_size: voxels per group.
        directions: orders of the blocks, e.g. ``("x", "y")``.
        shift: windows shifted by half their size.
        operator: ``{"NAME": "Mamba" | "RetNet" | "RWKV", "CFG": {...}}`` (the reference config's ``OPERATOR``).
        layer_id, n_layer: index of the first block among the backbone's ``n_layer`` blocks (the
            directions' blocks take consecutive ones; only RWKV's initialisation uses them).
    """

    def __init__(
        self, channels: int, window_shape: Sequence[int], group_size: int, directions: Sequence[str], shift: bool,
        operator: Mapping[str, Any], layer_id: int = 0, n_layer: int = 1,
    ) -> None:
        super().__init__()
        self.window_shape = tuple(int(w) for w in window_shape)
        self.group_size = int(group_size)
        self.directions = tuple(directions)
        self.shift = bool(shift)
        self.blocks = nn.ModuleList(_operator(operator, channels, layer_id + i, n_layer) for i in range(len(self.directions)))

    def forward(self, level: Level) -> Level:
        features = level.features
        for direction, block in zip(self.directions, self.blocks):
            order = window_order(level.coords, level.spatial_shape, self.window_shape, level.batch_size, direction,
                                 self.shift)
            groups = group_partition(order, level.coords[:, 0], level.batch_size, self.group_size)
            features = groups.scatter(block(groups.gather(features)))
        return level.with_features(features)


def _operator(operator: Mapping[str, Any], channels: int, layer_id: int, n_layer: int) -> nn.Module:
    name = operator["NAME"]
    if name not in OPERATORS:
        raise ValueError(f"LION operator: {name!r} is not one of {sorted(OPERATORS)}")
    settings = {k: v for k, v in dict(operator.get("CFG", {})).items() if k not in _IGNORED_SETTINGS}
    if name in NUMBERED:
        settings.update(layer_id=layer_id, n_layer=n_layer)
    return OPERATORS[name](d_model=channels, **settings)


#: Reference operator settings that change no result: gradient checkpointing and RetNet's only mode.
_IGNORED_SETTINGS = ("with_cp", "mode", "used_MLP")


class PositionEmbedding(nn.Module):
    """Learned embedding of a voxel's position in the grid: Linear(3, C), BatchNorm, ReLU, Linear(C, C).

    Positions are centred on the grid and scaled to about [-pi, pi] per axis.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.position_embedding_head = nn.Sequential(
            nn.Linear(3, channels), nn.BatchNorm1d(channels), nn.ReLU(inplace=True), nn.Linear(channels, channels)
        )

    def forward(self, level: Level) -> torch.Tensor:
        """(M, C) embedding of ``level``'s voxels."""
        sz, sy, sx = level.spatial_shape
        if sz == 1:
            raise ValueError("PositionEmbedding: the reference embeds (x, y, z) only on grids of more than one z cell")
        c = level.coords.to(level.features.dtype)
        xyz = torch.stack([(c[:, 3] - sx / 2) / sx, (c[:, 2] - sy / 2) / sy, (c[:, 1] - sz / 2) / sz], 1) * _TWO_PI
        return self.position_embedding_head(xyz)


class PatchMerging3D(nn.Module):
    """Submanifold 3x3x3 conv + LayerNorm + GELU, optional voxel generation, then voxels summed into
    a grid ``down_scale = (sx, sy, sz)`` times coarser and LayerNorm-ed.

    Args:
        channels: C (in and out).
        down_scale: (sx, sy, sz).
        diffusion: generate voxels (:func:`~voxsparse.models.backbones.lion_partition.generate_voxels`).
        diff_scale: fraction of each frame's voxels that seed generated ones.
    """

    def __init__(self, channels: int, down_scale: Sequence[int], diffusion: bool = False, diff_scale: float = 0.2) -> None:
        super().__init__()
        self.sub_conv = nn.Sequential(
            spnn.SubMConv3d(channels, channels, 3, bias=False, indice_key="subm"), nn.LayerNorm(channels), nn.GELU()
        )
        self.norm = nn.LayerNorm(channels)
        self.down_scale = tuple(int(s) for s in down_scale)
        self.diffusion = bool(diffusion)
        self.diff_scale = float(diff_scale)

    def forward(self, level: Level) -> tuple[Level, torch.Tensor]:
        """The coarse level and (M,) int64 coarse voxel of each of ``level``'s voxels."""
        x = SparseConvTensor(level.features, level.coords.int(), list(level.spatial_shape), level.batch_size)
        features = self.sub_conv[2](self.sub_conv[1](self.sub_conv[0](x).features))
        coords = level.coords
        if self.diffusion:
            coords, features = generate_voxels(coords, features, level.batch_size, level.spatial_shape, self.diff_scale)
        merged = merge_coords(coords, level.spatial_shape, self.down_scale, level.batch_size)
        summed = sum_rows(features, merged.inverse, len(merged.coords))
        coarse = Level(merged.coords, self.norm(summed), merged.spatial_shape, level.batch_size)
        return coarse, merged.inverse[: len(level.coords)]


class LIONBlock(nn.Module):
    """A U of LION layers: ``depth`` levels down (position embedding, layer, merge), then up (layer,
    add the coarse voxel's features, LayerNorm). The second layer of each pair shifts its windows.

    Args:
        channels: C.
        depth: levels.
        down_scales: (depth,) merge scale (sx, sy, sz) per level.
        window_shape, group_size, directions, operator: of every layer (:class:`LIONLayer`).
        shift: shift the windows of the second layer of each level pair.
        layer_id, n_layer: index of the block's first operator block among the backbone's ``n_layer``;
            the reference numbers the layers down the U by twos from it, then those up the U.
    """

    def __init__(
        self, channels: int, depth: int, down_scales: Sequence[Sequence[int]], window_shape: Sequence[int],
        group_size: int, directions: Sequence[str], shift: bool, operator: Mapping[str, Any], layer_id: int = 0,
        n_layer: int = 1,
    ) -> None:
        super().__init__()
        if len(down_scales) != depth:
            raise ValueError(f"LIONBlock: {len(down_scales)} down_scales for depth {depth}")
        shifts = [False, shift] + [shift] * (depth - 2)

        def layer(i: int, first: int) -> LIONLayer:
            return LIONLayer(channels, window_shape, group_size, directions, shifts[i], operator, first, n_layer)

        self.encoder = nn.ModuleList(layer(i, layer_id + 2 * i) for i in range(depth))
        self.pos_emb_list = nn.ModuleList(PositionEmbedding(channels) for _ in range(depth))
        self.downsample_list = nn.ModuleList(PatchMerging3D(channels, s) for s in down_scales)
        self.decoder = nn.ModuleList(layer(i, layer_id + 2 * (i + depth)) for i in range(depth))
        self.decoder_norm = nn.ModuleList(nn.LayerNorm(channels) for _ in range(depth))

    def forward(self, level: Level) -> Level:
        skips: list[tuple[Level, torch.Tensor]] = []
        for encode, embed, merge in zip(self.encoder, self.pos_emb_list, self.downsample_list):
            level = encode(level.with_features(level.features + embed(level)))
            coarse, inverse = merge(level)
            skips.append((level, inverse))
            level = coarse
        for decode, norm, (fine, inverse) in zip(self.decoder, self.decoder_norm, reversed(skips)):
            level = decode(level)
            level = fine.with_features(norm(fine.features + level.features[inverse]))
        return level


class LIONBackbone(nn.Module):
    """LION's one-stride 3D backbone with height compression to a stride-1 sparse BEV.

    Args:
        in_channels: voxel feature width; must equal ``channels`` (the reference has no input layer).
        channels: C of every stage (the reference's ``FEATURE_DIM`` / ``LAYER_DIM``).
        depths: (S,) levels of each stage's U.
        layer_down_scales: (S, depth, 3) merge scales (sx, sy, sz) inside each stage.
        window_shape: (S, 3) windows (wx, wy, wz) of each stage.
        group_size: (S,) voxels per group of each stage.
        directions: orders of each layer's blocks.
        diffusion: voxel generation in the merges between stages.
        diff_scale: fraction of voxels that seed generated ones.
        shift: shift the windows of every second layer (and of ``linear_out``).
        operator: ``{"NAME": "Mamba" | "RetNet" | "RWKV", "CFG": {...}}``, the reference config's ``OPERATOR``.
        num_bev_features: output channels, C x the z cells left after the S merges between stages.
        out_window_shape, out_group_size: of ``linear_out``.
        stage_down_scale: the merge between stages (sx, sy, sz), (1, 1, 2) in the reference.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        depths: Sequence[int],
        layer_down_scales: Sequence[Sequence[Sequence[int]]],
        window_shape: Sequence[Sequence[int]],
        group_size: Sequence[int],
        operator: Mapping[str, Any],
        num_bev_features: int,
        directions: Sequence[str] = ("x", "y"),
        diffusion: bool = True,
        diff_scale: float = 0.2,
        shift: bool = True,
        out_window_shape: Sequence[int] = (13, 13, 2),
        out_group_size: int = 256,
        stage_down_scale: Sequence[int] = (1, 1, 2),
    ) -> None:
        super().__init__()
        stages = len(depths)
        if in_channels != channels:
            raise ValueError(f"LIONBackbone: in_channels {in_channels} must equal channels {channels} (no input layer)")
        if not stages == len(layer_down_scales) == len(window_shape) == len(group_size):
            raise ValueError("LIONBackbone: depths, layer_down_scales, window_shape and group_size need one entry per stage")
        self.num_stages = stages
        self.out_channels = int(num_bev_features)
        self.stage_down_scale = tuple(int(s) for s in stage_down_scale)
        operator = {"NAME": operator["NAME"], "CFG": dict(operator.get("CFG", {}))}
        # Operator blocks are numbered as the reference numbers them: stage i from 8 i (the 4 x depth
        # blocks of a depth-2 stage), linear_out after the last stage, out of S x depth_1 x 4 + 2.
        firsts = [8 * i for i in range(stages + 1)]
        n_layer = stages * depths[0] * 4 + 2
        for i in range(stages):  # the reference's names: linear_1, dow1, linear_2, dow2, ...
            setattr(self, f"linear_{i + 1}", LIONBlock(channels, depths[i], layer_down_scales[i], window_shape[i],
                                                       group_size[i], directions, shift, operator, firsts[i], n_layer))
            setattr(self, f"dow{i + 1}", PatchMerging3D(channels, stage_down_scale, diffusion, diff_scale))
        self.linear_out = LIONLayer(channels, out_window_shape, out_group_size, ("x", "y"), shift, operator,
                                    firsts[-1], n_layer)

    @property
    def stride(self) -> int:
        return 1

    def output_depth(self, z: int) -> int:
        """z cells of the output for ``z`` input cells."""
        for _ in range(self.num_stages):
            z = math.ceil(z / self.stage_down_scale[2])
        return z

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        sz, sy, sx = voxels.grid.spatial_shape
        depth = self.output_depth(sz)
        if self.out_channels % depth or self.stage_down_scale[:2] != (1, 1):
            raise ValueError(f"{type(self).__name__}: num_bev_features {self.out_channels} is not C x the "
                             f"{depth} output z cells, or the stage merges change x / y")
        if len(voxels) == 0:
            return SparseBEV(voxels.coords.new_zeros(0, 3), voxels.features.new_zeros(0, self.out_channels), (sy, sx),
                             1, voxels.grid, voxels.batch_size)
        level = Level(voxels.coords.int(), voxels.features, (sz, sy, sx), voxels.batch_size)
        for i in range(self.num_stages):
            level, _ = getattr(self, f"dow{i + 1}")(getattr(self, f"linear_{i + 1}")(level))
        level = self.linear_out(level)
        bev = height_compression(level.coords, level.features, level.spatial_shape, voxels.grid, voxels.batch_size)
        return dataclasses.replace(bev, stride=1)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return identical_keys(self)

