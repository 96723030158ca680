"""What ``tools/visualize.py`` does: frames of a dataset split or a point file, with ground truth,
a checkpoint's detections or a predictions file, and optionally the tracker's trails, shown in a
window or rendered to PNG / GIF / MP4 (Open3D offscreen, or the matplotlib bird's-eye view).

:class:`VisualizeOptions` are the tool's options (``configs/visualize.yaml``); :func:`run` does the
work.
"""


from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

import voxsparse
from voxsparse.data.pointfile import conform, read_points
from voxsparse.engine.predict import ScanPredictor, frame_id_of
from voxsparse.structures import Detections3D, PointConvention
from voxsparse.viz import camera_preset, render_scene, resolve_backend, write_image, write_video
from voxsparse.viz.colors import KEY_COLORS
from voxsparse.viz.render import trail_history
from voxsparse.viz.scene import Scene, build_scene
from voxsparse.viz.viewer import has_display, show

log = logging.getLogger("voxsparse.visualize")


@dataclass
class VisualizeOptions:
    """The tool's options (configs/visualize.yaml, where each is described)."""

    # What to draw
    split: str = "val"
    frame: int = 0
    num_frames: int = 1
    points: str | None = None
    format: str | None = None
    columns: int | None = None
    nonfinite: str = "error"
    checkpoint: str | None = None
    predictions: str | None = None
    predictions_frame: str | None = None
    score_threshold: float = 0.3
    ground_truth: bool = True
    trail_length: int = 10
    track: bool = False
    # How it looks
    color_by: str = "intensity"
    camera: str = "bev"
    orbit_degrees: float = 360.0
    extent: list[float] | None = None
    axes: bool = True
    ego: bool = True
    legend: bool = True
    lines_on_top: bool = True
    point_size: float = 2.0
    line_width: float = 2.0
    max_points: int | None = None
    width: int = 1280
    height: int = 960
    # Where it goes
    mode: str = "auto"
    backend: str = "auto"
    output: str | None = None
    png_colors: int | None = None
    fps: float = 5.0
    device: str = "cpu"


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


def _frames(opts: VisualizeOptions, dataset: DictConfig | None) -> tuple[_Frames, list[str]]:
    """The frames (dataset frames, or one point file as a dict) and the class names."""
    if opts.points is not None:
        cloud = read_points(opts.points, opts.format, opts.columns, opts.nonfinite)
        log.info("%s: %d points, columns %s, intensity scale %s",
                 opts.points, len(cloud), cloud.features, cloud.intensity)
        frame = {"frame_id": frame_id_of(Path(opts.points)), "points": _drawn(cloud), "cloud": cloud}
        return _Frames(lambda i: frame, 1), []  # a model's detections bring their class names
    if dataset is None:
        raise ValueError("no dataset config: give points=FILE or a dataset=... config")
    source = instantiate(dataset[opts.split])
    first = opts.frame
    if not 0 <= first < len(source):
        raise ValueError(f"frame={first}: the {opts.split} split has {len(source)} frames")
    count = min(opts.num_frames, len(source) - first)
    names = list(dataset.get("class_names") or getattr(source, "class_names", ()))
    return _Frames(lambda i: source[first + i], count), names


def _predictor(
    opts: VisualizeOptions, frames: _Frames
) -> tuple[Callable[[int], Any] | None, tuple | None, list[str] | None]:
    """A function frame index -> detections, the point-cloud range they were made in, class names."""
    if opts.checkpoint is not None and opts.predictions is not None:
        raise ValueError("give at most one of checkpoint=PATH and predictions=PATH")
    if opts.checkpoint is not None:
        model = voxsparse.load_model(opts.checkpoint, opts.device)
        predictor = ScanPredictor(model, opts.device)
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
    if opts.predictions is not None:
        from voxsparse.evaluation.predictions_io import load_predictions

        content = load_predictions(opts.predictions)
        by_id = dict(zip(content.frame_ids, content.detections))

        def lookup(i: int) -> Detections3D | None:
            if opts.points is not None:
                key = opts.predictions_frame if opts.predictions_frame is not None else content.frame_ids[0]
            else:
                key = str(_field(frames[i], "frame_id"))
            if key not in by_id:
                log.warning("predictions file %s has no frame %r", opts.predictions, key)
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
    from voxsparse.evaluation.nuscenes_tracking import detections_to_global
    from voxsparse.geometry import RigidTransform
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


