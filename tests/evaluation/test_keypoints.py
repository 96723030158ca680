"""Keypoint metrics (MPJPE, Waymo PEM, Waymo OKS AP): hand-computed cases and a brute-force
reference (Python loops, every matching enumerated with itertools.permutations)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.evaluation.keypoints import (
    WAYMO_OKS_SCALES,
    WAYMO_OKS_THRESHOLDS,
    FrameKeypointGroundTruth,
    FrameKeypointPredictions,
    evaluate_keypoints,
    match_humans,
)

K = len(KEYPOINT_NAMES)
C = 0.25
SIZE = (0.8, 0.8, 1.8)


def box(x=0.0, y=0.0, heading=0.0, size=SIZE) -> np.ndarray:
    return np.array([x, y, 0.5 * size[2], *size, heading])


def body(b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(14, 3) keypoints uniformly inside box ``b`` (at least 5 cm from its faces)."""
    local = rng.uniform(-1.0, 1.0, (K, 3)) * (0.5 * b[3:6] - 0.05)
    cos, sin = math.cos(b[6]), math.sin(b[6])
    rot = np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
    return local @ rot.T + b[:3]


def gt_frame(keypoints, boxes, visibility=None) -> FrameKeypointGroundTruth:
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, K, 3)
    visibility = np.ones(keypoints.shape[:2], bool) if visibility is None else visibility
    return FrameKeypointGroundTruth(
        torch.tensor(keypoints),
        torch.tensor(np.asarray(visibility, bool).reshape(-1, K)),
        torch.tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 7)),
    )


def pred_frame(keypoints, visibility=None) -> FrameKeypointPredictions:
    keypoints = np.asarray(keypoints, dtype=np.float64).reshape(-1, K, 3)
    visibility = np.ones(keypoints.shape[:2], bool) if visibility is None else visibility
    return FrameKeypointPredictions(
        torch.tensor(keypoints), torch.tensor(np.asarray(visibility, bool).reshape(-1, K))
    )


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------- hand-computed cases


def test_perfect_predictions():
    rng = np.random.default_rng(0)
    boxes = [[box(0, 0), box(3, 1, 0.7)], [box(-5, 2, -2.0)], []]
    gts, preds = [], []
    for frame_boxes in boxes:
        kps = np.array([body(b, rng) for b in frame_boxes]).reshape(-1, K, 3)
        vis = rng.random(kps.shape[:2]) < 0.7
        vis[:, 0] = True
        gts.append(gt_frame(kps, frame_boxes, vis))
        order = rng.permutation(len(kps))
        preds.append(pred_frame(kps[order], vis[order]))
    m = evaluate_keypoints(preds, gts)
    assert (m.mpjpe, m.pem, m.oks_ap) == (0.0, 0.0, 1.0)
    assert all(p == 1.0 for p in m.oks_precision.values())
    assert (m.num_gt, m.num_tp, m.num_fn, m.num_fp, m.num_mismatched_keypoints) == (3, 3, 0, 0, 0)


def test_shift_of_10cm_on_every_keypoint():
    rng = np.random.default_rng(1)
    boxes = [box(0, 0), box(2, 2, 1.0), box(-3, 1)]
    kps = np.array([body(b, rng) for b in boxes])
    shifted = kps + 0.1 * unit_vectors(rng, 3 * K).reshape(3, K, 3)
    m = evaluate_keypoints([pred_frame(shifted)], [gt_frame(kps, boxes)])
    assert m.num_tp == 3 and m.num_tp_keypoints == 3 * K
    assert m.mpjpe == pytest.approx(0.1, abs=1e-12)
    assert m.pem == pytest.approx(0.1, abs=1e-12)  # below C: not clipped


