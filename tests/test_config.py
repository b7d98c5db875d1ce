"""Config loading: every kind of mistake gives a one-line error naming its YAML path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from blinkflow.config import Config, load_config
from blinkflow.errors import ConfigError
from tests.conftest import REPO_ROOT


def write(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", ["demo.yaml", "synthetic.yaml"])
def test_demo_configs_are_valid(name):
    cfg = load_config(REPO_ROOT / "configs" / name)
    assert isinstance(cfg, Config)
    assert list(cfg.enabled_stages()) == ["detect", "segment", "flow", "action"]
    real = name == "demo.yaml"  # the real pretrained models; synthetic.yaml keeps the self-trained ones
    assert (cfg.stages["detect"].model == "yolox_nano") == real
    assert cfg.stages["action"].options.clip_len == (16 if real else 8)


def test_unknown_top_level_key_names_the_key(tmp_path):
    assert error_of(tmp_path, "sourcez: []\n").startswith("sourcez: unknown key; valid keys here: sources, gate")


def test_unknown_nested_key_names_the_full_path(tmp_path):
    assert error_of(tmp_path, "gate:\n  treshold: 0.1\n").startswith("gate.treshold: unknown key")


def test_unknown_stage_option_names_the_full_path(tmp_path):
    message = error_of(tmp_path, "stages:\n  detect:\n    options:\n      score_treshold: 0.5\n")
    assert message.startswith("stages.detect.options.score_treshold: unknown key")


def test_wrong_type_names_the_path_and_expected_type(tmp_path):
    message = error_of(tmp_path, "stages:\n  detect:\n    batch: many\n")
    assert message == "stages.detect.batch: expected an integer, got 'many'"


def test_bool_is_not_accepted_as_a_number(tmp_path):
    assert error_of(tmp_path, "gate:\n  threshold: true\n").startswith("gate.threshold: expected a number")


def test_out_of_range_value_names_the_range(tmp_path):
    assert error_of(tmp_path, "stages:\n  detect:\n    batch: 0\n") == "stages.detect.batch: 0 is out of range (1..1024)"


def test_invalid_choice_lists_the_allowed_values(tmp_path):
    message = error_of(tmp_path, "runtime:\n  mode: turbo\n")
    assert message == "runtime.mode: 'turbo' is not one of 'archive' | 'live'"


def test_a_source_setting_is_checked_against_its_type_naming_the_yaml_path(tmp_path):
    message = error_of(tmp_path, "sources:\n  - type: synthetic\n  - type: file\n    path: x.mp4\n    reconnect_delay: 3\n")
    assert message.startswith("sources.1.reconnect_delay: not an option of a 'file' source; it has: type, id, path, "
                              "fps, resize, max_frames, decode_threads, queue_size, motion_vectors")  # no url: not a file's
    message = error_of(tmp_path, "sources:\n  - type: file\n    path: x.mp4\n    stall_timeout_s: 3\n")
    assert message.startswith("sources.0.stall_timeout_s: not an option of a 'file' source (a setting of 'stream' sources)")
    message = error_of(tmp_path, "sources:\n  - type: synthetic\n    url: rtsp://cam/x\n")
    assert message == "sources.0.url: not an option of a 'synthetic' source; it opens no file or URL"
    assert error_of(tmp_path, "sources:\n  - type: synthetic\n    seed: -1\n") == "sources.0.seed: -1 is out of range (0..2147483647)"
    assert error_of(tmp_path, "sources:\n  - type: webcam\n").startswith("sources.0.type: 'webcam' is not one of 'dir'")


def test_a_source_from_python_takes_its_types_settings_as_keywords():
    import dataclasses

    from blinkflow.config import SourceConfig

    scene = SourceConfig(type="synthetic", fps=5, seed=3, num_frames=9)
    assert (scene.fps, scene.options.seed, scene.options.num_frames, scene.options.width) == (5, 3, 9, 320)
    moved = dataclasses.replace(scene, id="x")  # what labelling does per video
    assert (moved.id, moved.options.seed) == ("x", 3)
    with pytest.raises(ConfigError, match=r"^source\.seed: not an option of a 'file' source \(a setting of 'synthetic'"):
        SourceConfig(type="file", path="a.mp4", seed=3)


def test_missing_source_file_names_the_path(tmp_path):
    message = error_of(tmp_path, "sources:\n  - type: file\n    path: nope/missing.mp4\n")
    assert message == "sources.0.path: file 'nope/missing.mp4' does not exist"


def test_missing_weights_file_names_the_path(tmp_path):
    message = error_of(tmp_path, "stages:\n  segment:\n    weights: nowhere/w.pt\n")
    assert message == "stages.segment.weights: file 'nowhere/w.pt' does not exist"


def test_unknown_stage_lists_valid_stages(tmp_path):
    message = error_of(tmp_path, "stages:\n  detekt: {}\n")
    assert message == "stages.detekt: unknown stage; valid stages: action, chaos, detect, events, flow, segment, track"


def test_gate_under_stages_points_to_its_own_section(tmp_path):
    assert error_of(tmp_path, "stages:\n  gate: {}\n").startswith("stages.gate: the gate is configured in the top-level")


def test_gate_refresh_names_a_stage_and_a_positive_bound(tmp_path):
    assert error_of(tmp_path, "gate:\n  refresh: {segmnet: 3}\n") == (
        "gate.refresh.segmnet: unknown stage 'segmnet'; valid: action, chaos, detect, flow, segment")
    assert error_of(tmp_path, "gate:\n  refresh: {segment: 0}\n") == (
        "gate.refresh.segment: expected a number of frames >= 1, got 0")
    assert error_of(tmp_path, "gate:\n  refresh: {segment: fast}\n").startswith("gate.refresh.segment: expected an integer")


def test_gate_refresh_keeps_only_bounds_that_can_apply():
    data = {"stages": {"segment": {}, "detect": {}}, "gate": {"max_reuse": 10}}
    assert load_config(data=data).gate.refresh == {"segment": 4, "detect": 8}  # the default
    cfg = load_config(data={**data, "gate": {"max_reuse": 10, "refresh": {"segment": 10, "detect": 3, "flow": 2}}})
    # segment: max_reuse refreshes it first; flow: not in this graph
    assert cfg.gate.refresh == {"detect": 3}


def test_a_bare_off_in_yaml_means_the_word_where_a_choice_has_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("gate:\n  motion: off\n")
    assert load_config(path).gate.motion == "off"
    assert load_config(path, ["gate.motion=off"]).gate.motion == "off"
    assert error_of(tmp_path, "runtime:\n  mode: off\n") == (
        "runtime.mode: false (YAML reads a bare yes/no/on/off as a boolean) is not one of 'archive' | 'live'")


def test_unknown_model_lists_valid_models(tmp_path):
    message = error_of(tmp_path, "stages:\n  detect:\n    model: yolo9000\n")
    assert message.startswith("stages.detect.model: unknown model 'yolo9000'; valid detect models:")
    assert "yolox_nano" in message and "unet_small" not in message  # the detector's models, not every task's


def test_model_of_the_wrong_task_is_rejected(tmp_path):
    message = error_of(tmp_path, "stages:\n  detect:\n    model: unet_small\n")
    assert message.startswith("stages.detect.model: model 'unet_small' is a segment model, not detect")


def test_bad_device_is_rejected(tmp_path):
    assert error_of(tmp_path, "stages:\n  flow:\n    device: tpu\n").startswith(
        "stages.flow.device: 'tpu' is not 'cpu', 'cuda:N' or 'auto'")


def test_device_auto_runs_the_stage_on_the_gpu_when_there_is_one():
    import torch

    from blinkflow.graph import build_graph

    cfg = load_config(REPO_ROOT / "configs" / "synthetic.yaml", ["stages.flow.device=auto"])
    spec = next(s for s in build_graph(cfg) if s.name == "flow")
    stage = spec.create()
    stage.setup(spec.device)
    assert stage._device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_sink_without_path_is_rejected(tmp_path):
    assert error_of(tmp_path, "sinks:\n  - type: jsonl\n") == "sinks.0.path: a jsonl sink needs an output path"


def test_invalid_yaml_names_the_file_and_line(tmp_path):
    message = error_of(tmp_path, "gate: [unclosed\n")
    assert "invalid YAML" in message and "line" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_set_overrides_nested_values_and_list_items(tmp_path):
    path = write(tmp_path, "sources:\n  - type: synthetic\n    seed: 1\n")
    cfg = load_config(path, ["sources.0.seed=5", "gate.enabled=true", "stages.detect.batch=8"])
    assert cfg.sources[0].options.seed == 5
    assert cfg.gate.enabled is True
    assert cfg.stages["detect"].batch == 8


def test_set_override_errors_are_checked_like_the_file(tmp_path):
    message = error_of(tmp_path, "{}\n", ["stages.detect.batch=-3"])
    assert message == "stages.detect.batch: -3 is out of range (1..1024)"


def test_malformed_set_override(tmp_path):
    assert "expected key=value" in error_of(tmp_path, "{}\n", ["gate.enabled"])


def test_validate_command_prints_one_line_error_without_traceback(tmp_path):
    path = write(tmp_path, "gate:\n  max_reuse: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "blinkflow.cli", "validate", str(path)], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "blinkflow: error: gate.max_reuse: -1 is out of range (0..1000000)"
    assert "Traceback" not in proc.stderr


def test_validate_command_accepts_the_demo(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "blinkflow.cli", "validate", "configs/demo.yaml"], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_a_yaml_alias_bomb_is_refused_in_one_line_not_expanded(tmp_path):
    lines = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # fully expanded this would be 9**11 strings
    with pytest.raises(ConfigError, match="more than 64 aliases") as error:
        load_config(path)
    assert "\n" not in str(error.value)


def test_a_non_utf8_or_oversized_config_is_a_one_line_error(tmp_path):
    binary = tmp_path / "clip.yaml"
    binary.write_bytes(b"\xff\xfe\x00sources: []")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="is not a config"):
        load_config(big)


@pytest.mark.parametrize("override, words", [
    ("stages.detect=5", "stages.detect: expected a mapping of settings"),
    ("sources.0.resize=[100000, 100000]", "sources.0.resize: expected [width, height] between 2 and 16384"),
    ("stages.detect.batch=[1", "stages.detect.batch: expected an integer"),
    ("runtime.runner=spark", "runtime.runner: 'spark' is not one of 'local' | 'ray' | 'threaded'"),
    ("sinks.0.type=parquet", "sinks.0.type: 'parquet' is not one of"),
])
def test_malformed_overrides_are_one_line_errors_naming_the_path(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(REPO_ROOT / "configs" / "synthetic.yaml", [override])
    assert words in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_validates(name):
    """The shipped configs are examples users copy: each loads and passes every check (streams are not opened)."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / name)
    assert cfg.enabled_stages() and (cfg.sources or name == "archive.yaml")  # label gives archive its sources


