"""``blinkflow bench``: the quick benchmarks run and print well-formed tables, the docs
are left alone unless asked, and the pictures for the docs are valid PNGs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from blinkflow.bench.common import BENCH_DOC
from tests.conftest import REPO_ROOT

NUMBER = r"\d+(?:\.\d+)?"


@pytest.fixture(autouse=True)
def bench_paths(tmp_path, monkeypatch):
    """Benchmarks write their doc section and JSON under tmp_path, never into the repository."""
    monkeypatch.setenv("BLINKFLOW_BENCH_DOC", str(tmp_path / "benchmarks.md"))
    monkeypatch.setenv("BLINKFLOW_BENCH_OUT", str(tmp_path / "bench"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def table_rows(text: str, headers: list[str]) -> list[list[str]]:
    """The body rows of the markdown table whose header row is ``headers``."""
    lines = text.splitlines()
    start = lines.index("| " + " | ".join(headers) + " |")
    assert re.fullmatch(r"\|(---\|)+", lines[start + 1])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_bench_decode_quick_prints_a_table_of_rates(capsys, bench_paths):
    from blinkflow.cli import main

    before = _digest(BENCH_DOC)
    assert main(["bench", "decode", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, ["clip", "frames", "ffmpeg CLI fps", "PyAV decode fps", "PyAV + RGB fps", "source fps",
                            "source + motion vectors fps", "… + fields fps", "PyAV ÷ ffmpeg", "motion vectors ÷ plain"])
    assert rows, out
    for clip, frames, *rates in rows:
        assert int(frames) > 0
        for cell in rates[1:5]:  # PyAV and the source are always there; ffmpeg depends on the machine
            assert re.fullmatch(rf"{NUMBER} \({NUMBER}–{NUMBER}\)", cell), cell
        assert float(rates[-1]) > 0  # motion vectors ÷ plain
    assert any(r[0].startswith("generated-") for r in rows)
    assert _digest(BENCH_DOC) == before
    assert not (bench_paths / "benchmarks.md").exists()  # --quick never writes


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_bench_decode_without_ffmpeg_says_so_instead_of_failing(capsys, monkeypatch):
    from blinkflow.bench import decode as bench_decode

    monkeypatch.setattr(bench_decode.shutil, "which", lambda name: None)
    payload = bench_decode.bench_decode(quick=True, write=False)
    out = capsys.readouterr().out
    assert "ffmpeg` CLI is not installed" in out
    assert all(clip["pyav_over_ffmpeg"] is None for clip in payload["clips"].values())
    assert "n/a" in out


@pytest.mark.slow
def test_bench_stages_quick_prints_every_task(capsys):
    from blinkflow.cli import main

    before = _digest(BENCH_DOC)
    assert main(["bench", "stages", "--quick"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, ["stage", "backend", "device", "batch", "frames/s", "ms/frame", "note"])
    assert {row[0] for row in rows} == {"detect", "segment", "flow", "action"}
    for stage, backend, device, batch, fps, ms, note in rows:
        assert not note, f"{stage}/{backend} failed: {note}"
        assert float(fps) > 0 and int(batch) >= 1
        assert re.fullmatch(rf"{NUMBER} \({NUMBER}–{NUMBER}\)", ms), ms
    assert _digest(BENCH_DOC) == before


def test_write_section_follows_the_doc_override_and_replaces_in_place(bench_paths):
    from blinkflow.bench.common import save_json, write_section

    write_section("one", "first")
    write_section("two", "second")
    write_section("one", "again")
    text = (bench_paths / "benchmarks.md").read_text()
    assert text.count("<!-- bench:one -->") == 1 and "again" in text and "first" not in text
    assert text.index("bench:one") < text.index("bench:two")
    saved = save_json("one", {"x": 1})
    assert saved.parent == bench_paths / "bench" and json.loads(saved.read_text()) == {"x": 1}


SAMPLE_PIPELINE = {
    "frames": 48,
    "fps": {"sequential (local runner)": [10.0, 11.0, 12.0], "Ray runner": [18.0, 20.0, 21.0], "detect alone": [30.0, 31.0, 33.0],
            "action alone": [22.0, 23.5, 24.0]},
    "bound": "action alone",
}
SAMPLE_DECODE = {"clips": {"bikes.mp4": {"ffmpeg CLI": [400.0, 420.0, 430.0], "PyAV decode": [380.0, 390.0, 400.0],
                                         "PyAV decode + RGB": [0.0, 0.0, 0.0], "pyav_over_ffmpeg": 0.93}}}


def _assert_png(path: Path, min_size: tuple[int, int] = (200, 100)) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]


def test_plot_throughput_draws_a_png_from_saved_results(tmp_path):
    from blinkflow.bench.plot import load_panels, plot_throughput

    results = tmp_path / "results"
    results.mkdir()
    (results / "bench-pipeline.json").write_text(json.dumps(SAMPLE_PIPELINE))
    (results / "bench-decode.json").write_text(json.dumps(SAMPLE_DECODE))
    (results / "bench-broken.json").write_text("{not json")
    panels = load_panels(results)
    assert [p.bound for p in panels] == [420.0, 23.5]
    assert [b[0] for b in panels[0].bars] == ["ffmpeg CLI", "PyAV decode"]  # a variant without a rate is left out
    out = plot_throughput(results, tmp_path / "img" / "throughput.png")
    _assert_png(out)


def test_plot_throughput_without_results_draws_nothing(tmp_path):
    from blinkflow.bench.plot import plot_throughput

    assert plot_throughput(tmp_path, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()


def test_pipeline_diagram_is_a_png(tmp_path):
    from blinkflow.bench.plot import draw_pipeline_diagram

    _assert_png(draw_pipeline_diagram(tmp_path / "pipeline.png"), (1000, 200))


def test_save_demo_frame_takes_the_middle_frame_of_an_mp4(tmp_path):
    import av
    import numpy as np
    from PIL import Image

    from blinkflow.bench.plot import save_demo_frame

    video = tmp_path / "demo.mp4"
    with av.open(str(video), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for value in (0, 120, 250):
            image = np.full((48, 64, 3), value, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    out = save_demo_frame(video, tmp_path / "frame.png")
    with Image.open(out) as frame:
        assert frame.size == (64, 48)
        assert abs(float(np.asarray(frame).mean()) - 120) < 20


def test_save_demo_frame_without_the_video_names_the_command(tmp_path):
    from blinkflow.bench.plot import save_demo_frame
    from blinkflow.errors import BlinkflowError

    with pytest.raises(BlinkflowError, match="blinkflow demo"):
        save_demo_frame(tmp_path / "missing.mp4", tmp_path / "frame.png")


@pytest.mark.parametrize("flags, plots", [([], True), (["--no-write"], False), (["--quick"], False)])
def test_bench_all_draws_the_throughput_plot_only_when_writing(monkeypatch, flags, plots):
    from blinkflow.bench import cli as bench_cli, plot as bench_plot
    from blinkflow.cli import main

    calls = []
    monkeypatch.setattr(bench_cli, "ALL_ORDER", [])  # the benchmarks themselves are tested above
    monkeypatch.setattr(bench_plot, "plot_throughput", lambda: calls.append(1))
    assert main(["bench", "all", *flags]) == 0
    assert bool(calls) == plots


@pytest.mark.slow
def test_bench_pipeline_quick_compares_ray_with_the_bound(bench_paths):
    """Real Ray, a few frames: every variant is measured and the ratios and actor busy shares are sane."""
    from blinkflow.bench.pipeline import bench_pipeline

    before = _digest(BENCH_DOC)
    result = bench_pipeline(Path(__file__).resolve().parent.parent / "configs" / "synthetic.yaml", frames=8, repetitions=1,
                            overrides=["stages.segment.batch=2", "stages.detect.batch=2"], write=False)
    assert set(result["fps"]) >= {"sequential (local runner)", "threaded runner (a thread per stage)", "Ray runner",
                                  "Ray runner + metrics"}
    assert result["threaded_over_sequential"] == pytest.approx(
        result["fps"]["threaded runner (a thread per stage)"][1] / result["fps"]["sequential (local runner)"][1])
    assert all(low > 0 and low <= mid <= high for low, mid, high in result["fps"].values())
    assert result["bound_fps"] == pytest.approx(min(result["slowest_stage_fps"], result["shared_cores_fps"]))
    assert result["ray_over_bound"] == pytest.approx(result["fps"]["Ray runner"][1] / result["bound_fps"])
    assert set(result["ray_busy"]) == {"detect", "segment", "flow", "action"}
    assert all(0.0 < share <= 1.05 for share in result["ray_busy"].values()), result["ray_busy"]
    low, high = result["metrics_overhead_range"]
    assert low <= result["metrics_overhead"] <= high
    assert result["config"] == "configs/synthetic.yaml"  # shown relative to the repository
    assert _digest(BENCH_DOC) == before


# --------------------------------------------------------------------------- bench gpu (issue #25): its CPU-side paths


def test_bench_gpu_without_cuda_is_one_line_and_quick_is_the_only_way():
    import argparse

    import torch

    from blinkflow.bench import gpu
    from blinkflow.errors import BlinkflowError

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the full run is tools/gpu-check.sh's")
    with pytest.raises(BlinkflowError, match="needs a CUDA GPU .* `--quick` runs its code paths on the CPU"):
        gpu.main(argparse.Namespace(quick=False, no_write=False))


@pytest.mark.slow
def test_bench_gpu_decode_and_streams_sections_measure_and_report(tmp_path):
    from blinkflow.bench import gpu

    images = gpu.clip_frames(gpu.CLIPS[1], (96, 64), 6)
    assert len(images) == 6 and images[0].shape == (64, 96, 3)
    plan = gpu.Plan(device="cpu", size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=(1, 2),
                    stream_seconds=1.5, frames=6, quick=True, stages={"chaos": {}})
    decode = gpu.bench_decode(plan, images)
    assert decode["cpu_fps"] > 0 and ("nvdec_fps" in decode or "nvdec_error" in decode)
    streams = gpu.bench_streams(plan, images)
    assert [row["streams"] for row in streams] == [1, 2]  # a light graph holds both steps
    # each camera sends a frame at both ends of the window, and one may be on its way when it closes
    assert all(row["held"] and row["p95_s"] < 1.0 and 10 <= row["frames"] <= row["expected"] + 2 * row["streams"]
               for row in streams)
    assert all(re.fullmatch(r"(\w+ \d+\.\d)(, \w+ \d+\.\d)*", row["stage_ms"]) and "gate" in row["stage_ms"]
               for row in streams), streams
    assert gpu.stage_ms({"gate": 0.5, "detect": 2.0, "track": 0.0}, 100) == "detect 20.0, gate 5.0"
    plan.results = {"decode": decode, "streams": streams, "stages": {"error": "RuntimeError: out of memory"}}
    report = gpu.render(plan)
    assert "Largest number of streams held: **2**" in report and "Stages: failed (RuntimeError: out of memory)" in report


@pytest.mark.slow  # 5-6 s: the fast tier keeps under 2 minutes
def test_bench_gpu_streams_window_opens_at_the_first_frame_so_model_loading_is_not_counted_as_falling_behind(
        monkeypatch):
    """A GPU's graph loads its models (seconds) before the cameras' first frame: the window must not count it."""
    import time as real_time

    from blinkflow.bench import gpu
    from blinkflow.runners import threaded

    assert gpu.RUNNER == "threaded"
    setup = threaded.setup_stage

    def slow_setup(spec, metrics):
        real_time.sleep(1.0)  # as long as the window itself
        return setup(spec, metrics)

    monkeypatch.setattr(threaded, "setup_stage", slow_setup)
    images = gpu.clip_frames(gpu.CLIPS[1], (96, 64), 6)
    plan = gpu.Plan(device="cpu", size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=(1,),
                    stream_seconds=1.0, frames=6, quick=True, stages={"chaos": {}})
    row = gpu.run_streams(plan, images, 1)
    assert row["frames"] >= 0.9 * row["expected"] and row["held"], row  # 10 frames in the second after setup


def test_bench_gpu_streams_graph_is_live_threaded_with_gate_copies_and_two_segmenters_on_a_gpu():
    from blinkflow.bench import gpu

    def plan(device: str) -> gpu.Plan:
        return gpu.Plan(device=device, size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=(1,),
                        stream_seconds=1.0, frames=6, quick=device == "cpu")

    sources = [{"type": "frames", "id": "cam0", "fps": 10, "frames": iter(())}]
    on_gpu, on_cpu = gpu.streams_config(plan("cuda:0"), sources), gpu.streams_config(plan("cpu"), sources)
    for cfg in (on_gpu, on_cpu):
        assert (cfg.runtime.runner, cfg.runtime.mode, cfg.runtime.max_in_flight) == ("threaded", "live", 32)
        assert cfg.gate.enabled and cfg.gate.replicas == 4
        assert cfg.stages["action"].options.hold is False  # live: no frame waits for its clip
        assert set(cfg.enabled_stages()) >= {"detect", "segment", "flow", "action"}
    assert on_gpu.stages["segment"].replicas == 2 and on_gpu.stages["segment"].precision == "fp16"
    assert on_cpu.stages["segment"].replicas == 1


@pytest.mark.slow  # 5-6 s: the fast tier keeps under 2 minutes
def test_bench_gpu_depth_section_splits_the_action_model_into_threads_with_the_whole_models_outputs():
    """The shipped I3D on clip batches, whole and in 2 depth stages of threads (no Ray on the GPU machine)."""
    from blinkflow.bench import gpu

    plan = gpu.Plan(device="cpu", size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=(1,),
                    stream_seconds=1.0, frames=6, quick=True)
    whole, split = gpu.bench_depth(plan, [])
    assert whole["k"] == 1 and whole["clips_per_s"] > 0
    assert split["k"] == 2 and split["placement"] == "2 slices on one cpu", split
    assert split["clips_per_s"] > 0 and split["over_whole"] > 0 and split["max_abs_diff"] <= 1e-4
    assert "| 2 | 2 slices on one cpu |" in gpu.render(replace(plan, results={"depth": [whole, split]}))


def test_bench_gpu_cameras_stamp_each_frame_with_its_capture_time_however_late_it_is_read():
    """A camera does not wait for the graph: a frame read late carries the time it was due (its capture), which
    the frames source makes its latency's start (tests/test_api.py), not the time the graph got to it."""
    import threading
    import time as real_time

    from blinkflow.bench import gpu

    images = gpu.clip_frames(gpu.CLIPS[1], (96, 64), 2)
    camera = gpu.paced(images, 10.0, threading.Event(), 0)
    (first, first_at), _ = next(camera), real_time.sleep(0.35)
    (second, second_at), (third, third_at) = next(camera), next(camera)
    assert abs(first_at - real_time.time() + 0.35) < 0.1  # captured when asked for, 0.35 s ago
    assert abs(second_at - first_at - 0.1) < 1e-6 and abs(third_at - first_at - 0.2) < 1e-6  # due, not read, times
    assert first is images[0] and second is images[1] and third is images[0]


