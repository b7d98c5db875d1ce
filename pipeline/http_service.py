"""A small threaded HTTP server bound to one address (the metrics and control endpoints).

Subclasses give a ``section`` (the config section named in errors) and build
their request handler class; this base owns binding, the serving thread and a
clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)


class _BoundedServer(ThreadingHTTPServer):
    """A threaded server with at most ``max_threads`` requests at once: more are turned away with 503
    right away, so stalled or flooding clients cannot pile up threads."""

    daemon_threads = True  # a hung client must not keep the process alive

    def __init__(self, address: Any, handler: Any, max_threads: int) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_threads)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            with contextlib.suppress(OSError):
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that stalls, resets or sends garbage is its own problem: one log line, no traceback."""
        import sys

        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, (OSError, ValueError)) else logging.WARNING
        log.log(level, "http request from %s failed: %s", client_address[0], error)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HTTPService:
    section = "http"
    #: requests served at once (each on its own thread); more get 503
    max_threads = 16

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1] if self._server else self.requested_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def start(self) -> Any:
        try:
            self._server = _BoundedServer((self.host, self.requested_port), self.handler_class(), self.max_threads)
        except OSError as exc:
            raise BlinkflowError(
                f"{self.section}: cannot listen on {self.host}:{self.requested_port} ({exc.strerror or exc}); "
                f"set {self.section}.port to a free port (0 picks one) or {self.section}.enabled=false"
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"blinkflow-{self.section}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
