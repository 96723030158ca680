"""ScatterFormer's backbone: invariance to voxel order, empty and single-column inputs, the grid check,
the configs' reference names, and scatterformer_small through the detector contract."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from tool_runs import compose_config

from voxsparse.convert.openpcdet import openpcdet_to_ours, ours_to_openpcdet, reference_pairs
from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.models.backbones.scatterformer import ScatterFormerBackbone
from voxsparse.models.contracts import check_losses
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid

GRID = VoxelGrid((1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 32.0, 28.0, 11.0))  # 32 x 28 x 11: 12 -> 5 -> 3 z cells


def _voxels(n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([torch.randint(0, 2, (n,), generator=g), torch.randint(0, 11, (n,), generator=g),
                          torch.randint(0, 28, (n,), generator=g), torch.randint(0, 32, (n,), generator=g)], 1)
    coords = torch.unique(coords, dim=0).int()
    return SparseVoxels(coords, torch.randn(len(coords), 4, generator=g), GRID, 2)


def _backbone(**kwargs):
    torch.manual_seed(0)
    return ScatterFormerBackbone(4, channels=16, window_size=6, pillar_size=3, num_heads=2, pool_heads=2, **kwargs)


def test_output_is_per_column_and_does_not_depend_on_voxel_order_nor_fusion():
    model = _backbone().eval()
    voxels = _voxels()
    with torch.no_grad():
        bev = model(voxels)
        perm = torch.randperm(len(voxels), generator=torch.Generator().manual_seed(1))
        shuffled = model(SparseVoxels(voxels.coords[perm], voxels.features[perm], GRID, 2))
        fused = fuse_for_inference(model)(voxels)
    torch.testing.assert_close(fused.features, bev.features, rtol=1e-4, atol=1e-5)
    assert bev.stride == 2 and bev.spatial_shape == (14, 16) and bev.features.shape[1] == 16
    cols = torch.unique(torch.stack([voxels.coords[:, 0], voxels.coords[:, 2] // 2, voxels.coords[:, 3] // 2], 1), dim=0)
    # the stride-2 3x3 conv dilates each column's footprint: every input column is in the output
    out = {tuple(c) for c in bev.coords.tolist()}
    assert {tuple(c) for c in cols.tolist()} <= out
    assert torch.equal(bev.coords, shuffled.coords)
    torch.testing.assert_close(bev.features, shuffled.features, rtol=1e-4, atol=1e-5)


def test_empty_single_voxel_and_grid_check():
    model = _backbone().eval()
    with torch.no_grad():
        empty = model(SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4), GRID, 2))
        assert empty.features.shape == (0, 16) and empty.spatial_shape == (14, 16)
        one = model(SparseVoxels(torch.tensor([[1, 3, 5, 7]], dtype=torch.int32), torch.ones(1, 4), GRID, 2))
        assert torch.isfinite(one.features).all() and (one.coords[:, 0] == 1).all()
    tall = VoxelGrid((1.0, 1.0, 1.0), (0.0, 0.0, 0.0, 32.0, 28.0, 20.0))
    with pytest.raises(ValueError, match="pillar_size"):
        model(SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 4), tall, 1))


def test_backward_reaches_every_parameter():
    model = _backbone(bn_momentum=0.1).train()
    model(_voxels()).features.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("name", ["scatterformer_waymo", "scatterformer_nuscenes"])
def test_reference_configs_name_every_tensor(name):
    dataset = "waymo" if "waymo" in name else "nuscenes"
    model = instantiate(compose_config("train", [f"model={name}", f"dataset={dataset}"]).model)
    pairs = reference_pairs(model)
    backbone = [p for p in pairs if p.ours.startswith("backbone.")]
    assert all(p.theirs == "backbone_3d." + p.ours[len("backbone."):] for p in backbone)
    assert {p.theirs.split(".")[1] for p in backbone} == {"cpe", "stage1", "stage2", "app"}
    state = model.state_dict()
    back, _ = openpcdet_to_ours(model, ours_to_openpcdet(model, state))
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_small_config_trains_and_predicts(tmp_path):
    frames = SyntheticDataset("train", 2, seed=4, cache_dir=tmp_path)
    batch = collate([DetectionDataset(frames, (-20.0, -20.0, -3.0, 20.0, 20.0, 2.0))[i] for i in range(2)])
    points = PointBatch(batch.points.points[::16], batch.points.batch_index[::16], 2)  # fewer voxels, same scene
    torch.manual_seed(0)
    model = instantiate(compose_config("train", ["model=scatterformer_small"]).model).train()
    losses = model(points, batch.annotations)
    check_losses(losses)
    losses.total.backward()
    detections = model.eval().predict(points)
    assert len(detections) == 2 and all(torch.all(d.scores[:-1] >= d.scores[1:]) for d in detections)
    empty = PointBatch(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)
    with torch.no_grad():
        assert [len(d) for d in model.predict(empty)] == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu_in_fp32():
    """On CUDA the attention runs the Triton kernels and the depthwise pairs come from spconv's GPU build."""
    torch.manual_seed(0)
    model = ScatterFormerBackbone(4, channels=32, window_size=6, pillar_size=3, num_heads=2, pool_heads=2).train()
    voxels = _voxels(3000)
    results = []
    for device in ("cpu", "cuda"):
        model.to(device).zero_grad()
        features = voxels.features.detach().to(device).requires_grad_(True)  # a leaf on each device
        bev = model(SparseVoxels(voxels.coords.to(device), features, GRID, 2))
        bev.features.square().mean().backward()
        grads = [p.grad.detach().cpu() for p in model.parameters()]
        results.append((bev.coords.cpu(), bev.features.detach().cpu(), features.grad.cpu(), grads))
    (c0, f0, g0, p0), (c1, f1, g1, p1) = results
    assert torch.equal(c0, c1)
    torch.testing.assert_close(f1, f0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-4)
    for a, b in zip(p1, p0):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
