"""Scene building: pure geometry, no renderer.

A :class:`Scene` is an ordered set of named layers, each either a :class:`PointLayer` (coloured
points) or a :class:`LineLayer` (coloured segments between vertices). Every builder here returns
plain numpy arrays in the LiDAR frame (x forward, y left, z up, metres), so tests check geometry
without Open3D, and each rendering back-end (``voxsparse.viz.render_open3d``,
``voxsparse.viz.render_bev``, ``voxsparse.viz.viewer``) only translates layers into its own
primitives.

Layer names used by :func:`build_scene` (the viewer's toggles use them too): ``points``,
``gt_boxes``, ``pred_boxes``, ``gt_keypoints``, ``pred_keypoints``, ``trails``, ``axes``, ``ego``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from voxsparse.constants import KEYPOINT_NAMES
from voxsparse.geometry import points_in_boxes
from voxsparse.ops.boxes import boxes_to_corners_3d
from voxsparse.viz import colors as C

__all__ = [
    "BOX_EDGES",
    "LAYERS",
    "SKELETON_EDGES",
    "LineLayer",
    "PointLayer",
    "Scene",
    "as_numpy",
    "box_lines",
    "build_scene",
    "coordinate_frame",
    "ego_marker",
    "keypoint_points",
    "point_colors",
    "skeleton_lines",
    "trail_lines",
]

#: Layer names of :func:`build_scene`, in drawing order.
LAYERS = ("points", "gt_boxes", "pred_boxes", "gt_keypoints", "pred_keypoints", "trails", "axes", "ego")

#: The 12 edges of a box, as pairs of corner indices of ``boxes_to_corners_3d``
#: (0-3 bottom face counter-clockwise from rear-right, 4-7 the top face above them).
BOX_EDGES = np.array(
    [[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4], [0, 4], [1, 5], [2, 6], [3, 7]],
    dtype=np.int64,
)
# Heading mark: a cross on the front face (corners 1, 2, 6, 5 have +dx/2) and a line from the
# centre (vertex 8) to the front-face centre (vertex 9).
_HEADING_EDGES = np.array([[1, 6], [2, 5], [8, 9]], dtype=np.int64)


def _edges(*pairs: tuple[str, str]) -> np.ndarray:
    index = {name: i for i, name in enumerate(KEYPOINT_NAMES)}
    return np.array([[index[a], index[b]] for a, b in pairs], dtype=np.int64)


#: Skeleton of the Waymo 14 keypoints (``voxsparse.constants.KEYPOINT_NAMES``), as index pairs.
SKELETON_EDGES = _edges(
    ("head_center", "nose"),
    ("head_center", "left_shoulder"),
    ("head_center", "right_shoulder"),
    ("left_shoulder", "right_shoulder"),
    ("left_shoulder", "left_elbow"),
    ("left_elbow", "left_wrist"),
    ("right_shoulder", "right_elbow"),
    ("right_elbow", "right_wrist"),
    ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"),
    ("left_hip", "right_hip"),
    ("left_hip", "left_knee"),
    ("left_knee", "left_ankle"),
    ("right_hip", "right_knee"),
    ("right_knee", "right_ankle"),
)
# Limb side of each edge (0 centre, 1 left, 2 right), for colouring.
_SIDE = np.array(
    [
        1
        if all(KEYPOINT_NAMES[i].startswith("left") for i in e)
        else 2
        if all(KEYPOINT_NAMES[i].startswith("right") for i in e)
        else 0
        for e in SKELETON_EDGES
    ],
    dtype=np.int64,
)
# Centre white, left lavender, right pale orange: apart from all six box colours.
_SKELETON_SIDE_COLORS = np.array([[1.0, 1.0, 1.0], [0.6, 0.6, 1.0], [1.0, 0.85, 0.55]], dtype=np.float32)


@dataclass
class PointLayer:
    """N points: ``xyz`` (N, 3) float32 metres, ``colors`` (N, 3) float32 RGB in [0, 1], ``size`` pixels."""

    xyz: np.ndarray
    colors: np.ndarray
    size: float = 2.0

    def __post_init__(self) -> None:
        self.xyz = np.ascontiguousarray(self.xyz, dtype=np.float32).reshape(-1, 3)
        self.colors = np.ascontiguousarray(self.colors, dtype=np.float32).reshape(-1, 3)
        if len(self.colors) != len(self.xyz):
            raise ValueError(f"PointLayer: {len(self.xyz)} points but {len(self.colors)} colours")

    def __len__(self) -> int:
        return len(self.xyz)


@dataclass
class LineLayer:
    """Segments between vertices.

    Attributes:
        vertices: (V, 3) float32 metres.
        segments: (S, 2) int64 vertex indices.
        colors: (S, 3) float32 RGB in [0, 1], one per segment.
        width: line width in pixels (back-ends that cannot draw wide lines draw 1 px).
    """

    vertices: np.ndarray
    segments: np.ndarray
    colors: np.ndarray
    width: float = 2.0

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32).reshape(-1, 3)
        self.segments = np.ascontiguousarray(self.segments, dtype=np.int64).reshape(-1, 2)
        self.colors = np.ascontiguousarray(self.colors, dtype=np.float32).reshape(-1, 3)
        if len(self.colors) != len(self.segments):
            raise ValueError(f"LineLayer: {len(self.segments)} segments but {len(self.colors)} colours")
        if len(self.segments) and (self.segments.min() < 0 or self.segments.max() >= len(self.vertices)):
            raise ValueError("LineLayer: segment indices outside the vertex array")

    def __len__(self) -> int:
        return len(self.segments)

    @property
    def endpoints(self) -> np.ndarray:
        """(S, 2, 3) the two end points of every segment."""
        return self.vertices[self.segments]

    @staticmethod
    def concat(layers: Sequence[LineLayer], width: float | None = None) -> LineLayer:
        layers = [l for l in layers if l is not None]
        if not layers:
            return LineLayer(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3)), width or 2.0)
        offsets = np.cumsum([0] + [len(l.vertices) for l in layers[:-1]])
        return LineLayer(
            np.concatenate([l.vertices for l in layers]),
            np.concatenate([l.segments + o for l, o in zip(layers, offsets)]),
            np.concatenate([l.colors for l in layers]),
            width if width is not None else layers[0].width,
        )


@dataclass
class Scene:
    """Named layers in drawing order, plus what a legend and title should say."""

    layers: dict[str, PointLayer | LineLayer] = field(default_factory=dict)
    legend: list[tuple[str, tuple[float, float, float]]] = field(default_factory=list)
    title: str = ""
    background: tuple[float, float, float] = tuple(float(v) for v in C.BACKGROUND)

    def add(self, name: str, layer: PointLayer | LineLayer | None) -> None:
        """Add a layer (an empty or None layer is skipped)."""
        if layer is not None and len(layer):
            self.layers[name] = layer

    def only(self, names: Iterable[str]) -> Scene:
        """A scene with only the named layers (unknown names ignored)."""
        keep = set(names)
        return Scene(
            {k: v for k, v in self.layers.items() if k in keep},
            list(self.legend),
            self.title,
            self.background,
        )

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) corners of everything in the scene; a unit cube around 0 when empty."""
        arrays = [l.xyz if isinstance(l, PointLayer) else l.vertices for l in self.layers.values()]
        arrays = [a for a in arrays if len(a)]
        if not arrays:
            return -np.ones(3, np.float32), np.ones(3, np.float32)
        both = np.concatenate([np.stack([a.min(0), a.max(0)]) for a in arrays])
        return both.min(0), both.max(0)


