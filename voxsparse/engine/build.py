"""Models built from configs read out of files, and weights loaded with errors that say what differs.

A checkpoint's config is data from a file: Hydra's ``instantiate`` would import and call whatever its
``_target_`` names (``torch.load``, ``os.system``, ...). :func:`build_model` first checks every
``_target_`` against an allow-list: classes defined in voxsparse's model and structure packages.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxsparse.engine.checkpoint import CheckpointError, load_checkpoint

#: Packages whose classes a config read from a file may build.
ALLOWED_PACKAGES: tuple[str, ...] = ("voxsparse.models", "voxsparse.structures")

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def _allowed_class(target: Any, where: str) -> None:
    """Raise unless ``target`` names a class defined in one of :data:`ALLOWED_PACKAGES`."""
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise ValueError(f"{where}._target_: expected a dotted class name, got {target!r}")
    if not target.startswith(tuple(p + "." for p in ALLOWED_PACKAGES)):
        raise ValueError(
            f"{where}._target_: {target!r} is not allowed; a config read from a file may only build "
            f"classes of {', '.join(ALLOWED_PACKAGES)}"
        )
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name, None)  # a voxsparse module, by the check above
    except ImportError:
        obj = None
    if not (isinstance(obj, type) and obj.__module__.startswith(tuple(p + "." for p in ALLOWED_PACKAGES))):
        raise ValueError(f"{where}._target_: {target!r} is not a class defined in {', '.join(ALLOWED_PACKAGES)}")


def check_config(node: Any, where: str = "config.model") -> None:
    """Walk a plain config (dicts, lists, scalars) and refuse what a stored model config never holds.

    Raises:
        ValueError: naming the key, for a ``_target_`` outside the allow-list, an interpolation
            (``${...}``; stored configs are resolved), or a value of a type a config cannot hold.
    """
    if isinstance(node, Mapping):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: keys must be strings, got {key!r}")
            if key == "_target_":
                _allowed_class(value, where)
            else:
                check_config(value, f"{where}.{key}")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            check_config(value, f"{where}[{i}]")
    elif isinstance(node, str):
        if "${" in node:
            raise ValueError(f"{where}: interpolation {node!r} in a stored config (stored configs are resolved)")
    elif node is not None and not isinstance(node, (bool, int, float)):
        raise ValueError(f"{where}: a config holds plain values, got {type(node).__name__}")


def build_model(config: Mapping[str, Any], where: str = "config.model") -> nn.Module:
    """Instantiate a model config that came from a file, after :func:`check_config`."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    check_config(config, where)
    try:
        return instantiate(OmegaConf.create(dict(config)))
    except Exception as exc:  # Hydra wraps the constructor's error; its message names the class
        raise ValueError(f"{where}: cannot be built ({exc})") from exc


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state)`` (strict), or one error that sums up what does not fit.

    Raises:
        ValueError: naming ``source``, with the counts of tensors of another shape, missing and
            unexpected, and the first few of each.
    """
    own = model.state_dict()
    shape = [
        f"{k} {tuple(v.shape)} in the file, {tuple(own[k].shape)} in the model"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shape or missing or unexpected:
        parts = []
        for label, items in (("of another shape", shape), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f", ... {len(items) - 3} more" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label} ({'; '.join(items[:3])}{more})")
        raise ValueError(
            f"{source}: its weights do not fit the model ({len(own)} tensors): {', '.join(parts)}; "
            f"were they trained with another model config?"
        )
    model.load_state_dict(state)


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model a voxsparse checkpoint describes, with its weights, on ``device``, in eval mode.

    Only classes of :data:`ALLOWED_PACKAGES` are built from the checkpoint's config; the file is read
    with ``torch.load(weights_only=True)``, so nothing in it can run code.

    Raises:
        CheckpointError: naming the file, when it cannot be read, is not a voxsparse checkpoint, its
            config builds something outside the allow-list, or its weights do not fit its config.
    """
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    config = ckpt.config.get("model") if isinstance(ckpt.config, dict) else None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: its config has no model section")
    try:
        model = build_model(config)
        load_weights(model, ckpt.model, f"checkpoint {path}")
    except ValueError as exc:
        message = str(exc) if str(exc).startswith("checkpoint ") else f"checkpoint {path}: {exc}"
        raise CheckpointError(message) from None
    return model.to(device).eval()
