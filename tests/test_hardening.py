"""Issue #24's later hardening: a typed truncation end, the control guard asked again before every
connection (DNS rebinding), a memory budget for streams added at run time, and file runs that drain
on SIGINT/SIGTERM (docs/security.md)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
import threading
import time

import pytest
from blinkflow import control_guard
from blinkflow.config import SourceConfig
from blinkflow.control import handle
from blinkflow.control_guard import ControlGuard
from blinkflow.frame import Accounting, EndReason, StreamEnd
from blinkflow.label import _stats
from blinkflow.runners.base import RunSummary
from blinkflow.sources import open_sources
from blinkflow.streams import StreamHub

from tests.conftest import write_test_video
from tests.test_label import _faststart_clip

PUBLIC = ipaddress.ip_address("93.184.216.34")
LOOPBACK = ipaddress.ip_address("127.0.0.1")


# --------------------------------------------------------------------------- 1. a typed truncation end


def _ends(path) -> list[StreamEnd]:
    return [item for item in open_sources([SourceConfig(type="file", path=str(path))]) if isinstance(item, StreamEnd)]


def test_the_source_types_how_each_stream_ended(tmp_path):
    whole = _faststart_clip(tmp_path / "whole.mp4")
    (tmp_path / "cut.mp4").write_bytes(whole[: int(len(whole) * 0.9)])
    (tmp_path / "junk.mp4").write_bytes(b"\x00garbage" * 100)
    (cut,) = _ends(tmp_path / "cut.mp4")
    assert cut.reason is EndReason.TRUNCATED and "truncated: 7 of the 20 frames" in cut.error  # the message stays
    (junk,) = _ends(tmp_path / "junk.mp4")
    assert junk.reason is EndReason.ERROR and "junk.mp4" in junk.error
    (complete,) = _ends(tmp_path / "whole.mp4")
    assert complete.reason is EndReason.COMPLETE and complete.error is None


def _summary(*ends: StreamEnd) -> RunSummary:
    accounting = Accounting()
    for end in ends:
        accounting.on_stream_end(end)
    return RunSummary(accounting=accounting, elapsed_s=1.0)


def test_label_reads_the_typed_reason_not_the_message_text():
    # a file whose path happens to hold the words is not a truncation; a typed end is, whatever its text
    lookalike = _summary(StreamEnd("a", "/in/x: truncated: b.mp4: not a readable video", EndReason.ERROR))
    assert _stats(lookalike, {})["status"] == "failed"
    typed = _summary(StreamEnd("a", "/in/a.mp4: cut short", EndReason.TRUNCATED))
    stats = _stats(typed, {})
    assert stats["status"] == "partial" and stats["error"] == "/in/a.mp4: cut short"
    assert typed.accounting.truncated == ["a"] and lookalike.accounting.truncated == []


# --------------------------------------------------------------------------- 2. DNS re-checked at connect


def _serve_ts(payload: bytes, connections: list, stop: threading.Event) -> int:
    """An HTTP server on loopback that sends ``payload`` (MPEG-TS) and closes: each connection is one EOF."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.1)

    def loop() -> None:
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                connections.append(1)
                with conn:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n" + payload)
                    conn.shutdown(socket.SHUT_WR)  # a clean EOF; the client closes its side
                    conn.settimeout(2)
                    with contextlib.suppress(OSError):
                        conn.recv(1)

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1]


def _rebinding(monkeypatch, public_answers: int) -> list[str]:
    """The guard's resolver answers a public address ``public_answers`` times, then loopback (a rebinding DNS)."""
    asked: list[str] = []

    def resolve(hostname: str):
        asked.append(hostname)
        return [PUBLIC if len(asked) <= public_answers else LOOPBACK]

    monkeypatch.setattr(control_guard, "resolve", resolve)
    return asked


