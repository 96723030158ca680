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


def _pair_table(k: int, m_in: int, m_out: int, seed: int) -> np.ndarray:
    """(K, M_out) int32: a random input row per (offset, output) with probability 0.3, else -1;
    offset 1 has no pairs at all."""
    rng = np.random.default_rng(seed)
    table = np.full((k, m_out), -1, np.int32)
    valid = rng.random((k, m_out)) < 0.3
    valid[1] = False
    table[valid] = rng.integers(0, m_in, valid.sum())
    return table


def test_plan_lists_each_valid_pair_once_in_chunks_of_one_offset():
    table = _pair_table(27, 300, 250, seed=0)
    plan = weight_grad_plan(torch.from_numpy(table), chunk=7)
    offsets, outputs = np.nonzero(table >= 0)
    np.testing.assert_array_equal(plan.pair_out.numpy(), outputs)
    lo, hi, first = plan.chunk_lo.numpy(), plan.chunk_hi.numpy(), plan.first_chunk.numpy()
    np.testing.assert_array_equal(plan.chunk_offset.numpy(), np.repeat(np.arange(27), np.diff(first)))
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
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 passed" in result.stdout


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (spconv's implicit GEMM)")


def _conv_and_input(subm: bool):
    from voxsparse.ops.sparse_backend import spnn

    torch.manual_seed(0)
    cells = torch.randperm(40 * 60 * 60)[:20_000]
    coords = torch.stack([torch.zeros_like(cells), cells // 3600, cells // 60 % 60, cells % 60], 1).int().cuda()
    conv_cls = spnn.SubMConv3d if subm else spnn.SparseConv3d
    conv = conv_cls(32, 64, 3, stride=1 if subm else 2, padding=1, bias=False, indice_key="k").cuda()
    return conv, coords, [40, 60, 60], torch.randn(len(coords), 32, device="cuda")


@requires_cuda
@pytest.mark.parametrize("subm", [True, False])
def test_sparse_conv_function_gradients_equal_spconv(subm):
    """Output, input and weight gradients of one fp32 conv through SparseConvFunction against
    spconv's module (outputs compared voxel by voxel: the two may list the output voxels in
    different orders)."""
    from voxsparse.ops.sparse_backend import SparseConvTensor
    from voxsparse.ops.sparse_plan import SparseConvFunction, build_pairs, run_conv
    from voxsparse.ops.sparse_utils import linear_keys

    conv, coords, shape, features = _conv_and_input(subm)
    results = []
    for ours in (False, True):
        x = features.clone().requires_grad_()
        conv.weight.grad = None
        if ours:
            pairs = build_pairs(conv, coords, shape, 1)
            assert pairs.weight_grad is not None, "fp32 training pairs on CUDA carry the Triton pair lists"
            out, out_coords = run_conv(conv, x, pairs), pairs.out_indices
            assert out.grad_fn.name().startswith(SparseConvFunction.__name__)
        else:
            result = conv(SparseConvTensor(x, coords, shape, 1))
            out, out_coords = result.features, result.indices
        order = torch.argsort(linear_keys(out_coords.long(), [1, *shape]))
        # A fixed weight per output voxel (not per row), so both orders see the same loss.
        weight = torch.sin(linear_keys(out_coords.long(), [1, *shape]).float())[:, None] * torch.linspace(-1, 1, 64, device="cuda")
        (out * weight).sum().backward()
        results.append((out.detach()[order], x.grad, conv.weight.grad))
    # The weight gradient sums ~10^5 products per entry, in another order than spconv's.
    for ref, got, name, tol in zip(results[0], results[1], ("output", "input grad", "weight grad"), (1e-5, 1e-5, 5e-5)):
        torch.testing.assert_close(got, ref, atol=tol * ref.abs().max().item(), rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")


@requires_cuda
def test_mixed_precision_keeps_spconv_backward():
    from voxsparse.ops.sparse_plan import build_pairs

    conv, coords, shape, _ = _conv_and_input(True)
    with torch.autocast("cuda", dtype=torch.float16):
        assert build_pairs(conv, coords, shape, 1).weight_grad is None
    with torch.no_grad():
        assert build_pairs(conv, coords, shape, 1).weight_grad is None
