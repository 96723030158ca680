"""The KITTI reader on files written in the dataset's formats (``tests/data/kitti_writer.py``):
calibration and label parsing, camera <-> LiDAR boxes against their corners mapped point by point,
the image field of view against the projection, difficulty levels, frames and preparation.
With ``VOXSPARSE_OPENPCDET`` naming an OpenPCDet checkout, boxes and projections are also compared
with its ``boxes3d_kitti_camera_to_lidar`` and ``Calibration`` loaded by path."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.data.kitti_writer import CALIB_TEXT, IMAGE_SHAPE, write_frame, write_splits
from voxsparse.data import kitti
from voxsparse.data.kitti import (
    CLASS_NAMES,
    KittiObjects,
    camera_boxes_to_lidar,
    difficulty_levels,
    fov_mask,
    image_boxes,
    image_size,
    lidar_boxes_to_camera,
    parse_calib,
    parse_labels,
    read_frame,
)
from voxsparse.data.prepared import PreparedDataset
from voxsparse.ops.boxes import boxes_to_corners_3d

LABELS = """Car 0.00 0 -1.58 587.01 173.33 614.12 200.12 1.65 1.67 3.64 -0.65 1.71 46.70 -1.59
Pedestrian 0.00 0 -0.20 712.40 143.00 810.73 307.92 1.89 0.48 1.20 1.84 1.47 8.41 0.01
Cyclist 0.31 1 1.62 1106.14 166.89 1223.00 232.59 1.72 0.50 1.95 10.69 1.62 16.59 2.17
Van 0.00 1 1.97 0.00 190.33 151.53 323.32 2.19 1.98 5.03 -8.20 1.72 11.36 1.35
DontCare -1 -1 -10 503.89 169.71 590.61 190.13 -1 -1 -1 -1000 -1000 -1000 -10
"""


def _calib():
    return parse_calib(CALIB_TEXT)


def _objects(n: int, seed: int = 0, names=("Car", "Pedestrian", "Cyclist")) -> KittiObjects:
    rng = np.random.default_rng(seed)
    hwl = rng.uniform([1.2, 0.5, 0.8], [2.5, 2.0, 5.0], (n, 3))
    xyz = np.column_stack([rng.uniform(-15, 15, n), rng.uniform(0.5, 2.5, n), rng.uniform(4, 60, n)])
    return KittiObjects(
        names=tuple(names[i % len(names)] for i in range(n)),
        truncated=rng.choice([0.0, 0.1, 0.3, 0.6], n),
        occluded=rng.integers(0, 4, n),
        alpha=rng.uniform(-np.pi, np.pi, n),
        bbox=np.column_stack([rng.uniform(0, 600, n), rng.uniform(100, 200, n), rng.uniform(650, 1200, n),
                              rng.uniform(210, 370, n)]),
        dimensions=hwl,
        location=xyz,
        rotation_y=rng.uniform(-np.pi, np.pi, n),
    )


def _camera_corners(o: KittiObjects) -> np.ndarray:
    """(K, 8, 3) corners in the rectified camera frame from the label definition: the box spans
    [-l/2, l/2] along its x axis, [-h, 0] along y (up from the bottom centre) and [-w/2, w/2] along
    z, rotated by rotation_y about y (x towards -z), then moved to the location."""
    out = []
    for (h, w, l), loc, ry in zip(o.dimensions, o.location, o.rotation_y):
        rot = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
        local = np.array([[sx * l / 2, sy * -h, sz * w / 2] for sx in (-1, 1) for sy in (0, 1) for sz in (-1, 1)])
        out.append(local @ rot.T + loc)
    return np.stack(out)


def _same_corner_sets(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    for ca, cb in zip(a, b):
        d = np.linalg.norm(ca[:, None, :] - cb[None, :, :], axis=-1)
        assert d.min(1).max() < atol and d.min(0).max() < atol


def test_parse_labels_and_calib():
    objects = parse_labels(LABELS)
    assert objects.names == ("Car", "Pedestrian", "Cyclist", "Van", "DontCare")
    assert objects.score is None
    np.testing.assert_array_equal(objects.occluded, [0, 0, 1, 1, -1])
    np.testing.assert_allclose(objects.dimensions[0], [1.65, 1.67, 3.64])
    np.testing.assert_allclose(objects.location[2], [10.69, 1.62, 16.59])
    assert parse_labels(kitti.format_labels(objects)).names == objects.names
    np.testing.assert_allclose(parse_labels(kitti.format_labels(objects)).bbox, objects.bbox)
    scored = parse_labels("Car -1 -1 0.1 1 2 3 4 1.5 1.6 3.9 1 2 30 0.2 0.875\n")
    assert scored.score.tolist() == [0.875]
    with pytest.raises(ValueError, match="line 2: 14 fields"):
        parse_labels(LABELS.splitlines()[0] + "\nCar 0 0 0 1 2 3 4 5 6 7 8 9 10\n", "x.txt")
    calib = _calib()
    assert calib.p2.shape == (3, 4) and calib.r0_rect.shape == (3, 3) and calib.velo_to_cam.shape == (3, 4)
    assert calib.p2[0, 0] == 707.0493
    with pytest.raises(ValueError, match="no Tr_velo_to_cam"):
        parse_calib("\n".join(line for line in CALIB_TEXT.splitlines() if not line.startswith("Tr_velo")), "c.txt")


def test_boxes_camera_to_lidar_match_corners():
    calib = _calib()
    objects = _objects(64)
    boxes = camera_boxes_to_lidar(objects, calib)
    # The bottom centre maps exactly; the box stands upright in the LiDAR frame, whose vertical is the
    # camera's to about 0.6 degrees here, so its corners are the camera box's to a few centimetres.
    bottom = boxes[:, :3] - np.column_stack([np.zeros((len(boxes), 2)), 0.5 * boxes[:, 5]])
    np.testing.assert_allclose(bottom, calib.rect_to_lidar(objects.location), atol=1e-9)
    lidar_corners = boxes_to_corners_3d(torch.from_numpy(boxes)).numpy()
    mapped = calib.rect_to_lidar(_camera_corners(objects).reshape(-1, 3)).reshape(-1, 8, 3)
    _same_corner_sets(lidar_corners, mapped, atol=0.05)
    # The heading is the camera box's length axis mapped to the LiDAR frame, seen from above.
    axis = np.column_stack([np.cos(objects.rotation_y), np.zeros(len(boxes)), -np.sin(objects.rotation_y)])
    linear = np.linalg.inv(calib.velo_to_rect())[:3, :3]
    d = axis @ linear.T
    np.testing.assert_allclose(np.cos(np.arctan2(d[:, 1], d[:, 0]) - boxes[:, 6]), 1.0, atol=1e-3)
    assert (boxes[:, 6] >= -np.pi).all() and (boxes[:, 6] < np.pi).all()
    np.testing.assert_allclose(boxes[:, 3:6], objects.dimensions[:, [2, 1, 0]])
    # The inverse gives the label back.
    location, dimensions, rotation_y = lidar_boxes_to_camera(boxes, calib)
    np.testing.assert_allclose(location, objects.location, atol=1e-9)
    np.testing.assert_allclose(dimensions, objects.dimensions)
    np.testing.assert_allclose(np.cos(rotation_y - objects.rotation_y), 1.0, atol=1e-12)
    # A car ahead facing along the LiDAR's +x axis: rotation_y = -pi/2 -> heading 0.
    ahead = parse_labels("Car 0 0 0 0 0 10 10 1.5 1.6 4.0 0.0 1.6 20.0 -1.5708\n")
    box = camera_boxes_to_lidar(ahead, calib)[0]
    assert abs(box[6]) < 1e-4 and 19 < box[0] < 21 and abs(box[1]) < 0.5


def test_fov_and_image_boxes_against_projection():
    calib = _calib()
    rng = np.random.default_rng(1)
    points = rng.uniform([-30, -40, -3], [70, 40, 3], (20000, 3))
    mask = fov_mask(points, calib, IMAGE_SHAPE)
    # Brute force: P2 @ R0 @ Tr, pixel coordinates divided by the rectified depth (OpenPCDet's rule).
    rect = calib.lidar_to_rect(points)
    hom = np.column_stack([rect, np.ones(len(rect))]) @ calib.p2.T
    u, v = hom[:, 0] / rect[:, 2], hom[:, 1] / rect[:, 2]
    expected = (u >= 0) & (u < IMAGE_SHAPE[1]) & (v >= 0) & (v < IMAGE_SHAPE[0]) & (rect[:, 2] >= 0)
    np.testing.assert_array_equal(mask, expected)
    assert 0.05 < mask.mean() < 0.5 and (points[mask, 0] > 0).all()
    objects = _objects(20)
    boxes = image_boxes(objects.location, objects.dimensions, objects.rotation_y, calib, IMAGE_SHAPE)
    corners = _camera_corners(objects).reshape(-1, 3)
    hom = np.column_stack([corners, np.ones(len(corners))]) @ calib.p2.T
    uv = (hom[:, :2] / corners[:, 2:]).reshape(-1, 8, 2)
    expected = np.concatenate([uv.min(1), uv.max(1)], 1)
    expected[:, [0, 2]] = expected[:, [0, 2]].clip(0, IMAGE_SHAPE[1] - 1)
    expected[:, [1, 3]] = expected[:, [1, 3]].clip(0, IMAGE_SHAPE[0] - 1)
    np.testing.assert_allclose(boxes, expected, atol=1e-9)


def test_difficulty_levels():
    o = parse_labels(
        "Car 0.00 0 0 0 0 10 40.01 1 1 1 0 0 10 0\n"  # easy
        "Car 0.00 0 0 0 0 10 40.00 1 1 1 0 0 10 0\n"  # 40 px is not taller than 40: moderate
        "Car 0.16 0 0 0 0 10 50 1 1 1 0 0 10 0\n"  # truncated past easy
        "Car 0.30 2 0 0 0 10 50 1 1 1 0 0 10 0\n"  # occluded past moderate: hard
        "Car 0.50 2 0 0 0 10 25.00 1 1 1 0 0 10 0\n"  # too short for every level
        "Car 0.51 0 0 0 0 10 50 1 1 1 0 0 10 0\n"  # truncated past hard
        "Car 0.00 3 0 0 0 10 50 1 1 1 0 0 10 0\n"  # occlusion unknown
    )
    assert difficulty_levels(o).tolist() == [1, 2, 2, 3, 0, 0, 0]


def test_read_frame_and_prepare(tmp_path):
    rng = np.random.default_rng(2)
    objects = parse_labels(LABELS)
    calib = _calib()
    lidar_boxes = camera_boxes_to_lidar(objects.select(np.array([n in CLASS_NAMES for n in objects.names])), calib)
    # Points: a cloud all around the car plus points inside each labelled box.
    inside = np.concatenate([b[:3] + rng.uniform(-0.3, 0.3, (30, 3)) * b[3:6] for b in lidar_boxes])
    around = rng.uniform([-40, -40, -2], [60, 40, 2], (5000, 3))
    xyz = np.concatenate([inside, around])
    points = np.column_stack([xyz, rng.uniform(0, 1, len(xyz))]).astype(np.float32)
    write_frame(tmp_path, "000007", points, objects)
    write_frame(tmp_path, "000011", points[:100], parse_labels(""))
    write_frame(tmp_path, "000003", points[:50], None, folder="testing")
    write_splits(tmp_path, {"train": ["000007"], "val": ["000011"], "test": ["000003"]})

    assert image_size(tmp_path / "training" / "image_2" / "000007.png") == IMAGE_SHAPE
    frame = read_frame(tmp_path, "training", "000007")
    keep = fov_mask(points, calib, IMAGE_SHAPE)
    np.testing.assert_array_equal(frame.points, points[keep])
    assert frame.points.dtype == np.float32 and frame.point_features == ("x", "y", "z", "intensity")
    assert frame.labels.tolist() == [0, 1, 2]  # Van and DontCare dropped
    np.testing.assert_allclose(frame.boxes, lidar_boxes.astype(np.float32))
    kept = frame.points[:, :3].astype(np.float64)
    for box, count in zip(frame.boxes.astype(np.float64), frame.num_points):
        d = kept - box[:3]
        c, s = np.cos(box[6]), np.sin(box[6])
        u, v = d[:, 0] * c + d[:, 1] * s, -d[:, 0] * s + d[:, 1] * c
        inside_box = (abs(u) <= box[3] / 2) & (abs(v) <= box[4] / 2) & (abs(d[:, 2]) <= box[5] / 2)
        assert count == inside_box.sum() > 0
    assert frame.difficulty.tolist() == difficulty_levels(objects)[:3].tolist()
    assert frame.track_ids.tolist() == [-1, -1, -1]
    assert frame.objects.names[-1] == "DontCare" and frame.image_shape == IMAGE_SHAPE
    assert len(read_frame(tmp_path, "training", "000007", fov_only=False).points) == len(points)
    test_frame = read_frame(tmp_path, "testing", "000003")
    assert test_frame.objects is None and len(test_frame.boxes) == 0

    from voxsparse.data.preparation import main

    out = tmp_path / "prepared"
    main(["kitti", "--root", str(tmp_path), "--out", str(out), "--workers", "1", "--quiet",
          "--splits", "train", "val", "test"])  # fmt: skip
    train = PreparedDataset(out, "train", point_features=["x", "y", "z", "intensity"])
    assert train.index.class_names == CLASS_NAMES and train.index.config == {"dataset": "kitti", "fov_only": True}
    stored = train[0]
    np.testing.assert_array_equal(stored.points, frame.points)
    np.testing.assert_array_equal(stored.boxes, frame.boxes)
    assert train.index.gt_database  # train splits get a GT database by default
    assert len(PreparedDataset(out, "val")[0].boxes) == 0
    assert len(PreparedDataset(out, "test")) == 1


@pytest.fixture
def openpcdet(monkeypatch):
    root = os.environ.get("VOXSPARSE_OPENPCDET")
    if not root:
        pytest.skip("set VOXSPARSE_OPENPCDET to an OpenPCDet checkout to compare with it")
    root = Path(root)
    for name in ("pcdet", "pcdet.utils", "pcdet.ops", "pcdet.ops.roiaware_pool3d"):
        stub = types.ModuleType(name)
        stub.__path__ = [str(root / name.replace(".", "/"))]
        monkeypatch.setitem(sys.modules, name, stub)
    # box_utils imports these for functions not used here; OpenPCDet's compiled ops are not built.
    for name in ("pcdet.ops.roiaware_pool3d.roiaware_pool3d_utils", "pcdet.utils.common_utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["pcdet.ops.roiaware_pool3d"].roiaware_pool3d_utils = sys.modules[
        "pcdet.ops.roiaware_pool3d.roiaware_pool3d_utils"
    ]
    sys.modules["pcdet.utils"].common_utils = sys.modules["pcdet.utils.common_utils"]
    loaded = {}
    for name in ("calibration_kitti", "box_utils"):
        spec = importlib.util.spec_from_file_location(f"pcdet.utils.{name}", root / "pcdet" / "utils" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        loaded[name] = module
    return loaded


def test_against_openpcdet(openpcdet, tmp_path):
    calib_path = tmp_path / "calib.txt"
    calib_path.write_text(CALIB_TEXT)
    theirs = openpcdet["calibration_kitti"].Calibration(str(calib_path))
    objects = _objects(200, seed=3)
    # OpenPCDet's camera boxes are (x, y, z, l, h, w, ry).
    h, w, l = objects.dimensions.T
    camera = np.column_stack([objects.location, l, h, w, objects.rotation_y]).astype(np.float32)
    expected = openpcdet["box_utils"].boxes3d_kitti_camera_to_lidar(camera, theirs)
    ours = camera_boxes_to_lidar(objects, _calib())
    np.testing.assert_allclose(ours[:, :6], expected[:, :6], atol=2e-4)  # theirs in float32
    np.testing.assert_allclose(np.cos(ours[:, 6] - expected[:, 6]), 1.0, atol=1e-9)
    rng = np.random.default_rng(4)
    points = rng.uniform([-30, -40, -3], [70, 40, 3], (5000, 3)).astype(np.float32)
    uv, depth = theirs.rect_to_img(theirs.lidar_to_rect(points))
    ours_uv, ours_depth = _calib().rect_to_image(_calib().lidar_to_rect(points))
    front = depth > 1  # float32 pixels blow up near the camera plane
    np.testing.assert_allclose(ours_uv[front], uv[front], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(ours_depth, depth, atol=1e-4)
