"""DSVT as the reference computes it: the dynamic pillar / voxel encoders, ``DSVTReferenceBackbone``
and the BEV scatter against OpenPCDet's modules loaded by path (env ``VOXSPARSE_OPENPCDET`` names
the checkout; skipped without it), and checks that need no checkout: the reference's set rule by
brute force, float32 cell indices, reference names and full-size parameter counts.

Reference runs use reduced widths, random weights and BatchNorm statistics, and scans of the
synthetic world. OpenPCDet's compiled or CUDA-only pieces are replaced here only: ``torch_scatter``
by torch reductions with its semantics, ``ingroup_inds`` as in ``voxsparse.benchmark.openpcdet``,
and the encoders' ``.cuda()`` constants stay on the CPU.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from voxsparse.data.waymo import CLASS_NAMES as WAYMO_CLASSES
from voxsparse.models.backbones.dsvt import DSVTReferenceBackbone
from voxsparse.models.backbones.dsvt_partition import REFERENCE_AXES, reference_stage_partition
from voxsparse.models.voxel_encoders import DynamicPillarVFE, DynamicVoxelVFE
from voxsparse.structures import PointBatch, SparseVoxels, VoxelGrid

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
OPENPCDET = os.environ.get("VOXSPARSE_OPENPCDET")
needs_openpcdet = pytest.mark.skipif(not OPENPCDET, reason="set VOXSPARSE_OPENPCDET to an OpenPCDet checkout")

# OpenPCDet waymo_models/dsvt_voxel.yaml MODEL.BACKBONE_3D, in DSVTReferenceBackbone's terms.
WAYMO_VOXEL = {
    "channels": [192] * 4, "blocks": [1] * 4, "num_heads": 8, "ffn_channels": 384, "set_size": 48,
    "window_shape": [[12, 12, 32], [12, 12, 8], [12, 12, 2], [12, 12, 1]], "hybrid_factor": [2, 2, 1],
    "shifts": [[[0, 0, 0], [6, 6, 0]]] * 4, "pool_stride": [[1, 1, 4], [1, 1, 4], [1, 1, 2]],
}
# The DSVT repository's dsvt_plain_1f_onestage_nusences.yaml MODEL.BACKBONE_3D.
NUSCENES_PILLAR = {
    "channels": [128], "blocks": [4], "num_heads": 8, "ffn_channels": 256, "set_size": 90,
    "window_shape": [[30, 30, 1]], "hybrid_factor": [1, 1, 1], "shifts": [[[0, 0, 0], [15, 15, 0]]],
    "pool_stride": [],
}


# ---------------------------------------------------------------------------------------------
# Without the checkout


def _reference_rule_sets(coords, window, shift, set_size, axis):
    """The reference's sets by loops: per window, voxels in axis-major order, s = ceil(n / S) sets,
    slot t holds rank t n // (s S). Returns {set as a tuple of (voxel, key-valid)} and each voxel's
    first (set, slot) as sorted lists, window by window."""
    groups = {}
    for i, (b, z, y, x) in enumerate(coords.tolist()):
        sx, sy, sz = x + shift[0], y + shift[1], z + shift[2]
        key = (b, sx // window[0], sy // window[1], sz // window[2])
        off = (sx % window[0], sy % window[1], sz % window[2])
        order = (off[1], off[0], off[2]) if axis == "y" else (off[0], off[1], off[2])
        groups.setdefault(key, []).append((order, i))
    sets = []
    for members in groups.values():
        members = [i for _, i in sorted(members)]
        n = len(members)
        s = math.ceil(n / set_size)
        for j in range(s):
            ranks = [(t * n) // (s * set_size) for t in range(j * set_size, (j + 1) * set_size)]
            sets.append(tuple((members[r], u == 0 or r != ranks[u - 1]) for u, r in enumerate(ranks)))
    return sets


def _random_coords(count, shape_zyx, batch_size, gen):
    z, y, x = shape_zyx
    flat = torch.randperm(batch_size * z * y * x, generator=gen)[:count]
    b, rem = flat // (z * y * x), flat % (z * y * x)
    return torch.stack([b, rem // (y * x), (rem // x) % y, rem % x], dim=1).int()


@pytest.mark.parametrize("window,shift,set_size", [((6, 6, 4), (0, 0, 0), 7), ((10, 8, 4), (5, 4, 0), 9),
                                                   ((12, 12, 1), (6, 6, 0), 36)])
def test_reference_sets_follow_the_rule(window, shift, set_size):
    gen = torch.Generator().manual_seed(0)
    depth = 4 if window[2] > 1 else 1
    coords = _random_coords(700 if depth > 1 else 300, (depth, 30, 30), 2, gen)
    part = reference_stage_partition(coords, (depth, 30, 30), 2, [window], [shift], set_size)
    for axis, sets in zip(REFERENCE_AXES, part.sets[0]):
        assert sets.axis == axis
        got = [tuple(zip(idx, ok)) for idx, ok in zip(sets.index.tolist(), sets.valid.tolist())]
        assert sorted(got) == sorted(_reference_rule_sets(coords, window, shift, set_size, axis))
        # Each voxel reads its output from its first slot.
        flat = sets.index.reshape(-1)
        first = {}
        for slot, voxel in enumerate(flat.tolist()):
            first.setdefault(voxel, slot)
        assert sets.position.tolist() == [first[i] for i in range(len(coords))]


def test_a_window_spanning_the_grid_height_ignores_a_z_shift():
    gen = torch.Generator().manual_seed(1)
    coords = _random_coords(200, (4, 12, 12), 1, gen)
    a = reference_stage_partition(coords, (4, 12, 12), 1, [(6, 6, 4)], [(3, 3, 2)], 10)
    b = reference_stage_partition(coords, (4, 12, 12), 1, [(6, 6, 4)], [(3, 3, 0)], 10)
    assert torch.equal(a.windows[0].offsets, b.windows[0].offsets)


def test_cells_are_found_in_float32():
    # y = -74.88 + 0.32 * 3 in float64 is 3 cells up; the reference's float32 quotient lands at 2.
    grid = VoxelGrid((0.32, 0.32, 0.1875), (-74.88, -74.88, -2.0, 74.88, 74.88, 4.0))
    coords = []
    for k in range(1, 400):
        y = np.float32(-74.88 + 0.32 * k)
        f32 = np.floor((y - np.float32(-74.88)) / np.float32(0.32))
        coords.append((k, int(f32)))
    differs = [(k, c) for k, c in coords if c != k]
    assert differs, "the test needs border points where float32 and exact arithmetic disagree"
    ys = torch.tensor([np.float32(-74.88 + 0.32 * k) for k, _ in coords])
    points = torch.stack([torch.zeros_like(ys), ys, torch.zeros_like(ys), torch.zeros_like(ys)], 1)
    vfe = DynamicVoxelVFE(grid, 4, (8,)).eval()
    with torch.no_grad():
        out = vfe(PointBatch(points, torch.zeros(len(ys), dtype=torch.long), 1))
    cells = set(out.coords[:, 2].tolist())
    assert cells == {c for _, c in coords} and cells != {k for k, _ in coords}


def test_pillar_encoder_masks_z_with_both_bounds_included():
    grid = VoxelGrid((0.3, 0.3, 8.0), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
    z = torch.tensor([-5.5, -5.0, 0.0, 3.0, 3.25])
    points = torch.stack([torch.arange(5.0), torch.zeros(5), z, torch.zeros(5), torch.zeros(5)], dim=1)
    batch = PointBatch(points, torch.zeros(5, dtype=torch.long), 1)
    kept = [len(DynamicPillarVFE(grid, 5, (8,), mask_z=mask).eval()(batch)) for mask in (True, False)]
    assert kept == [3, 5]


def _dsvt_state_numbers(backbone):
    state = backbone.state_dict()
    return sum(p.numel() for p in backbone.parameters()), len(state), sum(v.numel() for v in state.values())


@pytest.mark.parametrize("settings,numbers", [
    (WAYMO_VOXEL, (3_133_824, 213, 3_136_904)),   # OpenPCDet's DSVT for waymo_models/dsvt_voxel.yaml
    (NUSCENES_PILLAR, (1_200_128, 192, 1_202_184)),  # the DSVT repository's nuScenes DSVT-Pillar
])
def test_full_size_backbones_have_the_reference_state(settings, numbers):
    backbone = DSVTReferenceBackbone(settings["channels"][0], **settings)
    assert _dsvt_state_numbers(backbone) == numbers
    pairs = backbone.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(backbone.state_dict())
    assert len({p.theirs for p in pairs}) == len(pairs)


def test_encoders_name_every_entry():
    grid = VoxelGrid((0.3, 0.3, 8.0), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))
    for cls in (DynamicPillarVFE, DynamicVoxelVFE):
        vfe = cls(grid, 5, (128, 128))
        assert sorted(p.ours for p in vfe.openpcdet_keys()) == sorted(vfe.state_dict())
        # PFN 0: Linear 11 -> 64 (no bias) + BatchNorm; PFN 1: Linear 128 -> 128 + BatchNorm
        assert sum(p.numel() for p in vfe.parameters()) == 11 * 64 + 2 * 64 + 128 * 128 + 2 * 128


def _model_config(name: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(overrides=[f"+model={name}"]).model


def test_waymo_voxel_config_is_the_reference_architecture():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        model = instantiate(compose(overrides=["+model=dsvt_voxel_waymo", "+dataset=waymo"]).model)
    vfe, backbone = model.voxel_encoder, model.backbone
    assert isinstance(vfe, DynamicVoxelVFE) and vfe.grid.grid_size == (468, 468, 32)
    assert isinstance(backbone, DSVTReferenceBackbone)
    assert backbone.stage_shapes(vfe.grid.spatial_shape)[-1] == (1, 468, 468)
    # OpenPCDet's detector for waymo_models/dsvt_voxel.yaml: parameters per part and in all, and its
    # checkpoint keys (its model_state has one more, the detector's global_step counter).
    counts = [sum(p.numel() for p in part.parameters()) for part in (vfe, backbone, model.neck, model.head)]
    assert counts == [38_496, 3_133_824, 5_479_680, 450_188] and sum(counts) == 9_102_188
    pairs = model.openpcdet_keys()
    assert len({p.theirs for p in pairs}) == len(pairs) == len(model.state_dict()) == 411


# ---------------------------------------------------------------------------------------------
# Against OpenPCDet


def _torch_scatter_max(src, index, dim=0):
    """torch_scatter.scatter_max's values (groups 0 .. max index; an empty group would be 0)."""
    out = src.new_zeros((int(index.max()) + 1, *src.shape[1:]))
    expanded = index.view(-1, *([1] * (src.ndim - 1))).expand_as(src)
    return out.scatter_reduce_(0, expanded, src, reduce="amax", include_self=False), None


