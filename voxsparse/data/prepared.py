"""The prepared on-disk layout shared by the real datasets: its writer (:func:`prepare`) and its
reader (:class:`PreparedDataset`).

One split of a prepared dataset, ``<root>/<split>/``::

    index.json                    the split's table of contents, written last (atomically): a split
                                  without it is incomplete and cannot be opened
    frames/<frame_id>.npz         one frame (deflated, :mod:`voxsparse.data.point_storage`):
                                  points (N, C) (each column float32, float16 or quantized to a
                                  fixed step, byte-shuffled), boxes (K, 7 | 9) float32, labels /
                                  num_points / difficulty / track_ids (K,) int64, optional
                                  keypoints (K, 14, 3) float32, keypoint_visibility (K, 14) bool,
                                  no_label_zone (N,) bool, and the frame id
    tasks/<task_key>.json         one finished unit of work (a nuScenes sample, a Waymo segment) and
                                  the frames it wrote: what makes a run resumable
    gt_database/                  optional, see :mod:`voxsparse.data.gt_database`

Every file is written with :func:`voxsparse.utils.io.atomic_write`, so a killed run leaves complete
files or none (plus temporary ``.<name>.*.tmp`` files, removed by the next run), and the same
inputs give the same bytes whichever executor (:mod:`voxsparse.data.executors`) ran the task. A
run first deletes ``index.json`` and the merged GT database, so an interrupted run never leaves a
stale index; a rerun skips every task whose record and files read back complete and were made with the same
settings (``config``), redoes the others, and writes the index again.

Points are in the LiDAR frame (x forward, y left, z up, metres); boxes are
``(x, y, z, dx, dy, dz, heading[, vx, vy])`` (see ``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from voxsparse.data.executors import Executor, LocalExecutor, peak_rss_bytes
from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.gt_database import cut_objects, merge_parts, read_part, write_part
from voxsparse.data.point_storage import POINT_KEYS, decode_points, encode_points, stored_points, write_npz
from voxsparse.utils.io import atomic_write, read_arrays
from voxsparse.utils.progress import progress as progress_bar

__all__ = [
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "FrameEntry",
    "PreparationSplit",
    "PrepareError",
    "PreparedDataset",
    "PreparedFrame",
    "PreparedIndex",
    "column_indices",
    "prepare",
    "read_frame",
    "read_index",
]

log = logging.getLogger(__name__)

#: Bump when the layout changes: splits of a version not in :data:`READ_VERSIONS` are refused, and
#: a rerun of ``tools/prepare_data.py`` re-prepares every task of an older version.
#: 2: frames deflated, points byte-shuffled with optional float16 columns (version 1 stored
#: uncompressed float32 points: 1.6 times the size of dense raw Waymo LiDAR data).
#: 3: optional quantized point columns (fixed step, delta-coded), e.g. Waymo's x, y, z to 2**-9 m.
FORMAT_VERSION = 3

#: The versions :func:`read_index` (and the frame reader) accept: version 2 files are a subset of 3's.
READ_VERSIONS = (2, 3)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_XYZ = ("x", "y", "z")


class PrepareError(RuntimeError):
    """A unit of work failed during :func:`prepare`; the message names the task and the cause."""


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} {name!r}: must match {_NAME.pattern} (it names a file)")
    return name


@dataclass(kw_only=True)
class PreparedFrame(FrameRecord):
    """One frame as stored: numpy arrays in the LiDAR frame; a
    :class:`~voxsparse.data.frame_record.FrameRecord` with named point columns.

    Attributes:
        frame_id: unique in its split; a file name (letters, digits, ``._-``).
        points: (N, C) float32, columns named by ``point_features`` (first x, y, z in metres).
        boxes: (K, 7 | 9) float32 ``(x, y, z, dx, dy, dz, heading[, vx, vy])``.
        labels: (K,) int64 indices into the split's class names.
        num_points: (K,) int64 LiDAR points in each box, as the dataset counts them.
        difficulty: (K,) int64, 1 = LEVEL_1, 2 = LEVEL_2.
        track_ids: (K,) int64 object ids, stable over a sequence.
        keypoints: (K, 14, 3) float32 or None; keypoint_visibility: (K, 14) bool or None.
        no_label_zone: (N,) bool, points in a zone left unlabelled (Waymo), or None.
        point_features: names of the C columns.
    """

    no_label_zone: np.ndarray | None = None
    point_features: tuple[str, ...] = field(default=_XYZ)

    def where(self) -> str:
        return f"frame {self.frame_id!r}"

    def point_columns(self) -> int | None:
        return len(self.point_features)

    def array_fields(self) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
        return {**super().array_fields(), "no_label_zone": ((len(self.points),), np.bool_, True)}

    def __post_init__(self) -> None:
        _check_name("frame id", self.frame_id)
        super().__post_init__()
        where, k = self.where(), len(self.boxes)
        if tuple(self.point_features[:3]) != _XYZ:
            raise ValueError(f"{where}: point_features must start with x, y, z, got {self.point_features}")
        if (self.keypoints is None) != (self.keypoint_visibility is None):
            raise ValueError(f"{where}: keypoints and keypoint_visibility must both be given or both be None")
        if self.keypoints is not None and self.keypoints.shape[1] != self.keypoint_visibility.shape[1]:
            raise ValueError(
                f"{where}: keypoints {self.keypoints.shape} and visibility "
                f"{self.keypoint_visibility.shape} disagree"
            )
        for name in ("points", "boxes"):
            bad = ~np.isfinite(getattr(self, name)).all(axis=1)
            if bad.any():
                raise ValueError(f"{where}: {int(bad.sum())} row(s) of {name} hold NaN or inf")
        if k and (self.boxes[:, 3:6] < 0).any():
            raise ValueError(f"{where}: box sizes (columns 3:6) must be non-negative")

    @classmethod
    def from_frame(cls, frame: Any, point_features: Sequence[str] | None = None) -> PreparedFrame:
        """Convert any ``FrameLike`` (casting dtypes). Column names come from ``frame.point_features``
        when it has them (all columns, or all but x, y, z), else from ``point_features``."""
        if isinstance(frame, PreparedFrame):
            return frame
        points = np.asarray(frame.points, dtype=np.float32)
        names = tuple(getattr(frame, "point_features", None) or point_features or ())
        if len(names) == points.shape[1] - 3 and names[:3] != _XYZ:
            names = _XYZ + names
        if len(names) != points.shape[1]:
            raise ValueError(
                f"frame {frame.frame_id!r}: {points.shape[1]} point columns but point_features {names}"
            )

        def opt(name: str, dtype) -> np.ndarray | None:
            value = getattr(frame, name, None)
            return None if value is None else np.asarray(value, dtype=dtype)

        return cls(
            frame_id=str(frame.frame_id),
            points=points,
            boxes=np.asarray(frame.boxes, dtype=np.float32),
            labels=np.asarray(frame.labels, dtype=np.int64),
            num_points=np.asarray(frame.num_points, dtype=np.int64),
            difficulty=np.asarray(frame.difficulty, dtype=np.int64),
            track_ids=np.asarray(frame.track_ids, dtype=np.int64),
            keypoints=opt("keypoints", np.float32),
            keypoint_visibility=opt("keypoint_visibility", np.bool_),
            no_label_zone=opt("no_label_zone", np.bool_),
            point_features=names,
        )


#: The array fields of a PreparedFrame that a frame file stores (when not None).
FRAME_ARRAYS = (
    "points",
    "boxes",
    "labels",
    "num_points",
    "difficulty",
    "track_ids",
    "keypoints",
    "keypoint_visibility",
    "no_label_zone",
)


_NOT_POINTS = tuple(k for k in FRAME_ARRAYS if k != "points")  # points are stored encoded


def _point_codecs(
    point_features: Sequence[str], half_features: Sequence[str], quantize: Mapping[str, float]
) -> tuple[list[bool], list[float]]:
    """``half`` (C,) and ``steps`` (C,) of :func:`~voxsparse.data.point_storage.encode_points` for
    these columns."""
    return [n in half_features for n in point_features], [float(quantize.get(n, 0.0)) for n in point_features]


def _write_frame(
    path: Path, frame: PreparedFrame, half_features: Sequence[str] = (), quantize: Mapping[str, float] | None = None
) -> None:
    """Write ``frame``; the point columns named in ``half_features`` are stored as float16, those in
    ``quantize`` as multiples of their step."""
    arrays = {k: getattr(frame, k) for k in _NOT_POINTS if getattr(frame, k) is not None}
    arrays.update(encode_points(frame.points, *_point_codecs(frame.point_features, half_features, quantize or {})))
    arrays["frame_id"] = np.asarray(frame.frame_id)
    arrays["point_features"] = np.asarray(frame.point_features)
    write_npz(path, arrays)


def _frame_of(arrays: dict[str, np.ndarray]) -> PreparedFrame:
    points = decode_points(arrays)
    for key in POINT_KEYS:
        arrays.pop(key, None)
    return PreparedFrame(
        frame_id=str(arrays.pop("frame_id")),
        point_features=tuple(str(n) for n in arrays.pop("point_features")),
        points=points,
        **{k: arrays.get(k) for k in _NOT_POINTS},
    )


def read_frame(path: str | os.PathLike) -> PreparedFrame:
    """Read and check one frame file.

    Raises:
        ValueError: naming the file, when it is missing, truncated, corrupt or inconsistent.
    """
    return read_arrays(path, "prepared frame", _frame_of, remedy="rerun tools/prepare_data.py to rewrite it")


@dataclass(frozen=True)
class FrameEntry:
    """What the index knows of a frame without opening it.

    Attributes:
        frame_id: the frame's id (its file is ``frames/<frame_id>.npz``).
        num_points: N, the frame's points.
        labels: (K,) the boxes' labels.
        box_points: (K,) the boxes' ``num_points``.
    """

    frame_id: str
    num_points: int
    labels: tuple[int, ...]
    box_points: tuple[int, ...]

    @classmethod
    def of(cls, frame: PreparedFrame) -> FrameEntry:
        return cls(
            frame.frame_id, len(frame.points), tuple(frame.labels.tolist()), tuple(frame.num_points.tolist())
        )


@dataclass(frozen=True)
class PreparedIndex:
    """A split's ``index.json``.

    Attributes:
        split: the split's name.
        class_names: label ``i`` is ``class_names[i]``.
        point_features: names of the stored point columns.
        config: the settings the frames were made with (dataset, version, sweeps, ...).
        frames: every frame, in preparation order.
        gt_database: whether ``gt_database/`` holds this split's GT database.
        version: :data:`FORMAT_VERSION` of the writer.
    """

    split: str
    class_names: tuple[str, ...]
    point_features: tuple[str, ...]
    config: dict[str, Any]
    frames: tuple[FrameEntry, ...]
    gt_database: bool
    version: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode("utf-8")


def read_index(root: str | os.PathLike, split: str) -> PreparedIndex:
    """Read ``<root>/<split>/index.json``.

    Raises:
        FileNotFoundError: the split was never prepared, or its preparation did not finish.
        ValueError: a file that is not a readable index of this format version.
    """
    path = Path(root) / split / "index.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"prepared split {path.parent}: no index.json, so it was not prepared or its preparation did not "
            f"finish; run (or rerun, it resumes) tools/prepare_data.py"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("version") not in READ_VERSIONS:
            raise ValueError(f"format version {raw.get('version')}, this code reads {list(READ_VERSIONS)}")
        return PreparedIndex(
            split=raw["split"],
            class_names=tuple(raw["class_names"]),
            point_features=tuple(raw["point_features"]),
            config=dict(raw["config"]),
            frames=tuple(
                FrameEntry(f["frame_id"], int(f["num_points"]), tuple(f["labels"]), tuple(f["box_points"]))
                for f in raw["frames"]
            ),
            gt_database=bool(raw["gt_database"]),
            version=raw["version"],
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"prepared index {path}: unreadable ({exc}); rerun tools/prepare_data.py") from exc


def column_indices(available: Sequence[str], wanted: Sequence[str] | None, source: str) -> list[int] | None:
    """Positions of the ``wanted`` point columns in ``available`` (None: keep all).

    Raises:
        ValueError: naming ``source``, when a wanted column is not available.
    """
    if wanted is None:
        return None
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ValueError(f"{source}: point features {missing} not available; it has {list(available)}")
    return [list(available).index(n) for n in wanted]


# --- writer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    """One task for a worker process (everything in it is pickled)."""

    key: str
    task: Any
    factory: Callable[[Any], Iterable[Any]]
    split_dir: Path
    num_classes: int
    point_features: tuple[str, ...] | None
    config: dict[str, Any]
    gt_database: bool
    half_features: tuple[str, ...] = ()
    keep_features: tuple[str, ...] | None = None
    quantize: tuple[tuple[str, float], ...] = ()

    @property
    def record_path(self) -> Path:
        return self.split_dir / "tasks" / f"{self.key}.json"


def _finished(job: _Job) -> dict | None:
    """The task's record if its outputs are complete and were made with ``job``'s settings."""
    try:
        record = json.loads(job.record_path.read_text(encoding="utf-8"))
        if record["config"] != job.config or record["version"] != FORMAT_VERSION:
            return None
        if job.gt_database and not record["gt_database"]:
            return None
        for entry in record["frames"]:
            frame = read_frame(job.split_dir / "frames" / f"{entry['frame_id']}.npz")
            if FrameEntry.of(frame) != FrameEntry(
                entry["frame_id"], entry["num_points"], tuple(entry["labels"]), tuple(entry["box_points"])
            ):
                return None
            if job.gt_database:
                part = read_part(job.split_dir / "gt_database" / "parts" / f"{frame.frame_id}.npz")
                if part.points.shape[1] != frame.points.shape[1] or len(part.boxes) != len(frame.boxes):
                    return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


@dataclass(frozen=True)
class _Outcome:
    """What a worker sends back for one task: small, whatever the task's size."""

    key: str
    record: dict
    skipped: bool
    peak_rss: int  # bytes, of the process that ran the task


