"""``blinkflow bench``: side-by-side measurements in one process.

Every benchmark records the machine, the commit, the config and the
repetitions (min, median, max), prints a table, and rewrites its own section of
``docs/benchmarks.md`` between ``<!-- bench:NAME -->`` markers, so benchmarks
can be rerun one at a time. Ratios are the headline: on a shared 2-core CI
machine absolute times say little, ratios measured side by side say a lot.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
BENCH_DOC = REPO_ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = REPO_ROOT / "out" / "bench"


def bench_doc() -> Path:
    """The benchmarks document; ``BLINKFLOW_BENCH_DOC`` points it elsewhere (tests do)."""
    return Path(os.environ.get("BLINKFLOW_BENCH_DOC") or BENCH_DOC)


def results_dir() -> Path:
    """Where each benchmark saves its JSON (``BLINKFLOW_BENCH_OUT`` overrides); the plot reads it back."""
    return Path(os.environ.get("BLINKFLOW_BENCH_OUT") or RESULTS_DIR)


@dataclass
class Measurement:
    """Repeated timings of one variant; ``frames`` per repetition."""

    name: str
    seconds: list[float] = field(default_factory=list)
    frames: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_fps(self) -> float:
        return self.frames / statistics.median(self.seconds) if self.seconds else 0.0

    def fps_range(self) -> tuple[float, float, float]:
        rates = sorted(self.frames / s for s in self.seconds if s > 0)
        return (rates[0], statistics.median(rates), rates[-1]) if rates else (0.0, 0.0, 0.0)


def display_path(path: Path) -> str:
    """A path as the docs show it: relative to the repository when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def machine_info() -> dict[str, Any]:
    info = {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def repeat(name: str, fn: Callable[[], int], repetitions: int, warmup: int = 0) -> Measurement:
    """Time ``fn`` (which returns the frames it handled) ``repetitions`` times."""
    for _ in range(warmup):
        fn()
    measurement = Measurement(name)
    for _ in range(repetitions):
        started = time.perf_counter()
        measurement.frames = fn()
        measurement.seconds.append(time.perf_counter() - started)
    return measurement


def fps_cell(m: Measurement) -> str:
    low, mid, high = m.fps_range()
    return f"{mid:.2f} ({low:.2f}–{high:.2f})"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores{gpu}; Python {info['python']}, torch {info.get('torch')}; "
        f"commit {info['commit']}; {info['date']}."
    )


def publish(name: str, body: str, payload: dict[str, Any], write: bool) -> None:
    """Show a benchmark's table on stdout (the command's output); with ``write``, also its
    section of the benchmarks doc and its JSON (what the throughput plot reads)."""
    sys.stdout.write(body.rstrip() + "\n")
    if write:
        write_section(name, body)
        save_json(name, payload)


def write_section(name: str, body: str, doc: Path | None = None) -> None:
    """Replace (or append) the ``<!-- bench:name -->`` section of the benchmarks doc."""
    doc = bench_doc() if doc is None else doc
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nRegenerate with `blinkflow bench all`.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def save_json(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Save one benchmark's figures as ``bench-NAME.json`` for the plot and for later comparison."""
    out_dir = results_dir() if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
