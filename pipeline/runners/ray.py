"""The Ray runner: the same graph as the local runner, each stage in actors.

Design (see docs/design.md):

* One generic :class:`StageActor` wraps any registered stage; ``setup()`` runs
  inside the actor (and again after a restart). Each stage asks for its own
  ``num_cpus``/``num_gpus`` and runs ``replicas`` copies.
* The driver decodes (threaded PyAV) and cuts the frames into *waves* exactly
  as the local runner does. A wave is submitted as a chain of actor calls, each
  taking the previous call's ObjectRef, so wave i+1 enters stage 1 while wave i
  is in stage 2 and data moves actor to actor through the object store.
* Stream affinity: streams are hashed to *shards*; waves never mix shards, and
  a temporal stage's replica is chosen by shard, so a stream always meets the
  same replica, and Ray runs one caller's calls to an actor in submission order.
  With one replica per temporal stage there is one shard and waves are cut the
  same way as in the local runner, so outputs are identical.
* Backpressure: at most ``runtime.max_in_flight`` chains are outstanding. In
  archive mode the driver then blocks (and decoding with it); in live mode it
  drops the oldest frames waiting for a wave, counting them as ``dropped``.
* Faults: actors restart (``max_restarts=-1``). A chain whose actor died is
  resubmitted once from the failed stage, with that stage's input still in the
  object store; frames that still fail are ``failed`` with the error recorded.
  A ledger of every decoded frame makes sure none vanish: a frame a restarted
  actor was holding comes out ``failed`` when its stream ends.
"""

from __future__ import annotations

import logging
import os
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.config import Config
from pipeline.errors import BlinkflowError, StageError
from pipeline.frame import Accounting, Frame, FrameResult, Outcome
from pipeline.graph import StageSpec, build_graph
from pipeline.runners.base import OrderedOutput, RunSummary, setup_stage
from pipeline.sources import StreamEnd, open_sources

log = logging.getLogger(__name__)


