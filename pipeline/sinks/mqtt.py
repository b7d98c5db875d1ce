"""``type: mqtt``: events published to an MQTT broker with paho-mqtt (docs/push-sinks.md).

Topics: ``<topic_prefix>/<stream>/events`` (one message per event), ``<topic_prefix>/<stream>/frames``
(every frame's record, with ``per_frame``) and ``<topic_prefix>/status``: ``online`` (retained) on
every connect, ``offline`` (retained) on a clean close and, as the last will, when the connection
dies. A message counts as delivered when the broker acknowledges it (PUBACK at QoS 1). While the
broker is away messages wait in the sink's buffer; those already handed to the client are resent
after the reconnect (QoS 1: at least once).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from blinkflow.config import SinkConfig, resolve_path
from blinkflow.errors import ConfigError, SinkError
from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks.push import Message, PushSink, event_messages, frame_message

log = logging.getLogger(__name__)

#: messages handed to the client and not yet acknowledged, at most (they are resent after a reconnect)
WINDOW = 32
#: a connection the broker closes sooner than this after the connect counts as refused (said once a series)
SHORT_CONNECTION_S = 5.0


def topic_part(stream: str) -> str:
    """A stream id as one topic level: '/' would add levels, '+' and '#' are wildcards. An id that had to change
    gets a digest of itself, so that "lobby/1", "lobby+1" and "lobby_1" stay three topics."""
    import hashlib

    level = "".join("_" if c in "/+#\x00" else c for c in stream)
    if level == stream and stream:
        return stream
    return f"{level or '_'}~{hashlib.sha256(stream.encode()).hexdigest()[:8]}"


@register_sink("mqtt")
class MqttSink(PushSink):
    """Publishes events (and optionally frame records) from a bounded buffer; see the module docstring."""

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"backoff_initial_s", "backoff_max_s", "buffer", "buffer_mb", "ca_file", "client_id",
                          "close_timeout_s", "host", "include_dense", "max_message_kb", "password_file", "per_frame",
                          "port", "qos", "timeout_s", "tls", "topic_prefix", "username"})

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.status_topic = f"{cfg.topic_prefix}/status"
        self.port = cfg.port or (8883 if cfg.tls or cfg.ca_file else 1883)
        self.connected = False
        self.connects = 0
        self.refusals = 0  # failed or refused connection attempts in a row (only the first is a warning)
        self.short_connections = 0  # connections in a row the broker closed within SHORT_CONNECTION_S
        self._connected_at = 0.0
        self._unacked: dict[int, Message] = {}
        self._early_acks: set[int] = set()  # acknowledged before publish() returned their mid
        self._status_mids: set[int] = set()
        self._client = self._make_client()
        self._client.connect_async(cfg.host, self.port, keepalive=max(5, int(6 * cfg.timeout_s)))
        self._client.loop_start()
        self._start()

    @staticmethod
    def check_config(cfg: SinkConfig, path: str, base_dir: Path) -> None:
        if not cfg.host:
            raise ConfigError(f"{path}.host: an mqtt sink needs host: the broker's host name, e.g. host: localhost")
        if "://" in cfg.host or any(c in cfg.host for c in "/ @"):
            raise ConfigError(f"{path}.host: {cfg.host!r} is not a host name; give the broker's name or address alone "
                              "(e.g. host: broker.example, with port: and tls: for the rest)")
        prefix = cfg.topic_prefix
        if not prefix or any(c in prefix for c in "+#\x00") or prefix.startswith("/") or prefix.endswith("/"):
            raise ConfigError(f"{path}.topic_prefix: {prefix!r} is not a topic prefix; use levels without wildcards "
                              "(+, #) or outer slashes, e.g. blinkflow or site1/blinkflow")
        if cfg.password_file and not cfg.username:
            raise ConfigError(f"{path}.password_file: a password needs a username; add username: <name>")
        for name in ("password_file", "ca_file"):
            value = getattr(cfg, name)
            if value:
                found = resolve_path(value, base_dir)
                if not found.is_file():
                    raise ConfigError(f"{path}.{name}: {value!r} does not exist; give an existing file")
                setattr(cfg, name, str(found))

    def _make_client(self) -> Any:
        import paho.mqtt.client as mqtt

        cfg = self.cfg
        client_id = cfg.client_id or f"blinkflow-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        client.will_set(self.status_topic, "offline", qos=1, retain=True)
        if cfg.username:
            password = Path(cfg.password_file).read_text(encoding="utf-8").strip() if cfg.password_file else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls or cfg.ca_file:
            try:
                client.tls_set(ca_certs=cfg.ca_file)
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise SinkError(f"mqtt sink: ca_file {cfg.ca_file!r} is not a PEM file of CA certificates ({exc})") from None
        client.connect_timeout = cfg.timeout_s
        client.reconnect_delay_set(min_delay=cfg.backoff_initial_s, max_delay=cfg.backoff_max_s)
        client.max_inflight_messages_set(WINDOW)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        return client

    def where(self) -> str:
        return f"mqtt://{self.cfg.host}:{self.port}"

    def messages(self, result: FrameResult) -> list[Message]:
        found = event_messages(result)
        if self.cfg.per_frame:
            found.append(frame_message(result, self.cfg.include_dense))
        return found

    # ------------------------------------------------------------------ paho's network thread

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:  # paho tries again after the backoff; say it once per series of refusals
            log.log(logging.DEBUG if self.refusals else logging.WARNING, "mqtt sink: %s refused the connection (%s); "
                    "retrying", self.where(), reason_code)
            self.refusals += 1
            return
        info = client.publish(self.status_topic, "online", qos=1, retain=True)
        self.refusals = 0
        with self._cond:
            self._status_mids.add(info.mid)  # its PUBACK comes later on this same thread
            self.connected = True
            self.connects += 1
            self._connected_at = time.monotonic()
            self._cond.notify_all()
        log.info("mqtt sink: connected to %s (connection %d)", self.where(), self.connects)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        log.log(logging.DEBUG if self.refusals else logging.WARNING, "mqtt sink: cannot reach %s; retrying (every %gs "
                "at most), buffering up to %d messages", self.where(), self.cfg.backoff_max_s, self.cfg.buffer)
        self.refusals += 1

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            was_connected, self.connected = self.connected, False
            closing = self._closing
            # QoS 0 messages not yet written are gone with the connection (written ones got _on_publish already)
            lost = 0 if self.cfg.qos else len(self._unacked)
            if lost:
                self._unacked.clear()
        if lost:
            self._dropped("failed", lost)
        if was_connected and not closing:
            self._say_lost(reason_code)

    def _say_lost(self, reason_code: Any) -> None:
        """A lost connection, said once a series: a broker that closes each connection at once (a message over
        its size limit, resent on every reconnect) logged it five times a second."""
        short = time.monotonic() - self._connected_at < SHORT_CONNECTION_S
        self.short_connections = self.short_connections + 1 if short else 0
        if self.short_connections <= 1:
            log.warning("mqtt sink: lost %s (%s); buffering up to %d messages and reconnecting", self.where(),
                        reason_code, self.cfg.buffer)
        elif self.short_connections == 3:
            log.warning("mqtt sink: %s closed the connection right after each of the last 3 connects (%s): a "
                        "message over the broker's size limit? messages over max_message_kb %g are dropped; lower "
                        "it to the broker's limit", self.where(), reason_code, self.cfg.max_message_kb)
        else:
            log.debug("mqtt sink: lost %s again (%s)", self.where(), reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            if mid in self._status_mids:
                self._status_mids.discard(mid)
                return
            message = self._unacked.pop(mid, None)
            if message is None:
                self._early_acks.add(mid)
                return
        self._delivered()

    # ------------------------------------------------------------------ the sender thread

    def _serve(self) -> None:
        import paho.mqtt.client as mqtt

        # NO_CONN at QoS 1 and 2: paho keeps the message and sends it after the reconnect; at QoS 0 it is gone
        accepted = (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN) if self.cfg.qos else (mqtt.MQTT_ERR_SUCCESS,)
        ready = lambda: self.connected and len(self._unacked) < WINDOW
        while (message := self._take(ready)) is not None:
            topic = f"{self.cfg.topic_prefix}/{topic_part(message.stream)}/{message.kind}"
            # never under self._cond: paho calls _on_publish holding its own lock, which publish() takes too
            info = self._client.publish(topic, message.payload, qos=self.cfg.qos)
            if info.rc not in accepted:
                log.warning("mqtt sink: could not publish on %s (%s)", topic, mqtt.error_string(info.rc))
                self._dropped("failed")
                continue
            with self._cond:
                acked = info.mid in self._early_acks
                if acked:
                    self._early_acks.discard(info.mid)
                else:
                    self._unacked[info.mid] = message
            if acked:
                self._delivered()

    def _finish(self) -> None:
        """Say ``offline`` (retained) while still connected, then disconnect cleanly (no last will)."""
        if self.connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=max(1.0, min(self.cfg.timeout_s, 5.0)))
            except (RuntimeError, ValueError):
                pass  # the connection went meanwhile; the broker then sends the last will, also offline
        self._client.disconnect()
        self._client.loop_stop()