def test_pem_with_an_unmatched_gt_and_an_extra_prediction():
    rng = np.random.default_rng(2)
    boxes = [box(0, 0), box(10, 0)]
    kps = np.array([body(b, rng) for b in boxes])
    gt_vis = np.ones((2, K), bool)
    gt_vis[1, 10:] = False  # the missed human has 10 visible keypoints
    extra = body(box(-10, 5), rng)  # far from every GT box
    extra_vis = np.ones(K, bool)
    extra_vis[12:] = False  # the extra prediction claims 12 keypoints
    pred_kps = np.stack((kps[0] + 0.1 * unit_vectors(rng, K), extra))
    pred_vis = np.stack((np.ones(K, bool), extra_vis))
    m = evaluate_keypoints([pred_frame(pred_kps, pred_vis)], [gt_frame(kps, boxes, gt_vis)])
    assert (m.num_tp, m.num_fn, m.num_fp) == (1, 1, 1)
    assert m.num_mismatched_keypoints == 10 + 12
    assert m.pem == pytest.approx((14 * 0.1 + 0.25 * (10 + 12)) / (14 + 10 + 12), abs=1e-12)
    assert m.mpjpe == pytest.approx(0.1, abs=1e-12)


def test_pem_clips_errors_at_the_penalty_mpjpe_does_not():
    rng = np.random.default_rng(3)
    b = box()
    kps = body(b, rng)
    pred = kps.copy()
    pred[5, 0] += 1.0
    m = evaluate_keypoints([pred_frame(pred)], [gt_frame(kps, [b])])
    assert m.num_tp == 1
    assert m.pem == pytest.approx(0.25 / 14, abs=1e-12)
    assert m.mpjpe == pytest.approx(1.0 / 14, abs=1e-12)


def test_invisible_keypoints_are_ignored():
    rng = np.random.default_rng(4)
    b = box()
    kps = body(b, rng)
    gt_kps, pred_kps = kps.copy(), kps.copy()
    gt_vis = np.arange(K) < 10
    gt_kps[~gt_vis] = 50.0  # labels not given: any value
    pred_kps[~gt_vis] = -30.0
    m = evaluate_keypoints([pred_frame(pred_kps, gt_vis)], [gt_frame(gt_kps, [b], gt_vis)])
    assert (m.mpjpe, m.pem, m.oks_ap, m.num_tp_keypoints) == (0.0, 0.0, 1.0, 10)

    # A keypoint claimed where the GT has none and one missed where it has one: C each.
    pred_vis = gt_vis.copy()
    pred_vis[10] = True
    pred_vis[0] = False
    m = evaluate_keypoints([pred_frame(pred_kps, pred_vis)], [gt_frame(gt_kps, [b], gt_vis)])
    assert (m.num_tp_keypoints, m.num_mismatched_keypoints) == (9, 2)
    assert m.pem == pytest.approx(2 * 0.25 / 11, abs=1e-12)
    assert m.mpjpe == 0.0


def test_oks_hand_computed():
    nose, left_hip, left_wrist = (KEYPOINT_NAMES.index(n) for n in ("nose", "left_hip", "left_wrist"))
    rng = np.random.default_rng(5)
    # Human 1: volume 0.5 * 0.5 * 4 = 1 m^3, scale 1; the nose (k = 0.052) is off by 0.052 m and the
    # left hip exact: OKS = (exp(-0.5) + 1) / 2 = 0.8033.
    b1 = box(0, 0, size=(0.5, 0.5, 4.0))
    # Human 2: volume 8 m^3, scale 2; only the left wrist (k = 0.124) visible, off by d with
    # exp(-d^2 / (2 * 0.248^2)) = 0.72.
    b2 = box(5, 0, size=(2.0, 2.0, 2.0))
    kps = np.stack((body(b1, rng), body(b2, rng)))
    vis = np.zeros((2, K), bool)
    vis[0, [nose, left_hip]] = True
    vis[1, left_wrist] = True
    pred = kps.copy()
    pred[0, nose] += 0.052 * unit_vectors(rng, 1)[0]
    pred[1, left_wrist] += 0.248 * math.sqrt(-2 * math.log(0.72)) * unit_vectors(rng, 1)[0]
    m = evaluate_keypoints([pred_frame(pred, vis)], [gt_frame(kps, [b1, b2], vis)])
    assert m.num_tp == 2
    assert (math.exp(-0.5) + 1) / 2 == pytest.approx(0.8033, abs=1e-4)
    # OKS 0.8033 passes t <= 0.80 (7 thresholds), OKS 0.72 passes t <= 0.70 (5 thresholds).
    expected = {
        0.5: 1.0,
        0.55: 1.0,
        0.6: 1.0,
        0.65: 1.0,
        0.7: 1.0,
        0.75: 0.5,
        0.8: 0.5,
        0.85: 0.0,
        0.9: 0.0,
        0.95: 0.0,
    }
    assert m.oks_precision == expected
    assert m.oks_ap == pytest.approx(0.6, abs=1e-12)
    assert WAYMO_OKS_THRESHOLDS == tuple(expected)


