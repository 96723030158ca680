"""Train a detector.

    python tools/train.py                                  # small VoxelNeXt on the synthetic world (CPU ok)
    python tools/train.py model=centerpoint_small          # the dense CenterPoint-head baseline
    python tools/train.py resume=outputs/.../last.pth      # continue a run, in its own folder
    python tools/train.py resume=outputs/.../last.pth trainer.epochs=20   # extend a finished run
    torchrun --nproc_per_node=2 tools/train.py trainer.batch_size=1   # DDP (gloo on CPU, NCCL on GPU)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from voxsparse.data.dataset import DetectionDataset, fill_cache
from voxsparse.engine.cli import tool
from voxsparse.engine.config import check_types, parse_options
from voxsparse.engine.distributed import barrier, cleanup, init_distributed
from voxsparse.engine.evaluate import metric_suite, report, score_model_predictions
from voxsparse.engine.inference import predict_dataset
from voxsparse.engine.trainer import Trainer
from voxsparse.evaluation.predictions_io import save_predictions

log = logging.getLogger("voxsparse.train")

# A resumed run writes into the folder of the checkpoint it resumes (configs/train.yaml, hydra.run.dir).
OmegaConf.register_new_resolver(
    "run_dir", lambda resume, default: str(Path(resume).parent) if resume else default, replace=True
)


@dataclass
class TrainOptions:
    """The tool's own options (configs/train.yaml)."""

    name: str
    device: str = "auto"
    resume: str | None = None
    resume_allow_model_change: bool = False
    evaluate: bool = True


@tool("train")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, TrainOptions)
    for section in ("trainer", "model", "dataset"):
        check_types(cfg[section], section)
    info = init_distributed(opts.device)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.trainer.seed)
    model = instantiate(cfg.model)
    if opts.evaluate:
        metric_suite(cfg.dataset)  # an unknown suite fails before training, not after
    if info.is_main:
        params = sum(p.numel() for p in model.parameters())
        log.info("model %s: %.2f M parameters; output in %s", opts.name, params / 1e6, output_dir)
    train_source, val_source = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    if cfg.dataset.get("cache_dir") and cfg.dataset.get("cache_workers", 0) and info.is_main:
        fill_cache(train_source, cfg.dataset.cache_workers, desc="generate train")
        if opts.evaluate:
            fill_cache(val_source, cfg.dataset.cache_workers, desc="generate val")
    barrier(info)
    train_set = DetectionDataset(
        train_source, model.grid.point_cloud_range,
        [instantiate(t) for t in cfg.dataset.augmentations],
        seed=cfg.trainer.seed,
    )
    trainer = Trainer(
        model, train_set, instantiate(cfg.trainer), output_dir, info, OmegaConf.to_container(cfg, resolve=True)
    )
    if opts.resume:
        trainer.resume(opts.resume, allow_model_change=opts.resume_allow_model_change)
    trainer.fit()

    if opts.evaluate:
        val_set = DetectionDataset(val_source, model.grid.point_cloud_range)
        predictions = predict_dataset(model, val_set, info, batch_size=cfg.trainer.batch_size, use_amp=trainer.use_amp)
        if info.is_main:
            save_predictions(output_dir / "predictions.pt", predictions.to_file(model.class_names, model.grid))
            keypoint_labels = getattr(model, "keypoint_labels", None)
            report(score_model_predictions(predictions, model.class_names, cfg.dataset, "model", keypoint_labels), output_dir)
    cleanup(info)


if __name__ == "__main__":
    main()
