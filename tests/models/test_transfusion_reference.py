"""The TransFusion head against the DSVT repository's ``TransFusionHead``, and CPU checks without it.

Tests marked ``reference`` load the DSVT checkout's head by path (skipped unless ``VOXSPARSE_DSVT``
names the checkout): reduced widths (a 24 x 24 map; the reference needs 128 hidden channels),
random weights and BatchNorm statistics, the same dense BEV input; predictions, Hungarian
assignment, targets, losses and decoded boxes must agree. Its compiled box-overlap and NMS kernels
are replaced by shapely polygons and a greedy loop, and its ``.cuda()`` calls by no-ops.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from voxsparse.models.heads.transfusion import TransFusionHead, TransFusionPredictions
from voxsparse.models.heads.transfusion_assigner import HungarianAssigner, bottom_z_iou_3d, hungarian_match
from voxsparse.ops.boxes import iou_3d
from voxsparse.structures import Annotations3D, Boxes3D, DenseBEV, VoxelGrid

#: The reference config's CLASS_NAMES: the order of the heatmap channels.
REFERENCE_CLASSES = [
    "car", "truck", "construction_vehicle", "bus", "trailer",
    "barrier", "motorcycle", "bicycle", "pedestrian", "traffic_cone",
]
#: Another label order (the nuScenes devkit's), to check the mapping of labels to channels.
MODEL_CLASSES = [
    "car", "truck", "bus", "trailer", "construction_vehicle",
    "pedestrian", "motorcycle", "bicycle", "traffic_cone", "barrier",
]
#: Parameters of the reference's whole detector (vfe, backbone_3d, backbone_2d, dense_head) at full size.
REFERENCE_DETECTOR_PARAMETERS = {"voxel_encoder": 17_472, "backbone": 1_200_128, "neck": 5_004_544, "head": 896_415}
#: Parameters of the reference's head at full size (DENSE_HEAD of dsvt_plain_1f_onestage_nusences.yaml
#: on BaseBEVResBackbone's 384 channels), counted from the DSVT repository's module.
REFERENCE_PARAMETERS = 896_415

DSVT_ROOT = os.environ.get("VOXSPARSE_DSVT")
reference = pytest.mark.skipif(not DSVT_ROOT, reason="set VOXSPARSE_DSVT to a DSVT repository checkout")

GRID = VoxelGrid((0.3, 0.3, 8.0), (-7.2, -7.2, -5.0, 7.2, 7.2, 3.0))  # 48 x 48 pillars, a 24 x 24 map
STRIDE = 2
POST_CENTER_RANGE = [-5.0, -5.0, -10.0, 5.0, 5.0, 10.0]


def _head(in_channels: int = 32, **overrides) -> TransFusionHead:
    kwargs = {
        "class_names": MODEL_CLASSES,
        "channel_classes": REFERENCE_CLASSES,
        "num_proposals": 30,
        "ffn_channels": 64,
        "every_cell_classes": ["pedestrian", "traffic_cone"],
        "post_center_range": POST_CENTER_RANGE,
        "nms_thresholds": {"pedestrian": 0.175, "traffic_cone": 0.175},
    }
    kwargs.update(overrides)
    return TransFusionHead(in_channels, 10, **kwargs)


def _annotations(boxes: torch.Tensor, names: list[str]) -> Annotations3D:
    n = len(boxes)
    labels = torch.tensor([MODEL_CLASSES.index(name) for name in names], dtype=torch.int64)
    ones = torch.ones(n, dtype=torch.int64)
    return Annotations3D(Boxes3D(boxes), labels, ones, ones, torch.arange(n))


# --- CPU tests without the checkout ---------------------------------------------------------------
def test_parameter_count_equals_the_full_size_reference():
    head = TransFusionHead(384, 10, class_names=REFERENCE_CLASSES, every_cell_classes=["pedestrian", "traffic_cone"])
    assert sum(p.numel() for p in head.parameters()) == REFERENCE_PARAMETERS


def test_the_config_builds_the_reference_architecture():
    from omegaconf import OmegaConf
    from tool_runs import compose_config

    from voxsparse.engine.build import build_model

    cfg = compose_config("train", ["model=dsvt_pillar_nuscenes", "dataset=nuscenes"])
    model = build_model(OmegaConf.to_container(cfg.model, resolve=True))  # as a checkpoint's config is built
    counts = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in REFERENCE_DETECTOR_PARAMETERS}
    assert counts == REFERENCE_DETECTOR_PARAMETERS
    assert list(model.head.channel_classes) == REFERENCE_CLASSES
    assert [model.head.channel_classes[c] for c in model.head.label_to_channel] == list(model.class_names)
    pairs = model.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(model.state_dict())


def test_openpcdet_keys_name_every_entry_once():
    head = _head()
    pairs = head.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(head.state_dict())
    assert len({p.theirs for p in pairs}) == len(pairs)


def _brute_force_cost(cost: np.ndarray) -> float:
    """Minimum total cost over every one-to-one matching of min(P, G) pairs."""
    p, g = cost.shape
    if p >= g:
        return min(sum(cost[r, c] for c, r in enumerate(rows)) for rows in itertools.permutations(range(p), g))
    return min(sum(cost[r, c] for r, c in enumerate(cols)) for cols in itertools.permutations(range(g), p))


@pytest.mark.parametrize("shape", [(6, 3), (5, 5), (3, 5), (7, 1)])
def test_hungarian_match_is_the_minimum_cost_matching(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
        rows, cols = hungarian_match(cost)
        assert len(rows) == min(shape) and len(set(rows.tolist())) == len(set(cols.tolist())) == min(shape)
        assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force_cost(cost.numpy()), abs=1e-5)


def test_bottom_z_iou_is_the_iou_of_boxes_raised_by_half_their_height():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(6, 3, generator=g) * 2, torch.rand(6, 3, generator=g) + 0.5, torch.rand(6, 1, generator=g) * 3], 1)
    b = a[torch.randperm(6, generator=g)] + torch.randn(6, 7, generator=g) * 0.2
    raised = lambda t: torch.cat([t[:, :2], t[:, 2:3] + t[:, 5:6] / 2, t[:, 3:]], 1)
    torch.testing.assert_close(bottom_z_iou_3d(a, b), iou_3d(raised(a), raised(b)), atol=1e-6, rtol=0)


def test_assignment_matches_each_box_to_the_proposal_on_it():
    boxes = torch.tensor([[0.0, 0, 0, 4, 2, 1.5, 0], [5, 5, 0, 1, 1, 2, 1], [-3, 2, 0, 2, 2, 2, 0]])
    proposals = torch.cat([boxes[[2, 0, 1]] + 0.05, boxes[:1] + 3.0])
    logits = torch.zeros(4, 10)
    result = HungarianAssigner().assign(proposals, boxes, torch.tensor([0, 8, 1]), logits, (-8, -8, -5, 8, 8, 3))
    assert result.gt_index.tolist() == [2, 0, 1, -1]
    assert result.positive.tolist() == [0, 1, 2] and bool((result.iou[:3] > 0.5).all()) and result.iou[3] == 0


def _bev(batch: int = 2, channels: int = 32, seed: int = 0) -> DenseBEV:
    g = torch.Generator().manual_seed(seed)
    return DenseBEV(torch.randn(batch, channels, 24, 24, generator=g), STRIDE, GRID)


def test_labels_map_to_channels_by_name():
    torch.manual_seed(0)
    head = _head().train()
    pred = head(_bev())
    boxes = torch.tensor([[1.0, 1.0, 0.0, 0.8, 0.8, 1.7, 0.0, 0.0, 0.0], [-3.0, 2.0, 0.0, 4.0, 2.0, 1.5, 0.5, 1.0, 0.0]])
    annotations = [_annotations(boxes, ["pedestrian", "bus"]), _annotations(boxes[1:], ["barrier"])]
    targets = head.assign_targets(pred, annotations)
    ped, bus, barrier = (REFERENCE_CLASSES.index(n) for n in ("pedestrian", "bus", "barrier"))
    assert sorted(targets.labels[0][targets.positive[0]].tolist()) == sorted([ped, bus])
    assert targets.labels[1][targets.positive[1]].tolist() == [barrier]
    peaks = [(i, c) for i, c in zip(*torch.nonzero(targets.heatmap.eq(1).any(-1).any(-1), as_tuple=True))]
    assert sorted((int(i), int(c)) for i, c in peaks) == sorted([(0, ped), (0, bus), (1, barrier)])
    # background everywhere else, and every proposal is either matched or background
    assert int(targets.positive.sum()) == 3 and bool((targets.labels[~targets.positive] == 10).all())


def test_contract_forward_loss_backward_decode_and_empty_frames():
    torch.manual_seed(0)
    head = _head(key_radius=5).train()
    pred = head(_bev())
    boxes = torch.tensor([[1.0, 1.0, 0.0, 0.8, 0.8, 1.7, 0.0, 0.0, 0.0]])
    empty = _annotations(torch.zeros(0, 9), [])
    losses = head.loss(pred, [_annotations(boxes, ["pedestrian"]), empty])
    for name in ("total", "heatmap", "classification", "regression", "iou"):
        assert getattr(losses, name).ndim == 0 and torch.isfinite(getattr(losses, name))
    losses.total.backward()
    assert all(p.grad is not None for p in head.parameters())  # every output takes part (DDP needs it)
    head.eval()
    with torch.no_grad():
        detections = head.decode(head(_bev()))
    assert len(detections) == 2
    for d in detections:
        assert torch.all(d.scores[:-1] >= d.scores[1:]) and d.boxes.tensor.shape[1] == 9
        assert int(d.labels.max()) < 10


def _predictions(boxes: torch.Tensor, channels: list[int], score: float = 0.5) -> TransFusionPredictions:
    """Predictions of one frame whose proposals decode to ``boxes`` (P, 9) with the given channels."""
    p = len(boxes)
    cell = STRIDE * GRID.voxel_size[0]
    center = ((boxes[:, :2] - torch.tensor(GRID.point_cloud_range[:2])) / cell).T[None]
    heatmap = torch.full((1, 10, p), -20.0)
    heatmap[0, channels, torch.arange(p)] = 0.0
    query_score = torch.zeros(1, 10, p)
    query_score[0, channels, torch.arange(p)] = score
    return TransFusionPredictions(
        center=center,
        height=(boxes[:, 2] + boxes[:, 5] / 2)[None, None],
        dim=boxes[:, 3:6].log().T[None],
        rot=torch.stack([boxes[:, 6].sin(), boxes[:, 6].cos()])[None],
        vel=boxes[:, 7:9].T[None],
        iou=torch.ones(1, 1, p),
        heatmap=heatmap,
        query_heatmap_score=query_score,
        query_channel=torch.tensor([channels]),
        query_cell=torch.zeros(1, p, dtype=torch.int64),
        dense_heatmap=torch.zeros(1, 10, 24, 24),
        point_cloud_range=GRID.point_cloud_range,
        voxel_xy=GRID.voxel_size[:2],
        stride=STRIDE,
    )


def test_decode_suppresses_only_the_classes_with_nms_and_keeps_the_range():
    box = torch.tensor([1.0, 1.0, 0.0, 0.8, 0.8, 1.7, 0.0, 0.0, 0.0])
    far = box.clone()
    far[0] = 7.9  # inside the map, outside post_center_range at 7.5
    boxes = torch.stack([box, box + 0.01, box, box + 0.01, far])
    car, ped = REFERENCE_CLASSES.index("car"), REFERENCE_CLASSES.index("pedestrian")
    head = _head(post_center_range=[-7.5, -7.5, -10.0, 7.5, 7.5, 10.0]).eval()
    (d,) = head.decode(_predictions(boxes, [ped, ped, car, car, car]))
    names = [MODEL_CLASSES[k] for k in d.labels.tolist()]
    assert sorted(names) == ["car", "car", "pedestrian"]
    # score = (sigmoid(0) * 0.5) ** 0.5 * 1 ** 0.5 with the IoU branch at 1
    torch.testing.assert_close(d.scores, torch.full((3,), 0.5))


# --- against the DSVT repository --------------------------------------------------------------------
class _Cfg(dict):
    """EasyDict's attribute access, which the reference head uses on its config."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error

    def __setattr__(self, name, value):
        self[name] = value


