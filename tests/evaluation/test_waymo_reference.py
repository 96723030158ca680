"""Waymo AP / APH against references on randomised scenes.

- Always: a brute-force reference written from the definition (plain loops, float64, shapely
  IoU, every one-to-one set of pairs above threshold tried for the optimal assignment, matching
  redone at each of the 101 score cutoffs, the official interpolation), on small crowded scenes.
- Where ``waymo-open-dataset`` is installed: the official metric op itself, to 1e-3. It needs
  an environment of its own (it pins TensorFlow 2.13 and numpy 1.23.5; Python 3.10 or 3.11):

      python3.11 -m venv /tmp/wod
      /tmp/wod/bin/pip install "waymo-open-dataset-tf-2-12-0==1.6.7" pytest shapely
      /tmp/wod/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
      /tmp/wod/bin/pip install --no-deps "typing_extensions>=4.12" filelock sympy mpmath networkx \
          jinja2 markupsafe fsspec
      PYTHONPATH=. /tmp/wod/bin/python -m pytest tests/evaluation/test_waymo_reference.py
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import shapely
import shapely.affinity
import torch

from voxsparse.evaluation import detection
from voxsparse.evaluation.detection import (
    RANGE_NAMES,
    FrameGroundTruth,
    FramePredictions,
    evaluate_detection_levels,
)

CLASSES = ("Vehicle", "Pedestrian", "Cyclist")
SIZES = np.array([[4.5, 2.0, 1.6], [0.9, 0.9, 1.8], [1.8, 0.8, 1.7]])
CUTOFFS = [np.float32(i * 0.01) for i in range(100)] + [np.float32(1.0)]
RELAXED = {"Vehicle": 0.5, "Pedestrian": 0.3, "Cyclist": 0.4}


# ---------------------------------------------------------------- randomised scenes


def random_scene(
    seed: int, num_frames: int, clusters: int, stray: int, noise: float = 0.12, gt_classes=(0, 1, 2)
):
    """Frames of object clusters: 0-2 GT copies of an object and 0-3 noisy predictions of it.

    Positions are perturbed by ``noise`` x the object's length; only ``gt_classes`` get GT boxes.

    Clusters of near-identical GT make components the Hungarian algorithm must solve; centres at
    29.95 / 30.05 / 49.95 / 50.05 m test range-bin borders; scores on a 0.05 grid sit exactly on
    score cutoffs; some predictions are flipped by pi, relabelled or strays.
    """
    rng = np.random.default_rng(seed)
    predictions, frames = [], []
    for _ in range(num_frames):
        gt_boxes, gt_labels, p_boxes, p_labels = [], [], [], []
        for _ in range(rng.integers(0, clusters + 1)):
            c = int(rng.integers(0, 3))
            distance = rng.choice([29.95, 30.05, 49.95, 50.05]) if rng.random() < 0.2 else rng.uniform(2, 70)
            angle = rng.uniform(-math.pi, math.pi)
            size = SIZES[c] * rng.uniform(0.8, 1.2, 3)
            base = np.array(
                [
                    distance * math.cos(angle),
                    distance * math.sin(angle),
                    rng.uniform(-0.3, 0.3),
                    *size,
                    rng.uniform(-math.pi, math.pi),
                ]
            )
            spread = noise * size[0]
            for _ in range(rng.integers(0, 3) if c in gt_classes else 0):
                box = base.copy()
                box[:2] += rng.normal(0, spread, 2)
                gt_boxes.append(box)
                gt_labels.append(c)
            for _ in range(rng.integers(0, 4)):
                box = base.copy()
                box[:3] += rng.normal(0, spread, 3) * [1, 1, 0.3]
                box[3:6] *= 1 + rng.normal(0, 0.08, 3)
                box[6] += rng.normal(0, 0.3) + (math.pi if rng.random() < 0.1 else 0)
                p_boxes.append(box)
                p_labels.append(c if rng.random() > 0.1 else int(rng.integers(0, 3)))
        for _ in range(rng.integers(0, stray + 1)):
            c = int(rng.integers(0, 3))
            p_boxes.append(np.array([*rng.uniform(-60, 60, 2), 0.0, *SIZES[c], rng.uniform(-3, 3)]))
            p_labels.append(c)
        k = len(p_boxes)
        scores = np.where(rng.random(k) < 0.5, rng.integers(0, 21, k) / 20, rng.random(k))
        frames.append(
            FrameGroundTruth(
                torch.tensor(np.array(gt_boxes).reshape(-1, 7), dtype=torch.float32),
                torch.tensor(gt_labels, dtype=torch.int64),
                torch.tensor(rng.integers(1, 3, len(gt_boxes)), dtype=torch.int64),
            )
        )
        predictions.append(
            FramePredictions(
                torch.tensor(np.array(p_boxes).reshape(-1, 7), dtype=torch.float32),
                torch.tensor(scores, dtype=torch.float32),
                torch.tensor(p_labels, dtype=torch.int64),
            )
        )
    return predictions, frames


# ---------------------------------------------------------------- brute-force reference


def _polygon(box) -> shapely.Polygon:
    x, y, _, dx, dy, _, heading = box
    rect = shapely.box(-dx / 2, -dy / 2, dx / 2, dy / 2)
    return shapely.affinity.translate(
        shapely.affinity.rotate(rect, heading, origin=(0, 0), use_radians=True), x, y
    )


def reference_iou(a, b, use_height: bool) -> float:
    dims = slice(3, 6) if use_height else slice(3, 5)
    if min(a[dims]) <= 0.01 or min(b[dims]) <= 0.01:
        return 0.0
    pa, pb = _polygon(a), _polygon(b)
    inter, size_a, size_b = pa.intersection(pb).area, pa.area, pb.area
    if use_height:
        overlap = min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2)
        inter, size_a, size_b = inter * max(overlap, 0.0), size_a * a[5], size_b * b[5]
    union = size_a + size_b - inter
    return inter / union if union > 0 else 0.0


def best_assignment(weight: np.ndarray) -> list[tuple[int, int]]:
    """Pairs (row, column) of a maximum-weight one-to-one assignment, by trying every assignment.

    A pair of weight 0 is below threshold: it is the same as leaving both unmatched, so only pairs
    of positive weight are tried. Of equal totals the first found wins: rows take their lowest
    column before leaving it, the official matcher's preference on ties.
    """
    rows, cols = weight.shape
    best_total, best_pairs = -1, []

    def visit(i: int, used: frozenset, total: int, pairs: list) -> None:
        nonlocal best_total, best_pairs
        if i == rows:
            if total > best_total:
                best_total, best_pairs = total, pairs
            return
        for j in range(cols):
            if weight[i, j] > 0 and j not in used:
                visit(i + 1, used | {j}, total + int(weight[i, j]), pairs + [(i, j)])
        visit(i + 1, used, total, pairs)

    visit(0, frozenset(), 0, [])
    return best_pairs


def reference_ap(precisions: list[float], recalls: list[float]) -> float:
    """The official interpolation: envelope, extra samples every 0.05 of recall, trapezoids."""
    best = {0.0: 1.0}
    for p, r in zip(precisions, recalls):
        best[r] = max(best.get(r, 0.0), p)
    samples = []  # (recall, precision), from high recall to low
    envelope, last = 0.0, 0.0  # the official walk starts with last = lowest recall (0)
    for r in sorted(best, reverse=True):
        k = 1
        while last - k * 0.05 > r + 1e-6:
            samples.append((last - k * 0.05, envelope))
            k += 1
        envelope = max(envelope, best[r])
        samples.append((r, envelope))
        last = r
    if len(samples) > 1:
        samples[-1] = (samples[-1][0], samples[-2][1])
    area = 0.0
    for (r_hi, p_hi), (r_lo, p_lo) in itertools.pairwise(samples):
        area += (r_hi - r_lo) * (p_hi + p_lo) / 2
    return area


def _range_bin(box) -> int:
    distance = math.sqrt(box[0] ** 2 + box[1] ** 2 + box[2] ** 2)
    return 0 if distance < 30 else 1 if distance < 50 else 2


def _in_group(box, label, c: int, bin_: int | None) -> bool:
    return int(label) == c and (bin_ is None or _range_bin(box) == bin_)


def reference_metrics(predictions, frames, thresholds, use_height):
    """{(level, class, bin or None): (AP, APH)} by the definition, with plain loops."""
    results = {}
    for c, name in enumerate(CLASSES):
        for bin_ in (None, 0, 1, 2):
            counts = {level: [] for level in (1, 2)}  # per cutoff: (TP, FP, FN, sum of heading accuracy)
            memo = {}
            for cutoff in CUTOFFS:
                totals = {level: [0, 0, 0, 0.0] for level in (1, 2)}
                for f, (p, g) in enumerate(zip(predictions, frames)):
                    pb, gb = p.boxes.double().tolist(), g.boxes.double().tolist()
                    rows = [
                        i
                        for i in range(len(pb))
                        if _in_group(pb[i], p.labels[i], c, bin_) and np.float32(p.scores[i]) >= cutoff
                    ]
                    cols = [j for j in range(len(gb)) if _in_group(gb[j], g.labels[j], c, bin_)]
                    key = (f, tuple(rows))
                    if key not in memo:
                        weight = np.zeros((len(rows), len(cols)), dtype=np.int64)
                        for a, i in enumerate(rows):
                            for b, j in enumerate(cols):
                                iou = np.float32(reference_iou(pb[i], gb[j], use_height))
                                if iou >= np.float32(thresholds[name]):
                                    weight[a, b] = math.floor(float(iou * np.float32(1e6)) + 0.5)
                        memo[key] = best_assignment(weight) if rows and cols else []
                    pairs = [(rows[a], cols[b]) for a, b in memo[key]]
                    for level in (1, 2):
                        t = totals[level]
                        t[0] += len(pairs)
                        t[1] += len(rows) - len(pairs)
                        matched_gt = {j for _, j in pairs}
                        t[2] += sum(1 for j in cols if j not in matched_gt and int(g.difficulty[j]) <= level)
                        for i, j in pairs:
                            delta = abs(pb[i][6] - gb[j][6]) % (2 * math.pi)
                            t[3] += 1 - min(delta, 2 * math.pi - delta) / math.pi
                for level in (1, 2):
                    counts[level].append(totals[level])
            for level in (1, 2):
                precision, precision_ha, recall = [], [], []
                for tp, fp, fn, ha in counts[level]:
                    r = tp / (tp + fn) if tp + fn else 0.0
                    recall.append(r)
                    precision.append(1.0 if r == 0 else tp / (tp + fp) if tp + fp else 0.0)
                    precision_ha.append(1.0 if r == 0 else ha / (tp + fp) if tp + fp else 0.0)
                if all(tp + fn == 0 for tp, _, fn, _ in counts[level]):
                    results[level, name, bin_] = (math.nan, math.nan)
                else:
                    results[level, name, bin_] = (
                        reference_ap(precision, recall),
                        reference_ap(precision_ha, recall),
                    )
    return results


def ours(metrics, level, name, bin_):
    m = metrics[level]
    if bin_ is None:
        return m.ap[name], m.aph[name]
    return m.range_ap[name][bin_], m.range_aph[name][bin_]


@pytest.mark.parametrize("seed, use_height", [(0, True), (1, False), (2, True)])
def test_matches_brute_force_reference(seed, use_height, monkeypatch):
    predictions, frames = random_scene(seed, num_frames=24, clusters=3, stray=1)
    general_calls = []
    original = detection._match_general
    monkeypatch.setattr(detection, "_match_general", lambda *a: general_calls.append(1) or original(*a))
    metrics = evaluate_detection_levels(predictions, frames, CLASSES, RELAXED, "3d" if use_height else "bev")
    assert general_calls, "the scene has components that need the Hungarian algorithm"
    expected = reference_metrics(predictions, frames, RELAXED, use_height)
    informative = 0
    for (level, name, bin_), (ap, aph) in expected.items():
        got = ours(metrics, level, name, bin_)
        assert got == pytest.approx((ap, aph), abs=1e-9, nan_ok=True), (level, name, bin_)
        informative += 0 < ap < 1
    assert informative >= 10  # the scene is neither trivial nor hopeless


def test_counts_match_reference_on_level_gt_numbers():
    predictions, frames = random_scene(3, num_frames=30, clusters=3, stray=1)
    metrics = evaluate_detection_levels(predictions, frames, CLASSES)
    for level in (1, 2):
        for c, name in enumerate(CLASSES):
            per_bin = [0, 0, 0]
            for g in frames:
                for box, label, difficulty in zip(g.boxes.double().tolist(), g.labels, g.difficulty):
                    if int(label) == c and int(difficulty) <= level:
                        per_bin[_range_bin(box)] += 1
            assert metrics[level].range_num_gt[name] == tuple(per_bin)
            assert metrics[level].num_gt[name] == sum(per_bin)


def test_block_size_does_not_change_the_result(monkeypatch):
    predictions, frames = random_scene(4, num_frames=40, clusters=3, stray=1)
    expected = evaluate_detection_levels(predictions, frames, CLASSES, RELAXED)
    monkeypatch.setattr(detection, "_BLOCK_ELEMENTS", 1)  # one frame per candidate block
    result = evaluate_detection_levels(predictions, frames, CLASSES, RELAXED)
    for level in (1, 2):
        assert result[level].to_dict() == pytest.approx(expected[level].to_dict(), abs=1e-12, nan_ok=True)


# ---------------------------------------------------------------- the official package


def _official(predictions, frames, thresholds):
    """AP / APH from waymo-open-dataset's detection_metrics op, keyed like :func:`reference_metrics`."""
    import tensorflow as tf
    from waymo_open_dataset import label_pb2
    from waymo_open_dataset.metrics.ops import py_metrics_ops
    from waymo_open_dataset.protos import breakdown_pb2, metrics_pb2

    waymo_type = [label_pb2.Label.TYPE_VEHICLE, label_pb2.Label.TYPE_PEDESTRIAN, label_pb2.Label.TYPE_CYCLIST]
    config = metrics_pb2.Config()
    for generator in (breakdown_pb2.Breakdown.OBJECT_TYPE, breakdown_pb2.Breakdown.RANGE):
        config.breakdown_generator_ids.append(generator)
        config.difficulties.add().levels.extend([label_pb2.Label.LEVEL_1, label_pb2.Label.LEVEL_2])
    config.matcher_type = metrics_pb2.MatcherProto.TYPE_HUNGARIAN
    by_type = {waymo_type[c]: thresholds[n] for c, n in enumerate(CLASSES)}
    config.iou_thresholds.extend([by_type.get(t, 0.5) for t in range(max(label_pb2.Label.Type.values()) + 1)])
    config.box_type = label_pb2.Label.Box.TYPE_3D
    config.score_cutoffs.extend([i * 0.01 for i in range(100)] + [1.0])

    def stack(items, field, dtype):
        return np.concatenate([getattr(x, field).numpy().astype(dtype) for x in items])

    def frame_ids(items):
        return np.concatenate([np.full(len(x.labels), f, np.int64) for f, x in enumerate(items)])

    to_type = np.array(waymo_type, np.uint8)
    ap, aph, _, _, _, _, breakdown = py_metrics_ops.detection_metrics(
        prediction_bbox=tf.constant(stack(predictions, "boxes", np.float32)),
        prediction_type=tf.constant(to_type[stack(predictions, "labels", np.int64)]),
        prediction_score=tf.constant(stack(predictions, "scores", np.float32)),
        prediction_frame_id=tf.constant(frame_ids(predictions)),
        prediction_overlap_nlz=tf.zeros(sum(len(p.labels) for p in predictions), tf.bool),
        ground_truth_bbox=tf.constant(stack(frames, "boxes", np.float32)),
        ground_truth_type=tf.constant(to_type[stack(frames, "labels", np.int64)]),
        ground_truth_frame_id=tf.constant(frame_ids(frames)),
        ground_truth_difficulty=tf.constant(stack(frames, "difficulty", np.uint8)),
        config=config.SerializeToString(),
    )
    results = {}
    for a, h, (generator, shard, level) in zip(ap.numpy(), aph.numpy(), breakdown.numpy()):
        if generator == breakdown_pb2.Breakdown.OBJECT_TYPE:
            waymo, bin_ = shard + 1, None
        else:
            waymo, bin_ = shard // 3 + 1, shard % 3
        if waymo in by_type:
            results[int(level), CLASSES[waymo_type.index(waymo)], bin_] = (float(a), float(h))
    return results


