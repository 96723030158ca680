"""nuScenes: the tiny dataset writer, the submission exporter and the devkit's DetectionEval.

References are the devkit's own: boxes in the LiDAR frame come from ``NuScenes.get_sample_data``,
velocities from ``NuScenes.box_velocity``, rotations from pyquaternion, so a frame or ordering
mistake in our code cannot cancel out against itself. Expected metrics follow from the definitions
(center-distance matching at 0.5 / 1 / 2 / 4 m, TP errors at 2 m, NDS = (5 mAP + sum(1 - min(1,
err))) / 10).
"""

import json
import math

import numpy as np
import pytest
import torch
from nuscenes import NuScenes
from nuscenes.eval.detection.constants import ATTRIBUTE_NAMES, DETECTION_NAMES
from nuscenes.eval.detection.utils import category_to_detection_name
from nuscenes.utils.data_classes import Box, LidarPointCloud
from nuscenes.utils.geometry_utils import points_in_box
from pyquaternion import Quaternion

from voxsparse.data.nuscenes import NUSCENES_DETECTION_NAMES, lidar_to_global_from_nusc
from voxsparse.data.nuscenes_tiny import (
    NUSCENES_ATTRIBUTES,
    TinyNuScenesSpec,
    TinyObject,
    TinyScene,
    write_tiny_nuscenes,
)
from voxsparse.evaluation.nuscenes import default_attribute, evaluate_nuscenes, export_submission
from voxsparse.geometry import RigidTransform
from voxsparse.structures import Boxes3D, Detections3D

CLASSES = NUSCENES_DETECTION_NAMES

# (category, size (w, l, h), speed m/s, attribute that default_attribute gives it when moving)
_OBJECTS = (
    ("vehicle.car", (1.9, 4.6, 1.7), 4.0, "vehicle.moving"),
    ("vehicle.truck", (2.5, 7.0, 3.0), 3.0, "vehicle.moving"),
    ("vehicle.bus.rigid", (2.9, 11.0, 3.4), 2.5, "vehicle.moving"),
    ("vehicle.trailer", (2.4, 9.0, 3.5), 2.0, "vehicle.moving"),
    ("vehicle.construction", (2.8, 6.5, 3.2), 1.5, "vehicle.moving"),
    ("human.pedestrian.adult", (0.7, 0.8, 1.8), 1.4, "pedestrian.moving"),
    ("vehicle.motorcycle", (0.8, 2.1, 1.5), 5.0, "cycle.with_rider"),
    ("vehicle.bicycle", (0.6, 1.8, 1.3), 3.5, "cycle.with_rider"),
    ("movable_object.trafficcone", (0.4, 0.4, 1.0), 0.0, None),
    ("movable_object.barrier", (2.5, 0.5, 1.0), 0.0, None),
    ("animal", (0.4, 0.8, 0.5), 1.0, None),  # not a detection class: the devkit ignores it
)


