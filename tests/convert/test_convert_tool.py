"""tools/convert_checkpoint.py from the user's side: OpenPCDet-format files (a dict with
``model_state`` etc., saved by ``torch.save``) of a reduced-width voxelnext_nuscenes, written by
spconv 2.2 and 1.x, converted, opened by ``voxsparse.load_model``, and written back. Bad files are
checked through the library where one tool run already shows the error line."""

from __future__ import annotations

import pytest
import torch
from tool_runs import error_line, run_tool
from toy_reference import as_written_by, randomized, write_openpcdet_checkpoint

import voxsparse
from voxsparse.benchmark.parity import REFERENCE_CONFIGS
from voxsparse.convert.openpcdet import (
    ConversionError,
    convert_from_openpcdet,
    model_config,
    model_from_config,
    ours_to_openpcdet,
    reference_pairs,
)
from voxsparse.models.keys import TensorKind

NAME = "voxelnext_nuscenes"
OVERRIDES = REFERENCE_CONFIGS[NAME].ours_reduced
OPTIONS = ["--from", "openpcdet", "--model", NAME, *(f"--set={o}" for o in OVERRIDES)]


@pytest.fixture(scope="module")
def model():
    return randomized(model_from_config(model_config(NAME, None, OVERRIDES)), seed=3)


@pytest.fixture(scope="module")
def openpcdet_state(model):
    """The model's weights as OpenPCDet (spconv 2.2) holds them."""
    return ours_to_openpcdet(model, model.state_dict())


def _conv_keys(model, kinds=(TensorKind.SPARSE_CONV, TensorKind.SPARSE_CONV_AS_LINEAR)) -> list[str]:
    return [p.theirs for p in reference_pairs(model) if p.kind in kinds]


def _same_weights(path, model):
    loaded = voxsparse.load_model(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_tool_converts_a_spconv1_file_reports_unmapped_keys_and_writes_it_back(tmp_path, model, openpcdet_state):
    old = as_written_by(openpcdet_state, "1.x", set(_conv_keys(model)))
    src = write_openpcdet_checkpoint(tmp_path / "openpcdet.pth", dict(old, **{"dense_head.extra.weight": torch.zeros(3)}))
    run = run_tool("convert_checkpoint", str(src), str(tmp_path / "model.pth"), *OPTIONS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sparse convolutions in spconv 1.x layout" in run.stdout
    assert "1 source tensors not used by the model: dense_head.extra.weight" in run.stdout
    assert "ignored (not weights): global_step" in run.stdout
    _same_weights(tmp_path / "model.pth", model)
    checkpoint = torch.load(tmp_path / "model.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (7, 1234)
    assert checkpoint["config"]["model"]["class_names"][0] == "car"

    back = tmp_path / "back.pth"
    run = run_tool("convert_checkpoint", str(tmp_path / "model.pth"), str(back), "--to", "openpcdet")
    assert run.returncode == 0, run.stderr[-3000:]
    written = torch.load(back, weights_only=True)
    assert set(written) == {"model_state", "optimizer_state", "epoch", "it", "version"}
    assert written["model_state"].keys() == openpcdet_state.keys()
    for key, value in openpcdet_state.items():  # spconv 2.2 layout, whatever the source's
        assert torch.equal(written["model_state"][key], value), key


def test_tool_refuses_a_mixed_file_in_one_line(tmp_path, model, openpcdet_state):
    first = _conv_keys(model, (TensorKind.SPARSE_CONV,))[0]
    src = write_openpcdet_checkpoint(tmp_path / "mixed.pth", as_written_by(openpcdet_state, "1.x", {first}))
    line = error_line(run_tool("convert_checkpoint", str(src), str(tmp_path / "out.pth"), *OPTIONS))
    assert "stored in different spconv layouts" in line and first in line
    assert not (tmp_path / "out.pth").exists()


def test_spconv22_file_converts(tmp_path, model, openpcdet_state):
    src = write_openpcdet_checkpoint(tmp_path / "openpcdet.pth", openpcdet_state)
    report = convert_from_openpcdet(src, tmp_path / "model.pth", model_config(NAME, None, OVERRIDES))
    assert report.layout.value == "2.2" and not report.unmapped and not report.missing
    _same_weights(tmp_path / "model.pth", model)


def test_files_that_do_not_fit_are_refused(tmp_path, openpcdet_state):
    config = model_config(NAME, None, OVERRIDES)
    missing = {k: v for k, v in openpcdet_state.items() if k != "dense_head.heads_list.0.hm.1.bias"}
    src = write_openpcdet_checkpoint(tmp_path / "missing.pth", missing)
    with pytest.raises(ConversionError, match=r"not in it: dense_head\.heads_list\.0\.hm\.1\.bias"):
        convert_from_openpcdet(src, tmp_path / "out.pth", config)
    other = model_config(NAME, None, ())  # full width: every shape differs
    src = write_openpcdet_checkpoint(tmp_path / "reduced.pth", openpcdet_state)
    with pytest.raises(ConversionError, match="backbone_3d.conv_input.0.weight has shape"):
        convert_from_openpcdet(src, tmp_path / "out.pth", other)
    with pytest.raises(ValueError, match="no model config 'voxelnext_nowhere'"):
        model_config("voxelnext_nowhere")
    assert not (tmp_path / "out.pth").exists()
