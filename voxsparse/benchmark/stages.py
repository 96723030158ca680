"""A detector's stages timed one by one on one input, and a profiler trace of its backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from voxsparse.benchmark.inputs import dummy_annotations
from voxsparse.engine.cli import CONFIG_DIR
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.structures import PointBatch, SparseBEV, SparseVoxels
from voxsparse.utils.timing import Timing, measure

#: The row of :func:`time_training` whose median gives the training throughput.
TRAIN_STEP = "train step (loss + backward)"

#: Called with each row's name and timing as soon as that row is measured (a slow full-size run then
#: shows where it is).
RowReport = Callable[[str, Timing], None]


class _Rows(dict[str, Timing]):
    """Timings by row name that report each row as it is added."""

    def __init__(self, report: RowReport | None) -> None:
        super().__init__()
        self._report = report

    def __setitem__(self, name: str, timing: Timing) -> None:
        super().__setitem__(name, timing)
        if self._report is not None:
            self._report(name, timing)


def fp16_autocast(enabled: bool) -> torch.autocast:
    """CUDA float16 autocast, or a no-op when not ``enabled``."""
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)


def dataset_for(model: str) -> str:
    """The dataset config a model config is made for: the ``configs/dataset/`` name its own name
    contains (``voxelnext_nuscenes`` -> ``nuscenes``), else ``synthetic``. Reference configs group
    their dataset's classes, so they only build with that dataset's class names."""
    names = sorted(p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml"))
    return next((n for n in names if n != "synthetic" and n in model.split("_")), "synthetic")


def build_model(name: str) -> SparseDetector:
    """Instantiate ``configs/model/<name>.yaml`` with the class names of its dataset (:func:`dataset_for`)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", f"dataset={dataset_for(name)}"])
    return instantiate(cfg.model)


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements of ``module``."""
    return sum(p.numel() for p in module.parameters())


def time_inference(
    model: SparseDetector, points: PointBatch, amp: bool, repeats: int, warmup: int, report: RowReport | None = None
) -> tuple[dict[str, Timing], SparseVoxels, SparseBEV]:
    """Each stage of ``model`` (in eval mode) on its own input, then ``predict`` end to end, without grad
    (under CUDA fp16 autocast with ``amp``); ``report`` gets each row as it is measured.

    Returns:
        Timings of the rows "voxelize + VFE", "backbone", ("neck",) "head", "decode", "end to end"; the voxels
        and BEV cells of ``points``.
    """
    device = points.points.device
    timings = _Rows(report)
    with torch.no_grad(), fp16_autocast(amp):
        voxels = model.voxel_encoder(points)
        bev = model.backbone(voxels)
        head_input = bev if model.neck is None else model.neck(bev)
        preds = model.head(head_input)
        timings["voxelize + VFE"] = measure(lambda: model.voxel_encoder(points), device, repeats, warmup)
        timings["backbone"] = measure(lambda: model.backbone(voxels), device, repeats, warmup)
        if model.neck is not None:
            timings["neck"] = measure(lambda: model.neck(bev), device, repeats, warmup)
        timings["head"] = measure(lambda: model.head(head_input), device, repeats, warmup)
        timings["decode"] = measure(lambda: model.head.decode(preds), device, repeats, warmup)
        timings["end to end"] = measure(lambda: model.predict(points), device, repeats, warmup)
    return dict(timings), voxels, bev


def time_training(
    model: SparseDetector, points: PointBatch, voxels: SparseVoxels, amp: bool, repeats: int, warmup: int,
    report: RowReport | None = None,
) -> dict[str, Timing]:
    """The backbone's forward + backward and a whole training step (loss against one dummy box per
    frame); with ``amp``, forwards under CUDA fp16 autocast and a gradient scaler; ``report`` gets each
    row as it is measured. ``model`` is left in eval mode.

    Returns:
        Timings of the rows "backbone fwd+bwd" and :data:`TRAIN_STEP`.
    """
    device = points.points.device
    model.train()
    annotations = [dummy_annotations(device)] * points.batch_size
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def backbone_step() -> None:
        with fp16_autocast(amp):
            bev = model.backbone(voxels)
        bev.features.float().sum().backward()
        model.zero_grad(set_to_none=True)

    def step() -> None:
        with fp16_autocast(amp):
            preds = model(points)
        loss = model.head.loss(preds, annotations).total
        scaler.scale(loss).backward()
        model.zero_grad(set_to_none=True)

    timings = _Rows(report)
    timings["backbone fwd+bwd"] = measure(backbone_step, device, repeats, warmup)
    timings[TRAIN_STEP] = measure(step, device, repeats, warmup)
    model.eval()
    return dict(timings)


def profile_backbone(model: SparseDetector, voxels: SparseVoxels, amp: bool, out_dir: Path) -> None:
    """torch.profiler over five backbone forwards (under CUDA fp16 autocast with ``amp``): a kernel table
    and a Chrome trace in ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if voxels.features.is_cuda else [])
    with torch.no_grad(), fp16_autocast(amp), profile(activities=activities, record_shapes=False) as prof:
        for _ in range(5):
            model.backbone(voxels)
        if voxels.features.is_cuda:
            torch.cuda.synchronize()
    sort = "cuda_time_total" if voxels.features.is_cuda else "cpu_time_total"
    (out_dir / "backbone_profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=60))
    prof.export_chrome_trace(str(out_dir / "backbone_trace.json"))
