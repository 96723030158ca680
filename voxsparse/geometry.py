"""Geometry every layer shares: rigid transforms, heading wrap and which points lie in which boxes.

This module imports numpy and torch only, nothing of voxsparse, so data readers and writers,
models, metrics and viewers all use one definition of each (``docs/ARCHITECTURE.md``, "Layers").

Conventions as in the rest of the package: metres and radians, boxes are rows
``(x, y, z, dx, dy, dz, heading[, ...])`` with ``(x, y, z)`` the centre, ``dx`` the extent along the
heading and the heading counter-clockwise from +x; quaternions are ``(w, x, y, z)`` as nuScenes
stores them.

Two heading wraps live here because they round differently and each has callers whose numbers
must not move:

* :func:`wrap_angle`, ``(a + pi) mod 2 pi - pi``: the labels of the synthetic world and of the
  nuScenes loader, and tracking in the global frame;
* :func:`limit_period`, ``a - floor(a / p + offset) p``: box augmentation and the heading accuracy
  of the detection metrics. It returns an angle already in range unchanged, bit for bit.

Both give ``[-pi, pi)`` by default, but for the same input they often differ in the last bits (by
up to about ``1e-16 * (|a| + pi)`` radians), so neither stands in for the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "RigidTransform",
    "check_boxes",
    "limit_period",
    "points_in_boxes",
    "quaternion_multiply",
    "wrap_angle",
    "yaw_quaternion",
]

_TWO_PI = 2.0 * math.pi

Angle = TypeVar("Angle", np.ndarray, torch.Tensor)
Array = TypeVar("Array", np.ndarray, torch.Tensor)


# --- heading wrap ------------------------------------------------------------------------------


def wrap_angle(angle: np.ndarray | torch.Tensor | float) -> np.ndarray | torch.Tensor:
    """Wrap radians to ``[-pi, pi)`` as ``(angle + pi) mod 2 pi - pi``.

    Args:
        angle: a tensor (kept a tensor, same dtype and device), an array or a float.

    Returns:
        A tensor for a tensor, else a numpy array or numpy scalar. ``mod`` is the floored modulo
        (numpy's ``%``; ``torch.remainder`` for tensors).
    """
    if not isinstance(angle, torch.Tensor):
        angle = np.asarray(angle)
    return (angle + math.pi) % _TWO_PI - math.pi


def limit_period(angle: Angle, offset: float = 0.5, period: float = _TWO_PI) -> Angle:
    """Wrap angles into ``[-offset * period, (1 - offset) * period)``, as
    ``angle - floor(angle / period + offset) * period``.

    Args:
        angle: tensor or numpy array of any shape, radians.
        offset: 0.5 gives ``[-period/2, period/2)``, 0 gives ``[0, period)``.
        period: wrap period, radians (``pi`` for heading-agnostic axes).

    Returns:
        The same type, shape and dtype.
    """
    floor = torch.floor if isinstance(angle, torch.Tensor) else np.floor
    return angle - floor(angle / period + offset) * period


# --- rigid transforms --------------------------------------------------------------------------


def quaternion_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of (..., 4) quaternions ``(w, x, y, z)``, broadcast over leading dims."""
    aw, ax, ay, az = np.moveaxis(a, -1, 0)
    bw, bx, by, bz = np.moveaxis(b, -1, 0)
    return np.stack(
        [
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ],
        axis=-1,
    )


def yaw_quaternion(yaw: np.ndarray | float) -> np.ndarray:
    """(..., 4) quaternions of rotations by ``yaw`` (radians) about +z."""
    half = 0.5 * np.asarray(yaw, dtype=np.float64)
    zeros = np.zeros_like(half)
    return np.stack([np.cos(half), zeros, zeros, np.sin(half)], axis=-1)


@dataclass(frozen=True)
class RigidTransform:
    """A rotation then a translation: ``p_out = R @ p_in + translation``.

    Attributes:
        rotation: unit quaternion ``(w, x, y, z)`` (nuScenes' order), normalised on construction.
        translation: (3,) metres.
    """

    rotation: tuple[float, float, float, float]
    translation: tuple[float, float, float]

    def __post_init__(self) -> None:
        q = np.asarray(self.rotation, dtype=np.float64)
        t = np.asarray(self.translation, dtype=np.float64)
        if q.shape != (4,) or not np.isfinite(q).all() or abs(np.linalg.norm(q) - 1.0) > 1e-3:
            raise ValueError(
                f"RigidTransform.rotation: expected a unit quaternion (w, x, y, z), got {self.rotation}"
            )
        if t.shape != (3,) or not np.isfinite(t).all():
            raise ValueError(f"RigidTransform.translation: expected 3 finite floats, got {self.translation}")
        object.__setattr__(self, "rotation", tuple(float(v) for v in q / np.linalg.norm(q)))
        object.__setattr__(self, "translation", tuple(float(v) for v in t))

    @classmethod
    def from_yaw(cls, yaw: float, translation: Sequence[float] = (0.0, 0.0, 0.0)) -> RigidTransform:
        """A rotation by ``yaw`` radians about +z, then ``translation``."""
        return cls(tuple(yaw_quaternion(yaw)), tuple(translation))

    def matrix(self) -> np.ndarray:
        """(3, 3) float64 rotation matrix."""
        w, x, y, z = self.rotation
        return np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
            ]
        )

    def apply(self, points: np.ndarray) -> np.ndarray:
        """Transform (N, 3) points; returns (N, 3) float64."""
        return np.asarray(points, dtype=np.float64) @ self.matrix().T + np.asarray(self.translation)

    def __matmul__(self, other: RigidTransform) -> RigidTransform:
        """``(self @ other).apply(p) == self.apply(other.apply(p))``."""
        rotation = quaternion_multiply(np.asarray(self.rotation), np.asarray(other.rotation))
        translation = self.matrix() @ np.asarray(other.translation) + np.asarray(self.translation)
        return RigidTransform(tuple(rotation), tuple(translation))

    def inverse(self) -> RigidTransform:
        w, x, y, z = self.rotation
        return RigidTransform((w, -x, -y, -z), tuple(-(self.matrix().T @ np.asarray(self.translation))))


