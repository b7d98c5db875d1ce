"""Live camera streams: rtsp(s)://, http(s):// (MJPEG, HLS, MPEG-TS), udp://,
srt:// and /dev/videoN (v4l2), each decoded by PyAV in its own thread.

* **Reconnect.** A stream that stalls (no data for ``stall_timeout_s``), drops
  or ends is reopened after an exponential backoff with jitter; after
  ``max_retries`` failed attempts in a row (-1: never) it is given up and ends
  with an error. Frame indices carry on across reconnections, so a reconnected
  stream is the same stream to the runners, sinks and metrics.
* **Bounded latency.** Each stream buffers at most ``queue_size`` decoded
  frames. With ``overflow: drop_oldest`` (live mode) the decoder never waits:
  a new frame pushes the oldest waiting one out, and that frame still travels
  on, pixel-less, with the outcome ``dropped``, so every decoded frame ends
  with exactly one outcome.
* **Run-time changes.** A :class:`StreamHub` holds the live streams of a run.
  Streams can be added and removed while it runs (see ``pipeline/control.py``);
  one stream being down never holds up the others.
* **SRT through a relay.** When PyAV's own FFmpeg cannot open ``srt://`` (the
  wheels have no libsrt), the stream reads through an ``ffmpeg`` child process
  that copies the video track into MPEG-TS on a pipe (:class:`SrtRelay`); the
  relay is part of the connection: stalled, it is killed and restarted with it.
* **Redaction.** Credentials in URLs (``user:password@`` and secret-looking
  query parameters) never reach logs, errors, metrics labels or outputs: only
  :func:`redact_url` forms leave this module.

Hub events (:class:`StreamEvent`) let the CLI forward stream state to the
metrics recorder (``on_stream_event``); reconnections reach it in-band through
``frame.meta["reconnects"]``, which the recorder turns into
``blinkflow_stream_reconnects_total``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import select
import shutil
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlsplit

import numpy as np

from blinkflow.config import MAX_STREAM_ID_CHARS, SourceConfig, setting
from blinkflow.errors import ConfigError, SourceError
from blinkflow.frame import FIRST_INDEX_KEY, Frame, FrameResult, Outcome, on_fps_grid
from blinkflow.hwdecode import open_decoding
from blinkflow.registry import register_source

log = logging.getLogger(__name__)

SCHEMES = ("rtsp", "rtsps", "http", "https", "udp", "srt", "file")
V4L2_DEVICE = re.compile(r"^/dev/video\d+$")
from blinkflow.redact import (  # noqa: E402,F401 - redaction lives in one place; streams use it most
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_key,
    redact_text,
    redact_url,
    remember_secrets,
)
EOF_REASON = "the stream ended"
#: asked with a stream's URL before each connection attempt: the reason it is refused now, or None
ConnectCheck = Callable[[str], str | None]
_ZERO_PIXEL = np.zeros((1, 1, 3), dtype=np.uint8)
#: AVFMT_NOTIMESTAMPS: a demuxer whose format carries no frame times (FFmpeg numbers the frames)
AVFMT_NOTIMESTAMPS = 0x80


# --------------------------------------------------------------------------- URLs and config


@dataclass
class StreamOptions:
    """The own settings of a live stream source (docs/streams.md), written flat beside ``type`` and ``url``."""

    decode_threads: int = setting(0, "PyAV decoder threads; 0 lets FFmpeg choose", lo=0, hi=64)
    queue_size: int = setting(32, "decoded frames buffered ahead of the pipeline", lo=1, hi=4096)
    stall_timeout_s: float = setting(10.0, "a connection that delivers no data for this long is dropped and retried",
                                     lo=0.1, hi=3600)
    open_timeout_s: float = setting(10.0, "give up one connection attempt after this many seconds", lo=0.1, hi=3600)
    max_retries: int = setting(
        -1, "failed reconnection attempts in a row before the stream is given up; -1 retries forever", lo=-1, hi=10**9
    )
    backoff_initial_s: float = setting(0.5, "wait before the first reconnection attempt (at least 0.05 s: a dead "
                                            "camera must not be retried in a busy loop)", lo=0.05, hi=3600)
    backoff_max_s: float = setting(30.0, "longest wait between reconnection attempts", lo=0.05, hi=3600)
    backoff_factor: float = setting(2.0, "each failed attempt multiplies the wait by this", lo=1.0, hi=100)
    backoff_jitter: float = setting(0.2, "random spread of each wait, as a fraction (0.2 = +-20%)", lo=0.0, hi=1.0)
    reconnect_on_eof: bool = setting(
        True, "treat the end of the stream as a drop and reconnect; false ends the stream (finite HTTP or file streams)"
    )
    overflow: Literal["auto", "drop_oldest", "block"] = setting(
        "auto", "when queue_size frames wait, drop the oldest (counted as dropped) or block the decoder; "
        "auto: drop_oldest in live mode, block in archive mode"
    )
    rtsp_transport: Literal["tcp", "udp"] = setting("tcp", "RTSP transport; tcp survives packet loss, udp has less delay")
    hwaccel: Literal["none", "auto", "cuda"] = setting(
        "none", "decode on the GPU (FFmpeg's CUDA decoder, NVDEC) when there is one (auto or cuda); without one the "
        "stream decodes on the CPU, said once and counted")
    ffmpeg_options: dict[str, Any] = setting(
        factory=dict, doc="extra FFmpeg input options, e.g. {input_format: mjpeg, video_size: 640x480} for v4l2"
    )


def stream_kind(url: str) -> str:
    """``rtsp``, ``http``, ``udp``, ``srt``, ``v4l2`` or ``file``; raise ConfigError otherwise."""
    if V4L2_DEVICE.match(url):
        return "v4l2"
    scheme = urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(
            f"{redact_url(url)!r} is not a stream URL; use rtsp://, rtsps://, http(s)://, udp://, srt://, "
            "file: or /dev/videoN"
        )
    return {"rtsps": "rtsp", "https": "http"}.get(scheme, scheme)


def default_stream_id(url: str) -> str:
    """An id without credentials: ``host[:port][/path]`` (``video0`` for /dev/video0)."""
    if V4L2_DEVICE.match(url):
        return Path(url).name
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).stem
    host = parts.hostname or "stream"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError as exc:  # a port that is not a number in 0..65535
        raise ConfigError(f"{redact_url(url)!r}: {exc}; fix the URL's port") from None
    # a DVR's URL may carry its password in the path (…/user=admin_password=…): the id goes into records, file
    # names and MQTT topics, so it takes the path as log lines show it
    path = urlsplit(redact_url(url)).path.strip("/")
    return _fitted_id(f"{host}{port}/{path}" if path else f"{host}{port}")


def _fitted_id(text: str) -> str:
    """``text`` as a stream id a log line and a label can hold: printable, at most MAX_STREAM_ID_CHARS (a long
    one keeps its start and a digest of the whole, so two long URLs still get two ids)."""
    import hashlib

    text = "".join(c if c.isprintable() else "_" for c in text)
    if len(text) <= MAX_STREAM_ID_CHARS:
        return text
    return f"{text[:MAX_STREAM_ID_CHARS - 9]}~{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def stream_id_of(cfg: SourceConfig) -> str:
    """The id a stream source runs under: its own, else one made from its URL."""
    return cfg.id or default_stream_id(cfg.url or "")


def check_live_config(cfg: Any) -> None:
    """Cross-field checks for stream sources and the control section (called by load_config)."""
    for i, source in enumerate(cfg.sources):
        if source.type == "stream":
            check_stream_source(source, f"sources.{i}", cfg.runtime.mode)
    if cfg.control.stream_defaults:
        from blinkflow.config import structure_dataclass

        defaults = {**cfg.control.stream_defaults, "type": "stream", "url": "rtsp://127.0.0.1/defaults"}
        check_stream_source(structure_dataclass(SourceConfig, defaults, "control.stream_defaults"),
                            "control.stream_defaults", cfg.runtime.mode)


def check_stream_source(source: SourceConfig, path: str, mode: str) -> None:
    """Validate the URL and resolve ``overflow: auto`` from the runtime mode."""
    from blinkflow.config import check_stream_id

    check_stream_id(source.id, path)
    try:
        stream_kind(source.url or "")
    except ConfigError as exc:
        raise ConfigError(f"{path}.url: {exc}") from None
    if source.options.backoff_max_s < source.options.backoff_initial_s:
        raise ConfigError(f"{path}.backoff_max_s: {source.options.backoff_max_s} is below backoff_initial_s "
                          f"({source.options.backoff_initial_s}); raise it")
    if source.options.overflow == "auto":
        source.options.overflow = "drop_oldest" if mode == "live" else "block"


def input_spec(cfg: SourceConfig) -> tuple[str, str | None, dict[str, str]]:
    """What to hand ``av.open``: the target, a forced format, and FFmpeg options."""
    url = cfg.url or ""
    kind = stream_kind(url)
    options = {str(k): str(v) for k, v in (cfg.options.ffmpeg_options or {}).items()}
    fmt = None
    if kind == "v4l2":
        fmt = "v4l2"
    elif kind == "rtsp":
        options.setdefault("rtsp_transport", cfg.options.rtsp_transport)
    elif kind == "file":
        url = urlsplit(url).path
    if kind != "file" and "analyzeduration" not in options:
        # FFmpeg probes a live stream for up to 5 s of its time before the first frame, and open_timeout_s cut
        # that probe short: the first read then failed, and a low-fps camera read as "stalled" on every reconnect
        probe_s = min(FFMPEG_ANALYZE_S, cfg.options.open_timeout_s / 2)
        options["analyzeduration"] = str(int(probe_s * 1_000_000))
    return url, fmt, options


#: FFmpeg's own default analyzeduration (seconds of the stream it reads to learn its streams)
FFMPEG_ANALYZE_S = 5.0


# --------------------------------------------------------------------------- backoff


#: doublings (or steps of backoff_factor) after which the reconnection wait no longer grows
MAX_BACKOFF_STEPS = 64


@dataclass
class Backoff:
    """Exponential backoff with jitter: attempt n waits initial * factor**(n-1), capped, +-jitter."""

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_config(cls, cfg: SourceConfig) -> "Backoff":
        options = cfg.options
        return cls(options.backoff_initial_s, options.backoff_max_s, options.backoff_factor, options.backoff_jitter)

    def delay(self, attempt: int) -> float:
        # the wait stops growing at max_s long before 64 doublings; past them factor ** attempt would overflow
        # (2.0 ** 1024 raised after 8.5 hours of a camera offline and killed its decoder thread)
        base = min(self.max_s, self.initial_s * self.factor ** min(max(0, attempt - 1), MAX_BACKOFF_STEPS))
        return max(0.0, base * (1.0 + self.jitter * self.rng.uniform(-1.0, 1.0)))


# --------------------------------------------------------------------------- events


@dataclass
class StreamEvent:
    """Something that happened to a live stream: ``connecting``, ``up``, ``reconnect``,
    ``down`` (with the reason and the retry delay), ``ended`` or ``stopped`` (removed or the run stopped), and
    ``removed`` just before ``stopped`` when the operator removed it."""

    stream: str
    kind: str
    detail: str = ""
    at: float = field(default_factory=time.time)


class RecorderBridge:
    """Forwards a live stream's events to a metrics recorder (``on_stream_event``): up and down come from
    them, not from frames arriving (frames buffered before a drop still arrive after it).

    Reconnections are not forwarded: the recorder counts them from
    ``frame.meta["reconnects"]`` in ``on_decoded``, and forwarding them too
    would count each twice.
    """

    def __init__(self, recorder: Any) -> None:
        self.recorder = recorder

    def __call__(self, event: StreamEvent) -> None:
        if event.kind != "reconnect":
            self.recorder.on_stream_event(event.stream, event.kind, failed=event.kind == "ended" and bool(event.detail))


# --------------------------------------------------------------------------- one stream


class _StreamDown(Exception):
    """The current connection is over; ``permanent`` ones are not retried."""

    def __init__(self, reason: str, permanent: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.permanent = reason, permanent


class LiveStream:
    """One live input: a decoder thread with reconnection feeding a bounded buffer.

    The buffer lives under the hub's condition (``cond``), so the hub can take
    from many streams under one lock and sleep until any of them has something.
    """

    def __init__(self, cfg: SourceConfig, stream_id: str, cond: threading.Condition,
                 emit: Callable[[StreamEvent], None], overflow: str, connect_check: ConnectCheck | None = None,
                 first_index: int = 0) -> None:
        self.cfg, self.id, self.overflow = cfg, stream_id, overflow
        #: the index its first frame gets: a stream added again under its id goes on from where the last ended
        self.first_index = first_index
        self._connect_check = connect_check
        self.url = redact_url(cfg.url or "")
        self.kind = stream_kind(cfg.url or "")
        self._cond, self._emit = cond, emit
        self._frames: deque[Frame] = deque()
        self._dropped: deque[Frame] = deque()
        self._end: Any = None  # the StreamEnd to deliver once the buffers are empty
        self.delivered_end = False
        self._stopping = threading.Event()
        self._backoff = Backoff.from_config(cfg)
        self.state = "new"
        self.decoded = self.dropped = self.reconnects = self.connections = 0
        self.last_error: str | None = None
        self.next_index = first_index
        self._relay: SrtRelay | None = None
        self._t0 = time.monotonic()
        self._last_pts = -1.0
        self.thread = threading.Thread(target=self._run, name=f"stream:{stream_id}", daemon=True)

    # ------------------------------------------------------------------ consumer side (hub lock held)

    def take(self) -> list[Any]:
        """This round's items: every dropped stub (they cost nothing downstream), then one frame or the final
        StreamEnd. One stub a round let a faster camera's stubs queue up behind its frames without bound while
        a slower one's frames took every round (its dropped records seconds late, growing; no frame processed)."""
        items = list(self._dropped)
        self._dropped.clear()
        if self._frames:
            self._cond.notify_all()  # room for a decoder blocked on a full buffer
            items.append(self._frames.popleft())
        elif self._end is not None and not self.delivered_end:
            self.delivered_end = True
            items.append(self._end)
        return items

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id, "url": self.url, "kind": self.kind, "state": self.state,
            "decoded": self.decoded, "dropped": self.dropped, "queued": len(self._frames),
            "reconnects": self.reconnects, "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        self.thread.start()

    @property
    def removed(self) -> bool:
        """Stopped, its reader or buffered frames not done yet."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Stop decoding; frames already buffered are still delivered, then the StreamEnd."""
        self._stopping.set()
        relay = self._relay
        if relay is not None:
            relay.kill()  # its read would notice within a quarter second; this is at once
        with self._cond:
            self._finish_locked(None, "stopped")

    # ------------------------------------------------------------------ decoder thread

    def _run(self) -> None:
        failures = 0
        error: str | None = None
        while not self._stopping.is_set():
            before = self.decoded
            try:
                self._session()
                reason, permanent = EOF_REASON, False
            except _StreamDown as down:
                reason, permanent = down.reason, down.permanent
            except Exception as exc:  # noqa: BLE001 - any decoder failure is this connection's end
                reason, permanent = _describe(exc), False
            if self._stopping.is_set() or self._reached_max_frames():
                break
            self.last_error = reason
            if reason == EOF_REASON and not self.cfg.options.reconnect_on_eof:
                break
            failures = 1 if self.decoded > before else failures + 1
            if permanent or (self.cfg.options.max_retries >= 0 and failures > self.cfg.options.max_retries):
                error = self._give_up_message(reason, failures - 1, permanent)
                break
            delay = self._backoff.delay(failures)
            self._set_state("down", f"{reason}; retrying in {delay:.2f} s")
            log.warning("stream %s (%s): %s; reconnecting in %.2f s", self.id, self.url, reason, delay)
            if self._stopping.wait(delay):
                break
        with self._cond:
            self._finish_locked(error, "ended")

    def _give_up_message(self, reason: str, attempts: int, permanent: bool) -> str:
        if permanent:
            return f"stream {self.id} ({self.url}): {reason}"
        return f"stream {self.id} ({self.url}): gave up after {attempts} reconnection attempts: {reason}"

    def _reached_max_frames(self) -> bool:
        return self.cfg.max_frames is not None and self.next_index - self.first_index >= self.cfg.max_frames

    def _session(self) -> None:
        """One connection: open, decode until it ends; raise _StreamDown on any failure."""
        self._set_state("connecting")
        relay = self._relay = (SrtRelay(self.cfg, self._stopping, guarded=self._connect_check is not None)
                               if self._needs_relay() else None)
        try:
            self._connection(relay)
        finally:
            if relay is not None:
                relay.close()
                self._relay = None

    def _needs_relay(self) -> bool:
        return self.kind == "srt" and not pyav_has_protocol("srt")

    def _connection(self, relay: SrtRelay | None) -> None:
        import av

        container = self._open(relay)
        try:
            if not container.streams.video:
                if relay is not None and relay.failure:  # its data ended on a timeout before any video came
                    raise relay.failure
                raise _StreamDown("the stream has no video track")
            self._on_connected()
            self._decode(container, container.streams.best("video"))  # the main one, as files
        except av.ExitError:
            raise _StreamDown(f"stalled: no data for {self.cfg.options.stall_timeout_s:g} s") from None
        except (av.FFmpegError, OSError) as exc:
            raise _lost(relay, "connection lost", exc) from None
        finally:
            container.close()
        if relay is not None and not self._stopping.is_set() and not self._reached_max_frames():
            raise relay.down("connection lost")  # the relay's pipe ended: say why, from its stderr

    def _open(self, relay: SrtRelay | None) -> Any:
        import av

        self._check_before_connecting()
        target, fmt, options = input_spec(self.cfg)
        timeout: Any = (self.cfg.options.open_timeout_s, self.cfg.options.stall_timeout_s)
        guarded = self._connect_check is not None and self.kind == "http" and relay is None
        if guarded:
            options.update(GUARDED_HTTP_OPTIONS)  # over any ffmpeg_options: the guard checked this URL only
        elif self._connect_check is not None and relay is None:
            # any scheme: FFmpeg takes a URL ending in .m3u8 for an HLS playlist (udp://host:port/a.m3u8, read to
            # its end by a timeout) and fetched its segment URLs, internal ones included, that nobody checked
            options["format_whitelist"] = GUARDED_FORMATS
        if relay is not None:
            target, fmt, options, timeout = relay.start(), "mpegts", dict(RELAY_DEMUX_OPTIONS), None
        opened_at: list[float] = []  # when av.open began: open_decoding may first probe for a CUDA decoder (seconds)

        def open_container(**hw: Any) -> Any:
            opened_at.append(time.monotonic())
            return av.open(target, format=fmt, options=options, timeout=timeout, metadata_errors="ignore", **hw)

        def took_the_timeout() -> bool:
            return relay is None and time.monotonic() - opened_at[-1] >= self.cfg.options.open_timeout_s

        try:
            container = open_decoding(open_container, self.id, self.cfg.options.hwaccel)
        except av.error.ProtocolNotFoundError:
            raise _StreamDown(f"this FFmpeg build cannot open {self.kind}:// URLs; see docs/streams.md", True) from None
        except av.ExitError:
            raise self._no_answer() from None
        except (av.FFmpegError, OSError) as exc:
            # PyAV's open timeout interrupts FFmpeg, and some protocols report that as their own error (RTSP, from
            # a server that accepts the connection and never answers: "InvalidDataError"): a failure once the
            # whole open_timeout_s has passed is the timeout's
            if opened_at and took_the_timeout():
                raise self._no_answer() from None
            raise _lost(relay, "cannot connect" + (GUARDED_HTTP_HINT if guarded else ""), exc) from None
        if took_the_timeout():
            container.close()  # the open timeout cut FFmpeg's probe: the first read would fail as a "stall"
            raise _StreamDown(f"cannot connect: FFmpeg's probe of the stream took the whole open_timeout_s "
                              f"({self.cfg.options.open_timeout_s:g} s); raise open_timeout_s or lower "
                              "ffmpeg_options analyzeduration")
        return container

    def _no_answer(self) -> _StreamDown:
        return _StreamDown(f"cannot connect: no answer within {self.cfg.options.open_timeout_s:g} s")

    def _check_before_connecting(self) -> None:
        """Ask the control guard again before every attempt: a DNS name that passed at POST time may have
        been rebound to an internal address since. A refusal ends the stream (permanent: no retries)."""
        refusal = self._connect_check(self.cfg.url or "") if self._connect_check is not None else None
        if refusal:
            log.error("stream %s (%s): refused before connecting: %s", self.id, self.url, refusal)
            raise _StreamDown(f"refused before connecting: {refusal}", permanent=True)

    def _on_connected(self) -> None:
        if self._stopping.is_set():
            return  # removed while connecting: no reconnect to count, no "up" to show
        self.connections += 1
        if self.connections > 1:
            self.reconnects += 1
            self._emit(StreamEvent(self.id, "reconnect", f"reconnection {self.reconnects}"))
            log.warning("stream %s (%s): reconnected (%d so far)", self.id, self.url, self.reconnects)
        self._set_state("up")

    def _decode(self, container: Any, video: Any) -> None:
        import av

        from blinkflow.frame import av_to_rgb as _to_rgb

        video.thread_type = "SLICE"  # frame threading would add a frame of delay per thread
        if self.cfg.options.decode_threads:
            video.codec_context.thread_count = self.cfg.options.decode_threads
        rate = float(video.average_rate or video.guessed_rate or 25)
        clock = _SessionClock(self, rate, arrival=self._untimed(container))
        last_frame_at = time.monotonic()
        for packet in _packets(container, video):
            if self._stopping.is_set():
                return
            try:
                decoded = packet.decode()
            except av.InvalidDataError:
                decoded = []  # a damaged packet (common right after a reconnect): skip it, keep the connection
            for av_frame in decoded:
                # a stall is data without decoded frames: a frame the fps grid skips counts as decoded, and the
                # wait for room in the buffer (overflow: block, a slow consumer) is not the camera's (both made
                # healthy streams reconnect in a loop; a file: stream then replayed its first frames forever)
                last_frame_at = time.monotonic()
                pts = clock.pts(av_frame)
                if pts is None:
                    continue
                self._offer(self._frame(pts, _to_rgb(av_frame, self.cfg.resize), clock.discontinuous(self.connections)))
                last_frame_at = time.monotonic()
                clock.first = clock.rebased = False
                if self._reached_max_frames():
                    return
            if time.monotonic() - last_frame_at > self.cfg.options.stall_timeout_s:
                raise _StreamDown(f"stalled: data but no decodable frame for {self.cfg.options.stall_timeout_s:g} s")

    def _untimed(self, container: Any) -> bool:
        """Whether FFmpeg invents this connection's frame times. MJPEG over HTTP (mpjpeg), raw mjpeg or h264 and
        image pipes carry none: FFmpeg numbers the frames at a guessed 25 fps whatever the camera sends (a 5 fps
        camera's pts ran 5x slow, and ``fps: 2`` kept 0.4 frames a second). Those streams are timed by arrival
        instead; a file: stream keeps its media time (it is decoded faster than real time)."""
        if self.kind == "file":
            return False
        fmt = container.format  # not "no average_rate": RTSP often has none, and real RTP times
        return bool(fmt.flags & AVFMT_NOTIMESTAMPS) or fmt.name.endswith("_pipe")

    def _frame(self, pts: float, image: np.ndarray, discontinuity: bool) -> Frame:
        meta: dict[str, Any] = {"reconnects": self.reconnects}
        if self.first_index:
            meta[FIRST_INDEX_KEY] = self.first_index  # where the runner's output order starts for this stream
        if discontinuity:
            meta["discontinuity"] = True  # temporal stages see a jump here
        frame = Frame(stream_id=self.id, index=self.next_index, pts=pts, image=image, meta=meta)
        self.next_index += 1
        return frame

    def _offer(self, frame: Frame) -> None:
        """Buffer a frame; when full, block (archive) or push the oldest out as dropped (live)."""
        with self._cond:
            if self.overflow == "block":
                while len(self._frames) >= self.cfg.options.queue_size and not self._stopping.is_set():
                    self._cond.wait(0.1)
            if self._stopping.is_set():
                return  # removed while decoding: this frame never entered the run
            if len(self._frames) >= self.cfg.options.queue_size:
                self._dropped.append(_dropped_stub(self._frames.popleft()))
                self.dropped += 1
            self._frames.append(frame)
            self.decoded += 1
            self._cond.notify_all()

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._cond:
            if self._end is not None:  # stopped or ended: an open that finishes after a DELETE must not revive it
                return
            self.state = state
            self._emit(StreamEvent(self.id, state, detail))

    def _finish_locked(self, error: str | None, kind: str) -> None:
        if self._end is not None:
            return
        from blinkflow.frame import StreamEnd

        self._end = StreamEnd(self.id, error)
        self.state = "failed" if error else kind
        if error:
            self.last_error = error
        self._cond.notify_all()
        # emitted under the hub lock: listeners must be quick and must not call back into the hub
        self._emit(StreamEvent(self.id, kind, error or ""))


