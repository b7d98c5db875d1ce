"""The control endpoint's hardening, probe by probe (docs/security.md): a real HTTP server on a free
loopback port, raw requests where a client library would tidy the probe away."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("url, words", [
    ("http://127.0.0.1:8080\u0000@93.184.215.14/x", "control character"),  # FFmpeg would stop at the NUL
    ("rtsp://cam.example/a b", "control character"),
    ("http://[::1/x", "not a valid URL"),
    ("rtsp://h.example:99999/x", "not a valid URL"),
    ("rtsp://h.example:abc/x", "not a valid URL"),
])
def test_a_url_this_parser_and_ffmpeg_would_read_apart_is_a_400(control, url, words):
    for body in ({"url": url}, {"url": url, "id": "cam"}):  # without an id, the id is made from the URL
        status, reply = post(control, body)
        assert status == 400 and words in reply["error"], reply


def test_a_host_name_too_long_to_resolve_gets_an_answer(control):
    status, reply = post(control, {"url": "rtsp://" + "a" * 70 + ".example/x", "id": "long"})
    assert status == 201, reply  # unresolvable here: FFmpeg cannot reach it either, and the stream says so


def test_dot_dot_cannot_walk_out_of_an_allowed_folder():
    guard = ControlGuard(token=None, allow_local=["/srv/replays/*"])
    assert guard.connect_refusal("file:///srv/replays/door.mp4") is None
    for url in ("file:///srv/replays/../secrets/key.mp4", "/srv/replays/../../etc/passwd"):
        assert "control.allow_local" in guard.connect_refusal(url)


def test_a_content_length_of_unicode_digits_is_a_400(control):
    request = ("POST /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + TOKEN
               + "\r\nContent-Type: application/json\r\nContent-Length: \u00b2\r\n\r\n{}").encode("latin-1")
    assert raw(control, request).startswith(b"HTTP/1.0 400")


@pytest.fixture
def two_slots(monkeypatch):
    """A control endpoint that serves two requests at once."""
    monkeypatch.setattr(ControlServer, "max_threads", 2)
    hub = StreamHub(mode="live", keep_open=True)
    server = ControlServer(hub, "127.0.0.1", 0, guard=ControlGuard(token=TOKEN)).start()
    try:
        yield server
    finally:
        hub.close(stop_streams=True)
        server.stop()


def _slow_clients(server, count: int) -> list[socket.socket]:
    """Clients that send a header byte now and then and never finish (slowloris)."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /streams HTTP/1.1\r\nX")
        sockets.append(sock)
    time.sleep(0.3)  # accepted, each holding a slot
    return sockets


def test_a_request_beyond_the_slots_is_told_so_in_json(two_slots):
    sockets = _slow_clients(two_slots, 2)
    try:
        reply = raw(two_slots, f"GET /streams HTTP/1.1\r\nHost: 127.0.0.1:{two_slots.port}\r\n\r\n".encode())
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 503") and json.loads(body)["error"].startswith("busy")
    finally:
        for sock in sockets:
            sock.close()


def test_slow_clients_are_cut_at_the_deadline_and_the_operator_gets_through(two_slots):
    two_slots._server.request_deadline_s = 0.5
    sockets = _slow_clients(two_slots, 2)
    try:
        time.sleep(1.0)
        for sock in sockets:  # still trickling: the socket timeout alone never fired
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
        assert all(sock.recv(100) == b"" for sock in sockets)  # cut
        status, reply = post(two_slots, {}, path="/stop")
        assert status == 202, reply
    finally:
        for sock in sockets:
            sock.close()


def test_a_learned_password_that_is_a_word_leaves_the_replys_keys_alone(control):
    from blinkflow.redact import redact_obj, remember_secrets

    remember_secrets("rtsp://admin:streams@198.18.0.9/live")
    reply = redact_obj({"streams": [{"id": "cam", "url": "rtsp://admin:streams@198.18.0.9/live"}],
                        "rtsp://u:pw@h/x": 1})
    assert set(reply) == {"streams", "rtsp://***@h/x"} and "streams@" not in json.dumps(reply)
    with urllib.request.urlopen(control.url + "/streams", timeout=10) as answer:
        assert "streams" in json.loads(answer.read())  # the served reply too


@pytest.mark.parametrize("request_bytes", [b"PUT /streams HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
                                           b"PATCH /stop HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                                           b"BREW /pot HTTP/1.1\r\n\r\n", b"GARBAGE\r\n\r\n"])
def test_other_methods_and_malformed_requests_are_answered_in_json(control, request_bytes):
    reply = raw(control, request_bytes)
    if not reply.startswith(b"HTTP/"):  # no request line: an HTTP/0.9 answer is the body alone
        assert json.loads(reply)["error"].startswith("Bad request syntax")
        return
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 4", b"HTTP/1.0 5")) and b"application/json" in head, head
    assert json.loads(body)["error"]


def test_a_missing_token_says_how_to_send_it_unscrubbed(control):
    status, reply = post(control, {"url": "rtsp://198.18.0.1/a"}, headers={"Authorization": ""})
    assert status == 401 and "'Authorization: Bearer <token>'" in reply["error"] and "***" not in reply["error"]


@pytest.mark.parametrize("stream_id", ["cam\nFAKE log line", "tab\there", "", "x" * 129])
def test_a_stream_id_that_would_split_a_log_line_is_a_400(control, stream_id):
    status, reply = post(control, {"url": "rtsp://198.18.0.1/a", "id": stream_id})
    assert status == 400 and "is not a stream id" in reply["error"], reply
