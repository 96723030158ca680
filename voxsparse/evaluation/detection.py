"""Waymo-style 3D detection metrics: per-class AP and APH at LEVEL_1 / LEVEL_2, with range breakdowns.

The definition is that of the Waymo Open Dataset's own metric (``waymo_open_dataset/metrics``:
``detection_metrics.cc``, ``matcher.cc``, ``metrics_utils.cc``, ``breakdown_generator.cc``) with the
configuration of its evaluation tool: Hungarian matcher, 3D boxes, score cutoffs 0, 0.01, ..., 0.99,
1 and a recall step of 0.05. In our words:

1. Operating points. At each score cutoff ``c`` only the predictions with ``score >= c`` take part
   (compared in float32, as the official code stores scores and cutoffs).
2. Matching, redone at every cutoff, per frame and class. A prediction and a ground-truth (GT) box
   may match when their IoU is at least the class threshold (0.7 vehicle, 0.5 pedestrian and
   cyclist). Among those pairs a one-to-one assignment with the largest sum of IoUs (each rounded
   to 1e-6) is chosen (Hungarian). Scores take no part in it: a lower-scored prediction with the
   better overlap can take the GT, unlike a greedy score-ordered matcher. Boxes with a size of at
   most 1 cm or at least 1,000 km overlap nothing.
3. Counting at difficulty ``L`` (GT difficulty 1 = LEVEL_1, 2 = LEVEL_2). TP = matched predictions,
   whatever the level of their GT: in a LEVEL_1 evaluation a prediction on a LEVEL_2 box is a TP,
   but an unmatched LEVEL_2 box is no FN. FP = unmatched predictions. FN = unmatched GT of level
   ``<= L``. A TP's heading accuracy is ``1 - |wrap(heading_pred - heading_gt)| / pi``.
4. Per cutoff, over all frames: precision = TP / (TP + FP) (0 when there are no predictions); the
   APH precision = (sum of heading accuracies) / (TP + FP); recall = TP / (TP + FN) for both (0
   when TP + FN = 0). Where the recall is 0 the precision is set to 1.
5. Interpolation. Keep the best precision per distinct recall, plus the point (recall 0,
   precision 1). Walk from the highest recall down carrying the running maximum of precision (the
   monotone envelope); where the next recall is more than 0.05 (+1e-6) lower, insert points every
   0.05 below the current one holding the envelope value. The point at recall 0 then takes the
   precision of its neighbour. AP is the trapezoidal area under this polyline.
6. Range breakdown. Every box, predicted or GT, falls in a bin by the distance of its centre from
   the frame origin, ``sqrt(x^2 + y^2 + z^2)``: [0, 30), [30, 50), [50, inf) m. Steps 1-5 then run
   within each class x bin, so predictions only match GT of their own bin: a prediction at 29.9 m
   on a GT at 30.1 m is an FP in [0, 30) and an FN in [30, 50). (Waymo boxes are in the vehicle
   frame; ours are in whatever frame the caller gives, the LiDAR frame in this project.)

Where this module differs from the official code, on purpose:

- A class (or class x bin) with nothing to recall (TP + FN = 0 at every cutoff) gets AP = APH =
  nan and is left out of means; the official code reports 0 there.
- Numbers are float64 (the official precision/recall are float32); IoUs are exact in both.
  ``tests/evaluation/test_waymo_reference.py`` holds both to 1e-3 of the official package.
- Ties (several assignments with the same summed IoU, i.e. identical overlaps): where one
  prediction (GT) has equal-IoU choices, the lowest GT (prediction) row wins, which is what the
  official Hungarian code does; inside larger clusters the choice is unspecified in both. A tie
  can move APH, and LEVEL_1 numbers when the tied GT differ in level.
- There are no no-label zones (the official metric never counts a prediction in one as an FP).

How it is fast enough (5,000 frames x 100 x 100 boxes in seconds): IoU is computed once, only
for same-frame, same-class pairs whose bounding circles, heights and volumes allow the threshold.
The pairs above threshold form a bipartite graph whose connected components can be matched apart.
A component with one GT or one prediction (nearly all of them) is solved for every cutoff at
once: its match at a cutoff is its best-IoU pair among the predictions kept, a running maximum
in score order. Only the rare components with two or more of both run the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``), once per distinct set of kept predictions. A match
then holds for a contiguous range of cutoffs, and per-cutoff counts are cumulative sums.

Malformed input raises ``ValueError`` naming ``predictions[i].<field>`` or
``ground_truths[i].<field>`` (``TypeError`` for a non-tensor field):

- boxes not shaped (N, >= 7) (a wrong box width), NaN or inf in boxes, negative sizes;
- scores NaN or inf, or outside [0, 1] (the cutoffs span [0, 1], so other scales would be
  silently cut);
- labels outside ``[0, len(class_names))``; fields whose row counts disagree with ``boxes``;
- GT difficulty other than 1 or 2;
- a different number of prediction and GT frames.

Rules that need names (unknown class names, frames missing from a predictions file) live in
``voxsparse.engine.evaluate``, where names exist.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from voxsparse.geometry import limit_period
from voxsparse.ops.boxes import bev_iou_aligned, iou_3d_aligned

__all__ = [
    "RANGE_BREAKS",
    "RANGE_NAMES",
    "RECALL_DELTA",
    "SCORE_CUTOFFS",
    "WAYMO_IOU_THRESHOLDS",
    "DetectionMetrics",
    "FrameGroundTruth",
    "FramePredictions",
    "evaluate_detection",
    "evaluate_detection_levels",
    "interpolated_average_precision",
]

#: Waymo's per-class 3D IoU thresholds.
WAYMO_IOU_THRESHOLDS: Mapping[str, float] = MappingProxyType(
    {"Vehicle": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
)

#: Score cutoffs of the official evaluation: 0, 0.01, ..., 0.99, 1, stored as float32 like its config.
SCORE_CUTOFFS: np.ndarray = np.array([i * 0.01 for i in range(100)] + [1.0], dtype=np.float32)

#: Largest recall gap of the sampled precision-recall curve (the official ``desired_recall_delta``).
RECALL_DELTA = 0.05

#: Bin edges in metres of the range breakdown, and the bins' names.
RANGE_BREAKS: tuple[float, ...] = (30.0, 50.0)
RANGE_NAMES: tuple[str, ...] = ("0-30m", "30-50m", "50m+")

#: Elements of a (frames, predictions, GT) candidate-pair block held at once.
_BLOCK_ELEMENTS = 1 << 23

#: IoU is quantised to integers of this scale for the assignment, as the official matcher does.
_WEIGHT_SCALE = 1_000_000

#: Boxes with a size at or below / at or above these (metres) overlap nothing (official rule).
_MIN_BOX_SIZE, _MAX_BOX_SIZE = 1e-2, 1e6


@dataclass
class FramePredictions:
    """Detections of one frame.

    Attributes:
        boxes: (K, >=7) float boxes ``(x, y, z, dx, dy, dz, heading, ...)``, metres / radians.
        scores: (K,) float confidences in [0, 1].
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
    """Result at one difficulty level; per-class dicts are keyed by class name.

    Attributes:
        class_names: evaluated classes, in label order.
        iou_thresholds: IoU threshold of each class.
        difficulty: 1 (LEVEL_1) or 2 (LEVEL_2).
        iou_type: "3d" or "bev".
        ap: AP in [0, 1], nan for a class with nothing to recall.
        aph: heading-weighted AP, nan likewise.
        num_gt: GT boxes of level <= ``difficulty``.
        num_pred: predictions of the class, all of them.
        range_ap: per class, AP in each range bin of :data:`RANGE_NAMES`.
        range_aph: per class, APH in each range bin.
        range_num_gt: per class, GT boxes of level <= ``difficulty`` in each range bin.
    """

    class_names: tuple[str, ...]
    iou_thresholds: dict[str, float]
    difficulty: int
    iou_type: str
    ap: dict[str, float]
    aph: dict[str, float]
    num_gt: dict[str, int]
    num_pred: dict[str, int]
    range_ap: dict[str, tuple[float, ...]]
    range_aph: dict[str, tuple[float, ...]]
    range_num_gt: dict[str, tuple[int, ...]]

    @property
    def mean_ap(self) -> float:
        """Mean AP over classes that are not nan (nan if all are)."""
        return _nanmean(self.ap.values())

    @property
    def mean_aph(self) -> float:
        """Mean APH over classes that are not nan (nan if all are)."""
        return _nanmean(self.aph.values())

    def to_dict(self) -> dict[str, float]:
        """Every number as a flat scalar, e.g. ``{"AP_L2/Vehicle": 0.71, "AP_L2/Vehicle/0-30m": 0.8,
        "num_gt_L2/Vehicle": 812, ..., "mAP_L2": 0.6}``."""
        level = f"L{self.difficulty}"
        out: dict[str, float] = {}
        for name in self.class_names:
            out[f"AP_{level}/{name}"] = self.ap[name]
            out[f"APH_{level}/{name}"] = self.aph[name]
            out[f"num_gt_{level}/{name}"] = self.num_gt[name]
            out[f"num_pred/{name}"] = self.num_pred[name]
            for b, bin_name in enumerate(RANGE_NAMES):
                out[f"AP_{level}/{name}/{bin_name}"] = self.range_ap[name][b]
                out[f"APH_{level}/{name}/{bin_name}"] = self.range_aph[name][b]
                out[f"num_gt_{level}/{name}/{bin_name}"] = self.range_num_gt[name][b]
        out[f"mAP_{level}"] = self.mean_ap
        out[f"mAPH_{level}"] = self.mean_aph
        return out

    def table(self) -> str:
        """Readable text tables: per class, then per class and range bin (print it)."""
        width = max([len("Class"), len("mean")] + [len(n) for n in self.class_names])
        lines = [
            f"{self.iou_type.upper()} detection, LEVEL_{self.difficulty} (Waymo AP/APH)",
            f"{'Class':<{width}}  {'IoU':>5}  {'AP':>7}  {'APH':>7}  {'#GT':>8}  {'#Pred':>8}",
        ]
        for name in self.class_names:
            lines.append(
                f"{name:<{width}}  {self.iou_thresholds[name]:>5.2f}  {self.ap[name]:>7.4f}  "
                f"{self.aph[name]:>7.4f}  {self.num_gt[name]:>8d}  {self.num_pred[name]:>8d}"
            )
        lines.append(f"{'mean':<{width}}  {'':>5}  {self.mean_ap:>7.4f}  {self.mean_aph:>7.4f}")
        cell = 24
        lines += [
            "",
            f"By range from the origin: AP / APH (#GT), LEVEL_{self.difficulty}",
            f"{'Class':<{width}}  " + "".join(f"{n:>{cell}}" for n in RANGE_NAMES),
        ]
        for name in self.class_names:
            cells = (
                f"{ap:.4f} / {aph:.4f} ({n})"
                for ap, aph, n in zip(self.range_ap[name], self.range_aph[name], self.range_num_gt[name])
            )
            lines.append(f"{name:<{width}}  " + "".join(f"{c:>{cell}}" for c in cells))
        return "\n".join(lines)


