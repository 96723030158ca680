"""Checkpoints written atomically and read back with errors that say what is wrong."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxsparse.utils.io import atomic_write


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, or not a voxsparse checkpoint."""


REQUIRED_KEYS = ("model", "epoch", "step", "config")


@dataclass
class Checkpoint:
    """Everything needed to resume training or rebuild the model.

    Attributes:
        model: the model's state dict.
        epoch: epochs completed.
        step: optimizer steps taken.
        config: the resolved Hydra config as a plain dict.
        optimizer / scheduler / scaler: their state dicts, None in inference-only checkpoints.
    """

    model: dict[str, torch.Tensor]
    epoch: int
    step: int
    config: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a crash leaves the old file or the new, never half."""
    return atomic_write(path, lambda f: torch.save(vars(checkpoint), f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated/corrupt, or lacks fields.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        # weights_only: a checkpoint holds tensors and plain containers; never execute pickled code.
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a voxsparse checkpoint, missing fields {missing}")
    return Checkpoint(**{k: data.get(k) for k in Checkpoint.__dataclass_fields__})
