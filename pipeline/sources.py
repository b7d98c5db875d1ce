"""Video inputs: files (PyAV), directories and globs of files, and synthetic scenes.

A source config opens into a *lane*: an iterator of :class:`Stream` objects,
taken one after another (a directory decodes file after file, so a folder of a
thousand videos never holds a thousand decoders). Several source entries run
side by side: :func:`merge_lanes` interleaves their frames round-robin,
deterministically.

Each file is decoded in a background thread into a bounded queue, so decoding
overlaps with the model stages while memory stays bounded.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import logging
import math
import queue
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from blinkflow.config import SourceConfig, setting
from blinkflow.errors import ConfigError, SourceError, TruncatedVideoError
from blinkflow.files import VIDEO_SUFFIXES, left_out
from blinkflow.frame import EndReason, Frame, Stream, StreamEnd, fps_jitter, fps_restart_back, on_fps_grid, quarter_turns, av_to_rgb as _to_rgb  # noqa: F401 - re-exported
from blinkflow.gate.motion import VECTORS_KEY, decoder_vectors
from blinkflow.hwdecode import check_hwaccel, open_decoding
from blinkflow.registry import register_source, sources as source_registry
from blinkflow.schema import shown

log = logging.getLogger(__name__)

#: the word a truncation message starts its reason with (the typed mark is EndReason.TRUNCATED)
TRUNCATED = "truncated"


# --------------------------------------------------------------------------- lanes


def open_lane(cfg: SourceConfig) -> Iterator[Stream]:
    """Streams of one source entry, in order."""
    return source_registry.get(cfg.type)(cfg).streams()


def lane_items(streams: Iterator[Stream], stop: threading.Event | None = None) -> Iterator[Frame | StreamEnd]:
    """Frames of each stream in turn, each stream closed by a StreamEnd.

    A stream that fails to open or breaks mid-way ends with an error; its
    frames decoded so far have been delivered, and the lane goes on with the
    next stream. Once ``stop`` is set no further frame is taken: the open
    stream ends STOPPED (its decoder stops) and no other stream is opened.
    """
    for stream in streams:
        if stop is not None and stop.is_set():
            return
        error, reason = None, EndReason.COMPLETE
        try:
            reason = yield from _until_stopped(stream.frames(), stop)
        except SourceError as exc:
            error = str(exc)
            reason = EndReason.TRUNCATED if isinstance(exc, TruncatedVideoError) else EndReason.ERROR
            log.error("%s", error)
        yield StreamEnd(stream.id, error, reason)


def _until_stopped(frames: Iterator[Frame], stop: threading.Event | None) -> Iterator[Frame]:
    """Yield ``frames`` until ``stop`` is set; return the EndReason (closing ``frames`` stops its decoder)."""
    if stop is None:
        yield from frames
        return EndReason.COMPLETE
    try:
        for frame in frames:
            yield frame
            if stop.is_set():
                return EndReason.STOPPED
    finally:
        close = getattr(frames, "close", None)
        if close is not None:
            close()
    return EndReason.COMPLETE


def merge_lanes(lanes: list[Iterator[Stream]], hub: Any = None, stop: threading.Event | None = None,
                tick_s: float | None = None) -> Iterator[Frame | StreamEnd]:
    """Interleave lanes round-robin: one item from each live lane in turn.

    With a :class:`pipeline.streams.StreamHub`, whatever its live streams have
    ready is taken after each lane's item (never waiting on them), and once the
    lanes are done the hub's items follow until it ends (with ``Tick`` items
    while its streams are quiet, given ``tick_s``). Without one, the order
    is fully deterministic.
    """
    iterators = [lane_items(lane, stop) for lane in lanes]
    while iterators:
        for iterator in list(iterators):
            item = next(iterator, None)
            if item is None:
                iterators.remove(iterator)
            else:
                yield item
            if hub is not None:
                yield from hub.poll()
    if hub is not None:
        yield from hub.items(tick_s)


def open_sources(configs: list[SourceConfig], hub: Any = None, stop: threading.Event | None = None,
                 tick_s: float | None = None) -> Iterator[Frame | StreamEnd]:
    """Frames of every source. ``stream`` sources run in ``hub`` (one is made when none is given;
    a given hub may also get streams added and removed while the run goes on). Setting ``stop``
    ends the file lanes after the frame in hand (a graceful stop; the hub has its own close).
    ``tick_s``: once the file lanes are done, a ``Tick`` after each ``tick_s`` the live streams stay quiet."""
    check_stream_ids(configs)
    live = [cfg for cfg in configs if cfg.type == "stream"]
    lanes = [open_lane(cfg) for cfg in configs if cfg.type != "stream"]
    if not live and hub is None:
        return merge_lanes(lanes, stop=stop)
    from blinkflow.streams import StreamHub

    hub = hub if hub is not None else StreamHub()
    try:
        for cfg in live if not hub.closed else []:  # closed already: the run was stopped during setup
            hub.add(cfg)
    except BaseException:
        hub.close(stop_streams=True)
        raise
    if not hub.keep_open:
        hub.close()
    return _stopping_hub_on_exit(merge_lanes(lanes, hub, stop, tick_s), hub)


def check_stream_ids(configs: list[SourceConfig]) -> None:
    """Two inputs under one stream id would share its gate state, caches, tracks and output order (files named
    alike in two folders: both ``clip``); refuse them before anything decodes. Listing a source's streams
    opens nothing."""
    from blinkflow.streams import stream_id_of

    seen: dict[str, int] = {}
    for number, cfg in enumerate(configs):
        try:
            ids = {stream_id_of(cfg)} if cfg.type == "stream" else {stream.id for stream in open_lane(cfg)}
        except SourceError:
            continue  # an empty folder and the like: said when its lane runs
        for stream_id in sorted(ids):
            if stream_id in seen:
                raise ConfigError(f"sources.{number}: its stream id {stream_id!r} is also one of sources.{seen[stream_id]}'s; "
                                  "give the sources distinct ids (sources.N.id)")
            seen[stream_id] = number


def _stopping_hub_on_exit(items: Iterator[Frame | StreamEnd], hub: Any) -> Iterator[Frame | StreamEnd]:
    try:
        yield from items
    finally:  # normally a no-op; after an error it stops the decoder threads
        hub.close(stop_streams=True)


# --------------------------------------------------------------------------- files


@dataclass
class FileOptions:
    """The own settings of file, dir and glob sources (written flat beside ``type`` and ``path``)."""

    decode_threads: int = setting(0, "PyAV decoder threads; 0 lets FFmpeg choose", lo=0, hi=64)
    queue_size: int = setting(32, "decoded frames buffered ahead of the pipeline", lo=1, hi=4096)
    motion_vectors: bool | None = setting(
        None, "export the decoder's motion vectors (FFmpeg flags2=+export_mvs) for the gate's motion-compensated "
        "reuse (gate.motion: mvs or auto) and the segmenter's feature reuse; null: on when either uses them"
    )
    hwaccel: Literal["none", "auto", "cuda"] = setting(
        "none", "decode on the GPU (FFmpeg's CUDA decoder, NVDEC): cuda always, auto when there is one and no motion "
        "vectors are wanted; without one it decodes on the CPU, said once and counted")

    def check(self, path: str) -> None:
        check_hwaccel(path, self.hwaccel, self.motion_vectors is True)  # null is settled by the config's check


@register_source("file")
class FileSource:
    """A single video file."""

    Options = FileOptions
    #: the common setting that says what to open
    locator = "path"

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def streams(self) -> Iterator[Stream]:
        path = Path(self.cfg.path)
        yield file_stream(path, self.cfg.id or path.stem, self.cfg)


@register_source("dir")
class DirectorySource:
    """Every video file under a directory (recursively), in sorted order."""

    Options = FileOptions
    locator = "path"

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def files(self) -> list[Path]:
        root = Path(self.cfg.path)
        files = [p for p in root.rglob("*") if p.is_file()]
        if said := left_out(root, files):
            log.warning("%s", said)
        return sorted(p for p in files if p.suffix.lower() in VIDEO_SUFFIXES)

    def streams(self) -> Iterator[Stream]:
        root = Path(self.cfg.path)
        files = self.files()
        if not files:
            raise SourceError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_SUFFIXES))})")
        prefix = f"{self.cfg.id}/" if self.cfg.id else ""
        names = [path.relative_to(root).with_suffix("").as_posix() for path in files]
        for path, name in zip(files, _with_suffix_where_equal(files, names)):
            yield file_stream(path, prefix + name, self.cfg)


def _with_suffix_where_equal(files: list[Path], names: list[str]) -> list[str]:
    """Stream ids from ``names``, the file's suffix kept where two would be equal (clip.mp4 and clip.mkv in one
    folder were both 'clip': one stream of two files, their records and gate state mixed), numbered where even
    that is equal (clip.mp4 beside clip.mp4.avi)."""
    counts = Counter(names)
    named = [f"{name}{path.suffix}" if counts[name] > 1 else name for path, name in zip(files, names)]
    seen: Counter = Counter()
    unique = []
    for name in named:
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name}~{seen[name]}")
    return unique


@register_source("glob")
class GlobSource(DirectorySource):
    """Files matching a glob pattern such as ``videos/**/*.mp4``."""

    def files(self) -> list[Path]:
        return sorted(Path(p) for p in globlib.glob(self.cfg.path, recursive=True) if Path(p).is_file())

    def streams(self) -> Iterator[Stream]:
        files = self.files()
        if not files:
            raise SourceError(f"{self.cfg.path}: the pattern matches no files; check the glob")
        prefix = f"{self.cfg.id}/" if self.cfg.id else ""
        stems = Counter(p.stem for p in files)  # counted once: a count per file was quadratic (20,000 files: 4 s)
        names = [p.stem if stems[p.stem] == 1 else p.with_suffix("").as_posix() for p in files]
        for path, name in zip(files, _with_suffix_where_equal(files, names)):
            yield file_stream(path, prefix + name, self.cfg)


def file_stream(path: Path, stream_id: str, cfg: SourceConfig) -> Stream:
    return Stream(stream_id, lambda: decode_file(path, stream_id, cfg), str(path))


def decode_file(path: Path, stream_id: str, cfg: SourceConfig) -> Iterator[Frame]:
    """Decode ``path`` in a background thread; yield frames, raise SourceError on damage."""
    reader = _ThreadedDecoder(path, stream_id, cfg)
    reader.start()
    try:
        yield from reader
    finally:
        reader.stop()


_DONE = object()


class _ThreadedDecoder:
    """Runs PyAV decoding in a daemon thread, feeding a bounded queue."""

    def __init__(self, path: Path, stream_id: str, cfg: SourceConfig) -> None:
        self.path, self.stream_id, self.cfg = path, stream_id, cfg
        self.queue: queue.Queue = queue.Queue(maxsize=cfg.options.queue_size)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"decode:{stream_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        while self.thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass

    def __iter__(self) -> Iterator[Frame]:
        while True:
            item = self.queue.get()
            if item is _DONE:
                return
            if isinstance(item, SourceError):
                raise item
            yield item

    def _put(self, item: Any) -> bool:
        while not self.stopped.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in iter_video_frames(self.path, self.stream_id, self.cfg):
                if not self._put(frame):
                    return
            self._put(_DONE)
        except SourceError as exc:
            self._put(exc)
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes the file's error
            self._put(SourceError(f"{self.path}: decoding failed ({type(exc).__name__}: {exc})"))


def iter_video_frames(path: Path, stream_id: str, cfg: SourceConfig) -> Iterator[Frame]:
    """Decode, resample and resize one file (runs inside the decoder thread)."""
    with _video_of(path, stream_id, cfg.options.hwaccel, cfg.options.motion_vectors) as (container, stream):
        stream.thread_type = "AUTO"
        if cfg.options.decode_threads:
            stream.codec_context.thread_count = cfg.options.decode_threads
        decoded = _decoded_frames(container, stream, path)
        exports = cfg.options.motion_vectors and _exports_vectors(stream, path)
        if exports:
            stream.codec_context.options = {"flags2": "+export_mvs"}
            # with frame threads FFmpeg's H.264 decoder exports some frames' vectors differently from run to
            # run (in every run on bikes.mp4, P- and B-frames alike): slices only, so a stream of one slice a
            # frame decodes on one thread, and the read-ahead below gives it its second core back
            stream.thread_type = "SLICE"
        # decode the next frames while this one becomes RGB (both release the GIL)
        yield from _resampled(read_ahead(decoded, depth=4, name=f"demux:{stream_id}"), cfg, stream_id, path, exports)


#: decoders (FFmpeg's decoder names) that export motion vectors: H.264 and the MPEG-video family
VECTOR_CODECS = {"h264", "mpeg1video", "mpeg2video", "mpeg4", "h263", "h263i", "h263p", "flv", "msmpeg4v1",
                 "msmpeg4v2", "msmpeg4", "wmv1", "wmv2", "rv10", "rv20"}


def _exports_vectors(stream: Any, path: Path) -> bool:
    """Whether the file's codec gives motion vectors; said when not: VP9, HEVC and the rest gave an all-zero
    field on every frame, which carried results without moving them and kept gate.motion auto off flow."""
    codec = stream.codec_context.name
    if codec in VECTOR_CODECS:
        return True
    # once a codec a process: an archive of HEVC files (or a looping file) would say it for every file
    say = log.debug if codec in _SAID_NO_VECTORS else log.warning
    _SAID_NO_VECTORS.add(codec)
    say("%s: motion_vectors: its %s decoder exports none; its frames carry no decoder motion (gate.motion "
        "auto uses flow, when a flow stage runs; said once for %s files)", path, codec, codec)
    return False


_SAID_NO_VECTORS: set[str] = set()


@contextlib.contextmanager
def _video_of(path: Path, stream_id: str | None = None, hwaccel: str = "none",
              motion_vectors: bool = False) -> Iterator[tuple[Any, Any]]:
    """The open container and its first video stream; FFmpeg's errors inside become the file's one line."""
    import av

    container = _open_container(path, stream_id, hwaccel, motion_vectors)
    try:
        if not container.streams.video:
            raise SourceError(f"{path}: the file has no video stream; pass a video file")
        yield container, container.streams.best("video")  # the main one (not a cover picture listed first)
    except av.FFmpegError as exc:
        raise SourceError(f"{path}: corrupt or truncated video ({exc}); re-encode or replace the file") from None
    finally:
        container.close()


def _open_container(path: Path, stream_id: str | None = None, hwaccel: str = "none", motion_vectors: bool = False):
    import av

    def open_container(**hw: Any) -> Any:
        return av.open(str(path), mode="r", metadata_errors="ignore", **hw)

    try:
        return open_decoding(open_container, stream_id or path.stem, hwaccel, motion_vectors)
    except FileNotFoundError:
        raise SourceError(f"{path}: file not found; check the path") from None
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not a readable video ({exc}); check that the file is a video and not damaged") from None


def probe_video(path: Path) -> tuple[int, int]:
    """The first frame's width and height; a ``SourceError`` naming the file when it does not decode."""
    with _video_of(path) as (container, stream):
        for frame in container.decode(stream):
            return frame.width, frame.height
    raise SourceError(f"{path}: no frame decodes; re-encode or replace the file")


