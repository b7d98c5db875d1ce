"""Segmentation backends for the segment stage (task ``"segment"``).

Every backend takes a float NCHW batch of RGB in [0, 1] and returns
``{"out": logits}`` with logits of shape (N, num_classes, H, W) at the input
resolution. torchvision's segmentation models expect ImageNet-normalised
input, so their builders attach a forward pre-hook that normalises; training
and inference then feed the same [0, 1] tensors and can never disagree, and
the state dict keys stay exactly torchvision's.

``deeplabv3_mobilenet_v2`` is TF DeepLab v3 on MobileNetV2 (PASCAL VOC),
rebuilt in torch (:mod:`models.deeplab_mnv2`) for the weights converted from
its quantised TFLite file (:mod:`models.convert.deeplab_tflite`); it maps its
[0, 1] input to [-1, 1] itself.

Builders return random weights (``weights=None, weights_backbone=None``);
:mod:`models.weights` loads checkpoints. torch is imported inside the
builders, so importing this module is cheap.
"""

from __future__ import annotations

from typing import Any

from blinkflow.models.registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@register_model("unet_small", task="segment")
def unet_small(*, num_classes: int, base_width: int = 16) -> Any:
    """The project's own ~0.84M-parameter U-Net (see :mod:`models.unet`); it centres its input itself."""
    from blinkflow.models.unet import UNet

    return UNet(num_classes=num_classes, base_width=base_width)


@register_model("lraspp_mobilenet_v3_large", task="segment", torchvision_weights="LRASPP_MobileNet_V3_Large_Weights")
def lraspp_mobilenet_v3_large(*, num_classes: int = 21) -> Any:
    """LR-ASPP on MobileNetV3-Large: the fastest torchvision segmenter (it has no aux head)."""
    from torchvision.models import segmentation

    return _build_torchvision(segmentation.lraspp_mobilenet_v3_large, num_classes)


@register_model(
    "deeplabv3_mobilenet_v3_large", task="segment", torchvision_weights="DeepLabV3_MobileNet_V3_Large_Weights"
)
def deeplabv3_mobilenet_v3_large(*, num_classes: int = 21) -> Any:
    """DeepLabV3 on MobileNetV3-Large, without the auxiliary head (inference does not need it)."""
    from torchvision.models import segmentation

    return _build_torchvision(segmentation.deeplabv3_mobilenet_v3_large, num_classes, aux_loss=False)


@register_model("deeplabv3_mobilenet_v2", task="segment")
def deeplabv3_mobilenet_v2(*, num_classes: int = 21) -> Any:
    """TF DeepLab v3 on MobileNetV2 at output stride 16 (image pooling + 1x1 branch); the shipped weights
    are converted from the PASCAL VOC TFLite model."""
    from blinkflow.models.deeplab_mnv2 import DeepLabV3MobileNetV2

    return DeepLabV3MobileNetV2(num_classes=num_classes)


@register_model("fcn_resnet50", task="segment", torchvision_weights="FCN_ResNet50_Weights")
def fcn_resnet50(*, num_classes: int = 21) -> Any:
    """FCN on a dilated ResNet-50, without the auxiliary head; heavy, for GPUs."""
    from torchvision.models import segmentation

    return _build_torchvision(segmentation.fcn_resnet50, num_classes, aux_loss=False)


def _build_torchvision(builder: Any, num_classes: int, **kwargs: Any) -> Any:
    """Random-init torchvision model whose forward normalises [0, 1] input itself."""
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    model.num_classes = num_classes  # lets models.weights name class-count mismatches
    model.register_forward_pre_hook(imagenet_normalize)
    return model


def imagenet_normalize(module: Any, args: tuple) -> tuple:
    """Forward pre-hook: ImageNet mean/std normalisation of the first (NCHW, [0, 1]) argument."""
    import torch

    x, *rest = args
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - mean) / std, *rest)
