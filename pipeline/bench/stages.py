"""``blinkflow bench stages``: per-stage frames/s and ms per frame for every backend.

Each backend runs through its real stage class (preprocessing, model,
postprocessing) on synthetic 320×240 frames of one stream, at batch sizes 1, 4
and 16, on the CPU and, when present, on CUDA in fp32, fp16 and channels_last.
Weights are random: speed does not depend on them. Torchvision detectors run
with their internal resize set to the frame size, so every backend sees the
configured resolution.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

from blinkflow.bench.common import machine_info, machine_line, markdown_table, publish
from blinkflow.frame import Frame

log = logging.getLogger(__name__)

TASKS = ("detect", "segment", "flow", "action")
QUICK_BACKENDS = {"detect": ["ssdlite320_mobilenet_v3_large"], "segment": ["unet_small"], "flow": ["flownet_s_small"],
                  "action": ["causal3d_small"]}
RESIZING_DETECTORS = {"fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn",
                      "retinanet_resnet50_fpn_v2", "fcos_resnet50_fpn"}
ACTION_INPUT = {"mvit_v2_s": {"clip_len": 16, "input_size": [224, 224]}}


def synthetic_frames(count: int, width: int, height: int) -> list[Any]:
    from blinkflow.models.training.scenes import SceneGenerator

    generator = SceneGenerator(seed=11, width=width, height=height)
    return [generator.render_image(t) for t in range(count)]


def build_stage(task: str, backend: str, batch: int, device: str, variant: str, width: int, height: int):
    from blinkflow.config import StageConfig, structure_dataclass
    from blinkflow.registry import stages

    cls = stages.get(task)
    options: dict[str, Any] = dict(ACTION_INPUT.get(backend, {})) if task == "action" else {}
    if task == "detect" and backend in RESIZING_DETECTORS:
        options["model_args"] = {"min_size": min(width, height), "max_size": max(width, height)}
    cfg = StageConfig(model=backend, batch=batch, device=device, precision="fp16" if variant == "fp16" else "fp32",
                      channels_last=variant == "channels_last", options=structure_dataclass(cls.Options, options, f"stages.{task}.options"))
    stage = cls(cfg)
    stage.setup(device)
    return stage


def time_stage(stage: Any, images: list[Any], batch: int, repetitions: int, warmup: int | None = None) -> list[float]:
    """Seconds per frame for each repetition of feeding ``images`` in batches, after ``warmup`` frames
    (default: one batch; the action stage needs a full first window)."""
    index = 0

    def feed(chunk: list[Any]) -> None:
        nonlocal index
        frames = []
        for image in chunk:
            frames.append(Frame(stream_id="bench", index=index, pts=index / 25, image=image))
            index += 1
        stage.process(frames)

    warmup = batch if warmup is None else warmup
    for start in range(0, warmup, batch):  # warm-up (and the flow stage's first frame of the pair)
        feed(images[start % len(images) : start % len(images) + min(batch, warmup - start)])
    per_frame = []
    for _ in range(repetitions):
        started = time.perf_counter()
        for start in range(0, len(images), batch):
            feed(images[start : start + batch])
        per_frame.append((time.perf_counter() - started) / len(images))
    stage.flush()
    return per_frame


def bench_stages(quick: bool = False, batches: tuple[int, ...] = (1, 4, 16), width: int = 320, height: int = 240,
                 repetitions: int = 3, write: bool = True) -> dict[str, Any]:
    from blinkflow.models.registry import model_names

    if quick:
        batches, width, height, repetitions = (1, 4), 160, 120, 1
    devices = _devices()
    rows, records = [], []
    for task in TASKS:
        for backend in (QUICK_BACKENDS[task] if quick else model_names(task)):
            for device, variant in devices:
                for batch in batches:
                    record = _measure_one(task, backend, device, variant, batch, width, height, repetitions)
                    records.append(record)
                    rows.append(_row(record))
    payload = {"machine": machine_info(), "resolution": [width, height], "repetitions": repetitions, "results": records}
    body = render(payload, rows, quick)
    publish("stages", body, payload, write=write and not quick)
    return payload


def _measure_one(task, backend, device, variant, batch, width, height, repetitions) -> dict[str, Any]:
    record = {"stage": task, "backend": backend, "device": device, "variant": variant, "batch": batch}
    try:
        stage = build_stage(task, backend, batch, device, variant, width, height)
        count, warmup = _frames_per_repetition(stage, task, batch)
        images = synthetic_frames(count, width, height)
        seconds = time_stage(stage, images, batch, repetitions, warmup)
        stage.teardown()
        ms = sorted(s * 1000 for s in seconds)
        record.update(ms_per_frame={"min": ms[0], "median": statistics.median(ms), "max": ms[-1]},
                      fps=1000.0 / statistics.median(ms))
    except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not fatal
        log.warning("bench stages: %s/%s batch %d failed: %s", task, backend, batch, exc)
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


def _frames_per_repetition(stage: Any, task: str, batch: int) -> tuple[int, int]:
    """(frames per repetition, warm-up frames). Action runs one clip forward per ``stride`` frames once
    its first window is full, so every repetition gets a whole number of strides after a full window."""
    count = max(batch, 8)
    if task != "action":
        return count, batch
    stride, clip_len = stage.options.stride, stage.options.clip_len
    return -(-count // stride) * stride, clip_len


def _devices() -> list[tuple[str, str]]:
    devices = [("cpu", "fp32")]
    try:
        import torch

        if torch.cuda.is_available():
            devices += [("cuda:0", "fp32"), ("cuda:0", "fp16"), ("cuda:0", "channels_last")]
    except ImportError:  # pragma: no cover
        pass
    return devices


def _row(record: dict[str, Any]) -> list[Any]:
    head = [record["stage"], record["backend"], f"{record['device']} {record['variant']}", record["batch"]]
    if "error" in record:
        return head + ["—", "—", record["error"][:60]]
    ms = record["ms_per_frame"]
    return head + [f"{record['fps']:.1f}", f"{ms['median']:.1f} ({ms['min']:.1f}–{ms['max']:.1f})", ""]


def render(payload: dict[str, Any], rows: list[list[Any]], quick: bool) -> str:
    width, height = payload["resolution"]
    gpu = payload["machine"].get("gpu")
    note = "" if gpu else " No GPU here, so these are CPU figures: compare rows with each other, not with GPU numbers."
    return "\n".join([
        "## Stages: every backend, batch sizes, devices",
        "",
        f"`blinkflow bench stages{' --quick' if quick else ''}` — synthetic {width}×{height} frames through each "
        f"stage class, {payload['repetitions']} repetitions, ms per frame as median (min–max). Action runs its "
        f"default sliding window (clip 8, stride 4: one clip forward per 4 frames).{note}",
        "",
        machine_line(payload["machine"]),
        "",
        markdown_table(["stage", "backend", "device", "batch", "frames/s", "ms/frame", "note"], rows),
    ])


# ---------------------------------------------------------------------------- the demo's real models

#: speed knobs measured beside the demo's own settings: (stage, label, overrides of the demo config)
DEMO_VARIANTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("detect", "demo (YOLOX 320x320, rect: 160x320)", ()),
    ("detect", "square letterbox (rect off: 320x320)", ("stages.detect.options.model_args.rect=false",)),
    ("detect", "416x416 (trained size; rect: 224x416)", ("stages.detect.options.model_args.input_size=[416,416]",)),
    ("segment", "demo (272x640, the clip's size)", ()),
    ("segment", "input_size 136x320", ("stages.segment.options.input_size=[136,320]",)),
    ("flow", "demo (136x320, 6 iterations)", ()),
    ("flow", "12 iterations", ("stages.flow.options.model_args.num_flow_updates=12",)),
    ("flow", "20 iterations", ("stages.flow.options.model_args.num_flow_updates=20",)),
    ("flow", "272x640, 12 iterations", ("stages.flow.options.input_size=[272,640]",
                                        "stages.flow.options.model_args.num_flow_updates=12")),
    ("action", "demo (clip 16, stride 8, 112x112)", ()),
    ("action", "224x224", ("stages.action.options.input_size=[224,224]",)),
    ("action", "clip 32, stride 16", ("stages.action.options.clip_len=32", "stages.action.options.stride=16")),
)


def bench_demo_stages(quick: bool = False, repetitions: int = 2, write: bool = True) -> dict[str, Any]:
    """Each real-model stage of configs/demo.yaml (shipped weights) on the demo clip's frames, with its speed knobs."""
    from blinkflow.bench.common import REPO_ROOT

    config = REPO_ROOT / "configs" / "demo.yaml"
    images = _demo_frames(config, 8 if quick else 32)
    variants = [v for v in DEMO_VARIANTS if "demo" in v[1]] if quick else DEMO_VARIANTS
    rows, records = [], []
    for task, label, overrides in variants:
        record = _measure_demo(config, task, label, overrides, images, 1 if quick else repetitions)
        records.append(record)
        rows.append([task, record["backend"], label, record.get("batch", "—"),
                     f"{record['ms_per_frame']:.0f}" if "ms_per_frame" in record else record.get("error", "")[:60]])
    payload = {"machine": machine_info(), "config": "configs/demo.yaml", "frames": len(images), "results": records}
    body = "\n".join([
        "## Stages: the demo's real models and their speed knobs",
        "",
        f"`blinkflow bench stages{' --quick' if quick else ''}` — each stage of `configs/demo.yaml` with its shipped "
        f"real weights on {len(images)} frames of the demo clip (640×272, 5 frames/s), ms per frame (median of "
        f"{payload['results'][0].get('repetitions', repetitions)}). The action stage runs one clip forward per "
        "`stride` frames; its ms/frame spreads that over the frames.",
        "",
        machine_line(payload["machine"]),
        "",
        markdown_table(["stage", "backend", "setting", "batch", "ms/frame"], rows),
    ])
    publish("stages-demo", body, payload, write=write and not quick)
    return payload


def _demo_frames(config: Any, count: int) -> list[Any]:
    from pathlib import Path

    from blinkflow.config import load_config
    from blinkflow.sources import decode_file

    source = load_config(config).sources[0]
    return [f.image for f in decode_file(Path(source.path), "demo", source)][:count]


def _measure_demo(config: Any, task: str, label: str, overrides: tuple[str, ...], images: list[Any],
                  repetitions: int) -> dict[str, Any]:
    from blinkflow.config import load_config
    from blinkflow.registry import stages

    cfg = load_config(config, list(overrides)).stages[task]
    record: dict[str, Any] = {"stage": task, "backend": cfg.model, "setting": label, "batch": cfg.batch,
                              "repetitions": repetitions}
    try:
        stage = stages.get(task)(cfg)
        stage.setup("cpu")
        warmup = stage.options.clip_len if task == "action" else cfg.batch
        seconds = time_stage(stage, images, cfg.batch, repetitions, warmup)
        stage.teardown()
        record["ms_per_frame"] = statistics.median(seconds) * 1000
    except Exception as exc:  # noqa: BLE001 - a setting that cannot run here is reported, not fatal
        log.warning("bench stages: %s %s failed: %s", task, label, exc)
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record