@pytest.mark.parametrize(
    "seed, thresholds, noise, gt_classes",
    [
        (10, dict(detection.WAYMO_IOU_THRESHOLDS), 0.12, (0, 1, 2)),
        (11, dict(detection.WAYMO_IOU_THRESHOLDS), 0.03, (0, 1, 2)),
        (12, RELAXED, 0.12, (0, 1, 2)),
        (13, RELAXED, 0.05, (0, 1)),  # no cyclist GT: nan here, 0 officially
    ],
)
def test_matches_official_waymo_package(seed, thresholds, noise, gt_classes):
    pytest.importorskip("tensorflow")
    pytest.importorskip("waymo_open_dataset.metrics.ops.py_metrics_ops")
    predictions, frames = random_scene(
        seed, num_frames=200, clusters=6, stray=3, noise=noise, gt_classes=gt_classes
    )
    expected = _official(predictions, frames, thresholds)
    metrics = evaluate_detection_levels(predictions, frames, CLASSES, thresholds)
    assert len(expected) == 2 * 3 * (1 + len(RANGE_NAMES))
    for (level, name, bin_), official in expected.items():
        got = ours(metrics, level, name, bin_)
        # Where nothing can be recalled we report nan, the official code 0.
        got = tuple(0.0 if math.isnan(v) else v for v in got)
        assert got == pytest.approx(official, abs=1e-3), (level, name, bin_)
