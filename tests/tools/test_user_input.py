"""The command-line tools on a user's own files: scans read right, checkpoints that cannot run code,
and bad input reported in one line that names the file or key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tool_runs import error_line, run_tool

from voxsparse.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from voxsparse.evaluation.predictions_io import load_predictions


def _scan(n: int, seed: int = 0, columns: int = 5) -> np.ndarray:
    """A ring of returns around the sensor: x, y, z, intensity 0-255, ring index (nuScenes layout)."""
    rng = np.random.default_rng(seed)
    angle, dist = rng.uniform(-np.pi, np.pi, n), rng.uniform(3.0, 14.0, n)
    cols = [dist * np.cos(angle), dist * np.sin(angle), rng.uniform(-1.5, 0.5, n), rng.integers(0, 256, n),
            rng.integers(0, 32, n)]
    return np.stack(cols[:columns], 1).astype(np.float32)


# --- checkpoints that try to run code ---------------------------------------------------------------


@pytest.fixture(scope="module")
def malicious(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of plain data (torch.load(weights_only=True) accepts it) whose model config would
    create a folder when instantiated."""
    base = tmp_path_factory.mktemp("malicious")
    marker = base / "code-ran"
    path = base / "evil.pth"
    config = {"model": {"_target_": "os.makedirs", "name": str(marker)}}
    torch.save({"model": {}, "epoch": 0, "step": 0, "config": config}, path)
    torch.load(path, weights_only=True)  # plain data: the weights-only reader alone does not stop it
    return path, marker


@pytest.mark.parametrize(
    "tool,extra",
    [
        ("eval", ["dataset.val.num_frames=1"]),
        ("visualize", ["backend=matplotlib"]),
        ("track", ["dataset.tracking.num_sequences=1"]),
        ("predict", []),
    ],
)
def test_every_tool_refuses_a_checkpoint_that_would_run_code(malicious, tmp_path, tool, extra):
    path, marker = malicious
    scan = tmp_path / "scan.npy"
    np.save(scan, _scan(50, columns=4))
    args = [f"checkpoint={path}", f"hydra.run.dir={tmp_path / 'run'}", f"dataset.cache_dir={tmp_path / 'cache'}", *extra]
    if tool == "predict":
        args = [f"checkpoint={path}", f"input={scan}", f"hydra.run.dir={tmp_path / 'run'}"]
    line = error_line(run_tool(tool, *args))
    assert f"checkpoint {path}: config.model._target_: 'os.makedirs' is not allowed" in line
    assert not marker.exists(), "code named in the checkpoint ran"


# --- point files --------------------------------------------------------------------------------------


def test_visualize_reads_a_nuscenes_scan_with_its_five_columns(tmp_path):
    """34,688 points x 5 float32 is also a whole number of 4-float records: read by name, not guessed."""
    points = _scan(34_688)
    scan = tmp_path / "n008-2018-08-01-15-16-36-0400__LIDAR_TOP__1533151603547590.pcd.bin"
    points.tofile(scan)
    done = run_tool("visualize", f"points={scan}", "backend=matplotlib", f"output={tmp_path / 'scan.png'}",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "visualize.log").read_text()
    assert "34688 points, columns ('x', 'y', 'z', 'intensity', 'ring')" in log
    assert (tmp_path / "scan.png").stat().st_size > 1000

    renamed = tmp_path / "scan.bin"  # the same bytes without the nuScenes name: ambiguous, refused
    points.tofile(renamed)
    line = error_line(run_tool("visualize", f"points={renamed}", "backend=matplotlib", f"hydra.run.dir={tmp_path / 'r2'}"))
    assert f"point file {renamed}" in line and "format=nuscenes" in line and "format=" in line


def test_visualize_draws_an_empty_scan(tmp_path):
    scan = tmp_path / "empty.bin"
    scan.write_bytes(b"")
    done = run_tool("visualize", f"points={scan}", "backend=matplotlib", f"output={tmp_path / 'empty.png'}",
                 f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "empty.png").is_file()


def test_nan_rows_are_an_error_naming_the_row_unless_dropped(tmp_path, tiny_checkpoint):
    points = _scan(100, columns=4)
    points[[7, 30], 1] = np.nan
    scan = tmp_path / "nan.npy"
    np.save(scan, points)
    line = error_line(run_tool("predict", f"checkpoint={tiny_checkpoint}", f"input={scan}", f"hydra.run.dir={tmp_path / 'a'}"))
    assert f"point file {scan}" in line and "2 " in line and "row 7" in line
    done = run_tool("predict", f"checkpoint={tiny_checkpoint}", f"input={scan}", "nonfinite=drop", f"hydra.run.dir={tmp_path / 'b'}")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "b" / "detections.jsonl").read_text())
    assert record["num_points"] == 98


# --- the predict tool ----------------------------------------------------------------------------------


