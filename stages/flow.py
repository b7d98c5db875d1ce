"""Optical flow between consecutive active frames of each stream.

The stage keeps, per stream, the previous *active* frame (resized to the
model input) across ``process`` calls, so a pair may span two batches; reused
and failed frames are skipped, so a pair spans them too. All pairs of one call
run as one batched forward. No frame is held back.

Result per frame, ``frame.results["flow"]``::

    {"flow": np.ndarray float16 (2, H // 2, W // 2),  # flow prev -> this frame on the HALF-resolution
                                                      # grid of the source frame (H, W), vectors in
                                                      # half-grid pixels: multiply by "scale" for source pixels
     "scale": 2,                                      # source pixels per flow-grid pixel
     "pair": [prev_index, index],                     # the frame indices the flow goes between
     "magnitude_mean": float,                         # mean vector length, in SOURCE pixels
     "magnitude_max": float}                          # longest vector, in SOURCE pixels

Half resolution keeps the dense field 8x smaller than the source image (2
float16 channels at a quarter of the pixels) while keeping motion boundaries.
The first active frame of a stream (and the first after ``end_stream``) has
no predecessor and gets no ``"flow"`` result. A frame whose index does not
increase over the previous one is treated as a stream restart.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from blinkflow.config import StageConfig, _field
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.stages.model_stage import ModelStage, checked_input_size

log = logging.getLogger(__name__)

TASK = "flow"
#: the output grid is the source frame downscaled by this factor
OUTPUT_SCALE = 2


@dataclass
class FlowOptions:
    """Options of the flow stage (``stages.flow.options``)."""

    input_size: list[int] = _field(
        factory=lambda: [128, 160],
        doc="[height, width] frames are resized to for the model; RAFT pads sides below 128 up to 128",
    )
    model_args: dict[str, Any] | None = _field(None, "extra builder arguments, e.g. {num_flow_updates: 6} for RAFT")


@dataclass
class _Previous:
    index: int
    size: tuple[int, int]  # the frame's (height, width): a frame of another size is a fresh start, not a pair
    #: (3, h, w) float tensor on the device at the model input size; while pairing inside one
    #: call, the predecessor's int position in that call's batch instead
    pixels: Any


@register_stage(TASK)
class Flow(ModelStage):
    """Dense optical flow from the previous active frame of the same stream."""

    name = TASK
    temporal = True
    Options = FlowOptions
    default_model = "flownet_s_small"
    stream_caches = ("_previous",)

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg)
        self.input_size = checked_input_size(self.name, self.options.input_size, "[128, 160]")
        self._previous: dict[str, _Previous] = {}

    def describe(self) -> str:
        return f", input {list(self.input_size)}"

    def warmup_inputs(self) -> tuple | None:
        import torch

        pair = torch.zeros(2, 1, 3, *self.input_size, device=self._device)
        return pair[0], pair[1]

    def process(self, frames: list[Frame]) -> list[Frame]:
        from blinkflow.stages.common import frames_to_batch

        active = self.active(frames)
        if not active:
            return frames
        pixels = frames_to_batch(active, self._device, size=self.input_size)
        pairs, latest = self._pair_up(active)
        if pairs:
            flows = self._run_model(*_pair_tensors(pairs, pixels))
            for (previous, pos), flow in zip(pairs, flows):
                active[pos].results[self.name] = _half_resolution_result(flow, previous.index, active[pos])
        # the state moves on only after the model succeeded, so a frame-by-frame retry sees it unchanged
        for stream_id, pos in latest.items():
            frame = active[pos]
            self._previous[stream_id] = _Previous(frame.index, (frame.height, frame.width), pixels[pos].clone())
        return frames

    # ------------------------------------------------------------------ helpers

    def _pair_up(self, active: list[Frame]) -> tuple[list[tuple[_Previous, int]], dict[str, int]]:
        """(predecessor, position in ``active``) per pair, and each stream's last position in ``active``.

        A predecessor from this same call has its batch position as ``pixels``.
        """
        pairs: list[tuple[_Previous, int]] = []
        latest: dict[str, int] = {}
        for pos, frame in enumerate(active):
            sid = frame.stream_id
            if sid in latest:
                last = active[latest[sid]]
                before: _Previous | None = _Previous(last.index, (last.height, last.width), latest[sid])
            else:
                before = self._previous.get(sid)
            if before is not None and frame.index <= before.index:
                log.debug("%s: stream %s restarted at frame %d; no flow for it", self.name, sid, frame.index)
                before = None
            elif before is not None and before.size != (frame.height, frame.width):
                # both are resized to the model's input, but their pixels do not correspond: no flow, as at a start
                log.debug("%s: stream %s changed size at frame %d; no flow for it", self.name, sid, frame.index)
                before = None
            if before is not None:
                pairs.append((before, pos))
            latest[sid] = pos
        return pairs, latest

    def _run_model(self, first: Any, second: Any) -> Any:
        """Flow (P, 2, h, w) in model-input pixels, in chunks of at most ``batch`` pairs."""
        import torch

        chunk = max(1, self.cfg.batch)
        outputs = []
        with self.inference():
            for start in range(0, first.shape[0], chunk):
                outputs.append(self.model(first[start : start + chunk], second[start : start + chunk]).float())
        return torch.cat(outputs)


def _pair_tensors(pairs: list[tuple[_Previous, int]], pixels: Any) -> tuple[Any, Any]:
    """The (P, 3, h, w) batches of first and second images of the pairs."""
    import torch

    first = [pixels[p.pixels] if isinstance(p.pixels, int) else p.pixels for p, _ in pairs]
    return torch.stack(first), pixels[[pos for _, pos in pairs]]


def _half_resolution_result(flow: Any, previous_index: int, frame: Frame) -> dict[str, Any]:
    """Resample model-input-pixel flow (2, h, w) to the frame's half-resolution grid (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    in_h, in_w = flow.shape[-2:]
    to_source = torch.tensor([frame.width / in_w, frame.height / in_h], device=flow.device).view(2, 1, 1)
    grid = (max(1, frame.height // OUTPUT_SCALE), max(1, frame.width // OUTPUT_SCALE))
    source_flow = F.interpolate((flow * to_source)[None], size=grid, mode="bilinear", align_corners=False)[0]
    magnitude = torch.linalg.vector_norm(source_flow, dim=0)
    return {
        "flow": (source_flow / OUTPUT_SCALE).cpu().numpy().astype(np.float16),
        "scale": OUTPUT_SCALE,
        "pair": [previous_index, frame.index],
        "magnitude_mean": round(float(magnitude.mean()), 4),
        "magnitude_max": round(float(magnitude.max()), 4),
    }
