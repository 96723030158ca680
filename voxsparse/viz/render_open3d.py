"""Headless rendering of a :class:`~voxsparse.viz.scene.Scene` with Open3D's offscreen renderer.

Open3D (0.20) renders through Filament. With no display and no GPU it runs Filament's Vulkan
back-end on Mesa's CPU Vulkan driver (lavapipe / llvmpipe), which needs the Debian packages
``libvulkan1`` and ``mesa-vulkan-drivers``. No PyPI wheel ships a Vulkan loader with a CPU driver,
and the Open3D wheel's offscreen renderer asks for Vulkan even where Mesa's EGL is installed and
``EGL_PLATFORM=surfaceless`` is set. ``import open3d`` itself goes through
:func:`voxsparse.viz.open3d_loader.import_open3d`, which supplies ``libusb`` from the
``libusb-package`` wheel where Debian's ``libusb-1.0-0`` is missing. No X server, EGL device or
OSMesa is needed. The warning ``GLFWWindowSystem: X11 GLFW init failed ... Falling back to
headless mode`` is expected there. On a machine that also has a GPU driver, pin the CPU
driver with ``VK_ICD_FILENAMES=/usr/share/vulkan/icd.d/lvp_icd.x86_64.json``.

Without a Vulkan driver Filament raises (``Failed to load vulkan library!``) or, with a Vulkan
loader but no driver, aborts the whole process (``Unable to create Vulkan instance``), so
:func:`open3d_status` probes rendering once in a subprocess and callers fall back to the matplotlib
bird's-eye view (``voxsparse.viz.render_bev``) when it fails.

Filament allows one live renderer per process here (two at once abort at exit), so renders share
one :class:`Open3DRenderer`, rebuilt only when the image size changes.
"""

from __future__ import annotations

import atexit
import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from voxsparse.viz.camera import Camera
from voxsparse.viz.open3d_loader import import_open3d, open3d_import_status
from voxsparse.viz.overlay import draw_legend
from voxsparse.viz.scene import LineLayer, PointLayer, Scene

__all__ = ["Open3DRenderer", "close_renderer", "open3d_status", "probe_open3d_rendering", "render_open3d"]

# Imports Open3D through the same loader as this process (the package found where this one is).
_PROBE = """
import sys
sys.path.insert(0, {root!r})
from voxsparse.viz.open3d_loader import open3d_import_status
ok, reason = open3d_import_status()
if not ok:
    print("VOXSPARSE_IMPORT_FAILED", reason)
    sys.exit(3)
import numpy as np
import open3d.visualization.rendering as r
renderer = r.OffscreenRenderer(16, 16)
image = np.asarray(renderer.render_to_image())
assert image.shape == (16, 16, 3), image.shape
print("VOXSPARSE_RENDER_OK")
"""
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@functools.cache
def open3d_status(timeout: float = 120.0) -> tuple[bool, str]:
    """Whether Open3D offscreen rendering works here, and if not, why (probed once per process).

    Open3D must import (:func:`~voxsparse.viz.open3d_loader.open3d_import_status`, in this process)
    and render a small image (:func:`probe_open3d_rendering`, in a subprocess). Set
    ``VOXSPARSE_OPEN3D_RENDER=0`` to force the fallback (or ``=1`` to skip the rendering probe).
    """
    forced = os.environ.get("VOXSPARSE_OPEN3D_RENDER")
    if forced == "0":
        return False, "disabled by VOXSPARSE_OPEN3D_RENDER=0"
    imported, reason = open3d_import_status()
    if not imported:
        return False, reason
    if forced == "1":
        return True, "forced by VOXSPARSE_OPEN3D_RENDER=1"
    return probe_open3d_rendering(timeout)