def _scene(name: str, ego_xy: tuple[float, float], ego_yaw: float) -> TinyScene:
    """Every detection class once, on a ring 9-24 m around the ego, far enough apart not to overlap."""
    objects = []
    for i, (category, size, speed, attribute) in enumerate(_OBJECTS):
        bearing = ego_yaw + 2 * math.pi * i / len(_OBJECTS)
        radius = 9.0 + 15.0 * (i % 2)
        heading = bearing + 0.7 * i
        objects.append(
            TinyObject(
                category=category,
                translation=(
                    ego_xy[0] + radius * math.cos(bearing),
                    ego_xy[1] + radius * math.sin(bearing),
                    size[2] / 2,
                ),
                size=size,
                yaw=heading,
                velocity=(speed * math.cos(heading), speed * math.sin(heading)),
                attribute=attribute,
            )
        )
    return TinyScene(
        name,
        num_samples=3,
        objects=tuple(objects),
        ego_translation=ego_xy,
        ego_yaw=ego_yaw,
        ego_velocity=(2.0, -1.0),
        ego_yaw_rate=0.2,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two scenes of three keyframes, all ten classes in each, a moving and turning ego."""
    spec = TinyNuScenesSpec(
        scenes=(_scene("scene-0001", (411.3, 1180.9), 0.4), _scene("scene-0002", (1620.0, 870.5), -2.0)),
        splits={"tiny_val": ("scene-0001", "scene-0002"), "tiny_first": ("scene-0001",)},
    )
    info = write_tiny_nuscenes(tmp_path_factory.mktemp("nuscenes"), spec)
    nusc = NuScenes(version=info.version, dataroot=str(info.dataroot), verbose=False)
    return info, nusc


def _gt_detections(nusc: NuScenes, sample_token: str) -> Detections3D:
    """The sample's GT as LiDAR-frame detections, converted by the devkit (not by our code)."""
    sd_token = nusc.get("sample", sample_token)["data"]["LIDAR_TOP"]
    sd = nusc.get("sample_data", sd_token)
    to_sensor = (
        Quaternion(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["rotation"]).inverse
        * Quaternion(nusc.get("ego_pose", sd["ego_pose_token"])["rotation"]).inverse
    )
    _, boxes, _ = nusc.get_sample_data(sd_token)
    rows, labels = [], []
    for box in boxes:
        name = category_to_detection_name(box.name)
        if name is None:
            continue
        velocity = to_sensor.rotate(nusc.box_velocity(box.token))
        width, length, height = box.wlh
        rows.append([*box.center, length, width, height, box.orientation.yaw_pitch_roll[0], *velocity[:2]])
        labels.append(CLASSES.index(name))
    scores = torch.linspace(0.9, 0.5, len(rows))
    return Detections3D(Boxes3D(torch.tensor(rows, dtype=torch.float32)), scores, torch.tensor(labels))


def _export_and_eval(tiny, tmp_path, perturb=None, eval_set="tiny_val"):
    info, nusc = tiny
    tokens = [t for scene in info.sample_tokens for t in scene]
    dets = [_gt_detections(nusc, t) for t in tokens]
    if perturb is not None:
        for d in dets:
            perturb(d.boxes.tensor)
    path = tmp_path / "results.json"
    export_submission(dets, tokens, CLASSES, lidar_to_global_from_nusc(nusc), path=path)
    return evaluate_nuscenes(nusc, path, eval_set, tmp_path / "eval")


def _nds(m: dict) -> float:
    errors = [m[k] for k in ("mATE", "mASE", "mAOE", "mAVE", "mAAE")]
    return (5 * m["mAP"] + sum(1 - min(1.0, e) for e in errors)) / 10


# --- the writer -------------------------------------------------------------------------------


def test_tiny_dataset_points_sweeps_and_velocities(tmp_path):
    """Points lie in the devkit's boxes (keyframes and interpolated sweeps); box_velocity is exact."""
    car = TinyObject(
        "vehicle.car",
        (105.0, 52.0, 0.9),
        (1.8, 4.4, 1.6),
        yaw=0.5,
        velocity=(6.0, 2.0),
        attribute="vehicle.moving",
    )
    ped = TinyObject(
        "human.pedestrian.child",
        (96.0, 47.0, 0.6),
        (0.5, 0.5, 1.2),
        velocity=(-1.0, 0.5),
        samples=range(1, 3),
    )
    tilted = Quaternion(axis=(0.3, 0.2, 1.0), angle=-1.4)  # a sensor with roll and pitch
    spec = TinyNuScenesSpec(
        scenes=(
            TinyScene(
                "s",
                3,
                (car, ped),
                ego_translation=(100.0, 50.0),
                ego_yaw=1.0,
                ego_velocity=(5.0, 1.0),
                ego_yaw_rate=0.3,
            ),
        ),
        sweeps_per_interval=2,
        lidar_rotation=tuple(tilted.elements),
        points_per_object=12,
    )
    info = write_tiny_nuscenes(tmp_path, spec)
    nusc = NuScenes(version=info.version, dataroot=str(info.dataroot), verbose=False)
    assert len(nusc.sample) == 3 and len(nusc.sample_data) == 9
    assert [i["nbr_annotations"] for i in nusc.instance] == [3, 2]

    for ann in nusc.sample_annotation:
        expected = car if ann["category_name"] == "vehicle.car" else ped
        np.testing.assert_allclose(nusc.box_velocity(ann["token"])[:2], expected.velocity, atol=1e-9)
        assert ann["num_lidar_pts"] == 12

    checked_sweeps = 0
    for sd in nusc.sample_data:
        sample = nusc.get("sample", sd["sample_token"])
        points = LidarPointCloud.from_file(nusc.get_sample_data_path(sd["token"])).points[:3]
        _, boxes, _ = nusc.get_sample_data(sd["token"])
        assert len(boxes) == len(sample["anns"])
        for box in boxes:
            if not sd["is_key_frame"] and nusc.get("sample_annotation", box.token)["prev"] == "":
                continue  # no earlier annotation: the devkit cannot interpolate this sweep's box
            assert int(points_in_box(box, points).sum()) == 12, (sd["filename"], box.name)
            checked_sweeps += not sd["is_key_frame"]
    assert (
        checked_sweeps == 6
    )  # the car in the 4 sweeps after keyframe 0, the pedestrian in the 2 after keyframe 1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"splits": {"val": ("scene-0001",)}}, "predefined nuScenes split"),
        ({"splits": {"x": ("nope",)}}, "unknown scenes"),
        ({"points_per_object": 0}, "points_per_object"),
    ],
)
def test_tiny_spec_rejects_bad_input(change, message):
    scene = TinyScene("scene-0001", 2)
    with pytest.raises(ValueError, match=message):
        TinyNuScenesSpec(scenes=(scene,), **change)


