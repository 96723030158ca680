"""Write Waymo Open Dataset v1 frames, built with the official ``dataset_pb2`` messages, from points and labels.

For tests and examples (the real dataset cannot be downloaded here). A :class:`FrameSpec` holds
vehicle-frame points, each assigned to a LiDAR and a return, and 3D labels; :func:`build_frame` turns
it into a ``dataset_pb2.Frame`` stored the way the dataset stores it: per LiDAR and return a
zlib-compressed serialized ``MatrixFloat`` range image ``(H, W, 4)`` (range, intensity, elongation,
no-label-zone flag 1 / -1), a compressed ``MatrixInt32`` camera projection ``(H, W, 6)`` (zeros: no
cameras), and for the TOP LiDAR a compressed ``(H, W, 6)`` per-pixel vehicle pose
``(roll, pitch, yaw, x, y, z)`` that follows the ego motion during the 0.1 s sweep.

A point is written into the pixel whose ray is nearest to it (the inverse of the official
conversion, with the TOP LiDAR's per-pixel pose), at its exact range, so reading it back gives the
point moved onto that pixel's ray: within ``range * pixel angle`` of the requested position.
Points outside a LiDAR's vertical field of view are not written, and of several points falling
into one pixel only the nearest is; :class:`WrittenPixels` says which were. Labels carry
``num_lidar_points_in_box`` = the written points inside the box.

:func:`write_v2_segment` writes the same frames as Waymo v2 parquet components with the official v2
schemas and v1-to-v2 extractors (:func:`official_v2` loads them without TensorFlow or dask).
"""

from __future__ import annotations

import os
import sys
import types
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.waymo.frame import _keypoint_slots, _protos
from voxsparse.data.waymo.range_image import (
    TOP_LASER,
    range_image_to_points,
    rotation_from_rpy,
    row_inclinations,
)
from voxsparse.data.waymo.tfrecord import write_records
from voxsparse.geometry import points_in_boxes

__all__ = [
    "FrameSpec",
    "LaserSpec",
    "ObjectSpec",
    "WrittenPixels",
    "build_frame",
    "example_frame_spec",
    "official_v2",
    "waymo_lasers",
    "write_frames",
    "write_v2_segment",
]

#: ``label_pb2.Label.Type`` values.
TYPE_VEHICLE, TYPE_PEDESTRIAN, TYPE_SIGN, TYPE_CYCLIST = 1, 2, 3, 4


@dataclass(frozen=True)
class LaserSpec:
    """One LiDAR: ``name`` a ``LaserName`` value, ``extrinsic`` (4, 4) vehicle-from-sensor, an
    ``(height, width)`` range image, and either explicit ``beam_inclinations`` (H,) rad, lowest beam
    first as stored, or None for uniform beams between ``inclination_min`` and ``inclination_max``."""

    name: int
    extrinsic: np.ndarray
    height: int
    width: int
    inclination_min: float
    inclination_max: float
    beam_inclinations: np.ndarray | None = None

    def row_inclinations(self) -> np.ndarray:
        """(H,) inclination of each row, row 0 the highest beam."""
        beams = () if self.beam_inclinations is None else self.beam_inclinations
        return row_inclinations(beams, self.inclination_min, self.inclination_max, self.height)


@dataclass
class ObjectSpec:
    """One ``laser_labels`` entry. ``box`` (7,) (center x, y, z, length, width, height, heading) in
    the vehicle frame; ``speed`` (speed_x, speed_y) m/s; ``difficulty`` the human
    ``detection_difficulty_level`` (0 = UNKNOWN); ``keypoints`` (14, 3) in ``KEYPOINT_NAMES`` order
    with ``keypoint_state`` (14,) 0 = not labelled, 1 = occluded, 2 = visible, or None for none;
    ``accel`` (accel_x, accel_y) m/s^2 (the dataset always sets it)."""

    waymo_type: int
    box: np.ndarray
    object_id: str
    speed: tuple[float, float] = (0.0, 0.0)
    difficulty: int = 0
    keypoints: np.ndarray | None = None
    keypoint_state: np.ndarray | None = None
    accel: tuple[float, float] = (0.0, 0.0)


