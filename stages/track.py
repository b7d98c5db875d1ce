"""Persistent track IDs on the detect stage's boxes: a ByteTrack-style tracker.

Where it runs: a *driver* stage (``Stage.driver``). The gate's reused frames get their boxes
only in the driver, after every worker stage ran (runners.base.OrderedOutput fills them from
the keyframe, moved along the motion vectors); a tracker inside the worker graph would see
those frames without boxes and lose its tracks over every skip. So both runners run it on the
ordered output, one frame at a time in stream order, with each frame's final boxes: the local
and Ray runners give the same IDs by construction, and no Ray is involved.

Why not a library: ``trackers`` (Roboflow) needs opencv-python and supervision, and supervision
needs matplotlib and more; a compact tracker on numpy and ``scipy.optimize.linear_sum_assignment``
is ~200 lines, deterministic, and keeps the state we need (per-stream, states, ages).

Association per frame (ByteTrack, Zhang et al. 2022):

1. every track is predicted one frame ahead by a constant-velocity Kalman filter on
   (centre x, centre y, width, height) with noise proportional to the box height;
2. detections at or above ``high_threshold`` are matched to confirmed and lost tracks
   (Hungarian on 1 - IoU, same class only, IoU >= ``match_iou``);
3. detections between ``low_threshold`` and ``high_threshold`` are matched to the confirmed
   tracks still unmatched (IoU >= ``low_match_iou``): occluded or blurred objects keep their track;
4. tentative tracks are matched to the high detections left; an unmatched tentative track is dropped;
5. an unmatched confirmed track becomes lost; one lost for more than ``max_lost_frames`` frames ends;
6. high detections left over, at or above ``new_track_threshold``, start tentative tracks; a
   tentative track is confirmed (and gets its ID, counted from 1 per stream) after ``confirm_hits``
   matched frames, two of them seen by the detector, so a one-frame false positive never takes an ID.

On a frame the gate reused (or refreshed for other stages) the boxes are the keyframe's, carried
over (copied, or moved along motion vectors): they are matched like fresh ones, so a track lives
through the skip, but a box the detector saw on one frame alone, carried over, is no second sighting
(no ID) and the motion model takes them as ``carried_noise`` times noisier observations, so the
stale positions do not stall its velocity between keyframes. An ID survives the skip when the
object's box at the next keyframe still overlaps its track (``match_iou``): with the decoder's
motion vectors (``sources.N.motion_vectors``) the carried boxes move with the objects; copied, a
fast object that the gate skips for long (it moves most of its size meanwhile, which the gate's
change signal usually stops) can start a new track. A frame without detect results (failed,
dropped, or the detect stage did not run) only predicts: its gap counts neither as a match nor as
a miss.

Re-identification (``appearance_weight`` > 0): every box gets an appearance embedding, the detect
result's own ``"embeddings"`` when it has them (:meth:`Track.embed`), else the re-ID net's
(``reid_model`` with ``reid_weights``, models/reid.py, trained by ``blinkflow train reid``) on the
box's crop. Each track keeps a gallery of its last ``gallery_size`` embeddings taken while its box
overlapped no other box (an occluded crop shows the occluder). Then

* steps 2 to 4 cost ``(1 - w) * (1 - IoU) + w * d`` with ``d`` the least cosine distance of the box
  to the track's gallery, and a pair whose ``d`` exceeds ``appearance_gate`` is never matched (a
  track does not slide onto another object that covers it);
* after step 3, the confirmed and lost tracks still unmatched are matched to the high boxes left by
  appearance alone (``d`` <= ``reid_distance``, same class), even at zero IoU, within a motion and
  size gate: the box lies within ``reid_max_speed`` box sizes per lost frame (plus one) of where the
  track was last seen and its size is within ``reid_max_scale`` of that box's. An object that comes
  back after an occlusion or a long gap, away from where its motion model expected it, gets its old
  ID instead of a new one (and its motion model starts afresh there);
* a lost track with a gallery stays for ``reid_max_lost_frames`` (not ``max_lost_frames``); past
  ``max_lost_frames`` its stale prediction no longer takes boxes by IoU, only re-identification
  can take it back (an object that left the frame and came back, or stood behind a pillar).

Result per frame (frames with detect results)::

    frame.results["detect"]["track_ids"] = [int | None, ...]   # aligned with "boxes"; None: no confirmed track
    frame.results["track"] = {
        "tracks": [{"id": int, "box": [x1, y1, x2, y2],   # the matched box, or the prediction while lost
                    "label": str, "score": float, "state": "confirmed" | "lost",
                    "age": int,                          # frames since the track started
                    "lost_frames": int,                  # frames since its last match
                    "det": int | None}, ...],            # index into detect's boxes, None while lost
        "ended": [{"id": int, "label": str, "age": int}, ...]}   # tracks that ended on this frame
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blinkflow.config import StageConfig, _field
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame
from blinkflow.gate.agreement import box_iou
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage

log = logging.getLogger(__name__)

TASK = "track"
TENTATIVE, CONFIRMED, LOST, ENDED = "tentative", "confirmed", "lost", "ended"
#: Kalman noise per unit of box height (ByteTrack's values)
STD_POSITION, STD_VELOCITY = 1.0 / 20, 1.0 / 160
#: a box overlapping another by at least this IoU is partly covered: its crop does not enter the track's gallery
CLEAN_IOU = 0.1


@dataclass
class TrackOptions:
    """Options of the track stage (``stages.track.options``)."""

    boxes_from: str = _field("detect", "the stage whose boxes are tracked (its result has boxes, scores, classes)")
    high_threshold: float = _field(0.5, "detections at or above this score are matched first", lo=0.0, hi=1.0)
    low_threshold: float = _field(0.1, "detections below this score are ignored; those between it and "
                                  "high_threshold only continue confirmed tracks", lo=0.0, hi=1.0)
    new_track_threshold: float = _field(0.6, "an unmatched high detection starts a track only at or above this score "
                                        "(at least high_threshold)",
                                        lo=0.0, hi=1.0)
    match_iou: float = _field(0.2, "least IoU of a high-score detection with a track's prediction to match", lo=0.0, hi=1.0)
    low_match_iou: float = _field(0.5, "least IoU of a low-score detection with a confirmed track to match",
                                  lo=0.0, hi=1.0)
    confirm_hits: int = _field(3, "matched frames a new track needs before it is confirmed and gets an ID", lo=1, hi=1000)
    max_lost_frames: int = _field(30, "frames a confirmed track may go unmatched (lost) before it ends", lo=0, hi=10**6)
    class_aware: bool = _field(True, "match only detections of the track's class")
    carried_noise: float = _field(
        4.0, "boxes the gate carried over to a reused frame count as observations this many times noisier (in "
        "standard deviations) for the motion model: copied or vector-moved boxes lag the object, and taken at face "
        "value they would stall the velocity between keyframes", lo=1.0, hi=1000.0)
    appearance_weight: float = _field(
        0.0, "re-identification: weight of the cosine distance of appearance embeddings in the matching cost (0 = "
        "IoU only, no embeddings computed); embeddings are detect's 'embeddings', else reid_model's", lo=0.0, hi=1.0)
    reid_model: str = _field("embed_small", "re-ID embedding net (model registry, task reid) used when "
                             "appearance_weight > 0 and the detector gives no embeddings")
    reid_weights: str | None = _field("shipped", "its weights: 'shipped' (models/weights), a .pt path, or null (random)")
    gallery_size: int = _field(8, "embeddings each track keeps (its newest unoccluded ones)", lo=1, hi=1000)
    appearance_gate: float = _field(
        0.5, "with appearance: a track and a box whose cosine distance is above this never match", lo=0.0, hi=2.0)
    reid_distance: float = _field(
        0.25, "with appearance: an unmatched track takes back a high-score box anywhere in the frame at up to this "
        "cosine distance (re-identification after occlusions and gaps); 0 turns it off", lo=0.0, hi=2.0)
    reid_max_lost_frames: int = _field(
        90, "with appearance: a lost track with a gallery ends after this many frames instead of max_lost_frames "
        "(when larger); past max_lost_frames only re-identification can take it back (an object out of view for "
        "a while, e.g. one that left the frame and came back)", lo=0, hi=10**6)
    reid_max_speed: float = _field(
        0.5, "with appearance: re-identification takes a box only within this many box sizes per lost frame (plus "
        "one box size) of where the track was last seen: a look-alike across the frame is not the same object", lo=0.0,
        hi=1000.0)
    reid_max_scale: float = _field(
        2.0, "with appearance: re-identification takes a box only if its size (square root of the area) is within "
        "this factor of the track's last seen box", lo=1.0, hi=1000.0)

    def check(self, path: str) -> None:
        if self.low_threshold > self.high_threshold:
            raise ConfigError(f"{path}.low_threshold: {self.low_threshold} is above high_threshold "
                              f"({self.high_threshold}); lower it")
        if self.new_track_threshold < self.high_threshold:  # only high detections left over start tracks
            raise ConfigError(f"{path}.new_track_threshold: {self.new_track_threshold} is below high_threshold "
                              f"({self.high_threshold}), where it does nothing: tracks start only from high "
                              "detections; lower high_threshold too, or raise new_track_threshold")


class KalmanBox:
    """Constant-velocity Kalman filter on (cx, cy, w, h) and their velocities, per frame."""

    _F = np.eye(8) + np.eye(8, k=4)
    _H = np.eye(4, 8)

    def __init__(self, box: np.ndarray) -> None:
        self.x = np.concatenate([_xywh(box), np.zeros(4)])
        h = max(self.x[3], 1.0)
        std = np.array([2 * STD_POSITION * h] * 4 + [10 * STD_VELOCITY * h] * 4)
        self.P = np.diag(std**2)

    def predict(self) -> None:
        h = max(self.x[3], 1.0)
        q = np.array([STD_POSITION * h] * 4 + [STD_VELOCITY * h] * 4) ** 2
        self.x = self._F @ self.x
        self.P = self._F @ self.P @ self._F.T + np.diag(q)
        self.x[2:4] = np.maximum(self.x[2:4], 1.0)

    def update(self, box: np.ndarray, noise: float = 1.0) -> None:
        h = max(self.x[3], 1.0)
        r = np.diag(np.array([noise * STD_POSITION * h] * 4) ** 2)
        innovation = _xywh(box) - self._H @ self.x
        s = self._H @ self.P @ self._H.T + r
        gain = self.P @ self._H.T @ np.linalg.inv(s)
        self.x = self.x + gain @ innovation
        self.P = (np.eye(8) - gain @ self._H) @ self.P

    @property
    def box(self) -> np.ndarray:
        cx, cy, w, h = self.x[:4]
        return np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


@dataclass
class Track:
    """One object's track in one stream."""

    kalman: KalmanBox
    label: str
    score: float
    first_index: int
    state: str = TENTATIVE
    id: int | None = None
    hits: int = 1
    seen: int = 1  # of the hits, frames where the detector ran (not boxes carried over reused frames)
    lost_frames: int = 0
    det: int | None = None  # the detection it matched on the current frame
    box: np.ndarray = field(default_factory=lambda: np.zeros(4))
    seen_box: np.ndarray = field(default_factory=lambda: np.zeros(4))  # the last matched box (kept while lost)
    gallery: list[np.ndarray] = field(default_factory=list)  # unit-norm appearance embeddings, newest last

    def remember(self, embedding: np.ndarray, size: int) -> None:
        self.gallery.append(embedding / max(float(np.linalg.norm(embedding)), 1e-9))
        del self.gallery[:-size]

    def appearance_distance(self, embeddings: np.ndarray) -> np.ndarray:
        """The least cosine distance of each row of (unit-norm) ``embeddings`` to the gallery; NaN without one."""
        if not self.gallery:
            return np.full(len(embeddings), np.nan)
        return 1.0 - (embeddings @ np.stack(self.gallery).T).max(axis=1)

    @staticmethod
    def embed(frame: Frame, detect: dict[str, Any]) -> np.ndarray | None:
        """Re-ID hook: one appearance embedding per detect box (n, d), or None. The default reads detect's
        optional ``"embeddings"``; a re-ID model would compute them from the frame's crops here."""
        embeddings = detect.get("embeddings")
        return None if embeddings is None else np.asarray(embeddings, dtype=np.float32)


