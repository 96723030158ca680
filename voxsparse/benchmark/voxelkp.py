"""VoxelKP speed: training steps/s of ``voxelkp_small`` and a Waymo-size forward of
``voxelkp_waymo_reference`` beside the authors' modules, with the profiler's top entries.

    python tools/benchmark.py --voxelkp --device cuda                          # both, batch 4
    python tools/benchmark.py --voxelkp --device cuda --compare /path/to/VoxelKP   # + the authors'
    python tools/benchmark.py --voxelkp box_attention --device cuda   # a module switched off (also
                                                                      # selective_kernel, hybrid, ...)

Training: ``--batch`` synthetic training frames with their humans' keypoints (the model's range),
one step = ``loss`` + backward + AdamW step (optionally under fp16 autocast), timed alone (from its
launch to its last kernel) and back to back (a loop's rate: one step's host work overlaps the device
work of the one before; the trainer lies between the two, reading the loss after each forward).
On CUDA it is timed with both paths of the 5x5x5 convolutions, the gather tables of
:mod:`voxsparse.ops.cuda_sparse_conv` and spconv's own loop, alternating over ``--rounds``.
Forward: the reference config in eval mode on one synthetic frame of ``--voxels`` voxels of its grid
(Waymo scale: ~100k), detector forward without grad (voxelization included). With ``--compare``,
the authors' backbone and head (``VoxelResBackBone8xVoxelNeXtEffv2Next4``, ``VoxelNeXtHeadKPMerge``,
executed by file path from the checkout with random weights) run on the same voxels in alternation
with ours. Their SpTr window attention is a compiled extension that a plain checkout lacks;
:class:`SpTrStandIn` computes it in torch (one softmax attention per window, a Python loop over
windows, as their kernel's result): their time is that stand-in's, not SpTr's.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from voxsparse.benchmark import openpcdet as harness
from voxsparse.benchmark.inputs import synthetic_frames
from voxsparse.benchmark.stages import dataset_for, fp16_autocast
from voxsparse.data.dataset import DetectionDataset
from voxsparse.data.sample import collate
from voxsparse.data.synthetic import SyntheticDataset
from voxsparse.engine.cli import CONFIG_DIR
from voxsparse.ops import cuda_sparse_conv
from voxsparse.structures import PointBatch, VoxelGrid
from voxsparse.utils.timing import Timing, measure, measure_back_to_back

#: The authors' Waymo config in their repository.
AUTHORS_CONFIG = "tools/cfgs/waymo_models/kp_effv2next4_voxelnext_iou_aug_bev_channel.yaml"


# ---------------------------------------------------------------- the authors' modules, by path


class SpTrTensor:
    """SpTr's ``SparseTrTensor``: features, (N, 4) indices, an index cache."""

    def __init__(self, query_feats, query_indices, spatial_shape, batch_size, key_feats=None, value_feats=None,
                 key_indices=None):
        self.query_feats, self.query_indices = query_feats, query_indices
        self.key_feats, self.value_feats, self.key_indices = key_feats, value_feats, key_indices
        self.spatial_shape, self.batch_size, self.indice_dict = spatial_shape, batch_size, {}


