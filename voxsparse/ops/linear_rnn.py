"""Linear recurrences over sequences, behind one interface: Mamba's selective scan, RetNet's retention and
RWKV-6's WKV.

Both operators map sequences to sequences with a state that is updated linearly at each step, which is
what lets LION run one recurrence over thousands of voxels of a group. Each has:

- a pure-PyTorch chunked implementation (the reference; any device, differentiable by autograd);
- a GPU path imported lazily: for the selective scan our Triton kernels, forward and backward
  (:mod:`voxsparse.ops.linear_rnn_triton`; the backward recomputes the states into one scan's
  (Bt, L, Dc, N) scratch buffer), for retention and WKV ``flash-linear-attention`` (``fla``) where it
  is installed.

``backend="auto"`` takes the GPU path for CUDA tensors when it is importable, else the reference;
``"torch"`` always takes the reference, ``"triton"`` / ``"fla"`` insist on the GPU path.

Chunking (selective scan): the sequence is cut into chunks of ``T`` steps (``ceil(sqrt(L))`` by
default). Inside every chunk the state is advanced step by step from zero, all chunks at once; then one
pass over the chunks carries the state entering each chunk, and a step's state is its in-chunk state
plus the carried state times the decay accumulated since the chunk began (a product of factors in
(0, 1], so nothing overflows). That is ``T + L / T`` vectorised steps instead of ``L``.

Chunking (retention): within a chunk, the decayed product ``(Q K^T * decay) V`` (causal, or both ways
in LION's variant); across chunks, a (d_k, d_v) state per head carried by one pass over the chunks.

Chunking (WKV): as retention, but the decay is per step and per key channel. Inside a chunk, step t
sees an earlier step s through ``exp(sum of the log decays strictly between them)``, a factor in
(0, 1] formed for every (t, s) pair from the in-chunk cumulative sums, so no product of a large and a
small exponential is ever taken; the state entering the chunk reaches step t through the decay since
the chunk began, also in (0, 1]. The cumulative sums and their differences are taken in float64: one
very strong decay (a log decay of -1e5) would otherwise leave a rounding error of ~0.01 in every
later difference of the chunk.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Literal

import torch
import torch.nn.functional as F

Backend = Literal["auto", "torch", "triton", "fla"]


def _is_cuda(*tensors: torch.Tensor) -> bool:
    return all(t.is_cuda for t in tensors)


# --------------------------------------------------------------------------------------------------
# Selective scan (Mamba)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    *,
    backend: Backend = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mamba's selective state-space scan with input-dependent ``B``, ``C`` and step ``delta``.

    For every sequence b, channel d and state n, with ``dt = softplus(delta + delta_bias)`` (or
    ``delta + delta_bias`` without softplus)::

        h[t] = exp(dt[t] * A[d, n]) * h[t-1] + dt[t] * B[b, n, t] * u[t]      (h[-1] = 0)
        y[t] = sum_n C[b, n, t] * h[t] + D[d] * u[t],   then  y[t] *= silu(z[t])

    Computed in float32 (float64 for float64 inputs), returned in ``u``'s dtype.

    Args:
        u, delta: (Bt, Dc, L) inputs and steps.
        A: (Dc, N) state matrix (negative for a decaying state).
        B, C: (Bt, N, L) input and output projections per step.
        D: (Dc,) skip weight, or None.
        z: (Bt, Dc, L) gate, or None.
        delta_bias: (Dc,) added to ``delta`` before the softplus, or None.
        delta_softplus: apply softplus to the step (without it, steps must be non-negative).
        backend: see the module docstring.
        chunk_size: steps per chunk of the reference (default ``ceil(sqrt(L))``).

    Returns:
        (Bt, Dc, L).
    """
    if u.ndim != 3 or delta.shape != u.shape or A.ndim != 2 or A.shape[0] != u.shape[1]:
        raise ValueError(f"selective_scan: u/delta (Bt, Dc, L) and A (Dc, N), got {tuple(u.shape)}, "
                         f"{tuple(delta.shape)}, {tuple(A.shape)}")
    expected = (u.shape[0], A.shape[1], u.shape[2])
    if B.shape != expected or C.shape != expected:
        raise ValueError(f"selective_scan: B and C must be (Bt, N, L) = {expected}, got {tuple(B.shape)}, {tuple(C.shape)}")
    use_triton = backend == "triton" or (backend == "auto" and _is_cuda(u) and _triton_available())
    if use_triton:
        from voxsparse.ops import linear_rnn_triton

        return linear_rnn_triton.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if backend not in ("auto", "torch"):
        raise ValueError(f"selective_scan: backend {backend!r} (choose auto, torch or triton)")
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


