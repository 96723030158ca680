"""VoxelKP: the four backbone modules, the keypoint head, the detector and its evaluation bridge."""

import functools
import math
from dataclasses import replace

import pytest
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import Sample, collate
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.evaluation.keypoints import (
    evaluate_keypoints,
    keypoint_ground_truth_for_eval,
    keypoint_predictions_for_eval,
)
from voxsparse.geometry import points_in_boxes
from voxsparse.models.backbones.voxelnext import SparseLevel, VoxelNeXtBackbone, project_to_bev
from voxsparse.models.detectors.keypoint_detector import KeypointDetector
from voxsparse.models.heads.keypoint_head import KeypointHead, KeypointPredictions
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.models.voxelkp.backbone import VoxelKPBackbone
from voxsparse.models.voxelkp.box_attention import (
    BoxAttentionBlock,
    VoxelGroups,
    grouped_attention,
    window_groups,
)
from voxsparse.models.voxelkp.hybrid import HybridBlock
from voxsparse.models.voxelkp.selective_kernel import SelectiveKernelBlock, SelectiveKernelConv
from voxsparse.models.voxelkp.spatial_encoding import SpatialEncoding
from voxsparse.models.voxelkp.structures import KeypointDetections3D
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseBEV, SparseVoxels, VoxelGrid

J = len(KEYPOINT_NAMES)
GRID = VoxelGrid((0.25, 0.25, 0.25), (-4.0, -4.0, -1.0, 4.0, 4.0, 1.0))  # 32 x 32 x 8 voxels


