"""What the push sinks (mqtt, webhook) share: a bounded buffer drained by a sender thread of their own.

``write`` turns a frame's events (``results["events"]``, see docs/push-sinks.md) into messages and
returns at once; it never waits on the network. While the broker or endpoint is down the buffer
holds the messages and the sender retries; when the buffer is full the oldest message is dropped
and counted (``blinkflow_sink_dropped_total{reason="overflow"}``), never silently. ``close`` gives
the sender ``close_timeout_s`` to deliver what is left and reports the rest in one log line.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from blinkflow.config import SinkConfig
from blinkflow.frame import FrameResult
from blinkflow.metrics import SINK_LEDGER
from blinkflow.sinks import Sink, _jsonable, to_record

log = logging.getLogger(__name__)

#: at most one "dropped" warning per sink this often (an outage can drop thousands)
DROP_LOG_EVERY_S = 10.0


@dataclass
class Message:
    """One thing to deliver: an event (``kind`` events) or a frame record (``kind`` frames)."""

    stream: str
    kind: str
    payload: bytes
    id: str = field(default_factory=lambda: uuid.uuid4().hex)  # stable over retries: receivers can drop repeats


def event_messages(result: FrameResult) -> list[Message]:
    """A message per event of the frame, the event dict as JSON (docs/push-sinks.md)."""
    events = (result.results or {}).get("events") or []
    return [Message(str(event.get("stream", result.stream_id)), "events", _dumps(_jsonable(event, False)))
            for event in events]


def frame_message(result: FrameResult, include_dense: bool) -> Message:
    """The frame's record; masks and dense arrays only when asked (they are most of its size)."""
    record = to_record(result, include_dense)
    if not include_dense:
        for value in record.values():
            if isinstance(value, dict):
                value.pop("mask", None)
                value.pop("masks", None)
    return Message(result.stream_id, "frames", _dumps(record))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def backoff_s(cfg: SinkConfig, failures: int) -> float:
    """The wait after ``failures`` failures in a row: doubling from backoff_initial_s up to backoff_max_s."""
    return min(cfg.backoff_max_s, cfg.backoff_initial_s * 2.0 ** max(0, failures - 1))


