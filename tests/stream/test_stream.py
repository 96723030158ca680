"""The stream over a synthetic drive computes what the offline path computes: the detections of
``tools/predict.py`` (ScanPredictor) frame by frame and the tracks of the offline tracker
(VoxelNeXtTracker over a sequence in the world frame, as ``engine.tracking`` runs it); the command
line runs a drive end to end; bad input is refused in one line; the session's state stays bounded."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tool_runs import compose_config, error_line, run_tool

import voxsparse
from voxsparse.data.drives import read_drive, write_drive
from voxsparse.data.pointfile import PointCloud
from voxsparse.data.rosbag import open_drive
from voxsparse.data.synthetic import LidarConfig, SyntheticDataset
from voxsparse.engine.predict import ScanOptions, ScanPredictor
from voxsparse.evaluation.nuscenes_tracking import detections_to_global
from voxsparse.geometry import RigidTransform
from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker
from voxsparse.stream import DetectionStream, DriveOptions, LatencyStats, run_drive
from voxsparse.structures import Boxes3D, Detections3D, PointConvention

START = 1_700_000_000.0  # drive times are epoch seconds
FRAMES = 4


@pytest.fixture(scope="module")
def sequence():
    """One synthetic sequence, a sparse 12-beam LiDAR (~5,000 points a frame), the ego moving."""
    lidar = LidarConfig(beams=12, azimuth_resolution=0.8)
    data = SyntheticDataset("test", FRAMES, seed=3, sequence_length=FRAMES, lidar=lidar)
    return [data[i] for i in range(FRAMES)]


@pytest.fixture(scope="module")
def drive(sequence, tmp_path_factory):
    path = tmp_path_factory.mktemp("drive") / "drive.mcap"
    return write_drive(path, [(START + f.timestamp, f.points, f.ego_pose) for f in sequence])


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return voxsparse.load_model(tiny_checkpoint, "cpu")


def _offline(model, sequence, config: TrackerConfig):
    """tools/predict.py's detections per frame, then the tracker over the whole sequence in the world
    frame (ego poses rotate about z only: the transform is built from the yaw, not the stream's code)."""
    predictor = ScanPredictor(model)
    detections = [predictor(PointCloud(f.points, ("x", "y", "z", "intensity"), "unit")) for f in sequence]
    tracker = VoxelNeXtTracker(list(model.class_names), config)
    world = []
    for det, f in zip(detections, sequence):
        yaw = float(np.arctan2(f.ego_pose[1, 0], f.ego_pose[0, 0]))
        world.append(detections_to_global(det, RigidTransform.from_yaw(yaw, tuple(f.ego_pose[:3, 3]))))
    return detections, tracker.track_sequence(world, [START + f.timestamp for f in sequence])


def test_stream_over_an_mcap_drive_equals_offline_detection_and_tracking(model, sequence, drive):
    config = TrackerConfig(min_score=0.02)
    offline, offline_tracks = _offline(model, sequence, config)
    stream = DetectionStream(model, tracker=config)
    results = [stream.step(f.cloud, f.timestamp, f.ego_pose, f.frame_id) for f in read_drive(drive, "/lidar/top", "/tf")]
    assert len(results) == FRAMES
    assert sum(len(t) for t in offline_tracks) > 20 and len({i for t in offline_tracks for i in t.track_ids.tolist()}) > 5
    for k, (result, det, tracks) in enumerate(zip(results, offline, offline_tracks)):
        assert result.frame_id == str(round((START + sequence[k].timestamp) * 1e9))
        torch.testing.assert_close(result.detections.boxes.tensor, det.boxes.tensor, rtol=0, atol=0)
        assert torch.equal(result.detections.scores, det.scores) and torch.equal(result.detections.labels, det.labels)
        assert torch.equal(result.tracks.track_ids, tracks.track_ids), k
        assert torch.equal(result.tracks.labels, tracks.labels)
        torch.testing.assert_close(result.tracks.boxes.tensor, tracks.boxes.tensor, rtol=0, atol=1e-6)
        # Every reported track sits on the sensor-frame detection it came from.
        ids = result.detections.track_ids
        assert sorted(ids[ids >= 0].tolist()) == sorted(tracks.track_ids.tolist())
        back = detections_to_global(result.tracks, RigidTransform.from_yaw(0.0).inverse())
        world = detections_to_global(result.detections[ids >= 0], _transform(sequence[k].ego_pose))
        order = torch.argsort(ids[ids >= 0])
        torch.testing.assert_close(world.boxes.tensor[order], back.boxes.tensor[torch.argsort(result.tracks.track_ids)],
                                   rtol=0, atol=1e-6)
    assert stream.latency().frames == FRAMES and stream.latency().p99_ms >= stream.latency().p50_ms > 0


@pytest.mark.parametrize("name,kind,storage", [("drive.bag", "bag", "sqlite3"), ("drive_db3", "rosbag2", "sqlite3"),
                                               ("drive_mcap", "rosbag2", "mcap")])
def test_the_synthetic_drive_reads_alike_from_every_container(tmp_path, sequence, drive, name, kind, storage):
    """What the stream gets from a ROS 1 bag or a ROS 2 bag equals what it gets from the MCAP file."""
    path = write_drive(tmp_path / name, [(START + f.timestamp, f.points, f.ego_pose) for f in sequence],
                       kind=kind, storage=storage)
    for a, b in zip(read_drive(path, "/lidar/top", "/tf"), read_drive(drive, "/lidar/top", "/tf"), strict=True):
        assert a.stamp_ns == b.stamp_ns and a.timestamp == b.timestamp
        np.testing.assert_array_equal(a.cloud.points, b.cloud.points)
        np.testing.assert_array_equal(a.ego_pose, b.ego_pose)


def _transform(pose):
    yaw = float(np.arctan2(pose[1, 0], pose[0, 0]))
    return RigidTransform.from_yaw(yaw, tuple(pose[:3, 3]))


def test_untracked_classes_and_no_pose(model, sequence, caplog):
    """Only gated classes are tracked; without a pose the sensor frame is the world (said once)."""
    config = TrackerConfig(max_distance={"Vehicle": 4.0}, min_score=0.0)
    stream = DetectionStream(model, tracker=config)
    with caplog.at_level("INFO"):
        results = [stream.step(f.points, START + f.timestamp) for f in sequence[:2]]
    assert sum("no ego pose" in r.message for r in caplog.records) == 1
    vehicle = model.class_names.index("Vehicle")
    for r in results:
        tracked = r.detections.track_ids >= 0
        assert (r.detections.labels[tracked] == vehicle).all() and (r.detections.labels[~tracked] != vehicle).all()
        assert (r.tracks.labels == vehicle).all()
        torch.testing.assert_close(r.tracks.boxes.tensor.float(), r.detections.boxes.tensor[tracked], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="nothing would be tracked"):
        DetectionStream(model, tracker=TrackerConfig(max_distance={"car": 4.0}))
    with pytest.raises(ValueError, match="timestamp: must increase"):
        stream.step(sequence[0].points, START)


class _RandomDetector(torch.nn.Module):
    """A stand-in detector: ``max_detections`` boxes scattered anew every frame, so every detection
    starts a track (the tracker's worst case for memory)."""

    class_names = ("Vehicle", "Pedestrian", "Cyclist")
    point_convention = PointConvention(("x", "y", "z", "intensity"))
    max_detections = 30

    def __init__(self) -> None:
        super().__init__()
        self.rng = np.random.default_rng(0)

    def predict(self, points) -> list[Detections3D]:
        n = self.max_detections
        boxes = np.concatenate([self.rng.uniform(-40, 40, (n, 2)), np.ones((n, 4)), np.zeros((n, 1))], 1)
        scores = torch.as_tensor(np.sort(self.rng.uniform(0.2, 1.0, n))[::-1].copy(), dtype=torch.float32)
        return [Detections3D(Boxes3D(torch.as_tensor(boxes, dtype=torch.float32)), scores,
                             torch.as_tensor(self.rng.integers(0, 3, n)))]


def test_state_stays_bounded_over_a_long_drive():
    """Latencies keep a fixed window; live tracks stay under max_detections x (max_age + 1) however
    many frames pass (here 60 frames of fresh detections, each starting a track)."""
    config = TrackerConfig(min_score=0.0, min_hits=1, max_age=2)
    model = _RandomDetector()
    stream = DetectionStream(model, tracker=config, latency_window=16)
    live = []
    for k in range(60):
        stream.step(np.zeros((10, 4), np.float32), 0.1 * k)
        live.append(len(stream.tracker.tracks))
        assert live[-1] <= model.max_detections * (config.max_age + 1)
    assert max(live) > 2 * model.max_detections  # confirmed tracks do coast
    assert stream.latency().frames == 16
    assert LatencyStats.of([]).frames == 0


def test_predict_tool_streams_a_drive_to_json_lines(tmp_path, tiny_checkpoint, sequence, drive):
    run = tmp_path / "run"
    done = run_tool("predict", f"checkpoint={tiny_checkpoint}", f"bag={drive}", "topic=/lidar/top", "pose_topic=/tf",
                    "tracker.min_score=0.02", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "detections.jsonl").read_text().splitlines()]
    assert [r["stamp_ns"] for r in records] == [round((START + f.timestamp) * 1e9) for f in sequence]
    assert [r["num_points"] for r in records] == [len(f.points) for f in sequence]
    assert records[0]["file"].endswith("drive.mcap: topic /lidar/top message 0")
    ids = [d["track_id"] for r in records for d in r["detections"]]
    assert any(i >= 0 for i in ids) and len(ids) == sum(len(r["detections"]) for r in records)
    log = (run / "predict.log").read_text()
    assert f"{FRAMES} frames" in log and "p50" in log and "p99" in log


