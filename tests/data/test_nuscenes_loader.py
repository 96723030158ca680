"""nuScenes loader against what the tiny nuScenes writer was told to write, recomputed with scipy's
rotations from the spec (not with the code under test); CBGS against hand-counted cases."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

pytest.importorskip("nuscenes")

from voxsparse.data.nuscenes import (
    NUSCENES_DETECTION_NAMES,
    NUSCENES_POINT_FEATURES,
    ClassBalancedDataset,
    cbgs_indices,
    load_nuscenes,
    load_sample,
    plan_samples,
)
from voxsparse.data.nuscenes_tiny import TinyNuScenesSpec, TinyObject, TinyScene, write_tiny_nuscenes
from voxsparse.data.pointfile import read_points

SWEEPS = 2  # sweeps between keyframes
INTERVAL_US = 500_000
# A sensor turned -90 degrees about z (as nuScenes' LIDAR_TOP) and tilted 3 / -2 degrees.
LIDAR_ROTATION = Rotation.from_euler("ZYX", [-90.0, -2.0, 3.0], degrees=True)
LIDAR_TRANSLATION = (0.9, 0.05, 1.8)

# The devkit's detection mapping for the categories used here, written out by hand.
EXPECTED_CLASS = {
    "vehicle.car": "car",
    "vehicle.bus.bendy": "bus",
    "human.pedestrian.child": "pedestrian",
    "movable_object.trafficcone": "traffic_cone",
    "animal": None,
    "vehicle.emergency.police": None,
    "human.pedestrian.stroller": None,
}

OBJECTS = (
    TinyObject("vehicle.car", (106.0, 52.0, 0.9), (1.8, 4.4, 1.6), yaw=0.5, velocity=(6.0, 2.0)),
    TinyObject("vehicle.bus.bendy", (92.0, 60.0, 1.6), (2.9, 17.0, 3.2), yaw=-2.9, velocity=(-3.0, 0.5)),
    # Annotated in one keyframe only: the devkit cannot estimate its velocity, the loader gives 0.
    TinyObject(
        "human.pedestrian.child",
        (98.0, 45.0, 0.6),
        (0.5, 0.5, 1.2),
        velocity=(-1.0, 0.5),
        samples=range(1, 2),
    ),
    TinyObject("movable_object.trafficcone", (103.0, 47.0, 0.4), (0.4, 0.4, 0.8), yaw=3.1),
    TinyObject("animal", (95.0, 55.0, 0.3), (0.4, 0.9, 0.6)),
    TinyObject("vehicle.emergency.police", (110.0, 44.0, 0.9), (1.9, 4.8, 1.6), velocity=(1.0, 0.0)),
    TinyObject("human.pedestrian.stroller", (101.0, 57.0, 0.5), (0.6, 0.9, 1.0)),
)
SCENE = TinyScene(
    "scene-a",
    6,
    OBJECTS,
    ego_translation=(100.0, 50.0),
    ego_yaw=1.0,
    ego_velocity=(5.0, 1.0),
    ego_yaw_rate=0.2,
)
EMPTY_SCENE = TinyScene("scene-b", 2, (), ego_translation=(-300.0, 20.0), ego_yaw=-0.4)


def make_spec() -> TinyNuScenesSpec:
    x, y, z, w = LIDAR_ROTATION.as_quat()
    return TinyNuScenesSpec(
        scenes=(SCENE, EMPTY_SCENE),
        splits={"tiny_train": ("scene-a",), "tiny_val": ("scene-b",)},
        sweeps_per_interval=SWEEPS,
        lidar_rotation=(w, x, y, z),
        lidar_translation=LIDAR_TRANSLATION,
        points_per_object=12,
        ground_points=40,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = make_spec()
    info = write_tiny_nuscenes(tmp_path_factory.mktemp("nuscenes"), spec)
    return spec, info, load_nuscenes(info.dataroot, info.version)


def ego_pose(scene: TinyScene, seconds: float) -> tuple[Rotation, np.ndarray]:
    """Ego-to-global rotation and translation from the scene's spec."""
    rotation = Rotation.from_euler("z", scene.ego_yaw + seconds * scene.ego_yaw_rate)
    xy = np.asarray(scene.ego_translation) + seconds * np.asarray(scene.ego_velocity)
    return rotation, np.array([xy[0], xy[1], 0.0])


def lidar_to_global(scene: TinyScene, seconds: float) -> tuple[Rotation, np.ndarray]:
    r_ego, t_ego = ego_pose(scene, seconds)
    return r_ego * LIDAR_ROTATION, r_ego.apply(LIDAR_TRANSLATION) + t_ego


