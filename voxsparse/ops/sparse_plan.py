"""Index work ahead of feature work: sparse convolutions with their index pairs built separately.

spconv builds a convolution's index pairs inside that convolution's forward. A strided
convolution must learn how many output voxels it has before it can allocate them, so it
synchronises the host with the GPU, and on one stream that sync waits for every feature kernel
queued so far: the GPU then idles while the host prepares the next layers. Separating the two
removes those waits from the feature path:

1. index work (:func:`plan_indices`): a part of the network's pairs, in layer order. On CUDA it
   runs on a high-priority side stream (:class:`IndexStream`), so each of its syncs waits only for
   index kernels, never for the feature kernels queued on the main stream.
2. feature work (:func:`run_features`): the convolutions' GEMMs and the per-voxel layers between
   them, with nothing that synchronises; the host queues kernels ahead of the GPU.

A backbone alternates the two stage by stage: while the GPU runs stage k's features, the host
already builds stage k + 1's pairs. Pairs are shared by ``indice_key`` exactly as spconv shares
them (submanifold convolutions with one key on one active set); strided convolutions always build
their own. The same spconv index and GEMM functions run as in spconv's modules (implicit GEMM on
CUDA, gather-GEMM-scatter on the CPU), so the outputs are the same. With autograd on, the pairs
include the backward ones (training); without it, the convolutions run through spconv's plain
ops (inference).

Training in fp32 on CUDA with Triton installed, the pairs also carry a list of their valid pairs
(:mod:`voxsparse.ops.triton_sparse_conv`), and a convolution's backward takes its input gradient
from spconv's implicit GEMM and its weight gradient from a Triton kernel over those pairs, which
skips the offsets a voxel does not use (:class:`SparseConvFunction`). Elsewhere (mixed precision
included) spconv's autograd functions run.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from voxsparse.ops import triton_voxelize
from voxsparse.ops.sparse_backend import BACKEND_NAME, spnn
from voxsparse.ops.triton_sparse_conv import WeightGradPlan, weight_grad, weight_grad_plan


def is_sparse_conv(module: nn.Module) -> bool:
    """A spconv-style sparse convolution (duck-typed: spconv and spconv-triton name theirs differently)."""
    return hasattr(module, "indice_key") and hasattr(module, "subm") and isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass
class ConvPairs:
    """Index data of one sparse convolution applied to one active set.

    Attributes:
        out_indices: (M_out, 1 + D) int32 (batch, spatial...) of the output voxels.
        out_shape: the output's spatial shape (D,).
        native: True for spconv's gather-GEMM-scatter pairs, False for implicit-GEMM pairs.
        tensors: the backend's pair tensors, passed back to it unchanged.
        backward: the implicit-GEMM pairs include the backward ones (built with autograd on).
        weight_grad: the valid pairs for the Triton weight gradient (fp32 training on CUDA), or None.
    """

    out_indices: torch.Tensor
    out_shape: list[int]
    native: bool
    tensors: tuple[Any, ...]
    backward: bool = False
    weight_grad: WeightGradPlan | None = None

    def __len__(self) -> int:
        return self.out_indices.shape[0]


def _spconv_ops() -> tuple[Any, Any]:
    # Imported on use: spconv-triton has neither (see ``supported``).
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    return ops, ConvAlgo


def supported() -> bool:
    """Index-first execution needs spconv's own index and GEMM functions (not spconv-triton's)."""
    return BACKEND_NAME == "spconv"


def _check_supported(conv: nn.Module) -> None:
    if getattr(conv, "transposed", False) or getattr(conv, "inverse", False):
        raise NotImplementedError(f"index-first execution: {type(conv).__name__} (transposed / inverse) is not supported")


def build_pairs(conv: nn.Module, indices: torch.Tensor, spatial_shape: list[int], batch_size: int) -> ConvPairs:
    """Index pairs of spconv convolution ``conv`` on the active set ``indices`` (with the backward
    pairs when autograd is on).

    Args:
        conv: a spconv ``SubMConv*d`` / ``SparseConv*d`` module (its geometry and ``algo`` are used).
        indices: (M, 1 + D) int32 (batch, spatial...) active voxels.
        spatial_shape: (D,) extent of the input grid.
        batch_size: frames in the batch.
    """
    _check_supported(conv)
    ops, ConvAlgo = _spconv_ops()
    if conv.subm:
        out_shape = list(spatial_shape)
    else:
        out_shape = ops.get_conv_output_size(spatial_shape, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.output_padding)
    if conv.algo == ConvAlgo.Native or not indices.is_cuda:
        # spconv's CPU kernels only implement the native algorithm (its modules pick it there too).
        out, pairs, pair_num = ops.get_indice_pairs(indices, batch_size, spatial_shape, ConvAlgo.Native, *geometry,
                                                    conv.subm, False)
        return ConvPairs(out, out_shape, True, (pairs, pair_num))
    backward = torch.is_grad_enabled()
    res = ops.get_indice_pairs_implicit_gemm(indices, batch_size, spatial_shape, conv.algo, *geometry,
                                             subm=conv.subm, transpose=False, is_train=backward)
    # res: (out_inds, num_per_loc, pair_fwd, pair_bwd, mask_fwd_splits, mask_bwd_splits,
    #       argsort_fwd_splits, argsort_bwd_splits, masks)
    plan = None
    if backward and _triton_weight_grad(conv):
        if res[2].shape[1] != len(res[0]):
            raise RuntimeError(f"spconv's pair_fwd {tuple(res[2].shape)} is not (K, M_out={len(res[0])}): "
                               "this spconv version is not supported by the Triton weight gradient")
        plan = weight_grad_plan(res[2])
    return ConvPairs(res[0], out_shape, False, res[2:], backward, plan)


def _triton_weight_grad(conv: nn.Module) -> bool:
    """Whether training ``conv`` takes its weight gradient from Triton: in fp32 only.

    fp32 training is bound by spconv's SIMT GEMMs on the GPU, and the Triton weight gradient
    removes most of the largest of them. Under autocast (or with fp16 weights) the tensor-core GEMMs
    are cheap and training is bound by host work instead, which a second GEMM call per backward
    would only add to (docs/benchmarks.md).
    """
    return (triton_voxelize.available() and conv.weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cuda"))


def run_conv(conv: nn.Module, features: torch.Tensor, pairs: ConvPairs) -> torch.Tensor:
    """``conv`` on (M, C_in) ``features`` with precomputed ``pairs`` -> (M_out, C_out) features.

    Differentiable when autograd is on. Takes the conv's bias and, on CUDA, its fused activation
    (set by :func:`voxsparse.models.fusion.fuse_for_inference`), as spconv's modules do.
    """
    from spconv.pytorch import functional as Fsp
    from spconv.tools import CUDAKernelTimer

    ops, ConvAlgo = _spconv_ops()
    features = features.contiguous()
    grad = torch.is_grad_enabled()
    if pairs.native:
        pair_tensor, pair_num = pairs.tensors
        if pair_tensor.device != features.device:
            pair_tensor = pair_tensor.to(features.device)
        if grad:
            fn = Fsp.indice_subm_conv if conv.subm else Fsp.indice_conv
            out = fn(features, conv.weight, pair_tensor, pair_num, len(pairs), ConvAlgo.Native)
            return out if conv.bias is None else out + conv.bias
        return ops.indice_conv(features, conv.weight, pair_tensor, pair_num, len(pairs), False, conv.subm,
                               bias=conv.bias, act_alpha=conv.act_alpha, act_beta=conv.act_beta, act_type=conv.act_type)
    pair_fwd, pair_bwd, mask_fwd, mask_bwd, argsort_fwd, argsort_bwd, masks = pairs.tensors
    if grad:
        if not pairs.backward:
            raise RuntimeError("these pairs were built without autograd; build them with autograd on to train")
        if pairs.weight_grad is not None:
            out = SparseConvFunction.apply(features, conv.weight, pairs, conv.subm, conv.fp32_accum)
        else:
            out = Fsp.implicit_gemm(features, conv.weight, pair_fwd, pair_bwd, mask_fwd, mask_bwd, argsort_fwd,
                                    argsort_bwd, len(pairs), masks, True, conv.subm, CUDAKernelTimer(False),
                                    conv.fp32_accum)
        # spconv's fused epilogue has no backward: the bias is a separate add, as in its modules.
        return out if conv.bias is None else out + conv.bias
    out, _, _ = ops.implicit_gemm(
        features, conv.weight, pair_fwd, mask_fwd, argsort_fwd, len(pairs), masks, False, conv.subm,
        fp32_accum=conv.fp32_accum, bias=conv.bias, act_alpha=conv.act_alpha, act_beta=conv.act_beta,
        act_type=conv.act_type, output_dtype=conv.weight.dtype,
    )
    return out


class SparseConvFunction(torch.autograd.Function):
    """An implicit-GEMM sparse convolution (no bias) whose weight gradient comes from Triton.

    Forward and input gradient are spconv's implicit GEMM: the input gradient is itself a sparse
    convolution of the output gradient, with the weight transposed to (C_in, *kernel, C_out) and,
    for a submanifold convolution, its kernel flipped (output o reads input i at offset k exactly
    when i reads o at the mirrored offset, so the forward pairs serve); a strided convolution's
    input gradient gathers through spconv's backward pairs. The weight gradient is
    :func:`voxsparse.ops.triton_sparse_conv.weight_grad`. Under autocast the inputs are cast to
    float16, as spconv's own function does.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float16)
    def forward(ctx, features, weight, pairs: ConvPairs, subm: bool, fp32_accum: bool | None):
        ops, _ = _spconv_ops()
        pair_fwd, _, mask_fwd, _, argsort_fwd, _, masks = pairs.tensors
        out, _, _ = ops.implicit_gemm(features, weight, pair_fwd, mask_fwd, argsort_fwd, len(pairs), masks, False,
                                      subm, fp32_accum=fp32_accum)
        ctx.save_for_backward(features, weight)
        ctx.pairs, ctx.subm, ctx.fp32_accum = pairs, subm, fp32_accum
        return out

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        features, weight = ctx.saved_tensors
        pairs: ConvPairs = ctx.pairs
        grad_out = grad_out.contiguous()
        grad_in = grad_weight = None
        if ctx.needs_input_grad[0]:
            ops, _ = _spconv_ops()
            pair_fwd, pair_bwd, mask_fwd, mask_bwd, argsort_fwd, argsort_bwd, masks = pairs.tensors
            kernel_dims = tuple(range(1, weight.dim() - 1))
            transposed = weight.permute(weight.dim() - 1, *kernel_dims, 0)  # (C_in, *kernel, C_out)
            if ctx.subm:
                transposed, pair, mask, argsort = transposed.flip(kernel_dims), pair_fwd, mask_fwd, argsort_fwd
            else:
                pair, mask, argsort = pair_bwd, mask_bwd, argsort_bwd
            transposed = transposed.contiguous()
            grad_in, _, _ = ops.implicit_gemm(grad_out, transposed, pair, mask, argsort, features.shape[0], masks,
                                              False, ctx.subm, fp32_accum=ctx.fp32_accum)
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad(features, grad_out, pairs.weight_grad, weight.shape)
        return grad_in, grad_weight, None, None, None


