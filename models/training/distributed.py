"""``blinkflow train TASK --workers N``: the same loop (:func:`models.training.train.main`) under Ray Train.

:class:`ray.train.torch.TorchTrainer` starts N workers and a process group
(gloo on CPU, nccl on GPU). Each worker runs ``main`` with a :class:`RayRuntime`:

* the model goes through ``ray.train.torch.prepare_model`` (DistributedDataParallel);
* the training loader gets a ``DistributedSampler`` seeded with ``seed`` (Ray's
  ``prepare_data_loader`` keeps it; its own would use seed 0), so every epoch's
  shards are a function of (seed, epoch); ``batch_size`` is per worker and a
  shard smaller than it is an error, not a run of zero steps;
* after every epoch all workers call ``ray.train.report``; rank 0 attaches
  the checkpoint as a ``ray.train.Checkpoint`` (kept under
  ``<out_dir>/ray-train/``) and also writes ``<out_dir>/checkpoint.pt`` so
  ``blinkflow eval`` finds it;
* a rerun with the same ``out_dir`` resumes from Ray's latest checkpoint
  (``ray.train.get_checkpoint``); ``--fresh`` deletes that run first.

Evaluation, the probe loss, ``metrics.json`` and shipping happen on rank 0 only.
The driver connects to ``RAY_ADDRESS`` when set, else starts a local Ray;
``device: cuda`` on a cluster with fewer GPUs than workers is refused (Ray would wait for them forever);
``auto`` then trains on CPUs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blinkflow.models.training.config import TrainConfig
from blinkflow.models.training.train import CHECKPOINT_NAME, METRICS_NAME, Runtime, _write_checkpoint, check_shard, main
from blinkflow.errors import BlinkflowError, ConfigError

log = logging.getLogger(__name__)

RAY_RUN_NAME = "ray-train"


def _import_ray_train() -> Any:
    try:
        import ray.train  # needs pandas/pyarrow: the ray[train] extra
        import ray.train.torch
    except ImportError as exc:
        raise BlinkflowError(
            f"--workers needs Ray Train, which is not installed ({exc}); run: pip install 'ray[train]'"
        ) from None
    return ray.train


@dataclass
class RayRuntime(Runtime):
    """A Ray Train worker's view of the loop (see the module docstring)."""

    resume: bool = True

    def prepare_model(self, model: Any) -> Any:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def prepare_loader(self, loader: Any) -> Any:
        import ray.train.torch

        if self.world_size > 1:  # Ray keeps a DistributedSampler it finds; its own would ignore cfg.seed
            loader = seeded_shards(loader, self.rank, self.world_size)
        return ray.train.torch.prepare_data_loader(loader, move_to_device=False)

    def set_epoch(self, loader: Any, epoch: int) -> None:
        from torch.utils.data.distributed import DistributedSampler

        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(epoch)  # shard order is a function of (seed, epoch)
        else:
            super().set_epoch(loader, epoch)

    def load_checkpoint(self, out_dir: Path) -> dict | None:
        import ray.train

        from blinkflow.models.training.train import _read_checkpoint

        checkpoint = ray.train.get_checkpoint() if self.resume else None
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return _read_checkpoint(Path(folder) / CHECKPOINT_NAME)

    def save_checkpoint(self, out_dir: Path, checkpoint: dict, metrics: dict) -> None:
        """Every worker reports (it is a barrier); only rank 0 attaches the checkpoint."""
        import ray.train

        report = {"epoch": checkpoint["epoch"], "step": checkpoint["step"],
                  **{k: v for k, v in metrics.items() if isinstance(v, float)}}
        if not self.is_main:
            ray.train.report(report, checkpoint=None)
            return
        _write_checkpoint(out_dir / CHECKPOINT_NAME, checkpoint)
        with tempfile.TemporaryDirectory() as folder:
            _write_checkpoint(Path(folder) / CHECKPOINT_NAME, checkpoint)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(folder))


def seeded_shards(loader: Any, rank: int, world_size: int) -> Any:
    """The loader with a DistributedSampler shuffled from the loader's seed (set_epoch adds the epoch)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(loader.dataset, num_replicas=world_size, rank=rank,
                                 shuffle=isinstance(loader.sampler, RandomSampler), seed=loader.seed)
    sharded = DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, drop_last=loader.drop_last,
                         collate_fn=loader.collate_fn)
    sharded.seed = loader.seed
    return sharded


def _train_worker(config: dict) -> None:
    """The function each Ray Train worker runs."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    runtime = RayRuntime(
        device=ray.train.torch.get_device(),
        rank=context.get_world_rank(),
        world_size=context.get_world_size(),
        progress=False,  # N interleaved bars would be noise in the driver's log
        resume=config["resume"],
        out_dir=Path(config["out_dir"]),
    )
    main(config["cfg"], resume=config["resume"], ship=config["ship"], runtime=runtime)


