"""Triton kernels of the selective scan, both directions (CUDA only; imported lazily by
:mod:`voxsparse.ops.linear_rnn`).

Shapes as :func:`voxsparse.ops.linear_rnn.selective_scan`: u, delta, z (Bt, Dc, L); A (Dc, N);
B, C (Bt, N, L); D, delta_bias (Dc,). Arithmetic is float32 whatever the inputs' dtype.

Forward: one program holds the (BLOCK_D, N) state of a block of channels of one sequence in registers
and walks the sequence once, reading each step's inputs and writing its output; nothing is kept for the
backward but the inputs, unlike the chunked reference's several (Bt, L, Dc, N) intermediates.

Backward: the same forward kernel runs again and writes every state h_t to a (Bt, L, Dc, N) float32
scratch buffer (each step's (BLOCK_D, N) tile contiguous), i.e. Bt·L·Dc·N floats (1.6 GB at
Bt·L = 100k, Dc = 256, N = 16), allocated inside the backward, so only one scan's at a time. A reverse
kernel with the same grid then walks t = L-1 ... 0 with the state gradient in registers, reading h_t
and h_{t-1} from the buffer. Gradients of B, C (sums over channels) are written as partials per block of
channels and those of A, D, delta_bias (sums over sequences and steps) as partials per sequence, summed
in PyTorch afterwards: deterministic, no atomics. ``tests/ops/test_linear_rnn.py`` compares both
directions with the reference on a GPU, and in Triton's CPU interpreter where Triton is installed.
"""

from __future__ import annotations

import functools

import torch

_BLOCK_D = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scan_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr, states_ptr,
        channels, length, states,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        STORE_STATES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        seq = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        d_ok = d < channels
        n_ok = n < states
        tile = d[:, None] * states + n[None, :]  # (BLOCK_D, BLOCK_N) offsets in A and in one step's states
        tile_ok = d_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptr + tile, mask=tile_ok, other=0.0)
        skip = tl.zeros([BLOCK_D], tl.float32)
        bias = tl.zeros([BLOCK_D], tl.float32)
        if HAS_D:
            skip = tl.load(d_ptr + d, mask=d_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0)
        row = (seq * channels + d) * length  # (BLOCK_D,) offsets of (seq, d, 0)
        col = seq * states * length + n * length  # (BLOCK_N,) offsets of (seq, n, 0)
        first = seq.to(tl.int64) * length  # states index of (seq, t=0); int64: Bt·L·Dc·N can pass 2^31
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        for t in range(length):
            u = tl.load(u_ptr + row + t, mask=d_ok, other=0.0)
            dt = tl.load(delta_ptr + row + t, mask=d_ok, other=0.0) + bias
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            bt = tl.load(b_ptr + col + t, mask=n_ok, other=0.0)
            ct = tl.load(c_ptr + col + t, mask=n_ok, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt[None, :]
            if STORE_STATES:
                tl.store(states_ptr + (first + t) * (channels * states) + tile, h, mask=tile_ok)
            y = tl.sum(h * ct[None, :], axis=1)
            if HAS_D:
                y += skip * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=d_ok, other=0.0)
                y *= zt / (1.0 + tl.exp(-zt))
            tl.store(out_ptr + row + t, y, mask=d_ok)

    return scan_kernel


@functools.cache
def _backward_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scan_backward_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, states_ptr, grad_ptr,
        gu_ptr, gdelta_ptr, gz_ptr, ga_ptr, gb_ptr, gc_ptr, gd_ptr, gbias_ptr,
        channels, length, states,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        seq = tl.program_id(0)
        block = tl.program_id(1)
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        d_ok = d < channels
        n_ok = n < states
        tile = d[:, None] * states + n[None, :]
        tile_ok = d_ok[:, None] & n_ok[None, :]
        a = tl.load(a_ptr + tile, mask=tile_ok, other=0.0)
        skip = tl.zeros([BLOCK_D], tl.float32)
        bias = tl.zeros([BLOCK_D], tl.float32)
        if HAS_D:
            skip = tl.load(d_ptr + d, mask=d_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0)
        row = (seq * channels + d) * length
        col = seq * states * length + n * length
        part = ((seq * tl.num_programs(1) + block) * states + n) * length  # (seq, block, n, 0) of B, C partials
        step = channels * states
        first = seq.to(tl.int64) * length
        gh = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)  # dLoss/dh_t, carried backwards
        ga = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        gskip = tl.zeros([BLOCK_D], tl.float32)
        gbias = tl.zeros([BLOCK_D], tl.float32)
        h = tl.load(states_ptr + (first + length - 1) * step + tile, mask=tile_ok, other=0.0)
        for i in range(length):
            t = length - 1 - i
            # h_{-1} = 0. (Not tile_ok & (t > 0): Triton 3.9's interpreter turns that mask into int32.)
            has_prev = tl.where(t > 0, tile_ok, False)
            h_prev = tl.load(states_ptr + (first + t - 1) * step + tile, mask=has_prev, other=0.0)
            u = tl.load(u_ptr + row + t, mask=d_ok, other=0.0)
            pre = tl.load(delta_ptr + row + t, mask=d_ok, other=0.0) + bias
            dt = pre
            if SOFTPLUS:
                dt = tl.where(pre <= 20.0, tl.log(1.0 + tl.exp(pre)), pre)
            bt = tl.load(b_ptr + col + t, mask=n_ok, other=0.0)
            ct = tl.load(c_ptr + col + t, mask=n_ok, other=0.0)
            gy = tl.load(grad_ptr + row + t, mask=d_ok, other=0.0)  # dLoss/dy_t, y_t before the gate
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=d_ok, other=0.0)
                gate = 1.0 / (1.0 + tl.exp(-zt))
                y = tl.sum(h * ct[None, :], axis=1)
                if HAS_D:
                    y += skip * u
                tl.store(gz_ptr + row + t, gy * y * gate * (1.0 + zt * (1.0 - gate)), mask=d_ok)
                gy *= zt * gate
            tl.store(gc_ptr + part + t, tl.sum(gy[:, None] * h, axis=0), mask=n_ok)
            gh += gy[:, None] * ct[None, :]
            x = dt * u
            tl.store(gb_ptr + part + t, tl.sum(gh * x[:, None], axis=0), mask=n_ok)
            gx = tl.sum(gh * bt[None, :], axis=1)
            decay = tl.exp(dt[:, None] * a)
            g_log_decay = gh * h_prev * decay  # dLoss/d(dt * A), elementwise
            ga += g_log_decay * dt[:, None]
            gdt = gx * u + tl.sum(g_log_decay * a, axis=1)
            gu = gx * dt
            if HAS_D:
                gu += gy * skip
                gskip += gy * u
            if SOFTPLUS:
                gdt = tl.where(pre <= 20.0, gdt / (1.0 + tl.exp(-pre)), gdt)
            gbias += gdt
            tl.store(gu_ptr + row + t, gu, mask=d_ok)
            tl.store(gdelta_ptr + row + t, gdt, mask=d_ok)
            gh *= decay
            h = h_prev
        tl.store(ga_ptr + seq * step + tile, ga, mask=tile_ok)
        if HAS_D:
            tl.store(gd_ptr + seq * channels + d, gskip, mask=d_ok)
        if HAS_BIAS:
            tl.store(gbias_ptr + seq * channels + d, gbias, mask=d_ok)

    return scan_backward_kernel