def test_missed_human_has_oks_zero_and_false_positives_do_not_lower_oks_ap():
    rng = np.random.default_rng(6)
    boxes = [box(0, 0), box(4, 0)]
    kps = np.array([body(b, rng) for b in boxes])
    extra = body(box(-6, 0), rng)
    m = evaluate_keypoints([pred_frame(np.stack((kps[0], extra)))], [gt_frame(kps, boxes)])
    assert (m.num_tp, m.num_fn, m.num_fp) == (1, 1, 1)
    assert m.oks_ap == 0.5 and set(m.oks_precision.values()) == {0.5}


def test_unlabelled_gt_absorbs_a_prediction_without_penalty():
    rng = np.random.default_rng(7)
    labelled, unlabelled = box(0, 0), box(5, 0)
    kps = np.array([body(labelled, rng), body(unlabelled, rng)])
    vis = np.stack((np.ones(K, bool), np.zeros(K, bool)))
    pred = np.stack((kps[0], body(unlabelled, rng)))
    m = evaluate_keypoints([pred_frame(pred)], [gt_frame(kps, [labelled, unlabelled], vis)])
    assert (m.num_gt, m.num_gt_unlabelled, m.num_tp, m.num_fn, m.num_fp) == (1, 1, 1, 0, 0)
    assert m.pem == 0.0
    # Without the unlabelled box the same prediction is a false positive: 14 keypoints at C.
    m = evaluate_keypoints([pred_frame(pred)], [gt_frame(kps[:1], [labelled])])
    assert m.num_fp == 1
    assert m.pem == pytest.approx(0.25 * 14 / 28, abs=1e-12)


def test_unlabelled_box_over_a_labelled_human_does_not_take_its_prediction():
    rng = np.random.default_rng(8)
    labelled = box(0, 0)
    unlabelled = box(0.1, 0.0, size=(1.2, 1.2, 2.0))  # contains all of the labelled human
    kps = np.stack((body(labelled, rng), np.zeros((K, 3))))
    vis = np.stack((np.ones(K, bool), np.zeros(K, bool)))
    pred = kps[0] + 0.02 * unit_vectors(rng, K)
    gt = gt_frame(kps, [labelled, unlabelled], vis)
    match = match_humans(pred_frame(pred), gt)
    assert (match.gt.tolist(), match.pred.tolist()) == ([0], [0])
    assert match.false_negatives.size == match.false_positives.size == 0


def test_candidates_need_a_keypoint_within_c_of_the_gt_box():
    # Only the nose is labelled, on the +x face of the box; predictions 0.23 m and 0.30 m beyond it.
    b = box(0, 0)
    kps = np.zeros((K, 3))
    kps[0] = [0.4, 0.0, 0.9]
    vis = np.arange(K) == 0
    for offset, matched in ((0.23, True), (0.30, False)):
        pred = kps.copy()
        pred[0, 0] += offset
        m = evaluate_keypoints([pred_frame(pred, vis)], [gt_frame(kps, [b], vis)])
        assert (m.num_tp, m.num_fn, m.num_fp) == ((1, 0, 0) if matched else (0, 1, 1))
        assert m.pem == pytest.approx(offset if matched else 0.25, abs=1e-12)