def test_tiny_object_rejects_bad_input():
    with pytest.raises(ValueError, match="not a nuScenes category"):
        TinyObject("vehicle.spaceship", (0, 0, 0), (1, 1, 1))
    with pytest.raises(ValueError, match="outside the scene"):
        TinyScene("s", 2, (TinyObject("vehicle.car", (0, 0, 0), (1, 1, 1), samples=range(1, 3)),))


def test_names_match_the_devkit():
    assert NUSCENES_DETECTION_NAMES == tuple(DETECTION_NAMES)
    assert set(NUSCENES_ATTRIBUTES) == set(ATTRIBUTE_NAMES)


# --- the exporter -----------------------------------------------------------------------------


def test_rigid_transform_matches_pyquaternion():
    rng = np.random.default_rng(0)
    a, b = (Quaternion(*rng.normal(size=4)).normalised for _ in range(2))
    ta, tb = rng.normal(size=3) * 100, rng.normal(size=3)
    A, B = RigidTransform(tuple(a.elements), tuple(ta)), RigidTransform(tuple(b.elements), tuple(tb))
    points = rng.normal(size=(5, 3)) * 10
    np.testing.assert_allclose(A.matrix(), a.rotation_matrix, atol=1e-12)
    np.testing.assert_allclose(
        (A @ B).apply(points), points @ (a * b).rotation_matrix.T + a.rotate(tb) + ta, atol=1e-9
    )
    np.testing.assert_allclose(A.inverse().apply(A.apply(points)), points, atol=1e-9)


def test_export_with_a_tilted_sensor_matches_devkit_box_transforms():
    """Against the devkit's Box.rotate / translate, with a sensor that has roll and pitch."""
    cs = Quaternion(axis=(0.2, -0.3, 1.0), angle=-1.5)
    ego = Quaternion(axis=(0.0, 0.0, 1.0), angle=2.2)
    cs_t, ego_t = np.array([0.9, 0.1, 1.8]), np.array([530.0, 1620.0, 0.0])
    lidar_to_global = RigidTransform(tuple(ego.elements), tuple(ego_t)) @ RigidTransform(
        tuple(cs.elements), tuple(cs_t)
    )
    row = [12.0, -3.0, 0.4, 4.5, 1.9, 1.6, 0.8, 3.0, -1.0]  # (x, y, z, dx, dy, dz, heading, vx, vy)
    det = Detections3D(
        Boxes3D(torch.tensor([row], dtype=torch.float64)), torch.tensor([0.5]), torch.tensor([0])
    )
    out = export_submission([det], ["t"], ["car"], {"t": lidar_to_global})["results"]["t"][0]

    ref = Box(
        row[0:3],
        [row[4], row[3], row[5]],
        Quaternion(axis=(0, 0, 1), angle=row[6]),
        velocity=(*row[7:9], 0.0),
    )
    for rotation, translation in ((cs, cs_t), (ego, ego_t)):
        ref.rotate(rotation)
        ref.translate(translation)
    np.testing.assert_allclose(out["translation"], ref.center, atol=1e-9)
    np.testing.assert_allclose(out["size"], ref.wlh, atol=1e-12)
    assert Quaternion.absolute_distance(Quaternion(out["rotation"]), ref.orientation) < 1e-9
    np.testing.assert_allclose(out["velocity"], ref.velocity[:2], atol=1e-9)


