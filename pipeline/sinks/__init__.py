"""Outputs: JSON Lines records, an annotated MP4 overlay, and an in-memory sink.

Every file is written under a temporary name in the same folder and renamed
into place when the sink closes, so a crash never leaves a half-written file
under the final name. The record format is documented in
``pipeline/frame-record.schema.json``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from blinkflow.config import SinkConfig
from blinkflow.errors import ConfigError, SinkError
from blinkflow.files import commit as commit_file, safe_name
from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink, sinks as sink_registry

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


class Sink:
    """Receives FrameResults in order per stream; ``close`` commits, ``abort`` discards.

    A new sink is one file in this package: a subclass registered with ``@register_sink("name")``
    (the registry imports every module here), then ``sinks: [{type: name, ...}]`` in a config.
    """

    #: the config must give ``path`` (file sinks)
    needs_path: bool = False
    #: the SinkConfig settings this sink reads (besides ``type``); another's, set, is a config error (None: any)
    settings: frozenset[str] | None = None

    def __init__(self, cfg: SinkConfig) -> None:
        self.cfg = cfg

    def write(self, result: FrameResult) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def abort(self) -> None:
        self.close()


def build_sinks(configs: list[SinkConfig]) -> list[Sink]:
    return [sink_registry.get(cfg.type)(cfg) for cfg in configs]


#: live JSONL: fsync at most this often (every record is flushed to the OS at once)
FSYNC_EVERY_S = 2.0


class AtomicFile:
    """A file written as ``.<name>.partial<suffix>`` and renamed on commit."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.temp = self.path.with_name(f".{self.path.stem}.partial{self.path.suffix}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SinkError(f"{self.path}: cannot create the output folder ({exc.strerror}); choose a writable path") from None

    def commit(self) -> None:
        commit_file(self.temp, self.path)

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- records


def to_record(result: FrameResult, include_dense: bool = False) -> dict[str, Any]:
    """A FrameResult as a JSON-ready dict (see pipeline/frame-record.schema.json)."""
    record: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "stream": result.stream_id,
        "index": result.index,
        "pts": round(float(result.pts), 6),
        "ts": round(float(result.ts), 6),
        "width": result.width,
        "height": result.height,
        "outcome": result.outcome.value,
        "reuse_of": result.reuse_of,
        "error": result.error,
        "latency_ms": round(result.latency_s * 1000.0, 3),
    }
    for stage, value in result.results.items():
        record[stage] = _jsonable(value, include_dense)
    return record


def _jsonable(value: Any, include_dense: bool) -> Any:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(item, np.ndarray) and item.ndim > 1 and not include_dense:
                continue  # dense arrays (flow fields) are large; opt in with include_dense
            out[str(key)] = _jsonable(item, include_dense)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, include_dense) for v in value]
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, np.ndarray):
        return _dense_array(value) if value.ndim > 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _dense_array(array: np.ndarray) -> dict[str, Any]:
    data = base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}


def decode_dense_array(obj: dict[str, Any]) -> np.ndarray:
    """Inverse of the dense encoding used for arrays in JSONL records."""
    raw = base64.b64decode(obj["data"])
    return np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])


def said_whole_at_the_end(sink: Any, cfg: Any, path: str) -> None:
    """``check_pipeline`` of a sink that writes its file once, at the run's end (coco, csv): in a live run it
    holds every result in memory for as long as the cameras run, and a killed run writes nothing."""
    if cfg.runtime.mode == "live":
        log.warning("%s: a %s sink writes its file when the run ends: a live run holds every result until then "
                    "(memory grows with the hours) and a killed one writes nothing; for live streams use jsonl or "
                    "events, written as results come", path, sink.type)


def _open_appending(path: Path) -> Any:
    """``path`` opened to append lines. A file a killed run left ending in part of a record gets its line ended
    first: the next record was glued onto it, and both lines were lost to a JSON reader."""
    handle = path.open("a+b")
    try:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                log.warning("%s: its last line was cut off (an earlier run was killed while writing it); it is left "
                            "as it is and new records start on the next line", path)
                handle.write(b"\n")
    finally:
        handle.close()
    return path.open("a", encoding="utf-8")


