"""Per-class 3D detection average precision (AP) and heading-weighted AP (APH).

The metric, for each class ``c`` with IoU threshold ``t_c``:

1. Matching, per frame: predictions in decreasing score order each take the still-unmatched
   ground-truth (GT) box of their class with the highest IoU >= ``t_c``; one with none is a false
   positive (FP). GT boxes above the evaluated difficulty level (LEVEL_2 boxes in a LEVEL_1
   evaluation) are *ignored*: a prediction matched to one is neither TP nor FP, and does not count
   towards precision. When a prediction qualifies for both, it takes a non-ignored GT first.
2. Over all frames, predictions sorted by score give a precision-recall curve; predictions with
   equal scores form one operating point, so the result does not depend on their order.
3. AP = area under the monotone precision envelope (all-point interpolation). APH is the same with
   each TP weighted by heading accuracy ``1 - |wrap(heading_pred - heading_gt)| / pi`` in both
   precision and recall.

A class with no (non-ignored) GT has AP = APH = nan. This is the synthetic-world metric; the Waymo
suite (range breakdowns, its own PR sampling) is meant to reuse the flattening, matching and
:func:`average_precision` steps below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Sequence

import torch

from voxsparse.constants import CLASS_NAMES
from voxsparse.ops.boxes import bev_iou_aligned, iou_3d_aligned, limit_period

__all__ = [
    "WAYMO_IOU_THRESHOLDS",
    "FramePredictions",
    "FrameGroundTruth",
    "DetectionMetrics",
    "evaluate_detection",
    "average_precision",
]

#: Waymo's per-class 3D IoU thresholds.
WAYMO_IOU_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {"Vehicle": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
)

#: Elements of a (frames, predictions, GT) IoU block held at once during matching.
_BLOCK_ELEMENTS = 1 << 23


@dataclass
class FramePredictions:
    """Detections of one frame.

    Attributes:
        boxes: (K, >=7) float boxes ``(x, y, z, dx, dy, dz, heading, ...)``, metres / radians.
        scores: (K,) float confidences (any finite range; only their order matters).
        labels: (K,) integer class indices.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@dataclass
class FrameGroundTruth:
    """Ground truth of one frame.

    Attributes:
        boxes: (G, >=7) float boxes, metres / radians.
        labels: (G,) integer class indices.
        difficulty: (G,) integer, 1 = LEVEL_1, 2 = LEVEL_2; None means all LEVEL_1.
    """

    boxes: torch.Tensor
    labels: torch.Tensor
    difficulty: torch.Tensor | None = None


@dataclass
class DetectionMetrics:
    """Result of :func:`evaluate_detection`; per-class dicts are keyed by class name.

    Attributes:
        class_names: evaluated classes, in label order.
        iou_thresholds: IoU threshold of each class.
        difficulty: 1 (LEVEL_1) or 2 (LEVEL_2).
        iou_type: "3d" or "bev".
        ap: AP in [0, 1], nan for a class without GT.
        aph: heading-weighted AP, nan for a class without GT.
        num_gt: GT boxes counted (ignored ones excluded).
        num_pred: predictions of the class, all of them.
    """

    class_names: tuple[str, ...]
    iou_thresholds: dict[str, float]
    difficulty: int
    iou_type: str
    ap: dict[str, float]
    aph: dict[str, float]
    num_gt: dict[str, int]
    num_pred: dict[str, int]

    @property
    def mean_ap(self) -> float:
        """Mean AP over classes with GT (nan if none has any)."""
        return _nanmean(self.ap.values())

    @property
    def mean_aph(self) -> float:
        """Mean APH over classes with GT (nan if none has any)."""
        return _nanmean(self.aph.values())

    def to_dict(self) -> dict[str, float]:
        """Flat scalars for loggers, e.g. ``{"AP_L2/Vehicle": 0.71, ..., "mAP_L2": 0.6}``."""
        level = f"L{self.difficulty}"
        out: dict[str, float] = {}
        for name in self.class_names:
            out[f"AP_{level}/{name}"] = self.ap[name]
            out[f"APH_{level}/{name}"] = self.aph[name]
        out[f"mAP_{level}"] = self.mean_ap
        out[f"mAPH_{level}"] = self.mean_aph
        return out

    def table(self) -> str:
        """A readable text table of the per-class results (print it)."""
        width = max([len("Class"), len("mean")] + [len(n) for n in self.class_names])
        lines = [
            f"{self.iou_type.upper()} detection, LEVEL_{self.difficulty}",
            f"{'Class':<{width}}  {'IoU':>5}  {'AP':>7}  {'APH':>7}  {'#GT':>8}  {'#Pred':>8}",
        ]
        for name in self.class_names:
            lines.append(
                f"{name:<{width}}  {self.iou_thresholds[name]:>5.2f}  {self.ap[name]:>7.4f}  "
                f"{self.aph[name]:>7.4f}  {self.num_gt[name]:>8d}  {self.num_pred[name]:>8d}"
            )
        lines.append(f"{'mean':<{width}}  {'':>5}  {self.mean_ap:>7.4f}  {self.mean_aph:>7.4f}")
        return "\n".join(lines)


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def average_precision(scores: torch.Tensor, weights: torch.Tensor, num_gt: int) -> float:
    """All-point interpolated AP of one class.

    Args:
        scores: (K,) scores of the counted (non-ignored) predictions.
        weights: (K,) TP weight of each prediction: 1 TP, 0 FP, or a heading accuracy in [0, 1] for
            APH. Precision = sum of weights / predictions, recall = sum of weights / ``num_gt``.
        num_gt: number of GT objects.

    Returns:
        AP in [0, 1]; nan when ``num_gt`` is 0; 0 when there are no predictions.
    """
    if num_gt == 0:
        return math.nan
    if scores.numel() == 0:
        return 0.0
    order = torch.argsort(scores, descending=True, stable=True)
    scores, cum = scores[order], torch.cumsum(weights[order].double(), 0)
    count = torch.arange(1, scores.numel() + 1, dtype=torch.float64, device=scores.device)
    # Only the last prediction of each run of equal scores is a reachable operating point.
    last = torch.ones_like(scores, dtype=torch.bool)
    last[:-1] = scores[1:] != scores[:-1]
    precision, recall = cum[last] / count[last], cum[last] / num_gt
    envelope = precision.flip(0).cummax(0).values.flip(0)
    return float((torch.diff(recall, prepend=recall.new_zeros(1)) * envelope).sum())


