"""Per-class AP / APH: hand-computed cases and a brute-force reference (loops, float64, shapely)."""

import math

import pytest
import shapely
import shapely.affinity
import torch

from voxsparse.evaluation import detection
from voxsparse.evaluation.detection import (
    DetectionMetrics,
    FrameGroundTruth,
    FramePredictions,
    average_precision,
    evaluate_detection,
)
from voxsparse.ops.boxes import iou_3d_aligned
from voxsparse.structures.boxes import Boxes3D
from voxsparse.structures.detections import Annotations3D, Detections3D

torch.set_num_threads(2)

CLASSES = ("Vehicle", "Pedestrian", "Cyclist")


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


def test_perfect_predictions():
    frames = [gts([car(0, 0), car(10, 5, 1.0)]), gts([car(-7, 3, -2.0)])]
    predictions = [preds([car(10, 5, 1.0), car(0, 0)], [0.9, 0.8]), preds([car(-7, 3, -2.0)], [0.5])]
    m = evaluate_detection(predictions, frames)
    assert vehicle(m) == (1.0, 1.0)
    assert m.num_gt["Vehicle"] == 3 and m.num_pred["Vehicle"] == 3


def test_false_positive_between_true_positives():
    # TP 0.9, FP 0.8, TP 0.7 over 2 GT: (R, P) = (.5, 1), (.5, .5), (1, 2/3) -> AP = .5 + .5 * 2/3.
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(0, 0), car(30, 30), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((5 / 6, 5 / 6))


def test_false_positive_on_top():
    # FP 0.9, TP 0.8, TP 0.7: (0, 0), (.5, .5), (1, 2/3) -> envelope 2/3 everywhere.
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(30, 30), car(0, 0), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((2 / 3, 2 / 3))


