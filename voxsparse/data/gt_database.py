"""The GT database: the points inside every labelled box of a prepared split, for GT sampling.

:func:`voxsparse.data.prepared.prepare` builds it in two steps. Each frame's worker writes a part,
``gt_database/parts/<frame_id>.npz``, with the points inside each of the frame's boxes (stored like
the frame's points, :mod:`voxsparse.data.point_storage`); once every frame is done,
:func:`merge_parts` concatenates the parts into two files that training reads::

    gt_database/points.npy    (P, C) float32: every object's points, object after object, in the
                              source frame's LiDAR coordinates (memory-mapped by GT sampling)
    gt_database/objects.npz   per object (M of them): label, box, num_points, difficulty,
                              [keypoints, keypoint_visibility], frame_index, and offsets (M + 1,)
                              into points.npy; plus class_names and point_features

Objects with no point inside their box are left out. Points lie in the LiDAR frame of the frame
they were cut from, so an object is pasted back where it was seen, at the range and viewing angle
that produced its point pattern.

Bounds: a part holds one frame's objects; the merge streams the parts twice (object fields into
memory-mapped scratch files, then the points) and holds one part at a time, so its memory does not
grow with the split (a Waymo training split has millions of objects). On disk the database takes
the points inside boxes twice (compressed parts, float32 ``points.npy``): for Waymo about 1/10 of
the prepared frames' points.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voxsparse.data.point_storage import decode_points, encode_points, write_npz
from voxsparse.geometry import points_in_boxes
from voxsparse.utils.io import atomic_write, read_arrays, write_arrays

__all__ = ["GTDatabase", "GTPart", "cut_objects", "merge_parts", "read_part", "write_part"]

_PART_KEYS = ("counts", "boxes", "labels", "difficulty")


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


def write_part(
    path: str | os.PathLike, part: GTPart, half: Sequence[bool] | None = None, steps: Sequence[float] | None = None
) -> None:
    """Write ``part``; ``half`` (C,) marks the point columns stored as float16 (None: none), ``steps``
    (C,) the quantization steps (None or 0: not quantized; :func:`~voxsparse.data.point_storage.encode_points`)."""
    arrays = {k: getattr(part, k) for k in _PART_KEYS}
    arrays.update(encode_points(part.points, [False] * part.points.shape[1] if half is None else half, steps))
    if part.keypoints is not None:
        arrays["keypoints"] = part.keypoints
        arrays["keypoint_visibility"] = part.keypoint_visibility
    write_npz(path, arrays)


def read_part(path: str | os.PathLike) -> GTPart:
    """Read and check a part file.

    Raises:
        ValueError: naming the file, when it is missing, truncated, corrupt or inconsistent.
    """
    return read_arrays(
        path,
        "GT database part",
        lambda arrays: GTPart(
            points=decode_points(arrays),
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
    """Concatenate ``directory/parts/<frame_id>.npz`` into ``points.npy`` and ``objects.npz``, one
    part in memory at a time (module docstring).

    Both files are written atomically; ``objects.npz`` (which names the points' layout) last.

    Returns:
        The number of objects in the database.
    """
    directory = Path(directory)
    parts = [directory / "parts" / f"{frame_id}.npz" for frame_id in frame_ids]
    # Pass 1: the object counts and shapes, from the small members only.
    kept, box_width, keypoint_shape = [], None, None
    for path in parts:
        with np.load(path, allow_pickle=False) as z:
            kept.append(int((z["counts"] > 0).sum()))
            box_width = box_width or z["boxes"].shape[1]
            if keypoint_shape is None and "keypoints" in z.files:
                keypoint_shape = z["keypoints"].shape[1:]
    m = sum(kept)
    fields = {
        "counts": ((m,), np.int64),
        "boxes": ((m, box_width or 9), np.float32),
        "labels": ((m,), np.int64),
        "difficulty": ((m,), np.int64),
        "frame_index": ((m,), np.int64),
    }
    if keypoint_shape is not None:
        # Frames without keypoints contribute objects whose keypoints are all absent (zeros).
        fields["keypoints"] = ((m, *keypoint_shape), np.float32)
        fields["keypoint_visibility"] = ((m, keypoint_shape[0]), np.bool_)

    scratch = Path(tempfile.mkdtemp(dir=directory, prefix=".merge-"))
    try:
        out = {
            name: np.lib.format.open_memmap(scratch / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
            for name, (shape, dtype) in fields.items()
        }
        start = 0
        for i, path in enumerate(parts):
            stop = start + kept[i]
            with np.load(path, allow_pickle=False) as z:
                keep = z["counts"] > 0
                for name in ("counts", "boxes", "labels", "difficulty"):
                    out[name][start:stop] = z[name][keep]
                out["frame_index"][start:stop] = i
                if keypoint_shape is not None and "keypoints" in z.files:
                    out["keypoints"][start:stop] = z["keypoints"][keep]
                    out["keypoint_visibility"][start:stop] = z["keypoint_visibility"][keep]
            start = stop
        counts = out.pop("counts")
        total = int(counts.sum())

        # Pass 2: the points, part after part.
        def write_points(f) -> None:
            header = {"descr": np.dtype("<f4").str, "fortran_order": False, "shape": (total, len(point_features))}
            np.lib.format.write_array_header_2_0(f, header)
            for path in parts:
                with np.load(path, allow_pickle=False) as z:
                    f.write(np.ascontiguousarray(decode_points(z), dtype="<f4").tobytes())

        atomic_write(directory / "points.npy", write_points)
        offsets = np.lib.format.open_memmap(scratch / "offsets.npy", mode="w+", dtype=np.int64, shape=(m + 1,))
        offsets[0] = 0
        np.cumsum(counts, out=offsets[1:])
        write_arrays(
            directory / "objects.npz",
            {
                "offsets": offsets,
                **out,
                "class_names": np.asarray(list(class_names), dtype=str),
                "point_features": np.asarray(list(point_features), dtype=str),
            },
        )
        del out, counts, offsets
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return m


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