def test_predict_on_a_folder_writes_json_lines_and_a_predictions_file(tmp_path, tiny_checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(3):  # KITTI layout: x, y, z, reflectance in [0, 1]
        points = _scan(400 + i, seed=i, columns=4)
        points[:, 3] /= 255.0
        points.tofile(scans / f"{i:06d}.bin")
    (scans / "notes.txt").write_text("not a scan")
    run = tmp_path / "run"
    done = run_tool("predict", f"checkpoint={tiny_checkpoint}", f"input={scans}", "format=kitti", "render=true",
                 "backend=matplotlib", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "detections.jsonl").read_text().splitlines()]
    assert [r["frame_id"] for r in records] == ["000000", "000001", "000002"]
    assert [r["num_points"] for r in records] == [400, 401, 402]
    assert sum(len(r["detections"]) for r in records) > 0
    first = next(d for r in records for d in r["detections"])
    assert first["class"] in ("Vehicle", "Pedestrian", "Cyclist") and 0.0 <= first["score"] <= 1.0
    assert set(first) >= {"x", "y", "z", "dx", "dy", "dz", "heading"}
    content = load_predictions(run / "predictions.pt")
    assert content.frame_ids == ["000000", "000001", "000002"]
    assert [len(d) for d in content.detections] == [len(r["detections"]) for r in records]
    assert sorted(p.name for p in (run / "renders").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert "\r" not in done.stdout + done.stderr, "no progress-bar frames when piped"


def test_predict_warns_once_when_intensity_does_not_fit_the_model(tmp_path, tiny_checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        np.save(scans / f"{i}.npy", _scan(300, seed=i, columns=4))  # intensity 0-255, model expects [0, 1]
    done = run_tool("predict", f"checkpoint={tiny_checkpoint}", f"input={scans}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "run" / "predict.log").read_text()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "intensity" in line]
    assert len(warnings) == 1 and "0.0" in warnings[0] and "[0, 1]" in warnings[0], warnings


# --- messages that name the file or key -------------------------------------------------------------


def test_bad_checkpoints_are_named_without_torch_hints(tmp_path, tiny_checkpoint):
    folder = tmp_path / "folder.pth"
    folder.mkdir()
    line = error_line(run_tool("eval", f"checkpoint={folder}", f"hydra.run.dir={tmp_path / 'a'}"))
    assert line == f"error: checkpoint {folder}: is a directory, expected a file"

    pickled = tmp_path / "pickled.pth"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)  # a whole module: Python objects
    line = error_line(run_tool("eval", f"checkpoint={pickled}", f"hydra.run.dir={tmp_path / 'b'}"))
    assert f"checkpoint {pickled}: not a voxsparse checkpoint: it holds Python objects" in line
    assert "weights_only" not in line

    ckpt = load_checkpoint(tiny_checkpoint)
    newer = tmp_path / "newer.pth"
    save_checkpoint(Checkpoint(ckpt.model, 0, 0, ckpt.config, format_version=99), newer)
    line = error_line(run_tool("eval", f"checkpoint={newer}", f"hydra.run.dir={tmp_path / 'c'}"))
    assert f"checkpoint {newer}: format 99 was written by voxsparse" in line and "upgrade voxsparse" in line

    other = tmp_path / "other.pth"  # weights of another model under this config
    state = {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) if v.ndim == 2 else v for k, v in ckpt.model.items()}
    save_checkpoint(Checkpoint(state, 0, 0, ckpt.config), other)
    line = error_line(run_tool("eval", f"checkpoint={other}", f"hydra.run.dir={tmp_path / 'd'}"))
    assert f"checkpoint {other}: its weights do not fit the model" in line and "of another shape" in line


def test_wrong_config_values_are_one_line_naming_the_key(tmp_path):
    line = error_line(run_tool("train", "trainer.epochs=abc", f"hydra.run.dir={tmp_path / 'a'}"))
    assert line == "error: trainer.epochs: expected an integer, got 'abc'"
    line = error_line(run_tool("train", "model.voxel_encoder.grid.voxel_size=[100,100,100]", f"hydra.run.dir={tmp_path / 'b'}"))
    assert line.startswith("error: model.voxel_encoder.grid: VoxelGrid.voxel_size: (100.0, 100.0, 100.0) leaves no whole voxel")
    line = error_line(run_tool("visualize", "points=/nonexistent/scan.bin", f"hydra.run.dir={tmp_path / 'c'}"))
    assert line == "error: point file /nonexistent/scan.bin: no such file"
    line = error_line(run_tool("visualize", f"points={tmp_path}", f"hydra.run.dir={tmp_path / 'd'}"))
    assert f"point file {tmp_path}: is a directory" in line


def test_eval_says_what_a_predictions_file_holds_before_generating_frames(tmp_path, tiny_checkpoint):
    scans = tmp_path / "scans"
    scans.mkdir()
    np.save(scans / "a.npy", _scan(100, columns=4))
    run = tmp_path / "run"
    assert run_tool("predict", f"checkpoint={tiny_checkpoint}", f"input={scans}", f"hydra.run.dir={run}").returncode == 0
    cache = tmp_path / "cache"
    line = error_line(
        run_tool("eval", f"predictions={run / 'predictions.pt'}", "dataset.val.num_frames=50", f"dataset.cache_dir={cache}",
              f"hydra.run.dir={tmp_path / 'e'}")
    )
    assert "50 of 50 frames of the evaluated split have no entry" in line
    assert "the file holds 1 frames (0 of them in this split; first: ['a'])" in line
    assert not cache.exists() or not any(cache.rglob("*.npz")), "frames were generated before the check"


def test_float64_points_are_named_before_the_sparse_kernels(tiny_checkpoint):
    import voxsparse
    from voxsparse.structures import PointBatch

    model = voxsparse.load_model(tiny_checkpoint)
    batch = PointBatch.from_frames([torch.from_numpy(_scan(10, columns=4).astype(np.float64))])
    with pytest.raises(ValueError, match=r"SparseDetector: points are torch.float64 but the model's weights are "
                                         r"torch.float32; convert the points"):
        model.predict(batch)
