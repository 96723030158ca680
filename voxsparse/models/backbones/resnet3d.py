"""OpenPCDet's ``VoxelResBackBone8x`` (``backbones_3d/spconv_backbone.py``, commit 8caccce), the 3D
backbone of CenterPoint's nuScenes model (``cbgs_voxel0075_res3d_centerpoint.yaml``), and
``HeightCompression`` (``map_to_bev/height_compression.py``) as a sparse BEV.

A SECOND-style sparse ResNet: a submanifold stem (16 channels), four stages (16, 32, 64, 128
channels; the last three start with a stride-2 sparse conv, the fourth with no z padding), two
residual blocks each (their convs carry biases), and ``conv_out``, a (3, 1, 1) conv of stride
(2, 1, 1) without padding that halves z once more. The input grid gets one more z cell on top, as
OpenPCDet's ``sparse_shape = grid_size[::-1] + [1, 0, 0]``: on nuScenes' 40 z voxels, z goes
41 -> 21 -> 11 -> 5 -> 2. BatchNorm: eps 1e-3, momentum 0.01.

Height compression: OpenPCDet densifies the (B, C, D, H, W) output and views it as (B, C * D, H, W),
channel ``c * D + d``. Here the occupied (b, y, x) cells carry those C * D values (zeros for empty
z cells) as a :class:`SparseBEV`; a dense neck's :meth:`DenseBEV.from_sparse` then gives the
reference's map exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from voxsparse.models.backbones.voxelnext import SparseBasicBlock
from voxsparse.models.keys import KeyPair, identical_keys
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import unique_coords
from voxsparse.structures import SparseBEV, SparseVoxels, VoxelGrid

BN_EPS = 1e-3
BN_MOMENTUM = 0.01
#: Stages' channels and the BEV stride (three stride-2 stages).
CHANNELS = (16, 32, 64, 128)
STRIDE = 8


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv_bn_relu(conv: nn.Module, channels: int) -> nn.Module:
    return spnn.SparseSequential(conv, _bn(channels), nn.ReLU())


class VoxelResBackBone8x(nn.Module):
    """OpenPCDet's ``VoxelResBackBone8x`` followed by height compression.

    The module layout (``conv_input``, ``conv1`` ... ``conv4``, ``conv_out``) is the reference's, so
    state-dict names are the reference's own (relative to ``backbone_3d.``).

    Args:
        in_channels: voxel feature channels from the voxel encoder.
        num_bev_features: channels of the height-compressed BEV, 128 x the output's z cells
            (OpenPCDet's ``MAP_TO_BEV.NUM_BEV_FEATURES``; 256 on nuScenes' 40 z voxels); checked
            against the grid at the first forward.

    Input: ``SparseVoxels`` (M voxels). Output: ``SparseBEV`` at stride 8 with ``num_bev_features``
    features per occupied cell (:meth:`output_shape` gives the z cells D for a grid).
    """

    stride = STRIDE

    def __init__(self, in_channels: int, num_bev_features: int = 256) -> None:
        super().__init__()
        c1, c2, c3, c4 = CHANNELS
        self.conv_input = _conv_bn_relu(spnn.SubMConv3d(in_channels, c1, 3, padding=1, bias=False, indice_key="subm1"), c1)
        self.conv1 = spnn.SparseSequential(*self._blocks(c1, "res1"))
        self.conv2 = spnn.SparseSequential(self._down(c1, c2, 1, "spconv2"), *self._blocks(c2, "res2"))
        self.conv3 = spnn.SparseSequential(self._down(c2, c3, 1, "spconv3"), *self._blocks(c3, "res3"))
        self.conv4 = spnn.SparseSequential(self._down(c3, c4, (0, 1, 1), "spconv4"), *self._blocks(c4, "res4"))
        self.conv_out = _conv_bn_relu(
            spnn.SparseConv3d(c4, c4, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False, indice_key="spconv_down2"),
            c4,
        )
        if num_bev_features % c4:
            raise ValueError(f"num_bev_features: expected a multiple of {c4} (channels x z cells), got {num_bev_features}")
        self.out_channels = num_bev_features

    @staticmethod
    def _blocks(channels: int, key: str) -> list[nn.Module]:
        blocks = [SparseBasicBlock(channels, indice_key=key, bias=True) for _ in range(2)]
        for block in blocks:
            for m in block.modules():
                if isinstance(m, nn.BatchNorm1d):
                    m.momentum = BN_MOMENTUM
        return blocks

    @staticmethod
    def _down(in_channels: int, channels: int, padding: int | tuple[int, int, int], key: str) -> nn.Module:
        conv = spnn.SparseConv3d(in_channels, channels, 3, stride=2, padding=padding, bias=False, indice_key=key)
        return _conv_bn_relu(conv, channels)

    @staticmethod
    def input_shape(grid: VoxelGrid) -> list[int]:
        """(z, y, x) spatial shape of the sparse input: the grid's with one more z cell, as the reference."""
        z, y, x = grid.spatial_shape
        return [z + 1, y, x]

    @classmethod
    def output_shape(cls, grid: VoxelGrid) -> tuple[int, int, int]:
        """(D, H, W) of ``conv_out``'s output for ``grid``."""
        d, h, w = cls.input_shape(grid)
        for pad_z in (1, 1, 0):  # the three stride-2 3x3x3 convs: out = (n + 2p - 3) // 2 + 1
            d, h, w = (d + 2 * pad_z - 3) // 2 + 1, (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return ((d - 3) // 2 + 1, h, w)

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        d, h, w = self.output_shape(voxels.grid)
        if CHANNELS[-1] * d != self.out_channels:
            raise ValueError(
                f"{type(self).__name__}: the grid's {voxels.grid.spatial_shape[0]} z voxels leave {d} z cells, "
                f"{CHANNELS[-1] * d} BEV channels, but num_bev_features is {self.out_channels}"
            )
        if len(voxels) == 0:  # spconv cannot convolve an empty tensor; there is nothing to compute
            coords = voxels.coords.new_zeros(0, 3)
            return SparseBEV(coords, voxels.features.new_zeros(0, self.out_channels), (h, w), STRIDE,
                             voxels.grid, voxels.batch_size)
        x = SparseConvTensor(voxels.features, voxels.coords.int(), self.input_shape(voxels.grid), voxels.batch_size)
        out = self.conv_out(self.conv4(self.conv3(self.conv2(self.conv1(self.conv_input(x))))))
        return height_compression(out.indices, out.features, (d, h, w), voxels.grid, voxels.batch_size)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return identical_keys(self)


def height_compression(
    indices: torch.Tensor, features: torch.Tensor, shape: tuple[int, int, int], grid: VoxelGrid, batch_size: int
) -> SparseBEV:
    """Sparse 3D features folded along z into BEV channels, as OpenPCDet's ``HeightCompression``.

    Args:
        indices: (M, 4) int (batch, z, y, x) at stride 8 of ``grid``.
        features: (M, C).
        shape: (D, H, W) extent of the indices.

    Returns:
        ``SparseBEV`` of the occupied (b, y, x) cells, sorted, with (M', C * D) features: channel
        ``c * D + z`` holds channel c of the voxel at height z (0 where that voxel is empty).
    """
    d, h, w = shape
    idx = indices.long()
    cells, inverse = unique_coords(idx[:, [0, 2, 3]], (batch_size, h, w))
    folded = features.new_zeros(len(cells), features.shape[1], d)
    folded[inverse, :, idx[:, 1]] = features
    return SparseBEV(cells, folded.reshape(len(cells), -1), (h, w), STRIDE, grid, batch_size)