def test_bench_gpu_times_detect_and_segment_compiled_and_without_channels_last_on_a_gpu_only():
    from blinkflow.bench import gpu

    def plan(compile_: bool) -> gpu.Plan:
        return gpu.Plan(device="cuda:0", size=(96, 64), batches=(1, 8), precisions=("fp32", "fp16"), stream_steps=(1,),
                        stream_seconds=1.0, frames=6, quick=False, compile=compile_)

    plain, compiled = gpu.stage_variants(plan(False)), gpu.stage_variants(plan(True))
    assert len(plain) == 4 * 2 * 2 + 2 and all(mode == "off" for *_, mode, _ in plain)
    assert plain[-2:] == [("detect", "fp16", 8, "off", False), ("segment", "fp16", 8, "off", False)]  # channels_last off
    assert all(last for *_, last in plain[:-2])
    assert compiled[len(plain):] == [("detect", "fp16", 8, "reduce-overhead", True),
                                     ("segment", "fp16", 8, "reduce-overhead", True)]
    cpu = gpu.Plan(device="cpu", size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=(1,),
                   stream_seconds=1.0, frames=6, quick=True)
    assert gpu.stage_variants(cpu) == [(task, "fp32", 1, "off", False) for task in ("detect", "segment", "flow", "action")]


