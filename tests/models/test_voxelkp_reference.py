"""The reference VoxelKP (``configs/model/voxelkp_waymo_reference.yaml``) computes what the authors'
code computes (github.com/shijianjian/VoxelKP, ``kp_effv2next4_voxelnext_iou_aug_bev_channel.yaml``).

On synthetic scans with keypoint-labelled humans, at reduced widths with random weights and
BatchNorm statistics, in float32: backbone BEV in eval and in training mode (batch statistics), and
in eval mode head outputs, targets (heatmap, box code, keypoints), every loss term and the decoded
boxes and keypoints, against

- the authors' modules, executed by path from a checkout (``VOXSPARSE_VOXELKP``; skipped without);
- a fixture recorded from them (``tests/parity/fixtures/voxelkp_reference.pt``), always. Written by
  this file, from the repository root: ``VOXSPARSE_VOXELKP=/path/to/VoxelKP PYTHONPATH=. python
  tests/models/test_voxelkp_reference.py``.

The harness replaces what does not run on a CPU without the authors' build: SpTr (a git submodule of
their repository, empty in a plain checkout; compiled CUDA kernels) by
:class:`~voxsparse.benchmark.voxelkp.SpTrStandIn` (its
``VarLengthMultiheadSA`` without positional terms: windows of ``torch_geometric.voxel_grid`` with no
start, i.e. from the per-axis minimum index of the batch, and softmax attention per window, as a loop),
``timm``'s ``DropPath`` / ``trunc_normal_``, and OpenPCDet's compiled NMS and IoU (voxsparse's
stand-ins in :mod:`voxsparse.benchmark.openpcdet`). The authors' merged head has no training path;
its targets come from its own ``assign_target_of_single_head`` and its losses from its base class's
``get_loss`` on the merged outputs (see :mod:`voxsparse.models.voxelkp.reference_head`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from voxsparse.benchmark import openpcdet as harness
from voxsparse.benchmark.voxelkp import build_authors as build_authors_modules
from voxsparse.data.synthetic.actors import CLASS_NAMES as SYNTHETIC_CLASSES
from voxsparse.data.synthetic.frame import generate_frame
from voxsparse.data.synthetic.lidar import LidarConfig
from voxsparse.data.synthetic.scene import SceneConfig
from voxsparse.models.keys import TensorKind
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.models.voxelkp.reference import VoxelKPReferenceBackbone, window_index
from voxsparse.models.voxelkp.reference_head import VoxelKPReferenceHead
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseBEV, SparseVoxels, VoxelGrid

# One torch thread for every test here (tests/conftest.py: one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parents[1] / "parity" / "fixtures" / "voxelkp_reference.pt"
RANGE = (-9.6, -9.6, -2.0, 9.6, 9.6, 4.0)
GRID = VoxelGrid((0.1, 0.1, 0.1), RANGE)  # 192 x 192 x 60: the Waymo config's z, 61 cells in the backbone
CLASSES = ("Pedestrian", "Cyclist")
CHANNELS, OUT = (8, 8, 16, 16, 16), 16
HEAD = {"score_threshold": 0.1, "max_obj_per_sample": 60, "post_center_limit_range": RANGE}
#: Parameters of the full-size modules, counted on the authors' classes (backbone_3d., dense_head.).
FULL_SIZE_PARAMETERS = {"backbone": 100_459_744, "head": 10_651_458}


# ---------------------------------------------------------------- the authors' modules, by path


def authors_overrides(channels=CHANNELS, out=OUT) -> dict:
    return {
        "MODEL.BACKBONE_3D.CHANNELS": list(channels), "MODEL.BACKBONE_3D.OUT_CHANNEL": out,
        "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": out, "MODEL.DENSE_HEAD.INPUT_FEATURES": out,
        "MODEL.DENSE_HEAD.POST_PROCESSING.SCORE_THRESH": HEAD["score_threshold"],
        "MODEL.DENSE_HEAD.POST_PROCESSING.MAX_OBJ_PER_SAMPLE": HEAD["max_obj_per_sample"],
        "MODEL.DENSE_HEAD.POST_PROCESSING.POST_CENTER_LIMIT_RANGE": list(RANGE),
    }


def build_authors(root: Path, grid: VoxelGrid = GRID, channels=CHANNELS, out=OUT) -> tuple[nn.Module, nn.Module]:
    return build_authors_modules(root, grid, CLASSES, authors_overrides(channels, out))


def state_spec(module: nn.Module) -> list[list]:
    """The (name, shape, floating) of each state-dict entry, in order: what :func:`random_state` needs."""
    return [[name, list(t.shape), t.is_floating_point()] for name, t in module.state_dict().items()]


def random_state(spec: list[list], seed: int) -> dict[str, torch.Tensor]:
    """Random weights, biases and BatchNorm statistics for ``spec`` (eval-mode outputs depend on all
    of them); other entries zero. A function of ``spec`` and ``seed`` only, so a fixture need not
    hold the weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, floating in spec:
        if not floating:
            state[name] = torch.zeros(shape, dtype=torch.int64)
        elif name.endswith("running_var") or (name.endswith("weight") and len(shape) == 1):  # norms
            state[name] = 0.5 + torch.rand(shape, generator=gen)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[name] = torch.randn(shape, generator=gen) / fan_in**0.5
    return state


