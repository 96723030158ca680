"""A new dataset is one module and one yaml: a toy dataset written here, outside the repository,
is trained on, evaluated and tracked by the unchanged tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tool_runs import ROOT, TINY_MODEL

MODULE = "toyset_for_tests"

#: The dataset module: its class names, frames (FrameLike) and tracking source.
TOY_MODULE = '''
"""Boxes of points on flat ground, moving at constant velocity in front of a parked sensor."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset

from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.tracking import TrackingSequences

CLASS_NAMES = ("Crate", "Post")
#: class -> (nuScenes category, nuScenes tracking name): what tracking scores them as.
NUSCENES_CLASSES = {"Crate": ("vehicle.car", "car"), "Post": ("human.pedestrian.adult", "pedestrian")}
SIZES = np.array([[2.0, 1.6, 1.4], [0.6, 0.6, 1.8]])
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(kw_only=True)
class ToyFrame(FrameRecord):
    ego_pose: np.ndarray
    timestamp: float


class ToyDataset(Dataset):
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", num_frames: int = 4, sequence_length: int = 1, seed: int = 0):
        self.split, self.num_frames, self.sequence_length, self.seed = split, num_frames, sequence_length, seed

    def __len__(self) -> int:
        return self.num_frames

    @property
    def frame_ids(self) -> list[str]:
        return [f"toy-{self.split}-{i:04d}" for i in range(self.num_frames)]

    def __getitem__(self, index: int) -> ToyFrame:
        sequence, k = divmod(index, self.sequence_length)
        rng = np.random.default_rng([SPLITS[self.split], self.seed, sequence])
        labels = np.array([0, 1, 0, 1])
        start = rng.uniform(-9.0, 9.0, (4, 2))
        velocity = rng.uniform(-2.0, 2.0, (4, 2)) * np.array([[1.0], [0.3], [1.0], [0.3]])
        heading = np.arctan2(velocity[:, 1], velocity[:, 0])
        t = 0.1 * k
        size = SIZES[labels]
        boxes = np.concatenate([start + velocity * t, size[:, 2:] / 2, size, heading[:, None]], axis=1)
        point_rng = np.random.default_rng([SPLITS[self.split], self.seed, sequence, k])
        clouds = [point_rng.uniform(-16.0, 16.0, (400, 3)) * np.array([1.0, 1.0, 0.0])]
        for box in boxes:
            local = point_rng.uniform(-0.5, 0.5, (150, 3)) * box[3:6]
            c, s = np.cos(box[6]), np.sin(box[6])
            xy = local[:, :2] @ np.array([[c, s], [-s, c]]) + box[:2]
            clouds.append(np.concatenate([xy, local[:, 2:] + box[2]], axis=1))
        xyz = np.concatenate(clouds)
        points = np.concatenate([xyz, np.full((len(xyz), 1), 0.5)], axis=1).astype(np.float32)
        return ToyFrame(
            frame_id=self.frame_ids[index], points=points, boxes=boxes.astype(np.float32), labels=labels,
            num_points=np.full(4, 150), difficulty=np.ones(4, np.int64), track_ids=np.arange(4) + 10 * sequence,
            ego_pose=np.eye(4), timestamp=t,
        )


class ToyTracking:
    def __init__(self, frames: ToyDataset, num_sequences: int = 2, sequence_length: int = 3):
        self.seed, self.num_sequences, self.sequence_length = frames.seed, num_sequences, sequence_length

    def frames(self) -> ToyDataset:
        return ToyDataset("test", self.num_sequences * self.sequence_length, self.sequence_length, self.seed)

    def sequences(self, frames: ToyDataset, frame_ids) -> TrackingSequences:
        raw = [frames[i] for i in range(len(frames))]
        n = self.sequence_length
        return TrackingSequences(
            indices=[list(range(q * n, (q + 1) * n)) for q in range(self.num_sequences)],
            timestamps=[f.timestamp for f in raw],
            tracking_names={k: v[1] for k, v in NUSCENES_CLASSES.items()},
            ego_poses=[f.ego_pose for f in raw],
            categories={k: v[0] for k, v in NUSCENES_CLASSES.items()},
            range_limited=True,
        )
