"""Prepared layout: tools/prepare_data.py on a tiny nuScenes dataset read back frame for frame,
resume after an interrupted or damaged run equals a clean run, the GT database against a
brute-force cut, and hand-built Waymo-like frames (keypoints, no-label zones, feature columns)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from voxsparse.data import preparation as prepare_data
from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.gt_database import GTDatabase
from voxsparse.data.prepared import (
    FRAME_ARRAYS,
    PreparedDataset,
    PreparedFrame,
    PrepareError,
    prepare,
    read_frame,
)

ROOT = Path(__file__).resolve().parents[2]


def frames_equal(a: PreparedFrame, b: PreparedFrame) -> None:
    assert a.frame_id == b.frame_id and a.point_features == b.point_features
    for name in FRAME_ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)


def inside_box(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Brute force: (N,) whether each point lies in the closed box (x, y, z, dx, dy, dz, heading)."""
    d = points[:, :3].astype(np.float64) - box[:3]
    c, s = np.cos(box[6]), np.sin(box[6])
    u, v = c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1]
    return (np.abs(u) <= box[3] / 2) & (np.abs(v) <= box[4] / 2) & (np.abs(d[:, 2]) <= box[5] / 2)


# --- nuScenes end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("nuscenes")
    from test_nuscenes_loader import make_spec

    from voxsparse.data.nuscenes_tiny import write_tiny_nuscenes

    return write_tiny_nuscenes(tmp_path_factory.mktemp("raw"), make_spec())


def run_tool(info, out: Path, workers: int = 2, sweeps: int = 4) -> None:
    prepare_data.main(
        [
            "nuscenes",
            "--root",
            str(info.dataroot),
            "--version",
            info.version,
            "--out",
            str(out),
            "--sweeps",
            str(sweeps),
            "--workers",
            str(workers),
            "--splits",
            "tiny_train",
            "tiny_val",
            "--quiet",
        ]
    )