def test_duplicate_is_false_positive():
    # The lower-scored copy of the first GT is an FP: same curve as the FP-between case.
    frames = [gts([car(0, 0), car(10, 0)])]
    predictions = [preds([car(0, 0), car(0.05, 0), car(10, 0)], [0.9, 0.8, 0.7])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((5 / 6, 5 / 6))


def test_missed_gt_caps_recall():
    frames = [gts([car(0, 0), car(10, 0)]), gts([])]
    predictions = [preds([car(0, 0)], [0.9]), preds([], [])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((0.5, 0.5))


def test_greedy_by_score_not_best_iou():
    # The 0.9 prediction clears the threshold for both GT and takes the better one, A. The 0.8
    # prediction only clears it for A, which is taken: an FP, though an optimal assignment would
    # have made both TP.
    a, b, first, second = car(0, 0), car(0.7, 0), car(0.2, 0), car(-0.1, 0)

    def iou(p, q):
        return iou_3d_aligned(
            torch.tensor([p], dtype=torch.float64), torch.tensor([q], dtype=torch.float64)
        ).item()

    assert iou(first, a) > iou(first, b) > 0.7 > iou(second, b) and iou(second, a) > 0.7
    frames = [gts([a, b])]
    predictions = [preds([first, second], [0.9, 0.8])]
    # TP, FP over 2 GT -> (.5, 1), (.5, .5) -> AP .5
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((0.5, 0.5))


def test_level_1_ignores_level_2_gt():
    # GT A is LEVEL_1, B LEVEL_2; FP 0.95, on-B 0.9, on-A 0.8.
    frames = [gts([car(0, 0), car(10, 0)], difficulty=[1, 2])]
    predictions = [preds([car(30, 30), car(10, 0), car(0, 0)], [0.95, 0.9, 0.8])]
    level2 = evaluate_detection(predictions, frames, difficulty=2)
    assert vehicle(level2) == pytest.approx((2 / 3, 2 / 3))  # FP, TP, TP over 2 GT
    level1 = evaluate_detection(predictions, frames, difficulty=1)
    # The on-B prediction drops out: FP, TP over 1 GT -> (0, 0), (1, .5). Counted as an FP it
    # would give 1/3.
    assert vehicle(level1) == pytest.approx((0.5, 0.5))
    assert level1.num_gt["Vehicle"] == 1 and level1.num_pred["Vehicle"] == 3


def test_level_1_duplicate_on_ignored_gt_is_false_positive():
    frames = [gts([car(0, 0), car(10, 0)], difficulty=[1, 2])]
    predictions = [preds([car(0, 0), car(10, 0), car(10.05, 0)], [0.9, 0.8, 0.7])]
    # TP, ignored, FP over 1 GT -> (1, 1), (1, .5): AP 1 but the FP is counted.
    m = evaluate_detection(predictions, frames, difficulty=1)
    assert vehicle(m) == (1.0, 1.0)
    predictions = [preds([car(10, 0), car(10.05, 0), car(0, 0)], [0.9, 0.8, 0.7])]
    # ignored, FP, TP -> (0, 0), (1, .5)
    assert vehicle(evaluate_detection(predictions, frames, difficulty=1)) == pytest.approx((0.5, 0.5))


def test_level_1_prefers_counted_gt():
    # The prediction clears the threshold for the ignored GT (higher IoU) and the counted one: it
    # takes the counted one.
    frames = [gts([car(0.5, 0), car(0, 0)], difficulty=[1, 2])]
    predictions = [preds([car(0.05, 0)], [0.9])]
    assert vehicle(evaluate_detection(predictions, frames, difficulty=1)) == (1.0, 1.0)


def test_aph_flipped_heading():
    frames = [gts([car(0, 0), car(10, 0)])]
    # A flip by pi keeps IoU = 1 but has heading accuracy 0.
    flipped_first = [preds([car(0, 0, math.pi), car(10, 0)], [0.9, 0.8])]
    # APH points: (0, 0), (.5, .5) -> .25
    assert vehicle(evaluate_detection(flipped_first, frames)) == pytest.approx((1.0, 0.25))
    flipped_second = [preds([car(0, 0), car(10, 0, -math.pi)], [0.9, 0.8])]
    # APH points: (.5, 1), (.5, .5) -> .5
    assert vehicle(evaluate_detection(flipped_second, frames)) == pytest.approx((1.0, 0.5))


def test_aph_quarter_turn_of_a_square():
    # A square box turned by pi/2 still has IoU 1; heading accuracy 1/2 gives (R, P) = (.5, .5).
    square = (2.0, 2.0, 1.5)
    frames = [gts([car(0, 0, 0.3, size=square)])]
    predictions = [preds([car(0, 0, 0.3 + math.pi / 2, size=square)], [0.9])]
    assert vehicle(evaluate_detection(predictions, frames)) == pytest.approx((1.0, 0.25))


def test_tied_scores_form_one_operating_point():
    frames = [gts([car(0, 0)])]
    for order in ([car(0, 0), car(30, 0)], [car(30, 0), car(0, 0)]):
        # One point (R, P) = (1, .5) whichever order the tie comes in.
        assert vehicle(evaluate_detection([preds(order, [0.5, 0.5])], frames)) == pytest.approx((0.5, 0.5))


def test_classes_without_gt_are_nan_and_left_out_of_the_mean():
    frames = [gts([car(0, 0), car(0, 5, size=(0.8, 0.8, 1.8))], labels=[0, 1])]
    predictions = [preds([car(0, 0), car(30, 0)], [0.9, 0.4], labels=[0, 2])]
    m = evaluate_detection(predictions, frames)
    assert m.ap["Vehicle"] == 1.0 and m.ap["Pedestrian"] == 0.0
    assert math.isnan(m.ap["Cyclist"]) and math.isnan(m.aph["Cyclist"])
    assert m.num_pred == {"Vehicle": 1, "Pedestrian": 0, "Cyclist": 1}
    assert m.mean_ap == pytest.approx(0.5)
    assert "nan" in m.table() and "Cyclist" in m.table()
    assert m.to_dict()["AP_L2/Vehicle"] == 1.0 and m.to_dict()["mAP_L2"] == pytest.approx(0.5)


def test_empty_inputs():
    m = evaluate_detection([], [])
    assert all(math.isnan(v) for v in m.ap.values()) and math.isnan(m.mean_ap)
    m = evaluate_detection([preds([], [])], [gts([car(0, 0)])])
    assert vehicle(m) == (0.0, 0.0)


def test_bev_and_3d_iou():
    frames = [gts([car(0, 0)])]
    lifted = [preds([car(0, 0, z=0.5)], [0.9])]  # same footprint, 3D IoU = 1 / 2 < 0.7
    assert vehicle(evaluate_detection(lifted, frames, iou_type="3d")) == (0.0, 0.0)
    assert vehicle(evaluate_detection(lifted, frames, iou_type="bev")) == (1.0, 1.0)


def test_per_class_thresholds():
    frames = [gts([car(0, 0)])]
    shifted = [preds([car(0.8, 0)], [0.9])]  # 3D IoU 3.2 / 4.8 = 2/3
    assert vehicle(evaluate_detection(shifted, frames)) == (0.0, 0.0)
    relaxed = {"Vehicle": 0.6, "Pedestrian": 0.5, "Cyclist": 0.5}
    assert vehicle(evaluate_detection(shifted, frames, iou_thresholds=relaxed)) == (1.0, 1.0)


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
    assert vehicle(m) == (1.0, 1.0) and m.num_gt["Vehicle"] == 1


def test_average_precision_direct():
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert average_precision(scores, torch.tensor([1.0, 0.0, 1.0]), 2) == pytest.approx(5 / 6)
    assert math.isnan(average_precision(scores, torch.ones(3), 0))
    assert average_precision(scores[:0], scores[:0], 4) == 0.0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p, g: setattr(p[1], "boxes", p[1].boxes[:, :6]), r"predictions\[1\]\.boxes: expected shape"),
        (lambda p, g: p[1].boxes.__setitem__((0, 3), math.nan), r"predictions\[1\]\.boxes: contains NaN"),
        (lambda p, g: g[1].boxes.__setitem__((0, 0), math.inf), r"ground_truths\[1\]\.boxes: contains NaN"),
        (lambda p, g: g[0].boxes.__setitem__((0, 4), -1.0), r"ground_truths\[0\]\.boxes: has negative"),
        (lambda p, g: p[1].scores.__setitem__(0, math.nan), r"predictions\[1\]\.scores: contains NaN"),
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


# ---------------------------------------------------------------- brute-force reference


def _polygon(box: list[float]) -> shapely.Polygon:
    x, y, _, dx, dy, _, heading = box[:7]
    rect = shapely.box(-dx / 2, -dy / 2, dx / 2, dy / 2)
    return shapely.affinity.translate(
        shapely.affinity.rotate(rect, heading, origin=(0, 0), use_radians=True), x, y
    )


def _reference_iou(a: list[float], b: list[float], use_height: bool) -> float:
    pa, pb = _polygon(a), _polygon(b)
    inter, size_a, size_b = pa.intersection(pb).area, pa.area, pb.area
    if use_height:
        overlap = min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2)
        inter, size_a, size_b = inter * max(overlap, 0.0), size_a * a[5], size_b * b[5]
    union = size_a + size_b - inter
    return inter / union if union > 0 else 0.0