def _run(job: _Job) -> _Outcome:
    """Do one task (or find it done), one frame in memory at a time."""
    # Tasks run side by side: one thread each (torch ops in cut_objects) avoids oversubscription.
    torch.set_num_threads(1)
    record = _finished(job)
    if record is not None:
        return _Outcome(job.key, record, True, peak_rss_bytes())
    try:
        entries, features = [], None
        for raw in job.factory(job.task):
            frame = PreparedFrame.from_frame(raw, job.point_features)
            columns = column_indices(frame.point_features, job.keep_features, f"frame {frame.frame_id!r}")
            if columns is not None:
                frame = dataclasses.replace(
                    frame, points=np.ascontiguousarray(frame.points[:, columns]), point_features=job.keep_features
                )
            unknown = sorted({name for name, _ in job.quantize} - set(frame.point_features))
            if unknown:
                raise ValueError(f"frame {frame.frame_id!r}: quantize names {unknown}, not among {frame.point_features}")
            half, steps = _point_codecs(frame.point_features, job.half_features, dict(job.quantize))
            if any(half) or any(steps):  # the index and the GT database see the values the frame file holds
                frame = dataclasses.replace(frame, points=stored_points(frame.points, half, steps))
            if len(frame.labels) and not 0 <= frame.labels.min() <= frame.labels.max() < job.num_classes:
                raise ValueError(
                    f"frame {frame.frame_id!r}: labels must lie in [0, {job.num_classes}), got "
                    f"{frame.labels.min()}..{frame.labels.max()}"
                )
            if features is not None and frame.point_features != features:
                raise ValueError(
                    f"frame {frame.frame_id!r}: point_features {frame.point_features} != {features}"
                )
            features = frame.point_features
            _write_frame(job.split_dir / "frames" / f"{frame.frame_id}.npz", frame, job.half_features, dict(job.quantize))
            if job.gt_database:
                write_part(
                    job.split_dir / "gt_database" / "parts" / f"{frame.frame_id}.npz", cut_objects(frame), half, steps
                )
            entries.append(asdict(FrameEntry.of(frame)))
            del frame, raw  # before the next frame is decoded
    except Exception as exc:
        raise PrepareError(f"{job.split_dir.name} task {job.key!r}: {type(exc).__name__}: {exc}") from exc
    record = {
        "version": FORMAT_VERSION,
        "key": job.key,
        "config": job.config,
        "gt_database": job.gt_database,
        "point_features": list(features) if features is not None else None,
        "frames": entries,
    }
    atomic_write(job.record_path, lambda f: f.write(json.dumps(record).encode("utf-8")))
    return _Outcome(job.key, record, False, peak_rss_bytes())


