"""voxsparse's reference configs beside the OpenPCDet (or DSVT repository) detectors they reproduce.

:data:`REFERENCE_CONFIGS` names, for each reference config of ``configs/model/``, the checkout and
model yaml it follows and the overrides that build it at reduced width (narrower layers, and a
smaller range where a dense BEV map would be large: for fixtures and quick checks; the architecture
and every rule stay the reference's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxsparse.benchmark.openpcdet import ReferenceDetector, build_reference
from voxsparse.convert.openpcdet import ConversionReport, model_config, model_from_config, openpcdet_to_ours
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.structures import Annotations3D, Boxes3D, Detections3D, PointBatch, SparseVoxels
from voxsparse.structures.bev import DenseBEV

#: Environment variables naming the two checkouts (tests skip without them).
CHECKOUT_ENV = {"OpenPCDet": "VOXSPARSE_OPENPCDET", "DSVT": "VOXSPARSE_DSVT"}


@dataclass(frozen=True)
class ReferenceConfig:
    """Where a voxsparse reference config comes from.

    Attributes:
        checkout: ``"OpenPCDet"`` (commit 8caccce) or ``"DSVT"`` (Haiyang-W/DSVT), a key of
            :data:`CHECKOUT_ENV`.
        yaml: the model yaml, relative to the checkout.
        reduced: dotted yaml keys -> values for a reduced-width reference
            (:func:`voxsparse.benchmark.openpcdet.load_reference_config`).
        ours_reduced: the Hydra overrides that build ``configs/model/<name>.yaml`` as ``reduced``.
    """

    checkout: str
    yaml: str
    reduced: dict = field(default_factory=dict)
    ours_reduced: tuple[str, ...] = ()


_VOXELNEXT_REDUCED = {
    "MODEL.BACKBONE_3D.CHANNELS": [8, 8, 16, 16, 16],
    "MODEL.BACKBONE_3D.OUT_CHANNEL": 16,
    "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16,
}
_DSVT_REDUCED = {
    "MODEL.VFE.NUM_FILTERS": [16, 16],
    "MODEL.BACKBONE_3D.conv_out_channel": 16,
    "MODEL.MAP_TO_BEV.NUM_BEV_FEATURES": 16,
    "MODEL.BACKBONE_2D.NUM_FILTERS": [16, 16, 16],
    "MODEL.BACKBONE_2D.NUM_UPSAMPLE_FILTERS": [16, 16, 16],
}


_DSVT_OURS = ("model.voxel_encoder.layer_channels=[16,16]", "model.backbone.num_heads=2",
              "model.backbone.ffn_channels=32", "model.neck.num_filters=[16,16,16]",
              "model.neck.num_upsample_filters=[16,16,16]")


def _voxelnext_ours(point_cloud_range: list[float]) -> tuple[str, ...]:
    return ("model.backbone.channels=[8,8,16,16,16,16]", "model.backbone.out_channels=16",
            f"model.voxel_encoder.grid.point_cloud_range=[{','.join(map(str, point_cloud_range))}]")


def _per_stage(stages: int) -> dict:
    return {
        "MODEL.BACKBONE_3D.INPUT_LAYER.d_model": [16] * stages,
        "MODEL.BACKBONE_3D.d_model": [16] * stages,
        "MODEL.BACKBONE_3D.nhead": [2] * stages,
        "MODEL.BACKBONE_3D.dim_feedforward": [32] * stages,
    }


# Reduced ranges keep 512 x 512 cells a side: spconv's CPU voxelizer allocates a table of every
# cell of the grid.
REFERENCE_CONFIGS: dict[str, ReferenceConfig] = {
    "voxelnext_nuscenes": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/nuscenes_models/cbgs_voxel0075_voxelnext.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-19.2, -19.2, -5.0, 19.2, 19.2, 3.0]},
        _voxelnext_ours([-19.2, -19.2, -5.0, 19.2, 19.2, 3.0])),
    "voxelnext_waymo": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/waymo_models/voxelnext_ioubranch_large.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-25.6, -25.6, -2.0, 25.6, 25.6, 4.0]},
        _voxelnext_ours([-25.6, -25.6, -2.0, 25.6, 25.6, 4.0])),
    "voxelnext_argo2": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/argo2_models/cbgs_voxel01_voxelnext.yaml", {
            **_VOXELNEXT_REDUCED, "DATA_CONFIG.POINT_CLOUD_RANGE": [-25.6, -25.6, -4.0, 25.6, 25.6, 4.0]},
        _voxelnext_ours([-25.6, -25.6, -4.0, 25.6, 25.6, 4.0])),
    # VoxelResBackBone8x has fixed widths (16-32-64-128): the dense parts are narrowed and the range
    # cut to 36 m (a 60 x 60 BEV map).
    "centerpoint_nuscenes": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/nuscenes_models/cbgs_voxel0075_res3d_centerpoint.yaml", {
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-18.0, -18.0, -5.0, 18.0, 18.0, 3.0],
            "MODEL.BACKBONE_2D.NUM_FILTERS": [16, 16],
            "MODEL.BACKBONE_2D.NUM_UPSAMPLE_FILTERS": [16, 16],
            "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16,
        }, (
            "model.voxel_encoder.grid.point_cloud_range=[-18.0,-18.0,-5.0,18.0,18.0,3.0]",
            "model.neck.num_filters=[16,16]", "model.neck.num_upsample_filters=[16,16]",
            "model.head.shared_conv_channels=16")),
    # 38.4 m: 120 x 120 cells of 0.32 m, ten 12-cell windows a side.
    "dsvt_voxel_waymo": ReferenceConfig(
        "OpenPCDet", "tools/cfgs/waymo_models/dsvt_voxel.yaml", {
            **_DSVT_REDUCED, **_per_stage(4),
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-19.2, -19.2, -2.0, 19.2, 19.2, 4.0],
            "MODEL.BACKBONE_3D.INPUT_LAYER.sparse_shape": [120, 120, 32],
            "MODEL.BACKBONE_3D.output_shape": [120, 120],
            "MODEL.MAP_TO_BEV.INPUT_SHAPE": [120, 120, 1],
            "MODEL.DENSE_HEAD.SHARED_CONV_CHANNEL": 16},
        (*_DSVT_OURS, "model.voxel_encoder.grid.point_cloud_range=[-19.2,-19.2,-2.0,19.2,19.2,4.0]",
         "model.backbone.channels=[16,16,16,16]", "model.head.shared_conv_channels=16")),
    # 36 m: 120 x 120 pillars of 0.3 m, four 30-cell windows a side. The DSVT repository's TransFusion
    # head reshapes its queries to 128 channels in code, so HIDDEN_CHANNEL keeps 128.
    "dsvt_pillar_nuscenes": ReferenceConfig(
        "DSVT", "tools/cfgs/dsvt_models/dsvt_plain_1f_onestage_nusences.yaml", {
            **_DSVT_REDUCED, **_per_stage(1),
            "DATA_CONFIG.POINT_CLOUD_RANGE": [-18.0, -18.0, -5.0, 18.0, 18.0, 3.0],
            "MODEL.BACKBONE_3D.INPUT_LAYER.sparse_shape": [120, 120, 1],
            "MODEL.BACKBONE_3D.output_shape": [120, 120],
            "MODEL.MAP_TO_BEV.INPUT_SHAPE": [120, 120, 1],
            "MODEL.DENSE_HEAD.FFN_CHANNEL": 32, "MODEL.DENSE_HEAD.NUM_PROPOSALS": 50},
        (*_DSVT_OURS, "model.voxel_encoder.grid.point_cloud_range=[-18.0,-18.0,-5.0,18.0,18.0,3.0]",
         "model.backbone.channels=[16]", "model.head.ffn_channels=32", "model.head.num_proposals=50")),
}


# ---------------------------------------------------------------------------------------------
# A voxsparse reference model beside the reference detector on one input.

#: Synthetic classes and the names the reference datasets give the same objects.
SYNTHETIC_ALIASES = {
    "Vehicle": ("car", "vehicle", "regular_vehicle"),
    "Pedestrian": ("pedestrian",),
    "Cyclist": ("bicycle", "cyclist", "bicyclist"),
}


@dataclass
class ParityInput:
    """One frame for both sides.

    Attributes:
        points: (N, C) float32 in the voxsparse model's point convention.
        reference_points: (N, C) the same points as the reference's dataset hands them over (for
            Waymo models, intensity and elongation through tanh, which ours applies inside).
        gt_boxes: (K, 8 | 10) the reference's boxes (x, y, z, dx, dy, dz, heading[, vx, vy], label
            from 1 in the reference's class order).
        annotations: the same boxes for voxsparse (labels from 0 in the model's class order).
    """

    points: torch.Tensor
    reference_points: torch.Tensor
    gt_boxes: torch.Tensor
    annotations: Annotations3D


@dataclass
class StageDiff:
    """One compared output: its name, sizes on both sides, and the largest difference.

    ``rel_diff`` is max |ours - theirs| / max(max |theirs|, 1e-12); ``matched`` False when the two
    sides do not hold the same rows (voxels, cells, boxes) and ``note`` says how."""

    name: str
    ours: str
    theirs: str
    rel_diff: float | None
    abs_diff: float | None = None
    matched: bool = True
    note: str = ""


@dataclass
class ParityResult:
    """Every comparison of :func:`compare`, largest relative difference first by :meth:`table`."""

    rows: list[StageDiff] = field(default_factory=list)

    def worst(self) -> float:
        return max((r.rel_diff for r in self.rows if r.rel_diff is not None), default=0.0)

    def ok(self, tolerance: float) -> bool:
        return all(r.matched for r in self.rows) and self.worst() <= tolerance

    def table(self) -> str:
        """The rows as an aligned text table, largest relative difference first."""
        rows = sorted(self.rows, key=lambda r: (r.matched, -(r.rel_diff or 0.0)))
        head = ("stage", "ours", "reference", "max rel diff", "max abs diff", "")
        cells = [head] + [(r.name, r.ours, r.theirs, "-" if r.rel_diff is None else f"{r.rel_diff:.3e}",
                           "-" if r.abs_diff is None else f"{r.abs_diff:.3e}",
                           ("" if r.matched else "MISMATCH ") + r.note) for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
        return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(head))).rstrip() for c in cells)


def _diff(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    ours, theirs = ours.detach().double().cpu(), theirs.detach().double().cpu()
    if ours.numel() == 0:
        return 0.0, 0.0
    absolute = float((ours - theirs).abs().max())
    return absolute / max(float(theirs.abs().max()), 1e-12), absolute


def _sorted_rows(coords: torch.Tensor, features: torch.Tensor) -> dict:
    """``{"coords", "features"}`` with rows ordered by their integer coordinates (lexicographic)."""
    coords = coords.detach().long().cpu()
    key = torch.zeros(len(coords), dtype=torch.int64)
    for column in coords.t():
        key = key * (int(column.max()) + 1 if len(column) else 1) + column
    order = key.argsort()
    return {"coords": coords[order].int(), "features": features.detach().float().cpu()[order]}


def _cells(dense: torch.Tensor, occupied_only: bool) -> dict:
    """A dense (B, C, H, W) map as rows of cells (b, y, x): the occupied ones (any channel non-zero)
    or all of them."""
    dense = dense.detach().cpu()
    mask = dense.abs().amax(1) > 0 if occupied_only else torch.ones(dense.shape[0], *dense.shape[2:], dtype=torch.bool)
    coords = mask.nonzero()
    return _sorted_rows(coords, dense.permute(0, 2, 3, 1)[mask])


#: Names of the compared stages, in pipeline order.
VOXELS, BEV, DENSE_BEV = "voxel features (vfe)", "BEV features (backbone_3d / map_to_bev)", "2D BEV features (backbone_2d)"


def reference_stages(stages: dict) -> dict[str, dict]:
    """The reference's stages (:attr:`ReferenceOutput.stages`) as rows of ``{"coords", "features"}``
    under the names voxsparse's stages are compared by: voxels (b, z, y, x), BEV cells (b, y, x:
    its 2D sparse tensor, its pillars or the occupied cells of its dense map), and every cell of
    its 2D backbone's map."""
    out = {}
    vfe, backbone, to_bev = stages.get("vfe", {}), stages.get("backbone_3d", {}), stages.get("map_to_bev_module", {})
    coords = vfe.get("voxel_coords", stages["input"].get("voxel_coords"))
    if "voxel_features" in vfe and coords is not None:
        out[VOXELS] = _sorted_rows(coords, vfe["voxel_features"])
    encoded = backbone.get("encoded_spconv_tensor")
    if encoded is not None and encoded["indices"].shape[1] == 3:
        out[BEV] = _sorted_rows(encoded["indices"], encoded["features"])
    elif "pillar_features" in backbone and "voxel_coords" in backbone:
        out[BEV] = _sorted_rows(backbone["voxel_coords"][:, [0, 2, 3]], backbone["pillar_features"])
    elif "spatial_features" in to_bev:
        out[BEV] = _cells(to_bev["spatial_features"], occupied_only=True)
    if "spatial_features_2d" in stages.get("backbone_2d", {}):
        out[DENSE_BEV] = _cells(stages["backbone_2d"]["spatial_features_2d"], occupied_only=False)
    return out


