"""The KITTI 3D object benchmark's average precision: 2D image box, bird's-eye-view and 3D AP at the
Easy / Moderate / Hard levels, with 11 recall points (R11) and 40 (R40).

The rules are those of the official devkit's ``evaluate_object_3d_offline`` (checked against it,
built from its public source, on randomised cases: ``tests/evaluation/test_kitti_ap.py``):

1. Per class and level, ground truth of the class counts (``ignored_gt = 0``) when its 2D box is
   taller than the level's minimum height and its occlusion and truncation are within the level's
   limits (:func:`voxsparse.data.kitti.difficulty_levels`); a neighbouring type (``Van`` for ``Car``,
   ``Person_sitting`` for ``Pedestrian``) or a box of the class outside the level is ignored
   (``ignored_gt = 1``: neither found nor missed); every other object is left out. A detection of
   the class is evaluated when its 2D box is at least the minimum height tall (the height truncated
   to whole pixels); a shorter detection of any class is ignored (``ignored_det = 1``); other
   detections are left out.
2. Frame by frame, ground truth in file order takes one unassigned detection whose overlap exceeds
   the class's minimum overlap: when choosing score thresholds, the highest-scoring one; when
   counting at a threshold, the evaluated one of largest overlap, else the first ignored one.
   A counted ground truth with an evaluated detection is a true positive; without one, a false
   negative; every other pair only removes the detection. Evaluated detections left unassigned are
   false positives, except (image boxes only) those covering a ``DontCare`` region by more than the
   minimum overlap of their own area (``DontCare`` regions have no 3D box: the official code computes
   a zero overlap for them in BEV and 3D).
3. Score thresholds: the true positives' scores in decreasing order, one kept per 1/40 of recall
   (the devkit's ``getThresholds``). Precision = TP / (TP + FP) at each threshold, then the maximum
   over all lower thresholds; 41 values. R11 = the mean of values 0, 4, ..., 40; R40 = the mean of
   values 1 .. 40 (KITTI's metric since 2019, as OpenPCDet's ``kitti_object_eval_python`` computes it).
   Recall advances by one step per threshold kept, so with fewer than 40 counted ground-truth boxes
   there are fewer thresholds than steps and even perfect detections score below 100 (kept as is).

Overlaps: image boxes IoU; BEV IoU of the rotated ``(x, z)`` footprints; 3D IoU with the vertical
extent ``[y - h, y]`` (camera y points down), computed exactly in float64
(:mod:`voxsparse.ops.boxes`). Overlaps compare with ``>``.

Differences from OpenPCDet's Python evaluation: it ignores DontCare regions in BEV and 3D too (the
same numbers, see 2.), and its rotated overlap runs in float32, so a pair within ~1e-7 of a
threshold may fall the other way. The 2017 devkit (11 points only) required a ground truth box
taller than or as tall as the minimum height; the current devkit and OpenPCDet require taller, as
here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxsparse.data.kitti import (
    MAX_OCCLUSION,
    MAX_TRUNCATION,
    MIN_HEIGHT,
    KittiObjects,
    format_labels,
    image_boxes,
    image_size,
    lidar_boxes_to_camera,
    parse_calib,
    parse_labels,
)
from voxsparse.ops.boxes import bev_iou_aligned, iou_3d_aligned

__all__ = [
    "DEFAULT_MIN_OVERLAP",
    "DIFFICULTIES",
    "METRICS",
    "NUM_SAMPLE_POINTS",
    "KittiAP",
    "detections_to_objects",
    "evaluate_kitti",
    "kitti",
    "overlaps",
    "score_thresholds",
    "write_results",
]

#: Evaluated overlaps: image boxes, bird's-eye view, 3D.
METRICS: tuple[str, ...] = ("bbox", "bev", "3d")
DIFFICULTIES: tuple[str, ...] = ("Easy", "Moderate", "Hard")
#: Precision samples along recall (0, 1/40, ..., 1).
NUM_SAMPLE_POINTS = 41
#: The official minimum overlap per class, the same for every metric.
DEFAULT_MIN_OVERLAP: dict[str, float] = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
#: Lower-case class -> the lower-case type whose boxes are ignored for it.
NEIGHBOURS: dict[str, str] = {"car": "van", "pedestrian": "person_sitting"}

_DONTCARE = "dontcare"
#: Frames whose (frame, threshold, detection) tables are built at once.
_FRAMES_PER_CHUNK = 256


# --- overlaps ----------------------------------------------------------------------------------


def _footprints(objects: KittiObjects) -> torch.Tensor:
    """(K, 7) float64 boxes for :mod:`voxsparse.ops.boxes` in the camera's (x, z, y) axes: footprint
    centre (x, z), vertical centre y - h / 2, sizes (l, w, h), angle -rotation_y. IoU does not change
    under this relabelling of axes, and the footprint corners are the devkit's."""
    h, w, l = objects.dimensions.T
    x, y, z = objects.location.T
    return torch.from_numpy(np.column_stack([x, z, y - 0.5 * h, l, w, h, -objects.rotation_y]))


