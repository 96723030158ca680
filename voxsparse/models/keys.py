"""How a voxsparse module's parameters are named in a reference implementation's checkpoint.

A module that can take reference weights lists :class:`KeyPair` s from ``openpcdet_keys()``: each of
its state-dict entries, the name of the same tensor in the reference module's state dict, and how
the tensor is stored there. Names are relative to the module on both sides; a parent prefixes its
children's pairs with :func:`prefixed`. The converter (:mod:`voxsparse.convert`) walks the
pairs in both directions, so the naming lives beside the layers it names and no central table grows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from torch import nn

from voxsparse.ops.sparse_plan import is_sparse_conv


class TensorKind(str, Enum):
    """How the reference stores a tensor that voxsparse stores in its own form.

    - ``TENSOR``: the same shape and meaning (BatchNorm statistics, dense convs, linear layers).
    - ``SPARSE_CONV``: a spconv convolution weight; ours is spconv >= 2.2's ``(Cout, *kernel, Cin)``,
      the reference file's layout (spconv 1.x, 2.0-2.1 or 2.2+) is found by the converter.
    - ``SPARSE_CONV_AS_LINEAR``: the reference's 1x1 spconv convolution held by voxsparse as an
      ``nn.Linear`` ``(Cout, Cin)`` weight that computes what spconv computed with it.
    """

    TENSOR = "tensor"
    SPARSE_CONV = "sparse_conv"
    SPARSE_CONV_AS_LINEAR = "sparse_conv_as_linear"


@dataclass(frozen=True)
class KeyPair:
    """One tensor under its two names.

    Attributes:
        ours: key in the voxsparse module's ``state_dict()``.
        theirs: key in the reference module's ``state_dict()``.
        kind: how the reference stores it.
    """

    ours: str
    theirs: str
    kind: TensorKind = TensorKind.TENSOR


@runtime_checkable
class ReferenceNamed(Protocol):
    """A module whose every state-dict entry has a name in the reference implementation."""

    def openpcdet_keys(self) -> list[KeyPair]: ...


def prefixed(pairs: Iterable[KeyPair], ours: str, theirs: str) -> list[KeyPair]:
    """``pairs`` of a child module, each name given its parent's prefix (``"backbone."``, ``"backbone_3d."``)."""
    return [KeyPair(ours + p.ours, theirs + p.theirs, p.kind) for p in pairs]


def identical_keys(module: nn.Module) -> list[KeyPair]:
    """Every state-dict entry of ``module`` under its own name, for modules laid out exactly as their
    reference (same attribute names); the weights of sparse convolutions are ``SPARSE_CONV``."""
    convs = {name for name, m in module.named_modules() if is_sparse_conv(m)}
    pairs = []
    for key in module.state_dict():
        owner, _, leaf = key.rpartition(".")
        kind = TensorKind.SPARSE_CONV if owner in convs and leaf == "weight" else TensorKind.TENSOR
        pairs.append(KeyPair(key, key, kind))
    return pairs
