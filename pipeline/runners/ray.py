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
* Depth parallelism: a stage with ``depth_parallel: K > 1`` gets, inside its
  actor, K slice actors holding one depth stage of its model each
  (:mod:`pipeline.depth_parallel`); the stage itself never imports Ray.
* Metrics: actors buffer their stage calls in a :class:`CallLog`; the driver
  drains every actor about twice a second (an actor call queued behind its
  work, collected without blocking) and folds the calls into its recorder with
  :class:`ActorStats`, which counts restarts and keeps totals monotonic.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from blinkflow.config import Config
from blinkflow.depth_parallel import attach_depth_parallel, depth_parallel_of
from blinkflow.errors import (
    BlinkflowError,
    ConfigError,
    StageError,
    StageSetupFailed,
    first_line,
)
from blinkflow.frame import Frame
from blinkflow.graph import StageSpec
from blinkflow.metrics import NULL_RECORDER, ActorStats, CallLog
from blinkflow.ray_session import ray_session
from blinkflow.registry import register_runner
from blinkflow.runners.base import RunSummary, committed_sinks, setup_stage
from blinkflow.runners.chains import METRICS_POLL_S, Chain, ChainRunner, StagePool

log = logging.getLogger(__name__)

RESTART_WAIT_S = 120.0  # how long a retry waits for Ray to restart a dead stage actor
TEARDOWN_WAIT_S = 30.0  # how long the stage actors may take to tear down after a clean end, all together


class StageActorImpl:
    """The body of the generic stage actor (a plain class so it is testable without Ray)."""

    def __init__(self, spec: StageSpec) -> None:
        self.spec = spec
        self.setup_error: BaseException | None = None
        self.call_log = CallLog()
        try:
            resources = getattr(spec.cfg, "resources", None)
            _limit_threads(getattr(resources, "num_cpus", 1.0))
            _only_granted_gpus(getattr(resources, "num_gpus", 0.0))
            self.caller = setup_stage(spec, self.call_log)
            attach_depth_parallel(spec, self.caller.stage)  # depth_parallel > 1: K slice actors of its own
        except BaseException as exc:  # noqa: BLE001 - reported to the driver by ready()
            self.setup_error = exc

    def ready(self) -> str:
        """This incarnation's id (a restarted actor has a new one), once set up; else its set-up error."""
        if self.setup_error is not None:
            raise self.setup_error
        return self.call_log.incarnation

    def _raise_setup_error(self) -> None:
        if self.setup_error is not None:  # a restarted incarnation whose set-up failed (its node lacks the weights)
            raise StageSetupFailed(f"set-up failed after its actor restarted: {first_line(self.setup_error)}")

    def process(self, frames: list[Frame]) -> list[Frame]:
        self._raise_setup_error()
        return self.caller.process(frames)

    def end_stream(self, frames: list[Frame], stream_id: str) -> list[Frame]:
        self._raise_setup_error()
        return self.caller.process(frames) + self.caller.end_stream(stream_id)

    def flush(self, frames: list[Frame]) -> list[Frame]:
        self._raise_setup_error()
        return self.caller.process(frames) + self.caller.flush()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def stats(self) -> dict[str, float]:
        return {"seconds": self.caller.seconds, "frames": self.caller.frames, "errors": self.caller.errors}

    def drain_metrics(self) -> dict[str, Any]:
        caller = getattr(self, "caller", None)  # none when the set-up failed: nothing done, nothing to report
        totals = {"seconds": caller.seconds, "frames": caller.frames, "calls": caller.calls,
                  "errors": caller.errors} if caller is not None else {}
        return self.call_log.drain(totals, process=self.spec.name)

    def teardown(self) -> None:
        if getattr(self, "caller", None) is not None:
            self.caller.stage.teardown()


