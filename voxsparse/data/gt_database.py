"""The GT database: the points inside every labelled box of a prepared split, for GT sampling.

:func:`voxsparse.data.prepared.prepare` builds it in two steps. Each frame's worker writes a part,
``gt_database/parts/<frame_id>.npz``, with the points inside each of the frame's boxes; once every
frame is done, :func:`merge_parts` concatenates the parts into two files that training reads::

    gt_database/points.npy    (P, C) float32: every object's points, object after object, in the
                              source frame's LiDAR coordinates (memory-mapped by GT sampling)
    gt_database/objects.npz   per object (M of them): label, box, num_points, difficulty,
                              [keypoints, keypoint_visibility], frame_index, and offsets (M + 1,)
                              into points.npy; plus class_names and point_features

Objects with no point inside their box are left out. Points lie in the LiDAR frame of the frame
they were cut from, so an object is pasted back where it was seen, at the range and viewing angle
that produced its point pattern.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxsparse.geometry import points_in_boxes
from voxsparse.utils.io import atomic_write, read_arrays, write_arrays

__all__ = ["GTDatabase", "GTPart", "cut_objects", "merge_parts", "read_part", "write_part"]

_PART_KEYS = ("points", "counts", "boxes", "labels", "difficulty")


@dataclass
class GTPart:
    """The objects of one frame.

    Attributes:
        points: (P, C) float32 points inside the boxes, box after box (a point inside two boxes
            appears under both).
        counts: (K,) int64 points of each box; ``counts.sum() == P``.
        boxes: (K, 7 | 9) float32 boxes of the frame.
        labels, difficulty: (K,) int64.
        keypoints: (K, 14, 3) float32 or None.
        keypoint_visibility: (K, 14) bool or None.
    """

    points: np.ndarray
    counts: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    difficulty: np.ndarray
    keypoints: np.ndarray | None = None
    keypoint_visibility: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = len(self.boxes)
        if self.points.ndim != 2 or self.points.dtype != np.float32:
            raise ValueError(
                f"GTPart.points: expected (P, C) float32, got {self.points.dtype} {self.points.shape}"
            )
        if self.counts.shape != (k,) or int(self.counts.sum()) != len(self.points):
            raise ValueError(
                f"GTPart.counts: expected ({k},) summing to the {len(self.points)} points, got {self.counts.shape} "
                f"summing to {int(self.counts.sum())}"
            )
        for name in ("labels", "difficulty"):
            if getattr(self, name).shape != (k,):
                raise ValueError(f"GTPart.{name}: expected shape ({k},), got {getattr(self, name).shape}")


def cut_objects(frame) -> GTPart:
    """The points inside each box of ``frame`` (a ``FrameLike`` with float32 points (N, C))."""
    boxes = np.asarray(frame.boxes, dtype=np.float32)
    points = np.asarray(frame.points, dtype=np.float32)
    inside = points_in_boxes(torch.from_numpy(points), torch.from_numpy(boxes)).numpy()  # (N, K)
    # Box-major order: column k's points, then column k + 1's.
    box_index, point_index = np.nonzero(inside.T)
    return GTPart(
        points=points[point_index],
        counts=np.bincount(box_index, minlength=len(boxes)).astype(np.int64),
        boxes=boxes,
        labels=np.asarray(frame.labels, dtype=np.int64),
        difficulty=np.asarray(frame.difficulty, dtype=np.int64),
        keypoints=None if frame.keypoints is None else np.asarray(frame.keypoints, dtype=np.float32),
        keypoint_visibility=(
            None if frame.keypoint_visibility is None else np.asarray(frame.keypoint_visibility, dtype=bool)
        ),
    )


def write_part(path: str | os.PathLike, part: GTPart) -> None:
    arrays = {k: getattr(part, k) for k in _PART_KEYS}
    if part.keypoints is not None:
        arrays["keypoints"] = part.keypoints
        arrays["keypoint_visibility"] = part.keypoint_visibility
    write_arrays(path, arrays)


def read_part(path: str | os.PathLike) -> GTPart:
    """Read and check a part file.

    Raises:
        ValueError: naming the file, when it is missing, truncated, corrupt or inconsistent.
    """
    return read_arrays(
        path,
        "GT database part",
        lambda arrays: GTPart(
            **{k: arrays[k] for k in _PART_KEYS},
            keypoints=arrays.get("keypoints"),
            keypoint_visibility=arrays.get("keypoint_visibility"),
        ),
    )


def merge_parts(
    directory: str | os.PathLike,
    frame_ids: Sequence[str],
    class_names: Sequence[str],
    point_features: Sequence[str],
) -> int:
    """Concatenate ``directory/parts/<frame_id>.npz`` into ``points.npy`` and ``objects.npz``.

    Both files are written atomically; ``objects.npz`` (which names the points' layout) last.

    Returns:
        The number of objects in the database.
    """
    directory = Path(directory)
    num_columns = len(point_features)
    counts, boxes, labels, difficulty, frame_index = [], [], [], [], []
    keypoints: list[tuple[np.ndarray, np.ndarray] | None] = []
    for i, frame_id in enumerate(frame_ids):
        # Only the small arrays are read here; points are streamed below.
        with np.load(directory / "parts" / f"{frame_id}.npz", allow_pickle=False) as z:
            keep = z["counts"] > 0
            counts.append(z["counts"][keep])
            boxes.append(z["boxes"][keep])
            labels.append(z["labels"][keep])
            difficulty.append(z["difficulty"][keep])
            frame_index.append(np.full(int(keep.sum()), i, dtype=np.int64))
            has = "keypoints" in z.files
            keypoints.append((z["keypoints"][keep], z["keypoint_visibility"][keep]) if has else None)
    counts_all = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    total = int(counts_all.sum())

    def write_points(f) -> None:
        header = {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": (total, num_columns)}
        np.lib.format.write_array_header_2_0(f, header)
        for frame_id in frame_ids:
            with np.load(directory / "parts" / f"{frame_id}.npz", allow_pickle=False) as z:
                f.write(np.ascontiguousarray(z["points"], dtype="<f4").tobytes())

    atomic_write(directory / "points.npy", write_points)
    box_width = boxes[0].shape[1] if boxes else 9
    objects = {
        "offsets": np.concatenate([[0], np.cumsum(counts_all)]).astype(np.int64),
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, box_width), np.float32),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "difficulty": np.concatenate(difficulty) if difficulty else np.zeros(0, np.int64),
        "frame_index": np.concatenate(frame_index) if frame_index else np.zeros(0, np.int64),
        "class_names": np.asarray(list(class_names), dtype=str),
        "point_features": np.asarray(list(point_features), dtype=str),
    }
    if any(k is not None for k in keypoints):
        # Frames without keypoints contribute objects whose keypoints are all absent.
        shape = next(k for k in keypoints if k is not None)[0].shape[1:]
        filled = [
            k
            if k is not None
            else (np.zeros((len(c), *shape), np.float32), np.zeros((len(c), shape[0]), bool))
            for k, c in zip(keypoints, counts)
        ]
        objects["keypoints"] = np.concatenate([k for k, _ in filled])
        objects["keypoint_visibility"] = np.concatenate([v for _, v in filled])
    write_arrays(directory / "objects.npz", objects)
    return len(counts_all)


@dataclass
class GTDatabase:
    """A split's GT database (see the module docstring); points stay on disk until asked for.

    Attributes:
        directory: the ``gt_database`` folder.
        class_names: label ``i`` is ``class_names[i]``.
        point_features: names of the C point columns.
        boxes: (M, 7 | 9) float32; labels, difficulty, frame_index: (M,) int64.
        num_points: (M,) int64 points of each object in the database.
        offsets: (M + 1,) int64; object ``i`` owns rows ``offsets[i]:offsets[i + 1]`` of points.npy.
        keypoints: (M, 14, 3) float32 or None; keypoint_visibility: (M, 14) bool or None.
    """

    directory: Path
    class_names: tuple[str, ...]
    point_features: tuple[str, ...]
    boxes: np.ndarray
    labels: np.ndarray
    difficulty: np.ndarray
    frame_index: np.ndarray
    offsets: np.ndarray
    keypoints: np.ndarray | None = None
    keypoint_visibility: np.ndarray | None = None

    def __post_init__(self) -> None:
        self._points: np.ndarray | None = None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GTDatabase:
        """Read ``directory/objects.npz``; ``points.npy`` is memory-mapped on first use.

        Raises:
            FileNotFoundError: no database there (the split was prepared without one).
            ValueError: an unreadable or inconsistent database, naming the file.
        """
        directory = Path(directory)
        path = directory / "objects.npz"
        if not path.is_file():
            raise FileNotFoundError(
                f"GT database {path}: not found; build it with tools/prepare_data.py (the training split gets one "
                f"by default, see --gt-database)"
            )
        try:
            with np.load(path, allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            db = cls(
                directory=directory,
                class_names=tuple(str(n) for n in a["class_names"]),
                point_features=tuple(str(n) for n in a["point_features"]),
                boxes=a["boxes"],
                labels=a["labels"],
                difficulty=a["difficulty"],
                frame_index=a["frame_index"],
                offsets=a["offsets"],
                keypoints=a.get("keypoints"),
                keypoint_visibility=a.get("keypoint_visibility"),
            )
        except Exception as exc:
            raise ValueError(f"GT database {path}: unreadable ({type(exc).__name__}: {exc})") from exc
        m = len(db.boxes)
        if db.offsets.shape != (m + 1,) or db.labels.shape != (m,) or db.difficulty.shape != (m,):
            raise ValueError(f"GT database {path}: offsets/labels/difficulty do not match its {m} boxes")
        return db

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def num_points(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def points(self) -> np.ndarray:
        """(P, C) float32, memory-mapped."""
        if self._points is None:
            path = self.directory / "points.npy"
            points = np.load(path, mmap_mode="r", allow_pickle=False)
            if points.shape != (int(self.offsets[-1]), len(self.point_features)):
                raise ValueError(
                    f"GT database {path}: shape {points.shape}, expected ({int(self.offsets[-1])}, "
                    f"{len(self.point_features)}) from objects.npz"
                )
            self._points = points
        return self._points

    def object_points(self, index: int) -> np.ndarray:
        """(n, C) float32 points of object ``index`` (a copy)."""
        return np.array(self.points[self.offsets[index] : self.offsets[index + 1]])

    def __getstate__(self) -> dict:
        # A memory map would be pickled as a full copy of the array: worker processes reopen it.
        state = dict(self.__dict__)
        state["_points"] = None
        return state
