"""The driver loop of the runners whose stages work side by side (``ray``: actors; ``threaded``: threads).

A wave (or a stream's end, or the final flush) travels as a *chain*: one call per stage, each fed by the
previous call's result, so wave i+1 is in stage 1 while wave i is in stage 2. The driver cuts waves exactly
as the local runner does, keeps at most ``runtime.max_in_flight`` chains out (archive: it then waits, and
decoding with it; live: it drops the oldest frames waiting), settles the gate's audit feedback before a
wave goes, and hands finished chains to the ordered output. A subclass says how a chain's calls are sent
(``_send``), which calls have finished (``_finished``) and how a chain's frames are collected (``_collect``).
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from blinkflow.frame import Accounting, Frame, Outcome, Tick
from blinkflow.graph import StageSpec, build_driver_graph
from blinkflow.metrics import NULL_RECORDER
from blinkflow.runners.base import DroppedMotion, OrderedOutput, RunnerBase
from blinkflow.sources import StreamEnd, open_sources

log = logging.getLogger(__name__)

METRICS_POLL_S = 0.5  # how often the driver folds in stage stats and samples queues when metrics are on


@dataclass
class StagePool:
    """The replicas of one stage (Ray actors, or a stage and its thread) and how calls are routed to them: a
    stage with per-stream state by shard, so each stream always meets the same replica, the others in turn."""

    spec: StageSpec
    actors: list[Any]
    calls: int = 0

    def pick(self, shard: int) -> Any:
        if self.spec.temporal:
            return self.actors[shard % len(self.actors)]
        self.calls += 1
        return self.actors[self.calls % len(self.actors)]


@dataclass
class Chain:
    """One unit of work travelling through every stage: a wave, a stream end, or the final flush."""

    kind: str  # "wave" | "end" | "flush"
    shard: int
    frames: list[Frame] = field(default_factory=list)
    stream_id: str | None = None
    refs: list[Any] = field(default_factory=list)  # one handle per stage call sent: an ObjectRef, a Future
    actors: list[Any] = field(default_factory=list)
    retried: bool = False


class ChainRunner(RunnerBase):
    """Waves as chains of concurrent stage calls; the subclass sends and collects them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pools: list[StagePool] = []
        # streams hash to shards, as many as the most replicas of a stage with per-stream state; waves never mix
        # shards, and such a stage picks its replica by shard
        self.shards = max([getattr(s.cfg, "replicas", 1) for s in self.specs if s.temporal] or [1])

    def _send(self, chain: Chain, first_stage: int) -> None:
        """Send the chain's calls from ``first_stage`` on, each fed by the previous one; keep the handles in ``chain.refs``."""
        raise NotImplementedError

    def _finished(self, refs: list[Any]) -> set[Any]:
        """Those of ``refs`` whose calls have finished (without waiting)."""
        raise NotImplementedError

    def _collect(self, chain: Chain) -> list[Frame]:
        """Wait for the chain's last call and return its frames."""
        raise NotImplementedError

    def _stage_workers(self) -> list[tuple[str, int]]:
        """(stage name, how many calls it runs at once) for each stage, in order."""
        raise NotImplementedError

    def _observe(self) -> None:
        """Called as chains finish: a subclass with metrics to fold in does it here."""

    # ------------------------------------------------------------------ the driver loop

    def _start_driver(self) -> None:
        self.accounting = Accounting()
        self.output = OrderedOutput(self.sinks, self.accounting, self.on_result, self.metrics, gate=self.cfg.gate,
                                    driver_stages=build_driver_graph(self.cfg), wave_size=self.wave_size,
                                    held=self.held_frames)
        #: per stream, every frame decoded and not yet out: index -> (pts, height, width), what a lost one is said with
        self.ledger: dict[str, dict[int, tuple[float, int, int]]] = {}
        self.chains: deque[Chain] = deque()
        self.ending: set[str] = set()  # streams whose end chain is out: their id may come back (a re-added camera)
        self.dropped_motion = DroppedMotion()  # vectors of frames dropped under overload, for the next frames

    def _pump(self) -> None:
        pending: dict[int, list[Frame]] = {}
        live = self.cfg.runtime.mode == "live"
        for item in open_sources(self.cfg.sources, self.hub, self.stop, tick_s=self.tick_s()):
            if isinstance(item, Tick):  # quiet live streams: send waves that waited long enough, hand out results
                self._consume_ready()
                self._admit_all(pending)
                continue
            if isinstance(item, StreamEnd):
                shard = self._shard(item.stream_id)
                self._submit_wave(pending.pop(shard, []), shard)
                self._submit(Chain("end", shard, stream_id=item.stream_id))
                self.ending.add(item.stream_id)
                self.dropped_motion.end_stream(item.stream_id)  # no later frame of this decode to take them
                self.metrics.on_stream_state(item.stream_id, False, failed=item.error is not None)
                self.accounting.on_stream_end(item)
                continue
            if item.stream_id in self.ending:
                self._finish_ending(item.stream_id)
            self.accounting.on_decoded(item)
            self.metrics.on_decoded(item)
            self._in_ledger(item)
            if item.outcome is Outcome.DROPPED:  # a live source dropped it under overload: straight to the output
                self._emit_dropped(item)
                continue
            self.dropped_motion.arrived(item)
            shard = self._shard(item.stream_id)
            pending.setdefault(shard, []).append(item)
            if live:  # every shard: another's wave may have waited max_wait_ms while this stream kept the hub busy
                self._admit_all(pending)
            elif len(pending[shard]) >= self.wave_size:
                self._submit_wave(pending.pop(shard), shard)
        for shard, wave in sorted(pending.items()):
            self._submit_wave(wave, shard)
        for shard in range(self.shards):
            self._submit(Chain("flush", shard))
        while self.chains:
            self._consume(self.chains.popleft())

    def _shard(self, stream_id: str) -> int:
        return zlib.crc32(stream_id.encode()) % self.shards if self.shards > 1 else 0

    def _finish_ending(self, stream_id: str) -> None:
        """A stream came back under the id of one whose end is still in flight (a camera removed and added
        again): the old one's chains finish first, so that its ledger, output order and gate feedback are gone
        before the new one's frame 0 is counted."""
        while stream_id in self.ending:
            self._consume(self.chains.popleft())

    def _admit_all(self, pending: dict[int, list[Frame]]) -> None:
        for shard in list(pending):
            pending[shard] = self._admit_live(pending[shard], shard)

    def _admit_live(self, waiting: list[Frame], shard: int) -> list[Frame]:
        """Live mode: submit while there is room; otherwise keep only the newest frames waiting.

        The waiting list never exceeds one wave, so memory and latency stay
        bounded whatever the input rate; each frame pushed out is ``dropped``.
        """
        self._consume_ready()
        oldest_wait_ms = (time.time() - waiting[0].arrived_at) * 1000.0 if waiting else 0.0
        full = len(waiting) >= self.wave_size or oldest_wait_ms >= self.max_wait_ms
        if full and len(self.chains) < self.cfg.runtime.max_in_flight:
            self._submit_wave(waiting[: self.wave_size], shard)
            waiting = waiting[self.wave_size :]
        while len(waiting) > self.wave_size:
            self._emit_dropped(waiting.pop(0), waiting)
        return waiting

    def _consume_ready(self) -> None:
        while self.chains and self.chains[0].refs[-1] in self._finished(self.chains[0].refs[-1:]):
            self._consume(self.chains.popleft())

    def _emit_dropped(self, frame: Frame, waiting: list[Frame] = ()) -> None:
        self.dropped_motion.drop(frame, waiting)
        frame.outcome = Outcome.DROPPED
        self.ledger[frame.stream_id].pop(frame.index, None)
        self.output.push([frame])

    def _submit_wave(self, frames: list[Frame], shard: int) -> None:
        if frames:
            self._settle_gate_feedback(frames)
            self._submit(Chain("wave", shard, frames=frames))

    def _settle_gate_feedback(self, frames: list[Frame]) -> None:
        """An adaptive gate must get the same audit feedback as under the local runner: finish
        older chains until it is settled (blinkflow.gate.carry.CarryOver.ready_for), then attach it."""
        while self.chains and not all(self.output.feedback_ready(frame) for frame in frames):
            self._consume(self.chains.popleft())
        self.output.attach_feedback(frames)

    def _submit(self, chain: Chain) -> None:
        while len(self.chains) >= self.cfg.runtime.max_in_flight:
            self._consume(self.chains.popleft())
        self._send(chain, 0)
        self.chains.append(chain)

    # ------------------------------------------------------------------ results

    def _consume(self, chain: Chain) -> None:
        self._deliver(self._collect(chain))
        if chain.kind == "end":
            self._close_stream(chain.stream_id)
            self.ending.discard(chain.stream_id)
        elif chain.kind == "flush":
            for stream_id in [s for s in self.ledger if self._shard(s) == chain.shard]:
                self._close_stream(stream_id)
        self._observe()

    def _deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.ledger.get(frame.stream_id, {}).pop(frame.index, None)
        self.output.push(frames)

    def _in_ledger(self, frame: Frame) -> None:
        self.ledger.setdefault(frame.stream_id, {})[frame.index] = (frame.pts, frame.height, frame.width)

    def _close_stream(self, stream_id: str) -> None:
        """Anything of this stream still in the ledger was lost inside a restarted stage."""
        lost = sorted(self.ledger.pop(stream_id, {}).items())
        if lost:
            log.error("stream %s: %d frames were lost in a restarted actor; marking them failed", stream_id, len(lost))
        self.output.push([lost_frame(stream_id, index, *said) for index, said in lost])
        self.output.end_stream(stream_id)

    def _sample_queues(self) -> None:
        """Per stage: calls not finished (in flight), and those whose input is ready beyond one per worker (queued)."""
        if self.metrics is NULL_RECORDER:
            return
        refs = [ref for chain in self.chains for ref in chain.refs]
        done = self._finished(refs) if refs else set()
        for index, (name, workers) in enumerate(self._stage_workers()):
            unfinished = [c for c in self.chains if len(c.refs) > index and c.refs[index] not in done]
            startable = sum(1 for c in unfinished if index == 0 or c.refs[index - 1] in done)
            self.metrics.on_queue(name, depth=max(0, startable - workers), in_flight=len(unfinished))


def lost_frame(stream_id: str, index: int, pts: float = 0.0, height: int = 1, width: int = 1) -> Frame:
    """A frame a restarted stage actor lost: failed, with the reason, so no frame vanishes. It keeps the pts and
    size it was decoded with (a NaN pts made records that strict JSON readers refuse, a 1x1 image a video sink
    stretched over its frame); its pixels are black, the image went with the actor."""
    import numpy as np

    image = np.broadcast_to(np.zeros((1, 1, 3), dtype=np.uint8), (height, width, 3))  # no memory for the pixels
    frame = Frame(stream_id=stream_id, index=index, pts=pts, image=image)
    frame.fail("runtime", "lost: the stage actor holding it restarted")
    return frame
