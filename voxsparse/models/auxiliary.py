"""Training losses that a detector's parts other than its head add to the head's.

A backbone with a loss of its own (Focals Conv's voxel importance) has
``auxiliary_losses(annotations) -> dict[str, Tensor]``: named scalar terms of its last forward.
:class:`~voxsparse.models.detectors.sparse_detector.SparseDetector` adds them to ``total`` and
reports each beside the head's terms (:func:`with_auxiliary_losses`), so the trainer logs them as
it logs every scalar field of the losses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cache
from typing import Any

import torch


@cache
def _extended(base: type, names: tuple[str, ...]) -> type:
    """``base`` (a losses dataclass) with keyword-only tensor fields ``names`` after its own."""
    fields = [(name, torch.Tensor, dataclasses.field(kw_only=True)) for name in names]
    return dataclasses.make_dataclass(base.__name__, fields, bases=(base,))


def with_auxiliary_losses(losses: Any, terms: Mapping[str, torch.Tensor]) -> Any:
    """The head's ``losses`` (a dataclass with a ``total``) with ``terms`` added to ``total`` and
    kept as fields of their own (detached); ``losses`` itself when there are none.

    Raises:
        ValueError: a term's name is already a field of ``losses``.
    """
    if not terms:
        return losses
    own = {f.name for f in dataclasses.fields(losses)}
    clash = sorted(own & set(terms))
    if clash:
        raise ValueError(f"auxiliary losses {clash}: already terms of {type(losses).__name__}")
    names = tuple(terms)
    values = {f.name: getattr(losses, f.name) for f in dataclasses.fields(losses)}
    values["total"] = losses.total + sum(terms[n] for n in names)
    return _extended(type(losses), names)(**values, **{n: terms[n].detach() for n in names})
