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
from blinkflow.errors import StageError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage

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
    #: (3, h, w) float tensor on the device at the model input size; while pairing inside one
    #: call, the predecessor's int position in that call's batch instead
    pixels: Any


@register_stage(TASK)
class Flow(Stage):
    """Dense optical flow from the previous active frame of the same stream."""

    name = TASK
    temporal = True
    Options = FlowOptions
    default_model = "flownet_s_small"
    stream_caches = ("_previous",)

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self.model_name = self.cfg.model or self.default_model
        self.input_size = _checked_input_size(self.options.input_size)
        self.model: Any = None
        self._previous: dict[str, _Previous] = {}

    def setup(self, device: str = "cpu") -> None:
        from blinkflow.models.weights import load_state, resolve_weights
        from blinkflow.stages.common import resolve_device

        self.device = device
        self._device = resolve_device(device)
        spec = resolve_weights(self.cfg.weights, stage=self.name, model_name=self.model_name)
        model = _build(self.model_name, self.options.model_args)
        load_state(model, spec)
        self.model = _prepare_for_inference(model, self._device, self.cfg.channels_last)
        log.info("%s: %s (%s weights) on %s, input %s", self.name, self.model_name, spec.kind, device, self.input_size)

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
            self._previous[stream_id] = _Previous(active[pos].index, pixels[pos].clone())
        return frames

    def teardown(self) -> None:
        self.model = None
        super().teardown()

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
                before: _Previous | None = _Previous(active[latest[sid]].index, latest[sid])
            else:
                before = self._previous.get(sid)
            if before is not None and frame.index <= before.index:
                log.debug("%s: stream %s restarted at frame %d; no flow for it", self.name, sid, frame.index)
                before = None
            if before is not None:
                pairs.append((before, pos))
            latest[sid] = pos
        return pairs, latest

    def _run_model(self, first: Any, second: Any) -> Any:
        """Flow (P, 2, h, w) in model-input pixels, in chunks of at most ``batch`` pairs."""
        import torch

        from blinkflow.stages.common import autocast

        chunk = max(1, self.cfg.batch)
        outputs = []
        with torch.inference_mode(), autocast(self._device, self.cfg.precision):
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


def _checked_input_size(size: Any) -> tuple[int, int]:
    if not isinstance(size, (list, tuple)) or len(size) != 2 or min(size) < 16:
        raise StageError(
            f"stages.{TASK}.options.input_size: expected [height, width] with both >= 16, got {size}; "
            f"e.g. input_size: [128, 160]"
        )
    return int(size[0]), int(size[1])


def _build(model_name: str, model_args: dict | None) -> Any:
    """Build the backend; a builder argument it does not take becomes a one-line StageError."""
    from blinkflow.models.registry import build_model

    try:
        return build_model(model_name, task=TASK, **(model_args or {}))
    except (TypeError, ValueError) as exc:
        if not model_args:
            raise
        raise StageError(
            f"stages.{TASK}.options.model_args: {model_name} rejected {sorted(model_args)} ({exc}); "
            f"remove or fix the arguments"
        ) from None


def _prepare_for_inference(model: Any, device: Any, channels_last: bool) -> Any:
    import torch

    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
