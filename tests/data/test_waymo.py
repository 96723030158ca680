"""Waymo Open Dataset v1 reading: TFRecord framing, range-image geometry, Frame protos, official parity.

Tests that build frames need the official protos (``pip install --no-deps
waymo-open-dataset-tf-2-12-0==1.6.7``) and skip without them; the comparison with the official
``frame_utils`` conversion also needs TensorFlow. Expected points come from a per-pixel scalar
reference written here from the dataset's documentation, never from the code under test.
"""

from __future__ import annotations

import hashlib
import math
import sys
import zlib

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.waymo import (
    INSTALL_HINT,
    TFRecordError,
    iter_records,
    read_frames,
    track_id,
    write_records,
)
from voxsparse.data.waymo import frame as frame_module
from voxsparse.data.waymo.classes import CLASS_NAMES
from voxsparse.data.waymo.range_image import range_image_to_points, rotation_from_rpy, row_inclinations
from voxsparse.geometry import points_in_boxes

try:
    from waymo_open_dataset import dataset_pb2
except ImportError:
    dataset_pb2 = None

requires_protos = pytest.mark.skipif(dataset_pb2 is None, reason=INSTALL_HINT)

# Two records, b"voxsparse" and b"", as tf.io.TFRecordWriter (TensorFlow 2.13) writes them.
TF_WRITTEN = bytes.fromhex(
    "090000000000000037f97139766f78737061727365237a9bd0000000000000000029039807d8ea82a2"
)


# ---------------------------------------------------------------- TFRecord framing


def test_tfrecord_bytes_match_tensorflow(tmp_path):
    path = write_records(tmp_path / "a.tfrecord", [b"voxsparse", b""])
    assert path.read_bytes() == TF_WRITTEN
    (tmp_path / "tf.tfrecord").write_bytes(TF_WRITTEN)
    assert list(iter_records(tmp_path / "tf.tfrecord")) == [b"voxsparse", b""]


def test_tfrecord_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    records = [rng.bytes(n) for n in (0, 1, 7, 100_000)]
    assert list(iter_records(write_records(tmp_path / "r.tfrecord", records))) == records
    assert list(iter_records(write_records(tmp_path / "empty.tfrecord", []))) == []


@pytest.mark.parametrize("cut", [1, 11, 12, 12 + 50, 12 + 99, 12 + 100 + 3])
def test_truncated_tfrecord_names_file_record_and_offset(tmp_path, cut):
    path = write_records(tmp_path / "t.tfrecord", [b"x" * 40, b"y" * 100])
    data = path.read_bytes()
    second = 12 + 40 + 4  # header + data + CRC of the first record
    path.write_bytes(data[: second + cut])
    records = iter_records(path)
    assert next(records) == b"x" * 40  # the intact record still reads
    with pytest.raises(TFRecordError, match=rf"{path.name}: record 1 at byte offset {second}: truncated"):
        next(records)


@pytest.mark.parametrize(
    "position, message",
    [
        (0, "corrupt record length"),
        (8, "corrupt record length"),
        (12 + 5, "corrupt record data"),
        (-1, "corrupt record data"),
    ],
)
def test_corrupt_tfrecord_fails_its_checksum(tmp_path, position, message):
    path = write_records(tmp_path / "c.tfrecord", [b"z" * 30])
    data = bytearray(path.read_bytes())
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match=rf"record 0 at byte offset 0: {message}"):
        list(iter_records(path))


# ---------------------------------------------------------------- range-image geometry


def reference_point(row, col, distance, width, row_incl, extrinsic, pixel_pose=None, frame_pose=None):
    """One pixel's vehicle-frame point, scalar by scalar, from dataset.proto and frame_utils' description."""
    azimuth = ((width - col - 0.5) / width * 2.0 - 1.0) * math.pi - math.atan2(
        extrinsic[1, 0], extrinsic[0, 0]
    )
    incl = row_incl[row]
    sensor = distance * np.array(
        [math.cos(azimuth) * math.cos(incl), math.sin(azimuth) * math.cos(incl), math.sin(incl)]
    )
    vehicle = extrinsic[:3, :3] @ sensor + extrinsic[:3, 3]
    if pixel_pose is None:
        return vehicle
    roll, pitch, yaw, *translation = (float(v) for v in pixel_pose)
    world = Rotation.from_euler("ZYX", [yaw, pitch, roll]).as_matrix() @ vehicle + np.array(translation)
    return np.linalg.inv(frame_pose) @ np.append(world, 1.0)


