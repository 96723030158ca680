"""Waymo Open Dataset v2 (parquet components): the same frames as v1, read with pyarrow only.

The fixture segment is built as v1 ``Frame`` protos (``waymo_writer.build_frame``), written as a
TFRecord, and converted to v2 parquet files with the official v2 schemas and v1-to-v2 extractors
(``waymo_writer.write_v2_segment``). Needs the official package (protos, v2 schema files) and pyarrow.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pq = pytest.importorskip("pyarrow.parquet")
dataset_pb2 = pytest.importorskip("waymo_open_dataset.dataset_pb2")

from waymo_writer import (
    build_frame,
    example_frame_spec,
    official_v2,
    waymo_lasers,
    write_frames,
    write_v2_segment,
)

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.data.waymo import read_frames, read_segment, segment_names
from voxsparse.data.waymo.classes import KEYPOINT_TYPES

CONTEXT = "10017090168044687777_6380_000_6400_000"
STAMPS = [1_550_000_000_000_000 + 100_000 * i for i in range(3)]


def frames_of(seeds, context=CONTEXT):
    lasers = waymo_lasers(top=(32, 600), side=(16, 100))
    frames = []
    for seed, stamp in zip(seeds, STAMPS):
        frame = build_frame(example_frame_spec(seed, lasers, timestamp_micros=stamp))[0]
        frame.context.name = context
        frames.append(frame)
    return frames


@pytest.fixture(scope="module")
def v2():
    return official_v2()


@pytest.fixture(scope="module")
def segment(tmp_path_factory, v2):
    """(v1 TFRecord path, v2 split folder, the Frame protos): one segment of 3 frames in both formats."""
    root = tmp_path_factory.mktemp("waymo")
    frames = frames_of((0, 1, 2))
    # The third frame has no labels, as v1 test frames have none.
    del frames[2].laser_labels[:]
    tfrecord = write_frames(root / "v1" / f"segment-{CONTEXT}_with_camera_labels.tfrecord", frames)
    write_v2_segment(root / "v2" / "training", frames, v2=v2)
    return tfrecord, root / "v2" / "training", frames


def assert_same_records(a, b):
    assert a.frame_id == b.frame_id and a.context_name == b.context_name and a.timestamp == b.timestamp
    assert a.point_features == b.point_features
    for name in a.array_fields():
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_v1_and_v2_copies_of_a_segment_give_identical_records(segment):
    tfrecord, split, _ = segment
    assert segment_names(split) == [CONTEXT]
    for keep_empty in (False, True):
        v1 = list(read_frames(tfrecord, keep_empty_boxes=keep_empty))
        v2 = list(read_segment(split, CONTEXT, keep_empty_boxes=keep_empty))
        assert len(v1) == len(v2) == 3
        for a, b in zip(v1, v2):
            assert_same_records(a, b)
    # The fixture exercises what matters: five LiDARs, both returns, no-label zones, keypoints, empty frames.
    first = v1[0]
    assert set(first.laser_id.tolist()) == {1, 2, 3, 4, 5} and set(first.return_index.tolist()) == {0, 1}
    assert first.no_label_zone.any() and first.keypoint_visibility.any() and len(v1[2]) == 0


def test_official_schema_columns_are_what_the_files_hold(segment, v2):
    _, split, _ = segment
    schema = pq.read_schema(split / "lidar" / f"{CONTEXT}.parquet")
    assert schema.names == v2.lidar.LiDARComponent.schema().names
    assert "[LiDARComponent].range_image_return1.values" in schema.names  # uncompressed range images
    assert (
        "[LiDARHumanKeypointsComponent].lidar_keypoints[*].type"
        in pq.read_schema(split / "lidar_hkp" / f"{CONTEXT}.parquet").names
    )


def test_reads_only_the_columns_and_row_groups_it_needs(segment, monkeypatch):
    _, split, _ = segment
    calls = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kwargs):
        calls.append((self.metadata.num_row_groups, tuple(row_groups), tuple(columns)))
        return original(self, row_groups, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    lidar = pq.ParquetFile(split / "lidar" / f"{CONTEXT}.parquet")
    stamps = lidar.read(columns=["key.frame_timestamp_micros"]).column(0).to_numpy()
    first_groups = {g for g in range(lidar.num_row_groups) if (row_group_rows(lidar, g) == STAMPS[0]).any()}

    next(read_segment(split, CONTEXT))
    lidar_calls = [c for c in calls if "[LiDARComponent].range_image_return1.values" in c[2]]
    assert lidar_calls and {g for c in lidar_calls for g in c[1]} == first_groups
    assert lidar.num_row_groups == 5 and len(first_groups) == 2 < lidar.num_row_groups  # 5 rows, 3 per group

    calls.clear()
    list(read_segment(split, CONTEXT))
    lidar_calls = [c for c in calls if "[LiDARComponent].range_image_return1.values" in c[2]]
    read = [g for c in lidar_calls for g in c[1]]
    # Rows in time order: each row group is read once although frames share row groups.
    assert sorted(set(read)) == list(range(lidar.num_row_groups)) and len(stamps) == 15
    assert len(read) <= lidar.num_row_groups + 1
    columns = {column for c in calls for column in c[2]}
    for unneeded in (
        "[LiDARBoxComponent].acceleration.x",
        "[LiDARBoxComponent].num_top_lidar_points_in_box",
        "[LiDARBoxComponent].difficulty_level.tracking",
        "[LiDARBoxComponent].speed.z",
    ):
        assert unneeded not in columns


def row_group_rows(file, group):
    return file.read_row_group(group, columns=["key.frame_timestamp_micros"]).column(0).to_numpy()


def test_optional_components_may_be_absent(segment, tmp_path, v2):
    tfrecord, _, frames = segment
    v1 = list(read_frames(tfrecord))
    write_v2_segment(tmp_path / "no_hkp", frames, skip=("lidar_hkp",), v2=v2)
    write_v2_segment(tmp_path / "test", frames, skip=("lidar_hkp", "lidar_box"), v2=v2)
    for a, b in zip(v1, read_segment(tmp_path / "no_hkp", CONTEXT)):
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert not b.keypoints.any() and not b.keypoint_visibility.any()
    for a, b in zip(v1, read_segment(tmp_path / "test", CONTEXT)):
        np.testing.assert_array_equal(a.points, b.points)
        assert len(b) == 0 and b.boxes.shape == (0, 9)


def test_reading_needs_no_official_package(segment, monkeypatch):
    tfrecord, split, _ = segment
    v1 = next(read_frames(tfrecord))
    monkeypatch.setitem(sys.modules, "waymo_open_dataset", None)  # any import of it now fails
    with pytest.raises(ImportError):
        import waymo_open_dataset  # noqa: F401
    assert_same_records(v1, next(read_segment(split, CONTEXT)))


def test_missing_component_and_wrong_files_are_clear_errors(segment, tmp_path, v2):
    _, _, frames = segment
    write_v2_segment(tmp_path / "a", frames[:1], skip=("vehicle_pose",), v2=v2)
    with pytest.raises(FileNotFoundError, match=r"no vehicle_pose component .*vehicle_pose/"):
        next(read_segment(tmp_path / "a", CONTEXT))
    paths = write_v2_segment(tmp_path / "b", frames[:1], v2=v2)
    # A box file where the lidar file should be.
    paths["lidar"].write_bytes(paths["lidar_box"].read_bytes())
    with pytest.raises(
        ValueError, match=r"lidar/.*: no column 'key.laser_name' \(is it a Waymo v2 lidar file\?\)"
    ):
        next(read_segment(tmp_path / "b", CONTEXT))


def test_keypoint_types_match_the_official_enum():
    keypoint_pb2 = pytest.importorskip("waymo_open_dataset.protos.keypoint_pb2")
    assert list(KEYPOINT_TYPES) == list(KEYPOINT_NAMES)
    for name, value in KEYPOINT_TYPES.items():
        assert keypoint_pb2.KeypointType.Value(f"KEYPOINT_TYPE_{name.upper()}") == value


def test_prepare_data_waymo_v2_equals_v1(segment, tmp_path):
    """tools/prepare_data.py waymo --format v2 prepares the frames v1 preparation prepares."""
    from voxsparse.data.preparation import main as prepare_data
    from voxsparse.data.prepared import PreparedDataset

    tfrecord, split, _ = segment
    (tmp_path / "v1" / "training").mkdir(parents=True)
    (tmp_path / "v1" / "training" / tfrecord.name).symlink_to(tfrecord)
    common = ["--workers", "1", "--quiet", "--gt-database"]
    prepare_data(["waymo", "--root", str(tmp_path / "v1"), "--out", str(tmp_path / "out1"), *common])
    prepare_data(
        ["waymo", "--format", "v2", "--root", str(split.parent), "--out", str(tmp_path / "out2"), *common]
    )
    one, two = PreparedDataset(tmp_path / "out1", "train"), PreparedDataset(tmp_path / "out2", "train")
    assert len(one) == len(two) == 3
    for i in range(3):
        a, b = one[i], two[i]
        assert a.frame_id == b.frame_id
        for field in ("points", "boxes", "labels", "num_points", "difficulty", "track_ids", "keypoints"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