@pytest.fixture(scope="module")
def clean(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run_tool(tiny, out, workers=1)
    return out


def test_tool_output_reads_back_as_the_loader_frames(tiny, clean):
    from voxsparse.data.nuscenes import NUSCENES_DETECTION_NAMES, load_nuscenes, load_sample, plan_samples

    nusc = load_nuscenes(tiny.dataroot, tiny.version)
    for split, scene in (("tiny_train", 0), ("tiny_val", 1)):
        ds = PreparedDataset(clean, split, class_names=NUSCENES_DETECTION_NAMES)
        plans = plan_samples(nusc, split, 4)
        assert ds.frame_ids == [p.token for p in plans] == list(tiny.sample_tokens[scene])
        for i, plan in enumerate(plans):
            frames_equal(ds[i], load_sample(plan))
        assert ds.index.config == {"dataset": "nuscenes", "version": tiny.version, "max_sweeps": 4}
        # Only the training split gets a GT database by default.
        assert ds.index.gt_database == (split == "tiny_train")
    empty = PreparedDataset(clean, "tiny_val")[0]
    assert empty.boxes.shape == (0, 9) and len(empty.points) > 0


def test_gt_database_holds_the_points_inside_each_box(clean):
    ds = PreparedDataset(clean, "tiny_train")
    db = GTDatabase.load(clean / "tiny_train" / "gt_database")
    assert db.class_names == ds.class_names and db.point_features == ds.point_features
    expected = []
    for i in range(len(ds)):
        frame = ds[i]
        for k, box in enumerate(frame.boxes):
            points = frame.points[inside_box(frame.points, box.astype(np.float64))]
            if len(points):
                expected.append((i, box, frame.labels[k], points))
    assert len(db) == len(expected) > 0
    for j, (i, box, label, points) in enumerate(expected):
        assert db.frame_index[j] == i and db.labels[j] == label
        np.testing.assert_array_equal(db.boxes[j], box)
        got = db.object_points(j)
        assert got.shape == points.shape
        np.testing.assert_array_equal(got[np.lexsort(got.T)], points[np.lexsort(points.T)])


def test_missing_sweep_fails_with_the_file_and_leaves_no_index(tiny, clean, tmp_path):
    from voxsparse.data.nuscenes import load_nuscenes, plan_samples

    sweep = Path(plan_samples(load_nuscenes(tiny.dataroot, tiny.version), "tiny_train", 4)[2].scans[1].path)
    data = sweep.read_bytes()
    run_tool(tiny, tmp_path, sweeps=1)  # a complete earlier preparation, with other settings
    sweep.unlink()
    try:
        with pytest.raises(PrepareError, match=f"tiny_train task .*{sweep.name}"):
            run_tool(tiny, tmp_path)
        # The earlier index must not survive: it would describe frames this run is replacing.
        with pytest.raises(FileNotFoundError, match="did not finish"):
            PreparedDataset(tmp_path, "tiny_train")
    finally:
        sweep.write_bytes(data)
    run_tool(tiny, tmp_path)  # resumes
    a, b = PreparedDataset(clean, "tiny_train"), PreparedDataset(tmp_path, "tiny_train")
    for i in range(len(a)):
        frames_equal(a[i], b[i])


def test_resume_after_interruption_and_damage_equals_a_clean_run(tiny, clean, tmp_path):
    run_tool(tiny, tmp_path)
    split = tmp_path / "tiny_train"
    ids = PreparedDataset(tmp_path, "tiny_train").frame_ids
    frames = {i: split / "frames" / f"{i}.npz" for i in ids}
    # The state a killed run leaves: no index; a task written but not recorded; one frame
    # truncated, one with a flipped byte, one database part truncated; a temporary file.
    assert len(ids) == 6
    (split / "index.json").unlink()
    (split / "tasks" / f"{ids[2]}.json").unlink()
    with open(frames[ids[0]], "r+b") as f:
        f.truncate(os.path.getsize(frames[ids[0]]) // 2)
    middle = os.path.getsize(frames[ids[1]]) // 2  # inside the points, the largest member
    with open(frames[ids[1]], "r+b") as f:
        f.seek(middle)
        byte = f.read(1)
        f.seek(middle)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ValueError, match=f"{ids[1]}.npz: unreadable"):
        read_frame(frames[ids[1]])
    part = split / "gt_database" / "parts" / f"{ids[3]}.npz"
    part.write_bytes(part.read_bytes()[:100])
    stale = split / "frames" / f".{ids[0]}.npz.abc123.tmp"
    stale.write_bytes(b"partial")
    inode_before = {i: p.stat().st_ino for i, p in frames.items()}

    run_tool(tiny, tmp_path)

    a, b = PreparedDataset(clean, "tiny_train"), PreparedDataset(tmp_path, "tiny_train")
    assert a.index == b.index
    for i in range(len(a)):
        frames_equal(a[i], b[i])
    # Damaged or unrecorded tasks were redone (a new file replaced the old); the rest were skipped.
    inode_after = {i: p.stat().st_ino for i, p in frames.items()}
    assert [inode_after[i] != inode_before[i] for i in ids] == [True] * 4 + [False] * 2
    assert not stale.exists()
    da = GTDatabase.load(clean / "tiny_train" / "gt_database")
    db = GTDatabase.load(split / "gt_database")
    np.testing.assert_array_equal(da.offsets, db.offsets)
    np.testing.assert_array_equal(np.asarray(da.points), np.asarray(db.points))


def test_other_settings_redo_finished_tasks(tiny, tmp_path):
    run_tool(tiny, tmp_path, sweeps=1)
    one = PreparedDataset(tmp_path, "tiny_train")[1]
    run_tool(tiny, tmp_path, sweeps=4)
    four = PreparedDataset(tmp_path, "tiny_train")[1]
    assert len(four.points) > len(one.points) and set(np.unique(one.points[:, 4])) == {0.0}


# --- generic frames (what a Waymo reader yields) ---------------------------------------------------


@dataclass(kw_only=True)
class FakeFrame(FrameRecord):
    """A FrameLike with the extras of a Waymo frame."""

    point_features: tuple[str, ...]
    no_label_zone: np.ndarray


def fake_frame(frame_id: str, seed: int, num_boxes: int) -> FakeFrame:
    rng = np.random.default_rng(seed)
    boxes = np.zeros((num_boxes, 9), np.float32)
    boxes[:, 0] = 6.0 * np.arange(num_boxes) - 10
    boxes[:, 1] = rng.uniform(-3, 3, num_boxes)
    boxes[:, 3:6] = [2.0, 1.0, 1.5]
    boxes[:, 6] = rng.uniform(-3, 3, num_boxes)
    boxes[:, 7:9] = rng.normal(size=(num_boxes, 2))
    points = rng.uniform(-20, 20, (500, 5)).astype(np.float32)
    points[:, 2] = rng.uniform(-1, 1, 500)
    return FakeFrame(
        frame_id=frame_id,
        points=points,
        boxes=boxes,
        labels=rng.integers(0, 3, num_boxes),
        num_points=rng.integers(0, 50, num_boxes),
        difficulty=rng.integers(1, 3, num_boxes),
        track_ids=rng.integers(0, 1000, num_boxes),
        keypoints=rng.normal(size=(num_boxes, 14, 3)).astype(np.float32),
        keypoint_visibility=rng.random((num_boxes, 14)) < 0.5,
        point_features=("range", "intensity"),  # without x, y, z: the reader prepends them
        no_label_zone=rng.random(500) < 0.1,
    )


def segment(name: str) -> list[FakeFrame]:
    """A task of several frames (as a Waymo segment); 'seg1' has a frame without labels."""
    n = int(name[-1])
    return [fake_frame(f"{name}-{t}", 10 * n + t, 0 if (n, t) == (1, 1) else 3 + t) for t in range(3)]


def test_generic_frames_round_trip_with_selection_and_filters(tmp_path):
    index = prepare(
        segment,
        {"seg0": "seg0", "seg1": "seg1"},
        tmp_path,
        "train",
        1,
        class_names=("Vehicle", "Pedestrian", "Cyclist"),
        gt_database=True,
        progress=False,
    )
    assert index.point_features == ("x", "y", "z", "range", "intensity")
    written = segment("seg0") + segment("seg1")
    ds = PreparedDataset(tmp_path, "train")
    assert ds.frame_ids == [f.frame_id for f in written]
    for i, raw in enumerate(written):
        frame = ds[i]
        np.testing.assert_array_equal(frame.points, raw.points)
        np.testing.assert_array_equal(frame.keypoints, raw.keypoints)
        np.testing.assert_array_equal(frame.keypoint_visibility, raw.keypoint_visibility)
        np.testing.assert_array_equal(frame.no_label_zone, raw.no_label_zone)
        np.testing.assert_array_equal(frame.track_ids, raw.track_ids)
    assert ds[4].boxes.shape == (0, 9)

    picked = PreparedDataset(
        tmp_path, "train", point_features=["x", "y", "z", "intensity"], min_points=10, drop_no_label_zone=True
    )
    for i, raw in enumerate(written):
        frame, keep = picked[i], raw.num_points >= 10
        np.testing.assert_array_equal(frame.points, raw.points[~raw.no_label_zone][:, [0, 1, 2, 4]])
        np.testing.assert_array_equal(frame.boxes, raw.boxes[keep])
        np.testing.assert_array_equal(frame.keypoints, raw.keypoints[keep])
        assert frame.no_label_zone is None and frame.point_features == ("x", "y", "z", "intensity")
        np.testing.assert_array_equal(picked.frame_labels()[i], raw.labels[keep])
    db = GTDatabase.load(tmp_path / "train" / "gt_database")
    assert db.keypoints is not None and len(db) == len(db.keypoints)


def test_quantized_columns_reach_frames_index_and_gt_database_alike(tmp_path):
    from voxsparse.data.point_storage import stored_points

    steps = {"x": 2.0**-9, "y": 2.0**-9, "z": 2.0**-9}
    kwargs = {"class_names": ("V", "P", "C"), "gt_database": True, "progress": False}
    index = prepare(segment, {"seg0": "seg0"}, tmp_path, "q", half_features=["intensity"], quantize=steps, **kwargs)
    assert index.version == 3 and index.config["quantize"] == steps and index.config["half_features"] == ["intensity"]
    ds, db = PreparedDataset(tmp_path, "q"), GTDatabase.load(tmp_path / "q" / "gt_database")
    cut = []
    for frame, raw in zip(ds, segment("seg0")):
        want = stored_points(raw.points, [False] * 4 + [True], [2.0**-9] * 3 + [0, 0])
        np.testing.assert_array_equal(frame.points, want)
        assert np.abs(frame.points[:, :3] - raw.points[:, :3]).max() <= 2.0**-10
        cut += [want[inside_box(want, box)] for box in frame.boxes]
    # The GT database holds exactly the stored values of the points inside each box.
    got = [db.object_points(i) for i in range(len(db))]
    assert [len(c) for c in cut if len(c)] == [len(g) for g in got]
    for c, g in zip([c for c in cut if len(c)], got):
        np.testing.assert_array_equal(g, c)

    with pytest.raises(ValueError, match=r"quantize: steps must be finite and > 0"):
        prepare(segment, {"seg0": "seg0"}, tmp_path, "bad", half_features=["intensity"], quantize={"intensity": 0.1}, **kwargs)
    with pytest.raises(PrepareError, match=r"quantize names \['elongation'\]"):
        prepare(segment, {"seg0": "seg0"}, tmp_path, "bad", quantize={"elongation": 0.1}, **kwargs)


def test_a_version_2_split_still_reads_and_version_1_is_refused(tmp_path):
    from test_point_storage import earlier_layout

    from voxsparse.data.point_storage import POINT_KEYS, decode_points, write_npz

    prepare(segment, {"seg0": "seg0"}, tmp_path, "old", class_names=("V", "P", "C"), progress=False)
    split = tmp_path / "old"
    for path in (split / "frames").iterdir():  # rewrite as version 2 did: planes (itemsize, N, C)
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k not in POINT_KEYS}
            points = decode_points(dict(z))
        write_npz(path, {**arrays, **earlier_layout(points, [False] * points.shape[1])})
    index = json.loads((split / "index.json").read_text())
    (split / "index.json").write_text(json.dumps({**index, "version": 2}))
    for frame, raw in zip(PreparedDataset(tmp_path, "old"), segment("seg0")):
        np.testing.assert_array_equal(frame.points, raw.points)
    (split / "index.json").write_text(json.dumps({**index, "version": 1}))
    with pytest.raises(ValueError, match=r"format version 1, this code reads \[2, 3\]\); rerun tools/prepare_data.py"):
        PreparedDataset(tmp_path, "old")