def _post_and_collect(url: str, timeout: float = 20) -> tuple[list, StreamHub]:
    hub = StreamHub(mode="live", keep_open=True)
    guard = ControlGuard(token=None)
    body = json.dumps({"url": url, "id": "cam", "backoff_initial_s": 0.05, "max_retries": 5}).encode()
    status, reply = handle(hub, "POST", "/streams", body, guard)
    assert status == 201, reply
    hub.close()
    items, deadline = [], time.monotonic() + timeout
    for item in hub.items():
        items.append(item)
        assert time.monotonic() < deadline, "the stream did not end"
    return items, hub


@pytest.fixture
def ts_server(tmp_path):
    clip = write_test_video(tmp_path / "clip.ts", frames=8)
    connections, stop = [], threading.Event()
    port = _serve_ts(clip.read_bytes(), connections, stop)
    yield port, connections
    stop.set()


@pytest.mark.timeout(30)
def test_a_name_rebound_to_loopback_after_the_post_is_refused_before_the_first_connection(ts_server, monkeypatch):
    port, connections = ts_server
    asked = _rebinding(monkeypatch, public_answers=1)  # the POST's check sees a public address
    items, hub = _post_and_collect(f"http://localhost:{port}/cam.ts")
    (end,) = items
    assert isinstance(end, StreamEnd) and end.reason is EndReason.ERROR
    assert end.error == (f"stream cam (http://localhost:{port}/cam.ts): refused before connecting: 'localhost' is an "
                         "internal address; list it in control.allow_hosts to stream from it")
    assert asked == ["localhost", "localhost"] and connections == []  # asked once more, then never connected
    (entry,) = [e for e in hub.status()["streams"] + hub.status()["ended"] if e["id"] == "cam"]
    assert entry["state"] == "failed" and entry["reconnects"] == 0


@pytest.mark.timeout(30)
def test_a_reconnection_asks_the_guard_again_and_ends_the_stream_once_refused(ts_server, monkeypatch):
    port, connections = ts_server
    asked = _rebinding(monkeypatch, public_answers=2)  # the POST and the first connection see a public address
    items, _hub = _post_and_collect(f"http://localhost:{port}/cam.ts")
    frames, (end,) = items[:-1], items[-1:]
    assert frames and [f.index for f in frames] == list(range(len(frames)))  # the first connection's frames
    assert "refused before connecting: 'localhost' is an internal address" in end.error
    assert len(connections) == 1 and len(asked) == 3  # no retry loop after the refusal
    accounting = Accounting()
    accounting.on_stream_end(end)
    assert accounting.source_errors == [end.error]  # counted like any stream error


@pytest.mark.timeout(30)
def test_streams_added_without_the_control_endpoint_are_not_rechecked(ts_server, monkeypatch):
    asked = _rebinding(monkeypatch, public_answers=0)
    hub = StreamHub(mode="live")
    port, connections = ts_server
    hub.add_url(f"http://localhost:{port}/cam.ts", "cam", reconnect_on_eof=False, max_retries=0)
    hub.close()
    items = list(hub.items())
    assert asked == [] and len(items) > 1 and isinstance(items[-1], StreamEnd) and connections


# --------------------------------------------------------------------------- 3. a memory budget for added streams


def _budget_mb(spare_mb: int) -> int:
    return int(control_guard.resident_bytes() / control_guard.MB) + spare_mb


def test_resident_memory_is_read_and_plausible():
    assert 10 * control_guard.MB < control_guard.resident_bytes() < 64 * 1024 * control_guard.MB