def _torch_scatter_mean(src, index, dim=0):
    """torch_scatter.scatter_mean: sum / count, count clamped to 1."""
    total = src.new_zeros((int(index.max()) + 1, *src.shape[1:])).index_add_(0, index, src)
    count = torch.bincount(index, minlength=total.shape[0]).clamp(min=1).to(src.dtype)
    return total / count.view(-1, *([1] * (src.ndim - 1)))


@contextlib.contextmanager
def _cuda_constants_on_cpu():
    """The reference encoders place constants with ``.cuda()``; keep them where they are."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@pytest.fixture(scope="module")
def reference():
    """OpenPCDet's DSVT, dynamic encoders and PointPillarScatter3d modules, by path."""
    from voxsparse.benchmark import openpcdet

    root = Path(OPENPCDET)
    openpcdet._stub_module("torch_scatter", scatter_max=_torch_scatter_max, scatter_mean=_torch_scatter_mean)
    dsvt_cls = openpcdet.load_openpcdet_dsvt(root)
    vfe = "pcdet.models.backbones_3d.vfe."
    openpcdet._exec_sources(root, {
        vfe + "vfe_template": "pcdet/models/backbones_3d/vfe/vfe_template.py",
        vfe + "dynamic_pillar_vfe": "pcdet/models/backbones_3d/vfe/dynamic_pillar_vfe.py",
        vfe + "dynamic_voxel_vfe": "pcdet/models/backbones_3d/vfe/dynamic_voxel_vfe.py",
        "pcdet.models.backbones_2d.map_to_bev.pointpillar_scatter":
            "pcdet/models/backbones_2d/map_to_bev/pointpillar_scatter.py",
    })
    return {
        "DSVT": dsvt_cls,
        "DynamicPillarVFE": sys.modules[vfe + "dynamic_pillar_vfe"].DynamicPillarVFE,
        "DynamicVoxelVFE": sys.modules[vfe + "dynamic_voxel_vfe"].DynamicVoxelVFE,
        "PointPillarScatter3d": sys.modules["pcdet.models.backbones_2d.map_to_bev.pointpillar_scatter"]
        .PointPillarScatter3d,
        "attr": openpcdet._attr_dict,
    }


