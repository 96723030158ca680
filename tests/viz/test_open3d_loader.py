"""Open3D is imported through one loader: it supplies libusb from the ``libusb-package`` wheel where
the system has none, and a failure to import leaves one reason that the renderer choice, the
explicit ``backend=open3d`` and the interactive viewer all report."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_IMPORT_IN_FRESH_PROCESS = """
import ctypes, json
try:
    ctypes.CDLL("libusb-1.0.so.0")
    system_libusb = True
except OSError:
    system_libusb = False
from voxsparse.viz.open3d_loader import import_open3d, open3d_import_status
o3d = import_open3d()
cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]))
print(json.dumps({"system_libusb": system_libusb, "status": open3d_import_status(),
                  "points": len(cloud.points)}))
"""


@pytest.mark.skipif(
    importlib.util.find_spec("open3d") is None or importlib.util.find_spec("libusb_package") is None,
    reason="needs open3d and libusb-package (pip install -e '.[viz]')",
)
def test_loader_imports_open3d_without_system_libusb():
    """With the viz extra installed, Open3D imports whether or not Debian's libusb-1.0-0 is there."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_IN_FRESH_PROCESS],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ok, reason = result["status"]
    assert ok and result["points"] == 2, reason
    if result["system_libusb"]:
        assert "the system's libusb" in reason
    else:  # the fresh-machine path: the wheel's copy was loaded
        assert "libusb_package" in reason, reason


SIMULATED = "libfoo.so.1: cannot open shared object file (simulated)"


@pytest.fixture
def broken_open3d(monkeypatch):
    """Open3D's import fails (as where a system library is missing); every cache forgets it after."""
    from voxsparse.viz import open3d_loader, render, render_open3d

    def clear():
        open3d_loader.clear_cache()
        render_open3d.open3d_status.cache_clear()
        render._warned.clear()

    def fail():
        raise ImportError(SIMULATED)

    monkeypatch.delenv("VOXSPARSE_OPEN3D_RENDER", raising=False)
    monkeypatch.setattr(open3d_loader, "_import_module", fail)
    clear()
    yield
    monkeypatch.undo()
    clear()


def test_failed_import_gives_one_reason_everywhere(broken_open3d, caplog, monkeypatch):
    from voxsparse.viz.open3d_loader import Open3DUnavailableError, import_open3d, open3d_import_status
    from voxsparse.viz.render import RenderBackendError, resolve_backend
    from voxsparse.viz.render_open3d import open3d_status

    ok, reason = open3d_import_status()
    assert not ok and SIMULATED in reason
    with pytest.raises(Open3DUnavailableError, match="simulated"):
        import_open3d()
    assert open3d_status() == (False, reason)  # no rendering probe once the import failed

    # auto: the matplotlib fallback, and the reason logged once however often it is asked.
    with caplog.at_level(logging.WARNING, logger="voxsparse.viz"):
        assert resolve_backend("auto") == "matplotlib"
        assert resolve_backend("auto") == "matplotlib"
    warnings = [r.getMessage() for r in caplog.records if r.name == "voxsparse.viz"]
    assert len(warnings) == 1 and SIMULATED in warnings[0], warnings

    # explicit open3d: a one-line error naming the reason.
    with pytest.raises(RenderBackendError) as error:
        resolve_backend("open3d")
    message = str(error.value)
    assert SIMULATED in message and "backend=open3d" in message and "\n" not in message
    assert resolve_backend("matplotlib") == "matplotlib"

    # the interactive viewer: the same one-line error (tools print it as "error: ..."), no ImportError.
    from voxsparse.viz import viewer

    monkeypatch.setenv("DISPLAY", ":0")
    with pytest.raises(RenderBackendError, match="needs Open3D") as error:
        viewer.show(lambda i, colors: None, 1)
    assert not isinstance(error.value, ImportError) and SIMULATED in str(error.value)
