"""Pieces every runner shares: calling a stage with failure isolation, putting
results back in per-stream order, carrying results over to reused frames,
frame accounting, and the run summary.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from blinkflow.config import Config
from blinkflow.errors import BlinkflowError, SinkError, StageError, first_line
from blinkflow.frame import FIRST_INDEX_KEY, Accounting, Frame, FrameResult, Outcome
from blinkflow.gate.carry import CarryOver
from blinkflow.gate.motion import VECTORS_KEY
from blinkflow.graph import build_graph
from blinkflow.metrics import NULL_RECORDER, MetricsRecorder

log = logging.getLogger(__name__)

#: the shortest interval at which quiet live streams tick (see RunnerBase.tick_s)
MIN_TICK_MS = 5.0


class RunnerBase:
    """What every runner holds: the config and its stage graph, the sinks, who hears of each result."""

    def __init__(self, cfg: Config, sinks: list[Any] | None = None, on_result: Callable[[FrameResult], None] | None = None,
                 metrics: MetricsRecorder | None = None, hub: Any = None, stop: Any = None):
        self.cfg = cfg
        self.hub = hub  # a pipeline.streams.StreamHub whose streams may change while the run goes on
        self.stop = stop  # a threading.Event: once set, no new frame is read; those in flight finish, sinks commit
        self.sinks = sinks or []
        self.on_result = on_result
        self.metrics = metrics or NULL_RECORDER
        self.specs = build_graph(cfg)
        # frames are read in waves of the largest stage batch; in live mode a partial wave goes once its oldest
        # frame has waited the shortest max_wait_ms of the stages
        self.wave_size = max([spec.batch for spec in self.specs] or [1])
        #: the most frames a worker stage keeps back per stream (the gate's feedback waits at least as long)
        self.held_frames = max([spec.cls.held_frames(spec.cfg) for spec in self.specs] or [0])
        # the gate's config has no max_wait_ms: counting it as 20 ms capped every stage's longer wait
        self.max_wait_ms = min([spec.cfg.max_wait_ms for spec in self.specs if hasattr(spec.cfg, "max_wait_ms")] or [20.0])

    def tick_s(self) -> float | None:
        """How often quiet live streams wake the driver to send a wave that has waited ``max_wait_ms``: never in
        archive mode, nor at 0 ms (every frame then goes as it comes), and at most every MIN_TICK_MS (a hub
        ticking at 0 s spun a core)."""
        if self.cfg.runtime.mode != "live" or self.max_wait_ms <= 0:
            return None
        return max(self.max_wait_ms, MIN_TICK_MS) / 1000.0


class StageCaller:
    """Calls one stage's methods, timing them and isolating failures.

    When ``process`` raises on a batch, the batch is retried one frame at a
    time, so a single bad frame fails alone (recorded against this stage) and
    its neighbours still get results. Each call is also reported to ``metrics``.
    """

    def __init__(self, name: str, stage: Any, batch: int, metrics: MetricsRecorder = NULL_RECORDER) -> None:
        self.name = name
        self.stage = stage
        self.batch = max(1, batch)
        self.metrics = metrics
        self.seconds = 0.0
        self.frames = 0
        self.calls = 0
        self.errors = 0

    def process(self, frames: list[Frame]) -> list[Frame]:
        out: list[Frame] = []
        for start in range(0, len(frames), self.batch):
            out.extend(self._process_batch(frames[start : start + self.batch]))
        return out

    def _process_batch(self, frames: list[Frame]) -> list[Frame]:
        if not frames:
            return []
        started = time.perf_counter()
        try:
            out = self.stage.process(frames)
        except Exception as exc:  # noqa: BLE001 - the stage boundary: record, isolate, go on
            if len(frames) == 1:
                self.errors += 1
                log.warning("stage %s failed on %s#%d: %s", self.name, frames[0].stream_id, frames[0].index, exc)
                frames[0].fail(self.name, exc)
                self._count(started, 1, 1)
                return frames
            # the failed attempt's time is work done, its frames are not: the retries below count each one once
            self._count(started, 0, 0)
            return [f for frame in frames for f in self._process_batch([frame])]
        self._count(started, len(frames), 0)
        return out

    def _count(self, started: float, frames: int, failed: int) -> None:
        elapsed = time.perf_counter() - started
        self.seconds += elapsed
        self.frames += frames
        self.calls += 1
        self.metrics.on_stage_call(self.name, elapsed, frames, failed)

    def end_stream(self, stream_id: str) -> list[Frame]:
        return self._release(lambda: self.stage.end_stream(stream_id), f"ending stream {stream_id!r}")

    def flush(self) -> list[Frame]:
        return self._release(self.stage.flush, "flushing at the run's end")

    def _release(self, release: Callable[[], list[Frame]], what: str) -> list[Frame]:
        started = time.perf_counter()
        try:
            return release()
        except BlinkflowError:
            raise
        except Exception as exc:  # a stage's own bug: the frames it holds are lost, so the run stops, in one line
            raise StageError(f"stages.{self.name}: {what} failed ({type(exc).__name__}: {first_line(exc)}); the "
                             "frames it held are lost and the run stops; fix the stage's end_stream/flush") from exc
        finally:
            elapsed = time.perf_counter() - started
            self.seconds += elapsed
            self.metrics.on_stage_call(self.name, elapsed, 0, 0)


def setup_stage(spec: Any, metrics: MetricsRecorder = NULL_RECORDER) -> StageCaller:
    """Create and set up one stage from its spec, the same way in every runner.

    The torch RNG is seeded first so that a stage with random weights (``weights:
    null``) is identical in every process: the Ray runner's actors then give the
    same outputs as the local runner.
    """
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover - stages without torch
        pass
    stage = spec.create()
    stage.setup(spec.device)
    return StageCaller(spec.name, stage, spec.batch, metrics)


class StageChain:
    """Stages in order; frames released by stage k go through stages k+1.. next."""

    def __init__(self, callers: list[StageCaller], before: Callable[[list[Frame]], None] | None = None) -> None:
        self.callers = callers
        self.before = before  # called on each new wave before the first stage (the gate's audit feedback)

    def process(self, frames: list[Frame]) -> list[Frame]:
        if self.before is not None and frames:
            self.before(frames)
        for caller in self.callers:
            frames = caller.process(frames)
        return frames

    def end_stream(self, stream_id: str) -> list[Frame]:
        carried: list[Frame] = []
        for caller in self.callers:
            carried = caller.process(carried) + caller.end_stream(stream_id)
        return carried

    def flush(self) -> list[Frame]:
        carried: list[Frame] = []
        for caller in self.callers:
            carried = caller.process(carried) + caller.flush()
        return carried


class OrderedOutput:
    """Restores per-stream frame order, fills reused frames from their keyframe,
    runs the driver stages, counts outcomes and hands results to the sinks and the metrics.

    Driver stages (``Stage.driver``: tracking, events) run here, in the driver of every
    runner, because only here does each frame have its final results in stream order: the
    gate's reused frames get their boxes from the carry-over just above, after every worker
    stage ran. They run after the carry-over has snapshotted the keyframe's results, so
    nothing they add (track ids, events) is ever carried to another frame, and the gate's
    audit feedback is unchanged by them. A driver stage may hold frames back (the events
    stage keeps a stream's newest frame until the next one, so that the tracks a stream ends
    with get their ``end`` events on its last frame); ``end_stream`` and ``close`` release them.
    """

    def __init__(self, sinks: list[Any], accounting: Accounting, on_result: Callable[[FrameResult], None] | None = None,
                 metrics: MetricsRecorder = NULL_RECORDER, gate: Any = None, driver_stages: list[Any] = (),
                 wave_size: int = 1, held: int = 0):
        self.sinks = sinks
        self.accounting = accounting
        self.on_result = on_result
        self.metrics = metrics
        #: the gate's driver half: motion-compensated carry-over, audit scores, per-stream skip stats
        self.carry = CarryOver.from_config(gate, wave_size, held)
        self.pending: dict[str, list[tuple[int, int, Frame]]] = defaultdict(list)
        self.next_index: dict[str, int] = {}
        #: per stream, the latest frame the models ran on: (index, results); a carried frame takes results only
        #: from the frame its gate mark names, so a failed or lost one is never stood in for by an older one
        self.last_processed: dict[str, tuple[int, dict[str, Any]]] = {}
        #: per stream, the latest frame the models ran on (or that was lost) that failed, and why
        self.failures: dict[str, tuple[int, str]] = {}
        self._tiebreak = 0
        #: driver stages from graph.build_driver_graph, set up here (they are cheap and pure Python)
        self.driver = StageChain([setup_stage(spec, metrics) for spec in driver_stages])

    def push(self, frames: list[Frame]) -> None:
        for frame in frames:
            if frame.stream_id not in self.next_index:  # 0, or where a stream added again under its id goes on
                self.next_index[frame.stream_id] = frame.meta.get(FIRST_INDEX_KEY, 0)
            self._tiebreak += 1
            heapq.heappush(self.pending[frame.stream_id], (frame.index, self._tiebreak, frame))
            self._drain(frame.stream_id)

    def _drain(self, stream_id: str) -> None:
        heap = self.pending[stream_id]
        while heap and heap[0][0] == self.next_index[stream_id]:
            _, _, frame = heapq.heappop(heap)
            self.next_index[stream_id] += 1
            self._emit(frame)

    def end_stream(self, stream_id: str) -> None:
        heap = self.pending.pop(stream_id, [])
        if heap:
            log.error("stream %s ended with %d frames out of order; emitting them", stream_id, len(heap))
        for _, _, frame in sorted(heap, key=lambda item: item[:2]):
            self._emit(frame)
        self._deliver(self.driver.end_stream(stream_id))
        self.next_index.pop(stream_id, None)
        self.last_processed.pop(stream_id, None)
        self.failures.pop(stream_id, None)
        self.carry.end_stream(stream_id)

    def close(self) -> None:
        for stream_id in list(self.pending):
            self.end_stream(stream_id)
        self._deliver(self.driver.flush())
        for caller in self.driver.callers:
            caller.stage.teardown()

    @property
    def driver_seconds(self) -> dict[str, float]:
        return {caller.name: caller.seconds for caller in self.driver.callers}

    @property
    def driver_frames(self) -> dict[str, int]:
        return {caller.name: caller.frames for caller in self.driver.callers}

    def feedback_ready(self, frame: Frame) -> bool:
        """Whether the gate's audit feedback for ``frame`` is settled (see CarryOver.ready_for)."""
        return self.carry.ready_for(frame, self.next_index.get(frame.stream_id, frame.meta.get(FIRST_INDEX_KEY, 0)))

    def attach_feedback(self, frames: list[Frame]) -> None:
        self.carry.attach_feedback(frames)

    def _emit(self, frame: Frame) -> None:
        index, base = self.last_processed.get(frame.stream_id, (None, {}))
        if (frame.is_reused or frame.is_refresh) and not frame.is_failed:
            source = carried_from(frame)
            if source == index:
                self.carry.fill(frame, base)
            else:  # the results it would carry belong to another frame: none rather than wrong ones
                frame.fail("gate", self._nothing_to_carry(frame.stream_id, source))
        outcome = frame.finish().outcome
        audited = outcome is Outcome.PROCESSED and frame.mark.audit_of is not None and frame.mark.audit_of == index
        self.carry.observe(frame, base if audited else None)
        if outcome is Outcome.PROCESSED:
            if not frame.is_reused:
                self.last_processed[frame.stream_id] = (frame.index, dict(frame.results))
        elif outcome is Outcome.FAILED and not frame.is_reused:
            # a frame the models ran on (or one lost with its gate mark, which may have been): the gate hears of
            # it and stops building on it; the frames carrying from it meanwhile fail above
            self.failures[frame.stream_id] = (frame.index, frame.error or "failed")
            self.carry.note_failed(frame)
        self._deliver(self.driver.process([frame]) if self.driver.callers else [frame])

    def _nothing_to_carry(self, stream_id: str, source: int | None) -> str:
        failed = self.failures.get(stream_id)
        if failed is not None and failed[0] == source:
            return f"nothing to carry over: frame {source}, whose results it reuses, failed ({failed[1]})"
        return f"nothing to carry over: frame {source}, whose results it reuses, has no results (lost or failed)"

    def _deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            self._write(frame.finish())

    def _write(self, result: FrameResult) -> None:
        self.accounting.on_result(result)
        self.metrics.on_result(result)
        for sink in self.sinks:
            sink.write(result)
        if self.on_result is not None:
            self.on_result(result)


