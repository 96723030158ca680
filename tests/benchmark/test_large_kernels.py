"""The 5x5x5 convolution sweep (``tools/benchmark.py --large-kernels``): both CUDA paths per layer size."""

from __future__ import annotations

import pytest
import torch
from tool_runs import run_tool

from voxsparse.benchmark import large_kernels
from voxsparse.benchmark.compare import NeedsCuda
from voxsparse.ops import cuda_sparse_conv


def test_tool_asks_for_cuda():
    run = run_tool("benchmark", "--large-kernels", "--device", "cpu", timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].endswith("error: --large-kernels compares the two CUDA paths of "
                                                        "5x5x5 convolutions: use --device cuda")
    assert run.stdout == ""


def test_sweep_needs_cuda():
    with pytest.raises(NeedsCuda):
        next(large_kernels.sweep("cpu"))


def test_markdown_row_matches_the_header():
    row = large_kernels.LargeKernelRow(0.2, 33607, 64, True, 33607 * 125 * 64, 0.165, 5.49, 11.16)
    assert large_kernels.markdown_row(row) == "| 0.2 m | 33,607 | 16.5% | 64 | fp16 autocast | 269 M | 5.49 | 11.16 |"
    assert row.gathered > cuda_sparse_conv.ROUTE_ELEMENTS // 2  # a size the routing bound was set from
    columns = large_kernels.HEADER.splitlines()[0].count("|")
    assert large_kernels.markdown_row(row).count("|") == columns


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sweep_times_both_paths_and_restores_the_routing():
    bound, enabled = cuda_sparse_conv.ROUTE_ELEMENTS, cuda_sparse_conv.enabled
    rows = list(large_kernels.sweep("cuda", points=20_000, voxel_sizes=(0.4,), channels=(16,), rounds=1,
                                    repeats=2, warmup=1))
    assert [(r.channels, r.amp) for r in rows] == [(16, False), (16, True)]
    assert all(r.tables_ms > 0 and r.loop_ms > 0 and 0 < r.filled <= 1 for r in rows)
    assert (cuda_sparse_conv.ROUTE_ELEMENTS, cuda_sparse_conv.enabled) == (bound, enabled)