def test_row_inclinations_uniform_and_explicit():
    # Uniform: pixel centres of 4 equal bins over [-0.4, 0.4], highest beam in row 0.
    np.testing.assert_allclose(row_inclinations([], -0.4, 0.4, 4), [0.3, 0.1, -0.1, -0.3], atol=1e-15)
    np.testing.assert_array_equal(row_inclinations([-0.2, 0.0, 0.1], -1, 1, 3), [0.1, 0.0, -0.2])
    with pytest.raises(ValueError, match="2 beam_inclinations for a range image of 3 rows"):
        row_inclinations([-0.2, 0.1], -1, 1, 3)


def test_rotation_from_rpy_matches_intrinsic_zyx():
    rpy = np.random.default_rng(1).uniform(-3, 3, size=(5, 3))
    expected = Rotation.from_euler("ZYX", rpy[:, ::-1]).as_matrix()
    np.testing.assert_allclose(rotation_from_rpy(rpy), expected, atol=1e-14)


@pytest.mark.parametrize("with_pose", [False, True])
def test_range_image_to_points_matches_per_pixel_reference(with_pose):
    rng = np.random.default_rng(2)
    height, width = 6, 40
    image = np.where(rng.uniform(size=(height, width)) < 0.6, rng.uniform(1, 80, (height, width)), 0.0)
    image[0, 0], image[1, 1] = -1.0, 0.0  # no return
    extrinsic = np.eye(4)
    extrinsic[:3, :3] = rotation_from_rpy(np.array([0.01, -0.03, 2.0]))
    extrinsic[:3, 3] = (1.2, -0.3, 2.0)
    incl = row_inclinations(np.sort(rng.uniform(-0.3, 0.05, height)), 0, 0, height)
    pixel_pose = frame_pose = None
    if with_pose:
        pixel_pose = np.concatenate(
            [
                rng.normal(0, 0.05, (height, width, 3)) + (0, 0, 1.3),
                rng.normal((500, -200, 10), 1, (height, width, 3)),
            ],
            axis=-1,
        ).astype(np.float32)
        frame_pose = np.eye(4)
        frame_pose[:3, :3] = rotation_from_rpy(np.array([0.02, 0.01, 1.25]))
        frame_pose[:3, 3] = (500.5, -199.0, 10.2)
    points, pixels = range_image_to_points(image.astype(np.float32), extrinsic, incl, pixel_pose, frame_pose)
    rows, cols = np.nonzero(image > 0)
    np.testing.assert_array_equal(pixels, rows * width + cols)
    expected = [
        reference_point(r, c, np.float32(image[r, c]), width, incl, extrinsic,
                        None if pixel_pose is None else pixel_pose[r, c], frame_pose)[:3]
        for r, c in zip(rows, cols)
    ]  # fmt: skip
    np.testing.assert_allclose(points, np.array(expected), atol=1e-9)


def test_missing_protos_raise_the_install_hint(tmp_path, monkeypatch):
    path = write_records(tmp_path / "f.tfrecord", [b""])
    monkeypatch.setitem(sys.modules, "waymo_open_dataset", None)
    frame_module._protos.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install --no-deps waymo-open-dataset-tf-2-12-0"):
            next(read_frames(path))
    finally:
        frame_module._protos.cache_clear()


# ---------------------------------------------------------------- Frame protos (official dataset_pb2)


def small_lasers():
    """Waymo's five LiDARs with smaller range images: TOP 48 x 1200 with explicit beams, 40 x 200 sides."""
    from waymo_writer import waymo_lasers

    return waymo_lasers(top=(48, 1200), side=(40, 200))


