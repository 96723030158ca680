"""Index arithmetic on sparse coordinates, in plain torch (CPU and CUDA from the same code)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def linear_keys(coords: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row-major int64 key of each coordinate row.

    Args:
        coords: (M, D) integer coordinates, each column ``d`` in ``[0, shape[d])``.
        shape: (D,) extent of each column.

    Returns:
        (M,) int64 keys; lexicographic order of rows equals numeric order of keys.
    """
    keys = torch.zeros(coords.shape[0], dtype=torch.int64, device=coords.device)
    for d, extent in enumerate(shape):
        keys = keys * int(extent) + coords[:, d].long()
    return keys


def unique_coords(coords: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct rows of ``coords`` and where each row went.

    Args:
        coords: (M, D) integer coordinates within ``shape``.
        shape: (D,) extent of each coordinate column.

    Returns:
        Unique coordinates (U, D) int32 sorted lexicographically, and (M,) int64 ``inverse``:
        row ``i`` of ``coords`` is unique row ``inverse[i]``.
    """
    keys = linear_keys(coords, shape)
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    # For tracing (torch.export): rows exist exactly when input rows do.
    torch._check(unique_keys.shape[0] >= torch.sym_min(1, keys.shape[0]))
    unique = coords.new_empty(unique_keys.shape[0], coords.shape[1], dtype=torch.int32)
    unique[inverse] = coords.to(torch.int32)
    return unique, inverse


def merge_duplicates(coords: torch.Tensor, features: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the features of rows that share a coordinate.

    Args:
        coords: (M, D) integer coordinates within ``shape``.
        features: (M, C).
        shape: (D,) extent of each coordinate column.

    Returns:
        Unique coordinates (U, D) int32 sorted lexicographically, and (U, C) summed features.
    """
    unique, inverse = unique_coords(coords, shape)
    return unique, sum_rows(features, inverse, unique.shape[0])


def sum_rows(features: torch.Tensor, inverse: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, C) sums: output row ``inverse[i]`` adds ``features[i]`` ((M, C) features, (M,) int64)."""
    return features.new_zeros(rows, features.shape[1]).index_add_(0, inverse, features)


def neighbor_indices(coords: torch.Tensor, shape: Sequence[int], offsets: torch.Tensor) -> torch.Tensor:
    """Index of each row's neighbour at each offset, or -1 where that cell is empty.

    Args:
        coords: (M, D) unique integer coordinates within ``shape`` (a batch column is an ordinary column).
        shape: (D,) extent of each column.
        offsets: (K, D) integer offsets.

    Returns:
        (M, K) int64 row indices into ``coords``.
    """
    keys = linear_keys(coords, shape)
    sorted_keys, order = torch.sort(keys)
    extent = torch.as_tensor(list(shape), device=coords.device)
    neighbours = coords.long()[:, None, :] + offsets.to(coords.device).long()[None]  # (M, K, D)
    inside = ((neighbours >= 0) & (neighbours < extent)).all(dim=-1)
    flat = linear_keys(neighbours.clamp(min=0).reshape(-1, coords.shape[1]), shape).view(inside.shape)
    if len(sorted_keys) == 0:
        return torch.full(inside.shape, -1, dtype=torch.int64, device=coords.device)
    pos = torch.searchsorted(sorted_keys, flat).clamp(max=len(sorted_keys) - 1)
    found = inside & (sorted_keys[pos] == flat)
    return torch.where(found, order[pos], torch.full_like(pos, -1))


def grid_offsets(kernel_size: int, dims: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(kernel_size**dims, dims) integer offsets of a centred cubic window."""
    r = kernel_size // 2
    axes = [torch.arange(-r, r + 1, device=device)] * dims
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, dims)


def sparse_local_max(coords: torch.Tensor, values: torch.Tensor, shape: Sequence[int], kernel_size: int = 3) -> torch.Tensor:
    """Max of ``values`` over each row's occupied 2-D neighbourhood (a sparse max-pool with stride 1).

    Args:
        coords: (M, 3) unique (batch, y, x) coordinates.
        values: (M, C).
        shape: (batch_size, H, W).
        kernel_size: odd window size in cells.

    Returns:
        (M, C) neighbourhood maxima; empty cells do not take part.
    """
    offsets = grid_offsets(kernel_size, 2, coords.device)
    offsets = torch.cat([torch.zeros_like(offsets[:, :1]), offsets], dim=1)
    nbr = neighbor_indices(coords, shape, offsets)  # (M, K)
    gathered = values[nbr.clamp(min=0)]  # (M, K, C)
    gathered = gathered.masked_fill((nbr < 0)[..., None], float("-inf"))
    return gathered.max(dim=1).values