def _extent(
    opts: VisualizeOptions, dataset: DictConfig | None, pcr: tuple | None, frames: _Frames
) -> tuple[float, ...]:
    """(x_min, y_min, x_max, y_max) to frame: the option, the model's / predictions' range, the
    dataset's ``point_cloud_range``, :data:`DEFAULT_EXTENT`, or for a point file its points."""
    if opts.extent is not None:
        return tuple(float(v) for v in opts.extent)
    if pcr is not None:
        return pcr[0], pcr[1], pcr[3], pcr[4]
    if opts.points is None:
        r = dataset.get("point_cloud_range")
        return (r[0], r[1], r[3], r[4]) if r is not None else DEFAULT_EXTENT
    xy = np.asarray(_field(frames[0], "points"))[:, :2]
    if not len(xy):
        return DEFAULT_EXTENT
    lo, hi = np.percentile(xy, 0.5, axis=0), np.percentile(xy, 99.5, axis=0)
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def run(opts: VisualizeOptions, dataset: DictConfig | None, output_dir: Path) -> list[Path]:
    """Show or render the frames ``opts`` names (of ``dataset``, the dataset config, unless a point file)."""
    frames, class_names = _frames(opts, dataset)
    predict, pcr, predicted_names = _predictor(opts, frames)
    class_names = predicted_names or class_names
    if opts.track:
        if predict is None or opts.points is not None:
            raise ValueError("track=true needs checkpoint=PATH or predictions=PATH on dataset frames")
        predict = _tracked(predict, frames, class_names, float(opts.score_threshold))
    extent = _extent(opts, dataset, pcr, frames)

    def scene(i: int, color_by: str | None = None) -> Scene:
        frame = frames[i]
        trails = None
        if opts.num_frames > 1 and opts.trail_length > 1 and opts.points is None:
            if opts.track:
                trails = trail_history(frames, i, opts.trail_length, "predictions", [predict(j) for j in range(i + 1)])
            else:
                trails = trail_history(frames, i, opts.trail_length)
        return build_scene(
            _field(frame, "points"),
            frame if opts.ground_truth and opts.points is None else None,
            predict(i) if predict is not None else None,
            color_by=color_by or opts.color_by,
            class_names=class_names,
            score_threshold=float(opts.score_threshold),
            trails=trails,
            axes=opts.axes,
            ego=opts.ego,
            point_size=float(opts.point_size),
            line_width=float(opts.line_width),
            max_points=opts.max_points,
            title=str(_field(frame, "frame_id") or f"frame {i}"),
        )

    mode = opts.mode
    if mode == "auto":
        mode = "show" if has_display() else "render"
    if mode == "show":
        show(
            lambda i, colors: scene(i, colors),
            len(frames),
            window_name="voxsparse",
            width=opts.width,
            height=opts.height,
            point_size=float(opts.point_size),
            camera=opts.camera,
        )
        return []
    if mode != "render":
        raise ValueError(f"mode={mode!r}: expected auto, show or render")

    backend = resolve_backend(opts.backend)
    n = len(frames)

    def camera(i: int):
        angle = None
        if opts.camera == "orbit" and n > 1:
            angle = 225.0 + float(opts.orbit_degrees) * i / n
        return camera_preset(opts.camera, opts.width, opts.height, extent, angle)

    images = []
    for i in range(n):
        s = scene(i)
        start = time.perf_counter()
        images.append(render_scene(s, camera(i), backend, opts.legend, opts.lines_on_top))
        log.info("rendered %s with %s in %.2f s", s.title, backend, time.perf_counter() - start)
    if opts.output is not None:
        output = Path(opts.output)
    else:
        output = output_dir / (
            f"{_field(frames[0], 'frame_id') or 'frame'}.png" if n == 1 else "sequence.gif"
        )
    if output.suffix.lower() in (".gif", ".mp4"):
        written = [write_video(output, images, float(opts.fps))]
    elif n == 1:
        written = [write_image(output, images[0], opts.png_colors, KEY_COLORS)]
    else:  # a sequence to images: one PNG per frame, numbered after the output's stem
        pattern = f"{output.stem}_{{:04d}}{output.suffix or '.png'}"
        written = [
            write_image(output.with_name(pattern.format(i)), im, opts.png_colors, KEY_COLORS)
            for i, im in enumerate(images)
        ]
    for path in written:
        log.info("wrote %s", path)
    return written
