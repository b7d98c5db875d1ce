"""The unit of work (:class:`Frame`), what sinks receive (:class:`FrameResult`),
and the per-run frame accounting (:class:`Accounting`).

Every decoded frame ends with exactly one :class:`Outcome`. The counts always
add up to the number of frames decoded; :meth:`Accounting.check` enforces it.
"""

from __future__ import annotations

import enum
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np


class Outcome(str, enum.Enum):
    PROCESSED = "processed"  # the model stages ran on this frame
    REUSED = "reused"  # the gate skipped it; results were carried over from a keyframe
    DROPPED = "dropped"  # live overload: dropped before processing
    FAILED = "failed"  # an error was recorded against it


@dataclass
class GateMark:
    """The gate's decision on one frame, as the model stages and the driver's carry-over read it
    (pipeline/gate/policy.py decides, pipeline/gate/carry.py carries over). Plain values: a frame pickles for Ray."""

    #: a reused frame: the keyframe whose results it carries (no stage runs on it)
    reuse_of: int | None = None
    #: a refresh: only these stages run; the driver carries the others over
    refresh: list[str] | None = None
    #: a refresh for change (``gate.carry_until``): these stages are carried over (moved along the motion), the
    #: others run
    carried: list[str] | None = None
    #: the keyframe whose would-be carry-over the driver scores against this frame's fresh results (an audit)
    audit_of: int | None = None
    #: backward motion since the keyframe, (gh, gw, 2) float16 in source pixels (pipeline/gate/motion.py)
    motion: Any = None
    #: region recompute: {"grid": [rows, cols], "changed": tile indices or None (whole frame), "base": the frame
    #: the stages' caches hold, "bases": per stage, for stages refreshed since}
    tiles: dict[str, Any] | None = None
    #: (frame index, agreement) of audits at least ``gate.audit_lag`` frames older, from the driver to the gate;
    #: with ``gate.region_budget`` a third item: the share of each tile where the results disagreed
    feedback: list[tuple] | None = None
    #: object_weight: the boxes (x1, y1, x2, y2, source pixels) of the stream's latest frame at least
    #: ``gate.audit_lag`` frames older, from the driver to the gate
    objects: list[list[float]] | None = None
    #: the frame ``objects`` came from (boxes from before a restart or a resize are not for the new state)
    objects_from: int | None = None
    #: the stream's latest processed frame at least ``gate.audit_lag`` frames older that failed, from the driver
    #: to the gate: while the gate still builds on it, the next frame is a keyframe (nothing to carry over)
    failed: int | None = None


#: ``Frame.meta`` key: the index a stream's first frame had when it did not start at 0 (a stream added again
#: under its id goes on numbering); the runners' output order starts there
FIRST_INDEX_KEY = "first_index"


