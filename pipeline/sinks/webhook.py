"""``type: webhook``: every event POSTed as JSON to a URL, one event per request (docs/push-sinks.md).

One event per request keeps retries exact: a failed request repeats that event alone, and its
``X-Blinkflow-Delivery`` header (the same on every attempt) lets the receiver drop a repeat.
Transient failures (no connection, a timeout, 408, 425, 429, 5xx) are retried with a doubling
backoff; other answers (4xx, and redirects, which are not followed: they could carry the token
elsewhere) drop the event as ``rejected``. Delivery is at least once, in order.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from blinkflow.config import SinkConfig, resolve_path
from blinkflow.errors import ConfigError
from blinkflow.redact import redact_text, redact_url, remember_secrets
from blinkflow.registry import register_sink
from blinkflow.sinks.push import DROP_LOG_EVERY_S, Message, PushSink, backoff_s
from blinkflow.version import __version__

log = logging.getLogger(__name__)

#: answers worth another try; any other error status means the request itself is refused
TRANSIENT_STATUS = {408, 425, 429}


class _Connections:
    """The connections of the attempt in flight, and one watcher thread that cuts them when the attempt's
    deadline passes, wherever it waits (a thread of its own per attempt was a thread per POST)."""

    def __init__(self) -> None:
        self._open: list[Any] = []
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self._watcher: threading.Thread | None = None

    def made(self, connection: Any) -> Any:
        """``connection``, its socket kept here once connected: urllib lets go of the connection's socket as the
        headers arrive, so a watch on the connection missed a body sent a byte at a time (an attempt of 20 s with
        timeout_s 1); the socket stays readable by the response until it is shut."""
        connect = connection.connect

        def connect_and_keep() -> None:
            connect()
            with self._cond:
                self._open = [s for s in self._open if s.fileno() != -1] + [connection.sock]

        connection.connect = connect_and_keep
        return connection

    def arm(self, seconds: float) -> None:
        """The attempt starting now is cut ``seconds`` from now unless :meth:`disarm` comes first."""
        with self._cond:
            self._deadline = time.monotonic() + seconds
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="webhook-deadline", daemon=True)
                self._watcher.start()
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _watch(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._deadline is None or self._deadline > time.monotonic()):
                    self._cond.wait(None if self._deadline is None else self._deadline - time.monotonic())
                if self._closed:
                    return
                self._deadline = None
                sockets = list(self._open)
            _shut(sockets)


def _shut(sockets: list[Any]) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class _TrackedHTTP(urllib.request.HTTPHandler):
    def __init__(self, connections: _Connections) -> None:
        super().__init__()
        self.connections = connections

    def http_open(self, req: Any) -> Any:
        return self.do_open(lambda *a, **kw: self.connections.made(http.client.HTTPConnection(*a, **kw)), req)


class _TrackedHTTPS(urllib.request.HTTPSHandler):
    def __init__(self, connections: _Connections) -> None:
        super().__init__()
        self.connections = connections

    def https_open(self, req: Any) -> Any:
        extra = {"check_hostname": self._check_hostname} if getattr(self, "_check_hostname", None) is not None else {}
        return self.do_open(lambda *a, **kw: self.connections.made(http.client.HTTPSConnection(*a, **kw)), req,
                            context=self._context, **extra)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx then surfaces as an HTTPError


@register_sink("webhook")
class WebhookSink(PushSink):
    """POSTs each event to ``url`` from a bounded buffer; see the module docstring."""

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"backoff_initial_s", "backoff_max_s", "buffer", "buffer_mb", "close_timeout_s",
                          "max_message_kb", "retries", "timeout_s", "token_file", "url"})

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        remember_secrets(cfg.url)  # a password or token in the URL itself never reaches a log line
        self.headers = {"Content-Type": "application/json", "User-Agent": f"blinkflow/{__version__}"}
        # urllib sends no user info: it took "user:pass@host" for the host's name and never delivered
        self.url, basic = _without_user_info(cfg.url)
        if basic:
            self.headers["Authorization"] = f"Basic {basic}"
        if cfg.token_file:
            self.headers["Authorization"] = f"Bearer {read_token(cfg.token_file)}"
        self._posting = False  # a request is on the wire
        self._may_have_arrived = False  # the last attempt's request may have reached the server (it timed out)
        self._connections = _Connections()
        self.opener = urllib.request.build_opener(_NoRedirect(), _TrackedHTTP(self._connections),
                                                  _TrackedHTTPS(self._connections))
        self.attempts = 0
        self._failing = False
        self._rejections_logged_at = float("-inf")
        self._rejections_unlogged = 0
        self._start()

    @staticmethod
    def check_config(cfg: SinkConfig, path: str, base_dir: Path) -> None:
        if not cfg.url:
            raise ConfigError(f"{path}.url: a webhook sink needs url: the endpoint, e.g. https://hooks.example.com/events")
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{path}.url: {redact_url(cfg.url)!r} is not an http:// or https:// URL; "
                              "give one like https://hooks.example.com/events")
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError as exc:  # found at run time, each event was retried and dropped
            raise ConfigError(f"{path}.url: {redact_url(cfg.url)!r}: {exc}; fix the URL's port") from None
        if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in cfg.url):  # every POST failed, retried forever
            raise ConfigError(f"{path}.url: {redact_url(cfg.url)!r} holds a space or a control character; "
                              "percent-encode it (a space is %20)")
        if parts.username is not None and cfg.token_file:
            raise ConfigError(f"{path}.url: user:password@ and token_file are two credentials; keep one")
        if parts.username is not None and parts.scheme == "http" and not _is_loopback(parts.hostname):
            raise ConfigError(f"{path}.url: the URL's password would cross the network in clear text over http; "
                              "use https (plain http only to a loopback host)")
        if cfg.token_file:
            found = resolve_path(cfg.token_file, base_dir)
            if not found.is_file():
                raise ConfigError(f"{path}.token_file: {cfg.token_file!r} does not exist; write the bearer token there")
            if not found.read_text(encoding="utf-8").strip():
                raise ConfigError(f"{path}.token_file: {cfg.token_file!r} is empty; write the bearer token there")
            if parts.scheme == "http" and not _is_loopback(parts.hostname):
                raise ConfigError(f"{path}.url: the bearer token would cross the network in clear text over http; "
                                  "use https (plain http only to a loopback host)")
            cfg.token_file = str(found)

    def where(self) -> str:
        """The endpoint without its path: Slack- and Discord-style hooks carry the secret in the path."""
        parts = urlsplit(redact_url(self.cfg.url))
        return f"{parts.scheme}://{parts.netloc}/…" if parts.path.strip("/") or parts.query else f"{parts.scheme}://{parts.netloc}"

    def _serve(self) -> None:
        while (message := self._take()) is not None:
            self._deliver(message)

    def _deliver(self, message: Message) -> None:
        failures = 0
        while True:
            verdict = self._post(message)
            if verdict == "ok":
                self._delivered()
                return
            if verdict == "rejected":
                self._dropped("rejected")
                return
            failures += 1
            if 0 <= self.cfg.retries < failures:
                self._dropped("failed")
                return
            if self._wait(backoff_s(self.cfg, failures)):
                return  # close() gave up; it counts this message as undelivered

    def _post(self, message: Message) -> str:
        """One attempt: 'ok', 'retry' (worth another try) or 'rejected'."""
        request = urllib.request.Request(self.url, data=message.payload, method="POST",
                                         headers={**self.headers, "X-Blinkflow-Delivery": message.id})
        with self._cond:
            if self._stopped:
                return "retry"  # close() gave up before this attempt: the message never left
            self._posting = True
        self.attempts += 1
        # timeout_s bounds each read; a server that answers a byte at a time would never trip it, so the
        # whole attempt is cut at the same limit
        self._connections.arm(self.cfg.timeout_s)
        try:
            with self.opener.open(request, timeout=self.cfg.timeout_s) as response:
                response.read(1 << 16)
        except urllib.error.HTTPError as exc:
            self._may_have_arrived = False  # answered: refused, or failed on the server's side
            exc.close()
            transient = exc.code in TRANSIENT_STATUS or exc.code >= 500
            self._note_failure(f"HTTP {exc.code}", transient)
            return "retry" if transient else "rejected"
        except http.client.InvalidURL:  # the same on every try; its text holds the URL's path (a hook's secret)
            self._note_failure("the URL is not valid", False)
            return "rejected"
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, timed out, a bad answer
            # refused or unresolved: the request never left; cut or timed out: the server may have it
            unsent = isinstance(getattr(exc, "reason", exc), (ConnectionRefusedError, socket.gaierror))
            self._may_have_arrived = not unsent
            reason = str(getattr(exc, "reason", exc)) or type(exc).__name__
            self._note_failure(redact_text(" ".join(reason.split())[:200]), True)  # a server's text: one line
            return "retry"
        finally:
            self._connections.disarm()
            self._posting = False
        if self._failing:
            log.info("webhook sink: %s answers again", self.where())
            self._failing = False
        return "ok"

    def _finish(self) -> None:
        self._connections.close()

    def _unsent_in_hand(self) -> int:
        # waiting out a backoff after a refused connection or an error answer: not delivered for certain
        return 0 if self._posting or self._may_have_arrived else self._in_hand

    def _note_failure(self, reason: str, transient: bool) -> None:
        if not transient:  # at most one line every DROP_LOG_EVERY_S: a refusing endpoint refuses every event
            self._rejections_unlogged += 1
            now = time.monotonic()
            if now - self._rejections_logged_at >= DROP_LOG_EVERY_S:
                log.warning("webhook sink: %s refused %d event(s) (%s); they are dropped", self.where(),
                            self._rejections_unlogged, reason)
                self._rejections_logged_at, self._rejections_unlogged = now, 0
        elif not self._failing:  # once per outage, not per attempt
            log.warning("webhook sink: %s failed (%s); retrying with backoff up to %gs, buffering up to %d events",
                        self.where(), reason, self.cfg.backoff_max_s, self.cfg.buffer)
            self._failing = True


def _without_user_info(url: str) -> tuple[str, str | None]:
    """``url`` without ``user:password@``, and those as a Basic credential (base64), when it has them."""
    import base64
    from urllib.parse import unquote, urlunsplit

    parts = urlsplit(url)
    if parts.username is None:
        return url, None
    host = parts.netloc.rsplit("@", 1)[1]
    credential = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
    return urlunsplit(parts._replace(netloc=host)), base64.b64encode(credential).decode("ascii")


def read_token(path: str) -> str:
    return Path(path).expanduser().read_text(encoding="utf-8").strip()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