def _randomize(module: torch.nn.Module, seed: int) -> dict:
    """Random weights (of trained-like scale) and BatchNorm statistics (norm scales near 1), loaded into
    ``module``."""
    gen = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    for name, value in state.items():
        if not value.dtype.is_floating_point:
            continue
        if name.endswith("running_var"):
            state[name] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.dim() == 1 and name.endswith("weight"):
            state[name] = 1.0 + 0.2 * torch.randn(value.shape, generator=gen)
        else:
            std = math.prod(value.shape[1:]) ** -0.5 if value.dim() > 1 else 0.1  # weights: 1 / sqrt(fan in)
            state[name] = std * torch.randn(value.shape, generator=gen)
    module.load_state_dict(state)
    return state


def _load_from_reference(ours: torch.nn.Module, state: dict) -> None:
    pairs = ours.openpcdet_keys()
    assert sorted(p.theirs for p in pairs) == sorted(state), "every reference entry has a name here"
    ours.load_state_dict({p.ours: state[p.theirs] for p in pairs})


def _cell_keys(coords: torch.Tensor) -> torch.Tensor:
    """Keys of (b, z, y, x) rows, or of (b, y, x) rows as (b, 0, y, x), to match cells of two outputs."""
    z = coords[:, 1].long() if coords.shape[1] == 4 else torch.zeros_like(coords[:, 0].long())
    return ((coords[:, 0].long() * 4096 + z) * 4096 + coords[:, -2].long()) * 4096 + coords[:, -1].long()


