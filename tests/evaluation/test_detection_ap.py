"""Waymo AP / APH: hand-computed cases and input validation.

Randomised comparisons with a brute-force reference and the official package are in
test_waymo_reference.py.
"""

import math

import numpy as np
import pytest
import torch

from voxsparse.evaluation.detection import (
    RANGE_NAMES,
    DetectionMetrics,
    FrameGroundTruth,
    FramePredictions,
    evaluate_detection_levels,
    interpolated_average_precision,
)
from voxsparse.evaluation.detection import (
    evaluate_detection as _evaluate_detection,
)
from voxsparse.ops.boxes import iou_3d_aligned
from voxsparse.structures.boxes import Boxes3D
from voxsparse.structures.detections import Annotations3D, Detections3D

CLASSES = ("Vehicle", "Pedestrian", "Cyclist")


def evaluate_detection(predictions, frames, class_names=CLASSES, **options):
    """The metric on the Waymo classes (it has no class-name default)."""
    return _evaluate_detection(predictions, frames, class_names, **options)


def car(x=0.0, y=0.0, heading=0.0, z=0.0, size=(4.0, 2.0, 1.5)) -> list[float]:
    return [x, y, z, *size, heading]


def preds(boxes, scores, labels=None) -> FramePredictions:
    labels = [0] * len(boxes) if labels is None else labels
    return FramePredictions(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7),
        torch.tensor(scores, dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


def gts(boxes, labels=None, difficulty=None) -> FrameGroundTruth:
    labels = [0] * len(boxes) if labels is None else labels
    return FrameGroundTruth(
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 7),
        torch.tensor(labels, dtype=torch.int64),
        None if difficulty is None else torch.tensor(difficulty),
    )


def vehicle(metrics: DetectionMetrics) -> tuple[float, float]:
    return metrics.ap["Vehicle"], metrics.aph["Vehicle"]


# ---------------------------------------------------------------- hand-computed cases
# Operating points are listed as (recall, precision) per score-cutoff interval; AP follows the
# official interpolation: envelope from high recall down, extra points every 0.05 of recall, and
# trapezoids (module docstring, step 5).


def test_perfect_predictions():
    frames = [gts([car(0, 0), car(10, 5, 1.0)]), gts([car(-7, 3, -2.0)])]
    predictions = [preds([car(10, 5, 1.0), car(0, 0)], [0.9, 0.8]), preds([car(-7, 3, -2.0)], [0.5])]
    m = evaluate_detection(predictions, frames)
    assert vehicle(m) == pytest.approx((1.0, 1.0))
    assert m.num_gt["Vehicle"] == 3 and m.num_pred["Vehicle"] == 3


# TP 0.9, FP 0.8, TP 0.7 over 2 GT: (R, P) = (.5, 1) above 0.8, (.5, .5) above 0.7, (1, 2/3) below.
# From recall 1 down: 2/3 until .55 (extra points), a trapezoid to (.5, 1), then 1 down to 0:
# .45 * 2/3 + .05 * (2/3 + 1) / 2 + .5.
FP_BETWEEN_TPS = 0.45 * 2 / 3 + 0.05 * (2 / 3 + 1) / 2 + 0.5


def test_false_positive_between_true_positives():
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(0, 0), car(30, 30), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((FP_BETWEEN_TPS,) * 2)


def test_false_positive_on_top():
    # FP 0.9, TP 0.8, TP 0.7: (0, 1 by rule), (.5, .5), (1, 2/3) -> the envelope is 2/3 everywhere.
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(30, 30), car(0, 0), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((2 / 3, 2 / 3))


def test_duplicate_is_false_positive():
    # The second copy of the first GT finds it taken: the same points as FP-between-TPs.
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(0, 0), car(0.05, 0), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((FP_BETWEEN_TPS,) * 2)