class DroppedMotion:
    """The decoder vectors of frames dropped before any stage saw them (live overload), handed to the stream's
    next frame, as the fps filter hands on those of the frames it skips: the gate composes its motion from every
    decoded frame's, and a missing step moved carried results by too little."""

    def __init__(self) -> None:
        self._held: dict[str, list[tuple[int, list[Any]]]] = {}
        self._last: dict[str, int] = {}  # per stream, the latest frame given its vectors (a lower index: a restart)

    def drop(self, frame: Frame, waiting: list[Frame] = ()) -> None:
        """``frame`` is dropped: its vectors go to the next frame of its stream among ``waiting``, or are held
        for the next one to arrive."""
        vectors = frame.meta.pop(VECTORS_KEY, None)
        if not vectors:
            return
        later = [f for f in waiting if f.stream_id == frame.stream_id and f.index > frame.index]
        if later:
            _prepend(min(later, key=lambda f: f.index), list(vectors))
        else:
            self._held.setdefault(frame.stream_id, []).append((frame.index, list(vectors)))

    def arrived(self, frame: Frame) -> None:
        """A frame that will be processed arrived: it takes the held vectors of its stream's earlier frames."""
        stream = frame.stream_id
        if frame.index <= self._last.get(stream, -1):
            self._held.pop(stream, None)  # a new decode: the old one's vectors are not this one's
        self._last[stream] = frame.index
        held = self._held.get(stream)
        earlier = sorted((index, vectors) for index, vectors in held or [] if index < frame.index)
        if earlier:
            self._held[stream] = [(index, vectors) for index, vectors in held if index >= frame.index]
            _prepend(frame, [v for _, vectors in earlier for v in vectors])

    def end_stream(self, stream_id: str) -> None:
        self._held.pop(stream_id, None)
        self._last.pop(stream_id, None)