def our_stages(voxels: SparseVoxels, bev, neck: DenseBEV | None) -> dict[str, dict]:
    """voxsparse's stages in the form of :func:`reference_stages`."""
    out = {VOXELS: _sorted_rows(voxels.coords, voxels.features)}
    out[BEV] = _cells(bev.features, True) if isinstance(bev, DenseBEV) else _sorted_rows(bev.coords, bev.features)
    if neck is not None:
        out[DENSE_BEV] = _cells(neck.features, occupied_only=False)
    return out


def shrink_rows(rows: dict, max_values: int = 24576, samples: int = 384, seed: int = 0) -> dict:
    """Rows cut down for a small fixture: all coordinates, features of ``samples`` rows drawn at random
    (``"sample"``: their indices) and each column's sum and sum of magnitudes over every row
    (float64). Rows of at most ``max_values`` feature values are kept whole."""
    features = rows["features"]
    if features.numel() <= max_values:
        return rows
    pick = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return {"coords": rows["coords"], "sample": pick, "features": features[pick],
            "column_sums": features.double().sum(0), "column_magnitudes": features.double().abs().sum(0)}


def compare_stage(name: str, ours: dict, theirs: dict) -> StageDiff:
    """Rows of one stage: same coordinates, then features (all, or the reference's sampled rows and
    its column sums, the largest sum difference taken relative to the largest column's sum of
    magnitudes)."""
    oc, tc = ours["coords"], theirs["coords"]
    sizes = (f"{len(oc)} rows x {ours['features'].shape[1]}", f"{len(tc)} rows x {theirs['features'].shape[1]}")
    if oc.shape != tc.shape or not torch.equal(oc.long(), tc.long()):
        return StageDiff(name, *sizes, None, None, False, "different coordinates")
    if "sample" not in theirs:
        if ours["features"].shape != theirs["features"].shape:
            return StageDiff(name, *sizes, None, None, False, "different widths")
        return StageDiff(name, *sizes, *_diff(ours["features"], theirs["features"]))
    rel, absolute = _diff(ours["features"][theirs["sample"]], theirs["features"])
    sums = (ours["features"].double().sum(0) - theirs["column_sums"]).abs()
    rel = max(rel, float(sums.max()) / max(float(theirs["column_magnitudes"].max()), 1e-12))
    return StageDiff(name, *sizes, rel, absolute, note=f"{len(theirs['sample'])} rows and column sums")


