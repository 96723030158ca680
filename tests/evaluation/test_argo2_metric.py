"""The Argoverse 2 metric suite against ``av2.evaluation.detection.eval.evaluate`` fed with tables
built by ``av2``'s own structures and readers: the conversion of detections and annotations on
randomised cases, the suite's numbers on a tiny val split with maps (region of interest and range
pruning at work), and tools/eval.py on that split prepared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("av2")

from tests.data.argo2_writer import (
    Cuboid,
    write_annotations,
    write_calibration,
    write_map,
    write_poses,
    write_sweep,
)
from voxsparse.data.argo2 import CLASS_NAMES, frame_id, name_to_category
from voxsparse.evaluation.argo2 import (
    DETECTION_COLUMNS,
    annotations_table,
    argo2,
    detections_table,
    evaluate_argo2,
)
from voxsparse.structures import Boxes3D, Detections3D

ROOT = Path(__file__).resolve().parents[2]
LOGS = ["2f1a7c3e-55e1-4b1d-9a63-0c3f1e2d4b5a", "9d0e8b47-3c2a-4f6e-8b1d-7a5c6e4f3d21"]
CATEGORIES = ["REGULAR_VEHICLE", "PEDESTRIAN", "BOLLARD", "BUS", "ANIMAL"]  # ANIMAL is not a detection class
STAMP0 = 315966070559696000
DATASET = {"raw_root": None, "val_split": "val", "class_names": list(CLASS_NAMES), "max_range_m": 200.0,
           "roi_only": True, "eval_workers": 1}  # fmt: skip


class _Predictions:
    def __init__(self, frame_ids, detections):
        self.frame_ids, self.detections, self.annotations = frame_ids, detections, []


def _random_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 7) boxes over the whole range: some beyond 200 m, some outside the drivable area."""
    xy = rng.uniform(-230, 230, (n, 2))
    return np.column_stack(
        [xy, rng.uniform(-1, 2, n), rng.uniform(0.4, 12, (n, 3)), rng.uniform(-np.pi, np.pi, n)]
    )


def write_split(root: Path, seed: int = 0) -> dict[str, list[Cuboid]]:
    """Two logs of four sweeps; their cuboids by frame id."""
    rng = np.random.default_rng(seed)
    by_frame: dict[str, list[Cuboid]] = {}
    for k, log_id in enumerate(LOGS):
        log_dir = root / "val" / log_id
        stamps = [STAMP0 + k * 10**12 + i * 10**8 for i in range(4)]
        cuboids = []
        for stamp in stamps:
            xyz = rng.uniform([-50, -50, -2], [50, 50, 3], (300, 3))
            write_sweep(log_dir, stamp, np.column_stack([xyz, rng.integers(0, 256, 300)]), rng)
            boxes = _random_boxes(rng, 14)
            frame = [
                Cuboid(
                    stamp,
                    f"t{j}",
                    CATEGORIES[j % len(CATEGORIES)],
                    tuple(b),
                    int(rng.integers(0, 3) * rng.integers(1, 50)),
                )
                for j, b in enumerate(boxes)
            ]
            by_frame[frame_id(log_id, stamp)] = frame
            cuboids += frame
        # Ego poses turn and move; the drivable area covers part of the sweeps' surroundings only.
        write_poses(
            log_dir,
            stamps,
            [0.2 * i + k for i in range(4)],
            np.array([[1000.0 + 3 * i, 500.0, 10.0] for i in range(4)]),
        )
        write_calibration(log_dir)
        write_map(log_dir, [(900, 400), (1150, 400), (1150, 560), (900, 560)])
        write_annotations(log_dir, cuboids)
    return by_frame


def _detections(rng: np.random.Generator, cuboids: list[Cuboid]) -> Detections3D:
    """Ground truth of the classes moved by up to ~3 m, resized and turned, plus false positives."""
    gt = np.array([c.box for c in cuboids if c.category != "ANIMAL"])
    labels = [CLASS_NAMES.index(c.category.lower().capitalize()) for c in cuboids if c.category != "ANIMAL"]
    moved = gt + np.column_stack(
        [rng.normal(0, 1.2, (len(gt), 2)), rng.normal(0, 0.2, (len(gt), 4)), rng.normal(0, 0.6, len(gt))]
    )
    extra = _random_boxes(rng, 5)
    boxes = np.concatenate([moved, extra])
    boxes[:, 3:6] = np.abs(boxes[:, 3:6]) + 0.1
    boxes[:, 6] *= rng.choice([1.0, 1.0, 3.0], len(boxes))  # headings beyond [-pi, pi) too
    labels = labels + rng.integers(0, len(CLASS_NAMES), 5).tolist()
    return Detections3D(
        Boxes3D(torch.tensor(boxes, dtype=torch.float32)),
        torch.tensor(rng.uniform(0.05, 1.0, len(boxes)), dtype=torch.float32),
        torch.tensor(labels, dtype=torch.int64),
    )


