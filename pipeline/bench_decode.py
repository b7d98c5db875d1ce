"""``blinkflow bench decode``: PyAV decoding speed against the ffmpeg CLI.

For each clip, side by side: the ffmpeg CLI decoding to ``-f null`` (the
software limit), PyAV decoding alone, and Blinkflow's source (PyAV decode plus
the conversion to RGB arrays the stages need). The headline ratio is PyAV
decode ÷ ffmpeg CLI (target ≥ 0.9).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pipeline.bench import Measurement, fps_cell, machine_info, machine_line, markdown_table, write_section

SHARED_VIDEO = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "video"


def make_h264_clip(path: Path, width: int = 1280, height: int = 720, frames: int = 120, fps: int = 30) -> Path:
    """A moving synthetic 720p H.264 clip, encoded once and cached."""
    import av

    from models.training.scenes import SceneGenerator

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(seed=3, width=width, height=height, num_objects=4)
    temp = path.with_name(f".{path.name}.partial.mp4")
    with av.open(str(temp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for t in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(generator.render_image(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    temp.replace(path)
    return path


def pyav_decode(path: Path, to_rgb: bool) -> int:
    import av

    count = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if to_rgb:
                frame.to_ndarray(format="rgb24")
            count += 1
    return count


def ffmpeg_decode(path: Path) -> int | None:
    """Decode with the ffmpeg CLI to the null muxer; None when ffmpeg is not installed."""
    if shutil.which("ffmpeg") is None:
        return None
    subprocess.run(["ffmpeg", "-v", "error", "-nostdin", "-threads", "0", "-i", str(path), "-f", "null", "-"],
                   check=True, capture_output=True, timeout=600)
    return -1


def measure_clip(path: Path, repetitions: int) -> dict[str, Measurement]:
    frames = pyav_decode(path, to_rgb=False)
    variants = {
        "ffmpeg CLI": lambda: ffmpeg_decode(path),
        "PyAV decode": lambda: pyav_decode(path, to_rgb=False),
        "PyAV decode + RGB": lambda: pyav_decode(path, to_rgb=True),
    }
    out = {}
    for name, fn in variants.items():
        measurement = Measurement(name, frames=frames)
        for _ in range(repetitions):
            started = time.perf_counter()
            if fn() is None:
                break
            measurement.seconds.append(time.perf_counter() - started)
        out[name] = measurement
    return out


def bench_decode(quick: bool = False, repetitions: int = 3, cache_dir: Path = Path("out/bench"), write: bool = True) -> dict[str, Any]:
    clips = sorted(SHARED_VIDEO.glob("*")) if SHARED_VIDEO.is_dir() else []
    size = (320, 180, 30) if quick else (1280, 720, 120)
    generated = make_h264_clip(cache_dir / f"generated-{size[1]}p.mp4", width=size[0], height=size[1], frames=size[2])
    clips = (clips[:1] if quick else clips) + [generated]
    reps = 1 if quick else repetitions
    results = {clip.name: measure_clip(clip, reps) for clip in clips}
    payload = {"machine": machine_info(), "repetitions": reps, "clips": {}}
    rows = []
    for name, variants in results.items():
        ratio = _ratio(variants["PyAV decode"], variants["ffmpeg CLI"])
        payload["clips"][name] = {k: m.fps_range() for k, m in variants.items()} | {"pyav_over_ffmpeg": ratio}
        rows.append([name, variants["PyAV decode"].frames, *(fps_cell(m) if m.seconds else "n/a" for m in variants.values()),
                     f"{ratio:.2f}" if ratio else "n/a"])
    body = render(payload, rows, quick)
    print(body)
    if write and not quick:
        write_section("decode", body)
    return payload


def _ratio(a: Measurement, b: Measurement) -> float | None:
    return a.median_fps / b.median_fps if a.seconds and b.seconds else None


def render(payload: dict[str, Any], rows: list[list[Any]], quick: bool) -> str:
    headers = ["clip", "frames", "ffmpeg CLI fps", "PyAV decode fps", "PyAV + RGB fps", "PyAV ÷ ffmpeg"]
    return "\n".join([
        "## Decode: PyAV against the ffmpeg CLI",
        "",
        f"`blinkflow bench decode{' --quick' if quick else ''}` — each clip decoded whole, {payload['repetitions']} "
        "repetitions, frames/s as median (min–max). The ffmpeg CLI (`-f null`) is the software limit; target ≥ 0.9×.",
        "",
        machine_line(payload["machine"]),
        "",
        markdown_table(headers, rows),
    ])
