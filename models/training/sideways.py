"""Sideways training (Malinowski et al., CVPR 2020) of the streaming causal network.

The network (``causal3d_small``) is split by depth into K stages
(:func:`models.depth.split_model`). A clip is fed one frame per *tick*; at
every tick every stage, without waiting for the others:

* runs **forward** on the newest activation it has: the frame (stage 0) or
  what stage k-1 produced at the previous tick (the pipelined MPVN schedule);
* runs **backward** on the newest gradient it has: the one stage k+1 sent at
  the previous tick, applied through the stage's *current* forward graph. That
  gradient belongs to an output of an earlier frame, so the parameter gradient
  is approximate; it works because consecutive frames are similar;
* the last stage computes the loss of its fresh logits against the clip label
  and starts the gradient down at once.

Temporal buffers carry the past forward but are detached (no backprop through
time), parameter gradients accumulate over the clip's ticks and each stage's
optimiser steps once per clip batch (one *step*). The pipeline fills and
empties with each clip: the top sees T-(K-1) frames of a T-frame clip, and
stage 0 gets gradients from tick 2(K-1) on; gradients still in flight when the
clip ends are dropped.

**Baseline** ("ordinary backprop"): the same network, initialisation, data,
optimiser and objective (cross-entropy of every time step's logits against the
clip label), trained in clip mode with exact gradients (through time too).
Every method's epoch e re-seeds the shuffle and torch's RNG (Ray actors'
too) from (seed, e) as ``blinkflow train`` does, so all of them see the same
batches, flips included, in the same order.

Executors: ``local`` runs the K stage workers one after another in this
process (the algorithm exactly, no parallel speed-up); ``ray`` puts each stage
worker in its own Ray actor (one CPU thread each), so the K stages of a tick
run at the same time and the driver never waits for a tick to end.

Entry points: ``blinkflow train action --sideways --config configs/train/smoke-action.yaml``,
or ``python -m blinkflow.models.training.sideways [--config ...]`` (default: the shipped smoke-action.yaml).
Both go through :func:`compare`, which refuses settings Sideways would ignore.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from blinkflow.errors import BlinkflowError, ConfigError
from blinkflow.files import atomic_path, write_atomic
from blinkflow.models.training.config import TrainConfig
from blinkflow.schema import whole_number

log = logging.getLogger(__name__)


class SidewaysWorker:
    """One depth stage's per-tick work and its own optimiser (a plain class; Ray wraps it as an actor)."""

    def __init__(self, stage: nn.Module, finish: nn.Module | None, optim: Any, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.stage = stage.train()
        self.finish = finish  # the last stage's LastStep; None elsewhere
        params = [p for p in stage.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)
        self.state: list | None = None
        self.busy_s = 0.0

    def reset(self) -> None:
        """A new clip: empty temporal buffers."""
        self.state = None

    def tick(self, x: torch.Tensor | None, grad: torch.Tensor | None, labels: torch.Tensor | None,
             loss_scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
        """Forward ``x``; backward ``grad`` (or the loss, at the top) through this forward; return
        (output for the stage above, gradient for the stage below, loss)."""
        if x is None:
            return None, None, None
        from blinkflow.models.depth import map_tensors

        started = time.perf_counter()
        x = map_tensors(x, lambda t: t.detach().requires_grad_(self.stage.index > 0))
        y, state = self.stage.stream(x, self.state)
        self.state = [b.detach() if b is not None else None for b in state]
        loss_value = None
        if self.finish is not None:
            loss = F.cross_entropy(self.finish(y), labels)
            (loss * loss_scale).backward()
            loss_value = float(loss.detach())
        elif grad is not None:
            torch.autograd.backward(_tensors(y), _tensors(grad))
        down = _input_grad(x) if self.stage.index > 0 else None
        self.busy_s += time.perf_counter() - started
        return map_tensors(y, torch.Tensor.detach), down, loss_value

    def seed(self, seed: int) -> None:
        """Re-seed this process's torch RNG (dropout): an actor's would otherwise differ from the driver's."""
        torch.manual_seed(seed)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.stage.state_dict().items()}

    def busy(self) -> float:
        return self.busy_s


def _tensors(value: Any) -> list[torch.Tensor]:
    """A stage boundary's tensors: one, or a half causal block's (features, block input) pair."""
    return list(value) if isinstance(value, tuple) else [value]


def _input_grad(x: Any) -> Any:
    """The gradient to send down, shaped like the stage input (zeros where none reached a tensor)."""
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in _tensors(x)]
    return tuple(grads) if isinstance(x, tuple) else grads[0]