def _cfg(value):
    return _Cfg({k: _cfg(v) for k, v in value.items()}) if isinstance(value, dict) else value


def _corners(box: np.ndarray) -> np.ndarray:
    x, y, dx, dy, heading = box[0], box[1], box[3], box[4], box[6]
    local = np.array([[dx, dy], [-dx, dy], [-dx, -dy], [dx, -dy]]) / 2
    c, s = np.cos(heading), np.sin(heading)
    return local @ np.array([[c, s], [-s, c]]) + [x, y]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    from shapely.geometry import Polygon

    return Polygon(_corners(a)).intersection(Polygon(_corners(b))).area


def _boxes_overlap_bev(a, b, out):
    a, b = a.double().numpy(), b.double().numpy()
    out.copy_(torch.tensor([[_overlap(x, y) for y in b] for x in a], dtype=out.dtype).reshape(out.shape))


def _paired_overlap_bev(a, b, out):
    a, b = a.double().numpy(), b.double().numpy()
    out.copy_(torch.tensor([_overlap(x, y) for x, y in zip(a, b)], dtype=out.dtype).reshape(out.shape))


def _nms_kernel(boxes, keep, thresh):
    """Greedy NMS over boxes already in score order: suppress where BEV IoU > thresh."""
    b = boxes.double().numpy()
    area = b[:, 3] * b[:, 4]
    kept: list[int] = []
    for i in range(len(b)):
        if all(_overlap(b[i], b[j]) / (area[i] + area[j] - _overlap(b[i], b[j])) <= thresh for j in kept):
            kept.append(i)
    keep[: len(kept)] = torch.tensor(kept, dtype=keep.dtype)
    return len(kept)


