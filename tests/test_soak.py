"""Long-running behaviour on the Ray runner against a real RTSP server (issue #24, docs/security.md):

* a bounded soak: a looping live camera for ``BLINKFLOW_SOAK_S`` seconds (60 by default) through
  ``blinkflow run``; the resident memory of the whole process tree (driver, Ray's raylet, GCS and
  workers) stays flat and every decoded frame has exactly one outcome and one record;
* chaos: stage actors killed and the RTSP server killed and restarted at seeded random moments while
  a live stream and a file lane run; the accounting still adds up, frame by frame.

``BLINKFLOW_SOAK_REPORT=path.json`` keeps the soak's memory samples (docs/security.md quotes a run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_streams import RtspServer, needs_rtsp, wait_until

ray = pytest.importorskip("ray")

SOAK_S = float(os.environ.get("BLINKFLOW_SOAK_S", "60"))
#: the soak's memory may grow by this much (MiB) between its middle third and its last third (allocator noise):
#: the whole process tree (Ray's processes hold about 3 GiB), and the driver alone
TREE_SLACK_MB, DRIVER_SLACK_MB = 64.0, 32.0
LOST = "runtime: lost: the stage actor holding it restarted"


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MiB (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            continue
        total += pages * os.sysconf("SC_PAGE_SIZE")
    return total / 2**20


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
@needs_rtsp
@pytest.mark.timeout(int(SOAK_S) + 240)
def test_soak_a_looping_camera_on_ray_keeps_memory_flat_and_every_frame_accounted(tmp_path, real_media):
    server = RtspServer({"cam": real_media / "video" / "bikes.mp4"}).start()
    out = tmp_path / "cam.jsonl"
    config = tmp_path / "soak.yaml"
    config.write_text(json.dumps({
        "sources": [{"type": "stream", "id": "cam", "url": server.url("cam"), "resize": [160, 120],
                     "backoff_initial_s": 0.1, "backoff_max_s": 0.5}],  # the clip ends: the stream reconnects
        "gate": {"enabled": True},
        "stages": {"chaos": {"batch": 2, "replicas": 2, "options": {"sleep_ms": 5}}},
        "sinks": [{"type": "jsonl", "path": str(out)}],
        "runtime": {"runner": "ray", "mode": "live", "num_cpus": 4},  # 3 actors
    }))
    proc = subprocess.Popen([sys.executable, "-m", "blinkflow.cli", "run", str(config), "--no-progress",
                             "--summary-json", str(tmp_path / "summary.json")],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    samples: list[tuple[float, float, float]] = []
    try:
        wait_until(lambda: proc.poll() is not None or (out.exists() and out.stat().st_size > 0), 120,
                   "the first records")
        assert proc.poll() is None, proc.communicate()
        started = time.monotonic()
        while time.monotonic() - started < SOAK_S and proc.poll() is None:
            samples.append((round(time.monotonic() - started, 1), round(tree_rss_mb(proc.pid), 1),
                            round(rss_mb(proc.pid), 1)))
            time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, stderr[-3000:]  # a live run stopped by a signal ends cleanly (docs/streams.md)

    summary = json.loads((tmp_path / "summary.json").read_text())
    totals, records = summary["totals"], _records(out)
    assert totals["decoded"] == sum(totals[o] for o in ("processed", "reused", "dropped", "failed"))
    assert len(records) == totals["decoded"] and [r["index"] for r in records] == list(range(len(records)))
    assert totals["failed"] == 0 and totals["processed"] > 0

    report = {"seconds": SOAK_S, "frames": totals, "samples (s, tree MiB, driver MiB)": samples,
              "tree": _growth([tree for _, tree, _ in samples]), "driver": _growth([own for _, _, own in samples])}
    if os.environ.get("BLINKFLOW_SOAK_REPORT"):
        Path(os.environ["BLINKFLOW_SOAK_REPORT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert len(samples) >= 0.8 * SOAK_S, "the run ended early"
    assert report["tree"]["growth_mb"] <= TREE_SLACK_MB and report["driver"]["growth_mb"] <= DRIVER_SLACK_MB, report


def _growth(values: list[float]) -> dict[str, float]:
    """Median of the middle third, of the last third, and the growth between them (the first third warms up)."""
    third = max(1, len(values) // 3)
    middle, last = statistics.median(values[third:2 * third]), statistics.median(values[-third:])
    return {"middle_mb": round(middle, 1), "last_mb": round(last, 1), "growth_mb": round(last - middle, 1)}


# --------------------------------------------------------------------------- chaos


class ChaosMonkey(threading.Thread):
    """At seeded random moments: kill a stage actor (Ray restarts it) or kill the RTSP server and start it
    again on the same port. Each kind happens at least twice."""

    def __init__(self, runner, server: RtspServer, seed: int = 24, rounds: int = 6) -> None:
        super().__init__(name="chaos-monkey", daemon=True)
        self.runner, self.server, self.rng = runner, server, random.Random(seed)
        self.plan = ["actor", "server"] * 2 + [self.rng.choice(["actor", "server"]) for _ in range(rounds - 4)]
        self.rng.shuffle(self.plan)
        self.done: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            wait_until(lambda: self.runner.pools and self.runner.accounting.totals()["processed"] >= 10, 120,
                       "the run to get going")
            for action in self.plan:
                time.sleep(self.rng.uniform(0.5, 2.5))
                if action == "actor":
                    pool = self.rng.choice(self.runner.pools)
                    before = self.runner.accounting.totals()["processed"]
                    ray.kill(self.rng.choice(pool.actors), no_restart=False)
                    # faults one at a time: the next waits until frames flow again past everything that was
                    # in flight (4 chains of 2). A kill during the one retry of the last fails its frames by
                    # design ("actor died twice"), and on a loaded machine a restart outlasts the 0.5-2.5 s gap
                    wait_until(lambda: self.runner.accounting.totals()["processed"] >= before + 12, 120,
                               "frames to flow again after an actor was killed")
                else:
                    self.server.kill()
                    time.sleep(self.rng.uniform(0.2, 1.5))
                    self.server.start()
                self.done.append(action)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


@pytest.mark.slow
@needs_rtsp
@pytest.mark.timeout(300)
def test_chaos_killed_actors_and_a_killed_rtsp_server_leave_every_frame_accounted(real_media):
    from blinkflow.config import load_config
    from blinkflow.ray_session import ray_session
    from blinkflow.runners.ray import RayRunner
    from blinkflow.sinks import MemorySink
    from blinkflow.streams import StreamHub

    server = RtspServer({"cam": real_media / "video" / "bikes.mp4"}).start()
    cfg = load_config(data={
        "sources": [{"type": "stream", "id": "cam", "url": server.url("cam"), "resize": [96, 72],
                     "backoff_initial_s": 0.1, "backoff_max_s": 0.5, "stall_timeout_s": 2},
                    {"type": "synthetic", "id": "scene", "width": 64, "height": 48, "num_frames": 400}],
        "stages": {"chaos": {"batch": 2, "replicas": 2, "options": {"sleep_ms": 10}},
                   "segment": {"model": "unet_small", "weights": None, "batch": 2,
                               "options": {"input_size": [32, 32]}}},
        "runtime": {"runner": "ray", "mode": "live", "max_in_flight": 4},
    })
    hub, sink = StreamHub(mode="live"), MemorySink()
    with ray_session(num_cpus=4):  # gate, 2 chaos and a segment actor
        runner = RayRunner(cfg, sinks=[sink], hub=hub, on_result=hub.observe)
        monkey = ChaosMonkey(runner, server)
        outcome: dict = {}
        run = threading.Thread(target=lambda: outcome.update(summary=runner.run()), daemon=True)
        run.start()
        monkey.start()
        try:
            monkey.join(timeout=180)
            assert monkey.error is None, monkey.error
            assert sorted(monkey.done) == sorted(monkey.plan), "every planned fault was injected"
            wait_until(lambda: hub.status()["streams"][0]["state"] == "up", 30, "the camera back after the last fault")
        finally:
            hub.close(stop_streams=True)
            run.join(timeout=120)
            server.stop()
    assert not run.is_alive(), "the run did not end"
    summary = outcome["summary"]
    totals = summary.totals
    assert totals["decoded"] == sum(totals[o] for o in ("processed", "reused", "dropped", "failed"))
    for stream in ("cam", "scene"):  # exactly one result per decoded frame, in order
        indices = [r.index for r in sink.results if r.stream_id == stream]
        assert indices == list(range(summary.accounting.decoded[stream])), stream
    assert summary.accounting.decoded["scene"] == 400
    failed = [r for r in sink.results if r.outcome.value == "failed"]
    assert all(r.error == LOST for r in failed), {r.error for r in failed}
    assert totals["processed"] >= 0.9 * (totals["decoded"] - totals["dropped"])  # retried, not given up
    (camera,) = hub.status()["ended"]
    assert camera["reconnects"] >= monkey.done.count("server")
    assert camera["decoded"] == summary.accounting.decoded["cam"]