# --- points in boxes ---------------------------------------------------------------------------


def check_boxes(name: str, boxes: torch.Tensor | np.ndarray) -> None:
    """Raise naming ``name`` unless ``boxes`` is a floating (N, >=7) tensor or array."""
    if boxes.ndim != 2 or boxes.shape[1] < 7:
        raise ValueError(f"{name}: expected shape (N, >=7), got {tuple(boxes.shape)}")
    floating = boxes.is_floating_point() if isinstance(boxes, torch.Tensor) else np.issubdtype(boxes.dtype, np.floating)
    if not floating:
        raise TypeError(f"{name}: expected a floating dtype, got {boxes.dtype}")


class _Torch:
    """What :func:`points_in_boxes` needs of an array library, for torch tensors (any device)."""

    lib = torch
    float64 = torch.float64
    promote = staticmethod(torch.promote_types)
    eps = staticmethod(lambda dtype: torch.finfo(dtype).eps)
    cast = staticmethod(lambda a, dtype: a.to(dtype))
    take = staticmethod(lambda a, index: a.index_select(0, index))

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def zeros(self, shape: tuple[int, int]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.bool, device=self.device)

    def arange(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop, device=self.device)


class _Numpy:
    """The same for numpy arrays."""

    lib = np
    float64 = np.float64
    promote = staticmethod(np.result_type)
    eps = staticmethod(lambda dtype: np.finfo(dtype).eps)
    cast = staticmethod(lambda a, dtype: a.astype(dtype, copy=False))
    take = staticmethod(lambda a, index: a.take(index, axis=0))
    zeros = staticmethod(lambda shape: np.zeros(shape, dtype=bool))
    arange = staticmethod(np.arange)


