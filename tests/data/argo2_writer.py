"""A tiny Argoverse 2 sensor log in the released format, for tests: feather files with the column
names and dtypes of ``voxsparse.data.argo2`` (``SWEEP_COLUMNS``, ``POSE_COLUMNS``,
``ANNOTATION_COLUMNS``, written by pyarrow as the release's files are Arrow IPC), the sensor
calibration ``av2.structures.sweep.Sweep`` reads, and a map folder ``av2``'s
``ArgoverseStaticMap.from_map_dir(build_raster=True)`` loads (one drivable area, a flat ground surface).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyarrow import feather

from voxsparse.data.argo2 import ANNOTATION_COLUMNS, POSE_COLUMNS, SWEEP_COLUMNS
from voxsparse.geometry import yaw_quaternion


@dataclass
class Cuboid:
    """One annotation row: centre (x, y, z), size (length, width, height), yaw, in the ego frame."""

    timestamp_ns: int
    track_uuid: str
    category: str
    box: tuple[float, ...]  # x, y, z, length, width, height, yaw
    num_interior_pts: int


def _write(path: Path, columns: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(
        {name: np.asarray(columns[name]).astype(object if t == "str" else t) for name, t in dtypes.items()}
    )
    feather.write_feather(table, path)


def write_sweep(log_dir: Path, timestamp_ns: int, points: np.ndarray, rng: np.random.Generator) -> None:
    """``points`` (N, 4) x, y, z, intensity; stored as float16 / uint8 (the release's dtypes)."""
    n = len(points)
    columns = {
        "x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "intensity": points[:, 3],
        "laser_number": rng.integers(0, 64, n), "offset_ns": rng.integers(0, 100_000_000, n),
    }  # fmt: skip
    _write(log_dir / "sensors" / "lidar" / f"{timestamp_ns}.feather", columns, SWEEP_COLUMNS)


def write_poses(log_dir: Path, stamps: list[int], yaws: list[float], translations: np.ndarray) -> None:
    q = yaw_quaternion(np.asarray(yaws))
    t = np.asarray(translations, np.float64)
    columns = {"timestamp_ns": np.asarray(stamps), "qw": q[:, 0], "qx": q[:, 1], "qy": q[:, 2], "qz": q[:, 3],
               "tx_m": t[:, 0], "ty_m": t[:, 1], "tz_m": t[:, 2]}  # fmt: skip
    _write(log_dir / "city_SE3_egovehicle.feather", columns, POSE_COLUMNS)


def write_annotations(log_dir: Path, cuboids: list[Cuboid]) -> None:
    boxes = np.asarray([c.box for c in cuboids], np.float64).reshape(-1, 7)
    q = yaw_quaternion(boxes[:, 6])
    columns = {
        "timestamp_ns": np.asarray([c.timestamp_ns for c in cuboids], np.int64),
        "track_uuid": np.asarray([c.track_uuid for c in cuboids], object),
        "category": np.asarray([c.category for c in cuboids], object),
        "length_m": boxes[:, 3], "width_m": boxes[:, 4], "height_m": boxes[:, 5],
        "qw": q[:, 0], "qx": q[:, 1], "qy": q[:, 2], "qz": q[:, 3],
        "tx_m": boxes[:, 0], "ty_m": boxes[:, 1], "tz_m": boxes[:, 2],
        "num_interior_pts": np.asarray([c.num_interior_pts for c in cuboids], np.int64),
    }  # fmt: skip
    _write(log_dir / "annotations.feather", columns, ANNOTATION_COLUMNS)


def write_calibration(log_dir: Path) -> None:
    """Both LiDARs on the roof, unrotated (``egovehicle_SE3_sensor.feather``)."""
    names = ["up_lidar", "down_lidar"]
    columns = {"sensor_name": np.asarray(names, object), "qw": np.ones(2), "qx": np.zeros(2), "qy": np.zeros(2),
               "qz": np.zeros(2), "tx_m": np.full(2, 1.35), "ty_m": np.zeros(2), "tz_m": np.array([1.9, 1.6])}  # fmt: skip
    dtypes = {
        "sensor_name": "str",
        **{k: "float64" for k in ("qw", "qx", "qy", "qz", "tx_m", "ty_m", "tz_m")},
    }
    _write(log_dir / "calibration" / "egovehicle_SE3_sensor.feather", columns, dtypes)


def write_map(log_dir: Path, drivable: list[tuple[float, float]], city: str = "PIT") -> None:
    """A map folder whose one drivable area is the polygon ``drivable`` (city x, y); ground at z = 0 over
    the polygon's bounds (a 1 m raster: the release uses 0.3 m)."""
    folder = log_dir / "map"
    folder.mkdir(parents=True, exist_ok=True)
    area = {"area_boundary": [{"x": float(x), "y": float(y), "z": 0.0} for x, y in drivable], "id": 1}
    vector = {"drivable_areas": {"1": area}, "lane_segments": {}, "pedestrian_crossings": {}}
    (folder / f"log_map_archive_{log_dir.name}.json").write_text(json.dumps(vector))
    xy = np.asarray(drivable, np.float64)
    lo, hi = np.floor(xy.min(0)) - 10, np.ceil(xy.max(0)) + 10
    shape = (int(hi[1] - lo[1]) + 1, int(hi[0] - lo[0]) + 1)
    np.save(folder / f"{log_dir.name}_ground_height_surface____{city}.npy", np.zeros(shape, np.float16))
    sim2 = {"R": [1.0, 0.0, 0.0, 1.0], "t": [float(-lo[0]), float(-lo[1])], "s": 1.0}
    (folder / f"{log_dir.name}___img_Sim2_city.json").write_text(json.dumps(sim2))