def _image_overlap(a: np.ndarray, b: np.ndarray, criterion: str) -> np.ndarray:
    """Overlap of matching rows of (P, 4) image boxes: ``"iou"``, or ``"a"`` (intersection / area of a)."""
    w = np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0])
    h = np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    if criterion == "a":
        denominator = area_a
    else:
        denominator = area_a + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(inter > 0, inter / denominator, 0.0)


@dataclass(frozen=True)
class _Pairs:
    """Every (ground truth, detection) pair of the same frame, as rows into the concatenated objects.

    Attributes:
        frame: (P,) frame of each pair; gt, det: (P,) rows of the concatenated ground truth / detections.
        sizes: per frame (G, D).
    """

    frame: np.ndarray
    gt: np.ndarray
    det: np.ndarray
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, gt_counts: Sequence[int], det_counts: Sequence[int]) -> _Pairs:
        g_count, d_count = np.asarray(gt_counts, np.int64), np.asarray(det_counts, np.int64)
        per_frame = g_count * d_count
        frame = np.repeat(np.arange(len(per_frame)), per_frame)
        # Position of each pair inside its frame's (G, D) block, row-major.
        local = np.arange(per_frame.sum()) - np.repeat(np.cumsum(per_frame) - per_frame, per_frame)
        d_of = np.where(per_frame[frame] > 0, local % np.maximum(d_count[frame], 1), 0)
        g_of = local // np.maximum(d_count[frame], 1)
        g_rows = (np.cumsum(g_count) - g_count)[frame] + g_of
        d_rows = (np.cumsum(d_count) - d_count)[frame] + d_of
        return cls(frame, g_rows, d_rows, tuple(zip(g_count.tolist(), d_count.tolist())))

    def split(self, values: np.ndarray) -> list[np.ndarray]:
        """(P,) values -> per frame (G, D)."""
        ends = np.cumsum([g * d for g, d in self.sizes])
        return [v.reshape(g, d) for v, (g, d) in zip(np.split(values, ends[:-1]), self.sizes)]


