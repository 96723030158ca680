import math

import pytest
import torch

from voxsparse.models.backbones.voxelnext import VoxelNeXtBackbone
from voxsparse.models.heads.center_head import CenterHeadBase, CenterPredictions, focal_heatmap_loss
from voxsparse.models.heads.centerpoint_head import CenterPointHead
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.ops.sparse_utils import sparse_local_max
from voxsparse.structures import Annotations3D, Boxes3D, SparseVoxels, VoxelGrid

CELL = 0.8
SHAPE = (20, 20)  # H, W cells over [-8, 8) m


def _annotations(boxes, labels):
    k = len(boxes)
    zeros = torch.zeros(k, dtype=torch.int64)
    return Annotations3D(Boxes3D(torch.tensor(boxes)), torch.tensor(labels), zeros + 50, zeros + 1, torch.arange(k))


def _predictions(coords: torch.Tensor, batch_size: int, num_classes: int = 3, with_velocity=False) -> CenterPredictions:
    m = len(coords)
    xy = (coords[:, [2, 1]].float() + 0.5) * CELL - 8.0
    return CenterPredictions(
        coords=coords, cell_xy=xy, heatmap=torch.full((m, num_classes), -10.0), offset=torch.zeros(m, 2),
        z=torch.zeros(m, 1), log_dims=torch.zeros(m, 3), rot=torch.zeros(m, 2),
        velocity=torch.zeros(m, 2) if with_velocity else None, iou=None, spatial_shape=SHAPE, cell_size=(CELL, CELL),
        batch_size=batch_size,
    )


