"""``centerpoint_nuscenes`` computes what OpenPCDet's CenterPoint computes (commit 8caccce,
``cbgs_voxel0075_res3d_centerpoint.yaml``), and its parts do what DSVT's Waymo head and 2D ResNet need.

CPU tests need nothing but voxsparse: parameter counts and key names against the full-size reference
(numbers recorded from it), height compression against spconv's dense tensor, the head's targets
against a loop written from the reference's rules, and decoding through the per-class NMS. Tests that
run OpenPCDet's own detector (built from its yaml by :func:`voxsparse.benchmark.openpcdet.build_reference`,
a small range and reduced 2D widths, random weights and BatchNorm statistics) skip unless
``VOXSPARSE_OPENPCDET`` names the checkout; they compare every stage, the targets, the losses and
the decoded boxes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tool_runs import compose_config

from voxsparse.models.backbones.resnet3d import VoxelResBackBone8x, height_compression
from voxsparse.models.heads.center_head import gaussian_radius
from voxsparse.models.heads.center_reference import ReferenceCenterHead
from voxsparse.models.necks.bev_backbone import BaseBEVBackbone, BaseBEVResBackbone
from voxsparse.ops.boxes import nms_bev
from voxsparse.ops.sparse_backend import SparseConvTensor
from voxsparse.structures import (
    Annotations3D,
    Boxes3D,
    DenseBEV,
    PointBatch,
    SparseBEV,
    SparseVoxels,
    VoxelGrid,
)

torch.set_num_threads(2)

CONFIG = "tools/cfgs/nuscenes_models/cbgs_voxel0075_res3d_centerpoint.yaml"
NUSCENES = ("car", "truck", "construction_vehicle", "bus", "trailer", "barrier", "motorcycle", "bicycle",
            "pedestrian", "traffic_cone")
GROUPS = [["car"], ["truck", "construction_vehicle"], ["bus", "trailer"], ["barrier"], ["motorcycle", "bicycle"],
          ["pedestrian", "traffic_cone"]]
#: Parameters of OpenPCDet's full-size modules (``build_reference`` on the yaml above).
REFERENCE_PARAMETERS = {"backbone": 2_695_312, "neck": 4_576_768, "head": 1_669_510}
#: State-dict entries of the same (``num_batches_tracked`` included).
REFERENCE_ENTRIES = {"backbone": 142, "neck": 84, "head": 331}
#: A small range for the parity runs: 320 x 320 x 40 voxels, a 40 x 40 BEV.
RANGE = [-12.0, -12.0, -5.0, 12.0, 12.0, 3.0]
OURS_SMALL = [
    f"model.voxel_encoder.grid.point_cloud_range=[{','.join(map(str, RANGE))}]",
    "model.neck.layer_nums=[1,1]", "model.neck.num_filters=[16,32]", "model.neck.num_upsample_filters=[16,16]",
    "model.head.shared_conv_channels=16",
]
THEIRS_SMALL = {
    "DATA_CONFIG.POINT_CLOUD_RANGE": RANGE,
    "MODEL.BACKBONE_2D.LAYER_NUMS": [1, 1],
    "MODEL.BACKBONE_2D.NUM_FILTERS": [16, 32],
    "MODEL.BACKBONE_2D.NUM_UPSAMPLE_FILTERS": [16, 16],
    "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16,
}
#: The DSVT Waymo head's options (IoU branch, DIoU loss, rectified scores, per-class NMS) and a 2D
#: ResNet neck, on the nuScenes classes.
DSVT_HEAD = dict(
    use_bias_before_norm=False, bn_eps=1e-3, bn_momentum=0.01, loc_weight=2.0,
    separate_heads={"center": {"out_channels": 2, "num_conv": 2}, "center_z": {"out_channels": 1, "num_conv": 2},
                    "dim": {"out_channels": 3, "num_conv": 2}, "rot": {"out_channels": 2, "num_conv": 2},
                    "iou": {"out_channels": 1, "num_conv": 2}},
    head_order=["center", "center_z", "dim", "rot"], code_weights=[1.0] * 8, iou_reg_loss=True,
    iou_rectifier=[0.68, 0.71, 0.65, 0.6, 0.6, 0.5, 0.7, 0.7, 0.71, 0.65], nms_type="class_specific_nms",
    nms_threshold=[0.75, 0.6, 0.55, 0.5, 0.5, 0.4, 0.6, 0.6, 0.6, 0.55], nms_pre_max_size=[4096] * 10,
    nms_post_max_size=[500] * 10,
)
THEIRS_DSVT_HEAD = {
    "MODEL.BACKBONE_2D.NAME": "BaseBEVResBackbone",
    "MODEL.DENSE_HEAD.USE_BIAS_BEFORE_NORM": False,
    "MODEL.DENSE_HEAD.BN_EPS": 0.001,
    "MODEL.DENSE_HEAD.BN_MOM": 0.01,
    "MODEL.DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_ORDER": DSVT_HEAD["head_order"],
    "MODEL.DENSE_HEAD.SEPARATE_HEAD_CFG.HEAD_DICT": DSVT_HEAD["separate_heads"],
    "MODEL.DENSE_HEAD.IOU_REG_LOSS": True,
    "MODEL.DENSE_HEAD.LOSS_CONFIG.LOSS_WEIGHTS": {"cls_weight": 1.0, "loc_weight": 2.0, "code_weights": [1.0] * 8},
    "MODEL.DENSE_HEAD.POST_PROCESSING.USE_IOU_TO_RECTIFY_SCORE": True,
    "MODEL.DENSE_HEAD.POST_PROCESSING.IOU_RECTIFIER": DSVT_HEAD["iou_rectifier"],
    "MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG": {
        "NMS_TYPE": "class_specific_nms", "NMS_THRESH": DSVT_HEAD["nms_threshold"],
        "NMS_PRE_MAXSIZE": DSVT_HEAD["nms_pre_max_size"], "NMS_POST_MAXSIZE": DSVT_HEAD["nms_post_max_size"]},
}


def _model(overrides=()):
    return instantiate(compose_config("train", ["model=centerpoint_nuscenes", "dataset=nuscenes", *overrides]).model)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_parameters_and_keys_equal_the_reference():
    model = _model()
    assert model.head.class_names == NUSCENES
    for part, count in REFERENCE_PARAMETERS.items():
        assert _count(getattr(model, part)) == count, part
        assert len(getattr(model, part).state_dict()) == REFERENCE_ENTRIES[part], part
    pairs = model.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(model.state_dict())
    prefixes = {p.theirs.split(".")[0] for p in pairs}
    assert prefixes == {"backbone_3d", "backbone_2d", "dense_head"}  # MeanVFE and HeightCompression: no state
    assert model.neck.out_channels == 512 and model.backbone.out_channels == 256



def test_detector_trains_and_predicts_through_the_neck():
    """SparseDetector with a neck: backbone -> dense 2D neck -> dense head, losses and decoding."""
    torch.manual_seed(0)
    model = _model([*OURS_SMALL, "model.head.max_obj_per_sample=100"])
    gen = torch.Generator().manual_seed(1)
    points, boxes, labels = [], [], []
    for _ in range(2):  # two compact objects: few voxels at every stride (fast on the CPU)
        b = _boxes(gen, 2, 9.0)
        xyz = b[:, None, :3] + 0.2 * torch.randn(2, 150, 3, generator=gen)
        points.append(torch.cat([xyz.reshape(-1, 3), 255 * torch.rand(300, 1, generator=gen), torch.zeros(300, 1)], 1))
        boxes.append(b)
        labels.append(torch.randint(0, 10, (2,), generator=gen))
    batch = PointBatch.from_frames(points)
    losses = model.train()(batch, [_annotations(b, l) for b, l in zip(boxes, labels)])
    assert all(getattr(losses, n).ndim == 0 for n in ("total", "heatmap", "regression"))
    losses.total.backward()
    assert model.neck.blocks[0][1].weight.grad is not None
    with torch.no_grad():
        detections = model.eval().predict(batch)
    assert len(detections) == 2
    for found in detections:
        assert 0 < len(found) <= 6 * 83 and found.boxes.tensor.shape[1] == 9  # at most 83 per group
        assert torch.all(found.scores[:-1] >= found.scores[1:]) and torch.all(found.scores > 0.1)

def test_height_compression_is_the_dense_view():
    """OpenPCDet views the dense (B, C, D, H, W) output as (B, C * D, H, W)."""
    gen = torch.Generator().manual_seed(0)
    grid = VoxelGrid((0.6, 0.6, 1.6), (0.0, 0.0, 0.0, 6.0, 4.8, 3.2))
    coords = torch.unique(torch.stack([torch.randint(0, n, (300,), generator=gen) for n in (2, 2, 8, 10)], 1), dim=0)
    feats = torch.randn(len(coords), 3, generator=gen)
    bev = height_compression(coords.int(), feats, (2, 8, 10), grid, 2)
    dense = SparseConvTensor(feats, coords.int(), [2, 8, 10], 2).dense()
    torch.testing.assert_close(DenseBEV.from_sparse(bev).features, dense.reshape(2, 6, 8, 10), rtol=0, atol=0)
    assert bev.stride == 8 and len(bev) == len(torch.unique(coords[:, [0, 2, 3]], dim=0))


def test_backbone_z_extent_and_empty_input():
    grid = VoxelGrid((0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
    assert VoxelResBackBone8x.input_shape(grid) == [41, 1440, 1440]
    assert VoxelResBackBone8x.output_shape(grid) == (2, 180, 180)
    backbone = VoxelResBackBone8x(5)
    empty = backbone(SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 5), grid, 2))
    assert empty.features.shape == (0, 256) and empty.spatial_shape == (180, 180)
    with pytest.raises(ValueError, match="num_bev_features"):
        VoxelResBackBone8x(5, num_bev_features=384)(SparseVoxels(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1, 5), grid, 1))


@pytest.mark.parametrize("neck_cls", [BaseBEVBackbone, BaseBEVResBackbone])
def test_necks_keep_the_stride_and_name_their_keys(neck_cls):
    neck = neck_cls(8, [1, 1], [1, 2], [8, 16], [1, 2], [8, 8])
    grid = VoxelGrid((0.5, 0.5, 1.0), (0.0, 0.0, 0.0, 16.0, 16.0, 2.0))
    bev = SparseBEV(torch.tensor([[0, 1, 2], [1, 3, 3]], dtype=torch.int32), torch.randn(2, 8), (4, 4), 8, grid, 2)
    out = neck(bev)
    assert out.features.shape == (2, 16, 4, 4) and out.stride == 8
    assert [p.ours for p in neck.openpcdet_keys()] == list(neck.state_dict())
    down = neck_cls(8, [0], [2], [8], [1], [8])  # a level that halves the map and no upsampling
    assert down(bev).stride == 16


def _boxes(gen: torch.Generator, n: int, half: float) -> torch.Tensor:
    """(n, 9) boxes with centres within ``half`` metres of the origin."""
    b = torch.rand(n, 9, generator=gen)
    b[:, :2] = (b[:, :2] * 2 - 1) * half
    b[:, 2] = b[:, 2] * 2 - 2
    b[:, 3:6] = b[:, 3:6] * torch.tensor([4.0, 2.0, 2.0]) + 0.4
    b[:, 6] = (b[:, 6] * 2 - 1) * math.pi
    b[:, 7:] = b[:, 7:] * 4 - 2
    return b


def _annotations(boxes: torch.Tensor, labels: torch.Tensor) -> Annotations3D:
    n = len(boxes)
    ones = torch.ones(n, dtype=torch.int64)
    return Annotations3D(Boxes3D(boxes), labels, ones, ones, torch.arange(n))


def _loop_targets(boxes, labels, shape, stride, grid):
    """One frame's targets written as OpenPCDet's per-box loop: (heatmaps, boxes, inds, masks) per group."""
    h, w = shape
    out = []
    for names in GROUPS:
        heat = torch.zeros(len(names), h, w)
        rows = [k for k in range(len(boxes)) if NUSCENES[labels[k]] in names]
        target, inds, mask = torch.zeros(500, 10), torch.zeros(500, dtype=torch.int64), torch.zeros(500, dtype=torch.int64)
        for slot, k in enumerate(rows):
            b = boxes[k]
            cx = min(max(float((b[0] - torch.tensor(grid.point_cloud_range[0])) / grid.voxel_size[0] / stride), 0), w - 0.5)
            cy = min(max(float((b[1] - torch.tensor(grid.point_cloud_range[1])) / grid.voxel_size[1] / stride), 0), h - 0.5)
            ix, iy = int(cx), int(cy)
            dx = b[3:4] / grid.voxel_size[0] / stride
            dy = b[4:5] / grid.voxel_size[1] / stride
            r = max(int(gaussian_radius(dx, dy, 0.1).int()), 2)
            sigma = (2 * r + 1) / 6
            c = names.index(NUSCENES[labels[k]])
            for y in range(max(iy - r, 0), min(iy + r + 1, h)):
                for x in range(max(ix - r, 0), min(ix + r + 1, w)):
                    value = math.exp(-((x - ix) ** 2 + (y - iy) ** 2) / (2 * sigma * sigma))
                    heat[c, y, x] = max(float(heat[c, y, x]), float(torch.tensor(value, dtype=torch.float32)))
            inds[slot], mask[slot] = iy * w + ix, 1
            target[slot] = torch.cat([torch.tensor([cx - ix, cy - iy]), b[2:3], b[3:6].log(),
                                      torch.cos(b[6:7]), torch.sin(b[6:7]), b[7:9]])
        out.append((heat, target, inds, mask))
    return out


def test_targets_follow_the_reference_rules():
    gen = torch.Generator().manual_seed(2)
    grid = VoxelGrid((0.075, 0.075, 0.2), tuple(RANGE))
    head = ReferenceCenterHead(8, 10, NUSCENES, GROUPS, shared_conv_channels=8)
    boxes = _boxes(gen, 14, 13.0)  # some centres beyond the map: clamped to its edge
    labels = torch.randint(0, 10, (14,), generator=gen)
    pred = head(DenseBEV(torch.randn(1, 8, 40, 40, generator=gen), 8, grid))
    targets = head.assign_targets(pred, [_annotations(boxes, labels)])
    for got, (heat, target, inds, mask) in zip(targets, _loop_targets(boxes, labels, (40, 40), 8, grid)):
        torch.testing.assert_close(got.heatmap[0], heat, rtol=0, atol=0)
        torch.testing.assert_close(got.inds[0], inds)
        torch.testing.assert_close(got.mask[0], mask)
        torch.testing.assert_close(got.boxes[0], target, rtol=0, atol=2e-7)



def test_frames_without_boxes_still_reach_every_parameter():
    """No box in a group: its losses are 0 as the reference's, and DDP still sees every output used."""
    grid = VoxelGrid((0.32, 0.32, 0.1875), (-10.24, -10.24, -2.0, 10.24, 10.24, 4.0))
    head = ReferenceCenterHead(8, 10, NUSCENES, GROUPS, shared_conv_channels=8, **DSVT_HEAD)
    pred = head(DenseBEV(torch.randn(2, 8, 16, 16), 1, grid))
    empty = _annotations(torch.zeros(0, 7), torch.zeros(0, dtype=torch.int64))
    losses = head.loss(pred, [empty, empty])
    assert losses.regression == 0 and losses.iou == 0 and losses.iou_regression == 0 and losses.heatmap > 0
    losses.total.backward()
    assert all(p.grad is not None for p in head.parameters())

