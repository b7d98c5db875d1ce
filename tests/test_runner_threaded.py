"""The threaded runner: stages in threads of their own, with outputs equal to the local runner's."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blinkflow.config import load_config
from blinkflow.frame import Frame, Outcome, StreamEnd, Tick
from blinkflow.runners.base import StageCaller
from blinkflow.runners.local import LocalRunner
from blinkflow.runners.threaded import ThreadedRunner
from blinkflow.sinks import MemorySink
from tests.conftest import write_test_video

PARKING = Path(__file__).resolve().parent / "data" / "static" / "car-detection-19s.mp4"


def run(runner_cls, cfg, **kwargs):
    sink = MemorySink()
    summary = runner_cls(cfg, sinks=[sink], **kwargs).run()
    return summary, sink.results


def comparable(results):
    return [(r.stream_id, r.index, r.outcome.value, r.reuse_of, r.error, repr(r.results)) for r in results]


def two_clips(tmp_path, frames=(9, 7)):
    return [{"type": "file", "path": str(write_test_video(tmp_path / f"c{i}.mp4", frames=n))}
            for i, n in enumerate(frames)]


def test_threaded_equals_local_with_failures_and_a_holding_stage(tmp_path):
    cfg = load_config(data={
        "sources": two_clips(tmp_path) + [{"type": "synthetic", "id": "syn", "width": 64, "height": 48, "num_frames": 8}],
        "gate": {"enabled": True, "threshold": 0.02, "batch": 3},
        "stages": {"chaos": {"batch": 3, "options": {"fail_indices": [4], "hold": 3}}},
    })
    local_summary, local_results = run(LocalRunner, cfg)
    summary, results = run(ThreadedRunner, cfg)
    assert comparable(results) == comparable(local_results)
    assert summary.totals == local_summary.totals
    assert summary.totals["failed"] > 0  # frame 4 of a stream the gate did not reuse it on fails alone
    for stream in ("c0", "c1", "syn"):
        assert [r.index for r in results if r.stream_id == stream] == list(range({"c0": 9, "c1": 7}.get(stream, 8)))
    assert summary.stage_frames["chaos"] == local_summary.stage_frames["chaos"]


@pytest.mark.parametrize("adaptive", [False, True])
def test_threaded_equals_local_with_the_gates_audit_feedback(adaptive):
    """The gate's adaptive decisions hang on audits audit_lag frames old: the driver settles them before a wave
    goes, so the stages in their threads make the same decisions as the local runner's."""
    cfg = load_config(data={
        "sources": [{"type": "synthetic", "id": f"still{i}", "seed": 7 + i, "width": 96, "height": 64,
                     "num_frames": 14, "num_objects": 2, "action": "static", "static_camera": True} for i in range(2)],
        "gate": {"enabled": True, "refresh": {"segment": 2}, "max_reuse": 8, "adaptive": adaptive,
                 "adapt_bounds": adaptive, "audit_lag": 2, "batch": 2, "lighting": False},
        "stages": {"detect": {"batch": 2}, "segment": {"model": "unet_small", "batch": 2,
                                                       "options": {"input_size": [32, 32]}}},
    })
    _, local_results = run(LocalRunner, cfg)
    _, results = run(ThreadedRunner, cfg)
    assert comparable(results) == comparable(local_results)
    refreshes = [r.index for r in local_results if r.stream_id == "still0" and r.results["gate"]["decision"] == "refresh"]
    assert refreshes[:2] == ([3, 7] if adaptive else [3, 6])


