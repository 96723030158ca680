"""Evaluate a checkpoint, or score a saved predictions file, on a dataset's validation split.

    python tools/eval.py checkpoint=outputs/voxelnext_small/<run>/last.pth
    python tools/eval.py predictions=outputs/voxelnext_small/<run>/predictions.pt [missing_frames=miss]
    python tools/eval.py gt=validation_gt.bin predictions=predictions.bin    # Waymo Objects files

The metric suite is the one the dataset config names in ``evaluation`` (``waymo``: AP / APH per
class and per range bin at LEVEL_1 and LEVEL_2). Writes ``predictions.pt`` (checkpoint mode) and
``metrics.json`` (every number; null where a metric has nothing to measure) to the run directory
and logs the tables. A predictions file is scored without building the model; the rules for its
class names and frames are in ``voxsparse.engine.evaluate``; ``gt=`` scores Waymo ``.bin`` files alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import voxsparse
from voxsparse.data.dataset import DetectionDataset
from voxsparse.engine.cli import tool
from voxsparse.engine.config import check_types, parse_options
from voxsparse.engine.distributed import cleanup, init_distributed
from voxsparse.engine.evaluate import (
    MISSING_FRAME_RULES,
    check_frames,
    frames_from_file,
    metric_suite,
    report,
    score_model_predictions,
    score_waymo_files,
)
from voxsparse.engine.inference import DatasetPredictions, predict_dataset
from voxsparse.evaluation.predictions_io import load_predictions, save_predictions

log = logging.getLogger("voxsparse.eval")


@dataclass
class EvalOptions:
    """The tool's own options (configs/eval.yaml)."""

    checkpoint: str | None = None
    predictions: str | None = None
    gt: str | None = None
    missing_frames: str = "error"
    device: str = "auto"
    batch_size: int = 4


def _from_predictions_file(opts: EvalOptions, cfg: DictConfig) -> DatasetPredictions:
    content = load_predictions(opts.predictions)
    source = instantiate(cfg.dataset.val)
    where = f"predictions file {opts.predictions}"
    if hasattr(source, "frame_ids"):  # check the frames before any is generated or read
        check_frames(content, source.frame_ids, opts.missing_frames, where)
    # Crop the ground truth exactly as it was when the model's predictions were made.
    val_set = DetectionDataset(source, content.point_cloud_range)
    samples = [val_set[i] for i in range(len(val_set))]
    frame_ids = [s.frame_id for s in samples]
    detections = frames_from_file(content, frame_ids, list(cfg.dataset.class_names), opts.missing_frames, where)
    return DatasetPredictions(frame_ids, detections, [s.annotations for s in samples])


@tool("eval")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, EvalOptions)
    if opts.gt is not None:  # two Waymo .bin files: no dataset, no model
        if opts.checkpoint is not None:
            raise ValueError("gt=PATH scores a predictions=PATH .bin file, not a checkpoint")
        report(score_waymo_files(opts.gt, opts.predictions), HydraConfig.get().runtime.output_dir)
        return
    # Augmentations are training's (they may name trainer.* keys, which eval has not).
    check_types(OmegaConf.masked_copy(cfg.dataset, [k for k in cfg.dataset if k != "augmentations"]), "dataset")
    if (opts.checkpoint is None) == (opts.predictions is None):
        raise ValueError("give exactly one of checkpoint=PATH or predictions=PATH")
    if opts.missing_frames not in MISSING_FRAME_RULES:
        raise ValueError(f"missing_frames: expected one of {MISSING_FRAME_RULES}, got {opts.missing_frames!r}")
    suite = metric_suite(cfg.dataset)  # an unknown suite fails before any inference
    info = init_distributed(opts.device)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if opts.checkpoint is not None:
        model = voxsparse.load_model(opts.checkpoint, info.device)
        val_set = DetectionDataset(instantiate(cfg.dataset.val), model.grid.point_cloud_range)
        predictions = predict_dataset(model, val_set, info, batch_size=opts.batch_size)
        if info.is_main:
            save_predictions(
                output_dir / "predictions.pt", predictions.to_file(model.class_names, model.grid)
            )
            keypoint_labels = getattr(model, "keypoint_labels", None)
            result = score_model_predictions(
                predictions, model.class_names, cfg.dataset, f"checkpoint {opts.checkpoint}", keypoint_labels
            )
    elif info.is_main:  # a predictions file holds boxes only: detection metrics
        result = suite(_from_predictions_file(opts, cfg), cfg.dataset)
    if info.is_main:
        report(result, output_dir)
        log.info("results in %s", output_dir)
    cleanup(info)


if __name__ == "__main__":
    main()
