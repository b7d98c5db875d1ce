"""Object detection: one batched forward per call over all active frames.

Result per frame, ``frame.results["detect"]`` (plain lists, JSON-friendly)::

    {"boxes": [[x1, y1, x2, y2], ...],  # floats in SOURCE pixels, clipped to the frame, 2 decimals
     "labels": [int, ...],              # index into the stage's class list (0 = background, never output)
     "classes": [str, ...],             # class name of each box
     "scores": [float, ...]}            # 4 decimals, highest first

Post-processing after the model: score threshold, class filter, an extra
class-aware NMS (backends differ in their own NMS, so this makes them agree),
then the top ``max_detections``. :mod:`models.formats` converts to/from COCO.
With ``keep_threshold`` (a score hysteresis) the threshold is two-level: a box
continuing one of the stream's boxes on the previous frame the stage ran on
(same class, IoU >= 0.5) needs only ``keep_threshold``, a new one
``score_threshold``, so boxes near the threshold do not blink from frame to
frame (docs/skipping.md has how the demo's values were chosen).

Region-level recompute (``crop_reuse``, with the gate's ``tiles``): on a frame
the gate marks ``partial``, the detector runs only on the bounding crop of the
changed tiles plus ``crop_halo`` tiles of margin (clamped to the frame), at the
same pixel scale a full-frame call would use, so it costs the crop's share of
a full forward. Its boxes go back to frame pixels and are merged with the
stream's last boxes (unmoved: outside the changed tiles nothing changed):
carried boxes whose centre lies in the changed region (the crop without its
halo) are dropped, the others kept; crop boxes are added when their centre is
in the changed region, or when they lie in the halo without touching the
crop's edge inside the frame (a box cut by the edge is a partial view); a
carried box that a new one of the same class overlaps (IoU >= 0.3) is the
same object seen again and goes (:func:`superseded`); then class-aware NMS. When the crop would exceed ``crop_max_area`` of the frame the
whole frame runs. Such a result also carries ``"crop": {"box": [x1, y1, x2,
y2], "area": fraction of a full forward}``. With the cache, the stage is
temporal (each stream sticks to one replica, in order).

``crop_reuse: letterbox`` (what null picks for YOLOX) is the same for detectors that letterbox every input to one
size (YOLOX), where a crop would be seen at the wrong scale: the changed tiles' connected
groups, each grown around the stream's previous boxes that touch it and by the halo, are
cut from the frame at the full-frame call's scale on the stride-32 grid and packed into one
canvas padded like the letterbox (:mod:`stages.canvas`); one call sees every object at its
usual scale, costs the canvas's share of the full input (``crop.area``), and the boxes are
merged as above, region by region (``crop.regions``: each region's crop in source pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from blinkflow.models.classes import SYNTHETIC_CLASSES
from blinkflow.config import StageConfig, _field
from blinkflow.errors import ConfigError, StageError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.gate.tiles import tile_edges
from blinkflow.stages.canvas import Canvas, object_regions, plan_canvas
from blinkflow.stages.common import by_frame_size, follows, region_base, run_with_regions
from blinkflow.stages.model_stage import ModelStage, checked_input_size, pick_classes

log = logging.getLogger(__name__)

TASK = "detect"


@dataclass
class DetectOptions:
    """Options of the detect stage (``stages.detect.options``)."""

    score_threshold: float = _field(0.3, "drop boxes scoring below this", lo=0.0, hi=1.0)
    nms_iou: float = _field(
        0.5, "class-aware NMS: drop a box whose IoU with a better box of its class is above this (1 = off)", lo=0.0, hi=1.0
    )
    classes_filter: list[str] | None = _field(None, "keep only these class names; null keeps every class")
    max_detections: int = _field(100, "keep at most this many boxes per frame, best first", lo=1, hi=100000)
    input_size: list[int] | None = _field(
        None, "[height, width] to resize frames to before the model; null: only the model's own resize"
    )
    classes: list[str] | None = _field(
        None, "class names (index 0 = background) for random or own weights without a class list"
    )
    model_args: dict[str, Any] | None = _field(None, "extra builder arguments, e.g. {min_size: 320, max_size: 512}")
    crop_reuse: bool | Literal["letterbox"] | None = _field(
        None, "on frames the gate marks partial, run only on the crop around the changed tiles and merge with the "
        "stream's last boxes (the stage then keeps per-stream state: stream affinity across replicas). letterbox: "
        "for detectors with a fixed letterboxed input (YOLOX), the changed regions (grown around the previous "
        "boxes) cut at the full-frame scale and packed into one small padded canvas. null: on for detectors "
        "whose anchors have fixed pixel sizes (Faster R-CNN, RetinaNet, FCOS), letterbox for YOLOX, off for "
        "SSD/SSDLite, which scale every input to a fixed size, so a crop sees its objects at the wrong scale",
    )
    crop_margin: bool = _field(False, "the canvas's regions also take the gate's tile_margin ring (the segmenter's "
                               "need: its masks reach past the change). Off, a region is the tiles that changed, grown "
                               "around the boxes they touch, and the ring is context through crop_halo: the same boxes "
                               "on the real clips for 7% less detector work (docs/skipping.md)")
    crop_halo: float = _field(1.0, "margin around the changed tiles, in tiles, so objects crossing the crop edge are seen whole", lo=0.0, hi=64)
    crop_max_area: float = _field(
        0.5, "run the whole frame when the crop would cover more than this fraction of it (letterbox: when the "
        "canvas would cost more than this fraction of the full input)", lo=0.0, hi=1.0)
    keep_threshold: float | None = _field(
        None, "hysteresis: a box that overlaps (IoU >= 0.5, same class) one of the stream's boxes on the previous "
        "frame the stage ran on stays while it scores at least this; new boxes still need score_threshold. Fewer "
        "boxes blink on and off near the threshold (the stage then keeps per-stream state). null = off", lo=0.0, hi=1.0,
    )

    def check(self, path: str) -> None:
        """Cross-field checks (``path`` is the options' YAML path); called when the config is loaded."""
        keep = self.keep_threshold
        if keep is not None and keep > self.score_threshold:
            raise ConfigError(
                f"{path}.keep_threshold: {keep} is above score_threshold {self.score_threshold}, so it would "
                f"never keep a box; set it lower (e.g. half of score_threshold) or null"
            )


#: a box this much like (IoU) one of the stream's previous boxes of its class continues it (hysteresis)
CONTINUE_IOU = 0.5


@dataclass
class _BoxCache:
    """A stream's last detection result (source pixels) from frame ``index`` of size ``source``."""

    index: int
    result: dict[str, list]
    source: tuple[int, int]


@register_stage(TASK)
class Detect(ModelStage):
    """Boxes, labels and scores per frame from a registered detection backend."""

    name = TASK
    gives_boxes = True  # the tracker's input (stages.track.options.boxes_from)
    Options = DetectOptions
    default_model = "ssdlite320_mobilenet_v3_large"
    stream_caches = ("_boxes", "_shown")
    run_keys = ("crop",)  # the partial frame's crop and what it cost, not what the frame shows

    @classmethod
    def is_temporal(cls, cfg: StageConfig | None) -> bool:
        options = getattr(cfg, "options", None)
        return crop_reuse_enabled(cfg) or getattr(options, "keep_threshold", None) is not None

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        """``crop_reuse: letterbox`` names a torchvision detector: none letterboxes (one-line error at load)."""
        super().check_config(cfg, name)
        from blinkflow.models.registry import get_model_entry

        stage = cfg.stages[name]
        if crop_reuse_mode(stage) == "letterbox" and get_model_entry(stage.model).torchvision_weights is not None:
            raise ConfigError(_not_letterboxed(name, stage.model))

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg)
        checked_input_size(self.name, self.options.input_size, "[320, 320], or null", optional=True)
        self.options.check(f"stages.{self.name}.options")
        self.classes: list[str] = []
        self._allowed_labels: list[int] | None = None
        self._boxes: dict[str, _BoxCache] = {}
        self._shown: dict[str, tuple[int, Any, Any]] = {}  # stream -> (frame index, boxes, labels) it last output
        self._crop_reuse = crop_reuse_enabled(self.cfg)
        self._letterbox = crop_reuse_mode(self.cfg) == "letterbox"

    def build_model(self, spec: Any) -> Any:
        self.classes = pick_classes(self.name, spec.classes, self.options.classes, SYNTHETIC_CLASSES)
        self._allowed_labels = self._labels_for_filter()
        model = self.build_backend(num_classes=len(self.classes))
        self._align_model_limits(model)
        return model

    def check_model(self, model: Any) -> None:
        if self._letterbox and not letterboxes(model):
            if self.options.crop_reuse is not None:
                raise StageError(_not_letterboxed(self.name, self.model_name))
            # null chose the canvas by the model's name; a model of one's own under that name runs whole frames
            log.info("stages.%s: %s does not letterbox; partial frames run the whole frame", self.name, self.model_name)
            self._crop_reuse = self._letterbox = False

    def describe(self) -> str:
        return f", {len(self.classes)} classes"

    def warmup_inputs(self) -> tuple | None:
        import torch

        height, width = self.options.input_size or (320, 320)
        return ([torch.zeros(3, height, width, device=self._device)],)

    def process(self, frames: list[Frame]) -> list[Frame]:
        run_with_regions(self.active(frames), self._try_crop, self._run_full)
        return frames

    @staticmethod
    def follow_motion(result: Any, motion: Any, height: int, width: int) -> Any:
        """Each box shifted by the median motion inside it; boxes moved mostly out of the frame are dropped
        (with their labels, classes and scores)."""
        from blinkflow.gate.motion import MIN_VISIBLE, shift_boxes

        if not (isinstance(result, dict) and result.get("boxes")):
            return result
        boxes, kept = shift_boxes(result["boxes"], motion, height, width, MIN_VISIBLE)
        moved = dict(result, boxes=boxes)
        if len(kept) < len(result["boxes"]):
            for key in ("labels", "classes", "scores"):
                if isinstance(result.get(key), list):
                    moved[key] = [result[key][i] for i in kept]
        return moved

    @staticmethod
    def agreement(carried: Any, fresh: Any) -> dict[str, float] | None:
        """Box F1 at IoU 0.5 (same class, one-to-one)."""
        from blinkflow.gate.agreement import box_f1

        return {"boxes_f1": round(box_f1(carried, fresh), 6)}

    @staticmethod
    def disagreement(carried: Any, fresh: Any, height: int, width: int) -> np.ndarray | None:
        """The boxes either side has and the other does not (unmatched at IoU 0.5), filled in."""
        from blinkflow.gate.agreement import unmatched_boxes

        region = np.zeros((height, width), dtype=bool)
        for x1, y1, x2, y2 in unmatched_boxes(carried, fresh):
            region[max(0, int(y1)) : max(0, int(np.ceil(y2))), max(0, int(x1)) : max(0, int(np.ceil(x2)))] = True
        return region

    # ------------------------------------------------------------------ full frames and crops

    def _run_full(self, frames: list[Frame]) -> None:
        # one forward per frame size: YOLOX pads a batch to its largest input, so a frame's boxes hung on its
        # batch-mates' sizes
        for group in by_frame_size(frames):
            images, scales = self._model_inputs(group)
            with self.inference():
                outputs = self.model(images)
            for frame, output, scale in zip(group, outputs, scales):
                frame.results[self.name] = self._postprocess(output, scale, frame)
                self._remember(frame)

    def _remember(self, frame: Frame) -> None:
        """Keep the result when the gate may send partial frames of this stream next."""
        if self._crop_reuse and frame.mark.tiles:
            self._boxes[frame.stream_id] = _BoxCache(frame.index, frame.results[self.name], (frame.height, frame.width))
        else:
            self._boxes.pop(frame.stream_id, None)

    def _try_crop(self, frame: Frame) -> bool:
        if not self._has_base(frame):
            return False
        if self._letterbox:
            canvas = self._canvas_for(frame)
            if canvas is None:
                return False
            self._run_canvas(frame, canvas)
            return True
        crop = self._crop_for(frame)
        if crop is None:
            return False
        self._run_crop(frame, *crop)
        return True

    def _has_base(self, frame: Frame) -> bool:
        """Whether a partial frame can build on the stream's cached boxes (of its base frame, same size)."""
        tiles = frame.mark.tiles or {}
        cache = self._boxes.get(frame.stream_id)
        return bool(self._crop_reuse and tiles.get("changed") and cache is not None
                    and cache.index == region_base(tiles, self.name) and cache.source == (frame.height, frame.width))

    def _crop_for(self, frame: Frame) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
        """(inner, crop) as (x1, y1, x2, y2) source pixels: the changed tiles' bounding box and it grown by the
        halo, or None when the crop is too large."""
        tiles = frame.mark.tiles
        return crop_region(tiles["grid"], tiles["changed"], frame.height, frame.width, self.options.crop_halo,
                           self.options.crop_max_area)

    def _run_crop(self, frame: Frame, inner: tuple[int, int, int, int], crop: tuple[int, int, int, int]) -> None:
        """Detect on the crop at full-frame pixel scale and merge with the stream's carried-over boxes."""
        import torch

        from blinkflow.stages.common import frames_to_batch

        x0, y0, x1, y1 = crop
        size = self.options.input_size
        # the crop at the resolution a full-frame call would give it: input_size scales the frame first
        sy, sx = (size[0] / frame.height, size[1] / frame.width) if size is not None else (1.0, 1.0)
        crop_in = (max(1, round((y1 - y0) * sy)), max(1, round((x1 - x0) * sx)))
        part = Frame(frame.stream_id, frame.index, frame.pts, np.ascontiguousarray(frame.image[y0:y1, x0:x1]))
        image = frames_to_batch([part], self._device, size=crop_in if size is not None else None)[0]
        full_in = (size[0], size[1]) if size is not None else (frame.height, frame.width)
        transform = getattr(self.model, "transform", None)
        model_scale = _model_scale(transform, full_in)
        saved = getattr(transform, "fixed_size", None)
        crop_model = (max(1, round(crop_in[0] * model_scale[0])), max(1, round(crop_in[1] * model_scale[1])))
        try:
            if transform is not None and hasattr(transform, "fixed_size"):
                transform.fixed_size = (crop_model[1], crop_model[0])  # (width, height): the same scale as a full frame
            with self.inference():
                output = self.model([image])[0]
        finally:
            if transform is not None and hasattr(transform, "fixed_size"):
                transform.fixed_size = saved
        found = self._filtered(output)
        scale = torch.tensor([(x1 - x0) / crop_in[1], (y1 - y0) / crop_in[0]] * 2, device=found[0].device)
        boxes = found[0] * scale + torch.tensor([x0, y0, x0, y0], dtype=torch.float32, device=found[0].device)
        new = self._keep_new(boxes.cpu(), inner, crop, frame)
        carried = self._carried(frame, [inner])
        stale = superseded(carried[0], carried[2], boxes.cpu()[new], found[2].cpu()[new])
        carried = tuple(part[~stale] for part in carried)
        merged = (
            torch.cat([carried[0], boxes.cpu()[new]]),
            torch.cat([carried[1], found[1].float().cpu()[new]]),
            torch.cat([carried[2], found[2].cpu()[new]]),
        )
        result = self._finish(*merged, frame)
        full_cost = (full_in[0] * model_scale[0]) * (full_in[1] * model_scale[1])
        result["crop"] = {"box": [x0, y0, x1, y1], "area": round(crop_model[0] * crop_model[1] / full_cost, 4)}
        frame.results[self.name] = result
        self._boxes[frame.stream_id] = _BoxCache(frame.index, {k: v for k, v in result.items() if k != "crop"},
                                                 (frame.height, frame.width))

    def _canvas_for(self, frame: Frame) -> Canvas | None:
        """The letterboxed canvas of a partial frame's changed regions, or None when it costs too much."""
        tiles = frame.mark.tiles
        rows, cols = tiles["grid"]
        previous = self._boxes[frame.stream_id].result.get("boxes") or []
        changed = tiles["changed"] if self.options.crop_margin else tiles.get("core", tiles["changed"])
        inners = object_regions(tiles["grid"], changed, frame.height, frame.width, previous)
        scale, content = self._letterbox_scale(frame)
        halo = (self.options.crop_halo * frame.width / cols, self.options.crop_halo * frame.height / rows)
        full = self._full_input(frame)
        return plan_canvas(inners, (frame.height, frame.width), scale, content, halo,
                           self.options.crop_max_area * full[0] * full[1])

    def _full_input(self, frame: Frame) -> tuple[int, int]:
        """The (height, width) of the model input a full-frame call on ``frame`` runs at: what a canvas costs
        a share of (a rect letterbox is smaller than input_size)."""
        height, width = self.options.input_size or (frame.height, frame.width)
        return self.model.input_for(height, width)

    def _letterbox_scale(self, frame: Frame) -> tuple[tuple[float, float], tuple[int, int]]:
        """(x, y) factors from source pixels to the letterboxed model input of a full-frame call, and the
        (height, width) the frame takes in it."""
        height, width = self.options.input_size or (frame.height, frame.width)
        ratio, content = self.model.letterbox_fit(height, width)
        return (ratio * width / frame.width, ratio * height / frame.height), content

    def _run_canvas(self, frame: Frame, canvas: Canvas) -> None:
        """Detect on the canvas of the changed regions in one call and merge with the carried-over boxes."""
        import torch

        found = self._filtered(self._canvas_output(frame, canvas))
        boxes, scores, labels = (part.cpu() for part in found)
        scale, _ = self._letterbox_scale(frame)
        new_boxes, new_scores, new_labels = [], [], []
        taken = torch.zeros(len(boxes), dtype=torch.bool)
        for region in canvas.regions:
            (px, py), (x0, y0, x1, y1) = region.place, region.cut
            mine = ~taken & _centre_in(boxes, (px, py, px + x1 - x0, py + y1 - y0))
            taken |= mine
            # a box reaching past its region into the padding or a neighbour ends at the region's edge
            local = boxes[mine].clone()
            local[:, 0::2] = local[:, 0::2].clamp(px, px + x1 - x0) - px + x0
            local[:, 1::2] = local[:, 1::2].clamp(py, py + y1 - y0) - py + y0
            local = local / torch.tensor([scale[0], scale[1]] * 2)
            keep = self._keep_new(local, region.inners, region.crop, frame)
            new_boxes.append(local[keep])
            new_scores.append(scores[mine][keep].float())
            new_labels.append(labels[mine][keep])
        new = (torch.cat(new_boxes), torch.cat(new_scores), torch.cat(new_labels))
        carried = self._carried(frame, [inner for region in canvas.regions for inner in region.inners])
        stale = superseded(carried[0], carried[2], new[0], new[2])
        merged = [torch.cat([old[~stale], fresh]) for old, fresh in zip(carried, new)]
        result = self._finish(*merged, frame)
        full = self._full_input(frame)
        crops = [[round(float(v), 2) for v in region.crop] for region in canvas.regions]
        result["crop"] = {
            "box": [min(c[0] for c in crops), min(c[1] for c in crops), max(c[2] for c in crops), max(c[3] for c in crops)],
            "area": round(canvas.area / (full[0] * full[1]), 4),
            "regions": crops,
        }
        frame.results[self.name] = result
        self._boxes[frame.stream_id] = _BoxCache(frame.index, {k: v for k, v in result.items() if k != "crop"},
                                                 (frame.height, frame.width))

    def _canvas_output(self, frame: Frame, canvas: Canvas) -> dict[str, Any]:
        """The model's output on the canvas: each region cut from the frame resized as a full-frame call
        resizes it, at its place, the rest padded as the letterbox pads; boxes in canvas pixels."""
        import torch.nn.functional as F

        from blinkflow.stages.common import frames_to_batch

        size = self.options.input_size
        image = frames_to_batch([frame], self._device, size=tuple(size) if size is not None else None)[0]
        _, content = self.model.letterbox_fit(*image.shape[-2:])
        scaled = F.interpolate(image[None], size=content, mode="bilinear", align_corners=False)[0]
        board = scaled.new_full((3, *canvas.size), self.model.pad_value)
        for region in canvas.regions:
            (px, py), (x0, y0, x1, y1) = region.place, region.cut
            x1, y1 = min(x1, content[1]), min(y1, content[0])  # beyond the frame the letterbox pads
            board[:, py:py + y1 - y0, px:px + x1 - x0] = scaled[:, y0:y1, x0:x1]
        saved = self.model.input_size
        try:
            self.model.input_size = canvas.size  # the canvas is its own letterbox: ratio 1, no resize
            with self.inference():
                return self.model([board])[0]
        finally:
            self.model.input_size = saved

    @staticmethod
    def _keep_new(boxes: Any, inner: Any, crop: tuple, frame: Frame) -> Any:
        """Crop boxes to add: centre in the changed region (one rectangle or several), or whole inside the
        crop (not cut by an inner edge)."""
        import torch

        if len(boxes) == 0:
            return torch.zeros(0, dtype=torch.bool)
        centre_in = _centre_in(boxes, inner)
        edge = 1.0  # a box within a pixel of an inner crop edge is cut by it
        cut = torch.zeros(len(boxes), dtype=torch.bool)
        if crop[0] > 0:
            cut |= boxes[:, 0] <= crop[0] + edge
        if crop[1] > 0:
            cut |= boxes[:, 1] <= crop[1] + edge
        if crop[2] < frame.width:
            cut |= boxes[:, 2] >= crop[2] - edge
        if crop[3] < frame.height:
            cut |= boxes[:, 3] >= crop[3] - edge
        return centre_in | ~cut

    def _carried(self, frame: Frame, inners: list[tuple]) -> tuple[Any, Any, Any]:
        """The stream's last boxes whose centre is outside the changed regions ``inners``. They stay where they
        were: the gate's tiles come from the plain (not motion-compensated) reference, so outside them nothing
        moved."""
        import torch

        last = self._boxes[frame.stream_id].result
        b = torch.tensor([list(map(float, box)) for box in last.get("boxes") or []], dtype=torch.float32).reshape(-1, 4)
        s = torch.tensor(last.get("scores") or [], dtype=torch.float32)
        lab = torch.tensor(last.get("labels") or [], dtype=torch.int64)
        if len(b):
            outside = ~_centre_in(b, inners)
            b, s, lab = b[outside], s[outside], lab[outside]
        return b, s, lab

    # ------------------------------------------------------------------ helpers

    def _labels_for_filter(self) -> list[int] | None:
        wanted = self.options.classes_filter
        if wanted is None:
            return None
        unknown = [name for name in wanted if name not in self.classes]
        if unknown:
            valid = [c for c in dict.fromkeys(self.classes[1:]) if c != "N/A"]  # torchvision's COCO gaps
            raise StageError(
                f"stages.{self.name}.options.classes_filter: unknown class {unknown[0]!r}; "
                f"use names from: {', '.join(valid)}"
            )
        return [index for index, name in enumerate(self.classes) if name in wanted]

    def _align_model_limits(self, model: Any) -> None:
        """Let the backend's own score cut and box cap match ours, so neither hides boxes we want.

        torchvision detectors filter at 0.01-0.2 and cap at 100-300 boxes
        internally; a lower stage threshold or higher cap would be silently
        ineffective otherwise, and a higher threshold saves post-processing.
        """
        for owner in (model, getattr(model, "roi_heads", None)):
            if owner is None:
                continue
            if hasattr(owner, "score_thresh"):
                owner.score_thresh = self._lowest_score()
            if hasattr(owner, "detections_per_img"):
                owner.detections_per_img = max(owner.detections_per_img, self.options.max_detections)

    def _model_inputs(self, frames: list[Frame]) -> tuple[list[Any], list[tuple[float, float]]]:
        """CHW [0, 1] tensors on the device and each frame's (x, y) scale back to source pixels.

        torchvision detectors take a list of differently sized images and
        return boxes in each image's own pixels, so without ``input_size``
        frames go in at source size and need no scaling.
        """
        from blinkflow.stages.common import frames_to_batch

        size = self.options.input_size
        if size is None:
            return [frames_to_batch([f], self._device)[0] for f in frames], [(1.0, 1.0)] * len(frames)
        height, width = size
        batch = frames_to_batch(frames, self._device, size=(height, width))
        return list(batch), [(f.width / width, f.height / height) for f in frames]

    def _filtered(self, output: dict[str, Any]) -> tuple[Any, Any, Any]:
        """Boxes, scores and labels above the score threshold, not background, of the allowed classes."""
        import torch

        boxes, scores, labels = output["boxes"].float(), output["scores"].float(), output["labels"]
        keep = (scores >= self._lowest_score()) & (labels != 0)  # label 0 is background
        if self._allowed_labels is not None:
            keep &= torch.isin(labels, torch.tensor(self._allowed_labels, device=labels.device))
        return boxes[keep], scores[keep], labels[keep]

    def _lowest_score(self) -> float:
        """The lowest score any box may keep: with hysteresis, continuing boxes go down to keep_threshold."""
        keep = self.options.keep_threshold
        return self.options.score_threshold if keep is None else min(keep, self.options.score_threshold)

    def _hysteresis(self, boxes: Any, scores: Any, labels: Any, frame: Frame) -> Any:
        """Which boxes to output: those scoring score_threshold, and those at keep_threshold or more that
        continue a box of the stream's previous output (same class, IoU >= CONTINUE_IOU)."""
        from torchvision.ops import box_iou

        keep = scores >= self.options.score_threshold
        if self.options.keep_threshold is None or len(boxes) == 0:
            return keep
        shown = self._shown.get(frame.stream_id)
        if shown is None or not follows(shown[0], frame) or len(shown[1]) == 0:
            return keep
        same_class = labels.view(-1, 1).cpu() == shown[2].view(1, -1)
        continues = ((box_iou(boxes.cpu(), shown[1]) >= CONTINUE_IOU) & same_class).any(dim=1)
        return keep | (continues.to(keep.device) & (scores >= self.options.keep_threshold))

    def _postprocess(self, output: dict[str, Any], scale: tuple[float, float], frame: Frame) -> dict[str, list]:
        import torch

        boxes, scores, labels = self._filtered(output)
        boxes = boxes * torch.tensor([scale[0], scale[1], scale[0], scale[1]], device=boxes.device)
        return self._finish(boxes, scores, labels, frame)

    def _finish(self, boxes: Any, scores: Any, labels: Any, frame: Frame) -> dict[str, list]:
        """Class-aware NMS, the best ``max_detections``, clipped to the frame, as plain lists."""
        import torch
        from torchvision.ops import batched_nms

        shown = self._hysteresis(boxes, scores, labels, frame)
        boxes, scores, labels = boxes[shown], scores[shown], labels[shown]
        # batched_nms returns indices sorted by decreasing score
        order = batched_nms(boxes, scores, labels, self.options.nms_iou)[: self.options.max_detections]
        boxes = boxes[order]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, frame.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, frame.height)
        label_list = labels[order].tolist()
        if self.options.keep_threshold is not None:
            self._shown[frame.stream_id] = (frame.index, boxes.detach().cpu().clone(),
                                            torch.tensor(label_list, dtype=torch.int64))
        return {
            "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
            "labels": label_list,
            "classes": [self.classes[label] for label in label_list],
            "scores": [round(s, 4) for s in scores[order].tolist()],
        }