def object_weighted_parking(max_frames: int, segment_replicas: int = 1):
    """The parking clip through the real detector and segmenter, the gate weighting change on known objects (fed
    their boxes audit_lag frames late) and the segmenter leaning on its previous masks (shared with the Ray tests)."""
    return load_config(data={
        "sources": [{"type": "file", "id": "parking", "path": str(PARKING), "resize": [384, 216],
                     "max_frames": max_frames, "motion_vectors": True}],
        "gate": {"enabled": True, "object_weight": 4.0, "audit_lag": 4, "region_budget": True, "tile_margin": 0},
        "stages": {"detect": {"model": "yolox_nano", "weights": "shipped", "batch": 2,
                              "options": {"score_threshold": 0.3, "model_args": {"input_size": [224, 224]}}},
                   "segment": {"model": "deeplabv3_mobilenet_v2", "weights": "shipped", "batch": 2,
                               "replicas": segment_replicas, "options": {"input_size": None, "keep_margin": 2.0}}},
    })


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_threaded_equals_local_with_real_models_and_object_weighted_regions(one_torch_thread):
    """The real detector and segmenter with per-stream state (boxes carried, tiles around cached activations,
    masks leaning on the previous ones), fed the stream's boxes audit_lag frames late: the same as local."""
    cfg = object_weighted_parking(max_frames=48)
    _, local_results = run(LocalRunner, cfg)
    _, results = run(ThreadedRunner, cfg)
    assert comparable(results) == comparable(local_results)
    assert any(r.outcome is Outcome.PROCESSED and "tiles" in r.results["segment"] for r in local_results), \
        "no partial frame ran the segmenter on its changed tiles"


def test_replicas_spread_the_streams_and_each_stream_meets_one_copy(tmp_path, monkeypatch):
    """gate.replicas and a stage's replicas: K copies, each in its thread; a stage with per-stream state gets
    each stream on one copy, in order, so the outputs still equal the local runner's (which runs one copy)."""
    threads: dict[str, set[str]] = {}
    process_batch = StageCaller._process_batch

    def recorded(self, frames):
        for frame in frames:
            threads.setdefault(f"{self.name}/{frame.stream_id}", set()).add(threading.current_thread().name)
        return process_batch(self, frames)

    monkeypatch.setattr(StageCaller, "_process_batch", recorded)
    sources = two_clips(tmp_path, (8, 8)) + [
        {"type": "synthetic", "id": f"syn{i}", "seed": i, "width": 64, "height": 48, "num_frames": 8} for i in range(3)]
    cfg = load_config(data={
        "sources": sources,
        "gate": {"enabled": True, "threshold": 0.02, "batch": 2, "replicas": 2},
        "stages": {"chaos": {"replicas": 2, "batch": 2, "options": {"hold": 3}}},
    })
    _, local_results = run(LocalRunner, cfg)
    threads.clear()
    summary, results = run(ThreadedRunner, cfg)
    assert comparable(results) == comparable(local_results)
    streams = ("c0", "c1", "syn0", "syn1", "syn2")
    for stream in streams:
        assert [r.index for r in results if r.stream_id == stream] == list(range(8))
        seen = [r.results["chaos"]["seen"] for r in results if r.stream_id == stream and r.outcome is Outcome.PROCESSED]
        assert seen == list(range(1, len(seen) + 1)) and seen  # one copy saw the whole stream: 1, 2, ...
        assert len(threads[f"gate/{stream}"]) == 1 and len(threads.get(f"chaos/{stream}", {""})) == 1
    gate_threads = set().union(*(threads[f"gate/{stream}"] for stream in streams))
    assert len(gate_threads) == 2, "the streams were not spread over both gate copies"
    assert summary.stage_frames["gate"] == 40


def _quiet_camera(sources, hub, stop, tick_s=None):
    """Three frames, then 0.6 s of quiet in which the live streams send ticks (as StreamHub.items does)."""
    assert tick_s == pytest.approx(0.02)
    for index in range(3):
        yield Frame(stream_id="cam", index=index, pts=index / 10, image=np.zeros((48, 64, 3), np.uint8))
    quiet_until = time.time() + 0.6
    while time.time() < quiet_until:
        time.sleep(tick_s)
        yield Tick()
    yield StreamEnd("cam")