def test_a_stream_whose_buffer_would_pass_the_budget_is_a_503_naming_budget_and_resident_memory():
    hub = StreamHub(mode="live", keep_open=True, defaults={"resize": [640, 360]})
    budget = _budget_mb(200)
    guard = ControlGuard(token=None, allow_hosts=["198.18.0.0/15"], max_memory_mb=budget)
    try:
        body = {"url": "rtsp://198.18.0.1/a", "resize": [1920, 1080], "queue_size": 128}  # about 760 MB
        status, reply = handle(hub, "POST", "/streams", json.dumps(body).encode(), guard)
        assert status == 503 and "\n" not in reply["error"]
        assert reply["error"].startswith(f"memory budget control.max_memory_mb ({budget} MB) would be exceeded: "
                                         "resident ")
        assert "+ 759 MB for this stream's buffer (queue_size 128 x 1920x1080x3 bytes)" in reply["error"]
        assert hub.status()["streams"] == []  # nothing was started
        # the hub's defaults count too: 32 frames of its 640x360 are about 21 MB, within the budget
        guard.check_memory({"url": "rtsp://198.18.0.1/a"}, hub.defaults)
        # no resize anywhere: a 1080p camera is assumed (32 x 1920x1080x3 is about 190 MB)
        with pytest.raises(control_guard.Refused, match=r"queue_size 32 x 1920x1080x3 bytes"):
            ControlGuard(token=None, max_memory_mb=_budget_mb(150)).check_memory({"url": "rtsp://x/a"}, {})
    finally:
        hub.close(stop_streams=True)


def test_without_a_budget_nothing_is_refused_for_memory(monkeypatch):
    monkeypatch.setattr(control_guard, "resident_bytes", lambda: 10**15)
    ControlGuard(token=None).check_memory({"url": "rtsp://x/a", "resize": [4000, 4000], "queue_size": 4096}, {})


def test_the_budget_is_configured_under_control_and_checked():
    from blinkflow.config import load_config
    from blinkflow.errors import ConfigError

    cfg = load_config(data={"sources": [], "control": {"max_memory_mb": 2048}})
    assert ControlGuard.from_config(cfg.control).max_memory_mb == 2048
    assert load_config(data={"sources": []}).control.max_memory_mb is None
    with pytest.raises(ConfigError, match="control.max_memory_mb"):
        load_config(data={"sources": [], "control": {"max_memory_mb": 0}})


# --------------------------------------------------------------------------- 4. file runs drain on SIGINT/SIGTERM


def test_a_stop_ends_every_file_lane_after_the_frame_in_hand(tmp_path):
    from blinkflow.frame import Frame

    write_test_video(tmp_path / "a.mp4", frames=30)
    write_test_video(tmp_path / "b.mp4", frames=30)
    configs = [SourceConfig(type="file", path=str(tmp_path / "a.mp4")),
               SourceConfig(type="file", path=str(tmp_path / "b.mp4")),
               SourceConfig(type="synthetic", width=32, height=24, num_frames=1000)]
    stop = threading.Event()
    items = []
    for item in open_sources(configs, stop=stop):
        items.append(item)
        if len(items) == 7:
            stop.set()
    frames = [i for i in items if isinstance(i, Frame)]
    ends = [i for i in items if isinstance(i, StreamEnd)]
    assert len(frames) == 7  # nothing read after the stop; each lane ended where it stood
    assert sorted(e.stream_id for e in ends) == ["a", "b", "synthetic-0"]
    assert all(e.reason is EndReason.STOPPED and e.error is None for e in ends)


def test_a_stopped_local_run_finishes_what_it_read_and_commits_its_sinks(tmp_path):
    from blinkflow.config import load_config
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import build_sinks

    out = tmp_path / "out.jsonl"
    cfg = load_config(data={"sources": [{"type": "synthetic", "width": 32, "height": 24, "num_frames": 5000}],
                            "stages": {"chaos": {"batch": 4}}, "sinks": [{"type": "jsonl", "path": str(out)}]})
    stop = threading.Event()
    seen = []

    def on_result(result) -> None:
        seen.append(result.index)
        if len(seen) == 10:
            stop.set()

    summary = LocalRunner(cfg, sinks=build_sinks(cfg.sinks), on_result=on_result, stop=stop).run()
    indices = [json.loads(line)["index"] for line in out.read_text().splitlines()]
    assert indices == seen == list(range(len(indices))) and 10 <= len(indices) < 20  # the waves in flight
    assert summary.totals["decoded"] == summary.totals["processed"] == len(indices) and summary.ok


