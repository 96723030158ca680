"""Whole-detector export: points in, decoded boxes out, as a ``torch.export`` program, an AOTInductor
``.pt2`` package or an ONNX file.

What is exported is :class:`DetectorProgram`: a :class:`~voxsparse.models.detectors.sparse_detector.SparseDetector`
in eval mode as a function of plain tensors, voxelizer to decoded boxes, with the number of points
a dynamic dimension. The frame count of a batch is fixed at export time (the head decodes frame by
frame).

- ``pt2``: ``torch.export`` (strict) with spconv's kernels as the custom ops of
  :mod:`voxsparse.ops.export_ops`, compiled by AOTInductor into one package
  (``torch._inductor.aoti_compile_and_package``). A process runs it with
  :func:`voxsparse.ops.export_ops.load_package`: torch, spconv and that module, no model code.
  With ``sparse_ops="torch"`` the sparse convolutions are plain torch ops instead (as for ONNX, with
  its grid limit), so the package needs torch alone: ``torch._inductor.aoti_load_package`` in
  Python, or libtorch's ``AOTIModelPackageLoader`` in C++ (``tools/cpp/run_pt2.cpp``).
- ``onnx``: ``torch.onnx.export(dynamo=True)`` with the sparse convolutions in plain torch
  (:func:`voxsparse.ops.export_ops.routed_through_torch`), for onnxruntime. The dense lookup table
  of those convolutions limits it to grids of some ten million cells (the small models, DSVT's
  pillar BEV), not the 41 x 1440 x 1440 nuScenes VoxelNeXt grid.

The exported programs assume a frame with at least one voxel in range (checked when they run) and
take the points as the model does (:attr:`SparseDetector.point_convention`), float32.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from voxsparse.ops import export_ops
from voxsparse.structures import PointBatch, VoxelGrid

#: Names of the exported program's inputs and outputs, in order.
INPUT_NAMES = ("points", "batch_index")
OUTPUT_NAMES = ("boxes", "scores", "labels", "frame")
FORMATS = ("pt2", "onnx")


class DetectorProgram(nn.Module):
    """A detector as a function of tensors, what every export format holds.

    Inputs: ``points`` (N, 3 + C) float32 in the model's point convention; ``batch_index`` (N,) int64,
    each point's frame in ``[0, batch_size)``.

    Outputs: the detections of all frames concatenated, frame by frame, each frame's by descending
    score: ``boxes`` (K, 7 | 9) float32 (x, y, z, dx, dy, dz, heading[, vx, vy]), ``scores`` (K,)
    float32, ``labels`` (K,) int64 (0-based, the model's class order), ``frame`` (K,) int64.
    """

    def __init__(self, detector: nn.Module, batch_size: int = 1) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        self.detector = detector
        self.batch_size = batch_size

    def forward(self, points: torch.Tensor, batch_index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        det = self.detector
        voxels = det.voxel_encoder(PointBatch(points, batch_index, self.batch_size))
        # Traced for non-empty frames: the backbones' empty-input branches drop out of the graph.
        torch._check(voxels.coords.shape[0] > 0)
        bev = det.backbone(voxels)
        torch._check(bev.coords.shape[0] > 0)
        detections = det.head.decode(det.head(bev if det.neck is None else det.neck(bev)))
        frames = [torch.full_like(d.labels, b) for b, d in enumerate(detections)]
        return (torch.cat([d.boxes.tensor for d in detections]), torch.cat([d.scores for d in detections]),
                torch.cat([d.labels.long() for d in detections]), torch.cat(frames))


def example_points(grid: VoxelGrid, num_points: int, columns: int, batch_size: int = 1,
                   seed: int = 0) -> PointBatch:
    """``num_points`` points per frame spread uniformly over the grid's range (features uniform in
    [0, 1]), for tracing and for comparing an exported program with the model."""
    generator = torch.Generator().manual_seed(seed)
    low = torch.tensor(grid.point_cloud_range[:3])
    high = torch.tensor(grid.point_cloud_range[3:])
    frames = []
    for _ in range(batch_size):
        xyz = low + torch.rand(num_points, 3, generator=generator) * (high - low) * 0.999
        frames.append(torch.cat([xyz, torch.rand(num_points, columns - 3, generator=generator)], dim=1))
    return PointBatch.from_frames(frames)


def _prepared(detector: nn.Module, batch_size: int, example: PointBatch | None) -> tuple[DetectorProgram, PointBatch]:
    detector.eval()
    if example is None:
        example = example_points(detector.grid, 2000, detector.voxel_encoder.in_channels, batch_size)
    if example.batch_size != batch_size:
        raise ValueError(f"the example has {example.batch_size} frames, the export {batch_size}")
    return DetectorProgram(detector, batch_size), example


def _dynamic_points() -> tuple[dict[int, torch.export.Dim], dict[int, torch.export.Dim]]:
    points = torch.export.Dim("num_points", min=1, max=2**31 - 1)
    return {0: points}, {0: points}


def export_program(detector: nn.Module, batch_size: int = 1, example: PointBatch | None = None,
                   sparse_ops: str = "custom") -> torch.export.ExportedProgram:
    """``torch.export`` (strict) of :class:`DetectorProgram`; the point count is dynamic.

    Args:
        detector: the model (put in eval mode).
        batch_size: frames per call.
        example: the points traced (default :func:`example_points`, 2,000 per frame).
        sparse_ops: ``"custom"``: spconv's kernels as the custom ops of :mod:`voxsparse.ops.export_ops`
            (for AOTInductor); ``"torch"``: sparse convolutions in plain torch (for ONNX).
    """
    routes = {"custom": export_ops.routed_through_custom_ops, "torch": export_ops.routed_through_torch}
    if sparse_ops not in routes:
        raise ValueError(f"sparse_ops: expected one of {tuple(routes)}, got {sparse_ops!r}")
    program, example = _prepared(detector, batch_size, example)
    with routes[sparse_ops](detector), torch.no_grad():
        return torch.export.export(program, (example.points, example.batch_index.long()),
                                   dynamic_shapes=_dynamic_points(), strict=True)


def compiler_available() -> str | None:
    """The C++ compiler AOTInductor would call (``$CXX``, else its default), or None where none is found."""
    from torch._inductor import cpp_builder

    try:
        return shutil.which(cpp_builder.get_cpp_compiler())
    except RuntimeError:  # raised where no candidate compiler exists
        return None


def package_pt2(program: torch.export.ExportedProgram, path: str | Path) -> Path:
    """Compile ``program`` with AOTInductor into the ``.pt2`` package ``path``."""
    import torch._inductor

    if compiler_available() is None:
        raise RuntimeError("AOTInductor needs a C++ compiler (g++ or $CXX); none was found")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(torch._inductor.aoti_compile_and_package(program, package_path=str(path)))


def export_onnx(detector: nn.Module, path: str | Path, batch_size: int = 1,
                example: PointBatch | None = None) -> Path:
    """ONNX file of :class:`DetectorProgram` (torch's dynamo-based exporter on the program
    :func:`export_program` traces with ``sparse_ops="torch"``); the point count is dynamic."""
    program = export_program(detector, batch_size, example, sparse_ops="torch")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(program, input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                     dynamo=True, external_data=False, optimize=False, verbose=False)
    onnx_program.save(str(path))
    return path


def run_onnx(path: str | Path, points: PointBatch) -> tuple[torch.Tensor, ...]:
    """The ONNX file ``path`` run by onnxruntime on the CPU -> the outputs of :class:`DetectorProgram`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"points": points.points.numpy(), "batch_index": points.batch_index.long().numpy()}
    return tuple(torch.from_numpy(v) for v in session.run(list(OUTPUT_NAMES), feeds))


