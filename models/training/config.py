"""Training configs (``configs/train/*.yaml``) as typed, validated dataclasses.

Loading follows the pipeline's config: read the YAML, apply ``--set``
overrides, structure it with :func:`pipeline.config.structure_dataclass`
(unknown keys, types and ranges are one-line errors that name their path),
then cross-field checks. No torch import here, so the CLI stays quick.

Sizes left ``null`` (``data.input_size``, ``data.clip_len``) mean *the
stage's own preset* (``stages/<task>.py``), so the shipped weights are trained
on exactly what the pipeline feeds them at inference.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blinkflow.schema import _field, apply_override, check_kind, read_yaml, resolve_path, structure_dataclass
from blinkflow.devices import DEVICE_PATTERN
from blinkflow.errors import ConfigError, first_line

TASKS = ("detect", "segment", "flow", "action", "reid")
#: held-out synthetic clips start here by default, far from any training seed
VAL_FIRST_SEED = 1_000_000


@dataclass
class SplitConfig:
    """A range of synthetic clip seeds and which frames of each clip are used."""

    first_seed: int = _field(0, "seed of the first clip; clip i uses seed first_seed + i", lo=0, hi=2**31 - 1)
    clips: int = _field(64, "number of clips (scenes)", lo=1, hi=10**6)
    samples_per_clip: int = _field(4, "frames (detect, segment), pairs (flow) or windows (action) per clip", lo=1, hi=10**4)
    frame_step: int = _field(6, "frames between consecutive samples of a clip", lo=1, hi=10**4)
    backgrounds: list[str] | None = _field(
        None, "detect/segment: real images or videos (or folders of them) whose frames, cropped and recoloured, "
        "replace the procedural background of real_fraction of the clips: real texture labelled background, "
        "the hard negatives procedural scenes lack; null: procedural backgrounds only",
    )
    real_fraction: float = _field(
        0.5, "with backgrounds: the share of clips (chosen by seed) drawn over a real background", lo=0.0, hi=1.0
    )
    clutter_fraction: float = _field(
        0.0, "detect/segment: the share of clips drawn over procedural clutter (dead leaves: flat ellipses of "
        "every size, like foliage), hard negatives no real file may show; 0: none", lo=0.0, hi=1.0,
    )

    @property
    def real_share(self) -> float:
        """The share of clips over a real background: real_fraction, or 0 without background files."""
        return self.real_fraction if self.backgrounds else 0.0


@dataclass
class DataConfig:
    """Where the examples come from: synthetic scenes, or a dataset in a real format."""

    train_path: str | None = _field(
        None, "real training data (detect/segment: COCO JSON; flow: folder of .flo pairs; action: class-per-folder videos); null: synthetic"
    )
    val_path: str | None = _field(None, "real held-out data in the same format; null: the synthetic val split")
    train: SplitConfig = _field(factory=SplitConfig, doc="synthetic training split")
    val: SplitConfig = _field(
        factory=lambda: SplitConfig(first_seed=VAL_FIRST_SEED, clips=16), doc="synthetic held-out split (other seeds)"
    )
    width: int = _field(320, "synthetic scene width (the demo renders 320)", lo=16, hi=4096)
    height: int = _field(240, "synthetic scene height (the demo renders 240)", lo=16, hi=4096)
    num_objects: int = _field(3, "moving shapes per synthetic scene (the demo uses 3)", lo=1, hi=64)
    input_size: list[int] | None = _field(None, "[height, width] the model sees; null: the stage's preset")
    crop: list[int] | None = _field(None, "segment: train on random [height, width] crops of the model input; null: whole input")
    clip_len: int | None = _field(None, "action: frames per clip; null: the stage's preset", lo=1, hi=512)
    flip: bool = _field(False, "random horizontal flips while training (action: left/right classes swap)")


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (stepped once per batch)."""

    optimizer: Literal["sgd", "adamw"] = _field("adamw", "sgd (with momentum) or adamw")
    lr: float = _field(1e-3, "peak learning rate", lo=0.0, hi=10.0)
    weight_decay: float = _field(1e-4, "decoupled (adamw) or L2 (sgd) weight decay", lo=0.0, hi=1.0)
    momentum: float = _field(0.9, "sgd momentum", lo=0.0, hi=1.0)
    schedule: Literal["cosine", "constant"] = _field("cosine", "cosine decay to min_lr_ratio * lr, or constant")
    warmup_steps: int = _field(0, "linear warm-up from 0 over this many steps", lo=0, hi=10**7)
    min_lr_ratio: float = _field(0.01, "cosine: final lr as a fraction of lr", lo=0.0, hi=1.0)
    grad_clip: float | None = _field(None, "clip the global gradient norm to this; null: no clipping", lo=0.0, hi=1e6)


