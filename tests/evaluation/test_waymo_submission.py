"""Waymo ``Objects`` ``.bin`` files: predictions written by us and read back by the official protos, a
ground-truth file (written here with the official protos, as Waymo's ``gt.bin``) read with the v1
reader's label rules, and ``tools/eval.py gt=... predictions=...`` scoring equal to the in-memory metric.

The expected ground truth is built in memory first and its rules (signs dropped, empty boxes
dropped, LEVEL_2 when unlabelled and at most 5 points) applied here by hand.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

metrics_pb2 = pytest.importorskip("waymo_open_dataset.protos.metrics_pb2")

from voxsparse.engine.evaluate import report, score_waymo_files
from voxsparse.evaluation.detection import FrameGroundTruth, evaluate_detection_levels
from voxsparse.evaluation.suites import GroupedResult
from voxsparse.evaluation.waymo_submission import (
    SubmissionInfo,
    frame_key,
    objects_from_detections,
    read_objects,
    score_objects,
    submission_from_objects,
    write_objects,
)
from voxsparse.structures import Boxes3D, Detections3D

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["Vehicle", "Pedestrian", "Cyclist"]
WAYMO_TYPE = {0: 1, 1: 2, 2: 4}  # our label -> Label.Type
SIZES = {0: (4.5, 2.0, 1.7), 1: (0.8, 0.8, 1.8), 2: (1.8, 0.7, 1.7)}
FRAMES = [
    "10017090168044687777_6380_000_6400_000_1550000000000000",
    "10017090168044687777_6380_000_6400_000_1550000000100000",
    "2834723872874_1000_000_1020_000_1550000100000000",
    "2834723872874_1000_000_1020_000_1550000100100000",  # no ground truth: predictions are FPs
]


def scene(seed: int = 0):
    """(ground-truth Objects, in-memory ground truth, in-memory detections) over FRAMES."""
    rng = np.random.default_rng(seed)
    gt_objects = metrics_pb2.Objects()
    truths, found = [], []
    for f, frame_id in enumerate(FRAMES):
        context, stamp = frame_key(frame_id)
        n = 0 if f == 3 else 14
        labels = rng.integers(0, 3, n)
        centre = np.stack([rng.uniform(-70, 70, n), rng.uniform(-70, 70, n), rng.uniform(0, 2, n)], axis=1)
        boxes = np.concatenate(
            [
                centre,
                np.array([SIZES[int(c)] for c in labels]).reshape(n, 3),
                rng.uniform(-np.pi, np.pi, (n, 1)),
            ],
            axis=1,
        )
        points = rng.choice([0, 3, 5, 6, 40], n)
        human = rng.choice([0, 0, 1, 2], n)
        kept = points > 0
        for i in range(n):
            entry = gt_objects.objects.add(context_name=context, frame_timestamp_micros=stamp)
            label = entry.object
            b = label.box
            b.center_x, b.center_y, b.center_z, b.length, b.width, b.height, b.heading = map(float, boxes[i])
            label.type = WAYMO_TYPE[int(labels[i])]
            label.id = f"{context}-{f}-{i}"
            label.num_lidar_points_in_box = int(points[i])
            label.detection_difficulty_level = int(human[i])
        if n:  # signs are not scored
            sign = gt_objects.objects.add(context_name=context, frame_timestamp_micros=stamp)
            sign.object.type, sign.object.num_lidar_points_in_box = 3, 50
            sign.object.box.length = sign.object.box.width = sign.object.box.height = 1.0
        level = np.where(human > 0, human, np.where(points <= 5, 2, 1))
        truths.append(
            FrameGroundTruth(
                torch.from_numpy(boxes[kept].astype(np.float32)),
                torch.from_numpy(labels[kept]),
                torch.from_numpy(level[kept]),
            )
        )
        # Predictions: most objects found with a perturbed box, plus false positives.
        hit = rng.uniform(size=n) < 0.8
        noise = np.concatenate(
            [rng.normal(0, 0.15, (n, 3)), rng.normal(0, 0.05, (n, 3)), rng.normal(0, 0.2, (n, 1))], 1
        )
        fp = 3
        fp_labels = rng.integers(0, 3, fp)
        fp_boxes = np.concatenate(
            [
                rng.uniform(-60, 60, (fp, 2)),
                np.ones((fp, 1)),
                np.array([SIZES[int(c)] for c in fp_labels]),
                np.zeros((fp, 1)),
            ],
            axis=1,
        )
        pred_boxes = np.concatenate([(boxes + noise)[hit], fp_boxes]).astype(np.float32)
        pred_labels = np.concatenate([labels[hit], fp_labels])
        scores = rng.uniform(0.05, 1.0, len(pred_boxes)).astype(np.float32)
        order = np.argsort(-scores, kind="stable")
        found.append(
            Detections3D(
                Boxes3D(torch.from_numpy(pred_boxes[order])),
                torch.from_numpy(scores[order]),
                torch.from_numpy(pred_labels[order]),
            )
        )
    return gt_objects, truths, found


def test_frame_ids_split_into_context_and_timestamp():
    assert frame_key(FRAMES[0]) == ("10017090168044687777_6380_000_6400_000", 1550000000000000)
    with pytest.raises(ValueError, match="expected '<context_name>_<timestamp_micros>'"):
        frame_key("no-timestamp")


def test_written_objects_read_back_by_the_official_protos(tmp_path):
    _, _, found = scene()
    # Velocities and track ids go to metadata and object.id.
    with_speed = Detections3D(
        Boxes3D(torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.25, 3.0, -1.0]])),
        torch.tensor([0.75]),
        torch.tensor([2]),
        track_ids=torch.tensor([42]),
    )
    path = write_objects(
        tmp_path / "preds.bin", objects_from_detections(FRAMES + ["ctx_7"], found + [with_speed], NAMES)
    )
    official = metrics_pb2.Objects.FromString(path.read_bytes())
    entries = list(official.objects)
    assert len(entries) == sum(len(d) for d in found) + 1
    start = 0
    for frame_id, dets in zip(FRAMES, found):
        context, stamp = frame_key(frame_id)
        part = entries[start : start + len(dets)]
        start += len(dets)
        assert all(e.context_name == context and e.frame_timestamp_micros == stamp for e in part)
        np.testing.assert_array_equal(
            np.array([e.score for e in part], dtype=np.float32), dets.scores.numpy()
        )
        box = np.array([[getattr(e.object.box, k) for k in (
            "center_x", "center_y", "center_z", "length", "width", "height", "heading")] for e in part])  # fmt: skip
        np.testing.assert_array_equal(box, dets.boxes.tensor.numpy().astype(np.float64))
        assert [e.object.type for e in part] == [WAYMO_TYPE[int(c)] for c in dets.labels]
    last = entries[-1]
    assert (last.context_name, last.frame_timestamp_micros, last.object.type, last.object.id) == (
        "ctx",
        7,
        4,
        "42",
    )
    assert (last.object.metadata.speed_x, last.object.metadata.speed_y) == (3.0, -1.0)
    with pytest.raises(ValueError, match=r"class names \['Truck'\] have no Waymo object type"):
        objects_from_detections(FRAMES[:1], found[:1], ["Vehicle", "Truck", "Cyclist"])


def test_submission_wraps_the_objects_with_the_method_metadata(tmp_path):
    submission_pb2 = pytest.importorskip("waymo_open_dataset.protos.submission_pb2")
    _, _, found = scene()
    objects = objects_from_detections(FRAMES, found, NAMES)
    info = SubmissionInfo("me@example.com", "voxelnext", ["A. Author"], "Lab", latency_second=0.05)
    path = write_objects(tmp_path / "submission.bin", submission_from_objects(objects, info))
    official = submission_pb2.Submission.FromString(path.read_bytes())
    assert official.task == submission_pb2.Submission.DETECTION_3D
    assert official.sensor_type == submission_pb2.Submission.LIDAR_ALL
    assert (official.account_name, official.unique_method_name, list(official.authors)) == (
        "me@example.com", "voxelnext", ["A. Author"])  # fmt: skip
    assert list(official.object_types) == [1, 2, 4] and official.latency_second == pytest.approx(0.05)
    assert official.inference_results == objects


def same(a, b) -> bool:
    """Equality of nested dicts / sequences of numbers, nan equal to nan."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def test_submission_scores_equal_the_in_memory_metric(tmp_path):
    gt_objects, truths, found = scene()
    gt_path = write_objects(tmp_path / "gt.bin", gt_objects)
    pred_path = write_objects(tmp_path / "preds.bin", objects_from_detections(FRAMES, found, NAMES))
    expected = evaluate_detection_levels(found, truths, NAMES)
    got = score_objects(read_objects(gt_path), read_objects(pred_path))
    assert same(got.to_dict(), {f"LEVEL_{k}": v.to_dict() for k, v in expected.items()})
    # The scene exercises the rules: FPs in a frame without ground truth, LEVEL_2 by points and by label.
    assert expected[2].num_gt["Vehicle"] > expected[1].num_gt["Vehicle"] > 0
    assert 0.2 < expected[2].ap["Vehicle"] < 1.0
    assert got.parts["LEVEL_2"].num_pred == expected[2].num_pred
    # Through the engine's entry point, as tools/eval.py calls it.
    assert same(score_waymo_files(gt_path, pred_path).to_dict(), got.to_dict())
    with pytest.raises(ValueError, match="give predictions=PATH, a Waymo Objects .bin"):
        score_waymo_files(gt_path, tmp_path / "preds.pt")
    (tmp_path / "bad.bin").write_bytes(b"\x07garbage")
    with pytest.raises(ValueError, match=r"bad.bin: not a waymo.open_dataset.Objects file"):
        read_objects(tmp_path / "bad.bin")


def test_eval_tool_scores_bin_files(tmp_path):
    gt_objects, truths, found = scene(1)
    gt_path = write_objects(tmp_path / "gt.bin", gt_objects)
    pred_path = write_objects(tmp_path / "preds.bin", objects_from_detections(FRAMES, found, NAMES))
    run = subprocess.run(
        [sys.executable, "tools/eval.py", f"gt={gt_path}", f"predictions={pred_path}", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    expected = evaluate_detection_levels(found, truths, NAMES)
    want = report(GroupedResult({f"LEVEL_{k}": v for k, v in expected.items()}), tmp_path / "memory")
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == want
