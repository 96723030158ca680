"""Depthwise submanifold sparse convolution over spconv's index pairs.

spconv has no grouped convolutions. A depthwise one (each channel convolved with its own kernel)
is a gather, a per-channel multiply and a scatter-add over the (input, output, offset) pairs of a
submanifold convolution: ``out[o, c] = sum over pairs (i, o, k) of x[i, c] * w[k, c]``. The pairs
come from spconv's own index generation (its native algorithm, on the CPU and on CUDA), so offset
``k`` is the one spconv's weights use: a regular ``SubMConv3d`` whose weight is diagonal,
``W[c, *kernel, c] = w[*kernel, c]``, computes the same (tests/ops/test_depthwise_sparse_conv.py).
The weight is stored ``(*kernel, C)``, as ScatterFormer's depthwise convolution stores it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from voxsparse.ops import sparse_backend  # noqa: F401  (spconv's CPU repairs apply to the index generation)


@dataclass(frozen=True)
class DepthwisePairs:
    """The (input, output, offset) pairs of a submanifold convolution on one active set.

    Attributes:
        inputs: (P,) int64 input row of each pair.
        outputs: (P,) int64 output row (= a row of the same active set).
        offsets: (P,) int64 kernel offset, row-major over the kernel's (z, y, x) as spconv's weights.
        num_rows: M, rows of the active set.
        kernel_size: (kz, ky, kx).
    """

    inputs: torch.Tensor
    outputs: torch.Tensor
    offsets: torch.Tensor
    num_rows: int
    kernel_size: tuple[int, int, int]


def _triple(value: int | Sequence[int]) -> tuple[int, int, int]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * 3  # type: ignore[return-value]


def depthwise_pairs(
    indices: torch.Tensor, spatial_shape: Sequence[int], batch_size: int, kernel_size: int | Sequence[int]
) -> DepthwisePairs:
    """The pairs of a submanifold convolution of odd ``kernel_size`` (centred) on ``indices``.

    Args:
        indices: (M, 4) int32 (batch, z, y, x) unique active voxels.
        spatial_shape: (z, y, x) extent of the grid.
        batch_size: frames.
        kernel_size: odd size per axis (z, y, x), or one for all.
    """
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    ksize = _triple(kernel_size)
    if any(k % 2 == 0 for k in ksize):
        raise ValueError(f"depthwise_pairs: a centred kernel needs odd sizes, got {ksize}")
    m = indices.shape[0]
    volume = math.prod(ksize)
    center = volume // 2
    device = indices.device
    rows = torch.arange(m, device=device)
    if m == 0 or volume == 1:
        return DepthwisePairs(rows, rows, torch.full_like(rows, center), m, ksize)
    padding = [k // 2 for k in ksize]
    _, pairs, _ = ops.get_indice_pairs(indices.int().contiguous(), batch_size, list(spatial_shape),
                                       ConvAlgo.Native, list(ksize), [1, 1, 1], padding, [1, 1, 1],
                                       [0, 0, 0], True, False)
    # spconv's submanifold table (2, K, M): offset k's pairs first in row k, -1 after them; the
    # centre row is the identity. Its counts list only offsets up to the centre (the others mirror
    # them), so the pairs are read from the table itself: one nonzero, no per-offset Python loop over
    # counts read on the host, which a traced program could not take.
    table = pairs.long()
    listed = table[0] >= 0
    listed[center] = False
    offset, slot = listed.nonzero(as_tuple=True)  # offset by offset, each offset's pairs in order
    return DepthwisePairs(torch.cat([rows, table[0, offset, slot]]), torch.cat([rows, table[1, offset, slot]]),
                          torch.cat([torch.full_like(rows, center), offset]), m, ksize)


class _DepthwiseConv(torch.autograd.Function):
    """Saves only the features, weight and pairs; the backward is the same gather-multiply-scatter."""

    @staticmethod
    def forward(ctx, features, weight, pairs: DepthwisePairs):
        ctx.save_for_backward(features, weight)
        ctx.pairs = pairs
        products = features[pairs.inputs] * weight[pairs.offsets]
        return features.new_zeros(pairs.num_rows, features.shape[1]).index_add_(0, pairs.outputs, products)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        features, weight = ctx.saved_tensors
        pairs: DepthwisePairs = ctx.pairs
        grad_rows = grad[pairs.outputs]
        grad_features = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.zeros_like(features).index_add_(0, pairs.inputs, grad_rows * weight[pairs.offsets])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight).index_add_(0, pairs.offsets, grad_rows * features[pairs.inputs])
        return grad_features, grad_weight, None


def depthwise_sparse_conv(features: torch.Tensor, weight: torch.Tensor, pairs: DepthwisePairs) -> torch.Tensor:
    """(M, C) features convolved channel by channel with (K, C) ``weight`` (K = kernel volume) over ``pairs``.

    Returns:
        (M, C) features on the same active set.
    """
    if weight.shape[0] != math.prod(pairs.kernel_size):
        raise ValueError(f"depthwise_sparse_conv: weight {tuple(weight.shape)} for a {pairs.kernel_size} kernel")
    return _DepthwiseConv.apply(features, weight.to(features.dtype), pairs)


class SparseDepthwiseConv3d(nn.Module):
    """A depthwise submanifold 3D sparse convolution without bias.

    Args:
        channels: C, in = out.
        kernel_size: odd (kz, ky, kx), or one size for all; the kernel is centred (padding k // 2).

    Attributes:
        weight: (kz, ky, kx, C), initialised N(0, 1) as ScatterFormer's.

    ``forward(features (M, C), pairs) -> (M, C)`` with ``pairs`` from :func:`depthwise_pairs` for
    this kernel size (shared by every convolution of that size on the same active set).
    """

    def __init__(self, channels: int, kernel_size: int | Sequence[int]) -> None:
        super().__init__()
        self.kernel_size = _triple(kernel_size)
        self.weight = nn.Parameter(torch.randn(*self.kernel_size, channels))

    def forward(self, features: torch.Tensor, pairs: DepthwisePairs) -> torch.Tensor:
        if pairs.kernel_size != self.kernel_size:
            raise ValueError(f"{type(self).__name__}: pairs of a {pairs.kernel_size} kernel for a {self.kernel_size} one")
        return depthwise_sparse_conv(features, self.weight.reshape(-1, self.weight.shape[-1]), pairs)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[-1]}, kernel_size={self.kernel_size}"
