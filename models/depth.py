"""Split a model by depth into K contiguous stages, and run the stages as a
streaming pipeline (Massively Parallel Video Networks, Carreira et al. 2018).

**Units.** A model is first cut into its natural depth *units*, the smallest
pieces a stage boundary may fall between (:func:`depth_units`):

* torchvision video ResNets (``r3d_18``, ``mc3_18``, ``r2plus1d_18``):
  ``stem, layer1.0, layer1.1, .., layer4.1, head`` (one unit per residual
  block; head = pool, flatten, fc);
* ``s3d``: each child of ``features``, then the head (pool, 1x1x1 classifier, mean);
* the project's causal net (:class:`models.causal3d.CausalConv3DNet`):
  ``stem, blocks.0.temporal, blocks.0.spatial, .., blocks.{n-1}.spatial,
  head``. Each block's temporal half is *stateful* (the block's temporal
  buffer, see :mod:`models.causal3d`), so the stage that owns it owns the
  buffer and the state splits with the blocks. A boundary between the two
  halves carries a pair (temporal features, block input), the input being
  what the shortcut needs; everything that moves activations between stages
  (:func:`map_tensors`) handles the pair;
* per-frame image backbones (torchvision ResNets, MobileNetV2/V3,
  EfficientNets, any ``nn.Sequential``): ``stem``, each residual block, ``head``, or each
  child of ``features`` then the head. These are the trunks of the detect and
  segment models; the detection/segmentation heads themselves (FPNs,
  multi-scale outputs) are not split.

The root module's forward pre-hooks (the builders in :mod:`models.action`
normalise clips with one) run at the start of the first unit, so a split model
takes the same [0, 1] input as the monolithic one.

**Balance.** :func:`split_model` times every unit on an example input
(median of a few runs, eval mode, no grad) and picks the K contiguous groups
that minimise the slowest stage (exact dynamic programme). The stages share
parameters with the model they came from; nothing is copied.

**Streaming** (:class:`StreamingDepth`, one frame per *tick*):

* ``sequential``: the frame goes through all K stages within its tick. It
  equals running the causal net frame by frame (``model.step``); lag 0.
* ``pipelined``: at tick t stage k consumes what stage k-1 produced at tick
  t-1, so the K stages can run at the same time on K devices. The output at
  tick t is exactly the model's output for frame t-(K-1) (each stage still
  sees its frames in order, so temporal state is exact); ticks 0..K-2 give
  no output. Lag = K-1 frames; throughput = 1 / slowest stage.
* ``predictive``: the pipelined computation, with the output at tick t
  attributed to frame t. It is meant for a model trained to predict the current
  frame's label despite the lag (:func:`pipelined_steps` gives the same
  outputs in clip mode for training); its information lag is still K-1.
* **Multi-rate clocks** (``rates``): stage k updates only on ticks where
  ``t % rates[k] == 0`` and only when its input is new since its last update;
  otherwise it re-emits its last output and its temporal state stays as it is.
  A slow stage therefore sees a subsampled sequence of its input.
* **Temporal skip connections** (:func:`add_temporal_skips`): a stage can carry
  a small adapter (global pool, linear, zero-initialised) whose output is added
  to the final logits one tick later, so fresh shallow features reach the
  output with a lag of 1 + source stage index instead of K-1. Zero-initialised
  adapters leave outputs unchanged; training makes them useful.

The bookkeeping of which stage consumes what at each tick lives in
:class:`DepthClock`, shared by the in-process runner here and the Ray runner in
:mod:`pipeline.depth_parallel` (its values may be tensors or Ray references).
This module imports torch at the top and never imports Ray.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn

from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)

Mode = Literal["sequential", "pipelined", "predictive"]
MODES: tuple[str, ...] = ("sequential", "pipelined", "predictive")


class DepthSplitError(BlinkflowError):
    """A model that cannot be split as asked (unsupported architecture, K out of range)."""


# --------------------------------------------------------------------------- units


@dataclass
class Unit:
    """The smallest piece of depth a stage boundary may fall between."""

    name: str
    module: nn.Module
    stateful: bool = False  # the module has .stream(x, buffer) -> (y, new_buffer)


class PreHooks(nn.Module):
    """Runs a root module's forward pre-hooks (e.g. clip normalisation) on the input."""

    def __init__(self, hooks: Sequence[Callable]) -> None:
        super().__init__()
        self.hooks = list(hooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for hook in self.hooks:
            result = hook(self, (x,))
            if result is not None:
                x = result[0] if isinstance(result, tuple) else result
        return x


class PoolHead(nn.Module):
    """pool -> flatten -> classifier, the tail of torchvision's ResNets and MobileNets."""

    def __init__(self, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pool, self.classifier = pool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


class S3DHead(nn.Module):
    """S3D's tail: pool, a 1x1x1 conv classifier, then the mean over (T, H, W)."""

    def __init__(self, pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pool, self.classifier = pool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mean(self.classifier(self.pool(x)), dim=(2, 3, 4))


class CausalTemporalHalf(nn.Module):
    """A causal block's first half: its stateful temporal conv; it passes the block input on for the shortcut.

    ``stream(x, buffer)`` returns ``((temporal features, x), new buffer)``, the
    same buffer as :meth:`models.causal3d.CausalBlock.stream` keeps.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.temporal = block.temporal
        self.time_kernel = block.time_kernel

    def stream(self, x: torch.Tensor, buffer: torch.Tensor | None) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        history = self.time_kernel - 1
        if buffer is None:
            buffer = x.new_zeros(x.shape[0], x.shape[1], history, *x.shape[3:])
        padded = torch.cat([buffer, x], dim=2)
        new_buffer = padded[:, :, padded.shape[2] - history :].clone()
        return (self.temporal(padded), x), new_buffer


class CausalSpatialHalf(nn.Module):
    """A causal block's second half: spatial conv of the temporal features plus the shortcut of the block input."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.spatial, self.shortcut, self.relu = block.spatial, block.shortcut, block.relu

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        features, x = pair
        return self.relu(self.spatial(features) + self.shortcut(x))


def main_tensor(value: Any) -> torch.Tensor:
    """The tensor a stage boundary carries: a half block's (features, block input) pair carries its input."""
    return value[1] if isinstance(value, tuple) else value


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``fn`` on a stage boundary's tensor, or on each tensor of a half block's pair."""
    return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)


class LastStep(nn.Module):
    """(N, T, C) per-step logits -> (N, C) of the last step (the causal net's clip prediction)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


def depth_units(model: nn.Module) -> tuple[list[Unit], nn.Module]:
    """The model's depth units and the ``finish`` module applied after the last stage."""
    from torchvision.models import ResNet
    from torchvision.models.video.resnet import VideoResNet

    from blinkflow.models.causal3d import CausalConv3DNet

    if isinstance(model, CausalConv3DNet):
        units = [Unit("stem", model.stem)]
        for i, block in enumerate(model.blocks):
            # two units per block: on CPU the first block's temporal half alone can cost as much as the rest of
            # the net at high resolution, so whole blocks cannot balance two stages
            units.append(Unit(f"blocks.{i}.temporal", CausalTemporalHalf(block), stateful=True))
            units.append(Unit(f"blocks.{i}.spatial", CausalSpatialHalf(block)))
        return _with_pre_hooks(model, units + [Unit("head", model.head)]), LastStep()
    if isinstance(model, (VideoResNet, ResNet)):
        stem = model.stem if isinstance(model, VideoResNet) else nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        # one unit per residual block, not per layer: layers differ a lot in cost on CPU (layer1 of r2plus1d_18
        # can take over half the time), so block boundaries are what lets K stages balance
        layers = [Unit(f"layer{i}.{j}", block) for i in range(1, 5) for j, block in enumerate(getattr(model, f"layer{i}"))]
        head = Unit("head", PoolHead(model.avgpool, model.fc))
        return _with_pre_hooks(model, [Unit("stem", stem), *layers, head]), nn.Identity()
    if callable(getattr(model, "depth_units", None)):  # a model that names its own chain (I3D)
        return _with_pre_hooks(model, [Unit(name, module) for name, module in model.depth_units()]), nn.Identity()
    if _is_s3d(model):
        features = [Unit(f"features.{i}", m) for i, m in enumerate(model.features)]
        return _with_pre_hooks(model, features + [Unit("head", S3DHead(model.avgpool, model.classifier))]), nn.Identity()
    if _pools_features_into_classifier(model):
        features = [Unit(f"features.{i}", m) for i, m in enumerate(model.features)]
        pool = getattr(model, "avgpool", None) or nn.AdaptiveAvgPool2d(1)  # MobileNetV2 pools functionally
        head = Unit("head", PoolHead(pool, model.classifier))
        return _with_pre_hooks(model, features + [head]), nn.Identity()
    if isinstance(model, nn.Sequential):
        return _with_pre_hooks(model, [Unit(str(i), m) for i, m in enumerate(model)]), nn.Identity()
    raise DepthSplitError(
        f"cannot split {type(model).__name__} by depth; supported: causal3d_small, i3d, r3d_18, mc3_18, r2plus1d_18, s3d, "
        "torchvision ResNets/MobileNets/EfficientNets/VGGs/AlexNet and nn.Sequential"
    )


def _pools_features_into_classifier(model: nn.Module) -> bool:
    """A torchvision model whose forward is exactly features -> pool -> flatten -> classifier (PoolHead): named,
    not guessed from its attributes (DenseNet has both, and a ReLU between; SqueezeNet no flatten)."""
    from torchvision.models import VGG, AlexNet, EfficientNet, MobileNetV2, MobileNetV3

    return isinstance(model, (MobileNetV2, MobileNetV3, EfficientNet, VGG, AlexNet))


def _is_s3d(model: nn.Module) -> bool:
    return type(model).__name__ == "S3D" and hasattr(model, "features") and hasattr(model, "classifier")


def _with_pre_hooks(model: nn.Module, units: list[Unit]) -> list[Unit]:
    hooks = [hook for key, hook in model._forward_pre_hooks.items() if key not in model._forward_pre_hooks_with_kwargs]
    if hooks:
        first = units[0]
        if first.stateful:
            raise DepthSplitError(f"{type(model).__name__}: a stateful first unit cannot take the model's pre-hooks")
        units[0] = Unit(first.name, nn.Sequential(PreHooks(hooks), first.module))
    return units


# --------------------------------------------------------------------------- cost and balance


def measure_costs(units: Sequence[Unit], example: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds per unit on ``example`` (median of ``repeats`` after one warm-up), eval mode, no grad."""
    modes = [u.module.training for u in units]
    timings: list[list[float]] = [[] for _ in units]
    try:
        for unit in units:
            unit.module.eval()
        with torch.no_grad():
            for run in range(repeats + 1):
                x = example
                for index, unit in enumerate(units):
                    started = time.perf_counter()
                    x = unit.module.stream(x, None)[0] if unit.stateful else unit.module(x)
                    if example.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                        torch.cuda.synchronize(example.device)
                    if run:
                        timings[index].append(time.perf_counter() - started)
    finally:
        for unit, training in zip(units, modes):
            unit.module.train(training)
    return [statistics.median(t) for t in timings]


def parameter_costs(units: Sequence[Unit]) -> list[float]:
    """A fallback cost without an example input: parameters per unit (plus one, so no unit is free)."""
    return [1.0 + sum(p.numel() for p in u.module.parameters()) for u in units]


def balanced_partition(costs: Sequence[float], k: int) -> list[tuple[int, int]]:
    """K contiguous non-empty [start, end) ranges over ``costs`` minimising the largest range sum."""
    n = len(costs)
    if not 1 <= k <= n:
        raise DepthSplitError(f"depth_parallel: {k} stages asked for, the model has {n} depth units (1..{n})")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: the smallest max-stage cost of splitting the first i units into j stages
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n - (k - j) + 1):
            for s in range(j - 1, i):
                value = max(best[j - 1][s], prefix[i] - prefix[s])
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    ranges, end = [], n
    for j in range(k, 0, -1):
        start = cut[j][end]
        ranges.append((start, end))
        end = start
    return ranges[::-1]


# --------------------------------------------------------------------------- stages


class DepthStage(nn.Module):
    """A contiguous slice of units; it owns the temporal buffers of its stateful units."""

    def __init__(self, index: int, units: Sequence[Unit]) -> None:
        super().__init__()
        self.index = index
        self.names = [u.name for u in units]
        self.units = nn.ModuleList(u.module for u in units)
        self.stateful = [u.stateful for u in units]
        self.skip: nn.Module | None = None  # a temporal skip adapter, see add_temporal_skips

    def init_state(self) -> list:
        return [None] * sum(self.stateful)

    def stream(self, x: torch.Tensor, state: list | None = None) -> tuple[torch.Tensor, list]:
        """Continue from ``state`` over the input's time steps; returns the output and the new state."""
        buffers = iter(self.init_state() if state is None else state)
        new_state = []
        for module, stateful in zip(self.units, self.stateful):
            if stateful:
                x, buffer = module.stream(x, next(buffers))
                new_state.append(buffer)
            else:
                x = module(x)
        return x, new_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Clip mode from a zero past (the same as the monolithic model's slice)."""
        return self.stream(x)[0]

    def skip_out(self, y: torch.Tensor) -> torch.Tensor | None:
        """The skip adapter's per-step contribution to the final logits (N, T, classes), if any."""
        return self.skip(y) if self.skip is not None else None

    def extra_repr(self) -> str:
        return f"index={self.index}, units={self.names}"


class SplitModel(nn.Module):
    """K depth stages that together equal the monolithic model (``finish`` after the last)."""

    def __init__(self, stages: Sequence[DepthStage], finish: nn.Module, unit_costs: Sequence[float], cost_kind: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.finish = finish
        self.unit_costs = list(unit_costs)
        self.cost_kind = cost_kind  # "seconds" (measured) or "parameters"
        #: frames (N, 3, H, W) get a time axis here before the first stage (causal nets), or None
        self.time_axis: int | None = 2 if isinstance(finish, LastStep) else None

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage_costs(self) -> list[float]:
        costs, start = [], 0
        for stage in self.stages:
            costs.append(sum(self.unit_costs[start : start + len(stage.names)]))
            start += len(stage.names)
        return costs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.finish(x)

    def init_state(self) -> list[list]:
        return [stage.init_state() for stage in self.stages]

    def prepare_frame(self, frame: torch.Tensor) -> torch.Tensor:
        return frame.unsqueeze(self.time_axis) if self.time_axis is not None else frame

    def step(self, frame: torch.Tensor, state: list[list] | None = None) -> tuple[torch.Tensor, list[list]]:
        """All K stages on one frame in sequence (the ``sequential`` schedule); like ``model.step``."""
        state = self.init_state() if state is None else state
        x, new_state = self.prepare_frame(frame), []
        for stage, stage_state in zip(self.stages, state):
            x, stage_state = stage.stream(x, stage_state)
            new_state.append(stage_state)
        return self.finish(x), new_state

    def describe(self) -> list[str]:
        total = sum(self.stage_costs) or 1.0
        unit = "ms" if self.cost_kind == "seconds" else "params"
        scale = 1000.0 if self.cost_kind == "seconds" else 1.0
        return [
            f"stage {s.index}: {', '.join(s.names)} ({c * scale:.4g} {unit}, {100 * c / total:.0f}%)"
            for s, c in zip(self.stages, self.stage_costs)
        ]


def split_model(
    model: nn.Module,
    k: int,
    *,
    example_input: torch.Tensor | None = None,
    costs: Sequence[float] | None = None,
    repeats: int = 3,
) -> SplitModel:
    """Split ``model`` into ``k`` contiguous depth stages balanced by measured cost.

    Costs come from ``costs`` (one per unit) if given, else from timing the
    units on ``example_input``, else from parameter counts.
    """
    units, finish = depth_units(model)
    if costs is not None:
        if len(costs) != len(units):
            raise DepthSplitError(f"{len(costs)} costs given for {len(units)} units ({[u.name for u in units]})")
        unit_costs, kind = list(costs), "given"
    elif example_input is not None:
        unit_costs, kind = measure_costs(units, example_input, repeats), "seconds"
    else:
        unit_costs, kind = parameter_costs(units), "parameters"
    ranges = balanced_partition(unit_costs, k)
    stages = [DepthStage(i, units[start:end]) for i, (start, end) in enumerate(ranges)]
    split = SplitModel(stages, finish, unit_costs, kind)
    split.train(model.training)
    log.info("split %s into %d stages: %s", type(model).__name__, k, "; ".join(split.describe()))
    return split


# --------------------------------------------------------------------------- temporal skips


class PooledSkip(nn.Module):
    """A temporal skip adapter: global spatial pool then a linear map to the logits, zero-initialised."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: Any) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, T, classes); of a half block's pair, the block input."""
        return self.fc(main_tensor(features).mean(dim=(3, 4)).transpose(1, 2))


def add_temporal_skips(split: SplitModel, example: torch.Tensor, num_classes: int, sources: Sequence[int] | None = None) -> None:
    """Give stages ``sources`` (default: all but the last) a zero-initialised :class:`PooledSkip`."""
    if split.time_axis is None:
        raise DepthSplitError("temporal skip connections need a streaming (causal) model")
    sources = list(range(split.num_stages - 1)) if sources is None else list(sources)
    if any(not 0 <= s < split.num_stages - 1 for s in sources):
        raise DepthSplitError(f"skip sources {sources} must name stages 0..{split.num_stages - 2}")
    x = example
    with torch.no_grad():
        for stage in split.stages:
            x = stage(x)
            if stage.index in sources:
                stage.skip = PooledSkip(main_tensor(x).shape[1], num_classes).to(example.device)


# --------------------------------------------------------------------------- the clock


@dataclass
class Slot:
    """What a stage last produced: opaque values (tensors, or Ray references) and their provenance."""

    value: Any
    frame: int  # the frame index the main path of this value comes from
    version: int  # increases at every update of the producing stage


@dataclass
class TickPlan:
    """The work of one tick: which stages update, each with the slot it consumes."""

    tick: int
    updates: list[tuple[int, Slot]] = field(default_factory=list)


class DepthClock:
    """Bookkeeping of the MPVN schedule (see the module docstring); executes nothing itself.

    ``advance(run)`` calls ``run(k, input_value)`` for every stage that updates
    this tick (stage order, so a sequential schedule can chain within the tick)
    and returns the last stage's slot plus the skip sources' slots of the
    previous tick. Values are whatever ``run`` returns.
    """

    def __init__(self, num_stages: int, mode: Mode = "pipelined", rates: Sequence[int] | None = None) -> None:
        if mode not in MODES:
            raise DepthSplitError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        rates = [1] * num_stages if rates is None else [int(r) for r in rates]
        if len(rates) != num_stages or min(rates) < 1:
            raise DepthSplitError(f"rates {rates}: need {num_stages} clock periods >= 1, one per stage")
        self.num_stages, self.mode, self.rates = num_stages, mode, rates
        self.tick = 0
        self.held: list[Slot | None] = [None] * num_stages
        self.consumed: list[tuple[int, int] | None] = [None] * num_stages  # (source stage, version) last used

    @property
    def nominal_lag(self) -> int:
        """Frames between a frame's arrival and the first output computed from it (all rates 1)."""
        return 0 if self.mode == "sequential" else self.num_stages - 1

    @property
    def drain_ticks(self) -> int:
        """Ticks without input after the last frame that bring every frame still inside to the output.

        ``pipelined`` drains its K - 1 ticks of lag (times the slowest rate); ``sequential`` only waits for a
        slower stage's next update (``rates``: the last frames reach it on a later tick); ``predictive``
        attributes each output to its tick, so ticks past the last frame would name frames that never came.
        """
        if self.mode == "pipelined":
            return (self.num_stages - 1) * max(self.rates)
        return max(self.rates) - 1 if self.mode == "sequential" else 0

    def advance(self, frame_value: Any, run: Callable[[int, Any], Any]) -> tuple[Slot | None, list[Slot | None]]:
        t, previous = self.tick, list(self.held)
        incoming = None if frame_value is None else Slot(frame_value, t, t)  # None: a drain tick
        for k in range(self.num_stages):
            if self.mode == "sequential":
                source = incoming if k == 0 else self.held[k - 1]
            else:
                source = incoming if k == 0 else previous[k - 1]
            if source is None or t % self.rates[k] != 0:
                continue
            key = (k - 1, source.version)
            if self.consumed[k] == key:
                continue  # nothing new upstream: reuse the last output, keep the state
            self.consumed[k] = key
            version = (self.held[k].version + 1) if self.held[k] is not None else 0
            self.held[k] = Slot(run(k, source.value), source.frame, version)
        self.tick += 1
        return self.held[-1], previous


# --------------------------------------------------------------------------- in-process streaming


@dataclass
class TickOutput:
    """The output of one tick."""

    tick: int
    logits: torch.Tensor | None  # (N, classes), None while the pipeline fills
    source_frame: int | None  # the newest frame the deep path's output was computed from
    skip_frames: list[int] = field(default_factory=list)  # the frames the skip contributions came from
    attributed_frame: int | None = None  # the frame this output is reported for
    seconds: list[float] = field(default_factory=list)  # per stage this tick (0 when it did not update)

    @property
    def lag(self) -> int | None:
        """Ticks between the attributed frame's arrival and this output (0 for sequential/predictive)."""
        return None if self.attributed_frame is None else self.tick - self.attributed_frame

    @property
    def information_lag(self) -> int | None:
        """How old the deep path's newest frame is (K-1 when pipelined, whatever the attribution)."""
        return None if self.source_frame is None else self.tick - self.source_frame


class StreamingDepth:
    """Runs a :class:`SplitModel` one frame per tick in process, with per-stage temporal state."""

    def __init__(self, split: SplitModel, mode: Mode = "pipelined", rates: Sequence[int] | None = None) -> None:
        self.split = split
        self.clock = DepthClock(split.num_stages, mode, rates)
        self.state = split.init_state()

    @torch.no_grad()
    def tick(self, frame: torch.Tensor | None) -> TickOutput:
        """One tick; ``frame`` None is a drain tick (no new input)."""
        seconds = [0.0] * self.split.num_stages

        def run(k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            started = time.perf_counter()
            stage = self.split.stages[k]
            y, self.state[k] = stage.stream(x[0] if isinstance(x, tuple) else x, self.state[k])
            seconds[k] = time.perf_counter() - started
            return y, stage.skip_out(y)

        t = self.clock.tick
        value = None if frame is None else self.split.prepare_frame(frame)
        last, previous = self.clock.advance(value, run)
        return combine_tick(self.split.finish, self.clock.mode, t, last, previous, seconds)

    def run(self, frames: Sequence[torch.Tensor], drain: bool = False) -> list[TickOutput]:
        """One tick per frame; ``drain`` adds the ticks without input that flush the pipeline."""
        outputs = [self.tick(frame) for frame in frames]
        return outputs + [self.tick(None) for _ in range(self.clock.drain_ticks if drain else 0)]


def combine_tick(
    finish: nn.Module, mode: str, tick: int, last: Slot | None, previous: list[Slot | None], seconds: list[float]
) -> TickOutput:
    """Final logits of a tick: the last stage's output plus the skip contributions of the previous tick."""
    if last is None:
        return TickOutput(tick, None, None, seconds=seconds)
    logits = finish(last.value[0])
    skip_frames = []
    for slot in previous[:-1]:
        if slot is not None and slot.value[1] is not None:
            logits = logits + slot.value[1][:, -1]
            skip_frames.append(slot.frame)
    attributed = tick if mode == "predictive" else last.frame
    return TickOutput(tick, logits, last.frame, skip_frames, attributed, seconds)


def pipelined_steps(split: SplitModel, clip: torch.Tensor) -> torch.Tensor:
    """Clip mode version of the pipelined schedule (all rates 1), differentiable for training.

    Returns (N, T, classes) logits where step t is what the pipelined schedule
    outputs at tick t: the deep path's logits of frame t-(K-1) plus each skip
    source s's contribution from frame t-1-s (zeros where a path has no frame
    yet). Training it against the labels of frame t is the *predictive* objective.
    """
    lag = split.num_stages - 1
    x, skips = clip, []
    for stage in split.stages:
        x = stage(x)
        contribution = stage.skip_out(x)
        if contribution is not None:
            skips.append((1 + stage.index, contribution))
    deep = x  # (N, T, classes) per-step logits of the causal head
    out = _delay(deep, lag)
    for delay, contribution in skips:
        out = out + _delay(contribution, delay)
    return out


def _delay(steps: torch.Tensor, ticks: int) -> torch.Tensor:
    """Shift (N, T, C) later by ``ticks`` along time, zeros first."""
    if ticks == 0:
        return steps
    pad = steps.new_zeros(steps.shape[0], min(ticks, steps.shape[1]), steps.shape[2])
    return torch.cat([pad, steps[:, : max(0, steps.shape[1] - ticks)]], dim=1)
