"""spconv's native-algorithm sparse convolution on CUDA as a few large kernels.

On CUDA spconv convolves with implicit GEMM, whose masks hold one bit per kernel offset, so a kernel
of more than 32 offsets (a 5x5x5 one: 125) falls back to its native algorithm: per offset, a
gather, a GEMM and a scatter-add, and a device allocation with its free around every GEMM. A
training step of a 5x5x5 convolution then issues about a thousand kernels and a few hundred
``cudaFree`` calls, each of which makes the host wait for the device: the step is bound by the host.

Here the same convolution is a dense gather table and matrix products over all offsets at once:

1. a table (M_out, K) of the input row of every output row at every offset (a zero row where there
   is none), filled from spconv's pair table with one indexed write;
2. forward: gather (M_out, K, C_in) rows, one product with the weights as (K * C_in, C_out);
3. backward: the weight gradient is the gathered rows' transposed product with the output
   gradient; the input gradient is the same gather-and-product over the transposed table
   (M_in, K) of output rows (for a submanifold convolution the forward table with the kernel
   flipped: output ``o`` reads input ``i`` at offset ``k`` exactly when ``i`` reads ``o`` at the
   mirrored offset).

Offsets are taken in chunks whose gathered rows fit :data:`CHUNK_ELEMENTS` values, so a step is a
few tens of kernels and no allocator calls beyond torch's cached ones. The products cover every
offset whether or not a voxel has a neighbour there: more arithmetic than spconv's loop, which pays
for that in launches on small layers but wins on large sparse ones, so only layers up to
:data:`ROUTE_ELEMENTS` gathered values come here. Every output row is
written by one product, never by atomics, so results are deterministic; they differ from spconv's
only in summation order. The arithmetic is plain torch and runs on any device (the tests compare it
with spconv's CPU loop); the backend routes CUDA calls here (:mod:`voxsparse.ops.sparse_backend`).

Pair tables are spconv's native ones, as in :mod:`voxsparse.ops.cpu_sparse_conv`: ``indice_pairs``
(2, K, N) int32, the first ``indice_pair_num[k]`` of offset ``k`` valid; for a submanifold
convolution only the offsets before the centre are counted (the later ones hold their mirrors'
pairs, swapped), so the tables are built from those and their mirrors.
"""

from __future__ import annotations

import torch

from voxsparse.ops.cpu_sparse_conv import per_offset

#: Gathered values (rows x offsets x channels) per chunk of offsets: 256 MB in float32.
CHUNK_ELEMENTS = 1 << 26

#: Feature dtypes computed here; others stay with spconv.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: Route CUDA native-algorithm convolutions here (False: spconv's own loop, for comparisons).
enabled = True

#: Largest gathered size (M_out x K x C_in values) routed here. The products cover every offset, so
#: their cost grows with the layer's size whatever its neighbours; spconv's loop costs launches per
#: offset and work per pair, and wins on large sparse layers (docs/benchmarks.md).
ROUTE_ELEMENTS = 1 << 29


def supports(features: torch.Tensor, filters: torch.Tensor, num_out: int) -> bool:
    """Whether the backend routes a native-algorithm convolution of (M_in, C_in) ``features`` with
    spconv's (C_out, *kernel, C_in) ``filters`` onto ``num_out`` output rows here (CUDA only)."""
    size = num_out * filters[0].numel()  # M_out x K x C_in
    return (enabled and features.is_cuda and features.dtype in DTYPES and filters.dtype == features.dtype
            and size <= ROUTE_ELEMENTS)


def _valid(indice_pair_num: torch.Tensor, num_offsets: int, width: int, subm: bool,
           device: torch.device) -> tuple[torch.Tensor, int]:
    """(K', N) mask of the valid entries of the pair table's first K' offsets (all K, or those before
    a submanifold centre), and K'."""
    used = num_offsets // 2 if subm else num_offsets
    counts = indice_pair_num[:used].to(device=device, dtype=torch.int64)
    return torch.arange(width, device=device) < counts[:, None], used