def sparse_convs(module: nn.Module) -> Iterator[nn.Module]:
    """The sparse convolutions of ``module`` in registration order (= execution order of the
    sequential stacks and residual blocks the backbones are built from)."""
    return (m for m in module.modules() if is_sparse_conv(m))


def plan_indices(
    module: nn.Module, indices: torch.Tensor, spatial_shape: list[int], batch_size: int, pairs: dict[str, ConvPairs]
) -> tuple[torch.Tensor, list[int]]:
    """Index phase of ``module``: add every conv's pairs to ``pairs`` (keyed by ``indice_key``).

    A submanifold conv whose key is already in ``pairs`` reuses it; a strided conv moves the
    active set to its output.

    Returns:
        The active set after ``module``: (M_out, 1 + D) int32 indices and its spatial shape.
    """
    for conv in sparse_convs(module):
        if conv.indice_key is None:
            raise ValueError(f"index-first execution needs an indice_key on every sparse conv; {conv} has none")
        if conv.subm:
            if conv.indice_key not in pairs:
                pairs[conv.indice_key] = build_pairs(conv, indices, spatial_shape, batch_size)
            continue
        if conv.indice_key in pairs:
            raise ValueError(f"strided conv key {conv.indice_key!r} is used twice; strided convs cannot share pairs")
        plan = build_pairs(conv, indices, spatial_shape, batch_size)
        pairs[conv.indice_key] = plan
        indices, spatial_shape = plan.out_indices, plan.out_shape
    return indices, spatial_shape


