"""``blinkflow bench pipeline``: the sequential local runner against the threaded and Ray runners (stages
overlapping) against the slowest stage alone (the bound), on the same frames and models; and the Ray
runner with metrics on (served and scraped every second) against off."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import statistics
import threading
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from blinkflow.bench.common import Measurement, display_path, fps_cell, machine_info, machine_line, markdown_table, publish
from blinkflow.config import Config, load_config

log = logging.getLogger(__name__)


def bench_config(config_path: Path, frames: int, overrides: list[str]) -> Config:
    """The config under test, with the gate off (every frame costs the same) and no sinks."""
    cfg = load_config(config_path, [f"sources.0.num_frames={frames}", "gate.enabled=false", *overrides])
    cfg.sinks = []
    return cfg


def only_stage(cfg: Config, name: str) -> Config:
    alone = copy.deepcopy(cfg)
    alone.stages = {name: alone.stages[name]}
    return alone


def run_frames(cfg: Config, runner: str, metrics: Any = None, busy: dict[str, list[float]] | None = None) -> tuple[int, float]:
    """(frames, processing seconds) of one run; ``busy`` collects each stage's compute time ÷ processing time."""
    from blinkflow.runners import get_runner

    summary = get_runner(runner)(cfg, metrics=metrics).run()
    if busy is not None:
        for stage, seconds in summary.stage_seconds.items():
            busy.setdefault(stage, []).append(seconds / summary.processing_s)
    return summary.totals["decoded"], summary.processing_s


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """One Ray instance for every Ray run, started before any is timed.

    A runner that starts Ray itself shares the cores with Ray's own start-up
    (raylet, GCS, prestarted workers importing) for its first seconds; the
    bench measures the steady state of a running cluster, as a long-lived
    deployment sees it, so the instance outlives the runs.
    """
    from blinkflow.graph import build_graph
    from blinkflow.ray_session import ray_session as shared_session
    from blinkflow.runners.ray import ray_cluster

    with shared_session(*ray_cluster(cfg, build_graph(cfg))):  # sized by the stage specs, as the runner does
        yield


@contextlib.contextmanager
def scraped_metrics(interval_s: float = 1.0) -> Iterator[Any]:
    """A served recorder that a thread scrapes every ``interval_s``, as a (busy) Prometheus would."""
    from blinkflow.metrics import MetricsExporter, PrometheusRecorder

    stop = threading.Event()
    with MetricsExporter(PrometheusRecorder(), "127.0.0.1", 0) as exporter:
        def scrape() -> None:
            while not stop.wait(interval_s):
                with urllib.request.urlopen(f"{exporter.url}/metrics", timeout=5) as reply:
                    reply.read()

        scraper = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
        scraper.start()
        try:
            yield exporter.recorder
        finally:
            stop.set()
            scraper.join(timeout=10)


def measure_metrics_overhead(cfg: Config, runner: str, repetitions: int) -> tuple[Measurement, Measurement]:
    """Metrics off and on, alternating run by run so that machine drift hits both alike."""
    off, on = Measurement(f"{runner} runner, metrics off"), Measurement(f"{runner} runner, metrics on")
    busy: dict[str, list[float]] = {}
    run_frames(cfg, runner)  # warm-up, untimed
    for _ in range(repetitions):
        off.frames, seconds = run_frames(cfg, runner, busy=busy)
        off.seconds.append(seconds)
        with scraped_metrics() as recorder:
            on.frames, seconds = run_frames(cfg, runner, recorder)
        on.seconds.append(seconds)
        # paired: each on-run against the off-run just before it, so slow drift of a shared machine cancels
        on.extra.setdefault("paired", []).append(seconds / off.seconds[-1] - 1.0)
    off.extra["busy"] = {stage: statistics.median(values) for stage, values in busy.items()}
    return off, on


def measure(name: str, cfg: Config, runner: str, repetitions: int) -> Measurement:
    """Repeat a run after an untimed warm-up; time the processing only (model loading and actor start-up excluded)."""
    measurement = Measurement(name)
    run_frames(cfg, runner)
    for _ in range(repetitions):
        frames, seconds = run_frames(cfg, runner)
        measurement.frames = frames
        measurement.seconds.append(seconds)
    return measurement


#: frames per run unless --frames says otherwise: enough for pipeline fill and drain to be a few percent
DEFAULT_FRAMES = 96


