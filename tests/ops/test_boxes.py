"""Box geometry and rotated IoU against shapely in float64."""

import math

import pytest
import shapely
import shapely.affinity
import torch

from voxsparse.geometry import limit_period, points_in_boxes
from voxsparse.ops import boxes as box_ops
from voxsparse.ops.boxes import (
    bev_iou,
    bev_iou_aligned,
    boxes_to_corners_3d,
    boxes_to_corners_bev,
    iou_3d,
    iou_3d_aligned,
)

torch.set_num_threads(2)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def random_boxes(n: int, generator: torch.Generator, spread: float = 4.0) -> torch.Tensor:
    """(n, 7) float64 boxes crowded into a small area so that many pairs overlap."""
    b = torch.rand(n, 7, generator=generator, dtype=torch.float64)
    b[:, 0:2] = (b[:, 0:2] - 0.5) * spread
    b[:, 2] = b[:, 2] * 2
    b[:, 3:6] = b[:, 3:6] * 4 + 0.1
    b[:, 6] = (b[:, 6] - 0.5) * 4 * math.pi
    return b


def shapely_rect(box: torch.Tensor) -> shapely.Polygon:
    """Reference polygon built by shapely's own rotate/translate, independent of our corners."""
    x, y, _, dx, dy, _, heading = box[:7].tolist()
    rect = shapely.box(-dx / 2, -dy / 2, dx / 2, dy / 2)
    return shapely.affinity.translate(
        shapely.affinity.rotate(rect, heading, origin=(0, 0), use_radians=True), x, y
    )


def shapely_iou(a: torch.Tensor, b: torch.Tensor, use_height: bool) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        pa = shapely_rect(a[i])
        for j in range(b.shape[0]):
            pb = shapely_rect(b[j])
            inter, size_a, size_b = pa.intersection(pb).area, pa.area, pb.area
            if use_height:
                top = min(a[i, 2] + a[i, 5] / 2, b[j, 2] + b[j, 5] / 2)
                bottom = max(a[i, 2] - a[i, 5] / 2, b[j, 2] - b[j, 5] / 2)
                inter *= max(float(top - bottom), 0.0)
                size_a, size_b = size_a * float(a[i, 5]), size_b * float(b[j, 5])
            union = size_a + size_b - inter
            out[i, j] = inter / union if union > 0 else 0.0
    return out


def box(x=0.0, y=0.0, z=0.0, dx=2.0, dy=1.0, dz=1.0, heading=0.0) -> torch.Tensor:
    return torch.tensor([[x, y, z, dx, dy, dz, heading]], dtype=torch.float64)


def test_limit_period():
    angle = torch.tensor([-3 * math.pi, -math.pi, 0.0, math.pi, 2.5 * math.pi, 7.0], dtype=torch.float64)
    wrapped = limit_period(angle)
    torch.testing.assert_close(
        wrapped,
        torch.tensor(
            [-math.pi, -math.pi, 0.0, -math.pi, 0.5 * math.pi, 7.0 - 2 * math.pi], dtype=torch.float64
        ),
    )
    torch.testing.assert_close(
        limit_period(angle, offset=0.0, period=math.pi), torch.remainder(angle, math.pi)
    )


def test_corners_bev_known_box():
    corners = boxes_to_corners_bev(box(x=1, y=2, dx=4, dy=2, heading=math.pi / 2))
    # dx runs along +y after a quarter turn; rear-right corner first, then counter-clockwise.
    expected = torch.tensor([[[2.0, 0.0], [2.0, 4.0], [0.0, 4.0], [0.0, 0.0]]], dtype=torch.float64)
    torch.testing.assert_close(corners, expected)


def test_corners_counter_clockwise_and_3d_layout():
    b = random_boxes(50, torch.Generator().manual_seed(0))
    bev = boxes_to_corners_bev(b)
    x, y = bev[..., 0], bev[..., 1]
    signed_area = 0.5 * (x * y.roll(-1, 1) - y * x.roll(-1, 1)).sum(1)
    torch.testing.assert_close(signed_area, b[:, 3] * b[:, 4])
    c3 = boxes_to_corners_3d(b)
    assert c3.shape == (50, 8, 3)
    torch.testing.assert_close(c3[:, :4, :2], bev)
    torch.testing.assert_close(c3[:, 4:, :2], bev)
    torch.testing.assert_close(c3[:, :4, 2], (b[:, 2] - b[:, 5] / 2)[:, None].expand(-1, 4))
    torch.testing.assert_close(c3[:, 4:, 2], (b[:, 2] + b[:, 5] / 2)[:, None].expand(-1, 4))


