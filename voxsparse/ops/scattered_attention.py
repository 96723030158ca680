"""Scattered linear attention: linear attention inside windows of any size, without padding.

ScatterFormer (He et al., ECCV 2024) attends among the voxels of a window with a kernelised
(linear) attention. With non-negative feature maps q = relu(.), k = relu(.), a voxel n of window w
gets, per head,

    y_n = q_n KV_w / (q_n . s_w + eps),   KV_w = sum_{m in w} k_m^T v_m  (D x E),   s_w = sum_{m in w} k_m

so a window costs a D x E matrix whatever its voxel count: windows are segments of rows, not cut
into sets of a fixed size. Two segment operations carry it:

- :func:`segment_outer_sum`: ``out[w] = sum_{n in w} a_n^T b_n`` ((N, H, D), (N, H, E) -> (W, H, D, E));
- :func:`segment_vecmat`: ``out_n = x_n @ mats[w_n]`` ((N, H, D), (W, H, D, E) -> (N, H, E)).

Each is the other's gradient (see the autograd functions), so two kernels serve forward and
backward. Both need each window's rows contiguous (:class:`WindowSegments` from sorted window ids).

- ``*_reference``: the plain torch definitions (row chunks, any row order), for tests.
- CPU (and CUDA without Triton): batched matrix products over windows grouped by size, each group
  padded to a power of two (less than half of it padding).
- CUDA with Triton: one program per (window, head) walks its window's rows in blocks, tiles read in
  fp32 whatever the input dtype, ``tl.dot`` in IEEE fp32 (no TF32), no atomics: deterministic.
  D and E must be powers of two of at least 16; other shapes take the batched torch path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from voxsparse.ops import triton_voxelize
from voxsparse.ops.scatter import group_counts

#: Rows per block of the Triton kernels (tl.dot needs at least 16).
BLOCK_ROWS = 32
#: Elements of the (rows, H, D, E) temporaries the torch path builds per chunk (16 MB in fp32).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class WindowSegments:
    """Rows grouped by window, each window's rows contiguous.

    Attributes:
        index: (N,) int64 window of each row, non-decreasing.
        offsets: (W,) int64 first row of each window.
        counts: (W,) int64 rows of each window (>= 1).
    """

    index: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor

    @property
    def num_windows(self) -> int:
        return self.counts.shape[0]

    @classmethod
    def from_sorted(cls, index: torch.Tensor, num_windows: int | None = None) -> WindowSegments:
        """Segments of a non-decreasing (N,) window index with values in ``[0, num_windows)``."""
        index = index.long()
        if num_windows is None:
            num_windows = int(index[-1]) + 1 if index.numel() else 0
        counts = group_counts(index, num_windows)
        offsets = torch.cumsum(counts, 0) - counts
        return cls(index, offsets, counts)


def _row_chunks(n: int, h: int, d: int, e: int) -> list[slice]:
    """Row slices of at most ``_CHUNK_ELEMENTS`` (rows x h x d x e) elements; one slice when traced
    (torch.export), where the row count is symbolic."""
    if torch.compiler.is_compiling():
        return [slice(0, n)]
    step = max(1, _CHUNK_ELEMENTS // max(1, h * d * e))
    return [slice(start, start + step) for start in range(0, n, step)]


def segment_outer_sum_reference(a: torch.Tensor, b: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """``out[w] = sum_{n in w} a_n^T b_n`` in torch, in row chunks (no autograd of its own needed).

    Args:
        a: (N, H, D); b: (N, H, E); rows of any order (only ``segments.index`` is read).

    Returns:
        (W, H, D, E) in the inputs' dtype.
    """
    n, h, d = a.shape
    e = b.shape[2]
    out = a.new_zeros(segments.num_windows, h, d, e)
    for rows in _row_chunks(n, h, d, e):
        out.index_add_(0, segments.index[rows], a[rows, :, :, None] * b[rows, :, None, :])
    return out


def segment_vecmat_reference(x: torch.Tensor, mats: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """``out_n = x_n @ mats[w_n]`` per head in torch, in row chunks.

    Args:
        x: (N, H, D); mats: (W, H, D, E).

    Returns:
        (N, H, E).
    """
    n, h, d = x.shape
    e = mats.shape[3]
    out = x.new_empty(n, h, e)
    for rows in _row_chunks(n, h, d, e):
        out[rows] = torch.matmul(x[rows, :, None, :], mats[segments.index[rows]])[:, :, 0]
    return out


def _triton_fits(*tensors: torch.Tensor) -> bool:
    if not (tensors[0].is_cuda and triton_voxelize.available()):
        return False
    if any(t.dtype not in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
        return False
    sizes = {t.shape[-1] for t in tensors} | {t.shape[-2] for t in tensors if t.ndim == 4}
    return all(s >= 16 and s & (s - 1) == 0 for s in sizes)


def _buckets(segments: WindowSegments) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Windows in groups of similar size, for batched matrix products: per group of windows whose
    counts lie in (L / 2, L] (L a power of two, at least 8), the windows (G,), the (G, L) rows of
    each, clamped to a valid row, and the (G, L) mask of real rows (less than half of it padding)."""
    counts = segments.counts
    if counts.numel() == 0:
        return []
    level = torch.ceil(torch.log2(counts.clamp(min=8).double())).long()
    groups = []
    for lv in torch.unique(level).tolist():
        windows = torch.nonzero(level == lv).flatten()
        steps = torch.arange(1 << lv, device=counts.device)
        valid = steps[None] < counts[windows, None]
        rows = (segments.offsets[windows, None] + steps[None]).clamp(max=segments.index.numel() - 1)
        groups.append((windows, rows, valid))
    return groups