def _reference_ap(records: list[tuple[float, float]], num_gt: int) -> float:
    """records: (score, TP weight) of counted predictions."""
    if num_gt == 0:
        return math.nan
    records = sorted(records, key=lambda r: -r[0])
    points = []  # (recall, precision) at the end of each run of equal scores
    total = 0.0
    for i, (score, weight) in enumerate(records):
        total += weight
        if i + 1 == len(records) or records[i + 1][0] != score:
            points.append((total / num_gt, total / (i + 1)))
    ap, previous_recall = 0.0, 0.0
    for i, (recall, _) in enumerate(points):
        ap += (recall - previous_recall) * max(p for _, p in points[i:])
        previous_recall = recall
    return ap


def reference_evaluate(predictions, frames, thresholds, difficulty, use_height):
    """Plain loops: per frame and class, greedy matching in score order."""
    ap, aph = {}, {}
    for c, name in enumerate(CLASSES):
        tp_records, aph_records, num_gt = [], [], 0
        for p, g in zip(predictions, frames, strict=True):
            gt_rows = [i for i in range(len(g.labels)) if int(g.labels[i]) == c]
            ignored = {i: int(g.difficulty[i]) > difficulty for i in gt_rows}
            num_gt += sum(not v for v in ignored.values())
            pred_rows = [i for i in range(len(p.labels)) if int(p.labels[i]) == c]
            pred_rows.sort(key=lambda i: -float(p.scores[i]))  # stable: ties keep input order
            used = set()
            for i in pred_rows:
                box = p.boxes[i].double().tolist()
                match = None
                for want_ignored in (False, True):  # counted GT first
                    best = -1.0
                    for j in gt_rows:
                        if j in used or ignored[j] != want_ignored:
                            continue
                        iou = _reference_iou(box, g.boxes[j].double().tolist(), use_height)
                        if iou >= thresholds[name] and iou > best:
                            best, match = iou, j
                    if match is not None:
                        break
                score = float(p.scores[i])
                if match is None:
                    tp_records.append((score, 0.0))
                    aph_records.append((score, 0.0))
                    continue
                used.add(match)
                if ignored[match]:
                    continue
                delta = abs(box[6] - float(g.boxes[match, 6].double())) % (2 * math.pi)
                tp_records.append((score, 1.0))
                aph_records.append((score, 1 - min(delta, 2 * math.pi - delta) / math.pi))
        ap[name], aph[name] = _reference_ap(tp_records, num_gt), _reference_ap(aph_records, num_gt)
    return ap, aph


