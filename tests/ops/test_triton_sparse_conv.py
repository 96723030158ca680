"""The Triton weight gradient of sparse convolutions: its pair lists, its sums against a float64
brute force, and the training backward built on it against spconv's own.

The kernel runs on CUDA; without a GPU it runs in Triton's CPU interpreter (in a subprocess, as
the interpreter is chosen when Triton is imported) where Triton is installed, else it is skipped.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from voxsparse.ops.triton_sparse_conv import weight_grad, weight_grad_plan

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if INTERPRETED else None


def _pair_table(k: int, m_in: int, m_out: int, seed: int, empty_offset: int | None = 1) -> np.ndarray:
    """(K, M_out) int32: a random input row per (offset, output) with probability 0.3, else -1."""
    rng = np.random.default_rng(seed)
    table = np.full((k, m_out), -1, np.int32)
    valid = rng.random((k, m_out)) < 0.3
    if empty_offset is not None:
        valid[empty_offset] = False
    table[valid] = rng.integers(0, m_in, valid.sum())
    return table


def test_plan_lists_each_valid_pair_once_in_chunks_of_one_offset():
    table = _pair_table(27, 300, 250, seed=0)
    plan = weight_grad_plan(torch.from_numpy(table), chunk=7)
    offsets, outputs = np.nonzero(table >= 0)
    np.testing.assert_array_equal(plan.pair_out.numpy(), outputs)
    np.testing.assert_array_equal(plan.pair_in.numpy(), table[offsets, outputs])
    lo, hi, first = plan.chunk_lo.numpy(), plan.chunk_hi.numpy(), plan.first_chunk.numpy()
    assert plan.num_chunks == len(lo) == first[-1] and plan.num_offsets == 27
    assert first[2] == first[1]  # offset 1 has no pairs, so no chunks
    for k in range(27):
        chunks = range(first[k], first[k + 1])
        # The chunks of offset k tile exactly its pairs, in order, none longer than the chunk size.
        covered = np.concatenate([np.arange(lo[c], hi[c]) for c in chunks]) if chunks else np.zeros(0, int)
        np.testing.assert_array_equal(covered, np.flatnonzero(offsets == k))
        assert all(0 < hi[c] - lo[c] <= 7 for c in chunks)


def test_plan_rejects_a_table_that_is_not_two_dimensional():
    with pytest.raises(ValueError, match=r"pair_fwd must be \(K, M_out\)"):
        weight_grad_plan(torch.full((2, 27, 10), -1, dtype=torch.int32))


@pytest.mark.skipif(KERNEL_DEVICE is None, reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize(
    ("k", "m_in", "m_out", "c_in", "c_out", "dtype", "chunk"),
    [
        (27, 300, 250, 5, 16, torch.float32, 7),  # C_in below the 16-wide tile; many short chunks
        (27, 400, 400, 32, 32, torch.float32, 64),
        (9, 100, 60, 128, 72, torch.float32, 1024),  # two C_in tiles, a partial C_out tile
        (27, 200, 150, 16, 32, torch.float16, 13),
    ],
)
def test_weight_grad_equals_float64_brute_force(k, m_in, m_out, c_in, c_out, dtype, chunk):
    table = _pair_table(k, m_in, m_out, seed=k + c_in)
    gen = torch.Generator().manual_seed(c_out)
    x = torch.randn(m_in, c_in, generator=gen).to(dtype)
    dy = torch.randn(m_out, c_out, generator=gen).to(dtype)
    plan = weight_grad_plan(torch.from_numpy(table).to(KERNEL_DEVICE), chunk=chunk)
    dw = weight_grad(x.to(KERNEL_DEVICE), dy.to(KERNEL_DEVICE), plan, torch.Size([c_out, k, c_in]))
    assert dw.dtype == dtype and dw.shape == (c_out, k, c_in)
    ref = np.zeros((c_out, k, c_in))
    xd, gd = x.double().numpy(), dy.double().numpy()
    for offset, out in zip(*np.nonzero(table >= 0)):
        ref[:, offset, :] += np.outer(gd[out], xd[table[offset, out]])
    # fp32 sums of ~30 products; fp16 output rounding (half an ulp at the largest entries).
    tol = 1e-5 if dtype == torch.float32 else 6e-4
    np.testing.assert_allclose(dw.cpu().double().numpy(), ref, atol=tol * np.abs(ref).max(), rtol=0)


def test_weight_grad_in_triton_interpreter_without_gpu():
    if torch.cuda.is_available() or INTERPRETED:
        pytest.skip("the kernel test above runs directly here")
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "brute_force"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (spconv's implicit GEMM)")
@pytest.mark.parametrize("subm", [True, False])
@pytest.mark.parametrize("amp", [False, True])
def test_sparse_conv_function_gradients_equal_spconv(subm, amp):
    """Input and weight gradients of one conv through SparseConvFunction against spconv's module."""
    from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
    from voxsparse.ops.sparse_plan import SparseConvFunction, build_pairs, run_conv

    torch.manual_seed(0)
    shape = [40, 60, 60]
    cells = torch.randperm(40 * 60 * 60)[:20_000]
    coords = torch.stack([torch.zeros_like(cells), cells // 3600, cells // 60 % 60, cells % 60], 1).int().cuda()
    conv_cls = spnn.SubMConv3d if subm else spnn.SparseConv3d
    conv = conv_cls(32, 64, 3, stride=1 if subm else 2, padding=1, bias=False, indice_key="k").cuda()
    features = torch.randn(len(coords), 32, device="cuda")
    grads = []
    for ours in (False, True):
        x = features.clone().requires_grad_()
        conv.weight.grad = None
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            if ours:
                pairs = build_pairs(conv, coords, shape, 1)
                assert pairs.weight_grad is not None, "training pairs on CUDA carry the Triton pair lists"
                out = run_conv(conv, x, pairs)
                assert out.grad_fn.name().startswith(SparseConvFunction.__name__)
            else:
                out = conv(SparseConvTensor(x, coords, shape, 1))
                out = out.features
        torch.manual_seed(1)
        (out.float() * torch.randn(out.shape, device="cuda")).sum().backward()
        grads.append((out.detach().float(), x.grad, conv.weight.grad))
    tol = 1e-5 if not amp else 2e-3
    for ref, got, name in zip(grads[0], grads[1], ("output", "input grad", "weight grad")):
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max(), rtol=0, msg=name)
