"""Detection backends for the detect stage (task ``"detect"``).

All of them follow torchvision's detector contract: they take a list of float
CHW RGB tensors in [0, 1] of any sizes, normalise and resize internally, and
return per image ``{"boxes": (K, 4) x1y1x2y2 in input pixels, "labels": (K,), "scores": (K,)}``.
Label 0 is the background, as in :mod:`models.classes`. Most are torchvision's
own; ``yolox_nano`` is Megvii's YOLOX-nano (:mod:`models.yolox`), which
letterboxes every image to its fixed ``input_size`` and is shipped with its
COCO weights converted from the original ONNX export.

Builders return random weights (``weights=None, weights_backbone=None``);
:mod:`models.weights` loads checkpoints. ``min_size``/``max_size`` set the
internal resize (shorter side / longer-side cap), ``None`` keeps torchvision's
default; YOLOX's is ``input_size`` (height, width). Builders take only these arguments on purpose: torchvision's
constructors silently swallow unknown keywords, so a misspelt
``options.model_args`` key would otherwise be ignored. (The detect stage sets
the score cut and box cap on the built model.) torch is imported inside the
builders.
"""

from __future__ import annotations

from typing import Any

from blinkflow.models.registry import register_model


@register_model(
    "ssdlite320_mobilenet_v3_large", task="detect", torchvision_weights="SSDLite320_MobileNet_V3_Large_Weights"
)
def ssdlite320_mobilenet_v3_large(*, num_classes: int = 91) -> Any:
    """SSDLite on MobileNetV3-Large; the fastest. Its input size is fixed at 320x320 by design."""
    from torchvision.models import detection

    return _build_torchvision(detection.ssdlite320_mobilenet_v3_large, num_classes)


@register_model(
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    task="detect",
    torchvision_weights="FasterRCNN_MobileNet_V3_Large_320_FPN_Weights",
)
def fasterrcnn_mobilenet_v3_large_320_fpn(
    *, num_classes: int = 91, min_size: int | None = None, max_size: int | None = None
) -> Any:
    """Faster R-CNN on MobileNetV3-Large at low resolution (torchvision default 320/640)."""
    from torchvision.models import detection

    builder = detection.fasterrcnn_mobilenet_v3_large_320_fpn
    return _build_torchvision(builder, num_classes, **_sizes(min_size, max_size))


@register_model(
    "fasterrcnn_mobilenet_v3_large_fpn", task="detect", torchvision_weights="FasterRCNN_MobileNet_V3_Large_FPN_Weights"
)
def fasterrcnn_mobilenet_v3_large_fpn(
    *, num_classes: int = 91, min_size: int | None = None, max_size: int | None = None
) -> Any:
    """Faster R-CNN on MobileNetV3-Large at full resolution (torchvision default 800/1333)."""
    from torchvision.models import detection

    builder = detection.fasterrcnn_mobilenet_v3_large_fpn
    return _build_torchvision(builder, num_classes, **_sizes(min_size, max_size))


@register_model("retinanet_resnet50_fpn_v2", task="detect", torchvision_weights="RetinaNet_ResNet50_FPN_V2_Weights")
def retinanet_resnet50_fpn_v2(
    *, num_classes: int = 91, min_size: int | None = None, max_size: int | None = None
) -> Any:
    """RetinaNet v2 on ResNet-50 FPN; accurate and heavy, for GPUs (default 800/1333)."""
    from torchvision.models import detection

    builder = detection.retinanet_resnet50_fpn_v2
    return _build_torchvision(builder, num_classes, **_sizes(min_size, max_size))


@register_model("fcos_resnet50_fpn", task="detect", torchvision_weights="FCOS_ResNet50_FPN_Weights")
def fcos_resnet50_fpn(
    *, num_classes: int = 91, min_size: int | None = None, max_size: int | None = None
) -> Any:
    """FCOS (anchor-free) on ResNet-50 FPN; heavy, for GPUs (default 800/1333)."""
    from torchvision.models import detection

    return _build_torchvision(detection.fcos_resnet50_fpn, num_classes, **_sizes(min_size, max_size))


@register_model("yolox_nano", task="detect")
def yolox_nano(*, num_classes: int = 91, input_size: tuple[int, int] = (416, 416), rect: bool = True) -> Any:
    """YOLOX-nano (anchor-free, depthwise, 0.9M parameters); letterboxes to ``input_size`` (multiples of 32),
    with ``rect`` cut to the frame's shape (a 16:9 frame costs about half the square)."""
    from blinkflow.models.yolox import YOLOX

    return YOLOX(num_classes=num_classes, input_size=tuple(input_size), rect=rect)


def _sizes(min_size: int | None, max_size: int | None) -> dict[str, int]:
    """Only the sizes that were given, so torchvision's per-model defaults apply otherwise."""
    sizes = {"min_size": min_size, "max_size": max_size}
    return {key: value for key, value in sizes.items() if value is not None}


def _build_torchvision(builder: Any, num_classes: int, **kwargs: Any) -> Any:
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    model.num_classes = num_classes  # lets models.weights name class-count mismatches
    return model