#: containers whose index lists every sample, so their frame count is what a whole file decodes to
INDEXED_FORMATS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2")
#: containers whose header declares the duration: a video-only one whose frames stop this much short of it was cut
DURATION_FORMATS = ("matroska", "webm")
MISSING_TAIL_S = 1.0


#: a jump in a file's timestamps this much past its frame interval (and past GAP_MIN_S) is said in a warning: a
#: damaged stretch (a corrupt Matroska cluster) decodes to nothing and the frames after it carry on silently
GAP_FRAMES = 10
GAP_MIN_S = 0.5
GAPS_SAID = 5


def _decoded_frames(container, stream, path: Path) -> Iterator[Any]:
    rate = float(stream.average_rate or stream.guessed_rate or 25)
    decoded, last, gaps = 0, None, 0
    size = _size_of(path)  # (inode, bytes): a path swapped for another file meanwhile is not a file that grew
    damaged: list[int] = []  # packets the decoder refused (counted, and the file ends as damaged)
    for frame in _decode_skipping_damage(container, stream, damaged):
        # a frame without a time comes a step after the one before (counting from the file's start put it back)
        seconds = float(frame.time) if frame.time is not None else (last + 1.0 / rate if last is not None else 0.0)
        if last is not None and seconds - last > max(GAP_MIN_S, GAP_FRAMES / rate) and gaps < GAPS_SAID:
            gaps += 1
            log.warning("%s: no frames between %.2f s and %.2f s (a damaged or cut stretch, or a pause in the "
                        "recording)%s", path, last, seconds, "; further gaps are not said" if gaps == GAPS_SAID else "")
        decoded, last = decoded + 1, seconds
        yield seconds, frame
    if damaged:
        raise TruncatedVideoError(f"{path}: {TRUNCATED}: {damaged[0]} damaged packet(s) could not be decoded and were "
                                  f"skipped; the other {decoded} frames were delivered; re-copy or re-encode the file")
    now = _size_of(path)
    if size is not None and now is not None and now[0] == size[0] and now[1] != size[1]:
        raise TruncatedVideoError(f"{path}: {TRUNCATED}: the file grew while it was read (still being written?); "
                                  f"{decoded} frames were decoded, read it again once it is complete")
    _check_complete(container, stream, path, decoded, None if last is None else last + 1.0 / rate)
    if last is not None:
        _check_duration(container, path, last + 1.0 / rate)