def test_missed_gt_caps_recall():
    # (.5, 1) only: precision 1 from recall .5 down to 0.
    frames = [gts([car(0, 0), car(10, 0)]), gts([])]
    predictions = [preds([car(0, 0)], [0.9]), preds([], [])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((0.5, 0.5))


def test_optimal_matching_not_greedy():
    # The 0.9 prediction clears the threshold for both GT and overlaps A best; the 0.8 prediction
    # only clears it for A. A greedy matcher gives A to the first and leaves the second an FP; the
    # optimal assignment (largest summed IoU) matches first-B and second-A: two TP.
    a, b, first, second = car(0, 0), car(0.7, 0), car(0.2, 0), car(-0.1, 0)

    def iou(p, q):
        return iou_3d_aligned(
            torch.tensor([p], dtype=torch.float64), torch.tensor([q], dtype=torch.float64)
        ).item()

    assert iou(first, a) > iou(first, b) > 0.7 > iou(second, b) and iou(second, a) > 0.7
    assert iou(first, b) + iou(second, a) > iou(first, a)
    frames = [gts([a, b])]
    predictions = [preds([first, second], [0.9, 0.8])]
    # (.5, 1) above 0.8, (1, 1) below -> AP 1 (greedy: (.5, 1), (.5, .5) -> .5).
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((1.0, 1.0))


def test_level_1_counts_matches_on_level_2_gt_as_true_positives():
    # GT A is LEVEL_1, B LEVEL_2; a prediction on B (0.9) and an FP (0.8), none on A.
    frames = [gts([car(0, 0), car(10, 0)], difficulty=[1, 2])]
    predictions = [preds([car(10, 0), car(30, 30)], [0.9, 0.8])]
    level2 = evaluate_detection(predictions, frames, difficulty=2)
    # (.5, 1), (.5, .5) -> .5
    assert vehicle(level2) == pytest.approx((0.5, 0.5))
    level1 = evaluate_detection(predictions, frames, difficulty=1)
    # TP on B, FN for A only: recall 1 / (1 + 1) -> the same points. Ignoring the match on B
    # (or calling it an FP) would give 0.
    assert vehicle(level1) == pytest.approx((0.5, 0.5))
    assert level1.num_gt["Vehicle"] == 1 and level2.num_gt["Vehicle"] == 2 and level1.num_pred["Vehicle"] == 2


def test_level_1_does_not_miss_level_2_gt():
    frames = [gts([car(0, 0), car(10, 0)], difficulty=[1, 2])]
    predictions = [preds([car(0, 0)], [0.9])]
    assert vehicle(evaluate_detection(predictions, frames, difficulty=2)) == pytest.approx((0.5, 0.5))
    assert vehicle(evaluate_detection(predictions, frames, difficulty=1)) == pytest.approx((1.0, 1.0))


def test_equal_iou_goes_to_the_first_gt():
    # Two identical GT boxes, LEVEL_2 listed first: the prediction takes the first (the official
    # matcher's choice), so at LEVEL_1 the LEVEL_1 copy is missed: recall 1 / 2.
    predictions = [preds([car(0, 0)], [0.9])]
    level2_first = [gts([car(0, 0), car(0, 0)], difficulty=[2, 1])]
    assert vehicle(evaluate_detection(predictions, level2_first, difficulty=1)) == pytest.approx((0.5, 0.5))
    level1_first = [gts([car(0, 0), car(0, 0)], difficulty=[1, 2])]
    assert vehicle(evaluate_detection(predictions, level1_first, difficulty=1)) == pytest.approx((1.0, 1.0))


def test_aph_flipped_heading():
    frames = [gts([car(0, 0), car(10, 0)])]
    # A flip by pi keeps IoU = 1 but has heading accuracy 0; APH recall stays the plain recall.
    flipped_first = [preds([car(0, 0, math.pi), car(10, 0)], [0.9, 0.8])]
    # APH points: (.5, 0) above 0.8, (1, .5) below -> envelope .5 everywhere.
    assert vehicle(evaluate_detection(flipped_first, frames)) == pytest.approx((1.0, 0.5))
    flipped_second = [preds([car(0, 0), car(10, 0, -math.pi)], [0.9, 0.8])]
    # APH points: (.5, 1), (1, .5): .45 * .5 + .05 * (.5 + 1) / 2 + .5
    assert vehicle(evaluate_detection(flipped_second, frames)) == pytest.approx((1.0, 0.7625))


def test_aph_quarter_turn_of_a_square():
    # A square box turned by pi/2 still has IoU 1; heading accuracy 1/2: APH points (1, .5).
    square = (2.0, 2.0, 1.5)
    frames = [gts([car(0, 0, 0.3, size=square)])]
    predictions = [preds([car(0, 0, 0.3 + math.pi / 2, size=square)], [0.9])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((1.0, 0.5))


def test_tied_scores_form_one_operating_point():
    frames = [gts([car(0, 0)])]
    for order in ([car(0, 0), car(30, 0)], [car(30, 0), car(0, 0)]):
        # One point (R, P) = (1, .5) whichever order the tie comes in.
        assert vehicle(evaluate_detection([preds(order, [0.5, 0.5])], frames)) == pytest.approx((0.5, 0.5))


def test_scores_between_cutoffs_are_one_operating_point():
    # 0.905 and 0.909 lie between the cutoffs 0.90 and 0.91: both are kept or dropped together,
    # so the order of the TP and the FP between them does not matter.
    frames = [gts([car(0, 0)])]
    for scores in ([0.909, 0.905], [0.905, 0.909]):
        m = evaluate_detection([preds([car(0, 0), car(30, 0)], scores)], frames)
        assert vehicle(m) == pytest.approx((0.5, 0.5))


def test_range_bins_split_matches_at_the_border():
    # GT at 29.9 m, prediction at 30.1 m: a match overall, but in different range bins.
    frames = [gts([car(29.9, 0)])]
    predictions = [preds([car(30.1, 0)], [0.9])]
    m = evaluate_detection(
        predictions, frames, iou_thresholds={"Vehicle": 0.5, "Pedestrian": 0.5, "Cyclist": 0.5}
    )
    assert vehicle(m) == pytest.approx((1.0, 1.0))
    assert m.range_num_gt["Vehicle"] == (1, 0, 0)
    assert m.range_ap["Vehicle"][0] == 0.0  # its GT is missed
    assert math.isnan(m.range_ap["Vehicle"][1])  # an FP with nothing to recall
    assert math.isnan(m.range_ap["Vehicle"][2])


def test_range_is_measured_in_3d_from_the_origin():
    # Centre (29, 0, 8): 30.08 m from the origin, so the 30-50 m bin although x, y are 29 m.
    box = car(29, 0, z=8.0)
    m = evaluate_detection([preds([box], [0.9])], [gts([box])])
    assert m.range_num_gt["Vehicle"] == (0, 1, 0) and m.range_ap["Vehicle"][1] == pytest.approx(1.0)


def test_tiny_boxes_never_match():
    # The official rule: a box with a side of 1 cm or less overlaps nothing.
    flat = car(0, 0, size=(4.0, 2.0, 0.01))
    assert vehicle(evaluate_detection([preds([flat], [0.9])], [gts([flat])])) == (0.0, 0.0)


def test_classes_without_gt_are_nan_and_left_out_of_the_mean():
    frames = [gts([car(0, 0), car(0, 5, size=(0.8, 0.8, 1.8))], labels=[0, 1])]
    predictions = [preds([car(0, 0), car(30, 0)], [0.9, 0.4], labels=[0, 2])]
    m = evaluate_detection(predictions, frames)
    assert m.ap["Vehicle"] == pytest.approx(1.0) and m.ap["Pedestrian"] == 0.0
    assert math.isnan(m.ap["Cyclist"]) and math.isnan(m.aph["Cyclist"])
    assert m.num_pred == {"Vehicle": 1, "Pedestrian": 0, "Cyclist": 1}
    assert m.mean_ap == pytest.approx(0.5)
    table = m.table()
    assert "nan" in table and "Cyclist" in table and all(name in table for name in RANGE_NAMES)
    flat = m.to_dict()
    assert flat["AP_L2/Vehicle"] == pytest.approx(1.0) and flat["mAP_L2"] == pytest.approx(0.5)
    assert flat["AP_L2/Vehicle/0-30m"] == pytest.approx(1.0) and flat["num_gt_L2/Vehicle/0-30m"] == 1
    assert flat["num_pred/Cyclist"] == 1 and math.isnan(flat["AP_L2/Cyclist/30-50m"])


def test_empty_inputs():
    m = evaluate_detection([], [])
    assert all(math.isnan(v) for v in m.ap.values()) and math.isnan(m.mean_ap)
    m = evaluate_detection([preds([], [])], [gts([car(0, 0)])])
    assert vehicle(m) == (0.0, 0.0)


def test_bev_and_3d_iou():
    frames = [gts([car(0, 0)])]
    lifted = [preds([car(0, 0, z=0.5)], [0.9])]  # same footprint, 3D IoU = 1 / 2 < 0.7
    assert vehicle(evaluate_detection(lifted, frames, iou_type="3d")) == (0.0, 0.0)
    assert vehicle(evaluate_detection(lifted, frames, iou_type="bev")) == pytest.approx((1.0, 1.0))


def test_per_class_thresholds():
    frames = [gts([car(0, 0)])]
    shifted = [preds([car(0.8, 0)], [0.9])]  # 3D IoU 3.2 / 4.8 = 2/3
    assert vehicle(evaluate_detection(shifted, frames)) == (0.0, 0.0)
    relaxed = {"Vehicle": 0.6, "Pedestrian": 0.5, "Cyclist": 0.5}
    assert vehicle(evaluate_detection(shifted, frames, iou_thresholds=relaxed)) == pytest.approx((1.0, 1.0))


def test_accepts_project_structures():
    boxes = torch.tensor([car(0, 0), car(10, 0)])
    annotation = Annotations3D(
        boxes=Boxes3D(boxes),
        labels=torch.tensor([0, 0]),
        num_points=torch.tensor([50, 3]),
        difficulty=torch.tensor([1, 2]),
        track_ids=torch.tensor([7, 8]),
    )
    detection_ = Detections3D(
        boxes=Boxes3D(boxes), scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 0])
    )
    m = evaluate_detection([detection_], [annotation], difficulty=1)
    assert vehicle(m) == pytest.approx((1.0, 1.0)) and m.num_gt["Vehicle"] == 1


