"""Depth-parallel execution on Ray: K actors, each owning one depth stage of a
model (and that stage's temporal state), with activations streamed between them.

:class:`DepthPipeline` takes a :class:`models.depth.SplitModel` and places one
:class:`SliceWorker` actor per stage (on its own GPU when ``num_gpus`` is set
and there are enough; CPU actors run ``threads`` torch threads each).

* **Clips** (``pipeline(batches)``, the clip models of the action stage):
  each batch is a chain of actor calls, each fed by the previous call's
  reference, all submitted at once (at most ``max_in_flight`` chains, K+1 by
  default), so batch i+1 enters stage 1 while batch i is in stage 2 and the
  data moves actor to actor. With ``transport="compiled"`` (``"auto"`` picks
  it when each actor has a GPU of its own) the chain is a Ray Compiled Graph whose edges
  use the accelerator tensor transport; on CPU the compiled graph's workers
  busy-poll their channels, which costs a core on a small machine, so plain
  calls are the CPU default. The outputs equal the monolithic model's (allclose).
* **Streams** (:meth:`DepthPipeline.stream`, the causal network frame by
  frame): the MPVN schedule of :class:`models.depth.DepthClock`. Each tick
  submits one call per updating stage, fed by the references the clock hands
  out (the previous tick's, when pipelined); the driver does not wait for a
  tick to finish before submitting the next (``pipelined``/``predictive``: up
  to K+1 ticks in flight, enough to keep all K stages busy), except in
  ``sequential`` mode, which waits for every frame's output (exact, lag 0, no
  overlap). Each worker keeps the temporal state of its own blocks per stream key.

Runner integration (kept out of the stages, which never import Ray): for a
stage config with ``depth_parallel: K > 1`` the Ray runner's stage actor calls
:func:`attach_depth_parallel` after set-up, which hands the stage a
:class:`RayDepthExecutorFactory` through the stage's ``set_model_executor``
hook; the stage then runs its model as a :class:`DepthPipeline` started from
inside its actor (the K slice actors share its lifetime). Each slice actor asks
for the stage's ``resources``. Under the local runner the stage runs the K
slices in sequence in-process (same results).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "plain", "compiled")
#: how long the K slice actors may take to be placed and set up before the start is given up
START_TIMEOUT_S = 120.0


class SliceWorker:
    """The body of one depth-stage actor (a plain class, so it runs without Ray too)."""

    def __init__(self, stage: Any, device: str = "cpu", threads: int | None = 1, precision: str = "fp32") -> None:
        import torch

        if threads is not None:  # an actor's own process; a thread of the driver's (None) leaves the process's
            torch.set_num_threads(max(1, int(threads)))
        self.device = torch.device(device)
        self.stage = stage.to(self.device).eval()
        self.precision = precision
        self.states: dict[str, list] = {}
        self.busy_s = 0.0
        self.calls = 0

    def ready(self) -> int:
        return os.getpid()

    def forward(self, x: Any) -> Any:
        """Clip mode: the stage on a whole batch from a zero past."""
        started = time.perf_counter()
        with self._context():
            y = self.stage(self._to_device(x))
        self._account(started)
        return y

    def tick(self, key: str, x: Any) -> tuple[Any, Any]:
        """Streaming: one step of stream ``key`` from this stage's state; returns (output, skip contribution)."""
        started = time.perf_counter()
        with self._context():
            y, self.states[key] = self.stage.stream(self._to_device(x), self.states.get(key))
            skip = self.stage.skip_out(y)
        self._account(started)
        return y, skip

    def _to_device(self, x: Any) -> Any:
        from blinkflow.models.depth import map_tensors

        return map_tensors(x, lambda t: t.to(self.device, non_blocking=True))

    def reset(self, key: str | None = None) -> None:
        if key is None:
            self.states.clear()
        else:
            self.states.pop(key, None)

    def stats(self) -> dict[str, float]:
        return {"busy_s": self.busy_s, "calls": self.calls}

    def reset_stats(self) -> None:
        self.busy_s, self.calls = 0.0, 0

    def _context(self) -> Any:
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.precision != "fp32" and self.device.type == "cuda":
            dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
            stack.enter_context(torch.autocast("cuda", dtype=dtype))
        return stack

    def _account(self, started: float) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        self.busy_s += time.perf_counter() - started
        self.calls += 1


@dataclass
class StreamReport:
    """What :meth:`DepthPipeline.stream` measured."""

    outputs: list[Any]  # models.depth.TickOutput per tick (seconds left empty)
    wall_s: float
    latency_s: list[float] = field(default_factory=list)  # per frame: arrival -> first output computed from it
    busy_s: list[float] = field(default_factory=list)  # per stage


