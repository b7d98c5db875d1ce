"""Feature-level reuse of the segmenter (Deep Feature Flow, ``stages.segment.options.feature_reuse``): the
backbone on every Nth frame, its features warped along the decoder's motion vectors for the frames between,
only the head run on them; the warp itself, when frames run in full, and Ray against local."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.config import load_config
from blinkflow.errors import StageError
from blinkflow.frame import Frame
from blinkflow.stages.segment import Segment, warp_features

BIKES = Path(__file__).resolve().parent / "data" / "video" / "bikes.mp4"
PARKING = Path(__file__).resolve().parent / "data" / "static" / "car-detection-19s.mp4"
MODEL = "deeplabv3_mobilenet_v2"


def test_warp_features_moves_features_along_a_backward_motion_field():
    features = torch.arange(8 * 8, dtype=torch.float32).reshape(1, 1, 8, 8)
    # content moved 16 source pixels right and 8 down on a 64x64 frame: 2 and 1 feature pixels on the 8x8 grid
    motion = np.zeros((8, 8, 2), np.float32)
    motion[..., 0], motion[..., 1] = 16.0, 8.0
    warped = warp_features(features, motion, (64, 64))
    assert torch.equal(warped[0, 0, 1:, 2:], features[0, 0, :-1, :-2])  # out[p] = in[p - motion]
    assert torch.equal(warped[0, 0, 0, 2:], features[0, 0, 0, :-2])  # borders repeat
    assert warp_features(features, np.zeros((8, 8, 2), np.float32), (64, 64)) is features  # still: untouched
    assert warp_features(features, None, (64, 64)) is features


def _segmenter(feature_reuse: int, model: str = MODEL, adapt: bool = False, change: float | None = None) -> Segment:
    options = {"input_size": None, "feature_reuse": feature_reuse, "feature_reuse_adapt": adapt}
    if change is not None:
        options["feature_reuse_change"] = change
    cfg = load_config(data={"stages": {"segment": {"model": model, "weights": "shipped" if model == MODEL else None,
                                                   "options": options}}})
    stage = Segment(cfg.stages["segment"])
    stage.setup("cpu")
    return stage


def _frames(image: np.ndarray, count: int, motion: bool = True) -> list[Frame]:
    frames = [Frame("s", i, i / 10, image) for i in range(count)]
    for frame in frames[1:] if motion else []:
        frame.meta["mvs"] = np.zeros((image.shape[0] // 8, image.shape[1] // 8, 2), np.float16)
    return frames


@pytest.mark.slow
def test_between_keys_only_the_head_runs_and_a_still_scene_gives_the_full_result(one_torch_thread):
    import av

    with av.open(str(BIKES)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")[::4, ::4].copy()  # 68 x 160
    reuse, full = _segmenter(3), _segmenter(0)
    frames, plain = reuse.process(_frames(image, 7)), full.process(_frames(image, 7))
    features = [f.results["segment"].get("features") for f in frames]
    assert [f is None for f in features] == [True, False, False, True, False, False, True]  # a key every 3rd frame
    assert [f["key"] for f in features if f] == [0, 0, 3, 3]
    share = features[1]["area"]
    assert 0.02 < share < 0.5  # the head's FLOP share: what a warped frame costs
    # no motion: the warped features are the key's, so the head gives what a full run gives on the same pixels
    assert [f.results["segment"]["mask"] for f in frames] == [f.results["segment"]["mask"] for f in plain]
    # a frame without motion vectors cannot be warped: it runs in full and starts a new key
    gap = _frames(image, 4)
    del gap[2].meta["mvs"]
    assert [("features" in f.results["segment"]) for f in _segmenter(3).process(gap)] == [False, True, False, True]


@pytest.mark.slow
def test_gate_keyframes_and_partial_frames_run_the_backbone(one_torch_thread):
    stage = _segmenter(10)
    image = np.full((64, 96, 3), 120, np.uint8)
    frames = _frames(image, 4)
    frames[2].results["gate"] = {"decision": "keyframe", "reason": "changed"}  # new content: a fresh look
    frames[3].results["gate"] = {"decision": "refresh"}
    stage.process(frames)
    assert [("features" in f.results["segment"]) for f in frames] == [False, True, False, True]
    assert frames[3].results["segment"]["features"]["key"] == 2


def _bikes_image() -> np.ndarray:
    import av

    with av.open(str(BIKES)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")[::4, ::4].copy()  # 68 x 160


def _keys_and_intervals(frames: list[Frame]) -> tuple[list[int], list[int]]:
    results = [f.results["segment"] for f in frames]
    return ([f.index for f, r in zip(frames, results) if "features" not in r],
            [r["feature_check"]["interval"] for r in results if "feature_check" in r])


@pytest.mark.slow
def test_the_interval_grows_while_warped_frames_agree_and_halves_when_they_do_not(one_torch_thread):
    """feature_reuse_adapt: at each key the previous key, warped onto it, is scored against it. A still scene
    warps perfectly, so the interval grows by one a key up to twice feature_reuse; content the motion does not
    explain (the scene replaced, no motion) fails the check and halves it. (Without the new-content test,
    feature_reuse_change 1, which would otherwise run the backbone on the replaced scene, see below.)"""
    stage = _segmenter(2, adapt=True, change=1.0)
    image = _bikes_image()
    frames = stage.process(_frames(image, 20))
    keys, intervals = _keys_and_intervals(frames)
    assert keys == [0, 2, 5, 9, 13, 17]  # intervals 2, 3, 4, 4, 4: grown to 2 x feature_reuse
    assert intervals == [3, 4, 4, 4, 4]
    check = frames[2].results["segment"]["feature_check"]
    assert check["key"] == 0 and check["mask_iou"] == 1.0
    assert check["area"] == frames[1].results["segment"]["features"]["area"] > 0  # the head once more, counted
    # the scene is replaced by a blank wall while the motion vectors say nothing moved: the warped frames keep
    # showing the bikes, and the next key's check finds it
    blank = _frames(np.full_like(image, 128), 8)
    for frame in blank:
        frame.index += 20
        frame.meta["mvs"] = np.zeros((image.shape[0] // 8, image.shape[1] // 8, 2), np.float16)
    later = stage.process(blank)
    first_check = next(f.results["segment"]["feature_check"] for f in later if "feature_check" in f.results["segment"])
    assert first_check["mask_iou"] < 0.5 and first_check["interval"] == 2  # span 3 -> 1


def _with_a_new_car(image: np.ndarray, count: int, start: int) -> list[Frame]:
    """A still scene where a blue 'car' (a sixth of the picture) parks at frame ``start`` and stays."""
    frames = _frames(image, count)
    car = image.copy()
    car[20:50, 40:100] = (30, 30, 200)
    for frame in frames[start:]:
        frame.image = car
    return frames


@pytest.mark.slow
def test_new_content_that_no_warp_can_show_runs_the_backbone(one_torch_thread):
    """feature_reuse_change: a frame that differs from the key's pixels (moved along the motion) in more than
    that fraction is a key of its own, reported as new_content; the frames after it warp from it."""
    image = _bikes_image()
    frames = _segmenter(4).process(_with_a_new_car(image, 7, 2))
    results = [f.results["segment"] for f in frames]
    assert [r.get("features", {}).get("key") for r in results] == [None, 0, None, 2, 2, 2, None]
    assert 0.1 < results[2]["new_content"] < 0.4 and all("new_content" not in r for r in results[3:5])
    # without it the car is warped away: frame 2 shows the key's empty scene
    blind = [f.results["segment"] for f in _segmenter(4, change=1.0).process(_with_a_new_car(image, 7, 2))]
    assert [r.get("features", {}).get("key") for r in blind] == [None, 0, 0, 0, None, 4, 4]
    assert blind[2]["mask"] == results[1]["mask"] != results[2]["mask"]


@pytest.mark.slow
def test_a_key_run_for_new_content_is_checked_outside_the_new_content(one_torch_thread):
    """feature_reuse_adapt with new content: the check at that key judges the warp on the pixels that did not
    change, so a car driving into the parking lot does not halve the interval as a bad warp would (the whole
    frame's check would score the car the warp cannot show at IoU 0: a mIoU of at most 0.5)."""
    import av

    with av.open(str(PARKING)) as container:
        decoded = [f.to_ndarray(format="rgb24")[::2, ::2].copy() for f, _ in zip(container.decode(video=0), range(67))]
    frames = _frames(decoded[40], 8)  # the empty lot, then a car in it from frame 4 on
    for frame in frames[4:]:
        frame.image = decoded[66]
    results = [f.results["segment"] for f in _segmenter(2, adapt=True).process(frames)]
    assert "car" not in results[3]["areas"] and results[4]["areas"]["car"] > 0.05 * decoded[66][..., 0].size
    assert 0.05 < results[4]["new_content"] < 0.3
    check = results[4]["feature_check"]
    assert check["key"] == 2 and check["mask_iou"] == 1.0 and check["interval"] == 4  # grown (3 -> 4), not halved


def test_the_check_costs_the_head_once_more_in_the_benchmark():
    from types import SimpleNamespace

    from blinkflow.bench.skip import frame_work
    from blinkflow.frame import Outcome

    result = SimpleNamespace(outcome=Outcome.PROCESSED, results={
        "segment": {"feature_check": {"key": 0, "mask_iou": 1.0, "interval": 3, "area": 0.09}}})
    assert frame_work(result)["segment"] == pytest.approx(1.09)


def test_feature_reuse_needs_a_model_with_a_features_head_split():
    with pytest.raises(StageError, match=r"stages\.segment\.options\.feature_reuse: model 'unet_small' has no "
                                         r"features/head split"):
        _segmenter(3, model="unet_small")


@pytest.mark.slow
def test_features_warped_along_the_decoder_motion_are_closer_to_the_next_frames_features(one_torch_thread):
    """bikes.mp4 pans: the key's backbone features moved along the accumulated motion vectors are closer to
    the features of each of the next three frames than the same features left in place, or moved the other way."""
    from blinkflow.config import SourceConfig
    from blinkflow.gate.motion import attach_decoder_motion, compose_motion
    from blinkflow.sources import iter_video_frames
    from tests.conftest import load_shipped

    model = load_shipped("segment", MODEL)
    cfg = SourceConfig(type="file", path=str(BIKES), resize=[320, 136], motion_vectors=True, max_frames=8)
    frames, decoders = list(iter_video_frames(BIKES, "bikes", cfg)), {}
    for frame in frames:
        attach_decoder_motion(frame, decoders)
    with torch.inference_mode():
        features = [model.features(torch.from_numpy(f.image).permute(2, 0, 1)[None].float() / 255) for f in frames]
        for key in (0, 4):
            motion = None
            for index in range(key + 1, key + 4):
                motion = compose_motion(np.asarray(frames[index].meta["mvs"], np.float32), motion)

                def error(moved):
                    return float((moved - features[index]).abs().mean())

                warped = error(warp_features(features[key], motion, (136, 320)))
                assert warped < error(features[key]) < error(warp_features(features[key], -motion, (136, 320)))


@pytest.mark.slow
def test_without_a_gate_the_segmenter_turns_the_decoder_vectors_into_motion(one_torch_thread):
    """The source attaches only the decoder's vectors; with no gate to make the fields, the segmenter's
    feature reuse makes them itself and warps between keys."""
    from blinkflow.config import SourceConfig
    from blinkflow.gate.motion import VECTORS_KEY
    from blinkflow.sources import iter_video_frames

    cfg = SourceConfig(type="file", path=str(BIKES), resize=[160, 68], motion_vectors=True, max_frames=7)
    frames = list(iter_video_frames(BIKES, "bikes", cfg))
    assert all(VECTORS_KEY in f.meta and "mvs" not in f.meta for f in frames)
    _segmenter(3, change=1.0).process(frames)  # warps whatever the pan uncovers (the new-content test is above)
    assert all(VECTORS_KEY not in f.meta and f.meta["mvs"].shape == (9, 20, 2) for f in frames)
    assert [("features" in f.results["segment"]) for f in frames] == [False, True, True, False, True, True, False]


def _pan(count: int, step: int = 16) -> list[Frame]:
    """The parking lot panning ``step`` pixels right a frame, with the decoder motion a gate would attach."""
    import av

    with av.open(str(PARKING)) as container:
        image = next(container.decode(video=0)).to_ndarray(format="rgb24")[::6, ::6].copy()  # 72 x 128
    frames = []
    for index in range(count):
        frame = Frame("s", index, index / 10, np.roll(image, step * index, axis=1).copy())
        if index:
            frame.meta["mvs"] = np.tile(np.array([step, 0.0], np.float16), (image.shape[0] // 8, image.shape[1] // 8, 1))
        frames.append(frame)
    return frames


def test_a_batch_retried_frame_by_frame_gives_the_frames_their_results_again(one_torch_thread):
    """One failing frame makes the caller run the batch again frame by frame: the frames seen twice added their
    motion to the key again, and the key frame was warped from its own features (masks at 0.65 of the right ones)."""
    from blinkflow.runners.base import StageCaller

    alone = StageCaller("segment", _segmenter(4, change=1.0), batch=4).process(_pan(2))
    frames = _pan(3)
    frames[2].results["gate"] = {"decision": "keyframe", "reason": "changed"}  # the backbone must run on it...
    frames[2].image = np.zeros((72, 128, 4), np.uint8)  # ...and fails there
    retried = StageCaller("segment", _segmenter(4, change=1.0), batch=4).process(frames)
    assert retried[2].is_failed and not retried[0].is_failed and not retried[1].is_failed
    assert "features" not in retried[0].results["segment"]  # the key: computed, never warped
    for again, once in zip(retried[:2], alone, strict=True):
        assert again.results["segment"] == once.results["segment"]


def test_a_frame_that_never_came_leaves_the_motion_incomplete_and_the_next_frame_runs_in_full(one_torch_thread):
    """A frame dropped under live overload never reaches the stage: its motion was missing from the key's and the
    next frame was warped a step short."""
    stage = _segmenter(4, change=1.0)
    frames = _pan(4)
    kept = stage.process([frames[0], frames[1], frames[3]])
    assert "features" in kept[1].results["segment"]  # warped: its motion is whole
    assert "features" not in kept[2].results["segment"]  # frame 2 never came: run in full, a new key


def test_feature_reuse_on_a_file_without_motion_vectors_says_so_at_load(caplog):
    """It was accepted silently and warped nothing. By default (motion_vectors: null) the file exports them."""
    data = {"stages": {"segment": {"model": MODEL, "weights": None, "options": {"feature_reuse": 3}}}}
    with caplog.at_level("WARNING"):
        load_config(data={**data, "sources": [{"type": "file", "path": str(BIKES), "motion_vectors": False}]})
    assert any("sources.0 exports no motion vectors" in r.getMessage() and "sources.0.motion_vectors: true" in r.getMessage()
               for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        cfg = load_config(data={**data, "sources": [{"type": "file", "path": str(BIKES)}]})
    assert not any("motion vectors" in r.getMessage() for r in caplog.records)
    assert cfg.sources[0].options.motion_vectors is True


def test_a_file_exports_motion_vectors_by_default_when_the_gate_moves_results_along_them():
    """Off by default, the shipped configs' gate copied results it could have moved (10 keyframes in 20 frames of
    the demo, 4 with vectors), unlike every figure of blinkflow bench skip."""
    source = {"type": "file", "path": str(BIKES)}

    def vectors(gate: dict, **options) -> bool:
        return load_config(data={"sources": [{**source, **options}], "gate": gate}).sources[0].options.motion_vectors

    assert vectors({"enabled": True}) is True  # gate.motion: mvs, the default
    assert vectors({"enabled": True, "motion": "auto"}) is True
    assert vectors({"enabled": True, "motion": "off"}) is False
    assert vectors({"enabled": False}) is False  # nothing reads them: decoding stays plain
    assert vectors({"enabled": True}, motion_vectors=False) is False  # as set
    assert vectors({"enabled": True}, hwaccel="cuda") is False  # the CUDA decoder exports none


def test_an_intra_picture_mid_stream_is_warped_at_the_frame_befores_motion(one_torch_thread):
    """An I-frame's field is zeros (the decoder tells no motion for it): a panning camera's I-frame was warped as if
    the pan had stopped. attach_decoder_motion marks it and the segmenter takes the step before (constant velocity):
    the same result as the true motion on a steady pan, and zeros still on a still scene."""
    from blinkflow.gate.motion import INTRA_KEY, PACKED_VECTORS, VECTORS_KEY, DecoderVectors, attach_decoder_motion

    decoders = {}
    marked = []
    for index, picture in enumerate((1, 2, 1, 2)):  # I P I P
        frame = Frame("s", index, index / 10, np.zeros((16, 32, 3), np.uint8))
        frame.meta[VECTORS_KEY] = [DecoderVectors(picture, (32, 16), (32, 16), np.zeros(0, PACKED_VECTORS))]
        attach_decoder_motion(frame, decoders)
        marked.append(bool(frame.meta.get(INTRA_KEY)))
    assert marked == [True, False, True, False]
    def motion_after(frames: list[Frame]) -> np.ndarray:
        stage = _segmenter(4, change=1.0)
        out = stage.process(frames)
        assert all("features" in f.results["segment"] for f in out[1:])  # warped through frame 2
        return stage._keys["s"].motion  # the motion the warps followed from the key

    told = motion_after(_pan(4))
    frames = _pan(4)
    frames[2].meta["mvs"] = np.zeros_like(frames[2].meta["mvs"])  # as the decoder gives an I-frame
    frames[2].meta[INTRA_KEY] = True
    np.testing.assert_array_equal(motion_after(frames), told)
    frames = _pan(4)
    frames[2].meta["mvs"] = np.zeros_like(frames[2].meta["mvs"])  # the same zeros, not marked: a step short
    assert np.abs(motion_after(frames) - told).max() >= 16


@pytest.mark.parametrize("data, words", [
    ({"sources": [{"type": "synthetic"}]}, "sources.0 (synthetic) exports no decoder motion vectors"),
    ({"sources": [{"type": "file", "path": str(BIKES)}], "gate": {"enabled": True}},
     "with gate.tiles the gate's refreshes recompute their changed tiles instead, so no frame is warped"),
])
def test_feature_reuse_that_can_never_warp_says_so_at_load(caplog, data, words):
    """A synthetic source, or the gate at its defaults (tiles on: refreshes recompute tiles), warped nothing and
    said nothing while every frame paid for the features kept."""
    stages = {"segment": {"model": MODEL, "weights": None, "options": {"feature_reuse": 3}}}
    with caplog.at_level("WARNING"):
        load_config(data={**data, "stages": stages})
    assert any(words in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_config(data={"sources": [{"type": "file", "path": str(BIKES)}], "gate": {"enabled": True, "tiles": None},
                          "stages": stages})
    assert not any("warped" in r.getMessage() for r in caplog.records)
