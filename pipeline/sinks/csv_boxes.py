"""``type: csv``: one row per detected box (stream, frame, pts, class, score, x1, y1, x2, y2, outcome,
carried_from), for spreadsheets. ``carried_from`` is empty when the detector ran on the frame, else the frame
whose boxes the gate carried over (moved along the motion): a reused frame, or a refresh that ran other stages.
A failed frame has no rows (the JSON records say why it failed).

The whole sink is this file: the registry imports every module of ``blinkflow.sinks``.
"""

from __future__ import annotations

import csv
import io

from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks import AtomicFile, Sink, said_whole_at_the_end

COLUMNS = ["stream", "index", "pts", "class", "score", "x1", "y1", "x2", "y2", "outcome", "carried_from"]


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
        said = [result.outcome.value, _carried_from(result)]
        for box, name, score in zip(found.get("boxes", []), found.get("classes", []), found.get("scores", [])):
            self.writer.writerow([result.stream_id, result.index, round(result.pts, 6), name, score, *box, *said])

    def close(self) -> None:
        self.handle.close()
        self.file.commit()

    def abort(self) -> None:
        self.handle.close()
        self.file.discard()


def _carried_from(result: FrameResult) -> int | str:
    """The frame the detector's boxes were found on, when not this one (a carried box read as a fresh one)."""
    if result.reuse_of is not None:
        return result.reuse_of
    gate = result.results.get("gate") or {}
    if gate.get("decision") == "refresh" and "detect" not in (gate.get("stages") or []):
        return gate.get("keyframe", "")
    return ""


def read_rows(text: str) -> list[dict[str, str]]:
    """The rows of a CSV this sink wrote (for tests and notebooks)."""
    return list(csv.DictReader(io.StringIO(text)))
