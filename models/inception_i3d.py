"""Inception-v1 I3D (Carreira & Zisserman 2017), as in DeepMind's kinetics-i3d ``i3d.py``.

The layers, their names and TensorFlow's "SAME" padding follow the original,
so DeepMind's RGB Kinetics-400 weights (converted by
:mod:`models.convert.i3d_pickle`) give its outputs:

* every unit is a bias-free conv, BatchNorm without scale (Sonnet's default
  ``scale=False``: the unit has a BN bias but no gamma; eps 1e-3) and ReLU;
* "SAME" pads ``total = max((ceil(n/s) - 1) * s + k - n, 0)`` per dimension,
  the smaller half before, and depends on the input size, so the padding is
  computed on every call; max pools pad with -inf (TF never takes a padded
  value as a maximum);
* the head averages (2, 7, 7) windows with stride 1 ("VALID"), applies a
  1x1x1 conv with bias and averages the logits over time. The window is
  clipped to the feature map, which is the original at 224x224 (7x7 maps)
  and lets smaller clips through; any spatial positions left are averaged
  too (the original squeezes them, i.e. needs 224x224).

``model(clip)`` takes RGB in [0, 1], (N, 3, T, H, W), and rescales it to the
[-1, 1] the weights were trained on. With "SAME" padding every layer accepts
any size, so there is no hard minimum; DeepMind ran 64-79 frames at 224x224
and 25 fps, and much smaller clips lose accuracy.

This module imports torch at the top; import it lazily.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: (branch_0, branch_1 reduce, branch_1, branch_2 reduce, branch_2, branch_3) widths of each Mixed block
MIXED_CHANNELS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
BN_EPS = 1e-3
HEAD_WINDOW = (2, 7, 7)


def same_padding(size: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """TF "SAME" padding of (T, H, W) in ``F.pad`` order: (W before, W after, H.., T..)."""
    pads: list[int] = []
    for n, k, s in reversed(list(zip(size, kernel, stride))):
        total = max((math.ceil(n / s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class SamePadConv3d(nn.Conv3d):
    """Conv3d with TF "SAME" zero padding, worked out for each input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_padding(tuple(x.shape[-3:]), self.kernel_size, self.stride)
        return super().forward(F.pad(x, pads) if any(pads) else x)


class SamePadMaxPool3d(nn.MaxPool3d):
    """MaxPool3d with TF "SAME" padding; the padding is -inf, so it is never the maximum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = same_padding(tuple(x.shape[-3:]), self.kernel_size, self.stride)
        return super().forward(F.pad(x, pads, value=float("-inf")) if any(pads) else x)


class BatchNorm3dNoScale(nn.BatchNorm3d):
    """BatchNorm with a learned bias but no scale (gamma fixed to 1), like Sonnet's default."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=BN_EPS, affine=False)
        # F.batch_norm takes weight=None with a bias, which is exactly "scale=False"
        self.bias = nn.Parameter(torch.zeros(num_features))


class Unit3D(nn.Module):
    """Conv (no bias) + BatchNorm without scale + ReLU: kinetics-i3d's ``Unit3D``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1)) -> None:
        super().__init__()
        self.conv = SamePadConv3d(in_channels, out_channels, kernel, stride=stride, bias=False)
        self.bn = BatchNorm3dNoScale(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """A Mixed block: 1x1 | 1x1 -> 3x3x3 | 1x1 -> 3x3x3 | 3x3x3 max pool -> 1x1, concatenated."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]) -> None:
        super().__init__()
        self.branch_0 = Unit3D(in_channels, widths[0])
        self.branch_1a = Unit3D(in_channels, widths[1])
        self.branch_1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.branch_2a = Unit3D(in_channels, widths[3])
        self.branch_2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.branch_3_pool = SamePadMaxPool3d((3, 3, 3), stride=(1, 1, 1))
        self.branch_3 = Unit3D(in_channels, widths[5])
        self.out_channels = widths[0] + widths[2] + widths[4] + widths[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch_0(x),
                self.branch_1b(self.branch_1a(x)),
                self.branch_2b(self.branch_2a(x)),
                self.branch_3(self.branch_3_pool(x)),
            ],
            dim=1,
        )