def probe_open3d_rendering(timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[bool, str]:
    """Render a 16x16 image with Open3D in a subprocess (with environment ``env``, default this
    process's): (True, ...) when it works, else (False, the reason and the packages to install)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _PROBE.format(root=_PACKAGE_ROOT)],
            check=False,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return False, f"open3d offscreen rendering probe timed out after {timeout:.0f} s"
    if done.returncode == 0 and "VOXSPARSE_RENDER_OK" in done.stdout:
        return True, "open3d offscreen rendering works"
    failed_import = re.search(r"^VOXSPARSE_IMPORT_FAILED (.*)$", done.stdout, re.MULTILINE)
    if failed_import:
        return False, failed_import.group(1).strip()
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr + done.stdout).strip().splitlines()
    joined = "\n".join(text)
    hint = ""
    if "libusb" in joined:
        hint = " (pip install libusb-package, or apt-get install libusb-1.0-0)"
    elif "vulkan" in joined.lower():
        hint = " (install Debian's libvulkan1 and mesa-vulkan-drivers for CPU rendering)"
    telling = [t for t in text if "reason:" in t or "Error" in t or "error" in t] or [
        t for t in text if t.strip()
    ]
    reason = telling[-1].strip() if telling else "no output"
    return False, f"open3d offscreen rendering failed (exit {done.returncode}): {reason}{hint}"


class Open3DRenderer:
    """An offscreen renderer for scenes; reuse it across frames (creating one costs ~0.1-0.3 s).

    Args:
        width, height: image size in pixels.
    """

    def __init__(self, width: int, height: int):
        import_open3d()
        from open3d.visualization import rendering

        self.width, self.height = int(width), int(height)
        self._rendering = rendering
        self._renderer = rendering.OffscreenRenderer(self.width, self.height)
        view = self._renderer.scene.view
        # Unlit colours must reach the image unchanged: no tone mapping, bloom, SSAO or FXAA.
        view.set_post_processing(False)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.scene.clear_geometry()
            self._renderer = None

    def _materials(self, layer: PointLayer | LineLayer, camera: Camera):
        m = self._rendering.MaterialRecord()
        if isinstance(layer, PointLayer):
            m.shader = "defaultUnlit"
            m.point_size = float(layer.size)
        else:
            m.shader = "unlitLine"
            m.line_width = float(layer.width) * _line_width_scale(camera)
        return m

    @staticmethod
    def _geometry(layer: PointLayer | LineLayer):
        o3d = import_open3d()

        if isinstance(layer, PointLayer):
            pc = o3d.t.geometry.PointCloud(o3d.core.Tensor(layer.xyz))
            pc.point.colors = o3d.core.Tensor(layer.colors)
            return pc
        return line_set(layer)

    def _set_camera(self, camera: Camera) -> None:
        Cam = self._rendering.Camera
        cam = self._renderer.scene.camera
        if camera.is_ortho:
            half_w, half_h = camera.ortho_extent()
            cam.set_projection(
                Cam.Projection.Ortho, -half_w, half_w, -half_h, half_h, camera.near, camera.far
            )
        else:
            cam.set_projection(camera.fov, camera.aspect, camera.near, camera.far, Cam.FovType.Vertical)
        cam.look_at(
            np.asarray(camera.center, np.float32),
            np.asarray(camera.eye, np.float32),
            np.asarray(camera.up, np.float32),
        )

    def render(
        self, scene: Scene, camera: Camera, legend: bool = True, lines_on_top: bool = True
    ) -> np.ndarray:
        """(H, W, 3) uint8 image of ``scene`` seen by ``camera`` (resized to this renderer).

        Args:
            legend: draw the scene's legend and title over the image.
            lines_on_top: draw boxes, skeletons and trails over the points, so a box is never hidden
                by its own points; False keeps true depth order.
        """
        if self._renderer is None:
            raise RuntimeError("Open3DRenderer: already closed")
        camera = camera.with_size(self.width, self.height)
        o3d_scene = self._renderer.scene
        o3d_scene.clear_geometry()
        o3d_scene.set_background([_srgb_encode(c) for c in scene.background] + [1.0])
        for name, layer in scene.layers.items():
            if lines_on_top and isinstance(layer, LineLayer):
                layer = _pull_to_front(layer, camera)
            o3d_scene.add_geometry(name, self._geometry(layer), self._materials(layer, camera))
        self._set_camera(camera)
        image = np.asarray(self._renderer.render_to_image())[..., :3].copy()
        o3d_scene.clear_geometry()
        if legend:
            image = draw_legend(image, scene.legend, scene.title)
        return image


def _line_width_scale(camera: Camera) -> float:
    """Factor that makes ``unlitLine`` draw ``line_width`` pixels under ``camera``.

    Open3D's wide-line shader draws ``line_width * tan(30 deg) / tan(fov / 2)`` pixels (measured on
    0.20, independent of the image size): right at a 60 degree vertical field of view only, 22x too
    wide under the ~3 degree BEV camera. Undo that.
    """
    if camera.is_ortho:
        return 1.0
    return math.tan(math.radians(camera.fov) / 2.0) / math.tan(math.radians(30.0))


def _pull_to_front(layer: LineLayer, camera: Camera) -> LineLayer:
    """Slide line end points along their rays from the eye to depths just past the near plane.

    A point's pixel stays the same, and so does a segment's (a 3D segment in front of the camera
    projects onto the 2D segment between its projected ends), but the lines now lie in front of
    every point. Depth order among the lines is kept (the new depth grows with the old). Segments
    reaching behind the near plane are left as they are (clipping would change what shows of them).
    """
    ends = layer.endpoints.reshape(-1, 3).astype(np.float64)  # (2S, 3): segments no longer share
    eye = np.asarray(camera.eye, np.float64)
    forward = np.asarray(camera.center, np.float64) - eye
    forward /= np.linalg.norm(forward)
    offset = ends - eye
    depth = offset @ forward
    front = (depth > camera.near).reshape(-1, 2).all(1).repeat(2)
    target = 1.5 * camera.near + 0.01 * (depth - camera.near)
    scale = np.where(front, target / np.where(front, depth, 1.0), 1.0)
    vertices = (eye + offset * scale[:, None]).astype(np.float32)
    segments = np.arange(len(vertices)).reshape(-1, 2)
    return LineLayer(vertices, segments, layer.colors, layer.width)


def _srgb_encode(c: float) -> float:
    """Inverse of the decoding Filament applies to the clear colour, so the image shows ``c``."""
    c = min(max(float(c), 0.0), 1.0)
    return 12.92 * c if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055


_SHARED: Open3DRenderer | None = None


def render_open3d(scene: Scene, camera: Camera, legend: bool = True, lines_on_top: bool = True) -> np.ndarray:
    """Render with the process-wide renderer (made, or remade for a new size, on demand)."""
    global _SHARED
    if _SHARED is None or (_SHARED.width, _SHARED.height) != (camera.width, camera.height):
        close_renderer()
        _SHARED = Open3DRenderer(camera.width, camera.height)
    return _SHARED.render(scene, camera, legend, lines_on_top)


def close_renderer() -> None:
    """Release the shared renderer (Filament must not hold two at once)."""
    global _SHARED
    if _SHARED is not None:
        _SHARED.close()
        _SHARED = None


atexit.register(close_renderer)


def line_set(layer: LineLayer):
    """An Open3D ``LineSet`` of a line layer (both the offscreen renderer and the window use it)."""
    o3d = import_open3d()

    ls = o3d.geometry.LineSet(
        o3d.utility.Vector3dVector(layer.vertices.astype(np.float64)),
        o3d.utility.Vector2iVector(layer.segments.astype(np.int32)),
    )
    ls.colors = o3d.utility.Vector3dVector(layer.colors.astype(np.float64))
    return ls