# --------------------------------------------------------------------------------------------
# inputs


def as_numpy(value: Any, dtype=None) -> np.ndarray | None:
    """numpy view of a tensor / Boxes3D / array-like (None stays None)."""
    if value is None:
        return None
    if hasattr(value, "tensor") and isinstance(value.tensor, torch.Tensor):  # Boxes3D
        value = value.tensor
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    return array.astype(dtype, copy=False) if dtype is not None else array


# --------------------------------------------------------------------------------------------
# points


def point_colors(
    points: np.ndarray,
    mode: str = "intensity",
    semantic_labels: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    box_labels: np.ndarray | None = None,
    color: Sequence[float] = (0.75, 0.78, 0.85),
) -> np.ndarray:
    """(N, 3) float32 colours of (N, 3 + C) points.

    Args:
        mode: ``intensity`` (column 3; height when there is none), ``height`` (z),
            ``semantic`` (class of each point: ``semantic_labels`` (N,) with -1 for background, or
            else the label of the ground-truth box that contains the point), or ``uniform``.
        boxes, box_labels: (K, >=7) boxes and (K,) labels for ``semantic`` without point labels.
        color: the colour of ``uniform``.
    """
    points = np.asarray(points)
    n = len(points)
    if mode == "intensity" and points.shape[1] < 4:
        mode = "height"
    if mode == "intensity":
        return C.ramp(points[:, 3], C.INTENSITY_RAMP)
    if mode == "height":
        return C.ramp(points[:, 2], C.HEIGHT_RAMP)
    if mode == "uniform":
        return np.broadcast_to(np.asarray(color, np.float32), (n, 3)).copy()
    if mode == "semantic":
        if semantic_labels is None:
            semantic_labels = np.full(n, -1, dtype=np.int64)
            if boxes is not None and len(boxes) and box_labels is not None:
                inside = points_in_boxes(
                    torch.from_numpy(points[:, :3].astype(np.float32)),
                    torch.from_numpy(np.asarray(boxes, np.float32)),
                )
                hit = inside.any(1)
                first = inside.to(torch.uint8).argmax(1)
                labels = torch.from_numpy(np.asarray(box_labels, np.int64))
                semantic_labels = torch.where(hit, labels[first], torch.full_like(first, -1)).numpy()
        semantic_labels = np.asarray(semantic_labels, dtype=np.int64).reshape(-1)
        palette = C.SEMANTIC_COLORS
        index = np.where(semantic_labels < 0, 0, 1 + np.mod(semantic_labels, len(palette) - 1))
        return palette[index]
    raise ValueError(f"point colour mode {mode!r}: expected intensity, height, semantic or uniform")