def run_features(module: nn.Module, features: torch.Tensor, pairs: dict[str, ConvPairs]) -> torch.Tensor:
    """Feature phase of ``module``: (M, C_in) -> (M_out, C_out) with the pairs of :func:`plan_indices`.

    ``module`` is a sparse conv, a sequential stack, a module with ``forward_features(features,
    pairs)`` (the residual blocks), or a per-voxel layer applied to the feature rows (BatchNorm,
    ReLU, the fused :class:`~voxsparse.models.fusion.ChannelBias`, identities).
    """
    if is_sparse_conv(module):
        return run_conv(module, features, pairs[module.indice_key])
    if callable(getattr(module, "forward_features", None)):
        return module.forward_features(features, pairs)
    if isinstance(module, (nn.Sequential, spnn.SparseSequential)):
        for child in module.children():
            features = run_features(child, features, pairs)
        return features
    return module(features)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    # High priority: the host waits on these short index kernels; they must not queue behind GEMMs.
    return torch.cuda.Stream(device, priority=-1)


class IndexStream:
    """Where index work runs: a side CUDA stream, so its host syncs skip the queued feature kernels.

    Use one per forward, created on the stream the forward's features run on::

        stream = IndexStream(features.device)
        with stream.indices():
            indices, shape = plan_indices(stage, indices, shape, batch_size, pairs)
        features = run_features(stage, features, pairs)

    Ordering: the side stream first waits for the main stream's work so far (the input indices
    were made there, and blocks freed by an earlier forward's index tensors may still be read by
    its queued features: the caching allocator hands them back only to side-stream allocations).
    Each ``indices()`` block then makes the main stream wait for it. Off CUDA everything runs in
    order on the host, so ``indices()`` does nothing.
    """

    def __init__(self, device: torch.device) -> None:
        self.main = self.side = None
        if device.type == "cuda":
            self.main = torch.cuda.current_stream(device)
            self.side = _side_stream(device)
            self.side.wait_stream(self.main)

    @contextmanager
    def indices(self):
        if self.side is None:
            yield
            return
        with torch.cuda.stream(self.side):
            yield
        self.main.wait_stream(self.side)
