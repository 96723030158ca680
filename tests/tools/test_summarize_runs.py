"""tools/summarize_runs.py on run folders laid out as tools/train.py writes them."""

import json
import statistics

import yaml

from tests.tool_runs import error_line, run_tool


def _run(root, name: str, seed: int, mpjpe: float | None, ap: float) -> str:
    folder = root / f"{name}-{seed}"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"name": name, "trainer": {"seed": seed}}))
    metrics = {"keypoints": {"MPJPE": mpjpe, "OKS_P@0.50": 0.5},
               "detection": {"LEVEL_1": {"AP_L1/Pedestrian": ap}}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return str(folder)


def test_groups_by_name_with_mean_and_spread(tmp_path):
    full = [_run(tmp_path, "voxelkp_small", s, m, a) for s, m, a in [(0, 0.10, 0.6), (1, 0.14, 0.7), (2, 0.12, 0.8)]]
    off = [_run(tmp_path, "voxelkp_ablation_all_off", s, None if s else 0.2, 0.5) for s in (0, 1)]
    result = run_tool("summarize_runs", *full, *off, "--metric", "keypoints.MPJPE",
                      "--metric", "detection.LEVEL_1.AP_L1/Pedestrian")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "| run | seeds | keypoints.MPJPE | detection.LEVEL_1.AP_L1/Pedestrian |"
    std = statistics.stdev([0.10, 0.14, 0.12])
    assert lines[2] == f"| voxelkp_small | 0, 1, 2 | 0.120 ± {std:.3f} (0.100–0.140) | 0.700 ± 0.100 (0.600–0.800) |"
    # A run that measured nothing (null in metrics.json) is left out of the mean, not counted as 0.
    assert lines[3] == "| voxelkp_ablation_all_off | 0, 1 | 0.200 ± 0.000 (0.200–0.200), n=1 | 0.500 ± 0.000 (0.500–0.500) |"


def test_bad_input_is_one_error_line(tmp_path):
    run = _run(tmp_path, "voxelkp_small", 0, 0.1, 0.6)
    line = error_line(run_tool("summarize_runs", run, "--metric", "keypoints.MPJP"))
    assert "metrics.json" in line and "keypoints.MPJPE" in line
    line = error_line(run_tool("summarize_runs", str(tmp_path), "--metric", "keypoints.MPJPE"))
    assert "metrics.json: not found" in line
    twin = _run(tmp_path / "again", "voxelkp_small", 0, 0.1, 0.6)
    line = error_line(run_tool("summarize_runs", run, twin, "--metric", "keypoints.MPJPE"))
    assert "seed 0" in line

    (tmp_path / "broken" / ".hydra").mkdir(parents=True)
    (tmp_path / "broken" / "metrics.json").write_text("{}")
    (tmp_path / "broken" / ".hydra" / "config.yaml").write_text("name: [unclosed")
    line = error_line(run_tool("summarize_runs", str(tmp_path / "broken"), "--metric", "keypoints.MPJPE"))
    assert "config.yaml: unreadable" in line
    (tmp_path / "broken" / ".hydra" / "config.yaml").write_text("name: x\ntrainer: fast\n")
    line = error_line(run_tool("summarize_runs", str(tmp_path / "broken"), "--metric", "keypoints.MPJPE"))
    assert "trainer.seed" in line
