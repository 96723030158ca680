"""The synthetic world: geometry against brute-force references, scan physics, labels, sequences, API."""

from __future__ import annotations

import itertools
import time
from dataclasses import fields

import numpy as np
import pytest
from shapely.geometry import Polygon

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.synthetic import (
    CLASS_NAMES,
    Lidar,
    LidarConfig,
    LidarFrame,
    SceneConfig,
    SyntheticDataset,
    generate_frame,
    generate_sequence,
    make_scene,
    sequence_seed,
)
from voxsparse.data.synthetic.actors import Body, PedestrianModel
from voxsparse.data.synthetic.geometry import Primitives, ShapeBuilder, bev_overlap, yaw_matrix
from voxsparse.data.synthetic.lidar import GROUND
from voxsparse.data.synthetic.scene import Ground, Road

CLEAN = LidarConfig(beams=32, azimuth_resolution=0.4, range_noise=0.0, dropout=0.0, intensity_noise=0.0)


@pytest.fixture(scope="module")
def frame() -> LidarFrame:
    return generate_frame(3)


@pytest.fixture(scope="module")
def clean_scan():
    """A noise-free scan of a real scene, with the world it saw."""
    scene = make_scene(11, 1, CLEAN)
    pose = scene.ego_pose(0.0)
    world = Primitives.concat([scene.static, scene.actors_at(0.0).primitives])
    lidar = Lidar(CLEAN)
    scan = lidar.scan(world, scene.ground, pose, np.random.default_rng(0))
    hits = pose[:3, 3] + scan.range[:, None] * (lidar.directions[scan.ray] @ pose[:3, :3].T)
    return scene, world, pose, lidar, scan, hits


# ---------------------------------------------------------------------------------------------
# Float64 references: signed distances (negative inside), written independently of geometry.py.
# Points (..., 3) broadcast against the primitives' leading axes.


def _box_sdf(p: np.ndarray, b) -> np.ndarray:
    q = np.abs(np.einsum("...ji,...j->...i", b.rotation, p - b.center)) - b.half_size
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)


def _cylinder_sdf(p: np.ndarray, c) -> np.ndarray:
    radial = np.linalg.norm(p[..., :2] - c.center_xy, axis=-1) - c.radius
    axial = np.abs(p[..., 2] - c.z_range.mean(-1)) - 0.5 * (c.z_range[..., 1] - c.z_range[..., 0])
    q = np.stack([radial, axial], -1)
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)


def _spheroid_sdf(p: np.ndarray, s) -> np.ndarray:
    """Scaled implicit function: exact sign, ~distance near the surface."""
    scale = np.stack([s.radius, s.radius, s.vertical_radius], -1)
    return (np.linalg.norm((p - s.center) / scale, axis=-1) - 1.0) * scale.min(-1)


SDF = (_box_sdf, _cylinder_sdf, _spheroid_sdf)


def _take(prims, index):
    return type(prims)(**{f.name: getattr(prims, f.name)[index] for f in fields(prims)})


