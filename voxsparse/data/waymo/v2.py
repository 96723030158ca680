"""Waymo Open Dataset v2 (parquet components) to :class:`~voxsparse.data.waymo.frame.WaymoFrame`, with pyarrow.

The v2 release stores each kind of data ("component") of a segment in its own parquet file,
``<split>/<component>/<context_name>.parquet``, columns named after the official schema
(``waymo_open_dataset/v2``: ``key.*`` and ``[<Component>].<field path>``). This reader needs pyarrow
only (no TensorFlow, no protos, no pandas or dask) and reads these components:

==================  ==========================================================  =====================
component           columns                                                     rows
==================  ==========================================================  =====================
lidar               range images of both returns: ``values`` (flat float32,      one per frame x LiDAR
                    uncompressed, unlike v1's zlib ``MatrixFloat``) and
                    ``shape`` (H, W, 4)
lidar_pose          the TOP LiDAR's per-pixel vehicle poses (H, W, 6)           one per frame
lidar_calibration   extrinsic, beam inclinations (min, max, values or null)     one per LiDAR
vehicle_pose        ``world_from_vehicle`` (4x4, row-major)                     one per frame
lidar_box           boxes, type, speed, num_lidar_points_in_box, difficulty     one per frame x object
lidar_hkp           laser keypoints (types, locations, occlusion) by object id  one per frame x human
==================  ==========================================================  =====================

``lidar_box`` and ``lidar_hkp`` may be absent (the test split has no labels; only some segments have
keypoints); the others are required. Each frame is converted exactly as the v1 reader converts the
same frame (the shared :func:`~voxsparse.data.waymo.frame.points_from_returns` and
:func:`~voxsparse.data.waymo.frame.label_fields`): the records are identical.

Reading is streamed: a component file is opened once per segment and its key column indexed; a
frame then reads only the columns it needs of only the row groups that hold its rows (a frame's
range images are ~21 MB uncompressed: TOP 64x2650 and four 200x600 images, two returns, four
float32 channels), keeping the row groups of the last frame read, so a file written in time order
is read once.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxsparse.data.waymo.frame import (
    RangeImageReturn,
    StoredLabels,
    WaymoFrame,
    as_transform,
    check_pixel_pose,
    label_fields,
    make_frame,
    points_from_returns,
)
from voxsparse.data.waymo.range_image import LASER_NAMES, TOP_LASER, row_inclinations

__all__ = ["INSTALL_HINT_V2", "REQUIRED_COMPONENTS", "read_segment", "segment_names"]

INSTALL_HINT_V2 = (
    'reading Waymo v2 parquet files needs pyarrow: pip install -e ".[waymo-v2]" (pyarrow>=14,<23)'
)

#: Components every segment must have (``lidar_box`` and ``lidar_hkp`` are optional).
REQUIRED_COMPONENTS = ("lidar", "lidar_calibration", "vehicle_pose", "lidar_pose")

_CONTEXT, _TIMESTAMP, _LASER, _OBJECT = (
    "key.segment_context_name",
    "key.frame_timestamp_micros",
    "key.laser_name",
    "key.laser_object_id",
)
_LIDAR = "[LiDARComponent].range_image_return{}.{}"
_LIDAR_POSE = "[LiDARPoseComponent].range_image_return1.{}"
_CALIBRATION = "[LiDARCalibrationComponent]."
_POSE = "[VehiclePoseComponent].world_from_vehicle.transform"
_BOX = "[LiDARBoxComponent]."
_BOX_FIELDS = (
    "box.center.x", "box.center.y", "box.center.z", "box.size.x", "box.size.y", "box.size.z", "box.heading",
    "speed.x", "speed.y",
)  # fmt: skip
_KEYPOINTS = "[LiDARHumanKeypointsComponent].lidar_keypoints[*]."
_KEYPOINT_FIELDS = (
    "type", "keypoint_3d.location_m.x", "keypoint_3d.location_m.y", "keypoint_3d.location_m.z",
    "keypoint_3d.visibility.is_occluded",
)  # fmt: skip


def _pyarrow() -> tuple[Any, Any]:
    """``(pyarrow, pyarrow.parquet)``, or an ImportError saying how to install them."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:
        raise ImportError(INSTALL_HINT_V2) from error
    return pyarrow, pyarrow.parquet


