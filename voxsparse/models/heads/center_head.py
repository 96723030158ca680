"""What every center-based head shares: per-cell predictions, target assignment, losses, decoding.

A center-based head scores BEV *cells* per class and regresses a box at each cell. The sparse
VoxelNeXt head predicts at the occupied cells only; the CenterPoint head predicts at every cell of a
dense map. Both produce a :class:`CenterPredictions` over "their" cells, so one target assignment,
one loss and one decoder serve both:

- the heatmap positive of a ground-truth box is the cell nearest to its centre (for a dense map,
  the cell that contains the centre; for the sparse head, the nearest occupied cell, as in
  VoxelNeXt); the heatmap target of a cell is a Gaussian of its distance to the box centre, with
  CenterNet's size-dependent radius, and exactly 1 at that positive;
- box regression is supervised at that cell and, optionally, at up to ``regression_positives - 1``
  more cells nearest to the centre whose centres lie inside the box (more signal per frame, which
  matters when a CPU affords few steps); a cell claimed by two boxes regresses the nearer one;
- an optional IoU branch learns the 3D IoU of each regressed box with its ground truth, and at
  decoding rectifies the score to ``score**(1 - a) * iou**a`` (a per class), so boxes that are
  well placed rank first — what AP at IoU 0.7 rewards;
- decoding keeps cells whose score is the maximum of their 3x3 occupied neighbourhood (a sparse
  max-pool: no NMS) and takes the top K.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.ops.boxes import iou_3d_aligned
from voxsparse.ops.sparse_utils import sparse_local_max
from voxsparse.structures import Annotations3D, Boxes3D, Detections3D

HEATMAP_PRIOR = 0.1  # initial foreground probability, keeps early focal loss stable


@dataclass
class CenterPredictions:
    """Raw head outputs at M cells of a batch.

    Attributes:
        coords: (M, 3) int (batch, y, x) cell indices.
        cell_xy: (M, 2) cell centres (x, y), metres.
        heatmap: (M, num_classes) logits.
        offset: (M, 2) box centre minus cell centre, in cells.
        z: (M, 1) box centre height, metres.
        log_dims: (M, 3) log of (dx, dy, dz) in metres.
        rot: (M, 2) (sin, cos) of the heading.
        velocity: (M, 2) (vx, vy) m/s, or None when the head has no velocity branch.
        iou: (M, 1) predicted 3D IoU mapped to [-1, 1], or None without an IoU branch.
        spatial_shape: (H, W) cells; cell_size: (x, y) metres per cell; batch_size: frames.
    """

    coords: torch.Tensor
    cell_xy: torch.Tensor
    heatmap: torch.Tensor
    offset: torch.Tensor
    z: torch.Tensor
    log_dims: torch.Tensor
    rot: torch.Tensor
    velocity: torch.Tensor | None
    iou: torch.Tensor | None
    spatial_shape: tuple[int, int]
    cell_size: tuple[float, float]
    batch_size: int

    def regression(self) -> torch.Tensor:
        """(M, 8 or 10) regression outputs in target order: offset, z, log dims, sin, cos[, v]."""
        parts = [self.offset, self.z, self.log_dims, self.rot]
        if self.velocity is not None:
            parts.append(self.velocity)
        return torch.cat(parts, dim=1)


@dataclass
class CenterTargets:
    """Training targets for :class:`CenterPredictions` (P positives among M cells).

    Attributes:
        heatmap: (M, num_classes) Gaussian targets in [0, 1], 1 at each box's nearest cell.
        positive: (P,) int64 cell index of each regression positive.
        regression: (P, 8 or 10) targets in :meth:`CenterPredictions.regression` order.
        gt_boxes: (P, 7) the ground-truth box each positive regresses.
    """

    heatmap: torch.Tensor
    positive: torch.Tensor
    regression: torch.Tensor
    gt_boxes: torch.Tensor


@dataclass
class HeadLosses:
    """Loss terms of one batch; ``total`` is what is back-propagated (the others are detached;
    ``iou`` is 0 without an IoU branch)."""

    total: torch.Tensor
    heatmap: torch.Tensor
    regression: torch.Tensor
    iou: torch.Tensor
    num_positives: int


def gaussian_radius(length: torch.Tensor, width: torch.Tensor, min_overlap: float = 0.1) -> torch.Tensor:
    """CenterNet's radius (in the units of the inputs) within which a shifted box keeps
    ``min_overlap`` IoU with the original: the smallest of the three corner cases' roots."""
    a1, b1 = 1.0, length + width
    c1 = width * length * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + torch.sqrt(b1**2 - 4 * a1 * c1)) / 2
    a2, b2 = 4.0, 2 * (length + width)
    c2 = (1 - min_overlap) * width * length
    r2 = (b2 + torch.sqrt(b2**2 - 4 * a2 * c2)) / 2
    a3, b3 = 4 * min_overlap, -2 * min_overlap * (length + width)
    c3 = (min_overlap - 1) * width * length
    r3 = (b3 + torch.sqrt(b3**2 - 4 * a3 * c3)) / 2
    return torch.minimum(torch.minimum(r1, r2), r3)


