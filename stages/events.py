"""Object events from the track stage's tracks: new, end, zones, lines, actions.

A *driver* stage like ``track`` (see stages/track.py for why): it runs in the driver on the
ordered output, after ``track``, one frame at a time per stream, so the local and Ray runners
emit the same events. It holds each stream's newest frame until the next one arrives, so the
tracks still alive when a stream ends get their ``end`` events on its last frame (one frame of
delay in live mode).

Events of a frame go into its record as ``results["events"]`` (a list; empty when nothing
happened) and are described by ``pipeline/event.schema.json``:

* ``new``: a track got its ID (it was confirmed); ``end``: it ended (lost for longer than the
  track stage's ``max_lost_frames``, or the stream ended), with ``duration_s`` from its ``new`` frame to
  its last matched frame (stream time, pts; wall clock when pts are unknown) and its best score;
* ``enter_zone`` / ``exit_zone``: the bottom-centre point of the track's box (where an object
  stands) went into / out of a polygon zone, ``hysteresis`` pixels past its edge;
* ``cross_line``: that point went from one side of a line to the other, ``hysteresis`` pixels
  past it, within the segment's extent; counted once per crossing (jitter on the line is not a
  crossing). ``direction`` is ``in`` when the point moves from the left side of the line to its
  right side as seen on the image looking from the line's first point to its second, ``out``
  the other way: for a line drawn left to right, ``in`` is downwards;
* ``action_start`` / ``action_end``: the action stage's top label of the stream (track_id null),
  with hysteresis: a label must be top with at least ``action_min_score`` for ``action_frames``
  frames in a row to start, and the action ends when another one starts or no label holds for
  ``action_frames`` frames.

Only tracks matched on a frame (not predicted while lost) move across zones and lines. Zones and
lines are per stream (``stream: null`` applies to every stream), in pixels or, with
``normalized: true``, in fractions of the frame width and height. ``results["zones"]`` holds
per zone the number of tracks inside on that frame (the Prometheus zone gauge).

Snapshots (off by default): with ``snapshots`` a folder, each event with a track writes a JPEG crop
of its box to ``<folder>/<stream>/<index>-<type>-<track>.jpg`` (``end``: the crop of the track's
best-scored frame) and names it in the event's ``snapshot``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blinkflow.config import StageConfig, _field
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.stages.base import Stage

log = logging.getLogger(__name__)

TASK = "events"
EVENT_TYPES = ("new", "end", "enter_zone", "exit_zone", "cross_line", "action_start", "action_end")


@dataclass
class ZoneOptions:
    """A polygon zone (``stages.events.options.zones.N``)."""

    name: str = _field("", "zone name, unique; used in events and metrics")
    points: list[list[float]] = _field(factory=list, doc="polygon corners [[x, y], ...], at least 3")
    stream: str | None = _field(None, "the stream id it applies to; null: every stream")
    normalized: bool = _field(False, "points are fractions (0..1) of the frame width and height, not pixels")


@dataclass
class LineOptions:
    """A directed line (``stages.events.options.lines.N``)."""

    name: str = _field("", "line name, unique; used in events and metrics")
    points: list[list[float]] = _field(factory=list, doc="[[x1, y1], [x2, y2]]; 'in' crosses from its left to its "
                                       "right looking from the first point to the second")
    stream: str | None = _field(None, "the stream id it applies to; null: every stream")
    normalized: bool = _field(False, "points are fractions (0..1) of the frame width and height, not pixels")


@dataclass
class EventsOptions:
    """Options of the events stage (``stages.events.options``)."""

    zones: list[ZoneOptions] = _field(factory=list, doc="polygon zones")
    lines: list[LineOptions] = _field(factory=list, doc="directed counting lines")
    hysteresis: float = _field(4.0, "pixels a point must be past a line or a zone's edge to change side", lo=0.0, hi=10**4)
    action_min_score: float = _field(0.5, "least score of the action stage's top label to count", lo=0.0, hi=1.0)
    action_frames: int = _field(3, "frames in a row a label must hold to start (or none to end) an action", lo=1, hi=10**6)
    snapshots: str | None = _field(None, "folder for JPEG crops of event objects; null: no snapshots")
    jpeg_quality: int = _field(85, "snapshot JPEG quality", lo=1, hi=100)

    def check(self, path: str) -> None:
        for kind, shapes, least in (("zones", self.zones, 3), ("lines", self.lines, 2)):
            names: set[str] = set()
            for i, shape in enumerate(shapes):
                _check_shape(shape, f"{path}.{kind}.{i}", least, exact=kind == "lines")
                if shape.name in names:
                    raise ConfigError(f"{path}.{kind}.{i}.name: {shape.name!r} is used twice; give each a unique name")
                names.add(shape.name)


def _check_shape(shape: ZoneOptions | LineOptions, path: str, least: int, exact: bool) -> None:
    if not shape.name:
        raise ConfigError(f"{path}.name: missing; give it a name (used in events and metrics)")
    if any(len(p) != 2 for p in shape.points):
        raise ConfigError(f"{path}.points: every point is [x, y], got {shape.points}")
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for p in shape.points for v in p):
        raise ConfigError(f"{path}.points: every coordinate is a finite number, got {shape.points}")
    count = len(shape.points)
    if count < least or (exact and count != least):
        need = "exactly 2 points [[x1, y1], [x2, y2]]" if exact else "at least 3 points"
        raise ConfigError(f"{path}.points: a {'line' if exact else 'zone'} needs {need}, got {count}")
    if exact and shape.points[0] == shape.points[1]:
        raise ConfigError(f"{path}.points: both ends are {shape.points[0]}; a line needs two distinct points")
    if not exact and _flat(shape.points):  # a zone no point can be inside never fires: say so
        raise ConfigError(f"{path}.points: the zone {shape.points} has no area (its corners lie on one line)")
    crossing = None if exact else _crossing_edges(shape.points)
    if crossing:  # inside and outside would be read by the even-odd rule
        first, second = crossing
        raise ConfigError(f"{path}.points: the zone's edges {first + 1} and {second + 1} cross each other; list its "
                          "corners in order around it")
    if not exact and _area(shape.points) == 0.0:  # a symmetric bowtie's halves cancel: no inside either
        raise ConfigError(f"{path}.points: the zone {shape.points} has no area; list its corners in order around it")
    if shape.normalized and any(not 0.0 <= v <= 1.0 for p in shape.points for v in p):
        raise ConfigError(f"{path}.points: normalized points lie in 0..1, got {shape.points}; "
                          "use pixels with normalized: false")


# --------------------------------------------------------------------------- geometry


def bottom_centre(box: list[float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, float(box[3]))


def _pixels(points: list[list[float]], normalized: bool, width: int, height: int) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    return array * np.array([width, height]) if normalized else array


#: a zone's edge or a line's end this close to the frame's border (pixels) lies on it: a click on a screenshot's
#: last row is 1 px short of the border, where a box clamped to the frame puts its bottom
BORDER_TOLERANCE = 1.0


def past_the_border(points: np.ndarray, closed: bool, width: int, height: int, margin: float) -> np.ndarray:
    """``points`` with what lies on the frame's border moved ``margin`` past it, outwards.

    Boxes are clamped to the frame, so an object touching the border stands exactly on it: a zone edge drawn
    along the border (or a line ending there) would keep it within ``hysteresis`` for good, and the zone
    would never count it (the line never see it cross). Nothing can be seen beyond the border, so moving
    them past it changes nothing inside the frame. A zone (``closed``) moves the corners of each edge that
    lies along a border, across that border; a line extends, along its own direction, each end that lies
    on a border (its sides stay the same)."""
    out = points.astype(np.float64).copy()
    on = _on_borders(out, width, height)
    if closed:
        for i in range(len(out)):
            j = (i + 1) % len(out)
            for border in on[i] & on[j]:  # the edge i -> j lies along these borders
                _push(out, i, border, width, height, margin)
                _push(out, j, border, width, height, margin)
        return out
    direction = out[-1] - out[0]
    length = float(np.hypot(*direction))
    if length > 0:
        if on[0]:
            out[0] -= direction / length * (margin + BORDER_TOLERANCE)
        if on[-1]:
            out[-1] += direction / length * (margin + BORDER_TOLERANCE)
    return out


def _on_borders(points: np.ndarray, width: int, height: int) -> list[set[str]]:
    tol = BORDER_TOLERANCE
    return [{name for name, near in (("left", x <= tol), ("right", x >= width - tol), ("top", y <= tol),
                                     ("bottom", y >= height - tol)) if near} for x, y in points]


def _push(points: np.ndarray, i: int, border: str, width: int, height: int, margin: float) -> None:
    if border == "left":
        points[i, 0] = min(points[i, 0], -margin)
    elif border == "right":
        points[i, 0] = max(points[i, 0], width + margin)
    elif border == "top":
        points[i, 1] = min(points[i, 1], -margin)
    else:
        points[i, 1] = max(points[i, 1], height + margin)


def zone_depth(polygon: np.ndarray, point: tuple[float, float]) -> float:
    """Distance from ``point`` to the polygon's boundary, positive inside and negative outside."""
    x, y = point
    inside = False
    distance = math.inf
    for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, axis=0)):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside  # even-odd ray casting
        distance = min(distance, _segment_distance((x1, y1), (x2, y2), point))
    return distance if inside else -distance