def _decode_skipping_damage(container: Any, stream: Any, damaged: list[int]) -> Iterator[Any]:
    """The stream's frames, packet by packet: a packet the decoder refuses is skipped and counted in
    ``damaged`` (one bad packet in an MP4 ended the stream there, and every frame after it was lost)."""
    import av

    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.InvalidDataError:  # at the flush too: with frame threads a late packet's error shows there,
            damaged[:] = [damaged[0] + 1 if damaged else 1]  # and the frames still in the decoder are lost
            continue
        yield from frames


def _size_of(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size


def read_ahead(items: Iterator[Any], depth: int, name: str) -> Iterator[Any]:
    """``items``, produced in a thread of their own up to ``depth`` ahead of the consumer; their errors are
    raised here, in order. Closing this generator stops and joins the thread before it returns, so whatever
    ``items`` reads (an open container) may be closed right after."""
    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put((end, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, error = ahead.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()
        close = getattr(items, "close", None)
        if close is not None:
            close()


def _check_complete(container, stream, path: Path, decoded: int, end_s: float | None = None) -> None:
    """A file whose index promises more frames than its data held was cut short: the frames decoded have
    been delivered, and the stream ends with this error instead of passing for a whole file. An edit list
    (a clip trimmed with -c copy) hides samples its index still lists: frames that reach the stream's declared
    duration are a whole file."""
    indexed = any(name in INDEXED_FORMATS for name in (container.format.name or "").split(","))
    declared = stream.frames or 0
    if stream.duration and stream.time_base and end_s is not None:
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        if end_s - start >= float(stream.duration * stream.time_base) - max(2.0 / rate, 0.1):  # duration: from start
            return
    if indexed and decoded and declared > decoded:
        raise TruncatedVideoError(f"{path}: {TRUNCATED}: {decoded} of the {declared} frames its index lists were decoded "
                          "(the rest of the file is missing); the frames before the cut were labelled, "
                          "re-copy or re-encode the file for the rest")


def _check_duration(container, path: Path, end_s: float) -> None:
    """A Matroska/WebM file declares its duration in its header; when it holds the video alone (an audio track
    may outlast the video) and the frames end well before it, the file was cut short (a copy that stopped)."""
    formats = (container.format.name or "").split(",")
    if not any(name in DURATION_FORMATS for name in formats) or len(container.streams) != 1 or not container.duration:
        return
    declared = container.duration / 1e6  # microseconds; FFmpeg's Matroska duration is the end, start offset included
    if end_s < declared - MISSING_TAIL_S:
        raise TruncatedVideoError(f"{path}: {TRUNCATED}: its frames end at {end_s:.2f} s of the {declared:.2f} s its "
                                  "header declares (the rest of the file is missing); the frames before the cut were "
                                  "labelled, re-copy or re-encode the file for the rest")


def _resampled(decoded: Iterator[Any], cfg: SourceConfig, stream_id: str, path: Path,
               vectors_ok: bool = True) -> Iterator[Frame]:
    """Keep frames on a 1/fps grid (when fps is set), convert to RGB, resize, cap the count."""
    next_time = None
    index = 0
    vectors = _vector_reader(cfg) if vectors_ok else None
    pending: list[Any] = []  # the decoder's vectors of every frame since the last kept one (dropped ones add up)
    went_back, previous = False, None
    for seconds, av_frame in decoded:
        if index == 0 and next_time is None and cfg.resize:
            _say_a_changed_shape(av_frame, cfg.resize, path)
        if vectors is not None and quarter_turns(av_frame):  # its vectors are of the sideways picture
            log.warning("%s: motion_vectors: the video is shown turned (its display matrix); its frames carry no "
                        "decoder motion", path)
            vectors, pending = None, []
        if vectors is not None:
            pending.append(vectors(av_frame, cfg.resize))
        if cfg.fps is not None:
            # before the frame decoded just before it (not the grid's last kept one: at fps 2 a joined segment's frames
            # lay after that one and were left out as if sampled)
            behind = previous is not None and seconds < previous - fps_jitter(cfg.fps)
            previous = seconds
            keep, next_time = on_fps_grid(seconds, next_time, cfg.fps)
            if not keep:
                if behind and not went_back:  # short segments joined: their frames were left out without a word
                    went_back = True
                    log.warning("%s: time went back to %.2f s (segments joined?); with fps %g its frames are left out "
                                "until they pass %.2f s (a jump back of over %.2f s restarts the sampling)", path,
                                seconds, cfg.fps, next_time, fps_restart_back(cfg.fps))
                continue
        frame = Frame(stream_id=stream_id, index=index, pts=seconds, image=_to_rgb(av_frame, cfg.resize))
        if pending:
            frame.meta[VECTORS_KEY], pending = pending, []
        yield frame
        index += 1
        if cfg.max_frames is not None and index >= cfg.max_frames:
            return
    if index == 0:
        raise SourceError(f"{path}: no frames could be decoded; the file is empty or damaged")


#: resize changing the picture's aspect by more than this ratio is said (a portrait phone video, upright now,
#: squeezed into a landscape resize)
ASPECT_CHANGE = 1.25


def _say_a_changed_shape(av_frame: Any, resize: list[int], path: Path) -> None:
    width, height = av_frame.width, av_frame.height
    if quarter_turns(av_frame) % 2:
        width, height = height, width
    change = (resize[0] / resize[1]) / (width / height)
    if not 1 / ASPECT_CHANGE <= change <= ASPECT_CHANGE:
        log.warning("%s: resize %dx%d changes the picture's shape (%dx%d, upright); objects come out stretched: "
                    "give a resize of the same shape", path, resize[0], resize[1], width, height)


def _vector_reader(cfg: SourceConfig) -> Any:
    """What reads a decoded frame's motion vectors: only what the decoder gives, copied out and packed
    (blinkflow.gate.motion.decoder_vectors). The fields are made where they are read (the gate, or the
    segmenter's feature reuse without one), so the decoder thread does next to nothing more."""
    return decoder_vectors if cfg.options.motion_vectors else None


# --------------------------------------------------------------------------- synthetic


@dataclass
class SyntheticOptions:
    """The own settings of a synthetic source."""

    seed: int = setting(0, "random seed; the same seed gives the same frames", lo=0, hi=2**31 - 1)
    width: int = setting(320, "frame width", lo=16, hi=7680)
    height: int = setting(240, "frame height", lo=16, hi=4320)
    num_frames: int = setting(48, "number of frames", lo=1, hi=10**7)
    num_objects: int = setting(3, "moving objects per scene", lo=0, hi=64)
    frame_rate: float = setting(25.0, "frames per second of the generated clip", lo=0.1, hi=1000)
    action: str | None = setting(None, "the front object's action (static, slide-left, slide-right, rotate, grow, "
                                 "shrink, bounce); null: drawn from the seed")
    static_camera: bool = setting(False, "a fixed camera (the background does not pan)")

    def check(self, path: str) -> None:
        from blinkflow.models.classes import SYNTHETIC_ACTIONS

        if self.action is not None and self.action not in SYNTHETIC_ACTIONS:
            raise ConfigError(f"{path}.action: unknown action {self.action!r}; valid: {', '.join(SYNTHETIC_ACTIONS)}")


@register_source("synthetic")
class SyntheticSource:
    """A procedural scene of moving textured shapes, deterministic by seed."""

    Options = SyntheticOptions

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def streams(self) -> Iterator[Stream]:
        seed = self.cfg.options.seed
        stream_id = self.cfg.id or f"synthetic-{seed}"
        yield Stream(stream_id, lambda: self._frames(stream_id), f"synthetic seed {seed}")

    def _frames(self, stream_id: str) -> Iterator[Frame]:
        from blinkflow.models.training.scenes import SceneGenerator

        cfg, scene = self.cfg, self.cfg.options
        generator = SceneGenerator(seed=scene.seed, width=scene.width, height=scene.height,
                                   num_objects=scene.num_objects, action=scene.action,
                                   background_motion=not scene.static_camera)
        step = 1 if cfg.fps is None else max(1, round(scene.frame_rate / cfg.fps))
        for index, t in enumerate(range(0, scene.num_frames, step)):
            if cfg.max_frames is not None and index >= cfg.max_frames:
                return
            image = generator.render_image(t)
            if cfg.resize:
                image = _resize_array(image, cfg.resize)
            yield Frame(stream_id=stream_id, index=index, pts=t / scene.frame_rate, image=image)


def _resize_array(image: np.ndarray, size: list[int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size[0], size[1]), Image.BILINEAR))


# --------------------------------------------------------------------------- the Python API's own frames


@dataclass
class FramesOptions:
    """The own setting of a frames source."""

    frames: Any = setting(None, "an iterable of HxWx3 uint8 RGB arrays, or of (array, capture time) pairs whose "
                                "latency then counts from that time.time() (Python API only, not from YAML)")

    def check(self, path: str) -> None:
        if self.frames is None or isinstance(self.frames, (str, bytes, dict)) or not _iterable(self.frames):
            raise ConfigError(f"{path}.frames: a frames source takes an iterable of numpy frames from the Python "
                              "API (blinkflow.frames(...)), not a " + type(self.frames).__name__)
        if isinstance(self.frames, np.ndarray) and self.frames.ndim == 3:
            raise ConfigError(f"{path}.frames: one image {self.frames.shape}; give a list of them (or a 4-D array)")


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


@register_source("frames")
class FramesSource:
    """Any iterable of HxWx3 uint8 RGB numpy arrays (a notebook's own frames); ``fps`` sets the timestamps."""

    Options = FramesOptions

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg

    def streams(self) -> Iterator[Stream]:
        stream_id = self.cfg.id or "frames"
        yield Stream(stream_id, lambda: self._frames(stream_id), "python frames")

    def _frames(self, stream_id: str) -> Iterator[Frame]:
        rate = self.cfg.fps or 25.0
        ahead_warned = False
        if self.cfg.max_frames == 0:
            return
        for index, item in enumerate(_guarded(self.cfg.options.frames, stream_id)):
            paired = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], np.ndarray)
            image, captured = item if paired else (item, None)
            image = _checked_image(image, stream_id, index)
            if self.cfg.resize:
                image = _resize_array(image, self.cfg.resize)
            frame = Frame(stream_id=stream_id, index=index, pts=index / rate, image=image)
            if captured is not None:  # a camera's own timestamp: a frame read late still counts its wait
                frame.decoded_at = _capture_time(captured, stream_id, index, frame.arrived_at)
                if frame.decoded_at == frame.arrived_at and captured > frame.arrived_at and not ahead_warned:
                    ahead_warned = True
                    log.warning("%s: capture times run ahead of this machine's clock (frame %d by %.3f s); latency "
                                "counts from when such frames arrive", stream_id, index, captured - frame.arrived_at)
            yield frame
            if self.cfg.max_frames is not None and index + 1 >= self.cfg.max_frames:
                return  # before asking the iterable for one more: a camera's generator would block on it


