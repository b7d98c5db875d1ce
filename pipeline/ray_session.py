"""The one place Blinkflow starts or joins Ray (runners, depth-parallel stages, labelling, training, benches).

Without an address it starts a private local instance (``address="local"``), so another Ray
cluster on the same host (``ray start``) is never joined by accident; with one it connects and
fails fast, in one line, when nothing answers. Ray is imported here, lazily.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from typing import Iterator

from blinkflow.errors import BlinkflowError, Interrupted, first_line

log = logging.getLogger(__name__)


def start_ray(address: str | None = None, num_cpus: float | None = None, **options) -> bool:
    """Make sure Ray is initialised; return True when this call started (or joined) it, so the
    caller shuts it down again. ``options`` go to ``ray.init`` (runtime_env, ...)."""
    import ray

    if ray.is_initialized():
        return False
    with _signal_handlers_kept():
        return _init(ray, address, num_cpus, options)


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """``ray.init`` replaces the driver's SIGTERM handler with one that exits at once; Blinkflow's own
    handlers (a graceful drain, pipeline/control.py GracefulSignals) must stay, so they are put back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        # Ray's handler (sys.exit(15)) took a SIGTERM while Ray started: the run ended with 15, silently, and left
        # Ray's agents behind. Stop what started, then end as a SIGTERM of ours does
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        raise Interrupted(signal.SIGTERM) from None
    finally:
        for sig, handler in handlers.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def _init(ray, address: str | None, num_cpus: float | None, options: dict) -> bool:
    settings = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING, **options}
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, **{k: v for k, v in settings.items() if k != "include_dashboard"})
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise BlinkflowError(_cannot_connect(address, exc)) from None
        return True
    cpus = int(num_cpus + 0.999) if num_cpus else (os.cpu_count() or 1)
    try:
        ray.init(address="local", num_cpus=cpus, **settings)
    except (ConnectionError, ValueError, RuntimeError, OSError) as exc:
        raise BlinkflowError(f"cannot start a local Ray instance ({first_line(exc)}); check /tmp/ray has space "
                             "and no stale Ray processes are left (`ray stop`)") from None
    return True


#: sessions of this process using the Ray that one of them started: two pipelines at once (the Python API in two
#: threads) raced ray.init ("called ray.init twice"), and the first to finish shut Ray down under the other
_sessions_lock = threading.Lock()
_sessions = 0
_started_by_a_session = False


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: float | None = None, **options) -> Iterator[None]:
    """Ray for the block; shut down afterwards when a session started it and this is the last one using it."""
    import ray

    global _sessions, _started_by_a_session
    with _sessions_lock:
        if start_ray(address, num_cpus, **options):
            _started_by_a_session = True
        _sessions += 1
    try:
        yield
    finally:
        with _sessions_lock:
            _sessions -= 1
            if _sessions == 0 and _started_by_a_session:
                _started_by_a_session = False
                ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds, not minutes, when the cluster's GCS port does not answer."""
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except OSError as exc:
        raise BlinkflowError(_cannot_connect(address, exc.strerror or exc)) from None


def _cannot_connect(address: str, reason: object) -> str:
    return (f"runtime.address: cannot connect to the Ray cluster at {address!r} ({first_line(reason)}); "
            "check it is running (`ray status`) or remove runtime.address to start a local one")
