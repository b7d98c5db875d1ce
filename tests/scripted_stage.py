"""A test-only detector stage, ``scripted``: it outputs tests/tracking_script.py's boxes of each frame.

Importing this module registers the stage; tests import it only while they need it and
:func:`unregister` it after, so that the stage list other tests see (``blinkflow list``, config
error messages) stays the real one. A Ray actor imports it when it unpickles the stage's options
(the driver's sys.path reaches the actors), which registers the stage there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from blinkflow.frame import Frame
from blinkflow.registry import stages as stage_registry
from blinkflow.stages.base import Stage
from tests.tracking_script import scripted_detections


@dataclass
class ScriptedOptions:
    """Test-only: the scripted detector has no options."""

    extra: dict[str, Any] = field(default_factory=dict)


class ScriptedDetect(Stage):
    """Outputs the script's boxes of each frame it computes on (not on reused frames: the gate's carry-over
    gives those their keyframe's boxes, as for a real detector)."""

    name = "scripted"
    gives_boxes = True
    Options = ScriptedOptions

    def process(self, frames: list[Frame]) -> list[Frame]:
        for frame in self.active(frames):
            frame.results[self.name] = scripted_detections(frame.index)
        return frames


def register() -> None:
    stage_registry.register("scripted")(ScriptedDetect)


def unregister() -> None:
    stage_registry._items.pop("scripted", None)  # the registry has no removal: tests only


register()