def reference_boxes(final_box_dicts: Sequence[dict], reference_classes: Sequence[str]) -> list[dict]:
    """Decoded boxes per frame as plain data: ``boxes`` (K, 7 | 9), ``scores`` (K,), ``classes`` (names)."""
    return [{"boxes": f["pred_boxes"].detach().float().cpu(), "scores": f["pred_scores"].detach().float().cpu(),
             "classes": [reference_classes[i - 1] for i in f["pred_labels"].tolist()]} for f in final_box_dicts]


def compare_boxes(ours: Sequence[Detections3D], theirs: Sequence[dict], class_names: Sequence[str],
                  tolerance: float = 1e-4) -> StageDiff:
    """Decoded boxes of every frame as sets: each reference box (:func:`reference_boxes`: its
    values, score and class) is matched to the nearest of ours with that class (largest absolute
    difference of box values and score, the heading modulo 2 pi); a box left unmatched, or matched
    farther than ``tolerance``, is a mismatch."""
    worst, count_ours, count_theirs, matched = 0.0, 0, 0, True
    for frame_ours, frame_theirs in zip(ours, theirs):
        names = [class_names[i] for i in frame_ours.labels.tolist()]
        a = torch.cat([frame_ours.boxes.tensor, frame_ours.scores[:, None]], 1).double().cpu()
        b = torch.cat([frame_theirs["boxes"], frame_theirs["scores"][:, None]], 1).double().cpu()
        count_ours, count_theirs = count_ours + len(a), count_theirs + len(b)
        if len(a) != len(b) or a.shape[1:] != b.shape[1:]:
            matched = False
            continue
        distance = (a[:, None, :] - b[None, :, :]).abs()
        distance[..., 6] = torch.remainder(distance[..., 6] + torch.pi, 2 * torch.pi).sub(torch.pi).abs()
        distance = distance.amax(-1)
        same = torch.tensor([[n == m for m in frame_theirs["classes"]] for n in names], dtype=torch.bool)
        distance = torch.where(same.reshape(distance.shape), distance, torch.inf)
        taken = torch.zeros(len(a), dtype=torch.bool)
        for j in distance.min(0).values.argsort().tolist() if len(a) else []:  # closest pairs first
            row = torch.where(taken, torch.inf, distance[:, j])
            i = int(row.argmin())
            if not torch.isfinite(row[i]):
                matched = False
                break
            taken[i] = True
            worst = max(worst, float(row[i]))
    scale = max((float(f["boxes"].abs().max()) for f in theirs if len(f["boxes"])), default=1.0)
    ok = matched and worst <= tolerance
    return StageDiff("decoded boxes (as sets)", f"{count_ours} boxes", f"{count_theirs} boxes", worst / scale, worst,
                     ok, "" if ok else f"unmatched, or farther than {tolerance}")