def test_a_drive_streamed_to_markers_in_a_new_bag(tmp_path, drive, caplog):
    out = tmp_path / "detections.bag"
    with caplog.at_level("INFO"):
        run = run_drive(_RandomDetector(), DriveOptions(bag=str(drive), topic="/lidar/top", output=str(out), track=False),
                        tmp_path, min_score=0.5)
    assert run.output == out and run.frames == FRAMES and run.latency.frames == FRAMES
    assert any("no pose topic given" in r.message for r in caplog.records)
    with open_drive(out) as source:
        arrays = [m.message for m in source.messages(["/detections"])]
    assert len(arrays) == FRAMES and sum(len(a.markers) - 1 for a in arrays) == run.detections
    for markers in arrays:
        assert markers.markers[0].action == 3 and all(m.color.a == 0.5 for m in markers.markers[1:])


def test_predict_options_cover_its_config():
    """configs/predict.yaml holds the point-file options, the drive options and the tracker's, with
    the dataclasses' defaults (a run without overrides sees the same values)."""
    cfg = compose_config("predict")
    scans, drives = dataclasses.asdict(ScanOptions()), dataclasses.asdict(DriveOptions())
    assert set(cfg) == set(scans) | set(drives) | {"tracker"} and not set(scans) & set(drives)
    assert {k: cfg[k] for k in scans} == scans and {k: cfg[k] for k in drives} == drives
    tracker = TrackerConfig(**OmegaConf.to_container(cfg.tracker))
    assert set(cfg.tracker) == {f.name for f in dataclasses.fields(TrackerConfig)}
    assert dataclasses.replace(tracker, max_distance=TrackerConfig().max_distance) == TrackerConfig()


