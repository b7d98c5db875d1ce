"""Push sinks against real servers: a Mosquitto broker started here (Debian package ``mosquitto``) and a
local HTTP server with failures injected. Everything stays on 127.0.0.1 on free ports."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from blinkflow.config import SinkConfig, load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame
from blinkflow.metrics import SINK_LEDGER, PrometheusRecorder
from blinkflow.sinks.mqtt import MqttSink, topic_part
from blinkflow.sinks.webhook import WebhookSink

from tests.conftest import REPO_ROOT

mqtt = pytest.importorskip("paho.mqtt.client")

STREAM = "cam1"


@pytest.fixture(autouse=True)
def no_threads_left_behind():
    """Every sink's sender thread and MQTT network thread ends with its close()."""
    yield
    names = ("blinkflow-mqtt", "blinkflow-webhook", "paho-mqtt")
    wait_until(lambda: not [t for t in threading.enumerate() if t.name.startswith(names)], 5, "the sinks' threads to end")


# --------------------------------------------------------------------------- scripted events


def event(index: int, kind: str, track: int, **extra) -> dict:
    return {"type": kind, "stream": STREAM, "ts": 1_760_000_000.0 + index / 10, "pts": index / 10, "index": index,
            "track_id": track, "label": "car", "score": 0.9, **extra}


#: a car enters the zone, crosses the line and leaves; a person appears and ends
SCRIPT = {
    0: [event(0, "new", 1)],
    2: [event(2, "enter_zone", 1, zone="gate")],
    3: [event(3, "cross_line", 1, line="door", direction="in"), event(3, "new", 2, label="person")],
    5: [event(5, "exit_zone", 1, zone="gate")],
    7: [event(7, "end", 2, duration_s=0.4, snapshot="snapshots/cam1-2.jpg")],
}
SCRIPT_EVENTS = [e for index in sorted(SCRIPT) for e in SCRIPT[index]]


def result(index: int, events: list[dict] | None = None, stream: str = STREAM):
    frame = Frame(stream_id=stream, index=index, pts=index / 10, image=np.zeros((24, 32, 3), dtype=np.uint8))
    frame.results["detect"] = {"boxes": [[1.0, 2.0, 10.0, 12.0]], "labels": [1], "classes": ["car"], "scores": [0.9]}
    frame.results["segment"] = {"mask": {"format": "png", "data": b"\x89PNG", "height": 24, "width": 32},
                                "classes": ["background", "car"], "areas": {"car": 20}}
    if events is not None:
        frame.results["events"] = events
    return frame.finish()


def scripted_results(frames: int = 8):
    return [result(i, SCRIPT.get(i, [])) for i in range(frames)]


