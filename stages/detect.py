"""Object detection: one batched forward per call over all active frames.

Result per frame, ``frame.results["detect"]`` (plain lists, JSON-friendly)::

    {"boxes": [[x1, y1, x2, y2], ...],  # floats in SOURCE pixels, clipped to the frame, 2 decimals
     "labels": [int, ...],              # index into the stage's class list (0 = background, never output)
     "classes": [str, ...],             # class name of each box
     "scores": [float, ...]}            # 4 decimals, highest first

Post-processing after the model: score threshold, class filter, an extra
class-aware NMS (backends differ in their own NMS, so this makes them agree),
then the top ``max_detections``. :mod:`models.formats` converts to/from COCO.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from models.classes import SYNTHETIC_CLASSES
from pipeline.config import StageConfig, _field
from pipeline.errors import StageError
from pipeline.frame import Frame
from pipeline.registry import register_stage
from stages.base import Stage

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


@register_stage(TASK)
class Detect(Stage):
    """Boxes, labels and scores per frame from a registered detection backend."""

    name = TASK
    Options = DetectOptions
    default_model = "ssdlite320_mobilenet_v3_large"

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self.model_name = self.cfg.model or self.default_model
        check_input_size(self.name, self.options.input_size)
        self.model: Any = None
        self.classes: list[str] = []
        self._allowed_labels: list[int] | None = None

    def setup(self, device: str = "cpu") -> None:
        from models.weights import load_state, resolve_weights
        from stages.common import resolve_device

        self.device = device
        self._device = resolve_device(device)
        spec = resolve_weights(self.cfg.weights, stage=self.name, model_name=self.model_name)
        self.classes = pick_classes(self.name, spec.classes, self.options.classes)
        self._allowed_labels = self._labels_for_filter()
        model = build_with_args(self.name, self.model_name, TASK, len(self.classes), self.options.model_args)
        load_state(model, spec)
        self._align_model_limits(model)
        self.model = prepare_for_inference(model, self._device, self.cfg.channels_last)
        log.info("%s: %s, %s weights, %d classes, on %s", self.name, self.model_name, spec.kind, len(self.classes), device)

    def process(self, frames: list[Frame]) -> list[Frame]:
        import torch

        from stages.common import autocast

        active = self.active(frames)
        if not active:
            return frames
        images, scales = self._model_inputs(active)
        with torch.inference_mode(), autocast(self._device, self.cfg.precision):
            outputs = self.model(images)
        for frame, output, scale in zip(active, outputs, scales):
            frame.results[self.name] = self._postprocess(output, scale, frame)
        return frames

    def teardown(self) -> None:
        self.model = None

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
                owner.score_thresh = self.options.score_threshold
            if hasattr(owner, "detections_per_img"):
                owner.detections_per_img = max(owner.detections_per_img, self.options.max_detections)

    def _model_inputs(self, frames: list[Frame]) -> tuple[list[Any], list[tuple[float, float]]]:
        """CHW [0, 1] tensors on the device and each frame's (x, y) scale back to source pixels.

        torchvision detectors take a list of differently sized images and
        return boxes in each image's own pixels, so without ``input_size``
        frames go in at source size and need no scaling.
        """
        from stages.common import frames_to_batch

        size = self.options.input_size
        if size is None:
            return [frames_to_batch([f], self._device)[0] for f in frames], [(1.0, 1.0)] * len(frames)
        height, width = size
        batch = frames_to_batch(frames, self._device, size=(height, width))
        return list(batch), [(f.width / width, f.height / height) for f in frames]

    def _postprocess(self, output: dict[str, Any], scale: tuple[float, float], frame: Frame) -> dict[str, list]:
        import torch
        from torchvision.ops import batched_nms

        boxes, scores, labels = output["boxes"].float(), output["scores"].float(), output["labels"]
        keep = (scores >= self.options.score_threshold) & (labels != 0)  # label 0 is background
        if self._allowed_labels is not None:
            keep &= torch.isin(labels, torch.tensor(self._allowed_labels, device=labels.device))
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        # batched_nms returns indices sorted by decreasing score
        order = batched_nms(boxes, scores, labels, self.options.nms_iou)[: self.options.max_detections]
        boxes = boxes[order] * torch.tensor([scale[0], scale[1], scale[0], scale[1]], device=boxes.device)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, frame.width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, frame.height)
        label_list = labels[order].tolist()
        return {
            "boxes": [[round(v, 2) for v in box] for box in boxes.tolist()],
            "labels": label_list,
            "classes": [self.classes[label] for label in label_list],
            "scores": [round(s, 4) for s in scores[order].tolist()],
        }


# ---------------------------------------------------------------------- shared with stages.segment


def check_input_size(stage: str, size: list[int] | None) -> None:
    if size is None:
        return
    if len(size) != 2 or min(size) < 16:
        raise StageError(
            f"stages.{stage}.options.input_size: expected [height, width] with both >= 16, got {size}; "
            f"e.g. input_size: [320, 320], or null"
        )


def pick_classes(stage: str, weight_classes: list[str] | None, option_classes: list[str] | None) -> list[str]:
    """The weights' own class list wins; options.classes names classes for weights without one."""
    if weight_classes and option_classes and list(option_classes) != list(weight_classes):
        raise StageError(
            f"stages.{stage}.options.classes: the weights define their own {len(weight_classes)} classes; "
            f"remove options.classes or use weights trained on your classes"
        )
    classes = list(weight_classes or option_classes or SYNTHETIC_CLASSES)
    if len(classes) < 2:
        raise StageError(f"stages.{stage}.options.classes: need background plus at least one class, got {classes}")
    return classes


def build_with_args(stage: str, model_name: str, task: str, num_classes: int, model_args: dict | None) -> Any:
    """Build the backend; a builder argument it does not take becomes a one-line StageError."""
    from models.registry import build_model

    if not model_args:
        return build_model(model_name, task=task, num_classes=num_classes)
    try:
        return build_model(model_name, task=task, num_classes=num_classes, **model_args)
    except TypeError as exc:
        raise StageError(
            f"stages.{stage}.options.model_args: {model_name} rejected {sorted(model_args)} ({exc}); "
            f"remove the arguments it does not take"
        ) from None


def prepare_for_inference(model: Any, device: Any, channels_last: bool) -> Any:
    import torch

    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