def _segment_distance(a: tuple[float, float], b: tuple[float, float], p: tuple[float, float]) -> float:
    ab = np.subtract(b, a)
    t = float(np.clip(np.dot(np.subtract(p, a), ab) / max(float(np.dot(ab, ab)), 1e-12), 0.0, 1.0))
    return float(np.hypot(*(np.add(a, t * ab) - np.asarray(p))))


def line_side(line: np.ndarray, point: tuple[float, float]) -> tuple[float, float]:
    """(signed distance: positive on the right of first->second on the image, position along the segment 0..1)."""
    (x1, y1), (x2, y2) = line
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy)
    px, py = point[0] - x1, point[1] - y1
    return (dx * py - dy * px) / length, (dx * px + dy * py) / (length * length)


def _crossing_edges(points: list[list[float]]) -> tuple[int, int] | None:
    """The first two edges of the polygon that meet other than at the corner neighbours share (a crossing, one
    edge through another's corner, or a spike folding back along its neighbour), or None. Zero-length edges
    (a corner repeated, the first one at the end) are left out."""
    corners = [p for i, p in enumerate(points) if p != points[i - 1]] or points[:1]
    edges = list(zip(corners, corners[1:] + corners[:1]))
    count = len(edges)
    for i in range(count):
        for j in range(i + 1, count):
            neighbours = j == i + 1 or (i == 0 and j == count - 1)
            if (_folds_back(*edges[i], *edges[j]) if neighbours else _segments_meet(*edges[i], *edges[j])):
                return i, j
    return None


