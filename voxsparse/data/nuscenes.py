"""nuScenes through the official devkit: LIDAR_TOP keyframes with previous sweeps, boxes with
velocity in the keyframe's LiDAR frame, the 10 detection classes, and CBGS resampling.

Reading is split in two so that preparation parallelises without loading the devkit's tables in
every worker: :func:`plan_samples` walks the tables once (main process) and returns one small,
picklable :class:`NuScenesSample` per keyframe; :func:`load_sample` (any process) reads its point
files and builds the :class:`~voxsparse.data.prepared.PreparedFrame`.

A frame (frame id = the sample token):

- points (N, 5) float32 ``(x, y, z, intensity, time_lag)``: the keyframe's LIDAR_TOP scan, then up
  to ``max_sweeps - 1`` previous LIDAR_TOP scans (the ``prev`` chain of sample_data, keyframes and
  sweeps alike, newest first; fewer at the start of a scene), each taken sweep sensor -> ego (at
  the sweep's time) -> global -> ego (at the keyframe's time) -> keyframe sensor. ``time_lag`` is
  the keyframe's timestamp minus the scan's, in seconds (0 for the keyframe). Points are kept as
  stored: no removal of points near the sensor. ``max_sweeps = 10`` is the usual "10-sweep" setting
  (the keyframe and 9 previous scans, about 0.45 s of data).
- boxes (K, 9) ``(x, y, z, dx, dy, dz, heading, vx, vy)`` in the keyframe's LIDAR_TOP frame: dx the
  annotation's length, dy its width; heading the yaw of the box's forward axis in the sensor's xy
  plane; velocity the devkit's ``box_velocity`` (global, m/s) rotated into the sensor axes, 0 where
  the devkit cannot estimate it (an object annotated in a single keyframe).
- labels: the 23 categories mapped to the 10 detection classes by the devkit's own
  ``category_to_detection_name`` (the detection evaluation's mapping); boxes of other categories
  are dropped. Label ``i`` is ``NUSCENES_DETECTION_NAMES[i]``.
- num_points: the annotation's ``num_lidar_pts``; difficulty 1 (nuScenes has no levels); track_ids
  the instance's row in the devkit's instance table.

Splits: a predefined devkit split (``train``/``val``/``test`` of v1.0-trainval / v1.0-test,
``mini_train``/``mini_val`` of v1.0-mini, via ``create_splits_scenes``) or a custom one from
``<dataroot>/<version>/splits.json``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from voxsparse.data.pointfile import read_points
from voxsparse.data.prepared import PreparationSplit, PreparedFrame
from voxsparse.data.tracking import DevkitDataset, TrackingSequences
from voxsparse.geometry import RigidTransform, wrap_angle

__all__ = [
    "NUSCENES_DETECTION_NAMES",
    "NUSCENES_POINT_FEATURES",
    "VERSION_SPLITS",
    "ClassBalancedDataset",
    "LidarScan",
    "NuScenesSample",
    "cbgs_indices",
    "lidar_to_global_from_nusc",
    "load_nuscenes",
    "load_sample",
    "plan_samples",
    "sample_frames",
    "sequences_from_nusc",
]

#: The ten classes of the nuScenes detection challenge, in the devkit's order; label ``i`` is
#: ``NUSCENES_DETECTION_NAMES[i]``.
NUSCENES_DETECTION_NAMES: tuple[str, ...] = (
    "car",
    "truck",
    "bus",
    "trailer",
    "construction_vehicle",
    "pedestrian",
    "motorcycle",
    "bicycle",
    "traffic_cone",
    "barrier",
)

#: The seven classes of the nuScenes tracking challenge (the devkit's ``TRACKING_NAMES``).
NUSCENES_TRACKING_NAMES: tuple[str, ...] = ("bicycle", "bus", "car", "motorcycle", "pedestrian", "trailer", "truck")

NUSCENES_POINT_FEATURES: tuple[str, ...] = ("x", "y", "z", "intensity", "time_lag")

#: The predefined splits of each release (the devkit's names).
VERSION_SPLITS: dict[str, tuple[str, ...]] = {
    "v1.0-trainval": ("train", "val"),
    "v1.0-test": ("test",),
    "v1.0-mini": ("mini_train", "mini_val"),
}



def load_nuscenes(root: str | os.PathLike, version: str) -> Any:
    """``nuscenes.NuScenes(version, dataroot=root)``, quietly.

    Raises:
        ImportError: nuscenes-devkit is not installed (``pip install -e ".[nuscenes]"``).
    """
    try:
        from nuscenes import NuScenes
    except ImportError as exc:
        raise ImportError('the nuScenes loader needs nuscenes-devkit: pip install -e ".[nuscenes]"') from exc
    tables = Path(root) / version
    if not tables.is_dir():
        raise FileNotFoundError(f"nuScenes tables {tables}: not found (expected <root>/{version}/*.json)")
    return NuScenes(version=version, dataroot=str(root), verbose=False)


@dataclass(frozen=True)
class LidarScan:
    """One LIDAR_TOP point file and where it goes.

    Attributes:
        path: the ``.pcd.bin`` file.
        to_keyframe: its sensor frame -> the keyframe's sensor frame.
        time_lag: keyframe timestamp minus this scan's, seconds.
    """

    path: str
    to_keyframe: RigidTransform
    time_lag: float


@dataclass(frozen=True)
class NuScenesSample:
    """Everything needed to build one keyframe's frame, without the devkit.

    Attributes:
        token: the sample token (the frame id).
        scans: the keyframe scan first, then previous scans, newest first.
        boxes: (K, 9) float32 boxes in the keyframe's LiDAR frame (module docstring).
        labels, num_points, track_ids: (K,) int64.
    """

    token: str
    scans: tuple[LidarScan, ...]
    boxes: np.ndarray
    labels: np.ndarray
    num_points: np.ndarray
    track_ids: np.ndarray


def _sensor_to_global(nusc: Any, sample_data: dict) -> RigidTransform:
    """Sensor-to-global transform of a sample_data record (ego_pose @ calibrated_sensor)."""
    cs = nusc.get("calibrated_sensor", sample_data["calibrated_sensor_token"])
    ego = nusc.get("ego_pose", sample_data["ego_pose_token"])
    return RigidTransform(ego["rotation"], ego["translation"]) @ RigidTransform(
        cs["rotation"], cs["translation"]
    )


def lidar_to_global_from_nusc(
    nusc: Any, sample_tokens: Sequence[str] | None = None
) -> dict[str, RigidTransform]:
    """LIDAR_TOP-to-global transform of each sample's keyframe (ego_pose @ calibrated_sensor).

    The frame of a loaded sample's points and boxes, and the one its detections are exported from
    (:func:`voxsparse.evaluation.nuscenes.export_submission`).

    Args:
        nusc: a loaded ``nuscenes.NuScenes``.
        sample_tokens: samples to look up; all samples when None.
    """
    tokens = [s["token"] for s in nusc.sample] if sample_tokens is None else sample_tokens
    return {
        token: _sensor_to_global(nusc, nusc.get("sample_data", nusc.get("sample", token)["data"]["LIDAR_TOP"]))
        for token in tokens
    }


def sequences_from_nusc(nusc: Any, sample_tokens: Sequence[str]) -> tuple[list[list[int]], list[float]]:
    """Group samples into their scenes, in time order.

    Args:
        nusc: a loaded ``nuscenes.NuScenes``.
        sample_tokens: samples in any order.

    Returns:
        Per scene (in order of first appearance), indices into ``sample_tokens`` sorted by time; and
        per sample, its timestamp in seconds.
    """
    samples = [nusc.get("sample", t) for t in sample_tokens]
    scenes: dict[str, list[int]] = {}
    for i, sample in enumerate(samples):
        scenes.setdefault(sample["scene_token"], []).append(i)
    order = [sorted(v, key=lambda i: samples[i]["timestamp"]) for v in scenes.values()]
    return order, [s["timestamp"] * 1e-6 for s in samples]


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """``tools/prepare_data.py nuscenes`` options (splits: the devkit's, or custom ones of
    ``<root>/<version>/splits.json``)."""
    parser.set_defaults(root="data/nuscenes", out="data/prepared/nuscenes")
    parser.add_argument("--version", default="v1.0-trainval", help="v1.0-trainval | v1.0-mini | v1.0-test")
    parser.add_argument(
        "--sweeps", type=int, default=10, help="LiDAR scans per frame, the keyframe included (default 10)"
    )


def preparation_splits(args: argparse.Namespace) -> list[PreparationSplit]:
    """The splits ``tools/prepare_data.py nuscenes`` prepares: ``--splits``, else the version's."""
    splits = args.splits or VERSION_SPLITS.get(args.version)
    if not splits:
        raise SystemExit(f"--version {args.version}: no predefined splits known; name them with --splits")
    nusc = load_nuscenes(args.root, args.version)
    config = {"dataset": "nuscenes", "version": args.version, "max_sweeps": args.sweeps}

    def tasks(split: str) -> dict[str, NuScenesSample]:
        return {s.token: s for s in plan_samples(nusc, split, args.sweeps)}

    return [
        PreparationSplit(split, sample_frames, functools.partial(tasks, split), NUSCENES_DETECTION_NAMES, config)
        for split in splits
    ]


