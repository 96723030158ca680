"""voxsparse.benchmark.openpcdet: the pure-torch ``ingroup_inds`` against brute force; OpenPCDet's DSVT
beside ours and ``tools/openpcdet_ref.py`` end to end (only where ``VOXSPARSE_OPENPCDET`` names an
OpenPCDet checkout)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from tool_runs import ROOT, run_tool

from voxsparse.benchmark import openpcdet as ref
from voxsparse.benchmark.compare import Alternation, compare_dsvt
from voxsparse.structures import SparseVoxels


def _brute_force(ids: np.ndarray) -> np.ndarray:
    seen: dict[int, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, g in enumerate(ids.tolist()):
        out[i] = seen.get(g, 0)
        seen[g] = out[i] + 1
    return out


@pytest.mark.parametrize("n,groups,dtype", [(0, 1, torch.int64), (1, 1, torch.int64), (500, 1, torch.int64),
                                            (1000, 7, torch.int32), (5000, 300, torch.int64),
                                            (2000, 4000, torch.int64)])
def test_ingroup_indices_matches_brute_force(n, groups, dtype):
    gen = torch.Generator().manual_seed(n + groups)
    # Sparse, unordered, partly negative ids: the kernel's contiguous non-negative ids are a special case.
    ids = (torch.randint(groups, (n,), generator=gen) * 37 - 100).to(dtype)
    out = ref.ingroup_indices(ids)
    assert out.dtype == torch.int64 and out.shape == (n,)
    np.testing.assert_array_equal(out.numpy(), _brute_force(ids.numpy()))


def test_ingroup_indices_rejects_float():
    with pytest.raises(ValueError, match="integer"):
        ref.ingroup_indices(torch.zeros(3))


def test_not_a_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="dsvt.py"):
        ref.load_openpcdet_dsvt(tmp_path)
    with pytest.raises(FileNotFoundError, match="dsvt_voxel.yaml"):
        ref.build_openpcdet_dsvt(tmp_path)


@pytest.fixture
def openpcdet_root() -> Path:
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout to run its DSVT")
    return Path(root)


@pytest.fixture
def ours_and_voxels():
    """Our dsvt_voxel_waymo backbone and 1,500 voxels in one 60 x 60 x 32 corner of its grid (a few
    dozen per window, so windows hold several sets)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(overrides=["+model=dsvt_voxel_waymo"]).model
    grid = instantiate(cfg.voxel_encoder.grid)
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone)(in_channels=4).eval()
    gen = torch.Generator().manual_seed(1)
    flat = torch.randperm(32 * 60 * 60, generator=gen)[:1500]
    coords = torch.stack([torch.zeros_like(flat), flat // 3600, 200 + flat // 60 % 60, 200 + flat % 60], dim=1).int()
    return backbone, SparseVoxels(coords, torch.randn(len(coords), 4, generator=gen), grid, 1)


def _batch(voxels: SparseVoxels) -> dict:
    return {"voxel_features": torch.randn(len(voxels), 192), "voxel_coords": voxels.coords, "batch_size": 1}


def test_openpcdet_dsvt_forward_matches_our_pillars(openpcdet_root, ours_and_voxels):
    ours, voxels = ours_and_voxels
    theirs = ref.build_openpcdet_dsvt(openpcdet_root).eval()
    with torch.no_grad():
        out = theirs(_batch(voxels))
        bev = ours(voxels)
    pillars, coords = out["pillar_features"], out["voxel_coords"]
    assert pillars.shape == (len(bev), 192) and torch.isfinite(pillars).all()
    assert (coords[:, 1] == 0).all()
    assert sorted(map(tuple, coords[:, [0, 2, 3]].tolist())) == sorted(map(tuple, bev.coords.tolist()))
    assert sum(p.numel() for p in theirs.parameters()) == 3_133_824


def test_openpcdet_sets_do_not_depend_on_ingroup_order(openpcdet_root, ours_and_voxels, monkeypatch):
    """The CUDA kernel's order within a group follows thread scheduling; DSVT's sets must not."""
    _, voxels = ours_and_voxels
    layer = ref.build_openpcdet_dsvt(openpcdet_root).input_layer
    batch = _batch(voxels)
    plain = layer(dict(batch))
    gen = torch.Generator().manual_seed(2)

    def shuffled(ids: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm(len(ids), generator=gen)
        out = torch.empty_like(ids)
        out[perm] = ref.ingroup_indices(ids[perm])
        return out

    monkeypatch.setattr(sys.modules["pcdet.models.backbones_3d.dsvt"], "get_inner_win_inds_cuda", shuffled)
    other = layer(dict(batch))
    keys = [k for k in plain if k.startswith("set_voxel_inds")]
    assert len(keys) == 8
    for key in keys:
        assert torch.equal(plain[key], other[key]), key


def test_compare_dsvt(openpcdet_root, ours_and_voxels):
    ours, voxels = ours_and_voxels
    result = compare_dsvt(ours, voxels, openpcdet_root, torch.device("cpu"), Alternation(rounds=1, per_round=1, warmup=0),
                          train=True)
    assert result["same_pillars"] and result["ours_bev_cells"] == result["openpcdet_pillars"]
    assert result["ours_backbone_parameters"] - result["ours_input_projection_parameters"] \
        == result["openpcdet_backbone_parameters"]
    assert set(result["timings"]) == {"ours fp32", "OpenPCDet fp32", "ours fwd+bwd fp32", "OpenPCDet fwd+bwd fp32"}
    assert not ours.training


def test_openpcdet_ref_tool(openpcdet_root, tmp_path):
    """The tool end to end on the CPU: its JSON on stdout and in --json, the same pillars as ours."""
    out = tmp_path / "ref.json"
    run = run_tool("openpcdet_ref", str(openpcdet_root), "--voxels", "1500", "--device", "cpu", "--rounds", "1",
                   "--per-round", "1", "--warmup", "0", "--json", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result == json.loads(out.read_text())
    assert result["voxels"] == 1500 and result["same_pillars"]
    assert result["openpcdet_backbone_parameters"] == 3_133_824
    assert list(result["timings"]) == ["ours fp32", "OpenPCDet fp32"]
    assert result["timings"]["ours fp32"]["repeats"] == 1
