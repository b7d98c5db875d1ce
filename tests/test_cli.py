"""End-to-end: the CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import av
import pytest

from tests.conftest import REPO_ROOT, write_test_video


def blinkflow(*args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blinkflow.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.mark.slow
def test_demo_writes_jsonl_and_mp4_with_all_four_stages(tmp_path):
    out = tmp_path / "out"
    proc = blinkflow("demo", "--out", str(out), "--no-progress", "--set", "sources.0.max_frames=8")
    assert proc.returncode == 0, proc.stderr
    assert "frames: 8 decoded" in proc.stdout
    records = [json.loads(line) for line in (out / "demo.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(8))
    processed = [r for r in records if r["outcome"] == "processed"]
    assert processed, "the gate must let keyframes through"
    for record in processed:
        assert {"detect", "segment", "action"} <= set(record)
    assert all("flow" in r for r in processed[1:])
    with av.open(str(out / "demo.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    summary = json.loads((out / "demo-summary.json").read_text())
    assert summary["totals"]["decoded"] == 8


@pytest.mark.slow
def test_the_demo_labels_the_real_clips_cars_and_bicycles_with_coco_names(tmp_path):
    """The README's first command on the shipped street clip: real COCO boxes, VOC masks, Kinetics labels."""
    out = tmp_path / "out"
    proc = blinkflow("demo", "--out", str(out), "--no-progress", cwd=tmp_path)  # from anywhere, not the repository
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "demo.jsonl").read_text().splitlines()]
    assert len(records) == 50
    boxes = Counter(name for r in records for name in (r.get("detect") or {}).get("classes", []))
    masks = Counter(name for r in records for name in (r.get("segment") or {}).get("areas", {}))
    assert boxes["car"] >= 10 and boxes["bicycle"] >= 5 and boxes["person"] >= 5, boxes  # measured 39, 10, 23
    assert masks["bicycle"] >= 5 and masks["car"] + masks["bus"] >= 5, masks
    assert all(r["action"]["top"][0]["label"] for r in records if r.get("action"))


@pytest.mark.slow
def test_run_on_a_file_with_a_set_override(tmp_path):
    write_test_video(tmp_path / "in.mp4", frames=6)
    config = tmp_path / "c.yaml"
    config.write_text(
        "sources:\n  - {type: file, path: in.mp4}\n"
        "stages:\n  segment: {model: unet_small, batch: 2}\n"
        "sinks:\n  - {type: jsonl, path: out.jsonl}\n"
    )
    proc = blinkflow("run", str(config), "--no-progress", "--set", "stages.segment.options.input_size=[32, 32]", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "frames: 6 decoded = 6 processed" in proc.stdout
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["segment"]["mask"]["width"] == 64 for line in lines)