def overlaps(
    gt: Sequence[KittiObjects], det: Sequence[KittiObjects], metric: str, floor: float = 0.0
) -> list[np.ndarray]:
    """Per frame, the (G, D) float64 overlap (IoU) of every ground truth with every detection.

    ``DontCare`` rows are 0 (they have no box to match). Pairs that cannot overlap by more than
    ``floor`` are 0 without clipping polygons: BEV and 3D pairs whose footprints' axis-aligned
    bounding rectangles (and vertical extents) bound their IoU at ``floor`` or less.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    pairs = _Pairs.of([len(g) for g in gt], [len(d) for d in det])
    if len(pairs.frame) == 0:
        return pairs.split(np.zeros(0))
    gt_names = np.array([n.lower() for objects in gt for n in objects.names])
    keep = gt_names[pairs.gt] != _DONTCARE
    values = np.zeros(len(pairs.frame))
    if metric == "bbox":
        gb = np.concatenate([o.bbox for o in gt])
        db = np.concatenate([o.bbox for o in det])
        values[keep] = _image_overlap(db[pairs.det[keep]], gb[pairs.gt[keep]], "iou")
        return pairs.split(values)
    a = torch.cat([_footprints(o) for o in gt]).numpy()[pairs.gt[keep]]
    b = torch.cat([_footprints(o) for o in det]).numpy()[pairs.det[keep]]
    # Upper bound of the IoU: the intersection of the footprints lies in that of their bounding rectangles.
    half_a, half_b = _half_extents(a), _half_extents(b)
    w = np.minimum(a[:, 0] + half_a[:, 0], b[:, 0] + half_b[:, 0]) - np.maximum(a[:, 0] - half_a[:, 0], b[:, 0] - half_b[:, 0])
    h = np.minimum(a[:, 1] + half_a[:, 1], b[:, 1] + half_b[:, 1]) - np.maximum(a[:, 1] - half_a[:, 1], b[:, 1] - half_b[:, 1])
    inter = np.clip(w, 0, None) * np.clip(h, 0, None)
    size_a, size_b = a[:, 3] * a[:, 4], b[:, 3] * b[:, 4]
    if metric == "3d":
        top = np.minimum(a[:, 2] + 0.5 * a[:, 5], b[:, 2] + 0.5 * b[:, 5])
        bottom = np.maximum(a[:, 2] - 0.5 * a[:, 5], b[:, 2] - 0.5 * b[:, 5])
        inter = inter * np.clip(top - bottom, 0, None)
        size_a, size_b = size_a * a[:, 5], size_b * b[:, 5]
    inter = np.minimum(inter, np.minimum(size_a, size_b))
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(inter > 0, inter / (size_a + size_b - inter), 0.0)
    near = bound > floor
    iou = bev_iou_aligned if metric == "bev" else iou_3d_aligned
    found = np.zeros(len(a))
    if near.any():
        found[near] = iou(torch.from_numpy(b[near]), torch.from_numpy(a[near])).numpy()
    values[keep] = found
    return pairs.split(values)


def _half_extents(boxes: np.ndarray) -> np.ndarray:
    """(K, 2) half sizes along x and y of the axis-aligned rectangles around (K, 7) footprints."""
    c, s = np.abs(np.cos(boxes[:, 6])), np.abs(np.sin(boxes[:, 6]))
    half_l, half_w = 0.5 * boxes[:, 3], 0.5 * boxes[:, 4]
    return np.column_stack([half_l * c + half_w * s, half_l * s + half_w * c]) + 1e-9


def _dontcare_cover(gt: Sequence[KittiObjects], det: Sequence[KittiObjects]) -> np.ndarray:
    """(sum D,) for every detection, the largest share of its image box inside one DontCare region of its frame."""
    pairs = _Pairs.of([len(g) for g in gt], [len(d) for d in det])
    cover = np.zeros(sum(len(d) for d in det))
    if len(pairs.frame) == 0:
        return cover
    gt_names = np.array([n.lower() for objects in gt for n in objects.names])
    dc = gt_names[pairs.gt] == _DONTCARE
    gb = np.concatenate([o.bbox for o in gt])
    db = np.concatenate([o.bbox for o in det])
    share = _image_overlap(db[pairs.det[dc]], gb[pairs.gt[dc]], "a")
    np.maximum.at(cover, pairs.det[dc], share)
    return cover


# --- matching ----------------------------------------------------------------------------------


def score_thresholds(scores: np.ndarray, num_gt: int) -> np.ndarray:
    """The devkit's ``getThresholds``: of the true positives' ``scores`` in decreasing order, the
    score at each step of 1/40 in recall (the nearer of the two recalls around it)."""
    v = np.sort(np.asarray(scores, np.float64))[::-1]
    out, current = [], 0.0
    for i in range(len(v)):
        left = (i + 1) / num_gt
        right = (i + 2) / num_gt if i < len(v) - 1 else left
        if right - current < current - left and i < len(v) - 1:
            continue
        out.append(v[i])
        current += 1.0 / (NUM_SAMPLE_POINTS - 1.0)
    return np.asarray(out, np.float64)


@dataclass
class _Frames:
    """Ground truth and detections of one class and level, every frame padded to the same counts.

    Attributes:
        overlap: (F, G, D) float64 (0 for padding).
        ignored_gt: (F, G) int64 (-1 for padding); ignored_det: (F, D) int64 (-1 for padding).
        score: (F, D) float64 (-inf for padding); dontcare: (F, D) bool, covers a DontCare region.
    """

    overlap: np.ndarray
    ignored_gt: np.ndarray
    ignored_det: np.ndarray
    score: np.ndarray
    dontcare: np.ndarray


def _pad(rows: list[np.ndarray], fill: float, dtype: Any, width: int) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _chunk(
    frames: Sequence[int], overlap: list[np.ndarray], ignored_gt: list[np.ndarray], ignored_det: list[np.ndarray],
    scores: list[np.ndarray], dontcare: list[np.ndarray],
) -> _Frames:  # fmt: skip
    """The frames of ``frames``, only the rows that take part (ignored value != -1), padded."""
    gs = [np.flatnonzero(ignored_gt[f] != -1) for f in frames]
    ds = [np.flatnonzero(ignored_det[f] != -1) for f in frames]
    g_max, d_max = max(map(len, gs), default=0), max(map(len, ds), default=0)
    table = np.zeros((len(frames), g_max, d_max))
    for i, (f, g, d) in enumerate(zip(frames, gs, ds)):
        table[i, : len(g), : len(d)] = overlap[f][np.ix_(g, d)]
    return _Frames(
        table,
        _pad([ignored_gt[f][g] for f, g in zip(frames, gs)], -1, np.int64, g_max),
        _pad([ignored_det[f][d] for f, d in zip(frames, ds)], -1, np.int64, d_max),
        _pad([scores[f][d] for f, d in zip(frames, ds)], -np.inf, np.float64, d_max),
        _pad([dontcare[f][d] for f, d in zip(frames, ds)], False, bool, d_max),
    )


def _true_positive_scores(c: _Frames, min_overlap: float) -> np.ndarray:
    """Scores of the true positives when every ground truth takes its highest-scoring candidate."""
    n, _, d = c.overlap.shape
    if d == 0:
        return np.zeros(0)
    rows = np.arange(n)
    assigned = np.zeros((n, d), dtype=bool)
    found_scores = []
    for g in range(c.overlap.shape[1]):
        state = c.ignored_gt[:, g]
        candidate = (c.overlap[:, g] > min_overlap) & (c.ignored_det != -1) & ~assigned & (state != -1)[:, None]
        j = np.where(candidate, c.score, -np.inf).argmax(1)
        found = candidate.any(1)
        tp = found & (state == 0) & (c.ignored_det[rows, j] == 0)
        found_scores.append(c.score[rows[tp], j[tp]])
        assigned[rows[found], j[found]] = True
    return np.concatenate(found_scores) if found_scores else np.zeros(0)


def _counts(c: _Frames, thresholds: np.ndarray, min_overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """(T,) true and false positives at each score threshold (a detection counts when its score is
    at least the threshold)."""
    n, _, d = c.overlap.shape
    t = len(thresholds)
    if d == 0:
        return np.zeros(t, np.int64), np.zeros(t, np.int64)
    kept = c.score[:, None, :] >= thresholds[None, :, None]  # (F, T, D)
    evaluated = (c.ignored_det == 0)[:, None, :]
    ignored = (c.ignored_det == 1)[:, None, :]
    assigned = np.zeros((n, t, d), dtype=bool)
    tp = np.zeros(t, np.int64)
    f_idx, t_idx = np.meshgrid(np.arange(n), np.arange(t), indexing="ij")
    for g in range(c.overlap.shape[1]):
        state = c.ignored_gt[:, g][:, None]  # (F, 1)
        over = c.overlap[:, g][:, None, :]  # (F, 1, D)
        candidate = (over > min_overlap) & kept & ~assigned & (state != -1)[..., None]
        good = candidate & evaluated
        has_good = good.any(-1)
        other = candidate & ignored
        j = np.where(has_good, np.where(good, over, -np.inf).argmax(-1), other.argmax(-1))
        found = has_good | other.any(-1)
        tp += (found & has_good & (state == 0)).sum(0)
        assigned[f_idx[found], t_idx[found], j[found]] = True
    fp = (kept & evaluated & ~assigned & ~c.dontcare[:, None, :]).sum((0, 2))
    return tp, fp


def _precision(
    overlap: list[np.ndarray], ignored_gt: list[np.ndarray], ignored_det: list[np.ndarray],
    scores: list[np.ndarray], dontcare: list[np.ndarray], min_overlap: float,
) -> np.ndarray:  # fmt: skip
    """(41,) interpolated precision of one class, level and metric."""
    num_gt = int(sum((g == 0).sum() for g in ignored_gt))
    # Frames are independent: chunks of frames with similar numbers of detections pad least.
    order = np.argsort([int((d != -1).sum()) for d in ignored_det], kind="stable")
    chunks = [
        _chunk(order[s : s + _FRAMES_PER_CHUNK], overlap, ignored_gt, ignored_det, scores, dontcare)
        for s in range(0, len(overlap), _FRAMES_PER_CHUNK)
    ]
    found = np.concatenate([_true_positive_scores(c, min_overlap) for c in chunks] + [np.zeros(0)])
    precision = np.zeros(NUM_SAMPLE_POINTS)
    if num_gt == 0 or len(found) == 0:
        return precision
    thresholds = score_thresholds(found, num_gt)[:NUM_SAMPLE_POINTS]
    tp = np.zeros(len(thresholds), np.int64)
    fp = np.zeros(len(thresholds), np.int64)
    for c in chunks:
        t, f = _counts(c, thresholds, min_overlap)
        tp += t
        fp += f
    with np.errstate(divide="ignore", invalid="ignore"):
        precision[: len(thresholds)] = tp / (tp + fp)
    return np.maximum.accumulate(precision[::-1])[::-1]


# --- evaluation --------------------------------------------------------------------------------


@dataclass
class KittiAP:
    """The benchmark's AP per class, metric and level.

    Attributes:
        class_names: evaluated classes.
        metrics: evaluated overlaps, of :data:`METRICS`.
        min_overlap: per class, the overlap a match must exceed.
        precision: (len(metrics), len(class_names), 3, 41) interpolated precision at recall 0, 1/40, .., 1.
        num_gt: (len(class_names), 3) ground truth counted per class and level.
    """

    class_names: tuple[str, ...]
    metrics: tuple[str, ...]
    min_overlap: dict[str, float]
    precision: np.ndarray
    num_gt: np.ndarray

    @property
    def ap_r11(self) -> np.ndarray:
        """(metrics, classes, 3) AP in percent over 11 recall points (0, 0.1, .., 1)."""
        return self.precision[..., ::4].sum(-1) / 11 * 100

    @property
    def ap_r40(self) -> np.ndarray:
        """(metrics, classes, 3) AP in percent over 40 recall points (1/40, .., 1)."""
        return self.precision[..., 1:].sum(-1) / 40 * 100

    def table(self) -> str:
        lines = ["KITTI AP (Easy / Moderate / Hard), R40 [R11]"]
        for c, name in enumerate(self.class_names):
            lines.append(f"{name} (overlap > {self.min_overlap[name]:.2f}, #GT {' / '.join(map(str, self.num_gt[c]))}):")
            for m, metric in enumerate(self.metrics):
                r40 = " / ".join(f"{v:6.2f}" for v in self.ap_r40[m, c])
                r11 = " / ".join(f"{v:.2f}" for v in self.ap_r11[m, c])
                lines.append(f"  {metric:>4}  {r40}   [{r11}]")
        for m, metric in enumerate(self.metrics):
            lines.append(f"mAP {metric} Moderate R40: {self.ap_r40[m, :, 1].mean():.2f}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for c, name in enumerate(self.class_names):
            for m, metric in enumerate(self.metrics):
                for d, level in enumerate(DIFFICULTIES):
                    out[f"{name}_{metric}/{level.lower()}_R40"] = float(self.ap_r40[m, c, d])
                    out[f"{name}_{metric}/{level.lower()}_R11"] = float(self.ap_r11[m, c, d])
        for m, metric in enumerate(self.metrics):
            out[f"mAP_{metric}/moderate_R40"] = float(self.ap_r40[m, :, 1].mean()) if self.class_names else math.nan
        out["min_overlap"] = dict(self.min_overlap)
        out["num_gt"] = {name: self.num_gt[c].tolist() for c, name in enumerate(self.class_names)}
        return out


@dataclass(frozen=True)
class _Flat:
    """Ground truth and detections of every frame, concatenated (what step 1 reads).

    Attributes:
        gt_names, det_names: lower-case types; gt_height: 2D box heights; occluded, truncated: the
        ground truth's; det_height: detection box heights truncated to whole pixels; cover: each
        detection's largest share inside a DontCare region; gt_ends, det_ends: where frames end.
    """

    gt_names: np.ndarray
    gt_height: np.ndarray
    occluded: np.ndarray
    truncated: np.ndarray
    det_names: np.ndarray
    det_height: np.ndarray
    cover: np.ndarray
    gt_ends: np.ndarray
    det_ends: np.ndarray

    @classmethod
    def of(cls, gt: Sequence[KittiObjects], det: Sequence[KittiObjects]) -> _Flat:
        def cat(values: list[np.ndarray], width: int = 0) -> np.ndarray:
            return np.concatenate(values) if values else np.zeros((0, width) if width else 0)

        gt_box = cat([o.bbox for o in gt], 4).reshape(-1, 4)
        det_box = cat([o.bbox for o in det], 4).reshape(-1, 4)
        return cls(
            gt_names=np.array([n.lower() for o in gt for n in o.names], dtype=object),
            gt_height=gt_box[:, 3] - gt_box[:, 1],
            occluded=cat([o.occluded for o in gt]),
            truncated=cat([o.truncated for o in gt]),
            det_names=np.array([n.lower() for o in det for n in o.names], dtype=object),
            det_height=np.trunc(np.abs(det_box[:, 1] - det_box[:, 3])),
            cover=_dontcare_cover(gt, det),
            gt_ends=np.cumsum([len(o) for o in gt])[:-1],
            det_ends=np.cumsum([len(o) for o in det])[:-1],
        )

    def ignored(self, name: str, level: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Step 1 of the module docstring: per frame, (G,) ``ignored_gt`` and (D,) ``ignored_det``."""
        cls = name.lower()
        outside = (
            (self.occluded > MAX_OCCLUSION[level])
            | (self.truncated > MAX_TRUNCATION[level])
            | (self.gt_height <= MIN_HEIGHT[level])
        )
        same = self.gt_names == cls
        neighbour = self.gt_names == NEIGHBOURS.get(cls, "")
        ignored_gt = np.where(same & ~outside, 0, np.where(neighbour | same, 1, -1)).astype(np.int64)
        ignored_det = np.where(
            self.det_height < MIN_HEIGHT[level], 1, np.where(self.det_names == cls, 0, -1)
        ).astype(np.int64)
        return np.split(ignored_gt, self.gt_ends), np.split(ignored_det, self.det_ends)


