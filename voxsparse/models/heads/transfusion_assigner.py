"""One-to-one matching of TransFusion's proposals to ground-truth boxes (Hungarian assignment).

Each ground-truth box is matched to exactly one proposal (when there are at least as many proposals
as boxes), minimising the sum over matched pairs of three weighted costs, as the TransFusion head of
the DSVT repository computes them (``dense_heads/target_assigner/hungarian_assigner.py``):

- classification: the focal-loss cost of calling the proposal the box's class,
  ``w * (alpha * (1 - p)^gamma * -log(p + eps) - (1 - alpha) * p^gamma * -log(1 - p + eps))`` with
  ``p`` the proposal's sigmoid score for that class;
- centre: ``w * (|dx| + |dy|)`` of the bird's-eye-view centres, each axis divided by the extent of the
  point-cloud range (an L1 distance in [0, 1] units);
- IoU: ``-w * IoU3D``. The reference's 3D IoU takes a box's ``z`` as its *bottom* (the z-extent is
  ``[z, z + dz]``), a convention of the code it was adapted from, while both its proposals and its
  ground truth carry the box centre there; :func:`bottom_z_iou_3d` reproduces that, since the
  matching (and the IoU it reports) depends on it.

The matching itself is ``scipy.optimize.linear_sum_assignment`` on the float32 cost matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment

from voxsparse.ops.boxes import bev_iou


def bev_overlap_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) area (m^2) shared by the bird's-eye-view rectangles of boxes ``a`` (N, >=7) and ``b``
    (M, >=7), exact (float64 geometry), dtype of ``a``."""
    a64, b64 = a[:, :7].double(), b[:, :7].double()
    iou = bev_iou(a64, b64)
    # IoU = I / (Sa + Sb - I)  =>  I = IoU * (Sa + Sb) / (1 + IoU).
    areas = (a64[:, 3] * a64[:, 4])[:, None] + (b64[:, 3] * b64[:, 4])[None, :]
    return (iou * areas / (1 + iou)).to(a.dtype)


def bottom_z_iou_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) 3D IoU of boxes whose ``z`` is taken as the bottom face (z-extent ``[z, z + dz]``).

    Args:
        a: (N, >=7), b: (M, >=7) boxes (x, y, z, dx, dy, dz, heading), metres / radians.

    Returns:
        (N, M) in [0, 1], dtype of ``a``; the union is clamped at 1e-8 m^3 as in the reference.
    """
    if a.shape[0] * b.shape[0] == 0:
        return a.new_zeros(a.shape[0], b.shape[0])
    top = torch.minimum((a[:, 2] + a[:, 5])[:, None], (b[:, 2] + b[:, 5])[None, :])
    bottom = torch.maximum(a[:, 2][:, None], b[:, 2][None, :])
    inter = bev_overlap_area(a, b) * (top - bottom).clamp(min=0)
    volume_a = (a[:, 3] * a[:, 4] * a[:, 5])[:, None]
    volume_b = (b[:, 3] * b[:, 4] * b[:, 5])[None, :]
    return inter / (volume_a + volume_b - inter).clamp(min=1e-8)


def hungarian_match(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and columns of the minimum-cost one-to-one matching of a (P, G) cost matrix.

    Returns:
        (rows, cols): (min(P, G),) int64 each, on the device of ``cost``, rows ascending.
    """
    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    return torch.from_numpy(rows).to(cost.device), torch.from_numpy(cols).to(cost.device)


@dataclass
class Assignment:
    """Matching of P proposals to G ground-truth boxes of one frame.

    Attributes:
        gt_index: (P,) int64 index of the matched box, -1 for background proposals.
        iou: (P,) the matched pair's 3D IoU (:func:`bottom_z_iou_3d`), 0 for background.
    """

    gt_index: torch.Tensor
    iou: torch.Tensor

    @property
    def positive(self) -> torch.Tensor:
        """(K,) int64 indices of the matched proposals, ascending."""
        return torch.nonzero(self.gt_index >= 0).squeeze(1)


@dataclass(frozen=True)
class HungarianAssigner:
    """The three weighted matching costs (see the module docstring) and the matching.

    Attributes:
        cls_weight, alpha, gamma, eps: the focal classification cost.
        reg_weight: the normalised centre L1 cost.
        iou_weight: the (negative) 3D IoU cost.
    """

    cls_weight: float = 0.15
    alpha: float = 0.25
    gamma: float = 2.0
    eps: float = 1e-12
    reg_weight: float = 0.25
    iou_weight: float = 0.25

    def classification_cost(self, logits: torch.Tensor, gt_channels: torch.Tensor) -> torch.Tensor:
        """(P, G) cost of proposals with (P, C) class ``logits`` taking classes ``gt_channels`` (G,)."""
        p = logits.sigmoid()
        neg = -(1 - p + self.eps).log() * (1 - self.alpha) * p.pow(self.gamma)
        pos = -(p + self.eps).log() * self.alpha * (1 - p).pow(self.gamma)
        return (pos[:, gt_channels] - neg[:, gt_channels]) * self.cls_weight

    def center_cost(self, boxes: torch.Tensor, gt_boxes: torch.Tensor, point_cloud_range: Sequence[float]) -> torch.Tensor:
        """(P, G) L1 distance of BEV centres in units of the range's x and y extents."""
        start = boxes.new_tensor(point_cloud_range[0:2])
        extent = boxes.new_tensor(point_cloud_range[3:5]) - start
        return torch.cdist((boxes[:, :2] - start) / extent, (gt_boxes[:, :2] - start) / extent, p=1) * self.reg_weight

    def assign(
        self,
        boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_channels: torch.Tensor,
        logits: torch.Tensor,
        point_cloud_range: Sequence[float],
    ) -> Assignment:
        """Match P proposals to G boxes.

        Args:
            boxes: (P, >=7) decoded proposals (centre z), metres.
            gt_boxes: (G, >=7) ground truth, metres.
            gt_channels: (G,) int64 heatmap channel of each box's class.
            logits: (P, C) class logits of the proposals.
            point_cloud_range: (x0, y0, z0, x1, y1, z1) metres.
        """
        num_proposals = boxes.shape[0]
        gt_index = torch.full((num_proposals,), -1, dtype=torch.int64, device=boxes.device)
        iou_matched = boxes.new_zeros(num_proposals)
        if gt_boxes.shape[0] == 0 or num_proposals == 0:
            # The reference fails here (it returns before defining its IoU); no box: all background.
            return Assignment(gt_index, iou_matched)
        iou = bottom_z_iou_3d(boxes, gt_boxes)
        cost = (
            self.classification_cost(logits, gt_channels)
            + self.center_cost(boxes, gt_boxes, point_cloud_range)
            - iou * self.iou_weight
        )
        rows, cols = hungarian_match(cost)
        gt_index[rows] = cols
        iou_matched[rows] = iou[rows, cols]
        return Assignment(gt_index, iou_matched)