@pytest.mark.parametrize("runner_cls", [LocalRunner, ThreadedRunner])
def test_a_quiet_live_stream_still_gets_its_waiting_frames_through_on_the_ticks(runner_cls, monkeypatch):
    """A wave of 8 with 3 frames: in live mode it goes once max_wait_ms has passed, and its results are handed
    out while the stream stays quiet, not when its next frame (or its end) comes 0.6 s later."""
    import blinkflow.runners.chains as chains
    import blinkflow.runners.local as local

    monkeypatch.setattr(local, "open_sources", _quiet_camera)
    monkeypatch.setattr(chains, "open_sources", _quiet_camera)
    cfg = load_config(data={"sources": [], "stages": {"chaos": {"batch": 8, "max_wait_ms": 20}},
                            "runtime": {"mode": "live"}})
    summary, results = run(runner_cls, cfg)
    assert summary.totals["processed"] == 3 and [r.index for r in results] == [0, 1, 2]
    assert max(r.latency_s for r in results) < 0.4, [r.latency_s for r in results]


def _camera_added_again(sources, hub, stop, tick_s=None):
    """A camera removed and added again under the same id (the control API's DELETE, then POST): the hub frees
    the id once the end is taken, so the new camera's frame 0 may come while the old one's end is in flight."""
    for count in (2, 8):
        for index in range(count):
            yield Frame(stream_id="cam", index=index, pts=index / 10, image=np.full((48, 64, 3), index, np.uint8))
        yield StreamEnd("cam")