def gather_tables(indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, num_in: int, num_out: int,
                  inverse: bool, subm: bool, transposed: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gather tables of a pair table, built on its device without a host sync.

    Args:
        indice_pairs: (2, K, N) int32; indice_pair_num: (K,) valid pairs per offset.
        num_in, num_out: M_in and M_out.
        inverse: the table is of the strided convolution this one undoes (input rows in ``[1]``).
        subm: submanifold convolution (M_in = M_out).
        transposed: also build the (M_in, K) table of output rows (not needed for a submanifold
            convolution, whose forward table serves with the kernel flipped).

    Returns:
        (M_out, K) int64 input row of each output row and offset, ``M_in`` where there is none (the
        zero row appended to the features); and (M_in, K) output rows, ``M_out`` where none, or None.
    """
    num_offsets, width = indice_pairs.shape[1], indice_pairs.shape[2]
    device = indice_pairs.device
    valid, used = _valid(indice_pair_num, num_offsets, width, subm, device)
    rows_in = indice_pairs[int(inverse), :used].to(torch.int64)
    rows_out = indice_pairs[int(not inverse), :used].to(torch.int64)
    valid &= (rows_in >= 0) & (rows_out >= 0)  # spconv marks unused slots -1, inside the counts too
    offset = torch.arange(used, device=device)[:, None].expand(-1, width)

    def table(rows: int, at: torch.Tensor, value: torch.Tensor, missing: int, mirror: bool) -> torch.Tensor:
        # One spare row takes the writes of invalid entries and is dropped.
        out = torch.full((rows + 1, num_offsets), missing, dtype=torch.int64, device=device)
        out.index_put_((torch.where(valid, at, rows), offset), value)
        if mirror:
            out.index_put_((torch.where(valid, value, rows), num_offsets - 1 - offset), at)
            out[:rows, num_offsets // 2] = torch.arange(rows, device=device)
        return out[:rows]

    if subm:
        return table(num_out, rows_out, rows_in, num_in, True), None
    forward = table(num_out, rows_out, rows_in, num_in, False)
    return forward, table(num_in, rows_in, rows_out, num_out, False) if transposed else None


def _chunks(rows: int, num_offsets: int, channels: int) -> list[tuple[int, int]]:
    """[first, last) offsets of chunks whose (rows, offsets, channels) gathers fit :data:`CHUNK_ELEMENTS`."""
    step = max(1, CHUNK_ELEMENTS // max(1, rows * channels))
    return [(k, min(k + step, num_offsets)) for k in range(0, num_offsets, step)]


def _padded(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one zero row appended: where gather tables point for a missing neighbour."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])])


def _gather_product(source: torch.Tensor, table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k source[table[:, k]] @ weight[k]: (R, C_in) rows of a zero-padded ``source`` through an
    (R, K) ``table`` and (K, C_in, C_out) weights -> (R, C_out)."""
    rows, num_offsets = table.shape
    out = None
    for first, last in _chunks(rows, num_offsets, source.shape[1]):
        gathered = source[table[:, first:last]].reshape(rows, (last - first) * source.shape[1])
        w = weight[first:last].reshape(-1, weight.shape[-1])
        out = gathered @ w if out is None else out.addmm_(gathered, w)
    return out


def indice_conv(features: torch.Tensor, filters: torch.Tensor, indice_pairs: torch.Tensor,
                indice_pair_num: torch.Tensor, num_activate_out: int, inverse: bool = False,
                subm: bool = False) -> torch.Tensor:
    """A sparse convolution (no bias) over spconv's pair table; spconv's native ``ops.indice_conv``.

    Args:
        features: (M_in, C_in).
        filters: spconv's (C_out, *kernel, C_in) weight.
        indice_pairs, indice_pair_num: the pair table (module docstring).
        num_activate_out: M_out.
        inverse: the table is the one of the strided convolution this (inverse) convolution undoes.
        subm: submanifold convolution (M_out = M_in).

    Returns:
        (M_out, C_out) in ``features``' dtype.
    """
    table, _ = gather_tables(indice_pairs, indice_pair_num, features.shape[0], num_activate_out, inverse, subm,
                             transposed=False)
    weight = per_offset(filters).permute(1, 2, 0)  # (K, C_in, C_out)
    return _gather_product(_padded(features.contiguous()), table, weight)


def indice_conv_backward(features: torch.Tensor, filters: torch.Tensor, out_bp: torch.Tensor,
                         indice_pairs: torch.Tensor, indice_pair_num: torch.Tensor, inverse: bool = False,
                         subm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`indice_conv`; spconv's native ``ops.indice_conv_backward``.

    Args:
        features: (M_in, C_in), the forward's input.
        filters: spconv's (C_out, *kernel, C_in) weight.
        out_bp: (M_out, C_out) gradient of the output.
        indice_pairs, indice_pair_num, inverse, subm: as in :func:`indice_conv`.

    Returns:
        (M_in, C_in) input gradient and the weight gradient in ``filters``' shape.
    """
    num_in = features.shape[0]
    table, table_t = gather_tables(indice_pairs, indice_pair_num, num_in, out_bp.shape[0], inverse, subm)
    weight = per_offset(filters)  # (C_out, K, C_in)
    num_offsets = weight.shape[1]
    padded, out_bp = _padded(features.contiguous()), out_bp.contiguous()
    grad_weight = weight.new_empty(num_offsets, features.shape[1], weight.shape[0])  # (K, C_in, C_out)
    rows = table.shape[0]
    for first, last in _chunks(rows, num_offsets, features.shape[1]):
        gathered = padded[table[:, first:last]].reshape(rows, (last - first) * padded.shape[1])
        torch.mm(gathered.T, out_bp, out=grad_weight[first:last].view(-1, weight.shape[0]))
    if subm:
        table_t, kernel = table, weight.flip(1)  # offset k of the input gradient is the forward's K - 1 - k
    else:
        kernel = weight
    grad_in = _gather_product(_padded(out_bp), table_t, kernel.permute(1, 0, 2))
    return grad_in, grad_weight.permute(2, 0, 1).reshape(filters.shape)
