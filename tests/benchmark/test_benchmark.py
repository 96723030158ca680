"""voxsparse.benchmark: the benchmark inputs, the stage timings and their table, the comparison's
helpers, the evaluation workload; ``tools/benchmark.py`` and ``tools/benchmark_eval.py`` end to end on
the CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from tool_runs import run_tool

from voxsparse.benchmark.compare import Alternation, NeedsCuda, compare_with_openpcdet, max_abs_diff
from voxsparse.benchmark.detector_speed import BenchmarkOptions, format_table, run_benchmark
from voxsparse.benchmark.eval_speed import EvalSpeed, make_workload, measure_eval_speed
from voxsparse.benchmark.inputs import (
    FrameCountError,
    load_or_make_frames,
    make_points,
    make_points_for_voxels,
    synthetic_frames,
)
from voxsparse.benchmark.stages import build_model
from voxsparse.ops.voxelize import dynamic_voxelize
from voxsparse.structures import PointBatch, SparseBEV, VoxelGrid

STAGES = ["voxelize + VFE", "backbone", "head", "decode", "end to end"]
TRAIN_ROWS = ["backbone fwd+bwd", "train step (loss + backward)"]


@pytest.fixture(scope="module")
def grid() -> VoxelGrid:
    return build_model("voxelnext_small").grid


# --- inputs -----------------------------------------------------------------------------------------


def test_make_points_has_the_count_and_columns_asked_for():
    points = make_points(3000, 5, seed=0)
    assert points.shape == (3000, 5) and points.dtype == torch.float32 and points.is_contiguous()
    assert (points[:, 4] == 0).all()  # the time-lag column nuScenes models expect
    assert torch.equal(points, make_points(3000, 5, seed=0))
    assert not torch.equal(points[:, :4], make_points(3000, 4, seed=1000))


def test_make_points_for_voxels_is_the_shortest_prefix_reaching_the_count(grid):
    def voxels(points: torch.Tensor) -> int:
        return len(dynamic_voxelize(PointBatch.from_frames([points]), grid))

    points = make_points_for_voxels(1500, grid, 4)
    assert points.shape[1] == 4
    assert voxels(points) >= 1500 > voxels(points[:-1])


def test_synthetic_frames_differ_and_have_one_size(grid):
    frames = synthetic_frames(2, grid, 4, num_points=1000)
    assert [f.shape for f in frames] == [(1000, 4), (1000, 4)]
    assert not torch.equal(frames[0], frames[1])


def test_frames_file_is_written_once_then_reused(tmp_path):
    path = tmp_path / "frames.pt"
    frames = [torch.rand(5, 4), torch.rand(7, 4)]
    assert load_or_make_frames(path, 2, lambda: frames) is frames
    assert path.is_file()

    def not_again():
        raise AssertionError("the file's frames are reused")

    again = load_or_make_frames(path, 2, not_again)
    assert all(torch.equal(a, b) for a, b in zip(again, frames, strict=True))
    with pytest.raises(FrameCountError) as error:
        load_or_make_frames(path, 3, not_again)
    assert (error.value.path, error.value.found, error.value.expected) == (path, 2, 3)
    # One tensor is one frame; without a path nothing is written.
    torch.save(frames[0], tmp_path / "one.pt")
    assert torch.equal(load_or_make_frames(tmp_path / "one.pt", 1, not_again)[0], frames[0])
    assert len(load_or_make_frames(None, 1, lambda: frames[:1])) == 1


# --- stages, the whole run and its table ------------------------------------------------------------


def test_run_benchmark_times_every_stage_and_reuses_its_input(tmp_path):
    options = BenchmarkOptions(points=2000, repeats=1, warmup=0, train=True, input=tmp_path / "in.pt")
    reported = []
    info = run_benchmark(options, lambda name, timing: reported.append((name, timing.median_ms)))
    assert list(info) == ["model", "parameters_M", "backbone_parameters_M", "device", "threads", "amp", "tf32",
                          "batch", "points", "voxels", "bev_cells", "timings"]
    assert (info["model"], info["points"], info["amp"]) == ("voxelnext_small", 2000, False)
    assert 0 < info["bev_cells"] and 0 < info["voxels"] <= 2000
    assert list(info["timings"]) == STAGES + TRAIN_ROWS
    assert reported == [(name, t["median_ms"]) for name, t in info["timings"].items()]  # each row as measured
    assert all(t["repeats"] == 1 and t["peak_memory_mb"] is None for t in info["timings"].values())
    json.dumps(info)  # JSON-ready
    with pytest.raises(FrameCountError):
        run_benchmark(dataclasses.replace(options, batch=2, train=False))


def _timing(median: float, peak: float | None = None) -> dict:
    return {"median_ms": median, "p10_ms": median - 1, "p90_ms": median + 1, "repeats": 3, "peak_memory_mb": peak}


def test_table():
    info = {
        "model": "m", "parameters_M": 1.5, "backbone_parameters_M": 1.0, "device": "gpu", "threads": 2,
        "amp": True, "tf32": False, "batch": 2, "points": 12345, "voxels": 6789, "bev_cells": 1000,
        "timings": {"backbone": _timing(10.0, 512.4), "train step (loss + backward)": _timing(50.0)},
        "comparison": {"openpcdet": "/x", "same_pillars": True, "timings": {"ours fp32": _timing(2.0)}},
    }
    assert format_table(info).splitlines() == [
        "compare: openpcdet = /x",
        "compare: same_pillars = True",
        "",
        "model m (1.5 M params, backbone 1.0 M) on gpu, 2 threads, amp=True, tf32=False",
        "input: 2 frame(s), 12,345 points -> 6,789 voxels -> 1,000 BEV cells",
        "",
        "| stage | median ms | p10 ms | p90 ms | peak MB |",
        "|---|---|---|---|---|",
        "| backbone | 10.00 | 9.00 | 11.00 | 512 |",
        "| train step (loss + backward) | 50.00 | 49.00 | 51.00 | n/a |",
        "| [compare] ours fp32 | 2.00 | 1.00 | 3.00 | n/a |",
        "training throughput: 40.0 frames/s",
    ]


# --- comparison helpers -----------------------------------------------------------------------------


def test_alternation_spreads_the_repeats_over_the_rounds():
    assert Alternation.from_repeats(15, 5, 3) == Alternation(rounds=5, per_round=3, warmup=3)
    assert Alternation.from_repeats(2, 5, 0).per_round == 1
    timings = Alternation(rounds=2, per_round=2, warmup=0).measure({"a": lambda: None, "b": lambda: None},
                                                                   torch.device("cpu"))
    assert list(timings) == ["a", "b"] and timings["a"].repeats == 4


def test_max_abs_diff_matches_cells_by_coordinate(grid):
    coords = torch.tensor([[0, 1, 2], [0, 3, 4], [1, 0, 0]], dtype=torch.int32)
    features = torch.tensor([[1.0], [2.0], [3.0]])

    def bev(c, f):
        return SparseBEV(c, f, (8, 8), 1, grid, 2)

    order = torch.tensor([2, 0, 1])
    assert max_abs_diff(bev(coords, features), bev(coords[order], features[order] + 0.25)) == 0.25
    assert max_abs_diff(bev(coords, features), bev(coords[:2], features[:2])) == math.inf


def test_voxelnext_comparison_needs_cuda(tmp_path):
    model = build_model("voxelnext_small").eval()
    points = PointBatch.from_frames([make_points(500, 4)])
    with torch.no_grad():
        voxels = model.voxel_encoder(points)
    with pytest.raises(NeedsCuda, match="cannot run inference on the CPU"):
        compare_with_openpcdet(model, voxels, points, tmp_path, Alternation())


# --- the evaluation workload ------------------------------------------------------------------------


def test_workload():
    predictions, ground_truths = make_workload(3, 10, seed=1)
    assert len(predictions) == len(ground_truths) == 3
    assert predictions[0].boxes.shape == ground_truths[0].boxes.shape == (10, 7)
    again, _ = make_workload(3, 10, seed=1)
    assert torch.equal(again[2].boxes, predictions[2].boxes)


def test_measure_eval_speed():
    result = measure_eval_speed(frames=4, boxes=10, repeats=1, warmup=0, threads=2)
    assert isinstance(result, EvalSpeed) and (result.frames, result.repeats, result.threads) == (4, 1, 2)
    assert 0 <= result.mAPH_L2 <= result.mAP_L2 <= 1
    assert list(dataclasses.asdict(result)) == ["frames", "boxes_per_frame", "threads", "device", "cpu", "median_s",
                                                "p90_s", "repeats", "peak_rss_mb", "mAP_L2", "mAPH_L2"]
    assert result.summary().startswith("4 frames x 10 predictions x 10 GT: median ")


# --- the tools end to end ---------------------------------------------------------------------------


def test_benchmark_tool(tmp_path):
    out = tmp_path / "bench.json"
    run = run_tool("benchmark", "--model", "voxelnext_small", "--device", "cpu", "--points", "3000",
                   "--repeats", "2", "--warmup", "1", "--train", "--json", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(out.read_text())
    lines = run.stdout.splitlines()
    assert lines[0].startswith("model voxelnext_small (") and ", amp=False, tf32=False" in lines[0]
    assert lines[1] == f"input: 1 frame(s), 3,000 points -> {info['voxels']:,} voxels -> {info['bev_cells']:,} BEV cells"
    assert lines[3:5] == ["| stage | median ms | p10 ms | p90 ms | peak MB |", "|---|---|---|---|---|"]
    rows = [re.fullmatch(r"\| (.+) \| [\d.]+ \| [\d.]+ \| [\d.]+ \| n/a \|", line) for line in lines[5:-1]]
    assert [row.group(1) for row in rows] == STAGES + TRAIN_ROWS
    assert re.fullmatch(r"training throughput: [\d.]+ frames/s", lines[-1])
    assert [t["repeats"] for t in info["timings"].values()] == [2] * 7
    # each row also goes to stderr as soon as it is measured
    assert re.findall(r"^(.+): [\d.]+ ms$", run.stderr, flags=re.MULTILINE) == STAGES + TRAIN_ROWS
    # Every option but --json, --voxelkp and --large-kernels (modes of their own) is a field of
    # BenchmarkOptions, which the tool fills from them.
    run = run_tool("benchmark", "--help", timeout=120)
    flags = set(re.findall(r"^  --([a-z0-9-]+)", run.stdout, flags=re.MULTILINE))
    flags -= {"help", "json", "voxelkp", "large-kernels"}
    assert flags == {f.name for f in dataclasses.fields(BenchmarkOptions)}


def test_benchmark_eval_tool(tmp_path):
    out = tmp_path / "eval.json"
    run = run_tool("benchmark_eval", "--frames", "20", "--boxes", "10", "--repeats", "1", "--warmup", "0",
                   "--json", str(out), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(out.read_text())
    assert (info["frames"], info["boxes_per_frame"], info["repeats"]) == (20, 10, 1)
    assert re.fullmatch(
        r"20 frames x 10 predictions x 10 GT: median [\d.]+ s \(p90 [\d.]+ s, 1 runs, 2 threads, cpu\), "
        r"peak RSS \d+ MB, mAP_L2 [\d.]+, mAPH_L2 [\d.]+",
        run.stdout.strip(),
    )
    assert f"mAP_L2 {info['mAP_L2']:.3f}, mAPH_L2 {info['mAPH_L2']:.3f}" in run.stdout
