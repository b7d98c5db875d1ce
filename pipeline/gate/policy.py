"""The gate's decision policy: temporal-redundancy skipping, per stream and per frame (docs/skipping.md).
The gate stage (stages/gate.py) feeds it each frame; this module holds the decision, the adaptive
threshold, the audits' budget and the refresh bounds.

Each frame is compared with the *reference* of its stream: the downscaled
grayscale of the last processed frame, patched tile by tile where partial
frames refreshed it, so it always shows what the caches hold. The signal is
block-averaged (``downscale``), the absolute difference box-blurred (``blur``),
and a pixel counts as changed above ``pixel_threshold`` (raised to
``noise_sigmas`` robust sigmas of the difference when that is set); this keeps
codec noise out. The gate reports the changed fraction and the largest
connected changed area, and decides:

* ``reuse`` (change below the stream's threshold): the model stages skip the
  frame; the driver carries the keyframe's results over, moved along the
  decoder's motion vectors when the source exports them (the comparison then
  uses the motion-compensated reference). ``frame.gate.reuse_of`` names the
  keyframe; ``frame.gate.motion`` holds the accumulated motion field.
* ``partial`` (with ``tiles``: at most ``partial_changed`` of the signal
  changed, and the change, grown by ``tile_margin`` tiles, stays inside at
  most ``partial_max`` of the tiles): the frame is processed; the segment
  stage recomputes only ``frame.gate.tiles["changed"]`` and pastes them into its
  cached map, the detect stage runs on their bounding crop and merges with its
  last boxes (each stage runs in full where its crops would cost about as much).
* ``keyframe``: everything runs. Reasons: ``first``, ``restart`` (the index
  went backwards), ``resized``, ``cut`` (change above ``cut_threshold``),
  ``changed``, ``max_reuse``, ``audit`` and ``uncertain``. The last three are *audits*: frames
  the gate would have reused (``uncertain``: its change is at least ``audit_uncertain`` of the
  threshold, where reuse is riskiest); ``frame.gate.audit_of`` tells the driver to score
  the would-be carry-over against the fresh results.
* ``refresh`` (a frame the gate would reuse, not identical to the reference, but
  a stage in ``refresh`` has not run for its bound of frames): only the stages in ``frame.gate.refresh`` run;
  the driver carries the others over as for a reused frame and audits the
  refreshed stages' would-be carry-over. Masks go stale under drift the pixel
  signal cannot see (a slow object moves a pixel a frame) long before boxes
  matched at IoU 0.5 do, so the segmenter can refresh more often than the rest.

With ``adaptive``, the agreement of each audit comes back ``audit_lag`` frames
later in ``frame.gate.feedback`` (see blinkflow.gate.carry.CarryOver) and moves the
stream's threshold: up (x ``adapt_up``) when it met ``agreement_target``, down
(to the audited change x ``adapt_down``) when it did not, but below the
configured threshold only when the audited change was above it. A refresh audits only
its stages, on a frame the gate would reuse, at the stalest frame of its span: it
*met* the target when the span it ends does on average (drift adds up about
linearly from the stage's last run, see ``_span_meets``). Then, if the latest
audit of every other stage met it too, it raises the threshold like a keyframe
audit; a miss was drift below the pixel signal, which a lower threshold cannot
see, so the threshold stays. With ``adapt_bounds`` the refresh also moves its
stages' bounds in that stream by a frame, between 1 and twice the configured bound (four times the segmenter's).
With ``region_budget`` each audit's feedback also says where (per tile) the carried-over
results disagreed: a tile that had changed before an audit that found it harmless counts
REGION_DECAY times less towards threshold (down to REGION_FLOOR), a tile where they disagreed
counts in full again, so reuse is spent where it costs least.
Everything here is a function of the stream's frames in order, so both runners
decide alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blinkflow.config import GateConfig
from blinkflow.frame import Frame, GateMark
from blinkflow.gate.agreement import BOUND_GROWTH, BOUND_SHARE, REFRESH_GROWTH, moved_bound, span_meets
from blinkflow.gate.motion import (
    MOTION_KEY, DecoderMotion, attach_decoder_motion, compose_motion, is_still,
)
from blinkflow.gate.signal import blurred_difference, gray_signal, largest_component, lit, measured_change
from blinkflow.gate.tiles import (
    changed_tile_grid, changed_tiles, patch_tiles, tile_counts, tile_indices, tile_maxima,
)

#: the gate stage's name: a frame's results hold its decision under it
RESULT_KEY = "gate"



@dataclass
class _StreamState:
    key_index: int  # the last processed frame: what reused frames copy
    reference: np.ndarray  # the signal every stage's cache represents (refreshes move only stage_refs)
    last_index: int
    threshold: float
    reused_since_key: int = 0
    partial_run: int = 0
    since_audit: int = 0
    motion: np.ndarray | None = None  # backward motion from the last processed frame
    frames: int = 0
    reused: int = 0
    pending_audits: dict[int, float] = field(default_factory=dict)  # audit index -> its change
    agreement: float | None = None
    stale: dict[str, int] = field(default_factory=dict)  # per refresh stage: frames it has not run on
    bounds: dict[str, int] = field(default_factory=dict)  # per refresh stage: its bound (adaptive moves it)
    pending_refresh: dict[int, dict[str, int]] = field(default_factory=dict)  # refresh index -> its stages' staleness
    passing: dict[str, bool] = field(default_factory=dict)  # per stage: whether its latest audit met the target
    full_index: int = -1  # the last frame every stage ran on (keyframe or partial)
    full_motion: np.ndarray | None = None  # backward motion from full_index, once a refresh split it from ``motion``
    split_motion: bool = False  # a refresh since full_index: ``motion`` starts at the refresh, full_motion does not
    stage_refs: dict[str, np.ndarray] = field(default_factory=dict)  # refreshed stages' newer references
    previous: np.ndarray | None = None  # the last frame's signal, for the frame-to-frame noise floor
    noise: np.ndarray | None = None  # per tile: largest frame-to-frame change since the last processed frame
    ran: dict[str, int] = field(default_factory=dict)  # per refresh stage: the last frame it ran on
    objects: np.ndarray | None = None  # object_weight, object_tiles: the recent boxes on the signal grid (bool)
    regions: np.ndarray | None = None  # region_budget: each tile's weight towards threshold (rows, cols)
    pending_regions: dict[int, np.ndarray] = field(default_factory=dict)  # audit index -> the tiles changed then
    since_index: int = 0  # the frame this state began on (first, restart, resized): older audits are not its own


@dataclass
class _Change:
    changed: float  # against the (motion-compensated) reference
    largest: float
    tiles: list[int] | None = None  # against the plain reference: what the segment cache must redo
    compensated: bool = False
    weighted: float | None = None  # object_weight, region_budget: changed pixels counted by where they are
    grid: np.ndarray | None = None  # region_budget: the tiles that changed (rows, cols; bool)
    core: list[int] | None = None  # the changed tiles without tile_margin's ring (None: no ring)

    @property
    def score(self) -> float:
        """What the threshold (and the audits' budget) is compared with."""
        return self.changed if self.weighted is None else self.weighted


class GatePolicy:
    """The gate's per-stream decision state, fed each stream's frames in order (the gate stage's
    ``process``); plain Python and numpy, so both runners decide alike."""

    def __init__(self, cfg: GateConfig) -> None:
        self.cfg = cfg
        self.streams: dict[str, _StreamState] = {}
        self.decoders: dict[str, DecoderMotion] = {}  # per stream: the decoder's motion state (follow_motion)

    def end_stream(self, stream_id: str) -> None:
        self.streams.pop(stream_id, None)
        self.decoders.pop(stream_id, None)

    def follow_motion(self, frame: Frame) -> None:
        """With ``motion: mvs`` or ``auto``, turn the decoder's vectors the source attached to ``frame`` into
        its one-frame field (``frame.meta["mvs"]``, which the segmenter's feature reuse reads too). The
        source leaves this to the gate so that its decoder thread keeps pace with plain decoding; the gate
        sees every frame of its stream in order, reused ones too. Failed frames as well: the gate stage
        calls this for them, since the decoder's state moves frame by frame."""
        if self.cfg.motion in ("mvs", "auto"):
            attach_decoder_motion(frame, self.decoders)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per-stream skip ratio, threshold and last audit agreement (as this replica sees them)."""
        return {
            stream: {"frames": s.frames, "reused": s.reused, "skip_ratio": s.reused / max(1, s.frames),
                     "threshold": s.threshold, "agreement": s.agreement}
            for stream, s in self.streams.items()
        }

    # ------------------------------------------------------------------ decisions

    def decide(self, frame: Frame) -> None:
        """Decide ``frame`` (its stream's next): set its gate mark and its ``gate`` result."""
        mark = frame.mark  # the driver's feedback, objects and failures, attached before this call
        frame.gate = GateMark()  # the decision is made afresh
        self.follow_motion(frame)
        signal = gray_signal(frame.image, self.cfg.downscale)
        state = self.streams.get(frame.stream_id)
        reason = self._restart_reason(state, frame, signal)
        if reason:
            self._keyframe(frame, signal, None, _Change(1.0, 1.0), reason)
            return
        state.frames += 1
        state.last_index = frame.index
        self._apply_feedback(state, mark.feedback)
        objects = mark.objects
        if mark.failed is not None and state.key_index <= mark.failed:
            # the frame every reuse since builds on failed in a model stage: there is nothing to carry over
            self._keyframe(frame, signal, state, _Change(1.0, 1.0), "failed")
            return
        if objects is not None and self.cfg.uses_objects and (mark.objects_from is None or mark.objects_from >= state.since_index):
            state.objects = object_grid(objects, signal.shape, self.cfg.downscale, self.cfg.object_margin)
        if self.cfg.motion in ("mvs", "auto"):
            step = _step_motion(frame)
            state.motion = compose_motion(step, state.motion)
            if state.split_motion:
                state.full_motion = compose_motion(step, state.full_motion)
        self._track_noise(state, signal)
        change = self._measure(state, signal)
        reason = self._refresh_reason(state, change)
        due, drift_tiles = ([], None) if reason else self._due(state, signal)
        if reason == "partial":
            self._partial_or_carry(frame, signal, state, change)
        elif reason:
            self._keyframe(frame, signal, state, change, reason)
        elif due:
            self._refresh(frame, signal, state, change, due, drift_tiles)
        else:
            self._reuse(frame, state, change)

    def _partial_or_carry(self, frame: Frame, signal: np.ndarray, state: _StreamState, change: _Change) -> None:
        """A partial frame, unless stages in ``carry_until`` may be carried over it: then the others run on
        the tiles that changed since their own results (a refresh for change, not an audit), or none does."""
        carried = self._carried_stages(state, change)
        running = [stage for stage in state.bounds if stage not in carried]
        if not (carried and running):  # nothing carried, or no bounded stage left to run: every stage runs
            self._partial(frame, signal, state, change)
            return
        tiles = self._changed_since(state, signal, running)
        if tiles:
            self._refresh(frame, signal, state, change, running, tiles, carried=sorted(carried))
        else:
            self._reuse(frame, state, change)

    def _carried_stages(self, state: _StreamState, change: _Change) -> set[str]:
        """The ``carry_until`` stages whose factor times the threshold the change stays under and that are
        within their refresh bound (past it, they run: the bound caps how stale carried results get). The
        threshold is the configured one, or the stream's where audits lowered it: an audit that raised it
        showed reuse held at the change it saw, which says nothing of carrying a stage at three times more
        (on the parking lot, cars driving in were carried past at a raised threshold)."""
        cfg = self.cfg
        top = min(state.threshold, cfg.threshold)
        return {stage for stage, factor in cfg.carry_until.items()
                if stage in state.bounds and change.score < factor * top
                and state.stale.get(stage, 0) < state.bounds[stage]}

    def _changed_since(self, state: _StreamState, signal: np.ndarray, stages: list[str]) -> list[int]:
        """The tiles (with tile_margin) where ``signal`` changed since the results of any of ``stages``."""
        cfg = self.cfg
        tiles: set[int] = set()
        for reference in _references(state, stages):
            mask = measured_change(reference, signal, cfg)
            tiles.update(changed_tiles(mask, cfg.tiles, cfg.tile_margin, cfg.tile_min_changed))
        return sorted(tiles)

    def _restart_reason(self, state: _StreamState | None, frame: Frame, signal: np.ndarray) -> str | None:
        if state is None:
            return "first"
        if frame.index <= state.last_index:
            return "restart"
        if state.reference.shape != signal.shape:
            return "resized"
        return None

    def _measure(self, state: _StreamState, signal: np.ndarray) -> _Change:
        cfg = self.cfg
        motion = state.full_motion if state.split_motion else state.motion
        still = is_still(motion)
        # tiles are patched into the uncompensated reference, so they need the plain mask; skip it when unused
        plain = measured_change(state.reference, signal, cfg) if still or cfg.tiles else None
        mask, compensated = plain, False
        if not still:
            mask, compensated = measured_change(state.reference, signal, cfg, motion), True
        tiles = changed_tiles(plain, cfg.tiles, cfg.tile_margin, cfg.tile_min_changed) if cfg.tiles else None
        known = state.objects is not None and state.objects.shape == mask.shape
        if tiles and known and cfg.object_tiles:
            tiles = grown_by_objects(tiles, state.objects, cfg.tiles)
        weighted, count = None, float(np.count_nonzero(mask))
        if cfg.region_budget and state.regions is not None:
            count = weighted_count(mask, state.regions)
            weighted = count / mask.size
        if known and cfg.object_weight > 1.0:
            on_objects = np.count_nonzero(mask & state.objects)
            weighted = min(1.0, (count + (cfg.object_weight - 1.0) * on_objects) / mask.size)
        grid = changed_tile_grid(mask, cfg.tiles, cfg.tile_min_changed) if cfg.region_budget and cfg.tiles else None
        core = changed_tiles(plain, cfg.tiles, 0, cfg.tile_min_changed) if tiles and cfg.tile_margin else None
        return _Change(float(mask.mean()), largest_component(mask) / mask.size, tiles, compensated, weighted, grid, core)

    def _refresh_reason(self, state: _StreamState, change: _Change) -> str | None:
        cfg = self.cfg
        if change.changed >= cfg.cut_threshold:
            return "cut"
        if change.score >= state.threshold:
            total = cfg.tiles[0] * cfg.tiles[1] if cfg.tiles else 0
            fits = total and len(change.tiles) <= cfg.partial_max * total and change.changed <= cfg.partial_changed
            if not (fits and not change.tiles):
                return "partial" if fits and state.partial_run < cfg.max_partial else "changed"
            # else the change is scattered noise that marks no tile (tile_min_changed): as if unchanged
        if state.reused_since_key >= cfg.max_reuse:
            return "max_reuse"
        if cfg.audit_interval and state.since_audit + 1 >= cfg.audit_interval:
            return "audit"
        if (cfg.audit_uncertain and change.score >= cfg.audit_uncertain * state.threshold
                and state.since_audit + 1 >= cfg.audit_gap):
            return "uncertain"  # an audit where reuse is riskiest: the change is close to the threshold
        return None

    def _due(self, state: _StreamState, signal: np.ndarray) -> tuple[list[str], list[int] | None]:
        """The stages past their refresh bound, and the tiles a refresh recomputes: those where the signal
        moved by more than ``refresh_pixel_threshold`` since the reference. None moved (or, without tiles,
        the frame is identical to the reference): no refresh, as the same pixels are never paid for twice."""
        due = [s for s, bound in state.bounds.items() if state.stale.get(s, 0) >= bound]
        if not due:
            return [], None
        cfg = self.cfg
        references = _references(state, due)
        if not (cfg.tiles and cfg.refresh_pixel_threshold):
            return ([], None) if all(np.array_equal(signal, r) for r in references) else (due, None)
        tiles: set[int] = set()
        for reference in references:
            tiles.update(self._drifted_tiles(state, reference, signal))
        return (due, sorted(tiles)) if tiles else ([], None)

    def _drifted_tiles(self, state: _StreamState, reference: np.ndarray, signal: np.ndarray) -> list[int]:
        """Tiles whose change since ``reference`` passes ``refresh_pixel_threshold`` and is either real
        change (above ``pixel_threshold``) or ``refresh_noise_factor`` times the largest frame-to-frame
        change seen there since: drift adds up from frame to frame, codec noise does not."""
        cfg = self.cfg
        difference = blurred_difference(lit(reference, signal, cfg), signal, cfg.blur)
        change = tile_maxima(difference, cfg.tiles)
        hit = change > cfg.refresh_pixel_threshold
        if cfg.refresh_noise_factor and state.noise is not None:
            # real change as the decision counts it: enough of the tile above pixel_threshold, not a speck
            real = changed_tile_grid(difference > cfg.pixel_threshold, cfg.tiles, cfg.tile_min_changed)
            hit &= (change > cfg.refresh_noise_factor * state.noise) | real
        return tile_indices(hit, cfg.tile_margin)

    def _track_noise(self, state: _StreamState, signal: np.ndarray) -> None:
        cfg = self.cfg
        if not (state.bounds and cfg.tiles and cfg.refresh_pixel_threshold and cfg.refresh_noise_factor):
            return
        if state.previous is not None and state.previous.shape == signal.shape:
            step = tile_maxima(blurred_difference(state.previous, signal, cfg.blur), cfg.tiles)
            state.noise = step if state.noise is None else np.maximum(state.noise, step)
        state.previous = signal

    def _apply_feedback(self, state: _StreamState, feedback: list[tuple] | None) -> None:
        """Move the threshold (and with region_budget the tiles' weights) on each audit's agreement (only with
        ``adaptive``)."""
        cfg = self.cfg
        for index, score, *where in feedback or []:
            if index < state.since_index:
                continue  # an audit of the stream before it restarted or was resized: it says nothing of this state
            audited_change = state.pending_audits.pop(index, None)
            refreshed = state.pending_refresh.pop(index, None)
            changed = state.pending_regions.pop(index, None)
            if score is None:
                continue  # an audit the driver could not score (it failed, or no stage scores): forgotten
            state.agreement = float(score)
            if not cfg.adaptive:
                continue
            if where and where[0] is not None and changed is not None:
                state.regions = budgeted_regions(state.regions, changed, where[0])
            met = score >= cfg.agreement_target
            if refreshed is not None:
                self._refresh_feedback(state, refreshed, float(score), audited_change)
            elif met:
                state.passing = dict.fromkeys(state.passing, True)
                state.threshold = self._raised(state.threshold, audited_change)
            else:
                state.passing = dict.fromkeys(state.passing, False)
                state.threshold = self._lowered(state.threshold, audited_change)

    def _raised(self, threshold: float, audited_change: float | None) -> float:
        """The threshold after an audit that met the target: times adapt_up, but no further than adapt_up
        times the change the audit was taken at, and at most threshold_max. An audit shows that reuse holds
        at the change it saw, not at more: audits in a quiet stretch (an empty room) used to double the
        threshold again and again, and the people who walked in later were reused."""
        cfg = self.cfg
        raised = threshold * cfg.adapt_up
        if audited_change is not None:
            raised = max(threshold, min(raised, audited_change * cfg.adapt_up))
        return min(cfg.threshold_max, raised)

    def _lowered(self, threshold: float, audited_change: float | None) -> float:
        """The threshold after a missed audit: below the audited change (times adapt_down), but not below the
        configured threshold when that change was below it too. Reuse under the configured threshold is
        what the gate does without the budget; a miss there is drift below the pixel signal, which the
        refreshes and max_reuse handle, and chasing it with the threshold only turned frames into keyframes."""
        cfg = self.cfg
        base = threshold if audited_change is None else min(threshold, audited_change)
        below_configured = audited_change is None or audited_change < cfg.threshold
        floor = max(cfg.threshold_min, cfg.threshold) if below_configured else cfg.threshold_min
        return max(floor, base * cfg.adapt_down)

    def _refresh_feedback(self, state: _StreamState, staleness: dict[str, int], score: float,
                          audited_change: float | None) -> None:
        """A refresh audit speaks for its stages only: it raises the threshold when the span it ends met the
        target on average and the latest audit of every other stage met it too; a miss leaves the threshold
        (drift below the signal)."""
        met = all(self._span_meets(score, n, state.bounds.get(stage, n)) for stage, n in staleness.items())
        if self.cfg.adapt_bounds:
            self._adapt_bounds(state, staleness, score)
        state.passing.update(dict.fromkeys(staleness, met))
        if met and all(state.passing.values()):
            state.threshold = self._raised(state.threshold, audited_change)

    def _span_meets(self, score: float, staleness: int, bound: int, share: float = 1.0) -> bool:
        """Whether the frames a refresh bound of ``bound`` carries over agree with the target on average
        (:func:`blinkflow.gate.agreement.span_meets`)."""
        return span_meets(score, staleness, bound, self.cfg.agreement_target, share)

    def _adapt_bounds(self, state: _StreamState, staleness: dict[str, int], score: float) -> None:
        """Move each refreshed stage's bound by one frame, between 1 and its growth (REFRESH_GROWTH, else
        BOUND_GROWTH) times the configured bound (below max_reuse): up when a span one frame longer would still
        keep BOUND_SHARE of the budget on average, down when the current one does not."""
        for stage, n in staleness.items():
            bound = state.bounds.get(stage, 1)
            growth = REFRESH_GROWTH.get(stage, BOUND_GROWTH)
            top = max(1, min(self.cfg.max_reuse - 1, growth * self.cfg.refresh.get(stage, bound)))
            state.bounds[stage] = moved_bound(bound, top, score, n, self.cfg.agreement_target, BOUND_SHARE)

    # ------------------------------------------------------------------ outcomes

    def _reuse(self, frame: Frame, state: _StreamState, change: _Change) -> None:
        for stage in state.bounds:
            state.stale[stage] = state.stale.get(stage, 0) + 1
        state.reused_since_key += 1
        state.since_audit += 1
        state.reused += 1
        frame.gate.reuse_of = state.key_index
        if state.motion is not None:
            frame.gate.motion = state.motion.astype(np.float16)
        frame.results[RESULT_KEY] = self._result(state, "reuse", None, change, keyframe=state.key_index)

    def _refresh(self, frame: Frame, signal: np.ndarray, state: _StreamState, change: _Change,
                 stages: list[str], tiles: list[int] | None, carried: list[str] | None = None) -> None:
        """Only ``stages`` run, on ``tiles`` (all of the frame when None); the driver carries the other
        stages over from the last processed frame. A refresh for staleness also scores the refreshed stages'
        would-be carry-over (an audit of those stages). One for change (``carried``: ``carry_until``) carries
        those stages and runs every other, unscored."""
        key = state.key_index
        audit = carried is None
        if audit:
            frame.gate.refresh = stages
        else:
            frame.gate.carried = carried
        if state.motion is not None:
            frame.gate.motion = state.motion.astype(np.float16)
        if audit:
            frame.gate.audit_of = key
            state.pending_refresh[frame.index] = {s: frame.index - state.ran.get(s, state.full_index) for s in stages}
            self._pending_audit(state, frame.index, change)
        if self.cfg.tiles:
            frame.gate.tiles = self._tiles_meta(state, tiles)
        for stage in stages:  # the frame-level reference stays: the other stages' caches did not move
            state.stage_refs[stage] = self._patched(state.stage_refs.get(stage, state.reference).copy(), signal, tiles)
        # the other stages reuse this frame: it counts towards their staleness, and towards max_reuse
        stale = {s: 0 if s in stages else state.stale.get(s, 0) + 1 for s in state.bounds}
        reused = state.reused_since_key + 1
        if not state.split_motion:
            state.full_motion, state.split_motion = state.motion, True
        self._processed(state, frame.index)
        state.stale, state.reused_since_key = stale, reused
        state.ran.update(dict.fromkeys(stages, frame.index))
        extra = {"tiles": self._tiles_summary(tiles)} if tiles is not None else {}
        extra.update({"audit_of": key} if audit else {"carried": carried})
        frame.results[RESULT_KEY] = self._result(state, "refresh", "stale" if audit else "changed", change,
                                                stages=stages, keyframe=key, **extra)

    def _tiles_meta(self, state: _StreamState, tiles: list[int] | None, core: list[int] | None = None) -> dict[str, Any]:
        """What the stages' region recompute needs: the changed tiles (None: the whole frame), those without
        the margin's ring (``core``, a partial frame's when there is a ring) and the frame each stage's cache
        holds (``base``: every stage's; ``bases``: stages refreshed since)."""
        meta: dict[str, Any] = {"grid": list(self.cfg.tiles), "changed": None if tiles is None else list(tiles),
                                "base": None if tiles is None else state.full_index}
        if tiles is not None and core is not None:
            meta["core"] = list(core)
        bases = {stage: index for stage, index in state.ran.items() if index != state.full_index}
        if tiles is not None and bases:
            meta["bases"] = bases
        return meta

    def _tiles_summary(self, tiles: list[int]) -> dict[str, Any]:
        """The tiles of a partial frame or a refresh, as its result reports them."""
        return {"grid": list(self.cfg.tiles), "changed": len(tiles)}

    def _patch_reference(self, state: _StreamState, signal: np.ndarray, tiles: list[int]) -> None:
        """A partial frame: every stage recomputed ``tiles``, so every reference takes them."""
        state.reference = self._patched(state.reference, signal, tiles)
        for stage, reference in state.stage_refs.items():
            state.stage_refs[stage] = self._patched(reference, signal, tiles)

    def _patched(self, reference: np.ndarray, signal: np.ndarray, tiles: list[int] | None) -> np.ndarray:
        """``reference`` with ``tiles`` taken from ``signal``; with ``relight_patches`` first put under the signal's
        lighting, so tiles patched in during an exposure ramp do not leave a patchwork no global gain explains."""
        if tiles is not None and self.cfg.relight_patches:
            reference = lit(reference, signal, self.cfg)  # with lighting off, or no gain explaining it: the same one
        return patch_tiles(reference, signal, tiles, self.cfg.tiles)

    def _partial(self, frame: Frame, signal: np.ndarray, state: _StreamState, change: _Change) -> None:
        self._patch_reference(state, signal, change.tiles)
        frame.gate.tiles = self._tiles_meta(state, change.tiles, change.core)
        self._processed(state, frame.index)
        self._ran_all(state, frame.index)
        state.partial_run += 1
        frame.results[RESULT_KEY] = self._result(state, "partial", "changed", change, tiles=self._tiles_summary(change.tiles))

    def _keyframe(self, frame: Frame, signal: np.ndarray, state: _StreamState | None, change: _Change, reason: str) -> None:
        audit = reason in ("max_reuse", "audit", "uncertain")
        if audit:
            frame.gate.audit_of = state.key_index
            if state.motion is not None:
                frame.gate.motion = state.motion.astype(np.float16)
            self._pending_audit(state, frame.index, change)
            state.since_audit = 0
        if state is None:
            state = self._new_state(frame, signal)
        state.reference = signal
        state.stage_refs = {}
        self._processed(state, frame.index)
        self._ran_all(state, frame.index)
        state.partial_run = 0
        if self.cfg.tiles:
            frame.gate.tiles = self._tiles_meta(state, None)
        extra = {"audit_of": frame.gate.audit_of} if audit else {}
        frame.results[RESULT_KEY] = self._result(state, "keyframe", reason, change, **extra)

    def _new_state(self, frame: Frame, signal: np.ndarray) -> _StreamState:
        state = _StreamState(frame.index, signal, frame.index, self.cfg.threshold, frames=1,
                             stale=dict.fromkeys(self.cfg.refresh, 0), bounds=dict(self.cfg.refresh), previous=signal,
                             passing=dict.fromkeys(self.cfg.refresh, True), since_index=frame.index)
        self.streams[frame.stream_id] = state
        return state

    @staticmethod
    def _pending_audit(state: _StreamState, index: int, change: _Change) -> None:
        """Remember what an audit was taken at, for its feedback: the change, and the tiles it covered."""
        state.pending_audits[index] = change.score
        if change.grid is not None:
            state.pending_regions[index] = change.grid

    @staticmethod
    def _processed(state: _StreamState, index: int) -> None:
        state.key_index = index
        state.reused_since_key = 0
        state.motion = None
        state.noise = None  # the noise floor is measured over the frames a refresh would compare
        state.stale = dict.fromkeys(state.stale, 0)

    @staticmethod
    def _ran_all(state: _StreamState, index: int) -> None:
        state.full_index = index
        state.full_motion, state.split_motion = None, False
        state.ran = dict.fromkeys(state.bounds, index)

    def _result(self, state: _StreamState, decision: str, reason: str | None, change: _Change, **extra: Any) -> dict:
        result: dict[str, Any] = {"decision": decision}
        if reason:
            result["reason"] = reason
        result.update(changed=round(change.changed, 6), largest=round(change.largest, 6))
        if change.weighted is not None:
            result["weighted"] = round(change.weighted, 6)
        if state.regions is not None:
            result["discounted_tiles"] = int(np.count_nonzero(state.regions < 1.0))
        if change.compensated:
            result["compensated"] = True
        result.update(extra)
        result["threshold"] = round(state.threshold, 6)
        if state.bounds:
            result["bounds"] = dict(state.bounds)  # the refresh bounds at this frame (adapt_bounds moves them)
        result["skip_ratio"] = round(state.reused / max(1, state.frames), 6)
        return result


def _references(state: _StreamState, stages: list[str]) -> list[np.ndarray]:
    """The distinct references the results of ``stages`` stand for: stages not refreshed on their own
    share the frame-level one, which is compared once."""
    references = [state.stage_refs.get(stage, state.reference) for stage in stages]
    return list({id(reference): reference for reference in references}.values())


#: region_budget: an audit that found a changed tile harmless multiplies its weight by this, down to REGION_FLOOR
REGION_DECAY = 0.5
#: region_budget: the least a tile counts (change there is never ignored, only discounted)
REGION_FLOOR = 0.25
#: region_budget: a tile whose share of disagreeing pixels exceeds this (the budget at a 0.95 target) was harmed
REGION_TOLERANCE = 0.05


def budgeted_regions(weights: np.ndarray | None, changed: np.ndarray, disagreed: np.ndarray) -> np.ndarray:
    """Tile weights after an audit: a tile that had changed and where the results still agreed counts
    REGION_DECAY times less (down to REGION_FLOOR); a tile where they disagreed counts in full again."""
    weights = np.ones(changed.shape, np.float32) if weights is None else weights
    if disagreed.shape != changed.shape:
        return weights
    harmed = disagreed > REGION_TOLERANCE
    harmless = changed & ~harmed
    return np.where(harmed, 1.0, np.where(harmless, np.maximum(REGION_FLOOR, weights * REGION_DECAY), weights)).astype(np.float32)


def weighted_count(mask: np.ndarray, weights: np.ndarray) -> float:
    """The changed pixels of ``mask``, each counted by its tile's weight."""
    counts, _ = tile_counts(mask, weights.shape)
    return float((counts * weights).sum())


def object_grid(boxes: list[list[float]], shape: tuple[int, ...], downscale: int, margin: float) -> np.ndarray:
    """The boxes (source pixels), each grown by ``margin`` of its size on every side, as a boolean mask on the
    signal grid of ``shape`` (the frame downscaled by ``downscale``)."""
    grid = np.zeros(shape[:2], dtype=bool)
    height, width = grid.shape
    for x1, y1, x2, y2 in (box[:4] for box in boxes):
        grow_x, grow_y = margin * (x2 - x1), margin * (y2 - y1)
        c0, c1 = int(max(0.0, (x1 - grow_x) / downscale)), int(min(width, math.ceil((x2 + grow_x) / downscale)))
        r0, r1 = int(max(0.0, (y1 - grow_y) / downscale)), int(min(height, math.ceil((y2 + grow_y) / downscale)))
        if r1 > r0 and c1 > c0:  # a box wholly off the frame marks nothing (a negative end would wrap)
            grid[r0:r1, c0:c1] = True
    return grid


def grown_by_objects(tiles: list[int], objects: np.ndarray, grid: list[int]) -> list[int]:
    """``tiles`` plus every tile of each object they touch (``objects``: the recent boxes on the signal grid;
    overlapping boxes count as one): an object whose edge changed is recomputed whole."""
    from scipy import ndimage  # lazy: only the gate needs it

    labels, count = ndimage.label(changed_tile_grid(objects, grid))
    if not count:
        return tiles
    touched = np.setdiff1d(labels.ravel()[tiles], [0])
    return sorted(set(tiles) | {int(i) for i in np.flatnonzero(np.isin(labels.ravel(), touched))})


def _step_motion(frame: Frame) -> np.ndarray | None:
    field_ = frame.meta.get(MOTION_KEY)
    return None if field_ is None else np.asarray(field_, dtype=np.float32)
