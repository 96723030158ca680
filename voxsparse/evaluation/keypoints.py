"""Human keypoint metrics: MPJPE, Waymo's PEM and Waymo's OKS AP.

The definitions follow the Waymo Open Dataset pose-estimation challenge code: the file
``src/waymo_open_dataset/metrics/python/keypoint_metrics.py`` of waymo-research/waymo-open-dataset
(read at commit 99a4cb3, April 2025) and its ``docs/pose_estimation_metric.md``. The Waymo
function each step mirrors is named in brackets. ``C`` is ``mismatch_penalty`` (0.25 m in Waymo,
where one constant is both the matching distance and the penalty). Keypoints are (14, 3) metres in
``KEYPOINT_NAMES`` order; a boolean visibility stands for Waymo's "fully visible" (label an
occluded keypoint as not visible). GTv = GT humans with at least one visible keypoint, GTi = GT
humans without any.

Matching, per frame [``MeanErrorMatcher.matching_ids``]. "Within d of a box" is measured as the
official code does, with the box turned by the opposite heading (see ``_distance_to_boxes``):

1. GTi absorb predictions without penalty. A prediction none of whose visible keypoints lies
   within ``C`` of the same keypoint of a GTv scores, against each GTi, the number of its visible
   keypoints inside that GTi's box; a Hungarian assignment maximising the total score pairs them
   (pairs scoring > 0 are kept).
2. Among the remaining humans, a pair (g, p) is a candidate when a visible keypoint of p lies
   within ``C`` of g's box. Its cost is the per-keypoint error averaged over all 14 keypoints:
   ``min(|d|, C)`` where GT and prediction are both visible, ``C`` where only one is, 0 where
   neither is [``mean_error_matching``, ``_pose_estimation_error``]. A Hungarian assignment
   minimises the total cost (non-candidates cost ``C``); pairs costing less than ``C`` match.

A match with a GTv is a true positive (TP); a GTv left unmatched is a false negative (FN); a
prediction left unmatched with a visible keypoint is a false positive (FP). GTi, their matches and
predictions without a visible keypoint leave the evaluation [``BaseMatcher.reorder``].

Metrics, pooled over all frames:

- PEM [``PoseEstimationMetric``]: ``(sum over TP keypoints of min(|d|, C) + C * M) / (T + M)``, with
  T the TP keypoints (visible in a matched GT and in its prediction) and M the mismatched ones
  (visible in only one of a matched pair, every visible keypoint of an FN or an FP). The doc's
  formula shows unclipped errors; the code clips them at ``C`` and so do we. Lower is better.
- MPJPE [``MeanPerJointPositionError``]: mean unclipped ``|d|`` over TP keypoints, metres.
- OKS [``object_keypoint_similarity``] of a TP: mean over its TP keypoints of
  ``exp(-|d|^2 / (2 (k_j s)^2))``, s the cube root of the GT box volume and k_j Waymo's per-type
  scale (``DEFAULT_PER_TYPE_SCALES``: COCO's, head centre as the shoulders); 0 when no keypoint is
  visible in both. An FN has OKS 0.
- OKS AP [``AveragePrecisionAtOKS``]: ``P@t`` = fraction of GTv (TP + FN) with OKS > t, and
  AP = mean of ``P@t`` over t = 0.50, 0.55, ..., 0.95. This is Waymo's definition, not COCO's
  ranked AP: scores play no part and FPs do not lower it (Waymo gives their padded GT a zero box,
  which weighs 0); FPs are charged in PEM instead. Waymo's Keras metric averages ``P@t`` per
  ``update_state`` call; pooling all GTv of all frames equals one call with all of them.

A keypoint detector's output (:class:`~voxsparse.models.voxelkp.structures.KeypointDetections3D`) and
the ground truth (``Annotations3D``) become these inputs through :func:`keypoint_predictions_for_eval`
and :func:`keypoint_ground_truth_for_eval`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from types import MappingProxyType

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.models.voxelkp.structures import KeypointDetections3D
from voxsparse.structures import Annotations3D
from voxsparse.structures._validation import check_tensor

__all__ = [
    "WAYMO_MISMATCH_PENALTY",
    "WAYMO_OKS_SCALES",
    "WAYMO_OKS_THRESHOLDS",
    "FrameKeypointGroundTruth",
    "FrameKeypointPredictions",
    "HumanMatch",
    "KeypointMetrics",
    "evaluate_keypoints",
    "keypoint_ground_truth_for_eval",
    "keypoint_predictions_for_eval",
    "match_humans",
]

#: Waymo's matching distance and mismatch penalty ``C``, metres.
WAYMO_MISMATCH_PENALTY = 0.25

#: Waymo's per-keypoint-type OKS scales, as fractions of the cube root of the GT box volume.
WAYMO_OKS_SCALES: Mapping[str, float] = MappingProxyType(
    {
        "nose": 0.052,
        "left_shoulder": 0.158,
        "left_elbow": 0.144,
        "left_wrist": 0.124,
        "left_hip": 0.214,
        "left_knee": 0.174,
        "left_ankle": 0.178,
        "right_shoulder": 0.158,
        "right_elbow": 0.144,
        "right_wrist": 0.124,
        "right_hip": 0.214,
        "right_knee": 0.174,
        "right_ankle": 0.178,
        "head_center": 0.158,
    }
)

#: Waymo's (and COCO's) OKS thresholds 0.50, 0.55, ..., 0.95.
WAYMO_OKS_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))

# Waymo counts a keypoint within this distance (metres) of a box as inside it.
_INSIDE_EPS = 1e-5


@dataclass
class FrameKeypointPredictions:
    """Predicted humans of one frame.

    Attributes:
        keypoints: (P, 14, 3) float, metres, LiDAR frame, ``KEYPOINT_NAMES`` order; all finite.
        visibility: (P, 14) bool, the keypoints the model claims (threshold confidences first).
    """

    keypoints: torch.Tensor
    visibility: torch.Tensor


@dataclass
class FrameKeypointGroundTruth:
    """Ground-truth humans of one frame.

    Attributes:
        keypoints: (G, 14, 3) float, metres, ``KEYPOINT_NAMES`` order; all finite (any value where
            not visible).
        visibility: (G, 14) bool.
        boxes: (G, >=7) float boxes ``(x, y, z, dx, dy, dz, heading, ...)`` of the humans, metres /
            radians, positive sizes: they decide match candidates and the OKS scale.
    """

    keypoints: torch.Tensor
    visibility: torch.Tensor
    boxes: torch.Tensor


@dataclass
class HumanMatch:
    """Result of :func:`match_humans` for one frame; int64 index arrays.

    Attributes:
        gt: (T,) GT humans with a visible keypoint that found a prediction (TP).
        pred: (T,) their predictions, ``pred[i]`` matched to ``gt[i]``.
        false_negatives: (FN,) GT humans with a visible keypoint and no match.
        false_positives: (FP,) predictions with a visible keypoint and no match.
    """

    gt: np.ndarray
    pred: np.ndarray
    false_negatives: np.ndarray
    false_positives: np.ndarray


@dataclass
class KeypointMetrics:
    """Result of :func:`evaluate_keypoints`.

    Attributes:
        mpjpe: metres over TP keypoints; nan without any.
        pem: metres; nan when there is neither a GT keypoint nor an FP to score.
        oks_ap: in [0, 1]; nan without GT humans with a visible keypoint.
        oks_precision: ``P@t`` per OKS threshold t (nan like ``oks_ap``).
        mismatch_penalty: ``C`` used, metres.
        num_gt: GT humans with a visible keypoint (GTv).
        num_gt_unlabelled: GT humans without one (GTi), never penalised.
        num_pred: all predicted humans.
        num_tp, num_fn, num_fp: matched GTv, unmatched GTv, unmatched predictions with a visible
            keypoint.
        num_tp_keypoints: keypoints visible in a matched GT and in its prediction.
        num_mismatched_keypoints: keypoints charged ``C`` in PEM.
    """

    mpjpe: float
    pem: float
    oks_ap: float
    oks_precision: dict[float, float]
    mismatch_penalty: float
    num_gt: int
    num_gt_unlabelled: int
    num_pred: int
    num_tp: int
    num_fn: int
    num_fp: int
    num_tp_keypoints: int
    num_mismatched_keypoints: int

    def table(self) -> str:
        """The headline numbers and the matching counts, for logs."""
        return (
            "Keypoints (Waymo pose-estimation metrics)\n"
            f"PEM {self.pem:.4f} m   MPJPE {self.mpjpe:.4f} m   OKS-AP {self.oks_ap:.4f}\n"
            f"humans: {self.num_gt} labelled GT ({self.num_gt_unlabelled} unlabelled), {self.num_pred} predicted, "
            f"{self.num_tp} matched, {self.num_fn} missed, {self.num_fp} false"
        )

    def to_dict(self) -> dict[str, float]:
        """Flat scalars for loggers / JSON, e.g. ``{"PEM": 0.12, "MPJPE": 0.08, "OKS_AP": 0.6, ...}``."""
        out: dict[str, float] = {"PEM": self.pem, "MPJPE": self.mpjpe, "OKS_AP": self.oks_ap}
        out.update({f"OKS_P@{t:.2f}": p for t, p in self.oks_precision.items()})
        out.update({k: v for k, v in asdict(self).items() if k == "mismatch_penalty" or k.startswith("num_")})
        return out


@dataclass
class _Humans:
    """One frame's humans as float64 / bool arrays; ``boxes`` is None for predictions."""

    keypoints: np.ndarray  # (N, 14, 3)
    visibility: np.ndarray  # (N, 14)
    boxes: np.ndarray | None  # (N, 7)


