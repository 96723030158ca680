"""The weight gradient of a sparse convolution as a Triton kernel over its valid pairs only.

spconv computes a weight gradient with an implicit GEMM: for each tile of output voxels it walks
all K kernel offsets that any voxel of the tile uses, so a tile pays for the union of its voxels'
neighbourhoods. LiDAR voxels lie on surfaces and have 3-10 of their 27 neighbours, and on an H100
in fp32 these kernels are the largest item of a VoxelNeXt training step (13.6 of 42 ms,
docs/benchmarks.md). Here the valid (input, output) pairs are listed once per active set, grouped
by offset:

    dW[:, k, :] = sum over pairs (i, o) of offset k of  dY[o]^T x[i]      (C_out x C_in)

Each program sums one chunk of one offset's pairs (gathered rows, ``tl.dot``) into its own partial
matrix; a second kernel adds the partials of each offset in chunk order. No atomics: the result is
deterministic, and its rounding differs from spconv's only in summation order.

The pair lists (:func:`weight_grad_plan`) are built in the index phase (:mod:`voxsparse.ops.sparse_plan`)
and shared by every convolution of the same ``indice_key``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

CHUNK = 1024
"""Pairs per program: enough work per program to amortise its partial matrix, and enough programs
(hundreds at nuScenes size) to fill the GPU."""


@dataclass(frozen=True)
class WeightGradPlan:
    """The valid pairs of a sparse convolution grouped by kernel offset and cut into chunks.

    Attributes:
        pair_fwd: (K, M_out) int32, the pair table the plan lists (held by the conv's pairs anyway):
            the input row of a pair is ``pair_fwd[k, pair_out]``, so it is not stored twice.
        pair_out: (P,) int32 output row of each valid pair, grouped by offset, ascending within one.
        chunk_offset / chunk_lo / chunk_hi: (NC,) int32 offset of each chunk and its range in ``pair_out``.
        first_chunk: (K + 1,) int32; offset k's chunks are ``first_chunk[k] : first_chunk[k + 1]``.
        num_chunks: NC (a host int: the launch grid).
    """

    pair_fwd: torch.Tensor
    pair_out: torch.Tensor
    chunk_offset: torch.Tensor
    chunk_lo: torch.Tensor
    chunk_hi: torch.Tensor
    first_chunk: torch.Tensor
    num_chunks: int

    @property
    def num_offsets(self) -> int:
        return self.first_chunk.numel() - 1


def weight_grad_plan(pair_fwd: torch.Tensor, chunk: int = CHUNK) -> WeightGradPlan:
    """Pair lists of an implicit-GEMM pair table (synchronises the host once).

    Args:
        pair_fwd: (K, M_out) int32; ``pair_fwd[k, o]`` is the input row that output ``o`` reads
            at kernel offset ``k``, or -1 (spconv's ``pair_fwd``).
        chunk: pairs per chunk.
    """
    if pair_fwd.dim() != 2:
        raise ValueError(f"pair_fwd must be (K, M_out), got shape {tuple(pair_fwd.shape)}")
    k, m = pair_fwd.shape
    valid = pair_fwd >= 0
    flat = valid.flatten().nonzero().squeeze(1)  # row-major: offset by offset, outputs ascending
    counts = valid.sum(1).cpu().numpy().astype(np.int64)
    pair_out = (flat % m).to(torch.int32)
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_offset = -(-counts // chunk)
    first_chunk = np.concatenate([[0], np.cumsum(per_offset)])
    offset = np.repeat(np.arange(k), per_offset)
    lo = starts[offset] + (np.arange(len(offset)) - first_chunk[offset]) * chunk
    hi = np.minimum(lo + chunk, starts[offset + 1])
    # One host-to-device copy for the four tables.
    tables = torch.from_numpy(np.concatenate([offset, lo, hi, first_chunk]).astype(np.int32)).to(pair_fwd.device)
    nc = len(offset)
    return WeightGradPlan(pair_fwd.contiguous(), pair_out, *tables[: 3 * nc].view(3, nc), tables[3 * nc :], nc)


def _tile(channels: int) -> int:
    # tl.dot needs every dimension >= 16; 64 bounds the accumulator at 64 x 64 per program.
    return min(64, max(16, 1 << (channels - 1).bit_length()))


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(x_ptr, dy_ptr, table_ptr, pout_ptr, offset_ptr, lo_ptr, hi_ptr, part_ptr, cin, cout, m_out,
                       BP: tl.constexpr, BCI: tl.constexpr, BCO: tl.constexpr):
        c = tl.program_id(0)
        ci = tl.program_id(1) * BCI + tl.arange(0, BCI)
        co = tl.program_id(2) * BCO + tl.arange(0, BCO)
        row = table_ptr + tl.load(offset_ptr + c).to(tl.int64) * m_out  # this chunk's offset in pair_fwd
        lo = tl.load(lo_ptr + c)
        hi = tl.load(hi_ptr + c)
        acc = tl.zeros((BCI, BCO), dtype=tl.float32)
        for start in range(lo, hi, BP):
            r = start + tl.arange(0, BP)
            mr = r < hi
            rows_out = tl.load(pout_ptr + r, mask=mr, other=0)
            rows_in = tl.load(row + rows_out, mask=mr, other=0).to(tl.int64)
            rows_out = rows_out.to(tl.int64)
            x = tl.load(x_ptr + rows_in[:, None] * cin + ci[None, :], mask=mr[:, None] & (ci < cin)[None, :], other=0.0)
            g = tl.load(dy_ptr + rows_out[:, None] * cout + co[None, :], mask=mr[:, None] & (co < cout)[None, :],
                        other=0.0)
            # "ieee": fp32 inputs stay fp32 (no TF32 rounding); fp16 inputs use tensor cores.
            acc += tl.dot(tl.trans(x), g, input_precision="ieee")
        out = part_ptr + c.to(tl.int64) * cin * cout + ci[:, None] * cout + co[None, :]
        tl.store(out, acc, mask=(ci < cin)[:, None] & (co < cout)[None, :])

    @triton.jit
    def reduce_kernel(part_ptr, first_ptr, dw_ptr, cin, cout, num_offsets, BLOCK: tl.constexpr):
        k = tl.program_id(0)
        e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = e < cin * cout
        first = tl.load(first_ptr + k)
        src = part_ptr + first.to(tl.int64) * cin * cout + e
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for _ in range(first, tl.load(first_ptr + k + 1)):  # chunk order: deterministic sums
            acc += tl.load(src, mask=m, other=0.0)
            src += cin * cout
        ci = e // cout
        co = e % cout
        # spconv's weight layout: (C_out, K, C_in).
        tl.store(dw_ptr + (co * num_offsets + k) * cin + ci, acc.to(dw_ptr.dtype.element_ty), mask=m)

    return partial_kernel, reduce_kernel


def weight_grad(x: torch.Tensor, dy: torch.Tensor, plan: WeightGradPlan, weight_shape: torch.Size) -> torch.Tensor:
    """Gradient of a sparse convolution's weight.

    Args:
        x: (M_in, C_in) input features of the convolution (CUDA, fp32 or fp16).
        dy: (M_out, C_out) gradient of its output, same dtype.
        plan: the convolution's pairs (:func:`weight_grad_plan`).
        weight_shape: spconv's weight shape (C_out, *kernel, C_in), K = prod(kernel).

    Returns:
        The weight gradient in ``weight_shape``, dtype of ``x``; sums in fp32.
    """
    import triton

    partial_kernel, reduce_kernel = _kernels()
    x, dy = x.contiguous(), dy.contiguous()
    cin, cout = x.shape[1], dy.shape[1]
    if weight_shape[0] != cout or weight_shape[-1] != cin or int(np.prod(weight_shape[1:-1])) != plan.num_offsets:
        raise ValueError(f"weight {tuple(weight_shape)} does not match C_in={cin}, C_out={cout}, K={plan.num_offsets}")
    dw = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
    part = torch.empty(plan.num_chunks, cin, cout, dtype=torch.float32, device=x.device)
    bci, bco = _tile(cin), _tile(cout)
    if plan.num_chunks:
        grid = (plan.num_chunks, triton.cdiv(cin, bci), triton.cdiv(cout, bco))
        partial_kernel[grid](x, dy, plan.pair_fwd, plan.pair_out, plan.chunk_offset, plan.chunk_lo, plan.chunk_hi,
                             part, cin, cout, plan.pair_fwd.shape[1], BP=32, BCI=bci, BCO=bco)
    block = 1024
    reduce_kernel[(plan.num_offsets, triton.cdiv(cin * cout, block))](part, plan.first_chunk, dw, cin, cout,
                                                                     plan.num_offsets, BLOCK=block)
    return dw