def focal_heatmap_loss(
    logits: torch.Tensor, target: torch.Tensor, positive_mask: torch.Tensor, num_positives: torch.Tensor | None = None
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of positives.

    Args:
        logits: (M, C); target: (M, C) in [0, 1]; positive_mask: (M, C) bool.
        num_positives: () the divisor (at least 1); None: the positives of ``positive_mask``.
    """
    log_p = F.logsigmoid(logits)
    log_not_p = F.logsigmoid(-logits)
    p = log_p.exp()
    pos = -(((1 - p) ** 2) * log_p)[positive_mask].sum()
    neg_weight = (1 - target) ** 4
    neg = -(neg_weight * p**2 * log_not_p)[~positive_mask].sum()
    count = positive_mask.sum() if num_positives is None else num_positives
    return (pos + neg) / count.clamp(min=1)


class CenterHeadBase(nn.Module):
    """Target assignment, losses and decoding for center-based heads.

    Args:
        num_classes: heatmap channels.
        with_velocity: whether boxes carry (vx, vy).
        with_iou: whether the head has the IoU branch that rectifies scores.
        code_weights: L1 weight of each regression target (8 or 10 values).
        regression_weight: weight of the regression loss against the heatmap loss.
        regression_positives: cells (nearest first, inside the box) that regress each box.
        iou_weight: weight of the IoU-branch loss (used when the head has an IoU branch).
        iou_rectifier: per-class exponent ``a`` of the score rectification (one value per class).
        min_radius: smallest Gaussian radius, cells.
        gaussian_overlap: CenterNet ``min_overlap``.
        max_detections: top-K per frame at decoding.
        score_threshold: minimum score kept at decoding.
    """

    def __init__(
        self,
        num_classes: int,
        with_velocity: bool = False,
        with_iou: bool = False,
        code_weights: tuple[float, ...] | None = None,
        regression_weight: float = 0.25,
        regression_positives: int = 1,
        iou_weight: float = 1.0,
        iou_rectifier: tuple[float, ...] | None = None,
        min_radius: int = 2,
        gaussian_overlap: float = 0.1,
        max_detections: int = 500,
        score_threshold: float = 0.1,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.with_velocity = with_velocity
        self.with_iou = with_iou
        num_codes = 10 if with_velocity else 8
        weights = code_weights if code_weights is not None else (1.0,) * 8 + (0.2,) * (num_codes - 8)
        if len(weights) != num_codes:
            raise ValueError(f"code_weights: expected {num_codes} values, got {len(weights)}")
        self.register_buffer("code_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.regression_weight = regression_weight
        if regression_positives < 1:
            raise ValueError(f"regression_positives: expected >= 1, got {regression_positives}")
        self.regression_positives = regression_positives
        self.iou_weight = iou_weight
        rectifier = iou_rectifier if iou_rectifier is not None else (0.5,) * num_classes
        if len(rectifier) != num_classes:
            raise ValueError(f"iou_rectifier: expected {num_classes} values, got {len(rectifier)}")
        self.register_buffer("iou_rectifier", torch.tensor(rectifier, dtype=torch.float32), persistent=False)
        self.min_radius = min_radius
        self.gaussian_overlap = gaussian_overlap
        self.max_detections = max_detections
        self.score_threshold = score_threshold

    def output_channels(self) -> dict[str, int]:
        """Channels of each per-cell output, named as the :class:`CenterPredictions` fields."""
        outputs = {"heatmap": self.num_classes, "offset": 2, "z": 1, "log_dims": 3, "rot": 2}
        if self.with_velocity:
            outputs["velocity"] = 2
        if self.with_iou:
            outputs["iou"] = 1
        return outputs

    # --- targets ---------------------------------------------------------------------------------
    @torch.no_grad()
    def assign_targets(self, pred: CenterPredictions, annotations: list[Annotations3D]) -> CenterTargets:
        """Gaussian heatmaps and regression targets at the cells of ``pred``."""
        device = pred.heatmap.device
        cell = torch.tensor(pred.cell_size, device=device)
        heatmap = torch.zeros_like(pred.heatmap, dtype=torch.float32)
        positives, regressions, gt_rows = [], [], []
        batch = pred.coords[:, 0].long()
        for b, ann in enumerate(annotations):
            cells = torch.nonzero(batch == b).squeeze(1)
            if len(ann) == 0 or len(cells) == 0:
                continue
            boxes = ann.boxes.tensor.to(device=device, dtype=torch.float32)
            labels = ann.labels.to(device)
            xy = pred.cell_xy[cells].float()  # (Mb, 2)
            delta = (xy[:, None, :] - boxes[None, :, :2]) / cell  # (Mb, G, 2) in cells
            dist2 = (delta**2).sum(-1)
            radius = gaussian_radius(boxes[:, 3] / cell[0], boxes[:, 4] / cell[1], self.gaussian_overlap)
            radius = radius.floor().clamp(min=self.min_radius)
            sigma = (2 * radius + 1) / 6
            gauss = torch.exp(-dist2 / (2 * sigma[None] ** 2))
            gauss = gauss * (delta.abs() <= radius[None, :, None]).all(-1)
            # Per class, a cell takes the strongest Gaussian among that class's boxes.
            per_class = torch.zeros(len(cells), self.num_classes, device=device)
            per_class.scatter_reduce_(1, labels[None].expand(len(cells), -1), gauss, reduce="amax")
            nearest = dist2.argmin(dim=0)  # (G,)
            per_class[nearest, labels] = 1.0
            heatmap[cells] = per_class
            cell_idx, box_idx = self._regression_pairs(dist2, nearest, xy, boxes)
            positive = cells[cell_idx]
            positives.append(positive)
            gt_rows.append(boxes[box_idx, :7])
            regressions.append(self._encode(boxes[box_idx], pred.cell_xy[positive].float(), cell))
        if positives:
            positive = torch.cat(positives)
            regression = torch.cat(regressions)
            gt_boxes = torch.cat(gt_rows)
        else:
            positive = torch.zeros(0, dtype=torch.int64, device=device)
            regression = torch.zeros(0, 10 if self.with_velocity else 8, device=device)
            gt_boxes = torch.zeros(0, 7, device=device)
        return CenterTargets(heatmap, positive, regression, gt_boxes)

    def _regression_pairs(
        self, dist2: torch.Tensor, nearest: torch.Tensor, xy: torch.Tensor, boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cell, box) index pairs that carry regression targets in one frame.

        Args:
            dist2: (Mb, G) squared cell-to-centre distances; nearest: (G,) each box's nearest cell;
            xy: (Mb, 2) cell centres; boxes: (G, >=7).
        """
        g = torch.arange(boxes.shape[0], device=boxes.device)
        k = min(self.regression_positives, dist2.shape[0])
        if k == 1:
            return nearest, g
        cand = dist2.topk(k, dim=0, largest=False).indices  # (k, G), nearest first
        local = xy[cand] - boxes[None, :, :2]
        cos, sin = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
        along = local[..., 0] * cos + local[..., 1] * sin
        across = -local[..., 0] * sin + local[..., 1] * cos
        inside = (along.abs() <= boxes[:, 3] / 2) & (across.abs() <= boxes[:, 4] / 2)
        inside[0] = True  # the nearest cell always regresses its box
        cell_idx, box_idx = cand[inside], g.expand_as(cand)[inside]
        # A cell inside two boxes regresses the one whose centre is nearer.
        d = dist2[cell_idx, box_idx]
        best = torch.full((dist2.shape[0],), float("inf"), device=d.device).scatter_reduce(0, cell_idx, d, "amin")
        keep = d <= best[cell_idx]
        return cell_idx[keep], box_idx[keep]

    def _encode(self, boxes: torch.Tensor, cell_xy: torch.Tensor, cell: torch.Tensor) -> torch.Tensor:
        parts = [
            (boxes[:, :2] - cell_xy) / cell,
            boxes[:, 2:3],
            boxes[:, 3:6].clamp(min=1e-3).log(),
            torch.sin(boxes[:, 6:7]),
            torch.cos(boxes[:, 6:7]),
        ]
        if self.with_velocity:
            velocity = boxes[:, 7:9] if boxes.shape[1] >= 9 else boxes.new_zeros(len(boxes), 2)
            parts.append(velocity)
        return torch.cat(parts, dim=1)

    # --- losses ----------------------------------------------------------------------------------
    def loss(
        self,
        pred: CenterPredictions,
        annotations: list[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> HeadLosses:
        """Focal heatmap loss + weighted L1 regression at the positives, each divided by its count
        of positives.

        Args:
            reduce_counts: maps this process's (heatmap positives, regression positives), a (2,)
                float tensor, to the divisors. Under DDP, which averages gradients over ranks, pass
                the mean over ranks (``voxsparse.engine.distributed.mean_over_ranks``) so the
                gradient equals that of one process with the global batch. None: the local counts.
        """
        return self.loss_from_targets(pred, self.assign_targets(pred, annotations), reduce_counts)

    def loss_from_targets(
        self,
        pred: CenterPredictions,
        targets: CenterTargets,
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> HeadLosses:
        """:meth:`loss` from the targets :meth:`assign_targets` gave for ``pred``, for heads that use
        them for more than the detection losses (the keypoint head)."""
        logits = pred.heatmap.float()
        positive_mask = targets.heatmap == 1.0
        num_pos = len(targets.positive)
        counts = torch.stack([positive_mask.sum(), torch.as_tensor(num_pos, device=logits.device)]).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        counts = counts.clamp(min=1)
        hm_loss = focal_heatmap_loss(logits, targets.heatmap, positive_mask, counts[0])
        # Without positives the sums below are 0 but still reach every output, so DDP sees each
        # parameter take part in every step.
        reg = pred.regression()[targets.positive].float()
        l1 = (reg - targets.regression).abs() * self.code_weights
        reg_loss = l1.sum() / counts[1]
        iou_loss = logits.sum() * 0.0
        if pred.iou is not None:
            cell = logits.new_tensor(pred.cell_size)
            with torch.no_grad():
                boxes = self._decode_boxes(pred, cell, targets.positive)
                iou = iou_3d_aligned(boxes[:, :7], targets.gt_boxes).clamp(0, 1)
            iou_loss = (pred.iou[targets.positive, 0].float() - (2 * iou - 1)).abs().sum() / counts[1]
        total = hm_loss + self.regression_weight * reg_loss + self.iou_weight * iou_loss
        return HeadLosses(total, hm_loss.detach(), reg_loss.detach(), iou_loss.detach(), num_pos)

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: CenterPredictions) -> list[Detections3D]:
        """Boxes at local heatmap maxima, top ``max_detections`` per frame above ``score_threshold``."""
        scores = pred.heatmap.float().sigmoid()
        shape = (pred.batch_size, *pred.spatial_shape)
        is_peak = scores >= sparse_local_max(pred.coords, scores, shape, kernel_size=3)
        if pred.iou is not None:
            iou = ((pred.iou.float() + 1) / 2).clamp(0, 1)  # (M, 1)
            scores = scores ** (1 - self.iou_rectifier) * iou**self.iou_rectifier
        scores = scores * is_peak
        cell = scores.new_tensor(pred.cell_size)
        boxes = self._decode_boxes(pred, cell)
        batch = pred.coords[:, 0].long()
        results = []
        for b in range(pred.batch_size):
            idx = torch.nonzero(batch == b).squeeze(1)
            frame_scores = scores[idx].reshape(-1)  # (Mb * C,)
            k = min(self.max_detections, frame_scores.numel())
            top_scores, top = frame_scores.topk(k)
            keep = top_scores > self.score_threshold
            top_scores, top = top_scores[keep], top[keep]
            rows = idx[torch.div(top, self.num_classes, rounding_mode="floor")]
            # pred.cell_xy[rows] is the query voxel of each box: trackers associate by it too.
            results.append(
                Detections3D(
                    Boxes3D(boxes[rows]),
                    top_scores,
                    (top % self.num_classes).long(),
                    query_xy=pred.cell_xy[rows].float(),
                )
            )
        return results

    def _decode_boxes(self, pred: CenterPredictions, cell: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(M, 7 or 9) boxes at every cell, or at ``rows`` only."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return (t if rows is None else t[rows]).float()

        xy = take(pred.cell_xy) + take(pred.offset) * cell
        dims = take(pred.log_dims).clamp(max=5).exp()
        rot = take(pred.rot)
        heading = torch.atan2(rot[:, 0], rot[:, 1])
        parts = [xy, take(pred.z), dims, heading[:, None]]
        if pred.velocity is not None:
            parts.append(take(pred.velocity))
        return torch.cat(parts, dim=1)


def init_heatmap_bias(layer: nn.Module) -> None:
    """Bias the heatmap output so every class starts at :data:`HEATMAP_PRIOR` probability."""
    bias = getattr(layer, "bias", None)
    if bias is None:
        raise ValueError("heatmap output layer needs a bias")
    nn.init.constant_(bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
