"""Action-recognition backends for the action stage (task ``"action"``).

Every backend is called as ``model(clip)`` with a float clip (N, 3, T, H, W)
of RGB in [0, 1] and returns class logits (N, num_classes) for the clip.
Normalisation happens inside: torchvision's video models get a forward
pre-hook with the mean/std of their own weights' preset (Kinetics-400 values
for r3d/mc3/r2plus1d/s3d, 0.45/0.225 for MViT), so training and inference feed
the same [0, 1] clips and the state dict keys stay exactly torchvision's.

Input sizes:

* r3d_18, mc3_18, r2plus1d_18: any T >= 1 and H, W >= 16 (they pool adaptively);
  Kinetics weights were trained on 16x112x112.
* s3d: torchvision pools with a fixed (2, 7, 7) window, i.e. it only takes
  16x224x224-sized inputs; the builder swaps in a global average pool, which
  is the same at 16x224x224 and also accepts small clips down to 5x32x32
  (its max pools need that much); the model carries
  ``min_clip_shape = (5, 32, 32)``, which the action stage checks.
* mvit_v2_s: exactly 16x224x224 (its relative position tables are sized for
  that grid); the model carries ``required_clip_shape = (16, 224, 224)``,
  which the action stage checks against its options.
* causal3d_small: any T, H, W >= 16; see :mod:`models.causal3d`.
* i3d: DeepMind's Inception I3D (RGB, Kinetics-400 when loaded with the
  shipped weights); TF "SAME" padding and a head window clipped to the
  feature map let any T, H, W through, the same as the original at 224x224.
  DeepMind ran 64-79 frames at 224x224 and 25 fps; see :mod:`models.inception_i3d`.
  It normalises inside ([0, 1] -> [-1, 1]), not with a pre-hook.

Builders return random weights (``weights=None``); :mod:`models.weights`
loads checkpoints. torch is imported inside the builders, so importing this
module is cheap.
"""

from __future__ import annotations

from typing import Any

from blinkflow.models.classes import KINETICS_MEAN, KINETICS_STD, SYNTHETIC_ACTIONS
from blinkflow.models.registry import register_model

#: the MViT weights' preset
MVIT_MEAN = (0.45, 0.45, 0.45)
MVIT_STD = (0.225, 0.225, 0.225)


@register_model("causal3d_small", task="action")
def causal3d_small(*, num_classes: int = len(SYNTHETIC_ACTIONS), **kwargs: Any) -> Any:
    """The project's own streaming causal 3D CNN (~0.26M parameters); it can run frame by frame."""
    from blinkflow.models.causal3d import CausalConv3DNet

    return CausalConv3DNet(num_classes=num_classes, **kwargs)


@register_model("r3d_18", task="action", torchvision_weights="R3D_18_Weights")
def r3d_18(*, num_classes: int = 400) -> Any:
    """ResNet3D-18: full 3x3x3 convolutions (33.4M parameters)."""
    from torchvision.models import video

    return _build_torchvision(video.r3d_18, num_classes, KINETICS_MEAN, KINETICS_STD)


@register_model("mc3_18", task="action", torchvision_weights="MC3_18_Weights")
def mc3_18(*, num_classes: int = 400) -> Any:
    """Mixed convolutions: 3D in the first block, 2D after (11.7M parameters)."""
    from torchvision.models import video

    return _build_torchvision(video.mc3_18, num_classes, KINETICS_MEAN, KINETICS_STD)


@register_model("r2plus1d_18", task="action", torchvision_weights="R2Plus1D_18_Weights")
def r2plus1d_18(*, num_classes: int = 400) -> Any:
    """(2+1)D convolutions: spatial then temporal (31.5M parameters)."""
    from torchvision.models import video

    return _build_torchvision(video.r2plus1d_18, num_classes, KINETICS_MEAN, KINETICS_STD)


@register_model("s3d", task="action", torchvision_weights="S3D_Weights")
def s3d(*, num_classes: int = 400) -> Any:
    """S3D (separable Inception 3D, 8.3M parameters), with a global pool so small clips fit."""
    from torch import nn
    from torchvision.models import video

    model = _build_torchvision(video.s3d, num_classes, KINETICS_MEAN, KINETICS_STD)
    # the classifier is a 1x1x1 conv followed by a mean, so pooling globally first
    # equals the original (2, 7, 7) pool on 16x224x224 input
    model.avgpool = nn.AdaptiveAvgPool3d(1)
    model.min_clip_shape = (5, 32, 32)
    return model


@register_model("mvit_v2_s", task="action", torchvision_weights="MViT_V2_S_Weights")
def mvit_v2_s(*, num_classes: int = 400) -> Any:
    """Multiscale Vision Transformer v2-S (34.5M parameters); input must be 16x224x224."""
    from torchvision.models import video

    model = _build_torchvision(video.mvit_v2_s, num_classes, MVIT_MEAN, MVIT_STD)
    model.required_clip_shape = (16, 224, 224)
    return model


@register_model("i3d", task="action")
def i3d(*, num_classes: int = 400) -> Any:
    """Inception-v1 I3D (RGB stream, 12.7M parameters), TF-faithful so DeepMind's weights load as they are."""
    from blinkflow.models.inception_i3d import InceptionI3d

    return InceptionI3d(num_classes=num_classes)


def _build_torchvision(builder: Any, num_classes: int, mean: tuple, std: tuple) -> Any:
    """Random-init torchvision video model whose forward normalises [0, 1] clips itself."""
    model = builder(weights=None, num_classes=num_classes)
    model.num_classes = num_classes  # lets models.weights name class-count mismatches
    model.register_forward_pre_hook(_ClipNormalizer(mean, std))
    return model


class _ClipNormalizer:
    """Forward pre-hook: per-channel mean/std normalisation of an (N, 3, T, H, W) clip in [0, 1].

    A picklable class instead of a closure, so models can be deep-copied and pickled.
    """

    def __init__(self, mean: tuple, std: tuple) -> None:
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, module: Any, args: tuple) -> tuple:
        import torch

        clip, *rest = args
        mean = torch.tensor(self.mean, device=clip.device, dtype=clip.dtype).view(1, 3, 1, 1, 1)
        std = torch.tensor(self.std, device=clip.device, dtype=clip.dtype).view(1, 3, 1, 1, 1)
        return ((clip - mean) / std, *rest)
