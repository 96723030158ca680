"""TransFusion's LiDAR head as the DSVT repository computes it (DSVT's nuScenes pillar model).

Bai et al., "TransFusion: Robust LiDAR-Camera Fusion for 3D Object Detection with Transformers"
(CVPR 2022), in the form of the DSVT repository's ``pcdet/models/dense_heads/transfusion_head.py``
with ``tools/cfgs/dsvt_models/dsvt_plain_1f_onestage_nusences.yaml``. The head works on a dense BEV
map in **(x, y) layout**: the (B, C, ny, nx) map is transposed to (B, C, nx, ny) before the first
conv, so its trained 3x3 kernels expect that layout, and a cell's flat index is ``ix * ny + iy``.

1. A 3x3 conv, then a heatmap branch (3x3 conv + BatchNorm + ReLU, 3x3 conv) gives dense class
   logits. Its sigmoid, kept only where it equals its ``nms_kernel_size`` local max (cells within
   ``nms_kernel_size // 2`` of the border are never maxima; classes in ``every_cell_classes``,
   pedestrians and traffic cones on nuScenes, skip the local max), gives the top ``num_proposals``
   (class, cell) pairs over all classes: the queries.
2. A query is its cell's feature plus a learned embedding of its class (1x1 conv of a one-hot).
   Positions are cell centres in cells, ``(ix + 0.5, iy + 0.5)``, embedded by a small MLP
   (1x1 conv, BatchNorm, ReLU, 1x1 conv).
3. One transformer decoder layer. Each query is its own sequence of length one, so its
   self-attention reduces to a linear map of itself; its cross-attention reads the
   ``(2 * key_radius + 1)^2`` cells around it (41 x 41 on nuScenes). Key cells are addressed by
   flat index ``(ix + dx) * ny + (iy + dy)``; only indices outside ``[0, nx * ny)`` are masked, so
   keys past the y border wrap to the neighbouring x row, as in the reference.
4. Prediction FFNs (1x1 conv + BatchNorm + ReLU, 1x1 conv) per output: centre (cells, added to the
   query position), z of the box *top*, log dims, (sin, cos) heading, velocity, IoU, class logits.

Training: each frame's proposals are matched one-to-one to its boxes by
:class:`~voxsparse.models.heads.transfusion_assigner.HungarianAssigner`; losses are a sigmoid
focal classification loss over all proposals (background = no class), an L1 box loss with code
weights at matched proposals, a Gaussian focal loss on the dense heatmap (CenterNet Gaussians, at
least ``min_radius`` cells), and an L1 loss of the IoU branch against ``2 * IoU - 1`` of each
matched box (those with IoU > 0). Like the reference, the IoU target is taken from boxes whose z
is the box top read as a centre.

Decoding: score = sigmoid(class logit) x the proposal's heatmap peak, for the proposal's class;
scores > ``score_threshold`` and centres inside ``post_center_range`` are kept; with an IoU branch
the score becomes ``score^(1 - a) * iou^a``; classes listed in ``nms_thresholds`` go through
rotated BEV NMS (each class on its own), the others are kept as they are.

Class order: the heatmap channels follow ``channel_classes`` (the reference's CLASS_NAMES, so that
its weights load unchanged); labels in and out follow ``class_names`` (the model's). The two must be
permutations of one another.

Differences from the reference. At inputs its configs never produce: it indexes keys and targets
with ``nx`` where ``ny`` belongs and so needs square maps (nuScenes: 180 x 180), this head takes any
shape; it fails on a frame without ground truth, this head treats every proposal as background
there; it needs 128 hidden channels, this head any width. Box overlaps (matching cost, IoU target,
NMS) are exact here (float64 polygons), float32 with a 1 cm corner margin in its CUDA kernels.
Detections come sorted by score (the reference keeps proposal order), and the proposals' classes
travel in the predictions instead of in the module. In eval mode the key position embedding, a
pointwise map there, is computed once per cell and gathered, rather than once per key.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from voxsparse.models.heads.center_head import gaussian_radius
from voxsparse.models.heads.transfusion_assigner import HungarianAssigner
from voxsparse.models.keys import KeyPair, prefixed
from voxsparse.ops.boxes import iou_3d_aligned, nms_bev
from voxsparse.structures import Annotations3D, Boxes3D, DenseBEV, Detections3D, SparseBEV

#: Initial bias of the proposals' class logits (sigmoid ~ 0.1), as the reference.
CLASS_BIAS_INIT = -2.19
#: The prediction FFN outputs in the reference's order, with their channels (the class logits last).
BOX_OUTPUTS = (("center", 2), ("height", 1), ("dim", 3), ("rot", 2), ("vel", 2), ("iou", 1))


@dataclass
class TransFusionPredictions:
    """Head outputs of B frames with P proposals each (channels first, as the reference's).

    Attributes:
        center: (B, 2, P) box centre (x, y) in feature cells from the range's (x0, y0) corner.
        height: (B, 1, P) z of the box top, metres.
        dim: (B, 3, P) log of (dx, dy, dz), metres.
        rot: (B, 2, P) (sin, cos) of the heading.
        vel: (B, 2, P) (vx, vy) m/s, or None.
        iou: (B, 1, P) predicted 3D IoU mapped to [-1, 1], or None.
        heatmap: (B, C, P) class logits of the proposals (C heatmap channels).
        query_heatmap_score: (B, C, P) the dense heatmap's local-max-filtered sigmoid at each
            proposal's cell (0 for the classes not at a local maximum there).
        query_channel: (B, P) int64 heatmap channel (class) each proposal was drawn from.
        query_cell: (B, P) int64 flat cell index ``ix * ny + iy`` of each proposal.
        dense_heatmap: (B, C, nx, ny) dense class logits.
        point_cloud_range: (x0, y0, z0, x1, y1, z1) metres, the map's corner at (x0, y0);
        voxel_xy: (x, y) voxel size, metres; stride: voxels per feature cell.
    """

    center: torch.Tensor
    height: torch.Tensor
    dim: torch.Tensor
    rot: torch.Tensor
    vel: torch.Tensor | None
    iou: torch.Tensor | None
    heatmap: torch.Tensor
    query_heatmap_score: torch.Tensor
    query_channel: torch.Tensor
    query_cell: torch.Tensor
    dense_heatmap: torch.Tensor
    point_cloud_range: tuple[float, ...]
    voxel_xy: tuple[float, float]
    stride: int

    def box_codes(self) -> torch.Tensor:
        """(B, P, 8 or 10) regression outputs in target order: centre, top z, log dims, sin, cos[, v]."""
        parts = [self.center, self.height, self.dim, self.rot] + ([self.vel] if self.vel is not None else [])
        return torch.cat(parts, dim=1).permute(0, 2, 1)


@dataclass
class TransFusionTargets:
    """Training targets of B frames, P proposals each.

    Attributes:
        labels: (B, P) int64 heatmap channel of the matched box's class, C for background.
        positive: (B, P) bool, proposals matched to a box.
        box_codes: (B, P, 8 or 10) encoded matched boxes (zeros elsewhere).
        matched_iou: (B, P) 3D IoU of each matched pair (assigner convention), 0 elsewhere.
        heatmap: (B, C, nx, ny) Gaussian targets of the dense heatmap, 1 at box centres.
    """

    labels: torch.Tensor
    positive: torch.Tensor
    box_codes: torch.Tensor
    matched_iou: torch.Tensor
    heatmap: torch.Tensor


@dataclass
class TransFusionLosses:
    """Loss terms of one batch, weighted as they enter ``total`` (the one back-propagated; the
    others are detached). ``matched_iou`` is the mean IoU of matched pairs over frames (a statistic)."""

    total: torch.Tensor
    heatmap: torch.Tensor
    classification: torch.Tensor
    regression: torch.Tensor
    iou: torch.Tensor
    matched_iou: torch.Tensor
    num_positives: int


def _weight_bias_pairs(prefix: str, theirs: str, bias: bool = True) -> list[KeyPair]:
    names = ("weight", "bias") if bias else ("weight",)
    return [KeyPair(f"{prefix}.{n}", f"{theirs}.{n}") for n in names]


def _batch_norm_pairs(prefix: str, theirs: str) -> list[KeyPair]:
    names = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    return [KeyPair(f"{prefix}.{n}", f"{theirs}.{n}") for n in names]


def _ffn(in_channels: int, hidden: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs - 1`` x (1x1 conv with bias + BatchNorm + ReLU), then a 1x1 output conv, on (B, C, P)."""
    layers: list[nn.Module] = [
        nn.Sequential(nn.Conv1d(in_channels if i == 0 else hidden, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU())
        for i in range(num_convs - 1)
    ]
    layers.append(nn.Conv1d(hidden if num_convs > 1 else in_channels, out_channels, 1))
    return nn.Sequential(*layers)


def _ffn_key_pairs(ffn: nn.Sequential) -> list[KeyPair]:
    pairs = []
    for i, layer in enumerate(ffn):
        if isinstance(layer, nn.Sequential):
            pairs += _weight_bias_pairs(f"{i}.0", f"{i}.0") + _batch_norm_pairs(f"{i}.1", f"{i}.1")
        else:
            pairs += _weight_bias_pairs(str(i), str(i))
    return pairs


class PositionEmbedding(nn.Module):
    """Learned embedding of 2D positions: 1x1 conv, BatchNorm, ReLU, 1x1 conv.

    ``(N, L, 2) -> (L, N, channels)``; in training BatchNorm takes its statistics over all N x L
    positions given, so the embedding runs on exactly the positions the reference embeds.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Conv1d(2, channels, 1), nn.BatchNorm1d(channels), nn.ReLU(inplace=True), nn.Conv1d(channels, channels, 1)
        )

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        return self.mlp(xy.transpose(1, 2).contiguous()).permute(2, 0, 1)

    def openpcdet_keys(self) -> list[KeyPair]:
        theirs = "position_embedding_head"
        return (
            _weight_bias_pairs("mlp.0", f"{theirs}.0")
            + _batch_norm_pairs("mlp.1", f"{theirs}.1")
            + _weight_bias_pairs("mlp.3", f"{theirs}.3")
        )


class QueryDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer: self-attention, cross-attention, FFN, each followed by
    residual + LayerNorm; position embeddings are added to the attention inputs (and values).

    Sequences are first-dimension (``(L, N, C)``), as ``nn.MultiheadAttention`` without ``batch_first``.
    """

    def __init__(self, channels: int, num_heads: int, ffn_channels: int, dropout: float, activation: str) -> None:
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation: expected 'relu' or 'gelu', got {activation!r}")
        self.self_attn = nn.MultiheadAttention(channels, num_heads, dropout=dropout)
        self.cross_attn = nn.MultiheadAttention(channels, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(channels, ffn_channels)
        self.linear2 = nn.Linear(ffn_channels, channels)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(channels) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.query_pos = PositionEmbedding(channels)
        self.key_pos = PositionEmbedding(channels)

    def forward(
        self, query: torch.Tensor, query_pos: torch.Tensor, key: torch.Tensor, key_pos: torch.Tensor,
        key_padding_mask: torch.Tensor,
    ) -> torch.Tensor:
        """
        Args:
            query: (Lq, N, C); query_pos: (Lq, N, C) embedded positions.
            key: (Lk, N, C); key_pos: (Lk, N, C) embedded positions.
            key_padding_mask: (N, Lk) bool, True = ignored key.

        Returns:
            (Lq, N, C).
        """
        q = query + query_pos
        query = self.norm1(query + self.dropout(self.self_attn(q, q, q)[0]))
        key = key + key_pos
        attended = self.cross_attn(query + query_pos, key, key, key_padding_mask=key_padding_mask)[0]
        query = self.norm2(query + self.dropout(attended))
        ffn = self.linear2(self.dropout(self.activation(self.linear1(query))))
        return self.norm3(query + self.dropout(ffn))

    def openpcdet_keys(self) -> list[KeyPair]:
        pairs = []
        for ours, theirs in (("self_attn", "self_attn"), ("cross_attn", "multihead_attn")):
            pairs += [KeyPair(f"{ours}.in_proj_{n}", f"{theirs}.in_proj_{n}") for n in ("weight", "bias")]
            pairs += _weight_bias_pairs(f"{ours}.out_proj", f"{theirs}.out_proj")
        for name in ("linear1", "linear2", "norm1", "norm2", "norm3"):
            pairs += _weight_bias_pairs(name, name)
        pairs += prefixed(self.query_pos.openpcdet_keys(), "query_pos.", "self_posembed.")
        pairs += prefixed(self.key_pos.openpcdet_keys(), "key_pos.", "cross_posembed.")
        return pairs


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017) of logits against 0/1 targets, same shape."""
    p = logits.sigmoid()
    alpha_weight = target * alpha + (1 - target) * (1 - alpha)
    pt = target * (1 - p) + (1 - target) * p
    bce = logits.clamp(min=0) - logits * target + torch.log1p(torch.exp(-logits.abs()))
    return alpha_weight * pt.pow(gamma) * bce


def gaussian_focal_loss(prob: torch.Tensor, target: torch.Tensor, alpha: float = 2.0, gamma: float = 4.0) -> torch.Tensor:
    """Elementwise CenterNet focal loss of probabilities against Gaussian targets (1 = positive)."""
    eps = 1e-12
    pos = -(prob + eps).log() * (1 - prob).pow(alpha) * target.eq(1)
    neg = -(1 - prob + eps).log() * prob.pow(alpha) * (1 - target).pow(gamma)
    return pos + neg


def draw_gaussians(
    heatmap: torch.Tensor, channels: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, radius: torch.Tensor
) -> None:
    """Raise ``heatmap`` in place to each box's Gaussian, CenterNet's way.

    Box k contributes ``exp(-(dx^2 + dy^2) / (2 sigma^2))``, sigma = (2 r + 1) / 6, computed in
    float64, over the cells within ``r`` of its centre along x and along y (a square) and inside the
    map; values below float64's eps (of the peak, 1) count as 0. Each cell keeps its maximum.

    Args:
        heatmap: (C, nx, ny) float.
        channels, cx, cy, radius: (G,) int64: each box's channel, centre cell and radius in cells.
    """
    if radius.numel() == 0:
        return
    _, nx, ny = heatmap.shape
    reach = int(radius.max())
    offsets = torch.arange(-reach, reach + 1, device=heatmap.device)
    dx, dy = offsets[None, :, None], offsets[None, None, :]
    r = radius[:, None, None]
    sigma = (2 * r + 1).double() / 6
    g = torch.exp(-(dx * dx + dy * dy).double() / (2 * sigma * sigma))  # (G, D, D)
    g[g < torch.finfo(torch.float64).eps] = 0
    x, y = cx[:, None, None] + dx, cy[:, None, None] + dy
    inside = (dx.abs() <= r) & (dy.abs() <= r) & (x >= 0) & (x < nx) & (y >= 0) & (y < ny)
    index = (channels[:, None, None] * nx + x) * ny + y
    heatmap.view(-1).scatter_reduce_(0, index[inside], g[inside].to(heatmap.dtype), reduce="amax")


class TransFusionHead(nn.Module):
    """TransFusion's LiDAR-only head (see the module docstring).

    Args:
        in_channels: channels of the BEV map.
        num_classes: heatmap channels (classes).
        class_names: the model's class names in label order; None: labels are channels.
        channel_classes: the class of each heatmap channel (the reference's class order); None: as
            ``class_names``.
        hidden_channels, num_heads, ffn_channels, dropout, activation: the decoder layer.
        num_proposals: queries per frame.
        nms_kernel_size: local-max window of the proposal heatmap.
        every_cell_classes: class names whose proposals skip the local max.
        key_radius: the cross-attention reads the (2r + 1)^2 cells around each query.
        head_channels, num_head_convs: prediction FFN width and convs (the output conv included).
        with_velocity, with_iou: the velocity and IoU branches.
        bn_momentum: momentum of every BatchNorm of the head.
        assigner: Hungarian matching costs.
        gaussian_overlap, min_radius: dense heatmap targets (cells).
        cls_weight, bbox_weight, heatmap_weight, iou_weight: loss weights.
        code_weights: L1 weight of each box code (8 or 10 values).
        focal_alpha, focal_gamma: the classification focal loss.
        score_threshold: decoding keeps scores above it (before IoU rectification).
        post_center_range: (x0, y0, z0, x1, y1, z1) metres; boxes with centres outside are dropped.
        iou_rectifier: exponent ``a`` per channel, or one value for all.
        nms_thresholds: class name -> BEV IoU threshold of that class's own NMS; unlisted classes
            get none.
        nms_pre_max_size, nms_post_max_size: NMS caps per class.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        channel_classes: Sequence[str] | None = None,
        hidden_channels: int = 128,
        num_proposals: int = 200,
        num_heads: int = 8,
        ffn_channels: int = 256,
        dropout: float = 0.0,
        activation: str = "relu",
        nms_kernel_size: int = 3,
        every_cell_classes: Sequence[str] = (),
        key_radius: int = 20,
        head_channels: int = 64,
        num_head_convs: int = 2,
        with_velocity: bool = True,
        with_iou: bool = True,
        bn_momentum: float = 0.1,
        assigner: HungarianAssigner | None = None,
        gaussian_overlap: float = 0.1,
        min_radius: int = 2,
        cls_weight: float = 1.0,
        bbox_weight: float = 0.25,
        heatmap_weight: float = 1.0,
        iou_weight: float = 0.5,
        code_weights: Sequence[float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        score_threshold: float = 0.0,
        post_center_range: Sequence[float] | None = None,
        iou_rectifier: Sequence[float] = (0.5,),
        nms_thresholds: dict[str, float] | None = None,
        nms_pre_max_size: int = 1000,
        nms_post_max_size: int = 100,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self._set_class_order(class_names, channel_classes)
        names = self.channel_classes
        unknown = [n for n in [*every_cell_classes, *(nms_thresholds or {})] if names is None or n not in names]
        if unknown:
            raise ValueError(f"every_cell_classes / nms_thresholds: {unknown} are not among the classes {names}")
        self.every_cell_channels = tuple(names.index(n) for n in every_cell_classes) if names else ()
        self.nms_thresholds = {names.index(n): float(t) for n, t in (nms_thresholds or {}).items()}
        if nms_kernel_size < 3 or nms_kernel_size % 2 == 0:
            raise ValueError(f"nms_kernel_size: expected an odd size >= 3, got {nms_kernel_size}")
        self.nms_kernel_size = nms_kernel_size
        self.num_proposals = num_proposals
        self.key_radius = key_radius
        self.with_velocity = with_velocity
        num_codes = 10 if with_velocity else 8
        weights = tuple(code_weights) if code_weights is not None else (1.0,) * 8 + (0.2,) * (num_codes - 8)
        if len(weights) != num_codes:
            raise ValueError(f"code_weights: expected {num_codes} values, got {len(weights)}")
        self.register_buffer("code_weights", torch.tensor(weights), persistent=False)
        rectifier = tuple(iou_rectifier) * (num_classes if len(iou_rectifier) == 1 else 1)
        if len(rectifier) != num_classes:
            raise ValueError(f"iou_rectifier: expected 1 or {num_classes} values, got {len(iou_rectifier)}")
        self.iou_rectifier = rectifier
        self.assigner = assigner if assigner is not None else HungarianAssigner()
        self.gaussian_overlap = gaussian_overlap
        self.min_radius = min_radius
        self.cls_weight, self.bbox_weight = cls_weight, bbox_weight
        self.heatmap_weight, self.iou_weight = heatmap_weight, iou_weight
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.score_threshold = score_threshold
        self.post_center_range = tuple(post_center_range) if post_center_range is not None else None
        self.nms_pre_max_size, self.nms_post_max_size = nms_pre_max_size, nms_post_max_size

        self.shared_conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.heatmap_head = nn.Sequential(
            nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
            nn.BatchNorm2d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_channels, num_classes, 3, padding=1),
        )
        self.class_encoding = nn.Conv1d(num_classes, hidden_channels, 1)
        self.decoder = QueryDecoderLayer(hidden_channels, num_heads, ffn_channels, dropout, activation)
        outputs = dict(BOX_OUTPUTS)
        if not with_velocity:
            del outputs["vel"]
        if not with_iou:
            del outputs["iou"]
        outputs["heatmap"] = num_classes
        self.prediction = nn.ModuleDict(
            {name: _ffn(hidden_channels, head_channels, c, num_head_convs) for name, c in outputs.items()}
        )
        self.prediction["heatmap"][-1].bias.data.fill_(CLASS_BIAS_INIT)
        for p in self.decoder.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.momentum = bn_momentum

    def _set_class_order(self, class_names: Sequence[str] | None, channel_classes: Sequence[str] | None) -> None:
        """Map labels (``class_names`` order) to heatmap channels (``channel_classes`` order)."""
        channels = list(channel_classes) if channel_classes is not None else (
            list(class_names) if class_names is not None else None
        )
        for what, names in (("class_names", class_names), ("channel_classes", channels)):
            if names is not None and len(names) != self.num_classes:
                raise ValueError(f"{what}: expected {self.num_classes} names, got {list(names)}")
        if class_names is not None and sorted(class_names) != sorted(channels):
            raise ValueError(
                f"channel_classes {channels} and class_names {list(class_names)} must name the same classes"
            )
        self.channel_classes = tuple(channels) if channels is not None else None
        order = list(range(self.num_classes)) if class_names is None else [channels.index(n) for n in class_names]
        # label -> channel and channel -> label lookups
        self.register_buffer("label_to_channel", torch.tensor(order, dtype=torch.int64), persistent=False)
        self.register_buffer("channel_to_label", torch.argsort(self.label_to_channel), persistent=False)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, bev: SparseBEV | DenseBEV) -> TransFusionPredictions:
        """Proposals and their predictions for a BEV map (a sparse one is scattered to a dense map)."""
        if isinstance(bev, SparseBEV):
            bev = DenseBEV.from_sparse(bev)
        return self.predict(bev.features, bev.grid.point_cloud_range, bev.grid.voxel_size[:2], bev.stride)

    def predict(
        self, features: torch.Tensor, point_cloud_range: Sequence[float], voxel_xy: Sequence[float], stride: int
    ) -> TransFusionPredictions:
        """The head on a dense (B, C, ny, nx) map whose cell (iy, ix) covers ``stride`` x ``stride``
        voxels of size ``voxel_xy`` (metres) from the corner of ``point_cloud_range`` (x0, y0, z0,
        x1, y1, z1) metres."""
        x = self.shared_conv(features.transpose(2, 3).contiguous())  # (B, H, nx, ny)
        b, hidden, nx, ny = x.shape
        cells = nx * ny
        flat = x.flatten(2)  # (B, H, N)
        dense_heatmap = self.heatmap_head(x)
        prob = dense_heatmap.detach().sigmoid()
        peaks = (prob * (prob == self._local_max(prob))).flatten(2)  # (B, C, N)
        top = peaks.flatten(1).argsort(dim=-1, descending=True)[:, : self.num_proposals]
        channel, cell = top // cells, top % cells  # (B, P)
        p = top.shape[1]
        query = flat.gather(2, cell[:, None, :].expand(-1, hidden, -1))
        query = query + self.class_encoding(F.one_hot(channel, self.num_classes).permute(0, 2, 1).float())
        query_xy = torch.stack([cell // ny, cell % ny], dim=-1).to(x.dtype) + 0.5  # (B, P, 2) cells

        # Keys: the (2r + 1)^2 cells around each query, by flat index (see the module docstring).
        r = torch.arange(-self.key_radius, self.key_radius + 1, device=x.device)
        dx, dy = (t.reshape(-1) for t in torch.meshgrid(r, r, indexing="ij"))
        keys = ((cell // ny)[..., None] + dx) * ny + (cell % ny)[..., None] + dy  # (B, P, K)
        masked = (keys < 0) | (keys >= cells)
        keys = keys.clamp(0, cells - 1)
        k = keys.shape[-1]
        key_feat = flat.transpose(1, 2).gather(1, keys.reshape(b, p * k, 1).expand(-1, -1, hidden))
        key_feat = key_feat.reshape(b * p, k, hidden).transpose(0, 1)  # (K, B*P, H)
        if self.training:  # BatchNorm statistics over every key position, as the reference
            key_xy = torch.stack([keys // ny, keys % ny], dim=-1).to(x.dtype) + 0.5
            key_pos = self.decoder.key_pos(key_xy.reshape(b * p, k, 2))
        else:  # a pointwise map in eval mode: embed each cell once, then gather
            ix, iy = torch.meshgrid(torch.arange(nx, device=x.device), torch.arange(ny, device=x.device), indexing="ij")
            grid_xy = torch.stack([ix.reshape(-1), iy.reshape(-1)], dim=-1).to(x.dtype) + 0.5
            table = self.decoder.key_pos(grid_xy[None])[:, 0]  # (N, H)
            key_pos = table[keys.reshape(-1)].reshape(b * p, k, hidden).transpose(0, 1)
        query_pos = self.decoder.query_pos(query_xy.reshape(b * p, 1, 2))  # (1, B*P, H)
        out = self.decoder(
            query.permute(0, 2, 1).reshape(1, b * p, hidden), query_pos, key_feat, key_pos, masked.reshape(b * p, k)
        )
        query = out.reshape(b, p, hidden).permute(0, 2, 1)  # (B, H, P)
        res = {name: ffn(query) for name, ffn in self.prediction.items()}
        return TransFusionPredictions(
            center=res["center"] + query_xy.permute(0, 2, 1),
            height=res["height"],
            dim=res["dim"],
            rot=res["rot"],
            vel=res.get("vel"),
            iou=res.get("iou"),
            heatmap=res["heatmap"],
            query_heatmap_score=peaks.gather(2, cell[:, None, :].expand(-1, self.num_classes, -1)),
            query_channel=channel,
            query_cell=cell,
            dense_heatmap=dense_heatmap,
            point_cloud_range=tuple(float(v) for v in point_cloud_range),
            voxel_xy=(float(voxel_xy[0]), float(voxel_xy[1])),
            stride=int(stride),
        )

    def _local_max(self, prob: torch.Tensor) -> torch.Tensor:
        """(B, C, nx, ny) maximum over each cell's window; 0 on the border ring; the value itself for
        the every-cell classes."""
        pad = self.nms_kernel_size // 2
        local_max = torch.zeros_like(prob)
        local_max[:, :, pad:-pad, pad:-pad] = F.max_pool2d(prob, kernel_size=self.nms_kernel_size, stride=1)
        for c in self.every_cell_channels:
            local_max[:, c] = prob[:, c]
        return local_max

    # --- boxes -----------------------------------------------------------------------------------
    @staticmethod
    def _to_metres(center: torch.Tensor, pred: TransFusionPredictions) -> torch.Tensor:
        """(B, 2, P) centres in cells -> metres."""
        x = center[:, 0] * pred.stride * pred.voxel_xy[0] + pred.point_cloud_range[0]
        y = center[:, 1] * pred.stride * pred.voxel_xy[1] + pred.point_cloud_range[1]
        return torch.stack([x, y], dim=1)

    def decode_boxes(self, pred: TransFusionPredictions) -> torch.Tensor:
        """(B, P, 7 or 9) boxes (x, y, z centre, dx, dy, dz, heading[, vx, vy]) of every proposal."""
        dim = pred.dim.exp()
        parts = [
            self._to_metres(pred.center, pred),
            pred.height - dim[:, 2:3] * 0.5,
            dim,
            torch.atan2(pred.rot[:, 0:1], pred.rot[:, 1:2]),
        ]
        if pred.vel is not None:
            parts.append(pred.vel)
        return torch.cat(parts, dim=1).permute(0, 2, 1)

    def encode_boxes(self, boxes: torch.Tensor, pred: TransFusionPredictions) -> torch.Tensor:
        """(G, 8 or 10) codes of (G, >=7) boxes: centre in cells, top z, log dims, sin, cos[, v]."""
        codes = boxes.new_zeros(boxes.shape[0], 10 if self.with_velocity else 8)
        codes[:, 0] = (boxes[:, 0] - pred.point_cloud_range[0]) / (pred.stride * pred.voxel_xy[0])
        codes[:, 1] = (boxes[:, 1] - pred.point_cloud_range[1]) / (pred.stride * pred.voxel_xy[1])
        codes[:, 3:6] = boxes[:, 3:6].log()
        codes[:, 2] = boxes[:, 2] + 0.5 * boxes[:, 5]
        codes[:, 6] = torch.sin(boxes[:, 6])
        codes[:, 7] = torch.cos(boxes[:, 6])
        if self.with_velocity and boxes.shape[1] >= 9:
            codes[:, 8:10] = boxes[:, 7:9]
        return codes

    def _code_boxes_for_iou(self, codes: torch.Tensor, pred: TransFusionPredictions) -> torch.Tensor:
        """(B, P, 7) boxes of (B, P, >=8) codes with the *top* z in the centre's place (the reference's
        IoU-branch convention)."""
        c = codes.permute(0, 2, 1)
        return torch.cat(
            [self._to_metres(c[:, 0:2], pred), c[:, 2:3], c[:, 3:6].exp(), torch.atan2(c[:, 6:7], c[:, 7:8])], dim=1
        ).permute(0, 2, 1)

    # --- targets and losses ----------------------------------------------------------------------
    @torch.no_grad()
    def assign_targets(self, pred: TransFusionPredictions, annotations: Sequence[Annotations3D]) -> TransFusionTargets:
        """Hungarian matching of each frame's proposals to its boxes, and dense heatmap targets."""
        b, _, p = pred.heatmap.shape
        nx, ny = pred.dense_heatmap.shape[-2:]
        device = pred.heatmap.device
        boxes = self.decode_boxes(pred)
        labels = torch.full((b, p), self.num_classes, dtype=torch.int64, device=device)
        positive = torch.zeros(b, p, dtype=torch.bool, device=device)
        codes = torch.zeros(b, p, 10 if self.with_velocity else 8, device=device)
        matched_iou = torch.zeros(b, p, device=device)
        heatmap = torch.zeros(b, self.num_classes, nx, ny, device=device)
        for i, ann in enumerate(annotations):
            gt = ann.boxes.tensor.to(device=device, dtype=torch.float32)
            valid = (gt[:, 3] > 0) & (gt[:, 4] > 0)
            gt = gt[valid]
            gt_channel = self.label_to_channel[ann.labels.to(device)[valid]]
            result = self.assigner.assign(
                boxes[i], gt, gt_channel, pred.heatmap[i].T, pred.point_cloud_range
            )
            pos = result.positive
            matched = result.gt_index[pos]
            labels[i, pos] = gt_channel[matched]
            positive[i, pos] = True
            codes[i, pos] = self.encode_boxes(gt[matched], pred)
            matched_iou[i] = result.iou.clamp(0.0, 1.0)
            draw_gaussians(heatmap[i], gt_channel, *self._gaussian_centres_and_radii(gt, pred))
        return TransFusionTargets(labels, positive, codes, matched_iou, heatmap)

    def _gaussian_centres_and_radii(
        self, boxes: torch.Tensor, pred: TransFusionPredictions
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G,) int64 centre cells (x, y), truncated towards zero as the reference, and Gaussian radii
        (CenterNet's for the box's size in cells, truncated, at least ``min_radius``) of (G, >=7) boxes."""
        width = boxes[:, 3] / pred.voxel_xy[0] / pred.stride
        length = boxes[:, 4] / pred.voxel_xy[1] / pred.stride
        radius = gaussian_radius(length, width, self.gaussian_overlap).long().clamp(min=self.min_radius)
        cx = (boxes[:, 0] - pred.point_cloud_range[0]) / pred.voxel_xy[0] / pred.stride
        cy = (boxes[:, 1] - pred.point_cloud_range[1]) / pred.voxel_xy[1] / pred.stride
        return cx.to(torch.int32).long(), cy.to(torch.int32).long(), radius

    def loss(
        self,
        pred: TransFusionPredictions,
        annotations: Sequence[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> TransFusionLosses:
        """The reference's four losses on one batch.

        Args:
            annotations: one per frame, labels in ``class_names`` order.
            reduce_counts: maps this process's (heatmap peaks, matched proposals, IoU-loss proposals),
                a (3,) float tensor, to the divisors (the mean over DDP ranks); None: the local counts,
                as the reference.
        """
        targets = self.assign_targets(pred, annotations)
        positive = targets.positive
        box_pred = pred.box_codes().float()
        iou_valid = torch.zeros_like(positive)
        iou_target = torch.zeros_like(targets.matched_iou)
        if pred.iou is not None:
            with torch.no_grad():
                a = self._code_boxes_for_iou(box_pred.detach(), pred)[positive]
                g = self._code_boxes_for_iou(targets.box_codes, pred)[positive]
                iou = iou_3d_aligned(a, g)
                iou_valid[positive] = iou != 0
                iou_target[positive] = iou
        counts = torch.stack([targets.heatmap.eq(1).sum(), positive.sum(), iou_valid.sum()]).float()
        if reduce_counts is not None:
            counts = reduce_counts(counts)
        counts = counts.clamp(min=1)

        prob = pred.dense_heatmap.float().sigmoid().clamp(1e-4, 1 - 1e-4)
        hm_loss = gaussian_focal_loss(prob, targets.heatmap).sum() / counts[0]

        logits = pred.heatmap.float().permute(0, 2, 1)  # (B, P, C)
        one_hot = F.one_hot(targets.labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
        cls_loss = sigmoid_focal_loss(logits, one_hot, self.focal_alpha, self.focal_gamma).sum() / counts[1]

        weights = positive[..., None].to(box_pred.dtype) * self.code_weights
        bbox_loss = ((box_pred - targets.box_codes).abs() * weights).sum() / counts[1]

        iou_loss = logits.sum() * 0.0
        if pred.iou is not None:
            err = (pred.iou[:, 0].float() - (2 * iou_target - 1)).abs()
            iou_loss = err[iou_valid].sum() / counts[2]

        terms = (
            self.heatmap_weight * hm_loss,
            self.cls_weight * cls_loss,
            self.bbox_weight * bbox_loss,
            self.iou_weight * iou_loss,
        )
        per_frame = (targets.matched_iou * positive).sum(1) / positive.sum(1).clamp(min=1)
        return TransFusionLosses(
            total=sum(terms),
            heatmap=terms[0].detach(),
            classification=terms[1].detach(),
            regression=terms[2].detach(),
            iou=terms[3].detach(),
            matched_iou=per_frame.mean(),
            num_positives=int(positive.sum()),
        )

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, pred: TransFusionPredictions) -> list[Detections3D]:
        """Boxes per frame, scores descending, labels in ``class_names`` order."""
        one_hot = F.one_hot(pred.query_channel, self.num_classes).permute(0, 2, 1)
        score = pred.heatmap.float().sigmoid() * pred.query_heatmap_score * one_hot
        scores, channels = score.max(1)  # (B, P)
        boxes = self.decode_boxes(pred).float()
        keep = scores > self.score_threshold
        if self.post_center_range is not None:
            limits = boxes.new_tensor(self.post_center_range)
            keep &= ((boxes[..., :3] >= limits[:3]) & (boxes[..., :3] <= limits[3:])).all(-1)
        cells = pred.stride * torch.tensor(pred.voxel_xy, device=boxes.device)
        ny = pred.dense_heatmap.shape[-1]
        query_xy = torch.stack([pred.query_cell // ny, pred.query_cell % ny], dim=-1).float() + 0.5
        query_xy = query_xy * cells + torch.tensor(pred.point_cloud_range[:2], device=boxes.device)
        rectifier = scores.new_tensor(self.iou_rectifier)
        results = []
        for i in range(scores.shape[0]):
            frame_boxes, frame_scores, frame_channels = boxes[i, keep[i]], scores[i, keep[i]], channels[i, keep[i]]
            if pred.iou is not None:
                iou = ((pred.iou[i, 0, keep[i]].float() + 1) * 0.5).clamp(0.0, 1.0)
                a = rectifier[frame_channels]
                frame_scores = torch.pow(frame_scores, 1 - a) * torch.pow(iou, a)
            kept = torch.ones_like(frame_scores, dtype=torch.bool)
            for channel, threshold in self.nms_thresholds.items():
                members = torch.nonzero(frame_channels == channel).squeeze(1)
                # Scores are products of probabilities: the reference's NMS score floor (>= 0) keeps all.
                survivors = nms_bev(
                    frame_boxes[members, :7], frame_scores[members], threshold,
                    pre_max_size=self.nms_pre_max_size, post_max_size=self.nms_post_max_size,
                )
                kept[members] = False
                kept[members[survivors]] = True
            order = torch.argsort(frame_scores[kept], descending=True, stable=True)
            rows = torch.nonzero(kept).squeeze(1)[order]
            results.append(
                Detections3D(
                    Boxes3D(frame_boxes[rows]),
                    frame_scores[rows],
                    self.channel_to_label[frame_channels[rows]],
                    query_xy=query_xy[i, keep[i]][rows],
                )
            )
        return results

    # --- reference names -------------------------------------------------------------------------
    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry under the reference head's names (relative to ``dense_head.``)."""
        pairs = _weight_bias_pairs("shared_conv", "shared_conv")
        pairs += _weight_bias_pairs("heatmap_head.0", "heatmap_head.0.conv")
        pairs += _batch_norm_pairs("heatmap_head.1", "heatmap_head.0.bn")
        pairs += _weight_bias_pairs("heatmap_head.3", "heatmap_head.1")
        pairs += _weight_bias_pairs("class_encoding", "class_encoding")
        pairs += prefixed(self.decoder.openpcdet_keys(), "decoder.", "decoder.")
        for name, ffn in self.prediction.items():
            pairs += prefixed(_ffn_key_pairs(ffn), f"prediction.{name}.", f"prediction_head.{name}.")
        return pairs

