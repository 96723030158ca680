"""KITTI 3D object detection: velodyne scans, calibration and ``label_2`` files, read into frames in
the LiDAR frame, and the preparation hooks of ``tools/prepare_data.py kitti``.

Layout under the root (``data/README.md`` says where each part comes from)::

    ImageSets/{train,val,trainval,test}.txt     frame ids, one a line (the usual 3712 / 3769 split)
    training/velodyne/<id>.bin                  float32 records (x, y, z, reflectance)
    training/calib/<id>.txt                     P0..P3, R0_rect, Tr_velo_to_cam, Tr_imu_to_velo
    training/label_2/<id>.txt                   one object a line (:func:`parse_labels`)
    training/image_2/<id>.png                   only its size is read (the image field of view)
    testing/{velodyne,calib,image_2}/           the same without labels

A frame (frame id = the file stem, e.g. ``000008``):

- points (N, 4) float32 ``(x, y, z, intensity)``, intensity the reflectance in [0, 1], read by
  :func:`voxsparse.data.pointfile.read_points`. Only points that project into the left colour image
  (``image_2``) in front of the camera are kept (:func:`fov_mask`): the benchmark labels objects in
  that field of view only.
- boxes (K, 7): the ``label_2`` objects of :data:`CLASS_NAMES` converted from the rectified camera
  frame by :func:`camera_boxes_to_lidar` (other types, ``DontCare`` included, are dropped; the
  metric reads the label files itself, :mod:`voxsparse.evaluation.kitti`).
- num_points: kept points inside each box; difficulty: :func:`difficulty_levels` (1 easy,
  2 moderate, 3 hard, 0 none of them); track_ids -1 (the object benchmark has no identities).

The calibration is used as the affine maps it is written as (``R0_rect @ Tr_velo_to_cam`` and its
exact inverse), not as a rigid transform: its six-digit matrices are not exactly orthonormal, and the
benchmark's tools and OpenPCDet apply them as given.
"""

from __future__ import annotations

import argparse
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voxsparse.data.frame_record import FrameRecord
from voxsparse.data.pointfile import read_points
from voxsparse.data.prepared import PreparationSplit
from voxsparse.geometry import points_in_boxes, wrap_angle

__all__ = [
    "CLASS_NAMES",
    "KITTI_POINT_FEATURES",
    "MAX_OCCLUSION",
    "MAX_TRUNCATION",
    "MIN_HEIGHT",
    "SPLIT_FOLDERS",
    "KittiCalib",
    "KittiFrame",
    "KittiObjects",
    "add_prepare_arguments",
    "camera_boxes_to_lidar",
    "difficulty_levels",
    "format_labels",
    "fov_mask",
    "image_boxes",
    "image_size",
    "kitti_frames",
    "lidar_boxes_to_camera",
    "parse_calib",
    "parse_labels",
    "preparation_splits",
    "read_frame",
    "read_split_ids",
]

#: Label order of prepared KITTI frames: the benchmark's three evaluated classes.
CLASS_NAMES: tuple[str, ...] = ("Car", "Pedestrian", "Cyclist")

#: Point columns of a KITTI frame.
KITTI_POINT_FEATURES: tuple[str, ...] = ("x", "y", "z", "intensity")

#: Prepared split -> the folder its frames are in.
SPLIT_FOLDERS = {"train": "training", "val": "training", "trainval": "training", "test": "testing"}

