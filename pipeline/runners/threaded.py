"""The threaded runner: every stage in this process, each in a thread of its own.

Stages overlap as the Ray runner's actors do (wave i+1 in stage 1 while wave i is in stage 2), without Ray
and without copying frames between processes: a GPU stage's kernels run while the next stage does its host
work, and torch, NumPy and PyAV release the GIL in their heavy calls. Each stage's thread runs its calls in
the order they were sent, so per-stream state stays consistent and the outputs equal the local runner's
(tests/test_runner_threaded.py). The driver loop (waves, backpressure, live drops, the gate's feedback) is
the Ray runner's (:mod:`blinkflow.runners.chains`). ``replicas: K`` gives a stage K copies, each with its
thread, routed as the Ray runner routes actors (a stage with per-stream state by the stream's shard), so a
host-bound stage such as the gate spreads over cores (its NumPy work mostly runs without the GIL).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, wait
from typing import Any

from blinkflow.depth_parallel import attach_depth_parallel
from blinkflow.frame import Frame
from blinkflow.lanes import Lane
from blinkflow.metrics import NULL_RECORDER
from blinkflow.registry import register_runner
from blinkflow.runners.base import RunSummary, StageCaller, committed_sinks, setup_stage
from blinkflow.runners.chains import METRICS_POLL_S, Chain, ChainRunner, StagePool

log = logging.getLogger(__name__)

#: how long the end of a run (an abort included) waits for a stage still in a call before leaving it behind
STOP_WAIT_S = 30.0


@register_runner("threaded")
class ThreadedRunner(ChainRunner):
    name = "threaded"

    def run(self) -> RunSummary:
        started = time.perf_counter()
        self._start_driver()
        self.next_poll = 0.0
        with committed_sinks(self.sinks):
            try:
                self._start_pools()
                self._sample_queues()
                setup_s = time.perf_counter() - started
                self.metrics.on_ready(True)
                self._pump()
                self.output.close()
                self._sample_queues()  # every chain is done: the gauges go back to zero
            finally:
                self.metrics.on_ready(False)
                self._stop_pools()
        self.accounting.check()
        copies = {pool.spec.name: [caller for caller, _ in pool.actors] for pool in self.pools}
        return RunSummary.of_run(self.name, self.accounting, self.output, started, setup_s,
                                 {name: (sum(c.seconds for c in callers), sum(c.frames for c in callers))
                                  for name, callers in copies.items()})

    def _start_pools(self) -> None:
        """Each stage's replicas, set up here one by one (a failing set-up leaves the earlier ones to tear down)."""
        for spec in self.specs:
            pool = StagePool(spec, [])
            self.pools.append(pool)
            for replica in range(getattr(spec.cfg, "replicas", 1)):
                caller = setup_stage(spec, self.metrics)
                pool.actors.append((caller, Lane(f"blinkflow-{spec.name}-{replica}")))
                attach_depth_parallel(spec, caller.stage, threaded=True)  # depth_parallel: K slice threads of its own

    def _stop_pools(self) -> None:
        """Calls not started are cancelled (those waiting on a cancelled one end with it) and each stage is torn
        down once its thread is done; a stage still in a call after STOP_WAIT_S (hung, on an abort) is left to
        end with the process, and said."""
        deadline = time.monotonic() + STOP_WAIT_S
        for pool in self.pools:
            for caller, lane in pool.actors:
                # past the deadline an idle lane still gets a moment to see its end (its thread wakes at once)
                if lane.close(max(0.2, deadline - time.monotonic())):
                    caller.stage.teardown()
                else:
                    log.error("stage %s is still in a call %.0f s after the run ended; it is left to end with the "
                              "process, not torn down", caller.name, STOP_WAIT_S)

    # ------------------------------------------------------------------ chains of thread calls

    def _send(self, chain: Chain, first_stage: int) -> None:
        upstream: Any = chain.frames if first_stage == 0 else chain.refs[first_stage - 1]
        del chain.refs[first_stage:]
        for pool in self.pools[first_stage:]:
            caller, lane = pool.pick(chain.shard)
            upstream = lane.submit(_stage_call, caller, chain.kind, upstream, chain.stream_id)
            chain.refs.append(upstream)
        if not self.pools:
            done: Future = Future()
            done.set_result(chain.frames)
            chain.refs.append(done)

    def _finished(self, refs: list[Any]) -> set[Any]:
        return {ref for ref in refs if ref.done()}

    def _collect(self, chain: Chain) -> list[Frame]:
        last = chain.refs[-1]
        while self.metrics is not NULL_RECORDER and not wait([last], timeout=METRICS_POLL_S).done:
            self._observe()  # a long chain must not freeze the queue gauges
        return last.result()  # a stage's end_stream or flush that raised fails the run, as in the local runner

    def _stage_workers(self) -> list[tuple[str, int]]:
        return [(pool.spec.name, len(pool.actors)) for pool in self.pools]

    def _observe(self) -> None:
        """With metrics on, every METRICS_POLL_S: sample the queues (stage calls report themselves)."""
        if self.metrics is NULL_RECORDER or time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + METRICS_POLL_S
        self._sample_queues()


def _stage_call(caller: StageCaller, kind: str, upstream: list[Frame] | Future, stream_id: str | None) -> list[Frame]:
    """One stage's part of a chain, in the stage's thread: it waits for the previous stage's part first."""
    frames = upstream.result() if isinstance(upstream, Future) else upstream
    if kind == "wave":
        return caller.process(frames)
    if kind == "end":
        return caller.process(frames) + caller.end_stream(stream_id)
    return caller.process(frames) + caller.flush()
