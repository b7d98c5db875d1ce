"""Tracking and object events on a scripted clip whose truth is known: IDs, crossings, zones, config errors.

The detector is a test-only stage (``scripted``) that outputs the scripted boxes of each frame it runs on,
so these tests check the tracker's and the events' logic exactly; the frames are drawn from the same
script (so the gate sees the objects move) and fed through the ``frames`` source.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blinkflow.config import load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame
from blinkflow.registry import stages as stage_registry
from blinkflow.runners.local import LocalRunner
from blinkflow.sinks import MemorySink, to_record
from tests.tracking_script import FRAMES, HEIGHT, OBJECTS, WIDTH, car_box, draw, person_box

REPO = Path(__file__).resolve().parents[1]
HYSTERESIS = 4.0


@pytest.fixture(autouse=True)
def scripted_stage():
    """The test-only detector (tests/scripted_stage.py), registered for each test and removed after it."""
    from tests import scripted_stage

    scripted_stage.register()
    yield
    scripted_stage.unregister()


ZONES = [{"name": "yard", "points": [[200, 120], [300, 120], [300, 230], [200, 230]]}]
LINES = [
    {"name": "gate", "points": [[160, 239], [160, 0]]},  # drawn upwards: moving right is "in"
    {"name": "road", "points": [[180, 100], [319, 100]]},  # drawn rightwards: moving down is "in"
]


def config(gate: dict | None = None, events: dict | None = None, track: dict | None = None, frames: int = FRAMES,
           **extra: Any) -> Any:
    return load_config(data={
        "sources": [{"type": "frames", "id": "cam", "fps": 25.0, "frames": [draw(t) for t in range(frames)]}],
        "gate": gate or {"enabled": False},
        "stages": {
            "scripted": {},
            "track": {"options": {"boxes_from": "scripted", "confirm_hits": 3, "max_lost_frames": 5, **(track or {})}},
            "events": {"options": {"zones": ZONES, "lines": LINES, "hysteresis": HYSTERESIS, **(events or {})}},
        },
        **extra,
    })


def run_local(cfg: Any) -> list[Any]:
    sink = MemorySink()
    LocalRunner(cfg, sinks=[sink]).run()
    return sink.results


def all_events(results: list[Any]) -> list[dict[str, Any]]:
    return [e for r in results for e in r.results.get("events", [])]


def ids_of(results: list[Any], name: str) -> set[int | None]:
    """The track ids the tracker gave the boxes of object ``name`` (matched by the script's box position)."""
    ids = set()
    for r in results:
        det = r.results.get("scripted")
        if not det or "track_ids" not in det:
            continue
        truth = OBJECTS[name][1](r.index if r.reuse_of is None else r.reuse_of)
        for box, track_id in zip(det["boxes"], det["track_ids"]):
            if truth is not None and np.allclose(box, truth):
                ids.add(track_id)
    return ids


def first_frame(condition) -> int:
    return next(t for t in range(FRAMES) if condition(t))


# --------------------------------------------------------------------------- truth


def test_scripted_clip_gives_exactly_the_scripted_events():
    results = run_local(config())
    assert [r.index for r in results] == list(range(FRAMES))
    car, person, parked = (ids_of(results, n) - {None} for n in ("car", "person", "parked"))
    # one ID per object, kept through the low-score stretch and the three-frame occlusion
    assert len(car) == len(person) == len(parked) == 1 and len(car | person | parked) == 3
    car, person, parked = car.pop(), person.pop(), parked.pop()
    got = [(e["type"], e["index"], e["track_id"], e.get("zone"), e.get("line"), e.get("direction"))
           for e in all_events(results)]

    def bottom_centre(box):
        return (box[0] + box[2]) / 2, box[3]

    gate_in = first_frame(lambda t: car_box(t) and bottom_centre(car_box(t))[0] >= 160 + HYSTERESIS)
    road_in = first_frame(lambda t: person_box(t) and bottom_centre(person_box(t))[1] >= 100 + HYSTERESIS)
    yard_in = first_frame(lambda t: person_box(t) and bottom_centre(person_box(t))[1] >= 120 + HYSTERESIS)
    person_end = 49 + 5 + 1  # last seen at 49, lost for more than max_lost_frames (5) frames
    expected = [
        ("new", 2, car, None, None, None),
        ("new", 2, parked, None, None, None),
        ("new", 12, person, None, None, None),
        ("cross_line", gate_in, car, None, "gate", "in"),
        ("cross_line", road_in, person, None, "road", "in"),
        ("enter_zone", yard_in, person, "yard", None, None),
        ("end", person_end, person, None, None, None),
        ("end", FRAMES - 1, car, None, None, None),
        ("end", FRAMES - 1, parked, None, None, None),
    ]
    assert sorted(got, key=lambda e: (e[1], e[0], e[2])) == sorted(expected, key=lambda e: (e[1], e[0], e[2]))
    ends = {e["track_id"]: e for e in all_events(results) if e["type"] == "end"}
    assert ends[person]["duration_s"] == pytest.approx((49 - 12) / 25.0)
    assert ends[car]["label"] == "car" and ends[car]["score"] == pytest.approx(0.9)
    # zone occupancy: the person is in the yard from its entry until its track ends
    counts = {r.index: r.results["zones"]["yard"] for r in results if "zones" in r.results}
    assert counts[yard_in - 1] == 0 and counts[yard_in] == 1 and counts[person_end - 1] == 1 and counts[person_end] == 0


def test_without_hysteresis_jitter_on_a_line_counts_many_crossings():
    results = run_local(config(events={"hysteresis": 0.0}))
    parked = (ids_of(results, "parked") - {None}).pop()
    crossings = [e for e in all_events(results) if e["type"] == "cross_line" and e["track_id"] == parked]
    assert len(crossings) > 20  # every jitter: what the default hysteresis prevents (test above: none)


@pytest.mark.slow
def test_ids_survive_reused_frames_with_the_gate_on():
    gate = {"enabled": True, "threshold": 0.05, "adaptive": False, "max_reuse": 3, "refresh": {}, "motion": "off",
            "tiles": None}
    on = run_local(config(gate=gate))
    off = run_local(config())
    assert sum(r.outcome.value == "reused" for r in on) >= FRAMES // 3
    for name in OBJECTS:  # every box of every frame, reused ones (carried boxes) included, has its object's one ID
        assert len(ids_of(on, name) - {None}) == 1

    def kinds(results):
        return sorted((e["type"], e.get("zone"), e.get("line"), e.get("direction")) for e in all_events(results))

    assert kinds(on) == kinds(off)
    def key(e):
        return e["type"], e["track_id"], e.get("line") or e.get("zone")

    shifted = {key(e): e["index"] for e in all_events(on)}
    for e in all_events(off):  # carried boxes lag the truth by at most max_reuse frames
        assert 0 <= shifted[key(e)] - e["index"] <= 3 + 1


def test_ids_survive_detector_gaps_and_failed_frames():
    cfg = config(track={"max_lost_frames": 10})
    cfg.stages["chaos"] = load_config(data={"stages": {"chaos": {"options": {"fail_indices": [20, 21, 22]}}}}).stages["chaos"]
    results = run_local(cfg)
    assert [r.outcome.value for r in results[20:23]] == ["failed"] * 3
    assert "track" not in results[21].results  # no boxes, no tracking output: a gap, not a miss
    for name in OBJECTS:
        assert len(ids_of(results, name) - {None}) == 1


# --------------------------------------------------------------------------- records, schema, snapshots


def test_records_and_events_validate_against_their_schemas(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    record_schema = jsonschema.Draft202012Validator(json.loads((REPO / "pipeline" / "frame-record.schema.json").read_text()))
    event_schema = jsonschema.Draft202012Validator(json.loads((REPO / "pipeline" / "event.schema.json").read_text()))
    results = run_local(config(events={"snapshots": str(tmp_path / "snaps")}))
    events = 0
    for result in results:
        record = json.loads(json.dumps(to_record(result)))
        record_schema.validate(record)
        assert record["ts"] == pytest.approx(result.ts) and abs(record["ts"] - __import__("time").time()) < 600
        for event in record.get("events", []):
            event_schema.validate(event)
            events += 1
            if event["track_id"] is not None:
                from PIL import Image

                with Image.open(event["snapshot"]) as image:
                    assert image.format == "JPEG" and min(image.size) >= 10
    assert events == 9
    with pytest.raises(jsonschema.ValidationError):
        event_schema.validate({"type": "cross_line", "stream": "cam", "ts": 1.0, "pts": 0.0, "index": 0,
                               "track_id": 1, "label": "car", "score": 1.0, "line": "gate", "direction": "up"})
    with pytest.raises(jsonschema.ValidationError, match="'line' is a required property"):
        event_schema.validate({"type": "cross_line", "stream": "cam", "ts": 1.0, "pts": 0.0, "index": 0,
                               "track_id": 1, "label": "car", "score": 1.0, "direction": "in"})


def test_action_events_with_hysteresis():
    from blinkflow.stages.events import EventsStage

    stage = EventsStage(config().stages["events"])
    labels = ["walk"] * 2 + ["run"] + ["walk"] * 5 + ["run"] * 4 + [None] * 4
    frames = []
    for t, label in enumerate(labels):
        frame = Frame("cam", t, t / 10.0, np.zeros((8, 8, 3), np.uint8))
        frame.results["action"] = {"window": [t, t], "top": [{"label": label or "walk", "score": 0.9 if label else 0.1}]}
        frames.append(frame)
    released = stage.process(frames) + stage.end_stream("cam")
    assert [f.index for f in released] == list(range(len(labels)))
    got = [(e["type"], e["index"], e["label"], e.get("duration_s")) for f in released for e in f.results["events"]]
    # 'walk' holds 3 frames from 3 (the 1-frame 'run' at 2 is jitter); 'run' from 8 holds at 10; 3 low frames end it
    assert got == [("action_start", 5, "walk", None), ("action_end", 10, "walk", pytest.approx(0.5)),
                   ("action_start", 10, "run", None), ("action_end", 14, "run", pytest.approx(0.4))]


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("events, message", [
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1]]}]}, "stages.events.options.zones.0.points: a zone needs at least 3"),
    ({"lines": [{"name": "l", "points": [[5, 5], [5, 5]]}]}, "stages.events.options.lines.0.points: both ends"),
    ({"lines": [{"name": "l", "points": [[0, 0], [9, 9]], "stream": "nope"}]},
     "stages.events.options.lines.0.stream: no source has stream id 'nope'"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [2, 0]], "stream": "cam2"}]},
     "stages.events.options.zones.0.stream: no source has stream id 'cam2'"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1.5, 1], [0, 1]], "normalized": True}]},
     "stages.events.options.zones.0.points: normalized points lie in 0..1"),
    ({"lines": [{"points": [[0, 0], [9, 9]]}]}, "stages.events.options.lines.0.name: missing"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [2, 0]], "colour": "red"}]},
     "stages.events.options.zones.0.colour: unknown key"),
    ({"zones": [{"name": "z", "points": [[0, 0], [1, 1], [2, 2]]}]}, "stages.events.options.zones.0.points: the zone"),
    # corners on one line up to rounding: accepted (a zone that never fired), or said to cross (corners in order)
    ({"zones": [{"name": "z", "points": [[0.1, 0.3], [0.2, 0.6], [0.3, 0.9]], "normalized": True}]},
     "stages.events.options.zones.0.points: the zone [[0.1, 0.3], [0.2, 0.6], [0.3, 0.9]] has no area (its corners"),
    ({"zones": [{"name": "z", "points": [[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]], "normalized": True}]},
     "stages.events.options.zones.0.points: the zone [[0.1, 0.1], [0.5, 0.5], [0.9, 0.9]] has no area (its corners"),
    ({"lines": [{"name": "l", "points": [[float("nan"), 0], [float("nan"), 0]]}]},
     "stages.events.options.lines.0.points: every coordinate is a finite number"),
    ({"zones": [{"name": "z", "points": [[0, 0], [float("inf"), 1], [2, 0]]}]},
     "stages.events.options.zones.0.points: every coordinate is a finite number"),
    # a bowtie: accepted and read by the even-odd rule, or refused as having no area (the symmetric one)
    ({"zones": [{"name": "z", "points": [[0, 0], [100, 100], [100, 0], [0, 50]]}]},
     "stages.events.options.zones.0.points: the zone's edges 1 and 3 cross each other"),
    ({"zones": [{"name": "z", "points": [[0, 0], [100, 100], [100, 0], [0, 100]]}]},
     "stages.events.options.zones.0.points: the zone's edges 1 and 3 cross each other"),
])
def test_zone_and_line_mistakes_are_one_line_config_errors(events, message):
    with pytest.raises(ConfigError) as info:
        config(events=events, frames=2)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_events_need_track_and_track_needs_its_boxes():
    frames = [draw(0)]
    with pytest.raises(ConfigError, match=r"^stages.events: events come from tracks; add stages.track"):
        load_config(data={"sources": [{"type": "frames", "frames": frames}], "stages": {"events": {}}})
    with pytest.raises(ConfigError, match=r"^stages.track.options.boxes_from: .* add stages.detect"):
        load_config(data={"sources": [{"type": "frames", "frames": frames}], "stages": {"track": {}}})
    # a stage without boxes (it loaded, and every frame's track result was None)
    with pytest.raises(ConfigError, match=r"^stages.track.options.boxes_from: the flow stage gives no boxes to track; "
                                          r"name one that does \(detect\)"):
        load_config(data={"sources": [{"type": "frames", "frames": frames}],
                          "stages": {"detect": {}, "flow": {}, "track": {"options": {"boxes_from": "flow"}}}})