def numbered(n: int, start: int = 0) -> list[dict]:
    return [event(i, "new", i + 1) for i in range(start, start + n)]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def check_event_schema(events: list[dict]) -> None:
    """The messages are events as pipeline/event.schema.json (the events stage's contract) defines them."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO_ROOT / "pipeline" / "event.schema.json").read_text())
    for item in events:
        jsonschema.validate(item, schema)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ledger(sink: str, reason: str | None = None) -> int:
    delivered, dropped, _ = SINK_LEDGER.snapshot()
    return delivered.get(sink, 0) if reason is None else dropped.get((sink, reason), 0)


# --------------------------------------------------------------------------- a real Mosquitto


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None)
    if found is None:
        pytest.skip("mosquitto is not installed: apt-get install mosquitto (Debian package mosquitto)")
    return found


class Broker:
    """A mosquitto process on a free 127.0.0.1 port, with a config file of its own."""

    def __init__(self, folder: Path, persistence: bool = False, extra: tuple[str, ...] = ()) -> None:
        self.binary = mosquitto_binary()
        self.folder = folder
        self.port = free_port()
        self.conf = folder / "mosquitto.conf"
        anonymous = not any(line.startswith("password_file") for line in extra)
        lines = [f"listener {self.port} 127.0.0.1", f"allow_anonymous {str(anonymous).lower()}",
                 f"persistence {str(persistence).lower()}", f"user {getpass.getuser()}", "log_dest stderr",
                 "log_type error", "log_type warning", *extra]
        if persistence:  # the restart test keeps its checker's session (and queued messages) across the restart
            lines.append(f"persistence_location {folder}/")
        self.conf.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.log = (self.folder / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"mosquitto did not start: {(self.folder / 'mosquitto.log').read_text()}")
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    running = Broker(tmp_path_factory.mktemp("mosquitto")).start()
    yield running
    running.stop()


class Subscriber:
    """A paho client that records every message it gets on ``topic``."""

    def __init__(self, port: int, topic: str, client_id: str = "", durable: bool = False, prepare=None) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not durable)
        if prepare is not None:
            prepare(self.client)  # TLS, credentials
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "the test subscriber could not subscribe"

    def payloads(self, topic: str) -> list[bytes]:
        return [payload for t, payload, _ in list(self.messages) if t == topic]

    def events(self, topic: str) -> list[dict]:
        return [json.loads(p) for p in self.payloads(topic)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained_status(port: int, prefix: str) -> tuple[bytes, bool]:
    """What a newcomer gets on <prefix>/status (the retained value), waiting up to 5 s."""
    subscriber = Subscriber(port, f"{prefix}/status")
    try:
        wait_until(lambda: subscriber.messages, 5, f"a retained message on {prefix}/status")
        _, payload, retained = subscriber.messages[0]
        return payload, retained
    finally:
        subscriber.close()


def mqtt_config(port: int, prefix: str, **settings) -> SinkConfig:
    values = {"backoff_initial_s": 0.1, "backoff_max_s": 0.5, "close_timeout_s": 5.0, **settings}
    return SinkConfig(type="mqtt", host="127.0.0.1", port=port, topic_prefix=prefix, **values)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_mqtt_publishes_the_exact_events_with_a_retained_status(broker):
    subscriber = Subscriber(broker.port, "exact/#")
    sink = MqttSink(mqtt_config(broker.port, "exact"))
    try:
        for item in scripted_results():
            sink.write(item)  # before the connection is up: buffered, then delivered
        wait_until(lambda: len(subscriber.payloads(f"exact/{STREAM}/events")) == len(SCRIPT_EVENTS), 10, "the events")
        assert subscriber.events(f"exact/{STREAM}/events") == SCRIPT_EVENTS
        check_event_schema(subscriber.events(f"exact/{STREAM}/events"))
        assert subscriber.payloads("exact/status") == [b"online"]
        assert not [t for t, _, _ in subscriber.messages if t.endswith("/frames")], "frames are off by default"
        assert retained_status(broker.port, "exact") == (b"online", True)
        wait_until(lambda: sink.status()["delivered"] == len(SCRIPT_EVENTS), 5, "the acknowledgements")
    finally:
        sink.close()
    n = len(SCRIPT_EVENTS)
    assert sink.status() == {"written": n, "delivered": n, "pending": 0, "dropped": {}}
    assert retained_status(broker.port, "exact") == (b"offline", True)  # said on a clean close
    subscriber.close()


@pytest.mark.timeout(60)
def test_a_message_over_the_brokers_limit_is_dropped_as_too_large_and_the_rest_arrive(tmp_path, caplog):
    """mosquitto closed the connection on the 5 kB event, paho sent it again after every reconnect (55 times in
    11 s, a warning each), and the events after it never arrived."""
    limited = Broker(tmp_path, extra=("max_packet_size 2000",)).start()
    subscriber = Subscriber(limited.port, "limit/#")
    sink = MqttSink(mqtt_config(limited.port, "limit", max_message_kb=1.5))
    events = numbered(6)
    events[2]["note"] = "x" * 5000
    try:
        for item in events:
            sink.write(result(item["index"], [item]))
        wait_until(lambda: sink.status()["delivered"] == 5, 10, "the five small events")
        wait_until(lambda: len(subscriber.payloads(f"limit/{STREAM}/events")) == 5, 10, "the subscriber's five")
    finally:
        sink.close()
        subscriber.close()
        limited.stop()
    assert sink.status() == {"written": 6, "delivered": 5, "pending": 0, "dropped": {"too_large": 1}}
    assert [e["index"] for e in subscriber.events(f"limit/{STREAM}/events")] == [0, 1, 3, 4, 5]
    assert sum("over max_message_kb 1.5, dropped" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_broker_closing_each_connection_at_once_is_said_once_with_the_likely_cause(tmp_path, caplog):
    """Each reconnect resent the message over the broker's limit: a "lost" warning five times a second."""
    limited = Broker(tmp_path, extra=("max_packet_size 2000",)).start()
    sink = MqttSink(mqtt_config(limited.port, "flap", close_timeout_s=0.5))
    try:
        item = numbered(1)[0]
        item["note"] = "x" * 5000  # under max_message_kb, over the broker's limit
        sink.write(result(0, [item]))
        wait_until(lambda: sink.short_connections >= 4, 20, "four short connections")
    finally:
        sink.close()
        limited.stop()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(line.startswith("mqtt sink: lost") for line in lines) == 1
    assert sum("closed the connection right after each of the last 3 connects" in line for line in lines) == 1