def _assert_same_cells(ours_coords, ours_feats, ref_coords, ref_feats, rtol, what):
    a, b = _cell_keys(ours_coords), _cell_keys(ref_coords)
    assert torch.equal(a.sort().values, b.sort().values), f"{what}: other cells"
    got, want = ours_feats[a.argsort()], ref_feats[b.argsort()]
    scale = want.abs().max()
    err = ((got - want).abs().max() / scale).item()
    assert err < rtol, f"{what}: largest difference {err:.2e} of the largest value"
    return err


@pytest.fixture(scope="module")
def scans():
    """Two synthetic scans (x, y, z, intensity, a random 5th column), cropped to 30 m x 30 m around
    the sensor."""
    from voxsparse.data.synthetic import LidarConfig, generate_frame

    lidar = LidarConfig(beams=24, azimuth_resolution=0.5)
    frames = []
    for seed in (3, 4):
        pts = torch.from_numpy(generate_frame(seed, lidar).points)
        pts = pts[(pts[:, 0].abs() < 15) & (pts[:, 1].abs() < 15)]
        frames.append(torch.cat([pts, torch.rand(len(pts), 1, generator=torch.Generator().manual_seed(seed))], 1))
    return PointBatch.from_frames(frames)


def _reference_vfe(reference, name, grid: VoxelGrid, layers, with_distance=False, absolute=True):
    cfg = reference["attr"]({"USE_NORM": True, "WITH_DISTANCE": with_distance, "USE_ABSLOTE_XYZ": absolute,
                             "NUM_FILTERS": list(layers)})
    pcr = np.array(grid.point_cloud_range, dtype=np.float32)  # as OpenPCDet's dataset holds it
    size = np.round((pcr[3:] - pcr[:3]) / np.array(grid.voxel_size)).astype(np.int64)
    with _cuda_constants_on_cpu():
        return reference[name](cfg, 5, list(grid.voxel_size), size, pcr)


def _reference_points(points: PointBatch) -> torch.Tensor:
    return torch.cat([points.batch_index[:, None].to(points.points.dtype), points.points], dim=1)


