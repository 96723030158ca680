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


def scatter_mean(
    src: torch.Tensor, index: torch.Tensor, num_groups: int, counts: torch.Tensor | None = None
) -> torch.Tensor:
    """(G, *) mean of the rows of ``src`` (N, *) in each group ``index`` (N,).

    ``counts`` (G,) rows per group, when the caller already has them (e.g. voxelization's
    ``num_points``); computed otherwise.
    """
    total = scatter_sum(src, index, num_groups)
    if counts is None:
        counts = torch.bincount(index, minlength=num_groups)
    counts = counts.clamp(min=1).to(total.dtype)  # empty groups: 0 / 1 = 0
    return total / counts.view(-1, *([1] * (src.ndim - 1)))


def scatter_max(src: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(G, *) element-wise maximum of the rows of ``src`` (N, *) in each group ``index`` (N,).

    The gradient of a group's maximum goes to the row that holds it; rows that tie share it
    equally (``scatter_reduce``'s rule). No argmax is materialised.
    """
    _check(src, index)
    out = src.new_zeros((num_groups, *src.shape[1:]))
    # include_self=False: the 0 initial value is only kept by empty groups, not maxed with the rows.
    expanded = index.view(-1, *([1] * (src.ndim - 1))).expand_as(src)
    return out.scatter_reduce_(0, expanded, src, reduce="amax", include_self=False)