@dataclass
class ConsistencyConfig:
    """Segment: ask two nearby frames of one clip for the same class probabilities (stability training)."""

    weight: float = _field(
        0.0, "weight of the symmetric KL between the two frames' per-pixel class probabilities, over the pixels "
        "whose true class is the same in both; 0: off (one frame per sample)", lo=0.0, hi=1000.0,
    )
    gap: int = _field(1, "frames between the two (the second is frame t + gap of the same synthetic clip)", lo=1, hi=10**4)
    hardest: float = _field(
        1.0, "average the term over this fraction of those pixels, where the frames disagree most (flicker is "
        "rare, so a mean over every pixel gives it little weight); 1: all", lo=0.001, hi=1.0,
    )
    margin: int = _field(
        0, "leave out pixels within this many model-input pixels of a class boundary in either frame (a moving "
        "edge changes them legitimately); 0: none", lo=0, hi=64,
    )


@dataclass
class ReidConfig:
    """Reid: the metric-learning loss and the P x K batches (P = batch_size identities, K crops each)."""

    loss: Literal["triplet", "ntxent"] = _field(
        "triplet", "triplet: batch-hard triplet loss (hardest positive and negative in the batch); ntxent: "
        "SimCLR's normalised-temperature cross-entropy over the batch")
    margin: float = _field(0.2, "triplet: the margin between positive and negative distances", lo=0.0, hi=4.0)
    temperature: float = _field(0.1, "ntxent: the softmax temperature of the cosine similarities", lo=0.001, hi=10.0)
    crops_per_identity: int = _field(4, "K: crops of each identity per batch (at least 2: a positive pair)", lo=2, hi=64)
    min_box: int = _field(8, "crops only of visible boxes at least this many pixels wide and high", lo=1, hi=4096)
    real_clips: list[str] = _field(
        factory=list, doc="real videos whose tracked objects add identities (real appearance): each confirmed track of "
        "real_detector's detect stage plus the track stage over real_window frames is one identity, known by "
        "construction; [] = synthetic identities only")
    real_detector: str = _field("configs/demo.yaml", "pipeline config whose detect stage finds the real clips' objects "
                                "(relative to the repository)")
    real_window: int = _field(16, "frames of one track that make one real identity", lo=2, hi=10**6)
    real_step: int = _field(2, "take every real_step-th frame's crop of a track", lo=1, hi=1000)
    real_holdout: float = _field(0.4, "the last fraction of each real clip's frames is held out: its identities are "
                                 "evaluated (real_top1, real_map), never trained on", lo=0.0, hi=0.95)


@dataclass
class TrainConfig:
    """One training run of one stage's model."""

    task: Literal["detect", "segment", "flow", "action", "reid"] = _field(
        "segment", "the stage the weights are for (reid: the track stage's appearance embeddings)")
    model: str = _field("unet_small", "model registry name (`blinkflow list`)")
    model_args: dict[str, Any] = _field(factory=dict, doc="extra builder arguments; the stage must get the same via options.model_args")
    seed: int = _field(0, "seed for weights init, data order and dropout", lo=0, hi=2**31 - 1)
    init: str | None = _field(
        None, "start from these weights instead of a random init (fine-tuning): 'shipped' (the stage's shipped "
        "file), a weights file, or a torchvision weights name; null: random",
    )
    threads: int = _field(1, "torch CPU threads per process", lo=1, hi=256)
    device: str = _field("cpu", "'cpu', 'cuda:N' or 'auto' (a GPU when there is one; --workers picks the devices itself)")
    epochs: int = _field(10, "passes over the training set", lo=1, hi=10**6)
    batch_size: int = _field(8, "examples per step (per worker under --workers)", lo=1, hi=4096)
    eval_every: int = _field(1, "evaluate on the held-out split every this many epochs (and after the last)", lo=1, hi=10**6)
    log_every: int = _field(20, "log the running loss every this many steps", lo=1, hi=10**7)
    out_dir: str = _field("runs/train", "checkpoint.pt and metrics.json go here; a run resumes from its checkpoint")
    data: DataConfig = _field(factory=DataConfig, doc="training and held-out data")
    optim: OptimConfig = _field(factory=OptimConfig, doc="optimiser and schedule")
    consistency: ConsistencyConfig = _field(factory=ConsistencyConfig, doc="segment: frame-to-frame consistency term")
    reid: ReidConfig = _field(factory=ReidConfig, doc="reid: loss and batch composition")

    def to_dict(self) -> dict:
        """Plain data (what the checkpoint and the weights manifest record)."""
        data = dataclasses.asdict(self)
        if self.task != "reid":  # only reid reads that section: the other tasks' records stay as they were
            data.pop("reid")
        elif not self.reid.real_clips:  # synthetic only: the record stays as it was before real clips existed
            for key in ("real_clips", "real_detector", "real_window", "real_step", "real_holdout"):
                data["reid"].pop(key)
        return data


