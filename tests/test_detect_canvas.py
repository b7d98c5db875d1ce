"""Letterboxed object crops (``crop_reuse: letterbox``): the changed regions of a partial frame, grown around
the previous boxes, cut at the full-frame scale and packed into one canvas for a fixed-input detector."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.config import GateConfig, StageConfig, load_config
from blinkflow.errors import ConfigError, StageError
from blinkflow.frame import Frame
from blinkflow.gate.agreement import box_f1
from blinkflow.stages.canvas import STRIDE, object_regions, pack, plan_canvas
from blinkflow.stages.detect import Detect, DetectOptions
from blinkflow.stages.gate import Gate

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


class LetterboxColourDetector:
    """A perfect detector that letterboxes like YOLOX: each image resized by ``letterbox_fit`` into a canvas of
    ``input_size`` padded with ``pad_value``, one box per pure colour (red 1, green 2, blue 3) found there, boxes
    back in the image's pixels. Records the (height, width) of every letterboxed input it ran."""

    pad_value = 114 / 255

    def __init__(self, input_size=(320, 320)) -> None:
        self.input_size = tuple(input_size)
        self.calls: list[tuple[int, int]] = []

    def input_for(self, height, width):
        return self.input_size  # the square letterbox (YOLOX without rect)

    def letterbox_fit(self, height, width):
        ratio = min(self.input_size[0] / height, self.input_size[1] / width)
        return ratio, (max(1, int(height * ratio)), max(1, int(width * ratio)))

    def __call__(self, images):
        import torch
        import torch.nn.functional as F

        out = []
        for image in images:
            ratio, size = self.letterbox_fit(*image.shape[-2:])
            board = image.new_full((3, *self.input_size), self.pad_value)
            board[:, : size[0], : size[1]] = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            self.calls.append(tuple(self.input_size))
            boxes, labels = [], []
            for label, channel in ((1, 0), (2, 1), (3, 2)):
                others = [c for c in range(3) if c != channel]
                mask = (board[channel] > 0.9) & (board[others[0]] < 0.2) & (board[others[1]] < 0.2)
                if mask.any():
                    ys, xs = torch.nonzero(mask, as_tuple=True)
                    boxes.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
                    labels.append(label)
            found = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / ratio
            out.append({"boxes": found, "labels": torch.tensor(labels, dtype=torch.int64),
                        "scores": torch.full((len(labels),), 0.9)})
        return out


def letterbox_stage(input_size=(320, 320), **options):
    options = {"crop_reuse": "letterbox", "crop_max_area": 0.6, **options}
    stage = Detect(StageConfig(model="yolox_nano", weights=None, options=DetectOptions(**options)))
    stage.classes = ["background", "red", "green", "blue"]
    stage._device = "cpu"
    stage.model = LetterboxColourDetector(input_size)
    return stage


def scene(objects, height=480, width=640):
    image = np.full((height, width, 3), 110, dtype=np.uint8)
    for (x0, y0, x1, y1), colour in objects:
        image[y0:y1, x0:x1] = colour
    return image


def frames_of(images, stream="s"):
    return [Frame(stream_id=stream, index=i, pts=float(i), image=image) for i, image in enumerate(images)]


def gated(stage, images):
    # a low threshold: the test's few moved pixels make a partial frame on any frame size
    return stage.process(Gate(GateConfig(enabled=True, max_reuse=100, threshold=0.001)).process(frames_of(images)))


def fresh(images_last, input_size=(320, 320)):
    """The full-frame result of the same detector on one frame."""
    return letterbox_stage(input_size).process(frames_of([images_last], stream="fresh"))[0].results["detect"]


# --------------------------------------------------------------------------- geometry


def test_packing_puts_every_region_inside_one_canvas_on_the_stride_grid_without_overlap():
    sizes = [(160, 128), (64, 96), (96, 64), (32, 32), (128, 160)]
    (height, width), places = pack(sizes)
    assert height % STRIDE == 0 and width % STRIDE == 0
    rects = [(x, y, x + w, y + h) for (x, y), (w, h) in zip(places, sizes)]
    assert all(0 <= r[0] and 0 <= r[1] and r[2] <= width and r[3] <= height for r in rects)
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)
    assert height * width < sum(w for w, _ in sizes) * max(h for _, h in sizes)  # better than one row
    assert pack([(64, 32)]) == ((32, 64), [(0, 0)])


