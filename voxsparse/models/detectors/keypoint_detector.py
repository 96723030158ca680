"""A single-stage detector that also estimates human keypoints (VoxelKP). Its predictions reach the
keypoint metrics through :func:`voxsparse.evaluation.keypoints.keypoint_predictions_for_eval`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from torch import nn

from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.heads.keypoint_head import KeypointHead
from voxsparse.structures import PointConvention


class KeypointDetector(SparseDetector):
    """points → voxel encoder → sparse backbone → :class:`KeypointHead` (boxes + keypoints).

    It keeps :class:`SparseDetector`'s contract, so the trainer and the inference loop use it as they
    are: ``forward`` returns :class:`~voxsparse.models.heads.keypoint_head.KeypointPredictions`,
    ``head.loss(preds, annotations, reduce_counts)`` returns
    :class:`~voxsparse.models.heads.keypoint_head.KeypointHeadLosses` (``total``, ``heatmap``,
    ``regression`` as the trainer reads them, plus the keypoint terms), and ``predict`` returns one
    :class:`KeypointDetections3D` (a ``Detections3D``) per frame.

    Args:
        voxel_encoder, backbone, class_names, point_convention: as :class:`SparseDetector`.
        head: factory ``(in_channels, num_classes, keypoint_labels) -> KeypointHead``.
        keypoint_classes: names (among ``class_names``) of the classes that carry keypoints, e.g.
            ``["Pedestrian"]`` (Waymo also labels cyclists).
    """

    def __init__(
        self,
        voxel_encoder: nn.Module,
        backbone: Callable[..., nn.Module],
        head: Callable[..., KeypointHead],
        class_names: Sequence[str],
        keypoint_classes: Sequence[str],
        point_convention: PointConvention | None = None,
    ) -> None:
        unknown = [name for name in keypoint_classes if name not in class_names]
        if unknown or not keypoint_classes:
            raise ValueError(
                f"keypoint_classes: expected names among {list(class_names)}, got {list(keypoint_classes)}"
            )
        labels = tuple(list(class_names).index(name) for name in keypoint_classes)
        head = functools.partial(head, keypoint_labels=labels)
        super().__init__(voxel_encoder, backbone, head, class_names, point_convention)
        self.keypoint_classes = tuple(keypoint_classes)

    @property
    def keypoint_labels(self) -> tuple[int, ...]:
        """Class indices of ``keypoint_classes``."""
        return tuple(self.class_names.index(name) for name in self.keypoint_classes)
