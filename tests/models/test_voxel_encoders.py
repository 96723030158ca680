"""MeanVFE and VoxelNetVFE: brute-force per-voxel references, gradients, empty inputs, configs."""

import numpy as np
import pytest
import torch

from voxsparse.models.voxel_encoders import MeanVFE, VoxelNetVFE
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
GRID = VoxelGrid((0.5, 0.5, 0.5), (-4.0, -4.0, -2.0, 4.0, 4.0, 2.0))


def _points(frame_sizes, seed, dtype=torch.float32, columns=4):
    """Frames of tight blobs (several points per voxel) plus scattered points, some beyond the range."""
    gen = torch.Generator().manual_seed(seed)
    frames = []
    for n in frame_sizes:
        centres = torch.randn(3, columns, generator=gen, dtype=torch.float64) * 2
        blob = centres[torch.randint(0, 3, (n,), generator=gen)]
        blob = blob + 0.12 * torch.randn(n, columns, generator=gen, dtype=torch.float64)
        scattered = torch.randn(n, columns, generator=gen, dtype=torch.float64) * 3
        frames.append(torch.where(torch.rand(n, 1, generator=gen) < 0.7, blob, scattered).to(dtype))
    return PointBatch.from_frames(frames)


def _voxel_groups(points: PointBatch, grid):
    """dict (b, z, y, x) -> row indices of its points, by an independent float64 loop."""
    r, s, n = grid.point_cloud_range, grid.voxel_size, grid.grid_size
    groups = {}
    for i, (p, b) in enumerate(zip(points.points.double().tolist(), points.batch_index.tolist())):
        if all(r[a] <= p[a] < r[a + 3] for a in range(3)):
            ix = [min(int(np.floor((p[a] - r[a]) / s[a])), n[a] - 1) for a in range(3)]
            groups.setdefault((b, ix[2], ix[1], ix[0]), []).append(i)
    return groups


@pytest.mark.parametrize("device", DEVICES)
def test_mean_vfe_matches_reference(device):
    points = _points([300, 0, 200], 0, columns=5)
    vfe = MeanVFE(GRID, in_channels=5)
    out = vfe(points.to(device))
    groups = _voxel_groups(points, GRID)
    keys = sorted(groups)
    expected = torch.stack([points.points.double()[groups[k]].mean(0) for k in keys])
    assert isinstance(out, SparseVoxels) and out.grid == GRID and out.batch_size == 3
    assert vfe.out_channels == 5 and vfe.grid == GRID
    assert out.coords.cpu().tolist() == [list(k) for k in keys]
    assert out.features.dtype == torch.float32
    torch.testing.assert_close(out.features.cpu().double(), expected, atol=1e-6, rtol=1e-6)


def test_mean_vfe_invariant_to_point_order():
    points = _points([500, 300], 1)
    perm = torch.randperm(800, generator=torch.Generator().manual_seed(0))
    shuffled = PointBatch(points.points[perm], points.batch_index[perm], 2)
    a, b = MeanVFE(GRID)(points), MeanVFE(GRID)(shuffled)
    assert torch.equal(a.coords, b.coords)
    torch.testing.assert_close(a.features, b.features)


def _reference_voxelnet(vfe: VoxelNetVFE, points: PointBatch):
    """Per-voxel loop, float64, with the module's (eval-mode) layers."""
    groups = _voxel_groups(points, vfe.grid)
    size = torch.tensor(vfe.grid.voxel_size, dtype=torch.float64)
    low = torch.tensor(vfe.grid.point_cloud_range[:3], dtype=torch.float64)
    out = []
    for key in sorted(groups):
        pts = points.points.double()[groups[key]]
        xyz = pts[:, :3]
        centre = (torch.tensor([key[3], key[2], key[1]]).double() + 0.5) * size + low
        x = torch.cat([pts, xyz - xyz.mean(0), xyz - centre], dim=1)
        for i, layer in enumerate(vfe.layers):
            x = layer(x)
            pooled = x.max(dim=0).values
            if i + 1 < len(vfe.layers):
                x = torch.cat([x, pooled.expand_as(x)], dim=1)
        out.append(pooled)
    return sorted(groups), torch.stack(out)


def _trained_statistics(vfe):
    """Give BatchNorm non-trivial running statistics so eval mode is more than identity."""
    gen = torch.Generator().manual_seed(9)
    for layer in vfe.layers:
        bn = layer[1]
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.data.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
    return vfe


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_channels", [(16,), (8, 16), (8, 8, 12)])
def test_voxelnet_vfe_matches_per_voxel_reference(layer_channels, device):
    points = _points([120, 0, 80], 2, dtype=torch.float64)
    vfe = _trained_statistics(VoxelNetVFE(GRID, 4, layer_channels)).double().eval()
    keys, expected = _reference_voxelnet(vfe, points)
    out = vfe.to(device)(points.to(device))
    assert vfe.out_channels == layer_channels[-1] and out.features.shape == (len(keys), layer_channels[-1])
    assert out.coords.cpu().tolist() == [list(k) for k in keys]
    torch.testing.assert_close(out.features.cpu(), expected)