def _side(p: list[float], q: list[float], r: list[float]) -> float:
    return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])


def _on_segment(p: list[float], q: list[float], r: list[float]) -> bool:
    """``r`` (collinear with pq) lies on segment pq."""
    return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])


def _segments_meet(a: list[float], b: list[float], c: list[float], d: list[float]) -> bool:
    """Whether segments ab and cd share any point (touching counts)."""
    d1, d2, d3, d4 = _side(c, d, a), _side(c, d, b), _side(a, b, c), _side(a, b, d)
    if ((d1 > 0 > d2) or (d1 < 0 < d2)) and ((d3 > 0 > d4) or (d3 < 0 < d4)):
        return True
    return ((d1 == 0 and _on_segment(c, d, a)) or (d2 == 0 and _on_segment(c, d, b))
            or (d3 == 0 and _on_segment(a, b, c)) or (d4 == 0 and _on_segment(a, b, d)))


def _folds_back(a: list[float], b: list[float], c: list[float], d: list[float]) -> bool:
    """Neighbouring edges ab and cd (sharing a corner) that lie on one line and overlap past it: a spike."""
    shared = b if b in (c, d) else a
    start, far = (a if shared == b else b), (d if shared == c else c)
    along = [start[0] - shared[0], start[1] - shared[1]], [far[0] - shared[0], far[1] - shared[1]]
    cross = along[0][0] * along[1][1] - along[0][1] * along[1][0]
    dot = along[0][0] * along[1][0] + along[0][1] * along[1][1]
    return cross == 0 and dot > 0