# --------------------------------------------------------------------------------------------
# boxes


def box_lines(
    boxes: np.ndarray | torch.Tensor,
    colors: np.ndarray | Sequence[float],
    heading: bool = True,
    width: float = 2.0,
) -> LineLayer:
    """Oriented boxes as a line set: 12 edges, plus a heading mark when ``heading``.

    The heading mark is a cross on the front face (the face at ``+dx/2``) and a line from the
    box centre to the centre of the front face, so the heading reads in 3D and from above.

    Args:
        boxes: (K, >=7) boxes ``(x, y, z, dx, dy, dz, heading, ...)``.
        colors: (K, 3) per box, or one (3,) colour for all.

    Returns:
        A layer of 10 vertices per box (8 corners as in ``boxes_to_corners_3d``, the centre, the
        front-face centre) and 12 (15 with heading) segments per box, box k's segments contiguous.
    """
    array = as_numpy(boxes, np.float64)
    array = array.reshape(-1, array.shape[-1]) if array.size else np.zeros((0, 7))
    if array.shape[1] < 7:
        raise ValueError(f"boxes: expected shape (K, >=7), got {array.shape}")
    boxes_t = torch.from_numpy(np.ascontiguousarray(array))
    k = boxes_t.shape[0]
    colors = np.asarray(colors, dtype=np.float32)
    colors = np.broadcast_to(colors, (k, 3)) if colors.ndim == 1 else colors.reshape(k, 3)
    if k == 0:
        return LineLayer(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3)), width)
    corners = boxes_to_corners_3d(boxes_t).numpy()  # (K, 8, 3)
    centre = boxes_t[:, 0:3].numpy()
    h = boxes_t[:, 6].numpy()
    front = (
        centre
        + np.stack([np.cos(h), np.sin(h), np.zeros_like(h)], -1) * (0.5 * boxes_t[:, 3].numpy())[:, None]
    )
    vertices = np.concatenate([corners, centre[:, None], front[:, None]], axis=1)  # (K, 10, 3)
    edges = np.concatenate([BOX_EDGES, _HEADING_EDGES]) if heading else BOX_EDGES
    segments = edges[None] + 10 * np.arange(k)[:, None, None]
    seg_colors = np.repeat(colors[:, None], len(edges), axis=1)
    return LineLayer(vertices.reshape(-1, 3), segments.reshape(-1, 2), seg_colors.reshape(-1, 3), width)


# --------------------------------------------------------------------------------------------
# keypoints