@dataclass
class _Detections:
    boxes: np.ndarray
    scores: np.ndarray
    classes: list[str]
    embeddings: np.ndarray | None  # unit norm (normalised in __post_init__)
    clean: np.ndarray = field(init=False)  # boxes overlapping no other box: their crops enter galleries

    def __post_init__(self) -> None:
        if self.embeddings is not None:
            self.embeddings = self.embeddings / np.maximum(np.linalg.norm(self.embeddings, axis=1, keepdims=True), 1e-9)
        iou = box_iou(self.boxes, self.boxes) if len(self.boxes) else np.zeros((0, 0))
        np.fill_diagonal(iou, 0.0)
        self.clean = (iou.max(axis=1) if len(self.boxes) > 1 else np.zeros(len(self.boxes))) < CLEAN_IOU


class StreamTracker:
    """The tracks of one stream and the ByteTrack association step."""

    def __init__(self, options: TrackOptions, first_id: int = 1) -> None:
        self.options = options
        self.tracks: list[Track] = []
        self.next_id = first_id
        self.last_index = -1
        self.carried = False  # the current frame's boxes are carried over from a keyframe: no new evidence

    def step(self, index: int, dets: _Detections | None, carried: bool = False) -> list[Track]:
        """Advance to frame ``index``; return the tracks that ended on it."""
        self.last_index = index
        self.carried = carried
        for track in self.tracks:
            track.kalman.predict()
            track.det = None
        if dets is None:  # no detector output on this frame: a gap, neither match nor miss
            return []
        opts = self.options
        keep = dets.scores >= opts.low_threshold
        high = np.flatnonzero(keep & (dets.scores >= opts.high_threshold))
        low = np.flatnonzero(keep & (dets.scores < opts.high_threshold))
        active = [t for t in self.tracks if t.state in (CONFIRMED, LOST)]
        tentative = [t for t in self.tracks if t.state == TENTATIVE]
        recent = [t for t in active if t.lost_frames <= opts.max_lost_frames]  # older ones: by appearance only
        high_left = self._match(recent, high, dets, opts.match_iou)
        self._match([t for t in active if t.det is None and t.state == CONFIRMED], low, dets, opts.low_match_iou)
        if self._appearance(dets) and opts.reid_distance > 0:
            high_left = self._reidentify([t for t in active if t.det is None], high_left, dets)
        high_left = self._match(tentative, high_left, dets, opts.match_iou)
        ended = self._age_unmatched()
        for det in high_left:
            if dets.scores[det] >= opts.new_track_threshold:
                self._start(index, det, dets)
        return ended

    def _appearance(self, dets: _Detections) -> bool:
        return self.options.appearance_weight > 0 and dets.embeddings is not None

    def _reidentify(self, tracks: list[Track], candidates: np.ndarray, dets: _Detections) -> np.ndarray:
        """Match unmatched tracks to ``candidates`` by appearance alone (after occlusions and gaps)."""
        tracks = [t for t in tracks if t.gallery]
        if not tracks or len(candidates) == 0:
            return candidates
        from scipy.optimize import linear_sum_assignment

        distance = np.stack([t.appearance_distance(dets.embeddings[candidates]) for t in tracks])
        allowed = (distance <= self.options.reid_distance) & self._plausible(tracks, dets.boxes[candidates])
        if self.options.class_aware:
            allowed &= np.array([[t.label == dets.classes[c] for c in candidates] for t in tracks])
        rows, cols = linear_sum_assignment(np.where(allowed, distance, 1e6))
        used = set()
        for r, c in zip(rows, cols):
            if allowed[r, c]:
                log.debug("track %s re-identified at distance %.3f", tracks[r].id, distance[r, c])
                tracks[r].kalman = KalmanBox(dets.boxes[candidates[c]])  # its old velocity says nothing about now
                self._update(tracks[r], int(candidates[c]), dets)
                used.add(int(candidates[c]))
        return np.array([c for c in candidates if c not in used], dtype=int)

    def _plausible(self, tracks: list[Track], boxes: np.ndarray) -> np.ndarray:
        """(tracks, boxes): a box near enough to where each track was last seen, given the frames it has been lost,
        and of a similar size (``reid_max_speed``, ``reid_max_scale``)."""
        seen = np.stack([_xywh(t.seen_box) for t in tracks])
        cand = np.stack([_xywh(b) for b in boxes])
        size_seen, size_cand = np.sqrt(seen[:, 2] * seen[:, 3]), np.sqrt(cand[:, 2] * cand[:, 3])
        ratio = size_cand[None, :] / size_seen[:, None]
        scale = self.options.reid_max_scale
        lost = np.array([t.lost_frames + 1 for t in tracks], dtype=float)
        reach = (self.options.reid_max_speed * lost + 1.0) * np.maximum(size_seen, 1.0)
        shift = np.hypot(cand[None, :, 0] - seen[:, None, 0], cand[None, :, 1] - seen[:, None, 1])
        return (ratio <= scale) & (ratio >= 1.0 / scale) & (shift <= reach[:, None])

    def _match(self, tracks: list[Track], candidates: np.ndarray, dets: _Detections, min_iou: float) -> np.ndarray:
        """Match ``tracks`` to the ``candidates`` detections and update them; return the candidates left."""
        pairs, left = self._associate(tracks, candidates, dets, min_iou)
        for track, det in pairs:
            self._update(track, det, dets)
        return left

    def _associate(self, tracks: list[Track], candidates: np.ndarray, dets: _Detections,
                   min_iou: float) -> tuple[list[tuple[Track, int]], np.ndarray]:
        if not tracks or len(candidates) == 0:
            return [], candidates
        from scipy.optimize import linear_sum_assignment

        predicted = np.stack([t.kalman.box for t in tracks])
        iou = box_iou(predicted, dets.boxes[candidates])
        cost = 1.0 - iou
        allowed = iou >= max(min_iou, 1e-6)
        if self._appearance(dets):
            distance = np.stack([t.appearance_distance(dets.embeddings[candidates]) for t in tracks])
            known = ~np.isnan(distance)  # a track without a gallery yet is matched on IoU alone
            weight = self.options.appearance_weight
            cost = np.where(known, (1 - weight) * cost + weight * np.nan_to_num(distance), cost)
            allowed &= ~known | (np.nan_to_num(distance) <= self.options.appearance_gate)
        if self.options.class_aware:
            allowed &= np.array([[t.label == dets.classes[c] for c in candidates] for t in tracks])
        cost = np.where(allowed, cost, 1e6)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(tracks[r], int(candidates[c])) for r, c in zip(rows, cols) if allowed[r, c]]
        used = {det for _, det in pairs}
        return pairs, np.array([c for c in candidates if c not in used], dtype=int)

    def _update(self, track: Track, det: int, dets: _Detections) -> None:
        track.kalman.update(dets.boxes[det], self.options.carried_noise if self.carried else 1.0)
        track.box = track.seen_box = dets.boxes[det]
        track.det = det
        track.score = float(dets.scores[det])
        track.label = dets.classes[det]
        track.hits += 1
        track.seen += not self.carried
        track.lost_frames = 0
        if dets.embeddings is not None and dets.clean[det]:
            track.remember(dets.embeddings[det], self.options.gallery_size)
        if track.state == LOST or (track.state == TENTATIVE and self._confirmed_by(track)):
            self._confirm(track)

    def _confirmed_by(self, track: Track) -> bool:
        """``confirm_hits`` matched frames, two of them seen by the detector (when it asks for two or more): a box
        it saw on one frame alone, carried over the frames the gate reused, is no second sighting."""
        need = self.options.confirm_hits
        return track.hits >= need and track.seen >= min(2, need)

    def _confirm(self, track: Track) -> None:
        if track.id is None:
            track.id = self.next_id
            self.next_id += 1
        track.state = CONFIRMED

    def _age_unmatched(self) -> list[Track]:
        ended, alive = [], []
        for track in self.tracks:
            if track.det is not None:
                alive.append(track)
            elif track.state == TENTATIVE:
                continue  # never confirmed: dropped without an ID
            else:
                track.lost_frames += 1
                track.state = LOST
                track.box = track.kalman.box
                if track.lost_frames > self._max_lost(track):
                    track.state = ENDED
                    ended.append(track)
                else:
                    alive.append(track)
        self.tracks = alive
        return ended

    def _max_lost(self, track: Track) -> int:
        """How long a track may stay lost: longer with a gallery to re-identify it by (``reid_max_lost_frames``)."""
        opts = self.options
        if opts.appearance_weight > 0 and opts.reid_distance > 0 and track.gallery:
            return max(opts.max_lost_frames, opts.reid_max_lost_frames)
        return opts.max_lost_frames

    def _start(self, index: int, det: int, dets: _Detections) -> None:
        track = Track(KalmanBox(dets.boxes[det]), dets.classes[det], float(dets.scores[det]), index, det=det,
                      box=dets.boxes[det], seen_box=dets.boxes[det])
        if dets.embeddings is not None and dets.clean[det]:
            track.remember(dets.embeddings[det], self.options.gallery_size)
        if self.options.confirm_hits <= 1:
            self._confirm(track)
        self.tracks.append(track)