def test_regions_are_the_changed_tile_groups_grown_around_the_previous_boxes_that_touch_them():
    grid = [8, 8]  # 40 x 30 pixel tiles on 320 x 240
    changed = [9, 10, 54]  # two tiles in row 1, one in row 6: two groups
    assert object_regions(grid, changed, 240, 320) == [(40, 30, 120, 60), (240, 180, 280, 210)]
    bar = [100.0, 40.0, 220.5, 55.0]  # a previous box reaching out of the first group
    far = [10.0, 200.0, 30.0, 230.0]  # one touching no changed tile
    assert object_regions(grid, changed, 240, 320, [bar, far]) == [(40, 30, 221, 60), (240, 180, 280, 210)]
    # a box touching both groups joins them
    assert object_regions(grid, changed, 240, 320, [[100.0, 50.0, 250.0, 190.0]]) == [(40, 30, 280, 210)]


def test_a_canvas_costs_its_share_of_the_input_and_falls_back_above_the_limit():
    scale, content = (0.5, 0.5), (240, 320)  # a 640 x 480 frame in a 320 x 320 letterbox
    inners = [(0, 0, 240, 180), (400, 300, 640, 480)]
    canvas = plan_canvas(inners, (480, 640), scale, content, (80.0, 60.0), 0.6 * 320 * 320)
    assert canvas is not None and len(canvas.regions) == 2
    assert [r.cut for r in canvas.regions] == [(0, 0, 160, 128), (160, 96, 320, 256)]  # stride-32 grid, the pad edge
    assert canvas.area == canvas.size[0] * canvas.size[1] < 320 * 240
    assert canvas.regions[1].crop == (320.0, 192.0, 640, 480)  # reaching the letterbox pad: the frame's edge
    assert plan_canvas(inners, (480, 640), scale, content, (80.0, 60.0), 0.1 * 320 * 320) is None
    # cuts that overlap merge when one cut costs no more than two
    merged = plan_canvas([(0, 0, 200, 200), (200, 0, 400, 200)], (480, 640), scale, content, (80.0, 60.0), 320 * 320)
    assert len(merged.regions) == 1 and merged.regions[0].inners == ((0, 0, 200, 200), (200, 0, 400, 200))


# --------------------------------------------------------------------------- the detect stage


def test_two_separated_objects_are_detected_in_one_canvas_call_and_map_back_exactly():
    first = scene([((60, 60, 100, 100), RED), ((500, 360, 540, 400), BLUE), ((400, 40, 440, 80), GREEN)])
    moved = scene([((70, 64, 110, 104), RED), ((490, 370, 530, 410), BLUE), ((400, 40, 440, 80), GREEN)])
    stage = letterbox_stage()
    frames = gated(stage, [first, moved])
    assert [f.results["gate"]["decision"] for f in frames] == ["keyframe", "partial"]
    result = frames[1].results["detect"]
    crop = result["crop"]
    assert len(crop["regions"]) == 2  # the red and the blue square's regions, apart
    assert len(stage.model.calls) == 2  # the full frame, then one call for both regions
    height, width = stage.model.calls[1]
    assert height % 32 == 0 and width % 32 == 0 and height * width < 320 * 240
    assert crop["area"] == pytest.approx(height * width / (320 * 320), abs=1e-4)
    expected = fresh(moved)
    assert sorted(zip(result["classes"], result["boxes"])) == sorted(zip(expected["classes"], expected["boxes"]))
    assert dict(zip(result["classes"], result["boxes"]))["red"] == [70.0, 64.0, 110.0, 104.0]
    assert dict(zip(result["classes"], result["boxes"]))["green"] == [400.0, 40.0, 440.0, 80.0]
    assert all(not (x0 <= 420 < x1 and y0 <= 60 < y1) for x0, y0, x1, y1 in crop["regions"])  # green: carried


def test_an_object_only_partly_in_the_change_is_looked_at_whole_and_replaced():
    """A bar that grows at one end: only the tiles at that end change; the previous box that touches them widens
    the region, so the bar is seen whole and its stale box replaced, as a full-frame call would."""
    first = scene([((20, 100, 200, 120), GREEN)], height=240, width=320)
    grown = scene([((20, 100, 232, 120), GREEN)], height=240, width=320)  # the change: tile column 5, by the box's end
    stage = letterbox_stage()
    frames = gated(stage, [first, grown])
    assert frames[1].results["gate"]["decision"] == "partial"
    result = frames[1].results["detect"]
    assert "crop" in result
    assert result["boxes"] == [[20.0, 100.0, 232.0, 120.0]] == fresh(grown)["boxes"]
    assert result["crop"]["regions"][0][0] == 0  # the region reaches back over the whole previous box