@needs_openpcdet
@pytest.mark.parametrize("pillar,with_distance,absolute", [(True, False, True), (False, True, False)])
def test_encoders_match_the_reference(reference, scans, pillar, with_distance, absolute):
    if pillar:
        grid, ours_cls, name = VoxelGrid((0.3, 0.3, 8.0), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)), DynamicPillarVFE, \
            "DynamicPillarVFE"
    else:
        grid, ours_cls, name = VoxelGrid((0.32, 0.32, 0.1875), (-74.88, -74.88, -2.0, 74.88, 74.88, 4.0)), \
            DynamicVoxelVFE, "DynamicVoxelVFE"
    # Points on cell borders, where float32 and exact arithmetic can disagree.
    pts = scans.points.clone()
    border = torch.arange(0, len(pts), 7)
    low, size = torch.tensor(grid.point_cloud_range[:2]), torch.tensor(grid.voxel_size[:2])
    pts[border, :2] = torch.floor((pts[border, :2] - low) / size) * size + low
    points = PointBatch(pts, scans.batch_index, scans.batch_size)
    ref = _reference_vfe(reference, name, grid, (16, 32), with_distance, absolute)
    ours = ours_cls(grid, 5, (16, 32), with_distance=with_distance, use_absolute_xyz=absolute, mask_z=False)
    _load_from_reference(ours, _randomize(ref, 5))
    for train in (False, True):
        ref.train(train)
        ours.train(train)
        with torch.no_grad():
            out = ours(points)
            batch = ref({"points": _reference_points(points)})
        _assert_same_cells(out.coords, out.features, batch["voxel_coords"], batch["voxel_features"], 1e-6, name)
        assert out.coords[:, 1].max() > 0 or pillar
    for key, value in ref.state_dict().items():  # the BatchNorm statistics moved alike in training
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-6, atol=1e-7)


def _reduced(settings: dict, channels: int, **changes) -> dict:
    out = dict(settings, channels=[channels] * len(settings["channels"]), **changes)
    return out


def _reference_dsvt_config(settings: dict, sparse_shape_xyz) -> dict:
    n = len(settings["channels"])
    set_info = [[settings["set_size"][s] if isinstance(settings["set_size"], list) else settings["set_size"],
                 settings["blocks"][s]] for s in range(n)]
    heads = settings["num_heads"]
    ffn = settings["ffn_channels"]
    return {
        "INPUT_LAYER": {
            "sparse_shape": list(sparse_shape_xyz), "downsample_stride": settings["pool_stride"],
            "d_model": settings["channels"], "set_info": set_info, "window_shape": settings["window_shape"],
            "hybrid_factor": settings["hybrid_factor"], "shifts_list": settings["shifts"], "normalize_pos": False,
        },
        "block_name": ["DSVTBlock"] * n, "set_info": set_info, "d_model": settings["channels"],
        "nhead": [heads] * n if isinstance(heads, int) else heads,
        "dim_feedforward": [ffn] * n if isinstance(ffn, int) else ffn,
        "dropout": 0.0, "activation": "gelu", "reduction_type": "attention",
        "output_shape": list(sparse_shape_xyz[:2]), "conv_out_channel": settings["channels"][-1],
    }


# Reduced widths on small grids that keep every rule of the full configurations (pooled z, hybrid
# and shifted windows, repeated-voxel sets, 8 pooling heads).
VOXEL_CASE = (
    VoxelGrid((0.32, 0.32, 0.1875), (-19.2, -19.2, -2.0, 19.2, 19.2, 4.0)),  # 120 x 120 x 32
    _reduced(WAYMO_VOXEL, 32, set_size=[20, 16, 12, 12], blocks=[1, 2, 1, 1], num_heads=4, ffn_channels=48),
)
PILLAR_CASE = (
    VoxelGrid((0.3, 0.3, 8.0), (-21.0, -21.0, -5.0, 21.0, 21.0, 3.0)),  # 140 x 140 x 1
    _reduced(NUSCENES_PILLAR, 32, set_size=[30], window_shape=[[10, 10, 1]], shifts=[[[0, 0, 0], [5, 5, 0]]],
             ffn_channels=48, num_heads=4),
)


