"""Ours beside OpenPCDet's on the very same input, timed in alternation in one process.

VoxelNeXt configs (CUDA only, :func:`compare_voxelnext`): the backbone forward in fp32 and under
fp16 autocast, ours also layer by layer (the unoptimised path) and index-first
(:mod:`voxsparse.ops.sparse_plan`), unfused and BatchNorm-fused (:mod:`voxsparse.models.fusion`) in
fp32 and in pure fp16; optionally forward+backward; voxelization beside spconv's ``PointToVoxel``;
and the whole detectors, points to boxes (:func:`compare_detectors`). The optimised outputs are
checked against the layer-by-layer one. DSVT configs (CPU or CUDA, :func:`compare_dsvt`): forward
(optionally forward+backward) in fp32 and, on CUDA, under fp16 autocast, with the output pillars of
both checked to be the same cells.

Every result is JSON-ready: numbers, strings, booleans, and ``timings`` (name ->
``dataclasses.asdict(Timing)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from voxsparse.benchmark.openpcdet import OpenPCDetVoxelNeXt, build_openpcdet_dsvt, load_openpcdet_voxelnext
from voxsparse.benchmark.stages import count_parameters, fp16_autocast
from voxsparse.convert.openpcdet import ours_to_openpcdet
from voxsparse.models.backbones.dsvt import DSVTReferenceBackbone
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.models.fusion import fuse_for_inference
from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.ops.sparse_utils import linear_keys
from voxsparse.ops.voxelize import hard_voxelize, voxelize_mean_torch
from voxsparse.structures import PointBatch, SparseBEV, SparseVoxels
from voxsparse.utils.timing import Timing, measure_interleaved


class NeedsCuda(RuntimeError):
    """The comparison asked for cannot run on the CPU."""


@dataclasses.dataclass(frozen=True)
class Alternation:
    """How the compared callables take turns (:func:`voxsparse.utils.timing.measure_interleaved`):
    ``warmup`` calls of each, then ``rounds`` rounds of ``per_round`` calls of each."""

    rounds: int = 5
    per_round: int = 3
    warmup: int = 2

    @classmethod
    def from_repeats(cls, repeats: int, rounds: int, warmup: int) -> Alternation:
        """About ``repeats`` timed calls of each, spread over ``rounds`` rounds (at least one per round)."""
        return cls(rounds=rounds, per_round=repeats // rounds or 1, warmup=warmup)

    def measure(self, fns: dict[str, Callable[[], object]], device: torch.device) -> dict[str, Timing]:
        return measure_interleaved(fns, device, rounds=self.rounds, per_round=self.per_round, warmup=self.warmup)


def _as_json(timings: dict[str, Timing]) -> dict[str, dict]:
    return {k: dataclasses.asdict(v) for k, v in timings.items()}


def _amp(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` called under CUDA fp16 autocast."""
    def wrapped():
        with fp16_autocast(True):
            return fn()
    return wrapped


def compare_with_openpcdet(
    model: SparseDetector, voxels: SparseVoxels, points: PointBatch, root: Path, alternation: Alternation,
    train: bool = False,
) -> dict:
    """Ours against OpenPCDet's (checkout at ``root``) on ``model``'s own voxels: :func:`compare_dsvt`
    for a DSVT backbone, else :func:`compare_voxelnext`.

    Raises:
        NeedsCuda: a VoxelNeXt model on the CPU.
    """
    device = voxels.features.device
    if isinstance(model.backbone, DSVTReferenceBackbone):
        return compare_dsvt(model.backbone, voxels, root, device, alternation, train=train)
    if device.type != "cuda":
        # OpenPCDet's VoxelNeXt head places its constants with .cuda().
        raise NeedsCuda("OpenPCDet's VoxelNeXt backbone cannot run inference on the CPU")
    return compare_voxelnext(model, voxels, points, root, alternation, train=train)