@pytest.mark.parametrize("runner_cls", [LocalRunner, ThreadedRunner])
def test_a_camera_added_again_under_its_old_id_starts_afresh(runner_cls, monkeypatch):
    import blinkflow.runners.chains as chains
    import blinkflow.runners.local as local

    monkeypatch.setattr(local, "open_sources", _camera_added_again)
    monkeypatch.setattr(chains, "open_sources", _camera_added_again)
    cfg = load_config(data={"sources": [], "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 50}}}})
    summary, results = run(runner_cls, cfg)  # before: 6 frames "lost", written twice, then the accounting failed
    assert [(r.index, r.outcome) for r in results] == [(i, Outcome.PROCESSED) for i in (0, 1, *range(8))]
    assert summary.totals == {"processed": 10, "reused": 0, "dropped": 0, "failed": 0, "decoded": 10}


def _slow_and_busy_cameras(sources, hub, stop, tick_s=None):
    """One frame of a slow camera, then a busy one in the other shard every 10 ms: the hub is never quiet,
    so no tick comes while the busy camera sends."""
    image = np.zeros((48, 64, 3), np.uint8)
    yield Frame(stream_id="slow", index=0, pts=0.0, image=image)
    for index in range(40):
        time.sleep(0.01)
        yield Frame(stream_id="busy", index=index, pts=index / 100, image=image)
    yield StreamEnd("slow")
    yield StreamEnd("busy")


def test_a_live_wave_goes_after_max_wait_ms_while_another_shard_keeps_the_hub_busy(monkeypatch):
    import zlib

    import blinkflow.runners.chains as chains

    assert zlib.crc32(b"slow") % 2 != zlib.crc32(b"busy") % 2  # two shards: the stage's two copies
    monkeypatch.setattr(chains, "open_sources", _slow_and_busy_cameras)
    cfg = load_config(data={"sources": [], "runtime": {"mode": "live"},
                            "stages": {"chaos": {"batch": 8, "max_wait_ms": 20, "replicas": 2,
                                                 "options": {"temporal": True}}}})
    _, results = run(ThreadedRunner, cfg)
    slow = [r for r in results if r.stream_id == "slow"]
    # before: it waited for its stream's end, 0.4 s later
    assert len(slow) == 1 and slow[0].outcome is Outcome.PROCESSED and slow[0].latency_s < 0.25, slow[0].latency_s


def test_quiet_live_streams_tick_at_max_wait_ms_but_never_in_a_busy_loop():
    def tick_s(mode, max_wait_ms):
        cfg = load_config(data={"sources": [], "runtime": {"mode": mode},
                                "stages": {"chaos": {"batch": 4, "max_wait_ms": max_wait_ms}}})
        return ThreadedRunner(cfg).tick_s()

    assert tick_s("live", 20) == pytest.approx(0.02)
    assert tick_s("live", 1) == pytest.approx(0.005)  # MIN_TICK_MS
    assert tick_s("live", 0) is None  # every frame goes as it comes: nothing waits for a tick (a 0 s tick spun)
    assert tick_s("archive", 20) is None


@pytest.mark.parametrize("failing", [0, 5])
def test_frames_that_would_carry_a_failed_frames_results_fail_and_the_gate_starts_afresh(failing):
    """A keyframe (0) or a cut (5, another scene) on which a model stage fails: the reuses after it used to carry
    an older frame's results (or nothing) as if they were its own."""
    scenes = [np.full((48, 64, 3), 40, np.uint8)] * failing + [np.full((48, 64, 3), 200, np.uint8)] * (16 - failing)

    def run_with(runner_cls):
        cfg = load_config(data={"sources": [{"type": "frames", "id": "cam", "frames": [i.copy() for i in scenes]}],
                                "gate": {"enabled": True, "threshold": 0.05, "batch": 2},
                                "stages": {"chaos": {"batch": 2, "options": {"fail_indices": [failing]}}}})
        return cfg.gate.audit_lag, run(runner_cls, cfg)[1]

    lag, results = run_with(LocalRunner)
    assert comparable(run_with(ThreadedRunner)[1]) == comparable(results)
    stuck = [r for r in results if failing < r.index < failing + lag]
    assert stuck and all(r.outcome is Outcome.FAILED and f"frame {failing}, whose results it reuses, failed" in r.error
                         for r in stuck)
    again = results[failing + lag]
    assert again.outcome is Outcome.PROCESSED and again.results["gate"]["reason"] == "failed"
    assert all(r.outcome is not Outcome.FAILED for r in results[failing + lag:])


def test_two_gate_copies_give_the_local_runners_decisions_when_a_wave_is_longer_than_the_audit_lag():
    """Per-shard waves (threaded, Ray) and mixed ones (local) gave the adaptive gate its feedback on different
    frames once a wave was longer than audit_lag; the lag is now at least one wave."""
    import zlib

    assert zlib.crc32(b"a") % 2 != zlib.crc32(b"d") % 2  # one stream on each gate copy
    cfg = load_config(data={
        "sources": [{"type": "synthetic", "id": name, "seed": 7 + i, "width": 96, "height": 64, "num_frames": 24,
                     "num_objects": 2, "action": "static", "static_camera": True} for i, name in enumerate("ad")],
        "gate": {"enabled": True, "refresh": {"segment": 2}, "max_reuse": 8, "replicas": 2, "adapt_bounds": True,
                 "audit_lag": 2, "batch": 4, "lighting": False},
        "stages": {"detect": {"batch": 4}, "segment": {"model": "unet_small", "batch": 4, "options": {"input_size": [32, 32]}}},
    })
    _, local = run(LocalRunner, cfg)
    _, threaded = run(ThreadedRunner, cfg)
    assert sorted(comparable(threaded)) == sorted(comparable(local))
    assert any("audit" in r.results for r in local)  # the feedback had something to say


def test_the_hub_ticks_while_its_streams_are_quiet_and_only_when_asked():
    from blinkflow.streams import StreamHub

    def items(tick_s):
        hub = StreamHub(keep_open=True)
        threading.Timer(0.3, hub.close).start()
        return list(hub.items(tick_s))

    ticks = items(0.05)
    assert 3 <= len(ticks) <= 7 and all(isinstance(item, Tick) for item in ticks)
    assert items(None) == []


def test_stages_work_at_the_same_time(tmp_path, monkeypatch):
    """Wave i+1 is in one stage while wave i is in the next: some call of each stage overlaps one of the other."""
    calls: list[tuple[str, str, float, float]] = []
    lock = threading.Lock()
    process_batch = StageCaller._process_batch

    def timed(self, frames):
        started = time.monotonic()
        try:
            return process_batch(self, frames)
        finally:
            with lock:
                calls.append((self.name, threading.current_thread().name, started, time.monotonic()))

    monkeypatch.setattr(StageCaller, "_process_batch", timed)
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (12, 12)),
        "stages": {"segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]}},
                   "chaos": {"batch": 2, "options": {"sleep_ms": 30}}},
    })
    summary, results = run(ThreadedRunner, cfg)
    assert summary.totals["processed"] == 24
    threads = {name: {thread for stage, thread, _, _ in calls if stage == name} for name in ("segment", "chaos")}
    assert all(len(names) == 1 for names in threads.values()) and threads["segment"] != threads["chaos"]
    chaos = [(a, b) for stage, _, a, b in calls if stage == "chaos"]
    segment = [(a, b) for stage, _, a, b in calls if stage == "segment"]
    assert any(a < d and c < b for a, b in chaos for c, d in segment), "no segment call ran during a chaos call"


