"""Which stages run, in which order, with which settings.

The gate (when enabled) always runs first; the model stages follow in the
order the config lists them. Driver stages (``Stage.driver``: track, events)
are not part of this graph: every runner runs them in the driver on the
ordered output (runners.base.OrderedOutput), in config order. The graph is
resolved once by the driver and its specs are shipped to whichever runner
executes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from blinkflow.config import Config, GateConfig, StageConfig
from blinkflow.registry import stages as stage_registry


@dataclass
class StageSpec:
    """A resolved stage: its registered name, its config and its execution traits."""

    name: str
    cfg: StageConfig | GateConfig

    @property
    def cls(self) -> type:
        return stage_registry.get(self.name)

    @property
    def temporal(self) -> bool:
        is_temporal = getattr(self.cls, "is_temporal", None)
        return bool(is_temporal(self.cfg)) if is_temporal else bool(self.cls.temporal)

    @property
    def batch(self) -> int:
        return getattr(self.cfg, "batch", 64)

    @property
    def device(self) -> str:
        return getattr(self.cfg, "device", "cpu")

    def create(self) -> Any:
        return self.cls(self.cfg)


def build_graph(cfg: Config) -> list[StageSpec]:
    """The stages the runner executes (workers or actors): the gate, then the model stages."""
    specs = [StageSpec("gate", cfg.gate)] if cfg.gate.enabled else []
    specs.extend(spec for spec in _enabled(cfg) if not spec.cls.driver)
    return specs


def build_driver_graph(cfg: Config) -> list[StageSpec]:
    """The driver stages (``Stage.driver``: track, events), in config order; every runner runs them the same
    way, in the driver on the ordered output (runners.base.OrderedOutput)."""
    return [spec for spec in _enabled(cfg) if spec.cls.driver]


def _enabled(cfg: Config) -> list[StageSpec]:
    return [StageSpec(name, stage_cfg) for name, stage_cfg in cfg.enabled_stages().items()]
