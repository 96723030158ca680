"""Sparse selective kernels (VoxelKP, Shi et al. 2023; after SKNet, Li et al., CVPR 2019).

Several submanifold convolutions with different kernel sizes see the same voxels; their outputs are
fused by learned weights, so every voxel picks the context size it needs (a wrist wants a small
neighbourhood, a whole body a larger one). The weights are computed *per voxel and per channel*:

    U = sum_k F_k                       F_k: (M, C) output of branch k (conv + BN + ReLU)
    z = ReLU(BN(W_s U))                 (M, C / r), the per-voxel squeeze
    a_k = softmax_k(W_k z)              (M, K, C), sums to one over the K branches
    out = sum_k a_k * F_k

The authors' code squeezes ``U`` by a mean over each whole frame, which mixes every person's context
with the street's; a sparse scene has no meaningful global pool, so the squeeze here is per voxel.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from voxsparse.models.layers import batch_norm_1d, sparse_conv_block
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn


def _branch_key(indice_key: str, kernel_size: int) -> str:
    # Submanifold convs reuse a rulebook by key; a different kernel size needs its own.
    return indice_key if kernel_size == 3 else f"{indice_key}_k{kernel_size}"


class SelectiveKernelConv(spnn.SparseModule):
    """Parallel submanifold convolutions fused by per-voxel softmax weights.

    Args:
        channels: input = output channels C.
        kernel_sizes: odd kernel size of each branch, e.g. (3, 5).
        reduction: squeeze width is ``max(C // reduction, 8)``.
        indice_key: rulebook key of the stage; the 3x3(x3) branch shares it.
        dims: 3 (voxels) or 2 (BEV cells).

    Input / output: a ``SparseConvTensor`` with (M, C) features; the active set is unchanged.
    """

    def __init__(
        self, channels: int, kernel_sizes: Sequence[int] = (3, 5), reduction: int = 4, indice_key: str = "sk",
        dims: int = 3,
    ) -> None:
        super().__init__()
        if len(kernel_sizes) < 2 or any(k < 1 or k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes: expected two or more odd sizes, got {tuple(kernel_sizes)}")
        self.channels = channels
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.branches = nn.ModuleList(
            [sparse_conv_block(channels, channels, k, indice_key=_branch_key(indice_key, k), dims=dims)
             for k in self.kernel_sizes]
        )
        hidden = max(channels // reduction, 8)
        self.squeeze = nn.Sequential(
            nn.Linear(channels, hidden, bias=False), batch_norm_1d(hidden), nn.ReLU()
        )
        self.select = nn.Linear(hidden, channels * len(self.kernel_sizes))

    def fuse(self, branch_features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fuse the branches' (M, C) outputs.

        Returns:
            The fused (M, C) features and the (M, K, C) weights (each voxel's and channel's weights
            sum to one over the K branches).
        """
        stacked = torch.stack(list(branch_features), dim=1)  # (M, K, C)
        z = self.squeeze(stacked.sum(dim=1))
        weights = self.select(z).view(-1, len(self.kernel_sizes), self.channels).softmax(dim=1)
        return (weights * stacked).sum(dim=1), weights

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        fused, _ = self.fuse([branch(x).features for branch in self.branches])
        return x.replace_feature(fused)


class SelectiveKernelBlock(spnn.SparseModule):
    """VoxelNeXt's residual block with its first convolution replaced by a selective-kernel conv:
    ``relu(BN(conv3(SK(x))) + x)``; same depth as ``SparseBasicBlock``, so an ablation that swaps
    one for the other changes only the kernel selection.

    Args:
        channels: C.
        indice_key: rulebook key of the stage.
        kernel_sizes, reduction: of the :class:`SelectiveKernelConv`.
    """

    def __init__(
        self, channels: int, indice_key: str, kernel_sizes: Sequence[int] = (3, 5), reduction: int = 4
    ) -> None:
        super().__init__()
        self.sk = SelectiveKernelConv(channels, kernel_sizes, reduction, indice_key)
        self.conv2 = spnn.SubMConv3d(channels, channels, 3, padding=1, bias=False, indice_key=indice_key)
        self.bn2 = batch_norm_1d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: SparseConvTensor) -> SparseConvTensor:
        identity = x.features
        out = self.conv2(self.sk(x))
        return out.replace_feature(self.relu(self.bn2(out.features) + identity))
