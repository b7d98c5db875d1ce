"""Sinks: JSONL and MP4 round trips, the documented schema, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blinkflow.config import SinkConfig
from blinkflow.frame import Frame, FrameResult, Outcome
from blinkflow.sinks import JsonlSink, MemorySink, Mp4OverlaySink, decode_dense_array, to_record
from blinkflow.stages.common import decode_class_map, encode_class_map
from tests.conftest import REPO_ROOT


def make_result(index: int, width: int = 64, height: int = 48, stream: str = "s"):
    image = np.full((height, width, 3), 20 * index % 255, dtype=np.uint8)
    frame = Frame(stream_id=stream, index=index, pts=index / 10, image=image)
    class_map = np.zeros((height, width), dtype=np.uint8)
    class_map[10:20, 10:30] = 2
    frame.results["detect"] = {"boxes": [[1.0, 2.0, 30.0, 40.0]], "labels": [1], "classes": ["disc"], "scores": [0.9]}
    frame.results["segment"] = {
        "mask": {"format": "png", "data": encode_class_map(class_map), "height": height, "width": width},
        "classes": ["background", "disc", "square"],
        "areas": {"background": height * width - 200, "square": 200},
    }
    flow = np.full((2, height // 2, width // 2), 1.5, dtype=np.float16)
    frame.results["flow"] = {"flow": flow, "scale": 2, "pair": [index - 1, index], "magnitude_mean": 2.1, "magnitude_max": 3.0}
    frame.results["action"] = {"window": [0, 7], "top": [{"label": "rotate", "score": 0.8}]}
    return frame.finish()


def test_jsonl_round_trip_keeps_every_field(tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    sink = JsonlSink(SinkConfig(type="jsonl", path=str(path), include_dense=True))
    results = [make_result(i) for i in range(3)]
    for result in results:
        sink.write(result)
    sink.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2]
    first = records[0]
    assert first["outcome"] == "processed" and first["stream"] == "s"
    assert first["detect"]["boxes"] == [[1.0, 2.0, 30.0, 40.0]]
    import base64

    class_map = decode_class_map(base64.b64decode(first["segment"]["mask"]["data"]))
    assert class_map.shape == (48, 64) and int((class_map == 2).sum()) == 200
    flow = decode_dense_array(first["flow"]["flow"])
    assert flow.dtype == np.float16 and flow.shape == (2, 24, 32) and float(flow[0, 0, 0]) == 1.5


def test_jsonl_omits_dense_flow_unless_asked(tmp_path):
    record = to_record(make_result(1), include_dense=False)
    assert "flow" not in record["flow"] and record["flow"]["magnitude_mean"] == 2.1


def test_records_match_the_documented_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((REPO_ROOT / "pipeline" / "frame-record.schema.json").read_text())
    for include_dense in (False, True):
        record = json.loads(json.dumps(to_record(make_result(2), include_dense)))
        jsonschema.validate(record, schema)
    bad = json.loads(json.dumps(to_record(make_result(2))))
    bad["outcome"] = "lost"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_jsonl_is_atomic_no_final_file_until_close(tmp_path):
    path = tmp_path / "r.jsonl"
    sink = JsonlSink(SinkConfig(type="jsonl", path=str(path)))
    sink.write(make_result(0))
    assert not path.exists()
    sink.abort()
    assert not path.exists() and not list(tmp_path.iterdir())


def test_mp4_overlay_round_trip(tmp_path):
    import av

    path = tmp_path / "o.mp4"
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(path)))
    for i in range(5):
        sink.write(make_result(i, width=63, height=47))
    assert not path.exists()
    sink.close()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == pytest.approx(10.0)
    assert len(frames) == 5
    assert frames[0].shape == (48, 64, 3)  # padded to even size for yuv420p
    # the square class (index 2) is blended in its palette colour, not left as the flat background
    assert np.abs(frames[0][15, 20].astype(int) - frames[0][40, 5].astype(int)).sum() > 60


def test_mp4_overlay_of_a_stream_that_changes_size_scales_the_new_frames_whole(tmp_path, caplog):
    """Frames larger than the video's first were cropped to its top-left corner, silently."""
    import av

    path = tmp_path / "o.mp4"
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(path), fps=5, draw=[]))
    for i, (width, height) in enumerate([(64, 48)] * 3 + [(128, 96)] * 3):
        image = np.full((height, width, 3), 230, np.uint8)
        image[:, width // 2:] = 10  # the right half dark
        sink.write(Frame("s", i, i / 5, image).finish())
    sink.close()
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 6 and frames[5].shape == (48, 64, 3)
    dark = frames[5].mean(axis=2) < 60
    assert 0.4 < dark.mean() < 0.6 and dark[12:-4, 40:-4].all() and not dark[12:-4, 4:24].any()  # both halves (a caption on top)
    assert sum("are now 128x96; they are scaled into the video's 64x48" in r.getMessage() for r in caplog.records) == 1


def test_a_killed_runs_mp4_overlay_plays_to_its_last_fragment(tmp_path):
    """A plain MP4 has its index at the end: a run killed (OOM killer, docker kill) left an unreadable file."""
    import shutil

    import av

    path = tmp_path / "o.mp4"
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(path), fps=5, draw=[]))
    for i in range(40):  # 8 s at 5 fps; never closed, as in a kill
        sink.write(make_result(i))
    killed = tmp_path / "killed.mp4"
    shutil.copy(tmp_path / ".o.partial.mp4", killed)  # what a kill would leave on disk now
    with av.open(str(killed)) as container:
        assert sum(1 for _ in container.decode(video=0)) >= 20
    sink.close()
    with av.open(str(path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 40


@pytest.mark.parametrize("kind", ["coco", "csv"])
def test_a_sink_written_at_the_end_is_said_at_load_in_a_live_run(tmp_path, kind, caplog):
    """A live run held every result in memory for as long as it ran, and a kill wrote nothing: never said."""
    from blinkflow.config import load_config

    data = {"sources": [{"type": "synthetic", "num_frames": 2}], "sinks": [{"type": kind, "path": str(tmp_path / "o")}]}
    load_config(data=data)
    assert "writes its file when the run ends" not in caplog.text
    load_config(data={**data, "runtime": {"mode": "live"}})
    assert f"sinks.0: a {kind} sink writes its file when the run ends" in caplog.text


def test_mp4_writes_one_file_per_stream(tmp_path):
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "v.mp4"), fps=5))
    for i in range(2):
        sink.write(make_result(i, stream="cam/1"))
        sink.write(make_result(i, stream="cam/2"))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v-cam_2.mp4", "v.mp4"]


