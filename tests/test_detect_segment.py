"""The detect and segment stages over every registered backend, their
post-processing on controlled model outputs, and the COCO conversions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.models.classes import SYNTHETIC_CLASSES
from blinkflow.models.formats import coco_to_detections, detections_to_coco
from blinkflow.models.registry import model_names
from blinkflow.config import StageConfig
from blinkflow.errors import StageError
from blinkflow.frame import Frame, GateMark
from blinkflow.stages.common import decode_class_map
from blinkflow.stages.detect import Detect, DetectOptions
from blinkflow.stages.segment import Segment, SegmentOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
#: backends whose ResNet-50 makes them slow on CPU: they run at the smallest working size
HEAVY = {"retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn", "fcn_resnet50"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny inputs gain nothing from intra-op threads, and on a busy 2-core CI
    machine spinning OpenMP threads made the ResNet-50 tests ~6x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _param(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


def make_frames(sizes=((64, 96), (80, 64))) -> list[Frame]:
    """Frames of different sizes and content: a bright square on noise, and a gradient."""
    rng = np.random.default_rng(0)
    frames = []
    for index, (height, width) in enumerate(sizes):
        if index % 2 == 0:
            image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
            image[8:40, 16:48] = 220
        else:
            ramp = np.linspace(0, 255, width, dtype=np.uint8)
            image = np.repeat(np.repeat(ramp[None, :, None], height, axis=0), 3, axis=2)
        frames.append(Frame(stream_id="s", index=index, pts=index / 25, image=np.ascontiguousarray(image)))
    return frames


def make_stage(stage_cls, model: str | None = None, **options):
    cfg = StageConfig(model=model or stage_cls.default_model, weights=None, options=stage_cls.Options(**options))
    stage = stage_cls(cfg)
    stage.setup("cpu")
    return stage


# ---------------------------------------------------------------------- schema checks


def assert_detection_schema(result: dict, frame: Frame, classes: list[str]) -> None:
    assert set(result) == {"boxes", "labels", "classes", "scores"}
    n = len(result["boxes"])
    assert len(result["labels"]) == len(result["classes"]) == len(result["scores"]) == n
    for box, label, name, score in zip(result["boxes"], result["labels"], result["classes"], result["scores"]):
        assert len(box) == 4 and all(isinstance(v, float) for v in box)
        x1, y1, x2, y2 = box
        assert 0 <= x1 <= x2 <= frame.width and 0 <= y1 <= y2 <= frame.height
        assert isinstance(label, int) and 0 < label < len(classes) and classes[label] == name
        assert isinstance(score, float) and 0.0 <= score <= 1.0
    assert result["scores"] == sorted(result["scores"], reverse=True)
    json.dumps(result)  # plain python types only


def assert_segmentation_schema(result: dict, frame: Frame, classes: list[str]) -> np.ndarray:
    assert set(result) == {"mask", "classes", "areas"}
    mask = result["mask"]
    assert mask["format"] == "png" and isinstance(mask["data"], bytes)
    assert (mask["height"], mask["width"]) == (frame.height, frame.width)
    class_map = decode_class_map(mask["data"])
    assert class_map.shape == (frame.height, frame.width)
    assert class_map.max() < len(classes) and result["classes"] == classes
    assert sum(result["areas"].values()) == frame.height * frame.width
    for name, area in result["areas"].items():
        assert area == int((class_map == classes.index(name)).sum()) > 0
    return class_map


# ---------------------------------------------------------------------- every backend


@pytest.mark.parametrize("model", [_param(n) for n in model_names("detect")])
def test_detect_backend_writes_source_pixel_boxes(model):
    # a zero threshold keeps random-init boxes so the coordinate checks see some
    # the size knobs must reach the model's own resize, or this test crawls
    model_args = ({"input_size": [64, 96]} if model.startswith("yolox") else None if model.startswith("ssdlite")
                  else {"min_size": 64, "max_size": 96})
    stage = make_stage(Detect, model, score_threshold=0.0, max_detections=20, model_args=model_args)
    if model.startswith("yolox"):
        assert tuple(stage.model.input_size) == (64, 96)
    elif model_args:
        assert (stage.model.transform.min_size, stage.model.transform.max_size) == ((64,), 96)
    frames = stage.process(make_frames())
    for frame in frames:
        assert_detection_schema(frame.results["detect"], frame, stage.classes)
        # the backend's own score cut was lowered to ours, so random weights yield boxes to check
        assert 0 < len(frame.results["detect"]["boxes"]) <= 20
    assert stage.classes == SYNTHETIC_CLASSES


@pytest.mark.parametrize("model", [_param(n) for n in model_names("segment")])
def test_segment_backend_writes_source_resolution_mask(model):
    stage = make_stage(Segment, model, input_size=[64, 64])
    for frame in stage.process(make_frames()):
        assert_segmentation_schema(frame.results["segment"], frame, stage.classes)


# ---------------------------------------------------------------------- detect post-processing


class FixedDetector:
    """Stands in for a detector: returns the same detections for every image, records inputs."""

    def __init__(self, boxes, labels, scores) -> None:
        self.output = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32),
        }
        self.calls: list[list[tuple[int, ...]]] = []

    def __call__(self, images):
        self.calls.append([tuple(image.shape) for image in images])
        return [dict(self.output) for _ in images]


def detect_with(detector: FixedDetector, frames=None, **options) -> list[dict]:
    stage = make_stage(Detect, **options)
    stage.model = detector
    frames = stage.process(frames or make_frames(((100, 200),)))
    return [f.results.get("detect") for f in frames]


def test_detect_score_threshold_drops_low_scores_and_background():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 0, 70, 9]]
    detector = FixedDetector(boxes, [1, 2, 3, 0], [0.9, 0.29, 0.3, 0.99])
    (result,) = detect_with(detector, score_threshold=0.3)
    assert result["scores"] == [0.9, 0.3]  # 0.29 is below, label 0 is background
    assert result["classes"] == ["disc", "triangle"]


def test_detect_class_filter_keeps_only_named_classes():
    detector = FixedDetector([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], [1, 2, 3], [0.9, 0.8, 0.7])
    (result,) = detect_with(detector, classes_filter=["square", "triangle"])
    assert result["classes"] == ["square", "triangle"] and result["labels"] == [2, 3]


def test_detect_nms_removes_overlaps_within_a_class_only():
    boxes = [[0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [50, 50, 60, 60]]  # IoU(0, 1) = 0.82
    detector = FixedDetector(boxes, [1, 1, 2, 1], [0.9, 0.8, 0.7, 0.6])
    (result,) = detect_with(detector, nms_iou=0.5)
    assert result["scores"] == [0.9, 0.7, 0.6] and result["labels"] == [1, 2, 1]
    (no_nms,) = detect_with(detector, nms_iou=1.0)
    assert len(no_nms["boxes"]) == 4


def test_detect_max_detections_keeps_the_best_scores():
    boxes = [[10 * i, 0, 10 * i + 5, 5] for i in range(6)]
    detector = FixedDetector(boxes, [1] * 6, [0.4, 0.9, 0.5, 0.8, 0.6, 0.7])
    (result,) = detect_with(detector, max_detections=3)
    assert result["scores"] == [0.9, 0.8, 0.7]
    assert result["boxes"][0] == [10.0, 0.0, 15.0, 5.0]


def test_detect_input_size_boxes_map_back_to_source_pixels():
    detector = FixedDetector([[10, 10, 20, 20], [40, 20, 60, 50]], [1, 2], [0.9, 0.8])
    (result,) = detect_with(detector, frames=make_frames(((100, 200),)), input_size=[50, 50])
    assert detector.calls == [[(3, 50, 50)]]
    # x scales by 200/50, y by 100/50; the second box is clipped to the 200x100 frame
    assert result["boxes"] == [[40.0, 20.0, 80.0, 40.0], [160.0, 40.0, 200.0, 100.0]]


def test_detect_runs_one_forward_per_frame_size():
    """Frames of one size share a forward; another size gets its own (YOLOX pads a batch to its largest input, so
    a frame's boxes depended on its batch-mates' sizes)."""
    detector = FixedDetector([[1, 1, 5, 5]], [1], [0.9])
    results = detect_with(detector, frames=make_frames(((48, 64), (64, 48), (48, 64))))
    assert detector.calls == [[(3, 48, 64), (3, 48, 64)], [(3, 64, 48)]]
    assert all(r["boxes"] == [[1.0, 1.0, 5.0, 5.0]] for r in results)


def test_detect_skips_reused_and_failed_frames():
    detector = FixedDetector([[1, 1, 5, 5]], [1], [0.9])
    frames = make_frames(((48, 64), (48, 64), (48, 64)))
    frames[0].gate = GateMark(reuse_of=7)
    frames[2].fail("gate", "boom")
    results = detect_with(detector, frames=frames)
    assert detector.calls == [[(3, 48, 64)]]
    assert results[0] is None and results[1] is not None and results[2] is None


def test_detect_skips_the_forward_when_no_frame_is_active():
    detector = FixedDetector([[1, 1, 5, 5]], [1], [0.9])
    frames = make_frames(((48, 64),))
    frames[0].gate = GateMark(reuse_of=0)
    assert detect_with(detector, frames=frames) == [None] and detector.calls == []


class ScriptedDetector:
    """Stands in for a detector whose output changes from image to image: ``script`` lists (boxes, labels,
    scores) per image, in call order."""

    def __init__(self, script) -> None:
        self.script = list(script)

    def __call__(self, images):
        outputs = []
        for _ in images:
            boxes, labels, scores = self.script.pop(0)
            outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor(labels, dtype=torch.int64),
                            "scores": torch.tensor(scores, dtype=torch.float32)})
        return outputs


def stream_frames(count: int, stream: str = "s", start: int = 0) -> list[Frame]:
    image = np.zeros((100, 200, 3), dtype=np.uint8)
    return [Frame(stream_id=stream, index=start + i, pts=(start + i) / 25, image=image) for i in range(count)]


BOX, NUDGED, ELSEWHERE = [10, 10, 50, 50], [12, 10, 52, 50], [120, 10, 160, 50]


def test_detect_hysteresis_keeps_a_continuing_box_down_to_keep_threshold():
    script = [([BOX], [1], [0.7]),          # born: above score_threshold
              ([NUDGED], [1], [0.4]),       # continues it (IoU 0.9, same class): kept at 0.4
              ([BOX, ELSEWHERE], [1, 1], [0.35, 0.5]),  # continues again; the new box at 0.5 is not born
              ([BOX], [1], [0.2]),          # below keep_threshold: gone
              ([BOX], [1], [0.4])]          # nothing to continue any more: not born again at 0.4
    stage = make_stage(Detect, score_threshold=0.6, keep_threshold=0.3)
    stage.model = ScriptedDetector(script)
    frames = stage.process(stream_frames(3)) + stage.process(stream_frames(2, start=3))
    scores = [f.results["detect"]["scores"] for f in frames]
    assert scores == [[0.7], [0.4], [0.35], [], []]
    assert Detect.is_temporal(stage.cfg)


def test_detect_hysteresis_needs_the_same_class_and_the_same_stream():
    script = [([BOX], [1], [0.9]), ([BOX], [2], [0.4]),  # stream a: the class changed, so it is a new box
              ([BOX], [1], [0.4])]                      # stream b never showed the box
    stage = make_stage(Detect, score_threshold=0.6, keep_threshold=0.3)
    stage.model = ScriptedDetector(script)
    frames = stage.process(stream_frames(2, "a") + stream_frames(1, "b", start=1))
    assert [f.results["detect"]["scores"] for f in frames] == [[0.9], [], []]


def test_detect_hysteresis_forgets_the_stream_on_a_restart_or_a_cut():
    stage = make_stage(Detect, score_threshold=0.6, keep_threshold=0.3)
    stage.model = ScriptedDetector([([BOX], [1], [0.9]), ([BOX], [1], [0.4]), ([BOX], [1], [0.9]), ([BOX], [1], [0.4])])
    first = stage.process(stream_frames(1, start=5))
    restarted = stage.process(stream_frames(1, start=0))  # the index went back: the stream restarted
    assert [f.results["detect"]["scores"] for f in first + restarted] == [[0.9], []]
    before_cut, cut = stream_frames(2, start=1)
    cut.results["gate"] = {"decision": "keyframe", "reason": "cut"}
    stage.process([before_cut])
    stage.process([cut])
    assert cut.results["detect"]["scores"] == []


def test_detect_hysteresis_off_is_a_plain_threshold_and_lowers_the_backend_cut_when_on():
    stage = make_stage(Detect, score_threshold=0.6)
    stage.model = ScriptedDetector([([BOX], [1], [0.9]), ([BOX], [1], [0.4])])
    frames = stage.process(stream_frames(2))
    assert [f.results["detect"]["scores"] for f in frames] == [[0.9], []]
    assert not Detect.is_temporal(stage.cfg) and stage._shown == {}
    hysteresis = make_stage(Detect, score_threshold=0.6, keep_threshold=0.3)
    assert hysteresis.model.score_thresh == pytest.approx(0.3)  # SSDLite's own cut lets continuing boxes through


class ScriptedSegmenter:
    """Stands in for a segmenter: per image, in call order, the logit of class 1 over class 0 on the left
    half of the input (the right half is class 0 by 5 logits)."""

    def __init__(self, margins) -> None:
        self.margins = list(margins)

    def __call__(self, batch):
        height, width = batch.shape[-2:]
        logits = torch.zeros(batch.shape[0], 2, height, width)
        logits[:, 0, :, width // 2:] = 5.0
        for row in logits:
            row[1, :, : width // 2] = self.margins.pop(0)
        return {"out": logits}


def _left_class(frame: Frame) -> int:
    class_map = decode_class_map(frame.results["segment"]["mask"]["data"])
    return int(class_map[:, : class_map.shape[1] // 2].max())


def test_segment_keep_margin_holds_a_class_until_another_beats_it_by_the_margin():
    # class 1 wins by 1.0, then loses by 0.5 (held), wins again by 0.2, loses by 2.0 (beaten), wins by 0.5 (held off)
    margins = [1.0, -0.5, 0.2, -2.0, 0.5]
    stage = make_stage(Segment, classes=["bg", "thing"], input_size=[16, 32], min_region=0, keep_margin=1.0)
    stage.model = ScriptedSegmenter(margins)
    frames = stage.process(stream_frames(2)) + stage.process(stream_frames(3, start=2))
    assert [_left_class(f) for f in frames] == [1, 1, 1, 0, 0]
    plain = make_stage(Segment, classes=["bg", "thing"], input_size=[16, 32], min_region=0)
    plain.model = ScriptedSegmenter(margins)
    assert [_left_class(f) for f in plain.process(stream_frames(5))] == [1, 0, 1, 0, 1]  # every hair flips it
    assert plain._shown == {}
    # the state makes the stage temporal (one replica per stream, in order), even without region reuse
    def temporal(**options):
        return Segment.is_temporal(StageConfig(model="unet_small", options=SegmentOptions(tile_reuse=False, **options)))
    assert temporal(keep_margin=1.0) and not temporal()


def test_segment_keep_margin_is_per_stream_and_starts_over_on_a_cut_or_a_restart():
    stage = make_stage(Segment, classes=["bg", "thing"], input_size=[16, 32], min_region=0, keep_margin=1.0)
    stage.model = ScriptedSegmenter([1.0, -0.5, -0.5, 1.5, -0.5])
    shown = stage.process(stream_frames(1, "a") + stream_frames(1, "b", start=1))  # b never showed class 1
    cut = stream_frames(1, "a", start=2)
    cut[0].results["gate"] = {"decision": "keyframe", "reason": "cut"}
    stage.process(cut)  # a cut: the mask before it says nothing about this frame
    again = stage.process(stream_frames(1, "a", start=3))
    restarted = stage.process(stream_frames(1, "a", start=0))  # the index went back
    assert [_left_class(f) for f in shown + cut + again + restarted] == [1, 0, 0, 1, 0]


def test_detect_keep_threshold_above_score_threshold_is_a_one_line_config_error():
    from blinkflow.config import load_config
    from blinkflow.errors import ConfigError

    message = r"stages\.detect\.options\.keep_threshold: 0\.7 is above score_threshold 0\.6"
    with pytest.raises(ConfigError, match=message):  # when the config loads, before any model is built
        load_config(REPO_ROOT / "configs" / "synthetic.yaml", ["stages.detect.options.keep_threshold=0.7"])
    with pytest.raises(ConfigError, match=message):  # and for a stage built in code
        Detect(StageConfig(options=DetectOptions(score_threshold=0.6, keep_threshold=0.7)))


def test_detect_unknown_filter_class_is_a_one_line_stage_error():
    with pytest.raises(StageError, match=r"options\.classes_filter: unknown class 'dog'"):
        make_stage(Detect, classes_filter=["disc", "dog"])


@pytest.mark.parametrize("stage_cls", [Detect, Segment])
def test_input_size_of_wrong_length_is_a_stage_error(stage_cls):
    cfg = StageConfig(model=stage_cls.default_model, options=stage_cls.Options(input_size=[64]))
    with pytest.raises(StageError, match=r"options\.input_size: expected \[height, width\]"):
        stage_cls(cfg)


@pytest.mark.parametrize("stage_cls", [Detect, Segment])
def test_unknown_model_argument_is_a_stage_error(stage_cls):
    with pytest.raises(StageError, match=r"options\.model_args: .* rejected \['no_such_knob'\]"):
        make_stage(stage_cls, model_args={"no_such_knob": 1})


def test_detect_names_classes_from_options_for_random_weights():
    detector = FixedDetector([[1, 1, 5, 5]], [2], [0.9])
    (result,) = detect_with(detector, classes=["background", "cat", "dog"])
    assert result["classes"] == ["dog"]


# ---------------------------------------------------------------------- segment


class HalvesSegmenter:
    """Logits that say class 1 on the left half and class 2 on the right half."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, batch):
        self.calls.append(tuple(batch.shape))
        n, _, height, width = batch.shape
        logits = torch.zeros(n, self.num_classes, height, width)
        logits[:, 1, :, : width // 2] = 10.0
        logits[:, 2, :, width // 2 :] = 10.0
        return {"out": logits}


def test_segment_upsamples_to_source_and_counts_areas():
    stage = make_stage(Segment, input_size=[32, 32])
    stage.model = HalvesSegmenter(len(stage.classes))
    frames = stage.process(make_frames(((64, 96), (40, 20))))
    assert stage.model.calls == [(2, 3, 32, 32)]  # one batch at input_size
    for frame in frames:
        result = frame.results["segment"]
        class_map = assert_segmentation_schema(result, frame, stage.classes)
        half = frame.width // 2
        assert (class_map[:, :half] == 1).all() and (class_map[:, half:] == 2).all()
        assert result["areas"] == {"disc": frame.height * half, "square": frame.height * half}


class SpeckSegmenter(HalvesSegmenter):
    """The halves, plus a 2x2 speck of class 3 inside the left half and a sliver where a third class
    wins between the halves after bilinear upsampling (second best on both sides of the border)."""

    def __call__(self, batch):
        out = super().__call__(batch)
        logits = out["out"]
        logits[:, 3, 4:6, 4:6] = 20.0
        logits[:, 4, 20:26] = 9.0  # over 6 of the 32 rows
        return out


def test_segment_gives_specks_and_upsampling_slivers_to_their_surroundings():
    cleaned, raw = (make_stage(Segment, input_size=[32, 32], min_region=m) for m in (64, 0))
    for stage in (cleaned, raw):
        stage.model = SpeckSegmenter(len(stage.classes))
    raw_map = decode_class_map(raw.process(make_frames(((64, 96),)))[0].results["segment"]["mask"]["data"])
    frame = make_frames(((64, 96),))[0]
    # without cleaning: the speck (class 3) and the sliver of class 4 on the border are in the map
    assert (raw_map == 3).sum() > 0 and (raw_map == 4).sum() > 0
    result = cleaned.process([frame])[0].results["segment"]
    class_map = assert_segmentation_schema(result, frame, cleaned.classes)
    assert set(np.unique(class_map).tolist()) == {1, 2}
    assert (class_map[:, :40] == 1).all() and (class_map[:, 56:] == 2).all()  # filled from the surroundings
    assert abs(int((class_map == 1).sum()) - 64 * 48) <= 64  # the border stays within a pixel of the middle


def test_specks_take_the_logits_of_the_nearest_region_and_large_regions_stay():
    from blinkflow.stages.segment import cleaned_logits, speck_mask

    class_map = np.zeros((40, 60), np.int64)
    class_map[:, 30:] = 2
    class_map[10:13, 27:30] = 5  # 9 pixels touching the right half: its left columns are nearer the left half
    class_map[30:33, 45:47] = 7  # inside the right half
    class_map[0:8, 0:8] = 1  # 64 pixels: a region, not a speck
    logits = torch.nn.functional.one_hot(torch.from_numpy(class_map), 8).permute(2, 0, 1).float()
    assert speck_mask(class_map.astype(np.uint8), 20).sum() == 9 + 6
    cleaned, winners = cleaned_logits(logits, 20)
    out = cleaned.argmax(dim=0).numpy()
    assert winners.dtype == np.uint8 and (winners == out).all()  # the argmax it returns is the cleaned logits'
    assert (out[30:33, 45:47] == 2).all() and (out[10:13, 27:29] == 0).all() and out[11, 29] == 2
    assert set(out[10:13, 29].tolist()) <= {0, 2}  # the corners are as near one side as the other
    assert (out[0:8, 0:8] == 1).all() and (out[class_map < 3] == class_map[class_map < 3]).all()
    # a class is ruled out wherever it wins no neighbouring pixel (the speck classes now nowhere)
    assert (cleaned[5] == cleaned.min()).all() and (cleaned[7] == cleaned.min()).all()
    assert (cleaned[1, 20:, 20:] == cleaned.min()).all() and (cleaned[1, 0:8, 0:8] == 1).all()
    assert (cleaned[1, 8, 0:9] == 0).all() and (cleaned[1, 9, 0:9] == cleaned.min()).all()  # one pixel around
    assert torch.equal(cleaned_logits(logits, 6)[0].argmax(dim=0), logits.argmax(dim=0))  # none under 6 pixels


def _specks_over_the_whole_map(class_map, min_pixels):
    """The first speck finder, kept as the reference: every class labelled over the whole map."""
    from scipy import ndimage

    specks = np.zeros(class_map.shape, bool)
    for value in np.unique(class_map):
        regions, _ = ndimage.label(class_map == value, structure=np.ones((3, 3), bool))
        small = np.bincount(regions.ravel()) < min_pixels
        small[0] = False
        specks |= small[regions]
    return specks if specks.any() and not specks.all() else None


def _sources_over_the_whole_map(specks):
    """The first nearest-pixel transform, kept as the reference: one over the whole map."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(specks, return_indices=True)[1]


def _cleaned_logits_as_gathered(logits, min_pixels):
    """The first cleaning, kept as the reference: the whole map gathered and the masks grown on the host."""
    from scipy import ndimage

    from blinkflow.stages.segment import _RULED_OUT

    winners = logits.max(dim=0).indices.to(torch.uint8).cpu().numpy()
    specks = _specks_over_the_whole_map(winners, min_pixels)
    if specks is not None:
        rows, cols = _sources_over_the_whole_map(specks)
        winners = winners[rows, cols]
        logits = logits[:, torch.from_numpy(rows), torch.from_numpy(cols)]
    masks = winners[None] == np.arange(logits.shape[0], dtype=np.uint8)[:, None, None]
    grown = ndimage.binary_dilation(masks, structure=np.ones((1, 3, 3), bool))  # each class's 3x3 neighbourhood
    return logits.float().masked_fill(~torch.from_numpy(grown), _RULED_OUT), winners


def _random_class_map(rng, height, width):
    """A map with a dominant class, a few large shapes (some against the edges) and specks of every size."""
    class_map = np.full((height, width), rng.integers(0, 3), np.uint8)
    for _ in range(rng.integers(0, 5)):
        y, x = rng.integers(-10, height), rng.integers(-10, width)
        class_map[max(0, y):y + rng.integers(5, height), max(0, x):x + rng.integers(5, width)] = rng.integers(0, 4)
    for _ in range(rng.integers(0, 40)):
        y, x = rng.integers(0, height), rng.integers(0, width)
        class_map[y:y + rng.integers(1, 9), x:x + rng.integers(1, 12)] = rng.integers(0, 4)
    return class_map


def test_specks_found_in_windows_are_exactly_those_of_the_whole_map():
    """Labelling each class only in its window (its own box, or the others' box with open sides where a strip
    of it alone lies beyond) finds exactly the specks labelling everything finds, and a box around each."""
    from blinkflow.stages.segment import speck_regions

    rng = np.random.default_rng(7)
    windows_used = 0
    for trial in range(400):
        height, width = int(rng.integers(8, 90)), int(rng.integers(8, 120))
        class_map = _random_class_map(rng, height, width)
        min_pixels = int(rng.choice([4, 20, 64, 256]))
        specks, boxes = speck_regions(class_map, min_pixels)
        expected = _specks_over_the_whole_map(class_map, min_pixels)
        assert (specks is None) == (expected is None), trial
        if specks is None:
            continue
        assert np.array_equal(specks, expected), trial
        in_boxes = np.zeros_like(specks)
        for rows, cols in boxes:
            in_boxes[rows, cols] = True
            assert specks[rows, cols].any()
        assert not (specks & ~in_boxes).any()
        windows_used += sum(r.stop - r.start < height or c.stop - c.start < width for r, c in boxes)
    assert windows_used > 100  # the boxes are the regions', not the map


def test_speck_sources_in_windows_are_those_of_one_transform_over_the_whole_map():
    """Windows grown until no pixel outside could be nearer give the whole map's nearest pixels, ties included."""
    from blinkflow.stages.segment import speck_regions, speck_sources

    rng = np.random.default_rng(11)
    checked = 0
    for trial in range(300):
        height, width = int(rng.integers(8, 120)), int(rng.integers(8, 160))
        class_map = _random_class_map(rng, height, width)
        specks, boxes = speck_regions(class_map, int(rng.choice([20, 64, 256])))
        if specks is None:
            continue
        (ty, tx), (sy, sx) = speck_sources(specks, boxes)
        rows, cols = _sources_over_the_whole_map(specks)
        order = np.lexsort((tx, ty))
        assert np.array_equal(np.stack([ty, tx])[:, order], np.stack(np.nonzero(specks))), trial  # each once
        assert np.array_equal(sy, rows[ty, tx]) and np.array_equal(sx, cols[ty, tx]), trial
        checked += ty.size
    assert checked > 5000


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cleaning_in_place_of_the_logits_gives_exactly_the_gathered_cleaning(dtype):
    """Copying only the speck pixels' logits, and growing the masks where the logits are (a GPU's memory),
    changes nothing: the same logits and argmax, bit for bit, on busy maps with hundreds of specks."""
    from blinkflow.stages.segment import cleaned_logits, speck_mask

    generator = torch.Generator().manual_seed(3)
    for size in [(12, 20), (45, 80)]:
        coarse = torch.randn(21, *size, generator=generator) * 3
        coarse[0] = 3.0  # a background that wins a third of the map, objects and their specks elsewhere
        logits = torch.nn.functional.interpolate(coarse[None], size=(180, 320), mode="bilinear")[0]
        logits = (logits + 0.3 * torch.randn(logits.shape, generator=generator)).to(dtype)
        specks = speck_mask(logits.float().argmax(dim=0).to(torch.uint8).numpy(), 256)
        assert specks is not None and 500 < specks.sum() < specks.size
        cleaned, winners = cleaned_logits(logits, 256)
        reference, reference_winners = _cleaned_logits_as_gathered(logits, 256)
        assert torch.equal(cleaned, reference) and np.array_equal(winners, reference_winners)
        assert cleaned.dtype == torch.float32 and logits.dtype == dtype  # the input is left as it was


def test_segment_without_input_size_batches_by_frame_size():
    stage = make_stage(Segment, input_size=None)
    stage.model = HalvesSegmenter(len(stage.classes))
    stage.process(make_frames(((48, 64), (32, 32), (48, 64))))
    assert sorted(stage.model.calls) == [(1, 3, 32, 32), (2, 3, 48, 64)]


def test_segment_skips_reused_and_failed_frames():
    stage = make_stage(Segment, input_size=[32, 32])
    stage.model = HalvesSegmenter(len(stage.classes))
    frames = make_frames(((48, 64), (48, 64), (48, 64)))
    frames[1].gate = GateMark(reuse_of=0)
    frames[2].fail("detect", "boom")
    stage.process(frames)
    assert stage.model.calls == [(1, 3, 32, 32)]
    assert "segment" in frames[0].results and not frames[1].results and not frames[2].results


def test_segment_loads_a_weights_file_and_names_its_classes_from_options(tmp_path):
    from blinkflow.models.registry import build_model

    classes = ["background", "road", "car"]
    model = build_model("unet_small", task="segment", num_classes=len(classes), base_width=8).eval()
    torch.save(model.state_dict(), tmp_path / "unet.pt")
    cfg = StageConfig(
        model="unet_small",
        weights=str(tmp_path / "unet.pt"),
        options=SegmentOptions(input_size=[32, 32], classes=classes, model_args={"base_width": 8}),
    )
    stage = Segment(cfg)
    stage.setup("cpu")
    (frame,) = stage.process(make_frames(((32, 32),)))
    class_map = assert_segmentation_schema(frame.results["segment"], frame, classes)
    with torch.inference_mode():
        expected = model(torch.from_numpy(frame.image).permute(2, 0, 1)[None].float() / 255)["out"].argmax(1)[0]
    np.testing.assert_array_equal(class_map, expected.numpy())


def test_unet_small_keeps_odd_input_sizes_and_stays_small():
    from blinkflow.models.registry import build_model

    model = build_model("unet_small", task="segment", num_classes=4).eval()
    assert 500_000 <= sum(p.numel() for p in model.parameters()) <= 2_000_000
    with torch.inference_mode():
        assert model(torch.rand(1, 3, 37, 50))["out"].shape == (1, 4, 37, 50)


# ---------------------------------------------------------------------- COCO formats


def _coco_sample(real_media: Path) -> dict:
    return json.loads((real_media / "coco" / "detections.json").read_text())


def test_coco_sample_round_trips_exactly_through_detection_format(real_media):
    data = _coco_sample(real_media)
    names = {c["name"]: c["id"] for c in data["categories"]}
    for image in data["images"]:
        annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        result = coco_to_detections(annotations, data["categories"])
        frame = Frame("coco", 0, 0.0, np.zeros((image["height"], image["width"], 3), np.uint8))
        assert all(0 <= v for box in result["boxes"] for v in box)
        back = detections_to_coco(result, image["id"], names, first_id=annotations[0]["id"])
        for original, converted in zip(annotations, back, strict=True):
            for key in ("id", "image_id", "category_id", "bbox"):
                assert converted[key] == original[key], key
        assert coco_to_detections(back, data["categories"]) == result
        assert result["boxes"][0][2] <= frame.width and result["boxes"][0][3] <= frame.height


def _bbox_stats(truth: dict, results: list[dict]) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ground_truth = COCO()
    ground_truth.dataset = truth
    ground_truth.createIndex()
    evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), "bbox")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return list(evaluation.stats)