def _checked(where: str, frame: FrameKeypointPredictions | FrameKeypointGroundTruth, is_gt: bool) -> _Humans:
    """Validate one frame; errors name ``where.field`` (e.g. ``predictions[3].keypoints``)."""
    keypoints = check_tensor(
        f"{where}.keypoints", frame.keypoints, ndim=3, last_dim=3, floating=True, finite=True
    )
    if keypoints.shape[1] != len(KEYPOINT_NAMES):
        raise ValueError(
            f"{where}.keypoints: expected shape (N, {len(KEYPOINT_NAMES)}, 3), got {tuple(keypoints.shape)}"
        )
    visibility = frame.visibility
    if not isinstance(visibility, torch.Tensor) or visibility.dtype != torch.bool:
        got = getattr(visibility, "dtype", type(visibility).__name__)
        raise TypeError(f"{where}.visibility: expected a bool torch.Tensor, got {got}")
    if visibility.shape != keypoints.shape[:2]:
        raise ValueError(
            f"{where}.visibility: expected shape {tuple(keypoints.shape[:2])} to match keypoints, "
            f"got {tuple(visibility.shape)}"
        )
    boxes = None
    if is_gt:
        value = getattr(frame.boxes, "tensor", frame.boxes)  # accept Boxes3D
        value = check_tensor(
            f"{where}.boxes", value, ndim=2, min_last_dim=7, floating=True, length=len(keypoints), finite=True
        )
        if bool((value[:, 3:6] <= 0).any()):
            raise ValueError(f"{where}.boxes: sizes (dx, dy, dz) must be positive")
        boxes = value[:, :7].detach().cpu().double().numpy()
    return _Humans(keypoints.detach().cpu().double().numpy(), visibility.detach().cpu().numpy(), boxes)