def test_decoding_per_class_nms_and_rectified_scores():
    gen = torch.Generator().manual_seed(3)
    grid = VoxelGrid((0.32, 0.32, 0.1875), (-10.24, -10.24, -2.0, 10.24, 10.24, 4.0))
    head = ReferenceCenterHead(8, 3, ["Vehicle", "Pedestrian", "Cyclist"], [["Vehicle", "Pedestrian", "Cyclist"]],
                               **{**DSVT_HEAD, "iou_rectifier": [0.68, 0.71, 0.65], "nms_threshold": [0.75, 0.6, 0.55],
                                  "nms_pre_max_size": [4096] * 3, "nms_post_max_size": [500] * 3,
                                  "post_center_limit_range": [-80, -80, -10.0, 80, 80, 10.0]}).eval()
    pred = head(DenseBEV(torch.randn(2, 8, 64, 64, generator=gen), 1, grid))
    detections = head.decode(pred)
    for frame, found in enumerate(detections):
        assert torch.all(found.scores[:-1] >= found.scores[1:]) and found.boxes.tensor.shape[1] == 7
        # Brute force: every cell's box and rectified score, top 500, threshold, NMS per class.
        out = pred.groups[0]
        heat = out["hm"][frame].sigmoid()  # (3, H, W)
        assert len(found) <= 500
        for label in range(3):
            mine = found.labels == label
            keep = nms_bev(found.boxes.tensor[mine], found.scores[mine], DSVT_HEAD["nms_threshold"][label])
            assert keep.tolist() == list(range(int(mine.sum())))  # already suppressed, by score
        iou = ((out["iou"][frame, 0].flatten() + 1) * 0.5).clamp(0, 1)
        a = torch.tensor([0.68, 0.71, 0.65])[found.labels]
        cells = ((found.query_xy - torch.tensor([-10.24, -10.24])) / 0.32 - 0.5).round().long()
        index = cells[:, 1] * 64 + cells[:, 0]
        raw = heat.flatten(1)[found.labels, index]
        torch.testing.assert_close(found.scores, raw ** (1 - a) * iou[index] ** a)
        assert torch.all(raw > 0.1)