class NuScenesTracking:
    """Tracking on a prepared nuScenes split (``configs/dataset/nuscenes.yaml``, ``tracking``): its
    scenes in time order, scored against the raw dataset by the devkit.

    Args:
        frames: the prepared split (frame ids are sample tokens).
        raw_root, version, eval_set: the raw dataset and the devkit split the frames come from.
    """

    def __init__(self, frames: Dataset, raw_root: str, version: str, eval_set: str):
        self._frames, self.raw_root, self.version, self.eval_set = frames, raw_root, version, eval_set

    def frames(self) -> Dataset:
        return self._frames

    def sequences(self, frames: Dataset, frame_ids: Sequence[str]) -> TrackingSequences:
        from nuscenes import NuScenes

        nusc = NuScenes(version=self.version, dataroot=str(self.raw_root), verbose=False)
        tokens = list(frame_ids)  # prepared nuScenes frames are named by their sample token
        indices, timestamps = sequences_from_nusc(nusc, tokens)
        return TrackingSequences(
            indices=indices,
            timestamps=timestamps,
            tracking_names={n: n for n in NUSCENES_TRACKING_NAMES},
            devkit=DevkitDataset(
                Path(self.raw_root), self.version, self.eval_set, tokens, lidar_to_global_from_nusc(nusc, tokens)
            ),
        )