@dataclass(frozen=True)
class PreparationSplit:
    """One split a dataset module asks ``tools/prepare_data.py`` to prepare (:func:`prepare`'s arguments).

    A dataset module that can be prepared exposes ``add_prepare_arguments(parser)`` (its own command-line
    options, and defaults for ``--root`` / ``--out`` through ``parser.set_defaults``) and
    ``preparation_splits(args) -> list[PreparationSplit]`` (``args``: the parsed options, with ``root``,
    ``out``, ``workers``, ``splits``, ``gt_database`` and ``quiet``).

    Attributes:
        split: the prepared split's name.
        factory: ``factory(task)`` yields a task's frames (picklable: a module-level function).
        tasks: builds the tasks (task key -> task) when the split's turn comes.
        class_names: what the frames' labels index.
        config: recorded in the split's index.
        half_features: point columns stored as float16 (see :func:`prepare`).
        keep_features: the point columns stored (see :func:`prepare`); None: all.
        quantize: point columns stored quantized, name -> step (see :func:`prepare`); None: none.
    """

    split: str
    factory: Callable[[Any], Iterable[Any]]
    tasks: Callable[[], Mapping[str, Any]]
    class_names: Sequence[str]
    config: Mapping[str, Any]
    half_features: Sequence[str] = ()
    keep_features: Sequence[str] | None = None
    quantize: Mapping[str, float] | None = None