@dataclass
class _Flat:
    """All frames' rows concatenated; ``frame`` (R,) is each row's frame index, non-decreasing."""

    boxes: torch.Tensor  # (R, 7) float64
    labels: torch.Tensor  # (R,) int64
    frame: torch.Tensor  # (R,) int64
    extra: torch.Tensor  # (R,) scores (float64) or difficulty (int64)


def _tensor(frames_name: str, f: int, field: str, value: object, ndim: int, floating: bool, rows: int | None):
    """Check one per-frame field; raise naming ``frames_name[f].field``."""
    where = f"{frames_name}[{f}].{field}"
    value = getattr(value, "tensor", value)  # accept Boxes3D
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim or (ndim == 2 and value.shape[1] < 7):
        expected = "(N, >=7)" if ndim == 2 else "(N,)"
        raise ValueError(f"{where}: expected shape {expected}, got {tuple(value.shape)}")
    if floating != value.is_floating_point() or value.dtype == torch.bool:
        raise ValueError(
            f"{where}: expected {'a floating' if floating else 'an integer'} dtype, got {value.dtype}"
        )
    if rows is not None and value.shape[0] != rows:
        raise ValueError(f"{where}: has {value.shape[0]} rows but boxes has {rows}")
    return value


def _first_bad(frames_name: str, field: str, bad: torch.Tensor, frame: torch.Tensor, what: str) -> None:
    if bool(bad.any()):
        f = int(frame[bad.nonzero()[0, 0]])
        raise ValueError(f"{frames_name}[{f}].{field}: {what}")