def test_points_in_boxes_against_shapely():
    gen = torch.Generator().manual_seed(1)
    b = random_boxes(12, gen)
    points = (torch.rand(3000, 3, generator=gen, dtype=torch.float64) - 0.5) * torch.tensor(
        [8.0, 8.0, 4.0], dtype=torch.float64
    )
    points[:, 2] += 1
    mask = points_in_boxes(points, b, chunk_size=700)  # several chunks
    expected = torch.zeros(3000, 12, dtype=torch.bool)
    for j in range(12):
        poly = shapely_rect(b[j])
        inside_xy = torch.tensor(shapely.contains_xy(poly, points[:, 0].numpy(), points[:, 1].numpy()))
        expected[:, j] = inside_xy & ((points[:, 2] - b[j, 2]).abs() <= b[j, 5] / 2)
    assert mask.dtype == torch.bool and mask.shape == (3000, 12)
    assert torch.equal(mask, expected)
    assert expected.any()


def test_points_in_boxes_closed_faces():
    b = box(dx=2, dy=2, dz=2, heading=0.0)
    points = torch.tensor(
        [[1.0, 0.0, 0.0], [0.0, -1.0, 1.0], [1.0 + 1e-6, 0.0, 0.0], [0.0, 0.0, 1.1]], dtype=torch.float64
    )
    assert points_in_boxes(points, b)[:, 0].tolist() == [True, True, False, False]


@pytest.mark.parametrize("use_height", [False, True])
def test_iou_matches_shapely(use_height):
    gen = torch.Generator().manual_seed(2)
    a, b = random_boxes(60, gen), random_boxes(45, gen)
    fn = iou_3d if use_height else bev_iou
    iou = fn(a, b)
    expected = shapely_iou(a, b, use_height)
    assert (expected > 0.05).float().mean() > 0.2  # the test exercises real overlaps
    torch.testing.assert_close(iou, expected, atol=1e-9, rtol=0)
    aligned = (iou_3d_aligned if use_height else bev_iou_aligned)(a[:45], b)
    torch.testing.assert_close(aligned, expected[:45].diagonal(), atol=1e-9, rtol=0)


