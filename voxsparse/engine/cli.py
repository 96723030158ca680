"""What every command-line tool shares: Hydra over the project's ``configs/``, and errors in the user's
input reported as one line (``error: <message naming the file or key>``, exit status 2) instead of a
traceback. ``VOXSPARSE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from voxsparse.engine.checkpoint import CheckpointError

#: The project's Hydra configs (tools run from a source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Exceptions that describe bad input (a file, a path, a config value), not a defect of the code.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    CheckpointError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    OmegaConfBaseException,
    InstantiationException,
)


def _message(exc: BaseException) -> str:
    """One line; a class that refused its config arguments is named by the config key."""
    cause = exc.__cause__
    if isinstance(exc, InstantiationException) and isinstance(cause, USER_ERRORS):
        key = re.search(r"full_key: (\S+)", str(exc))
        return (f"{key.group(1)}: " if key else "") + _message(cause)
    return " ".join(str(exc).split()) or type(exc).__name__


def _to_log_files(message: str) -> None:
    """Write ``message`` to the run's log file(s) only (the console gets it on stderr)."""
    record = logging.LogRecord("voxsparse", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def tool(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``hydra.main`` for ``configs/<config_name>.yaml`` with bad input reported in one line."""
    import hydra

    def decorate(run: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        @functools.wraps(run)
        def main(cfg: DictConfig) -> Any:
            try:
                return run(cfg)
            except USER_ERRORS as exc:
                if os.environ.get("VOXSPARSE_DEBUG"):
                    raise
                message = _message(exc)
                _to_log_files(f"error: {message}")
                print(f"error: {message}", file=sys.stderr)
                sys.exit(2)

        return hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(main)

    return decorate
