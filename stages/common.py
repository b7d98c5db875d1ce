"""Helpers shared by the model stages: device resolution, batching frames into
tensors on the device, precision, and compact encodings of dense outputs.

torch is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np

from blinkflow.devices import resolve_device  # noqa: F401 - the stages' own name for it
from blinkflow.frame import Frame

log = logging.getLogger(__name__)


#: gate reasons after which a stream's previous output says nothing about this frame (hysteresis starts over)
FRESH_START = ("first", "restart", "resized", "cut")


def follows(last_index: int | None, frame: Frame) -> bool:
    """Whether the stream's output of frame ``last_index`` may hold this frame's (the stages' hysteresis): not
    when there is none, after a restart (the index went back), a cut, a resize, or a camera's reconnection (its
    first frame after an outage: the indices go on, what it shows may not)."""
    reason = (frame.results.get("gate") or {}).get("reason")
    return (last_index is not None and last_index < frame.index and reason not in FRESH_START
            and not frame.meta.get("discontinuity"))


def by_frame_size(frames: list[Frame]) -> list[list[Frame]]:
    """``frames`` grouped by (height, width), in the order each size first comes: one batch per size."""
    groups: dict[tuple[int, int], list[Frame]] = {}
    for frame in frames:
        groups.setdefault((frame.height, frame.width), []).append(frame)
    return list(groups.values())


def frames_to_batch(frames: list[Frame], device: Any, size: tuple[int, int] | None = None, channels_last: bool = False):
    """Stack frames into a float NCHW tensor in [0, 1] on ``device``.

    The uint8 pixels go to the device first and are converted and resized
    there, so preprocessing runs on the GPU when there is one. ``size`` is
    (height, width); frames of different sizes must be given a ``size``.
    """
    import torch
    import torch.nn.functional as F

    tensors = [device_image(f, device) for f in frames]
    if size is None and len({t.shape for t in tensors}) > 1:
        raise ValueError("frames of different sizes need a common size")
    batch = torch.stack([t.permute(2, 0, 1) for t in tensors]) if size is None else None
    if batch is None:
        batch = torch.cat([_resize_uint8(t.permute(2, 0, 1)[None], size) for t in tensors])
    batch = batch.float().div_(255.0)
    if size is not None and tuple(batch.shape[-2:]) != tuple(size):
        batch = F.interpolate(batch, size=size, mode="bilinear", align_corners=False)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def device_image(frame: Frame, device: Any):
    """The frame's uint8 (H, W, 3) pixels as a tensor on ``device``. On an accelerator the copy is kept on the
    frame, so the stages after the first one on that device take it without another host-to-device copy."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(frame.image))
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" share one copy
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    copy = frame.device_images.get(key)
    if copy is None:  # only the first stage on the device reads the host pixels (a copy when they are strided)
        pixels = torch.from_numpy(np.ascontiguousarray(frame.image))
        copy = frame.device_images[key] = pixels.to(device, non_blocking=True)
    return copy


def _resize_uint8(image, size):
    import torch
    import torch.nn.functional as F

    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.device.type == "cpu":
        # torch's uint8 kernel (fixed point, as PIL's): the same pixels at any thread count, and several times
        # faster. The float kernel's last bits follow how the rows are split over threads, and rounding made them
        # whole gray levels: Ray's one-thread actors gave other results than the local runner's two threads
        return F.interpolate(image.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                             align_corners=False, antialias=False)
    return F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False).round().clamp(0, 255).byte()


def region_base(tiles: dict, stage: str) -> int | None:
    """The frame a partial frame builds on for ``stage``: its own last run (``bases``, when the gate
    refreshes some stages alone), else the last frame every stage ran on (``base``)."""
    return (tiles.get("bases") or {}).get(stage, tiles.get("base"))


def run_with_regions(frames: list[Frame], try_region: Any, run_full: Any) -> None:
    """Run a per-frame stage that can recompute part of a *partial* frame (one the gate marked with
    changed tiles): ``try_region(frame)`` does it and returns True, or returns False when the frame must
    run in full; ``run_full(frames)`` runs full frames in batches. A partial frame builds on its
    stream's previous result, so the full frames of its stream queued before it run first."""
    full: list[Frame] = []
    for frame in frames:
        partial = (frame.mark.tiles or {}).get("changed") is not None
        if partial and any(f.stream_id == frame.stream_id for f in full):
            run_full(full)
            full = []
        if not (partial and try_region(frame)):
            full.append(frame)
    run_full(full)


#: (precision, device) pairs already warned about in this process
_WARNED_PRECISION: set[tuple[str, str]] = set()


def autocast(device: Any, precision: str):
    """An autocast context for fp16/bf16 on GPU; a no-op for fp32 or on CPU."""
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type != "cuda":
        if (precision, str(device)) not in _WARNED_PRECISION:  # said once, not on every forward
            _WARNED_PRECISION.add((precision, str(device)))
            log.warning("precision %s is for GPUs; running fp32 on %s", precision, device)
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type="cuda", dtype=dtype)


def encode_class_map(class_map: np.ndarray) -> bytes:
    """A (H, W) uint8 class map as lossless PNG bytes (compact for piecewise-constant maps)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(class_map, dtype=np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_class_map(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(io.BytesIO(data)))


def class_map_of(segment_result: dict[str, Any]) -> np.ndarray:
    """The (H, W) class map of a segment result (its PNG bytes decoded)."""
    return decode_class_map(segment_result["mask"]["data"])
