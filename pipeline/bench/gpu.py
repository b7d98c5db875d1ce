"""``blinkflow bench gpu``: the headline figures on one accelerator, in one command (issue #25).

Sections (docs/benchmarks.md ``gpu``, with the GPU's name and driver):

* **decode**: a 720p H.264 clip (made from the repository's real clips) decoded by FFmpeg's CUDA
  decoder (NVDEC, PyAV ``HWAccel``) against the CPU decoder of the same machine;
* **stages**: each real-model stage of configs/demo.yaml (shipped weights) in frames/s on 720p frames at
  batch 1/8/32, fp32 and fp16, channels_last; detect and segment at batch 8 in fp16 also without
  channels_last and compiled (``compile: reduce-overhead``: torch.compile with CUDA graphs);
* **streams**: the full real-model graph (gate, detect, segment, track, flow, action) on N streams of
  720p at 10 fps, paced in real time, on the threaded runner (stages overlap: one stage's GPU kernels
  run while another does its host work; Ray is not on the GPU machine), stepping N up until the p95 latency passes 1 s or a stream
  falls behind, then halving the gap to the last N that held; the largest N that held;
* **label**: archive labelling frames/s of the static-camera clips at 720p, skipping off and on (each
  video on the threaded runner);
* **depth**: the action model (I3D) on clip batches whole, and split into K = 2 and 4 depth stages in
  threads of their own (:class:`~blinkflow.depth_parallel.ThreadedDepthPipeline`; one GPU each when there
  are K, else K slices on one GPU, said so), clips/s and the outputs' largest difference from the whole.

A GPU is lent for minutes, so the run keeps to a time budget (``--budget-s``, default
:data:`DEFAULT_BUDGET_S`): the sections run in the order of the issue's targets (decode, streams, label,
then the stages table), what would not fit in the time left is marked *skipped* instead of being started,
and each finished section is written at once, so a run cut short still leaves what it measured.

Without CUDA only ``--quick`` runs (tiny sizes, on the CPU: it checks the code paths and writes
nothing). ``tools/gpu-check.sh`` runs this on the GPU machine with the ``needs_cuda`` tests.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from blinkflow.bench.common import (REPO_ROOT, machine_info, machine_line, markdown_table, publish, save_json,
                                    write_section)
from blinkflow.errors import BlinkflowError

log = logging.getLogger(__name__)

DEMO = REPO_ROOT / "configs" / "demo.yaml"
CLIPS = (REPO_ROOT / "tests" / "data" / "static" / "car-detection-19s.mp4",
         REPO_ROOT / "tests" / "data" / "static" / "one-by-one-person-30s.mp4")
SIZE, QUICK_SIZE = (1280, 720), (160, 96)
BATCHES, QUICK_BATCHES = (1, 8, 32), (1, 2)
#: streams stepped up (doubling, then by 16) until one breaks; bench_streams then halves the gap
STREAM_STEPS, QUICK_STREAM_STEPS = (1, 8, 16, 32, 48, 64), (1,)
STREAM_FPS, STREAM_SECONDS, QUICK_STREAM_SECONDS = 10.0, 20.0, 3.0
P95_LIMIT_S = 1.0
#: the stages section's torch.compile rows: this mode (CUDA graphs), at this batch, fp16
COMPILE_MODE, COMPILED_BATCH = "reduce-overhead", 8
#: seconds the whole run may take by default: the GPU machine is lent for 15 minutes, the needs_cuda tests and
#: its start included (tools/gpu-check.sh passes what its own deadline leaves)
DEFAULT_BUDGET_S = 400.0
#: what a row or section is taken to cost before one like it was timed (s); a compile is slow only the first time
FIRST_GUESS_S = {"stage": 20.0, "compiled": 150.0, "stream_setup": 20.0, "label": 90.0, "depth": 30.0}
#: the order sections are measured in: the issue's targets first, the stages table (the longest) last
MEASURE_ORDER = ("decode", "streams", "label", "depth", "stages")
SKIPPED = "time budget"
#: labelling without skipping against with it: the static clips' model work differs by about this much
#: (docs/skipping.md); the budget takes it for the second run's time
LABEL_OFF_OVER_ON = 5.0
#: the runner of the streams and label sections: its stages overlap in one process (no Ray on the GPU machine)
RUNNER = "threaded"
#: the streams' gate copies (one takes about 200 frames/s of 720p on a core: 30 streams are 300) and the waves in
#: flight before live mode drops (waves go after max_wait_ms, so at 300 frames/s they hold a few frames each)
STREAM_GATE_REPLICAS, STREAM_IN_FLIGHT = 4, 32
#: the segmenter's copies on a GPU: a whole 720p frame leaves about 10-20 ms of host work after the model (its
#: speck regions and their nearest pixels, 3-14 ms on real frames on this VM's CPU; the PNG, 6 ms), which two
#: threads share at about 1.5x one
STREAM_SEGMENT_REPLICAS = 2


@dataclass
class Plan:
    """What one invocation measures: the full GPU run, or the quick smoke run of its code paths."""

    device: str
    size: tuple[int, int]
    batches: tuple[int, ...]
    precisions: tuple[str, ...]
    stream_steps: tuple[int, ...]
    stream_seconds: float
    frames: int
    quick: bool
    compile: bool = False  # also time detect and segment compiled (COMPILE_MODE), on a GPU only
    stages: dict[str, Any] | None = None  # the graph of the streams section; None: configs/demo.yaml's, + track
    results: dict[str, Any] = field(default_factory=dict)
    deadline: float = math.inf  # time.monotonic() by which measuring stops; inf: no budget
    runner: str = RUNNER  # the streams' and the labelling's runner

    def fits(self, seconds: float) -> bool:
        """Whether something expected to take ``seconds`` ends before the deadline."""
        return time.monotonic() + seconds <= self.deadline


def main(args: argparse.Namespace) -> None:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        raise BlinkflowError("blinkflow bench gpu needs a CUDA GPU (none is visible to torch); "
                             "`--quick` runs its code paths on the CPU")
    plan = Plan(device="cuda:0" if cuda else "cpu", size=QUICK_SIZE if args.quick else SIZE,
                batches=QUICK_BATCHES if args.quick else BATCHES,
                precisions=("fp32",) if not cuda else ("fp32", "fp16"),
                stream_steps=QUICK_STREAM_STEPS if args.quick else STREAM_STEPS,
                stream_seconds=QUICK_STREAM_SECONDS if args.quick else STREAM_SECONDS,
                frames=8 if args.quick else 64, quick=args.quick, compile=cuda and not args.quick)
    budget = getattr(args, "budget_s", None)
    budget = (math.inf if args.quick else DEFAULT_BUDGET_S) if budget is None else float(budget)
    plan.deadline = time.monotonic() + budget
    write = cuda and not args.quick and not args.no_write
    images = clip_frames(CLIPS[0], plan.size, plan.frames)
    measure = {"decode": bench_decode, "stages": bench_stages, "streams": bench_streams, "label": bench_label,
               "depth": bench_depth}
    for name in MEASURE_ORDER:
        try:
            plan.results[name] = measure[name](plan, images)
        except Exception as exc:  # noqa: BLE001 - one section that cannot run is reported; the others go on
            log.error("bench gpu: %s failed: %s", name, exc)
            plan.results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if write:  # a run cut short (the machine's time is up) keeps every section finished so far
            save_sections(plan)
    publish("gpu", render(plan), payload(plan), write=write)


def payload(plan: Plan) -> dict[str, Any]:
    return {"machine": machine_info(), "gpu": gpu_info(), "budget_left_s": _budget_left_s(plan), **plan.results}


def save_sections(plan: Plan) -> None:
    """The doc's gpu section and its JSON as measured so far (publish prints the table once, at the end)."""
    write_section("gpu", render(plan))
    save_json("gpu", payload(plan))


