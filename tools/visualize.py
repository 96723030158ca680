"""Show or render LiDAR frames with ground truth and predictions.

    python tools/visualize.py                       # synthetic val frame 0: a window, or a PNG when headless
    python tools/visualize.py checkpoint=outputs/voxelnext_small/<run>/last.pth camera=chase \
        png_colors=128 output=docs/images/synthetic_predictions.png    # the README image
    python tools/visualize.py predictions=outputs/eval/<run>/predictions.pt frame=3 camera=bev
    python tools/visualize.py points=scan.bin camera=orbit      # a point file (.bin .npy .pcd .ply)
    python tools/visualize.py points=n015...LIDAR_TOP....pcd.bin checkpoint=... format=nuscenes
    python tools/visualize.py num_frames=20 +dataset.val.sequence_length=20 camera=orbit output=seq.mp4
                                                                # a sequence with track trails (or .gif)
    python tools/visualize.py checkpoint=... track=true num_frames=20 +dataset.val.sequence_length=20 \
        output=tracks.gif                                       # trails of the tracker's tracks

Headless (no DISPLAY) it renders with Open3D's offscreen renderer on the CPU (Vulkan lavapipe;
Debian packages libusb-1.0-0 libvulkan1 mesa-vulkan-drivers), or, where that cannot run, draws a
matplotlib bird's-eye view. See configs/visualize.yaml for every option.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

import voxsparse

from voxsparse.constants import CLASS_NAMES
from voxsparse.data.pointfile import conform, read_points
from voxsparse.engine.cli import tool
from voxsparse.engine.predict import ScanPredictor, frame_id_of
from voxsparse.structures import Detections3D, PointConvention
from voxsparse.viz import camera_preset, render_scene, resolve_backend, write_image, write_video
from voxsparse.viz.colors import KEY_COLORS
from voxsparse.viz.render import trail_history
from voxsparse.viz.scene import Scene, build_scene
from voxsparse.viz.viewer import has_display, show

log = logging.getLogger("voxsparse.visualize")


class _Frames:
    """The frames to draw, loaded on first use and kept (the viewer steps back and forth)."""

    def __init__(self, load: Callable[[int], Any], count: int):
        self._load, self._count, self._cache = load, count, {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < self._count:
            raise IndexError(i)
        if i not in self._cache:
            self._cache[i] = self._load(i)
        return self._cache[i]


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _drawn(cloud) -> np.ndarray:
    """(N, 4) x, y, z and intensity in [0, 1] where its scale is known (as drawn), zeros without one."""
    if "intensity" in cloud.features:
        return conform(cloud, PointConvention(("x", "y", "z", "intensity"), "unit"))
    return np.concatenate([cloud.points[:, :3], np.zeros((len(cloud), 1), np.float32)], 1)


def _frames(cfg: DictConfig) -> tuple[_Frames, list[str]]:
    """The frames (dataset frames, or one point file as a dict) and the class names."""
    if cfg.points is not None:
        cloud = read_points(cfg.points, cfg.format, cfg.columns, cfg.nonfinite)
        log.info("%s: %d points, columns %s, intensity scale %s", cfg.points, len(cloud), cloud.features, cloud.intensity)
        frame = {"frame_id": frame_id_of(Path(cfg.points)), "points": _drawn(cloud), "cloud": cloud}
        return _Frames(lambda i: frame, 1), list(CLASS_NAMES)
    if "dataset" not in cfg or cfg.dataset is None:
        raise ValueError("no dataset config: give points=FILE or a dataset=... config")
    source = instantiate(cfg.dataset[cfg.split])
    first, count = int(cfg.frame), int(cfg.num_frames)
    if not 0 <= first < len(source):
        raise ValueError(f"frame={first}: the {cfg.split} split has {len(source)} frames")
    count = min(count, len(source) - first)
    names = list(cfg.dataset.get("class_names", CLASS_NAMES))
    return _Frames(lambda i: source[first + i], count), names


def _predictor(
    cfg: DictConfig, frames: _Frames
) -> tuple[Callable[[int], Any] | None, tuple | None, list[str] | None]:
    """A function frame index -> detections, the point-cloud range they were made in, class names."""
    if cfg.checkpoint is not None and cfg.predictions is not None:
        raise ValueError("give at most one of checkpoint=PATH and predictions=PATH")
    if cfg.checkpoint is not None:
        model = voxsparse.load_model(cfg.checkpoint, cfg.device)
        predictor = ScanPredictor(model, cfg.device)
        cache: dict[int, Detections3D] = {}

        def predict(i: int) -> Detections3D:
            if i not in cache:
                frame = frames[i]
                start = time.perf_counter()
                cloud = _field(frame, "cloud")  # a point file: converted to the model's point convention
                cache[i] = predictor(cloud) if cloud is not None else predictor.predict_points(_field(frame, "points"))
                log.info("frame %s: %d detections (%.0f ms)", _field(frame, "frame_id"), len(cache[i]),
                         1e3 * (time.perf_counter() - start))
            return cache[i]

        return predict, tuple(float(v) for v in model.grid.point_cloud_range), list(model.class_names)
    if cfg.predictions is not None:
        from voxsparse.evaluation.predictions_io import load_predictions

        content = load_predictions(cfg.predictions)
        by_id = dict(zip(content.frame_ids, content.detections))

        def lookup(i: int) -> Detections3D | None:
            if cfg.points is not None:
                key = cfg.predictions_frame if cfg.predictions_frame is not None else content.frame_ids[0]
            else:
                key = str(_field(frames[i], "frame_id"))
            if key not in by_id:
                log.warning("predictions file %s has no frame %r", cfg.predictions, key)
            return by_id.get(key)

        return lookup, tuple(content.point_cloud_range), list(content.class_names)
    return None, None, None


def _tracked(
    predict: Callable[[int], Any], frames: _Frames, class_names: list[str], min_score: float
) -> Callable[[int], Any]:
    """``predict`` with ``track_ids`` from a :class:`VoxelNeXtTracker` run over frames 0, 1, ... in order,
    on the detections scoring at least ``min_score`` (those drawn).

    Tracking runs in the world frame of the frames' ``ego_pose`` (world-from-LiDAR, level) at their
    ``timestamp``; the tracks come back in each frame's LiDAR frame, where they are drawn.
    """
    from voxsparse.evaluation.nuscenes import RigidTransform
    from voxsparse.evaluation.nuscenes_tracking import detections_to_global
    from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker

    tracker, tracks, times = VoxelNeXtTracker(class_names, TrackerConfig(min_score=min_score)), [], []

    def tracked(i: int) -> Any:
        while len(tracks) <= i:
            k = len(tracks)
            pose, timestamp = _field(frames[k], "ego_pose"), _field(frames[k], "timestamp")
            if pose is None or timestamp is None:
                raise ValueError("track=true needs dataset frames with ego_pose and timestamp (a sequence)")
            if times and timestamp <= times[-1]:
                tracker.reset()  # time went back: the frames crossed into the next sequence
            times.append(timestamp)
            pose = np.asarray(pose, dtype=np.float64)
            to_world = RigidTransform.from_yaw(float(np.arctan2(pose[1, 0], pose[0, 0])), pose[:3, 3])
            world = tracker.step(detections_to_global(predict(k), to_world), float(timestamp))
            tracks.append(detections_to_global(world, to_world.inverse()))
        return tracks[i]

    return tracked


#: Ground area shown for dataset frames when no model range is known (the small models' grid).
DEFAULT_EXTENT = (-51.2, -51.2, 51.2, 51.2)


def _extent(cfg: DictConfig, pcr: tuple | None, frames: _Frames) -> tuple[float, ...]:
    """(x_min, y_min, x_max, y_max) to frame: the option, the model's / predictions' range, the
    dataset's ``point_cloud_range``, :data:`DEFAULT_EXTENT`, or for a point file its points."""
    if cfg.extent is not None:
        return tuple(float(v) for v in cfg.extent)
    if pcr is not None:
        return pcr[0], pcr[1], pcr[3], pcr[4]
    if cfg.points is None:
        r = cfg.dataset.get("point_cloud_range")
        return (r[0], r[1], r[3], r[4]) if r is not None else DEFAULT_EXTENT
    xy = np.asarray(_field(frames[0], "points"))[:, :2]
    if not len(xy):
        return DEFAULT_EXTENT
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def run(cfg: DictConfig, output_dir: Path) -> list[Path]:
    frames, class_names = _frames(cfg)
    predict, pcr, predicted_names = _predictor(cfg, frames)
    class_names = predicted_names or class_names
    if cfg.track:
        if predict is None or cfg.points is not None:
            raise ValueError("track=true needs checkpoint=PATH or predictions=PATH on dataset frames")
        predict = _tracked(predict, frames, class_names, float(cfg.score_threshold))
    extent = _extent(cfg, pcr, frames)

    def scene(i: int, color_by: str | None = None) -> Scene:
        frame = frames[i]
        trails = None
        if cfg.num_frames > 1 and cfg.trail_length > 1 and cfg.points is None:
            if cfg.track:
                trails = trail_history(frames, i, int(cfg.trail_length), "predictions", [predict(j) for j in range(i + 1)])
            else:
                trails = trail_history(frames, i, int(cfg.trail_length))
        return build_scene(
            _field(frame, "points"),
            frame if cfg.ground_truth and cfg.points is None else None,
            predict(i) if predict is not None else None,
            color_by=color_by or cfg.color_by,
            class_names=class_names,
            score_threshold=float(cfg.score_threshold),
            trails=trails,
            axes=cfg.axes,
            ego=cfg.ego,
            point_size=float(cfg.point_size),
            line_width=float(cfg.line_width),
            max_points=cfg.max_points,
            title=str(_field(frame, "frame_id") or f"frame {i}"),
        )

    mode = cfg.mode
    if mode == "auto":
        mode = "show" if has_display() else "render"
    if mode == "show":
        show(
            lambda i, colors: scene(i, colors),
            len(frames),
            window_name="voxsparse",
            width=cfg.width,
            height=cfg.height,
            point_size=float(cfg.point_size),
            camera=cfg.camera,
        )
        return []
    if mode != "render":
        raise ValueError(f"mode={mode!r}: expected auto, show or render")

    backend = resolve_backend(cfg.backend)
    n = len(frames)

    def camera(i: int):
        angle = None
        if cfg.camera == "orbit" and n > 1:
            angle = 225.0 + float(cfg.orbit_degrees) * i / n
        return camera_preset(cfg.camera, int(cfg.width), int(cfg.height), extent, angle)

    images = []
    for i in range(n):
        s = scene(i)
        start = time.perf_counter()
        images.append(render_scene(s, camera(i), backend, cfg.legend, cfg.lines_on_top))
        log.info("rendered %s with %s in %.2f s", s.title, backend, time.perf_counter() - start)
    if cfg.output is not None:
        output = Path(cfg.output)
    else:
        output = output_dir / (
            f"{_field(frames[0], 'frame_id') or 'frame'}.png" if n == 1 else "sequence.gif"
        )
    if output.suffix.lower() in (".gif", ".mp4"):
        written = [write_video(output, images, float(cfg.fps))]
    elif n == 1:
        written = [write_image(output, images[0], cfg.png_colors, KEY_COLORS)]
    else:  # a sequence to images: one PNG per frame, numbered after the output's stem
        pattern = f"{output.stem}_{{:04d}}{output.suffix or '.png'}"
        written = [
            write_image(output.with_name(pattern.format(i)), im, cfg.png_colors, KEY_COLORS)
            for i, im in enumerate(images)
        ]
    for path in written:
        log.info("wrote %s", path)
    return written


@tool("visualize")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
