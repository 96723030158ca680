"""Export a checkpoint's detector, points to decoded boxes, as one file that runs without the model code.

    python tools/export.py checkpoint=outputs/voxelnext_small/<run>/last.pth format=pt2
    python tools/export.py checkpoint=... format=onnx output=dsvt.onnx batch_size=2

``pt2``: an AOTInductor package; spconv's kernels are custom ops, so the process that loads it first
imports ``voxsparse.ops.export_ops`` (torch and spconv, no model code), then
``voxsparse.ops.export_ops.load_package(path)(points, batch_index)``. ``pt2`` with
``sparse_ops=torch``: the sparse convolutions in plain torch, a package that torch alone runs, from
Python or from C++ (``tools/cpp/run_pt2.cpp``). ``onnx``: sparse convolutions in plain torch, for
onnxruntime. Inputs: points (N, 3 + C) float32 in the model's point convention
and batch_index (N,) int64; outputs: boxes, scores, labels, frame (``voxsparse.engine.export``).
The tool runs the written file on an example and logs its largest difference from the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import voxsparse
from voxsparse.engine.cli import tool
from voxsparse.engine.config import parse_options
from voxsparse.engine.export import FORMATS, example_points, export_detector

log = logging.getLogger("voxsparse.export")


@dataclass
class ExportOptions:
    """The tool's options (configs/export.yaml)."""

    checkpoint: str | None = None
    format: str = "pt2"
    output: str | None = None
    batch_size: int = 1
    example_points: int = 2000
    seed: int = 0
    sparse_ops: str = "custom"


@tool("export")
def main(cfg: DictConfig) -> None:
    opts = parse_options(cfg, ExportOptions)
    if opts.checkpoint is None:
        raise ValueError("give checkpoint=PATH")
    if opts.format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {opts.format!r}")
    if opts.batch_size < 1 or opts.example_points < 1:
        raise ValueError(f"batch_size and example_points: expected >= 1, got {opts.batch_size}, {opts.example_points}")
    output = Path(opts.output or Path(HydraConfig.get().runtime.output_dir) / f"model.{opts.format}")
    model = voxsparse.load_model(opts.checkpoint, "cpu")
    example = example_points(model.grid, opts.example_points, model.voxel_encoder.in_channels, opts.batch_size,
                             opts.seed)
    if opts.format == "onnx" and opts.sparse_ops != "custom":
        raise ValueError("sparse_ops: an ONNX file always has its sparse convolutions in plain torch; "
                         "the option is for format=pt2")
    report = export_detector(model, output, opts.format, opts.batch_size, example, opts.sparse_ops)
    c = report.comparison
    log.info("%s written in %.1f s; on %d example points per frame: %d detections, %d unmatched, largest "
             "difference from the model: boxes %.2g, scores %.2g", report.path, report.seconds,
             opts.example_points, c.detections, c.unmatched, c.max_box_difference, c.max_score_difference)
    if not c.equal:
        log.warning("the exported program's outputs differ from the model's beyond float tolerance")


if __name__ == "__main__":
    main()
