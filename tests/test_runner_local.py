"""The local runner: accounting invariants, failure isolation, ordering, reuse carry-over."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.config import load_config
from blinkflow.frame import Outcome
from blinkflow.runners.local import LocalRunner
from blinkflow.sinks import MemorySink
from tests.conftest import REPO_ROOT, write_test_video


def run(cfg):
    sink = MemorySink()
    summary = LocalRunner(cfg, sinks=[sink]).run()
    return summary, sink.results


def config(sources, stages, gate=None):
    data = {"sources": sources, "stages": stages}
    if gate:
        data["gate"] = gate
    return load_config(data=data)


def test_counts_add_up_and_a_bad_frame_fails_alone(tmp_path):
    clip = write_test_video(tmp_path / "a.mp4", frames=9)
    cfg = config([{"type": "file", "path": str(clip)}], {"chaos": {"batch": 4, "options": {"fail_indices": [5]}}})
    summary, results = run(cfg)
    totals = summary.totals
    assert totals["decoded"] == 9
    assert totals["processed"] + totals["reused"] + totals["dropped"] + totals["failed"] == 9
    assert totals["failed"] == 1
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    assert [r.index for r in failed] == [5]
    assert failed[0].error == "chaos: RuntimeError: chaos: injected failure on frame 5"
    assert all("chaos" in r.results for r in results if r.outcome is Outcome.PROCESSED)
    assert not summary.ok


def test_order_is_restored_per_stream_behind_a_holding_stage(tmp_path):
    a = write_test_video(tmp_path / "a.mp4", frames=5)
    b = write_test_video(tmp_path / "b.mp4", frames=4)
    cfg = config([{"type": "file", "path": str(a)}, {"type": "file", "path": str(b)}], {"chaos": {"batch": 3, "options": {"hold": 2}}})
    summary, results = run(cfg)
    for stream, count in (("a", 5), ("b", 4)):
        assert [r.index for r in results if r.stream_id == stream] == list(range(count))
    assert summary.totals["processed"] == 9


def test_reused_frames_carry_the_keyframe_results(tmp_path):
    clip = tmp_path / "static.mp4"
    write_static_video(clip, frames=8)
    cfg = config(
        [{"type": "file", "path": str(clip)}],
        {"chaos": {}},
        gate={"enabled": True, "max_reuse": 3},
    )
    summary, results = run(cfg)
    outcomes = [r.outcome.value for r in results]
    # identical frames: one keyframe, then max_reuse reused frames, then a forced refresh
    assert outcomes == ["processed", "reused", "reused", "reused", "processed", "reused", "reused", "reused"]
    assert [r.reuse_of for r in results] == [None, 0, 0, 0, None, 4, 4, 4]
    # the carried-over result is the keyframe's own (its per-stream count when it was computed)
    assert results[2].results["chaos"] == results[0].results["chaos"]
    assert results[6].results["chaos"] == results[4].results["chaos"]
    assert results[4].results["chaos"]["seen"] == 2
    assert summary.totals == {"processed": 2, "reused": 6, "dropped": 0, "failed": 0, "decoded": 8}


def write_static_video(path, frames):
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        image = np.full((48, 64, 3), 90, dtype=np.uint8)
        for _ in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_a_corrupt_file_in_a_directory_is_reported_and_the_rest_runs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_test_video(folder / "good.mp4", frames=4)
    (folder / "bad.mp4").write_bytes(b"nope" * 64)
    cfg = config([{"type": "dir", "path": str(folder)}], {"chaos": {}})
    summary, results = run(cfg)
    assert summary.totals["decoded"] == 4 == summary.totals["processed"]
    assert len(summary.accounting.source_errors) == 1 and "bad.mp4" in summary.accounting.source_errors[0]
    assert not summary.ok
    assert "source error" in "\n".join(summary.lines())


def test_summary_lines_report_every_outcome(tmp_path):
    clip = write_test_video(tmp_path / "a.mp4", frames=3)
    summary, _ = run(config([{"type": "file", "path": str(clip)}], {"chaos": {}}))
    assert summary.lines()[1] == "frames: 3 decoded = 3 processed + 0 reused + 0 dropped + 0 failed"
    assert summary.ok


def _camera(count: int, interval_s: float):
    """A camera's frames: one every ``interval_s`` of wall-clock time."""
    import time

    for index in range(count):
        time.sleep(interval_s)
        yield np.full((48, 64, 3), index * 10, np.uint8)


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_live_waves_go_after_max_wait_ms_and_archive_waves_wait_to_be_full():
    """A 20 fps camera into a stage of batch 8: live, each frame goes with the next (no frame waits for seven
    more); archive keeps full waves, whatever the wait."""
    def latencies(mode: str) -> list[float]:
        cfg = load_config(data={"sources": [{"type": "frames", "id": "cam", "fps": 20, "frames": _camera(16, 0.05)}],
                                "stages": {"chaos": {"batch": 8, "max_wait_ms": 20}}, "runtime": {"mode": mode}})
        summary, results = run(cfg)
        assert summary.totals["processed"] == 16 and [r.index for r in results] == list(range(16))
        return [r.latency_s for r in results]

    live, archive = latencies("live"), latencies("archive")
    assert max(live) < 0.2  # a frame waits for the next one (50 ms), not for a full wave (350 ms)
    assert max(archive) > 0.3 and sorted(archive)[8] > 0.15  # the first of each wave waited for seven more