def test_live_mode_drops_the_oldest_frames_under_overload(tmp_path):
    check_live_overload_drops_the_oldest_frames(ThreadedRunner, tmp_path)


def check_live_overload_drops_the_oldest_frames(runner_cls, tmp_path):
    """Live mode with one wave in flight and a slow stage: the oldest waiting frames are dropped, counted, and
    still delivered in order, without results (shared with the Ray runner's test)."""
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (30, 30)),
        "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 60}}},
        "runtime": {"mode": "live", "max_in_flight": 1},
    })
    summary, results = run(runner_cls, cfg)
    totals = summary.totals
    assert totals["dropped"] > 0 and totals["processed"] + totals["dropped"] == 60
    assert all("chaos" not in r.results for r in results if r.outcome is Outcome.DROPPED)
    for stream in ("c0", "c1"):
        assert [r.index for r in results if r.stream_id == stream] == list(range(30))


def test_a_release_that_raises_fails_the_run_and_stops_every_thread(tmp_path, monkeypatch):
    from blinkflow.stages.chaos import Chaos

    def broken_flush(self):
        raise RuntimeError("chaos: flush broke")

    monkeypatch.setattr(Chaos, "flush", broken_flush)
    torn_down = []
    monkeypatch.setattr(Chaos, "teardown", lambda self: torn_down.append(self))
    cfg = load_config(data={"sources": two_clips(tmp_path, (6, 6)),
                            "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 5}}}})
    sink = MemorySink()
    before = {t.name for t in threading.enumerate()}
    from blinkflow.errors import StageError

    with pytest.raises(StageError, match=r"stages.chaos: flushing at the run's end failed \(RuntimeError: chaos: flush broke"):
        ThreadedRunner(cfg, sinks=[sink]).run()
    assert len(torn_down) == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("blinkflow-chaos") and t.name not in before]


def test_a_lane_runs_calls_in_order_hands_errors_over_and_closes_without_waiting_forever():
    from concurrent.futures import CancelledError

    from blinkflow.lanes import Lane

    lane, seen, release = Lane("test-lane"), [], threading.Event()
    done = [lane.submit(seen.append, i) for i in range(5)]
    failing = lane.submit(lambda: 1 / 0)
    assert [f.result(timeout=5) for f in done] == [None] * 5 and seen == list(range(5))
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=5)
    stuck, waiting = lane.submit(release.wait), lane.submit(seen.append, "never")
    time.sleep(0.05)
    started = time.monotonic()
    assert lane.close(timeout_s=0.2) is False and time.monotonic() - started < 2  # still in a call: not waited for
    assert lane._thread.daemon and waiting.cancelled()
    with pytest.raises(CancelledError):
        waiting.result()
    release.set()
    assert stuck.result(timeout=5) is True and "never" not in seen
    with pytest.raises(RuntimeError, match="lane test-lane is closed"):  # not a future no thread would ever finish
        lane.submit(seen.append, "late")


