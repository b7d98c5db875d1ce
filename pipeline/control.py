"""A small HTTP control endpoint for live streams, beside the metrics exporter.

Routes (JSON in and out)::

    GET    /streams          every stream: state, counts, reconnects, latency (URLs redacted)
    POST   /streams          {"url": "rtsp://...", "id": "cam1", ...any stream source key} -> 201
    DELETE /streams/<id>     stop one stream; its buffered frames still go through -> 200
    POST   /stop             end the run gracefully: stop every stream, drain, commit the sinks -> 202
    GET    /healthz          200 while the endpoint serves

Every request passes :class:`blinkflow.control_guard.ControlGuard` first (a bearer token on
mutating routes, JSON only, no cross-origin or rebinding requests; streams from network URLs
within the configured limits): see docs/security.md. Clients that stall are dropped after
``READ_TIMEOUT_S``. :func:`live_session` wires a run together: the hub, this endpoint, the
metrics bridge and graceful SIGINT/SIGTERM handling.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlsplit

from blinkflow.control_guard import ControlGuard, Refused, content_length
from blinkflow.errors import ConfigError, Interrupted, SourceError
from blinkflow.http_service import HTTPService, ServiceHandler
from blinkflow.redact import redact_obj
from blinkflow.streams import RecorderBridge, StreamHub, redact_text

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
#: a client that sends nothing for this long is dropped
READ_TIMEOUT_S = 10.0


class ControlServer(HTTPService):
    """Serves the routes above for one :class:`StreamHub` in a daemon thread."""

    section = "control"

    def __init__(self, hub: StreamHub, host: str = "127.0.0.1", port: int = 9465, guard: ControlGuard | None = None,
                 on_stop: Callable[[], None] | None = None) -> None:
        super().__init__(host, port)
        self.hub = hub
        self.guard = guard if guard is not None else ControlGuard(token=None, host=host)
        self.on_stop = on_stop  # POST /stop, after the hub closes (the session bounds the drain)

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self.hub, self.guard, lambda: self.port, self.on_stop)

    def start(self) -> "ControlServer":
        super().start()
        log.warning("stream control endpoint on %s/streams", self.url)
        return self

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def handle(hub: StreamHub, method: str, path: str, body: bytes, guard: ControlGuard | None = None,
           on_stop: Callable[[], None] | None = None) -> tuple[int, dict[str, Any]]:
    """One request, without HTTP: (status, JSON reply). Kept apart so it is easy to test and to mount elsewhere."""
    path = path.split("?", 1)[0].rstrip("/") or "/"
    if method == "GET" and path == "/streams":
        return 200, hub.status()
    if method == "GET" and path == "/healthz":
        return 200, {"ok": True}
    if method == "POST" and path == "/streams":
        return _add(hub, body, guard)
    if method == "DELETE" and path.startswith("/streams/"):
        stream_id = unquote(path[len("/streams/"):])
        if hub.remove(stream_id) or hub.forget(stream_id):  # a live stream stopped, or an ended one's record dropped
            return 200, {"id": stream_id, "removed": True}
        return 404, {"error": f"no live stream {stream_id!r}; GET /streams lists them"}
    if method == "POST" and path == "/stop":
        hub.close(stop_streams=True)
        if on_stop is not None:
            on_stop()
        return 202, {"stopping": True}
    return 404, {"error": "unknown route; use GET/POST /streams, DELETE /streams/<id>, POST /stop"}


def _add(hub: StreamHub, body: bytes, guard: ControlGuard | None) -> tuple[int, dict[str, Any]]:
    try:
        request = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError):
        return 400, {"error": 'the body must be JSON, e.g. {"url": "rtsp://host/path", "id": "cam1"}'}
    if not isinstance(request, dict) or not isinstance(request.get("url"), str):
        return 400, {"error": 'the body needs a "url" string, e.g. {"url": "rtsp://host/path", "id": "cam1"}'}
    if guard is not None:
        try:
            guard.check_stream(request)
            guard.check_memory(request, hub.defaults)
        except Refused as refused:
            return refused.status, {"error": redact_text(str(refused))}
    options = {k: v for k, v in request.items() if k not in ("url", "id", "type")}
    try:
        check = guard.connect_refusal if guard is not None else None
        stream = hub.add_url(_as_url(request["url"]), request.get("id"), connect_check=check, **options)
    except ConfigError as exc:
        return 400, {"error": redact_text(str(exc))}
    except SourceError as exc:
        status = 503 if "stopping" in str(exc) else 409
        return status, {"error": redact_text(str(exc))}
    return 201, {"id": stream.id, "url": stream.url}


def _as_url(url: str) -> str:
    """A local path (the guard let it through: control.allow_local lists it) as the file: URL a stream opens; the
    stream source refused the bare path after the guard had accepted it."""
    if urlsplit(url).scheme or url.startswith("/dev/"):
        return url
    return f"file:{url}"


def _handler_for(hub: StreamHub, guard: ControlGuard, port: Any, on_stop: Callable[[], None] | None = None
                 ) -> type[BaseHTTPRequestHandler]:
    class Handler(ServiceHandler):
        timeout = READ_TIMEOUT_S  # the socket's: a client that stalls mid-request is dropped

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._answer("POST")

        def do_DELETE(self) -> None:  # noqa: N802
            self._answer("DELETE")

        def do_PUT(self) -> None:  # noqa: N802 - other methods get the route list in JSON, like a wrong route
            self._answer("PUT")

        do_PATCH = do_OPTIONS = do_PUT  # noqa: N815

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own errors (a malformed request line, a header too long) as JSON, like every reply."""
            body = (json.dumps({"error": redact_text(message or explain or f"HTTP {code}")}) + "\n").encode()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                    self.wfile.write(body)

        def _answer(self, method: str) -> None:
            try:
                status, reply = self._checked(method)
            except (TimeoutError, ConnectionError):
                self.close_connection = True  # a stalled or vanished client: nothing to answer
                return
            body = (json.dumps(redact_obj(reply), indent=1) + "\n").encode()  # every reply, scrubbed in one place
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _checked(self, method: str) -> tuple[int, dict[str, Any]]:
            try:
                guard.check_request(method, self.headers, port())
                length = content_length(self.headers)
                if length > MAX_BODY:
                    raise Refused(413, f"the body is over {MAX_BODY} bytes")
            except Refused as refused:
                self.close_connection = True  # the body, if any, is left unread
                return refused.status, {"error": str(refused)}
            return handle(hub, method, self.path, self.read_body(length), guard, on_stop)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            if log.isEnabledFor(logging.DEBUG):  # scrubbing a request line nobody reads cost every request
                log.debug("control http: %s", redact_text(format % args))

    return Handler


