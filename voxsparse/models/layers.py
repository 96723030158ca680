"""Small layers shared by models."""

from __future__ import annotations

from torch import nn

from voxsparse.ops.sparse_backend import spnn

# BatchNorm running statistics follow the batch statistics with momentum 0.1 (PyTorch's default),
# not OpenPCDet's 0.01: with 0.01 a schedule of a few hundred steps ends with running statistics
# still far from the final weights' activations, and eval-mode predictions collapse.
BN_MOMENTUM = 0.1
BN_EPS = 1e-3


def batch_norm_1d(channels: int) -> nn.BatchNorm1d:
    """BatchNorm over (N, C) features, e.g. the features of sparse voxels."""
    return nn.BatchNorm1d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def batch_norm_2d(channels: int) -> nn.BatchNorm2d:
    """BatchNorm over dense (B, C, H, W) maps."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _norm_act(channels: int) -> list[nn.Module]:
    return [batch_norm_1d(channels), nn.ReLU(inplace=True)]


def sparse_conv_block(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, indice_key: str | None = None,
    subm: bool = True, dims: int = 3,
) -> nn.Module:
    """Sparse conv (submanifold when ``subm``, else regular with ``stride``) + BatchNorm + ReLU."""
    if subm:
        conv_cls = spnn.SubMConv3d if dims == 3 else spnn.SubMConv2d
        conv = conv_cls(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False,
                        indice_key=indice_key)
    else:
        conv_cls = spnn.SparseConv3d if dims == 3 else spnn.SparseConv2d
        conv = conv_cls(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                        bias=False, indice_key=indice_key)
    return spnn.SparseSequential(conv, *_norm_act(out_channels))
