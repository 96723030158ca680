"""OpenPCDet's dense ``CenterHead`` (``dense_heads/center_head.py``, commit 8caccce), exactly.

The head of CenterPoint (``cbgs_voxel0075_res3d_centerpoint.yaml``) and of DSVT's Waymo model
(``dsvt_voxel.yaml``), on a dense BEV map (:class:`~voxsparse.structures.DenseBEV`, a neck's output):

- a shared 3x3 conv + BatchNorm + ReLU, then per *class group* a separate head: per output
  (``center``, ``center_z``, ``dim``, ``rot``, ``vel``, ``iou``, and the group's heatmap ``hm``)
  ``num_conv - 1`` 3x3 conv + BatchNorm + ReLU and a 3x3 output conv with a bias;
- targets per group (``assign_targets``): a box's centre in map cells, ``(xy - range_min) /
  voxel_size / stride``, clamped to ``[0, size - 0.5]``; its cell ``center_int`` is the truncation
  (cells are indexed from their lower corner); a Gaussian of radius ``max(int(CenterNet radius),
  min_radius)`` and sigma ``(2r + 1) / 6`` around that cell, max-combined per class; regression
  targets at the cell: the offset ``centre - center_int``, z, log(dx, dy, dz), cos, sin, (vx, vy),
  for at most ``num_max_objs`` boxes per frame and group, in annotation order;
- losses: CenterNet's focal loss on the heatmap clamped to ``[1e-4, 1 - 1e-4]`` (divided by the
  group's positives, or not at all without any), L1 on the regression at the target cells per
  code (divided by the group's targets, at least 1) weighted by ``code_weights`` and
  ``loc_weight``; with an ``iou`` output, L1 of it against ``2 * IoU3D - 1`` of the decoded box with
  its ground truth; with ``iou_reg_loss``, ``1 - DIoU`` (axis-aligned) x ``loc_weight``;
- decoding: per group, top ``max_obj_per_sample`` cells of the sigmoid heatmap (``torch.topk``
  per class, then over classes), boxes ``((cell + offset) * stride * voxel_size + range_min,
  z, exp(dim), atan2(sin, cos)[, vel])``, kept inside ``post_center_limit_range`` and above
  ``score_threshold``; the optional IoU rectification ``score ** (1 - a) * iou ** a`` (a per class);
  rotated NMS (:mod:`voxsparse.ops.boxes`), class-agnostic within the group (``nms_gpu``) or per
  class (``class_specific_nms``).

What differs from the reference, on purpose: labels are 0-based in the model's class order
(OpenPCDet's are 1-based in its config's); a frame's detections come sorted by score (the reference
concatenates its groups' NMS outputs); the NMS and the IoU target use the exact rotated IoU of
:mod:`voxsparse.ops.boxes` (the reference's compiled kernel counts corners up to 1 cm outside a box,
in float32); ``reduce_counts`` averages the loss normalisers over DDP ranks (the reference divides by
each rank's own counts; one process is the same).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.models.heads.center_head import gaussian_radius
from voxsparse.models.keys import KeyPair
from voxsparse.ops.boxes import class_agnostic_nms, class_specific_nms, iou_3d_aligned
from voxsparse.structures import Annotations3D, Boxes3D, DenseBEV, Detections3D, SparseBEV, VoxelGrid

#: CenterPoint's nuScenes outputs: name -> (channels, convs), in the order the regression code takes.
DEFAULT_SEPARATE_HEADS = {
    "center": {"out_channels": 2, "num_conv": 2},
    "center_z": {"out_channels": 1, "num_conv": 2},
    "dim": {"out_channels": 3, "num_conv": 2},
    "rot": {"out_channels": 2, "num_conv": 2},
    "vel": {"out_channels": 2, "num_conv": 2},
}
HEATMAP_INIT_BIAS = -2.19
#: Heatmap probabilities are clamped to this distance from 0 and 1 in the focal loss.
HEATMAP_CLAMP = 1e-4


@dataclass
class DenseCenterPredictions:
    """Raw outputs of :class:`ReferenceCenterHead` over a dense map.

    Attributes:
        groups: per class group, output name -> (B, C, H, W) map: ``hm`` heatmap logits (one channel
            per class of the group, in the group's order), ``center`` offset in cells, ``center_z``
            metres, ``dim`` log metres, ``rot`` (cos, sin), ``vel`` m/s, ``iou`` in [-1, 1].
        stride: map cell size in voxels of ``grid``.
        grid: the voxel grid.
    """

    groups: list[dict[str, torch.Tensor]]
    stride: int
    grid: VoxelGrid

    @property
    def batch_size(self) -> int:
        return self.groups[0]["hm"].shape[0]

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """(H, W) cells."""
        return tuple(self.groups[0]["hm"].shape[2:])  # type: ignore[return-value]


@dataclass
class CenterGroupTargets:
    """Targets of one class group for a batch (``num_max_objs`` slots per frame).

    Attributes:
        heatmap: (B, C_group, H, W) Gaussian targets, 1 at each box's cell.
        boxes: (B, num_max_objs, D) regression targets in ``head_order``: offset (2), z, log dims (3),
            cos, sin[, vx, vy].
        inds: (B, num_max_objs) int64 flat cell index ``y * W + x`` of each slot.
        mask: (B, num_max_objs) int64, 1 where a slot holds a box.
        gt_boxes: (B, num_max_objs, 7) the ground-truth box of each slot.
    """

    heatmap: torch.Tensor
    boxes: torch.Tensor
    inds: torch.Tensor
    mask: torch.Tensor
    gt_boxes: torch.Tensor


@dataclass
class ReferenceCenterLosses:
    """Loss terms of one batch, summed over class groups; ``total`` is back-propagated (the others
    are detached). ``regression`` includes ``loc_weight``; ``iou_regression`` too."""

    total: torch.Tensor
    heatmap: torch.Tensor
    regression: torch.Tensor
    iou: torch.Tensor
    iou_regression: torch.Tensor


def _conv_bn_relu(in_channels: int, out_channels: int, bias: bool, norm: Callable[[int], nn.Module]) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias), norm(out_channels), nn.ReLU())


def _gather(maps: torch.Tensor, inds: torch.Tensor) -> torch.Tensor:
    """(B, K, C) values of (B, C, H, W) ``maps`` at flat cell indices (B, K)."""
    flat = maps.flatten(2).transpose(1, 2)
    return flat.gather(1, inds[..., None].expand(-1, -1, flat.shape[2]))


def focal_loss_centernet(prob: torch.Tensor, target: torch.Tensor, num_pos: torch.Tensor) -> torch.Tensor:
    """CornerNet's focal loss on probabilities (already clamped away from 0 and 1).

    Args:
        prob, target: (B, C, H, W); num_pos: () the divisor, the count of cells whose target is 1
            (no division where it is 0).
    """
    pos = target.eq(1).float()
    neg = target.lt(1).float()
    pos_loss = (torch.log(prob) * (1 - prob) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - prob) * prob**2 * (1 - target) ** 4 * neg).sum()
    return -(pos_loss + neg_loss) / torch.where(num_pos > 0, num_pos, torch.ones_like(num_pos))


def diou_3d_axis_aligned(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Distance-IoU of box pairs taken as axis-aligned (headings ignored), as OpenPCDet's
    ``bbox3d_overlaps_diou``: 3D IoU of the aligned boxes minus squared centre distance over the
    squared diagonal of the enclosing box, clamped to [-1, 1].

    Args:
        pred, gt: (N, >=7) boxes. Returns: (N,) DIoU, differentiable in ``pred``.
    """
    def extent(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return b[:, 0:2] - 0.5 * b[:, 3:5], b[:, 0:2] + 0.5 * b[:, 3:5]

    (p_lo, p_hi), (g_lo, g_hi) = extent(pred), extent(gt)
    p_top, p_bottom = pred[:, 2] + 0.5 * pred[:, 5], pred[:, 2] - 0.5 * pred[:, 5]
    g_top, g_bottom = gt[:, 2] + 0.5 * gt[:, 5], gt[:, 2] - 0.5 * gt[:, 5]
    inter = (torch.minimum(p_hi, g_hi) - torch.maximum(p_lo, g_lo)).clamp(min=0)
    inter_h = (torch.minimum(p_top, g_top) - torch.maximum(p_bottom, g_bottom)).clamp(min=0)
    volume_inter = inter[:, 0] * inter[:, 1] * inter_h
    volume_union = gt[:, 3] * gt[:, 4] * gt[:, 5] + pred[:, 3] * pred[:, 4] * pred[:, 5] - volume_inter
    centre_dist = ((gt[:, 0:3] - pred[:, 0:3]) ** 2).sum(-1)
    outer = (torch.maximum(p_hi, g_hi) - torch.minimum(p_lo, g_lo)).clamp(min=0)
    outer_h = (torch.maximum(g_top, p_top) - torch.minimum(g_bottom, p_bottom)).clamp(min=0)
    outer_diag = outer[:, 0] ** 2 + outer[:, 1] ** 2 + outer_h**2
    return (volume_inter / volume_union - centre_dist / outer_diag).clamp(-1.0, 1.0)


class ReferenceCenterHead(nn.Module):
    """OpenPCDet's ``CenterHead``; see the module docstring for what it computes.

    Module names are the reference's (``shared_conv``, ``heads_list.<group>.<output>``), so its
    state-dict names are the reference's own (relative to ``dense_head.``).

    Args:
        in_channels: channels of the input map.
        num_classes: the model's classes (must equal ``len(class_names)``).
        class_names: the model's class names, in label order.
        class_names_each_head: the class groups (``CLASS_NAMES_EACH_HEAD``); each group's heatmap
            channels follow its order.
        shared_conv_channels: ``SHARED_CONV_CHANNEL``.
        use_bias_before_norm: ``USE_BIAS_BEFORE_NORM``, biases in the convs followed by BatchNorm.
        num_hm_conv: ``NUM_HM_CONV``.
        separate_heads: ``SEPARATE_HEAD_CFG.HEAD_DICT``: name -> ``{out_channels, num_conv}``.
        head_order: ``HEAD_ORDER``, the outputs forming the regression code (``iou`` is not one).
        bn_eps, bn_momentum: ``BN_EPS``, ``BN_MOM``.
        feature_map_stride: ``FEATURE_MAP_STRIDE``; checked against the input map's stride.
        num_max_objs, gaussian_overlap, min_radius: ``TARGET_ASSIGNER_CONFIG``.
        cls_weight, loc_weight, code_weights: ``LOSS_CONFIG.LOSS_WEIGHTS``.
        iou_reg_loss: ``IOU_REG_LOSS``.
        score_threshold, post_center_limit_range, max_obj_per_sample: ``POST_PROCESSING``.
        iou_rectifier: ``IOU_RECTIFIER`` (one exponent per class, model order) when
            ``USE_IOU_TO_RECTIFY_SCORE``; None: scores are not rectified.
        nms_type: ``"nms_gpu"`` (class-agnostic within a group) or ``"class_specific_nms"``.
        nms_threshold, nms_pre_max_size, nms_post_max_size: ``NMS_CONFIG`` (one value, or one per
            class for ``class_specific_nms``, model order).
        nms_score_threshold: ``NMS_CONFIG.SCORE_THRESH`` of ``class_specific_nms`` (None: none).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        class_names: Sequence[str],
        class_names_each_head: Sequence[Sequence[str]],
        shared_conv_channels: int = 64,
        use_bias_before_norm: bool = True,
        num_hm_conv: int = 2,
        separate_heads: Mapping[str, Mapping[str, int]] | None = None,
        head_order: Sequence[str] = ("center", "center_z", "dim", "rot", "vel"),
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        feature_map_stride: int | None = None,
        num_max_objs: int = 500,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
        cls_weight: float = 1.0,
        loc_weight: float = 0.25,
        code_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 1.0, 1.0),
        iou_reg_loss: bool = False,
        score_threshold: float = 0.1,
        post_center_limit_range: Sequence[float] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        max_obj_per_sample: int = 500,
        iou_rectifier: Sequence[float] | None = None,
        nms_type: Literal["nms_gpu", "class_specific_nms"] = "nms_gpu",
        nms_threshold: float | Sequence[float] = 0.2,
        nms_pre_max_size: int | Sequence[int] = 1000,
        nms_post_max_size: int | Sequence[int] = 83,
        nms_score_threshold: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        if num_classes != len(self.class_names):
            raise ValueError(f"num_classes {num_classes} != {len(self.class_names)} class_names")
        groups = [tuple(g) for g in class_names_each_head]
        flat = [name for g in groups for name in g]
        if sorted(flat) != sorted(self.class_names):
            raise ValueError(f"class_names_each_head {groups}: expected each of {self.class_names} exactly once")
        self.groups = groups
        # Each group's heatmap channel -> the model's label.
        self.group_labels = [torch.tensor([self.class_names.index(n) for n in g]) for g in groups]
        outputs = {k: dict(v) for k, v in (separate_heads or DEFAULT_SEPARATE_HEADS).items()}
        self.head_order = tuple(head_order)
        if any(name not in outputs for name in self.head_order) or "hm" in outputs:
            raise ValueError(f"head_order {self.head_order}: every name must be in separate_heads {list(outputs)} (not 'hm')")
        code_size = sum(outputs[n]["out_channels"] for n in self.head_order)
        if len(code_weights) != code_size:
            raise ValueError(f"code_weights: expected {code_size} values, got {len(code_weights)}")
        self.with_velocity = "vel" in self.head_order
        self.with_iou = "iou" in outputs

        def norm(channels: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)

        self.shared_conv = _conv_bn_relu(in_channels, shared_conv_channels, use_bias_before_norm, norm)
        self.heads_list = nn.ModuleList()
        for group in groups:
            spec = {**outputs, "hm": {"out_channels": len(group), "num_conv": num_hm_conv}}
            head = nn.ModuleDict()
            for name, cfg in spec.items():
                layers = [
                    _conv_bn_relu(shared_conv_channels, shared_conv_channels, use_bias_before_norm, norm)
                    for _ in range(cfg["num_conv"] - 1)
                ]
                layers.append(nn.Conv2d(shared_conv_channels, cfg["out_channels"], 3, padding=1, bias=True))
                branch = nn.Sequential(*layers)
                if name == "hm":
                    nn.init.constant_(branch[-1].bias, HEATMAP_INIT_BIAS)
                else:
                    for m in branch.modules():
                        if isinstance(m, nn.Conv2d):
                            nn.init.kaiming_normal_(m.weight)
                            if m.bias is not None:
                                nn.init.zeros_(m.bias)
                head[name] = branch
            self.heads_list.append(head)

        self.feature_map_stride = feature_map_stride
        self.num_max_objs = num_max_objs
        self.gaussian_overlap = gaussian_overlap
        self.min_radius = min_radius
        self.cls_weight = cls_weight
        self.loc_weight = loc_weight
        self.register_buffer("code_weights", torch.tensor(code_weights, dtype=torch.float32), persistent=False)
        self.iou_reg_loss = iou_reg_loss
        if iou_reg_loss and not self.with_iou:
            raise ValueError("iou_reg_loss needs an 'iou' output in separate_heads (the reference decodes boxes there)")
        self.score_threshold = score_threshold
        if len(post_center_limit_range) != 6:
            raise ValueError(f"post_center_limit_range: expected 6 values, got {len(post_center_limit_range)}")
        self.post_center_limit_range = tuple(float(v) for v in post_center_limit_range)
        self.max_obj_per_sample = max_obj_per_sample
        if iou_rectifier is not None and len(iou_rectifier) != num_classes:
            raise ValueError(f"iou_rectifier: expected {num_classes} values, got {len(iou_rectifier)}")
        self.iou_rectifier = None if iou_rectifier is None else tuple(float(a) for a in iou_rectifier)
        if nms_type == "nms_gpu" and not all(isinstance(v, (int, float)) for v in (nms_threshold, nms_pre_max_size, nms_post_max_size)):
            raise ValueError("nms_type nms_gpu: nms_threshold, nms_pre_max_size and nms_post_max_size take one value")
        if nms_type == "class_specific_nms" and (isinstance(nms_threshold, (int, float)) or len(nms_threshold) != num_classes):
            raise ValueError(f"nms_type class_specific_nms: nms_threshold takes one value per class ({num_classes})")
        self.nms_type = nms_type
        self.nms_threshold = nms_threshold
        self.nms_pre_max_size = nms_pre_max_size
        self.nms_post_max_size = nms_post_max_size
        self.nms_score_threshold = nms_score_threshold

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, bev: DenseBEV | SparseBEV) -> DenseCenterPredictions:
        """Outputs at every cell of ``bev`` (B, in_channels, H, W); a sparse BEV is scattered to a
        dense map first (zeros at empty cells), as OpenPCDet's map-to-BEV modules do."""
        if isinstance(bev, SparseBEV):
            bev = DenseBEV.from_sparse(bev)
        if self.feature_map_stride is not None and bev.stride != self.feature_map_stride:
            raise ValueError(f"{type(self).__name__}: feature_map_stride {self.feature_map_stride} but the map is at stride {bev.stride}")
        x = self.shared_conv(bev.features)
        groups = [{name: branch(x) for name, branch in head.items()} for head in self.heads_list]
        return DenseCenterPredictions(groups, bev.stride, bev.grid)

    # --- targets ---------------------------------------------------------------------------------
    @torch.no_grad()
    def assign_targets(self, pred: DenseCenterPredictions, annotations: Sequence[Annotations3D]) -> list[CenterGroupTargets]:
        """Per class group, the targets of every frame (OpenPCDet's ``assign_targets``)."""
        device = pred.groups[0]["hm"].device
        targets = []
        for g, names in enumerate(self.groups):
            labels = self.group_labels[g].to(device)
            frames = []
            for ann in annotations:
                boxes = ann.boxes.tensor.to(device=device, dtype=torch.float32)
                ann_labels = ann.labels.to(device)
                match = ann_labels[:, None] == labels[None, :]  # (K, C_group)
                keep = match.any(dim=1)
                frames.append(self._assign_frame(boxes[keep], match[keep].int().argmax(dim=1), len(names), pred))
            targets.append(CenterGroupTargets(*(torch.stack(parts) for parts in zip(*frames))))
        return targets

    def _assign_frame(
        self, boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, pred: DenseCenterPredictions
    ) -> tuple[torch.Tensor, ...]:
        """One frame and group: heatmap (C, H, W), boxes (N, D), inds (N,), mask (N,), gt (N, 7).

        Args:
            boxes: (K, 7 or 9) float32 boxes of the group's classes, annotation order.
            labels: (K,) int64 class within the group.
        """
        h, w = pred.spatial_shape
        n_max = self.num_max_objs
        device = boxes.device
        code_size = 8 + (2 if self.with_velocity else 0)
        heatmap = torch.zeros(num_classes, h, w, device=device)
        ret_boxes = torch.zeros(n_max, code_size, device=device)
        inds = torch.zeros(n_max, dtype=torch.int64, device=device)
        mask = torch.zeros(n_max, dtype=torch.int64, device=device)
        gt = torch.zeros(n_max, 7, device=device)
        boxes, labels = boxes[:n_max], labels[:n_max]
        n = len(boxes)
        if n == 0:
            return heatmap, ret_boxes, inds, mask, gt
        gt[:n] = boxes[:, :7]
        vx, vy = pred.grid.voxel_size[:2]
        x0, y0 = (torch.tensor(pred.grid.point_cloud_range[:2], dtype=torch.float32, device=device))
        stride = pred.stride
        # Float32 arithmetic in the reference's order, so cells and offsets agree bit for bit.
        coord_x = ((boxes[:, 0] - x0) / vx / stride).clamp(min=0, max=w - 0.5)
        coord_y = ((boxes[:, 1] - y0) / vy / stride).clamp(min=0, max=h - 0.5)
        center = torch.stack([coord_x, coord_y], dim=1)
        center_int = center.int()
        dx, dy = boxes[:, 3] / vx / stride, boxes[:, 4] / vy / stride
        radius = gaussian_radius(dx, dy, self.gaussian_overlap).int().clamp(min=self.min_radius)
        valid = torch.nonzero((dx > 0) & (dy > 0)).squeeze(1)
        if len(valid) == 0:
            return heatmap, ret_boxes, inds, mask, gt
        cx, cy, r = center_int[valid, 0].long(), center_int[valid, 1].long(), radius[valid].long()
        self._draw_gaussians(heatmap, labels[valid], cx, cy, r)
        inds[valid] = cy * w + cx
        mask[valid] = 1
        b = boxes[valid]
        parts = [center[valid] - center_int[valid].float(), b[:, 2:3], b[:, 3:6].log(), torch.cos(b[:, 6:7]), torch.sin(b[:, 6:7])]
        if self.with_velocity:
            parts.append(b[:, 7:9] if b.shape[1] >= 9 else b.new_zeros(len(b), 2))
        ret_boxes[valid] = torch.cat(parts, dim=1)
        return heatmap, ret_boxes, inds, mask, gt

    @staticmethod
    def _draw_gaussians(heatmap: torch.Tensor, labels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor) -> None:
        """Max a Gaussian of radius r (sigma (2r + 1) / 6, computed in float64) around each cell into
        ``heatmap`` (C, H, W) in place, clipped to the map."""
        _, h, w = heatmap.shape
        reach = int(r.max())
        offsets = torch.arange(-reach, reach + 1, device=heatmap.device)
        oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
        oy, ox = oy.reshape(1, -1), ox.reshape(1, -1)  # (1, S)
        x, y = cx[:, None] + ox, cy[:, None] + oy  # (K, S)
        inside = (ox.abs() <= r[:, None]) & (oy.abs() <= r[:, None]) & (x >= 0) & (x < w) & (y >= 0) & (y < h)
        sigma = (2 * r + 1).double() / 6
        value = torch.exp(-(ox * ox + oy * oy).double() / (2 * sigma[:, None] * sigma[:, None])).float()
        flat = (labels[:, None] * h + y) * w + x
        heatmap.view(-1).scatter_reduce_(0, flat[inside], value[inside], reduce="amax")

    # --- losses ----------------------------------------------------------------------------------
    def loss(
        self,
        pred: DenseCenterPredictions,
        annotations: Sequence[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ReferenceCenterLosses:
        """OpenPCDet's ``get_loss``, summed over class groups.

        Args:
            reduce_counts: maps this process's normalisers, a (2 * groups,) float tensor (heatmap
                positives, then regression targets, per group), to the divisors (under DDP, their
                mean over ranks). None: the local counts, as the reference.
        """
        targets = self.assign_targets(pred, annotations)
        device = pred.groups[0]["hm"].device
        counts = torch.stack(
            [t.heatmap.eq(1).sum() for t in targets] + [t.mask.sum() for t in targets]
        ).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        num_groups = len(targets)
        zero = torch.zeros((), device=device)
        hm_total, reg_total, iou_total, iou_reg_total = zero, zero, zero, zero
        for g, (out, target) in enumerate(zip(pred.groups, targets)):
            prob = out["hm"].float().sigmoid().clamp(HEATMAP_CLAMP, 1 - HEATMAP_CLAMP)
            hm_total = hm_total + focal_loss_centernet(prob, target.heatmap, counts[g]) * self.cls_weight
            num = counts[num_groups + g]
            code = torch.cat([out[name] for name in self.head_order], dim=1).float()
            chosen = _gather(code, target.inds)  # (B, N, D)
            m = target.mask[..., None].float()
            # Summed over frames, then slots: the reference's order of additions.
            per_code = (chosen * m - target.boxes * m).abs().transpose(2, 0).sum(dim=2).sum(dim=1) / num.clamp(min=1.0)
            reg_total = reg_total + (per_code * self.code_weights).sum() * self.loc_weight
            if self.with_iou:
                selected = target.mask.bool()
                boxes = self._boxes_at(out, target.inds, pred)  # (B, N, 7 or 9)
                if selected.any():
                    with torch.no_grad():
                        iou = iou_3d_aligned(boxes[selected][:, :7].detach(), target.gt_boxes[selected])
                    iou_pred = _gather(out["iou"].float(), target.inds)[selected].view(-1)
                    iou_total = iou_total + F.l1_loss(iou_pred, iou * 2 - 1, reduction="sum") / num.clamp(min=1e-4)
                else:  # 0, as the reference's, but DDP sees the branch take part
                    iou_total = iou_total + out["iou"].sum() * 0.0
                if self.iou_reg_loss:
                    if selected.any():
                        diou = diou_3d_axis_aligned(boxes[selected][:, :7], target.gt_boxes[selected])
                        iou_reg_total = iou_reg_total + (1.0 - diou).sum() / num.clamp(min=1e-4) * self.loc_weight
                    else:  # every output still takes part in the graph
                        iou_reg_total = iou_reg_total + (boxes * 0.0).sum()
        total = hm_total + reg_total + iou_total + iou_reg_total
        return ReferenceCenterLosses(total, hm_total.detach(), reg_total.detach(), iou_total.detach(), iou_reg_total.detach())

    def _boxes_at(self, out: dict[str, torch.Tensor], inds: torch.Tensor, pred: DenseCenterPredictions) -> torch.Tensor:
        """(B, N, 7 or 9) boxes decoded at flat cells ``inds`` (B, N), differentiable, as the
        reference's ``decode_bbox_from_pred_dicts`` computes them at every cell."""
        w = pred.spatial_shape[1]
        vx, vy = pred.grid.voxel_size[:2]
        x0, y0 = pred.grid.point_cloud_range[:2]
        center = _gather(out["center"].float(), inds)
        rot = _gather(out["rot"].float(), inds)
        xs = ((inds % w).float() + center[..., 0]) * pred.stride * vx + _f32(x0)
        ys = (torch.div(inds, w, rounding_mode="floor").float() + center[..., 1]) * pred.stride * vy + _f32(y0)
        parts = [xs[..., None], ys[..., None], _gather(out["center_z"].float(), inds),
                 _gather(out["dim"].float(), inds).exp(), torch.atan2(rot[..., 1:2], rot[..., 0:1])]
        if self.with_velocity:
            parts.append(_gather(out["vel"].float(), inds))
        return torch.cat(parts, dim=-1)

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: DenseCenterPredictions) -> list[Detections3D]:
        """Per frame the detections of every group after NMS, by descending score (0-based labels
        in the model's class order)."""
        frames: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]] = [[] for _ in range(pred.batch_size)]
        for g, out in enumerate(pred.groups):
            for b, found in enumerate(self._decode_group(out, pred, self.group_labels[g].to(out["hm"].device))):
                frames[b].append(found)
        results = []
        for parts in frames:
            boxes, scores, labels, query = (torch.cat(p) for p in zip(*parts))
            order = scores.argsort(descending=True, stable=True)
            results.append(Detections3D(Boxes3D(boxes[order]), scores[order], labels[order], query_xy=query[order]))
        return results

    def _decode_group(
        self, out: dict[str, torch.Tensor], pred: DenseCenterPredictions, group_labels: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(boxes, scores, labels, query cell centres) per frame of one class group after NMS."""
        heat = out["hm"].float().sigmoid()
        b, _, h, w = heat.shape
        k = min(self.max_obj_per_sample, h * w)  # the reference fails on maps of fewer cells
        # OpenPCDet's _topk: the best k cells of each class, then the best k of those.
        class_scores, class_inds = torch.topk(heat.flatten(2, 3), k)
        ys = torch.div(class_inds, w, rounding_mode="floor").float()
        xs = (class_inds % w).int().float()
        scores, best = torch.topk(class_scores.view(b, -1), k)
        labels = torch.div(best, k, rounding_mode="floor").int()
        inds = class_inds.view(b, -1).gather(1, best)
        ys, xs = ys.view(b, -1).gather(1, best), xs.view(b, -1).gather(1, best)

        vx, vy = pred.grid.voxel_size[:2]
        x0, y0 = pred.grid.point_cloud_range[:2]
        center = _gather(out["center"].float(), inds)
        rot = _gather(out["rot"].float(), inds)
        angle = torch.atan2(rot[..., 1:2], rot[..., 0:1])
        bx = (xs[..., None] + center[..., 0:1]) * pred.stride * vx + _f32(x0)
        by = (ys[..., None] + center[..., 1:2]) * pred.stride * vy + _f32(y0)
        parts = [bx, by, _gather(out["center_z"].float(), inds), _gather(out["dim"].float().exp(), inds), angle]
        if self.with_velocity:
            parts.append(_gather(out["vel"].float(), inds))
        boxes = torch.cat(parts, dim=-1)
        iou = ((_gather(out["iou"].float(), inds)[..., 0] + 1) * 0.5) if self.with_iou else None
        limit = boxes.new_tensor(self.post_center_limit_range)
        keep = (boxes[..., :3] >= limit[:3]).all(2) & (boxes[..., :3] <= limit[3:]).all(2)
        keep &= scores > self.score_threshold
        cell = boxes.new_tensor(pred.grid.voxel_size[:2]) * pred.stride
        low = boxes.new_tensor(pred.grid.point_cloud_range[:2])
        query = (torch.stack([xs, ys], dim=-1) + 0.5) * cell + low

        found = []
        for f in range(b):
            m = keep[f]
            f_boxes, f_scores, f_query = boxes[f, m], scores[f, m], query[f, m]
            f_labels = group_labels[labels[f, m].long()]
            if self.iou_rectifier is not None and iou is not None:
                a = f_scores.new_tensor(self.iou_rectifier)[f_labels]
                f_scores = torch.pow(f_scores, 1 - a) * torch.pow(iou[f, m].clamp(0, 1.0), a)
            if self.nms_type == "class_specific_nms":
                selected = class_specific_nms(
                    f_scores, f_boxes, f_labels, self.nms_threshold, self.nms_pre_max_size,
                    self.nms_post_max_size, self.nms_score_threshold,
                )
            else:
                selected = class_agnostic_nms(
                    f_scores, f_boxes, self.nms_threshold, self.nms_pre_max_size, self.nms_post_max_size
                )
            found.append((f_boxes[selected], f_scores[selected], f_labels[selected], f_query[selected]))
        return found

    # --- reference names -------------------------------------------------------------------------
    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return [KeyPair(key, key) for key in self.state_dict()]


def _f32(value: float) -> torch.Tensor:
    """A Python float as the float32 scalar OpenPCDet holds its point-cloud range in."""
    return torch.tensor(value, dtype=torch.float32)