def test_the_first_signal_asks_for_a_stop_and_the_second_aborts():
    import os
    import signal

    from blinkflow.control import GracefulSignals, Interrupted

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers belong to the main thread; this test sends SIGTERM to its own process")
    stopped = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)
    signals = GracefulSignals(stopped.set, "test").install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.wait(5) and signals.received == signal.SIGTERM
        with pytest.raises(Interrupted) as caught:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert caught.value.signum == signal.SIGINT and isinstance(caught.value, KeyboardInterrupt)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_stop_asked_over_http_drains_within_the_same_bound_as_a_signal():
    """POST /stop drained without a limit: a stuck stage held the process forever (drain_timeout_s bounded only
    signals), and a second POST /stop could not abort it."""
    import signal

    from blinkflow.control import GracefulSignals, handle
    from blinkflow.errors import Interrupted
    from blinkflow.streams import StreamHub

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers belong to the main thread")
    hub, asked = StreamHub(mode="live", keep_open=True), []
    assert handle(hub, "POST", "/stop", b"", on_stop=lambda: asked.append(True)) == (202, {"stopping": True})
    assert asked == [True] and hub.closed
    signals = GracefulSignals(lambda: None, "test", timeout_s=0.3).install()
    try:
        started = time.monotonic()
        with pytest.raises(Interrupted) as caught:
            signals.stop_requested("POST /stop")
            time.sleep(5)  # a stuck drain; the deadline's signal interrupts it
        assert caught.value.signum == signal.SIGTERM and time.monotonic() - started < 3
    finally:
        signals.restore()


def test_a_sigterm_while_ray_starts_stops_ray_and_ends_as_a_sigterm(monkeypatch):
    """Ray's own handler (sys.exit(15)) took it: exit code 15, no line said, Ray's agents left running."""
    import os
    import signal
    import sys

    import ray

    from blinkflow.errors import Interrupted
    from blinkflow.ray_session import start_ray

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers belong to the main thread; this test sends SIGTERM to its own process")

    def init_hit_by_sigterm(**_settings):  # what ray.init does: its handler first, then the signal comes
        signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(2)  # the handler runs at the next bytecode; never reached

    shutdowns = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init_hit_by_sigterm)
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as caught:
        start_ray(num_cpus=1)
    assert caught.value.signum == signal.SIGTERM and shutdowns == [True]
    assert signal.getsignal(signal.SIGTERM) is previous


def _start_long_run(tmp_path, runner: str = "local"):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path / "out.jsonl"
    config = tmp_path / "long.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "sources": [{"type": "synthetic", "id": "cam", "width": 64, "height": 48, "num_frames": 1_000_000}],
        "stages": {"chaos": {"batch": 1, "options": {"sleep_ms": 10}}},
        "sinks": [{"type": "jsonl", "path": str(out)}],
        "runtime": {"runner": runner, "num_cpus": 2},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "blinkflow.cli", "run", str(config), "--no-progress",
                             "--summary-json", str(tmp_path / "summary.json")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    try:
        while not any(p.stat().st_size for p in tmp_path.glob(".out*partial*")):  # records are being written
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no records within 90 s"
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, out


def _interrupt(proc, *signals) -> tuple[str, str]:
    """Send ``signals`` to the run and wait for it (a minute at most); it is killed whatever happens."""
    try:
        for signum in signals:
            proc.send_signal(signum)
        return proc.communicate(timeout=60)
    finally:
        proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("runner", ["local", "ray"])  # ray.init replaces SIGTERM's handler: ours is put back
