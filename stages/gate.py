"""The gate: temporal-redundancy skipping at frame level.

Each frame is compared with the last *processed* keyframe of its stream on a
cheap signal: downscaled grayscale, absolute difference, box blur (which
suppresses isolated codec-noise pixels), then the fraction of pixels whose
blurred difference exceeds ``pixel_threshold``. Below ``threshold`` the frame
is marked ``reuse_of = keyframe index`` and the model stages skip it; the
runner carries the keyframe's results over. ``max_reuse`` forces a refresh,
and a scene cut (a change above ``cut_threshold``) or a new stream always does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.config import GateConfig
from pipeline.frame import Frame
from pipeline.registry import register_stage
from stages.base import Stage


@dataclass
class _StreamState:
    key_index: int
    key_signal: np.ndarray
    reused_since_key: int = 0


@register_stage("gate")
class Gate(Stage):
    name = "gate"
    temporal = True

    def __init__(self, cfg: GateConfig | None = None) -> None:
        self.cfg = cfg or GateConfig(enabled=True)
        self.options = None
        self.device = "cpu"
        self.streams: dict[str, _StreamState] = {}

    def process(self, frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            if not frame.is_failed:
                self._decide(frame)
        return frames

    def end_stream(self, stream_id: str) -> list[Frame]:
        self.streams.pop(stream_id, None)
        return []

    def _decide(self, frame: Frame) -> None:
        signal = gray_signal(frame.image, self.cfg.downscale)
        state = self.streams.get(frame.stream_id)
        if state is None or state.key_signal.shape != signal.shape:
            self._keyframe(frame, signal, changed=1.0, reason="first")
            return
        changed, largest = changed_fraction(state.key_signal, signal, self.cfg)
        reason = self._refresh_reason(changed, state)
        if reason:
            self._keyframe(frame, signal, changed, reason, largest)
            return
        state.reused_since_key += 1
        frame.meta["reuse_of"] = state.key_index
        frame.results[self.name] = {"decision": "reuse", "changed": round(changed, 6), "largest": round(largest, 6)}

    def _refresh_reason(self, changed: float, state: _StreamState) -> str | None:
        if changed >= self.cfg.cut_threshold:
            return "cut"
        if changed >= self.cfg.threshold:
            return "changed"
        if state.reused_since_key >= self.cfg.max_reuse:
            return "max_reuse"
        return None

    def _keyframe(self, frame: Frame, signal: np.ndarray, changed: float, reason: str, largest: float = 1.0) -> None:
        self.streams[frame.stream_id] = _StreamState(frame.index, signal)
        frame.meta.pop("reuse_of", None)
        frame.results[self.name] = {
            "decision": "keyframe", "reason": reason, "changed": round(changed, 6), "largest": round(largest, 6)
        }


def gray_signal(image: np.ndarray, downscale: int) -> np.ndarray:
    """Grayscale, block-averaged by ``downscale`` (float32)."""
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if downscale > 1:
        h = gray.shape[0] // downscale * downscale
        w = gray.shape[1] // downscale * downscale
        gray = gray[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale).mean(axis=(1, 3))
    return gray


def box_blur(image: np.ndarray, size: int) -> np.ndarray:
    """Mean filter with an odd ``size`` window (edges replicated), via summed-area tables."""
    if size <= 1:
        return image
    pad = size // 2
    padded = np.pad(image, pad, mode="edge")
    table = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = image.shape
    total = table[size : size + h, size : size + w] - table[:h, size : size + w] - table[size : size + h, :w] + table[:h, :w]
    return total / float(size * size)


def changed_fraction(previous: np.ndarray, current: np.ndarray, cfg: GateConfig) -> tuple[float, float]:
    """Fraction of changed pixels, and the fraction of the frame covered by their bounding box."""
    diff = box_blur(np.abs(current - previous), cfg.blur | 1)
    changed = diff > cfg.pixel_threshold
    fraction = float(changed.mean())
    if not changed.any():
        return fraction, 0.0
    rows = np.flatnonzero(changed.any(axis=1))
    cols = np.flatnonzero(changed.any(axis=0))
    extent = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return fraction, float(extent) / changed.size