def _flatten(frames: Sequence, frames_name: str, is_pred: bool, num_classes: int, device) -> _Flat:
    boxes, labels, extra, sizes = [], [], [], []
    for f, frame in enumerate(frames):
        b = _tensor(frames_name, f, "boxes", frame.boxes, 2, True, None)
        n = b.shape[0]
        boxes.append(b[:, :7].to(device, torch.float64))
        labels.append(_tensor(frames_name, f, "labels", frame.labels, 1, False, n).to(device, torch.int64))
        if is_pred:
            extra.append(
                _tensor(frames_name, f, "scores", frame.scores, 1, True, n).to(device, torch.float64)
            )
        elif getattr(frame, "difficulty", None) is None:
            extra.append(torch.ones(n, dtype=torch.int64, device=device))
        else:
            extra.append(
                _tensor(frames_name, f, "difficulty", frame.difficulty, 1, False, n).to(device, torch.int64)
            )
        sizes.append(n)
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    flat = _Flat(
        boxes=torch.cat(boxes) if boxes else torch.zeros(0, 7, dtype=torch.float64, device=device),
        labels=torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64, device=device),
        frame=torch.repeat_interleave(torch.arange(len(sizes), device=device), counts),
        extra=torch.cat(extra) if extra else torch.zeros(0, device=device),
    )
    # Value checks run once on the concatenation; only a failure looks up its frame.
    _first_bad(frames_name, "boxes", ~torch.isfinite(flat.boxes).all(1), flat.frame, "contains NaN or inf")
    _first_bad(
        frames_name, "boxes", (flat.boxes[:, 3:6] < 0).any(1), flat.frame, "has negative sizes (dx, dy, dz)"
    )
    bad_label = (flat.labels < 0) | (flat.labels >= num_classes)
    _first_bad(frames_name, "labels", bad_label, flat.frame, f"labels outside [0, {num_classes})")
    if is_pred:
        _first_bad(frames_name, "scores", ~torch.isfinite(flat.extra), flat.frame, "contains NaN or inf")
    else:
        bad_difficulty = (flat.extra != 1) & (flat.extra != 2)
        _first_bad(frames_name, "difficulty", bad_difficulty, flat.frame, "values must be 1 or 2")
    return flat


