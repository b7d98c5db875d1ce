"""Runners execute a resolved graph: ``local`` (in-process reference) and ``ray`` (actors).

Each registers itself (``@register_runner``); the registry imports every module of this package,
so a new runner is one new file here.
"""

from __future__ import annotations


def get_runner(name: str):
    """The runner class registered as ``name`` (an unknown name is a one-line error listing the valid ones)."""
    from blinkflow.errors import ConfigError, RegistryError
    from blinkflow.registry import runners

    try:
        return runners.get(name)
    except RegistryError as exc:
        raise ConfigError(f"runtime.runner: {exc}") from None