def test_corrupt_input_gives_one_line_error_and_exit_1(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    config = tmp_path / "c.yaml"
    config.write_text(f"sources:\n  - {{type: file, path: {bad}}}\nstages: {{}}\n")
    proc = blinkflow("run", str(config), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stdout + proc.stderr
    assert "frames: 0 decoded" in proc.stdout


def test_unknown_command_line_config_path_is_a_clear_error(tmp_path):
    proc = blinkflow("run", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("blinkflow: error:") and "missing.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_progress_bar_knows_the_total_when_the_sources_can_say(tmp_path):
    """It showed '10frame [01:21…]' with no total for a file of known length."""
    from blinkflow.cli import expected_frames
    from blinkflow.config import load_config
    from tests.conftest import write_test_video

    clip = write_test_video(tmp_path / "clip.mp4", frames=7)
    files = load_config(data={"sources": [{"type": "file", "path": str(clip)},
                                          {"type": "synthetic", "num_frames": 5}], "stages": {"chaos": {}}})
    assert expected_frames(files) == 12
    folder = load_config(data={"sources": [{"type": "dir", "path": str(tmp_path)}], "stages": {"chaos": {}}})
    assert expected_frames(folder) is None
    resampled = load_config(data={"sources": [{"type": "file", "path": str(clip), "fps": 2}], "stages": {"chaos": {}}})
    assert expected_frames(resampled) is None


def test_an_option_of_another_benchmark_is_refused_before_anything_is_measured(capsys):
    """`bench decode --video X` measured the shipped clips and rewrote docs/benchmarks.md."""
    from blinkflow.cli import main

    assert main(["bench", "decode", "--video", "mine.mp4"]) == 2
    assert "--video: an option of `blinkflow bench skip`, not of decode; drop it" in capsys.readouterr().err
    assert main(["bench", "stages", "--budget-s", "5"]) == 2
    assert main(["bench", "models", "--clips", "real"]) == 2  # its default value, given: still given


def test_a_summary_json_folder_is_refused_before_the_run(tmp_path, capsys):
    from blinkflow.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("sources: [{type: synthetic, num_frames: 2}]\nstages: {chaos: {options: {sleep_ms: 5000}}}\n")
    assert main(["run", str(config), "--summary-json", str(tmp_path), "--no-progress"]) == 2  # not after 10 s of work
    assert f"--summary-json {tmp_path}: is a folder" in capsys.readouterr().err


def test_a_run_without_sources_is_refused_before_the_models_load(tmp_path, capsys):
    """sources: [] (or the label config, configs/archive.yaml) loaded the models and exited 0 with 0 frames."""
    from blinkflow.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("sources: []\nstages: {chaos: {}}\n")
    assert main(["run", str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (
        "blinkflow: error: sources: none given; add one (or use `blinkflow label` for a label config / enable control "
        "to add streams at run time)")
    assert main(["validate", str(REPO_ROOT / "configs" / "archive.yaml")]) == 0  # a label config is still valid


@pytest.mark.parametrize("argv, message", [
    (["--repetitions", "0"], "argument --repetitions: 0 is below 1"),
    (["--frames", "0"], "argument --frames: 0 is below 1"),
    (["--budget-s", "-1"], "argument --budget-s: -1 is not a time"),
    (["--budget-s", "nan"], "argument --budget-s: nan is not a time"),
])
def test_bench_counts_and_budgets_are_checked_by_argparse(argv, message, capsys, monkeypatch):
    import blinkflow.bench.cli as bench_cli
    from blinkflow.cli import main

    monkeypatch.setattr(bench_cli, "cmd_bench", lambda args: 0)  # accepted, nothing is measured
    with pytest.raises(SystemExit) as info:
        main(["bench", "gpu" if argv[0] == "--budget-s" else "pipeline", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_skip_resize_without_a_video_is_refused(capsys, monkeypatch):
    """It was ignored: the shipped clips decode at their own size."""
    import blinkflow.bench.cli as bench_cli
    from blinkflow.cli import main

    measured = []
    monkeypatch.setattr(bench_cli, "run_skip", measured.append)
    assert main(["bench", "skip", "--resize", "64x48"]) == 2
    assert "blinkflow: error: --resize: sizes the decode of --video only; add --video PATH, or drop --resize" in \
        capsys.readouterr().err
    assert not measured


def test_the_summary_is_written_before_the_metrics_wait_for_a_final_scrape(tmp_path, monkeypatch, capsys):
    """The wait (up to 30 s) came first: a container's stop grace period killed the process in it, and the summary
    and --summary-json were never written."""
    from blinkflow import metrics
    from blinkflow.cli import main

    summary = tmp_path / "summary.json"
    seen_at_linger = []
    monkeypatch.setattr(metrics, "linger_for_last_scrape",
                        lambda exporter, finished_at: seen_at_linger.append((summary.is_file(), capsys.readouterr().out)))
    config = tmp_path / "c.yaml"
    config.write_text("sources: [{type: synthetic, num_frames: 2}]\nstages: {chaos: {}}\n"
                      "metrics: {enabled: true, port: 0}\n")
    assert main(["run", str(config), "--no-progress", "--summary-json", str(summary)]) == 0
    assert len(seen_at_linger) == 1 and seen_at_linger[0][0] and "frames" in seen_at_linger[0][1]
