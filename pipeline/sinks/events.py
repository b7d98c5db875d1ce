"""Object events as JSON Lines: one event (pipeline/event.schema.json) per line, in frame order per stream.

``blinkflow label`` writes ``<video>.events.jsonl`` with it when the config runs the events stage;
any config can add ``{type: events, path: ...}`` to its sinks. Like the JSONL record sink, the file
is written under a temporary name and renamed into place when the run ends (a crash leaves none).
"""

from __future__ import annotations

import json
import logging
import os

from blinkflow.config import SinkConfig
from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks import AtomicFile, Sink

log = logging.getLogger(__name__)


@register_sink("events")
class EventsJsonlSink(Sink):
    """The ``events`` list of every frame record, one event per line."""

    needs_path = True

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.file = AtomicFile(cfg.path)
        self.handle = self.file.temp.open("w", encoding="utf-8")
        self.count = 0

    def write(self, result: FrameResult) -> None:
        for event in (result.results or {}).get("events") or []:
            self.handle.write(json.dumps(event, separators=(",", ":")))
            self.handle.write("\n")
            self.count += 1

    def close(self) -> None:
        if self.handle.closed:
            return
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()
        self.file.commit()
        log.info("wrote %d events to %s", self.count, self.file.path)

    def abort(self) -> None:
        if not self.handle.closed:
            self.handle.close()
        self.file.discard()
