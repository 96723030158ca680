"""voxsparse.load_model: only voxsparse model classes are built from a file, and older checkpoints load."""

from __future__ import annotations

import pytest
import torch

import voxsparse
from voxsparse.engine.build import check_config
from voxsparse.engine.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint


@pytest.mark.parametrize(
    "target",
    [
        "os.system",
        "torch.load",
        "builtins.eval",
        "voxsparse.utils.io.os.system",  # a voxsparse module's import, reached through it
        "voxsparse.models.layers.torch.load",
        "voxsparse.models.detectors.sparse_detector.nn.Module",  # a class, but not voxsparse's
        "voxsparse.engine.trainer.Trainer",  # voxsparse's, but not a model part
        "voxsparse.models.fusion.fuse_for_inference",  # a function, not a class
        "voxsparse.models.no_such_module.Thing",
        "voxsparse.models;import os",
        42,
    ],
)
def test_targets_outside_the_model_classes_are_refused(target):
    config = {"_target_": "voxsparse.structures.VoxelGrid", "nested": [{"deep": {"_target_": target}}]}
    with pytest.raises(ValueError, match=r"config\.model\.nested\[0\]\.deep\._target_: "):
        check_config(config)


def test_interpolations_and_objects_are_refused():
    with pytest.raises(ValueError, match=r"config.model.name: interpolation"):
        check_config({"name": "${oc.env:HOME}"})
    with pytest.raises(ValueError, match=r"config.model.x: a config holds plain values, got Tensor"):
        check_config({"x": torch.zeros(1)})


def test_a_checkpoint_written_before_format_versions_loads(tmp_path, tiny_checkpoint):
    """Format 0 files (no format_version, no versions, no point_convention) still build and predict."""
    ckpt = load_checkpoint(tiny_checkpoint)
    assert ckpt.format_version == FORMAT_VERSION and set(ckpt.versions) == {"voxsparse", "torch", "spconv"}
    config = {"model": {k: v for k, v in ckpt.config["model"].items() if k != "point_convention"}}
    old = tmp_path / "old.pth"
    torch.save({"model": ckpt.model, "epoch": 3, "step": 30, "config": config}, old)
    assert load_checkpoint(old).format_version == 0
    model = voxsparse.load_model(old)
    assert not model.training and model.point_convention.features == ("x", "y", "z", "intensity")
    from voxsparse.structures import PointBatch

    assert len(model.predict(PointBatch.from_frames([torch.rand(50, 4) * 10]))) == 1

    torch.save({"model": ckpt.model, "epoch": 3, "step": 30, "config": config, "format_version": "1"}, old)
    with pytest.raises(CheckpointError, match=r"old.pth: unknown format_version '1'"):
        load_checkpoint(old)
