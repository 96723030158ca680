"""Running the command-line tools as a user does, on a model small enough to build in a second."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from voxsparse.engine.checkpoint import Checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]

#: Overrides that shrink voxelnext_small (8 channels, a 32 m square) so the tools run it in seconds.
TINY_MODEL = [
    "model.voxel_encoder.grid.point_cloud_range=[-16,-16,-3,16,16,2]",
    "model.backbone.channels=[8,8,8,8,8]",
    "model.backbone.out_channels=8",
    "model.head.head_channels=8",
]


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """``configs/<name>.yaml`` with ``overrides``, as the tool composes it."""
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides or [])


def save_tiny_checkpoint(path: Path, *overrides: str) -> Path:
    """An untrained tiny voxelnext_small (seed 0), saved as tools/train.py saves a checkpoint."""
    model_cfg = OmegaConf.to_container(compose_config("train", [*TINY_MODEL, *overrides]).model, resolve=True)
    torch.manual_seed(0)
    model = instantiate(OmegaConf.create(model_cfg))
    return save_checkpoint(Checkpoint(model.state_dict(), 0, 0, {"model": model_cfg}), path)


def run_tool(name: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python tools/<name>.py args`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / f"{name}.py"), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a tool prints for bad input: exit status 2, no traceback, ``error: ...``."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]
