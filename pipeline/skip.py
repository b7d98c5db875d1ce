"""Temporal-redundancy skipping: the pieces the gate stage and the driver share.

* **Change signal** (:func:`changed_mask`, :func:`largest_component`): where a
  frame differs from the reference the caches represent, robust to codec noise.
* **Tiles** (:func:`tile_rects`, :func:`changed_tiles`): the grid on which the
  gate tells the segment stage what to recompute.
* **Motion** (:func:`motion_field_from_mvs`, :func:`compose_motion`,
  :func:`shift_boxes`, :func:`warp_class_map`): carry boxes and masks along the
  decoder's motion vectors (or the flow stage's flow) instead of copying them
  stale. A *motion field* is a coarse (gh, gw, 2) float array of backward
  displacements ``(dx, dy)`` in frame pixels: the content at pixel ``p`` of the
  current frame came from ``p - field[cell(p)]`` of the reference frame.
* **Agreement** (:func:`box_f1`, :func:`mask_miou`, :func:`agreement`): how well
  a carried-over result matches a fresh one, measured on audit frames.
* :class:`CarryOver` runs in the driver (inside ``OrderedOutput``, identical for
  both runners): it fills reused frames, scores audits, keeps per-stream stats
  and queues the audit agreement that goes back to the gate (see
  :meth:`CarryOver.attach_feedback` for why that is deterministic).

numpy only at import time; torch and PIL are imported where needed.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: side of a motion-field cell in source pixels (H.264 partitions go down to 8x8 for P/B blocks we use)
MOTION_CELL = 8
#: the results key of an audit's scores (``{"agreement", "boxes_f1", "mask_iou", "audit_of"}``); never carried over
AUDIT_KEY = "audit"


# --------------------------------------------------------------------------- change signal


def box_blur(image: np.ndarray, size: int) -> np.ndarray:
    """Mean filter with an odd ``size`` window (edges replicated), via summed-area tables."""
    if size <= 1:
        return image
    pad = size // 2
    padded = np.pad(image, pad, mode="edge")
    table = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = image.shape
    total = table[size : size + h, size : size + w] - table[:h, size : size + w] - table[size : size + h, :w] + table[:h, :w]
    return total / float(size * size)


def blurred_difference(reference: np.ndarray, current: np.ndarray, blur: int) -> np.ndarray:
    """|current - reference|, box-blurred: the change signal before any threshold."""
    return box_blur(np.abs(current - reference), blur | 1)


#: lighting: the largest global gain a fit may explain away (exposure steps, clouds); a larger one is change
MAX_LIGHT_GAIN = 1.5


def relit(reference: np.ndarray, current: np.ndarray, inlier: float, max_gain: float = MAX_LIGHT_GAIN) -> np.ndarray:
    """``reference`` under ``current``'s global lighting: ``gain * reference + offset``, fitted by least squares
    on the pixels that agree within ``inlier`` gray levels after a first fit (so a moving object does not bend
    the fit). A gain outside ``1 / max_gain .. max_gain`` is not lighting: the reference comes back unchanged."""
    x, y = reference.ravel(), current.ravel()
    gain, offset = _light_fit(x, y)
    keep = np.abs(gain * x + offset - y) <= inlier
    if keep.sum() < max(16, x.size // 4):
        return reference
    gain, offset = _light_fit(x[keep], y[keep])
    if not 1.0 / max_gain <= gain <= max_gain:
        return reference
    return (gain * reference + offset).astype(np.float32)


def _light_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares ``y = gain * x + offset``; a flat ``x`` gets gain 1 (gain and offset cannot be told apart)."""
    n = float(x.size)
    sx, sy = float(x.sum(dtype=np.float64)), float(y.sum(dtype=np.float64))
    sxx, sxy = float(np.dot(x, x)), float(np.dot(x, y))
    spread = sxx - sx * sx / n
    if spread <= 1e-6 * n:
        return 1.0, (sy - sx) / n
    gain = (sxy - sx * sy / n) / spread
    return gain, (sy - gain * sx) / n


