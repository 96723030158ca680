"""Recorded drives as LiDAR frames with ego poses, and detections written back as a topic.

:func:`read_drive` yields one :class:`DriveFrame` per ``sensor_msgs/PointCloud2`` message of a topic
(containers and PointCloud2 rules: :mod:`voxsparse.data.rosbag`). The frame's time is its header
stamp (the recording time where the stamp is zero).

Ego poses, from a ``pose_topic`` when one is given:

- ``tf2_msgs/TFMessage`` (``/tf``): the transforms of that topic and of ``/tf_static`` (when the
  drive has it) form the frame tree; a cloud's pose is the chain from its ``header.frame_id`` up to
  the tree's root (the world frame), each moving link interpolated at the cloud's time (linear
  translation, spherical rotation).
- ``nav_msgs/Odometry``: the pose of ``child_frame_id`` in ``header.frame_id``, interpolated alike,
  then ``/tf_static``'s chain from the cloud's frame to that child when the drive has one; without it
  the sensor is taken to sit at the child frame (said once in the log).

The pose topic (and ``/tf_static``) is read in a first pass over the drive and held as arrays of 64
bytes a sample (a 100 Hz odometry: 23 MB an hour; while that pass reads, its records take about four
times as much). A cloud more than ``max_pose_gap`` seconds outside its poses'
time span has no pose and is skipped (counted in a warning at the end). Without a pose topic every
frame has ``ego_pose`` None (the stream then tracks in the sensor frame; logged once).

:func:`write_drive` writes frames (points, time, pose) as a drive; :class:`MarkerWriter` writes
detections as ``visualization_msgs/MarkerArray`` (rosbags' type stores have no ``vision_msgs``):
one CUBE per box in the cloud's frame, ``ns`` the class name, ``id`` the track id (or the index),
``text`` class and score, after a DELETEALL marker that clears the previous frame's boxes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voxsparse.data.pointfile import PointCloud
from voxsparse.data.rosbag import (
    POINTCLOUD2,
    DriveError,
    DriveWriter,
    decode_pointcloud2,
    encode_pointcloud2,
    header,
    matrix_to_quaternion,
    new_message,
    open_drive,
    stamp_ns,
)
from voxsparse.geometry import RigidTransform
from voxsparse.structures import Detections3D

__all__ = ["DriveFrame", "MarkerWriter", "PoseTree", "drive_kind", "read_drive", "write_drive"]

log = logging.getLogger(__name__)

TF = "tf2_msgs/msg/TFMessage"
ODOMETRY = "nav_msgs/msg/Odometry"
MARKER_ARRAY = "visualization_msgs/msg/MarkerArray"
TF_STATIC = "/tf_static"

#: Marker colours (r, g, b) by label, cycled.
_COLOURS = ((0.95, 0.55, 0.1), (0.2, 0.6, 1.0), (0.3, 0.85, 0.3), (0.85, 0.3, 0.85), (0.9, 0.9, 0.2))


@dataclass
class DriveFrame:
    """One LiDAR sweep of a drive.

    Attributes:
        index: its position among the topic's messages.
        frame_id: ``<stamp in ns>``, unique within a topic of increasing stamps.
        timestamp: seconds (header stamp, else recording time).
        stamp_ns: the same in integer nanoseconds.
        sensor_frame: the cloud's ``header.frame_id``.
        cloud: x, y, z [, intensity] in the sensor frame (``path`` names drive, topic and index).
        ego_pose: (4, 4) float64 world-from-sensor transform, or None without a pose topic.
        dropped: points dropped for a non-finite x, y or z.
    """

    index: int
    frame_id: str
    timestamp: float
    stamp_ns: int
    sensor_frame: str
    cloud: PointCloud
    ego_pose: np.ndarray | None
    dropped: int = 0


# --- poses ----------------------------------------------------------------------------------------


class _Link:
    """A parent-from-child transform over time: (T,) ns, (T, 3) translations, (T, 4) quaternions (w, x, y, z)."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.samples: list[tuple[int, tuple[float, float, float], tuple[float, float, float, float]]] = []
        self.static = False

    def freeze(self) -> None:
        self.samples.sort(key=lambda s: s[0])
        self.times = np.array([s[0] for s in self.samples], dtype=np.int64)
        self.translations = np.array([s[1] for s in self.samples], dtype=np.float64).reshape(-1, 3)
        q = np.array([s[2] for s in self.samples], dtype=np.float64).reshape(-1, 4)
        self.quaternions = q / np.linalg.norm(q, axis=1, keepdims=True)
        del self.samples

    def at(self, time_ns: int, max_gap_ns: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(translation, quaternion) at ``time_ns``; None beyond ``max_gap_ns`` outside the samples."""
        if self.static or len(self.times) == 1:
            if not self.static and abs(time_ns - self.times[0]) > max_gap_ns:
                return None
            return self.translations[-1], self.quaternions[-1]
        if time_ns < self.times[0] - max_gap_ns or time_ns > self.times[-1] + max_gap_ns:
            return None
        i = int(np.clip(np.searchsorted(self.times, time_ns), 1, len(self.times) - 1))
        t0, t1 = self.times[i - 1], self.times[i]
        a = float(np.clip((time_ns - t0) / max(t1 - t0, 1), 0.0, 1.0))
        translation = (1 - a) * self.translations[i - 1] + a * self.translations[i]
        return translation, _slerp(self.quaternions[i - 1], self.quaternions[i], a)


def _slerp(q0: np.ndarray, q1: np.ndarray, a: float) -> np.ndarray:
    dot = float(q0 @ q1)
    if dot < 0:  # the shorter way round
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = (1 - a) * q0 + a * q1
    else:
        theta = np.arccos(dot)
        q = (np.sin((1 - a) * theta) * q0 + np.sin(a * theta) * q1) / np.sin(theta)
    return q / np.linalg.norm(q)


class PoseTree:
    """Frame links read from ``/tf``-like and odometry messages; poses of sensor frames at given times.

    Args:
        where: how errors name the source (drive and pose topic).
        max_pose_gap: seconds a lookup may lie outside a moving link's samples (then the nearest is used).
    """

    def __init__(self, where: str, max_pose_gap: float = 0.1) -> None:
        self.where = where
        self.links: dict[str, _Link] = {}
        self.max_gap_ns = int(max_pose_gap * 1e9)
        self.odometry_child: str | None = None
        self._warned_frames: set[str] = set()

    def add(self, parent: str, child: str, time_ns: int, translation, rotation, static: bool = False) -> None:
        """One parent-from-child sample (translation (x, y, z), rotation (w, x, y, z))."""
        parent, child = parent.lstrip("/"), child.lstrip("/")
        link = self.links.setdefault(child, _Link(parent))
        if link.parent != parent:
            raise DriveError(f"{self.where}: frame {child!r} has two parents, {link.parent!r} and {parent!r}")
        link.static = link.static or static
        link.samples.append((time_ns, tuple(translation), tuple(rotation)))

    def add_message(self, msgtype: str, message, static: bool = False) -> None:
        if msgtype == TF:
            for t in message.transforms:
                tr, q = t.transform.translation, t.transform.rotation
                self.add(t.header.frame_id, t.child_frame_id, stamp_ns(t.header.stamp), (tr.x, tr.y, tr.z),
                         (q.w, q.x, q.y, q.z), static)
        else:  # Odometry
            p, q = message.pose.pose.position, message.pose.pose.orientation
            self.odometry_child = message.child_frame_id.lstrip("/")
            self.add(message.header.frame_id, message.child_frame_id, stamp_ns(message.header.stamp),
                     (p.x, p.y, p.z), (q.w, q.x, q.y, q.z))

    def freeze(self) -> None:
        """Sort each link's samples into arrays; call once every message is added."""
        for child, link in self.links.items():
            if any(abs(np.linalg.norm(q) - 1.0) > 1e-3 for _, _, q in link.samples):
                raise DriveError(f"{self.where}: a transform to frame {child!r} has a rotation that is not a unit quaternion")
            link.freeze()

    def pose(self, frame: str, time_ns: int) -> np.ndarray | None:
        """(4, 4) world-from-``frame`` at ``time_ns``, the world being the root of ``frame``'s chain; None
        outside the poses' time span.

        Raises:
            DriveError: ``frame`` is not in the tree (and no odometry child stands in for it).
        """
        frame = frame.lstrip("/")
        if frame not in self.links:
            if self.odometry_child is None:
                known = sorted(set(self.links) | {link.parent for link in self.links.values()})
                raise DriveError(f"{self.where}: no transform reaches the cloud's frame {frame!r}; frames: {known}")
            if frame not in self._warned_frames:
                self._warned_frames.add(frame)
                log.info("%s: no transform from %r to the cloud's frame %r: the sensor is taken to sit at %r",
                         self.where, self.odometry_child, frame, self.odometry_child)
            frame = self.odometry_child
        world_from_sensor = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        while frame in self.links:
            link = self.links[frame]
            sample = link.at(time_ns, self.max_gap_ns)
            if sample is None:
                return None
            translation, rotation = sample
            world_from_sensor = RigidTransform(tuple(rotation), tuple(translation)) @ world_from_sensor
            frame = link.parent
        pose = np.eye(4)
        pose[:3, :3] = world_from_sensor.matrix()
        pose[:3, 3] = world_from_sensor.translation
        return pose


# --- reading --------------------------------------------------------------------------------------


def read_drive(
    path: str | Path,
    topic: str,
    pose_topic: str | None = None,
    intensity_field: str | None = None,
    intensity_scale: str | None = None,
    max_pose_gap: float = 0.1,
) -> Iterator[DriveFrame]:
    """The PointCloud2 messages of ``topic`` as frames, in recording order (module docstring).

    Raises:
        FileNotFoundError, DriveError: the drive, a topic or a message that cannot be read, named.
    """
    with open_drive(path) as source:
        source.check_topic(topic, {POINTCLOUD2}, "point cloud")
        poses = None
        if pose_topic is None:
            log.info("drive %s: no pose topic given: ego poses are identity (tracks stay in the sensor frame)", path)
        else:
            msgtype = source.check_topic(pose_topic, {TF, ODOMETRY}, "pose")
            poses = PoseTree(f"drive {path}: pose topic {pose_topic!r}", max_pose_gap)
            extra = [TF_STATIC] if TF_STATIC in source.topics and source.topics[TF_STATIC] == TF else []
            for m in source.messages([pose_topic, *extra]):
                poses.add_message(msgtype if m.topic == pose_topic else TF, m.message, static=m.topic == TF_STATIC)
            poses.freeze()
        skipped = 0
        for index, m in enumerate(source.messages([topic])):
            where = f"drive {path}: topic {topic} message {index}"
            cloud, dropped = decode_pointcloud2(m.message, where, intensity_field, intensity_scale)
            ns = stamp_ns(m.message.header.stamp) or m.log_time
            pose = None
            if poses is not None:
                pose = poses.pose(m.message.header.frame_id, ns)
                if pose is None:
                    skipped += 1
                    log.debug("%s: no pose within %.3f s of %d ns: skipped", where, max_pose_gap, ns)
                    continue
            yield DriveFrame(index, str(ns), ns / 1e9, ns, m.message.header.frame_id, cloud, pose, dropped)
        if skipped:
            log.warning("drive %s: %d cloud(s) of %s lie over %.3f s outside the poses of %s: skipped",
                        path, skipped, topic, max_pose_gap, pose_topic)


def drive_kind(path: str | Path) -> tuple[str, str]:
    """(:class:`~voxsparse.data.rosbag.DriveWriter` kind, storage) a new drive at ``path`` is written as:
    ``.bag`` ROS 1, ``.mcap`` plain MCAP, a ``.db3``-less folder name a ROS 2 bag (sqlite3)."""
    suffix = Path(path).suffix
    if suffix == ".bag":
        return "bag", "sqlite3"
    if suffix == ".mcap":
        return "mcap", "sqlite3"
    if suffix == "":
        return "rosbag2", "sqlite3"
    raise DriveError(f"drive {path}: write a .bag, an .mcap or a ROS 2 bag folder (a name without suffix)")


# --- writing --------------------------------------------------------------------------------------


def write_drive(
    path: str | Path,
    frames: Iterable[tuple[float, np.ndarray, np.ndarray | None]],
    topic: str = "/lidar/top",
    pose_topic: str | None = "/tf",
    features: Sequence[str] = ("x", "y", "z", "intensity"),
    sensor_frame: str = "lidar",
    world_frame: str = "map",
    kind: str | None = None,
    storage: str = "sqlite3",
) -> Path:
    """Write (time in seconds, (N, C) float32 points, (4, 4) world-from-sensor pose or None) frames as a drive.

    The pose goes to ``pose_topic`` as ``tf2_msgs/TFMessage`` (``/tf``: world -> sensor) or, for a topic
    ending in ``odom``, ``nav_msgs/Odometry`` (child ``sensor_frame``). ``kind``: see
    :class:`~voxsparse.data.rosbag.DriveWriter` (None: from the path, :func:`drive_kind`).
    """
    kind, storage = (kind, storage) if kind is not None else drive_kind(path)
    odometry = pose_topic is not None and pose_topic.endswith("odom")
    with DriveWriter(path, kind, storage) as writer:
        ts = writer.typestore
        writer.add_topic(topic, POINTCLOUD2)
        if pose_topic is not None:
            writer.add_topic(pose_topic, ODOMETRY if odometry else TF)
        for time, points, pose in frames:
            ns = round(time * 1e9)
            if pose is not None and pose_topic is not None:
                q = matrix_to_quaternion(pose[:3, :3])
                position = dict(zip("xyz", map(float, pose[:3, 3])))
                orientation = dict(zip("wxyz", map(float, q)))
                if odometry:
                    p = new_message(ts, "geometry_msgs/msg/Pose",
                                    position=new_message(ts, "geometry_msgs/msg/Point", **position),
                                    orientation=new_message(ts, "geometry_msgs/msg/Quaternion", **orientation))
                    message = new_message(ts, ODOMETRY, header=header(ts, ns, world_frame), child_frame_id=sensor_frame,
                                          pose=new_message(ts, "geometry_msgs/msg/PoseWithCovariance", pose=p))
                else:
                    transform = new_message(ts, "geometry_msgs/msg/Transform",
                                            translation=new_message(ts, "geometry_msgs/msg/Vector3", **position),
                                            rotation=new_message(ts, "geometry_msgs/msg/Quaternion", **orientation))
                    stamped = new_message(ts, "geometry_msgs/msg/TransformStamped", header=header(ts, ns, world_frame),
                                          child_frame_id=sensor_frame, transform=transform)
                    message = new_message(ts, TF, transforms=[stamped])
                writer.write(pose_topic, ns, message)
            writer.write(topic, ns, encode_pointcloud2(ts, points, features, ns, sensor_frame))
    return Path(path)


class MarkerWriter:
    """Detections written as ``visualization_msgs/MarkerArray`` messages of ``topic`` in a new drive.

    Args:
        path: the new drive (``.bag``, ``.mcap`` or a ROS 2 bag folder, :func:`drive_kind`).
        topic: the detections' topic.
        class_names: label ``i`` is ``class_names[i]``.
    """

    def __init__(self, path: str | Path, topic: str, class_names: Sequence[str], storage: str = "sqlite3") -> None:
        kind, default_storage = drive_kind(path)
        self.writer = DriveWriter(path, kind, storage if kind == "rosbag2" else default_storage)
        self.writer.add_topic(topic, MARKER_ARRAY)
        self.topic, self.class_names = topic, list(class_names)

    def write(self, frame: DriveFrame, detections: Detections3D) -> None:
        """One frame's detections (sensor frame; ``track_ids`` used as marker ids where >= 0)."""
        ts = self.writer.typestore
        head = header(ts, frame.stamp_ns, frame.sensor_frame)
        markers = [new_message(ts, "visualization_msgs/msg/Marker", header=head, action=3)]  # DELETEALL
        boxes = detections.boxes.tensor.detach().cpu().double().numpy()
        ids = detections.track_ids.tolist() if detections.track_ids is not None else [-1] * len(boxes)
        for i, (box, score, label, track) in enumerate(
            zip(boxes, detections.scores.tolist(), detections.labels.tolist(), ids)
        ):
            r, g, b = _COLOURS[label % len(_COLOURS)]
            half = 0.5 * box[6]
            pose = new_message(
                ts, "geometry_msgs/msg/Pose",
                position=new_message(ts, "geometry_msgs/msg/Point", x=box[0], y=box[1], z=box[2]),
                orientation=new_message(ts, "geometry_msgs/msg/Quaternion", w=float(np.cos(half)), z=float(np.sin(half))),
            )
            markers.append(new_message(
                ts, "visualization_msgs/msg/Marker", header=head, ns=self.class_names[label],
                id=int(track) if track >= 0 else i, type=1, action=0, pose=pose,
                scale=new_message(ts, "geometry_msgs/msg/Vector3", x=box[3], y=box[4], z=box[5]),
                color=new_message(ts, "std_msgs/msg/ColorRGBA", r=r, g=g, b=b, a=0.5),
                text=f"{self.class_names[label]} {score:.2f}",
            ))
        self.writer.write(self.topic, frame.stamp_ns, new_message(ts, MARKER_ARRAY, markers=markers))

    def close(self) -> None:
        self.writer.close()