def test_the_gate_cannot_refresh_a_driver_stage():
    with pytest.raises(ConfigError, match=r"^gate.refresh.track: the track stage runs on every frame"):
        config(gate={"enabled": True, "refresh": {"track": 2}}, frames=2)


def test_track_and_events_run_in_the_driver_not_in_the_worker_graph():
    from blinkflow.graph import build_driver_graph, build_graph

    cfg = config(frames=2)
    assert [s.name for s in build_graph(cfg)] == ["scripted"]
    assert [s.name for s in build_driver_graph(cfg)] == ["track", "events"]
    assert "scripted" in stage_registry


def test_line_geometry_direction_convention():
    from blinkflow.stages.events import line_side, zone_depth

    line = np.array([[0.0, 100.0], [200.0, 100.0]])  # drawn rightwards
    below, along = line_side(line, (50.0, 110.0))
    assert below == pytest.approx(10.0) and along == pytest.approx(0.25)  # below = right side: moving down is "in"
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], dtype=float)
    assert zone_depth(square, (5, 2)) == pytest.approx(2) and zone_depth(square, (13, 5)) == pytest.approx(-3)
    assert math.isfinite(zone_depth(square, (0, 0)))


# --------------------------------------------------------------------------- metrics, label, runners


def test_prometheus_counts_events_crossings_and_zone_objects():
    from blinkflow.metrics import PrometheusRecorder

    recorder = PrometheusRecorder()
    sink = MemorySink()
    LocalRunner(config(), sinks=[sink], metrics=recorder).run()

    def value(name, **labels):
        return recorder.registry.get_sample_value(name, {"stream": "cam", **labels}) or 0.0

    assert value("blinkflow_events_total", type="new") == 3 and value("blinkflow_events_total", type="end") == 3
    assert value("blinkflow_line_crossings_total", line="gate", direction="in") == 1
    assert value("blinkflow_line_crossings_total", line="road", direction="in") == 1
    assert value("blinkflow_line_crossings_total", line="gate", direction="out") == 0
    assert value("blinkflow_zone_objects", zone="yard") == 0  # the person's track ended; the last frame has none


