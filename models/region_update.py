"""Recompute a MobileNetV2-style trunk only over regions of a frame, layer by layer.

A partial frame changed in a few regions. Running the trunk on crops around them needs a halo of
context at *every* layer (the crop's border otherwise sees zero padding), so a car's crop costs most of
a 216-row frame. Here each block instead recomputes only its outputs over the regions, reading its
input from the previous frame's activations around them (the cache) with this frame's fresh values
pasted in: the border sees what the frame showed last time, not zeros, and the halo is each layer's own
kernel reach (Skip-Convolutions, DeltaCNN). What is approximate is only that: cells outside the regions
keep their cached values, although a change inside may have reached them through the receptive field.

Outputs over a region are computed exactly as the full-frame call computes them there (TF-``SAME``
padding of the whole frame, not of the window), so a region covering the frame, or a cache of the same
frame, gives the full call's activations (``tests/test_region_update.py``). FLOPs are counted per conv
over the cells it computes, for the cost a partial frame reports.
"""

from __future__ import annotations

import functools
import math
from typing import Any

Rect = tuple[int, int, int, int]  # y0, y1, x0, x1 (end exclusive)

#: cells a window may reach past its region (the dilated 3x3 depthwise convs): regions closer than this
#: at a level merge into one window, so no cell is computed twice
REACH = 2


@functools.lru_cache(maxsize=256)  # a block's structure does not change; a partial frame asks ~200 times
def block_layers(block: Any) -> tuple[list[tuple[Any, Any]], bool]:
    """A block's convs in order as (conv, activation or None), and whether it adds its input (residual)."""
    from torch import nn

    if hasattr(block, "conv"):  # torchvision's InvertedResidual
        layers = []
        for module in block.conv:
            if isinstance(module, nn.Sequential):  # Conv2dNormActivation: conv, norm (Identity once folded), act
                layers.append((module[0], module[2] if len(module) > 2 else None))
            elif isinstance(module, nn.Conv2d):
                layers.append((module, None))
        return layers, bool(block.use_res_connect)
    return [(block[0], block[2] if len(block) > 2 else None)], False  # the stem: Conv2dNormActivation


def block_stride(block: Any) -> int:
    return math.prod(conv.stride[0] for conv, _ in block_layers(block)[0])


def conv_flops(conv: Any) -> int:
    """FLOPs of one output cell (2 per multiply-add, as torch's flop counter counts them)."""
    kh, kw = conv.kernel_size
    return 2 * conv.in_channels // conv.groups * conv.out_channels * kh * kw


