"""Motion: carry boxes and masks along the decoder's motion vectors (or the flow stage's flow) instead
of copying them stale, and compare a frame with the reference moved along them.

A *motion field* is a coarse (gh, gw, 2) float array of backward displacements ``(dx, dy)`` in frame
pixels: the content at pixel ``p`` of the current frame came from ``p - field[cell(p)]`` of the
reference frame. A file source with ``motion_vectors`` attaches only what the decoder gives
(:func:`decoder_vectors`: the picture type and the vectors, packed) under ``frame.meta[VECTORS_KEY]``, so
its decoder thread stays as fast as plain decoding; their first reader turns them into the one-frame
field under ``frame.meta[MOTION_KEY]`` (:func:`attach_decoder_motion`, with the stream's
:class:`DecoderMotion`): the gate, or the segmenter's feature reuse when no gate did.
:func:`compose_motion` chains fields from the keyframe on; :func:`warp_backward` and :func:`shift_boxes`
apply them.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

#: side of a motion-field cell in source pixels (H.264 partitions go down to 8x8 for P/B blocks we use)
MOTION_CELL = 8

#: ``frame.meta`` key of the decoder's raw vectors: a list of :class:`DecoderVectors`, one per decoded frame
#: since the last delivered one (frames dropped by ``fps`` add up)
VECTORS_KEY = "decoder_vectors"
#: ``frame.meta`` key of the frame's one-frame backward motion field, (gh, gw, 2) float16 in output pixels
MOTION_KEY = "mvs"
#: ``frame.meta`` key set when an intra picture was decoded since the last delivered frame: its field holds no motion
#: (zeros), what the decoder did not tell; the segmenter's feature reuse takes the frame before's motion for it
INTRA_KEY = "mvs_intra"

#: FFmpeg's AVMotionVector as its side data lays it out (PyAV's ``MotionVectors.to_ndarray`` reads the same)
AV_MOTION_VECTOR = np.dtype([("source", "<i4"), ("w", "u1"), ("h", "u1"), ("src_x", "<i2"), ("src_y", "<i2"),
                             ("dst_x", "<i2"), ("dst_y", "<i2"), ("flags", "<u8"), ("motion_x", "<i4"),
                             ("motion_y", "<i4"), ("motion_scale", "<u2")], align=True)
#: the fields the motion needs, packed: 18 bytes a vector instead of 40 (``source`` keeps its low 16 bits:
#: FFmpeg writes -1 or 1)
PACKED_VECTORS = np.dtype([("source", "<i2"), ("w", "u1"), ("h", "u1"), ("dst_x", "<i2"), ("dst_y", "<i2"),
                           ("motion_x", "<i4"), ("motion_y", "<i4"), ("motion_scale", "<u2")])


def _packed_words() -> np.ndarray:
    """The 16-bit words of an AVMotionVector that, in order, make a PACKED_VECTORS record."""
    words = []
    for name in PACKED_VECTORS.names:
        offset, size = AV_MOTION_VECTOR.fields[name][1], PACKED_VECTORS.fields[name][0].itemsize
        words += [word for word in range(offset // 2, (offset + size + 1) // 2) if word not in words]
    assert len(words) * 2 == PACKED_VECTORS.itemsize  # w and h share one word
    return np.array(words)


_PACKED_WORDS = _packed_words()


@dataclass
class DecoderVectors:
    """What the decoder tells of one decoded frame's motion: its picture type (AVPictureType) and its
    motion vectors (PACKED_VECTORS; None when it exported none), with the decoded size and the size the
    source delivers (its ``resize``), both ``(width, height)``. Plain values: a frame pickles for Ray."""

    picture: int
    size: tuple[int, int]
    out: tuple[int, int]
    vectors: np.ndarray | None = None


def decoder_vectors(av_frame: Any, resize: list[int] | None = None) -> DecoderVectors:
    """The motion side data of a PyAV frame decoded with ``flags2=+export_mvs``, copied out of the frame and
    packed; the only work the decoder thread does for the motion (the fields are made where they are read)."""
    size = (av_frame.width, av_frame.height)
    side_data = _side_data(av_frame)
    side = side_data.get("MOTION_VECTORS") if len(side_data) else None
    return DecoderVectors(int(av_frame.pict_type), size, (resize[0], resize[1]) if resize else size,
                          None if side is None else pack_vectors(side))


def _side_data(av_frame: Any) -> Any:
    """The frame's side data, read without ``av_frame.side_data``: PyAV caches that container on the frame and
    the container holds the frame, so every frame read through it waits for the cyclic garbage collector,
    holding its decoder buffers (a quarter of the decode rate on the test clips, even with no vectors)."""
    frame_type, container = _av_side_data_types()
    return container(av_frame) if isinstance(av_frame, frame_type) else av_frame.side_data


@functools.cache
def _av_side_data_types() -> tuple[type, type]:
    from av.frame import Frame
    from av.sidedata.sidedata import SideDataContainer

    return Frame, SideDataContainer


def pack_vectors(side: Any) -> np.ndarray:
    """AVMotionVector side data (anything with the buffer protocol, or their structured array) as a
    PACKED_VECTORS array: one gather of 16-bit words, a few times faster than copying field by field."""
    raw = np.frombuffer(side, dtype=np.uint8)
    if sys.byteorder == "little" and raw.size % AV_MOTION_VECTOR.itemsize == 0:
        words = raw.view("<i2").reshape(-1, AV_MOTION_VECTOR.itemsize // 2)
        return words.take(_PACKED_WORDS, axis=1).view(PACKED_VECTORS).reshape(-1)
    vectors = side.to_ndarray() if hasattr(side, "to_ndarray") else np.asarray(side)  # pragma: no cover - big-endian
    packed = np.empty(len(vectors), PACKED_VECTORS)
    for name in PACKED_VECTORS.names:
        packed[name] = vectors[name]
    return packed


def attach_decoder_motion(frame: Any, trackers: dict[str, DecoderMotion]) -> None:
    """Turn the decoder vectors a source attached to ``frame`` (``meta[VECTORS_KEY]``, taken off) into its
    one-frame field (``meta[MOTION_KEY]``, float16), with the stream's decoder state in ``trackers``. Call it
    on every frame of the stream in order; an index at or before the last one starts afresh (a new decode)."""
    entries = frame.meta.pop(VECTORS_KEY, None)
    if entries is None:
        return
    tracker = trackers.get(frame.stream_id)
    if tracker is None or frame.index <= tracker.index:
        tracker = trackers[frame.stream_id] = DecoderMotion()
    motion = None
    for entry in entries:
        motion = tracker.compose(entry, motion)
    tracker.index = frame.index
    frame.meta[MOTION_KEY] = motion.astype(np.float16)
    if any(_PICTURE_ROLES.get(entry.picture, "intra") == "intra" for entry in entries):
        frame.meta[INTRA_KEY] = True


@dataclass
class _Columns:
    """A frame's vectors as contiguous columns, made once: arithmetic on a structured array's strided fields is
    several times slower, and a B-frame's speeds and its field read the same fields."""

    ahead: np.ndarray  # bool: the block refers to a frame ahead (``source > 0``)
    behind: np.ndarray  # bool: ``source < 0``
    w: np.ndarray  # intp, like h, dst_x and dst_y
    h: np.ndarray
    dst_x: np.ndarray
    dst_y: np.ndarray
    motion_x: np.ndarray
    motion_y: np.ndarray
    scale: np.ndarray  # float64 ``motion_scale``, at least 1

    @classmethod
    def of(cls, mvs: np.ndarray) -> _Columns:
        source = mvs["source"]
        return cls(source > 0, source < 0, mvs["w"].astype(np.intp), mvs["h"].astype(np.intp),
                   mvs["dst_x"].astype(np.intp), mvs["dst_y"].astype(np.intp), np.ascontiguousarray(mvs["motion_x"]),
                   np.ascontiguousarray(mvs["motion_y"]), np.maximum(mvs["motion_scale"], 1).astype(np.float64))

    def blocks(self) -> _Columns:
        """The vectors whose blocks cover something (an empty block covers no cell)."""
        if self.w.all() and self.h.all():
            return self
        keep = (self.w > 0) & (self.h > 0)
        return _Columns(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))


