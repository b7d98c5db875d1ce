"""The Python API: ``blinkflow.run`` over a config, a dict, overrides and a notebook's own frames."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import blinkflow
from blinkflow.errors import SourceError
from tests.conftest import REPO_ROOT

LIGHT = {"sinks": [], "stages.flow.enabled": False, "stages.action.enabled": False, "stages.segment.enabled": False}


def test_importing_blinkflow_gives_the_api_without_importing_torch_or_ray():
    code = "import sys, blinkflow; assert callable(blinkflow.run) and callable(blinkflow.frames); " \
           "print(sorted(m for m in ('torch', 'ray', 'av') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_notebooks_own_frames_run_through_the_synthetic_pipeline_in_order():
    frames = (np.full((96, 128, 3), 20 * i, np.uint8) for i in range(5))
    records = list(blinkflow.run("configs/synthetic.yaml", sources=[blinkflow.frames(frames, id="nb", fps=10)],
                                 **LIGHT))
    assert [(r["stream"], r["index"], r["pts"]) for r in records] == [("nb", i, i / 10) for i in range(5)]
    assert records[0]["outcome"] == "processed" and "detect" in records[0]
    assert {r["outcome"] for r in records} <= {"processed", "reused"}


def test_frames_with_their_capture_times_count_latency_from_the_capture():
    import time

    captured = time.time() - 2.0  # taken two seconds ago, read now
    frames = [(np.full((64, 64, 3), 7, np.uint8), captured + i / 10) for i in range(3)] + [np.zeros((64, 64, 3), np.uint8)]
    records = list(blinkflow.run({"sources": [blinkflow.frames(frames, fps=10)], "gate": {"enabled": False}}))
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert all(r["latency_ms"] >= 1700 for r in records[:3]) and records[3]["latency_ms"] < 1000


def test_a_malformed_capture_time_or_frame_is_one_line_naming_the_frame():
    import datetime
    import time

    image = np.zeros((8, 8, 3), np.uint8)
    cases = {"noon": "is not a number", float("nan"): "is not a number", float("inf"): "is not a number",
             True: "is not a number", datetime.datetime.now(): "is not a number",
             time.time_ns(): "days ahead of this clock; capture times are seconds since the epoch",
             # seconds since boot gave 57 years of latency in every record, silently
             time.monotonic(): "is before 2001; capture times are seconds since the epoch", 0: "is before 2001"}
    for captured, says in cases.items():
        with pytest.raises(SourceError, match=says) as caught:
            list(blinkflow.run({"sources": [blinkflow.frames([image, (image, captured)], id="cam")],
                                "gate": {"enabled": False}}))
        assert str(caught.value).startswith("cam: frame 1") and "\n" not in str(caught.value)
    with pytest.raises(SourceError, match="frame 0 is a tuple, not an image"):
        list(blinkflow.run({"sources": [blinkflow.frames([(image, time.time(), "meta")], id="cam")],
                            "gate": {"enabled": False}}))


def test_an_array_where_a_capture_time_or_a_list_belongs_is_named_in_one_short_line():
    """An (image, mask) pair, or sources= without its list: the errors named the array by its repr (49 lines)."""
    from blinkflow.errors import ConfigError

    image = np.zeros((480, 640, 3), np.uint8)
    with pytest.raises(SourceError, match=r"capture time \(<uint8 array \(480, 640, 3\)>\) is not a number") as caught:
        list(blinkflow.run({"sources": [blinkflow.frames([(image, image)], id="cam")], "gate": {"enabled": False}}))
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        list(blinkflow.run({"sources": blinkflow.frames([image]), "gate": {"enabled": False}}))
    assert "\n" not in str(caught.value) and "<uint8 array (480, 640, 3)>" in str(caught.value), str(caught.value)


def test_max_frames_takes_no_more_from_a_cameras_generator_and_resize_applies():
    """A camera SDK's generator blocks until its next frame: the run must not ask for one past max_frames. resize
    on a frames source was accepted and ignored."""
    pulled = []

    def camera():
        for i in range(100):
            pulled.append(i)
            yield np.zeros((48, 64, 3), np.uint8)

    source = blinkflow.frames(camera(), max_frames=3, resize=[32, 24])
    records = list(blinkflow.run({"sources": [source], "gate": {"enabled": False}}))
    assert [r["index"] for r in records] == [0, 1, 2] and pulled == [0, 1, 2]
    assert {(r["width"], r["height"]) for r in records} == {(32, 24)}


def test_capture_times_from_a_clock_ahead_count_from_arrival_and_lists_are_pairs_too(caplog):
    import time

    image = np.zeros((8, 8, 3), np.uint8)
    frames = [[image, time.time() - 1.0], (image, time.time() + 5.0), (image, time.time() + 6.0)]
    records = list(blinkflow.run({"sources": [blinkflow.frames(frames, id="cam")], "gate": {"enabled": False}}))
    assert records[0]["latency_ms"] >= 900  # a list pair counts from its capture
    assert all(0 <= r["latency_ms"] < 900 for r in records[1:]) and records[1]["ts"] <= time.time()
    assert sum("run ahead of this machine's clock" in r.message for r in caplog.records) == 1  # once a stream


@pytest.mark.parametrize("runner", ["local", "threaded"])
def test_frames_captured_long_ago_still_go_in_full_live_waves(runner, monkeypatch):
    """A wave's wait counts from when its frames arrived, not from their capture: counting from the capture, a
    run that was behind sent every frame alone and fell further behind."""
    import time

    from blinkflow.runners.base import StageCaller

    sizes = []
    original = StageCaller._process_batch

    def recorded(self, frames):
        if self.name == "chaos":
            sizes.append(len(frames))
        return original(self, frames)

    monkeypatch.setattr(StageCaller, "_process_batch", recorded)
    old = time.time() - 10.0
    frames = [(np.zeros((8, 8, 3), np.uint8), old + i / 100) for i in range(16)]
    records = list(blinkflow.run({"sources": [blinkflow.frames(frames, id="cam")], "gate": {"enabled": False},
                                  "runtime": {"mode": "live", "runner": runner, "max_in_flight": 64},
                                  "stages": {"chaos": {"batch": 4, "max_wait_ms": 500}}}))
    assert len(records) == 16 and all(r["latency_ms"] >= 9000 for r in records)
    assert sizes == [4, 4, 4, 4], sizes


def test_stopping_the_loop_stops_the_pipeline():
    frames = (np.full((64, 64, 3), 7, np.uint8) for _ in range(10_000))
    seen = 0
    for record in blinkflow.run({"sources": [blinkflow.frames(frames)], "gate": {"enabled": False}}):
        seen += 1
        if seen == 3:
            break
    assert seen == 3  # and the generator's close returned: the pipeline thread has ended


def test_ctrl_c_in_the_loop_drains_the_run_and_commits_the_configs_sinks(tmp_path):
    import contextlib
    import json

    out = tmp_path / "out.jsonl"
    config = {"sources": [{"type": "synthetic", "width": 32, "height": 24, "num_frames": 100_000}],
              "stages": {"chaos": {"batch": 2}}, "sinks": [{"type": "jsonl", "path": str(out)}]}
    seen = []
    with pytest.raises(KeyboardInterrupt), contextlib.closing(blinkflow.run(config)) as records:
        for record in records:
            seen.append(record["index"])
            if len(seen) == 5:
                raise KeyboardInterrupt  # what Ctrl-C raises in a notebook's loop
    written = [json.loads(line)["index"] for line in out.read_text().splitlines()]  # committed, not discarded
    assert written[:5] == seen == [0, 1, 2, 3, 4]
    assert written == list(range(len(written))) and len(written) < 1000  # in flight finished; nothing more read
    assert not list(tmp_path.glob(".out*"))


def test_a_bad_frame_raises_its_one_line_error():
    with pytest.raises(SourceError, match="frame 1 is float32 .* must be HxWx3 uint8 RGB"):
        list(blinkflow.run({"sources": [blinkflow.frames([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.float32)])]}))


def test_overrides_name_yaml_paths_and_bad_ones_are_config_errors():
    cfg = blinkflow.load_config("configs/synthetic.yaml", stages__detect__batch=2, **{"gate.enabled": False})
    assert cfg.stages["detect"].batch == 2 and cfg.gate.enabled is False
    with pytest.raises(blinkflow.ConfigError, match=r"stages\.detect\.batch: 0 is out of range"):
        blinkflow.load_config("configs/synthetic.yaml", **{"stages.detect.batch": 0})
    with pytest.raises(blinkflow.ConfigError, match="frames source"):
        blinkflow.load_config({"sources": [{"type": "frames"}]})


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(capsys):
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 6
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8 and lines[0].startswith("0 processed")


def test_a_missing_config_path_is_an_error_not_the_shipped_config_of_that_name(tmp_path, monkeypatch):
    from blinkflow.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    assert blinkflow.load_config("demo.yaml").sinks  # the shipped demo, from anywhere
    assert blinkflow.load_config("configs/demo.yaml").sinks
    with pytest.raises(ConfigError, match="experiments/demo.yaml"):
        blinkflow.load_config("experiments/demo.yaml")  # it ran configs/demo.yaml and wrote its outputs


@pytest.mark.parametrize("image, advice", [
    (np.zeros((8, 8, 3), np.float32), "(arr * 255).clip(0, 255).astype(np.uint8)"),
    (np.zeros((8, 8, 3), np.uint16), "(arr >> 8).astype(np.uint8)"),
    (np.zeros((8, 8), np.uint8), "np.repeat(arr[..., None], 3, axis=-1)"),
    (np.zeros((8, 8, 4), np.uint8), "arr[..., :3]"),
])
def test_a_frame_of_another_kind_is_refused_with_the_conversion_that_keeps_its_picture(image, advice):
    """The advice was arr.astype(np.uint8) for all: floats in [0, 1] went black and 16-bit pixels wrapped."""
    with pytest.raises(SourceError) as error:
        list(blinkflow.run({"sources": [blinkflow.frames([image], id="cam")], "gate": {"enabled": False}}))
    assert advice in str(error.value)


def test_a_camera_that_refills_one_buffer_gets_each_frames_own_results():
    """frames() kept the caller's array: a camera SDK filling one buffer for every read changed the frames
    waiting in a wave, and the gate decided (and models ran) on a later frame's pixels."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(12)]

    def refilled():
        buffer = np.empty_like(images[0])
        for image in images:
            buffer[...] = image
            yield buffer

    def gate_changes(source) -> list:
        cfg = {"sources": [blinkflow.frames(source, id="cam")], "gate": {"enabled": True, "threshold": 0.2},
               "stages": {"chaos": {"batch": 8}}}
        return [r["gate"].get("changed") for r in blinkflow.run(cfg)]

    assert gate_changes(refilled()) == gate_changes([image.copy() for image in images])