@pytest.mark.parametrize(
    "args,words",
    [
        (["topic=/points"], ["drive", "no point cloud topic '/points'", "/lidar/top (sensor_msgs/msg/PointCloud2)"]),
        (["input=scan.bin"], ["either input="]),
    ],
)
def test_bad_drive_input_is_one_line_naming_the_topic(tmp_path, tiny_checkpoint, drive, args, words):
    line = error_line(run_tool("predict", f"checkpoint={tiny_checkpoint}", f"bag={drive}", *args,
                               f"hydra.run.dir={tmp_path / 'run'}"))
    for word in words:
        assert word in line, line


@pytest.mark.parametrize(
    "options,pattern",
    [
        ({"pose_topic": "/odom"}, r"no pose topic '/odom'"),
        ({"intensity_field": "reflectivity"}, r"topic /lidar/top message 0: no field 'reflectivity'"),
        ({"intensity_scale": "percent"}, r"intensity scale 'percent'"),
        ({"topic": None}, r"bag=DRIVE and topic="),
    ],
)
def test_bad_drive_options_are_named(tmp_path, model, drive, options, pattern):
    out = tmp_path / "out.bag"
    opts = dataclasses.replace(DriveOptions(bag=str(drive), topic="/lidar/top", output=str(out)), **options)
    with pytest.raises(ValueError, match=pattern):
        run_drive(model, opts, tmp_path)
    assert not out.exists(), "nothing is written for a drive that cannot be read"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stream_on_cuda_detects_as_on_the_cpu_fused_or_not(tiny_checkpoint, model, sequence):
    gpu = DetectionStream(voxsparse.load_model(tiny_checkpoint, "cuda"), "cuda")
    fused = DetectionStream(voxsparse.load_model(tiny_checkpoint, "cuda"), "cuda", fuse=True)
    cpu = DetectionStream(model)
    for f in sequence[:2]:
        a, b, c = gpu.step(f.points, f.timestamp), cpu.step(f.points, f.timestamp), fused.step(f.points, f.timestamp)
        torch.testing.assert_close(a.detections.scores, b.detections.scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(c.detections.scores, a.detections.scores, rtol=1e-4, atol=1e-4)
        assert a.latency_ms > 0 and gpu.latency().p99_ms >= gpu.latency().p50_ms


def test_stream_benchmark_reports_percentiles_over_a_drive(tiny_checkpoint, drive):
    done = run_tool("stream_benchmark", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--drive", str(drive),
                    "--pose-topic", "/tf", "--warmup", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["frames"] == FRAMES - 1 and info["p99_ms"] >= info["p50_ms"] > 0 and info["track"]
