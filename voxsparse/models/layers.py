"""Small layers shared by models."""

from __future__ import annotations

from torch import nn

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
