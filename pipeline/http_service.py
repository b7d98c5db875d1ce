"""A small threaded HTTP server bound to one address (the metrics and control endpoints).

Subclasses give a ``section`` (the config section named in errors) and build
their request handler class; this base owns binding, the serving thread and a
clean stop.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from blinkflow.config import unresolved_host
from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)


#: the longest a connection may take, from accepting it to the last byte of the answer: the socket timeout
#: bounds one read, and a client sending a header byte every few seconds (slowloris) would otherwise hold a
#: slot forever; with every slot held so, the operator's own POST /stop was turned away
REQUEST_DEADLINE_S = 15.0
#: connections one client address may hold at once: a scraper, a probe or an operator needs one or two, and a
#: single host opening idle connections must not take every slot (a scrape, or POST /stop, turned away). At the
#: cap a new connection is still taken: the client's oldest one still sending its request is cut for it (on
#: loopback every local process is one address, and four idle connections locked the operator out)
MAX_PER_CLIENT = 4
#: a connection still sending its request is cut for a newer one only once it has waited this long: a request
#: in flight for milliseconds was cut (its handler then carried it out and answered into a closed socket)
CUT_AFTER_S = 1.0
#: how long a new connection waits for the slot of the one cut for it (its thread ends as soon as its read returns)
SLOT_WAIT_S = 0.5
_BUSY = b'{"error": "busy: too many requests at once; retry in a moment"}\n'


class _BoundedServer(ThreadingHTTPServer):
    """A threaded server with at most ``max_threads`` requests at once: more are turned away with 503
    right away, so stalled or flooding clients cannot pile up threads, and each connection is cut after
    ``REQUEST_DEADLINE_S``, so slow ones cannot hold the slots."""

    daemon_threads = True  # a hung client must not keep the process alive

    def __init__(self, address: Any, handler: Any, max_threads: int, request_deadline_s: float = REQUEST_DEADLINE_S,
                 max_per_client: int = MAX_PER_CLIENT) -> None:
        self.request_deadline_s = request_deadline_s
        self.max_per_client = max_per_client
        self._slots = threading.BoundedSemaphore(max_threads)
        self._deadlines: dict[Any, float] = {}  # open connection -> when it is cut
        self._waiting: dict[Any, tuple[str, float]] = {}  # connections still sending their request -> (client, opened)
        self._per_client: dict[str, int] = {}  # client address -> connections it holds (under _deadlines_lock)
        self._cut: set[Any] = set()  # connections cut for a newer one: their handlers carry nothing out
        self._deadlines_lock = threading.Lock()
        self._closing = threading.Event()  # before binding: a failed bind calls server_close
        super().__init__(address, handler)
        threading.Thread(target=self._cut_late, name="http-deadlines", daemon=True).start()

    def process_request(self, request: Any, client_address: Any) -> None:
        client = client_address[0]
        taken = self._take_client_slot(client)
        if taken is None:
            self._turn_away(request)
            return
        if not self._server_slot(client, cut_own=taken):
            self._give_client_slot(client)
            self._turn_away(request)
            return
        with self._deadlines_lock:
            self._deadlines[request] = time.monotonic() + self.request_deadline_s
            self._waiting[request] = (client_address[0], time.monotonic())
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            self._slots.release()
            self._give_client_slot(client_address[0])
            raise

    def answering(self, request: Any) -> bool:
        """The handler has the whole request and answers: the connection can no longer be cut for a newer one.
        False when it was cut already: the handler must carry nothing out (its client saw the connection drop)."""
        with self._deadlines_lock:
            self._waiting.pop(request, None)
            return request not in self._cut

    def _forget(self, request: Any) -> None:
        with self._deadlines_lock:
            self._deadlines.pop(request, None)
            self._waiting.pop(request, None)
            self._cut.discard(request)

    def _turn_away(self, request: Any) -> None:
        with contextlib.suppress(OSError):
            request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BUSY), _BUSY))
        self.shutdown_request(request)

    def _take_client_slot(self, client: str) -> bool | None:
        """A slot for ``client``: None when refused, else whether one of its own connections was cut for it. At its
        cap, the slot of its oldest connection still sending a request after CUT_AFTER_S (cut now; its thread ends
        and gives the slot back); with none that old, a burst of requests in flight, up to twice the cap."""
        cut = None
        with self._deadlines_lock:
            held = self._per_client.get(client, 0)
            if held >= 2 * self.max_per_client:
                return None
            if held >= self.max_per_client:
                stale = time.monotonic() - CUT_AFTER_S
                cut = self._oldest_waiting(lambda who, opened: who == client and opened <= stale)
            self._per_client[client] = held + 1
        self._shut(cut)
        return cut is not None

    def _server_slot(self, client: str, cut_own: bool) -> bool:
        """One of the server's ``max_threads`` slots. With every one taken: the slot of the connection cut for this
        client (its own oldest), else of the oldest connection of any client still sending its request after
        CUT_AFTER_S, else, for a client holding no other connection, of the oldest one still sending of the client
        holding the most. Clients on a few addresses each (127.0.0.2..., any host with several) held every slot
        under the cap of each, and turned the operator's POST /stop away; reconnecting as soon as they were cut,
        none of theirs was ever a second old."""
        if self._slots.acquire(blocking=False):
            return True
        if not cut_own:
            with self._deadlines_lock:
                stale = time.monotonic() - CUT_AFTER_S
                cut = self._oldest_waiting(lambda who, opened: opened <= stale)
                if cut is None and self._per_client.get(client, 0) == 1:  # a newcomer: the heaviest client gives way
                    counts = {who: self._per_client.get(who, 0) for who, _ in self._waiting.values() if who != client}
                    heaviest = max(counts.values(), default=0)
                    if heaviest > 1:
                        cut = self._oldest_waiting(lambda who, opened: counts.get(who) == heaviest)
            if cut is None:
                return False
            self._shut(cut)
        return self._slots.acquire(timeout=SLOT_WAIT_S)

    def _oldest_waiting(self, chosen: Any) -> Any:
        """The oldest connection still sending its request that ``chosen(client, opened)`` takes, marked cut (the
        lock is held); None when there is none."""
        waiting = [(opened, id(r), r) for r, (who, opened) in self._waiting.items() if chosen(who, opened)]
        if not waiting:
            return None
        cut = min(waiting)[2]
        self._waiting.pop(cut)
        self._cut.add(cut)
        return cut

    @staticmethod
    def _shut(connection: Any) -> None:
        if connection is not None:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def _give_client_slot(self, client: str) -> None:
        with self._deadlines_lock:
            held = self._per_client.get(client, 0) - 1
            if held > 0:
                self._per_client[client] = held
            else:
                self._per_client.pop(client, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that stalls, resets or sends garbage is its own problem: one log line, no traceback."""
        import sys

        error = sys.exc_info()[1]
        level = logging.DEBUG if isinstance(error, (OSError, ValueError)) else logging.WARNING
        log.log(level, "http request from %s failed: %s", client_address[0], error)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            # the slots go back once the answer is written, before the socket is shut: the client's next request
            # came while this one still held its slot, and found the cap reached
            self._forget(request)
            self._slots.release()
            self._give_client_slot(client_address[0])
            self.shutdown_request(request)

    def _cut_late(self) -> None:
        """One thread for every connection's deadline: a late one is shut down, so its blocked read returns
        and its handler thread ends."""
        while not self._closing.wait(min(0.25, self.request_deadline_s / 4)):
            now = time.monotonic()
            with self._deadlines_lock:
                late = [request for request, deadline in self._deadlines.items() if deadline <= now]
            for request in late:
                with contextlib.suppress(OSError):
                    request.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()