class StageActorImpl:
    """The body of the generic stage actor (a plain class so it is testable without Ray)."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.setup_error: BaseException | None = None
        try:
            _limit_threads(getattr(getattr(spec.cfg, "resources", None), "num_cpus", 1.0))
            self.caller = setup_stage(spec)
        except BaseException as exc:  # noqa: BLE001 - reported to the driver by ready()
            self.setup_error = exc

    def ready(self) -> int:
        if self.setup_error is not None:
            raise self.setup_error
        return os.getpid()

    def process(self, frames: list[Frame]) -> list[Frame]:
        return self.caller.process(frames)

    def end_stream(self, frames: list[Frame], stream_id: str) -> list[Frame]:
        return self.caller.process(frames) + self.caller.end_stream(stream_id)

    def flush(self, frames: list[Frame]) -> list[Frame]:
        return self.caller.process(frames) + self.caller.flush()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, float]:
        return {"seconds": self.caller.seconds, "frames": self.caller.frames, "errors": self.caller.errors}

    def teardown(self) -> None:
        self.caller.stage.teardown()


def _limit_threads(num_cpus: float) -> None:
    """Keep each actor's torch thread pool to the CPUs it reserved, so actors don't thrash."""
    try:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
    except ImportError:  # pragma: no cover - stages without torch
        pass


@dataclass
class StagePool:
    """The replicas of one stage and how calls are routed to them."""

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
    refs: list[Any] = field(default_factory=list)
    actors: list[Any] = field(default_factory=list)
    retried: bool = False


class RayRunner:
    name = "ray"

    def __init__(self, cfg: Config, sinks: list[Any] | None = None, on_result: Callable[[FrameResult], None] | None = None):
        self.cfg = cfg
        self.sinks = sinks or []
        self.on_result = on_result
        self.specs = build_graph(cfg)
        self.pools: list[StagePool] = []
        self.shards = max([s.cfg.replicas for s in self.specs if s.temporal and hasattr(s.cfg, "replicas")] or [1])
        self.wave_size = max([spec.batch for spec in self.specs] or [1])
        self.max_wait_ms = min([getattr(spec.cfg, "max_wait_ms", 20.0) for spec in self.specs] or [20.0])

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> RunSummary:
        started = time.perf_counter()
        self.accounting = Accounting()
        self.output = OrderedOutput(self.sinks, self.accounting, self.on_result)
        self.ledger: dict[str, set[int]] = {}
        self.chains: deque[Chain] = deque()
        owns_ray = _init_ray(self.cfg, self.specs)
        try:
            self.pools = self._start_pools()
            setup_s = time.perf_counter() - started
            self._pump()
            self.output.close()
            stats = self._collect_stats()
        except BaseException:
            for sink in self.sinks:
                sink.abort()
            raise
        finally:
            self._stop_pools()
            if owns_ray:
                import ray

                ray.shutdown()
        for sink in self.sinks:
            sink.close()
        self.accounting.check()
        return RunSummary(
            accounting=self.accounting,
            elapsed_s=time.perf_counter() - started,
            stage_seconds={k: v["seconds"] for k, v in stats.items()},
            stage_frames={k: int(v["frames"]) for k, v in stats.items()},
            runner=self.name,
            setup_s=setup_s,
        )

    def _start_pools(self) -> list[StagePool]:
        import ray

        actor_cls = ray.remote(StageActorImpl)
        pools = []
        for spec in self.specs:
            resources = getattr(spec.cfg, "resources", None)
            replicas = getattr(spec.cfg, "replicas", 1)
            options = {
                "num_cpus": resources.num_cpus if resources else 1.0,
                "num_gpus": resources.num_gpus if resources else 0.0,
                "resources": dict(resources.custom) if resources else {},
                "max_restarts": -1,
                "max_task_retries": 0,
                "name": None,
            }
            actors = [actor_cls.options(**options).remote(spec) for _ in range(replicas)]
            pools.append(StagePool(spec, actors))
        self._wait_ready(pools)
        return pools

    @staticmethod
    def _wait_ready(pools: list[StagePool]) -> None:
        import ray

        for pool in pools:
            try:
                ray.get([actor.ready.remote() for actor in pool.actors])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if hasattr(exc, "cause") else None
                if isinstance(cause, BlinkflowError):
                    raise cause from None
                raise StageError(f"stages.{pool.spec.name}: setup failed in its actor: {cause or exc}") from None

    def _stop_pools(self) -> None:
        import ray

        for pool in self.pools:
            for actor in pool.actors:
                try:
                    ray.get(actor.teardown.remote(), timeout=30)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
                ray.kill(actor)

    def _collect_stats(self) -> dict[str, dict[str, float]]:
        import ray

        stats: dict[str, dict[str, float]] = {}
        for pool in self.pools:
            per_actor = ray.get([actor.stats.remote() for actor in pool.actors])
            stats[pool.spec.name] = {k: sum(s[k] for s in per_actor) for k in ("seconds", "frames", "errors")}
        return stats

    # ------------------------------------------------------------------ the driver loop

    def _pump(self) -> None:
        pending: dict[int, list[Frame]] = {}
        live = self.cfg.runtime.mode == "live"
        for item in open_sources(self.cfg.sources):
            if isinstance(item, StreamEnd):
                shard = self._shard(item.stream_id)
                self._submit_wave(pending.pop(shard, []), shard)
                self._submit(Chain("end", shard, stream_id=item.stream_id))
                if item.error:
                    self.accounting.source_errors.append(item.error)
                continue
            self.accounting.on_decoded(item)
            self.ledger.setdefault(item.stream_id, set()).add(item.index)
            shard = self._shard(item.stream_id)
            pending.setdefault(shard, []).append(item)
            if live:
                pending[shard] = self._admit_live(pending[shard], shard)
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

    def _admit_live(self, waiting: list[Frame], shard: int) -> list[Frame]:
        """Live mode: submit while there is room; otherwise keep only the newest frames waiting.

        The waiting list never exceeds one wave, so memory and latency stay
        bounded whatever the input rate; each frame pushed out is ``dropped``.
        """
        self._consume_ready()
        oldest_wait_ms = (time.time() - waiting[0].decoded_at) * 1000.0 if waiting else 0.0
        full = len(waiting) >= self.wave_size or oldest_wait_ms >= self.max_wait_ms
        if full and len(self.chains) < self.cfg.runtime.max_in_flight:
            self._submit_wave(waiting[: self.wave_size], shard)
            waiting = waiting[self.wave_size :]
        while len(waiting) > self.wave_size:
            self._emit_dropped(waiting.pop(0))
        return waiting

    def _consume_ready(self) -> None:
        import ray

        while self.chains:
            ready, _ = ray.wait([self.chains[0].refs[-1]], timeout=0)
            if not ready:
                return
            self._consume(self.chains.popleft())

    def _emit_dropped(self, frame: Frame) -> None:
        frame.outcome = Outcome.DROPPED
        self.ledger[frame.stream_id].discard(frame.index)
        self.output.push([frame])

    def _submit_wave(self, frames: list[Frame], shard: int) -> None:
        if frames:
            self._submit(Chain("wave", shard, frames=frames))

    def _submit(self, chain: Chain) -> None:
        while len(self.chains) >= self.cfg.runtime.max_in_flight:
            self._consume(self.chains.popleft())
        self._send(chain, 0)
        self.chains.append(chain)

    def _send(self, chain: Chain, first_stage: int) -> None:
        """Submit the chain's calls from ``first_stage`` on, each fed by the previous ref."""
        upstream: Any = chain.frames if first_stage == 0 else chain.refs[first_stage - 1]
        del chain.refs[first_stage:], chain.actors[first_stage:]
        for pool in self.pools[first_stage:]:
            actor = pool.pick(chain.shard)
            if chain.kind == "wave":
                ref = actor.process.remote(upstream)
            elif chain.kind == "end":
                ref = actor.end_stream.remote(upstream, chain.stream_id)
            else:
                ref = actor.flush.remote(upstream)
            chain.refs.append(ref)
            chain.actors.append(actor)
            upstream = ref
        if not self.pools:
            chain.refs.append(_put(chain.frames))

    # ------------------------------------------------------------------ results

    def _consume(self, chain: Chain) -> None:
        import ray

        try:
            frames = ray.get(chain.refs[-1])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            frames = self._recover(chain, exc)
        self._deliver(frames)
        if chain.kind == "end":
            self._close_stream(chain.stream_id)
        elif chain.kind == "flush":
            for stream_id in [s for s in self.ledger if self._shard(s) == chain.shard]:
                self._close_stream(stream_id)

    def _recover(self, chain: Chain, error: BaseException) -> list[Frame]:
        """Resubmit once from the first stage whose actor died; then fail the chain's frames."""
        import ray

        failed_stage = self._first_failed_stage(chain)
        stage_name = self.pools[failed_stage].spec.name
        if not chain.retried:
            chain.retried = True
            log.warning("stage %s actor died (%s); retrying its in-flight frames once", stage_name, type(error).__name__)
            self._send(chain, failed_stage)
            try:
                return ray.get(chain.refs[-1])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as again:
                error = again
        for frame in chain.frames:
            frame.fail(stage_name, f"actor died twice: {type(error).__name__}")
        return chain.frames

    def _first_failed_stage(self, chain: Chain) -> int:
        import ray

        for index, ref in enumerate(chain.refs):
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                return index
        return len(chain.refs) - 1

    def _deliver(self, frames: list[Frame]) -> None:
        for frame in frames:
            self.ledger.get(frame.stream_id, set()).discard(frame.index)
        self.output.push(frames)

    def _close_stream(self, stream_id: str) -> None:
        """Anything of this stream still in the ledger was lost inside a restarted actor."""
        lost = sorted(self.ledger.pop(stream_id, set()))
        if lost:
            log.error("stream %s: %d frames were lost in a restarted actor; marking them failed", stream_id, len(lost))
        self.output.push([_lost_frame(stream_id, index) for index in lost])
        self.output.end_stream(stream_id)


def _lost_frame(stream_id: str, index: int) -> Frame:
    import numpy as np

    frame = Frame(stream_id=stream_id, index=index, pts=float("nan"), image=np.zeros((1, 1, 3), dtype=np.uint8))
    frame.fail("runtime", "lost: the stage actor holding it restarted")
    return frame


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def _init_ray(cfg: Config, specs: list[StageSpec]) -> bool:
    """Connect to ``runtime.address`` or start a local instance; return True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.runtime.address:
        try:
            ray.init(address=cfg.runtime.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BlinkflowError(
                f"runtime.address: cannot connect to the Ray cluster at {cfg.runtime.address!r} ({exc}); "
                "check it is running (`ray status`) or remove runtime.address to start a local one"
            ) from None
        return True
    wanted = sum(getattr(getattr(s.cfg, "resources", None), "num_cpus", 1.0) * getattr(s.cfg, "replicas", 1) for s in specs)
    num_cpus = cfg.runtime.num_cpus or max(os.cpu_count() or 1, int(wanted + 0.999))
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    return True
