"""Triton forward kernel of the selective scan (CUDA only; imported lazily by :mod:`voxsparse.ops.linear_rnn`).

One program holds the (BLOCK_D, N) state of a block of channels of one sequence in registers and walks
the sequence once, reading each step's inputs and writing its output: the state never reaches memory,
unlike the chunked reference's (Bt, L, Dc, N) intermediates. The backward recomputes the forward with
the chunked PyTorch reference under autograd (checkpointing, in effect), so gradients are the
reference's. ``tests/ops/test_linear_rnn.py`` compares both directions with the reference on a GPU.
"""

from __future__ import annotations

import functools

import torch

from voxsparse.ops.linear_rnn import selective_scan_torch

_BLOCK_D = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scan_kernel(
        u_ptr, delta_ptr, a_ptr, b_ptr, c_ptr, d_ptr, z_ptr, bias_ptr, out_ptr,
        channels, length, states,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        seq = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        n = tl.arange(0, BLOCK_N)
        d_ok = d < channels
        n_ok = n < states
        a = tl.load(a_ptr + d[:, None] * states + n[None, :], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        skip = tl.zeros([BLOCK_D], tl.float32)
        bias = tl.zeros([BLOCK_D], tl.float32)
        if HAS_D:
            skip = tl.load(d_ptr + d, mask=d_ok, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + d, mask=d_ok, other=0.0)
        row = (seq * channels + d) * length  # (BLOCK_D,) offsets of (seq, d, 0)
        col = seq * states * length + n * length  # (BLOCK_N,) offsets of (seq, n, 0)
        h = tl.zeros([BLOCK_D, BLOCK_N], tl.float32)
        for t in range(length):
            u = tl.load(u_ptr + row + t, mask=d_ok, other=0.0)
            dt = tl.load(delta_ptr + row + t, mask=d_ok, other=0.0) + bias
            if SOFTPLUS:
                dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
            bt = tl.load(b_ptr + col + t, mask=n_ok, other=0.0)
            ct = tl.load(c_ptr + col + t, mask=n_ok, other=0.0)
            h = tl.exp(dt[:, None] * a) * h + (dt * u)[:, None] * bt[None, :]
            y = tl.sum(h * ct[None, :], axis=1)
            if HAS_D:
                y += skip * u
            if HAS_Z:
                zt = tl.load(z_ptr + row + t, mask=d_ok, other=0.0)
                y *= zt / (1.0 + tl.exp(-zt))
            tl.store(out_ptr + row + t, y, mask=d_ok)

    return scan_kernel


def _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus) -> torch.Tensor:
    import triton

    bt, dc, length = u.shape
    n = A.shape[1]
    f32 = [None if t is None else t.float().contiguous() for t in (u, delta, A, B, C, D, z, delta_bias)]
    out = torch.empty(bt, dc, length, device=u.device, dtype=torch.float32)
    if out.numel() == 0:
        return out.to(u.dtype)
    dummy = f32[0]
    grid = (bt, triton.cdiv(dc, _BLOCK_D))
    _kernel()[grid](
        f32[0], f32[1], f32[2], f32[3], f32[4],
        f32[5] if D is not None else dummy, f32[6] if z is not None else dummy,
        f32[7] if delta_bias is not None else dummy, out,
        dc, length, n,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        BLOCK_D=_BLOCK_D, BLOCK_N=max(2, triton.next_power_of_2(n)),
    )
    return out.to(u.dtype)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias)
        ctx.delta_softplus = delta_softplus
        return _forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus)

    @staticmethod
    def backward(ctx, grad):
        inputs = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = selective_scan_torch(*inputs, delta_softplus=ctx.delta_softplus)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (*[next(grads) if t is not None and t.requires_grad else None for t in inputs], None)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> torch.Tensor:
    """:func:`voxsparse.ops.linear_rnn.selective_scan` with the Triton forward (CUDA tensors)."""
    if not u.is_cuda:
        raise ValueError("selective_scan: the triton backend needs CUDA tensors")
    return _SelectiveScan.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