def _flat(points: list[list[float]]) -> bool:
    """Whether the corners lie on one line, up to rounding (0.1, 0.2 and 0.3 times a direction gave an area of
    1e-17: a zone that never fired, or "edges cross" for corners already in order): the spread across the points'
    main direction is nothing against the spread along it."""
    centred = np.asarray(points, dtype=np.float64)
    centred -= centred.mean(axis=0)
    spread = np.linalg.svd(centred, compute_uv=False)
    return bool(spread[-1] <= 1e-9 * spread[0])


def _area(points: list[list[float]]) -> float:
    """The polygon's area (shoelace)."""
    return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))) / 2.0


def crossing_along(line: np.ndarray, before: tuple[float, float], after: tuple[float, float]) -> float:
    """Where the path from ``before`` to ``after`` (on the line's two sides) meets the line, as a position along
    the segment (0..1 on it): a track seen far apart crosses where its path does, not where it lands."""
    d_before, _ = line_side(line, before)
    d_after, _ = line_side(line, after)
    t = d_before / (d_before - d_after)
    met = (before[0] + t * (after[0] - before[0]), before[1] + t * (after[1] - before[1]))
    return line_side(line, met)[1]


# --------------------------------------------------------------------------- per-stream state


@dataclass
class _TrackMemory:
    label: str
    first_pts: float | None
    first_ts: float
    last_pts: float | None
    last_ts: float
    best_score: float
    best_crop: Any = None
    zones: dict[str, bool] = field(default_factory=dict)  # zone -> inside
    sides: dict[str, tuple[int, tuple[float, float]]] = field(default_factory=dict)  # line -> committed side
    # (+1 right, -1 left) and the point it was committed at: a crossing is where the path between two committed
    # points meets the line, not where the new point lands


@dataclass
class _StreamState:
    tracks: dict[int, _TrackMemory] = field(default_factory=dict)
    held: Frame | None = None
    action: str | None = None
    action_since: tuple[float | None, float] | None = None  # (pts, ts) when the current action started
    candidate: str | None = None
    candidate_frames: int = 0
    last_index: int = -1