def _nanmean(values) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def interpolated_average_precision(
    precision: np.ndarray, recall: np.ndarray, delta: float = RECALL_DELTA
) -> float:
    """AP of one precision-recall curve, interpolated as the official metric does (step 5 above).

    Args:
        precision: (S,) precision at each score cutoff (1 where the recall is 0).
        recall: (S,) recall at each score cutoff.
        delta: largest recall gap left unsampled.

    Returns:
        AP in [0, 1]; 0 for an empty curve.
    """
    best = {0.0: 1.0}
    for p, r in zip(precision.tolist(), recall.tolist()):
        best[r] = max(best.get(r, 0.0), p)
    points: list[tuple[float, float]] = []  # (recall, envelope precision), recall descending
    # The walk starts from recall 0, so no points are inserted above the highest recall.
    envelope, previous = 0.0, 0.0
    for r in sorted(best, reverse=True):
        while previous - r > delta + 1e-6:
            previous -= delta
            points.append((previous, envelope))
        envelope = max(envelope, best[r])
        points.append((r, envelope))
        previous = r
    if len(points) >= 2:  # (0, 1) is a made-up point: it takes its neighbour's precision
        points[-1] = (points[-1][0], points[-2][1])
    return sum(0.5 * (r0 - r1) * (p0 + p1) for (r0, p0), (r1, p1) in itertools.pairwise(points))


