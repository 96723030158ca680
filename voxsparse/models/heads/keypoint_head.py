"""VoxelKP's keypoint head: 3D human keypoints and their visibility, predicted at sparse BEV cells
beside a center-based detection head and trained jointly with it.

Encoding (the authors' code, ``VoxelNeXtHeadKP``): a cell predicts, for each of the 14 keypoints
(``KEYPOINT_NAMES`` order), its (x, y) offset from the cell centre in the LiDAR frame, in metres, its
absolute height z in metres, and a visibility logit. LiDAR frame rather than the box's heading frame:
the keypoints then do not inherit the error of the predicted heading (a pedestrian's heading is
the least reliable part of its box).

Targets: exactly the detection head's regression positives (the occupied cell nearest to each box
centre and up to ``regression_positives - 1`` more inside the box, see
:mod:`voxsparse.models.heads.center_head`), restricted to boxes of a keypoint class with at least one
visible keypoint (a human without any is unlabelled, as Waymo's GTi).

Losses: L1 over the visible keypoints (summed over x, y, z, divided by the number of visible
keypoints) and binary cross-entropy on the visibility of all 14 keypoints of each positive (divided by
positives x 14), added to the detection losses with ``keypoint_weight`` and ``visibility_weight``. The
authors' code fits the 0/1 visibility with an L1 loss; BCE is the proper loss for a binary label.

Decoding: boxes come from the detection head; each detection reads its keypoints at the occupied cell
nearest to its predicted centre (the same rule that picks a box's first positive in training).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.models.heads.center_head import CenterHeadBase, CenterPredictions, CenterTargets
from voxsparse.models.layers import sparse_conv_block
from voxsparse.models.voxelkp.structures import KeypointDetections3D
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import Annotations3D, SparseBEV

NUM_KEYPOINTS = len(KEYPOINT_NAMES)


@dataclass
class KeypointPredictions:
    """Raw outputs at the M cells of a batch.

    Attributes:
        detection: the detection head's :class:`CenterPredictions` at those cells.
        keypoints: (M, 14, 3): (x, y) keypoint minus cell centre and absolute z, metres.
        visibility: (M, 14) visibility logits.
    """

    detection: CenterPredictions
    keypoints: torch.Tensor
    visibility: torch.Tensor


@dataclass
class KeypointTargets:
    """Keypoint targets at P positive cells.

    Attributes:
        positive: (P,) int64 cell rows.
        keypoints: (P, 14, 3) targets in the :class:`KeypointPredictions` encoding.
        visibility: (P, 14) bool.
    """

    positive: torch.Tensor
    keypoints: torch.Tensor
    visibility: torch.Tensor


@dataclass
class KeypointHeadLosses:
    """Loss terms of one batch. ``total`` is back-propagated; the others are detached.
    ``heatmap``, ``regression``, ``iou`` and ``num_positives`` are the detection head's
    (:class:`~voxsparse.models.heads.center_head.HeadLosses`)."""

    total: torch.Tensor
    heatmap: torch.Tensor
    regression: torch.Tensor
    iou: torch.Tensor
    keypoint: torch.Tensor
    visibility: torch.Tensor
    num_positives: int
    num_keypoint_positives: int


class KeypointHead(nn.Module):
    """A detection head plus a sparse keypoint branch on the same BEV features.

    Args:
        in_channels: channels of the backbone's sparse BEV.
        num_classes: detection classes.
        keypoint_labels: labels (class indices) whose boxes carry keypoints, e.g. (1,) for Pedestrian.
        detection: factory ``(in_channels, num_classes) -> CenterHeadBase`` (Hydra partial), e.g. a
            :class:`~voxsparse.models.heads.voxelnext_head.VoxelNeXtHead`.
        head_channels: width of the keypoint branch.
        num_convs: submanifold 2D convs of the keypoint branch before its per-cell linear output.
        kernel_size: of those convs.
        keypoint_weight: weight of the keypoint L1 loss.
        visibility_weight: weight of the visibility BCE loss.

    Input: ``SparseBEV`` (M cells). Output: :class:`KeypointPredictions` at those cells.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        keypoint_labels: Sequence[int],
        detection: Callable[..., CenterHeadBase],
        head_channels: int = 64,
        num_convs: int = 2,
        kernel_size: int = 3,
        keypoint_weight: float = 1.0,
        visibility_weight: float = 1.0,
    ) -> None:
        super().__init__()
        labels = tuple(int(label) for label in keypoint_labels)
        if not labels or any(not 0 <= label < num_classes for label in labels):
            raise ValueError(f"keypoint_labels: expected class indices in [0, {num_classes}), got {labels}")
        if num_convs < 1:
            raise ValueError(f"num_convs: expected >= 1, got {num_convs}")
        self.detection = detection(in_channels=in_channels, num_classes=num_classes)
        self.register_buffer("keypoint_labels", torch.tensor(labels, dtype=torch.int64), persistent=False)
        key = "keypoint_subm"
        self.convs = spnn.SparseSequential(
            sparse_conv_block(in_channels, head_channels, kernel_size, indice_key=key, dims=2),
            *[sparse_conv_block(head_channels, head_channels, kernel_size, indice_key=key, dims=2)
              for _ in range(num_convs - 1)],
        )
        self.out = nn.Linear(head_channels, NUM_KEYPOINTS * 4)
        self.keypoint_weight = keypoint_weight
        self.visibility_weight = visibility_weight

    def forward(self, bev: SparseBEV) -> KeypointPredictions:
        detection = self.detection(bev)
        if len(bev) == 0:  # spconv cannot run on no cells; the linear layer gives (0, 56) outputs
            out = self.out(bev.features.new_zeros(0, self.out.in_features))
        else:
            x = SparseConvTensor(bev.features, bev.coords.int(), list(bev.spatial_shape), bev.batch_size)
            out = self.out(self.convs(x).features)
        keypoints, visibility = out.split([NUM_KEYPOINTS * 3, NUM_KEYPOINTS], dim=1)
        return KeypointPredictions(detection, keypoints.reshape(-1, NUM_KEYPOINTS, 3), visibility)

    # --- targets ---------------------------------------------------------------------------------
    @torch.no_grad()
    def assign_targets(self, pred: KeypointPredictions, annotations: list[Annotations3D]) -> KeypointTargets:
        """Keypoint targets at the detection head's regression positives of labelled humans."""
        return self._keypoint_targets(pred, self.detection.assign_targets(pred.detection, annotations), annotations)

    @torch.no_grad()
    def _keypoint_targets(self, pred: KeypointPredictions, targets: CenterTargets,
                          annotations: list[Annotations3D]) -> KeypointTargets:
        """:meth:`assign_targets` from the detection head's ``targets`` for ``pred.detection``."""
        det = pred.detection
        device = det.cell_xy.device
        frame = det.coords[targets.positive, 0].long()
        positives, keypoints, visibility = [], [], []
        for b, ann in enumerate(annotations):
            sel = torch.nonzero(frame == b).squeeze(1)
            if ann.keypoints is None or ann.keypoint_visibility is None or len(sel) == 0:
                continue
            boxes = ann.boxes.tensor[:, :7].to(device=device, dtype=torch.float32)
            # The detection targets name the box each positive regresses by value (an exact copy of
            # its first 7 columns): the nearest annotation box is that box.
            box = (targets.gt_boxes[sel][:, None, :] - boxes[None]).abs().sum(-1).argmin(1)
            vis = ann.keypoint_visibility.to(device)[box]
            human = torch.isin(ann.labels.to(device)[box], self.keypoint_labels) & vis.any(1)
            cells = targets.positive[sel][human]
            kp = ann.keypoints.to(device=device, dtype=torch.float32)[box[human]].clone()
            kp[..., :2] -= det.cell_xy[cells].float()[:, None, :]
            positives.append(cells)
            keypoints.append(kp)
            visibility.append(vis[human])
        if not positives:
            return KeypointTargets(
                torch.zeros(0, dtype=torch.int64, device=device),
                torch.zeros(0, NUM_KEYPOINTS, 3, device=device),
                torch.zeros(0, NUM_KEYPOINTS, dtype=torch.bool, device=device),
            )
        return KeypointTargets(torch.cat(positives), torch.cat(keypoints), torch.cat(visibility))

    # --- losses ----------------------------------------------------------------------------------
    def loss(
        self,
        pred: KeypointPredictions,
        annotations: list[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> KeypointHeadLosses:
        """Detection losses + ``keypoint_weight`` x keypoint L1 + ``visibility_weight`` x visibility BCE.

        Args:
            reduce_counts: as in :meth:`CenterHeadBase.loss`; here it also maps the (visible
                keypoints, keypoint positives) counts that divide the keypoint losses.
        """
        # The detection targets are assigned once and serve both losses.
        det_targets = self.detection.assign_targets(pred.detection, annotations)
        det = self.detection.loss_from_targets(pred.detection, det_targets, reduce_counts)
        targets = self._keypoint_targets(pred, det_targets, annotations)
        # Indexing keeps every output in the graph even without positives (DDP needs each parameter).
        keypoints = pred.keypoints[targets.positive].float()
        logits = pred.visibility[targets.positive].float()
        visible = targets.visibility
        counts = torch.stack(
            [visible.sum(), torch.as_tensor(len(targets.positive), device=visible.device)]
        ).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        counts = counts.clamp(min=1)
        l1 = (keypoints - targets.keypoints).abs().sum(-1)  # (P, 14), metres
        keypoint_loss = (l1 * visible).sum() / counts[0]
        visibility_loss = F.binary_cross_entropy_with_logits(logits, visible.float(), reduction="sum") / (
            counts[1] * NUM_KEYPOINTS
        )
        total = det.total + self.keypoint_weight * keypoint_loss + self.visibility_weight * visibility_loss
        return KeypointHeadLosses(
            total, det.heatmap, det.regression, det.iou, keypoint_loss.detach(), visibility_loss.detach(),
            det.num_positives, len(targets.positive),
        )

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: KeypointPredictions) -> list[KeypointDetections3D]:
        """The detection head's detections, each with the keypoints of the occupied cell nearest to
        its centre (LiDAR frame, metres) and their visibility probabilities."""
        det = pred.detection
        cell_xy = det.cell_xy.float()
        batch = det.coords[:, 0].long()
        results = []
        for b, frame in enumerate(self.detection.decode(det)):
            cells = torch.nonzero(batch == b).squeeze(1)
            rows = cells[:0]
            if len(frame):  # a frame with detections has cells: every detection comes from one
                d2 = ((frame.boxes.tensor[:, None, :2].float() - cell_xy[cells][None]) ** 2).sum(-1)
                rows = cells[d2.argmin(1)]
            keypoints = pred.keypoints[rows].float().clone()
            keypoints[..., :2] += cell_xy[rows][:, None, :]
            results.append(
                KeypointDetections3D(
                    boxes=frame.boxes, scores=frame.scores, labels=frame.labels, track_ids=frame.track_ids, query_xy=frame.query_xy,
                    keypoints=keypoints, keypoint_scores=pred.visibility[rows].float().sigmoid(),
                )
            )
        return results