def test_detection_output_loads_and_evaluates_like_the_truth_in_pycocotools(real_media):
    from pycocotools.coco import COCO

    data = _coco_sample(real_media)
    converted = []
    for image in data["images"]:
        annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        result = coco_to_detections(annotations, data["categories"])
        converted += detections_to_coco(result, image["id"], first_id=len(converted) + 1)
    as_dataset = COCO()
    as_dataset.dataset = {"images": data["images"], "categories": data["categories"], "annotations": converted}
    as_dataset.createIndex()
    assert len(as_dataset.getAnnIds()) == len(data["annotations"])
    # scored against the truth, our boxes do exactly as well as the truth itself (AP 0.99 here,
    # not 1.0, because of tied scores over near-duplicate boxes); an xywh mix-up would score ~0
    truth_as_results = [{**a, "score": 1.0} for a in data["annotations"]]
    stats = _bbox_stats(data, converted)
    assert stats == _bbox_stats(data, truth_as_results) and stats[0] > 0.95


def test_detect_stage_output_on_real_coco_images_is_valid_coco(real_media):
    from PIL import Image
    from pycocotools.coco import COCO

    data = _coco_sample(real_media)
    stage = make_stage(Detect, score_threshold=0.0, max_detections=10)
    frames = [
        Frame("coco", i, 0.0, np.array(Image.open(real_media / "coco" / image["file_name"]).convert("RGB")))
        for i, image in enumerate(data["images"])
    ]
    stage.process(frames)
    category_ids = {name: index for index, name in enumerate(stage.classes)}
    results = []
    for frame, image in zip(frames, data["images"]):
        assert (frame.height, frame.width) == (image["height"], image["width"])
        assert_detection_schema(frame.results["detect"], frame, stage.classes)
        results += detections_to_coco(frame.results["detect"], image["id"], category_ids, first_id=len(results) + 1)
    dataset = COCO()
    dataset.dataset = {
        "images": data["images"],
        "categories": [{"id": i, "name": n} for i, n in enumerate(stage.classes)],
        "annotations": results,
    }
    dataset.createIndex()
    assert len(dataset.getAnnIds()) == len(results) > 0


