"""File writing that never leaves a half-written file behind, and reading that names the file it fails on."""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the previous file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write ``arrays`` as one uncompressed ``.npz`` with :func:`atomic_write`."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def read_arrays(
    path: str | os.PathLike, what: str, build: Callable[[dict[str, np.ndarray]], T], remedy: str = ""
) -> T:
    """``build`` of every array of the ``.npz`` at ``path``; no object arrays are unpickled.

    Reading every member checks each one's CRC-32, so a damaged file fails here.

    Raises:
        ValueError: naming ``what`` and the file (and ``remedy``, when given), when it is missing,
            truncated, corrupt, or ``build`` rejects its arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return build(arrays)
    except Exception as exc:  # any failure means the file must be rewritten
        hint = f"; {remedy}" if remedy else ""
        raise ValueError(f"{what} {path}: unreadable ({type(exc).__name__}: {exc}){hint}") from exc


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporaries that interrupted :func:`atomic_write` calls for ``path`` left beside it
    (a process killed mid-write cannot clean up); call it where no write to ``path`` is in progress.

    Returns:
        the files removed.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


class FileFormatError(ValueError):
    """A file is missing, a directory, unreadable, or not of the kind expected; the message names it."""


def read_torch_file(path: Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors that name the file (as ``what`` it should be)
    and say what is wrong.

    Raises:
        FileFormatError: for a missing path, a directory, an unreadable or truncated file, or a file
            holding Python objects (which are never unpickled: they could run code).
    """
    if path.is_dir():
        raise FileFormatError(f"{what} {path}: is a directory, expected a file")
    if not path.is_file():
        raise FileFormatError(f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found is None:  # not a pickle torch writes: garbage, or another format
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(exc))
            reason = detail.group(1).strip() if detail else str(exc).splitlines()[0]
            raise FileFormatError(f"{what} {path}: cannot be read ({reason}); not a PyTorch file, or corrupt") from None
        raise FileFormatError(
            f"{what} {path}: not a voxsparse {what}: it holds Python objects ({found.group(1)}), and objects "
            f"from a file are never unpickled (they could run code)"
        ) from None
    except Exception as exc:  # torch raises several types for truncated or foreign files
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise FileFormatError(
            f"{what} {path}: cannot be read ({type(exc).__name__}: {reason}); not a PyTorch file, or truncated"
        ) from None