BOMB = """stages: {chaos: {}}
a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
"""


@pytest.mark.parametrize("text, message", [
    (BOMB, "an alias expansion bomb"),  # 40 aliases, 10^5 values: its error message alone was gigabytes
    ("gate: " + "[" * 1200 + "]" * 1200 + "\n", "nested too deeply"),
    ("gate: {batch: " + "1" * 5000 + "}\n", "a number of thousands of digits"),
    ("gate: {threshold: 1" + "0" * 400 + "}\n", "gate.threshold: 1000"),
    ("gate: {enabled: true}\ngate: {enabled: false}\n", "'gate' is written twice in one mapping"),
    ("gate: {enabled: true, carry_until: {detect: .nan}}\n", "gate.carry_until.detect: expected a factor >= 1"),
])
def test_hostile_configs_are_one_short_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value) and len(str(caught.value)) < 300


def test_an_override_through_an_alias_changes_only_its_own_path_and_merges_still_work(tmp_path):
    path = write(tmp_path, "sources: [{type: synthetic}]\nstages:\n  detect: &d {batch: 2}\n  segment: {<<: *d, batch: 3}\n"
                           "  flow: *d\n")
    cfg = load_config(path, ["stages.detect.batch=8"])
    assert (cfg.stages["detect"].batch, cfg.stages["segment"].batch, cfg.stages["flow"].batch) == (8, 3, 2)
    for override, message in (("sources.\u00b2=x", "is not an index"), ("gate.batch=" + "9" * 5000, "not a config value")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])


