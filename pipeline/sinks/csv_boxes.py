"""``type: csv``: one row per detected box (stream, frame, pts, class, score, x1, y1, x2, y2), for spreadsheets.
A failed frame has no rows (the JSON records say why it failed).

The whole sink is this file: the registry imports every module of ``blinkflow.sinks``.
"""

from __future__ import annotations

import csv
import io

from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks import AtomicFile, Sink, said_whole_at_the_end

COLUMNS = ["stream", "index", "pts", "class", "score", "x1", "y1", "x2", "y2"]


@register_sink("csv")
class CsvSink(Sink):
    """Boxes of the detect stage as CSV rows, written atomically when the run ends."""

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"path"})
    check_pipeline = staticmethod(said_whole_at_the_end)  # live runs: held until the end, said at load

    needs_path = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.file = AtomicFile(cfg.path)
        self.handle = self.file.temp.open("w", newline="")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(COLUMNS)

    def write(self, result: FrameResult) -> None:
        if result.outcome.value == "failed":
            return  # a later stage failed on it: its boxes are not the frame's answer (as the COCO sink)
        found = result.results.get("detect") or {}
        for box, name, score in zip(found.get("boxes", []), found.get("classes", []), found.get("scores", [])):
            self.writer.writerow([result.stream_id, result.index, round(result.pts, 6), name, score, *box])

    def close(self) -> None:
        self.handle.close()
        self.file.commit()

    def abort(self) -> None:
        self.handle.close()
        self.file.discard()


def read_rows(text: str) -> list[dict[str, str]]:
    """The rows of a CSV this sink wrote (for tests and notebooks)."""
    return list(csv.DictReader(io.StringIO(text)))