class _ComponentFile:
    """One component file of one segment, read frame by frame: only ``columns``, and only the row
    groups that hold the frame's rows (``key.frame_timestamp_micros``), the last frame's row groups kept."""

    def __init__(self, path: Path, columns: Sequence[str]):
        pyarrow, parquet = _pyarrow()
        self._concat = pyarrow.concat_tables
        self.path = path
        self.file = parquet.ParquetFile(path)
        names = set(self.file.schema_arrow.names)
        missing = [c for c in (_TIMESTAMP, *columns) if c not in names]
        if missing:
            raise ValueError(f"{path}: no column {missing[0]!r} (is it a Waymo v2 {path.parent.name} file?)")
        self.columns = list(dict.fromkeys([_TIMESTAMP, *columns]))
        self.groups: dict[int, list[int]] = {}
        for group in range(self.file.num_row_groups):
            stamps = self.file.read_row_group(group, columns=[_TIMESTAMP]).column(0).to_numpy()
            for stamp in np.unique(stamps).tolist():
                self.groups.setdefault(stamp, []).append(group)
        self._cached: dict[int, Any] = {}

    def timestamps(self) -> list[int]:
        """Every frame timestamp (microseconds) of the file, ascending."""
        return sorted(self.groups)

    def rows(self, timestamp: int) -> Any:
        """A ``pyarrow.Table`` of the rows of the frame ``timestamp`` (none if it has none), file order."""
        groups = self.groups.get(timestamp, [])
        if not groups:
            return self.file.schema_arrow.empty_table().select(self.columns)
        # Row groups shared with the previous frame are not read again.
        new = [g for g in groups if g not in self._cached]
        if new:
            table = self.file.read_row_groups(new, columns=self.columns)
            sizes = [self.file.metadata.row_group(g).num_rows for g in new]
            starts = np.cumsum([0, *sizes])
            self._cached.update({g: table.slice(starts[i], sizes[i]) for i, g in enumerate(new)})
        self._cached = {g: self._cached[g] for g in groups}
        table = self._concat([self._cached[g] for g in groups])
        stamps = table.column(_TIMESTAMP).to_numpy()
        # Row groups aligned with frames need no copy.
        return table if (stamps == timestamp).all() else table.take(np.flatnonzero(stamps == timestamp))


def _matrix(values: Any, shape: Any, channels: int, where: str) -> np.ndarray | None:
    """A range image (``values`` list scalar, ``shape`` (H, W, C)) as (H, W, channels) float32; None if absent."""
    if not values.is_valid or len(values) == 0:
        return None
    dims = tuple(shape.as_py() or ())
    data = values.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if len(dims) != 3 or dims[2] != channels or data.size != int(np.prod(dims)):
        raise ValueError(
            f"{where}: expected an (H, W, {channels}) image, got shape {dims} with {data.size} values"
        )
    return data.reshape(dims)


def segment_names(split_dir: str | os.PathLike) -> list[str]:
    """The segments (context names) of a v2 split folder: the stems of ``lidar/*.parquet``, sorted."""
    return sorted(p.stem for p in (Path(split_dir) / "lidar").glob("*.parquet"))