#: The benchmark's difficulty limits, easy / moderate / hard: minimum 2D box height in pixels (an
#: object must be taller), most occlusion level, most truncation.
MIN_HEIGHT: tuple[float, ...] = (40.0, 25.0, 25.0)
MAX_OCCLUSION: tuple[int, ...] = (0, 1, 2)
MAX_TRUNCATION: tuple[float, ...] = (0.15, 0.3, 0.5)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- labels ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KittiObjects:
    """The objects of one frame as a ``label_2`` (or results) file writes them: rectified camera
    frame (x right, y down, z forward, metres), image pixels.

    Attributes:
        names: (K,) object types as written (``Car``, ``Van``, ``DontCare``, ...).
        truncated: (K,) float64, 0 (inside the image) .. 1 (leaving it).
        occluded: (K,) int64, 0 visible, 1 partly, 2 largely occluded, 3 unknown.
        alpha: (K,) float64 observation angle, radians.
        bbox: (K, 4) float64 2D box ``(left, top, right, bottom)`` in pixels.
        dimensions: (K, 3) float64 ``(height, width, length)`` in metres.
        location: (K, 3) float64 bottom centre ``(x, y, z)`` in the rectified camera frame.
        rotation_y: (K,) float64 yaw about the camera's y axis, radians.
        score: (K,) float64 detection scores (results files), or None (labels).
    """

    names: tuple[str, ...]
    truncated: np.ndarray
    occluded: np.ndarray
    alpha: np.ndarray
    bbox: np.ndarray
    dimensions: np.ndarray
    location: np.ndarray
    rotation_y: np.ndarray
    score: np.ndarray | None = None

    def __post_init__(self) -> None:
        k = len(self.names)
        shapes = {"truncated": (k,), "occluded": (k,), "alpha": (k,), "bbox": (k, 4), "dimensions": (k, 3),
                  "location": (k, 3), "rotation_y": (k,)}  # fmt: skip
        if self.score is not None:
            shapes["score"] = (k,)
        for name, shape in shapes.items():
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.shape != shape:
                got = value.shape if isinstance(value, np.ndarray) else type(value).__name__
                raise ValueError(f"KittiObjects.{name}: expected an array of shape {shape}, got {got}")

    def __len__(self) -> int:
        return len(self.names)

    def select(self, keep: np.ndarray) -> KittiObjects:
        """The objects where the (K,) bool ``keep`` is true."""
        return KittiObjects(
            tuple(n for n, k in zip(self.names, keep) if k),
            self.truncated[keep],
            self.occluded[keep],
            self.alpha[keep],
            self.bbox[keep],
            self.dimensions[keep],
            self.location[keep],
            self.rotation_y[keep],
            None if self.score is None else self.score[keep],
        )

    @classmethod
    def empty(cls, scored: bool = False) -> KittiObjects:
        z = np.zeros(0)
        return cls((), z, z.astype(np.int64), z, np.zeros((0, 4)), np.zeros((0, 3)), np.zeros((0, 3)), z,
                   z if scored else None)  # fmt: skip


def parse_labels(text: str, source: str = "label text") -> KittiObjects:
    """Parse a ``label_2`` file (15 fields a line) or a results file (16: a score last).

    Fields: type, truncated, occluded, alpha, bbox (4), dimensions h w l, location x y z,
    rotation_y [, score]. Blank lines are skipped.

    Raises:
        ValueError: naming ``source`` and the line, for a line with another field count or a
            field that is not a number; for a file that mixes scored and unscored lines.
    """
    rows, names = [], []
    widths = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise ValueError(f"{source} line {number}: {len(fields)} fields, expected 15 (labels) or 16 (results)")
        try:
            rows.append([float(v) for v in fields[1:]])
        except ValueError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
        names.append(fields[0])
        widths.add(len(fields))
    if len(widths) > 1:
        raise ValueError(f"{source}: some lines have a score and some do not")
    if not rows:
        return KittiObjects.empty(scored=False)
    a = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{source}: a field holds NaN or inf")
    return KittiObjects(
        names=tuple(names),
        truncated=a[:, 0],
        occluded=a[:, 1].astype(np.int64),
        alpha=a[:, 2],
        bbox=a[:, 3:7],
        dimensions=a[:, 7:10],
        location=a[:, 10:13],
        rotation_y=a[:, 13],
        score=a[:, 14] if a.shape[1] == 15 else None,
    )


def format_labels(objects: KittiObjects) -> str:
    """The text of a ``label_2`` file (or a results file when ``objects.score`` is set), two decimals
    as KITTI writes them (scores with four)."""
    lines = []
    for i, name in enumerate(objects.names):
        values = [objects.truncated[i], objects.occluded[i], objects.alpha[i], *objects.bbox[i],
                  *objects.dimensions[i], *objects.location[i], objects.rotation_y[i]]  # fmt: skip
        text = f"{name} {values[0]:.2f} {int(values[1])} " + " ".join(f"{v:.2f}" for v in values[2:])
        if objects.score is not None:
            text += f" {objects.score[i]:.4f}"
        lines.append(text)
    return "".join(line + "\n" for line in lines)