def test_a_gt_takes_only_its_best_prediction():
    rng = np.random.default_rng(9)
    b = box(0, 0, 0.3)
    kps = body(b, rng)
    worse = kps + 0.1 * unit_vectors(rng, K)
    better = kps + 0.05 * unit_vectors(rng, K)
    match = match_humans(pred_frame(np.stack((worse, better))), gt_frame(kps, [b]))
    assert (match.gt.tolist(), match.pred.tolist(), match.false_positives.tolist()) == ([0], [1], [0])


def test_empty_inputs():
    m = evaluate_keypoints([], [])
    assert math.isnan(m.mpjpe) and math.isnan(m.pem) and math.isnan(m.oks_ap)
    rng = np.random.default_rng(10)
    only_fp = pred_frame(body(box(), rng))
    m = evaluate_keypoints(
        [only_fp, pred_frame(np.zeros((0, K, 3)))], [gt_frame(np.zeros((0, K, 3)), [])] * 2
    )
    assert m.pem == 0.25 and m.num_fp == 1
    assert math.isnan(m.mpjpe) and math.isnan(m.oks_ap)


def test_to_dict_is_json_ready():
    rng = np.random.default_rng(11)
    kps = body(box(), rng)
    m = evaluate_keypoints([pred_frame(kps)], [gt_frame(kps, [box()])])
    d = json.loads(json.dumps(m.to_dict()))
    assert (d["PEM"], d["MPJPE"], d["OKS_AP"], d["OKS_P@0.95"], d["num_tp"]) == (0.0, 0.0, 1.0, 1.0, 1)
    assert d["mismatch_penalty"] == 0.25


# ---------------------------------------------------------------- malformed input


def _good():
    rng = np.random.default_rng(12)
    kps = body(box(), rng)
    return pred_frame(kps), gt_frame(kps, [box()])


def test_mismatched_frame_lists():
    pred, gt = _good()
    with pytest.raises(ValueError, match="predictions has 2 frames but ground_truth has 1"):
        evaluate_keypoints([pred, pred], [gt])


@pytest.mark.parametrize(
    "target, field, value, error, message",
    [
        (
            "pred",
            "keypoints",
            torch.zeros(1, 13, 3, dtype=torch.float64),
            ValueError,
            r"predictions\[1\]\.keypoints",
        ),
        (
            "pred",
            "keypoints",
            torch.zeros(1, K, 2, dtype=torch.float64),
            ValueError,
            r"predictions\[1\]\.keypoints",
        ),
        ("pred", "keypoints", None, ValueError, r"predictions\[1\]\.keypoints: 1 row\(s\) contain NaN"),
        ("pred", "visibility", torch.ones(1, K), TypeError, r"predictions\[1\]\.visibility: expected a bool"),
        (
            "pred",
            "visibility",
            torch.ones(2, K, dtype=torch.bool),
            ValueError,
            r"predictions\[1\]\.visibility",
        ),
        ("gt", "boxes", torch.zeros(1, 6, dtype=torch.float64), ValueError, r"ground_truth\[1\]\.boxes"),
        (
            "gt",
            "boxes",
            torch.tensor(box(size=(0.8, 0.0, 1.8))[None]),
            ValueError,
            r"ground_truth\[1\]\.boxes: sizes",
        ),
        (
            "gt",
            "keypoints",
            torch.zeros(2, K, 3, dtype=torch.float64),
            ValueError,
            r"ground_truth\[1\]\.visibility",
        ),
    ],
)
def test_malformed_input_names_frame_and_field(target, field, value, error, message):
    pred, gt = _good()
    bad_pred, bad_gt = _good()
    if value is None:  # a NaN keypoint
        value = bad_pred.keypoints.clone()
        value[0, 3, 1] = math.nan
    setattr(bad_pred if target == "pred" else bad_gt, field, value)
    with pytest.raises(error, match=message):
        evaluate_keypoints([pred, bad_pred], [gt, bad_gt])


