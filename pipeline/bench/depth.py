"""``blinkflow bench depth``: the monolithic model against K depth-parallel
Ray actors (Massively Parallel Video Networks), side by side in one process.

Two workloads, on the same inputs for every variant:

* **stream**: the streaming causal network (``causal3d_small``) frame by frame.
  The monolithic baseline calls ``model.step`` in this process; the
  depth-parallel variants run :meth:`pipeline.depth_parallel.DepthPipeline.stream`
  with the ``sequential`` (exact, waits for each frame), ``pipelined`` (lag
  K-1) and multi-rate schedules.
* **clips**: a torchvision video ResNet (``mc3_18``) on a stream of clips,
  one clip per call; the depth-parallel variant chains K actors. ``mc3_18``
  because on CPU its stem and layer1 cost about half of the whole, so two
  stages can balance; ``r2plus1d_18``'s two layer1 blocks alone take about
  two thirds (measured), which caps its K = 2 speed-up near 1.6×.
* **training**: Sideways (:mod:`models.training.sideways`) against ordinary
  backprop on the synthetic action clips: loss, held-out accuracy, time per step.

Each row reports throughput (and the ratio to monolithic), per-frame latency,
lag in frames, each stage actor's busy fraction and the split's measured stage
costs. ``--quick`` (:data:`QUICK`) shrinks everything to run in well under a
minute of compute, for CI, and leaves the docs alone.

Reaching the MPVN speed-up (about K× at best): the work per stage call must
dwarf Ray's per-call cost (about a millisecond on CPU), so the clip workload
uses full-size clips; splits fall on residual-block (and causal half-block)
boundaries so two stages can balance; and the cores must be idle. On a shared
machine the ratios fall and say little.

Fairness: on CPU every variant uses one torch thread per stage (the
monolithic model runs on one thread too), so K = 2 uses two cores where the
monolithic model uses one; the ratio is the point of the exercise. The
depth-parallel outputs are checked against the monolithic ones (max abs
difference). K = 4 runs only where there is a GPU; each actor then gets a GPU
(a share of one if there are fewer than K).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blinkflow.bench.common import machine_info, machine_line, markdown_table, write_section

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """Repeated runs of one way of executing the workload."""

    name: str
    stages: int
    schedule: str
    fps: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)  # per frame/clip, pooled over repetitions
    lag: str = "0"
    busy: list[float] = field(default_factory=list)  # per stage, fraction of wall time (last repetition)
    stage_ms: list[float] = field(default_factory=list)  # measured cost per stage (the split's balance)
    max_diff: float | None = None

    def row(self, baseline_fps: float) -> list[str]:
        fps = statistics.median(self.fps)
        busy = ", ".join(f"{b:.0%}" for b in self.busy) or "–"
        stage_ms = ", ".join(f"{c:.1f}" for c in self.stage_ms) or "–"
        if self.stage_ms:  # the most the split's balance allows: total cost over the slowest stage's
            stage_ms += f" (≤{sum(self.stage_ms) / max(self.stage_ms):.2f}×)"
        diff = "–" if self.max_diff is None else f"{self.max_diff:.1e}"
        return [self.name, str(self.stages), self.schedule, f"{fps:.2f} ({min(self.fps):.2f}–{max(self.fps):.2f})",
                f"**{fps / baseline_fps:.2f}×**", f"{_median(self.latency_ms):.1f}", self.lag, busy, stage_ms, diff]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --------------------------------------------------------------------------- stream workload


def _stream_model(size: int, streams: int = 1) -> tuple[Any, list[Any]]:
    """The causal net and a pool of ticks, each one frame of each of ``streams`` streams, batched."""
    import torch

    from blinkflow.models.registry import build_model

    torch.manual_seed(0)
    model = build_model("causal3d_small", task="action", num_classes=7).eval()
    return model, [torch.rand(streams, 3, size, size) for _ in range(8)]


def bench_stream_monolithic(model: Any, frames: list[Any], repetitions: int) -> tuple[Variant, list[Any]]:
    """``model.step`` frame by frame on the bench device (inputs and outputs cross to and from it, as they do
    for the depth-parallel actors)."""
    import torch

    device = _device()
    model = model.to(device)
    variant = Variant("monolithic (in process)", 1, "frame by frame")
    outputs: list[Any] = []
    with torch.inference_mode():
        for rep in range(repetitions + 1):  # the first is a warm-up
            state, outputs, started = None, [], time.perf_counter()
            for frame in frames:
                tick = time.perf_counter()
                logits, state = model.step(frame.to(device), state)
                outputs.append(logits.cpu())  # also waits for the GPU
                if rep:
                    variant.latency_ms.append(1000 * (time.perf_counter() - tick))
            if rep:
                variant.fps.append(len(frames) * frames[0].shape[0] / (time.perf_counter() - started))
    return variant, outputs


def bench_stream_parallel(pipeline: Any, frames: list[Any], reference: list[Any], repetitions: int,
                          schedule: str, rates: list[int] | None = None) -> Variant:
    k = pipeline.num_stages
    label = schedule if rates is None else f"{schedule}, rates {rates}"
    variant = Variant("depth-parallel Ray actors", k, label)
    variant.stage_ms = [1000 * c for c in pipeline.split.stage_costs]
    for rep in range(repetitions + 1):
        report = pipeline.stream(frames, schedule, rates, drain=True)
        if not rep:
            continue
        done = [o for o in report.outputs if o.logits is not None]
        variant.fps.append(len(frames) * frames[0].shape[0] / report.wall_s)  # frames of all streams
        variant.latency_ms += [1000 * s for s in report.latency_s]
        variant.busy = [b / report.wall_s for b in report.busy_s]
        lags = sorted({o.lag for o in done})
        variant.lag = str(lags[0]) if len(lags) == 1 else f"{lags[0]}–{lags[-1]}"
        if rates is None:
            variant.max_diff = max(float((o.logits - reference[o.source_frame]).abs().max()) for o in done)
    return variant


# --------------------------------------------------------------------------- clip workload


def bench_clips_monolithic(model: Any, clips: list[Any], repetitions: int) -> tuple[Variant, list[Any]]:
    import torch

    variant = Variant("monolithic (in process)", 1, "clip by clip")
    outputs: list[Any] = []
    device = _device()
    model = model.to(device)
    with torch.inference_mode():
        model(clips[0].to(device)).cpu()  # warm-up
        for _ in range(repetitions):
            started, outputs = time.perf_counter(), []
            for clip in clips:
                tick = time.perf_counter()
                outputs.append(model(clip.to(device)).cpu())
                variant.latency_ms.append(1000 * (time.perf_counter() - tick))
            variant.fps.append(len(clips) / (time.perf_counter() - started))
    return variant, outputs


def bench_clips_parallel(pipeline: Any, clips: list[Any], reference: list[Any], repetitions: int) -> Variant:
    variant = Variant(f"depth-parallel Ray actors ({pipeline.transport} calls)", pipeline.num_stages, "pipelined clips")
    variant.stage_ms = [1000 * c for c in pipeline.split.stage_costs]
    pipeline(clips[:1])  # warm-up
    for _ in range(repetitions):
        pipeline.reset_stats()
        started = time.perf_counter()
        outputs = pipeline(clips)
        wall = time.perf_counter() - started
        variant.fps.append(len(clips) / wall)
        variant.busy = [b / wall for b in pipeline.busy_seconds()]
    variant.latency_ms = _clip_latencies(pipeline, clips)
    variant.lag = "–"
    variant.max_diff = max(float((o - r).abs().max()) for o, r in zip(outputs, reference))
    return variant


def _clip_latencies(pipeline: Any, clips: list[Any]) -> list[float]:
    """One clip at a time through the K actors: the latency a lone clip sees."""
    latencies = []
    for clip in clips[:3]:
        started = time.perf_counter()
        pipeline([clip])
        latencies.append(1000 * (time.perf_counter() - started))
    return latencies


# --------------------------------------------------------------------------- driver


def _device() -> str:
    """Where the monolithic baseline runs: the GPU when there is one, like the stage actors."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _stage_counts() -> list[int]:
    import torch

    return [2, 4] if torch.cuda.is_available() else [2]


