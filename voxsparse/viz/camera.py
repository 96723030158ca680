"""Cameras and presets (BEV, chase, orbit), with the projection the renderers use.

A :class:`Camera` holds a look-at pose and a perspective or orthographic projection, as OpenGL
matrices. The Open3D back-end hands these exact parameters to Filament, and
:meth:`Camera.project` applies the same matrices in numpy, so a test can say where a 3D point must
land in a rendered image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = ["PRESETS", "Camera", "bev_camera", "camera_preset", "chase_camera", "orbit_camera"]

PRESETS = ("bev", "chase", "orbit")

#: Height of the BEV camera, metres.
BEV_DISTANCE = 2000.0


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    if n < 1e-12:
        raise ValueError("Camera: degenerate direction (eye == center, or up parallel to the view direction)")
    return v / n


@dataclass(frozen=True)
class Camera:
    """A pinhole or orthographic camera looking from ``eye`` at ``center``.

    Attributes:
        eye, center, up: metres in the LiDAR frame; ``up`` need not be orthogonal to the view.
        width, height: image size in pixels.
        fov: vertical field of view in degrees (perspective).
        ortho_height: when set, an orthographic camera showing this many metres vertically.
        near, far: clip distances in metres.
    """

    eye: tuple[float, float, float]
    center: tuple[float, float, float]
    up: tuple[float, float, float] = (0.0, 0.0, 1.0)
    width: int = 1280
    height: int = 960
    fov: float = 60.0
    ortho_height: float | None = None
    near: float = 0.1
    far: float = 1000.0

    @property
    def aspect(self) -> float:
        return self.width / self.height

    @property
    def is_ortho(self) -> bool:
        return self.ortho_height is not None

    @property
    def is_top_down(self) -> bool:
        """Looking straight down (within ~1 degree), as the BEV preset does."""
        d = np.asarray(self.center, np.float64) - np.asarray(self.eye, np.float64)
        return bool(d[2] < 0 and np.hypot(d[0], d[1]) < 0.02 * -d[2])

    def with_size(self, width: int, height: int) -> Camera:
        return replace(self, width=int(width), height=int(height))

    def view_matrix(self) -> np.ndarray:
        """(4, 4) world -> camera (OpenGL: camera looks down -z, y up)."""
        eye, center, up = (np.asarray(v, np.float64) for v in (self.eye, self.center, self.up))
        f = _unit(center - eye)
        s = _unit(np.cross(f, up))
        u = np.cross(s, f)
        m = np.eye(4)
        m[0, :3], m[1, :3], m[2, :3] = s, u, -f
        m[:3, 3] = -m[:3, :3] @ eye
        return m

    def ortho_extent(self) -> tuple[float, float]:
        """(half width, half height) in metres of an orthographic view."""
        half_h = 0.5 * float(self.ortho_height)
        return half_h * self.aspect, half_h

    def projection_matrix(self) -> np.ndarray:
        """(4, 4) camera -> clip space (OpenGL conventions, NDC in [-1, 1])."""
        n, f = self.near, self.far
        p = np.zeros((4, 4))
        if self.is_ortho:
            half_w, half_h = self.ortho_extent()
            p[0, 0], p[1, 1] = 1.0 / half_w, 1.0 / half_h
            p[2, 2], p[2, 3], p[3, 3] = -2.0 / (f - n), -(f + n) / (f - n), 1.0
        else:
            t = 1.0 / math.tan(math.radians(self.fov) / 2.0)
            p[0, 0], p[1, 1] = t / self.aspect, t
            p[2, 2], p[2, 3], p[3, 2] = (f + n) / (n - f), 2.0 * f * n / (n - f), -1.0
        return p

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates of 3D points.

        Args:
            xyz: (N, 3) metres.

        Returns:
            ``uv`` (N, 2) float (column, row) with (0, 0) the top-left corner of the top-left
            pixel (pixel (r, c) covers [c, c+1) x [r, r+1)), and ``visible`` (N,) bool: in front of
            the camera and inside the image.
        """
        xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
        homo = np.concatenate([xyz, np.ones((len(xyz), 1))], 1)
        cam = homo @ self.view_matrix().T
        clip = cam @ self.projection_matrix().T
        w = clip[:, 3:4]
        in_front = (-cam[:, 2] > self.near) & (-cam[:, 2] < self.far)
        ndc = clip[:, :2] / np.where(np.abs(w) < 1e-12, 1e-12, w)
        uv = np.stack([(ndc[:, 0] + 1.0) * 0.5 * self.width, (1.0 - ndc[:, 1]) * 0.5 * self.height], 1)
        visible = (
            in_front & (uv[:, 0] >= 0) & (uv[:, 0] < self.width) & (uv[:, 1] >= 0) & (uv[:, 1] < self.height)
        )
        return uv, visible