def run_ticks(clip: torch.Tensor, k_stages: int, tick: Any) -> list:
    """The Sideways schedule over one clip, shared by both executors: at tick t stage 0 takes frame t, and
    stage k takes stage k-1's output and stage k+1's gradient from tick t-1. ``tick(k, x, grad)`` returns
    (output, gradient, loss) as values or Ray references; the result is the top stage's losses from the
    ticks where it had a frame (t >= K-1)."""
    acts: list = [None] * k_stages
    grads: list = [None] * k_stages
    losses = []
    for t in range(clip.shape[2]):
        ticked = [tick(k, clip[:, :, t : t + 1] if k == 0 else acts[k - 1], grads[k + 1] if k + 1 < k_stages else None)
                  for k in range(k_stages)]
        acts, grads = [r[0] for r in ticked], [r[1] for r in ticked]
        if t >= k_stages - 1:
            losses.append(ticked[-1][2])
    return losses


# --------------------------------------------------------------------------- executors


class LocalSideways:
    """The K workers in this process, run one after another within each tick."""

    def __init__(self, split: Any, optim: Any) -> None:
        last = split.num_stages - 1
        self.workers = [SidewaysWorker(s, split.finish if s.index == last else None, optim) for s in split.stages]

    def train_clip(self, clip: torch.Tensor, labels: torch.Tensor) -> float:
        k_stages, steps = len(self.workers), clip.shape[2]
        scale = 1.0 / max(1, steps - (k_stages - 1))
        for worker in self.workers:
            worker.reset()
        losses = run_ticks(clip, k_stages, lambda k, x, grad: self.workers[k].tick(x, grad, labels, scale))
        for worker in self.workers:
            worker.step()
        return statistics.mean(losses)

    def seed(self, seed: int) -> None:
        """The workers draw from this process's RNG, which :func:`epoch_batches` has just seeded."""

    def sync(self, split: Any) -> None:
        """Parameters are shared with ``split`` in process: nothing to copy."""

    def busy_seconds(self) -> list[float]:
        return [w.busy() for w in self.workers]

    def close(self) -> None:
        pass


class RaySideways:
    """Each worker in its own Ray actor; a tick's K calls depend only on the previous tick's results."""

    def __init__(self, split: Any, optim: Any, num_cpus: float = 1.0) -> None:
        import copy

        import ray

        from blinkflow.ray_session import start_ray

        self._owns_ray = start_ray(num_cpus=max(2, split.num_stages))
        last = split.num_stages - 1
        actor = ray.remote(SidewaysWorker).options(num_cpus=num_cpus)
        self.workers = [
            actor.remote(copy.deepcopy(s).cpu(), split.finish if s.index == last else None, optim, 1)
            for s in split.stages
        ]

    def train_clip(self, clip: torch.Tensor, labels: torch.Tensor) -> float:
        import ray

        k_stages, steps = len(self.workers), clip.shape[2]
        scale = 1.0 / max(1, steps - (k_stages - 1))
        ray.get([w.reset.remote() for w in self.workers])
        loss_refs = run_ticks(clip, k_stages, lambda k, x, grad: self.workers[k].tick.options(num_returns=3).remote(
            x, grad, labels, scale))
        ray.get([w.step.remote() for w in self.workers])
        return statistics.mean(ray.get(loss_refs))

    def seed(self, seed: int) -> None:
        import ray

        ray.get([w.seed.remote(seed) for w in self.workers])

    def sync(self, split: Any) -> None:
        import ray

        for stage, state in zip(split.stages, ray.get([w.state_dict.remote() for w in self.workers])):
            stage.load_state_dict(state)

    def busy_seconds(self) -> list[float]:
        import ray

        return ray.get([w.busy.remote() for w in self.workers])

    def close(self) -> None:
        import ray

        for worker in self.workers:
            ray.kill(worker)
        if self._owns_ray:
            ray.shutdown()


# --------------------------------------------------------------------------- training


