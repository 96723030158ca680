"""Scattered linear attention: the torch path against a per-window brute force, its gradients, and
(on CUDA with Triton) the kernels against the torch path in fp32."""

from __future__ import annotations

import pytest
import torch

from voxsparse.ops import scattered_attention as sa
from voxsparse.ops.scattered_attention import WindowSegments, scattered_linear_attention

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(windows=7, heads=2, d=16, e=16, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 70, (windows,), generator=g)
    index = torch.repeat_interleave(torch.arange(windows), counts)
    n = len(index)
    q = torch.rand(n, heads, d, generator=g, dtype=dtype)
    k = torch.rand(n, heads, d, generator=g, dtype=dtype)
    v = torch.randn(n, heads, e, generator=g, dtype=dtype)
    return [t.to(device) for t in (q, k, v)], WindowSegments.from_sorted(index.to(device), windows)


def _brute_force(q, k, v, segments, eps=1e-6):
    out = torch.empty_like(v)
    for w in range(segments.num_windows):
        rows = segments.index == w
        kv = torch.einsum("nhd,nhe->hde", k[rows], v[rows])
        s = k[rows].sum(0)  # (H, D)
        num = torch.einsum("nhd,hde->nhe", q[rows], kv)
        out[rows] = num / ((q[rows] * s).sum(-1, keepdim=True) + eps)
    return out


def test_equals_brute_force():
    (q, k, v), segments = _problem(e=8)
    torch.testing.assert_close(scattered_linear_attention(q, k, v, segments), _brute_force(q, k, v, segments))


def test_batched_paths_equal_the_reference_definitions(monkeypatch):
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([1, 3, 8, 9, 16, 17, 40, 130, 2])  # every size group, padding included
    segments = WindowSegments.from_sorted(torch.repeat_interleave(torch.arange(len(counts)), counts))
    assert segments.offsets.tolist() == (torch.cumsum(counts, 0) - counts).tolist()
    n = int(counts.sum())
    a, x = torch.randn(n, 2, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, 4, generator=g, dtype=torch.float64)
    b = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    mats = torch.randn(len(counts), 2, 4, 3, generator=g, dtype=torch.float64)
    outer, vecmat = sa.segment_outer_sum(a, b, segments), sa.segment_vecmat(x, mats, segments)
    monkeypatch.setattr(sa, "_CHUNK_ELEMENTS", 3 * 2 * 4 * 3)  # the reference in chunks of 3 rows
    torch.testing.assert_close(outer, sa.segment_outer_sum_reference(a, b, segments))
    torch.testing.assert_close(vecmat, sa.segment_vecmat_reference(x, mats, segments))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    """Window sums of a few hundred voxels pass float16's range (65504); the result must not."""
    windows, heads, d = 3, 2, 16
    index = torch.repeat_interleave(torch.arange(windows), torch.tensor([400, 5, 300]))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.rand(len(index), heads, d, generator=g) * 20 for _ in range(3))
    segments = WindowSegments.from_sorted(index, windows)
    out = scattered_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype), segments)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = _brute_force(*(t.to(dtype).double() for t in (q, k, v)), segments)
    torch.testing.assert_close(out.double(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_gradients():
    (q, k, v), segments = _problem(windows=3, heads=2, d=3, e=2)
    for t in (q, k, v):
        t.requires_grad_(True)
    torch.autograd.gradcheck(lambda a, b, c: scattered_linear_attention(a, b, c, segments), (q, k, v))
    mats = torch.randn(segments.num_windows, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, m: sa.segment_vecmat(x, m, segments), (q, mats))


@CUDA
@pytest.mark.skipif(not sa.triton_voxelize.available(), reason="needs Triton")
@pytest.mark.parametrize("d", [16, 32, 64])
def test_triton_equals_torch_in_fp32(d):
    (q, k, v), segments = _problem(windows=300, heads=4, d=d, e=d, dtype=torch.float32, device="cuda")
    assert sa._triton_fits(q, k)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = scattered_linear_attention(q, k, v, segments)
    grad = torch.randn_like(out)
    out.backward(grad)
    ours = [out.detach(), q.grad, k.grad, v.grad]
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    kv = sa.segment_outer_sum_reference(ref_inputs[1], ref_inputs[2], segments)
    s = torch.zeros_like(kv[..., 0]).index_add_(0, segments.index, ref_inputs[1])
    num = sa.segment_vecmat_reference(ref_inputs[0], kv, segments)
    ref = num / ((s[segments.index] * ref_inputs[0]).sum(-1, keepdim=True) + 1e-6)
    ref.backward(grad)
    for a, b in zip(ours, [ref.detach()] + [t.grad for t in ref_inputs]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