# ---------------------------------------------------------------- inputs


def scans(seed: int = 3, frames: int = 2, thin: int = 4) -> tuple[PointBatch, list[Annotations3D]]:
    """Synthetic scans cut to the grid (x, y, z, intensity, elongation = intensity / 2) and their
    humans (labels in ``CLASSES``; pedestrians carry keypoints, cyclists none visible)."""
    points, annotations = [], []
    scene = SceneConfig(radius=9.0, num_vehicles=(1, 2), num_pedestrians=(6, 8), num_cyclists=(1, 2))
    lidar = LidarConfig(beams=12, azimuth_resolution=1.2, max_range=14.0)
    low, high = np.array(RANGE[:3]), np.array(RANGE[3:])
    for k in range(frames):
        frame = generate_frame(seed + k, lidar, scene)
        names = np.array(SYNTHETIC_CLASSES)[frame.labels]
        keep = np.isin(names, CLASSES) & (np.abs(frame.boxes[:, :2]) < high[:2] - 0.5).all(1)
        xyz = frame.points[:, :3]
        # The humans' surroundings and every ``thin``-th point elsewhere: few voxels, a fast test.
        near = (np.abs(xyz[:, None, :2] - frame.boxes[None, keep, :2]) < 1.5).all(2).any(1)
        inside = ((xyz >= low) & (xyz < high)).all(1) & (near | (np.arange(len(xyz)) % thin == 0))
        p = frame.points[inside]
        points.append(torch.from_numpy(np.concatenate([p, p[:, 3:4] / 2], 1)).float())
        n = int(keep.sum())
        annotations.append(Annotations3D(
            Boxes3D(torch.from_numpy(frame.boxes[keep, :7]).float()),
            torch.tensor([CLASSES.index(name) for name in names[keep]], dtype=torch.int64),
            torch.ones(n, dtype=torch.int64), torch.ones(n, dtype=torch.int64), torch.arange(n),
            torch.from_numpy(frame.keypoints[keep]).float(), torch.from_numpy(frame.keypoint_visibility[keep]),
        ))
    return PointBatch.from_frames(points), annotations


def voxelize(points: PointBatch):
    vfe = MeanVFE(GRID, 5, max_points_per_voxel=5, max_voxels=150000, quantization="float32").eval()
    return vfe(points)


# ---------------------------------------------------------------- recording the authors' outputs