def _gpu_share(k: int) -> float:
    import torch

    if not torch.cuda.is_available():
        return 0.0
    return 1.0 if torch.cuda.device_count() >= k else round(1.0 / k, 3)


def _split(model: Any, k: int, example: Any) -> Any:
    from blinkflow.models.depth import split_model

    device = next(model.parameters()).device  # the monolithic run left the model on the bench device
    return split_model(model, k, example_input=example.to(device), repeats=5)


def run_stream_workload(size: int, frames: int, repetitions: int, streams: int = 1) -> list[Variant]:
    from blinkflow.depth_parallel import DepthPipeline

    model, pool = _stream_model(size, streams)
    inputs = [pool[i % len(pool)] for i in range(frames)]
    baseline, reference = bench_stream_monolithic(model, inputs, repetitions)
    variants = [baseline]
    example = inputs[0].unsqueeze(2)
    for k in _stage_counts():
        pipeline = DepthPipeline(_split(model, k, example), num_gpus=_gpu_share(k), threads=1)
        try:
            for schedule, rates in (("sequential", None), ("pipelined", None), ("pipelined", [1] * (k - 1) + [2])):
                variants.append(bench_stream_parallel(pipeline, inputs, reference, repetitions, schedule, rates))
        finally:
            pipeline.close()
    return variants


