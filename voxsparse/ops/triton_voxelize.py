"""Triton kernels for voxelization on CUDA: the voxel keys, and the per-voxel mean from sorted keys.

On the GPU, launches and host round trips, not arithmetic, are the cost of voxelization: the torch
version of the keys is ~20 element-wise launches over the points, and unique + decode + scatter +
divide another ~25. ``voxel_keys`` reads each point once and writes its key, with the same float64
arithmetic and the same rules as :func:`voxsparse.ops.voxelize.voxel_keys` (half-open range, floor,
clamp to the last voxel, sentinel for out-of-range points and the extra last slot), so its keys
equal torch's bit for bit. ``segment_mean`` turns the keys into voxels and means with one sort, one
scan and three small kernels: voxels = runs of equal sorted keys; each voxel's mean is summed over
its run in sorted order (a stable sort: point order within a voxel), so unlike atomic scatter it
is deterministic. Both are checked against the torch path in tests/ops/test_voxelize.py on a GPU.
"""

from __future__ import annotations

import functools

import torch

from voxsparse.structures import VoxelGrid

_BLOCK = 1024
_MEAN_BLOCK = 128


@functools.cache
def available() -> bool:
    """Triton is importable (it ships with CUDA builds of torch)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def keys_kernel(p_ptr, b_ptr, c_ptr, out_ptr, n, stride, gx, gy, gz, sentinel, BLOCK: tl.constexpr):
        # Range and voxel size come as a float64 tensor: Triton would pass Python floats as float32.
        x0, y0, z0 = tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2)
        x1, y1, z1 = tl.load(c_ptr + 3), tl.load(c_ptr + 4), tl.load(c_ptr + 5)
        vx, vy, vz = tl.load(c_ptr + 6), tl.load(c_ptr + 7), tl.load(c_ptr + 8)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        row = p_ptr + i.to(tl.int64) * stride
        x = tl.load(row, mask=m, other=0.0).to(tl.float64)
        y = tl.load(row + 1, mask=m, other=0.0).to(tl.float64)
        z = tl.load(row + 2, mask=m, other=0.0).to(tl.float64)
        b = tl.load(b_ptr + i, mask=m, other=0).to(tl.int64)
        inside = (x >= x0) & (x < x1) & (y >= y0) & (y < y1) & (z >= z0) & (z < z1)
        ix = tl.minimum(tl.maximum(tl.floor((x - x0) / vx), 0.0).to(tl.int64), gx - 1)
        iy = tl.minimum(tl.maximum(tl.floor((y - y0) / vy), 0.0).to(tl.int64), gy - 1)
        iz = tl.minimum(tl.maximum(tl.floor((z - z0) / vz), 0.0).to(tl.int64), gz - 1)
        fill = tl.zeros((BLOCK,), tl.int64) + sentinel
        key = tl.where(inside, ((b * gz + iz) * gy + iy) * gx + ix, fill)
        tl.store(out_ptr + i, key.to(out_ptr.dtype.element_ty), mask=m)
        # The extra slot n: the first lane of the first program writes the sentinel there.
        first = (tl.program_id(0) == 0) & (tl.arange(0, BLOCK) == 0)
        tl.store(out_ptr + n + tl.arange(0, BLOCK) * 0, fill.to(out_ptr.dtype.element_ty), mask=first)

    return keys_kernel


@functools.cache
def _segment_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def run_starts_kernel(keys_ptr, flag_ptr, n, BLOCK: tl.constexpr):
        # flag[i] = 1 where sorted key i starts a run of equal keys.
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        key = tl.load(keys_ptr + i, mask=m, other=0)
        previous = tl.load(keys_ptr + i - 1, mask=m & (i > 0), other=0)
        tl.store(flag_ptr + i, ((i == 0) | (key != previous)).to(tl.int32), mask=m)

    @triton.jit
    def run_heads_kernel(keys_ptr, flag_ptr, run_ptr, first_ptr, coords_ptr, n, num_voxels, gx, gy, gz,
                         BLOCK: tl.constexpr):
        # At each run start: the run's first position, and (except the sentinel run) its (b, z, y, x).
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        head = m & (tl.load(flag_ptr + i, mask=m, other=0) != 0)
        v = tl.load(run_ptr + i, mask=m, other=1) - 1
        tl.store(first_ptr + v, i, mask=head)
        key = tl.load(keys_ptr + i, mask=head, other=0).to(tl.int64)
        x = key % gx
        key = key // gx
        y = key % gy
        key = key // gy
        z = key % gz
        b = key // gz
        row = coords_ptr + v.to(tl.int64) * 4
        voxel = head & (v < num_voxels)
        tl.store(row, b.to(tl.int32), mask=voxel)
        tl.store(row + 1, z.to(tl.int32), mask=voxel)
        tl.store(row + 2, y.to(tl.int32), mask=voxel)
        tl.store(row + 3, x.to(tl.int32), mask=voxel)

    @triton.jit
    def run_means_kernel(points_ptr, order_ptr, first_ptr, out_ptr, num_voxels, stride, C: tl.constexpr,
                         C_POW2: tl.constexpr, ACC_FP64: tl.constexpr, BLOCK: tl.constexpr):
        # One lane per voxel: sum its run of points (through the sort order), divide by its length.
        v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = v < num_voxels
        lo = tl.load(first_ptr + v, mask=m, other=0)
        length = tl.load(first_ptr + v + 1, mask=m, other=0) - lo
        cols = tl.arange(0, C_POW2)
        col_ok = cols[None, :] < C
        acc_type = tl.float64 if ACC_FP64 else tl.float32
        acc = tl.zeros((BLOCK, C_POW2), acc_type)
        for k in range(tl.max(length, axis=0)):
            take = m & (k < length)
            point = tl.load(order_ptr + lo + k, mask=take, other=0)
            values = tl.load(points_ptr + point[:, None] * stride + cols[None, :], mask=take[:, None] & col_ok, other=0.0)
            acc += values.to(acc_type)
        mean = acc / tl.maximum(length, 1).to(acc_type)[:, None]
        out = out_ptr + v[:, None].to(tl.int64) * C + cols[None, :]
        tl.store(out, mean.to(out_ptr.dtype.element_ty), mask=m[:, None] & col_ok)

    return run_starts_kernel, run_heads_kernel, run_means_kernel


def segment_mean(
    keys: torch.Tensor, points: torch.Tensor, shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels and per-voxel mean of every point column, from the keys of ``voxel_keys``.

    Args:
        keys: (N + 1,) int32/int64 CUDA keys, row-major over ``shape``; the sentinel
            ``prod(shape)`` marks out-of-range points and the extra last slot.
        points: (N, C) CUDA float (any row stride; unit column stride).
        shape: (B, Z, Y, X) of the keys.

    Returns:
        coords (M, 4) int32 (b, z, y, x) sorted lexicographically, and features (M, C) in
        ``points``' dtype (accumulated in float32, float64 for float64 points). One host sync (M).
    """
    import triton

    if points.stride(1) != 1:
        points = points.contiguous()
    starts, heads, means = _segment_kernels()
    n = keys.shape[0]
    sorted_keys, order = torch.sort(keys, stable=True)
    flags = torch.empty(n, dtype=torch.int32, device=keys.device)
    blocks = (triton.cdiv(n, _BLOCK),)
    starts[blocks](sorted_keys, flags, n, BLOCK=_BLOCK)
    run = torch.cumsum(flags, 0, dtype=torch.int32)
    # The last run is always the sentinel's (the extra slot holds it): M voxels = runs - 1.
    num_voxels = int(run[-1]) - 1
    first = torch.empty(num_voxels + 1, dtype=torch.int32, device=keys.device)
    coords = torch.empty(num_voxels, 4, dtype=torch.int32, device=keys.device)
    _, gz, gy, gx = shape
    heads[blocks](sorted_keys, flags, run, first, coords, n, num_voxels, gx, gy, gz, BLOCK=_BLOCK)
    c = points.shape[1]
    features = torch.empty(num_voxels, c, dtype=points.dtype, device=points.device)
    means[(max(triton.cdiv(num_voxels, _MEAN_BLOCK), 1),)](
        points, order, first, features, num_voxels, points.stride(0), C=c, C_POW2=triton.next_power_of_2(c),
        ACC_FP64=points.dtype == torch.float64, BLOCK=_MEAN_BLOCK,
    )
    return coords, features


@functools.lru_cache(maxsize=16)
def _constants(grid: VoxelGrid, device: torch.device) -> torch.Tensor:
    """(9,) float64 range and voxel size on ``device``, copied there once per grid."""
    return torch.tensor([*grid.point_cloud_range, *grid.voxel_size], dtype=torch.float64, device=device)


def voxel_keys(
    points: torch.Tensor, batch_index: torch.Tensor, grid: VoxelGrid, sentinel: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N + 1,) ``dtype`` keys of ``points`` (N, >= 3) CUDA float with (N,) ``batch_index``."""
    import triton

    n = points.shape[0]
    out = torch.empty(n + 1, dtype=dtype, device=points.device)
    gx, gy, gz = grid.grid_size
    _kernel()[(max(triton.cdiv(n, _BLOCK), 1),)](
        points, batch_index, _constants(grid, points.device), out, n, points.stride(0), gx, gy, gz, sentinel,
        BLOCK=_BLOCK,
    )
    return out