@pytest.mark.slow
def test_label_writes_events_jsonl_beside_the_records(tmp_path):
    from blinkflow.label import LabelRun, find_videos
    from tests.conftest import write_test_video

    video = write_test_video(tmp_path / "clip.mp4", frames=FRAMES)
    cfg = load_config(data={
        "label": {"formats": ["jsonl"], "executor": "local", "source": {"resize": [WIDTH, HEIGHT]}},
        "stages": {"scripted": {}, "track": {"options": {"boxes_from": "scripted", "max_lost_frames": 5}},
                   "events": {"options": {"zones": ZONES, "lines": LINES}}},
    })
    summary = LabelRun(find_videos([str(video)]), tmp_path / "out", cfg, ["jsonl"], progress=False).run()
    assert summary["done"] == 1
    events = [json.loads(line) for line in (tmp_path / "out" / "clip.events.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "out" / "clip.jsonl").read_text().splitlines()]
    assert events == [e for r in records for e in r.get("events", [])]
    assert sorted(e["type"] for e in events) == sorted(["new"] * 3 + ["end"] * 3 + ["cross_line"] * 2 + ["enter_zone"])
    assert not any("ts" in e for e in events)  # the wall clock made every re-run's files differ
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert set(manifest["videos"]["clip"]["outputs"]) == {"clip.jsonl", "clip.events.jsonl"}
    assert not list((tmp_path / "out").glob(".*partial*"))


def test_events_sink_writes_one_event_per_line_atomically(tmp_path):
    from blinkflow.config import SinkConfig
    from blinkflow.sinks import build_sinks

    path = tmp_path / "events.jsonl"
    sink = build_sinks([SinkConfig(type="events", path=str(path))])[0]
    LocalRunner(config(), sinks=[sink]).run()
    lines = path.read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[0])["type"] == "new"
    aborted = build_sinks([SinkConfig(type="events", path=str(tmp_path / "gone.jsonl"))])[0]
    aborted.abort()
    assert not list(tmp_path.glob("*gone*"))
    # live (a camera run): every event is in the file as soon as it is written, and an abort keeps them
    live = build_sinks([SinkConfig(type="events", path=str(tmp_path / "live.jsonl"), live=True)])[0]
    from blinkflow.sinks import MemorySink

    memory = MemorySink()
    LocalRunner(config(), sinks=[memory]).run()
    first = next(r for r in memory.results if r.results.get("events"))
    live.write(first)
    written = (tmp_path / "live.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == first.results["events"]
    live.abort()
    assert (tmp_path / "live.jsonl").read_text().splitlines() == written


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_and_ray_runners_give_identical_events():
    """The scripted detector runs in a Ray actor (tests/scripted_stage.py says how it is registered there);
    track and events run in the driver in both runners."""
    ray = pytest.importorskip("ray")
    from blinkflow.runners.ray import RayRunner

    gate = {"enabled": True, "threshold": 0.05, "adaptive": False, "max_reuse": 3, "refresh": {}, "motion": "off",
            "tiles": None}
    local = run_local(config(gate=gate))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        sink = MemorySink()
        RayRunner(config(gate=gate), sinks=[sink]).run()
    finally:
        ray.shutdown()

    def comparable(results):  # everything but the wall clock
        return [[{k: v for k, v in e.items() if k != "ts"} for e in r.results.get("events", [])]
                + [r.results.get("scripted"), r.results.get("track"), r.outcome.value] for r in results]

    assert len(all_events(local)) == 9
    assert comparable(sink.results) == comparable(local)


@pytest.mark.slow
def test_tracking_bench_scoring_on_the_scripted_clip():
    """The bench's motmetrics plumbing on a clip whose every figure is known: no ID switch; the only misses are
    the frames before each track is confirmed (confirm_hits 3: two frames each of three objects)."""
    mm = pytest.importorskip("motmetrics")
    from blinkflow.bench.tracking import _hypotheses, _iou_distances

    accumulator = mm.MOTAccumulator(auto_id=True)
    truth_count = 0
    for result in run_local(config()):
        truth = [(box_of(result.index), k) for k, (_, box_of, _, _) in enumerate(OBJECTS.values())
                 if box_of(result.index) is not None]
        truth_count += len(truth)
        boxes, ids = _hypotheses(result, "scripted")
        accumulator.update([k for _, k in truth], ids, _iou_distances([b for b, _ in truth], boxes))
    summary = mm.metrics.create().compute(accumulator, metrics=["idf1", "num_switches", "num_misses"], name="clip")
    assert int(summary["num_switches"].iloc[0]) == 0 and int(summary["num_misses"].iloc[0]) == 6
    assert float(summary["idf1"].iloc[0]) == pytest.approx(2 * (truth_count - 6) / (2 * truth_count - 6))


def test_overlay_labels_boxes_with_their_track_ids(monkeypatch):
    import torchvision.utils

    from blinkflow.sinks.overlay import _draw_boxes

    drawn = {}
    monkeypatch.setattr(torchvision.utils, "draw_bounding_boxes", lambda image, boxes, labels, **_: drawn.setdefault("labels", labels))
    _draw_boxes(None, {"boxes": [[0, 0, 4, 4], [1, 1, 5, 5]], "labels": [1, 2], "classes": ["car", "person"],
                       "scores": [0.91, 0.5], "track_ids": [7, None]})
    assert drawn["labels"] == ["#7 car 0.91", "person 0.50"]


def test_crossing_objects_of_one_class_keep_their_ids_by_their_motion():
    """Two same-class boxes pass through each other (IoU up to 1 at the crossing): the constant-velocity
    model keeps each ID on its own object instead of swapping them."""
    from blinkflow.stages.track import StreamTracker, TrackOptions, _Detections

    tracker = StreamTracker(TrackOptions(confirm_hits=2))
    owners: dict[int, set[str]] = {}
    for t in range(30):
        a, b = 20 + 6.0 * t, 200 - 6.0 * t  # left edges; they meet at t = 15
        boxes = np.array([[a, 50, a + 30, 90], [b, 52, b + 30, 92]], dtype=float)
        tracker.step(t, _Detections(boxes, np.array([0.9, 0.9]), ["car", "car"], None))
        for track in tracker.tracks:
            if track.id is not None and track.det is not None:
                owners.setdefault(track.id, set()).add("ab"[track.det])
    assert owners == {1: {"a"}, 2: {"b"}}


def _line_run(points: list[tuple[float, float]], size: float = 60.0) -> list[tuple[str, int, str | None]]:
    """A car's bottom-centre at ``points``, one frame each, against the line y = 100 from x = 0 to 100."""
    from blinkflow.config import StageConfig
    from blinkflow.stages.events import EventsOptions, EventsStage, LineOptions
    from blinkflow.stages.track import TrackOptions, TrackStage

    track = TrackStage(StageConfig(options=TrackOptions(confirm_hits=1)))
    events = EventsStage(StageConfig(options=EventsOptions(lines=[LineOptions(name="road", points=[[0, 100], [100, 100]])])))
    track.setup()
    events.setup()
    out = []
    for i, (x, y) in enumerate(points):
        frame = Frame("cam", i, i / 25.0, np.zeros((240, 320, 3), np.uint8))
        frame.results["detect"] = {"boxes": [[x - size / 2, y - size, x + size / 2, y]], "scores": [0.9], "classes": ["car"]}
        out += events.process(track.process([frame]))
    out += events.process(track.end_stream("cam")) + events.end_stream("cam")
    return [(e["type"], e["index"], e.get("direction")) for f in out for e in f.results.get("events", [])]


def test_a_crossing_is_where_the_path_meets_the_line_not_where_the_track_lands():
    # seen far apart (the gate, a detector gap): the path crosses y = 100 at x 96.7, on the line; it lands at x 110
    assert ("cross_line", 3, "in") in _line_run([(70, 70), (80, 80), (90, 90), (110, 120), (120, 130)])
    # the other way round: the path crosses at x 110, past the line's end, and lands at x 90, over the line
    assert not any(kind == "cross_line" for kind, *_ in _line_run([(150, 70), (140, 80), (130, 90), (90, 110), (85, 115)],
                                                                    size=120.0))


def test_a_stream_that_ends_and_comes_back_goes_on_with_new_track_ids():
    """A camera removed and added again (or a restarted stream) under its id: its new tracks took ids 1, 2, ...
    again, the same ids as its old tracks in the same events file and MQTT topic."""
    from blinkflow.config import StageConfig
    from blinkflow.stages.track import TrackOptions, TrackStage

    track = TrackStage(StageConfig(options=TrackOptions(confirm_hits=1)))
    track.setup()

    def one_car(index: int) -> Frame:
        frame = Frame("cam", index, index / 25.0, np.zeros((240, 320, 3), np.uint8))
        frame.results["detect"] = {"boxes": [[100, 100, 160, 140]], "scores": [0.9], "classes": ["car"]}
        return frame

    def ids(frames: list[Frame]) -> set[int]:
        return {t["id"] for f in frames for t in (f.results.get("track") or {}).get("tracks", [])}

    first = track.process([one_car(i) for i in range(3)])
    track.end_stream("cam")
    again = track.process([one_car(i) for i in range(3)])  # the same id, from frame 0
    restarted = track.process([one_car(0)])  # a restart within the run (its index goes back)
    assert ids(first) == {1} and ids(again) == {2} and ids(restarted) == {3}



def test_a_zone_outside_the_delivered_frames_is_said_once(caplog):
    """A zone drawn on a 1280x960 screenshot while the source delivers 320x240 frames never fired, silently."""
    far = [{"name": "far", "points": [[900, 700], [1200, 700], [1200, 900], [900, 900]]}]
    with caplog.at_level(logging.WARNING):
        run_local(config(events={"zones": far}, frames=6))
    said = [r.getMessage() for r in caplog.records if "'far' lies outside stream cam's" in r.getMessage()]
    assert len(said) == 1 and "320x240" in said[0] and "normalized" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_local(config(frames=6))  # the shipped zones lie inside
    assert not any("lies outside" in r.getMessage() for r in caplog.records)


def test_snapshots_of_two_streams_and_of_a_restarted_run_never_overwrite_each_other(tmp_path):
    """'cam 1' and 'cam/1' shared the folder cam_1 (one camera's event showed the other's object), and a restarted
    service numbering frames and tracks from the start again overwrote the snapshots earlier events point to."""
    import numpy as np

    from blinkflow.frame import Frame
    from blinkflow.stages.events import EventsStage

    cfg = config(events={"snapshots": str(tmp_path / "snaps")}, frames=2).stages["events"]
    paths = []
    for run in range(2):
        stage = EventsStage(cfg)
        for stream, colour in (("cam 1", 40), ("cam/1", 200)):
            frame = Frame(stream, 3, 0.1, np.full((48, 64, 3), colour, np.uint8))
            paths.append(stage._write_snapshot(frame, "new", 1, frame.image[:10, :10]))
    assert len(set(paths)) == 4 and all(Path(p).is_file() for p in paths)
    assert Path(paths[0]).parent != Path(paths[1]).parent  # two streams, two folders
    assert Path(paths[0]).read_bytes() != Path(paths[1]).read_bytes()
    assert Path(paths[2]).name == "00000003-new-1-2.jpg"  # the second run's: a name of its own


@pytest.mark.parametrize("points, bad", [
    ([[0, 0], [4, 4], [10, 10], [12, 0], [0, 6]], True),  # an edge through another's corner (4, 4)
    ([[0, 0], [10, 0], [5, 0], [5, 5]], True),  # a spike folding back along its neighbour
    ([[0, 0], [4, 4], [10, 10], [12, 0]], False),  # a corner on a straight side: fine
    ([[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]], False),  # closed by repeating the first corner: fine
    ([[0, 0], [10, 0], [10, 10], [10, 10], [0, 10]], False),  # a corner given twice: fine
])
def test_zone_edges_that_meet_anywhere_but_their_shared_corner_are_refused(points, bad):
    from blinkflow.stages.events import _crossing_edges

    assert (_crossing_edges(points) is not None) == bad


def _drive(boxes_per_frame: list[list[list[float]] | None], zones: list[dict] = (), lines: list[dict] = (),
           reused_from: dict[int, int] | None = None, confirm_hits: int = 1) -> list[tuple[str, int, Any]]:
    """The track and events stages on a 640x360 stream of one car's boxes (None: no detector output); frames in
    ``reused_from`` are gate-reused ones carrying the named keyframe's boxes. Returns (type, index, zone/line)."""
    from blinkflow.config import StageConfig
    from blinkflow.frame import GateMark
    from blinkflow.stages.events import EventsOptions, EventsStage, LineOptions, ZoneOptions
    from blinkflow.stages.track import TrackOptions, TrackStage

    track = TrackStage(StageConfig(options=TrackOptions(confirm_hits=confirm_hits)))
    events = EventsStage(StageConfig(options=EventsOptions(zones=[ZoneOptions(**z) for z in zones],
                                                           lines=[LineOptions(**line) for line in lines])))
    track.setup()
    events.setup()
    out = []
    for i, boxes in enumerate(boxes_per_frame):
        frame = Frame("cam", i, i / 25.0, np.zeros((360, 640, 3), np.uint8))
        if reused_from and i in reused_from:
            frame.gate = GateMark(reuse_of=reused_from[i])
        if boxes is not None:
            frame.results["detect"] = {"boxes": boxes, "scores": [0.9] * len(boxes), "classes": ["car"] * len(boxes)}
        out += events.process(track.process([frame]))
    out += events.process(track.end_stream("cam")) + events.end_stream("cam")
    return [(e["type"], e["index"], e.get("zone") or e.get("line")) for f in out for e in f.results.get("events", [])]


@pytest.mark.parametrize("bottom", [360.0, 359.5, 358.0, 350.0])
def test_a_zone_along_the_frames_border_counts_an_object_that_touches_the_border(bottom):
    # camera.yaml's driveway: the bottom right quarter, normalized; boxes are clamped to the frame, so a car at
    # the bottom stands exactly on the zone's bottom edge, which no object can go past
    driveway = {"name": "driveway", "normalized": True, "points": [[0.55, 0.5], [1, 0.5], [1, 1], [0.55, 1]]}
    got = _drive([[[10 + 10 * i, 280, 90 + 10 * i, bottom]] for i in range(50)], zones=[driveway])
    assert [e for e in got if e[0] in ("enter_zone", "exit_zone")] == [("enter_zone", 31, "driveway")]


@pytest.mark.parametrize("bottom", [360.0, 359.0, 340.0])
def test_a_line_drawn_to_the_screenshots_last_row_counts_objects_touching_the_bottom(bottom):
    entrance = {"name": "entrance", "points": [[320, 359], [320, 0]]}  # README, configs/camera.yaml
    got = _drive([[[200 + 10 * i, 280, 260 + 10 * i, bottom]] for i in range(20)], lines=[entrance])
    assert [e for e in got if e[0] == "cross_line"] == [("cross_line", 10, "entrance")]  # centre 330: 10 px past


def test_a_box_the_detector_saw_once_gets_no_id_however_long_the_gate_carries_it():
    box = [[100, 100, 160, 160]]
    once = [None] * 10 + [box] * 5 + [[]] * 10  # seen on frame 10; frames 11-14 reuse it (carried copies)
    assert _drive(once, reused_from={i: 10 for i in range(11, 15)}, confirm_hits=3) == []
    # seen by the detector on three frames, the same boxes: confirmed, one ID from its third sighting on
    assert _drive(once, confirm_hits=3) == [("new", 12, None), ("end", 24, None)]


def test_a_synthetic_source_without_an_id_is_known_to_the_events_stage():
    """Its default id was read from a setting that does not exist: any such config with events was a traceback."""
    def with_zone_on(stream: str):
        zone = {"name": "z", "points": [[0, 0], [10, 0], [10, 10]], "stream": stream}
        return load_config(data={"sources": [{"type": "synthetic", "num_frames": 2, "seed": 7}],
                                 "stages": {"detect": {"weights": None}, "track": {}, "events": {"options": {"zones": [zone]}}}})

    assert with_zone_on("synthetic-7").stages["events"].options.zones[0].stream == "synthetic-7"
    with pytest.raises(ConfigError, match=r"zones.0.stream: no source has stream id 'synthetic-1'; known: synthetic-7"):
        with_zone_on("synthetic-1")


@pytest.mark.parametrize("options, message", [
    ({"new_track_threshold": 0.3}, r"^stages\.track\.options\.new_track_threshold: 0\.3 is below high_threshold \(0\.5\)"),
    ({"high_threshold": 0.7}, r"^stages\.track\.options\.new_track_threshold: 0\.6 is below high_threshold \(0\.7\)"),
    ({"low_threshold": 0.6}, r"^stages\.track\.options\.low_threshold: 0\.6 is above high_threshold"),
])
def test_track_thresholds_that_would_do_nothing_are_config_errors(options, message):
    """new_track_threshold under high_threshold was accepted and did nothing (only high detections start tracks):
    boxes scoring 0.4 with new_track_threshold 0.3 never started one."""
    with pytest.raises(ConfigError, match=message):
        load_config(data={"sources": [{"type": "synthetic"}],
                          "stages": {"detect": {"model": "yolox_nano", "weights": None},
                                     "track": {"options": options}}})
    load_config(data={"sources": [{"type": "synthetic"}],  # the same lowered together: fine
                      "stages": {"detect": {"model": "yolox_nano", "weights": None},
                                 "track": {"options": {"high_threshold": 0.3, "new_track_threshold": 0.3}}}})
