"""Letterboxed object crops: where a fixed-input detector (YOLOX) looks on a *partial* frame.

A detector that letterboxes every input to one size sees a crop at the wrong scale, so instead
of running on a crop, the detect stage (``crop_reuse: letterbox``) cuts the changed regions out of
the frame *as a full-frame call would scale it* and packs them into one small canvas padded like
the letterbox. This module is the geometry, in plain ints (no torch):

* :func:`object_regions`: the changed tiles' connected groups, each grown around the stream's
  previous boxes that touch it (an object half inside the change is looked at whole);
* :func:`plan_canvas`: each region grown by the halo and cut on the model input's stride-32 grid
  (so the detector's anchor grid lies on the pixels exactly as in a full-frame call), regions whose
  cuts overlap merged when that costs no more, then packed into one canvas whose sides are
  multiples of 32; None when the canvas would cost more than the allowed share of a full input.

Rectangles are ``(x1, y1, x2, y2)``, end-exclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from blinkflow.gate.tiles import tile_edges

#: the detector's coarsest stride: cuts and canvas sides are multiples of it
STRIDE = 32

Rect = tuple[int, int, int, int]


@dataclass(frozen=True)
class Region:
    """One cut of the canvas: ``inners`` (frame pixels) are where the stream's boxes are replaced,
    ``crop`` (frame pixels, clamped to the frame) is what the detector sees of the frame, ``cut`` is
    the same in model-input pixels (on the stride grid) and ``place`` its top-left (x, y) in the canvas."""

    inners: tuple[Rect, ...]
    crop: tuple[float, float, float, float]
    cut: Rect
    place: tuple[int, int]


@dataclass(frozen=True)
class Canvas:
    """The detector's input for a partial frame: ``size`` (height, width) and its regions."""

    size: tuple[int, int]
    regions: tuple[Region, ...]

    @property
    def area(self) -> int:
        return self.size[0] * self.size[1]


def tile_groups(grid: list[int], changed: list[int]) -> list[list[int]]:
    """The changed tiles in 8-connected groups (row-major indices), in order of their first tile."""
    cols = grid[1]
    todo, groups = set(changed), []
    for start in sorted(changed):
        if start not in todo:
            continue
        todo.discard(start)
        group, stack = [], [start]
        while stack:
            tile = stack.pop()
            group.append(tile)
            r, c = divmod(tile, cols)
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    near = (r + dr) * cols + (c + dc)
                    if 0 <= c + dc < cols and near in todo:
                        todo.discard(near)
                        stack.append(near)
        groups.append(sorted(group))
    return groups


def object_regions(grid: list[int], changed: list[int], height: int, width: int,
                   boxes: list[list[float]] | None = None) -> list[Rect]:
    """Frame-pixel rectangles of the changed regions: each group of touching tiles' bounding box,
    grown to hold every one of ``boxes`` (the stream's previous detections) that overlaps or borders one
    of its tiles, so a car whose back half changed is looked at, and replaced, whole (and one that grew
    from a box ending at the tile's edge); rectangles that then
    overlap merge. A box only touching a grown rectangle does not grow it further (no chain from
    box to overlapping box across the frame)."""
    rows, cols = grid
    ys, xs = tile_edges(rows, height), tile_edges(cols, width)
    objects = [_clamped(_outward(box), width, height) for box in boxes or []]
    rects = []
    for group in tile_groups(grid, changed):
        tiles = [(xs[t % cols], ys[t // cols], xs[t % cols + 1], ys[t // cols + 1]) for t in group]
        rect = tiles[0]
        for part in [*tiles[1:], *(box for box in objects if any(_touch(box, tile) for tile in tiles))]:
            rect = _union(rect, part)
        rects.append(rect)
    return _merge_overlapping(rects)


def plan_canvas(inners: list[Rect], frame_size: tuple[int, int], scale: tuple[float, float],
                content: tuple[int, int], halo: tuple[float, float], max_cost: float) -> Canvas | None:
    """The canvas for the changed regions ``inners`` (frame pixels), or None when it costs more than
    ``max_cost`` pixels of model input (the caller runs the full frame).

    ``scale`` (x, y) takes frame pixels to model-input pixels as a full-frame call does, ``content``
    (height, width) is the frame's extent in the full model input (the letterbox pads beyond it),
    ``halo`` (x, y) the margin in frame pixels around each region.
    """
    height, width = frame_size
    bound = (min(_up(content[1]), _up(width * scale[0])), min(_up(content[0]), _up(height * scale[1])))
    parts = []
    for inner in inners:
        grown = (inner[0] - halo[0], inner[1] - halo[1], inner[2] + halo[0], inner[3] + halo[1])
        cut = (_down(max(0.0, grown[0] * scale[0])), _down(max(0.0, grown[1] * scale[1])),
               min(bound[0], _up(grown[2] * scale[0])), min(bound[1], _up(grown[3] * scale[1])))
        parts.append(((inner,), cut))
    parts = _merge_cuts(parts)
    sizes = [(cut[2] - cut[0], cut[3] - cut[1]) for _, cut in parts]
    packed = pack(sizes)
    if packed is None or packed[0][0] * packed[0][1] > max_cost:
        return None
    size, places = packed
    regions = tuple(
        Region(part_inners, _frame_crop(cut, scale, bound, width, height), cut, place)
        for (part_inners, cut), place in zip(parts, places)
    )
    return Canvas(size, regions)


def pack(sizes: list[tuple[int, int]]) -> tuple[tuple[int, int], list[tuple[int, int]]] | None:
    """The smallest canvas (height, width) holding rectangles of ``sizes`` (width, height), shelf by
    shelf, tallest first, and each one's top-left (x, y); the squarer canvas on a tie."""
    if not sizes:
        return None
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i][1], -sizes[i][0]))
    widest, total = max(w for w, _ in sizes), sum(w for w, _ in sizes)
    best = None
    for limit in range(widest, total + 1, STRIDE):
        places, x, y, shelf, used = {}, 0, 0, 0, 0
        for i in order:
            w, h = sizes[i]
            if x and x + w > limit:
                x, y, shelf = 0, y + shelf, 0
            places[i] = (x, y)
            x, shelf, used = x + w, max(shelf, h), max(used, x + w)
        size = (y + shelf, used)
        key = (size[0] * size[1], max(size))
        if best is None or key < best[0]:
            best = (key, size, [places[i] for i in range(len(sizes))])
    return best[1], best[2]


