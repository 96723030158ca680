"""Whole detectors exported (voxelizer to decoded boxes) and run against the eager model on inputs of
several sizes: torch.export programs of the small models, ONNX DSVT through onnxruntime, and
tools/export.py writing an AOTInductor package that a fresh process runs without the model code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hydra.utils import instantiate
from tool_runs import ROOT, compose_config, run_tool

from voxsparse.benchmark.stages import dataset_for
from voxsparse.engine.export import (
    DetectorProgram,
    compare_outputs,
    compiler_available,
    example_points,
    export_onnx,
    export_program,
    run_onnx,
)

SIZES = (300, 4000)


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = instantiate(compose_config("train", [f"model={name}", "model.head.score_threshold=0.0",
                                                 "model.head.max_detections=60"]).model)
    return model.eval()


def _reference_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return instantiate(compose_config("train", [f"model={name}", f"dataset={dataset_for(name)}"]).model).eval()


def _check(model, run, batch_size: int = 1) -> None:
    program = DetectorProgram(model, batch_size)
    for n in SIZES:
        points = example_points(model.grid, n, 4, batch_size, seed=n)
        with torch.no_grad():
            expected = program(points.points, points.batch_index.long())
        comparison = compare_outputs(expected, run(points))
        assert comparison.detections > 0 and comparison.equal, (n, comparison)


@pytest.mark.parametrize("name", ["voxelnext_small", "dsvt_pillar_small", "dsvt_voxel_small", "lion_small",
                                  "scatterformer_small", "voxelnext_focals_small"])
def test_exported_program_equals_the_model(name):
    model = _model(name)
    batch_size = 2 if name == "voxelnext_small" else 1
    exported = export_program(model, batch_size).module()
    _check(model, lambda p: exported(p.points, p.batch_index.long()), batch_size)


@pytest.mark.parametrize("name", ["voxelnext_nuscenes", "dsvt_pillar_nuscenes"])
def test_reference_detectors_export_with_their_nms(name):
    # Their decoding ends in rotated NMS (per class group / per class): a custom op in the program.
    model = _reference_model(name)
    exported = export_program(model, 1, example_points(model.grid, 3000, model.voxel_encoder.in_channels, seed=1))
    assert any("greedy_survivors" in str(node.target) for node in exported.graph.nodes)
    module = exported.module()
    for n in (2000, 6000):
        points = example_points(model.grid, n, model.voxel_encoder.in_channels, seed=n)
        with torch.no_grad():
            expected = DetectorProgram(model)(points.points, points.batch_index.long())
            comparison = compare_outputs(expected, module(points.points, points.batch_index.long()))
        assert comparison.detections > 0 and comparison.equal, (n, comparison)


def test_onnx_dsvt_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    model = _model("dsvt_pillar_small")
    path = export_onnx(model, tmp_path / "dsvt.onnx")
    _check(model, lambda p: run_onnx(path, p))


RUNNER = """
import json, sys, torch
import voxsparse.ops.export_ops as export_ops
run = export_ops.load_package(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
outputs = run(inputs["points"].to(sys.argv[4]), inputs["batch_index"].to(sys.argv[4]))
torch.save([t.cpu() for t in outputs], sys.argv[3])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("voxsparse"))))
"""


def _check_package_in_fresh_process(package, model: torch.nn.Module, sizes, tmp_path,
                                    device: str = "cpu") -> None:
    """Run ``package`` in a new Python process (:data:`RUNNER`) on ``sizes`` points and compare its
    detections with ``model``'s on ``device``."""
    program = DetectorProgram(model)
    for n in sizes:
        points = example_points(model.grid, n, 4, seed=n)
        inputs = {"points": points.points, "batch_index": points.batch_index.long()}
        torch.save(inputs, tmp_path / "inputs.pt")
        command = [sys.executable, "-c", RUNNER, str(package), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt"),
                   device]
        run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        loaded = json.loads(run.stdout.strip().splitlines()[-1])
        # The runner imports the op registration and what it stands on, no model, engine or data code.
        assert not [m for m in loaded if m.startswith(("voxsparse.models", "voxsparse.engine", "voxsparse.data"))], loaded
        with torch.no_grad():
            expected = program(inputs["points"].to(device), inputs["batch_index"].to(device))
        comparison = compare_outputs(expected, torch.load(tmp_path / "out.pt", weights_only=True))
        assert comparison.detections > 0 and comparison.equal, (n, comparison)