class PushSink(Sink):
    """A sink whose ``write`` only enqueues; a subclass's ``_serve`` (in the sender thread) delivers.

    Subclasses call :meth:`_start` at the end of their ``__init__``, take messages with
    :meth:`_take`, and report each one's fate with :meth:`_delivered` or :meth:`_dropped`.
    """

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.label = cfg.type
        self._buffer: deque[Message] = deque()
        self._cond = threading.Condition()
        self._closing = False  # close() was called: deliver what is left, then stop
        self._stopped = False  # stop now (close timed out, or abort)
        self._in_hand = 0  # messages taken from the buffer and not yet delivered or dropped
        self._buffered_bytes = 0
        self.written = 0
        self.delivered = 0
        self.dropped: Counter[str] = Counter()
        self._drop_logged_at = float("-inf")
        self._drops_unlogged = 0
        self._thread = threading.Thread(target=self._run, name=f"blinkflow-{self.label}-sink", daemon=True)

    def _start(self) -> None:
        # its series exist from the start, at 0: a sink that never delivers reads 0 delivered, not "no data"
        SINK_LEDGER.count_delivered(self.label, 0)
        SINK_LEDGER.add_pending(self.label, 0)
        self._thread.start()

    # ------------------------------------------------------------------ the pipeline's side

    def write(self, result: FrameResult) -> None:
        for message in self.messages(result):
            self._offer(message)

    def messages(self, result: FrameResult) -> list[Message]:
        return event_messages(result)

    @staticmethod
    def check_pipeline(sink: Any, cfg: Any, path: str) -> None:
        """A sink of events in a pipeline that makes none sends nothing, silently: say so at load."""
        if "events" not in cfg.enabled_stages() and not getattr(sink, "per_frame", False):
            log.warning("%s: a %s sink sends the events stage's events, and this config has no stages.events "
                        "(add it after stages.track%s)", path, sink.type,
                        ", or per_frame: true for every frame's record" if sink.type == "mqtt" else "")

    def _offer(self, message: Message) -> None:
        with self._cond:
            if self._closing:  # a write after close(): nothing will send it, but it is counted
                self.written += 1
                SINK_LEDGER.add_pending(self.label, 1)
                self._count_drop("close", 1)
                return
            size = len(message.payload)
            if size > self.cfg.max_message_kb * 1024:
                self.written += 1
                SINK_LEDGER.add_pending(self.label, 1)
                self._count_drop("too_large", 1)
                self._say_too_large(size)
                return
            while self._buffer and (len(self._buffer) >= self.cfg.buffer
                                    or self._buffered_bytes + size > self.cfg.buffer_mb * 1e6):
                self._buffered_bytes -= len(self._buffer.popleft().payload)
                self._count_drop("overflow", 1)
            SINK_LEDGER.add_pending(self.label, 1)
            self._buffer.append(message)
            self._buffered_bytes += size
            self.written += 1
            self._cond.notify_all()

    def _say_too_large(self, size: int) -> None:
        if self.dropped["too_large"] == 1:  # the first: the setting to change (later ones are in the counts)
            log.warning("%s sink: a message of %.0f kB is over max_message_kb %g, dropped (and so will be every "
                        "larger one, counted as too_large); raise max_message_kb up to what %s takes", self.label,
                        size / 1024, self.cfg.max_message_kb, self.where() or "the receiver")

    def status(self) -> dict[str, Any]:
        """Delivery counts so far: written, delivered, pending, dropped by reason."""
        with self._cond:
            return {"written": self.written, "delivered": self.delivered, "pending": len(self._buffer) + self._in_hand,
                    "dropped": dict(self.dropped)}

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return  # closed already (abort after close, or twice)
            self._closing = True
            self._cond.notify_all()
        self._thread.join(self.cfg.close_timeout_s)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            unsent = min(self._in_hand, self._unsent_in_hand())
            left, in_flight = len(self._buffer) + unsent, self._in_hand - unsent
            if left:
                self._buffer.clear()
                self._buffered_bytes = 0
                self._count_drop("close", left, quiet=True)
            if in_flight:  # being sent when the time was up: it may have arrived, the sender cannot say
                self._count_drop("unconfirmed", in_flight, quiet=True)
            self._in_hand = 0
        self._finish()
        self._thread.join(1.0)
        self._log_summary(left, in_flight)

    def _log_summary(self, left: int, in_flight: int) -> None:
        """The sink's last line: a warning with every drop by reason whenever one was dropped in the run (the
        throttled warnings may have shown only the first), else what was delivered."""
        summary = self.status()
        if left or in_flight:
            log.warning("%s sink: %d of %d messages not delivered within close_timeout_s %gs (%s%s); dropped in all: %s",
                        self.label, left + in_flight, summary["written"], self.cfg.close_timeout_s, self.where(),
                        f"; {in_flight} were being sent and may have arrived" if in_flight else "", summary["dropped"])
        elif summary["dropped"]:
            log.warning("%s sink: delivered %d of %d messages (%s); dropped: %s", self.label, summary["delivered"],
                        summary["written"], self.where(), summary["dropped"])
        else:
            log.info("%s sink: delivered %d of %d messages (%s)", self.label, summary["delivered"],
                     summary["written"], self.where())

    def abort(self) -> None:
        self.close()  # events already published stay published; deliver what is buffered like a normal end

    # ------------------------------------------------------------------ the sender's side

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:
            log.exception("%s sink: the sender thread failed; messages are no longer delivered", self.label)

    def _serve(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Release connections once the sender is done or given up (close)."""

    def _unsent_in_hand(self) -> int:
        """Of the messages in hand, those known not to be on the wire (waiting to retry): undelivered, not
        "may have arrived"; called holding the lock."""
        return 0

    def where(self) -> str:
        """The destination, for log lines (no secrets)."""
        return ""

    def _take(self, ready: Any = lambda: True) -> Message | None:
        """The oldest message once ``ready()`` holds (checked under the lock), or None when it is time to stop."""
        with self._cond:
            while not self._stopped:
                if self._buffer and ready():
                    self._in_hand += 1
                    message = self._buffer.popleft()
                    self._buffered_bytes -= len(message.payload)
                    return message
                if self._closing and not self._buffer and not self._in_hand:
                    return None
                self._cond.wait(0.5)
            return None

    def _wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if the sink must stop meanwhile."""
        deadline = time.monotonic() + seconds
        with self._cond:
            while not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def _delivered(self, n: int = 1) -> None:
        with self._cond:
            if self._stopped:
                return  # already counted as undelivered by close()
            self._in_hand -= n
            self.delivered += n
            SINK_LEDGER.count_delivered(self.label, n)
            SINK_LEDGER.add_pending(self.label, -n)
            self._cond.notify_all()

    def _dropped(self, reason: str, n: int = 1) -> None:
        with self._cond:
            if self._stopped:
                return
            self._in_hand -= n
            self._count_drop(reason, n)
            self._cond.notify_all()

    def _count_drop(self, reason: str, n: int, quiet: bool = False) -> None:
        """Count ``n`` dropped messages (the lock is held); warn at most every DROP_LOG_EVERY_S."""
        self.dropped[reason] += n
        SINK_LEDGER.count_dropped(self.label, reason, n)
        SINK_LEDGER.add_pending(self.label, -n)
        self._drops_unlogged += n
        now = time.monotonic()
        if not quiet and now - self._drop_logged_at >= DROP_LOG_EVERY_S:
            log.warning("%s sink: dropped %d messages (last reason: %s; %d dropped in all) - %s", self.label,
                        self._drops_unlogged, reason, sum(self.dropped.values()), self.where())
            self._drop_logged_at, self._drops_unlogged = now, 0
