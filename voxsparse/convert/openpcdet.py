"""OpenPCDet checkpoints converted to voxsparse checkpoints, and back.

An OpenPCDet ``.pth`` is a dict: ``model_state`` (the detector's state dict, keys prefixed ``vfe.``,
``backbone_3d.``, ``map_to_bev_module.``, ``backbone_2d.``, ``dense_head.``, plus its ``global_step``
counter), ``optimizer_state``, ``epoch``, ``it`` and ``version`` (``pcdet+<version>``). It is read
with ``torch.load(weights_only=True)``: no pickled code runs, and a file holding anything else is
refused. Every tensor is mapped through the voxsparse model's ``openpcdet_keys()``
(:mod:`voxsparse.models.keys`), shape-checked, and sparse-convolution weights are converted from the
spconv layout the file was written in (:mod:`voxsparse.convert.spconv_layout`). The result is a
voxsparse checkpoint (:mod:`voxsparse.engine.checkpoint`) recording the model's config, so
``voxsparse.load_model`` and every tool open it.

The reverse direction writes OpenPCDet's layout with spconv >= 2.2 weights, so a voxsparse model
(trained here or converted) loads into OpenPCDet.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import voxsparse
from voxsparse.convert.spconv_layout import (
    ConvWeight,
    LayoutError,
    SpconvLayout,
    infer_layout,
    linear_to_spconv,
    stored_shape,
    to_linear,
    to_ours,
)
from voxsparse.engine.build import build_model
from voxsparse.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from voxsparse.engine.cli import CONFIG_DIR
from voxsparse.models.keys import KeyPair, ReferenceNamed, TensorKind
from voxsparse.utils.io import FileFormatError, atomic_write, read_torch_file

#: Top-level entries of an OpenPCDet checkpoint and the types each may hold.
OPENPCDET_FIELDS: dict[str, tuple[type, ...]] = {
    "model_state": (dict,),
    "optimizer_state": (dict, type(None)),
    "epoch": (int, type(None)),
    "it": (int, type(None)),
    "version": (str, type(None)),
}

#: Entries of OpenPCDet's ``model_state`` that are not weights of any part (its step counter).
NOT_WEIGHTS = ("global_step",)

#: Kernel rank assumed for a one-cell reference convolution held as ``nn.Linear`` when writing
#: OpenPCDet's layout without the original shapes: every such layer of the reference configs is a
#: 2D (BEV) ``SubMConv2d``.
LINEAR_AS_SPCONV_RANK = 2


class ConversionError(ValueError):
    """A file cannot be converted: not an OpenPCDet checkpoint, or its tensors do not fit the model."""


@dataclass
class OpenPCDetCheckpoint:
    """The parts of an OpenPCDet checkpoint that conversion uses.

    Attributes:
        model_state: tensor name -> tensor.
        epoch, it: training progress (None where the file has none).
        version: OpenPCDet's version string (``pcdet+0.6.0``), or None.
    """

    model_state: dict[str, torch.Tensor]
    epoch: int | None = None
    it: int | None = None
    version: str | None = None


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        layout: the spconv layout of the source's sparse-convolution weights (None without any).
        converted: tensors written.
        unmapped: source keys no pair names (left out of the result).
        missing: target keys whose source tensor is absent (the conversion fails if any).
        ignored: source entries that are not weights (``global_step``).
    """

    layout: SpconvLayout | None
    converted: int
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Lines for a user: counts, the layout, and the keys that did not map."""
        lines = [f"converted {self.converted} tensors"
                 + (f" (sparse convolutions in spconv {self.layout.value} layout)" if self.layout else "")]
        if self.ignored:
            lines.append(f"ignored (not weights): {', '.join(self.ignored)}")
        if self.unmapped:
            lines.append(f"{len(self.unmapped)} source tensors not used by the model: {', '.join(self.unmapped)}")
        if self.missing:
            lines.append(f"{len(self.missing)} model tensors missing from the source: {', '.join(self.missing)}")
        return "\n".join(lines)


def read_openpcdet_checkpoint(path: str | os.PathLike) -> OpenPCDetCheckpoint:
    """Read an OpenPCDet ``.pth`` without running pickled code.

    Raises:
        ConversionError: naming the file, when it cannot be read, holds Python objects, is not a
            dict with a ``model_state`` of tensors, or holds entries other than OpenPCDet's.
    """
    path = Path(path)
    try:
        data = read_torch_file(path, "OpenPCDet checkpoint")
    except FileFormatError as exc:
        raise ConversionError(str(exc)) from None
    where = f"OpenPCDet checkpoint {path}"
    if not isinstance(data, dict):
        raise ConversionError(f"{where}: expected a dict, found {type(data).__name__}")
    if "model_state" not in data:
        hint = " (a voxsparse checkpoint: convert it with --to openpcdet)" if "model" in data and "config" in data else ""
        raise ConversionError(f"{where}: no model_state{hint}")
    for key, value in data.items():
        allowed = OPENPCDET_FIELDS.get(key)
        if allowed is None:
            raise ConversionError(f"{where}: unexpected entry {key!r}; an OpenPCDet checkpoint holds {list(OPENPCDET_FIELDS)}")
        if not isinstance(value, allowed) or isinstance(value, bool):
            raise ConversionError(f"{where}: {key} is a {type(value).__name__}, expected {allowed[0].__name__}")
    bad = [k for k, v in data["model_state"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{where}: model_state entries that are not tensors: {bad[:4]}")
    return OpenPCDetCheckpoint(dict(data["model_state"]), data.get("epoch"), data.get("it"), data.get("version"))


def reference_pairs(model: nn.Module) -> list[KeyPair]:
    """``model.openpcdet_keys()``, checked to name every state-dict entry of the model exactly once.

    Raises:
        ConversionError: the model names no reference keys.
        RuntimeError: its pairs and its state dict disagree (a defect of the model's naming).
    """
    if not isinstance(model, ReferenceNamed):
        raise ConversionError(f"{type(model).__name__} does not name its tensors in OpenPCDet's checkpoints "
                              f"(no openpcdet_keys): it is not a reference configuration")
    pairs = model.openpcdet_keys()
    ours = [p.ours for p in pairs]
    state = set(model.state_dict())
    unnamed, unknown = sorted(state - set(ours)), sorted(set(ours) - state)
    duplicated = sorted({k for k in ours if ours.count(k) > 1})
    theirs = [p.theirs for p in pairs]
    duplicated += sorted({k for k in theirs if theirs.count(k) > 1})
    if unnamed or unknown or duplicated:
        raise RuntimeError(f"{type(model).__name__}.openpcdet_keys() does not match its state dict: "
                           f"unnamed {unnamed[:5]}, unknown {unknown[:5]}, named twice {duplicated[:5]}")
    return pairs


def _conv_weight(pair: KeyPair, source: torch.Tensor, target: torch.Tensor) -> ConvWeight:
    if pair.kind is TensorKind.SPARSE_CONV:
        return ConvWeight(pair.theirs, tuple(source.shape), target.shape[0], tuple(target.shape[1:-1]), target.shape[-1])
    cout, cin = target.shape
    return ConvWeight(pair.theirs, tuple(source.shape), cout, (1,) * max(source.ndim - 2, 1), cin)


def openpcdet_to_ours(
    model: nn.Module, state: Mapping[str, torch.Tensor], layout: SpconvLayout | None = None, where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """An OpenPCDet ``model_state`` as ``model``'s state dict, computing what the source computed.

    Args:
        model: the voxsparse model (its ``openpcdet_keys()`` and tensor shapes are the target).
        state: the OpenPCDet state dict.
        layout: the spconv layout of the source's sparse convolutions; None infers it.
        where: the source, for messages.

    Returns:
        (the state dict, in the model's dtypes; the report).

    Raises:
        ConversionError: tensors missing, a shape that does not fit (named), or a spconv layout that
            cannot be told or is mixed.
    """
    pairs = reference_pairs(model)
    target = model.state_dict()
    mapped = {p.theirs for p in pairs}
    report = ConversionReport(
        layout=None, converted=0,
        unmapped=[k for k in state if k not in mapped and k not in NOT_WEIGHTS],
        missing=[p.ours for p in pairs if p.theirs not in state],
        ignored=[k for k in state if k in NOT_WEIGHTS and k not in mapped],
    )
    if report.missing:
        raise ConversionError(f"{where}: {len(report.missing)} tensors of the model are not in it: "
                              + ", ".join(f"{p.theirs} (ours {p.ours})" for p in pairs if p.theirs not in state)[:600])
    convs = {p.theirs: _conv_weight(p, state[p.theirs], target[p.ours])
             for p in pairs if p.kind is not TensorKind.TENSOR}
    if convs:
        try:
            report.layout = layout if layout is not None else infer_layout(list(convs.values()), where)
        except LayoutError as exc:
            raise ConversionError(str(exc)) from None
    out: dict[str, torch.Tensor] = {}
    for pair in pairs:
        source, goal = state[pair.theirs], target[pair.ours]
        if pair.kind is TensorKind.TENSOR:
            value = source
        else:
            weight = convs[pair.theirs]
            shape = stored_shape(report.layout, weight.cout, weight.kernel, weight.cin)
            if tuple(source.shape) != shape:
                raise ConversionError(f"{where}: {pair.theirs} has shape {list(source.shape)}, expected {list(shape)} "
                                      f"(spconv {report.layout.value}) for {pair.ours} {list(goal.shape)}")
            value = to_ours(source, report.layout, weight) if pair.kind is TensorKind.SPARSE_CONV \
                else to_linear(source, weight)
        if tuple(value.shape) != tuple(goal.shape):
            raise ConversionError(f"{where}: {pair.theirs} has shape {list(source.shape)}; "
                                  f"{pair.ours} needs {list(goal.shape)}")
        out[pair.ours] = value.detach().to(dtype=goal.dtype).clone()
    report.converted = len(out)
    return out, report


def ours_to_openpcdet(
    model: nn.Module, state: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size] | None = None
) -> dict[str, torch.Tensor]:
    """``model``'s state dict as an OpenPCDet ``model_state`` with spconv >= 2.2 weights.

    Args:
        model: the voxsparse model whose ``openpcdet_keys()`` name the tensors.
        state: its state dict (or a checkpoint's).
        shapes: reference tensor shapes, for the kernel rank of one-cell convolutions held as
            ``nn.Linear``; without them :data:`LINEAR_AS_SPCONV_RANK`.

    Returns:
        OpenPCDet's key -> tensor, with ``global_step`` (zero).
    """
    out: dict[str, torch.Tensor] = {"global_step": torch.zeros(1, dtype=torch.int64)}
    for pair in reference_pairs(model):
        value = state[pair.ours].detach()
        if pair.kind is TensorKind.SPARSE_CONV_AS_LINEAR:
            rank = len(shapes[pair.theirs]) - 2 if shapes is not None and pair.theirs in shapes else LINEAR_AS_SPCONV_RANK
            value = linear_to_spconv(value, rank)
        out[pair.theirs] = value.clone()
    return out


def model_config(name: str, dataset: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``configs/model/<name>.yaml`` composed as ``tools/train.py`` composes it, as a plain resolved dict.

    Args:
        name: the model config.
        dataset: the dataset config whose class names the model takes; None: the one named by the
            model name's last word where ``configs/dataset/`` has it (``voxelnext_nuscenes`` ->
            ``nuscenes``), else the training default.
        overrides: further Hydra overrides (``model.head.score_threshold=0.2``).

    Raises:
        ValueError: no such model or dataset config.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    if not (CONFIG_DIR / "model" / f"{name}.yaml").is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
        raise ValueError(f"no model config {name!r}; configs/model has {known}")
    if dataset is None:
        suffix = name.rsplit("_", 1)[-1]
        dataset = suffix if (CONFIG_DIR / "dataset" / f"{suffix}.yaml").is_file() else None
    choices = [f"model={name}"] + ([f"dataset={dataset}"] if dataset else [])
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[*choices, *overrides])
    return OmegaConf.to_container(cfg.model, resolve=True)


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The voxsparse model of a plain (resolved) model config, built through the allow-list."""
    return build_model(config)


def convert_from_openpcdet(
    src: str | os.PathLike, dst: str | os.PathLike, config: Mapping[str, Any], layout: SpconvLayout | None = None
) -> ConversionReport:
    """Convert the OpenPCDet checkpoint ``src`` into a voxsparse checkpoint ``dst`` for the model config
    ``config`` (:func:`model_config`).

    The checkpoint holds the converted weights, OpenPCDet's epoch and iteration, and ``{"model":
    config}`` as its config; the model loads them strictly before anything is written.
    """
    source = read_openpcdet_checkpoint(src)
    model = model_from_config(config)
    state, report = openpcdet_to_ours(model, source.model_state, layout, f"OpenPCDet checkpoint {src}")
    model.load_state_dict(state, strict=True)
    save_checkpoint(Checkpoint(state, source.epoch or 0, source.it or 0, {"model": dict(config)}), dst)
    return report


def convert_to_openpcdet(src: str | os.PathLike, dst: str | os.PathLike) -> int:
    """Write the voxsparse checkpoint ``src`` as an OpenPCDet checkpoint ``dst`` (spconv >= 2.2 layout).

    Returns:
        the number of tensors written.
    """
    checkpoint = load_checkpoint(src)
    model = model_from_config(checkpoint.config["model"])
    state = ours_to_openpcdet(model, checkpoint.model)
    content = {"model_state": state, "optimizer_state": None, "epoch": checkpoint.epoch, "it": checkpoint.step,
               "version": f"voxsparse+{voxsparse.__version__}"}
    atomic_write(dst, lambda f: torch.save(content, f))
    return len(state)
