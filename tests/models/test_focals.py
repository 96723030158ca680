"""Focals Conv: the focal sparse conv against OpenPCDet's (recorded in tests/parity/fixtures/focals_*.pt
by ``python -m tests.parity.make_focals_fixtures``) and against rules written out here, the backbones
and detectors that use it, and its weights through the converter."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from tool_runs import compose_config

from voxsparse.benchmark.parity import compare_to_record
from voxsparse.convert.openpcdet import model_config, model_from_config, openpcdet_to_ours, ours_to_openpcdet
from voxsparse.models.auxiliary import with_auxiliary_losses
from voxsparse.models.backbones.focal import (
    FocalSparseConv,
    VoxelBackBone8xFocal,
    importance_focal_loss,
    in_boxes_openpcdet,
)
from voxsparse.models.heads.center_head import HeadLosses
from voxsparse.ops.sparse_backend import SparseConvTensor
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseVoxels, VoxelGrid

FIXTURES = Path(__file__).resolve().parents[1] / "parity" / "fixtures"
RTOL = 1e-4



def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))


def _sorted(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = indices.long()
    order = (((idx[:, 0] * 1024 + idx[:, 1]) * 1024 + idx[:, 2]) * 1024 + idx[:, 3]).argsort()
    return indices[order].int(), features[order]


def _layer(options: dict, channels: list[int], stride: int) -> FocalSparseConv:
    return FocalSparseConv(
        *channels, stride, kernel_size=options["kernel_size"], topk=options["topk"], threshold=options["threshold"],
        mask_multi=options.get("mask_multi", False), skip_mask_kernel=options.get("skip_mask_kernel", False),
        enlarge_voxel_channels=max(0, options.get("enlarge_voxel_channels", 0)), indice_key="focal",
        bn_eps=1e-3, bn_momentum=0.01, openpcdet_rules=True,
    )


LAYER = torch.load(FIXTURES / "focals_layer.pt", weights_only=True)


def _check_layer_case(fixture: dict, case: str, device: str = "cpu") -> None:
    """Our layer with the case's weights against its record: output voxels and features (eval and
    training), the importance loss and every gradient."""
    record, inputs = fixture["cases"][case], fixture["input"]
    layer = _layer(record["options"], fixture["channels"], fixture["voxel_stride"])
    layer.load_state_dict(record["state"])
    layer.to(device)
    boxes = [frame[frame[:, 3:6].abs().sum(1) > 0, :7].to(device) for frame in inputs["gt_boxes"]]  # no padding rows

    def run(features):
        out = layer(SparseConvTensor(features, inputs["indices"].to(device), inputs["spatial_shape"], 2))
        return SparseConvTensor(out.features.cpu(), out.indices.cpu(), out.spatial_shape, 2)

    layer.eval()
    with torch.no_grad():
        out = run(inputs["features"].to(device))
    indices, features = _sorted(out.indices, out.features)
    assert torch.equal(indices, record["eval"]["indices"])
    assert _rel(features, record["eval"]["features"]) <= RTOL

    layer.train()
    x = inputs["features"].clone().to(device).requires_grad_(True)
    out = run(x)
    loss = layer.importance_loss(boxes).cpu()
    indices, features = _sorted(out.indices, out.features)
    theirs = record["train"]
    assert torch.equal(indices, theirs["indices"])
    assert _rel(features, theirs["features"]) <= RTOL
    assert abs(float(loss.detach()) - theirs["loss"]) <= RTOL * abs(theirs["loss"])
    probe = torch.randn(features.shape, generator=torch.Generator().manual_seed(theirs["probe_seed"]))
    (loss + (features * probe).sum()).backward()
    assert _rel(x.grad.cpu(), theirs["input_grad"]) <= RTOL
    for name, parameter in layer.named_parameters():
        assert _rel(parameter.grad.cpu(), theirs["grads"][name]) <= RTOL, name


@pytest.mark.parametrize("case", sorted(LAYER["cases"]))
def test_layer_matches_openpcdet(case, one_thread):
    _check_layer_case(LAYER, case)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(LAYER["cases"]))
def test_layer_matches_openpcdet_on_cuda(case):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _check_layer_case(LAYER, case, "cuda")


def test_centerpoint_focals_matches_openpcdet(one_thread):
    """The whole reduced detector against OpenPCDet's CenterPoint with VoxelBackBone8xFocal: voxels,
    BEV, 2D BEV, decoded boxes, the training loss and its importance term (1e-4 relative)."""
    from parity.test_fixtures import model_and_inputs  # tests/ is on the path (conftest)

    fixture = torch.load(FIXTURES / "focals_centerpoint_nuscenes.pt", weights_only=True)
    model, inputs = model_and_inputs(fixture)
    result = compare_to_record(model, inputs, fixture["record"], box_tolerance=1e-4)
    assert result.ok(RTOL), result.table()
    assert {r.name for r in result.rows} >= {*fixture["record"]["stages"], "training loss (total)"}
    model.train()
    losses = model.loss(PointBatch.from_frames([inputs.points]), [inputs.annotations])
    theirs = fixture["record"]["loss_terms"]["loss_box_of_pts"]
    assert theirs > 0 and abs(float(losses.importance) - theirs) <= RTOL * theirs


def test_full_size_keys_and_round_trip():
    """Full-size centerpoint_focals_nuscenes: OpenPCDet's parameter counts (recorded from its
    modules), every entry named, and weights through OpenPCDet's layout and back unchanged."""
    torch.manual_seed(0)
    model = instantiate(compose_config("train", ["model=centerpoint_focals_nuscenes", "dataset=nuscenes"]).model)
    counts = {"backbone": (939_328, 93), "neck": (4_576_768, 84), "head": (1_669_510, 331)}
    for part, (parameters, entries) in counts.items():
        module = getattr(model, part)
        assert (sum(p.numel() for p in module.parameters()), len(module.state_dict())) == (parameters, entries), part
    pairs = model.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(model.state_dict())
    theirs = {p.theirs for p in pairs}
    assert {"backbone_3d.conv1.1.conv_imp.weight", "backbone_3d.conv3.3.bn1.num_batches_tracked",
            "backbone_3d.conv_out.0.weight"} <= theirs
    state = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    back, report = openpcdet_to_ours(model, ours_to_openpcdet(model, state))
    assert not report.unmapped and not report.missing
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def _brute_force_union(coords, p, q, offsets, shape, topk, threshold, low):
    """The voxels a focal layer convolves, by its rules one voxel at a time."""
    cells = {tuple(c) for c in coords.tolist()}
    for b in sorted({c[0] for c in coords.tolist()}):
        rows = [i for i, c in enumerate(coords.tolist()) if c[0] == b]
        if topk:
            ranked = sorted(rows, key=lambda i: -float(p[i]))
            important = ranked[: int(len(rows) * threshold)]
        else:
            important = [i for i in rows if p[i] > threshold]
        for i in important:
            for k, offset in enumerate(offsets.tolist()):
                cell = [coords[i, 1 + d].item() + offset[d] for d in range(3)]
                if q[i, k] >= threshold and all(low <= cell[d] < shape[d] for d in range(3)):
                    cells.add((b, *cell))
    return sorted(cells)


