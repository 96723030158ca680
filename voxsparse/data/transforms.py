"""Transforms of a :class:`Sample` that keep points, boxes, velocities and keypoints consistent.

Each transform is a callable ``(sample, generator) -> sample``; randomness comes only from the
``torch.Generator`` passed in, so a (seed, epoch, index) triple reproduces an augmented sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.sample import Sample
from voxsparse.ops.boxes import limit_period
from voxsparse.structures import Annotations3D, Boxes3D

# Index permutation that swaps left and right keypoints, for mirroring.
_MIRROR = [KEYPOINT_NAMES.index(n.replace("left", "#").replace("right", "left").replace("#", "right")) for n in KEYPOINT_NAMES]


def _select(ann: Annotations3D, keep: torch.Tensor) -> Annotations3D:
    return Annotations3D(
        boxes=ann.boxes[keep],
        labels=ann.labels[keep],
        num_points=ann.num_points[keep],
        difficulty=ann.difficulty[keep],
        track_ids=ann.track_ids[keep],
        keypoints=None if ann.keypoints is None else ann.keypoints[keep],
        keypoint_visibility=None if ann.keypoint_visibility is None else ann.keypoint_visibility[keep],
    )


@dataclass
class RangeFilter:
    """Drop points outside ``point_cloud_range`` (x_min, y_min, z_min, x_max, y_max, z_max; metres)
    and boxes whose centre lies outside it in BEV."""

    point_cloud_range: Sequence[float]

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        r = self.point_cloud_range
        p = sample.points
        inside = (p[:, 0] >= r[0]) & (p[:, 0] < r[3]) & (p[:, 1] >= r[1]) & (p[:, 1] < r[4])
        inside &= (p[:, 2] >= r[2]) & (p[:, 2] < r[5])
        c = sample.annotations.boxes.center
        keep = (c[:, 0] >= r[0]) & (c[:, 0] < r[3]) & (c[:, 1] >= r[1]) & (c[:, 1] < r[4])
        return replace(sample, points=p[inside], annotations=_select(sample.annotations, keep))


def _rotate_xy(xy: torch.Tensor, angle: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * xy[..., 0] - s * xy[..., 1], s * xy[..., 0] + c * xy[..., 1]], dim=-1)


@dataclass
class GlobalAugment:
    """Random mirror across the x axis (y → -y), rotation about z, and uniform scaling.

    Args:
        flip_probability: chance of mirroring (left/right keypoints are swapped with it).
        rotation: (min, max) radians of the yaw rotation.
        scale: (min, max) scale factor.
    """

    flip_probability: float = 0.5
    rotation: Sequence[float] = (-math.pi / 4, math.pi / 4)
    scale: Sequence[float] = (0.95, 1.05)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        u = torch.rand(3, generator=generator).tolist()
        flip = u[0] < self.flip_probability
        angle = self.rotation[0] + (self.rotation[1] - self.rotation[0]) * u[1]
        scale = self.scale[0] + (self.scale[1] - self.scale[0]) * u[2]

        ann = sample.annotations
        points = sample.points.clone()
        boxes = ann.boxes.tensor.clone()
        keypoints = None if ann.keypoints is None else ann.keypoints.clone()
        visibility = ann.keypoint_visibility
        if flip:
            points[:, 1] = -points[:, 1]
            boxes[:, 1] = -boxes[:, 1]
            boxes[:, 6] = -boxes[:, 6]
            if boxes.shape[1] == 9:
                boxes[:, 8] = -boxes[:, 8]
            if keypoints is not None:
                keypoints[..., 1] = -keypoints[..., 1]
                keypoints = keypoints[:, _MIRROR]
                visibility = None if visibility is None else visibility[:, _MIRROR]
        points[:, :2] = _rotate_xy(points[:, :2], angle)
        boxes[:, :2] = _rotate_xy(boxes[:, :2], angle)
        boxes[:, 6] = limit_period(boxes[:, 6] + angle, offset=0.5, period=2 * math.pi)
        if boxes.shape[1] == 9:
            boxes[:, 7:9] = _rotate_xy(boxes[:, 7:9], angle)
        points[:, :3] *= scale
        boxes[:, :6] *= scale
        boxes[:, 7:] *= scale
        if keypoints is not None:
            keypoints[..., :2] = _rotate_xy(keypoints[..., :2], angle)
            keypoints *= scale
        annotations = replace(ann, boxes=Boxes3D(boxes), keypoints=keypoints, keypoint_visibility=visibility)
        return replace(sample, points=points, annotations=annotations)


@dataclass
class ShufflePoints:
    """Randomly permute the points (order-dependent ops, e.g. hard voxelization, see new orders)."""

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        order = torch.randperm(len(sample.points), generator=generator)
        return replace(sample, points=sample.points[order])
