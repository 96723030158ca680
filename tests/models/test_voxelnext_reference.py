"""The reference VoxelNeXt configs compute what OpenPCDet's VoxelNeXt computes (commit 8caccce).

CPU tests need nothing but voxsparse: the hard-capped, float32-quantized MeanVFE against a loop, the
backbone's z padding, and parameter counts equal to OpenPCDet's full-size modules. Tests that run
OpenPCDet's own modules (executed by path from a checkout, reduced widths, random weights and
BatchNorm statistics) skip unless ``VOXSPARSE_OPENPCDET`` names the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone, biases_after_conv_on_cpu
from voxsparse.models.keys import KeyPair, TensorKind
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.structures import PointBatch, VoxelGrid

GRID = VoxelGrid((0.1, 0.1, 0.2), (-6.4, -6.4, -2.0, 6.4, 6.4, 2.0))  # 128 x 128 x 20


def _openpcdet_root() -> Path:
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout")
    return Path(root)


def _points(seed: int, n: int = 2000, features: int = 2, frames: int = 2) -> PointBatch:
    """Clustered points (many voxels hold more than a few points) plus scattered and out-of-range ones."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    low, high = torch.tensor(GRID.point_cloud_range[:3]), torch.tensor(GRID.point_cloud_range[3:])
    for _ in range(frames):
        centres = low + torch.rand(12, 3, generator=gen) * (high - low)
        xyz = centres[torch.randint(0, 12, (n,), generator=gen)] + 0.6 * torch.randn(n, 3, generator=gen)
        feats = torch.rand(n, features, generator=gen)
        out.append(torch.cat([xyz, feats], 1))
    return PointBatch.from_frames(out)


def reference_backbone_options(channels=(16, 32, 64, 128, 128), out_channels=128, kernel_sizes=(3, 3, 3, 3)) -> dict:
    """VoxelNeXtBackbone's options for OpenPCDet's backbone with CHANNELS, OUT_CHANNEL, SPCONV_KERNEL_SIZES."""
    return dict(channels=(*channels, channels[4]), blocks=(2,) * 6, bev_stage=3, out_channels=out_channels,
                down_kernel_sizes=(*kernel_sizes, kernel_sizes[3]), z_padding=1, block_bias=True, bn_momentum=0.01,
                bev_subm_bias=True, bev_subm_eps=1e-5, bev_subm_momentum=0.1)


def load_reference_weights(module: torch.nn.Module, theirs: dict[str, torch.Tensor], pairs: list[KeyPair]) -> None:
    """``theirs`` (an OpenPCDet module's state dict, spconv 2.2+ layout) into ``module`` through ``pairs``."""
    ours = module.state_dict()
    assert sorted(p.ours for p in pairs) == sorted(ours), "openpcdet_keys must cover the whole state dict"
    assert sorted(p.theirs for p in pairs) == sorted(theirs), "openpcdet_keys must name every reference tensor"
    for p in pairs:
        value = theirs[p.theirs]
        if p.kind == TensorKind.SPARSE_CONV_AS_LINEAR:  # spconv's 1x1 conv is features @ W.view(Cin, Cout)
            value = value.reshape(value.shape[-1], value.shape[0]).T
        ours[p.ours] = value.reshape(ours[p.ours].shape)
    module.load_state_dict(ours)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Random weights, biases and BatchNorm statistics (eval-mode outputs depend on all of them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            elif name.endswith("weight") and t.ndim == 1:  # BatchNorm scale
                t.copy_(0.5 + torch.rand(t.shape, generator=gen))
            else:
                fan_in = t[0].numel() if t.ndim > 1 else 1
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in**0.5)