@pytest.mark.timeout(30)
def test_the_buffer_is_bounded_in_bytes_too(caplog):
    """Held by count alone, 1000 frame records with dense fields (3 MB each) were 3 GB while the broker was down."""
    with black_hole() as url:
        sink = WebhookSink(webhook_config(url, buffer=1000, buffer_mb=0.05, timeout_s=0.2, close_timeout_s=0.1))
        for item in numbered(40):
            item["note"] = "x" * 5000  # ~5 kB each: 10 fit in 50 kB
            sink.write(result(item["index"], [item]))
        assert len(sink._buffer) <= 10 and sink._buffered_bytes <= 0.05e6
        assert sink.status()["dropped"]["overflow"] >= 29
        sink.close()


@pytest.mark.timeout(60)
def test_mqtt_per_frame_records_leave_out_masks_unless_asked(broker):
    subscriber = Subscriber(broker.port, "frames/#")
    lean = MqttSink(mqtt_config(broker.port, "frames", per_frame=True, client_id="lean"))
    for item in scripted_results(3):
        lean.write(item)
    lean.close()
    full = MqttSink(mqtt_config(broker.port, "frames", per_frame=True, include_dense=True, client_id="full"))
    full.write(result(9, stream="a/b+c"))  # a stream id with topic separators and wildcards is one level...
    full.close()
    level = topic_part("a/b+c")  # ...with a digest of the id: "a_b_c", "a/b_c" and "a+b/c" stay three topics
    assert level.startswith("a_b_c~") and len({level, topic_part("a_b_c"), topic_part("a+b/c")}) == 3
    assert topic_part("a_b_c") == "a_b_c"  # an id that needs no change keeps its name
    wait_until(lambda: len(subscriber.payloads(f"frames/{level}/frames")) == 1, 5, "the full record")
    records = subscriber.events(f"frames/{STREAM}/frames")
    assert [r["index"] for r in records] == [0, 1, 2]
    assert all("mask" not in r["segment"] and r["segment"]["areas"] == {"car": 20} for r in records)
    assert records[0]["events"] == SCRIPT[0] and subscriber.events(f"frames/{STREAM}/events") == SCRIPT[0] + SCRIPT[2]
    assert subscriber.events(f"frames/{level}/frames")[0]["segment"]["mask"]["format"] == "png"
    subscriber.close()