def prepare(
    frames_iterable_factory: Callable[[Any], Iterable[Any]],
    tasks: Mapping[str, Any],
    out_dir: str | os.PathLike,
    split: str,
    workers: int = 1,
    *,
    class_names: Sequence[str],
    point_features: Sequence[str] | None = None,
    config: Mapping[str, Any] | None = None,
    gt_database: bool = False,
    progress: bool = True,
    half_features: Sequence[str] = (),
    keep_features: Sequence[str] | None = None,
    quantize: Mapping[str, float] | None = None,
    executor: Executor | None = None,
    stats: dict[str, Any] | None = None,
) -> PreparedIndex:
    """Convert a dataset split into the prepared layout (module docstring), resuming a previous run.

    Args:
        frames_iterable_factory: ``factory(task)`` yields the task's frames (``FrameLike``, with
            ``point_features`` or not); called in worker processes, so it and the tasks must be
            picklable (module-level functions, dataclasses).
        tasks: task key (a file name: letters, digits, ``._-``) -> task, e.g. a nuScenes sample or a
            Waymo segment path; the index lists their frames in this order.
        out_dir: the prepared dataset's root; the split goes to ``out_dir/split``.
        split: the split's name.
        workers: processes of this machine; 1 runs in this process (ignored with ``executor``).
        class_names: what the frames' labels index.
        point_features: column names for frames that do not carry ``point_features``.
        config: JSON-able settings the frames depend on (e.g. the number of sweeps). A finished task
            recorded with other settings is redone.
        gt_database: also cut the points inside every box and build ``gt_database/``.
        progress: show a progress bar.
        half_features: point columns stored as float16 (e.g. intensity: ~5e-4 relative precision,
            half the bytes); never x, y, z. Part of the settings: changing it redoes tasks.
        keep_features: the point columns stored, by name, in this order (starting x, y, z); None:
            every column of the frames. Part of the settings.
        quantize: point columns stored as multiples of a step, name -> step (e.g. ``{"x": 2**-9,
            ...}`` metres): absolute error at most step / 2, delta-coded along the frame's point
            order (:mod:`voxsparse.data.point_storage`). Not with ``half_features``. Part of the settings.
        executor: where the tasks run (:mod:`voxsparse.data.executors`: a process pool, a Ray
            cluster); None: a :class:`~voxsparse.data.executors.LocalExecutor` of ``workers``.
            Every executor writes the same files.
        stats: if given, filled with ``peak_rss`` (bytes, the largest peak resident set of a process
            that ran a task of this run, skipped tasks included), ``done`` and ``skipped`` (tasks).

    Returns:
        The index written to ``out_dir/split/index.json``.

    Raises:
        PrepareError: a task failed (naming it and the cause, e.g. a missing sweep file); the
            finished tasks are kept and a rerun resumes.
        ValueError: bad arguments, or frames that disagree (duplicate ids, different columns).
    """
    _check_name("split", split)
    for key in tasks:
        _check_name("task key", key)
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    config = dict(config or {})
    half_features = tuple(half_features)
    if half_features:
        unknown = {"x", "y", "z"} & set(half_features)
        if unknown:
            raise ValueError(f"half_features: x, y, z are never stored as float16, got {sorted(unknown)}")
        config["half_features"] = sorted(half_features)
    quantize = {str(k): float(v) for k, v in sorted((quantize or {}).items())}
    if quantize:
        bad = {k: v for k, v in quantize.items() if not (np.isfinite(v) and v > 0) or k in half_features}
        if bad:
            raise ValueError(f"quantize: steps must be finite and > 0, on columns not in half_features; got {bad}")
        config["quantize"] = quantize
    if keep_features is not None:
        keep_features = tuple(keep_features)
        if keep_features[:3] != _XYZ:
            raise ValueError(f"keep_features: must start with x, y, z, got {keep_features}")
        config["features"] = list(keep_features)
    config = json.loads(json.dumps(config))  # plain JSON types, compared with records
    split_dir = Path(out_dir) / split
    split_dir.mkdir(parents=True, exist_ok=True)
    # No stale index or database may outlive this run if it is interrupted.
    for stale in (
        split_dir / "index.json",
        split_dir / "gt_database" / "objects.npz",
        split_dir / "gt_database" / "points.npy",
    ):
        stale.unlink(missing_ok=True)
    for tmp in split_dir.rglob(".*.tmp"):  # left by a killed run's atomic writes
        tmp.unlink(missing_ok=True)
    for scratch in split_dir.glob("gt_database/.merge-*"):  # a killed GT database merge's
        shutil.rmtree(scratch, ignore_errors=True)

    jobs = [
        _Job(
            key,
            task,
            frames_iterable_factory,
            split_dir,
            len(class_names),
            None if point_features is None else tuple(point_features),
            config,
            gt_database,
            half_features,
            keep_features,
            tuple(quantize.items()),
        )
        for key, task in tasks.items()
    ]
    records: dict[str, dict] = {}
    skipped = peak = 0
    bar = progress_bar(total=len(jobs), desc=f"prepare {split}", unit="task", enabled=progress)
    threads = torch.get_num_threads()
    own = executor is None
    executor = executor or LocalExecutor(workers)
    outcomes = executor.map_unordered(_run, jobs)
    try:
        for outcome in outcomes:
            records[outcome.key] = outcome.record
            skipped += outcome.skipped
            peak = max(peak, outcome.peak_rss)
            bar.update()
            bar.set_postfix(skipped=skipped)
    finally:
        bar.close()
        outcomes.close()
        torch.set_num_threads(threads)
        if own:
            executor.close()
    if stats is not None:
        stats.update(peak_rss=peak, done=len(jobs) - skipped, skipped=skipped)
    if skipped:
        log.info("prepare %s: %d of %d tasks were already done", split, skipped, len(jobs))

    frames: list[FrameEntry] = []
    owner: dict[str, str] = {}
    features = {tuple(r["point_features"]) for r in records.values() if r["point_features"] is not None}
    if len(features) > 1:
        raise ValueError(f"split {split}: frames have different point_features: {sorted(features)}")
    for key in tasks:
        for f in records[key]["frames"]:
            if f["frame_id"] in owner:
                raise ValueError(
                    f"split {split}: frame id {f['frame_id']!r} comes from tasks {owner[f['frame_id']]!r} and {key!r}"
                )
            owner[f["frame_id"]] = key
            frames.append(
                FrameEntry(f["frame_id"], f["num_points"], tuple(f["labels"]), tuple(f["box_points"]))
            )
    if features:
        names = features.pop()
    elif keep_features is not None:
        names = keep_features
    elif point_features is not None:
        names = tuple(point_features)
    else:
        names = _XYZ
    if gt_database:
        num_objects = merge_parts(split_dir / "gt_database", [f.frame_id for f in frames], class_names, names)
        log.info("prepare %s: GT database of %d objects", split, num_objects)
    index = PreparedIndex(split, tuple(class_names), names, config, tuple(frames), gt_database)
    atomic_write(split_dir / "index.json", lambda f: f.write(index.to_json()))
    return index