def _reference_dts(frame_ids, detections) -> Any:
    """The detections table built with av2's cuboid structures (rotation matrix -> quaternion)."""
    import pandas as pd
    from av2.geometry.geometry import mat_to_quat, xyz_to_mat
    from av2.geometry.se3 import SE3
    from av2.structures.cuboid import Cuboid as Av2Cuboid

    rows = []
    for frame, det in zip(frame_ids, detections):
        log_id, _, stamp = frame.rpartition("_")
        for box, score, label in zip(
            det.boxes.tensor.double().numpy(), det.scores.double().numpy(), det.labels.numpy()
        ):
            pose = SE3(rotation=xyz_to_mat(np.array([0.0, 0.0, box[6]])), translation=box[:3])
            c = Av2Cuboid(
                pose,
                length_m=box[3],
                width_m=box[4],
                height_m=box[5],
                timestamp_ns=int(stamp),
                category=name_to_category(CLASS_NAMES[label]),
            )
            q = mat_to_quat(c.dst_SE3_object.rotation)
            rows.append(
                [
                    *c.xyz_center_m,
                    c.length_m,
                    c.width_m,
                    c.height_m,
                    *q,
                    score,
                    log_id,
                    c.timestamp_ns,
                    c.category,
                ]
            )
    return pd.DataFrame(rows, columns=list(DETECTION_COLUMNS))


def test_detections_table_matches_av2_structures():
    from av2.geometry.geometry import quat_to_mat

    rng = np.random.default_rng(5)
    frame_ids = [frame_id(LOGS[i % 2], STAMP0 + i) for i in range(6)]
    detections = []
    for i in range(6):
        n = int(rng.integers(0, 30))
        boxes = _random_boxes(rng, n)
        boxes[:, 6] *= rng.uniform(-3, 3, n)
        detections.append(Detections3D(Boxes3D(torch.tensor(boxes, dtype=torch.float32)),
                                       torch.rand(n, generator=torch.Generator().manual_seed(i)),
                                       torch.tensor(rng.integers(0, len(CLASS_NAMES), n))))  # fmt: skip
    ours = detections_table(frame_ids, detections, CLASS_NAMES)
    ref = _reference_dts(frame_ids, detections)
    assert list(ours.columns) == list(DETECTION_COLUMNS) and len(ours) == len(ref) > 0
    rest = [c for c in DETECTION_COLUMNS if c not in ("qw", "qx", "qy", "qz")]
    for c in rest:
        if ours[c].dtype == object:
            assert ours[c].tolist() == ref[c].tolist(), c
        else:
            np.testing.assert_allclose(
                ours[c].to_numpy(np.float64), ref[c].to_numpy(np.float64), rtol=0, atol=1e-12
            )
    q = ["qw", "qx", "qy", "qz"]
    np.testing.assert_allclose(quat_to_mat(ours[q].to_numpy()), quat_to_mat(ref[q].to_numpy()), atol=1e-12)
    assert ours["timestamp_ns"].dtype == np.int64


def test_annotations_table_is_av2s(tmp_path):
    from av2.utils.io import read_all_annotations

    write_split(tmp_path)
    ours = annotations_table(tmp_path / "val", LOGS)
    ref = read_all_annotations(tmp_path, "val")
    key = ["log_id", "timestamp_ns", "track_uuid"]
    ours, ref = (t.sort_values(key).reset_index(drop=True) for t in (ours, ref))
    assert ours.drop(columns="log_id").equals(ref[ours.columns.drop("log_id")].reset_index(drop=True))
    assert ours["log_id"].tolist() == ref["log_id"].tolist()


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("argo2")
    by_frame = write_split(root)
    rng = np.random.default_rng(9)
    frame_ids = list(by_frame)
    return root, frame_ids, [_detections(rng, by_frame[f]) for f in frame_ids]


