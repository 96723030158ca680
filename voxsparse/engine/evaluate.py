"""Evaluate a detector on a dataset split and report the numbers (table, JSON, predictions file)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from voxsparse.engine.inference import DatasetPredictions
from voxsparse.evaluation.detection import DetectionMetrics, evaluate_detection
from voxsparse.utils.io import atomic_write

log = logging.getLogger(__name__)


def score_predictions(
    predictions: DatasetPredictions, class_names: Sequence[str], iou_thresholds: Mapping[str, float]
) -> dict[str, DetectionMetrics]:
    """Per-class 3D AP at LEVEL_1 and LEVEL_2 difficulty."""
    return {
        f"LEVEL_{level}": evaluate_detection(
            predictions.detections, predictions.annotations, class_names, dict(iou_thresholds), difficulty=level
        )
        for level in (1, 2)
    }


def report(metrics: Mapping[str, DetectionMetrics], output_dir: str | Path) -> dict[str, Any]:
    """Log a readable table per difficulty and write ``metrics.json``; returns the JSON content."""
    output_dir = Path(output_dir)
    content = {}
    for level, m in metrics.items():
        log.info("3D detection, %s:\n%s", level, m.table())
        content[level] = m.to_dict()
    text = json.dumps(content, indent=2, allow_nan=True).encode()
    atomic_write(output_dir / "metrics.json", lambda f: f.write(text))
    return content
