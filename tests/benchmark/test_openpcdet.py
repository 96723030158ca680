"""voxsparse.benchmark.openpcdet: the pure-torch ``ingroup_inds`` against brute force; OpenPCDet's DSVT
beside ours and ``tools/openpcdet_ref.py`` end to end; the whole-detector harness (config reading, the
torch stand-ins for compiled ops, every reference config at reduced width). Tests that run a checkout
skip unless ``VOXSPARSE_OPENPCDET`` (OpenPCDet) or ``VOXSPARSE_DSVT`` (the DSVT repository) names it."""

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
from voxsparse.benchmark.parity import CHECKOUT_ENV, REFERENCE_CONFIGS
from voxsparse.ops.boxes import bev_iou
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
    """Our dsvt_voxel_waymo backbone and 1,500 voxels of 192 features (its voxel encoder's width) in
    one 60 x 60 x 32 corner of its grid (a few dozen per window, so windows hold several sets)."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(overrides=["+model=dsvt_voxel_waymo"]).model
    grid = instantiate(cfg.voxel_encoder.grid)
    torch.manual_seed(0)
    backbone = instantiate(cfg.backbone)(in_channels=192).eval()
    gen = torch.Generator().manual_seed(1)
    flat = torch.randperm(32 * 60 * 60, generator=gen)[:1500]
    coords = torch.stack([torch.zeros_like(flat), flat // 3600, 200 + flat // 60 % 60, 200 + flat % 60], dim=1).int()
    return backbone, SparseVoxels(coords, torch.randn(len(coords), 192, generator=gen), grid, 1)


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
    assert result["max_relative_difference"] < 1e-5
    assert result["ours_backbone_parameters"] == result["openpcdet_backbone_parameters"]
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


def test_reference_config_base_merge_and_overrides(tmp_path):
    (tmp_path / "tools/cfgs/data").mkdir(parents=True)
    (tmp_path / "tools/cfgs/data/base.yaml").write_text(
        "POINT_CLOUD_RANGE: [0, 0, 0, 1, 1, 1]\nPROC: {A: 1, B: {C: 2, D: 3}}\n")
    (tmp_path / "tools/cfgs/model.yaml").write_text(
        "DATA_CONFIG:\n  _BASE_CONFIG_: cfgs/data/base.yaml\n  PROC: {B: {C: 5}}\n"
        "MODEL:\n  HEAD: {WIDTHS: [4, 4], NAME: H}\n")
    cfg = ref.load_reference_config(tmp_path, "tools/cfgs/model.yaml", {"MODEL.HEAD.WIDTHS.1": 2, "MODEL.HEAD.NEW": 7})
    assert cfg["DATA_CONFIG"]["PROC"] == {"A": 1, "B": {"C": 5, "D": 3}}
    assert cfg["DATA_CONFIG"]["POINT_CLOUD_RANGE"] == [0, 0, 0, 1, 1, 1]
    assert cfg["MODEL"]["HEAD"] == {"WIDTHS": [4, 2], "NAME": "H", "NEW": 7}
    with pytest.raises(KeyError, match="MODEL.NECK.X"):
        ref.load_reference_config(tmp_path, "tools/cfgs/model.yaml", {"MODEL.NECK.X": 1})


def test_nms_stand_in_matches_a_brute_force_greedy_loop():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(60, 2, generator=gen) * 12, torch.zeros(60, 1), 1 + torch.rand(60, 3, generator=gen) * 3,
                       torch.rand(60, 1, generator=gen) * 6], dim=1)
    scores = torch.rand(60, generator=gen)
    kept, _ = ref.nms_bev_greedy(boxes, scores, 0.2, pre_maxsize=50)
    iou = bev_iou(boxes, boxes)
    expected: list[int] = []
    for i in scores.argsort(descending=True)[:50].tolist():
        if all(iou[i, j] <= 0.2 for j in expected):
            expected.append(i)
    assert kept.tolist() == expected
    assert len(expected) < 50


def test_scatter_stand_ins():
    src = torch.tensor([[1.0, -2.0], [3.0, -4.0], [5.0, 0.5], [-1.0, -1.0]])
    index = torch.tensor([1, 0, 1, 1])
    assert torch.equal(ref._scatter_max(src, index)[0], torch.tensor([[3.0, -4.0], [5.0, 0.5]]))
    torch.testing.assert_close(ref._scatter_mean(src, index), torch.tensor([[3.0, -4.0], [5.0 / 3, -2.5 / 3]]))



def _checkout(name: str) -> Path:
    """The checkout a reference config needs, or a skip."""
    env = CHECKOUT_ENV[REFERENCE_CONFIGS[name].checkout]
    if not os.environ.get(env):
        pytest.skip(f"set {env} to the {REFERENCE_CONFIGS[name].checkout} checkout")
    return Path(os.environ[env])


def _scan(detector: ref.ReferenceDetector, n: int = 3000) -> torch.Tensor:
    """``n`` points in a 30 m square around the middle of the range (or the range), every z, the top
    cell included."""
    gen = torch.Generator().manual_seed(0)
    low, high = torch.tensor(detector.point_cloud_range[:3]), torch.tensor(detector.point_cloud_range[3:])
    span = (high - low).clamp(max=30.0)
    span[2] = high[2] - low[2]
    xyz = (low + high) / 2 - span / 2 + torch.rand(n, 3, generator=gen) * span
    xyz[: n // 10, 2] = float(high[2]) - 0.01
    return torch.cat([xyz, torch.rand(n, detector.num_point_features - 3, generator=gen)], dim=1)


@pytest.mark.parametrize("name", list(REFERENCE_CONFIGS))
def test_reference_detector_at_reduced_width(name, one_thread):
    """Each reference config builds from its yaml, trains one step's losses and decodes boxes on the CPU."""
    torch.manual_seed(0)
    detector = ref.build_reference(_checkout(name), REFERENCE_CONFIGS[name].yaml, REFERENCE_CONFIGS[name].reduced)
    keys = list(detector.state_dict())
    assert keys[0] == "global_step"
    assert {k.split(".")[0] for k in keys[1:]} <= set(detector.part_names)
    points = _scan(detector)
    code = 9 if "nuscenes" in name else 7
    boxes = torch.tensor([[0.0, 2.0, 0.5, 4.0, 2.0, 1.6, 0.3, 1.0, 0.5, 1], [3.0, -4.0, 0.0, 0.8, 0.7, 1.8, 2.0, 0.0, 0.0, 2]])
    boxes = torch.cat([boxes[:, :code], boxes[:, -1:]], dim=1)
    boxes[:, :2] += torch.tensor(detector.point_cloud_range[:2] + detector.point_cloud_range[3:5]) / 2
    out = detector(points, [boxes])
    assert torch.isfinite(out.loss) and out.loss.requires_grad and out.tb_dict
    assert out.final_box_dicts is None
    assert list(out.stages)[:2] == ["input", detector.part_names[0]]
    assert "forward_ret_dict" in out.stages["dense_head"]
    detector.eval()
    with torch.no_grad():
        out = detector(points)
    (frame,) = out.final_box_dicts
    assert frame["pred_boxes"].shape[1] == code and len(frame["pred_scores"]) == len(frame["pred_labels"])
    assert out.loss is None