def test_a_folder_or_a_video_passed_as_the_config_says_what_it_is(tmp_path):
    """A video gave 'not UTF-8 text (byte 42)', a folder 'config file not found'."""
    from blinkflow.schema import read_yaml

    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00\xff\xd8")  # not text
    with pytest.raises(ConfigError, match=r"clip\.mp4: a video or image, not a config; name it in a config's sources"):
        read_yaml(video)
    with pytest.raises(ConfigError, match=r": a folder, not a config"):
        read_yaml(tmp_path)


def test_a_bad_reid_weights_is_named_as_such():
    """It was reported under reid_model."""
    with pytest.raises(ConfigError, match=r"^stages\.track\.options\.reid_weights: .*/nope\.pt"):
        load_config(data={"stages": {"detect": {}, "track": {"options": {"appearance_weight": 0.5,
                                                                          "reid_weights": "/nope.pt"}}}})


def test_a_cuda_device_on_a_machine_without_one_names_the_stage(monkeypatch):
    import torch

    from blinkflow.devices import resolve_device
    from blinkflow.errors import StageError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StageError, match=r"^stages\.detect\.device: 'cuda:0' needs a CUDA GPU .* set device: cpu"):
        resolve_device("cuda:0", "stages.detect.device")


def test_a_yaml_config_named_like_a_video_still_loads(tmp_path):
    (tmp_path / "demo.ts").write_text("stages:\n  chaos: {}\n")
    assert "chaos" in load_config(tmp_path / "demo.ts").stages


