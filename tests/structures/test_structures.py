import pytest
import torch

from voxsparse.structures import Annotations3D, Boxes3D, Detections3D, PointBatch, SparseVoxels, VoxelGrid


def test_point_batch_from_frames_keeps_empty_frames():
    batch = PointBatch.from_frames([torch.rand(5, 4), torch.zeros(0, 4), torch.rand(2, 4)])
    assert batch.batch_size == 3
    assert batch.batch_index.tolist() == [0] * 5 + [2] * 2


@pytest.mark.parametrize(
    "points, message",
    [
        (torch.tensor([[0.0, float("nan"), 0.0, 1.0]]), "NaN or inf"),
        (torch.tensor([[0.0, float("inf"), 0.0, 1.0]]), "NaN or inf"),
        (torch.zeros(4, 2), "at least 3 columns"),
        (torch.zeros(4), "2 dimensions"),
        (torch.zeros(4, 4, dtype=torch.int32), "floating dtype"),
    ],
)
def test_point_batch_rejects_bad_points(points, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        PointBatch(points, torch.zeros(len(points), dtype=torch.int64), 1)
    assert "PointBatch.points" in str(info.value)


def test_point_batch_rejects_mismatched_frames_and_indices():
    with pytest.raises(ValueError, match="one D"):
        PointBatch.from_frames([torch.rand(3, 4), torch.rand(3, 5)])
    with pytest.raises(ValueError, match=r"batch_index: values must lie in \[0, 1\)"):
        PointBatch(torch.rand(2, 4), torch.tensor([0, 1]), 1)
    with pytest.raises(TypeError, match="numpy|torch.Tensor"):
        PointBatch([[0.0, 0.0, 0.0]], torch.zeros(1, dtype=torch.int64), 1)


def test_boxes_validation_and_accessors():
    boxes = Boxes3D(torch.tensor([[1.0, 2.0, 3.0, 4.0, 2.0, 1.5, 0.3, 5.0, -1.0]]))
    torch.testing.assert_close(boxes.velocity, torch.tensor([[5.0, -1.0]]))
    assert len(boxes[0]) == 1 and boxes.to(dtype=torch.float64).tensor.dtype == torch.float64
    with pytest.raises(ValueError, match=r"Boxes3D.tensor: expected last dimension in \(7, 9\)"):
        Boxes3D(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="non-negative"):
        Boxes3D(torch.tensor([[0.0, 0.0, 0.0, -1.0, 1.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="NaN"):
        Boxes3D(torch.tensor([[0.0, 0.0, float("nan"), 1.0, 1.0, 1.0, 0.0]]))


def test_annotations_and_detections_check_lengths():
    boxes = Boxes3D(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="Annotations3D.labels: expected 2 rows"):
        Annotations3D(boxes, torch.zeros(3, dtype=torch.int64), *(torch.zeros(2, dtype=torch.int64),) * 3)
    with pytest.raises(ValueError, match="Detections3D.scores"):
        Detections3D(boxes, torch.tensor([0.5, float("nan")]), torch.zeros(2, dtype=torch.int64))


def test_voxel_grid_shapes_and_centres():
    grid = VoxelGrid((0.5, 0.25, 1.0), (-2.0, -1.0, -3.0, 2.0, 1.0, 1.0))
    assert grid.grid_size == (8, 8, 4) and grid.spatial_shape == (4, 8, 8)
    voxels = SparseVoxels(torch.tensor([[0, 1, 2, 3]], dtype=torch.int32), torch.zeros(1, 4), grid, 1)
    torch.testing.assert_close(voxels.voxel_centers(), torch.tensor([[-0.25, -0.375, -1.5]]))
    with pytest.raises(ValueError, match="voxel_size"):
        VoxelGrid((0.0, 0.1, 0.1), (-1, -1, -1, 1, 1, 1))
    with pytest.raises(ValueError, match="point_cloud_range"):
        VoxelGrid((0.1, 0.1, 0.1), (1, -1, -1, -1, 1, 1))
