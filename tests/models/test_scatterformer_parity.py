"""ScatterFormer's backbone against the official module: the recorded fixture (always) and the
checkout itself (when ``VOXSPARSE_SCATTERFORMER`` names one). The fixture's generator and the
reference harness: tests/parity/make_scatterformer_fixtures.py."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from voxsparse.convert.openpcdet import openpcdet_to_ours, ours_to_openpcdet
from voxsparse.models.backbones.scatterformer import ScatterFormerBackbone
from voxsparse.models.necks.cascade_ded import CascadeDEDBackbone
from voxsparse.structures import SparseBEV, SparseVoxels, VoxelGrid

PARITY = Path(__file__).resolve().parents[1] / "parity"
FIXTURE = PARITY / "fixtures" / "scatterformer_backbone.pt"
CHECKOUT = os.environ.get("VOXSPARSE_SCATTERFORMER")
RTOL = 1e-4


def _grid(size) -> VoxelGrid:
    x, y, z = size
    return VoxelGrid((1.0, 1.0, 1.0), (0.0, 0.0, 0.0, float(x), float(y), float(z)))


def _ours(record) -> ScatterFormerBackbone:
    model = ScatterFormerBackbone(in_channels=record["features"].shape[1], channels=record["channels"],
                                  window_size=record["window_size"], pillar_size=record["pillar_size"])
    state, report = openpcdet_to_ours(model, record["state_dict"])
    assert not report.unmapped and report.converted == len(model.state_dict())
    model.load_state_dict(state)
    return model


def _run(model, record, train: bool, weights=None):
    model.train(train)
    features = record["features"].clone().requires_grad_(train)
    voxels = SparseVoxels(record["coords"], features, _grid(record["grid"]), 2)
    with torch.set_grad_enabled(train):
        bev = model(voxels)
        if train:
            (bev.features * weights).sum().backward()
    return bev.coords, bev.features.detach(), features.grad


def _close(ours, theirs):
    scale = theirs.abs().max().clamp(min=1e-12)
    assert ((ours - theirs).abs().max() / scale).item() < RTOL


def _check(record, weights):
    model = _ours(record)
    cells, features, _ = _run(model, record, train=False)
    assert torch.equal(cells, record["eval_cells"])
    _close(features, record["eval_features"])
    cells, features, grad = _run(model, record, train=True, weights=weights)
    assert torch.equal(cells, record["train_cells"])
    _close(features, record["train_features"])
    _close(grad, record["train_input_grad"])


def _generator():
    spec = importlib.util.spec_from_file_location("make_scatterformer_fixtures", PARITY / "make_scatterformer_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fixture_parity():
    record = torch.load(FIXTURE, weights_only=True)
    _check(record, _generator().loss_weights(record["train_features"].shape))


def test_neck_fixture_parity():
    record = torch.load(FIXTURE, weights_only=True)
    cfg = _generator().NECK
    neck = CascadeDEDBackbone(record["channels"], cfg["NUM_LAYERS"], cfg["NUM_SBB"], cfg["DOWN_STRIDES"],
                              cfg["FEATURE_DIM"])
    state, report = openpcdet_to_ours(neck, record["neck_state_dict"])
    assert not report.unmapped
    neck.load_state_dict(state)
    x, y, _ = record["grid"]
    bev = SparseBEV(record["eval_cells"], record["eval_features"], ((y - 1) // 2 + 1, (x - 1) // 2 + 1), 2,
                    _grid(record["grid"]), 2)
    with torch.no_grad():
        out = neck.eval()(bev)
    assert out.stride == 2
    _close(out.features, record["neck_features"])


def test_keys_round_trip():
    record = torch.load(FIXTURE, weights_only=True)
    model = _ours(record)
    back = ours_to_openpcdet(model, model.state_dict())
    back.pop("global_step")
    assert back.keys() == record["state_dict"].keys()
    for key, value in record["state_dict"].items():
        assert torch.equal(back[key], value), key


@pytest.mark.skipif(not CHECKOUT, reason="set VOXSPARSE_SCATTERFORMER to a ScatterFormer checkout")
def test_checkout_parity():
    gen = _generator()
    net = gen.build_reference(CHECKOUT, seed=3)
    coords, features = gen.parity_input(seed=5)
    record = {"state_dict": {k: v.clone() for k, v in net.state_dict().items()}, "coords": coords,
              "features": features, "grid": list(gen.GRID), "channels": gen.CHANNELS,
              "window_size": gen.WINDOW, "pillar_size": gen.PILLAR_SIZE}
    record["eval_cells"], record["eval_features"], _ = gen.run_reference(net, coords, features, train=False)
    record["train_cells"], record["train_features"], record["train_input_grad"] = gen.run_reference(
        net, coords, features, train=True)
    _check(record, gen.loss_weights(record["train_features"].shape))
