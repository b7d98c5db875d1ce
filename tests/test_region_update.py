"""The DeepLab trunk recomputed block by block over regions (``models.region_update``): exact where it must
be, and cheaper than the whole frame by what it leaves out."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from blinkflow.models.region_update import merge_rects
from tests.conftest import load_shipped

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = (216, 384)  # the bench's 16:9 frames: 216 rows halve to 27 and then 14, an odd size under SAME padding


@pytest.fixture(scope="module")
def model():
    return load_shipped("segment", "deeplabv3_mobilenet_v2")


def _frames() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    before = torch.rand(1, 3, *SIZE)
    after = before.clone()
    after[..., 60:110, 150:230] = torch.rand(1, 3, 50, 80)  # something new in one place
    return before, after


def test_a_region_over_the_whole_frame_is_the_full_call(model):
    before, after = _frames()
    with torch.inference_mode():
        cached = model.activations(before)
        updated, spent = model.update_activations(after, cached, [(0, SIZE[0], 0, SIZE[1])])
        fresh = model.activations(after)
        assert torch.equal(fresh[-1], model.features(after))  # the last activation is the features
        with FlopCounterMode(display=False) as counter:
            model.features(after)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(updated, fresh))
    assert spent == counter.get_total_flops()  # every conv over every cell, counted as torch counts it


def test_regions_of_the_same_frame_are_computed_as_the_full_call_computes_them(model):
    """With the cache of the same frame, poisoned where the regions are, every region's cells (at the frame's
    edges too, where the full call pads) come back as the full call's: each window is padded as the whole
    frame is, not as a crop, and nothing inside a region is taken from the cache."""
    from blinkflow.models.region_update import level_regions

    before, _ = _frames()
    rects = [(0, 40, 0, 60), (100, 216, 300, 384), (50, 90, 170, 250)]
    with torch.inference_mode():
        cached = model.activations(before)
        poisoned, level = [], 1
        for block, activation in zip(model.backbone, cached):
            level *= 2 if block_strided(block) else 1
            bad = activation.clone()
            for y0, y1, x0, x1 in level_regions(rects, level, tuple(activation.shape[-2:])):
                bad[..., y0:y1, x0:x1] = 7.0
            poisoned.append(bad)
        updated, _ = model.update_activations(before, poisoned, rects)
    assert any(not torch.equal(a, b) for a, b in zip(poisoned, cached))
    assert all(torch.allclose(new, old, atol=1e-4) for new, old in zip(updated, cached))  # float rounding only


def block_strided(block) -> bool:
    from blinkflow.models.region_update import block_stride

    return block_stride(block) > 1


def test_a_change_recomputed_with_a_margin_nears_the_full_call_and_costs_a_share_of_it(model):
    """What is left out is the cells outside the regions that a change reached through the receptive field;
    a margin around the change takes in more of them. On random pixels (every cell as different as can be)
    the features over the change approach the full call's as the margin grows, for a share of its FLOPs."""
    before, after = _frames()
    full = model.region_flops(SIZE) - model.head_flops(SIZE)
    inside = (slice(None), slice(None), slice(4, 7), slice(10, 14))  # feature cells under the change
    ratios, costs = [], []
    with torch.inference_mode():
        cached = model.activations(before)
        fresh = model.features(after)
        for margin in (0, 16, 32):  # the change grown to the stride-16 grid, then by margin pixels
            rect = (48 - margin, 112 + margin, 144 - margin, 240 + margin)
            updated, spent = model.update_activations(after, cached, [rect])
            error, stale = ((a[inside] - fresh[inside]).abs().mean() for a in (updated[-1], cached[-1]))
            ratios.append(float(error / stale))
            area = (rect[1] - rect[0]) * (rect[3] - rect[2]) / (SIZE[0] * SIZE[1])
            assert area < spent / full < 2.5 * area, (margin, spent / full, area)  # the region and each layer's reach
            costs.append(spent)
            assert model.region_flops(SIZE, [rect]) == spent + model.head_flops(SIZE, [rect])
    # measured: 0.74, 0.39, 0.18 of the cached features' error, for 0.12, 0.20 and 0.30 of the trunk's FLOPs
    assert ratios[0] < 0.8 and ratios[2] < 0.2 and ratios == sorted(ratios, reverse=True), ratios
    assert costs == sorted(costs)


def test_rectangles_whose_windows_meet_merge_and_far_ones_stay_apart():
    assert merge_rects([(0, 2, 0, 2), (0, 2, 5, 7)], reach=2) == [(0, 2, 0, 7)]  # 2 + 2 cells of reach overlap
    assert merge_rects([(0, 2, 0, 2), (0, 2, 7, 9)], reach=2) == [(0, 2, 0, 2), (0, 2, 7, 9)]
    assert merge_rects([(0, 2, 0, 2), (0, 2, 5, 7), (10, 12, 5, 7)], reach=1) == [(0, 2, 0, 2), (0, 2, 5, 7), (10, 12, 5, 7)]