def _bucketed_outer_sum(a: torch.Tensor, b: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """:func:`segment_outer_sum_reference` for contiguous windows as batched matrix products."""
    out = a.new_empty(segments.num_windows, a.shape[1], a.shape[2], b.shape[2])
    for windows, rows, valid in _buckets(segments):
        rows_a = (a[rows] * valid[..., None, None]).permute(0, 2, 3, 1)  # (G, H, D, L)
        out[windows] = torch.matmul(rows_a, b[rows].transpose(1, 2))  # (G, H, L, E)
    return out


def _bucketed_vecmat(x: torch.Tensor, mats: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """:func:`segment_vecmat_reference` for contiguous windows as batched matrix products."""
    out = x.new_empty(x.shape[0], x.shape[1], mats.shape[3])
    for windows, rows, valid in _buckets(segments):
        y = torch.matmul(x[rows].transpose(1, 2), mats[windows])  # (G, H, L, E)
        out[rows[valid]] = y.transpose(1, 2)[valid]
    return out


def _outer_sum(a: torch.Tensor, b: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    if _triton_fits(a, b):
        return _triton_outer_sum(a, b, segments)
    return _bucketed_outer_sum(a, b, segments)


def _vecmat(x: torch.Tensor, mats: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    if _triton_fits(x, mats):
        return _triton_vecmat(x, mats, segments)
    return _bucketed_vecmat(x, mats, segments)


class _SegmentOuterSum(torch.autograd.Function):
    """out[w] = sum a_n^T b_n; grads: da_n = b_n @ dout[w]^T, db_n = a_n @ dout[w]."""

    @staticmethod
    def forward(ctx, a, b, segments):
        ctx.save_for_backward(a, b)
        ctx.segments = segments
        return _outer_sum(a, b, segments)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.contiguous()
        da = _vecmat(b, grad.transpose(-1, -2).contiguous(), ctx.segments) if ctx.needs_input_grad[0] else None
        db = _vecmat(a, grad, ctx.segments) if ctx.needs_input_grad[1] else None
        return da, db, None


class _SegmentVecmat(torch.autograd.Function):
    """out_n = x_n @ mats[w]; grads: dx_n = dout_n @ mats[w]^T, dmats[w] = sum x_n^T dout_n."""

    @staticmethod
    def forward(ctx, x, mats, segments):
        ctx.save_for_backward(x, mats)
        ctx.segments = segments
        return _vecmat(x, mats, segments)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, mats = ctx.saved_tensors
        grad = grad.contiguous()
        dx = _vecmat(grad, mats.transpose(-1, -2).contiguous(), ctx.segments) if ctx.needs_input_grad[0] else None
        dmats = _outer_sum(x, grad, ctx.segments) if ctx.needs_input_grad[1] else None
        return dx, dmats, None


def segment_outer_sum(a: torch.Tensor, b: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """(W, H, D, E) per-window sums of outer products ``a_n^T b_n`` of (N, H, D) ``a`` and (N, H, E) ``b``
    (differentiable; Triton on CUDA where it fits; the torch reference when traced)."""
    if torch.compiler.is_compiling():
        return segment_outer_sum_reference(a, b, segments)
    return _SegmentOuterSum.apply(a.contiguous(), b.contiguous(), segments)


def segment_vecmat(x: torch.Tensor, mats: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    """(N, H, E) products ``x_n @ mats[w_n]`` of (N, H, D) ``x`` and (W, H, D, E) ``mats``
    (differentiable; Triton on CUDA where it fits; the torch reference when traced)."""
    if torch.compiler.is_compiling():
        return segment_vecmat_reference(x, mats, segments)
    return _SegmentVecmat.apply(x.contiguous(), mats.contiguous(), segments)


def scattered_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: WindowSegments, eps: float = 1e-6
) -> torch.Tensor:
    """Linear attention among the rows of each window.

    Args:
        q, k: (N, H, D) non-negative queries and keys (the caller applies the feature map, e.g. ReLU).
        v: (N, H, E) values.
        segments: the window of each row (contiguous windows for the Triton path).
        eps: added to the normaliser ``q_n . s_w``.

    Returns:
        (N, H, E) in ``v``'s dtype: ``q_n KV_w / (q_n . s_w + eps)``, computed in float32 (float64
        for float64 inputs) whatever the inputs' dtype, under autocast too: a window's KV and key
        sums grow with its voxel count and pass float16's 65504 in windows of a few hundred voxels.
    """
    dtype = v.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(compute) for t in (q, k, v))
        kv = segment_outer_sum(k, v, segments)  # (W, H, D, E)
        s = k.new_zeros(segments.num_windows, *k.shape[1:]).index_add_(0, segments.index, k)  # (W, H, D)
        numerator = segment_vecmat(q, kv, segments)
        denominator = (s[segments.index] * q).sum(-1, keepdim=True)
        return (numerator / (denominator + eps)).to(dtype)


# --- Triton (CUDA) ------------------------------------------------------------------------------


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def outer_sum_kernel(a_ptr, b_ptr, offsets_ptr, counts_ptr, out_ptr, H: tl.constexpr, D: tl.constexpr,
                         E: tl.constexpr, BLOCK: tl.constexpr):
        w = tl.program_id(0)
        h = tl.program_id(1)
        start = tl.load(offsets_ptr + w)
        count = tl.load(counts_ptr + w)
        rows = tl.arange(0, BLOCK)
        dd = tl.arange(0, D)
        ee = tl.arange(0, E)
        acc = tl.zeros((D, E), dtype=tl.float32)
        for r in range(0, count, BLOCK):
            row = (start + r + rows).to(tl.int64)
            valid = (r + rows) < count
            a = tl.load(a_ptr + (row * H + h)[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            b = tl.load(b_ptr + (row * H + h)[:, None] * E + ee[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            acc += tl.dot(tl.trans(a), b, input_precision="ieee")
        base = (w.to(tl.int64) * H + h) * D * E
        tl.store(out_ptr + base + dd[:, None] * E + ee[None, :], acc.to(out_ptr.dtype.element_ty))

    @triton.jit
    def vecmat_kernel(x_ptr, m_ptr, offsets_ptr, counts_ptr, out_ptr, H: tl.constexpr, D: tl.constexpr,
                      E: tl.constexpr, BLOCK: tl.constexpr):
        w = tl.program_id(0)
        h = tl.program_id(1)
        start = tl.load(offsets_ptr + w)
        count = tl.load(counts_ptr + w)
        rows = tl.arange(0, BLOCK)
        dd = tl.arange(0, D)
        ee = tl.arange(0, E)
        base = (w.to(tl.int64) * H + h) * D * E
        m = tl.load(m_ptr + base + dd[:, None] * E + ee[None, :]).to(tl.float32)
        for r in range(0, count, BLOCK):
            row = (start + r + rows).to(tl.int64)
            valid = (r + rows) < count
            x = tl.load(x_ptr + (row * H + h)[:, None] * D + dd[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            y = tl.dot(x, m, input_precision="ieee")
            tl.store(out_ptr + (row * H + h)[:, None] * E + ee[None, :], y.to(out_ptr.dtype.element_ty),
                     mask=valid[:, None])

    return outer_sum_kernel, vecmat_kernel


def _triton_outer_sum(a: torch.Tensor, b: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    _, h, d = a.shape
    e = b.shape[2]
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    out = a.new_empty(segments.num_windows, h, d, e)
    if segments.num_windows:
        _kernels()[0][(segments.num_windows, h)](a, b, segments.offsets, segments.counts, out, H=h, D=d, E=e,
                                                 BLOCK=BLOCK_ROWS)
    return out


def _triton_vecmat(x: torch.Tensor, mats: torch.Tensor, segments: WindowSegments) -> torch.Tensor:
    n, h, d = x.shape
    e = mats.shape[3]
    dtype = torch.promote_types(x.dtype, mats.dtype)
    x, mats = x.to(dtype).contiguous(), mats.to(dtype).contiguous()
    out = x.new_empty(n, h, e)
    if segments.num_windows:
        _kernels()[1][(segments.num_windows, h)](x, mats, segments.offsets, segments.counts, out, H=h, D=d, E=e,
                                                 BLOCK=BLOCK_ROWS)
    return out