def test_float32_far_from_origin():
    gen = torch.Generator().manual_seed(3)
    a, b = random_boxes(20, gen), random_boxes(20, gen)
    offset = torch.tensor([5000.0, -3000.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    a32, b32 = (a + offset).float(), (b + offset).float()
    iou = bev_iou(a32, b32)
    assert iou.dtype == torch.float32
    # Reference on the float32-rounded boxes, so only our arithmetic is tested.
    torch.testing.assert_close(
        iou.double(), shapely_iou(a32.double(), b32.double(), False), atol=1e-6, rtol=0
    )


def test_symmetry_and_rotation_by_pi():
    gen = torch.Generator().manual_seed(4)
    a, b = random_boxes(40, gen), random_boxes(30, gen)
    for fn in (bev_iou, iou_3d):
        iou = fn(a, b)
        torch.testing.assert_close(fn(b, a), iou.T, atol=1e-12, rtol=0)
        flipped = a.clone()
        flipped[:, 6] += math.pi
        torch.testing.assert_close(fn(flipped, b), iou, atol=1e-12, rtol=0)


@pytest.mark.parametrize("heading", [0.0, 0.3, math.pi / 2, -2.0])
def test_degenerate_pairs(heading):
    base = box(x=3.0, y=-1.0, dx=4.0, dy=2.0, dz=1.5, heading=heading)
    along = torch.tensor([math.cos(heading), math.sin(heading)], dtype=torch.float64)
    side = torch.tensor([-math.sin(heading), math.cos(heading)], dtype=torch.float64)

    def moved(dx_shift=0.0, dy_shift=0.0, **changes):
        out = base.clone()
        out[0, :2] += dx_shift * along + dy_shift * side
        for column, value in changes.items():
            out[0, ("x", "y", "z", "dx", "dy", "dz", "heading").index(column)] = value
        return out

    cases = {
        "identical": (base, 1.0, 1.0),
        "touching end": (moved(dx_shift=4.0), 0.0, 0.0),
        "touching side": (moved(dy_shift=2.0), 0.0, 0.0),
        "touching corner": (moved(dx_shift=4.0, dy_shift=2.0), 0.0, 0.0),
        "half overlap": (moved(dx_shift=2.0), 1 / 3, 1 / 3),
        "nested": (moved(dx=2.0, dy=1.0), 0.25, 0.25),
        "nested sharing an edge": (moved(dx_shift=1.0, dx=2.0), 0.5, 0.5),
        "disjoint": (moved(dx_shift=10.0), 0.0, 0.0),
        "stacked": (moved(z=1.5), 1.0, 0.0),
        "half height": (moved(dz=0.75), 1.0, 0.5),
        "zero area": (moved(dx=0.0), 0.0, 0.0),
        "zero height": (moved(dz=0.0), 1.0, 0.0),
    }
    for name, (other, expected_bev, expected_3d) in cases.items():
        for a, b in ((base, other), (other, base)):
            result = (
                bev_iou(a, b).item(),
                iou_3d(a, b).item(),
                bev_iou_aligned(a, b).item(),
                iou_3d_aligned(a, b).item(),
            )
            expected = (expected_bev, expected_3d, expected_bev, expected_3d)
            assert result == pytest.approx(expected, abs=1e-9), name


def test_both_degenerate_gives_zero_not_nan():
    a = box(dx=0.0, dy=0.0, dz=0.0)
    for fn in (bev_iou, iou_3d, bev_iou_aligned, iou_3d_aligned):
        assert fn(a, a).item() == 0.0


def test_chunking_matches_single_pass(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    a, b = random_boxes(70, gen), random_boxes(50, gen)
    iou, iou3 = bev_iou(a, b), iou_3d(a, b)
    aligned = bev_iou_aligned(a[:50], b)
    monkeypatch.setattr(box_ops, "_PAIRS_PER_CHUNK", 7)
    monkeypatch.setattr(box_ops, "_SCREEN_ELEMENTS", 130)
    torch.testing.assert_close(bev_iou(a, b), iou)
    torch.testing.assert_close(iou_3d(a, b), iou3)
    torch.testing.assert_close(bev_iou_aligned(a[:50], b), aligned)


def test_shapes_and_errors():
    assert bev_iou(torch.zeros(0, 7), torch.zeros(5, 9)).shape == (0, 5)
    assert iou_3d(torch.zeros(3, 7), torch.zeros(0, 7)).shape == (3, 0)
    assert bev_iou_aligned(torch.zeros(0, 7), torch.zeros(0, 7)).shape == (0,)
    assert points_in_boxes(torch.zeros(0, 3), torch.zeros(2, 7)).shape == (0, 2)
    with pytest.raises(ValueError, match="a: expected shape"):
        bev_iou(torch.zeros(2, 6), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="same number"):
        iou_3d_aligned(torch.zeros(2, 7), torch.zeros(3, 7))
    with pytest.raises(ValueError, match="points"):
        points_in_boxes(torch.zeros(4, 2), torch.zeros(1, 7))


@cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(6)
    a, b = random_boxes(300, gen).float(), random_boxes(200, gen).float()
    points = torch.randn(5000, 3, generator=gen, dtype=torch.float64) * 2  # float64: no ties at faces
    for fn in (bev_iou, iou_3d):
        result = fn(a.cuda(), b.cuda())
        assert result.is_cuda
        torch.testing.assert_close(result.cpu(), fn(a, b), atol=1e-6, rtol=0)
    for fn in (bev_iou_aligned, iou_3d_aligned):
        torch.testing.assert_close(fn(a[:200].cuda(), b.cuda()).cpu(), fn(a[:200], b), atol=1e-6, rtol=0)
    torch.testing.assert_close(boxes_to_corners_3d(a.cuda()).cpu(), boxes_to_corners_3d(a))
    a64 = a.double()
    assert torch.equal(points_in_boxes(points.cuda(), a64.cuda()).cpu(), points_in_boxes(points, a64))


def brute_force_nms(boxes, scores, threshold, pre=None, post=None):
    """Greedy NMS written out pair by pair with shapely's IoU."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:pre]
    keep = []
    for i in order:
        if all(shapely_iou(boxes[j : j + 1], boxes[i : i + 1], False)[0, 0] <= threshold for j in keep):
            keep.append(i)
    return keep[:post]


@pytest.mark.parametrize("threshold,pre,post", [(0.2, None, None), (0.1, 30, None), (0.5, None, 7), (0.0, 25, 10)])
def test_nms_bev_matches_brute_force(threshold, pre, post):
    g = torch.Generator().manual_seed(11)
    boxes = random_boxes(60, g, spread=8.0)
    scores = torch.rand(60, generator=g, dtype=torch.float64)
    scores[5] = scores[9]  # a tie keeps input order
    kept = box_ops.nms_bev(boxes, scores, threshold, pre, post)
    assert kept.dtype == torch.int64
    assert kept.tolist() == brute_force_nms(boxes, scores, threshold, pre, post)
    assert torch.all(scores[kept][:-1] >= scores[kept][1:])


def test_grouped_nms_equals_one_nms_per_group():
    # Overlapping boxes of different groups never suppress each other; each group has its settings.
    g = torch.Generator().manual_seed(12)
    boxes = random_boxes(120, g, spread=6.0)
    scores = torch.rand(120, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 3, (120,), generator=g)
    groups[:5] = 4  # a group without settings: dropped
    thresholds, pre, post = [0.1, 0.3, 0.0, 0.2], [None, 15, 30, 10], [12, None, 5, 3]
    groups[groups == 3] = 0  # group 3 has settings but no box
    expected = [torch.nonzero(groups == k).squeeze(1) for k in range(4)]
    expected = torch.cat([m[box_ops.class_agnostic_nms(scores[m], boxes[m], thresholds[k], pre[k], post[k])]
                          for k, m in enumerate(expected)])
    kept = box_ops.grouped_nms(scores, boxes, groups, thresholds, pre, post)
    assert kept.tolist() == expected.tolist() and len(set(groups[kept].tolist())) == 3


def test_nms_bev_edge_cases():
    empty = box_ops.nms_bev(torch.zeros(0, 7), torch.zeros(0), 0.1)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    same = box(dx=4.0, dy=2.0).repeat(3, 1)
    # Identical boxes (IoU 1) leave the best; IoU equal to the threshold does not suppress.
    assert box_ops.nms_bev(same, torch.tensor([0.1, 0.9, 0.5]), 0.5).tolist() == [1]
    half = torch.cat([box(dx=2.0, dy=2.0), box(x=1.0, dx=2.0, dy=2.0)])  # IoU exactly 1/3
    assert box_ops.nms_bev(half, torch.tensor([0.9, 0.8]), 1 / 3).tolist() == [0, 1]
    assert box_ops.nms_bev(half, torch.tensor([0.9, 0.8]), 0.33).tolist() == [0]
    with pytest.raises(ValueError, match="scores"):
        box_ops.nms_bev(same, torch.zeros(2), 0.5)


def test_class_agnostic_nms_thresholds_scores_first():
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(40, g, spread=6.0)
    scores = torch.rand(40, generator=g, dtype=torch.float64)
    kept = box_ops.class_agnostic_nms(scores, boxes, 0.2, pre_max_size=15, post_max_size=8, score_threshold=0.3)
    candidates = [i for i in range(40) if scores[i] >= 0.3]
    expected = brute_force_nms(boxes[candidates], scores[candidates], 0.2, 15, 8)
    assert kept.tolist() == [candidates[i] for i in expected]
    assert box_ops.class_agnostic_nms(scores, boxes, 0.2).tolist() == box_ops.nms_bev(boxes, scores, 0.2).tolist()


def test_class_specific_nms_per_class_settings():
    g = torch.Generator().manual_seed(5)
    boxes = random_boxes(50, g, spread=6.0)
    scores = torch.rand(50, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (50,), generator=g)  # label 3 has no settings: dropped
    thresholds, pre, low = [0.75, 0.1, 0.3], [100, 5, 100], [0.2, None, 0.5]
    kept = box_ops.class_specific_nms(scores, boxes, labels, thresholds, pre, None, low)
    expected = []
    for k in range(3):
        rows = [i for i in range(50) if labels[i] == k and (low[k] is None or scores[i] > low[k])]
        expected += [rows[i] for i in brute_force_nms(boxes[rows], scores[rows], thresholds[k], pre[k])]
    assert kept.tolist() == expected
    capped = box_ops.class_specific_nms(scores, boxes, labels, thresholds, post_max_sizes=2)
    assert all((labels[capped] == k).sum() <= 2 for k in range(3))
    with pytest.raises(ValueError, match="pre_max_sizes"):
        box_ops.class_specific_nms(scores, boxes, labels, thresholds, [1, 2])
