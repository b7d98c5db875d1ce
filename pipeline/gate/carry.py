"""The driver's half of the gate: carry a keyframe's results over to the frames the gate reused,
score audits, and relay the audits' agreement back to the gate.

:class:`CarryOver` runs in the driver (inside ``OrderedOutput``, identical for both runners): it fills
reused frames, moving each stage's results along the frame's motion as the stage declares
(``Stage.follow_motion``, via :func:`compensate`), scores audits (``Stage.agreement``, via
:func:`agreement`), keeps per-stream :class:`StreamSkipStats` and queues the audit agreement that goes
back to the gate (see :meth:`CarryOver.attach_feedback` for why that is deterministic). Stages are
looked up by name in the registry: no model stage is named here.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blinkflow.frame import GateMark
from blinkflow.gate.motion import is_still, motion_from_flow

log = logging.getLogger(__name__)

#: the results key of an audit's scores (``{"agreement", "boxes_f1", "mask_iou", "audit_of"}``); never carried over
AUDIT_KEY = "audit"


def agreement(carried: dict[str, Any], fresh: dict[str, Any], stages: list[str] | None = None) -> dict[str, float] | None:
    """Each audited stage's scores of carried-over against fresh results (``Stage.agreement``: box F1 at
    IoU 0.5 for detect, mask mIoU for segment); ``score`` is the worst.

    ``stages`` limits the comparison to those stages (a refresh ran only them: the others' results
    on the frame are themselves carried over, so comparing them would only find agreement)."""
    out: dict[str, float] = {}
    for name, stage_cls in _stage_classes(fresh if stages is None else stages):
        if name in carried and name in fresh:
            out.update(stage_cls.agreement(carried[name], fresh[name]) or {})
    if not out:
        return None
    out["score"] = min(out.values())
    return out


def disagreement_by_tile(carried: dict[str, Any], fresh: dict[str, Any], stages: list[str] | None,
                         grid: tuple[int, int], height: int, width: int) -> np.ndarray | None:
    """The share of each tile (``grid``) where any audited stage's carried-over and fresh results disagree
    (``Stage.disagreement``), a (rows, cols) float32 array; None when no stage can say."""
    from blinkflow.gate.tiles import tile_fractions

    region = None
    for name, stage_cls in _stage_classes(fresh if stages is None else stages):
        if name in carried and name in fresh:
            disagrees = stage_cls.disagreement(carried[name], fresh[name], height, width)
            if disagrees is not None:
                region = disagrees if region is None else region | disagrees
    return None if region is None else tile_fractions(region, grid).astype(np.float32)


def frame_boxes(results: dict[str, Any]) -> list[list[float]]:
    """Every box of a frame's results (any stage's ``boxes``: the detector's, the tracker's), source pixels."""
    boxes: list[list[float]] = []
    for value in results.values():
        if isinstance(value, dict) and isinstance(value.get("boxes"), list):
            boxes.extend([float(v) for v in box[:4]] for box in value["boxes"])
    return boxes


def _without(result: Any, keys: tuple[str, ...]) -> Any:
    """``result`` without ``keys`` (a copy; the keyframe's own result is left as it is)."""
    if not (keys and isinstance(result, dict) and any(key in result for key in keys)):
        return result
    return {key: value for key, value in result.items() if key not in keys}


def _stage_classes(names: Any) -> list[tuple[str, type]]:
    """(name, registered stage class) of the names that are stages (results also hold e.g. the audit)."""
    from blinkflow.registry import stages as stage_registry

    return [(name, stage_registry.get(name)) for name in names if name in stage_registry]


def compensate(results: dict[str, Any], motion: np.ndarray | None, height: int, width: int) -> dict[str, Any]:
    """The keyframe's results moved along ``motion``, each stage's as it declares (``Stage.follow_motion``:
    detect shifts its boxes, segment warps its class map). The others are shared unchanged (the same
    objects), as a plain carry-over does."""
    if is_still(motion):
        return dict(results)
    moved = dict(results)
    for name, stage_cls in _stage_classes(results):
        moved[name] = stage_cls.follow_motion(results[name], motion, height, width)
    return moved


def _recomputed_area(results: dict[str, Any]) -> float:
    """The fraction of a forward a partial frame's tile recompute cost, as the stage reports it
    (``"tiles": {"area"}``: segment); 0 when no stage recomputed tiles."""
    areas = [r["tiles"]["area"] for r in results.values()
             if isinstance(r, dict) and isinstance(r.get("tiles"), dict) and "area" in r["tiles"]]
    return float(areas[0]) if areas else 0.0


@dataclass
class StreamSkipStats:
    """Per-stream gate figures the driver keeps (and the metrics exporter can read)."""

    frames: int = 0
    reused: int = 0
    partial: int = 0
    refreshed: int = 0
    audits: int = 0
    agreement_sum: float = 0.0
    agreement_last: float | None = None
    threshold: float | None = None
    recomputed_area: float = 0.0  # segment tiles: fraction of a frame recomputed, summed over partial frames

    @property
    def skip_ratio(self) -> float:
        return self.reused / self.frames if self.frames else 0.0

    @property
    def agreement_mean(self) -> float | None:
        return self.agreement_sum / self.audits if self.audits else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "reused": self.reused, "partial": self.partial,
            "refreshed": self.refreshed, "audits": self.audits,
            "skip_ratio": round(self.skip_ratio, 6), "agreement_mean": self.agreement_mean,
            "agreement_last": self.agreement_last, "threshold": self.threshold,
            "recomputed_area": round(self.recomputed_area, 4),
        }