def _slots(frame: torch.Tensor, order: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(F, max rows per frame) row indices, -1 padded; ``order`` lists rows frame by frame."""
    counts = torch.bincount(frame, minlength=num_frames)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    frame_sorted = frame[order]
    rank = torch.arange(order.numel(), device=order.device) - starts[frame_sorted]
    slots = torch.full((num_frames, width), -1, dtype=torch.int64, device=frame.device)
    slots[frame_sorted, rank] = order
    return slots


def _radius(boxes: torch.Tensor) -> torch.Tensor:
    """(...) radius in metres of the BEV bounding circle of boxes (..., 7)."""
    return 0.5 * torch.hypot(boxes[..., 3], boxes[..., 4])


def _greedy_match(
    pred: _Flat,
    gt: _Flat,
    gt_ignored: torch.Tensor,
    thresholds: torch.Tensor,
    num_frames: int,
    use_height: bool,
) -> torch.Tensor:
    """Index of the GT row each prediction row is matched to, (K,) int64, -1 when unmatched.

    Frames are processed together: one (frames, K, G) IoU block per chunk of frames, then one
    vectorised step per score rank. Cross-class pairs keep IoU 0 and thresholds are > 0, so they
    never match, and matching all classes at once equals matching each class alone.
    """
    # Predictions in decreasing score order within each frame (stable, so ties keep input order).
    by_score = torch.argsort(pred.extra, descending=True, stable=True)
    by_frame = by_score[torch.argsort(pred.frame[by_score], stable=True)]
    pred_slots = _slots(pred.frame, by_frame, num_frames)  # (F, Kmax)
    gt_slots = _slots(
        gt.frame, torch.arange(gt.frame.numel(), device=gt.frame.device), num_frames
    )  # (F, Gmax)
    matched = torch.full((pred.frame.numel(),), -1, dtype=torch.int64, device=pred.frame.device)
    k_max, g_max = pred_slots.shape[1], gt_slots.shape[1]
    if k_max == 0 or g_max == 0:
        return matched
    iou_fn = iou_3d_aligned if use_height else bev_iou_aligned
    step = max(1, _BLOCK_ELEMENTS // (k_max * g_max))
    for f0 in range(0, num_frames, step):
        ps, gs = pred_slots[f0 : f0 + step], gt_slots[f0 : f0 + step]
        pb, gb = pred.boxes[ps.clamp(min=0)], gt.boxes[gs.clamp(min=0)]  # (Fc, Kmax, 7), (Fc, Gmax, 7)
        same_class = pred.labels[ps.clamp(min=0)][:, :, None] == gt.labels[gs.clamp(min=0)][:, None, :]
        # Only pairs whose bounding circles overlap can have IoU > 0: compute just those.
        centre_dist = torch.hypot(
            pb[:, :, None, 0] - gb[:, None, :, 0], pb[:, :, None, 1] - gb[:, None, :, 1]
        )
        near = (ps >= 0)[:, :, None] & (gs >= 0)[:, None, :] & same_class
        near &= centre_dist <= _radius(pb)[:, :, None] + _radius(gb)[:, None, :] + 1e-6
        fi, ki, gi = near.nonzero(as_tuple=True)
        iou = torch.zeros(near.shape, dtype=torch.float64, device=near.device)
        iou[fi, ki, gi] = iou_fn(pb[fi, ki], gb[fi, gi])

        taken = gs < 0  # padding counts as taken
        ignored = gt_ignored[gs.clamp(min=0)]
        threshold = torch.where(ps >= 0, thresholds[pred.labels[ps.clamp(min=0)]], math.inf)  # (Fc, Kmax)
        rows = torch.arange(ps.shape[0], device=ps.device)
        for r in range(k_max):
            ok = (iou[:, r] >= threshold[:, r, None]) & ~taken
            # Non-ignored GT rank above ignored GT (+2 > any IoU); non-candidates sit at -1.
            preference = torch.where(ok, iou[:, r] + 2.0 * ~ignored, -1.0)
            best_value, best = preference.max(dim=1)
            hit = best_value >= 0
            taken[rows[hit], best[hit]] = True
            matched[ps[hit, r]] = gs[rows[hit], best[hit]]
    return matched


def evaluate_detection(
    predictions: Sequence,
    ground_truths: Sequence,
    class_names: Sequence[str] = CLASS_NAMES,
    iou_thresholds: Mapping[str, float] = WAYMO_IOU_THRESHOLDS,
    difficulty: int = 2,
    iou_type: str = "3d",
    device: torch.device | str = "cpu",
) -> DetectionMetrics:
    """Per-class AP and APH over a set of frames (see the module docstring for the definition).

    Args:
        predictions: per frame, a :class:`FramePredictions` (or any object with ``boxes``, ``scores``,
            ``labels``, e.g. ``voxsparse.structures.Detections3D``).
        ground_truths: per frame, a :class:`FrameGroundTruth` (or any object with ``boxes``,
            ``labels`` and optionally ``difficulty``, e.g. ``Annotations3D``); same length.
        class_names: name of each label index; labels must lie in ``[0, len(class_names))``.
        iou_thresholds: IoU threshold in (0, 1] for every name in ``class_names``.
        difficulty: 2 evaluates all GT (LEVEL_2); 1 ignores LEVEL_2 GT (LEVEL_1).
        iou_type: "3d" (rotated 3D IoU) or "bev" (rotated bird's-eye-view IoU).
        device: where to compute; inputs are copied there.

    Returns:
        :class:`DetectionMetrics`.

    Raises:
        ValueError: naming the field and frame, for boxes not (N, >=7), NaN/inf boxes or scores,
            negative sizes, mismatched lengths, labels outside the class range, difficulty not 1/2;
            or for mismatched frame counts, a missing or out-of-range threshold, a bad ``difficulty``
            or ``iou_type``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions has {len(predictions)} frames but ground_truths has {len(ground_truths)}"
        )
    if difficulty not in (1, 2):
        raise ValueError(f"difficulty must be 1 (LEVEL_1) or 2 (LEVEL_2), got {difficulty}")
    if iou_type not in ("3d", "bev"):
        raise ValueError(f"iou_type must be '3d' or 'bev', got {iou_type!r}")
    class_names = tuple(class_names)
    for name in class_names:
        if name not in iou_thresholds or not 0 < iou_thresholds[name] <= 1:
            raise ValueError(
                f"iou_thresholds: need a value in (0, 1] for class {name!r}, got {iou_thresholds.get(name)}"
            )
    thresholds = {name: float(iou_thresholds[name]) for name in class_names}

    num_frames = len(predictions)
    pred = _flatten(predictions, "predictions", True, len(class_names), device)
    gt = _flatten(ground_truths, "ground_truths", False, len(class_names), device)
    gt_ignored = gt.extra > difficulty
    threshold_table = torch.tensor([thresholds[n] for n in class_names], dtype=torch.float64, device=device)
    matched = _greedy_match(pred, gt, gt_ignored, threshold_table, num_frames, use_height=iou_type == "3d")

    hit = matched >= 0
    target = matched.clamp(min=0)
    counted = ~(hit & gt_ignored[target])  # predictions on ignored GT drop out of precision
    tp = (hit & counted).double()
    heading_error = limit_period(pred.boxes[:, 6] - gt.boxes[target, 6]).abs()
    heading_accuracy = tp * (1 - heading_error / math.pi)

    ap, aph, num_gt, num_pred = {}, {}, {}, {}
    for c, name in enumerate(class_names):
        keep = (pred.labels == c) & counted
        num_gt[name] = int(((gt.labels == c) & ~gt_ignored).sum())
        num_pred[name] = int((pred.labels == c).sum())
        ap[name] = average_precision(pred.extra[keep], tp[keep], num_gt[name])
        aph[name] = average_precision(pred.extra[keep], heading_accuracy[keep], num_gt[name])
    return DetectionMetrics(class_names, thresholds, difficulty, iou_type, ap, aph, num_gt, num_pred)
