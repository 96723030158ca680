"""The VoxelKP speed benchmark (``tools/benchmark.py --voxelkp``) runs a training step on the CPU."""

from voxsparse.benchmark.voxelkp import VoxelKPSpeedOptions, run_voxelkp_speed


def test_training_timing_with_modules_off():
    lines = []
    run_voxelkp_speed(VoxelKPSpeedOptions(
        "cpu", batch=1, repeats=1, warmup=0, forward=False, profile_rows=5,
        modules_off=("selective_kernel", "box_attention"),
    ), lines.append)
    text = "\n".join(lines)
    assert "voxelkp_small training, batch 1, off: selective_kernel, box_attention" in text
    assert "steps/s" in text and "back to back" in text
    assert "5x5x5 by" not in text  # the CPU has one path for large kernels; CUDA times two
    table = text.split("by self host time:\n", 1)[1]
    assert "Self CPU" in table and "aten::" in table and "by self CUDA time" not in text