def _boxes(nusc: Any, sample: dict, global_to_lidar: RigidTransform) -> tuple[np.ndarray, ...]:
    from nuscenes.eval.detection.utils import category_to_detection_name

    rotation = global_to_lidar.matrix()
    rows, labels, num_points, track_ids = [], [], [], []
    for token in sample["anns"]:
        ann = nusc.get("sample_annotation", token)
        name = category_to_detection_name(ann["category_name"])
        if name is None:
            continue
        width, length, height = ann["size"]
        box_rotation = rotation @ RigidTransform(ann["rotation"], (0.0, 0.0, 0.0)).matrix()
        heading = math.atan2(box_rotation[1, 0], box_rotation[0, 0])
        velocity = np.nan_to_num(np.asarray(nusc.box_velocity(token), dtype=np.float64), nan=0.0)
        center = global_to_lidar.apply(np.asarray(ann["translation"], dtype=np.float64)[None])[0]
        vx, vy = (rotation @ velocity)[:2]
        rows.append([*center, length, width, height, heading, vx, vy])
        labels.append(NUSCENES_DETECTION_NAMES.index(name))
        num_points.append(ann["num_lidar_pts"])
        track_ids.append(nusc.getind("instance", ann["instance_token"]))
    boxes = np.asarray(rows, dtype=np.float64).reshape(-1, 9)
    # Heading in [-pi, pi): atan2 may return +pi.
    boxes[:, 6] = wrap_angle(boxes[:, 6])
    return (
        boxes.astype(np.float32),
        np.asarray(labels, dtype=np.int64),
        np.asarray(num_points, dtype=np.int64),
        np.asarray(track_ids, dtype=np.int64),
    )


def plan_samples(nusc: Any, split: str, max_sweeps: int = 10) -> list[NuScenesSample]:
    """The keyframes of ``split``, scene by scene in time order, each with its scans and boxes.

    Args:
        nusc: a loaded ``nuscenes.NuScenes``.
        split: a predefined split of ``nusc``'s version or a custom one in its ``splits.json``.
        max_sweeps: scans per frame, the keyframe included (>= 1).
    """
    from nuscenes.utils.splits import get_scenes_of_split

    if max_sweeps < 1:
        raise ValueError(f"max_sweeps: expected >= 1 (the keyframe alone), got {max_sweeps}")
    try:
        scene_names = set(get_scenes_of_split(split, nusc))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"nuScenes split {split!r}: unknown for {nusc.version} ({exc})") from exc
    scenes = [s for s in nusc.scene if s["name"] in scene_names]
    if not scenes:
        raise ValueError(
            f"nuScenes split {split!r}: none of its {len(scene_names)} scenes are in {nusc.dataroot}/{nusc.version}; "
            f"the predefined splits of {nusc.version} are {VERSION_SPLITS.get(nusc.version, '?')}"
        )
    samples = []
    for scene in scenes:
        token = scene["first_sample_token"]
        while token:
            sample = nusc.get("sample", token)
            samples.append(_plan_sample(nusc, sample, max_sweeps))
            token = sample["next"]
    return samples