@register_stage(TASK)
class TrackStage(Stage):
    """Persistent IDs on detect's boxes, per stream, in the driver (see the module docstring)."""

    name = TASK
    driver = True
    Options = TrackOptions
    stream_caches = ("_trackers",)

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self._trackers: dict[str, StreamTracker] = {}
        # the next id of each stream ever seen: a stream that ends and comes back (a camera re-added, a restart)
        # goes on from there, so its new tracks never reuse the ids of its old ones in the same outputs
        self._next_ids: dict[str, int] = {}
        self._embedder: Any = None  # the re-ID net, when appearance_weight > 0

    def setup(self, device: str = "cpu") -> None:
        super().setup(device)
        if self.options.appearance_weight > 0:
            self._embedder = ReidEmbedder(self.options.reid_model, self.options.reid_weights)

    def teardown(self) -> None:
        super().teardown()
        self._embedder = None

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        options = cfg.stages[name].options
        source = options.boxes_from
        if options.appearance_weight > 0:
            _check_reid_model(options, f"stages.{name}.options")
        if source not in cfg.enabled_stages():
            raise ConfigError(f"stages.{name}.options.boxes_from: tracking needs the {source} stage's boxes; "
                              f"add stages.{source}")
        from blinkflow.registry import stages as stage_registry

        if not getattr(stage_registry.get(source), "gives_boxes", False):  # flow, segment, track: no boxes to track
            boxed = sorted(n for n in cfg.enabled_stages() if getattr(stage_registry.get(n), "gives_boxes", False))
            raise ConfigError(f"stages.{name}.options.boxes_from: the {source} stage gives no boxes to track; "
                              f"name one that does ({', '.join(boxed) or 'add stages.detect'})")

    def process(self, frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            self._track(frame)
        return frames

    def end_stream(self, stream_id: str) -> list[Frame]:
        self._keep_next_id(stream_id)
        return super().end_stream(stream_id)

    def flush(self) -> list[Frame]:
        for stream_id in list(self._trackers):
            self._keep_next_id(stream_id)
        return super().flush()

    def _keep_next_id(self, stream_id: str) -> None:
        tracker = self._trackers.get(stream_id)
        if tracker is not None:
            self._next_ids[stream_id] = tracker.next_id

    def _track(self, frame: Frame) -> None:
        tracker = self._trackers.get(frame.stream_id)
        if tracker is None or frame.index <= tracker.last_index:  # a new stream, or a restart
            self._keep_next_id(frame.stream_id)
            first_id = self._next_ids.get(frame.stream_id, 1)
            tracker = self._trackers[frame.stream_id] = StreamTracker(self.options, first_id)
        source = self.options.boxes_from
        detect = frame.results.get(source) if not frame.is_failed else None
        dets = _detections(frame, detect, self._embedder) if isinstance(detect, dict) else None
        carried = not frame.runs(source)  # the gate's carry-over, not the detector, gave this frame its boxes
        ended = tracker.step(frame.index, dets, carried)
        if dets is None:
            return
        ids: list[int | None] = [None] * len(dets.boxes)
        for track in tracker.tracks:
            if track.det is not None and track.state == CONFIRMED:
                ids[track.det] = track.id
        frame.results[source] = {**detect, "track_ids": ids}  # a new dict: the keyframe's carried one stays clean
        frame.results[self.name] = {
            "tracks": [_track_record(t, frame.index) for t in tracker.tracks if t.id is not None],
            "ended": [{"id": t.id, "label": t.label, "age": frame.index - t.first_index} for t in ended],
        }


def _detections(frame: Frame, detect: dict[str, Any], embedder: ReidEmbedder | None = None) -> _Detections:
    boxes = np.asarray(detect.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detect.get("scores") or [1.0] * len(boxes), dtype=np.float64)
    classes = [str(c) for c in (detect.get("classes") or detect.get("labels") or [""] * len(boxes))]
    embeddings = Track.embed(frame, detect)
    if embeddings is None and embedder is not None and frame.image is not None:
        embeddings = embedder(frame.image, boxes)
    return _Detections(boxes, scores, classes, embeddings)


class ReidEmbedder:
    """The re-ID net on the crops of a frame's boxes (models/reid.py), in eval mode on the CPU.

    The tracker runs in the driver, one frame at a time: a net of ~0.1M parameters on 32x32 crops
    costs about a millisecond per box there, so it needs no worker or GPU of its own.
    """

    def __init__(self, model_name: str, weights: str | None) -> None:
        import torch
        from blinkflow.models.registry import build_model
        from blinkflow.models.reid import INPUT_SIZE
        from blinkflow.models.weights import load_state, resolve_weights

        spec = resolve_weights(weights, stage="reid", model_name=model_name)
        self.model = build_model(model_name, task="reid")  # the builder's defaults: what the shipped weights use
        load_state(self.model, spec)
        self.model.eval()
        self.size = INPUT_SIZE
        self._torch = torch

    def __call__(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        from blinkflow.models.reid import crops_to_batch

        if len(boxes) == 0:
            return np.zeros((0, 1), dtype=np.float32)
        with self._torch.inference_mode():
            return self.model(crops_to_batch(image, boxes, self.size)).numpy()


def _check_reid_model(options: TrackOptions, path: str) -> None:
    from blinkflow.errors import RegistryError
    from blinkflow.models.registry import get_model_entry
    from blinkflow.models.weights import WeightsError, resolve_weights

    try:
        get_model_entry(options.reid_model, task="reid")
    except RegistryError as exc:
        raise ConfigError(f"{path}.reid_model: {exc}; set appearance_weight: 0 to track without appearance") from None
    try:
        resolve_weights(options.reid_weights, stage="reid", model_name=options.reid_model)
    except WeightsError as exc:
        detail = str(exc).split(": ", 1)[-1]
        raise ConfigError(f"{path}.reid_weights: {detail}; set appearance_weight: 0 to track without appearance") from None


def _track_record(track: Track, index: int) -> dict[str, Any]:
    return {
        "id": track.id,
        "box": [round(float(v), 2) for v in track.box],
        "label": track.label,
        "score": round(track.score, 4),
        "state": track.state,
        "age": index - track.first_index,
        "lost_frames": track.lost_frames,
        "det": track.det,
    }


def _xywh(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([(x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 1e-3), max(y2 - y1, 1e-3)])
