"""The reference VoxelNeXt configs compute what OpenPCDet's VoxelNeXt computes (commit 8caccce).

CPU tests need nothing but voxsparse: the hard-capped, float32-quantized MeanVFE against a loop, the
backbone's z padding, and parameter counts equal to OpenPCDet's full-size modules. Tests that run
OpenPCDet's own modules (executed by path from a checkout, reduced widths, random weights and
BatchNorm statistics) skip unless ``VOXSPARSE_OPENPCDET`` names the checkout.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from voxsparse.benchmark.openpcdet import _attr_dict, load_openpcdet_voxelnext
from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.heads.voxelnext_reference import DEFAULT_SEPARATE_HEADS as DEFAULT_HEADS
from voxsparse.models.heads.voxelnext_reference import VoxelNeXtReferenceHead
from voxsparse.models.keys import KeyPair, TensorKind
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.ops.sparse_backend import SparseConvTensor
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseBEV, VoxelGrid

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
    return {
        "channels": (*channels, channels[4]), "blocks": (2,) * 6, "bev_stage": 3, "out_channels": out_channels,
        "down_kernel_sizes": (*kernel_sizes, kernel_sizes[3]), "z_padding": 1, "block_bias": True,
        "bn_momentum": 0.01, "bev_subm_bias": True, "bev_subm_eps": 1e-5, "bev_subm_momentum": 0.1,
    }


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
            if name.endswith("running_var") or (name.endswith("weight") and t.ndim == 1):  # BatchNorm
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
    small = {"channels": (4, 4, 4, 4, 4), "out_channels": 4}
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

    from voxsparse.benchmark.openpcdet import _exec_sources

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
        with torch.no_grad():
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


# ---------------------------------------------------------------- the head

NUSCENES_NAMES = ["car", "truck", "bus", "trailer", "construction_vehicle", "pedestrian", "motorcycle", "bicycle",
                  "traffic_cone", "barrier"]  # voxsparse's (the devkit's) order, not OpenPCDet's
NUSCENES_GROUPS = [["car"], ["truck", "construction_vehicle"], ["bus", "trailer"], ["barrier"],
                   ["motorcycle", "bicycle"], ["pedestrian", "traffic_cone"]]


def test_full_size_nuscenes_head_parameters_equal_openpcdet():
    head = VoxelNeXtReferenceHead(128, 10, NUSCENES_NAMES, NUSCENES_GROUPS)
    assert sum(p.numel() for p in head.parameters()) == 612_678
    keys = head.openpcdet_keys()
    assert {p.ours for p in keys} == set(head.state_dict())
    assert {"heads_list.0.center.0.0.weight", "heads_list.0.center.0.0.bias", "heads_list.5.hm.0.1.num_batches_tracked",
            "heads_list.5.hm.1.weight", "heads_list.3.vel.1.bias"} <= {p.theirs for p in keys}
    assert {p.kind for p in keys if p.theirs.endswith(".weight") and ".0.1." not in p.theirs
            and ".1.weight" in p.theirs} == {TensorKind.SPARSE_CONV_AS_LINEAR}


def test_head_groups_are_checked_against_the_class_names():
    with pytest.raises(ValueError, match="exactly once"):
        VoxelNeXtReferenceHead(16, 10, NUSCENES_NAMES, NUSCENES_GROUPS[:-1])
    with pytest.raises(ValueError, match="unknown: \\['Vehicle'\\]"):
        VoxelNeXtReferenceHead(16, 3, ["car", "truck", "bus"], [["Vehicle", "car"], ["truck", "bus"]])


def _bev(seed: int, channels: int, grid: VoxelGrid, cells: int = 300, frames: int = 2) -> SparseBEV:
    gen = torch.Generator().manual_seed(seed)
    x, y, _ = grid.grid_size
    h, w = (y + 7) // 8, (x + 7) // 8
    coords = []
    for b in range(frames):
        flat = torch.randperm(h * w, generator=gen)[:cells]
        coords.append(torch.stack([torch.full_like(flat, b), flat // w, flat % w], 1))
    coords = torch.cat(coords).int()
    coords, _ = _sorted_rows(coords, coords)
    return SparseBEV(coords.int(), torch.randn(len(coords), channels, generator=gen), (h, w), 8, grid, frames)


def _annotations(seed: int, grid: VoxelGrid, num_classes: int, frames: int = 2, boxes: int = 25,
                 velocity: bool = True) -> list[Annotations3D]:
    gen = torch.Generator().manual_seed(seed)
    r = torch.tensor(grid.point_cloud_range)
    out = []
    for _ in range(frames):
        centre = r[:3] + torch.rand(boxes, 3, generator=gen) * (r[3:] - r[:3])
        size = 0.4 + 4 * torch.rand(boxes, 3, generator=gen)
        heading = (torch.rand(boxes, 1, generator=gen) - 0.5) * 2 * math.pi
        parts = [centre, size, heading] + ([torch.randn(boxes, 2, generator=gen)] if velocity else [])
        labels = torch.randint(0, num_classes, (boxes,), generator=gen)
        zeros = torch.zeros(boxes, dtype=torch.int64)
        out.append(Annotations3D(Boxes3D(torch.cat(parts, 1)), labels, zeros, zeros + 1, zeros))
    return out


def _reference_head_module(root: Path, monkeypatch) -> types.ModuleType:
    """OpenPCDet's voxelnext_head module with its real losses; compiled ops replaced by voxsparse's exact ones."""
    from voxsparse.benchmark.openpcdet import _AttrDict, _exec_sources, _stub_module, _stub_parents
    from voxsparse.ops.boxes import iou_3d_aligned, nms_bev

    load_openpcdet_voxelnext(root)  # pcdet.utils.spconv_utils
    for name, attributes in (("numba", {"jit": lambda *a, **k: (lambda f: f)}), ("easydict", {"EasyDict": _AttrDict})):
        try:
            importlib.import_module(name)
        except ImportError:
            monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))

    def nms_gpu(boxes, scores, thresh, pre_maxsize=None, **kwargs):
        return nms_bev(boxes, scores, thresh, pre_maxsize), None

    _stub_parents(root, "pcdet.ops.iou3d_nms.iou3d_nms_utils")
    _stub_module("pcdet.ops.iou3d_nms.iou3d_nms_utils", nms_gpu=nms_gpu,
                 boxes_aligned_iou3d_gpu=lambda a, b: iou_3d_aligned(a, b)[:, None])
    _stub_module("pcdet.utils.box_utils")
    module = _exec_sources(root, {
        "pcdet.utils.loss_utils": "pcdet/utils/loss_utils.py",
        "pcdet.models.model_utils.centernet_utils": "pcdet/models/model_utils/centernet_utils.py",
        "pcdet.models.model_utils.model_nms_utils": "pcdet/models/model_utils/model_nms_utils.py",
        "pcdet.models.dense_heads.voxelnext_head": "pcdet/models/dense_heads/voxelnext_head.py",
    })
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # the head places constants with .cuda()
    return module


CASES = {
    "nuscenes": ("tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml",
                 VoxelGrid((0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)), NUSCENES_NAMES),
    "waymo": ("tools/cfgs/waymo_models/voxelnext_ioubranch_large.yaml",
              VoxelGrid((0.1, 0.1, 0.15), (-75.2, -75.2, -2.0, 75.2, 75.2, 4.0)), ["Vehicle", "Pedestrian", "Cyclist"]),
}


def head_options(cfg: dict, channels: int, class_names: list[str]) -> dict:
    """VoxelNeXtReferenceHead's options for an OpenPCDet DENSE_HEAD config."""
    post, losses = cfg["POST_PROCESSING"], cfg["LOSS_CONFIG"]["LOSS_WEIGHTS"]
    nms, target = post["NMS_CONFIG"], cfg["TARGET_ASSIGNER_CONFIG"]
    return {
        "in_channels": channels, "num_classes": len(class_names), "class_names": class_names,
        "class_groups": cfg["CLASS_NAMES_EACH_HEAD"], "separate_heads": cfg["SEPARATE_HEAD_CFG"]["HEAD_DICT"],
        "head_order": cfg["SEPARATE_HEAD_CFG"]["HEAD_ORDER"], "kernel_size": cfg.get("KERNEL_SIZE_HEAD", 3),
        "num_hm_conv": cfg["NUM_HM_CONV"], "bias_before_norm": cfg["USE_BIAS_BEFORE_NORM"],
        "cls_weight": losses["cls_weight"], "loc_weight": losses["loc_weight"],
        "code_weights": losses["code_weights"],
        "iou_weight": losses.get("iou_weight"), "num_max_objs": target["NUM_MAX_OBJS"],
        "gaussian_overlap": target["GAUSSIAN_OVERLAP"], "min_radius": target["MIN_RADIUS"],
        "max_obj_per_sample": post["MAX_OBJ_PER_SAMPLE"], "score_threshold": post["SCORE_THRESH"],
        "post_center_limit_range": post["POST_CENTER_LIMIT_RANGE"], "nms_threshold": nms["NMS_THRESH"],
        "nms_pre_maxsize": nms["NMS_PRE_MAXSIZE"], "nms_post_maxsize": nms["NMS_POST_MAXSIZE"],
        "iou_rectifier": cfg.get("RECTIFIER"),
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_head_matches_openpcdet(case, monkeypatch):
    root = _openpcdet_root()
    module = _reference_head_module(root, monkeypatch)
    config, grid, names = CASES[case]
    full = yaml.safe_load((root / config).read_text())
    channels = 16
    cfg = {**full["MODEL"]["DENSE_HEAD"], "SHARED_CONV_CHANNEL": channels}
    # At least as many cells per frame as the top-K (below it the reference mislabels; module docstring).
    cfg["POST_PROCESSING"] = {**cfg["POST_PROCESSING"], "MAX_OBJ_PER_SAMPLE": 60}
    theirs = module.VoxelNeXtHead(_attr_dict(cfg), channels, len(full["CLASS_NAMES"]), full["CLASS_NAMES"],
                                  np.array(grid.grid_size), list(grid.point_cloud_range), list(grid.voxel_size))
    randomize(theirs, 4)
    for head in theirs.heads_list:  # predicted IoUs mostly inside (-1, 1): rectified scores above 0
        if hasattr(head, "iou"):
            head.iou[-1].bias.data.fill_(1.5)
    ours = VoxelNeXtReferenceHead(**head_options(cfg, channels, names))
    load_reference_weights(ours, theirs.state_dict(), ours.openpcdet_keys())
    theirs.eval(), ours.eval()
    bev = _bev(5, channels, grid)
    x = SparseConvTensor(bev.features, bev.coords, list(bev.spatial_shape), bev.batch_size)
    with torch.no_grad():
        their_pred = [head(x) for head in theirs.heads_list]
        pred = ours(bev)
    for mine, their in zip(pred.groups, their_pred):
        assert set(mine) == set(their)
        for name in their:
            torch.testing.assert_close(mine[name], their[name], rtol=1e-5, atol=1e-5)

    # Targets and losses on boxes (their labels: 1-based in their class order, boxes padded per frame).
    annotations = _annotations(6, grid, len(names), velocity=case == "nuscenes")
    gt = torch.stack([torch.cat([a.boxes.tensor, torch.tensor(
        [[full["CLASS_NAMES"].index(names[label]) + 1.0] for label in a.labels])], 1) for a in annotations])
    spatial_shape, batch_index, voxel_indices, spatial_indices, num_voxels = theirs._get_voxel_infos(x)
    their_targets = theirs.assign_targets(gt.clone(), num_voxels, spatial_indices, spatial_shape)
    targets = ours.assign_targets(pred, annotations)
    for g, t in enumerate(targets):
        assert torch.equal(t.mask, their_targets["masks"][g]) and torch.equal(t.inds, their_targets["inds"][g])
        assert int(t.mask.sum()) > 0
        torch.testing.assert_close(t.heatmap, their_targets["heatmaps"][g], rtol=0, atol=0)
        torch.testing.assert_close(t.boxes, their_targets["target_boxes"][g], rtol=0, atol=0)
    theirs.forward_ret_dict.update(pred_dicts=[{k: v.clone() for k, v in p.items()} for p in their_pred],
                                   target_dicts=their_targets, batch_index=batch_index, voxel_indices=voxel_indices)
    their_loss, tb = theirs.get_loss()
    losses = ours.loss(pred, annotations)
    torch.testing.assert_close(losses.total, their_loss.reshape(()), rtol=1e-5, atol=1e-6)
    num_groups = len(targets)
    torch.testing.assert_close(losses.heatmap, torch.tensor(sum(tb[f"hm_loss_head_{g}"] for g in range(num_groups))))
    if case == "waymo":
        torch.testing.assert_close(losses.iou, torch.tensor(sum(tb[f"iou_loss_head_{g}"] for g in range(num_groups))))

    # Decoding: the same boxes, scores and classes (theirs: 1-based in their order, groups concatenated).
    with torch.no_grad():
        expected = theirs.generate_predicted_boxes(bev.batch_size, [{k: v.clone() for k, v in p.items()}
                                                                     for p in their_pred], voxel_indices, spatial_shape)
        detections = ours.decode(pred)
    for d, e in zip(detections, expected):
        order = e["pred_scores"].argsort(descending=True, stable=True)
        assert len(d) == len(order) > 0
        torch.testing.assert_close(d.scores, e["pred_scores"][order])
        torch.testing.assert_close(d.boxes.tensor, e["pred_boxes"][order], rtol=1e-5, atol=1e-4)
        assert d.labels.tolist() == [names.index(full["CLASS_NAMES"][k - 1]) for k in e["pred_labels"][order].tolist()]


@pytest.mark.parametrize("kernel_size, iou", [(1, False), (3, True)])
def test_head_trains_and_decodes_without_the_checkout(kernel_size, iou):
    torch.manual_seed(0)
    grid = CASES["waymo"][1]
    heads = {**{k: v for k, v in DEFAULT_HEADS.items() if k != "vel"}, **({"iou": {"out_channels": 1, "num_conv": 2}}
                                                                         if iou else {})}
    head = VoxelNeXtReferenceHead(
        8, 3, ["Vehicle", "Pedestrian", "Cyclist"], [["Vehicle"], ["Pedestrian", "Cyclist"]], separate_heads=heads,
        head_order=("center", "center_z", "dim", "rot"), kernel_size=kernel_size, code_weights=(1.0,) * 8,
        score_threshold=0.0, post_center_limit_range=(-80, -80, -10, 80, 80, 10),
        **({"nms_threshold": [0.8, 0.55, 0.55], "nms_pre_maxsize": 100, "nms_post_maxsize": [20, 10, 10],
            "iou_rectifier": [0.68, 0.71, 0.65]} if iou else {}),
    )
    bev = _bev(7, 8, grid, cells=80)
    losses = head.loss(head(bev), _annotations(8, grid, 3, boxes=6, velocity=False))
    assert torch.isfinite(losses.total) and losses.heatmap > 0 and losses.regression > 0 and (losses.iou > 0) == iou
    losses.total.backward()
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    detections = head.decode(head(bev))
    assert len(detections) == 2 and all(len(d) > 0 for d in detections)
    for d in detections:
        assert torch.all(d.scores[:-1] >= d.scores[1:]) and d.boxes.tensor.shape[1] == 7
        assert set(d.labels.tolist()) <= {0, 1, 2}
    empty = SparseBEV(bev.coords[:0], bev.features[:0], bev.spatial_shape, 8, grid, 2)
    assert [len(d) for d in head.decode(head(empty))] == [0, 0]
    first = int((bev.coords[:, 0] == 0).sum())  # frame 1 without cells
    half = SparseBEV(bev.coords[:first], bev.features[:first], bev.spatial_shape, 8, grid, 2)
    assert len(head.decode(head(half))[0]) > 0 and len(head.decode(head(half))[1]) == 0
    head.train()
    annotations = _annotations(8, grid, 3, boxes=6, velocity=False)
    assert torch.isfinite(head.loss(head(half), annotations).total)
    assert head.loss(head(empty), annotations).total == 0


# ---------------------------------------------------------------- the model configs

MODEL_CONFIGS = {  # config -> (dataset config, OpenPCDet config, backbone and head parameters)
    "voxelnext_nuscenes": ("nuscenes", CASES["nuscenes"][0], 7_368_720, 612_678),
    "voxelnext_waymo": ("waymo", CASES["waymo"][0], 30_458_912, None),
    "voxelnext_argo2": ("synthetic", "tools/cfgs/argo2_models/cbgs_voxel01_voxelnext.yaml", 7_368_288, None),
}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_config_builds_the_reference_architecture(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from tool_runs import compose_config

    dataset, reference, backbone_parameters, head_parameters = MODEL_CONFIGS[name]
    cfg = compose_config("train", [f"model={name}", f"dataset={dataset}"]).model
    model = instantiate(cfg)
    assert sum(p.numel() for p in model.backbone.parameters()) == backbone_parameters
    if head_parameters is not None:
        assert sum(p.numel() for p in model.head.parameters()) == head_parameters
    for part in (model.voxel_encoder, model.backbone, model.head):
        assert {p.ours for p in part.openpcdet_keys()} == set(part.state_dict())
    assert model.voxel_encoder.quantization == "float32" and model.voxel_encoder.max_points_per_voxel > 0
    assert model.backbone.input_shape(model.grid)[0] == model.grid.spatial_shape[0] + 1

    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        return
    # Every setting mirrors the OpenPCDet config (with its dataset config's data processor).
    full = yaml.safe_load((Path(root) / reference).read_text())
    base = yaml.safe_load((Path(root) / "tools" / full["DATA_CONFIG"]["_BASE_CONFIG_"]).read_text())
    data = {**base, **full["DATA_CONFIG"]}
    voxelizer = {p["NAME"]: p for p in data["DATA_PROCESSOR"]}["transform_points_to_voxels"]
    encoder = model.voxel_encoder
    assert list(encoder.grid.voxel_size) == voxelizer["VOXEL_SIZE"]
    assert list(encoder.grid.point_cloud_range) == [float(v) for v in data["POINT_CLOUD_RANGE"]]
    assert encoder.max_points_per_voxel == voxelizer["MAX_POINTS_PER_VOXEL"]
    assert (encoder.max_voxels_train, encoder.max_voxels) == (voxelizer["MAX_NUMBER_OF_VOXELS"]["train"],
                                                               voxelizer["MAX_NUMBER_OF_VOXELS"]["test"])
    assert list(model.point_convention.features[:3]) == ["x", "y", "z"]
    assert encoder.in_channels == len(data["POINT_FEATURE_ENCODING"]["used_feature_list"])
    bb = full["MODEL"].get("BACKBONE_3D", {})
    expected = reference_backbone_options(bb.get("CHANNELS", (16, 32, 64, 128, 128)), bb.get("OUT_CHANNEL", 128),
                                          bb.get("SPCONV_KERNEL_SIZES", (3, 3, 3, 3)))
    ours = OmegaConf.to_container(cfg.backbone, resolve=True)
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in ours.items() if k in expected} == expected
    head = full["MODEL"]["DENSE_HEAD"]
    expected = head_options(head, head["SHARED_CONV_CHANNEL"], full["CLASS_NAMES"])
    ours = OmegaConf.to_container(cfg.head, resolve=True)
    for key in set(expected) - {"in_channels", "num_classes", "class_names"}:
        assert ours.get(key) == expected[key], key
    assert set(model.class_names) == set(full["CLASS_NAMES"])


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_fused_head_decodes_the_same(kernel_size):
    from voxsparse.models.fusion import fuse_for_inference

    torch.manual_seed(1)
    grid = CASES["nuscenes"][1]
    head = VoxelNeXtReferenceHead(8, 10, NUSCENES_NAMES, NUSCENES_GROUPS, kernel_size=kernel_size)
    randomize(head, 2)
    head.eval()
    bev = _bev(9, 8, grid, cells=120)
    fused = fuse_for_inference(head)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in fused.modules())
    with torch.no_grad():
        expected, got = head.decode(head(bev)), fused.decode(fused(bev))
    for e, g in zip(expected, got):
        assert len(e) == len(g) > 0 and e.labels.tolist() == g.labels.tolist()
        torch.testing.assert_close(g.scores, e.scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g.boxes.tensor, e.boxes.tensor, rtol=1e-4, atol=1e-4)