SINK_PROCESS = """
import sys, time
from blinkflow.config import SinkConfig
from blinkflow.sinks.mqtt import MqttSink
sink = MqttSink(SinkConfig(type="mqtt", host="127.0.0.1", port=int(sys.argv[1]), topic_prefix="will"))
while not sink.connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_mqtt_last_will_says_offline_when_the_sink_dies_uncleanly(broker):
    process = subprocess.Popen([sys.executable, "-c", SINK_PROCESS, str(broker.port)], stdout=subprocess.PIPE,
                               cwd=REPO_ROOT, text=True)
    try:
        assert process.stdout.readline().strip() == "connected"
        assert retained_status(broker.port, "will") == (b"online", True)
        process.kill()  # no DISCONNECT, no "offline" of its own: only the broker's last will can say it
        process.wait(10)
        wait_until(lambda: retained_status(broker.port, "will") == (b"offline", True), 10, "the last will")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        process.stdout.close()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_mqtt_broker_restart_loses_nothing_in_the_buffer_and_counts_the_drops(tmp_path):
    restarted = Broker(tmp_path, persistence=True).start()
    # a durable checker: its session and subscription survive the broker's restart (saved on SIGTERM)
    checker = Subscriber(restarted.port, "restart/#", client_id="checker", durable=True)
    sink = MqttSink(mqtt_config(restarted.port, "restart", buffer=5, client_id="restart-sink"))
    overflow_before = ledger("mqtt", "overflow")
    try:
        before = numbered(3)
        for item in before:
            sink.write(result(item["index"], [item]))
        wait_until(lambda: sink.status()["delivered"] == 3, 10, "delivery before the restart")
        restarted.stop(signal.SIGTERM)
        wait_until(lambda: not sink.connected, 10, "the sink to notice the broker is gone")
        during = numbered(12, start=3)
        started = time.monotonic()
        for item in during:
            sink.write(result(item["index"], [item]))
        assert time.monotonic() - started < 0.5, "write() must not wait for the broker"
        assert sink.status()["dropped"] == {"overflow": 7} and sink.status()["pending"] == 5
        assert ledger("mqtt", "overflow") - overflow_before == 7
        exposition = PrometheusRecorder().exposition().decode()
        assert f'blinkflow_sink_dropped_total{{reason="overflow",sink="mqtt"}} {float(ledger("mqtt", "overflow"))}' \
            in exposition

        restarted.start()
        wait_until(lambda: sink.status()["delivered"] == 3 + 5, 10, "the buffer's delivery after the restart")
        after = numbered(2, start=15)  # delivery goes on as before
        for item in after:
            sink.write(result(item["index"], [item]))
        expected = before + during[-5:] + after  # the 7 oldest of the outage overflowed; nothing else is lost
        topic = f"restart/{STREAM}/events"

        def received() -> list[dict]:
            unique = []  # QoS 1 is at least once: a message in flight at the kill may come twice
            for item in checker.events(topic):
                if item not in unique:
                    unique.append(item)
            return unique

        wait_until(lambda: len(received()) == len(expected), 20, "the checker to get every message")
        assert received() == expected
        wait_until(lambda: sink.status()["delivered"] == 10, 10, "the acknowledgements after the restart")
        assert sink.connects == 2 and sink.status()["pending"] == 0
    finally:
        sink.close()
        checker.close()
        restarted.stop()
    assert sink.status()["dropped"] == {"overflow": 7}


def tls_broker(folder: Path) -> Broker:
    """A broker that takes only TLS (a self-signed certificate for 127.0.0.1) and user cam's password."""
    openssl, passwd = shutil.which("openssl"), shutil.which("mosquitto_passwd")
    if openssl is None or passwd is None:
        pytest.skip("needs openssl and mosquitto_passwd (Debian packages openssl and mosquitto)")
    cert, key, users = folder / "broker.pem", folder / "broker.key", folder / "users"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    subprocess.run([passwd, "-b", "-c", str(users), "cam", "pa55-word"], check=True, capture_output=True, timeout=30)
    return Broker(folder, extra=(f"certfile {cert}", f"keyfile {key}", f"password_file {users}")).start()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_mqtt_over_tls_with_a_password_and_a_wrong_password_refused(tmp_path, caplog):
    secure = tls_broker(tmp_path)
    cert = str(tmp_path / "broker.pem")
    (tmp_path / "good").write_text("pa55-word\n")
    (tmp_path / "bad").write_text("guess\n")

    def prepare(client) -> None:
        client.tls_set(ca_certs=cert)
        client.username_pw_set("cam", "pa55-word")

    subscriber = Subscriber(secure.port, "tls/#", prepare=prepare)
    common = {"host": "127.0.0.1", "port": secure.port, "topic_prefix": "tls", "username": "cam", "ca_file": cert,
              "close_timeout_s": 0.5}
    try:
        good = MqttSink(SinkConfig(type="mqtt", password_file=str(tmp_path / "good"), **common))
        for item in scripted_results():
            good.write(item)
        good.close()
        assert good.status()["delivered"] == len(SCRIPT_EVENTS)
        wait_until(lambda: len(subscriber.payloads(f"tls/{STREAM}/events")) == len(SCRIPT_EVENTS), 5, "the events")
        assert subscriber.events(f"tls/{STREAM}/events") == SCRIPT_EVENTS
        bad = MqttSink(SinkConfig(type="mqtt", password_file=str(tmp_path / "bad"), **common))
        bad.write(result(0, SCRIPT[0]))
        wait_until(lambda: "refused the connection" in caplog.text, 5, "the refusal")
        bad.close()
        assert bad.connects == 0 and bad.status()["dropped"] == {"close": 1}
        assert "guess" not in caplog.text and "pa55-word" not in caplog.text
    finally:
        subscriber.close()
        secure.stop()


# --------------------------------------------------------------------------- a local HTTP endpoint


