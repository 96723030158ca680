"""What a dataset hands the tracking evaluation (``voxsparse.engine.tracking``).

A dataset config's ``tracking`` section builds an object of its dataset module with two methods:

* ``frames()``: the dataset (frames with ``frame_id``) whose every frame is detected;
* ``sequences(frames, frame_ids)``: a :class:`TrackingSequences`, the frames grouped into sequences
  in time order and the ground truth the tracks are scored against.

Tracks are scored by the nuScenes devkit's ``TrackingEval``: either against a nuScenes-format dataset
on disk (:class:`DevkitDataset`: real nuScenes) or against ground truth that the evaluation first
writes as a tiny nuScenes dataset from the frames' own annotations and ego poses
(:attr:`TrackingSequences.devkit` None: the synthetic world).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxsparse.geometry import RigidTransform

__all__ = ["DevkitDataset", "TrackingSequences"]


@dataclass(frozen=True)
class DevkitDataset:
    """A nuScenes-format dataset the devkit scores tracks against.

    Attributes:
        dataroot, version, eval_set: what ``TrackingEval`` loads (``eval_set`` names the split).
        sample_tokens: per dataset index, its sample token.
        lidar_to_global: per sample token, the transform its LiDAR-frame boxes go to the global frame with.
    """

    dataroot: Path
    version: str
    eval_set: str
    sample_tokens: Sequence[str]
    lidar_to_global: Mapping[str, RigidTransform]


@dataclass(frozen=True)
class TrackingSequences:
    """A dataset's frames grouped into sequences, and how their tracks are scored.

    Attributes:
        indices: per sequence, dataset indices in time order.
        timestamps: per dataset index, seconds.
        tracking_names: class name -> the nuScenes tracking name it is tracked and scored as (its gate
            in ``configs/track.yaml`` is that name's); classes not listed are not tracked.
        devkit: the nuScenes-format dataset to score against; None: the ground truth is written from
            the frames' annotations (:attr:`ego_poses`, :attr:`categories`).
        ego_poses: per dataset index, the (4, 4) world-from-LiDAR transform (``devkit`` None only).
        categories: class name -> nuScenes category of written ground truth (``devkit`` None only).
        range_limited: ground truth beyond the detector's range counts (the devkit's radii do not
            apply): the evaluation then scores within the circle inscribed in that range, unless
            ``class_range`` is given.
    """

    indices: list[list[int]]
    timestamps: list[float]
    tracking_names: Mapping[str, str]
    devkit: DevkitDataset | None = None
    ego_poses: list[np.ndarray] | None = None
    categories: Mapping[str, str] | None = None
    range_limited: bool = False

    def __post_init__(self) -> None:
        if self.devkit is None and (self.ego_poses is None or self.categories is None):
            raise ValueError("TrackingSequences: without a devkit dataset, ego_poses and categories are needed")
        covered = sorted(i for seq in self.indices for i in seq)
        if covered != sorted(set(covered)) or any(not 0 <= i < len(self.timestamps) for i in covered):
            raise ValueError("TrackingSequences.indices: each dataset index at most once, within the timestamps")
