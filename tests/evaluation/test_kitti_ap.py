"""KITTI AP against the official devkit's ``evaluate_object_3d_offline`` on randomised cases.

``fixtures/kitti/kitti_ap_devkit.pt`` holds label and results files and what two versions of the
devkit computed from them (precision curves at full precision and the APs they print); its
generator ``fixtures/kitti/make_kitti_ap_fixtures.py`` builds the devkits from their public source
with g++ (its docstring gives the command). The 2020 devkit (40 recall points) must be matched on
every curve; the 2017 devkit (11 points) on every case without a ground-truth box exactly at a
minimum height (25 or 40 px), the one rule the two versions differ in. With ``VOXSPARSE_OPENPCDET``
naming an OpenPCDet checkout, R11 and R40 are also compared with its ``kitti_object_eval_python``
loaded by path (numba's jit as plain Python, its CUDA rotated overlap replaced by voxsparse's).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
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
from voxsparse.ops.boxes import bev_iou
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


@pytest.fixture
def openpcdet_eval(monkeypatch):
    """OpenPCDet's ``kitti_object_eval_python/eval.py`` loaded by path from ``VOXSPARSE_OPENPCDET``:
    numba's ``jit`` is the identity (plain Python), and its CUDA rotated overlap is replaced by
    voxsparse's exact one in its box convention (x, z, l, w, angle; corners rotated by -angle)."""
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout to compare with its KITTI evaluation")
    package = "pcdet.datasets.kitti.kitti_object_eval_python"
    folder = Path(root) / package.replace(".", "/")
    parts = package.split(".")
    for i in range(1, len(parts) + 1):
        stub = types.ModuleType(".".join(parts[:i]))
        stub.__path__ = [str(Path(root).joinpath(*parts[:i]))]
        monkeypatch.setitem(sys.modules, stub.__name__, stub)

    def jit(*args, **kwargs):
        return args[0] if args and callable(args[0]) else (lambda f: f)

    monkeypatch.setitem(sys.modules, "numba", types.SimpleNamespace(jit=jit, prange=range))

    def rotate_iou(boxes, query_boxes, criterion=-1):
        def ours(b):
            b = torch.as_tensor(np.asarray(b, np.float64))
            zero = torch.zeros(len(b), dtype=torch.float64)
            return torch.stack([b[:, 0], b[:, 1], zero, b[:, 2], b[:, 3], zero + 1, -b[:, 4]], 1)

        a, q = ours(boxes), ours(query_boxes)
        iou = bev_iou(a, q).numpy()
        area_a, area_q = (a[:, 3] * a[:, 4]).numpy()[:, None], (q[:, 3] * q[:, 4]).numpy()[None, :]
        inter = iou * (area_a + area_q) / (1 + iou)
        return {-1: iou, 0: inter / area_a, 1: inter / area_q, 2: inter}[criterion]

    rotate = types.ModuleType(f"{package}.rotate_iou")
    rotate.rotate_iou_gpu_eval = rotate_iou
    monkeypatch.setitem(sys.modules, rotate.__name__, rotate)
    spec = importlib.util.spec_from_file_location(f"{package}.eval", folder / "eval.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def _openpcdet_anno(o: KittiObjects) -> dict:
    anno = {"name": np.array(o.names), "truncated": o.truncated, "occluded": o.occluded, "alpha": o.alpha,
            "bbox": o.bbox, "dimensions": o.dimensions[:, [2, 0, 1]], "location": o.location,
            "rotation_y": o.rotation_y, "score": np.zeros(len(o)) if o.score is None else o.score}  # fmt: skip
    return anno


def test_matches_openpcdet_evaluation(cases, openpcdet_eval):
    """R11 and R40 as OpenPCDet's Python evaluation computes them (every second case, for time)."""
    min_overlaps = np.array([[[0.7, 0.5, 0.5]] * 3])  # (1, metrics, classes)
    largest = 0.0
    for case, gt, det, result in cases[::2]:
        theirs = openpcdet_eval.do_eval(
            [_openpcdet_anno(g) for g in gt], [_openpcdet_anno(d) for d in det], [0, 1, 2], min_overlaps
        )
        for m in range(len(METRICS)):
            for ours, reference in ((result.ap_r11[m], theirs[m][:, :, 0]), (result.ap_r40[m], theirs[4 + m][:, :, 0])):
                largest = max(largest, float(np.abs(ours - reference).max()))
    assert largest < 1e-9


def test_results_files_round_trip(cases, tmp_path):
    """Detections written as results files read back as the devkit reads them, and score the same."""
    _, gt, det, result = cases[1]
    ids = [f"{i:06d}" for i in range(len(det))]
    kitti_ap.write_results(tmp_path, ids, det)
    back = [parse_labels((tmp_path / f"{i}.txt").read_text()) for i in ids]
    np.testing.assert_array_equal(evaluate_kitti(gt, back, CLASSES).precision, result.precision)