class SpTrStandIn(nn.Module):
    """SpTr's ``VarLengthMultiheadSA`` (no positional encoding, unshifted windows) in plain torch."""

    def __init__(self, embed_dim, num_heads, indice_key, window_size, shift_win=False, pe_type="none", dropout=0.0,
                 qk_scale=None, qkv_bias=True, **kwargs):
        super().__init__()
        assert pe_type == "none" and not shift_win
        self.num_heads, self.window_size = num_heads, np.asarray(window_size)
        self.scale = qk_scale or (embed_dim // num_heads) ** -0.5
        self.q = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.k = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.v = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(dropout, inplace=True)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(dropout, inplace=True)

    def forward(self, tensor: SpTrTensor) -> SpTrTensor:
        query = tensor.query_feats
        key = query.clone() if tensor.key_feats is None else tensor.key_feats
        value = query.clone() if tensor.value_feats is None else tensor.value_feats
        n, c = query.shape
        h = self.num_heads
        q = self.q(query).reshape(n, h, c // h) * self.scale
        k, v = self.k(key).reshape(n, h, c // h), self.v(value).reshape(n, h, c // h)
        # torch_geometric.voxel_grid(xyz, batch, size) with no start: cells counted from each axis'
        # minimum, the batch index one more axis of size 1.
        pos = torch.cat([tensor.query_indices[:, 1:], tensor.query_indices[:, :1]], dim=1).long()
        size = torch.tensor([*self.window_size.tolist(), 1], device=pos.device)
        _, cluster = torch.unique((pos - pos.min(0).values) // size, dim=0, return_inverse=True)
        out = torch.empty_like(q)
        for window in torch.unique(cluster):
            rows = torch.nonzero(cluster == window).squeeze(1)
            attn = torch.einsum("nhd,mhd->nmh", q[rows], k[rows]).softmax(dim=1)
            out[rows] = torch.einsum("nmh,mhd->nhd", attn, v[rows])
        x = self.proj_drop(self.proj(out.reshape(n, c)))
        return SpTrTensor(x, tensor.query_indices, tensor.spatial_shape, tensor.batch_size)


def _unavailable(*args, **kwargs):
    raise RuntimeError("not part of the VoxelKP paper config")


def _install_voxelkp_stubs() -> None:
    modules = {
        "sptr": {"VarLengthMultiheadSA": SpTrStandIn, "SparseTrTensor": SpTrTensor},
        "sptr.utils": {"to_3d_numpy": np.asarray, "get_indices_params": _unavailable},
        "sptr.modules": {"sparse_self_attention": _unavailable, "SparseTrTensor": SpTrTensor},
        "timm": {}, "timm.models": {},
        "timm.models.layers": {"DropPath": lambda p=0.0: nn.Identity(), "trunc_normal_": nn.init.trunc_normal_},
    }
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def load_authors_modules(root: Path) -> tuple[type[nn.Module], type[nn.Module]]:
    """The authors' ``VoxelResBackBone8xVoxelNeXtEffv2Next4`` and ``VoxelNeXtHeadKPMerge`` classes."""
    harness._forget_pcdet()
    harness._stub_all_packages(root)
    harness._install_stubs()
    _install_voxelkp_stubs()
    backbone = importlib.import_module("pcdet.models.backbones_3d.spconv_backbone_voxelnext_deBEV_effv2next4")
    head = importlib.import_module("pcdet.models.dense_heads.voxelnext_head_kp_merge")
    return backbone.VoxelResBackBone8xVoxelNeXtEffv2Next4, head.VoxelNeXtHeadKPMerge


def build_authors(root: Path, grid: VoxelGrid, class_names: list[str] | tuple[str, ...],
                  overrides: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """The authors' backbone (5 point features) and head for ``class_names`` from
    :data:`AUTHORS_CONFIG` with ``overrides`` (dotted config keys), on the CPU."""
    backbone_cls, head_cls = load_authors_modules(root)
    cfg = harness.load_reference_config(root, AUTHORS_CONFIG, overrides)["MODEL"]
    with harness._reference_patches(torch.device("cpu")):
        backbone = backbone_cls(harness._attr_dict(cfg["BACKBONE_3D"]), 5, np.array(grid.grid_size))
        head = head_cls(harness._attr_dict(cfg["DENSE_HEAD"]), cfg["DENSE_HEAD"]["INPUT_FEATURES"],
                        len(class_names), list(class_names), np.array(grid.grid_size), np.array(grid.point_cloud_range),
                        np.array(grid.voxel_size))
    return backbone, head


# ---------------------------------------------------------------- timings


@dataclass
class VoxelKPSpeedOptions:
    """What :func:`run_voxelkp_speed` measures (``tools/benchmark.py --voxelkp``)."""

    device: str
    train_model: str = "voxelkp_small"
    forward_model: str = "voxelkp_waymo_reference"
    batch: int = 4
    voxels: int = 100_000
    repeats: int = 15
    warmup: int = 3
    amp: bool = False
    train: bool = True
    forward: bool = True
    modules_off: tuple[str, ...] = ()  # VoxelKPBackbone switches turned off, e.g. ("box_attention",)
    compare: Path | None = None
    rounds: int = 5
    profile_rows: int = 15  # 0: no profile


def training_step(model: nn.Module, batch, amp: bool):
    """One training step as the trainer takes it: loss, backward, AdamW step; returns the step function."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=next(model.parameters()).is_cuda)  # as the trainer
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step() -> None:
        with fp16_autocast(amp):
            losses = model.loss(batch.points, batch.annotations)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.total).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _profile(fn, device: torch.device, rows: int) -> str:
    """The top ``rows`` of a torch.profiler table over 3 calls of ``fn`` by self host time, and on
    CUDA a second one by self device time (empty for 0 rows). A step whose wall time exceeds its
    device time is bound by host work, which only the first table shows."""
    from torch.profiler import ProfilerActivity, profile

    if rows <= 0:
        return ""

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    tables = [f"by self host time:\n{averages.table(sort_by='self_cpu_time_total', row_limit=rows)}"]
    if device.type == "cuda":
        tables.append(f"by self CUDA time:\n{averages.table(sort_by='self_cuda_time_total', row_limit=rows)}")
    return "\n".join(tables)


@dataclass(frozen=True)
class StepTiming:
    """Training step times with one path for the large-kernel convolutions.

    Attributes:
        path: ``"gather tables"`` or ``"spconv loop"`` on CUDA (:mod:`voxsparse.ops.cuda_sparse_conv`),
            ``""`` on the CPU, which has one path.
        alone: each step synchronised on its own; over several rounds the median of the rounds'
            medians, the lowest p10 and the highest p90 (ms).
        back_to_back_ms: mean ms of steps launched back to back, median over the rounds.
    """

    path: str
    alone: Timing
    back_to_back_ms: float


def time_training(options: VoxelKPSpeedOptions) -> tuple[list[StepTiming], str]:
    """Training step timings of ``options.train_model`` at ``options.batch`` frames, per large-kernel
    path (on CUDA both, alternating over ``options.rounds``), and the profile with the default path."""
    device = torch.device(options.device)
    torch.manual_seed(0)
    overrides = [f"model.backbone.{name}=false" for name in options.modules_off]
    model = _build(options.train_model, overrides).to(device).train()
    frames = DetectionDataset(SyntheticDataset("train", num_frames=options.batch, seed=0),
                              tuple(model.voxel_encoder.grid.point_cloud_range))
    batch = collate([frames[i] for i in range(options.batch)]).to(device)
    step = training_step(model, batch, options.amp)
    paths = {"gather tables": True, "spconv loop": False} if device.type == "cuda" else {"": True}
    rounds: dict[str, list[tuple[Timing, float]]] = {path: [] for path in paths}
    default = cuda_sparse_conv.enabled
    try:
        for _ in range(options.rounds if device.type == "cuda" else 1):
            for path, enabled in paths.items():
                cuda_sparse_conv.enabled = enabled
                timing = measure(step, device, options.repeats, options.warmup)
                rounds[path].append((timing, measure_back_to_back(step, device, options.repeats)))
    finally:
        cuda_sparse_conv.enabled = default
    results = []
    for path, measured in rounds.items():
        timings = [t for t, _ in measured]
        peaks = [t.peak_memory_mb for t in timings if t.peak_memory_mb is not None]
        alone = Timing(float(np.median([t.median_ms for t in timings])), min(t.p10_ms for t in timings),
                       max(t.p90_ms for t in timings), sum(t.repeats for t in timings), max(peaks) if peaks else None)
        results.append(StepTiming(path, alone, float(np.median([b for _, b in measured]))))
    return results, _profile(step, device, options.profile_rows)


def _build(name: str, overrides: list[str]) -> nn.Module:
    """``configs/model/<name>.yaml`` with Hydra ``overrides``, with its dataset's class names."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"dataset={dataset_for(name)}", *overrides])
    return instantiate(cfg.model)


def time_forward(options: VoxelKPSpeedOptions) -> dict:
    """Forward timings (ms) at Waymo size: ours and, with ``compare``, the authors' on the same voxels."""
    device = torch.device(options.device)
    torch.manual_seed(0)
    model = _build(options.forward_model, []).to(device).eval()
    (frame,) = synthetic_frames(1, model.voxel_encoder.grid, 5, 200_000, options.voxels or None)
    points = PointBatch.from_frames([frame]).to(device)
    with torch.no_grad():
        voxels = model.voxel_encoder(points)
    result: dict = {"voxels": len(voxels.coords), "points": len(points.points)}

    def ours() -> None:
        with torch.no_grad(), fp16_autocast(options.amp):
            model.head(model.backbone(voxels))

    runs = {"ours (backbone + head)": ours}
    if options.compare is not None:
        grid = model.voxel_encoder.grid
        backbone, head = build_authors(options.compare, grid, model.class_names)
        backbone, head = backbone.to(device).eval(), head.to(device).eval()
        feed = {"voxel_features": voxels.features, "voxel_coords": voxels.coords.int(), "batch_size": 1}

        def theirs() -> None:
            with torch.no_grad(), fp16_autocast(options.amp), harness._reference_patches(device):
                x = backbone(dict(feed))["encoded_spconv_tensor"]
                head.heads_list[0](x)

        runs["authors' (backbone + head, SpTr stand-in)"] = theirs
    timings: dict[str, list[Timing]] = {name: [] for name in runs}
    for _ in range(options.rounds if options.compare else 1):
        for name, fn in runs.items():
            timings[name].append(measure(fn, device, max(1, options.repeats // 3), 1))
    result["forward_ms"] = {name: float(np.median([t.median_ms for t in ts])) for name, ts in timings.items()}
    result["profile"] = _profile(ours, device, options.profile_rows)
    return result


def run_voxelkp_speed(options: VoxelKPSpeedOptions, report: Callable[[str], None] = print) -> None:
    """Every measurement ``options`` asks for, handed to ``report`` as text as each finishes."""
    report(f"VoxelKP speed on {options.device}" + (" (fp16 autocast)" if options.amp else ""))
    if options.train:
        results, profile = time_training(options)
        off = f", off: {', '.join(options.modules_off)}" if options.modules_off else ""
        for result in results:
            timing, back_to_back = result.alone, result.back_to_back_ms
            path = f", 5x5x5 by {result.path}" if result.path else ""
            report(f"{options.train_model} training, batch {options.batch}{off}{path}: {timing.median_ms:.1f} ms/step "
                   f"(p10 {timing.p10_ms:.1f}, p90 {timing.p90_ms:.1f}) = {1000 / timing.median_ms:.2f} steps/s"
                   + (f", peak {timing.peak_memory_mb:.0f} MB" if timing.peak_memory_mb else "")
                   + f"; back to back {back_to_back:.1f} ms/step = {1000 / back_to_back:.2f} steps/s")
        report(profile)
    if options.forward:
        result = time_forward(options)
        report(f"{options.forward_model} forward on {result['voxels']} voxels ({result['points']} points):")
        for name, ms in result["forward_ms"].items():
            report(f"  {name}: {ms:.1f} ms")
        report(result["profile"])