def bench_pipeline(config_path: Path, frames: int = DEFAULT_FRAMES, repetitions: int = 3, overrides: list[str] | None = None,
                   write: bool = True) -> dict[str, Any]:
    cfg = bench_config(config_path, frames, overrides or [])
    sequential = measure("sequential (local runner)", cfg, "local", repetitions)
    threaded = measure("threaded runner (a thread per stage)", cfg, "threaded", repetitions)
    with ray_session(cfg):
        ray_run, ray_metrics = measure_metrics_overhead(cfg, "ray", repetitions)
    ray_run.name, ray_metrics.name = "Ray runner", "Ray runner + metrics"
    alone = {name: measure_alone(cfg, name, repetitions) for name in cfg.enabled_stages()}
    slowest = min(alone.values(), key=lambda m: m.median_fps)
    cores = os.cpu_count() or 1
    # All stages share this machine's cores: no schedule beats cores / (CPU seconds per frame of all stages).
    shared_fps = cores / sum(1.0 / m.median_fps for m in alone.values())
    bound_fps = min(slowest.median_fps, shared_fps)
    result = {
        "machine": machine_info(),
        "config": display_path(config_path),
        "frames": frames,
        "repetitions": repetitions,
        "fps": {m.name: m.fps_range() for m in [sequential, threaded, ray_run, ray_metrics, *alone.values()]},
        "ray_over_sequential": ray_run.median_fps / sequential.median_fps,
        "threaded_over_sequential": threaded.median_fps / sequential.median_fps,
        "threaded_over_bound": threaded.median_fps / bound_fps,
        "slowest_stage": slowest.name,
        "slowest_stage_fps": slowest.median_fps,
        "shared_cores_fps": shared_fps,
        "bound_fps": bound_fps,
        "ray_over_bound": ray_run.median_fps / bound_fps,
        "ray_over_slowest_stage": ray_run.median_fps / slowest.median_fps,
        "metrics_overhead": statistics.median(ray_metrics.extra["paired"]),
        "metrics_overhead_range": [min(ray_metrics.extra["paired"]), max(ray_metrics.extra["paired"])],
        "ray_busy": ray_run.extra["busy"],
    }
    body = render(result, [sequential, threaded, ray_run, ray_metrics, *alone.values()], slowest)
    publish("pipeline", body, result, write=write)
    return result


def measure_alone(cfg: Config, name: str, repetitions: int) -> Measurement:
    """One stage alone, with as many torch threads as its Ray actor gets (its ``resources.num_cpus``)."""
    import torch

    threads = max(1, int(cfg.stages[name].resources.num_cpus))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure(f"{name} alone ({threads} thread{'s' if threads > 1 else ''}, as its actor)",
                       only_stage(cfg, name), "local", repetitions)
    finally:
        torch.set_num_threads(before)


def render(result: dict[str, Any], measurements: list[Measurement], slowest: Measurement) -> str:
    rows = [[m.name + (" ← bound" if m is slowest else ""), fps_cell(m)] for m in measurements]
    return "\n".join([
        "## Pipeline: sequential vs threaded vs Ray vs the slowest stage",
        "",
        f"`blinkflow bench pipeline` — {result['frames']} frames of `{result['config']}` (gate off, no sinks), "
        f"{result['repetitions']} repetitions after an untimed warm-up run of each variant; frames/s as median "
        "(min–max), model loading and actor start-up excluded. One Ray instance serves every Ray run (started "
        "before them: the steady state of a running cluster, not Ray's own start-up).",
        "",
        machine_line(result["machine"]),
        "",
        markdown_table(["variant", "frames/s"], rows),
        "",
        f"Bound = min(slowest stage alone = {result['slowest_stage_fps']:.2f} frames/s, "
        f"{result['machine']['cores']} cores ÷ the CPU seconds per frame of all stages = "
        f"{result['shared_cores_fps']:.2f} frames/s) = **{result['bound_fps']:.2f} frames/s**: each stage is timed "
        "alone with the threads its actor gets, and on a machine with fewer cores than stages they also share the cores.",
        "",
        f"**Ray ÷ sequential = {result['ray_over_sequential']:.2f}×; Ray ÷ bound = {result['ray_over_bound']:.2f}** "
        f"(target ≥ 0.85 of the bound; Ray ÷ slowest stage alone = {result['ray_over_slowest_stage']:.2f}). "
        "Stage actors busy (compute ÷ run time, median): "
        + ", ".join(f"{stage} {share:.0%}" for stage, share in result["ray_busy"].items()) + ".",
        "",
        f"**Threaded ÷ sequential = {result['threaded_over_sequential']:.2f}×; threaded ÷ bound = "
        f"{result['threaded_over_bound']:.2f}**: the same overlap in one process, without copies between processes; "
        "its stage threads share torch's thread pool (each stage alone above gets one thread, as its actor).",
        "",
        f"**Metrics overhead = {100 * result['metrics_overhead']:+.1f}%** run time with metrics on "
        "(exporter served, scraped every 1 s), the median over the repetitions of each metrics-on run against the "
        f"metrics-off run just before it (range {100 * result['metrics_overhead_range'][0]:+.1f}% to "
        f"{100 * result['metrics_overhead_range'][1]:+.1f}%); target < 2%.",
    ])