@pytest.mark.parametrize("openpcdet_rules", [False, True])
@pytest.mark.parametrize("topk", [True, False])
def test_dilation_follows_the_rules(openpcdet_rules, topk):
    """Dilated voxels by the rules written out (index 0 reachable unless OpenPCDet's rules)."""
    torch.manual_seed(0)
    shape = [4, 6, 6]
    coords = torch.unique(torch.stack([torch.randint(0, 2, (60,)), *(torch.randint(0, n, (60,)) for n in shape)], 1), dim=0)
    layer = FocalSparseConv(3, 4, 1, topk=topk, threshold=0.5, openpcdet_rules=openpcdet_rules).eval()
    x = SparseConvTensor(torch.randn(len(coords), 3), coords.int(), shape, 2)
    with torch.no_grad():
        logits = layer.conv_imp(x).features
        out = layer(x)
    p, q = torch.sigmoid(logits[:, -1]), torch.sigmoid(logits[:, :-1])
    expected = _brute_force_union(coords, p, q, layer.offsets, shape, topk, 0.5, 1 if openpcdet_rules else 0)
    assert out.indices.tolist() == [list(c) for c in expected]  # sorted by (b, z, y, x)
    assert len(expected) > len(coords)


def test_importance_loss_targets_voxel_centres():
    """The design's targets: voxel centres at the layer's stride on the model's grid, closed boxes;
    the loss is the two-class focal loss of Focals Conv."""
    grid = VoxelGrid((0.5, 0.5, 1.0), (-2.0, -2.0, -1.0, 2.0, 2.0, 1.0))
    coords = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=torch.int32)
    layer = FocalSparseConv(2, 2, voxel_stride=2)
    x = SparseConvTensor(torch.randn(4, 2), coords, [2, 4, 4], 2)
    layer(x, grid)
    logits = layer.last_importance.logits.detach()
    # Centres at stride 2: x = (2 i + 0.5) * 0.5 - 2, likewise y; z = (2 i + 0.5) * 1 - 1.
    box_a = torch.tensor([[-1.75, -1.75, -0.5, 0.2, 0.2, 0.2, 0.0]])  # the first voxel's centre
    box_b = torch.tensor([[-1.75, -0.75, 1.5, 0.1, 0.1, 0.1, 0.3]])  # frame 1's first voxel: (b 1, z 1, y 1, x 0)
    loss = layer.importance_loss([box_a, box_b])
    expected = importance_focal_loss(logits, torch.tensor([True, False, True, False]))
    torch.testing.assert_close(loss, expected)
    assert layer.importance_loss([box_a, box_b]) == 0  # consumed

    p = torch.sigmoid(logits)
    target = torch.tensor([1, 0, 1, 0])
    two = torch.softmax(torch.stack([1 - p, p], 1), 1)
    picked = two[torch.arange(4), target]
    formula = (-torch.log(picked) * (1 - picked) ** 2).sum() / 8
    torch.testing.assert_close(expected, formula)