def _plan_sample(nusc: Any, sample: dict, max_sweeps: int) -> NuScenesSample:
    key = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    # The keyframe's transform comes from the same helper the nuScenes export uses to go back to
    # the global frame, so boxes and exported detections share one definition of this frame.
    key_to_global = lidar_to_global_from_nusc(nusc, [sample["token"]])[sample["token"]]
    global_to_key = key_to_global.inverse()
    scans = [LidarScan(os.path.join(nusc.dataroot, key["filename"]), RigidTransform.from_yaw(0.0), 0.0)]
    record = key
    while len(scans) < max_sweeps and record["prev"]:
        record = nusc.get("sample_data", record["prev"])
        scans.append(
            LidarScan(
                os.path.join(nusc.dataroot, record["filename"]),
                global_to_key @ _sensor_to_global(nusc, record),
                (key["timestamp"] - record["timestamp"]) * 1e-6,
            )
        )
    boxes, labels, num_points, track_ids = _boxes(nusc, sample, global_to_key)
    return NuScenesSample(sample["token"], tuple(scans), boxes, labels, num_points, track_ids)


def load_sample(sample: NuScenesSample) -> PreparedFrame:
    """Read ``sample``'s scans and build its frame (module docstring)."""
    clouds = []
    for scan in sample.scans:
        raw = read_points(scan.path, format="nuscenes").points
        cloud = np.empty((len(raw), len(NUSCENES_POINT_FEATURES)), dtype=np.float32)
        cloud[:, 0:3] = scan.to_keyframe.apply(raw[:, 0:3])
        cloud[:, 3] = raw[:, 3]
        cloud[:, 4] = scan.time_lag
        clouds.append(cloud)
    k = len(sample.boxes)
    return PreparedFrame(
        frame_id=sample.token,
        points=np.concatenate(clouds),
        boxes=sample.boxes,
        labels=sample.labels,
        num_points=sample.num_points,
        difficulty=np.ones(k, dtype=np.int64),
        track_ids=sample.track_ids,
        point_features=NUSCENES_POINT_FEATURES,
    )


def sample_frames(sample: NuScenesSample) -> tuple[PreparedFrame]:
    """:func:`load_sample` as the frame factory of :func:`voxsparse.data.prepared.prepare`."""
    return (load_sample(sample),)


# --- CBGS --------------------------------------------------------------------------------------


def cbgs_indices(
    frame_classes: Sequence[Collection[int]], num_classes: int, rng: np.random.Generator
) -> np.ndarray:
    """Class-balanced resampling of frames (CBGS, Zhu et al. 2019, "Class-balanced Grouping and
    Sampling for Point Cloud 3D Object Detection").

    Let ``F_c`` be the frames containing class c, ``D = sum_c |F_c|`` (a frame counts once per class
    it contains) and ``K = num_classes``. Each class c with ``F_c`` non-empty contributes
    ``floor(|F_c| * (1/K) / (|F_c| / D)) = floor(D / K)`` frames drawn uniformly with replacement
    from ``F_c``, so every present class ends up in about the same number of sampled frames.

    Args:
        frame_classes: per frame, the labels of its boxes (repeats allowed).
        num_classes: K.
        rng: the random generator.

    Returns:
        (sum over present classes of floor(D / K),) int64 frame indices, grouped class by class.
    """
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, classes in enumerate(frame_classes):
        for c in {int(c) for c in classes}:
            if not 0 <= c < num_classes:
                raise ValueError(f"frame {i}: label {c} outside [0, {num_classes})")
            members[c].append(i)
    per_class = sum(len(m) for m in members) // num_classes
    picks = [rng.choice(np.asarray(m), per_class, replace=True) for m in members if m]
    return np.concatenate(picks).astype(np.int64) if picks else np.zeros(0, dtype=np.int64)


class ClassBalancedDataset(Dataset):
    """A dataset resampled by :func:`cbgs_indices` once, at construction (seeded).

    Args:
        source: a dataset with ``class_names`` and ``frame_labels()`` (e.g.
            :class:`~voxsparse.data.prepared.PreparedDataset`, whose labels come from its index).
        seed: seeds the resampling.
    """

    def __init__(self, source: Any, seed: int = 0) -> None:
        self.source = source
        self.indices = cbgs_indices(
            source.frame_labels(), len(source.class_names), np.random.default_rng(seed)
        )
        if len(self.indices) == 0:
            raise ValueError("ClassBalancedDataset: the source has no labelled frame to resample")

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.source.class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.source[int(self.indices[index])]