def _authors_targets_and_losses(head: nn.Module, pred: dict, x, annotations: list[Annotations3D]):
    """Targets from the authors' ``assign_target_of_single_head`` (assembled as their base
    ``assign_targets``) and the loss terms of ``VoxelNeXtHeadKP.get_loss`` on the merged outputs."""
    cfg = head.model_cfg.TARGET_ASSIGNER_CONFIG
    spatial_shape, batch_index, voxel_indices, spatial_indices, num_voxels = head._get_voxel_infos(x)
    parts = {name: [] for name in ("heatmap", "boxes", "kps", "inds", "mask", "gt")}
    for b, ann in enumerate(annotations):
        gt = torch.cat([ann.boxes.tensor[:, :7], torch.ones(len(ann), 1)], 1)  # class 1: Human
        kps = torch.cat([ann.keypoints, ann.keypoint_visibility.float()[..., None]], -1)
        heatmap, boxes, ret_kps, inds, mask = head.assign_target_of_single_head(
            1, gt, kps, num_voxels[b], spatial_indices[b], spatial_shape, cfg.FEATURE_MAP_STRIDE,
            cfg.NUM_MAX_OBJS, cfg.GAUSSIAN_OVERLAP, cfg.MIN_RADIUS)
        for name, value in zip(parts, (heatmap, boxes, ret_kps, inds, mask, gt[:, :-1])):
            parts[name].append(value)
    kps = torch.stack(parts["kps"])
    targets = {"heatmaps": [torch.cat(parts["heatmap"], 1).permute(1, 0)],
               "target_boxes": [torch.stack(parts["boxes"])], "inds": [torch.stack(parts["inds"])],
               "masks": [torch.stack(parts["mask"])], "gt_boxes": [parts["gt"]],
               "target_kps": [kps[..., :3].contiguous()], "target_kps_vis": [kps[..., 3].contiguous()]}
    merged = dict(pred)
    merged.update(center=torch.cat([pred["loc_x"][:, :1], pred["loc_y"][:, :1]], 1), center_z=pred["loc_z"][:, :1],
                  kp_x=pred["loc_x"][:, 1:], kp_y=pred["loc_y"][:, 1:], kp_z=pred["loc_z"][:, 1:])
    head.separate_head_cfg.HEAD_ORDER = ["center", "center_z", "dim", "rot"]
    head.forward_ret_dict = {"pred_dicts": [merged], "target_dicts": targets, "batch_index": batch_index,
                             "voxel_indices": voxel_indices}
    base = type(head).__mro__[1]  # VoxelNeXtHeadKP
    total, tb = base.get_loss(head)
    losses = {"total": total.detach(), "heatmap": tb["hm_loss_head_0"], "regression": tb["loc_loss_head_0"],
              "iou": tb["iou_loss_head_0"], "iou_regression": tb["iou_reg_loss_head_0"],
              "keypoint": tb["loc_kp_all_loss_head_0"], "visibility": tb["kp_vis_loss_head_0"],
              "bone": tb["kp_bone_loss_head_0"]}
    plain_targets = {"heatmap": targets["heatmaps"][0], "boxes": targets["target_boxes"][0],
                     "inds": targets["inds"][0], "mask": targets["masks"][0],
                     "kp_location": targets["target_kps"][0], "kp_visibility": targets["target_kps_vis"][0]}
    return plain_targets, {k: torch.as_tensor(float(v)) for k, v in losses.items()}


def record(root: Path, seed: int = 0) -> dict:
    """The authors' modules at reduced widths, random weights, on :func:`scans`: every output as plain data."""
    backbone, head = build_authors(root)
    spec = {"backbone": state_spec(backbone), "head": state_spec(head)}
    backbone.load_state_dict(random_state(spec["backbone"], seed))
    head.load_state_dict(random_state(spec["head"], seed + 1))
    backbone.eval()
    head.eval()
    points, annotations = scans()
    voxels = voxelize(points)
    with torch.no_grad(), harness._reference_patches(torch.device("cpu")):
        batch = backbone({"voxel_features": voxels.features, "voxel_coords": voxels.coords.int(),
                          "batch_size": voxels.batch_size})
        x = batch["encoded_spconv_tensor"]
        pred = {k: v.clone() for k, v in head.heads_list[0](x).items()}
        decoded = head.generate_predicted_boxes(voxels.batch_size, [dict(pred)], x.indices, x.spatial_shape)
        targets, losses = _authors_targets_and_losses(head, dict(pred), x, annotations)
    # Training mode: BatchNorm on batch statistics (the selective kernels' squeeze over the 2 frames).
    backbone.train()
    with torch.no_grad(), harness._reference_patches(torch.device("cpu")):
        trained = backbone({"voxel_features": voxels.features, "voxel_coords": voxels.coords.int(),
                            "batch_size": voxels.batch_size})["encoded_spconv_tensor"]
    return {
        "bev_train": {"coords": trained.indices.long(), "features": trained.features},
        "state_spec": spec, "seed": seed,
        "voxel_coords": voxels.coords, "voxel_features": voxels.features,
        "annotations": [{"boxes": a.boxes.tensor, "labels": a.labels, "keypoints": a.keypoints,
                         "visibility": a.keypoint_visibility} for a in annotations],
        "bev": {"coords": x.indices.long(), "features": x.features, "shape": list(x.spatial_shape)},
        "outputs": pred, "targets": targets, "losses": losses,
        "decoded": [{"boxes": d["pred_boxes"], "scores": d["pred_scores"], "labels": d["pred_labels"],
                     "keypoints": d["pred_kps"], "visibility": d["pred_kps_vis"]} for d in decoded],
    }


