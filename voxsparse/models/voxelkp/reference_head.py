"""VoxelKP's keypoint head as the authors' code computes it (``VoxelNeXtHeadKPMerge`` of
``dense_heads/voxelnext_head_kp_merge.py`` over ``VoxelNeXtHeadKP``, paper config
``kp_effv2next4_voxelnext_iou_aug_bev_channel.yaml``).

One class group: the model's classes merged into one heatmap class (``MAP_CLASS_NAMES``: Pedestrian
and Cyclist are ``Human``). At every occupied BEV cell, as OpenPCDet's sparse VoxelNeXt head
(:class:`~voxsparse.models.heads.voxelnext_reference.VoxelNeXtReferenceHead`, whose layers, targets,
box losses and decoding this reuses; hidden convs 3x3 here, ``KERNEL_SIZE_HEAD`` unset): outputs
``dim`` (3), ``rot`` (2), ``iou`` (1), ``loc_x``, ``loc_y``, ``loc_z`` (15 each) and ``kp_vis`` (14),
and the heatmap ``hm``. Channel 0 of ``loc_x`` / ``loc_y`` is the box centre's offset from the cell
index (cells), channel 0 of ``loc_z`` the box centre's z (metres); channels 1..14 are the 14
keypoints (``KEYPOINT_NAMES`` order): x and y offsets from the cell index in cells, absolute z in
metres. ``kp_vis`` is a per-keypoint visibility value fitted with L1 to 0/1 (no sigmoid).

Targets (``VoxelNeXtHeadKP.assign_target_of_single_head``): the box targets of the VoxelNeXt head
at each box's nearest cell; for the same slot, each keypoint's ``(xy - range_min) / voxel_size /
stride - cell index``, its z, and its visibility.

Losses (``VoxelNeXtHeadKP.get_loss``): the VoxelNeXt head's focal heatmap loss, coded L1 of the box
code (centre offset, z, log dims, cos, sin: ``code_weights`` x ``loc_weight``), IoU-branch L1 and
DIoU (x ``loc_weight``); L1 of the keypoint x, y, z codes (``kp_{x,y,z}_code_weights`` summed,
x ``kp_{x,y,z}_loc_weight``, averaged over the three), L1 of the visibility (``kp_visibility_code_weights``,
mean over keypoints, x ``kp_visibility_weight``), and the bone-length loss: the difference of the mean
lengths of 13 bones between prediction and target over all ``num_max_objs`` slots of the batch (empty
slots count as zero-length bones), averaged over bones, x ``kp_visibility_weight`` (the authors
reuse that weight). Total: ``bone + heatmap + (box + keypoint) / 2 + visibility + iou + iou_reg``.

Decoding (``generate_predicted_boxes``): the VoxelNeXt head's top-K, centre limits, score threshold,
IoU rectification and rotated NMS (settings of the config's first class); keypoints ``(cell index +
offset) * stride * voxel_size + range_min`` and z, visibility clamped to [0, 1] as a score.

What the authors' release leaves open, and how it is settled here: ``VoxelNeXtHeadKPMerge`` has no
training path (its ``forward`` assigns no targets, and ``VoxelNeXtHeadKP.get_loss`` reads outputs
``center``, ``center_z``, ``kp_x``, ... that the merged head does not have). Targets and losses are
``VoxelNeXtHeadKP``'s on the merged outputs read as the merged head's own box decoding
(``_get_predicted_boxes``) reads them: centre = (``loc_x[0]``, ``loc_y[0]``), z = ``loc_z[0]``,
keypoints = channels 1..14; the 4-column keypoint target is split into location (3) and visibility,
as the loss uses them. A box without keypoints (``Annotations3D.keypoints`` None) gets 14 invisible
keypoints at its centre (Waymo's default location). Labels are the model's: a detection of the
merged class is labelled the first model class mapped to it (OpenPCDet names its label 1 by
``CLASS_NAMES[0]``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.models.heads.center_reference import HEATMAP_CLAMP, diou_3d_axis_aligned, focal_loss_centernet
from voxsparse.models.heads.voxelnext_reference import SparseCenterPredictions, VoxelNeXtReferenceHead, _f32
from voxsparse.models.voxelkp.structures import KeypointDetections3D
from voxsparse.ops.boxes import iou_3d_aligned
from voxsparse.structures import Annotations3D, Boxes3D, SparseBEV

NUM_KEYPOINTS = len(KEYPOINT_NAMES)

#: The paper config's outputs besides the heatmap, in its ``HEAD_DICT`` order.
VOXELKP_SEPARATE_HEADS: dict[str, dict[str, int]] = {
    "dim": {"out_channels": 3, "num_conv": 2},
    "rot": {"out_channels": 2, "num_conv": 2},
    "iou": {"out_channels": 1, "num_conv": 2},
    "loc_x": {"out_channels": 1 + NUM_KEYPOINTS, "num_conv": 2},
    "loc_y": {"out_channels": 1 + NUM_KEYPOINTS, "num_conv": 2},
    "loc_z": {"out_channels": 1 + NUM_KEYPOINTS, "num_conv": 2},
    "kp_vis": {"out_channels": NUM_KEYPOINTS, "num_conv": 2},
}
#: Bones of the bone-length loss: (keypoint, parent) index pairs in ``KEYPOINT_NAMES`` order.
BONE_JOINTS = (0, 1, 2, 3, 4, 7, 8, 9, 10, 13, 13, 1, 2)
BONE_PARENTS = (13, 3, 4, 5, 6, 9, 10, 11, 12, 1, 2, 7, 8)
_KP_WEIGHTS = (1.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 1.0)


@dataclass
class KeypointSlotTargets:
    """Keypoint targets of the class group's slots (``num_max_objs`` per frame).

    Attributes:
        location: (B, num_max_objs, 14, 3): x, y offsets from the slot's cell index in cells, z metres.
        visibility: (B, num_max_objs, 14) float 0/1.
    """

    location: torch.Tensor
    visibility: torch.Tensor


@dataclass
class VoxelKPReferenceLosses:
    """Loss terms of a batch; ``total`` is back-propagated, the others are detached.

    ``regression`` is the box code's L1 x ``loc_weight``; ``keypoint`` the mean of the weighted x, y,
    z keypoint L1 terms; ``visibility`` and ``bone`` include ``kp_visibility_weight``.
    """

    total: torch.Tensor
    heatmap: torch.Tensor
    regression: torch.Tensor
    iou: torch.Tensor
    iou_regression: torch.Tensor
    keypoint: torch.Tensor
    visibility: torch.Tensor
    bone: torch.Tensor


class VoxelKPReferenceHead(VoxelNeXtReferenceHead):
    """The authors' ``VoxelNeXtHeadKPMerge``; see the module docstring for what it computes.

    Args:
        in_channels: BEV channels (``SHARED_CONV_CHANNEL``).
        num_classes: the model's class count.
        class_names: the model's classes, in label order.
        class_map: model class -> merged head class (``MAP_CLASS_NAMES``); every model class maps to
            the one merged class.
        keypoint_labels: model labels that carry keypoints (as ``KeypointDetector`` passes them): every
            class, as the reference estimates keypoints for all of them.
        separate_heads, kernel_size, num_hm_conv, bias_before_norm, cls_weight, loc_weight,
        num_max_objs, gaussian_overlap, min_radius, max_obj_per_sample, score_threshold,
        post_center_limit_range: as :class:`VoxelNeXtReferenceHead`.
        code_weights: the box code's 8 weights (centre offset 2, z, log dims 3, cos, sin).
        kp_code_weights: per keypoint weights of the x, y and z L1 (one list for the three: the config's
            ``kp_{x,y,z}_code_weights`` are equal), kp_loc_weight: ``kp_{x,y,z}_loc_weight``.
        kp_visibility_code_weights, kp_visibility_weight: the visibility L1's weights (the latter
            also weighs the bone loss).
        nms_threshold, nms_pre_maxsize, nms_post_maxsize, iou_rectifier: of the merged class (the
            config's per-class lists are read at index 0).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        class_names: Sequence[str],
        class_map: Mapping[str, str],
        keypoint_labels: Sequence[int] = (),
        separate_heads: Mapping[str, Mapping[str, int]] | None = None,
        kernel_size: int = 3,
        num_hm_conv: int = 2,
        bias_before_norm: bool = True,
        cls_weight: float = 1.0,
        loc_weight: float = 2.0,
        code_weights: Sequence[float] = (1.0,) * 8,
        kp_code_weights: Sequence[float] = _KP_WEIGHTS,
        kp_loc_weight: float = 2.0,
        kp_visibility_code_weights: Sequence[float] = (1.0,) * NUM_KEYPOINTS,
        kp_visibility_weight: float = 1.0,
        num_max_objs: int = 500,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
        max_obj_per_sample: int = 500,
        score_threshold: float = 0.3,
        post_center_limit_range: Sequence[float] = (-75.2, -75.2, -2.0, 75.2, 75.2, 4.0),
        nms_threshold: float = 0.8,
        nms_pre_maxsize: int = 2048,
        nms_post_maxsize: int = 200,
        iou_rectifier: float = 0.68,
    ) -> None:
        model_classes = tuple(class_names)
        if len(model_classes) != num_classes or sorted(class_map) != sorted(model_classes):
            raise ValueError(f"class_map {dict(class_map)} must map each of the {num_classes} model classes "
                             f"{list(model_classes)}")
        merged = sorted(set(class_map.values()))
        if len(merged) != 1:
            raise ValueError(f"class_map: expected one merged class, got {merged}")
        if len(code_weights) != 8 or len(kp_code_weights) != NUM_KEYPOINTS \
                or len(kp_visibility_code_weights) != NUM_KEYPOINTS:
            raise ValueError("code_weights takes 8 values, kp_code_weights and kp_visibility_code_weights "
                             f"{NUM_KEYPOINTS}")
        if keypoint_labels and sorted(keypoint_labels) != list(range(num_classes)):
            raise ValueError(f"keypoint_labels {list(keypoint_labels)}: the reference estimates keypoints for "
                             f"every class (labels 0..{num_classes - 1})")
        heads = dict(VOXELKP_SEPARATE_HEADS if separate_heads is None else separate_heads)
        super().__init__(
            in_channels, 1, merged, [merged], heads, head_order=("dim", "rot"), kernel_size=kernel_size,
            num_hm_conv=num_hm_conv, bias_before_norm=bias_before_norm, cls_weight=cls_weight,
            loc_weight=loc_weight, code_weights=code_weights[3:], num_max_objs=num_max_objs,
            gaussian_overlap=gaussian_overlap, min_radius=min_radius, max_obj_per_sample=max_obj_per_sample,
            score_threshold=score_threshold, post_center_limit_range=post_center_limit_range,
            nms_threshold=[nms_threshold], nms_pre_maxsize=[nms_pre_maxsize], nms_post_maxsize=[nms_post_maxsize],
            iou_rectifier=[iou_rectifier],
        )
        # The box code reads the centre from the keypoint outputs' channel 0 (added by ``forward``).
        self.head_order = ("center", "center_z", "dim", "rot")
        self.code_weights = torch.tensor(list(code_weights), dtype=torch.float32)  # a buffer of the base
        self.model_classes = model_classes
        # Model label -> 0 (the merged class); a detection is labelled the first model class mapped.
        self.group_class_labels = torch.tensor([model_classes.index(next(n for n in model_classes
                                                                          if class_map[n] == merged[0]))])
        self.kp_loc_weight, self.kp_visibility_weight = kp_loc_weight, kp_visibility_weight
        self.register_buffer("kp_code_weights", torch.tensor(list(kp_code_weights)), persistent=False)
        self.register_buffer("kp_visibility_code_weights", torch.tensor(list(kp_visibility_code_weights)),
                             persistent=False)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, bev: SparseBEV) -> SparseCenterPredictions:
        """The outputs at the occupied cells, plus ``center`` and ``center_z`` (views of channel 0 of
        ``loc_x``, ``loc_y``, ``loc_z``)."""
        pred = super().forward(bev)
        out = pred.groups[0]
        out["center"] = torch.cat([out["loc_x"][:, :1], out["loc_y"][:, :1]], dim=1)
        out["center_z"] = out["loc_z"][:, :1]
        return pred

    # --- targets ---------------------------------------------------------------------------------
    def merged(self, annotations: Sequence[Annotations3D]) -> list[Annotations3D]:
        """``annotations`` with every label mapped to the merged class (label 0)."""
        return [replace(a, labels=torch.zeros_like(a.labels)) for a in annotations]

    @torch.no_grad()
    def keypoint_targets(self, pred: SparseCenterPredictions, annotations: Sequence[Annotations3D],
                         inds: torch.Tensor, mask: torch.Tensor) -> KeypointSlotTargets:
        """Keypoint targets at the slots of the merged group's targets (``inds``, ``mask``: (B,
        num_max_objs)); slot k of a frame is its k-th box."""
        device = pred.coords.device
        location = torch.zeros(*inds.shape, NUM_KEYPOINTS, 3, device=device)
        visibility = torch.zeros(*inds.shape, NUM_KEYPOINTS, device=device)
        low, size = _f32(pred.grid.point_cloud_range[:2], device), _f32(pred.grid.voxel_size[:2], device)
        rows = self._frame_rows(pred).gather(1, inds)
        for b, ann in enumerate(annotations):
            n = min(len(ann), self.num_max_objs)
            if n == 0:
                continue
            if ann.keypoints is None:
                kp = ann.boxes.tensor[:n, None, :3].expand(-1, NUM_KEYPOINTS, -1)
                vis = torch.zeros(n, NUM_KEYPOINTS)
            else:
                kp, vis = ann.keypoints[:n], ann.keypoint_visibility[:n]
            kp = kp.to(device=device, dtype=torch.float32)
            cell = pred.coords[rows[b, :n]][:, [2, 1]]  # (n, 2) (x, y) index of each slot's cell
            valid = mask[b, :n].bool()[:, None, None]
            offset = (kp[..., :2] - low) / size / pred.stride - cell[:, None, :]
            location[b, :n] = torch.cat([offset, kp[..., 2:3]], dim=-1) * valid
            visibility[b, :n] = vis.to(device=device, dtype=torch.float32) * valid[..., 0]
        return KeypointSlotTargets(location, visibility)

    # --- losses ----------------------------------------------------------------------------------
    def loss(
        self,
        pred: SparseCenterPredictions,
        annotations: list[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> VoxelKPReferenceLosses:
        """The authors' ``get_loss`` on the merged outputs (module docstring).

        Args:
            reduce_counts: maps (positives, targets) counts to divisors (DDP: their mean over ranks).
        """
        target = self.assign_targets(pred, self.merged(annotations))[0]
        kp = self.keypoint_targets(pred, annotations, target.inds, target.mask)
        counts = torch.stack([target.heatmap.eq(1).sum(), target.mask.sum()]).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        num = counts[1].clamp(min=1.0)
        out = pred.groups[0]
        rows = self._frame_rows(pred).gather(1, target.inds)  # (B, S) row in pred of each slot's cell
        slot = target.mask.float()[..., None]

        def l1(values: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
            """(D,) L1 per code of (M, D) ``values`` at the slots against (B, S, D), over the targets."""
            return (values[rows] * slot - goal * slot).abs().sum(dim=(0, 1)) / num

        prob = out["hm"].float().sigmoid().clamp(HEATMAP_CLAMP, 1 - HEATMAP_CLAMP)
        # The authors pair row i of the predictions with row i of the frames' targets concatenated
        # frame by frame: the same cell only where the cells are grouped by frame, which spconv's
        # regular conv before the head does not guarantee. Reproduced.
        batch = pred.coords[:, 0].long()
        by_frame = torch.cat([torch.nonzero(batch == b).squeeze(1) for b in range(pred.batch_size)])
        heatmap = focal_loss_centernet(prob, target.heatmap[by_frame], counts[0]) * self.cls_weight
        code = torch.cat([out[name] for name in self.head_order], dim=1).float()
        regression = (l1(code, target.boxes) * self.code_weights).sum() * self.loc_weight
        valid = target.mask.bool()
        box = self._boxes(out, pred, rows[valid], for_loss=True)
        gt = target.gt_boxes[valid]
        with torch.no_grad():
            iou_target = 2 * iou_3d_aligned(box.detach(), gt) - 1
        iou = (out["iou"][rows[valid], 0].float() - iou_target).abs().sum() / (counts[1] + 1e-4)
        iou_regression = (1.0 - diou_3d_axis_aligned(box, gt)).sum() / (counts[1] + 1e-4) * self.iou_weight
        axes = []
        for axis, name in enumerate(("loc_x", "loc_y", "loc_z")):
            per_keypoint = l1(out[name][:, 1:].float(), kp.location[..., axis])
            axes.append((per_keypoint * self.kp_code_weights).sum() * self.kp_loc_weight)
        keypoint = sum(axes) / 3
        visibility = (l1(out["kp_vis"].float(), kp.visibility) * self.kp_visibility_code_weights).mean()
        visibility = visibility * self.kp_visibility_weight
        predicted = torch.stack([out[name][:, 1:].float() for name in ("loc_x", "loc_y", "loc_z")], dim=-1)
        bone = self.bone_loss(predicted[rows] * slot[..., None], kp.location * slot[..., None])
        bone = bone.mean() * self.kp_visibility_weight
        total = bone + heatmap + (regression + keypoint) / 2 + visibility + iou + iou_regression
        return VoxelKPReferenceLosses(total, *(t.detach() for t in (heatmap, regression, iou, iou_regression,
                                                                      keypoint, visibility, bone)))

    @staticmethod
    def bone_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(13,) |mean predicted - mean target bone length| over all slots.

        Args:
            predicted, target: (B, S, 14, 3) keypoints at the slots (zeros at empty slots).
        """
        joints, parents = list(BONE_JOINTS), list(BONE_PARENTS)
        p, t = predicted.flatten(0, 1), target.flatten(0, 1)
        p_bone = torch.norm(p[:, joints] - p[:, parents], dim=-1)
        t_bone = torch.norm(t[:, joints] - t[:, parents], dim=-1)
        return (p_bone.mean(dim=0) - t_bone.mean(dim=0)).abs()

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: SparseCenterPredictions) -> list[KeypointDetections3D]:
        """Detections with keypoints per frame, scores descending, labels in the model's classes."""
        out = pred.groups[0]
        device = pred.coords.device
        low, size = _f32(pred.grid.point_cloud_range[:2], device), _f32(pred.grid.voxel_size[:2], device)
        results = []
        for boxes, scores, classes, iou, rows in self._decode_group(out, pred, self._rows_per_frame(pred)):
            boxes, scores, classes, rows = self._rectify_and_nms(boxes, scores, classes, iou, rows)
            order = scores.argsort(descending=True, stable=True)
            boxes, scores, classes, rows = boxes[order], scores[order], classes[order], rows[order]
            index = pred.coords[rows]
            kp_x = (index[:, 2:3] + out["loc_x"][rows, 1:].float()) * pred.stride * size[0] + low[0]
            kp_y = (index[:, 1:2] + out["loc_y"][rows, 1:].float()) * pred.stride * size[1] + low[1]
            keypoints = torch.stack([kp_x, kp_y, out["loc_z"][rows, 1:].float()], dim=-1)
            query = (index[:, [2, 1]].float() + 0.5) * size * pred.stride + low
            results.append(KeypointDetections3D(
                boxes=Boxes3D(boxes), scores=scores, labels=self.group_class_labels[classes], query_xy=query,
                keypoints=keypoints, keypoint_scores=out["kp_vis"][rows].float().clamp(0, 1),
            ))
        return results

    def extra_repr(self) -> str:
        return f"model_classes={list(self.model_classes)}, merged={self.class_groups[0][0]!r}"
