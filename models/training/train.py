"""The training loop of every stage: ``main(cfg)`` reads top to bottom.

    main(cfg)
      ├─ seed, threads, task (models.training.tasks), datasets, model, optimiser, schedule
      ├─ resume from <out_dir>/checkpoint.pt when it exists (same config)
      ├─ for each epoch: train_one_epoch, evaluate (every eval_every), save the checkpoint
      └─ write <out_dir>/metrics.json; with ship=True also models/weights/ (save_shipped)

A checkpoint holds ``{model, optimizer, scheduler, epoch, step, config,
classes, history}`` and is replaced atomically after every epoch, so a killed
run loses at most one epoch and resumes exactly: the data order and the
augmentation/dropout randomness are re-seeded from ``(seed, epoch)``, so a
resumed run computes the same weights as an uninterrupted one (on the same
machine and thread count).

The same loop runs under Ray Train (``--workers N``): a :class:`Runtime`
says how to wrap the model and loader, and where checkpoints and metrics go;
:mod:`models.training.distributed` supplies the Ray one.

*Probe loss*: before training and at every evaluation, the loss of one fixed
batch of training examples (train mode, no augmentation, no update, BatchNorm
statistics restored afterwards) is recorded in ``history["probe_loss"]``; it
shows learning without the noise of the running loss.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from blinkflow.devices import resolve_device

from blinkflow.models.training.config import OptimConfig, TrainConfig
from blinkflow.models.training.tasks import Task, make_task, unwrap
from blinkflow.errors import BlinkflowError, ConfigError
from blinkflow.files import atomic_path, write_atomic

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"


class CheckpointError(BlinkflowError):
    """A checkpoint that cannot be resumed from; the message names the file and the fix."""


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Torch's seed for an epoch of a worker: augmentation and dropout are a function of (seed, epoch, rank), so a
    resumed run, and every method Sideways compares, draws the same."""
    return seed * 1_000_003 + epoch * 101 + rank


@dataclass
class Runtime:
    """How the loop runs: one process here; :mod:`models.training.distributed` overrides for Ray Train."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    #: where checkpoints and metrics go; None: cfg.out_dir. Ray workers get the driver's absolute path
    #: here, so the config (recorded in checkpoints and the manifest) keeps out_dir as written
    out_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader

    def set_epoch(self, loader: DataLoader, epoch: int) -> None:
        """Make the shuffling a function of (seed, epoch) so a resumed run sees the same order."""
        loader.generator.manual_seed(loader.seed * 100_003 + epoch)

    def load_checkpoint(self, out_dir: Path) -> dict | None:
        path = out_dir / CHECKPOINT_NAME
        return _read_checkpoint(path) if path.is_file() else None

    def save_checkpoint(self, out_dir: Path, checkpoint: dict, metrics: dict) -> None:
        _write_checkpoint(out_dir / CHECKPOINT_NAME, checkpoint)


# --------------------------------------------------------------------------- main


def main(cfg: TrainConfig, *, resume: bool = True, ship: bool = False, runtime: Runtime | None = None) -> dict:
    """Train ``cfg.task``'s model; return ``{"metrics", "history", "epochs", "steps", "seconds", "out_dir"}``."""
    runtime = runtime or Runtime(device=resolve_device(cfg.device, "device"))
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out_dir = runtime.out_dir or Path(cfg.out_dir)
    task = make_task(cfg)

    train_set = task.train_set()
    val_set = task.eval_set(classes=getattr(train_set, "classes", None))  # a real val set labelled like the model
    classes = getattr(train_set, "classes", None)
    model = task.build_model(classes)  # the same init on every rank: seeded just above
    optimizer = build_optimizer(cfg.optim, model)
    loader = runtime.prepare_loader(make_loader(task, train_set, cfg.batch_size, train=True, seed=cfg.seed))
    check_shard(cfg, len(loader.sampler), len(train_set), runtime.world_size)
    val_loader = make_loader(task, val_set, cfg.batch_size, train=False)
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps=cfg.epochs * len(loader))
    state = {"epoch": 0, "step": 0, "seconds": 0.0, "initialised_from": None,
             "history": {"probe_loss": [], "train_loss": [], "eval": []}}

    checkpoint = runtime.load_checkpoint(out_dir) if resume else None
    if checkpoint is not None:
        restore(checkpoint, cfg, model, optimizer, scheduler, state)
    else:
        state["initialised_from"] = initialise(model, cfg)
    model = runtime.prepare_model(model)
    probe = task.to_device(task.collate([train_set[i] for i in range(min(cfg.batch_size, len(train_set)))]), runtime.device)
    if state["step"] == 0 and runtime.is_main:
        record_probe(task, model, probe, state)

    metrics: dict = state["history"]["eval"][-1]["metrics"] if state["history"]["eval"] else {}
    for epoch in range(state["epoch"], cfg.epochs):
        started = time.perf_counter()
        train_one_epoch(task, model, loader, optimizer, scheduler, epoch, state, runtime)
        state["epoch"], state["seconds"] = epoch + 1, state["seconds"] + time.perf_counter() - started
        if runtime.is_main and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
            metrics = evaluate(task, unwrap(model), val_loader, runtime.device)
            state["history"]["eval"].append({"epoch": epoch + 1, "step": state["step"], "metrics": metrics})
            record_probe(task, model, probe, state)
            log.info("epoch %d/%d: %s", epoch + 1, cfg.epochs, _brief(metrics))
        runtime.save_checkpoint(out_dir, make_checkpoint(cfg, model, optimizer, scheduler, state, classes), metrics)

    summary = {"metrics": metrics, "history": state["history"], "epochs": state["epoch"], "steps": state["step"],
               "seconds": round(state["seconds"], 1), "out_dir": str(out_dir), "classes": classes,
               "trained_on": describe_device(runtime.device), "initialised_from": state["initialised_from"]}
    if runtime.is_main:
        finish(cfg, task, unwrap(model), classes, summary, ship)
    return summary


