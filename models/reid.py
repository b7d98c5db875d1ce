"""Re-identification embedding nets (task ``"reid"``): a crop in, an L2-normalised embedding out.

The track stage (stages/track.py) embeds the crop of every box and compares tracks by the cosine
distance of these embeddings, so an object that was occluded or unseen for a while gets its old ID
back. Trained with metric-learning losses (models/training/reid.py: batch-hard triplet or NT-Xent)
on identities of the synthetic scenes; ``blinkflow train reid``.

Input: float NCHW RGB in [0, 1] at ``input_size`` (the caller resizes the crops: :func:`crops_to_batch`).
Output: (N, dim) with unit L2 norm, in train and eval mode alike.
"""

from __future__ import annotations

import itertools
from typing import Any

from blinkflow.models.registry import register_model

#: [height, width] of the crops the shipped net sees (square: the synthetic objects are blobs, not people)
INPUT_SIZE = (32, 32)


@register_model("embed_small", task="reid")
def embed_small(*, widths: tuple[int, int, int, int] = (16, 32, 48, 64), dim: int = 64) -> Any:
    """Four conv blocks (stride 2 each), global average and max pooling, a linear projection (~0.1M parameters)."""
    return EmbedNet(widths=tuple(widths), dim=dim)


def _block(cin: int, cout: int) -> Any:
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


def EmbedNet(widths: tuple[int, ...], dim: int) -> Any:  # a factory: torch stays lazy
    import torch
    import torch.nn.functional as F
    from torch import nn

    class _EmbedNet(nn.Module):
        """Small CNN embedding; average + max pooling keeps both colour statistics and salient texture."""

        def __init__(self) -> None:
            super().__init__()
            chans = (3, *widths)
            self.features = nn.Sequential(*[_block(a, b) for a, b in itertools.pairwise(chans)])
            self.project = nn.Linear(2 * widths[-1], dim)
            self.embedding_dim = dim  # an embedder, not a classifier: weights' messages speak of model_args
            self.register_buffer("mean", torch.tensor([0.45, 0.45, 0.45]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.features((x - self.mean) / self.std)
            pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
            return F.normalize(self.project(pooled), dim=1)

    return _EmbedNet()


def crops_to_batch(image: Any, boxes: Any, size: tuple[int, int] = INPUT_SIZE, context: float = 0.1) -> Any:
    """(N, 3, h, w) float crops in [0, 1] of ``boxes`` (x1y1x2y2 pixels) from an RGB uint8 (H, W, 3) image.

    Each box is grown by ``context`` of its size on every side (a little background helps with
    tight boxes) and clipped to the image; an empty box gives a one-pixel crop (never an error).
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    height, width = image.shape[:2]
    crops = []
    for x1, y1, x2, y2 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        pad_x, pad_y = context * (x2 - x1), context * (y2 - y1)
        left, top = int(np.clip(np.floor(x1 - pad_x), 0, width - 1)), int(np.clip(np.floor(y1 - pad_y), 0, height - 1))
        right = int(np.clip(np.ceil(x2 + pad_x), left + 1, width))
        bottom = int(np.clip(np.ceil(y2 + pad_y), top + 1, height))
        patch = torch.from_numpy(np.ascontiguousarray(image[top:bottom, left:right])).permute(2, 0, 1)[None].float()
        crops.append(F.interpolate(patch, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0])
    if not crops:
        return torch.zeros((0, 3, *size))
    return torch.stack(crops).div_(255.0)
