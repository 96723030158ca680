"""KITTI AP against the official devkit's ``evaluate_object_3d_offline`` on randomised cases.

``fixtures/kitti/kitti_ap_devkit.pt`` holds label and results files and what two versions of the
devkit computed from them (precision curves at full precision and the APs they print); its
generator ``fixtures/kitti/make_kitti_ap_fixtures.py`` builds the devkits from their public source
with g++ (its docstring gives the command). The 2020 devkit (40 recall points) must be matched on
every curve; the 2017 devkit (11 points) on every case without a ground-truth box exactly at a
minimum height (25 or 40 px), the one rule the two versions differ in.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.data.kitti_writer import CALIB_TEXT, IMAGE_SHAPE, write_frame
from voxsparse.data.kitti import KittiObjects, camera_boxes_to_lidar, image_boxes, parse_calib, parse_labels
from voxsparse.engine.evaluate import metric_suite
from voxsparse.evaluation import kitti as kitti_ap
from voxsparse.evaluation.kitti import METRICS, evaluate_kitti, score_thresholds
from voxsparse.structures import Boxes3D, Detections3D

FIXTURE = Path(__file__).parent / "fixtures" / "kitti" / "kitti_ap_devkit.pt"
CLASSES = ("Car", "Pedestrian", "Cyclist")


@pytest.fixture(scope="module")
def cases():
    data = torch.load(FIXTURE, weights_only=True)
    out = []
    for case in data["cases"]:
        gt = [parse_labels(t) for t in case["labels"]]
        det = [parse_labels(t) for t in case["results"]]
        out.append((case, gt, det, evaluate_kitti(gt, det, CLASSES)))
    return out


def _at_a_limit(gt: list[KittiObjects]) -> bool:
    return any(np.isin(g.bbox[:, 3] - g.bbox[:, 1], (25.0, 40.0)).any() for g in gt)


def test_precision_curves_match_devkit(cases):
    compared = {"2017": 0, "2020": 0}
    nonzero = 0
    for case, gt, _, result in cases:
        for version in ("2017", "2020"):
            if version == "2017" and _at_a_limit(gt):
                continue
            for m, metric in enumerate(METRICS):
                for c, name in enumerate(CLASSES):
                    curve = case[version]["curves"][metric][name.lower()]
                    if curve is None:  # the devkit evaluates only classes that were detected
                        continue
                    np.testing.assert_allclose(result.precision[m, c], np.asarray(curve), rtol=0, atol=1e-12)
                    compared[version] += 1
                    nonzero += bool(np.asarray(curve).any())
    assert compared["2020"] >= 150 and compared["2017"] >= 100 and nonzero >= 100, (compared, nonzero)


def test_printed_ap_is_r11_and_r40(cases):
    """The 2017 devkit prints R11, the 2020 devkit R40 (both as float32 sums printed with 6 decimals)."""
    stems = {"2017": ("{}_detection", "{}_detection_ground", "{}_detection_3d"),
             "2020": ("{}_detection_AP", "{}_detection_BEV_AP", "{}_detection_3D_AP")}  # fmt: skip
    checked = 0
    for case, gt, _, result in cases:
        for version, ap in (("2017", result.ap_r11), ("2020", result.ap_r40)):
            if version == "2017" and _at_a_limit(gt):
                continue
            for m, stem in enumerate(stems[version]):
                for c, name in enumerate(CLASSES):
                    printed = case[version]["printed_ap"].get(stem.format(name.lower()))
                    if printed is not None:
                        np.testing.assert_allclose(ap[m, c], printed, atol=2e-4)
                        checked += 1
    assert checked >= 250


def test_chunked_frames_give_the_same_curves(cases, monkeypatch):
    monkeypatch.setattr(kitti_ap, "_FRAMES_PER_CHUNK", 3)
    for _, gt, det, result in cases[:6]:
        np.testing.assert_array_equal(evaluate_kitti(gt, det, CLASSES).precision, result.precision)


def test_score_thresholds_follow_recall_steps():
    # 80 ground truth, 80 true positives: the first score (recall 1/80 stands for 0), then one per
    # step of 1/40 in recall (recall 2/80, 4/80, ..., 1).
    scores = np.linspace(1, 0, 80, endpoint=False)
    thresholds = score_thresholds(scores[::-1], 80)
    np.testing.assert_array_equal(thresholds, np.concatenate([scores[:1], scores[1::2]]))
    assert len(score_thresholds(np.array([0.9, 0.8]), 10)) == 2


def _scene(rng, calib, n):
    """``n`` label objects whose 2D boxes are their projected 3D boxes (so perfect detections match
    in every metric)."""
    names = [("Car", "Pedestrian", "Cyclist", "Van")[i % 4] for i in range(n)]
    sizes = {"Car": (1.5, 1.6, 3.9), "Pedestrian": (1.75, 0.6, 0.8), "Cyclist": (1.7, 0.6, 1.8), "Van": (2.2, 1.9, 5)}
    dims = np.array([sizes[k] for k in names])
    loc = np.column_stack([rng.uniform(-6, 6, n), rng.uniform(1.5, 1.8, n), rng.uniform(6, 25, n)])
    ry = rng.uniform(-np.pi, np.pi, n)
    bbox = image_boxes(loc, dims, ry, calib, IMAGE_SHAPE)
    return KittiObjects(tuple(names), np.zeros(n), np.zeros(n, np.int64), np.zeros(n), np.round(bbox, 2),
                        dims, loc, ry)  # fmt: skip


def test_suite_scores_perfect_detections(tmp_path):
    rng = np.random.default_rng(0)
    calib = parse_calib(CALIB_TEXT)
    frame_ids, detections = [], []
    for i in range(24):  # >= 40 boxes a class: fewer give fewer than 41 thresholds (module docstring)
        objects = _scene(rng, calib, 8)
        frame_id = f"{i:06d}"
        write_frame(tmp_path, frame_id, np.zeros((1, 4), np.float32), objects)
        stored = parse_labels((tmp_path / "training" / "label_2" / f"{frame_id}.txt").read_text())
        keep = np.array([n in CLASSES for n in stored.names])
        boxes = camera_boxes_to_lidar(stored.select(keep), calib)
        labels = [CLASSES.index(n) for n in stored.select(keep).names]
        detections.append(
            Detections3D(
                Boxes3D(torch.from_numpy(boxes).float()),
                torch.linspace(0.9, 0.5, len(boxes)),
                torch.tensor(labels, dtype=torch.int64),
            )
        )
        frame_ids.append(frame_id)
    dataset = {"evaluation": "voxsparse.evaluation.kitti.kitti", "raw_root": str(tmp_path), "class_names": list(CLASSES)}
    suite = metric_suite(dataset)
    result = suite(SimpleNamespace(frame_ids=frame_ids, detections=detections, annotations=[None] * len(frame_ids)), dataset)
    moderate = result.ap_r40[:, :, 1]
    assert result.num_gt[:, 1].min() > 0
    np.testing.assert_allclose(moderate, 100.0)
    assert "Car" in result.table() and result.to_dict()["Car_3d/moderate_R40"] == pytest.approx(100.0)
    # Every detection moved 1 m forward: cars (3D overlap > 0.7) are missed.
    for d in detections:
        d.boxes.tensor[:, 0] += 1.0
    moved = suite(SimpleNamespace(frame_ids=frame_ids, detections=detections, annotations=[None] * len(frame_ids)), dataset)
    assert moved.ap_r40[2, 0, 1] < 50.0
