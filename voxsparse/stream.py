"""Detection and tracking one frame at a time: what a robot (or ``tools/predict.py bag=``) feeds a
model with as sweeps arrive.

:class:`DetectionStream` takes one cloud, its time and its ego pose per :meth:`~DetectionStream.step`
and returns that frame's detections (sensor frame) and tracks (world frame). It computes exactly what
the offline path computes frame by frame: the cloud is conformed and detected as
:class:`~voxsparse.engine.predict.ScanPredictor` does, and the tracked classes go through
:class:`~voxsparse.models.trackers.VoxelNeXtTracker` in the world frame of the given poses
(:func:`~voxsparse.evaluation.nuscenes_tracking.detections_to_global`), as
:func:`~voxsparse.engine.tracking.run_tracking` links a sequence. Each step's wall time (CUDA
synchronised) is kept for :meth:`~DetectionStream.latency` (p50 / p99; ``tools/stream_benchmark.py``).

A frame is not replayed as a CUDA graph: the voxelizer and every strided sparse convolution size
their outputs from the data and read those sizes on the host, so no fixed kernel sequence exists to
capture; on the GPU, ``fuse`` (BatchNorm folded into the convolutions) is the option that shortens it.

Memory is bounded, whatever the drive's length: besides the model, the session holds the tracker's
live tracks (each frame adds at most ``max_detections`` of the head; a tentative track dies at its
first miss, a confirmed one after ``max_age`` misses, so at most ``max_detections x (max_age + 1)``
tracks of a few hundred bytes) and the last ``latency_window`` per-frame latencies.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxsparse.data.drives import DriveFrame, MarkerWriter, read_drive
from voxsparse.data.pointfile import PointCloud
from voxsparse.data.rosbag import matrix_to_quaternion
from voxsparse.engine.predict import ScanPredictor, ScanResult, detection_records
from voxsparse.evaluation.nuscenes_tracking import detections_to_global
from voxsparse.geometry import RigidTransform
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker
from voxsparse.structures import Detections3D
from voxsparse.utils.io import atomic_write
from voxsparse.utils.progress import progress

__all__ = [
    "DetectionStream", "DriveOptions", "DriveRun", "LatencyStats", "StreamResult", "frame_record", "pose_to_transform",
    "run_drive",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyStats:
    """Per-frame latency over the last frames (milliseconds; NaN when none)."""

    frames: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ms: Sequence[float]) -> LatencyStats:
        if not len(samples_ms):
            return cls(0, float("nan"), float("nan"), float("nan"), float("nan"))
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(len(a), float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(a.mean()), float(a.max()))

    def __str__(self) -> str:
        return (f"{self.frames} frames: p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms, "
                f"mean {self.mean_ms:.1f} ms, max {self.max_ms:.1f} ms")


@dataclass
class StreamResult:
    """One frame through the stream.

    Attributes:
        frame_id: the caller's name of the frame.
        timestamp: seconds.
        num_points: points of the cloud.
        detections: sensor frame, scores >= ``min_score``, scores descending; with tracking,
            ``track_ids`` holds each detection's track (-1: not reported by the tracker: a class
            without a gate, a score below its ``min_score``, a tentative track when it reports
            confirmed ones only).
        tracks: the tracker's report in the world frame (``track_ids`` set), None without tracking.
        latency_ms: wall time of :meth:`DetectionStream.step` (CUDA synchronised).
    """

    frame_id: str
    timestamp: float
    num_points: int
    detections: Detections3D
    tracks: Detections3D | None
    latency_ms: float


def pose_to_transform(pose: np.ndarray) -> RigidTransform:
    """A (4, 4) world-from-sensor matrix as a :class:`~voxsparse.geometry.RigidTransform`."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4) or not np.isfinite(pose).all():
        raise ValueError(f"ego_pose: expected a finite (4, 4) matrix, got shape {pose.shape}")
    return RigidTransform(tuple(matrix_to_quaternion(pose[:3, :3])), tuple(pose[:3, 3]))


def _rows(det: Detections3D) -> torch.Tensor:
    """(K, B + 2) float64: box, score and label of each detection."""
    return torch.cat([det.boxes.tensor.double(), det.scores.double()[:, None], det.labels.double()[:, None]], 1)


def _subset_positions(full: torch.Tensor, subset: torch.Tensor) -> list[int]:
    """Rows of ``full`` that ``subset`` (rows of ``full`` in the same order, copied) consists of."""
    wanted = [row.tobytes() for row in subset.numpy()]
    positions, j = [], 0
    for i, row in enumerate(full.numpy()):
        if j < len(wanted) and row.tobytes() == wanted[j]:
            positions.append(i)
            j += 1
    if j != len(subset):
        raise RuntimeError("the tracker reported a detection it was not given")
    return positions