def _distance_to_boxes(points: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(B, P, K) distance in metres of ``points`` (P, K, 3) to each of ``boxes`` (B, 7); 0 inside."""
    d = points[None] - boxes[:, None, None, :3]
    cos, sin = np.cos(boxes[:, 6, None, None]), np.sin(boxes[:, 6, None, None])
    # Offsets in the box's frame as Waymo's matcher takes them [``box_displacement``]: rotated by
    # +heading (its box type names the heading clockwise), so against a counter-clockwise label the
    # box is mirrored in heading. Matching as the official code does keeps our numbers its numbers.
    # Only the excess over the half sizes counts.
    local = np.stack((d[..., 0] * cos - d[..., 1] * sin, d[..., 0] * sin + d[..., 1] * cos, d[..., 2]), -1)
    return np.linalg.norm(np.maximum(np.abs(local) - 0.5 * boxes[:, None, None, 3:6], 0.0), axis=-1)


def _match(gt: _Humans, pred: _Humans, penalty: float) -> HumanMatch:
    gt_labelled = gt.visibility.any(1)
    pred_labelled = pred.visibility.any(1)
    matched_gt = np.zeros(0, dtype=np.int64)
    matched_pred = np.zeros(0, dtype=np.int64)
    if len(gt.keypoints) and len(pred.keypoints):
        # (G, P, 14) distance of each predicted keypoint to each GT box; invisible ones never count.
        to_box = np.where(pred.visibility[None], _distance_to_boxes(pred.keypoints, gt.boxes), np.inf)
        dist = np.linalg.norm(gt.keypoints[:, None] - pred.keypoints[None], axis=-1)  # (G, P, 14)
        both = gt.visibility[:, None] & pred.visibility[None]
        one = gt.visibility[:, None] ^ pred.visibility[None]

        # Stage 1: GTi absorb the predictions with the most keypoints inside their boxes, unless a
        # prediction lies on a labelled human.
        near_labelled = (both & (dist < penalty)).any(axis=(0, 2))  # (P,)
        inside = (to_box < _INSIDE_EPS).sum(-1)
        score = np.where(~gt_labelled[:, None] & ~near_labelled[None], inside, 0)
        rows, cols = linear_sum_assignment(score, maximize=True)
        keep = score[rows, cols] > 0
        absorbed_gt, absorbed_pred = rows[keep], cols[keep]

        # Stage 2: minimise the summed mean keypoint error among candidates.
        cost = np.where(both, np.minimum(dist, penalty), np.where(one, penalty, 0.0)).mean(-1)
        candidate = to_box.min(-1) <= penalty
        candidate[absorbed_gt] = False
        candidate[:, absorbed_pred] = False
        cost = np.where(candidate, cost, penalty)
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < penalty
        matched_gt = np.concatenate((rows[keep], absorbed_gt)).astype(np.int64)
        matched_pred = np.concatenate((cols[keep], absorbed_pred)).astype(np.int64)
    tp = gt_labelled[matched_gt]
    gt_free = gt_labelled.copy()
    gt_free[matched_gt] = False
    pred_free = pred_labelled.copy()
    pred_free[matched_pred] = False
    return HumanMatch(
        gt=matched_gt[tp],
        pred=matched_pred[tp],
        false_negatives=np.flatnonzero(gt_free),
        false_positives=np.flatnonzero(pred_free),
    )


def match_humans(
    prediction: FrameKeypointPredictions,
    ground_truth: FrameKeypointGroundTruth,
    mismatch_penalty: float = WAYMO_MISMATCH_PENALTY,
) -> HumanMatch:
    """Waymo's PEM matching of one frame (see the module docstring)."""
    gt = _checked("ground_truth", ground_truth, is_gt=True)
    return _match(gt, _checked("prediction", prediction, is_gt=False), mismatch_penalty)


def _scales(oks_scales: Mapping[str, float]) -> np.ndarray:
    missing = [name for name in KEYPOINT_NAMES if name not in oks_scales]
    if missing:
        raise ValueError(f"oks_scales: no scale for {missing}")
    scales = np.array([oks_scales[name] for name in KEYPOINT_NAMES], dtype=np.float64)
    if not (scales > 0).all():
        raise ValueError(f"oks_scales: scales must be positive, got {dict(oks_scales)}")
    return scales


def evaluate_keypoints(
    predictions: Sequence[FrameKeypointPredictions],
    ground_truth: Sequence[FrameKeypointGroundTruth],
    mismatch_penalty: float = WAYMO_MISMATCH_PENALTY,
    oks_thresholds: Sequence[float] = WAYMO_OKS_THRESHOLDS,
    oks_scales: Mapping[str, float] = WAYMO_OKS_SCALES,
) -> KeypointMetrics:
    """MPJPE, PEM and OKS AP over a dataset (definitions in the module docstring).

    Args:
        predictions: one entry per frame.
        ground_truth: one entry per frame, in the same order.
        mismatch_penalty: ``C``, metres: match distance and penalty per mismatched keypoint.
        oks_thresholds: OKS thresholds averaged into the AP.
        oks_scales: per keypoint name, the OKS scale relative to the cube root of the box volume.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"predictions has {len(predictions)} frames but ground_truth has {len(ground_truth)}"
        )
    if not mismatch_penalty > 0:
        raise ValueError(f"mismatch_penalty: expected a positive distance in metres, got {mismatch_penalty}")
    scales = _scales(oks_scales)
    pem_sum = mpjpe_sum = 0.0
    num_tp_keypoints = num_mismatched = 0
    num_gt = num_gt_unlabelled = num_pred = num_tp = num_fn = num_fp = 0
    oks_values: list[np.ndarray] = []
    for f, (pred_frame, gt_frame) in enumerate(zip(predictions, ground_truth)):
        gt = _checked(f"ground_truth[{f}]", gt_frame, is_gt=True)
        pred = _checked(f"predictions[{f}]", pred_frame, is_gt=False)
        m = _match(gt, pred, mismatch_penalty)

        dist = np.linalg.norm(gt.keypoints[m.gt] - pred.keypoints[m.pred], axis=-1)  # (T, 14)
        both = gt.visibility[m.gt] & pred.visibility[m.pred]
        one = gt.visibility[m.gt] ^ pred.visibility[m.pred]
        mismatched = (
            int(one.sum())
            + int(gt.visibility[m.false_negatives].sum())
            + int(pred.visibility[m.false_positives].sum())
        )
        pem_sum += float(np.minimum(dist, mismatch_penalty)[both].sum()) + mismatch_penalty * mismatched
        mpjpe_sum += float(dist[both].sum())
        num_tp_keypoints += int(both.sum())
        num_mismatched += mismatched

        box_scale = np.cbrt(gt.boxes[m.gt, 3:6].prod(-1))  # (T,)
        similarity = np.exp(-(dist**2) / (2.0 * (scales[None] * box_scale[:, None]) ** 2))
        counted = both.sum(-1)
        oks = np.where(counted > 0, (similarity * both).sum(-1) / np.maximum(counted, 1), 0.0)
        oks_values += [oks, np.zeros(len(m.false_negatives))]

        labelled = int(gt.visibility.any(1).sum())
        num_gt += labelled
        num_gt_unlabelled += len(gt.keypoints) - labelled
        num_pred += len(pred.keypoints)
        num_tp += len(m.gt)
        num_fn += len(m.false_negatives)
        num_fp += len(m.false_positives)

    all_oks = np.concatenate(oks_values) if oks_values else np.zeros(0)
    precision = {float(t): float((all_oks > t).mean()) if len(all_oks) else math.nan for t in oks_thresholds}
    denominator = num_tp_keypoints + num_mismatched
    return KeypointMetrics(
        mpjpe=mpjpe_sum / num_tp_keypoints if num_tp_keypoints else math.nan,
        pem=pem_sum / denominator if denominator else math.nan,
        oks_ap=float(np.mean(list(precision.values()))) if len(all_oks) and precision else math.nan,
        oks_precision=precision,
        mismatch_penalty=float(mismatch_penalty),
        num_gt=num_gt,
        num_gt_unlabelled=num_gt_unlabelled,
        num_pred=num_pred,
        num_tp=num_tp,
        num_fn=num_fn,
        num_fp=num_fp,
        num_tp_keypoints=num_tp_keypoints,
        num_mismatched_keypoints=num_mismatched,
    )


def keypoint_predictions_for_eval(
    detections: Sequence[KeypointDetections3D],
    keypoint_labels: Sequence[int],
    score_threshold: float = 0.3,
    visibility_threshold: float = 0.5,
) -> list[FrameKeypointPredictions]:
    """Predicted humans of each frame, as input to :func:`evaluate_keypoints`.

    A detection is a predicted human when its label is one of ``keypoint_labels`` and its score is at
    least ``score_threshold`` (Waymo's keypoint metrics do not rank by score: PEM charges every
    predicted human that matches no one, so a threshold is part of the prediction); a keypoint is
    claimed visible when its visibility probability is at least ``visibility_threshold``.

    Args:
        detections: one per frame, from
            :meth:`voxsparse.models.detectors.keypoint_detector.KeypointDetector.predict`.
        keypoint_labels: e.g. ``model.keypoint_labels``.
    """
    labels = torch.as_tensor(list(keypoint_labels), dtype=torch.int64)
    frames = []
    for f, det in enumerate(detections):
        if not isinstance(det, KeypointDetections3D):
            raise TypeError(f"detections[{f}]: expected KeypointDetections3D, got {type(det).__name__}")
        keep = torch.isin(det.labels.cpu(), labels) & (det.scores.cpu() >= score_threshold)
        frames.append(
            FrameKeypointPredictions(
                keypoints=det.keypoints.cpu()[keep].float(),
                visibility=det.keypoint_scores.cpu()[keep] >= visibility_threshold,
            )
        )
    return frames


def keypoint_ground_truth_for_eval(
    annotations: Sequence[Annotations3D], keypoint_labels: Sequence[int]
) -> list[FrameKeypointGroundTruth]:
    """Ground-truth humans of each frame (boxes of ``keypoint_labels``) for ``evaluate_keypoints``.

    A human without keypoint labels (``keypoints`` None, or no visible keypoint) enters as unlabelled
    (Waymo's GTi): it absorbs a prediction on it without penalty and is never a false negative.
    """
    labels = torch.as_tensor(list(keypoint_labels), dtype=torch.int64)
    frames = []
    for ann in annotations:
        human = torch.isin(ann.labels.cpu(), labels)
        n = int(human.sum())
        if ann.keypoints is None or ann.keypoint_visibility is None:
            keypoints = torch.zeros(n, len(KEYPOINT_NAMES), 3)
            visibility = torch.zeros(n, len(KEYPOINT_NAMES), dtype=torch.bool)
        else:
            keypoints = ann.keypoints.cpu()[human].float()
            visibility = ann.keypoint_visibility.cpu()[human]
        boxes = ann.boxes.tensor.cpu()[human, :7].float()
        frames.append(FrameKeypointGroundTruth(keypoints, visibility, boxes))
    return frames