def test_a_stages_longer_max_wait_ms_holds_with_the_gate_on():
    """The gate has no max_wait_ms of its own: it was counted as 20 ms, the shortest of the stages'."""
    from blinkflow.config import load_config
    from blinkflow.runners.base import RunnerBase

    for gate in (True, False):
        cfg = load_config(data={"sources": [{"type": "synthetic", "id": "a", "num_frames": 4}], "gate": {"enabled": gate},
                                "stages": {"detect": {"max_wait_ms": 200}}, "runtime": {"mode": "live"}})
        assert (RunnerBase(cfg).max_wait_ms, RunnerBase(cfg).tick_s()) == (200.0, 0.2)


def test_a_failed_batch_retried_frame_by_frame_counts_each_frame_once():
    """The summary said 12 frames seen of 9 (the failed batch's 3 counted, then again in their retries)."""
    from blinkflow.config import load_config
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink

    cfg = load_config(data={"sources": [{"type": "synthetic", "id": "a", "width": 64, "height": 48, "num_frames": 9}],
                            "gate": {"enabled": False}, "stages": {"chaos": {"batch": 3, "options": {"fail_indices": [4]}}}})
    summary = LocalRunner(cfg, sinks=[MemorySink()]).run()
    assert summary.stage_frames["chaos"] == 9 and summary.totals["failed"] == 1


def test_the_gates_feedback_waits_as_long_as_the_action_stage_holds_frames():
    """Archive mode: the action stage keeps up to clip_len * sampling_rate + stride frames back; with the lag
    shorter, the frames it needed were never all out and the threaded and Ray runners finished every batch
    before sending the next."""
    from blinkflow.config import load_config
    from blinkflow.runners.base import OrderedOutput, RunnerBase

    cfg = load_config(REPO_ROOT / "configs" / "synthetic.yaml")
    options = cfg.stages["action"].options
    runner = RunnerBase(cfg)
    assert runner.held_frames == options.clip_len * options.sampling_rate + options.stride > cfg.gate.audit_lag
    output = OrderedOutput([], None, gate=cfg.gate, wave_size=runner.wave_size, held=runner.held_frames)
    assert output.carry.lag == runner.held_frames + 1
    live = load_config(REPO_ROOT / "configs" / "synthetic.yaml", ["runtime.mode=live"])  # hold: false when live
    assert RunnerBase(live).held_frames == 0