def reference_record(reference: ReferenceDetector, inputs: ParityInput) -> dict:
    """What the reference computes on ``inputs``, as plain data: ``stages`` (:func:`reference_stages`,
    eval mode), ``boxes`` (:func:`reference_boxes`) and, where ``inputs`` has boxes, ``loss`` (the
    training loss, training mode) with ``loss_terms`` (its head's named terms)."""
    reference.eval()
    with torch.no_grad():
        output = reference(inputs.reference_points)
    record = {"stages": reference_stages(output.stages),
              "boxes": reference_boxes(output.final_box_dicts, reference.class_names)}
    if len(inputs.gt_boxes):
        reference.train()
        output = reference(inputs.reference_points, [inputs.gt_boxes])
        reference.eval()
        record["loss"] = float(output.loss.detach())
        record["loss_terms"] = {k: float(v.detach() if isinstance(v, torch.Tensor) else v)
                                for k, v in (output.tb_dict or {}).items()
                                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}
    return record


def compare_to_record(model: SparseDetector, inputs: ParityInput, record: dict, box_tolerance: float = 1e-4) -> ParityResult:
    """``model`` on ``inputs`` against a :func:`reference_record` (live, or read from a fixture):
    each stage the record holds, the decoded boxes and the training loss."""
    result = ParityResult()
    device = next(model.parameters()).device
    points = PointBatch.from_frames([inputs.points.to(device)])
    model.eval()
    with torch.no_grad():
        voxels = model.voxel_encoder(points)
        bev = model.backbone(voxels)
        neck = None if model.neck is None else model.neck(bev)
        detections = model.head.decode(model.head(bev if neck is None else neck))
    ours = our_stages(voxels, bev, neck)
    for name, theirs in record["stages"].items():
        if name in ours:
            result.rows.append(compare_stage(name, ours[name], theirs))
    result.rows.append(compare_boxes(detections, record["boxes"], model.class_names, box_tolerance))
    if "loss" in record:
        model.train()
        loss = float(model.loss(points, [inputs.annotations.to(device)]).total.detach())
        model.eval()
        result.rows.append(StageDiff("training loss (total)", f"{loss:.6g}", f"{record['loss']:.6g}",
                                     *_diff(torch.tensor(loss), torch.tensor(record["loss"]))))
    return result


