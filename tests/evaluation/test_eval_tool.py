"""The eval tool's suite selection, predictions-file rules and reporting.

tests/engine/test_training.py already runs tools/eval.py on a checkpoint and on a predictions
file, and checks the missing-frame error; here: the rules one by one, in process, and one run of
the tool that scores hand-made predictions with ``missing_frames=miss``.
"""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.engine.evaluate import frames_from_file, metric_suite, relabel, report
from voxsparse.evaluation import suites
from voxsparse.evaluation.detection import RANGE_NAMES, FrameGroundTruth, evaluate_detection_levels
from voxsparse.evaluation.predictions_io import PredictionsFile, load_predictions, save_predictions
from voxsparse.evaluation.suites import GroupedResult
from voxsparse.structures import Boxes3D, Detections3D

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["Vehicle", "Pedestrian", "Cyclist"]
RANGE = (-75.0, -75.0, -3.0, 75.0, 75.0, 3.0)


def detections(labels: list[int], x: float = 0.0) -> Detections3D:
    n = len(labels)
    boxes = torch.tensor([[x + 10.0 * i, 0.0, 0.0, 4.0, 2.0, 1.5, 0.0] for i in range(n)]).reshape(-1, 7)
    return Detections3D(Boxes3D(boxes), torch.full((n,), 0.5), torch.tensor(labels, dtype=torch.int64))


def content(frame_ids: list[str], labels: list[list[int]], class_names: list[str]) -> PredictionsFile:
    return PredictionsFile(frame_ids, [detections(lab) for lab in labels], class_names, RANGE)


# ---------------------------------------------------------------- predictions-file rules


def test_class_names_are_mapped_by_name():
    # The file orders its classes differently from the dataset: label 0 of the file is "Cyclist".
    file = content(["a", "b"], [[0, 1], [2]], ["Cyclist", "Vehicle", "Pedestrian"])
    frames = frames_from_file(file, ["a", "b"], NAMES)
    assert frames[0].labels.tolist() == [2, 0] and frames[1].labels.tolist() == [1]
    torch.testing.assert_close(frames[0].boxes.tensor, file.detections[0].boxes.tensor)


def test_unknown_class_names_are_an_error_listing_them():
    file = content(["a"], [[0]], ["Vehicle", "Sign", "Truck"])
    with pytest.raises(ValueError, match=r"preds\.pt: unknown class names \['Sign', 'Truck'\]"):
        frames_from_file(file, ["a"], NAMES, source="preds.pt")


def test_missing_frames_are_an_error_by_default():
    file = content(["a", "c"], [[0], [1]], NAMES)
    with pytest.raises(
        ValueError, match=r"preds\.pt: 1 of 3 frames of the evaluated split have no entry .*'b'"
    ):
        frames_from_file(file, ["a", "b", "c"], NAMES, source="preds.pt")


def test_missing_frames_can_count_as_misses():
    file = content(["a", "c", "z"], [[0], [1], [2]], NAMES)  # "z" is not in the split: ignored
    frames = frames_from_file(file, ["a", "b", "c"], NAMES, missing_frames="miss")
    assert [len(f) for f in frames] == [1, 0, 1]
    # The missing frame's GT are then false negatives: 2 of 3 vehicles found, precision 1.
    gt = [FrameGroundTruth(f.boxes.tensor, torch.zeros(1, dtype=torch.int64)) for f in (detections([0]),) * 3]
    frames = [Detections3D(f.boxes, f.scores, torch.zeros_like(f.labels)) for f in frames]
    assert evaluate_detection_levels(frames, gt, NAMES)[2].ap["Vehicle"] == pytest.approx(2 / 3)


def test_repeated_frames_and_bad_rule_are_errors():
    with pytest.raises(ValueError, match=r"listed more than once: \['a'\]"):
        frames_from_file(content(["a", "a"], [[0], [0]], NAMES), ["a"], NAMES)
    with pytest.raises(ValueError, match="missing_frames must be one of"):
        frames_from_file(content(["a"], [[0]], NAMES), ["a"], NAMES, missing_frames="skip")


def test_relabel_keeps_identical_orders():
    dets = [detections([0, 2])]
    assert relabel(dets, NAMES, NAMES, "x")[0] is dets[0]


def _raw_file(path: Path, **changes) -> Path:
    data = {
        "frame_ids": ["a"],
        "class_names": NAMES,
        "point_cloud_range": list(RANGE),
        "boxes": torch.zeros(2, 7) + torch.tensor([0.0, 0, 0, 4, 2, 1.5, 0]),
        "scores": torch.tensor([0.9, 0.5]),
        "labels": torch.tensor([0, 1]),
        "frame_index": torch.tensor([0, 0]),
    }
    data.update(changes)
    torch.save(data, path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"boxes": torch.zeros(2, 8)}, r"Boxes3D\.tensor: expected last dimension in \(7, 9\)"),
        ({"scores": torch.tensor([0.9, math.nan])}, r"Detections3D\.scores: 1 row\(s\) contain NaN or inf"),
    ],
)
def test_malformed_predictions_file_names_file_and_field(tmp_path, changes, message):
    path = _raw_file(tmp_path / "bad.pt", **changes)
    with pytest.raises(ValueError, match=rf"predictions file {path}: .*{message}"):
        load_predictions(path)


# ---------------------------------------------------------------- suites and the report