def _columns(mvs: np.ndarray | _Columns | None) -> _Columns | None:
    return None if mvs is None or not len(mvs) else mvs if isinstance(mvs, _Columns) else _Columns.of(mvs)


def motion_field_from_mvs(mvs: np.ndarray | None, height: int, width: int, cell: int = MOTION_CELL,
                          scale: tuple[float, float] = (1.0, 1.0), past_distance: float = 1.0,
                          future_distance: float = 1.0, uncovered: float = 0.0) -> np.ndarray:
    """The decoder's motion vectors (PACKED_VECTORS, or PyAV's ``MOTION_VECTORS`` array) as a one-frame
    backward motion field.

    Each vector moves a ``w x h`` block whose centre is ``(dst_x, dst_y)``; its
    content came from ``src = dst + motion / motion_scale`` in a reference frame
    ``past_distance`` frames back (``source < 0``) or ``future_distance`` ahead
    (B-frames). Dividing by the distance gives the motion per frame (constant
    velocity): ``(dst - src) / past`` or ``(src - dst) / future``. A cell takes the
    mean of the blocks over it; cells no vector covers (intra blocks) get
    ``uncovered`` (zero motion by default). ``scale`` maps decoded to output pixels.
    """
    field_, count = _field_and_count(_columns(mvs), height, width, cell, scale, past_distance, future_distance)
    if uncovered != 0.0 and count is not None:
        field_[count == 0] = uncovered
    return field_ if count is not None else np.full_like(field_, uncovered)


