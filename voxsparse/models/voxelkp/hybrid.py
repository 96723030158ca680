"""Hybrid feature learning (VoxelKP, Shi et al. 2023): a per-voxel MLP beside the sparse convolutions.

Sparse convolutions mix a voxel with its neighbours; at the fine scale a keypoint needs, that blurs
the voxel's own evidence. A point-level path, an MLP applied to each voxel's features alone (a
PointNet-style shared MLP, no neighbourhood), runs in parallel with the convolutional path and the
two are summed:

    out = conv_path(x) + MLP(x.features)

as the authors' ``MLPResidual`` does around the residual blocks of each stage.
"""

from __future__ import annotations

from torch import nn

from voxsparse.models.layers import batch_norm_1d
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn


class HybridBlock(spnn.SparseModule):
    """Sum of a sparse convolutional path and a per-voxel MLP.

    Args:
        conv_path: sparse module that keeps the active set and the channel count (e.g. a stage's
            submanifold residual blocks).
        channels: C.
        num_layers: (Linear, BN, ReLU) layers of the MLP.

    Input / output: ``SparseConvTensor`` with (M, C) features, same active set.
    """

    def __init__(self, conv_path: nn.Module, channels: int, num_layers: int = 2) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        self.conv_path = conv_path
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Linear(channels, channels, bias=False), batch_norm_1d(channels), nn.ReLU()]
        self.point_mlp = nn.Sequential(*layers)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        point = self.point_mlp(x.features)
        out = self.conv_path(x)
        if out.features.shape[0] != point.shape[0]:
            raise RuntimeError("HybridBlock: conv_path must keep the active set (submanifold convolutions)")
        return out.replace_feature(out.features + point)