def test_suite_comes_from_the_dataset_config():
    assert metric_suite({"evaluation": "voxsparse.evaluation.suites.waymo"}) is suites.waymo
    assert metric_suite({"evaluation": "voxsparse.evaluation.suites.nuscenes"}) is suites.nuscenes
    with pytest.raises(ValueError, match=r"dataset\.evaluation='kitti'.*dotted path.*voxsparse\.evaluation"):
        metric_suite({"evaluation": "kitti"})
    with pytest.raises(ValueError, match=r"dataset\.evaluation='os\.system'"):
        metric_suite({"evaluation": "os.system"})  # nothing outside voxsparse.evaluation is imported
    with pytest.raises(ValueError, match="no metric suite module voxsparse.evaluation.lidar_x"):
        metric_suite({"evaluation": "voxsparse.evaluation.lidar_x.suite"})
    with pytest.raises(ValueError, match="has no metric suite function 'kitti'"):
        metric_suite({"evaluation": "voxsparse.evaluation.suites.kitti"})
    with pytest.raises(ValueError, match="no 'evaluation' key"):
        metric_suite({"class_names": NAMES})


def test_report_writes_every_number_and_nan_as_null(tmp_path, caplog):
    dets = [detections([0])]
    gt = [FrameGroundTruth(dets[0].boxes.tensor, torch.zeros(1, dtype=torch.int64))]
    levels = evaluate_detection_levels(dets, gt, NAMES)
    result = GroupedResult({f"LEVEL_{k}": m for k, m in levels.items()})
    with caplog.at_level(logging.INFO, logger="voxsparse.engine.evaluate"):
        content_ = report(result, tmp_path)
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == content_ and set(written) == {"LEVEL_1", "LEVEL_2"}
    level2 = written["LEVEL_2"]
    assert level2["AP_L2/Vehicle"] == pytest.approx(1.0) and level2["AP_L2/Vehicle/0-30m"] == pytest.approx(
        1.0
    )
    assert level2["AP_L2/Pedestrian"] is None and level2["AP_L2/Vehicle/50m+"] is None
    assert level2["num_gt_L2/Vehicle/0-30m"] == 1
    assert len(level2) == len(levels[2].to_dict())
    assert all(name in caplog.text for name in RANGE_NAMES) and "LEVEL_1" in caplog.text


# ---------------------------------------------------------------- the tool, end to end


def test_eval_tool_scores_a_predictions_file_with_missing_frames(tmp_path):
    # Perfect predictions for frames 1 and 2 of the split, frame 0 left out of the file.
    cache = tmp_path / "cache"
    val = DetectionDataset(SyntheticDataset("val", 3, seed=0, cache_dir=cache), RANGE)
    samples = [val[i] for i in range(3)]
    kept = samples[1:]
    file = PredictionsFile(
        [s.frame_id for s in kept],
        [
            Detections3D(s.annotations.boxes, torch.full((len(s.annotations),), 0.9), s.annotations.labels)
            for s in kept
        ],
        NAMES,
        RANGE,
    )
    save_predictions(tmp_path / "preds.pt", file)
    run = subprocess.run(
        [
            sys.executable, "tools/eval.py", f"predictions={tmp_path / 'preds.pt'}", "missing_frames=miss",
            "dataset.val.num_frames=3", f"dataset.cache_dir={cache}", f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "1 of 3 frames have no entry" in log and "30-50m" in log, log
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())

    def count(items, c, level):
        return sum(
            int(((s.annotations.labels == c) & (s.annotations.difficulty <= level)).sum()) for s in items
        )

    checked = 0
    for c, name in enumerate(NAMES):
        found = count(kept, c, 2)  # every GT of the listed frames, LEVEL_2 ones too, is a TP
        for level in (1, 2):
            missed = count(samples[:1], c, level)
            value = metrics[f"LEVEL_{level}"][f"AP_L{level}/{name}"]
            if found + missed == 0:
                assert value is None
            else:  # precision 1 up to recall found / (found + missed): AP is that recall
                assert value == pytest.approx(found / (found + missed), abs=1e-6)
                checked += 1
    assert checked >= 2


def test_keypoint_model_predictions_are_scored_by_both_suites():
    """score_model_predictions (train.py and eval.py): ground truth returned as the predictions of a
    keypoint model scores detection AP 1 and keypoint PEM 0, under "detection" and "keypoints"."""
    from voxsparse.data.dataset import DetectionDataset
    from voxsparse.data.synthetic import SyntheticDataset
    from voxsparse.engine.evaluate import score_model_predictions
    from voxsparse.engine.inference import DatasetPredictions
    from voxsparse.models.voxelkp.structures import KeypointDetections3D

    names = ["Vehicle", "Pedestrian", "Cyclist"]
    frames = DetectionDataset(SyntheticDataset("val", 2, seed=5), (-30, -30, -3, 30, 30, 2))
    samples = [frames[i] for i in range(len(frames))]
    detections = []
    for s in samples:
        a = s.annotations
        detections.append(KeypointDetections3D(
            boxes=a.boxes, scores=torch.linspace(0.9, 0.5, len(a.labels)), labels=a.labels,
            keypoints=a.keypoints, keypoint_scores=a.keypoint_visibility.float(),
        ))
    assert sum(int((s.annotations.labels == 1).sum()) for s in samples) > 0, "the frames hold pedestrians"
    dataset = {"evaluation": "voxsparse.evaluation.suites.waymo", "class_names": names, "iou_thresholds": {"Vehicle": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}}
    predictions = DatasetPredictions([s.frame_id for s in samples], detections, [s.annotations for s in samples])
    result = score_model_predictions(predictions, names, dataset, "test", keypoint_labels=[1]).to_dict()
    assert result["keypoints"]["PEM"] == pytest.approx(0.0, abs=1e-6) and result["keypoints"]["num_tp"] > 0
    assert result["detection"]["LEVEL_1"]["AP_L1/Pedestrian"] == pytest.approx(1.0)
