"""Linear recurrences: the chunked references against step-by-step / quadratic float64 versions, their
gradients, and the GPU paths against the references (skipped without CUDA; the Triton selective scan
also runs in Triton's CPU interpreter where Triton is installed)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from voxsparse.ops.linear_rnn import (
    retention,
    retention_naive,
    retention_torch,
    selective_scan,
    selective_scan_sequential,
    selective_scan_torch,
    wkv6,
    wkv6_sequential,
    wkv6_torch,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (the fresh-interpreter test sets it)")


def _scan_inputs(bt=3, dc=6, length=37, n=4, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "u": torch.randn(bt, dc, length, generator=g), "delta": torch.randn(bt, dc, length, generator=g),
        "A": -torch.rand(dc, n, generator=g) * 16, "B": torch.randn(bt, n, length, generator=g),
        "C": torch.randn(bt, n, length, generator=g), "D": torch.randn(dc, generator=g),
        "z": torch.randn(bt, dc, length, generator=g), "delta_bias": torch.randn(dc, generator=g),
    }
    return {k: v.to(device) for k, v in tensors.items()}


@pytest.mark.parametrize("chunk", [None, 1, 5, 37, 64])
@pytest.mark.parametrize("optional", [True, False])
def test_selective_scan_chunks_equal_the_step_by_step_scan(chunk, optional):
    inputs = _scan_inputs()
    if not optional:  # steps must then be non-negative themselves, or the state grows without bound
        inputs.update(D=None, z=None, delta_bias=None, delta=inputs["delta"].abs())
    expected = selective_scan_sequential(**inputs, delta_softplus=optional)
    out = selective_scan_torch(**inputs, delta_softplus=optional, chunk_size=chunk)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert selective_scan(**inputs, delta_softplus=optional, backend="torch").dtype == torch.float32


def test_selective_scan_gradients():
    inputs = {k: v.double().requires_grad_() for k, v in _scan_inputs(length=20).items()}
    grads = torch.autograd.grad(selective_scan_torch(**inputs, delta_softplus=True, chunk_size=6).square().sum(),
                                list(inputs.values()))
    expected = torch.autograd.grad(selective_scan_sequential(**inputs, delta_softplus=True).square().sum(),
                                   list(inputs.values()))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_selective_scan_checks_shapes_and_backend():
    inputs = _scan_inputs()
    with pytest.raises(ValueError, match="B and C"):
        selective_scan(**dict(inputs, B=inputs["B"][:, :2]))
    with pytest.raises(ValueError, match="backend"):
        selective_scan(**inputs, backend="fla")


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("length,chunk", [(130, 64), (50, 16), (64, 64), (7, 64)])
def test_retention_chunks_equal_the_quadratic_form(bidirectional, length, chunk):
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 3, length, 8, generator=g), torch.randn(2, 3, length, 8, generator=g)
    v = torch.randn(2, 3, length, 16, generator=g)
    out = retention(q, k, v, bidirectional_chunks=bidirectional, chunk_size=chunk)
    expected = retention_naive(q, k, v, chunk, bidirectional)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=2e-5)


def test_retention_without_bidirectional_chunks_ignores_the_chunk_size():
    q, k, v = torch.randn(3, 1, 2, 90, 8).unbind(0)
    torch.testing.assert_close(retention_torch(q, k, v, 7), retention_torch(q, k, v, 64), rtol=1e-5, atol=1e-5)


def test_retention_gradients():
    q, k, v = (torch.randn(1, 2, 70, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grads = torch.autograd.grad(retention_torch(q, k, v, 16, True).square().sum(), (q, k, v))
    expected = torch.autograd.grad(retention_naive(q, k, v, 16, True).square().sum(), (q, k, v))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def _wkv_inputs(b=2, h=3, length=45, dk=8, dv=6, decay_scale=2.0, decay_shift=0.0, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r, k, log_w = (torch.randn(b, h, length, dk, generator=g) for _ in range(3))
    log_w = -torch.exp(log_w * decay_scale + decay_shift)
    v, u = torch.randn(b, h, length, dv, generator=g), torch.randn(h, dk, generator=g)
    return [t.to(device) for t in (r, k, v, log_w, u)]


@pytest.mark.parametrize("length,chunk", [(45, 1), (45, 5), (45, 16), (16, 16), (3, 16), (45, 64)])
def test_wkv6_chunks_equal_the_step_by_step_recurrence(length, chunk):
    inputs = _wkv_inputs(length=length)
    out = wkv6(*inputs, chunk_size=chunk)
    assert out.shape == (2, 3, length, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), wkv6_sequential(*inputs), rtol=1e-5, atol=1e-4)


def test_wkv6_stays_exact_through_very_strong_decays():
    """Log decays down to about -1e6 (a channel forgets at once) next to weak ones: the differences
    of the cumulative sums are float64, so the weak channels keep float32 accuracy."""
    inputs = _wkv_inputs(length=64, decay_scale=3.0, decay_shift=3.0, seed=3)
    assert inputs[3].min() < -1e5 and inputs[3].max() > -1e-2
    torch.testing.assert_close(wkv6_torch(*inputs).double(), wkv6_sequential(*inputs), rtol=1e-5, atol=1e-4)


def test_wkv6_gradients():
    inputs = [t.double().requires_grad_() for t in _wkv_inputs(b=1, h=2, length=21, dk=4, dv=3)]
    assert torch.autograd.gradcheck(lambda *a: wkv6_torch(*a, chunk_size=8), inputs)


def test_wkv6_checks_shapes_and_backend():
    r, k, v, log_w, u = _wkv_inputs()
    with pytest.raises(ValueError, match="u must be"):
        wkv6(r, k, v, log_w, u[:, :4])
    with pytest.raises(ValueError, match="backend"):
        wkv6(r, k, v, log_w, u, backend="triton")


#: fla's chunked kernels multiply float32 in TF32 (Triton's default precision for ``tl.dot``): its
#: retention was 1.4e-3 of the output's scale from the float64 reference on an H100 (ours: 3e-7).
#: This bound admits that rounding and still catches a wrong call (layout, scale, decay), which
#: is off by the order of the output itself.
FLA_TF32_TOLERANCE = 5e-3


def _assert_within_scale(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=tolerance * expected.abs().max().item())


def _wkv_cuda_problem() -> tuple[list[torch.Tensor], torch.Tensor]:
    inputs = _wkv_inputs(b=4, h=4, length=700, dk=32, dv=32, decay_scale=1.0, decay_shift=-2.0)
    return [t.cuda() for t in inputs], wkv6_torch(*inputs)


@cuda
def test_wkv6_on_cuda_equals_the_cpu():
    cuda_inputs, expected = _wkv_cuda_problem()
    torch.testing.assert_close(wkv6_torch(*cuda_inputs).cpu(), expected, rtol=1e-4, atol=1e-4)


@cuda
def test_fla_wkv6_equals_the_reference():
    pytest.importorskip("fla")
    cuda_inputs, expected = _wkv_cuda_problem()
    _assert_within_scale(wkv6(*cuda_inputs, backend="fla").cpu(), expected, FLA_TF32_TOLERANCE)


_SCAN_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
_OPTIONAL = ("D", "z", "delta_bias")


def _check_triton_scan(scan, device, bt, dc, length, n, kept, softplus):
    """Output and the gradient of every input given of ``scan`` against the reference in float64.
    ``kept``: the optional inputs (D, z, delta_bias) given; without softplus, the steps are |delta|."""
    inputs = _scan_inputs(bt, dc, length, n, device=device)
    if not softplus:  # steps must then be non-negative themselves (and delta_bias is not kept)
        inputs["delta"] = inputs["delta"].abs()
    inputs = {k: v for k, v in inputs.items() if k not in _OPTIONAL or k in kept}
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref_leaves = {k: v.double().requires_grad_() for k, v in inputs.items()}
    out = scan(**leaves, delta_softplus=softplus)
    expected = selective_scan_torch(**ref_leaves, delta_softplus=softplus)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)
    grads = torch.autograd.grad(out, list(leaves.values()), weight)
    expected_grads = torch.autograd.grad(expected, list(ref_leaves.values()), weight.double())
    for name, g, e in zip(leaves, grads, expected_grads):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * e.abs().max().item(),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")


@cuda
@pytest.mark.parametrize("length", [1, 37, 1024])
@pytest.mark.parametrize("n", [3, 16])
@pytest.mark.parametrize("kept,softplus", [(_OPTIONAL, True), ((), False), (("z",), True)])
def test_triton_selective_scan_equals_the_reference(length, n, kept, softplus):
    scan = functools.partial(selective_scan, backend="triton")
    _check_triton_scan(scan, "cuda", 4, 70, length, n, kept, softplus)


def _interpreted_scan(delta_softplus=False, **inputs):
    """The Triton selective scan's autograd Function on CPU tensors (the public function insists on CUDA)."""
    from voxsparse.ops import linear_rnn_triton

    return linear_rnn_triton._SelectiveScan.apply(*(inputs.get(k) for k in _SCAN_NAMES), delta_softplus)