@functools.cache
def _triton_available() -> bool:
    """Triton is importable (it ships with CUDA builds of torch)."""
    return importlib.util.find_spec("triton") is not None


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The chunked PyTorch selective scan (:func:`selective_scan`'s reference; same arguments)."""
    dtype = u.dtype
    work = torch.promote_types(dtype, torch.float32)
    u, delta, A, B, C = (t.to(work) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(work)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    bt, dc, length = u.shape
    n = A.shape[1]
    if length == 0:
        return u.to(dtype)
    steps = chunk_size or max(1, math.isqrt(length - 1) + 1)
    chunks = -(-length // steps)
    pad = chunks * steps - length
    # (Bt, L, Dc, N) log-decay and input of every step; padded steps keep the state (decay 1, input 0).
    log_decay = delta.transpose(1, 2)[..., None] * A
    inputs = (delta * u).transpose(1, 2)[..., None] * B.transpose(1, 2)[:, :, None, :]
    log_decay = F.pad(log_decay, (0, 0, 0, 0, 0, pad)).view(bt, chunks, steps, dc, n)
    inputs = F.pad(inputs, (0, 0, 0, 0, 0, pad)).view(bt, chunks, steps, dc, n)
    # Loops take whole slices from unbind: indexing one step at a time would make autograd fill a
    # full-size zero gradient per step.
    state = inputs.new_zeros(bt, chunks, dc, n)
    local = []
    for decay_t, input_t in zip(log_decay.exp().unbind(2), inputs.unbind(2)):  # all chunks from zero at once
        state = decay_t * state + input_t
        local.append(state)
    local_states = torch.stack(local, 2)  # (Bt, chunks, T, Dc, N)
    since_start = log_decay.cumsum(2).exp()  # decay from each chunk's start to each step, in (0, 1]
    carry = inputs.new_zeros(bt, dc, n)
    entering = []
    for decay_c, local_c in zip(since_start[:, :, -1].unbind(1), local.pop().unbind(1)):
        entering.append(carry)
        carry = decay_c * carry + local_c
    states = local_states + since_start * torch.stack(entering, 1)[:, :, None]
    c_steps = F.pad(C.transpose(1, 2), (0, 0, 0, pad)).view(bt, chunks, steps, 1, n)
    y = (states * c_steps).sum(-1).view(bt, chunks * steps, dc)[:, :length].transpose(1, 2)
    if D is not None:
        y = y + u * D.to(work)[:, None]
    if z is not None:
        y = y * F.silu(z.to(work))
    return y.to(dtype)


def selective_scan_sequential(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan one step at a time in float64: the brute-force check of the others (slow)."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    state = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((state * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, 2) if ys else u.clone()
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y


# --------------------------------------------------------------------------------------------------
# Retention (RetNet)


def retention_decay(num_heads: int) -> torch.Tensor:
    """(H,) log2 of RetNet's per-head decay ``gamma_h = 1 - 2^(-5 - h)`` (float32)."""
    return torch.log2(1 - torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float32)))


def retention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bidirectional_chunks: bool = False,
    backend: Backend = "auto",
    chunk_size: int = 64,
) -> torch.Tensor:
    """Multi-scale retention: ``o[t] = sum_{s <= t} gamma_h^(t - s) (q[t] . k[s]) / sqrt(d_k) v[s]``.

    ``gamma_h = 1 - 2^(-5 - h)`` for head h (:func:`retention_decay`). Computed in float32 (float64 for
    float64 inputs), returned in ``q``'s dtype.

    With ``bidirectional_chunks`` (LION's retention), steps of the same aligned chunk of ``chunk_size``
    see each other both ways with weight ``gamma_h^|t - s|``; earlier chunks reach later ones causally
    as above, later chunks do not reach earlier ones. ``chunk_size`` then changes the result (LION: 64).

    Args:
        q, k: (B, H, L, d_k).
        v: (B, H, L, d_v).
        backend: ``auto`` / ``torch``: the chunked reference (matrix products, fine on a GPU too);
            ``fla``: ``flash-linear-attention``'s Triton ``chunk_retention`` (CUDA, causal only).
        chunk_size: steps per chunk.

    Returns:
        (B, H, L, d_v).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"retention: q, k (B, H, L, d_k) and v (B, H, L, d_v), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if backend == "fla":
        if bidirectional_chunks:
            raise ValueError("retention: fla computes causal retention only (bidirectional_chunks=False)")
        return _retention_fla(q, k, v)
    if backend not in ("auto", "torch"):
        raise ValueError(f"retention: backend {backend!r} (choose auto, torch or fla)")
    return retention_torch(q, k, v, chunk_size, bidirectional_chunks)


def _entering_states(decay: torch.Tensor, chunk_kv: torch.Tensor) -> torch.Tensor:
    """The (B, H, chunks, d_k, d_v) state entering each chunk, zero for the first, by one pass over the
    chunks: ``S_c = decay_c * S_{c-1} + chunk_kv_c``. ``decay`` is the whole chunk's decay, broadcastable
    to (B, H, chunks, d_k, 1) (per head for retention, per sequence, chunk and key channel for WKV)."""
    decay = decay.expand(*chunk_kv.shape[:3], *decay.shape[3:])
    state = chunk_kv.new_zeros(chunk_kv.shape[:2] + chunk_kv.shape[3:])
    entering = []
    for d, kv in zip(decay.unbind(2), chunk_kv.unbind(2)):
        entering.append(state)
        state = d * state + kv
    return torch.stack(entering, 2)


def retention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64, bidirectional_chunks: bool = False
) -> torch.Tensor:
    """The chunked PyTorch retention (:func:`retention`'s reference; same arguments)."""
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    b, h, length, dk = q.shape
    dv = v.shape[-1]
    q = q.to(work) * dk ** -0.5
    k, v = k.to(work), v.to(work)
    steps = chunk_size if bidirectional_chunks else max(1, min(chunk_size, length))
    chunks = -(-length // steps)
    pad = chunks * steps - length
    q, k, v = (F.pad(t, (0, 0, 0, pad)).view(b, h, chunks, steps, t.shape[-1]) for t in (q, k, v))
    log_gamma = retention_decay(h).to(q.device, work).view(h, 1, 1)
    pos = torch.arange(steps, device=q.device, dtype=torch.float32)
    gap = pos[:, None] - pos[None, :]
    if bidirectional_chunks:
        inner = torch.exp2(gap.abs() * log_gamma)  # (H, T, T)
    else:
        inner = torch.exp2(gap.clamp(min=0) * log_gamma) * (gap >= 0)  # causal
    out = ((q @ k.transpose(-1, -2)) * inner[:, None]) @ v  # (B, H, chunks, T, d_v)
    # State after each chunk: S_c = gamma^T S_{c-1} + sum_j gamma^(T-1-j) k_j^T v_j.
    to_end = torch.exp2((steps - 1 - pos) * log_gamma).view(h, 1, steps, 1)
    chunk_kv = (k * to_end).transpose(-1, -2) @ v  # (B, H, chunks, d_k, d_v)
    whole = torch.exp2(steps * log_gamma).view(1, h, 1, 1, 1)
    from_start = torch.exp2((pos + 1) * log_gamma).view(h, 1, steps, 1)  # decay since the previous chunk's end
    out = out + (q * from_start) @ _entering_states(whole, chunk_kv)
    return out.reshape(b, h, chunks * steps, dv)[:, :, :length].to(dtype)


def retention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk_size: int = 64, bidirectional_chunks: bool = False
) -> torch.Tensor:
    """Retention as one (L, L) decayed product in float64: the brute-force check (memory L^2)."""
    _, h, length, dk = q.shape
    pos = torch.arange(length, dtype=torch.float64, device=q.device)
    gap = pos[:, None] - pos[None, :]
    seen = gap >= 0
    if bidirectional_chunks:
        chunk = torch.div(pos, chunk_size, rounding_mode="floor")
        seen = seen | (chunk[:, None] == chunk[None, :])
    decay = torch.exp2(gap.abs() * retention_decay(h).double().to(q.device).view(h, 1, 1)) * seen
    scores = torch.einsum("bhik,bhjk,hij->bhij", q.double() * dk ** -0.5, k.double(), decay)
    return scores @ v.double()


def _retention_fla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``fla.ops.retention.chunk_retention`` on (B, H, L, d) tensors, whichever layout its version takes."""
    from fla.ops.retention import chunk_retention

    params = inspect.signature(chunk_retention).parameters
    kwargs: dict = {"scale": q.shape[-1] ** -0.5} if "scale" in params else {}
    if "head_first" in params:
        o = chunk_retention(q, k, v, head_first=True, **kwargs)
    else:  # versions without the option take (B, L, H, d)
        o = chunk_retention(*(t.transpose(1, 2) for t in (q, k, v)), **kwargs)
        o = (o[0] if isinstance(o, tuple) else o).transpose(1, 2)
        return o
    return o[0] if isinstance(o, tuple) else o


# --------------------------------------------------------------------------------------------------
# WKV (RWKV-6)


def wkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_w: torch.Tensor,
    u: torch.Tensor,
    *,
    backend: Backend = "auto",
    chunk_size: int = 16,
) -> torch.Tensor:
    """RWKV-6's WKV recurrence with a data-dependent decay per step and key channel, per head::

        o[t] = r[t]^T (S[t-1] + diag(u) k[t] v[t]^T)
        S[t] = diag(exp(log_w[t])) S[t-1] + k[t] v[t]^T        (S[-1] = 0, a (d_k, d_v) state)

    Computed in float32 (float64 for float64 inputs), returned in ``r``'s dtype.

    Args:
        r, k: (B, H, L, d_k) receptance and key.
        v: (B, H, L, d_v).
        log_w: (B, H, L, d_k) log decay, <= 0 (RWKV-6: ``-exp(w)``).
        u: (H, d_k) bonus of a step's own key.
        backend: ``auto`` / ``torch``: the chunked reference (matrix products, fine on a GPU too);
            ``fla``: ``flash-linear-attention``'s Triton ``chunk_rwkv6`` (CUDA).
        chunk_size: steps per chunk of the reference (the result does not depend on it).

    Returns:
        (B, H, L, d_v).
    """
    if r.ndim != 4 or k.shape != r.shape or log_w.shape != r.shape or v.shape[:3] != r.shape[:3]:
        raise ValueError(f"wkv6: r, k, log_w (B, H, L, d_k) and v (B, H, L, d_v), got {tuple(r.shape)}, "
                         f"{tuple(k.shape)}, {tuple(log_w.shape)}, {tuple(v.shape)}")
    if u.shape != (r.shape[1], r.shape[3]):
        raise ValueError(f"wkv6: u must be (H, d_k) = {(r.shape[1], r.shape[3])}, got {tuple(u.shape)}")
    if backend == "fla":
        return _wkv6_fla(r, k, v, log_w, u)
    if backend not in ("auto", "torch"):
        raise ValueError(f"wkv6: backend {backend!r} (choose auto, torch or fla)")
    return wkv6_torch(r, k, v, log_w, u, chunk_size)


def _wkv6_chunk_products(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inclusive: torch.Tensor,
                         exclusive: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """In-chunk part of :func:`wkv6_torch`: (..., T, d_k) r, k, float64 cumulative log decays and
    (..., T, d_v) v -> (..., T, d_v)."""
    steps = r.shape[-2]
    earlier = torch.ones(steps, steps, dtype=torch.bool, device=r.device).tril(-1)  # s < t
    gap = (exclusive.unsqueeze(-2) - inclusive.unsqueeze(-3)).masked_fill(~earlier[:, :, None], -math.inf)
    scores = torch.einsum("...tn,...sn,...tsn->...ts", r, k, torch.exp(gap.to(r.dtype)))
    own = (r * k * u[:, None, None]).sum(-1)  # a step's own key, through the bonus
    return scores @ v + own.unsqueeze(-1) * v


def wkv6_torch(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor,
               chunk_size: int = 16) -> torch.Tensor:
    """The chunked PyTorch WKV (:func:`wkv6`'s reference; same arguments). With gradients, the in-chunk
    (T, T, d_k) decay factors are recomputed in the backward instead of being kept."""
    dtype = r.dtype
    work = torch.promote_types(dtype, torch.float32)
    b, h, length, _ = r.shape
    dv = v.shape[-1]
    steps = max(1, min(chunk_size, length))
    chunks = -(-length // steps)
    pad = chunks * steps - length
    # Padded steps have no key (nothing enters the state) and no decay; their outputs are dropped.
    r, k, v, log_w = (F.pad(t.to(work), (0, 0, 0, pad)).view(b, h, chunks, steps, t.shape[-1]) for t in (r, k, v, log_w))
    u = u.to(work)
    inclusive = log_w.double().cumsum(3)
    exclusive = F.pad(inclusive[:, :, :, :-1], (0, 0, 1, 0))  # exactly the inclusive sum one step back
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, k, v, log_w, u)):
        out = torch.utils.checkpoint.checkpoint(_wkv6_chunk_products, r, k, v, inclusive, exclusive, u,
                                                use_reentrant=False)
    else:
        out = _wkv6_chunk_products(r, k, v, inclusive, exclusive, u)
    # State after each chunk: S_c = diag(exp(A_end)) S_{c-1} + sum_s (k_s exp(A_end - A_s)) v_s^T.
    end = inclusive[:, :, :, -1:]
    chunk_kv = (k * torch.exp((end - inclusive).to(work))).transpose(-1, -2) @ v  # (B, H, chunks, d_k, d_v)
    whole = torch.exp(end.to(work)).transpose(-1, -2)  # (B, H, chunks, d_k, 1)
    out = out + (r * torch.exp(exclusive.to(work))) @ _entering_states(whole, chunk_kv)
    return out.reshape(b, h, chunks * steps, dv)[:, :, :length].to(dtype)


def wkv6_sequential(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor,
                    u: torch.Tensor) -> torch.Tensor:
    """WKV step by step in float64, as its definition reads: the brute-force check (L Python steps)."""
    r, k, v, log_w, u = (t.double() for t in (r, k, v, log_w, u))
    state = r.new_zeros(*r.shape[:2], r.shape[-1], v.shape[-1])
    out = []
    for t in range(r.shape[2]):
        kv = k[:, :, t, :, None] * v[:, :, t, None, :]
        out.append((r[:, :, t, :, None] * (state + u[:, :, None] * kv)).sum(-2))
        state = torch.exp(log_w[:, :, t, :, None]) * state + kv
    return torch.stack(out, 2)


def _wkv6_fla(r: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``fla.ops.rwkv6.chunk_rwkv6`` on (B, H, L, d) tensors (it takes (B, L, H, d))."""
    from fla.ops.rwkv6 import chunk_rwkv6

    o = chunk_rwkv6(*(t.transpose(1, 2) for t in (r, k, v, log_w)), u, scale=1.0)
    return (o[0] if isinstance(o, tuple) else o).transpose(1, 2)
