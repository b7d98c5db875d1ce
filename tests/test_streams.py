"""Live streams: redaction, backoff, drop accounting, a real RTSP server killed and
restarted mid-stream, an HTTP MPEG-TS stream from ``ffmpeg -listen 1``, a stalled
server, and streams added and removed at run time over the control endpoint.

Every server is started by the test on 127.0.0.1 and stopped by it; each network
test is bounded by timeouts.
"""

from __future__ import annotations

import contextlib
import json
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from blinkflow import streams
from blinkflow.config import load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Outcome
from blinkflow.runners.local import LocalRunner
from blinkflow.sinks import MemorySink
from blinkflow.sources import StreamEnd
from blinkflow.streams import (Backoff, RecorderBridge, StreamHub, default_stream_id, redact_text, redact_url,
                              remember_secrets)
from tests.conftest import REPO_ROOT, write_test_video

SYSTEM_PYTHON = "/usr/bin/python3"  # python3-gi (GStreamer bindings) lives there, not in the venv
GST_CHECK = "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer"
PASSWORD = "s3cret-Pw"


def _have_rtsp_server() -> bool:
    if not Path(SYSTEM_PYTHON).exists():
        return False
    return subprocess.run([SYSTEM_PYTHON, "-c", GST_CHECK], capture_output=True, timeout=30).returncode == 0


needs_rtsp = pytest.mark.skipif(not _have_rtsp_server(), reason=(
    "GStreamer's RTSP server is missing: apt-get install gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp python3-gi "
    "gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad (.ci/run does)"))
needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is missing: apt-get install ffmpeg")


def _ffmpeg_has_srt() -> bool:
    if shutil.which("ffmpeg") is None:
        return False
    listing = subprocess.run(["ffmpeg", "-hide_banner", "-protocols"], check=False, capture_output=True, text=True,
                             timeout=30)
    return "srt" in listing.stdout.split()


