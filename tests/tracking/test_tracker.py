"""VoxelNeXtTracker rules: propagation, greedy per-class matching, birth and death."""

import math

import numpy as np
import pytest
import torch

from voxsparse.models.trackers import TrackerConfig, VoxelNeXtTracker, greedy_match
from voxsparse.structures import Boxes3D, Detections3D

NAMES = ["Vehicle", "Pedestrian", "Cyclist"]


def dets(xy, labels=None, velocity=None, scores=None, query=None):
    """Detections at BEV centres ``xy`` (K, 2); 9 columns when ``velocity`` is given."""
    xy = torch.as_tensor(xy, dtype=torch.float64).reshape(-1, 2)
    k = len(xy)
    boxes = torch.cat([xy, torch.zeros(k, 1), torch.ones(k, 3), torch.zeros(k, 1)], 1)
    if velocity is not None:
        boxes = torch.cat([boxes, torch.as_tensor(velocity, dtype=torch.float64).reshape(k, 2)], 1)
    return Detections3D(
        Boxes3D(boxes),
        torch.full((k,), 0.9) if scores is None else torch.as_tensor(scores, dtype=torch.float32),
        torch.zeros(k, dtype=torch.long) if labels is None else torch.as_tensor(labels, dtype=torch.long),
        query_xy=None if query is None else torch.as_tensor(query, dtype=torch.float64).reshape(k, 2),
    )


def test_greedy_match_takes_lowest_cost_first_and_respects_the_gate():
    cost = np.array([[1.0, 0.5], [0.4, 3.0], [9.0, 9.0]])
    # (1, 0) costs least, then (0, 1); row 2 is beyond the gate.
    assert greedy_match(cost, 2.0) == [(1, 0), (0, 1)]
    assert greedy_match(cost, 0.45) == [(1, 0)]
    assert greedy_match(np.zeros((0, 3)), 1.0) == []


def test_constant_velocity_object_keeps_its_id_with_predicted_velocity():
    # 8 m/s at 10 Hz: 0.8 m per frame; a pedestrian-sized gate (1 m) only holds after propagation.
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance={"Vehicle": 0.3, "Pedestrian": 1, "Cyclist": 1}))
    ids = [int(tracker.step(dets([[0.8 * k, 0.0]], velocity=[[8.0, 0.0]]), 0.1 * k).track_ids[0]) for k in range(10)]
    assert ids == [ids[0]] * 10


def test_seven_column_boxes_propagate_with_the_tracks_own_velocity():
    gate = {"Vehicle": 0.5, "Pedestrian": 1, "Cyclist": 1}
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance=gate))
    # 0.4 m per frame: within the gate from frame 0 to 1 (zero velocity), later only because the
    # track estimated its velocity; the object then speeds up to 0.8 m per frame.
    xs = [0.0, 0.4, 0.8, 1.2, 1.6, 2.4, 3.2, 4.0]
    ids = [int(tracker.step(dets([[x, 0.0]]), 0.1 * k).track_ids[0]) for k, x in enumerate(xs)]
    assert ids == [ids[0]] * len(xs)
    assert tracker.tracks[0].velocity[0] == pytest.approx(8.0, abs=1.5)
    # Without a velocity estimate the jump 1.6 -> 2.4 (0.8 m) is beyond the 0.5 m gate.
    frozen = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance=gate, velocity_smoothing=1e-9))
    ids = [int(frozen.step(dets([[0.0, 0.0]]), 0.0).track_ids[0])]
    frozen.tracks[0].hits = 2  # skip the first-displacement rule: the estimate stays ~0
    ids += [int(frozen.step(dets([[x, 0.0]]), 0.1 * k).track_ids[0]) for k, x in enumerate(xs[1:], start=1)]
    assert ids[:5] == [ids[0]] * 5 and ids[5] != ids[0]


def test_a_class_never_matches_another_class():
    tracker = VoxelNeXtTracker(NAMES)
    first = tracker.step(dets([[0.0, 0.0]], labels=[0]), 0.0)
    second = tracker.step(dets([[0.0, 0.0]], labels=[2]), 0.1)  # same place, other class
    assert int(first.track_ids[0]) != int(second.track_ids[0])


def test_greedy_per_class_assigns_each_track_once():
    tracker = VoxelNeXtTracker(NAMES)
    a = tracker.step(dets([[0.0, 0.0], [10.0, 0.0]]), 0.0)
    # Both detections near track 0: the nearer one keeps its id, the other starts a new track.
    b = tracker.step(dets([[0.2, 0.0], [0.5, 0.0]]), 0.1)
    assert int(b.track_ids[0]) == int(a.track_ids[0])
    assert int(b.track_ids[1]) not in a.track_ids.tolist()