def test_an_abort_with_a_stage_stuck_in_a_call_ends_in_bounded_time(tmp_path, monkeypatch, caplog):
    """The driver fails (a second signal, a source error) while one copy of a stage hangs in a call: the run
    ends after STOP_WAIT_S with the error, says which stage it left behind, and tears down the others, the idle
    copy closed after the stuck one included."""
    import blinkflow.runners.chains as chains
    import blinkflow.runners.threaded as threaded
    from blinkflow.stages.chaos import Chaos
    from blinkflow.stages.segment import Segment

    hang, entered = threading.Event(), threading.Event()
    monkeypatch.setattr(threaded, "STOP_WAIT_S", 0.3)

    def process(self, frames):  # the second wave (frames 2 and 3) goes to the first copy (round robin): it hangs
        if frames[0].index == 2:
            entered.set()
            hang.wait()
        return frames

    monkeypatch.setattr(Chaos, "process", process)

    def failing_source(sources, hub, stop, tick_s=None):
        for index in range(4):
            yield Frame(stream_id="cam", index=index, pts=index / 10, image=np.zeros((48, 64, 3), np.uint8))
        assert entered.wait(10), "the chaos stage never got the second wave"
        raise RuntimeError("aborted")

    monkeypatch.setattr(chains, "open_sources", failing_source)
    cfg = load_config(data={"sources": [], "stages": {"segment": {"model": "unet_small", "batch": 2,
                                                                   "options": {"input_size": [32, 32]}},
                                                       "chaos": {"batch": 2, "replicas": 2}}})
    torn_down = []
    monkeypatch.setattr(Chaos, "teardown", lambda self: torn_down.append("chaos"))
    monkeypatch.setattr(Segment, "teardown", lambda self: torn_down.append("segment"))
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="aborted"):
            ThreadedRunner(cfg, sinks=[MemorySink()]).run()
        assert time.monotonic() - started < 10
        assert caplog.text.count("is still in a call") == 1 and "stage chaos is still in a call" in caplog.text
        assert torn_down == ["segment", "chaos"]  # the idle copy too, though the wait was spent on the stuck one
    finally:
        hang.set()


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_queue_gauges_rise_while_waves_wait_and_end_at_zero(tmp_path):
    from blinkflow.metrics import MetricsRecorder

    class Gauges(MetricsRecorder):
        def __init__(self):
            self.samples: list[tuple[str, int, int]] = []

        def on_queue(self, stage, depth, in_flight):
            self.samples.append((stage, depth, in_flight))

    gauges = Gauges()
    cfg = load_config(data={"sources": two_clips(tmp_path, (40, 40)),
                            "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 40}}},
                            "runtime": {"max_in_flight": 6}})
    summary, _ = run(ThreadedRunner, cfg, metrics=gauges)
    assert summary.totals["processed"] == 80
    assert any(depth > 0 and in_flight > 1 for _, depth, in_flight in gauges.samples)
    assert gauges.samples[-1] == ("chaos", 0, 0)


