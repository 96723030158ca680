"""Voxelization and scatter reductions against brute-force float64 references (Python loops over points)."""

import math

import numpy as np
import pytest
import torch

from voxsparse.ops.scatter import scatter_max, scatter_mean, scatter_sum
from voxsparse.ops.voxelize import (
    DynamicVoxels,
    HardVoxels,
    Voxelizer,
    dynamic_voxelize,
    hard_voxelize,
    hard_voxelize_mean,
    voxel_keys,
    voxelize_mean,
)
from voxsparse.structures import PointBatch, VoxelGrid

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
# Power-of-two voxel sizes: every voxel border is exactly representable in float32.
EXACT_GRID = VoxelGrid((0.25, 0.5, 0.125), (-4.0, -3.0, -1.0, 4.0, 5.0, 1.0))
NUSCENES_GRID = VoxelGrid((0.075, 0.075, 0.2), (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0))


# ---------------------------------------------------------------- references


def _reference_voxel(p, grid):
    """(b-less) (z, y, x) of point p (3 floats) by the documented rule, or None when out of range."""
    r, s, n = grid.point_cloud_range, grid.voxel_size, grid.grid_size
    if not all(r[i] <= p[i] < r[i + 3] for i in range(3)):
        return None
    ix = [min(math.floor((float(p[i]) - r[i]) / s[i]), n[i] - 1) for i in range(3)]
    return (ix[2], ix[1], ix[0])


def _reference_dynamic(points: PointBatch, grid):
    """dict (b, z, y, x) -> list of point indices (input order), and the kept mask."""
    pts, batch = points.points.double().cpu().numpy(), points.batch_index.cpu().numpy()
    groups, kept = {}, np.zeros(len(pts), dtype=bool)
    for i, (p, b) in enumerate(zip(pts, batch)):
        v = _reference_voxel(p[:3], grid)
        if v is not None:
            kept[i] = True
            groups.setdefault((int(b), *v), []).append(i)
    return groups, kept


def _check_dynamic(out: DynamicVoxels, points: PointBatch, grid):
    groups, kept = _reference_dynamic(points, grid)
    keys = sorted(groups)
    assert out.coords.dtype == torch.int32 and out.point_to_voxel.dtype == torch.int64
    assert out.num_points.dtype == torch.int64 and out.kept.dtype == torch.bool
    assert out.coords.cpu().tolist() == [list(k) for k in keys]
    assert out.num_points.cpu().tolist() == [len(groups[k]) for k in keys]
    assert out.kept.cpu().numpy().tolist() == kept.tolist()
    row_of = {k: j for j, k in enumerate(keys)}
    expected_p2v = np.empty(len(points.points), dtype=np.int64)
    for k, idx in groups.items():
        expected_p2v[idx] = row_of[k]
    assert out.point_to_voxel.cpu().tolist() == expected_p2v[kept].tolist()
    return groups, keys


def _reference_hard(points: PointBatch, grid, max_points, max_voxels):
    """Single pass in input order: a frame opens at most max_voxels voxels, each takes max_points points."""
    pts, batch = points.points.double().cpu().numpy(), points.batch_index.cpu().numpy()
    voxels, opened = {}, {}
    for p, b in zip(pts, batch):
        v = _reference_voxel(p[:3], grid)
        if v is None:
            continue
        key = (int(b), *v)
        if key not in voxels:
            if max_voxels is not None and opened.get(int(b), 0) >= max_voxels:
                continue
            opened[int(b)] = opened.get(int(b), 0) + 1
            voxels[key] = []
        if len(voxels[key]) < max_points:
            voxels[key].append(p)
    keys = sorted(voxels)
    dense = np.zeros((len(keys), max_points, pts.shape[1]))
    for j, k in enumerate(keys):
        dense[j, : len(voxels[k])] = voxels[k]
    return keys, dense, [len(voxels[k]) for k in keys]


# ---------------------------------------------------------------- clouds