def read_segment(
    split_dir: str | os.PathLike, context_name: str, keep_empty_boxes: bool = False
) -> Iterator[WaymoFrame]:
    """Yield the frames of one v2 segment in time order, the records the v1 reader gives for them.

    Args:
        split_dir: the folder holding one folder per component (e.g. ``.../training``).
        context_name: the segment (``<split_dir>/<component>/<context_name>.parquet``).
        keep_empty_boxes: keep boxes without LiDAR points (dropped by default, as by the v1 reader).

    Raises:
        ImportError: pyarrow is not installed (:data:`INSTALL_HINT_V2`).
        FileNotFoundError: a required component file is missing (message: the path).
        ValueError: a file lacks a column, or a frame's data is inconsistent (message: file, segment,
            timestamp, field).
    """
    split_dir = Path(split_dir)
    paths = {
        name: split_dir / name / f"{context_name}.parquet"
        for name in (*REQUIRED_COMPONENTS, "lidar_box", "lidar_hkp")
    }
    for name in REQUIRED_COMPONENTS:
        if not paths[name].is_file():
            raise FileNotFoundError(f"Waymo v2 segment {context_name}: no {name} component {paths[name]}")
    lidar = _ComponentFile(
        paths["lidar"], [_LASER, *(_LIDAR.format(r, f) for r in (1, 2) for f in ("values", "shape"))]
    )
    lidar_pose = _ComponentFile(
        paths["lidar_pose"], [_LASER, _LIDAR_POSE.format("values"), _LIDAR_POSE.format("shape")]
    )
    vehicle_pose = _ComponentFile(paths["vehicle_pose"], [_CONTEXT, _POSE])
    boxes = (
        _ComponentFile(
            paths["lidar_box"],
            [
                _OBJECT,
                *(
                    _BOX + f
                    for f in (*_BOX_FIELDS, "type", "num_lidar_points_in_box", "difficulty_level.detection")
                ),
            ],
        )
        if paths["lidar_box"].is_file()
        else None
    )
    keypoints = (
        _ComponentFile(paths["lidar_hkp"], [_OBJECT, *(_KEYPOINTS + f for f in _KEYPOINT_FIELDS)])
        if paths["lidar_hkp"].is_file()
        else None
    )
    calibrations = _calibrations(paths["lidar_calibration"])
    for timestamp in lidar.timestamps():
        where = f"Waymo v2 segment {context_name}@{timestamp}"
        pose_rows = vehicle_pose.rows(timestamp)
        if pose_rows.num_rows != 1:
            raise ValueError(f"{where}: {pose_rows.num_rows} rows in {vehicle_pose.path}, expected 1")
        context = pose_rows.column(_CONTEXT)[0].as_py()
        ego_pose = as_transform(pose_rows.column(_POSE)[0].as_py(), f"{where}: {vehicle_pose.path} {_POSE}")
        returns = _returns(lidar, lidar_pose, calibrations, timestamp, where)
        stored = _stored_labels(boxes, keypoints, timestamp, where)
        labels = label_fields(stored, where, keep_empty_boxes)
        yield make_frame(context, timestamp, ego_pose, points_from_returns(returns, ego_pose), labels)


def _calibrations(path: Path) -> dict[int, tuple[np.ndarray, Any, float, float]]:
    """LaserName -> (extrinsic (4, 4), beam inclinations or None, inclination min, max)."""
    columns = [_LASER] + [
        _CALIBRATION + f
        for f in (
            "extrinsic.transform",
            "beam_inclination.values",
            "beam_inclination.min",
            "beam_inclination.max",
        )
    ]
    parquet = _pyarrow()[1]
    table = parquet.read_table(path, columns=columns)
    out = {}
    for laser, extrinsic, values, low, high in zip(*(table.column(c).to_pylist() for c in columns)):
        out[laser] = (as_transform(extrinsic, f"{path}: laser {laser} extrinsic"), values, low, high)
    return out


