"""Evaluate a checkpoint, or score a saved predictions file, on a dataset's validation split.

    python tools/eval.py checkpoint=outputs/voxelnext_small/<run>/last.pth
    python tools/eval.py predictions=outputs/voxelnext_small/<run>/predictions.pt [missing_frames=miss]

The metric suite is the one the dataset config names in ``evaluation`` (``waymo``: AP / APH per
class and per range bin at LEVEL_1 and LEVEL_2). Writes ``predictions.pt`` (checkpoint mode) and
``metrics.json`` (every number; null where a metric has nothing to measure) to the run directory
and logs the tables. A predictions file is scored without building the model; the rules for its
class names and frames are in ``voxsparse.engine.evaluate``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from voxsparse.data.dataset import DetectionDataset
from voxsparse.engine.checkpoint import load_checkpoint
from voxsparse.engine.distributed import cleanup, init_distributed
from voxsparse.engine.evaluate import frames_from_file, metric_suite, report, score_model_predictions
from voxsparse.engine.inference import DatasetPredictions, predict_dataset
from voxsparse.evaluation.predictions_io import load_predictions, save_predictions

log = logging.getLogger("voxsparse.eval")


def _from_predictions_file(cfg: DictConfig) -> DatasetPredictions:
    content = load_predictions(cfg.predictions)
    # Crop the ground truth exactly as it was when the model's predictions were made.
    val_set = DetectionDataset(instantiate(cfg.dataset.val), content.point_cloud_range)
    samples = [val_set[i] for i in range(len(val_set))]
    frame_ids = [s.frame_id for s in samples]
    detections = frames_from_file(
        content,
        frame_ids,
        list(cfg.dataset.class_names),
        cfg.missing_frames,
        f"predictions file {cfg.predictions}",
    )
    return DatasetPredictions(frame_ids, detections, [s.annotations for s in samples])


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if (cfg.checkpoint is None) == (cfg.predictions is None):
        raise ValueError("give exactly one of checkpoint=PATH or predictions=PATH")
    suite = metric_suite(cfg.dataset)  # an unknown suite fails before any inference
    info = init_distributed(cfg.device)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(cfg.checkpoint)
        model = instantiate(OmegaConf.create(ckpt.config["model"]))
        model.load_state_dict(ckpt.model)
        model.to(info.device)
        val_set = DetectionDataset(instantiate(cfg.dataset.val), model.grid.point_cloud_range)
        predictions = predict_dataset(model, val_set, info, batch_size=cfg.batch_size)
        if info.is_main:
            save_predictions(
                output_dir / "predictions.pt", predictions.to_file(model.class_names, model.grid)
            )
            keypoint_labels = getattr(model, "keypoint_labels", None)
            result = score_model_predictions(
                predictions, model.class_names, cfg.dataset, f"checkpoint {cfg.checkpoint}", keypoint_labels
            )
    elif info.is_main:  # a predictions file holds boxes only: detection metrics
        result = suite(_from_predictions_file(cfg), cfg.dataset)
    if info.is_main:
        report(result, output_dir)
        log.info("results in %s", output_dir)
    cleanup(info)


if __name__ == "__main__":
    main()