def skeleton_lines(
    keypoints: np.ndarray | torch.Tensor,
    visibility: np.ndarray | torch.Tensor | None = None,
    color: Sequence[float] | None = None,
    width: float = 2.0,
) -> LineLayer:
    """Human skeletons (Waymo 14-keypoint connectivity, :data:`SKELETON_EDGES`).

    An edge is drawn only when both its keypoints are visible (``visibility`` (K, 14) bool; all
    visible when None). Left limbs are lavender, right limbs pale orange, the head and torso white, unless
    ``color`` gives one colour for all.

    Args:
        keypoints: (K, 14, 3) metres.
    """
    kp = as_numpy(keypoints, np.float32).reshape(-1, len(KEYPOINT_NAMES), 3)
    k = len(kp)
    vis = (
        np.ones((k, len(KEYPOINT_NAMES)), bool)
        if visibility is None
        else as_numpy(visibility).astype(bool).reshape(k, -1)
    )
    keep = vis[:, SKELETON_EDGES[:, 0]] & vis[:, SKELETON_EDGES[:, 1]]  # (K, E)
    person, edge = np.nonzero(keep)
    segments = person[:, None] * len(KEYPOINT_NAMES) + SKELETON_EDGES[edge]
    if color is None:
        seg_colors = _SKELETON_SIDE_COLORS[_SIDE[edge]]
    else:
        seg_colors = np.broadcast_to(np.asarray(color, np.float32), (len(edge), 3))
    return LineLayer(kp.reshape(-1, 3), segments, seg_colors, width)


def keypoint_points(
    keypoints: np.ndarray | torch.Tensor,
    visibility: np.ndarray | torch.Tensor | None = None,
    color: Sequence[float] = (1.0, 1.0, 1.0),
    size: float = 5.0,
) -> PointLayer:
    """The visible keypoints themselves, as large points."""
    kp = as_numpy(keypoints, np.float32).reshape(-1, 3)
    vis = np.ones(len(kp), bool) if visibility is None else as_numpy(visibility).astype(bool).reshape(-1)
    xyz = kp[vis]
    return PointLayer(xyz, np.broadcast_to(np.asarray(color, np.float32), (len(xyz), 3)), size)


# --------------------------------------------------------------------------------------------
# tracks, axes, ego


def trail_lines(
    history: Sequence[tuple[np.ndarray, np.ndarray]],
    width: float = 2.0,
    fade: bool = True,
) -> LineLayer:
    """Track trails: for each track id, a polyline through its centres over the frames of ``history``.

    Args:
        history: per frame, oldest first, ``(track_ids (K_t,), centres (K_t, 3))`` already in the
            coordinates of the frame being drawn. A track missing from some frames is joined from
            its previous appearance.
        fade: older segments are darker (blended toward the background).

    Returns:
        Segments coloured by :func:`voxsparse.viz.colors.track_color` of the track id.
    """
    vertices, segments, seg_colors = [], [], []
    last: dict[int, int] = {}  # track id -> vertex index of its latest centre
    n_frames = len(history)
    for t, (ids, centres) in enumerate(history):
        ids = as_numpy(ids, np.int64).reshape(-1)
        centres = as_numpy(centres, np.float32).reshape(-1, 3)
        age = 1.0 if n_frames < 2 else 0.25 + 0.75 * t / (n_frames - 1)
        for tid, c in zip(ids.tolist(), centres):
            index = len(vertices)
            vertices.append(c)
            if tid in last:
                segments.append((last[tid], index))
                colour = C.track_color([tid])[0]
                seg_colors.append(colour * age + C.BACKGROUND * (1 - age) if fade else colour)
            last[tid] = index
    if not segments:
        return LineLayer(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros((0, 3)), width)
    return LineLayer(np.array(vertices), np.array(segments), np.array(seg_colors), width)


def coordinate_frame(
    size: float = 3.0, origin: Sequence[float] = (0.0, 0.0, 0.0), width: float = 3.0
) -> LineLayer:
    """x (red), y (green), z (blue) axes of length ``size`` metres at ``origin``, in pale tints
    that stay apart from the box colours (the GT vehicle green, the predicted vehicle red)."""
    o = np.asarray(origin, np.float32)
    vertices = np.stack([o, o + [size, 0, 0], o + [0, size, 0], o + [0, 0, size]])
    return LineLayer(vertices, [[0, 1], [0, 2], [0, 3]], [[1, 0.5, 0.5], [0.6, 1, 0.6], [0.5, 0.6, 1]], width)


def ego_marker(
    length: float = 4.5, width_m: float = 1.9, height: float = 1.6, z: float = -1.0, width: float = 2.0
) -> LineLayer:
    """The ego vehicle as a white box with a heading mark, centred on the sensor in x/y at height ``z``."""
    return box_lines(np.array([[0.0, 0.0, z, length, width_m, height, 0.0]]), (0.95, 0.95, 0.95), True, width)