@pytest.fixture
def in_process_pool(monkeypatch):
    """av2's evaluate always starts a pool of spawned processes (each imports av2 again); here the
    same calls run in this process (tools/eval.py below runs the real pool)."""
    import itertools
    import types

    import av2.evaluation.detection.eval as av2_eval

    class Pool:
        def __init__(self, processes=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def starmap(self, fn, args):
            return list(itertools.starmap(fn, args))

    context = types.SimpleNamespace(Pool=Pool)
    monkeypatch.setattr(av2_eval, "mp", types.SimpleNamespace(get_context=lambda method: context))


def test_suite_equals_av2_evaluate(val_split, in_process_pool):
    import pandas as pd
    from av2.evaluation.detection.eval import evaluate
    from av2.evaluation.detection.utils import DetectionCfg
    from av2.utils.io import read_all_annotations

    root, frame_ids, detections = val_split
    ours = argo2(_Predictions(frame_ids, detections), {**DATASET, "raw_root": str(root)})
    gts = read_all_annotations(root, "val")
    categories = sorted(set(gts["category"]) & {name_to_category(n) for n in CLASS_NAMES})
    cfg = DetectionCfg(
        categories=tuple(categories),
        dataset_dir=root / "val",
        max_range_m=200.0,
        eval_only_roi_instances=True,
    )
    _, gts_ref, metrics = evaluate(_reference_dts(frame_ids, detections), gts, cfg, n_jobs=1)
    pd.testing.assert_frame_equal(ours.metrics, metrics)
    # The case exercises the metric: some matches, and pruning by range and region of interest.
    assert 0 < ours.metrics.loc["AVERAGE_METRICS", "AP"] < 1
    assert 0 < gts_ref["is_evaluated"].sum() < (gts_ref["num_interior_pts"] > 0).sum()
    result = ours.to_dict()
    assert result["mAP"] == metrics.loc["AVERAGE_METRICS", "AP"] and "AP/Regular_vehicle" in result
    assert "Bollard" in ours.table() and "ANIMAL" not in ours.metrics.index

    # Without the region of interest, a subset of frames: the ground truth of those frames only.
    subset = {**DATASET, "raw_root": str(root), "roi_only": False, "max_range_m": 150.0}
    ours = argo2(_Predictions(frame_ids[:3], detections[:3]), subset)
    evaluated = {(f.rpartition("_")[0], int(f.rpartition("_")[2])) for f in frame_ids[:3]}
    gts = gts[[(a, int(b)) in evaluated for a, b in zip(gts["log_id"], gts["timestamp_ns"])]]
    categories = sorted(set(gts["category"]) & {name_to_category(n) for n in CLASS_NAMES})
    cfg = DetectionCfg(categories=tuple(categories), max_range_m=150.0, eval_only_roi_instances=False)
    _, _, metrics = evaluate(
        _reference_dts(frame_ids[:3], detections[:3]), gts.reset_index(drop=True), cfg, n_jobs=1
    )
    pd.testing.assert_frame_equal(ours.metrics, metrics)
    with pytest.raises(ValueError, match="needs dataset_dir"):
        evaluate_argo2(metrics, metrics, categories, roi_only=True)


def test_eval_tool_on_prepared_split(val_split, tmp_path):
    from voxsparse.data.preparation import main
    from voxsparse.data.prepared import PreparedDataset
    from voxsparse.evaluation.predictions_io import PredictionsFile, save_predictions

    root, frame_ids, _ = val_split
    out = tmp_path / "prepared"
    main(["argo2", "--root", str(root), "--out", str(out), "--splits", "val", "--workers", "1", "--quiet"])
    val = PreparedDataset(out, "val", min_points=1)
    assert val.frame_ids == frame_ids
    # The prepared boxes with interior points as detections: every evaluated cuboid is found exactly.
    detections = [
        Detections3D(
            Boxes3D(torch.from_numpy(f.boxes)),
            torch.linspace(0.9, 0.1, len(f.boxes)),
            torch.from_numpy(f.labels),
        )
        for f in val
    ]
    save_predictions(
        tmp_path / "preds.pt",
        PredictionsFile(
            frame_ids, detections, list(CLASS_NAMES), (-200.0, -200.0, -20.0, 200.0, 200.0, 20.0)
        ),
    )
    run = subprocess.run(
        [sys.executable, "tools/eval.py", "dataset=argo2", f"predictions={tmp_path / 'preds.pt'}",
         f"dataset.root={out}", f"dataset.raw_root={root}", "dataset.eval_workers=1", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # Boxes outside the region of interest or range are neither found nor missed: perfect scores.
    present = {c.lower().capitalize() for c in CATEGORIES} - {"Animal"}
    assert {k.partition("/")[2] for k in metrics if k.startswith("AP/")} == present
    assert metrics["mAP"] == 1.0 and metrics["CDS"] == pytest.approx(1.0, abs=2e-3)
    assert metrics["max_range_m"] == 200.0 and metrics["roi_only"] is True
