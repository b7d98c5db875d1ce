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
    # wholly off the frame (a custom stage's unclipped box): its negative end wrapped round to the far side
    assert not object_grid([[-100, 4, -60, 12], [200, 10, 260, 20]], (8, 12), 4, 0.5).any()


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
    carry = CarryOver(enabled=True, motion="off", lag=2, objects=True)
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
    assert CarryOver(motion="off", lag=2).ready_for(waiting, next_index=0)  # no gate: nothing to wait for
    # any gate waits: a failure reaches it with the lag in every runner, adaptive or not
    assert not CarryOver(enabled=True, motion="off", lag=2).ready_for(waiting, next_index=0)


def test_object_weight_below_one_is_a_config_error_naming_its_path():
    with pytest.raises(ConfigError, match=r"gate\.object_weight"):
        load_config(data={"gate": {"enabled": True, "object_weight": 0.5}})


# --------------------------------------------------------------------------- carry_until: skips per stage


def _with_blocks(base: np.ndarray, corners: list[tuple[int, int]]) -> np.ndarray:
    image = base.copy()
    for y, x in corners:
        image[y : y + 16, x : x + 16] = 255
    return image


def _carry_gate(threshold: float, detect_bound: int = 8) -> Gate:
    return Gate(GateConfig(enabled=True, threshold=threshold, adaptive=False, max_reuse=100, audit_uncertain=0.0,
                           tiles=[8, 8], tile_margin=0, motion="off", refresh={"segment": 4, "detect": detect_bound},
                           carry_until={"detect": 3.0}))


def test_a_small_change_runs_the_segmenter_on_its_tiles_and_carries_the_boxes():
    base = _textured()
    one = _second_frame(0.5, 1.0, None)["changed"]  # what one 16x16 block changes
    gate = _carry_gate(one / 1.5)  # one block passes the threshold; three pass 3 x threshold
    images = [base, _with_blocks(base, [(40, 56)]), _with_blocks(base, [(40, 64)]),
              _with_blocks(base, [(40, 64), (8, 8), (72, 96)])]
    frames = gate.process([Frame("s", i, i / 10, image) for i, image in enumerate(images)])
    gates = [f.results["gate"] for f in frames]
    assert [(g["decision"], g.get("reason")) for g in gates] == [
        ("keyframe", "first"), ("refresh", "changed"), ("refresh", "changed"), ("partial", "changed")]
    first, second = frames[1], frames[2]
    assert gates[1]["carried"] == ["detect"] and gates[1]["stages"] == ["segment"]
    assert first.runs("segment") and not first.runs("detect") and first.runs("track")  # unbounded stages run
    assert first.mark.audit_of is None  # a refresh for change scores nothing
    assert first.gate.tiles["changed"] == [27, 28, 35, 36]  # the block's 2 x 2 tiles of 12 x 16 pixels
    # the second frame's tiles, against the segmenter's own results (frame 1): where the block was and went
    assert {27, 29, 35, 37} <= set(second.gate.tiles["changed"]) <= {27, 28, 29, 35, 36, 37}
    assert second.gate.tiles["bases"] == {"segment": 1}  # the segmenter's cache holds frame 1, the detector's 0


def test_without_another_bounded_stage_a_small_change_is_a_partial_frame():
    """The gate knows the stages by their refresh bounds only: with the detector the one bounded stage,
    carrying it would leave nothing it knows to run, so every stage runs."""
    base = _textured()
    one = _second_frame(0.5, 1.0, None)["changed"]
    gate = Gate(GateConfig(enabled=True, threshold=one / 1.5, adaptive=False, max_reuse=100, audit_uncertain=0.0,
                           tiles=[8, 8], tile_margin=0, motion="off", refresh={"detect": 8}, carry_until={"detect": 3.0}))
    frames = gate.process([Frame("s", 0, 0.0, base), Frame("s", 1, 0.1, _with_blocks(base, [(40, 56)]))])
    assert frames[1].results["gate"]["decision"] == "partial" and frames[1].runs("segment")


def test_a_carried_stage_runs_once_its_refresh_bound_is_reached():
    base = _textured()
    one = _second_frame(0.5, 1.0, None)["changed"]
    gate = _carry_gate(one / 1.5, detect_bound=2)
    images = [base] + [_with_blocks(base, [(40, 40 + 8 * i)]) for i in range(4)]
    frames = gate.process([Frame("s", i, i / 10, image) for i, image in enumerate(images)])
    assert [f.results["gate"]["decision"] for f in frames] == ["keyframe", "refresh", "refresh", "partial", "refresh"]


@pytest.mark.parametrize("carry, message", [
    ({"detect": 0.5}, r"gate\.carry_until\.detect: expected a factor >= 1"),
    ({"detcet": 2.0}, r"gate\.carry_until\.detcet: unknown stage 'detcet'; valid: .*detect"),
])
def test_carry_until_names_stages_and_factors_of_at_least_one(carry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data={"gate": {"enabled": True, "carry_until": carry}, "stages": {"detect": {}, "segment": {}}})


