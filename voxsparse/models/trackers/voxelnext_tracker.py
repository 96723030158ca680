"""VoxelNeXt-style 3D multi-object tracking by detection: propagate, associate greedily, birth/death.

Per frame (all positions in one fixed frame: the caller moves detections to world coordinates
first, so ego motion is not mistaken for object motion):

1. **Propagate** every live track by ``velocity * dt``: its box centre and its query voxel.
   The velocity is the detector's own (boxes of 9 columns, as VoxelNeXt and CenterPoint predict it)
   or, for 7-column boxes (single-scan models predict none), the track's own estimate: the
   displacement between its last two matched detections over their time gap, smoothed
   exponentially (:attr:`TrackerConfig.velocity_smoothing`).
2. **Associate**, per class (a class never matches another): the cost of (detection, track) is
   ``min(centre distance, query-voxel distance)`` in BEV metres, or the centre distance alone
   where either side has no query voxel. The query voxel, the BEV cell that predicted the box,
   lies on the object and moves with it, so a box whose centre regression jumps (a partial view)
   still matches through its query voxel (VoxelNeXt, Sec. 4.3). Pairs are taken greedily by
   ascending cost while both are free and the cost is within the class's threshold
   (:attr:`TrackerConfig.max_distance`, CenterPoint's per-frame displacement gates).
3. **Birth / death**: an unmatched detection at or above ``min_score`` starts a tentative track;
   it is confirmed after ``min_hits`` matches. A tentative track dies at its first miss, a confirmed
   one after more than ``max_age`` consecutive misses. Ids are never reused.

Every detection that matched a track or started one is reported with that track's id (tentative
ones included: nuScenes' AMOTA rewards reporting an object from its first frame;
``report_tentative=False`` reports confirmed tracks only). Missed tracks coast unreported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from voxsparse.structures import Detections3D

__all__ = ["Track", "TrackerConfig", "VoxelNeXtTracker", "greedy_match"]


@dataclass(frozen=True)
class TrackerConfig:
    """Association gates and track life rules.

    Attributes:
        max_distance: class name -> largest association cost (BEV metres) after propagation.
        min_score: detections below this score are ignored (neither matched nor born).
        min_hits: matches (the first detection counts) before a track is confirmed (>= 1).
        max_age: consecutive missed frames a confirmed track survives; it dies at ``max_age + 1``.
        velocity_smoothing: weight of the newest displacement-based velocity in the track's
            estimate (7-column boxes only), in (0, 1]; 1 = the last displacement alone.
        report_tentative: report the detections of tracks not yet confirmed.
        use_query_voxels: associate by query voxels as well as centres (False: centres only, for
            ablation).
    """

    max_distance: Mapping[str, float] = field(
        default_factory=lambda: {"Vehicle": 4.0, "Pedestrian": 1.0, "Cyclist": 3.0}
    )
    min_score: float = 0.1
    min_hits: int = 2
    max_age: int = 3
    velocity_smoothing: float = 0.5
    report_tentative: bool = True
    use_query_voxels: bool = True

    def __post_init__(self) -> None:
        for name, value in self.max_distance.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"TrackerConfig.max_distance[{name!r}]: expected a positive number, got {value!r}")
        if self.min_hits < 1:
            raise ValueError(f"TrackerConfig.min_hits: expected >= 1, got {self.min_hits}")
        if self.max_age < 0:
            raise ValueError(f"TrackerConfig.max_age: expected >= 0, got {self.max_age}")
        if not 0 < self.velocity_smoothing <= 1:
            raise ValueError(f"TrackerConfig.velocity_smoothing: expected in (0, 1], got {self.velocity_smoothing}")
        if not 0 <= self.min_score <= 1:
            raise ValueError(f"TrackerConfig.min_score: expected in [0, 1], got {self.min_score}")


@dataclass
class Track:
    """One tracked object (mutable: the tracker updates it every frame).

    Attributes:
        track_id: unique, never reused within a tracker.
        label: class index.
        box: (7 | 9,) float64, the last matched box, propagated to the current time while it coasts.
        query_xy: (2,) float64 metres, its last query voxel (propagated likewise), or None.
        velocity: (2,) float64 m/s used to propagate.
        hits: matched frames so far (the birth counts).
        misses: consecutive frames without a match.
        last_time: seconds, time of the last match.
    """

    track_id: int
    label: int
    box: np.ndarray
    query_xy: np.ndarray | None
    velocity: np.ndarray
    hits: int = 1
    misses: int = 0
    last_time: float = 0.0

    def confirmed(self, min_hits: int) -> bool:
        return self.hits >= min_hits


def greedy_match(cost: np.ndarray, max_cost: float) -> list[tuple[int, int]]:
    """Greedy assignment: pairs ``(row, col)`` by ascending ``cost`` while both are free and cost <= max_cost.

    Args:
        cost: (R, C) float, inf where a pair must never match.
    """
    if cost.size == 0:
        return []
    flat = np.argsort(cost, axis=None, kind="stable")
    rows, cols = np.unravel_index(flat, cost.shape)
    used_r, used_c, pairs = set(), set(), []
    for r, c in zip(rows.tolist(), cols.tolist()):
        if cost[r, c] > max_cost:
            break  # sorted: nothing further can match
        if r not in used_r and c not in used_c:
            used_r.add(r)
            used_c.add(c)
            pairs.append((r, c))
    return pairs


class VoxelNeXtTracker:
    """Track one sequence at a time; call :meth:`reset` between sequences.

    Args:
        class_names: label ``i`` is ``class_names[i]``; each needs a gate in ``config.max_distance``.
        config: gates and life rules.
    """

    def __init__(self, class_names: Sequence[str], config: TrackerConfig | None = None):
        self.config = config or TrackerConfig()
        missing = [n for n in class_names if n not in self.config.max_distance]
        if missing:
            raise ValueError(f"TrackerConfig.max_distance: no gate for classes {missing}")
        self.class_names = list(class_names)
        self._next_id = 0
        self.reset()

    def reset(self) -> None:
        """Forget all tracks (a new sequence starts); ids keep increasing, so they stay unique."""
        self.tracks: list[Track] = []
        self._time: float | None = None

    def step(self, detections: Detections3D, timestamp: float) -> Detections3D:
        """Track one frame.

        Args:
            detections: this frame's detections in the tracker's fixed (world) frame; boxes (K, 7|9),
                ``query_xy`` optional.
            timestamp: seconds; must increase within a sequence.

        Returns:
            The reported detections (a subset of ``detections``, same order) with ``track_ids``.
        """
        if self._time is not None and not timestamp > self._time:
            raise ValueError(f"timestamp: must increase within a sequence, got {timestamp} after {self._time}")
        dt = 0.0 if self._time is None else timestamp - self._time
        self._time = timestamp
        detections = detections.to("cpu")
        labels = detections.labels.cpu().numpy()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"Detections3D.labels: expected values in [0, {len(self.class_names)}), got {labels}")
        boxes = detections.boxes.tensor.detach().cpu().double().numpy()
        query = None
        if detections.query_xy is not None and self.config.use_query_voxels:
            query = detections.query_xy.detach().cpu().double().numpy()
        valid = np.flatnonzero(detections.scores.detach().cpu().numpy() >= self.config.min_score)

        self._propagate(dt)
        track_of = np.full(len(boxes), -1)  # index into self.tracks per detection
        for label, name in enumerate(self.class_names):
            dets = valid[labels[valid] == label]
            live = [i for i, t in enumerate(self.tracks) if t.label == label]
            cost = self._cost(boxes[dets], None if query is None else query[dets], [self.tracks[i] for i in live])
            for r, c in greedy_match(cost, self.config.max_distance[name]):
                track_of[dets[r]] = live[c]

        matched = set(track_of[track_of >= 0].tolist())
        for d in np.flatnonzero(track_of >= 0):
            self._update(self.tracks[track_of[d]], boxes[d], None if query is None else query[d], timestamp)
        for i, track in enumerate(self.tracks):
            if i not in matched:
                track.misses += 1
        born = [d for d in valid if track_of[d] < 0]
        for d in born:
            track_of[d] = len(self.tracks)
            self.tracks.append(self._birth(boxes[d], None if query is None else query[d], int(labels[d]), timestamp))

        report = [
            d
            for d in range(len(boxes))
            if track_of[d] >= 0
            and (self.config.report_tentative or self.tracks[track_of[d]].confirmed(self.config.min_hits))
        ]
        ids = [self.tracks[track_of[d]].track_id for d in report]
        self.tracks = [t for t in self.tracks if self._alive(t)]
        keep = torch.as_tensor(report, dtype=torch.long)
        return Detections3D(
            detections.boxes[keep],
            detections.scores[keep],
            detections.labels[keep],
            track_ids=torch.as_tensor(ids, dtype=torch.long),
            query_xy=None if detections.query_xy is None else detections.query_xy[keep],
        )

    def track_sequence(self, detections: Sequence[Detections3D], timestamps: Sequence[float]) -> list[Detections3D]:
        """Track one whole sequence from scratch: :meth:`reset`, then :meth:`step` per frame."""
        if len(detections) != len(timestamps):
            raise ValueError(f"{len(detections)} detection sets but {len(timestamps)} timestamps")
        self.reset()
        return [self.step(d, t) for d, t in zip(detections, timestamps)]

    # --- the three stages ------------------------------------------------------------------------
    def _propagate(self, dt: float) -> None:
        for track in self.tracks:
            shift = track.velocity * dt
            track.box[:2] += shift
            if track.query_xy is not None:
                track.query_xy += shift

    @staticmethod
    def _cost(boxes: np.ndarray, query: np.ndarray | None, tracks: list[Track]) -> np.ndarray:
        """(D, T) BEV metres: min(centre distance, query-voxel distance) where both have query voxels."""
        if not len(boxes) or not tracks:
            return np.zeros((len(boxes), len(tracks)))
        centres = np.stack([t.box[:2] for t in tracks])
        cost = np.linalg.norm(boxes[:, None, :2] - centres[None], axis=-1)
        if query is not None:
            has_query = np.array([t.query_xy is not None for t in tracks])
            if has_query.any():
                track_query = np.stack([t.query_xy if t.query_xy is not None else np.zeros(2) for t in tracks])
                q = np.linalg.norm(query[:, None] - track_query[None], axis=-1)
                cost = np.where(has_query[None], np.minimum(cost, q), cost)
        return cost

    def _update(self, track: Track, box: np.ndarray, query: np.ndarray | None, timestamp: float) -> None:
        if len(box) == 9:
            track.velocity = box[7:9].copy()
        else:
            measured = (box[:2] - (track.box[:2] - track.velocity * (timestamp - track.last_time))) / (
                timestamp - track.last_time
            )
            # The first displacement is the only estimate; later ones are averaged against noise.
            a = 1.0 if track.hits == 1 else self.config.velocity_smoothing
            track.velocity = a * measured + (1 - a) * track.velocity
        track.box = box.copy()
        track.query_xy = None if query is None else query.copy()
        track.hits += 1
        track.misses = 0
        track.last_time = timestamp

    def _birth(self, box: np.ndarray, query: np.ndarray | None, label: int, timestamp: float) -> Track:
        self._next_id += 1
        velocity = box[7:9].copy() if len(box) == 9 else np.zeros(2)
        return Track(
            self._next_id, label, box.copy(), None if query is None else query.copy(), velocity, last_time=timestamp
        )

    def _alive(self, track: Track) -> bool:
        if not track.confirmed(self.config.min_hits):
            return track.misses == 0
        return track.misses <= self.config.max_age