class _SessionClock:
    """Turns one connection's frame times into stream pts that keep increasing across reconnections and
    jumps of the source's own clock, and applies the ``fps`` resampling grid."""

    def __init__(self, stream: LiveStream, rate: float, arrival: bool = False) -> None:
        self.stream, self.rate, self.arrival = stream, rate, arrival
        self.first_source: float | None = None
        self.last_source = 0.0
        self.base = 0.0
        self.next_time: float | None = None
        self.first = True
        self.rebased = False  # the source's clock jumped: the next frame kept marks a discontinuity

    def pts(self, av_frame: Any) -> float | None:
        seconds = self._source_time(av_frame)
        stream = self.stream
        if self.first_source is None:
            self.first_source = seconds
            # a new connection goes on from the wall clock (a camera's outage shows as a gap); a file: stream, decoded
            # faster than real time, one frame after its last pts (each later pass was squeezed into microseconds
            # after the first). Only a file: a live source's burst on connecting (HLS, a cached GOP) would carry its
            # lead over the wall clock into every later connection and hide outages
            if stream._last_pts >= 0:
                floor = stream._last_pts + 1.0 / self.rate if getattr(stream, "kind", None) == "file" else 0.0
                self.base = max(time.monotonic() - stream._t0, floor)
        elif self._jumped(seconds):
            self._rebase(seconds)
        self.last_source = seconds
        pts = max(self.base + seconds - self.first_source, stream._last_pts + 1e-6)
        fps = stream.cfg.fps
        if fps is not None:
            keep, self.next_time = on_fps_grid(pts, self.next_time, fps)
            if not keep:
                return None
        stream._last_pts = pts
        return pts

    def discontinuous(self, connections: int) -> bool:
        """Whether the frame just timed follows a jump: a reconnection's first, or the first after a rebase."""
        return (self.first and connections > 1) or self.rebased

    def _source_time(self, av_frame: Any) -> float:
        if self.arrival:
            # FFmpeg's times for this demuxer are a frame counter at a guessed rate (see LiveStream._untimed): the
            # moment the frame arrived is the closest thing to its capture time there is
            return time.monotonic() - self.stream._t0
        if av_frame.time is not None:
            return float(av_frame.time)
        # a frame without a time (an RTSP stream's first) comes a frame after the last
        return 0.0 if self.first_source is None else self.last_source + 1.0 / self.rate

    def _jumped(self, seconds: float) -> bool:
        """The source's clock went back by more than a frame (an encoder restarted faster than stall_timeout_s,
        concatenated MPEG-TS with copyts), or, live, forward by far more than a connection can stay silent (frames
        come within stall_timeout_s of each other). Left alone, back froze every later pts at the last one plus a
        microsecond (``fps`` then kept no frame until the new times passed the old, maybe hours later); forward ran
        pts ahead of the wall clock, which froze them the same way after the next reconnection."""
        step = seconds - self.last_source
        if step < -1.5 / self.rate:
            return True
        return getattr(self.stream, "kind", None) != "file" and step > 2 * self.stream.cfg.options.stall_timeout_s

    def _rebase(self, seconds: float) -> None:
        """Go on one frame after the last pts, from this frame's source time, on a new fps grid."""
        stream = self.stream
        log.warning("stream %s (%s): the source's timestamps jumped %+.3f s within the connection (restarted "
                    "encoder?); its frames go on one frame after the last", stream.id, stream.url,
                    seconds - self.last_source)
        self.first_source, self.base = seconds, max(stream._last_pts, 0.0) + 1.0 / self.rate
        self.next_time = None
        self.rebased = True