def compare(reference: ReferenceDetector, model: SparseDetector, inputs: ParityInput,
            box_tolerance: float = 1e-4) -> ParityResult:
    """Both detectors on one frame: every stage both expose, the decoded boxes (eval mode), and the
    training loss with ``inputs``' boxes (training mode: BatchNorm on batch statistics on both sides).
    The two must hold the same weights (:func:`voxsparse.convert.openpcdet.openpcdet_to_ours`)."""
    return compare_to_record(model, inputs, reference_record(reference, inputs), box_tolerance)


def _in_range(xyz: torch.Tensor, point_cloud_range: Sequence[float]) -> torch.Tensor:
    low, high = torch.tensor(point_cloud_range[:3]), torch.tensor(point_cloud_range[3:])
    return ((xyz >= low) & (xyz < high)).all(dim=1)


def parity_input(model: SparseDetector, reference: ReferenceDetector, points: torch.Tensor | None = None,
                 seed: int = 0, max_points: int | None = None) -> ParityInput:
    """One frame for :func:`compare`.

    Args:
        model: the voxsparse side (its point convention and ``tanh_columns`` decide the columns).
        reference: the reference side (its range, classes and head's velocity decide the boxes).
        points: (N, C) points in the model's convention (a real scan, :func:`voxsparse.data.pointfile.
            conform`); None: the synthetic world's frame ``seed``, its free columns zero, with its
            labelled boxes and 200 extra points in the top voxel layer of the range (where a grid
            padded in z differs from one that is not).
        max_points: the synthetic frame cut to this many of its points, drawn at random (small fixtures).

    Points are cut to the range (half-open, so no point lies on the border that one side includes);
    boxes are those of the synthetic frame whose class the reference knows (by name) and whose centre
    lies in the range. A real scan comes without boxes: no loss is compared.
    """
    from voxsparse.benchmark.inputs import with_features
    from voxsparse.data.synthetic import CLASS_NAMES as SYNTHETIC_CLASSES
    from voxsparse.data.synthetic import generate_frame

    width = len(model.point_convention.features)
    pc_range = [float(v) for v in reference.point_cloud_range]
    boxes = labels = None
    if points is None:
        frame = generate_frame(seed)
        points = with_features(torch.from_numpy(frame.points), width)
        gen = torch.Generator().manual_seed(seed)
        if max_points is not None and len(points) > max_points:
            points = points[torch.randperm(len(points), generator=gen)[:max_points].sort().values]
        top = torch.rand(200, width, generator=gen)
        low, high = torch.tensor(pc_range[:3]), torch.tensor(pc_range[3:])
        top[:, :3] = low + (high - low) * top[:, :3]
        top[:, 2] = pc_range[5] - 0.5 * reference.voxel_size[2]
        points = torch.cat([points, top])
        boxes, labels = torch.from_numpy(frame.boxes), [SYNTHETIC_CLASSES[i] for i in frame.labels.tolist()]
    points = points.float()[_in_range(points[:, :3].float(), pc_range)].contiguous()
    reference_points = points.clone()
    tanh = list(getattr(model.voxel_encoder, "tanh_columns", ()))
    if tanh:  # what the reference's Waymo loader does before its data processor (numpy's tanh)
        reference_points[:, tanh] = torch.from_numpy(np.tanh(points[:, tanh].numpy()))
    velocity = "vel" in reference.cfg["MODEL"]["DENSE_HEAD"].get("SEPARATE_HEAD_CFG", {}).get("HEAD_DICT", {})
    code = 9 if velocity else 7
    lower = [n.lower() for n in reference.class_names]
    rows, ours_labels, their_labels = [], [], []
    for k, name in enumerate(labels or []):
        found = [a for a in SYNTHETIC_ALIASES.get(name, ()) if a in lower]
        if found and bool(_in_range(boxes[k : k + 1, :3], pc_range)):
            their_name = reference.class_names[lower.index(found[0])]
            if their_name in model.class_names:
                rows.append(boxes[k, :code])
                their_labels.append(lower.index(found[0]) + 1)
                ours_labels.append(model.class_names.index(their_name))
    box_tensor = torch.stack(rows) if rows else torch.zeros(0, code)
    gt = torch.cat([box_tensor, torch.tensor(their_labels, dtype=torch.float32)[:, None]], 1)
    k = len(rows)
    annotations = Annotations3D(Boxes3D(box_tensor.float()), torch.tensor(ours_labels, dtype=torch.int64),
                                torch.ones(k, dtype=torch.int64), torch.ones(k, dtype=torch.int64),
                                torch.arange(k, dtype=torch.int64))
    return ParityInput(points, reference_points, gt, annotations)