@register_stage(TASK)
class EventsStage(Stage):
    """Object events from tracks, zones, lines and the action label (see the module docstring)."""

    name = TASK
    driver = True
    Options = EventsOptions

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg if cfg is not None else StageConfig())
        self._streams: dict[str, _StreamState] = {}
        self._sizes_seen: set[tuple[str, int, int]] = set()  # (stream, width, height) whose shapes were checked

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        stages = list(cfg.enabled_stages())
        if "track" not in stages or stages.index("track") > stages.index(name):
            raise ConfigError(f"stages.{name}: events come from tracks; add stages.track before stages.{name}")
        known = _known_stream_ids(cfg)
        if known is None:
            return
        options = cfg.stages[name].options
        for kind, shapes in (("zones", options.zones), ("lines", options.lines)):
            for i, shape in enumerate(shapes):
                if shape.stream is not None and shape.stream not in known:
                    raise ConfigError(f"stages.{name}.options.{kind}.{i}.stream: no source has stream id "
                                      f"{shape.stream!r}; known: {', '.join(sorted(known))}")

    def process(self, frames: list[Frame]) -> list[Frame]:
        released: list[Frame] = []
        for frame in frames:
            state = self._streams.get(frame.stream_id)
            if state is None or frame.index <= state.last_index:  # a new stream, or a restart
                if state is not None:
                    released.extend(self._close(frame.stream_id, state))
                state = self._streams[frame.stream_id] = _StreamState()
            state.last_index = frame.index
            frame.results[self.name] = self._events(frame, state)
            if state.held is not None:
                released.append(state.held)
            state.held = frame
        return released

    def end_stream(self, stream_id: str) -> list[Frame]:
        state = self._streams.pop(stream_id, None)
        return self._close(stream_id, state) if state is not None else []

    def flush(self) -> list[Frame]:
        return [f for stream_id in list(self._streams) for f in self.end_stream(stream_id)]

    def teardown(self) -> None:
        self._streams.clear()

    def _close(self, stream_id: str, state: _StreamState) -> list[Frame]:
        """The stream ended: its live tracks and action end on its last frame, which is released."""
        frame = state.held
        if frame is None:
            return []
        events = frame.results.setdefault(self.name, [])
        for track_id in sorted(state.tracks):
            events.append(self._end_event(frame, track_id, state.tracks.pop(track_id)))
        if state.action is not None:
            events.append(self._action_end(frame, state))
        state.held = None
        return [frame]

    # ------------------------------------------------------------------ events of one frame

    def _events(self, frame: Frame, state: _StreamState) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        track = frame.results.get("track")
        if isinstance(track, dict):
            for ended in track.get("ended", []):
                memory = state.tracks.pop(int(ended["id"]), None)
                if memory is not None:
                    events.append(self._end_event(frame, int(ended["id"]), memory))
            seen = [item for item in track.get("tracks", []) if item.get("det") is not None]
            if seen:  # zones and lines in this frame's pixels, once for all its tracks
                shapes = self._shapes(self.options.zones, frame, closed=True), self._shapes(self.options.lines, frame,
                                                                                             closed=False)
                for item in seen:
                    events.extend(self._observe(frame, state, item, *shapes))
            if self.options.zones:
                frame.results["zones"] = self._occupancy(frame.stream_id, state)
        events.extend(self._action_events(frame, state))
        return events

    def _observe(self, frame: Frame, state: _StreamState, item: dict[str, Any], zones: list[tuple[str, np.ndarray]],
                 lines: list[tuple[str, np.ndarray]]) -> list[dict[str, Any]]:
        track_id, box, score = int(item["id"]), item["box"], float(item["score"])
        pts = _finite(frame.pts)
        events = []
        memory = state.tracks.get(track_id)
        if memory is None:
            memory = state.tracks[track_id] = _TrackMemory(item["label"], pts, frame.decoded_at, pts, frame.decoded_at, -1.0)
            events.append(self._event(frame, "new", track_id, item["label"], score, box=box))
        memory.label, memory.last_pts, memory.last_ts = item["label"], pts, frame.decoded_at
        if score > memory.best_score:
            memory.best_score = score
            if self.options.snapshots:
                memory.best_crop = _crop(frame.image, box)
        point = bottom_centre(box)
        for zone in zones:
            events.extend(self._zone_events(frame, memory, track_id, score, box, zone, point))
        for line in lines:
            events.extend(self._line_events(frame, memory, track_id, score, box, line, point))
        return events

    def _zone_events(self, frame: Frame, memory: _TrackMemory, track_id: int, score: float, box: list[float],
                     zone: tuple[str, np.ndarray], point: tuple[float, float]) -> list[dict[str, Any]]:
        name, polygon = zone
        depth = zone_depth(polygon, point)
        was_inside = memory.zones.get(name)
        if abs(depth) < self.options.hysteresis:
            return []  # on the edge: keep the side it was on, or, first seen there, wait for one (as for lines)
        inside = depth > 0
        memory.zones[name] = inside
        if inside == bool(was_inside):
            return []
        kind = "enter_zone" if inside else "exit_zone"
        return [self._event(frame, kind, track_id, memory.label, score, box=box, zone=name)]

    def _line_events(self, frame: Frame, memory: _TrackMemory, track_id: int, score: float, box: list[float],
                     line: tuple[str, np.ndarray], point: tuple[float, float]) -> list[dict[str, Any]]:
        name, ends = line
        distance, along = line_side(ends, point)
        if abs(distance) < self.options.hysteresis:
            return []  # on the line: no side yet, or still the one it had
        side = 1 if distance > 0 else -1
        previous = memory.sides.get(name)
        memory.sides[name] = (side, point)
        if previous is None or previous[0] == side or not 0.0 <= crossing_along(ends, previous[1], point) <= 1.0:
            return []  # first sight, same side, or the path went round the segment's end
        direction = "in" if side > 0 else "out"
        return [self._event(frame, "cross_line", track_id, memory.label, score, box=box, line=name, direction=direction)]

    def _occupancy(self, stream_id: str, state: _StreamState) -> dict[str, int]:
        names = [z.name for z in self.options.zones if z.stream in (None, stream_id)]
        return {name: sum(1 for m in state.tracks.values() if m.zones.get(name)) for name in names}

    def _shapes(self, shapes: list[Any], frame: Frame, closed: bool) -> list[tuple[str, np.ndarray]]:
        placed = [(s.name, _pixels(s.points, s.normalized, frame.width, frame.height))
                  for s in shapes if s.stream in (None, frame.stream_id)]
        self._warn_outside(placed, frame)
        margin = self.options.hysteresis + 1.0
        return [(name, past_the_border(points, closed, frame.width, frame.height, margin))
                for name, points in placed]

    def _warn_outside(self, placed: list[tuple[str, np.ndarray]], frame: Frame) -> None:
        """Once per stream and frame size: a zone or line wholly outside the frame never fires (pixels drawn on
        a screenshot of another size than the source delivers, after its resize)."""
        key = (frame.stream_id, frame.width, frame.height)
        if key in self._sizes_seen:
            return
        self._sizes_seen.add(key)
        for name, points in placed:
            low, high = points.min(axis=0), points.max(axis=0)
            if high[0] < 0 or high[1] < 0 or low[0] > frame.width or low[1] > frame.height:
                log.warning("stages.%s: %r lies outside stream %s's %dx%d frames (points are pixels of the delivered "
                            "frame, after the source's resize); it never fires: move it, or use normalized points",
                            self.name, name, frame.stream_id, frame.width, frame.height)

    def _end_event(self, frame: Frame, track_id: int, memory: _TrackMemory) -> dict[str, Any]:
        if memory.first_pts is not None and memory.last_pts is not None:
            duration = memory.last_pts - memory.first_pts
        else:
            duration = memory.last_ts - memory.first_ts
        event = self._event(frame, "end", track_id, memory.label, max(memory.best_score, 0.0), duration_s=round(duration, 6))
        if memory.best_crop is not None:
            event["snapshot"] = self._write_snapshot(frame, "end", track_id, memory.best_crop)
        return event

    # ------------------------------------------------------------------ actions

    def _action_events(self, frame: Frame, state: _StreamState) -> list[dict[str, Any]]:
        action = frame.results.get("action")
        if not isinstance(action, dict) or not action.get("top"):
            return []
        top = action["top"][0]
        label = str(top["label"]) if float(top["score"]) >= self.options.action_min_score else None
        if label == state.action:
            state.candidate, state.candidate_frames = None, 0
            return []
        if label != state.candidate:
            state.candidate, state.candidate_frames = label, 0
        state.candidate_frames += 1
        if state.candidate_frames < self.options.action_frames:
            return []
        events = [self._action_end(frame, state)] if state.action is not None else []
        state.action, state.candidate, state.candidate_frames = label, None, 0
        if label is not None:
            state.action_since = (_finite(frame.pts), frame.decoded_at)
            events.append(self._event(frame, "action_start", None, label, float(top["score"])))
        return events

    def _action_end(self, frame: Frame, state: _StreamState) -> dict[str, Any]:
        since_pts, since_ts = state.action_since or (None, frame.decoded_at)
        pts = _finite(frame.pts)
        duration = pts - since_pts if pts is not None and since_pts is not None else frame.decoded_at - since_ts
        event = self._event(frame, "action_end", None, str(state.action), 0.0, duration_s=round(duration, 6))
        state.action, state.action_since = None, None
        return event

    # ------------------------------------------------------------------ event records

    def _event(self, frame: Frame, kind: str, track_id: int | None, label: str, score: float,
               box: list[float] | None = None, **extra: Any) -> dict[str, Any]:
        event = {"type": kind, "stream": frame.stream_id, "ts": round(frame.decoded_at, 6), "pts": _finite(frame.pts),
                 "index": frame.index, "track_id": track_id, "label": label, "score": round(float(score), 4), **extra}
        if box is not None and self.options.snapshots and track_id is not None:
            event["snapshot"] = self._write_snapshot(frame, kind, track_id, _crop(frame.image, box))
        return event

    def _write_snapshot(self, frame: Frame, kind: str, track_id: int, crop: np.ndarray) -> str | None:
        from PIL import Image

        folder = Path(self.options.snapshots) / _stream_folder(frame.stream_id)
        name = f"{frame.index:08d}-{kind}-{track_id}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path, handle = _new_file(folder, name, ".jpg")
            with handle:
                Image.fromarray(crop).save(handle, format="JPEG", quality=self.options.jpeg_quality)
        except OSError as exc:  # a full disk must not stop the pipeline: the event goes out without its picture
            log.warning("snapshot %s not written: %s", folder / f"{name}.jpg", exc)
            return None
        return str(path)


