"""The Python API: run a pipeline and iterate over its results as they complete.

::

    import blinkflow

    for record in blinkflow.run("configs/demo.yaml", **{"sources.0.max_frames": 8}):
        print(record["index"], record["detect"]["classes"])

A record is what the JSONL sink writes for a frame (``pipeline/frame-record.schema.json``).
The config is a path, a dict or a loaded :class:`blinkflow.config.Config`; keyword overrides
name a YAML path (``"stages.detect.batch": 8``, or ``stages__detect__batch=8``) and take
Python values, so ``sources=[blinkflow.frames(my_arrays, fps=10)]`` runs a notebook's own frames.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from blinkflow.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

#: records buffered between the pipeline thread and a slow consumer before the pipeline waits
BUFFERED_RECORDS = 64


def frames(images: Iterable[Any], *, id: str = "frames", fps: float = 25.0, **settings: Any) -> dict:
    """A source entry for ``run``'s ``sources``: any iterable of HxWx3 uint8 RGB arrays, or of (array, capture
    time) pairs (``time.time()`` seconds, a camera SDK's timestamp) so that latency counts from the capture."""
    return {"type": "frames", "id": id, "fps": fps, "frames": images, **settings}


def load_config(config: Any, **overrides: Any):
    """A checked :class:`blinkflow.config.Config` from a path, a dict or a Config, with Python-valued overrides."""
    from blinkflow.config import Config, load_config as load
    from blinkflow.resources import find_config
    from blinkflow.schema import set_value

    if isinstance(config, Config) and not overrides:
        return config
    if isinstance(config, Config):
        raise ConfigError("blinkflow.run: overrides need a config path or dict, not a loaded Config")
    if isinstance(config, (str, Path)):
        path = find_config(config)  # "configs/demo.yaml" or "demo.yaml" from anywhere: the shipped one
        from blinkflow.schema import read_yaml

        raw, base = read_yaml(path), path.resolve().parent
    elif isinstance(config, dict):
        raw, base = _copied(config), None
    else:
        raise ConfigError(f"blinkflow.run: config must be a path, a dict or a Config, not {type(config).__name__}")
    for key, value in overrides.items():
        set_value(raw, key.replace("__", "."), value)
    return load(data=raw, base_dir=base)


def _copied(raw: dict) -> dict:
    """A deep copy that shares (does not copy) the frames iterables: a generator cannot be copied."""
    sources = raw.get("sources") if isinstance(raw.get("sources"), list) else []
    shared = {id(s["frames"]): s["frames"] for s in sources if isinstance(s, dict) and s.get("frames") is not None}
    return copy.deepcopy(raw, memo=shared)


def run(config: Any, /, **overrides: Any) -> Iterator[dict]:
    """Run a pipeline; yield one record per decoded frame, in order per stream, as they complete.

    The config's own sinks still write their files. Stopping the iteration early (``break``, or an
    exception such as Ctrl-C's KeyboardInterrupt in the loop, once the generator is closed) stops the
    run gracefully: no further frame is read, the frames in flight finish and the sinks commit.
    Wrap the call in ``contextlib.closing`` to close it at once where the generator may outlive the
    loop (a notebook keeps a traceback's frames).
    """
    cfg = load_config(config, **overrides)
    for section in ("metrics", "control"):
        if getattr(cfg, section).enabled:  # accepted by the config, served only by the CLI: said, not silently off
            log.warning("blinkflow.run: %s.enabled is for `blinkflow run`; the Python API serves no %s endpoint",
                        section, section)
    results: queue.Queue = queue.Queue(maxsize=BUFFERED_RECORDS)
    stopper = _Stopper(_hub_for(cfg))
    worker = threading.Thread(target=_pump, args=(cfg, results, stopper), name="blinkflow-run", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = results.get()
            if kind == "record":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stopper.stop()
        _drain(results, worker)


class _Stopper:
    """The consumer's graceful stop: no new frame from files (the runner's ``stop``) or streams (the hub)."""

    def __init__(self, hub: Any) -> None:
        self.hub, self.event = hub, threading.Event()

    def stop(self) -> None:
        self.event.set()
        if self.hub is not None:
            self.hub.close(stop_streams=True)


def _hub_for(cfg: Any) -> Any:
    """A hub for the config's stream sources, owned here so a stop can end them (None without any)."""
    if not any(source.type == "stream" for source in cfg.sources):
        return None
    from blinkflow.streams import StreamHub

    return StreamHub(mode=cfg.runtime.mode, defaults=cfg.control.stream_defaults)


def _pump(cfg: Any, results: queue.Queue, stopper: _Stopper) -> None:
    from blinkflow.runners import get_runner
    from blinkflow.sinks import build_sinks, to_record

    def deliver(result: Any) -> None:
        if not stopper.event.is_set():  # after a stop the consumer is gone; the config's sinks still get it
            results.put(("record", to_record(result)))

    try:
        runner = get_runner(cfg.runtime.runner)(cfg, sinks=build_sinks(cfg.sinks), on_result=deliver,
                                                hub=stopper.hub, stop=stopper.event)
        summary = runner.run()
        errors = summary.accounting.source_errors
        # an input that failed (a bad frame, a corrupt file) ends its stream; the caller hears of it, once
        results.put(("error", SourceError(errors[0])) if errors else ("done", None))
    except BaseException as exc:  # noqa: BLE001 - handed to the consumer's thread, raised there
        results.put(("error", exc))


#: after a stop, how long the pipeline thread may go without a result before the caller stops waiting for it (a
#: frames iterable blocked in a camera read never returns to see the stop)
DRAIN_QUIET_S = 15.0


def _drain(results: queue.Queue, worker: threading.Thread) -> None:
    """Unblock a pipeline thread waiting on a full queue, then wait for it to finish: the sinks commit. What goes
    wrong meanwhile is logged (a sink that could not commit after a ``break`` was silent)."""
    quiet_since = time.monotonic()
    while worker.is_alive():
        try:
            kind, value = results.get(timeout=0.1)
        except queue.Empty:
            if time.monotonic() - quiet_since > DRAIN_QUIET_S:
                log.warning("blinkflow.run: stopped, but the pipeline has given nothing for %.0f s (a frames iterable "
                            "blocked in a read?); not waiting for it: its sinks commit when it returns", DRAIN_QUIET_S)
                return
            continue
        quiet_since = time.monotonic()
        if kind == "error" and not isinstance(value, SourceError):
            log.error("blinkflow.run: after the stop: %s", value)
    worker.join()
