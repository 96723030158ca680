"""The CPU convolution of voxsparse.ops.cpu_sparse_conv against spconv's own loop, with two threads."""

import pytest
import torch

from voxsparse.ops import cpu_sparse_conv
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn

ops = pytest.importorskip("spconv.pytorch.ops")


def _random_sparse(seed: int, shape: list[int], count: int, channels: int):
    gen = torch.Generator().manual_seed(seed)
    volume = 1
    for s in shape:
        volume *= s
    flat = torch.randperm(volume, generator=gen)[:count]
    coords = []
    for s in reversed(shape):
        coords.append(flat % s)
        flat = flat // s
    batch = (torch.arange(count) % 2).int()  # two frames
    coords = torch.stack([batch, *reversed(coords)], dim=1).int()
    return coords, torch.randn(count, channels, generator=gen)


def _spconv_loop(monkeypatch):
    """spconv's own per-offset loop (its kernels single-threaded by the backend), as before this module."""
    monkeypatch.setattr(ops, "indice_conv", ops.indice_conv.__wrapped__)
    monkeypatch.setattr(ops, "indice_conv_backward", ops.indice_conv_backward.__wrapped__)


# (dims, kind, kernel size, stride): every convolution kind the models use.
KINDS = [
    (3, "subm", 3, 1),
    (3, "strided", 3, 2),
    (3, "strided", 5, 2),
    (3, "inverse", 3, 2),
    (2, "subm", 3, 1),
    (2, "strided", 3, 1),  # VoxelNeXt's BEV output conv: a regular conv of stride 1
]


def _network(dims: int, kind: str, kernel: int, stride: int) -> torch.nn.Module:
    torch.manual_seed(0)
    sub, conv = (spnn.SubMConv3d, spnn.SparseConv3d) if dims == 3 else (spnn.SubMConv2d, spnn.SparseConv2d)
    if kind == "subm":
        return spnn.SparseSequential(sub(5, 8, kernel, padding=kernel // 2, bias=False, indice_key="s"),
                                     sub(8, 8, kernel, padding=kernel // 2, bias=False, indice_key="s"))
    down = conv(5, 8, kernel, stride=stride, padding=kernel // 2, bias=False, indice_key="down")
    if kind == "strided":
        return spnn.SparseSequential(down)
    return spnn.SparseSequential(down, spnn.SparseInverseConv3d(8, 6, kernel, bias=False, indice_key="down"))


def _run(net: torch.nn.Module, coords: torch.Tensor, feats: torch.Tensor, shape: list[int]):
    feats = feats.clone().requires_grad_(True)
    out = net(SparseConvTensor(feats, coords, shape, 2))
    grad_out = torch.randn(out.features.shape, generator=torch.Generator().manual_seed(1))
    (out.features * grad_out).sum().backward()
    return out.features.detach(), feats.grad, [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("block", [cpu_sparse_conv.BLOCK_ELEMENTS, 256])
@pytest.mark.parametrize("dims,kind,kernel,stride", KINDS)
def test_equals_spconv_loop_with_two_threads(monkeypatch, dims, kind, kernel, stride, block):
    """Forward, input and weight gradients equal spconv's loop bit for bit, in one block or many."""
    assert torch.get_num_threads() == 2
    shape = [12, 40, 40][-dims:]
    coords, feats = _random_sparse(dims + 10 * stride, shape, 3000 if dims == 3 else 900, 5)
    net = _network(dims, kind, kernel, stride)
    monkeypatch.setattr(cpu_sparse_conv, "BLOCK_ELEMENTS", block)
    ours = _run(net, coords, feats, shape)
    net.zero_grad(set_to_none=True)
    with monkeypatch.context() as m:
        _spconv_loop(m)
        theirs = _run(net, coords, feats, shape)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)
    for a, b in zip(ours[2], theirs[2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.get_num_threads() == 2


def test_one_thread_switch_per_block(monkeypatch):
    """The scatter-adds of a block run in one single-threaded stretch (not one per kernel offset)."""
    coords, feats = _random_sparse(0, [12, 40, 40], 3000, 8)
    conv = spnn.SubMConv3d(8, 8, 3, padding=1, bias=False)
    switches = []
    set_num_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (switches.append(n), set_num_threads(n)))
    out = conv(SparseConvTensor(feats.requires_grad_(True), coords, [12, 40, 40], 2))
    forward = len(switches)
    out.features.sum().backward()
    # The forward's and the backward's products fit one block each: one switch to one thread and back.
    assert forward == 2 and len(switches) == 4


def test_float16_stays_with_spconv():
    assert cpu_sparse_conv.supports(torch.zeros(1, dtype=torch.float32))
    assert not cpu_sparse_conv.supports(torch.zeros(1, dtype=torch.float16))
