"""Waymo Open Dataset v1 ``Frame`` protos to :class:`WaymoFrame` (numpy arrays, vehicle frame).

Reading needs the official protobuf definitions (``dataset_pb2``, ``label_pb2``, ``keypoint_pb2``) of
the ``waymo-open-dataset-tf-2-12-0`` wheel and nothing else of it: no TensorFlow (see
:data:`INSTALL_HINT`). Range images become points with :mod:`voxsparse.data.waymo.range_image`.

Labels, from ``Frame.laser_labels`` (``label.proto``):

* classes: ``TYPE_VEHICLE``, ``TYPE_PEDESTRIAN``, ``TYPE_CYCLIST`` become ``CLASS_NAMES`` labels
  Vehicle, Pedestrian, Cyclist; ``TYPE_SIGN`` and ``TYPE_UNKNOWN`` are dropped.
* boxes: ``(center_x, center_y, center_z, length, width, height, heading, speed_x, speed_y)`` as
  stored: Waymo's box is already voxsparse's (centre, ``length`` along the heading, heading
  counter-clockwise from +x in the vehicle frame). ``metadata.speed_x/y`` (m/s) are passed through
  unrotated: Waymo documents no frame for them (its maintainers call them "global" velocities,
  i.e. over the ground, issue #39); OpenPCDet treats them as vehicle-frame axes, as we do.
* boxes with ``num_lidar_points_in_box == 0`` are dropped unless ``keep_empty_boxes``, as the
  official detection metric drops them (``metrics/tools/compute_detection_metrics_main.cc``).
* difficulty: ``detection_difficulty_level`` when it is LEVEL_1 or LEVEL_2, else (UNKNOWN, unset)
  LEVEL_2 when ``num_lidar_points_in_box <= 5`` and LEVEL_1 otherwise, the official rule
  (``kDetectionLevel2NumPointsThreshold`` in the same file).
* track ids: Waymo's string ``id`` hashed to int64 by :func:`track_id` (stable across runs and machines).
* keypoints: ``laser_keypoints`` (vehicle frame) in ``KEYPOINT_NAMES`` order, each name matching the
  ``KeypointType`` of the same name (``nose`` = ``KEYPOINT_TYPE_NOSE``, ..., ``head_center`` =
  ``KEYPOINT_TYPE_HEAD_CENTER``; ``KEYPOINT_TYPE_FOREHEAD``, a camera-only type, is ignored). A
  keypoint is visible when labelled and not ``is_occluded`` (Waymo's "fully visible", what its pose
  metrics score). An occluded keypoint keeps its location with visibility False; an unlabelled one is
  zeros with visibility False.

The steps after decoding are format-neutral and shared with the v2 parquet reader
(:mod:`voxsparse.data.waymo.v2`) and the ``Objects`` files of :mod:`voxsparse.evaluation.waymo_submission`:
:class:`RangeImageReturn` -> :func:`points_from_returns`, :class:`StoredLabels` -> :func:`label_fields`,
then :func:`make_frame`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from google.protobuf.message import DecodeError

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.waymo.classes import CLASS_NAMES, KEYPOINT_TYPES
from voxsparse.data.waymo.range_image import LASER_NAMES, TOP_LASER, range_image_to_points, row_inclinations
from voxsparse.data.waymo.tfrecord import iter_records

__all__ = [
    "INSTALL_HINT",
    "LEVEL_2_MAX_POINTS",
    "POINT_FEATURES",
    "RangeImageReturn",
    "StoredLabels",
    "WaymoFrame",
    "as_transform",
    "check_pixel_pose",
    "decode_frame",
    "label_fields",
    "make_frame",
    "points_from_returns",
    "read_frames",
    "stored_labels",
    "track_id",
]

INSTALL_HINT = (
    "reading Waymo Open Dataset files needs its protobuf definitions: "
    "`pip install --no-deps waymo-open-dataset-tf-2-12-0==1.6.7` (a 3.8 MB wheel for x86-64 Linux, any "
    "Python 3; its *_pb2 modules need only protobuf, which voxsparse already has). Without --no-deps pip "
    "would also install TensorFlow 2.13 and pin numpy==1.23.5, which conflicts with voxsparse (numpy>=1.24)."
)

#: Columns of ``WaymoFrame.points``: vehicle-frame position (m), range from the sensor (m) and the raw
#: intensity and elongation of the return.
POINT_FEATURES: tuple[str, ...] = ("x", "y", "z", "range", "intensity", "elongation")

#: Objects without a human difficulty and at most this many points are LEVEL_2 (Waymo's rule).
LEVEL_2_MAX_POINTS = 5

# label_pb2.Label.Type -> index into CLASS_NAMES.
_CLASS_OF_TYPE = {
    1: CLASS_NAMES.index("Vehicle"),
    2: CLASS_NAMES.index("Pedestrian"),
    4: CLASS_NAMES.index("Cyclist"),
}


@dataclass(kw_only=True)
class WaymoFrame(FrameRecord):
    """One Waymo frame: all LiDAR returns and the 3D labels, in the frame's vehicle frame.

    The vehicle frame (x forward, y left, z up, origin at the rear axle) plays the part of the LiDAR
    frame of :class:`~voxsparse.data.frame_record.FrameRecord`, whose fields come first.

    Attributes:
        frame_id: ``"<context name>_<timestamp_micros>"``.
        points: (N, 6) float32, columns ``POINT_FEATURES``. Order: first returns of lasers TOP, FRONT,
            SIDE_LEFT, SIDE_RIGHT, REAR, then their second returns; within a range image, row-major
            (the official ``convert_range_image_to_point_cloud`` order, per return).
        boxes: (K, 9) float32 (x, y, z, dx, dy, dz, heading, vx, vy), heading in [-pi, pi).
        labels: (K,) int64 index into ``CLASS_NAMES``.
        num_points: (K,) int64 ``num_lidar_points_in_box``.
        difficulty: (K,) int64 1 = LEVEL_1, 2 = LEVEL_2.
        track_ids: (K,) int64 :func:`track_id` of the Waymo object id.
        keypoints: (K, 14, 3) float32 ``laser_keypoints`` in ``KEYPOINT_NAMES`` order, zeros if unlabelled.
        keypoint_visibility: (K, 14) bool labelled and not occluded.
        point_features: names of the columns of ``points``.
        laser_id: (N,) uint8 ``LaserName`` of each point (1 TOP, 2 FRONT, 3 SIDE_LEFT, 4 SIDE_RIGHT, 5 REAR).
        return_index: (N,) uint8 0 = first return, 1 = second.
        no_label_zone: (N,) bool the point lies in a no-label zone (range-image channel 3 > 0).
        timestamp: ``timestamp_micros`` in seconds (Unix time of the first TOP LiDAR scan of the frame).
        ego_pose: (4, 4) float64 global-from-vehicle frame pose (``Frame.pose``).
        context_name: the segment (``Context.name``); frames of one segment form one sequence.
    """

    point_features: tuple[str, ...]
    laser_id: np.ndarray
    return_index: np.ndarray
    no_label_zone: np.ndarray
    timestamp: float
    ego_pose: np.ndarray
    context_name: str

    BOX_COLUMNS: ClassVar[tuple[int, ...]] = (9,)
    NUM_KEYPOINTS: ClassVar[int | None] = len(KEYPOINT_NAMES)
    KEYPOINTS_REQUIRED: ClassVar[bool] = True

    def point_columns(self) -> int | None:
        return len(self.point_features)

    def array_fields(self) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
        n = len(self.points)
        return {
            **super().array_fields(),
            "laser_id": ((n,), np.uint8, False),
            "return_index": ((n,), np.uint8, False),
            "no_label_zone": ((n,), np.bool_, False),
            "ego_pose": ((4, 4), np.float64, False),
        }

    def __len__(self) -> int:
        """Number of labelled objects."""
        return len(self.boxes)


def track_id(object_id: str) -> int:
    """Stable non-negative int64 for a Waymo object id: BLAKE2b (8-byte digest, little-endian), sign bit cleared.

    Two of a million ids collide with probability ~5e-8.
    """
    digest = hashlib.blake2b(object_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@functools.lru_cache(maxsize=1)
def _protos() -> tuple[Any, Any]:
    """``(dataset_pb2, keypoint_pb2)`` of the official package, or an ImportError saying how to install it."""
    try:
        from waymo_open_dataset import dataset_pb2
        from waymo_open_dataset.protos import keypoint_pb2
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error
    return dataset_pb2, keypoint_pb2


def _keypoint_slots() -> dict[int, int]:
    """``KeypointType`` value -> index into ``KEYPOINT_NAMES``."""
    return {KEYPOINT_TYPES[name]: i for i, name in enumerate(KEYPOINT_NAMES)}


def as_transform(values: Any, where: str) -> np.ndarray:
    """(4, 4) float64 of 16 row-major values; a ValueError naming ``where`` otherwise."""
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.shape != (16,):
        raise ValueError(f"{where}: expected 16 values (a 4x4 row-major transform), got {matrix.shape[0]}")
    return matrix.reshape(4, 4)


def _matrix(compressed: bytes, channels: int, where: str) -> np.ndarray:
    """A zlib-compressed serialized ``MatrixFloat`` as an (H, W, channels) float32 array."""
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as error:
        raise ValueError(f"{where}: not zlib-compressed data ({error})") from None
    matrix = _protos()[0].MatrixFloat.FromString(raw)
    dims = tuple(matrix.shape.dims)
    # protobuf >= 7 converts a repeated field to numpy in ~1 ms per TOP image; 4.x-6.x loop per element
    # (100-200 ms), which makes reading ~5x slower.
    data = np.asarray(matrix.data, dtype=np.float32)
    if len(dims) != 3 or dims[2] != channels or data.size != int(np.prod(dims)):
        raise ValueError(
            f"{where}: expected an (H, W, {channels}) matrix, got dims {dims} with {data.size} values"
        )
    return data.reshape(dims)


@dataclass
class RangeImageReturn:
    """One return of one LiDAR, decoded and calibrated: what :func:`points_from_returns` converts.

    Attributes:
        laser: ``LaserName`` value (1 TOP ... 5 REAR).
        return_index: 0 = first return, 1 = second.
        image: (H, W, 4) float32 range (m), intensity, elongation, no-label-zone flag (1 in, -1 out).
        extrinsic: (4, 4) float64 vehicle-from-sensor transform.
        inclinations: (H,) float64 row inclinations (:func:`~voxsparse.data.waymo.range_image.row_inclinations`).
        pixel_pose: (H, W, 6) per-pixel ``(roll, pitch, yaw, x, y, z)`` poses (TOP LiDAR), else None.
    """

    laser: int
    return_index: int
    image: np.ndarray
    extrinsic: np.ndarray
    inclinations: np.ndarray
    pixel_pose: np.ndarray | None = None


def points_from_returns(
    returns: Sequence[RangeImageReturn], frame_pose: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """points (N, 6) float32 (``POINT_FEATURES``), laser_id (N,) uint8, return_index (N,) uint8,
    no_label_zone (N,) bool of the pixels with range > 0, in :class:`WaymoFrame` order: first returns of
    lasers TOP ... REAR, then second returns, row-major within an image. ``frame_pose`` (4, 4)."""
    chunks, laser_ids, return_ids, nlz = [], [], [], []
    for ret in sorted(returns, key=lambda r: (r.return_index, r.laser)):
        xyz, pixels = range_image_to_points(
            ret.image[..., 0], ret.extrinsic, ret.inclinations, ret.pixel_pose, frame_pose
        )
        channels = ret.image.reshape(-1, 4)[pixels]
        chunk = np.empty((len(pixels), len(POINT_FEATURES)), dtype=np.float32)
        chunk[:, :3] = xyz
        chunk[:, 3:] = channels[:, :3]  # range, intensity, elongation
        chunks.append(chunk)
        laser_ids.append(np.full(len(pixels), ret.laser, dtype=np.uint8))
        return_ids.append(np.full(len(pixels), ret.return_index, dtype=np.uint8))
        nlz.append(channels[:, 3] > 0)  # 1 in a no-label zone, -1 outside
    if not chunks:
        return np.zeros((0, len(POINT_FEATURES)), np.float32), *(
            np.zeros(0, t) for t in (np.uint8, np.uint8, bool)
        )
    return np.concatenate(chunks), np.concatenate(laser_ids), np.concatenate(return_ids), np.concatenate(nlz)


def _decode_points(
    frame: Any, frame_pose: np.ndarray, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """points (N, 6) float32, laser_id (N,) uint8, return_index (N,) uint8, no_label_zone (N,) bool."""
    calibrations = {c.name: c for c in frame.context.laser_calibrations}
    lasers = sorted(frame.lasers, key=lambda laser: laser.name)
    names = [laser.name for laser in lasers]
    if len(set(names)) != len(names) or not set(names) <= set(LASER_NAMES):
        raise ValueError(f"{where}: lasers {names}: expected distinct names among {sorted(LASER_NAMES)}")
    returns = []
    top_pose = None
    for return_index, field in enumerate(("ri_return1", "ri_return2")):
        for laser in lasers:
            range_image = getattr(laser, field)
            if not range_image.range_image_compressed:
                continue
            name = LASER_NAMES[laser.name]
            at = f"{where}: laser {name} {field}"
            if laser.name not in calibrations:
                raise ValueError(f"{at}: no laser calibration for it in context.laser_calibrations")
            calibration = calibrations[laser.name]
            image = _matrix(range_image.range_image_compressed, 4, f"{at}.range_image_compressed")
            height = image.shape[0]
            pixel_pose = None
            if laser.name == TOP_LASER:
                if top_pose is None:
                    # Stored with the first return only; the second return shares it.
                    pose_field = "ri_return1.range_image_pose_compressed"
                    if not laser.ri_return1.range_image_pose_compressed:
                        raise ValueError(f"{where}: laser TOP: {pose_field} is empty")
                    top_pose = _matrix(
                        laser.ri_return1.range_image_pose_compressed, 6, f"{where}: laser TOP {pose_field}"
                    )
                pixel_pose = top_pose
                check_pixel_pose(image, pixel_pose, at)
            inclinations = row_inclinations(
                calibration.beam_inclinations,
                calibration.beam_inclination_min,
                calibration.beam_inclination_max,
                height,
                f"{where}: laser {name} calibration",
            )
            extrinsic = as_transform(
                calibration.extrinsic.transform, f"{where}: laser {name} calibration extrinsic"
            )
            returns.append(
                RangeImageReturn(laser.name, return_index, image, extrinsic, inclinations, pixel_pose)
            )
    return points_from_returns(returns, frame_pose)


def check_pixel_pose(image: np.ndarray, pixel_pose: np.ndarray, where: str) -> None:
    """Raise a ValueError naming ``where`` unless the (H, W, 6) ``pixel_pose`` covers the (H, W, C) ``image``."""
    if pixel_pose.shape[:2] != image.shape[:2]:
        raise ValueError(
            f"{where}: range image is {image.shape[0]}x{image.shape[1]} but its pixel pose is "
            f"{pixel_pose.shape[0]}x{pixel_pose.shape[1]}"
        )


@dataclass
class StoredLabels:
    """A frame's 3D labels as the dataset stores them, whatever the format (v1 ``Label`` protos, v2
    ``lidar_box`` / ``lidar_hkp`` columns, ``Objects`` files), before :func:`label_fields` selects and
    converts them.

    Attributes:
        types: (K,) int64 ``Label.Type``.
        boxes: (K, 9) float64 (center_x, center_y, center_z, length, width, height, heading, speed_x, speed_y).
        num_points: (K,) int64 ``num_lidar_points_in_box``.
        human_difficulty: (K,) int64 ``detection_difficulty_level`` (0 = UNKNOWN / unset).
        ids: K object ids.
        keypoints: per object ``(types (J,) int, locations (J, 3) float64, occluded (J,) bool)`` of its
            laser keypoints (J = 0 for none).
    """

    types: np.ndarray
    boxes: np.ndarray
    num_points: np.ndarray
    human_difficulty: np.ndarray
    ids: list[str]
    keypoints: list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def label_fields(stored: StoredLabels, where: str, keep_empty_boxes: bool = False) -> dict[str, np.ndarray]:
    """The label fields of :class:`WaymoFrame` (``boxes``, ``labels``, ``num_points``, ``difficulty``,
    ``track_ids``, ``keypoints``, ``keypoint_visibility``) from ``stored``, by the rules of the module
    docstring; ``where`` names the frame in error messages."""
    keep = [
        i
        for i, kind in enumerate(stored.types.tolist())
        if kind in _CLASS_OF_TYPE and (keep_empty_boxes or stored.num_points[i] > 0)
    ]
    k, slots = len(keep), _keypoint_slots()
    boxes = stored.boxes[keep].astype(np.float32).reshape(k, 9)
    keypoints = np.zeros((k, len(KEYPOINT_NAMES), 3), dtype=np.float32)
    visibility = np.zeros((k, len(KEYPOINT_NAMES)), dtype=bool)
    labelled = np.zeros((k, len(KEYPOINT_NAMES)), dtype=bool)
    for i, index in enumerate(keep):
        for kind, location, occluded in zip(*stored.keypoints[index]):
            slot = slots.get(int(kind))
            if slot is None:
                continue
            if labelled[i, slot]:
                raise ValueError(f"{where}: object {stored.ids[index]!r} labels keypoint type {kind} twice")
            keypoints[i, slot] = location
            labelled[i, slot] = True
            visibility[i, slot] = not occluded
    # A heading just below pi can round onto pi in float32; keep [-pi, pi).
    boxes[boxes[:, 6] >= np.float32(np.pi), 6] -= np.float32(2 * np.pi)

    num_points = stored.num_points[keep].astype(np.int64)
    human = stored.human_difficulty[keep].astype(np.int64)
    difficulty = np.where(np.isin(human, (1, 2)), human, np.where(num_points <= LEVEL_2_MAX_POINTS, 2, 1))
    return {
        "boxes": boxes,
        "labels": np.array([_CLASS_OF_TYPE[int(stored.types[i])] for i in keep], dtype=np.int64),
        "num_points": num_points,
        "difficulty": difficulty.astype(np.int64),
        "track_ids": np.array([track_id(stored.ids[i]) for i in keep], dtype=np.int64),
        "keypoints": keypoints,
        "keypoint_visibility": visibility,
    }


def stored_labels(labels: Sequence[Any]) -> StoredLabels:
    """:class:`StoredLabels` of ``label_pb2.Label`` messages (``Frame.laser_labels``, ``Object.object``)."""
    k = len(labels)
    boxes = np.zeros((k, 9), dtype=np.float64)
    keypoints = []
    for i, label in enumerate(labels):
        b, m = label.box, label.metadata
        boxes[i] = (
            b.center_x,
            b.center_y,
            b.center_z,
            b.length,
            b.width,
            b.height,
            b.heading,
            m.speed_x,
            m.speed_y,
        )
        points = label.laser_keypoints.keypoint
        keypoints.append(
            (
                np.array([p.type for p in points], dtype=np.int64),
                np.array(
                    [
                        (p.keypoint_3d.location_m.x, p.keypoint_3d.location_m.y, p.keypoint_3d.location_m.z)
                        for p in points
                    ],
                    dtype=np.float64,
                ).reshape(-1, 3),
                np.array([p.keypoint_3d.visibility.is_occluded for p in points], dtype=bool),
            )
        )
    return StoredLabels(
        types=np.array([label.type for label in labels], dtype=np.int64),
        boxes=boxes,
        num_points=np.array([label.num_lidar_points_in_box for label in labels], dtype=np.int64),
        human_difficulty=np.array([label.detection_difficulty_level for label in labels], dtype=np.int64),
        ids=[label.id for label in labels],
        keypoints=keypoints,
    )


def decode_frame(frame: Any, where: str = "frame", keep_empty_boxes: bool = False) -> WaymoFrame:
    """Convert a ``dataset_pb2.Frame`` to a :class:`WaymoFrame`; ``where`` names it in error messages."""
    where = f"{where} ({frame.context.name}@{frame.timestamp_micros})"
    ego_pose = as_transform(frame.pose.transform, f"{where}: pose")
    points = _decode_points(frame, ego_pose, where)
    labels = label_fields(stored_labels(frame.laser_labels), where, keep_empty_boxes)
    return make_frame(frame.context.name, frame.timestamp_micros, ego_pose, points, labels)


def make_frame(
    context_name: str,
    timestamp_micros: int,
    ego_pose: np.ndarray,
    points: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    labels: dict[str, np.ndarray],
) -> WaymoFrame:
    """A :class:`WaymoFrame` of :func:`points_from_returns`' output and :func:`label_fields`' output."""
    xyz, laser_id, return_index, no_label_zone = points
    return WaymoFrame(
        frame_id=f"{context_name}_{timestamp_micros}",
        points=xyz,
        **labels,
        point_features=POINT_FEATURES,
        laser_id=laser_id,
        return_index=return_index,
        no_label_zone=no_label_zone,
        timestamp=timestamp_micros * 1e-6,
        ego_pose=ego_pose,
        context_name=context_name,
    )


def read_frames(path: str | os.PathLike, keep_empty_boxes: bool = False) -> Iterator[WaymoFrame]:
    """Yield the frames of a Waymo Open Dataset v1 TFRecord segment, in file order.

    Raises:
        ImportError: the official protos are not installed (:data:`INSTALL_HINT`).
        TFRecordError: a record is truncated or fails its checksum.
        ValueError: a record is not a valid ``Frame`` (message: file, record, segment and timestamp, field).
    """
    dataset_pb2 = _protos()[0]
    path = Path(path)
    for index, data in enumerate(iter_records(path)):
        where = f"{path}: record {index}"
        try:
            frame = dataset_pb2.Frame.FromString(data)
        except DecodeError as error:
            raise ValueError(f"{where}: not a waymo.open_dataset.Frame ({error})") from None
        yield decode_frame(frame, where, keep_empty_boxes)