def test_frames_dropped_under_overload_bring_their_motion_vectors_to_the_next_kept_frame(tmp_path, monkeypatch):
    """A frame dropped while waves waited took its decoder vectors with it: the gate composed the motion of the
    kept frames without the dropped frames' steps (as the fps filter does not)."""
    from blinkflow.gate import policy
    from blinkflow.gate.motion import VECTORS_KEY

    seen: dict[str, list[tuple[int, int]]] = {}
    attach = policy.attach_decoder_motion

    def count(frame, trackers):
        seen.setdefault(frame.stream_id, []).append((frame.index, len(frame.meta.get(VECTORS_KEY) or [])))
        return attach(frame, trackers)

    monkeypatch.setattr(policy, "attach_decoder_motion", count)
    sources = [dict(source, motion_vectors=True) for source in two_clips(tmp_path, (30, 30))]
    cfg = load_config(data={"sources": sources, "gate": {"enabled": True, "motion": "mvs"},
                            "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 60}}},
                            "runtime": {"mode": "live", "max_in_flight": 1}})
    summary, results = run(ThreadedRunner, cfg)
    assert summary.totals["dropped"] > 0
    for stream, kept in seen.items():
        dropped = {r.index for r in results if r.stream_id == stream and r.outcome is Outcome.DROPPED}
        previous = -1
        for index, entries in kept:  # one entry a decoded frame: its own and every dropped one's since the last kept
            assert entries == index - previous, (stream, index, sorted(dropped))
            previous = index
        assert any(index - 1 in dropped for index, _ in kept)


def test_a_dropped_frames_vectors_go_to_the_next_frame_of_its_stream_never_an_earlier_one():
    """A frame the source dropped arrives after older frames of its stream still wait for their wave: its vectors
    went to the first of those (frame 1 got frame 4's motion, frame 5 lacked it)."""
    from blinkflow.gate.motion import VECTORS_KEY
    from blinkflow.runners.base import DroppedMotion

    image = np.zeros((4, 4, 3), np.uint8)

    def frame(index, stream="cam"):
        return Frame(stream, index, float(index), image, meta={VECTORS_KEY: [f"v{index}"]})

    motion = DroppedMotion()
    waiting = [frame(i) for i in (1, 2, 3)]
    for item in waiting:
        motion.arrived(item)
    motion.drop(frame(4), waiting)  # dropped at the source, after 1..3 arrived
    fifth = frame(5)
    motion.arrived(fifth)
    assert [f.meta[VECTORS_KEY] for f in waiting] == [["v1"], ["v2"], ["v3"]]
    assert fifth.meta[VECTORS_KEY] == ["v4", "v5"]
    queue = [frame(7), frame(8), frame(7, "other")]
    motion.drop(frame(6), queue)  # the oldest waiting frame dropped for newer ones (live overload)
    assert queue[0].meta[VECTORS_KEY] == ["v6", "v7"] and queue[2].meta[VECTORS_KEY] == ["v7"]
    motion.drop(frame(9))  # held for the next to come...
    restarted = frame(0)
    motion.arrived(restarted)  # ...but the stream started again: not this decode's motion
    later = frame(10)
    motion.arrived(later)
    assert restarted.meta[VECTORS_KEY] == ["v0"] and later.meta[VECTORS_KEY] == ["v10"]


def test_frames_a_restarted_stage_lost_keep_their_pts_and_size_in_the_records():
    """A lost frame (chains.ChainRunner._close_stream) was written with pts NaN, which strict JSON readers refuse,
    and a 1x1 image that the mp4 sink stretched over the video; it keeps what it was decoded with."""
    import json
    import types

    from blinkflow.runners.chains import ChainRunner
    from blinkflow.sinks import to_record

    runner, pushed = object.__new__(ChainRunner), []
    runner.output = types.SimpleNamespace(push=pushed.extend, end_stream=lambda stream_id: None)
    runner.ledger = {}
    for index in (3, 1):  # decoded, then lost with the actor
        runner._in_ledger(Frame("cam", index, index / 10, np.zeros((48, 64, 3), np.uint8)))
    runner._close_stream("cam")
    records = [to_record(frame.finish()) for frame in pushed]
    json.dumps(records, allow_nan=False)  # strict JSON
    assert [(r["index"], r["pts"], r["width"], r["height"], r["outcome"]) for r in records] == [
        (1, 0.1, 64, 48, "failed"), (3, 0.3, 64, 48, "failed")]
    assert "lost: the stage actor holding it restarted" in records[0]["error"]
