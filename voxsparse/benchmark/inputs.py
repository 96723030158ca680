"""Benchmark inputs: frames of the synthetic world scanned densely enough to give a point count or a
voxel count, and a frames file that keeps one input across runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from voxsparse.data.pointfile import read_points
from voxsparse.data.synthetic import LidarConfig, generate_frame
from voxsparse.models.detectors.sparse_detector import SparseDetector
from voxsparse.ops.voxelize import dynamic_voxelize
from voxsparse.structures import Annotations3D, Boxes3D, PointBatch, SparseVoxels, VoxelGrid
from voxsparse.utils.io import atomic_write

#: Frame ``i`` of a batch is the scan of seed ``FRAME_SEED_STRIDE * i``: different frames of the same size.
FRAME_SEED_STRIDE = 1000


class FrameCountError(ValueError):
    """A frames file holds another number of frames than the batch asks for."""

    def __init__(self, path: Path, found: int, expected: int) -> None:
        super().__init__(f"{path} holds {found} frames, the batch has {expected}")
        self.path, self.found, self.expected = path, found, expected


def _dense_scan(enough: Callable[[torch.Tensor], bool], seed: int) -> torch.Tensor:
    """(N, 4) points of a synthetic frame, doubling the beam count until ``enough(points)`` holds."""
    beams = 64
    while True:
        # Horizontal resolution 0.1 degree; beams grow until the scan is dense enough.
        lidar = LidarConfig(beams=beams, azimuth_resolution=0.1)
        points = torch.from_numpy(generate_frame(seed, lidar=lidar).points)
        if enough(points) or beams >= 1024:
            return points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))]
        beams *= 2


def with_features(points: torch.Tensor, num_features: int) -> torch.Tensor:
    """``points`` with exactly ``num_features`` columns: extra ones cut, missing ones zeros (time lag)."""
    if num_features > points.shape[1]:
        points = torch.cat([points, points.new_zeros(len(points), num_features - points.shape[1])], dim=1)
    return points[:, :num_features].contiguous()


def make_points(num_points: int, num_features: int, seed: int = 0) -> torch.Tensor:
    """(num_points, num_features) float32 from a synthetic frame scanned densely enough."""
    points = _dense_scan(lambda p: len(p) >= num_points, seed)
    return with_features(points[:num_points], num_features)


def make_points_for_voxels(
    num_voxels: int, grid: VoxelGrid, num_features: int, seed: int = 0,
    count: Callable[[torch.Tensor], int] | None = None,
) -> torch.Tensor:
    """(N, num_features) float32 whose voxelization on ``grid`` has ``num_voxels`` voxels (fewer
    only where 64 merged scans do not fill that many).

    ``count(points (N, num_features)) -> voxels`` is the voxelization that counts, e.g. a model's own
    voxel encoder (whose quantization and range rules may differ); default: dynamic voxelization.

    One synthetic street seen from one spot fills only its corridor (~20k pillars of 0.32 m), so
    scans of successive seeds, each turned by the golden angle and moved along a sunflower spiral
    inside the grid, are merged until the target is reached; the merged cloud is cut to the
    shortest prefix (of its shuffled points) that reaches it, found by bisection. Waymo-scale
    inputs ("100k voxels") are specified this way.
    """

    def voxels(points: torch.Tensor) -> int:
        points = with_features(points, num_features)
        return count(points) if count is not None else len(dynamic_voxelize(PointBatch.from_frames([points]), grid))

    lidar = LidarConfig(beams=64, azimuth_resolution=0.1)
    x0, y0, _, x1, y1, _ = grid.point_cloud_range
    reach = 0.5 * min(x1 - x0, y1 - y0)
    golden = math.pi * (3.0 - math.sqrt(5.0))
    scans: list[torch.Tensor] = []
    while not scans or (voxels(torch.cat(scans)) < num_voxels and len(scans) < 64):
        i = len(scans)
        yaw, radius = i * golden, 0.6 * reach * math.sqrt(i / (i + 4.0))
        scan = torch.from_numpy(generate_frame(seed + i, lidar=lidar).points)
        c, s = math.cos(yaw), math.sin(yaw)
        scan[:, :2] = scan[:, :2] @ torch.tensor([[c, s], [-s, c]]) + torch.tensor([radius * c, radius * s])
        scans.append(scan)
    points = torch.cat(scans)
    points = points[torch.randperm(len(points), generator=torch.Generator().manual_seed(seed))]
    lo, hi = 1, len(points)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if voxels(points[:mid]) >= num_voxels else (mid + 1, hi)
    return with_features(points[:lo], num_features)


def synthetic_frames(
    batch: int, grid: VoxelGrid, num_features: int, num_points: int, num_voxels: int | None = None
) -> list[torch.Tensor]:
    """``batch`` different synthetic frames of one size: ``num_voxels`` voxels on ``grid`` when given,
    else ``num_points`` points (see :func:`make_points_for_voxels`, :func:`make_points`)."""
    return [
        make_points_for_voxels(num_voxels, grid, num_features, seed=FRAME_SEED_STRIDE * i)
        if num_voxels else make_points(num_points, num_features, seed=FRAME_SEED_STRIDE * i)
        for i in range(batch)
    ]


def scan_sweeps(path: Path, sweeps: int, num_features: int, ego_step: float = 0.75, sweep_interval: float = 0.05) -> torch.Tensor:
    """(sweeps * N, num_features) float32: a real scan (any file :func:`~voxsparse.data.pointfile.read_points`
    reads) repeated as ``sweeps`` aggregated sweeps of a moving ego, as nuScenes' multi-sweep input.

    Sweep ``k`` is the scan moved ``k * ego_step`` m back along x (0.75 m: 15 m/s at 20 Hz) with a time
    lag of ``k * sweep_interval`` s in column 4 (x, y, z, intensity, time lag; then cut or padded to
    ``num_features``). The geometry of each sweep is the real sensor's, so voxel occupancy and points
    per voxel are those of real scans, which the synthetic world does not reproduce.
    """
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    scan = torch.from_numpy(read_points(path).points[:, :4].copy())
    if scan.shape[1] < 4:
        scan = with_features(scan, 4)
    moved = []
    for k in range(sweeps):
        sweep = torch.cat([scan, torch.full((len(scan), 1), k * sweep_interval)], dim=1)
        sweep[:, 0] -= k * ego_step
        moved.append(sweep)
    return with_features(torch.cat(moved), num_features)


def load_or_make_frames(path: Path | None, batch: int, make: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """The frames of ``path`` when it exists (one tensor or a list), else ``make()``, written to ``path``
    (atomically) when one is given, so later runs see the very same input.

    Raises:
        FrameCountError: the file holds another number of frames than ``batch``.
    """
    if path is not None and path.exists():
        frames = torch.load(path, weights_only=True)
        frames = [frames] if isinstance(frames, torch.Tensor) else frames
    else:
        frames = make()
        if path is not None:
            atomic_write(path, lambda f: torch.save(frames, f))
    if len(frames) != batch:
        raise FrameCountError(path, len(frames), batch)
    return frames


def synthetic_voxels(model: SparseDetector, num_voxels: int) -> SparseVoxels:
    """``model``'s voxel encoder output (no grad) on one synthetic frame of about ``num_voxels`` voxels."""
    def encode(points: torch.Tensor) -> SparseVoxels:
        with torch.no_grad():
            return model.voxel_encoder(PointBatch.from_frames([points]))

    width = model.voxel_encoder.in_channels
    return encode(make_points_for_voxels(num_voxels, model.grid, width, count=lambda p: len(encode(p))))


def dummy_annotations(device: torch.device | str) -> Annotations3D:
    """One labelled vehicle (9-value box): enough ground truth for the loss of a timed training step."""
    boxes = torch.tensor([[10.0, 2.0, -1.0, 4.5, 1.9, 1.6, 0.3, 0.0, 0.0]], device=device)
    one = torch.ones(1, dtype=torch.int64, device=device)
    return Annotations3D(Boxes3D(boxes), one * 0, one * 100, one, one)