'''

TOY_YAML = f"""
class_names: [Crate, Post]
evaluation: voxsparse.evaluation.suites.waymo
iou_thresholds: {{Crate: 0.5, Post: 0.3}}
train: {{_target_: {MODULE}.ToyDataset, split: train, num_frames: 4}}
val: {{_target_: {MODULE}.ToyDataset, split: val, num_frames: 2}}
tracking:
  _target_: {MODULE}.ToyTracking
  frames: ${{..val}}
  num_sequences: 2
  sequence_length: 3
augmentations: []
"""


def _run(tool: str, where: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "dataset=toy", f"hydra.searchpath=[file://{where}]", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )


def test_a_dataset_in_one_module_and_one_yaml_trains_evaluates_and_tracks(tmp_path):
    where = tmp_path / "outside"
    (where / "dataset").mkdir(parents=True)
    (where / f"{MODULE}.py").write_text(textwrap.dedent(TOY_MODULE))
    (where / "dataset" / "toy.yaml").write_text(TOY_YAML)
    # By construction nothing of the repository is edited: the module and the yaml live under tmp_path.
    assert not any(MODULE in p for p in subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())

    run_dir = tmp_path / "train"
    # voxelnext_small has a per-class IoU rectifier: two classes, two values.
    train = _run("train", where, *TINY_MODEL, "model.head.iou_rectifier=[0.7,0.7]", "trainer.epochs=1", "trainer.batch_size=2", "trainer.tensorboard=false",
                 f"hydra.run.dir={run_dir}")
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"AP_L2/Crate", "AP_L2/Post"} <= set(metrics["LEVEL_2"])

    evaluated = _run("eval", where, f"checkpoint={run_dir / 'last.pth'}", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == metrics

    pytest.importorskip("nuscenes")
    pytest.importorskip("motmetrics")
    tracked = _run("track", where, f"checkpoint={run_dir / 'last.pth'}", "tracker.min_score=0.0",
                   f"hydra.run.dir={tmp_path / 'track'}")
    assert tracked.returncode == 0, tracked.stderr[-3000:]
    assert {"AMOTA", "MOTA", "IDS"} <= set(json.loads((tmp_path / "track" / "metrics.json").read_text()))
    submission = json.loads((tmp_path / "track" / "tracking_results.json").read_text())["results"]
    assert len(submission) == 6
    names = {b["tracking_name"] for frame in submission.values() for b in frame}
    assert names <= {"car", "pedestrian"}


@pytest.mark.parametrize(
    "dataset, module, names",
    [
        ("synthetic", "voxsparse.data.synthetic", "CLASS_NAMES"),
        ("waymo", "voxsparse.data.waymo.classes", "CLASS_NAMES"),
        ("nuscenes", "voxsparse.data.nuscenes", "NUSCENES_DETECTION_NAMES"),
        ("kitti", "voxsparse.data.kitti", "CLASS_NAMES"),
        ("argo2", "voxsparse.data.argo2", "CLASS_NAMES"),
    ],
)
def test_each_dataset_yaml_trains_on_its_modules_classes(dataset, module, names):
    """The module owns the class names its frames' labels index; the yaml lists the same, in order."""
    import importlib

    from tool_runs import compose_config

    cfg = compose_config("train", [f"dataset={dataset}"])
    expected = list(getattr(importlib.import_module(module), names))
    if dataset == "nuscenes":  # trains in OpenPCDet's order; prepared labels are relabelled by name
        assert sorted(cfg.dataset.class_names) == sorted(expected)
    else:
        assert list(cfg.dataset.class_names) == expected