def _float32(*tensors):
    return [None if t is None else t.float().contiguous() for t in tensors]


def _grid_and_meta(u, A, D, z, delta_bias, delta_softplus):
    import triton

    grid = (u.shape[0], triton.cdiv(u.shape[1], _BLOCK_D))
    meta = {"HAS_D": D is not None, "HAS_Z": z is not None, "HAS_BIAS": delta_bias is not None,
            "SOFTPLUS": delta_softplus, "BLOCK_D": _BLOCK_D, "BLOCK_N": max(2, triton.next_power_of_2(A.shape[1]))}
    return grid, meta


def _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states=None) -> torch.Tensor:
    """Float32 contiguous inputs (None where absent) -> float32 output; fills ``states`` (Bt, L, Dc, N)
    when given. Needs u.numel() > 0."""
    bt, dc, length = u.shape
    out = torch.empty(bt, dc, length, device=u.device, dtype=torch.float32)
    grid, meta = _grid_and_meta(u, A, D, z, delta_bias, delta_softplus)
    _kernel()[grid](
        u, delta, A, B, C, *(u if t is None else t for t in (D, z, delta_bias)), out,
        u if states is None else states,
        dc, length, A.shape[1], STORE_STATES=states is not None, **meta,
    )
    return out


def _scan_backward(grad, u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> list:
    """Float32 contiguous inputs and output gradient -> float32 gradients of the eight inputs (None for
    absent ones). Needs u.numel() > 0."""
    bt, dc, length = u.shape
    n = A.shape[1]
    states = torch.empty(bt, length, dc, n, device=u.device, dtype=torch.float32)
    _scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, states)
    grid, meta = _grid_and_meta(u, A, D, z, delta_bias, delta_softplus)
    g_u, g_delta = torch.empty_like(u), torch.empty_like(u)
    g_z = None if z is None else torch.empty_like(u)
    g_A = u.new_empty(bt, dc, n)
    g_B, g_C = (u.new_empty(bt, grid[1], n, length) for _ in range(2))
    g_D = None if D is None else u.new_empty(bt, dc)
    g_bias = None if delta_bias is None else u.new_empty(bt, dc)
    _backward_kernel()[grid](
        u, delta, A, B, C, *(u if t is None else t for t in (D, z, delta_bias)), states, grad,
        g_u, g_delta, *(u if t is None else t for t in (g_z, g_A, g_B, g_C, g_D, g_bias)),
        dc, length, n, **meta,
    )
    return [g_u, g_delta, g_A.sum(0), g_B.sum(1), g_C.sum(1), None if D is None else g_D.sum(0), g_z,
            None if delta_bias is None else g_bias.sum(0)]


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        if u.numel() == 0:
            return torch.empty_like(u)
        return _scan(*_float32(u, delta, A, B, C, D, z, delta_bias), delta_softplus).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors
        if inputs[0].numel() == 0:  # no steps (or no sequences / channels): every gradient is zero
            grads = [None if t is None else torch.zeros_like(t) for t in inputs]
        else:
            grads = _scan_backward(grad.float().contiguous(), *_float32(*inputs), ctx.delta_softplus)
        return (*[None if t is None or not need else g.to(t.dtype)
                  for t, g, need in zip(inputs, grads, ctx.needs_input_grad)], None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """:func:`voxsparse.ops.linear_rnn.selective_scan` with the Triton kernels (CUDA tensors)."""
    if not u.is_cuda:
        raise ValueError("selective_scan: the triton backend needs CUDA tensors")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