def bev_camera(
    extent: Sequence[float] = (-51.2, -51.2, 51.2, 51.2),
    width: int = 1280,
    height: int = 960,
    margin: float = 0.02,
) -> Camera:
    """Top-down view of the rectangle ``(x_min, y_min, x_max, y_max)``, +x (forward) up.

    The image is the LiDAR frame seen from above: forward is up, the vehicle's left is on the
    image's left. The rectangle is fitted inside the image with its aspect kept. The camera is a
    narrow (~3 degree) perspective camera 2 km up, so the view is orthographic to within 0.3 %
    at z = +-5 m; Open3D's wide-line shader draws nothing sensible under a true orthographic
    projection, so the preset avoids it.
    """
    x0, y0, x1, y1 = (float(v) for v in extent)
    aspect = width / height
    # Image vertical = x extent, image horizontal = y extent.
    visible_h = max(x1 - x0, (y1 - y0) / aspect) * (1.0 + 2 * margin)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    fov = math.degrees(2.0 * math.atan(0.5 * visible_h / BEV_DISTANCE))
    return Camera(
        eye=(cx, cy, BEV_DISTANCE),
        center=(cx, cy, 0.0),
        up=(1.0, 0.0, 0.0),
        width=width,
        height=height,
        fov=fov,
        near=0.5 * BEV_DISTANCE,
        far=2.0 * BEV_DISTANCE,
    )


def chase_camera(
    width: int = 1280,
    height: int = 960,
    distance: float = 16.0,
    height_m: float = 13.0,
    look_ahead: float = 18.0,
    fov: float = 60.0,
) -> Camera:
    """Third-person view from behind and above the ego vehicle, looking ahead along +x."""
    return Camera(
        eye=(-distance, 0.0, height_m),
        center=(look_ahead, 0.0, 0.0),
        up=(0.0, 0.0, 1.0),
        width=width,
        height=height,
        fov=fov,
    )


def orbit_camera(
    angle_deg: float = 225.0,
    width: int = 1280,
    height: int = 960,
    radius: float = 60.0,
    elevation_deg: float = 35.0,
    center: Sequence[float] = (0.0, 0.0, 0.0),
    fov: float = 60.0,
) -> Camera:
    """Camera on a circle around ``center``: ``angle_deg`` from +x counter-clockwise, looking at it.

    The default (225 degrees, behind-right of the ego, looking forward-left) gives an oblique overview;
    stepping ``angle_deg`` frame by frame turns a sequence into an orbit.
    """
    a, e = math.radians(angle_deg), math.radians(elevation_deg)
    c = np.asarray(center, np.float64)
    eye = c + radius * np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    return Camera(
        eye=tuple(eye.tolist()),
        center=tuple(c.tolist()),
        up=(0.0, 0.0, 1.0),
        width=width,
        height=height,
        fov=fov,
    )


def camera_preset(
    name: str,
    width: int = 1280,
    height: int = 960,
    extent: Sequence[float] | None = None,
    angle_deg: float | None = None,
) -> Camera:
    """A preset by name: ``bev`` (fits ``extent``), ``chase``, or ``orbit`` (at ``angle_deg``)."""
    if name == "bev":
        return bev_camera(extent if extent is not None else (-51.2, -51.2, 51.2, 51.2), width, height)
    if name == "chase":
        return chase_camera(width, height)
    if name == "orbit":
        radius = 60.0
        if extent is not None:
            radius = 0.75 * max(extent[2] - extent[0], extent[3] - extent[1])
        return orbit_camera(225.0 if angle_deg is None else angle_deg, width, height, radius=radius)
    raise ValueError(f"camera preset {name!r}: expected one of {PRESETS}")
