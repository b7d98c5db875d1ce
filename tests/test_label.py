"""Archive batch-labelling: inputs, COCO output, the manifest, and a run that is
killed half-way and resumed (on Ray) with outputs identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blinkflow.config import SinkConfig, load_config
from blinkflow.errors import BlinkflowError
from blinkflow.frame import FrameResult, Outcome
from blinkflow.label import LabelRun, Manifest, find_videos, parse_formats, sha256_file
from tests.conftest import REPO_ROOT, write_test_video

# light and deterministic: random-weight U-Net (seeded by setup_stage) on small frames, plus the chaos
# stage's pixel checksum; base_width 16 gives this seed a non-background class, so masks are written
LIGHT_CONFIG = """
label:
  formats: [jsonl, coco]
  executor: local
  source: {resize: [64, 48]}
stages:
  segment:
    model: unet_small
    weights: null
    batch: 8
    options: {input_size: [32, 32], model_args: {base_width: 16}}
  chaos:
    batch: 8
    options: {sleep_ms: 10}   # slows the run a little, so the kill lands between two videos' ends
runtime: {num_cpus: 2}
"""


@pytest.fixture
def light_config(tmp_path) -> Path:
    path = tmp_path / "light.yaml"
    path.write_text(LIGHT_CONFIG)
    return path


def label(inputs, out_dir, config_path, *overrides, restart=False) -> dict:
    cfg = load_config(config_path, list(overrides))
    return LabelRun(find_videos([str(i) for i in inputs]), out_dir, cfg, cfg.label.formats,
                    progress=False, restart=restart).run()


def output_files(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())
            if p.is_file() and p.name not in ("manifest.json", "summary.json") and not p.name.startswith(".")}


# --------------------------------------------------------------------------- inputs


def test_inputs_take_files_directories_and_globs_with_unique_ids(tmp_path):
    for name in ("a/clip.mp4", "b/clip.mp4", "c.avi", "b/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    videos = find_videos([str(tmp_path / "a"), str(tmp_path / "b" / "*.mp4"), str(tmp_path / "c.avi"),
                          str(tmp_path / "a" / "clip.mp4")])
    assert [v.id for v in videos] == ["a-clip", "b-clip", "c"]
    with pytest.raises(BlinkflowError, match="no such file"):
        find_videos([str(tmp_path / "missing*.mp4")])


def test_format_list_is_checked():
    assert parse_formats("coco, jsonl,coco", ["jsonl"]) == ["coco", "jsonl"]
    with pytest.raises(BlinkflowError, match="jsonl, coco, mp4"):
        parse_formats("jsonl,avi", ["jsonl"])


# --------------------------------------------------------------------------- COCO


def _result(index: int, class_map: np.ndarray, outcome=Outcome.PROCESSED) -> FrameResult:
    from blinkflow.stages.common import encode_class_map

    h, w = class_map.shape
    results = {} if outcome is Outcome.DROPPED else {
        "detect": {"boxes": [[1.0, 2.0, 11.0, 8.5]], "labels": [3], "classes": ["car"], "scores": [0.875]},
        "segment": {"mask": {"format": "png", "data": encode_class_map(class_map), "height": h, "width": w},
                    "classes": ["background", "road", "car"], "areas": {}},
    }
    return FrameResult(stream_id="cam", index=index, pts=index / 10, width=w, height=h, outcome=outcome,
                       results=results)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools with numpy 2
def test_coco_output_loads_in_pycocotools_with_rle_masks_per_class(tmp_path):
    from pycocotools.coco import COCO

    from blinkflow.sinks.coco import CocoSink

    class_map = np.zeros((12, 16), dtype=np.uint8)
    class_map[6:, :] = 1
    class_map[2:5, 3:9] = 2
    sink = CocoSink(SinkConfig(type="coco", path=str(tmp_path / "out.coco.json")))
    for index in range(3):
        sink.write(_result(index, class_map, Outcome.DROPPED if index == 1 else Outcome.PROCESSED))
    sink.close()

    coco = COCO(str(tmp_path / "out.coco.json"))
    assert sorted(img["frame_id"] for img in coco.dataset["images"]) == [0, 1, 2]
    assert coco.dataset["videos"] == [{"id": 1, "name": "cam"}]
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    assert sorted(names.values()) == ["car", "road"]  # "car" from both stages shares one category
    dropped = [img["id"] for img in coco.dataset["images"] if img["outcome"] == "dropped"]
    assert coco.getAnnIds(imgIds=dropped) == []
    first = coco.dataset["images"][0]["id"]
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[first]))
    boxes = [a for a in anns if a["task"] == "detect"]
    assert boxes[0]["bbox"] == [1.0, 2.0, 10.0, 6.5] and names[boxes[0]["category_id"]] == "car"
    for ann in (a for a in anns if a["task"] == "segment"):
        class_index = ["background", "road", "car"].index(names[ann["category_id"]])
        np.testing.assert_array_equal(coco.annToMask(ann), (class_map == class_index).astype(np.uint8))
        assert ann["area"] == int((class_map == class_index).sum())


# --------------------------------------------------------------------------- manifest


def test_changed_output_is_labelled_again_and_a_finished_run_skips(tmp_path, light_config):
    clip = write_test_video(tmp_path / "clip.mp4", frames=6)
    out = tmp_path / "out"
    first = label([clip], out, light_config)
    assert first["done"] == 1 and first["skipped"] == []
    jsonl = out / "clip.jsonl"
    original = jsonl.read_bytes()
    assert [json.loads(line)["index"] for line in original.splitlines()] == list(range(6))

    jsonl.write_bytes(original[: len(original) // 2])  # damaged after the fact
    second = label([clip], out, light_config)
    assert second["skipped"] == [] and jsonl.read_bytes() == original

    third = label([clip], out, light_config)
    assert third["skipped"] == ["clip"] and jsonl.read_bytes() == original


def test_the_threaded_runner_labels_the_same_bytes_as_the_local_one(tmp_path, light_config, monkeypatch):
    from blinkflow.runners.threaded import ThreadedRunner

    clips = [write_test_video(tmp_path / f"clip{i}.mp4", frames=n) for i, n in enumerate((10, 7))]
    label(clips, tmp_path / "local", light_config)
    threaded_runs = []
    run = ThreadedRunner.run
    monkeypatch.setattr(ThreadedRunner, "run", lambda self: threaded_runs.append(self) or run(self))
    summary = label(clips, tmp_path / "threaded", light_config, "runtime.runner=threaded")
    assert summary["done"] == 2 and len(threaded_runs) == 2
    assert output_files(tmp_path / "threaded") == output_files(tmp_path / "local")


def test_an_archive_is_labelled_in_archive_mode_whatever_the_config_says(tmp_path, light_config):
    """A camera config (runtime.mode: live) used to label files: live mode drops frames once max_in_flight
    waves are out, and the threaded runner then recorded a video with 28 of its 40 frames dropped as done."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=40)
    summary = label([clip], tmp_path / "out", light_config, "runtime.runner=threaded", "runtime.mode=live",
                    "runtime.max_in_flight=1", "stages.chaos.options.sleep_ms=30")
    records = [json.loads(line) for line in (tmp_path / "out" / "clip.jsonl").read_text().splitlines()]
    assert summary["done"] == 1 and [r["index"] for r in records] == list(range(40))
    assert {r["outcome"] for r in records} <= {"processed", "reused"}