@dataclass
class Frame:
    """One decoded video frame travelling through the graph.

    ``image`` is RGB uint8, shape (H, W, 3). Stages add their outputs to
    ``results[stage_name]``; ``gate`` is the gate's typed mark (None before the gate or without one);
    ``meta`` carries the source's bookkeeping (decoder motion vectors, reconnects).
    """

    stream_id: str
    index: int
    pts: float
    image: Any
    meta: dict[str, Any] = field(default_factory=dict)
    gate: GateMark | None = None
    results: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome | None = None
    error: str | None = None
    decoded_at: float = field(default_factory=time.time)  # or a camera's capture time: latency counts from it
    #: when the frame reached the runner: what a live wave's wait (max_wait_ms) counts from. A frame captured
    #: long ago is not late for its wave; counting from the capture, a run that fell behind sent waves of one
    arrived_at: float = field(default_factory=time.time)
    #: the pixels already on an accelerator, by device name (stages.common.device_image): the first model
    #: stage on a GPU uploads a frame, the later ones on it reuse that copy; never pickled, emptied by finish()
    device_images: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:
        # device copies stay in the process that made them (a Ray actor uploads its own)
        return {**self.__dict__, "device_images": {}}

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def key(self) -> tuple[str, int]:
        return (self.stream_id, self.index)

    @property
    def mark(self) -> GateMark:
        """The gate's mark, or an empty one (no gate)."""
        return self.gate if self.gate is not None else GateMark()

    @property
    def is_reused(self) -> bool:
        return self.mark.reuse_of is not None

    @property
    def is_refresh(self) -> bool:
        """A gate refresh: only the stages in ``gate.refresh`` run, or all but those in ``gate.carried``; the
        driver carries the others over."""
        return self.mark.refresh is not None or self.mark.carried is not None

    def runs(self, stage: str) -> bool:
        """Whether ``stage`` computes on this frame: not failed, not reused, listed if it is a refresh and not
        carried over."""
        if self.is_failed or self.is_reused:
            return False
        mark = self.mark
        if mark.carried is not None:
            return stage not in mark.carried
        return mark.refresh is None or stage in mark.refresh

    @property
    def is_failed(self) -> bool:
        return self.outcome is Outcome.FAILED

    def fail(self, stage: str, error: BaseException | str) -> None:
        """Record the first failure; later stages skip a failed frame."""
        if self.outcome is Outcome.FAILED:
            return
        self.outcome = Outcome.FAILED
        message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self.error = f"{stage}: {message}"

    def finish(self) -> "FrameResult":
        self.device_images.clear()  # a stage that still holds the frame uploads again; memory does not pile up
        if self.outcome is None:
            self.outcome = Outcome.REUSED if self.is_reused else Outcome.PROCESSED
        return FrameResult(
            stream_id=self.stream_id,
            index=self.index,
            pts=self.pts,
            width=self.width,
            height=self.height,
            outcome=self.outcome,
            results=self.results,
            error=self.error,
            reuse_of=self.mark.reuse_of,
            latency_s=max(0.0, time.time() - self.decoded_at),
            image=self.image,
            ts=self.decoded_at,
        )


@dataclass
class FrameResult:
    """What a sink receives: one per decoded frame, in order per stream."""

    stream_id: str
    index: int
    pts: float
    width: int
    height: int
    outcome: Outcome
    results: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    reuse_of: int | None = None
    latency_s: float = 0.0
    image: Any = None  # the pixels, for overlay sinks; never serialised
    ts: float = 0.0  # epoch seconds (wall clock) when the frame was decoded

    @classmethod
    def dropped(cls, frame: Frame) -> "FrameResult":
        frame.outcome = Outcome.DROPPED
        frame.results = {}
        return frame.finish()


@dataclass
class Accounting:
    """Counts of frame outcomes per stream; decoded must equal the sum of outcomes."""

    decoded: Counter = field(default_factory=Counter)
    outcomes: dict[str, Counter] = field(default_factory=dict)
    source_errors: list[str] = field(default_factory=list)
    truncated: list[str] = field(default_factory=list)  # ids of the streams that ended TRUNCATED

    def on_decoded(self, frame: Frame) -> None:
        self.decoded[frame.stream_id] += 1

    def on_stream_end(self, end: StreamEnd) -> None:
        """Keep an early end's message and, for a cut-short input, its id (label marks it partial)."""
        if end.error:
            self.source_errors.append(end.error)
        if end.reason is EndReason.TRUNCATED:
            self.truncated.append(end.stream_id)

    def on_result(self, result: FrameResult) -> None:
        self.outcomes.setdefault(result.stream_id, Counter())[result.outcome.value] += 1

    def totals(self) -> dict[str, int]:
        totals = {outcome.value: 0 for outcome in Outcome}
        for counts in self.outcomes.values():
            for outcome, count in counts.items():
                totals[outcome] += count
        totals["decoded"] = sum(self.decoded.values())
        return totals

    def check(self) -> None:
        """Raise if any decoded frame has no outcome, or an outcome has no frame."""
        for stream, decoded in self.decoded.items():
            accounted = sum(self.outcomes.get(stream, Counter()).values())
            if accounted != decoded:
                raise AssertionError(
                    f"frame accounting broken for stream {stream!r}: "
                    f"{decoded} decoded but {accounted} accounted for"
                )

    def summary_lines(self) -> list[str]:
        totals = self.totals()
        lines = [
            "frames: {decoded} decoded = {processed} processed + {reused} reused"
            " + {dropped} dropped + {failed} failed".format(**totals)
        ]
        for stream in sorted(self.decoded):
            counts = self.outcomes.get(stream, Counter())
            parts = ", ".join(f"{o.value} {counts.get(o.value, 0)}" for o in Outcome)
            lines.append(f"  {stream}: {self.decoded[stream]} decoded ({parts})")
        lines.extend(f"  source error: {message}" for message in self.source_errors)
        return lines


