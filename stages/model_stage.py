"""The base of the stages that run one torch model (detect, segment, flow, action).

``setup`` is a template: resolve the device and the weights, ``build_model(spec)``,
``check_model(model)`` (before the weights load, so a wrong shape is reported without
reading them), load the weights, move the model to the device in eval mode (in
``memory_format`` when ``channels_last`` is set, its forward compiled when ``compile`` is
not off), log one line, and warm up. A model
stage then holds its own logic only: how to build its backend, what to check, and
what to do with the outputs. ``inference()`` is the context every forward runs in
(no autograd, the configured precision).

Warm-up: one forward on zeros at setup (``warmup_inputs``), so the first real batch
does not pay for CUDA's kernel selection and allocations. ``warmup: null`` (the
default) warms up on GPU only, which keeps CPU start-up (and the tests) fast.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, ClassVar, Iterator

from blinkflow.config import StageConfig
from blinkflow.errors import ConfigError, StageError
from blinkflow.models.registry import MAX_INPUT_SIDE
from blinkflow.stages.base import Stage

log = logging.getLogger(__name__)


class ModelStage(Stage):
    """A stage around one model from the model registry; see the module docstring."""

    #: the torch memory format ``channels_last: true`` selects (``channels_last_3d`` for 5D clip models)
    memory_format: ClassVar[str] = "channels_last"

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self.model_name = self.cfg.model or self.default_model
        self.model: Any = None
        self._device: Any = None

    # ------------------------------------------------------------------ the template

    def setup(self, device: str = "cpu") -> None:
        from blinkflow.devices import resolve_device
        from blinkflow.models.weights import WeightsError, load_state, resolve_weights, with_checkpoint_classes

        self.device = device
        self._device = resolve_device(device, f"stages.{self.name}.device")
        spec = resolve_weights(self.cfg.weights, stage=self.name, model_name=self.model_name)
        spec = with_checkpoint_classes(spec, self.name)  # a fine-tuned checkpoint names its own classes
        if spec.kind == "random":  # `stages.detect: null` or a missing weights key runs an untrained net, silently
            log.warning("stages.%s.weights: null, so %s starts from random weights and its outputs mean nothing; "
                        "set weights: shipped (or a trained .pt) for real results", self.name, self.model_name)
        model = self.build_model(spec)
        self.check_model(model)
        try:
            load_state(model, spec)
        except WeightsError as exc:  # the file's words alone named neither the setting nor the fix
            raise WeightsError(f"stages.{self.name}.weights: {exc}{self._whose(spec)}") from None
        self.model = self._prepared(model)
        where = str(self._device) if str(self._device) == device else f"{self._device} ({device})"  # auto: which one
        log.info("%s: %s, %s weights%s, on %s", self.name, self.model_name, spec.kind, self.describe(), where)
        if self._wants_warmup():
            self.warm_up()

    def teardown(self) -> None:
        self.model = None
        super().teardown()

    def _whose(self, spec: Any) -> str:
        """For a file the weights manifest lists as another model's, which one and how to use it."""
        from blinkflow.models.weights import manifest_entry_for

        try:
            entry = manifest_entry_for(spec.path) if spec.path is not None else None
        except Exception:  # noqa: BLE001 - only a hint: an unreadable manifest leaves the error as it was
            entry = None
        if not entry or entry.get("model") in (None, self.model_name):
            return ""
        return (f"; the manifest lists this file as {entry.get('stage')} model {entry['model']!r}: set "
                f"stages.{self.name}.model: {entry['model']} to use it, or weights: shipped for {self.model_name}")

    # ------------------------------------------------------------------ hooks

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        """``options.input_size`` checked at load as set-up checks it (`blinkflow validate` builds no stage)."""
        try:
            check_input_size_option(name, cfg.stages[name].options)
        except StageError as exc:
            raise ConfigError(str(exc)) from None

    def build_model(self, spec: Any) -> Any:
        """The backend, untrained (the weights load next); ``spec`` is the resolved weights (class list)."""
        return self.build_backend()

    def check_model(self, model: Any) -> None:
        """Raise a StageError when the built model cannot serve these options."""

    def describe(self) -> str:
        """Extra facts for the setup log line, e.g. ``", 80 classes"``."""
        return ""

    def warmup_inputs(self) -> tuple | None:
        """The arguments of one dummy forward (on the device), or None to skip the warm-up."""
        return None

    # ------------------------------------------------------------------ helpers for the stages

    def build_backend(self, **kwargs: Any) -> Any:
        """The registry's backend for this stage's task with ``options.model_args``; an argument the
        builder does not take becomes a one-line StageError naming the YAML path."""
        from blinkflow.models.registry import build_model

        model_args = getattr(self.options, "model_args", None) or {}
        given = sorted(set(model_args) & set(kwargs))
        if given:  # "got multiple values for keyword argument" named an internal call, not the fix
            raise StageError(f"stages.{self.name}.options.model_args.{given[0]}: set by the stage itself (from the "
                             f"classes of the weights or options.classes); remove it from model_args")
        try:
            return build_model(self.model_name, task=self.name, **kwargs, **model_args)
        except (TypeError, ValueError) as exc:
            if not model_args:
                raise
            raise StageError(
                f"stages.{self.name}.options.model_args: {self.model_name} rejected {sorted(model_args)} ({exc}); "
                f"remove or fix the arguments"
            ) from None

    def autocast(self) -> Any:
        """The configured precision's autocast (a no-op for fp32 or on CPU)."""
        from blinkflow.stages.common import autocast

        return autocast(self._device, self.cfg.precision)

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No autograd, in the configured precision: the context of every forward."""
        import torch

        with torch.inference_mode(), self.autocast():
            yield

    def warm_up(self) -> None:
        inputs = self.warmup_inputs()
        if inputs is None:
            return
        with self.inference():
            self.model(*inputs)
        log.debug("%s: warmed up on %s", self.name, self._device)

    def _wants_warmup(self) -> bool:
        asked = getattr(self.cfg, "warmup", None)
        return bool(asked) if asked is not None else self._device.type == "cuda"

    def _prepared(self, model: Any) -> Any:
        import torch

        model = model.eval().to(self._device)
        if self.cfg.channels_last:
            model = model.to(memory_format=getattr(torch, self.memory_format))
        if self.cfg.compile != "off":
            if self._device.type != "cuda":  # the first frames of each batch shape took minutes, without a word
                graphs = "; its CUDA graphs apply on GPUs only" if self.cfg.compile == "reduce-overhead" else ""
                log.warning("stages.%s.compile: %s on %s compiles the forward for each new batch shape first (minutes "
                            "on a CPU)%s", self.name, self.cfg.compile, self._device, graphs)
            model.compile(mode=self.cfg.compile)  # in place: the model keeps its attributes and other methods
        return model


def pick_classes(stage: str, weight_classes: list[str] | None, option_classes: list[str] | None,
                 default: list[str], what: str = "background plus at least one class") -> list[str]:
    """The weights' own class list wins; options.classes names classes for weights without one."""
    if weight_classes and option_classes and list(option_classes) != list(weight_classes):
        raise StageError(
            f"stages.{stage}.options.classes: the weights define their own {len(weight_classes)} classes; "
            f"remove options.classes or use weights trained on your classes"
        )
    classes = list(weight_classes or option_classes or default)
    if len(classes) < 2:
        raise StageError(f"stages.{stage}.options.classes: need {what}, got {classes}")
    return classes


def checked_input_size(stage: str, size: Any, example: str, optional: bool = False) -> tuple[int, int] | None:
    """``options.input_size`` as (height, width), both in 16..MAX_INPUT_SIDE (None when ``optional`` and null)."""
    if size is None and optional:
        return None
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not 16 <= min(size) <= max(size) <= MAX_INPUT_SIDE:
        raise StageError(
            f"stages.{stage}.options.input_size: expected [height, width] with both in 16..{MAX_INPUT_SIDE}, got "
            f"{size}; e.g. input_size: {example}"
        )
    return int(size[0]), int(size[1])


def check_input_size_option(stage: str, options: Any) -> None:
    """The check a stage's ``__init__`` makes of ``options.input_size``, for the config check (validate builds
    no stage): the example is the field's default."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(options)} if dataclasses.is_dataclass(options) else {}
    if "input_size" not in fields or options.input_size is None:  # null: the type check allowed it
        return
    f = fields["input_size"]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    example = f"{default or [256, 256]}" + (", or null" if default is None or "None" in str(f.type) else "")
    checked_input_size(stage, options.input_size, example)
