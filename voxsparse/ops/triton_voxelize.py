"""One Triton kernel for the voxel keys of :func:`voxsparse.ops.voxelize.voxel_keys` on CUDA.

The torch version is ~20 element-wise launches over the points (range test, quantisation, key
arithmetic); on the GPU those launches, not the arithmetic, are the cost. This kernel reads each
point once and writes its key, with the same float64 arithmetic and the same rules (half-open
range, floor, clamp to the last voxel, sentinel for out-of-range points and the extra last slot),
so its keys equal torch's bit for bit (tests/ops/test_voxelize.py, on a GPU).
"""

from __future__ import annotations

import functools

import torch

from voxsparse.structures import VoxelGrid

_BLOCK = 1024


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
