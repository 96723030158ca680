"""The model-zoo path from the user's side: an OpenPCDet checkpoint (random weights, a reduced-width
voxelnext_nuscenes) converted by tools/convert_checkpoint.py, evaluated by tools/eval.py with the
nuScenes devkit on a tiny nuScenes dataset prepared by tools/prepare_data.py, and run by
tools/predict.py on one of that dataset's raw LIDAR_TOP files."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_convert_tool import NAME, OPTIONS
from tool_runs import ROOT, run_tool
from toy_reference import randomized, write_openpcdet_checkpoint

from voxsparse.convert.openpcdet import model_config, model_from_config, ours_to_openpcdet


def test_converted_checkpoint_is_evaluated_and_predicts(tmp_path):
    pytest.importorskip("nuscenes")
    from voxsparse.data.nuscenes_tiny import write_tiny_nuscenes

    # The nuScenes loader tests' tiny dataset (a module of another test folder: loaded by path).
    spec = importlib.util.spec_from_file_location("nuscenes_spec", ROOT / "tests" / "data" / "test_nuscenes_loader.py")
    loader_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader_tests)
    info = write_tiny_nuscenes(tmp_path / "raw", loader_tests.make_spec())
    prepared = tmp_path / "prepared"
    run = run_tool("prepare_data", "nuscenes", "--root", str(info.dataroot), "--version", info.version,
                   "--out", str(prepared), "--sweeps", "2", "--workers", "1", "--splits", "tiny_train", "--quiet")
    assert run.returncode == 0, run.stderr[-3000:]

    overrides = [o.removeprefix("--set=") for o in OPTIONS if o.startswith("--set=")]
    reference = randomized(model_from_config(model_config(NAME, None, overrides)), seed=5)
    source = tmp_path / "openpcdet.pth"
    write_openpcdet_checkpoint(source, ours_to_openpcdet(reference, reference.state_dict()))
    converted = tmp_path / "voxsparse.pth"
    run = run_tool("convert_checkpoint", str(source), str(converted), *OPTIONS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("converted 541 tensors") and "unmapped" not in run.stdout

    dataset = [f"dataset.root={prepared}", f"dataset.raw_root={info.dataroot}", f"dataset.version={info.version}",
               "dataset.val_split=tiny_train"]
    run = run_tool("eval", f"checkpoint={converted}", "dataset=nuscenes", *dataset, f"hydra.run.dir={tmp_path / 'eval'}")
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "mAP" in json.dumps(metrics) or "map" in json.dumps(metrics).lower()

    scan = next((info.dataroot / "samples" / "LIDAR_TOP").glob("*.pcd.bin"))
    run = run_tool("predict", f"checkpoint={converted}", f"input={scan}", f"hydra.run.dir={tmp_path / 'predict'}")
    assert run.returncode == 0, run.stderr[-3000:]
    lines = (tmp_path / "predict" / "detections.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["detections"] is not None
    # The converted weights are the reference's, tensor for tensor.
    loaded = torch.load(converted, weights_only=True)
    assert set(loaded["model"]) == set(reference.state_dict())
