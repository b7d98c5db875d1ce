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
   matched frames, so a one-frame false positive never takes an ID.

On a frame the gate reused (or refreshed for other stages) the boxes are the keyframe's, carried
over (copied, or moved along motion vectors): they are matched like fresh ones, so IDs survive
every skip, but the motion model takes them as ``carried_noise`` times noisier observations, so
the stale positions do not stall its velocity between keyframes. A frame without detect results
(failed, dropped, or the detect stage did not run) only predicts: its gap counts neither as a
match nor as a miss. Re-identification hook: :meth:`Track.embed`
returns appearance embeddings per box (by default the detect result's optional ``"embeddings"``);
with ``appearance_weight`` > 0 the cost mixes in their cosine distance. No re-ID network is built here.

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
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage

log = logging.getLogger(__name__)

TASK = "track"
TENTATIVE, CONFIRMED, LOST, ENDED = "tentative", "confirmed", "lost", "ended"
#: Kalman noise per unit of box height (ByteTrack's values)
STD_POSITION, STD_VELOCITY = 1.0 / 20, 1.0 / 160


@dataclass
class TrackOptions:
    """Options of the track stage (``stages.track.options``)."""

    boxes_from: str = _field("detect", "the stage whose boxes are tracked (its result has boxes, scores, classes)")
    high_threshold: float = _field(0.5, "detections at or above this score are matched first", lo=0.0, hi=1.0)
    low_threshold: float = _field(0.1, "detections below this score are ignored; those between it and "
                                  "high_threshold only continue confirmed tracks", lo=0.0, hi=1.0)
    new_track_threshold: float = _field(0.6, "an unmatched detection starts a track only at or above this score",
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
        0.0, "re-ID hook: weight of the cosine distance of appearance embeddings in the matching cost (0 = IoU "
        "only); needs embeddings per box (detect's 'embeddings', or Track.embed overridden)", lo=0.0, hi=1.0)

    def check(self, path: str) -> None:
        if self.low_threshold > self.high_threshold:
            raise ConfigError(f"{path}.low_threshold: {self.low_threshold} is above high_threshold "
                              f"({self.high_threshold}); lower it")


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
    lost_frames: int = 0
    det: int | None = None  # the detection it matched on the current frame
    box: np.ndarray = field(default_factory=lambda: np.zeros(4))
    embedding: np.ndarray | None = None

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
    embeddings: np.ndarray | None


class StreamTracker:
    """The tracks of one stream and the ByteTrack association step."""

    def __init__(self, options: TrackOptions) -> None:
        self.options = options
        self.tracks: list[Track] = []
        self.next_id = 1
        self.last_index = -1
        self.noise = 1.0  # measurement noise factor of the current frame

    def step(self, index: int, dets: _Detections | None, carried: bool = False) -> list[Track]:
        """Advance to frame ``index``; return the tracks that ended on it."""
        self.last_index = index
        self.noise = self.options.carried_noise if carried else 1.0
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
        high_left = self._match(active, high, dets, opts.match_iou)
        self._match([t for t in active if t.det is None and t.state == CONFIRMED], low, dets, opts.low_match_iou)
        high_left = self._match(tentative, high_left, dets, opts.match_iou)
        ended = self._age_unmatched()
        for det in high_left:
            if dets.scores[det] >= opts.new_track_threshold:
                self._start(index, det, dets)
        return ended

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
        if self.options.appearance_weight > 0 and dets.embeddings is not None:
            cost = self._with_appearance(cost, tracks, dets.embeddings[candidates])
        allowed = iou >= max(min_iou, 1e-6)
        if self.options.class_aware:
            allowed &= np.array([[t.label == dets.classes[c] for c in candidates] for t in tracks])
        cost = np.where(allowed, cost, 1e6)
        rows, cols = linear_sum_assignment(cost)
        pairs = [(tracks[r], int(candidates[c])) for r, c in zip(rows, cols) if allowed[r, c]]
        used = {det for _, det in pairs}
        return pairs, np.array([c for c in candidates if c not in used], dtype=int)

    def _with_appearance(self, cost: np.ndarray, tracks: list[Track], embeddings: np.ndarray) -> np.ndarray:
        weight = self.options.appearance_weight
        out = cost.copy()
        norms = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-9)
        for row, track in enumerate(tracks):
            if track.embedding is not None:
                distance = 1.0 - norms @ (track.embedding / max(np.linalg.norm(track.embedding), 1e-9))
                out[row] = (1 - weight) * cost[row] + weight * distance
        return out

    def _update(self, track: Track, det: int, dets: _Detections) -> None:
        track.kalman.update(dets.boxes[det], self.noise)
        track.box = dets.boxes[det]
        track.det = det
        track.score = float(dets.scores[det])
        track.label = dets.classes[det]
        track.hits += 1
        track.lost_frames = 0
        if dets.embeddings is not None:  # an exponential moving average keeps the appearance stable
            new = dets.embeddings[det]
            track.embedding = new if track.embedding is None else 0.9 * track.embedding + 0.1 * new
        if track.state == LOST or (track.state == TENTATIVE and track.hits >= self.options.confirm_hits):
            self._confirm(track)

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
                if track.lost_frames > self.options.max_lost_frames:
                    track.state = ENDED
                    ended.append(track)
                else:
                    alive.append(track)
        self.tracks = alive
        return ended

    def _start(self, index: int, det: int, dets: _Detections) -> None:
        track = Track(KalmanBox(dets.boxes[det]), dets.classes[det], float(dets.scores[det]), index, det=det,
                      box=dets.boxes[det])
        if dets.embeddings is not None:
            track.embedding = dets.embeddings[det]
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

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        source = cfg.stages[name].options.boxes_from
        if source not in cfg.enabled_stages():
            raise ConfigError(f"stages.{name}.options.boxes_from: tracking needs the {source} stage's boxes; "
                              f"add stages.{source}")

    def process(self, frames: list[Frame]) -> list[Frame]:
        for frame in frames:
            self._track(frame)
        return frames

    def _track(self, frame: Frame) -> None:
        tracker = self._trackers.get(frame.stream_id)
        if tracker is None or frame.index <= tracker.last_index:  # a new stream, or a restart
            tracker = self._trackers[frame.stream_id] = StreamTracker(self.options)
        source = self.options.boxes_from
        detect = frame.results.get(source) if not frame.is_failed else None
        dets = _detections(frame, detect) if isinstance(detect, dict) else None
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


def _detections(frame: Frame, detect: dict[str, Any]) -> _Detections:
    boxes = np.asarray(detect.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(detect.get("scores") or [1.0] * len(boxes), dtype=np.float64)
    classes = [str(c) for c in (detect.get("classes") or detect.get("labels") or [""] * len(boxes))]
    embeddings = Track.embed(frame, detect)
    return _Detections(boxes, scores, classes, embeddings)


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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (n, 4) and (m, 4) boxes in x1y1x2y2."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)
