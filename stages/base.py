"""The stage contract shared by every stage and both runners.

A stage is a plain class (no Ray). The runner builds it from its resolved
:class:`pipeline.config.StageConfig` (cheap, picklable), calls ``setup(device)``
inside the worker, then ``process(frames)`` on batches, ``end_stream`` when a
stream ends, ``flush()`` at the end of the run, and ``teardown()``.

Contract of ``process``:
  * it receives frames of any streams, in order per stream;
  * it computes only on *active* frames (not reused by the gate, not failed, not a gate refresh
    of other stages: :meth:`Frame.runs`);
  * it writes its output to ``frame.results[self.name]``;
  * it returns the frames whose results are final, in order per stream. A
    temporal stage may hold frames back (the action stage waits for the clip
    that covers them) and return them from a later call, ``end_stream`` or
    ``flush``. No frame is ever lost.
  * an exception fails the whole batch; the runner then retries frame by frame
    so that one bad frame fails alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from blinkflow.frame import Frame


@dataclass
class NoOptions:
    """This stage has no stage-specific options."""


class Stage:
    """Base class with the default no-op behaviour of the contract above."""

    name: ClassVar[str] = "stage"
    #: temporal stages keep per-stream state, so each stream sticks to one replica, in order
    temporal: ClassVar[bool] = False
    #: the dataclass that types ``stages.<name>.options`` in the config
    Options: ClassVar[type] = NoOptions
    #: backend used when the config names none
    default_model: ClassVar[str | None] = None
    #: attributes holding dicts keyed by stream id of recomputable per-stream state (caches, no held
    #: frames): the default end_stream, flush and teardown forget them
    stream_caches: ClassVar[tuple[str, ...]] = ()
    #: a *driver* stage runs in the driver on the ordered output (pipeline/runners/base.py OrderedOutput),
    #: after the gate's carry-over filled reused frames: it sees every frame of a stream once, in order,
    #: with its final results (tracking and events need the carried boxes of reused frames too)
    driver: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.options = cfg.options if cfg is not None and cfg.options is not None else self.Options()
        self.device = "cpu"

    @classmethod
    def held_frames(cls, cfg: Any) -> int:
        """How many frames of a stream this stage, configured by ``cfg``, usually keeps back before releasing
        them (the action stage waits for clips): the driver's gate feedback waits at least that long, so that
        the threaded and Ray runners need not finish every batch before sending the next (0: none held)."""
        return 0

    def setup(self, device: str = "cpu") -> None:
        self.device = device

    def process(self, frames: list[Frame]) -> list[Frame]:
        return frames

    def end_stream(self, stream_id: str) -> list[Frame]:
        """The stream ended (or restarted): release its held frames and forget its state."""
        for name in self.stream_caches:
            getattr(self, name).pop(stream_id, None)
        return []

    def flush(self) -> list[Frame]:
        """End of the run: release every held frame."""
        for name in self.stream_caches:
            getattr(self, name).clear()
        return []

    def teardown(self) -> None:
        for name in self.stream_caches:
            getattr(self, name).clear()

    #: keys of a result that describe the run that made it (what it cost), not the frame: a copy carried over to
    #: a reused frame leaves them out, so that records summed over frames count each run once
    run_keys: tuple[str, ...] = ()

    @staticmethod
    def follow_motion(result: Any, motion: Any, height: int, width: int) -> Any:
        """This stage's ``result`` moved along a backward motion field (pipeline/gate/motion.py), for a frame the
        gate reused: the driver's carry-over calls it. The default carries the result over unchanged."""
        return result

    @staticmethod
    def agreement(carried: Any, fresh: Any) -> dict[str, float] | None:
        """How well a carried-over result matches a fresh one, as named scores in [0, 1] (the audits'
        worst score drives the adaptive gate); None: this stage's results are not audited."""
        return None

    @staticmethod
    def disagreement(carried: Any, fresh: Any, height: int, width: int) -> Any:
        """Where a carried-over result and a fresh one disagree, as a (height, width) boolean map of the
        frame (the gate's per-region budget, ``gate.region_budget``); None: this stage cannot say."""
        return None

    def active(self, frames: list[Frame]) -> list[Frame]:
        """Frames this stage must compute on: not reused, not failed, not a refresh of other stages."""
        return [f for f in frames if f.runs(self.name)]
