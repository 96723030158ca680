"""Read point files into (N, 4) float32 ``x, y, z, intensity`` arrays.

Formats: ``.bin`` (raw float32 records, KITTI-style ``x y z intensity``; ``columns`` sets the record
width, e.g. 5 for nuScenes ``.pcd.bin``), ``.npy`` ((N, >=3) array), ``.pcd`` and ``.ply`` (through
Open3D's tensor reader, which keeps an ``intensity`` attribute; without one the intensity is 0).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["POINT_FILE_SUFFIXES", "load_points"]

POINT_FILE_SUFFIXES = (".bin", ".npy", ".pcd", ".ply")


def load_points(path: str | os.PathLike, columns: int = 4) -> np.ndarray:
    """Points of a file as (N, 4) float32 (x, y, z, intensity).

    Args:
        columns: float32 values per point in a ``.bin`` file; the first four are kept.

    Raises:
        FileNotFoundError, ValueError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"point file {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".bin":
        if columns < 3:
            raise ValueError(f"point file {path}: columns must be >= 3, got {columns}")
        raw = np.fromfile(path, dtype=np.float32)
        if raw.size % columns:
            raise ValueError(
                f"point file {path}: {raw.size} float32 values do not split into records of {columns} "
                f"(set columns= to the record width, e.g. 5 for nuScenes)"
            )
        points = raw.reshape(-1, columns)
    elif suffix == ".npy":
        points = np.load(path, allow_pickle=False)
        if points.ndim != 2 or points.shape[1] < 3:
            raise ValueError(f"point file {path}: expected an (N, >=3) array, got shape {points.shape}")
    elif suffix in (".pcd", ".ply"):
        points = _read_open3d(path)
    else:
        raise ValueError(
            f"point file {path}: unknown suffix {suffix!r}; expected one of {POINT_FILE_SUFFIXES}"
        )
    points = np.asarray(points, dtype=np.float32)
    if points.shape[1] == 3:
        points = np.concatenate([points, np.zeros((len(points), 1), np.float32)], 1)
    points = points[:, :4]
    finite = np.isfinite(points).all(1)
    return np.ascontiguousarray(points[finite])


def _read_open3d(path: Path) -> np.ndarray:
    try:
        import open3d as o3d
    except ImportError as exc:
        raise ValueError(
            f"point file {path}: reading {path.suffix} needs open3d (pip install open3d)"
        ) from exc
    cloud = o3d.t.io.read_point_cloud(str(path))
    if "positions" not in cloud.point or cloud.point.positions.shape[0] == 0:
        raise ValueError(f"point file {path}: no points could be read")
    xyz = cloud.point.positions.numpy().astype(np.float32)
    if "intensity" in cloud.point:
        intensity = cloud.point.intensity.numpy().astype(np.float32).reshape(len(xyz), -1)[:, :1]
    elif "colors" in cloud.point:  # a coloured cloud: use grey level as a stand-in
        intensity = cloud.point.colors.numpy().astype(np.float32).mean(1, keepdims=True)
    else:
        intensity = np.zeros((len(xyz), 1), np.float32)
    return np.concatenate([xyz, intensity], 1)