#: a capture time this far ahead of the clock is in another unit (ms or ns since the epoch), not clock skew
MAX_CAPTURE_AHEAD_S = 86400.0
#: a capture time before this (2001-09-09) is from another clock than the epoch's (seconds since boot)
EARLIEST_CAPTURE_S = 1e9


def _capture_time(value: Any, stream_id: str, index: int, now: float) -> float:
    """A pair's capture time as seconds since the epoch, no later than ``now``; a SourceError naming the frame
    for anything else."""
    number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not number or not math.isfinite(value):
        raise SourceError(f"{stream_id}: frame {index}'s capture time ({shown(value)}) is not a number; pass "
                          "(image, time.time()) pairs (seconds since the epoch), or the images alone")
    if value < EARLIEST_CAPTURE_S:  # seconds since boot (V4L2, GStreamer, time.monotonic()): 57 years of latency
        raise SourceError(f"{stream_id}: frame {index}'s capture time {value:.6g} is before 2001; capture times are "
                          "seconds since the epoch (time.time()), not a monotonic or boot clock")
    if value > now + MAX_CAPTURE_AHEAD_S:
        raise SourceError(f"{stream_id}: frame {index}'s capture time {value:.6g} is {(value - now) / 86400:.0f} days "
                          "ahead of this clock; capture times are seconds since the epoch (time.time()), not ms or ns")
    return min(float(value), now)


