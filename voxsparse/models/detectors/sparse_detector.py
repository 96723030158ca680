"""A single-stage 3D detector assembled from a voxel encoder, a backbone, an optional neck and a head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from voxsparse.models.auxiliary import with_auxiliary_losses
from voxsparse.models.heads.center_head import CenterPredictions, HeadLosses
from voxsparse.models.keys import KeyPair, ReferenceNamed, prefixed
from voxsparse.structures import Annotations3D, Detections3D, PointBatch, PointConvention

#: Each part's attribute and the name of the matching module in an OpenPCDet detector. OpenPCDet's
#: map-to-BEV modules of the reference configs (``HeightCompression``, ``PointPillarScatter3d``)
#: have no parameters, so ``map_to_bev_module.`` names nothing and a neck's tensors are all its
#: 2D backbone's.
_OPENPCDET_PARTS = (
    ("voxel_encoder", "vfe."),
    ("backbone", "backbone_3d."),
    ("neck", "backbone_2d."),
    ("head", "dense_head."),
)


class SparseDetector(nn.Module):
    """points → voxel encoder → sparse backbone → (sparse BEV) → [neck → dense BEV] → center-based head.

    ``backbone``, ``neck`` and ``head`` are factories (Hydra ``_partial_: true``) that receive their
    ``in_channels`` from the stage before, so a config never repeats a channel count.

    Args:
        voxel_encoder: a :class:`~voxsparse.models.contracts.VoxelEncoder`.
        backbone: ``(in_channels) ->`` a :class:`~voxsparse.models.contracts.Backbone`.
        head: ``(in_channels, num_classes) ->`` a :class:`~voxsparse.models.contracts.Head`.
        class_names: names of the head's classes, in label order.
        point_convention: the point columns (and intensity scale) the model takes; raw point files
            are converted to it (:func:`voxsparse.data.pointfile.conform`). Default: x, y, z,
            intensity in [0, 1], then ``feature_4``, ... up to the voxel encoder's ``in_channels``.
        neck: ``(in_channels) ->`` a :class:`~voxsparse.models.contracts.Neck` between backbone and
            head (dense 2D blocks); None: the head takes the backbone's sparse BEV.
    """

    def __init__(
        self,
        voxel_encoder: nn.Module,
        backbone: Callable[..., nn.Module],
        head: Callable[..., nn.Module],
        class_names: Sequence[str],
        point_convention: PointConvention | None = None,
        neck: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.class_names = tuple(class_names)
        width = getattr(voxel_encoder, "in_channels", None)
        if point_convention is None:  # configs that do not say: x, y, z, intensity, then generic columns
            names = ("x", "y", "z", "intensity")[: width or 4] + tuple(f"feature_{i}" for i in range(4, width or 4))
            point_convention = PointConvention(names)
        self.point_convention = point_convention
        if width is not None and width != len(self.point_convention.features):
            raise ValueError(
                f"point_convention.features: {list(self.point_convention.features)} name "
                f"{len(self.point_convention.features)} columns but the voxel encoder takes {width}"
            )
        self.voxel_encoder = voxel_encoder
        self.backbone = backbone(in_channels=voxel_encoder.out_channels)
        self.neck = None if neck is None else neck(in_channels=self.backbone.out_channels)
        head_in = (self.backbone if self.neck is None else self.neck).out_channels
        self.head = head(in_channels=head_in, num_classes=len(self.class_names))

    @property
    def grid(self):
        return self.voxel_encoder.grid

    def forward(
        self,
        points: PointBatch,
        annotations: Sequence[Annotations3D] | None = None,
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> CenterPredictions | HeadLosses:
        """The head's predictions for ``points``; with ``annotations`` (one per frame), the losses.

        The losses are the one training contract (:meth:`loss`): the trainer calls the model, or its
        DDP wrapper, with annotations. They are computed outside autocast, on the predictions as
        they came out of it. ``reduce_counts`` averages the loss normalisers over DDP ranks.
        """
        weights = next(self.parameters(), None)
        if weights is not None and points.points.dtype != weights.dtype:
            raise ValueError(
                f"{type(self).__name__}: points are {points.points.dtype} but the model's weights are "
                f"{weights.dtype}; convert the points (e.g. torch.from_numpy(a).float())"
            )
        bev = self.backbone(self.voxel_encoder(points))
        pred = self.head(bev if self.neck is None else self.neck(bev))
        if annotations is None:
            return pred
        with torch.autocast(points.points.device.type, enabled=False):
            losses = self.head.loss(pred, list(annotations), reduce_counts)
            backbone_losses = getattr(self.backbone, "auxiliary_losses", None)  # e.g. Focals Conv's importance
            if backbone_losses is None:
                return losses
            return with_auxiliary_losses(losses, backbone_losses(list(annotations)))

    def loss(
        self,
        points: PointBatch,
        annotations: Sequence[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> HeadLosses:
        """The training losses of a batch (scalar tensors ``total``, ``heatmap``, ``regression``, ...);
        a backbone's ``auxiliary_losses`` (:mod:`voxsparse.models.auxiliary`) are added to ``total``."""
        return self(points, annotations, reduce_counts)

    def predict(self, points: PointBatch) -> list[Detections3D]:
        """Detections per frame, in the LiDAR frame, scores descending."""
        return self.head.decode(self(points))

    def openpcdet_keys(self) -> list[KeyPair]:
        """Every state-dict entry under its name in an OpenPCDet detector's ``model_state``.

        Each part's own pairs (``openpcdet_keys()``), prefixed with the part's attribute here and
        OpenPCDet's module name there (``vfe.``, ``backbone_3d.``, ``backbone_2d.``,
        ``dense_head.``). A part without state (e.g. ``MeanVFE``) contributes nothing.

        Raises:
            TypeError: a part with state names no reference keys.
        """
        pairs: list[KeyPair] = []
        for name, theirs in _OPENPCDET_PARTS:
            part = getattr(self, name)
            if part is None:
                continue
            if isinstance(part, ReferenceNamed):
                pairs += prefixed(part.openpcdet_keys(), f"{name}.", theirs)
            elif part.state_dict():
                raise TypeError(f"{name}: {type(part).__name__} has state but no openpcdet_keys()")
        return pairs
