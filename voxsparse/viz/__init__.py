"""Visualization: scene building (pure numpy) separate from rendering back-ends.

- :mod:`~voxsparse.viz.scene`: points coloured by intensity / height / class, GT and predicted
  boxes with heading marks, Waymo 14-keypoint skeletons, track trails, axes, ego marker.
- :mod:`~voxsparse.viz.camera`: cameras and presets (``bev``, ``chase``, ``orbit``) with the
  projection the renderers use.
- back-ends: :mod:`~voxsparse.viz.render_open3d` (headless Open3D / Filament on CPU Vulkan),
  :mod:`~voxsparse.viz.render_bev` (matplotlib bird's-eye view fallback),
  :mod:`~voxsparse.viz.viewer` (interactive window); :func:`render_scene` picks one.
- :mod:`~voxsparse.viz.video` (GIF / MP4); point files are read by :mod:`voxsparse.data.pointfile`.

Importing this package does not import Open3D or matplotlib; each back-end imports its own.
"""

from voxsparse.viz.camera import PRESETS, Camera, bev_camera, camera_preset, chase_camera, orbit_camera
from voxsparse.viz.render import (
    render_scene,
    render_sequence,
    resolve_backend,
    sequence_scenes,
    trail_history,
)
from voxsparse.viz.scene import (
    LAYERS,
    SKELETON_EDGES,
    LineLayer,
    PointLayer,
    Scene,
    box_lines,
    build_scene,
    coordinate_frame,
    ego_marker,
    point_colors,
    skeleton_lines,
    trail_lines,
)
from voxsparse.viz.video import write_image, write_video

__all__ = [
    "LAYERS",
    "PRESETS",
    "SKELETON_EDGES",
    "Camera",
    "LineLayer",
    "PointLayer",
    "Scene",
    "bev_camera",
    "box_lines",
    "build_scene",
    "camera_preset",
    "chase_camera",
    "coordinate_frame",
    "ego_marker",
    "orbit_camera",
    "point_colors",
    "render_scene",
    "render_sequence",
    "resolve_backend",
    "sequence_scenes",
    "skeleton_lines",
    "trail_history",
    "trail_lines",
    "write_image",
    "write_video",
]