def _guarded(frames: Any, stream_id: str) -> Iterator[Any]:
    """The caller's frames; what the iterable raises (a camera unplugged) ends this stream alone, as a damaged file
    does, in one line: it stopped every stream of the run and threw every sink's output away."""
    items, index = iter(frames), 0
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001 - the caller's code: its failure is this source's end
            raise SourceError(f"{stream_id}: the frames iterable raised after {index} frames: "
                              f"{type(exc).__name__}: {exc}") from exc
        index += 1
        yield item


def _checked_image(image: Any, stream_id: str, index: int) -> np.ndarray:
    try:
        array = np.asarray(image)
    except (ValueError, TypeError) as exc:  # ragged nesting: a tuple of three, a list of mixed things
        raise SourceError(f"{stream_id}: frame {index} is a {type(image).__name__}, not an image ({exc}); frames must "
                          "be HxWx3 uint8 RGB arrays or (array, capture time) pairs") from None
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8 or min(array.shape[:2]) < 1:
        raise SourceError(f"{stream_id}: frame {index} is {array.dtype} {array.shape}; frames must be HxWx3 uint8 RGB "
                          f"arrays ({_conversion_for(array)})")
    # a copy: a camera SDK that fills one buffer for every read changed the frames waiting in a wave (boxes of
    # frame 0 came from a later frame's pixels)
    return np.array(array, order="C", copy=True)


def _conversion_for(array: np.ndarray) -> str:
    """How to make ``array`` an HxWx3 uint8 RGB frame (a plain astype(np.uint8) blacks out floats in [0, 1] and
    wraps 16-bit pixels)."""
    if array.ndim == 2:
        return "grayscale: np.repeat(arr[..., None], 3, axis=-1)"
    if array.ndim == 3 and array.shape[2] == 4:
        return "RGBA: arr[..., :3]"
    if np.issubdtype(array.dtype, np.floating):
        return "floats in [0, 1]: (arr * 255).clip(0, 255).astype(np.uint8)"
    if array.dtype == np.uint16:
        return "16-bit: (arr >> 8).astype(np.uint8)"
    if array.dtype == np.bool_:
        return "a mask: arr.astype(np.uint8) * 255, repeated over 3 channels"
    if array.size == 0:
        return "an empty image: leave it out"
    if array.dtype == object and array.ndim == 0 and array.item() is None:
        return "None: the iterable gave None for a frame (a failed camera read?); skip those"
    return "a PIL image: np.asarray(image.convert('RGB'))"

