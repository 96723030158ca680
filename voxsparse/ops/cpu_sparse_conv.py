"""spconv's CPU sparse convolution with its single-threaded kernels run in blocks.

spconv's CPU convolution (``spconv.pytorch.ops.indice_conv`` and ``indice_conv_backward``) loops
over the kernel offsets (27 for a 3x3x3 kernel): gather the offset's input rows into a buffer,
multiply them by the offset's weight (``torch.mm``), scatter-add the products into the output rows.
Its scatter-add kernel races with more than one OpenMP thread (the loop's row pointers are shared
between threads), so it must run on one thread; switching torch's thread count around every call,
one to three switches per offset, costs each following two-thread region a wait for the parked
thread (on a loaded machine, up to a scheduler slice).

The same arithmetic here runs in blocks of consecutive offsets whose products fit a buffer of
:data:`BLOCK_ELEMENTS` values: on all threads, each offset's gather (spconv's gather kernel copies
every row on its own and is safe on any number of threads) and product into the block's buffer;
then, on one thread, the block's scatter-adds in kernel order. That is one thread switch per block.
Every output row receives the same terms in the same order (a submanifold convolution's centre
first, then the offsets in kernel order) from the same ``torch.mm`` calls, so the result is
spconv's, bit for bit.

Pair tables are spconv's native ones: ``indice_pairs`` (2, K, N) int32, per offset the input rows
(``[0]``) and output rows (``[1]``), the first ``indice_pair_num[k]`` valid. For a submanifold
convolution spconv fills only the offsets before the centre; offset ``k`` after it holds the pairs of
its mirror ``K - 1 - k`` swapped (the same count), and the centre's pairs are the identity.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

import torch

#: Values (rows x channels) of the product buffer of one block of offsets: 4 MB in float32.
BLOCK_ELEMENTS = 1 << 20

#: Feature dtypes computed here; others (spconv's float16 through numpy) stay with spconv.
DTYPES = (torch.float32, torch.float64)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the enclosed torch CPU work on one intra-op thread, then restore the previous count."""
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """spconv's C++ kernel class (its gather and scatter-add) and its torch-to-tensorview view."""
    from spconv.core_cc.csrc.sparse.all import SpconvOps
    from spconv.pytorch.cppcore import torch_tensor_to_tv

    return SpconvOps, torch_tensor_to_tv


def supports(features: torch.Tensor) -> bool:
    """Whether :func:`indice_conv` computes a convolution of ``features`` (else spconv's own path)."""
    return not features.is_cuda and features.dtype in DTYPES


def _offsets(indice_pair_num: torch.Tensor, subm: bool) -> list[tuple[int, int]]:
    """(offset, pair count) of every offset with pairs, in kernel order (a submanifold centre left out)."""
    counts = indice_pair_num.tolist()
    kv = len(counts)
    if subm:
        centre = kv // 2
        counts = [0 if k == centre else counts[min(k, kv - 1 - k)] for k in range(kv)]
    return [(k, n) for k, n in enumerate(counts) if n > 0]


def _aligned_rows(channels: int, dtype: torch.dtype) -> int:
    """Rows whose (rows, ``channels``) values span a multiple of 64 bytes, torch's CPU allocation alignment."""
    row_bytes = channels * torch.empty(0, dtype=dtype).element_size()
    return 64 // math.gcd(row_bytes, 64)


