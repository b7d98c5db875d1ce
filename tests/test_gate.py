"""The gate and temporal-redundancy skipping: decisions, tiles, motion, audits, adaptation."""

from __future__ import annotations

import re

import av
import numpy as np
import pytest

from blinkflow.config import GateConfig, load_config
from blinkflow.frame import Frame, GateMark
from blinkflow.gate.agreement import box_f1, mask_miou
from blinkflow.gate.carry import CarryOver, compensate
from blinkflow.gate.signal import largest_component, relit
from blinkflow.gate.tiles import tile_runs
from blinkflow.stages.gate import Gate


def frames_of(images, stream="s", start=0):
    return [Frame(stream_id=stream, index=start + i, pts=float(i), image=image) for i, image in enumerate(images)]


def textured(height=48, width=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 200, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))  # blocks survive the 4x downscale


def decisions(frames):
    return [f.results["gate"]["decision"] for f in frames]


# --------------------------------------------------------------------------- frame-level decisions


def test_identical_frames_give_one_processed_frame_per_max_reuse_interval():
    gate = Gate(GateConfig(enabled=True, max_reuse=4))
    frames = gate.process(frames_of([textured()] * 15))
    processed = [f.index for f in frames if not f.is_reused]
    assert processed == [0, 5, 10]
    assert [f.mark.reuse_of for f in frames[1:5]] == [0, 0, 0, 0]
    assert all(f.results["gate"]["keyframe"] == f.gate.reuse_of for f in frames if f.is_reused)
    # the forced refreshes are audits of the keyframe they would have copied
    assert [f.mark.audit_of for f in frames if f.index in (5, 10)] == [0, 5]
    assert frames[5].results["gate"]["reason"] == "max_reuse"


def brightened(image, gain):
    return np.clip(image.astype(np.float32) * gain + 0.5, 0, 255).astype(np.uint8)


def test_relit_fits_the_global_lighting_and_ignores_local_change():
    rng = np.random.default_rng(0)
    reference = rng.uniform(30, 200, (30, 40)).astype(np.float32)
    current = reference * 1.15 + 4
    assert np.abs(relit(reference, current, 20.0) - current).max() < 1e-3
    occluded = current.copy()
    occluded[5:15, 5:15] = 250  # an object entered: not lighting, and it must not bend the fit
    outside = np.ones(current.shape, dtype=bool)
    outside[5:15, 5:15] = False
    assert np.abs(relit(reference, occluded, 20.0) - current)[outside].max() < 0.5
    doubled = reference * 2.0  # beyond MAX_LIGHT_GAIN: change, not lighting
    assert np.array_equal(relit(reference, doubled, 20.0), reference)


@pytest.mark.parametrize("lighting", [True, False])
def test_a_lighting_change_is_not_change_but_an_object_under_it_is(lighting):
    base = textured()
    images = [brightened(base, 1.0 + 0.03 * i) for i in range(8)]  # auto exposure: +3% a frame, +21% in all
    gate = Gate(GateConfig(enabled=True, max_reuse=30, tiles=None, refresh={}, adaptive=False, lighting=lighting))
    frames = gate.process(frames_of(images))
    if lighting:
        assert decisions(frames) == ["keyframe"] + ["reuse"] * 7
        assert max(f.results["gate"]["changed"] for f in frames[1:]) == 0.0
    else:
        assert "keyframe" in decisions(frames)[1:]  # the brightened blocks cross pixel_threshold
    entered = images[-1].copy()
    entered[8:24, 8:32] = 255 - entered[8:24, 8:32]  # an object under the new lighting: real change
    last = gate.process(frames_of([entered], start=8))[0]
    assert last.results["gate"]["decision"] == "keyframe"


@pytest.mark.parametrize("lighting", [True, False])
def test_a_refresh_does_not_pay_for_lighting(lighting):
    images = [brightened(textured(), 1.0 + 0.01 * i) for i in range(6)]  # below the decision, above the refresh's 6
    gate = Gate(GateConfig(enabled=True, max_reuse=30, tiles=[4, 4], tile_margin=1, refresh={"segment": 2},
                           adaptive=False, lighting=lighting))
    frames = gate.process(frames_of(images))
    refreshes = [f for f in frames if f.results["gate"]["decision"] == "refresh"]
    if lighting:
        assert decisions(frames) == ["keyframe"] + ["reuse"] * 5
    else:
        assert refreshes and len(refreshes[0].gate.tiles["changed"]) > 8  # most tiles got brighter by 6 levels


def test_a_cut_forces_a_refresh_even_with_a_permissive_threshold():
    gate = Gate(GateConfig(enabled=True, threshold=0.99, cut_threshold=0.5, max_reuse=100))
    frames = gate.process(frames_of([textured(seed=1)] * 3 + [textured(seed=2)] * 2))
    assert decisions(frames) == ["keyframe", "reuse", "reuse", "keyframe", "reuse"]
    assert frames[3].results["gate"]["reason"] == "cut"
    assert frames[4].gate.reuse_of == 3


def test_a_stream_restart_forces_a_refresh():
    gate = Gate(GateConfig(enabled=True, max_reuse=100))
    image = textured()
    gate.process(frames_of([image] * 4))
    again = gate.process(frames_of([image] * 2))  # indices start over at 0
    assert again[0].results["gate"]["reason"] == "restart"
    assert again[1].gate.reuse_of == 0