def check_shard(cfg: TrainConfig, shard: int, examples: int, workers: int) -> None:
    """Full batches only (drop_last): a shard smaller than the batch would train nothing, yet 'succeed'."""
    if shard < min(cfg.batch_size, examples):  # make_loader caps the batch at the training set's size
        raise ConfigError(
            f"batch_size: {cfg.batch_size} is more than each worker's shard of the training set ({shard} of "
            f"{examples} examples over {workers} workers), so no step would be taken; set batch_size to at most "
            f"{shard} or use fewer --workers")


def initialise(model: torch.nn.Module, cfg: TrainConfig) -> str | None:
    """Load ``cfg.init`` into the fresh model (fine-tuning); what it was, with its sha256, for the manifest:
    ``init: shipped`` names a file that shipping this run replaces, so the name alone would not reproduce it."""
    if cfg.init is None:
        return None
    from blinkflow.models.weights import load_state, resolve_weights, sha256_file

    spec = resolve_weights(cfg.init, stage=cfg.task, model_name=cfg.model)
    fresh = load_state(model, spec, fresh_head=True)  # other classes than the init's: a new head, the rest kept
    if fresh:
        log.info("init %s: %d class-dependent tensors start fresh (%s, ...)", cfg.init, len(fresh), fresh[0])
    return f"{cfg.init} (sha256 {spec.sha256 or sha256_file(spec.path)})" if spec.path else cfg.init


def check_ship_target(cfg: TrainConfig) -> None:
    """``--ship`` replaces the shipped file of this stage and model: refused, before training, when the shipped one
    is another net (other ``model_args``): a smoke config's quarter-width net replaced the real file, and every
    stage loading `weights: shipped` with its options failed on a shape mismatch."""
    from blinkflow.models.weights import read_manifest

    for entry in read_manifest()["weights"]:
        if entry.get("stage") == cfg.task and entry.get("model") == cfg.model:
            shipped = (entry.get("config") or {}).get("model_args") or {}
            if shipped != (cfg.model_args or {}):
                raise ConfigError(f"--ship: model_args {cfg.model_args or {}} build another {cfg.model} than the "
                                  f"shipped {entry['file']} ({shipped}), which it would replace; drop --ship and use "
                                  f"{cfg.out_dir}/checkpoint.pt (with options.model_args the same), or train with "
                                  f"model_args {shipped}")


