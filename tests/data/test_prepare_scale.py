"""Preparation at scale on a multi-segment Waymo v1 fixture (real protos) with dense range images:
the process pool and a local Ray instance write byte-identical files, a run killed with SIGKILL
resumes to exactly a clean run's files (no duplicate, torn or temporary file), Ray resumes an
interrupted process-pool run to the same files, and the output size and peak RSS per worker are
measured.

``python tests/data/test_prepare_scale.py [SEGMENTS] [FRAMES]`` measures the same on full-size range
images (TOP 64 x 2650, four 200 x 600 short-range LiDARs) filled as a real scan fills them (``realistic``
frames, below): times, peak RSS per worker, bytes per point and output / raw for the default and the
lossless storage.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("google_crc32c", reason="the Waymo TFRecord reader needs the waymo extra")
pytest.importorskip("waymo_open_dataset", reason="the official Waymo protos are not installed")

from waymo_writer import ObjectSpec, _add_labels, _compressed, _pose_matrix, _top_pixel_pose, waymo_lasers

from voxsparse.data.point_storage import stored_points
from voxsparse.data.preparation import main as prepare_data
from voxsparse.data.prepared import PreparedDataset
from voxsparse.data.waymo.frame import _protos
from voxsparse.data.waymo.prepare import XYZ_STEP
from voxsparse.data.waymo.range_image import column_azimuths, range_image_to_points
from voxsparse.data.waymo.tfrecord import write_records

ROOT = Path(__file__).resolve().parents[2]
SMALL_LASERS = {"top": (32, 500), "side": (24, 80)}


def dense_frame(seed: int, timestamp_micros: int, lasers, context_name: str, realistic: bool = False):
    """A ``dataset_pb2.Frame`` whose range images are full: every pixel's ray meets the ground or a
    wall of varying distance (up to 75 m TOP, 20 m the others; 2 cm noise), 4 % of pixels without
    a return, 8 % with a second one; intensity and elongation random float32 (incompressible, the
    worst case for raw and prepared sizes alike). The TOP LiDAR's pixel poses follow the ego motion.
    Two labelled objects.

    ``realistic``: filled as a real frame is (``waymo-open-dataset`` issue 353: ~10 % of TOP pixels
    and over 95 % of the short-range LiDARs' hold no return), with values drawn as a real Waymo scan's
    are distributed (measured on 800 points of one): intensity log-normal (log mean -1.7, deviation
    0.74) with 8 significant bits, elongation one of 256 levels ``k * 1.4931 / 255``, ``k``
    log-normal around 10."""
    rng = np.random.default_rng(seed)
    missing = {"top": 0.10, "side": 0.95} if realistic else {"top": 0.04, "side": 0.04}
    dataset_pb2 = _protos()[0]
    pose = _pose_matrix(np.array([0.01, -0.01, 0.3 * seed]), np.array([100.0 + seed, -40.0, 3.0]))
    frame = dataset_pb2.Frame(timestamp_micros=timestamp_micros)
    frame.context.name = context_name
    frame.pose.transform.extend(pose.reshape(-1).tolist())
    phase, stored = rng.uniform(0, 2 * np.pi), []
    for laser in lasers:
        calibration = frame.context.laser_calibrations.add(name=laser.name)
        calibration.extrinsic.transform.extend(laser.extrinsic.reshape(-1).tolist())
        calibration.beam_inclination_min = laser.inclination_min
        calibration.beam_inclination_max = laser.inclination_max
        if laser.beam_inclinations is not None:
            calibration.beam_inclinations.extend(laser.beam_inclinations.tolist())
        incl, azimuth = laser.row_inclinations(), column_azimuths(laser.width, laser.extrinsic)
        shape = (laser.height, laser.width)
        ray = np.stack(
            [np.cos(azimuth)[None] * np.cos(incl)[:, None], np.sin(azimuth)[None] * np.cos(incl)[:, None],
             np.broadcast_to(np.sin(incl)[:, None], shape)], axis=-1,
        ) @ laser.extrinsic[:3, :3].T  # fmt: skip
        height = laser.extrinsic[2, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            ground = np.where(ray[..., 2] < 0, height / -ray[..., 2], np.inf)
            wall_distance = 14 + 20 * (0.5 + 0.5 * np.sin(3 * np.arctan2(ray[..., 1], ray[..., 0]) + phase))
            wall = wall_distance / np.hypot(ray[..., 0], ray[..., 1])
            wall = np.where(height + wall * ray[..., 2] < 9.0, wall, np.inf)
        first = np.minimum(ground, wall)
        first = np.where(first < (75.0 if laser.name == 1 else 20.0), first + rng.normal(0, 0.02, shape), 0.0)
        first[rng.uniform(size=shape) < missing["top" if laser.name == 1 else "side"]] = 0.0
        second = np.where((rng.uniform(size=shape) < 0.08) & (first > 0), first + rng.uniform(0.5, 5, shape), 0.0)
        pixel_pose = None
        if laser.name == 1:
            motion = SimpleNamespace(sweep_seconds=0.1, yaw_rate=0.15, ego_velocity=(8.0, 0.3), pose=pose)
            pixel_pose = _top_pixel_pose(motion, laser)
        proto = frame.lasers.add(name=laser.name)
        for index, (field, distance) in enumerate(((proto.ri_return1, first), (proto.ri_return2, second))):
            image = np.zeros((*shape, 4), np.float32)
            valid = distance > 0
            image[..., 0] = distance
            if realistic:
                mantissa, exponent = np.frexp(rng.lognormal(-1.7, 0.74, shape))
                intensity = np.ldexp(np.round(mantissa * 256) / 256, exponent)
                elongation = np.clip(np.round(rng.lognormal(np.log(10), 1.0, shape)), 0, 255) * (1.4931 / 255)
            else:
                intensity, elongation = rng.lognormal(-2.0, 1.2, shape), rng.uniform(0.0, 0.6, shape)
            image[..., 1] = np.where(valid, intensity, 0.0)
            image[..., 2] = np.where(valid, elongation, 0.0)
            image[..., 3] = -1.0
            field.range_image_compressed = _compressed(dataset_pb2.MatrixFloat, image)
            field.camera_projection_compressed = _compressed(dataset_pb2.MatrixInt32, np.zeros((*shape, 6), np.int32))
            if pixel_pose is not None and index == 0:
                field.range_image_pose_compressed = _compressed(dataset_pb2.MatrixFloat, pixel_pose)
            stored.append(range_image_to_points(image[..., 0], laser.extrinsic, incl, pixel_pose, pose)[0])
    objects = [
        ObjectSpec(1, np.array([15.0, 3.0, 1.0, 4.5, 2.0, 1.8, 0.2]), f"car-{seed}"),
        ObjectSpec(2, np.array([8.0, -2.0, 0.9, 0.8, 0.8, 1.8, 0.0]), f"walker-{seed}"),
    ]
    _add_labels(frame, objects, np.concatenate(stored))
    return frame


def write_dense_segments(folder: Path, segments: int, frames: int, lasers, realistic: bool = False) -> list[Path]:
    """``segments`` TFRecord files of ``frames`` dense frames each under ``folder``."""
    paths = []
    for s in range(segments):
        name = f"segment-{s:04d}"
        records = (
            dense_frame(s * frames + f, 1_550_000_000_000_000 + 100_000 * f, lasers, name, realistic).SerializeToString()
            for f in range(frames)
        )
        paths.append(write_records(folder / f"{name}.tfrecord", records))
    return paths


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def command(raw: Path, out: Path, *extra: str) -> list[str]:
    return ["waymo", "--root", str(raw), "--out", str(out), "--quiet", *extra]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("waymo_dense")
    write_dense_segments(root / "training", segments=4, frames=2, lasers=waymo_lasers(**SMALL_LASERS))
    return root


@pytest.fixture(scope="module")
def clean(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    prepare_data(command(raw, out, "--workers", "2"))
    return out


def test_default_features_read_back_within_their_bounds_and_the_output_is_measured(raw, clean, capsys):
    prepared = PreparedDataset(clean, "train")
    assert len(prepared) == 8 and prepared.point_features == ("x", "y", "z", "intensity", "elongation")
    assert prepared.index.config["quantize"] == {"x": XYZ_STEP, "y": XYZ_STEP, "z": XYZ_STEP}
    from voxsparse.data.waymo import read_frames

    want = {f.frame_id: f for path in sorted((raw / "training").glob("*.tfrecord")) for f in read_frames(path)}
    for frame in prepared:  # the reader's columns (range left out) within the stated bounds
        exact = want[frame.frame_id].points[:, [0, 1, 2, 4, 5]]
        assert np.abs(frame.points[:, :3] - exact[:, :3]).max() <= XYZ_STEP / 2
        np.testing.assert_array_equal(frame.points[:, 3:], exact[:, 3:].astype(np.float16).astype(np.float32))
    raw_bytes = sum(p.stat().st_size for p in (raw / "training").glob("*.tfrecord"))
    frame_bytes = sum(p.stat().st_size for p in (clean / "train" / "frames").iterdir())
    points = sum(f.num_points for f in prepared.index.frames)
    with capsys.disabled():
        print(
            f"\nraw {raw_bytes / points:.2f} B/point, prepared frames {frame_bytes / points:.2f} B/point "
            f"(output / raw {frame_bytes / raw_bytes:.3f}) over {points} points"
        )
    # Measured 6.5 B/point on these small range images (random float32 intensity and elongation, the
    # worst case); lossless float32 columns took 17.1, the version-1 layout 25.
    assert frame_bytes / points < 8


def test_lossless_storage_on_request(raw, clean, tmp_path):
    prepare_data(command(raw, tmp_path, "--workers", "1", "--xyz-step", "0", "--half-features"))
    lossless, default = PreparedDataset(tmp_path, "train"), PreparedDataset(clean, "train")
    assert "quantize" not in lossless.index.config and "half_features" not in lossless.index.config
    from voxsparse.data.waymo import read_frames

    want = {f.frame_id: f for path in sorted((raw / "training").glob("*.tfrecord")) for f in read_frames(path)}
    for a, b in zip(lossless, default):
        np.testing.assert_array_equal(a.points, want[a.frame_id].points[:, [0, 1, 2, 4, 5]])
        np.testing.assert_array_equal(b.points, stored_points(a.points, [False] * 3 + [True] * 2, [XYZ_STEP] * 3 + [0] * 2))
    size = {
        name: sum(p.stat().st_size for p in (root / "train" / "frames").iterdir())
        for name, root in (("lossless", tmp_path), ("default", clean))
    }
    assert size["default"] < 0.5 * size["lossless"]


def test_local_ray_resumes_a_process_pool_run_to_identical_files(tmp_path, capsys):
    pytest.importorskip("ray", reason='the Ray executor needs the ray extra (pip install -e ".[ray]")')
    # Two one-frame segments: on two busy cores a local Ray instance starts in ~15 s, and each task's
    # fresh worker process imports torch in ~10 s.
    write_dense_segments(tmp_path / "raw" / "training", segments=2, frames=1, lasers=waymo_lasers(**SMALL_LASERS))
    prepare_data(command(tmp_path / "raw", tmp_path / "local", "--workers", "2"))
    # An interrupted process-pool run: no index, one segment unrecorded with a torn frame, a temporary.
    shutil.copytree(tmp_path / "local", tmp_path / "ray")
    split = tmp_path / "ray" / "train"
    (split / "index.json").unlink()
    record = min((split / "tasks").glob("*.json"))
    (frame_id,) = [f["frame_id"] for f in json.loads(record.read_text())["frames"]]
    record.unlink()
    torn = split / "frames" / f"{frame_id}.npz"
    torn.write_bytes(torn.read_bytes()[:1000])
    (split / "frames" / f".{frame_id}.npz.x1y2.tmp").write_bytes(b"partial")
    capsys.readouterr()

    (index,) = prepare_data(
        command(tmp_path / "raw", tmp_path / "ray", "--executor", "ray", "--workers", "2", "--ray-task-memory", "0.5")
    )
    assert "1 task(s) done, 1 already done" in capsys.readouterr().out
    assert len(index.frames) == 2 and index.gt_database
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def _run_until_first_task(raw: Path, out: Path) -> subprocess.CompletedProcess | None:
    """Start tools/prepare_data.py in its own process group and SIGKILL the group (workers too) as soon
    as the first task is recorded. Returns the finished process if it ended before that."""
    code = "import sys; from voxsparse.data.preparation import main; main(sys.argv[1:])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(
        [sys.executable, "-c", code, *command(raw, out, "--workers", "2")],
        cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any((out / "train" / "tasks").glob("*.json")):
                break
            time.sleep(0.02)
        if process.poll() is not None:
            return subprocess.CompletedProcess(process.args, process.returncode, process.stdout.read())
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    finally:
        process.stdout.close()


def test_resumed_after_sigkill_equals_a_clean_run(raw, clean, tmp_path, capsys):
    finished = _run_until_first_task(raw, tmp_path)
    assert finished is None, f"the run ended before it could be killed: {finished}"
    split = tmp_path / "train"
    assert not (split / "index.json").exists()
    recorded = len(list((split / "tasks").glob("*.json")))
    assert 1 <= recorded < 4

    prepare_data(command(raw, tmp_path, "--workers", "2"))
    assert f"{recorded} already done" in capsys.readouterr().out
    got = files(tmp_path)
    assert got == files(clean)  # same names, same bytes: nothing torn, duplicated or left over
    assert not [name for name in got if Path(name).name.startswith(".")]
    index = PreparedDataset(tmp_path, "train").index
    assert sorted(f"train/frames/{f.frame_id}.npz" for f in index.frames) == sorted(
        n for n in got if n.startswith("train/frames/")
    )


def test_peak_rss_per_worker_is_reported_and_bounded(raw, tmp_path, capsys):
    prepare_data(command(raw, tmp_path, "--workers", "2", "--gt-database"))
    line = capsys.readouterr().out
    peak = float(line.split("peak RSS per worker ")[1].split(" MiB")[0])
    assert 0 < peak < 1024, line


def measure(segments: int = 3, frames: int = 4) -> None:
    """Full-size measurement on ``realistic`` frames (module docstring)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="waymo_scale_") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_dense_segments(root / "raw" / "training", segments, frames, waymo_lasers(), realistic=True)
        print(f"wrote {segments} x {frames} full-size frames in {time.perf_counter() - start:.1f} s")
        raw_bytes = sum(p.stat().st_size for p in (root / "raw" / "training").glob("*.tfrecord"))
        runs = {
            "default (x, y, z to 2**-9 m, float16 intensity, elongation)": ["--workers", "1"],
            "lossless (--xyz-step 0 --half-features)": ["--workers", "1", "--xyz-step", "0", "--half-features"],
            "default on local Ray": ["--workers", "2", "--executor", "ray", "--ray-task-memory", "2"],
        }
        for i, (name, extra) in enumerate(runs.items()):
            if "Ray" in name and not os.environ.get("MEASURE_RAY"):
                continue
            out = root / f"out{i}"
            start = time.perf_counter()
            (index,) = prepare_data(command(root / "raw", out, *extra))
            seconds = time.perf_counter() - start
            frame_bytes = sum(p.stat().st_size for p in (out / "train" / "frames").iterdir())
            gt_bytes = sum(p.stat().st_size for p in (out / "train" / "gt_database").rglob("*") if p.is_file())
            points = sum(f.num_points for f in index.frames)
            print(
                f"{name}: {seconds:.1f} s ({seconds / len(index.frames):.2f} s/frame), "
                f"{points / len(index.frames):.0f} points/frame, raw {raw_bytes / points:.2f} B/point, "
                f"frames {frame_bytes / points:.2f} B/point ({frame_bytes / len(index.frames) / 1e3:.0f} kB/frame), "
                f"output / raw LiDAR TFRecord {frame_bytes / raw_bytes:.3f}, GT database {gt_bytes / 2**20:.1f} MiB"
            )


if __name__ == "__main__":  # PYTHONPATH=. python tests/data/test_prepare_scale.py
    measure(*map(int, sys.argv[1:]))
