"""The gate stage: per stream and per frame, whether the model stages run (docs/skipping.md).

A thin adapter: the decision, the adaptive threshold, the audits and the refresh bounds live in
:class:`blinkflow.gate.policy.GatePolicy`; the driver's carry-over in :mod:`blinkflow.gate.carry`.
"""

from __future__ import annotations

from typing import Any

from blinkflow.config import GateConfig
from blinkflow.frame import Frame
from blinkflow.gate.policy import RESULT_KEY, GatePolicy
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage


@register_stage(RESULT_KEY)
class Gate(Stage):
    name = RESULT_KEY
    temporal = True

    def __init__(self, cfg: GateConfig | None = None) -> None:
        self.cfg = cfg or GateConfig(enabled=True)
        self.options = None
        self.device = "cpu"
        self.policy = GatePolicy(self.cfg)

    def process(self, frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            if frame.is_failed:
                self.policy.follow_motion(frame)  # the decoder's motion state still moves on
                continue
            try:
                self.policy.decide(frame)
            except Exception as exc:  # noqa: BLE001 - the frame fails alone, whatever the batch
                # never raised to the caller: its frame-by-frame retry would decide the batch's earlier frames
                # again (as restarts); the stream starts afresh at its next frame, its state being half-moved
                frame.fail(self.name, exc)
                self.policy.end_stream(frame.stream_id)
        return frames

    def end_stream(self, stream_id: str) -> list[Frame]:
        self.policy.end_stream(stream_id)
        return []

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-stream skip ratio, threshold and last audit agreement (as this replica sees them)."""
        return self.policy.stats()