class DetectionStream:
    """A model and, optionally, a tracker, fed one frame at a time.

    Args:
        model: a detector (``voxsparse.load_model``) with ``point_convention`` and ``class_names``.
        device: where the model runs.
        tracker: the tracker's settings; ``max_distance`` gates are looked up by the model's class
            names and classes without a gate are not tracked; None: no tracking.
        min_score: detections below are dropped (before tracking).
        fuse: fold BatchNorm into the sparse convs first (:func:`~voxsparse.models.fusion.fuse_for_inference`:
            faster on CUDA, equal up to float rounding); the default keeps ``tools/predict.py``'s exact outputs.
        latency_window: per-frame latencies kept for :meth:`latency`.
    """

    def __init__(
        self,
        model: nn.Module,
        device: str | torch.device = "cpu",
        tracker: TrackerConfig | None = None,
        min_score: float = 0.0,
        fuse: bool = False,
        latency_window: int = 1000,
    ) -> None:
        self.device = torch.device(device)
        self.model = fuse_for_inference(model) if fuse else model.eval()
        self.predictor = ScanPredictor(self.model, self.device)
        self.class_names = list(model.class_names)
        self.min_score = float(min_score)
        self._latencies: deque[float] = deque(maxlen=latency_window)
        self._frames = 0
        self._warned_pose = False
        self.tracker = None
        if tracker is not None:
            tracked = [label for label, name in enumerate(self.class_names) if name in tracker.max_distance]
            if not tracked:
                raise ValueError(
                    f"tracker.max_distance: gates for {sorted(tracker.max_distance)} but the model's classes are "
                    f"{self.class_names}: nothing would be tracked"
                )
            untracked = [n for n in self.class_names if n not in tracker.max_distance]
            if untracked:
                log.info("tracking %s; no gate (not tracked): %s", [self.class_names[i] for i in tracked], untracked)
            names = [self.class_names[label] for label in tracked]
            config = dataclasses.replace(tracker, max_distance={n: tracker.max_distance[n] for n in names})
            self.tracker = VoxelNeXtTracker(names, config)
            self._to_tracked = torch.full((len(self.class_names),), -1, dtype=torch.int64)
            self._to_tracked[tracked] = torch.arange(len(tracked))
            self._from_tracked = torch.as_tensor(tracked, dtype=torch.int64)

    def reset(self) -> None:
        """Start a new sequence: tracks are forgotten (ids stay unique), latencies kept."""
        if self.tracker is not None:
            self.tracker.reset()

    def latency(self) -> LatencyStats:
        """p50 / p99 of the last ``latency_window`` frames."""
        return LatencyStats.of(list(self._latencies))

    @torch.no_grad()
    def step(
        self,
        cloud: PointCloud | np.ndarray,
        timestamp: float,
        ego_pose: np.ndarray | RigidTransform | None = None,
        frame_id: str | None = None,
    ) -> StreamResult:
        """Detect (and track) one frame.

        Args:
            cloud: a :class:`~voxsparse.data.pointfile.PointCloud` (conformed to the model's
                convention), or (N, C) points already in it.
            timestamp: seconds; must increase within a sequence when tracking.
            ego_pose: world-from-sensor, (4, 4) or a RigidTransform; None: identity (tracks in the sensor frame).
            frame_id: the frame's name in the result (default: its index in the session).
        """
        start = time.perf_counter()
        if isinstance(cloud, PointCloud):
            detections = self.predictor(cloud)
        else:
            detections = self.predictor.predict_points(cloud)
        detections = detections[detections.scores >= self.min_score]
        tracks = None
        if self.tracker is not None:
            detections, tracks = self._track(detections, timestamp, ego_pose)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = 1e3 * (time.perf_counter() - start)
        self._latencies.append(elapsed)
        self._frames += 1
        name = frame_id if frame_id is not None else str(self._frames - 1)
        return StreamResult(name, float(timestamp), len(cloud), detections, tracks, elapsed)

    def _track(
        self, detections: Detections3D, timestamp: float, ego_pose: np.ndarray | RigidTransform | None
    ) -> tuple[Detections3D, Detections3D]:
        if ego_pose is None:
            if not self._warned_pose:
                self._warned_pose = True
                log.info("no ego pose: tracking in the sensor frame (identity pose)")
            transform = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        else:
            transform = ego_pose if isinstance(ego_pose, RigidTransform) else pose_to_transform(ego_pose)
        tracked = detections[self._to_tracked[detections.labels] >= 0]
        tracked = dataclasses.replace(tracked, labels=self._to_tracked[tracked.labels])
        world = detections_to_global(tracked, transform)
        tracks = self.tracker.step(world, timestamp)
        # Each reported track is a copy of one world-frame detection, in order: give its id to the
        # sensor-frame detection it came from.
        ids = torch.full((len(detections),), -1, dtype=torch.int64)
        rows = torch.nonzero(self._to_tracked[detections.labels] >= 0).flatten()
        positions = _subset_positions(_rows(world), _rows(tracks))
        ids[rows[positions]] = tracks.track_ids
        tracks = dataclasses.replace(tracks, labels=self._from_tracked[tracks.labels])
        return dataclasses.replace(detections, track_ids=ids), tracks