@dataclass
class FrameSpec:
    """A frame to write. ``points`` (N, 3) float64 in the vehicle frame of ``pose`` (4, 4, global from
    vehicle); ``laser`` (N,) the ``LaserName`` of each point, ``return_index`` (N,) 0 or 1,
    ``intensity``/``elongation`` (N,) float32, ``in_nlz`` (N,) bool. The ego moves at ``ego_velocity``
    (vx, vy) m/s and ``yaw_rate`` rad/s (vehicle frame) during the TOP LiDAR's sweep of
    ``sweep_seconds``, centred on the frame pose."""

    context_name: str
    timestamp_micros: int
    pose: np.ndarray
    lasers: Sequence[LaserSpec]
    points: np.ndarray
    laser: np.ndarray
    return_index: np.ndarray
    intensity: np.ndarray
    elongation: np.ndarray
    in_nlz: np.ndarray
    objects: Sequence[ObjectSpec] = field(default_factory=list)
    ego_velocity: tuple[float, float] = (0.0, 0.0)
    yaw_rate: float = 0.0
    sweep_seconds: float = 0.1


@dataclass
class WrittenPixels:
    """The returns the range images hold, one row per written point (M of them).

    Attributes:
        source: (M,) int64 index of the point in ``FrameSpec.points``.
        laser: (M,) int64 ``LaserName``; return_index: (M,) int64; row, col: (M,) int64 pixel.
        range: (M,) float32 stored range (m).
    """

    source: np.ndarray
    laser: np.ndarray
    return_index: np.ndarray
    row: np.ndarray
    col: np.ndarray
    range: np.ndarray