def test_memory_sink_keeps_results():
    sink = MemorySink()
    sink.write(make_result(0))
    assert sink.results[0].outcome is Outcome.PROCESSED
    assert sink.records()[0]["index"] == 0


def test_overlay_caption_says_where_carried_results_came_from():
    from blinkflow.sinks.overlay import _caption

    reused = FrameResult("cam", 7, 0.0, 8, 8, Outcome.REUSED, results={"gate": {"decision": "reuse"}}, reuse_of=4)
    refresh = FrameResult("cam", 8, 0.0, 8, 8, Outcome.PROCESSED,
                          results={"gate": {"decision": "refresh", "stages": ["segment"], "keyframe": 4}})
    assert _caption(reused, []) == "cam #7 | reused from #4"
    assert _caption(refresh, []) == "cam #8 | segment fresh, rest from #4"


def test_a_new_sink_is_one_file_the_registry_finds_and_configs_accept(tmp_path):
    """pipeline/sinks/csv_boxes.py is the whole csv sink: no list or Literal names it anywhere else."""
    from blinkflow.api import run
    from blinkflow.registry import sinks
    from blinkflow.sinks.csv_boxes import read_rows

    assert "csv" in sinks.names()
    others = [p for p in (REPO_ROOT / "pipeline").rglob("*.py") if p.name != "csv_boxes.py"]
    assert not any("csv_boxes" in p.read_text() for p in others)
    out = tmp_path / "boxes.csv"
    records = list(run("configs/synthetic.yaml", **{"sources.0.num_frames": 4, "gate.enabled": False,
                                                    "sinks": [{"type": "csv", "path": str(out)}],
                                                    "stages.segment.enabled": False, "stages.flow.enabled": False,
                                                    "stages.action.enabled": False}))
    rows = read_rows(out.read_text())
    expected = [(r["index"], name) for r in records for name in r["detect"]["classes"]]
    assert expected and [(int(row["index"]), row["class"]) for row in rows] == expected


def _live_results(n: int):
    from blinkflow.frame import FrameResult, Outcome

    return [FrameResult(stream_id="cam", index=i, pts=i / 10, width=8, height=8, outcome=Outcome.PROCESSED,
                        results={"detect": {"boxes": [], "labels": [], "classes": [], "scores": []}}) for i in range(n)]