class ServiceHandler(BaseHTTPRequestHandler):
    """The services' request handlers. Once a request has fully arrived (its head without a body, its body read
    with :meth:`read_body`, or an answer begun) the server may no longer cut its connection for a newer one of
    the same client (see MAX_PER_CLIENT): a request being handled finishes."""

    def parse_request(self) -> bool:
        whole = super().parse_request()
        if whole and (self.headers.get("Content-Length") or "").strip() in ("", "0"):
            self._arrived()
        return whole

    def read_body(self, length: int) -> bytes:
        body = self.rfile.read(length) if length else b""
        self._arrived()
        return body

    def send_response(self, code: int, message: str | None = None) -> None:
        self._arrived()
        super().send_response(code, message)

    def _arrived(self) -> None:
        answering = getattr(self.server, "answering", None)
        if answering is not None and answering(self.request) is False:
            raise ConnectionAbortedError("cut for a newer connection of the same client; nothing carried out")


class HTTPService:
    section = "http"
    #: requests served at once (each on its own thread); more get 503
    max_threads = 16
    #: a connection is cut this long after it opens (the whole request and answer)
    request_deadline_s = REQUEST_DEADLINE_S

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
            self._server = _BoundedServer((self.host, self.requested_port), self.handler_class(), self.max_threads,
                                          self.request_deadline_s)
        except socket.gaierror as exc:  # an IPv6 literal or a name that does not resolve to IPv4
            raise BlinkflowError(unresolved_host(self.section, self.host, exc.strerror or exc)) from None
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
