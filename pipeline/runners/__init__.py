"""Runners execute a resolved graph: ``local`` (in-process reference) and ``ray`` (actors)."""

from __future__ import annotations


def get_runner(name: str):
    if name == "local":
        from pipeline.runners.local import LocalRunner

        return LocalRunner
    if name == "ray":
        from pipeline.runners.ray import RayRunner

        return RayRunner
    from pipeline.errors import ConfigError

    raise ConfigError(f"runtime.runner: unknown runner {name!r}; valid runners: local, ray")