def _field_and_count(columns: _Columns | None, height: int, width: int, cell: int, scale: tuple[float, float],
                     past_distance: float, future_distance: float) -> tuple[np.ndarray, np.ndarray | None]:
    """motion_field_from_mvs with uncovered cells at zero, and how many blocks cover each cell (None: no
    vectors at all; the field is then zero)."""
    gh, gw = max(1, math.ceil(height / cell)), max(1, math.ceil(width / cell))
    columns = columns.blocks() if columns is not None else None
    if columns is None or not len(columns.w):
        return np.zeros((gh, gw, 2), dtype=np.float32), None
    w, h = columns.w, columns.h
    left, top = columns.dst_x - w // 2, columns.dst_y - h // 2
    distance = np.where(columns.ahead, -max(future_distance, 1.0), max(past_distance, 1.0))
    divisor = columns.scale * distance
    forward_x, forward_y = -columns.motion_x / divisor, -columns.motion_y / divisor
    flat, forward_x, forward_y, grid, crop = _covered_cells(left, top, w, h, cell, gh, gw, forward_x, forward_y)
    # bincount, not np.add.at (10x faster); cells are summed block by block, in the vectors' order
    count = np.bincount(flat, minlength=grid)
    per_cell = np.maximum(count, 1)
    field_ = np.empty((gh, gw, 2), dtype=np.float32)
    field_[..., 0] = crop(np.bincount(flat, weights=forward_x, minlength=grid) / per_cell * scale[0])
    field_[..., 1] = crop(np.bincount(flat, weights=forward_y, minlength=grid) / per_cell * scale[1])
    return field_, crop(count)


def _covered_cells(left: np.ndarray, top: np.ndarray, w: np.ndarray, h: np.ndarray, cell: int, gh: int, gw: int,
                   *weights: np.ndarray) -> tuple[Any, ...]:
    """One row per (block, cell it covers), block by block and row by row within a block: the flat cell
    index on a grid padded to every covered cell (no bounds checks; ``crop`` cuts the frame's cells out of
    a per-cell array), each weight repeated along, the padded grid's size and ``crop``. A block covers the
    cells from its top-left one on, ``ceil(w / cell)`` across and ``ceil(h / cell)`` down (H.264 blocks are
    4..16 pixels a side: one or two each way; blocks no larger than a cell take the short path)."""
    cx, cy, across, down = left // cell, top // cell, (w + cell - 1) // cell, (h + cell - 1) // cell
    most_across, most_down = int(across.max()), int(down.max())
    x0, y0 = min(0, int(cx.min())), min(0, int(cy.min()))
    pw = max(gw, int(cx.max()) + most_across) - x0
    ph = max(gh, int(cy.max()) + most_down) - y0
    corner = (cy - y0) * pw + (cx - x0)

    def crop(per_cell: np.ndarray) -> np.ndarray:
        return per_cell[:ph * pw].reshape(ph, pw)[-y0:gh - y0, -x0:gw - x0]

    if most_across == 1 and most_down == 1:
        return (corner, *weights, ph * pw, crop)
    # every block gets the largest block's rows (1-D repeats: broadcasting (n, 1) against a few offsets is
    # several times slower); the rows outside a smaller block go to one spare cell past the grid, which
    # crop drops, so each cell still sums its blocks in their order
    offsets = most_across * most_down
    down_by, across_by = np.divmod(np.arange(offsets), most_across)

    def spread(per_block: np.ndarray) -> np.ndarray:
        return np.repeat(per_block, offsets)

    flat = spread(corner) + np.tile(down_by * pw + across_by, len(corner))
    if int(across.min()) < most_across or int(down.min()) < most_down:
        flat[_outside_rows(across, down, across_by, down_by)] = ph * pw
    return (flat, *(spread(weight) for weight in weights), ph * pw + 1, crop)