def expected_points(frame, pixels, spec):
    """(M, 6) reference x, y, z, range, intensity, elongation, ordered as the reader documents."""
    order = np.lexsort((pixels.col, pixels.row, pixels.laser, pixels.return_index))
    calibrations = {c.name: c for c in frame.context.laser_calibrations}
    lasers = {laser.name: laser for laser in frame.lasers}
    frame_pose = np.array(frame.pose.transform).reshape(4, 4)
    pose = dataset_pb2.MatrixFloat.FromString(
        zlib.decompress(lasers[1].ri_return1.range_image_pose_compressed)
    )
    top_pose = np.array(pose.data, dtype=np.float32).reshape(tuple(pose.shape.dims))
    geometry = {}  # LaserName -> (width, row inclinations, extrinsic)
    for name, c in calibrations.items():
        image = dataset_pb2.MatrixFloat.FromString(
            zlib.decompress(lasers[name].ri_return1.range_image_compressed)
        )
        height, width = image.shape.dims[0], image.shape.dims[1]
        if len(c.beam_inclinations):
            incl = np.array(c.beam_inclinations)[::-1]
        else:
            step = (c.beam_inclination_max - c.beam_inclination_min) / height
            incl = c.beam_inclination_min + step * (np.arange(height)[::-1] + 0.5)
        geometry[name] = (width, incl, np.array(c.extrinsic.transform).reshape(4, 4))
    rows = []
    for i in order:
        name = int(pixels.laser[i])
        width, incl, extrinsic = geometry[name]
        r, col, distance = int(pixels.row[i]), int(pixels.col[i]), pixels.range[i]
        pixel_pose = top_pose[r, col] if name == 1 else None
        xyz = reference_point(r, col, float(distance), width, incl, extrinsic, pixel_pose, frame_pose)[:3]
        source = pixels.source[i]
        rows.append([*xyz, distance, spec.intensity[source], spec.elongation[source]])
    return np.array(rows), order


@pytest.fixture(scope="module")
def segment(tmp_path_factory):
    """A TFRecord of three frames: two labelled street frames and one with no labels."""
    if dataset_pb2 is None:
        pytest.skip(INSTALL_HINT)
    from waymo_writer import build_frame, example_frame_spec, write_frames

    specs = [
        example_frame_spec(seed, small_lasers(), 1_550_000_000_000_000 + 100_000 * seed) for seed in (0, 1)
    ]
    empty = example_frame_spec(
        2, small_lasers(), 1_550_000_000_300_000, points_per_object=0, ground_points=50
    )
    empty.objects = []
    specs.append(empty)
    built = [build_frame(spec) for spec in specs]
    path = write_frames(tmp_path_factory.mktemp("waymo") / "segment.tfrecord", [frame for frame, _ in built])
    return path, specs, built