def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Random BatchNorm statistics and affine parameters (running mean ~ N(0, 0.1), variance in
    [0.5, 1.5), weight in [0.5, 1.5), bias ~ N(0, 0.1)), so eval-mode outputs depend on every one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                for tensor, low, scale, normal in ((m.running_mean, 0.0, 0.1, True), (m.running_var, 0.5, 1.0, False),
                                                   (m.weight, 0.5, 1.0, False), (m.bias, 0.0, 0.1, True)):
                    if tensor is None:
                        continue
                    draw = torch.randn if normal else torch.rand
                    tensor.copy_(low + scale * draw(tensor.shape, generator=gen).to(tensor))


def reference_pair(name: str, root: Path, reduced: bool = False, device: str | torch.device = "cpu",
                   seed: int = 0) -> tuple[ReferenceDetector, SparseDetector, ConversionReport]:
    """The reference detector of configs/model/``name``.yaml with random weights (seeded) and
    random BatchNorm statistics, and our model holding its converted weights.

    Args:
        name: a key of :data:`REFERENCE_CONFIGS`.
        root: its checkout (OpenPCDet or the DSVT repository, :attr:`ReferenceConfig.checkout`).
        reduced: both at the reduced width of :data:`REFERENCE_CONFIGS`, else full size.
    """
    if name not in REFERENCE_CONFIGS:
        raise ValueError(f"{name!r} is not a reference config; these are: {sorted(REFERENCE_CONFIGS)}")
    spec = REFERENCE_CONFIGS[name]
    torch.manual_seed(seed)
    reference = build_reference(root, spec.yaml, spec.reduced if reduced else None, device)
    randomize_batchnorm(reference, seed)
    config = model_config(name, None, spec.ours_reduced if reduced else ())
    model = model_from_config(config)
    state, report = openpcdet_to_ours(model, reference.state_dict(), where=f"{spec.checkout} {spec.yaml}")
    model.load_state_dict(state)
    return reference.eval(), model.to(device).eval(), report


def run_parity(name: str, root: Path, device: str | torch.device = "cpu", points_file: Path | None = None,
               reduced: bool = False, seed: int = 0, points_format: str | None = None
               ) -> tuple[ParityResult, ConversionReport]:
    """What ``tools/parity.py`` does: :func:`reference_pair`, then :func:`compare` on a real scan
    (``points_file`` in ``points_format`` (:data:`voxsparse.data.pointfile.POINT_FORMATS`), read and
    conformed to the model's point convention) or the synthetic frame. On CUDA, products run in
    strict fp32 on both sides (TF32 off), so differences are the models', not the arithmetic's."""
    from voxsparse.data.pointfile import conform, read_points

    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    reference, model, report = reference_pair(name, root, reduced, device, seed)
    points = None if points_file is None else torch.from_numpy(
        conform(read_points(points_file, points_format), model.point_convention))
    return compare(reference, model, parity_input(model, reference, points, seed)), report