def test_a_stage_without_a_refresh_bound_or_not_in_the_graph_is_not_carried():
    unbounded = load_config(data={"gate": {"enabled": True, "refresh": {"segment": 4}}, "stages": {"detect": {}, "segment": {}}})
    absent = load_config(data={"gate": {"enabled": True}, "stages": {"segment": {}}})
    default = load_config(data={"gate": {"enabled": True}, "stages": {"detect": {}, "segment": {}}})
    assert unbounded.gate.carry_until == {} and absent.gate.carry_until == {}
    assert default.gate.carry_until == {"detect": 3.0}


def test_object_tiles_grow_a_partial_frame_to_the_whole_objects_it_touches():
    from blinkflow.gate.policy import grown_by_objects

    objects = np.zeros((16, 16), dtype=bool)
    objects[0:8, 0:6] = True  # one object over tiles 0, 1 (and 4, 5) of a 4x4 grid of 4x4 cells
    objects[12:16, 12:16] = True  # another in tile 15, untouched by the change
    assert grown_by_objects([5, 6], objects, [4, 4]) == [0, 1, 4, 5, 6]
    assert grown_by_objects([10], objects, [4, 4]) == [10]

    base = _textured()
    changed = base.copy()
    changed[40:56, 56:72] = 255
    results = {}
    for grow in (False, True):
        gate = Gate(GateConfig(enabled=True, threshold=0.001, adaptive=False, refresh={}, max_reuse=100,
                               audit_uncertain=0.0, tiles=[8, 8], tile_margin=0, motion="off", object_tiles=grow))
        gate.process([Frame("s", 0, 0.0, base)])
        second = Frame("s", 1, 0.1, changed)
        second.gate = GateMark(objects=[[48, 0, 80, 60]])  # an object reaching up from the change to the top
        results[grow] = gate.process([second])[0]
    assert results[False].results["gate"]["decision"] == results[True].results["gate"]["decision"] == "partial"
    plain, grown = set(results[False].gate.tiles["changed"]), set(results[True].gate.tiles["changed"])
    assert plain < grown and {3, 4} <= {t % 8 for t in grown - plain} and min(grown) < 8  # up to the first row


@pytest.mark.slow
def test_records_of_every_gate_decision_validate_against_the_record_schema():
    """A refresh for change wrote gate.carried, and object_weight / region_budget wrote weighted and
    discounted_tiles, none of which the schema (additionalProperties: false) allowed: the demo's own records
    failed it."""
    import json

    jsonschema = pytest.importorskip("jsonschema")
    from blinkflow.runners.local import LocalRunner
    from blinkflow.sinks import MemorySink, to_record
    from tests.conftest import REPO_ROOT

    cfg = load_config(REPO_ROOT / "configs" / "synthetic.yaml", [
        "sources.0.num_frames=40", "gate.enabled=true", "gate.carry_until={detect: 3}", "gate.object_weight=1.5",
        "gate.region_budget=true", "gate.refresh={segment: 4, detect: 8}"])
    cfg.sinks = []
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    schema = jsonschema.Draft202012Validator(json.loads((REPO_ROOT / "pipeline" / "frame-record.schema.json").read_text()))
    keys = set()
    for result in sink.results:
        schema.validate(json.loads(json.dumps(to_record(result))))
        keys |= set(result.results.get("gate") or {})
    assert {"carried", "weighted", "discounted_tiles", "tiles", "stages", "audit_of"} <= keys
    assert {(r.results.get("gate") or {}).get("decision") for r in sink.results} == {"keyframe", "partial", "refresh", "reuse"}


@pytest.mark.parametrize("gate, stages, message", [
    ({"object_weight": 4.0}, {"segment": {}}, r"^gate\.object_weight: .*no stage gives boxes; add a detect stage, or set object_weight: 1"),
    ({"object_tiles": True, "tiles": [8, 8]}, {"segment": {}}, r"^gate\.object_tiles: .*no stage gives boxes"),
    ({"object_tiles": True, "tiles": None}, {"detect": {}, "segment": {}}, r"^gate\.object_tiles: .*gate\.tiles is null"),
    ({"object_weight": 4.0}, {"detect": {"enabled": False}, "segment": {}}, r"^gate\.object_weight: "),
])
def test_object_settings_that_would_do_nothing_are_config_errors(gate, stages, message):
    """object_weight without a stage that gives boxes ran with 'weighted' equal to 'changed' on every frame."""
    with pytest.raises(ConfigError, match=message):
        load_config(data={"gate": {"enabled": True, **gate}, "stages": stages})
    load_config(data={"gate": {"enabled": True, "object_weight": 4.0, "object_tiles": True, "tiles": [8, 8]},
                      "stages": {"detect": {}, "segment": {}}})  # with boxes and tiles: fine
    load_config(data={"gate": {"enabled": False, **gate}, "stages": stages})  # a gate that is off: not checked
