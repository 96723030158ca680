"""Front door: render a scene or a sequence with whichever back-end works here.

``backend="auto"`` uses Open3D's offscreen renderer when :func:`open3d_status` says it works and
the matplotlib bird's-eye view otherwise (any camera then becomes a top-down view of the same
area, and a warning, logged once, says why). ``backend="open3d"`` where Open3D cannot render
raises :class:`RenderBackendError` with the reason.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from voxsparse.viz.camera import Camera, camera_preset
from voxsparse.viz.scene import Scene, as_numpy, build_scene

__all__ = [
    "RenderBackendError",
    "orbit_path",
    "render_scene",
    "render_sequence",
    "resolve_backend",
    "sequence_scenes",
    "trail_history",
]

log = logging.getLogger("voxsparse.viz")

BACKENDS = ("auto", "open3d", "matplotlib")


class RenderBackendError(ValueError):
    """What was asked for (``backend=open3d``, the interactive viewer) cannot work on this machine;
    the message, one line, says why. A ``ValueError``: the tools report it as a bad option."""


_warned: set[str] = set()


def resolve_backend(backend: str = "auto") -> str:
    """``open3d`` or ``matplotlib``: the back-end ``backend`` stands for on this machine.

    Raises:
        RenderBackendError: ``backend="open3d"`` where Open3D cannot import or render.
    """
    if backend not in BACKENDS:
        raise ValueError(f"render backend {backend!r}: expected one of {BACKENDS}")
    if backend == "matplotlib":
        return backend
    from voxsparse.viz.render_open3d import open3d_status

    ok, reason = open3d_status()
    if ok:
        return "open3d"
    if backend == "open3d":
        raise RenderBackendError(
            f"backend=open3d cannot render here: {reason}; use backend=auto or matplotlib"
        )
    if reason not in _warned:
        _warned.add(reason)
        log.warning("Open3D rendering unavailable (%s); using the matplotlib bird's-eye view", reason)
    return "matplotlib"


def _bev_extent(camera: Camera, scene: Scene) -> tuple[float, float, float, float]:
    """The ground rectangle a top-down camera sees; for other cameras the scene's x/y bounds."""
    if camera.is_top_down:
        distance = camera.eye[2] - camera.center[2]
        half_h = (
            camera.ortho_extent()[1] if camera.is_ortho else distance * math.tan(math.radians(camera.fov) / 2)
        )
        half_w = half_h * camera.aspect
        cx, cy = camera.center[0], camera.center[1]
        return cx - half_h, cy - half_w, cx + half_h, cy + half_w
    lo, hi = scene.bounds()
    return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def render_scene(
    scene: Scene, camera: Camera, backend: str = "auto", legend: bool = True, lines_on_top: bool = True
) -> np.ndarray:
    """(H, W, 3) uint8 image of ``scene``; see the module docstring for ``backend``.

    ``lines_on_top`` (Open3D): boxes, skeletons and trails are drawn over the points; False keeps
    true depth order (a box behind a wall is hidden). The BEV fallback always draws lines on top.
    """
    backend = resolve_backend(backend)
    if backend == "open3d":
        from voxsparse.viz.render_open3d import render_open3d

        return render_open3d(scene, camera, legend, lines_on_top)
    from voxsparse.viz.render_bev import render_bev

    if not camera.is_top_down:
        log.warning("the matplotlib back-end draws a bird's-eye view only; ignoring the 3D camera")
    return render_bev(scene, _bev_extent(camera, scene), camera.width, camera.height, legend)


# --------------------------------------------------------------------------------------------
# sequences


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _pose(frame: Any) -> np.ndarray | None:
    """(4, 4) world-from-sensor of a frame (``ego_pose``, as ``LidarFrame`` has, or ``pose``)."""
    pose = _field(frame, "ego_pose")
    return as_numpy(pose if pose is not None else _field(frame, "pose"), np.float64)


def trail_history(
    frames: Sequence[Any],
    index: int,
    length: int = 10,
    source: str = "ground_truth",
    predictions: Sequence[Any] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``history`` for :func:`voxsparse.viz.scene.trail_lines`: track centres of frames
    ``index - length + 1 .. index``, in the coordinates of frame ``index``.

    Frames with an ``ego_pose`` (or ``pose``) field ((4, 4) world-from-sensor) are brought into
    frame ``index``'s sensor frame; without one all frames are taken to share one frame. ``source``
    picks the ground truth's ``track_ids`` or the predictions' (``predictions[i].track_ids``, set by
    a tracker).
    """
    current_pose = _pose(frames[index])
    to_current = np.linalg.inv(current_pose) if current_pose is not None else None
    history = []
    for i in range(max(0, index - length + 1), index + 1):
        obj = frames[i] if source == "ground_truth" else (predictions[i] if predictions is not None else None)
        ids, boxes = as_numpy(_field(obj, "track_ids")), as_numpy(_field(obj, "boxes"), np.float64)
        if ids is None or boxes is None or len(boxes) == 0:
            history.append((np.zeros(0, np.int64), np.zeros((0, 3))))
            continue
        centres = boxes[:, :3]
        pose = _pose(frames[i])
        if to_current is not None and pose is not None:
            homo = np.concatenate([centres, np.ones((len(centres), 1))], 1)
            centres = (homo @ (to_current @ pose).T)[:, :3]
        history.append((ids.astype(np.int64), centres.astype(np.float32)))
    return history


def sequence_scenes(
    frames: Sequence[Any],
    predictions: Sequence[Any] | None = None,
    trail_length: int = 10,
    trails_from: str = "ground_truth",
    **scene_kwargs: Any,
) -> Iterable[Scene]:
    """One :func:`build_scene` per frame (``frame.points`` and the frame as ground truth), with trails."""
    title = scene_kwargs.pop("title", None)
    for i, frame in enumerate(frames):
        trails = (
            trail_history(frames, i, trail_length, trails_from, predictions) if trail_length > 1 else None
        )
        yield build_scene(
            _field(frame, "points"),
            frame,
            predictions[i] if predictions is not None else None,
            trails=trails,
            title=title or str(_field(frame, "frame_id") or f"frame {i}"),
            **scene_kwargs,
        )


def render_sequence(
    scenes: Iterable[Scene],
    camera: Camera | Callable[[int], Camera],
    path: str | os.PathLike | None = None,
    fps: float = 5.0,
    backend: str = "auto",
    legend: bool = True,
    lines_on_top: bool = True,
) -> list[np.ndarray]:
    """Render every scene (``camera`` may be a function of the frame number, e.g. an orbit) and,
    with ``path``, write a ``.gif`` / ``.mp4``. Returns the frames."""
    backend = resolve_backend(backend)
    images = []
    for i, scene in enumerate(scenes):
        cam = camera(i) if callable(camera) else camera
        images.append(render_scene(scene, cam, backend, legend, lines_on_top))
    if path is not None:
        from voxsparse.viz.video import write_video

        write_video(Path(path), images, fps)
    return images


def orbit_path(
    num_frames: int, width: int, height: int, extent: Sequence[float] | None = None, degrees: float = 360.0
) -> Callable[[int], Camera]:
    """A camera function turning ``degrees`` around the scene over ``num_frames`` frames."""
    step = degrees / max(num_frames, 1)
    return lambda i: camera_preset("orbit", width, height, extent, angle_deg=225.0 + i * step)