def test_levels_share_one_matching():
    frames = [gts([car(0, 0), car(10, 0)], difficulty=[1, 2])]
    predictions = [preds([car(0, 0), car(30, 30)], [0.9, 0.8])]
    both = evaluate_detection_levels(predictions, frames, CLASSES)
    for level in (1, 2):
        alone = evaluate_detection(predictions, frames, difficulty=level).to_dict()
        assert both[level].to_dict() == pytest.approx(alone, nan_ok=True)


@pytest.mark.parametrize(
    "precision, recall, expected",
    [
        ([2 / 3, 0.5, 1.0, 1.0], [1.0, 0.5, 0.5, 0.0], FP_BETWEEN_TPS),
        # A gap of exactly 0.05 gets no extra point: trapezoids .05 * (.5 + 1) / 2 + .05 * 1.
        ([0.5, 1.0], [0.1, 0.05], 0.0875),
        # Gaps of 0.1: extra points at .15 (precision .5) and .05 (precision 1).
        ([0.5, 1.0], [0.2, 0.1], 0.05 * 0.5 + 0.05 * 0.75 + 0.05 + 0.05),
        ([], [], 0.0),
        ([1.0], [0.0], 0.0),
    ],
)
def test_interpolated_average_precision(precision, recall, expected):
    assert interpolated_average_precision(np.array(precision), np.array(recall)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, g: setattr(p[1], "boxes", p[1].boxes[:, :6]), r"predictions\[1\]\.boxes: expected shape"),
        (lambda p, g: p[1].boxes.__setitem__((0, 3), math.nan), r"predictions\[1\]\.boxes: contains NaN"),
        (lambda p, g: g[1].boxes.__setitem__((0, 0), math.inf), r"ground_truths\[1\]\.boxes: contains NaN"),
        (lambda p, g: g[0].boxes.__setitem__((0, 4), -1.0), r"ground_truths\[0\]\.boxes: has negative"),
        (lambda p, g: p[1].scores.__setitem__(0, math.nan), r"predictions\[1\]\.scores: contains NaN"),
        (lambda p, g: p[1].scores.__setitem__(1, 1.5), r"predictions\[1\]\.scores: scores outside \[0, 1\]"),
        (lambda p, g: p[0].scores.__setitem__(0, -0.1), r"predictions\[0\]\.scores: scores outside \[0, 1\]"),
        (
            lambda p, g: setattr(p[1], "scores", p[1].scores[:1]),
            r"predictions\[1\]\.scores: has 1 rows but boxes has 2",
        ),
        (lambda p, g: setattr(g[0], "labels", g[0].labels[:1]), r"ground_truths\[0\]\.labels: has 1 rows"),
        (lambda p, g: p[1].labels.__setitem__(0, 3), r"predictions\[1\]\.labels: labels outside \[0, 3\)"),
        (lambda p, g: g[1].labels.__setitem__(0, -1), r"ground_truths\[1\]\.labels: labels outside"),
        (
            lambda p, g: setattr(p[0], "labels", p[0].labels.float()),
            r"predictions\[0\]\.labels: expected an integer dtype",
        ),
        (
            lambda p, g: g[0].difficulty.__setitem__(0, 3),
            r"ground_truths\[0\]\.difficulty: values must be 1 or 2",
        ),
        (lambda p, g: g.pop(), r"predictions has 2 frames but ground_truths has 1"),
    ],
)
def test_validation_names_field_and_frame(change, message):
    predictions = [preds([car(0, 0), car(5, 5)], [0.9, 0.8]) for _ in range(2)]
    frames = [gts([car(0, 0), car(5, 5)], difficulty=[1, 2]) for _ in range(2)]
    change(predictions, frames)
    with pytest.raises(ValueError, match=message):
        evaluate_detection(predictions, frames)


