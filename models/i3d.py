"""I3D inflation (Carreira & Zisserman 2017): turn a 2D image network into a 3D video network.

Each k x k kernel becomes a t x k x k kernel holding the 2D kernel repeated
t times and divided by t, so a *static* clip (one image repeated over time)
gives every time step exactly the 2D network's activations: the inflated net
starts from the image net's accuracy ("boring video" fixed point).

**Temporal edges.** A zero-padded temporal conv would see fewer copies of the
image at the first and last steps and break that fixed point, so the
inflated convs (:class:`InflatedConv3d`) pad time by *replicating* the edge
frames, and 'same'-size in time (stride 1): T in, T out. Space keeps the 2D
layer's own zero padding. Pools get a time kernel of 1 (T is kept);
``AdaptiveAvgPool2d(s)`` becomes ``AdaptiveAvgPool3d((1, *s))``, i.e. the
inflated network also averages over time where the 2D one pooled space, so a
classifier behind it (flatten, fc) works unchanged on clips.

This module imports torch at the top; import it lazily.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class InflatedConv3d(nn.Conv3d):
    """A Conv3d with 'same'-size temporal output via replicate padding of time (spatial padding stays zeros)."""

    def __init__(self, *args, time_padding: tuple[int, int] = (0, 0), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.time_padding = time_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.time_padding):
            # F.pad pads the last dims first: (W, W, H, H, T, T); only T is padded here
            x = F.pad(x, (0, 0, 0, 0, *self.time_padding), mode="replicate")
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, time_padding={self.time_padding}"


def inflate_conv2d(conv2d: nn.Conv2d, time_kernel: int = 3) -> InflatedConv3d:
    """A Conv3d whose kernel is ``conv2d``'s repeated ``time_kernel`` times over time and divided by it."""
    if time_kernel < 1:
        raise ValueError(f"time_kernel must be >= 1, got {time_kernel}")
    if isinstance(conv2d.padding, str):
        raise ValueError(f"cannot inflate a Conv2d with padding={conv2d.padding!r}; use explicit padding")
    before = (time_kernel - 1) // 2
    conv3d = InflatedConv3d(
        conv2d.in_channels,
        conv2d.out_channels,
        (time_kernel, *conv2d.kernel_size),
        stride=(1, *conv2d.stride),
        padding=(0, *conv2d.padding),
        dilation=(1, *conv2d.dilation),
        groups=conv2d.groups,
        bias=conv2d.bias is not None,
        padding_mode=conv2d.padding_mode,
        time_padding=(before, time_kernel - 1 - before),
        device=conv2d.weight.device,
        dtype=conv2d.weight.dtype,
    )
    with torch.no_grad():
        kernel = conv2d.weight.unsqueeze(2).repeat(1, 1, time_kernel, 1, 1) / time_kernel
        conv3d.weight.copy_(kernel)
        if conv2d.bias is not None:
            conv3d.bias.copy_(conv2d.bias)
    return conv3d


def inflate_batchnorm(bn2d: nn.BatchNorm2d) -> nn.BatchNorm3d:
    """BatchNorm3d with the same affine parameters and running statistics."""
    bn3d = nn.BatchNorm3d(
        bn2d.num_features,
        eps=bn2d.eps,
        momentum=bn2d.momentum,
        affine=bn2d.affine,
        track_running_stats=bn2d.track_running_stats,
        device=_device_of(bn2d),
    )
    bn3d.load_state_dict(bn2d.state_dict())
    bn3d.train(bn2d.training)
    return bn3d


def inflate_pool(pool: nn.Module) -> nn.Module:
    """The 3D pool with a time kernel of 1 (adaptive average pools collapse time to 1)."""
    if isinstance(pool, nn.MaxPool2d):
        return nn.MaxPool3d(
            (1, *_pair(pool.kernel_size)),
            stride=(1, *_pair(pool.stride)),
            padding=(0, *_pair(pool.padding)),
            dilation=(1, *_pair(pool.dilation)),
            ceil_mode=pool.ceil_mode,
        )
    if isinstance(pool, nn.AvgPool2d):
        return nn.AvgPool3d(
            (1, *_pair(pool.kernel_size)),
            stride=(1, *_pair(pool.stride)),
            padding=(0, *_pair(pool.padding)),
            ceil_mode=pool.ceil_mode,
            count_include_pad=pool.count_include_pad,
            divisor_override=pool.divisor_override,
        )
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool3d((1, *_pair(pool.output_size)))
    raise TypeError(f"no 3D counterpart for {type(pool).__name__}")


def inflate_module(module2d: nn.Module, time_kernel: int = 3) -> nn.Module:
    """A 3D copy of a 2D network: Conv2d, BatchNorm2d, 2D pools and Dropout2d are replaced, recursively.

    ``module2d`` itself is left untouched. Layers without a spatial rank
    (ReLU, Linear, Flatten, Identity, containers) are kept as they are, so
    networks whose ``forward`` only chains layers (torchvision ResNets,
    VGG-style nets) run on (N, C, T, H, W) clips. A ConvTranspose2d or other
    2D-only layer raises rather than silently mis-shaping.
    """
    converted = _convert(module2d, time_kernel)
    if converted is not None:
        return converted
    module3d = copy.deepcopy(module2d)
    _inflate_children(module3d, time_kernel)
    return module3d


def _inflate_children(parent: nn.Module, time_kernel: int) -> None:
    for name, child in parent.named_children():
        converted = _convert(child, time_kernel)
        if converted is not None:
            setattr(parent, name, converted)
        else:
            _inflate_children(child, time_kernel)


def _convert(module: nn.Module, time_kernel: int) -> nn.Module | None:
    """The 3D replacement of one layer, or None when it has none (recurse into it instead)."""
    if isinstance(module, nn.Conv2d):
        return inflate_conv2d(module, time_kernel)
    if isinstance(module, nn.BatchNorm2d):
        return inflate_batchnorm(module)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return inflate_pool(module)
    if isinstance(module, nn.Dropout2d):
        return nn.Dropout3d(module.p, inplace=module.inplace)
    if isinstance(module, (nn.ConvTranspose2d, nn.AdaptiveMaxPool2d, nn.Upsample)):
        raise TypeError(f"inflate_module: {type(module).__name__} is not supported; replace it before inflating")
    return None


def _pair(value: int | tuple) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else None