def _stream_folder(stream_id: str) -> str:
    """A stream's snapshot folder: its id made safe, with a digest when that changed it ('cam 1' and 'cam/1'
    were both cam_1, and one camera's snapshots showed the other's objects)."""
    from blinkflow.files import safe_name

    safe = safe_name(stream_id, "stream")
    return safe if safe == stream_id else f"{safe}-{hashlib.sha256(stream_id.encode()).hexdigest()[:6]}"


def _new_file(folder: Path, name: str, suffix: str) -> tuple[Path, Any]:
    """A file created afresh (never one of an earlier run: a restarted service numbers frames and tracks from the
    start again, and its snapshots overwrote those earlier events point to): ``name``, else ``name-2``..."""
    for attempt in range(1, 10_000):
        path = folder / (f"{name}{suffix}" if attempt == 1 else f"{name}-{attempt}{suffix}")
        try:
            return path, open(path, "xb")
        except FileExistsError:
            continue
    raise OSError(f"{folder}: {name}{suffix} and 9998 others exist")


def _crop(image: Any, box: list[float]) -> np.ndarray:
    height, width = image.shape[:2]
    x1, y1 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x2, y2 = min(width, math.ceil(box[2])), min(height, math.ceil(box[3]))
    if x2 <= x1 or y2 <= y1:
        return np.ascontiguousarray(image)  # a box outside the frame: the whole frame
    return np.ascontiguousarray(image[y1:y2, x1:x2])


def _finite(value: float) -> float | None:
    return round(float(value), 6) if value is not None and math.isfinite(value) else None


def _known_stream_ids(cfg: Any) -> set[str] | None:
    """The stream ids the sources will have, or None when some cannot be known before the run (directories,
    globs, streams added through the control endpoint, or ``blinkflow label``, which sets sources per video)."""
    if cfg.control.enabled or not cfg.sources:
        return None
    defaults = {"file": lambda s: Path(s.path).stem, "synthetic": lambda s: f"synthetic-{s.options.seed}",
                "frames": lambda s: "frames"}
    ids = set()
    for source in cfg.sources:
        if source.id:
            ids.add(source.id)
        elif source.type in defaults:
            ids.add(defaults[source.type](source))
        else:
            return None
    return ids