@register_sink("jsonl")
class JsonlSink(Sink):
    """One JSON object per frame, one frame per line.

    Archive mode writes the whole file under a temporary name and renames it when the run ends
    (a crash leaves no half file). Live mode (``live``, by default when ``runtime.mode: live``)
    appends to the file itself and flushes every record, so results are visible while a camera
    job runs and nothing written is lost on an error or a signal; it rotates at ``rotate_mb``
    into ``<path>.1``, ``<path>.2``, ... keeping the newest ``keep``.
    """

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"include_dense", "keep", "live", "path", "rotate_mb"})

    needs_path = True  # config checks that a path is given

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.live = bool(cfg.live)
        self.file = AtomicFile(cfg.path)
        self.path = self.file.path
        self.handle = _open_appending(self.path) if self.live else self.file.temp.open("w", encoding="utf-8")
        self.count = 0
        self._synced = time.monotonic()

    def write(self, result: FrameResult) -> None:
        for line in self.lines(result):
            self.handle.write(json.dumps(line, separators=(",", ":")) + "\n")
            self.count += 1
        if self.live:
            self._keep_live()

    def lines(self, result: FrameResult) -> list[dict[str, Any]]:
        """The JSON objects a frame adds to the file: its record."""
        return [to_record(result, self.cfg.include_dense)]

    def _keep_live(self) -> None:
        self.handle.flush()  # readers see every record at once
        if time.monotonic() - self._synced >= FSYNC_EVERY_S:
            os.fsync(self.handle.fileno())
            self._synced = time.monotonic()
        if self.cfg.rotate_mb and self.handle.tell() >= self.cfg.rotate_mb * 1e6:
            self._rotate()

    def _rotate(self) -> None:
        os.fsync(self.handle.fileno())
        self.handle.close()
        keep = self.cfg.keep
        Path(f"{self.path}.{keep}").unlink(missing_ok=True)
        for n in range(keep - 1, 0, -1):
            older = Path(f"{self.path}.{n}")
            if older.exists():
                older.replace(f"{self.path}.{n + 1}")
        self.path.replace(f"{self.path}.1")
        self.handle = self.path.open("a", encoding="utf-8")

    def close(self) -> None:
        if self.handle.closed:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        if not self.live:
            self.file.commit()
        log.info("wrote %d lines to %s", self.count, self.path)

    def abort(self) -> None:
        if self.live:
            self.close()  # live records already written stay: never delete results on an error or a signal
            return
        if not self.handle.closed:
            self.handle.close()
        self.file.discard()


@register_sink("memory")
class MemorySink(Sink):
    """Keeps every FrameResult in a list (for tests and notebooks)."""

    settings: frozenset[str] = frozenset()  # it reads no SinkConfig setting

    def __init__(self, cfg: SinkConfig | None = None) -> None:
        super().__init__(cfg or SinkConfig(type="memory"))
        self.results: list[FrameResult] = []

    def write(self, result: FrameResult) -> None:
        self.results.append(result)

    def records(self) -> list[dict[str, Any]]:
        return [to_record(r) for r in self.results]


# --------------------------------------------------------------------------- mp4 overlay


