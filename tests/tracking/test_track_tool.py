"""tools/track.py end to end, and real synthetic-world sequences through the tracking devkit."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")
pytest.importorskip("motmetrics")

from tool_runs import save_tiny_checkpoint
from tracking_sequences import perfect_detections, score_tracks

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.evaluation.nuscenes_tracking import TrackingFrame

ROOT = Path(__file__).resolve().parents[2]
RANGE = (-16.0, -16.0, -3.0, 16.0, 16.0, 2.0)


def test_synthetic_world_ground_truth_tracks_perfectly(tmp_path):
    """Real frames (moving ego, occlusions, objects entering the range): the truth scores AMOTA 1."""
    raw = SyntheticDataset("test", 8, seed=5, sequence_length=4, cache_dir=tmp_path / "cache")
    cropped = DetectionDataset(raw, RANGE)
    frames = [TrackingFrame(cropped[i].annotations, raw[i].ego_pose, raw[i].timestamp) for i in range(8)]
    sequences = [frames[:4], frames[4:]]
    rng = np.random.default_rng(0)
    detections = [[perfect_detections(f, rng) for f in seq] for seq in sequences]
    metrics, _ = score_tracks(tmp_path, sequences, detections)
    assert metrics.overall["AMOTA"] == pytest.approx(1.0)
    assert metrics.overall["IDS"] == 0 and metrics.overall["TP"] > 10
    assert metrics.overall["AMOTP"] < 1e-3


def test_track_tool_writes_tracks_and_metrics(tmp_path):
    save_tiny_checkpoint(tmp_path / "model.pth", "model.head.score_threshold=0.0")  # keep weak detections
    run = subprocess.run(
        [
            sys.executable, "tools/track.py", f"checkpoint={tmp_path / 'model.pth'}",
            "dataset.tracking.num_sequences=1", "dataset.tracking.sequence_length=3",
            f"dataset.cache_dir={tmp_path / 'cache'}", "tracker.min_score=0.0", f"hydra.run.dir={tmp_path / 'run'}",
        ],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"AMOTA", "AMOTP", "MOTA", "IDS"} <= set(metrics)
    submission = json.loads((tmp_path / "run" / "tracking_results.json").read_text())["results"]
    assert len(submission) == 3
    boxes = [b for frame in submission.values() for b in frame]
    assert boxes and all({"tracking_id", "tracking_name", "tracking_score"} <= set(b) for b in boxes)


def test_visualize_tracks_in_the_world_and_draws_in_the_lidar_frame():
    """tools/visualize.py track=true: a parked car seen from a moving ego keeps one id, boxes unmoved."""
    from voxsparse.structures import Boxes3D, Detections3D
    from voxsparse.viz import app

    frames, detections = [], []
    for k in range(6):  # ego drives +x at 10 m/s; the car stands at world x = 20
        pose = np.eye(4)
        pose[0, 3] = 1.0 * k
        frames.append({"ego_pose": pose, "timestamp": 0.1 * k})
        box = torch.tensor([[20.0 - 1.0 * k, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0]])
        detections.append(Detections3D(Boxes3D(box), torch.tensor([0.9]), torch.tensor([0])))
    tracked = app._tracked(lambda i: detections[i], frames, ["Vehicle", "Pedestrian", "Cyclist"], 0.3)
    out = [tracked(k) for k in range(6)]
    assert len({int(d.track_ids[0]) for d in out}) == 1
    for d, det in zip(out, detections):
        torch.testing.assert_close(d.boxes.tensor.float(), det.boxes.tensor, atol=1e-5, rtol=0)