# --------------------------------------------------------------------------- a live run


@contextlib.contextmanager
def live_session(cfg: Any, recorder: Any = None) -> Iterator[StreamHub | None]:
    """The hub for a run that has stream sources or a control endpoint (None otherwise).

    Streams report up/down to ``recorder``; the control endpoint serves while
    the block runs; the first SIGINT/SIGTERM ends the run gracefully (streams
    stop, buffered frames finish, sinks commit) and a second one interrupts.
    """
    has_streams = any(source.type == "stream" for source in cfg.sources)
    if not has_streams and not cfg.control.enabled:
        yield None
        return
    hub = StreamHub(mode=cfg.runtime.mode, defaults=cfg.control.stream_defaults, keep_open=cfg.control.enabled)
    if recorder is not None:
        hub.subscribe(RecorderBridge(recorder))
    guard = ControlGuard.from_config(cfg.control) if cfg.control.enabled else None
    signals = GracefulSignals(lambda: hub.close(stop_streams=True),
                              "stopping: the streams end, buffered frames finish (signal again to abort)",
                              cfg.runtime.drain_timeout_s)
    # POST /stop's drain is bounded like a signal's: a stuck stage held the process forever
    server = (ControlServer(hub, cfg.control.host, cfg.control.port, guard,
                            on_stop=lambda: signals.stop_requested("POST /stop")).start()
              if guard is not None else None)
    if guard is not None:
        guard.announce()
    signals.install()
    try:
        yield hub
    finally:
        signals.restore()
        hub.close(stop_streams=True)
        if server is not None:
            server.stop()


class GracefulSignals:
    """The first SIGINT/SIGTERM asks the run to end gracefully (``stop``), a second aborts (:class:`Interrupted`).

    Used by live sessions (``stop`` closes the hub) and file runs (``stop`` ends the file lanes).
    ``received`` is the first signal's number, or None. Only the main thread can own signal
    handlers; elsewhere install() does nothing.
    """

    def __init__(self, stop: Callable[[], None], message: str, timeout_s: float | None = None) -> None:
        self.stop, self.message, self.timeout_s = stop, message, timeout_s
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._deadline: threading.Timer | None = None

    def install(self) -> GracefulSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            for sig in self._previous:
                signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.received is not None:
            raise Interrupted(signum)
        self.received = signum
        log.warning("%s: %s", signal.Signals(signum).name, self.message)
        # in a thread: the interrupted code may hold the locks that stop() takes
        threading.Thread(target=self.stop, name="blinkflow-stop", daemon=True).start()
        self._arm_deadline(signum, signal.Signals(signum).name)

    def stop_requested(self, what: str) -> None:
        """A stop asked another way (POST /stop, which stopped the run itself): its drain is bounded as a
        SIGTERM's is, and a signal after it aborts. Only with the handlers installed (they do the aborting)."""
        if self.received is not None or not self._previous:
            return
        self.received = signal.SIGTERM
        log.warning("%s: %s", what, self.message)
        self._arm_deadline(signal.SIGTERM, what)

    def _arm_deadline(self, signum: int, what: str) -> None:
        if self.timeout_s is not None:  # a stuck stage or source must not hold the process forever
            self._deadline = threading.Timer(self.timeout_s, self._drain_too_long, args=(signum, what))
            self._deadline.daemon = True
            self._deadline.start()

    def _drain_too_long(self, signum: int, what: str) -> None:
        log.error("still draining %g s after %s (runtime.drain_timeout_s); aborting", self.timeout_s, what)
        # a real signal to the main thread (it also wakes a blocking call there); our handler runs again and,
        # the first signal being received already, aborts
        signal.pthread_kill(threading.main_thread().ident, signum)
