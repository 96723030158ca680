"""Write a tiny but complete nuScenes-format dataset that the nuScenes devkit loads.

The layout is the real one, so ``nuscenes.NuScenes(version=spec.version, dataroot=root)`` reads it
and every devkit tool (box velocities, sweep chains, interpolated sweep boxes, the detection
evaluation) works on it::

    root/
      <version>/{category,attribute,visibility,instance,sensor,calibrated_sensor,ego_pose,log,
                 scene,sample,sample_data,sample_annotation,map}.json
      <version>/splits.json                   custom splits, read by the devkit's evaluation
      samples/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp_us>.pcd.bin   keyframes
      sweeps/LIDAR_TOP/<log>__LIDAR_TOP__<timestamp_us>.pcd.bin    sweeps between keyframes
      maps/<token>.png                         all-zero map-mask stub (the devkit opens one per map)

A scene is a LIDAR_TOP recording: keyframes ("samples") every ``keyframe_interval_s``, optionally
``sweeps_per_interval`` sweeps before each. Objects move at constant global velocity and the ego
vehicle at constant global velocity and yaw rate, so the devkit's ``box_velocity`` (a difference
of annotation positions) returns each object's velocity exactly. Point files are float32
``(x, y, z, intensity, ring)`` in the sensor frame, as nuScenes stores them: ``points_per_object``
points strictly inside each annotated box (``num_lidar_pts`` counts them: the devkit's evaluation
drops boxes with none) plus ground points at global z = 0 outside every box.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxsparse.geometry import RigidTransform, points_in_boxes
from voxsparse.utils.io import atomic_write

__all__ = [
    "NUSCENES_ATTRIBUTES",
    "NUSCENES_CATEGORIES",
    "TinyNuScenes",
    "TinyNuScenesSpec",
    "TinyObject",
    "TinyScene",
    "write_tiny_nuscenes",
]

#: The 23 categories of nuScenes v1.0.
NUSCENES_CATEGORIES: tuple[str, ...] = (
    "animal",
    "human.pedestrian.adult",
    "human.pedestrian.child",
    "human.pedestrian.construction_worker",
    "human.pedestrian.personal_mobility",
    "human.pedestrian.police_officer",
    "human.pedestrian.stroller",
    "human.pedestrian.wheelchair",
    "movable_object.barrier",
    "movable_object.debris",
    "movable_object.pushable_pullable",
    "movable_object.trafficcone",
    "static_object.bicycle_rack",
    "vehicle.bicycle",
    "vehicle.bus.bendy",
    "vehicle.bus.rigid",
    "vehicle.car",
    "vehicle.construction",
    "vehicle.emergency.ambulance",
    "vehicle.emergency.police",
    "vehicle.motorcycle",
    "vehicle.trailer",
    "vehicle.truck",
)

#: The 8 attributes of nuScenes v1.0.
NUSCENES_ATTRIBUTES: tuple[str, ...] = (
    "vehicle.moving",
    "vehicle.stopped",
    "vehicle.parked",
    "cycle.with_rider",
    "cycle.without_rider",
    "pedestrian.sitting_lying_down",
    "pedestrian.standing",
    "pedestrian.moving",
)

#: The devkit's hard-coded splits: a custom split of one of these names would be ignored.
_PREDEFINED_SPLITS = ("train", "val", "test", "mini_train", "mini_val", "train_detect", "train_track")

_VISIBILITY = (("1", "v0-40"), ("2", "v40-60"), ("3", "v60-80"), ("4", "v80-100"))

#: Object points fill this fraction of each box extent, so none lies near a face.
_OBJECT_FILL = 0.9
#: Ground points stay this far (metres) outside every box footprint.
_GROUND_MARGIN = 0.1


@dataclass(frozen=True)
class TinyObject:
    """One annotated object (one nuScenes instance), moving at constant velocity.

    Attributes:
        category: a nuScenes category, e.g. ``"vehicle.car"`` (:data:`NUSCENES_CATEGORIES`).
        translation: global box centre (x, y, z) at the scene's first keyframe, metres.
        size: (width, length, height), metres, nuScenes' order; length lies along ``yaw``.
        yaw: global heading, radians counter-clockwise about +z from +x.
        velocity: global (vx, vy), m/s.
        attribute: a nuScenes attribute or None (:data:`NUSCENES_ATTRIBUTES`).
        samples: keyframe indices the object is annotated in (and has points in), increasing (gaps
            allowed: an occluded object); all when None.
        poses: per keyframe of ``samples``, the global (x, y, z, yaw), replacing the constant-velocity
            motion of ``translation``, ``velocity`` and ``yaw`` (e.g. the exact poses of a recorded
            sequence); needs ``samples`` and a spec without sweeps.
    """

    category: str
    translation: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float = 0.0
    velocity: tuple[float, float] = (0.0, 0.0)
    attribute: str | None = None
    samples: range | tuple[int, ...] | None = None
    poses: tuple[tuple[float, float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.category not in NUSCENES_CATEGORIES:
            raise ValueError(f"TinyObject.category: {self.category!r} is not a nuScenes category")
        if self.attribute is not None and self.attribute not in NUSCENES_ATTRIBUTES:
            raise ValueError(f"TinyObject.attribute: {self.attribute!r} is not a nuScenes attribute")
        for name, n in (("translation", 3), ("size", 3), ("velocity", 2)):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (n,) or not np.isfinite(value).all():
                raise ValueError(f"TinyObject.{name}: expected {n} finite floats, got {getattr(self, name)}")
        if min(self.size) <= 0:
            raise ValueError(f"TinyObject.size: (width, length, height) must be positive, got {self.size}")
        if not math.isfinite(self.yaw):
            raise ValueError(f"TinyObject.yaw: expected a finite float, got {self.yaw}")
        if self.samples is not None and (len(self.samples) == 0 or any(np.diff(list(self.samples)) <= 0)):
            raise ValueError(
                f"TinyObject.samples: expected non-empty increasing keyframe indices, got {self.samples}"
            )
        if self.poses is not None:
            poses = np.asarray(self.poses, dtype=np.float64)
            if self.samples is None or poses.shape != (len(self.samples), 4) or not np.isfinite(poses).all():
                raise ValueError(
                    "TinyObject.poses: expected one finite (x, y, z, yaw) per keyframe of samples, got shape "
                    f"{poses.shape} for samples {self.samples}"
                )


@dataclass(frozen=True)
class TinyScene:
    """One scene: its keyframes, objects and ego motion (all global, ego z = 0 as in nuScenes).

    Attributes:
        name: scene name, e.g. ``"scene-0001"``; unique in the dataset.
        num_samples: keyframes (>= 1).
        objects: the scene's objects.
        ego_translation: ego (x, y) at the first keyframe, metres.
        ego_yaw: ego heading at the first keyframe, radians.
        ego_velocity: ego (vx, vy), m/s.
        ego_yaw_rate: rad/s.
        location: the log's location; one map record per location.
    """

    name: str
    num_samples: int
    objects: tuple[TinyObject, ...] = ()
    ego_translation: tuple[float, float] = (0.0, 0.0)
    ego_yaw: float = 0.0
    ego_velocity: tuple[float, float] = (0.0, 0.0)
    ego_yaw_rate: float = 0.0
    location: str = "singapore-onenorth"

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TinyScene.name: must not be empty")
        if self.num_samples < 1:
            raise ValueError(f"TinyScene {self.name}: num_samples must be >= 1, got {self.num_samples}")
        for i, obj in enumerate(self.objects):
            if obj.samples is not None and (min(obj.samples) < 0 or max(obj.samples) >= self.num_samples):
                raise ValueError(
                    f"TinyScene {self.name}: objects[{i}].samples {obj.samples} outside the scene's "
                    f"{self.num_samples} keyframes"
                )

    def ego_pose(self, seconds: float) -> RigidTransform:
        """Ego-to-global transform ``seconds`` after the first keyframe."""
        x, y = np.asarray(self.ego_translation) + seconds * np.asarray(self.ego_velocity)
        return RigidTransform.from_yaw(self.ego_yaw + seconds * self.ego_yaw_rate, (x, y, 0.0))


@dataclass(frozen=True)
class TinyNuScenesSpec:
    """What :func:`write_tiny_nuscenes` writes.

    Attributes:
        scenes: the scenes, in time order.
        version: the table folder name; ``NuScenes(version=...)`` must be given the same.
        splits: custom split name -> scene names, written to ``<version>/splits.json``; the default
            puts every scene in one split, ``"tiny"``.
        keyframe_interval_s: time between keyframes (nuScenes: 0.5 s).
        sweeps_per_interval: LIDAR_TOP sweeps before each keyframe (nuScenes: 9).
        lidar_translation: LIDAR_TOP position in the ego frame, metres (nuScenes' typical value).
        lidar_rotation: LIDAR_TOP orientation in the ego frame, quaternion (w, x, y, z); the
            default turns the sensor -90 degrees about z, as in nuScenes (sensor x points right).
        points_per_object: points inside each annotated box per sweep / keyframe (>= 1, so that
            the devkit's evaluation keeps the box).
        ground_points: ground points per sweep / keyframe, within ``ground_radius`` of the ego.
        ground_radius: metres.
        seed: seeds the point sampling.
        start_timestamp_us: timestamp of the first scene's first keyframe, microseconds.
    """

    scenes: tuple[TinyScene, ...]
    version: str = "v1.0-mini"
    splits: Mapping[str, tuple[str, ...]] | None = None
    keyframe_interval_s: float = 0.5
    sweeps_per_interval: int = 0
    lidar_translation: tuple[float, float, float] = (0.943713, 0.0, 1.84023)
    lidar_rotation: tuple[float, float, float, float] = (math.sqrt(0.5), 0.0, 0.0, -math.sqrt(0.5))
    points_per_object: int = 16
    ground_points: int = 64
    ground_radius: float = 40.0
    seed: int = 0
    start_timestamp_us: int = 1_532_402_927_000_000

    def __post_init__(self) -> None:
        names = [s.name for s in self.scenes]
        if not names:
            raise ValueError("TinyNuScenesSpec.scenes: at least one scene is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"TinyNuScenesSpec.scenes: scene names must be unique, got {names}")
        if not self.version or os.sep in self.version:
            raise ValueError(f"TinyNuScenesSpec.version: expected a folder name, got {self.version!r}")
        if self.sweeps_per_interval and any(o.poses is not None for s in self.scenes for o in s.objects):
            raise ValueError("TinyNuScenesSpec: objects with poses are known at keyframes only; use sweeps_per_interval=0")
        for split, scenes in self.split_scenes().items():
            if split in _PREDEFINED_SPLITS:
                raise ValueError(
                    f"TinyNuScenesSpec.splits: {split!r} is a predefined nuScenes split (its scenes are fixed in "
                    f"the devkit); name custom splits otherwise, e.g. 'tiny_val'"
                )
            unknown = [s for s in scenes if s not in names]
            if unknown:
                raise ValueError(f"TinyNuScenesSpec.splits[{split!r}]: unknown scenes {unknown}")
        if self.keyframe_interval_s <= 0:
            raise ValueError(
                f"TinyNuScenesSpec.keyframe_interval_s: must be > 0, got {self.keyframe_interval_s}"
            )
        for name in ("sweeps_per_interval", "ground_points"):
            if getattr(self, name) < 0:
                raise ValueError(f"TinyNuScenesSpec.{name}: must be >= 0, got {getattr(self, name)}")
        if self.points_per_object < 1:
            raise ValueError(
                f"TinyNuScenesSpec.points_per_object: must be >= 1, got {self.points_per_object}"
            )
        RigidTransform(self.lidar_rotation, self.lidar_translation)  # validates both

    def split_scenes(self) -> dict[str, tuple[str, ...]]:
        """Split name -> scene names (the default: ``{"tiny": every scene}``)."""
        if self.splits is None:
            return {"tiny": tuple(s.name for s in self.scenes)}
        return {k: tuple(v) for k, v in self.splits.items()}


@dataclass(frozen=True)
class TinyNuScenes:
    """What was written.

    Attributes:
        dataroot: pass as ``NuScenes(dataroot=...)``.
        version: pass as ``NuScenes(version=...)``.
        splits: split name -> scene names (custom splits in ``<version>/splits.json``).
        sample_tokens: per scene, its keyframe sample tokens in time order.
    """

    dataroot: Path
    version: str
    splits: dict[str, tuple[str, ...]]
    sample_tokens: tuple[tuple[str, ...], ...]


def _token(*parts: object) -> str:
    """A deterministic 32-hex-digit token, like nuScenes' own."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def _write_json(path: Path, content: object) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(content, indent=1).encode("utf-8")))


def _png_stub(size: int = 8) -> bytes:
    """An all-zero 8-bit grayscale PNG, ``size`` x ``size`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(size) for _ in range(size))  # filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _boxes_at(scene: TinyScene, objects: list[int], seconds: float, keyframe: int) -> np.ndarray:
    """(K, 7) global boxes ``(x, y, z, length, width, height, yaw)`` of ``objects`` at ``seconds``
    (keyframe ``keyframe`` or a sweep before it)."""
    rows = []
    for i in objects:
        obj = scene.objects[i]
        width, length, height = obj.size
        if obj.poses is not None:
            x, y, z, yaw = obj.poses[list(obj.samples).index(keyframe)]
            rows.append([x, y, z, length, width, height, yaw])
            continue
        x, y, z = obj.translation
        vx, vy = obj.velocity
        rows.append([x + vx * seconds, y + vy * seconds, z, length, width, height, obj.yaw])
    return np.asarray(rows, dtype=np.float64).reshape(-1, 7)


def _sweep_points(
    spec: TinyNuScenesSpec, boxes: np.ndarray, ego: RigidTransform, rng: np.random.Generator
) -> np.ndarray:
    """(P, 3) float64 global points: ``points_per_object`` inside each box, then ground points."""
    k, n = len(boxes), spec.points_per_object
    local = (rng.random((k, n, 3)) - 0.5) * _OBJECT_FILL * boxes[:, None, 3:6]
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    objects = (
        np.stack(
            [
                cos * local[..., 0] - sin * local[..., 1],
                sin * local[..., 0] + cos * local[..., 1],
                local[..., 2],
            ],
            axis=-1,
        )
        + boxes[:, None, 0:3]
    )
    radius = spec.ground_radius * np.sqrt(rng.random(spec.ground_points))
    angle = rng.random(spec.ground_points) * 2 * math.pi
    ego_xy = np.asarray(ego.translation[:2])
    ground = np.stack(
        [ego_xy[0] + radius * np.cos(angle), ego_xy[1] + radius * np.sin(angle), np.zeros_like(radius)], 1
    )
    if k:
        # Keep ground points clear of every box footprint, whatever its height.
        footprints = torch.from_numpy(boxes.copy())
        footprints[:, 3:5] += 2 * _GROUND_MARGIN
        footprints[:, 2], footprints[:, 5] = 0.0, math.inf
        ground = ground[~points_in_boxes(torch.from_numpy(ground), footprints).any(1).numpy()]
    return np.concatenate([objects.reshape(-1, 3), ground])


def _write_scene(
    root: Path,
    spec: TinyNuScenesSpec,
    index: int,
    scene: TinyScene,
    tables: dict[str, list],
    rng: np.random.Generator,
) -> tuple[str, ...]:
    """Append one scene's records to ``tables`` and write its point files; returns its sample tokens."""
    log_token, scene_token, cs_token = (
        _token("log", scene.name),
        _token("scene", scene.name),
        _token("cs", scene.name),
    )
    logfile = f"tiny-{index:04d}"
    tables["log"].append(
        {
            "token": log_token,
            "logfile": logfile,
            "vehicle": "tiny",
            "date_captured": "2018-08-01",
            "location": scene.location,
        }
    )
    tables["calibrated_sensor"].append(
        {
            "token": cs_token,
            "sensor_token": _token("sensor", "LIDAR_TOP"),
            "translation": list(spec.lidar_translation),
            "rotation": list(spec.lidar_rotation),
            "camera_intrinsic": [],
        }
    )
    lidar_to_ego = RigidTransform(spec.lidar_rotation, spec.lidar_translation)
    # Scenes lie 100 s apart so no velocity estimate could span two of them.
    start_us = spec.start_timestamp_us + index * 100_000_000
    interval_us = round(spec.keyframe_interval_s * 1e6)
    sample_tokens = tuple(_token("sample", scene.name, k) for k in range(scene.num_samples))
    present = [
        [i for i, o in enumerate(scene.objects) if o.samples is None or k in o.samples]
        for k in range(scene.num_samples)
    ]

    # LIDAR_TOP records in time order: the sweeps before each keyframe belong to that keyframe's
    # sample (as in nuScenes; the devkit's sweep-box interpolation relies on it).
    records = []
    for k in range(scene.num_samples):
        for j in range(spec.sweeps_per_interval, -1, -1):
            records.append(
                (k, j == 0, start_us + k * interval_us - j * interval_us // (spec.sweeps_per_interval + 1))
            )
    sd_tokens = [_token("sample_data", scene.name, t) for _, _, t in records]
    keyframe_points: dict[int, np.ndarray] = {}
    for r, (k, is_key, timestamp) in enumerate(records):
        seconds = (timestamp - start_us) * 1e-6
        ego = scene.ego_pose(seconds)
        lidar_to_global = ego @ lidar_to_ego
        points = lidar_to_global.inverse().apply(
            _sweep_points(spec, _boxes_at(scene, present[k], seconds, k), ego, rng)
        )
        cloud = np.zeros((len(points), 5), dtype=np.float32)
        cloud[:, 0:3] = points
        cloud[:, 3] = rng.integers(0, 256, len(points))  # intensity
        cloud[:, 4] = rng.integers(0, 32, len(points))  # ring index
        filename = f"{'samples' if is_key else 'sweeps'}/LIDAR_TOP/{logfile}__LIDAR_TOP__{timestamp}.pcd.bin"
        atomic_write(root / filename, lambda f, c=cloud: f.write(c.tobytes()))
        if is_key:
            # Count what a reader gets back: the stored float32 points, taken to the global frame.
            keyframe_points[k] = lidar_to_global.apply(cloud[:, 0:3].astype(np.float64))
        ego_token = _token("ego_pose", scene.name, timestamp)
        tables["ego_pose"].append(
            {
                "token": ego_token,
                "timestamp": timestamp,
                "rotation": list(ego.rotation),
                "translation": list(ego.translation),
            }
        )
        tables["sample_data"].append(
            {
                "token": sd_tokens[r],
                "sample_token": sample_tokens[k],
                "ego_pose_token": ego_token,
                "calibrated_sensor_token": cs_token,
                "timestamp": timestamp,
                "fileformat": "pcd",
                "is_key_frame": is_key,
                "height": 0,
                "width": 0,
                "filename": filename,
                "prev": sd_tokens[r - 1] if r > 0 else "",
                "next": sd_tokens[r + 1] if r + 1 < len(records) else "",
            }
        )

    for k, token in enumerate(sample_tokens):
        tables["sample"].append(
            {
                "token": token,
                "timestamp": start_us + k * interval_us,
                "prev": sample_tokens[k - 1] if k > 0 else "",
                "next": sample_tokens[k + 1] if k + 1 < len(sample_tokens) else "",
                "scene_token": scene_token,
            }
        )
    for i, obj in enumerate(scene.objects):
        instance_token = _token("instance", scene.name, i)
        frames = [k for k in range(scene.num_samples) if i in present[k]]
        ann_tokens = [_token("sample_annotation", scene.name, i, k) for k in frames]
        for n, k in enumerate(frames):
            box = _boxes_at(scene, [i], k * interval_us * 1e-6, k)
            inside = points_in_boxes(torch.from_numpy(keyframe_points[k]), torch.from_numpy(box))
            tables["sample_annotation"].append(
                {
                    "token": ann_tokens[n],
                    "sample_token": sample_tokens[k],
                    "instance_token": instance_token,
                    "visibility_token": "4",
                    "attribute_tokens": [] if obj.attribute is None else [_token("attribute", obj.attribute)],
                    "translation": box[0, 0:3].tolist(),
                    "size": list(obj.size),
                    "rotation": list(RigidTransform.from_yaw(box[0, 6]).rotation),
                    "prev": ann_tokens[n - 1] if n > 0 else "",
                    "next": ann_tokens[n + 1] if n + 1 < len(frames) else "",
                    "num_lidar_pts": int(inside.sum()),
                    "num_radar_pts": 0,
                }
            )
        tables["instance"].append(
            {
                "token": instance_token,
                "category_token": _token("category", obj.category),
                "nbr_annotations": len(frames),
                "first_annotation_token": ann_tokens[0],
                "last_annotation_token": ann_tokens[-1],
            }
        )
    tables["scene"].append(
        {
            "token": scene_token,
            "log_token": log_token,
            "nbr_samples": scene.num_samples,
            "first_sample_token": sample_tokens[0],
            "last_sample_token": sample_tokens[-1],
            "name": scene.name,
            "description": "voxsparse tiny nuScenes scene",
        }
    )
    return sample_tokens


def write_tiny_nuscenes(root: str | os.PathLike, spec: TinyNuScenesSpec) -> TinyNuScenes:
    """Write the dataset described by ``spec`` under ``root`` (created; existing files are overwritten).

    Returns:
        Where it is and its sample tokens; load it with
        ``NuScenes(version=result.version, dataroot=str(result.dataroot))``.
    """
    root = Path(root)
    rng = np.random.default_rng(spec.seed)
    tables: dict[str, list] = {
        "category": [
            {"token": _token("category", c), "name": c, "description": c} for c in NUSCENES_CATEGORIES
        ],
        "attribute": [
            {"token": _token("attribute", a), "name": a, "description": a} for a in NUSCENES_ATTRIBUTES
        ],
        "visibility": [{"token": t, "level": level, "description": level} for t, level in _VISIBILITY],
        "sensor": [{"token": _token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"}],
        "calibrated_sensor": [],
        "ego_pose": [],
        "log": [],
        "scene": [],
        "sample": [],
        "sample_data": [],
        "sample_annotation": [],
        "instance": [],
    }
    sample_tokens = tuple(
        _write_scene(root, spec, i, scene, tables, rng) for i, scene in enumerate(spec.scenes)
    )
    locations = sorted({s.location for s in spec.scenes})
    tables["map"] = [
        {
            "token": _token("map", loc),
            "log_tokens": [_token("log", s.name) for s in spec.scenes if s.location == loc],
            "category": "semantic_prior",
            "filename": f"maps/{_token('map', loc)}.png",
        }
        for loc in locations
    ]
    for record in tables["map"]:
        atomic_write(root / record["filename"], lambda f: f.write(_png_stub()))
    for name, records in tables.items():
        _write_json(root / spec.version / f"{name}.json", records)
    splits = spec.split_scenes()
    _write_json(root / spec.version / "splits.json", {k: list(v) for k, v in splits.items()})
    return TinyNuScenes(dataroot=root, version=spec.version, splits=splits, sample_tokens=sample_tokens)