# --------------------------------------------------------------------------- helpers


def _merge_cuts(parts: list[tuple[tuple[Rect, ...], Rect]]) -> list[tuple[tuple[Rect, ...], Rect]]:
    """Regions whose cuts overlap become one when their joint cut costs no more than the two apart
    (the detector would otherwise look at the shared pixels twice)."""
    merged = True
    while merged:
        merged = False
        for i in range(len(parts)):
            for j in range(i + 1, len(parts)):
                a, b = parts[i][1], parts[j][1]
                union = _union(a, b)
                if _overlap(a, b) and _area(union) <= _area(a) + _area(b):
                    parts[i] = (parts[i][0] + parts[j][0], union)
                    del parts[j]
                    merged = True
                    break
            if merged:
                break
    return parts


def _frame_crop(cut: Rect, scale: tuple[float, float], bound: tuple[int, int], width: int, height: int
                ) -> tuple[float, float, float, float]:
    """A cut in frame pixels; a side at the edge of the frame's content is the frame's edge."""
    x2 = width if cut[2] >= bound[0] else min(width, cut[2] / scale[0])
    y2 = height if cut[3] >= bound[1] else min(height, cut[3] / scale[1])
    return cut[0] / scale[0], cut[1] / scale[1], x2, y2


def _merge_overlapping(rects: list[Rect]) -> list[Rect]:
    out: list[Rect] = []
    for rect in rects:
        while True:
            hit = next((i for i, other in enumerate(out) if _overlap(rect, other)), None)
            if hit is None:
                break
            rect = _union(rect, out.pop(hit))
        out.append(rect)
    return out


def _up(value: float) -> int:
    return int(math.ceil(value / STRIDE - 1e-9)) * STRIDE


def _down(value: float) -> int:
    return int(math.floor(value / STRIDE + 1e-9)) * STRIDE


def _outward(box: list[float]) -> Rect:
    return int(math.floor(box[0])), int(math.floor(box[1])), int(math.ceil(box[2])), int(math.ceil(box[3]))


def _clamped(rect: Rect, width: int, height: int) -> Rect:
    return max(0, rect[0]), max(0, rect[1]), min(width, rect[2]), min(height, rect[3])


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _touch(a: Rect, b: Rect) -> bool:
    """Overlapping or sharing an edge."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _contains(a: Rect, b: Rect) -> bool:
    return a[0] <= b[0] and a[1] <= b[1] and a[2] >= b[2] and a[3] >= b[3]


def _union(a: Rect, b: Rect) -> Rect:
    return min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])


def _area(rect: Rect) -> int:
    return (rect[2] - rect[0]) * (rect[3] - rect[1])