def test_codec_noise_is_not_change_but_a_moving_patch_is():
    rng = np.random.default_rng(3)
    image = textured()
    noisy = np.clip(image.astype(int) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    moved = image.copy()
    moved[8:24, 8:24] = 255
    gate = Gate(GateConfig(enabled=True, max_reuse=100))
    frames = gate.process(frames_of([image, noisy, moved]))
    assert frames[1].results["gate"]["changed"] == 0.0
    assert frames[2].results["gate"]["changed"] > 0.05
    assert 0 < frames[2].results["gate"]["largest"] <= frames[2].results["gate"]["changed"] + 1e-9


@pytest.mark.parametrize("downscale", [1, 2, 4, 16, 17])  # 17: block sums overflow 16 bits
def test_gray_signal_is_the_block_mean_of_the_grayscale(downscale):
    """Blocks past the frame's edge are the mean of the pixels they have: the strip past the whole blocks was cut
    off, and change there alone never seen."""
    from blinkflow.gate.signal import gray_signal

    image = np.random.default_rng(downscale).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    gray = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    expected = np.array([[gray[y:y + downscale, x:x + downscale].mean() for x in range(0, 90, downscale)]
                         for y in range(0, 70, downscale)])
    signal = gray_signal(image, downscale)
    assert signal.dtype == np.float32 and signal.shape == expected.shape
    assert np.allclose(signal, expected, atol=1e-3)


def test_change_only_past_the_whole_blocks_is_seen():
    """The signal cut off the rows and columns past the last whole downscale block: change there went unseen."""
    image = np.full((42, 64, 3), 40, np.uint8)  # 42 rows: 2 past the last whole block of 4
    changed = image.copy()
    changed[40:] = 250
    frames = Gate(GateConfig(enabled=True, max_reuse=100)).process(frames_of([image, image, changed]))
    assert [f.results["gate"]["decision"] for f in frames[:2]] == ["keyframe", "reuse"]
    assert frames[2].results["gate"]["decision"] != "reuse" and frames[2].results["gate"]["changed"] > 0


@pytest.mark.parametrize("rows, cols, margin", [(8, 8, 9), (4, 4, 5), (3, 7, 64), (1, 1, 2)])
def test_a_tile_margin_past_the_grid_grows_to_the_whole_grid(rows, cols, margin):
    """margin > the grid's rows or columns failed every changed frame (slices of different sizes)."""
    from blinkflow.gate.tiles import tile_indices

    hit = np.zeros((rows, cols), bool)
    hit[0, 0] = True
    assert tile_indices(hit, margin) == list(range(rows * cols))
    assert tile_indices(hit, 1) == [i for i in range(rows * cols) if i // cols <= 1 and i % cols <= 1]


@pytest.mark.parametrize("shape, grid", [((34, 80), (17, 40)), ((30, 41, 3), (7, 9)), ((5, 6), (3, 4))])
def test_warp_backward_takes_each_pixel_from_where_its_cell_says_it_came(shape, grid):
    from blinkflow.gate.motion import compose_motion, field_at_pixels, warp_backward

    rng = np.random.default_rng(len(shape) * 100 + grid[0])
    image = rng.integers(0, 256, shape).astype(np.float32)
    motion = rng.normal(0, 3, (*grid, 2)).astype(np.float32)
    height, width = shape[:2]
    expected, per_pixel = np.empty_like(image), np.empty((height, width, 2), np.float32)
    for y in range(height):  # the definition, pixel by pixel: nearest cell, nearest source pixel, edges clamped
        for x in range(width):
            per_pixel[y, x] = motion[min(y * grid[0] // height, grid[0] - 1), min(x * grid[1] // width, grid[1] - 1)]
            dx, dy = per_pixel[y, x]
            expected[y, x] = image[int(np.clip(np.rint(y - dy), 0, height - 1)), int(np.clip(np.rint(x - dx), 0, width - 1))]
    assert np.array_equal(field_at_pixels(motion, height, width), per_pixel)
    assert np.array_equal(warp_backward(image, motion), expected)
    step = rng.normal(0, 12, (*grid, 2)).astype(np.float32)  # chaining: step(p) + accumulated(p - step(p)) on cells
    composed = compose_motion(step, motion)
    for y, x in [(0, 0), (grid[0] - 1, grid[1] - 1), (grid[0] // 2, grid[1] // 3)]:
        sy = int(np.clip(np.rint(y - step[y, x, 1] / 8), 0, grid[0] - 1))
        sx = int(np.clip(np.rint(x - step[y, x, 0] / 8), 0, grid[1] - 1))
        assert np.array_equal(composed[y, x], step[y, x] + motion[sy, sx])


def test_largest_component_measures_the_biggest_blob():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:3, 1:3] = True  # 4
    mask[5:10, 4:8] = True  # 20
    mask[11, 0:12] = True  # 12, a long thin line
    assert largest_component(mask) == 20
    assert largest_component(np.zeros((4, 4), dtype=bool)) == 0


# --------------------------------------------------------------------------- tiles


def test_a_local_change_is_a_partial_frame_that_names_its_tiles():
    image = textured()
    changed = image.copy()
    changed[40:48, 52:64] = 250  # inside the bottom-right tile of a 4x4 grid (the blur spreads it 1 cell)
    gate = Gate(GateConfig(enabled=True, tiles=[4, 4], tile_margin=0, max_reuse=100))
    frames = gate.process(frames_of([image, changed, changed]))
    assert decisions(frames) == ["keyframe", "partial", "reuse"]
    assert frames[1].gate.tiles == {"grid": [4, 4], "changed": [15], "base": 0}
    assert frames[0].gate.tiles["changed"] is None  # a keyframe: the segment stage runs in full
    assert frames[2].gate.reuse_of == 1  # the partial frame is the new reference
    # with a margin, the neighbours of the changed tile are recomputed too
    gate = Gate(GateConfig(enabled=True, tiles=[4, 4], tile_margin=1, partial_max=0.5, max_reuse=100))
    frames = gate.process(frames_of([image, changed]))
    assert frames[1].gate.tiles["changed"] == [10, 11, 14, 15]


def test_tiles_with_only_a_few_changed_pixels_are_noise_not_change():
    from blinkflow.gate.tiles import changed_tiles

    mask = np.zeros((16, 16), dtype=bool)  # a 4x4 grid of 4x4-pixel tiles
    mask[0, 0] = True  # tile 0: 1 of 16 pixels, a speck of codec noise
    mask[8:12, 8:11] = True  # tile 10: 12 of 16 pixels, real change
    assert changed_tiles(mask, [4, 4]) == [0, 10]
    assert changed_tiles(mask, [4, 4], min_fraction=0.1) == [10]
    # the margin grows only from the tiles that count
    assert changed_tiles(mask, [4, 4], margin=1, min_fraction=0.1) == [5, 6, 7, 9, 10, 11, 13, 14, 15]
    assert changed_tiles(mask, [4, 4], min_fraction=0.8) == []


def test_a_frame_whose_change_is_all_scattered_noise_is_reused():
    image = textured(128, 128)
    specks = image.copy()
    for y, x in ((12, 12), (12, 76), (76, 12), (76, 76), (44, 108), (108, 44)):  # small bright specks in six tiles
        specks[y : y + 8, x : x + 8] = 255
    plain = Gate(GateConfig(enabled=True, tiles=[4, 4], tile_margin=0, max_reuse=100))
    assert decisions(plain.process(frames_of([image, specks]))) == ["keyframe", "partial"]
    robust = Gate(GateConfig(enabled=True, tiles=[4, 4], tile_margin=0, tile_min_changed=0.3, max_reuse=3))
    frames = robust.process(frames_of([image] + [specks] * 5))
    assert frames[1].results["gate"]["changed"] >= 0.01  # above the frame threshold, yet no tile counts
    assert decisions(frames) == ["keyframe", "reuse", "reuse", "reuse", "keyframe", "reuse"]
    assert frames[4].results["gate"]["reason"] == "max_reuse"  # noise still cannot outlast max_reuse


def test_tile_runs_merge_neighbours_in_a_row():
    assert tile_runs([0, 1, 3, 5, 6], [2, 4]) == [(0, 0, 2), (0, 3, 4), (1, 1, 3)]


@pytest.fixture(scope="module")
def segmenter():
    import torch

    from blinkflow.config import StageConfig
    from blinkflow.stages.segment import Segment, SegmentOptions

    torch.manual_seed(0)
    # specks are cleaned at a size that suits this tiny input (the default, 16x16, would flatten the random map)
    stage = Segment(StageConfig(options=SegmentOptions(input_size=[64, 96], tile_halo=32, min_region=16)))
    stage.setup("cpu")
    with torch.no_grad():  # a random head gives one class everywhere; a louder one gives a varied map
        stage.model.head.weight.normal_(0, 1.0)
        stage.model.head.bias.zero_()
    return stage


def test_tile_recompute_matches_a_full_recompute(segmenter):
    from blinkflow.stages.common import decode_class_map

    image = textured(96, 128, seed=4)
    changed = image.copy()
    changed[60:90, 10:40] = [250, 30, 30]  # inside the bottom-left tiles of a 3x4 grid
    gate = Gate(GateConfig(enabled=True, tiles=[3, 4], tile_margin=0, max_reuse=100))
    frames = segmenter.process(gate.process(frames_of([image, changed])))
    assert frames[1].results["gate"]["decision"] == "partial"
    tiles = frames[1].results["segment"]["tiles"]
    # the gate's changed tiles, and with tile_regions every tile of the regions of the last map they touch
    assert len(frames[1].gate.tiles["changed"]) <= tiles["recomputed"] < 12
    assert tiles["area"] < 1.0
    patched = decode_class_map(frames[1].results["segment"]["mask"]["data"])
    full = frames_of([changed], stream="fresh")[0]
    segmenter.process([full])
    fresh = decode_class_map(full.results["segment"]["mask"]["data"])
    assert len(np.unique(fresh)) > 1
    # the stated tolerance (docs/skipping.md): at least 99% of the pixels agree with a full recompute
    assert (patched == fresh).mean() >= 0.99
    assert mask_miou(patched, fresh) >= 0.95


def test_segment_recomputes_in_full_without_its_cached_base(segmenter):
    image = textured(96, 128, seed=5)
    frame = frames_of([image], stream="nocache", start=3)[0]
    frame.gate = GateMark(tiles={"grid": [3, 4], "changed": [0], "base": 2})  # base 2 was never seen here
    segmenter.process([frame])
    assert "tiles" not in frame.results["segment"]


# --------------------------------------------------------------------------- detect: crop recompute


@pytest.mark.parametrize("model, setting, expected", [
    ("ssdlite320_mobilenet_v3_large", None, False), ("ssd300_vgg16", None, False),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", None, True), ("retinanet_resnet50_fpn_v2", None, True),
    ("ssdlite320_mobilenet_v3_large", True, True), ("fasterrcnn_mobilenet_v3_large_320_fpn", False, False),
])
def test_crop_reuse_defaults_to_what_the_detectors_anchors_allow(model, setting, expected):
    from blinkflow.config import StageConfig
    from blinkflow.stages.detect import Detect, DetectOptions

    cfg = StageConfig(model=model, weights=None, options=DetectOptions(crop_reuse=setting))
    assert Detect.is_temporal(cfg) is expected
    assert Detect(cfg)._crop_reuse is expected


def test_a_crop_detection_supersedes_the_stale_box_of_the_same_object():
    import torch

    from blinkflow.stages.detect import superseded

    carried = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    labels = torch.tensor([1, 2, 1])
    new = torch.tensor([[2, 0, 12, 10]], dtype=torch.float32)  # IoU 0.67 with the first two, 0 with the third
    assert superseded(carried, labels, new, torch.tensor([1])).tolist() == [True, False, False]
    assert superseded(carried, labels, new[:0], torch.tensor([], dtype=torch.int64)).tolist() == [False] * 3
    far = torch.tensor([[7, 0, 17, 10]], dtype=torch.float32)  # IoU 3/17 < 0.3: another object
    assert superseded(carried, labels, far, torch.tensor([1])).tolist() == [False, False, False]


class ColourDetector:
    """A perfect detector for the test scenes: one box per pure colour (red: class 1, green: 2, blue: 3),
    found wherever the image it is given shows it; records the shape of every image."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, images):
        import torch

        out = []
        for image in images:
            self.calls.append(tuple(image.shape))
            boxes, labels = [], []
            for label, channel in ((1, 0), (2, 1), (3, 2)):
                others = [c for c in range(3) if c != channel]
                mask = (image[channel] > 0.9) & (image[others[0]] < 0.2) & (image[others[1]] < 0.2)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
                    labels.append(label)
            out.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64),
                        "scores": torch.full((len(labels),), 0.9)})
        return out


def colour_detector_stage(**options):
    from blinkflow.config import StageConfig
    from blinkflow.stages.detect import Detect, DetectOptions

    options.setdefault("crop_reuse", True)  # the default model is SSDLite, for which null means off
    stage = Detect(StageConfig(weights=None, options=DetectOptions(**options)))
    stage.classes = ["background", "red", "green", "blue"]
    stage._device = "cpu"
    stage.model = ColourDetector()
    return stage


def scene(objects, height=240, width=320):
    image = np.full((height, width, 3), 110, dtype=np.uint8)
    for (x0, y0, x1, y1), colour in objects:
        image[y0:y1, x0:x1] = colour
    return image


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_detect_recomputes_only_the_changed_crop_and_keeps_the_boxes_outside_it():
    first = scene([((20, 20, 50, 50), RED), ((240, 170, 270, 200), GREEN)])
    moved = scene([((20, 20, 50, 50), RED), ((252, 178, 282, 208), GREEN)])  # green moves, red stays
    gate = Gate(GateConfig(enabled=True, max_reuse=100, carry_until={}))
    stage = colour_detector_stage()
    frames = stage.process(gate.process(frames_of([first, moved])))
    assert decisions(frames) == ["keyframe", "partial"]
    result = frames[1].results["detect"]
    x0, y0, x1, y1 = result["crop"]["box"]
    assert stage.model.calls == [(3, 240, 320), (3, y1 - y0, x1 - x0)]  # a full frame, then only the crop
    assert result["crop"]["area"] == pytest.approx((x1 - x0) * (y1 - y0) / (240 * 320), abs=1e-3)
    assert 0 < result["crop"]["area"] <= 0.5
    assert x0 > 50 or y0 > 50  # the red square is outside the crop: its box is carried over
    boxes = dict(zip(result["classes"], result["boxes"]))
    assert boxes == {"red": [20.0, 20.0, 50.0, 50.0], "green": [252.0, 178.0, 282.0, 208.0]}
    # a crop that would cover more than crop_max_area of the frame: the whole frame runs
    stage = colour_detector_stage(crop_max_area=0.05)
    frames = stage.process(Gate(GateConfig(enabled=True, max_reuse=100, carry_until={})).process(frames_of([first, moved])))
    assert "crop" not in frames[1].results["detect"] and stage.model.calls[-1] == (3, 240, 320)


def test_detect_crop_recompute_matches_a_full_recompute_when_the_change_holds_everything():

    first = scene([((41, 31, 71, 61), RED), ((80, 35, 100, 55), BLUE)])
    moved = scene([((51, 36, 81, 66), RED), ((90, 40, 110, 60), BLUE)])  # both inside one crop
    stage = colour_detector_stage()
    frames = stage.process(Gate(GateConfig(enabled=True, max_reuse=100, carry_until={})).process(frames_of([first, moved])))
    patched = frames[1].results["detect"]
    assert "crop" in patched
    fresh = colour_detector_stage().process(frames_of([moved], stream="fresh"))[0].results["detect"]
    assert box_f1(patched, fresh, iou_threshold=0.95) == 1.0
    assert patched["labels"] == fresh["labels"]
    # a detection cut by the crop's edge is a partial view: the stage keeps the carried box instead
    from blinkflow.stages.detect import Detect

    import torch

    boxes = torch.tensor([[10.0, 10.0, 40.0, 40.0], [0.0, 12.0, 20.0, 30.0], [2.0, 2.0, 10.0, 10.0]])
    keep = Detect._keep_new(boxes, (10, 10, 40, 40), (0, 0, 50, 50), Frame("s", 0, 0.0, np.zeros((60, 60, 3), np.uint8)))
    assert keep.tolist() == [True, True, True]
    keep = Detect._keep_new(boxes, (20, 20, 40, 40), (5, 5, 50, 50), Frame("s", 0, 0.0, np.zeros((60, 60, 3), np.uint8)))
    assert keep.tolist() == [True, False, False]


# --------------------------------------------------------------------------- motion


def test_motion_compensation_moves_boxes_and_masks():
    from blinkflow.stages.common import encode_class_map

    class_map = np.zeros((32, 48), dtype=np.uint8)
    class_map[8:16, 8:16] = 2
    keyframe = {
        "detect": {"boxes": [[8.0, 8.0, 16.0, 16.0]], "labels": [2], "classes": ["b"], "scores": [0.9]},
        "segment": {"mask": {"format": "png", "data": encode_class_map(class_map), "height": 32, "width": 48},
                    "classes": ["bg", "a", "b"], "areas": {"bg": 32 * 48 - 64, "b": 64}},
        "action": {"label": "x"},
    }
    motion = np.zeros((4, 6, 2), dtype=np.float32)
    motion[..., 0] = 8.0  # everything moved 8 px to the right
    moved = compensate(keyframe, motion, 32, 48)
    assert moved["detect"]["boxes"] == [[16.0, 8.0, 24.0, 16.0]]
    expected = np.zeros_like(class_map)
    expected[8:16, 16:24] = 2
    from blinkflow.stages.common import class_map_of

    assert mask_miou(class_map_of(moved["segment"]), expected) == 1.0
    assert moved["action"] is keyframe["action"]
    assert compensate(keyframe, np.zeros_like(motion), 32, 48)["detect"] is keyframe["detect"]


def test_motion_compensation_drops_boxes_moved_mostly_out_of_the_frame():
    """A carried car driving out at the top: the detector no longer sees a sliver of it, so neither may the
    carry-over (parking lot, frames 104-111: a zero-height box was carried at full score)."""
    keyframe = {"detect": {"boxes": [[4.0, 0.0, 12.0, 16.0], [24.0, 8.0, 40.0, 24.0], [40.0, 20.0, 48.0, 32.0]],
                           "labels": [3, 2, 1], "classes": ["car", "truck", "person"], "scores": [0.9, 0.8, 0.7]}}
    motion = np.zeros((4, 6, 2), dtype=np.float32)
    motion[..., 1] = -6.0  # everything moved 6 px up
    moved = compensate(keyframe, motion, 32, 48)["detect"]
    # the car keeps 10 of its 16 rows (under MIN_VISIBLE 0.75) and goes with its label, class and score
    assert moved == {"boxes": [[24.0, 2.0, 40.0, 18.0], [40.0, 14.0, 48.0, 26.0]],
                     "labels": [2, 1], "classes": ["truck", "person"], "scores": [0.8, 0.7]}
    motion[..., 1] = -3.0  # 13 of 16 rows left: it stays, clipped
    assert compensate(keyframe, motion, 32, 48)["detect"]["boxes"][0] == [4.0, 0.0, 12.0, 13.0]
    motion[..., 1] = -40.0  # everything gone
    assert compensate(keyframe, motion, 32, 48)["detect"] == {"boxes": [], "labels": [], "classes": [], "scores": []}


def write_pan_video(path, frames=8, step=2, options=None):
    rng = np.random.default_rng(0)
    scene = np.kron(rng.integers(0, 255, (16, 40, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 128, 96, "yuv420p"
        stream.options = options or {"bf": "0", "g": "100"}
        for i in range(frames):
            x = 100 - step * i  # the window slides left over the scene: the content moves right
            image = np.ascontiguousarray(scene[16:112, x : x + 128])
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def decoded_with_motion(clip, **source):
    """The file source's frames of ``clip`` with motion vectors, each with its one-frame field as the gate
    makes it (the source attaches only the decoder's vectors)."""
    from blinkflow.gate.motion import attach_decoder_motion
    from blinkflow.sources import open_sources

    cfg = load_config(data={"sources": [{"type": "file", "path": str(clip), "motion_vectors": True, **source}]})
    frames, decoders = [item for item in open_sources(cfg.sources) if isinstance(item, Frame)], {}
    for frame in frames:
        attach_decoder_motion(frame, decoders)
    return frames


def test_decoder_motion_vectors_follow_a_pan(tmp_path):
    frames = decoded_with_motion(write_pan_video(tmp_path / "pan.mp4"))
    fields = [f.meta["mvs"] for f in frames[1:]]
    assert fields[0].shape == (12, 16, 2)
    dx = np.median([np.median(f[2:-2, 2:-2, 0]) for f in fields])
    dy = np.median([np.median(f[2:-2, 2:-2, 1]) for f in fields])
    assert dx == pytest.approx(2.0, abs=0.5) and abs(dy) < 0.5


def write_smooth_pan(path, options, frames=21, width=160, height=120, step=2):
    """A pan over smooth texture (content moves ``step`` px left a frame): x264 predicts most blocks
    of its B-frames from both directions, so every reference distance shows in the vectors."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    texture = np.kron(rng.integers(0, 255, (height // 4, (width + step * frames) // 4)), np.ones((4, 4)))
    texture = ndimage.gaussian_filter(texture, 1.5).astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.options = width, height, "yuv420p", options
        for i in range(frames):
            image = np.repeat(texture[:, step * i : step * i + width, None], 3, axis=2)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


B_RUNS = {  # x264 options and the picture types they give the pan (1 I, 2 P, 3 B)
    "b-pyramid": ({"bf": "3", "b-adapt": "0", "x264-params": "b-pyramid=normal"}, [1, 3, 3, 3, 2, 3, 3, 3, 2]),
    "no pyramid": ({"bf": "3", "b-adapt": "0", "x264-params": "b-pyramid=none"}, [1, 3, 3, 3, 2, 3, 3, 3, 2]),
    "runs of 2": ({"bf": "2", "b-adapt": "0"}, [1, 3, 3, 2, 3, 3, 2]),
    "runs that change": ({"bf": "5"}, [1, 3, 3, 3, 2, 3, 3, 3, 3, 3, 2, 3, 3, 3, 3, 2]),  # runs of 3, 5, 4
}


@pytest.mark.parametrize("encoding", list(B_RUNS))
def test_decoder_motion_with_b_frames_gives_every_frame_its_own_motion(tmp_path, encoding):
    """FFmpeg's vectors tell only the direction of their reference: the distance depends on where the
    B-frame lies in its run and on whether the middle B-frame is a reference (x264's default
    b-pyramid). Every frame's field must be one frame of the pan, whatever the run."""
    options, kinds = B_RUNS[encoding]
    clip = write_smooth_pan(tmp_path / "pan.mp4", {**options, "g": "100"})
    with av.open(str(clip)) as container:
        decoded = [int(frame.pict_type) for frame in container.decode(video=0)]
    assert decoded[: len(kinds)] == kinds  # the structure this case is about
    frames = decoded_with_motion(clip)
    dx = [float(np.median(f.meta["mvs"][2:-2, 2:-2, 0])) for f in frames[1:]]
    assert dx == pytest.approx([-2.0] * len(dx), abs=0.5)


def test_decoder_motion_is_the_same_on_every_decode(tmp_path):
    """FFmpeg's frame-threaded H.264 decoding exported a B-frame's vectors incomplete about one decode in
    three on this clip; the file source decodes with slice threads when it exports vectors."""
    clip = write_smooth_pan(tmp_path / "pan.mp4", {**B_RUNS["runs of 2"][0], "g": "100"})
    decodes = [[f.meta["mvs"] for f in decoded_with_motion(clip) if "mvs" in f.meta] for _ in range(6)]
    assert len(decodes[0]) == 21  # every frame, the first (an I-frame) with zero motion
    for other in decodes[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(decodes[0], other, strict=True))


class _Retyped:
    """A decoded frame under another picture type (FFmpeg's H.264 decoder makes no S/SP/SI/BI frames)."""

    def __init__(self, frame, pict_type):
        self.frame, self.pict_type = frame, pict_type

    def __getattr__(self, name):
        return getattr(self.frame, name)


@pytest.mark.parametrize(("kind", "as_kind"), [(2, 4), (2, 6), (1, 5), (3, 7)])
def test_decoder_motion_reads_the_rarer_picture_types_by_their_role(tmp_path, kind, as_kind):
    """S (MPEG-4 global motion) and SP frames are predicted from the last anchor like P, SI is intra like I, and
    BI (VC-1) is a B-frame coded without vectors: each reads as its role (the same fields as the frame under
    its own type), not as zero motion."""
    from blinkflow.gate.motion import DecoderMotion, decoder_vectors

    clip = write_smooth_pan(tmp_path / "pan.mp4", {**B_RUNS["runs of 2"][0], "g": "100"})
    with av.open(str(clip)) as container:
        container.streams.video[0].codec_context.options = {"flags2": "+export_mvs"}
        container.streams.video[0].thread_type = "SLICE"
        decoded = list(container.decode(video=0))
    plain, retyped = DecoderMotion(), DecoderMotion()
    fields = [(plain.step(decoder_vectors(f)),
               retyped.step(decoder_vectors(_Retyped(f, as_kind) if int(f.pict_type) == kind else f))) for f in decoded]
    assert sum(int(f.pict_type) == kind for f in decoded) >= 1
    assert all(np.array_equal(expected, got) for expected, got in fields)
    assert np.median(fields[-1][1][2:-2, 2:-2, 0]) == pytest.approx(-2.0, abs=0.5)


def _source_frames(clip, **source):
    from blinkflow.sources import open_sources

    cfg = load_config(data={"sources": [{"type": "file", "path": str(clip), "motion_vectors": True, **source}]})
    return [item for item in open_sources(cfg.sources) if isinstance(item, Frame)]


def test_the_source_attaches_only_the_decoders_vectors_packed(tmp_path):
    """The decoder thread makes no field: each frame carries its picture type and its vectors, packed to the
    fields the motion reads (18 bytes a vector, not PyAV's 40), and pickles small for Ray."""
    import pickle

    from blinkflow.gate.motion import PACKED_VECTORS, VECTORS_KEY

    clip = write_smooth_pan(tmp_path / "pan.mp4", {**B_RUNS["runs of 2"][0], "g": "100"})
    with av.open(str(clip)) as container:
        container.streams.video[0].codec_context.options = {"flags2": "+export_mvs"}
        container.streams.video[0].thread_type = "SLICE"
        decoded = [(int(f.pict_type), s.to_ndarray().copy() if (s := f.side_data.get("MOTION_VECTORS")) else None)
                   for f in container.decode(video=0)]
    frames = _source_frames(clip)
    assert len(frames) == len(decoded) and not any("mvs" in f.meta for f in frames)
    for frame, (picture, vectors) in zip(frames, decoded):
        [entry] = frame.meta[VECTORS_KEY]
        assert (entry.picture, entry.size, entry.out) == (picture, (160, 120), (160, 120))
        if vectors is None:
            assert entry.vectors is None
            continue
        assert entry.vectors.dtype == PACKED_VECTORS and PACKED_VECTORS.itemsize == 18
        for name in PACKED_VECTORS.names:
            assert np.array_equal(entry.vectors[name], vectors[name]), name
        assert len(pickle.dumps(frame.meta)) < 18 * len(vectors) + 1000  # the rest: the dtype, the record
    assert sum(entry.vectors is not None for f in frames for entry in f.meta[VECTORS_KEY]) >= 15


def test_reading_the_vectors_leaves_each_decoded_frame_free_at_once(tmp_path):
    """PyAV caches ``frame.side_data`` on the frame and the container holds the frame: read through it, every
    decoded frame waited for the cyclic garbage collector with its decoder buffers (a quarter of the decode
    rate). decoder_vectors reads around it: no cycle is left behind."""
    import gc

    from blinkflow.gate.motion import decoder_vectors

    clip = write_pan_video(tmp_path / "pan.mp4")

    def cycles_left(read):
        gc.collect()
        gc.disable()
        try:
            with av.open(str(clip)) as container:
                container.streams.video[0].codec_context.options = {"flags2": "+export_mvs"}
                vectors = [read(frame) for frame in container.decode(video=0)]
        finally:
            gc.enable()
        return vectors, gc.collect()

    vectors, left = cycles_left(decoder_vectors)
    assert left == 0 and sum(v.vectors is not None for v in vectors) >= 6
    assert cycles_left(lambda frame: frame.side_data.get("MOTION_VECTORS") is not None)[1] > 0  # what it avoids


def test_the_gate_turns_the_vectors_into_fields_only_when_it_moves_along_them(tmp_path):
    """With motion: mvs the gate gives every frame its field (failed frames and a replayed stream too), the same
    fields as the decoder's motion over the decoded frames; with motion: off it computes none."""
    from blinkflow.gate.motion import VECTORS_KEY

    clip = write_smooth_pan(tmp_path / "pan.mp4", {**B_RUNS["b-pyramid"][0], "g": "100"})
    expected = [f.meta["mvs"] for f in decoded_with_motion(clip)]
    gate = Gate(GateConfig(enabled=True, motion="mvs"))
    for _ in range(2):  # the second decode restarts the stream's indices: a fresh decoder state
        frames = _source_frames(clip)
        frames[3].fail("detect", "boom")  # the gate makes no decision on it, but the decoder's state moves on
        gate.process(frames)
        assert all(VECTORS_KEY not in f.meta for f in frames)
        assert all(np.array_equal(f.meta["mvs"], field) for f, field in zip(frames, expected, strict=True))
    assert np.median(expected[-1][2:-2, 2:-2, 0]) == pytest.approx(-2.0, abs=0.5)
    frames = Gate(GateConfig(enabled=True, motion="off")).process(_source_frames(clip))
    assert not any("mvs" in f.meta for f in frames) and all(VECTORS_KEY in f.meta for f in frames)


def test_frames_dropped_by_fps_bring_their_vectors_to_the_next_kept_frame(tmp_path):
    """At half the clip's rate each kept frame carries the vectors of the frame dropped before it, and its field
    is the motion of both (two frames of the pan)."""
    from blinkflow.gate.motion import VECTORS_KEY

    clip = write_smooth_pan(tmp_path / "pan.mp4", {**B_RUNS["runs of 2"][0], "g": "100"})
    frames = _source_frames(clip, fps=12.5)
    assert [len(f.meta[VECTORS_KEY]) for f in frames] == [1] + [2] * (len(frames) - 1)
    Gate(GateConfig(enabled=True, motion="mvs")).process(frames)
    dx = [float(np.median(f.meta["mvs"][2:-2, 2:-2, 0])) for f in frames[1:]]
    assert dx == pytest.approx([-4.0] * len(dx), abs=0.75)


def test_a_pan_is_reused_with_motion_compensation(tmp_path):
    clip = write_pan_video(tmp_path / "pan.mp4", frames=6)
    gate = {"enabled": True, "threshold": 0.05, "max_reuse": 100}
    results = {}
    for motion in ("off", "mvs"):
        cfg = load_config(data={"sources": [{"type": "file", "path": str(clip), "motion_vectors": True}],
                                "gate": dict(gate, motion=motion), "stages": {"chaos": {}}})
        results[motion] = run_local(cfg)
    assert sum(r.outcome.value == "reused" for r in results["off"]) < sum(r.outcome.value == "reused" for r in results["mvs"])
    assert any(r.results["gate"].get("compensated") for r in results["mvs"])


# --------------------------------------------------------------------------- agreement and the audit


def test_box_f1_on_constructed_cases():
    a = {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [1, 1]}
    assert box_f1(a, a) == 1.0
    assert box_f1({"boxes": []}, {"boxes": []}) == 1.0
    assert box_f1(a, {"boxes": []}) == 0.0
    one = {"boxes": [[0, 0, 10, 10]], "labels": [1]}
    assert box_f1(a, one) == pytest.approx(2 * 1 / (2 + 1))
    shifted = {"boxes": [[4, 0, 14, 10]], "labels": [1]}  # IoU 6/14 < 0.5
    assert box_f1(one, shifted) == 0.0
    nudged = {"boxes": [[2, 0, 12, 10]], "labels": [1]}  # IoU 8/12 >= 0.5
    assert box_f1(one, nudged) == 1.0
    assert box_f1(one, {"boxes": [[0, 0, 10, 10]], "labels": [2]}) == 0.0  # same place, other class


def test_mask_miou_on_constructed_cases():
    a = np.zeros((4, 4), dtype=np.uint8)
    a[:, 2:] = 1
    assert mask_miou(a, a) == 1.0
    b = np.zeros((4, 4), dtype=np.uint8)
    b[:, 3:] = 1
    # background: 8 shared of 12 united; class 1: 4 of 8
    assert mask_miou(a, b) == pytest.approx((8 / 12 + 4 / 8) / 2)


class _Out:
    """A frame as OrderedOutput hands it to the carry-over."""

    @staticmethod
    def frame(index, results, mark=None):
        frame = Frame(stream_id="s", index=index, pts=0.0, image=np.zeros((32, 48, 3), dtype=np.uint8))
        frame.results, frame.gate = results, mark
        return frame


def test_an_audit_is_scored_and_its_agreement_goes_back_after_the_lag():
    carry = CarryOver(enabled=True, motion="off", lag=3, adaptive=True)
    keyframe = {"gate": {"decision": "keyframe"}, "detect": {"boxes": [[0, 0, 10, 10], [20, 20, 30, 30]], "labels": [1, 1]}}
    fresh = {"gate": {"decision": "keyframe", "reason": "audit"}, "detect": {"boxes": [[0, 0, 10, 10]], "labels": [1]}}
    audit = _Out.frame(5, fresh, GateMark(audit_of=0))
    carry.observe(audit, keyframe)
    assert audit.results["audit"] == {"agreement": pytest.approx(2 / 3), "boxes_f1": pytest.approx(2 / 3), "audit_of": 0}
    early, due = _Out.frame(7, {}), _Out.frame(8, {})
    assert not carry.ready_for(early, next_index=4) and carry.ready_for(early, next_index=5)
    carry.attach_feedback([early, due])
    assert early.mark.feedback is None
    assert due.gate.feedback == [(5, pytest.approx(2 / 3))]
    later = _Out.frame(9, {})
    carry.attach_feedback([later])
    assert later.mark.feedback is None  # each audit goes back once


def test_the_adaptive_threshold_moves_in_the_right_direction():
    cfg = GateConfig(enabled=True, adaptive=True, threshold=0.02, threshold_min=0.001, threshold_max=0.2,
                     max_reuse=2, agreement_target=0.95, adapt_up=1.5, adapt_down=0.5)
    gate = Gate(cfg)
    image = textured()
    frames = gate.process(frames_of([image] * 4))
    assert frames[3].gate.audit_of == 0  # the max_reuse refresh is an audit
    good = frames_of([image], start=4)[0]
    good.gate = GateMark(feedback=[(3, 1.0)])
    gate.process([good])
    # met the target at no change at all: that shows nothing about reusing more change, so no raise (audits of
    # an empty room used to double the threshold until the people who walked in later were reused)
    assert good.results["gate"]["threshold"] == pytest.approx(0.02)
    gate.policy.streams["s"].pending_audits[40] = 0.018
    good = frames_of([image], start=5)[0]
    good.gate = GateMark(feedback=[(40, 1.0)])
    gate.process([good])
    assert good.results["gate"]["threshold"] == pytest.approx(0.027)  # up to adapt_up x the change it held at
    gate.policy.streams["s"].pending_audits[42] = 0.5
    good = frames_of([image], start=6)[0]
    good.gate = GateMark(feedback=[(42, 1.0)])
    gate.process([good])
    assert good.results["gate"]["threshold"] == pytest.approx(0.0405)  # at most adapt_up x the threshold
    gate.policy.streams["s"].threshold = 0.02
    bad = frames_of([image], start=7)[0]
    bad.gate = GateMark(feedback=[(3, 0.5)])  # (an audit reported twice still counts, without its change)
    gate.process([bad])
    # missed it: skip less, but a miss at a change the configured threshold reuses anyway (drift below the
    # signal) does not take the threshold below the configured one
    assert bad.results["gate"]["threshold"] == pytest.approx(0.02)
    state = gate.policy.streams["s"]

    def miss_at(index, change):  # an audit of a frame that changed by ``change`` missed the target
        state.pending_audits[index] = change
        frame = frames_of([image], start=index)[0]
        frame.gate = GateMark(feedback=[(index, 0.0)])
        gate.process([frame])
        return frame.results["gate"]["threshold"]

    assert miss_at(8, 0.005) == pytest.approx(0.02)
    assert miss_at(9, 0.03) == pytest.approx(0.01)  # real change above the configured threshold: below it
    thresholds = [miss_at(index, 0.03) for index in range(10, 22)]
    assert thresholds[-1] == cfg.threshold_min  # never below threshold_min


def test_a_non_adaptive_gate_keeps_its_threshold():
    gate = Gate(GateConfig(enabled=True, threshold=0.02))
    frame = frames_of([textured()])[0]
    frame.gate = GateMark(feedback=[(0, 0.1)])
    gate.process([frame])
    assert frame.results["gate"]["threshold"] == 0.02


# --------------------------------------------------------------------------- per-stage refresh


def drifting(count, step=1, height=48, width=64):
    """A dark square moving ``step`` pixels a frame over a flat background: too little change per frame
    for the gate's pixel signal to see, so it accumulates below the threshold."""
    images = []
    for index in range(count):
        image = np.full((height, width, 3), 120, dtype=np.uint8)
        x = 8 + step * index
        image[16:32, x:x + 16] = 90
        images.append(image)
    return images


def test_a_stage_past_its_refresh_bound_runs_alone_on_a_frame_the_gate_would_reuse():
    gate = Gate(GateConfig(enabled=True, threshold=0.5, max_reuse=10, refresh={"segment": 3}, tiles=None))
    frames = gate.process(frames_of(drifting(12)))
    assert decisions(frames) == ["keyframe", "reuse", "reuse", "reuse", "refresh", "reuse", "reuse", "reuse",
                                 "refresh", "reuse", "reuse", "keyframe"]
    refresh = frames[4]
    assert refresh.gate.refresh == ["segment"] and refresh.gate.audit_of == 0
    assert refresh.results["gate"]["stages"] == ["segment"] and refresh.results["gate"]["keyframe"] == 0
    assert refresh.runs("segment") and not refresh.runs("detect") and not refresh.runs("action")
    assert [f.mark.reuse_of for f in frames[5:8]] == [4, 4, 4]  # later frames copy the refresh
    assert frames[8].gate.audit_of == 4
    # the other stages were carried over through both refreshes: max_reuse still bounds them
    assert frames[11].results["gate"]["reason"] == "max_reuse" and frames[11].gate.audit_of == 8


def test_a_refresh_recomputes_only_the_tiles_that_drifted_and_keeps_the_frame_reference():
    from blinkflow.gate.signal import gray_signal
    from blinkflow.gate.tiles import tile_rects

    # no uncertain audits: they would reset the reference before the drift adds up to a partial frame
    gate = Gate(GateConfig(enabled=True, threshold=0.01, max_reuse=30, refresh={"segment": 2}, tiles=[4, 4],
                           tile_margin=0, audit_uncertain=0.0))
    images = drifting(14, height=96, width=128)
    first = gate.process(frames_of(images[:4]))
    assert decisions(first) == ["keyframe", "reuse", "reuse", "refresh"]
    assert first[3].gate.tiles["changed"] == [0, 4]  # the tiles the square drifted in, no others
    assert first[3].gate.tiles["base"] == 0 and "bases" not in first[3].gate.tiles  # the segmenter's cache
    state = gate.policy.streams["s"]
    key, now = gray_signal(images[0], 4), gray_signal(images[3], 4)
    assert np.array_equal(state.reference, key)  # what the carried-over detector still represents
    expected = key.copy()
    for tile in (0, 4):
        y0, y1, x0, x1 = tile_rects([4, 4], *key.shape)[tile]
        expected[y0:y1, x0:x1] = now[y0:y1, x0:x1]
    assert np.array_equal(state.stage_refs["segment"], expected)
    rest = gate.process(frames_of(images[4:], start=4))
    second = next(f for f in rest if f.results["gate"]["decision"] == "refresh")
    assert second.gate.tiles["bases"] == {"segment": 3}  # it patches the map of its own last run
    # the drift keeps adding up against the frame reference: the detector gets its partial frame
    assert "partial" in decisions(rest) and "refresh" in decisions(rest)


def with_flicker(images, seed=0):
    """Codec-like noise in the bottom-right quarter: +-8 gray levels per 8x8 block, drawn anew each frame,
    so it never adds up, and stays below the decision's pixel threshold."""
    rng = np.random.default_rng(seed)
    out = []
    for image in images:
        noisy = image.astype(np.int16)
        blocks = rng.integers(-8, 9, (6, 8, 1))
        noisy[48:96, 64:128] += np.kron(blocks, np.ones((8, 8, 1), dtype=np.int16))
        out.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("factor, flicker_refreshed", [(2.0, False), (0.0, True)])
def test_a_refresh_leaves_out_tiles_whose_change_is_noise_that_does_not_add_up(factor, flicker_refreshed):
    gate = Gate(GateConfig(enabled=True, threshold=0.05, max_reuse=30, refresh={"segment": 3}, tiles=[4, 4],
                           tile_margin=0, refresh_noise_factor=factor))
    frames = gate.process(frames_of(with_flicker(drifting(9, height=96, width=128))))
    refreshes = [f for f in frames if f.results["gate"]["decision"] == "refresh"]
    assert [f.index for f in refreshes] == [4, 8]
    flicker_tiles = {10, 11, 14, 15}
    for refresh in refreshes:
        tiles = set(refresh.gate.tiles["changed"])
        assert {0, 4} <= tiles  # the drifting square is always refreshed
        assert bool(tiles & flicker_tiles) == flicker_refreshed


@pytest.mark.parametrize("tiles", [[8, 8], None])
def test_identical_frames_are_never_refreshed(tiles):
    gate = Gate(GateConfig(enabled=True, max_reuse=6, refresh={"segment": 2}, tiles=tiles))
    frames = gate.process(frames_of([textured()] * 14))
    assert [f.index for f in frames if not f.is_reused] == [0, 7]
    assert "refresh" not in decisions(frames)


def test_a_partial_frame_builds_on_each_stages_own_last_run():
    gate = Gate(GateConfig(enabled=True, threshold=0.01, max_reuse=20, refresh={"segment": 2}, tiles=[4, 4]))
    images = drifting(4)
    moved = images[3].copy()
    moved[36:48, 48:64] = 250  # a real local change in one corner
    frames = gate.process(frames_of(images + [moved]))
    assert decisions(frames) == ["keyframe", "reuse", "reuse", "refresh", "partial"]
    tiles = frames[4].gate.tiles
    assert tiles["base"] == 0  # the last frame every stage ran on: the detector's cache
    assert tiles["bases"] == {"segment": 3}  # the segmenter's cache is the refresh


def test_adapt_bounds_moves_the_refreshed_stages_bound():
    cfg = GateConfig(enabled=True, adaptive=True, adapt_bounds=True, threshold=0.5, threshold_max=1.0, max_reuse=20,
                     refresh={"segment": 4}, tiles=None, agreement_target=0.95, adapt_up=1.25)
    gate = Gate(cfg)
    frames = gate.process(frames_of(drifting(6)))
    assert decisions(frames)[5] == "refresh"
    bad = frames_of(drifting(7)[6:], start=6)[0]
    bad.gate = GateMark(feedback=[(5, 0.5)])  # 5 frames stale: 0.1 lost a frame, far over the budget
    gate.process([bad])
    state = gate.policy.streams["s"]
    assert state.bounds == {"segment": 3} and state.threshold == 0.5  # missed: one frame less
    images = drifting(12)
    later = gate.process(frames_of(images[7:10], start=7))
    assert decisions(later) == ["reuse", "reuse", "refresh"]  # stale for 3 frames now (6 was one of them)
    good = frames_of(images[10:11], start=10)[0]
    good.gate = GateMark(feedback=[(9, 1.0)])
    gate.process([good])
    assert state.bounds == {"segment": 4}  # met: one frame more
    # every stage passing, but the refresh held at a change far below the threshold: no evidence for more
    assert state.pending_audits == {} and state.threshold == pytest.approx(0.5)
    assert frames[0].results["gate"]["bounds"] == {"segment": 4}  # each result says the bounds at its frame
    assert bad.results["gate"]["bounds"] == {"segment": 3} and good.results["gate"]["bounds"] == {"segment": 4}


def _refreshed_once(bound: int, score: float, **cfg_overrides):
    """A gate whose segment refresh (``bound + 1`` frames stale) came back with ``score``."""
    cfg = GateConfig(enabled=True, adaptive=True, threshold=0.5, threshold_max=1.0, max_reuse=30,
                     refresh={"segment": bound}, tiles=None, agreement_target=0.95, **cfg_overrides)
    gate = Gate(cfg)
    images = drifting(bound + 3)
    frames = gate.process(frames_of(images[: bound + 2]))
    assert decisions(frames)[bound + 1] == "refresh"
    feedback = frames_of(images[bound + 2:], start=bound + 2)[0]
    feedback.gate = GateMark(feedback=[(bound + 1, score)])
    gate.process([feedback])
    return gate


@pytest.mark.parametrize("score, bound_after, raised", [
    (0.93, 5, True),   # the stalest frame misses 0.95, but the span averages about 0.97: one frame more
    (0.91, 4, True),   # the span averages 0.964 and one frame more would leave too little slack: stays
    (0.85, 3, False),  # the span averages 0.94: one frame less, and the threshold stays
])
def test_a_refresh_audit_judges_the_span_it_ends_not_its_stalest_frame(score, bound_after, raised):
    state = _refreshed_once(4, score, adapt_up=2.0).policy.streams["s"]
    assert state.bounds == {"segment": bound_after}
    assert state.passing == {"segment": raised}
    # it held at a drift far below the threshold, which shows nothing about more change: no raise either way
    assert state.threshold == pytest.approx(0.5)


def test_adapt_bounds_grows_the_masks_bound_to_four_times_the_configured_one_and_the_boxes_to_twice():
    gate = _refreshed_once(2, 1.0)
    state = gate.policy.streams["s"]
    assert state.bounds == {"segment": 3}
    for _ in range(10):  # more perfect audits: the bound stops at four times the configured one
        gate.policy._adapt_bounds(state, {"segment": state.bounds["segment"] + 1}, 1.0)
    assert state.bounds == {"segment": 8}
    # the detector's bound stops at twice: a small new object under the carry band waits for its refresh
    gate.cfg.refresh["detect"], state.bounds["detect"] = 2, 2
    for _ in range(10):
        gate.policy._adapt_bounds(state, {"detect": state.bounds["detect"] + 1}, 1.0)
    assert state.bounds["detect"] == 4
    assert _refreshed_once(2, 1.0, adapt_bounds=False).policy.streams["s"].bounds == {"segment": 2}  # as configured


def test_a_refresh_audit_raises_the_threshold_only_when_every_stage_passes_and_a_miss_leaves_it():
    cfg = GateConfig(enabled=True, adaptive=True, threshold=0.2, threshold_max=1.0, max_reuse=20,
                     refresh={"segment": 2, "detect": 3}, tiles=None, adapt_bounds=False, agreement_target=0.95, adapt_up=2.0)
    gate = Gate(cfg)
    frames = frames_of(drifting(10))
    frames[5].gate = GateMark(feedback=[(3, 0.5)])  # the segmenter's refresh at 3 missed
    frames[7].gate = GateMark(feedback=[(4, 1.0)])  # the detector's at 4 met, but the segmenter's last one missed
    frames[9].gate = GateMark(feedback=[(6, 1.0)])  # the segmenter's at 6 met: every stage passes now
    state = gate.policy.streams
    gate.process(frames[:7])
    state["s"].pending_audits[4] = 0.19  # as if the refreshes were seen at a change near the threshold
    gate.process(frames[7:9])
    state["s"].pending_audits[6] = 0.19
    gate.process(frames[9:])
    thresholds = [f.results["gate"]["threshold"] for f in frames]
    assert [f.mark.refresh for f in frames[3:7]] == [["segment"], ["detect"], None, ["segment"]]
    # a miss is drift below the pixel signal, which a lower threshold cannot see: the threshold stays
    assert thresholds[:9] == [0.2] * 9
    assert thresholds[9] == pytest.approx(0.38)  # adapt_up x the change the audit held at (less than 2 x 0.2)
    assert gate.policy.streams["s"].bounds == {"segment": 2, "detect": 3}  # without adapt_bounds, as configured


def _segment_result(class_map):
    from blinkflow.stages.common import encode_class_map

    return {"mask": {"format": "png", "data": encode_class_map(class_map), "height": class_map.shape[0],
                     "width": class_map.shape[1]}, "classes": ["background", "thing"]}


def test_a_refresh_audit_scores_only_the_stages_that_ran():
    carry = CarryOver(motion="off", lag=1)
    keyframe = {"detect": {"boxes": [[0, 0, 10, 10]], "labels": [1]}, "segment": _segment_result(np.zeros((8, 8), np.uint8))}
    fresh_map = np.zeros((8, 8), np.uint8)
    fresh_map[:4] = 1
    refresh = _Out.frame(4, {"gate": {"decision": "refresh", "stages": ["segment"]},
                             "segment": _segment_result(fresh_map)}, GateMark(audit_of=0, refresh=["segment"]))
    carry.fill(refresh, keyframe)
    assert refresh.results["detect"] == keyframe["detect"]  # carried: the detector did not run
    assert refresh.results["segment"]["mask"] != keyframe["segment"]["mask"]  # fresh: kept
    carry.observe(refresh, keyframe)
    audit = refresh.results["audit"]
    assert set(audit) == {"agreement", "mask_iou", "audit_of"}  # no box F1 of boxes that were only copied
    assert audit["agreement"] == pytest.approx(mask_miou(np.zeros((8, 8), np.uint8), fresh_map))
    assert carry.stats["s"].refreshed == 1


# --------------------------------------------------------------------------- end to end


def run_local(cfg):
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink

    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    return sink.results


def test_local_run_audits_adapts_and_reports_where_results_came_from(tmp_path):
    from tests.test_runner_local import write_static_video

    clip = tmp_path / "static.mp4"
    write_static_video(clip, frames=24)
    cfg = load_config(data={
        "sources": [{"type": "file", "path": str(clip)}],
        "gate": {"enabled": True, "max_reuse": 3, "adaptive": True, "audit_lag": 4, "threshold": 0.01, "adapt_up": 2.0,
                 "batch": 2},
        "stages": {"segment": {"batch": 2, "options": {"input_size": [32, 32]}}},
    })
    results = run_local(cfg)
    audits = [r for r in results if "audit" in r.results]
    assert [r.index for r in audits] == [4, 8, 12, 16, 20]
    assert all(r.results["audit"]["agreement"] == 1.0 for r in audits)  # identical frames agree
    assert all(r.results["gate"]["keyframe"] == r.reuse_of for r in results if r.outcome.value == "reused")
    thresholds = [r.results["gate"]["threshold"] for r in results]
    # the audits met the target at no change at all, which shows nothing about reusing more: the threshold stays
    assert thresholds == [0.01] * len(results)
    assert not any("audit" in r.results for r in results if r.outcome.value == "reused")  # never carried over


def static_scene_config(**gate):
    """16 frames of a small static scene; most of its drift is the scene's lighting, which these tests keep
    visible to the gate (``lighting: false``) so that the refreshes have something to refresh."""
    gate = {"lighting": False, **gate}
    return load_config(data={
        "sources": [{"type": "synthetic", "seed": 7, "width": 96, "height": 64, "num_frames": 16, "num_objects": 2,
                     "action": "static", "static_camera": True}],
        "gate": {"enabled": True, "refresh": {"segment": 2}, "max_reuse": 8, **gate},
        "stages": {"detect": {"batch": 2}, "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]}}},
    })


def test_on_a_refresh_only_the_segmenter_runs_and_the_boxes_are_carried(monkeypatch):
    from blinkflow.stages.detect import Detect
    from blinkflow.stages.segment import Segment

    ran = {"detect": [], "segment": []}
    for stage, cls, method in (("detect", Detect, "_run_full"), ("detect", Detect, "_run_crop"),
                               ("segment", Segment, "_run_full"), ("segment", Segment, "_run_patch")):
        original = getattr(cls, method)

        def counting(self, frames, *args, _original=original, _stage=stage):
            ran[_stage].extend(f.index for f in (frames if isinstance(frames, list) else [frames]))
            return _original(self, frames, *args)

        monkeypatch.setattr(cls, method, counting)
    results = run_local(static_scene_config())
    by_decision = {d: [r.index for r in results if r.results["gate"]["decision"] == d]
                   for d in ("keyframe", "refresh", "reuse", "partial")}
    assert by_decision["refresh"], "the slowly drifting scene must reach the segmenter's bound"
    assert sorted(ran["segment"]) == sorted(by_decision["keyframe"] + by_decision["refresh"] + by_decision["partial"])
    assert sorted(ran["detect"]) == sorted(by_decision["keyframe"] + by_decision["partial"])
    by_index = {r.index: r for r in results}
    for index in by_decision["refresh"]:
        result = by_index[index]
        key = by_index[result.results["gate"]["keyframe"]]
        assert result.outcome.value == "processed" and result.reuse_of is None
        assert result.results["detect"]["boxes"] == key.results["detect"]["boxes"]  # carried (no motion source)
        assert set(result.results["audit"]) == {"agreement", "mask_iou", "audit_of"}
    # a frame reused after a refresh copies the refresh: its fresh mask, its carried boxes
    after = [r for r in results if r.reuse_of in by_decision["refresh"]]
    assert after and all(r.results["segment"] == by_index[r.reuse_of].results["segment"] for r in after)


@pytest.mark.slow
def test_gated_records_match_the_documented_schema():
    import json

    from blinkflow.sinks import to_record
    from tests.conftest import REPO_ROOT

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO_ROOT / "pipeline" / "frame-record.schema.json").read_text())
    results = run_local(static_scene_config(tiles=[4, 4]))
    assert {"keyframe", "refresh", "reuse"} <= {r.results["gate"]["decision"] for r in results}
    assert any("audit" in r.results for r in results)
    for result in results:
        jsonschema.validate(json.loads(json.dumps(to_record(result))), schema)


def test_segment_runs_one_crop_around_neighbouring_rows_when_that_costs_less(segmenter):
    size = (256, 256)  # 32-pixel tiles, 32-pixel halo
    separate = segmenter._crops([8, 8], [19, 27], size)  # one tile in each of two neighbouring rows
    merged = segmenter._merged_crops([8, 8], [19, 27], size)
    area = lambda r: (r[1] - r[0]) * (r[3] - r[2])
    assert len(separate) == 2 and len(merged) == 1
    crop, pastes = merged[0]
    assert area(crop) <= sum(area(c) for c, _ in separate)
    assert pastes == [paste for _, paste in separate]  # the same pixels are pasted, only computed once
    far = segmenter._merged_crops([8, 8], [0, 63], size)  # opposite corners: the union would cost more
    assert len(far) == 2


def test_skip_ratio_audit_agreement_and_threshold_are_exported_per_stream(tmp_path):
    from blinkflow.metrics import PrometheusRecorder
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink
    from tests.test_runner_local import write_static_video

    clip = tmp_path / "static.mp4"
    write_static_video(clip, frames=12)
    cfg = load_config(data={
        "sources": [{"type": "file", "path": str(clip), "id": "cam"}],
        "gate": {"enabled": True, "max_reuse": 3, "threshold": 0.02},
        "stages": {"segment": {"batch": 2, "options": {"input_size": [32, 32]}}},
    })
    recorder, sink = PrometheusRecorder(), MemorySink()
    LocalRunner(cfg, sinks=[sink], metrics=recorder).run()
    sample = lambda name: recorder.registry.get_sample_value(name, {"stream": "cam"})
    reused = [r for r in sink.results if r.outcome.value == "reused"]
    assert sample("blinkflow_stream_skip_ratio") == pytest.approx(len(reused) / len(sink.results)) == pytest.approx(9 / 12)
    assert sample("blinkflow_gate_threshold_ratio") == pytest.approx(0.02)
    assert sample("blinkflow_audited_frames_total") == 2  # the max_reuse refreshes at frames 4 and 8
    assert sample("blinkflow_audit_agreement_ratio") == 1.0  # identical frames agree
    decided = lambda decision: recorder.registry.get_sample_value("blinkflow_gate_decisions_total",
                                                                  {"stream": "cam", "decision": decision})
    assert decided("reuse") == 9 and decided("keyframe") == 3 and decided("refresh") is None
    # every reused frame names its keyframe, in the record the sinks write too
    from blinkflow.sinks import to_record

    assert all(r.reuse_of is not None and to_record(r)["reuse_of"] == r.results["gate"]["keyframe"] for r in reused)


# --------------------------------------------------------------------------- the benchmark


def test_bench_skip_pools_the_static_scenes_over_their_frames():
    from blinkflow.bench.skip import Clip, ClipReport, pooled_still

    def report(seed, frames, work, boxes, masks):
        figures = {"frames": frames, "work_fraction": work, "less_compute": 1 / work, "boxes_f1": boxes, "mask_iou": masks,
                   "consecutive_boxes_f1": 0.99, "consecutive_mask_iou": masks,
                   "accuracy": {"gate off": {"boxes_f1": 0.9, "mask_iou": 0.9}, "gate on": {"boxes_f1": 0.9, "mask_iou": 0.8}}}
        return ClipReport(Clip(f"synthetic-static-{seed}", "", {"seed": seed}, frames), None, None, figures)

    pooled = pooled_still([report(7, 10, 0.1, 1.0, 0.9), report(3, 30, 0.3, 0.8, 1.0)])
    assert pooled["less_compute"] == pytest.approx(40 / (10 * 0.1 + 30 * 0.3))  # 4x: frames weigh, not scenes
    assert pooled["boxes_f1"] == pytest.approx((10 * 1.0 + 30 * 0.8) / 40)
    assert pooled["agreement"] == pytest.approx(min(pooled["boxes_f1"], pooled["mask_iou"]))
    assert pooled["truth_cost_mask"] == pytest.approx(-0.1) and pooled["consecutive"] == pytest.approx(0.9)
    assert pooled["per_scene"].startswith("seed 7 10.00× at 1.000 / 0.900, seed 3")


@pytest.mark.slow
def test_bench_skip_quick_runs_and_reports_well_formed_figures(real_media):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    doc = REPO_ROOT / "docs" / "benchmarks.md"
    before = doc.read_text() if doc.exists() else None
    env = dict(os.environ, BLINKFLOW_TEST_DATA=str(real_media), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "blinkflow.cli", "bench", "skip", "--quick", "--no-write", "--clips", "all",
                           "--gate-from-config"],
                          check=False, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (doc.read_text() if doc.exists() else None) == before  # --no-write leaves the doc alone
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| clip | frames | model work fraction"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    start = lines.index(header) + 2
    rows = [[c.strip().strip("*") for c in line.strip("|").split("|")] for line in lines[start : start + 6]]
    assert [row[0] for row in rows] == ["parking lot, cars (static camera)", "room, people walk in (static camera)",
                                        "tree.avi (static camera)", "bikes.mp4 (moving camera)", "synthetic scene",
                                        "synthetic scene, static camera (seed 7)"]
    assert "Gate: the config's gate section" in proc.stdout  # --gate-from-config (configs/demo.yaml's gate)
    assert "weights: detect: shipped, segment: shipped" in proc.stdout  # the real models of configs/demo.yaml
    for row in rows:
        cells = dict(zip(columns, row))
        for name in ("model work fraction", "box F1 vs off", "mask mIoU vs off", "skip ratio"):
            assert 0.0 <= float(cells[name]) <= 1.0, (name, cells[name])
        moving = cells["moving frames: box F1 / mIoU"]  # "–" where nothing moved (or no boxes on those frames)
        assert all(v == "–" or 0.0 <= float(v) <= 1.0 for v in moving.split(" / ")), moving
        assert float(cells["less compute"].rstrip("×")) == pytest.approx(1 / float(cells["model work fraction"]), rel=0.02)
        assert float(cells["speed-up"].rstrip("×")) > 0
        reused, refreshed, partial, keyframes = (int(n) for n in cells["reused/refreshed/partial/keyframes"].split("/"))
        assert reused + refreshed + partial + keyframes == int(cells["frames"]) and keyframes >= 1
    assert "gate on ÷ gate off throughput = **" in proc.stdout
    assert "Targets." in proc.stdout and "weights:" in proc.stdout
    truth = next(line for line in lines if line.startswith("**What reuse costs a perfect model**"))
    scores = re.findall(r"(synthetic scene(?:, static camera \(seed 7\))?): box F1 ([0-9.]+), mask mIoU ([0-9.]+)[;.]", truth)
    assert [name for name, _, _ in scores] == ["synthetic scene", "synthetic scene, static camera (seed 7)"], truth
    assert all(0.0 <= float(f1) <= 1.0 and 0.0 <= float(miou) <= 1.0 for _, f1, miou in scores)
    accuracy = next(line for line in lines if line.startswith("**Accuracy against the ground truth"))
    number = r"([0-9]+\.[0-9]+)"
    pairs = re.findall(rf"box F1 {number} → {number}, mask mIoU {number} → {number}", accuracy)
    assert len(pairs) == 2 and all(0.0 <= float(v) <= 1.0 for pair in pairs for v in pair), accuracy
    pooled = next(line for line in lines if line.startswith("The 1 synthetic static-camera scenes"))
    assert re.search(r"per scene: seed 7 [0-9.]+× at [0-9.]+ / [0-9.]+\.", pooled), pooled
    real = next(line for line in lines if line.startswith("Targets. Real static cameras"))
    # the people and vehicles (24 + 24 frames), then all three (with tree.avi's 12)
    assert re.search(r"Pooled, the clips with people and vehicles \(the target's footage\), over their 48 frames: "
                     r"[0-9.]+× at [0-9.]+ .*Pooled, all three, over their 60 frames: [0-9.]+× at [0-9.]+ ", real), real
    features = lines[lines.index(next(line for line in lines if line.startswith("| clip | warped frames"))) + 2:][:8]
    assert [row.split("|")[1].strip() for row in features] == [
        f"{row[0]}, {kind}" for row in rows[:4] for kind in ("adapted", "fixed")]  # the file clips
    for row in features:
        cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
        warped, frames = (int(n) for n in cells[1].split("/"))
        if cells[0].startswith("tree.avi"):  # cinepak: no decoder motion vectors, so nothing to warp along
            assert warped == 0 and float(cells[4]) == 1.0, row
            continue
        assert 0 < warped < frames and 0 <= int(cells[2]) < frames - warped  # keys for new content: among the keys
        assert 0.0 < float(cells[4]) < 1.0 and 0.0 <= float(cells[7]) <= 1.0
        if cells[0].endswith("adapted"):  # the checks' range of intervals, within 1 and twice feature_reuse
            low, high = (int(n) for n in cells[3].split("–"))
            assert 1 <= low <= high <= 8


@pytest.mark.parametrize("size", [1, 2, 3])
def test_frames_smaller_than_the_gate_blocks_are_gated_not_failed(size):
    import blinkflow

    frames = [np.full((size, size, 3), 40 * i, np.uint8) for i in range(4)] + [np.full((size, size, 3), 120, np.uint8)]
    records = list(blinkflow.run("configs/synthetic.yaml", sources=[blinkflow.frames(frames)], sinks=[],
                                 **{"stages.segment.enabled": False, "stages.flow.enabled": False,
                                    "stages.action.enabled": False}))
    assert [r["outcome"] for r in records][:4] == ["processed"] * 4  # every frame changed: keyframes
    assert records[4]["outcome"] in ("processed", "reused") and not any(r.get("error") for r in records)


def test_box_f1_can_ignore_unmatched_boxes_below_a_score():

    fresh = {"boxes": [[0, 0, 10, 10], [50, 50, 60, 60]], "labels": [1, 72], "scores": [0.9, 0.35]}
    carried = {"boxes": [[0, 0, 10, 10]], "labels": [1], "scores": [0.9]}
    assert box_f1(carried, fresh) == pytest.approx(2 / 3)  # strict: the hysteresis-held box is a miss
    assert box_f1(carried, fresh, ignore_below=0.4) == 1.0  # below the detector's threshold: counts neither way
    assert box_f1(fresh, carried, ignore_below=0.4) == 1.0  # either side
    confident_miss = dict(fresh, scores=[0.9, 0.5])
    assert box_f1(carried, confident_miss, ignore_below=0.4) == pytest.approx(2 / 3)
    low_match = {"boxes": [[50, 50, 60, 60]], "labels": [72], "scores": [0.3]}
    assert box_f1(low_match, fresh, ignore_below=0.4) == pytest.approx(2 / 3)  # a low box still matches
    assert box_f1({"boxes": []}, {"boxes": [[0, 0, 1, 1]], "labels": [1], "scores": [0.1]}, ignore_below=0.4) == 1.0


def test_frames_close_to_the_threshold_are_audited_where_the_gate_is_least_sure():
    cfg = GateConfig(enabled=True, threshold=0.1, tiles=None, max_reuse=100, audit_uncertain=0.5, audit_gap=3, refresh={},
                     adaptive=False, lighting=False)
    base = textured(seed=1)
    nudged = base.copy()
    nudged[:8, :16] = 250  # 7% of the signal changes: below the threshold, above half of it
    gate = Gate(cfg)
    frames = gate.process(frames_of([base, base, base, base, nudged, nudged, base, base, base, nudged]))
    # 4: uncertain after 3 reuses; 5: no change against 4; 6: uncertain but 2 reuses since the audit; 7: audited;
    # 9: uncertain again, 1 reuse since
    assert decisions(frames) == ["keyframe", "reuse", "reuse", "reuse", "keyframe", "reuse", "reuse", "keyframe", "reuse",
                                 "reuse"]
    audits = [f for f in frames if f.mark.audit_of is not None]
    assert [f.index for f in audits] == [4, 7] and all(f.results["gate"]["reason"] == "uncertain" for f in audits)
    assert 0.05 <= frames[4].results["gate"]["changed"] < 0.1
    quiet = Gate(GateConfig(enabled=True, threshold=0.1, tiles=None, max_reuse=100, audit_uncertain=0.0, refresh={},
                            adaptive=False, lighting=False))
    assert decisions(quiet.process(frames_of([base, base, base, base, nudged]))) == ["keyframe"] + ["reuse"] * 4


def test_the_carry_over_moves_and_audits_each_result_as_its_stage_declares():
    """No stage names in the carry-over: a stage registered now is moved and scored by its own methods."""
    from blinkflow.registry import stages as stage_registry
    from blinkflow.gate.carry import agreement
    from blinkflow.stages.base import Stage

    class Drifting(Stage):
        name = "drifting_test"

        @staticmethod
        def follow_motion(result, motion, height, width):
            return {"x": result["x"] + float(motion[..., 0].mean())}

        @staticmethod
        def agreement(carried, fresh):
            return {"x_match": float(carried["x"] == fresh["x"])}

    motion = np.full((4, 6, 2), 2.0, np.float32)
    stage_registry.names()  # load the registered stages first, so the test stage is the only addition
    stage_registry.register(Drifting.name)(Drifting)
    try:
        moved = compensate({"drifting_test": {"x": 1.0}, "flow": {"pair": [0, 1]}, "audit": {}}, motion, 32, 48)
        assert moved == {"drifting_test": {"x": 3.0}, "flow": {"pair": [0, 1]}, "audit": {}}  # flow: carried as is
        assert agreement(moved, {"drifting_test": {"x": 3.0}}) == {"x_match": 1.0, "score": 1.0}
        assert agreement(moved, {"drifting_test": {"x": 3.0}}, stages=["detect"]) is None  # not a refreshed stage
    finally:
        stage_registry._items.pop(Drifting.name)


def test_a_frame_keeps_its_gate_mark_through_pickling_as_ray_sends_it():
    import pickle

    mark = GateMark(reuse_of=4, motion=np.ones((2, 3, 2), np.float16), tiles={"grid": [2, 2], "changed": [1], "base": 4})
    frame = Frame("s", 6, 0.2, np.zeros((8, 8, 3), np.uint8), gate=mark)
    back = pickle.loads(pickle.dumps(frame))
    assert back.is_reused and not back.runs("detect") and back.gate.tiles == mark.tiles
    assert np.array_equal(back.gate.motion, mark.motion) and back.finish().reuse_of == 4


def test_a_source_resized_by_a_whole_factor_gets_its_fields_averaged_onto_the_output_cells():
    """Decoded 64x32, delivered 32x16 (factor 2): each output cell (16 decoded pixels) is the mean of the four
    8x8 blocks over it, scaled to output pixels; a resize by no whole factor still regrids the fine field."""
    from blinkflow.gate.motion import PACKED_VECTORS, DecoderMotion, DecoderVectors, _whole_factor, motion_field_from_mvs

    assert _whole_factor((640, 272), (320, 136)) == 2 and _whole_factor((640, 272), (640, 272)) == 1
    assert _whole_factor((1280, 720), (384, 216)) is None and _whole_factor((768, 432), (384, 200)) is None
    rng = np.random.default_rng(3)
    blocks = [(x, y) for y in range(0, 32, 8) for x in range(0, 64, 8)]
    vectors = np.zeros(len(blocks), PACKED_VECTORS)
    vectors["source"], vectors["w"], vectors["h"], vectors["motion_scale"] = -1, 8, 8, 4
    vectors["dst_x"] = [x + 4 for x, _ in blocks]
    vectors["dst_y"] = [y + 4 for _, y in blocks]
    vectors["motion_x"] = rng.integers(-40, 40, len(blocks))
    vectors["motion_y"] = rng.integers(-40, 40, len(blocks))
    fine = motion_field_from_mvs(vectors, 32, 64, scale=(0.5, 0.5))  # one block a cell: (4, 8, 2)
    expected = fine.reshape(2, 2, 4, 2, 2).mean(axis=(1, 3))
    field = DecoderMotion().step(DecoderVectors(2, (64, 32), (32, 16), vectors))  # a P-frame after nothing
    assert field.shape == (2, 4, 2)
    np.testing.assert_allclose(field, expected, rtol=1e-6, atol=1e-6)
    odd = DecoderMotion().step(DecoderVectors(2, (64, 32), (40, 20), vectors))  # 1.6x: the fine field regridded
    fine_odd = motion_field_from_mvs(vectors, 32, 64, scale=(40 / 64, 20 / 32))
    assert odd.shape == (3, 5, 2) and set(np.unique(odd[..., 0])) <= set(np.unique(fine_odd[..., 0]))


@pytest.mark.parametrize("out", [(64, 32), (40, 20)])
def test_a_p_frame_after_b_frames_gives_its_vectors_less_their_steps_and_no_step_where_it_has_no_vector(out):
    """The P-frame's vectors span the whole run since the anchor: its step is that motion less the B-frame's step;
    a cell with no P vector (an intra block) has a zero step, not minus the B-frame's (also when regridded)."""
    from blinkflow.gate.motion import PACKED_VECTORS, DecoderMotion, DecoderVectors

    blocks = [(x, y) for y in range(0, 32, 8) for x in range(0, 64, 8)]

    def vectors(motion_x: int, keep: list[int]) -> np.ndarray:
        v = np.zeros(len(keep), PACKED_VECTORS)
        v["source"], v["w"], v["h"], v["motion_scale"], v["motion_x"] = -1, 8, 8, 4, motion_x
        v["dst_x"] = [blocks[i][0] + 4 for i in keep]
        v["dst_y"] = [blocks[i][1] + 4 for i in keep]
        return v

    every, left_half = list(range(len(blocks))), [i for i, (x, _) in enumerate(blocks) if x < 32]
    motion = DecoderMotion()
    motion.step(DecoderVectors(1, (64, 32), out, None))  # the I-frame
    b_step = motion.step(DecoderVectors(3, (64, 32), out, vectors(-8, every)))  # 2 pixels from 1 frame back
    p_step = motion.step(DecoderVectors(2, (64, 32), out, vectors(-24, left_half)))  # 6 pixels over 2 frames
    sx = out[0] / 64
    np.testing.assert_allclose(b_step[..., 0], 2 * sx)
    covered = (np.arange(p_step.shape[1]) * 64 // p_step.shape[1]) < 32  # output columns taking a left-half cell
    np.testing.assert_allclose(p_step[:, covered, 0], 6 * sx - 2 * sx, rtol=1e-6)
    assert not p_step[:, ~covered].any() and np.isfinite(p_step).all()


@pytest.mark.parametrize("relight", [True, False])
def test_tiles_patched_during_an_exposure_ramp_leave_no_patchwork_with_relight_patches(relight):
    base = (textured().astype(np.float32) * 0.7).astype(np.uint8)  # room for a brighter exposure without clipping
    moved = brightened(base, 1.3)  # the camera's exposure rises while an object changes in one corner
    moved[40:48, 52:64] = 250
    gate = Gate(GateConfig(enabled=True, tiles=[4, 4], tile_margin=0, max_reuse=100, refresh={}, adaptive=False,
                           relight_patches=relight))
    frames = gate.process(frames_of([base, moved, moved.copy()]))
    assert decisions(frames)[:2] == ["keyframe", "partial"]
    assert frames[1].gate.tiles["changed"] == [15]  # the gain is lighting: only the object's tile is recomputed
    if relight:  # the reference took the new exposure with the tile: the same frame again is no change at all
        assert decisions(frames)[2] == "reuse" and frames[2].results["gate"]["changed"] == 0.0
    else:  # the patched tile is at the new exposure, the rest at the old: no one gain fits, the tile reads as changed
        assert frames[2].results["gate"]["changed"] > 0.0


def test_audits_from_before_a_resize_do_not_move_the_new_states_threshold():
    """A camera that comes back at another size starts afresh; its older audits arrived audit_lag frames later
    and raised the new state's threshold without the cap an audit of its own would have (0.01 -> 0.04)."""
    from blinkflow.models.training.scenes import SceneGenerator
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink
    from blinkflow.sources import _resize_array

    scene = SceneGenerator(seed=7, width=96, height=64, num_objects=2, action="static", background_motion=False)
    images = [scene.render_image(t) if t < 12 else _resize_array(scene.render_image(t), [128, 96]) for t in range(30)]
    cfg = load_config(data={
        "sources": [{"type": "frames", "id": "cam", "frames": images}],
        "gate": {"enabled": True, "max_reuse": 4, "audit_lag": 8, "batch": 2, "lighting": False},
        "stages": {"detect": {"batch": 2}, "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]}}},
    })
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    gates = [r.results["gate"] for r in sink.results]
    assert gates[12]["reason"] == "resized" and sum("audit" in r.results for r in sink.results[:12]) >= 2
    assert {g["threshold"] for g in gates[12:]} == {cfg.gate.threshold}  # only its own (capped) audits move it


def test_a_refresh_for_change_moves_the_boxes_it_carries_along_the_keyframes_flow():
    """With motion: flow a carried refresh (carry_until) has neither reuse_of nor audit_of: its boxes stayed put."""
    flow = np.zeros((2, 12, 16), np.float32)
    flow[0] = 4.0  # frame 9 -> 10: everything 4 px to the right a frame
    key = {"detect": {"boxes": [[20.0, 20.0, 40.0, 40.0]], "labels": [1], "scores": [0.9]},
           "flow": {"flow": flow.tolist(), "pair": [9, 10], "scale": 1}}
    carry = CarryOver(motion="flow")
    reused = Frame("s", 12, 0.0, np.zeros((48, 64, 3), np.uint8))
    reused.gate = GateMark(reuse_of=10)
    refresh = Frame("s", 12, 0.0, np.zeros((48, 64, 3), np.uint8))
    refresh.gate = GateMark(carried=["detect"])
    refresh.results["gate"] = {"decision": "refresh", "reason": "changed", "keyframe": 10}
    carry.fill(reused, key)
    carry.fill(refresh, key)
    assert refresh.results["detect"]["boxes"] == reused.results["detect"]["boxes"]
    assert reused.results["detect"]["boxes"][0][0] > 20.0  # moved along the flow


def test_a_gate_failure_fails_its_frame_alone_whatever_the_gate_batch(monkeypatch):
    """Raised to the runner, it was retried frame by frame, deciding the batch's earlier frames again (as
    restarts): the outputs hung on gate.batch."""
    from blinkflow.gate.policy import GatePolicy
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink

    decide = GatePolicy.decide

    def flaky(self, frame):
        if frame.index == 6:
            raise ValueError("bad frame")
        return decide(self, frame)

    monkeypatch.setattr(GatePolicy, "decide", flaky)
    outcomes = []
    for batch in (1, 4):
        cfg = load_config(data={"sources": [{"type": "synthetic", "id": "s", "width": 64, "height": 48, "num_frames": 10,
                                             "action": "static", "static_camera": True}],
                                "gate": {"enabled": True, "batch": batch}, "stages": {"chaos": {"batch": batch}}})
        sink = MemorySink()
        LocalRunner(cfg, sinks=[sink]).run()
        outcomes.append([(r.index, r.outcome.value, (r.results.get("gate") or {}).get("reason"), r.error)
                         for r in sink.results])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][6][1:] == ("failed", None, "gate: ValueError: bad frame")
    assert outcomes[0][7][1:3] == ("processed", "first") and all(o[1] != "failed" for o in outcomes[0][:6])


# --------------------------------------------------------------------------- failures under the gate


def _drifting(count: int) -> list[np.ndarray]:
    """A grey square moving one pixel a frame on a flat background: small changes, reused under threshold 0.2."""
    images = []
    for index in range(count):
        image = np.full((48, 64, 3), 120, dtype=np.uint8)
        image[16:32, 8 + index:24 + index] = 90
        images.append(image)
    return images


def _run_chaos(gate: dict, fail: list[int], frames: int = 20):
    cfg = load_config(data={
        "sources": [{"type": "frames", "id": "s", "frames": _drifting(frames)}],
        "gate": {"enabled": True, "threshold": 0.2, "max_reuse": 10, "tiles": None, "motion": "off",
                 "audit_uncertain": 0.0, "batch": 1, "audit_lag": 1, **gate},
        "stages": {"chaos": {"batch": 1, "options": {"fail_indices": fail}}}})
    return run_local(cfg)


@pytest.mark.parametrize("adaptive", [True, False])
def test_a_failed_refresh_is_never_stood_in_for_by_the_frame_before_it(adaptive):
    """A refresh that failed in its stage was skipped as a failure: the frames reusing it were filled with the
    keyframe's results before it, silently (and without adaptive thresholds a failed keyframe failed every frame
    up to the next natural keyframe, the gate never hearing of it)."""
    results = _run_chaos({"refresh": {"chaos": 3}, "adaptive": adaptive}, fail=[4, 16])
    by_index = {r.index: r for r in results}
    assert by_index[4].outcome.value == "failed" and by_index[4].results["gate"]["decision"] == "refresh"
    assert by_index[16].outcome.value == "failed" and by_index[16].results["gate"]["decision"] == "keyframe"
    for failed in (4, 16):  # the gate hears of it after the lag (1): the next frame runs the models afresh
        after = by_index[failed + 1]
        assert after.outcome.value == "processed" and after.results["gate"]["reason"] == "failed"
    for result in results:  # whatever carries results over carries them from the frame its mark names
        key = result.results["gate"].get("keyframe")
        if result.outcome.value == "reused":
            assert by_index[key].outcome.value == "processed"
            assert result.results["chaos"] == by_index[key].results["chaos"]
    assert [r.index for r in results if r.outcome.value == "failed"] == [4, 16]


@pytest.mark.parametrize("adaptive", [True, False])
def test_frames_that_reuse_a_failed_refresh_fail_until_the_gate_hears_of_it(adaptive):
    """With a lag of 3 the frames after a failed refresh reuse it before the gate knows: they were filled with the
    keyframe before it; now they fail, naming it, and the gate then runs the models afresh."""
    results = {r.index: r for r in _run_chaos({"refresh": {"chaos": 3}, "adaptive": adaptive, "audit_lag": 3}, fail=[4])}
    assert results[4].outcome.value == "failed" and results[4].results["gate"]["decision"] == "refresh"
    for index in (5, 6):
        assert results[index].results["gate"]["decision"] == "reuse" and results[index].outcome.value == "failed"
        assert "frame 4, whose results it reuses, failed" in results[index].error and "chaos" not in results[index].results
    assert results[7].outcome.value == "processed" and results[7].results["gate"]["reason"] == "failed"
    assert [i for i, r in results.items() if r.outcome.value == "failed"] == [4, 5, 6]


def test_a_frame_lost_by_a_stage_actor_is_not_stood_in_for_by_an_older_one():
    """A frame a restarted actor lost comes back without the gate's mark (chains.lost_frame): the frames reusing it
    were filled with the keyframe's results before it."""
    from blinkflow.frame import Accounting
    from blinkflow.runners.base import OrderedOutput
    from blinkflow.runners.chains import lost_frame

    out = OrderedOutput([], Accounting(), gate=GateConfig(enabled=True, adaptive=False, refresh={}))
    written = []
    out._write = written.append
    image = np.zeros((8, 8, 3), np.uint8)
    first = Frame("s", 0, 0.0, image, gate=GateMark())
    first.results = {"gate": {"decision": "keyframe", "reason": "first"}, "detect": {"boxes": [[0, 0, 4, 4]]}}
    reusing = Frame("s", 2, 0.1, image, gate=GateMark(reuse_of=1))
    reusing.results = {"gate": {"decision": "reuse", "keyframe": 1}}
    out.push([first, reusing])
    out.push([lost_frame("s", 1)])  # the gate had the models run on frame 1; the actor holding it restarted
    assert [(r.index, r.outcome.value) for r in written] == [(0, "processed"), (1, "failed"), (2, "failed")]
    assert "detect" not in written[2].results and "frame 1, whose results it reuses, failed" in written[2].error
    later = Frame("s", 1 + 8, 0.2, image)  # the lag: gate.audit_lag's default, 8
    out.attach_feedback([later])
    assert later.gate.failed == 1  # the gate hears of it and makes a keyframe


def test_audits_that_cannot_be_scored_are_forgotten_by_the_gate():
    """A stage without agreement (chaos) gave audits that were never scored: the gate kept each one pending for the
    stream's life (99 after 400 frames)."""
    from blinkflow.stages.gate import Gate

    seen = {}
    end_stream = Gate.end_stream

    def record(self, stream_id):
        state = self.policy.streams[stream_id]
        seen[stream_id] = (len(state.pending_audits), len(state.pending_regions), state.frames)
        return end_stream(self, stream_id)

    still = [_drifting(1)[0]] * 120
    cfg = load_config(data={"sources": [{"type": "frames", "id": "s", "frames": still}],
                            "gate": {"enabled": True, "max_reuse": 3, "refresh": {}, "region_budget": True},
                            "stages": {"chaos": {"batch": 4}}})
    Gate.end_stream = record
    try:
        results = run_local(cfg)
    finally:
        Gate.end_stream = end_stream
    assert sum(r.results["gate"].get("audit_of") is not None for r in results) >= 25
    audits, regions, frames = seen["s"]
    assert frames == 120 and audits <= 2 and regions <= 2  # only those still within the lag


def test_boxes_from_before_a_resize_do_not_weigh_the_new_size():
    """The driver's boxes of the old size reached the gate in the wave after a resize and made its object grid
    from them."""
    gate = Gate(GateConfig(enabled=True, object_weight=2.0, tiles=None, refresh={}))
    big, small = textured(48, 64), textured(24, 32)
    gate.process(frames_of([big, big]))
    resized = frames_of([small, small], start=2)
    gate.process(resized[:1])
    stale = resized[1]
    stale.gate = GateMark(objects=[[40.0, 10.0, 60.0, 40.0]], objects_from=1)  # old-size boxes, of frame 1
    gate.process([stale])
    assert gate.policy.streams["s"].objects is None
    fresh = frames_of([small], start=4)[0]
    fresh.gate = GateMark(objects=[[4.0, 4.0, 12.0, 12.0]], objects_from=2)
    gate.process([fresh])
    assert gate.policy.streams["s"].objects is not None and gate.policy.streams["s"].objects.any()


@pytest.mark.parametrize("bounds, message", [
    ({"threshold_min": 0.3, "threshold_max": 0.2, "threshold": 0.25}, r"gate\.threshold_min: 0\.3 is above threshold_max"),
    ({"threshold_min": 0.05, "threshold": 0.01}, r"gate\.threshold: 0\.01 is below threshold_min \(0\.05\)"),
    ({"blur": 4}, r"gate\.blur: expected an odd kernel size"),
])
def test_gate_bounds_that_contradict_each_other_are_one_line_config_errors(bounds, message):
    """They were accepted, and one missed audit then put the threshold at threshold_min: above the configured
    threshold, or above threshold_max."""
    from blinkflow.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as error:
        load_config(data={"sources": [{"type": "synthetic", "num_frames": 2}], "gate": {"enabled": True, **bounds},
                          "stages": {"chaos": {}}})
    assert "\n" not in str(error.value)


def test_a_carried_result_leaves_out_what_the_run_that_made_it_cost():
    """Reused frames' records carried the segmenter's tiles and features areas and the detector's crop of the frame
    they came from: summed over a run's records, each recompute counted once per frame that reused it."""
    keyframe = {"segment": {"mask": "m", "tiles": {"recomputed": 8, "area": 0.25}, "features": {"key": 3, "area": 0.09},
                            "feature_check": {"area": 0.09}, "new_content": 0.1},
                "detect": {"boxes": [[0, 0, 4, 4]], "crop": {"box": [0, 0, 8, 8], "area": 0.3}}}
    reused = _Out.frame(5, {"gate": {"decision": "reuse", "keyframe": 4}}, GateMark(reuse_of=4))
    CarryOver(enabled=True).fill(reused, keyframe)
    assert reused.results["segment"] == {"mask": "m"} and reused.results["detect"] == {"boxes": [[0, 0, 4, 4]]}
    assert "tiles" in keyframe["segment"] and "crop" in keyframe["detect"]  # the keyframe's own record keeps them