def test_export_reproduces_the_global_annotations(tiny, tmp_path):
    """LiDAR-frame GT exported to the submission equals the annotation table (size order, quaternion, velocity)."""
    info, nusc = tiny
    token = info.sample_tokens[1][1]
    path = tmp_path / "sub.json"
    submission = export_submission(
        [_gt_detections(nusc, token)], [token], CLASSES, lidar_to_global_from_nusc(nusc), path=path
    )
    assert json.loads(path.read_text()) == submission
    assert submission["meta"] == {
        "use_camera": False,
        "use_lidar": True,
        "use_radar": False,
        "use_map": False,
        "use_external": False,
    }
    by_name = {}
    for ann_token in nusc.get("sample", token)["anns"]:
        ann = nusc.get("sample_annotation", ann_token)
        by_name[category_to_detection_name(ann["category_name"])] = ann
    boxes = submission["results"][token]
    assert sorted(b["detection_name"] for b in boxes) == sorted(CLASSES)
    for box in boxes:
        ann = by_name[box["detection_name"]]
        np.testing.assert_allclose(box["translation"], ann["translation"], atol=1e-4)
        np.testing.assert_allclose(box["size"], ann["size"], atol=1e-5)
        assert Quaternion.absolute_distance(Quaternion(box["rotation"]), Quaternion(ann["rotation"])) < 1e-5
        np.testing.assert_allclose(box["velocity"], nusc.box_velocity(ann["token"])[:2], atol=1e-5)
        attrs = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
        assert box["attribute_name"] == (attrs[0] if attrs else "")


def test_default_attribute():
    assert default_attribute("car", 0.0) == "vehicle.parked"
    assert default_attribute("bus", 0.1) == "vehicle.stopped"
    assert default_attribute("truck", 0.3) == "vehicle.moving"
    assert default_attribute("pedestrian", 0.2) == "pedestrian.standing"
    assert default_attribute("pedestrian", 1.0) == "pedestrian.moving"
    assert default_attribute("bicycle", 0.0) == "cycle.without_rider"
    assert default_attribute("motorcycle", 3.0) == "cycle.with_rider"
    assert default_attribute("barrier", 3.0) == ""
    with pytest.raises(ValueError, match="unknown nuScenes detection name"):
        default_attribute("Vehicle", 0.0)


def test_export_keeps_the_top_scores_up_to_the_limit(tiny):
    info, nusc = tiny
    token = info.sample_tokens[0][0]
    boxes = torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.0]]).repeat(4, 1)
    det = Detections3D(Boxes3D(boxes), torch.tensor([0.2, 0.9, 0.5, 0.7]), torch.zeros(4, dtype=torch.int64))
    out = export_submission(
        [det], [token], ["car"], lidar_to_global_from_nusc(nusc, [token]), max_boxes_per_sample=2
    )
    assert [b["detection_score"] for b in out["results"][token]] == pytest.approx([0.9, 0.7])
    assert all(
        b["velocity"] == [0.0, 0.0] and b["attribute_name"] == "vehicle.parked" for b in out["results"][token]
    )


