"""One heading convention from labels to metric: the synthetic world labels, the augmentation, the
center head's (sin, cos) targets and atan2 decoding, and the APH metric all measure the heading
counter-clockwise from +x, pointing where the object goes (and, for people, where the face looks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.sample import Sample
from voxsparse.data.synthetic import CLASS_NAMES, LidarConfig, generate_frame
from voxsparse.data.transforms import GlobalAugment
from voxsparse.evaluation.detection import FrameGroundTruth, FramePredictions, evaluate_detection_levels
from voxsparse.geometry import limit_period
from voxsparse.models.heads.center_head import CenterPredictions
from voxsparse.models.heads.voxelnext_head import VoxelNeXtHead
from voxsparse.structures import Annotations3D, Boxes3D

NOSE, HEAD = KEYPOINT_NAMES.index("nose"), KEYPOINT_NAMES.index("head_center")
CELL = 0.5  # metres per BEV cell of the hand-made predictions


@pytest.fixture(scope="module")
def frame():
    return generate_frame(5, LidarConfig(beams=32, azimuth_resolution=0.4))


def _forward(heading: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.cos(heading), torch.sin(heading)], dim=-1)


def _check_labels(boxes: torch.Tensor, labels: torch.Tensor, keypoints: torch.Tensor) -> None:
    """Moving objects travel along their heading; a person's nose lies ahead of the head centre."""
    forward = _forward(boxes[:, 6])
    speed = boxes[:, 7:9].norm(dim=1)
    moving = speed > 0.3
    assert moving.sum() >= 5
    along = (boxes[moving, 7:9] * forward[moving]).sum(1) / speed[moving]
    torch.testing.assert_close(along, torch.ones_like(along), atol=1e-4, rtol=0)
    people = labels == CLASS_NAMES.index("Pedestrian")
    assert people.sum() >= 2
    face = keypoints[people, NOSE, :2] - keypoints[people, HEAD, :2]
    assert ((face * forward[people]).sum(1) > 0.5 * face.norm(dim=1)).all()


def test_synthetic_labels_point_where_objects_go_and_look(frame):
    sample = Sample.from_frame(frame)
    ann = sample.annotations
    _check_labels(ann.boxes.tensor, ann.labels, ann.keypoints)


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_augmentation_keeps_the_convention(frame, flip):
    augment = GlobalAugment(flip_probability=flip, rotation=(-math.pi, math.pi), scale=(0.9, 1.1))
    for seed in range(4):
        ann = augment(Sample.from_frame(frame), torch.Generator().manual_seed(seed)).annotations
        _check_labels(ann.boxes.tensor, ann.labels, ann.keypoints)


def _predictions_at(boxes: torch.Tensor, rot: torch.Tensor) -> CenterPredictions:
    """Cells at the box centres (offset 0), carrying the given (sin, cos) rows."""
    n = len(boxes)
    coords = torch.zeros(n, 3, dtype=torch.int64)
    coords[:, 1:] = torch.stack([boxes[:, 1], boxes[:, 0]], 1).div(CELL).floor().long() + 100
    return CenterPredictions(
        coords=coords,
        cell_xy=boxes[:, :2].clone(),
        heatmap=torch.zeros(n, 3),
        offset=torch.zeros(n, 2),
        z=boxes[:, 2:3].clone(),
        log_dims=boxes[:, 3:6].log(),
        rot=rot,
        velocity=None,
        iou=None,
        spatial_shape=(400, 400),
        cell_size=(CELL, CELL),
        batch_size=1,
    )


def test_head_targets_decode_to_the_label_heading():
    """Headings in every quadrant and at the +-pi seam: targets are (sin, cos); decoding them gives
    the heading back."""
    heading = torch.tensor([-math.pi, -2.5, -math.pi / 2, -0.3, 0.0, 0.4, math.pi / 2, 2.9, math.pi - 1e-4])
    n = len(heading)
    boxes = torch.zeros(n, 7)
    boxes[:, 0] = torch.arange(n) * 4.0 - 16.0  # far apart: each box's nearest cell is its own
    boxes[:, 1] = 3.0
    boxes[:, 3:6] = torch.tensor([0.8, 0.6, 1.7])
    boxes[:, 6] = heading
    ann = Annotations3D(
        Boxes3D(boxes),
        labels=torch.ones(n, dtype=torch.int64),
        num_points=torch.full((n,), 20),
        difficulty=torch.ones(n, dtype=torch.int64),
        track_ids=torch.arange(n),
    )
    head = VoxelNeXtHead(in_channels=8, num_classes=3)
    targets = head.assign_targets(_predictions_at(boxes, torch.zeros(n, 2)), [ann])
    assert sorted(targets.positive.tolist()) == list(range(n))
    order = targets.positive.argsort()
    rot = targets.regression[order, 6:8]
    torch.testing.assert_close(rot, torch.stack([heading.sin(), heading.cos()], 1))
    decoded = head._decode_boxes(_predictions_at(boxes, rot), torch.tensor([CELL, CELL]))[:, 6]
    torch.testing.assert_close(limit_period(decoded - heading), torch.zeros(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shift, accuracy", [(0.0, 1.0), (math.pi / 2, 0.5), (math.pi, 0.0), (-math.pi, 0.0)])
def test_aph_weighs_each_match_by_its_heading_error(frame, shift, accuracy):
    """Predictions equal to the ground truth but turned by ``shift``: boxes of the turned ones still
    match whenever they are symmetric under the turn (pi), so AP = 1 and APH = AP x (1 - |shift| / pi);
    a quarter turn is scored on boxes made square."""
    boxes = torch.from_numpy(frame.boxes[:, :7]).double()
    if abs(shift) == math.pi / 2:
        boxes[:, 4] = boxes[:, 3]
    labels = torch.from_numpy(frame.labels)
    gt = FrameGroundTruth(boxes, labels)
    turned = boxes.clone()
    turned[:, 6] = limit_period(turned[:, 6] + shift)
    pred = FramePredictions(turned, torch.linspace(0.9, 0.5, len(boxes)), labels)
    metrics = evaluate_detection_levels([pred], [gt], CLASS_NAMES)[1]
    for name in CLASS_NAMES:
        assert metrics.ap[name] == pytest.approx(1.0)
        assert metrics.aph[name] == pytest.approx(accuracy, abs=1e-6)


def test_aph_scores_heading_by_the_label_convention(frame):
    """The per-class APH of predictions decoded from (sin, cos) targets equals AP; decoding a head
    that swapped sin and cos (heading measured from +y clockwise) does not."""
    boxes = torch.from_numpy(frame.boxes[:, :7]).double()
    labels = torch.from_numpy(frame.labels)
    gt = FrameGroundTruth(boxes, labels)
    rot = torch.stack([boxes[:, 6].sin(), boxes[:, 6].cos()], 1)
    scores = torch.linspace(0.9, 0.5, len(boxes))
    for decoded, expect_equal in ((torch.atan2(rot[:, 0], rot[:, 1]), True), (torch.atan2(rot[:, 1], rot[:, 0]), False)):
        pred_boxes = boxes.clone()
        pred_boxes[:, 6] = decoded
        m = evaluate_detection_levels([FramePredictions(pred_boxes, scores, labels)], [gt], CLASS_NAMES, iou_type="bev")[1]
        gap = np.array([m.ap[n] - m.aph[n] for n in CLASS_NAMES])
        assert (np.abs(gap) < 1e-9).all() == expect_equal
