"""``blinkflow bench decode``: PyAV decoding speed against the ffmpeg CLI.

For each clip, side by side: the ffmpeg CLI decoding to ``-f null`` (the
software limit), PyAV decoding alone, and Blinkflow's source (PyAV decode plus
the conversion to RGB arrays the stages need). The headline ratio is PyAV
decode ÷ ffmpeg CLI (target ≥ 0.9).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from blinkflow.files import atomic_path
from blinkflow.bench.common import (
    Measurement, fps_cell, machine_info, machine_line, markdown_table, publish, results_dir,
)

log = logging.getLogger(__name__)

_RTIME = re.compile(r"rtime=([0-9.]+)s")

SHARED_VIDEO = Path(__file__).resolve().parents[2] / "tests" / "data" / "video"


def make_h264_clip(path: Path, width: int = 1280, height: int = 720, frames: int = 120, fps: int = 30) -> Path:
    """A moving synthetic 720p H.264 clip, encoded once and cached."""
    import av

    from blinkflow.models.training.scenes import SceneGenerator

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = SceneGenerator(seed=3, width=width, height=height, num_objects=4)
    with atomic_path(path) as temp, av.open(str(temp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for t in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(generator.render_image(t), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
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


def ffmpeg_decode(path: Path) -> float | None:
    """Seconds the ffmpeg CLI takes to decode ``path`` to the null muxer; None when it is missing or fails.

    The time is ffmpeg's own ``-benchmark`` real time, which leaves out process start-up and library
    loading (a fixed cost of up to a second on a busy machine that would swamp short clips); the wall
    time of the process is the fallback when ffmpeg prints no benchmark line.
    """
    if shutil.which("ffmpeg") is None:
        return None
    command = ["ffmpeg", "-v", "error", "-benchmark", "-nostdin", "-threads", "0", "-i", str(path), "-f", "null", "-"]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("bench decode: the ffmpeg CLI failed on %s: %s", path, exc)
        return None
    wall = time.perf_counter() - started
    match = _RTIME.search(done.stdout + done.stderr)
    return float(match.group(1)) if match and float(match.group(1)) > 0 else wall


def source_decode(path: Path, motion_vectors: bool, fields: bool = False) -> float:
    """Seconds the file source takes to deliver every frame as RGB (the pipeline's own decode path), with or
    without the decoder's motion vectors (FFmpeg's ``export_mvs``, the vectors copied out and packed). With
    ``fields``, each frame's vectors are also turned into its motion field the way the gate does
    (:func:`blinkflow.gate.motion.attach_decoder_motion`; the gate runs it, not the decoder thread)."""
    from blinkflow.config import SourceConfig
    from blinkflow.gate.motion import attach_decoder_motion
    from blinkflow.sources import iter_video_frames

    cfg = SourceConfig(type="file", path=str(path), motion_vectors=motion_vectors)
    decoders: dict[str, Any] = {}
    started = time.perf_counter()
    for frame in iter_video_frames(path, "bench", cfg):
        if fields:
            attach_decoder_motion(frame, decoders)
    return time.perf_counter() - started


def _timed_pyav(path: Path, to_rgb: bool) -> float:
    started = time.perf_counter()
    pyav_decode(path, to_rgb)
    return time.perf_counter() - started


def ffmpeg_note() -> str:
    """Why the ffmpeg column may be empty: the CLI is an optional tool, not a Python dependency."""
    if shutil.which("ffmpeg") is None:
        return ("The `ffmpeg` CLI is not installed here, so there is no software limit to compare against "
                "(install it, e.g. `apt-get install ffmpeg`, and rerun).")
    return ""


def measure_clip(path: Path, repetitions: int) -> dict[str, Measurement]:
    frames = pyav_decode(path, to_rgb=False)
    variants = {
        "ffmpeg CLI": lambda: ffmpeg_decode(path),
        "PyAV decode": lambda: _timed_pyav(path, to_rgb=False),
        "PyAV decode + RGB": lambda: _timed_pyav(path, to_rgb=True),
        "source": lambda: source_decode(path, motion_vectors=False),
        "source + motion vectors": lambda: source_decode(path, motion_vectors=True),
        "source + motion vectors + fields": lambda: source_decode(path, motion_vectors=True, fields=True),
    }
    out = {name: Measurement(name, frames=frames) for name in variants}
    unavailable: set[str] = set()
    for _ in range(repetitions):  # variants interleaved, so that a shared machine's load falls on all alike
        for name, fn in variants.items():
            seconds = None if name in unavailable else fn()
            if seconds is None:  # unavailable here; the table says n/a
                unavailable.add(name)
                continue
            out[name].seconds.append(seconds)
    return out


def bench_decode(quick: bool = False, repetitions: int = 3, cache_dir: Path | None = None, write: bool = True) -> dict[str, Any]:
    cache_dir = results_dir() if cache_dir is None else cache_dir
    clips = sorted(SHARED_VIDEO.glob("*")) if SHARED_VIDEO.is_dir() else []
    size = (320, 180, 30) if quick else (1280, 720, 120)
    generated = make_h264_clip(cache_dir / f"generated-{size[1]}p.mp4", width=size[0], height=size[1], frames=size[2])
    if quick:  # the smallest real clip keeps CI fast
        clips = sorted(clips, key=lambda clip: clip.stat().st_size)[:1]
    clips = clips + [generated]
    reps = 1 if quick else repetitions
    results = {clip.name: measure_clip(clip, reps) for clip in clips}
    payload = {"machine": machine_info(), "repetitions": reps, "clips": {}, "ffmpeg": shutil.which("ffmpeg")}
    rows = []
    for name, variants in results.items():
        ratio = _ratio(variants["PyAV decode"], variants["ffmpeg CLI"])
        mvs = _ratio(variants["source + motion vectors"], variants["source"])
        fields = _ratio(variants["source + motion vectors + fields"], variants["source"])
        payload["clips"][name] = {k: m.fps_range() for k, m in variants.items()} | {
            "pyav_over_ffmpeg": ratio, "mvs_over_plain": mvs, "mvs_fields_over_plain": fields}
        rows.append([name, variants["PyAV decode"].frames, *(fps_cell(m) if m.seconds else "n/a" for m in variants.values()),
                     f"{ratio:.2f}" if ratio else "n/a", f"{mvs:.2f}" if mvs else "n/a"])
    body = render(payload, rows, quick)
    publish("decode", body, payload, write=write and not quick)
    return payload


def _ratio(a: Measurement, b: Measurement) -> float | None:
    return a.median_fps / b.median_fps if a.seconds and b.seconds else None


def render(payload: dict[str, Any], rows: list[list[Any]], quick: bool) -> str:
    headers = ["clip", "frames", "ffmpeg CLI fps", "PyAV decode fps", "PyAV + RGB fps", "source fps",
               "source + motion vectors fps", "… + fields fps", "PyAV ÷ ffmpeg", "motion vectors ÷ plain"]
    return "\n".join([
        "## Decode: PyAV against the ffmpeg CLI",
        "",
        f"`blinkflow bench decode{' --quick' if quick else ''}` — each clip decoded whole, {payload['repetitions']} "
        "repetitions, frames/s as median (min–max). The ffmpeg CLI (`-f null`, timed by its own `-benchmark`, "
        "so process start-up is left out) is the software limit; target ≥ 0.9×. Its time still includes setting up "
        "its decode pipeline once per run, which dominates clips of a few dozen frames: read the ratio on the long clips. "
        "\"source\" is the pipeline's file source delivering RGB frames, without and with the decoder's motion vectors "
        "(what the gate's motion compensation and the segmenter's feature reuse read), decoding a few frames ahead "
        "of the RGB conversion in a thread of its own; target for the motion "
        "vectors: ≥ 0.9× of plain. The decoder thread only copies the vectors out; \"+ fields\" adds, in the same "
        "thread, turning them into motion fields, which the gate does in the pipeline (its cost moved, not gone). "
        "Variants are interleaved repetition by repetition.",
        "",
        machine_line(payload["machine"]),
        "",
        markdown_table(headers, rows),
        *(["", note] if (note := ffmpeg_note()) else []),
    ])
