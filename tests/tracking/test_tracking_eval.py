"""Tracking scored by the nuScenes devkit's TrackingEval on sequences with known ids."""

import numpy as np
import pytest
import torch

pytest.importorskip("nuscenes")
pytest.importorskip("motmetrics")

from tracking_sequences import CATEGORIES, make_sequences, perfect_detections, score_tracks

from voxsparse.data.synthetic import CLASS_NAMES
from voxsparse.evaluation.nuscenes_tracking import (
    evaluate_nuscenes_tracking,
    export_tracking_submission,
    sequences_from_nusc,
    write_tracking_dataset,
)
from voxsparse.geometry import RigidTransform
from voxsparse.structures import Boxes3D, Detections3D


@pytest.fixture(scope="module")
def sequences():
    return make_sequences(num_sequences=2, num_frames=12, seed=0)


def _detections(sequences, noise=0.0, drop=0.0, seed=0):
    """Ground truth as detections, with BEV position noise (m, std) and a fraction dropped."""
    rng = np.random.default_rng(seed)
    out = []
    for frames in sequences:
        seq = []
        for f in frames:
            det = perfect_detections(f, rng)
            boxes = det.boxes.tensor.clone()
            boxes[:, :2] += torch.from_numpy(rng.normal(0, noise, (len(det), 2))).float()
            keep = torch.from_numpy(rng.random(len(det)) >= drop)
            seq.append(Detections3D(Boxes3D(boxes[keep]), det.scores[keep], det.labels[keep]))
        out.append(seq)
    return out


@pytest.mark.parametrize("seven_columns", [False, True], ids=["predicted_velocity", "own_velocity"])
def test_perfect_detections_track_perfectly(tmp_path, sequences, seven_columns):
    metrics, _ = score_tracks(tmp_path, sequences, _detections(sequences), seven_columns=seven_columns)
    assert metrics.overall["AMOTA"] == pytest.approx(1.0)
    assert metrics.overall["IDS"] == 0
    assert metrics.overall["FP"] == 0 and metrics.overall["FN"] == 0
    assert metrics.overall["AMOTP"] == pytest.approx(0.0, abs=1e-3)  # the exported boxes are the truth
    assert set(metrics.per_class) == {"car", "pedestrian", "bicycle"}


def test_position_noise_raises_amotp_monotonically(tmp_path, sequences):
    amotp = []
    for i, noise in enumerate([0.0, 0.15, 0.4]):
        metrics, _ = score_tracks(tmp_path / str(i), sequences, _detections(sequences, noise=noise))
        amotp.append(metrics.overall["AMOTP"])
    assert amotp[0] < amotp[1] < amotp[2], amotp


def test_dropped_detections_lower_recall_and_amota_monotonically(tmp_path, sequences):
    recall, amota = [], []
    for i, drop in enumerate([0.0, 0.15, 0.4]):
        metrics, _ = score_tracks(tmp_path / str(i), sequences, _detections(sequences, drop=drop))
        recall.append(metrics.overall["recall"])
        amota.append(metrics.overall["AMOTA"])
    assert recall[0] > recall[1] > recall[2], recall
    assert amota[0] > amota[1] > amota[2], amota


def test_new_ids_every_frame_count_as_id_switches(tmp_path, sequences):
    """The metric is not blind to identity: the truth with ids reshuffled every frame scores worse."""
    data = write_tracking_dataset(tmp_path / "gt", sequences, CLASS_NAMES, CATEGORIES)
    tracks, tokens = [], []
    for frames, seq_tokens in zip(sequences, data.sample_tokens):
        for k, (frame, token) in enumerate(zip(frames, seq_tokens)):
            a = frame.annotations
            ids = a.track_ids.flip(0) if k % 2 else a.track_ids  # swap identities on odd frames
            tracks.append(Detections3D(a.boxes, torch.full((len(a),), 0.9), a.labels, track_ids=ids))
            tokens.append(token)
    path = tmp_path / "swapped.json"
    export_tracking_submission(tracks, tokens, ["car", "pedestrian", "bicycle"], data.lidar_to_global, path)
    metrics = evaluate_nuscenes_tracking(data.tiny.dataroot, data.tiny.version, path, data.split, tmp_path / "e")
    assert metrics.overall["IDS"] > 10
    assert metrics.overall["MOTA"] < 0.9