class Endpoint:
    """An HTTP server on 127.0.0.1 that answers each POST as ``script`` says, then 200.

    Script entries: an HTTP status (500, 400, ...) or ``hang`` (answer 200 after ``hang_s``, too late).
    """

    def __init__(self, script: list, hang_s: float = 1.0) -> None:
        self.script = list(script)
        self.hang_s = hang_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with endpoint.lock:
                    answer = endpoint.script.pop(0) if endpoint.script else 200
                    endpoint.requests.append({"at": time.monotonic(), "headers": dict(self.headers),
                                              "body": json.loads(body), "answer": answer})
                if answer == "hang":
                    time.sleep(endpoint.hang_s)
                    answer = 200
                try:
                    self.send_response(answer)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # after a hang the client has given up and closed the connection

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # close() joins the handlers, a hanging one too
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def black_hole():
    """The URL of a listening socket that never accepts: connections hang until the request's timeout."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        yield f"http://127.0.0.1:{hole.getsockname()[1]}/hook"


def webhook_config(url: str, **settings) -> SinkConfig:
    values = {"type": "webhook", "url": url, "timeout_s": 0.3, "backoff_initial_s": 0.2, "backoff_max_s": 0.4,
              "close_timeout_s": 5.0, **settings}
    return SinkConfig(**values)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_webhook_retries_a_500_and_a_hang_with_backoff_and_sends_the_bearer_token(tmp_path, caplog):
    token = "s3cr3t-token-value"
    (tmp_path / "token").write_text(token + "\n")
    endpoint = Endpoint([500, "hang"], hang_s=1.0)
    sink = WebhookSink(webhook_config(endpoint.url, token_file=str(tmp_path / "token")))
    caplog.set_level(logging.DEBUG)
    try:
        for item in scripted_results():
            sink.write(item)
        wait_until(lambda: sink.status()["delivered"] == len(SCRIPT_EVENTS), 15, "the webhook deliveries")
    finally:
        sink.close()
        endpoint.close()
    requests = endpoint.requests
    assert [r["answer"] for r in requests] == [500, "hang"] + [200] * len(SCRIPT_EVENTS)
    assert [r["body"] for r in requests[2:]] == SCRIPT_EVENTS  # in order, each exactly once after its retries
    first_event = {r["headers"]["X-Blinkflow-Delivery"] for r in requests[:3]}
    assert len(first_event) == 1 and all(r["body"] == SCRIPT_EVENTS[0] for r in requests[:3])  # one event, retried
    assert all(r["headers"]["Authorization"] == f"Bearer {token}" for r in requests)
    assert all(r["headers"]["Content-Type"] == "application/json" for r in requests)
    # backoff: 0.2 s after the 500; after the hang, its 0.3 s timeout and then 0.4 s (doubled, at backoff_max_s)
    first_wait, second_wait = requests[1]["at"] - requests[0]["at"], requests[2]["at"] - requests[1]["at"]
    assert 0.2 <= first_wait < 0.2 + 0.3
    assert 0.3 + 0.4 - 0.05 <= second_wait < 0.3 + 0.4 + 0.4  # the client's clock starts a little earlier
    n = len(SCRIPT_EVENTS)
    assert sink.status() == {"written": n, "delivered": n, "pending": 0, "dropped": {}}
    assert token not in caplog.text and "failed (HTTP 500)" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_webhook_drops_after_its_retries_and_on_a_4xx_and_counts_them(tmp_path):
    endpoint = Endpoint([500, 500, 500, 400])
    sink = WebhookSink(webhook_config(endpoint.url, retries=2, backoff_initial_s=0.05, backoff_max_s=0.05))
    failed_before, rejected_before = ledger("webhook", "failed"), ledger("webhook", "rejected")
    try:
        for item in numbered(3):
            sink.write(result(item["index"], [item]))
        wait_until(lambda: sum(sink.status()["dropped"].values()) + sink.status()["delivered"] == 3, 10, "the fates")
    finally:
        sink.close()
        endpoint.close()
    assert [r["body"]["index"] for r in endpoint.requests] == [0, 0, 0, 1, 2]  # 3 tries of the first event
    assert sink.status()["dropped"] == {"failed": 1, "rejected": 1} and sink.status()["delivered"] == 1
    assert ledger("webhook", "failed") - failed_before == 1 and ledger("webhook", "rejected") - rejected_before == 1


@pytest.mark.timeout(30)
def test_a_dead_webhook_never_blocks_write_counts_overflow_and_reports_at_close(caplog):
    with black_hole() as url:
        sink = WebhookSink(webhook_config(url, buffer=4, timeout_s=0.2, close_timeout_s=0.3))
        overflow_before = ledger("webhook", "overflow")
        sink.write(result(0, numbered(1)))
        wait_until(lambda: sink.status()["pending"] == 1 and not sink._buffer, 5, "the sender to take the first")
        started = time.monotonic()
        for item in numbered(10, start=1):
            sink.write(result(item["index"], [item]))
        assert time.monotonic() - started < 0.1, "write() must return at once"
        assert sink.status()["dropped"] == {"overflow": 6} and sink.status()["pending"] == 5
        assert ledger("webhook", "overflow") - overflow_before == 6
        caplog.set_level(logging.INFO)
        started = time.monotonic()
        sink.close()
        assert time.monotonic() - started < 0.3 + 0.2 + 1.0, "close() is bounded"
    # the one being sent when the time was up may have arrived: counted apart from the 4 never sent
    dropped = {"overflow": 6, "close": 4, "unconfirmed": 1}
    assert sink.status() == {"written": 11, "delivered": 0, "pending": 0, "dropped": dropped}
    closing = [r.getMessage() for r in caplog.records if "not delivered" in r.getMessage()]
    assert len(closing) == 1 and "5 of 11 messages" in closing[0] and "1 were being sent and may have arrived" in closing[0]
    sink.close()  # twice: nothing more happens
    sink.write(result(11, numbered(1, start=11)))  # after close: not sent, but counted
    assert sink.status() == {"written": 12, "delivered": 0, "pending": 0, "dropped": {**dropped, "close": 5}}


@pytest.mark.timeout(30)
def test_a_webhook_url_with_user_info_sends_it_as_basic_auth():
    """urllib sends no user info: "alice:pw@127.0.0.1" went to the name resolver as a host, and nothing arrived."""
    import base64

    endpoint = Endpoint([])
    url = endpoint.url.replace("http://", "http://alice:s%40cret@")
    sink = WebhookSink(webhook_config(url))
    try:
        sink.write(result(0, numbered(1)))
        wait_until(lambda: sink.status()["delivered"] == 1, 10, "the delivery")
    finally:
        sink.close()
        endpoint.close()
    assert endpoint.requests[0]["headers"]["Authorization"] == "Basic " + base64.b64encode(b"alice:s@cret").decode()


@pytest.mark.timeout(30)
def test_a_message_waiting_to_retry_at_close_is_undelivered_not_maybe_arrived(caplog):
    """A refused connection's message, waiting out its backoff, was counted "unconfirmed" ("may have arrived")."""
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused at once
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}/hook"
        sink = WebhookSink(webhook_config(url, backoff_initial_s=5.0, backoff_max_s=5.0, close_timeout_s=0.3))
        sink.write(result(0, numbered(3)))
        wait_until(lambda: sink.attempts >= 1 and not sink._posting, 5, "the first refused attempt")
        sink.close()
    assert sink.status()["dropped"] == {"close": 3}
    assert "may have arrived" not in caplog.text