class DepthPipeline:
    """K Ray actors, one per depth stage of ``split``; see the module docstring."""

    def __init__(
        self,
        split: Any,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        device: str | None = None,
        threads: int | None = None,
        precision: str = "fp32",
        transport: str = "auto",
        max_in_flight: int | None = None,
        resources: dict[str, float] | None = None,
    ) -> None:

        if transport not in TRANSPORTS:
            raise ValueError(f"transport {transport!r} is not one of {TRANSPORTS}")
        self.split = split
        self.finish = copy.deepcopy(split.finish).cpu()
        self.num_stages = split.num_stages
        self.max_in_flight = max_in_flight or self.num_stages + 1  # K keep every stage busy; one spare for jitter
        device = device or ("cuda" if num_gpus > 0 else "cpu")
        threads = threads or max(1, int(num_cpus))
        # the accelerator transport (NCCL) needs one GPU per actor: actors sharing a GPU use plain calls
        self.transport = ("compiled" if num_gpus >= 1 else "plain") if transport == "auto" else transport
        self._options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "resources": dict(resources or {}),
                         "max_restarts": 0, "max_task_retries": 0}
        self._worker_args = (device, threads, precision)
        self._compiled: Any = None
        self._ticks = 0
        self.actors: list[Any] = []
        self._start_actors()
        log.info("depth pipeline: %d stage actors (%s transport, device %s)", self.num_stages, self.transport, device)

    def _start_actors(self) -> None:
        import ray

        actor_cls = ray.remote(SliceWorker)
        self.actors = [actor_cls.options(**self._options).remote(copy.deepcopy(stage).cpu(), *self._worker_args)
                       for stage in self.split.stages]
        try:
            self._wait_ready()
        except BaseException:
            self.close()  # none of the K actors outlives a start that failed
            raise

    def _wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        import ray

        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            cpus, gpus = self._options["num_cpus"], self._options["num_gpus"]
            raise BlinkflowError(
                f"depth_parallel: could not start {self.num_stages} stage actors with num_cpus={cpus:g}, "
                f"num_gpus={gpus:g} each within {timeout_s:.0f}s; lower resources.num_cpus/num_gpus, "
                f"lower depth_parallel, or give Ray more (runtime.num_cpus)"
            ) from None

    def _restart(self, exc: BaseException) -> None:
        """A slice actor died (its node, the OOM killer): the K actors start afresh, as the Ray runner restarts a
        stage actor that dies. Clips carry no state between calls, so a retry gives the same outputs."""
        log.warning("depth pipeline: a stage actor died (%s); starting the %d stage actors again",
                    type(exc).__name__, self.num_stages)
        self.close()
        self._start_actors()

    # ------------------------------------------------------------------ clips

    def __call__(self, batches: Sequence[Any]) -> list[Any]:
        """The model's outputs for each batch (a list, in order), pipelined across the K actors. A dead actor
        restarts the K actors and the batches run once more (a second death in a row is raised)."""
        import ray

        try:
            return self._clips(batches)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            self._restart(exc)
        return self._clips(batches)

    def _clips(self, batches: Sequence[Any]) -> list[Any]:
        if self.transport == "compiled":
            return self._run_compiled(batches)
        import ray

        def send(batch: Any) -> Any:
            ref = batch
            for actor in self.actors:
                ref = actor.forward.remote(ref)
            return ref

        return pipelined(batches, send, lambda ref: self.finish(_to_cpu(ray.get(ref))), self.max_in_flight)

    def _run_compiled(self, batches: Sequence[Any]) -> list[Any]:
        if self._compiled is None:
            self._compiled = self._compile()
        pending: deque = deque()
        outputs = []
        for batch in batches:
            pending.append(self._compiled.execute(batch))
            if len(pending) >= self.max_in_flight:
                outputs.append(self.finish(_to_cpu(pending.popleft().get())))
        outputs.extend(self.finish(_to_cpu(ref.get())) for ref in pending)
        return outputs

    def _compile(self) -> Any:
        from ray.dag import InputNode

        with InputNode() as source:
            node = source
            for index, actor in enumerate(self.actors):
                node = actor.forward.bind(node)
                if index < len(self.actors) - 1 and self.transport == "compiled":
                    node = node.with_tensor_transport()
        return node.experimental_compile(_max_inflight_executions=self.max_in_flight)

    # ------------------------------------------------------------------ streams

    def stream(self, frames: Sequence[Any], mode: str = "pipelined", rates: Sequence[int] | None = None,
               key: str | None = None, drain: bool = True) -> StreamReport:
        """Run one stream through the MPVN schedule; the stages' state for it starts empty.

        ``drain`` adds the ticks without input that bring the last frames out.
        """
        import ray

        from blinkflow.models.depth import DepthClock

        if self._compiled is not None:
            raise RuntimeError("a compiled clip graph owns the actors; use a separate DepthPipeline for streams")
        key = key or f"stream-{self._ticks}"
        self._ticks += 1
        self.reset_stats()
        clock = DepthClock(self.num_stages, mode, rates)  # type: ignore[arg-type]
        window = 1 if mode == "sequential" else self.max_in_flight
        started = time.perf_counter()
        arrivals: list[float] = []
        pending: deque = deque()
        outputs: list[Any] = []
        latency: dict[int, float] = {}
        ticks = list(frames) + [None] * (clock.drain_ticks if drain else 0)
        for frame in ticks:
            arrivals.append(time.perf_counter())
            tick = clock.tick
            value = None if frame is None else self.split.prepare_frame(frame)
            last, previous = clock.advance(value, lambda k, x: self._submit_tick(k, key, x))
            pending.append((tick, last, previous))
            while len(pending) >= window:
                self._resolve(pending.popleft(), mode, outputs, arrivals, latency)
        while pending:
            self._resolve(pending.popleft(), mode, outputs, arrivals, latency)
        wall = time.perf_counter() - started
        ray.get([actor.reset.remote(key) for actor in self.actors])
        return StreamReport(outputs, wall, [latency[f] for f in sorted(latency)], self.busy_seconds())

    def _submit_tick(self, k: int, key: str, x: Any) -> tuple[Any, Any]:
        source = x[0] if isinstance(x, tuple) else x
        main, skip = self.actors[k].tick.options(num_returns=2).remote(key, source)
        return main, skip if self.split.stages[k].skip is not None else None

    def _resolve(self, entry: tuple, mode: str, outputs: list, arrivals: list[float], latency: dict[int, float]) -> None:
        import ray

        from blinkflow.models.depth import Slot, combine_tick

        tick, last, previous = entry
        fetched_last = None if last is None else Slot((ray.get(last.value[0]), None), last.frame, last.version)
        fetched_prev = [
            None if s is None or s.value[1] is None else Slot((None, ray.get(s.value[1])), s.frame, s.version)
            for s in previous
        ]
        now = time.perf_counter()
        output = combine_tick(self.finish, mode, tick, _cpu_slot(fetched_last), fetched_prev, [])
        outputs.append(output)
        if output.source_frame is not None and output.source_frame not in latency:
            latency[output.source_frame] = now - arrivals[output.source_frame]

    # ------------------------------------------------------------------ bookkeeping

    def busy_seconds(self) -> list[float]:
        import ray

        return [s["busy_s"] for s in ray.get([actor.stats.remote() for actor in self.actors])]

    def reset_stats(self) -> None:
        import ray

        ray.get([actor.reset_stats.remote() for actor in self.actors])

    def close(self) -> None:
        import ray

        if self._compiled is not None:
            try:
                self._compiled.teardown(kill_actors=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.debug("compiled graph teardown failed", exc_info=True)
            self._compiled = None
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []


class ThreadedDepthPipeline:
    """Depth-parallel in one process, without Ray: K threads, each owning one depth stage of ``split`` (a
    :class:`SliceWorker`), on ``devices`` (one each: its own GPU when there are K, else all on one). Clip
    batches are pipelined through them as through :class:`DepthPipeline`'s actors, batch i+1 in stage 1
    while batch i is in stage 2; the outputs equal the monolithic model's. The threaded runner's choice,
    and ``blinkflow bench gpu``'s on a GPU machine without Ray."""

    def __init__(self, split: Any, devices: Sequence[str], precision: str = "fp32",
                 max_in_flight: int | None = None) -> None:
        from blinkflow.lanes import Lane

        self.num_stages = split.num_stages
        self.workers = [SliceWorker(copy.deepcopy(stage), device, None, precision)
                        for stage, device in zip(split.stages, devices, strict=True)]
        self.finish = copy.deepcopy(split.finish).to(self.workers[-1].device).eval()
        self.max_in_flight = max_in_flight or self.num_stages + 1
        self.lanes = [Lane(f"blinkflow-depth-{k}") for k in range(self.num_stages)]
        log.info("depth pipeline: %d stage threads on %s", self.num_stages, ", ".join(devices))

    def __call__(self, batches: Sequence[Any]) -> list[Any]:
        """The model's outputs for each batch (a list, in order), pipelined across the K threads."""
        def send(batch: Any) -> Any:
            step: Any = batch
            for worker, lane in zip(self.workers, self.lanes):
                step = lane.submit(_forward_after, worker, step)
            return step

        return pipelined(batches, send, lambda step: self.finish(step.result()), self.max_in_flight)

    def busy_seconds(self) -> list[float]:
        return [worker.busy_s for worker in self.workers]

    def close(self, timeout_s: float = 30.0) -> None:
        for lane in self.lanes:
            lane.close(timeout_s)


def pipelined(batches: Sequence[Any], send: Any, receive: Any, max_in_flight: int) -> list[Any]:
    """Each batch ``send``-ed through the stages at once, at most ``max_in_flight`` outstanding, and the results
    ``receive``-d in order: batch i+1 enters stage 1 while batch i is in stage 2."""
    pending: deque = deque()
    outputs = []
    for batch in batches:
        pending.append(send(batch))
        if len(pending) >= max_in_flight:
            outputs.append(receive(pending.popleft()))
    outputs.extend(receive(handle) for handle in pending)
    return outputs


def _forward_after(worker: SliceWorker, previous: Any) -> Any:
    """One stage of one batch, in the stage's thread, once the stage before it has given its output."""
    from concurrent.futures import Future

    return worker.forward(previous.result() if isinstance(previous, Future) else previous)


def depth_devices(device: str, k: int) -> list[str]:
    """The K stages' devices: one GPU each when ``device`` is CUDA and there are K, else all on ``device``."""
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() >= k:
        return [f"cuda:{i}" for i in range(k)]
    return [device] * k


@dataclass
class ThreadedDepthExecutorFactory:
    """Turns a stage's model into a :class:`ThreadedDepthPipeline` (the threaded runner's depth_parallel)."""

    device: str = "cpu"
    precision: str = "fp32"

    def __call__(self, model: Any, k: int, example_input: Any) -> ThreadedDepthPipeline:
        from blinkflow.models.depth import split_model

        split = split_model(model, k, example_input=example_input)
        return ThreadedDepthPipeline(split, depth_devices(self.device, k), precision=self.precision)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    return value.cpu() if hasattr(value, "cpu") else value


def _cpu_slot(slot: Any) -> Any:
    if slot is None:
        return None
    from blinkflow.models.depth import Slot

    return Slot((_to_cpu(slot.value[0]), None), slot.frame, slot.version)


# ---------------------------------------------------------------------- runner integration


@dataclass
class RayDepthExecutorFactory:
    """Picklable: turns a stage's model into a :class:`DepthPipeline` inside the stage's actor."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    transport: str = "auto"

    def __call__(self, model: Any, k: int, example_input: Any) -> DepthPipeline:
        from blinkflow.models.depth import split_model

        split = split_model(model, k, example_input=example_input)
        return DepthPipeline(
            split, num_cpus=self.num_cpus, num_gpus=self.num_gpus, resources=self.resources,
            precision=self.precision, transport=self.transport,
        )


def depth_parallel_of(spec: Any) -> int:
    """The stage's ``depth_parallel`` (1 for stages without the field)."""
    return int(getattr(spec.cfg, "depth_parallel", 1) or 1)


def attach_depth_parallel(spec: Any, stage: Any, threaded: bool = False) -> None:
    """Called after set-up by the Ray runner's stage actor (K slice actors) or by the threaded runner (K slice
    threads, ``threaded``): give a depth-parallel stage its executor."""
    if depth_parallel_of(spec) <= 1:
        return
    if not hasattr(stage, "set_model_executor"):
        log.warning("stages.%s: depth_parallel is set but the stage cannot use it; running it whole", spec.name)
        return
    if threaded:
        stage.set_model_executor(ThreadedDepthExecutorFactory(device=str(getattr(stage, "_device", spec.device)),
                                                              precision=getattr(spec.cfg, "precision", "fp32")))
        return
    resources = getattr(spec.cfg, "resources", None)
    stage.set_model_executor(RayDepthExecutorFactory(
        num_cpus=resources.num_cpus if resources else 1.0,
        num_gpus=resources.num_gpus if resources else 0.0,
        resources=dict(resources.custom) if resources else {},
        precision=getattr(spec.cfg, "precision", "fp32"),
    ))
