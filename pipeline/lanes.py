"""A lane: one daemon thread that runs the calls handed to it in order, each answered by a Future.

The threaded runner's stages and the threaded depth pipeline's slices each get one. Unlike a
``ThreadPoolExecutor`` worker, the thread is a daemon, and closing a lane waits only so long: a stage
stuck in a call (a hung driver, a dead camera library) cannot hold an aborted run, or the process's
exit, forever.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable


class Lane:
    """Calls run one at a time, in the order they were submitted, in a daemon thread named ``name``."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()  # a submit racing close() lands before the end mark, or is refused
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._closing:
            if self._closed:  # no thread would ever take it: its future would wait forever
                raise RuntimeError(f"lane {self._thread.name} is closed")
            self._calls.put((future, fn, args))
        return future

    def close(self, timeout_s: float | None = None) -> bool:
        """Cancel the calls not started, let the running one finish within ``timeout_s``; True once the thread
        has ended (False: it is still in a call, and is left to end with the process)."""
        with self._closing:
            self._closed = True
        while True:
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        self._calls.put(None)
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)
