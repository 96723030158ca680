"""Evaluate a checkpoint, or score a saved predictions file, on a dataset's validation split.

    python tools/eval.py checkpoint=outputs/voxelnext_small/<run>/last.pth
    python tools/eval.py predictions=outputs/voxelnext_small/<run>/predictions.pt

Writes ``predictions.pt`` (checkpoint mode) and ``metrics.json`` to the run directory and logs a
per-class AP table at LEVEL_1 and LEVEL_2.
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
from voxsparse.engine.evaluate import report, score_predictions
from voxsparse.engine.inference import DatasetPredictions, predict_dataset
from voxsparse.evaluation.predictions_io import load_predictions, save_predictions

log = logging.getLogger("voxsparse.eval")


def _from_predictions_file(cfg: DictConfig) -> tuple[DatasetPredictions, list[str]]:
    content = load_predictions(cfg.predictions)
    # Crop the ground truth exactly as it was when the model's predictions were made.
    val_set = DetectionDataset(instantiate(cfg.dataset.val), content.point_cloud_range)
    by_id = dict(zip(content.frame_ids, content.detections))
    samples = [val_set[i] for i in range(len(val_set))]
    missing = [s.frame_id for s in samples if s.frame_id not in by_id]
    if missing:
        raise ValueError(
            f"predictions file {cfg.predictions}: {len(missing)} of {len(samples)} frames of the evaluated split have "
            f"no entry (first: {missing[:3]}); a frame with no detections must still be listed"
        )
    return (
        DatasetPredictions([s.frame_id for s in samples], [by_id[s.frame_id] for s in samples], [s.annotations for s in samples]),
        content.class_names,
    )


@hydra.main(config_path="../configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if (cfg.checkpoint is None) == (cfg.predictions is None):
        raise ValueError("give exactly one of checkpoint=PATH or predictions=PATH")
    info = init_distributed(cfg.device)
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.checkpoint is not None:
        ckpt = load_checkpoint(cfg.checkpoint)
        model = instantiate(OmegaConf.create(ckpt.config["model"]))
        model.load_state_dict(ckpt.model)
        model.to(info.device)
        val_set = DetectionDataset(instantiate(cfg.dataset.val), model.grid.point_cloud_range)
        predictions = predict_dataset(model, val_set, info, batch_size=cfg.batch_size)
        class_names = list(model.class_names)
        if info.is_main:
            save_predictions(output_dir / "predictions.pt", predictions.to_file(class_names, model.grid))
    else:
        predictions, class_names = _from_predictions_file(cfg)
    if info.is_main:
        report(score_predictions(predictions, class_names, cfg.dataset.iou_thresholds), output_dir)
        log.info("results in %s", output_dir)
    cleanup(info)


if __name__ == "__main__":
    main()