def _dynamic_mean_torch(encoder: MeanVFE, points: PointBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A dynamic ``MeanVFE``'s output by the torch unique + scatter path (no Triton keys)."""
    return voxelize_mean_torch(encoder.prepared(points), encoder.grid, encoder.quantization)


def _hard_mean_dense(encoder: MeanVFE, points: PointBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """A hard ``MeanVFE``'s output through the (M, P, D) voxels of :func:`hard_voxelize`, summed."""
    cap = encoder.max_voxels_train if encoder.training else encoder.max_voxels
    out = hard_voxelize(encoder.prepared(points), encoder.grid, encoder.max_points_per_voxel, cap, encoder.quantization)
    return out.coords, out.voxels.sum(dim=1) / out.num_points.to(out.voxels.dtype)[:, None]


def compare_voxelnext(
    model: SparseDetector, voxels: SparseVoxels, points: PointBatch, root: Path, alternation: Alternation,
    train: bool = False,
) -> dict:
    """Ours against OpenPCDet's ``VoxelResBackBone8xVoxelNeXt`` on the same voxels (CUDA), then
    voxelization and the whole detectors (:func:`compare_detectors`); see the module's description.

    Returns:
        Parameter counts, output cell counts, the largest differences of the optimised outputs from
        the layer-by-layer one (``inf`` where the cells differ), whether the voxel encoder gives the
        voxels of the torch path it replaced (the same kind of voxelization) and the largest
        difference of the means, the detectors' numbers, and ``timings``.
    """
    device = voxels.features.device
    grid = model.grid
    theirs_cls = load_openpcdet_voxelnext(root)
    # OpenPCDet's grid_size is (x, y, z); it pads z by one (sparse_shape = grid_size[::-1] + [1, 0, 0]).
    theirs = theirs_cls({}, voxels.features.shape[1], np.array(grid.grid_size)).to(device).eval()
    ours = model.backbone.eval()
    fused = fuse_for_inference(model).backbone
    fused_half = fuse_for_inference(model).half().backbone
    half_voxels = dataclasses.replace(voxels, features=voxels.features.half())

    def run_theirs():
        out = theirs({"voxel_features": voxels.features, "voxel_coords": voxels.coords, "batch_size": voxels.batch_size})
        return out["encoded_spconv_tensor"]

    def layer_by_layer(backbone, inputs):
        def call():
            with backbone.layer_by_layer():
                return backbone(inputs)
        return call

    with torch.no_grad():
        ref = layer_by_layer(ours, voxels)()  # the unoptimised path
        diff_index_first = max_abs_diff(ours(voxels), ref)
        diff_fused = max_abs_diff(fused(voxels), ref)
        diff_half = max_abs_diff(fused_half(half_voxels), ref)
        theirs_out = run_theirs()
        forward = {
            "ours fp32 layer by layer": layer_by_layer(ours, voxels),
            "ours fp32 index-first": lambda: ours(voxels),
            "ours fp32 fused, layer by layer": layer_by_layer(fused, voxels),
            "ours fp32 fused, index-first": lambda: fused(voxels),
            "OpenPCDet fp32": run_theirs,
            "ours fp16 autocast": _amp(lambda: ours(voxels)),
            "ours fp16 fused (half weights), layer by layer": layer_by_layer(fused_half, half_voxels),
            "ours fp16 fused (half weights), index-first": lambda: fused_half(half_voxels),
            "OpenPCDet fp16 autocast": _amp(run_theirs),
        }
        timings = alternation.measure(forward, device)
    if train:
        ours.train()
        theirs.train()

        def step(fn, use_amp):
            def call():
                with fp16_autocast(use_amp):
                    out = fn()
                out.features.float().sum().backward()
            return call

        steps = {
            "ours fwd+bwd fp32 layer by layer": step(layer_by_layer(ours, voxels), False),
            "ours fwd+bwd fp32 index-first": step(lambda: ours(voxels), False),
            "OpenPCDet fwd+bwd fp32": step(run_theirs, False),
            "ours fwd+bwd fp16 autocast layer by layer": step(layer_by_layer(ours, voxels), True),
            "ours fwd+bwd fp16 autocast index-first": step(lambda: ours(voxels), True),
            "OpenPCDet fwd+bwd fp16 autocast": step(run_theirs, True),
        }
        timings |= alternation.measure(steps, device)
        ours.zero_grad(set_to_none=True)
        theirs.zero_grad(set_to_none=True)
        ours.eval()
    encoder = model.voxel_encoder
    hard = getattr(encoder, "max_points_per_voxel", None) is not None
    before = _hard_mean_dense if hard else _dynamic_mean_torch
    name = f"hard, P = {encoder.max_points_per_voxel}" if hard else "dynamic"
    voxelize = {
        f"ours: {name} voxelize + mean": lambda: encoder(points),
        f"ours: {name} voxelize + mean, the torch path it replaced": lambda: before(encoder, points),
    }
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError:
        PointToVoxel = None
    if PointToVoxel is not None:
        gen = PointToVoxel(vsize_xyz=list(grid.voxel_size), coors_range_xyz=list(grid.point_cloud_range),
                           num_point_features=points.points.shape[1], max_num_voxels=len(voxels) + 1000,
                           max_num_points_per_voxel=10, device=device)
        voxelize["spconv PointToVoxel (no mean)"] = lambda: gen(points.points)
    with torch.no_grad():
        fast = encoder(points)
        before_coords, before_features = before(encoder, points)
        same_voxels = torch.equal(fast.coords, before_coords)
        diff_voxelize = (fast.features - before_features).abs().max().item() if same_voxels else math.inf
        timings |= alternation.measure(voxelize, device)
    detector = compare_detectors(model, points, root, alternation)
    timings |= detector.pop("timings")
    return {
        "openpcdet": str(root),
        "ours_backbone_parameters_M": round(count_parameters(ours) / 1e6, 4),
        "openpcdet_backbone_parameters_M": round(count_parameters(theirs) / 1e6, 4),
        "ours_bev_cells": len(ref.coords),
        "openpcdet_bev_cells": len(theirs_out.indices),
        "max_abs_diff_index_first_fp32": diff_index_first,
        "max_abs_diff_fused_fp32": diff_fused,
        "max_abs_diff_fused_half": diff_half,
        "max_abs_output": ref.features.abs().max().item(),
        "voxelize_same_voxels_as_before": same_voxels,
        "voxelize_max_abs_diff_vs_before": diff_voxelize,
        **detector,
        "timings": _as_json(timings),
    }


def compare_detectors(model: SparseDetector, points: PointBatch, root: Path, alternation: Alternation) -> dict:
    """Whole detectors, points to boxes, on one frame: ours (``predict``) against OpenPCDet's VoxelNeXt
    with its nuScenes config (:class:`~voxsparse.benchmark.openpcdet.OpenPCDetVoxelNeXt`, whose NMS
    kernel is not run, so its times are a lower bound).

    Returns:
        Parameter and detection counts, and ``timings`` as :class:`Timing` objects (not yet JSON).
    """
    grid = model.grid
    theirs = OpenPCDetVoxelNeXt(root, grid.voxel_size, grid.point_cloud_range, grid.grid_size,
                                points.points.shape[1]).to(points.points.device).eval()
    fused = fuse_for_inference(model)
    frame = points.points

    runners = {
        "detector: ours fp32": lambda: model.predict(points),
        "detector: ours fp32 fused": lambda: fused.predict(points),
        "detector: OpenPCDet fp32 (NMS kernel not run)": lambda: theirs(frame),
        "detector: ours fp16 autocast fused": _amp(lambda: fused.predict(points)),
        "detector: OpenPCDet fp16 autocast (NMS kernel not run)": _amp(lambda: theirs(frame)),
    }
    with torch.no_grad():
        ours_boxes = sum(len(d.scores) for d in model.predict(points))
        their_boxes = len(theirs(frame)[0]["pred_boxes"])
        timings = alternation.measure(runners, points.points.device)
    return {
        "ours_detector_parameters_M": round(count_parameters(model) / 1e6, 4),
        "openpcdet_detector_parameters_M": round(count_parameters(theirs) / 1e6, 4),
        "ours_detections": ours_boxes,
        "openpcdet_detections_without_nms": their_boxes,
        "timings": timings,
    }


def max_abs_diff(a: SparseBEV, b: SparseBEV) -> float:
    """Largest feature difference of two BEV outputs over the same cells, matched by coordinate
    (spconv's CUDA index generation lists output cells in a run-dependent order); ``inf`` where the
    cells differ."""
    shape = (a.batch_size, *a.spatial_shape)
    order_a = torch.argsort(linear_keys(a.coords, shape))
    order_b = torch.argsort(linear_keys(b.coords, shape))
    if not torch.equal(a.coords[order_a], b.coords[order_b]):
        return math.inf
    return (a.features[order_a].float() - b.features[order_b].float()).abs().max().item()


def compare_dsvt(
    ours_backbone: DSVTReferenceBackbone,
    voxels: SparseVoxels,
    root: Path,
    device: torch.device,
    alternation: Alternation = Alternation(),
    train: bool = False,
) -> dict:
    """Ours against OpenPCDet's DSVT (``dsvt_voxel.yaml``) on the same voxels, timed in alternation.

    Forward rows run without grad, in fp32 and (CUDA only: CPU fp16 kernels are no deployment path)
    under fp16 autocast; with ``train``, forward + backward of the summed output in both precisions.
    Both backbones are moved to ``device``; ours is left in the mode it came in. OpenPCDet's gets our
    weights (through the checkpoint converter) and both the same voxels and features, so their
    outputs are compared too.

    Args:
        ours_backbone: ``build_model("dsvt_voxel_waymo").backbone``.
        voxels: our voxel encoder's output on the 468 x 468 x 32 grid: coords (M, 4) int32
            (b, z, y, x), features (M, 192).
        root: an OpenPCDet checkout.

    Returns:
        Parameter counts, output pillar counts of both, whether their (b, y, x) cells agree and the
        largest difference of their features relative to the largest feature, and ``timings``:
        name -> ``dataclasses.asdict(Timing)``.
    """
    theirs = build_openpcdet_dsvt(root)
    state = ours_to_openpcdet(ours_backbone, ours_backbone.state_dict())
    state.pop("global_step")
    theirs.load_state_dict(state)  # our weights in theirs: the outputs must agree
    theirs = theirs.to(device).eval()
    was_training = ours_backbone.training
    ours = ours_backbone.to(device).eval()
    voxels = voxels.to(device)
    layer = theirs.input_layer
    if list(layer.sparse_shape) != list(voxels.grid.grid_size):
        raise ValueError(f"voxels on a {voxels.grid.grid_size} grid, OpenPCDet's DSVT expects {layer.sparse_shape}")
    features = voxels.features

    def run_ours() -> torch.Tensor:
        return ours(voxels).features

    def run_theirs_dict() -> dict:
        # DSVT overwrites voxel_features / voxel_coords in the dict it gets: a fresh one per call.
        return theirs({"voxel_features": features, "voxel_coords": voxels.coords, "batch_size": voxels.batch_size})

    def run_theirs() -> torch.Tensor:
        return run_theirs_dict()["pillar_features"]

    with torch.no_grad():
        bev = ours(voxels)
        out = run_theirs_dict()
    shape = (voxels.batch_size, *bev.spatial_shape)
    their_cells, their_order = torch.sort(linear_keys(out["voxel_coords"][:, [0, 2, 3]], shape))
    our_cells, our_order = torch.sort(linear_keys(bev.coords, shape))
    same_pillars = torch.equal(our_cells, their_cells)
    difference = None
    if same_pillars:
        theirs_features = out["pillar_features"][their_order]
        difference = float((bev.features[our_order] - theirs_features).abs().max() / theirs_features.abs().max())

    precisions = {"fp32": False} | ({"fp16 autocast": True} if device.type == "cuda" else {})
    runners = {"ours": run_ours, "OpenPCDet": run_theirs}

    def autocast(fn, enabled: bool, backward: bool):
        def call():
            with torch.autocast(device.type, dtype=torch.float16, enabled=enabled):
                out = fn()
            if backward:
                out.float().sum().backward()
        return call

    forward = {f"{who} {p}": autocast(fn, amp, False) for p, amp in precisions.items() for who, fn in runners.items()}
    with torch.no_grad():
        timings = alternation.measure(forward, device)
    if train:
        ours.train()
        theirs.train()
        steps = {
            f"{who} fwd+bwd {p}": autocast(fn, amp, True) for p, amp in precisions.items() for who, fn in runners.items()
        }
        timings |= alternation.measure(steps, device)
        ours.zero_grad(set_to_none=True)
    ours.train(was_training)
    return {
        "openpcdet": str(root),
        "voxels": len(voxels),
        "ours_backbone_parameters": count_parameters(ours),
        "openpcdet_backbone_parameters": count_parameters(theirs),
        "ours_bev_cells": len(bev),
        "openpcdet_pillars": len(out["pillar_features"]),
        "same_pillars": same_pillars,
        "max_relative_difference": difference,
        "timings": _as_json(timings),
    }