@dataclass
class Comparison:
    """Exported outputs against the model's on one input.

    Attributes:
        detections: the model's detection count.
        unmatched: detections of either side without a counterpart of the same frame and label whose
            box centre lies within 1 cm (a near-tie of two scores at the top-K or threshold boundary
            can keep a different one).
        max_box_difference, max_score_difference: largest absolute difference over matched pairs.
    """

    detections: int
    unmatched: int
    max_box_difference: float
    max_score_difference: float

    @property
    def equal(self) -> bool:
        return self.unmatched == 0 and self.max_box_difference < 1e-3 and self.max_score_difference < 1e-4


def compare_outputs(expected: Sequence[torch.Tensor], actual: Sequence[torch.Tensor]) -> Comparison:
    """Match two :class:`DetectorProgram` outputs detection by detection (same frame and label,
    nearest box centre) and measure their differences."""
    boxes_e, scores_e, labels_e, frames_e = (t.detach().cpu() for t in expected)
    boxes_a, scores_a, labels_a, frames_a = (t.detach().cpu() for t in actual)
    if len(scores_e) == 0 or len(scores_a) == 0:
        return Comparison(len(scores_e), len(scores_e) + len(scores_a), 0.0, 0.0)
    distance = torch.cdist(boxes_e[:, :3].double(), boxes_a[:, :3].double())
    distance[(labels_e[:, None] != labels_a[None]) | (frames_e[:, None] != frames_a[None])] = math.inf
    nearest, match = distance.min(dim=1)
    found = nearest < 0.01
    matched_a = torch.zeros(len(scores_a), dtype=torch.bool)
    matched_a[match[found]] = True
    unmatched = int((~found).sum()) + int((~matched_a).sum())
    if not bool(found.any()):
        return Comparison(len(scores_e), unmatched, math.inf, math.inf)
    box = float((boxes_e[found] - boxes_a[match[found]]).abs().max())
    score = float((scores_e[found] - scores_a[match[found]]).abs().max())
    return Comparison(len(scores_e), unmatched, box, score)


@dataclass
class ExportReport:
    """What :func:`export_detector` wrote, in how many seconds, and how its outputs compare with the
    model's on the example."""

    path: Path
    format: str
    seconds: float
    comparison: Comparison


def export_detector(detector: nn.Module, path: str | Path, format: str = "pt2", batch_size: int = 1,
                    example: PointBatch | None = None, sparse_ops: str = "custom") -> ExportReport:
    """Export ``detector`` to ``path`` in ``format`` (``pt2`` or ``onnx``), then run the file on the
    example and compare it with the model (:func:`compare_outputs`). ``sparse_ops`` is
    :func:`export_program`'s, for ``pt2`` (ONNX always takes ``"torch"``)."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {format!r}")
    program, example = _prepared(detector, batch_size, example)
    start = time.perf_counter()
    if format == "pt2":
        path = package_pt2(export_program(detector, batch_size, example, sparse_ops), path)
        actual = export_ops.load_package(path)(example.points, example.batch_index.long())
    else:
        path = export_onnx(detector, path, batch_size, example)
        actual = run_onnx(path, example)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        expected = program(example.points, example.batch_index.long())
    return ExportReport(Path(path), format, seconds, compare_outputs(expected, actual))