def test_boxes_are_turned_as_waymos_matcher_turns_them():
    """Waymo's matcher rotates keypoints by +heading into a box's frame: a long box at heading
    +45 degrees holds, for the matcher, the points along -45 degrees (the official code's result,
    recorded in tests/evaluation/test_keypoints_waymo.py, depends on it)."""
    rng = np.random.default_rng(5)
    long_box = box(0, 0, math.pi / 4, size=(3.0, 0.3, 1.8))
    along = np.array([[1.0, 1.0, 0.9]]) / np.array([[math.sqrt(2), math.sqrt(2), 1.0]])
    mirrored = along * np.array([[1.0, -1.0, 1.0]])
    kps = np.tile(along, (K, 1))
    gt = gt_frame(body(box(20, 20), rng), [box(20, 20)])  # a labelled human elsewhere
    for points, absorbed in ((kps, False), (np.tile(mirrored, (K, 1)), True)):
        # An unlabelled human in the long box absorbs a prediction whose keypoints it holds.
        frame = gt_frame(np.stack([gt.keypoints[0].numpy(), points]), [box(20, 20), long_box],
                         np.stack([np.ones(K, bool), np.zeros(K, bool)]))
        m = match_humans(pred_frame(points), frame)
        assert len(m.false_positives) == (0 if absorbed else 1)


# ---------------------------------------------------------------- brute-force reference


def _distance_to_box(p, b) -> float:
    dx, dy, dz = p[0] - b[0], p[1] - b[1], p[2] - b[2]
    c, s = math.cos(b[6]), math.sin(b[6])
    local = (dx * c - dy * s, dx * s + dy * c, dz)  # Waymo's matcher turns by +heading
    return math.sqrt(sum(max(abs(v) - h / 2, 0.0) ** 2 for v, h in zip(local, b[3:6])))


def _pair_cost(gk, gv, gb, pk, pv):
    """Waymo's stage-2 cost of a GT/prediction pair, or None when they cannot match."""
    if not any(pv[k] and _distance_to_box(pk[k], gb) <= C for k in range(K)):
        return None
    total = 0.0
    for k in range(K):
        if gv[k] and pv[k]:
            total += min(math.dist(gk[k], pk[k]), C)
        elif gv[k] or pv[k]:
            total += C
    return total / K if total / K < C else None


def _brute_force_matchings(gk, gv, gb, pk, pv):
    """All matchings with the least total of (cost - C), as sorted pair lists."""
    G, P = len(gk), len(pk)
    cost = [[_pair_cost(gk[g], gv[g], gb[g], pk[p], pv[p]) for p in range(P)] for g in range(G)]
    best, argbest = math.inf, set()
    # GT g takes prediction perm[g] when perm[g] < P, none otherwise.
    for perm in itertools.permutations(range(P + G), G):
        pairs = tuple((g, p) for g, p in enumerate(perm) if p < P)
        if any(cost[g][p] is None for g, p in pairs):
            continue
        total = sum(cost[g][p] - C for g, p in pairs)
        if total < best - 1e-12:
            best, argbest = total, {pairs}
        elif total <= best + 1e-12:
            argbest.add(pairs)
    return argbest