def test_export_rejects_malformed_input(tiny):
    info, nusc = tiny
    token = info.sample_tokens[0][0]
    poses = lidar_to_global_from_nusc(nusc, [token])
    det = Detections3D(
        Boxes3D(torch.tensor([[1.0, 2.0, 0.5, 4.0, 2.0, 1.5, 0.0]])), torch.tensor([0.5]), torch.tensor([0])
    )
    with pytest.raises(ValueError, match=r"\['Vehicle'\] are not nuScenes detection names"):
        export_submission([det], [token], ["Vehicle"], poses)
    with pytest.raises(ValueError, match="sample token unknown-token: no LiDAR-to-global transform"):
        export_submission([det], ["unknown-token"], CLASSES, poses)
    with pytest.raises(ValueError, match="appears more than once"):
        export_submission([det, det], [token, token], CLASSES, poses)
    with pytest.raises(ValueError, match="2 detection sets but 1 sample tokens"):
        export_submission([det, det], [token], CLASSES, poses)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        export_submission([Detections3D(det.boxes, det.scores, torch.tensor([3]))], [token], ["car"], poses)
    det.scores[0] = float("nan")  # corrupted after construction, past Detections3D's own check
    with pytest.raises(ValueError, match=f"sample {token}: scores hold NaN"):
        export_submission([det], [token], CLASSES, poses)


def test_evaluate_rejects_a_submission_missing_samples(tiny, tmp_path):
    info, nusc = tiny
    first = info.sample_tokens[0][0]
    det = Detections3D(Boxes3D.empty(), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    path = tmp_path / "partial.json"
    export_submission([det], [first], CLASSES, lidar_to_global_from_nusc(nusc), path=path)
    with pytest.raises(ValueError, match="5 of the 6 samples of split 'tiny_val' are missing"):
        evaluate_nuscenes(nusc, path, "tiny_val", tmp_path / "eval")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="'results' field"):
        evaluate_nuscenes(nusc, tmp_path / "bad.json", "tiny_val", tmp_path / "eval")


# --- the devkit's metrics ---------------------------------------------------------------------