@register_sink("mp4")
class Mp4OverlaySink(Sink):
    """An H.264 MP4 per stream with detections, masks, a flow inset and the action label drawn.

    The first stream writes to ``path``; any further stream writes to
    ``<stem>-<stream><suffix>`` beside it (or use ``{stream}`` in the path).
    """

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"draw", "fps", "path"})

    needs_path = True  # config checks that a path is given
    #: what ``draw`` may name (blinkflow.sinks.overlay.draw_overlay)
    LAYERS = ("detect", "segment", "flow", "action")

    @classmethod
    def check_config(cls, cfg: SinkConfig, path: str, base_dir: Path) -> None:
        unknown = [layer for layer in cfg.draw or [] if layer not in cls.LAYERS]
        if unknown:  # a typo drew nothing, silently
            raise ConfigError(f"{path}.draw: {unknown[0]!r} is not a layer; layers: {', '.join(cls.LAYERS)}")
        import string

        try:  # a path's {date} or {0} failed with a traceback once the first frame came
            fields = [name for _, name, _, _ in string.Formatter().parse(cfg.path or "") if name is not None]
        except ValueError as exc:
            raise ConfigError(f"{path}.path: {cfg.path!r} is not a path template ({exc}); write '{{{{' for a brace") from None
        if any(name != "stream" for name in fields):
            raise ConfigError(f"{path}.path: {cfg.path!r} names {{{next(n for n in fields if n != 'stream')}}}; the only "
                              "placeholder is {stream}")

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.writers: dict[str, _StreamVideoWriter] = {}
        self._paths: set[Path] = set()

    def _path_for(self, stream_id: str) -> Path:
        safe = safe_name(stream_id, "stream")
        path = self._named(safe)
        # 'cam 1' and 'cam/1' are both cam_1, and another mp4 sink may make the same name (v.mp4's second stream
        # and v-{stream}.mp4 are both v-s2.mp4): the second gets a name of its own
        if path in self._paths or path.resolve() in _MP4_PATHS_IN_USE:
            path = self._named(f"{safe}-{hashlib.sha256(stream_id.encode()).hexdigest()[:6]}")
            if path.resolve() in _MP4_PATHS_IN_USE:
                path = self._named(f"{safe}-{hashlib.sha256(f'{id(self)}{stream_id}'.encode()).hexdigest()[:6]}")
            log.warning("mp4 sink: %s is another stream's; stream %s is written to %s", self._named(safe), stream_id,
                        path)
        self._paths.add(path)
        _MP4_PATHS_IN_USE.add(path.resolve())
        return path

    def _named(self, safe: str) -> Path:
        if "{stream}" in self.cfg.path:
            return Path(self.cfg.path.format(stream=safe))
        path = Path(self.cfg.path)
        return path if not self.writers else path.with_name(f"{path.stem}-{safe}{path.suffix}")

    def write(self, result: FrameResult) -> None:
        writer = self.writers.get(result.stream_id)
        if writer is None:
            writer = self.writers[result.stream_id] = _StreamVideoWriter(self._path_for(result.stream_id), self.cfg.fps)
        from blinkflow.sinks.overlay import draw_overlay

        writer.write(draw_overlay(result, self.cfg.draw), result.pts)

    def close(self) -> None:
        try:
            for writer in self.writers.values():
                writer.close()
        finally:
            self._release_paths()

    def abort(self) -> None:
        try:
            for writer in self.writers.values():
                writer.abort()
        finally:
            self._release_paths()

    def _release_paths(self) -> None:
        _MP4_PATHS_IN_USE.difference_update(path.resolve() for path in self._paths)


#: the files the mp4 sinks of this process are writing (two sinks of a run must not write one file)
_MP4_PATHS_IN_USE: set[Path] = set()

#: the overlay's timestamps: MPEG's 90 kHz clock (a source over 1000 fps keeps its times)
OVERLAY_TIME_BASE = Fraction(1, 90_000)