def test_bad_arguments():
    with pytest.raises(ValueError, match="difficulty"):
        evaluate_detection([], [], difficulty=3)
    with pytest.raises(ValueError, match="iou_type"):
        evaluate_detection([], [], iou_type="2d")
    with pytest.raises(ValueError, match="'Cyclist'"):
        evaluate_detection([], [], iou_thresholds={"Vehicle": 0.7, "Pedestrian": 0.5})
    with pytest.raises(ValueError, match="'Vehicle'"):
        evaluate_detection([], [], iou_thresholds={"Vehicle": 0.0, "Pedestrian": 0.5, "Cyclist": 0.5})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    frames = [gts([car(0, 0), car(10, 0, 1.0), car(0.6, 0)], difficulty=[1, 2, 1])]
    predictions = [preds([car(0.2, 0), car(-0.1, 0), car(10, 0.1, 1.2), car(30, 0)], [0.9, 0.8, 0.7, 0.6])]
    on_cpu = evaluate_detection_levels(predictions, frames, CLASSES)
    on_cuda = evaluate_detection_levels(predictions, frames, CLASSES, device="cuda")
    for level in (1, 2):
        assert on_cuda[level].to_dict() == pytest.approx(on_cpu[level].to_dict(), abs=1e-12, nan_ok=True)