REFERENCE_SOURCES = {
    "pcdet.ops.iou3d_nms.iou3d_nms_utils": "pcdet/ops/iou3d_nms/iou3d_nms_utils.py",
    "pcdet.utils.loss_utils": "pcdet/utils/loss_utils.py",
    "pcdet.models.model_utils.centernet_utils": "pcdet/models/model_utils/centernet_utils.py",
    "pcdet.models.model_utils.model_nms_utils": "pcdet/models/model_utils/model_nms_utils.py",
    "pcdet.models.model_utils.transfusion_utils": "pcdet/models/model_utils/transfusion_utils.py",
    "pcdet.models.model_utils.basic_block_2d": "pcdet/models/model_utils/basic_block_2d.py",
    "pcdet.models.dense_heads.target_assigner.hungarian_assigner":
        "pcdet/models/dense_heads/target_assigner/hungarian_assigner.py",
    "pcdet.models.dense_heads.transfusion_head": "pcdet/models/dense_heads/transfusion_head.py",
}


def _load_reference_head(root: Path):
    """The reference ``TransFusionHead`` class, its sources executed by path under stub packages;
    ``sys.modules`` is restored afterwards (the loaded modules keep what they imported)."""
    saved = dict(sys.modules)
    stubs = {
        "pcdet.ops.iou3d_nms.iou3d_nms_cuda": {
            "boxes_overlap_bev_gpu": _boxes_overlap_bev,
            "paired_boxes_overlap_bev_gpu": _paired_overlap_bev,
            "nms_gpu": _nms_kernel,
        },
        "pcdet.ops.ioubev_nms.ioubev_nms_utils": {},
        "pcdet.utils.common_utils": {},
        "pcdet.utils.box_utils": {},
        "numba": {"jit": lambda *a, **k: (lambda f: f)},
    }
    try:
        for name, attributes in stubs.items():
            _stub_parents(root, name)
            module = types.ModuleType(name)
            module.__dict__.update(attributes)
            sys.modules[name] = module
        loaded = {}
        for name, relative in REFERENCE_SOURCES.items():
            _stub_parents(root, name)
            spec = importlib.util.spec_from_file_location(name, root / relative)
            loaded[name] = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded[name]
            spec.loader.exec_module(loaded[name])
        # Its paired IoU allocates with torch.cuda.FloatTensor: a CPU tensor here.
        cpu_torch = types.ModuleType("torch")
        cpu_torch.__dict__.update(torch.__dict__)
        cpu_torch.cuda = types.SimpleNamespace(FloatTensor=lambda size: torch.zeros(size))
        loaded["pcdet.ops.iou3d_nms.iou3d_nms_utils"].torch = cpu_torch
        return loaded["pcdet.models.dense_heads.transfusion_head"].TransFusionHead
    finally:
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]
        sys.modules.update(saved)