# --------------------------------------------------------------------------- config and a real pipeline


def sink_data(**sink) -> dict:
    return {"sources": [{"type": "synthetic", "num_frames": 4, "width": 64, "height": 48}], "sinks": [sink]}


@pytest.mark.parametrize("sink, message", [
    ({"type": "mqtt"}, "sinks.0.host: an mqtt sink needs host"),
    ({"type": "mqtt", "host": "h", "topic_prefix": "a/#"}, "sinks.0.topic_prefix: 'a/#' is not a topic prefix"),
    ({"type": "mqtt", "host": "h", "qos": 3}, "sinks.0.qos"),
    ({"type": "mqtt", "host": "h", "username": "u", "password_file": "/nonexistent/pw"},
     "sinks.0.password_file: '/nonexistent/pw' does not exist"),
    ({"type": "mqtt", "host": "h", "hots": 1}, "sinks.0"),
    ({"type": "webhook"}, "sinks.0.url: a webhook sink needs url"),
    ({"type": "webhook", "url": "ftp://example.com/x"}, "sinks.0.url: 'ftp://example.com/x' is not an http:// or https://"),
    ({"type": "webhook", "url": "https://example.com/x", "token_file": "/nonexistent/t"},
     "sinks.0.token_file: '/nonexistent/t' does not exist"),
    ({"type": "webhook", "url": "https://example.com/x", "buffer": 0}, "sinks.0.buffer"),
    ({"type": "webhook", "url": "http://127.0.0.1:80a/hook"}, "fix the URL's port"),  # was retried and dropped per event
    # every POST failed and was retried forever, its text logging the URL's path
    ({"type": "webhook", "url": "https://example.com/T0/xoxbSECRET /x"}, "holds a space or a control character"),
    ({"type": "webhook", "url": "http://alice:pw@hooks.example.com/x"}, "the URL's password would cross the network"),
    ({"type": "mqtt", "host": "mqtt://127.0.0.1"}, "sinks.0.host: 'mqtt://127.0.0.1' is not a host name"),
    # another sink type's setting was accepted and ignored
    ({"type": "mqtt", "host": "h", "retries": 3}, "sinks.0.retries: not a setting of a mqtt sink; its settings:"),
    ({"type": "webhook", "url": "https://example.com/x", "qos": 2}, "sinks.0.qos: not a setting of a webhook sink"),
    ({"type": "jsonl", "path": "/tmp/x.jsonl", "host": "h"}, "sinks.0.host: not a setting of a jsonl sink"),
    # the built-in events sink subclasses jsonl: it has its own list (it accepted anything)
    ({"type": "events", "path": "/tmp/x.jsonl", "host": "h"}, "sinks.0.host: not a setting of a events sink"),
])
def test_push_sink_config_mistakes_are_one_line_naming_the_yaml_path(sink, message):
    with pytest.raises(ConfigError) as caught:
        load_config(data=sink_data(**sink))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_bearer_token_over_plain_http_is_refused_except_to_loopback(tmp_path):
    (tmp_path / "token").write_text("abc\n")
    remote = {"type": "webhook", "url": "http://hooks.example.com/x", "token_file": str(tmp_path / "token")}
    with pytest.raises(ConfigError, match="sinks.0.url: the bearer token would cross the network in clear text"):
        load_config(data=sink_data(**remote))
    local = load_config(data=sink_data(**{**remote, "url": "http://127.0.0.1:9/x", "token_file": "token"}),
                        base_dir=tmp_path)
    assert local.sinks[0].token_file == str(tmp_path / "token")  # found beside the config


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_real_pipeline_publishes_per_frame_records_and_never_stalls_on_a_dead_broker(broker, caplog):
    import blinkflow

    subscriber = Subscriber(broker.port, "run/#")
    source = {"type": "synthetic", "num_frames": 12, "width": 64, "height": 48}
    live = {"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "topic_prefix": "run", "per_frame": True}
    records = list(blinkflow.run({"sources": [source], "sinks": [live]}))
    assert len(records) == 12
    topic = f"run/{records[0]['stream']}/frames"
    wait_until(lambda: len(subscriber.payloads(topic)) == 12, 10, "the frame records")
    published = subscriber.events(topic)
    assert [r["index"] for r in published] == [r["index"] for r in records]
    subscriber.close()

    dead = {**live, "port": free_port(), "buffer": 5, "close_timeout_s": 0.5}
    overflow_before, close_before = ledger("mqtt", "overflow"), ledger("mqtt", "close")
    started = time.monotonic()
    records = list(blinkflow.run({"sources": [source], "sinks": [dead]}))
    assert len(records) == 12 and time.monotonic() - started < 10
    assert ledger("mqtt", "overflow") - overflow_before == 7 and ledger("mqtt", "close") - close_before == 5
    assert len([r for r in caplog.records if "cannot reach" in r.getMessage()]) == 1  # said once, not per attempt
    assert "5 of 12 messages not delivered" in caplog.text


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_events_of_the_scripted_tracking_clip_arrive_over_mqtt_exactly(broker, request):
    """End to end: the track and events stages on the scripted clip of tests/test_tracking_events.py (whose
    test checks those events against the script's truth); the broker must carry exactly those events."""
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink, build_sinks

    from tests import scripted_stage

    tracking = pytest.importorskip("tests.test_tracking_events", reason="needs the track and events stages")
    scripted_stage.register()  # the clip's test-only detector, as tests/test_tracking_events.py registers it
    request.addfinalizer(scripted_stage.unregister)
    cfg = tracking.config(sinks=[{"type": "mqtt", "host": "127.0.0.1", "port": broker.port, "topic_prefix": "clip"}])
    subscriber = Subscriber(broker.port, "clip/#")
    memory, (sink,) = MemorySink(), build_sinks(cfg.sinks)
    LocalRunner(cfg, sinks=[memory, sink]).run()  # closes the sink: everything is delivered by now
    truth = [e for record in memory.records() for e in record.get("events", [])]
    assert {e["type"] for e in truth} >= {"new", "cross_line", "enter_zone", "end"}
    wait_until(lambda: len(subscriber.payloads("clip/cam/events")) >= len(truth), 10, "the clip's events")
    assert subscriber.events("clip/cam/events") == truth
    check_event_schema(truth)
    assert sink.status() == {"written": len(truth), "delivered": len(truth), "pending": 0, "dropped": {}}
    subscriber.close()


def test_a_ca_file_that_is_not_pem_is_one_line_naming_it(tmp_path):
    from blinkflow.errors import SinkError

    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(SinkError, match=r"^mqtt sink: ca_file '.*ca.pem' is not a PEM file of CA certificates"):
        MqttSink(SinkConfig(type="mqtt", host="127.0.0.1", port=free_port(), ca_file=str(tmp_path / "ca.pem")))


def _trickling_server(head: bytes, trickled: int) -> tuple[socket.socket, list[socket.socket]]:
    """A loopback HTTP server that answers every request with ``head`` at once, then ``trickled`` bytes one every
    0.2 s; its socket and the connections it accepted (the test closes them)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    connections = []

    def trickle(conn):
        conn.recv(65536)
        try:
            conn.sendall(head)
            for _ in range(trickled):
                conn.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server, connections


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_webhook_server_that_answers_a_byte_at_a_time_is_cut_at_timeout_s():
    """timeout_s bounded each read only: a server trickling its headers held the one sender forever."""
    from blinkflow.frame import FrameResult, Outcome

    server, connections = _trickling_server(b"HTTP/1.1 503 Busy\r\n", 10**6)  # headers without an end
    sink = WebhookSink(webhook_config(f"http://127.0.0.1:{server.getsockname()[1]}/e", timeout_s=0.5, retries=-1,
                                      backoff_initial_s=0.05, backoff_max_s=0.05, close_timeout_s=1.0))
    try:
        before = {t.ident for t in threading.enumerate()}
        sink.write(FrameResult("cam", 0, 0.0, 8, 8, Outcome.PROCESSED, {"events": [{"type": "enter", "track_id": 1}]}))
        time.sleep(2.5)
        assert len(connections) >= 3  # each attempt ended at its deadline and was retried
        # one watcher for every attempt's deadline, not a timer thread started per POST
        assert [t.name for t in threading.enumerate() if t.ident not in before].count("webhook-deadline") == 1
    finally:
        sink.close()
        server.close()
        for conn in connections:
            conn.close()
    time.sleep(0.2)
    assert not [t for t in threading.enumerate() if t.name == "webhook-deadline"]  # gone with the sink


@pytest.mark.timeout(30)
def test_a_refusing_webhook_is_one_warning_and_the_runs_drops_close_it_with_their_counts(caplog):
    """50 events answered 401 gave 50 warnings, and the last line was an INFO 'delivered 0 of 50' with no count of
    what was lost; the endpoint's path (a Slack-style hook's secret) was in every line."""
    endpoint = Endpoint([401] * 50)
    url = endpoint.url.replace("/hook", "/services/T000/B000/secret-part-of-the-hook")
    sink = WebhookSink(webhook_config(url))
    caplog.set_level(logging.INFO)
    try:
        for item in numbered(50):
            sink.write(result(item["index"], [item]))
        wait_until(lambda: sink.status()["dropped"].get("rejected") == 50, 10, "the refusals")
    finally:
        sink.close()
        endpoint.close()
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert 1 <= len(refused) <= 2
    last = [r for r in caplog.records if "delivered 0 of 50" in r.getMessage()]
    assert len(last) == 1 and last[0].levelno == logging.WARNING and "'rejected': 50" in last[0].getMessage()
    assert "secret-part-of-the-hook" not in caplog.text


@pytest.mark.parametrize("sink", [{"type": "webhook", "url": "https://example.com/x"}, {"type": "mqtt", "host": "h"},
                                  {"type": "events", "path": "/tmp/never-written.events.jsonl"}])
def test_a_sink_of_events_in_a_pipeline_without_them_is_said_at_load(sink, caplog):
    """It sent nothing, and validate said ok."""
    with caplog.at_level(logging.WARNING):
        load_config(data=sink_data(**sink))
    assert any("sinks.0:" in r.getMessage() and "has no stages.events" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config(data=sink_data(**sink, **({"per_frame": True} if sink["type"] == "mqtt" else {})))
    assert any("has no stages.events" in r.getMessage() for r in caplog.records) == (sink["type"] != "mqtt")


def test_a_sink_that_subclasses_a_built_in_one_may_read_any_setting(tmp_path):
    """It inherited the built-in's list of settings: a JsonlSink subclass reading fps was refused."""
    from blinkflow.registry import sinks as sink_registry
    from blinkflow.sinks import JsonlSink

    class Paced(JsonlSink):
        pass

    sink_registry.names()
    sink_registry.register("paced_test")(Paced)
    try:
        cfg = load_config(data=sink_data(type="paced_test", path=str(tmp_path / "x.jsonl"), fps=5.0))
        assert cfg.sinks[0].fps == 5.0
    finally:
        sink_registry._items.pop("paced_test")


