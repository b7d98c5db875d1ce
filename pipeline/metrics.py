"""Metrics behind a thin interface (ARCHITECTURE convention 7).

Runners and stage callers report what happens through a :class:`MetricsRecorder`
that is injected into them; the default records nothing. This is the only
module that knows prometheus-client:

* :class:`PrometheusRecorder` turns the reports into Prometheus metrics in its
  own ``CollectorRegistry`` (never the global one, so several can coexist).
* :class:`MetricsExporter` serves ``/metrics``, ``/healthz`` and ``/readyz``
  from a small threaded HTTP server.
* :class:`CallLog` buffers stage calls inside a Ray actor, and
  :class:`ActorStats` folds what the driver drains from the actors into the
  driver's recorder, keeping totals monotonic across actor restarts.

Every metric lives in the driver: frame outcomes come from the ordered output,
stage timings from the actors via the driver. One scrape target per pipeline.
The metric reference is docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Iterator

from blinkflow.http_service import HTTPService, ServiceHandler
from blinkflow.redact import redacted_label

log = logging.getLogger(__name__)

STAGE_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OUTCOMES = ("processed", "reused", "dropped", "failed")
FPS_WINDOW_S = 1.0
#: the audit-agreement gauge is the mean of the audits of the last this many seconds (alerts use the counters)
AUDIT_WINDOW_S = 300.0
#: a stream removed on purpose (DELETE /streams/ID) keeps its series this long after its end, so a scrape or
#: two still read its final counts; then they go (ids cycled by a tool do not grow the series without end).
#: Its stream_up goes at once: a 0 held that long fired the one-minute BlinkflowStreamDown page for a camera
#: the operator removed
REMOVED_SERIES_S = 120.0
#: a stream with no result for this long (and three of its usual gaps) reads 0 results a second at a scrape
STALL_S = 5.0
STAGE_TOTAL_FIELDS = ("seconds", "frames", "calls", "errors")


class MetricsRecorder:
    """What runners report. Every method is a no-op here; recorders override what they use.

    Methods are called from the driver thread (the local runner's only thread),
    except :meth:`on_stage_call`, which a :class:`CallLog` also receives inside
    a Ray actor.
    """

    def on_ready(self, ready: bool) -> None:
        """Stages are set up and the run is going (True), or the run is over (False)."""

    def on_stage_call(self, stage: str, seconds: float, frames: int, errors: int) -> None:
        """One call of a stage: its wall time, the frames it got, the frames that failed in it."""

    def on_queue(self, stage: str, depth: int, in_flight: int) -> None:
        """Calls waiting for a stage replica, and calls submitted to it and not yet finished."""

    def on_restart(self, stage: str) -> None:
        """A replica of the stage was restarted (its actor died)."""

    def on_decoded(self, frame: Any) -> None:
        """A frame came out of a source. ``frame.meta['reconnects']``, when a live
        source sets it, is that stream's reconnect count so far."""

    def on_result(self, result: Any) -> None:
        """A FrameResult left the pipeline (once per decoded frame)."""

    def on_stream_state(self, stream: str, up: bool, failed: bool = False) -> None:
        """A stream started delivering frames (up) or ended (down: its StreamEnd reached the runner; ``failed``:
        with an error)."""

    def on_stream_event(self, stream: str, kind: str, failed: bool = False) -> None:
        """A live stream's own news (``streams.StreamEvent`` kinds: connecting, up, down, ended, stopped, and
        removed when the operator removed it; ``failed``: it ended with an error)."""

    def on_reconnect(self, stream: str) -> None:
        """A live stream reconnected once more."""

    def on_audit(self, stream: str, agreement: float) -> None:
        """An audit frame: how far the would-be carried-over results agreed with a fresh run (0..1)."""

    def on_device(self, device: str, process: str, allocated_bytes: int, reserved_bytes: int,
                  utilization: float | None) -> None:
        """GPU memory held by one process on one device, and the device's utilisation (0..1)."""

    def on_device_gone(self, device: str, process: str) -> None:
        """A process no longer holds memory on the device (its actor restarted, perhaps elsewhere)."""


NULL_RECORDER = MetricsRecorder()


# --------------------------------------------------------------------------- push sinks


class SinkLedger:
    """Messages of the push sinks (mqtt, webhook), process-wide: delivered, dropped by reason, pending.

    Sinks are built apart from the run's recorder and report from their own sender threads, so they
    count here and every :class:`PrometheusRecorder` exports these counts when it is scraped.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.delivered: dict[str, int] = {}
        self.dropped: dict[tuple[str, str], int] = {}
        self.pending: dict[str, int] = {}

    def count_delivered(self, sink: str, n: int = 1) -> None:
        with self._lock:
            self.delivered[sink] = self.delivered.get(sink, 0) + n

    def count_dropped(self, sink: str, reason: str, n: int = 1) -> None:
        with self._lock:
            self.dropped[(sink, reason)] = self.dropped.get((sink, reason), 0) + n

    def add_pending(self, sink: str, delta: int) -> None:
        with self._lock:
            self.pending[sink] = self.pending.get(sink, 0) + delta

    def snapshot(self) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[str, int]]:
        with self._lock:
            return dict(self.delivered), dict(self.dropped), dict(self.pending)


SINK_LEDGER = SinkLedger()


def _labels(metric: Any, *values: Any) -> Any:
    """``metric``'s child for these label values, scrubbed of credentials (pipeline/redact.py): every
    series Blinkflow creates goes through here, so no label can carry a secret to a scraper."""
    return metric.labels(*(redacted_label(v) for v in values))


class _SinkCollector:
    """Exports a :class:`SinkLedger` at scrape time."""

    def __init__(self, ledger: SinkLedger) -> None:
        self.ledger = ledger

    def describe(self) -> list[Any]:
        return list(self._families({}, {}, {}))

    def collect(self) -> Iterator[Any]:
        return self._families(*self.ledger.snapshot())

    @staticmethod
    def _families(delivered: dict, dropped: dict, pending: dict) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        done = CounterMetricFamily("blinkflow_sink_delivered", "Messages a push sink delivered (acknowledged)",
                                   labels=["sink"])
        for sink, n in sorted(delivered.items()):
            done.add_metric([redacted_label(sink)], n)
        lost = CounterMetricFamily("blinkflow_sink_dropped", "Messages a push sink dropped: overflow (buffer full, "
                                   "oldest dropped), failed (retries spent), rejected (4xx), close (undelivered at "
                                   "the end)", labels=["sink", "reason"])
        for (sink, reason), n in sorted(dropped.items()):
            lost.add_metric([redacted_label(sink), reason], n)
        waiting = GaugeMetricFamily("blinkflow_sink_pending", "Messages a push sink holds, not yet delivered",
                                    labels=["sink"])
        for sink, n in sorted(pending.items()):
            waiting.add_metric([redacted_label(sink)], n)
        yield from (done, lost, waiting)


# --------------------------------------------------------------------------- inside Ray actors


class CallLog(MetricsRecorder):
    """Stage calls buffered inside a Ray actor until the driver drains them.

    ``incarnation`` is new each time the actor's constructor runs, so the driver
    can tell a restarted actor (whose totals start again from zero) from a live one.
    """

    def __init__(self, max_calls: int = 10_000) -> None:
        self.incarnation = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.calls: deque[tuple[float, int, int]] = deque(maxlen=max_calls)

    def on_stage_call(self, stage: str, seconds: float, frames: int, errors: int) -> None:
        self.calls.append((seconds, frames, errors))

    def drain(self, totals: dict[str, float], process: str) -> dict[str, Any]:
        """The calls since the last drain, this incarnation's running totals, and its GPU memory."""
        calls = list(self.calls)
        self.calls.clear()
        return {"incarnation": self.incarnation, "totals": dict(totals), "calls": calls,
                "devices": local_gpu_stats(process)}


@dataclass
class ActorStats:
    """Folds actor snapshots into the driver's recorder.

    Stage calls are replayed into the recorder, so its counters only ever go
    up. The per-stage ``totals`` (for the run summary) add each actor's delta
    since its last snapshot; a new incarnation, or a total smaller than before,
    means the actor restarted, and its totals become the new baseline.
    """

    metrics: MetricsRecorder
    totals: dict[str, dict[str, float]] = field(default_factory=dict)
    last: dict[tuple[str, int], tuple[str, dict[str, float]]] = field(default_factory=dict)
    devices: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # the devices each replica reported last

    def started(self, stage: str, replica: int, incarnation: str) -> None:
        """A replica's first incarnation is up: one that dies before its first drain still counts as a restart."""
        self.last.setdefault((stage, replica), (incarnation, {}))

    def absorb(self, stage: str, replica: int, snapshot: dict[str, Any]) -> None:
        previous = self.last.get((stage, replica))
        restarted = previous is not None and previous[0] != snapshot["incarnation"]
        if restarted:
            log.info("stage %s replica %d restarted (incarnation %s)", stage, replica, snapshot["incarnation"])
            self.metrics.on_restart(stage)
        baseline = previous[1] if previous is not None and not restarted else {}
        stage_totals = self.totals.setdefault(stage, dict.fromkeys(STAGE_TOTAL_FIELDS, 0.0))
        for name in STAGE_TOTAL_FIELDS:
            now, before = snapshot["totals"].get(name, 0.0), baseline.get(name, 0.0)
            stage_totals[name] += now - before if now >= before else now
        self.last[(stage, replica)] = (snapshot["incarnation"], dict(snapshot["totals"]))
        for seconds, frames, errors in snapshot["calls"]:
            self.metrics.on_stage_call(stage, seconds, frames, errors)
        self._absorb_devices(stage, replica, snapshot.get("devices", []))

    def _absorb_devices(self, stage: str, replica: int, devices: list[dict[str, Any]]) -> None:
        """Each replica's GPU memory under a process label of its own (replicas sharing a GPU each count); a
        device it no longer reports (restarted on another node) is dropped, not left at its old value."""
        process = f"{stage}/{replica}"
        now = {device["device"] for device in devices}
        for gone in self.devices.get((stage, replica), set()) - now:
            self.metrics.on_device_gone(gone, process)
        self.devices[(stage, replica)] = now
        for device in devices:
            self.metrics.on_device(**{**device, "process": process})


def local_gpu_stats(process: str) -> list[dict[str, Any]]:
    """GPU memory this process holds, per visible device; empty without CUDA in use.

    Only looks when torch is already imported and CUDA already initialised, so
    asking never loads torch nor creates a CUDA context.
    """
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)  # None while another thread is still importing torch
    try:
        if cuda is None or not cuda.is_available() or not cuda.is_initialized():
            return []
    except Exception:  # noqa: BLE001 - torch half imported: no GPU figures this scrape, the rest still served
        return []
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    host = socket.gethostname()
    stats = []
    for index in range(torch.cuda.device_count()):
        physical = visible[index] if index < len(visible) else str(index)
        try:
            utilization = torch.cuda.utilization(index) / 100.0
        except Exception:  # noqa: BLE001 - needs NVML (nvidia-ml-py); memory is still worth reporting
            utilization = None
        stats.append({
            "device": f"{host}/cuda:{physical}", "process": process,
            "allocated_bytes": int(torch.cuda.memory_allocated(index)),
            "reserved_bytes": int(torch.cuda.memory_reserved(index)),
            "utilization": utilization,
        })
    return stats


