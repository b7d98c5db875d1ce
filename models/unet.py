"""The project's own small U-Net for semantic segmentation.

An encoder-decoder with skip connections (Ronneberger et al. 2015), slimmed
for streaming: four 2x down-samplings, bilinear up-sampling instead of
transposed convolutions, and a configurable base width (16 gives ~0.84M
parameters). It takes RGB in [0, 1] of any size (it pads to a multiple of 16
and crops back) and returns ``{"out": logits}`` like torchvision's
segmentation models, so the segment stage treats every backend the same.

This module imports torch at the top; the registry imports it only inside the
``unet_small`` builder, so ``import pipeline`` stays cheap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: four 2x down-samplings: inputs are padded to a multiple of this
DOWNSAMPLE_FACTOR = 16


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice: the basic U-Net block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Halve the resolution, then a double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))


class Up(nn.Module):
    """Upsample 2x, concatenate the encoder's skip, then a double conv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = DoubleConv(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """A 4-level U-Net; ``base_width`` channels at full resolution, doubling per level.

    The bottleneck keeps 8x ``base_width`` channels (not 16x) because bilinear
    up-sampling needs no channel halving; this keeps the net under 1M parameters at width 16.
    """

    def __init__(self, num_classes: int, base_width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes < 1 or base_width < 1:
            raise ValueError(f"num_classes and base_width must be >= 1, got {num_classes}, {base_width}")
        self.num_classes = num_classes
        w = base_width
        self.stem = DoubleConv(in_channels, w)
        self.down1, self.down2 = Down(w, 2 * w), Down(2 * w, 4 * w)
        self.down3, self.down4 = Down(4 * w, 8 * w), Down(8 * w, 8 * w)
        self.up1, self.up2 = Up(8 * w, 8 * w, 4 * w), Up(4 * w, 4 * w, 2 * w)
        self.up3, self.up4 = Up(2 * w, 2 * w, w), Up(w, w, w)
        self.head = nn.Conv2d(w, num_classes, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        x = _pad_to_multiple(x, DOWNSAMPLE_FACTOR)
        # centre the [0, 1] input so the first BatchNorm sees zero-mean data from the start
        s0 = self.stem(x - 0.5)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        s3 = self.down3(s2)
        bottom = self.down4(s3)
        y = self.up4(self.up3(self.up2(self.up1(bottom, s3), s2), s1), s0)
        return {"out": self.head(y)[..., :height, :width]}


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right (replicating edges) so both sides divide by ``multiple``."""
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