# --- against OpenPCDet's own detector ----------------------------------------------------------------

def _openpcdet_root() -> Path:
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout")
    return Path(root)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights (the defaults are mostly zero biases) and BatchNorm statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif name.endswith(("running_mean", "bias")):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            elif tensor.ndim == 1:  # BatchNorm weights
                tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=gen))


def _load_into_reference(model, reference) -> None:
    ours = model.state_dict()
    state = {p.theirs: ours[p.ours].clone() for p in model.openpcdet_keys()}
    state["global_step"] = reference.global_step
    reference.load_state_dict(state, strict=True)  # also: the pairs name every reference tensor


def _scene(seed: int, frames: int = 2):
    """Points filling the small range (x, y, z, intensity 0-255, time lag), and labelled boxes."""
    gen = torch.Generator().manual_seed(seed)
    points, boxes, labels = [], [], []
    for _ in range(frames):
        n = 9000
        xyz = torch.rand(n, 3, generator=gen) * torch.tensor([23.8, 23.8, 7.8]) + torch.tensor([-11.9, -11.9, -4.9])
        xyz[: n // 3, 2] = -1.7 + 0.05 * torch.randn(n // 3, generator=gen)  # a ground: voxels of many points
        feats = torch.cat([torch.randint(0, 256, (n, 1), generator=gen).float(), 0.05 * torch.randint(0, 10, (n, 1), generator=gen)], 1)
        points.append(torch.cat([xyz, feats], 1))
        boxes.append(_boxes(gen, 16, 10.0))
        labels.append(torch.randint(0, 10, (16,), generator=gen))
    return points, boxes, labels


def _run_ours(model, points, annotations=None):
    batch = PointBatch.from_frames(points)
    voxels = model.voxel_encoder(batch)
    bev = model.backbone(voxels)
    dense = model.neck(bev)
    pred = model.head(dense)
    return voxels, bev, dense, pred, (None if annotations is None else model.head.loss(pred, annotations))


def _sorted_voxels(coords: torch.Tensor, features: torch.Tensor):
    coords = coords.long()  # the reference's batch holds them as float32
    key = ((coords[:, 0] * 64 + coords[:, 1]) * 4096 + coords[:, 2]) * 4096 + coords[:, 3]
    order = key.argsort()
    return coords[order], features[order]


def _models(variant: str):
    from voxsparse.benchmark.openpcdet import build_reference

    torch.manual_seed(0)
    model = _model(OURS_SMALL)
    theirs = dict(THEIRS_SMALL)
    if variant == "dsvt_head":
        model.neck = BaseBEVResBackbone(256, [1, 1], [1, 2], [16, 32], [1, 2], [16, 16])
        model.head = ReferenceCenterHead(32, 10, NUSCENES, GROUPS, shared_conv_channels=16, **DSVT_HEAD)
        theirs.update(THEIRS_DSVT_HEAD)
    _randomize(model, 1)
    reference = build_reference(_openpcdet_root(), CONFIG, theirs)
    _load_into_reference(model, reference)
    return model, reference


def _close(actual, expected, tol=2e-4):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", ["centerpoint", "dsvt_head"])
def test_training_stages_targets_and_losses_match_openpcdet(variant):
    model, reference = _models(variant)
    points, boxes, labels = _scene(5)
    if variant == "dsvt_head":  # Waymo's boxes carry no velocity
        boxes = [b[:, :7] for b in boxes]
    gt = [torch.cat([b, (l + 1).float()[:, None]], 1) for b, l in zip(boxes, labels)]
    annotations = [_annotations(b, l) for b, l in zip(boxes, labels)]
    theirs = reference.train()(points, gt)
    voxels, bev, dense, pred, losses = _run_ours(model.train(), points, annotations)

    coords, feats = _sorted_voxels(theirs.stages["input"]["voxel_coords"], theirs.stages["vfe"]["voxel_features"])
    ours_coords, ours_feats = _sorted_voxels(voxels.coords, voxels.features)
    torch.testing.assert_close(ours_coords, coords)
    torch.testing.assert_close(ours_feats, feats, rtol=0, atol=1e-6)
    _close(DenseBEV.from_sparse(bev).features, theirs.stages["map_to_bev_module"]["spatial_features"])
    _close(dense.features, theirs.stages["backbone_2d"]["spatial_features_2d"])
    ret = theirs.stages["dense_head"]["forward_ret_dict"]
    for ours_group, their_group in zip(pred.groups, ret["pred_dicts"]):
        assert set(ours_group) == set(their_group)
        for name, value in their_group.items():
            _close(ours_group[name], value, 5e-4)
    targets = model.head.assign_targets(pred, annotations)
    for g, target in enumerate(targets):
        torch.testing.assert_close(target.heatmap, ret["target_dicts"]["heatmaps"][g], rtol=0, atol=0)
        torch.testing.assert_close(target.inds, ret["target_dicts"]["inds"][g])
        torch.testing.assert_close(target.mask, ret["target_dicts"]["masks"][g])
        torch.testing.assert_close(target.boxes, ret["target_dicts"]["target_boxes"][g], rtol=0, atol=1e-6)
    tb = theirs.tb_dict
    _close(losses.heatmap, torch.tensor(sum(v for k, v in tb.items() if k.startswith("hm_loss"))), 1e-4)
    _close(losses.regression, torch.tensor(sum(v for k, v in tb.items() if k.startswith("loc_loss"))), 1e-4)
    if variant == "dsvt_head":
        _close(losses.iou, torch.tensor(sum(v for k, v in tb.items() if k.startswith("iou_loss"))), 1e-4)
        _close(losses.iou_regression, torch.tensor(sum(float(v) for k, v in tb.items() if k.startswith("iou_reg"))), 1e-4)
    _close(losses.total, theirs.loss.detach(), 1e-4)


@pytest.mark.parametrize("variant", ["centerpoint", "dsvt_head"])
def test_decoded_boxes_match_openpcdet(variant):
    model, reference = _models(variant)
    points, _, _ = _scene(7)
    theirs = reference.eval()(points)
    with torch.no_grad():
        detections = model.eval().predict(PointBatch.from_frames(points))
    for found, expected in zip(detections, theirs.final_box_dicts):
        assert torch.all(found.scores[:-1] >= found.scores[1:]) and len(found) == len(expected["pred_scores"]) > 0
        # Cells of (nearly) equal features give (nearly) equal scores in either order: each of our
        # boxes is compared with the reference's box of its label nearest to it.
        ours = torch.cat([found.scores[:, None], found.labels[:, None].float(), found.boxes.tensor], 1)
        ref = torch.cat([expected["pred_scores"][:, None], (expected["pred_labels"] - 1)[:, None].float(),
                         expected["pred_boxes"]], 1)
        distance = torch.cdist(ours[:, 2:4], ref[:, 2:4]) + 1e3 * (ours[:, 1:2] != ref[None, :, 1])
        match = distance.argmin(dim=1)
        assert len(set(match.tolist())) == len(match)
        _close(ours, ref[match], 1e-4)