def test_a_frames_iterable_that_raises_ends_its_own_stream_and_the_sinks_commit(tmp_path):
    """OSError('camera unplugged') from the caller's generator stopped every stream and threw the sinks away."""
    def unplugged():
        for _ in range(4):
            yield np.zeros((48, 64, 3), np.uint8)
        raise OSError("camera unplugged")

    out = tmp_path / "e.jsonl"
    cfg = {"sources": [blinkflow.frames(unplugged(), id="usb"), {"type": "synthetic", "id": "other", "num_frames": 6,
                                                                 "width": 64, "height": 48}],
           "gate": {"enabled": False}, "sinks": [{"type": "jsonl", "path": str(out)}]}
    records = []
    with pytest.raises(SourceError, match=r"usb: the frames iterable raised after 4 frames: OSError: camera unplugged"):
        for record in blinkflow.run(cfg):
            records.append(record)
    assert sorted((r["stream"], r["index"]) for r in records) == [("other", i) for i in range(6)] + [("usb", i) for i in range(4)]
    assert out.read_text().count("\n") == 10
    with pytest.raises(Exception, match=r"frames: a frames source takes an iterable .* not a int"):
        blinkflow.load_config({"sources": [blinkflow.frames(5)]})


def test_break_returns_even_when_the_frames_iterable_blocks_in_a_read(monkeypatch):
    import queue
    import time as clock

    from blinkflow import api

    monkeypatch.setattr(api, "DRAIN_QUIET_S", 0.5)
    feed: queue.Queue = queue.Queue()
    for _ in range(5):
        feed.put(np.zeros((48, 64, 3), np.uint8))

    def camera():
        while True:
            yield feed.get()  # the camera goes quiet after 5 frames: the read blocks

    started = clock.monotonic()
    for count, _ in enumerate(blinkflow.run({"sources": [blinkflow.frames(camera(), id="cam")],
                                              "gate": {"enabled": False}}), 1):
        if count == 3:
            break
    assert clock.monotonic() - started < 10  # it waited forever
    feed.put(None)  # let the pipeline thread end