def test_a_model_class_order_relabels_by_name(tmp_path):
    prepare(segment, {"seg0": "seg0"}, tmp_path, "s", class_names=("V", "P", "C"), progress=False)
    stored = PreparedDataset(tmp_path, "s")
    wanted = ("C", "V", "P")
    relabelled = PreparedDataset(tmp_path, "s", class_names=wanted)
    assert relabelled.class_names == wanted
    for i in range(len(stored)):
        a, b = stored[i], relabelled[i]
        assert [wanted[label] for label in b.labels] == [stored.class_names[label] for label in a.labels]
        np.testing.assert_array_equal(a.boxes, b.boxes)
    assert [list(x) for x in relabelled.frame_labels()] == [list(f.labels) for f in (relabelled[i] for i in range(len(stored)))]


def test_bad_inputs_are_refused_with_clear_messages(tmp_path):
    names = ("Vehicle",)
    with pytest.raises(PrepareError, match=r"seg0.*labels must lie in \[0, 1\)"):
        prepare(segment, {"seg0": "seg0"}, tmp_path, "a", class_names=names, progress=False)
    with pytest.raises(ValueError, match="frame id 'seg0-0' comes from tasks 'seg0' and 'again0'"):
        prepare(
            segment,
            {"seg0": "seg0", "again0": "seg0"},
            tmp_path,
            "b",
            class_names=("V", "P", "C"),
            progress=False,
        )
    with pytest.raises(ValueError, match="task key"):
        prepare(segment, {"../seg0": "seg0"}, tmp_path, "c", class_names=names, progress=False)
    prepare(segment, {"seg0": "seg0"}, tmp_path, "d", class_names=("V", "P", "C"), progress=False)
    for wanted in (("P", "V"), ("P", "V", "X"), ("P", "V", "V")):
        with pytest.raises(ValueError, match=r"class_names .* not a reordering of the data's \['V', 'P', 'C'\]"):
            PreparedDataset(tmp_path, "d", class_names=wanted)
    with pytest.raises(ValueError, match=r"point features \['elongation'\] not available"):
        PreparedDataset(tmp_path, "d", point_features=["x", "elongation"])
    (tmp_path / "d" / "index.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        PreparedDataset(tmp_path, "d")
    bad = fake_frame("nan-frame", 0, 2)
    bad.points[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 row"):
        PreparedFrame.from_frame(bad)


# --- config presets --------------------------------------------------------------------------------


def compose_train(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def test_nuscenes_preset_builds_a_training_set_from_prepared_data(clean):
    from hydra.utils import instantiate

    from voxsparse.data.dataset import DetectionDataset

    cfg = compose_train(
        [
            "experiment=voxelnext_nuscenes",
            f"dataset.root={clean}",
            "dataset.train_split=tiny_train",
            "dataset.val_split=tiny_val",
        ]
    )
    assert "vel" in cfg.model.head.separate_heads and cfg.trainer.epochs == 20
    train = instantiate(cfg.dataset.train)
    assert cfg.model.voxel_encoder.in_channels == len(train.source.point_features) == 5
    augmentations = [instantiate(t) for t in cfg.dataset.augmentations]
    # OpenPCDet's recipe: GT sampling in the training class order, mirrors across both axes, shuffle.
    assert augmentations[0].class_names == cfg.dataset.class_names and train.class_names == tuple(cfg.dataset.class_names)
    assert augmentations[1].flip_probability == augmentations[1].flip_x_probability == 0.5
    assert type(augmentations[-1]).__name__ == "ShufflePoints" and cfg.trainer.adam_beta2 == 0.99
    data = DetectionDataset(train, cfg.model.voxel_encoder.grid.point_cloud_range, augmentations)
    sample = data[0]
    assert sample.points.shape[1] == 5 and sample.annotations.boxes.has_velocity
    assert len(instantiate(cfg.dataset.val)) == 2


def test_waymo_preset_composes_consistently():
    cfg = compose_train(["experiment=voxelnext_waymo"])
    assert cfg.dataset.evaluation == "voxsparse.evaluation.suites.waymo" and list(cfg.dataset.class_names) == [
        "Vehicle",
        "Pedestrian",
        "Cyclist",
    ]
    assert cfg.model.voxel_encoder.in_channels == len(cfg.dataset.point_features)
    assert list(cfg.dataset.augmentations[0].point_features) == list(cfg.dataset.point_features)
    assert cfg.trainer.epochs == 12


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_with_its_model(experiment):
    cfg = compose_train([f"experiment={experiment}"])
    assert cfg.trainer.epochs > 0 and len(cfg.model.class_names) > 0


# ---------------------------------------------------------------- a dataset module prepares itself

TOY_PREPARATION = '''
"""Frames of a made-up raw format: one task per "file", two frames each."""

import numpy as np

from voxsparse.data.prepared import PreparationSplit, PreparedFrame

CLASS_NAMES = ("Thing",)


def toy_frames(task):
    for k in range(2):
        yield PreparedFrame(
            frame_id=f"{task}-{k}", points=np.full((5, 4), k, np.float32),
            boxes=np.array([[0, 0, 0, 1, 1, 1, 0]], np.float32), labels=np.zeros(1, np.int64),
            num_points=np.ones(1, np.int64), difficulty=np.ones(1, np.int64), track_ids=np.zeros(1, np.int64),
            point_features=("x", "y", "z", "intensity"),
        )


def add_prepare_arguments(parser):
    parser.set_defaults(out="unused-default")
    parser.add_argument("--files", type=int, default=2)


def preparation_splits(args):
    tasks = {f"file{i}": f"file{i}" for i in range(args.files)}
    return [PreparationSplit("train", toy_frames, lambda: tasks, CLASS_NAMES, {"dataset": "toy"})]
'''


def test_prepare_data_dispatches_to_any_dataset_module(tmp_path, monkeypatch):
    (tmp_path / "toy_preparation.py").write_text(TOY_PREPARATION)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    (index,) = prepare_data.main(
        ["toy_preparation", "--root", str(tmp_path), "--out", str(out), "--files", "3", "--workers", "1", "--quiet"]
    )
    assert index.split == "train" and len(index.frames) == 6 and index.gt_database
    prepared = PreparedDataset(out, "train")
    assert prepared.frame_ids[:2] == ["file0-0", "file0-1"] and list(prepared.class_names) == ["Thing"]

    with pytest.raises(SystemExit, match="no module voxsparse.data.no_such_dataset or no_such_dataset"):
        prepare_data.main(["no_such_dataset", "--root", "r", "--out", "o"])
    with pytest.raises(SystemExit, match="cannot prepare data .*add_prepare_arguments, preparation_splits"):
        prepare_data.main(["voxsparse.data.sample", "--root", "r", "--out", "o"])
    with pytest.raises(SystemExit, match="give --root and --out"):
        prepare_data.main(["toy_preparation", "--out", str(out)])


def test_waymo_preparation_plans_a_split_per_folder(tmp_path):
    from voxsparse.data.waymo.prepare import add_prepare_arguments, preparation_splits, waymo_frames

    for folder, names in {"training": ["a.tfrecord", "b c.tfrecord"], "validation": ["v.tfrecord"]}.items():
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_bytes(b"")
    parser = prepare_data.build_parser()
    add_prepare_arguments(parser)
    args = parser.parse_args(["waymo", "--root", str(tmp_path)])
    assert args.out == "data/prepared/waymo"
    plans = preparation_splits(args)
    assert [p.split for p in plans] == ["train", "val"]
    assert plans[0].tasks() == {"a": str(tmp_path / "training" / "a.tfrecord"), "b_c": str(tmp_path / "training" / "b c.tfrecord")}
    assert plans[0].factory is waymo_frames and list(plans[0].class_names) == ["Vehicle", "Pedestrian", "Cyclist"]
    with pytest.raises(SystemExit, match=r"--splits \['test'\]: no matching folder"):
        preparation_splits(parser.parse_args(["waymo", "--root", str(tmp_path), "--splits", "test"]))


# --- point storage ---------------------------------------------------------------------------------


def test_point_storage_round_trips_with_reproducible_bytes(tmp_path, monkeypatch):
    import time

    from voxsparse.data.point_storage import decode_points, encode_points, write_npz

    rng = np.random.default_rng(0)
    points = (rng.normal(size=(1000, 5)) * [30, 30, 2, 1, 0.3]).astype(np.float32)
    half = [False, False, False, True, False]
    arrays = {**encode_points(points, half), "labels": np.arange(3)}
    first = write_npz(tmp_path / "a.npz", arrays).read_bytes()
    later = time.time() + 3600.0
    monkeypatch.setattr(time, "time", lambda: later)  # what zip members would be stamped with
    assert write_npz(tmp_path / "b.npz", arrays).read_bytes() == first
    with np.load(tmp_path / "b.npz") as z:
        back = decode_points(dict(z))
        np.testing.assert_array_equal(z["labels"], np.arange(3))
    np.testing.assert_array_equal(back[:, [0, 1, 2, 4]], points[:, [0, 1, 2, 4]])
    np.testing.assert_array_equal(back[:, 3], points[:, 3].astype(np.float16).astype(np.float32))
    for shape in ((0, 4), (7, 3)):
        empty = np.zeros(shape, np.float32)
        np.testing.assert_array_equal(decode_points(encode_points(empty, [False] * shape[1])), empty)
    with pytest.raises(ValueError, match="disagree"):
        encode_points(points, [False] * 4)