# --------------------------------------------------------------------------- SRT through an ffmpeg relay

FFMPEG = "ffmpeg"
# a small probe: the defaults (5 MB, 5 s) hold a live stream's first frame back for seconds
RELAY_PROBE = {"probesize": "32768", "analyzeduration": "500000"}
RELAY_DEMUX_OPTIONS = RELAY_PROBE
_native_protocols: dict[str, bool] = {}
_FFMPEG_PREFIX = re.compile(r"^\[\w+ @ 0x[0-9a-f]+\] ")


def pyav_has_protocol(scheme: str) -> bool:
    """Whether PyAV's FFmpeg can open ``scheme://`` URLs (PyAV lists no protocols, so ask it once)."""
    if scheme not in _native_protocols:
        import av

        try:  # an invalid mode makes a present protocol fail at once, without touching the network
            av.open(f"{scheme}://127.0.0.1:9?mode=blinkflow-probe", timeout=1).close()
            found = True
        except av.error.ProtocolNotFoundError:
            found = False
        except Exception:  # noqa: BLE001 - any other failure means the protocol itself exists
            found = True
        _native_protocols[scheme] = found
    return _native_protocols[scheme]


def relay_command(cfg: SourceConfig, ffmpeg: str, guarded: bool = False) -> list[str]:
    """The ffmpeg command that copies the stream's first video track to MPEG-TS on stdout; ``guarded`` (added from
    the control endpoint): the child opens only camera demuxers, as PyAV's streams do (no playlist's URLs)."""
    options = {**RELAY_PROBE, **{str(k): str(v) for k, v in (cfg.options.ffmpeg_options or {}).items()}}
    if guarded:
        options["format_whitelist"] = GUARDED_FORMATS
    flags = [item for key, value in options.items() for item in (f"-{key}", value)]
    return [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", *flags, "-i", cfg.url or "",
            "-map", "0:v:0", "-c", "copy", "-flush_packets", "1", "-f", "mpegts", "pipe:1"]


