"""DeepLab v3 on MobileNetV2, as in TF DeepLab's ``mobilenet_v2`` PASCAL VOC export.

The layout follows the TFLite graph of ``deeplabv3_mnv2_pascal_quant.tflite``
(see :mod:`models.convert.deeplab_tflite`):

* trunk: torchvision's MobileNetV2 ``features`` up to ``expanded_conv_16``
  (320 channels; the final 1280-channel conv is not part of DeepLab), run at
  output stride 16: ``expanded_conv_13`` keeps stride 1 instead of 2 and the
  depthwise convs of ``expanded_conv_14`` to ``_16`` are dilated by 2;
* every conv pads like TF's ``SAME`` (for stride 2 the odd pixel goes at the
  bottom/right), computed per input, so any size works;
* BatchNorm is folded into the conv weights in the original, so every conv has
  a bias and there is no BatchNorm at all;
* head: an image-pooling branch (global mean, 1x1 conv, ReLU, broadcast back)
  and a 1x1 conv branch (``aspp0``, ReLU), concatenated in that order, a 1x1
  projection with ReLU and the 1x1 class logits; no atrous 3x3 branches;
* the logits (output stride 16) are upsampled bilinearly with
  ``align_corners=True``, like TF1's ``resize_bilinear``.

``model(x)`` takes float NCHW RGB in [0, 1] of any size and returns
``{"out": logits}`` at the input resolution; it maps the input to [-1, 1]
itself (TF DeepLab's ``x / 127.5 - 1``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TRUNK_CHANNELS = 320
HEAD_CHANNELS = 256
OUTPUT_STRIDE = 16
#: torchvision ``features`` index of TF's ``expanded_conv_N`` is N + 1; the first block without its stride
UNSTRIDED_BLOCK = 14
#: blocks whose depthwise conv is dilated by 2 (output stride 16 instead of 32)
DILATED_BLOCKS = (15, 16, 17)


class SameConv2d(nn.Conv2d):
    """A conv padded like TF's ``SAME``: ``ceil(size / stride)`` outputs, the odd padding pixel after."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.same_padding(x.shape[-2], x.shape[-1])
        return super().forward(F.pad(x, padding) if any(padding) else x)

    def same_padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        pad_h = _same_total(height, self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = _same_total(width, self.kernel_size[1], self.stride[1], self.dilation[1])
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def _same_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    span = (kernel - 1) * dilation + 1
    return max((math.ceil(size / stride) - 1) * stride + span - size, 0)


class DeepLabV3MobileNetV2(nn.Module):
    """DeepLab v3 (image pooling + 1x1 branch) on an output-stride-16 MobileNetV2; see the module docstring."""

    def __init__(self, num_classes: int = 21) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = mobilenet_v2_trunk()
        self.image_pooling = conv_relu(TRUNK_CHANNELS, HEAD_CHANNELS)
        self.aspp0 = conv_relu(TRUNK_CHANNELS, HEAD_CHANNELS)
        self.concat_projection = conv_relu(2 * HEAD_CHANNELS, HEAD_CHANNELS)
        self.logits = nn.Conv2d(HEAD_CHANNELS, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.head(self.features(x), x.shape[-2:])}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's output-stride-16 features (N, 320, h/16, w/16): most of the compute. Feature-level
        reuse (the segment stage's ``feature_reuse``) warps these between keyframes and runs only the head."""
        return self.backbone(x * 2 - 1)

    def head(self, features: torch.Tensor, size: tuple[int, int] | torch.Size,
             context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at ``size`` (the input's height and width) from :meth:`features`. ``context`` (N, 320, 1, 1),
        when given, is the global mean the image-pooling branch sees instead of these features' own: a crop
        of a frame then keeps the whole frame's context (the segment stage's tile recompute)."""
        return self.upsample(self.head_cells(features, context), size)

    def head_cells(self, features: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The head's logits on the feature cells (output stride 16), before :meth:`upsample`. Every branch
        but the global mean is a 1x1 conv, so any window of cells gives the whole map's values there."""
        # the original pools with a window the size of the 513x513 input's feature map: a global mean
        mean = features.mean(dim=(2, 3), keepdim=True) if context is None else context
        pooled = self.image_pooling(mean)
        pooled = pooled.expand(-1, -1, *features.shape[-2:])  # bilinear resize of a 1x1 map is a broadcast
        return self.logits(self.concat_projection(torch.cat([pooled, self.aspp0(features)], dim=1)))

    @staticmethod
    def upsample(cells: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        return F.interpolate(cells, size=tuple(size), mode="bilinear", align_corners=True)

    # ------------------------------------------------------------------ recompute over regions

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every trunk block's output (the last is :meth:`features`): the cache :meth:`update_activations`
        recomputes regions of."""
        out, t = [], x * 2 - 1
        for block in self.backbone:
            t = block(t)
            out.append(t)
        return out

    def update_activations(self, x: torch.Tensor, cached: list[torch.Tensor],
                           rects: list[tuple[int, int, int, int]]) -> tuple[list[torch.Tensor], int]:
        """The trunk's activations for ``x``, recomputed block by block over ``rects`` (y0, y1, x0, x1 input
        pixels) and taken from ``cached`` (another frame's :meth:`activations`) elsewhere; and the FLOPs spent
        (:mod:`models.region_update`)."""
        from blinkflow.models.region_update import update

        return update(self.backbone, x * 2 - 1, cached, rects)

    def region_flops(self, size: tuple[int, int], rects: list[tuple[int, int, int, int]] | None = None) -> int:
        """FLOPs of the trunk recomputing ``rects`` (None: the whole input) and of the head on their cells."""
        from blinkflow.models.region_update import full_flops, planned_flops

        trunk = full_flops(self.backbone, size) if rects is None else planned_flops(self.backbone, size, rects)
        return trunk + self.head_flops(size, rects)

    def head_flops(self, size: tuple[int, int], rects: list[tuple[int, int, int, int]] | None = None) -> int:
        """FLOPs of the head on the cells of :meth:`head_rects` (its 1x1 convs; the pooling branch runs once,
        on the mean, and is left out)."""
        per_cell = 2 * HEAD_CHANNELS * (TRUNK_CHANNELS + 2 * HEAD_CHANNELS + self.num_classes)
        return per_cell * sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in self.head_rects(size, rects))

    @staticmethod
    def head_rects(size: tuple[int, int], rects: list[tuple[int, int, int, int]] | None = None
                   ) -> list[tuple[int, int, int, int]]:
        """The feature cells (output stride 16) under ``rects`` (None: the whole input of ``size``) as windows the
        head runs on: overlapping ones merged, so no cell is computed twice."""
        from blinkflow.models.region_update import level_regions

        cells = (-(-size[0] // OUTPUT_STRIDE), -(-size[1] // OUTPUT_STRIDE))
        if rects is None:
            return [(0, cells[0], 0, cells[1])]
        return level_regions(rects, OUTPUT_STRIDE, cells, reach=0)

    @staticmethod
    def reading_rects(size: tuple[int, int], rects: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
        """Input pixels over the feature cells :meth:`upsample` reads for the pixels of ``rects``. With
        ``align_corners`` pixel p reads cells floor(p (n - 1) / (H - 1)) and the next, not p // 16 (up to a cell
        lower, more so towards the frame's bottom and right): cells :meth:`head_rects` of ``rects`` leaves out."""
        cells = (-(-size[0] // OUTPUT_STRIDE), -(-size[1] // OUTPUT_STRIDE))
        out = []
        for y0, y1, x0, x1 in rects:
            if y0 < y1 and x0 < x1:
                (cy0, cy1), (cx0, cx1) = _cells_read(y0, y1, size[0], cells[0]), _cells_read(x0, x1, size[1], cells[1])
                out.append((cy0 * OUTPUT_STRIDE, min(cy1 * OUTPUT_STRIDE, size[0]),
                            cx0 * OUTPUT_STRIDE, min(cx1 * OUTPUT_STRIDE, size[1])))
        return out


def _cells_read(start: int, stop: int, pixels: int, cells: int) -> tuple[int, int]:
    """The cells (start, stop) that a bilinear ``align_corners`` upsample of ``cells`` to ``pixels`` reads for the
    pixels start..stop - 1: each reads the cell at or below p (cells - 1) / (pixels - 1) and the next. A margin of
    1e-4 cell takes the neighbour too where float rounding may put p on either side of a cell."""
    if cells <= 1 or pixels <= 1:
        return 0, cells
    scale = (cells - 1) / (pixels - 1)
    return max(0, math.floor(start * scale - 1e-4)), min(cells, math.floor((stop - 1) * scale + 1e-4) + 2)


def conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))


def mobilenet_v2_trunk() -> nn.Sequential:
    """torchvision's MobileNetV2 ``features[:18]`` at output stride 16, TF-``SAME`` convs with bias, no BatchNorm."""
    from torchvision.models import mobilenet_v2

    trunk = mobilenet_v2(weights=None).features[:18]
    for name, module in list(trunk.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            _replace(trunk, name, nn.Identity())
        elif isinstance(module, nn.Conv2d):
            _replace(trunk, name, _same_conv(module, block=int(name.split(".")[0])))
    return trunk


def _same_conv(conv: nn.Conv2d, block: int) -> SameConv2d:
    depthwise = conv.groups > 1
    stride = 1 if depthwise and block == UNSTRIDED_BLOCK else conv.stride
    dilation = 2 if depthwise and block in DILATED_BLOCKS else 1
    return SameConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size,
        stride=stride, dilation=dilation, groups=conv.groups, bias=True,
    )


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