def _budget_left_s(plan: Plan) -> float | None:
    return None if math.isinf(plan.deadline) else round(plan.deadline - time.monotonic(), 1)


# --------------------------------------------------------------------------- inputs


def clip_frames(path: Path, size: tuple[int, int], count: int) -> list[np.ndarray]:
    """``count`` RGB frames of a real clip, scaled to ``size`` (width, height) by FFmpeg's scaler."""
    import av

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24", width=size[0], height=size[1]))
            if len(frames) == count:
                break
    return frames


def encode_clip(images: list[np.ndarray], path: Path, fps: int = 10) -> Path:
    """An H.264 clip of ``images`` (the decode section's input: a 720p clip made from the real clips)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = images[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for image in images:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def gpu_info() -> dict[str, Any]:
    """The GPU's name, memory and driver as nvidia-smi reports them (empty without one)."""
    try:
        line = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return {}
    name, driver, memory = (part.strip() for part in line.split(",")[:3])
    return {"name": name, "driver": driver, "memory": memory}


# --------------------------------------------------------------------------- decode


def bench_decode(plan: Plan, images: list[np.ndarray]) -> dict[str, Any]:
    """Frames/s of the CPU decoder and of NVDEC on the same 720p clip (best of three passes)."""
    import tempfile

    if not plan.fits(10.0):
        return {"skipped": SKIPPED}

    with tempfile.TemporaryDirectory() as folder:
        clip = encode_clip(images * 4, Path(folder) / "clip.mp4")
        result: dict[str, Any] = {"cpu_fps": max(decode_rate(clip, None) for _ in range(3))}
        try:
            result["nvdec_fps"] = max(decode_rate(clip, "cuda") for _ in range(3))
            result["nvdec_over_cpu"] = result["nvdec_fps"] / result["cpu_fps"]
        except Exception as exc:  # noqa: BLE001 - no CUDA decoder here: said in the table
            result["nvdec_error"] = f"{type(exc).__name__}: {exc}"
    return result


