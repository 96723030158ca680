"""Argoverse 2 reader on a tiny log in the released format (tests/data/argo2_writer.py): what it reads
is what ``av2``'s own loaders read from the same files; preparation through tools/prepare_data.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av2")

from tests.data.argo2_writer import (
    Cuboid,
    write_annotations,
    write_calibration,
    write_map,
    write_poses,
    write_sweep,
)
from voxsparse.data.argo2 import (
    CLASS_NAMES,
    category_to_name,
    frame_id,
    name_to_category,
    parse_frame_id,
    quaternion_yaw,
    read_log,
)
from voxsparse.data.prepared import PreparedDataset

LOG = "0b86f508-5df9-4a46-bc59-5b9536dbde9f"
STAMPS = [315969629019741000, 315969629119752000, 315969629219760000]


def write_log(split_dir: Path, log_id: str = LOG, seed: int = 0, labelled: bool = True) -> list[Cuboid]:
    """Three sweeps, a moving ego, and cuboids of a few categories (one not evaluated, one without
    interior points); returns the cuboids."""
    rng = np.random.default_rng(seed)
    log_dir = split_dir / log_id
    cuboids = []
    for i, stamp in enumerate(STAMPS):
        xyz = rng.uniform([-60, -60, -2], [60, 60, 4], (400 + 50 * i, 3))
        points = np.column_stack([xyz, rng.integers(0, 256, len(xyz))])
        write_sweep(log_dir, stamp, points, rng)
        cuboids += [
            Cuboid(stamp, "a1", "REGULAR_VEHICLE", (10.0 + i, 2.0, 0.8, 4.5, 1.9, 1.6, 0.3 + 0.1 * i), 120),
            Cuboid(stamp, "b2", "PEDESTRIAN", (-5.0, 3.0 - i, 0.9, 0.6, 0.7, 1.8, -2.9), 15),
            Cuboid(stamp, "c3", "ANIMAL", (20.0, -4.0, 0.3, 0.8, 0.4, 0.5, 1.0), 4),  # not a detection class
        ]
    cuboids.append(
        Cuboid(STAMPS[1], "d4", "MOBILE_PEDESTRIAN_CROSSING_SIGN", (7.0, -8.0, 0.5, 0.5, 0.4, 1.0, 3.1), 0)
    )
    write_poses(
        log_dir,
        STAMPS,
        [0.1, 0.12, 0.15],
        np.array([[100.0, 50.0, 3.0], [101.0, 50.2, 3.0], [102.0, 50.5, 3.1]]),
    )
    write_calibration(log_dir)
    write_map(log_dir, [(60, 0), (160, 0), (160, 100), (60, 100)])
    if labelled:
        write_annotations(log_dir, cuboids)
    return cuboids


def test_names_and_frame_ids():
    from av2.evaluation import SensorCompetitionCategories

    assert sorted(name_to_category(n) for n in CLASS_NAMES) == sorted(
        c.value for c in SensorCompetitionCategories
    )
    assert all(category_to_name(name_to_category(n)) == n for n in CLASS_NAMES)
    assert parse_frame_id(frame_id(LOG, STAMPS[0])) == (LOG, STAMPS[0])
    with pytest.raises(ValueError, match="not an Argoverse 2 frame id"):
        parse_frame_id("abc_12x")


def test_quaternion_yaw_matches_av2():
    from av2.geometry.geometry import mat_to_xyz, quat_to_mat

    rng = np.random.default_rng(3)
    q = rng.normal(size=(200, 4))
    q[:100, 1:3] *= 0.05  # near yaw-only rotations, as cuboids are
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    np.testing.assert_allclose(quaternion_yaw(q), mat_to_xyz(quat_to_mat(q))[:, 2], atol=1e-9)


def test_reader_reads_what_av2_reads(tmp_path):
    from av2.datasets.sensor.av2_sensor_dataloader import AV2SensorDataLoader
    from av2.geometry.geometry import mat_to_xyz
    from av2.structures.sweep import Sweep

    write_log(tmp_path)
    loader = AV2SensorDataLoader(data_dir=tmp_path, labels_dir=tmp_path)
    frames = list(read_log(tmp_path, LOG))
    assert [f.timestamp_ns for f in frames] == loader.get_ordered_log_lidar_timestamps(LOG) == STAMPS
    tracks = {}
    for frame in frames:
        assert frame.frame_id == frame_id(LOG, frame.timestamp_ns) and frame.log_id == LOG
        sweep = Sweep.from_feather(loader.get_lidar_fpath(LOG, frame.timestamp_ns))
        assert frame.points.dtype == np.float32 and frame.point_features == ("x", "y", "z", "intensity")
        np.testing.assert_array_equal(frame.points[:, :3], sweep.xyz.astype(np.float32))
        np.testing.assert_array_equal(frame.points[:, 3], sweep.intensity.astype(np.float32))

        pose = loader.get_city_SE3_ego(LOG, frame.timestamp_ns)
        np.testing.assert_allclose(frame.city_from_ego.matrix(), pose.rotation, atol=1e-12)
        np.testing.assert_allclose(frame.city_from_ego.translation, pose.translation, atol=1e-12)

        cuboids = [c for c in loader.get_labels_at_lidar_timestamp(LOG, frame.timestamp_ns).cuboids
                   if category_to_name(c.category) in CLASS_NAMES]  # fmt: skip
        assert [CLASS_NAMES[i] for i in frame.labels] == [category_to_name(c.category) for c in cuboids]
        expected = np.array(
            [
                [*c.xyz_center_m, c.length_m, c.width_m, c.height_m, mat_to_xyz(c.dst_SE3_object.rotation)[2]]
                for c in cuboids
            ]
        )
        np.testing.assert_allclose(frame.boxes, expected.astype(np.float32), atol=1e-6)
        assert frame.difficulty.tolist() == [1] * len(cuboids)
        for track, label in zip(frame.track_ids.tolist(), frame.labels.tolist()):
            assert tracks.setdefault(track, label) == label  # one track, one class, across sweeps
    assert frames[1].num_points.tolist() == [120, 15, 0] and len(tracks) == 3


def test_unlabelled_log_and_missing_pose(tmp_path):
    write_log(tmp_path, labelled=False)
    frames = list(read_log(tmp_path, LOG))
    assert [len(f.boxes) for f in frames] == [0, 0, 0]
    write_poses(tmp_path / LOG, STAMPS[:2], [0.0, 0.0], np.zeros((2, 3)))
    with pytest.raises(ValueError, match=f"no pose at sweep {STAMPS[2]}"):
        list(read_log(tmp_path, LOG))


def test_prepare(tmp_path):
    from voxsparse.data.preparation import main

    raw = tmp_path / "sensor"
    write_log(raw / "train")
    write_log(raw / "val", log_id="1c9b3a4e-0c6f-4f1e-9a0e-2d7a1f6a9b11", seed=1)
    out = tmp_path / "prepared"
    main(["argo2", "--root", str(raw), "--out", str(out), "--workers", "1", "--quiet"])
    train = PreparedDataset(out, "train", min_points=1)
    assert train.index.class_names == CLASS_NAMES and train.index.config["dataset"] == "argo2"
    assert train.frame_ids == [frame_id(LOG, s) for s in STAMPS]
    frames = list(read_log(raw / "train", LOG))
    stored = train[1]
    np.testing.assert_array_equal(stored.points, frames[1].points)  # intensity 0..255 is exact in float16
    np.testing.assert_array_equal(stored.boxes, frames[1].boxes[:2])  # min_points=1 drops the empty sign
    assert train.index.gt_database and len(PreparedDataset(out, "val")) == 3
    with pytest.raises(SystemExit, match="Argoverse 2 splits are"):
        main(["argo2", "--root", str(raw), "--out", str(out), "--splits", "training"])


def test_preset_builds_a_training_set_from_prepared_frames(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from voxsparse.data.dataset import DetectionDataset
    from voxsparse.data.preparation import main

    write_log(tmp_path / "sensor" / "train")
    main(["argo2", "--root", str(tmp_path / "sensor"), "--out", str(tmp_path / "prepared"), "--splits", "train",
          "--workers", "1", "--quiet", "--gt-database"])  # fmt: skip
    root = Path(__file__).resolve().parents[2] / "configs"
    with initialize_config_dir(str(root), version_base="1.3"):
        cfg = compose(
            "train", overrides=["experiment=voxelnext_argo2", f"dataset.root={tmp_path / 'prepared'}"]
        )
    assert tuple(cfg.dataset.class_names) == tuple(cfg.model.class_names) == CLASS_NAMES
    assert cfg.dataset.evaluation == "voxsparse.evaluation.argo2.argo2" and cfg.trainer.epochs == 6
    train = instantiate(cfg.dataset.train)
    augmentations = [instantiate(t) for t in cfg.dataset.augmentations]
    # OpenPCDet's recipe: no GT sampling, a mirror across the x axis only, then shuffled points.
    assert augmentations[0].flip_probability == 0.5 and augmentations[0].flip_x_probability == 0.0
    assert [type(a).__name__ for a in augmentations] == ["GlobalAugment", "ShufflePoints"]
    data = DetectionDataset(train, cfg.model.voxel_encoder.grid.point_cloud_range, augmentations)
    sample = data[1]
    assert sample.points.shape[1] == cfg.model.voxel_encoder.in_channels == 4
    assert sorted(sample.annotations.labels.tolist()) == [0, 1]  # the sign without points is not trained on


@pytest.fixture
def openpcdet_argo2(monkeypatch):
    """OpenPCDet's Argoverse 2 dataset module, loaded by path with a stub ``DatasetTemplate``."""
    import importlib.util
    import os
    import sys
    import types

    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout to compare with it")
    base = Path(root) / "pcdet" / "datasets"
    for name, path in [("pcdet", base.parent), ("pcdet.datasets", base), ("pcdet.datasets.argo2", base / "argo2"),
                       ("pcdet.datasets.argo2.argo2_utils", base / "argo2" / "argo2_utils")]:  # fmt: skip
        stub = types.ModuleType(name)
        stub.__path__ = [str(path)]
        monkeypatch.setitem(sys.modules, name, stub)
    # so3.py scripts its functions with TorchScript, which fails on the installed kornia; run them eagerly.
    import torch

    monkeypatch.setattr(torch.jit, "script", lambda fn: fn)
    template = types.ModuleType("pcdet.datasets.dataset")
    template.DatasetTemplate = (
        object  # only the module-level functions and a method that ignores self are used
    )
    monkeypatch.setitem(sys.modules, "pcdet.datasets.dataset", template)
    module = None
    for name, path in [("pcdet.datasets.argo2.argo2_utils.so3", "argo2_utils/so3.py"),
                       ("pcdet.datasets.argo2.argo2_utils.constants", "argo2_utils/constants.py"),
                       ("pcdet.datasets.argo2.argo2_dataset", "argo2_dataset.py")]:  # fmt: skip
        spec = importlib.util.spec_from_file_location(name, base / "argo2" / path)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, module)
        spec.loader.exec_module(module)
    return module


