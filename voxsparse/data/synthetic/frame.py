"""A LiDAR frame with its ground truth, and the functions that generate frames and sequences.

Determinism: a seed fixes everything. The scene layout draws from ``SeedSequence(seed, spawn_key=(0,))``
and the sensor noise of frame ``k`` from ``SeedSequence(seed, spawn_key=(1, k))``, so any frame of a
sequence can be rendered alone, bit-identically, without rendering the frames before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.synthetic.geometry import Primitives
from voxsparse.data.synthetic.lidar import Lidar, LidarConfig
from voxsparse.data.synthetic.scene import Scene, SceneConfig, build_scene
from voxsparse.geometry import points_in_boxes, wrap_angle

#: A keypoint is visible when the first surface on the sensor's ray towards it lies no more than this
#: far in front of it (m): about a limb's radius plus margin, less than the depth of a torso or head,
#: so joints behind the body or behind other objects count as occluded.
KEYPOINT_TOLERANCE = 0.12

#: Objects with at most this many points are LEVEL_2 (hard), the others LEVEL_1, as in Waymo.
LEVEL_2_MAX_POINTS = 5


@dataclass(kw_only=True)
class LidarFrame(FrameRecord):
    """One LiDAR sweep and its ground truth, in the LiDAR frame (x forward, y left, z up, metres): a
    :class:`~voxsparse.data.frame_record.FrameRecord` with a time and a pose.

    Attributes:
        points: (N, 4) float32 x, y, z, intensity in [0, 1].
        boxes: (K, 9) float32 (x, y, z, dx, dy, dz, heading, vx, vy): centre, size (dx along the
            heading), heading counter-clockwise from +x in [-pi, pi), and the object's velocity over
            the ground (m/s) expressed in the LiDAR axes (the ego's own motion is not subtracted).
        labels: (K,) int64 index into ``CLASS_NAMES`` (``voxsparse.data.synthetic.actors``).
        num_points: (K,) int64 points inside each box (faces included); objects with none are dropped.
        difficulty: (K,) int64 1 = LEVEL_1, 2 = LEVEL_2 (``num_points <= 5``).
        track_ids: (K,) int64 identities, stable over a sequence.
        keypoints: (K, 14, 3) float32 joints in ``KEYPOINT_NAMES`` order; zeros for non-pedestrians.
        keypoint_visibility: (K, 14) bool (see ``KEYPOINT_TOLERANCE``); False for non-pedestrians.
        frame_id: unique name of the frame.
        timestamp: seconds since the start of the sequence.
        ego_pose: (4, 4) float64 world-from-LiDAR transform.
    """

    timestamp: float
    ego_pose: np.ndarray

    BOX_COLUMNS: ClassVar[tuple[int, ...]] = (9,)
    NUM_KEYPOINTS: ClassVar[int | None] = len(KEYPOINT_NAMES)
    KEYPOINTS_REQUIRED: ClassVar[bool] = True

    def point_columns(self) -> int | None:
        return 4

    def array_fields(self) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
        return {**super().array_fields(), "ego_pose": ((4, 4), np.float64, False)}

    def __len__(self) -> int:
        """Number of labelled objects."""
        return len(self.boxes)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def make_scene(
    seed: int, num_frames: int = 1, lidar: LidarConfig | None = None, scene: SceneConfig | None = None
) -> Scene:
    """The scene of ``seed``, collision-free over ``num_frames`` frames."""
    return build_scene(_rng(seed, 0), scene, (lidar or LidarConfig()).mount_height, num_frames)


def render_frame(scene: Scene, seed: int, frame: int, lidar: Lidar, frame_id: str) -> LidarFrame:
    """Scan ``scene`` at frame index ``frame`` and label it; ``seed`` seeds the sensor noise."""
    t = scene.time(frame)
    pose = scene.ego_pose(t)
    states = scene.actors_at(t)
    world = Primitives.concat([scene.static, states.primitives])
    scan = lidar.scan(world, scene.ground, pose, _rng(seed, 1, frame))

    rot, origin = pose[:3, :3], pose[:3, 3]
    boxes = states.boxes.copy()
    boxes[:, :3] = (boxes[:, :3] - origin) @ rot
    boxes[:, 6] = wrap_angle(boxes[:, 6] - np.arctan2(rot[1, 0], rot[0, 0]))
    boxes[:, 7:9] = boxes[:, 7:9] @ rot[:2, :2]
    boxes = boxes.astype(np.float32)
    # float32 rounding can carry a heading just below pi onto pi; keep [-pi, pi).
    boxes[boxes[:, 6] >= np.float32(np.pi), 6] -= np.float32(2 * np.pi)
    # Count with the float32 boxes the frame carries, so a recount agrees point for point.
    num_points = points_in_boxes(scan.points, boxes.astype(np.float64)).sum(0)
    keep = num_points > 0
    boxes, num_points = boxes[keep], num_points[keep]

    keypoints = (states.keypoints[keep] - origin) @ rot
    keypoints[~states.has_keypoints[keep]] = 0.0
    visibility = np.zeros(keypoints.shape[:2], dtype=bool)
    humans = np.flatnonzero(states.has_keypoints[keep])
    if len(humans):
        seen = lidar.visible(keypoints[humans].reshape(-1, 3), world, scene.ground, pose, KEYPOINT_TOLERANCE)
        visibility[humans] = seen.reshape(len(humans), -1)

    return LidarFrame(
        points=scan.points,
        boxes=boxes,
        labels=states.labels[keep],
        num_points=num_points,
        difficulty=np.where(num_points <= LEVEL_2_MAX_POINTS, 2, 1).astype(np.int64),
        track_ids=states.track_ids[keep],
        keypoints=keypoints.astype(np.float32),
        keypoint_visibility=visibility,
        frame_id=frame_id,
        timestamp=float(t),
        ego_pose=pose,
    )


def generate_sequence(
    seed: int, num_frames: int, lidar: LidarConfig | None = None, scene: SceneConfig | None = None
) -> list[LidarFrame]:
    """``num_frames`` consecutive frames (at ``scene.frame_rate``) of the scene of ``seed``."""
    world = make_scene(seed, num_frames, lidar, scene)
    sensor = Lidar(lidar)
    return [render_frame(world, seed, k, sensor, f"synthetic-{seed}-{k:03d}") for k in range(num_frames)]


def generate_frame(
    seed: int, lidar: LidarConfig | None = None, scene: SceneConfig | None = None
) -> LidarFrame:
    """A single frame: the scene of ``seed`` laid out for one frame (not frame 0 of a longer sequence)."""
    return generate_sequence(seed, 1, lidar, scene)[0]
