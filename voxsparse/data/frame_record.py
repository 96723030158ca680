"""The fields every dataset frame holds (``voxsparse.data.sample.FrameLike``), in one record with one
validator: the synthetic world's ``LidarFrame``, Waymo's ``WaymoFrame`` and the prepared layout's
``PreparedFrame`` extend it with their own fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

__all__ = ["FrameRecord"]


@dataclass(kw_only=True)
class FrameRecord:
    """Points and labelled boxes of one frame: numpy arrays in the sensor frame (x forward, y left,
    z up, metres). Validated on construction (dtype, then shape), naming the class and the field.

    Attributes:
        frame_id: unique name of the frame.
        points: (N, C) float32.
        boxes: (K, 7 | 9) float32 ``(x, y, z, dx, dy, dz, heading[, vx, vy])``.
        labels: (K,) int64 indices into the dataset's class names.
        num_points: (K,) int64 points in each box, as the dataset counts them.
        difficulty: (K,) int64, 1 = LEVEL_1, 2 = LEVEL_2.
        track_ids: (K,) int64 object ids, stable over a sequence.
        keypoints: (K, J, 3) float32 or None; keypoint_visibility: (K, J) bool or None.
    """

    frame_id: str
    points: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    num_points: np.ndarray
    difficulty: np.ndarray
    track_ids: np.ndarray
    keypoints: np.ndarray | None = None
    keypoint_visibility: np.ndarray | None = None

    #: Box widths a subclass accepts.
    BOX_COLUMNS: ClassVar[tuple[int, ...]] = (7, 9)
    #: Keypoints per box (None: any), and whether they must be given.
    NUM_KEYPOINTS: ClassVar[int | None] = None
    KEYPOINTS_REQUIRED: ClassVar[bool] = False

    def point_columns(self) -> int | None:
        """The number of point columns (None: any)."""
        return None

    def array_fields(self) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
        """Per array field: its shape (-1 = any), dtype, and whether it may be None."""
        k, c = len(self.boxes), self.point_columns()
        j = -1 if self.NUM_KEYPOINTS is None else self.NUM_KEYPOINTS
        optional = not self.KEYPOINTS_REQUIRED
        return {
            "points": ((-1, -1 if c is None else c), np.float32, False),
            "boxes": ((k, -1), np.float32, False),
            "labels": ((k,), np.int64, False),
            "num_points": ((k,), np.int64, False),
            "difficulty": ((k,), np.int64, False),
            "track_ids": ((k,), np.int64, False),
            "keypoints": ((k, j, 3), np.float32, optional),
            "keypoint_visibility": ((k, j), np.bool_, optional),
        }

    def where(self) -> str:
        """How errors name the frame."""
        return f"{type(self).__name__} {self.frame_id!r}"

    def __post_init__(self) -> None:
        where = self.where()
        for name, (shape, dtype, optional) in self.array_fields().items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                got = f"a {value.dtype} array" if isinstance(value, np.ndarray) else type(value).__name__
                raise TypeError(f"{where}: {name} must be a {np.dtype(dtype)} array, got {got}")
            if value.ndim != len(shape) or any(s not in (-1, v) for s, v in zip(shape, value.shape)):
                raise ValueError(f"{where}: {name} has shape {value.shape}, expected {shape} (-1 = any)")
        if self.boxes.shape[1] not in self.BOX_COLUMNS:
            widths = " or ".join(map(str, self.BOX_COLUMNS))
            raise ValueError(f"{where}: boxes need {widths} columns, got {self.boxes.shape[1]}")