def _same_before(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Padding before the first cell under TF's ``SAME`` (the odd pixel goes after)."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


def _needed(conv: Any, out: Rect, size: tuple[int, int]) -> Rect:
    """The input window (unclipped) the conv reads for its outputs over ``out``, on an input of ``size``."""
    (k, _), (s, _), (d, _) = conv.kernel_size, conv.stride, conv.dilation
    span = (k - 1) * d + 1
    py, px = _same_before(size[0], k, s, d), _same_before(size[1], k, s, d)
    y0, y1, x0, x1 = out
    return y0 * s - py, (y1 - 1) * s - py + span, x0 * s - px, (x1 - 1) * s - px + span


def _clipped(rect: Rect, size: tuple[int, int]) -> Rect:
    return max(rect[0], 0), min(rect[1], size[0]), max(rect[2], 0), min(rect[3], size[1])


def _plan(block: Any, size: tuple[int, int], region: Rect) -> list[tuple[Rect, Rect, tuple[int, int]]]:
    """Per conv of ``block``: (the input window it reads, unclipped; its output window; its input size)."""
    layers, _ = block_layers(block)
    sizes = [size]
    for conv, _ in layers:
        sizes.append(tuple(math.ceil(n / conv.stride[0]) for n in sizes[-1]))
    plan, out = [], region
    for (conv, _), in_size in zip(reversed(layers), reversed(sizes[:-1])):
        need = _needed(conv, out, in_size)
        plan.append((need, out, in_size))
        out = _clipped(need, in_size)  # the previous conv computes only cells inside its output
    return plan[::-1]


def region_flops(block: Any, size: tuple[int, int], region: Rect, plan: list | None = None) -> int:
    """FLOPs of ``block`` recomputing its outputs over ``region`` (its input of ``size``; ``plan``: its _plan)."""
    layers, _ = block_layers(block)
    return sum(conv_flops(conv) * (out[1] - out[0]) * (out[3] - out[2])
               for (conv, _), (_, out, _) in zip(layers, plan or _plan(block, size, region)))


def run_region(block: Any, x: Any, region: Rect, plan: list | None = None) -> Any:
    """``block``'s outputs over ``region`` (cells of its output) from its whole input ``x`` (N, C, H, W)."""
    import torch.nn.functional as F

    layers, residual = block_layers(block)
    plan = plan or _plan(block, tuple(x.shape[-2:]), region)
    first = _clipped(plan[0][0], tuple(x.shape[-2:]))
    t = x[..., first[0]:first[1], first[2]:first[3]]
    for (conv, act), (need, _, size) in zip(layers, plan):
        padding = (max(0, -need[2]), max(0, need[3] - size[1]), max(0, -need[0]), max(0, need[1] - size[0]))
        if any(padding):  # the whole frame's zero padding, where the window leaves it
            t = F.pad(t, padding)
        t = F.conv2d(t, conv.weight, conv.bias, stride=conv.stride, dilation=conv.dilation, groups=conv.groups)
        if act is not None:
            t = act(t)
    if residual:
        t = t + x[..., region[0]:region[1], region[2]:region[3]]
    return t


def level_regions(rects: list[Rect], stride: int, size: tuple[int, int], reach: int = REACH) -> list[Rect]:
    """Pixel rectangles as cells of a level at ``stride`` (outward, inside its ``size``), merged where their
    windows (grown by ``reach``) would meet."""
    cells = [_clipped((y0 // stride, -(-y1 // stride), x0 // stride, -(-x1 // stride)), size) for y0, y1, x0, x1 in rects]
    return merge_rects([c for c in cells if c[0] < c[1] and c[2] < c[3]], reach)


def merge_rects(rects: list[Rect], reach: int) -> list[Rect]:
    """Rectangles whose windows (grown by ``reach``) overlap become their bounding box, until none do."""
    merged = list(rects)
    while True:
        pair = next(((i, j) for i in range(len(merged)) for j in range(i + 1, len(merged))
                     if _near(merged[i], merged[j], reach)), None)
        if pair is None:
            return merged
        a, b = merged[pair[0]], merged.pop(pair[1])
        merged[pair[0]] = (min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3]))


def _near(a: Rect, b: Rect, reach: int) -> bool:
    return (a[0] - reach < b[1] + reach and b[0] - reach < a[1] + reach
            and a[2] - reach < b[3] + reach and b[2] - reach < a[3] + reach)


def update(blocks: Any, first: Any, cached: list[Any], rects: list[Rect]) -> tuple[list[Any], int]:
    """The activations of ``blocks`` (a sequence) for a new input ``first`` (N, C, H, W), recomputed over
    ``rects`` (input pixels) at every level and ``cached`` (the previous frame's: one per block) elsewhere.
    Returns the new activations and the FLOPs spent."""
    out, spent, level, x = [], 0, 1, first
    for block, old in zip(blocks, cached):
        level *= block_stride(block)
        new = old.clone()
        for region in level_regions(rects, level, tuple(old.shape[-2:])):
            plan = _plan(block, tuple(x.shape[-2:]), region)
            new[..., region[0]:region[1], region[2]:region[3]] = run_region(block, x, region, plan)
            spent += region_flops(block, tuple(x.shape[-2:]), region, plan)
        out.append(new)
        x = new
    return out, spent


def planned_flops(blocks: Any, size: tuple[int, int], rects: list[Rect]) -> int:
    """What :func:`update` would spend on an input of ``size`` (no tensors: for deciding beforehand)."""
    spent, level = 0, 1
    for block in blocks:
        stride = block_stride(block)
        out_size = tuple(math.ceil(n / stride) for n in size)
        level *= stride
        spent += sum(region_flops(block, size, region) for region in level_regions(rects, level, out_size))
        size = out_size
    return spent


def full_flops(blocks: Any, size: tuple[int, int]) -> int:
    """FLOPs of ``blocks`` on a whole input of ``size``."""
    return planned_flops(blocks, size, [(0, size[0], 0, size[1])])