# --------------------------------------------------------------------------- streams


class EndReason(str, enum.Enum):
    """Why a stream ended; set by the source, read by the accounting and ``blinkflow label``."""

    COMPLETE = "complete"  # the input was read to its end
    ERROR = "error"  # it could not be opened or broke; ``error`` says how
    TRUNCATED = "truncated"  # its data ended before its index did: the frames before the cut were delivered
    STOPPED = "stopped"  # the run was asked to stop (a signal) before the input's end


@dataclass
class StreamEnd:
    """Marks the end of a stream; ``error`` says why it ended early, if it did, and ``reason`` what kind of end."""

    stream_id: str
    error: str | None = None
    reason: EndReason | None = None  # None: COMPLETE without an error, ERROR with one

    def __post_init__(self) -> None:
        if self.reason is None:
            self.reason = EndReason.ERROR if self.error else EndReason.COMPLETE


@dataclass
class Tick:
    """Nothing came from the live streams for a while (``open_sources(tick_s=...)``): a live runner's cue to
    send a wave that has waited long enough and to hand out finished results, however quiet the cameras."""


class Stream:
    """One video stream: an id and a frame iterator that may raise SourceError."""

    def __init__(self, stream_id: str, frames: Callable[[], Iterator[Frame]], origin: str) -> None:
        self.id = stream_id
        self.origin = origin
        self._frames = frames

    def frames(self) -> Iterator[Frame]:
        return self._frames()


def fps_restart_back(fps: float) -> float:
    """How far before the grid's next slot a frame must lie for the grid to restart at it (time went back:
    segments joined, a reset), not for one frame out of order."""
    return max(2.0 * (1.0 / fps), 0.5)  # in steps, as the grid counts them


def fps_jitter(fps: float) -> float:
    """How far timestamps may be off their slot (rounded: Matroska's to the millisecond) and still be in it."""
    return min(2e-3, 0.1 * (1.0 / fps))


def on_fps_grid(seconds: float, next_time: float | None, fps: float) -> tuple[bool, float | None]:
    """Whether a frame at ``seconds`` is kept on a 1/``fps`` grid, and the grid's next time. After a gap of a
    step or more (a pause in a recording, a reconnect) the grid restarts at that frame: the frames after a gap
    are not all kept to catch up."""
    step = 1.0 / fps
    if next_time is not None and seconds < next_time - fps_restart_back(fps):  # time went back: the grid starts
        return True, seconds + step                                           # again there, as after a gap
    # a frame a hair before its slot is in it
    if next_time is not None and seconds < next_time - fps_jitter(fps):
        return False, next_time
    on_grid = next_time is not None and seconds - next_time < 1.5 * step  # jitter stays on the grid, a gap does not
    return True, (next_time if on_grid else seconds) + step


def av_to_rgb(av_frame: Any, resize: list[int] | None) -> np.ndarray:
    """A decoded PyAV frame as an RGB array, upright (its display matrix's quarter turns applied: a phone's
    video came sideways) and resized to ``[width, height]`` (of the upright picture) by FFmpeg's scaler."""
    turns = quarter_turns(av_frame)
    if resize:
        width, height = (resize[1], resize[0]) if turns % 2 else (resize[0], resize[1])
        image = av_frame.to_ndarray(format="rgb24", width=width, height=height)
    else:
        image = av_frame.to_ndarray(format="rgb24")
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def quarter_turns(av_frame: Any) -> int:
    """Counter-clockwise quarter turns that show the frame upright (its display matrix; 0 without one)."""
    rotation = getattr(av_frame, "rotation", 0) or 0
    return int(round(float(rotation) / 90.0)) % 4