def _not_a_pipeline_config(raw: Any, path: str | Path | None) -> None:
    from blinkflow.config import Config

    name = path or "config"
    pipeline_keys = {f.name for f in dataclasses.fields(Config)}
    check_kind(raw, TrainConfig, pipeline_keys, f"{name}: this is a pipeline config, not a training config; use "
                                         f"`blinkflow run {name}` (or `blinkflow validate {name}`)")


def load_train_config(
    path: str | Path | None, overrides: list[str] | None = None, *, task: str | None = None, data: dict | None = None
) -> TrainConfig:
    """Read, override, structure and check a training config; raise ConfigError on any problem."""
    from blinkflow.resources import find_config

    path = find_config(path) if path is not None else None
    raw = read_yaml(path) if path is not None else dict(data or {})
    _not_a_pipeline_config(raw, path)
    for override in overrides or []:
        apply_override(raw, override)
    cfg = structure_dataclass(TrainConfig, raw, "")
    base_dir = Path(path).resolve().parent if path is not None else Path.cwd()
    check_train_config(cfg, base_dir, task)
    return cfg


def check_train_config(cfg: TrainConfig, base_dir: Path, task: str | None = None) -> None:
    """Cross-field checks: task and model agree, real data exists, splits do not overlap."""
    from blinkflow.models.registry import get_model_entry
    from blinkflow.errors import RegistryError

    if task is not None and cfg.task != task:
        raise ConfigError(f"task: the config trains {cfg.task!r} but the command asked for {task!r}; use the {task} config")
    try:
        get_model_entry(cfg.model, task=cfg.task)
    except RegistryError as exc:
        raise ConfigError(f"model: {exc}") from None
    if not re.fullmatch(DEVICE_PATTERN, cfg.device):
        raise ConfigError(f"device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got {cfg.device!r}")
    _check_init(cfg, base_dir)
    _check_reid_data(cfg)
    _check_size("data.input_size", cfg.data.input_size)
    _check_size("data.crop", cfg.data.crop)
    for key in ("train_path", "val_path"):
        value = getattr(cfg.data, key)
        if value is not None:
            resolved = resolve_path(value, base_dir)
            if not resolved.exists():
                raise ConfigError(f"data.{key}: {value!r} does not exist; fix the path or set it to null for synthetic "
                                  f"data{_checkout_only(base_dir, f'data.{key}=YOUR.json')}")
            setattr(cfg.data, key, str(resolved))
    _check_disjoint(cfg.data.train, cfg.data.val)
    _check_backgrounds(cfg, base_dir)
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():  # found at the first checkpoint otherwise
        raise ConfigError(f"out_dir: {cfg.out_dir!r} is a file; give the folder the checkpoints and metrics go to")
    _check_consistency(cfg)
    _check_model_args(cfg)


#: why reid takes no dataset file (its config check and the task itself say it)
REID_DATA = "reid trains and is evaluated on synthetic identities (plus reid.real_clips), not a dataset file"


def _check_reid_data(cfg: TrainConfig) -> None:
    """Reid identities are known by construction (synthetic scenes, tracked real clips); no file format holds them."""
    if cfg.task != "reid":
        return
    for key in ("train_path", "val_path"):
        if getattr(cfg.data, key) is not None:
            raise ConfigError(f"data.{key}: {REID_DATA}; set it to null")


def _check_model_args(cfg: TrainConfig) -> None:
    """Build the model once with ``model_args``: an unknown key or bad value is a one-line error here, not a
    traceback once the data is loaded. Only when there are model_args: building imports torch."""
    if not cfg.model_args:
        return
    import inspect

    import torch

    from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES
    from blinkflow.models.registry import build_model, get_model_entry

    # the class count of the synthetic data (flow and reid nets have no classes); a real dataset's may differ,
    # but model_args that build with one count build with another
    classes = {"detect": SYNTHETIC_CLASSES, "segment": SYNTHETIC_CLASSES, "action": SYNTHETIC_ACTIONS}.get(cfg.task)
    counted = {"num_classes": len(classes)} if classes else {}
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream as it was
            build_model(cfg.model, task=cfg.task, **counted, **cfg.model_args)
    except Exception as exc:  # noqa: BLE001 - the same build without model_args works: they are the cause
        accepted = ", ".join(p for p in inspect.signature(get_model_entry(cfg.model).builder).parameters
                             if p != "num_classes")
        raise ConfigError(f"model_args: {cfg.model} cannot be built with {cfg.model_args} ({first_line(exc)}); "
                          f"its arguments are: {accepted or 'none'}") from None


