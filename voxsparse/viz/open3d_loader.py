"""The one way voxsparse imports Open3D: :func:`import_open3d`.

The Open3D 0.20 wheel links ``libusb-1.0.so.0`` but does not ship it, so on a machine without
Debian's ``libusb-1.0-0`` a plain ``import open3d`` raises ``ImportError: libusb-1.0.so.0``. The
``libusb-package`` wheel (in the ``viz`` extra) ships that library: loading it with ``RTLD_GLOBAL``
before the import satisfies Open3D's dependency, so Open3D imports without any system package.

Rendering needs more (a Vulkan driver, see :mod:`voxsparse.viz.render_open3d`); this module answers
only whether Open3D imports. The answer is cached for the process: a failed import is not retried,
and every caller gets the same reason.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
from types import ModuleType

__all__ = ["Open3DUnavailableError", "clear_cache", "import_open3d", "open3d_import_status", "preload_libusb"]

_LIBUSB = "libusb-1.0.so.0"


class Open3DUnavailableError(ImportError):
    """Open3D cannot be imported here; the message says why and what to install."""


def preload_libusb() -> str:
    """Make ``libusb-1.0.so.0`` loadable for Open3D; returns where it comes from.

    ``"system"`` when the dynamic linker finds it already, the path of ``libusb-package``'s copy when
    that was loaded (globally, so Open3D's extension resolves against it), ``""`` when neither.
    """
    try:
        ctypes.CDLL(_LIBUSB)
        return "system"
    except OSError:
        pass
    try:
        import libusb_package
    except ImportError:
        return ""
    path = libusb_package.get_library_path()
    if path is None:
        return ""
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return ""
    return str(path)


def _import_module() -> ModuleType:
    """``import open3d`` (the step tests replace to simulate a failure)."""
    return importlib.import_module("open3d")


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    libusb = preload_libusb() if importlib.util.find_spec("open3d") is not None else ""
    try:
        module = _import_module()
    except Exception as exc:  # noqa: BLE001 (an ImportError mostly; a broken wheel may raise anything)
        if isinstance(exc, ModuleNotFoundError) and exc.name == "open3d":
            return None, "open3d is not installed (pip install -e \".[viz]\")"
        text = " ".join(str(exc).split()) or type(exc).__name__
        hint = ""
        if "libusb" in text:
            hint = " (pip install libusb-package, or apt-get install libusb-1.0-0)"
        return None, f"import open3d failed: {text}{hint}"
    where = {"system": "the system's libusb", "": "no libusb preload"}.get(libusb, f"libusb from {libusb}")
    return module, f"open3d {getattr(module, '__version__', '?')} imported ({where})"


def open3d_import_status() -> tuple[bool, str]:
    """(True, what was imported) when Open3D imports here, else (False, why); imports it once."""
    module, reason = _load()
    return module is not None, reason


def import_open3d() -> ModuleType:
    """The ``open3d`` module, with libusb preloaded where the system lacks it.

    Raises:
        Open3DUnavailableError: Open3D is not installed or its import fails (the reason is cached).
    """
    module, reason = _load()
    if module is None:
        raise Open3DUnavailableError(reason)
    return module


def clear_cache() -> None:
    """Forget the cached outcome (tests); a failed import is retried on the next call."""
    _load.cache_clear()