def _outside_rows(across: np.ndarray, down: np.ndarray, across_by: np.ndarray, down_by: np.ndarray) -> np.ndarray:
    """Per (block, offset) row, whether the offset lies outside the block (``across`` x ``down`` cells): a
    table per block shape, looked up a block at a time as one machine word when the offsets fit in one."""
    most_across, most_down, offsets = int(across.max()), int(down.max()), len(across_by)
    shapes = np.arange(most_across * most_down)
    table = ((shapes // most_down + 1)[:, None] <= across_by) | ((shapes % most_down + 1)[:, None] <= down_by)
    shape = (across - 1) * most_down + (down - 1)
    if offsets in (1, 2, 4, 8):
        words = np.ascontiguousarray(table).view(f"u{offsets}").reshape(-1)
        return words[shape].view(bool)
    return table[shape].reshape(-1)


class DecoderMotion:
    """Per decoded frame (display order), its one-frame motion field from the decoder's vectors.

    FFmpeg tells only the direction of a vector's reference frame, so the
    distances are inferred from the picture types:

    * A P-frame (also S and SP) refers to the last anchor (``since`` frames back). Its vectors
      hold the whole motion since that anchor, so its step is that motion minus
      the steps already given for the B-frames in between: the motion
      accumulated over a run of B-frames is exact again at every P-frame,
      whatever the B-frames were guessed to be.
    * A B-frame lies ``k`` frames after the last anchor, in a run of ``gap``
      frames (the last anchor gap). Without a B-pyramid it refers to the two
      anchors (``k`` back, ``gap - k`` ahead); with one (x264's default) the
      middle B-frame (``gap // 2``) is a reference too and the others refer to
      it. Of the two readings, the one under which the backward and forward
      vectors give the same speed is taken, among runs of any length (they change
      with adaptive B-frames); ties go to the speed nearest the last frame's.

    Each :class:`DecoderVectors` carries the size the fields are mapped to (the source's ``resize``).
    """

    def __init__(self) -> None:
        self.count = -1
        self.index = -1  # the last delivered frame it gave motion for (attach_decoder_motion)
        self.last_anchor: int | None = None
        self.anchor_gap: int | None = None  # frames between the last two anchors; None before the first P-frame
        self.pyramid = False
        self.last_speed: float | None = None  # pixels per frame of the last B-frame whose reading was measured
        self.run_steps: np.ndarray | None = None  # the sum of the B-frames' steps since the last anchor

    def step(self, decoded: DecoderVectors) -> np.ndarray:
        """The one-frame field of the next decoded frame (display order)."""
        self.count += 1
        role = _PICTURE_ROLES.get(decoded.picture, "intra")
        since = self.count - self.last_anchor if self.last_anchor is not None else 1  # >= 1: count moved on
        vectors = _columns(decoded.vectors) if role != "intra" else None
        if role == "bidirectional":
            past, future = self._b_distances(vectors, since)
            step = self._field(decoded, vectors, past, future)
            self.run_steps = step if self.run_steps is None else self.run_steps + step
            return step
        step = self._anchor_step(decoded, vectors)
        if role == "predicted" and self.last_anchor is not None:
            self.anchor_gap = since
        self.last_anchor, self.run_steps = self.count, None
        return step

    def compose(self, decoded: DecoderVectors, pending: np.ndarray | None) -> np.ndarray:
        """This frame's step composed onto ``pending`` (the motion of frames decoded but not kept)."""
        return compose_motion(self.step(decoded), pending)

    def _anchor_step(self, decoded: DecoderVectors, vectors: _Columns | None) -> np.ndarray:
        """The motion since the last anchor (undivided), less what the B-frames since then were given;
        cells without a vector (intra) keep what those B-frames said (their step is zero)."""
        whole, count = self._field_counted(decoded, vectors, 1.0, 1.0)
        if count is None:
            return whole
        if self.run_steps is not None and self.run_steps.shape == whole.shape:
            whole -= self.run_steps
        whole[count == 0] = 0.0
        return whole

    def _b_distances(self, vectors: _Columns | None, since: int) -> tuple[int, int]:
        """(past, future) reference distances of a B-frame ``since`` frames after the last anchor."""
        gap = max(self.anchor_gap or since + 1, since + 1)  # before the first P-frame: the shortest run
        flat, pyramid = _b_references(since, gap, False), _b_references(since, gap, True)
        expected = pyramid if self.pyramid else flat
        speeds = _speeds_by_direction(vectors)
        if speeds is None:
            return expected
        # runs change length (adaptive B-frames, the end of a clip): every run up to x264's longest, with and
        # without a pyramid; of the readings whose two directions agree on the speed, the one nearest the
        # last frame's speed (or the expected one)
        readings = _b_readings(since)
        mismatch = [_mismatch(speeds, pair) for pair in readings]
        best = min(mismatch)
        agreeing = [pair for pair, off in zip(readings, mismatch) if off <= best + _SPEED_TOLERANCE]
        pick = min(agreeing, key=lambda pair: (self._surprise(speeds, pair), pair != expected))
        self.last_speed = _speed(speeds, pick)
        if flat != pyramid and pick in (flat, pyramid):
            self.pyramid = pick == pyramid
        return pick

    def _surprise(self, speeds: tuple[float, float], pair: tuple[int, int]) -> float:
        """How far the speed a reading implies is from the last frame's (0 when there is none)."""
        return abs(math.log(_speed(speeds, pair) / self.last_speed)) if self.last_speed else 0.0

    def _field(self, decoded: DecoderVectors, vectors: _Columns | None, past: float, future: float) -> np.ndarray:
        return self._field_counted(decoded, vectors, past, future)[0]

    def _field_counted(self, decoded: DecoderVectors, vectors: _Columns | None, past: float,
                         future: float) -> tuple[np.ndarray, np.ndarray | None]:
        """The frame's field on the output's cells (uncovered cells zero) and each cell's block count (None: no
        vectors)."""
        (width, height), (out_w, out_h) = decoded.size, decoded.out
        factor = _whole_factor((width, height), (out_w, out_h))
        # a source that resizes by a whole factor (or not at all): the output's cells are whole squares of
        # decoded pixels, so the blocks are averaged straight onto them (every vector counts, where making
        # the finer field and taking every factor-th cell dropped the others and cost 2.4x the time)
        cell = MOTION_CELL * (factor or 1)
        field_, count = _field_and_count(vectors, height, width, cell, (out_w / width, out_h / height), past, future)
        if factor:
            return field_, count
        return regrid_motion(field_, out_h, out_w), None if count is None else regrid_motion(count, out_h, out_w)


def _whole_factor(size: tuple[int, int], out: tuple[int, int]) -> int | None:
    """k when ``size`` is ``out`` times a whole k on both sides (1: no resize), else None."""
    k, rest = divmod(size[0], out[0]) if out[0] else (0, 1)
    return k if k >= 1 and rest == 0 and size[1] == k * out[1] else None


#: AVPictureType -> how its vectors read: anchors (intra: none; predicted: from the last anchor) or a
#: B-frame between anchors. S (MPEG-4 GMC) and SP are predicted; SI is intra; BI (VC-1) is a B-frame
#: coded without vectors. An unknown type (0) is read as intra: no motion rather than a wrong one.
_PICTURE_ROLES = {1: "intra", 2: "predicted", 3: "bidirectional", 4: "predicted", 5: "intra", 6: "predicted",
                  7: "bidirectional"}
#: the most B-frames between two anchors that readings consider (x264's maximum)
_LONGEST_B_RUN = 16
#: readings whose directions disagree by at most this much more than the best one's (log ratio) are ties
_SPEED_TOLERANCE = math.log(1.25)


def _speeds_by_direction(vectors: _Columns | None) -> tuple[float, float] | None:
    """Median displacement (pixels) of the moving blocks referring back and of those referring ahead;
    ``None`` unless both directions have moving blocks."""
    if vectors is None:
        return None
    length = np.hypot(vectors.motion_x, vectors.motion_y) / vectors.scale
    moving = length > 0
    back, ahead = length[moving & vectors.behind], length[moving & vectors.ahead]
    if not (len(back) and len(ahead)):
        return None
    return _median(back), _median(ahead)


def _median(values: np.ndarray) -> float:
    """``np.median`` of a 1-D array, the same value without its generic machinery (a third of the time on a
    frame's few thousand vectors, which B-frames read on every frame)."""
    n = values.size
    if n % 2:
        return float(np.partition(values, n // 2)[n // 2])
    part = np.partition(values, [n // 2 - 1, n // 2])
    return float((part[n // 2 - 1] + part[n // 2]) / 2)


def _b_references(since: int, gap: int, pyramid: bool) -> tuple[int, int]:
    """(past, future) distances of the references of the B-frame ``since`` frames into a run of ``gap``
    frames: the anchors, or with a B-pyramid the middle B-frame (``gap // 2``) when it lies between."""
    middle = gap // 2
    if not pyramid or gap < 3 or since == middle:
        return since, gap - since
    return (since, middle - since) if since < middle else (since - middle, gap - since)


@functools.lru_cache(maxsize=64)
def _b_readings(since: int) -> tuple[tuple[int, int], ...]:
    """Every (past, future) reading of a B-frame ``since`` frames after the last anchor, sorted: runs up to
    x264's longest, with and without a pyramid (the same for every frame at that distance: made once)."""
    return tuple(sorted({_b_references(since, run, pyramid) for run in range(since + 1, since + 1 + _LONGEST_B_RUN)
                         for pyramid in (False, True)}))


def _speed(speeds: tuple[float, float], distances: tuple[int, int]) -> float:
    """Pixels per frame under a reading: the geometric mean of what the two directions say."""
    return math.sqrt(speeds[0] / distances[0] * speeds[1] / distances[1])


def _mismatch(speeds: tuple[float, float], distances: tuple[int, int]) -> float:
    """How far apart the speeds per frame are when the vectors span ``distances`` (past, future) frames."""
    return abs(math.log((speeds[0] / distances[0]) / (speeds[1] / distances[1])))


def regrid_motion(motion: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample a motion field (nearest cell) onto the MOTION_CELL grid of a ``height x width`` frame."""
    gh, gw = max(1, math.ceil(height / MOTION_CELL)), max(1, math.ceil(width / MOTION_CELL))
    return field_at_pixels(motion, gh, gw)  # the new cells take the old ones as pixels would


def compose_motion(step: np.ndarray | None, accumulated: np.ndarray | None) -> np.ndarray | None:
    """Backward motion from the reference to frame t, given the motion from t-1 to t (``step``)
    and from the reference to t-1 (``accumulated``): ``step(p) + accumulated(p - step(p))``."""
    if step is None:
        return accumulated
    if accumulated is None or accumulated.shape != step.shape:
        return step.astype(np.float32)
    gh, gw = step.shape[:2]
    ys, xs = _index_grid(gh, gw)
    cell_w, cell_h = _cell_size(step)
    src_x = _source_pixels(xs, step[..., 0] / cell_w, gw)
    src_y = _source_pixels(ys, step[..., 1] / cell_h, gh)
    return (step + accumulated[src_y, src_x]).astype(np.float32)


def _cell_size(motion: np.ndarray) -> tuple[float, float]:
    """Cell size in pixels; fields carry it implicitly as MOTION_CELL (see motion_field_from_mvs)."""
    return float(MOTION_CELL), float(MOTION_CELL)


def field_at_pixels(motion: np.ndarray, height: int, width: int) -> np.ndarray:
    """The coarse field expanded to one (dx, dy) per pixel (nearest cell)."""
    rows, cols = _nearest_cells(motion.shape[0], motion.shape[1], height, width)
    # two 1-D takes: a sixth of the time of one broadcast (rows, cols) index on the gate's fields
    return np.take(np.take(motion, rows[:, 0], axis=0), cols[0], axis=1)


@functools.lru_cache(maxsize=64)
def _nearest_cells(gh: int, gw: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel row (a column vector) and column (a row vector) of a ``height x width`` frame, the cell of a
    (gh, gw) field it takes (read-only: shared by every call on the same sizes, as the gate makes them per frame)."""
    rows = np.minimum(np.arange(height) * gh // max(height, 1), gh - 1)[:, None]
    cols = np.minimum(np.arange(width) * gw // max(width, 1), gw - 1)[None, :]
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


@functools.lru_cache(maxsize=64)
def _index_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.mgrid[0:height, 0:width]`` as (ys, xs), read-only and cached (the gate warps every frame)."""
    ys, xs = np.mgrid[0:height, 0:width]
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def warp_backward(image: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """``out[p] = image[p - motion(p)]`` (nearest pixel, edges clamped): how a decoder moves blocks."""
    height, width = image.shape[:2]
    per_pixel = field_at_pixels(motion, height, width)
    ys, xs = _index_grid(height, width)
    return image[_source_pixels(ys, per_pixel[..., 1], height), _source_pixels(xs, per_pixel[..., 0], width)]


def _source_pixels(at: np.ndarray, shift: np.ndarray, size: int) -> np.ndarray:
    """``clip(rint(at - shift), 0, size - 1)`` as indices, in place on one temporary (the gate warps every frame)."""
    source = at - shift
    np.rint(source, out=source)
    np.clip(source, 0, size - 1, out=source)
    return source.astype(np.intp)


def _median_motion(motion: np.ndarray, box: list[float], height: int, width: int) -> np.ndarray:
    gh, gw = motion.shape[:2]
    x0 = int(np.clip(box[0] * gw / width, 0, gw - 1))
    x1 = int(np.clip(math.ceil(box[2] * gw / width), x0 + 1, gw))
    y0 = int(np.clip(box[1] * gh / height, 0, gh - 1))
    y1 = int(np.clip(math.ceil(box[3] * gh / height), y0 + 1, gh))
    return np.median(motion[y0:y1, x0:x1].reshape(-1, 2), axis=0)


# A carried box pushed this far out of the frame is dropped: the detector does not keep an object it
# sees only a sliver of, and a box clipped to nothing is no box (docs/skipping.md, "Objects leaving").
MIN_VISIBLE = 0.75


def shift_boxes(boxes: list[list[float]], motion: np.ndarray, height: int, width: int,
                min_visible: float = 0.0) -> tuple[list[list[float]], list[int]]:
    """Move each box by the median motion inside it (sampled where it was, then where it went), clipped.
    Returns the moved boxes and their indices in ``boxes``: those left with under ``min_visible`` of
    their area inside the frame (or none) are dropped."""
    moved, kept = [], []
    for i, box in enumerate(boxes):
        dx, dy = _median_motion(motion, box, height, width)
        shifted = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
        dx, dy = _median_motion(motion, shifted, height, width)
        x1, x2 = np.clip([box[0] + dx, box[2] + dx], 0, width)
        y1, y2 = np.clip([box[1] + dy, box[3] + dy], 0, height)
        area = (box[2] - box[0]) * (box[3] - box[1])
        visible = (x2 - x1) * (y2 - y1)
        if area > 0 and (visible <= 0 or visible < min_visible * area):
            continue
        moved.append([round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2)])
        kept.append(i)
    return moved, kept


def motion_from_flow(flow_result: dict[str, Any] | None, key_index: int, index: int) -> np.ndarray | None:
    """Constant-velocity extrapolation of the keyframe's flow (prev -> key) to ``index``."""
    if not flow_result or "flow" not in flow_result:
        return None
    prev, key = flow_result.get("pair", [key_index - 1, key_index])
    gap = max(1, int(key) - int(prev))
    flow = np.asarray(flow_result["flow"], dtype=np.float32) * float(flow_result.get("scale", 1))
    return (np.moveaxis(flow, 0, -1) * ((index - key_index) / gap)).astype(np.float32)


def is_still(motion: np.ndarray | None, tolerance: float = 0.25) -> bool:
    return motion is None or not np.any(np.abs(motion) > tolerance)