# ---------------------------------------------------------------------- import cost and GPU


def test_importing_the_stages_does_not_import_torch():
    code = (
        "import sys, blinkflow, blinkflow.stages.detect, blinkflow.stages.segment, blinkflow.models.detection, blinkflow.models.segmentation, blinkflow.models.formats;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detect_runs_fp16_channels_last_on_cuda():
    options = DetectOptions(score_threshold=0.0, max_detections=10)
    gpu = {"weights": None, "device": "cuda:0", "precision": "fp16"}
    stage = Detect(StageConfig(model="ssdlite320_mobilenet_v3_large", channels_last=True, options=options, **gpu))
    stage.setup("cuda:0")
    for frame in stage.process(make_frames()):
        assert_detection_schema(frame.results["detect"], frame, stage.classes)
    segment = Segment(StageConfig(options=SegmentOptions(input_size=[64, 64]), **gpu))
    segment.setup("cuda:0")
    for frame in segment.process(make_frames()):
        assert_segmentation_schema(frame.results["segment"], frame, segment.classes)


@pytest.mark.parametrize("size", [(112, 112), (384, 216), (70, 130)])
def test_a_resized_batch_is_the_same_at_any_thread_count(size):
    """The float resize's last bits followed the thread split and rounding made them gray levels: a Ray actor (one
    thread) fed its model other pixels than the local runner (every core), and their outputs differed."""
    from blinkflow.stages.common import frames_to_batch

    image = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    frames = [Frame("s", i, float(i), np.roll(image, i, axis=1)) for i in range(4)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = frames_to_batch(frames, "cpu", size=size)
        torch.set_num_threads(2)
        two = frames_to_batch(frames, "cpu", size=size)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (4, 3, *size) and torch.equal(one, two)
    exact = torch.nn.functional.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None].double(), size=size,
                                            mode="bilinear", align_corners=False) / 255.0
    assert float((one[:1].double() - exact).abs().max()) <= 1.0 / 255.0 + 1e-6  # within a gray level of exact


