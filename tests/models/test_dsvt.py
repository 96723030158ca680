"""DSVT: set partitions against brute force, attention and pooling against per-set loops, order
equivariance, parameter counts of the paper's configurations, detectors training on the CPU."""

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

import voxsparse.models.backbones.dsvt as dsvt_module
from voxsparse.models.backbones.dsvt import (
    AttentionPooling,
    DSVTBackbone,
    PositionEmbedding,
    SetAttentionLayer,
    _matmul_attention,
    set_attention,
)
from voxsparse.models.backbones.dsvt_partition import (
    AXES,
    WindowPositions,
    pooling_partition,
    stage_partition,
    window_partition,
)
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.ops.sparse_utils import linear_keys
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseVoxels, VoxelGrid

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _random_coords(count: int, shape_zyx, batch_size: int, seed: int) -> torch.Tensor:
    """(count, 4) int32 unique (b, z, y, x), clustered in a few blobs so windows get many voxels."""
    gen = torch.Generator().manual_seed(seed)
    z, y, x = shape_zyx
    total = batch_size * z * y * x
    flat = torch.randperm(total, generator=gen)[:count]
    b, rem = flat // (z * y * x), flat % (z * y * x)
    return torch.stack([b, rem // (y * x), (rem // x) % y, rem % x], dim=1).int()


def _reference_sets(coords, window, shift, set_size, axis):
    """Brute force: group voxels by (batch, window), order by the axis-major in-window offset, cut
    into ceil(n / set_size) balanced runs. Returns the sets as tuples of voxel rows."""
    groups = {}
    for i, (b, z, y, x) in enumerate(coords.tolist()):
        sx, sy, sz = x + shift[0], y + shift[1], z + shift[2]
        key = (b, sx // window[0], sy // window[1], sz // window[2])
        off = (sx % window[0], sy % window[1], sz % window[2])
        order = (off[0], off[1], off[2]) if axis == "x" else (off[1], off[0], off[2])
        groups.setdefault(key, []).append((order, i))
    sets = []
    for members in groups.values():
        members = [i for _, i in sorted(members)]
        n = len(members)
        s = math.ceil(n / set_size)
        bounds = [math.ceil(j * n / s) for j in range(s + 1)]
        sets += [tuple(members[bounds[j] : bounds[j + 1]]) for j in range(s)]
    return sorted(sets)


@pytest.mark.parametrize(
    "window,shift", [((4, 4, 3), (0, 0, 0)), ((8, 8, 3), (2, 2, 0)), ((3, 5, 2), (1, 3, 1))]
)
def test_set_partition_matches_brute_force(window, shift):
    shape = (6, 20, 20)
    coords = _random_coords(900, shape, batch_size=2, seed=0)
    set_size = 7
    part = stage_partition(coords, shape, 2, [window], [shift], set_size)
    m = len(coords)
    for axis, sets in zip(AXES, part.sets[0]):
        members = sets.members()
        flat = sorted(i for s in members for i in s)
        assert flat == list(range(m)), "every voxel lies in exactly one set"
        assert max(len(s) for s in members) <= set_size
        assert sorted(tuple(s) for s in members) == _reference_sets(coords, window, shift, set_size, axis)
        # position maps each voxel to its own slot
        assert torch.equal(sets.index.reshape(-1)[sets.position], torch.arange(m))
        assert bool(sets.valid.reshape(-1)[sets.position].all())
        assert int(sets.valid.sum()) == m


def test_rotated_and_shifted_sets_on_a_full_window():
    # One fully occupied 12 x 12 pillar window: 144 voxels, set size 36 -> 4 sets.
    ys, xs = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    coords = torch.stack([torch.zeros(144, dtype=torch.long), torch.zeros(144, dtype=torch.long),
                          ys.reshape(-1), xs.reshape(-1)], dim=1).int()
    part = stage_partition(coords, (1, 12, 12), 1, [(12, 12, 1)], [(0, 0, 0)], 36)
    x_sets, y_sets = part.sets[0]
    assert x_sets.num_sets == y_sets.num_sets == 4
    for members in x_sets.members():  # x-major: each set is a slab of 3 x-columns across all y
        xs_in = sorted({int(coords[i, 3]) for i in members})
        assert len(members) == 36 and len(xs_in) == 3 and xs_in[-1] - xs_in[0] == 2
        assert {int(coords[i, 2]) for i in members} == set(range(12))
    for members in y_sets.members():  # y-major: slabs of 3 y-rows across all x
        ys_in = sorted({int(coords[i, 2]) for i in members})
        assert len(ys_in) == 3 and {int(coords[i, 3]) for i in members} == set(range(12))
    # The shifted hybrid window (24 x 24, shift 6): x = 11 and 12 share a window, 17 and 18 do not.
    line = torch.tensor([[0, 0, 0, x] for x in (11, 12, 17, 18)], dtype=torch.int32)
    plain = window_partition(line, (1, 40, 40), 1, (12, 12, 1))
    shifted = window_partition(line, (1, 40, 40), 1, (24, 24, 1), (6, 6, 0))
    assert plain.window_key[0] != plain.window_key[1] and plain.window_key[2] == plain.window_key[3]
    assert shifted.window_key[0] == shifted.window_key[1] and shifted.window_key[2] != shifted.window_key[3]
    assert shifted.offsets[:, 0].tolist() == [17, 18, 23, 0]


def test_set_count_follows_window_occupancy():
    # Windows of 1, 36, 37 and 100 voxels get 1, 1, 2 and 3 sets of size <= 36.
    rows = []
    for w, n in enumerate([1, 36, 37, 100]):
        cells = torch.randperm(144, generator=torch.Generator().manual_seed(w))[:n]
        rows += [[0, 0, int(c) // 12, w * 12 + int(c) % 12] for c in cells]
    coords = torch.tensor(rows, dtype=torch.int32)
    part = stage_partition(coords, (1, 12, 48), 1, [(12, 12, 1)], [(0, 0, 0)], 36)
    sizes = sorted(len(s) for s in part.sets[0][0].members())
    assert sizes == sorted([1, 36, 18, 19, 33, 33, 34])


def _loop_attention(q, k, v, members, num_heads):
    out = torch.zeros_like(q)
    d = q.shape[1] // num_heads
    for rows in members:
        idx = torch.tensor(rows)
        for h in range(num_heads):
            cols = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[idx, cols] @ k[idx, cols].T / math.sqrt(d), dim=1)
            out[idx, cols] = weights @ v[idx, cols]
    return out


def test_set_attention_matches_a_per_set_loop():
    shape = (4, 16, 16)
    coords = _random_coords(400, shape, 2, seed=1)
    sets = stage_partition(coords, shape, 2, [(6, 6, 4)], [(3, 3, 0)], 10).sets[0][1]
    assert bool((~sets.valid).any()), "the test needs padded sets"
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(len(coords), 12, generator=gen, dtype=torch.float64) for _ in range(3))
    got = set_attention(q, k, v, sets, num_heads=3)
    torch.testing.assert_close(got, _loop_attention(q, k, v, sets.members(), 3))


def test_matmul_attention_equals_sdpa_with_padded_keys():
    """The fp32 CUDA path (matmuls) against SDPA, values and gradients, on sets with padding."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(7, 3, 10, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = torch.rand(7, 1, 1, 10, generator=gen) < 0.6
    valid[:, ..., 0] = True  # every set has a voxel
    got = _matmul_attention(q, k, v, valid, 0.0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid)
    torch.testing.assert_close(got, want)
    grads = [torch.autograd.grad((out * torch.arange(8.0, dtype=torch.float64)).sum(), (q, k, v)) for out in (got, want)]
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w)


def test_set_attention_layer_matches_a_per_set_loop():
    torch.manual_seed(3)
    shape = (1, 24, 24)
    coords = _random_coords(300, shape, 1, seed=3)
    part = stage_partition(coords, shape, 1, [(8, 8, 1)], [(0, 0, 0)], 9)
    layer = SetAttentionLayer(16, 4, 32, pos_dims=2).double().eval()
    x = torch.randn(len(coords), 16, dtype=torch.float64)
    positions = part.windows[0].positions(2, torch.float64)
    assert positions.index is not None and positions.table.shape == (64, 2), "embeds the 8 x 8 table"
    got = layer(x, part.sets[0][0], positions)
    # Reference: the layer's own weights, position MLP per voxel, attention by a loop over sets.
    position = part.windows[0].relative_position(2, torch.float64)
    pos = layer.pos_embed(position)
    q, k = layer.qk(x + pos).chunk(2, dim=1)
    attn = _loop_attention(q, k, layer.v(x), part.sets[0][0].members(), 4)
    h = layer.norm_attn(x + layer.proj(attn))
    h = layer.norm_ffn(h + layer.ffn(h))
    torch.testing.assert_close(got, layer.norm_out(h + x))
    assert position.abs().max() < 1
    torch.testing.assert_close(positions.table[positions.index], position)


def test_attention_pooling_matches_brute_force():
    torch.manual_seed(4)
    shape = (8, 10, 10)
    coords = _random_coords(350, shape, 2, seed=4)
    stride = (2, 2, 4)
    pool = pooling_partition(coords, shape, 2, stride)
    assert pool.sparse_shape == (2, 5, 5) and pool.volume == 16
    module = AttentionPooling(8, 16, num_heads=2).double()
    x = torch.randn(len(coords), 8, dtype=torch.float64)
    got = module(x, pool)
    expected_coords = sorted({(b, z // 4, y // 2, x_ // 2) for b, z, y, x_ in coords.tolist()})
    assert [tuple(c) for c in pool.coords.tolist()] == expected_coords
    for r, (b, pz, py, px) in enumerate(expected_coords):
        rows = [i for i, (bb, z, y, x_) in enumerate(coords.tolist())
                if (bb, z // 4, y // 2, x_ // 2) == (b, pz, py, px)]
        places = [int(coords[i, 3]) % 2 * 8 + int(coords[i, 2]) % 2 * 4 + int(coords[i, 1]) % 4 for i in rows]
        assert sorted(pool.slot[rows].tolist()) == sorted(places) and set(pool.region[rows].tolist()) == {r}
        feats = x[rows]
        query = feats.max(dim=0).values
        q = module.q(query).view(2, 4)
        k = module.k(feats + module.pos_embed[places]).view(-1, 2, 4)
        v = module.v(feats).view(-1, 2, 4)
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q, k) / 2.0, dim=1)
        attn = torch.einsum("hn,nhd->hd", weights, v).reshape(8)
        torch.testing.assert_close(got[r], module.norm(query + module.proj(attn)))


def _voxels(count, grid, batch_size, channels, seed, dtype=torch.float32):
    coords = _random_coords(count, grid.spatial_shape, batch_size, seed)
    feats = torch.randn(count, channels, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return SparseVoxels(coords, feats, grid, batch_size)


SMALL_VOXEL = {"channels": (16, 16, 24), "blocks": (2, 1, 1), "num_heads": (2, 2, 4), "ffn_channels": 32,
               "set_size": (12, 10, 8), "window_shape": ((6, 6, 8), (6, 6, 2), (5, 5, 1)),
               "pool_stride": ((1, 1, 4), (2, 2, 2))}
SMALL_PILLAR = {"channels": 16, "blocks": 3, "num_heads": 2, "ffn_channels": 32, "set_size": 9, "window_shape": (6, 6, 1)}


@pytest.mark.parametrize("variant", ["voxel", "pillar"])
def test_backbone_is_equivariant_to_voxel_order(variant):
    torch.manual_seed(5)
    if variant == "voxel":
        grid = VoxelGrid((0.5, 0.5, 0.5), (0.0, 0.0, 0.0, 12.0, 12.0, 4.0))  # 24 x 24 x 8
        backbone = DSVTBackbone(4, **SMALL_VOXEL)
    else:
        grid = VoxelGrid((0.5, 0.5, 4.0), (0.0, 0.0, 0.0, 12.0, 12.0, 4.0))  # 24 x 24 x 1
        backbone = DSVTBackbone(4, **SMALL_PILLAR)
    backbone = backbone.double().eval()
    voxels = _voxels(500 if variant == "voxel" else 300, grid, 2, 4, seed=6, dtype=torch.float64)
    perm = torch.randperm(len(voxels))
    shuffled = SparseVoxels(voxels.coords[perm], voxels.features[perm], grid, 2)
    a, b = backbone(voxels), backbone(shuffled)
    assert a.spatial_shape == b.spatial_shape == ((12, 12) if variant == "voxel" else (24, 24))
    assert a.stride == (2 if variant == "voxel" else 1)
    key_a, key_b = (linear_keys(o.coords, (2, *o.spatial_shape)) for o in (a, b))
    assert torch.equal(key_a.sort().values, key_b.sort().values)
    torch.testing.assert_close(a.features[key_a.argsort()], b.features[key_b.argsort()])
    if variant == "pillar":  # stride 1 and no pooling: output rows follow input rows
        torch.testing.assert_close(b.features, a.features[perm])


def test_partitions_are_built_once_per_stage(monkeypatch):
    calls = []
    original = dsvt_module.stage_partition

    def counting(*args, **kwargs):
        calls.append(len(args[3]))
        return original(*args, **kwargs)

    monkeypatch.setattr(dsvt_module, "stage_partition", counting)
    grid = VoxelGrid((0.5, 0.5, 0.5), (0.0, 0.0, 0.0, 12.0, 12.0, 4.0))
    backbone = DSVTBackbone(4, **SMALL_VOXEL)
    backbone(_voxels(300, grid, 1, 4, seed=7))
    # Stage 0 (2 blocks) builds plain + shifted windows; stages 1, 2 (1 block each) one each.
    assert calls == [2, 1, 1]
    assert backbone._block_window == [[0, 1], [0], [0]]
    assert [w[0][1] for w in backbone._stage_windows] == [(0, 0, 0), (0, 0, 0), (2, 2, 0)]


def test_empty_batch_gives_an_empty_bev_of_the_right_shape():
    grid = VoxelGrid((0.5, 0.5, 0.5), (0.0, 0.0, 0.0, 12.0, 12.0, 4.0))
    backbone = DSVTBackbone(4, **SMALL_VOXEL)
    empty = backbone(_voxels(0, grid, 2, 4, seed=0))
    full = backbone(_voxels(100, grid, 2, 4, seed=0))
    assert len(empty) == 0 and empty.spatial_shape == full.spatial_shape and empty.stride == full.stride


def test_remaining_height_is_summed_into_the_bev():
    grid = VoxelGrid((0.5, 0.5, 1.0), (0.0, 0.0, 0.0, 8.0, 8.0, 4.0))  # 16 x 16 x 4, no z pooling
    backbone = DSVTBackbone(4, channels=8, blocks=1, num_heads=2, ffn_channels=16, set_size=6,
                            window_shape=(4, 4, 4)).double().eval()
    voxels = _voxels(200, grid, 2, 4, seed=11, dtype=torch.float64)
    captured = []
    backbone.stages[0][0].register_forward_hook(lambda module, args, out: captured.append(out))
    bev = backbone(voxels)
    columns = linear_keys(voxels.coords[:, [0, 2, 3]], (2, 16, 16))
    unique, inverse = torch.unique(columns, return_inverse=True)
    expected = torch.zeros(len(unique), 8, dtype=torch.float64).index_add_(0, inverse, captured[0])
    assert torch.equal(linear_keys(bev.coords, (2, 16, 16)), unique)
    torch.testing.assert_close(bev.features, expected)


def test_checkpointed_blocks_give_the_same_gradients():
    grid = VoxelGrid((0.5, 0.5, 0.5), (0.0, 0.0, 0.0, 12.0, 12.0, 4.0))
    voxels = _voxels(300, grid, 1, 4, seed=12)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(13)
        backbone = DSVTBackbone(4, **SMALL_VOXEL, use_checkpoint=use_checkpoint)
        backbone(voxels).features.square().sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in backbone.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_position_embedding_gradients_repeat_bit_for_bit():
    """Many voxels share each in-window place; their gradients reach the place's embedding in a
    fixed order on two CPU threads (indexing's backward added them with atomics, in thread order)."""
    torch.manual_seed(14)
    table = torch.rand(300, 3) * 2 - 1
    positions = WindowPositions(table, torch.randint(0, 300, (40_000,)))
    mlp = PositionEmbedding(3, 64).mlp
    weights = torch.randn(40_000, 64)
    runs = []
    for _ in range(5):  # on the two threads that conftest sets for every test
        mlp.zero_grad()
        (positions.embed(mlp) * weights).sum().backward()
        runs.append(torch.cat([p.grad.reshape(-1) for p in mlp.parameters()]))
    torch.testing.assert_close(positions.embed(mlp), mlp(table)[positions.index], rtol=0, atol=0)
    for run in runs[1:]:
        assert torch.equal(run, runs[0])


def _model_config(name: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose(overrides=[f"+model={name}"]).model


@pytest.mark.parametrize("name,params,bev", [("dsvt_pillar_waymo", 2_684_928, (468, 468))])
def test_waymo_configs_have_the_reference_size(name, params, bev):
    """Our design at the paper's size (dsvt_voxel_waymo is the reference itself: test_dsvt_reference)."""
    cfg = _model_config(name)
    backbone = instantiate(cfg.backbone)(in_channels=5)
    extra = ("input_proj", "bev_out")
    core = sum(p.numel() for n, p in backbone.named_parameters() if not n.startswith(extra))
    assert core == params  # OpenPCDet's DSVT module for the same configuration
    grid = instantiate(cfg.voxel_encoder.grid)
    assert backbone.stage_shapes(grid.spatial_shape)[-1] == (1, *bev)
    backbone.eval()
    with torch.no_grad():
        out = backbone(_voxels(600, grid, 1, 5, seed=8))
    assert out.spatial_shape == bev and out.features.shape[1] == backbone.out_channels == 192


class _MeanVoxelEncoder(nn.Module):
    """Minimal dynamic voxelizer for the tests: mean of the points (x, y, z, intensity) per voxel."""

    def __init__(self, grid: VoxelGrid, num_features: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.out_channels = num_features

    def forward(self, points: PointBatch) -> SparseVoxels:
        low = torch.tensor(self.grid.point_cloud_range[:3])
        size = torch.tensor(self.grid.voxel_size)
        xyz = torch.floor((points.points[:, :3] - low) / size).long()
        extent = torch.tensor(self.grid.grid_size)
        inside = ((xyz >= 0) & (xyz < extent)).all(1)
        xyz, feats, batch = xyz[inside], points.points[inside], points.batch_index[inside]
        coords = torch.stack([batch, xyz[:, 2], xyz[:, 1], xyz[:, 0]], dim=1)
        keys = linear_keys(coords, (points.batch_size, *self.grid.spatial_shape))
        unique, inverse = torch.unique(keys, return_inverse=True)
        summed = feats.new_zeros(len(unique), feats.shape[1]).index_add_(0, inverse, feats)
        count = feats.new_zeros(len(unique)).index_add_(0, inverse, torch.ones_like(feats[:, 0]))
        out = coords.new_empty(len(unique), 4)
        out[inverse] = coords
        return SparseVoxels(out.int(), summed / count[:, None], self.grid, points.batch_size)


def _scene(batch_size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    frames, anns = [], []
    for _ in range(batch_size):
        ground = torch.rand(1500, 4, generator=gen) * torch.tensor([24.0, 24.0, 0.2, 1.0])
        ground -= torch.tensor([12.0, 12.0, 1.9, 0.0])
        car = torch.rand(300, 4, generator=gen) * torch.tensor([4.0, 1.8, 1.5, 1.0])
        car += torch.tensor([1.0, -3.0, -1.6, 0.0])
        frames.append(torch.cat([ground, car]))
        box = Boxes3D(torch.tensor([[3.0, -2.1, -0.85, 4.0, 1.8, 1.5, 0.0]]))
        one = torch.ones(1, dtype=torch.int64)
        anns.append(Annotations3D(box, one * 0, one * 300, one, one * 0))
    return PointBatch.from_frames(frames), anns


@pytest.mark.skipif(torch.cuda.is_available(), reason="spconv's CUDA wheel runs sparse convs on CUDA only")
@pytest.mark.parametrize("name", ["dsvt_pillar_small", "dsvt_voxel_small"])
def test_small_detector_trains_and_decodes(name):
    torch.manual_seed(9)
    cfg = _model_config(name)
    grid_cfg = cfg.voxel_encoder.grid
    # The configs' x/y grid over a 24 m square keeps the test fast; z and voxel sizes are the config's.
    grid = VoxelGrid(tuple(grid_cfg.voxel_size), (-12.0, -12.0, grid_cfg.point_cloud_range[2], 12.0, 12.0,
                                                  grid_cfg.point_cloud_range[5]))
    channels = 32 if name == "dsvt_pillar_small" else [32, 32, 32]
    backbone = instantiate(cfg.backbone, channels=channels, out_channels=32)
    head = instantiate(cfg.head, head_channels=32)
    classes = ("Vehicle", "Pedestrian", "Cyclist")
    model = SparseDetector(_MeanVoxelEncoder(grid), backbone, head, class_names=classes)
    points, anns = _scene(2, seed=10)
    losses = model.loss(points, anns)
    losses.total.backward()
    assert math.isfinite(losses.total.item()) and losses.num_positives == 2
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    bev = model.backbone(model.voxel_encoder(points))
    assert bev.stride == 4 and bev.spatial_shape == (30, 30)  # 120 cells of 0.2 m, /4
    model.eval()
    detections = model.predict(points)
    assert len(detections) == 2 and all(len(d) <= model.head.max_detections for d in detections)
