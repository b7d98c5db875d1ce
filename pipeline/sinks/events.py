"""Object events as JSON Lines: one event (pipeline/event.schema.json) per line, in frame order per stream.

``blinkflow label`` writes ``<video>.events.jsonl`` with it when the config runs the events stage;
any config can add ``{type: events, path: ...}`` to its sinks. It is the JSONL sink with events for
lines: archive runs write the file under a temporary name and rename it into place at the end (a
crash leaves none); live runs append and flush every event, and rotate at ``rotate_mb``.
"""

from __future__ import annotations

import logging
from typing import Any

from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks import JsonlSink

log = logging.getLogger(__name__)


@register_sink("events")
class EventsJsonlSink(JsonlSink):
    """The ``events`` list of every frame record, one event per line."""

    settings = JsonlSink.settings  # its own entry: the config check reads a class's own list only

    @staticmethod
    def check_pipeline(sink: Any, cfg: Any, path: str) -> None:
        if "events" not in cfg.enabled_stages():
            log.warning("%s: an events sink writes the events stage's events, and this config has no stages.events "
                        "(add it after stages.track): its file stays empty", path)

    def lines(self, result: FrameResult) -> list[dict[str, Any]]:
        return list((result.results or {}).get("events") or [])
