"""A single-stage detector that also estimates human keypoints (VoxelKP), and the bridge from its
predictions to the keypoint metrics of :mod:`voxsparse.evaluation.keypoints`."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn

from voxsparse.evaluation.keypoints import FrameKeypointGroundTruth, FrameKeypointPredictions
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.heads.keypoint_head import NUM_KEYPOINTS, KeypointHead
from voxsparse.models.voxelkp.structures import KeypointDetections3D
from voxsparse.structures import Annotations3D, PointConvention


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


def keypoint_predictions_for_eval(
    detections: Sequence[KeypointDetections3D],
    keypoint_labels: Sequence[int],
    score_threshold: float = 0.3,
    visibility_threshold: float = 0.5,
) -> list[FrameKeypointPredictions]:
    """Predicted humans of each frame, as input to :func:`~voxsparse.evaluation.keypoints.evaluate_keypoints`.

    A detection is a predicted human when its label is one of ``keypoint_labels`` and its score is at
    least ``score_threshold`` (Waymo's keypoint metrics do not rank by score: PEM charges every
    predicted human that matches no one, so a threshold is part of the prediction); a keypoint is
    claimed visible when its visibility probability is at least ``visibility_threshold``.

    Args:
        detections: one per frame, from :meth:`KeypointDetector.predict`.
        keypoint_labels: e.g. ``model.keypoint_labels``.
    """
    labels = torch.as_tensor(list(keypoint_labels), dtype=torch.int64)
    frames = []
    for f, det in enumerate(detections):
        if not isinstance(det, KeypointDetections3D):
            raise TypeError(f"detections[{f}]: expected KeypointDetections3D, got {type(det).__name__}")
        keep = torch.isin(det.labels.cpu(), labels) & (det.scores.cpu() >= score_threshold)
        frames.append(
            FrameKeypointPredictions(
                keypoints=det.keypoints.cpu()[keep].float(),
                visibility=det.keypoint_scores.cpu()[keep] >= visibility_threshold,
            )
        )
    return frames


def keypoint_ground_truth_for_eval(
    annotations: Sequence[Annotations3D], keypoint_labels: Sequence[int]
) -> list[FrameKeypointGroundTruth]:
    """Ground-truth humans of each frame (boxes of ``keypoint_labels``) for ``evaluate_keypoints``.

    A human without keypoint labels (``keypoints`` None, or no visible keypoint) enters as unlabelled
    (Waymo's GTi): it absorbs a prediction on it without penalty and is never a false negative.
    """
    labels = torch.as_tensor(list(keypoint_labels), dtype=torch.int64)
    frames = []
    for ann in annotations:
        human = torch.isin(ann.labels.cpu(), labels)
        n = int(human.sum())
        if ann.keypoints is None or ann.keypoint_visibility is None:
            keypoints = torch.zeros(n, NUM_KEYPOINTS, 3)
            visibility = torch.zeros(n, NUM_KEYPOINTS, dtype=torch.bool)
        else:
            keypoints = ann.keypoints.cpu()[human].float()
            visibility = ann.keypoint_visibility.cpu()[human]
        boxes = ann.boxes.tensor.cpu()[human, :7].float()
        frames.append(FrameKeypointGroundTruth(keypoints, visibility, boxes))
    return frames