@dataclass
class RunResult:
    """One training method's outcome."""

    method: str
    losses: list[float] = field(default_factory=list)  # per step
    step_seconds: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    busy_s: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        k = max(1, len(self.losses) // 5)
        return {
            "method": self.method,
            "steps": len(self.losses),
            "first_loss": round(statistics.mean(self.losses[:k]), 4) if self.losses else None,
            "last_loss": round(statistics.mean(self.losses[-k:]), 4) if self.losses else None,
            "median_step_ms": round(1000 * statistics.median(self.step_seconds), 2) if self.step_seconds else None,
            "metrics": {key: round(v, 4) for key, v in self.metrics.items() if isinstance(v, float)},
            "busy_s": [round(b, 2) for b in self.busy_s],
        }


def build_data(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(task, training loader, held-out loader): the same data ``blinkflow train action`` uses."""
    from blinkflow.models.training.tasks import make_task
    from blinkflow.models.training.train import make_loader

    task = make_task(cfg)
    train_set = task.train_set()
    val_set = task.eval_set(classes=getattr(train_set, "classes", None))
    loader = make_loader(task, train_set, cfg.batch_size, train=True, seed=cfg.seed)
    return task, loader, make_loader(task, val_set, cfg.batch_size, train=False)


def epoch_batches(cfg: TrainConfig, loader: Any, epoch: int) -> Iterator[Any]:
    """Epoch ``epoch``'s training batches, the same for every method: the shuffle and torch's RNG are re-seeded
    from (seed, epoch) as ``blinkflow train`` does. The random flips and dropout both draw from torch's RNG, and
    the methods draw dropout a different number of times, so the loader gets an RNG state of its own."""
    from blinkflow.models.training.train import Runtime, epoch_seed

    Runtime(progress=False).set_epoch(loader, epoch)
    torch.manual_seed(epoch_seed(cfg.seed, epoch))
    data_state = torch.get_rng_state()
    batches = iter(loader)
    while True:
        model_state = torch.get_rng_state()
        torch.set_rng_state(data_state)
        batch = next(batches, None)
        data_state = torch.get_rng_state()
        torch.set_rng_state(model_state)
        if batch is None:
            return
        yield batch


def fresh_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    from blinkflow.models.registry import build_model

    torch.manual_seed(cfg.seed)
    return build_model(cfg.model, task="action", num_classes=num_classes, **cfg.model_args)


def train_sideways(cfg: TrainConfig, data: tuple, stages: int = 2, executor: str = "local") -> tuple[RunResult, nn.Module]:
    """Sideways training of a fresh ``cfg.model`` for ``cfg.epochs`` epochs; returns the result and the model."""
    from blinkflow.models.depth import split_model
    from blinkflow.models.training.train import epoch_seed

    task, loader, val_loader = data
    model = fresh_model(cfg, len(loader.dataset.classes)).train()
    split = split_model(model, stages)  # balanced by parameter count: no timing noise in training runs
    runner = RaySideways(split, cfg.optim) if executor == "ray" else LocalSideways(split, cfg.optim)
    result = RunResult(f"sideways K={stages} ({executor})")
    try:
        for epoch in range(cfg.epochs):
            runner.seed(epoch_seed(cfg.seed, epoch))  # Ray actors draw the dropout masks the driver draws in process
            for clips, labels in epoch_batches(cfg, loader, epoch):
                started = time.perf_counter()
                result.losses.append(runner.train_clip(clips, labels))
                result.step_seconds.append(time.perf_counter() - started)
        runner.sync(split)
        result.busy_s = runner.busy_seconds()
    finally:
        runner.close()
    result.metrics = task.evaluate(model.eval(), val_loader, torch.device("cpu"))
    return result, model


def train_backprop(cfg: TrainConfig, data: tuple) -> tuple[RunResult, nn.Module]:
    """The baseline: clip-mode training with exact gradients, same objective (every step's logits)."""
    task, loader, val_loader = data
    model = fresh_model(cfg, len(loader.dataset.classes)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    result = RunResult("ordinary backprop (clip mode)")
    for epoch in range(cfg.epochs):
        for clips, labels in epoch_batches(cfg, loader, epoch):
            started = time.perf_counter()
            logits, _ = model.forward_steps(clips)
            steps = logits.shape[1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.repeat_interleave(steps))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.losses.append(float(loss.detach()))
            result.step_seconds.append(time.perf_counter() - started)
    result.metrics = task.evaluate(model.eval(), val_loader, torch.device("cpu"))
    return result, model


#: what Sideways trains with: a fresh model, AdamW at a constant lr, unclipped, on the CPU; a config asking for
#: anything else is refused (it used to be ignored, silently)
FIXED = {"init": None, "optim.optimizer": "adamw", "optim.schedule": "constant", "optim.warmup_steps": 0,
         "optim.grad_clip": None, "device": "cpu"}


def executors_for(choice: str | None) -> tuple[str, ...]:
    """The executors a command line's choice names: local (the default), ray, or both side by side."""
    return ("local", "ray") if choice == "both" else (choice or "local",)


def check_supported(cfg: TrainConfig, stages: int) -> None:
    """Refuse what Sideways would ignore or cannot split, before any data is rendered (every entry point)."""
    if cfg.task != "action" or cfg.model != "causal3d_small":
        raise ConfigError(f"--sideways trains the streaming causal3d_small action model; got {cfg.task}/{cfg.model}")
    for key, fixed in FIXED.items():
        given = functools.reduce(getattr, key.split("."), cfg)
        if given != fixed:
            wanted = "null" if fixed is None else repr(fixed)
            raise ConfigError(f"--sideways: {key}: {given!r} is not supported (Sideways trains a fresh model "
                              f"with AdamW at a constant lr, unclipped, on the CPU); set {key}={wanted}")
    if stages < 1:
        raise ConfigError(f"--stages: {stages} depth stages; give 1 or more")


def compare(cfg: TrainConfig, stages: int = 2, executors: Sequence[str] = ("local",), baseline: bool = True) -> dict:
    """Train with Sideways (each executor) and, side by side, with ordinary backprop; same data and init."""
    check_supported(cfg, stages)
    torch.set_num_threads(cfg.threads)
    data = build_data(cfg)
    if data[0].clip_len < stages:
        # the top stage first sees frame K - 1 of a clip: a shorter clip trains nothing and has no loss
        raise ConfigError(f"data.clip_len: {data[0].clip_len} frames, but --stages {stages} needs clips of at least "
                          f"{stages} (the top stage first sees frame {stages - 1}); set data.clip_len or lower --stages")
    results, model = [], None
    for executor in executors:
        result, model = train_sideways(cfg, data, stages, executor)
        results.append(result.summary())
    if baseline:
        results.append(train_backprop(cfg, data)[0].summary())
    report = {"config": {"model": cfg.model, "model_args": cfg.model_args, "epochs": cfg.epochs,
                         "batch_size": cfg.batch_size, "lr": cfg.optim.lr, "stages": stages, "threads": cfg.threads,
                         "clip_len": data[0].clip_len, "input_size": list(data[0].input_size)},
              "results": results}
    _save(cfg, report, model)
    return report


def _save(cfg: TrainConfig, report: dict, model: nn.Module | None) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "sideways.json", json.dumps(report, indent=2) + "\n")
    if model is not None:
        with atomic_path(out_dir / "sideways.pt") as temp:  # a killed run leaves no half checkpoint
            torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, temp)


def format_report(report: dict) -> str:
    lines = [f"{'method':34} {'steps':>5} {'loss first->last':>18} {'ms/step':>9}  held-out"]
    for r in report["results"]:
        loss = f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}"
        held_out = "  ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        lines.append(f"{r['method']:34} {r['steps']:>5} {loss:>18} {r['median_step_ms']:>9.1f}  {held_out}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from blinkflow.resources import config_path

    parser = argparse.ArgumentParser(prog="python -m blinkflow.models.training.sideways",
                                     description=__doc__.splitlines()[0])
    # the shipped file, not a path relative to wherever this runs
    parser.add_argument("--config", type=Path, default=config_path("train/smoke-action.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stages", type=whole_number(1), default=2, help="depth stages K")
    parser.add_argument("--executor", choices=["local", "ray", "both"], default="local")
    parser.add_argument("--no-baseline", action="store_true", help="skip the ordinary-backprop comparison")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        print(format_report(_run(args)))
    except BlinkflowError as exc:  # a user error: one line, as `blinkflow train --sideways` prints it
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> dict:
    from blinkflow.models.training.config import load_train_config

    cfg = load_train_config(args.config, args.overrides, task="action")
    executors = executors_for(args.executor)
    return compare(cfg, args.stages, executors, baseline=not args.no_baseline)


if __name__ == "__main__":
    sys.exit(main())
