"""Who may use the control endpoint, and which streams it may open (docs/security.md).

Requests: a bearer token on every mutating route (generated at start unless given), JSON bodies
only, no cross-origin requests, and a ``Host`` header naming this endpoint when it listens on
loopback (a DNS-rebinding page cannot reach it). Streams: network URLs only; local files and
devices only from ``control.allow_local``; no internal address (loopback, private, link-local)
unless ``control.allow_hosts`` names it; settings and FFmpeg options within the configured limits.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from blinkflow.errors import ConfigError

log = logging.getLogger(__name__)

TOKEN_ENV = "BLINKFLOW_CONTROL_TOKEN"
MUTATING = ("POST", "DELETE", "PUT", "PATCH")
NETWORK_SCHEMES = {"rtsp", "rtsps", "http", "https", "udp", "srt", "rtp", "tcp"}
#: schemes whose host is an address to listen on or join, not a server to fetch from
LISTENING_SCHEMES = {"udp", "rtp"}
#: schemes whose URL query string FFmpeg reads as protocol options
OPTION_QUERY_SCHEMES = {"udp", "rtp", "srt", "tcp"}
#: query options that only say how to connect (SRT's mode, key and stream id; listening): no resource to spend
SAFE_QUERY_OPTIONS = {"mode", "passphrase", "pbkeylen", "streamid", "latency", "listen", "localaddr", "localport"}
MB = 1024 * 1024
#: the frame size a memory estimate assumes for a stream without resize (1080p, the common camera size)
UNRESIZED_FRAME = (1920, 1080)
#: stream settings a request may set (the hub's defaults fill the rest)
REQUEST_KEYS = {"url", "id", "type", "resize", "fps", "queue_size", "stall_timeout_s", "open_timeout_s", "max_retries",
                "rtsp_transport", "overflow", "ffmpeg_options", "decode_threads", "backoff_initial_s", "backoff_max_s",
                "backoff_factor", "backoff_jitter", "reconnect_on_eof", "max_frames"}


class Refused(Exception):
    """A request the guard turns down: ``status`` and a one-line reason naming the fix."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class ControlGuard:
    token: str | None
    host: str = "127.0.0.1"
    allowed_origins: list[str] = field(default_factory=list)
    allow_local: list[str] = field(default_factory=list)
    allow_hosts: list[str] = field(default_factory=list)
    allowed_ffmpeg_options: list[str] = field(default_factory=list)
    max_pixels: int = 1920 * 1080
    max_fps: float = 60.0
    max_queue_size: int = 256
    max_memory_mb: int | None = None  # None: no memory budget
    generated: bool = False  # the token was made here: announce() prints it once the endpoint listens

    @classmethod
    def from_config(cls, control: Any) -> "ControlGuard":
        token, generated = _token(control)
        return cls(token=token, generated=generated, host=control.host, allowed_origins=list(control.allowed_origins),
                   allow_local=list(control.allow_local), allow_hosts=list(control.allow_hosts),
                   allowed_ffmpeg_options=list(control.allowed_ffmpeg_options), max_pixels=control.max_pixels,
                   max_fps=control.max_fps, max_queue_size=control.max_queue_size,
                   max_memory_mb=control.max_memory_mb)

    def announce(self) -> None:
        """Print a generated token once, where the operator started the run (stderr), once the endpoint listens
        (printed before, a run that then failed on a busy port showed a token for nothing); set
        control.token_file to choose it."""
        if self.generated and self.token:
            print(f"blinkflow: control endpoint token (send 'Authorization: Bearer <token>'): {self.token}", flush=True,
                  file=sys.stderr)

    # ------------------------------------------------------------------ requests

    def check_request(self, method: str, headers: Any, port: int) -> None:
        """Raise :class:`Refused` unless the request may go on (before its body is read)."""
        self._check_host(headers.get("Host"), port)
        origin = headers.get("Origin")
        if origin is not None and origin not in self.allowed_origins:
            raise Refused(403, f"cross-origin request from {origin!r} refused; list trusted origins in "
                               "control.allowed_origins")
        if method in MUTATING and self.token is not None:
            scheme, _, given = (headers.get("Authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
                raise Refused(401, "missing or wrong token; send 'Authorization: Bearer <token>' (the token "
                                   f"the run printed, control.token_file or ${TOKEN_ENV})")
        if method == "POST" and content_length(headers) > 0:
            kind = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if kind != "application/json":
                raise Refused(415, "the body must be JSON with 'Content-Type: application/json'")

    def _check_host(self, host_header: str | None, port: int) -> None:
        """On loopback, the Host header must name loopback too: another name means a rebinding page."""
        if not is_loopback_name(self.host):
            return
        name = (host_header or "").rsplit(":", 1)[0].strip("[]").lower() if host_header else ""
        if not is_loopback_name(name):
            raise Refused(403, f"Host {host_header!r} is not this endpoint; call it as 127.0.0.1:{port} or "
                               f"localhost:{port}")

    # ------------------------------------------------------------------ streams

    def check_stream(self, request: dict[str, Any]) -> None:
        """Raise :class:`Refused` unless the requested stream and settings are allowed."""
        unknown = sorted(set(request) - REQUEST_KEYS)
        if unknown:
            raise Refused(400, f"unknown stream setting {unknown[0]!r}; allowed: {', '.join(sorted(REQUEST_KEYS))}")
        if not str(request.get("url", "")).strip():  # "" was refused as a local file not allowed (403)
            raise Refused(400, 'the body needs a "url", e.g. {"url": "rtsp://host/path", "id": "cam1"}')
        self._check_url(str(request.get("url", "")))
        self._check_limits(request)
        options = request.get("ffmpeg_options") or {}
        if not isinstance(options, dict):
            raise Refused(400, "ffmpeg_options must be a mapping of option to value")
        refused = sorted(k for k in options if k not in self.allowed_ffmpeg_options)
        if refused:
            raise Refused(403, f"FFmpeg option {refused[0]!r} is not allowed from the control endpoint; allowed: "
                               f"{', '.join(self.allowed_ffmpeg_options) or 'none'} (control.allowed_ffmpeg_options)")

    def check_memory(self, request: dict[str, Any], defaults: dict[str, Any]) -> None:
        """Refuse (503) a stream whose buffer would take the process past ``max_memory_mb``.

        The estimate is what the stream may hold at once: queue_size frames of width x height x 3 bytes
        (its resize, or :data:`UNRESIZED_FRAME` when it keeps the camera's size, unknown until decoded).
        """
        if self.max_memory_mb is None:
            return
        settings = {**defaults, **request}
        width, height = settings.get("resize") or UNRESIZED_FRAME
        queue_size = settings.get("queue_size") or _default_queue_size()
        needed = queue_size * width * height * 3
        resident = resident_bytes()
        if resident + needed > self.max_memory_mb * MB:
            raise Refused(503, f"memory budget control.max_memory_mb ({self.max_memory_mb} MB) would be exceeded: "
                               f"resident {resident / MB:.0f} MB + {needed / MB:.0f} MB for this stream's buffer "
                               f"(queue_size {queue_size} x {width}x{height}x3 bytes); remove a stream, ask for a "
                               "smaller resize or queue_size, or raise the budget")

    def connect_refusal(self, url: str) -> str | None:
        """Why ``url`` may not be connected to now, or None: the POST's check again, right before each
        connection attempt, since a rebinding DNS name may resolve elsewhere by then (docs/security.md)."""
        try:
            self._check_url(url)
        except Refused as refused:
            return str(refused)
        return None

    def _check_url(self, url: str) -> None:
        if any(ord(c) < 0x21 or 0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in url):
            # FFmpeg reads the URL as a C string: past a NUL it connects where this parser never looked; C1 controls
            # and line separators would break log lines and metric labels
            raise Refused(400, "the URL holds a space or a control character; percent-encode it")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError as exc:
            raise Refused(400, f"not a valid URL ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme in ("", "file") or url.startswith("/dev/"):
            path = parts.path if scheme == "file" else url
            # '..' resolved first: fnmatch's '*' matches it (clips/*/../../etc/x would pass a clips/* glob)
            if not any(fnmatch.fnmatch(os.path.normpath(path), pattern) for pattern in self.allow_local):
                raise Refused(403, "local files and devices are not opened from the control endpoint; list them "
                                   "(or a glob) in control.allow_local")
            return
        if scheme not in NETWORK_SCHEMES:
            raise Refused(400, f"scheme {scheme!r} is not a stream; use rtsp://, rtsps://, http(s)://, udp://, srt://")
        self._check_query_options(scheme, url)
        if scheme in LISTENING_SCHEMES or _listens(scheme, url):
            return
        if not parts.hostname:  # FFmpeg looks an empty host up as loopback: http://:8080/ is 127.0.0.1:8080
            raise Refused(400, "the URL names no host; give the camera's address (e.g. rtsp://camera:554/stream)")
        if not self._host_allowed(parts.hostname):
            raise Refused(403, f"{parts.hostname!r} is an internal address; list it in control.allow_hosts to "
                               "stream from it")

    def _check_query_options(self, scheme: str, url: str) -> None:
        """udp, rtp, srt and tcp read their query string as FFmpeg options (fifo_size, buffer_size, localaddr...):
        the same allowlist as ``ffmpeg_options`` (a fifo_size in the URL reserved 2 GB past max_memory_mb). FFmpeg
        takes everything after the first '?', a fragment's too: a '#' there is refused."""
        if scheme not in OPTION_QUERY_SCHEMES:
            return
        if "#" in url:
            raise Refused(400, f"a {scheme}:// URL cannot hold '#': FFmpeg reads options past it; percent-encode it")
        names = sorted({name for name, _ in _ffmpeg_options(url)} - SAFE_QUERY_OPTIONS)
        refused = [name for name in names if name not in self.allowed_ffmpeg_options]
        if refused:
            raise Refused(403, f"the URL's option {refused[0]!r} is an FFmpeg option, not allowed from the control "
                               f"endpoint; allowed: {', '.join([*sorted(SAFE_QUERY_OPTIONS), *self.allowed_ffmpeg_options])} "
                               "(control.allowed_ffmpeg_options)")

    def _host_allowed(self, hostname: str) -> bool:
        if hostname in self.allow_hosts:
            return True
        addresses = resolve(hostname)
        if not addresses:
            return True  # unresolvable: FFmpeg cannot reach it either, and says so in the stream's error
        allowed = [ipaddress.ip_network(a, strict=False) for a in self.allow_hosts if _is_network(a)]
        return all(not internal(a) or any(a in n for n in allowed) for a in addresses)

    def _check_limits(self, request: dict[str, Any]) -> None:
        resize = request.get("resize")
        if resize is not None:
            if not (isinstance(resize, list) and len(resize) == 2 and all(isinstance(v, int) and v > 1 for v in resize)):
                raise Refused(400, "resize must be [width, height] in pixels")
            if resize[0] * resize[1] > self.max_pixels:
                raise Refused(400, f"resize {resize[0]}x{resize[1]} is over control.max_pixels ({self.max_pixels})")
        for key, limit in (("fps", self.max_fps), ("queue_size", self.max_queue_size)):
            value = request.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise Refused(400, f"{key} must be a number, e.g. {int(limit) // 2}; got {value!r}")
            if value is not None and value > limit:
                raise Refused(400, f"{key} {value!r} is over control.max_{key} ({limit})")


def resident_bytes() -> int:
    """This process's resident memory now (Linux: /proc/self/statm; elsewhere its peak, from getrusage)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS says bytes, Linux kilobytes


def _default_queue_size() -> int:
    from blinkflow.config import SourceConfig

    return SourceConfig(type="stream").options.queue_size


def content_length(headers: Any) -> int:
    """The declared body length; a malformed or negative one is refused (400)."""
    text = headers.get("Content-Length")
    if text is None:
        return 0
    if not re.fullmatch(r"[0-9]+", text.strip()):  # str.isdigit() takes '²', which int() refuses
        raise Refused(400, f"Content-Length {text!r} is not a byte count")
    return int(text)


def is_loopback_name(name: str) -> bool:
    if name in ("localhost", ""):
        return name == "localhost"
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def internal(address: ipaddress._BaseAddress) -> bool:
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
            or address.is_unspecified or address.is_multicast)


def resolve(hostname: str) -> list[ipaddress._BaseAddress]:
    try:
        return [ipaddress.ip_address(hostname)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(hostname, None)
    except (OSError, UnicodeError):  # a label over 63 characters fails IDNA encoding
        return []
    return sorted({ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}, key=str)


def _ffmpeg_options(url: str) -> list[tuple[str, str]]:
    """The URL's options as FFmpeg's udp, tcp and srt protocols read them: the pairs after the first '?'."""
    return parse_qsl(url.split("?", 1)[1], keep_blank_values=True) if "?" in url else []


def _listens(scheme: str, url: str) -> bool:
    """An SRT listener (``mode=listener``) or a TCP one (``listen`` or ``listen=N``, N > 0) binds its host rather
    than connecting, as FFmpeg reads them: the first ``mode`` counts (a second one is refused), and ``listen=0``
    connects."""
    options = _ffmpeg_options(url)
    if scheme == "srt":
        modes = [value for name, value in options if name == "mode"]
        return len(modes) == 1 and modes[0] == "listener"
    if scheme == "tcp":
        listen = [value for name, value in options if name == "listen"]
        return len(listen) == 1 and (listen[0] == "" or (listen[0].isdigit() and int(listen[0]) > 0))
    return False


def _is_network(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
        return True
    except ValueError:
        return False


def _not_blank(token: str, where: str) -> str:
    """An empty token would let 'Authorization: Bearer' through: refused at start."""
    if not token:
        raise ConfigError(f"{where} is empty: a blank token would let any request through; put a token there "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))') or unset it")
    return token


def _token(control: Any) -> tuple[str | None, bool]:
    """The token, and whether it was generated here (then printed by :meth:`ControlGuard.announce`)."""
    if control.auth == "none":
        log.warning("control endpoint without authentication (control.auth: none): any local process can add "
                    "streams; use it only on a machine you trust")
        return None, False
    if os.environ.get(TOKEN_ENV):  # set but empty (compose's ${TOKEN} unset): not given, as before
        return _not_blank(os.environ[TOKEN_ENV].strip(), f"${TOKEN_ENV}"), False
    if control.token_file:
        from blinkflow.config import read_token_file

        return _not_blank(read_token_file(control.token_file).strip(),
                          f"control.token_file ({control.token_file})"), False
    return secrets.token_urlsafe(24), True