def test_a_push_sink_that_never_delivers_exports_zero_delivered_not_no_series(monkeypatch):
    """blinkflow_sink_delivered_total appeared only at the first delivery: a delivered / attempted query on a dead
    webhook read "no data" instead of 0."""
    from blinkflow import metrics
    from blinkflow.sinks import push

    fresh = metrics.SinkLedger()
    monkeypatch.setattr(push, "SINK_LEDGER", fresh)
    with black_hole() as url:
        sink = WebhookSink(webhook_config(url, buffer=4, timeout_s=0.2, close_timeout_s=0.3))
        try:
            assert fresh.snapshot()[0] == {"webhook": 0} and fresh.snapshot()[2] == {"webhook": 0}
            families = {f.name: f for f in metrics._SinkCollector(fresh).collect()}
            assert [(s.labels, s.value) for s in families["blinkflow_sink_delivered"].samples
                    if s.name.endswith("_total")] == [({"sink": "webhook"}, 0.0)]
        finally:
            sink.close()


@pytest.mark.timeout(30)
def test_a_webhook_server_that_trickles_its_body_after_the_headers_is_cut_at_timeout_s():
    """urllib lets go of the connection's socket once the headers are in: a body sent a byte every 0.2 s held the
    sender for its whole length (20 s with timeout_s 1), stalling every later event."""
    server, connections = _trickling_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 100)
    sink = WebhookSink(webhook_config(f"http://127.0.0.1:{server.getsockname()[1]}/e", timeout_s=0.5,
                                      close_timeout_s=1.0))
    try:
        started = time.monotonic()
        sink.write(result(0, numbered(1)))
        wait_until(lambda: sink.status()["pending"] == 0, 10, "the attempt to end")
        assert time.monotonic() - started < 0.5 + 1.0
        assert sink.status()["delivered"] == 1  # the server answered 200: the event is in
    finally:
        sink.close()
        server.close()
        for conn in connections:
            conn.close()