class _FakeClock:
    """time.monotonic for the bench's budget: a fake step of the streams section advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def _streams_plan(gpu, steps):
    return gpu.Plan(device="cpu", size=(96, 64), batches=(1,), precisions=("fp32",), stream_steps=steps,
                    stream_seconds=20.0, frames=6, quick=True)


def test_bench_gpu_streams_step_up_then_halve_to_the_largest_n_that_holds(monkeypatch):
    from blinkflow.bench import gpu

    clock, tried = _FakeClock(), []

    def fake_run(plan, images, streams):
        tried.append(streams)
        clock.now += 25.0
        return {"streams": streams, "held": streams <= 27}

    monkeypatch.setattr(gpu, "run_streams", fake_run)
    monkeypatch.setattr(gpu.time, "monotonic", clock.monotonic)
    rows = gpu.bench_streams(_streams_plan(gpu, (1, 8, 16, 32, 40)), [])
    assert tried == [1, 8, 16, 32, 24, 28, 26, 27]  # up until 32 breaks, then halved between 16 .. 32
    assert [row["streams"] for row in rows] == [1, 8, 16, 24, 26, 27, 28, 32]
    plan = _streams_plan(gpu, (1, 8, 16, 32, 40))
    plan.results = {"streams": rows}
    assert "Largest number of streams held: **27**" in gpu.render(plan)


def test_bench_gpu_streams_stop_where_the_next_step_would_pass_the_budget(monkeypatch):
    from blinkflow.bench import gpu

    clock, tried = _FakeClock(), []

    def fake_run(plan, images, streams):
        tried.append(streams)
        clock.now += 25.0 + streams  # more streams, longer setup
        return {"streams": streams, "held": True}

    monkeypatch.setattr(gpu, "run_streams", fake_run)
    monkeypatch.setattr(gpu.time, "monotonic", clock.monotonic)
    plan = _streams_plan(gpu, (1, 8, 16, 32))
    plan.deadline = clock.now + 75.0  # 40 s guessed for the first step; then each step's measured time
    rows = gpu.bench_streams(plan, [])
    assert tried == [1, 8]  # 26 s and 33 s spent; 33 s more would end after the deadline
    assert rows[-1] == {"streams": 16, "skipped": "time budget"}
    plan.results = {"streams": rows}
    report = gpu.render(plan)
    assert "| 16 |" in report and "skipped (time budget)" in report and "1 row(s) did not fit" in report
    assert "Largest number of streams held: **8**" in report


def test_bench_gpu_out_of_time_writes_every_section_as_skipped_and_loads_no_model(tmp_path, monkeypatch):
    """On a GPU with no time left: nothing is started, and the doc says so section by section."""
    import argparse

    import torch

    from blinkflow.bench import gpu

    doc, out = tmp_path / "benchmarks.md", tmp_path / "results"
    monkeypatch.setenv("BLINKFLOW_BENCH_DOC", str(doc))
    monkeypatch.setenv("BLINKFLOW_BENCH_OUT", str(out))
    info = gpu.machine_info()  # this CPU machine's, read before torch is told that a GPU is here
    monkeypatch.setattr(gpu, "machine_info", lambda: info)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    saved = []
    monkeypatch.setattr(gpu, "save_sections", lambda plan: saved.append(dict(plan.results)) or
                        gpu.write_section("gpu", gpu.render(plan)))
    gpu.main(argparse.Namespace(quick=False, no_write=False, budget_s=0.0))
    assert [list(results) for results in saved] == [list(gpu.MEASURE_ORDER[:n]) for n in range(1, 6)]
    text = doc.read_text()
    assert "Decode: skipped (time budget)" in text and "Largest number of streams held: **0**" in text
    assert text.count("skipped (time budget)") == 1 + 1 + 2 + 1 + len(gpu.DEPTH_KS) + len(gpu.stage_variants(gpu.Plan(
        device="cuda:0", size=gpu.SIZE, batches=gpu.BATCHES, precisions=("fp32", "fp16"), stream_steps=(1,),
        stream_seconds=1.0, frames=1, quick=False, compile=True)))
    payload = json.loads((out / "bench-gpu.json").read_text())
    assert payload["label"] == [{"skipping": True, "skipped": "time budget"}, {"skipping": False, "skipped": "time budget"}]


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_a_cpu_and_says_what_it_could_not(tmp_path):
    """tools/gpu-check.sh is run for real only where a GPU is lent: this dry run keeps it from rotting."""
    import os
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run tools/gpu-check.sh itself")
    out = tmp_path / "gpu-out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "BENCH_TIMEOUT": "120"}
    done = subprocess.run(["bash", str(REPO_ROOT / "tools" / "gpu-check.sh")], env=env, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr
    steps = (out / "steps.log").read_text()
    assert "nvidia-smi failed" in steps and "blinkflow already installed from this checkout" in steps
    assert "needs_cuda tests: exit 0" in steps and "bench gpu: exit 2" in steps and "done; outputs in" in steps
    tests = (out / "pytest-needs-cuda.txt").read_text()
    assert re.search(r"\b\d+ skipped\b", tests) and "passed" not in tests and "failed" not in tests
    assert "cuda False" in (out / "machine.txt").read_text()
    assert len([f for f in out.rglob("*") if f.is_file()]) <= 8  # what the device tool brings back
    bench = (out / "bench-gpu.txt").read_text().strip().splitlines()
    assert bench == ["blinkflow: error: blinkflow bench gpu needs a CUDA GPU (none is visible to torch); "
                     "`--quick` runs its code paths on the CPU"]
    assert (out / "benchmarks.md").read_text() == (REPO_ROOT / "docs" / "benchmarks.md").read_text()


def _travel(clone: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/gpu-travel.sh", *args], cwd=clone, capture_output=True, text=True, timeout=120)


def _travel_mib(done: subprocess.CompletedProcess) -> int:
    return int(re.search(r"(\d+) MiB would travel", done.stdout).group(1))


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_gpu_travel_fits_each_device_call_under_its_limit_and_restores_the_index(tmp_path):
    """The device tool refuses a working tree over 64 MiB: the repository alone is over it, so the GPU run
    travels in two slimmed trees (tools/gpu-travel.sh), and the index comes back exactly as it was."""
    import shutil

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO_ROOT), str(clone)], check=True, timeout=120)
    shutil.copy(REPO_ROOT / "tools" / "gpu-travel.sh", clone / "tools" / "gpu-travel.sh")  # as in this checkout
    whole = _travel(clone, "size")
    assert whole.returncode == 1 and _travel_mib(whole) > 64, whole.stdout  # why the script exists
    (clone / "tools" / "wheels").mkdir()
    with open(clone / "tools" / "wheels" / "wheels.tar.xz", "wb") as wheels:
        wheels.truncate(25 * 2**20)  # PyAV and pycocotools, xz'd (tools/fetch-gpu-wheels.sh): 24 MiB

    def tracked(path: str) -> bool:
        return bool(subprocess.run(["git", "ls-files", path], cwd=clone, capture_output=True, text=True).stdout)

    first = _travel(clone, "wheels")
    assert first.returncode == 0 and _travel_mib(first) <= 64, first.stdout + first.stderr
    assert not tracked("models/weights/action-i3d.pt") and (clone / "models/weights/action-i3d.pt").is_file()
    second = _travel(clone, "run")
    assert second.returncode == 0 and _travel_mib(second) <= 64, second.stdout + second.stderr
    assert tracked("models/weights/action-i3d.pt") and tracked("models/weights/detect-yolox_nano.pt")
    assert not tracked("models/weights/segment-unet_small.pt") and not tracked("tests/data/originals")
    assert _travel(clone, "restore").returncode == 0
    staged = subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=clone)
    assert staged.returncode == 0 and tracked("models/weights/segment-unet_small.pt")
    assert "gpu-travel" not in (clone / ".git" / "info" / "exclude").read_text()
    (clone / "README.md").write_text("changed\n")
    subprocess.run(["git", "add", "README.md"], cwd=clone, check=True)
    refused = _travel(clone, "run")  # a commit made while files are out of the index would delete them
    assert refused.returncode == 1 and "staged changes" in refused.stderr
    subprocess.run(["git", "reset", "-q", "--hard"], cwd=clone, check=True)
    # in a worktree .git is a file: the files left the index, the exclude block was never written, restore said "back"
    worktree = tmp_path / "worktree"
    subprocess.run(["git", "worktree", "add", "-q", str(worktree), "HEAD"], cwd=clone, check=True, timeout=120)
    shutil.copy(REPO_ROOT / "tools" / "gpu-travel.sh", worktree / "tools" / "gpu-travel.sh")
    assert _travel(worktree, "run").returncode == 0
    assert _travel(clone, "restore").returncode == 0  # the main checkout's restore leaves the worktree's block alone
    assert _travel(worktree, "restore").returncode == 0
    assert subprocess.run(["git", "diff", "--cached", "--quiet"], cwd=worktree).returncode == 0


def test_plot_skipping_draws_the_points_and_the_target_region(tmp_path):
    from PIL import Image

    from blinkflow.bench.plot import BACKGROUND, GRID, TARGET_FILL, SkipPoint, plot_skipping

    points = [SkipPoint("parking lot", 2.96, 0.950), SkipPoint("room", 4.41, 0.766, lenient=0.970),
              SkipPoint("static clips pooled", 3.59, 0.865, kind="pooled"),
              SkipPoint("room, features", 3.15, 0.965, kind="features")]
    out = plot_skipping(points, (4.0, 0.95), tmp_path / "skipping.png", size=(900, 560))
    image = Image.open(out).convert("RGB")
    assert image.size == (900, 560)
    # axes: x 80..720 for 1..6x, y 500..50 for 0.6..1.0
    def at(less, agreement):
        return image.getpixel((round(80 + 640 * (less - 1) / 5), round(500 - 450 * (agreement - 0.6) / 0.4)))
    assert at(5.5, 0.99) == TARGET_FILL and at(2.5, 0.98) == BACKGROUND  # the target region is shaded, and only it
    assert at(2.96, 0.950) != BACKGROUND and at(3.59, 0.865) != BACKGROUND and at(3.15, 0.965) != BACKGROUND
    assert at(4.41, 0.87) == GRID  # the line up to the lenient reading's ring


def test_skip_points_label_each_clip_and_pool_the_static_ones():
    from blinkflow.bench.skip import ClipReport, real_clips, skip_points

    clips = {clip.name: clip for clip in real_clips(quick=True)}

    def report(name, less, boxes, masks, confident, features=None):
        figures = {"frames": 10, "work_fraction": 1 / less, "less_compute": less, "boxes_f1": boxes, "mask_iou": masks,
                   "agreement": min(boxes, masks), "confident_boxes_f1": confident}
        if features:
            figures["features"] = features
        return ClipReport(clips[name], None, None, figures)

    points = skip_points([report("parking", 3.0, 0.95, 0.96, 0.95, {"less_compute": 3.2, "mask_iou": 0.95}),
                          report("people", 4.4, 0.77, 0.97, 0.98), report("moving", 1.4, 0.9, 0.94, 0.97)])
    assert [(p.label, p.kind) for p in points] == [
        ("parking lot", "clip"), ("parking lot, features", "features"), ("room", "clip"),
        ("bikes.mp4 (moving)", "clip"), ("static clips pooled", "pooled")]
    assert points[2].agreement == 0.77 and points[2].lenient == 0.97  # strict, and ignoring sub-threshold boxes
    assert points[-1].less == pytest.approx(1 / ((1 / 3.0 + 1 / 4.4) / 2))  # the static clips, pooled by frames


def test_the_feature_reuse_table_shows_the_adapted_and_the_fixed_interval_side_by_side():
    from blinkflow.bench.skip import ClipReport, _features_table, real_clips

    parking = {clip.name: clip for clip in real_clips(quick=True)}["parking"]
    fixed = {"warped": 180, "new_content": 9, "frames": 240, "segment_work": 0.315, "less_compute": 3.17,
             "mask_iou": 0.9503, "intervals": None}
    adapted = {"warped": 120, "new_content": 14, "frames": 240, "segment_work": 0.5, "less_compute": 2.0, "mask_iou": 0.9664,
               "intervals": (1, 8), "interval": 4, "segment_time_ratio": 1.4, "fixed": fixed}
    table = _features_table([ClipReport(parking, None, None, {"features": adapted})])
    rows = [line for line in table.splitlines() if line.startswith(f"| {parking.what}")]
    assert rows == [
        f"| {parking.what}, adapted | 120/240 | 14 | 1–8 | 0.500 | **2.00×** | 1.40× | **0.966** | not met |",
        f"| {parking.what}, fixed | 180/240 | 9 | – | 0.315 | **3.17×** | – | **0.950** | met |",
    ]
    assert "between 1 and 8" in table


def test_the_skip_report_puts_each_real_clip_beside_the_recorded_baseline():
    from blinkflow.bench.skip import BASELINE, Clip, ClipReport, _baseline_table, real_clips

    clips = {clip.name: clip for clip in real_clips(quick=True)}
    figures = {"frames": 240, "work_fraction": 1 / 2.95, "less_compute": 2.95, "boxes_f1": 0.95, "mask_iou": 0.953}
    table = _baseline_table([ClipReport(clips["parking"], None, None, figures)])
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]  # after the header
    assert rows == [f"| {clips['parking'].what} | 6.35× → 2.95× | 0.871 → 0.950 | 0.907 → 0.953 |",
                    "| static clips pooled | 5.68× → 2.95× | 0.811 → 0.950 | 0.910 → 0.953 |"]
    assert BASELINE["commit"] in table
    synthetic = ClipReport(Clip("synthetic", "a synthetic scene", {}, 24), None, None, figures)
    assert _baseline_table([synthetic]) == ""  # no baseline was recorded for it


def test_the_skip_report_counts_what_the_gate_spent_where_something_moved():
    from types import SimpleNamespace

    import numpy as np

    from blinkflow.bench.skip import (_moving_agreement_cell, _moving_cell, consecutive_mask_mious, frame_scores,
                                      moving_work)
    from blinkflow.frame import Outcome
    from blinkflow.stages.common import encode_class_map

    def mask(left):  # a 4x4 object on an 8x16 background, its left edge at ``left``
        class_map = np.zeros((8, 16), np.uint8)
        class_map[2:6, left:left + 4] = 7
        return {"mask": {"data": encode_class_map(class_map)}}

    lefts = [2, 2, 2, 6, 10, 10]  # the object moves on frames 3 and 4 only
    off = [SimpleNamespace(index=i, results={"segment": mask(x)}) for i, x in enumerate(lefts)]
    # the gate-on run recomputes frame 3 right and leaves frame 4's object where frame 3 had it
    on = [SimpleNamespace(index=i, outcome=Outcome.PROCESSED if i in (0, 3, 4) else Outcome.REUSED,
                          results={"gate": {"decision": "partial"}, "segment": {**mask(6), "tiles": {"area": 0.5}}}
                          if i in (3, 4) else {"gate": {"decision": "keyframe"}} if i == 0 else {})
          for i in range(len(lefts))]
    figures = moving_work(off, on, {"detect": 0.01, "segment": 0.03})
    assert figures["moving_frames"] == 2
    assert figures["moving_work"] == {"detect": 1.0, "segment": 0.5}
    # frame 3 agrees; frame 4: the objects miss each other (IoU 0), the background overlaps on 96 of 128 pixels
    assert figures["moving_agreement"] == {"boxes_f1": None, "mask_iou": pytest.approx((1.0 + 0.375) / 2)}
    assert _moving_agreement_cell(dict(figures, frames=6)) == "– / 0.688"
    # the moving frames alone: (0.01 * 1 + 0.03 * 0.5) / 0.04 of a frame's work, on 2 frames of 6
    assert figures["moving_ceiling"] == pytest.approx(1 / ((0.025 / 0.04) * 2 / 6))
    # the skip report hands over the scores it already has: the same figures without scoring again
    scored = moving_work(off, on, {"detect": 0.01, "segment": 0.03}, frame_scores(off, on), consecutive_mask_mious(off))
    assert scored == figures
    assert _moving_cell(dict(figures, frames=6)) == "2 of 6, 1.00 / 0.50, 4.80×"
    assert _moving_cell({"frames": 6}) == "–"  # a report without the figures (an older run)
    still = moving_work(off[:3], on[:3], {"detect": 0.01, "segment": 0.03})
    assert _moving_cell(dict(still, frames=3)) == "0 of 3" and _moving_agreement_cell(dict(still, frames=3)) == "–"
    all_reused = [SimpleNamespace(index=r.index, outcome=Outcome.REUSED, results={}) if r.index in (3, 4) else r for r in on]
    reused = moving_work(off, all_reused, {"detect": 0.01, "segment": 0.03})
    assert _moving_cell(dict(reused, frames=6)) == "2 of 6, 0.00 / 0.00, –"  # moved, and the gate spent nothing


def test_the_skip_verdict_claims_a_target_only_where_the_models_had_something_to_agree_on_and_moving_frames_hold():
    from blinkflow.bench.skip import ClipReport, _judged, pooled_real, real_clips

    clips = {c.name: c for c in real_clips(quick=True)}

    def figures(less, agreement, moving=None, boxes=2.0, classes=3.0):
        return {"frames": 100, "work_fraction": 1 / less, "less_compute": less, "agreement": agreement,
                "boxes_f1": agreement, "mask_iou": agreement, "boxes_per_frame": boxes, "classes_per_mask": classes,
                "moving_frames": 40 if moving else 0,
                "moving_agreement": {"boxes_f1": moving, "mask_iou": moving} if moving else None}

    assert _judged(figures(4.2, 0.96, moving=0.97)) == "**met**"
    assert _judged(figures(3.1, 0.97, moving=0.97)) == "**not met**"
    # the average holds, the frames where the cars move do not: a margin-0 gate on the parking lot
    assert _judged(figures(4.1, 0.953, moving=0.902)) == "**met over all frames only**: the moving frames agree at 0.902"
    # models that saw nothing agree with themselves: no boxes and one class
    assert _judged(figures(10.0, 1.0, boxes=0.0, classes=1.0)).startswith("**vacuous**")
    assert _judged(figures(10.0, 1.0, boxes=0.0, classes=2.0)) == "**met**"  # the masks still judge

    # pooled, the moving frames are weighed by their count: 40 at 0.99 and 40 at 0.90
    reports = [ClipReport(clips["parking"], None, None, figures(4.1, 0.953, moving=0.90)),
               ClipReport(clips["people"], None, None, figures(5.0, 0.99, moving=0.99))]
    pooled = pooled_real(reports, ("parking", "people"))
    assert pooled["moving_agreement"]["mask_iou"] == pytest.approx(0.945)
    assert _judged(pooled).startswith("**met over all frames only**")


def test_bench_skip_on_a_video_that_does_not_decode_stops_with_one_line_naming_it(tmp_path, bench_paths):
    from blinkflow.cli import main

    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    for video, named in ((tmp_path / "missing.mp4", "file not found"), (text, "not a readable video")):
        proc = subprocess.run([sys.executable, "-m", "blinkflow.cli", "bench", "skip", "--video", str(video)],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and str(video) in proc.stderr and named in proc.stderr, proc.stderr
    assert main(["bench", "skip", "--video", str(text), "--resize", "640by360"]) == 2


def test_benches_outside_a_checkout_say_so_in_one_line_and_skip_video_finds_its_config(tmp_path, monkeypatch, capsys):
    """An installed wheel has no tests/data nor docs/: the benches that need them say so in one line (they failed
    on a config path under site-packages), and `bench skip --video`, the one for a user's footage, finds the
    shipped configs where the package keeps them."""
    from blinkflow.bench import cli as bench_cli
    from blinkflow.bench import skip
    from blinkflow.cli import main

    monkeypatch.setattr(bench_cli, "REPO_ROOT", tmp_path)  # as installed: nothing but the package around
    monkeypatch.setattr(skip, "REPO_ROOT", tmp_path)
    assert main(["bench", "decode", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "blinkflow bench decode: needs a source checkout" in err, err
    assert skip.default_config("real").is_file() and skip.default_config("synthetic").is_file()
    assert bench_cli.BENCH_CONFIG.is_file()


def test_bench_skip_videos_are_named_by_file_and_size_and_checked_before_any_model_loads(tmp_path):
    from blinkflow.bench.skip import VIDEO_PREFIX, parse_size, video_clips
    from blinkflow.errors import ConfigError, SourceError
    from tests.conftest import write_test_video

    clip = write_test_video(tmp_path / "cam.mp4", frames=3, width=64, height=48)
    own, resized = video_clips([clip], 50, None)[0], video_clips([clip, clip], 50, [32, 24])[1]
    assert (own.name, own.what, own.source.get("resize")) == (f"{VIDEO_PREFIX}1", "cam.mp4 (64×48)", None)
    assert (resized.name, resized.what, resized.source["resize"]) == (f"{VIDEO_PREFIX}2", "cam.mp4 (32×24)", [32, 24])
    assert own.source["max_frames"] == 50 and own.source["path"] == str(clip)
    assert parse_size("640X360") == [640, 360] and parse_size(None) is None
    for bad in ("640", "x360", "8x8", "-640x360", "\u00b2x360"):
        with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
            parse_size(bad)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="empty.mp4"):
        video_clips([clip, empty], 50, None)


@pytest.mark.slow  # the real models on two short videos: about 5 s
def test_bench_skip_measures_the_users_videos_and_leaves_the_docs_alone(capsys, bench_paths, real_media):
    import argparse

    from blinkflow.bench import skip

    doc = bench_paths / "benchmarks.md"
    videos = [real_media / "static" / "car-detection-19s.mp4", real_media / "video" / "tree.avi"]
    args = argparse.Namespace(quick=False, no_write=False, clips="real", config=None, repetitions=1, frames=16,
                              gate_from_config=False, overrides=[], video=videos, resize="192x108")
    result = skip.main(args)
    out = capsys.readouterr().out
    assert not doc.exists()  # the docs hold the shipped clips' figures, never a user's
    assert set(result["clips"]) == {"video-1", "video-2"}
    assert all(figures["frames"] == 16 for figures in result["clips"].values())  # --frames caps each video
    lines = out.splitlines()
    header = next(n for n, line in enumerate(lines) if line.startswith("| clip | frames | model work fraction"))
    assert [line.split("|")[1].strip() for line in lines[header + 2 : header + 4]] == [
        "car-detection-19s.mp4 (192×108)", "tree.avi (192×108)"]
    assert not lines[header + 4].startswith("|")
    yours = next(line for line in out.splitlines() if line.startswith("Your videos"))
    verdicts = re.findall(r" — \*\*(met|not met|vacuous|met over all frames only)\*\*", yours)
    assert len(verdicts) == 3, yours  # each video and their pool
    assert "Pooled, your videos, over their 32 frames" in yours
    assert "Targets. Real static cameras" not in out and "Against the baseline" not in out
    assert "\n\n\n" not in out  # sections with nothing to say leave no gaps


@pytest.mark.slow  # the real models on the quick clips: about 25 s
def test_bench_skip_quick_names_what_changed_the_judge_and_gives_every_clip_a_verdict(capsys, bench_paths):
    import argparse

    from blinkflow.bench import skip

    args = argparse.Namespace(quick=True, no_write=True, clips="real", config=None, repetitions=1,
                              gate_from_config=False,
                              overrides=["stages.segment.options.keep_margin=2", "gate.tile_margin=0"])
    result = skip.main(args)
    out = capsys.readouterr().out
    intro = next(line for line in out.splitlines() if line.startswith("`blinkflow bench skip`"))
    assert "with stages.segment.options.keep_margin=2 on both sides (the judge changes with them)" in intro
    assert "Gate: GateConfig defaults with gate.tile_margin=0" in intro
    targets = next(line for line in out.splitlines() if line.startswith("Targets."))
    verdicts = re.findall(r" — \*\*(met|not met|vacuous|met over all frames only)\*\*", targets)
    assert len(verdicts) == len(skip.REAL_STATIC) + 2  # every clip and both pools
    assert set(result["clips"]) == {"parking", "people", "tree", "moving"}


def test_the_price_is_measured_in_a_process_of_its_own(monkeypatch):
    """After the bench's other runs the price read +3.1% to +3.5% (their held results walked by every garbage
    collection, their allocations scattering the heap), +2.6% to +2.9% in a process of its own."""
    import os
    import types

    from blinkflow.bench import skip

    assert skip.in_fresh_process(os.getpid) != os.getpid()
    called = []
    monkeypatch.setattr(skip, "in_fresh_process", lambda function, *args: called.append((function, args)) or {"x": 1})
    clip = types.SimpleNamespace(name="moving")
    assert skip.measure_price({"r": 1}, clip, {}, ["gate.blur=1"], 3) == {"x": 1}
    assert called == [(skip.price_here, ({"r": 1}, clip, {}, ["gate.blur=1"], 3))]


def test_a_fresh_process_that_dies_is_an_error_not_a_wait_for_ever():
    """A Pool started another worker for the dead one and waited for its answer for ever (a script without a
    __main__ guard spawned itself until killed)."""
    import os
    from concurrent.futures.process import BrokenProcessPool

    from blinkflow.bench import skip

    with pytest.raises(BrokenProcessPool):
        skip.in_fresh_process(os._exit, 3)
