"""Pictures for the docs, drawn with Pillow (already a dependency, so no plotting library).

* :func:`plot_throughput`: frames/s of every measured variant against its bound,
  from the ``bench-*.json`` files the benchmarks save (``docs/img/throughput.png``).
* :func:`plot_skipping`: less model compute against agreement per real clip (``docs/img/skipping.png``,
  drawn by ``blinkflow bench skip``).
* :func:`draw_pipeline_diagram`: the data path, source to sinks (``docs/img/pipeline.png``).
* :func:`save_demo_frame`: one annotated frame of ``blinkflow demo``'s MP4 (``docs/img/demo-frame.png``).

``python -m pipeline.bench_plot`` redraws all three.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blinkflow.bench.common import REPO_ROOT, results_dir

log = logging.getLogger(__name__)

IMG_DIR = REPO_ROOT / "docs" / "img"
BAR, BOUND, TEXT, GRID, BACKGROUND = (66, 133, 244), (219, 68, 55), (32, 33, 36), (218, 220, 224), (255, 255, 255)


@dataclass
class Panel:
    """One chart: bars of frames/s (median with a min–max whisker) and the bound they are measured against."""

    title: str
    bars: list[tuple[str, float, float, float]]  # (label, min, median, max)
    bound: float | None = None
    bound_label: str = ""


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


# --------------------------------------------------------------------------- throughput


def load_panels(directory: Path) -> list[Panel]:
    """A panel per benchmark JSON that has frames/s: pipeline (bound: slowest stage) and decode (bound: ffmpeg CLI)."""
    panels: list[Panel] = []
    for path in sorted(directory.glob("bench-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        panels += _decode_panels(data) if "clips" in data else _fps_panels(path.stem[len("bench-"):], data)
    return panels


def _fps_panels(name: str, data: dict[str, Any]) -> list[Panel]:
    fps = data.get("fps")
    if not isinstance(fps, dict) or not fps:
        return []
    bars = [(label, *map(float, values)) for label, values in fps.items()]
    if isinstance(data.get("bound_fps"), (int, float)):
        bound, label = float(data["bound_fps"]), "bound (slowest stage or shared cores)"
    else:
        bound_name = data.get("bound")
        bound, label = (float(fps[bound_name][1]) if bound_name in fps else None), f"bound: {bound_name}"
    return [Panel(f"{name}: frames/s ({data.get('frames', '?')} frames)", bars, bound, label)]


def _decode_panels(data: dict[str, Any]) -> list[Panel]:
    panels = []
    for clip, variants in data["clips"].items():
        bars = [(label, *map(float, values)) for label, values in variants.items()
                if isinstance(values, (list, tuple)) and len(values) == 3 and values[1] > 0]
        cli = variants.get("ffmpeg CLI")
        bound = float(cli[1]) if isinstance(cli, (list, tuple)) and cli[1] > 0 else None
        if bars:
            panels.append(Panel(f"decode {clip}: frames/s", bars, bound, "bound: ffmpeg CLI"))
    return panels


def plot_throughput(directory: Path | None = None, out: Path | None = None) -> Path | None:
    """Draw every panel found in ``directory`` (default: the benchmarks' results) into one PNG."""
    directory = results_dir() if directory is None else Path(directory)
    out = IMG_DIR / "throughput.png" if out is None else Path(out)
    panels = load_panels(directory)
    if not panels:
        log.warning("no benchmark results with frames/s in %s; run `blinkflow bench pipeline` first", directory)
        return None
    image = render_panels(panels)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    print(f"throughput plot: {out}")
    return out


def render_panels(panels: list[Panel], width: int = 960):
    from PIL import Image, ImageDraw

    row, head, gap = 28, 40, 24
    height = sum(head + row * len(p.bars) + 30 + gap for p in panels) + gap
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = gap
    for panel in panels:
        top = _draw_panel(draw, panel, top, width, row, head) + gap
    return image


def _draw_panel(draw, panel: Panel, top: int, width: int, row: int, head: int) -> int:
    label_w, left_pad, right_pad = 300, 16, 90
    x0, x1 = left_pad + label_w, width - right_pad
    scale_max = max([b[3] for b in panel.bars] + [panel.bound or 0.0]) * 1.05 or 1.0
    draw.text((left_pad, top), panel.title, fill=TEXT, font=_font(18))
    y = top + head
    for label, low, mid, high in panel.bars:
        def x_of(value: float) -> float:
            return x0 + (x1 - x0) * value / scale_max

        draw.text((left_pad, y + 5), label[:40], fill=TEXT, font=_font(14))
        draw.rectangle([x0, y + 4, x_of(mid), y + row - 4], fill=BAR)
        draw.line([x_of(low), y + row // 2, x_of(high), y + row // 2], fill=TEXT, width=2)
        draw.text((x_of(max(high, mid)) + 6, y + 5), f"{mid:.1f}", fill=TEXT, font=_font(14))
        y += row
    draw.line([x0, top + head - 4, x0, y + 4], fill=GRID, width=1)
    if panel.bound:
        bx = x0 + (x1 - x0) * panel.bound / scale_max
        draw.line([bx, top + head - 6, bx, y + 6], fill=BOUND, width=3)
        draw.text((max(x0, bx - 200), y + 8), f"{panel.bound_label} ({panel.bound:.1f})", fill=BOUND, font=_font(13))
    return y + 30


# --------------------------------------------------------------------------- skipping


@dataclass
class SkipPoint:
    """One measured skipping figure: ``less`` model compute at ``agreement`` with gate off; ``kind`` is
    ``clip`` (gate on, one clip), ``pooled`` (the static clips together) or ``features`` (the segmenter's
    feature reuse); ``lenient``: the agreement when unmatched boxes below the detector's threshold count
    neither way (drawn as a ring when higher)."""

    label: str
    less: float
    agreement: float
    kind: str = "clip"
    lenient: float | None = None


SKIP_AXES = (1.0, 6.0, 0.6, 1.0)  # less compute from..to, agreement from..to
TARGET_FILL, POOLED, FEATURES = (214, 240, 220), (15, 157, 88), (244, 160, 0)


def plot_skipping(points: list[SkipPoint], target: tuple[float, float], out: Path | None = None,
                  size: tuple[int, int] = (900, 560)) -> Path:
    """Less model compute (x) against agreement with gate off (y), the target region shaded: where each
    measured clip stands (``docs/img/skipping.png``, drawn by ``blinkflow bench skip``)."""
    from PIL import Image, ImageDraw

    out = IMG_DIR / "skipping.png" if out is None else Path(out)
    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    to_px = _skip_axes(draw, size, target)
    markers = [to_px(p.less, p.agreement) for p in points]
    taken = [(x - 9, y - 9, x + 9, y + 9) for x, y in markers]  # boxes labels must avoid: the markers, then labels
    taken += [(x - 7, y - 7, x + 7, y + 7) for p in points if p.lenient is not None and p.lenient > p.agreement
              for x, y in [to_px(p.less, p.lenient)]]  # the rings
    taken.append((size[0] - 180, 40, size[0], 150))  # and the legend
    for point, (x, y) in zip(points, markers):
        if point.lenient is not None and point.lenient > point.agreement:
            _, y_lenient = to_px(point.less, point.lenient)
            draw.line([x, y, x, y_lenient], fill=GRID, width=2)
            draw.ellipse([x - 5, y_lenient - 5, x + 5, y_lenient + 5], outline=BAR, width=2)
        colour = {"pooled": POOLED, "features": FEATURES}.get(point.kind, BAR)
        if point.kind == "features":
            draw.rectangle([x - 6, y - 6, x + 6, y + 6], fill=colour)
        else:
            radius = 9 if point.kind == "pooled" else 7
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        _place_label(draw, point.label, x, y, taken)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    return out


def _place_label(draw, label: str, x: float, y: float, taken: list[tuple[float, float, float, float]]) -> None:
    """The label right of its marker, else below, above or left of it: wherever it overlaps no marker or label
    and stays inside the picture."""
    font = _font(13)
    x0, y0, x1, y1 = draw.textbbox((0, 0), label, font=font)
    w = x1 - x0
    width, height = draw.im.size
    near = [(11, -8), (11, 6), (11, -22), (11, 20), (-w - 11, -8), (-w / 2, 10), (-w / 2, -26)]
    farther = [(24, -8 + sign * 15 * k) for k in range(2, 12) for sign in (1, -1)]  # with a leader line
    for dx, dy in near + farther:
        box = (x + dx + x0, y + dy + y0 - 1, x + dx + x1, y + dy + y1 + 1)  # where the text lands when drawn at (dx, dy)
        inside = box[0] >= 2 and box[1] >= 2 and box[2] <= width - 2 and box[3] <= height - 2
        if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
            break
    taken.append(box)
    if (dx, dy) not in near:
        draw.line([x + 6, y, box[0] - 2, (box[1] + box[3]) / 2], fill=GRID, width=1)
    draw.text((x + dx, y + dy), label, fill=TEXT, font=font)


def _skip_axes(draw, size: tuple[int, int], target: tuple[float, float]):
    """Axes, grid and the shaded target region; returns the (less, agreement) -> pixel mapping."""
    width, height = size
    left, right, top, bottom = 80, width - 180, 50, height - 60
    x_lo, x_hi, y_lo, y_hi = SKIP_AXES

    def to_px(less: float, agreement: float) -> tuple[float, float]:
        x = left + (right - left) * (min(max(less, x_lo), x_hi) - x_lo) / (x_hi - x_lo)
        y = bottom - (bottom - top) * (min(max(agreement, y_lo), y_hi) - y_lo) / (y_hi - y_lo)
        return x, y

    tx, ty = to_px(*target)
    draw.rectangle([tx, top, right, ty], fill=TARGET_FILL)
    draw.text((tx + 6, top + 4), f"target: >= {target[0]:g}x at >= {target[1]:g}", fill=POOLED, font=_font(13))
    for tick in range(int(x_lo), int(x_hi) + 1):
        x, _ = to_px(tick, y_lo)
        draw.line([x, top, x, bottom], fill=GRID)
        draw.text((x - 8, bottom + 6), f"{tick}x", fill=TEXT, font=_font(13))
    for tick in (0.6, 0.7, 0.8, 0.9, 0.95, 1.0):
        _, y = to_px(x_lo, tick)
        draw.line([left, y, right, y], fill=GRID)
        draw.text((left - 44, y - 8), f"{tick:.2f}", fill=TEXT, font=_font(13))
    draw.text((left, 14), "Skipping on real footage: less model compute vs agreement with gate off", fill=TEXT,
              font=_font(17))
    draw.text(((left + right) // 2 - 90, bottom + 28), "less model compute (gate off / on)", fill=TEXT, font=_font(13))
    draw.text((right + 14, top), "circle: gate on, a clip", fill=BAR, font=_font(12))
    draw.text((right + 14, top + 18), "ring: ignoring boxes below", fill=BAR, font=_font(12))
    draw.text((right + 14, top + 32), "  the detector's threshold", fill=BAR, font=_font(12))
    draw.text((right + 14, top + 50), "green: static clips pooled", fill=POOLED, font=_font(12))
    draw.text((right + 14, top + 68), "square: segmenter feature", fill=FEATURES, font=_font(12))
    draw.text((right + 14, top + 82), "  reuse, adapted interval", fill=FEATURES, font=_font(12))
    draw.text((right + 14, top + 96), "  (its compute only)", fill=FEATURES, font=_font(12))
    return to_px


# --------------------------------------------------------------------------- pipeline diagram

#: (label, sublabel, column, row) of each node; rows are in units of half a box height around the centre line
_NODES = [
    ("source", "file, dir, rtsp,\nhttp, v4l2, synthetic", 0, 0), ("decode", "PyAV, threaded,\nresample, resize", 1, 0),
    ("gate", "skip unchanged\nframes (reuse)", 2, 0), ("detect", "boxes, per-frame\nbatched, N replicas", 3, -1),
    ("segment", "class map, per-frame\nbatched, N replicas", 3, 1), ("flow", "frame pairs,\nper stream", 4, 0),
    ("action", "clips,\nper stream", 5, 0), ("assemble", "one record per\nframe, in order", 6, 0),
    ("sinks", "jsonl, coco,\nmp4 overlay", 7, 0),
]
_EDGES = [("source", "decode"), ("decode", "gate"), ("gate", "detect"), ("gate", "segment"), ("detect", "flow"),
          ("segment", "flow"), ("flow", "action"), ("action", "assemble"), ("assemble", "sinks")]
_TEMPORAL = {"gate", "flow", "action"}
_PER_FRAME = {"detect", "segment"}


def draw_pipeline_diagram(out: Path | None = None) -> Path:
    """The data path as boxes and arrows: per-frame stages blue, per-stream (temporal) stages orange, I/O grey."""
    from PIL import Image, ImageDraw

    out = IMG_DIR / "pipeline.png" if out is None else Path(out)
    box_w, box_h, col_w, margin = 150, 74, 190, 24
    width, height = margin * 2 + col_w * 7 + box_w, 360
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    centre = height // 2 - 10
    boxes = {}
    for name, _sub, col, row in _NODES:
        x, y = margin + col * col_w, centre + row * (box_h // 2 + 30) - box_h // 2
        boxes[name] = (x, y, x + box_w, y + box_h)
    for a, b in _EDGES:
        _arrow(draw, boxes[a], boxes[b])
    for name, sub, _col, _row in _NODES:
        fill = (252, 232, 210) if name in _TEMPORAL else (210, 227, 252) if name in _PER_FRAME else (236, 237, 239)
        draw.rounded_rectangle(boxes[name], radius=10, fill=fill, outline=TEXT, width=2)
        x, y, x2, _ = boxes[name]
        draw.text(((x + x2) / 2, y + 16), name, fill=TEXT, font=_font(17), anchor="mm")
        draw.multiline_text(((x + x2) / 2, y + 48), sub, fill=TEXT, font=_font(12), anchor="mm", align="center")
    legend = ("blue: per-frame, batched across frames and streams    orange: per-stream state (sticky replica, in order)"
              "    grey: input and output")
    draw.text((margin, height - 34), legend, fill=TEXT, font=_font(14))
    draw.text((margin, 14), "Each box is a Ray actor (or an in-process step with runner: local); arrows are bounded queues.",
              fill=TEXT, font=_font(14))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True)
    return out


def _arrow(draw, a: tuple, b: tuple) -> None:
    start = (a[2], (a[1] + a[3]) / 2)
    end = (b[0], (b[1] + b[3]) / 2)
    draw.line([start, end], fill=TEXT, width=2)
    dx, dy = end[0] - start[0], end[1] - start[1]
    length = max((dx * dx + dy * dy) ** 0.5, 1e-6)
    ux, uy = dx / length, dy / length
    tip = [end, (end[0] - 12 * ux + 6 * uy, end[1] - 12 * uy - 6 * ux), (end[0] - 12 * ux - 6 * uy, end[1] - 12 * uy + 6 * ux)]
    draw.polygon(tip, fill=TEXT)


# --------------------------------------------------------------------------- demo frame


def save_demo_frame(video: Path = Path("out/demo.mp4"), out: Path | None = None, index: int | None = None) -> Path:
    """Save frame ``index`` (default: the middle one) of an annotated MP4 as a PNG."""
    import av

    from blinkflow.errors import BlinkflowError

    out = IMG_DIR / "demo-frame.png" if out is None else Path(out)
    if not Path(video).is_file():
        raise BlinkflowError(f"{video}: no such video; run `blinkflow demo` first (it writes out/demo.mp4)")
    with av.open(str(video)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    if not frames:
        raise BlinkflowError(f"{video}: the video has no frames")
    chosen = frames[len(frames) // 2 if index is None else min(index, len(frames) - 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen.save(out, format="PNG", optimize=True)
    return out


def main() -> None:  # pragma: no cover - a convenience for whoever regenerates the docs
    logging.basicConfig(level=logging.INFO)
    print(draw_pipeline_diagram())
    plot_throughput()
    demo = Path("out/demo.mp4")
    if demo.is_file():
        print(save_demo_frame(demo))
    else:
        log.warning("no %s: run `blinkflow demo` to get the annotated demo frame", demo)


if __name__ == "__main__":  # pragma: no cover
    main()