def decode_rate(path: Path, hwaccel: str | None) -> float:
    """Decoded frames per second of ``path``, downloaded to RGB as the sources deliver them."""
    import av
    from av.codec.hwaccel import HWAccel

    options = {"hwaccel": HWAccel(hwaccel, allow_software_fallback=False)} if hwaccel else {}
    frames, started = 0, time.perf_counter()
    with av.open(str(path), **options) as container:
        for frame in container.decode(video=0):
            frame.to_ndarray(format="rgb24")
            frames += 1
    return frames / (time.perf_counter() - started)


# --------------------------------------------------------------------------- stages


def bench_stages(plan: Plan, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Each demo stage's frames/s per batch size and precision (channels_last on CUDA)."""
    from blinkflow.bench.stages import time_stage
    from blinkflow.config import load_config
    from blinkflow.registry import stages

    cfg = load_config(DEMO)
    rows = []
    timed: dict[bool, float] = {}  # compiled or not -> the longest such row so far (s)
    for task, precision, batch, compile_mode, channels_last in stage_variants(plan):
        stage_cfg = replace(cfg.stages[task], batch=batch, precision=precision, device=plan.device,
                            channels_last=channels_last, compile=compile_mode)
        row = {"stage": task, "model": stage_cfg.model, "precision": precision, "channels_last": channels_last,
               "compile": compile_mode, "batch": batch}
        compiled = compile_mode != "off"
        if not plan.fits(timed.get(compiled, FIRST_GUESS_S["compiled" if compiled else "stage"])):
            rows.append({**row, "skipped": SKIPPED})
            continue
        started = time.monotonic()
        try:
            stage = stages.get(task)(stage_cfg)
            stage.setup(plan.device)
            warmup = stage.options.clip_len if task == "action" else batch
            seconds = time_stage(stage, images, batch, 1 if plan.quick else 3, warmup)
            stage.teardown()
            row["fps"] = 1.0 / statistics.median(seconds)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at batch 32: reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        timed[compiled] = max(timed.get(compiled, 0.0), time.monotonic() - started)
        rows.append(row)
    return rows


def stage_variants(plan: Plan) -> list[tuple[str, str, int, str, bool]]:
    """(stage, precision, batch, compile mode, channels_last) of each row of the stages section: every stage
    at every precision and batch (channels_last on a GPU); on a GPU also detect and segment at the streams'
    batch in fp16 without channels_last, and compiled (each shape compiles anew, so one batch only)."""
    gpu = plan.device != "cpu"
    variants = [(task, precision, batch, "off", gpu) for task in ("detect", "segment", "flow", "action")
                for precision in plan.precisions for batch in plan.batches]
    if gpu:
        variants += [(task, "fp16", COMPILED_BATCH, "off", False) for task in ("detect", "segment")]
    return variants + [(task, "fp16", COMPILED_BATCH, COMPILE_MODE, True) for task in ("detect", "segment") if plan.compile]


# --------------------------------------------------------------------------- streams


def bench_streams(plan: Plan, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """N paced 720p streams through the full graph: N stepped up until the p95 latency or the pace breaks,
    then halved between the last N that held and the first that did not, while the budget allows."""
    rows: dict[int, dict[str, Any]] = {}
    steps_s: list[float] = []  # wall time of each step run (the graph's setup included)

    def step_s() -> float:
        return max(steps_s) if steps_s else plan.stream_seconds + FIRST_GUESS_S["stream_setup"]

    def holds(streams: int) -> bool:
        started = time.monotonic()
        rows[streams] = run_streams(plan, images, streams)
        steps_s.append(time.monotonic() - started)
        return rows[streams]["held"]

    held, broke = 0, None
    for streams in plan.stream_steps:
        if not plan.fits(step_s()):
            rows[streams] = {"streams": streams, "skipped": SKIPPED}
            break
        if not holds(streams):
            broke = streams
            break
        held = streams
    while broke is not None and held and broke - held > 1 and plan.fits(step_s()):
        middle = (held + broke) // 2
        held, broke = (middle, broke) if holds(middle) else (held, middle)
    return [rows[n] for n in sorted(rows)]


def run_streams(plan: Plan, images: list[np.ndarray], streams: int) -> dict[str, Any]:
    from blinkflow.runners import get_runner

    stop = threading.Event()
    window = StreamWindow(plan.stream_seconds, stop)
    sources = [{"type": "frames", "id": f"cam{i}", "fps": STREAM_FPS,
                "frames": paced(images, STREAM_FPS, stop, i, window.open)} for i in range(streams)]
    cfg = streams_config(plan, sources)
    latencies: list[float] = []
    try:
        summary = get_runner(plan.runner)(cfg, on_result=lambda result: latencies.append(result.latency_s)).run()
    finally:
        window.close()
    p95 = float(np.percentile(latencies, 95)) if latencies else float("inf")
    expected = streams * STREAM_FPS * plan.stream_seconds
    behind = summary.totals["decoded"] < 0.9 * expected  # the graph could not take frames at the cameras' pace
    return {"streams": streams, "frames": summary.totals["decoded"], "expected": round(expected),
            "p95_s": round(p95, 3), "dropped": summary.totals["dropped"], "failed": summary.totals["failed"],
            "stage_ms": stage_ms(summary.stage_seconds, summary.totals["decoded"]),
            "held": p95 <= P95_LIMIT_S and not behind and summary.totals["dropped"] == 0
            and summary.totals["failed"] == 0}


def streams_config(plan: Plan, sources: list[dict[str, Any]]) -> Any:
    """The streams' graph: the plan's stages (configs/demo.yaml's, + track), live, on the plan's runner, with
    the gate's copies, the segmenter's on a GPU, and the waves in flight."""
    from blinkflow.config import load_config

    stages = plan.stages or graph_stages(plan)
    if plan.device != "cpu" and "segment" in stages:
        stages = {**stages, "segment": {**stages["segment"], "replicas": STREAM_SEGMENT_REPLICAS}}
    return load_config(data={"sources": sources, "gate": {"enabled": True, "replicas": STREAM_GATE_REPLICAS},
                             "stages": stages, "sinks": [],
                             "runtime": {"mode": "live", "runner": plan.runner, "max_in_flight": STREAM_IN_FLIGHT}})


def stage_ms(stage_seconds: dict[str, float], frames: int) -> str:
    """Milliseconds a frame in each stage, the busiest first. N streams at 10 fps leave 100 / N ms a frame: the
    threaded runner's stages overlap, so N stops where the busiest reaches it, or earlier where stages wait for
    each other (one GPU, the GIL); on the local runner, where they add up to it."""
    per_frame = sorted(((1000.0 * s / max(1, frames), name) for name, s in stage_seconds.items()), reverse=True)
    return ", ".join(f"{name} {ms:.1f}" for ms, name in per_frame if ms >= 0.05)


def graph_stages(plan: Plan) -> dict[str, Any]:
    """configs/demo.yaml's model stages on the plan's device (fp16 on CUDA), plus tracking."""
    from blinkflow.schema import read_yaml

    stages = read_yaml(DEMO)["stages"]
    for stage in stages.values():
        stage["device"] = plan.device
        if plan.device != "cpu":
            stage.update(precision="fp16", channels_last=True, batch=max(8, stage.get("batch", 1)))
    try:
        import scipy.optimize  # noqa: F401 - the track stage's assignment
        stages["track"] = {}
    except ImportError:
        log.warning("bench gpu: scipy is missing, so the streams run without the track stage")
    return stages


class StreamWindow:
    """The streams' measuring window: ``seconds`` from the first frame a camera sends. Loading the models (and
    a GPU's warm-up) come before it, so they do not count as frames the graph fell behind on."""

    def __init__(self, seconds: float, stop: threading.Event) -> None:
        self._stop, self._timer, self._lock = stop, threading.Timer(seconds, stop.set), threading.Lock()
        self._opened = False

    def open(self) -> None:
        with self._lock:
            if not self._opened and not self._stop.is_set():
                self._opened = True
                self._timer.start()

    def close(self) -> None:
        self._timer.cancel()
        self._stop.set()


def paced(images: list[np.ndarray], fps: float, stop: threading.Event, offset: int,
          on_first: Any = None) -> Iterator[tuple[np.ndarray, float]]:
    """The clip looped at ``fps`` in wall-clock time, like a camera, until ``stop``: (image, capture time) pairs,
    so a frame the graph reads late counts its wait in its latency; ``on_first`` is called when the first frame is
    asked for."""
    if on_first is not None:
        on_first()
    due = time.monotonic()
    wall = time.time() - due  # time.time() of a monotonic instant
    index = offset
    while not stop.is_set():
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield images[index % len(images)], wall + due
        index += 1
        due += 1.0 / fps


# --------------------------------------------------------------------------- depth parallel

#: the depth section: stages per split, clips per batch and batches per timing (quick: fewer, smaller)
DEPTH_KS, DEPTH_BATCH, DEPTH_BATCHES = (2, 4), 8, 12


def bench_depth(plan: Plan, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """configs/demo.yaml's action model on clip batches: whole, then K depth stages in threads (no Ray here)."""
    from blinkflow.config import load_config
    from blinkflow.registry import stages

    ks, batch, count = ((2,), 1, 3) if plan.quick else (DEPTH_KS, DEPTH_BATCH, DEPTH_BATCHES)
    if not plan.fits(FIRST_GUESS_S["depth"]):
        return [{"k": k, "skipped": SKIPPED} for k in (1, *ks)]
    stage_cfg = replace(load_config(DEMO).stages["action"], device=plan.device, batch=batch,
                        precision="fp16" if plan.device != "cpu" else "fp32")
    stage = stages.get("action")(stage_cfg)
    stage.setup(plan.device)
    try:
        clips = _depth_clips(stage, batch, count)
        whole_s, expected = _timed_clips(stage, lambda batches: [stage.model(b) for b in batches], clips)
        rows = [{"k": 1, "placement": "whole model", "clips_per_s": batch * count / whole_s}]
        for k in ks:
            rows.append(_depth_row(stage, k, clips, expected, whole_s) if plan.fits(2 * whole_s + 10)
                        else {"k": k, "skipped": SKIPPED})
        return rows
    finally:
        stage.teardown()


def _depth_clips(stage: Any, batch: int, count: int) -> list[Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    shape = (batch, 3, stage.options.clip_len, *stage.input_size)
    return [torch.rand(shape, generator=generator).to(stage._device) for _ in range(count)]


def _timed_clips(stage: Any, run: Any, clips: list[Any]) -> tuple[float, list[Any]]:
    """(seconds, outputs) of ``run`` over the clips, after one untimed warm-up batch, in the stage's context."""
    import torch

    def synchronize() -> None:
        if stage._device.type == "cuda":
            torch.cuda.synchronize(stage._device)

    with stage.inference():
        run(clips[:1])
        synchronize()
        started = time.perf_counter()
        outputs = [out.float() for out in run(clips)]
        synchronize()
    return time.perf_counter() - started, outputs


def _depth_row(stage: Any, k: int, clips: list[Any], expected: list[Any], whole_s: float) -> dict[str, Any]:
    from blinkflow.depth_parallel import ThreadedDepthPipeline, depth_devices
    from blinkflow.models.depth import split_model

    devices = depth_devices(str(stage._device), k)
    placement = f"{k} GPUs" if len(set(devices)) == k else f"{k} slices on one {devices[0]}"
    row: dict[str, Any] = {"k": k, "placement": placement}
    try:
        split = split_model(stage.model, k, example_input=clips[0][:1])
        pipeline = ThreadedDepthPipeline(split, devices, precision=stage.cfg.precision)
        try:
            seconds, outputs = _timed_clips(stage, pipeline, clips)
        finally:
            pipeline.close()
        difference = max(float((a.cpu() - b.cpu()).abs().max()) for a, b in zip(outputs, expected))
        row.update(clips_per_s=clips[0].shape[0] * len(clips) / seconds, over_whole=whole_s / seconds,
                   max_abs_diff=difference)
    except Exception as exc:  # noqa: BLE001 - a split that cannot run is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return row


# --------------------------------------------------------------------------- archive labelling


def bench_label(plan: Plan, images: list[np.ndarray]) -> list[dict[str, Any]]:
    """Archive labelling frames/s of the static clips scaled to the plan's size, skipping off and on."""
    import tempfile

    from blinkflow.config import load_config
    from blinkflow.label import LabelRun, find_videos

    if not plan.fits(FIRST_GUESS_S["label"]):
        return [{"skipping": gate, "skipped": SKIPPED} for gate in (True, False)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for clip in CLIPS:
            encode_clip(clip_frames(clip, plan.size, plan.frames * (1 if plan.quick else 4)), inputs / clip.name)
        stages = graph_stages(plan)
        stages = {name: stages[name] for name in ("detect", "segment")}
        run_s = 0.0
        for gate in (True, False):  # with skipping first: the target is about it
            if not plan.fits(run_s):
                rows.append({"skipping": gate, "skipped": SKIPPED})
                continue
            cfg = load_config(data={"sources": [], "gate": {"enabled": gate}, "stages": stages,
                                    "label": {"formats": ["jsonl"], "executor": "local"},
                                    "runtime": {"runner": plan.runner}})
            started = time.perf_counter()
            summary = LabelRun(find_videos([str(inputs)]), Path(folder) / f"out-{gate}", cfg, ["jsonl"],
                               progress=False).run()
            seconds = time.perf_counter() - started
            run_s = LABEL_OFF_OVER_ON * seconds  # what the run without skipping may take
            rows.append({"skipping": gate, "frames": summary["totals"]["frames"],
                         "fps": summary["totals"]["frames"] / seconds, "reused": summary["totals"].get("reused", 0)})
    return rows


# --------------------------------------------------------------------------- report


def render(plan: Plan) -> str:
    results, gpu = plan.results, gpu_info()
    title = gpu.get("name", "no GPU") + (f", driver {gpu['driver']}, {gpu['memory']}" if gpu else "")
    lines = ["## GPU: decode, stages, streams per GPU, archive labelling", "",
             f"`blinkflow bench gpu{' --quick' if plan.quick else ''}` on **{title}** ({plan.device}); frames "
             f"{plan.size[0]}x{plan.size[1]} from the repository's real static-camera clips. Targets (issue #25): "
             f">= 30 streams of 720p at 10 fps with p95 <= {P95_LIMIT_S:g} s and nothing dropped; labelling >= 1000 "
             "frames/s with skipping; NVDEC >= 3x the CPU decoder." + _budget_words(plan), "", machine_line(machine_info()), ""]
    lines += _decode_lines(results.get("decode", {}), plan.size)
    lines += _table_lines("stages", results.get("stages"), ["stage", "model", "precision", "channels_last", "compile", "batch", "fps"])
    lines += [f"Streams and labelling on the {plan.runner} runner; the streams with {STREAM_GATE_REPLICAS} gate "
              f"copies, {STREAM_SEGMENT_REPLICAS} segmenter copies on a GPU and at most {STREAM_IN_FLIGHT} waves in flight; stage_ms: each stage's milliseconds a frame "
              "(all its copies together), the busiest first.", ""]
    lines += _table_lines("streams", results.get("streams"),
                          ["streams", "frames", "expected", "p95_s", "dropped", "failed", "stage_ms", "held"])
    held = [row["streams"] for row in results.get("streams") or [] if isinstance(row, dict) and row.get("held")]
    lines += [f"Largest number of streams held: **{max(held) if held else 0}**.", ""]
    lines += _table_lines("label", results.get("label"), ["skipping", "frames", "fps", "reused"])
    lines += _table_lines("depth", results.get("depth"), ["k", "placement", "clips_per_s", "over_whole", "max_abs_diff"])
    return "\n".join(lines)


def _budget_words(plan: Plan) -> str:
    skipped = sum("skipped" in row for section in plan.results.values()
                  for row in (section if isinstance(section, list) else [section]) if isinstance(row, dict))
    return (f" Measured within a time budget; {skipped} row(s) did not fit it and are marked skipped." if skipped
            else "")


def _decode_lines(decode: dict[str, Any], size: tuple[int, int]) -> list[str]:
    if "error" in decode:
        return [f"Decode: failed ({decode['error']}).", ""]
    if "skipped" in decode:
        return [f"Decode: skipped ({decode['skipped']}).", ""]
    if not decode:
        return ["Decode: not measured yet (the run stopped before it).", ""]
    nvdec = (f"NVDEC {decode['nvdec_fps']:.0f} frames/s, **{decode['nvdec_over_cpu']:.2f}x**" if "nvdec_fps" in decode
             else f"NVDEC unavailable ({decode.get('nvdec_error', '?')})")
    return [f"Decode ({size[0]}x{size[1]} H.264 to RGB, best of 3): CPU {decode.get('cpu_fps', 0):.0f} frames/s; {nvdec}.", ""]


def _table_lines(name: str, rows: Any, columns: list[str]) -> list[str]:
    if rows is None:
        return [f"{name.capitalize()}: not measured yet (the run stopped before it).", ""]
    if isinstance(rows, dict) and "error" in rows:
        return [f"{name.capitalize()}: failed ({rows['error']}).", ""]
    body = [[_cell(row.get(column, _why_not_measured(row)) if column == columns[-1] else row.get(column, ""))
             for column in columns] for row in rows or []]
    return [f"**{name.capitalize()}**", "", markdown_table(columns, body), ""]


def _why_not_measured(row: dict[str, Any]) -> str:
    """A row's last cell when it has no figure: its error, or why it was skipped."""
    return row["error"] if "error" in row else f"skipped ({row['skipped']})" if "skipped" in row else ""


def _cell(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
