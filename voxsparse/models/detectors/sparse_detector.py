"""A single-stage 3D detector assembled from a voxel encoder, a backbone and a head."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from voxsparse.models.heads.center_head import CenterHeadBase, CenterPredictions, HeadLosses
from voxsparse.structures import Annotations3D, Detections3D, PointBatch, PointConvention


class SparseDetector(nn.Module):
    """points → voxel encoder → sparse backbone → (sparse BEV) → center-based head.

    ``backbone`` and ``head`` are factories (Hydra ``_partial_: true``) that receive their
    ``in_channels`` from the stage before, so a config never repeats a channel count.

    Args:
        voxel_encoder: a :class:`~voxsparse.models.contracts.VoxelEncoder`.
        backbone: ``(in_channels) ->`` a :class:`~voxsparse.models.contracts.Backbone`.
        head: ``(in_channels, num_classes) ->`` a :class:`~voxsparse.models.contracts.Head`.
        class_names: names of the head's classes, in label order.
        point_convention: the point columns (and intensity scale) the model takes; raw point files
            are converted to it (:func:`voxsparse.data.pointfile.conform`). Default: x, y, z,
            intensity in [0, 1], then ``feature_4``, ... up to the voxel encoder's ``in_channels``.
    """

    def __init__(
        self,
        voxel_encoder: nn.Module,
        backbone: Callable[..., nn.Module],
        head: Callable[..., CenterHeadBase],
        class_names: Sequence[str],
        point_convention: PointConvention | None = None,
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
        self.head = head(in_channels=self.backbone.out_channels, num_classes=len(self.class_names))

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
        pred = self.head(self.backbone(self.voxel_encoder(points)))
        if annotations is None:
            return pred
        with torch.autocast(points.points.device.type, enabled=False):
            return self.head.loss(pred, list(annotations), reduce_counts)

    def loss(
        self,
        points: PointBatch,
        annotations: Sequence[Annotations3D],
        reduce_counts: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> HeadLosses:
        """The training losses of a batch (scalar tensors ``total``, ``heatmap``, ``regression``, ...)."""
        return self(points, annotations, reduce_counts)

    def predict(self, points: PointBatch) -> list[Detections3D]:
        """Detections per frame, in the LiDAR frame, scores descending."""
        return self.head.decode(self(points))