@interpreted
@pytest.mark.parametrize("bt,dc,length,n,kept,softplus", [
    (2, 40, 23, 16, _OPTIONAL, True),  # two blocks of channels, the second partly masked
    (1, 33, 17, 3, (), False),
    (2, 9, 30, 3, ("z",), True),
])
def test_interpreted_triton_selective_scan(bt, dc, length, n, kept, softplus):
    pytest.importorskip("triton")
    _check_triton_scan(_interpreted_scan, "cpu", bt, dc, length, n, kept, softplus)


@interpreted
def test_interpreted_triton_selective_scan_without_steps():
    pytest.importorskip("triton")
    inputs = {k: v.requires_grad_() for k, v in _scan_inputs(length=0).items()}
    out = _interpreted_scan(**inputs, delta_softplus=True)
    assert out.shape == (3, 6, 0)
    for g, v in zip(torch.autograd.grad(out, list(inputs.values()), out), inputs.values()):
        assert g.shape == v.shape and not g.any()


def test_triton_selective_scan_in_a_fresh_interpreter():
    """Triton decides between interpreting and compiling its own library functions (tl.sum's, ...)
    when it is imported, so the interpreter needs TRITON_INTERPRET=1 from the process's start; set
    later it fails, set in this process it would stay on for every later kernel. Hence a subprocess."""
    if INTERPRETED or torch.cuda.is_available():
        pytest.skip("the kernel tests above run directly here")
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
        check=False, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout


