"""tools/parity.py and the library behind it on a reference checkout (skips unless
``VOXSPARSE_OPENPCDET`` names OpenPCDet)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tool_runs import error_line, run_tool

from voxsparse.benchmark.parity import run_parity


@pytest.fixture
def openpcdet_root() -> str:
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout")
    return root


def test_parity_of_reduced_voxelnext(openpcdet_root):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # many small products: two OpenMP threads on a busy 2-core machine crawl
    try:
        result, report = run_parity("voxelnext_nuscenes", Path(openpcdet_root), reduced=True)
    finally:
        torch.set_num_threads(previous)
    assert report.summary().startswith("converted 541 tensors (sparse convolutions in spconv 2.2 layout)")
    assert [r.name for r in sorted(result.rows, key=lambda r: r.name)] == [
        "BEV features (backbone_3d / map_to_bev)", "decoded boxes (as sets)", "training loss (total)",
        "voxel features (vfe)"]
    assert result.ok(1e-5), result.table()


def test_parity_tool_reports_a_bad_checkout_in_one_line(openpcdet_root, tmp_path):
    line = error_line(run_tool("parity", "--openpcdet", str(tmp_path), "--model", "voxelnext_nuscenes"))
    assert "is not an OpenPCDet checkout" in line
