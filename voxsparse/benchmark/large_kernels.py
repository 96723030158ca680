"""Where the gather tables of :mod:`voxsparse.ops.cuda_sparse_conv` stop beating spconv's loop.

    python tools/benchmark.py --large-kernels --device cuda

One ``SubMConv3d(C, C, 5)`` forward + backward on the voxels of a synthetic scan at several voxel
sizes, in fp32 and under fp16 autocast, with both CUDA paths at every size (the routing bound
``ROUTE_ELEMENTS`` lifted for the run): the sizes at which the two meet set that bound.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from voxsparse.benchmark.compare import NeedsCuda
from voxsparse.benchmark.inputs import make_points
from voxsparse.ops import cuda_sparse_conv
from voxsparse.ops.sparse_backend import SparseConvTensor, spnn
from voxsparse.utils.timing import measure


@dataclass(frozen=True)
class LargeKernelRow:
    """One layer size, both paths.

    Attributes:
        voxel_size: m, of the cubic voxels the scan is cut into.
        voxels: M, active voxels (input = output rows of the submanifold convolution).
        channels: C, in and out.
        amp: under fp16 autocast.
        gathered: M x 125 x C, the values the tables gather (what ``ROUTE_ELEMENTS`` bounds).
        filled: fraction of the M x 125 (voxel, offset) pairs that have a neighbour.
        tables_ms / loop_ms: forward + backward, the better of the rounds' medians.
    """

    voxel_size: float
    voxels: int
    channels: int
    amp: bool
    gathered: int
    filled: float
    tables_ms: float
    loop_ms: float


def _training_step(conv: torch.nn.Module, x: torch.Tensor, coords: torch.Tensor, shape: list[int], amp: bool
                   ) -> Callable[[], None]:
    """Forward + backward of ``conv``, its pair table built in every call as in a training step."""
    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            y = conv(SparseConvTensor(x, coords, shape, 1)).features
        y.float().sum().backward()

    return step


def sweep(device: str = "cuda", points: int = 400_000, voxel_sizes: Sequence[float] = (0.4, 0.2, 0.1),
          channels: Sequence[int] = (32, 64), rounds: int = 2, repeats: int = 10, warmup: int = 2
          ) -> Iterator[LargeKernelRow]:
    """Yields a :class:`LargeKernelRow` per voxel size, channel count and precision, as measured."""
    dev = torch.device(device)
    if dev.type != "cuda":
        raise NeedsCuda("the gather tables and spconv's loop are the two CUDA paths of 5x5x5 convolutions")
    xyz = make_points(points, 4, seed=0)[:, :3]
    bound, enabled = cuda_sparse_conv.ROUTE_ELEMENTS, cuda_sparse_conv.enabled
    cuda_sparse_conv.ROUTE_ELEMENTS = 1 << 62  # both paths at every size
    try:
        for voxel_size in voxel_sizes:
            cells = torch.unique(torch.floor((xyz - xyz.min(0).values) / voxel_size).int(), dim=0)
            shape = (cells.max(0).values + 1).tolist()[::-1]  # (Z, Y, X)
            coords = torch.cat([torch.zeros(len(cells), 1, dtype=torch.int32), cells.flip(1)], 1).to(dev)
            for c in channels:
                conv = spnn.SubMConv3d(c, c, 5, padding=2, bias=False, indice_key="sweep").to(dev)
                x = torch.randn(len(cells), c, device=dev, requires_grad=True)
                pairs = conv(SparseConvTensor(x, coords, shape, 1)).indice_dict["sweep"].indice_pair_num
                # spconv counts the offsets before the centre, each pair standing for its mirror too
                filled = float(pairs[: len(pairs) // 2].sum() * 2 + len(cells)) / (len(cells) * len(pairs))
                for amp in (False, True):
                    step = _training_step(conv, x, coords, shape, amp)
                    best = {True: float("inf"), False: float("inf")}
                    for _ in range(rounds):
                        for tables in (True, False):
                            cuda_sparse_conv.enabled = tables
                            best[tables] = min(best[tables], measure(step, dev, repeats, warmup).median_ms)
                    yield LargeKernelRow(voxel_size, len(cells), c, amp, len(cells) * 125 * c, filled,
                                         best[True], best[False])
    finally:
        cuda_sparse_conv.ROUTE_ELEMENTS, cuda_sparse_conv.enabled = bound, enabled


def markdown_row(row: LargeKernelRow) -> str:
    """``| voxel size | voxels | filled | C | precision | gathered | tables ms | loop ms |``"""
    return (f"| {row.voxel_size:g} m | {row.voxels:,} | {row.filled:.1%} | {row.channels} | "
            f"{'fp16 autocast' if row.amp else 'fp32'} | {row.gathered / 1e6:.0f} M | {row.tables_ms:.2f} | "
            f"{row.loop_ms:.2f} |")


HEADER = ("| voxel size | voxels | filled | C | precision | gathered | tables (ms) | spconv loop (ms) |\n"
          "|---|---|---|---|---|---|---|---|")