def test_live_jsonl_is_readable_while_the_run_goes_on_and_kept_when_it_dies(tmp_path):
    from blinkflow.config import SinkConfig
    from blinkflow.sinks import JsonlSink

    path = tmp_path / "camera.jsonl"
    sink = JsonlSink(SinkConfig(type="jsonl", path=str(path), live=True))
    results = _live_results(5)
    for result in results[:3]:
        sink.write(result)
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2]  # visible now
    sink.write(results[3])
    sink.abort()  # an exception or Ctrl-C: what was written stays
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2, 3]
    again = JsonlSink(SinkConfig(type="jsonl", path=str(path), live=True))  # a restarted job appends
    again.write(results[4])
    again.close()
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]


def test_live_jsonl_after_a_record_cut_off_by_a_kill_starts_on_a_line_of_its_own(tmp_path, caplog):
    """The next run's first record was glued onto the cut one: both lines were lost to a JSON reader."""
    from blinkflow.config import SinkConfig
    from blinkflow.sinks import JsonlSink

    path = tmp_path / "camera.jsonl"
    path.write_text('{"index":0}\n{"index":1,"det')  # killed while writing record 1
    sink = JsonlSink(SinkConfig(type="jsonl", path=str(path), live=True))
    sink.write(_live_results(3)[2])
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"index":0}', '{"index":1,"det'] and json.loads(lines[2])["index"] == 2
    assert "its last line was cut off" in caplog.text


def test_live_jsonl_rotates_by_size_and_keeps_the_newest_files(tmp_path):
    from blinkflow.config import SinkConfig
    from blinkflow.sinks import JsonlSink

    path = tmp_path / "camera.jsonl"
    sink = JsonlSink(SinkConfig(type="jsonl", path=str(path), live=True, rotate_mb=0.0005, keep=2))  # ~500 bytes
    for result in _live_results(40):
        sink.write(result)
    sink.close()
    files = [path, tmp_path / "camera.jsonl.1", tmp_path / "camera.jsonl.2"]
    assert all(f.exists() for f in files) and not (tmp_path / "camera.jsonl.3").exists()
    indices = [json.loads(line)["index"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert indices == sorted(indices) and indices[-1] == 39 and len(indices) < 40  # the oldest were dropped


def test_archive_jsonl_stays_atomic_and_live_follows_the_runtime_mode(tmp_path):
    from blinkflow.config import load_config

    cfg = load_config(data={"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}],
                            "runtime": {"mode": "live"}})
    assert cfg.sinks[0].live is True
    cfg = load_config(data={"sinks": [{"type": "jsonl", "path": str(tmp_path / "a.jsonl")}]})
    assert cfg.sinks[0].live is False


def test_one_sink_that_cannot_commit_leaves_the_others_committed_and_says_so(tmp_path):
    from blinkflow.errors import SinkError
    from blinkflow.runners.base import committed_sinks

    class Full(MemorySink):
        def close(self) -> None:
            raise OSError(28, "No space left on device")

    first, second = JsonlSink(SinkConfig(type="jsonl", path=str(tmp_path / "a.jsonl"))), Full()
    third = JsonlSink(SinkConfig(type="jsonl", path=str(tmp_path / "c.jsonl")))
    with pytest.raises(SinkError, match=r"Full: could not be written \(OSError: .*No space left.*other outputs were "):
        with committed_sinks([first, second, third]):
            pass
    assert (tmp_path / "a.jsonl").exists() and (tmp_path / "c.jsonl").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # nothing left under a temporary name


def test_an_output_path_that_is_a_folder_is_refused_before_the_run(tmp_path):
    from blinkflow.config import load_config
    from blinkflow.errors import ConfigError

    (tmp_path / "res.jsonl").mkdir()
    with pytest.raises(ConfigError, match=r"^sinks\.0\.path: .*res\.jsonl is a folder; give the output's file name"):
        load_config(data={"sources": [{"type": "synthetic", "num_frames": 2}], "stages": {"chaos": {}},
                          "sinks": [{"type": "jsonl", "path": str(tmp_path / "res.jsonl")}]})


def test_a_full_disk_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    from blinkflow.cli import main

    def full(self, result):
        raise OSError(28, "No space left on device", str(tmp_path / "out.jsonl"))

    monkeypatch.setattr(JsonlSink, "write", full)
    config = tmp_path / "c.yaml"
    config.write_text(f"sources: [{{type: synthetic, num_frames: 2}}]\nstages: {{chaos: {{}}}}\n"
                      f"sinks: [{{type: jsonl, path: {tmp_path / 'out.jsonl'}}}]\n")
    assert main(["run", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"blinkflow: error: {tmp_path / 'out.jsonl'}: No space left on device; check")
    assert not (tmp_path / "out.jsonl").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_mp4_streams_whose_names_clash_or_climb_get_files_of_their_own_inside_the_folder(tmp_path):
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "out" / "{stream}.mp4"), fps=5))
    for i in range(2):
        for stream in ("cam 1", "cam/1", ".."):
            sink.write(make_result(i, stream=stream))
    sink.close()
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.mp4"))
    assert len(written) == 3 and all(name.startswith("out/") for name in written), written
    assert "out/cam_1.mp4" in written and "out/stream.mp4" in written


def test_coco_gives_a_failed_frame_no_annotations(tmp_path):
    import json

    from blinkflow.sinks.coco import CocoSink

    sink = CocoSink(SinkConfig(type="coco", path=str(tmp_path / "c.json")))
    failed = make_result(0)
    failed.results["detect"] = {"boxes": [[1.0, 2.0, 10.0, 6.5]], "scores": [0.9], "labels": [1], "classes": ["car"]}
    failed.outcome, failed.error = Outcome.FAILED, "track: boom"
    sink.write(failed)
    sink.close()
    document = json.loads((tmp_path / "c.json").read_text())
    assert len(document["images"]) == 1 and document["annotations"] == []


def test_csv_gives_a_failed_frame_no_rows_as_coco_gives_it_no_annotations(tmp_path):
    from blinkflow.sinks.csv_boxes import CsvSink, read_rows

    sink = CsvSink(SinkConfig(type="csv", path=str(tmp_path / "b.csv")))
    for index, outcome in enumerate([Outcome.FAILED, Outcome.PROCESSED]):
        result = make_result(index)
        result.results["detect"] = {"boxes": [[1.0, 2.0, 10.0, 6.5]], "scores": [0.9], "labels": [1], "classes": ["car"]}
        result.outcome = outcome
        sink.write(result)
    sink.close()
    assert [row["index"] for row in read_rows((tmp_path / "b.csv").read_text())] == ["1"]


def test_an_output_name_made_from_a_long_id_fits_the_file_system(tmp_path):
    """A 254-byte video name or 100 CJK characters (300 bytes) gave 'File name too long' on every run."""
    from blinkflow.files import MAX_NAME_BYTES, safe_name

    for text in ("v" * 250, "漢" * 100):
        name = safe_name(text, "x")
        assert len(name.encode()) <= MAX_NAME_BYTES and name != safe_name(text + "2", "x")
        (tmp_path / f".{name}.12345.partial.jsonl").write_text("fits")  # the temporary beside an output
    assert safe_name("cam-1", "x") == "cam-1"


def test_every_registered_sink_type_is_a_sink_class():
    """A helper placed under a sink's decorator was registered as the jsonl sink in its place."""
    from blinkflow.registry import sinks
    from blinkflow.sinks import Sink

    assert {"jsonl", "csv", "coco", "mp4", "events", "mqtt", "webhook"} <= set(sinks.names())
    assert all(isinstance(sinks.get(name), type) and issubclass(sinks.get(name), Sink) for name in sinks.names())


def test_a_run_failing_before_it_starts_leaves_no_partial_outputs(tmp_path, capsys):
    """The metrics port in use: the one-line error came, and the sinks' .partial files stayed behind."""
    import socket

    from blinkflow.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        config = tmp_path / "c.yaml"
        config.write_text(f"sources: [{{type: synthetic, num_frames: 2}}]\nstages: {{chaos: {{}}}}\n"
                          f"metrics: {{enabled: true, port: {taken.getsockname()[1]}}}\n"
                          f"sinks: [{{type: jsonl, path: {tmp_path / 'out.jsonl'}}}, {{type: csv, path: {tmp_path / 'out.csv'}}}]\n")
        assert main(["run", str(config), "--no-progress"]) == 2
    assert "blinkflow: error: metrics" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_two_mp4_sinks_deriving_one_file_name_write_two_files(tmp_path, caplog):
    """v.mp4's second stream and v-{stream}.mp4's are both v-s2.mp4: both sinks wrote the one file."""
    first = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "v.mp4"), fps=5))
    second = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "v-{stream}.mp4"), fps=5))
    for i in range(2):
        for stream in ("s1", "s2"):
            first.write(make_result(i, stream=stream))
            second.write(make_result(i, stream=stream))
    first.close()
    second.close()
    written = sorted(p.name for p in tmp_path.glob("*.mp4"))
    assert len(written) == 4 and {"v.mp4", "v-s1.mp4", "v-s2.mp4"} <= set(written)
    assert "v-s2.mp4 is another stream's" in caplog.text
    from blinkflow.sinks import _MP4_PATHS_IN_USE

    assert not {p for p in _MP4_PATHS_IN_USE if p.parent == tmp_path.resolve()}  # released at close