class _StreamVideoWriter:
    """Encodes frames of one stream at their own times (a variable frame rate stays one: a 4 s clip with gaps
    was a 0.8 s overlay), or, with the sink's ``fps``, at that constant rate (a time-lapse). A frame without a
    usable time comes one interval after the previous; one at or before it, one tick after it."""

    def __init__(self, path: Path, fps: float | None) -> None:
        self.file = AtomicFile(path)
        self.fps = fps
        self.pending: list[tuple[np.ndarray, float]] = []
        self.container = None
        self.stream = None
        self.count = 0
        self.first_pts: float | None = None
        self.last_ticks: int | None = None
        self.sizes_said: set[tuple[int, int]] = set()  # frame sizes other than the video's, said once each

    def write(self, image: np.ndarray, pts: float) -> None:
        if self.container is not None:
            self._encode(image, pts)
            return
        self.pending.append((image, pts))
        if self.fps is None and len(self.pending) < 2:
            return  # wait for a second frame to measure the rate
        self._flush_pending()

    def _flush_pending(self) -> None:
        self._open(self.pending[0][0])
        for pending_image, pending_pts in self.pending:
            self._encode(pending_image, pending_pts)
        self.pending.clear()

    def _open(self, image: np.ndarray) -> None:
        import av

        fps = self.fps or self._measured_fps()
        # fragmented, a fragment every 2 s on disk at once: a killed run (the OOM killer, docker kill) leaves a
        # partial file that plays to its last fragment; a plain MP4 was unreadable without its closing index
        self.container = av.open(str(self.file.temp), mode="w", format="mp4",
                                 options={"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"})
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        self.stream.codec_context.gop_size = max(1, min(250, round(2 * fps)))
        # no B-frames: a fragmented file has no edit list to take their delay off, so every time came late
        self.stream.codec_context.max_b_frames = 0
        height, width = image.shape[:2]
        self.stream.width, self.stream.height = width + width % 2, height + height % 2
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "23", "preset": "veryfast"}
        self.stream.codec_context.time_base = OVERLAY_TIME_BASE
        self.interval = max(1, round(OVERLAY_TIME_BASE.denominator / fps))  # in ticks

    def _measured_fps(self) -> float:
        if len(self.pending) >= 2:
            delta = self.pending[1][1] - self.pending[0][1]
            if delta > 1e-4:
                return min(240.0, 1.0 / delta)
        return 25.0

    def _encode(self, image: np.ndarray, pts: float) -> None:
        import av

        height, width = self.stream.height, self.stream.width
        if image.shape[0] != height or image.shape[1] != width:
            if _resized(image, height, width) and image.shape[:2] not in self.sizes_said:
                self.sizes_said.add(image.shape[:2])
                log.warning("%s: the stream's frames are now %dx%d; they are scaled into the video's %dx%d",
                            self.file.path, image.shape[1], image.shape[0], width, height)
            image = _fit(image, height, width)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = self._ticks(pts), OVERLAY_TIME_BASE
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.count += 1

    def _ticks(self, pts: float) -> int:
        """The frame's time since the stream's first frame, in OVERLAY_TIME_BASE ticks."""
        if self.fps is not None:  # a constant rate asked for
            ticks = self.count * self.interval
        else:
            usable = pts is not None and math.isfinite(pts)
            if usable and self.first_pts is None:
                self.first_pts = pts
            ticks = round((pts - self.first_pts) * OVERLAY_TIME_BASE.denominator) if usable and self.first_pts is not None else None
            if ticks is None:
                ticks = 0 if self.last_ticks is None else self.last_ticks + self.interval
            elif self.last_ticks is not None and ticks <= self.last_ticks:
                ticks = self.last_ticks + 1  # a repeated time: one tick on, so the frames after keep theirs
        self.last_ticks = ticks
        return ticks

    def close(self) -> None:
        if self.container is None and self.pending:
            self._flush_pending()
        if self.container is None:
            return
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()
        self.container = None
        self.file.commit()
        log.info("wrote %d frames to %s", self.count, self.file.path)

    def abort(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
        self.file.discard()


def _resized(image: np.ndarray, height: int, width: int) -> bool:
    """Whether ``image`` is of another size than the video's, beyond the pixel yuv420p pads odd sizes by."""
    return not (height - 1 <= image.shape[0] <= height and width - 1 <= image.shape[1] <= width)


def _fit(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """The image in the video's size: padded by the pixel yuv420p needs, or, when the stream changed size,
    scaled whole into it (letterboxed; cropping kept a corner of a larger frame)."""
    if _resized(image, height, width):
        from PIL import Image

        scale = min(height / image.shape[0], width / image.shape[1])
        size = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))
        image = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.BILINEAR))
    out = np.zeros((height, width, 3), dtype=np.uint8)
    h, w = min(height, image.shape[0]), min(width, image.shape[1])
    top, left = (height - h) // 2, (width - w) // 2
    out[top:top + h, left:left + w] = image[:h, :w]
    return out