def _only_granted_gpus(num_gpus: float) -> None:
    """An actor that asked Ray for no GPU sees none (Ray leaves CUDA_VISIBLE_DEVICES unset then): ``device:
    auto`` means the CPU there, not GPU 0 shared unreserved by every such actor."""
    if not num_gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _limit_threads(num_cpus: float) -> None:
    """Keep each actor's torch thread pool to the CPUs it reserved, so actors don't thrash."""
    try:
        import torch

        torch.set_num_threads(max(1, int(num_cpus)))
    except ImportError:  # pragma: no cover - stages without torch
        pass


@register_runner("ray")
class RayRunner(ChainRunner):
    name = "ray"

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> RunSummary:
        started = time.perf_counter()
        self._start_driver()
        self.actor_stats = ActorStats(self.metrics)
        self.setup_failed: set[str] = set()  # stages whose restarted actor could not set up (logged once)
        self.drains: dict[tuple[int, int], Any] = {}
        self.next_poll = 0.0
        with committed_sinks(self.sinks), ray_session(*ray_cluster(self.cfg, self.specs)):
            ended = False
            try:
                self.pools = self._start_pools()
                setup_s = time.perf_counter() - started
                self.metrics.on_ready(True)
                self._pump()
                self.output.close()
                stats = self._collect_stats()
                ended = True
            finally:
                self.metrics.on_ready(False)
                self._stop_pools(graceful=ended)
        self.accounting.check()
        return RunSummary.of_run(self.name, self.accounting, self.output, started, setup_s,
                                 {name: (v["seconds"], v["frames"]) for name, v in stats.items()})

    def _start_pools(self) -> list[StagePool]:
        import ray

        check_room_for_actors(self.cfg, self.specs, ray.cluster_resources())
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
        self.pools = pools  # stopped (killed) on the way out even if one never gets ready
        self._wait_ready(pools)
        return pools

    def _wait_ready(self, pools: list[StagePool]) -> None:
        import ray

        for pool in pools:
            try:
                incarnations = ray.get([actor.ready.remote() for actor in pool.actors])
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if hasattr(exc, "cause") else None
                if isinstance(cause, BlinkflowError):
                    raise cause from None
                raise StageError(f"stages.{pool.spec.name}: setup failed in its actor: {cause or exc}") from None
            for replica, incarnation in enumerate(incarnations):  # a restart before the first drain still counts
                self.actor_stats.started(pool.spec.name, replica, incarnation)

    def _stop_pools(self, graceful: bool = True) -> None:
        """After a clean end, every actor tears its stage down (one shared deadline), then all are killed; after
        an error or a second Ctrl-C they are killed at once (a teardown queues behind the calls in flight)."""
        import ray

        actors = [actor for pool in self.pools for actor in pool.actors]
        if graceful and actors:
            teardowns = [actor.teardown.remote() for actor in actors]
            with contextlib.suppress(Exception):  # best effort on the way out
                ray.wait(teardowns, num_returns=len(teardowns), timeout=TEARDOWN_WAIT_S)
        for actor in actors:
            with contextlib.suppress(Exception):
                ray.kill(actor)

    def _collect_stats(self) -> dict[str, dict[str, float]]:
        """A last drain of every actor: per-stage totals, including work done before a restart."""
        self._collect_drains(timeout=30.0)
        self._request_drains()
        self._collect_drains(timeout=30.0)
        if self.metrics is not NULL_RECORDER:
            self._sample_queues()  # every chain is done: the gauges go back to zero
        return {pool.spec.name: self.actor_stats.totals.get(pool.spec.name, {"seconds": 0.0, "frames": 0})
                for pool in self.pools}

    # ------------------------------------------------------------------ metrics

    def _observe(self) -> None:
        """Every METRICS_POLL_S: fold in actor stats (metrics on or off: the run summary's per-stage totals keep
        what an actor did before it died) and, with metrics on, sample the queues."""
        if time.monotonic() < self.next_poll:
            return
        self.next_poll = time.monotonic() + METRICS_POLL_S
        self._collect_drains(timeout=0.0)
        self._request_drains()
        if self.metrics is not NULL_RECORDER:
            self._sample_queues()

    def _request_drains(self) -> None:
        """One outstanding drain per actor; Ray runs it after the calls queued before it."""
        for stage_index, pool in enumerate(self.pools):
            for replica, actor in enumerate(pool.actors):
                if (stage_index, replica) not in self.drains:
                    self.drains[(stage_index, replica)] = actor.drain_metrics.remote()

    def _collect_drains(self, timeout: float) -> None:
        import ray

        if not self.drains:
            return
        refs = list(self.drains.values())
        ready = set(ray.wait(refs, num_returns=len(refs), timeout=timeout)[0])
        for (stage_index, replica), ref in list(self.drains.items()):
            if ref not in ready:
                continue
            del self.drains[(stage_index, replica)]
            try:
                snapshot = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError):
                continue  # the actor died (or came back unable to set up); a live incarnation reports next time
            self.actor_stats.absorb(self.pools[stage_index].spec.name, replica, snapshot)

    # ------------------------------------------------------------------ chains of actor calls

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

    def _finished(self, refs: list[Any]) -> set[Any]:
        import ray

        return set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])

    def _stage_workers(self) -> list[tuple[str, int]]:
        return [(pool.spec.name, len(pool.actors)) for pool in self.pools]

    def _collect(self, chain: Chain) -> list[Frame]:
        import ray

        while self.metrics is not NULL_RECORDER and not ray.wait(chain.refs[-1:], timeout=METRICS_POLL_S)[0]:
            self._observe()  # a long chain must not freeze the metrics
        try:
            return ray.get(chain.refs[-1])
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            return self._recover(chain, exc)
        except ray.exceptions.RayTaskError as exc:
            return self._fail_chain(chain, _setup_failure(exc))

    def _recover(self, chain: Chain, error: BaseException) -> list[Frame]:
        """Resubmit once from the first stage whose actor died; then fail the chain's frames."""
        import ray

        failed_stage = self._first_failed_stage(chain)
        stage_name = self.pools[failed_stage].spec.name
        if not chain.retried:
            chain.retried = True
            log.warning("stage %s actor died (%s); retrying its in-flight frames once", stage_name, type(error).__name__)
            self._await_restart(chain.actors[failed_stage], stage_name)
            self._send(chain, failed_stage)
            try:
                return ray.get(chain.refs[-1])
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as again:
                error = again
            except ray.exceptions.RayTaskError as exc:
                return self._fail_chain(chain, _setup_failure(exc))
        for frame in chain.frames:
            frame.fail(stage_name, f"actor died twice: {type(error).__name__}")
        return chain.frames

    def _fail_chain(self, chain: Chain, error: StageSetupFailed) -> list[Frame]:
        """Every frame of the chain failed by the stage whose actor came back from a restart but could not set
        its stage up: one line naming the stage (logged once), not a traceback that ends the run."""
        stage_name = self.pools[self._first_failed_stage(chain)].spec.name
        if stage_name not in self.setup_failed:
            self.setup_failed.add(stage_name)
            log.error("stages.%s: %s; its frames fail from now on", stage_name, error)
        for frame in chain.frames:
            frame.fail(stage_name, str(error))
        return chain.frames

    @staticmethod
    def _await_restart(actor: Any, stage_name: str) -> None:
        """Wait until Ray has restarted ``actor`` (it answers ``ready``), so the one retry is
        not spent on an actor that is still coming back; give up after ``RESTART_WAIT_S``."""
        import ray

        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            try:
                ray.get(actor.ready.remote(), timeout=max(0.1, deadline - time.monotonic()))
                return
            except ray.exceptions.RayTaskError:
                return  # it is back but its set-up failed: the retry records that error on the frames
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError):
                time.sleep(0.2)
        # every later call to it would wait as long (Ray keeps it pending until a node has its resources)
        raise BlinkflowError(f"stages.{stage_name}: its actor died and did not come back within {RESTART_WAIT_S:.0f} s "
                             "(its node left the cluster, or no node left has the stage's resources); the run stops. "
                             "Give the cluster room for it and run again")

    def _first_failed_stage(self, chain: Chain) -> int:
        import ray

        for index, ref in enumerate(chain.refs):
            try:
                ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError):
                return index
        return len(chain.refs) - 1


