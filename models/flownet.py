"""Optical-flow networks behind one call convention (task ``"flow"``).

Every flow backend is called as ``model(img1, img2)`` with two float NCHW RGB
batches in [0, 1] of the same size (any size) and returns, in eval mode, the
flow from ``img1`` to ``img2`` as (N, 2, H, W) at the input size, channel 0 =
x (right), channel 1 = y (down), in pixels of the input. In train mode it
returns a list of predictions, finest first, each in input pixels on its own
grid, for :func:`multiscale_epe_loss`.

* :class:`FlowNetSSmall`: the project's own FlowNetS-style encoder-decoder
  (Dosovitskiy et al. 2015) on the 6-channel concatenated pair, ~1.5M
  parameters. It predicts at 1/32 ... 1/4 scale; inference upsamples the 1/4
  prediction bilinearly.
* :class:`RaftFlow`: torchvision's RAFT behind the same convention. RAFT wants
  [-1, 1] input, sides divisible by 8 and feature maps of at least 16x16 (so
  input sides >= 128): the wrapper pads (replicating edges) and crops back.

This module imports torch at the top; :mod:`models.flow` imports it only
inside its builders, so ``import pipeline`` stays cheap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: FlowNet regresses flow / 20 so targets are O(1) (the original paper's scaling)
FLOW_DIVISOR = 20.0
#: loss weights of the 1/4, 1/8, 1/16, 1/32 predictions (FlowNet's schedule, finest first)
MULTISCALE_WEIGHTS = (0.32, 0.08, 0.02, 0.01)


def pad_to_multiple(images: torch.Tensor, multiple: int, minimum: int = 0) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad right and bottom to a multiple of ``multiple`` (and at least ``minimum``).

    Padding on the far sides only keeps pixel coordinates unchanged, so flow
    vectors need no correction; the original (H, W) is returned for cropping.
    """
    height, width = images.shape[-2:]
    target_h = max(minimum, math.ceil(height / multiple) * multiple)
    target_w = max(minimum, math.ceil(width / multiple) * multiple)
    if (target_h, target_w) == (height, width):
        return images, (height, width)
    padded = F.pad(images, (0, target_w - width, 0, target_h - height), mode="replicate")
    return padded, (height, width)


def _conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=kernel // 2),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _deconv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1),
        nn.LeakyReLU(0.1, inplace=True),
    )


def _predict_flow(in_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, 2, 3, padding=1)


def _upsample_flow() -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(2, 2, 4, stride=2, padding=1, bias=False)


class FlowNetSSmall(nn.Module):
    """FlowNetS, slimmed: five stride-2 encoder levels, a decoder that refines flow from 1/32 to 1/4."""

    #: five 2x down-samplings: inputs are padded to a multiple of this
    DOWNSAMPLE = 32

    def __init__(self, widths: tuple[int, int, int, int, int] = (32, 64, 96, 128, 192)) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = widths
        self.conv1 = _conv(6, c1, 7, stride=2)
        self.conv2 = _conv(c1, c2, 5, stride=2)
        self.conv3 = nn.Sequential(_conv(c2, c3, 5, stride=2), _conv(c3, c3, 3))
        self.conv4 = nn.Sequential(_conv(c3, c4, 3, stride=2), _conv(c4, c4, 3))
        self.conv5 = nn.Sequential(_conv(c4, c5, 3, stride=2), _conv(c5, c5, 3))
        d4, d3, d2 = c4 // 2, c3 // 2, c2 // 2
        self.predict5, self.deconv4, self.upflow5 = _predict_flow(c5), _deconv(c5, d4), _upsample_flow()
        cat4 = c4 + d4 + 2
        self.predict4, self.deconv3, self.upflow4 = _predict_flow(cat4), _deconv(cat4, d3), _upsample_flow()
        cat3 = c3 + d3 + 2
        self.predict3, self.deconv2, self.upflow3 = _predict_flow(cat3), _deconv(cat3, d2), _upsample_flow()
        self.predict2 = _predict_flow(c2 + d2 + 2)

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        pair, (height, width) = pad_to_multiple(torch.cat([img1, img2], dim=1) - 0.5, self.DOWNSAMPLE)
        predictions = self._decode(pair)  # finest (1/4) first, in units of FLOW_DIVISOR input pixels
        if self.training:
            return [_crop_to_input(p, height, width) * FLOW_DIVISOR for p in predictions]
        flow = F.interpolate(predictions[0], scale_factor=4, mode="bilinear", align_corners=False)
        return flow[..., :height, :width] * FLOW_DIVISOR

    def _decode(self, pair: torch.Tensor) -> list[torch.Tensor]:
        out2 = self.conv2(self.conv1(pair))
        out3 = self.conv3(out2)
        out4 = self.conv4(out3)
        out5 = self.conv5(out4)
        flow5 = self.predict5(out5)
        concat4 = torch.cat([out4, self.deconv4(out5), self.upflow5(flow5)], dim=1)
        flow4 = self.predict4(concat4)
        concat3 = torch.cat([out3, self.deconv3(concat4), self.upflow4(flow4)], dim=1)
        flow3 = self.predict3(concat3)
        concat2 = torch.cat([out2, self.deconv2(concat3), self.upflow3(flow3)], dim=1)
        return [self.predict2(concat2), flow3, flow4, flow5]