# --------------------------------------------------------------------------- Prometheus


@dataclass
class _StreamSeries:
    """One stream's metric children and the running counts behind its gauges."""

    outcomes: dict[str, Any]
    decoded: Any
    latency: Any
    fps: Any
    skip_ratio: Any
    up: Any
    reconnects: Any
    audit_agreement: Any = None  # created at the first audit, so unaudited streams show no ratio
    audited: Any = None
    threshold: Any = None  # created at the first gate decision, so streams without a gate show none
    audit_sum: Any = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    is_up: bool = False
    live: bool = False  # a live stream: up and down come from its own events, not from frames arriving
    reconnects_seen: int = 0
    audits: deque = field(default_factory=deque)  # (monotonic time, agreement) of the last AUDIT_WINDOW_S
    window_start: float = field(default_factory=lambda: time.monotonic())
    window_frames: int = 0
    last_result_at: float | None = None
    result_gap: float = 0.0  # seconds between its last two results: a slow stream's quiet is not a stall
    zones: set = field(default_factory=set)  # zones whose object counts this stream set
    removed: bool = False  # removed by the operator, or ended as it should: no stream_up, its series go later
    ended_at: float | None = None


@dataclass
class _StageSeries:
    seconds: Any
    frames: Any
    batches: Any
    errors: Any
    restarts: Any
    queue_depth: Any
    in_flight: Any


