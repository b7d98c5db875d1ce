"""Name-to-component registries (in the style of torchvision's ``models/_api.py``).

Components register with a decorator. A duplicate name raises at import time,
an unknown name raises a :class:`RegistryError` that lists the valid names.
Modules holding registered components are imported on first lookup, so that
``import pipeline`` stays cheap.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Callable, Generic, Iterable, TypeVar

from blinkflow.errors import RegistryError

T = TypeVar("T")

#: held while a registry imports its modules (one lock: their imports may look up other registries)
_LOADING = threading.RLock()


class Registry(Generic[T]):
    """A named mapping of components, filled by decorators in ``modules``."""

    def __init__(self, kind: str, modules: Iterable[str] = (), packages: Iterable[str] = ()) -> None:
        self.kind = kind
        self._modules = tuple(modules)
        #: every module of these packages is imported on first lookup: a new component is one new file there
        self._packages = tuple(packages)
        self._items: dict[str, T] = {}
        self._loaded = False
        self._loading = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(component: T) -> T:
            if name in self._items and self._items[name] is not component:
                raise RegistryError(f"duplicate {self.kind} name {name!r}")
            self._items[name] = component
            return component

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        # one thread imports, the others wait for all of it: two pipelines started in threads saw a half-filled
        # registry ("'synthetic' is not one of "); the importing thread itself may look up (re-entrant)
        with _LOADING:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for module in self._modules:
                    importlib.import_module(module)
                for name in self._packages:
                    package = importlib.import_module(name)
                    for info in pkgutil.iter_modules(package.__path__):
                        importlib.import_module(f"{name}.{info.name}")
                self._loaded = True
            finally:
                self._loading = False

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            valid = ", ".join(sorted(self._items)) or "(none)"
            raise RegistryError(f"unknown {self.kind} {name!r}; valid names: {valid}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


STAGE_MODULES = ("blinkflow.stages.gate", "blinkflow.stages.detect", "blinkflow.stages.segment", "blinkflow.stages.flow", "blinkflow.stages.action", "blinkflow.stages.chaos", "blinkflow.stages.track", "blinkflow.stages.events")

stages: Registry[type] = Registry("stage", STAGE_MODULES)
sources: Registry[type] = Registry("source type", ("blinkflow.sources", "blinkflow.streams"))
sinks: Registry[type] = Registry("sink type", packages=("blinkflow.sinks",))
runners: Registry[type] = Registry("runner", packages=("blinkflow.runners",))


def register_stage(name: str):
    """Register a stage class under ``name`` (used as ``@register_stage("detect")``)."""
    return stages.register(name)


def register_source(name: str):
    return sources.register(name)


def register_sink(name: str):
    return sinks.register(name)


def register_runner(name: str):
    return runners.register(name)