def test_reference_detector_batches_frames_like_openpcdet(one_thread):
    """Two frames: batch indices prepended, boxes zero-padded, voxels capped per voxel and per frame."""
    name = "voxelnext_nuscenes"
    detector = ref.build_reference(_checkout(name), REFERENCE_CONFIGS[name].yaml, REFERENCE_CONFIGS[name].reduced)
    points = _scan(detector, 2000)
    same = points[:1].repeat(15, 1)  # 15 points in one voxel: the first 10 are kept
    batch = detector.batch([torch.cat([same, points]), points[:500]],
                           [torch.zeros(3, 10), torch.zeros(1, 10)])
    assert batch["batch_size"] == 2 and batch["gt_boxes"].shape == (2, 3, 10)
    assert set(batch["points"][:, 0].tolist()) == {0.0, 1.0}
    assert batch["voxel_coords"].dtype == torch.float32 and batch["voxels"].shape[1:] == (10, 5)
    assert int(batch["voxel_num_points"].max()) == 10
    assert int(batch["voxel_num_points"][0]) == 10  # voxels in order of their first point
    assert batch["voxel_coords"][:, 0].unique().tolist() == [0.0, 1.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_reference_detector_on_cuda():
    name = "voxelnext_nuscenes"
    detector = ref.build_reference(_checkout(name), REFERENCE_CONFIGS[name].yaml, REFERENCE_CONFIGS[name].reduced,
                                   device="cuda").eval()
    with torch.no_grad():
        out = detector(_scan(detector).cuda())
    assert out.final_box_dicts[0]["pred_boxes"].is_cuda


@pytest.mark.parametrize("hard", [True, False])
def test_compare_voxelization_check_takes_the_encoders_own_torch_path(hard):
    """The voxelization check of the VoxelNeXt comparison compares the encoder with the path it
    replaced for the same kind of voxelization: hard (P points, float32 keys, a per-frame cap) or dynamic."""
    from voxsparse.benchmark.compare import _dynamic_mean_torch, _hard_mean_dense
    from voxsparse.models.voxel_encoders import MeanVFE
    from voxsparse.structures import PointBatch, VoxelGrid

    grid = VoxelGrid((0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
    gen = torch.Generator().manual_seed(0)
    # Clustered points so that voxels hold more than P of them, and a column that tanh changes.
    frames = [torch.cat([torch.rand(3000, 3, generator=gen) * 0.3 + torch.tensor([1.0, 2.0, 0.0]),
                         torch.rand(3000, 2, generator=gen) * 4], dim=1) for _ in range(2)]
    points = PointBatch.from_frames(frames)
    options = {"max_points_per_voxel": 4, "max_voxels": 30, "quantization": "float32"} if hard else {}
    encoder = MeanVFE(grid, 5, tanh_columns=(3,), **options).eval()
    coords, features = (_hard_mean_dense if hard else _dynamic_mean_torch)(encoder, points)
    out = encoder(points)
    assert torch.equal(out.coords, coords)
    torch.testing.assert_close(out.features, features)
    if hard:
        assert torch.bincount(coords[:, 0].long()).tolist() == [30, 30]  # the cap binds
