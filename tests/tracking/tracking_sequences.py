"""Synthetic tracking sequences with known ids (no point clouds: only what tracking needs)."""

from __future__ import annotations

import math

import numpy as np
import torch

from voxsparse.data.synthetic import CLASS_NAMES, NUSCENES_CLASSES
from voxsparse.evaluation.nuscenes_tracking import (
    TrackingFrame,
    detections_to_global,
    evaluate_nuscenes_tracking,
    export_tracking_submission,
    write_tracking_dataset,
)
from voxsparse.geometry import RigidTransform
from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker
from voxsparse.structures import Annotations3D, Boxes3D, Detections3D

DT = 0.1
SIZES = {0: (4.5, 1.9, 1.6), 1: (0.7, 0.7, 1.8), 2: (1.8, 0.6, 1.7)}
SPEEDS = {0: 8.0, 1: 1.4, 2: 5.0}

#: The synthetic classes as nuScenes categories, for the written ground truth.
CATEGORIES = {k: v[0] for k, v in NUSCENES_CLASSES.items()}


def make_sequences(num_sequences: int = 2, num_frames: int = 12, seed: int = 0) -> list[list[TrackingFrame]]:
    """Objects of every class at constant velocity, some entering late or leaving early; the ego
    drives along its heading, so LiDAR-frame motion differs from world motion."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_sequences):
        ego_yaw, ego_speed = rng.uniform(-math.pi, math.pi), rng.uniform(0, 10)
        ego_v = ego_speed * np.array([math.cos(ego_yaw), math.sin(ego_yaw)])
        objects = []
        for tid in range(9):
            label = tid % 3
            heading = rng.uniform(-math.pi, math.pi)
            start = int(rng.integers(0, num_frames // 3)) if tid % 4 == 3 else 0
            stop = num_frames - int(rng.integers(0, num_frames // 3)) if tid % 4 == 1 else num_frames
            objects.append(
                {
                    "tid": 100 + tid,
                    "label": label,
                    "xy": rng.uniform(-25, 25, 2),
                    "heading": heading,
                    "v": SPEEDS[label] * np.array([math.cos(heading), math.sin(heading)]),
                    "frames": range(start, stop),
                }
            )
        frames = []
        for k in range(num_frames):
            t = k * DT
            pose = np.eye(4)
            c, s = math.cos(ego_yaw), math.sin(ego_yaw)
            pose[:2, :2] = [[c, -s], [s, c]]
            pose[:2, 3] = ego_v * t
            pose[2, 3] = 1.8
            world_to_lidar = np.linalg.inv(pose)
            rows, labels, ids = [], [], []
            for o in objects:
                if k not in o["frames"]:
                    continue
                xy = world_to_lidar[:2, :2] @ (o["xy"] + o["v"] * t) + world_to_lidar[:2, 3]
                v = world_to_lidar[:2, :2] @ o["v"]
                rows.append([*xy, -0.9, *SIZES[o["label"]], o["heading"] - ego_yaw, *v])
                labels.append(o["label"])
                ids.append(o["tid"])
            boxes = torch.tensor(rows, dtype=torch.float64).reshape(-1, 9)
            boxes[:, 6] = torch.remainder(boxes[:, 6] + math.pi, 2 * math.pi) - math.pi
            n = len(rows)
            annotations = Annotations3D(
                Boxes3D(boxes.float()),
                torch.tensor(labels, dtype=torch.long),
                torch.full((n,), 50, dtype=torch.long),
                torch.ones(n, dtype=torch.long),
                torch.tensor(ids, dtype=torch.long),
            )
            frames.append(TrackingFrame(annotations, pose, t))
        sequences.append(frames)
    return sequences


def perfect_detections(frame: TrackingFrame, rng: np.random.Generator) -> Detections3D:
    """Ground truth as detections, scores in (0.5, 1)."""
    a = frame.annotations
    return Detections3D(a.boxes, torch.from_numpy(rng.uniform(0.5, 1.0, len(a))).float(), a.labels)


def score_tracks(tmp_path, sequences, detections, config: TrackerConfig | None = None, seven_columns=False):
    """Track ``detections`` (per sequence, per frame, LiDAR frame) and score them with the devkit."""
    data = write_tracking_dataset(tmp_path / "gt", sequences, CLASS_NAMES, CATEGORIES)
    tracker = VoxelNeXtTracker(CLASS_NAMES, config)
    tracks, tokens = [], []
    for frames, dets, seq_tokens in zip(sequences, detections, data.sample_tokens):
        world = []
        for det, token in zip(dets, seq_tokens):
            if seven_columns:
                det = Detections3D(Boxes3D(det.boxes.tensor[:, :7]), det.scores, det.labels, query_xy=det.query_xy)
            world.append(detections_to_global(det, data.lidar_to_global[token]))
        tracks += tracker.track_sequence(world, [f.timestamp for f in frames])
        tokens += seq_tokens
    identity = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    path = tmp_path / "tracks.json"
    names = [NUSCENES_CLASSES[n][1] for n in CLASS_NAMES]
    export_tracking_submission(tracks, tokens, names, {t: identity for t in tokens}, path)
    return evaluate_nuscenes_tracking(
        data.tiny.dataroot, data.tiny.version, path, data.split, tmp_path / "eval"
    ), tracks