def test_export_needs_track_ids(sequences):
    a = sequences[0][0].annotations
    identity = RigidTransform((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="track_ids"):
        export_tracking_submission(
            [Detections3D(a.boxes, torch.ones(len(a)), a.labels)], ["t"], ["car", "pedestrian", "bicycle"], {"t": identity}
        )


def test_ego_must_move_at_constant_velocity(tmp_path, sequences):
    frames = list(sequences[0][:3])
    pose = frames[2].lidar_to_world.copy()
    pose[0, 3] += 1.0
    frames[2] = type(frames[2])(frames[2].annotations, pose, frames[2].timestamp)
    with pytest.raises(ValueError, match="constant velocity"):
        write_tracking_dataset(tmp_path, [frames], CLASS_NAMES, CATEGORIES)


def test_nuscenes_samples_are_grouped_by_scene_in_time_order(tmp_path):
    from nuscenes import NuScenes

    from voxsparse.data.nuscenes_tiny import TinyNuScenesSpec, TinyScene, write_tiny_nuscenes

    tiny = write_tiny_nuscenes(
        tmp_path, TinyNuScenesSpec((TinyScene("a", 3), TinyScene("b", 2)), points_per_object=1, ground_points=0)
    )
    nusc = NuScenes(version=tiny.version, dataroot=str(tiny.dataroot), verbose=False)
    (a0, a1, a2), (b0, b1) = tiny.sample_tokens
    tokens = [b1, a2, a0, b0, a1]  # shuffled, as a sharded prediction run may list them
    indices, times = sequences_from_nusc(nusc, tokens)
    assert [[tokens[i] for i in seq] for seq in indices] == [[b0, b1], [a0, a1, a2]]
    assert times[2] + 1.0 == pytest.approx(times[1])  # a0 and a2 are two 0.5 s keyframes apart


def test_nuscenes_tracking_source_groups_the_frames_and_names_the_devkit_dataset(tmp_path):
    """configs/dataset/nuscenes.yaml's tracking source: scenes in time order, tracking names, the raw dataset."""
    from nuscenes.eval.common.config import config_factory

    from voxsparse.data.nuscenes import NUSCENES_DETECTION_NAMES, NUSCENES_TRACKING_NAMES, NuScenesTracking
    from voxsparse.data.nuscenes_tiny import TinyNuScenesSpec, TinyScene, write_tiny_nuscenes

    TRACKING_NAMES = config_factory("tracking_nips_2019").tracking_names  # the devkit's challenge classes
    assert sorted(NUSCENES_TRACKING_NAMES) == sorted(TRACKING_NAMES)
    tiny = write_tiny_nuscenes(
        tmp_path, TinyNuScenesSpec((TinyScene("a", 3), TinyScene("b", 2)), points_per_object=1, ground_points=0)
    )
    (a0, a1, a2), (b0, b1) = tiny.sample_tokens
    source = NuScenesTracking(frames=[], raw_root=str(tiny.dataroot), version=tiny.version, eval_set="val")
    tokens = [b1, a2, a0, b0, a1]
    seq = source.sequences(source.frames(), tokens)
    assert [[tokens[i] for i in s] for s in seq.indices] == [[b0, b1], [a0, a1, a2]]
    assert seq.devkit is not None and list(seq.devkit.sample_tokens) == tokens and set(seq.devkit.lidar_to_global) == set(tokens)
    assert (seq.devkit.dataroot, seq.devkit.version, seq.devkit.eval_set) == (tiny.dataroot, tiny.version, "val")
    tracked = [n for n in NUSCENES_DETECTION_NAMES if n in seq.tracking_names]
    assert tracked == [n for n in NUSCENES_DETECTION_NAMES if n in TRACKING_NAMES]
    assert all(seq.tracking_names[n] == n for n in tracked) and not seq.range_limited