def _checkout_only(base_dir: Path, setting: str) -> str:
    """For a shipped config, that its data is the repository's test data, which an installed package lacks."""
    from blinkflow.resources import is_shipped

    if not is_shipped(base_dir):
        return ""
    return (f" (this shipped config reads the repository's tests/data, which an installed package does not carry: "
            f"run it from a clone, or --set {setting})")


def _check_backgrounds(cfg: TrainConfig, base_dir: Path) -> None:
    """Real backgrounds are for synthetic detect/segment splits, and every listed path must exist."""
    for split in ("train", "val"):
        _check_clutter(cfg, split)
        paths = getattr(cfg.data, split).backgrounds
        if not paths:
            continue
        key = f"data.{split}.backgrounds"
        _require_detect_or_segment(cfg, key, "real backgrounds", "null")
        if getattr(cfg.data, f"{split}_path") is not None:
            raise ConfigError(f"{key}: data.{split}_path is a real dataset, so there are no synthetic clips to put "
                              f"backgrounds behind; set one of them to null")
        resolved = []
        for i, value in enumerate(paths):
            path = resolve_path(value, base_dir)
            if not path.exists():
                raise ConfigError(f"{key}.{i}: {value!r} does not exist; fix the path or drop it from the list"
                                  + _checkout_only(base_dir, f"{key}=null"))
            resolved.append(str(path))
        # the config keeps the paths as written (the manifest records it, and must match on any checkout)
        getattr(cfg.data, split)._backgrounds_resolved = tuple(resolved)


def _check_clutter(cfg: TrainConfig, split: str) -> None:
    config = getattr(cfg.data, split)
    if not config.clutter_fraction:
        return
    key = f"data.{split}.clutter_fraction"
    _require_detect_or_segment(cfg, key, "clutter backgrounds", "0")
    if config.real_share + config.clutter_fraction > 1:
        raise ConfigError(f"{key}: {config.clutter_fraction} plus real_fraction {config.real_share} is more than all "
                          f"the clips; make them add up to at most 1")


def _require_detect_or_segment(cfg: TrainConfig, key: str, what: str, off: str) -> None:
    """Backgrounds go behind the objects of detect and segment scenes only."""
    if cfg.task not in ("detect", "segment"):
        raise ConfigError(f"{key}: {what} are for the detect and segment tasks, not {cfg.task!r}; set it to {off}")


def resolved_backgrounds(split: SplitConfig) -> tuple[str, ...]:
    """The split's background files as the config check found them (relative paths: from the working
    directory, then beside the config); the paths as written when the split was not checked."""
    return getattr(split, "_backgrounds_resolved", None) or tuple(split.backgrounds or ())


def _check_consistency(cfg: TrainConfig) -> None:
    """The term needs frame pairs with exact labels: synthetic segment training data."""
    if cfg.consistency.weight == 0:
        return
    if cfg.task != "segment":
        raise ConfigError(f"consistency.weight: only the segment task has a consistency term, not {cfg.task!r}; set it to 0")
    if cfg.data.train_path is not None:
        raise ConfigError(
            "consistency.weight: needs frame pairs of synthetic clips, but data.train_path is a real dataset; "
            "set data.train_path to null or consistency.weight to 0"
        )


def _check_init(cfg: TrainConfig, base_dir: Path) -> None:
    """``init`` names weights that exist for this task's model (a relative file is found beside the config too)."""
    from blinkflow.models.weights import WeightsError, resolve_weights

    if cfg.init is None:
        return
    beside = resolve_path(cfg.init, base_dir)
    if cfg.init != "shipped" and beside.is_file():
        cfg.init = str(beside)
    try:
        resolve_weights(cfg.init, stage=cfg.task, model_name=cfg.model, base_dir=base_dir)
    except WeightsError as exc:
        detail = str(exc).split(": ", 1)[-1]  # drop the pipeline config's key, this is the training config's
        raise ConfigError(f"init: {detail}; name a weights file, 'shipped' or null") from None


def _check_size(path: str, size: list[int] | None) -> None:
    if size is not None and (len(size) != 2 or min(size) < 16):
        raise ConfigError(f"{path}: expected [height, width] with both >= 16, got {size}")


def _check_disjoint(train: SplitConfig, val: SplitConfig) -> None:
    """A held-out split must not share a seed with the training split."""
    train_end, val_end = train.first_seed + train.clips, val.first_seed + val.clips
    if train.first_seed < val_end and val.first_seed < train_end:
        raise ConfigError(
            f"data.val.first_seed: seeds {val.first_seed}..{val_end - 1} overlap the training seeds "
            f"{train.first_seed}..{train_end - 1}; move data.val.first_seed to {train_end} or beyond"
        )