def test_sigterm_drains_a_file_run_commits_its_jsonl_and_exits_143(tmp_path, runner):
    import signal

    proc, out = _start_long_run(tmp_path, runner)
    stdout, stderr = _interrupt(proc, signal.SIGTERM)
    assert proc.returncode == 143, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]  # committed, every line valid JSON
    assert records and [r["index"] for r in records] == list(range(len(records)))
    assert all(r["outcome"] == "processed" for r in records)
    assert (f"blinkflow: interrupted by SIGTERM: {len(records)} frames done and written, outputs committed; "
            "the rest of the input was not read") in stderr.splitlines()
    assert f"frames: {len(records)} decoded = {len(records)} processed" in stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["interrupted"] == "SIGTERM" and summary["totals"]["decoded"] == len(records)
    assert not list(tmp_path.glob(".out*"))  # no temporary file left behind


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_second_signal_aborts_at_once_without_committing(tmp_path):
    import signal

    proc, out = _start_long_run(tmp_path)
    # two kinds, as two of one kind may merge into one while pending; whichever runs second aborts
    _stdout, stderr = _interrupt(proc, signal.SIGINT, signal.SIGTERM)
    assert proc.returncode in (130, 143), stderr  # 128 + the second signal's number
    assert "frames done" not in stderr
    assert "blinkflow: interrupted" in stderr.splitlines()
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # an aborted archive output is discarded


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_stopped_ray_run_drains_the_frames_in_flight_and_accounts_for_each(tmp_path):
    pytest.importorskip("ray")
    from blinkflow.config import load_config
    from blinkflow.runners.ray import RayRunner
    from blinkflow.sinks import MemorySink

    cfg = load_config(data={"sources": [{"type": "synthetic", "width": 32, "height": 24, "num_frames": 100_000}],
                            "stages": {"chaos": {"batch": 2, "replicas": 2}}, "runtime": {"runner": "ray"}})
    stop, sink = threading.Event(), MemorySink()
    summary = RayRunner(cfg, sinks=[sink], on_result=lambda r: stop.set() if r.index == 20 else None, stop=stop).run()
    indices = [r.index for r in sink.results]
    assert indices == list(range(len(indices))) and 20 < len(indices) < 5000  # what was read, in order, no more
    assert summary.totals["decoded"] == summary.totals["processed"] == len(indices) and summary.ok


# --------------------------------------------------------------------------- 5. blinkflow label drains on SIGINT/SIGTERM

CHAOS_LABEL_CONFIG = """
label: {formats: [jsonl], executor: local}
stages:
  chaos: {batch: 1, options: {sleep_ms: %d}}
"""


def _label_inputs(tmp_path, count: int, frames: int):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(count):
        write_test_video(inputs / f"clip{i}.mp4", frames=frames)
    config = tmp_path / "label.yaml"
    return inputs, config