def test_query_voxel_matches_when_the_centre_jumps():
    gate = {"Vehicle": 1.0, "Pedestrian": 1, "Cyclist": 1}
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance=gate))
    a = tracker.step(dets([[0.0, 0.0]], query=[[1.5, 0.0]]), 0.0)
    # The box centre regressed 3 m away (a partial view) but the same query voxel predicted it.
    b = tracker.step(dets([[3.0, 0.0]], query=[[1.5, 0.0]]), 0.1)
    assert int(b.track_ids[0]) == int(a.track_ids[0])
    # Without query voxels the same centres do not match.
    plain = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance=gate))
    a = plain.step(dets([[0.0, 0.0]]), 0.0)
    b = plain.step(dets([[3.0, 0.0]]), 0.1)
    assert int(b.track_ids[0]) != int(a.track_ids[0])


def test_confirmed_track_survives_max_age_misses_then_dies():
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(min_hits=2, max_age=3))
    first = int(tracker.step(dets([[0.0, 0.0]]), 0.0).track_ids[0])
    tracker.step(dets([[0.0, 0.0]]), 0.1)  # confirmed
    for k in range(3):  # max_age misses
        assert len(tracker.step(dets([]), 0.2 + 0.1 * k)) == 0
    assert int(tracker.step(dets([[0.0, 0.0]]), 0.5).track_ids[0]) == first
    for k in range(4):  # max_age + 1 misses: dead
        tracker.step(dets([]), 0.6 + 0.1 * k)
    assert tracker.tracks == []
    assert int(tracker.step(dets([[0.0, 0.0]]), 1.0).track_ids[0]) != first


def test_tentative_track_dies_at_its_first_miss_and_needs_min_hits():
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(min_hits=3, max_age=5, report_tentative=False))
    assert len(tracker.step(dets([[0.0, 0.0]]), 0.0)) == 0  # tentative: not reported
    tracker.step(dets([]), 0.1)  # one miss kills a tentative track
    assert tracker.tracks == []
    reported = [len(tracker.step(dets([[0.0, 0.0]]), 0.2 + 0.1 * k)) for k in range(4)]
    assert reported == [0, 0, 1, 1]  # confirmed at the third hit


def test_low_scores_neither_match_nor_start_tracks():
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(min_score=0.5))
    out = tracker.step(dets([[0.0, 0.0], [5.0, 0.0]], scores=[0.9, 0.2]), 0.0)
    assert len(out) == 1 and len(tracker.tracks) == 1


def test_ids_are_unique_across_sequences():
    tracker = VoxelNeXtTracker(NAMES)
    a = tracker.track_sequence([dets([[0.0, 0.0]])], [0.0])
    b = tracker.track_sequence([dets([[0.0, 0.0]])], [0.0])
    assert int(a[0].track_ids[0]) != int(b[0].track_ids[0])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="max_distance"):
        VoxelNeXtTracker(["Truck"])
    with pytest.raises(ValueError, match="min_hits"):
        TrackerConfig(min_hits=0)
    tracker = VoxelNeXtTracker(NAMES)
    tracker.step(dets([[0.0, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="timestamp"):
        tracker.step(dets([[0.0, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="labels"):
        tracker.step(dets([[0.0, 0.0]], labels=[7]), 2.0)
    with pytest.raises(ValueError, match="Detections3D.query_xy"):
        dets([[0.0, 0.0]], query=[[math.nan, 0.0]])


def test_predictions_files_keep_query_voxels_and_read_older_files(tmp_path):
    from voxsparse.evaluation.predictions_io import PredictionsFile, load_predictions, save_predictions

    d = dets([[1.0, 2.0], [3.0, 4.0]], scores=[0.9, 0.8])
    query = torch.tensor([[1.5, 2.5], [3.5, 4.5]])
    with_query = [Detections3D(Boxes3D(d.boxes.tensor.float()), d.scores, d.labels, query_xy=query)]
    save_predictions(tmp_path / "q.pt", PredictionsFile(["f"], with_query, NAMES, (0.0,) * 6))
    loaded = load_predictions(tmp_path / "q.pt").detections[0]
    torch.testing.assert_close(loaded.query_xy, with_query[0].query_xy)
    without = [Detections3D(with_query[0].boxes, with_query[0].scores, with_query[0].labels)]
    save_predictions(tmp_path / "old.pt", PredictionsFile(["f"], without, NAMES, (0.0,) * 6))
    assert load_predictions(tmp_path / "old.pt").detections[0].query_xy is None


def test_query_voxels_can_be_switched_off():
    gate = {"Vehicle": 1.0, "Pedestrian": 1, "Cyclist": 1}
    tracker = VoxelNeXtTracker(NAMES, TrackerConfig(max_distance=gate, use_query_voxels=False))
    a = tracker.step(dets([[0.0, 0.0]], query=[[1.5, 0.0]]), 0.0)
    b = tracker.step(dets([[3.0, 0.0]], query=[[1.5, 0.0]]), 0.1)
    assert int(b.track_ids[0]) != int(a.track_ids[0])