def run_clip_workload(model_name: str, clip_len: int, size: int, clips: int, repetitions: int) -> list[Variant]:
    import torch

    from blinkflow.models.registry import build_model
    from blinkflow.depth_parallel import DepthPipeline

    torch.manual_seed(0)
    model = build_model(model_name, task="action", num_classes=7).eval()
    inputs = [torch.rand(1, 3, clip_len, size, size) for _ in range(clips)]
    baseline, reference = bench_clips_monolithic(model, inputs, repetitions)
    variants = [baseline]
    for k in _stage_counts():
        pipeline = DepthPipeline(_split(model, k, inputs[0]), num_gpus=_gpu_share(k), threads=1)
        try:
            variants.append(bench_clips_parallel(pipeline, inputs, reference, repetitions))
        finally:
            pipeline.close()
    return variants


#: ``--quick``: tiny inputs, one repetition, a one-epoch Sideways run; for CI, well under a minute of compute
QUICK = {"frames": 8, "repetitions": 1, "stream_size": 64, "streams": 1, "clip_model": "r3d_18", "clips": 3,
         "clip_len": 4, "clip_size": 32}


#: ticks (frames) per run unless --frames says otherwise
DEFAULT_FRAMES = 48


def bench_depth(frames: int = DEFAULT_FRAMES, repetitions: int = 3, write: bool = True, stream_size: int = 224, streams: int = 4,
                clip_model: str = "mc3_18", clips: int = 12, clip_len: int = 8, clip_size: int = 112,
                quick: bool = False, sideways: bool = True, doc: Path | None = None) -> dict:
    """Run both workloads (and the Sideways comparison); print the section and, with ``write``, store it.

    ``streams`` camera streams are batched into each tick of the stream workload (more work per
    actor call, so Ray's per-call cost matters less). ``quick`` replaces the sizes with
    :data:`QUICK`; ``doc`` is the markdown file to write (default ``docs/benchmarks.md``).
    """
    import torch

    if quick:
        frames, repetitions, stream_size, streams = QUICK["frames"], QUICK["repetitions"], QUICK["stream_size"], QUICK["streams"]
        clip_model, clips, clip_len, clip_size = QUICK["clip_model"], QUICK["clips"], QUICK["clip_len"], QUICK["clip_size"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from blinkflow.ray_session import ray_session

    load_before = os.getloadavg()
    try:
        with ray_session(num_cpus=max(os.cpu_count() or 1, 4)):
            stream = run_stream_workload(stream_size, frames, repetitions, streams)
            clip = run_clip_workload(clip_model, clip_len, clip_size, clips, repetitions)
            training = run_sideways_comparison(quick) if sideways else None
    finally:
        torch.set_num_threads(threads)
    result = {"machine": machine_info(), "load": [load_before, os.getloadavg()], "frames": frames,
              "repetitions": repetitions, "stream_size": stream_size, "streams": streams, "clip_model": clip_model,
              "clips": clips,
              "clip_shape": [clip_len, clip_size, clip_size], "quick": quick, "stream": stream, "clip": clip,
              "sideways": training}
    body = render(result)
    print(body)
    if write:
        write_section("depth", body, **({"doc": doc} if doc is not None else {}))
    return result


# --------------------------------------------------------------------------- Sideways vs backprop

SIDEWAYS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "train" / "smoke-action.yaml"
#: the full comparison (about 2 minutes on one core): 8-frame clips, 60 clips per action to train on, 10 held out
SIDEWAYS_FULL = ["epochs=8", "data.clip_len=8", "data.train.clips=420", "data.val.clips=70"]
SIDEWAYS_QUICK = ["epochs=2"]


def run_sideways_comparison(quick: bool = False, stages: int = 2) -> dict:
    """Sideways (K stages; in process, and on Ray actors unless ``quick``) against ordinary backprop.

    Same network, initialisation, data, optimiser and objective (see
    :mod:`models.training.sideways`), on the synthetic action set of the smoke
    config, enlarged unless ``quick``. The report files go to a temporary folder.
    """
    import tempfile

    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.sideways import compare

    with tempfile.TemporaryDirectory(prefix="blinkflow-sideways-") as out_dir:
        overrides = [*(SIDEWAYS_QUICK if quick else SIDEWAYS_FULL), f"out_dir={out_dir}"]
        cfg = load_train_config(SIDEWAYS_CONFIG, overrides, task="action")
        executors = ("local",) if quick else ("local", "ray")
        report = compare(cfg, stages, executors)
    report["overrides"] = overrides[:-1]
    return report


HEADERS = ["variant", "K", "schedule", "throughput/s median (min–max)", "vs monolithic", "latency ms (median)",
           "lag (frames)", "stage busy", "stage cost ms (balance bound)", "max abs Δ vs monolithic"]


def render(result: dict) -> str:
    stream, clip = result["stream"], result["clip"]
    load = ", ".join(f"{a:.1f}→{b:.1f}" for a, b in zip(*result["load"]))
    gpu = result["machine"].get("gpu")
    threads = "one CUDA device share per stage" if gpu else "torch.set_num_threads(1) per actor and for the monolithic model"
    shape = "×".join(str(n) for n in result["clip_shape"])
    lines = [
        "## Depth-parallel stages (Massively Parallel Video Networks)",
        "",
        f"`blinkflow bench depth{' --quick' if result['quick'] else ''}` — monolithic against K depth stages on K Ray "
        f"actors, same inputs, one process; {threads}. {result['repetitions']} repetitions after a warm-up."
        + ("" if gpu else " K = 4 runs only where there is a GPU."),
        "",
        machine_line(result["machine"]) + f" Load average (1, 5, 15 min) before→after: {load}.",
        "",
        (f"**Streaming causal network** (`causal3d_small`, {result['streams']} stream(s) batched per tick, "
        f"{result['frames']} ticks of {result['stream_size']}×{result['stream_size']} frames; frames per second over "
        "all streams; latency = a tick's arrival to the first output computed from it; lag = ticks between a frame "
        "and its output):"),
        "",
        markdown_table(HEADERS, [v.row(statistics.median(stream[0].fps)) for v in stream]),
        "",
        (f"**Clip model** (`{result['clip_model']}`, {result['clips']} clips of {shape}, clips per second; latency = "
        "one clip alone through the stages):"),
        "",
        markdown_table(HEADERS, [v.row(statistics.median(clip[0].fps)) for v in clip]),
        "",
        ("Reading it: `sequential` waits for each frame's output before sending the next (exact, lag 0, no overlap, "
        "so it only adds transport cost); `pipelined` lets stage 1 take frame t+1 while stage 2 works on frame t "
        "(outputs still equal frame by frame, K−1 frames later); the multi-rate row updates the last stage every "
        "second tick and reuses its output in between (so its outputs differ from frame by frame, by design). "
        "Busy = a stage actor's compute time ÷ wall time. Frames are submitted as fast as the "
        "pipeline takes them (up to K+1 ticks in flight), so the pipelined latency includes that queueing; a camera "
        "paced below the pipeline's throughput sees about the sum of the stage costs plus transport. "
        "A speed-up needs K idle cores: on a machine shared with "
        "other work the stages wait for a core and the ratio falls."),
    ]
    if result.get("sideways"):
        lines += ["", *render_sideways(result["sideways"])]
    return "\n".join(lines)


SIDEWAYS_HEADERS = ["method", "steps", "loss first → last (mean of first/last fifth)", "ms per step (median)",
                    "vs backprop", "held-out top-1", "held-out top-5"]


def render_sideways(report: dict) -> list[str]:
    config = report["config"]
    rows = report["results"]
    baseline = next((r for r in rows if r["method"].startswith("ordinary")), None)
    table = []
    for r in rows:
        ratio = "–" if baseline is None else f"{r['median_step_ms'] / baseline['median_step_ms']:.2f}×"
        metrics = r["metrics"]
        table.append([r["method"], r["steps"], f"{r['first_loss']:.3f} → {r['last_loss']:.3f}",
                      f"{r['median_step_ms']:.1f}", ratio, f"{metrics.get('top1', float('nan')):.3f}",
                      f"{metrics.get('top5', float('nan')):.3f}"])
    return [
        (f"**Sideways training vs ordinary backprop** (`blinkflow train action --sideways`; K = {config['stages']}; "
        f"`{config['model']}` {config['model_args']}, synthetic action clips of {config['clip_len']} frames at "
        f"{'×'.join(map(str, config['input_size']))}, batch {config['batch_size']}, {config['epochs']} epochs, lr "
        f"{config['lr']}, {config['threads']} thread; `configs/train/smoke-action.yaml` with "
        f"{' '.join(report.get('overrides', [])) or 'no overrides'}):"),
        "",
        markdown_table(SIDEWAYS_HEADERS, table),
        "",
        ("Same initialisation, data, optimiser and objective (every time step's logits against the clip label). "
        "Sideways feeds one frame per tick and updates each stage with the gradient the stage above sent one tick "
        "earlier (approximate, no backprop through time); `local` runs the stages one after another in this process, "
        "so it shows the algorithm's cost without its parallelism; `ray` runs each stage in its own actor. The "
        "Sideways loss counts only the ticks where the top stage has a frame, so its first loss is not directly "
        "comparable. Held-out accuracy on so few clips is noisy."),
    ]
