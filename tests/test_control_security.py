"""The control endpoint's hardening, probe by probe (docs/security.md): a real HTTP server on a free
loopback port, raw requests where a client library would tidy the probe away."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from blinkflow.config import load_config
from blinkflow.control import ControlServer
from blinkflow.control_guard import ControlGuard
from blinkflow.errors import ConfigError
from blinkflow.streams import StreamHub

TOKEN = "s3cret-token"


@pytest.fixture
def control():
    hub = StreamHub(mode="live", keep_open=True)
    guard = ControlGuard(token=TOKEN, allow_local=["/srv/replays/*.mp4"], allow_hosts=["198.18.0.0/15"],
                         allowed_ffmpeg_options=["rtsp_transport"])
    server = ControlServer(hub, "127.0.0.1", 0, guard=guard).start()
    try:
        yield server
    finally:
        hub.close(stop_streams=True)
        server.stop()


def post(server, body, headers=None, path="/streams", method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    base = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    request = urllib.request.Request(server.url + path, data=data, method=method, headers={**base, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def raw(server, request: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(request)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_a_mutating_request_needs_the_bearer_token(control):
    assert post(control, {"url": "rtsp://198.18.0.1/a"}, {"Authorization": ""})[0] == 401
    assert post(control, {"url": "rtsp://198.18.0.1/a"}, {"Authorization": "Bearer wrong"})[0] == 401
    assert post(control, {}, path="/stop", headers={"Authorization": ""})[0] == 401
    assert post(control, b"", path="/streams/x", method="DELETE", headers={"Authorization": ""})[0] == 401
    status, reply = post(control, {}, path="/stop")
    assert (status, reply) == (202, {"stopping": True})


def test_a_text_plain_post_from_another_origin_is_refused(control):
    # what a web page's fetch() can send without a CORS preflight
    status, reply = post(control, b'{"url": "file:///etc/shadow"}', {"Content-Type": "text/plain",
                                                                    "Origin": "http://evil.example"})
    assert status == 403 and "cross-origin" in reply["error"]
    status, reply = post(control, b'{"url": "rtsp://198.18.0.1/a"}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in reply["error"]


def test_a_dns_rebinding_host_is_refused(control):
    reply = raw(control, b"GET /streams HTTP/1.1\r\nHost: evil.example:9465\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 403") and b"not this endpoint" in reply
    reply = raw(control, f"GET /streams HTTP/1.1\r\nHost: localhost:{control.port}\r\nConnection: close\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.0 200")


@pytest.mark.parametrize("url", ["file:///etc/shadow", "/etc/passwd", "/dev/video0", "file:///srv/replays/x.mkv"])
def test_local_files_and_devices_need_an_allowlist_entry(control, url):
    status, reply = post(control, {"url": url})
    assert status == 403 and "control.allow_local" in reply["error"]


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/admin", "rtsp://localhost/cam", "http://169.254.169.254/latest",
                                 "http://10.0.0.5/x.ts", "http://[::1]/x"])
def test_internal_addresses_are_refused_unless_allowed(control, url):
    status, reply = post(control, {"url": url})
    assert status == 403 and "control.allow_hosts" in reply["error"], reply


def test_an_allowed_network_and_file_pass_the_guard():
    guard = ControlGuard(token=None, allow_local=["/srv/replays/*.mp4"], allow_hosts=["198.18.0.0/15", "cam.local"],
                         allowed_ffmpeg_options=["rtsp_transport"])
    for url in ("rtsp://198.18.3.4/live", "rtsp://cam.local/a", "/srv/replays/door.mp4", "file:///srv/replays/a.mp4",
                "udp://@:5000", "http://93.184.216.34/live.ts"):
        guard.check_stream({"url": url, "ffmpeg_options": {"rtsp_transport": "tcp"}})


@pytest.mark.parametrize("settings, words", [
    ({"resize": [4000, 4000]}, "control.max_pixels"), ({"queue_size": 4096}, "control.max_queue_size"),
    ({"fps": 1000}, "control.max_fps"), ({"ffmpeg_options": {"protocol_whitelist": "file,http"}}, "FFmpeg option"),
    ({"headers": "x"}, "unknown stream setting"),
])
def test_settings_beyond_the_limits_are_refused(control, settings, words):
    status, reply = post(control, {"url": "rtsp://198.18.0.1/a", **settings})
    assert status in (400, 403) and words in reply["error"], reply


@pytest.mark.parametrize("length", [b"abc", b"-1", b"1e3"])
def test_a_malformed_content_length_is_a_400_not_a_traceback_or_a_hang(control, length):
    request = (b"POST /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN.encode()
               + b"\r\nContent-Type: application/json\r\nContent-Length: " + length + b"\r\n\r\n{}")
    started = time.monotonic()
    reply = raw(control, request)
    assert reply.startswith(b"HTTP/1.0 400") and b"Content-Length" in reply
    assert time.monotonic() - started < 5


@pytest.mark.slow
def test_stalled_clients_are_dropped_and_cannot_pile_up_threads(control, monkeypatch):
    before = threading.active_count()
    sockets = []
    try:
        for _ in range(60):  # each promises a body it never sends
            sock = socket.create_connection(("127.0.0.1", control.port), timeout=5)
            sock.sendall(b"POST /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n")
            sockets.append(sock)
        time.sleep(1.0)
        assert threading.active_count() - before <= ControlServer.max_threads + 2
        request = (f"POST /stop HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                   "Content-Length: 0\r\nConnection: close\r\n\r\n").encode()
        started = time.monotonic()
        try:
            reply = raw(control, request)
        except (BrokenPipeError, ConnectionResetError):
            reply = b"HTTP/1.0 503"  # turned away before it finished sending: the same answer
        # served, or turned away at once: never hung
        assert reply.startswith((b"HTTP/1.0 202", b"HTTP/1.0 503")) and time.monotonic() - started < 5
    finally:
        for sock in sockets:
            sock.close()


def test_binding_beyond_loopback_without_a_token_is_a_config_error():
    with pytest.raises(ConfigError, match=r"control\.auth: none .* 0\.0\.0\.0"):
        load_config(data={"control": {"enabled": True, "host": "0.0.0.0", "auth": "none"}})
    cfg = load_config(data={"control": {"enabled": True, "host": "0.0.0.0"}})  # with a token it may
    assert cfg.control.auth == "token"


def test_the_token_comes_from_the_environment_a_file_or_is_generated_once(tmp_path, monkeypatch, capsys):
    control = load_config(data={"control": {"enabled": True}}).control
    monkeypatch.setenv("BLINKFLOW_CONTROL_TOKEN", "from-env")
    assert ControlGuard.from_config(control).token == "from-env"
    monkeypatch.delenv("BLINKFLOW_CONTROL_TOKEN")
    (tmp_path / "token").write_text("from-file\n")
    control.token_file = str(tmp_path / "token")
    assert ControlGuard.from_config(control).token == "from-file"
    control.token_file = None
    generated = ControlGuard.from_config(control).token
    assert len(generated) >= 32 and generated in capsys.readouterr().err