def _crop_to_input(prediction: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Drop the grid cells of a padded-input prediction that lie wholly in the padding."""
    scale = round(math.ceil(height / FlowNetSSmall.DOWNSAMPLE) * FlowNetSSmall.DOWNSAMPLE / prediction.shape[-2])
    return prediction[..., : math.ceil(height / scale), : math.ceil(width / scale)]


class RaftFlow(nn.Module):
    """torchvision RAFT with the common flow call convention (see the module docstring).

    The torchvision model is ``self.net``; :func:`models.weights.load_state`
    maps bare torchvision checkpoints onto the ``net.`` prefix.
    """

    #: RAFT works at 1/8 and its 4-level correlation pyramid needs 1/8 maps of >= 16x16
    MULTIPLE, MIN_SIZE = 8, 128

    def __init__(self, net: nn.Module, num_flow_updates: int = 12) -> None:
        super().__init__()
        if num_flow_updates < 1:
            raise ValueError(f"num_flow_updates must be >= 1, got {num_flow_updates}")
        self.net = net
        self.num_flow_updates = num_flow_updates

    def forward(self, img1: torch.Tensor, img2: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        first, (height, width) = pad_to_multiple(img1 * 2.0 - 1.0, self.MULTIPLE, self.MIN_SIZE)
        second, _ = pad_to_multiple(img2 * 2.0 - 1.0, self.MULTIPLE, self.MIN_SIZE)
        predictions = self.net(first, second, num_flow_updates=self.num_flow_updates)
        if self.training:  # every refinement, last (finest) first, as the loss expects
            return [p[..., :height, :width] for p in reversed(predictions)]
        return predictions[-1][..., :height, :width]


def multiscale_epe_loss(
    predictions: list[torch.Tensor], target: torch.Tensor, weights: tuple[float, ...] = MULTISCALE_WEIGHTS
) -> torch.Tensor:
    """Weighted mean end-point error of each prediction against the target pooled to its grid.

    ``target`` is (N, 2, H, W) in input pixels; every prediction is in input
    pixels too, so pooling the target (area average) needs no rescaling of the
    vectors. Predictions beyond ``weights`` reuse the last weight; for RAFT
    (all iterations at full size, last first) pass RAFT's own decay, e.g.
    ``weights=tuple(0.8 ** i for i in range(len(predictions)))``.
    """
    total = target.new_zeros(())
    for i, prediction in enumerate(predictions):
        weight = weights[min(i, len(weights) - 1)]
        size = prediction.shape[-2:]
        pooled = target if size == target.shape[-2:] else F.adaptive_avg_pool2d(target, size)
        total = total + weight * torch.linalg.vector_norm(prediction - pooled, dim=1).mean()
    return total
