"""Object-aware change (``gate.object_weight``): change on the stream's recent boxes counts more towards
the threshold than change elsewhere; the driver hands the gate those boxes with the audits' lag."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.config import GateConfig, load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame, GateMark
from blinkflow.gate.carry import CarryOver
from blinkflow.gate.policy import object_grid
from blinkflow.stages.gate import Gate


def _textured(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.integers(40, 200, (12, 16, 3), dtype=np.uint8), np.ones((8, 8, 1), dtype=np.uint8))  # 96x128


def _second_frame(threshold: float, weight: float, objects: list[list[float]] | None) -> dict:
    """The gate's result on a frame where a 16x16 block turned white (x 56..72, y 40..56)."""
    base = _textured()
    changed = base.copy()
    changed[40:56, 56:72] = 255
    gate = Gate(GateConfig(enabled=True, threshold=threshold, adaptive=False, refresh={}, max_reuse=100,
                           audit_uncertain=0.0, tiles=None, motion="off", object_weight=weight))
    first, second = Frame("s", 0, 0.0, base), Frame("s", 1, 0.1, changed)
    second.gate = GateMark(objects=objects)
    gate.process([first])
    return gate.process([second])[0].results["gate"]


def test_object_grid_grows_each_box_by_the_margin_on_the_signal_grid():
    grid = object_grid([[8, 8, 24, 16]], (8, 12), downscale=4, margin=0.5)
    expected = np.zeros((8, 12), dtype=bool)
    expected[1:5, 0:8] = True  # x 0..32 and y 4..20 in frame pixels
    assert np.array_equal(grid, expected)
    assert not object_grid([], (8, 12), 4, 0.5).any()


def test_change_on_a_recent_object_counts_more_than_the_same_change_elsewhere():
    plain = _second_frame(0.5, 1.0, None)["changed"]
    assert 0.0 < plain < 0.1
    threshold = 2 * plain  # the plain change alone is reused
    on_object = _second_frame(threshold, 4.0, [[52, 36, 76, 60]])
    elsewhere = _second_frame(threshold, 4.0, [[0, 0, 24, 24]])
    off = _second_frame(threshold, 1.0, [[52, 36, 76, 60]])
    assert on_object["decision"] == "keyframe" and on_object["weighted"] == pytest.approx(min(1.0, 4 * plain), rel=0.01)
    assert elsewhere["decision"] == "reuse" and elsewhere["weighted"] == pytest.approx(plain)
    assert off["decision"] == "reuse" and "weighted" not in off  # object_weight 1: boxes are ignored
    assert on_object["changed"] == elsewhere["changed"] == pytest.approx(plain)  # the plain fraction is reported too


def test_the_driver_hands_the_gate_the_boxes_of_the_latest_frame_at_least_the_lag_older():
    carry = CarryOver(motion="off", lag=2, objects=True)
    for index in range(4):
        frame = Frame("s", index, 0.0, np.zeros((32, 48, 3), dtype=np.uint8))
        frame.results = {"gate": {"decision": "keyframe"}, "detect": {"boxes": [[index, 0, 10, 10]], "labels": [1]}}
        carry.observe(frame, None)
    waiting = Frame("s", 6, 0.0, np.zeros((32, 48, 3), dtype=np.uint8))
    assert not carry.ready_for(waiting, next_index=4)  # frame 4 is not out yet: the Ray runner waits for it
    assert carry.ready_for(waiting, next_index=5)
    fourth, fifth = (Frame("s", i, 0.0, np.zeros((32, 48, 3), dtype=np.uint8)) for i in (4, 5))
    carry.attach_feedback([fourth, fifth])
    assert fourth.gate.objects == [[2.0, 0.0, 10.0, 10.0]] and fifth.gate.objects == [[3.0, 0.0, 10.0, 10.0]]
    again = Frame("s", 5, 0.0, np.zeros((32, 48, 3), dtype=np.uint8))
    carry.attach_feedback([again])
    assert again.gate.objects == [[3.0, 0.0, 10.0, 10.0]]  # the latest due boxes stay for the next frames
    assert CarryOver(motion="off", lag=2).ready_for(waiting, next_index=0)  # off: nothing to wait for


def test_object_weight_below_one_is_a_config_error_naming_its_path():
    with pytest.raises(ConfigError, match=r"gate\.object_weight"):
        load_config(data={"gate": {"enabled": True, "object_weight": 0.5}})