class SrtRelay:
    """An ``ffmpeg`` child process reading an srt:// URL, as a file PyAV demuxes.

    :meth:`read` never blocks longer than a quarter second at a time, so the
    open timeout, the stall timeout and a stop request all end the connection
    (the data ends there, and :meth:`down` gives the reason), and :meth:`close`
    kills and reaps the process. Its stderr is kept, redacted, for the reason.
    """

    def __init__(self, cfg: SourceConfig, stopping: threading.Event, guarded: bool = False) -> None:
        self.cfg, self._stopping, self.guarded = cfg, stopping, guarded
        self.proc: subprocess.Popen | None = None
        self.stderr: deque[str] = deque(maxlen=5)
        self.failure: _StreamDown | None = None
        self._got_data = False
        self._last_data = time.monotonic()
        self._stderr_thread: threading.Thread | None = None

    def start(self) -> SrtRelay:
        ffmpeg = shutil.which(FFMPEG)
        if ffmpeg is None:
            raise _StreamDown("PyAV's FFmpeg has no SRT support and the ffmpeg command is missing; install ffmpeg "
                              "with SRT support (Debian: apt-get install ffmpeg)", permanent=True)
        self.proc = subprocess.Popen(relay_command(self.cfg, ffmpeg, self.guarded), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self._last_data = time.monotonic()
        self._stderr_thread = threading.Thread(target=self._keep_stderr, name="srt-relay-stderr", daemon=True)
        self._stderr_thread.start()
        return self

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes; on a timeout or a stop, the reason is kept and the data ends (b""). An exception
        raised here crosses FFmpeg's C read callback, which PyAV reports by printing a multi-line "PyAV library
        exception being dropped" traceback before the stream's one-line error."""
        fd = self.proc.stdout.fileno()
        while self.failure is None:
            if self._stopping.is_set():
                return self._fail(_StreamDown("stopped"))
            limit = self.cfg.options.stall_timeout_s if self._got_data else self.cfg.options.open_timeout_s
            left = self._last_data + limit - time.monotonic()
            if left <= 0:
                return self._fail(_StreamDown(f"stalled: no data for {limit:g} s" if self._got_data
                                              else f"cannot connect: no answer within {limit:g} s"))
            if select.select([fd], [], [], min(0.25, left))[0]:
                data = os.read(fd, size)
                if data:
                    self._got_data, self._last_data = True, time.monotonic()
                return data
        return b""

    def down(self, context: str) -> _StreamDown:
        """Why the connection ended: a timeout noted by :meth:`read`, else ffmpeg's own last words."""
        if self.failure is not None:
            return self.failure
        try:
            self.proc.wait(timeout=1)  # its pipe closed: it is exiting; let it finish its stderr
        except subprocess.TimeoutExpired:
            pass
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=1)
        said = " / ".join(self.stderr) or f"the ffmpeg relay exited with status {self.proc.returncode}"
        if "Protocol not found" in said:
            return _StreamDown("the ffmpeg command has no SRT support either; install ffmpeg with SRT support "
                               "(Debian's ffmpeg package has it)", permanent=True)
        return _StreamDown(f"{context}: ffmpeg relay: {said}")

    def kill(self) -> None:
        """Kill the process (from any thread); :meth:`close`, on the stream's thread, reaps it."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            try:
                proc.kill()
            except OSError:
                pass  # it has just exited

    def close(self) -> None:
        if self.proc is None:
            return
        self.kill()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=2)
        self.proc.stderr.close()

    def _fail(self, down: _StreamDown) -> bytes:
        self.failure = down
        return b""  # the end of the data: the stream reports relay.down(), this reason

    def _keep_stderr(self) -> None:
        for raw in self.proc.stderr:
            line = _FFMPEG_PREFIX.sub("", raw.decode("utf-8", "replace").strip())
            if line:
                self.stderr.append(redact_text(line))


def _packets(container: Any, video: Any) -> Iterator[Any]:
    """``container.demux(video)``, with the end of a finite MJPEG-over-HTTP stream told from damage: FFmpeg's mpjpeg
    demuxer reports the closing boundary, with no part after it, as invalid data (a normal end became a source error,
    exit code 1). Reading on then meets the end of the data; garbage fails again, and twice in a row is raised."""
    import av

    retried = False
    while True:
        try:
            for packet in container.demux(video):
                retried = False
                yield packet
            return
        except av.InvalidDataError:
            if retried or container.format.name != "mpjpeg":
                raise
            retried = True


def _dropped_stub(frame: Frame) -> Frame:
    """The frame without its pixels (a zero-copy black view of the same shape), marked dropped."""
    stub = Frame(stream_id=frame.stream_id, index=frame.index, pts=frame.pts,
                 image=np.broadcast_to(_ZERO_PIXEL, frame.image.shape), meta=frame.meta, decoded_at=frame.decoded_at)
    stub.meta["dropped_by"] = "source"
    stub.outcome = Outcome.DROPPED
    return stub


#: an http(s) stream added from the control endpoint: the guard checked its URL's host, so FFmpeg follows no
#: redirect (to a host nobody checked) and opens no playlist (HLS/DASH fetch segment URLs nobody checked): the
#: demuxers of live camera streams over HTTP only
GUARDED_HTTP_OPTIONS = {"max_redirects": "0",
                        "format_whitelist": "mpjpeg,mjpeg,jpeg_pipe,mpegts,flv,live_flv,mov,matroska,h264,hevc,avi,asf,ogg"}
#: the demuxers any other stream added from the control endpoint may open: camera streams, never a playlist (hls,
#: dash) or a description (sdp) that names further URLs
GUARDED_FORMATS = GUARDED_HTTP_OPTIONS["format_whitelist"] + ",rtsp,rtp,mpegtsraw"
GUARDED_HTTP_HINT = (" (from the control endpoint an http(s) stream follows no redirect and opens no HLS/DASH playlist, "
                     "whose other URLs nobody checked; give the final URL, or add the stream in the config)")


def _lost(relay: SrtRelay | None, context: str, exc: BaseException) -> _StreamDown:
    return relay.down(context) if relay is not None else _StreamDown(f"{context}: {_describe(exc)}")


def _describe(exc: BaseException) -> str:
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return redact_text(f"{type(exc).__name__}: {text}")


# --------------------------------------------------------------------------- the hub


@dataclass
class LatencyStats:
    """Capture-to-sink latency of one stream's processed and reused frames (last 2048 kept)."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=2048))

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        self.recent.append(seconds)

    def as_dict(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        recent = np.array(self.recent)
        return {"count": self.count, "mean_ms": round(1000 * self.total_s / self.count, 2),
                "p50_ms": round(1000 * float(np.percentile(recent, 50)), 2),
                "p95_ms": round(1000 * float(np.percentile(recent, 95)), 2), "max_ms": round(1000 * self.max_s, 2)}


#: ended streams a hub remembers (GET /streams lists them, their metrics stay for alerts); older ones are forgotten
MAX_ENDED = 256
#: ended stream ids whose next frame index is kept for a stream added again under them (the most recent)
MAX_RESUMED = 4096


class StreamHub:
    """The live streams of one run: add and remove them at any time, from any thread.

    The runner consumes :meth:`poll` (non-blocking, one item per stream with
    something ready, in the order the streams were added) between static
    lanes, then :meth:`items` (blocking) once they are done. The hub ends
    when it is closed and its last stream has ended. A hub that is not
    ``keep_open`` is closed as soon as the config's own streams are added
    (no control endpoint: the run ends with its streams).
    """

    def __init__(self, mode: str = "live", defaults: dict[str, Any] | None = None, keep_open: bool = False) -> None:
        self.mode = mode
        self.defaults = dict(defaults or {})
        self.keep_open = keep_open
        self._cond = threading.Condition()
        self._streams: dict[str, LiveStream] = {}
        self._finished: dict[str, dict[str, Any]] = {}
        self._resume_at: dict[str, int] = {}  # per ended stream id, the index a stream added again under it starts at
        self._closed = False
        self._listeners: list[Callable[[StreamEvent], None]] = []
        self.latency: dict[str, LatencyStats] = {}
        self.events: deque[StreamEvent] = deque(maxlen=1000)

    # ------------------------------------------------------------------ changes

    def add(self, cfg: SourceConfig, connect_check: ConnectCheck | None = None) -> LiveStream:
        """Start a stream from a resolved stream source config; raise SourceError if its id is taken.
        ``connect_check`` is asked before every connection attempt (see :data:`ConnectCheck`)."""
        stream_id = stream_id_of(cfg)
        overflow = cfg.options.overflow
        if overflow == "auto":
            overflow = "drop_oldest" if self.mode == "live" else "block"
        install_log_redaction()
        with self._cond:
            if self._closed:
                raise SourceError("the run is stopping; no streams can be added")
            if stream_id in self._streams:
                if self._streams[stream_id].removed:  # another id would number its frames afresh: wait instead
                    raise SourceError(f"stream id {stream_id!r} was removed and is still ending (its reader and "
                                      "buffered frames finish first); add it again in a moment")
                raise SourceError(f"stream id {stream_id!r} is already in use; give the stream another id")
            remember_secrets(cfg.url or "")  # a refused request teaches the scrubber nothing (the set only grows)
            # (stream, index) stays a key across a remove and an add: the frames go on numbering
            stream = LiveStream(cfg, stream_id, self._cond, self._emit, overflow, connect_check,
                                first_index=self._resume_at.get(stream_id, 0))
            self._streams[stream_id] = stream
            self._finished.pop(stream_id, None)
            self.latency[stream_id] = LatencyStats()
        log.info("stream %s: %s added", stream_id, stream.url)
        stream.start()
        return stream

    def add_url(self, url: str, stream_id: str | None = None, connect_check: ConnectCheck | None = None,
                **options: Any) -> LiveStream:
        """Build a stream source from ``url``, the hub's defaults and ``options``; check it; start it."""
        from blinkflow.config import structure_dataclass

        raw = {**self.defaults, **options, "type": "stream", "url": url, "id": stream_id}
        cfg = structure_dataclass(SourceConfig, raw, "stream")
        check_stream_source(cfg, "stream", self.mode)
        return self.add(cfg, connect_check)

    def remove(self, stream_id: str) -> bool:
        """Stop a stream; its buffered frames still go through. False if no such stream."""
        with self._cond:
            stream = self._streams.get(stream_id)
        if stream is None:
            return False
        # said first: until the stop has ended it the id cannot be added again, so no new stream gets this mark
        self._emit(StreamEvent(stream_id, "removed"))  # on purpose: its metrics may go once it has ended
        stream.stop()
        return True

    def forget(self, stream_id: str) -> bool:
        """Drop an ended stream's record (its status, latency and, after REMOVED_SERIES_S, its metrics): DELETE of
        a stream that already ended. False if no such ended stream."""
        with self._cond:
            if self._finished.pop(stream_id, None) is None:
                return False
            self.latency.pop(stream_id, None)
        self._emit(StreamEvent(stream_id, "removed"))
        return True

    def close(self, stop_streams: bool = False) -> None:
        """No more additions; with ``stop_streams``, also stop every stream (a graceful end of the run)."""
        with self._cond:
            self._closed = True
            streams = list(self._streams.values())
            self._cond.notify_all()
        if stop_streams:
            for stream in streams:
                stream.stop()

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, listener: Callable[[StreamEvent], None]) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ consuming

    def poll(self) -> list[Any]:
        """One round: the next item of every stream that has one (never blocks)."""
        with self._cond:
            batch = self._poll_locked()
        self._forget_oldest_ended()
        return batch

    def items(self, tick_s: float | None = None) -> Iterator[Any]:
        """Every item until the hub is closed and empty; waits while all streams are quiet, and with ``tick_s``
        yields a :class:`~blinkflow.frame.Tick` after each ``tick_s`` of that quiet."""
        from blinkflow.frame import Tick

        while True:
            with self._cond:
                batch = self._poll_locked()
                if not batch:
                    if self._closed and not self._streams:
                        return
                    woken = self._cond.wait(0.25 if tick_s is None else tick_s)
                    batch = [] if woken or tick_s is None else [Tick()]
            self._forget_oldest_ended()
            yield from batch

    def _forget_oldest_ended(self) -> None:
        """At most MAX_ENDED ended streams are remembered: ids cycled by a tool grew the records and the metric
        series without end (the oldest go, as if removed)."""
        while len(self._finished) > MAX_ENDED:
            with self._cond:
                oldest = next(iter(self._finished), None)
            if oldest is None or not self.forget(oldest):
                return

    def _poll_locked(self) -> list[Any]:
        batch = []
        for stream_id, stream in list(self._streams.items()):
            items = stream.take()
            if not items:
                continue
            batch.extend(items)
            if stream.delivered_end:
                self._finished[stream_id] = stream.status()
                self._resume_at[stream_id] = stream.next_index
                while len(self._resume_at) > MAX_RESUMED:
                    del self._resume_at[next(iter(self._resume_at))]
                del self._streams[stream_id]
        return batch

    # ------------------------------------------------------------------ observing

    def observe(self, result: FrameResult) -> None:
        """Note a result's capture-to-sink latency (chain this into the runner's on_result)."""
        stats = self.latency.get(result.stream_id)
        if stats is not None and result.outcome in (Outcome.PROCESSED, Outcome.REUSED):
            stats.add(result.latency_s)

    def status(self) -> dict[str, Any]:
        with self._cond:
            live = [s.status() for s in self._streams.values()]
            ended = list(self._finished.values())
        for entry in live + ended:
            stats = self.latency.get(entry["id"])
            entry["latency"] = stats.as_dict() if stats else {"count": 0}
        return {"closed": self._closed, "streams": live, "ended": ended}

    def summary_lines(self) -> list[str]:
        lines = []
        status = self.status()
        for entry in status["streams"] + status["ended"]:
            latency = entry["latency"]
            timing = (f", latency p50 {latency['p50_ms']} ms, p95 {latency['p95_ms']} ms, max {latency['max_ms']} ms"
                      if latency.get("count") else "")
            lines.append(f"  live {entry['id']} ({entry['url']}): {entry['state']}, {entry['decoded']} decoded, "
                         f"{entry['dropped']} dropped at the source, {entry['reconnects']} reconnects{timing}")
        return lines

    def _emit(self, event: StreamEvent) -> None:
        self.events.append(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken listener must not stop a decoder thread
                log.exception("stream event listener failed on %s", event)


# --------------------------------------------------------------------------- registry entry


@register_source("stream")
class StreamSource:
    """A live stream as a lane of its own (``open_sources`` runs streams in a hub instead)."""

    Options = StreamOptions
    #: the common setting that says what to open
    locator = "url"

    #: load_config calls it: stream URLs and the control section's stream defaults
    check_config = staticmethod(check_live_config)

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def streams(self) -> Iterator[Any]:
        from blinkflow.frame import Stream, StreamEnd

        hub = StreamHub()
        live = hub.add(self.cfg)
        hub.close()

        def frames() -> Iterator[Frame]:
            try:
                for item in hub.items():
                    if isinstance(item, StreamEnd):
                        if item.error:
                            raise SourceError(item.error)
                        return
                    yield item
            finally:
                hub.close(stop_streams=True)

        yield Stream(live.id, frames, live.url)