def test_a_stopped_label_run_records_what_finished_and_lists_what_did_not_start(tmp_path):
    from blinkflow.config import load_config
    from blinkflow.label import LabelRun, find_videos

    inputs, config = _label_inputs(tmp_path, count=3, frames=6)
    config.write_text(CHAOS_LABEL_CONFIG % 0)
    cfg = load_config(config)
    run = LabelRun(find_videos([str(inputs)]), tmp_path / "out", cfg, ["jsonl"], progress=False)
    finish = run._finish

    def finish_then_stop(*args):  # the signal lands while the first video is in progress
        run.stop.set()
        finish(*args)

    run._finish = finish_then_stop
    summary = run.run()
    assert summary["stopped"] and summary["done"] == 1 and summary["not_started"] == ["clip1", "clip2"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["videos"]
    assert list(manifest) == ["clip0"] and manifest["clip0"]["status"] == "done"
    assert len((tmp_path / "out" / "clip0.jsonl").read_text().splitlines()) == 6  # finished whole, not cut
    assert not (tmp_path / "out" / "clip1.jsonl").exists()

    resumed = LabelRun(find_videos([str(inputs)]), tmp_path / "out", cfg, ["jsonl"], progress=False).run()
    assert resumed["skipped"] == ["clip0"] and resumed["done"] == 3 and resumed["not_started"] == []
    assert not resumed["stopped"]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sigterm_to_blinkflow_label_finishes_the_videos_in_progress_and_exits_143(tmp_path, executor):
    import signal
    import subprocess

    from tests.conftest import REPO_ROOT
    from tests.test_label import _cli, _manifest_entries

    inputs, config = _label_inputs(tmp_path, count=4, frames=40)
    config.write_text(CHAOS_LABEL_CONFIG % 25 + "runtime: {num_cpus: 2}\n")  # about 1 s per video
    out = tmp_path / "out"
    command = _cli(str(inputs), "--out", str(out), "--config", str(config), "--set", f"label.executor={executor}",
                   "--set", "label.parallel=1")
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _manifest_entries(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    done = [v for v, entry in summary["videos"].items() if entry["status"] == "done"]
    assert summary["stopped"] and 1 <= len(done) < 4 and sorted(done + summary["not_started"]) == [
        f"clip{i}" for i in range(4)]
    for video in done:  # every video that started finished whole and is vouched for by the manifest
        assert len((out / f"{video}.jsonl").read_text().splitlines()) == 40
    assert len(json.loads((out / "manifest.json").read_text())["videos"]) == len(done)
    assert (f"blinkflow label: interrupted by SIGTERM: {len(done)} videos done and recorded, "
            f"{len(summary['not_started'])} not started; run the same command again to finish") in stderr.splitlines()
    assert "Traceback" not in stderr and "not started" in stdout

    again = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = json.loads((out / "summary.json").read_text())
    assert sorted(resumed["skipped"]) == sorted(done) and resumed["done"] == 4


# --------------------------------------------------------------------------- 6. a Ray instance too small for the actors


def test_stage_actors_that_cannot_all_be_placed_are_a_one_line_error_not_a_hang(caplog):
    from blinkflow.config import load_config
    from blinkflow.errors import ConfigError
    from blinkflow.graph import build_graph
    from blinkflow.runners.ray import check_room_for_actors

    data = {"sources": [{"type": "synthetic"}], "gate": {"enabled": True},
            "stages": {"chaos": {"replicas": 2, "resources": {"num_cpus": 0.5}}}, "runtime": {"runner": "ray"}}
    cfg = load_config(data=data)
    specs = build_graph(cfg)
    check_room_for_actors(cfg, specs, {"CPU": 2.0})  # gate 1 + chaos 2 x 0.5 fit
    with pytest.raises(ConfigError) as caught:
        check_room_for_actors(cfg, specs, {"CPU": 1.5})
    assert str(caught.value) == (
        "runtime: the stage actors reserve 2 CPUs but the cluster has 1.5 (gate 1 x 1 CPU, chaos 2 x 0.5 CPU), so "
        "Ray would wait forever to place them; raise runtime.num_cpus, or lower the stages' replicas or resources")
    remote = load_config(data={**data, "runtime": {"runner": "ray", "address": "10.0.0.1:6379"}})
    check_room_for_actors(remote, specs, {"CPU": 1.5})  # a cluster may grow: only a warning
    assert "they wait until the cluster has room" in caplog.text


# --------------------------------------------------------------------------- 7. a drain that takes too long is cut short


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_drain_stuck_past_drain_timeout_s_aborts_with_one_line(tmp_path):
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    config = tmp_path / "stuck.yaml"
    config.write_text(json.dumps({  # the second batch takes 20 s: a stuck model
        "sources": [{"type": "synthetic", "width": 32, "height": 24, "num_frames": 1000}],
        "stages": {"chaos": {"batch": 1, "options": {"sleep_ms": 20000}}},
        "sinks": [{"type": "jsonl", "path": str(tmp_path / "out.jsonl")}],
        "runtime": {"drain_timeout_s": 1},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "blinkflow.cli", "run", str(config), "--no-progress"],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(8)  # past start-up, inside a 20 s batch
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        _stdout, stderr = proc.communicate(timeout=60)
        waited = time.monotonic() - signalled
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "still draining 1 s after SIGTERM (runtime.drain_timeout_s); aborting" in stderr
    assert "blinkflow: interrupted" in stderr.splitlines() and "Traceback" not in stderr
    assert waited < 15, "the stuck batch was not waited for"
