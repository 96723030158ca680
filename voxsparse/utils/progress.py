"""Progress bars for a terminal only: piped to a file, a run writes log lines, not bar frames."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr (where bars are drawn) is a terminal."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, desc: str = "", enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar over ``iterable`` drawn only when ``enabled`` and stderr is a terminal (it still
    iterates otherwise); ``kwargs`` go to tqdm (``total``, ``unit``, ``leave``)."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, disable=not (enabled and on_terminal()), **kwargs)