def crop_region(grid: list[int], changed: list[int], height: int, width: int, halo: float, max_area: float
                ) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]] | None:
    """(inner, crop) as (x1, y1, x2, y2) pixels: the bounding box of the changed tiles, and it grown by ``halo``
    tiles and clamped to the frame; None when the crop would cover more than ``max_area`` of the frame."""
    rows, cols = grid
    ys, xs = tile_edges(rows, height), tile_edges(cols, width)
    r = [i // cols for i in changed]
    c = [i % cols for i in changed]
    inner = (xs[min(c)], ys[min(r)], xs[max(c) + 1], ys[max(r) + 1])
    hx, hy = round(halo * width / cols), round(halo * height / rows)
    crop = (max(0, inner[0] - hx), max(0, inner[1] - hy), min(width, inner[2] + hx), min(height, inner[3] + hy))
    if (crop[2] - crop[0]) * (crop[3] - crop[1]) > max_area * width * height:
        return None
    return inner, crop


def _model_scale(transform: Any, size: tuple[int, int]) -> tuple[float, float]:
    """(y, x) factor by which the model's own transform resizes a ``size`` (height, width) input."""
    if transform is None:
        return 1.0, 1.0
    fixed = getattr(transform, "fixed_size", None)
    if fixed is not None:
        return fixed[1] / size[0], fixed[0] / size[1]
    min_size, max_size = getattr(transform, "min_size", None), getattr(transform, "max_size", None)
    if not min_size or not max_size:
        return 1.0, 1.0
    target = min_size[-1] if isinstance(min_size, (tuple, list)) else min_size
    factor = min(float(target) / min(size), float(max_size) / max(size))
    return factor, factor


def crop_reuse_enabled(cfg: StageConfig | None) -> bool:
    """Whether partial frames run on part of the frame (``crop_reuse_mode`` is not None)."""
    return crop_reuse_mode(cfg) is not None


def crop_reuse_mode(cfg: StageConfig | None) -> str | None:
    """"crop", "letterbox" or None (off): ``options.crop_reuse``, or for null what the model allows."""
    options = getattr(cfg, "options", None)
    setting = None if options is None else options.crop_reuse
    if setting == "letterbox":
        return "letterbox"
    if setting is not None:
        return "crop" if setting else None
    model = (getattr(cfg, "model", None) or Detect.default_model).lower()
    # YOLOX letterboxes every input (a crop too) to its fixed size, so its regions go on a canvas at the
    # full-frame scale; torchvision's SSD and SSDLite size their default boxes by the input: a crop would
    # see its objects at the wrong scale
    if model.startswith("yolox"):
        return "letterbox"
    return None if model.startswith("ssd") else "crop"


def letterboxes(model: Any) -> bool:
    """Whether ``model`` letterboxes every input to a settable fixed size, as :class:`models.yolox.YOLOX` does."""
    return all(hasattr(model, name) for name in ("input_size", "input_for", "letterbox_fit", "pad_value"))


def _not_letterboxed(stage: str, model: str) -> str:
    return (f"stages.{stage}.options.crop_reuse: letterbox needs a detector that letterboxes to a fixed input "
            f"(yolox_nano); {model} resizes its input instead; use true, false or null")


def _centre_in(boxes: Any, rects: Any) -> Any:
    """Which boxes (N, 4) have their centre in the rectangle ``rects`` (x1, y1, x2, y2) or in any of several."""
    import torch

    many = rects if not rects or isinstance(rects[0], (tuple, list)) else [rects]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = torch.zeros(len(boxes), dtype=torch.bool)
    for x0, y0, x1, y1 in many:
        inside |= (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
    return inside


#: a carried box this much like (IoU) a new crop box of the same class is the same object seen again
SUPERSEDE_IOU = 0.3


def superseded(carried_boxes: Any, carried_labels: Any, new_boxes: Any, new_labels: Any) -> Any:
    """Which carried boxes a new crop detection replaces: same class and IoU >= SUPERSEDE_IOU.

    A carried box whose centre lies just outside the changed region can belong to
    an object that moved into it; the crop then sees the object again, and
    keeping both would count it twice.
    """
    import torch
    from torchvision.ops import box_iou

    if len(carried_boxes) == 0 or len(new_boxes) == 0:
        return torch.zeros(len(carried_boxes), dtype=torch.bool)
    same_class = carried_labels.view(-1, 1) == new_labels.view(1, -1)
    return ((box_iou(carried_boxes, new_boxes) >= SUPERSEDE_IOU) & same_class).any(dim=1)