def test_crash_between_outputs_and_manifest_redoes_the_video(tmp_path, light_config, monkeypatch):
    clip = write_test_video(tmp_path / "clip.mp4", frames=5)
    reference = label([clip], tmp_path / "ref", light_config)
    out = tmp_path / "out"

    def crash(self, video_id, entry):
        raise KeyboardInterrupt("killed after the outputs, before the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(Manifest, "record", crash)
        with pytest.raises(KeyboardInterrupt):
            label([clip], out, light_config)
    assert (out / "clip.jsonl").exists() and not (out / "manifest.json").exists()
    resumed = label([clip], out, light_config)
    assert resumed["skipped"] == [] and resumed["done"] == 1
    assert output_files(out) == output_files(tmp_path / "ref")
    assert reference["videos"]["clip"]["frames"] == resumed["videos"]["clip"]["frames"] == 5


def test_another_config_in_the_same_folder_is_refused(tmp_path, light_config):
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    label([clip], tmp_path / "out", light_config)
    with pytest.raises(BlinkflowError, match="another config"):
        label([clip], tmp_path / "out", light_config, "label.source.resize=[32, 24]")
    assert label([clip], tmp_path / "out", light_config, "label.source.resize=[32, 24]", restart=True)["done"] == 1


# --------------------------------------------------------------------------- killed and resumed


def _kill_session(leader: subprocess.Popen) -> None:
    """SIGKILL every process of the child's session (it and anything it started), nothing else."""
    victims = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == leader.pid:  # field 6 of /proc/PID/stat: the session id
            victims.append(int(stat.parent.name))
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leader.wait(timeout=30)


def _manifest_entries(out: Path) -> int:
    try:
        return len(json.loads((out / "manifest.json").read_text())["videos"])
    except (OSError, ValueError, KeyError):
        return 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "blinkflow.cli", "label", *args, "--no-progress"]


