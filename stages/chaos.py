"""A fault-injection stage for testing runners and deployments.

It computes nothing useful: it records a cheap checksum of each active frame,
and on request fails chosen frames, holds frames back like a temporal stage,
or sleeps to simulate a slow model. Put it in a config to rehearse failure
handling (``stages: {chaos: {options: {fail_indices: [3]}}}``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from blinkflow.config import _field
from blinkflow.errors import StageError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage


@dataclass
class ChaosOptions:
    fail_indices: list[int] = _field(factory=list, doc="frame indices whose processing raises")
    hold: int = _field(0, "hold frames per stream and release them in groups of this size, newest first; 0 = off",
                       lo=0, hi=10**6)
    sleep_ms: float = _field(0.0, "simulated model time per batch", lo=0.0, hi=3_600_000)
    temporal: bool = _field(False, "declare per-stream state (stream affinity) even without holding")
    fail_setup_if: str | None = _field(
        None, "a path: set-up fails while it exists (a restarted actor's node lacks a file)")
    fail_end: bool = _field(False, "end_stream raises (a temporal stage whose final flush fails)")


@register_stage("chaos")
class Chaos(Stage):
    name = "chaos"
    Options = ChaosOptions

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.held: dict[str, list[Frame]] = {}
        self.seen: dict[str, int] = {}

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        marker = self.options.fail_setup_if
        if marker and Path(marker).exists():
            raise StageError(f"stages.chaos: injected set-up failure ({marker} exists)")

    @classmethod
    def is_temporal(cls, cfg) -> bool:
        options = cfg.options if cfg is not None and cfg.options is not None else cls.Options()
        return bool(options.hold or options.temporal)

    def process(self, frames: list[Frame]) -> list[Frame]:
        if self.options.sleep_ms:
            time.sleep(self.options.sleep_ms / 1000.0)
        for frame in self.active(frames):
            if frame.index in self.options.fail_indices:
                raise RuntimeError(f"chaos: injected failure on frame {frame.index}")
            self.seen[frame.stream_id] = self.seen.get(frame.stream_id, 0) + 1
            frame.results[self.name] = {"checksum": int(frame.image[::7, ::7].sum()), "seen": self.seen[frame.stream_id]}
        return self._hold(frames) if self.options.hold else frames

    def _hold(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for frame in frames:
            held = self.held.setdefault(frame.stream_id, [])
            held.append(frame)
            if len(held) >= self.options.hold:
                out.extend(reversed(held))
                held.clear()
        return out

    def end_stream(self, stream_id: str) -> list[Frame]:
        if self.options.fail_end:
            raise RuntimeError(f"chaos: injected failure ending stream {stream_id}")
        self.seen.pop(stream_id, None)
        return self.held.pop(stream_id, [])

    def flush(self) -> list[Frame]:
        released = [frame for held in self.held.values() for frame in held]
        self.held.clear()
        return released