@needs_openpcdet
@pytest.mark.parametrize("case", ["voxel", "pillar"])
def test_detector_front_matches_the_reference(reference, scans, case):
    """VFE -> DSVT -> BEV scatter on synthetic scans: evaluation in float32 to 1e-5 of the largest
    value; training in float64 (BatchNorm batch statistics, gradients of every weight)."""
    grid, settings = VOXEL_CASE if case == "voxel" else PILLAR_CASE
    width = settings["channels"][0]
    vfe_name = "DynamicVoxelVFE" if case == "voxel" else "DynamicPillarVFE"
    ref_vfe = _reference_vfe(reference, vfe_name, grid, (width, width))
    ours_vfe = (DynamicVoxelVFE if case == "voxel" else DynamicPillarVFE)(grid, 5, (width, width), mask_z=False)
    _load_from_reference(ours_vfe, _randomize(ref_vfe, 6))
    ref = reference["DSVT"](model_cfg=reference["attr"](_reference_dsvt_config(settings, grid.grid_size)))
    ours = DSVTReferenceBackbone(width, **settings)
    _load_from_reference(ours, _randomize(ref, 7))
    nx, ny, _ = grid.grid_size
    scatter = reference["PointPillarScatter3d"](reference["attr"]({"INPUT_SHAPE": [nx, ny, 1],
                                                                   "NUM_BEV_FEATURES": width}), None)

    for module in (ref_vfe, ours_vfe, ref, ours):
        module.eval()
    with torch.no_grad():
        voxels = ours_vfe(scans)
        bev = ours(voxels)
        batch = ref(ref_vfe({"points": _reference_points(scans)}))
        dense = scatter(batch)["spatial_features"]
    assert len(voxels) > 2000
    _assert_same_cells(bev.coords, bev.features, batch["voxel_coords"], batch["voxel_features"], 1e-5, "DSVT")
    from voxsparse.structures import DenseBEV

    torch.testing.assert_close(DenseBEV.from_sparse(bev).features, dense, rtol=1e-5, atol=1e-5 * dense.abs().max())

    # Training, float64: the backbone on the same voxels on both sides (the middle 50 x 50 cells).
    ref.double().train()
    ours.double().train()
    centre = torch.tensor([nx // 2, ny // 2])
    middle = ((voxels.coords[:, [3, 2]] - centre).abs() < 25).all(dim=1)
    coords, feats = voxels.coords[middle], voxels.features[middle].double().requires_grad_()
    bev = ours(SparseVoxels(coords, feats, voxels.grid, voxels.batch_size))
    with _default_dtype(torch.float64):
        batch = ref({"voxel_features": feats, "voxel_coords": coords.long()})
    _assert_same_cells(bev.coords, bev.features, batch["voxel_coords"], batch["voxel_features"], 1e-12, "train")
    weights = torch.randn(bev.features.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    order = _cell_keys(bev.coords).argsort(), _cell_keys(batch["voxel_coords"]).argsort()
    (bev.features[order[0]] * weights).sum().backward()
    (batch["voxel_features"][order[1]] * weights).sum().backward()
    theirs = dict(ref.named_parameters())
    for pair in ours.openpcdet_keys():
        mine = dict(ours.named_parameters()).get(pair.ours)
        if mine is not None:
            torch.testing.assert_close(mine.grad, theirs[pair.theirs].grad, rtol=1e-9, atol=1e-12, msg=pair.ours)
    for pair in ours.openpcdet_keys():  # running statistics of the position embeddings
        torch.testing.assert_close(ours.state_dict()[pair.ours], ref.state_dict()[pair.theirs])


@needs_openpcdet
def test_backbone_options_match_the_reference(reference):
    """normalize_pos, ReLU and plain windows that are not at offset 0, float64 evaluation."""
    settings = _reduced(VOXEL_CASE[1], 16, num_heads=2, ffn_channels=24, set_size=[9, 7, 6, 5],
                        shifts=[[[1, 2, 0], [6, 6, 0]], [[0, 0, 0], [3, 9, 1]], [[0, 0, 0], [6, 6, 0]],
                                [[5, 0, 0], [11, 0, 0]]])
    cfg = _reference_dsvt_config(settings, (48, 48, 32))
    cfg["INPUT_LAYER"]["normalize_pos"] = True
    cfg["activation"] = "relu"
    ref = reference["DSVT"](model_cfg=reference["attr"](cfg)).double().eval()
    ours = DSVTReferenceBackbone(16, **settings, normalize_pos=True, activation="relu").double().eval()
    _load_from_reference(ours, _randomize(ref, 10))
    gen = torch.Generator().manual_seed(11)
    coords = _random_coords(1500, (32, 48, 48), 2, gen)
    feats = torch.randn(len(coords), 16, generator=gen, dtype=torch.float64)
    grid = VoxelGrid((0.5, 0.5, 0.1875), (0.0, 0.0, -2.0, 24.0, 24.0, 4.0))
    with torch.no_grad(), _default_dtype(torch.float64):
        batch = ref({"voxel_features": feats, "voxel_coords": coords.long()})
    with torch.no_grad():
        bev = ours(SparseVoxels(coords, feats, grid, 2))
    _assert_same_cells(bev.coords, bev.features, batch["voxel_coords"], batch["voxel_features"], 1e-12, "options")


@contextlib.contextmanager
def _default_dtype(dtype):
    """The reference forms its position inputs in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@needs_openpcdet
def test_waymo_voxel_config_mirrors_the_reference_yaml():
    full = yaml.safe_load((Path(OPENPCDET) / "tools/cfgs/waymo_models/dsvt_voxel.yaml").read_text())
    ref = full["MODEL"]
    cfg = _model_config("dsvt_voxel_waymo")
    vfe, bb = ref["VFE"], ref["BACKBONE_3D"]
    enc = cfg.voxel_encoder
    assert list(enc.layer_channels) == vfe["NUM_FILTERS"] and enc.with_distance == vfe["WITH_DISTANCE"]
    assert enc.use_absolute_xyz == vfe["USE_ABSLOTE_XYZ"] and enc.use_norm == vfe["USE_NORM"]
    assert list(enc.grid.voxel_size) == [0.32, 0.32, 0.1875]
    assert list(enc.grid.point_cloud_range) == [-74.88, -74.88, -2, 74.88, 74.88, 4.0]
    b = cfg.backbone
    layer = bb["INPUT_LAYER"]
    assert [list(w) for w in b.window_shape] == layer["window_shape"]
    assert [[list(s) for s in p] for p in b.shifts] == layer["shifts_list"]
    assert [list(s) for s in b.pool_stride] == layer["downsample_stride"]
    assert list(b.hybrid_factor) == layer["hybrid_factor"] and b.normalize_pos == layer["normalize_pos"]
    assert [[s, n] for s, n in zip(b.set_size, b.blocks)] == bb["set_info"]
    assert list(b.channels) == bb["d_model"] and b.activation == bb["activation"] and b.dropout == bb["dropout"]
    assert [b.num_heads] * 4 == bb["nhead"] and [b.ffn_channels] * 4 == bb["dim_feedforward"]
    neck, bev = cfg.neck, ref["BACKBONE_2D"]
    assert [list(neck[k]) for k in ("layer_nums", "layer_strides", "num_filters", "upsample_strides",
                                    "num_upsample_filters")] == [bev[k.upper()] for k in (
        "layer_nums", "layer_strides", "num_filters", "upsample_strides", "num_upsample_filters")]
    head, dense = cfg.head, ref["DENSE_HEAD"]
    post, nms = dense["POST_PROCESSING"], dense["POST_PROCESSING"]["NMS_CONFIG"]
    assert [list(g) for g in head.class_names_each_head] == dense["CLASS_NAMES_EACH_HEAD"]
    assert dict(head.separate_heads) == dense["SEPARATE_HEAD_CFG"]["HEAD_DICT"]
    assert list(head.head_order) == dense["SEPARATE_HEAD_CFG"]["HEAD_ORDER"]
    assert (head.shared_conv_channels, head.use_bias_before_norm, head.num_hm_conv, head.bn_eps, head.bn_momentum) == (
        dense["SHARED_CONV_CHANNEL"], dense["USE_BIAS_BEFORE_NORM"], dense["NUM_HM_CONV"], dense["BN_EPS"], dense["BN_MOM"])
    target, weights = dense["TARGET_ASSIGNER_CONFIG"], dense["LOSS_CONFIG"]["LOSS_WEIGHTS"]
    assert (head.feature_map_stride, head.num_max_objs, head.gaussian_overlap, head.min_radius) == (
        target["FEATURE_MAP_STRIDE"], target["NUM_MAX_OBJS"], target["GAUSSIAN_OVERLAP"], target["MIN_RADIUS"])
    assert (head.cls_weight, head.loc_weight, list(head.code_weights), head.iou_reg_loss) == (
        weights["cls_weight"], weights["loc_weight"], weights["code_weights"], dense["IOU_REG_LOSS"])
    assert (head.score_threshold, list(head.post_center_limit_range), head.max_obj_per_sample) == (
        post["SCORE_THRESH"], post["POST_CENTER_LIMIT_RANGE"], post["MAX_OBJ_PER_SAMPLE"])
    # The per-class lists follow the reference's CLASS_NAMES, which is the Waymo classes' order here too.
    assert full["CLASS_NAMES"] == list(WAYMO_CLASSES)
    assert post["USE_IOU_TO_RECTIFY_SCORE"] and list(head.iou_rectifier) == post["IOU_RECTIFIER"]
    assert (head.nms_type, list(head.nms_threshold), list(head.nms_pre_max_size), list(head.nms_post_max_size)) == (
        nms["NMS_TYPE"], nms["NMS_THRESH"], nms["NMS_PRE_MAXSIZE"], nms["NMS_POST_MAXSIZE"])


@needs_openpcdet
def test_whole_detector_matches_the_reference(scans):
    """dsvt_voxel_waymo at reduced width (``voxsparse.benchmark.parity``'s reference overrides) against
    OpenPCDet's whole detector, raw points in (the reference gets its loader's tanh of intensity and
    elongation): every head output map, and the decoded boxes (score threshold 0 on both sides)."""
    from voxsparse.benchmark.openpcdet import build_reference
    from voxsparse.benchmark.parity import REFERENCE_CONFIGS

    spec = REFERENCE_CONFIGS["dsvt_voxel_waymo"]
    ref = build_reference(Path(OPENPCDET), spec.yaml, {**spec.reduced, "MODEL.DENSE_HEAD.POST_PROCESSING.SCORE_THRESH": 0.0})
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(overrides=[
            "+model=dsvt_voxel_waymo", "+dataset=waymo", "model.voxel_encoder.layer_channels=[16,16]",
            "model.voxel_encoder.grid.point_cloud_range=[-19.2,-19.2,-2.0,19.2,19.2,4.0]",
            "model.backbone.channels=[16,16,16,16]", "model.backbone.num_heads=2", "model.backbone.ffn_channels=32",
            "model.neck.num_filters=[16,16,16]", "model.neck.num_upsample_filters=[16,16,16]",
            "model.head.shared_conv_channels=16", "model.head.score_threshold=0.0",
        ])
    ours = instantiate(cfg.model)
    state = _randomize(ref, 9)
    pairs = ours.openpcdet_keys()
    assert sorted(p.theirs for p in pairs) == sorted(k for k in state if k != "global_step")
    ours.load_state_dict({p.ours: state[p.theirs] for p in pairs})
    ref.eval()
    ours.eval()
    frames = [scans.points[scans.batch_index == b] for b in range(scans.batch_size)]
    with torch.no_grad():
        out = ref([torch.cat([f[:, :3], torch.tanh(f[:, 3:])], dim=1) for f in frames])
        pred = ours(scans)
        detections = ours.head.decode(pred)
    (maps,) = out.stages["dense_head"]["forward_ret_dict"]["pred_dicts"]
    assert set(maps) == set(pred.groups[0])
    for name, want in maps.items():
        torch.testing.assert_close(pred.groups[0][name], want, rtol=1e-5, atol=1e-5 * want.abs().max(), msg=name)
    for got, want in zip(detections, out.final_box_dicts):
        assert len(got) == len(want["pred_boxes"]) > 100
        scores, order = want["pred_scores"].sort(descending=True)
        torch.testing.assert_close(got.scores, scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.boxes.tensor, want["pred_boxes"][order], rtol=1e-5, atol=1e-4)
        assert torch.equal(got.labels + 1, want["pred_labels"][order])