def _cloud(grid, frame_sizes, seed, dtype=torch.float32, features=2):
    """PointBatch whose frames mix in-range, out-of-range, voxel-border and range-boundary points."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.tensor(grid.point_cloud_range, dtype=torch.float64)
    low, high, size = r[:3], r[3:], torch.tensor(grid.voxel_size, dtype=torch.float64)
    frames = []
    for n in frame_sizes:
        if n == 0:
            frames.append(torch.zeros(0, 3 + features, dtype=dtype))
            continue
        span = high - low
        xyz = low - 0.1 * span + torch.rand(n, 3, generator=gen, dtype=torch.float64) * 1.2 * span
        kind = torch.randint(0, 4, (n,), generator=gen)
        cells = torch.floor(torch.rand(n, 3, generator=gen, dtype=torch.float64) * (span / size))
        border = low + cells * size
        axis = torch.randint(0, 3, (n,), generator=gen)
        rows = torch.arange(n)
        on_border = kind == 1  # one coordinate exactly on a voxel border
        xyz[rows[on_border], axis[on_border]] = border[rows[on_border], axis[on_border]]
        at_min = kind == 2  # one coordinate exactly on the range min (kept) or max (dropped)
        bound = torch.where(torch.rand(n, generator=gen) < 0.5, low[axis], high[axis])
        xyz[rows[at_min], axis[at_min]] = bound[at_min]
        # Clustered points so voxels hold several points.
        clustered = kind == 3
        xyz[clustered] = border[clustered][:1].expand(int(clustered.sum()), 3) + 0.3 * size * torch.rand(
            int(clustered.sum()), 3, generator=gen, dtype=torch.float64
        )
        feats = torch.randn(n, features, generator=gen, dtype=torch.float64)
        frames.append(torch.cat([xyz, feats], dim=1).to(dtype))
    return PointBatch.from_frames(frames)


# ---------------------------------------------------------------- scatter


def _scatter_case(seed, n=40, groups=7, channels=3):
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(n, channels, generator=gen, dtype=torch.float64)
    index = torch.randint(0, groups - 1, (n,), generator=gen)  # the last group stays empty
    return src, index, groups


@pytest.mark.parametrize("device", DEVICES)
def test_scatter_matches_loops(device):
    src, index, groups = _scatter_case(0)
    sums, means, maxes = (torch.zeros(groups, src.shape[1], dtype=torch.float64) for _ in range(3))
    for g in range(groups):
        rows = src[index == g]
        if len(rows):
            sums[g], means[g], maxes[g] = rows.sum(0), rows.mean(0), rows.max(0).values
    s, i = src.to(device), index.to(device)
    torch.testing.assert_close(scatter_sum(s, i, groups).cpu(), sums)
    torch.testing.assert_close(scatter_mean(s, i, groups).cpu(), means)
    torch.testing.assert_close(scatter_mean(s, i, groups, torch.bincount(i, minlength=groups)).cpu(), means)
    torch.testing.assert_close(scatter_max(s, i, groups).cpu(), maxes)
    torch.testing.assert_close(scatter_max(s[:, 0], i, groups).cpu(), maxes[:, 0])  # 1-D src
    assert scatter_max(s[:0], i[:0], 3).shape == (3, src.shape[1])


@pytest.mark.parametrize("fn", [scatter_sum, scatter_mean, scatter_max])
def test_scatter_gradcheck(fn):
    src, index, groups = _scatter_case(1, n=12, groups=4, channels=2)
    assert torch.autograd.gradcheck(lambda s: fn(s, index, groups), (src.requires_grad_(),))


def test_scatter_max_gradient_goes_to_the_maximum():
    src = torch.tensor([[1.0], [5.0], [2.0], [3.0], [3.0]], requires_grad=True)
    scatter_max(src, torch.tensor([0, 0, 0, 1, 1]), 2).sum().backward()
    assert src.grad[:, 0].tolist() == [0.0, 1.0, 0.0, 0.5, 0.5]  # ties share


def test_scatter_rejects_mismatched_index():
    with pytest.raises(ValueError, match="index"):
        scatter_sum(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 2)


# ---------------------------------------------------------------- dynamic voxelization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "grid, frame_sizes, seed, dtype",
    [
        (EXACT_GRID, [300, 0, 500, 1], 0, torch.float32),
        (EXACT_GRID, [0, 0, 400], 1, torch.float64),
        (NUSCENES_GRID, [600, 800], 2, torch.float32),
        (VoxelGrid((0.1, 0.1, 0.15), (-75.2, -75.2, -2.0, 75.2, 75.2, 4.0)), [500, 0, 300], 3, torch.float32),
    ],
)
def test_dynamic_matches_reference(grid, frame_sizes, seed, dtype, device):
    points = _cloud(grid, frame_sizes, seed, dtype)
    groups, keys = _check_dynamic(dynamic_voxelize(points.to(device), grid), points, grid)
    assert len(keys) > 10 and max(len(v) for v in groups.values()) > 1


def test_dynamic_border_and_range_boundary_rules():
    g = EXACT_GRID  # x: [-4, 4) in 0.25 steps, y: [-3, 5) in 0.5, z: [-1, 1) in 0.125
    below_max = np.nextafter(np.float32(4.0), np.float32(-np.inf))
    pts = torch.tensor(
        [
            [-4.0, -3.0, -1.0],  # range min: kept, voxel (0, 0, 0)
            [0.25, 0.5, 0.125],  # on borders: the voxel whose min edge it is on
            [float(below_max), 4.999, 0.999],  # just below the max: last voxel
            [4.0, 0.0, 0.0],  # x max: dropped
            [0.0, 5.0, 0.0],  # y max: dropped
            [0.0, 0.0, -1.0001],  # below z min: dropped
        ]
    )
    out = dynamic_voxelize(PointBatch.from_frames([pts]), g)
    assert out.kept.tolist() == [True, True, True, False, False, False]
    assert sorted(map(tuple, out.coords.tolist())) == [(0, 0, 0, 0), (0, 9, 7, 17), (0, 15, 15, 31)]


def test_index_clamped_when_rounding_reaches_grid_size():
    # (nextafter(-1.5, -inf) + 5) / 0.05 rounds to exactly 70.0 = grid size in float64.
    g = VoxelGrid((0.05, 0.05, 0.05), (-5.0, -5.0, -5.0, -1.5, -1.5, -1.5))
    p = np.nextafter(-1.5, -np.inf)
    assert math.floor((p + 5.0) / 0.05) == g.grid_size[0] == 70
    out = dynamic_voxelize(PointBatch.from_frames([torch.tensor([[p, p, p]], dtype=torch.float64)]), g)
    assert out.kept.tolist() == [True] and out.coords.tolist() == [[0, 69, 69, 69]]


def test_dynamic_empty_inputs():
    for points in (
        PointBatch.from_frames([torch.zeros(0, 4)]),
        PointBatch.from_frames([torch.full((5, 4), 100.0), torch.zeros(0, 4)]),
    ):
        out = dynamic_voxelize(points, EXACT_GRID)
        assert out.coords.shape == (0, 4) and out.coords.dtype == torch.int32
        assert out.point_to_voxel.shape == (0,) and out.num_points.shape == (0,)
        assert out.kept.shape == (len(points.points),) and not out.kept.any()


def test_dynamic_invariant_to_point_order():
    points = _cloud(NUSCENES_GRID, [700, 300, 500], 4)
    perm = torch.randperm(len(points.points), generator=torch.Generator().manual_seed(0))
    shuffled = PointBatch(points.points[perm], points.batch_index[perm], points.batch_size)
    a, b = dynamic_voxelize(points, NUSCENES_GRID), dynamic_voxelize(shuffled, NUSCENES_GRID)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.num_points, b.num_points)
    assert torch.equal(a.kept[perm], b.kept)
    full_a = torch.full((len(perm),), -1, dtype=torch.long)
    full_a[a.kept] = a.point_to_voxel
    full_b = torch.full((len(perm),), -1, dtype=torch.long)
    full_b[b.kept] = b.point_to_voxel
    assert torch.equal(full_a[perm], full_b)


def test_voxel_of_point_sends_out_of_range_points_past_the_last_voxel():
    points = PointBatch.from_frames([torch.tensor([[0.1, 0.1, 0.1], [9.0, 0.0, 0.0], [0.1, 0.1, 0.1]]),
                                     torch.tensor([[-3.9, 4.9, 0.5]])])
    out = dynamic_voxelize(points, EXACT_GRID)
    assert len(out) == 2 and out.voxel_of_point.tolist() == [0, 2, 0, 1]
    assert out.num_points.tolist() == [2, 1] and out.point_to_voxel.tolist() == [0, 0, 1]


def test_keys_use_32_bits_when_the_grid_allows():
    small = voxel_keys(_cloud(NUSCENES_GRID, [50, 60], 6), NUSCENES_GRID)
    assert small.dtype == torch.int32 and small[-1] == 2 * math.prod(NUSCENES_GRID.spatial_shape)
    big = VoxelGrid((0.01, 0.01, 0.01), (-100.0, -100.0, -4.0, 100.0, 100.0, 4.0))
    assert voxel_keys(_cloud(big, [20], 7), big).dtype == torch.int64


@requires_cuda
@pytest.mark.parametrize("grid", [EXACT_GRID, NUSCENES_GRID])
def test_cuda_keys_equal_cpu_keys_bit_for_bit(grid):
    # On CUDA one Triton kernel computes the keys; the CPU path is torch's. Borders included.
    points = _cloud(grid, [500, 0, 700], 8)
    lo = torch.tensor(grid.point_cloud_range[:3])
    on_borders = lo + torch.randint(0, 20, (300, 3)) * torch.tensor(grid.voxel_size)
    frames = [points.points, on_borders.float(), torch.tensor([[1e4, 0.0, 0.0]] * 3)]
    batch = PointBatch.from_frames([f[:, :3].contiguous() for f in frames])
    assert torch.equal(voxel_keys(batch.to("cuda"), grid).cpu(), voxel_keys(batch, grid))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_voxelize_mean_equals_torch_path(dtype):
    # With deterministic algorithms on, voxelize_mean sums each voxel's run of sorted points (Triton);
    # the default path scatter-adds. Same voxels in the same order; means equal up to float rounding;
    # the deterministic one bitwise repeatable.
    grid = VoxelGrid(voxel_size=(0.2, 0.2, 0.25), point_cloud_range=(-10.0, -10.0, -2.0, 10.0, 10.0, 2.0))
    gen = torch.Generator().manual_seed(3)
    frames = [(torch.rand(n, 5, generator=gen, dtype=dtype) - 0.5) * 24 for n in (20000, 0, 7000)]
    batch = PointBatch.from_frames(frames).to("cuda")
    torch.use_deterministic_algorithms(True)
    try:
        (coords, features), (_, again) = voxelize_mean(batch, grid), voxelize_mean(batch, grid)
    finally:
        torch.use_deterministic_algorithms(False)
    ref_coords, ref_features = voxelize_mean(batch, grid)
    assert features.dtype == dtype and torch.equal(coords, ref_coords) and torch.equal(features, again)
    torch.testing.assert_close(features, ref_features)


def test_large_grid_keys_do_not_overflow():
    # 1 cm voxels over 200 x 200 x 8 m: 3.2e11 voxels per frame, far beyond int32.
    g = VoxelGrid((0.01, 0.01, 0.01), (-100.0, -100.0, -4.0, 100.0, 100.0, 4.0))
    points = _cloud(g, [200, 300, 0, 100], 5, torch.float64)
    _check_dynamic(dynamic_voxelize(points, g), points, g)
    with pytest.raises(ValueError, match="overflow"):
        dynamic_voxelize(points, VoxelGrid((1e-4,) * 3, (-1e4, -1e4, -1e4, 1e4, 1e4, 1e4)))


# ---------------------------------------------------------------- hard voxelization


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_points, max_voxels", [(3, None), (2, 15), (5, 1), (2, 200), (1, 1000)])
def test_hard_matches_reference(max_points, max_voxels, device):
    points = _cloud(EXACT_GRID, [400, 0, 250, 3], 6)
    out = hard_voxelize(points.to(device), EXACT_GRID, max_points, max_voxels)
    keys, dense, counts = _reference_hard(points, EXACT_GRID, max_points, max_voxels)
    assert isinstance(out, HardVoxels) and out.voxels.dtype == points.points.dtype
    assert out.coords.dtype == torch.int32 and out.num_points.dtype == torch.int64
    assert out.coords.cpu().tolist() == [list(k) for k in keys]
    assert out.num_points.cpu().tolist() == counts
    torch.testing.assert_close(out.voxels.cpu().double(), torch.from_numpy(dense))
    if max_voxels is not None:
        assert torch.bincount(out.coords[:, 0].long().cpu()).max() <= max_voxels


def test_hard_is_deterministic_and_order_dependent_as_documented():
    points = _cloud(EXACT_GRID, [600, 400], 7)
    a, b = (hard_voxelize(points, EXACT_GRID, 2, 20) for _ in range(2))
    assert torch.equal(a.voxels, b.voxels) and torch.equal(a.coords, b.coords)
    perm = torch.randperm(len(points.points), generator=torch.Generator().manual_seed(1))
    shuffled = PointBatch(points.points[perm], points.batch_index[perm], points.batch_size)
    c = hard_voxelize(shuffled, EXACT_GRID, 2, 20)
    keys, _, _ = _reference_hard(shuffled, EXACT_GRID, 2, 20)
    assert c.coords.tolist() == [list(k) for k in keys] and not torch.equal(a.coords, c.coords)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_points, max_voxels", [(3, None), (2, 15), (5, 1), (2, 200), (1, 1000), (4, 10_000)])
def test_hard_mean_is_the_mean_of_the_reference_voxels(max_points, max_voxels, device):
    """MeanVFE's hard path: the mean of the stored points of the loop reference, the cap binding
    (15, 1) or not (200: more voxels than that in all frames, not in any one; 1000, 10000: fewer in all)."""
    points = _cloud(EXACT_GRID, [400, 0, 250, 3], 6)
    coords, means = hard_voxelize_mean(points.to(device), EXACT_GRID, max_points, max_voxels)
    keys, dense, counts = _reference_hard(points, EXACT_GRID, max_points, max_voxels)
    assert coords.dtype == torch.int32 and means.dtype == points.points.dtype
    assert coords.cpu().tolist() == [list(k) for k in keys]
    expected = dense.sum(axis=1) / np.asarray(counts, dtype=np.float64)[:, None]
    torch.testing.assert_close(means.cpu().double(), torch.from_numpy(expected))


@pytest.mark.parametrize("max_points, max_voxels", [(2, None), (3, 40), (10, 160000)])
def test_hard_mean_float32_quantization_matches_loop(max_points, max_voxels):
    points = _cloud(NUSCENES_GRID, [500, 300], 11)
    coords, means = hard_voxelize_mean(points, NUSCENES_GRID, max_points, max_voxels, quantization="float32")
    keys, dense, counts = _reference_hard_float32(points, NUSCENES_GRID, max_points, max_voxels)
    assert coords.tolist() == [list(k) for k in keys]
    expected = dense.astype(np.float64).sum(axis=1) / np.asarray(counts, dtype=np.float64)[:, None]
    torch.testing.assert_close(means.double(), torch.from_numpy(expected), rtol=1e-6, atol=1e-6)


def test_hard_mean_empty_and_invalid():
    coords, means = hard_voxelize_mean(PointBatch.from_frames([torch.zeros(0, 5)]), EXACT_GRID, 4, 10)
    assert coords.shape == (0, 4) and means.shape == (0, 5)
    with pytest.raises(ValueError, match="caps must be >= 1"):
        hard_voxelize_mean(PointBatch.from_frames([torch.zeros(1, 4)]), EXACT_GRID, 0)


def test_hard_empty_and_invalid():
    out = hard_voxelize(PointBatch.from_frames([torch.zeros(0, 5)]), EXACT_GRID, 4, 10)
    assert out.voxels.shape == (0, 4, 5) and out.coords.shape == (0, 4) and out.num_points.shape == (0,)
    with pytest.raises(ValueError):
        hard_voxelize(PointBatch.from_frames([torch.zeros(1, 4)]), EXACT_GRID, 0)


def test_voxelizer_module():
    points = _cloud(EXACT_GRID, [200, 100], 8)
    dynamic = Voxelizer(list(EXACT_GRID.voxel_size), list(EXACT_GRID.point_cloud_range))
    assert dynamic.grid == EXACT_GRID
    assert torch.equal(dynamic(points).coords, dynamic_voxelize(points, EXACT_GRID).coords)
    hard = Voxelizer(EXACT_GRID.voxel_size, EXACT_GRID.point_cloud_range, "hard", 3, 7)
    ref = hard_voxelize(points, EXACT_GRID, 3, 7)
    out = hard(points)
    assert torch.equal(out.voxels, ref.voxels) and torch.equal(out.coords, ref.coords)
    with pytest.raises(ValueError):
        Voxelizer([0.1] * 3, [0, 0, 0, 1, 1, 1], "pillar")
    with pytest.raises(ValueError):
        Voxelizer([0.1] * 3, [0, 0, 0, 1, 1, 1], "hard")


# ---------------------------------------------------------------- float32 quantization (spconv's)


def _reference_hard_float32(points: PointBatch, grid, max_points, max_voxels):
    """spconv's ``PointToVoxel`` rule as a loop: float32 index arithmetic, no clamp, per-frame caps."""
    lo, size = np.float32(grid.point_cloud_range[:3]), np.float32(grid.voxel_size)
    extent = grid.grid_size
    pts, batch = points.points.float().cpu().numpy(), points.batch_index.cpu().numpy()
    voxels, opened = {}, {}
    for p, b in zip(pts, batch):
        index = [int(np.floor((p[i] - lo[i]) / size[i])) for i in range(3)]
        if not all(0 <= index[i] < extent[i] for i in range(3)):
            continue
        key = (int(b), index[2], index[1], index[0])
        if key not in voxels:
            if max_voxels is not None and opened.get(int(b), 0) >= max_voxels:
                continue
            opened[int(b)] = opened.get(int(b), 0) + 1
            voxels[key] = []
        if len(voxels[key]) < max_points:
            voxels[key].append(p)
    keys = sorted(voxels)
    dense = np.zeros((len(keys), max_points, pts.shape[1]), np.float32)
    for j, k in enumerate(keys):
        dense[j, : len(voxels[k])] = voxels[k]
    return keys, dense, [len(voxels[k]) for k in keys]