# --------------------------------------------------------------------------------------------
# whole frames


def _field(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def build_scene(
    points: np.ndarray | torch.Tensor | None,
    ground_truth: Any = None,
    predictions: Any = None,
    *,
    color_by: str = "intensity",
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    trails: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    axes: bool = True,
    ego: bool = True,
    heading: bool = True,
    point_size: float = 2.0,
    line_width: float = 2.0,
    max_points: int | None = None,
    title: str = "",
) -> Scene:
    """One frame's scene: points, GT and predicted boxes, skeletons, trails, axes, ego.

    Args:
        points: (N, 3 + C) LiDAR points (column 3 intensity, when present).
        ground_truth: anything with ``boxes`` (K, >=7) and ``labels`` (K,) and optionally
            ``keypoints`` (K, 14, 3), ``keypoint_visibility`` (K, 14): a dataset ``LidarFrame``, an
            ``Annotations3D``, or a dict. Drawn in the cool palette.
        predictions: the same for predictions (a ``Detections3D``), plus optional ``scores``;
            boxes scoring below ``score_threshold`` are left out. Drawn in the warm palette.
        color_by: point colouring, see :func:`point_colors` (``semantic`` uses the GT boxes).
        trails: ``history`` of :func:`trail_lines` (already in this frame's coordinates).
        max_points: randomly keep at most this many points (deterministic), for speed.
    """
    scene = Scene(title=title)
    gt_boxes = as_numpy(_field(ground_truth, "boxes"), np.float32)
    gt_labels = as_numpy(_field(ground_truth, "labels"), np.int64)
    if points is not None:
        pts = as_numpy(points, np.float32)
        if max_points is not None and len(pts) > max_points:
            pts = pts[np.sort(np.random.default_rng(0).choice(len(pts), max_points, replace=False))]
        colors = point_colors(pts, color_by, boxes=gt_boxes, box_labels=gt_labels)
        scene.add("points", PointLayer(pts[:, :3], colors, point_size))

    def name(label: int) -> str:
        known = class_names is not None and 0 <= label < len(class_names)
        return class_names[label] if known else f"class {label}"

    if gt_boxes is not None and len(gt_boxes):
        labels = gt_labels if gt_labels is not None else np.zeros(len(gt_boxes), np.int64)
        scene.add("gt_boxes", box_lines(gt_boxes, C.class_color(labels), heading, line_width))
        for label in sorted(set(labels.tolist())):
            scene.legend.append((f"GT {name(label)}", tuple(float(v) for v in C.class_color([label])[0])))
        kp = _field(ground_truth, "keypoints")
        if kp is not None and len(as_numpy(kp)):
            vis = _field(ground_truth, "keypoint_visibility")
            scene.add("gt_keypoints", skeleton_lines(kp, vis, None, line_width))
    if predictions is not None:
        boxes = as_numpy(_field(predictions, "boxes"), np.float32)
        labels = as_numpy(_field(predictions, "labels"), np.int64)
        scores = as_numpy(_field(predictions, "scores"), np.float32)
        if boxes is not None and len(boxes):
            labels = labels if labels is not None else np.zeros(len(boxes), np.int64)
            keep = scores >= score_threshold if scores is not None else np.ones(len(boxes), bool)
            scene.add(
                "pred_boxes", box_lines(boxes[keep], C.class_color(labels[keep], True), heading, line_width)
            )
            for label in sorted(set(labels[keep].tolist())):
                scene.legend.append(
                    (f"Pred {name(label)}", tuple(float(v) for v in C.class_color([label], True)[0]))
                )
            kp = _field(predictions, "keypoints")
            if kp is not None and len(as_numpy(kp)):
                vis = _field(predictions, "keypoint_visibility")
                vis = as_numpy(vis)[keep] if vis is not None else None
                scene.add(
                    "pred_keypoints", skeleton_lines(as_numpy(kp)[keep], vis, (1.0, 0.35, 0.95), line_width)
                )
    if trails:
        scene.add("trails", trail_lines(trails, line_width))
    if axes:
        scene.add("axes", coordinate_frame())
    if ego:
        scene.add("ego", ego_marker(width=line_width))
    scene.layers = {name: scene.layers[name] for name in LAYERS if name in scene.layers}  # drawing order
    return scene
