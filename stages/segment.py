"""Semantic segmentation: a class per pixel at the frame's own resolution.

Result per frame, ``frame.results["segment"]``::

    {"mask": {"format": "png", "data": <PNG bytes of the (H, W) uint8 class map>,
              "height": H, "width": W},          # SOURCE resolution
     "classes": [str, ...],                      # the vocabulary; mask value i is classes[i]
     "areas": {class_name: pixel_count, ...}}    # only classes present; sums to H * W

The model runs at ``input_size``; its logits are upsampled bilinearly to the
source size before the argmax, which gives smoother borders than upsampling
the class map.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import StageConfig, _field
from pipeline.errors import StageError
from pipeline.frame import Frame
from pipeline.registry import register_stage
from stages.base import Stage
from stages.detect import build_with_args, check_input_size, pick_classes, prepare_for_inference

log = logging.getLogger(__name__)

TASK = "segment"
#: the class map is stored as uint8 PNG
MAX_CLASSES = 256


@dataclass
class SegmentOptions:
    """Options of the segment stage (``stages.segment.options``)."""

    input_size: list[int] | None = _field(
        factory=lambda: [256, 256],
        doc="[height, width] the model runs at (frames of any size batch together); null: each frame's own size",
    )
    classes: list[str] | None = _field(
        None, "class names (index 0 = background) for random or own weights without a class list"
    )
    model_args: dict[str, Any] | None = _field(None, "extra builder arguments, e.g. {base_width: 24} for unet_small")


@register_stage(TASK)
class Segment(Stage):
    """A per-pixel class map, its PNG encoding and per-class areas per frame."""

    name = TASK
    Options = SegmentOptions
    default_model = "unet_small"

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self.model_name = self.cfg.model or self.default_model
        check_input_size(self.name, self.options.input_size)
        self.model: Any = None
        self.classes: list[str] = []

    def setup(self, device: str = "cpu") -> None:
        from models.weights import load_state, resolve_weights
        from stages.common import resolve_device

        self.device = device
        self._device = resolve_device(device)
        spec = resolve_weights(self.cfg.weights, stage=self.name, model_name=self.model_name)
        self.classes = pick_classes(self.name, spec.classes, self.options.classes)
        if len(self.classes) > MAX_CLASSES:
            raise StageError(
                f"stages.{self.name}.options.classes: {len(self.classes)} classes do not fit the uint8 mask; "
                f"use at most {MAX_CLASSES}"
            )
        model = build_with_args(self.name, self.model_name, TASK, len(self.classes), self.options.model_args)
        load_state(model, spec)
        self.model = prepare_for_inference(model, self._device, self.cfg.channels_last)
        log.info("%s: %s, %s weights, %d classes, on %s", self.name, self.model_name, spec.kind, len(self.classes), device)

    def process(self, frames: list[Frame]) -> list[Frame]:
        for group in self._batches(self.active(frames)):
            for frame, class_map in zip(group, self._class_maps(group)):
                frame.results[self.name] = self._result(class_map)
        return frames

    def teardown(self) -> None:
        self.model = None

    # ------------------------------------------------------------------ helpers

    def _batches(self, frames: list[Frame]) -> list[list[Frame]]:
        """One batch with a fixed input_size; otherwise one per distinct frame size."""
        if not frames or self.options.input_size is not None:
            return [frames] if frames else []
        groups: dict[tuple[int, int], list[Frame]] = {}
        for frame in frames:
            groups.setdefault((frame.height, frame.width), []).append(frame)
        return list(groups.values())

    def _class_maps(self, frames: list[Frame]) -> list[np.ndarray]:
        import torch

        from stages.common import autocast, frames_to_batch

        size = tuple(self.options.input_size) if self.options.input_size is not None else None
        batch = frames_to_batch(frames, self._device, size=size, channels_last=self.cfg.channels_last)
        with torch.inference_mode(), autocast(self._device, self.cfg.precision):
            logits = self.model(batch)["out"]
        return [self._to_source_class_map(frame_logits, frame) for frame, frame_logits in zip(frames, logits)]

    @staticmethod
    def _to_source_class_map(logits: Any, frame: Frame) -> np.ndarray:
        """(C, h, w) logits to an (H, W) uint8 class map at the frame's resolution; one frame at a
        time, so a batch of large frames never holds C x H x W floats for all of them at once."""
        import torch
        import torch.nn.functional as F

        logits = logits.float()[None]
        if tuple(logits.shape[-2:]) != (frame.height, frame.width):
            logits = F.interpolate(logits, size=(frame.height, frame.width), mode="bilinear", align_corners=False)
        return logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()

    def _result(self, class_map: np.ndarray) -> dict[str, Any]:
        from stages.common import encode_class_map

        counts = np.bincount(class_map.ravel(), minlength=len(self.classes))
        areas: dict[str, int] = {}
        for index in np.flatnonzero(counts):
            name = self.classes[index]
            areas[name] = areas.get(name, 0) + int(counts[index])  # tolerate repeated names ("N/A")
        height, width = class_map.shape
        return {
            "mask": {"format": "png", "data": encode_class_map(class_map), "height": height, "width": width},
            "classes": list(self.classes),
            "areas": areas,
        }