def test_coco_files_a_voc_class_of_the_segmenter_under_the_detectors_coco_name_and_id(tmp_path):
    """VOC spells six classes otherwise (motorbike, sofa, tvmonitor...): the segmenter's motorbike mask and the
    detector's motorcycle box were two categories, the mask's under a made-up id."""
    import json

    import numpy as np

    from blinkflow.sinks.coco import CocoSink
    from blinkflow.stages.common import encode_class_map

    sink = CocoSink(SinkConfig(type="coco", path=str(tmp_path / "c.json")))
    result = make_result(0)
    class_map = np.zeros((result.height, result.width), np.uint8)
    class_map[:4, :4], class_map[4:8, 4:8] = 1, 2
    result.results["detect"] = {"boxes": [[1.0, 2.0, 10.0, 6.5]], "scores": [0.9], "labels": [0],
                                "classes": ["motorcycle"]}
    result.results["segment"] = {"mask": {"format": "png", "data": encode_class_map(class_map)},
                                 "classes": ["background", "motorbike", "tvmonitor"]}
    sink.write(result)
    sink.close()
    document = json.loads((tmp_path / "c.json").read_text())
    assert sorted((c["id"], c["name"]) for c in document["categories"]) == [(4, "motorcycle"), (72, "tv")]
    assert sorted((a["task"], a["category_id"]) for a in document["annotations"]) == [
        ("detect", 4), ("segment", 4), ("segment", 72)]