def _pose_matrix(rpy: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """(..., 4, 4) transforms from (..., 3) roll/pitch/yaw and (..., 3) translations."""
    matrix = np.zeros(rpy.shape[:-1] + (4, 4))
    matrix[..., :3, :3] = rotation_from_rpy(rpy)
    matrix[..., :3, 3] = xyz
    matrix[..., 3, 3] = 1.0
    return matrix


def _rpy(rotation: np.ndarray) -> np.ndarray:
    """(..., 3) roll, pitch, yaw of (..., 3, 3) rotations ``Rz(yaw) Ry(pitch) Rx(roll)``."""
    roll = np.arctan2(rotation[..., 2, 1], rotation[..., 2, 2])
    pitch = -np.arcsin(np.clip(rotation[..., 2, 0], -1.0, 1.0))
    yaw = np.arctan2(rotation[..., 1, 0], rotation[..., 0, 0])
    return np.stack([roll, pitch, yaw], axis=-1)


def _top_pixel_pose(spec: FrameSpec, laser: LaserSpec) -> np.ndarray:
    """(H, W, 6) float32 per-pixel global-from-vehicle poses: the ego pose when each column was measured."""
    seconds = ((np.arange(laser.width) + 0.5) / laser.width - 0.5) * spec.sweep_seconds
    yaw = spec.yaw_rate * seconds
    motion = _pose_matrix(
        np.stack([np.zeros_like(yaw), np.zeros_like(yaw), yaw], axis=1),
        np.stack(
            [spec.ego_velocity[0] * seconds, spec.ego_velocity[1] * seconds, np.zeros_like(yaw)], axis=1
        ),
    )
    columns = spec.pose @ motion  # (W, 4, 4)
    pose = np.concatenate([_rpy(columns[:, :3, :3]), columns[:, :3, 3]], axis=1).astype(np.float32)
    return np.broadcast_to(pose, (laser.height, laser.width, 6)).copy()


def _locate(points: np.ndarray, laser: LaserSpec, sensor_from_frame: np.ndarray) -> tuple[np.ndarray, ...]:
    """Pixel (row, col), range and in-view mask of (N, 3) points; ``sensor_from_frame`` (W, 4, 4) per column."""
    incl = laser.row_inclinations()  # descending
    ascending = incl[::-1]
    ends = (
        ascending[:1] - (ascending[1:2] - ascending[:1]) / 2,
        ascending[-1:] + (ascending[-1:] - ascending[-2:-1]) / 2,
    )
    edges = np.concatenate([ends[0], (ascending[1:] + ascending[:-1]) / 2, ends[1]])
    yaw = np.arctan2(laser.extrinsic[1, 0], laser.extrinsic[0, 0])
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    col = np.full(len(points), laser.width // 2)
    # The TOP LiDAR's transform depends on the column, which depends on the transform: iterate. Near
    # the seam of the sweep (first and last columns, 0.1 s apart) a point may have no consistent
    # column; it is not written.
    for _ in range(6):
        sensor = np.einsum("nij,nj->ni", sensor_from_frame[col], homogeneous)[:, :3]
        azimuth = np.angle(np.exp(1j * (np.arctan2(sensor[:, 1], sensor[:, 0]) + yaw)))
        new_col = (
            np.floor(laser.width - laser.width * (azimuth / np.pi + 1) / 2).astype(np.int64) % laser.width
        )
        converged = new_col == col
        if converged.all():
            break
        col = new_col
    distance = np.linalg.norm(sensor, axis=1)
    inclination = np.arctan2(sensor[:, 2], np.hypot(sensor[:, 0], sensor[:, 1]))
    in_view = (inclination >= edges[0]) & (inclination < edges[-1]) & (distance > 0) & converged
    row = laser.height - np.clip(np.searchsorted(edges, inclination, side="right"), 1, laser.height)
    return row, col, distance.astype(np.float32), in_view


def _compressed(matrix_type: Any, array: np.ndarray) -> bytes:
    """``array`` as a zlib-compressed serialized ``MatrixFloat`` / ``MatrixInt32``, as the dataset stores it."""
    matrix = matrix_type()
    matrix.shape.dims.extend(array.shape)
    matrix.data.extend(array.reshape(-1).tolist())
    return zlib.compress(matrix.SerializeToString())


def build_frame(spec: FrameSpec) -> tuple[Any, WrittenPixels]:
    """``(dataset_pb2.Frame, WrittenPixels)`` for ``spec``; see the module docstring."""
    dataset_pb2 = _protos()[0]
    frame = dataset_pb2.Frame(timestamp_micros=spec.timestamp_micros)
    frame.context.name = spec.context_name
    frame.pose.transform.extend(np.asarray(spec.pose, dtype=np.float64).reshape(-1).tolist())

    written, stored_points = [], []
    for laser in sorted(spec.lasers, key=lambda laser: laser.name):
        calibration = frame.context.laser_calibrations.add(name=laser.name)
        calibration.extrinsic.transform.extend(np.asarray(laser.extrinsic, np.float64).reshape(-1).tolist())
        calibration.beam_inclination_min = laser.inclination_min
        calibration.beam_inclination_max = laser.inclination_max
        if laser.beam_inclinations is not None:
            calibration.beam_inclinations.extend(np.asarray(laser.beam_inclinations, np.float64).tolist())

        sensor_from_vehicle = np.linalg.inv(laser.extrinsic)
        pixel_pose = None
        if laser.name == TOP_LASER:
            pixel_pose = _top_pixel_pose(spec, laser)
            # Transform through the stored (float32) poses, exactly as a reader will.
            columns = _pose_matrix(
                pixel_pose[0, :, :3].astype(np.float64), pixel_pose[0, :, 3:].astype(np.float64)
            )
            sensor_from_frame = sensor_from_vehicle @ np.linalg.inv(columns) @ spec.pose
        else:
            sensor_from_frame = np.broadcast_to(sensor_from_vehicle, (laser.width, 4, 4))

        proto = frame.lasers.add(name=laser.name)
        for return_index, range_image in enumerate((proto.ri_return1, proto.ri_return2)):
            source = np.flatnonzero((spec.laser == laser.name) & (spec.return_index == return_index))
            row, col, distance, in_view = _locate(spec.points[source], laser, sensor_from_frame)
            source, row, col, distance = source[in_view], row[in_view], col[in_view], distance[in_view]
            # One return per pixel: the nearest point.
            order = np.lexsort((distance, col, row))
            pixel = row[order] * laser.width + col[order]
            first = np.ones(len(order), dtype=bool)
            first[1:] = pixel[1:] != pixel[:-1]
            keep = order[first]
            source, row, col, distance = source[keep], row[keep], col[keep], distance[keep]

            image = np.zeros((laser.height, laser.width, 4), dtype=np.float32)
            image[..., 3] = -1.0
            image[row, col, 0] = distance
            image[row, col, 1] = spec.intensity[source]
            image[row, col, 2] = spec.elongation[source]
            image[row, col, 3] = np.where(spec.in_nlz[source], 1.0, -1.0)
            range_image.range_image_compressed = _compressed(dataset_pb2.MatrixFloat, image)
            range_image.camera_projection_compressed = _compressed(
                dataset_pb2.MatrixInt32, np.zeros((laser.height, laser.width, 6), np.int32)
            )
            if pixel_pose is not None and return_index == 0:
                range_image.range_image_pose_compressed = _compressed(dataset_pb2.MatrixFloat, pixel_pose)
            # Where a reader will put these points: num_lidar_points_in_box counts them there.
            xyz, _ = range_image_to_points(
                image[..., 0], laser.extrinsic, laser.row_inclinations(), pixel_pose, spec.pose
            )
            stored_points.append(xyz)
            n = len(source)
            written.append((source, np.full(n, laser.name), np.full(n, return_index), row, col, distance))

    source, name, return_index, row, col, distance = (np.concatenate(parts) for parts in zip(*written))
    pixels = WrittenPixels(
        source.astype(np.int64), name.astype(np.int64), return_index.astype(np.int64), row, col, distance
    )
    _add_labels(frame, spec.objects, np.concatenate(stored_points))
    return frame, pixels


def _add_labels(frame: Any, objects: Sequence[ObjectSpec], points: np.ndarray) -> None:
    """Append ``objects`` to ``frame.laser_labels``, counting the (N, 3) ``points`` inside each box."""
    boxes = np.array([o.box for o in objects], dtype=np.float64).reshape(-1, 7)
    counts = points_in_boxes(torch.from_numpy(points), torch.from_numpy(boxes)).sum(dim=0).tolist()
    keypoint_type = {slot: value for value, slot in _keypoint_slots().items()}
    for obj, count in zip(objects, counts):
        label = frame.laser_labels.add(type=obj.waymo_type, id=obj.object_id)
        box = label.box
        box.center_x, box.center_y, box.center_z, box.length, box.width, box.height, box.heading = map(
            float, obj.box
        )
        label.metadata.speed_x, label.metadata.speed_y = map(float, obj.speed)
        label.metadata.accel_x, label.metadata.accel_y = map(float, obj.accel)
        label.detection_difficulty_level = obj.difficulty
        label.num_lidar_points_in_box = int(count)
        if obj.keypoints is None:
            continue
        for slot in np.flatnonzero(obj.keypoint_state):
            keypoint = label.laser_keypoints.keypoint.add(type=keypoint_type[int(slot)])
            location = keypoint.keypoint_3d.location_m
            location.x, location.y, location.z = map(float, obj.keypoints[slot])
            keypoint.keypoint_3d.visibility.is_occluded = bool(obj.keypoint_state[slot] == 1)


def write_frames(path: str | os.PathLike, frames: Iterable[Any]) -> Path:
    """Write ``dataset_pb2.Frame`` messages as a TFRecord segment file (atomically)."""
    return write_records(path, (frame.SerializeToString() for frame in frames))


def waymo_lasers(top: tuple[int, int] = (64, 2650), side: tuple[int, int] = (200, 600)) -> list[LaserSpec]:
    """Five LiDARs placed like Waymo's: TOP with explicit non-uniform beams, four short-range
    LiDARs with uniform beams; ``top`` and ``side`` the (H, W) of their range images."""

    def extrinsic(x: float, y: float, z: float, yaw: float, pitch: float = 0.0) -> np.ndarray:
        return _pose_matrix(np.array([0.0, pitch, yaw]), np.array([x, y, z]))

    # Denser beams near the horizon, as on the real TOP LiDAR.
    t = np.linspace(-1.0, 1.0, top[0])
    top_beams = -0.1335 + 0.1665 * np.sign(t) * np.abs(t) ** 1.5
    return [
        LaserSpec(1, extrinsic(1.43, 0.0, 2.18, -0.02, 0.004), *top, -0.3, 0.04, top_beams),
        LaserSpec(2, extrinsic(4.07, 0.0, 0.69, 0.0), *side, -1.57, 0.52),
        LaserSpec(3, extrinsic(3.25, 1.03, 0.98, np.pi / 2), *side, -1.57, 0.52),
        LaserSpec(4, extrinsic(3.25, -1.03, 0.98, -np.pi / 2), *side, -1.57, 0.52),
        LaserSpec(5, extrinsic(-1.15, 0.0, 0.47, np.pi), *side, -1.57, 0.52),
    ]


def _pedestrian_keypoints(box: np.ndarray) -> np.ndarray:
    """(14, 3) a standing pose inside ``box`` (x, y, z, l, w, h, heading), ``KEYPOINT_NAMES`` order."""
    # (forward, left, up) offsets in the body frame, metres, up from the box bottom.
    body = {
        "nose": (0.10, 0.0, 1.62), "head_center": (0.0, 0.0, 1.62),
        "left_shoulder": (0.0, 0.2, 1.42), "right_shoulder": (0.0, -0.2, 1.42),
        "left_elbow": (0.0, 0.24, 1.12), "right_elbow": (0.0, -0.24, 1.12),
        "left_wrist": (0.05, 0.25, 0.85), "right_wrist": (0.05, -0.25, 0.85),
        "left_hip": (0.0, 0.12, 0.92), "right_hip": (0.0, -0.12, 0.92),
        "left_knee": (0.05, 0.12, 0.5), "right_knee": (-0.05, -0.12, 0.5),
        "left_ankle": (0.0, 0.12, 0.1), "right_ankle": (-0.1, -0.12, 0.1),
    }  # fmt: skip
    local = np.array([body[name] for name in KEYPOINT_NAMES])
    c, s = np.cos(box[6]), np.sin(box[6])
    return np.stack(
        [box[0] + c * local[:, 0] - s * local[:, 1], box[1] + s * local[:, 0] + c * local[:, 1],
         box[2] - box[5] / 2 + local[:, 2]], axis=1,
    )  # fmt: skip


def example_frame_spec(
    seed: int,
    lasers: Sequence[LaserSpec] | None = None,
    timestamp_micros: int = 1_550_000_000_000_000,
    points_per_object: int = 300,
    ground_points: int = 4000,
) -> FrameSpec:
    """A small street frame: a vehicle, a pedestrian with keypoints (two occluded, one unlabelled), a
    cyclist, a sign, a distant vehicle with 3 points, a vehicle with no points, a pedestrian labelled
    LEVEL_2, and ground points (those with y > 20 m in a no-label zone). Object points are assigned to
    the LiDAR facing them (TOP for most), every fifth as a second return; reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    lasers = list(lasers) if lasers is not None else waymo_lasers()
    pose = _pose_matrix(np.array([0.012, -0.008, 1.1 + 0.1 * seed]), np.array([120.0 + seed, -40.0, 3.0]))
    walker = np.array([9.0, -3.0, 0.9, 0.7, 0.8, 1.8, 0.4])
    objects = [
        ObjectSpec(TYPE_VEHICLE, np.array([14.0, 4.0, 0.95, 4.6, 2.0, 1.9, 0.3]), "vehicle-a", (6.5, 1.0)),
        ObjectSpec(TYPE_PEDESTRIAN, walker, "walker-b", (0.9, -0.4), 0, _pedestrian_keypoints(walker),
                   np.array([2, 2, 2, 1, 2, 2, 2, 2, 2, 1, 2, 2, 0, 2])),
        ObjectSpec(TYPE_CYCLIST, np.array([-11.0, 6.0, 0.9, 1.8, 0.7, 1.7, -2.9]), "cyclist-c", (-4.0, 0.2)),
        ObjectSpec(TYPE_SIGN, np.array([16.0, -7.0, 2.2, 0.1, 0.8, 0.8, 1.5]), "sign-d"),
        ObjectSpec(TYPE_VEHICLE, np.array([45.0, 22.0, 1.0, 4.2, 1.9, 1.6, 3.1]), "far-vehicle-e", (10.0, 0.0)),
        ObjectSpec(TYPE_VEHICLE, np.array([-30.0, -25.0, 1.0, 4.4, 1.9, 1.6, 0.0]), "hidden-vehicle-f"),
        ObjectSpec(TYPE_PEDESTRIAN, np.array([6.0, 9.0, 0.85, 0.6, 0.7, 1.7, -1.0]), "walker-g", (0.0, 1.1), 2),
    ]  # fmt: skip
    counts = [points_per_object] * 4 + [3, 0, points_per_object // 3]
    parts = []
    for obj, count in zip(objects, counts):
        x, y, z, length, width, height, heading = obj.box
        local = rng.uniform(-0.4, 0.4, size=(count, 3)) * (length, width, height)
        c, s = np.cos(heading), np.sin(heading)
        parts.append(
            np.stack(
                [
                    x + c * local[:, 0] - s * local[:, 1],
                    y + s * local[:, 0] + c * local[:, 1],
                    z + local[:, 2],
                ],
                1,
            )
        )
    radius = np.sqrt(rng.uniform(4.0**2, 60.0**2, ground_points))
    angle = rng.uniform(-np.pi, np.pi, ground_points)
    ground = np.stack([radius * np.cos(angle), radius * np.sin(angle), np.zeros(ground_points)], axis=1)
    points = np.concatenate(parts + [ground])
    n = len(points)

    # The LiDAR facing the point; far points and most object points go to TOP.
    azimuth = np.arctan2(points[:, 1], points[:, 0])
    facing = np.array([2, 3, 5, 4])[np.floor((azimuth + np.pi / 4) / (np.pi / 2)).astype(int) % 4]
    near = np.hypot(points[:, 0], points[:, 1]) < 12.0
    laser = np.where(near & (rng.uniform(size=n) < 0.5), facing, TOP_LASER)
    return FrameSpec(
        context_name=f"example-segment-{seed}",
        timestamp_micros=timestamp_micros,
        pose=pose,
        lasers=lasers,
        points=points,
        laser=laser,
        return_index=(np.arange(n) % 5 == 4).astype(np.int64),
        intensity=rng.uniform(0.0, 2.0, n).astype(np.float32),
        elongation=rng.uniform(0.0, 1.0, n).astype(np.float32),
        in_nlz=np.concatenate([np.zeros(n - ground_points, bool), ground[:, 1] > 20.0]),
        objects=objects,
        ego_velocity=(8.0, 0.3),
        yaw_rate=0.15,
    )


# ---------------------------------------------------------------- Waymo Open Dataset v2 (parquet)


def official_v2() -> SimpleNamespace:
    """The official v2 component schemas (``waymo_open_dataset/v2``: ``component``, ``column_types`` and
    ``perception/{base,context,pose,box,keypoints,lidar}``) and v1 extractors (``perception/compat_v1``:
    ``context``, ``pose``, ``box``, ``keypoints``), as modules.

    The package's ``__init__`` imports dask and pandas and ``perception/lidar.py`` imports TensorFlow (for a
    ``.tensor`` property only), none of which is installed here: the files are executed by path under their
    own module names, with a placeholder for ``tensorflow`` while ``lidar.py`` runs. Nothing stays in
    ``sys.modules``, so other code still sees the package as it is. Raises ImportError (pyarrow or the
    package missing).
    """
    import importlib.util

    import pyarrow  # noqa: F401  (the schemas need it)

    spec = importlib.util.find_spec("waymo_open_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("waymo-open-dataset-tf-2-12-0 is not installed")
    root = Path(next(iter(spec.submodule_search_locations))) / "v2"
    added: dict[str, types.ModuleType] = {}

    def package(name: str, folder: Path) -> None:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        added[name] = sys.modules[name] = module

    def load(name: str, path: Path) -> types.ModuleType:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        added[name] = sys.modules[name] = module
        module_spec.loader.exec_module(module)
        parent, _, leaf = name.rpartition(".")
        setattr(sys.modules[parent], leaf, module)
        return module

    names = {}
    saved = {name: sys.modules.get(name) for name in ("tensorflow",)}
    try:
        package("waymo_open_dataset.v2", root)
        package("waymo_open_dataset.v2.perception", root / "perception")
        package("waymo_open_dataset.v2.perception.compat_v1", root / "perception" / "compat_v1")
        for name in ("component", "column_types", "typing_utils"):
            names[name] = load(f"waymo_open_dataset.v2.{name}", root / f"{name}.py")
        if saved["tensorflow"] is None:
            placeholder = types.ModuleType("tensorflow")
            placeholder.Tensor = object
            sys.modules["tensorflow"] = placeholder
        for name in ("base", "context", "pose", "box", "keypoints", "lidar", "camera_image"):
            names[name] = load(f"waymo_open_dataset.v2.perception.{name}", root / "perception" / f"{name}.py")
        for name in ("interfaces", "context", "pose", "box", "keypoints"):
            names[f"compat_{name}"] = load(
                f"waymo_open_dataset.v2.perception.compat_v1.{name}", root / "perception" / "compat_v1" / f"{name}.py"
            )
    finally:
        for name in added:
            sys.modules.pop(name, None)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return SimpleNamespace(**names)


#: v2 component folder -> official component class name (in :func:`official_v2`'s modules).
V2_COMPONENTS = {
    "lidar": ("lidar", "LiDARComponent"),
    "lidar_pose": ("lidar", "LiDARPoseComponent"),
    "lidar_calibration": ("context", "LiDARCalibrationComponent"),
    "vehicle_pose": ("pose", "VehiclePoseComponent"),
    "lidar_box": ("box", "LiDARBoxComponent"),
    "lidar_hkp": ("keypoints", "LiDARHumanKeypointsComponent"),
}


def v2_components(frames: Sequence[Any], v2: SimpleNamespace | None = None) -> dict[str, list[Any]]:
    """The v2 components of a segment's v1 ``Frame`` messages, component folder -> component objects.

    Calibrations, vehicle poses, boxes and keypoints come from the official v1-to-v2 extractors
    (``compat_v1``). Range images are built as the official ``compat_v1/lidar.py`` builds them
    (``lidar_utils.parse_range_image``: the decompressed ``MatrixFloat``'s flat data and dims), which
    needs TensorFlow to run itself.
    """
    v2 = v2 or official_v2()
    dataset_pb2 = _protos()[0]
    out: dict[str, list[Any]] = {name: [] for name in V2_COMPONENTS}
    first = frames[0]
    for calibration in first.context.laser_calibrations:
        src = v2.compat_interfaces.LiDARCalibrationComponentSrc(frame=first, lidar_calibration=calibration)
        out["lidar_calibration"].extend(v2.compat_context.LiDARCalibrationComponentExtractor()(src))

    def image(kind, compressed: bytes):
        if not compressed:
            return None
        matrix = dataset_pb2.MatrixFloat.FromString(zlib.decompress(compressed))
        return kind(values=list(matrix.data), shape=list(matrix.shape.dims))

    for frame in frames:
        src = v2.compat_interfaces.FrameComponentSrc(frame=frame)
        out["vehicle_pose"].extend(v2.compat_pose.VehiclePoseFrameExtractor()(src))
        for label in frame.laser_labels:
            src = v2.compat_interfaces.LiDARLabelComponentSrc(frame=frame, lidar_label=label)
            out["lidar_box"].extend(v2.compat_box.LiDARBoxComponentExtractor()(src))
            out["lidar_hkp"].extend(v2.compat_keypoints.LiDARHumanKeypointsFrameExtractor()(src))
        for laser in frame.lasers:
            key = v2.base.LaserKey(
                segment_context_name=frame.context.name,
                frame_timestamp_micros=frame.timestamp_micros,
                laser_name=laser.name,
            )
            returns = [image(v2.lidar.RangeImage, r.range_image_compressed) for r in (laser.ri_return1, laser.ri_return2)]
            if returns != [None, None]:
                out["lidar"].append(v2.lidar.LiDARComponent(key, *returns))
            pose = image(v2.lidar.PoseRangeImage, laser.ri_return1.range_image_pose_compressed)
            if pose is not None:
                out["lidar_pose"].append(v2.lidar.LiDARPoseComponent(key, pose))
    return out


def write_v2_segment(
    split_dir: str | os.PathLike,
    frames: Sequence[Any],
    rows_per_group: int | dict[str, int] = 3,
    skip: Sequence[str] = (),
    v2: SimpleNamespace | None = None,
) -> dict[str, Path]:
    """Write a segment's v1 ``Frame`` messages as v2 parquet components,
    ``<split_dir>/<component>/<context name>.parquet``, each table with its official schema
    (``Component.schema()``) and rows flattened as ``Component.to_flatten_dict()`` does.

    ``rows_per_group``: parquet row-group size (a number, or per component; small by default so a
    frame's rows straddle row groups); ``skip``: components not to write. Returns component -> path.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    v2 = v2 or official_v2()
    components = v2_components(frames, v2)
    context = frames[0].context.name
    paths = {}
    for name, (module, cls) in V2_COMPONENTS.items():
        if name in skip:
            continue
        schema = getattr(getattr(v2, module), cls).schema()
        table = pa.Table.from_pylist([c.to_flatten_dict() for c in components[name]], schema=schema)
        size = rows_per_group if isinstance(rows_per_group, int) else rows_per_group.get(name, 3)
        path = Path(split_dir) / name / f"{context}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=size)
        paths[name] = path
    return paths