def _random_cells(count: int, batch_size: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randperm(batch_size * SHAPE[0] * SHAPE[1], generator=gen)[:count].sort().values
    b, rest = flat // (SHAPE[0] * SHAPE[1]), flat % (SHAPE[0] * SHAPE[1])
    return torch.stack([b, rest // SHAPE[1], rest % SHAPE[1]], dim=1).int()


def test_targets_put_a_peak_at_the_nearest_cell():
    head = CenterHeadBase(num_classes=3)
    coords = _random_cells(150, 2, seed=0)
    pred = _predictions(coords, 2)
    boxes = [[1.3, -2.2, -1.0, 4.5, 1.9, 1.6, 0.4], [-5.0, 6.1, -1.2, 0.8, 0.7, 1.8, -2.0]]
    empty = Annotations3D(Boxes3D(torch.zeros(0, 7)), *(torch.zeros(0, dtype=torch.int64),) * 4)
    anns = [_annotations(boxes, [0, 1]), empty]
    targets = head.assign_targets(pred, anns)
    frame0 = torch.nonzero(coords[:, 0] == 0).squeeze(1)
    for g, (box, label) in enumerate(zip(boxes, [0, 1])):
        dist = (pred.cell_xy[frame0] - torch.tensor(box[:2])).norm(dim=1)
        nearest = frame0[dist.argmin()]
        assert targets.positive[g] == nearest
        assert targets.heatmap[nearest, label] == 1.0
        other = [c for c in range(3) if c != label]
        assert (targets.heatmap[frame0][:, other[1]] == 0).all()
    assert (targets.heatmap[coords[:, 0] == 1] == 0).all(), "a frame without boxes has no targets"
    assert ((targets.heatmap >= 0) & (targets.heatmap <= 1)).all()


@pytest.mark.parametrize("dense", [False, True])
def test_decoding_perfect_predictions_returns_the_ground_truth(dense):
    head = CenterHeadBase(num_classes=3, with_velocity=True, score_threshold=0.3)
    coords = (
        torch.stack(torch.meshgrid(torch.arange(1), torch.arange(20), torch.arange(20), indexing="ij"), -1)
        .reshape(-1, 3).int()
        if dense
        else _random_cells(120, 1, seed=1)
    )
    pred = _predictions(coords, 1, with_velocity=True)
    boxes = torch.tensor(
        [[2.1, 3.3, -0.9, 4.2, 1.8, 1.5, 3.0, 4.0, -1.0], [-4.4, -6.2, -1.1, 0.6, 0.6, 1.7, -1.2, 0.5, 0.5]]
    )
    ann = _annotations(boxes.tolist(), [0, 2])
    targets = head.assign_targets(pred, [ann])
    pred.heatmap[targets.positive, ann.labels] = 5.0
    reg = pred.regression().clone()
    reg[targets.positive] = targets.regression
    pred.offset, pred.z, pred.log_dims, pred.rot, pred.velocity = reg.split([2, 1, 3, 2, 2], dim=1)
    (det,) = head.decode(pred)
    assert len(det) == 2
    order = torch.argsort(det.labels)
    torch.testing.assert_close(det.boxes.tensor[order], boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(det.scores, torch.full((2,), torch.sigmoid(torch.tensor(5.0)).item()))
    # Each box's query voxel is the cell that predicted it (trackers associate by it).
    torch.testing.assert_close(det.query_xy[order], pred.cell_xy[targets.positive])


def test_extra_regression_positives_lie_inside_their_box():
    head = CenterHeadBase(num_classes=3, regression_positives=9)
    coords = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(20), torch.arange(20), indexing="ij"), -1)
    pred = _predictions(coords.reshape(-1, 3).int(), 1)
    boxes = [[1.3, -2.2, -1.0, 4.5, 1.9, 1.6, 0.4], [0.2, 3.9, -1.0, 0.8, 0.7, 1.8, 0.0]]
    targets = head.assign_targets(pred, [_annotations(boxes, [0, 1])])
    assert len(targets.positive) == len(set(targets.positive.tolist())), "a cell regresses one box"
    car = targets.gt_boxes[:, 3] > 4
    assert 1 < int(car.sum()) <= 9 and int((~car).sum()) >= 1
    # Every positive's centre lies inside the box it regresses, except possibly each box's nearest cell.
    local = pred.cell_xy[targets.positive] - targets.gt_boxes[:, :2]
    c, s = torch.cos(targets.gt_boxes[:, 6]), torch.sin(targets.gt_boxes[:, 6])
    along, across = local[:, 0] * c + local[:, 1] * s, -local[:, 0] * s + local[:, 1] * c
    inside = (along.abs() <= targets.gt_boxes[:, 3] / 2) & (across.abs() <= targets.gt_boxes[:, 4] / 2)
    assert int((~inside).sum()) <= 2
    # The encoded offsets point from each cell to its box centre.
    centre = pred.cell_xy[targets.positive] + targets.regression[:, :2] * CELL
    torch.testing.assert_close(centre, targets.gt_boxes[:, :2])


def test_iou_branch_rectifies_scores():
    head = CenterHeadBase(num_classes=1, iou_rectifier=(0.5,), score_threshold=0.0)
    coords = torch.tensor([[0, 5, 5], [0, 5, 15]], dtype=torch.int32)
    pred = _predictions(coords, 1, num_classes=1)
    pred.heatmap[:] = 0.0  # both cells score 0.5
    pred.log_dims[:] = 0.5
    pred.iou = torch.tensor([[0.8], [-0.6]])  # IoU 0.9 and 0.2
    det = head.decode(pred)[0]
    torch.testing.assert_close(det.scores, torch.tensor([(0.5 * 0.9) ** 0.5, (0.5 * 0.2) ** 0.5]))
    assert det.boxes.tensor[0, 0] < 0, "the cell with the higher predicted IoU ranks first"


def test_sparse_local_max_matches_brute_force():
    coords = _random_cells(300, 2, seed=2)
    values = torch.rand(len(coords), 3)
    got = sparse_local_max(coords, values, (2, *SHAPE), kernel_size=3)
    expected = torch.empty_like(values)
    for i, c in enumerate(coords.tolist()):
        near = [j for j, d in enumerate(coords.tolist()) if d[0] == c[0] and abs(d[1] - c[1]) <= 1 and abs(d[2] - c[2]) <= 1]
        expected[i] = values[near].max(dim=0).values
    torch.testing.assert_close(got, expected)


def test_focal_loss_matches_its_formula():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    target = torch.tensor([[1.0, 0.2], [0.6, 0.0]])
    pos = target == 1.0
    p = torch.sigmoid(logits)
    expected = -(1 - p[0, 0]) ** 2 * torch.log(p[0, 0])
    for i, j in [(0, 1), (1, 0), (1, 1)]:
        expected += -((1 - target[i, j]) ** 4) * p[i, j] ** 2 * torch.log(1 - p[i, j])
    torch.testing.assert_close(focal_heatmap_loss(logits, target, pos), expected)


def _voxels(count: int, batch_size: int, seed: int) -> SparseVoxels:
    grid = VoxelGrid((0.2, 0.2, 0.5), (-8.0, -8.0, -3.0, 8.0, 8.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    z, y, x = grid.spatial_shape
    flat = torch.randperm(batch_size * z * y * x, generator=gen)[:count].sort().values
    b, rem = flat // (z * y * x), flat % (z * y * x)
    coords = torch.stack([b, rem // (y * x), (rem // x) % y, rem % x], dim=1).int()
    return SparseVoxels(coords, torch.randn(count, 4, generator=gen), grid, batch_size)


@pytest.mark.parametrize("head_cls", [VoxelNeXtHead, CenterPointHead])
def test_backbone_and_heads_train_and_decode(head_cls):
    backbone = VoxelNeXtBackbone(4, channels=(8, 16, 16, 16), blocks=(1, 1, 1, 1), bev_stage=2, out_channels=16)
    head = head_cls(in_channels=16, num_classes=3, head_channels=16, with_iou=True, regression_positives=4)
    voxels = _voxels(3000, 2, seed=3)
    bev = backbone(voxels)
    assert bev.stride == 4 and bev.spatial_shape == (20, 20)
    ann = _annotations([[0.0, 0.0, -1.0, 4.0, 2.0, 1.5, 0.0]], [0])
    losses = head.loss(head(bev), [ann, ann])
    losses.total.backward()
    assert math.isfinite(losses.total.item()) and losses.num_positives >= 2 and losses.iou > 0
    assert all(p.grad is not None for p in head.parameters())
    head.eval()
    detections = head.decode(head(backbone(voxels)))
    assert len(detections) == 2 and all(len(d) <= head.max_detections for d in detections)


def test_backbone_and_sparse_head_accept_a_batch_without_voxels():
    backbone = VoxelNeXtBackbone(4, channels=(8, 16, 16), blocks=(1, 1, 1), bev_stage=2, out_channels=16)
    head = VoxelNeXtHead(in_channels=16, num_classes=3, head_channels=16)
    empty = _voxels(0, 2, seed=0)
    bev = backbone(empty)
    assert len(bev) == 0 and bev.spatial_shape == backbone(_voxels(50, 2, seed=0)).spatial_shape
    head.eval()
    assert [len(d) for d in head.decode(head(bev))] == [0, 0]


def test_voxelnext_paper_size_has_the_published_parameter_count():
    # OpenPCDet's nuScenes VoxelNeXt backbone has 7.37 M parameters (5 input channels).
    backbone = VoxelNeXtBackbone(5, channels=(16, 32, 64, 128, 128, 128), blocks=(1, 2, 2, 2, 2, 2), bev_stage=3)
    params = sum(p.numel() for p in backbone.parameters())
    assert 7.2e6 < params < 7.5e6, params