def _prepend(frame: Frame, vectors: list[Any]) -> None:
    frame.meta[VECTORS_KEY] = vectors + list(frame.meta.get(VECTORS_KEY) or [])


def carried_from(frame: Frame) -> int | None:
    """The frame whose results a reused frame or a refresh carries over, by its gate mark."""
    if frame.is_reused:
        return frame.mark.reuse_of
    key = (frame.results.get("gate") or {}).get("keyframe")
    return int(key) if key is not None else None


@contextlib.contextmanager
def committed_sinks(sinks: list[Any]) -> Iterator[None]:
    """The sinks of one run: aborted when the run fails (archive outputs are discarded), closed (committed)
    when it ends; the block's own cleanup (stage teardown, actors stopped) runs first."""
    try:
        yield
    except BaseException:
        for sink in sinks:
            with contextlib.suppress(Exception):  # one sink that cannot discard must not keep the others from it
                sink.abort()
        raise
    failures = []
    for sink in sinks:  # each commits on its own: a full disk under one output must not strand the others
        try:
            sink.close()
        except Exception as exc:  # noqa: BLE001 - said below, once every other sink is committed
            failures.append((sink, exc))
            with contextlib.suppress(Exception):
                sink.abort()
    if failures:
        sink, exc = failures[0]
        where = getattr(getattr(sink, "cfg", None), "path", None) or type(sink).__name__
        raise SinkError(f"{where}: could not be written ({type(exc).__name__}: {exc}); the run's other outputs "
                        "were committed; free space or fix the path and run again") from None