def _blocks(offsets: list[tuple[int, int]], channels: int, align: int) -> Iterator[list[tuple[int, int, int]]]:
    """Consecutive runs of ``offsets`` whose products (pairs x ``channels``) fit :data:`BLOCK_ELEMENTS`
    (an offset larger than that is a block of its own), as (offset, pairs, first row in the block's
    buffer). Each offset's rows start a multiple of ``align`` rows into the buffer: its product is
    written at the alignment spconv's own buffer has, as MKL may round differently elsewhere."""
    block: list[tuple[int, int, int]] = []
    rows = 0
    for k, n in offsets:
        start = -(-rows // align) * align
        if block and (start + n) * channels > BLOCK_ELEMENTS:
            yield block
            block, start = [], 0
        block.append((k, n, start))
        rows = start + n
    if block:
        yield block


def _product_blocks(offsets: list[tuple[int, int]], like: torch.Tensor,
                    channels: int) -> tuple[list[list[tuple[int, int, int]]], torch.Tensor]:
    """The :func:`_blocks` of ``offsets`` for products of ``channels`` columns in ``like``'s dtype, and
    one (rows, ``channels``) buffer that holds the largest block."""
    blocks = list(_blocks(offsets, channels, _aligned_rows(channels, like.dtype)))
    return blocks, like.new_empty(max(b[-1][2] + b[-1][1] for b in blocks), channels)


def _scatter_block(ops: Any, target_tv: Any, products_tv: Any, rows: Any, block: list[tuple[int, int, int]]) -> None:
    """Add one block's products into ``target_tv`` at rows ``rows[k]`` of each offset, on one thread
    (spconv's scatter-add races on more)."""
    with single_thread():
        for k, n, start in block:
            ops.scatter_add_cpu(target_tv, products_tv.slice_first_axis(start, start + n),
                                rows[k].slice_first_axis(0, n))


def _pair_rows(pairs_tv: Any, inverse: bool) -> tuple[Any, Any]:
    """The (K, N) input-row and output-row tables of a pair table's tensorview (sliced there: cheaper
    per offset than slicing torch tensors and viewing each slice)."""
    return pairs_tv[int(inverse)], pairs_tv[int(not inverse)]


def per_offset(filters: torch.Tensor) -> torch.Tensor:
    """spconv's (C_out, *kernel, C_in) weight as a (C_out, K, C_in) view."""
    return filters.reshape(filters.shape[0], -1, filters.shape[-1])


def indice_conv(features: torch.Tensor, filters: torch.Tensor, indice_pairs: torch.Tensor,
                indice_pair_num: torch.Tensor, num_activate_out: int, inverse: bool = False,
                subm: bool = False) -> torch.Tensor:
    """A sparse convolution (no bias) over spconv's pair table; spconv's ``ops.indice_conv`` on the CPU.

    Args:
        features: (M_in, C_in) float32 / float64.
        filters: spconv's (C_out, *kernel, C_in) weight.
        indice_pairs, indice_pair_num: the pair table (module docstring).
        num_activate_out: M_out.
        inverse: the table is the one of the strided convolution this (inverse) convolution undoes:
            its input rows are ``indice_pairs[1]``, its output rows ``indice_pairs[0]``.
        subm: submanifold convolution (M_out = M_in).

    Returns:
        (M_out, C_out).
    """
    ops, tv = _kernels()
    features = features.contiguous()
    weight = per_offset(filters)
    kv = weight.shape[1]
    if subm:
        out = torch.mm(features, weight[:, kv // 2].T)
    else:
        out = features.new_zeros(num_activate_out, weight.shape[0])
    offsets = _offsets(indice_pair_num, subm)
    if not offsets:
        return out
    pair_in, pair_out = _pair_rows(tv(indice_pairs), inverse)
    gathered = features.new_empty(max(n for _, n in offsets), features.shape[1])
    features_tv, out_tv, gathered_tv = tv(features), tv(out), tv(gathered)
    weight_t = weight.permute(1, 2, 0).unbind(0)  # per offset (C_in, C_out): weight[:, k].T
    blocks, products = _product_blocks(offsets, out, out.shape[1])
    products_tv = tv(products)
    for block in blocks:
        for k, n, start in block:
            ops.gather_cpu(gathered_tv, features_tv, pair_in[k].slice_first_axis(0, n))
            torch.mm(gathered[:n], weight_t[k], out=products[start:start + n])
        _scatter_block(ops, out_tv, products_tv, pair_out, block)
    return out


def indice_conv_backward(features: torch.Tensor, filters: torch.Tensor, out_bp: torch.Tensor,
                         indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool = False,
                         subm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`indice_conv`; spconv's ``ops.indice_conv_backward`` on the CPU.

    Args:
        features: (M_in, C_in), the forward's input.
        filters: spconv's (C_out, *kernel, C_in) weight.
        out_bp: (M_out, C_out) gradient of the output.
        indice_pairs, indice_pair_num, inverse, subm: as in :func:`indice_conv`.

    Returns:
        (M_in, C_in) input gradient and the weight gradient in ``filters``' shape.
    """
    ops, tv = _kernels()
    features, out_bp = features.contiguous(), out_bp.contiguous()
    weight = per_offset(filters)
    kv = weight.shape[1]
    grad_weight = torch.zeros_like(weight)
    if subm:
        torch.mm(out_bp.T, features, out=grad_weight[:, kv // 2])
        grad_in = torch.mm(out_bp, weight[:, kv // 2])
    else:
        grad_in = torch.zeros_like(features)
    offsets = _offsets(indice_pair_num, subm)
    if not offsets:
        return grad_in, grad_weight.reshape(filters.shape)
    pair_in, pair_out = _pair_rows(tv(indice_pairs), inverse)
    most = max(n for _, n in offsets)
    gathered = features.new_empty(most, features.shape[1])
    gathered_bp = out_bp.new_empty(most, out_bp.shape[1])
    features_tv, out_bp_tv, grad_in_tv = tv(features), tv(out_bp), tv(grad_in)
    gathered_tv, gathered_bp_tv = tv(gathered), tv(gathered_bp)
    weights, grad_weights = weight.unbind(1), grad_weight.unbind(1)  # per offset (C_out, C_in)
    blocks, products = _product_blocks(offsets, features, features.shape[1])
    products_tv = tv(products)
    for block in blocks:
        for k, n, start in block:
            ops.gather_cpu(gathered_tv, features_tv, pair_in[k].slice_first_axis(0, n))
            ops.gather_cpu(gathered_bp_tv, out_bp_tv, pair_out[k].slice_first_axis(0, n))
            torch.mm(gathered_bp[:n].T, gathered[:n], out=grad_weights[k])
            torch.mm(gathered_bp[:n], weights[k], out=products[start:start + n])
        _scatter_block(ops, grad_in_tv, products_tv, pair_in, block)
    return grad_in, grad_weight.reshape(filters.shape)
