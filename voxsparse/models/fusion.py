"""Inference-time fusion of sparse convolution + BatchNorm (+ ReLU).

In eval mode a BatchNorm is an affine map per channel, so it folds into the preceding convolution:
its scale into the weights, its shift into a bias. On CUDA, spconv's implicit-GEMM kernels then add
that bias and apply the ReLU in their epilogue (``act_type``, inference only), so each
``conv -> BN -> ReLU`` triple becomes one kernel instead of three; this matters because the sparse
backbones are bound by kernel launches and host work, not arithmetic (docs/benchmarks.md). spconv's
CPU kernels take no bias or activation, so on the CPU the shift stays a separate add
(:class:`ChannelBias`) and the ReLU a separate module: the same arithmetic, tested on the CPU
(tests/models/test_fusion.py, which also compares both on the GPU where there is one); the fused
rows of ``tools/benchmark.py`` time it.

    fused = fuse_for_inference(model)   # a fused copy in eval mode; ``model`` is untouched
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from voxsparse.ops.sparse_backend import spnn
from voxsparse.ops.sparse_plan import is_sparse_conv


class ChannelBias(nn.Module):
    """``x + bias`` over (N, C) features: a folded BatchNorm's shift where the conv cannot add it."""

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


def _relu_epilogue() -> object | None:
    """spconv's ReLU epilogue constant, or None where the backend has none (spconv-triton)."""
    try:
        from cumm import tensorview as tv
    except ImportError:
        return None
    return tv.gemm.Activation.ReLU


def batch_norm_affine(bn: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) scale and (C,) shift of eval-mode ``bn``: ``bn(x) = x * scale + shift`` per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@torch.no_grad()
def fuse_conv_bn(conv: nn.Module, bn: _BatchNorm, relu: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    """Fold eval-mode ``bn`` (and, on CUDA, ``relu``) into sparse ``conv`` in place.

    spconv 2.x keeps weights as (out, *kernel, in), so the per-channel scale broadcasts over dim 0.

    Returns:
        The modules that replace ``bn`` and ``relu``: identities where the conv's kernel took them
        over, else a :class:`ChannelBias` and the ReLU itself.
    """
    weight = conv.weight
    if weight.shape[0] != bn.num_features:
        raise ValueError(f"fuse_conv_bn: conv weight {tuple(weight.shape)} is not (out={bn.num_features}, ..., in)")
    scale, shift = batch_norm_affine(bn)
    weight.mul_(scale.view(-1, *([1] * (weight.ndim - 1))).to(weight.dtype))
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    act = _relu_epilogue()
    if not weight.is_cuda or not hasattr(conv, "act_type") or act is None:
        conv.bias = None
        return ChannelBias(shift.to(weight.dtype)), relu
    conv.bias = nn.Parameter(shift.to(weight.dtype))
    if relu is None:
        return nn.Identity(), None
    conv.act_type = act
    return nn.Identity(), nn.Identity()


def _fuse_sequential(seq: nn.Module) -> None:
    names = list(seq._modules)
    for i in range(len(names) - 1):
        conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
        if not (is_sparse_conv(conv) and isinstance(bn, _BatchNorm)):
            continue
        relu = seq._modules[names[i + 2]] if i + 2 < len(names) else None
        relu = relu if isinstance(relu, nn.ReLU) else None
        new_bn, new_relu = fuse_conv_bn(conv, bn, relu)
        seq._modules[names[i + 1]] = new_bn
        if relu is not None:
            seq._modules[names[i + 2]] = new_relu


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every (sparse conv, BatchNorm[, ReLU]) fused.

    Move the model to its device first: the CUDA epilogue is chosen by where the weights are.
    Covers ``SparseSequential(conv, BN, ReLU)`` stacks and every module with a ``fuse_()`` method
    (the residual blocks). For inference only: spconv's fused activation has no backward.
    """
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if callable(getattr(module, "fuse_", None)):
            module.fuse_()
        elif isinstance(module, spnn.SparseSequential):
            _fuse_sequential(module)
    return fused