def _stub_parents(root: Path, name: str) -> None:
    parts = name.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if package not in sys.modules:
            stub = types.ModuleType(package)
            stub.__path__ = [str(root / package.replace(".", "/"))]
            sys.modules[package] = stub


def _reference_config(root: Path) -> dict:
    import yaml

    cfg = yaml.safe_load((root / "tools/cfgs/dsvt_models/dsvt_plain_1f_onestage_nusences.yaml").read_text())
    head = cfg["MODEL"]["DENSE_HEAD"]
    head["NUM_PROPOSALS"] = 30
    head["FFN_CHANNEL"] = 64
    head["POST_PROCESSING"]["POST_CENTER_RANGE"] = POST_CENTER_RANGE
    return head


@pytest.fixture(scope="module")
def pair():
    """(reference head, our head) with the same random weights and BatchNorm statistics."""
    root = Path(DSVT_ROOT)
    ref_cls = _load_reference_head(root)
    torch.manual_seed(1)
    ref = ref_cls(
        _cfg(_reference_config(root)), 32, 10, REFERENCE_CLASSES, np.array([48, 48, 1]),
        np.array(GRID.point_cloud_range, dtype=np.float32), list(GRID.voxel_size),
    )
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=g) * 0.1)
        # More pedestrian and cone proposals (no local max for them) and larger boxes, so that the
        # NMS of those classes suppresses some.
        ref.heatmap_head[1].bias[[8, 9]] += torch.tensor([0.3, 0.1])
        ref.prediction_head.dim[1].bias += 1.5
    ours = _head()
    theirs = ref.state_dict()
    ours.load_state_dict({p.ours: theirs[p.theirs] for p in ours.openpcdet_keys()})
    return ref, ours