@requires_protos
def test_points_match_the_reference_conversion(segment):
    path, specs, built = segment
    frames = list(read_frames(path))
    assert len(frames) == 3
    for ours, spec, (frame, pixels) in zip(frames, specs, built):
        expected, order = expected_points(frame, pixels, spec)
        assert ours.points.shape == (len(expected), 6) and ours.point_features[3:] == (
            "range",
            "intensity",
            "elongation",
        )
        np.testing.assert_allclose(ours.points[:, :3], expected[:, :3], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(ours.points[:, 3:], expected[:, 3:].astype(np.float32))
        np.testing.assert_array_equal(ours.laser_id, pixels.laser[order])
        np.testing.assert_array_equal(ours.return_index, pixels.return_index[order])
        np.testing.assert_array_equal(ours.no_label_zone, spec.in_nlz[pixels.source[order]])
        # The writer put each point on the nearest pixel ray: within half a pixel diagonal (at most
        # 0.031 rad on the 40 x 200 side LiDARs) times the range.
        offset = np.linalg.norm(expected[:, :3] - spec.points[pixels.source[order]], axis=1)
        assert np.all(offset <= 0.032 * expected[:, 3] + 1e-6)
        if spec.objects:
            assert set(ours.laser_id.tolist()) == {1, 2, 3, 4, 5} and set(ours.return_index.tolist()) == {
                0,
                1,
            }
        np.testing.assert_array_equal(ours.ego_pose, spec.pose)
        assert ours.timestamp == spec.timestamp_micros * 1e-6
        assert (
            ours.frame_id == f"{spec.context_name}_{spec.timestamp_micros}"
            and ours.context_name == spec.context_name
        )


@requires_protos
def test_labels_boxes_velocities_difficulty(segment):
    path, specs, _ = segment
    waymo_class = {1: "Vehicle", 2: "Pedestrian", 4: "Cyclist"}
    for ours, spec in zip(read_frames(path), specs):
        everything = next(read_frames_with_empty(path, spec.timestamp_micros))
        kept = [o for o in spec.objects if o.waymo_type in waymo_class]
        assert len(everything) == len(kept)
        np.testing.assert_array_equal(
            everything.boxes, np.array([[*o.box, *o.speed] for o in kept], dtype=np.float32).reshape(-1, 9)
        )
        assert [CLASS_NAMES[i] for i in everything.labels] == [waymo_class[o.waymo_type] for o in kept]
        # num_lidar_points_in_box agrees with the decoded points inside each box.
        inside = points_in_boxes(
            torch.from_numpy(ours.points), torch.from_numpy(everything.boxes[:, :7])
        ).sum(0)
        np.testing.assert_array_equal(everything.num_points, inside.numpy())
        human = np.array([o.difficulty for o in kept])
        np.testing.assert_array_equal(
            everything.difficulty, np.where(human > 0, human, np.where(everything.num_points <= 5, 2, 1))
        )
        digests = [hashlib.blake2b(o.object_id.encode(), digest_size=8).digest() for o in kept]
        np.testing.assert_array_equal(
            everything.track_ids, [int.from_bytes(d, "little") & (2**63 - 1) for d in digests]
        )
        # By default objects without points are dropped, as the official metric drops them.
        has_points = everything.num_points > 0
        np.testing.assert_array_equal(ours.boxes, everything.boxes[has_points])
        np.testing.assert_array_equal(ours.difficulty, everything.difficulty[has_points])
        np.testing.assert_array_equal(ours.track_ids, everything.track_ids[has_points])
        if spec.objects:
            ids = [o.object_id for o in kept]
            counts = dict(zip(ids, everything.num_points.tolist()))
            # The rule is exercised: a LEVEL_2-by-points object, an empty one, a human LEVEL_2 one.
            assert 1 <= counts["far-vehicle-e"] <= 5 and counts["hidden-vehicle-f"] == 0
            assert everything.difficulty[ids.index("walker-g")] == 2 and counts["walker-g"] > 5
            assert everything.difficulty[ids.index("vehicle-a")] == 1


def read_frames_with_empty(path, timestamp_micros):
    """The frame of ``timestamp_micros`` read with ``keep_empty_boxes=True``."""
    return (
        f for f in read_frames(path, keep_empty_boxes=True) if round(f.timestamp * 1e6) == timestamp_micros
    )


@requires_protos
def test_keypoints_in_voxsparse_order(segment):
    path, specs, _ = segment
    ours = next(read_frames(path))
    walker = next(o for o in specs[0].objects if o.object_id == "walker-b")
    i = int(np.flatnonzero(ours.track_ids == track_id("walker-b"))[0])
    state = walker.keypoint_state
    labelled = state > 0
    np.testing.assert_array_equal(ours.keypoint_visibility[i], state == 2)
    np.testing.assert_allclose(ours.keypoints[i][labelled], walker.keypoints[labelled], atol=1e-6)
    assert not ours.keypoints[i][~labelled].any()
    # Spot check the order: the nose is above the left hip, the left shoulder to the walker's left.
    kp = dict(zip(KEYPOINT_NAMES, ours.keypoints[i]))
    assert kp["nose"][2] > kp["left_hip"][2] + 0.5
    heading = walker.box[6]
    left = np.array([-math.sin(heading), math.cos(heading)])
    assert (kp["left_shoulder"][:2] - kp["right_shoulder"][:2]) @ left > 0.3
    others = np.arange(len(ours)) != i
    assert not ours.keypoints[others].any() and not ours.keypoint_visibility[others].any()


@requires_protos
def test_frame_without_labels_is_valid_and_empty(segment):
    path, _, _ = segment
    empty = list(read_frames(path))[2]
    assert len(empty) == 0 and len(empty.points) > 0
    shapes = {
        name: getattr(empty, name).shape for name in ("boxes", "labels", "keypoints", "keypoint_visibility")
    }
    assert shapes == {
        "boxes": (0, 9),
        "labels": (0,),
        "keypoints": (0, 14, 3),
        "keypoint_visibility": (0, 14),
    }


@requires_protos
def test_bad_frames_raise_clear_errors(tmp_path, segment):
    _, _, built = segment
    frame = dataset_pb2.Frame()
    frame.CopyFrom(built[0][0])
    del frame.context.laser_calibrations[1]  # FRONT
    path = write_records(tmp_path / "a.tfrecord", [frame.SerializeToString()])
    with pytest.raises(
        ValueError, match=r"a.tfrecord: record 0 .*laser FRONT ri_return1: no laser calibration"
    ):
        next(read_frames(path))

    frame.CopyFrom(built[0][0])
    frame.lasers[0].ri_return2.range_image_compressed = b"not zlib"
    path = write_records(tmp_path / "b.tfrecord", [frame.SerializeToString()])
    with pytest.raises(ValueError, match=r"laser TOP ri_return2.range_image_compressed: not zlib-compressed"):
        next(read_frames(path))

    path = write_records(tmp_path / "c.tfrecord", [built[0][0].SerializeToString(), b"\x07"])
    frames = read_frames(path)
    next(frames)
    with pytest.raises(ValueError, match=r"c.tfrecord: record 1: not a waymo.open_dataset.Frame"):
        next(frames)


# ---------------------------------------------------------------- the official package (TensorFlow)


@requires_protos
def test_matches_official_frame_utils(segment, tmp_path):
    tf = pytest.importorskip("tensorflow")
    frame_utils = pytest.importorskip("waymo_open_dataset.utils.frame_utils")
    path, _, built = segment
    # TensorFlow reads our file, and we read TensorFlow's.
    assert [bytes(r.numpy()) for r in tf.data.TFRecordDataset(str(path))] == list(iter_records(path))
    with tf.io.TFRecordWriter(str(tmp_path / "tf.tfrecord")) as writer:
        for frame, _ in built:
            writer.write(frame.SerializeToString())
    ours = list(read_frames(tmp_path / "tf.tfrecord"))

    # frame_utils.parse_range_image_and_camera_projection hands ParseFromString a bytearray, which
    # protobuf 4.25 (upb) rejects ("expected bytes"); parse as it does, with bytes. One frame: TF is slow.
    def parse(matrix_type, data):
        return matrix_type.FromString(zlib.decompress(data))

    frame = built[0][0]
    images, projections = {}, {}
    for laser in frame.lasers:
        returns = (laser.ri_return1, laser.ri_return2)
        images[laser.name] = [parse(dataset_pb2.MatrixFloat, r.range_image_compressed) for r in returns]
        projections[laser.name] = [
            parse(dataset_pb2.MatrixInt32, r.camera_projection_compressed) for r in returns
        ]
    top_pose = parse(dataset_pb2.MatrixFloat, frame.lasers[0].ri_return1.range_image_pose_compressed)
    official = np.concatenate(
        [
            np.concatenate(
                frame_utils.convert_range_image_to_point_cloud(
                    frame, images, projections, top_pose, ri_index=k, keep_polar_features=True
                )[0]
            )
            for k in (0, 1)
        ]
    )
    # Official columns: range, intensity, elongation, x, y, z (computed in float32).
    np.testing.assert_allclose(ours[0].points[:, :3], official[:, 3:], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(ours[0].points[:, 3:], official[:, :3])


# ---------------------------------------------------------------- tools/prepare_data.py waymo


@requires_protos
def test_prepare_data_waymo_reads_back_the_decoded_frames(tmp_path):
    """raw TFRecords (real protos) -> tools/prepare_data.py waymo -> PreparedDataset equals read_frames."""
    from waymo_writer import build_frame, example_frame_spec, waymo_lasers, write_frames

    from voxsparse.data.preparation import main as prepare_data
    from voxsparse.data.prepared import PreparedDataset
    from voxsparse.data.waymo.prepare import XYZ_STEP

    lasers = waymo_lasers(top=(32, 600), side=(16, 100))
    segments = {"segment-a": (0, 1), "segment-b": (2,)}
    for name, seeds in segments.items():
        frames = [build_frame(example_frame_spec(seed, lasers, timestamp_micros=1_550_000_000_000_000 + seed))[0] for seed in seeds]
        write_frames(tmp_path / "raw" / "training" / f"{name}.tfrecord", frames)
    prepare_data(["waymo", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"])

    expected = {
        f.frame_id: f for path in sorted((tmp_path / "raw" / "training").glob("*.tfrecord")) for f in read_frames(path)
    }
    prepared = PreparedDataset(tmp_path / "out", "train")
    assert len(prepared) == len(expected) == 3
    for i in range(len(prepared)):
        got = prepared[i]
        want = expected[got.frame_id]
        columns = [want.point_features.index(name) for name in got.point_features]
        # The default storage: x, y, z within half of XYZ_STEP, intensity and elongation as float16.
        np.testing.assert_allclose(got.points[:, :3], want.points[:, :3], rtol=0, atol=XYZ_STEP / 2)
        np.testing.assert_array_equal(got.points[:, 3:], want.points[:, columns[3:]].astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-4)
        for field in ("labels", "num_points", "difficulty", "track_ids", "keypoint_visibility"):
            np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
        np.testing.assert_allclose(got.keypoints, want.keypoints, atol=1e-4)