def test_a_sink_never_writes_over_an_input_a_device_or_another_sinks_file(tmp_path, monkeypatch):
    """Sinks rename a finished temporary file over their path: over the input video that replaced it, over
    /dev/null (as root) the device, over another sink's path that sink's output; each is refused at load."""
    import shutil

    monkeypatch.chdir(tmp_path)
    video = tmp_path / "in.mp4"
    shutil.copy(REPO_ROOT / "tests" / "data" / "video" / "realshort.mp4", video)
    source = {"type": "file", "path": "in.mp4"}
    with pytest.raises(ConfigError, match=r"sinks\.1\.path: in\.mp4 is sources\.0's input video"):
        load_config(data={"sources": [source], "sinks": [{"type": "jsonl", "path": "o.jsonl"},
                                                           {"type": "mp4", "path": "in.mp4"}]})
    with pytest.raises(ConfigError, match=r"sinks\.1\.path: out/o\.json is sinks\.0's output too"):
        load_config(data={"sources": [source], "sinks": [{"type": "jsonl", "path": str(tmp_path / "out" / "o.json")},
                                                           {"type": "coco", "path": "out/o.json"}]})
    with pytest.raises(ConfigError, match=r"sinks\.0\.path: /dev/null is not a regular file"):
        load_config(data={"sources": [source], "sinks": [{"type": "jsonl", "path": "/dev/null"}]})
    assert load_config(data={"sources": [source], "sinks": [{"type": "jsonl", "path": "o.jsonl"},
                                                             {"type": "mp4", "path": "o.mp4"}]}).sinks[1].path == "o.mp4"


def test_a_relative_glob_is_found_beside_the_config_as_file_and_dir_paths_are(tmp_path, monkeypatch):
    import shutil

    (tmp_path / "sub" / "media").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "tests" / "data" / "video" / "realshort.mp4", tmp_path / "sub" / "media" / "a.mp4")
    config = tmp_path / "sub" / "g.yaml"
    config.write_text("sources: [{type: glob, id: g, path: 'media/*.mp4'}, {type: dir, path: media}]\n")  # ids g/a, a
    monkeypatch.chdir(tmp_path)  # the run starts from the config's parent folder
    cfg = load_config(config)
    assert Path(cfg.sources[0].path) == tmp_path / "sub" / "media" / "*.mp4"
    config.write_text("sources: [{type: glob, path: 'media/*.mkv'}]\n")  # matches nothing: as written (the run says so)
    assert load_config(config).sources[0].path == "media/*.mkv"


def test_an_overlay_layer_typo_is_an_error_not_an_empty_drawing():
    with pytest.raises(ConfigError, match=r"sinks\.0\.draw: 'detcet' is not a layer; layers: detect, segment, flow, action"):
        load_config(data={"sinks": [{"type": "mp4", "path": "o.mp4", "draw": ["detcet"]}]})


def test_a_number_where_text_is_expected_says_to_quote_it():
    with pytest.raises(ConfigError, match=r"sources\.0\.id: expected a string or null, got 1 \(YAML reads a bare 1 as a "
                                          r"number: quote it, '1'\)"):
        load_config(data={"sources": [{"type": "synthetic", "id": 1}]})


