"""Model builders by name (in the style of torchvision's ``models/_api.py``).

A builder takes keyword-only arguments (``num_classes`` and model-specific
ones) and returns an ``nn.Module`` with random weights; weights are loaded
separately by :mod:`models.weights`. Each entry records its task so stages can
list the backends they accept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from blinkflow.registry import Registry

#: the largest model-input side: an 8K frame's (a side of 100 000 asked torch for terabytes at the first batch)
MAX_INPUT_SIDE = 8192


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: str  # "detect", "segment", "flow", "action" or "reid"
    builder: Callable[..., Any]
    #: the torchvision weights enum, e.g. "SSDLite320_MobileNet_V3_Large_Weights"; None for own nets
    torchvision_weights: str | None = None
    #: defaults for builder keyword arguments
    defaults: dict[str, Any] = field(default_factory=dict)


MODEL_MODULES = (
    "blinkflow.models.detection",
    "blinkflow.models.segmentation",
    "blinkflow.models.flow",
    "blinkflow.models.action",
    "blinkflow.models.reid",
)

models: Registry[ModelEntry] = Registry("model", MODEL_MODULES)


def register_model(name: str, *, task: str, torchvision_weights: str | None = None, **defaults: Any):
    """Register a builder: ``@register_model("unet_small", task="segment")``."""

    def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
        models.register(name)(ModelEntry(name, task, builder, torchvision_weights, defaults))
        return builder

    return decorator


def get_model_entry(name: str, task: str | None = None) -> ModelEntry:
    from blinkflow.errors import RegistryError

    if task is not None and name not in models:  # a typo: the models of this task, not of every task
        raise RegistryError(f"unknown model {name!r}; valid {task} models: {', '.join(model_names(task))}")
    entry = models.get(name)
    if task is not None and entry.task != task:
        valid = ", ".join(model_names(task))
        raise RegistryError(f"model {name!r} is a {entry.task} model, not {task}; valid {task} models: {valid}")
    return entry


def model_names(task: str) -> list[str]:
    return [n for n in models.names() if models.get(n).task == task]


def build_model(name: str, *, task: str | None = None, **kwargs: Any):
    """Build a model with random weights (torch is imported by the builder, lazily)."""
    entry = get_model_entry(name, task)
    return entry.builder(**{**entry.defaults, **kwargs})