def evaluate_kitti(
    gt: Sequence[KittiObjects],
    det: Sequence[KittiObjects],
    class_names: Sequence[str],
    metrics: Sequence[str] = METRICS,
    min_overlap: Mapping[str, float] | None = None,
) -> KittiAP:
    """KITTI AP of detections against ground truth, frame by frame (module docstring).

    Args:
        gt: per frame, its ``label_2`` objects (every type, DontCare included).
        det: per frame, its detections with scores; ``names`` say the class.
        class_names: classes to evaluate (matched to the names case-insensitively).
        metrics: of :data:`METRICS`.
        min_overlap: per class, the overlap a match must exceed; :data:`DEFAULT_MIN_OVERLAP` when None.

    Raises:
        ValueError: frame counts differ, a detection has no score, or a class has no minimum overlap.
    """
    if len(gt) != len(det):
        raise ValueError(f"{len(gt)} ground-truth frames but {len(det)} detection frames")
    for f, d in enumerate(det):
        if len(d) and d.score is None:
            raise ValueError(f"detection frame {f}: objects without scores")
    table = dict(DEFAULT_MIN_OVERLAP if min_overlap is None else min_overlap)
    missing = [n for n in class_names if n not in table]
    if missing:
        raise ValueError(f"no minimum overlap for {missing} (given for {sorted(table)})")
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"metrics {bad}: expected some of {METRICS}")
    scores = [np.zeros(0) if d.score is None else d.score for d in det]
    precision = np.zeros((len(metrics), len(class_names), 3, NUM_SAMPLE_POINTS))
    num_gt = np.zeros((len(class_names), 3), np.int64)
    floor = min((table[n] for n in class_names), default=0.0)
    over = {metric: overlaps(gt, det, metric, floor) for metric in metrics}
    flat = _Flat.of(gt, det)
    nowhere = [np.zeros(len(d), dtype=bool) for d in det]
    for c, name in enumerate(class_names):
        covered = np.split(flat.cover > table[name], flat.det_ends)
        for level in range(3):
            ignored_gt, ignored_det = flat.ignored(name, level)
            num_gt[c, level] = sum(int((i == 0).sum()) for i in ignored_gt)
            for m, metric in enumerate(metrics):
                precision[m, c, level] = _precision(
                    over[metric], ignored_gt, ignored_det, scores, covered if metric == "bbox" else nowhere, table[name]
                )
    return KittiAP(tuple(class_names), tuple(metrics), {n: float(table[n]) for n in class_names}, precision, num_gt)