def test_two_ray_sessions_at_once_leave_ray_up_until_the_last_one_ends(monkeypatch):
    import ray

    from blinkflow import ray_session

    state = {"up": False, "shutdowns": 0}

    def start(*args, **kwargs):
        started, state["up"] = not state["up"], True
        return started

    def shutdown():
        state["up"], state["shutdowns"] = False, state["shutdowns"] + 1

    monkeypatch.setattr(ray_session, "start_ray", start)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    first, second = ray_session.ray_session(), ray_session.ray_session()
    first.__enter__()  # the pipeline that starts Ray...
    second.__enter__()  # ...and one that joins it
    first.__exit__(None, None, None)  # the first to finish shut Ray down under the other
    assert state == {"up": True, "shutdowns": 0}
    second.__exit__(None, None, None)
    assert state == {"up": False, "shutdowns": 1}


def test_numpy_numbers_are_numbers_in_overrides():
    """A notebook's sweep value (np.int64(2)) was refused as "expected an integer", which it is."""
    records = list(blinkflow.run({"sources": [blinkflow.frames([np.zeros((8, 8, 3), np.uint8)] * 4, fps=10)],
                                  "gate": {"enabled": False}}, **{"sources.0.max_frames": np.int64(2),
                                                                  "sources.0.fps": np.float32(5)}))
    assert [r["index"] for r in records] == [0, 1]



@pytest.mark.parametrize("bad, hint", [(None, "None: the iterable gave None for a frame"),
                                       (np.zeros((8, 8, 3), bool), "a mask: arr.astype(np.uint8) * 255"),
                                       (np.zeros((0, 0, 3), np.uint8), "an empty image: leave it out")])
def test_a_bad_frame_gets_the_fix_for_what_it_is(bad, hint):
    """None, a boolean mask and an empty image were all told to convert a PIL image."""
    image = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(SourceError) as caught:
        list(blinkflow.run({"sources": [blinkflow.frames([image, bad], id="cam")], "gate": {"enabled": False}}))
    assert str(caught.value).startswith("cam: frame 1 is") and hint in str(caught.value)