def _ref_predict(ref, bev: DenseBEV) -> dict:
    return ref.predict(bev.features.permute(0, 1, 3, 2).contiguous())


def _assert_predictions(res: dict, pred: TransFusionPredictions) -> None:
    close = {"rtol": 1e-5, "atol": 1e-5}
    assert torch.equal(res["query_labels"], pred.query_channel)
    for name in ("center", "height", "dim", "rot", "vel", "iou", "heatmap", "query_heatmap_score", "dense_heatmap"):
        torch.testing.assert_close(getattr(pred, name), res[name], **close, msg=name)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


@reference
def test_eval_predictions_and_decoded_boxes_equal_the_reference(pair, no_cuda):
    ref, ours = pair
    ref.eval()
    ours.eval()
    bev = _bev()
    with torch.no_grad():
        res = _ref_predict(ref, bev)
        res["query_labels"] = ref.query_labels
        pred = ours(bev)
        _assert_predictions(res, pred)
        expected = ref.get_bboxes({k: v.clone() for k, v in res.items()})
        detections = ours.decode(pred)
    for want, got in zip(expected, detections):
        order = torch.argsort(want["pred_scores"], descending=True, stable=True)
        assert len(got) == len(order) > 0
        torch.testing.assert_close(got.scores, want["pred_scores"][order], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.boxes.tensor, want["pred_boxes"][order], rtol=1e-5, atol=1e-5)
        names = [REFERENCE_CLASSES[k - 1] for k in want["pred_labels"][order].tolist()]
        assert [MODEL_CLASSES[k] for k in got.labels.tolist()] == names