def finish(cfg: TrainConfig, task: Task, model: torch.nn.Module, classes: list[str] | None, summary: dict, ship: bool) -> None:
    """Write metrics.json beside the checkpoint and, when shipping, the weights and their manifest entry."""
    if ship:
        from blinkflow.models.weights import save_shipped

        shipped = {**summary["metrics"], "evaluated_on": describe_eval_set(cfg), "train_seconds": summary["seconds"],
                   "epochs": summary["epochs"], "steps": summary["steps"], "trained_on": summary["trained_on"]}
        if summary["initialised_from"]:
            shipped["initialised_from"] = summary["initialised_from"]
        path = save_shipped(model, stage=cfg.task, model_name=cfg.model, classes=classes, config=cfg.to_dict(), metrics=shipped)
        summary["shipped"] = str(path)
    out_dir = Path(summary["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / METRICS_NAME, json.dumps(summary, indent=2) + "\n")


def describe_device(device: torch.device) -> str:
    """What trained the weights, for the manifest (train_seconds mean little without it)."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} torch threads)"


def describe_eval_set(cfg: TrainConfig) -> str:
    if cfg.data.val_path:
        return cfg.data.val_path
    val = cfg.data.val
    described = (f"synthetic held-out seeds {val.first_seed}..{val.first_seed + val.clips - 1} "
                 f"({val.clips} clips x {val.samples_per_clip}, {cfg.data.width}x{cfg.data.height})")
    if val.backgrounds:
        names = ", ".join(Path(p).name for p in val.backgrounds)  # names only: the same on any checkout
        described += f", {val.real_fraction:.0%} of them over real backgrounds from {names}"
    if val.clutter_fraction:
        described += f", {val.clutter_fraction:.0%} over clutter (dead leaves)"
    return described


# --------------------------------------------------------------------------- evaluation only


def run_eval(cfg: TrainConfig, *, weights: str | None = None, data: str | None = None) -> dict:
    """Metrics of ``weights`` (default: the run's checkpoint, else the shipped weights) on ``data``
    (a real dataset; default: ``data.val_path``, else the synthetic held-out split)."""
    from blinkflow.models.weights import load_state

    if data and cfg.task == "reid":
        raise ConfigError("--data: reid is evaluated on synthetic identities (plus reid.real_clips), not a dataset "
                          "file; drop --data")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = make_task(cfg)
    spec = eval_weights_spec(cfg, weights)
    classes = spec.classes or task.default_classes
    real = data or cfg.data.val_path
    if not real and task.default_classes is not None and list(classes) != list(task.default_classes):
        raise BlinkflowError(f"{spec.label}: these weights know other classes ({_names(classes)}) than the synthetic "
                             f"scenes ({_names(task.default_classes)}); evaluate them on their own data with --data PATH")
    dataset = task.eval_set(data, list(classes) if classes is not None else None)
    model = task.build_model(classes)
    load_state(model, spec)
    device = resolve_device(cfg.device)
    metrics = evaluate(task, model.to(device), make_loader(task, dataset, cfg.batch_size, train=False), device)
    return {"metrics": metrics, "weights": spec.label, "data": real or describe_eval_set(cfg), "examples": len(dataset)}


def eval_weights_spec(cfg: TrainConfig, weights: str | None) -> Any:
    """``None``: the run's checkpoint when there is one, else the shipped weights."""
    from blinkflow.models.weights import WeightsError, resolve_weights, with_checkpoint_classes

    if weights is None:
        checkpoint = Path(cfg.out_dir) / CHECKPOINT_NAME
        weights = str(checkpoint) if checkpoint.is_file() else "shipped"
    try:  # with the classes a checkpoint records (read once, its contents kept for loading)
        return with_checkpoint_classes(resolve_weights(weights, stage=cfg.task, model_name=cfg.model), cfg.task)
    except WeightsError as exc:  # its messages name the pipeline config's key; here the input is --weights
        raise WeightsError(re.sub(rf"^stages\.{cfg.task}\.weights: ", "--weights: ", str(exc))) from None


def _names(classes: list[str], most: int = 8) -> str:
    shown = ", ".join(classes[:most])
    return f"{shown}, … {len(classes)} in all" if len(classes) > most else shown


# --------------------------------------------------------------------------- one epoch


def train_one_epoch(task: Task, model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, state: dict, runtime: Runtime) -> None:
    """One pass over the training set; the running loss is logged and kept in the history."""
    from tqdm import tqdm

    cfg = task.cfg
    model.train()
    runtime.set_epoch(loader, epoch)
    # augmentation and dropout draw from torch's global RNG: re-seed per (seed, epoch, rank) for exact resumes
    torch.manual_seed(epoch_seed(cfg.seed, epoch, runtime.rank))
    running, count = 0.0, 0
    bar = tqdm(loader, desc=f"{cfg.task} epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (runtime.progress and runtime.is_main), unit="batch")
    for batch in bar:
        loss = task.loss(model, task.to_device(batch, runtime.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{cfg.task}: the loss became {loss.item()} at step {state['step']}; lower optim.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        running, count = running + loss.item(), count + 1
        if state["step"] % cfg.log_every == 0:
            state["history"]["train_loss"].append([state["step"], running / count])
            bar.set_postfix(loss=f"{running / count:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            log.info("step %d: loss %.4f", state["step"], running / count)
            running, count = 0.0, 0


@torch.no_grad()
def evaluate(task: Task, model: torch.nn.Module, loader: DataLoader, device: torch.device) -> dict:
    """The task's metrics on the held-out loader, in eval mode; the model goes back to train mode."""
    was_training = model.training
    model.eval()
    try:
        return task.evaluate(model, loader, device)
    finally:
        model.train(was_training)


@torch.no_grad()
def probe_loss(task: Task, model: torch.nn.Module, batch: Any) -> float:
    """The training loss of a fixed batch, leaving the model exactly as it was (BatchNorm buffers included)."""
    model = unwrap(model)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    try:
        return float(task.loss(model, batch))
    finally:
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
        model.train(was_training)


def record_probe(task: Task, model: torch.nn.Module, batch: Any, state: dict) -> None:
    value = probe_loss(task, model, batch)
    state["history"]["probe_loss"].append([state["step"], value])
    log.info("step %d: probe loss %.4f", state["step"], value)


# --------------------------------------------------------------------------- building blocks


def make_loader(task: Task, dataset: Any, batch_size: int, *, train: bool, seed: int = 0) -> DataLoader:
    """In-memory examples, so no worker processes; training shuffles with its own seeded generator."""
    generator = torch.Generator().manual_seed(seed) if train else None
    loader = DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=train,
        drop_last=train,  # BatchNorm and DDP want full batches
        collate_fn=lambda items: task.collate(items, train=train),
        generator=generator,
    )
    loader.seed = seed  # what Runtime.set_epoch re-seeds the generator from
    return loader


def build_optimizer(optim: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


class WarmupCosine:
    """lr factor: linear warm-up, then cosine decay to ``min_ratio`` (or constant). A class, not a
    lambda, so the scheduler's state dict stays plain data."""

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float, cosine: bool) -> None:
        self.total_steps, self.warmup_steps = max(1, total_steps), warmup_steps
        self.min_ratio, self.cosine = min_ratio, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optim: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    factor = WarmupCosine(total_steps, optim.warmup_steps, optim.min_lr_ratio, optim.schedule == "cosine")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- checkpoints


def make_checkpoint(cfg: TrainConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict,
                    classes: list[str] | None) -> dict:
    return {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": state["epoch"],
        "step": state["step"],
        "seconds": state["seconds"],
        "initialised_from": state["initialised_from"],
        "config": cfg.to_dict(),
        "classes": classes,
        "history": state["history"],
    }


def restore(checkpoint: dict, cfg: TrainConfig, model: torch.nn.Module, optimizer: Any, scheduler: Any, state: dict) -> None:
    """Continue a run; a checkpoint of a different config would silently mix two runs, so it is refused."""
    saved = checkpoint.get("config")
    if saved != cfg.to_dict():
        changed = sorted(k for k in cfg.to_dict() if (saved or {}).get(k) != cfg.to_dict()[k])
        raise CheckpointError(
            f"{cfg.out_dir}/{CHECKPOINT_NAME}: it was trained with a different config (differs in: "
            f"{', '.join(changed) or 'everything'}); pass --fresh to start over or set another out_dir"
        )
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    for key in ("epoch", "step", "seconds", "history"):
        state[key] = checkpoint[key]
    state["initialised_from"] = checkpoint.get("initialised_from")  # absent from checkpoints before `init`
    log.info("resumed %s at epoch %d (step %d)", cfg.out_dir, state["epoch"], state["step"])


def _read_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        raise CheckpointError(f"{path}: cannot resume from it ({type(exc).__name__}); delete it or pass --fresh") from None


def _write_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write beside, then rename: a kill mid-write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        torch.save(checkpoint, temp)


def _brief(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
