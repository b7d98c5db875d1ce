"""Runners execute a resolved graph: ``local`` (in-process reference) and ``ray`` (actors)."""

from __future__ import annotations


def get_runner(name: str):
    if name == "local":
        from blinkflow.runners.local import LocalRunner

        return LocalRunner
    if name == "ray":
        from blinkflow.runners.ray import RayRunner

        return RayRunner
    from blinkflow.errors import ConfigError

    raise ConfigError(f"runtime.runner: unknown runner {name!r}; valid runners: local, ray")