def test_a_token_file_that_is_not_text_or_is_a_folder_is_one_line_at_load(tmp_path):
    """validate passed a non-UTF-8 token file (read with replacement characters) and the run then failed with a
    traceback; a folder was said not to exist."""
    token = tmp_path / "token"
    token.write_bytes(b"\xff\xfe")
    control = {"enabled": True, "auth": "token"}
    with pytest.raises(ConfigError, match=r"control\.token_file: .* is not UTF-8 text"):
        load_config(data={"control": {**control, "token_file": str(token)}})
    with pytest.raises(ConfigError, match=r"control\.token_file: .* is a folder, not a file"):
        load_config(data={"control": {**control, "token_file": str(tmp_path)}})


def test_an_mp4_path_template_names_only_the_stream():
    """out/{stream}-{date}.mp4 passed validate and failed with a KeyError traceback at the first frame."""
    with pytest.raises(ConfigError, match=r"sinks\.0\.path: 'out/\{stream\}-\{date\}\.mp4' names \{date\}"):
        load_config(data={"sinks": [{"type": "mp4", "path": "out/{stream}-{date}.mp4"}]})
    assert load_config(data={"sinks": [{"type": "mp4", "path": "out/{stream}.mp4"}]}).sinks[0].path == "out/{stream}.mp4"


# --------------------------------------------------------------------------- what validate said ok to and run refused


def test_a_model_input_size_of_zero_is_refused_by_the_config_not_at_stage_setup():
    with pytest.raises(ConfigError, match=r"stages\.segment\.options\.input_size: expected \[height, width\] with both "
                                          r"in 16\.\.8192, got \[0, 0\]; e.g\. input_size: \[256, 256\], or null"):
        load_config(data={"stages": {"segment": {"options": {"input_size": [0, 0]}}}})
    with pytest.raises(ConfigError, match=r"stages\.flow\.options\.input_size: .* got \[8, 8\]; e.g\. input_size: "
                                          r"\[128, 160\]$"):
        load_config(data={"stages": {"flow": {"options": {"input_size": [8, 8]}}}})
    assert load_config(data={"stages": {"segment": {"options": {"input_size": None}}}})


def test_empty_weights_say_to_use_null_or_a_path():
    """'' was resolved to the config's folder, then the run said "file '.' does not exist"."""
    with pytest.raises(ConfigError, match=r"stages\.segment\.weights: '' names no weights; use null"):
        load_config(data={"stages": {"segment": {"weights": ""}}})


def test_two_sources_deriving_one_stream_id_are_refused_by_validate(tmp_path, capsys):
    """Two synthetic sources without ids are both synthetic-0: the run refused them, validate said ok."""
    import yaml

    from blinkflow.cli import main

    twins = [{"type": "synthetic", "num_frames": 2}, {"type": "synthetic", "num_frames": 2}]
    config = tmp_path / "twins.yaml"
    config.write_text(yaml.safe_dump({"sources": twins}))
    assert main(["validate", str(config)]) == 2
    assert "sources.1: its stream id 'synthetic-0' is also one of sources.0's" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"sources": [twins[0], {**twins[1], "seed": 1}]}))
    assert main(["validate", str(config)]) == 0


@pytest.mark.parametrize("section", ["metrics", "control"])
def test_an_endpoint_host_that_does_not_resolve_is_refused_at_load(section):
    with pytest.raises(ConfigError, match=rf"{section}\.host: 'not a host!!' is not an IPv4 address or name this "
                                          "machine resolves"):
        load_config(data={section: {"enabled": True, "host": "not a host!!"}})
    assert load_config(data={section: {"enabled": True, "host": "localhost", "port": 0}})


@pytest.mark.parametrize("section", ["metrics", "control"])
def test_an_empty_endpoint_host_is_refused_not_bound_to_every_interface(section):
    with pytest.raises(ConfigError, match=rf"^{section}\.host: empty; write 0\.0\.0\.0 to listen on every interface, "
                                          r"or keep 127\.0\.0\.1$"):
        load_config(data={section: {"enabled": True, "host": "", "port": 0}})