def train_distributed(cfg: TrainConfig, *, workers: int, resume: bool = True, ship: bool = False) -> dict:
    """Train with ``workers`` DDP workers under Ray Train; returns the summary rank 0 wrote."""
    train = _import_ray_train()
    from ray.train.torch import TorchConfig, TorchTrainer

    _check_synthetic_shards(cfg, workers)  # before Ray starts: the common case fails in a second
    out_dir = Path(cfg.out_dir).resolve()
    if not resume:
        shutil.rmtree(out_dir / RAY_RUN_NAME, ignore_errors=True)
    else:
        _check_no_plain_run_ahead(out_dir)
    from blinkflow.ray_session import start_ray

    start_ray()
    use_gpu = _use_gpu(cfg, workers)
    trainer = TorchTrainer(
        _train_worker,
        # workers may start in another directory: the absolute out_dir travels beside the config as written
        train_loop_config={"cfg": cfg, "out_dir": str(out_dir), "resume": resume, "ship": ship},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=train.RunConfig(name=RAY_RUN_NAME, storage_path=str(out_dir),
                                   checkpoint_config=train.CheckpointConfig(num_to_keep=2)),
    )
    result = _fit(trainer)
    if result.error is not None:
        raise result.error
    summary = json.loads((out_dir / METRICS_NAME).read_text())
    summary["workers"] = workers
    return summary


def _check_no_plain_run_ahead(out_dir: Path) -> None:
    """Workers resume from Ray Train's checkpoints only: a run without --workers in the same out_dir that got
    further (or the only one there) would be thrown away and its checkpoint.pt overwritten from step 0."""
    from blinkflow.models.training.train import _read_checkpoint

    plain = out_dir / CHECKPOINT_NAME
    if not plain.is_file():
        return
    step = int(_read_checkpoint(plain).get("step", 0))
    ray_steps = [int(_read_checkpoint(path).get("step", 0)) for path in (out_dir / RAY_RUN_NAME).rglob(CHECKPOINT_NAME)]
    if not ray_steps or max(ray_steps) < step:
        since = f"Ray Train's last is at step {max(ray_steps)}" if ray_steps else "Ray Train has none"
        raise ConfigError(f"{plain}: a run without --workers got to step {step} and {since}; resume it without "
                          "--workers, or pass --fresh to start over")


def _check_synthetic_shards(cfg: TrainConfig, workers: int) -> None:
    """Synthetic detect/segment/flow/action sets hold clips x samples_per_clip examples: check the shards
    here; other sets are checked by the workers once loaded."""
    if cfg.data.train_path is not None or cfg.task == "reid":
        return
    examples = cfg.data.train.clips * cfg.data.train.samples_per_clip
    check_shard(cfg, -(-examples // workers), examples, workers)  # DistributedSampler pads to ceil(n / workers)


def _use_gpu(cfg: TrainConfig, workers: int) -> bool:
    """One GPU per worker, which the cluster must have (else Ray waits for them forever): ``cuda`` without
    them is an error; ``auto`` takes GPUs when there are enough, like a single-process run, else the CPUs."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.device.startswith("cuda") and gpus < workers:
        fewer = f", or use at most {int(gpus)} workers" if gpus >= 1 else ""
        raise ConfigError(f"device: {cfg.device!r} with --workers {workers} needs {workers} GPUs but the Ray cluster "
                          f"has {gpus:g}; set device to cpu or auto{fewer}")
    if cfg.device == "auto" and 0 < gpus < workers:
        log.warning("device auto: %g GPUs for %d workers; training on CPUs", gpus, workers)
    return cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus >= workers)


def _fit(trainer: Any) -> Any:
    """``trainer.fit()``; a worker's BlinkflowError (bad input found once data is loaded) stays one line."""
    try:
        return trainer.fit()
    except Exception as exc:
        failures = getattr(exc, "worker_failures", None) or {}
        for rank in sorted(failures):
            if isinstance(failures[rank], BlinkflowError):
                raise BlinkflowError(str(failures[rank])) from None  # Ray's wrapping adds a worker traceback
        raise