def changed_mask(reference: np.ndarray, current: np.ndarray, pixel_threshold: float, blur: int,
                 noise_sigmas: float = 0.0) -> np.ndarray:
    """Boolean mask of changed signal pixels: blurred |difference| above the pixel threshold.

    Block averaging (the signal's downscale) and the blur remove isolated codec
    noise. With ``noise_sigmas > 0`` the threshold also rises to that many
    robust standard deviations (1.4826 x MAD) of the blurred difference, so a
    noisy camera does not read as change everywhere.
    """
    diff = blurred_difference(reference, current, blur)
    threshold = float(pixel_threshold)
    if noise_sigmas > 0:
        median = float(np.median(diff))
        sigma = 1.4826 * float(np.median(np.abs(diff - median)))
        threshold = max(threshold, median + noise_sigmas * sigma)
    return diff > threshold


def largest_component(mask: np.ndarray) -> int:
    """Pixel count of the largest 4-connected component of ``mask``."""
    if not mask.any():
        return 0
    from scipy import ndimage  # lazy: only the gate needs it

    labels, count = ndimage.label(mask)  # 4-connectivity is scipy's default structure
    return int(np.bincount(labels.ravel(), minlength=count + 1)[1:].max())


# --------------------------------------------------------------------------- tiles


def tile_edges(count: int, size: int) -> list[int]:
    """``count + 1`` integer edges splitting ``size`` pixels into near-equal tiles."""
    return [(i * size) // count for i in range(count + 1)]


def tile_rects(grid: tuple[int, int] | list[int], height: int, width: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every tile, row-major, on a frame (or signal) of the given size."""
    rows, cols = grid
    ys, xs = tile_edges(rows, height), tile_edges(cols, width)
    return [(ys[r], ys[r + 1], xs[c], xs[c + 1]) for r in range(rows) for c in range(cols)]


def changed_tiles(mask: np.ndarray, grid: tuple[int, int] | list[int], margin: int = 0, min_fraction: float = 0.0) -> list[int]:
    """Row-major indices of the tiles where at least ``min_fraction`` of ``mask``'s pixels changed (at
    least one pixel when 0), plus their neighbours up to ``margin`` tiles away (change just below the
    threshold sits around real change). ``min_fraction`` keeps scattered codec noise, a few pixels
    in a tile, from marking the tile and, through the margin, its neighbours."""
    return tile_indices(changed_tile_grid(mask, grid, min_fraction), margin)


def changed_tile_grid(mask: np.ndarray, grid: tuple[int, int] | list[int], min_fraction: float = 0.0) -> np.ndarray:
    """A (rows, cols) boolean grid: the tiles where at least ``min_fraction`` of ``mask``'s pixels
    changed (at least one pixel when 0)."""
    h, w = mask.shape
    rows, cols = grid
    ys, xs = np.array(tile_edges(rows, h)), np.array(tile_edges(cols, w))
    # changed pixels per tile in one pass: cumulative sums sampled at the tile edges
    table = np.pad(mask.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
    corners = table[np.ix_(ys, xs)]
    counts = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    areas = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return (counts > 0) & (counts >= min_fraction * areas)


def tile_indices(hit: np.ndarray, margin: int = 0) -> list[int]:
    """Row-major indices of the True tiles of a (rows, cols) grid, grown by ``margin`` tiles each way."""
    rows, cols = hit.shape
    if margin > 0:
        grown = hit.copy()
        for dy in range(-margin, margin + 1):
            for dx in range(-margin, margin + 1):
                shifted = np.zeros_like(hit)
                shifted[max(0, dy) : rows + min(0, dy), max(0, dx) : cols + min(0, dx)] = \
                    hit[max(0, -dy) : rows + min(0, -dy), max(0, -dx) : cols + min(0, -dx)]
                grown |= shifted
        hit = grown
    return [int(i) for i in np.flatnonzero(hit.ravel())]


def tile_maxima(values: np.ndarray, grid: tuple[int, int] | list[int]) -> np.ndarray:
    """The largest value inside each tile, as a (rows, cols) array."""
    h, w = values.shape
    ys, xs = tile_edges(grid[0], h), tile_edges(grid[1], w)
    return np.maximum.reduceat(np.maximum.reduceat(values, ys[:-1], axis=0), xs[:-1], axis=1)


def tile_runs(changed: list[int], grid: tuple[int, int] | list[int]) -> list[tuple[int, int, int]]:
    """Changed tiles merged into horizontal runs ``(row, first_col, last_col + 1)``: one crop each."""
    cols = grid[1]
    runs: list[tuple[int, int, int]] = []
    for index in sorted(changed):
        row, col = divmod(index, cols)
        if runs and runs[-1][0] == row and runs[-1][2] == col:
            runs[-1] = (row, runs[-1][1], col + 1)
        else:
            runs.append((row, col, col + 1))
    return runs


# --------------------------------------------------------------------------- motion


def motion_field_from_mvs(mvs: np.ndarray | None, height: int, width: int, cell: int = MOTION_CELL,
                          scale: tuple[float, float] = (1.0, 1.0), past_distance: float = 1.0,
                          future_distance: float = 1.0, uncovered: float = 0.0) -> np.ndarray:
    """The decoder's motion vectors (PyAV ``MOTION_VECTORS`` side data) as a one-frame backward motion field.

    Each vector moves a ``w x h`` block whose centre is ``(dst_x, dst_y)``; its
    content came from ``src = dst + motion / motion_scale`` in a reference frame
    ``past_distance`` frames back (``source < 0``) or ``future_distance`` ahead
    (B-frames). Dividing by the distance gives the motion per frame (constant
    velocity): ``(dst - src) / past`` or ``(src - dst) / future``. Cells no
    vector covers (intra blocks) get ``uncovered`` (zero motion by default).
    ``scale`` maps decoded to output pixels.
    """
    gh, gw = max(1, math.ceil(height / cell)), max(1, math.ceil(width / cell))
    if mvs is None or not len(mvs):
        return np.full((gh, gw, 2), uncovered, dtype=np.float32)
    # contiguous columns once: arithmetic on a structured array's strided fields is several times slower
    w, h = mvs["w"].astype(np.intp), mvs["h"].astype(np.intp)
    left, top = mvs["dst_x"].astype(np.intp) - w // 2, mvs["dst_y"].astype(np.intp) - h // 2
    distance = np.where(mvs["source"] > 0, -max(future_distance, 1.0), max(past_distance, 1.0))
    divisor = np.maximum(mvs["motion_scale"].astype(np.float64), 1.0) * distance
    forward_x, forward_y = -mvs["motion_x"] / divisor, -mvs["motion_y"] / divisor
    # each block covers the cells under it (H.264 blocks are 4..16 px a side): one row per (block, cell)
    across, down = (w + cell - 1) // cell, (h + cell - 1) // cell
    covers = across * down
    block = np.repeat(np.arange(len(mvs)), covers)
    nth = np.arange(len(block)) - np.repeat(np.cumsum(covers) - covers, covers)
    cx = (left[block] + nth % across[block] * cell) // cell
    cy = (top[block] + nth // across[block] * cell) // cell
    inside = (cx >= 0) & (cx < gw) & (cy >= 0) & (cy < gh)
    flat, block = cy[inside] * gw + cx[inside], block[inside]
    # bincount, not np.add.at (10x faster)
    count = np.bincount(flat, minlength=gh * gw)
    per_cell = np.maximum(count, 1)
    field_ = np.empty((gh, gw, 2), dtype=np.float32)
    field_[..., 0] = (np.bincount(flat, weights=forward_x[block], minlength=gh * gw) / per_cell * scale[0]).reshape(gh, gw)
    field_[..., 1] = (np.bincount(flat, weights=forward_y[block], minlength=gh * gw) / per_cell * scale[1]).reshape(gh, gw)
    if uncovered != 0.0:
        field_[count.reshape(gh, gw) == 0] = uncovered
    return field_


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

    ``resize`` ([width, height]) maps the fields to output pixels.
    """

    def __init__(self, resize: list[int] | None = None) -> None:
        self.resize = resize
        self.count = -1
        self.last_anchor: int | None = None
        self.anchor_gap: int | None = None  # frames between the last two anchors; None before the first P-frame
        self.pyramid = False
        self.last_speed: float | None = None  # pixels per frame of the last B-frame whose reading was measured
        self.run_steps: np.ndarray | None = None  # the sum of the B-frames' steps since the last anchor

    def step(self, av_frame: Any) -> np.ndarray:
        self.count += 1
        role = _PICTURE_ROLES.get(int(av_frame.pict_type), "intra")
        since = self.count - self.last_anchor if self.last_anchor is not None else 1  # >= 1: count moved on
        side = av_frame.side_data.get("MOTION_VECTORS")
        vectors = side.to_ndarray() if side is not None and role != "intra" else None
        if role == "bidirectional":
            past, future = self._b_distances(vectors, since)
            step = self._field(av_frame, vectors, past, future)
            self.run_steps = step if self.run_steps is None else self.run_steps + step
            return step
        step = self._anchor_step(av_frame, vectors)
        if role == "predicted" and self.last_anchor is not None:
            self.anchor_gap = since
        self.last_anchor, self.run_steps = self.count, None
        return step

    def compose(self, av_frame: Any, pending: np.ndarray | None) -> np.ndarray:
        """This frame's step composed onto ``pending`` (the motion of frames decoded but not kept)."""
        return compose_motion(self.step(av_frame), pending)

    def _anchor_step(self, av_frame: Any, vectors: np.ndarray | None) -> np.ndarray:
        """The motion since the last anchor (undivided), less what the B-frames since then were given;
        cells without a vector (intra) keep what those B-frames said."""
        whole = self._field(av_frame, vectors, 1.0, 1.0, uncovered=np.nan)
        if self.run_steps is not None and self.run_steps.shape == whole.shape:
            whole -= self.run_steps
        return np.nan_to_num(whole, nan=0.0)

    def _b_distances(self, vectors: np.ndarray | None, since: int) -> tuple[int, int]:
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
        readings = {_b_references(since, run, pyramid) for run in range(since + 1, since + 1 + _LONGEST_B_RUN)
                    for pyramid in (False, True)}
        mismatch = {pair: _mismatch(speeds, pair) for pair in readings}
        best = min(mismatch.values())
        agreeing = [pair for pair in sorted(readings) if mismatch[pair] <= best + _SPEED_TOLERANCE]
        pick = min(agreeing, key=lambda pair: (self._surprise(speeds, pair), pair != expected))
        self.last_speed = _speed(speeds, pick)
        if flat != pyramid and pick in (flat, pyramid):
            self.pyramid = pick == pyramid
        return pick

    def _surprise(self, speeds: tuple[float, float], pair: tuple[int, int]) -> float:
        """How far the speed a reading implies is from the last frame's (0 when there is none)."""
        return abs(math.log(_speed(speeds, pair) / self.last_speed)) if self.last_speed else 0.0

    def _field(self, av_frame: Any, vectors: np.ndarray | None, past: float, future: float,
               uncovered: float = 0.0) -> np.ndarray:
        height, width = av_frame.height, av_frame.width
        out_w, out_h = (self.resize[0], self.resize[1]) if self.resize else (width, height)
        field_ = motion_field_from_mvs(vectors, height, width, scale=(out_w / width, out_h / height),
                                       past_distance=past, future_distance=future, uncovered=uncovered)
        return regrid_motion(field_, out_h, out_w) if (out_w, out_h) != (width, height) else field_


#: AVPictureType -> how its vectors read: anchors (intra: none; predicted: from the last anchor) or a
#: B-frame between anchors. S (MPEG-4 GMC) and SP are predicted; SI is intra; BI (VC-1) is a B-frame
#: coded without vectors. An unknown type (0) is read as intra: no motion rather than a wrong one.
_PICTURE_ROLES = {1: "intra", 2: "predicted", 3: "bidirectional", 4: "predicted", 5: "intra", 6: "predicted",
                  7: "bidirectional"}
#: the most B-frames between two anchors that readings consider (x264's maximum)
_LONGEST_B_RUN = 16
#: readings whose directions disagree by at most this much more than the best one's (log ratio) are ties
_SPEED_TOLERANCE = math.log(1.25)


def _speeds_by_direction(vectors: np.ndarray | None) -> tuple[float, float] | None:
    """Median displacement (pixels) of the moving blocks referring back and of those referring ahead;
    ``None`` unless both directions have moving blocks."""
    if vectors is None or not len(vectors):
        return None
    length = np.hypot(vectors["motion_x"], vectors["motion_y"]) / np.maximum(vectors["motion_scale"], 1)
    back, ahead = length[(vectors["source"] < 0) & (length > 0)], length[(vectors["source"] > 0) & (length > 0)]
    if not (len(back) and len(ahead)):
        return None
    return float(np.median(back)), float(np.median(ahead))


def _b_references(since: int, gap: int, pyramid: bool) -> tuple[int, int]:
    """(past, future) distances of the references of the B-frame ``since`` frames into a run of ``gap``
    frames: the anchors, or with a B-pyramid the middle B-frame (``gap // 2``) when it lies between."""
    middle = gap // 2
    if not pyramid or gap < 3 or since == middle:
        return since, gap - since
    return (since, middle - since) if since < middle else (since - middle, gap - since)


def _speed(speeds: tuple[float, float], distances: tuple[int, int]) -> float:
    """Pixels per frame under a reading: the geometric mean of what the two directions say."""
    return math.sqrt(speeds[0] / distances[0] * speeds[1] / distances[1])


def _mismatch(speeds: tuple[float, float], distances: tuple[int, int]) -> float:
    """How far apart the speeds per frame are when the vectors span ``distances`` (past, future) frames."""
    return abs(math.log((speeds[0] / distances[0]) / (speeds[1] / distances[1])))


def regrid_motion(motion: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resample a motion field (nearest cell) onto the MOTION_CELL grid of a ``height x width`` frame."""
    gh, gw = max(1, math.ceil(height / MOTION_CELL)), max(1, math.ceil(width / MOTION_CELL))
    rows = np.minimum(np.arange(gh) * motion.shape[0] // gh, motion.shape[0] - 1)
    cols = np.minimum(np.arange(gw) * motion.shape[1] // gw, motion.shape[1] - 1)
    return motion[rows[:, None], cols[None, :]]


def compose_motion(step: np.ndarray | None, accumulated: np.ndarray | None) -> np.ndarray | None:
    """Backward motion from the reference to frame t, given the motion from t-1 to t (``step``)
    and from the reference to t-1 (``accumulated``): ``step(p) + accumulated(p - step(p))``."""
    if step is None:
        return accumulated
    if accumulated is None or accumulated.shape != step.shape:
        return step.astype(np.float32)
    gh, gw = step.shape[:2]
    ys, xs = np.mgrid[0:gh, 0:gw]
    cell_w, cell_h = _cell_size(step)
    src_x = np.clip(np.rint(xs - step[..., 0] / cell_w), 0, gw - 1).astype(np.intp)
    src_y = np.clip(np.rint(ys - step[..., 1] / cell_h), 0, gh - 1).astype(np.intp)
    return (step + accumulated[src_y, src_x]).astype(np.float32)


def _cell_size(motion: np.ndarray) -> tuple[float, float]:
    """Cell size in pixels; fields carry it implicitly as MOTION_CELL (see motion_field_from_mvs)."""
    return float(MOTION_CELL), float(MOTION_CELL)


def field_at_pixels(motion: np.ndarray, height: int, width: int) -> np.ndarray:
    """The coarse field expanded to one (dx, dy) per pixel (nearest cell)."""
    gh, gw = motion.shape[:2]
    rows = np.minimum(np.arange(height) * gh // max(height, 1), gh - 1)
    cols = np.minimum(np.arange(width) * gw // max(width, 1), gw - 1)
    return motion[rows[:, None], cols[None, :]]


def warp_backward(image: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """``out[p] = image[p - motion(p)]`` (nearest pixel, edges clamped): how a decoder moves blocks."""
    height, width = image.shape[:2]
    per_pixel = field_at_pixels(motion, height, width)
    ys, xs = np.mgrid[0:height, 0:width]
    src_x = np.clip(np.rint(xs - per_pixel[..., 0]), 0, width - 1).astype(np.intp)
    src_y = np.clip(np.rint(ys - per_pixel[..., 1]), 0, height - 1).astype(np.intp)
    return image[src_y, src_x]


def _median_motion(motion: np.ndarray, box: list[float], height: int, width: int) -> np.ndarray:
    gh, gw = motion.shape[:2]
    x0 = int(np.clip(box[0] * gw / width, 0, gw - 1))
    x1 = int(np.clip(math.ceil(box[2] * gw / width), x0 + 1, gw))
    y0 = int(np.clip(box[1] * gh / height, 0, gh - 1))
    y1 = int(np.clip(math.ceil(box[3] * gh / height), y0 + 1, gh))
    return np.median(motion[y0:y1, x0:x1].reshape(-1, 2), axis=0)


def shift_boxes(boxes: list[list[float]], motion: np.ndarray, height: int, width: int) -> list[list[float]]:
    """Move each box by the median motion inside it (sampled where it was, then where it went), clipped."""
    moved = []
    for box in boxes:
        dx, dy = _median_motion(motion, box, height, width)
        shifted = [box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy]
        dx, dy = _median_motion(motion, shifted, height, width)
        x1, x2 = np.clip([box[0] + dx, box[2] + dx], 0, width)
        y1, y2 = np.clip([box[1] + dy, box[3] + dy], 0, height)
        moved.append([round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2)])
    return moved


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


# --------------------------------------------------------------------------- agreement


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (N, 4) and (M, 4) boxes in x1, y1, x2, y2."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def box_f1(carried: dict[str, Any], fresh: dict[str, Any], iou_threshold: float = 0.5,
           ignore_below: float | None = None) -> float:
    """F1 of carried boxes against fresh ones: greedy one-to-one matching, same label, IoU >= threshold.

    Two empty results agree perfectly (1.0); fresh boxes are matched best-score first. With
    ``ignore_below``, an unmatched box of either side scoring below it counts neither way (it may still
    match): a box held by the detector's score hysteresis exists or not depending on which earlier frames
    the detector saw, not on these pixels.
    """
    a = np.asarray(carried.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    b = np.asarray(fresh.get("boxes") or [], dtype=np.float64).reshape(-1, 4)
    if ignore_below is not None:
        sa = np.asarray(carried.get("scores") or [1.0] * len(a), dtype=np.float64)
        sb = np.asarray(fresh.get("scores") or [1.0] * len(b), dtype=np.float64)
        matches, used_a, used_b = _greedy_matches(carried, fresh, a, b, iou_threshold)
        missed = int(((~used_a) & (sa >= ignore_below)).sum() + ((~used_b) & (sb >= ignore_below)).sum())
        return 1.0 if matches == 0 and missed == 0 else 2.0 * matches / (2.0 * matches + missed)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    matches, _, _ = _greedy_matches(carried, fresh, a, b, iou_threshold)
    return 2.0 * matches / (len(a) + len(b))


def _greedy_matches(carried: dict[str, Any], fresh: dict[str, Any], a: np.ndarray, b: np.ndarray,
                    iou_threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Matches of ``box_f1`` and which boxes of each side were matched."""
    used, used_b = np.zeros(len(a), dtype=bool), np.zeros(len(b), dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return 0, used, used_b
    la, lb = list(carried.get("labels") or [0] * len(a)), list(fresh.get("labels") or [0] * len(b))
    iou = box_iou(a, b)
    iou[np.asarray(la)[:, None] != np.asarray(lb)[None, :]] = 0.0
    matches = 0
    for j in range(len(b)):  # fresh results are sorted best first
        candidates = np.where(~used & (iou[:, j] >= iou_threshold), iou[:, j], -1.0)
        i = int(np.argmax(candidates))
        if candidates[i] >= iou_threshold:
            used[i] = used_b[j] = True
            matches += 1
    return matches, used, used_b


def mask_miou(carried: np.ndarray, fresh: np.ndarray) -> float:
    """Mean IoU over the classes present in either class map (1.0 for identical maps)."""
    if carried.shape != fresh.shape:
        return 0.0
    num = int(max(carried.max(initial=0), fresh.max(initial=0))) + 1
    joint = np.bincount(carried.ravel().astype(np.int64) * num + fresh.ravel(), minlength=num * num).reshape(num, num)
    inter = np.diag(joint).astype(np.float64)
    union = joint.sum(0) + joint.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


def class_map_of(segment_result: dict[str, Any]) -> np.ndarray:
    from blinkflow.stages.common import decode_class_map

    return decode_class_map(segment_result["mask"]["data"])


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


def _stage_classes(names: Any) -> list[tuple[str, type]]:
    """(name, registered stage class) of the names that are stages (results also hold e.g. the audit)."""
    from blinkflow.registry import stages as stage_registry

    return [(name, stage_registry.get(name)) for name in names if name in stage_registry]


# --------------------------------------------------------------------------- carry-over (driver)


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
    feedback (only then does the Ray runner wait for it, see :meth:`ready_for`).
    """

    motion: str = "off"
    lag: int = 8
    adaptive: bool = False
    stats: dict[str, StreamSkipStats] = field(default_factory=lambda: defaultdict(StreamSkipStats))
    _feedback: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def from_config(cls, gate_cfg: Any | None) -> "CarryOver":
        if gate_cfg is None or not getattr(gate_cfg, "enabled", False):
            return cls()
        return cls(motion=gate_cfg.motion, lag=gate_cfg.audit_lag, adaptive=gate_cfg.adaptive)

    def fill(self, frame: Any, keyframe_results: dict[str, Any]) -> None:
        """Give a reused frame its keyframe's results, moved along the frame's motion; a refresh frame gets
        those of the stages that did not run on it."""
        motion = self._motion_for(frame, keyframe_results)
        carried = compensate(keyframe_results, motion, frame.height, frame.width) if motion is not None else keyframe_results
        for stage, value in carried.items():
            if stage != AUDIT_KEY:
                frame.results.setdefault(stage, value)

    def observe(self, frame: Any, keyframe_results: dict[str, Any] | None) -> None:
        """Count a finished frame; for an audit, score the would-be carry-over against the fresh results."""
        gate = frame.results.get("gate")
        if not isinstance(gate, dict):
            return
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
        if audit_of is None or frame.is_failed or not keyframe_results:
            return
        predicted = compensate(keyframe_results, self._motion_for(frame, keyframe_results), frame.height, frame.width)
        scores = agreement(predicted, frame.results, frame.mark.refresh)
        if scores is None:
            return
        frame.results[AUDIT_KEY] = {"agreement": scores.pop("score"), **scores, "audit_of": int(audit_of)}
        scores["score"] = frame.results[AUDIT_KEY]["agreement"]
        stats.audits += 1
        stats.agreement_sum += scores["score"]
        stats.agreement_last = scores["score"]
        self._feedback[frame.stream_id].append((frame.index, scores["score"]))

    def _motion_for(self, frame: Any, keyframe_results: dict[str, Any]) -> np.ndarray | None:
        mark = frame.mark
        if self.motion in ("mvs", "auto") and mark.motion is not None:
            return np.asarray(mark.motion, dtype=np.float32)
        if self.motion in ("flow", "auto"):
            key = mark.reuse_of if mark.reuse_of is not None else mark.audit_of
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
        return not self.adaptive or next_index > frame.index - self.lag

    def attach_feedback(self, frames: list[Any]) -> None:
        """Hand each frame the agreement of its stream's audits at least ``lag`` frames older, once."""
        for frame in frames:
            queue = self._feedback.get(frame.stream_id)
            if not queue:
                continue
            due = [item for item in queue if item[0] <= frame.index - self.lag]
            if due:
                if frame.gate is None:
                    from blinkflow.frame import GateMark

                    frame.gate = GateMark()
                frame.gate.feedback = due
                self._feedback[frame.stream_id] = [item for item in queue if item[0] > frame.index - self.lag]

    def end_stream(self, stream_id: str) -> None:
        self._feedback.pop(stream_id, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {stream: stats.as_dict() for stream, stats in self.stats.items()}