def _random_frame(rng):
    """Labelled humans crowded in 3 m x 3 m, noisy copies of most, and a few stray predictions."""
    boxes = [
        box(*rng.uniform(-1.5, 1.5, 2), rng.uniform(-math.pi, math.pi)) for _ in range(rng.integers(0, 4))
    ]
    gk = np.array([body(b, rng) for b in boxes]).reshape(-1, K, 3)
    gv = rng.random(gk.shape[:2]) < 0.7
    gv[np.arange(len(gv)), rng.integers(0, K, len(gv))] = True
    pk, pv = [], []
    for g in range(len(gk)):
        if rng.random() < 0.8:
            pk.append(gk[g] + rng.choice([0.03, 0.1, 0.2]) * rng.normal(size=(K, 3)))
            pv.append(gv[g] ^ (rng.random(K) < 0.1))
    for _ in range(rng.integers(0, 2)):
        pk.append(body(box(*rng.uniform(-2.5, 2.5, 2)), rng))
        pv.append(rng.random(K) < 0.8)
    order = rng.permutation(len(pk))
    pk = np.array(pk).reshape(-1, K, 3)[order]
    pv = np.array(pv, dtype=bool).reshape(-1, K)[order]
    return gk, gv, np.array(boxes).reshape(-1, 7), pk, pv


def test_matching_pem_mpjpe_and_oks_ap_against_brute_force():
    rng = np.random.default_rng(13)
    scales = np.array([WAYMO_OKS_SCALES[n] for n in KEYPOINT_NAMES])
    pem_num = pem_den = mpjpe_num = mpjpe_den = 0.0
    oks_all, preds, gts, checked = [], [], [], 0
    for _ in range(150):
        gk, gv, gb, pk, pv = _random_frame(rng)
        optimal = _brute_force_matchings(gk, gv, gb, pk, pv)
        if len(optimal) != 1:  # tie: the assignment (and so PEM) is up to the solver
            continue
        checked += 1
        (pairs,) = optimal
        match = match_humans(pred_frame(pk, pv), gt_frame(gk, gb, gv))
        assert sorted(zip(match.gt.tolist(), match.pred.tolist())) == sorted(pairs)
        matched_pred = {p for _, p in pairs}
        fn = [g for g in range(len(gk)) if g not in {g for g, _ in pairs}]
        fp = [p for p in range(len(pk)) if p not in matched_pred and pv[p].any()]
        assert (match.false_negatives.tolist(), match.false_positives.tolist()) == (fn, fp)

        preds.append(pred_frame(pk, pv))
        gts.append(gt_frame(gk, gb, gv))
        for g, p in pairs:
            s = math.prod(gb[g][3:6]) ** (1 / 3)
            similarity = []
            for k in range(K):
                d = math.dist(gk[g][k], pk[p][k])
                if gv[g][k] and pv[p][k]:
                    pem_num += min(d, C)
                    mpjpe_num += d
                    mpjpe_den += 1
                    similarity.append(math.exp(-(d**2) / (2 * (scales[k] * s) ** 2)))
                elif gv[g][k] or pv[p][k]:
                    pem_num += C
                pem_den += gv[g][k] or pv[p][k]
            oks_all.append(sum(similarity) / len(similarity) if similarity else 0.0)
        for g in fn:
            pem_num += C * gv[g].sum()
            pem_den += gv[g].sum()
            oks_all.append(0.0)
        for p in fp:
            pem_num += C * pv[p].sum()
            pem_den += pv[p].sum()
    assert checked >= 120
    m = evaluate_keypoints(preds, gts)
    assert m.pem == pytest.approx(pem_num / pem_den, abs=1e-12)
    assert m.mpjpe == pytest.approx(mpjpe_num / mpjpe_den, abs=1e-12)
    ap = sum(sum(o > t for o in oks_all) / len(oks_all) for t in WAYMO_OKS_THRESHOLDS) / len(
        WAYMO_OKS_THRESHOLDS
    )
    assert m.oks_ap == pytest.approx(ap, abs=1e-12)
    assert 0.05 < m.pem < 0.2 and 0.05 < m.oks_ap < 0.95  # the frames exercise both outcomes
