"""A small threaded HTTP server bound to one address (the metrics and control endpoints).

Subclasses give a ``section`` (the config section named in errors) and build
their request handler class; this base owns binding, the serving thread and a
clean stop.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)


class HTTPService:
    section = "http"

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
            self._server = ThreadingHTTPServer((self.host, self.requested_port), self.handler_class())
        except OSError as exc:
            raise BlinkflowError(
                f"{self.section}: cannot listen on {self.host}:{self.requested_port} ({exc.strerror or exc}); "
                f"set {self.section}.port to a free port (0 picks one) or {self.section}.enabled=false"
            ) from None
        self._server.daemon_threads = True  # a hung client must not keep the process alive
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
