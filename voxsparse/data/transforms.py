"""Transforms of a :class:`Sample` that keep points, boxes, velocities and keypoints consistent.

Each transform is a callable ``(sample, generator) -> sample``; randomness comes only from the
``torch.Generator`` passed in, so a (seed, epoch, index) triple reproduces an augmented sample.
A transform whose behaviour depends on the epoch (:class:`GTSampling`'s fade) has ``set_epoch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.gt_database import GTDatabase
from voxsparse.data.prepared import column_indices, label_order
from voxsparse.data.sample import Sample
from voxsparse.geometry import limit_period, points_in_boxes
from voxsparse.ops.boxes import bev_iou
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
    """Random mirror across the x axis (y → -y), optionally across the y axis (x → -x), rotation
    about z, and uniform scaling, in that order.

    Args:
        flip_probability: chance of mirroring across the x axis (left/right keypoints are swapped).
        flip_x_probability: chance of mirroring across the y axis, drawn independently (OpenPCDet's
            ``random_world_flip`` along both axes is 0.5 and 0.5).
        rotation: (min, max) radians of the yaw rotation.
        scale: (min, max) scale factor.
    """

    flip_probability: float = 0.5
    rotation: Sequence[float] = (-math.pi / 4, math.pi / 4)
    scale: Sequence[float] = (0.95, 1.05)
    flip_x_probability: float = 0.0

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        u = torch.rand(3, generator=generator).tolist()
        # Drawn only when enabled, so configs without it see the random stream they always saw.
        flip_x = self.flip_x_probability > 0 and torch.rand(1, generator=generator).item() < self.flip_x_probability
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
        if flip_x:
            points[:, 0] = -points[:, 0]
            boxes[:, 0] = -boxes[:, 0]
            boxes[:, 6] = limit_period(math.pi - boxes[:, 6], offset=0.5, period=2 * math.pi)
            if boxes.shape[1] == 9:
                boxes[:, 7] = -boxes[:, 7]
            if keypoints is not None:
                keypoints[..., 0] = -keypoints[..., 0]
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
class Faded:
    """``transform`` for all but the last ``fade_epochs`` of ``total_epochs`` epochs (OpenPCDet's
    ``DisableAugmentationHook``: the last epochs see the data as it is).

    Args:
        transform: any augmentation.
        fade_epochs: epochs at the end without it.
        total_epochs: the training's epochs (usually ``${trainer.epochs}``).
    """

    transform: Callable[[Sample, torch.Generator | None], Sample]
    fade_epochs: int
    total_epochs: int
    epoch: int = field(default=0, init=False)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.transform, "set_epoch"):
            self.transform.set_epoch(epoch)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if self.epoch >= self.total_epochs - self.fade_epochs:
            return sample
        return self.transform(sample, generator)


@dataclass
class ShufflePoints:
    """Randomly permute the points (order-dependent ops, e.g. hard voxelization, see new orders)."""

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        order = torch.randperm(len(sample.points), generator=generator)
        return replace(sample, points=sample.points[order])


@dataclass
class GlobalTranslate:
    """Random translation of the whole scene: per-axis normal noise with standard deviation ``std``
    (metres). Points, boxes and keypoints move together; velocities do not change. Objects without
    keypoints (all zeros) keep zeros."""

    std: Sequence[float] = (0.2, 0.2, 0.2)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        offset = torch.randn(3, generator=generator) * torch.as_tensor(self.std, dtype=torch.float32)
        ann = sample.annotations
        points = sample.points.clone()
        points[:, :3] += offset
        boxes = ann.boxes.tensor.clone()
        boxes[:, :3] += offset
        keypoints = ann.keypoints
        if keypoints is not None:
            present = keypoints.flatten(1).ne(0).any(1)
            keypoints = keypoints.clone()
            keypoints[present] += offset
        annotations = replace(ann, boxes=Boxes3D(boxes), keypoints=keypoints)
        return replace(sample, points=points, annotations=annotations)


def _concat_annotations(ann: Annotations3D, new: Annotations3D) -> Annotations3D:
    def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None else torch.cat([a, b])

    return Annotations3D(
        boxes=Boxes3D(torch.cat([ann.boxes.tensor, new.boxes.tensor])),
        labels=cat(ann.labels, new.labels),
        num_points=cat(ann.num_points, new.num_points),
        difficulty=cat(ann.difficulty, new.difficulty),
        track_ids=cat(ann.track_ids, new.track_ids),
        keypoints=cat(ann.keypoints, new.keypoints),
        keypoint_visibility=cat(ann.keypoint_visibility, new.keypoint_visibility),
    )


@dataclass
class GTSampling:
    """Paste objects from a prepared split's GT database (:mod:`voxsparse.data.gt_database`).

    Per class, ``sample_groups[name]`` objects are drawn uniformly from the database objects of that
    class with at least ``min_points`` points (with ``limit_whole_scene``, minus the scene's own
    objects of the class; OpenPCDet's ``SAMPLE_GROUPS`` / ``LIMIT_WHOLE_SCENE``). A drawn object is
    pasted, at the place it was recorded, only if its box has zero BEV overlap (exact rotated
    intersection) with every box of the scene and every box pasted before it. Scene points inside
    pasted boxes are removed and the object's database points added; pasted annotations get
    ``num_points`` = their database points, ``track_ids`` = -1, and keypoints from the database
    (zeros, not visible, where it has none).

    Fade: with ``fade_epochs`` > 0 and ``total_epochs`` set, pasting is off from epoch
    ``total_epochs - fade_epochs`` on (the last ``fade_epochs`` epochs); call :meth:`set_epoch` at
    the start of every epoch.

    Args:
        root: the prepared dataset's root.
        split: the split whose database is used (its ``gt_database/``).
        sample_groups: class name -> objects of that class wanted per scene.
        min_points: minimum database points of a pasted object: one value, or per class name
            (classes not named: 0).
        limit_whole_scene: count the scene's objects of a class towards its target.
        point_features: the point columns to paste, by name; they must be the sample's columns
            (e.g. the ``point_features`` given to ``PreparedDataset``). All when None.
        fade_epochs: epochs at the end of training without pasting.
        total_epochs: the training's epochs (usually ``${trainer.epochs}``).
        class_names: the label order of the samples (``${dataset.class_names}``), a reordering of the
            database's; the database's order when None.
    """

    root: str
    split: str
    sample_groups: Mapping[str, int]
    min_points: int | Mapping[str, int] = 5
    limit_whole_scene: bool = True
    point_features: Sequence[str] | None = None
    fade_epochs: int = 0
    total_epochs: int | None = None
    class_names: Sequence[str] | None = None
    epoch: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.database = GTDatabase.load(Path(self.root) / self.split / "gt_database")
        db = self.database
        source = f"GT database of {Path(self.root) / self.split}"
        self.columns = column_indices(db.point_features, self.point_features, source)
        unknown = [n for n in self.sample_groups if n not in db.class_names]
        if unknown:
            raise ValueError(
                f"GTSampling.sample_groups: classes {unknown} not in the {source} ({db.class_names})"
            )
        if isinstance(self.min_points, Mapping):
            bad = [n for n in self.min_points if n not in db.class_names]
            if bad:
                raise ValueError(
                    f"GTSampling.min_points: classes {bad} not in the {source} ({db.class_names})"
                )
        relabel = label_order(db.class_names, self.class_names, source)
        self.labels = db.labels if relabel is None else relabel[db.labels]  # (M,) in the samples' order
        names = db.class_names if self.class_names is None else tuple(self.class_names)
        num_points = db.num_points
        self.groups: list[tuple[int, np.ndarray, int]] = []  # (sample label, database indices, target)
        for name, target in self.sample_groups.items():
            label = names.index(name)
            floor = self.min_points.get(name, 0) if isinstance(self.min_points, Mapping) else self.min_points
            pool = np.flatnonzero((self.labels == label) & (num_points >= floor))
            self.groups.append((label, pool, int(target)))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def active(self) -> bool:
        """False during the fade (the last ``fade_epochs`` of ``total_epochs``)."""
        if self.fade_epochs <= 0 or self.total_epochs is None:
            return True
        return self.epoch < self.total_epochs - self.fade_epochs

    def _draw(self, labels: torch.Tensor, generator: torch.Generator | None) -> np.ndarray:
        drawn = []
        for label, pool, target in self.groups:
            count = target - (int((labels == label).sum()) if self.limit_whole_scene else 0)
            if count > 0 and len(pool):
                drawn.append(pool[torch.randint(len(pool), (count,), generator=generator).numpy()])
        return np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if not self.active:
            return sample
        ann = sample.annotations
        drawn = self._draw(ann.labels, generator)
        if len(drawn) == 0:
            return sample
        db = self.database
        candidates = torch.from_numpy(db.boxes[drawn][:, :7]).to(torch.float32)
        # Greedy: a candidate goes in when it overlaps nothing in the scene nor any accepted one.
        free = ~(bev_iou(candidates, ann.boxes.tensor[:, :7].float()) > 0).any(1)
        overlap = (bev_iou(candidates, candidates) > 0).numpy()
        accepted: list[int] = []
        for i in np.flatnonzero(free.numpy()):
            if not overlap[i, accepted].any():
                accepted.append(int(i))
        if not accepted:
            return sample
        chosen = drawn[accepted]

        width = ann.boxes.tensor.shape[1]
        boxes = torch.zeros(len(chosen), width)
        db_boxes = torch.from_numpy(db.boxes[chosen]).to(torch.float32)
        common = min(width, db_boxes.shape[1])
        boxes[:, :common] = db_boxes[:, :common]
        object_points = [db.object_points(int(i)) for i in chosen]
        if self.columns is not None:
            object_points = [p[:, self.columns] for p in object_points]
        pasted_points = torch.from_numpy(np.concatenate(object_points)).to(sample.points.dtype)
        if pasted_points.shape[1] != sample.points.shape[1]:
            raise ValueError(
                f"GTSampling: the database pastes {pasted_points.shape[1]} point columns but the sample has "
                f"{sample.points.shape[1]}; set point_features to the sample's columns"
            )
        inside = points_in_boxes(sample.points[:, :3], boxes).any(1)
        points = torch.cat([sample.points[~inside], pasted_points])

        keypoints = visibility = None
        if ann.keypoints is not None:
            joints = ann.keypoints.shape[1]
            keypoints = torch.zeros(len(chosen), joints, 3)
            visibility = torch.zeros(len(chosen), joints, dtype=torch.bool)
            if db.keypoints is not None:
                if db.keypoints.shape[1] != joints:
                    raise ValueError(
                        f"GTSampling: database objects have {db.keypoints.shape[1]} keypoints, "
                        f"the sample {joints}"
                    )
                keypoints = torch.from_numpy(db.keypoints[chosen]).to(torch.float32)
                visibility = torch.from_numpy(db.keypoint_visibility[chosen])
            if ann.keypoint_visibility is None:
                visibility = None
        new = Annotations3D(
            boxes=Boxes3D(boxes.to(ann.boxes.tensor.dtype)),
            labels=torch.from_numpy(self.labels[chosen]).to(ann.labels.dtype),
            num_points=torch.from_numpy(db.num_points[chosen]).to(ann.num_points.dtype),
            difficulty=torch.from_numpy(db.difficulty[chosen]).to(ann.difficulty.dtype),
            track_ids=torch.full((len(chosen),), -1, dtype=ann.track_ids.dtype),
            keypoints=None if keypoints is None else keypoints.to(ann.keypoints.dtype),
            keypoint_visibility=visibility,
        )
        return replace(sample, points=points, annotations=_concat_annotations(ann, new))