def _ground_truth(boxes: torch.Tensor, channels: torch.Tensor, pick: list[int], seed: int) -> torch.Tensor:
    """(G, 10) boxes near some decoded proposals (so matched IoUs are non-zero), label 1-based last."""
    g = torch.Generator().manual_seed(seed)
    chosen = boxes[pick].clone()
    chosen[:, :2] += torch.randn(len(pick), 2, generator=g) * 0.1
    chosen[:, 3:6] *= 1 + torch.rand(len(pick), 3, generator=g) * 0.2
    chosen[:, 7:9] = torch.randn(len(pick), 2, generator=g)
    return torch.cat([chosen, (channels[pick] + 1).float()[:, None]], 1)


@reference
def test_training_targets_and_losses_equal_the_reference(pair, no_cuda):
    ref, ours = pair
    ref.train()
    ours.train()
    bev = _bev(seed=3)
    with torch.no_grad():
        res = _ref_predict(ref, bev)
        decoded = ref.decode_bbox(*[res[k].clone() for k in ("heatmap", "rot", "dim", "center", "height", "vel")])
    gt = torch.stack(
        [
            _ground_truth(decoded[0]["pred_boxes"], ref.query_labels[0], [0, 3, 7, 12], seed=4),
            _ground_truth(decoded[1]["pred_boxes"], ref.query_labels[1], [1, 2, 5, 20], seed=5),
        ]
    )
    gt[1, 3] = 0  # padding row of the reference's batch: skipped as an empty box
    annotations = []
    for frame in gt:
        frame = frame[frame[:, 3] > 0]
        names = [REFERENCE_CLASSES[int(k) - 1] for k in frame[:, -1]]
        annotations.append(_annotations(frame[:, :9], names))

    res = _ref_predict(ref, bev)
    pred = ours(bev)
    _assert_predictions({**res, "query_labels": ref.query_labels}, pred)

    labels, _, box_targets, box_weights, num_pos, _, heatmap = ref.get_targets(
        gt[..., :-1], gt[..., -1].long() - 1, {k: v.detach() for k, v in res.items()}
    )
    targets = ours.assign_targets(pred, annotations)
    assert torch.equal(targets.labels.reshape(-1), labels.reshape(-1))
    assert torch.equal(targets.positive, box_weights[..., 0] > 0) and int(targets.positive.sum()) == num_pos == 7
    torch.testing.assert_close(targets.box_codes, box_targets, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.heatmap, heatmap, rtol=0, atol=1e-7)

    loss, tb = ref.loss(gt[..., :-1], gt[..., -1].long() - 1, res)
    losses = ours.loss(pred, annotations)
    assert tb["loss_iou"] > 0
    for ours_name, theirs in (("heatmap", "loss_heatmap"), ("classification", "loss_cls"),
                              ("regression", "loss_bbox"), ("iou", "loss_iou")):
        assert float(getattr(losses, ours_name)) == pytest.approx(tb[theirs], rel=1e-5, abs=1e-6), ours_name
    assert float(losses.matched_iou) == pytest.approx(float(tb["matched_ious"]), rel=1e-5, abs=1e-6)
    assert float(losses.total) == pytest.approx(float(loss), rel=1e-5)
    loss.backward()
    losses.total.backward()
    theirs_grad = {n: p.grad for n, p in ref.named_parameters()}
    for p in ours.openpcdet_keys():
        param = dict(ours.named_parameters()).get(p.ours)
        if param is not None and theirs_grad.get(p.theirs) is not None:
            torch.testing.assert_close(param.grad, theirs_grad[p.theirs], rtol=1e-4, atol=1e-5, msg=p.ours)


@reference
def test_reference_parameter_count(pair):
    root = Path(DSVT_ROOT)
    cfg = _cfg(_reference_config(root))
    cfg.NUM_PROPOSALS, cfg.FFN_CHANNEL = 200, 256
    full = type(pair[0])(cfg, 384, 10, REFERENCE_CLASSES, np.array([360, 360, 1]),
                         np.array([-54.0, -54.0, -5.0, 54.0, 54.0, 3.0], dtype=np.float32), [0.3, 0.3, 8.0])
    assert sum(p.numel() for p in full.parameters()) == REFERENCE_PARAMETERS