def _returns(
    lidar: _ComponentFile, lidar_pose: _ComponentFile, calibrations: dict, timestamp: int, where: str
) -> list[RangeImageReturn]:
    """The range images of one frame, with their calibration and (TOP) pixel poses."""
    rows = lidar.rows(timestamp)
    lasers = rows.column(_LASER).to_pylist()
    if len(set(lasers)) != len(lasers) or not set(lasers) <= set(LASER_NAMES):
        raise ValueError(
            f"{where}: lasers {sorted(lasers)}: expected distinct names among {sorted(LASER_NAMES)}"
        )
    returns = []
    for row, laser in enumerate(lasers):
        name = LASER_NAMES[laser]
        pixel_pose = None
        for return_index in (0, 1):
            field = _LIDAR.format(return_index + 1, "{}")
            at = f"{where}: laser {name} {field.format('values')}"
            image = _matrix(
                rows.column(field.format("values"))[row], rows.column(field.format("shape"))[row], 4, at
            )
            if image is None:
                continue
            if laser not in calibrations:
                raise ValueError(f"{where}: laser {name}: no row for it in lidar_calibration")
            extrinsic, beams, low, high = calibrations[laser]
            if laser == TOP_LASER and pixel_pose is None:
                # Stored for the first return only; the second return shares it.
                pose_rows = lidar_pose.rows(timestamp)
                top = pose_rows.column(_LASER).to_pylist()
                if TOP_LASER not in top:
                    raise ValueError(f"{where}: laser TOP: no row in {lidar_pose.path}")
                i = top.index(TOP_LASER)
                pixel_pose = _matrix(
                    pose_rows.column(_LIDAR_POSE.format("values"))[i],
                    pose_rows.column(_LIDAR_POSE.format("shape"))[i],
                    6,
                    f"{where}: laser TOP {lidar_pose.path}",
                )
                if pixel_pose is None:
                    raise ValueError(f"{where}: laser TOP: empty pixel pose in {lidar_pose.path}")
            if pixel_pose is not None:
                check_pixel_pose(image, pixel_pose, at)
            inclinations = row_inclinations(
                beams or (), low, high, image.shape[0], f"{where}: laser {name} calibration"
            )
            returns.append(RangeImageReturn(laser, return_index, image, extrinsic, inclinations, pixel_pose))
    return returns


def _stored_labels(
    boxes: _ComponentFile | None, keypoints: _ComponentFile | None, timestamp: int, where: str
) -> StoredLabels:
    """The frame's ``lidar_box`` rows (file order) with their ``lidar_hkp`` keypoints joined by object id."""
    if boxes is None:
        empty = np.zeros(0, dtype=np.int64)
        return StoredLabels(empty, np.zeros((0, 9)), empty, empty, [], [])
    rows = boxes.rows(timestamp)
    ids = rows.column(_OBJECT).to_pylist()

    def column(field: str, dtype: type) -> np.ndarray:
        # A null (v1: no metadata, no difficulty) reads as 0, the v1 protos' default.
        return rows.column(_BOX + field).fill_null(0).to_numpy(zero_copy_only=False).astype(dtype)

    values = np.stack([column(f, np.float64) for f in _BOX_FIELDS], axis=1).reshape(len(ids), 9)
    by_object: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    if keypoints is not None:
        people = keypoints.rows(timestamp)
        columns = [people.column(_KEYPOINTS + f).to_pylist() for f in _KEYPOINT_FIELDS]
        for object_id, kinds, x, y, z, occluded in zip(people.column(_OBJECT).to_pylist(), *columns):
            if object_id in by_object:
                raise ValueError(f"{where}: object {object_id!r} has two rows in {keypoints.path}")
            by_object[object_id] = (
                np.asarray(kinds or [], dtype=np.int64),
                np.stack([x or [], y or [], z or []], axis=1).astype(np.float64).reshape(-1, 3),
                np.asarray(occluded or [], dtype=bool),
            )
    none = (np.zeros(0, np.int64), np.zeros((0, 3)), np.zeros(0, bool))
    return StoredLabels(
        types=column("type", np.int64),
        boxes=values,
        num_points=column("num_lidar_points_in_box", np.int64),
        human_difficulty=column("difficulty_level.detection", np.int64),
        ids=ids,
        keypoints=[by_object.get(i, none) for i in ids],
    )