@pytest.mark.skipif(compiler_available() is None, reason="AOTInductor needs a C++ compiler; none found")
def test_export_tool_writes_a_package_a_fresh_process_runs(tiny_checkpoint, tmp_path):
    package = tmp_path / "tiny.pt2"
    result = run_tool("export", f"checkpoint={tiny_checkpoint}", "format=pt2", f"output={package}",
                      f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert package.is_file() and "unmatched" in result.stdout + result.stderr

    import voxsparse

    _check_package_in_fresh_process(package, voxsparse.load_model(tiny_checkpoint), SIZES, tmp_path)


def _cpp_detections(text: str) -> tuple[torch.Tensor, ...]:
    """``run_pt2``'s lines (frame label score box...) as :class:`DetectorProgram` outputs."""
    rows = torch.tensor([[float(v) for v in line.split()] for line in text.splitlines()], dtype=torch.float64)
    return rows[:, 3:].float(), rows[:, 2].float(), rows[:, 1].long(), rows[:, 0].long()


@pytest.mark.skipif(compiler_available() is None, reason="AOTInductor and the C++ runner need a C++ compiler; none found")
def test_package_with_torch_sparse_ops_runs_from_cpp(tiny_checkpoint, tmp_path):
    """``sparse_ops=torch`` packages need torch alone: libtorch runs them from C++, no Python."""
    package = tmp_path / "tiny.pt2"
    result = run_tool("export", f"checkpoint={tiny_checkpoint}", "format=pt2", "sparse_ops=torch",
                      f"output={package}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    runner = tmp_path / "run_pt2"
    build = subprocess.run(["bash", str(ROOT / "tools/cpp/build.sh"), str(runner)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert build.returncode == 0, build.stderr[-3000:]

    import voxsparse

    model = voxsparse.load_model(tiny_checkpoint)
    program = DetectorProgram(model, batch_size=1)
    for n in SIZES:
        points = example_points(model.grid, n, 4, seed=n)
        points.points.numpy().astype("<f4").tofile(tmp_path / "points.f32")
        run = subprocess.run([str(runner), str(package), str(tmp_path / "points.f32"), "4"], capture_output=True,
                             text=True, timeout=300, check=False,
                             env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
        assert run.returncode == 0, run.stderr[-3000:]
        with torch.no_grad():
            expected = program(points.points, points.batch_index.long())
        comparison = compare_outputs(expected, _cpp_detections(run.stdout))
        assert comparison.detections > 0 and comparison.equal, (n, comparison)
    bad = subprocess.run([str(runner), str(package), str(tmp_path / "points.f32"), "7"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 1 and "points.f32" in bad.stderr and "rows of 7 columns" in bad.stderr


def test_export_tool_refuses_an_unknown_format(tiny_checkpoint, tmp_path):
    from tool_runs import error_line

    result = run_tool("export", f"checkpoint={tiny_checkpoint}", "format=tflite", f"hydra.run.dir={tmp_path}")
    assert "format" in error_line(result)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("name", ["voxelnext_small", "dsvt_voxel_small"])
def test_exported_program_on_cuda(name):
    """On CUDA the exported convolutions run spconv's native algorithm, eager ones its implicit GEMM:
    equal up to float summation order."""
    model = _model(name).cuda()
    program = DetectorProgram(model)
    exported = export_program(model, example=example_points(model.grid, 20000, 4, seed=1).to("cuda")).module()
    for n in (3000, 60000):
        points = example_points(model.grid, n, 4, seed=n)
        inputs = (points.points.cuda(), points.batch_index.long().cuda())
        with torch.no_grad():
            comparison = compare_outputs(program(*inputs), exported(*inputs))
        assert comparison.detections > 0 and comparison.equal, (n, comparison)


PROBE = """
import sys, torch
from torch._inductor import aoti_load_package
print(aoti_load_package(sys.argv[1])(torch.ones(3, device="cuda")).tolist())
"""


class _Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1


def _torch_runs_cuda_packages(tmp_path) -> bool:
    """Whether this torch's AOTInductor loader runs a one-operation CUDA package in a new process
    (some builds' loaders crash on every CUDA package)."""
    from voxsparse.engine.export import package_pt2

    exported = torch.export.export(_Affine(), (torch.ones(3, device="cuda"),))
    probe = package_pt2(exported, tmp_path / "probe.pt2")
    run = subprocess.run([sys.executable, "-c", PROBE, str(probe)], capture_output=True, text=True, timeout=300,
                         check=False)
    return run.returncode == 0 and "[3.0, 3.0, 3.0]" in run.stdout


@needs_cuda
@pytest.mark.skipif(compiler_available() is None, reason="AOTInductor needs a C++ compiler; none found")
def test_cuda_package_runs_in_a_fresh_process(tmp_path):
    from voxsparse.engine.export import package_pt2

    if not _torch_runs_cuda_packages(tmp_path):
        pytest.skip(f"torch {torch.__version__}'s AOTInductor loader fails on a one-operation CUDA package")
    model = _model("voxelnext_small").cuda()
    exported = export_program(model, example=example_points(model.grid, 20000, 4, seed=1).to("cuda"))
    package = package_pt2(exported, tmp_path / "model.pt2")
    _check_package_in_fresh_process(package, model, (3000, 60000), tmp_path, "cuda")
