"""The export routes of spconv's convolutions against spconv itself: the custom ops (run eagerly) and the
plain-torch convolutions, on random sparse inputs with two threads; the exportable partition and
neighbour lookups against the eager ones."""

from __future__ import annotations

import pytest
import torch

from voxsparse.models.backbones import dsvt_partition
from voxsparse.ops import export_ops
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import grid_offsets, neighbor_indices

# (dims, submanifold, kernel, stride, padding, dilation)
CASES = [
    (3, True, 3, 1, 1, 1),
    (3, False, 3, 2, 1, 1),
    (3, False, (3, 1, 1), (2, 1, 1), 0, 1),
    (2, True, 3, 1, 1, 1),
    (2, True, 5, 1, 4, 2),
    (2, False, 3, 2, 1, 1),
]


def _sparse_input(dims: int, seed: int, channels: int = 5) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(M, C) features and (M, 1 + dims) int32 unique indices over two frames."""
    generator = torch.Generator().manual_seed(seed)
    shape = [9, 21, 17][-dims:]
    cells = torch.stack([torch.randint(0, 2, (500,), generator=generator)]
                        + [torch.randint(0, s, (500,), generator=generator) for s in shape], dim=1)
    indices = torch.unique(cells, dim=0).int()
    return torch.randn(len(indices), channels, generator=generator), indices, shape


def _conv(dims: int, subm: bool, kernel, stride, padding, dilation) -> torch.nn.Module:
    cls = {(3, True): spnn.SubMConv3d, (3, False): spnn.SparseConv3d,
           (2, True): spnn.SubMConv2d, (2, False): spnn.SparseConv2d}[(dims, subm)]
    torch.manual_seed(1)
    return cls(5, 7, kernel, stride=stride, padding=padding, dilation=dilation, bias=True).eval()


def _by_voxel(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.zeros(len(indices), dtype=torch.int64)
    for column in indices.long().unbind(1):
        keys = keys * 1000 + column
    order = torch.argsort(keys)
    return indices[order], features[order]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}d-{'subm' if c[1] else 'conv'}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("route", ["custom", "torch"])
def test_routes_equal_spconv(case, route):
    features, indices, shape = _sparse_input(case[0], seed=len(case) + case[0])
    conv = _conv(*case)
    with torch.no_grad():
        expected = conv(SparseConvTensor(features, indices, shape, 2))
        context = export_ops.routed_through_custom_ops if route == "custom" else export_ops.routed_through_torch
        with context(conv):
            actual = conv(SparseConvTensor(features, indices, shape, 2))
    assert actual.spatial_shape == expected.spatial_shape
    want_indices, want = _by_voxel(expected.indices, expected.features)
    got_indices, got = _by_voxel(actual.indices, actual.features)
    assert torch.equal(want_indices, got_indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_routing_is_undone():
    ops = pytest.importorskip("spconv.pytorch.ops")
    before = ops.get_indice_pairs, ops.indice_conv
    conv = _conv(3, True, 3, 1, 1, 1)
    algo = conv.algo
    with export_ops.routed_through_torch(conv):
        assert ops.get_indice_pairs is not before[0]
    assert (ops.get_indice_pairs, ops.indice_conv) == before and conv.algo == algo


def test_custom_ops_trace_with_an_unbacked_voxel_count():
    features, indices, shape = _sparse_input(3, seed=3)
    conv = _conv(3, False, 3, 2, 1, 1)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, f, i):
            out = self.conv(SparseConvTensor(f, i, shape, 2))
            return out.indices, out.features

    rows = torch.export.Dim("rows", min=2)
    with export_ops.routed_through_custom_ops(conv), torch.no_grad():
        program = torch.export.export(Net(), (features, indices), dynamic_shapes=({0: rows}, {0: rows}))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"voxsparse.conv_pairs.default", "voxsparse.indice_conv.default"} <= ops
    for seed in (4, 5):  # other inputs, other voxel counts
        f, i, _ = _sparse_input(3, seed)
        with torch.no_grad():
            expected = conv(SparseConvTensor(f, i, shape, 2))
        got_indices, got = program.module()(f, i)
        assert torch.equal(got_indices, expected.indices)
        torch.testing.assert_close(got, expected.features)


def test_table_neighbour_lookup_equals_the_sorted_search():
    _, indices, _ = _sparse_input(2, seed=7)
    offsets = torch.cat([torch.zeros(25, 1, dtype=torch.long), grid_offsets(5, 2)], dim=1)
    shape = (2, 21, 17)
    assert torch.equal(export_ops.table_neighbor_indices(indices, shape, offsets),
                       neighbor_indices(indices, shape, offsets))


def test_traced_window_starts_equal_the_running_maximum():
    generator = torch.Generator().manual_seed(0)
    keys = torch.sort(torch.randint(0, 40, (300,), generator=generator)).values
    starts = torch.ones(len(keys), dtype=torch.bool)
    starts[1:] = keys[1:] != keys[:-1]
    window_id = torch.cumsum(starts.long(), 0) - 1
    count = torch.zeros(len(keys), dtype=torch.long).scatter_add_(0, window_id, torch.ones_like(window_id))
    position = torch.arange(len(keys))
    eager = dsvt_partition._window_starts(starts, position, window_id, count, traced=False)
    traced = dsvt_partition._window_starts(starts, position, window_id, count, traced=True)
    assert torch.equal(eager, traced)
