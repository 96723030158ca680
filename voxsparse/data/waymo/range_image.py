"""Waymo range images to points in the vehicle frame (numpy; no TensorFlow, no protos).

The conversion is the official one (``frame_utils.convert_range_image_to_point_cloud`` and
``range_image_utils.extract_point_cloud_from_range_image`` of waymo-research/waymo-open-dataset,
read at commit 99a4cb3), rewritten vectorised over the pixels that hold a return:

* Row ``i`` of an ``(H, W)`` range image looks along inclination ``incl[i]``, where ``incl`` is the
  calibration's ``beam_inclinations`` reversed (stored lowest beam first; row 0 is the highest beam).
  Without explicit inclinations the beams are uniform: ``min + (j + 0.5) / H * (max - min)`` for
  ``j = 0 .. H-1``, reversed likewise.
* Column ``j`` looks along azimuth ``((W - j - 0.5) / W * 2 - 1) * pi - yaw``, ``yaw`` the extrinsic's
  yaw ``atan2(E[1, 0], E[0, 0])`` (the range image starts behind the sensor and turns clockwise).
* A pixel of range ``r`` is the sensor-frame point ``r * (cos(az) cos(incl), sin(az) cos(incl), sin(incl))``,
  moved to the vehicle frame by the extrinsic ``E`` (vehicle from sensor).
* TOP LiDAR only: each pixel carries the vehicle pose at the instant it was measured,
  ``(roll, pitch, yaw, x, y, z)`` (global from vehicle, rotation ``Rz(yaw) Ry(pitch) Rx(roll)``). The
  point goes to the global frame with that pose, then back into the vehicle frame of the frame
  pose, which removes the rolling-shutter smear of the ego motion during the sweep.

Unlike the official code, which computes in float32, this computes in float64: with global pose
translations of kilometres float32 loses ~1e-3 m. Only pixels with range > 0 are converted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "LASER_NAMES",
    "TOP_LASER",
    "column_azimuths",
    "range_image_to_points",
    "rotate_rpy",
    "rotation_from_rpy",
    "row_inclinations",
]

#: ``dataset_pb2.LaserName.Name`` values and names.
LASER_NAMES: dict[int, str] = {1: "TOP", 2: "FRONT", 3: "SIDE_LEFT", 4: "SIDE_RIGHT", 5: "REAR"}
#: The LiDAR whose range images carry per-pixel vehicle poses.
TOP_LASER = 1


def row_inclinations(
    beam_inclinations: Sequence[float],
    inclination_min: float,
    inclination_max: float,
    height: int,
    where: str = "laser calibration",
) -> np.ndarray:
    """(H,) float64 inclination (rad) of each range-image row, row 0 first (the highest beam).

    ``beam_inclinations`` as stored in ``LaserCalibration`` (lowest beam first); empty means uniform
    between ``inclination_min`` and ``inclination_max``.
    """
    if len(beam_inclinations):
        incl = np.asarray(beam_inclinations, dtype=np.float64)
        if incl.shape != (height,):
            raise ValueError(f"{where}: {incl.shape[0]} beam_inclinations for a range image of {height} rows")
    else:
        incl = inclination_min + (np.arange(height) + 0.5) / height * (inclination_max - inclination_min)
    return incl[::-1].copy()


def column_azimuths(width: int, extrinsic: np.ndarray) -> np.ndarray:
    """(W,) float64 azimuth (rad, sensor frame) of each range-image column; ``extrinsic`` (4, 4)."""
    yaw = math.atan2(extrinsic[1, 0], extrinsic[0, 0])
    return ((width - np.arange(width) - 0.5) / width * 2.0 - 1.0) * np.pi - yaw


def rotate_rpy(points: np.ndarray, rpy: np.ndarray) -> np.ndarray:
    """(N, 3) float64 ``Rz(yaw) @ Ry(pitch) @ Rx(roll) @ p`` for (N, 3) points and (N, 3) or (3,) ``(roll, pitch, yaw)``.

    Rotates axis by axis: cheaper per point than building (N, 3, 3) matrices.
    """
    rpy = np.asarray(rpy, dtype=np.float64)
    x, y, z = np.asarray(points, dtype=np.float64).T
    c, s = np.cos(rpy[..., 0]), np.sin(rpy[..., 0])
    y, z = c * y - s * z, s * y + c * z
    c, s = np.cos(rpy[..., 1]), np.sin(rpy[..., 1])
    x, z = c * x + s * z, c * z - s * x
    c, s = np.cos(rpy[..., 2]), np.sin(rpy[..., 2])
    x, y = c * x - s * y, s * x + c * y
    return np.stack([x, y, z], axis=-1)


def rotation_from_rpy(rpy: np.ndarray) -> np.ndarray:
    """(..., 3, 3) rotations ``Rz(yaw) @ Ry(pitch) @ Rx(roll)`` from (..., 3) ``(roll, pitch, yaw)`` rad."""
    rpy = np.asarray(rpy, dtype=np.float64)
    flat = np.repeat(rpy.reshape(-1, 1, 3), 3, axis=1).reshape(-1, 3)
    # Columns of the matrix are the rotated basis vectors.
    columns = rotate_rpy(np.tile(np.eye(3), (len(flat) // 3, 1)), flat)
    return columns.reshape(rpy.shape[:-1] + (3, 3)).swapaxes(-1, -2)


def range_image_to_points(
    range_m: np.ndarray,
    extrinsic: np.ndarray,
    inclinations: np.ndarray,
    pixel_pose: np.ndarray | None = None,
    frame_pose: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Points of the pixels with range > 0, in the vehicle frame.

    Args:
        range_m: (H, W) range (m); pixels <= 0 hold no return.
        extrinsic: (4, 4) vehicle-from-sensor transform.
        inclinations: (H,) row inclinations from :func:`row_inclinations`.
        pixel_pose: (H, W, 6) per-pixel ``(roll, pitch, yaw, x, y, z)`` global-from-vehicle poses, or
            None (points stay in the vehicle frame of the extrinsic).
        frame_pose: (4, 4) global-from-vehicle pose of the frame; required with ``pixel_pose``.

    Returns:
        points: (N, 3) float64 x, y, z in the vehicle frame (of ``frame_pose`` when ``pixel_pose`` is given).
        pixels: (N,) int64 row-major flat indices ``row * W + col`` of those pixels, ascending.
    """
    height, width = range_m.shape
    pixels = np.flatnonzero(range_m > 0)
    rows, cols = np.divmod(pixels, width)
    r = range_m.reshape(-1)[pixels].astype(np.float64)
    azimuth = column_azimuths(width, extrinsic)
    cos_incl = np.cos(inclinations)[rows]
    sensor = np.stack(
        [
            np.cos(azimuth)[cols] * cos_incl * r,
            np.sin(azimuth)[cols] * cos_incl * r,
            np.sin(inclinations)[rows] * r,
        ],
        axis=1,
    )
    points = sensor @ extrinsic[:3, :3].T + extrinsic[:3, 3]
    if pixel_pose is None:
        return points, pixels
    if frame_pose is None:
        raise ValueError("frame_pose is required with pixel_pose")
    pose = pixel_pose.reshape(height * width, 6)[pixels].astype(np.float64)
    world = rotate_rpy(points, pose[:, :3]) + pose[:, 3:]
    # Rigid inverse of the frame pose: vehicle = R^T (world - t).
    return (world - frame_pose[:3, 3]) @ frame_pose[:3, :3], pixels
