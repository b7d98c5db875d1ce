"""The file source decodes ahead of the RGB conversion in a thread of its own (blinkflow.sources.read_ahead)."""
from __future__ import annotations

import threading

import pytest

from blinkflow.sources import read_ahead


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_items_arrive_in_order_and_the_thread_ends():
    assert list(read_ahead(iter(range(100)), depth=3, name="ra-order")) == list(range(100))
    assert not _threads("ra-order")


def test_an_error_arrives_after_the_items_before_it():
    def items():
        yield from range(5)
        raise ValueError("damaged at 5")

    got = []
    with pytest.raises(ValueError, match="damaged at 5"):
        for item in read_ahead(items(), depth=2, name="ra-error"):
            got.append(item)
    assert got == [0, 1, 2, 3, 4]


def test_closing_early_stops_the_producer_and_closes_its_source():
    closed = threading.Event()
    produced = []

    def items():
        try:
            for n in range(10**6):
                produced.append(n)
                yield n
        finally:
            closed.set()

    ahead = read_ahead(items(), depth=4, name="ra-close")
    assert [next(ahead) for _ in range(3)] == [0, 1, 2]
    ahead.close()
    assert closed.is_set()  # the source was closed before close() returned: a container may be closed next
    assert not _threads("ra-close")
    assert len(produced) <= 3 + 4 + 2  # read at most its depth ahead