# ---------------------------------------------------------------- input checks


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
            # Scores are compared with the float32 cutoffs in float32, as the official code does.
            extra.append(
                _tensor(frames_name, f, "scores", frame.scores, 1, True, n).to(device, torch.float32)
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
        outside = (flat.extra < 0) | (flat.extra > 1)
        _first_bad(
            frames_name,
            "scores",
            outside,
            flat.frame,
            "scores outside [0, 1] (the score cutoffs span [0, 1])",
        )
    else:
        bad_difficulty = (flat.extra != 1) & (flat.extra != 2)
        _first_bad(frames_name, "difficulty", bad_difficulty, flat.frame, "values must be 1 or 2")
    return flat


# ---------------------------------------------------------------- pairs above threshold


@dataclass
class _Edges:
    """Same-frame, same-class (prediction, GT) pairs whose IoU reaches the class threshold."""

    pred: np.ndarray  # (E,) int64 prediction rows
    gt: np.ndarray  # (E,) int64 GT rows
    weight: np.ndarray  # (E,) int64 IoU * _WEIGHT_SCALE, rounded

    def subset(self, keep: np.ndarray) -> _Edges:
        return _Edges(self.pred[keep], self.gt[keep], self.weight[keep])


def _slots(frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(F, max rows per frame) row indices, -1 padded; rows are grouped by frame in order."""
    counts = torch.bincount(frame, minlength=num_frames)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(frame.numel(), device=frame.device) - starts[frame]
    slots = torch.full((num_frames, width), -1, dtype=torch.int64, device=frame.device)
    slots[frame, rank] = torch.arange(frame.numel(), device=frame.device)
    return slots


def _edges(pred: _Flat, gt: _Flat, thresholds: torch.Tensor, num_frames: int, use_height: bool) -> _Edges:
    """All pairs with IoU >= their class threshold, frames taken in blocks of (frames, K, G)."""
    pred_slots, gt_slots = _slots(pred.frame, num_frames), _slots(gt.frame, num_frames)
    k_max, g_max = pred_slots.shape[1], gt_slots.shape[1]
    found = [(np.zeros(0, np.int64),) * 3]
    if k_max and g_max:
        step = max(1, _BLOCK_ELEMENTS // (k_max * g_max))
        for f0 in range(0, num_frames, step):
            ps, gs = pred_slots[f0 : f0 + step], gt_slots[f0 : f0 + step]
            p_rows, g_rows, iou = _block_edges(pred, gt, ps, gs, thresholds, use_height)
            # The official matcher compares and quantises the IoU in float32, rounding halves up.
            iou32 = iou.float()
            keep = iou32 >= thresholds[pred.labels[p_rows]].float()
            weight = torch.floor(iou32[keep] * _WEIGHT_SCALE + 0.5).long()
            found.append(tuple(t.cpu().numpy() for t in (p_rows[keep], g_rows[keep], weight)))
    p_rows, g_rows, weight = (np.concatenate(parts) for parts in zip(*found))
    return _Edges(p_rows, g_rows, weight)


def _block_edges(pred: _Flat, gt: _Flat, ps, gs, thresholds, use_height: bool):
    """Candidate pairs of a block of frames and their IoU: (P,), (P,) rows and (P,) float64.

    ``ps`` (Fc, Kmax) and ``gs`` (Fc, Gmax) are the blocks' prediction and GT rows, -1 padded.
    """
    dims = slice(3, 6) if use_height else slice(3, 5)  # the sizes that enter the IoU
    pb, gb = pred.boxes[ps.clamp(min=0)], gt.boxes[gs.clamp(min=0)]  # (Fc, Kmax, 7), (Fc, Gmax, 7)
    p_label = pred.labels[ps.clamp(min=0)]
    near = (
        (ps >= 0)[:, :, None]
        & (gs >= 0)[:, None, :]
        & (p_label[:, :, None] == gt.labels[gs.clamp(min=0)][:, None, :])
    )
    # IoU > 0 needs overlapping bounding circles (and z-extents in 3D).
    radius_p, radius_g = 0.5 * torch.hypot(pb[..., 3], pb[..., 4]), 0.5 * torch.hypot(gb[..., 3], gb[..., 4])
    centre_dist = torch.hypot(pb[:, :, None, 0] - gb[:, None, :, 0], pb[:, :, None, 1] - gb[:, None, :, 1])
    near &= centre_dist <= radius_p[:, :, None] + radius_g[:, None, :] + 1e-6
    if use_height:
        top = torch.minimum(
            pb[:, :, None, 2] + 0.5 * pb[:, :, None, 5], gb[:, None, :, 2] + 0.5 * gb[:, None, :, 5]
        )
        bottom = torch.maximum(
            pb[:, :, None, 2] - 0.5 * pb[:, :, None, 5], gb[:, None, :, 2] - 0.5 * gb[:, None, :, 5]
        )
        near &= top > bottom
    # IoU <= min(volume) / max(volume); the slack covers the float32 comparison above.
    size_p, size_g = pb[..., dims].prod(-1)[:, :, None], gb[..., dims].prod(-1)[:, None, :]
    t = thresholds[p_label][:, :, None] - 1e-6
    near &= torch.minimum(size_p, size_g) >= t * torch.maximum(size_p, size_g)
    sized_p = ((pb[..., dims] > _MIN_BOX_SIZE).all(-1) & (pb[..., 3:6] < _MAX_BOX_SIZE).all(-1))[:, :, None]
    sized_g = ((gb[..., dims] > _MIN_BOX_SIZE).all(-1) & (gb[..., 3:6] < _MAX_BOX_SIZE).all(-1))[:, None, :]
    near &= sized_p & sized_g
    fi, ki, gi = near.nonzero(as_tuple=True)
    p_rows, g_rows = ps[fi, ki], gs[fi, gi]
    iou_fn = iou_3d_aligned if use_height else bev_iou_aligned
    return p_rows, g_rows, iou_fn(pred.boxes[p_rows], gt.boxes[g_rows])


# ---------------------------------------------------------------- matching at every cutoff


@dataclass
class _Matches:
    """Matched pairs and the score cutoffs (indices ``lo <= j < hi``) at which each pair holds."""

    pred: np.ndarray  # (M,) int64
    gt: np.ndarray  # (M,) int64
    lo: np.ndarray  # (M,) int64
    hi: np.ndarray  # (M,) int64


def _match(edges: _Edges, kept_until: np.ndarray) -> _Matches:
    """Hungarian matching at every score cutoff.

    Args:
        edges: the pairs above threshold (of one frame and class or class x bin each).
        kept_until: (P,) per prediction row, the number of cutoffs it takes part in (it is kept at
            cutoff indices ``0 .. kept_until - 1``).
    """
    if edges.pred.size == 0:
        return _Matches(*(np.zeros(0, np.int64),) * 4)
    preds, pred_node = np.unique(edges.pred, return_inverse=True)
    gts, gt_node = np.unique(edges.gt, return_inverse=True)
    num_nodes = preds.size + gts.size
    graph = coo_matrix(
        (np.ones(edges.pred.size, np.int8), (pred_node, preds.size + gt_node)), shape=(num_nodes, num_nodes)
    )
    _, component = connected_components(graph, directed=False)
    edge_component = component[pred_node]
    num_components = int(component.max()) + 1
    preds_per = np.bincount(component[: preds.size], minlength=num_components)
    gts_per = np.bincount(component[preds.size :], minlength=num_components)
    star = ((preds_per == 1) | (gts_per == 1))[edge_component]
    parts = []
    if star.any():
        parts.append(_match_stars(edges.subset(star), edge_component[star], kept_until))
    if not star.all():
        parts.append(_match_general(edges.subset(~star), edge_component[~star], kept_until))
    return _Matches(*(np.concatenate(field) for field in zip(*parts)))


def _match_stars(edges: _Edges, component: np.ndarray, kept_until: np.ndarray):
    """Components with one GT or one prediction: the match is the best-IoU pair among those kept.

    Edges sorted by component and then by decreasing ``kept_until`` list the kept set of every
    cutoff as a prefix; the running maximum of the IoU in that order is the match of each prefix.
    Among pairs of equal IoU the first edge wins (the lowest prediction row for one GT, the
    lowest GT row for one prediction), which is what the official Hungarian matcher does.
    """
    kept = kept_until[edges.pred]
    order = np.lexsort((-kept, component))  # positions -> edge index
    component, kept = component[order], kept[order]
    # Components in sorted order get increasing offsets above any weight: the running maximum then
    # restarts at each component.
    rank = np.cumsum(np.r_[0, component[1:] != component[:-1]])
    key = rank * (2 * _WEIGHT_SCALE) + edges.weight[order]
    running = torch.cummax(torch.from_numpy(key), 0).values.numpy()
    # Positions sharing one running maximum form a group; within it, a running maximum of
    # (big - 1 - edge index) over the positions that reach that maximum finds the first such edge.
    group = np.cumsum(np.r_[0, running[1:] != running[:-1]])
    big = order.size + 1
    reaches = np.where(key == running, big - 1 - order, 0)
    first = torch.cummax(torch.from_numpy(group * big + reaches), 0).values.numpy() - group * big
    best = big - 1 - first
    same_next = np.r_[component[1:] == component[:-1], False]
    # Each run of equal ``kept`` within a component is one distinct kept set; its last position
    # holds the match, valid down to the next run's ``kept``.
    last = np.r_[kept[1:] != kept[:-1], True] | ~same_next
    next_kept = np.where(same_next, np.r_[kept[1:], 0], 0)
    return edges.pred[best[last]], edges.gt[best[last]], next_kept[last], kept[last]


def _match_general(edges: _Edges, component: np.ndarray, kept_until: np.ndarray):
    """Components with two or more predictions and GT: the Hungarian algorithm per kept set."""
    out = []
    order = np.argsort(component, kind="stable")
    bounds = np.flatnonzero(np.r_[True, component[order][1:] != component[order][:-1], True])
    for start, stop in itertools.pairwise(bounds):
        sub = order[start:stop]
        preds, p = np.unique(edges.pred[sub], return_inverse=True)
        gts, g = np.unique(edges.gt[sub], return_inverse=True)
        weight = np.zeros((preds.size, gts.size), np.int64)
        weight[p, g] = edges.weight[sub]
        kept = kept_until[preds]
        levels = np.unique(kept)[::-1]  # distinct kept sets, largest cutoff first
        for level, below in zip(levels, np.r_[levels[1:], 0]):
            rows = np.flatnonzero(kept >= level)
            r, c = linear_sum_assignment(weight[rows], maximize=True)
            hit = weight[rows[r], c] > 0  # zero-weight pairs are not above threshold
            n = int(hit.sum())
            out.append((preds[rows[r[hit]]], gts[c[hit]], np.full(n, below), np.full(n, level)))
    return tuple(np.concatenate(field) for field in zip(*out))


# ---------------------------------------------------------------- counting and AP


def _per_cutoff(group: np.ndarray, lo: np.ndarray, hi: np.ndarray, weight, num_groups: int) -> np.ndarray:
    """(num_groups, S) float64 sums of ``weight`` (None: 1) over the items of each group held at
    each cutoff index; item ``i`` is held at indices ``lo[i] <= j < hi[i]``."""
    width = SCORE_CUTOFFS.size + 1
    size = num_groups * width
    diff = np.bincount(group * width + lo, weight, size) - np.bincount(group * width + hi, weight, size)
    return np.cumsum(diff.reshape(num_groups, width), axis=1, dtype=np.float64)[:, :-1]


@dataclass
class _Scores:
    """AP, APH (nan with nothing to recall) and GT counts per group, one array per level."""

    ap: dict[int, np.ndarray]
    aph: dict[int, np.ndarray]
    num_gt: dict[int, np.ndarray]


def _score_groups(
    matches: _Matches,
    kept_until: np.ndarray,
    pred_group: np.ndarray,
    gt_group: np.ndarray,
    gt_level: np.ndarray,
    heading_accuracy: np.ndarray,
    num_groups: int,
) -> _Scores:
    """Per-cutoff TP / FP / FN per group and level, then AP and APH of each group.

    Args:
        matches: the matched pairs (within groups).
        kept_until: (P,) cutoffs each prediction takes part in.
        pred_group, gt_group: (P,), (G,) group index of every prediction and GT row.
        gt_level: (G,) difficulty of every GT row.
        heading_accuracy: (M,) heading accuracy of each match.
        num_groups: number of groups.
    """
    kept = _per_cutoff(pred_group, np.zeros_like(kept_until), kept_until, None, num_groups)
    group = pred_group[matches.pred]
    tp = _per_cutoff(group, matches.lo, matches.hi, None, num_groups)
    heading = _per_cutoff(group, matches.lo, matches.hi, heading_accuracy, num_groups)
    fp = kept - tp
    scores = _Scores({}, {}, {})
    for level in (1, 2):
        on_level = gt_level[matches.gt] <= level
        matched = _per_cutoff(group[on_level], matches.lo[on_level], matches.hi[on_level], None, num_groups)
        num_gt = np.bincount(gt_group[gt_level <= level], minlength=num_groups)
        fn = num_gt[:, None] - matched
        recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=tp + fn > 0)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
        precision_ha = np.divide(heading, tp + fp, out=np.zeros_like(tp), where=tp + fp > 0)
        precision[recall == 0] = 1.0
        precision_ha[recall == 0] = 1.0
        nothing = ((tp + fn) == 0).all(axis=1)
        scores.ap[level], scores.aph[level] = (
            np.array(
                [
                    math.nan if nothing[g] else interpolated_average_precision(p[g], recall[g])
                    for g in range(num_groups)
                ]
            )
            for p in (precision, precision_ha)
        )
        scores.num_gt[level] = num_gt
    return scores


def _range_bin(boxes: torch.Tensor) -> np.ndarray:
    """(R,) range-bin index of boxes (R, 7) by the distance of their centre from the origin."""
    distance = torch.linalg.vector_norm(boxes[:, :3], dim=1).cpu().numpy()
    return np.searchsorted(np.asarray(RANGE_BREAKS), distance, side="right")


def evaluate_detection_levels(
    predictions: Sequence,
    ground_truths: Sequence,
    class_names: Sequence[str],
    iou_thresholds: Mapping[str, float] = WAYMO_IOU_THRESHOLDS,
    iou_type: str = "3d",
    device: torch.device | str = "cpu",
) -> dict[int, DetectionMetrics]:
    """Waymo AP and APH per class and per class x range bin, at LEVEL_1 and LEVEL_2.

    See the module docstring for the definition and the rules on malformed input.

    Args:
        predictions: per frame, a :class:`FramePredictions` (or any object with ``boxes``, ``scores``,
            ``labels``, e.g. ``voxsparse.structures.Detections3D``).
        ground_truths: per frame, a :class:`FrameGroundTruth` (or any object with ``boxes``,
            ``labels`` and optionally ``difficulty``, e.g. ``Annotations3D``); same length.
        class_names: name of each label index; labels must lie in ``[0, len(class_names))``.
        iou_thresholds: IoU threshold in (0, 1] for every name in ``class_names``.
        iou_type: "3d" (rotated 3D IoU) or "bev" (rotated bird's-eye-view IoU).
        device: where IoUs are computed; inputs are copied there. Matching runs on the CPU.

    Returns:
        ``{1: LEVEL_1 metrics, 2: LEVEL_2 metrics}``; both come from one matching.

    Raises:
        ValueError: naming the frame and field for malformed input (module docstring), or for
            mismatched frame counts, a missing or out-of-range threshold, a bad ``iou_type``.
    """
    if len(predictions) != len(ground_truths):
        raise ValueError(
            f"predictions has {len(predictions)} frames but ground_truths has {len(ground_truths)}"
        )
    if iou_type not in ("3d", "bev"):
        raise ValueError(f"iou_type must be '3d' or 'bev', got {iou_type!r}")
    class_names = tuple(class_names)
    for name in class_names:
        if name not in iou_thresholds or not 0 < iou_thresholds[name] <= 1:
            raise ValueError(
                f"iou_thresholds: need a value in (0, 1] for class {name!r}, got {iou_thresholds.get(name)}"
            )
    thresholds = {name: float(iou_thresholds[name]) for name in class_names}

    num_frames, num_classes, num_bins = len(predictions), len(class_names), len(RANGE_NAMES)
    pred = _flatten(predictions, "predictions", True, num_classes, device)
    gt = _flatten(ground_truths, "ground_truths", False, num_classes, device)
    threshold_table = torch.tensor([thresholds[n] for n in class_names], dtype=torch.float64, device=device)
    edges = _edges(pred, gt, threshold_table, num_frames, use_height=iou_type == "3d")

    kept_until = np.searchsorted(SCORE_CUTOFFS, pred.extra.cpu().numpy(), side="right").astype(np.int64)
    pred_class, gt_class = pred.labels.cpu().numpy(), gt.labels.cpu().numpy()
    gt_level = gt.extra.cpu().numpy()
    heading_pred, heading_gt = pred.boxes[:, 6].cpu(), gt.boxes[:, 6].cpu()

    def heading_accuracy(m: _Matches) -> np.ndarray:
        error = limit_period(heading_pred[torch.from_numpy(m.pred)] - heading_gt[torch.from_numpy(m.gt)])
        error = error.abs().numpy()
        return np.clip(1 - error / math.pi, 0.0, 1.0)

    matches = _match(edges, kept_until)
    overall = _score_groups(
        matches, kept_until, pred_class, gt_class, gt_level, heading_accuracy(matches), num_classes
    )
    # Range bins: group = class * bins + bin; pairs across bins cannot match.
    pred_group = pred_class * num_bins + _range_bin(pred.boxes)
    gt_group = gt_class * num_bins + _range_bin(gt.boxes)
    in_range = _match(edges.subset(pred_group[edges.pred] == gt_group[edges.gt]), kept_until)
    by_range = _score_groups(
        in_range,
        kept_until,
        pred_group,
        gt_group,
        gt_level,
        heading_accuracy(in_range),
        num_classes * num_bins,
    )

    num_pred = np.bincount(pred_class, minlength=num_classes)
    out = {}
    for level in (1, 2):
        range_ap = by_range.ap[level].reshape(num_classes, num_bins)
        range_aph = by_range.aph[level].reshape(num_classes, num_bins)
        range_num_gt = by_range.num_gt[level].reshape(num_classes, num_bins)
        out[level] = DetectionMetrics(
            class_names=class_names,
            iou_thresholds=thresholds,
            difficulty=level,
            iou_type=iou_type,
            ap={n: float(overall.ap[level][c]) for c, n in enumerate(class_names)},
            aph={n: float(overall.aph[level][c]) for c, n in enumerate(class_names)},
            num_gt={n: int(overall.num_gt[level][c]) for c, n in enumerate(class_names)},
            num_pred={n: int(num_pred[c]) for c, n in enumerate(class_names)},
            range_ap={n: tuple(float(v) for v in range_ap[c]) for c, n in enumerate(class_names)},
            range_aph={n: tuple(float(v) for v in range_aph[c]) for c, n in enumerate(class_names)},
            range_num_gt={n: tuple(int(v) for v in range_num_gt[c]) for c, n in enumerate(class_names)},
        )
    return out


def evaluate_detection(
    predictions: Sequence,
    ground_truths: Sequence,
    class_names: Sequence[str],
    iou_thresholds: Mapping[str, float] = WAYMO_IOU_THRESHOLDS,
    difficulty: int = 2,
    iou_type: str = "3d",
    device: torch.device | str = "cpu",
) -> DetectionMetrics:
    """:func:`evaluate_detection_levels` at one difficulty: 2 (LEVEL_2, the default) or 1 (LEVEL_1)."""
    if difficulty not in (1, 2):
        raise ValueError(f"difficulty must be 1 (LEVEL_1) or 2 (LEVEL_2), got {difficulty}")
    return evaluate_detection_levels(
        predictions, ground_truths, class_names, iou_thresholds, iou_type, device
    )[difficulty]