def random_scene(generator: torch.Generator, num_frames: int):
    """Crowded frames: noisy copies of GT (some duplicated), strays, tied scores, empty frames."""
    predictions, frames = [], []
    sizes = torch.tensor([[4.0, 2.0, 1.6], [0.9, 0.9, 1.8], [1.8, 0.8, 1.7]], dtype=torch.float64)
    for _ in range(num_frames):
        g = int(torch.randint(0, 9, (1,), generator=generator))
        labels = torch.randint(0, 3, (g,), generator=generator)
        boxes = torch.zeros(g, 7, dtype=torch.float64)
        boxes[:, :2] = torch.rand(g, 2, generator=generator, dtype=torch.float64) * 12 - 6
        boxes[:, 2] = torch.rand(g, generator=generator, dtype=torch.float64) * 0.4
        boxes[:, 3:6] = sizes[labels] * (
            0.8 + 0.4 * torch.rand(g, 3, generator=generator, dtype=torch.float64)
        )
        boxes[:, 6] = (torch.rand(g, generator=generator, dtype=torch.float64) - 0.5) * 2 * math.pi
        difficulty = torch.randint(1, 3, (g,), generator=generator)
        frames.append(FrameGroundTruth(boxes, labels, difficulty))

        k = int(torch.randint(0, 12, (1,), generator=generator))
        source = torch.randint(0, max(g, 1), (k,), generator=generator)
        p = boxes[source].clone() if g else torch.zeros(k, 7, dtype=torch.float64)
        p_labels = labels[source].clone() if g else torch.zeros(k, dtype=torch.int64)
        p[:, :3] += 0.25 * torch.randn(k, 3, generator=generator, dtype=torch.float64)
        p[:, 3:6] = (
            p[:, 3:6] * (1 + 0.1 * torch.randn(k, 3, generator=generator, dtype=torch.float64))
        ).abs() + 0.1
        p[:, 6] += torch.randn(k, generator=generator, dtype=torch.float64) * 0.8
        stray = torch.rand(k, generator=generator) < 0.2
        p[stray, :2] = torch.rand(int(stray.sum()), 2, generator=generator, dtype=torch.float64) * 12 - 6
        relabel = torch.rand(k, generator=generator) < 0.1
        p_labels[relabel] = torch.randint(0, 3, (int(relabel.sum()),), generator=generator)
        scores = torch.round(torch.rand(k, generator=generator, dtype=torch.float64) * 20) / 20  # ties
        predictions.append(FramePredictions(p, scores, p_labels))
    return predictions, frames


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("difficulty", [1, 2])
@pytest.mark.parametrize("iou_type", ["3d", "bev"])
def test_matches_brute_force_reference(seed, difficulty, iou_type):
    predictions, frames = random_scene(torch.Generator().manual_seed(seed), num_frames=25)
    thresholds = {"Vehicle": 0.5, "Pedestrian": 0.3, "Cyclist": 0.4}
    m = evaluate_detection(predictions, frames, CLASSES, thresholds, difficulty=difficulty, iou_type=iou_type)
    ap, aph = reference_evaluate(predictions, frames, thresholds, difficulty, use_height=iou_type == "3d")
    for name in CLASSES:
        assert 0 < m.ap[name] < 1  # the scene is neither trivial nor hopeless
    torch.testing.assert_close(
        torch.tensor([m.ap[n] for n in CLASSES]), torch.tensor([ap[n] for n in CLASSES]), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        torch.tensor([m.aph[n] for n in CLASSES]), torch.tensor([aph[n] for n in CLASSES]), atol=1e-9, rtol=0
    )


def test_small_matching_blocks_give_same_result(monkeypatch):
    predictions, frames = random_scene(torch.Generator().manual_seed(3), num_frames=40)
    expected = evaluate_detection(
        predictions, frames, iou_thresholds={"Vehicle": 0.5, "Pedestrian": 0.3, "Cyclist": 0.4}
    )
    monkeypatch.setattr(detection, "_BLOCK_ELEMENTS", 1)  # one frame per block
    result = evaluate_detection(
        predictions, frames, iou_thresholds={"Vehicle": 0.5, "Pedestrian": 0.3, "Cyclist": 0.4}
    )
    assert result.ap == expected.ap and result.aph == expected.aph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    predictions, frames = random_scene(torch.Generator().manual_seed(4), num_frames=30)
    thresholds = {"Vehicle": 0.5, "Pedestrian": 0.3, "Cyclist": 0.4}
    on_cpu = evaluate_detection(predictions, frames, iou_thresholds=thresholds, difficulty=1)
    on_cuda = evaluate_detection(predictions, frames, iou_thresholds=thresholds, difficulty=1, device="cuda")
    for name in CLASSES:
        assert on_cuda.ap[name] == pytest.approx(on_cpu.ap[name], abs=1e-12)
        assert on_cuda.aph[name] == pytest.approx(on_cpu.aph[name], abs=1e-12)
