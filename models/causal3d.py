"""The project's own streaming causal 3D CNN for action recognition.

Every temporal convolution looks only at the current and past frames, so the
network runs in two equivalent ways:

* **clip mode**: ``forward_steps(clip)`` on a whole (N, 3, T, H, W) clip,
  with zero padding on the past side only; ``forward(clip)`` returns the
  clip's prediction (N, num_classes) = the logits of the **last** time step.
  With the default 4 blocks of temporal kernel 3 the last step sees the last
  1 + 4 * 2 = 9 frames (:attr:`CausalConv3DNet.receptive_field`), so a
  clip of up to 9 frames is classified as a whole.
* **streaming mode**: ``step(frame, state)`` on one (N, 3, H, W) frame at a
  time returns that step's logits (N, num_classes) and the new state.

The two agree (allclose) step for step in eval mode; in train mode
BatchNorm's batch statistics differ between the two shapes.

**State** is a list with one entry per block (``len(model.blocks)``): the
block's input at the last ``kt - 1`` time steps, a tensor (N, C_in, kt-1, H_b,
W_b), or ``None`` before the first frame (which stands for the zeros that clip
mode pads with). The stem (spatial only) and the head (per-step pooling and a
linear layer) hold no state. Splitting ``blocks`` by depth therefore splits
the state the same way: a depth stage owning blocks i..j owns ``state[i:j+1]``
and calls ``block.stream(x, state[k])`` for each of its blocks.

Input is RGB in [0, 1]; the stem normalises with the Kinetics mean/std. This
module imports torch at the top; the registry imports it only inside the
``causal3d_small`` builder.
"""

from __future__ import annotations

import torch
from torch import nn

from blinkflow.models.classes import KINETICS_MEAN, KINETICS_STD

State = list  # list[torch.Tensor | None], one entry per block


class ClipNormalize(nn.Module):
    """(x - mean) / std over the channel axis of (N, 3, T, H, W); the constants are not saved."""

    def __init__(self, mean: tuple = KINETICS_MEAN, std: tuple = KINETICS_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1), persistent=False)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return (clip - self.mean) / self.std


class CausalBlock(nn.Module):
    """Causal temporal conv (kt x 1 x 1) then spatial conv (1 x 3 x 3), with a residual shortcut."""

    def __init__(self, in_channels: int, out_channels: int, time_kernel: int = 3, spatial_stride: int = 2) -> None:
        super().__init__()
        self.time_kernel = time_kernel
        self.temporal = nn.Sequential(
            nn.Conv3d(in_channels, in_channels, (time_kernel, 1, 1), bias=False),
            nn.BatchNorm3d(in_channels),
            nn.ReLU(inplace=True),
        )
        stride = (1, spatial_stride, spatial_stride)
        self.spatial = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=stride, padding=(0, 1, 1), bias=False),
            nn.BatchNorm3d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if in_channels != out_channels or spatial_stride != 1:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm3d(out_channels)
            )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip mode from a zero past: (N, C_in, T, H, W) -> (N, C_out, T, H', W')."""
        return self.stream(x, None)[0]

    def stream(self, x: torch.Tensor, buffer: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue from ``buffer`` (the last kt-1 inputs, or None for zeros) over T >= 1 new steps.

        Returns the T outputs and the new buffer. T = 1 is streaming mode.
        """
        history = self.time_kernel - 1
        if buffer is None:
            buffer = x.new_zeros(x.shape[0], x.shape[1], history, *x.shape[3:])
        padded = torch.cat([buffer, x], dim=2)
        # a copy, so the buffer does not keep the whole clip alive
        new_buffer = padded[:, :, padded.shape[2] - history :].clone()
        out = self.spatial(self.temporal(padded))
        return self.relu(out + self.shortcut(x)), new_buffer


class CausalHead(nn.Module):
    """Per-time-step logits: global average over space, then a linear layer (no mixing over time)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, T, num_classes)."""
        pooled = features.mean(dim=(3, 4)).transpose(1, 2)
        return self.fc(self.dropout(pooled))


class CausalConv3DNet(nn.Module):
    """stem (spatial only) -> ``blocks`` (causal, stateful) -> head (per step); see the module docstring."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, ...] = (32, 64, 96, 128),
        strides: tuple[int, ...] = (2, 2, 2, 1),
        stem_width: int = 16,
        time_kernel: int = 3,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(f"widths {widths} and strides {strides} need the same length")
        self.num_classes = num_classes
        self.stem = nn.Sequential(
            ClipNormalize(),
            nn.Conv3d(3, stem_width, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), bias=False),
            nn.BatchNorm3d(stem_width),
            nn.ReLU(inplace=True),
        )
        channels = (stem_width, *widths)
        self.blocks = nn.ModuleList(
            CausalBlock(channels[i], channels[i + 1], time_kernel, strides[i]) for i in range(len(widths))
        )
        self.head = CausalHead(channels[-1], num_classes, dropout)

    @property
    def receptive_field(self) -> int:
        """How many frames (the current one included) the logits of one step depend on."""
        return 1 + sum(block.time_kernel - 1 for block in self.blocks)

    def init_state(self) -> State:
        return [None] * len(self.blocks)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        """The clip's prediction: logits (N, num_classes) at the last time step."""
        logits, _ = self.forward_steps(clip)
        return logits[:, -1]

    def forward_steps(self, clip: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Per-step logits (N, T, num_classes) of a clip continuing from ``state``, and the new state."""
        state = self.init_state() if state is None else state
        if len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} entries, the network has {len(self.blocks)} blocks")
        x = self.stem(clip)
        new_state = []
        for block, buffer in zip(self.blocks, state):
            x, buffer = block.stream(x, buffer)
            new_state.append(buffer)
        return self.head(x), new_state

    def step(self, frame: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Streaming mode: one frame (N, 3, H, W) -> (logits (N, num_classes), new state)."""
        logits, new_state = self.forward_steps(frame.unsqueeze(2), state)
        return logits[:, 0], new_state