# --- the metric suite --------------------------------------------------------------------------


def detections_to_objects(
    boxes: np.ndarray, scores: np.ndarray, names: Sequence[str], calib: Any, image_shape: tuple[int, int]
) -> KittiObjects:
    """Detections in the LiDAR frame as a results file states them: camera boxes
    (:func:`~voxsparse.data.kitti.lidar_boxes_to_camera`), their projected 2D boxes clipped to the
    image, and the observation angle ``alpha = rotation_y + atan2(y, x)`` of the LiDAR centre (OpenPCDet's).

    Args:
        boxes: (K, >=7) LiDAR boxes; scores: (K,); names: (K,) class names.
        calib: the frame's :class:`~voxsparse.data.kitti.KittiCalib`; image_shape: (height, width).
    """
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"boxes: expected shape (K, >=7), got {boxes.shape}")
    location, dimensions, rotation_y = lidar_boxes_to_camera(boxes, calib)
    k = len(boxes)
    return KittiObjects(
        names=tuple(names),
        truncated=np.zeros(k),
        occluded=np.zeros(k, np.int64),
        alpha=rotation_y + np.arctan2(boxes[:, 1], boxes[:, 0]),
        bbox=image_boxes(location, dimensions, rotation_y, calib, image_shape),
        dimensions=dimensions,
        location=location,
        rotation_y=rotation_y,
        score=np.asarray(scores, np.float64),
    )


