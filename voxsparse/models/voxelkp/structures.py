"""What a keypoint detector returns per frame."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.structures import Detections3D
from voxsparse.structures._validation import check_tensor


@dataclass(kw_only=True)
class KeypointDetections3D(Detections3D):
    """:class:`Detections3D` (K detections, scores descending) with keypoints for each.

    Being a ``Detections3D``, it goes wherever detections go (box metrics, predictions files, which
    keep the boxes only); :func:`voxsparse.evaluation.keypoints.keypoint_predictions_for_eval`
    turns the humans among them into keypoint-metric inputs.

    Attributes:
        keypoints: (K, 14, 3) float, metres, LiDAR frame, ``KEYPOINT_NAMES`` order. Every detection
            has them; they are meaningful for the keypoint classes only.
        keypoint_scores: (K, 14) float in [0, 1], the predicted probability that each keypoint is
            visible.
    """

    keypoints: torch.Tensor
    keypoint_scores: torch.Tensor

    def __post_init__(self) -> None:
        super().__post_init__()
        k, j = len(self.boxes), len(KEYPOINT_NAMES)
        checks = {"floating": True, "length": k, "finite": True}
        check_tensor("KeypointDetections3D.keypoints", self.keypoints, ndim=3, last_dim=3, **checks)
        check_tensor("KeypointDetections3D.keypoint_scores", self.keypoint_scores, ndim=2, **checks)
        if self.keypoints.shape[1] != j or self.keypoint_scores.shape[1] != j:
            raise ValueError(
                f"KeypointDetections3D: expected {j} keypoints per detection, got keypoints "
                f"{tuple(self.keypoints.shape)} and keypoint_scores {tuple(self.keypoint_scores.shape)}"
            )
