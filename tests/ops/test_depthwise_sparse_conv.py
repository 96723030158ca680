"""Depthwise sparse convolution over spconv's pairs: against spconv's own SubMConv3d with a diagonal
weight (same offsets as spconv's weights), against a brute-force neighbour sum, and its gradients."""

from __future__ import annotations

import pytest
import torch

from voxsparse.ops.depthwise_sparse_conv import SparseDepthwiseConv3d, depthwise_pairs, depthwise_sparse_conv
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import neighbor_indices

SHAPE = (6, 20, 24)


def _voxels(n=400, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, batch, (n,), generator=g)]
                         + [torch.randint(0, s, (n,), generator=g) for s in SHAPE], 1)
    return torch.unique(coords, dim=0).int()


def _offsets(kernel):
    axes = [torch.arange(k) - k // 2 for k in kernel]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([torch.zeros(len(grid), 1, dtype=torch.long), grid], 1)


@pytest.mark.parametrize("kernel", [(3, 3, 3), (1, 1, 13), (1, 13, 1), (1, 3, 5)])
def test_equals_spconv_with_a_diagonal_weight_and_brute_force(kernel):
    torch.manual_seed(0)
    coords = _voxels()
    c = 5
    features = torch.randn(len(coords), c, dtype=torch.float64)
    conv = SparseDepthwiseConv3d(c, kernel).double()
    ours = conv(features, depthwise_pairs(coords, SHAPE, 2, kernel))

    dense = spnn.SubMConv3d(c, c, kernel, padding=[k // 2 for k in kernel], bias=False).double()
    with torch.no_grad():
        dense.weight.zero_()
        for ch in range(c):
            dense.weight[ch, ..., ch] = conv.weight[..., ch]
    theirs = dense(SparseConvTensor(features, coords, list(SHAPE), 2)).features
    torch.testing.assert_close(ours, theirs)

    nbr = neighbor_indices(coords, (2, *SHAPE), _offsets(kernel))  # (M, K)
    gathered = torch.where((nbr >= 0)[..., None], features[nbr.clamp(min=0)], 0.0)  # (M, K, C)
    brute = (gathered * conv.weight.reshape(-1, c)[None]).sum(1)
    torch.testing.assert_close(ours, brute)


def test_gradients():
    coords = _voxels(200)
    pairs = depthwise_pairs(coords, SHAPE, 2, (3, 3, 3))
    features = torch.randn(len(coords), 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(27, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda f, w: depthwise_sparse_conv(f, w, pairs), (features, weight))


def test_empty_and_single_voxel():
    empty = depthwise_pairs(torch.zeros(0, 4, dtype=torch.int32), SHAPE, 1, 3)
    assert depthwise_sparse_conv(torch.zeros(0, 2), torch.ones(27, 2), empty).shape == (0, 2)
    one = depthwise_pairs(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), SHAPE, 1, 3)
    weight = torch.randn(27, 2)
    torch.testing.assert_close(depthwise_sparse_conv(torch.ones(1, 2), weight, one), weight[13:14])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu():
    coords = _voxels(3000)
    features = torch.randn(len(coords), 8)
    weight = torch.randn(13, 8)
    out = {}
    grads = {}
    for device in ("cpu", "cuda"):
        f = features.to(device, copy=True).requires_grad_(True)
        w = weight.to(device, copy=True).requires_grad_(True)
        y = depthwise_sparse_conv(f, w, depthwise_pairs(coords.to(device), SHAPE, 2, (1, 1, 13)))
        y.square().sum().backward()
        out[device], grads[device] = y.detach().cpu(), (f.grad.cpu(), w.grad.cpu())
    torch.testing.assert_close(out["cuda"], out["cpu"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["cuda"], grads["cpu"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