def test_a_frame_goes_to_an_accelerator_once_for_all_its_stages():
    """The first stage on a device uploads the pixels; the others take that copy. The copy is never pickled
    (a Ray actor uploads its own) and goes when the frame is finished. ``meta`` stands in for a GPU here."""
    import pickle

    from blinkflow.stages.common import device_image, frames_to_batch

    frame = make_frames()[0]
    on_cpu = device_image(frame, "cpu")
    assert on_cpu.data_ptr() == frame.image.__array_interface__["data"][0] and frame.device_images == {}
    first = device_image(frame, "meta")
    assert device_image(frame, torch.device("meta")) is first and list(frame.device_images) == ["meta"]
    assert first.shape == frame.image.shape and first.dtype == torch.uint8
    assert frames_to_batch([frame], "meta", size=(16, 16)).shape == (1, 3, 16, 16)
    assert frame.device_images["meta"] is first
    copy = pickle.loads(pickle.dumps(frame))
    assert copy.device_images == {} and np.array_equal(copy.image, frame.image)
    assert frame.device_images["meta"] is first
    frame.finish()
    assert frame.device_images == {}


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_detect_and_segment_on_cuda_share_one_upload_of_each_frame():
    gpu = {"weights": None, "device": "cuda"}
    detect = Detect(StageConfig(model="ssdlite320_mobilenet_v3_large", options=DetectOptions(score_threshold=0.0), **gpu))
    segment = Segment(StageConfig(options=SegmentOptions(input_size=[64, 64]), **gpu))
    detect.setup("cuda")
    segment.setup("cuda:0")
    frames = detect.process(make_frames())
    uploaded = [(list(f.device_images), f.device_images["cuda:0"].data_ptr()) for f in frames]
    frames = segment.process(frames)
    assert [(list(f.device_images), f.device_images["cuda:0"].data_ptr()) for f in frames] == uploaded
    for frame in frames:
        assert_segmentation_schema(frame.results["segment"], frame, segment.classes)