def test_the_overlay_draws_boxes_given_corner_first_or_not_skips_unfinite_ones_and_fits_tiny_frames():
    """A custom backend's box with x2 < x1 made torchvision refuse the frame (the whole mp4 sink failed); a frame
    under 8 pixels wide with flow drawn had an inset wider than itself."""
    from blinkflow.sinks.overlay import draw_overlay

    result = make_result(0)
    result.results["detect"] = {"boxes": [[30.0, 40.0, 1.0, 2.0], [float("nan"), 1.0, 5.0, 5.0]], "labels": [1, 2],
                                "classes": ["disc", "square"], "scores": [0.9, 0.8]}
    drawn = draw_overlay(result, ["detect"])
    plain = draw_overlay(make_result(0), ["detect"])  # the same box, corners in order
    assert np.array_equal(drawn, plain)
    tiny = make_result(0, width=6, height=6)
    image = draw_overlay(tiny, ["flow"])
    assert image.shape == (6, 6, 3) and not np.array_equal(image, tiny.image)


def test_csv_rows_say_which_boxes_the_gate_carried_over_and_from_which_frame(tmp_path):
    """A reused frame's rows, or a refresh's that ran only the segmenter, looked like fresh detections."""
    from blinkflow.sinks.csv_boxes import CsvSink, read_rows

    sink = CsvSink(SinkConfig(type="csv", path=str(tmp_path / "b.csv")))
    gates = [None, {"decision": "reuse", "keyframe": 0}, {"decision": "refresh", "keyframe": 0, "stages": ["segment"]},
             {"decision": "refresh", "keyframe": 0, "stages": ["detect"]}]
    for index, gate in enumerate(gates):
        result = make_result(index)
        result.results["detect"] = {"boxes": [[1.0, 2.0, 10.0, 6.5]], "scores": [0.9], "labels": [1], "classes": ["car"]}
        if gate:
            result.results["gate"] = gate
        if gate and gate["decision"] == "reuse":
            result.outcome, result.reuse_of = Outcome.REUSED, 0
        sink.write(result)
    sink.close()
    rows = read_rows((tmp_path / "b.csv").read_text())
    assert [(r["index"], r["outcome"], r["carried_from"]) for r in rows] == [
        ("0", "processed", ""), ("1", "reused", "0"), ("2", "processed", "0"), ("3", "processed", "")]
