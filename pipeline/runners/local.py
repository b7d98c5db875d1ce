"""The local runner: every stage in this process, deterministic.

It is the reference the Ray runner is tested against: the same input gives the
same per-frame results, in the same order, with the same accounting. Frames
are read in waves of the largest stage batch; each stage splits a wave into
its own batch size. Archive semantics: nothing is ever dropped.
"""

from __future__ import annotations

import logging
import time

from blinkflow.frame import Accounting, Frame, Outcome, Tick
from blinkflow.graph import build_driver_graph
from blinkflow.registry import register_runner
from blinkflow.runners.base import DroppedMotion, OrderedOutput, RunnerBase, RunSummary, StageCaller, StageChain, committed_sinks, setup_stage
from blinkflow.sources import StreamEnd, open_sources

log = logging.getLogger(__name__)


@register_runner("local")
class LocalRunner(RunnerBase):
    name = "local"

    def run(self) -> RunSummary:
        started = time.perf_counter()
        accounting = Accounting()
        output = OrderedOutput(self.sinks, accounting, self.on_result, self.metrics, gate=self.cfg.gate,
                               driver_stages=build_driver_graph(self.cfg), wave_size=self.wave_size,
                               held=self.held_frames)
        callers: list[StageCaller] = []
        with committed_sinks(self.sinks):
            try:
                callers.extend(self._setup_stages())
                setup_s = time.perf_counter() - started
                self.metrics.on_ready(True)
                self._pump(StageChain(callers, before=output.attach_feedback), output, accounting)
                output.close()
            finally:
                self.metrics.on_ready(False)
                for caller in callers:
                    caller.stage.teardown()
        accounting.check()
        return RunSummary.of_run(self.name, accounting, output, started, setup_s,
                                 {c.name: (c.seconds, c.frames) for c in callers})

    def _setup_stages(self) -> list[StageCaller]:
        callers = [setup_stage(spec, self.metrics) for spec in self.specs]
        for caller in callers:  # one process, one call at a time: nothing ever waits in a queue
            self.metrics.on_queue(caller.name, depth=0, in_flight=0)
        return callers

    def _pump(self, chain: StageChain, output: OrderedOutput, accounting: Accounting) -> None:
        # live: a wave also goes when its oldest frame has waited max_wait_ms, checked as each frame comes and on
        # the live streams' ticks while they are quiet (a camera at 10 fps would otherwise wait 7 frame intervals for
        # a wave of 8); archive: full waves only
        live = self.cfg.runtime.mode == "live"
        max_wait_s = self.max_wait_ms / 1000.0 if live else float("inf")
        wave: list[Frame] = []
        dropped_motion = DroppedMotion()  # a dropped frame's decoder vectors go to its stream's next frame
        for item in open_sources(self.cfg.sources, self.hub, self.stop, tick_s=self.tick_s()):
            if isinstance(item, Tick):  # quiet live streams: the wave goes once it has waited long enough
                if wave and time.time() - wave[0].arrived_at >= max_wait_s:
                    output.push(chain.process(wave))
                    wave = []
                continue
            if isinstance(item, StreamEnd):
                output.push(chain.process(wave))
                wave = []
                output.push(chain.end_stream(item.stream_id))
                output.end_stream(item.stream_id)
                dropped_motion.end_stream(item.stream_id)
                self.metrics.on_stream_state(item.stream_id, False, failed=item.error is not None)
                accounting.on_stream_end(item)
                continue
            accounting.on_decoded(item)
            self.metrics.on_decoded(item)
            if item.outcome is Outcome.DROPPED:  # a live source dropped it under overload: nothing to compute
                dropped_motion.drop(item, wave)
                output.push([item])
                continue
            dropped_motion.arrived(item)
            wave.append(item)
            if len(wave) >= self.wave_size or time.time() - wave[0].arrived_at >= max_wait_s:
                output.push(chain.process(wave))
                wave = []
        output.push(chain.process(wave))
        output.push(chain.flush())
