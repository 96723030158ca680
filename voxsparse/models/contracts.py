"""The contracts the parts of a detector keep, as ``typing.Protocol`` s.

:class:`~voxsparse.models.detectors.sparse_detector.SparseDetector` wires a voxel encoder, a
backbone and a head that keep these; a new backbone or head is a class that keeps its contract
(``tests/models/test_contracts.py`` checks every model config). ``isinstance`` checks only that the
attributes and methods exist; the tests check what they return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from voxsparse.structures import (
    Annotations3D,
    DenseBEV,
    Detections3D,
    PointBatch,
    SparseBEV,
    SparseVoxels,
    VoxelGrid,
)


@runtime_checkable
class VoxelEncoder(Protocol):
    """Points to voxels: ``(PointBatch (N, in_channels)) -> SparseVoxels (M, out_channels)`` on ``grid``;
    points outside ``grid.point_cloud_range`` are dropped, an empty batch gives M = 0."""

    in_channels: int
    out_channels: int
    grid: VoxelGrid

    def __call__(self, points: PointBatch) -> SparseVoxels: ...


@runtime_checkable
class Backbone(Protocol):
    """Voxels to a sparse BEV: built as ``factory(in_channels=...)``; ``(SparseVoxels (M, in_channels))
    -> SparseBEV (M', out_channels)`` at ``stride`` (BEV cells per voxel, >= 1); no voxels give an
    empty BEV of the same spatial size."""

    out_channels: int

    @property
    def stride(self) -> int: ...

    def __call__(self, voxels: SparseVoxels) -> SparseBEV: ...


@runtime_checkable
class Neck(Protocol):
    """Sparse BEV to a dense BEV map, between backbone and head (optional): built as
    ``factory(in_channels=...)``; ``(SparseBEV (M, in_channels) at stride s) -> DenseBEV
    (B, out_channels, H', W')`` at a stride of its own (dense 2D blocks may down- and up-sample); no
    cells give the map of an all-zero input."""

    out_channels: int

    def __call__(self, bev: SparseBEV) -> DenseBEV: ...


@runtime_checkable
class Head(Protocol):
    """BEV to boxes: built as ``factory(in_channels=..., num_classes=...)``.

    - ``__call__(bev) -> predictions`` (per-cell outputs, e.g. ``CenterPredictions``), where ``bev``
      is the backbone's ``SparseBEV``, or the neck's output (``DenseBEV``) when the detector has one;
    - ``loss(predictions, annotations, reduce_counts=None)`` -> losses with scalar tensors ``total``
      (the one that is back-propagated), ``heatmap`` and ``regression``; ``reduce_counts`` averages
      normalisers over DDP ranks;
    - ``decode(predictions) -> list[Detections3D]``, one per frame, scores descending.
    """

    def __call__(self, bev: SparseBEV | DenseBEV) -> Any: ...

    def loss(
        self, pred: Any, annotations: Sequence[Annotations3D], reduce_counts: Any = None
    ) -> Any: ...

    def decode(self, pred: Any) -> list[Detections3D]: ...


def check_losses(losses: Any) -> None:
    """Raise unless ``losses`` carries the scalar tensors the trainer reads."""
    for name in ("total", "heatmap", "regression"):
        value = getattr(losses, name, None)
        if not (isinstance(value, torch.Tensor) and value.ndim == 0):
            raise TypeError(f"head losses: expected a scalar tensor {name!r}, got {type(value).__name__}")