def test_frames_match_openpcdet(openpcdet_argo2, tmp_path):
    """OpenPCDet's conversion of the same sweeps: its .bin points, its info boxes of the classes it
    trains on (cuboids with interior points), and its detections-to-av2 cuboids."""
    import torch
    from av2.utils.io import read_feather

    from voxsparse.evaluation.argo2 import detections_table
    from voxsparse.structures import Boxes3D, Detections3D

    write_log(tmp_path / "val")
    (tmp_path / "out" / "training" / "velodyne").mkdir(parents=True)
    log_dir = tmp_path / "val" / LOG
    annotations = read_feather(log_dir / "annotations.feather")
    for i, frame in enumerate(read_log(tmp_path / "val", LOG)):
        stamp = frame.timestamp_ns
        index = f"1000{i:03d}"
        info = openpcdet_argo2.process_and_save_frame(
            str(log_dir / "sensors" / "lidar" / f"{stamp}.feather"), annotations[annotations["timestamp_ns"] == stamp],
            {f"{LOG}/{stamp}": index}, LOG, str(tmp_path / "out"), True,
        )  # fmt: skip
        points = np.fromfile(tmp_path / "out" / "training" / "velodyne" / f"{index}.bin", np.float32).reshape(
            -1, 4
        )
        np.testing.assert_array_equal(frame.points, points)
        annos = info["annos"]
        kept = np.array([n in CLASS_NAMES for n in annos["name"]])
        theirs = np.column_stack([annos["location"], annos["dimensions"], annos["rotation_y"]])[kept]
        ours = frame.num_points > 0
        assert [CLASS_NAMES[k] for k in frame.labels[ours]] == list(annos["name"][kept])
        np.testing.assert_allclose(frame.boxes[ours], theirs.astype(np.float32), atol=2e-6)

        detections = Detections3D(
            Boxes3D(torch.from_numpy(frame.boxes)),
            torch.ones(len(frame.boxes)),
            torch.from_numpy(frame.labels),
        )
        table = detections_table([frame.frame_id], [detections], CLASS_NAMES)
        cuboids = openpcdet_argo2.Argo2Dataset.lidar_box_to_argo2(None, frame.boxes).double().numpy()
        np.testing.assert_allclose(
            table[
                ["tx_m", "ty_m", "tz_m", "length_m", "width_m", "height_m", "qw", "qx", "qy", "qz"]
            ].to_numpy(),
            cuboids,
            atol=1e-6,
        )
