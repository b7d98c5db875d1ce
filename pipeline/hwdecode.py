"""Hardware video decoding for file and stream sources: FFmpeg's CUDA decoder (NVDEC) through PyAV's
``HWAccel``, with a fallback to the CPU decoder that is said once in the log and counted
(``blinkflow_hwaccel_fallbacks_total``) instead of failing the input.

``hwaccel: none`` (the default) never asks for it; ``auto`` uses it when the machine has one and the
source needs no motion vectors (the CUDA decoder exports none); ``cuda`` asks for it always. Decoded
frames come back to system memory (the stages take numpy frames).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable

from blinkflow.errors import ConfigError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_fallbacks: dict[str, int] = {}
#: sources whose fallbacks are exported, at most (the most recent; as many as the stream hub remembers)
MAX_SOURCES = 256


def check_hwaccel(path: str, hwaccel: str, motion_vectors: bool) -> None:
    """A source asking for the CUDA decoder and for motion vectors asks for two things that exclude each other."""
    if hwaccel == "cuda" and motion_vectors:
        raise ConfigError(f"{path}.hwaccel: the CUDA decoder exports no motion vectors, which motion_vectors asks "
                          "for; use hwaccel: auto (the CPU decoder when vectors are wanted) or motion_vectors: false")


def wanted(hwaccel: str, motion_vectors: bool = False) -> bool:
    return hwaccel == "cuda" or (hwaccel == "auto" and not motion_vectors)


def open_decoding(open_container: Callable[..., Any], source: str, hwaccel: str, motion_vectors: bool = False) -> Any:
    """``open_container(**kwargs)`` with the hardware decoder when asked for and present, else without it.

    Whether the machine has one is probed on its own, once (:func:`cuda_decoder_missing`): reading any error of
    the open as "no CUDA" connected twice per attempt (a camera that serves one client was used up by the first),
    and counted a dead camera's or a corrupt file's errors as CUDA fallbacks. The open's own errors propagate."""
    if not wanted(hwaccel, motion_vectors):
        return open_container()
    missing = cuda_decoder_missing()
    if missing is None:
        from av.codec.hwaccel import HWAccel

        return open_container(hwaccel=HWAccel("cuda", allow_software_fallback=True))
    with _lock:
        first = source not in _fallbacks
        _fallbacks[source] = _fallbacks.pop(source, 0) + 1  # to the end: the most recent are kept
        while len(_fallbacks) > MAX_SOURCES:  # streams cycled through the control API grew a series each, forever
            del _fallbacks[next(iter(_fallbacks))]
    if first:
        log.warning("%s: no CUDA video decoder here (%s); decoding on the CPU", source, missing)
    return open_container()


@functools.lru_cache(maxsize=1)
def cuda_decoder_missing() -> str | None:
    """Why this process cannot decode on a CUDA device (None: it can): one device context made and dropped."""
    try:
        import av
        from av.codec.hwaccel import HWAccel

        HWAccel("cuda", allow_software_fallback=True).create(av.Codec("h264", "r"))
    except Exception as exc:  # noqa: BLE001 - no device, no driver, no NVDEC in this FFmpeg build: all "missing"
        return f"{type(exc).__name__}: {exc}"
    return None


def fallback_counts() -> dict[str, int]:
    """Per source, the opens that asked for the CUDA decoder and decoded on the CPU (process-wide)."""
    with _lock:
        return dict(_fallbacks)


class HwaccelCollector:
    """Exports :func:`fallback_counts` at scrape time (registered by the Prometheus recorder)."""

    def describe(self) -> list[Any]:
        return list(self.collect(empty=True))

    def collect(self, empty: bool = False) -> Any:
        from prometheus_client.core import CounterMetricFamily

        from blinkflow.redact import redacted_label

        family = CounterMetricFamily("blinkflow_hwaccel_fallbacks", "Opens of a source that asked for the CUDA video "
                                     "decoder (hwaccel) and decoded on the CPU instead", labels=["source"])
        for source, count in sorted(({} if empty else fallback_counts()).items()):
            family.add_metric([redacted_label(source)], count)
        yield family