class _CountingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 1)
        self.shapes: list[tuple] = []

    def forward(self, batch):
        self.shapes.append(tuple(batch.shape))
        return self.conv(batch)


def _counting_stage_class():
    from blinkflow.stages.model_stage import ModelStage

    class Counting(ModelStage):
        """A new model stage is its own logic only: the base builds, places and warms the model up."""

        name = "segment"

        def build_model(self, spec):
            return _CountingModel()

        def warmup_inputs(self):
            return (torch.zeros(1, 3, 8, 8, device=self._device),)

    return Counting


@pytest.mark.parametrize("warmup, calls", [(None, 0), (True, 1), (False, 0)])  # null: GPU only, so none on CPU
def test_model_stage_base_sets_up_in_eval_mode_warms_up_when_asked_and_tears_down(warmup, calls):
    stage = _counting_stage_class()(StageConfig(warmup=warmup, channels_last=True))
    stage.setup("cpu")
    assert not stage.model.training and stage.model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert stage.model.shapes == [(1, 3, 8, 8)] * calls
    with stage.inference():
        assert torch.is_inference_mode_enabled()
    stage.teardown()
    assert stage.model is None


def test_model_stage_turns_a_rejected_builder_argument_into_one_line_naming_the_yaml_path():
    stage = Detect(StageConfig(model="ssdlite320_mobilenet_v3_large", options=DetectOptions(model_args={"bogus": 1})))
    with pytest.raises(StageError, match=r"^stages\.detect\.options\.model_args: ssdlite320_mobilenet_v3_large "
                                         r"rejected \['bogus'\]"):
        stage.setup("cpu")


def test_a_cameras_reconnection_starts_the_stages_hysteresis_over():
    """The first frame after an outage (meta discontinuity) kept boxes and masks of before it by keep_threshold and
    keep_margin: the indices go on across a reconnection, what the camera shows may not."""
    from blinkflow.stages.common import follows

    assert follows(3, Frame("cam", 4, 0.4, None))
    assert not follows(3, Frame("cam", 4, 0.4, None, meta={"discontinuity": True, "reconnects": 1}))


def test_a_model_stage_on_random_weights_says_its_outputs_mean_nothing(caplog):
    """`stages.detect: null` (or no weights key) built an untrained net, silently."""
    from blinkflow.stages.segment import Segment, SegmentOptions

    with caplog.at_level("WARNING"):
        Segment(StageConfig(model="unet_small", weights=None, options=SegmentOptions(input_size=[32, 32]))).setup("cpu")
    assert any("stages.segment.weights: null, so unet_small starts from random weights" in r.getMessage()
               for r in caplog.records)