# --- a recorded drive through the stream (tools/predict.py bag=...) -------------------------------


@dataclass
class DriveOptions:
    """``tools/predict.py``'s options for a recorded drive (``configs/predict.yaml``)."""

    bag: str | None = None
    topic: str | None = None
    pose_topic: str | None = None
    intensity_field: str | None = None
    intensity_scale: str | None = None
    max_pose_gap: float = 0.1
    output: str | None = None
    output_topic: str = "/detections"
    storage: str = "sqlite3"
    track: bool = True
    fuse: bool = False


@dataclass
class DriveRun:
    """What :func:`run_drive` wrote: the output, frames streamed, their latency."""

    output: Path
    frames: int
    detections: int
    latency: LatencyStats


def frame_record(frame: DriveFrame, result: StreamResult, class_names: Sequence[str]) -> dict:
    """One JSON-lines record of a drive's frame: :func:`~voxsparse.engine.predict.detection_records`
    (``file`` names drive, topic and message; ``track_id`` per detection when tracking) with the
    frame's ``timestamp`` (seconds), ``stamp_ns`` and the non-finite points ``dropped``."""
    scan = ScanResult(result.frame_id, frame.cloud.path, result.num_points, result.detections)
    record = detection_records(scan, class_names)
    return {**record, "timestamp": frame.timestamp, "stamp_ns": frame.stamp_ns, "dropped": frame.dropped}


def run_drive(
    model: nn.Module,
    opts: DriveOptions,
    output_dir: str | Path,
    tracker: TrackerConfig | None = None,
    device: str | torch.device = "cpu",
    min_score: float = 0.0,
) -> DriveRun:
    """Stream every cloud of ``opts.topic`` through a :class:`DetectionStream` and write the detections:
    as JSON lines (``opts.output`` ending in ``.jsonl``, default ``<output_dir>/detections.jsonl``,
    :func:`frame_record`) or as a ``visualization_msgs/MarkerArray`` topic ``opts.output_topic`` of a
    new drive (``.bag``, ``.mcap``, or a ROS 2 bag folder of ``opts.storage``). One frame is held at a
    time, whatever the drive's length.
    """
    if opts.bag is None or opts.topic is None:
        raise ValueError("give bag=DRIVE and topic=/its/PointCloud2/topic")
    output = Path(opts.output) if opts.output else Path(output_dir) / "detections.jsonl"
    stream = DetectionStream(model, device, tracker if opts.track else None, min_score, opts.fuse)
    frames = read_drive(opts.bag, opts.topic, opts.pose_topic, opts.intensity_field, opts.intensity_scale,
                        opts.max_pose_gap)
    first = next(frames, None)  # a drive, topic or message that cannot be read fails before any output exists
    frames = itertools.chain([first] if first is not None else [], frames)
    counts = [0, 0]

    def run(write) -> None:
        for frame in progress(frames, "stream", unit="frame"):
            try:
                result = stream.step(frame.cloud, frame.timestamp, frame.ego_pose, frame.frame_id)
            except ValueError as exc:
                raise ValueError(f"{frame.cloud.path}: {exc}") from None
            counts[0] += 1
            counts[1] += len(result.detections)
            write(frame, result)

    if output.suffix == ".jsonl":
        atomic_write(output, lambda f: run(
            lambda frame, result: f.write((json.dumps(frame_record(frame, result, stream.class_names)) + "\n").encode())
        ))
    else:
        writer = MarkerWriter(output, opts.output_topic, stream.class_names, opts.storage)
        try:
            run(lambda frame, result: writer.write(frame, result.detections))
        finally:
            writer.close()
    latency = stream.latency()
    log.info("drive %s, topic %s: %s; latency per frame over the last %s", opts.bag, opts.topic,
             f"{counts[0]} frames, {counts[1]} detections", latency)
    return DriveRun(output, counts[0], counts[1], latency)
