"""GT sampling and the global transforms: collisions checked with shapely polygons, pasted points
against the database, untouched points and boxes, fade by epoch, and points / boxes / velocities /
keypoints kept consistent through the whole chain."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from shapely.geometry import Polygon

from voxsparse.data.gt_database import GTDatabase
from voxsparse.data.prepared import PreparedDataset, PreparedFrame, prepare
from voxsparse.data.sample import Sample
from voxsparse.data.transforms import (
    Faded,
    GlobalAugment,
    GlobalTranslate,
    GTSampling,
    RangeFilter,
    ShufflePoints,
)

CLASSES = ("Vehicle", "Pedestrian", "Cyclist")
SIZES = {0: (4.5, 1.9, 1.6), 1: (0.8, 0.8, 1.8), 2: (1.8, 0.7, 1.7)}
FEATURES = ("x", "y", "z", "intensity", "time_lag")


def make_frame(frame_id: str, seed: int, num_boxes: int) -> PreparedFrame:
    """Boxes on a jittered grid (never overlapping), points filling each box and a ground plane."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(100, num_boxes, replace=False)
    labels = rng.integers(0, 3, num_boxes)
    boxes = np.zeros((num_boxes, 9), np.float32)
    for k, (cell, label) in enumerate(zip(cells, labels)):
        boxes[k, :2] = (cell % 10 - 4.5) * 8 + rng.uniform(-1, 1), (cell // 10 - 4.5) * 8 + rng.uniform(-1, 1)
        boxes[k, 3:6] = SIZES[int(label)]
        boxes[k, 2] = boxes[k, 5] / 2
        boxes[k, 6] = rng.uniform(-math.pi, math.pi)
        boxes[k, 7:9] = rng.normal(0, 3, 2)
    counts = rng.integers(0, 40, num_boxes)
    counts[: min(2, num_boxes)] = 2  # a few sparse objects, filtered by min_points
    clouds = []
    for box, n in zip(boxes, counts):
        local = (rng.random((n, 3)) - 0.5) * 0.9 * box[3:6]
        c, s = math.cos(box[6]), math.sin(box[6])
        xyz = np.stack([c * local[:, 0] - s * local[:, 1], s * local[:, 0] + c * local[:, 1], local[:, 2]], 1)
        clouds.append(xyz + box[:3])
    # Ground just below every box, so no point lies on a face (where float32 rounding decides).
    clouds.append(np.column_stack([rng.uniform(-45, 45, (3000, 2)), np.full(3000, -0.2)]))
    # Clutter in the free space, some of it where pasted objects will go (and must displace it).
    clouds.append(np.column_stack([rng.uniform(-45, 45, (3000, 2)), rng.uniform(0.05, 1.5, 3000)]))
    xyz = np.concatenate(clouds)
    points = np.column_stack([xyz, rng.random(len(xyz)), rng.choice([0.0, 0.05, 0.1], len(xyz))]).astype(
        np.float32
    )
    keypoints = (boxes[:, None, :3] + rng.normal(0, 0.3, (num_boxes, 14, 3))).astype(np.float32)
    keypoints[labels != 1] = 0.0
    visibility = (rng.random((num_boxes, 14)) < 0.7) & (labels == 1)[:, None]
    return PreparedFrame(
        frame_id=frame_id,
        points=points,
        boxes=boxes,
        labels=labels.astype(np.int64),
        num_points=counts.astype(np.int64),
        difficulty=rng.integers(1, 3, num_boxes),
        track_ids=np.arange(num_boxes, dtype=np.int64),
        keypoints=keypoints,
        keypoint_visibility=visibility,
        point_features=FEATURES,
    )


def source_frames(task: int) -> list[PreparedFrame]:
    return [make_frame(f"src-{task}-{i}", 100 * task + i, 12) for i in range(3)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(
        source_frames,
        {"t0": 0, "t1": 1},
        out,
        "train",
        1,
        class_names=CLASSES,
        gt_database=True,
        progress=False,
    )
    return out


def scene(seed: int = 7, num_boxes: int = 6, keypoints: bool = True) -> Sample:
    frame = make_frame("scene", seed, num_boxes)
    if not keypoints:
        frame = replace(frame, keypoints=None, keypoint_visibility=None)
    return Sample.from_frame(frame)


def inside(points: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Brute force, float64: (N,) whether points lie in the closed box."""
    d = points[:, :3].double() - box[:3].double()
    c, s = math.cos(float(box[6])), math.sin(float(box[6]))
    u, v = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
    return (u.abs() <= box[3] / 2) & (v.abs() <= box[4] / 2) & (d[:, 2].abs() <= box[5] / 2)


def polygon(box: torch.Tensor) -> Polygon:
    x, y, dx, dy, h = (float(box[i]) for i in (0, 1, 3, 4, 6))
    c, s = math.cos(h), math.sin(h)
    return Polygon(
        [
            (x + c * u - s * v, y + s * u + c * v)
            for u, v in ((-dx / 2, -dy / 2), (dx / 2, -dy / 2), (dx / 2, dy / 2), (-dx / 2, dy / 2))
        ]
    )


def sorted_rows(a: torch.Tensor | np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[np.lexsort(a.T[::-1])]


def gt_sampling(root, **kwargs) -> GTSampling:
    groups = {"Vehicle": 8, "Pedestrian": 6, "Cyclist": 6}
    args = {"root": str(root), "split": "train", "sample_groups": groups, "min_points": 5}
    return GTSampling(**{**args, **kwargs})


def test_pasted_objects_never_overlap_and_carry_database_points(root):
    db = GTDatabase.load(root / "train" / "gt_database")
    sampler = gt_sampling(root)
    before = scene()
    k0 = len(before.annotations)
    pasted_total = 0
    for seed in range(8):
        after = sampler(before, torch.Generator().manual_seed(seed))
        ann = after.annotations
        new = ann.boxes.tensor[k0:]
        pasted_total += len(new)
        # The scene's own annotations are untouched.
        torch.testing.assert_close(ann.boxes.tensor[:k0], before.annotations.boxes.tensor, rtol=0, atol=0)
        polys = [polygon(b) for b in ann.boxes.tensor]
        for i in range(k0, len(polys)):
            for j in range(len(polys)):
                if j != i:
                    assert polys[i].intersection(polys[j]).area == 0.0, (seed, i, j)
        pasted_points = []
        for i, box in enumerate(new):
            # The database object this box came from: identical box, class at least min_points.
            match = np.flatnonzero((db.boxes[:, :7] == box[:7].numpy()).all(1))
            assert len(match) == 1
            j = int(match[0])
            assert ann.labels[k0 + i] == db.labels[j] and db.num_points[j] >= 5
            assert ann.num_points[k0 + i] == db.num_points[j] and ann.track_ids[k0 + i] == -1
            np.testing.assert_array_equal(ann.keypoints[k0 + i].numpy(), db.keypoints[j])
            # The points inside a pasted box are exactly the object's database points.
            np.testing.assert_array_equal(
                sorted_rows(after.points[inside(after.points, box)]), sorted_rows(db.object_points(j))
            )
            pasted_points.append(db.object_points(j))
        # Every other point is a scene point outside the pasted boxes, none lost.
        in_new = torch.zeros(len(before.points), dtype=torch.bool)
        for box in new:
            in_new |= inside(before.points, box)
        expected = np.concatenate([before.points[~in_new].numpy(), *pasted_points])
        np.testing.assert_array_equal(sorted_rows(after.points), sorted_rows(expected))
    assert pasted_total > 20  # the test pasted something


def test_targets_count_the_scene_objects_and_pools_respect_min_points(root):
    base = scene(seed=3, num_boxes=10)
    have = torch.bincount(base.annotations.labels, minlength=3)
    groups = {name: int(have[i]) for i, name in enumerate(CLASSES)}
    same = gt_sampling(root, sample_groups=groups)(base, torch.Generator().manual_seed(0))
    assert len(same.annotations) == len(base.annotations)
    more = gt_sampling(root, sample_groups=groups, limit_whole_scene=False)(
        base, torch.Generator().manual_seed(0)
    )
    assert len(more.annotations) > len(base.annotations)
    # Draws respect the per-class floor.
    sampler = gt_sampling(root, min_points={"Vehicle": 30, "Pedestrian": 0})
    db = sampler.database
    for label, pool, _ in sampler.groups:
        floor = {0: 30, 1: 0, 2: 0}[label]
        expected = np.flatnonzero((db.labels == label) & (db.num_points >= floor))
        np.testing.assert_array_equal(pool, expected)


def test_pasted_labels_follow_the_samples_class_order(root):
    db = GTDatabase.load(root / "train" / "gt_database")
    order = (CLASSES[2], CLASSES[0], CLASSES[1])
    sampler = gt_sampling(root, class_names=order)
    base = scene()
    k0 = len(base.annotations)
    after = sampler(base, torch.Generator().manual_seed(1))
    pasted = after.annotations
    assert len(pasted) > k0
    for i in range(k0, len(pasted)):
        (j,) = np.flatnonzero((db.boxes[:, :7] == pasted.boxes.tensor[i, :7].numpy()).all(1))
        assert order[int(pasted.labels[i])] == db.class_names[db.labels[j]]
    with pytest.raises(ValueError, match="not a reordering"):
        gt_sampling(root, class_names=CLASSES[:2])


def test_fade_switches_pasting_off_for_the_last_epochs(root):
    sampler = gt_sampling(root, fade_epochs=2, total_epochs=5)
    base = scene()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        out = sampler(base, torch.Generator().manual_seed(1))
        assert (len(out.annotations) > len(base.annotations)) == (epoch < 3), epoch
        if epoch >= 3:
            assert out is base


def test_samples_without_keypoints_and_column_selection(root):
    base = scene(keypoints=False)
    out = gt_sampling(root)(base, torch.Generator().manual_seed(0))
    assert out.annotations.keypoints is None and len(out.annotations) > len(base.annotations)
    narrow = Sample.from_frame(replace(make_frame("s", 7, 6), point_features=FEATURES))
    narrow = replace(narrow, points=narrow.points[:, :4])
    out = gt_sampling(root, point_features=["x", "y", "z", "intensity"])(
        narrow, torch.Generator().manual_seed(0)
    )
    assert out.points.shape[1] == 4 and len(out.annotations) > len(narrow.annotations)
    with pytest.raises(ValueError, match="point columns"):
        gt_sampling(root)(narrow, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"classes \['Truck'\] not in"):
        gt_sampling(root, sample_groups={"Truck": 2})
    with pytest.raises(FileNotFoundError, match="GT database .*not found"):
        gt_sampling(root, split="val")


def test_global_translate_moves_everything_but_velocities():
    base = scene()
    out = GlobalTranslate(std=(0.5, 0.5, 0.2))(base, torch.Generator().manual_seed(4))
    offset = out.points[0, :3] - base.points[0, :3]
    assert offset.abs().min() > 0
    torch.testing.assert_close(out.points[:, :3], base.points[:, :3] + offset)
    torch.testing.assert_close(out.points[:, 3:], base.points[:, 3:], rtol=0, atol=0)
    b0, b1 = base.annotations.boxes.tensor, out.annotations.boxes.tensor
    torch.testing.assert_close(b1[:, :3], b0[:, :3] + offset)
    torch.testing.assert_close(b1[:, 3:], b0[:, 3:], rtol=0, atol=0)
    k0, k1 = base.annotations.keypoints, out.annotations.keypoints
    present = k0.flatten(1).ne(0).any(1)
    torch.testing.assert_close(k1[present], k0[present] + offset)
    assert (k1[~present] == 0).all()


def box_frame(vectors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(K, ..., 2) xy vectors expressed in each box's heading frame."""
    c, s = torch.cos(boxes[:, 6]), torch.sin(boxes[:, 6])
    shape = (-1,) + (1,) * (vectors.dim() - 2)
    c, s = c.view(shape), s.view(shape)
    return torch.stack(
        [c * vectors[..., 0] + s * vectors[..., 1], -s * vectors[..., 0] + c * vectors[..., 1]], -1
    )


@pytest.mark.parametrize("seed,flip_x", [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (0, 1.0), (1, 1.0)])
def test_chain_keeps_points_boxes_velocities_keypoints_consistent(root, seed, flip_x):
    chain = [
        gt_sampling(root),
        GlobalAugment(flip_probability=0.5, rotation=(-math.pi, math.pi), scale=(0.9, 1.1), flip_x_probability=flip_x),
        GlobalTranslate(std=(0.5, 0.5, 0.5)),
        ShufflePoints(),
    ]
    generator = torch.Generator().manual_seed(seed)
    pasted = chain[0](scene(), generator)
    out = pasted
    for transform in chain[1:]:
        out = transform(out, generator)
    b0, b1 = pasted.annotations.boxes.tensor.double(), out.annotations.boxes.tensor.double()
    scale = b1[0, 3] / b0[0, 3]
    torch.testing.assert_close(b1[:, 3:6], b0[:, 3:6] * scale)
    # Each box holds the same number of points (closed boxes; float32 slack on faces aside).
    for a, b in zip(b0, b1):
        assert int(inside(pasted.points, a).sum()) == int(inside(out.points, b).sum())
    # Velocity in the box's frame: along-heading part scaled, across part scaled up to mirroring.
    v0, v1 = box_frame(b0[:, 7:9], b0), box_frame(b1[:, 7:9], b1)
    torch.testing.assert_close(v1[:, 0], v0[:, 0] * scale, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v1[:, 1].abs(), v0[:, 1].abs() * scale, atol=1e-4, rtol=1e-4)
    # Keypoints keep their distance to the box centre (times the scale) and stay with their box.
    k0, k1 = pasted.annotations.keypoints.double(), out.annotations.keypoints.double()
    people = pasted.annotations.labels == 1
    d0 = (k0[people] - b0[people, None, :3]).norm(dim=-1)
    d1 = (k1[people] - b1[people, None, :3]).norm(dim=-1)
    torch.testing.assert_close(d1.sort(-1).values, d0.sort(-1).values * scale, atol=1e-4, rtol=1e-4)
    assert (
        pasted.annotations.keypoint_visibility[people].sum()
        == out.annotations.keypoint_visibility[people].sum()
    )
    # The crop still applies afterwards.
    cropped = RangeFilter((-20, -20, -5, 20, 20, 5))(out)
    assert (cropped.points[:, :2].abs() < 20).all()


def test_prepared_split_feeds_gt_sampling_end_to_end(root):
    ds = PreparedDataset(root, "train", min_points=1)
    sample = Sample.from_frame(ds[0])
    out = gt_sampling(root)(sample, torch.Generator().manual_seed(0))
    assert len(out.annotations) >= len(sample.annotations)


def test_faded_transform_is_off_for_the_last_epochs(root):
    sampler = gt_sampling(root)
    faded = Faded(sampler, fade_epochs=1, total_epochs=3)
    base = scene()
    for epoch in range(3):
        faded.set_epoch(epoch)
        out = faded(base, torch.Generator().manual_seed(0))
        assert (len(out.annotations) > len(base.annotations)) == (epoch < 2), epoch
    assert sampler.epoch == 2  # the epoch reaches the wrapped transform


def test_detection_dataset_tells_epoch_aware_transforms_the_epoch():
    """The trainer calls DetectionDataset.set_epoch each epoch; GT sampling's fade depends on it."""
    from voxsparse.data.dataset import DetectionDataset

    class Recorder:
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __call__(self, sample, generator):
            return sample

    recorder = Recorder()
    dataset = DetectionDataset([], (-10, -10, -3, 10, 10, 3), [recorder, lambda sample, generator: sample])
    dataset.set_epoch(3)
    assert recorder.epoch == 3 and dataset.epoch == 3
