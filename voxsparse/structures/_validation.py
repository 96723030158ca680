"""Shared checks for typed structures: one clear message naming the field and the expectation."""

from __future__ import annotations

import torch


def checking_values() -> bool:
    """Whether checks of tensor values run: not while a graph is traced (``torch.export``,
    ``torch.compile``), whose tensors have shapes but no values; shapes are checked always."""
    return not torch.compiler.is_compiling()


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    last_dim: int | tuple[int, ...] | None = None,
    min_last_dim: int | None = None,
    floating: bool | None = None,
    length: int | None = None,
    finite: bool = False,
) -> torch.Tensor:
    """Validate ``value`` and return it; raise ``TypeError``/``ValueError`` naming ``name``.

    ``floating=True`` requires a floating dtype, ``False`` an integer dtype, ``None`` either.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(value.shape)}")
    if last_dim is not None:
        allowed = (last_dim,) if isinstance(last_dim, int) else last_dim
        if value.shape[-1] not in allowed:
            raise ValueError(f"{name}: expected last dimension in {allowed}, got shape {tuple(value.shape)}")
    if min_last_dim is not None and value.shape[-1] < min_last_dim:
        raise ValueError(f"{name}: expected at least {min_last_dim} columns, got shape {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name}: expected an integer dtype, got {value.dtype}")
    if length is not None and value.shape[0] != length:
        raise ValueError(f"{name}: expected {length} rows, got shape {tuple(value.shape)}")
    if finite and checking_values() and value.is_floating_point() and value.numel() and not bool(
        torch.isfinite(value).all()
    ):
        bad = int((~torch.isfinite(value)).any(dim=-1).sum()) if value.ndim > 1 else int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: {bad} row(s) contain NaN or inf")
    return value