@dataclass
class CarryOver:
    """Driver-side half of the gate: fill reused frames, score audits, relay agreement.

    ``motion`` is the gate's ``motion`` setting: ``"mvs"`` uses the field the
    gate accumulated from the decoder's vectors (``frame.gate.motion``), ``"flow"``
    extrapolates the keyframe's flow result, ``"auto"`` tries both in that order.
    ``lag`` is ``gate.audit_lag``; ``adaptive`` says whether the gate uses the
    feedback, ``objects`` whether it weighs change by the stream's boxes (``object_weight``). Failures
    reach the gate whatever they say (``enabled``: a gate runs), so the Ray runner waits for the lag
    with any gate, see :meth:`ready_for`. ``regions`` (the tiles grid, with
    ``region_budget``) adds to each audit's feedback where on that grid the results disagreed.
    """

    enabled: bool = False
    motion: str = "off"
    lag: int = 8
    adaptive: bool = False
    objects: bool = False
    regions: tuple[int, int] | None = None
    stats: dict[str, StreamSkipStats] = field(default_factory=lambda: defaultdict(StreamSkipStats))
    _feedback: dict[str, list[tuple]] = field(default_factory=lambda: defaultdict(list))
    _boxes: dict[str, list[tuple[int, list[list[float]]]]] = field(default_factory=lambda: defaultdict(list))
    _failed: dict[str, int] = field(default_factory=dict)  # a stream's latest failed processed frame, for the gate

    @classmethod
    def from_config(cls, gate_cfg: Any | None, wave_size: int = 1, held: int = 0) -> "CarryOver":
        """``wave_size``: the runner's waves. The lag is at least one wave: a frame's feedback is then always
        from frames of earlier waves, whatever the runner sends together (with a longer wave than the lag, the
        local runner's mixed waves and the threaded and Ray runners' per-shard ones gave the gate different
        feedback, and so different decisions). ``held``: the frames a stage keeps back (Stage.held_frames):
        the lag is longer still, else the frames up to it were never all out and the threaded and Ray runners
        finished every batch before sending the next (the action stage in archive mode: no overlap)."""
        if gate_cfg is None or not getattr(gate_cfg, "enabled", False):
            return cls()
        regions = tuple(gate_cfg.tiles) if gate_cfg.region_budget and gate_cfg.tiles else None
        lag = max(gate_cfg.audit_lag, wave_size, held + 1 if held else 0)
        if lag > gate_cfg.audit_lag and (gate_cfg.adaptive or gate_cfg.uses_objects):
            why = "a stage holds frames back" if held + 1 == lag else "one wave"
            log.info("gate: audit feedback %d frames late (%s), not gate.audit_lag %d", lag, why, gate_cfg.audit_lag)
        return cls(enabled=True, motion=gate_cfg.motion, lag=lag, adaptive=gate_cfg.adaptive,
                   objects=gate_cfg.uses_objects, regions=regions)

    def fill(self, frame: Any, keyframe_results: dict[str, Any]) -> None:
        """Give a reused frame its keyframe's results, moved along the frame's motion; a refresh frame gets
        those of the stages that did not run on it."""
        motion = self._motion_for(frame, keyframe_results)
        carried = compensate(keyframe_results, motion, frame.height, frame.width) if motion is not None else keyframe_results
        run_keys = {name: stage_cls.run_keys for name, stage_cls in _stage_classes(carried)}
        for stage, value in carried.items():
            if stage != AUDIT_KEY:
                frame.results.setdefault(stage, _without(value, run_keys.get(stage, ())))

    def observe(self, frame: Any, keyframe_results: dict[str, Any] | None) -> None:
        """Count a finished frame; for an audit, score the would-be carry-over against the fresh results."""
        gate = frame.results.get("gate")
        if not isinstance(gate, dict):
            return
        if gate.get("reason") in ("restart", "resized"):
            self._forget_before(frame.stream_id, frame.index)
        if self.objects and not frame.is_failed:
            self._boxes[frame.stream_id].append((frame.index, frame_boxes(frame.results)))
        stats = self.stats[frame.stream_id]
        stats.frames += 1
        stats.threshold = gate.get("threshold", stats.threshold)
        decision = gate.get("decision")
        if decision == "reuse":
            stats.reused += 1
        elif decision == "refresh":
            stats.refreshed += 1
        elif decision == "partial":
            stats.partial += 1
            stats.recomputed_area += _recomputed_area(frame.results)
        audit_of = frame.mark.audit_of
        if audit_of is None:
            return
        scores = None
        if not frame.is_failed and keyframe_results:
            predicted = compensate(keyframe_results, self._motion_for(frame, keyframe_results), frame.height, frame.width)
            scores = agreement(predicted, frame.results, frame.mark.refresh)
        if scores is None:  # nothing to score (failed, or no stage that scores): the gate still forgets the audit
            self._feedback[frame.stream_id].append((frame.index, None) if self.regions is None else (frame.index, None, None))
            return
        frame.results[AUDIT_KEY] = {"agreement": scores.pop("score"), **scores, "audit_of": int(audit_of)}
        scores["score"] = frame.results[AUDIT_KEY]["agreement"]
        stats.audits += 1
        stats.agreement_sum += scores["score"]
        stats.agreement_last = scores["score"]
        if self.regions is None:
            self._feedback[frame.stream_id].append((frame.index, scores["score"]))
            return
        where = disagreement_by_tile(predicted, frame.results, frame.mark.refresh, self.regions, frame.height, frame.width)
        self._feedback[frame.stream_id].append((frame.index, scores["score"], where))

    def _motion_for(self, frame: Any, keyframe_results: dict[str, Any]) -> np.ndarray | None:
        mark = frame.mark
        if self.motion in ("mvs", "auto") and mark.motion is not None:
            return np.asarray(mark.motion, dtype=np.float32)
        if self.motion in ("flow", "auto"):
            key = mark.reuse_of if mark.reuse_of is not None else mark.audit_of
            if key is None and mark.carried:  # a refresh for change carries stages from the gate's keyframe
                key = (frame.results.get("gate") or {}).get("keyframe")
            if key is not None:
                return motion_from_flow(keyframe_results.get("flow"), int(key), frame.index)
        return None

    # ------------------------------------------------------------------ feedback to the gate

    def ready_for(self, frame: Any, next_index: int) -> bool:
        """True when every frame at or before ``frame.index - lag`` of its stream has been emitted.

        The Ray runner consumes finished chains until this holds (or none are
        left) before it submits ``frame``; the local runner always has it (or
        never will, for frames a holding stage still keeps). Either way both
        runners attach the same feedback to the same frame, so the gate's
        adaptive decisions are identical in both.
        """
        return not self.enabled or next_index > frame.index - self.lag

    def note_failed(self, frame: Any) -> None:
        """A frame the gate had the models run on failed: the gate hears of it ``lag`` frames later, as it
        hears of audits, so that it stops building on it (with the feedback's timing: the same in every runner;
        without adaptive thresholds too: the frames in between fail, not every one up to the next keyframe)."""
        if self.enabled:
            self._failed[frame.stream_id] = frame.index

    def attach_feedback(self, frames: list[Any]) -> None:
        """Hand each frame the agreement of its stream's audits at least ``lag`` frames older, once, and
        (``objects``) the boxes of its stream's latest frame at least ``lag`` frames older."""
        for frame in frames:
            self._attach_boxes(frame)
            failed = self._failed.get(frame.stream_id)
            if failed is not None and failed <= frame.index - self.lag:
                if frame.gate is None:
                    frame.gate = GateMark()
                frame.gate.failed = self._failed.pop(frame.stream_id)
            queue = self._feedback.get(frame.stream_id)
            if not queue:
                continue
            due = [item for item in queue if item[0] <= frame.index - self.lag]
            if due:
                if frame.gate is None:
                    frame.gate = GateMark()
                frame.gate.feedback = due
                self._feedback[frame.stream_id] = [item for item in queue if item[0] > frame.index - self.lag]

    def _attach_boxes(self, frame: Any) -> None:
        queue = self._boxes.get(frame.stream_id)
        due = [item for item in queue or [] if item[0] <= frame.index - self.lag]
        if not due:
            return
        if frame.gate is None:
            frame.gate = GateMark()
        frame.gate.objects_from, frame.gate.objects = due[-1]
        self._boxes[frame.stream_id] = queue[len(due) - 1 :]  # the latest due stays: the next frame may need it

    def _forget_before(self, stream_id: str, index: int) -> None:
        """The gate started the stream afresh at ``index`` (a restart, a new frame size): what the driver holds
        for it from before (audits, boxes of another size, a failure) is not for the new state."""
        self._feedback[stream_id] = [item for item in self._feedback.get(stream_id, []) if item[0] >= index]
        self._boxes[stream_id] = [item for item in self._boxes.get(stream_id, []) if item[0] >= index]
        if self._failed.get(stream_id, index) < index:
            del self._failed[stream_id]

    def end_stream(self, stream_id: str) -> None:
        self._feedback.pop(stream_id, None)
        self._boxes.pop(stream_id, None)
        self._failed.pop(stream_id, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {stream: stats.as_dict() for stream, stats in self.stats.items()}