def test_a_sink_path_under_a_file_is_refused_at_load(tmp_path):
    (tmp_path / "cfg.yaml").write_text("")
    with pytest.raises(ConfigError, match=r"sinks\.0\.path: .*/cfg\.yaml/out/x\.jsonl lies under .*cfg\.yaml, which is "
                                          "a file, not a folder"):
        load_config(data={"sinks": [{"type": "jsonl", "path": str(tmp_path / "cfg.yaml" / "out" / "x.jsonl")}]})
    assert load_config(data={"sinks": [{"type": "jsonl", "path": str(tmp_path / "new" / "x.jsonl")}]})


# --------------------------------------------------------------------------- --set into a list the YAML leaves out


def test_an_index_override_of_a_list_the_config_leaves_out_starts_from_its_default():
    """label.formats.0=mp4 replaced ['jsonl', 'coco'] with ['mp4']; gate.tiles.1=4 was no index of a list of 0."""
    cfg = load_config(data={}, overrides=["label.formats.0=mp4", "gate.tiles.1=4",
                                          "stages.segment.options.input_size.1=128"])
    assert cfg.label.formats == ["mp4", "coco"]
    assert cfg.gate.tiles == [8, 4]
    assert cfg.stages["segment"].options.input_size == [256, 128]
    given = load_config(data={"gate": {"tiles": [2, 2]}}, overrides=["gate.tiles.0=3"])
    assert given.gate.tiles == [3, 2]  # the config's own list is the one changed


def test_an_index_past_a_list_says_to_set_the_whole_list():
    with pytest.raises(ConfigError, match=r"--set gate\.tiles\.5: '5' is not an index of a list of 2; set the whole "
                                          r"list, e\.g\. --set gate\.tiles=\[\.\.\.\]"):
        load_config(data={}, overrides=["gate.tiles.5=4"])


# --------------------------------------------------------------------------- reading the file


def test_an_unreadable_config_says_to_make_it_readable(tmp_path, monkeypatch):
    """It said "check that the path is a writable file in a folder with free space" (tests run as root, so the
    permission error is made by hand)."""
    path = write(tmp_path, "sources: []\n")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=r"cfg\.yaml: cannot read it \(permission denied\); make it readable by this "
                                          "user$"):
        load_config(path)


def test_a_device_as_the_config_is_not_a_regular_file():
    with pytest.raises(ConfigError, match=r"^/dev/null: not a regular file \(a device, pipe or socket\)"):
        load_config("/dev/null")


def test_chaos_options_have_ranges():
    """sleep_ms: -5 or nan failed every frame at run time."""
    for value in (-5, float("nan")):
        with pytest.raises(ConfigError, match=r"stages\.chaos\.options\.sleep_ms: .*(out of range|NaN)"):
            load_config(data={"stages": {"chaos": {"options": {"sleep_ms": value}}}})
    with pytest.raises(ConfigError, match=r"stages\.chaos\.options\.hold: -2 is out of range"):
        load_config(data={"stages": {"chaos": {"options": {"hold": -2}}}})


def test_a_typo_in_the_stream_defaults_is_refused_with_control_off_too():
    """Accepted while control was off, it failed the day control was turned on."""
    for enabled in (False, True):
        with pytest.raises(ConfigError, match=r"^control\.stream_defaults\.bogus: not an option of a 'stream' source"):
            load_config(data={"control": {"enabled": enabled, "stream_defaults": {"bogus": 1}}})


@pytest.mark.parametrize("amount", [-5, float("nan"), float("inf")])
def test_a_custom_ray_resource_is_an_amount(amount):
    """Accepted at load, refused by Ray only when the stage's actors started."""
    with pytest.raises(ConfigError, match=r"^stages\.detect\.resources\.custom\.gpu_node: .* is not an amount"):
        load_config(data={"stages": {"detect": {"resources": {"custom": {"gpu_node": amount}}}}})


def test_rotate_mb_of_a_file_written_whole_is_refused(tmp_path):
    """rotate_mb on an archive run's jsonl (written whole, renamed at the end) was ignored, silently."""
    sink = {"type": "jsonl", "path": str(tmp_path / "o.jsonl"), "rotate_mb": 10}
    with pytest.raises(ConfigError, match=r"^sinks\.0\.rotate_mb: rotates a live file only"):
        load_config(data={"sinks": [sink]})
    assert load_config(data={"sinks": [{**sink, "live": True}]}).sinks[0].rotate_mb == 10
    assert load_config(data={"sinks": [sink], "runtime": {"mode": "live"}}).sinks[0].live is True