def scan_times(keyframe: int) -> list[tuple[int, bool]]:
    """(timestamp offset in us, is keyframe) of every LIDAR_TOP scan up to ``keyframe``, in time order
    (the writer's schedule: SWEEPS sweeps evenly spaced before each keyframe)."""
    return [
        (k * INTERVAL_US - j * INTERVAL_US // (SWEEPS + 1), j == 0)
        for k in range(keyframe + 1)
        for j in range(SWEEPS, -1, -1)
    ]


def expected_points(spec, root: Path, keyframe: int, max_sweeps: int) -> np.ndarray:
    start = spec.start_timestamp_us
    scans = scan_times(keyframe)[::-1][:max_sweeps]  # newest first, keyframe first
    r_key, t_key = lidar_to_global(SCENE, keyframe * INTERVAL_US * 1e-6)
    out = []
    for offset, is_key in scans:
        name = f"{'samples' if is_key else 'sweeps'}/LIDAR_TOP/tiny-0000__LIDAR_TOP__{start + offset}.pcd.bin"
        raw = np.fromfile(root / name, dtype=np.float32).reshape(-1, 5).astype(np.float64)
        r, t = lidar_to_global(SCENE, offset * 1e-6)
        in_key = r_key.inv().apply(r.apply(raw[:, :3]) + t - t_key)
        lag = np.full(len(raw), (keyframe * INTERVAL_US - offset) * 1e-6)
        out.append(np.column_stack([in_key, raw[:, 3], lag]))
    return np.concatenate(out)


def expected_boxes(keyframe: int) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Detection name -> [((9,) box in the keyframe's LiDAR frame, (3,) global centre)]."""
    seconds = keyframe * INTERVAL_US * 1e-6
    r_key, t_key = lidar_to_global(SCENE, seconds)
    out: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for obj in OBJECTS:
        name = EXPECTED_CLASS[obj.category]
        if name is None or (obj.samples is not None and keyframe not in obj.samples):
            continue
        center = np.asarray(obj.translation) + seconds * np.array([*obj.velocity, 0.0])
        box_rotation = (r_key.inv() * Rotation.from_euler("z", obj.yaw)).as_matrix()
        heading = math.atan2(box_rotation[1, 0], box_rotation[0, 0])
        single = obj.samples is not None and len(obj.samples) == 1
        velocity = np.zeros(3) if single else r_key.inv().apply([*obj.velocity, 0.0])
        width, length, height = obj.size
        box = np.array([*r_key.inv().apply(center - t_key), length, width, height, heading, *velocity[:2]])
        out.setdefault(name, []).append((box, center))
    return out


@pytest.mark.parametrize("max_sweeps", [1, 4, 20])
def test_points_are_keyframe_plus_previous_scans_in_keyframe_frame(tiny, max_sweeps):
    spec, info, nusc = tiny
    samples = plan_samples(nusc, "tiny_train", max_sweeps)
    assert [s.token for s in samples] == list(info.sample_tokens[0])
    for k, sample in enumerate(samples):
        frame = load_sample(sample)
        expected = expected_points(spec, info.dataroot, k, max_sweeps)
        assert frame.points.dtype == np.float32 and frame.point_features == NUSCENES_POINT_FEATURES
        np.testing.assert_allclose(frame.points, expected, atol=1e-4, rtol=0)
        # Scans available before keyframe k: (k + 1) * (SWEEPS + 1), capped at max_sweeps.
        assert len(sample.scans) == min(max_sweeps, (k + 1) * (SWEEPS + 1))


def test_boxes_velocities_labels_in_keyframe_frame(tiny):
    _, info, nusc = tiny
    annotations = json.loads((info.dataroot / info.version / "sample_annotation.json").read_text())
    for k, sample in enumerate(plan_samples(nusc, "tiny_train", 1)):
        frame = load_sample(sample)
        expected = expected_boxes(k)
        names = [NUSCENES_DETECTION_NAMES[i] for i in frame.labels]
        assert Counter(names) == Counter({n: len(b) for n, b in expected.items()})
        assert frame.boxes.shape == (len(names), 9) and frame.boxes.dtype == np.float32
        written = [a for a in annotations if a["sample_token"] == info.sample_tokens[0][k]]
        for name, boxes in expected.items():
            rows = [i for i, n in enumerate(names) if n == name]
            for box, center in boxes:
                i = rows[np.argmin(np.linalg.norm(frame.boxes[rows, :3] - box[:3], axis=1))]
                row = frame.boxes[i].astype(np.float64)
                np.testing.assert_allclose(
                    row[[0, 1, 2, 3, 4, 5, 7, 8]], box[[0, 1, 2, 3, 4, 5, 7, 8]], atol=1e-4
                )
                assert abs(math.remainder(row[6] - box[6], 2 * math.pi)) < 1e-4
                assert -math.pi <= row[6] < math.pi
                # num_points is the annotation's num_lidar_pts as written in the table.
                ann = min(written, key=lambda a: np.linalg.norm(np.asarray(a["translation"]) - center))
                assert frame.num_points[i] == ann["num_lidar_pts"] > 0
        assert (frame.difficulty == 1).all()
        # Track ids: one per instance, stable over keyframes.
        assert len(set(frame.track_ids.tolist())) == len(frame.track_ids)


def test_track_ids_stable_over_keyframes(tiny):
    _, _, nusc = tiny
    frames = [load_sample(s) for s in plan_samples(nusc, "tiny_train", 1)]
    car = NUSCENES_DETECTION_NAMES.index("car")
    ids = {int(f.track_ids[f.labels == car][0]) for f in frames}
    assert len(ids) == 1


def test_frame_without_labels_is_a_valid_empty_frame(tiny):
    _, _, nusc = tiny
    samples = plan_samples(nusc, "tiny_val", 3)
    assert len(samples) == EMPTY_SCENE.num_samples
    frame = load_sample(samples[0])
    assert frame.boxes.shape == (0, 9) and frame.labels.shape == (0,) and len(frame.points) > 0


def test_missing_and_truncated_point_files_name_the_file(tiny):
    _, _, nusc = tiny
    sample = plan_samples(nusc, "tiny_train", 3)[1]
    sweep = Path(sample.scans[2].path)
    # Work on a copy so the other tests keep their files.
    data = sweep.read_bytes()
    try:
        sweep.unlink()
        with pytest.raises(ValueError, match=f"{sweep.name}: no such file"):
            load_sample(sample)
        sweep.write_bytes(data[:-6])
        with pytest.raises(ValueError, match=f"{sweep.name}.*truncated"):
            load_sample(sample)
    finally:
        sweep.write_bytes(data)
    np.testing.assert_array_equal(read_points(sweep, format="nuscenes").points, np.frombuffer(data, np.float32).reshape(-1, 5))


def test_unknown_split_and_bad_sweeps_are_refused(tiny):
    _, _, nusc = tiny
    with pytest.raises(ValueError, match="max_sweeps"):
        plan_samples(nusc, "tiny_train", 0)
    with pytest.raises(ValueError, match="mini_train"):
        plan_samples(nusc, "mini_train", 1)  # a predefined split whose scenes this dataset lacks


def test_cbgs_hand_counted():
    # Frames' classes: 0 in five frames, 1 in frame 3, 2 in frame 4; D = 5 + 1 + 1 = 7, K = 3:
    # each present class contributes floor(7 / 3) = 2 frames drawn from its own frames.
    frame_classes = [[0], [0, 0], [0], [0, 1], [2], [0], []]
    indices = cbgs_indices(frame_classes, 3, np.random.default_rng(0))
    assert len(indices) == 6
    assert set(indices[:2].tolist()) <= {0, 1, 2, 3, 5}
    assert indices[2:4].tolist() == [3, 3] and indices[4:].tolist() == [4, 4]
    # A class with no frame contributes nothing; K still counts it: D = 2, floor(2 / 4) = 0.
    assert len(cbgs_indices([[0], [1]], 4, np.random.default_rng(0))) == 0


def test_cbgs_balances_class_frequencies():
    rng = np.random.default_rng(1)
    # Class 0 in every frame, class 1 in 10 %, class 2 in 2 % of 1000 frames.
    frame_classes = [[0] + ([1] if i % 10 == 0 else []) + ([2] if i % 50 == 0 else []) for i in range(1000)]
    indices = cbgs_indices(frame_classes, 3, rng)
    d = 1000 + 100 + 20
    assert len(indices) == 3 * (d // 3)
    # Frames containing each class, counted over the resampled set: class 0 is in all of them,
    # classes 1 and 2 at least in their own draws (d // 3 each).
    has = np.array([[c in frame_classes[i] for c in range(3)] for i in indices])
    assert has[:, 0].all() and has[:, 1].sum() >= d // 3 and has[:, 2].sum() >= d // 3
    # Without CBGS class 2 would be in 2 % of the frames; now it is in at least a third.
    assert has[:, 2].mean() >= 1 / 3 - 1e-9


class _Source:
    class_names = ("a", "b")

    def frame_labels(self):
        return [np.array([0]), np.array([0]), np.array([0, 1])]

    def __getitem__(self, i):
        return i


def test_class_balanced_dataset_uses_source_labels():
    ds = ClassBalancedDataset(_Source(), seed=3)
    # D = 3 + 1 = 4, K = 2: two draws among frames with class 0, two of frame 2 (class 1).
    assert len(ds) == 4 and [ds[i] for i in (2, 3)] == [2, 2]
    assert ds.class_names == ("a", "b")
