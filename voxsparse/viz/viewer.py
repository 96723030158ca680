"""Interactive viewer: an Open3D window with keys to step frames and toggle layers.

Needs a display (``DISPLAY`` or ``WAYLAND_DISPLAY``) and OpenGL; on a headless machine use the
offscreen renderer instead (``tools/visualize.py`` picks it by itself). The key handling lives in
:class:`ViewerState`, a plain object, so it is tested without a window.

Keys (also printed when the window opens):

====================  ==================================================
N / Right arrow       next frame
B / Left arrow        previous frame
G                     ground-truth boxes on / off
D                     predicted boxes (detections) on / off
K                     keypoint skeletons on / off
T                     track trails on / off
A                     axes on / off
E                     ego marker on / off
X                     points on / off
C                     point colours: intensity -> height -> semantic
Q / Esc               quit
====================  ==================================================
Mouse: drag to rotate, shift-drag / wheel to pan and zoom (Open3D's defaults).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from voxsparse.viz.camera import Camera, camera_preset
from voxsparse.viz.open3d_loader import import_open3d, open3d_import_status
from voxsparse.viz.render import RenderBackendError
from voxsparse.viz.render_open3d import line_set
from voxsparse.viz.scene import LAYERS, LineLayer, PointLayer, Scene

__all__ = ["KEY_HELP", "ViewerState", "has_display", "show"]

#: key -> (action, argument)
_KEYS: dict[str, tuple[str, object]] = {
    "N": ("step", 1),
    "RIGHT": ("step", 1),
    "B": ("step", -1),
    "LEFT": ("step", -1),
    "G": ("toggle", ("gt_boxes",)),
    "D": ("toggle", ("pred_boxes",)),
    "K": ("toggle", ("gt_keypoints", "pred_keypoints")),
    "T": ("toggle", ("trails",)),
    "A": ("toggle", ("axes",)),
    "E": ("toggle", ("ego",)),
    "X": ("toggle", ("points",)),
    "C": ("colors", None),
}

KEY_HELP = (
    "N/Right next frame | B/Left previous | G GT boxes | D predictions | K skeletons | T trails | "
    "A axes | E ego | X points | C point colours | Q/Esc quit"
)

_GLFW_KEYS = {"RIGHT": 262, "LEFT": 263}


def has_display() -> bool:
    """Whether a window can be opened (an X11 or Wayland display is set)."""
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


@dataclass
class ViewerState:
    """Which frame, which layers and which point colouring the viewer shows."""

    num_frames: int
    index: int = 0
    hidden: set[str] = field(default_factory=set)
    color_modes: tuple[str, ...] = ("intensity", "height", "semantic")
    color_mode: str = "intensity"

    def handle(self, key: str) -> bool:
        """Apply a key (``"N"``, ``"RIGHT"``, ...); True when the picture must be rebuilt."""
        action = _KEYS.get(key.upper())
        if action is None:
            return False
        kind, arg = action
        if kind == "step":
            new = min(max(self.index + int(arg), 0), self.num_frames - 1)
            changed, self.index = new != self.index, new
            return changed
        if kind == "toggle":
            names = set(arg)
            if names & self.hidden:
                self.hidden -= names
            else:
                self.hidden |= names
            return True
        i = self.color_modes.index(self.color_mode) if self.color_mode in self.color_modes else -1
        self.color_mode = self.color_modes[(i + 1) % len(self.color_modes)]
        return True

    def visible(self, scene: Scene) -> Scene:
        return scene.only(name for name in scene.layers if name not in self.hidden)


def _legacy_geometry(layer: PointLayer | LineLayer):
    o3d = import_open3d()

    if isinstance(layer, PointLayer):
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(layer.xyz.astype(np.float64)))
        pc.colors = o3d.utility.Vector3dVector(layer.colors.astype(np.float64))
        return pc
    return line_set(layer)


def _set_view(vis, camera: Camera) -> None:
    """Point the window's camera like ``camera`` (direction and target; Open3D picks the zoom)."""
    control = vis.get_view_control()
    eye, center = np.asarray(camera.eye, np.float64), np.asarray(camera.center, np.float64)
    control.set_lookat(center)
    control.set_front((eye - center) / np.linalg.norm(eye - center))
    control.set_up(np.asarray(camera.up, np.float64))
    control.set_zoom(0.35 if camera.is_top_down else 0.15)


def show(
    get_scene: Callable[[int, str], Scene],
    num_frames: int,
    window_name: str = "voxsparse",
    width: int = 1280,
    height: int = 960,
    point_size: float = 2.0,
    camera: str = "chase",
) -> None:
    """Open a window showing ``get_scene(frame_index, color_mode)``; returns when it is closed.

    ``camera`` is the preset (``bev``, ``chase``, ``orbit``) the view starts from.

    Raises:
        RenderBackendError: with no display, or when Open3D cannot be imported (the message says why).
        RuntimeError: when Open3D cannot open a window.
    """
    if not has_display():
        raise RenderBackendError(
            "no display (DISPLAY / WAYLAND_DISPLAY unset): render to PNG instead (mode=render)"
        )
    ok, reason = open3d_import_status()
    if not ok:
        raise RenderBackendError(
            f"the interactive viewer needs Open3D: {reason}; render to PNG instead (mode=render)"
        )
    o3d = import_open3d()

    state = ViewerState(num_frames)
    vis = o3d.visualization.VisualizerWithKeyCallback()
    if not vis.create_window(window_name=window_name, width=width, height=height):
        raise RuntimeError("Open3D could not open a window (no OpenGL on this display?)")
    first = [True]

    def redraw() -> None:
        scene = state.visible(get_scene(state.index, state.color_mode))
        vis.clear_geometries()
        for layer in scene.layers.values():
            vis.add_geometry(_legacy_geometry(layer), reset_bounding_box=first[0])
        option = vis.get_render_option()
        option.background_color = np.asarray(scene.background, np.float64)
        option.point_size = point_size
        if first[0]:
            _set_view(vis, camera_preset(camera, width, height))
        first[0] = False
        print(
            f"[{state.index + 1}/{num_frames}] {scene.title}  colours={state.color_mode}  "
            f"hidden={sorted(state.hidden)}"
        )

    def bind(key: str) -> None:
        code = _GLFW_KEYS[key] if key in _GLFW_KEYS else ord(key)

        def callback(_vis) -> bool:
            if state.handle(key):
                redraw()
            return True

        vis.register_key_callback(code, callback)

    for key in _KEYS:
        bind(key)
    print(KEY_HELP)
    redraw()
    vis.run()
    vis.destroy_window()


# Layer names the keys refer to must exist in the scene builder.
assert {n for _, a in _KEYS.values() if isinstance(a, tuple) for n in a} <= set(LAYERS)