def difficulty_levels(objects: KittiObjects) -> np.ndarray:
    """(K,) int64 benchmark level of each object: 1 easy, 2 moderate, 3 hard, 0 none.

    An object counts at a level when its 2D box is taller than :data:`MIN_HEIGHT` and its occlusion
    and truncation are at most :data:`MAX_OCCLUSION` / :data:`MAX_TRUNCATION` (the official
    evaluation's rule; the levels nest, so the lowest level that admits it is stored).
    """
    height = objects.bbox[:, 3] - objects.bbox[:, 1]
    level = np.zeros(len(objects), dtype=np.int64)
    for d in reversed(range(3)):
        ok = (height > MIN_HEIGHT[d]) & (objects.occluded <= MAX_OCCLUSION[d]) & (objects.truncated <= MAX_TRUNCATION[d])
        level[ok] = d + 1
    return level


# --- calibration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KittiCalib:
    """A frame's calibration (``calib/<id>.txt``), the matrices as written, float64.

    Attributes:
        p2: (3, 4) projection of the rectified camera frame onto the left colour image.
        r0_rect: (3, 3) rectifying rotation of the reference camera.
        velo_to_cam: (3, 4) LiDAR -> reference camera.
    """

    p2: np.ndarray
    r0_rect: np.ndarray
    velo_to_cam: np.ndarray

    def velo_to_rect(self) -> np.ndarray:
        """(4, 4) homogeneous LiDAR -> rectified camera map ``R0_rect @ Tr_velo_to_cam``."""
        r0, v2c = np.eye(4), np.eye(4)
        r0[:3, :3], v2c[:3, :] = self.r0_rect, self.velo_to_cam
        return r0 @ v2c

    def lidar_to_rect(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) LiDAR points -> (N, 3) float64 rectified camera points."""
        m = self.velo_to_rect()
        return np.asarray(points, np.float64)[:, :3] @ m[:3, :3].T + m[:3, 3]

    def rect_to_lidar(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) rectified camera points -> (N, 3) float64 LiDAR points (the exact inverse map)."""
        m = np.linalg.inv(self.velo_to_rect())
        return np.asarray(points, np.float64)[:, :3] @ m[:3, :3].T + m[:3, 3]

    def rect_to_image(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3) rectified camera points -> ((N, 2) pixel (u, v), (N,) depth z).

        ``(u, v)`` is ``P2 @ (x, y, z, 1)`` divided by the rectified depth z rather than by its third
        component (which adds ``P2[2, 3]``, 5 mm): OpenPCDet's projection, so field-of-view borders and
        projected 2D boxes are the ones its published KITTI numbers were computed with (0.05 px apart).
        """
        rect = np.asarray(points, np.float64)[:, :3]
        p = rect @ self.p2[:, :3].T + self.p2[:, 3]
        with np.errstate(divide="ignore", invalid="ignore"):
            uv = p[:, :2] / rect[:, 2:3]
        return uv, rect[:, 2]


def parse_calib(text: str, source: str = "calibration text") -> KittiCalib:
    """Parse a ``calib/<id>.txt`` (``key: values`` lines; ``P2``, ``R0_rect`` and ``Tr_velo_to_cam`` are used).

    Raises:
        ValueError: naming ``source``, for a missing key or a matrix with the wrong number of values.
    """
    values: dict[str, list[float]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, rest = line.partition(":")
        if not sep:
            raise ValueError(f"{source} line {number}: expected 'key: values'")
        try:
            values[key.strip()] = [float(v) for v in rest.split()]
        except ValueError as exc:
            raise ValueError(f"{source} line {number}: {exc}") from None
    shapes = {"P2": (3, 4), "R0_rect": (3, 3), "Tr_velo_to_cam": (3, 4)}
    out = {}
    for key, shape in shapes.items():
        if key not in values:
            raise ValueError(f"{source}: no {key} (found {sorted(values)})")
        if len(values[key]) != shape[0] * shape[1]:
            raise ValueError(f"{source}: {key} has {len(values[key])} values, expected {shape[0] * shape[1]}")
        out[key] = np.asarray(values[key], dtype=np.float64).reshape(shape)
    return KittiCalib(out["P2"], out["R0_rect"], out["Tr_velo_to_cam"])


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of a PNG image, from its header alone.

    Raises:
        ValueError: naming the file, when it is not a PNG.
    """
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG image (KITTI's image_2 files are)")
    width, height = struct.unpack(">II", head[16:24])
    return int(height), int(width)


def fov_mask(points: np.ndarray, calib: KittiCalib, image_shape: tuple[int, int]) -> np.ndarray:
    """(N,) bool: the LiDAR points that project into the image (``0 <= u < width``,
    ``0 <= v < height``) at a non-negative depth, ``image_shape = (height, width)``."""
    uv, depth = calib.rect_to_image(calib.lidar_to_rect(points))
    with np.errstate(invalid="ignore"):
        inside = (uv[:, 0] >= 0) & (uv[:, 0] < image_shape[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < image_shape[0])
    return inside & (depth >= 0)


# --- boxes -------------------------------------------------------------------------------------


def camera_boxes_to_lidar(objects: KittiObjects, calib: KittiCalib) -> np.ndarray:
    """(K, 7) float64 LiDAR boxes ``(x, y, z, dx, dy, dz, heading)`` of camera-frame objects.

    The camera box's bottom centre is mapped to the LiDAR frame and raised by half its height; the
    length, width and height become dx, dy, dz; heading = -(rotation_y + pi / 2), wrapped to [-pi, pi)
    (rotation_y turns the camera's x axis towards -z about y (down); LiDAR x is camera z).
    """
    h, w, l = objects.dimensions.T
    centre = calib.rect_to_lidar(objects.location)
    centre[:, 2] += 0.5 * h
    heading = wrap_angle(-(objects.rotation_y + 0.5 * np.pi))
    return np.column_stack([centre, l, w, h, heading])


def lidar_boxes_to_camera(boxes: np.ndarray, calib: KittiCalib) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inverse of :func:`camera_boxes_to_lidar`: (K, >=7) LiDAR boxes -> ((K, 3) bottom centres in
    the rectified camera frame, (K, 3) dimensions (h, w, l), (K,) rotation_y in [-pi, pi)), float64."""
    boxes = np.asarray(boxes, np.float64)
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= 0.5 * boxes[:, 5]
    location = calib.lidar_to_rect(bottom)
    dimensions = boxes[:, [5, 4, 3]]
    return location, dimensions, wrap_angle(-boxes[:, 6] - 0.5 * np.pi)


def image_boxes(
    location: np.ndarray, dimensions: np.ndarray, rotation_y: np.ndarray, calib: KittiCalib, image_shape: tuple[int, int]
) -> np.ndarray:
    """(K, 4) float64 2D boxes ``(left, top, right, bottom)``: the hull of the 3D box's projected
    corners, clipped to the image (``[0, width - 1] x [0, height - 1]``, ``image_shape = (height, width)``)."""
    k = len(location)
    if k == 0:
        return np.zeros((0, 4))
    h, w, l = np.asarray(dimensions, np.float64).T
    # Corners in the box frame (x along the length, y down from the bottom face, z along the width).
    sx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * 0.5
    sz = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * 0.5
    sy = np.array([0, 0, 0, 0, -1, -1, -1, -1])
    x, y, z = l[:, None] * sx, h[:, None] * sy, w[:, None] * sz
    c, s = np.cos(rotation_y)[:, None], np.sin(rotation_y)[:, None]
    corners = np.stack([c * x + s * z, y, -s * x + c * z], axis=-1) + np.asarray(location, np.float64)[:, None, :]
    uv, _ = calib.rect_to_image(corners.reshape(-1, 3))
    uv = uv.reshape(k, 8, 2)
    box = np.concatenate([uv.min(axis=1), uv.max(axis=1)], axis=1)
    box[:, [0, 2]] = box[:, [0, 2]].clip(0, image_shape[1] - 1)
    box[:, [1, 3]] = box[:, [1, 3]].clip(0, image_shape[0] - 1)
    return box


# --- frames ------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KittiFrame(FrameRecord):
    """One KITTI frame in the LiDAR frame (module docstring); a
    :class:`~voxsparse.data.frame_record.FrameRecord` with its camera data.

    Attributes:
        point_features: names of the point columns (:data:`KITTI_POINT_FEATURES`).
        calib: the frame's calibration.
        image_shape: (height, width) of its ``image_2`` image.
        objects: every ``label_2`` object (DontCare and all types), or None for the test split.
    """

    point_features: tuple[str, ...] = field(default=KITTI_POINT_FEATURES)
    calib: KittiCalib
    image_shape: tuple[int, int]
    objects: KittiObjects | None = None

    BOX_COLUMNS = (7,)

    def point_columns(self) -> int | None:
        return len(self.point_features)


def read_frame(root: str | Path, folder: str, frame_id: str, fov_only: bool = True) -> KittiFrame:
    """Read frame ``frame_id`` of ``<root>/<folder>`` (``training`` or ``testing``).

    Args:
        fov_only: keep only the points in the image's field of view (:func:`fov_mask`).

    Raises:
        FileNotFoundError / ValueError: naming the file that is missing or does not parse.
    """
    base = Path(root) / folder
    calib_path = base / "calib" / f"{frame_id}.txt"
    calib = parse_calib(calib_path.read_text(encoding="utf-8"), str(calib_path))
    image_shape = image_size(base / "image_2" / f"{frame_id}.png")
    points = read_points(base / "velodyne" / f"{frame_id}.bin", format="kitti").points
    if fov_only:
        points = points[fov_mask(points, calib, image_shape)]
    label_path = base / "label_2" / f"{frame_id}.txt"
    objects = parse_labels(label_path.read_text(encoding="utf-8"), str(label_path)) if folder == "training" else None
    if objects is None:
        kept = KittiObjects.empty()
        labels = np.zeros(0, np.int64)
    else:
        keep = np.array([n in CLASS_NAMES for n in objects.names], dtype=bool)
        kept = objects.select(keep)
        labels = np.array([CLASS_NAMES.index(n) for n in kept.names], dtype=np.int64)
    boxes = camera_boxes_to_lidar(kept, calib).astype(np.float32)
    num_points = points_in_boxes(points[:, :3].astype(np.float64), boxes.astype(np.float64)).sum(0)
    return KittiFrame(
        frame_id=frame_id,
        points=points,
        boxes=boxes.reshape(-1, 7),
        labels=labels,
        num_points=np.asarray(num_points, dtype=np.int64),
        difficulty=difficulty_levels(kept),
        track_ids=np.full(len(kept), -1, dtype=np.int64),
        calib=calib,
        image_shape=image_shape,
        objects=objects,
    )


def read_split_ids(root: str | Path, split: str) -> list[str]:
    """The frame ids of ``<root>/ImageSets/<split>.txt``.

    Raises:
        SystemExit: the file is missing (saying where the split files come from).
    """
    path = Path(root) / "ImageSets" / f"{split}.txt"
    if not path.is_file():
        raise SystemExit(f"{path}: no split file (data/README.md, KITTI: ImageSets lists the frame ids of each split)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- preparation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FrameTask:
    """One frame to prepare (picklable)."""

    root: str
    folder: str
    frame_id: str
    fov_only: bool


def kitti_frames(task: _FrameTask) -> Iterator[KittiFrame]:
    """The one frame of a preparation task (a ``prepare`` factory: module level, so workers can pickle it)."""
    yield read_frame(task.root, task.folder, task.frame_id, task.fov_only)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """``--all-points``; ``--root`` holds ``ImageSets/``, ``training/`` and ``testing/``."""
    parser.add_argument(
        "--all-points", action="store_true", help="keep the points outside the camera's field of view"
    )
    parser.set_defaults(root="data/kitti", out="data/prepared/kitti")


def preparation_splits(args: argparse.Namespace) -> list[PreparationSplit]:
    """The splits ``tools/prepare_data.py kitti`` prepares: ``--splits`` (default train and val)."""
    root = Path(args.root)
    splits = args.splits or ["train", "val"]
    unknown = [s for s in splits if s not in SPLIT_FOLDERS]
    if unknown:
        raise SystemExit(f"--splits {unknown}: KITTI splits are {list(SPLIT_FOLDERS)}")
    fov_only = not getattr(args, "all_points", False)
    config = {"dataset": "kitti", "fov_only": fov_only}

    def tasks(split: str) -> dict[str, _FrameTask]:
        folder = SPLIT_FOLDERS[split]
        if not (root / folder / "velodyne").is_dir():
            raise SystemExit(f"{root / folder}: no velodyne folder (data/README.md, KITTI)")
        return {i: _FrameTask(str(root), folder, i, fov_only) for i in read_split_ids(root, split)}

    return [
        PreparationSplit(split, kitti_frames, lambda split=split: tasks(split), CLASS_NAMES, config) for split in splits
    ]