def points_in_boxes(points: Array, boxes: Array, chunk_size: int = 1 << 18) -> Array:
    """Which points lie inside which boxes.

    Boxes are closed: a point on a face counts as inside. With ``d`` the offset of a point from a
    box centre, ``u = d_x cos + d_y sin`` and ``v = -d_x sin + d_y cos`` (the offset in the box
    frame), a point is inside when ``|u| <= dx/2``, ``|v| <= dy/2`` and ``|d_z| <= dz/2``, computed
    in the promoted dtype of ``points`` and ``boxes`` (pass float64 for float64 arithmetic) with the
    library of the inputs: torch tensors (on one device) or numpy arrays.

    Only (point, box) pairs whose x lies within the box's circumradius of its centre (plus a margin
    above any rounding of the test) are tested, found on the points sorted by x; the answer is the
    one testing every pair would give.

    Args:
        points: (P, >=3) points, (x, y, z) in metres in the first three columns.
        boxes: (N, >=7) boxes, metres / radians; a tensor when ``points`` is one, else an array.
        chunk_size: candidate pairs tested at once; bounds the buffers to a few times
            ``chunk_size`` elements beyond the (P, N) answer.

    Returns:
        (P, N) bool tensor or array, ``[p, n]`` true when point ``p`` is inside box ``n``.
        ``mask.any(1)`` flags points in any box, ``mask.sum(0)`` counts the points of each box;
        ``torch.where(mask.any(1), mask.byte().argmax(1), -1)`` one box index per point (the first
        where boxes overlap, -1 for none).
    """
    check_boxes("boxes", boxes)
    if points.ndim != 2 or points.shape[1] < 3:
        raise ValueError(f"points: expected shape (P, >=3), got {tuple(points.shape)}")
    if isinstance(points, torch.Tensor) != isinstance(boxes, torch.Tensor):
        raise TypeError(
            f"points and boxes: expected two tensors or two arrays, got {type(points).__name__} and "
            f"{type(boxes).__name__}"
        )
    ops = _Torch(points.device) if isinstance(points, torch.Tensor) else _Numpy
    lib = ops.lib
    dtype = ops.promote(points.dtype, boxes.dtype)
    boxes = ops.cast(boxes, dtype)
    n = boxes.shape[0]
    out = ops.zeros((points.shape[0], n))
    if points.shape[0] == 0 or n == 0:
        return out
    cos, sin = lib.cos(boxes[:, 6]), lib.sin(boxes[:, 6])
    half = 0.5 * boxes[:, 3:6]
    # Per box: centre, cos, sin, half extents.
    table = lib.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2], cos, sin, half[:, 0], half[:, 1], half[:, 2]], 1)
    xyz = ops.cast(points[:, :3], dtype)

    # Candidates, in float64: an inside point lies within the circumradius r of the footprint in x.
    # Rounding in the test lets |d_x| exceed r by a few units in the last place of ``dtype``; the
    # margin is far above that, and above float64 rounding of the centre.
    x = ops.cast(xyz[:, 0], ops.float64)
    order = lib.argsort(x)
    x_sorted = ops.take(x, order)
    centre, dx, dy = (ops.cast(boxes[:, c], ops.float64) for c in (0, 3, 4))
    reach = 0.5 * lib.sqrt(dx * dx + dy * dy) * (1.0 + 64.0 * ops.eps(dtype)) + 1e-9 * (abs(centre) + 1.0)
    lo = lib.searchsorted(x_sorted, centre - reach, side="left")
    hi = lib.searchsorted(x_sorted, centre + reach, side="right")
    counts = (hi - lo) * (hi > lo)
    ends = lib.cumsum(counts, 0)
    shift = lo - (ends - counts)  # pair j of box k is the point at sorted position j + shift[k]
    flat = out.reshape(-1)
    total = int(ends[-1])
    for start in range(0, total, chunk_size):
        pair = ops.arange(start, min(start + chunk_size, total))
        k = lib.searchsorted(ends, pair, side="right")
        i = ops.take(order, pair + ops.take(shift, k))
        q, t = ops.take(xyz, i), ops.take(table, k)
        dx_, dy_, dz_ = q[:, 0] - t[:, 0], q[:, 1] - t[:, 1], q[:, 2] - t[:, 2]
        # The offset in the box frame (rotation by -heading).
        u = dx_ * t[:, 3] + dy_ * t[:, 4]
        v = -dx_ * t[:, 4] + dy_ * t[:, 3]
        flat[i * n + k] = (abs(u) <= t[:, 5]) & (abs(v) <= t[:, 6]) & (abs(dz_) <= t[:, 7])
    return out
