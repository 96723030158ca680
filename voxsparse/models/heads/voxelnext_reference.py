"""OpenPCDet's sparse ``VoxelNeXtHead`` (``dense_heads/voxelnext_head.py``, commit 8caccce), exactly.

The head of VoxelNeXt's nuScenes, Waymo (IoU branch, large) and Argoverse 2 configs, on the
backbone's sparse BEV (its ``shared_conv`` belongs to the backbone):

- per *class group* a separate head at every occupied cell: per output (``center``, ``center_z``,
  ``dim``, ``rot``, ``vel``, ``iou``, and the group's heatmap ``hm``) ``num_conv - 1`` submanifold
  convs (kernel ``kernel_size``, a bias before the norm when ``bias_before_norm``) + BatchNorm (eps
  1e-5) + ReLU, then a 1x1 output conv with a bias. A 1x1 conv at occupied cells is a linear layer:
  held as ``nn.Linear`` (spconv computes ``features @ W.view(C_in, C_out)``, which the converter
  reproduces), so a 1x1 head runs no sparse-conv index work;
- targets per group and frame (``assign_target_of_single_head``): a box's centre in BEV cells,
  ``(xy - range_min) / voxel_size / stride``, clamped to ``[0, size - 0.5]``; its cell is the
  occupied cell whose *index* (its lower corner) is nearest to that centre; the heatmap of the box's
  class is max-combined with two Gaussians over every occupied cell of the frame (no cut-off), one
  around the centre and one around that cell (exactly 1 there), sigma ``(2r + 1) / 6`` with ``r =
  max(int(CenterNet radius), min_radius)``; regression targets at the cell: the centre minus the
  cell index, z, log(dx, dy, dz), cos, sin[, vx, vy]; at most ``num_max_objs`` boxes per frame and
  group, in annotation order;
- losses per group, summed: CenterNet's focal loss on the sigmoid heatmap clamped to ``[1e-4,
  1 - 1e-4]`` (divided by the group's positives, not at all without any) x ``cls_weight``; L1 of
  the regression at the targets' cells per code, divided by the group's targets (at least 1),
  weighted by ``code_weights``, summed, x ``loc_weight``; with an ``iou`` output, L1 of it against
  ``2 * IoU3D - 1`` of the (detached) decoded box with its ground truth, and ``1 - DIoU``
  (axis-aligned) of the decoded box x ``iou_weight`` (default ``loc_weight``), both divided by the
  targets + 1e-4;
- decoding per group: top ``max_obj_per_sample`` cells (``torch.topk`` per class, then over
  classes), boxes ``((cell index + offset) * stride * voxel_size + range_min, z, exp(dim),
  atan2(sin, cos)[, vel])`` kept inside ``post_center_limit_range`` and scoring above
  ``score_threshold``; without an IoU branch, rotated NMS within the group (``nms_gpu`` over the
  best ``nms_pre_maxsize``, at most ``nms_post_maxsize`` kept); with it, the frame's boxes of all
  groups per class: score ``score ** (1 - a) * iou ** a`` (``iou_rectifier`` a per class) and
  rotated NMS with that class's settings.

What differs from the reference, on purpose: labels are 0-based in the model's class order (the
groups name their classes; OpenPCDet's labels are 1-based in its config's order); a frame's
detections come sorted by score; the NMS and the IoU target use the exact rotated IoU of
:mod:`voxsparse.ops.boxes` (the compiled kernel counts corners up to 1 cm outside a box, in
float32); a frame with fewer occupied cells than ``max_obj_per_sample`` gets its classes right (the
reference divides the flat top-K index by K instead of by the per-class count, and mislabels them);
``reduce_counts`` averages the loss normalisers over DDP ranks (one process: the same).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from voxsparse.models.fusion import fuse_conv_bn
from voxsparse.models.heads.center_head import gaussian_radius
from voxsparse.models.heads.center_reference import (
    HEATMAP_CLAMP,
    HEATMAP_INIT_BIAS,
    ReferenceCenterLosses,
    diou_3d_axis_aligned,
    focal_loss_centernet,
)
from voxsparse.models.keys import KeyPair, TensorKind
from voxsparse.ops.boxes import grouped_nms, iou_3d_aligned
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.structures import Annotations3D, Boxes3D, Detections3D, SparseBEV, VoxelGrid

#: VoxelNeXt's nuScenes outputs: name -> (channels, convs); ``head_order`` gives the regression code.
DEFAULT_SEPARATE_HEADS: dict[str, dict[str, int]] = {
    "center": {"out_channels": 2, "num_conv": 2},
    "center_z": {"out_channels": 1, "num_conv": 2},
    "dim": {"out_channels": 3, "num_conv": 2},
    "rot": {"out_channels": 2, "num_conv": 2},
    "vel": {"out_channels": 2, "num_conv": 2},
}


@dataclass
class SparseCenterPredictions:
    """Raw outputs of :class:`VoxelNeXtReferenceHead` at M occupied BEV cells.

    Attributes:
        coords: (M, 3) int (batch, y, x) cells.
        groups: per class group, output name -> (M, C): ``hm`` heatmap logits (one per class of the
            group, in the group's order), ``center`` offset from the cell index in cells,
            ``center_z`` metres, ``dim`` log metres, ``rot`` (cos, sin), ``vel`` m/s, ``iou`` in [-1, 1].
        spatial_shape: (H, W) cells; stride: cell size in voxels of ``grid``; batch_size: frames.
    """

    coords: torch.Tensor
    groups: list[dict[str, torch.Tensor]]
    spatial_shape: tuple[int, int]
    stride: int
    grid: VoxelGrid
    batch_size: int


@dataclass
class SparseGroupTargets:
    """Targets of one class group for a batch (``num_max_objs`` slots per frame).

    Attributes:
        heatmap: (M, C_group) Gaussian targets at the cells, 1 at each box's cell.
        boxes: (B, num_max_objs, D) regression targets in ``head_order``: offset (2), z, log dims
            (3), cos, sin[, vx, vy].
        inds: (B, num_max_objs) int64 row of each slot's cell among its frame's cells.
        mask: (B, num_max_objs) int64, 1 where a slot holds a box.
        gt_boxes: (B, num_max_objs, 7) the ground-truth box of each slot.
    """

    heatmap: torch.Tensor
    boxes: torch.Tensor
    inds: torch.Tensor
    mask: torch.Tensor
    gt_boxes: torch.Tensor


class _Hidden(nn.Module):
    """Conv (a linear layer when 1x1) + BatchNorm (PyTorch's defaults) + ReLU at occupied cells."""

    def __init__(self, channels: int, kernel_size: int, bias: bool, indice_key: str) -> None:
        super().__init__()
        if kernel_size == 1:
            self.conv: nn.Module = nn.Linear(channels, channels, bias=bias)
        else:
            self.conv = spnn.SubMConv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias,
                                        indice_key=indice_key)
        self.norm = nn.BatchNorm1d(channels)
        self.relu = nn.ReLU()

    def forward(self, features: torch.Tensor, x: SparseConvTensor | None) -> torch.Tensor:
        if isinstance(self.conv, nn.Linear):
            out = self.conv(features)
        else:
            out = self.conv(x.replace_feature(features)).features
        return self.relu(self.norm(out))

    @torch.no_grad()
    def fuse_(self) -> None:
        """Fold the eval-mode BatchNorm into the conv (inference only; see
        :func:`voxsparse.models.fusion.fuse_for_inference`)."""
        if not isinstance(self.conv, nn.Linear):
            self.norm, self.relu = fuse_conv_bn(self.conv, self.norm, self.relu)
            return
        scale = self.norm.weight / torch.sqrt(self.norm.running_var + self.norm.eps)
        shift = self.norm.bias - self.norm.running_mean * scale
        if self.conv.bias is not None:
            shift = shift + self.conv.bias * scale
        fused = nn.Linear(self.conv.in_features, self.conv.out_features).to(self.conv.weight)
        fused.weight.copy_(self.conv.weight * scale[:, None])
        fused.bias.copy_(shift)
        self.conv, self.norm = fused, nn.Identity()


class _Branch(nn.Module):
    """One output of a group: ``num_conv - 1`` hidden layers, then a linear (1x1) output with a bias."""

    def __init__(self, channels: int, out_channels: int, num_conv: int, kernel_size: int, bias: bool) -> None:
        super().__init__()
        self.hidden = nn.ModuleList([_Hidden(channels, kernel_size, bias, "head_subm") for _ in range(num_conv - 1)])
        self.out = nn.Linear(channels, out_channels)

    def forward(self, features: torch.Tensor, x: SparseConvTensor | None) -> torch.Tensor:
        if len(features):  # no cells: BatchNorm cannot run, the output is (0, C) all the same
            for layer in self.hidden:
                features = layer(features, x)
        return self.out(features)


def _f32(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Floats as the float32 tensor OpenPCDet holds its range and voxel size in."""
    return torch.tensor(list(values), dtype=torch.float32, device=device)


class VoxelNeXtReferenceHead(nn.Module):
    """OpenPCDet's ``VoxelNeXtHead``; see the module docstring for what it computes.

    Args:
        in_channels: channels of the sparse BEV (``SHARED_CONV_CHANNEL``).
        num_classes: the model's class count (``len(class_names)``).
        class_names: the model's class names, in label order.
        class_groups: the class groups (``CLASS_NAMES_EACH_HEAD``), in the reference's order (its
            ``heads_list`` order, so its weights load); together they name every class once.
        separate_heads: output name -> ``{"out_channels", "num_conv"}`` (``SEPARATE_HEAD_CFG.HEAD_DICT``,
            in its order); an ``iou`` entry adds the IoU branch.
        head_order: outputs concatenated into the regression code (``HEAD_ORDER``).
        kernel_size: of the hidden convs (``KERNEL_SIZE_HEAD``).
        num_hm_conv: convs of the heatmap outputs (``NUM_HM_CONV``).
        bias_before_norm: hidden convs carry a bias (``USE_BIAS_BEFORE_NORM``).
        cls_weight, loc_weight, code_weights, iou_weight: ``LOSS_WEIGHTS`` (``iou_weight`` None:
            ``loc_weight``, as the reference falls back).
        num_max_objs, gaussian_overlap, min_radius: ``TARGET_ASSIGNER_CONFIG``.
        max_obj_per_sample, score_threshold, post_center_limit_range: ``POST_PROCESSING``.
        nms_threshold, nms_pre_maxsize, nms_post_maxsize: ``NMS_CONFIG``: one value (per group,
            class-agnostic) or, with the IoU branch, one per class in the groups' class order.
        iou_rectifier: ``RECTIFIER``, one exponent per class in the groups' class order (IoU branch).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        class_names: Sequence[str],
        class_groups: Sequence[Sequence[str]],
        separate_heads: Mapping[str, Mapping[str, int]] | None = None,
        head_order: Sequence[str] = ("center", "center_z", "dim", "rot", "vel"),
        kernel_size: int = 1,
        num_hm_conv: int = 2,
        bias_before_norm: bool = True,
        cls_weight: float = 1.0,
        loc_weight: float = 0.25,
        code_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 1.0, 1.0),
        iou_weight: float | None = None,
        num_max_objs: int = 500,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
        max_obj_per_sample: int = 500,
        score_threshold: float = 0.1,
        post_center_limit_range: Sequence[float] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0),
        nms_threshold: float | Sequence[float] = 0.2,
        nms_pre_maxsize: int | Sequence[int] = 1000,
        nms_post_maxsize: int | Sequence[int] = 83,
        iou_rectifier: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        if len(self.class_names) != num_classes:
            raise ValueError(f"class_names {list(self.class_names)}: expected {num_classes} names (num_classes)")
        self.class_groups = [tuple(group) for group in class_groups]
        flat = [name for group in self.class_groups for name in group]
        unknown = [name for name in flat if name not in self.class_names]
        if unknown or len(set(flat)) != len(flat) or len(flat) != len(self.class_names):
            raise ValueError(
                f"class_groups {[list(g) for g in self.class_groups]} must name each of the model's classes "
                f"{list(self.class_names)} exactly once" + (f"; unknown: {unknown}" if unknown else "")
            )
        self.num_classes = num_classes
        #: (num_classes,) model label of each class in the groups' order.
        self.register_buffer("group_class_labels", torch.tensor([self.class_names.index(n) for n in flat]),
                             persistent=False)
        heads = dict(DEFAULT_SEPARATE_HEADS if separate_heads is None else separate_heads)
        missing = [name for name in head_order if name not in heads]
        if missing or "hm" in heads:
            raise ValueError(f"separate_heads {list(heads)}: head_order {list(head_order)} names missing outputs "
                             f"{missing}, or 'hm' is given (it is added per group)")
        self.head_order = tuple(head_order)
        self.with_iou = "iou" in heads
        code_size = sum(heads[name]["out_channels"] for name in head_order)
        if len(code_weights) != code_size:
            raise ValueError(f"code_weights: expected {code_size} values (head_order), got {len(code_weights)}")
        self.kernel_size = kernel_size
        self.groups = nn.ModuleList()
        for group in self.class_groups:
            outputs = {name: (int(spec["out_channels"]), int(spec["num_conv"])) for name, spec in heads.items()}
            outputs["hm"] = (len(group), num_hm_conv)
            self.groups.append(nn.ModuleDict({
                name: _Branch(in_channels, channels, convs, kernel_size, bias_before_norm)
                for name, (channels, convs) in outputs.items()
            }))
        self._init_weights()
        self.cls_weight, self.loc_weight = cls_weight, loc_weight
        self.iou_weight = loc_weight if iou_weight is None else iou_weight
        self.register_buffer("code_weights", torch.tensor(list(code_weights), dtype=torch.float32), persistent=False)
        self.num_max_objs, self.gaussian_overlap, self.min_radius = num_max_objs, gaussian_overlap, min_radius
        self.max_obj_per_sample, self.score_threshold = max_obj_per_sample, score_threshold
        if len(post_center_limit_range) != 6:
            raise ValueError(f"post_center_limit_range: expected 6 values, got {list(post_center_limit_range)}")
        self.post_center_limit_range = tuple(float(v) for v in post_center_limit_range)
        per_class = [v for v in (nms_threshold, nms_pre_maxsize, nms_post_maxsize) if isinstance(v, Sequence)]
        if self.with_iou:
            rectifier = iou_rectifier if iou_rectifier is not None else (0.0,) * num_classes
            if len(rectifier) != num_classes or any(len(v) != num_classes for v in per_class):
                raise ValueError(f"iou_rectifier and per-class NMS settings take one value per class ({num_classes})")
            self.iou_rectifier = tuple(float(a) for a in rectifier)
            self.nms = [tuple(v[c] if isinstance(v, Sequence) else v
                              for v in (nms_threshold, nms_pre_maxsize, nms_post_maxsize)) for c in range(num_classes)]
        else:
            if per_class or iou_rectifier is not None:
                raise ValueError("per-class NMS settings and iou_rectifier need the IoU branch (an 'iou' output)")
            self.nms = [(nms_threshold, nms_pre_maxsize, nms_post_maxsize)]

    def _init_weights(self) -> None:
        """The reference's initialisation: heatmap output bias -2.19; every other output's convs
        Kaiming-normal with zero biases."""
        for group in self.groups:
            for name, branch in group.items():
                if name == "hm":
                    nn.init.constant_(branch.out.bias, HEATMAP_INIT_BIAS)
                    continue
                for layer in [*(h.conv for h in branch.hidden), branch.out]:
                    nn.init.kaiming_normal_(layer.weight)
                    if layer.bias is not None:
                        nn.init.zeros_(layer.bias)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, bev: SparseBEV) -> SparseCenterPredictions:
        features = bev.features
        x = None
        if self.kernel_size > 1 and len(bev):
            x = SparseConvTensor(features, bev.coords.int(), list(bev.spatial_shape), bev.batch_size)
        groups = [{name: branch(features, x) for name, branch in group.items()} for group in self.groups]
        return SparseCenterPredictions(bev.coords, groups, tuple(bev.spatial_shape), bev.stride, bev.grid,
                                       bev.batch_size)

    # --- targets ---------------------------------------------------------------------------------
    @torch.no_grad()
    def assign_targets(self, pred: SparseCenterPredictions, annotations: Sequence[Annotations3D]) -> list[SparseGroupTargets]:
        """Per class group, the targets of every frame (OpenPCDet's ``assign_targets``)."""
        device = pred.coords.device
        frames = self._rows_per_frame(pred)
        code_size = len(self.code_weights)
        targets = []
        for g, group in enumerate(self.class_groups):
            labels_in_group = {self.class_names.index(n): i for i, n in enumerate(group)}
            heatmap = torch.zeros(len(pred.coords), len(group), device=device)
            boxes = torch.zeros(pred.batch_size, self.num_max_objs, code_size, device=device)
            inds = torch.zeros(pred.batch_size, self.num_max_objs, dtype=torch.int64, device=device)
            mask = torch.zeros(pred.batch_size, self.num_max_objs, dtype=torch.int64, device=device)
            gt_boxes = torch.zeros(pred.batch_size, self.num_max_objs, 7, device=device)
            for b, ann in enumerate(annotations):
                local = [labels_in_group.get(int(label), -1) for label in ann.labels]
                rows = [k for k, label in enumerate(local) if label >= 0][: self.num_max_objs]
                if not rows or len(frames[b]) == 0:
                    continue
                frame_boxes = ann.boxes.tensor[rows].to(device=device, dtype=torch.float32)
                frame_labels = torch.tensor([local[k] for k in rows], device=device)
                heat, slots = self._assign_frame(pred, frames[b], frame_boxes, frame_labels, len(group), code_size)
                heatmap[frames[b]] = heat
                valid, cell, code = slots
                n = len(valid)
                boxes[b, :n] = code
                inds[b, :n] = cell
                mask[b, :n] = valid.long()
                gt_boxes[b, :n] = frame_boxes[:, :7] * valid[:, None]
            targets.append(SparseGroupTargets(heatmap, boxes, inds, mask, gt_boxes))
        return targets

    def _assign_frame(
        self, pred: SparseCenterPredictions, cells: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
        num_group_classes: int, code_size: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One frame and group: the heatmap at its cells (Mb, C_group) and, per box, (valid, cell
        row, regression code).

        Args:
            cells: (Mb,) rows of the frame's cells in ``pred``; boxes: (K, 7 or 9) float32;
            labels: (K,) class within the group.
        """
        device = boxes.device
        low, size = _f32(pred.grid.point_cloud_range[:2], device), _f32(pred.grid.voxel_size[:2], device)
        h, w = pred.spatial_shape
        index = pred.coords[cells][:, [2, 1]]  # (Mb, 2) int (x, y): the cells' lower corners in cells
        centre = (boxes[:, :2] - low) / size / pred.stride
        centre = torch.stack([centre[:, 0].clamp(0, w - 0.5), centre[:, 1].clamp(0, h - 0.5)], dim=1)
        extent = boxes[:, 3:5] / size / pred.stride
        radius = gaussian_radius(extent[:, 0], extent[:, 1], self.gaussian_overlap).int().clamp(min=self.min_radius)
        valid = (extent[:, 0] > 0) & (extent[:, 1] > 0)
        distance = ((index[:, None, :] - centre[None]) ** 2).sum(-1)  # (Mb, K)
        nearest = distance.argmin(dim=0)  # (K,) first of equal distances, as torch's argmin per box
        to_nearest = ((index[:, None, :] - index[nearest][None]) ** 2).sum(-1)
        sigma = [(2 * r + 1) / 6 for r in radius.tolist()]  # Python floats, as the reference's per box
        denominator = torch.tensor([2 * s * s for s in sigma], device=device)
        gauss = torch.maximum(torch.exp(-distance / denominator), torch.exp(-to_nearest / denominator))
        gauss = gauss * valid
        heat = torch.zeros(len(cells), num_group_classes, device=device)
        heat.scatter_reduce_(1, labels[None].expand(len(cells), -1), gauss, reduce="amax")
        code = [centre - index[nearest], boxes[:, 2:3], boxes[:, 3:6].log(),
                torch.cos(boxes[:, 6:7]), torch.sin(boxes[:, 6:7])]
        if code_size > 8:
            velocity = boxes[:, 7:9] if boxes.shape[1] >= 9 else boxes.new_zeros(len(boxes), 2)
            code.append(velocity)
        code = torch.cat(code, dim=1) * valid[:, None]
        return heat, (valid, nearest * valid, code)

    # --- losses ----------------------------------------------------------------------------------
    def loss(
        self,
        pred: SparseCenterPredictions,
        annotations: Sequence[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ReferenceCenterLosses:
        """OpenPCDet's ``get_loss``, summed over class groups.

        Args:
            annotations: one per frame, labels in ``class_names`` order.
            reduce_counts: maps the per-group counts (positives, then targets), a (2 G,) float
                tensor, to the divisors (DDP: their mean over ranks); None: this process's counts.
        """
        targets = self.assign_targets(pred, annotations)
        counts = torch.stack([t.heatmap.eq(1).sum() for t in targets] + [t.mask.sum() for t in targets]).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        num_groups = len(targets)
        frame_rows = self._frame_rows(pred)
        zero = pred.groups[0]["hm"].sum() * 0.0
        hm_total, reg_total, iou_total, iou_reg_total = zero, zero, zero, zero
        for g, (out, t) in enumerate(zip(pred.groups, targets)):
            prob = out["hm"].float().sigmoid().clamp(HEATMAP_CLAMP, 1 - HEATMAP_CLAMP)
            hm_total = hm_total + focal_loss_centernet(prob, t.heatmap, counts[g]) * self.cls_weight
            rows = frame_rows.gather(1, t.inds)  # (B, num_max_objs) rows of each slot's cell in pred
            code = torch.cat([out[name] for name in self.head_order], dim=1).float()
            slot_mask = t.mask[..., None].float()
            at_slots = code[rows] if len(code) else code.new_zeros(*rows.shape, code.shape[1])  # no cells: 0
            l1 = (at_slots * slot_mask - t.boxes * slot_mask).abs().sum(dim=(0, 1))
            reg = l1 / counts[num_groups + g].clamp(min=1.0)
            reg_total = reg_total + (reg * self.code_weights).sum() * self.loc_weight
            if self.with_iou:
                valid = t.mask.bool()
                box = self._boxes(out, pred, rows[valid], for_loss=True)
                gt = t.gt_boxes[valid]
                divisor = counts[num_groups + g] + 1e-4
                with torch.no_grad():
                    iou_target = 2 * iou_3d_aligned(box.detach(), gt) - 1
                iou_loss = (out["iou"][rows[valid], 0].float() - iou_target).abs().sum() / divisor
                iou_reg = (1.0 - diou_3d_axis_aligned(box, gt)).sum() / divisor * self.iou_weight
                iou_total, iou_reg_total = iou_total + iou_loss, iou_reg_total + iou_reg
        total = hm_total + reg_total + iou_total + iou_reg_total
        return ReferenceCenterLosses(total, hm_total.detach(), reg_total.detach(), iou_total.detach(),
                                     iou_reg_total.detach())

    @staticmethod
    def _frame_rows(pred: SparseCenterPredictions) -> torch.Tensor:
        """(B, max Mb) row in ``pred`` of each frame's k-th cell (0 past a frame's cells)."""
        batch = pred.coords[:, 0].long()
        counts = torch.bincount(batch, minlength=pred.batch_size)
        order = torch.argsort(batch, stable=True)
        start = torch.cumsum(counts, 0) - counts
        width = max(int(counts.max()) if len(batch) else 0, 1)
        position = torch.arange(len(batch), device=batch.device) - start[batch[order]]
        rows = torch.zeros(pred.batch_size, width, dtype=torch.int64, device=batch.device)
        rows[batch[order], position] = order
        return rows

    def _boxes(self, out: dict[str, torch.Tensor], pred: SparseCenterPredictions, rows: torch.Tensor,
               for_loss: bool = False) -> torch.Tensor:
        """(N, 7[+2]) boxes decoded at ``rows``: ``(index + offset) * stride * voxel_size + range_min``,
        z, exp(dim), atan2(sin, cos)[, vel]; ``for_loss``: the losses' 7 columns, dim clamped to [-5, 5]
        before exp (the reference's ``_get_predicted_boxes``)."""
        device = rows.device
        low, size = _f32(pred.grid.point_cloud_range[:2], device), _f32(pred.grid.voxel_size[:2], device)
        index = pred.coords[rows]
        center = out["center"][rows].float()
        xs = (index[:, 2:3] + center[:, 0:1]) * pred.stride * size[0] + low[0]
        ys = (index[:, 1:2] + center[:, 1:2]) * pred.stride * size[1] + low[1]
        dim = out["dim"][rows].float()
        dim = torch.exp(dim.clamp(-5, 5) if for_loss else dim)
        rot = out["rot"][rows].float()
        parts = [xs, ys, out["center_z"][rows].float(), dim, torch.atan2(rot[:, 1:2], rot[:, 0:1])]
        if "vel" in self.head_order and not for_loss:
            parts.append(out["vel"][rows].float())
        return torch.cat(parts, dim=1)

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: SparseCenterPredictions) -> list[Detections3D]:
        """OpenPCDet's ``generate_predicted_boxes``: detections per frame, scores descending, labels
        in the model's class order."""
        found = [[] for _ in range(pred.batch_size)]
        first_class = 0
        frames = self._rows_per_frame(pred)
        for g, (out, group) in enumerate(zip(pred.groups, self.class_groups)):
            for b, (boxes, scores, classes, iou, rows) in enumerate(self._decode_group(out, pred, frames)):
                found[b].append((boxes, scores, classes + first_class, iou, rows, torch.full_like(classes, g)))
            first_class += len(group)
        results = []
        for parts in found:
            boxes, scores, classes, rows, groups = (torch.cat([p[i] for p in parts]) for i in (0, 1, 2, 4, 5))
            if self.with_iou:
                boxes, scores, classes, rows = self._rectify_and_nms(
                    boxes, scores, classes, torch.cat([p[3] for p in parts]), rows)
            else:  # NMS within each group, all groups in one pass
                threshold, pre, post = self.nms[0]
                keep = grouped_nms(scores, boxes, groups, [threshold] * len(self.class_groups), pre, post)
                boxes, scores, classes, rows = boxes[keep], scores[keep], classes[keep], rows[keep]
            order = scores.argsort(descending=True, stable=True)
            cell = pred.coords[rows[order]]
            size = _f32(pred.grid.voxel_size[:2], boxes.device) * pred.stride
            query = (cell[:, [2, 1]].float() + 0.5) * size + _f32(pred.grid.point_cloud_range[:2], boxes.device)
            results.append(Detections3D(Boxes3D(boxes[order]), scores[order],
                                        self.group_class_labels[classes[order]], query_xy=query))
        return results

    @staticmethod
    def _rows_per_frame(pred: SparseCenterPredictions) -> list[torch.Tensor]:
        """Each frame's rows in ``pred``, ascending: read once, shared by the class groups."""
        batch = pred.coords[:, 0].long()
        return [torch.nonzero(batch == b).squeeze(1) for b in range(pred.batch_size)]

    def _decode_group(
        self, out: dict[str, torch.Tensor], pred: SparseCenterPredictions, frames: list[torch.Tensor]
    ) -> list[tuple]:
        """Per frame of one group: (boxes, scores, class in the groups' order minus the group's first,
        rectification IoU or None, rows in ``pred``) above the score threshold in the centre range.
        ``frames``: each frame's rows in ``pred``, ascending."""
        hm = out["hm"].float().sigmoid()
        limit = _f32(self.post_center_limit_range, hm.device)
        decoded = []
        for cells in frames:
            score = hm[cells].T  # (C, Mb)
            per_class = min(self.max_obj_per_sample, score.shape[1])
            top_scores, top_cells = torch.topk(score, per_class)
            scores, flat = torch.topk(top_scores.reshape(-1), min(self.max_obj_per_sample, top_scores.numel()))
            classes = torch.div(flat, max(per_class, 1), rounding_mode="floor")
            rows = cells[top_cells.reshape(-1).gather(0, flat)]
            boxes = self._boxes(out, pred, rows)
            keep = (boxes[:, :3] >= limit[:3]).all(1) & (boxes[:, :3] <= limit[3:]).all(1)
            keep &= scores > self.score_threshold
            keep = keep.nonzero().squeeze(1)  # one host read for the five selections
            boxes, scores, classes, rows = boxes[keep], scores[keep], classes[keep], rows[keep]
            iou = (out["iou"][rows, 0].float() + 1) * 0.5 if self.with_iou else None
            decoded.append((boxes, scores, classes, None if iou is None else iou.clamp(0, 1), rows))
        return decoded

    def _rectify_and_nms(
        self, boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Per class (groups' order): scores rectified by the predicted IoU, then that class's NMS."""
        a = torch.tensor(self.iou_rectifier, dtype=scores.dtype, device=scores.device)[classes]
        rectified = torch.pow(scores, 1 - a) * torch.pow(iou, a)
        threshold, pre, post = zip(*self.nms)
        index = grouped_nms(rectified, boxes, classes, threshold, pre, post)
        return boxes[index], rectified[index], classes[index], rows[index]

    # --- reference names -------------------------------------------------------------------------
    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry under its name in OpenPCDet's ``VoxelNeXtHead`` (relative to
        ``dense_head.``): ``groups.<g>.<out>.hidden.<i>.{conv,norm}`` is ``heads_list.<g>.<out>.<i>.{0,1}``
        and ``groups.<g>.<out>.out`` the last conv, ``heads_list.<g>.<out>.<num_conv - 1>``."""
        pairs = []
        conv_kind = TensorKind.SPARSE_CONV_AS_LINEAR if self.kernel_size == 1 else TensorKind.SPARSE_CONV
        for g, group in enumerate(self.groups):
            for name, branch in group.items():
                ours, theirs = f"groups.{g}.{name}.", f"heads_list.{g}.{name}."
                for i, hidden in enumerate(branch.hidden):
                    for key in hidden.conv.state_dict():
                        kind = conv_kind if key == "weight" else TensorKind.TENSOR
                        pairs.append(KeyPair(f"{ours}hidden.{i}.conv.{key}", f"{theirs}{i}.0.{key}", kind))
                    for key in hidden.norm.state_dict():
                        pairs.append(KeyPair(f"{ours}hidden.{i}.norm.{key}", f"{theirs}{i}.1.{key}"))
                last = len(branch.hidden)
                pairs.append(KeyPair(f"{ours}out.weight", f"{theirs}{last}.weight", TensorKind.SPARSE_CONV_AS_LINEAR))
                pairs.append(KeyPair(f"{ours}out.bias", f"{theirs}{last}.bias"))
        return pairs

    def extra_repr(self) -> str:
        return f"class_groups={[list(g) for g in self.class_groups]}, with_iou={self.with_iou}"