def random_voxels(num: int, batch_size: int = 2, channels: int = 4, seed: int = 0) -> SparseVoxels:
    """``num`` distinct voxels of GRID spread over ``batch_size`` frames, random features."""
    g = torch.Generator().manual_seed(seed)
    z, y, x = GRID.spatial_shape
    keys = torch.randperm(batch_size * z * y * x, generator=g)[:num].sort().values
    coords = torch.stack([keys // (z * y * x), keys // (y * x) % z, keys // x % y, keys % x], dim=1).int()
    return SparseVoxels(coords, torch.randn(num, channels, generator=g), GRID, batch_size)


def as_tensor(voxels: SparseVoxels) -> SparseConvTensor:
    return SparseConvTensor(voxels.features, voxels.coords, list(GRID.spatial_shape), voxels.batch_size)


# --- sparse selective kernels ----------------------------------------------------------------------
def test_selective_kernel_weights_sum_to_one_per_voxel_and_fuse_the_branches():
    torch.manual_seed(0)
    sk = SelectiveKernelConv(8, kernel_sizes=(3, 5), reduction=2, indice_key="t").eval()
    x = as_tensor(random_voxels(300, channels=8))
    with torch.no_grad():
        branches = [b(x).features for b in sk.branches]
        fused, weights = sk.fuse(branches)
    assert weights.shape == (300, 2, 8)
    assert bool((weights >= 0).all())
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(300, 8))
    torch.testing.assert_close(fused, weights[:, 0] * branches[0] + weights[:, 1] * branches[1])
    with torch.no_grad():
        torch.testing.assert_close(sk(x).features, fused)
    # Per voxel: the weights differ between voxels, and a voxel's weights depend on its own branch
    # outputs only (the authors' code uses one weight vector per frame).
    assert float(weights[:, 0].std(dim=0).min()) > 1e-4
    _, sub = sk.fuse([b[:50] for b in branches])
    torch.testing.assert_close(sub, weights[:50])


def test_selective_kernel_block_keeps_active_set_and_channels():
    x = as_tensor(random_voxels(200, channels=16))
    out = SelectiveKernelBlock(16, "t", kernel_sizes=(3, 5, 7))(x)
    assert out.features.shape == (200, 16)
    assert torch.equal(out.indices, x.indices)


# --- sparse box-attention --------------------------------------------------------------------------
def reference_attention(q, k, v, group, num_heads):
    """Attention of each group alone, one group and head at a time, explicit softmax."""
    out = torch.zeros_like(q)
    d = q.shape[1] // num_heads
    for g in group[group >= 0].unique():
        idx = torch.nonzero(group == g).squeeze(1)
        for h in range(num_heads):
            cols = slice(h * d, (h + 1) * d)
            w = torch.softmax(q[idx, cols] @ k[idx, cols].T / math.sqrt(d), dim=1)
            out[idx, cols] = w @ v[idx, cols]
    return out


def test_grouped_attention_matches_per_group_reference():
    g = torch.Generator().manual_seed(1)
    sizes = [1, 2, 3, 5, 8, 9, 17, 4]  # several padded lengths (1, 2, 4, 8, 16, 32)
    group = torch.cat([torch.full((n,), 10 * i + 3, dtype=torch.int64) for i, n in enumerate(sizes)])
    group = torch.cat([group, torch.full((6,), -1)])[torch.randperm(len(group) + 6, generator=g)]
    q, k, v = (torch.randn(len(group), 12, generator=g, dtype=torch.float64) for _ in range(3))
    out = grouped_attention(q, k, v, group, num_heads=3)
    torch.testing.assert_close(out, reference_attention(q, k, v, group, 3))
    assert bool((out[group < 0] == 0).all())


def boxes_groups(voxels: SparseVoxels, boxes: torch.Tensor) -> VoxelGroups:
    """Each voxel's box (by its centre) among ``boxes`` of frame 0, -1 outside all of them."""
    inside = points_in_boxes(voxels.voxel_centers(), boxes) & (voxels.coords[:, :1] == 0)
    index = torch.where(inside.any(1), inside.byte().argmax(1), -1).long()
    position = torch.rand(len(voxels), 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    return VoxelGroups(index, position)


BOXES = torch.tensor([[-2.0, -1.5, 0.0, 2.0, 1.2, 1.6, 0.4], [1.5, 2.0, 0.0, 1.0, 1.0, 1.8, -1.0]])


def test_box_attention_touches_only_in_box_voxels_and_boxes_do_not_interact():
    torch.manual_seed(0)
    voxels = random_voxels(3000, channels=16)
    groups = boxes_groups(voxels, BOXES)
    box_a, box_b, outside = (groups.index == 0), (groups.index == 1), (groups.index < 0)
    assert int(box_a.sum()) >= 10 and int(box_b.sum()) >= 10
    block = BoxAttentionBlock(16, num_heads=4)
    x = voxels.features
    out = block(x, groups)
    assert out.shape == x.shape
    assert torch.equal(out[outside], x[outside])  # no box: passes through unchanged
    assert not torch.allclose(out[box_a], x[box_a])
    # Perturbing the voxels outside every box, or those of one box, leaves the other box's outputs.
    noisy = torch.where(outside[:, None], x + torch.randn_like(x), x)
    torch.testing.assert_close(block(noisy, groups)[~outside], out[~outside], rtol=0, atol=1e-6)
    noisy = torch.where(box_a[:, None], x + torch.randn_like(x), x)
    torch.testing.assert_close(block(noisy, groups)[box_b], out[box_b], rtol=0, atol=1e-6)
    # A box attended on its own gives the same output as among all the others.
    alone = VoxelGroups(torch.where(box_b, groups.index, -1), groups.position)
    torch.testing.assert_close(block(x, alone)[box_b], out[box_b], rtol=0, atol=1e-6)


def test_window_groups_tile_the_grid_into_boxes():
    voxels = random_voxels(500)
    box = (4, 3, 2)
    for shifted in (False, True):
        groups = window_groups(voxels.coords, GRID.spatial_shape, box, shifted)
        shift = torch.tensor([b // 2 if shifted else 0 for b in box])
        xyz = voxels.coords[:, [3, 2, 1]].long() + shift
        window = torch.cat([voxels.coords[:, :1].long(), xyz // torch.tensor(box)], dim=1)
        same_window = (window[:, None] == window[None]).all(-1)
        assert torch.equal(groups.index[:, None] == groups.index[None], same_window)
        expected = ((xyz % torch.tensor(box)).float() + 0.5) / torch.tensor(box) * 2 - 1
        torch.testing.assert_close(groups.position, expected)


# --- spatial encoding ------------------------------------------------------------------------------
def two_levels(seed: int = 0) -> list[SparseLevel]:
    base = random_voxels(400, channels=8, seed=seed)
    coarse = random_voxels(100, channels=8, seed=seed + 1)
    coarse_coords = coarse.coords.clone()
    coarse_coords[:, 1:] //= 2  # a level twice as coarse; its voxels must stay distinct
    coarse_coords = torch.unique(coarse_coords, dim=0)
    return [SparseLevel(base.coords, base.features, 1),
            SparseLevel(coarse_coords, torch.randn(len(coarse_coords), 8), 2)]


def test_spatial_encoding_and_bev_projection_do_not_depend_on_voxel_order():
    torch.manual_seed(0)
    encoding = SpatialEncoding(8)
    levels = two_levels()
    shape = GRID.spatial_shape[1:]
    coords, feats = project_to_bev(levels, shape, 2, 1, GRID, encoding)
    perms = [torch.randperm(len(level.coords)) for level in levels]
    shuffled = [SparseLevel(lv.coords[p], lv.features[p], lv.scale) for lv, p in zip(levels, perms)]
    encoded = encoding(levels[0].coords, 1, GRID)
    torch.testing.assert_close(encoding(shuffled[0].coords, 1, GRID), encoded[perms[0]])
    coords2, feats2 = project_to_bev(shuffled, shape, 2, 1, GRID, encoding)
    assert torch.equal(coords, coords2)
    torch.testing.assert_close(feats, feats2)


def test_bev_projection_sums_columns_and_the_encoding_keeps_height():
    torch.manual_seed(0)
    levels = two_levels()
    coords, feats = project_to_bev(levels, GRID.spatial_shape[1:], 2, 1, GRID)
    expected: dict[tuple, torch.Tensor] = {}
    for level in levels:  # brute force: every voxel onto its (batch, y * scale, x * scale) cell
        for c, f in zip(level.coords.tolist(), level.features):
            key = (c[0], min(c[2] * level.scale, 31), min(c[3] * level.scale, 31))
            expected[key] = expected.get(key, 0) + f
    assert sorted(expected) == [tuple(c) for c in coords.tolist()]
    torch.testing.assert_close(feats, torch.stack([expected[tuple(c)] for c in coords.tolist()]))
    # Same features at two heights of one column: the plain sum cannot tell them apart, the encoding can.
    low = torch.tensor([[0, 1, 5, 5]], dtype=torch.int32)
    high = torch.tensor([[0, 6, 5, 5]], dtype=torch.int32)
    f = torch.ones(1, 8)
    encoding = SpatialEncoding(8)
    for enc, differ in ((None, False), (encoding, True)):
        a = project_to_bev([SparseLevel(low, f, 1)], (32, 32), 1, 1, GRID, enc)[1]
        b = project_to_bev([SparseLevel(high, f, 1)], (32, 32), 1, 1, GRID, enc)[1]
        assert (not torch.allclose(a, b)) == differ


# --- hybrid feature learning -----------------------------------------------------------------------
def test_hybrid_block_adds_a_per_voxel_mlp_to_the_conv_path():
    torch.manual_seed(0)
    conv = spnn.SubMConv3d(8, 8, 3, padding=1, bias=False, indice_key="h")
    block = HybridBlock(conv, 8, num_layers=2).eval()
    x = as_tensor(random_voxels(300, channels=8))
    out = block(x)
    torch.testing.assert_close(out.features, conv(x).features + block.point_mlp(x.features))
    # The MLP path is per voxel: a voxel's MLP output does not depend on the other voxels.
    torch.testing.assert_close(block.point_mlp(x.features[:10]), block.point_mlp(x.features)[:10])


# --- backbone --------------------------------------------------------------------------------------
SMALL = {"channels": (8, 16, 16, 16), "blocks": (1, 1, 1, 1), "bev_stage": 1, "out_channels": 16}
ALL_OFF = {"selective_kernel": False, "hybrid": False, "box_attention": False, "spatial_encoding": False}
STAGES = {"sk_stages": (1, 2), "hybrid_stages": (1, 2), "box_attention_stages": (0, 1),
          "box_size": (1.0, 1.0, 1.0), "num_heads": 2}


def test_backbone_with_every_module_off_is_voxelnext():
    voxels = random_voxels(600)
    torch.manual_seed(3)
    plain = VoxelNeXtBackbone(4, **SMALL).eval()
    torch.manual_seed(3)
    kp = VoxelKPBackbone(4, **SMALL, **STAGES, **ALL_OFF).eval()
    assert plain.state_dict().keys() == kp.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(value, kp.state_dict()[name]), name
    a, b = plain(voxels), kp(voxels)
    assert torch.equal(a.coords, b.coords)
    torch.testing.assert_close(a.features, b.features)


@pytest.mark.parametrize("module", ["selective_kernel", "hybrid", "box_attention", "spatial_encoding"])
def test_backbone_switch_adds_only_its_module(module):
    voxels = random_voxels(600)
    torch.manual_seed(3)
    plain = VoxelKPBackbone(4, **SMALL, **STAGES, **ALL_OFF).eval()
    torch.manual_seed(3)  # the VoxelNeXt layers start equal: a difference comes from the module
    model = VoxelKPBackbone(4, **SMALL, **STAGES, **{**ALL_OFF, module: True}).eval()
    out, ref = model(voxels), plain(voxels)
    assert out.features.shape == (len(ref), 16) and out.stride == 2
    assert torch.equal(out.coords, ref.coords)  # the modules never change the active sets
    assert not torch.allclose(out.features, ref.features, atol=1e-3)
    kinds = {
        "selective_kernel": SelectiveKernelBlock, "hybrid": HybridBlock, "box_attention": BoxAttentionBlock,
        "spatial_encoding": SpatialEncoding,
    }
    for name, cls in kinds.items():
        found = [n for n, m in model.named_modules() if isinstance(m, cls)]
        if name != module:
            assert not found, name
        elif name == "selective_kernel":
            assert sorted(n.split(".")[1] for n in found) == ["1", "2"]  # stages 1 and 2, one block each
        elif name == "box_attention":
            assert len(found) == 4  # two blocks (plain, shifted) after stages 0 and 1
        else:
            assert found


def test_backbone_rejects_a_missing_stage():
    with pytest.raises(ValueError, match="sk_stages"):
        VoxelKPBackbone(4, **SMALL, **{**STAGES, "sk_stages": (7,)})


# --- keypoint head ---------------------------------------------------------------------------------
HEAD_GRID = VoxelGrid((1.0, 1.0, 1.0), (0.0, 0.0, -2.0, 8.0, 8.0, 2.0))  # 8 x 8 one-metre cells


def dense_bev(channels: int = 8) -> SparseBEV:
    ys, xs = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack([torch.zeros(64, dtype=torch.long), ys.reshape(-1), xs.reshape(-1)], 1).int()
    return SparseBEV(coords, torch.randn(64, channels), (8, 8), 1, HEAD_GRID, 1)


def annotations() -> Annotations3D:
    """A pedestrian with 9 visible keypoints, a vehicle, and a pedestrian with none visible."""
    g = torch.Generator().manual_seed(4)
    boxes = torch.tensor([
        [2.3, 3.6, -1.0, 0.6, 0.6, 1.8, 0.0],
        [6.0, 6.0, -1.0, 4.0, 1.8, 1.5, 0.3],
        [5.2, 1.4, -1.0, 0.6, 0.6, 1.8, 1.0],
    ])
    keypoints = torch.zeros(3, J, 3)
    keypoints[0] = boxes[0, :3] + torch.rand(J, 3, generator=g) - 0.5
    keypoints[2] = boxes[2, :3] + torch.rand(J, 3, generator=g) - 0.5
    visibility = torch.zeros(3, J, dtype=torch.bool)
    visibility[0, :9] = True
    n = torch.zeros(3, dtype=torch.long)
    return Annotations3D(Boxes3D(boxes), torch.tensor([1, 0, 1]), n, n + 1, n, keypoints, visibility)


def make_head(**kwargs) -> KeypointHead:
    detection = functools.partial(VoxelNeXtHead, head_channels=8, regression_positives=1, **kwargs)
    return KeypointHead(8, 3, keypoint_labels=(1,), detection=detection, head_channels=8, keypoint_weight=2.0,
                        visibility_weight=0.5)


def cell_row(bev: SparseBEV, x: float, y: float) -> int:
    return int(((bev.cell_centers() - torch.tensor([x, y])) ** 2).sum(1).argmin())


def test_keypoint_targets_at_the_labelled_humans_detection_positives():
    torch.manual_seed(0)
    head, bev, ann = make_head(), dense_bev(), annotations()
    pred = head(bev)
    assert pred.keypoints.shape == (64, J, 3) and pred.visibility.shape == (64, J)
    targets = head.assign_targets(pred, [ann])
    row = cell_row(bev, 2.5, 3.5)  # the cell nearest to the labelled pedestrian's centre
    assert targets.positive.tolist() == [row]
    assert row in head.detection.assign_targets(pred.detection, [ann]).positive.tolist()
    expected = ann.keypoints[0] - torch.tensor([2.5, 3.5, 0.0])  # (x, y) from the cell centre, z absolute
    torch.testing.assert_close(targets.keypoints[0], expected)
    assert torch.equal(targets.visibility[0], ann.keypoint_visibility[0])


def test_keypoint_loss_equals_hand_computed_terms():
    torch.manual_seed(0)
    head, bev, ann = make_head(), dense_bev(), annotations()
    pred = head(bev)
    pred = replace(pred, keypoints=torch.zeros(64, J, 3, requires_grad=True), visibility=torch.zeros(64, J))
    losses = head.loss(pred, [ann])
    detection = head.detection.loss(pred.detection, [ann])
    target = ann.keypoints[0] - torch.tensor([2.5, 3.5, 0.0])
    expected_keypoint = target[:9].abs().sum() / 9  # L1 over the 9 visible keypoints
    expected_visibility = math.log(2.0)  # BCE of logit 0 against any label
    torch.testing.assert_close(losses.keypoint, expected_keypoint)
    torch.testing.assert_close(losses.visibility, torch.tensor(expected_visibility))
    expected_total = detection.total + 2.0 * expected_keypoint + 0.5 * expected_visibility
    torch.testing.assert_close(losses.total, expected_total)
    assert (losses.num_keypoint_positives, losses.num_positives) == (1, 3)
    losses.total.backward()
    assert pred.keypoints.grad[cell_row(bev, 2.5, 3.5), 9:].abs().sum() == 0  # invisible keypoints: no L1


def test_keypoint_loss_assigns_the_detection_targets_once(monkeypatch):
    """The keypoint loss reuses the detection targets (a training step assigned them twice before) and
    equals the detection loss plus the keypoint terms from separately assigned targets."""
    torch.manual_seed(0)
    head, bev, ann = make_head(), dense_bev(), annotations()
    pred = head(bev)
    detection = head.detection.loss(pred.detection, [ann])
    keypoint_targets = head.assign_targets(pred, [ann])
    calls = []
    assign = head.detection.assign_targets
    monkeypatch.setattr(head.detection, "assign_targets", lambda *args: calls.append(1) or assign(*args))
    losses = head.loss(pred, [ann])
    assert len(calls) == 1
    keypoints = pred.keypoints[keypoint_targets.positive]
    visible = keypoint_targets.visibility
    expected_keypoint = ((keypoints - keypoint_targets.keypoints).abs().sum(-1) * visible).sum() / visible.sum()
    assert torch.equal(losses.keypoint, expected_keypoint.detach())
    for name in ("heatmap", "regression", "iou"):
        assert torch.equal(getattr(losses, name), getattr(detection, name)), name


@pytest.mark.parametrize("offset, read_at", [(0.3, (2.5, 3.5)), (0.7, (3.5, 3.5))])
def test_decode_reads_keypoints_at_the_cell_nearest_to_each_detection(offset, read_at):
    torch.manual_seed(0)
    head, bev = make_head(), dense_bev()
    pred = head(bev)
    peak = cell_row(bev, 2.5, 3.5)
    heatmap = torch.full((64, 3), -10.0)
    heatmap[peak, 1] = 10.0
    offsets = torch.zeros(64, 2)
    offsets[peak, 0] = offset  # cells: the box centre lands at x = 2.5 + offset
    keypoints = torch.randn(64, J, 3)
    logits = torch.randn(64, J)
    pred = KeypointPredictions(replace(pred.detection, heatmap=heatmap, offset=offsets), keypoints, logits)
    (frame,) = head.decode(pred)
    assert isinstance(frame, KeypointDetections3D) and len(frame) == 1 and frame.labels.tolist() == [1]
    row = cell_row(bev, *read_at)
    torch.testing.assert_close(frame.keypoints[0], keypoints[row] + torch.tensor([*read_at, 0.0]))
    torch.testing.assert_close(frame.keypoint_scores[0], logits[row].sigmoid())
    # The tracker associates by the query cell; keypoint detections keep it.
    torch.testing.assert_close(frame.query_xy[0], torch.tensor([2.5, 3.5]))


def test_keypoint_detections_name_a_bad_field():
    boxes = Boxes3D(torch.zeros(2, 7) + torch.tensor([0, 0, 0, 1, 1, 1, 0.0]))
    with pytest.raises(ValueError, match="KeypointDetections3D.keypoints"):
        KeypointDetections3D(boxes=boxes, scores=torch.ones(2), labels=torch.ones(2, dtype=torch.long),
                             keypoints=torch.zeros(3, J, 3), keypoint_scores=torch.zeros(2, J))


# --- detector and evaluation bridge ----------------------------------------------------------------
def test_eval_bridge_keeps_confident_humans_and_labels_ground_truth():
    rows = [[0, 0, 0, 4, 2, 1.5, 0], [3, 0, 0, 0.6, 0.6, 1.8, 0], [6, 0, 0, 0.6, 0.6, 1.8, 0]]
    boxes = Boxes3D(torch.tensor(rows, dtype=torch.float32))
    keypoints = torch.randn(3, J, 3)
    scores = torch.rand(3, J)
    det = KeypointDetections3D(
        boxes=boxes, scores=torch.tensor([0.9, 0.8, 0.2]), labels=torch.tensor([0, 1, 1]),
        keypoints=keypoints, keypoint_scores=scores,
    )
    (frame,) = keypoint_predictions_for_eval([det], [1], score_threshold=0.3, visibility_threshold=0.6)
    torch.testing.assert_close(frame.keypoints, keypoints[1:2])
    assert torch.equal(frame.visibility, scores[1:2] >= 0.6)
    ann = annotations()
    (gt,) = keypoint_ground_truth_for_eval([ann], keypoint_labels=[1])
    torch.testing.assert_close(gt.boxes, ann.boxes.tensor[[0, 2]])
    assert gt.visibility.sum(1).tolist() == [9, 0]  # the second human enters unlabelled (Waymo's GTi)
    (gt,) = keypoint_ground_truth_for_eval([replace(ann, keypoints=None, keypoint_visibility=None)], [1])
    assert gt.keypoints.shape == (2, J, 3) and not bool(gt.visibility.any())


def test_keypoint_detector_rejects_unknown_keypoint_classes():
    with pytest.raises(ValueError, match="keypoint_classes"):
        KeypointDetector(MeanVFE(GRID), VoxelNeXtBackbone, make_head, ("Vehicle", "Pedestrian"), ["Cyclist"])


def test_empty_frame_yields_no_humans_and_a_zero_keypoint_loss():
    backbone = functools.partial(VoxelKPBackbone, **SMALL, **STAGES)
    detection = functools.partial(VoxelNeXtHead, head_channels=8)
    head = functools.partial(KeypointHead, detection=detection, head_channels=8)
    model = KeypointDetector(MeanVFE(GRID), backbone, head, ("Vehicle", "Pedestrian"), ["Pedestrian"])
    points = PointBatch.from_frames([torch.zeros(0, 4)])
    (frame,) = model.eval().predict(points)
    assert len(frame) == 0 and frame.keypoints.shape == (0, J, 3)
    empty = Annotations3D(Boxes3D(torch.zeros(0, 7)), *(torch.zeros(0, dtype=torch.int64),) * 4)
    losses = model.train().loss(points, [empty])
    assert losses.num_keypoint_positives == 0 and float(losses.keypoint) == 0.0


OVERFIT_RANGE = (-12.0, -12.0, -3.0, 12.0, 12.0, 2.0)


def near_objects(sample: Sample) -> Sample:
    """Keep the points within 0.5 m of a labelled object: the model still sees every object, the
    CPU convolves a fifth of the voxels."""
    boxes = sample.annotations.boxes.tensor[:, :7].clone()
    boxes[:, 3:6] += 1.0
    near = points_in_boxes(sample.points, boxes).any(1)
    return Sample(sample.frame_id, sample.points[near], sample.annotations)


def test_voxelkp_overfits_keypoints_of_two_synthetic_frames():
    """~15 s on 2 CPU cores. A broken keypoint target, loss or decoder cannot reach these numbers: the
    keypoint loss falls to 0.07x its start and MPJPE to 0.09 m (10 humans, all matched)."""
    torch.manual_seed(0)
    frames = DetectionDataset(SyntheticDataset("train", num_frames=4, seed=7), OVERFIT_RANGE)
    batch = collate([near_objects(frames[2]), near_objects(frames[3])])
    model = KeypointDetector(
        MeanVFE(VoxelGrid((0.25, 0.25, 0.25), OVERFIT_RANGE), in_channels=4),
        # Selective kernels of 1 and 3 (not 3 and 5) keep the test fast; all four modules are on.
        functools.partial(VoxelKPBackbone, channels=(48, 48, 48, 48), blocks=(0, 1, 1, 1), bev_stage=1,
                          out_channels=48, sk_stages=(1, 2, 3), sk_kernel_sizes=(1, 3),
                          hybrid_stages=(1, 2, 3), box_attention_stages=(1, 2), box_size=(2.0, 2.0, 2.0),
                          num_heads=2),
        functools.partial(KeypointHead, head_channels=48, keypoint_weight=3.0,
                          detection=functools.partial(VoxelNeXtHead, head_channels=48, with_iou=True,
                                                      regression_positives=9)),
        ("Vehicle", "Pedestrian", "Cyclist"), ["Pedestrian"],
    )
    steps = 60
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps, pct_start=0.2)
    keypoint_losses = []
    for _ in range(steps):
        losses = model.loss(batch.points, batch.annotations)
        keypoint_losses.append(float(losses.keypoint))
        optimizer.zero_grad()
        losses.total.backward()
        optimizer.step()
        schedule.step()
    assert losses.num_keypoint_positives >= 10
    assert keypoint_losses[-1] < 0.15 * keypoint_losses[0], keypoint_losses
    model.eval()
    with torch.no_grad():
        detections = model.predict(batch.points)
    metrics = evaluate_keypoints(
        keypoint_predictions_for_eval(detections, model.keypoint_labels),
        keypoint_ground_truth_for_eval(batch.annotations, model.keypoint_labels),
    )
    assert metrics.num_gt >= 8 and metrics.num_tp == metrics.num_gt, metrics.to_dict()
    assert metrics.mpjpe < 0.15, metrics.to_dict()