def test_regions_leave_the_gates_margin_ring_to_the_halo_unless_asked_and_find_the_same_boxes():
    """The gate's tile_margin ring is the segmenter's need (its masks reach past the change): the detector's
    regions are the tiles that changed, the ring only context through crop_halo, for a smaller canvas."""
    first = scene([((60, 60, 100, 100), RED), ((500, 360, 540, 400), BLUE), ((400, 40, 440, 80), GREEN)])
    moved = scene([((70, 64, 110, 104), RED), ((490, 370, 530, 410), BLUE), ((400, 40, 440, 80), GREEN)])
    results = {}
    for ring in (True, False):
        frames = gated(letterbox_stage(crop_margin=ring), [first, moved])
        tiles = frames[1].gate.tiles
        assert set(tiles["core"]) < set(tiles["changed"])  # tile_margin 1 (the default): the ring is the difference
        results[ring] = frames[1].results["detect"]
    assert results[False]["crop"]["area"] < results[True]["crop"]["area"]
    expected = fresh(moved)
    for result in results.values():
        assert sorted(zip(result["classes"], result["boxes"])) == sorted(zip(expected["classes"], expected["boxes"]))


def test_the_gate_names_the_core_tiles_only_when_there_is_a_ring():
    first = scene([((60, 60, 100, 100), RED)])
    moved = scene([((70, 64, 110, 104), RED)])
    for margin, has_core in ((0, False), (1, True)):
        cfg = GateConfig(enabled=True, max_reuse=100, threshold=0.001, tile_margin=margin, carry_until={})
        frame = Gate(cfg).process(frames_of([first, moved]))[1]
        assert frame.results["gate"]["decision"] == "partial"
        assert ("core" in frame.gate.tiles) is has_core and frame.gate.tiles["changed"]


def test_the_full_frame_runs_when_the_canvas_would_cost_too_much():
    first = scene([((60, 60, 100, 100), RED), ((500, 360, 540, 400), BLUE)])
    moved = scene([((70, 64, 110, 104), RED), ((490, 370, 530, 410), BLUE)])
    stage = letterbox_stage(crop_max_area=0.2)
    frames = gated(stage, [first, moved])
    assert frames[1].results["gate"]["decision"] == "partial"
    assert "crop" not in frames[1].results["detect"]
    assert stage.model.calls == [(320, 320), (320, 320)]
    assert box_f1(frames[1].results["detect"], fresh(moved), iou_threshold=0.99) == 1.0


# --------------------------------------------------------------------------- the option


def test_the_option_takes_letterbox_and_refuses_what_cannot_letterbox_in_one_line():
    def config(model, value):
        return load_config(data={"sources": [{"type": "synthetic"}],
                                 "stages": {"detect": {"model": model, "options": {"crop_reuse": value}}}})

    cfg = config("yolox_nano", "letterbox")
    assert Detect(cfg.stages["detect"])._letterbox and Detect.is_temporal(cfg.stages["detect"])
    for model, value, words in [("yolox_nano", "letterboxed", "expected true or false or 'letterbox' or null"),
                                ("ssdlite320_mobilenet_v3_large", "letterbox", "letterbox needs a detector")]:
        with pytest.raises(ConfigError) as error:
            config(model, value)
        message = str(error.value)
        assert "\n" not in message and message.startswith("stages.detect.options.crop_reuse: ") and words in message
    # a detector of one's own that does not letterbox: refused when the stage builds it
    stage = Detect(StageConfig(model="yolox_nano", weights=None, options=DetectOptions(crop_reuse="letterbox")))
    with pytest.raises(StageError, match="^stages.detect.options.crop_reuse: letterbox needs"):
        stage.check_model(object())
    stage.check_model(LetterboxColourDetector())


def test_null_picks_the_canvas_for_yolox_and_whole_frames_for_a_model_of_that_name_that_does_not_letterbox():
    def stage(model):
        cfg = load_config(data={"sources": [{"type": "synthetic"}], "stages": {"detect": {"model": model}}})
        return Detect(cfg.stages["detect"])

    yolox = stage("yolox_nano")
    assert yolox._letterbox and yolox._crop_reuse and Detect.is_temporal(yolox.cfg)
    yolox.check_model(object())  # null chose it by the name: no error, the whole frame runs instead
    assert not yolox._letterbox and not yolox._crop_reuse
    ssd = stage("ssdlite320_mobilenet_v3_large")
    assert not ssd._letterbox and not ssd._crop_reuse