# ---------------------------------------------------------------- ours, compared


def ours(grid: VoxelGrid = GRID, channels=CHANNELS, out=OUT) -> tuple[VoxelKPReferenceBackbone, VoxelKPReferenceHead]:
    backbone = VoxelKPReferenceBackbone(5, channels, out, down_kernel_sizes=(5, 5, 3, 3))
    head = VoxelKPReferenceHead(out, 2, CLASSES, {"Pedestrian": "Human", "Cyclist": "Human"}, **HEAD)
    return backbone, head


def load_authors_state(module: nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    """``theirs`` into ``module`` through its ``openpcdet_keys()`` (spconv 2.2+ layouts)."""
    pairs = module.openpcdet_keys()
    state = module.state_dict()
    assert sorted(p.ours for p in pairs) == sorted(state), "openpcdet_keys must cover the state dict"
    assert sorted(p.theirs for p in pairs) == sorted(theirs), "openpcdet_keys must name every reference tensor"
    for p in pairs:
        value = theirs[p.theirs]
        if p.kind == TensorKind.SPARSE_CONV_AS_LINEAR:  # spconv's 1x1 conv: features @ W.view(Cin, Cout)
            value = value.reshape(value.shape[-1], value.shape[0]).T
        state[p.ours] = value.reshape(state[p.ours].shape)
    module.load_state_dict(state)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> float:
    """Assert ``actual`` equals ``expected`` to ``rtol`` of the latter's scale; the largest relative gap."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1e-12) if expected.numel() else 1.0
    gap = float(((actual - expected).abs() / scale).max()) if expected.numel() else 0.0
    assert gap <= rtol, f"{what}: largest difference {gap:.2e} of the reference's scale (allowed {rtol:.0e})"
    return gap


def _rows(coords: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.lexsort(coords.long().numpy().T[::-1].copy()))


def compare(rec: dict) -> dict[str, float]:
    """Ours with the recorded weights on the recorded input against the recorded outputs."""
    backbone, head = ours()
    load_authors_state(backbone, random_state(rec["state_spec"]["backbone"], rec["seed"]))
    load_authors_state(head, random_state(rec["state_spec"]["head"], rec["seed"] + 1))
    backbone.eval()
    head.eval()
    voxels = SparseVoxels(rec["voxel_coords"], rec["voxel_features"], GRID, len(rec["annotations"]))
    annotations = [Annotations3D(Boxes3D(a["boxes"]), a["labels"], *(torch.ones(len(a["labels"]), dtype=torch.int64),) * 2,
                                 torch.arange(len(a["labels"])), a["keypoints"], a["visibility"]) for a in rec["annotations"]]
    gaps = {}
    with torch.no_grad():
        bev = backbone(voxels)
        expected = rec["bev"]
        assert list(bev.spatial_shape) == list(expected["shape"])
        mine, theirs = _rows(bev.coords), _rows(expected["coords"])
        assert torch.equal(bev.coords.long()[mine], expected["coords"][theirs]), "BEV cells differ"
        gaps["bev"] = _close(bev.features[mine], expected["features"][theirs], what="BEV features")
        backbone.train()
        trained, recorded = backbone(voxels), rec["bev_train"]
        backbone.eval()
        mine, theirs = _rows(trained.coords), _rows(recorded["coords"])
        assert torch.equal(trained.coords.long()[mine], recorded["coords"][theirs]), "BEV cells differ (training)"
        gaps["bev_train"] = _close(trained.features[mine], recorded["features"][theirs], what="BEV features (training)")
        # The head on the reference's cells in the reference's order: outputs and targets align by row.
        bev = SparseBEV(expected["coords"].int(), expected["features"], tuple(expected["shape"]), 8, GRID,
                        len(rec["annotations"]))
        pred = head(bev)
        out = pred.groups[0]
        for name, value in rec["outputs"].items():
            gaps[f"out.{name}"] = _close(out[name], value, what=f"head output {name}")
    target = head.assign_targets(pred, head.merged(annotations))[0]
    kp = head.keypoint_targets(pred, annotations, target.inds, target.mask)
    t = rec["targets"]
    batch = pred.coords[:, 0].long()
    by_frame = torch.cat([torch.nonzero(batch == b).squeeze(1) for b in range(pred.batch_size)])
    gaps["target.heatmap"] = _close(target.heatmap[by_frame], t["heatmap"], what="heatmap target")
    assert torch.equal(target.inds * target.mask, t["inds"] * t["mask"]) and torch.equal(target.mask, t["mask"])
    gaps["target.boxes"] = _close(target.boxes, t["boxes"], what="box targets")
    gaps["target.kp"] = _close(kp.location, t["kp_location"], what="keypoint targets")
    assert torch.equal(kp.visibility, t["kp_visibility"])
    losses = head.loss(pred, annotations)
    for name, value in rec["losses"].items():
        gaps[f"loss.{name}"] = _close(getattr(losses, name).detach(), value, what=f"loss {name}")
    decoded = head.decode(pred)
    for frame, (d, e) in enumerate(zip(decoded, rec["decoded"])):
        assert len(d.boxes) == len(e["boxes"]) > 0, f"frame {frame}: {len(d.boxes)} detections, reference {len(e['boxes'])}"
        order = torch.argsort(e["scores"], descending=True, stable=True)
        gaps["decoded.boxes"] = max(gaps.get("decoded.boxes", 0), _close(d.boxes.tensor, e["boxes"][order], 1e-4, "boxes"))
        gaps["decoded.scores"] = max(gaps.get("decoded.scores", 0), _close(d.scores, e["scores"][order], what="scores"))
        assert torch.equal(d.labels, e["labels"][order] - 1)
        gaps["decoded.keypoints"] = max(gaps.get("decoded.keypoints", 0),
                                        _close(d.keypoints, e["keypoints"][order], 1e-4, "keypoints"))
        _close(d.keypoint_scores, e["visibility"][order].clamp(0, 1), what="visibility")
    return gaps


# ---------------------------------------------------------------- tests



def _root() -> Path:
    root = os.environ.get("VOXSPARSE_VOXELKP")
    if not root:
        pytest.skip("set VOXSPARSE_VOXELKP to a VoxelKP checkout")
    return Path(root)


def test_matches_fixture_recorded_from_the_authors_modules():
    if not FIXTURE.is_file():
        pytest.fail(f"{FIXTURE} is missing: write it with this file's generator (module docstring)")
    rec = torch.load(FIXTURE, weights_only=True)
    compare(rec)


def test_matches_the_authors_modules():
    compare(record(_root()))


def test_full_size_state_names_and_parameter_counts():
    backbone, head = ours(VoxelGrid((0.1, 0.1, 0.1), (-75.2, -75.2, -2.0, 75.2, 75.2, 4.0)), (32, 64, 128, 256, 256), 384)
    assert sum(p.numel() for p in backbone.parameters()) == FULL_SIZE_PARAMETERS["backbone"]
    assert sum(p.numel() for p in head.parameters()) == FULL_SIZE_PARAMETERS["head"]
    for module in (backbone, head):
        pairs = module.openpcdet_keys()
        assert sorted(p.ours for p in pairs) == sorted(module.state_dict())
        assert len({p.theirs for p in pairs}) == len(pairs)


def test_full_size_state_names_match_the_authors():
    theirs_backbone, theirs_head = build_authors(_root(), channels=(32, 64, 128, 256, 256), out=384)
    backbone, head = ours(channels=(32, 64, 128, 256, 256), out=384)
    for mine, theirs in ((backbone, theirs_backbone), (head, theirs_head)):
        pairs = mine.openpcdet_keys()
        assert sorted(p.theirs for p in pairs) == sorted(theirs.state_dict())
        shapes = {k: v.numel() for k, v in theirs.state_dict().items()}
        assert all(shapes[p.theirs] == mine.state_dict()[p.ours].numel() for p in pairs)
    assert sum(p.numel() for p in theirs_backbone.parameters()) == FULL_SIZE_PARAMETERS["backbone"]
    assert sum(p.numel() for p in theirs_head.parameters()) == FULL_SIZE_PARAMETERS["head"]


def test_windows_tile_from_the_batch_minimum():
    gen = torch.Generator().manual_seed(0)
    coords = torch.cat([torch.randint(0, 2, (300, 1), generator=gen),
                        torch.randint(3, 40, (300, 3), generator=gen)], 1).int()
    ids = window_index(coords, 6)
    low = coords[:, 1:].min(0).values
    for i in range(0, 300, 7):
        for j in range(300):
            same = coords[i, 0] == coords[j, 0] and bool(((coords[i, 1:] - low) // 6 == (coords[j, 1:] - low) // 6).all())
            assert (ids[i] == ids[j]) == same


def test_forward_loss_and_decode_shapes_without_the_checkout():
    torch.manual_seed(0)
    backbone, head = ours()
    points, annotations = scans(thin=1000)
    bev = backbone.train()(voxelize(points))
    assert bev.stride == 8 and bev.features.shape[1] == OUT and tuple(bev.spatial_shape) == (24, 24)
    pred = head.train()(bev)
    assert pred.groups[0]["loc_x"].shape == (len(bev), 15) and pred.groups[0]["kp_vis"].shape == (len(bev), 14)
    losses = head.loss(pred, annotations)
    assert torch.isfinite(losses.total)
    losses.total.backward()
    assert all(p.grad is not None for p in backbone.parameters())
    head.eval()
    with torch.no_grad():
        pred = head(SparseBEV(bev.coords, bev.features.detach(), bev.spatial_shape, 8, GRID, bev.batch_size))
    for det in head.decode(pred):
        assert det.keypoints.shape == (len(det.boxes), 14, 3)
        assert set(det.labels.tolist()) <= {0}


def test_paper_config_builds_a_keypoint_detector_that_trains_and_predicts():
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = ["backbone.channels=[8,8,16,16,16]", "backbone.out_channels=16",
                 f"voxel_encoder.grid.point_cloud_range=[{','.join(map(str, RANGE))}]",
                 f"head.post_center_limit_range=[{','.join(map(str, RANGE))}]", "head.score_threshold=0.0"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[2] / "configs" / "model"), version_base=None):
        cfg = compose(config_name="voxelkp_waymo_reference", overrides=overrides)
    model = instantiate(cfg)
    assert model.class_names == CLASSES and model.keypoint_labels == (0, 1)
    assert model.voxel_encoder.tanh_columns == (3,) and model.point_convention.features[3:] == ("intensity", "elongation")
    points, annotations = scans(thin=1000)
    losses = model.train().loss(points, annotations)
    assert torch.isfinite(losses.total) and losses.bone >= 0
    with torch.no_grad():
        detections = model.eval().predict(points)
    assert len(detections) == 2 and all(d.keypoints.shape[1:] == (14, 3) for d in detections)
    empty = PointBatch.from_frames([points.points[:0], points.points[:0]])
    with torch.no_grad():
        assert [len(d) for d in model.predict(empty)] == [0, 0]
        assert tuple(model.backbone(model.voxel_encoder(empty)).spatial_shape) == (24, 24)
    pairs = model.openpcdet_keys()
    assert sorted(p.ours for p in pairs) == sorted(model.state_dict())
    assert {p.theirs.split(".")[0] for p in pairs} == {"backbone_3d", "dense_head"}


def write_fixture(root: Path) -> None:
    rec = record(root)
    gaps = compare(rec)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rec, FIXTURE)
    size = FIXTURE.stat().st_size
    print(f"wrote {FIXTURE} ({size / 1e6:.2f} MB); largest relative differences: {gaps}")
    assert size <= 2_000_000, "fixture over 2 MB"


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_fixture(Path(os.environ["VOXSPARSE_VOXELKP"]))