def test_voxelnet_vfe_without_voxel_center():
    vfe = VoxelNetVFE(GRID, 4, (8, 8), with_voxel_center=False)
    assert vfe.layers[0][0].in_features == 4 + 3 and vfe.layers[1][0].in_features == 16
    assert vfe(_points([50], 3)).features.shape[1] == 8


def test_voxelnet_vfe_gradcheck():
    # Few points, few voxels; BatchNorm in eval mode so the map is a function of the inputs.
    points = _points([10, 8], 5, dtype=torch.float64)  # 7 voxels, three with 2-4 points
    vfe = _trained_statistics(VoxelNetVFE(GRID, 4, (4, 6))).double().eval()
    batch = points.batch_index

    def f(pts):
        return vfe(PointBatch(pts, batch, 2)).features

    assert torch.autograd.gradcheck(f, (points.points.clone().requires_grad_(),))


def test_voxelnet_vfe_trains():
    vfe = VoxelNetVFE(GRID, 4, (16, 32)).train()
    out = vfe(_points([400, 200], 5))
    out.features.square().mean().backward()
    for name, p in vfe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("make", [lambda: MeanVFE(GRID, 4), lambda: VoxelNetVFE(GRID, 4, (8, 16))])
def test_empty_inputs(make):
    vfe = make().train()
    for points in (
        PointBatch.from_frames([torch.zeros(0, 4)]),
        PointBatch.from_frames([torch.full((6, 4), 50.0), torch.zeros(0, 4)]),  # all out of range
    ):
        out = vfe(points)
        assert out.coords.shape == (0, 4) and out.coords.dtype == torch.int32
        assert out.features.shape == (0, vfe.out_channels) and out.batch_size == points.batch_size
        if isinstance(vfe, VoxelNetVFE):
            out.features.sum().backward()  # connected to the parameters, no NaN statistics
            assert torch.isfinite(vfe.layers[0][1].running_mean).all()


def test_wrong_point_width_is_a_clear_error():
    with pytest.raises(ValueError, match="5 columns"):
        MeanVFE(GRID, in_channels=5)(_points([10], 6))


def test_hydra_instantiation():
    instantiate = pytest.importorskip("hydra.utils").instantiate
    cfg = {
        "_target_": "voxsparse.models.voxel_encoders.VoxelNetVFE",
        "in_channels": 4,
        "layer_channels": [8, 16],
        "grid": {"_target_": "voxsparse.structures.VoxelGrid", "voxel_size": [0.5, 0.5, 0.5],
                 "point_cloud_range": [-4, -4, -2, 4, 4, 2]},
    }
    vfe = instantiate(cfg)
    assert vfe.grid == GRID and vfe.out_channels == 16
    assert vfe(_points([20], 7)).features.shape[1] == 16


def _pfn_encoder(kind: str):
    from voxsparse.models.voxel_encoders import DynamicPillarVFE, DynamicVoxelVFE

    torch.manual_seed(0)
    encoder = (DynamicVoxelVFE if kind == "voxel" else DynamicPillarVFE)(GRID, in_channels=4, layer_channels=(16, 24, 32))
    for module in encoder.modules():  # non-trivial running statistics, so the BatchNorm fold is exercised
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return encoder.eval()


@pytest.mark.parametrize("kind", ["voxel", "pillar"])
def test_pfn_inference_path_equals_the_layers(kind):
    # Without grad in eval mode the PFN layers run folded and split (dynamic_pillar._inference_layers).
    encoder, points = _pfn_encoder(kind), _points([900, 400], seed=5)
    with torch.no_grad():
        fast = encoder(points)
    slow = encoder(points)
    assert torch.equal(fast.coords, slow.coords)
    torch.testing.assert_close(fast.features, slow.features.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["voxel", "pillar"])
def test_pfn_rows_sorted_by_cell_give_the_same_output_and_gradients(kind, monkeypatch):
    # CUDA sorts the points by cell and takes segment maxima; forced here on the CPU.
    from voxsparse.models.voxel_encoders import dynamic_pillar

    points = _points([900, 400], seed=6)
    results = []
    for sort in (False, True):
        monkeypatch.setitem(dynamic_pillar._SORT_ROWS_BY_CELL, "cpu", sort)
        encoder = _pfn_encoder(kind).train()
        out = encoder(points)
        out.features.square().sum().backward()
        with torch.no_grad():
            inference = encoder.eval()(points).features
        results.append((out.coords, out.features.detach(), encoder.pfn_layers[0].linear.weight.grad, inference))
    # Training-mode BatchNorm sums its statistics in the new row order: float-order differences only.
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
