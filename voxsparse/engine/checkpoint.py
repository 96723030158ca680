"""Checkpoints written atomically and read back with errors that say what is wrong.

A checkpoint is a dict of tensors and plain containers (read with ``torch.load(weights_only=True)``,
so no pickled code runs). It records its layout version (:data:`FORMAT_VERSION`) and the versions of
the software that wrote it; a file of a newer or unknown layout is refused instead of misread.
Files without a version are the first layout (format 0), which differs only in lacking the two fields.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voxsparse.utils.io import FileFormatError, atomic_write, read_torch_file

#: The checkpoint layout this code writes; it reads this one and every older one.
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, not a voxsparse checkpoint, or of an unknown layout."""


REQUIRED_KEYS = ("model", "epoch", "step", "config")


def software_versions() -> dict[str, str]:
    """Versions of voxsparse, torch and spconv (``"absent"`` where spconv is not installed)."""
    import voxsparse

    try:
        import spconv

        spconv_version = str(spconv.__version__)
    except ImportError:
        spconv_version = "absent"
    return {"voxsparse": str(voxsparse.__version__), "torch": str(torch.__version__), "spconv": spconv_version}


@dataclass
class Checkpoint:
    """Everything needed to resume training or rebuild the model.

    Attributes:
        model: the model's state dict.
        epoch: epochs completed.
        step: optimizer steps taken.
        config: the resolved Hydra config as a plain dict (``config["model"]`` builds the model).
        optimizer / scheduler / scaler: their state dicts, None in inference-only checkpoints.
        format_version: the layout of the file (:data:`FORMAT_VERSION` when written by this code).
        versions: voxsparse / torch / spconv versions of the writer (empty for format 0 files).
    """

    model: dict[str, torch.Tensor]
    epoch: int
    step: int
    config: dict[str, Any]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    versions: dict[str, str] = field(default_factory=software_versions)


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically: a crash leaves the old file or the new, never half."""
    return atomic_write(path, lambda f: torch.save(vars(checkpoint), f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: naming the file, when it is missing, truncated/corrupt, foreign, lacks
            fields, or has a layout newer than :data:`FORMAT_VERSION` or one this code does not know.
    """
    path = Path(path)
    try:
        data = read_torch_file(path, "checkpoint", map_location)
    except FileFormatError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, found {type(data).__name__}")
    if "model_state" in data and "model" not in data:
        raise CheckpointError(
            f"checkpoint {path}: an OpenPCDet checkpoint (model_state, version {data.get('version')!r}), "
            f"not a voxsparse checkpoint"
        )
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path}: not a voxsparse checkpoint, missing fields {missing}")
    version = data.get("format_version", 0)
    versions = data.get("versions") or {}
    if type(version) is not int or version < 0:
        raise CheckpointError(f"checkpoint {path}: unknown format_version {version!r}; expected 0..{FORMAT_VERSION}")
    if version > FORMAT_VERSION:
        writer = versions.get("voxsparse", "unknown") if isinstance(versions, dict) else "unknown"
        import voxsparse

        raise CheckpointError(
            f"checkpoint {path}: format {version} was written by voxsparse {writer}; this voxsparse "
            f"({voxsparse.__version__}) reads formats up to {FORMAT_VERSION}: upgrade voxsparse"
        )
    fields_ = {k: data.get(k) for k in Checkpoint.__dataclass_fields__ if k not in ("format_version", "versions")}
    return Checkpoint(**fields_, format_version=version, versions=dict(versions))
