"""voxsparse: fully sparse 3D LiDAR perception.

``voxsparse.load_model(checkpoint, device="cpu")`` rebuilds a trained model from its checkpoint
(:func:`voxsparse.engine.build.load_model`); it is imported on first use, so ``import voxsparse``
stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]

if TYPE_CHECKING:
    from voxsparse.engine.build import load_model


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from voxsparse.engine.build import load_model

        return load_model
    raise AttributeError(f"module 'voxsparse' has no attribute {name!r}")
