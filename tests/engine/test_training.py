"""Training and the command-line tools, end to end on tiny synthetic data."""

import json

import pytest
import torch
from tool_runs import TINY_MODEL, run_tool

from voxsparse.models.voxel_encoders import MeanVFE
from voxsparse.structures import VoxelGrid

RANGE = (-16.0, -16.0, -3.0, 16.0, 16.0, 2.0)


def test_train_and_eval_tools(tmp_path):
    data = [
        "dataset.train.num_frames=2", "dataset.val.num_frames=2", f"dataset.cache_dir={tmp_path / 'cache'}",
        "dataset.cache_workers=1",
    ]
    run_dir = tmp_path / "run"
    train = run_tool("train", *TINY_MODEL, *data, "trainer.epochs=1", "trainer.batch_size=1",
        "trainer.tensorboard=false", f"hydra.run.dir={run_dir}",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"LEVEL_1", "LEVEL_2"} and "AP_L2/Vehicle" in metrics["LEVEL_2"]
    assert "Vehicle" in train.stderr + train.stdout, "the AP table is printed"

    by_checkpoint = run_tool("eval", f"checkpoint={run_dir / 'last.pth'}", *data, f"hydra.run.dir={tmp_path / 'e1'}")
    assert by_checkpoint.returncode == 0, by_checkpoint.stderr[-3000:]
    by_file = run_tool("eval", f"predictions={run_dir / 'predictions.pt'}", *data, f"hydra.run.dir={tmp_path / 'e2'}")
    assert by_file.returncode == 0, by_file.stderr[-3000:]
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text()) == metrics

    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    broken = run_tool("eval", f"checkpoint={tmp_path / 'broken.pth'}", *data, f"hydra.run.dir={tmp_path / 'e3'}")
    assert broken.returncode != 0 and "broken.pth: cannot be read" in broken.stderr
    missing = run_tool("eval", f"predictions={run_dir / 'predictions.pt'}", "dataset.val.num_frames=3",
        f"dataset.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'e4'}",
    )
    assert missing.returncode != 0 and "1 of 3 frames of the evaluated split have no entry" in missing.stderr


@pytest.mark.parametrize("bad", ["nan", "shape"])
def test_detector_rejects_bad_points(bad):
    from voxsparse.structures import PointBatch

    points = torch.rand(10, 4)
    if bad == "nan":
        points[3, 1] = float("nan")
        with pytest.raises(ValueError, match="PointBatch.points: 1 row"):
            PointBatch.from_frames([points])
    else:
        encoder = MeanVFE(VoxelGrid((0.25, 0.25, 0.25), RANGE), in_channels=4)
        with pytest.raises(ValueError, match="MeanVFE: expected points with 4 columns, got 5"):
            encoder(PointBatch.from_frames([torch.rand(10, 5)]))
