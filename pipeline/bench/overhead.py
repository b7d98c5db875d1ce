"""``blinkflow bench overhead``: per-frame cost of moving a frame through a chain
of stage actors, with plain actor calls against a Ray Compiled Graph.

The stages do nothing (identity), so the figure is pure runtime overhead: the
latency a live stream pays per frame on top of its models.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from blinkflow.bench.common import machine_info, machine_line, markdown_table, publish
from blinkflow.frame import Frame


#: seconds one compiled-graph round trip may take before it counts as hung
COMPILED_TIMEOUT_S = 120.0


class _Identity:
    def process(self, frames: list[Frame]) -> list[Frame]:
        return frames


def _frame(width: int, height: int) -> list[Frame]:
    image = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return [Frame(stream_id="bench", index=0, pts=0.0, image=image)]


def _time_calls(call, payload: Any, iterations: int) -> list[float]:
    for _ in range(5):  # warm-up
        call(payload)
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        call(payload)
        samples.append(time.perf_counter() - started)
    return samples


def bench_overhead(stages: int = 3, iterations: int = 200, width: int = 320, height: int = 240, write: bool = True) -> dict:
    import ray

    from blinkflow.ray_session import ray_session

    with ray_session(num_cpus=max(2, stages)):
        actors = [ray.remote(_Identity).options(num_cpus=0.1).remote() for _ in range(stages)]
        payload = _frame(width, height)
        plain = _time_calls(lambda x: ray.get(_chain_plain(actors, x)), payload, iterations)
        compiled, compiled_error = _time_compiled(actors, payload, iterations)
    result = {"machine": machine_info(), "stages": stages, "iterations": iterations, "frame": [width, height],
              "plain_ms": _summary(plain), "compiled_ms": _summary(compiled) if compiled else None,
              "compiled_error": compiled_error}
    body = render(result)
    publish("overhead", body, result, write=write)
    return result


def _chain_plain(actors: list[Any], payload: Any) -> Any:
    ref = payload
    for actor in actors:
        ref = actor.process.remote(ref)
    return ref


def _time_compiled(actors: list[Any], payload: Any, iterations: int) -> tuple[list[float] | None, str | None]:
    from ray.dag import InputNode

    try:
        with InputNode() as source:
            node = source
            for actor in actors:
                node = actor.process.bind(node)
        compiled = node.experimental_compile()
    except Exception as exc:  # noqa: BLE001 - the evaluation records why compiled graphs are unavailable
        return None, f"{type(exc).__name__}: {exc}"
    try:
        # the first execution starts the actors' execution loops; on a busy machine it can take longer
        # than Ray's default 10 s read timeout, so wait longer rather than mistake slowness for failure
        compiled.execute(payload).get(timeout=COMPILED_TIMEOUT_S)
        return _time_calls(lambda x: compiled.execute(x).get(timeout=COMPILED_TIMEOUT_S), payload, iterations), None
    except Exception as exc:  # noqa: BLE001 - a hang or channel error is a finding of the evaluation, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        compiled.teardown()


def _summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in samples)
    return {"min": ms[0], "median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))], "max": ms[-1]}


def render(result: dict) -> str:
    rows = [["plain actor calls", *_cells(result["plain_ms"])]]
    if result["compiled_ms"]:
        rows.append(["Ray Compiled Graph", *_cells(result["compiled_ms"])])
    lines = [
        "## Runtime overhead per frame: plain actor calls vs Ray Compiled Graphs",
        "",
        f"`blinkflow bench overhead` — one {result['frame'][0]}×{result['frame'][1]} frame through a chain of "
        f"{result['stages']} identity actors, {result['iterations']} round trips after warm-up; milliseconds.",
        "",
        machine_line(result["machine"]),
        "",
        markdown_table(["transport", "min", "median", "p90", "max"], rows),
    ]
    if result["compiled_ms"]:
        ratio = result["plain_ms"]["median"] / result["compiled_ms"]["median"]
        lines += ["", f"**Compiled ÷ plain per-frame latency: {1 / ratio:.2f}** (lower is better)."]
    else:
        lines += ["", f"Compiled graphs unavailable here: {result['compiled_error']}"]
    return "\n".join(lines)


def _cells(summary: dict[str, float]) -> list[str]:
    return [f"{summary[k]:.2f}" for k in ("min", "median", "p90", "max")]
