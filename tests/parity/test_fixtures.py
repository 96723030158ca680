"""Whole-model parity without the reference checkouts: each fixture of tests/parity/fixtures/ (written
by ``python -m tests.parity.make_fixtures``) holds a reduced-width reference detector's state dict,
a synthetic frame and what the reference computed on it; the state dict is converted, voxsparse's
model runs, and every stage (1e-5 relative, float32), the decoded boxes (1e-4, as sets) and the
training loss (1e-5 relative) must agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from voxsparse.benchmark.parity import ParityInput, compare_to_record
from voxsparse.convert.openpcdet import model_config, model_from_config, openpcdet_to_ours
from voxsparse.structures import Annotations3D, Boxes3D

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CONFIGS = ["voxelnext_nuscenes", "voxelnext_waymo", "voxelnext_argo2", "centerpoint_nuscenes", "dsvt_voxel_waymo",
           "dsvt_pillar_nuscenes"]


def unpack(state: dict) -> dict[str, torch.Tensor]:
    """The reference state dict: 2-bit packed tensors (make_fixtures.pack) restored exactly."""
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            packed = value["codes"].to(torch.int64)
            codes = torch.stack([(packed >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1).flatten()
            count = torch.Size(value["shape"]).numel()
            out[key] = ((2 * codes[:count] - 3).float() * value["step"]).reshape(value["shape"])
        else:
            out[key] = value
    return out



def model_and_inputs(fixture: dict) -> tuple[nn.Module, ParityInput]:
    """A fixture's model with the converted reference state, and the inputs both sides saw."""
    model = model_from_config(model_config(fixture["config"], None, fixture["ours_overrides"]))
    state, report = openpcdet_to_ours(model, unpack(fixture["state"]), where=fixture["reference"])
    assert not report.unmapped and not report.missing
    model.load_state_dict(state)
    k = len(fixture["labels"])
    annotations = Annotations3D(Boxes3D(fixture["boxes"]), fixture["labels"], torch.ones(k, dtype=torch.int64),
                                torch.ones(k, dtype=torch.int64), torch.arange(k))
    reference_points = fixture["reference_points"] if fixture["reference_points"] is not None else fixture["points"]
    return model, ParityInput(fixture["points"], reference_points, fixture["gt_boxes"], annotations)


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_reference(name, one_thread):
    fixture = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    assert fixture["config"] == name
    model, inputs = model_and_inputs(fixture)
    result = compare_to_record(model, inputs, fixture["record"], box_tolerance=1e-4)
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {*fixture["record"]["stages"], "decoded boxes (as sets)", "training loss (total)"}
    assert all(r.matched for r in result.rows), result.table()
    for row in result.rows:
        if row.name != "decoded boxes (as sets)":
            assert row.rel_diff <= 1e-5, result.table()
    assert int(rows["decoded boxes (as sets)"].theirs.split()[0]) > 0, "the reference decoded no box"