@cuda
def test_fla_retention_equals_the_reference():
    pytest.importorskip("fla")
    q, k, v = (torch.randn(2, 4, 300, 32, device="cuda") for _ in range(3))
    expected = retention_torch(q.double(), k.double(), v.double())
    _assert_within_scale(retention(q, k, v, backend="fla").double(), expected, FLA_TF32_TOLERANCE)


def test_fla_naive_references_equal_ours():
    """fla's own step-by-step / quadratic references (any device) compute what our references compute,
    so a difference of its kernels on a GPU is their arithmetic, not the call."""
    retention_naive_fla = pytest.importorskip("fla.ops.retention.naive").naive_retention
    rwkv6_naive_fla = pytest.importorskip("fla.ops.rwkv6.recurrent_naive").naive_recurrent_rwkv6
    q, k, v = (torch.randn(2, 4, 150, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    torch.testing.assert_close(retention_naive_fla(q, k, v), retention_torch(q, k, v), rtol=1e-4, atol=1e-4)
    r, k, v, log_w, u = _wkv_inputs(b=2, h=4, length=120, dk=16, dv=16, decay_scale=1.0, decay_shift=-2.0)
    expected, _ = rwkv6_naive_fla(r, k, v, log_w, u, scale=1.0)
    torch.testing.assert_close(wkv6_torch(r, k, v, log_w, u), expected, rtol=1e-4, atol=1e-4)