@pytest.mark.parametrize("max_points, max_voxels", [(2, None), (3, 40), (10, 160000)])
def test_float32_quantization_matches_loop(max_points, max_voxels):
    points = _cloud(NUSCENES_GRID, [500, 300], 11)
    out = hard_voxelize(points, NUSCENES_GRID, max_points, max_voxels, quantization="float32")
    keys, dense, counts = _reference_hard_float32(points, NUSCENES_GRID, max_points, max_voxels)
    assert out.coords.tolist() == [list(k) for k in keys] and out.num_points.tolist() == counts
    assert torch.equal(out.voxels, torch.from_numpy(dense))
    all_keys, _, all_counts = _reference_hard_float32(points, NUSCENES_GRID, len(points.points), None)
    dynamic = dynamic_voxelize(points, NUSCENES_GRID, "float32")
    assert dynamic.coords.tolist() == [list(k) for k in all_keys] and dynamic.num_points.tolist() == all_counts


def test_float32_quantization_equals_spconv_point_to_voxel():
    """The same voxels, points and caps as spconv's PointToVoxel (what OpenPCDet's data processor runs)."""
    utils = pytest.importorskip("spconv.pytorch.utils")
    points = _cloud(NUSCENES_GRID, [3000], 12, features=2)
    for max_points, max_voxels in [(10, 160000), (3, 200)]:
        ours = hard_voxelize(points, NUSCENES_GRID, max_points, max_voxels, quantization="float32")
        generator = utils.PointToVoxel(vsize_xyz=list(NUSCENES_GRID.voxel_size),
                                       coors_range_xyz=list(NUSCENES_GRID.point_cloud_range), num_point_features=5,
                                       max_num_voxels=max_voxels, max_num_points_per_voxel=max_points)
        voxels, coords, num = generator(points.points)
        order = torch.from_numpy(np.lexsort(coords.numpy().T[::-1].copy()))
        assert ours.coords[:, 1:].tolist() == coords[order].tolist()
        assert ours.num_points.tolist() == num[order].tolist()
        assert torch.equal(ours.voxels, voxels[order])


def test_float32_quantization_differs_from_float64_at_a_border():
    # x = -52.875 lies exactly on the border of voxels 14 and 15 (1.125 / 0.075 = 15); in float32,
    # 1.125 / float32(0.075) rounds to just below 15.
    points = PointBatch.from_frames([torch.tensor([[-52.875, 0.0, 0.0]])])
    assert dynamic_voxelize(points, NUSCENES_GRID).coords[0, 3].item() == 15
    assert dynamic_voxelize(points, NUSCENES_GRID, "float32").coords[0, 3].item() == 14


def test_quantization_is_checked():
    with pytest.raises(ValueError, match="quantization"):
        Voxelizer(EXACT_GRID.voxel_size, EXACT_GRID.point_cloud_range, quantization="float16")
    with pytest.raises(ValueError, match="quantization"):
        dynamic_voxelize(_cloud(EXACT_GRID, [4], 1), EXACT_GRID, "half")