class InceptionI3d(nn.Module):
    """I3D RGB classifier: (N, 3, T, H, W) in [0, 1] -> logits (N, num_classes)."""

    def __init__(self, num_classes: int = 400, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), stride=(2, 2, 2))
        self.MaxPool3d_2a_3x3 = SamePadMaxPool3d((1, 3, 3), stride=(1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = SamePadMaxPool3d((1, 3, 3), stride=(1, 2, 2))
        self.Mixed_3b = InceptionBlock(192, MIXED_CHANNELS["Mixed_3b"])
        self.Mixed_3c = InceptionBlock(self.Mixed_3b.out_channels, MIXED_CHANNELS["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = SamePadMaxPool3d((3, 3, 3), stride=(2, 2, 2))
        self.Mixed_4b = InceptionBlock(self.Mixed_3c.out_channels, MIXED_CHANNELS["Mixed_4b"])
        self.Mixed_4c = InceptionBlock(self.Mixed_4b.out_channels, MIXED_CHANNELS["Mixed_4c"])
        self.Mixed_4d = InceptionBlock(self.Mixed_4c.out_channels, MIXED_CHANNELS["Mixed_4d"])
        self.Mixed_4e = InceptionBlock(self.Mixed_4d.out_channels, MIXED_CHANNELS["Mixed_4e"])
        self.Mixed_4f = InceptionBlock(self.Mixed_4e.out_channels, MIXED_CHANNELS["Mixed_4f"])
        self.MaxPool3d_5a_2x2 = SamePadMaxPool3d((2, 2, 2), stride=(2, 2, 2))
        self.Mixed_5b = InceptionBlock(self.Mixed_4f.out_channels, MIXED_CHANNELS["Mixed_5b"])
        self.Mixed_5c = InceptionBlock(self.Mixed_5b.out_channels, MIXED_CHANNELS["Mixed_5c"])
        self.dropout = nn.Dropout(dropout)
        self.logits = nn.Conv3d(self.Mixed_5c.out_channels, num_classes, 1, bias=True)

    def features(self, clip: torch.Tensor) -> torch.Tensor:
        """Mixed_5c activations of a [0, 1] clip."""
        x = clip
        for _, unit in self.depth_units()[:-1]:
            x = unit(x)
        return x

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return I3DHead(self.dropout, self.logits)(self.features(clip))

    def depth_units(self) -> list[tuple[str, nn.Module]]:
        """The network as a chain of (name, module), input to logits: what models.depth splits into depth stages
        (the modules are this model's own, not copies)."""
        mixed_4 = [(name, getattr(self, name)) for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e")]
        return [
            ("Conv3d_1a", nn.Sequential(Signed(), self.Conv3d_1a_7x7, self.MaxPool3d_2a_3x3)),
            ("Conv3d_2", nn.Sequential(self.Conv3d_2b_1x1, self.Conv3d_2c_3x3, self.MaxPool3d_3a_3x3)),
            ("Mixed_3b", self.Mixed_3b),
            ("Mixed_3c", nn.Sequential(self.Mixed_3c, self.MaxPool3d_4a_3x3)),
            *mixed_4,
            ("Mixed_4f", nn.Sequential(self.Mixed_4f, self.MaxPool3d_5a_2x2)),
            ("Mixed_5b", self.Mixed_5b),
            ("Mixed_5c", self.Mixed_5c),
            ("head", I3DHead(self.dropout, self.logits)),
        ]


class Signed(nn.Module):
    """[0, 1] to [-1, 1]: the RGB range the weights were trained on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 - 1


class I3DHead(nn.Module):
    """Mixed_5c activations to logits: average pool, the 1x1x1 logits conv, then the mean over (T, H, W)."""

    def __init__(self, dropout: nn.Module, logits: nn.Module) -> None:
        super().__init__()
        self.dropout, self.logits = dropout, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        window = tuple(min(w, n) for w, n in zip(HEAD_WINDOW, x.shape[-3:]))
        x = F.avg_pool3d(x, window, stride=1)
        return self.logits(self.dropout(x)).mean(dim=(2, 3, 4))  # over time as the original; over space when H, W < 224 left some