def write_results(folder: str | Path, frame_ids: Sequence[str], objects: Sequence[KittiObjects]) -> None:
    """One results file ``<folder>/<frame id>.txt`` per frame, in the format of the benchmark's server
    and devkit (label fields and a score; an empty file for a frame without detections)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for frame_id, frame in zip(frame_ids, objects, strict=True):
        if len(frame) and frame.score is None:
            raise ValueError(f"frame {frame_id!r}: detections without scores")
        (folder / f"{frame_id}.txt").write_text(format_labels(frame), encoding="utf-8")


def kitti(predictions: Any, dataset: Mapping) -> KittiAP:
    """The metric suite of ``configs/dataset/kitti.yaml``: frame ids name ``label_2`` / ``calib`` /
    ``image_2`` files of ``<raw_root>/training``; the config's ``class_names`` and ``min_overlap``."""
    base = Path(dataset["raw_root"]) / "training"
    names = list(dataset["class_names"])
    gt, det = [], []
    for frame_id, detections in zip(predictions.frame_ids, predictions.detections):
        label = base / "label_2" / f"{frame_id}.txt"
        calib_path = base / "calib" / f"{frame_id}.txt"
        gt.append(parse_labels(label.read_text(encoding="utf-8"), str(label)))
        calib = parse_calib(calib_path.read_text(encoding="utf-8"), str(calib_path))
        labels = detections.labels.cpu().numpy()
        det.append(
            detections_to_objects(
                detections.boxes.tensor.detach().cpu().double().numpy(),
                detections.scores.detach().cpu().double().numpy(),
                [names[i] for i in labels],
                calib,
                image_size(base / "image_2" / f"{frame_id}.png"),
            )
        )
    return evaluate_kitti(gt, det, names, min_overlap=dataset.get("min_overlap"))