needs_srt = pytest.mark.skipif(not _ffmpeg_has_srt(), reason=(
    "the ffmpeg command with the srt protocol is missing: apt-get install ffmpeg (Debian's is built with libsrt)"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stream_config(url: str, mode: str = "live", stages: dict | None = None, **source):
    source = {"type": "stream", "url": url, "resize": [64, 48], "backoff_initial_s": 0.1, "backoff_max_s": 0.5,
              **source}
    return load_config(data={"sources": [source], "stages": stages if stages is not None else {"chaos": {"batch": 1}},
                             "runtime": {"mode": mode}})


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class RtspServer:
    """tests/rtsp_server.py (GStreamer's gst-rtsp-server) as a child process."""

    def __init__(self, mounts: dict[str, Path], port: int | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        self.mounts, self.port, self.user, self.password = mounts, port or free_port(), user, password
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RtspServer":
        auth = ["--user", self.user, "--password", self.password] if self.user else []
        command = [SYSTEM_PYTHON, str(REPO_ROOT / "tests" / "rtsp_server.py"), "--port", str(self.port), *auth,
                   *(f"{name}={path}" for name, path in self.mounts.items())]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = select.select([self.proc.stdout], [], [], 20)[0]
        if not ready or "READY" not in self.proc.stdout.readline():
            self.stop()
            raise RuntimeError(f"the RTSP server did not start: {self.proc.stderr.read()[-2000:]}")
        return self

    def url(self, mount: str, user: str | None = None, password: str | None = None) -> str:
        userinfo = f"{user}:{password}@" if user else ""
        return f"rtsp://{userinfo}127.0.0.1:{self.port}/{mount}"

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@pytest.fixture
def rtsp_servers():
    """Starts RtspServers; stops every one of them after the test, whatever happened."""
    started: list[RtspServer] = []

    def start(**kwargs) -> RtspServer:
        server = RtspServer(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


class BackgroundRun:
    """The local runner in a thread, fed by a hub; results land in a MemorySink."""

    def __init__(self, cfg, hub: StreamHub, metrics=None) -> None:
        self.sink = MemorySink()
        self.summary = None
        self.error: BaseException | None = None
        self.runner = LocalRunner(cfg, sinks=[self.sink], on_result=hub.observe, hub=hub, metrics=metrics)
        self.thread = threading.Thread(target=self._run, name="test-run", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.summary = self.runner.run()
        except BaseException as exc:  # noqa: BLE001 - re-raised by join()
            self.error = exc

    def count(self, stream: str) -> int:
        return sum(1 for r in list(self.sink.results) if r.stream_id == stream)

    def join(self, timeout: float = 30):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not end"
        if self.error is not None:
            raise self.error
        return self.summary

    def indices(self, stream: str) -> list[int]:
        return [r.index for r in self.sink.results if r.stream_id == stream]


def hub_items(hub: StreamHub, timeout: float = 20) -> list:
    """Everything a closed hub delivers, bounded in time."""
    items, deadline = [], time.monotonic() + timeout
    for item in hub.items():
        items.append(item)
        assert time.monotonic() < deadline, "the hub did not end"
    return items


# --------------------------------------------------------------------------- redaction and settings


@pytest.mark.parametrize("url, expected", [
    ("rtsp://admin:hunter2@10.0.0.5:554/live", "rtsp://***@10.0.0.5:554/live"),
    ("rtsps://user@cam.local/stream", "rtsps://***@cam.local/stream"),
    ("https://cam.local/feed.m3u8?token=abc123&res=hd", "https://cam.local/feed.m3u8?token=***&res=hd"),
    ("srt://10.0.0.9:9000?mode=caller&passphrase=k3y&pass=pw", "srt://10.0.0.9:9000?mode=caller&passphrase=***&pass=***"),
    ("udp://239.0.0.1:1234", "udp://239.0.0.1:1234"),
])
def test_redact_url_hides_user_info_and_secret_query_values(url, expected):
    assert redact_url(url) == expected


def test_redact_text_scrubs_credentials_inside_messages():
    remember_secrets("rtsp://admin:Tr0ub4dor@cam/live")
    message = "Server returned 401 for 'rtsp://admin:Tr0ub4dor@cam/live' (password Tr0ub4dor)"
    assert redact_text(message) == "Server returned 401 for 'rtsp://***@cam/live' (password ***)"


def test_default_stream_id_never_holds_credentials():
    assert default_stream_id("rtsp://admin:pw@10.0.0.5:554/live/ch1") == "10.0.0.5:554/live/ch1"
    assert default_stream_id("/dev/video2") == "video2"
    # a DVR's password in the path went into records, file names and MQTT topics
    dvr = default_stream_id("rtsp://10.0.0.5:554/user=admin_password=hunter22_channel=1_stream=0.sdp")
    assert "hunter22" not in dvr and dvr.startswith("10.0.0.5:554/user=admin_password=")


def test_stream_url_needs_a_supported_scheme():
    with pytest.raises(ConfigError, match=r"^sources\.0\.url: 'ftp://\*\*\*@host/x' is not a stream URL"):
        stream_config("ftp://user:pw@host/x")


def test_overflow_follows_the_runtime_mode():
    assert stream_config("rtsp://cam/x", mode="live").sources[0].options.overflow == "drop_oldest"
    assert stream_config("rtsp://cam/x", mode="archive").sources[0].options.overflow == "block"


def test_backoff_grows_exponentially_within_its_jitter_and_cap():
    backoff = Backoff(initial_s=0.5, max_s=4.0, factor=2.0, jitter=0.2)
    for attempt, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [backoff.delay(attempt) for _ in range(200)]
        assert base * 0.8 <= min(delays) and max(delays) <= base * 1.2
        assert max(delays) - min(delays) > 0.1 * base  # jittered, so cameras do not retry in lockstep


def test_a_camera_offline_for_days_still_waits_its_capped_backoff():
    """2.0 ** 1024 overflowed at the 1025th attempt (8.5 hours at the defaults) and killed the decoder thread."""
    for factor in (2.0, 100.0):
        delays = [Backoff(initial_s=0.5, max_s=30.0, factor=factor, jitter=0.2).delay(n) for n in (1025, 10**6)]
        assert all(24.0 <= d <= 36.0 for d in delays), delays


@pytest.mark.parametrize("setting, value", [("backoff_initial_s", 0), ("backoff_max_s", 0.0),
                                            ("backoff_max_s", float("nan")), ("stall_timeout_s", float("nan")),
                                            ("fps", float("nan"))])
def test_a_backoff_that_would_retry_in_a_busy_loop_is_refused(setting, value):
    with pytest.raises(ConfigError, match=rf"sources\.0\.{setting}: .*(out of range|NaN)"):
        stream_config("rtsp://cam/x", **{setting: value})


def test_a_stream_stopped_while_it_connects_stays_stopped():
    """DELETE during av.open: the open that finishes afterwards must not mark the removed stream up again."""
    hub = StreamHub(mode="live", keep_open=True)
    events = []
    hub.subscribe(events.append)
    cfg = stream_config("rtsp://cam.invalid/x", id="cam").sources[0]
    from blinkflow.streams import LiveStream

    stream = LiveStream(cfg, "cam", hub._cond, hub._emit, "drop_oldest")
    stream.stop()
    stream._on_connected()
    stream._set_state("down", "late")
    assert stream.state == "stopped" and [e.kind for e in events] == ["stopped"]
    assert stream.connections == 0


# --------------------------------------------------------------------------- local streams


def test_live_stream_drops_the_oldest_frames_and_accounts_for_every_one(tmp_path):
    clip = write_test_video(tmp_path / "clip.mp4", frames=40)
    cfg = stream_config(f"file:{clip}", id="cam", queue_size=2, reconnect_on_eof=False,
                        stages={"chaos": {"batch": 1, "options": {"sleep_ms": 20}}})
    sink = MemorySink()
    summary = LocalRunner(cfg, sinks=[sink]).run()
    totals = summary.totals
    assert totals["decoded"] == 40 and totals["dropped"] > 0
    assert totals["processed"] + totals["dropped"] == 40
    assert [r.index for r in sink.results] == list(range(40))  # each decoded frame exactly once, in order
    dropped = [r for r in sink.results if r.outcome is Outcome.DROPPED]
    assert all(r.results == {} for r in dropped)


def test_archive_mode_stream_blocks_instead_of_dropping(tmp_path):
    clip = write_test_video(tmp_path / "clip.mp4", frames=30)
    cfg = stream_config(f"file:{clip}", mode="archive", id="cam", queue_size=2, reconnect_on_eof=False,
                        stages={"chaos": {"batch": 1, "options": {"sleep_ms": 5}}})
    summary = LocalRunner(cfg, sinks=[]).run()
    assert summary.totals["processed"] == 30 and summary.totals["dropped"] == 0


def test_unreachable_stream_gives_up_after_max_retries_without_leaking_the_password(caplog):
    url = f"rtsp://admin:{PASSWORD}@127.0.0.1:{free_port()}/cam"
    cfg = stream_config(url, stages={}, max_retries=2, open_timeout_s=2, backoff_initial_s=0.05)
    hub = StreamHub()
    events = []
    hub.subscribe(events.append)
    summary = LocalRunner(cfg, sinks=[], hub=hub).run()
    (error,) = summary.accounting.source_errors
    assert "gave up after 2 reconnection attempts" in error and "Connection refused" in error
    assert [e.kind for e in events].count("down") == 2
    everything = caplog.text + error + json.dumps(hub.status()) + repr(events) + "\n".join(summary.lines())
    assert PASSWORD not in everything and "rtsp://***@127.0.0.1" in error


def test_missing_inputs_end_with_a_clear_error():
    hub = StreamHub()
    hub.add_url("/dev/video97", "x", max_retries=0)
    hub.close()
    (end,) = hub_items(hub)
    assert isinstance(end, StreamEnd) and "cannot connect" in end.error


def test_srt_without_the_ffmpeg_command_ends_at_once_with_a_one_line_error_naming_the_fix(monkeypatch):
    monkeypatch.setattr(streams, "pyav_has_protocol", lambda scheme: False)  # as with the PyAV wheels
    monkeypatch.setattr(streams, "FFMPEG", "blinkflow-no-such-ffmpeg")
    hub = StreamHub()
    hub.add_url(f"srt://127.0.0.1:9000?passphrase={PASSWORD}", "cam", max_retries=5)
    hub.close()
    (end,) = hub_items(hub, timeout=5)
    assert end.error == ("stream cam (srt://127.0.0.1:9000?passphrase=***): PyAV's FFmpeg has no SRT support and "
                         "the ffmpeg command is missing; install ffmpeg with SRT support (Debian: apt-get install "
                         "ffmpeg)")


def test_srt_relay_command_copies_the_video_track_and_lets_ffmpeg_options_override_the_probe():
    cfg = stream_config("srt://10.0.0.9:9000?streamid=cam1", ffmpeg_options={"probesize": 65536, "latency": 200000})
    command = streams.relay_command(cfg.sources[0], "/usr/bin/ffmpeg")
    assert command[:4] == ["/usr/bin/ffmpeg", "-nostdin", "-hide_banner", "-loglevel"]
    flags = command[command.index("error") + 1:command.index("-i")]
    assert flags == ["-probesize", "65536", "-analyzeduration", "500000", "-latency", "200000"]
    assert command[command.index("-i"):] == ["-i", "srt://10.0.0.9:9000?streamid=cam1", "-map", "0:v:0", "-c", "copy",
                                             "-flush_packets", "1", "-f", "mpegts", "pipe:1"]
    # added from the control endpoint: the child opens camera demuxers only, whatever ffmpeg_options say
    guarded = streams.relay_command(stream_config("srt://10.0.0.9:9000/a.m3u8", ffmpeg_options={
        "format_whitelist": "hls"}).sources[0], "/usr/bin/ffmpeg", guarded=True)
    allowed = guarded[guarded.index("-format_whitelist") + 1].split(",")
    assert guarded.index("-format_whitelist") < guarded.index("-i") and "hls" not in allowed and "mpegts" in allowed


def _serve_stalling_http(payload: bytes, connections: list, stop: threading.Event) -> int:
    """An HTTP server that sends the headers and ``payload``, then holds the connection silently."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)

    def loop() -> None:
        with server:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    continue
                connections.append(conn)
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: video/mp2t\r\n\r\n" + payload)

    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1]


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
@needs_ffmpeg
def test_stalled_stream_is_detected_and_reconnected(tmp_path, real_media):
    ts = tmp_path / "clip.ts"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(real_media / "video" / "bikes.mp4"), "-t", "2",
                    "-c", "copy", "-f", "mpegts", str(ts)], check=True, timeout=60)
    connections, stop = [], threading.Event()
    port = _serve_stalling_http(ts.read_bytes(), connections, stop)
    cfg = stream_config(f"http://user:{PASSWORD}@127.0.0.1:{port}/cam.ts", id="cam", stall_timeout_s=0.5)
    hub = StreamHub()
    events = []
    hub.subscribe(events.append)
    run = BackgroundRun(cfg, hub)
    try:
        wait_until(lambda: sum(e.kind == "reconnect" for e in events) >= 2, 30, "two reconnections after stalls")
    finally:
        hub.close(stop_streams=True)
        summary = run.join()
        stop.set()
        for conn in connections:
            conn.close()
    stalls = [e.detail for e in events if e.kind == "down"]
    assert stalls and all("stalled: no data for 0.5 s" in d for d in stalls)
    decoded = summary.totals["decoded"]
    assert decoded >= 2 * 30  # two full connections of about 45 frames each, and the start of a third
    assert run.indices("cam") == list(range(decoded))
    pts = [r.pts for r in run.sink.results]
    assert all(b > a for a, b in zip(pts, pts[1:])), "pts keep increasing across reconnections"
    assert run.sink.results[-1].results.get("chaos") is not None or run.sink.results[-1].outcome is Outcome.DROPPED


# --------------------------------------------------------------------------- real servers


@pytest.mark.slow
@needs_rtsp
def test_rtsp_server_killed_and_restarted_the_stream_reconnects_and_accounts_for_every_frame(
        rtsp_servers, real_media, caplog):
    from blinkflow.metrics import PrometheusRecorder

    clip = {"cam": real_media / "video" / "bikes.mp4"}
    server = rtsp_servers(mounts=clip, user="viewer", password=PASSWORD)
    cfg = stream_config(server.url("cam", "viewer", PASSWORD), id="cam", stall_timeout_s=2)
    recorder = PrometheusRecorder()
    hub = StreamHub()
    hub.subscribe(RecorderBridge(recorder))
    events = []
    hub.subscribe(events.append)
    run = BackgroundRun(cfg, hub, metrics=recorder)
    try:
        wait_until(lambda: run.count("cam") >= 20, 30, "20 frames from the RTSP server")
        server.kill()
        wait_until(lambda: any(e.kind == "down" for e in events), 10, "the stream to notice the server is gone")
        at_restart = run.count("cam")
        rtsp_servers(mounts=clip, port=server.port, user="viewer", password=PASSWORD)
        wait_until(lambda: run.count("cam") >= at_restart + 20, 30, "20 frames after the restart")
    finally:
        hub.close(stop_streams=True)
        summary = run.join()

    (status,) = hub.status()["ended"]
    assert status["reconnects"] >= 1
    kinds = [e.kind for e in events]
    assert kinds.index("down") < kinds.index("reconnect") < len(kinds) - 1 - kinds[::-1].index("up")
    totals = summary.totals
    assert totals["decoded"] == status["decoded"], "every frame the decoder delivered entered the run"
    assert totals["decoded"] == totals["processed"] + totals["dropped"] and totals["failed"] == 0
    assert run.indices("cam") == list(range(totals["decoded"]))  # exactly one outcome each, nothing lost
    assert hub.latency["cam"].count == totals["processed"]
    exposition = recorder.exposition().decode()
    assert 'blinkflow_stream_reconnects_total{stream="cam"} 1.0' in exposition
    assert 'blinkflow_stream_up{stream="cam"}' not in exposition  # it ended with the run, as it should: no page
    everything = caplog.text + exposition + json.dumps(hub.status()) + json.dumps(run.sink.records()) + repr(events)
    assert PASSWORD not in everything


class SrtServer:
    """``ffmpeg -re -stream_loop -1 ... srt://127.0.0.1:PORT?mode=listener`` (one caller at a time)."""

    def __init__(self, clip: Path, port: int, passphrase: str) -> None:
        url = f"srt://127.0.0.1:{port}?mode=listener&passphrase={passphrase}"
        self.proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re",
                                      "-stream_loop", "-1", "-i", str(clip), "-c", "copy", "-f", "mpegts", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.mark.slow
@needs_srt
def test_srt_server_killed_and_restarted_the_relay_reconnects_and_accounts_for_every_frame(
        real_media, monkeypatch, caplog):
    from blinkflow.metrics import PrometheusRecorder

    monkeypatch.setattr(streams, "pyav_has_protocol", lambda scheme: False)  # relay even if PyAV could read it
    relays: list[subprocess.Popen] = []
    start = streams.SrtRelay.start
    monkeypatch.setattr(streams.SrtRelay, "start", lambda self: (start(self), relays.append(self.proc))[0])
    passphrase, port, clip = "srt-" + PASSWORD, free_port(), real_media / "video" / "bikes.mp4"
    servers = [SrtServer(clip, port, passphrase)]
    cfg = stream_config(f"srt://127.0.0.1:{port}?passphrase={passphrase}&latency=20000", id="cam", stall_timeout_s=2,
                        open_timeout_s=5)
    recorder, hub, events = PrometheusRecorder(), StreamHub(), []
    hub.subscribe(RecorderBridge(recorder))
    hub.subscribe(events.append)
    run = BackgroundRun(cfg, hub, metrics=recorder)
    try:
        wait_until(lambda: run.count("cam") >= 20, 20, "20 frames through the SRT relay")
        servers[0].kill()
        wait_until(lambda: any(e.kind == "down" for e in events), 10, "the stream to notice the server is gone")
        at_restart = run.count("cam")
        servers.append(SrtServer(clip, port, passphrase))
        wait_until(lambda: run.count("cam") >= at_restart + 20, 20, "20 frames after the restart")
    finally:
        hub.close(stop_streams=True)
        summary = run.join()
        for server in servers:
            server.kill()

    (status,) = hub.status()["ended"]
    assert status["reconnects"] >= 1 and "stalled: no data for 2 s" in status["last_error"]
    wait_until(lambda: all(relay.returncode is not None for relay in relays), 5, "every relay to be reaped")
    assert len(relays) >= 2, "the stalled relay was killed and a new one started"
    totals = summary.totals
    assert totals["decoded"] == status["decoded"] >= 40
    assert totals["decoded"] == totals["processed"] + totals["dropped"] and totals["failed"] == 0
    assert run.indices("cam") == list(range(totals["decoded"]))
    assert run.sink.results[-1].results.get("chaos") is not None or run.sink.results[-1].outcome is Outcome.DROPPED
    exposition = recorder.exposition().decode()
    assert 'blinkflow_stream_reconnects_total{stream="cam"} 1.0' in exposition
    everything = (caplog.text + exposition + json.dumps(hub.status()) + json.dumps(run.sink.records()) + repr(events)
                  + "\n".join(summary.lines()))
    assert passphrase not in everything and "passphrase=***" in caplog.text


@needs_ffmpeg
def test_http_mpegts_stream_served_by_ffmpeg_listen(real_media):
    port = free_port()
    server = subprocess.Popen(["ffmpeg", "-hide_banner", "-loglevel", "error", "-i",
                               str(real_media / "video" / "realshort.mp4"), "-c", "copy", "-f", "mpegts",
                               "-listen", "1", f"http://127.0.0.1:{port}/live.ts"])
    try:
        # the stream retries until ffmpeg listens, then reads to the end (archive mode: nothing dropped)
        cfg = stream_config(f"http://127.0.0.1:{port}/live.ts", mode="archive", id="ts", reconnect_on_eof=False,
                            max_retries=50, backoff_initial_s=0.05, backoff_max_s=0.2)
        sink = MemorySink()
        summary = LocalRunner(cfg, sinks=[sink]).run()
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert summary.ok and summary.totals["processed"] == 36
    assert [r.index for r in sink.results] == list(range(36))
    assert sink.results[0].width == 64 and sink.results[0].results["chaos"]["checksum"] > 0


CONTROL_TOKEN = "test-token"


def _request(base: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {CONTROL_TOKEN}", "Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
@needs_rtsp
def test_streams_added_and_removed_at_run_time_through_the_control_endpoint(rtsp_servers, real_media, monkeypatch):
    from blinkflow import metrics
    from blinkflow.control import ControlServer
    from blinkflow.control_guard import ControlGuard

    clip = real_media / "video" / "bikes.mp4"
    server = rtsp_servers(mounts={"a": clip, "b": clip})
    cfg = load_config(data={"stages": {"chaos": {"batch": 1}}, "runtime": {"mode": "live"},
                            "control": {"enabled": True, "port": 0, "stream_defaults": {"resize": [64, 48]}}})
    hub = StreamHub(mode="live", defaults=cfg.control.stream_defaults, keep_open=True)
    # the test's RTSP server is on loopback: an internal address the guard allows only when listed
    control = ControlServer(hub, port=0, guard=ControlGuard(token=CONTROL_TOKEN, allow_hosts=["127.0.0.1"])).start()
    recorder = metrics.PrometheusRecorder()
    hub.subscribe(RecorderBridge(recorder))
    run = BackgroundRun(cfg, hub, metrics=recorder)
    try:
        assert _request(control.url, "POST", "/streams", {"url": server.url("a"), "id": "cam1"}) == (
            201, {"id": "cam1", "url": server.url("a")})
        wait_until(lambda: run.count("cam1") >= 10, 30, "cam1 frames")
        assert _request(control.url, "POST", "/streams", {"url": server.url("b"), "id": "cam2"})[0] == 201
        wait_until(lambda: run.count("cam2") >= 10, 30, "cam2 frames")
        assert _request(control.url, "POST", "/streams", {"url": server.url("b"), "id": "cam2"})[0] == 409
        assert _request(control.url, "POST", "/streams", {"url": "ftp://x/y"})[0] == 400
        assert _request(control.url, "DELETE", "/streams/nope")[0] == 404

        assert _request(control.url, "DELETE", "/streams/cam1") == (200, {"id": "cam1", "removed": True})
        wait_until(lambda: [s["id"] for s in _request(control.url, "GET", "/streams")[1]["ended"]] == ["cam1"],
                   10, "cam1 to end")
        cam1_frames, cam2_frames = run.count("cam1"), run.count("cam2")
        wait_until(lambda: run.count("cam2") >= cam2_frames + 10, 30, "cam2 to go on without cam1")
        assert run.count("cam1") == cam1_frames
        listing = _request(control.url, "GET", "/streams")[1]
        assert [s["id"] for s in listing["streams"]] == ["cam2"] and listing["streams"][0]["state"] == "up"
        assert _request(control.url, "POST", "/stop") == (202, {"stopping": True})
        summary = run.join()
    finally:
        hub.close(stop_streams=True)
        control.stop()
    assert summary.accounting.source_errors == []
    for stream in ("cam1", "cam2"):
        decoded = summary.accounting.decoded[stream]
        assert run.indices(stream) == list(range(decoded))
    assert _stream_ids(hub) == ["cam1", "cam2"]

    def streams_in() -> set[str]:
        return {sample.labels["stream"] for family in recorder.registry.collect() for sample in family.samples
                if "stream" in sample.labels}

    assert streams_in() == {"cam1", "cam2"}  # the removed camera's final counts, for a scrape or two
    monkeypatch.setattr(metrics, "REMOVED_SERIES_S", 0.0)
    recorder.refresh()
    assert streams_in() == set()  # then its series go, and cam2's, which ended with the run: nothing failed


def _stream_ids(hub: StreamHub) -> list[str]:
    return sorted(s["id"] for s in hub.status()["ended"])


def test_a_file_stream_that_loops_goes_on_one_frame_after_its_last_pts(monkeypatch):
    """A file decodes faster than real time: the wall clock since the start (0.2 s) was behind the media time of the
    first pass (9.96 s), so every frame of the next pass was clamped to a microsecond after the last. A camera's
    outage still shows as the wall-clock gap."""
    import types

    from blinkflow import streams

    cfg = types.SimpleNamespace(fps=None, options=types.SimpleNamespace(stall_timeout_s=10.0))
    stream = types.SimpleNamespace(_last_pts=-1.0, _t0=1000.0, cfg=cfg, kind="file")
    clock = iter([1000.2, 1030.0, 1000.2, 1005.0])  # when each later session starts (a first one asks not)
    monkeypatch.setattr(streams, "time", types.SimpleNamespace(monotonic=lambda: next(clock)))  # this module's only

    def session(times):
        session_clock = streams._SessionClock(stream, 25.0)
        return [session_clock.pts(types.SimpleNamespace(time=t)) for t in times]

    first = session([i / 25 for i in range(10)])
    second = session([i / 25 for i in range(10)])
    assert second == pytest.approx([first[-1] + (i + 1) / 25 for i in range(10)])  # spaced as the media is
    third = session([0.0, 0.04])
    assert third == pytest.approx([30.0, 30.04])  # back after 30 s: the gap is kept
    # a live source that bursts on connecting (HLS, a cached GOP) runs its pts ahead of the wall clock: its next
    # connection starts from the wall clock again, or the lead grew with each one and an outage showed no gap
    camera = types.SimpleNamespace(_last_pts=-1.0, _t0=1000.0, cfg=cfg, kind="http")
    stream = camera
    burst = session([i / 25 for i in range(50)])  # 2 s of media delivered in the first 0.2 s
    again = session([0.0])  # reconnected 0.2 s in: on the wall clock, not after the burst's lead
    assert burst[-1] == pytest.approx(1.96) and again == [pytest.approx(burst[-1] + 1e-6)]
    after_outage = session([0.0])  # back 5 s in: the gap from the last pts shows
    assert after_outage == pytest.approx([5.0])


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_a_slow_consumer_is_no_stall_of_the_camera(tmp_path):
    """overflow: block (archive mode): the wait for room in the buffer counted as 'data but no decodable frame',
    so a healthy stream reconnected every stall_timeout_s, and a file: stream replayed its first frames forever."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=6)
    cfg = stream_config(f"file:{clip}", mode="archive", id="cam", queue_size=1, reconnect_on_eof=False, max_frames=6,
                        stall_timeout_s=0.3, stages={"chaos": {"batch": 1, "options": {"sleep_ms": 450}}})
    sink = MemorySink()
    summary = LocalRunner(cfg, sinks=[sink]).run()
    assert [r.index for r in sink.results] == list(range(6)) and summary.totals["processed"] == 6
    steps = [b.pts - a.pts for a, b in zip(sink.results, sink.results[1:])]
    assert steps == pytest.approx([1 / 10] * 5, abs=1e-3)  # 10 fps, one pass through the file: no reconnect replayed it


def test_each_round_takes_a_streams_dropped_stubs_with_one_frame():
    """One item a round, stubs first: a camera dropping frames faster than the rounds came never had a frame
    taken (a 30 fps camera beside a 25 fps one: 0 processed, its stubs seconds late and growing)."""
    from blinkflow.config import SourceConfig
    from blinkflow.frame import Frame

    cond = threading.Condition()
    stream = streams.LiveStream(SourceConfig(type="stream", url="udp://127.0.0.1:9"), "cam", cond, lambda event: None,
                                "drop_oldest")
    stubs = [Frame("cam", i, i / 30, None) for i in range(3)]
    frames = [Frame("cam", i, i / 30, None) for i in (3, 4)]
    stream._dropped.extend(stubs)
    stream._frames.extend(frames)
    with cond:
        assert stream.take() == [*stubs, frames[0]]
        assert stream.take() == [frames[1]]
        assert stream.take() == []


def test_a_guarded_stream_of_any_scheme_opens_no_playlist_demuxer(monkeypatch):
    """udp://host:port/a.m3u8?timeout=...: FFmpeg read the datagram to its end (the timeout) as an HLS playlist and
    fetched its segment URLs from an internal server the control guard refuses when given directly (a review's
    repro through the control endpoint); only http(s) streams had the demuxer allowlist."""
    import av

    opened = []

    def refuse(target, **kwargs):
        opened.append(kwargs.get("options") or {})
        raise av.error.ExitError(1414092869, "stop here")  # as a timeout: the stream gives up after its retries

    monkeypatch.setattr(av, "open", refuse)
    hub = StreamHub(mode="live", keep_open=True)
    try:
        for url in ("udp://127.0.0.1:9/a.m3u8?timeout=1000000", "rtsp://127.0.0.1:9/cam.m3u8"):
            hub.add_url(url, url.split(":")[0], connect_check=lambda url: None, max_retries=0, backoff_initial_s=0.05)
        wait_until(lambda: len(opened) >= 2, 10, "both streams tried to open")
    finally:
        hub.close(stop_streams=True)
    for options in opened:
        allowed = options["format_whitelist"].split(",")
        assert not {"hls", "dash", "sdp", "concat"} & set(allowed) and "mpegts" in allowed


def test_a_stream_added_again_under_its_id_goes_on_numbering_its_frames(tmp_path):
    """POST cam1, DELETE cam1, POST cam1: the second one's frames started at index 0 again, so records and events
    of the two shared (stream, index) keys in one output."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=4)
    cfg = load_config(data={"stages": {"chaos": {"batch": 1}}, "runtime": {"mode": "live"}})
    hub = StreamHub(mode="live", keep_open=True, defaults={"resize": [64, 48], "reconnect_on_eof": False})
    run = BackgroundRun(cfg, hub)
    try:
        for expected in (4, 8):
            hub.add_url(f"file:{clip}", "cam")
            wait_until(lambda: run.count("cam") >= expected, 20, f"{expected} frames")
            wait_until(lambda: "cam" in [s["id"] for s in hub.status()["ended"]], 10, "the stream to end")
        hub.close(stop_streams=True)
        summary = run.join()
    finally:
        hub.close(stop_streams=True)
    assert run.indices("cam") == list(range(8)) and summary.accounting.decoded["cam"] == 8


# --------------------------------------------------------------------------- source clocks and end reasons


def _serve_http_once(content_type: str, parts: list[bytes], interval_s: float = 0.0) -> int:
    """A one-client HTTP server: the headers, ``parts`` ``interval_s`` apart (paced like a camera), then the end
    (with a Content-Length: FFmpeg takes the close of a body of unknown length for a connection lost)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(20)

    def serve() -> None:
        with server:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Type: {content_type}\r\n"
                             f"Content-Length: {sum(map(len, parts))}\r\n\r\n".encode())
                for part in parts:
                    conn.sendall(part)
                    time.sleep(interval_s)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(4096)  # until the client closes: no reset cuts the data short

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def _mpegts(clip: Path, out: Path, offset_s: float = 0.0) -> bytes:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(clip), "-c", "copy", "-output_ts_offset", str(offset_s),
                    "-f", "mpegts", str(out)], check=True, timeout=60)
    return out.read_bytes()


@needs_ffmpeg
@pytest.mark.parametrize("offset_s", [0.0, 100.0], ids=["back", "forward"])
def test_a_source_clock_that_jumps_within_a_connection_is_rebased(tmp_path, caplog, offset_s):
    """Two encoder runs back to back on one connection (an encoder restarted faster than stall_timeout_s,
    concatenated MPEG-TS): back, every later pts froze at the last one plus a microsecond and ``fps`` kept no frame
    of the second run (silent loss); forward, pts ran 100 s ahead of the wall clock."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=20)  # 2 s at 10 fps
    payload = _mpegts(clip, tmp_path / "a.ts") + _mpegts(clip, tmp_path / "b.ts", offset_s)
    port = _serve_http_once("video/mp2t", [payload])
    hub = StreamHub(mode="archive")
    hub.add_url(f"http://user:{PASSWORD}@127.0.0.1:{port}/cam.ts", "cam", fps=5, stall_timeout_s=2,
                reconnect_on_eof=False, max_retries=0)
    hub.close()
    *frames, end = hub_items(hub)
    assert end.error is None and len(frames) == 20  # 2 s each at fps 5: both runs
    pts = [f.pts for f in frames]
    assert all(0 < b - a <= 0.25 for a, b in zip(pts, pts[1:])), pts  # increasing, on the 5 fps grid, no leap
    assert [f.index for f in frames if f.meta.get("discontinuity")] == [10]
    jumps = [r.getMessage() for r in caplog.records if "timestamps jumped" in r.getMessage()]
    assert len(jumps) == 1 and "http://***@127.0.0.1" in jumps[0] and PASSWORD not in caplog.text


def _jpegs(count: int) -> list[bytes]:
    from fractions import Fraction

    import av
    import numpy as np

    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = 64, 48, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    jpegs = []
    for i in range(count):
        image = np.full((48, 64, 3), 40, dtype=np.uint8)
        image[8:16, 4 * i % 56:4 * i % 56 + 8] = 230
        jpegs += [bytes(p) for p in codec.encode(av.VideoFrame.from_ndarray(image, format="rgb24"))]
    return jpegs


def _serve_mjpeg(count: int, interval_s: float) -> int:
    """An MJPEG camera over HTTP (multipart/x-mixed-replace) sending ``count`` frames, ending with the close
    delimiter of a finite multipart body."""
    parts = [b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(j), j)
             for j in _jpegs(count)]
    return _serve_http_once("multipart/x-mixed-replace;boundary=frame", parts + [b"--frame--\r\n"], interval_s)


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_an_mjpeg_camera_over_http_is_timed_by_arrival():
    """MJPEG over HTTP has no frame times: FFmpeg numbered the frames at a guessed 25 fps, so a 5 fps camera's pts
    ran 5x slow and fps: 2 kept 0.4 frames a second."""
    port = _serve_mjpeg(11, interval_s=0.2)  # 2 s at 5 fps
    hub = StreamHub(mode="archive")
    hub.add_url(f"http://127.0.0.1:{port}/video.mjpg", "yard", reconnect_on_eof=False, max_retries=0)
    hub.close()
    *frames, _ = hub_items(hub)
    pts = [f.pts for f in frames]
    # the frames FFmpeg reads while it opens the stream arrive together; the last five steps are the camera's 0.2 s
    assert len(frames) == 11 and 0.7 <= pts[-1] - pts[-6] <= 1.5, pts  # not 5 * 0.04 s


def test_a_finite_mjpeg_stream_ends_normally():
    """reconnect_on_eof: false: FFmpeg's mpjpeg demuxer reports the closing boundary as invalid data, so the stream's
    normal end was a source error (exit code 1)."""
    port = _serve_mjpeg(6, interval_s=0.0)
    hub = StreamHub(mode="archive")
    hub.add_url(f"http://127.0.0.1:{port}/video.mjpg", "yard", reconnect_on_eof=False, max_retries=0)
    hub.close()
    *frames, end = hub_items(hub)
    assert end.error is None and [f.index for f in frames] == list(range(6))


def test_a_silent_rtsp_server_is_no_answer_within_the_open_timeout():
    """A server that accepts the connection and never answers: FFmpeg's RTSP reports the open timeout's interruption
    as invalid data ("cannot connect: InvalidDataError ...")."""
    server, held = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.2)
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except socket.timeout:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        hub = StreamHub()
        hub.add_url(f"rtsp://127.0.0.1:{server.getsockname()[1]}/cam", "cam", open_timeout_s=1, max_retries=0)
        hub.close()
        (end,) = hub_items(hub)
    finally:
        stop.set()
        acceptor.join(5)
        for conn in held:
            conn.close()
        server.close()
    assert end.error.endswith("gave up after 0 reconnection attempts: cannot connect: no answer within 1 s"), end.error


@needs_srt
def test_an_srt_relay_timing_out_says_so_in_one_line_without_a_traceback(monkeypatch, capfd, caplog):
    """The relay's read raised its timeout inside PyAV's read callback, which printed "PyAV library exception being
    dropped" and a traceback before the stream's one-line error."""
    monkeypatch.setattr(streams, "pyav_has_protocol", lambda scheme: False)  # relay even if PyAV could read it
    hub = StreamHub()
    hub.add_url(f"srt://127.0.0.1:{free_port()}?passphrase=srt-{PASSWORD}", "cam", open_timeout_s=1, max_retries=0)
    hub.close()
    (end,) = hub_items(hub)
    assert end.error == ("stream cam (srt://127.0.0.1:%s?passphrase=***): gave up after 0 reconnection attempts: "
                         "cannot connect: no answer within 1 s" % end.error.split(":")[2].split("?")[0])
    printed = capfd.readouterr().err + caplog.text
    assert "Traceback" not in printed and "exception being dropped" not in printed, printed


@contextlib.contextmanager
def _ffmpeg_http_camera(clip: Path):
    """``ffmpeg -re -i CLIP -f mpegts -listen 1 http://127.0.0.1:PORT/cam.ts``: a live camera for one client; yields
    its URL once it listens (read from /proc, not by connecting: a probe connection would be its one client)."""
    port = free_port()
    proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-i", str(clip), "-c",
                             "copy", "-f", "mpegts", "-listen", "1", f"http://127.0.0.1:{port}/cam.ts"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while f":{port:04X} 00000000:0000 0A" not in Path("/proc/net/tcp").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "ffmpeg did not start listening"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/cam.ts"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@needs_ffmpeg
@pytest.mark.slow  # seconds: two 6 s cameras
def test_a_slow_probe_fits_the_open_timeout_or_says_so_not_stalled(tmp_path):
    """A 5 fps camera takes FFmpeg's probe seconds of real time (3.8 s for this one); open_timeout_s cut it short,
    av.open returned anyway, the first read failed at once and the stream was "stalled: no data" on every reconnect."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=30, fps=5)

    def run(**options) -> tuple[list, Any]:
        with _ffmpeg_http_camera(clip) as url:
            hub = StreamHub(mode="archive")
            hub.add_url(url, "cam", open_timeout_s=3, stall_timeout_s=2, max_frames=20, max_retries=0, **options)
            hub.close()
            *frames, end = hub_items(hub)  # read while the camera runs
        return frames, end

    frames, end = run()  # the probe is held to half the open timeout
    assert end.error is None and [f.index for f in frames] == list(range(20)), end.error
    frames, end = run(ffmpeg_options={"analyzeduration": "10000000"})  # longer than the whole clip
    assert not frames and end.error.endswith(
        "cannot connect: FFmpeg's probe of the stream took the whole open_timeout_s (3 s); raise open_timeout_s or "
        "lower ffmpeg_options analyzeduration"), end.error


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_the_open_timeout_counts_ffmpegs_open_not_the_cuda_decoder_probe_before_it(tmp_path, monkeypatch):
    """On a GPU host the first CUDA context (hwaccel: auto) takes seconds before av.open: the stream's first open was
    blamed on FFmpeg's probe and, with max_retries 0, ended."""
    from blinkflow import hwdecode

    def slow_probe() -> str:
        time.sleep(1.5)
        return "no CUDA decoder (simulated)"

    monkeypatch.setattr(hwdecode, "cuda_decoder_missing", slow_probe)
    clip = write_test_video(tmp_path / "clip.mp4", frames=6)
    hub = StreamHub(mode="archive")
    hub.add_url(f"file:{clip}", "cam", open_timeout_s=1, max_retries=0, reconnect_on_eof=False, hwaccel="auto")
    hub.close()
    *frames, end = hub_items(hub)
    assert end.error is None and len(frames) == 6, end.error