@dataclass
class RunSummary:
    """What a run did: frame outcomes, time, throughput and per-stage cost."""

    accounting: Accounting
    elapsed_s: float
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_frames: dict[str, int] = field(default_factory=dict)
    runner: str = "local"
    setup_s: float = 0.0  # model loading and actor start-up, included in elapsed_s

    @classmethod
    def of_run(cls, runner: str, accounting: Accounting, output: OrderedOutput, started: float, setup_s: float,
               totals: dict[str, tuple[float, int]]) -> RunSummary:
        """A finished run's summary: ``totals`` holds each worker stage's (busy seconds, frames), all its copies
        together; the driver stages' come from ``output``; ``started`` is the run's ``time.perf_counter()``."""
        return cls(
            accounting=accounting,
            elapsed_s=time.perf_counter() - started,
            stage_seconds={name: seconds for name, (seconds, _) in totals.items()} | output.driver_seconds,
            stage_frames={name: int(frames) for name, (_, frames) in totals.items()} | output.driver_frames,
            runner=runner,
            setup_s=setup_s,
        )

    @property
    def processing_s(self) -> float:
        return max(1e-9, self.elapsed_s - self.setup_s)

    @property
    def totals(self) -> dict[str, int]:
        return self.accounting.totals()

    @property
    def ok(self) -> bool:
        return not self.accounting.source_errors and self.totals["failed"] == 0

    @property
    def fps(self) -> float:
        return self.totals["decoded"] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def lines(self) -> list[str]:
        lines = [f"blinkflow run ({self.runner} runner): {self.elapsed_s:.2f} s, {self.fps:.1f} frames/s"]
        lines.extend(self.accounting.summary_lines())
        for stage, seconds in self.stage_seconds.items():
            frames = self.stage_frames.get(stage, 0)
            per_frame = 1000.0 * seconds / frames if frames else 0.0
            lines.append(f"  stage {stage}: {seconds:.2f} s busy, {frames} frames seen, {per_frame:.1f} ms/frame")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "elapsed_s": round(self.elapsed_s, 4),
            "setup_s": round(self.setup_s, 4),
            "fps": round(self.fps, 3),
            "totals": self.totals,
            "streams": {s: dict(c) for s, c in self.accounting.outcomes.items()},
            "decoded": dict(self.accounting.decoded),
            "source_errors": list(self.accounting.source_errors),
            "truncated": list(self.accounting.truncated),  # streams cut short (their frames before the cut are in)
            "stage_seconds": {k: round(v, 4) for k, v in self.stage_seconds.items()},
        }