def _setup_failure(error: Any) -> StageSetupFailed:
    """The set-up failure a call raised in its actor; any other error of a call (a stage's end_stream or flush
    raising) is raised as it is, as the local runner raises it."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, StageSetupFailed):
        return cause
    if isinstance(cause, BlinkflowError):  # its one line, not Ray's wrapper (colour codes, pid, actor id)
        raise cause from None
    raise error


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def ray_cluster(cfg: Config, specs: list[StageSpec]) -> tuple[str | None, float | None]:
    """(address, CPUs) for ``ray_session``: the configured cluster, or a local one sized for the stage actors."""
    if cfg.runtime.address:
        return cfg.runtime.address, None
    return None, cfg.runtime.num_cpus or max(os.cpu_count() or 1, int(_actor_needs(specs)["CPU"] + 0.999))


def _actor_needs(specs: list[StageSpec]) -> dict[str, float]:
    """CPUs, GPUs and custom resources the stage actors reserve together (a depth-parallel stage adds its slice
    actors)."""
    needs = {"CPU": 0.0, "GPU": 0.0}
    for _name, copies, cpus, gpus, custom in _actors(specs):
        needs["CPU"] += cpus * copies
        needs["GPU"] += gpus * copies
        for kind, amount in custom.items():
            needs[kind] = needs.get(kind, 0.0) + amount * copies
    return needs


def _actors(specs: list[StageSpec]) -> list[tuple[str, int, float, float, dict[str, float]]]:
    """(stage, actors, CPUs, GPUs and custom resources per actor) of each stage."""
    rows = []
    for spec in specs:
        resources = getattr(spec.cfg, "resources", None)
        copies = getattr(spec.cfg, "replicas", 1) * (1 + (depth_parallel_of(spec) if depth_parallel_of(spec) > 1 else 0))
        rows.append((spec.name, copies, resources.num_cpus if resources else 1.0,
                     resources.num_gpus if resources else 0.0, dict(resources.custom) if resources else {}))
    return rows


def check_room_for_actors(cfg: Config, specs: list[StageSpec], cluster: dict[str, float]) -> None:
    """Ray waits forever for room to place an actor; a local instance too small for the stage actors is a
    config mistake, said at once in one line. A remote cluster may grow (an autoscaler), so only a warning."""
    short = {kind: (need, cluster.get(kind, 0.0)) for kind, need in _actor_needs(specs).items()
             if need > cluster.get(kind, 0.0) + 1e-9}
    if not short:
        return
    said = ", ".join(f"{need:g} {kind}s but the cluster has {have:g}" if kind in ("CPU", "GPU")
                     else f"{need:g} of the custom resource {kind!r} but the cluster has {have:g}"
                     for kind, (need, have) in short.items())
    stages = ", ".join(f"{name} {copies} x {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
                       + "".join(f" + {amount:g} {kind}" for kind, amount in custom.items())
                       for name, copies, cpus, gpus, custom in _actors(specs))
    if cfg.runtime.address:
        log.warning("the stage actors reserve %s; they wait until the cluster has room (%s)", said, stages)
        return
    if "CPU" in short:
        fix = "raise runtime.num_cpus"
    elif "GPU" in short:
        fix = "run on a machine with GPUs or set resources.num_gpus: 0"
    else:  # a local instance has no custom resources: they name nodes of a cluster
        fix = "drop resources.custom (it places stages on the nodes of a cluster: set runtime.address)"
    raise ConfigError(f"runtime: the stage actors reserve {said} ({stages}), so Ray would wait forever to place "
                      f"them; {fix}, or lower the stages' replicas or resources")
