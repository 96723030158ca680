"""Recorded drives without ROS: PointCloud2 layouts decoded field by field, every container (ROS 1 bag,
ROS 2 bag with sqlite3 or mcap storage, plain MCAP) written with rosbags / mcap and read back, ego
poses from /tf (with /tf_static) or odometry, and bad input refused naming the topic and field."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rosbags.typesys import Stores, get_typestore

from voxsparse.data.drives import MarkerWriter, PoseTree, read_drive, write_drive
from voxsparse.data.rosbag import (
    POINTCLOUD2,
    DriveError,
    DriveWriter,
    decode_pointcloud2,
    matrix_to_quaternion,
    new_message,
    open_drive,
)
from voxsparse.geometry import RigidTransform
from voxsparse.structures import Boxes3D, Detections3D

TS = get_typestore(Stores.ROS2_HUMBLE)


def _field(name: str, offset: int, datatype: int, count: int = 1):
    return SimpleNamespace(name=name, offset=offset, datatype=datatype, count=count)


def _cloud(fields, records: np.ndarray, height: int, width: int, row_step: int | None = None,
           bigendian: bool = False, pad_rows: int = 0):
    """A PointCloud2-like message whose data are ``records`` (a structured array, height * width), each
    row followed by ``pad_rows`` bytes of padding."""
    step = records.dtype.itemsize
    rows = records.view(np.uint8).reshape(height, width * step)
    data = np.concatenate([rows, np.full((height, pad_rows), 0xAB, np.uint8)], axis=1).reshape(-1)
    return SimpleNamespace(fields=fields, height=height, width=width, point_step=step,
                           row_step=row_step if row_step is not None else width * step + pad_rows,
                           is_bigendian=bigendian, data=data, is_dense=False)


def _layout(endian: str = "<"):
    """x float64 at 0, a 2-byte gap, y float32 at 10, z float32 at 14, ring uint16 at 18, intensity
    uint16 at 22, then 6 bytes of padding: a 30-byte point."""
    dtype = np.dtype({"names": ["x", "y", "z", "ring", "intensity"],
                      "formats": [endian + "f8", endian + "f4", endian + "f4", endian + "u2", endian + "u2"],
                      "offsets": [0, 10, 14, 18, 22], "itemsize": 30})
    fields = [_field("x", 0, 8), _field("y", 10, 7), _field("z", 14, 7), _field("ring", 18, 4), _field("intensity", 22, 4)]
    return dtype, fields


@pytest.mark.parametrize("endian", ["<", ">"])
def test_any_datatype_offset_padding_and_byte_order(endian):
    dtype, fields = _layout(endian)
    rng = np.random.default_rng(0)
    records = np.zeros(2 * 3, dtype)
    for name in ("x", "y", "z"):
        records[name] = rng.normal(size=6) * 10
    records["intensity"] = rng.integers(0, 60000, 6)
    msg = _cloud(fields, records, height=2, width=3, bigendian=endian == ">", pad_rows=5)
    cloud, dropped = decode_pointcloud2(msg, "drive d.bag: topic /lidar message 0")
    assert dropped == 0 and cloud.features == ("x", "y", "z", "intensity") and cloud.intensity is None
    expected = np.stack([records[n].astype(np.float64) for n in ("x", "y", "z", "intensity")], 1).astype(np.float32)
    np.testing.assert_array_equal(cloud.points, expected)
    assert str(cloud.path) == "drive d.bag: topic /lidar message 0"


def test_organised_cloud_drops_nan_points_and_reads_a_named_uint8_field():
    dtype = np.dtype({"names": ["x", "y", "z", "reflectivity"], "formats": ["<f4", "<f4", "<f4", "u1"],
                      "offsets": [0, 4, 8, 12], "itemsize": 16})
    records = np.zeros(8, dtype)
    records["x"], records["y"], records["z"] = np.arange(8), 1.0, 2.0
    records["reflectivity"] = np.arange(8) * 30
    records["x"][[1, 6]] = np.nan
    records["z"][3] = np.inf
    fields = [_field("x", 0, 7), _field("y", 4, 7), _field("z", 8, 7), _field("reflectivity", 12, 2)]
    msg = _cloud(fields, records, height=2, width=4)
    default, dropped = decode_pointcloud2(msg, "m")
    assert dropped == 3 and default.features == ("x", "y", "z")  # no known intensity name
    cloud, _ = decode_pointcloud2(msg, "m", intensity_field="reflectivity")
    assert cloud.intensity == "uint8"
    np.testing.assert_array_equal(cloud.points[:, 0], [0, 2, 4, 5, 7])
    np.testing.assert_array_equal(cloud.points[:, 3], [0, 60, 120, 150, 210])
    scaled, _ = decode_pointcloud2(msg, "m", intensity_field="reflectivity", intensity_scale="unit")
    assert scaled.intensity == "unit"


def test_an_empty_cloud_is_zero_points():
    dtype, fields = _layout()
    cloud, dropped = decode_pointcloud2(_cloud(fields, np.zeros(0, dtype), height=1, width=0), "m")
    assert cloud.points.shape == (0, 4) and dropped == 0


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda m: m.fields.pop(2), ["lacks", "'z'"]),
        (lambda m: setattr(m.fields[4], "offset", 29), ["'intensity'", "overflows point_step 30"]),
        (lambda m: setattr(m.fields[1], "datatype", 9), ["'y'", "datatype 9"]),
        (lambda m: setattr(m, "data", m.data[:-1]), ["holds 59 bytes", "row_step 30 x height 2 = 60"]),
        (lambda m: setattr(m, "row_step", 20), ["row_step 20 is less than width 1 x point_step 30"]),
        (lambda m: m.fields.append(_field("x", 0, 7)), ["'x' is declared twice"]),
    ],
)
def test_bad_layouts_name_the_topic_and_field(change, words):
    dtype, fields = _layout()
    msg = _cloud(fields, np.zeros(2, dtype), height=2, width=1)
    change(msg)
    with pytest.raises(DriveError) as info:
        decode_pointcloud2(msg, "drive d.mcap: topic /lidar/top message 3")
    assert str(info.value).startswith("drive d.mcap: topic /lidar/top message 3: ")
    for word in words:
        assert word in str(info.value)


def test_a_nan_intensity_of_a_kept_point_is_an_error():
    dtype = np.dtype({"names": ["x", "y", "z", "intensity"], "formats": ["<f4"] * 4, "offsets": [0, 4, 8, 12],
                      "itemsize": 16})
    records = np.zeros(3, dtype)
    records["intensity"][1] = np.nan
    fields = [_field(n, 4 * i, 7) for i, n in enumerate(("x", "y", "z", "intensity"))]
    with pytest.raises(DriveError, match=r"field 'intensity' is not finite at kept point 1"):
        decode_pointcloud2(_cloud(fields, records, 1, 3), "m")
    with pytest.raises(DriveError, match=r"no field 'remission'.*'intensity'"):
        decode_pointcloud2(_cloud(fields, records, 1, 3), "m", intensity_field="remission")


def test_matrix_to_quaternion_round_trips():
    rng = np.random.default_rng(1)
    for _ in range(50):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        r = RigidTransform(tuple(q), (0.0, 0.0, 0.0)).matrix()
        back = matrix_to_quaternion(r)
        np.testing.assert_allclose(RigidTransform(tuple(back), (0.0, 0.0, 0.0)).matrix(), r, atol=1e-12)


# --- containers -----------------------------------------------------------------------------------


def _pose(yaw: float, x: float, y: float, z: float = 1.8) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = RigidTransform.from_yaw(yaw).matrix()
    pose[:3, 3] = (x, y, z)
    return pose


def _frames(n: int = 3):
    rng = np.random.default_rng(2)
    return [(1.7e9 + 0.1 * k, rng.normal(size=(50 + k, 4)).astype(np.float32), _pose(0.1 * k, 2.0 * k, 0.5 * k))
            for k in range(n)]


@pytest.mark.parametrize("name,kind,storage", [
    ("drive.bag", "bag", "sqlite3"),
    ("drive_sqlite", "rosbag2", "sqlite3"),
    ("drive_mcap", "rosbag2", "mcap"),
    ("drive.mcap", "mcap", "sqlite3"),
])
@pytest.mark.parametrize("pose_topic", ["/tf", "/odom"])
def test_every_container_gives_back_points_times_and_poses(tmp_path, name, kind, storage, pose_topic):
    frames = _frames()
    path = write_drive(tmp_path / name, frames, pose_topic=pose_topic, kind=kind, storage=storage)
    read = list(read_drive(path, "/lidar/top", pose_topic))
    assert [f.index for f in read] == [0, 1, 2]
    for frame, (time, points, pose) in zip(read, frames):
        np.testing.assert_array_equal(frame.cloud.points, points)
        assert frame.stamp_ns == round(time * 1e9) and frame.sensor_frame == "lidar"
        np.testing.assert_allclose(frame.ego_pose, pose, atol=1e-12)
    if kind == "rosbag2":  # the storage file of a ROS 2 bag folder alone reads the same
        inner = next(p for p in path.iterdir() if p.suffix in (".db3", ".mcap"))
        assert len(list(read_drive(inner, "/lidar/top"))) == 3


def test_without_a_pose_topic_poses_are_none_and_said_once(tmp_path, caplog):
    path = write_drive(tmp_path / "d.mcap", _frames(), pose_topic=None)
    with caplog.at_level("INFO"):
        frames = list(read_drive(path, "/lidar/top"))
    assert all(f.ego_pose is None for f in frames)
    assert sum("no pose topic given" in r.message for r in caplog.records) == 1


def test_tf_chain_with_static_extrinsics_is_interpolated(tmp_path):
    """map -> base_link moves (two samples); base_link -> lidar is static: a cloud between the samples
    gets the interpolated base pose composed with the extrinsic."""
    path = tmp_path / "tf.mcap"
    with DriveWriter(path, "mcap") as w:
        for topic, msgtype in (("/lidar/top", POINTCLOUD2), ("/tf", "tf2_msgs/msg/TFMessage"),
                               ("/tf_static", "tf2_msgs/msg/TFMessage")):
            w.add_topic(topic, msgtype)

        def tf(ns, parent, child, xyz, yaw):
            from voxsparse.data.rosbag import header
            q = RigidTransform.from_yaw(yaw).rotation
            transform = new_message(TS, "geometry_msgs/msg/Transform",
                                    translation=new_message(TS, "geometry_msgs/msg/Vector3", x=xyz[0], y=xyz[1], z=xyz[2]),
                                    rotation=new_message(TS, "geometry_msgs/msg/Quaternion", w=q[0], x=q[1], y=q[2], z=q[3]))
            return new_message(TS, "tf2_msgs/msg/TFMessage", transforms=[new_message(
                TS, "geometry_msgs/msg/TransformStamped", header=header(TS, ns, parent), child_frame_id=child,
                transform=transform)])

        from voxsparse.data.rosbag import encode_pointcloud2
        w.write("/tf_static", 0, tf(0, "base_link", "lidar", (1.0, 0.0, 2.0), 0.0))
        w.write("/tf", 10**9, tf(10**9, "map", "base_link", (0.0, 0.0, 0.0), 0.0))
        w.write("/tf", 2 * 10**9, tf(2 * 10**9, "map", "base_link", (10.0, 0.0, 0.0), np.pi / 2))
        for ns in (1_500_000_000, 3_000_000_000):  # the second lies 1 s after the last pose
            w.write("/lidar/top", ns, encode_pointcloud2(TS, np.zeros((1, 3), np.float32), "xyz", ns, "lidar"))
    frames = list(read_drive(path, "/lidar/top", "/tf"))
    assert len(frames) == 1
    base = _pose(np.pi / 4, 5.0, 0.0, 0.0)
    extrinsic = _pose(0.0, 1.0, 0.0, 2.0)
    np.testing.assert_allclose(frames[0].ego_pose, base @ extrinsic, atol=1e-9)


def test_pose_tree_refuses_a_frame_it_cannot_reach():
    tree = PoseTree("drive d.bag: pose topic '/tf'")
    tree.add("map", "base_link", 0, (0, 0, 0), (1, 0, 0, 0))
    tree.freeze()
    with pytest.raises(DriveError, match=r"pose topic '/tf': no transform reaches the cloud's frame 'velodyne'"):
        tree.pose("velodyne", 0)
    zero = PoseTree("drive d.bag: pose topic '/odom'")
    zero.add("odom", "base_link", 0, (0, 0, 0), (0, 0, 0, 0))  # a driver's unset orientation
    with pytest.raises(DriveError, match=r"pose topic '/odom': a transform to frame 'base_link' has a rotation"):
        zero.freeze()


def test_missing_topics_wrong_types_and_foreign_files_are_named(tmp_path):
    path = write_drive(tmp_path / "d.mcap", _frames(1))
    with pytest.raises(DriveError, match=r"no point cloud topic '/points'; its topics: /lidar/top \(sensor_msgs/msg/PointCloud2\), /tf"):
        list(read_drive(path, "/points"))
    with pytest.raises(DriveError, match=r"topic '/tf' is tf2_msgs/msg/TFMessage, expected sensor_msgs/msg/PointCloud2"):
        list(read_drive(path, "/tf"))
    with pytest.raises(DriveError, match=r"topic '/lidar/top' is sensor_msgs/msg/PointCloud2, expected nav_msgs/msg/Odometry or tf2_msgs"):
        list(read_drive(path, "/lidar/top", "/lidar/top"))
    with pytest.raises(FileNotFoundError, match="nowhere.bag"):
        open_drive(tmp_path / "nowhere.bag")
    (tmp_path / "scan.pcd").write_text("not a drive")
    with pytest.raises(DriveError, match=r"expected a ROS 1 .bag, a ROS 2 bag folder"):
        open_drive(tmp_path / "scan.pcd")
    (tmp_path / "broken.mcap").write_bytes(b"\x89MCAP0\r\n" + b"\0" * 20)
    with pytest.raises(DriveError, match=r"broken.mcap: not a readable MCAP file"):
        open_drive(tmp_path / "broken.mcap")


def test_an_mcap_topic_of_another_encoding_is_refused_by_name(tmp_path):
    from mcap.writer import Writer

    path = tmp_path / "json.mcap"
    with open(path, "wb") as f:
        writer = Writer(f)
        writer.start()
        schema = writer.register_schema("Points", "jsonschema", b"{}")
        channel = writer.register_channel("/points", "json", schema)
        writer.add_message(channel, log_time=1, data=json.dumps({"x": 1}).encode(), publish_time=1)
        writer.finish()
    with open_drive(path) as source, pytest.raises(DriveError, match=r"topic '/points' has schema 'jsonschema'"):
        list(source.messages(["/points"]))


def test_markers_written_to_every_container_read_back(tmp_path):
    frame = next(iter(read_drive(write_drive(tmp_path / "in.mcap", _frames(1)), "/lidar/top")))
    boxes = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.3], [5.0, -1.0, 0.2, 0.8, 0.8, 1.7, -1.0]])
    det = Detections3D(Boxes3D(boxes), torch.tensor([0.9, 0.4]), torch.tensor([0, 1]), track_ids=torch.tensor([7, -1]))
    for name in ("out.bag", "out.mcap", "out_bag2"):
        writer = MarkerWriter(tmp_path / name, "/detections", ["Vehicle", "Pedestrian"])
        writer.write(frame, det)
        writer.close()
        with open_drive(tmp_path / name) as source:
            assert source.topics == {"/detections": "visualization_msgs/msg/MarkerArray"}
            (message,) = list(source.messages(["/detections"]))
        markers = message.message.markers
        assert [m.action for m in markers] == [3, 0, 0] and message.log_time == frame.stamp_ns
        assert [m.ns for m in markers[1:]] == ["Vehicle", "Pedestrian"] and [m.id for m in markers[1:]] == [7, 1]
        first = markers[1]
        assert first.header.frame_id == "lidar" and first.type == 1 and first.text == "Vehicle 0.90"
        np.testing.assert_allclose([first.pose.position.x, first.scale.x, first.scale.z], [1.0, 4.0, 1.5], rtol=1e-6)
        np.testing.assert_allclose(2 * np.arctan2(first.pose.orientation.z, first.pose.orientation.w), 0.3, rtol=1e-6)
    with pytest.raises(DriveError, match="exists already"):
        MarkerWriter(tmp_path / "out.mcap", "/detections", ["Vehicle"])


def test_unindexed_mcap_is_read(tmp_path):
    """An MCAP written without a summary (a recorder killed before finishing) still reads."""
    from mcap.writer import IndexType, Writer

    from voxsparse.data.rosbag import encode_pointcloud2

    path = tmp_path / "raw.mcap"
    with open(path, "wb") as f:
        writer = Writer(f, index_types=IndexType.NONE, use_chunking=False, use_summary_offsets=False,
                        repeat_channels=False, repeat_schemas=False)
        writer.start(profile="ros2")
        text = TS.generate_msgdef(POINTCLOUD2, ros_version=2)[0]
        channel = writer.register_channel("/lidar/top", "cdr", writer.register_schema("sensor_msgs/PointCloud2", "ros2msg", text.encode()))
        points = np.arange(12, dtype=np.float32).reshape(3, 4)
        msg = encode_pointcloud2(TS, points, ("x", "y", "z", "intensity"), 5, "lidar")
        writer.add_message(channel, log_time=5, data=bytes(TS.serialize_cdr(msg, POINTCLOUD2)), publish_time=5)
        writer.finish()
    (frame,) = list(read_drive(path, "/lidar/top"))
    np.testing.assert_array_equal(frame.cloud.points, points)
    assert str(frame.cloud.path).endswith("raw.mcap: topic /lidar/top message 0")


@pytest.mark.parametrize("name", ["d.bag", "d.mcap", "d_sqlite"])
def test_a_truncated_recording_is_refused_naming_the_file(tmp_path, name):
    path = write_drive(tmp_path / name, _frames(4))
    file = path if path.is_file() else next(p for p in path.iterdir() if p.suffix == ".db3")
    cut = tmp_path / f"cut{file.suffix}"
    data = file.read_bytes()
    cut.write_bytes(data[: len(data) * 3 // 5])
    with pytest.raises(DriveError, match=f"drive {cut}: "):
        list(read_drive(cut, "/lidar/top", "/tf"))