class PrometheusRecorder(MetricsRecorder):
    """Prometheus metrics for one pipeline, in a registry of its own.

    Label children are cached per stream and per stage, so a report costs a
    dict lookup and a few increments, not a label resolution per metric.
    """

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, disable_created_metrics

        disable_created_metrics()  # every counter's *_created twin doubled the series and no panel reads them
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.ready = False
        self._streams: dict[str, _StreamSeries] = {}
        self._children: dict[str, set[tuple[Any, tuple[str, ...]]]] = {}  # stream -> (metric, label values)
        self._series_lock = threading.RLock()  # the driver, the hub's decoder threads and the scrape all reach streams
        self._stages: dict[str, _StageSeries] = {}
        self._define_stage_metrics()
        self._define_stream_metrics()
        self._define_process_metrics()
        self.registry.register(_SinkCollector(SINK_LEDGER))
        from blinkflow.hwdecode import HwaccelCollector

        self.registry.register(HwaccelCollector())

    def _define_stage_metrics(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry
        self.stage_seconds = Histogram("blinkflow_stage_seconds", "Wall time of one stage call (a batch)", ["stage"],
                                       buckets=STAGE_SECONDS_BUCKETS, registry=r)
        self.stage_frames = Counter("blinkflow_stage_frames", "Frames handed to a stage", ["stage"], registry=r)
        self.stage_batches = Counter("blinkflow_stage_batches", "Stage calls that carried frames", ["stage"], registry=r)
        self.stage_errors = Counter("blinkflow_stage_errors", "Frames that failed inside a stage", ["stage"], registry=r)
        self.stage_restarts = Counter("blinkflow_stage_restarts", "Stage replicas restarted after their actor died",
                                      ["stage"], registry=r)
        self.queue_depth = Gauge("blinkflow_queue_depth", "Calls waiting for a free stage replica", ["stage"], registry=r)
        self.in_flight = Gauge("blinkflow_in_flight", "Calls submitted to a stage and not finished", ["stage"], registry=r)

    def _define_stream_metrics(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = self.registry
        self.frames = Counter("blinkflow_frames", "Frames by final outcome", ["stream", "outcome"], registry=r)
        self.decoded = Counter("blinkflow_frames_decoded", "Frames decoded from a source", ["stream"], registry=r)
        self.latency = Histogram("blinkflow_e2e_latency_seconds", "Decode to result time of processed and reused frames",
                                 ["stream"], buckets=LATENCY_BUCKETS, registry=r)
        self.fps = Gauge("blinkflow_stream_fps", "Results per second over the last second", ["stream"], registry=r)
        self.skip_ratio = Gauge("blinkflow_stream_skip_ratio", "Reused / (processed + reused) so far", ["stream"], registry=r)
        self.stream_up = Gauge("blinkflow_stream_up", "1 while the stream delivers frames, 0 once it ended", ["stream"],
                               registry=r)
        self.reconnects = Counter("blinkflow_stream_reconnects", "Live stream reconnections", ["stream"], registry=r)
        self.audit_agreement = Gauge("blinkflow_audit_agreement_ratio",
                                     "Mean agreement of carried-over results with fresh runs on the audit frames of "
                                     "the last 5 minutes (0..1)", ["stream"], registry=r)
        self.audited = Counter("blinkflow_audited_frames", "Frames the gate would have reused, processed as audits",
                               ["stream"], registry=r)
        self.audit_agreement_sum = Counter(
            "blinkflow_audit_agreement_sum", "Sum of the audits' agreement (0..1 each): its rate over the audited "
            "frames' rate is their mean agreement in any window", ["stream"], registry=r)
        self.gate_decisions = Counter("blinkflow_gate_decisions", "Frames by the gate's decision: keyframe, partial, "
                                      "refresh (some stages alone), reuse", ["stream", "decision"], registry=r)
        self.gate_threshold = Gauge("blinkflow_gate_threshold_ratio",
                                    "The gate's current changed-fraction threshold (adaptive: moved by audits)",
                                    ["stream"], registry=r)
        self.zone_objects = Gauge("blinkflow_zone_objects", "Tracked objects inside each zone (stages.events)",
                                  ["stream", "zone"], registry=r)
        self.line_crossings = Counter("blinkflow_line_crossings", "Objects that crossed each line, by direction "
                                      "(stages.events)", ["stream", "line", "direction"], registry=r)
        self.events = Counter("blinkflow_events", "Object events by type (stages.events)", ["stream", "type"], registry=r)
        self.gate_bound = Gauge("blinkflow_gate_refresh_bound_frames",
                                "Frames a stage may go without running before the gate refreshes it alone "
                                "(adapt_bounds: moved by refresh audits)", ["stream", "stage"], registry=r)

    def _define_process_metrics(self) -> None:
        from prometheus_client import Gauge, Info

        from blinkflow.version import __version__

        r = self.registry
        self.ready_gauge = Gauge("blinkflow_ready", "1 while stages are set up and the run is going", registry=r)
        self.gpu_allocated = Gauge("blinkflow_gpu_memory_allocated_bytes", "GPU memory held by tensors, per process",
                                   ["device", "process"], registry=r)
        self.gpu_reserved = Gauge("blinkflow_gpu_memory_reserved_bytes", "GPU memory reserved by the caching allocator",
                                  ["device", "process"], registry=r)
        self.gpu_utilization = Gauge("blinkflow_gpu_utilization_ratio", "GPU busy fraction (NVML), 0..1", ["device"],
                                     registry=r)
        Info("blinkflow_build", "Blinkflow version", registry=r).info({"version": __version__})

    # ------------------------------------------------------------------ series lookup

    def _stream(self, stream: str) -> _StreamSeries:
        series = self._streams.get(stream)
        if series is None:
            with self._series_lock:
                series = self._streams.get(stream)
                if series is None:
                    series = self._streams[stream] = _StreamSeries(
                        outcomes={o: self._child(self.frames, stream, o) for o in OUTCOMES},
                        decoded=self._child(self.decoded, stream), latency=self._child(self.latency, stream),
                        fps=self._child(self.fps, stream), skip_ratio=self._child(self.skip_ratio, stream),
                        up=self._child(self.stream_up, stream), reconnects=self._child(self.reconnects, stream),
                    )
        return series

    def _child(self, metric: Any, stream: str, *rest: Any) -> Any:
        """``metric``'s child for a stream's labels, remembered so that the stream's series can all go."""
        values = tuple(redacted_label(v) for v in (stream, *rest))
        with self._series_lock:
            self._children.setdefault(stream, set()).add((metric, values))
        return metric.labels(*values)

    def _forget(self, stream: str) -> None:
        """Every series of a stream removed on purpose or of a file that ended: no stream_up of 0 left paging for
        it, no series piling up over an archive's videos."""
        with self._series_lock:
            self._remove_children(stream)
            self._children.pop(stream, None)
            self._streams.pop(stream, None)
        log.debug("metrics: the series of removed stream %s are gone", stream)

    def _stage(self, stage: str) -> _StageSeries:
        series = self._stages.get(stage)
        if series is None:
            series = self._stages[stage] = _StageSeries(
                seconds=_labels(self.stage_seconds, stage), frames=_labels(self.stage_frames, stage),
                batches=_labels(self.stage_batches, stage), errors=_labels(self.stage_errors, stage),
                restarts=_labels(self.stage_restarts, stage), queue_depth=_labels(self.queue_depth, stage),
                in_flight=_labels(self.in_flight, stage),
            )
        return series

    # ------------------------------------------------------------------ reports

    def on_ready(self, ready: bool) -> None:
        self.ready = ready
        self.ready_gauge.set(1 if ready else 0)

    def on_stage_call(self, stage: str, seconds: float, frames: int, errors: int) -> None:
        series = self._stage(stage)
        series.seconds.observe(seconds)
        if frames:
            series.frames.inc(frames)
            series.batches.inc()
        if errors:
            series.errors.inc(errors)

    def on_queue(self, stage: str, depth: int, in_flight: int) -> None:
        series = self._stage(stage)
        series.queue_depth.set(depth)
        series.in_flight.set(in_flight)

    def on_restart(self, stage: str) -> None:
        self._stage(stage).restarts.inc()

    def on_decoded(self, frame: Any) -> None:
        series = self._stream(frame.stream_id)
        series.decoded.inc()
        if not series.is_up and not series.live:  # a live stream's buffered frames after a drop do not make it up
            self.on_stream_state(frame.stream_id, True)
        reconnects = frame.meta.get("reconnects") if frame.meta else None
        if reconnects is not None and reconnects < series.reconnects_seen:
            series.reconnects_seen = 0  # a new source under this id counts from 0
        if reconnects and reconnects > series.reconnects_seen:
            # sources report a running count; the counter takes the increase
            series.reconnects.inc(reconnects - series.reconnects_seen)
            series.reconnects_seen = reconnects

    def on_result(self, result: Any) -> None:
        series = self._stream(result.stream_id)
        outcome = result.outcome.value
        series.outcomes[outcome].inc()
        series.counts[outcome] += 1
        if outcome in ("processed", "reused"):
            series.latency.observe(result.latency_s)
            fresh_or_reused = series.counts["processed"] + series.counts["reused"]
            series.skip_ratio.set(series.counts["reused"] / fresh_or_reused)
            # analysed frames only: with 3 in 4 dropped under overload, a 5 fps camera read 5 fps while 1 was analysed
            self._count_fps(series)
        audit = result.results.get("audit") if result.results else None
        if isinstance(audit, dict) and "agreement" in audit:
            self.on_audit(result.stream_id, float(audit["agreement"]))
        gate = result.results.get("gate") if result.results else None
        if isinstance(gate, dict):
            self._on_gate(result.stream_id, series, gate)
        if result.results and ("events" in result.results or "zones" in result.results):
            self._on_events(result.stream_id, series, result.results.get("events") or [], result.results.get("zones") or {})

    def _on_events(self, stream: str, series: _StreamSeries, events: list[dict], zones: dict[str, int]) -> None:
        for event in events:
            self._child(self.events, stream, str(event["type"])).inc()
            if event["type"] == "cross_line":
                self._child(self.line_crossings, stream, str(event["line"]), str(event["direction"])).inc()
        if series.ended_at is not None:
            return  # the last wave's results, after the stream's end was reported: its zones stay empty
        for zone, count in zones.items():
            series.zones.add(str(zone))
            self._child(self.zone_objects, stream, str(zone)).set(count)

    def _on_gate(self, stream: str, series: _StreamSeries, gate: dict) -> None:
        if gate.get("decision"):
            self._child(self.gate_decisions, stream, str(gate["decision"])).inc()
        if gate.get("threshold") is not None:
            if series.threshold is None:
                series.threshold = self._child(self.gate_threshold, stream)
            series.threshold.set(float(gate["threshold"]))
        for stage, bound in (gate.get("bounds") or {}).items():
            self._child(self.gate_bound, stream, str(stage)).set(float(bound))

    def _count_fps(self, series: _StreamSeries) -> None:
        if series.ended_at is not None and not series.live:
            return  # the last wave's results, after the end was reported (Ray, threaded): the rate stays 0
        now = time.monotonic()
        with self._series_lock:  # the scrape rolls the same window
            if series.last_result_at is not None:
                series.result_gap = now - series.last_result_at
            series.last_result_at = now
            series.window_frames += 1
            self._roll_fps(series, now)

    @staticmethod
    def _roll_fps(series: _StreamSeries, now: float) -> None:
        """Results over the window, once it is a second long, at each result; at a scrape, 0 once the stream has
        gone quiet for longer than its own pace explains (a stage hangs), not its last rate."""
        elapsed = now - series.window_start
        if elapsed < FPS_WINDOW_S:
            return
        if series.window_frames:
            series.fps.set(series.window_frames / elapsed)
        elif series.last_result_at is not None and now - series.last_result_at > max(STALL_S, 3 * series.result_gap):
            series.fps.set(0)
        else:
            return  # a slow stream between two results: its rate stands until the next
        series.window_start, series.window_frames = now, 0

    def on_stream_state(self, stream: str, up: bool, failed: bool = False) -> None:
        with self._series_lock:
            series = self._stream(stream)
            if up:
                self._revive_up(stream, series)
                self._set_up(series, True)
                series.ended_at = None
                return
            series.ended_at = time.monotonic()  # its end reached the runner: nothing more will come for it
            for zone in series.zones:  # nobody is in a zone of a stream that ended
                self._child(self.zone_objects, stream, zone).set(0)
            if series.live:
                return  # up and down come from its own events: this end may be reported after a re-add's "up"
            self._set_up(series, False)
            series.reconnects_seen = 0  # a source under this id again counts its reconnections from 0
            if not failed:  # a file or synthetic source that ended as it should: no stream_up of 0 left to page on
                self._drop_up(stream, series)

    def on_stream_event(self, stream: str, kind: str, failed: bool = False) -> None:
        with self._series_lock:
            series = self._stream(stream)
            series.live = True
            if kind == "removed":
                self._drop_up(stream, series)
                return
            if kind in ("connecting", "up"):  # (again) under this id: whatever was removed is back
                self._revive_up(stream, series)
                series.ended_at = None
            if kind in ("connecting", "up", "down", "ended", "stopped"):
                self._set_up(series, kind == "up")
            if kind in ("ended", "stopped") and not failed:  # max_frames, an end of stream, the run stopping
                self._drop_up(stream, series)

    def _revive_up(self, stream: str, series: _StreamSeries) -> None:
        """A stream (again) under an id whose stream_up went: it is exported again (the lock is held)."""
        if series.removed:
            series.up = self._child(self.stream_up, stream)
            series.removed = False

    def _drop_up(self, stream: str, series: _StreamSeries) -> None:
        """A removed stream's, or one that ended as it should: its stream_up goes now (the lock is held), its other
        series REMOVED_SERIES_S after its end. Later events set the detached child, which no scrape reads."""
        series.removed = True
        self._remove_children(stream, self.stream_up)

    def _remove_children(self, stream: str, only: Any = None) -> None:
        """Unexport a stream's series (of metric ``only``, or all) by the labels they were made with, not labels
        made again (a password learned since would redact the id otherwise); the lock is held."""
        children = self._children.get(stream, set())
        for metric, values in [c for c in children if only is None or c[0] is only]:
            children.discard((metric, values))
            with contextlib.suppress(KeyError):
                metric.remove(*values)

    @staticmethod
    def _set_up(series: _StreamSeries, up: bool) -> None:
        series.is_up = up
        series.up.set(1 if up else 0)
        if not up:
            series.fps.set(0)
            # a stream that comes back later starts a fresh rate window
            series.window_start, series.window_frames = time.monotonic(), 0

    def on_reconnect(self, stream: str) -> None:
        self._stream(stream).reconnects.inc()

    def on_audit(self, stream: str, agreement: float) -> None:
        series = self._stream(stream)
        if series.audited is None:
            series.audited = self._child(self.audited, stream)
            series.audit_agreement = self._child(self.audit_agreement, stream)
            series.audit_sum = self._child(self.audit_agreement_sum, stream)
        series.audited.inc()
        series.audit_sum.inc(agreement)
        now = time.monotonic()
        series.audits.append((now, agreement))
        while series.audits[0][0] < now - AUDIT_WINDOW_S:  # a lifetime mean would hide a collapse for hours
            series.audits.popleft()
        series.audit_agreement.set(sum(a for _, a in series.audits) / len(series.audits))

    def on_device(self, device: str, process: str, allocated_bytes: int, reserved_bytes: int,
                  utilization: float | None) -> None:
        _labels(self.gpu_allocated, device, process).set(allocated_bytes)
        _labels(self.gpu_reserved, device, process).set(reserved_bytes)
        if utilization is not None:
            _labels(self.gpu_utilization, device).set(utilization)

    def on_device_gone(self, device: str, process: str) -> None:
        for gauge in (self.gpu_allocated, self.gpu_reserved):
            with contextlib.suppress(KeyError):
                gauge.remove(redacted_label(device), redacted_label(process))

    def refresh(self) -> None:
        """Called before each scrape: roll the streams' rates, let removed streams go once their time is up, and
        sample this process's own GPU memory, if it uses CUDA."""
        now = time.monotonic()
        with self._series_lock:
            for stream, series in list(self._streams.items()):
                # removed cameras, and files that ended (an archive job makes a stream of each of its videos: their
                # ~35 series each piled up to hundreds of thousands, megabytes a scrape), go once a scrape or two
                # read their final counts; a live stream that failed stays, its stream_up 0, until it is removed
                gone = series.removed or not series.live
                if gone and series.ended_at is not None and now - series.ended_at >= REMOVED_SERIES_S:
                    self._forget(stream)
                else:
                    self._roll_fps(series, now)
        for device in local_gpu_stats("driver"):
            self.on_device(**device)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        self.refresh()
        return generate_latest(self.registry)


# --------------------------------------------------------------------------- HTTP


class MetricsExporter(HTTPService):
    """Serves a recorder's metrics on ``http://host:port/metrics`` plus two probes.

    ``/healthz`` answers 200 while the process serves at all; ``/readyz``
    answers 200 only while the stages are set up and the run is going (503
    otherwise), for Kubernetes readiness probes.
    """

    section = "metrics"
    #: a scrape is one short GET: connections that idle are cut soon, so they cannot keep the slots from scrapers
    request_deadline_s = 10.0

    def __init__(self, recorder: PrometheusRecorder, host: str = "127.0.0.1", port: int = 9464) -> None:
        super().__init__(host, port)
        self.recorder = recorder
        self.scrapes = 0
        self.last_scrape = 0.0
        self.scrape_interval: float | None = None
        self._scraped = threading.Condition()

    def handler_class(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    def start(self) -> "MetricsExporter":
        super().start()
        log.info("serving metrics on %s/metrics", self.url)
        return self

    def note_scrape(self, started: float | None = None) -> None:
        """A scrape was served; ``started``: when it began (epoch seconds), which is what a wait for a scrape
        after the run's end compares (one that began before the end and finished after it read older counts)."""
        with self._scraped:
            now = time.time() if started is None else started
            self.scrapes += 1
            self.scrape_interval = now - self.last_scrape if self.last_scrape else None
            self.last_scrape = now
            self._scraped.notify_all()

    def wait_for_scrape(self, after: float, timeout: float) -> bool:
        """Wait until a scrape starts after the time ``after`` (epoch seconds); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._scraped:
            while self.last_scrape <= after:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._scraped.wait(left)
        return True

    def __enter__(self) -> "MetricsExporter":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _handler_for(exporter: MetricsExporter) -> type[BaseHTTPRequestHandler]:
    class Handler(ServiceHandler):
        timeout = 5.0  # the socket's: a client silent this long is dropped

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                started = time.time()
                try:
                    body = exporter.recorder.exposition()
                except Exception as exc:  # noqa: BLE001 - a scrape gets an answer, never a dropped connection
                    log.warning("metrics: /metrics failed: %s", exc)
                    self._reply(500, f"metrics failed: {exc}\n".encode())
                    return
                exporter.note_scrape(started)
                self._reply(200, body, CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ready = exporter.recorder.ready
                self._reply(200 if ready else 503, b"ready\n" if ready else b"not ready\n")
            else:
                self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
            log.debug("metrics http: " + format, *args)

    return Handler


def start_exporter(cfg: Any) -> MetricsExporter:
    """Start serving a fresh recorder as the ``metrics`` config section asks."""
    return MetricsExporter(PrometheusRecorder(), cfg.host, cfg.port).start()


def linger_for_last_scrape(exporter: MetricsExporter, finished_at: float, max_wait_s: float = 30.0) -> None:
    """Keep serving until a scraper has read the final values, if one is scraping at all.

    A batch run can end between two scrapes, and then Prometheus would never see
    its last counts. Waits only when a scrape was seen during the run, for at most
    about two scrape intervals (``max_wait_s`` at most).
    """
    if not exporter.scrapes:
        return
    interval = exporter.scrape_interval
    timeout = max_wait_s if interval is None else min(max_wait_s, 2.0 * interval + 1.0)
    log.info("run done; serving /metrics up to %.0f s more for a final scrape of the last counts", timeout)
    if not exporter.wait_for_scrape(finished_at, timeout=timeout):
        log.info("no scrape came after the run ended; the last counts may not have been collected")


@contextlib.contextmanager
def serving_metrics(cfg: Any) -> Iterator[PrometheusRecorder | None]:
    """While the block runs, serve metrics if ``cfg.enabled`` (yielding the recorder to
    hand to a runner); on a clean exit, linger for a final scrape; then stop."""
    if not cfg.enabled:
        yield None
        return
    exporter = start_exporter(cfg)
    try:
        yield exporter.recorder
        linger_for_last_scrape(exporter, time.time())
    finally:
        exporter.stop()
