"""The batched native-algorithm convolution of voxsparse.ops.cuda_sparse_conv against spconv's loop.

Its arithmetic is plain torch, so on the CPU the backend is made to route spconv's modules through it
and their outputs and gradients are compared with the CPU path (spconv's arithmetic); on CUDA a
5x5x5 convolution, which spconv runs with its native algorithm there, is compared with the CPU.
"""

import pytest
import torch

from tests.ops.test_cpu_sparse_conv import KINDS, _network, _random_sparse, _run
from voxsparse.ops import cpu_sparse_conv, cuda_sparse_conv
from voxsparse.ops.sparse_backend import SparseConvTensor

pytest.importorskip("spconv.pytorch.ops")


def _route_cpu_calls_here(monkeypatch) -> None:
    monkeypatch.setattr(cpu_sparse_conv, "supports", lambda features: False)
    monkeypatch.setattr(cuda_sparse_conv, "supports",
                        lambda features, filters, num_out: features.dtype in cuda_sparse_conv.DTYPES)


def _count_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("indice_conv", "indice_conv_backward"):
        fn = getattr(cuda_sparse_conv, name)
        monkeypatch.setattr(cuda_sparse_conv, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


@pytest.mark.parametrize("chunk", [cuda_sparse_conv.CHUNK_ELEMENTS, 5000])
@pytest.mark.parametrize("dims,kind,kernel,stride", KINDS + [(3, "subm", 5, 1), (2, "subm", 5, 1)])
def test_equals_spconv_arithmetic(monkeypatch, dims, kind, kernel, stride, chunk):
    """Forward, input and weight gradients equal spconv's loop in float64, in one chunk of offsets or many."""
    shape = [12, 40, 40][-dims:]
    coords, feats = _random_sparse(dims + 10 * stride + kernel, shape, 3000 if dims == 3 else 900, 5)
    feats = feats.double()
    net = _network(dims, kind, kernel, stride).double()
    theirs = _run(net, coords, feats, shape)
    net.zero_grad(set_to_none=True)
    with monkeypatch.context() as m:
        _route_cpu_calls_here(m)
        m.setattr(cuda_sparse_conv, "CHUNK_ELEMENTS", chunk)
        ours = _run(net, coords, feats, shape)
    for a, b in zip(ours[:2] + tuple(ours[2]), theirs[:2] + tuple(theirs[2])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_routing_covers_the_backward(monkeypatch):
    """A training step through the routed path calls both of its functions, once per convolution."""
    _route_cpu_calls_here(monkeypatch)
    calls = _count_calls(monkeypatch)
    coords, feats = _random_sparse(0, [12, 40, 40], 2000, 5)
    _run(_network(3, "subm", 5, 1), coords, feats, [12, 40, 40])
    assert calls.count("indice_conv") == 2 and calls.count("indice_conv_backward") == 2


def test_missing_neighbours_read_zero_rows():
    """The gather tables point a missing neighbour at the appended zero row, and a submanifold
    table is symmetric: output o reads input i at offset k exactly when i reads o at K - 1 - k."""
    from spconv.core import ConvAlgo
    from spconv.pytorch import ops

    coords, _ = _random_sparse(3, [8, 16, 16], 300, 1)
    _, pairs, num = ops.get_indice_pairs(coords, 2, [8, 16, 16], ConvAlgo.Native, [5, 5, 5], [1] * 3, [2] * 3,
                                           [1] * 3, [0] * 3, True, False)
    table, transposed = cuda_sparse_conv.gather_tables(pairs, num, 300, 300, False, True)
    assert transposed is None and table.shape == (300, 125)
    present = table < 300
    assert present[:, 62].all() and (table[:, 62] == torch.arange(300)).all()
    o, k = present.nonzero(as_tuple=True)
    assert (table[table[o, k], 124 - k] == o).all()
    # Brute force: a neighbour at offset k exists exactly where the coordinates say so.
    lookup = {tuple(c): i for i, c in enumerate(coords.tolist())}
    grid = torch.stack(torch.meshgrid(*[torch.arange(-2, 3)] * 3, indexing="ij"), -1).reshape(125, 3)
    for row in range(0, 300, 37):
        b, *xyz = coords[row].tolist()
        expected = [lookup.get((b, *(torch.tensor(xyz) + d).tolist()), 300) for d in grid]
        assert table[row].tolist() == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["subm", "strided", "inverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_5x5x5_equals_the_cpu(monkeypatch, kind, dtype):
    """5x5x5 convolutions, which spconv runs with its native algorithm on CUDA, trained one step
    through this path equal the CPU's spconv arithmetic (float16 under autocast, as trained)."""
    shape = [16, 64, 64]
    coords, feats = _random_sparse(7, shape, 6000, 5)
    net = _network(3, kind, 5, 2)

    def step(device: str):
        model = net.to(device)
        model.zero_grad(set_to_none=True)
        x = feats.to(device).requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=dtype == torch.float16 and device == "cuda"):
            out = model(SparseConvTensor(x, coords.to(device), shape, 2))
        # Output rows in coordinate order: the devices may list a strided conv's outputs differently,
        # so each output voxel takes the same gradient on both by its coordinates, not its row.
        keys = out.indices.long().cpu() @ torch.tensor([1 << 30, 1 << 20, 1 << 10, 1])
        order = torch.argsort(keys)
        grad = torch.empty(out.features.shape)
        grad[order] = torch.randn(out.features.shape, generator=torch.Generator().manual_seed(1))
        (out.features.float() * grad.to(device)).sum().backward()
        rows = out.features.detach().float().cpu()[order]
        return [rows, x.grad.float().cpu(), *[p.grad.float().cpu() for p in model.parameters()]]

    calls = _count_calls(monkeypatch)
    ours = step("cuda")
    assert calls.count("indice_conv") == len(list(net.parameters())) and "indice_conv_backward" in calls
    theirs = step("cpu")
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 5e-2}
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_layers_stay_with_spconv(monkeypatch):
    """A layer whose gather exceeds ROUTE_ELEMENTS runs spconv's own loop."""
    coords, feats = _random_sparse(7, [16, 64, 64], 6000, 5)
    net = _network(3, "subm", 5, 1).cuda()
    calls = _count_calls(monkeypatch)
    monkeypatch.setattr(cuda_sparse_conv, "ROUTE_ELEMENTS", 6000 * 125 * 5 - 1)
    out = net(SparseConvTensor(feats.cuda(), coords.cuda(), [16, 64, 64], 2))
    assert "indice_conv" not in calls and out.features.shape == (6000, 8)


def test_no_voxels(monkeypatch):
    """An empty active set gives empty outputs and zero weight gradients, as spconv's loop does."""
    _route_cpu_calls_here(monkeypatch)
    net = _network(3, "subm", 5, 1)
    out, grad_in, grads = _run(net, torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 5), [12, 40, 40])
    assert out.shape == (0, 8) and grad_in.shape == (0, 5)
    assert all(g is not None and not g.any() for g in grads)
