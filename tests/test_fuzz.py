"""Property-based fuzzing (hypothesis, fixed seed, bounded examples) of what users and clients feed
Blinkflow: the config loader, ``--set`` overrides, the control endpoint's request parser and the frame
record writer. Whatever comes in, the answer is a value or a one-line BlinkflowError, never a
traceback, a hang or unbounded memory."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, seed, settings, strategies as st

from blinkflow.config import load_config
from blinkflow.control import handle
from blinkflow.control_guard import ControlGuard
from blinkflow.errors import BlinkflowError
from blinkflow.schema import parse_yaml
from blinkflow.streams import StreamHub

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

SECTIONS = st.sampled_from(["sources", "gate", "stages", "sinks", "metrics", "runtime", "control", "label", "x"])
KEYS = st.sampled_from(["type", "path", "batch", "enabled", "threshold", "detect", "segment", "0", "runner", "port",
                        "resize", "fps", "url", "model", "weights", "options", "score_threshold", "host", "auth"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=12)


def one_line(error: BaseException) -> bool:
    return isinstance(error, BlinkflowError) and "\n" not in str(error) and "Traceback" not in str(error)


@seed(20261202)
@FUZZ
@given(st.dictionaries(SECTIONS, VALUES, max_size=5))
def test_any_config_mapping_loads_or_is_a_one_line_config_error(raw):
    try:
        load_config(data=raw)
    except Exception as error:  # noqa: BLE001 - the property: only one-line Blinkflow errors
        assert one_line(error), repr(error)


@seed(20261202)
@FUZZ
@given(st.text(max_size=400))
def test_any_yaml_text_parses_or_is_a_one_line_config_error(text):
    try:
        parse_yaml(text, "fuzz.yaml")
    except Exception as error:  # noqa: BLE001
        assert one_line(error), repr(error)


@seed(20261202)
@FUZZ
@given(st.lists(st.text(max_size=40), max_size=4))
def test_any_set_overrides_apply_or_are_one_line_errors(overrides):
    try:
        load_config(data={"sources": [{"type": "synthetic"}]}, overrides=overrides)
    except Exception as error:  # noqa: BLE001
        assert one_line(error), repr(error)


@seed(20261202)
@FUZZ
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]), path=st.text(max_size=30),
       body=st.one_of(st.binary(max_size=200), VALUES.map(lambda v: json.dumps(v).encode())))
def test_any_control_request_gets_a_json_answer(method, path, body):
    hub = StreamHub(mode="live", keep_open=True)
    try:
        status, reply = handle(hub, method, "/" + path, body, ControlGuard(token=None))
    finally:
        hub.close(stop_streams=True)
    assert 200 <= status < 600 and isinstance(reply, dict)
    json.dumps(reply)  # always serialisable


@seed(20261202)
@FUZZ
@given(st.dictionaries(st.sampled_from(["detect", "segment", "action", "custom"]), VALUES, max_size=3))
def test_any_stage_results_become_a_json_record(results):
    from blinkflow.frame import FrameResult, Outcome
    from blinkflow.sinks import to_record

    result = FrameResult(stream_id="s", index=0, pts=0.0, width=4, height=4, outcome=Outcome.PROCESSED,
                         results=results)
    json.dumps(to_record(result))