# --- reader ------------------------------------------------------------------------------------


def label_order(stored: Sequence[str], wanted: Sequence[str] | None, source: str) -> np.ndarray | None:
    """How stored labels become labels in the ``wanted`` order of the same class names.

    Models name their classes in their own order (a reference model's order is its published
    weights'), so a dataset relabels rather than insisting on the order it was prepared in.

    Returns:
        (len(stored),) int64 with ``wanted.index(stored[i])`` at ``i``, or None when nothing changes.

    Raises:
        ValueError: naming ``source``, when ``wanted`` is not a reordering of ``stored``.
    """
    if wanted is None or tuple(wanted) == tuple(stored):
        return None
    if sorted(wanted) != sorted(stored) or len(set(wanted)) != len(wanted):
        raise ValueError(
            f"{source}: class_names {list(wanted)} are not a reordering of the data's {list(stored)}"
        )
    return np.asarray([list(wanted).index(n) for n in stored], dtype=np.int64)



class PreparedDataset(Dataset):
    """The frames of a prepared split, as :class:`PreparedFrame` s (``FrameLike``).

    Args:
        root: the prepared dataset's root (``tools/prepare_data.py --out``).
        split: the split's name.
        class_names: the label order to return, a reordering of the split's class names (labels are
            relabelled by name); the split's own order when None.
        point_features: the point columns to return, by name (e.g. ``[x, y, z, intensity]``); all
            stored columns when None.
        min_points: boxes with fewer ``num_points`` are dropped (nuScenes keeps boxes with no
            LiDAR point; training usually wants 1).
        drop_no_label_zone: drop points flagged as in a no-label zone (Waymo).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        class_names: Sequence[str] | None = None,
        point_features: Sequence[str] | None = None,
        min_points: int = 0,
        drop_no_label_zone: bool = False,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.index = read_index(root, split)
        source = f"prepared split {self.root / split}"
        self._relabel = label_order(self.index.class_names, class_names, source)
        self._class_names = self.index.class_names if class_names is None else tuple(class_names)
        self.columns = column_indices(self.index.point_features, point_features, source)
        self.point_features = self.index.point_features if point_features is None else tuple(point_features)
        self.min_points = int(min_points)
        self.drop_no_label_zone = drop_no_label_zone

    @property
    def class_names(self) -> tuple[str, ...]:
        return self._class_names

    def _labels(self, labels: np.ndarray) -> np.ndarray:
        return labels if self._relabel is None else self._relabel[labels]

    @property
    def frame_ids(self) -> list[str]:
        return [f.frame_id for f in self.index.frames]

    def frame_labels(self) -> list[np.ndarray]:
        """Per frame, the labels of the boxes :meth:`__getitem__` returns (read from the index)."""
        return [
            self._labels(np.asarray([l for l, n in zip(f.labels, f.box_points) if n >= self.min_points], dtype=np.int64))
            for f in self.index.frames
        ]

    def __len__(self) -> int:
        return len(self.index.frames)

    def __getitem__(self, index: int) -> PreparedFrame:
        entry = self.index.frames[index]
        frame = read_frame(self.root / self.split / "frames" / f"{entry.frame_id}.npz")
        points, nlz = frame.points, frame.no_label_zone
        if self.drop_no_label_zone and nlz is not None:
            points, nlz = points[~nlz], None
        if self.columns is not None:
            points = np.ascontiguousarray(points[:, self.columns])
        keep = frame.num_points >= self.min_points

        def sel(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return PreparedFrame(
            frame_id=frame.frame_id,
            points=points,
            boxes=frame.boxes[keep],
            labels=self._labels(frame.labels[keep]),
            num_points=frame.num_points[keep],
            difficulty=frame.difficulty[keep],
            track_ids=frame.track_ids[keep],
            keypoints=sel(frame.keypoints),
            keypoint_visibility=sel(frame.keypoint_visibility),
            no_label_zone=nlz,
            point_features=self.point_features,
        )