def _random_world(rng: np.random.Generator, n: int = 12) -> Primitives:
    b = ShapeBuilder()
    for _ in range(n):
        q = rng.normal(size=4)
        w, x, y, z = q / np.linalg.norm(q)  # uniformly random rotation from a unit quaternion
        rot = np.array(
            [
                [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
            ]
        )
        b.box(rng.uniform(-3, 3, 3), rng.uniform(0.1, 2.5, 3), 0.5, rotation=rot)
        b.cylinder(*rng.uniform(-3, 3, 2), -rng.uniform(0, 2), rng.uniform(0, 2), rng.uniform(0.05, 1.0), 0.5)
        b.spheroid(rng.uniform(-3, 3, 3), rng.uniform(0.1, 1.5), rng.uniform(0.1, 1.5), 0.5)
    return b.build()


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["box", "cylinder", "spheroid"])
def test_ray_intersection_matches_dense_marching(kind):
    """Analytic first hits against float64 marching (4 mm steps) refined by bisection."""
    rng = np.random.default_rng(kind)
    prims, sdf = list(_random_world(rng).sets())[kind], SDF[kind]
    centers = prims.local_bounds().mean(axis=1)
    step = 4e-3
    samples = np.arange(0.0, 20.0, step)
    rays = 200
    for _ in range(3):
        origin = rng.normal(size=3)
        origin *= 9.0 / np.linalg.norm(origin)
        index = rng.integers(0, len(prims), rays)
        # Half the rays aim close to their primitive's centre (mostly hits), half anywhere nearby.
        spread = np.where(np.arange(rays) < rays // 2, 0.3, 3.0)[:, None]
        target = rng.normal(0.0, 1.0, (rays, 3)) * spread + np.where(spread < 1, centers[index], 0.0)
        direction = (target - origin) / np.linalg.norm(target - origin, axis=1, keepdims=True)
        t = prims.intersect(origin, direction, index)

        along = origin + samples[None, :, None] * direction[:, None, :]
        inside = sdf(along, _take(prims, index[:, None])) <= 0
        found = np.flatnonzero(inside.any(axis=1))
        first = samples[np.argmax(inside[found], axis=1)]
        lo, hi, one = first - step, first, _take(prims, index[found])
        for _ in range(60):  # bisect the entry: a convex solid is entered once
            mid = 0.5 * (lo + hi)
            entered = sdf(origin + mid[:, None] * direction[found], one) <= 0
            lo, hi = np.where(entered, lo, mid), np.where(entered, mid, hi)
        assert len(found) > rays // 4
        np.testing.assert_allclose(t[found], hi, atol=1e-7)
        # Hits the marching stepped over must be grazing: chords under one step, points on the surface.
        grazing = np.setdiff1d(np.flatnonzero(np.isfinite(t)), found)
        assert len(grazing) <= rays // 50
        on_surface = sdf(origin + t[grazing, None] * direction[grazing], _take(prims, index[grazing]))
        assert np.all(np.abs(on_surface) < 1e-6)


def test_bev_overlap_matches_shapely():
    rng = np.random.default_rng(0)
    a = np.concatenate(
        [rng.uniform(-3, 3, (60, 2)), rng.uniform(0.2, 4, (60, 2)), rng.uniform(-4, 4, (60, 1))], 1
    )
    b = np.concatenate(
        [rng.uniform(-3, 3, (50, 2)), rng.uniform(0.2, 4, (50, 2)), rng.uniform(-4, 4, (50, 1))], 1
    )
    polys = [[_polygon(r) for r in rects] for rects in (a, b)]
    ref = np.array([[pa.intersection(pb).area > 1e-9 for pb in polys[1]] for pa in polys[0]])
    got = bev_overlap(a, b)
    # Touching rectangles (zero-area contact) may go either way; there are none at random.
    assert np.array_equal(got, ref)


def _polygon(rect) -> Polygon:
    x, y, length, width, yaw = rect[:5]
    c, s = np.cos(yaw), np.sin(yaw)
    half = [
        (length / 2, width / 2),
        (length / 2, -width / 2),
        (-length / 2, -width / 2),
        (-length / 2, width / 2),
    ]
    return Polygon([(x + c * u - s * v, y + s * u + c * v) for u, v in half])


# ---------------------------------------------------------------------------------------------
# The scan: culling, ground, surfaces, occlusion.


def test_culled_scan_matches_all_pairs(clean_scan):
    scene, world, pose, lidar, scan, _ = clean_scan
    origin, directions = pose[:3, 3], lidar.directions @ pose[:3, :3].T
    rays = np.arange(0, lidar.num_rays, 5)
    best = scene.ground.intersect(origin, directions[rays], CLEAN.max_range)
    for prims in world.sets():
        for j in range(len(prims)):
            best = np.minimum(best, prims.intersect(origin, directions[rays], np.full(len(rays), j)))
    expected = np.where((best >= CLEAN.min_range) & (best <= CLEAN.max_range), best, np.inf)
    got = np.full(lidar.num_rays, np.inf)
    got[scan.ray] = scan.range
    np.testing.assert_array_equal(got[rays], expected)


def _on_ground(points: np.ndarray, scene) -> np.ndarray:
    """(P,) whether world points lie on the terrain or on a curb face (the step at a road edge)."""
    ground, road = scene.ground, scene.road
    flat = np.abs(points[:, 2] - ground.height(points[:, 0], points[:, 1])) < 1e-4
    edge = np.isclose(np.abs(points[:, 1]), road.half_width, atol=1e-6)
    if road.cross_x is not None:
        edge |= np.isclose(np.abs(points[:, 0] - road.cross_x), road.cross_half_width, atol=1e-6)
    smooth = ground.smooth_height(points[:, 0], points[:, 1])
    return flat | edge & (points[:, 2] >= smooth - 1e-4) & (
        points[:, 2] <= smooth + ground.curb_height + 1e-4
    )


def test_ground_matches_dense_reference(clean_scan):
    scene, _, pose, lidar, _, _ = clean_scan
    ground, origin = scene.ground, pose[:3, 3]
    d = lidar.directions @ pose[:3, :3].T
    d = d[np.flatnonzero(d[:, 2] < 0)[::23]]
    got = ground.intersect(origin, d, 75.0)
    # Reference: 4000 samples along each ray, then bisection of the first one below the ground.
    samples = np.linspace(0.0, 75.0, 4001)
    ref = np.full(len(d), np.inf)
    for rays in np.array_split(np.arange(len(d)), 8):
        p = origin + samples[None, :, None] * d[rays, None, :]
        below = p[..., 2] <= ground.height(p[..., 0], p[..., 1])
        hit = below.any(axis=1)
        k = np.argmax(below[hit], axis=1)
        lo, hi, dd = samples[k - 1], samples[k], d[rays[hit]]
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            q = origin + mid[:, None] * dd
            down = q[:, 2] <= ground.height(q[:, 0], q[:, 1])
            lo, hi = np.where(down, lo, mid), np.where(down, mid, hi)
        ref[rays[hit]] = hi
    assert np.array_equal(np.isfinite(got), np.isfinite(ref))
    got, ref, dd = got[np.isfinite(ref)], ref[np.isfinite(ref)], d[np.isfinite(ref)]
    close = np.abs(got - ref) < 5e-3
    assert close.mean() > 0.998
    # Disagreements are crossings thinner than the reference's 19 mm sampling (a ray clipping a
    # curb's edge): ours come first and lie on the ground.
    assert np.all(got[~close] < ref[~close])
    assert np.all(_on_ground(origin + got[:, None] * dd, scene))


def test_points_lie_on_visible_surfaces(clean_scan):
    scene, world, _, _, scan, hits = clean_scan
    assert _on_ground(hits[scan.owner == GROUND], scene).all()

    rng = np.random.default_rng(0)
    sample = rng.choice(len(hits), 4000, replace=False)
    p = hits[sample][:, None, :]
    d = np.concatenate([f(p, prims) for f, prims in zip(SDF, world.sets())], axis=1)
    owners = world.owners()
    # Nothing is ever seen inside a solid: the ray would have met that solid first.
    assert d.min() > -1e-6
    objects = scan.owner[sample] != GROUND
    same_owner = owners[None, :] == scan.owner[sample][:, None]
    distance_to_own = np.where(same_owner, np.abs(d), np.inf).min(1)
    assert np.all(distance_to_own[objects] < 1e-6)


def test_wall_occludes_the_box_behind_it():
    ground = Ground(Road(1, 3.5, 0.0, 0.0, 3.0, None, 1, 0.1), np.zeros((0, 4)), 0.0)
    pose = np.eye(4)
    pose[2, 3] = 1.8
    lidar = Lidar(CLEAN)

    def owner_counts(with_wall: bool) -> np.ndarray:
        parts = []
        for owner, (center, size) in enumerate(
            [((15.0, 0.0, 1.0), (2.0, 2.0, 2.0)), ((10.0, 0.0, 3.0), (0.3, 12.0, 6.0))]
        ):
            if owner == 1 and not with_wall:
                continue
            b = ShapeBuilder()
            b.box(center, size, 0.5)
            parts.append(b.build(owner))
        scan = lidar.scan(Primitives.concat(parts), ground, pose, np.random.default_rng(0))
        return np.bincount(scan.owner[scan.owner >= 0], minlength=2)

    assert owner_counts(with_wall=False)[0] > 50
    hidden, wall = owner_counts(with_wall=True)
    assert hidden == 0 and wall > 100


def test_scan_ranges_intensity_and_field_of_view(frame):
    p = frame.points
    assert p.dtype == np.float32 and p.shape[1] == 4
    assert 50_000 < len(p) < 115_200
    r = np.linalg.norm(p[:, :3], axis=1)
    cfg = LidarConfig()
    assert r.min() > cfg.min_range - 0.2 and r.max() < cfg.max_range + 0.2
    elevation = np.degrees(np.arcsin(p[:, 2] / r))
    assert elevation.min() > cfg.fov_down - 0.1 and elevation.max() < cfg.fov_up + 0.1
    assert p[:, 3].min() >= 0 and p[:, 3].max() <= 1 and p[:, 3].std() > 0.05
    # The ground around the sensor (the densest height level nearby) sits near -mount_height.
    counts, edges = np.histogram(p[np.hypot(p[:, 0], p[:, 1]) < 10, 2], bins=np.arange(-3.0, 3.0, 0.1))
    assert abs(edges[np.argmax(counts)] + 0.05 + cfg.mount_height) < 0.1


# ---------------------------------------------------------------------------------------------
# Labels.


def test_num_points_and_difficulty_recount(frame):
    p = frame.points[:, :3].astype(np.float64)
    for box, n, level in zip(frame.boxes.astype(np.float64), frame.num_points, frame.difficulty):
        c, s = np.cos(box[6]), np.sin(box[6])
        rel = p - box[:3]
        local = np.stack([rel[:, 0] * c + rel[:, 1] * s, rel[:, 1] * c - rel[:, 0] * s, rel[:, 2]], 1)
        assert n == np.all(np.abs(local) <= box[3:6] / 2, axis=1).sum()
        assert level == (2 if n <= 5 else 1)
    assert np.all(frame.num_points > 0)
    assert set(frame.difficulty.tolist()) <= {1, 2}


def test_boxes_are_tight_and_stand_on_the_ground():
    scene = make_scene(5, 3)
    for t in (0.0, 0.2):
        states = scene.actors_at(t)
        boxes = states.boxes
        # Each actor's primitives in its box frame: their extents must touch the box faces.
        owners = states.primitives.owners()
        local = Primitives(*(_into_box_frames(prims, boxes) for prims in states.primitives.sets()))
        bounds = local.local_bounds()
        for k in range(len(boxes)):
            mine = bounds[owners == k]
            lo, hi, half = mine[:, 0].min(0), mine[:, 1].max(0), boxes[k, 3:6] / 2
            if states.labels[k] == 1:  # pedestrians: symmetric about the body in x and y
                np.testing.assert_allclose(np.maximum(-lo[:2], hi[:2]), half[:2], atol=1e-9)
                assert np.all(-lo[:2] <= half[:2] + 1e-9) and np.all(hi[:2] <= half[:2] + 1e-9)
            else:
                np.testing.assert_allclose(lo[:2], -half[:2], atol=1e-9)
                np.testing.assert_allclose(hi[:2], half[:2], atol=1e-9)
            np.testing.assert_allclose([lo[2], hi[2]], [-half[2], half[2]], atol=1e-9)
        bottom = boxes[:, 2] - boxes[:, 5] / 2
        np.testing.assert_allclose(bottom, scene.ground.height(boxes[:, 0], boxes[:, 1]), atol=0.01)


def _into_box_frames(prims, boxes: np.ndarray):
    """Primitives moved into their owner's box frame (x along the heading, origin at the centre)."""
    heading, centre = boxes[prims.owner, 6], boxes[prims.owner, :3]
    return prims.moved(-heading, -np.einsum("mij,mj->mi", yaw_matrix(-heading), centre))


@pytest.mark.parametrize("speed", [0.5, 1.2, 1.8])
def test_a_walker_is_front_back_asymmetric(speed):
    """Over one stride, a walker's bent elbows carry the wrists in front of the shoulders, the flexing
    swing knee puts the knees ahead of the hip-ankle line and the shins trailing behind the hips, as
    in a real gait: cues that tell its front from its back in a scan. (A stride mirrored front to
    back would flip every sign.)"""
    model = PedestrianModel(Body(1.75, 1.0, 0.3, 0.3), speed, 0.4, (0.0, 0.0, 0.0, 0.0), 0.1, False)
    amplitude = min(0.32, 0.1 + 0.12 * speed)
    period = 4 * (model.body.thigh + model.body.shin) * np.sin(amplitude) / speed
    joints = np.stack([model.shape(t).keypoints for t in np.linspace(0.0, period, 24, endpoint=False)])
    x = {name: joints[:, [KEYPOINT_NAMES.index(f"{side}_{name}") for side in ("left", "right")], 0]
         for name in ("wrist", "shoulder", "hip", "knee", "ankle")}
    assert (x["wrist"] - x["shoulder"]).mean() > 0.06
    assert (x["ankle"] - x["hip"]).mean() < -0.06
    assert (x["knee"] - 0.5 * (x["hip"] + x["ankle"])).mean() > 0.03


def test_boxes_in_lidar_frame_sit_on_the_ground(frame):
    scene = make_scene(3)
    pose = frame.ego_pose
    world = frame.boxes[:, :3].astype(np.float64) @ pose[:3, :3].T + pose[:3, 3]
    bottom = world[:, 2] - frame.boxes[:, 5] / 2
    np.testing.assert_allclose(bottom, scene.ground.height(world[:, 0], world[:, 1]), atol=0.01)


def test_keypoints_inside_pedestrian_boxes(frame):
    humans = frame.labels == CLASS_NAMES.index("Pedestrian")
    assert humans.sum() >= 3 and frame.keypoints.shape[1:] == (len(KEYPOINT_NAMES), 3)
    for box, kps in zip(frame.boxes[humans], frame.keypoints[humans]):
        c, s = np.cos(box[6]), np.sin(box[6])
        rel = kps - box[:3]
        local = np.stack([rel[:, 0] * c + rel[:, 1] * s, rel[:, 1] * c - rel[:, 0] * s, rel[:, 2]], 1)
        assert np.all(np.abs(local) <= box[3:6] / 2 + 1e-4)
    assert np.all(frame.keypoints[~humans] == 0) and not frame.keypoint_visibility[~humans].any()
    visible = frame.keypoint_visibility[humans]
    assert 0.1 < visible.mean() < 0.95  # some joints are hidden behind bodies or other objects


def test_class_counts_sizes_and_no_overlaps():
    cfg = SceneConfig()
    for seed in range(4):
        scene = make_scene(seed, 5)
        labels = np.array([a.model.label for a in scene.actors])
        counts = np.bincount(labels, minlength=3)
        for count, (lo, hi) in zip(counts, [cfg.num_vehicles, cfg.num_pedestrians, cfg.num_cyclists]):
            assert lo <= count <= hi
        footprints = [_polygon(f) for f in scene.footprints]
        for t in np.arange(5) / cfg.frame_rate:
            states = scene.actors_at(t)
            boxes = states.boxes
            dims = {label: boxes[states.labels == label, 3:6] for label in range(3)}
            assert np.all((dims[0] >= (3.8, 1.7, 1.4)) & (dims[0] <= (7.0, 2.5, 3.0)))
            assert np.all((dims[1] >= (0.3, 0.4, 1.45)) & (dims[1] <= (1.0, 0.9, 1.95)))
            assert np.all((dims[2] >= (1.5, 0.5, 1.5)) & (dims[2] <= (1.95, 0.8, 1.9)))
            polys = [_polygon(b[[0, 1, 3, 4, 6]]) for b in boxes]
            for i in range(len(polys)):
                assert all(polys[i].intersection(polys[j]).area == 0 for j in range(i + 1, len(polys)))
                assert all(polys[i].intersection(f).area == 0 for f in footprints)
            distance = np.hypot(*(boxes[:, :2] - scene.ego_pose(t)[:2, 3]).T)
            assert t > 0 or distance.max() <= cfg.radius + 0.5
        # Vehicles follow the lanes: headings within a few degrees of the street axes.
        vehicles = np.array([a.heading for a in scene.actors if a.model.label == 0])
        off_axis = np.abs((vehicles + np.pi / 4) % (np.pi / 2) - np.pi / 4)
        assert np.all(off_axis < np.radians(6))


# ---------------------------------------------------------------------------------------------
# Sequences, determinism, splits, dataset.


def test_velocity_matches_displacement():
    cfg = SceneConfig(ego_speed=(5.0, 10.0))
    frames = generate_sequence(2, 3, CLEAN, cfg)
    moved = 0
    for a, b in itertools.pairwise(frames):
        dt = b.timestamp - a.timestamp
        assert dt == pytest.approx(1 / cfg.frame_rate)
        assert np.linalg.norm(b.ego_pose[:2, 3] - a.ego_pose[:2, 3]) > 0.4  # the ego drives
        for i, track in enumerate(a.track_ids):
            j = np.flatnonzero(b.track_ids == track)
            if len(j) == 0:
                continue
            j = j[0]
            assert a.labels[i] == b.labels[j]
            start = a.ego_pose[:3, :3] @ a.boxes[i, :3] + a.ego_pose[:3, 3]
            end = b.ego_pose[:3, :3] @ b.boxes[j, :3] + b.ego_pose[:3, 3]
            velocity = a.ego_pose[:2, :2] @ a.boxes[i, 7:9]  # LiDAR axes -> world axes
            np.testing.assert_allclose((end - start)[:2] / dt, velocity, atol=2e-3)
            np.testing.assert_allclose(b.ego_pose[:2, :2] @ b.boxes[j, 7:9], velocity, atol=1e-4)
            moved += np.linalg.norm(velocity) > 0.3
    assert moved > 10


def test_same_seed_same_frame_bit_for_bit(frame):
    again = generate_frame(3)
    for f in fields(LidarFrame):
        x, y = getattr(frame, f.name), getattr(again, f.name)
        assert (x.tobytes() == y.tobytes() and x.dtype == y.dtype) if isinstance(x, np.ndarray) else x == y, (
            f.name
        )
    other = generate_frame(4)
    assert len(other.points) != len(frame.points) or not np.array_equal(other.points, frame.points)


def test_split_seeds_never_overlap():
    seeds = {
        split: {
            sequence_seed(split, seed, i)
            for seed in (0, 1, 7, (1 << 28) - 1)
            for i in (0, 1, 5, (1 << 32) - 1)
        }
        for split in ("train", "val", "test")
    }
    assert len(seeds["train"]) == 16
    assert (
        not seeds["train"] & seeds["val"]
        and not seeds["train"] & seeds["test"]
        and not seeds["val"] & seeds["test"]
    )
    with pytest.raises(ValueError):
        sequence_seed("training", 0, 0)
    with pytest.raises(ValueError):
        sequence_seed("train", 1 << 28, 0)
    small = {"beams": 8, "azimuth_resolution": 2.0}
    train, val = SyntheticDataset("train", 2, lidar=small)[0], SyntheticDataset("val", 2, lidar=small)[0]
    assert train.frame_id != val.frame_id and not np.array_equal(train.ego_pose, val.ego_pose)


def test_dataset_sequences_cache_and_configs(tmp_path):
    small = LidarConfig(beams=16, azimuth_resolution=1.0)
    ds = SyntheticDataset("val", num_frames=4, seed=3, lidar=small, sequence_length=2, cache_dir=tmp_path)
    assert len(ds) == 4 and SyntheticDataset.class_names == CLASS_NAMES
    first, second = ds[0], ds[1]
    assert isinstance(first, LidarFrame) and first.frame_id == "synthetic-val-3-000000-000"
    assert second.timestamp == pytest.approx(0.1) and set(first.track_ids) & set(second.track_ids)
    cached = ds[1]  # read back from the .npz written by the first call
    assert len(list(tmp_path.glob("*.npz"))) == 2
    for f in fields(LidarFrame):
        x, y = getattr(second, f.name), getattr(cached, f.name)
        assert np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
    assert ds[-1].frame_id == "synthetic-val-3-000001-001"
    with pytest.raises(IndexError):
        ds[4]
    # Hydra hands configs over as mappings with lists.
    from_mapping = SyntheticDataset(
        "val", 1, lidar={"beams": 16, "azimuth_resolution": 1.0}, scene={"num_cyclists": [1, 2]}
    )
    assert from_mapping.scene_config.num_cyclists == (1, 2)
    with pytest.raises(ValueError):
        LidarFrame(
            **{**{f.name: getattr(first, f.name) for f in fields(LidarFrame)}, "labels": first.labels[:-1]}
        )


def test_generation_time_of_a_64_beam_frame():
    generate_frame(0)  # warm caches and imports
    start = time.process_time()
    frame = generate_frame(1)
    seconds = time.process_time() - start
    counts = np.bincount(frame.labels, minlength=3)
    print(
        f"\n64-beam frame: {seconds:.3f} s CPU, {len(frame.points)} points, "
        f"objects per class {counts.tolist()}"
    )
    assert seconds < 5.0
