"""Focal sparse convolution (Chen et al., "Focal Sparse Convolutional Networks for 3D Object
Detection", CVPR 2022) and OpenPCDet's ``VoxelBackBone8xFocal`` (``backbones_3d/spconv_backbone_focal.py``
and ``focal_sparse_conv/``, commit 8caccce), LiDAR only.

A focal sparse conv predicts, at every input voxel, a cubic importance map: one logit for the voxel
itself and one per other offset of a ``k x k x k`` kernel (a submanifold 3x3x3 conv with ``k**3``
outputs). The most important voxels (the top ``threshold`` fraction of each frame, or those above
``threshold``) are *dilated*: every neighbour whose offset importance reaches ``threshold`` joins the
active set with zero features. The other voxels stay as they are. A submanifold conv of kernel ``k``
then runs on the union, followed by BatchNorm and ReLU. A dilated voxel's own features are scaled by
the mean of 1 and the importances of the offsets that point at it from important voxels (the
reference's merge of duplicates), which is how the offset importances receive gradients.

Training adds a loss on the voxel importance: a focal loss (gamma 2) on the two-class softmax of
``(1 - p, p)``, ``p = sigmoid(logit)``, with target "the voxel lies in a ground-truth box", averaged
over both classes of every voxel. A layer keeps its last input's importance
(:attr:`FocalSparseConv.last_importance`) so the detector can compute that loss from the annotations
after the forward (``auxiliary_losses`` of the backbones, read by
:class:`~voxsparse.models.detectors.sparse_detector.SparseDetector`).

``openpcdet_rules`` reproduces three details of the reference that the design does not share:

- voxels are placed for the targets at ``index * stride * size + origin`` with OpenPCDet's default
  geometry (KITTI's: 0.05 x 0.05 x 0.1 m from (0, -40, -3) m), which ``VoxelBackBone8xFocal`` never
  overrides, whatever the dataset; the design uses the voxel centres on the model's grid;
- a dilated voxel with index 0 on any axis is dropped (its bound check is ``> 0``);
- the box test is roiaware's ``points_in_boxes_gpu``: float32, closed in z, open in x and y by a
  1e-5 m margin outside the faces; the design uses :func:`voxsparse.geometry.points_in_boxes`.

Known difference: the reference merges duplicate voxels by the key ``z * max(y) * max(x) + y * max(x)
+ x`` (maxima over the voxels present; sorted as float32), which also merges distinct voxels
(``(z, y, max x)`` with ``(z, y + 1, 0)``, ``(z, max y, x)`` with ``(z + 1, 0, x)``) and stops
being exact above 2**24. Here duplicates are found by exact coordinates. Both agree wherever no
voxel has index 0 in y or x and the key stays below 2**24, as in the parity fixtures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.geometry import points_in_boxes
from voxsparse.models.backbones.resnet3d import BN_EPS as REFERENCE_BN_EPS
from voxsparse.models.backbones.resnet3d import BN_MOMENTUM as REFERENCE_BN_MOMENTUM
from voxsparse.models.backbones.resnet3d import VoxelResBackBone8x, height_compression
from voxsparse.models.keys import KeyPair, identical_keys
from voxsparse.models.layers import BN_EPS, BN_MOMENTUM
from voxsparse.ops.scatter import group_counts
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.ops.sparse_utils import grid_offsets, unique_coords
from voxsparse.structures import Annotations3D, SparseBEV, SparseVoxels, VoxelGrid

#: OpenPCDet's ``FocalSparseConv`` defaults for placing voxels, (x, y, z): metres per voxel and the
#: position of index 0 (KITTI's grid).
OPENPCDET_VOXEL_SIZE = (0.05, 0.05, 0.1)
OPENPCDET_ORIGIN = (0.0, -40.0, -3.0)
#: roiaware's ``points_in_boxes_gpu`` counts points up to this far outside a box's x and y faces.
OPENPCDET_BOX_MARGIN = 1e-5
#: Focusing parameter and probability clamp of the importance loss.
GAMMA = 2.0
PROB_EPS = 1e-7


@dataclass
class ImportanceRecord:
    """A focal layer's voxel importance on its last input, for the training loss.

    Attributes:
        coords: (M, 4) int (batch, z, y, x) of the layer's input voxels.
        logits: (M,) voxel-importance logits.
        stride: the input's voxel size in grid voxels.
        grid: the model's input grid (None where the layer places voxels by OpenPCDet's rules).
    """

    coords: torch.Tensor
    logits: torch.Tensor
    stride: int
    grid: VoxelGrid | None


def importance_focal_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The focal loss of Focals Conv on voxel importance.

    Args:
        logits: (M,) voxel-importance logits.
        targets: (M,) bool, True for voxels inside a box.

    Returns:
        () the mean over the M x 2 entries of ``-y log(s) (1 - s)**2``, ``s`` the softmax of
        ``(1 - p, p)`` (clamped to [1e-7, 1 - 1e-7]), ``p = sigmoid(logits)``, ``y`` one-hot.
    """
    if len(logits) == 0:
        return logits.sum()
    p = torch.sigmoid(logits.float())
    probs = F.softmax(torch.stack([1 - p, p], dim=-1), dim=-1).clamp(PROB_EPS, 1 - PROB_EPS)
    picked = probs.gather(1, targets.long()[:, None])[:, 0]
    return -(torch.log(picked) * (1 - picked) ** GAMMA).sum() / (2 * len(p))


