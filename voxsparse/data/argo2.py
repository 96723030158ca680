"""Argoverse 2 sensor dataset: LiDAR sweeps, city-to-ego poses and 3D cuboids read through the
official ``av2`` package (``pip install -e ".[argo2]"``), and the preparation hooks of
``tools/prepare_data.py argo2``.

Layout under the root (``data/README.md`` says where it comes from)::

    <split>/<log_id>/sensors/lidar/<timestamp_ns>.feather   one sweep of both LiDARs, ego frame:
                                                             x, y, z (float16), intensity (uint8),
                                                             laser_number (uint8), offset_ns (uint32)
    <split>/<log_id>/city_SE3_egovehicle.feather            timestamp_ns, qw, qx, qy, qz, tx_m, ty_m, tz_m
    <split>/<log_id>/annotations.feather                    one cuboid a row (train and val only):
                                                             timestamp_ns, track_uuid, category,
                                                             length_m, width_m, height_m, qw, qx, qy, qz,
                                                             tx_m, ty_m, tz_m, num_interior_pts
    <split>/<log_id>/calibration/, map/, sensors/cameras/    not read here (the metric reads map/)

``<split>`` is ``train``, ``val`` or ``test``. A frame is one sweep (10 Hz, every sweep of the
train and val logs is annotated); its id is ``<log_id>_<timestamp_ns>`` (:func:`frame_id`):

- points (N, 4) float32 ``(x, y, z, intensity)`` in the ego frame (x forward, y left, z up, metres),
  intensity as stored (0 .. 255): the columns and values OpenPCDet trains on.
- boxes (K, 7): the cuboids of :data:`CLASS_NAMES` at the sweep's timestamp, ``(tx, ty, tz, length,
  width, height, yaw)`` with the yaw of the cuboid's quaternion (cuboid centres, like ours); other
  categories (``ANIMAL``, ``RAILED_VEHICLE``, ...) are dropped.
- num_points: the annotation's ``num_interior_pts`` (OpenPCDet trains on boxes with at least one);
  difficulty 1 (no levels); track_ids: the index of the ``track_uuid`` among the log's sorted uuids,
  stable over the log.
- city_from_ego: the ego pose at the sweep (:class:`~voxsparse.geometry.RigidTransform`).

Class names are OpenPCDet's spelling of the categories (``REGULAR_VEHICLE`` -> ``Regular_vehicle``:
:func:`category_to_name`) in its order, so its published weights load as they are.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.prepared import PreparationSplit
from voxsparse.geometry import RigidTransform, wrap_angle

__all__ = [
    "ANNOTATION_COLUMNS",
    "ARGO2_POINT_FEATURES",
    "CLASS_NAMES",
    "CUBOID_COLUMNS",
    "INSTALL_HINT",
    "POSE_COLUMNS",
    "SPLITS",
    "SWEEP_COLUMNS",
    "Argo2Frame",
    "add_prepare_arguments",
    "argo2_frames",
    "category_to_name",
    "frame_id",
    "log_ids",
    "name_to_category",
    "parse_frame_id",
    "preparation_splits",
    "quaternion_yaw",
    "read_annotations",
    "read_feather",
    "read_log",
    "read_poses",
    "read_sweep",
    "sweep_timestamps",
]

#: Label order of prepared Argoverse 2 frames: OpenPCDet's ``CLASS_NAMES`` (the 26 evaluated
#: categories of the detection challenge, ``av2.evaluation.SensorCompetitionCategories``).
CLASS_NAMES: tuple[str, ...] = (
    "Regular_vehicle", "Pedestrian", "Bicyclist", "Motorcyclist", "Wheeled_rider", "Bollard", "Construction_cone",
    "Sign", "Construction_barrel", "Stop_sign", "Mobile_pedestrian_crossing_sign", "Large_vehicle", "Bus",
    "Box_truck", "Truck", "Vehicular_trailer", "Truck_cab", "School_bus", "Articulated_bus",
    "Message_board_trailer", "Bicycle", "Motorcycle", "Wheeled_device", "Wheelchair", "Stroller", "Dog",
)  # fmt: skip

#: Point columns of an Argoverse 2 frame.
ARGO2_POINT_FEATURES: tuple[str, ...] = ("x", "y", "z", "intensity")

#: The dataset's split folders (prepared splits carry the same names).
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Column -> numpy dtype of the released files (what the readers accept; the test writers write these).
SWEEP_COLUMNS: dict[str, str] = {
    "x": "float16", "y": "float16", "z": "float16", "intensity": "uint8", "laser_number": "uint8",
    "offset_ns": "uint32",
}  # fmt: skip
POSE_COLUMNS: dict[str, str] = {
    "timestamp_ns": "int64", "qw": "float64", "qx": "float64", "qy": "float64", "qz": "float64",
    "tx_m": "float64", "ty_m": "float64", "tz_m": "float64",
}  # fmt: skip
ANNOTATION_COLUMNS: dict[str, str] = {
    "timestamp_ns": "int64", "track_uuid": "str", "category": "str", "length_m": "float32", "width_m": "float32",
    "height_m": "float32", "qw": "float32", "qx": "float32", "qy": "float32", "qz": "float32", "tx_m": "float32",
    "ty_m": "float32", "tz_m": "float32", "num_interior_pts": "int64",
}  # fmt: skip
#: A cuboid's parameters in the order ``av2`` evaluates them (``av2.structures.cuboid.ORDERED_CUBOID_COL_NAMES``).
CUBOID_COLUMNS: tuple[str, ...] = ("tx_m", "ty_m", "tz_m", "length_m", "width_m", "height_m", "qw", "qx", "qy", "qz")  # fmt: skip

INSTALL_HINT = 'Argoverse 2 needs the argo2 extra: pip install -e ".[argo2]" (av2 0.3.6)'


# --- names -------------------------------------------------------------------------------------


def category_to_name(category: str) -> str:
    """An ``av2`` category as a class name: ``REGULAR_VEHICLE`` -> ``Regular_vehicle`` (OpenPCDet's)."""
    return category.lower().capitalize()


def name_to_category(name: str) -> str:
    """A class name as its ``av2`` category: ``Regular_vehicle`` -> ``REGULAR_VEHICLE``."""
    return name.upper()


def frame_id(log_id: str, timestamp_ns: int) -> str:
    """The frame id of a sweep: ``<log_id>_<timestamp_ns>`` (log ids are UUIDs: hex digits and ``-``)."""
    return f"{log_id}_{int(timestamp_ns)}"


def parse_frame_id(frame: str) -> tuple[str, int]:
    """``(log_id, timestamp_ns)`` of a frame id written by :func:`frame_id`.

    Raises:
        ValueError: naming the id, when it is not ``<log_id>_<integer>``.
    """
    log_id, sep, stamp = frame.rpartition("_")
    if not sep or not log_id or not stamp.isdigit():
        raise ValueError(f"frame id {frame!r}: not an Argoverse 2 frame id <log_id>_<timestamp_ns>")
    return log_id, int(stamp)


def quaternion_yaw(quaternions: np.ndarray) -> np.ndarray:
    """(K,) float64 rotation about +z of (K, 4) quaternions ``(w, x, y, z)`` (the z angle of their x-y-z
    Euler angles, as ``av2.geometry.geometry.mat_to_xyz``), wrapped to [-pi, pi)."""
    w, x, y, z = np.asarray(quaternions, np.float64).reshape(-1, 4).T
    return wrap_angle(np.arctan2(2.0 * (w * z + x * y), 1.0 - 2.0 * (y * y + z * z)))


# --- files -------------------------------------------------------------------------------------


def read_feather(path: str | Path, columns: Sequence[str] | None = None) -> Any:
    """A feather file as a pandas DataFrame, read by ``av2.utils.io.read_feather``.

    Raises:
        ImportError: without ``av2`` (:data:`INSTALL_HINT`).
        FileNotFoundError: naming the file.
        ValueError: naming the file and the columns it lacks.
    """
    try:
        from av2.utils.io import read_feather as av2_read_feather
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    table = av2_read_feather(path)
    if columns is not None:
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: no column(s) {missing} (it has {list(table.columns)})")
        table = table[list(columns)]
    return table


def sweep_timestamps(log_dir: str | Path) -> list[int]:
    """The sweep timestamps (ns) of a log, ascending (the names of ``sensors/lidar/*.feather``)."""
    names = (p.stem for p in (Path(log_dir) / "sensors" / "lidar").glob("*.feather"))
    return sorted(int(n) for n in names if n.isdigit())


def read_sweep(path: str | Path) -> np.ndarray:
    """(N, 4) float32 ``(x, y, z, intensity)`` of one sweep file, in the ego frame."""
    table = read_feather(path, ARGO2_POINT_FEATURES)
    points = table.to_numpy(dtype=np.float32)
    if not np.isfinite(points).all():
        raise ValueError(f"{path}: {int((~np.isfinite(points).all(1)).sum())} point(s) hold NaN or inf")
    return np.ascontiguousarray(points)


def read_poses(log_dir: str | Path) -> dict[int, RigidTransform]:
    """Timestamp (ns) -> ego-to-city transform, from ``city_SE3_egovehicle.feather``."""
    table = read_feather(Path(log_dir) / "city_SE3_egovehicle.feather", tuple(POSE_COLUMNS))
    q = table[["qw", "qx", "qy", "qz"]].to_numpy(np.float64)
    t = table[["tx_m", "ty_m", "tz_m"]].to_numpy(np.float64)
    stamps = table["timestamp_ns"].to_numpy(np.int64)
    return {int(s): RigidTransform(tuple(qi), tuple(ti)) for s, qi, ti in zip(stamps, q, t)}


def read_annotations(log_dir: str | Path) -> Any:
    """The log's ``annotations.feather`` (a pandas DataFrame, columns :data:`ANNOTATION_COLUMNS`)."""
    return read_feather(Path(log_dir) / "annotations.feather", tuple(ANNOTATION_COLUMNS))


def log_ids(split_dir: str | Path) -> list[str]:
    """The logs of a split folder, sorted: its sub-folders that hold ``sensors/lidar``."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        return []
    return sorted(d.name for d in split_dir.iterdir() if (d / "sensors" / "lidar").is_dir())


# --- frames ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Argo2Frame(FrameRecord):
    """One Argoverse 2 sweep in the ego frame (module docstring); a
    :class:`~voxsparse.data.frame_record.FrameRecord` with its log, time and pose.

    Attributes:
        point_features: names of the point columns (:data:`ARGO2_POINT_FEATURES`).
        log_id: the log (sequence) it belongs to; timestamp_ns: the sweep's time.
        city_from_ego: the ego pose in the city frame at the sweep.
    """

    point_features: tuple[str, ...] = field(default=ARGO2_POINT_FEATURES)
    log_id: str
    timestamp_ns: int
    city_from_ego: RigidTransform

    BOX_COLUMNS = (7,)

    def point_columns(self) -> int | None:
        return len(self.point_features)


def _boxes_of(rows: Any) -> tuple[np.ndarray, np.ndarray]:
    """(K, 7) float32 boxes and (K,) int64 labels of annotation rows of :data:`CLASS_NAMES`."""
    params = rows[list(CUBOID_COLUMNS)].to_numpy(np.float64)
    yaw = quaternion_yaw(params[:, 6:10])
    boxes = np.column_stack([params[:, :6], yaw]).astype(np.float32).reshape(-1, 7)
    labels = np.array([CLASS_NAMES.index(category_to_name(c)) for c in rows["category"]], dtype=np.int64)
    return boxes, labels


def read_log(split_dir: str | Path, log_id: str, labelled: bool | None = None) -> Iterator[Argo2Frame]:
    """The frames of one log in time order, one sweep read at a time.

    Args:
        split_dir: the split folder holding ``<log_id>/``.
        labelled: read ``annotations.feather`` (None: when the log has one; the test split has none).

    Raises:
        FileNotFoundError / ValueError: naming the file that is missing or lacks columns, or a sweep
            without a pose.
    """
    log_dir = Path(split_dir) / log_id
    stamps = sweep_timestamps(log_dir)
    if not stamps:
        raise FileNotFoundError(f"{log_dir}: no sensors/lidar/<timestamp_ns>.feather sweeps")
    poses = read_poses(log_dir)
    if labelled is None:
        labelled = (log_dir / "annotations.feather").is_file()
    by_time: dict[int, Any] = {}
    track_index: dict[str, int] = {}
    if labelled:
        table = read_annotations(log_dir)
        track_index = {u: i for i, u in enumerate(sorted(set(table["track_uuid"])))}
        known = table["category"].map(lambda c: category_to_name(c) in CLASS_NAMES).to_numpy(bool)
        table = table[known]
        by_time = {int(t): rows for t, rows in table.groupby("timestamp_ns", sort=False)}
    for stamp in stamps:
        if stamp not in poses:
            raise ValueError(f"{log_dir / 'city_SE3_egovehicle.feather'}: no pose at sweep {stamp}")
        rows = by_time.get(stamp)
        if rows is None:
            boxes, labels = np.zeros((0, 7), np.float32), np.zeros(0, np.int64)
            num_points, tracks = np.zeros(0, np.int64), np.zeros(0, np.int64)
        else:
            boxes, labels = _boxes_of(rows)
            num_points = rows["num_interior_pts"].to_numpy(np.int64)
            tracks = np.array([track_index[u] for u in rows["track_uuid"]], dtype=np.int64)
        yield Argo2Frame(
            frame_id=frame_id(log_id, stamp),
            points=read_sweep(log_dir / "sensors" / "lidar" / f"{stamp}.feather"),
            boxes=boxes,
            labels=labels,
            num_points=num_points,
            difficulty=np.ones(len(labels), np.int64),
            track_ids=tracks,
            log_id=log_id,
            timestamp_ns=stamp,
            city_from_ego=poses[stamp],
        )


# --- preparation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LogTask:
    """One log to prepare (picklable)."""

    split_dir: str
    log_id: str


def argo2_frames(task: _LogTask) -> Iterator[Argo2Frame]:
    """The frames of one log (a ``prepare`` factory: module level, so workers can pickle it)."""
    return read_log(task.split_dir, task.log_id)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """No options of its own; ``--root`` holds the ``train`` / ``val`` / ``test`` folders."""
    parser.set_defaults(root="data/argo2/sensor", out="data/prepared/argo2")


def preparation_splits(args: argparse.Namespace) -> list[PreparationSplit]:
    """The splits ``tools/prepare_data.py argo2`` prepares: ``--splits`` (default train and val),
    one task per log, every sweep a frame."""
    root = Path(args.root)
    splits = args.splits or ["train", "val"]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SystemExit(f"--splits {unknown}: Argoverse 2 splits are {list(SPLITS)}")

    def tasks(split: str) -> dict[str, _LogTask]:
        ids = log_ids(root / split)
        if not ids:
            raise SystemExit(
                f"{root / split}: no logs (<log_id>/sensors/lidar/) found (data/README.md, Argoverse 2)"
            )
        return {i: _LogTask(str(root / split), i) for i in ids}

    config = {"dataset": "argo2"}
    # Intensities are integers 0 .. 255, which float16 holds exactly.
    return [
        PreparationSplit(
            split, argo2_frames, lambda split=split: tasks(split), CLASS_NAMES, config, ("intensity",)
        )
        for split in splits
    ]
