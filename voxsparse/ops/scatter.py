"""Reductions of rows into groups given by a 1-D group index (pure torch, CPU = GPU code).

Every function takes ``src`` (N, *) and ``index`` (N,) int64 with values in ``[0, num_groups)`` and
returns (G, *) with ``G = num_groups``; a group that receives no row is 0. Gradients flow to ``src``.
"""

from __future__ import annotations

import torch


def _check(src: torch.Tensor, index: torch.Tensor) -> None:
    if index.ndim != 1 or index.shape[0] != src.shape[0]:
        shapes = f"{tuple(index.shape)} and {tuple(src.shape)}"
        raise ValueError(f"scatter: index must be (N,) for src (N, *), got {shapes}")


def scatter_sum(src: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, *) sum of the rows of ``src`` (N, *) in each group ``index`` (N,)."""
    _check(src, index)
    return src.new_zeros((num_groups, *src.shape[1:])).index_add_(0, index, src)


def group_counts(index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G,) int64 rows of each group ``index`` (N,) in ``[0, G)``: ``bincount`` with exactly
    ``G`` entries, which a traced program can size (``bincount``'s length depends on the data)."""
    index = index.long()
    return index.new_zeros(num_groups).scatter_add_(0, index, torch.ones_like(index))


def run_starts(keys: torch.Tensor) -> torch.Tensor:
    """(N,) bool, True at the first row of each run of equal values of the sorted ``keys`` (N,).

    Each key is compared with the one before it through a gather: slices (``keys[1:]``,
    ``keys[:-1]``) of a length that is only known when the program runs would need their lengths
    proven equal when traced."""
    position = torch.arange(keys.shape[0], device=keys.device)
    return (keys != keys[(position - 1).clamp_min(0)]) | (position == 0)


def scatter_mean(
    src: torch.Tensor, index: torch.Tensor, num_groups: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """(G, *) mean of the rows of ``src`` (N, *) in each group ``index`` (N,).

    ``counts`` (G,) rows per group, when the caller already has them (e.g. voxelization's
    ``num_points``); computed otherwise.
    """
    total = scatter_sum(src, index, num_groups)
    if counts is None:
        counts = group_counts(index, num_groups)
    counts = counts.clamp(min=1).to(total.dtype)  # empty groups: 0 / 1 = 0
    return total / counts.view(-1, *([1] * (src.ndim - 1)))


def scatter_max(src: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, *) element-wise maximum of the rows of ``src`` (N, *) in each group ``index`` (N,).

    The gradient of a group's maximum goes to the row that holds it; rows that tie share it
    equally (``scatter_reduce``'s rule, which also counts the initial 0 as a tie where a group's
    maximum is exactly 0). No argmax is materialised. On CUDA, atomics serialise on crowded groups
    (a real scan puts tens to hundreds of points in some voxels): rows sorted by group take
    :func:`segment_max` instead.
    """
    _check(src, index)
    out = src.new_zeros((num_groups, *src.shape[1:]))
    # include_self=False: the 0 initial value is only kept by empty groups, not maxed with the rows.
    return out.scatter_reduce_(0, _expand(index, src), src, reduce="amax", include_self=False)


def _expand(index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return index.view(-1, *([1] * (like.ndim - 1))).expand_as(like)


def _split_among_ties(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """(N, *) gradient of a group maximum ``out`` (G, *) of ``src`` (N, *): each group's ``grad``
    divided evenly among its rows equal to the maximum."""
    holds = (src == out.index_select(0, index)).to(grad.dtype)
    ties = torch.zeros_like(out, dtype=grad.dtype).index_add_(0, index, holds)
    share = grad / ties.clamp_(min=1)
    return share.index_select(0, index) * holds


def segment_max(src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(G, *) element-wise maximum of consecutive runs of rows: group ``g`` is the next ``lengths[g]``
    rows of ``src`` (N, *), ``lengths`` (G,) int64 >= 1 summing to N.

    :func:`scatter_max` for rows already sorted by group, without atomics: each output element is
    one sequential reduction (``torch.segment_reduce``), so crowded groups cost no contention.
    Gradients: each group's gradient split evenly among its rows equal to the maximum.
    """
    if lengths.ndim != 1:
        raise ValueError(f"segment_max: lengths must be (G,), got {tuple(lengths.shape)}")
    return _SegmentMax.apply(src, lengths)


class _SegmentMax(torch.autograd.Function):
    """``torch.segment_reduce``'s max with :func:`scatter_max`'s gradient (its own gives every tied
    row the whole gradient)."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = torch.segment_reduce(src, "max", lengths=lengths, axis=0, unsafe=True)
        ctx.save_for_backward(src, lengths, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        src, lengths, out = ctx.saved_tensors
        index = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
        return _split_among_ties(src, index, out, grad), None