def in_boxes_openpcdet(points: torch.Tensor, boxes: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Which points lie in any box by roiaware's ``points_in_boxes_gpu`` rule.

    In float32: the offset from the box centre rotated by ``-heading``; inside when ``|dz| <= dz/2``
    and ``|local x| < dx/2 + 1e-5``, ``|local y| < dy/2 + 1e-5`` (half sizes and margin in float64,
    as the kernel's ``/ 2.0`` promotes them).

    Args:
        points: (P, 3) x, y, z.
        boxes: (K, >=7) boxes (x, y, z, dx, dy, dz, heading, ...).
        chunk: (point, box) pairs tested at once.

    Returns:
        (P,) bool.
    """
    points, boxes = points.float(), boxes[:, :7].float()
    inside = torch.zeros(len(points), dtype=torch.bool, device=points.device)
    if len(points) == 0 or len(boxes) == 0:
        return inside
    cos, sin = torch.cos(-boxes[:, 6]), torch.sin(-boxes[:, 6])
    half = boxes[:, 3:6].double() / 2.0
    margin = torch.tensor(OPENPCDET_BOX_MARGIN, dtype=torch.float32).double()
    step = max(1, chunk // len(boxes))
    for start in range(0, len(points), step):
        shift = points[start : start + step, None, :] - boxes[None, :, :3]  # (p, K, 3)
        local_x = shift[..., 0] * cos + shift[..., 1] * -sin
        local_y = shift[..., 0] * sin + shift[..., 1] * cos
        hit = (shift[..., 2].abs().double() <= half[:, 2]) \
            & (local_x.abs().double() < half[:, 0] + margin) & (local_y.abs().double() < half[:, 1] + margin)
        inside[start : start + step] = hit.any(1)
    return inside


class FocalSparseConv(spnn.SparseModule):
    """A focal sparse convolution (see the module docstring), ``(M, in) -> (M', out)`` voxels.

    Submodule names are the reference's (``conv``, ``bn1``, ``conv_imp``, ``conv_enlarge``), so
    state-dict names equal OpenPCDet's relative to the layer.

    Args:
        in_channels, out_channels: feature channels.
        voxel_stride: the input's voxel size in grid voxels (1, 2, 4, ...), for placing voxels.
        kernel_size: the output conv's kernel and the dilation neighbourhood (odd).
        topk: True: the ``threshold`` fraction of each frame's voxels with the highest importance
            are dilated (``floor(n * threshold)`` of n); False: those with importance above it.
        threshold: that fraction or level; an offset is dilated where its importance reaches it.
        mask_multi: multiply every voxel's features by its importance before the conv.
        skip_mask_kernel: leave dilated voxels' features unscaled by the offset importances.
        enlarge_voxel_channels: > 0: importance is predicted from a submanifold 3x3x3 conv to this
            many channels (+ BatchNorm + ReLU) of the input instead of the input itself.
        indice_key: spconv key of the output conv (the importance convs add ``_imp``, ``_enlarge``).
        bn_eps, bn_momentum: the BatchNorms' settings (OpenPCDet's backbone: 1e-3, 0.01).
        openpcdet_rules: OpenPCDet's placement, border and box rules (module docstring).

    ``forward(x, grid)``: ``x`` a ``SparseConvTensor``; ``grid`` the model's input grid (needed for
    the loss unless ``openpcdet_rules``). Output voxels: the input's and the dilated ones, sorted by
    (batch, z, y, x).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        voxel_stride: int,
        kernel_size: int = 3,
        topk: bool = True,
        threshold: float = 0.5,
        mask_multi: bool = False,
        skip_mask_kernel: bool = False,
        enlarge_voxel_channels: int = 0,
        indice_key: str = "focal",
        bn_eps: float = BN_EPS,
        bn_momentum: float = BN_MOMENTUM,
        openpcdet_rules: bool = False,
    ) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size, got {kernel_size}")
        if voxel_stride < 1:
            raise ValueError(f"voxel_stride: expected >= 1, got {voxel_stride}")
        self.voxel_stride = voxel_stride
        self.topk = topk
        self.threshold = threshold
        self.mask_multi = mask_multi
        self.skip_mask_kernel = skip_mask_kernel
        self.openpcdet_rules = openpcdet_rules
        self.conv = spnn.SubMConv3d(in_channels, out_channels, kernel_size, bias=False, indice_key=indice_key)
        self.bn1 = nn.BatchNorm1d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.conv_enlarge = None
        if enlarge_voxel_channels > 0:
            self.conv_enlarge = spnn.SparseSequential(
                spnn.SubMConv3d(in_channels, enlarge_voxel_channels, 3, padding=1, bias=False,
                                indice_key=indice_key + "_enlarge"),
                nn.BatchNorm1d(enlarge_voxel_channels, eps=bn_eps, momentum=bn_momentum),
                nn.ReLU(inplace=True),
            )
        predictor = enlarge_voxel_channels if enlarge_voxel_channels > 0 else in_channels
        self.conv_imp = spnn.SubMConv3d(predictor, kernel_size**3, 3, padding=1, bias=False, indice_key=indice_key + "_imp")
        offsets = grid_offsets(kernel_size, 3)
        # The last importance channel is the voxel's own; the others follow the (z, y, x) offsets
        # in lexicographic order without the centre.
        self.register_buffer("offsets", offsets[(offsets != 0).any(1)], persistent=False)
        self.last_importance: ImportanceRecord | None = None

    def forward(self, x: SparseConvTensor, grid: VoxelGrid | None = None) -> SparseConvTensor:
        predictor = x if self.conv_enlarge is None else self.conv_enlarge(x)
        logits = self.conv_imp(predictor).features
        self.last_importance = ImportanceRecord(x.indices, logits[:, -1], self.voxel_stride, grid)
        coords, features = self._dilate(x, logits)
        out = self.conv(SparseConvTensor(features, coords, x.spatial_shape, x.batch_size))
        return out.replace_feature(self.relu(self.bn1(out.features)))

    def _important(self, p: torch.Tensor, batch: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(M,) bool: the voxels to dilate, from their importance ``p`` (M,) and frame ``batch`` (M,)."""
        if not self.topk:
            return p > self.threshold
        order = torch.sort(p, descending=True, stable=True).indices
        order = order[torch.sort(batch[order], stable=True).indices]  # by frame, importance descending
        counts = group_counts(batch, batch_size)
        starts = counts.cumsum(0) - counts
        rank = torch.empty_like(order)
        rank[order] = torch.arange(len(order), device=p.device) - starts[batch[order]]
        keep = (counts.double() * self.threshold).floor().long()  # as Python's int(n * threshold)
        return rank < keep[batch]

    def _dilate(self, x: SparseConvTensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of the input and the dilated voxels: (U, 4) int32 sorted coords, (U, C) features."""
        p = torch.sigmoid(logits[:, -1])
        q = torch.sigmoid(logits[:, :-1])
        features = x.features * p[:, None] if self.mask_multi else x.features
        coords = x.indices.long()
        batch = coords[:, 0]
        important = self._important(p, batch, x.batch_size)
        rows = important.nonzero()[:, 0]
        shape = torch.as_tensor(list(x.spatial_shape), device=coords.device)
        candidates = coords[rows, None, 1:] + self.offsets[None].to(coords.device)  # (F, K, 3)
        low = 1 if self.openpcdet_rules else 0
        q_rows = q[rows]
        valid = (q_rows >= self.threshold) & ((candidates >= low) & (candidates < shape)).all(-1)
        row, offset = valid.nonzero(as_tuple=True)
        added = torch.cat([batch[rows[row], None], candidates[row, offset]], dim=1)
        cells, inverse = unique_coords(torch.cat([coords, added]), (x.batch_size, *x.spatial_shape))
        own = inverse[: len(coords)]
        if not self.skip_mask_kernel:
            # A dilated voxel's features times the mean of 1 and the importances pointing at it.
            target = inverse[len(coords):]
            weights = q_rows[row, offset]
            sums = weights.new_zeros(len(cells)).index_add_(0, target, weights)
            counts = weights.new_zeros(len(cells)).index_add_(0, target, torch.ones_like(weights))
            scale = (1 + sums[own]) / (1 + counts[own])
            features = torch.where(important[:, None], features * scale[:, None].to(features.dtype), features)
        out = features.new_zeros(len(cells), features.shape[1]).index_copy_(0, own, features)
        return cells, out

    def importance_loss(self, boxes: Sequence[torch.Tensor]) -> torch.Tensor:
        """The importance loss of the last forward (:func:`importance_focal_loss`), which it consumes.

        Args:
            boxes: per frame, (K, >=7) ground-truth boxes.

        Returns:
            () loss; 0 when there was no forward since the last call (or no voxel).
        """
        record, self.last_importance = self.last_importance, None
        if record is None or len(record.logits) == 0:
            return self.conv_imp.weight.new_zeros(())
        positions = self._positions(record)
        targets = torch.zeros(len(positions), dtype=torch.bool, device=positions.device)
        frames = record.coords[:, 0].long()
        for b, frame_boxes in enumerate(boxes):
            rows = (frames == b).nonzero()[:, 0]
            if len(rows) == 0 or len(frame_boxes) == 0:
                continue
            frame_boxes = frame_boxes.to(positions.device)
            if self.openpcdet_rules:
                targets[rows] = in_boxes_openpcdet(positions[rows], frame_boxes)
            else:
                targets[rows] = points_in_boxes(positions[rows], frame_boxes[:, :7].to(positions.dtype)).any(1)
        return importance_focal_loss(record.logits, targets)

    def _positions(self, record: ImportanceRecord) -> torch.Tensor:
        """(M, 3) float32 x, y, z of the recorded voxels, where the loss places them."""
        index = record.coords[:, [3, 2, 1]]
        if self.openpcdet_rules:
            size = torch.tensor(OPENPCDET_VOXEL_SIZE, device=index.device)
            origin = torch.tensor(OPENPCDET_ORIGIN, device=index.device)
            return (index * record.stride) * size + origin
        if record.grid is None:
            raise ValueError(f"{type(self).__name__}: the importance loss needs the grid (forward(x, grid))")
        size = torch.tensor(record.grid.voxel_size, dtype=torch.float64, device=index.device)
        origin = torch.tensor(record.grid.point_cloud_range[:3], dtype=torch.float64, device=index.device)
        return ((index.double() * record.stride + 0.5) * size + origin).float()


def focal_layers(module: nn.Module) -> list[FocalSparseConv]:
    """Every focal sparse conv inside ``module``."""
    return [m for m in module.modules() if isinstance(m, FocalSparseConv)]


def importance_losses(module: nn.Module, annotations: Sequence[Annotations3D]) -> dict[str, torch.Tensor]:
    """``{"importance": sum of the focal layers' importance losses}`` of ``module``'s last forward,
    or ``{}`` where it has no focal layer."""
    layers = focal_layers(module)
    if not layers:
        return {}
    boxes = [a.boxes.tensor for a in annotations]
    return {"importance": torch.stack([layer.importance_loss(boxes) for layer in layers]).sum()}


def _bn(channels: int) -> nn.BatchNorm1d:
    return nn.BatchNorm1d(channels, eps=REFERENCE_BN_EPS, momentum=REFERENCE_BN_MOMENTUM)


def _block(in_channels: int, out_channels: int, key: str, stride: int = 1,
           padding: int | tuple[int, int, int] = 1) -> nn.Module:
    """OpenPCDet's ``post_act_block``: a submanifold (stride 1) or strided 3x3x3 conv, BatchNorm, ReLU."""
    if stride == 1:
        conv = spnn.SubMConv3d(in_channels, out_channels, 3, bias=False, indice_key=key)
    else:
        conv = spnn.SparseConv3d(in_channels, out_channels, 3, stride=stride, padding=padding, bias=False,
                                 indice_key=key)
    return spnn.SparseSequential(conv, _bn(out_channels), nn.ReLU(inplace=True))


class VoxelBackBone8xFocal(nn.Module):
    """OpenPCDet's ``VoxelBackBone8xFocal`` (LiDAR only) followed by height compression.

    SECOND's plain sparse backbone (``VoxelBackBone8x``: a 16-channel submanifold stem, stages of
    16, 32, 64, 64 channels, the last three opened by a stride-2 conv, ``conv_out`` a (3, 1, 1) conv
    of stride (2, 1, 1) to 128 channels) with a focal sparse conv closing each of the first three
    stages (strides 1, 2, 4). The module layout is the reference's, so state-dict names are its own
    (relative to ``backbone_3d.``). The input grid gets one more z cell on top and z goes as in
    :class:`~voxsparse.models.backbones.resnet3d.VoxelResBackBone8x` (41 -> 21 -> 11 -> 5 -> 2 on
    nuScenes' 40 z voxels); BatchNorm eps 1e-3, momentum 0.01.

    Args:
        in_channels: voxel feature channels from the voxel encoder.
        num_bev_features: channels of the height-compressed BEV, 128 x the output's z cells.
        topk, threshold, kernel_size, mask_multi, skip_mask_kernel, enlarge_voxel_channels: the
            focal layers' settings (OpenPCDet's ``TOPK``, ``THRESHOLD``, ``KERNEL_SIZE``,
            ``MASK_MULTI``, ``SKIP_MASK_KERNEL``, ``ENLARGE_VOXEL_CHANNELS``; its defaults).
        openpcdet_rules: the focal layers' OpenPCDet placement, border and box rules (True: as the
            reference computes; False: voxel centres on the model's grid).

    Input: ``SparseVoxels``. Output: ``SparseBEV`` at stride 8 with ``num_bev_features`` features.
    Training: :meth:`auxiliary_losses` gives the importance loss of the last forward.
    """

    stride = 8
    #: Channels of ``conv_out``.
    OUT_CHANNELS = 128

    def __init__(
        self,
        in_channels: int,
        num_bev_features: int = 256,
        topk: bool = True,
        threshold: float = 0.5,
        kernel_size: int = 3,
        mask_multi: bool = False,
        skip_mask_kernel: bool = False,
        enlarge_voxel_channels: int = 0,
        openpcdet_rules: bool = True,
    ) -> None:
        super().__init__()
        if num_bev_features % self.OUT_CHANNELS:
            raise ValueError(f"num_bev_features: expected a multiple of {self.OUT_CHANNELS}, got {num_bev_features}")
        self.out_channels = num_bev_features

        def focal(channels: int, stride: int, key: str) -> FocalSparseConv:
            return FocalSparseConv(
                channels, channels, stride, kernel_size=kernel_size, topk=topk, threshold=threshold,
                mask_multi=mask_multi, skip_mask_kernel=skip_mask_kernel,
                enlarge_voxel_channels=enlarge_voxel_channels, indice_key=key, bn_eps=REFERENCE_BN_EPS,
                bn_momentum=REFERENCE_BN_MOMENTUM, openpcdet_rules=openpcdet_rules,
            )

        self.conv_input = spnn.SparseSequential(
            spnn.SubMConv3d(in_channels, 16, 3, padding=1, bias=False, indice_key="subm1"), _bn(16), nn.ReLU(inplace=True)
        )
        self.conv1 = spnn.SparseSequential(_block(16, 16, "subm1"), focal(16, 1, "focal1"))
        self.conv2 = spnn.SparseSequential(
            _block(16, 32, "spconv2", stride=2), _block(32, 32, "subm2"), _block(32, 32, "subm2"), focal(32, 2, "focal2")
        )
        self.conv3 = spnn.SparseSequential(
            _block(32, 64, "spconv3", stride=2), _block(64, 64, "subm3"), _block(64, 64, "subm3"), focal(64, 4, "focal3")
        )
        self.conv4 = spnn.SparseSequential(
            _block(64, 64, "spconv4", stride=2, padding=(0, 1, 1)), _block(64, 64, "subm4"), _block(64, 64, "subm4")
        )
        self.conv_out = spnn.SparseSequential(
            spnn.SparseConv3d(64, self.OUT_CHANNELS, (3, 1, 1), stride=(2, 1, 1), padding=0, bias=False,
                              indice_key="spconv_down2"),
            _bn(self.OUT_CHANNELS),
            nn.ReLU(inplace=True),
        )

    def forward(self, voxels: SparseVoxels) -> SparseBEV:
        # The same strides and paddings as VoxelResBackBone8x, hence its input and output shapes.
        d, h, w = VoxelResBackBone8x.output_shape(voxels.grid)
        if self.OUT_CHANNELS * d != self.out_channels:
            raise ValueError(
                f"{type(self).__name__}: the grid's {voxels.grid.spatial_shape[0]} z voxels leave {d} z cells, "
                f"{self.OUT_CHANNELS * d} BEV channels, but num_bev_features is {self.out_channels}"
            )
        for layer in focal_layers(self):  # no stale importance from an earlier batch
            layer.last_importance = None
        if len(voxels) == 0:  # spconv cannot convolve an empty tensor; there is nothing to compute
            return SparseBEV(voxels.coords.new_zeros(0, 3), voxels.features.new_zeros(0, self.out_channels), (h, w),
                             self.stride, voxels.grid, voxels.batch_size)
        shape = VoxelResBackBone8x.input_shape(voxels.grid)
        x = SparseConvTensor(voxels.features, voxels.coords.int(), shape, voxels.batch_size)
        x = self.conv_input(x)
        for stage in (self.conv1, self.conv2, self.conv3, self.conv4):
            for module in stage.children():
                x = module(x, voxels.grid) if isinstance(module, FocalSparseConv) else module(x)
        out = self.conv_out(x)
        return height_compression(out.indices, out.features, (d, h, w), voxels.grid, voxels.batch_size)

    def auxiliary_losses(self, annotations: Sequence[Annotations3D]) -> dict[str, torch.Tensor]:
        """``{"importance": ...}``: the focal layers' importance losses of the last forward, summed."""
        return importance_losses(self, annotations)

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry; the layout is the reference's, so the names are equal."""
        return identical_keys(self)