def test_openpcdet_box_rule():
    """roiaware's test: x and y faces open by 1e-5 m outside, z closed, headings rotate the box."""
    box = torch.tensor([[1.0, 2.0, 0.0, 2.0, 1.0, 1.0, 0.0]])
    points = torch.tensor([[2.0 + 5e-6, 2.0, 0.0], [2.0 + 3e-5, 2.0, 0.0], [1.0, 2.0, 0.5], [1.0, 2.0, 0.5001],
                           [1.0, 2.9, 0.0]])
    assert in_boxes_openpcdet(points, box).tolist() == [True, False, True, False, False]
    turned = torch.tensor([[1.0, 2.0, 0.0, 2.0, 1.0, 1.0, math.pi / 2]])
    assert in_boxes_openpcdet(points, turned).tolist() == [False, False, True, False, True]


def _cropped_batch(seed: int = 4, keep: float = 0.15):
    """Two synthetic frames, a random ``keep`` share of their points (fast on the CPU)."""
    from voxsparse.data.synthetic import generate_frame

    gen = torch.Generator().manual_seed(seed)
    frames, annotations = [], []
    for index in range(2):
        frame = generate_frame(seed + index)
        points = torch.from_numpy(frame.points).float()
        points = points[torch.rand(len(points), generator=gen) < keep]
        frames.append(points[:, :4])
        k = len(frame.boxes)
        annotations.append(Annotations3D(Boxes3D(torch.from_numpy(frame.boxes[:, :7]).float()),
                                         torch.from_numpy(frame.labels).long(), torch.ones(k, dtype=torch.int64),
                                         torch.ones(k, dtype=torch.int64), torch.arange(k)))
    return PointBatch.from_frames(frames), annotations


def test_voxelnext_focals_small_trains_and_predicts(one_thread):
    """The focal option of VoxelNeXtBackbone: the importance term joins the losses and every
    focal parameter gets a gradient; an empty frame gives an empty BEV; without the option nothing
    changes (no parameters, the head's own losses)."""
    torch.manual_seed(0)
    points, annotations = _cropped_batch()
    model = model_from_config(model_config("voxelnext_focals_small")).train()  # through load_model's allow-list
    assert sorted(model.backbone.focal) == ["1", "2"]
    losses = model(points, annotations)
    assert float(losses.importance) > 0
    assert torch.isfinite(losses.total) and float(losses.total) > float(losses.importance)
    losses.total.backward()
    for name, parameter in model.backbone.focal.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    with torch.no_grad():
        detections = model.eval().predict(points)
        empty = PointBatch(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2)
        bev = model.backbone(model.voxel_encoder(empty))
    assert len(detections) == 2 and bev.features.shape == (0, model.backbone.out_channels)
    assert model.backbone.auxiliary_losses(annotations)["importance"] == 0  # nothing recorded for no voxels

    plain = instantiate(compose_config("train", ["model=voxelnext_small"]).model)
    assert not any("focal" in k for k in plain.state_dict()) and plain.backbone.auxiliary_losses(annotations) == {}
    assert type(plain.train()(points, annotations)) is HeadLosses
    assert plain.backbone._plain()  # the index-first path stays on


def test_reference_backbone_runs_on_an_empty_batch():
    grid = VoxelGrid((0.075, 0.075, 0.2), (-3.0, -3.0, -5.0, 3.0, 3.0, 3.0))
    backbone = VoxelBackBone8xFocal(5)
    voxels = SparseVoxels(torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, 5), grid, 2)
    bev = backbone(voxels)
    assert bev.features.shape == (0, 256) and bev.stride == 8
    assert backbone.auxiliary_losses([])["importance"] == 0


@pytest.mark.skipif(not os.environ.get("VOXSPARSE_OPENPCDET"), reason="VOXSPARSE_OPENPCDET names no OpenPCDet checkout")
def test_layer_matches_openpcdet_live(one_thread):
    """The layer cases run live in OpenPCDet's code (the fixture's generator) and compared."""
    from tests.parity.make_focals_fixtures import REDUCED, build_focal_reference, make_layer_fixture

    _, module = build_focal_reference(Path(os.environ["VOXSPARSE_OPENPCDET"]), REDUCED, 0)
    live = make_layer_fixture(module, seed=3)
    for case in live["cases"]:
        _check_layer_case(live, case)


def test_auxiliary_losses_join_the_head_losses():
    one = torch.tensor(1.0, requires_grad=True)
    head = HeadLosses(total=2 * one, heatmap=one.detach(), regression=one.detach(), iou=one.detach() * 0, num_positives=3)
    assert with_auxiliary_losses(head, {}) is head
    losses = with_auxiliary_losses(head, {"importance": 0.5 * one})
    assert isinstance(losses, HeadLosses) and float(losses.total) == 2.5 and float(losses.importance) == 0.5
    assert [f.name for f in dataclasses.fields(losses)][-1] == "importance"
    losses.total.backward()
    assert float(one.grad) == 2.5 and not losses.importance.requires_grad
    with pytest.raises(ValueError, match="heatmap"):
        with_auxiliary_losses(head, {"heatmap": one})