def _sorted_rows(coords: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.from_numpy(np.lexsort(coords.long().numpy().T[::-1].copy()))
    return coords[order].long(), features[order]


# ---------------------------------------------------------------- CPU, no checkout


def _loop_mean_vfe(points: PointBatch, max_points: int, max_voxels: int):
    """OpenPCDet's data processor + MeanVFE as a loop: float32 indices, first points, first voxels."""
    lo, size, extent = np.float32(GRID.point_cloud_range[:3]), np.float32(GRID.voxel_size), GRID.grid_size
    pts, batch = points.points.numpy(), points.batch_index.numpy()
    voxels: dict[tuple, list] = {}
    opened: dict[int, int] = {}
    for p, b in zip(pts, batch):
        idx = [int(np.floor((p[i] - lo[i]) / size[i])) for i in range(3)]
        if not all(0 <= idx[i] < extent[i] for i in range(3)):
            continue
        key = (int(b), idx[2], idx[1], idx[0])
        if key not in voxels:
            if opened.get(int(b), 0) >= max_voxels:
                continue
            opened[int(b)] = opened.get(int(b), 0) + 1
            voxels[key] = []
        if len(voxels[key]) < max_points:
            voxels[key].append(p)
    keys = sorted(voxels)
    return torch.tensor(keys), torch.tensor(np.stack([np.mean(voxels[k], 0) for k in keys]))


@pytest.mark.parametrize("train", [False, True])
def test_hard_mean_vfe_matches_loop(train):
    points = _points(0, n=1500)
    vfe = MeanVFE(GRID, 5, max_points_per_voxel=3, max_voxels=300, max_voxels_train=200, quantization="float32")
    vfe.train(train)
    out = vfe(points)
    coords, means = _loop_mean_vfe(points, 3, 200 if train else 300)
    assert out.coords.tolist() == coords.tolist()
    torch.testing.assert_close(out.features, means.float(), rtol=1e-6, atol=1e-6)
    assert torch.bincount(out.coords[:, 0].long()).max() == (200 if train else 300)


def test_backbone_pads_z_by_one_cell():
    torch.manual_seed(0)
    points = _points(1, n=800, features=1, frames=1)
    voxels = MeanVFE(GRID, 4)(points)
    small = dict(channels=(4, 4, 4, 4, 4), out_channels=4)
    padded = VoxelNeXtBackbone(4, **reference_backbone_options(**small)).eval()
    assert padded.input_shape(GRID) == [21, 128, 128]
    plain = VoxelNeXtBackbone(4, **{**reference_backbone_options(**small), "z_padding": 0}).eval()
    plain.load_state_dict(padded.state_dict())
    assert plain.input_shape(GRID) == [20, 128, 128]
    with torch.no_grad():
        a, b = padded(voxels), plain(voxels)
    assert a.spatial_shape == b.spatial_shape == (16, 16)
    # 20 z cells halve to 10, 5, 3, 2, 1; 21 to 11, 6, 3, 2, 1: other voxels reach the BEV.
    assert len(a) != len(b) or not torch.allclose(a.features, b.features)


def test_full_size_backbone_parameters_equal_openpcdet():
    backbone = VoxelNeXtBackbone(5, **reference_backbone_options())
    assert sum(p.numel() for p in backbone.parameters()) == 7_368_720  # OpenPCDet's VoxelResBackBone8xVoxelNeXt, nuScenes (5 point features)
    keys = backbone.openpcdet_keys()
    assert {p.ours for p in keys} == set(backbone.state_dict())
    assert {"conv_input.0.weight", "conv1.1.conv2.bias", "conv6.0.0.weight", "conv6.0.1.num_batches_tracked",
            "conv_out.0.weight", "shared_conv.0.bias", "shared_conv.1.running_var"} <= {p.theirs for p in keys}
    large = VoxelNeXtBackbone(5, **reference_backbone_options((32, 64, 128, 256, 256), 256, (5, 5, 3, 3)))
    assert sum(p.numel() for p in large.parameters()) == 30_458_912  # Waymo's voxelnext_ioubranch_large
    assert large.stages[1][0][0].weight.shape == (64, 5, 5, 5, 32)
    assert large.stages[5][0][0].weight.shape == (256, 3, 3, 3, 256)


# ---------------------------------------------------------------- against OpenPCDet's modules


def test_vfe_and_backbone_match_openpcdet():
    root = _openpcdet_root()
    from spconv.pytorch.utils import PointToVoxel

    from voxsparse.benchmark.openpcdet import _exec_sources, load_openpcdet_voxelnext

    backbone_cls = load_openpcdet_voxelnext(root)
    vfe_module = _exec_sources(root, {
        "pcdet.models.backbones_3d.vfe.vfe_template": "pcdet/models/backbones_3d/vfe/vfe_template.py",
        "pcdet.models.backbones_3d.vfe.mean_vfe": "pcdet/models/backbones_3d/vfe/mean_vfe.py",
    })
    points = _points(2)
    # Their data processor, frame by frame, then their collate (batch index as the first column).
    generator = PointToVoxel(vsize_xyz=list(GRID.voxel_size), coors_range_xyz=list(GRID.point_cloud_range),
                             num_point_features=5, max_num_voxels=1000, max_num_points_per_voxel=5)
    voxels, coords, num = [], [], []
    for b in range(points.batch_size):
        v, c, n = generator(points.points[points.batch_index == b])
        voxels.append(v)
        coords.append(torch.nn.functional.pad(c, (1, 0), value=b))
        num.append(n)
    batch = {"voxels": torch.cat(voxels), "voxel_num_points": torch.cat(num), "voxel_coords": torch.cat(coords),
             "batch_size": points.batch_size}
    vfe_module.MeanVFE(model_cfg={}, num_point_features=5)(batch)
    ours_vfe = MeanVFE(GRID, 5, max_points_per_voxel=5, max_voxels=1000, quantization="float32").eval()
    ours_voxels = ours_vfe(points)
    ref_coords, ref_features = _sorted_rows(batch["voxel_coords"], batch["voxel_features"])
    assert torch.equal(ours_voxels.coords.long(), ref_coords)
    assert torch.equal(ours_voxels.features, ref_features)  # same sums in the same order: bit-equal

    for channels, out_channels, kernels in [((8, 8, 16, 16, 16), 16, (3, 3, 3, 3)),
                                            ((8, 16, 16, 24, 24), 24, (5, 5, 3, 3))]:
        cfg = {"CHANNELS": list(channels), "OUT_CHANNEL": out_channels, "SPCONV_KERNEL_SIZES": list(kernels)}
        theirs = backbone_cls(cfg, 5, np.array(GRID.grid_size))
        randomize(theirs, 3)
        ours = VoxelNeXtBackbone(5, **reference_backbone_options(channels, out_channels, kernels))
        load_reference_weights(ours, theirs.state_dict(), ours.openpcdet_keys())
        theirs.eval(), ours.eval()
        # spconv's CPU build runs their biased convs only with the bias added after the kernel.
        with torch.no_grad(), biases_after_conv_on_cpu(theirs, ref_features):
            out = theirs({"voxel_features": ref_features, "voxel_coords": ref_coords.int(),
                          "batch_size": points.batch_size})["encoded_spconv_tensor"]
            expected = _sorted_rows(out.indices, out.features)
        # On the CPU without autograd the biased convs run layer by layer; with it, index-first.
        for index_first, grad in ((False, False), (True, True)):
            ours.index_first = index_first
            with torch.set_grad_enabled(grad):
                bev = ours(ours_voxels)
            got = _sorted_rows(bev.coords, bev.features.detach())
            assert bev.spatial_shape == tuple(out.spatial_shape) and bev.stride == 8
            assert torch.equal(got[0], expected[0])
            torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)


def test_mean_vfe_tanh_columns_feed_the_reference_waymo_intensity():
    points = _points(5, n=300, frames=1)
    raw = MeanVFE(GRID, 5, max_points_per_voxel=5, quantization="float32")
    tanh = MeanVFE(GRID, 5, max_points_per_voxel=5, quantization="float32", tanh_columns=[3])
    squashed = points.points.clone()
    squashed[:, 3] = torch.tanh(squashed[:, 3])
    expected = raw(PointBatch(squashed, points.batch_index, 1))
    got = tanh(points)
    assert torch.equal(got.coords, expected.coords) and torch.equal(got.features, expected.features)
    with pytest.raises(ValueError, match="tanh_columns"):
        MeanVFE(GRID, 5, tanh_columns=[2])