@pytest.mark.slow
def test_label_killed_halfway_and_resumed_on_ray_matches_an_uninterrupted_run(tmp_path, real_media, light_config):
    corrupt = tmp_path / "inputs" / "corrupt.mp4"
    corrupt.parent.mkdir()
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    inputs = [str(real_media / "video"), str(corrupt)]
    reference = label(inputs, tmp_path / "uninterrupted", light_config)
    assert reference["failed"] == ["corrupt"] and reference["done"] == 4

    out = tmp_path / "resumed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.Popen(_cli(*inputs, "--out", str(out), "--config", str(light_config)),
                              cwd=REPO_ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _manifest_entries(out) < 1 and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    _kill_session(killed)
    finished_before_kill = _manifest_entries(out)
    assert 1 <= finished_before_kill < 5, "the kill should land half-way"

    resumed = subprocess.run(_cli(*inputs, "--out", str(out), "--config", str(light_config),
                                  "--set", "label.executor=ray"),
                             cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 1, resumed.stderr[-2000:]  # 1: the corrupt video failed
    assert "corrupt" in resumed.stdout and "not a readable video" in resumed.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["skipped"]) == finished_before_kill
    assert summary["failed"] == ["corrupt"] and summary["videos"]["bikes"]["frames"] == 250
    assert output_files(out) == output_files(tmp_path / "uninterrupted")  # byte for byte: nothing lost or doubled
    manifest = json.loads((out / "manifest.json").read_text())["videos"]
    assert manifest["corrupt"]["status"] == "failed" and "not a readable video" in manifest["corrupt"]["error"]
    for entry in manifest.values():
        for name, digest in entry["outputs"].items():
            assert sha256_file(out / name) == digest
    records = [json.loads(line) for line in (out / "bikes.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(250))
    assert not (out / ".scratch").exists()


def test_a_second_run_into_the_same_folder_stops_in_one_line_naming_the_holder(tmp_path, tiny_video, light_config):
    import os

    from blinkflow.label import output_lock

    out = tmp_path / "labels"
    with output_lock(out):  # a first run holds the folder
        proc = subprocess.run(_cli(str(tiny_video), "--out", str(out), "--config", str(light_config)),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert f"another blinkflow label run (pid {os.getpid()}) is writing there" in proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    summary = label([tiny_video], out, light_config)  # released: the next run goes ahead
    assert summary["done"] == 1


def test_out_naming_an_existing_file_is_a_one_line_error(tmp_path, tiny_video, light_config):
    target = tmp_path / "labels.json"
    target.write_text("{}")
    proc = subprocess.run(_cli(str(tiny_video), "--out", str(target), "--config", str(light_config)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_text() == "{}"


def _faststart_clip(path: Path, frames: int = 20) -> bytes:
    """An MP4 whose index (moov) sits before its data, as cameras and web exports write them."""
    import av
    import numpy as np

    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            image = np.full((48, 64, 3), 10 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path.read_bytes()


def test_a_truncated_mp4_is_partial_not_done_and_is_labelled_again(tmp_path, light_config):
    whole = _faststart_clip(tmp_path / "whole.mp4")
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "cut.mp4").write_bytes(whole[: int(len(whole) * 0.9)])  # its index still lists 20 frames
    out = tmp_path / "labels"
    summary = label([clips / "cut.mp4"], out, light_config)
    entry = summary["videos"]["cut"]
    assert entry["status"] == "partial" and summary["partial"] == ["cut"] and summary["done"] == 0
    assert "truncated: 7 of the 20 frames" in entry["error"]
    assert (out / "cut.jsonl").read_text().count("\n") == entry["frames"] == 7  # what was there is kept
    (clips / "cut.mp4").write_bytes(whole)  # re-copied whole: the next run labels it again, done
    again = label([clips / "cut.mp4"], out, light_config)
    assert again["videos"]["cut"]["status"] == "done" and again["videos"]["cut"]["frames"] == 20


def test_a_frame_failed_in_a_stage_leaves_the_video_partial_with_its_outputs_written(tmp_path, light_config):
    """One frame failing in a stage used to throw away the video's labels (status failed, no files), while the
    error pointed at the records' error field; the records are written, the failed frame's saying why."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=6)
    out = tmp_path / "out"
    summary = label([clip], out, light_config, "stages.chaos.options.fail_indices=[2]")
    entry = summary["videos"]["clip"]
    assert entry["status"] == "partial" and summary["partial"] == ["clip"] and summary["failed"] == []
    assert "1 frames failed in a stage" in entry["error"] and entry["outcomes"]["failed"] == 1
    records = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(6))
    assert [r["index"] for r in records if r.get("error")] == [2] and "chaos" in records[2]["error"]
    coco = json.loads((out / "clip.coco.json").read_text())
    assert len(coco["images"]) == 6
    every_frame_fails = label([clip], tmp_path / "none", light_config, "stages.chaos.options.fail_indices=[0,1,2,3,4,5]")
    assert every_frame_fails["failed"] == ["clip"] and not (tmp_path / "none" / "clip.jsonl").exists()


def test_the_config_digest_ignores_placement_and_warm_up_but_not_what_changes_outputs():
    from blinkflow.label import config_digest

    base = {"sources": [], "stages": {"chaos": {"batch": 2}}}
    digest = config_digest(load_config(data=base), ["jsonl"])
    placement = {"replicas": 3, "resources": {"num_cpus": 2}, "warmup": True, "max_wait_ms": 5}
    assert config_digest(load_config(data={**base, "stages": {"chaos": {"batch": 2, **placement}}}), ["jsonl"]) == digest
    assert config_digest(load_config(data={**base, "gate": {"replicas": 4}}), ["jsonl"]) == digest
    assert config_digest(load_config(data={**base, "runtime": {"runner": "threaded"}}), ["jsonl"]) == digest
    changed = load_config(data={**base, "stages": {"chaos": {"batch": 2, "options": {"fail_indices": [1]}}}})
    assert config_digest(changed, ["jsonl"]) != digest
    assert config_digest(load_config(data=base), ["jsonl", "coco"]) != digest


def test_videos_whose_names_clash_get_ids_and_outputs_of_their_own():
    """'a b' and 'a_b' are both a_b; the numbering gave 'a_b-2' to one while 'a b-2' was a_b-2 already, and a
    video x.events wrote its records into x's events file."""
    from blinkflow.label import _unique_ids

    folder = Path("/archive")
    ids = _unique_ids([folder / "a b.mp4", folder / "a_b.mp4", folder / "a b-2.mp4", folder / "a_b-2.mp4"])
    assert len(set(ids)) == 4
    for order in (["x.mp4", "x.events.mp4"], ["x.events.mp4", "x.mp4"]):
        first, second = _unique_ids([folder / name for name in order])
        names = {f"{first}.jsonl", f"{first}.events.jsonl", f"{second}.jsonl", f"{second}.events.jsonl"}
        assert len(names) == 4, (first, second)


@pytest.mark.parametrize("videos", [{"v": "x"}, {"v": {"source": "/a.mp4"}}, {"v": {"source": "/a.mp4", "status": "done",
                                    "outputs": ["a.jsonl"], "frames": 1, "outcomes": {}}},
                                    {"v": {"source": "/a.mp4", "status": "done", "outputs": {}, "frames": "1", "outcomes": {}}}])
def test_a_hand_edited_manifest_is_one_line_naming_it(tmp_path, light_config, videos):
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    label([clip], out, light_config)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "videos": videos}))
    with pytest.raises(BlinkflowError, match=r"manifest.json: unreadable manifest; delete it or pass --restart"):
        label([clip], out, light_config)


# --------------------------------------------------------------------------- a review of labelling


def test_a_second_batch_into_the_same_folder_never_overwrites_the_first_ones_labels(tmp_path, light_config):
    """day1/cam1.mp4 then day2/cam1.mp4 into one --out: both were 'cam1', and day2 replaced day1's labels."""
    for day in ("day1", "day2"):
        (tmp_path / day).mkdir()
    first = write_test_video(tmp_path / "day1" / "cam1.mp4", frames=4)
    second = write_test_video(tmp_path / "day2" / "cam1.mp4", frames=3)
    out = tmp_path / "out"
    label([first], out, light_config)
    summary = label([second], out, light_config)
    assert summary["done"] == 1 and list(summary["videos"]) == ["cam1-2"]
    assert len((out / "cam1.jsonl").read_text().splitlines()) == 4 and len((out / "cam1-2.jsonl").read_text().splitlines()) == 3
    again = label([second], out, light_config)  # the same video keeps its id: skipped
    assert again["skipped"] == ["cam1-2"]
    assert label([first], out, light_config)["skipped"] == ["cam1"]


def test_an_output_folder_inside_the_input_folder_is_not_an_input(tmp_path, light_config):
    """Its overlays were labelled on the next run, and the next (2, 4, 8 videos)."""
    folder = tmp_path / "videos"
    folder.mkdir()
    write_test_video(folder / "clip.mp4", frames=3)
    cfg = load_config(light_config)
    for _ in range(2):
        videos = find_videos([str(folder)], folder / "labels")
        assert [v.id for v in videos] == ["clip"]
        LabelRun(videos, folder / "labels", cfg, ["jsonl", "mp4"], progress=False).run()
    assert (folder / "labels" / "clip.mp4").is_file()


def test_a_source_replaced_since_it_was_labelled_is_labelled_again(tmp_path, light_config):
    """A video's identity was its path: a re-copied or completed file was skipped with its old labels."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=4)
    out = tmp_path / "out"
    label([clip], out, light_config)
    write_test_video(clip, frames=7)
    summary = label([clip], out, light_config)
    assert summary["skipped"] == [] and summary["videos"]["clip"]["frames"] == 7
    assert label([clip], out, light_config)["skipped"] == ["clip"]


def test_weights_changed_behind_the_same_path_are_refused_like_another_config(tmp_path, light_config):
    """The digest held the weights' path, not the file: new weights labelled the rest of an archive silently."""
    import torch

    from blinkflow.models.registry import build_model

    weights = tmp_path / "w.pt"
    model = build_model("unet_small", task="segment", num_classes=2, base_width=16)
    torch.save(model.state_dict(), weights)
    config = tmp_path / "weights.yaml"
    config.write_text(LIGHT_CONFIG.replace("weights: null", f"weights: {weights}").replace(
        "model_args: {base_width: 16}", "model_args: {base_width: 16}, classes: [background, thing]"))
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    label([clip], out, config)
    torch.nn.init.constant_(next(model.parameters()), 0.5)
    torch.save(model.state_dict(), weights)
    with pytest.raises(BlinkflowError, match=r"labelled with other weights for segment"):
        label([clip], out, config)
    assert label([clip], out, config, restart=True)["done"] == 1


def test_settings_that_only_change_speed_keep_an_archive_and_old_digests_are_accepted(tmp_path, light_config):
    """queue_size, decode_threads, batch or the order of --format refused the folder ('another config')."""
    from blinkflow.label import config_digest

    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    label([clip], out, light_config)
    for change in ("label.source.queue_size=8", "stages.segment.batch=2", "stages.chaos.batch=1"):
        assert label([clip], out, light_config, change)["skipped"] == ["clip"], change
    cfg = load_config(light_config)
    assert config_digest(cfg, ["coco", "jsonl"]) == config_digest(cfg, ["jsonl", "coco"])
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["config_digest"] = config_digest(cfg, cfg.label.formats, legacy=True)  # written by an earlier release
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert label([clip], out, light_config)["skipped"] == ["clip"]


def test_ids_are_numbered_where_no_folder_tells_videos_apart_and_case_never_splits_them():
    """clip.mp4 and clip.mkv spelled their whole path out (too long a name under deep folders), and Clip and clip
    were two ids that are one file on a case-insensitive disk."""
    from blinkflow.label import _unique_ids

    assert _unique_ids([Path("/data/cam1/clip.mp4"), Path("/data/cam1/clip.mkv")]) == ["clip", "clip-2"]
    assert _unique_ids([Path("/d/Clip.mp4"), Path("/d/clip.mp4")]) == ["Clip", "clip-2"]
    assert _unique_ids([Path("/x/a/q/clip.mp4"), Path("/x/b/q/clip.mp4")]) == ["a-q-clip", "b-q-clip"]


def test_camera_formats_are_found_in_a_folder(tmp_path):
    for name in ("00001.MTS", "a.m2ts", "b.3gp", "c.mxf", "d.vob", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(v.id for v in find_videos([str(tmp_path)])) == ["00001", "a", "b", "c", "d"]


def test_a_video_that_fails_leaves_the_good_outputs_of_an_earlier_run(tmp_path, light_config):
    """Its empty .jsonl and .coco.json were committed, over the good ones of the run before (--restart)."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    label([clip], out, light_config)
    good = (out / "clip.jsonl").read_bytes()
    clip.write_bytes(b"not a video any more")
    summary = label([clip], out, light_config, restart=True)
    assert summary["failed"] == ["clip"] and (out / "clip.jsonl").read_bytes() == good
    assert json.loads((out / "manifest.json").read_text())["videos"]["clip"]["outputs"] == {}


def test_coco_category_ids_are_the_same_in_every_file(tmp_path):
    """Ids came in the order classes were first seen: person 1 in one video's file, 2 in another's."""
    from blinkflow.sinks.coco import CocoSink, category_id

    files = []
    for order in (["person", "car"], ["car", "person"]):
        sink = CocoSink(SinkConfig(type="coco", path=str(tmp_path / f"{order[0]}.coco.json")))
        for index, name in enumerate(order):
            sink.write(FrameResult(stream_id="cam", index=index, pts=0.0, width=16, height=12,
                                   outcome=Outcome.PROCESSED,
                                   results={"detect": {"boxes": [[1.0, 2.0, 5.0, 6.0]], "labels": [0], "classes": [name],
                                                       "scores": [0.9]}}))
        sink.close()
        files.append(json.loads((tmp_path / f"{order[0]}.coco.json").read_text()))
    ids = [{c["name"]: c["id"] for c in data["categories"]} for data in files]
    assert ids[0] == ids[1] == {"person": 1, "car": 3}  # COCO's own ids
    assert category_id("disc") == category_id("disc") >= 1000 and category_id("disc") != category_id("square")


def test_the_overlay_keeps_a_variable_frame_rate(tmp_path):
    """Frames were encoded back to back at the rate of the first two: a 4 s clip with gaps became 0.8 s."""
    import av

    from blinkflow.sinks import Mp4OverlaySink

    times = [0.0, 0.1, 0.2, 1.0, 1.1, 2.5, 2.6, 4.0]
    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "o.mp4")))
    for index, pts in enumerate(times):
        sink.write(FrameResult(stream_id="cam", index=index, pts=pts, width=32, height=24, outcome=Outcome.PROCESSED,
                               image=np.zeros((24, 32, 3), np.uint8)))
    sink.close()
    with av.open(str(tmp_path / "o.mp4")) as container:
        decoded = [round(float(frame.time), 3) for frame in container.decode(video=0)]
    assert decoded == times


def test_label_records_validate_against_the_record_schema(tmp_path, light_config):
    """The schema required latency_ms, which label's byte-stable records leave out."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = jsonschema.Draft202012Validator(json.loads((REPO_ROOT / "pipeline" / "frame-record.schema.json").read_text()))
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    label([clip], tmp_path / "out", light_config)
    for line in (tmp_path / "out" / "clip.jsonl").read_text().splitlines():
        schema.validate(json.loads(line))


# --------------------------------------------------------------------------- a review of those fixes


def test_labelling_in_place_or_into_a_folder_above_the_videos_finds_them(tmp_path, light_config):
    """Every file under --out was dropped: '--out v v' and '--out arch arch/raw' found no video at all."""
    folder = tmp_path / "v"
    folder.mkdir()
    write_test_video(folder / "clip.mp4", frames=3)
    cfg = load_config(light_config)
    assert LabelRun(find_videos([str(folder)], folder), folder, cfg, ["jsonl"], progress=False).run()["done"] == 1
    assert [v.id for v in find_videos([str(folder)], folder)] == ["clip"]
    with pytest.raises(BlinkflowError, match=r"clip's output clip\.mp4 would be written over the input"):
        LabelRun(find_videos([str(folder)], folder), folder, cfg, ["jsonl", "mp4"], progress=False, restart=True).run()
    (tmp_path / "arch" / "raw").mkdir(parents=True)
    write_test_video(tmp_path / "arch" / "raw" / "door.mp4", frames=3)
    assert [v.id for v in find_videos([str(tmp_path / "arch" / "raw")], tmp_path / "arch")] == ["door"]


def test_ids_hold_across_runs_whatever_the_other_inputs_and_their_order(tmp_path, light_config):
    """Swapping two inputs, adding a file or a folder relabelled finished videos under new ids and orphaned
    their outputs."""
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    mp4 = write_test_video(tmp_path / "a" / "clip.mp4", frames=3)
    mkv = tmp_path / "a" / "clip.mkv"
    mkv.write_bytes(mp4.read_bytes())
    other = write_test_video(tmp_path / "b" / "clip.mp4", frames=2)
    out = tmp_path / "out"
    first = label([mp4, mkv], out, light_config)
    assert sorted(first["videos"]) == ["clip", "clip-2"]
    swapped = label([mkv, mp4], out, light_config)
    assert sorted(swapped["skipped"]) == ["clip", "clip-2"]
    grown = label([tmp_path / "a", tmp_path / "b"], out, light_config)  # a folder added: a/clip is 'clip' still
    assert sorted(grown["skipped"]) == ["clip", "clip-2"] and len(grown["videos"]) == 3
    new_id = next(i for i, v in grown["videos"].items() if v["source"] == str(other.resolve()))
    assert new_id not in ("clip", "clip-2")
    assert sorted(p.name for p in out.glob("*.jsonl")) == sorted(f"{i}.jsonl" for i in grown["videos"])


def test_a_new_videos_id_never_clashes_with_the_manifests_by_case_or_events_file():
    from blinkflow.label import Manifest, Video

    entry = {"status": "done", "outputs": {}, "frames": 1, "outcomes": {}}
    manifest = Manifest(Path("/out/manifest.json"), "d", {"x": {**entry, "source": "/day1/x.mp4"},
                                                           "Clip": {**entry, "source": "/day1/Clip.mp4"}})
    ids = [v.id for v in manifest.assign([Video("x.events", Path("/day2/x.events.mp4")), Video("clip", Path("/day2/clip.mp4"))])]
    assert ids == ["x.events-2", "clip-2"]


def test_an_archive_of_an_earlier_release_gets_its_sources_recorded_and_then_notices_a_change(tmp_path, light_config):
    """Entries without size and time were accepted and never got them: a replaced file stayed 'done' for good."""
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    out = tmp_path / "out"
    label([clip], out, light_config)
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["videos"].values():  # as an earlier release wrote it
        entry.pop("source_size"), entry.pop("source_mtime_ns")
    manifest.pop("weights", None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert label([clip], out, light_config)["skipped"] == ["clip"]
    assert "source_size" in json.loads((out / "manifest.json").read_text())["videos"]["clip"]
    write_test_video(clip, frames=5)
    assert label([clip], out, light_config)["videos"]["clip"]["frames"] == 5


def test_two_class_names_on_one_category_id_are_refused_not_merged(tmp_path, monkeypatch):
    from blinkflow.sinks import coco

    monkeypatch.setattr(coco, "category_id", lambda name: 4242)
    sink = coco.CocoSink(SinkConfig(type="coco", path=str(tmp_path / "x.coco.json")))
    detect = {"boxes": [[1.0, 2.0, 5.0, 6.0], [1.0, 2.0, 5.0, 6.0]], "labels": [0, 1], "classes": ["disc", "square"],
              "scores": [0.9, 0.8]}
    with pytest.raises(ValueError, match="classes 'disc' and 'square' have one category id"):
        sink.write(FrameResult(stream_id="cam", index=0, pts=0.0, width=16, height=12, outcome=Outcome.PROCESSED,
                               results={"detect": detect}))


@pytest.mark.parametrize("times, fps, expected", [
    ([0.0, 0.04, 0.04, 0.08, 0.12], None, [0.0, 0.04, 0.04, 0.08, 0.12]),  # a repeated time: no drift after it
    ([0.0, 1.0, 2.0, 3.0], 30.0, [0.0, 1 / 30, 2 / 30, 0.1]),  # the sink's fps: a constant rate (a time-lapse)
    ([0.0, 0.0005, 0.001, 0.0015], None, [0.0, 0.0005, 0.001, 0.0015]),  # over 1000 fps
])
def test_the_overlays_times_are_the_frames_or_the_sinks_rate(tmp_path, times, fps, expected):
    import av

    from blinkflow.sinks import Mp4OverlaySink

    sink = Mp4OverlaySink(SinkConfig(type="mp4", path=str(tmp_path / "o.mp4"), fps=fps))
    for index, pts in enumerate(times):
        sink.write(FrameResult(stream_id="cam", index=index, pts=pts, width=32, height=24, outcome=Outcome.PROCESSED,
                               image=np.zeros((24, 32, 3), np.uint8)))
    sink.close()
    with av.open(str(tmp_path / "o.mp4")) as container:
        decoded = [float(frame.time) for frame in container.decode(video=0)]
    assert decoded == pytest.approx(expected, abs=2e-4)


def test_label_says_it_serves_no_metrics_when_the_config_asks_for_them(tmp_path, light_config, caplog):
    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    with caplog.at_level("WARNING"):
        assert label([clip], tmp_path / "out", light_config, "metrics.enabled=true", "metrics.port=0")["done"] == 1
    assert any("metrics.enabled: blinkflow label serves no metrics" in r.getMessage() for r in caplog.records)


def test_mp4_overlays_never_replace_a_video_the_run_does_not_label(tmp_path, light_config):
    """cams/a.mkv labelled into cams with mp4 overlays replaced the user's cams/a.mp4, exit 0."""
    from blinkflow.errors import BlinkflowError

    cams = tmp_path / "cams"
    cams.mkdir()
    write_test_video(cams / "a.mkv", frames=3)
    theirs = write_test_video(cams / "a.mp4", frames=5)
    before = theirs.read_bytes()
    with pytest.raises(BlinkflowError, match=r"a's output a\.mp4 would be written over .*a video this run does not label"):
        label([cams / "a.mkv"], cams, light_config, "label.formats=[jsonl, mp4]")
    assert theirs.read_bytes() == before


def test_an_unreadable_video_fails_with_its_own_reason_and_a_failed_rerun_keeps_its_old_outputs(tmp_path, light_config):
    """With mp4 among the formats an unreadable video failed with a FileNotFoundError traceback of the scratch
    overlay; and a done video that failed on a re-run dropped its outputs from the manifest, so its overlay, left
    on disk inside the input folder, was taken for an input and every later run refused to start."""
    videos = tmp_path / "videos"
    videos.mkdir()
    clip = write_test_video(videos / "a.mp4", frames=4)
    out = videos / "labels"
    cfg = load_config(light_config, ["label.formats=[jsonl, mp4]"])

    def run() -> dict:  # as the CLI finds them: label's own outputs under --out are no inputs
        return LabelRun(find_videos([str(videos)], out), out, cfg, cfg.label.formats, progress=False).run()

    assert run()["done"] == 1
    clip.write_bytes(b"corrupt now")
    second = run()
    entry = json.loads((out / "manifest.json").read_text())["videos"]["a"]
    assert second["failed"] == ["a"] and "FileNotFoundError" not in entry["error"] and "a.mp4" in entry["kept_outputs"]
    assert run()["failed"] == ["a"]  # every later run refused to start


def test_label_source_is_a_files_settings_only():
    from blinkflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"label\.source\.type: 'synthetic'; label reads video files"):
        load_config(data={"label": {"source": {"type": "synthetic"}}})
    with pytest.raises(ConfigError, match=r"label\.source\.path: label sets it for every video"):
        load_config(data={"label": {"source": {"type": "file", "path": "/x.mp4"}}})


@pytest.mark.slow  # starts Ray
def test_a_video_task_larger_than_the_cluster_is_refused_not_waited_for_forever(tmp_path, light_config):
    from blinkflow.errors import BlinkflowError

    clip = write_test_video(tmp_path / "clip.mp4", frames=3)
    with pytest.raises(BlinkflowError, match=r"label\.task_cpus: 4 CPUs a video, but the Ray cluster has 2"):
        label([clip], tmp_path / "out", light_config, "label.executor=ray", "runtime.num_cpus=2", "label.task_cpus=4")


@pytest.mark.parametrize("argv, message", [
    (["--out", ""], "argument --out: empty; give the output folder"),
    (["--out", "labels", "--format", ""], "--format '': use a comma-separated list of jsonl, coco, mp4"),
])
def test_an_empty_out_or_format_is_refused(argv, message, tmp_path, capsys, monkeypatch):
    """--out '' labelled into the working folder; --format '' fell back to the config's formats."""
    from blinkflow.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main(["label", str(tmp_path / "none.mp4"), *argv, "--no-progress"])
    except SystemExit as exc:  # argparse's usage error
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- a second review of labelling


def _fake_labelling(monkeypatch, status: str = "done") -> list[str]:
    """label_one without decoding or models (fast): every output holds its video's id and name; returns the ids
    labelled, in order."""
    import blinkflow.label as label_module

    labelled: list[str] = []

    def fake(job, progress=None):
        video = job["video"]
        labelled.append(video.id)
        outputs = {name: f"{video.id} {name}".encode() for name in video.outputs(job["formats"]).values()}
        return {"status": status, "error": None if status == "done" else "truncated", "frames": 1,
                "outcomes": {"processed": 1}, "seconds": 0.0, "setup_s": 0.0, "fps": 0.0, "outputs": outputs}

    monkeypatch.setattr(label_module, "label_one", fake)
    return labelled


def test_overlays_whose_manifest_was_lost_are_still_labels_own_but_a_users_video_is_not(tmp_path, light_config,
                                                                                        monkeypatch):
    """An interrupted --restart (or a deleted manifest, as its error advises) forgot the earlier overlays: every
    later run, --restart too, refused to write over them as 'a video this run does not label'."""
    labelled = _fake_labelling(monkeypatch)
    clips = []
    for name in ("v1", "v2", "v3"):
        clips.append(tmp_path / f"{name}.mkv")
        clips[-1].write_bytes(name.encode())
    out = tmp_path / "out"
    mp4 = "label.formats=[jsonl, mp4]"
    assert label(clips, out, light_config, mp4)["done"] == 3
    assert label(clips[:1], out, light_config, mp4, restart=True)["done"] == 1  # as if stopped after v1
    assert label(clips, out, light_config, mp4)["skipped"] == ["v1"]  # v2, v3 labelled: refused before
    (out / "manifest.json").unlink()
    assert label(clips, out, light_config, mp4, restart=True)["done"] == 3
    assert labelled == ["v1", "v2", "v3", "v1", "v2", "v3", "v1", "v2", "v3"]
    (out / "manifest.json").unlink()
    (out / "v3.mp4").write_bytes(b"the user's own video, put there under that name")
    with pytest.raises(BlinkflowError, match=r"v3's output v3\.mp4 would be written over .*a video this run does not"):
        label(clips, out, light_config, mp4)
    assert (out / "v3.mp4").read_bytes() == b"the user's own video, put there under that name"


def test_another_label_runs_output_folder_inside_the_inputs_is_left_out(tmp_path, caplog):
    """nest/ labelled into nest/labels-b labelled nest/labels-a's overlays too, and renamed the videos' ids."""
    nest = tmp_path / "nest"
    for name in ("v1.mp4", "labels-a/v1.mp4", "labels-a/.blinkflow-label.lock", "old/labels/x.mp4",
                 "data/v2.mp4", "data/manifest.json"):
        (nest / name).parent.mkdir(parents=True, exist_ok=True)
        (nest / name).write_bytes(b"x")
    (nest / "old" / "labels" / "manifest.json").write_text('{"version": 1, "config_digest": "ab", "videos": {}}')
    (nest / "data" / "manifest.json").write_text('{"files": ["v2.mp4"]}')  # a data set's, not label's
    with caplog.at_level("INFO", logger="blinkflow.label"):
        videos = find_videos([str(nest)], nest / "labels-b")
    assert [(v.id, v.path) for v in videos] == [("v2", nest / "data" / "v2.mp4"), ("v1", nest / "v1.mp4")]
    said = [r.getMessage() for r in caplog.records if "other blinkflow label runs" in r.getMessage()]
    assert len(said) == 1 and "labels-a" in said[0] and "old/labels" in said[0]
    # this run's own folder, and the folder named as the input, are never left out
    assert [v.id for v in find_videos([str(nest / "labels-a")], nest / "labels-a")] == ["v1"]
    # a glob too: 'nest/**/*.mp4' matched the other runs' overlays
    globbed = find_videos([str(nest / "**" / "*.mp4")], nest / "labels-b")
    assert sorted(v.path.name for v in globbed) == ["v1.mp4", "v2.mp4"] and nest / "labels-a" / "v1.mp4" not in \
        [v.path for v in globbed]


def test_temporary_files_a_crash_left_in_out_are_removed_but_no_others(tmp_path, light_config, monkeypatch):
    """A crash while committing an output left .NAME.PID.partial.SUFFIX files in --out, never cleared."""
    _fake_labelling(monkeypatch)
    clip = tmp_path / "clip.mkv"
    clip.write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    stale = [".clip.jsonl.9999999.partial.jsonl", ".manifest.json.9999999.partial.json", f".x.{os.getpid()}.partial"]
    kept = [f".clip.jsonl.{os.getppid()}.partial.jsonl",  # a live process's write
            ".clip.jsonl.9999999.partial.txt", ".notes.9999999.txt", "clip.9999999.partial.jsonl"]
    for name in stale + kept:
        (out / name).write_bytes(b"x")
    assert label([clip], out, light_config)["done"] == 1
    assert not [name for name in stale if (out / name).exists()]
    assert all((out / name).exists() for name in kept)


def test_a_partial_video_unchanged_is_skipped_unless_failed_videos_are_retried(tmp_path, light_config, monkeypatch):
    """A truncated file whose size and time are unchanged was labelled again on every run, retry_failed or not."""
    labelled = _fake_labelling(monkeypatch, status="partial")
    clip = tmp_path / "cut.mkv"
    clip.write_bytes(b"x")
    out = tmp_path / "out"
    assert label([clip], out, light_config)["partial"] == ["cut"]
    again = label([clip], out, light_config, "label.retry_failed=false")
    assert again["skipped"] == ["cut"] and again["partial"] == ["cut"] and labelled == ["cut"]
    assert label([clip], out, light_config)["skipped"] == [] and labelled == ["cut", "cut"]


@pytest.mark.parametrize("setting, message", [
    ("label.source.resize=[0, 0]", r"label\.source\.resize: expected \[width, height\] between 2 and 16384, got \[0, 0\]"),
    ("label.source.resize=[4]", r"label\.source\.resize: expected .* got \[4\]"),
    ("label.source.resize=[100000, 100000]", r"label\.source\.resize: expected .* got \[100000, 100000\]"),
    ("label.source.resize=[-5, 10]", r"label\.source\.resize: expected .* got \[-5, 10\]"),
    ("label.source.hwaccel=cuda", r"label\.source\.hwaccel: the CUDA decoder exports no motion vectors"),
])
def test_label_source_gets_the_checks_of_every_source(setting, message):
    """label.source.resize was never checked ([0, 0] and [4] crashed the decoder), nor the file options' own
    check (hwaccel: cuda with motion_vectors: true ran)."""
    from blinkflow.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(data={"label": {"source": {"motion_vectors": True}}}, overrides=[setting])


def test_files_of_a_folder_not_named_like_videos_are_said_left_out(tmp_path, caplog):
    """An animated .gif (which labels when named) was left out of `blinkflow label DIR` without a word; DV tapes and
    MPEG-2 elementary streams were not taken for videos at all."""
    from blinkflow.label import find_videos

    for name in ("a.mp4", "tape.dv", "b.gif", "c.GIF", "notes.txt", ".DS_Store", "Thumbs.db"):  # not the system's
        (tmp_path / name).write_bytes(b"x")
    with caplog.at_level("WARNING", logger="blinkflow.label"):
        videos = find_videos([str(tmp_path)])
    assert sorted(v.path.name for v in videos) == ["a.mp4", "tape.dv"]
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == f"{tmp_path}: left out 3 file(s) not named like videos (.gif x2, .txt x1); name them, or a glob, to use them"
    caplog.clear()
    from blinkflow.sources import DirectorySource  # a dir source says the same

    with caplog.at_level("WARNING", logger="blinkflow.sources"):
        files = DirectorySource(load_config(data={"sources": [{"type": "dir", "path": str(tmp_path)}]}).sources[0]).files()
    assert [f.name for f in files] == ["a.mp4", "tape.dv"] and [r.getMessage() for r in caplog.records] == [line]
