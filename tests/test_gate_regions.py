"""The per-region accuracy budget (``gate.region_budget``): audits say where carried-over results disagreed,
and tiles whose change the audits found harmless count less towards the threshold."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.config import GateConfig, load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame, GateMark
from blinkflow.gate.carry import CarryOver
from blinkflow.gate.policy import REGION_FLOOR, budgeted_regions, weighted_count
from blinkflow.stages.gate import Gate


def test_harmless_changed_tiles_count_less_and_a_harmed_tile_counts_in_full_again():
    changed = np.array([[True, True], [False, False]])
    clean = np.zeros((2, 2), np.float32)
    weights = budgeted_regions(None, changed, clean)
    assert weights.tolist() == [[0.5, 0.5], [1.0, 1.0]]  # unchanged tiles say nothing about reuse there
    for _ in range(3):
        weights = budgeted_regions(weights, changed, clean)
    assert weights.tolist() == [[REGION_FLOOR, REGION_FLOOR], [1.0, 1.0]]  # discounted, never ignored
    harmed = np.array([[0.2, 0.01], [0.0, 0.0]], np.float32)  # a fifth of the top-left tile disagreed
    assert budgeted_regions(weights, changed, harmed).tolist() == [[1.0, REGION_FLOOR], [1.0, 1.0]]


def test_changed_pixels_count_by_their_tiles_weight():
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = mask[0, 1] = mask[3, 3] = True
    assert weighted_count(mask, np.array([[0.25, 1.0], [1.0, 1.0]], np.float32)) == pytest.approx(2 * 0.25 + 1)


def _frame(index: int, image: np.ndarray, feedback: list | None = None) -> Frame:
    frame = Frame(stream_id="s", index=index, pts=float(index), image=image)
    if feedback is not None:
        frame.gate = GateMark(feedback=feedback)
    return frame


def test_the_gate_reuses_a_change_where_audits_found_it_harmless_until_one_finds_harm():
    """A patch of the top-left tile keeps changing (a screen, leaves). Three audits of frames where it had
    changed found the results unchanged there: the same change then counts a quarter and falls under the
    threshold. An audit that found disagreement there makes it count in full again."""
    cfg = GateConfig(enabled=True, adaptive=True, adapt_up=1.0, adapt_down=1.0, threshold=0.02, tiles=[2, 2],
                     region_budget=True, refresh={}, carry_until={}, audit_uncertain=0.0, max_reuse=1000)
    gate = Gate(cfg)
    still = np.kron(np.random.default_rng(0).integers(40, 200, (8, 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
    flicker = still.copy()
    flicker[:16, :16] = 255 - flicker[:16, :16]  # 1/16 of the frame, inside the top-left tile
    gate.process([_frame(0, still)])
    state = gate.policy.streams["s"]

    def after(feedback: list, index: int) -> dict:
        frame = gate.process([_frame(index, flicker, feedback)])[0]
        return frame.results["gate"]

    top_left = np.array([[True, False], [False, False]])
    first = after([], 1)
    assert first["decision"] != "reuse" and first["changed"] > cfg.threshold and "discounted_tiles" not in first
    for n, index in enumerate((10, 11, 12)):  # three audits whose change covered the tile, all clean there
        state.pending_audits[index], state.pending_regions[index] = first["changed"], top_left
        gate.process([_frame(20 + 2 * n, still, [(index, 1.0, np.zeros((2, 2), np.float32))])])
    discounted = after([], 30)
    assert discounted["discounted_tiles"] == 1
    assert discounted["weighted"] == pytest.approx(first["changed"] * REGION_FLOOR, rel=1e-3)
    assert discounted["decision"] == "reuse"
    state.pending_audits[13], state.pending_regions[13] = first["changed"], top_left
    harmed = np.array([[0.5, 0.0], [0.0, 0.0]], np.float32)
    gate.process([_frame(31, still, [(13, 0.6, harmed)])])
    restored = after([], 32)
    assert restored["discounted_tiles"] == 0 and restored["decision"] != "reuse"


def test_the_driver_says_on_which_tiles_an_audit_disagreed():
    carry = CarryOver(enabled=True, motion="off", lag=1, adaptive=True, regions=(2, 2))
    keyframe = {"gate": {"decision": "keyframe"},
                "detect": {"boxes": [[0, 0, 10, 10], [30, 20, 46, 30]], "labels": [1, 1]}}
    fresh = {"gate": {"decision": "keyframe", "reason": "audit"}, "detect": {"boxes": [[0, 0, 10, 10]], "labels": [1]}}
    audit = Frame(stream_id="s", index=5, pts=0.0, image=np.zeros((32, 48, 3), np.uint8))
    audit.results, audit.gate = fresh, GateMark(audit_of=0)
    carry.observe(audit, keyframe)
    later = Frame(stream_id="s", index=6, pts=0.0, image=np.zeros((32, 48, 3), np.uint8))
    carry.attach_feedback([later])
    (index, score, where), = later.gate.feedback
    assert index == 5 and score == pytest.approx(2 / 3)
    # the box only the carry-over had, 16 x 10 pixels of the bottom-right 24 x 16 tile
    assert where.tolist() == [[0.0, 0.0], [0.0, pytest.approx(160 / 384)]]


def test_region_budget_needs_tiles_and_the_adaptive_gate():
    with pytest.raises(ConfigError, match=r"gate\.region_budget: .*set tiles"):
        load_config(data={"gate": {"enabled": True, "region_budget": True, "tiles": None}})
    with pytest.raises(ConfigError, match=r"gate\.region_budget: .*set adaptive: true"):
        load_config(data={"gate": {"enabled": True, "region_budget": True, "adaptive": False}})