def test_a_training_config_given_to_run_and_a_pipeline_config_given_to_train_are_said_to_be_so():
    """Each named only its first unknown key ('batch_size: unknown key'), not the mix-up or the fix."""
    import dataclasses

    from blinkflow.config import _TRAINING_KEYS
    from blinkflow.models.training.config import TrainConfig, load_train_config

    assert _TRAINING_KEYS <= {f.name for f in dataclasses.fields(TrainConfig)}  # the list stays a training one
    for path in sorted((REPO_ROOT / "configs" / "train").glob("*.yaml")):
        task = yaml.safe_load(path.read_text()).get("task")
        with pytest.raises(ConfigError, match=rf"this is a training config.*blinkflow train {task or 'TASK'} --config"):
            load_config(path)
    with pytest.raises(ConfigError, match=r"demo.yaml: this is a pipeline config.*use `blinkflow run"):
        load_train_config(REPO_ROOT / "configs" / "demo.yaml")
    with pytest.raises(ConfigError, match=r"^task: unknown key"):  # a pipeline config with a stray key: as before
        load_config(data={"sources": [{"type": "synthetic"}], "task": "detect"})


def test_the_cli_finds_shipped_configs_from_any_folder_and_their_own_files_first(tmp_path, monkeypatch, capsys):
    """An installed user's `blinkflow run configs/demo.yaml` (and train's configs/train/...) found nothing outside
    the repository, and a media/bikes.mp4 in the working directory stood in for the demo's clip without a word."""
    from blinkflow.models.training.config import load_train_config
    from blinkflow.resources import configs_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "media").mkdir()
    (tmp_path / "media" / "bikes.mp4").write_bytes(b"not the demo's clip")
    demo = load_config(Path("configs/demo.yaml"))
    assert Path(demo.sources[0].path) == configs_dir() / "media" / "bikes.mp4"
    assert load_config("demo.yaml").sinks
    assert load_train_config(Path("configs/train/smoke-reid.yaml"), task="reid").task == "reid"
    with pytest.raises(ConfigError, match=r"configs/nope\.yaml: config file not found.*the shipped configs are in"):
        load_config(Path("configs/nope.yaml"))
    from blinkflow.cli import main

    assert main(["validate", "configs/demo.yaml"]) == 0  # says which one it read
    assert f"configs/demo.yaml (the shipped {configs_dir() / 'demo.yaml'}): ok" in capsys.readouterr().out
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").symlink_to(tmp_path / "gone.yaml")  # the user's own, broken: not ours
    with pytest.raises(ConfigError, match=r"configs/demo\.yaml: config file not found"):
        load_config(Path("configs/demo.yaml"))
    # a user's own config still reads its relative paths from the working directory first
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "media").mkdir()
    (tmp_path / "mine" / "media" / "bikes.mp4").write_bytes(b"beside")
    (tmp_path / "mine" / "c.yaml").write_text("sources: [{type: file, path: media/bikes.mp4}]\n")
    assert Path(load_config(tmp_path / "mine" / "c.yaml").sources[0].path) == Path("media/bikes.mp4")


def test_a_source_path_that_is_a_device_a_pipe_or_the_other_kind_says_so(tmp_path):
    """A link to /dev/zero, a fifo and a folder given as a file source were each said to "not exist"."""
    import os

    (tmp_path / "zero.mp4").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.mp4")
    (tmp_path / "folder.mp4").mkdir()
    (tmp_path / "clip.mp4").write_bytes(b"x")
    expected = {"zero.mp4": "is not a regular file (a device, pipe or socket)",
                "pipe.mp4": "is not a regular file (a device, pipe or socket)",
                "folder.mp4": "is a directory; give a video file in it"}
    for name, why in expected.items():
        with pytest.raises(ConfigError, match=rf"sources\.0\.path: file '.*{name}' {re.escape(why)}"):
            load_config(data={"sources": [{"type": "file", "path": str(tmp_path / name)}]})
    with pytest.raises(ConfigError, match=r"sources\.0\.path: directory '.*clip\.mp4' is a file; give its folder"):
        load_config(data={"sources": [{"type": "dir", "path": str(tmp_path / "clip.mp4")}]})
