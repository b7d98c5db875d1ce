"""Blinkflow: streaming video understanding as a pipelined graph of stages.

The Python API (:mod:`blinkflow.api`)::

    import blinkflow
    for record in blinkflow.run("configs/demo.yaml"):
        ...

Importing this package is cheap: torch, torchvision, PyAV and Ray are imported
lazily by the modules that need them.
"""

from __future__ import annotations

from typing import Any

from blinkflow.errors import BlinkflowError, ConfigError, SourceError, StageError  # noqa: F401
from blinkflow.version import __version__  # noqa: F401

_API = ("run", "frames", "load_config")


def __getattr__(name: str) -> Any:
    """``blinkflow.run``, ``blinkflow.frames`` and ``blinkflow.load_config``, imported on first use."""
    if name in _API:
        from blinkflow import api

        return getattr(api, name)
    raise AttributeError(f"module 'blinkflow' has no attribute {name!r}")


__all__ = [*_API, "BlinkflowError", "ConfigError", "SourceError", "StageError", "__version__"]