def test_no_detections_score_zero(tiny, tmp_path):
    """The devkit cannot read a submission without boxes; the score is its own for nothing detected."""
    info, nusc = tiny
    tokens = [t for scene in info.sample_tokens for t in scene]
    nothing = Detections3D(Boxes3D(torch.zeros(0, 9)), torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    path = tmp_path / "results.json"
    export_submission([nothing] * len(tokens), tokens, CLASSES, lidar_to_global_from_nusc(nusc), path=path)
    metrics = evaluate_nuscenes(nusc, path, "tiny_val", tmp_path / "eval")
    assert metrics.mAP == 0.0 and metrics.NDS == 0.0
    assert all(m.ap == 0.0 for m in metrics.per_class.values())


def test_perfect_predictions_score_one(tiny, tmp_path):
    metrics = _export_and_eval(tiny, tmp_path)
    assert metrics.mAP == pytest.approx(1.0, abs=1e-9)
    assert metrics.NDS == pytest.approx(1.0, abs=1e-4)
    for key in ("mATE", "mASE", "mAOE", "mAVE", "mAAE"):
        assert getattr(metrics, key) == pytest.approx(0.0, abs=1e-4), key
    assert set(metrics.per_class) == set(CLASSES)
    assert math.isnan(metrics.per_class["traffic_cone"].aoe) and math.isnan(metrics.per_class["barrier"].ave)
    flat = metrics.to_dict()
    assert flat["mAP"] == metrics.mAP and flat["ATE/bus"] == metrics.per_class["bus"].ate
    assert flat["AP@0.5m/car"] == metrics.per_class["car"].ap_by_distance[0.5] == pytest.approx(1.0)
    assert (tmp_path / "eval" / "metrics_summary.json").is_file()


def _shift_x(metres):
    def perturb(boxes):
        boxes[:, 0] += metres

    return perturb


def _rotate(radians):
    def perturb(boxes):
        boxes[:, 6] += radians

    return perturb


def _scale(factor):
    def perturb(boxes):
        boxes[:, 3:6] *= factor

    return perturb


def _add_velocity(vx, vy):
    def perturb(boxes):
        boxes[:, 7] += vx
        boxes[:, 8] += vy

    return perturb


# AP per class = fraction of the thresholds (0.5, 1, 2, 4 m) the centre offset is below. TP errors are
# measured at 2 m; AOE is undefined for cones, AVE and AAE for cones and barriers (nan, left out of
# the means). Every moving object stays above the 0.2 m/s attribute threshold under the velocity change.
@pytest.mark.parametrize(
    "perturb, expected",
    [
        (_shift_x(0.75), {"mAP": 0.75, "mATE": 0.75, "mASE": 0, "mAOE": 0, "mAVE": 0, "mAAE": 0}),
        (_shift_x(1.5), {"mAP": 0.5, "mATE": 1.5, "mASE": 0, "mAOE": 0, "mAVE": 0, "mAAE": 0}),
        (_rotate(0.3), {"mAP": 1.0, "mATE": 0, "mASE": 0, "mAOE": 0.3, "mAVE": 0, "mAAE": 0}),
        (_scale(1.2), {"mAP": 1.0, "mATE": 0, "mASE": 1 - 1 / 1.2**3, "mAOE": 0, "mAVE": 0, "mAAE": 0}),
        (_add_velocity(0.3, -0.4), {"mAP": 1.0, "mATE": 0, "mASE": 0, "mAOE": 0, "mAVE": 0.5, "mAAE": 0}),
    ],
    ids=["shift-0.75m", "shift-1.5m", "yaw+0.3", "scale-1.2", "velocity+0.5"],
)
def test_perturbed_predictions_score_the_tp_error_definitions(tiny, tmp_path, perturb, expected):
    metrics = _export_and_eval(tiny, tmp_path, perturb)
    got = {k: getattr(metrics, k) for k in expected}
    assert got == pytest.approx(expected, abs=1e-4)
    assert metrics.NDS == pytest.approx(_nds(expected), abs=1e-4)
    if perturb.__qualname__.startswith("_shift_x"):
        offset = expected["mATE"]
        for name, m in metrics.per_class.items():
            assert m.ap_by_distance == pytest.approx({d: float(offset < d) for d in (0.5, 1.0, 2.0, 4.0)}), (
                name
            )


def test_custom_split_restricts_the_evaluation(tiny, tmp_path):
    """A split naming one scene: the other scene's samples are ignored, the score stays perfect."""
    metrics = _export_and_eval(tiny, tmp_path, eval_set="tiny_first")
    assert metrics.mAP == pytest.approx(1.0, abs=1e-9)


def test_metric_suite_scores_loader_frames_through_the_devkit(tiny):
    """tools/eval.py's nuScenes suite: loader ground truth returned as predictions scores mAP 1,
    so the loader's LiDAR-frame boxes, the export and the devkit agree end to end."""
    from voxsparse.data.nuscenes import load_sample, plan_samples
    from voxsparse.data.sample import Sample
    from voxsparse.engine.evaluate import metric_suite
    from voxsparse.engine.inference import DatasetPredictions

    info, nusc = tiny
    samples = [Sample.from_frame(load_sample(s)) for s in plan_samples(nusc, "tiny_val", max_sweeps=1)]
    detections = [
        Detections3D(s.annotations.boxes, torch.linspace(0.9, 0.5, len(s.annotations.labels)), s.annotations.labels)
        for s in samples
    ]
    dataset = {
        "evaluation": "voxsparse.evaluation.suites.nuscenes", "class_names": list(CLASSES), "raw_root": str(info.dataroot),
        "version": info.version, "val_split": "tiny_val",
    }
    predictions = DatasetPredictions([s.frame_id for s in samples], detections, [s.annotations for s in samples])
    metrics = metric_suite(dataset)(predictions, dataset)
    assert metrics.mAP == pytest.approx(1.0, abs=1e-9)
    assert metrics.mATE == pytest.approx(0.0, abs=1e-4) and metrics.mAVE == pytest.approx(0.0, abs=1e-3)
    assert "NDS" in metrics.table() and metrics.to_dict()["mAP"] == metrics.mAP
