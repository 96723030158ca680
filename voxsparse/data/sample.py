"""One training/evaluation example and the batch the models consume."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from voxsparse.structures import Annotations3D, Boxes3D, PointBatch


class FrameLike(Protocol):
    """What a dataset frame provides (numpy arrays, LiDAR frame, metres); see ``LidarFrame``."""

    frame_id: str
    points: np.ndarray  # (N, 3 + C)
    boxes: np.ndarray  # (K, 7 or 9)
    labels: np.ndarray  # (K,)
    num_points: np.ndarray  # (K,)
    difficulty: np.ndarray  # (K,)
    track_ids: np.ndarray  # (K,)
    keypoints: np.ndarray | None  # (K, 14, 3)
    keypoint_visibility: np.ndarray | None  # (K, 14)


@dataclass
class Sample:
    """A frame as tensors: points (N, 3 + C) float32 and its ground truth."""

    frame_id: str
    points: torch.Tensor
    annotations: Annotations3D

    @classmethod
    def from_frame(cls, frame: FrameLike) -> Sample:
        def t(a, dtype):
            return None if a is None else torch.as_tensor(np.asarray(a), dtype=dtype)

        annotations = Annotations3D(
            boxes=Boxes3D(t(frame.boxes, torch.float32)),
            labels=t(frame.labels, torch.int64),
            num_points=t(frame.num_points, torch.int64),
            difficulty=t(frame.difficulty, torch.int64),
            track_ids=t(frame.track_ids, torch.int64),
            keypoints=t(frame.keypoints, torch.float32),
            keypoint_visibility=t(frame.keypoint_visibility, torch.bool),
        )
        return cls(str(frame.frame_id), t(frame.points, torch.float32), annotations)


@dataclass
class Batch:
    """Model input for B frames plus their ground truth."""

    points: PointBatch
    annotations: list[Annotations3D]
    frame_ids: list[str]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.points.to(device), [a.to(device) for a in self.annotations], self.frame_ids)

    def __len__(self) -> int:
        return len(self.frame_ids)


def collate(samples: Sequence[Sample]) -> Batch:
    """``DataLoader`` collate function: concatenate points, keep per-frame ground truth."""
    return Batch(
        PointBatch.from_frames([s.points for s in samples]),
        [s.annotations for s in samples],
        [s.frame_id for s in samples],
    )
