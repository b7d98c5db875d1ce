"""Tiles: the grid on which the gate tells the model stages what to recompute (a partial frame, a
refresh), and on which it patches its reference where they did."""

from __future__ import annotations

import numpy as np


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
    counts, areas = tile_counts(mask, grid)
    return (counts > 0) & (counts >= min_fraction * areas)


def tile_fractions(mask: np.ndarray, grid: tuple[int, int] | list[int]) -> np.ndarray:
    """The share of each tile's pixels set in ``mask``, as a (rows, cols) float array."""
    counts, areas = tile_counts(mask, grid)
    return counts / np.maximum(areas, 1)


def tile_counts(mask: np.ndarray, grid: tuple[int, int] | list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The set pixels of each tile and each tile's pixels, (rows, cols) each."""
    h, w = mask.shape
    rows, cols = grid
    ys, xs = np.array(tile_edges(rows, h)), np.array(tile_edges(cols, w))
    # set pixels per tile in one pass: cumulative sums sampled at the tile edges
    table = np.pad(mask.cumsum(0, dtype=np.int64).cumsum(1), ((1, 0), (1, 0)))
    corners = table[np.ix_(ys, xs)]
    counts = corners[1:, 1:] - corners[:-1, 1:] - corners[1:, :-1] + corners[:-1, :-1]
    return counts, np.diff(ys)[:, None] * np.diff(xs)[None, :]


def tile_indices(hit: np.ndarray, margin: int = 0) -> list[int]:
    """Row-major indices of the True tiles of a (rows, cols) grid, grown by ``margin`` tiles each way."""
    rows, cols = hit.shape
    if margin > 0:
        grown = hit.copy()
        # a shift past the grid reaches nothing (its slices would wrap: margin 9 on 8x8 tiles failed every frame)
        reach_y, reach_x = min(margin, rows - 1), min(margin, cols - 1)
        for dy in range(-reach_y, reach_y + 1):
            for dx in range(-reach_x, reach_x + 1):
                shifted = np.zeros_like(hit)
                shifted[max(0, dy) : rows + min(0, dy), max(0, dx) : cols + min(0, dx)] = \
                    hit[max(0, -dy) : rows + min(0, -dy), max(0, -dx) : cols + min(0, -dx)]
                grown |= shifted
        hit = grown
    return [int(i) for i in np.flatnonzero(hit.ravel())]


def tiles_of_touched_regions(label_map: np.ndarray, grid: tuple[int, int] | list[int], tiles: list[int],
                             background: int = 0) -> list[int]:
    """``tiles`` plus every tile of each region of ``label_map`` (8-connected pixels of one value other than
    ``background``) that has a pixel in them, row-major."""
    from scipy import ndimage  # lazy: only region-level reuse needs it

    height, width = label_map.shape
    rects = tile_rects(grid, height, width)
    inside = np.zeros((height, width), bool)
    for y0, y1, x0, x1 in (rects[i] for i in tiles):
        inside[y0:y1, x0:x1] = True
    touched = np.zeros((height, width), bool)
    for value in np.unique(label_map[inside]):
        if value == background:
            continue
        regions, _ = ndimage.label(label_map == value, structure=EIGHT_CONNECTED)
        hit = np.unique(regions[inside & (regions > 0)])
        touched |= np.isin(regions, hit)
    grown = changed_tile_grid(touched, grid)
    grown.flat[list(tiles)] = True
    return tile_indices(grown)


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


def patch_tiles(reference: np.ndarray, signal: np.ndarray, tiles: list[int] | None, grid: list[int]) -> np.ndarray:
    """``reference`` with ``tiles`` taken from ``signal`` (in place); all of ``signal`` when ``tiles`` is None."""
    if tiles is None:
        return signal
    rects = tile_rects(grid, *signal.shape)
    for index in tiles:
        y0, y1, x0, x1 = rects[index]
        reference[y0:y1, x0:x1] = signal[y0:y1, x0:x1]
    return reference


#: 8-connectivity for scipy's label: regions of a class map touch at corners too
EIGHT_CONNECTED = np.ones((3, 3), bool)
