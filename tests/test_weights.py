"""models.weights: weight sources, verification and safe loading."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
from torch import nn

import blinkflow.models.weights as weights
from blinkflow.models.registry import ModelEntry
from blinkflow.models.weights import WeightsError, load_state, resolve_weights, save_shipped, sha256_file
from blinkflow.errors import BlinkflowError

CLASSES = ["background", "disc", "square"]


def tiny_model(num_classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, num_classes))


@pytest.fixture
def weights_dir(tmp_path, monkeypatch) -> Path:
    """A private shipped-weights folder, so tests never touch models/weights."""
    folder = tmp_path / "shipped"
    monkeypatch.setattr(weights, "WEIGHTS_DIR", folder)
    return folder


def ship_tiny(folder: Path, model: nn.Module | None = None) -> Path:
    model = model if model is not None else tiny_model()
    return save_shipped(
        model, stage="detect", model_name="tiny", classes=CLASSES, config={"epochs": 1}, metrics={"map": 0.5}, out_dir=folder
    )


def test_weights_error_is_a_blinkflow_error():
    assert issubclass(WeightsError, BlinkflowError)


def test_importing_weights_does_not_import_torch():
    code = "import sys, blinkflow.models.weights; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_none_means_random_and_loading_it_is_a_no_op():
    spec = resolve_weights(None, stage="detect", model_name="tiny")
    assert (spec.kind, spec.source, spec.classes, spec.path) == ("random", None, None, None)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_state(model, spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shipped_round_trip_restores_weights_classes_and_metrics(weights_dir):
    source = tiny_model()
    path = ship_tiny(weights_dir, source)
    spec = resolve_weights("shipped", stage="detect", model_name="tiny")
    assert (spec.kind, spec.path, spec.classes, spec.metrics) == ("shipped", path, CLASSES, {"map": 0.5})
    assert spec.sha256 == sha256_file(path)
    target = tiny_model()
    load_state(target, spec)
    assert all(torch.equal(source.state_dict()[k], v) for k, v in target.state_dict().items())


def test_save_shipped_replaces_its_entry_and_keeps_the_manifest_sorted(weights_dir):
    save_shipped(tiny_model(), stage="segment", model_name="b", classes=None, config={}, metrics={}, out_dir=weights_dir)
    ship_tiny(weights_dir)
    ship_tiny(weights_dir)  # the second save replaces the first entry
    text = (weights_dir / "manifest.json").read_text()
    entries = json.loads(text)["weights"]
    assert [(e["stage"], e["model"]) for e in entries] == [("detect", "tiny"), ("segment", "b")]
    assert {"sha256", "size", "classes", "config", "metrics", "created", "file"} <= set(entries[0])
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_shipped_without_an_entry_lists_what_is_shipped(weights_dir):
    ship_tiny(weights_dir)
    with pytest.raises(WeightsError) as error:
        resolve_weights("shipped", stage="segment", model_name="unet_small")
    message = str(error.value)
    assert "stages.segment.weights: no shipped weights for model unet_small" in message
    assert "detect/tiny" in message and "blinkflow train segment" in message and "\n" not in message


def test_shipped_without_a_manifest_is_an_error(weights_dir):
    with pytest.raises(WeightsError, match="no shipped weights for model tiny; shipped: \\[\\]"):
        resolve_weights("shipped", stage="detect", model_name="tiny")


def test_sha256_mismatch_is_refused(weights_dir):
    path = ship_tiny(weights_dir)
    spec = resolve_weights("shipped", stage="detect", model_name="tiny")
    torch.save(tiny_model().state_dict(), path)  # replaced after the manifest was written
    with pytest.raises(WeightsError, match="sha256 mismatch") as error:
        load_state(tiny_model(), spec)
    assert str(path) in str(error.value)


class _RunsAShellCommand:
    """Unpickling this calls os.system; weights_only loading must never get that far."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "torch.save legacy", "pickle"])
def test_a_pickle_with_code_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"model": {"weight": _RunsAShellCommand(marker)}}
    if writer == "torch.save":
        torch.save(payload, path)
    elif writer == "torch.save legacy":  # several pickles in a row; the object's is the fourth
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    spec = resolve_weights(str(path), stage="detect", model_name="tiny")
    with warnings.catch_warnings(record=True) as warned, \
            pytest.raises(WeightsError, match="refusing to load evil.pt: it contains Python code") as error:
        warnings.simplefilter("always")
        load_state(tiny_model(), spec)
    assert "system" in str(error.value) and "torch.save(model.state_dict(), path)" in str(error.value)
    assert not marker.exists()
    assert not warned, [str(w.message) for w in warned]  # one line for the user: torch's own warning came first


def test_a_corrupt_file_names_the_file(tmp_path):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pt"):
        load_state(tiny_model(), resolve_weights(str(path), stage="detect", model_name="tiny"))


def test_a_file_with_compressed_records_is_refused_before_torch_inflates_them(tmp_path, monkeypatch):
    """torch.save never compresses; torch.load inflates a DEFLATE record to whatever it declares (2 MB of
    file, 2.6 GB of memory) before any check. The same weights re-zipped with compression are refused unread."""
    import zipfile

    from blinkflow.models import weights

    plain = tmp_path / "plain.pt"
    torch.save(tiny_model().state_dict(), plain)
    packed = tmp_path / "packed.pt"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info.filename))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(WeightsError, match=r"refusing to load packed\.pt: its records are compressed") as error:
        load_state(tiny_model(), resolve_weights(str(packed), stage="detect", model_name="tiny"))
    assert "\n" not in str(error.value)
    monkeypatch.undo()
    load_state(tiny_model(), resolve_weights(str(plain), stage="detect", model_name="tiny"))  # torch.save's own: fine
    assert weights._refuse_compressed(plain, plain.read_bytes()) is None


@pytest.mark.parametrize("odd", ["int", "sparse", "complex"])
def test_a_state_dict_value_that_is_not_a_dense_real_tensor_is_one_line_naming_it(tmp_path, odd):
    """They failed inside load_state_dict with tracebacks (int, sparse), or loaded with the imaginary part
    dropped (complex)."""
    state = tiny_model().state_dict()
    key = "0.weight"
    state[key] = {"int": 5, "sparse": state[key].to_sparse(), "complex": state[key].to(torch.complex64)}[odd]
    path = tmp_path / f"{odd}.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=rf"{odd}\.pt.*: 0\.weight is a .*not a plain dense tensor") as error:
        load_state(tiny_model(), resolve_weights(str(path), stage="detect", model_name="tiny"))
    assert "\n" not in str(error.value)


def test_wrong_number_of_classes_names_both_counts(tmp_path):
    path = tmp_path / "five.pt"
    torch.save(tiny_model(5).state_dict(), path)
    spec = resolve_weights(str(path), stage="detect", model_name="tiny")
    with pytest.raises(WeightsError) as error:
        load_state(tiny_model(3), spec)
    assert "the weights have 5 classes but the model was built for 3" in str(error.value)
    assert "give options.classes +2 names" in str(error.value) and "five.pt" in str(error.value)


def test_missing_and_unexpected_keys_are_listed_on_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="missing keys: 0.weight, 0.bias, 2.weight .*unexpected keys: head.weight") as error:
        load_state(tiny_model(), resolve_weights(str(path), stage="detect", model_name="tiny"))
    assert "\n" not in str(error.value)


def test_checkpoint_dicts_and_ddp_prefixes_are_accepted(tmp_path):
    source = tiny_model()
    path = tmp_path / "ckpt.pt"
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"model": state, "epoch": 3, "config": {"lr": 0.1}}, path)
    target = tiny_model()
    load_state(target, resolve_weights(str(path), stage="detect", model_name="tiny"))
    assert all(torch.equal(source.state_dict()[k], v) for k, v in target.state_dict().items())


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(WeightsError, match="nowhere/w.pt"):
        resolve_weights("nowhere/w.pt", stage="segment", model_name="tiny", base_dir=tmp_path)


def test_relative_file_is_found_beside_the_config(tmp_path):
    torch.save(tiny_model().state_dict(), tmp_path / "w.pt")
    spec = resolve_weights("w.pt", stage="detect", model_name="tiny", base_dir=tmp_path)
    assert (spec.kind, spec.path, spec.sha256) == ("file", tmp_path / "w.pt", None)


def test_file_checksum_comes_from_a_sidecar(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), path)
    (tmp_path / "w.pt.sha256").write_text("0" * 64 + "  w.pt\n")
    spec = resolve_weights(str(path), stage="detect", model_name="tiny")
    assert spec.sha256 == "0" * 64
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_state(tiny_model(), spec)


def test_the_bytes_checked_are_the_bytes_loaded(tmp_path, monkeypatch):
    """The pin was checked on one read of the file and torch.load read it again: a file replaced in between
    loaded unchecked."""
    path = tmp_path / "w.pt"
    pinned, other = tiny_model(), tiny_model()
    torch.save(pinned.state_dict(), path)
    (tmp_path / "w.pt.sha256").write_text(sha256_file(path) + "  w.pt\n")
    spec = resolve_weights(str(path), stage="detect", model_name="tiny")
    check = weights._verify_checksum

    def check_then_replace(*args):
        check(*args)
        torch.save(other.state_dict(), path)  # swapped right after the check

    monkeypatch.setattr(weights, "_verify_checksum", check_then_replace)
    loaded = tiny_model()
    load_state(loaded, spec)
    assert torch.equal(loaded[0].weight, pinned[0].weight)
    assert not torch.equal(loaded[0].weight, other[0].weight)


def test_file_beside_a_manifest_gets_its_checksum_and_classes(tmp_path):
    path = ship_tiny(tmp_path)
    spec = resolve_weights(str(path), stage="detect", model_name="tiny")
    assert (spec.kind, spec.sha256, spec.classes) == ("file", sha256_file(path), CLASSES)


@pytest.fixture
def ssdlite_entry(monkeypatch, tmp_path):
    """Point the registry at a torchvision enum and the torch hub at an empty folder."""
    from blinkflow.models import registry

    entry = ModelEntry("ssdlite320_mobilenet_v3_large", "detect", tiny_model, "SSDLite320_MobileNet_V3_Large_Weights")
    monkeypatch.setattr(registry, "get_model_entry", lambda name, task=None: entry)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def test_torchvision_default_not_in_cache_explains_how_to_prefetch(ssdlite_entry):
    with pytest.raises(WeightsError) as error:
        resolve_weights("DEFAULT", stage="detect", model_name="ssdlite320_mobilenet_v3_large")
    message = str(error.value)
    assert "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1" in message
    assert "torchvision.models.get_weight('SSDLite320_MobileNet_V3_Large_Weights.COCO_V1').get_state_dict()" in message
    assert "~/.cache/torch/hub/checkpoints/ssdlite320_mobilenet_v3_large_coco-a79551df.pth" in message
    assert str(ssdlite_entry) in message and "\n" not in message


def test_torchvision_weights_in_cache_keep_torchvision_categories(ssdlite_entry):
    ssdlite_entry.mkdir(parents=True)
    path = ssdlite_entry / "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    torch.save(tiny_model().state_dict(), path)
    spec = resolve_weights("DEFAULT", stage="detect", model_name="ssdlite320_mobilenet_v3_large")
    assert (spec.kind, spec.path, spec.torchvision_enum) == ("torchvision", path, "SSDLite320_MobileNet_V3_Large_Weights.COCO_V1")
    assert spec.classes[0] == "__background__" and "N/A" in spec.classes and len(spec.classes) == 91
    # the file name carries a sha256 prefix (torch.hub's convention), which this file does not match
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_state(tiny_model(), spec)


def test_unknown_torchvision_member_lists_the_valid_ones(ssdlite_entry):
    with pytest.raises(WeightsError, match="has no member 'IMAGENET1K_V9'.*COCO_V1") as raised:
        resolve_weights("IMAGENET1K_V9", stage="detect", model_name="ssdlite320_mobilenet_v3_large")
    assert str(raised.value).endswith("valid: ['DEFAULT', 'COCO_V1']")  # the DEFAULT alias listed once


@pytest.mark.parametrize("entries, problem", [
    (["w.pt"], "weights.0: expected an object, got str"),
    ([{"file": "w.pt", "sha256": 12345}], "weights.0: sha256 must be a str, got int"),
    ([{"file": "w.pt", "classes": 5}], "weights.0: classes must be a list, got int"),
])
def test_a_malformed_manifest_beside_the_weights_is_one_line_naming_the_entry(tmp_path, entries, problem):
    path = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), path)
    (tmp_path / "manifest.json").write_text(json.dumps({"weights": entries}))
    with pytest.raises(WeightsError, match=rf"manifest.json: {problem}; fix the entry"):
        resolve_weights(str(path), stage="detect", model_name="tiny")


def test_a_manifest_or_sidecar_that_is_not_text_is_one_line(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(tiny_model().state_dict(), path)
    (tmp_path / "w.pt.sha256").write_bytes(b"\xff\xfe")
    with pytest.raises(WeightsError, match="w.pt.sha256: expected a 64-digit sha256"):
        resolve_weights(str(path), stage="detect", model_name="tiny")
    (tmp_path / "manifest.json").write_bytes(b"\xff{}")
    with pytest.raises(WeightsError, match="manifest.json: invalid JSON"):
        resolve_weights(str(path), stage="detect", model_name="tiny")


def test_importing_into_an_out_that_is_a_file_is_one_line(tmp_path):
    from blinkflow.models.convert import import_weights

    (tmp_path / "file.pt").write_bytes(b"x")
    with pytest.raises(WeightsError, match="file.pt: a file, not a folder"):
        import_weights("yolox_nano", out_dir=tmp_path / "file.pt")


def test_a_text_file_given_as_weights_says_what_it_is_not(tmp_path):
    """It said 'not a valid torch weights file (101)': torch's KeyError of the byte it met."""
    path = tmp_path / "notes.pt"
    path.write_text("hello weights\n")
    with pytest.raises(WeightsError, match=r"not a valid torch weights file \(its bytes are not a pickle torch\.save "
                                           r"writes\); re-export it") as error:
        load_state(tiny_model(), resolve_weights(str(path), stage="detect", model_name="tiny"))
    assert "(101)" not in str(error.value)


def test_a_fine_tuned_checkpoint_brings_its_own_classes_into_the_stage(tmp_path):
    """A `blinkflow train` checkpoint records its classes: the stage names its outputs by them (it took the
    synthetic scenes' names and loaded, or failed to, by their count); one trained for another stage is refused."""
    from blinkflow.config import StageConfig
    from blinkflow.models.registry import build_model
    from blinkflow.stages.segment import Segment, SegmentOptions

    classes = ["background", "apple", "bus"]
    state = build_model("unet_small", task="segment", num_classes=len(classes)).state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": state, "classes": classes, "config": {"task": "segment"}, "epoch": 1}, path)
    stage = Segment(StageConfig(model="unet_small", weights=str(path), options=SegmentOptions(input_size=[64, 64])))
    reads = []
    real_read = weights.read_verified
    with mock.patch.object(weights, "read_verified", lambda spec: reads.append(spec.path) or real_read(spec)):
        stage.setup("cpu")  # read once: for its classes, then loaded from the same verified contents
    assert stage.classes == classes and reads == [path]
    assert torch.equal(stage.model.state_dict()[next(iter(state))], next(iter(state.values())))
    torch.save({"model": state, "classes": classes, "config": {"task": "detect"}}, path)
    with pytest.raises(WeightsError, match="checkpoint of `blinkflow train detect`, not of the segment stage"):
        Segment(StageConfig(model="unet_small", weights=str(path), options=SegmentOptions(input_size=[64, 64]))).setup("cpu")


def test_another_tools_manifest_beside_a_pt_is_no_manifest(tmp_path):
    """A .pt in a `blinkflow label --out` folder was refused: "manifest.json: expected an object with a 'weights'
    list"."""
    torch.save(tiny_model().state_dict(), tmp_path / "w.pt")
    (tmp_path / "manifest.json").write_text(json.dumps({"videos": {}, "version": 1}))
    spec = resolve_weights(str(tmp_path / "w.pt"), stage="detect", model_name="tiny")
    assert (spec.kind, spec.sha256, spec.classes) == ("file", None, None)
    load_state(tiny_model(), spec)


def test_a_fresh_class_head_is_only_the_class_dependent_tensors(tmp_path):
    """init: shipped on a net of other widths started 91 of its 110 tensors fresh, silently: a fine-tune trained from
    scratch while its metrics said where it started from. Only tensors differing in their class dimension may."""
    from blinkflow.models.registry import build_model

    path = tmp_path / "three.pt"
    torch.save(build_model("unet_small", task="segment", num_classes=3).state_dict(), path)
    spec = resolve_weights(str(path), stage="segment", model_name="unet_small")
    fresh = load_state(build_model("unet_small", task="segment", num_classes=5), spec, fresh_head=True)
    assert fresh and all(key.startswith("head.") for key in fresh)
    narrower = build_model("unet_small", task="segment", num_classes=5, base_width=8)
    with pytest.raises(WeightsError, match="shape mismatch"):
        load_state(narrower, spec, fresh_head=True)


def test_odd_tensors_and_other_model_args_are_one_line_saying_what_is_wrong(tmp_path, recwarn):
    """A sparse tensor printed torch's warning before the line; meta tensors (shapes, no values) failed in
    load_state_dict with a cut-off message; reid weights of another ``dim`` were said to have 'classes'."""
    from blinkflow.models.reid import embed_small

    state = tiny_model().state_dict()
    state["0.weight"] = state["0.weight"].to_sparse()
    torch.save(state, tmp_path / "sparse.pt")
    with pytest.raises(WeightsError, match="sparse or nested tensor"):
        load_state(tiny_model(), resolve_weights(str(tmp_path / "sparse.pt"), stage="detect", model_name="tiny"))
    assert not [w for w in recwarn if "sparse" in str(w.message)]
    torch.save(tiny_model().to("meta").state_dict(), tmp_path / "meta.pt")
    with pytest.raises(WeightsError, match=r"0\.weight is a meta tensor \(a shape without values\)"):
        load_state(tiny_model(), resolve_weights(str(tmp_path / "meta.pt"), stage="detect", model_name="tiny"))
    torch.save(embed_small(widths=(8, 8, 8, 8), dim=64).state_dict(), tmp_path / "reid.pt")
    with pytest.raises(WeightsError) as error:
        load_state(embed_small(widths=(8, 8, 8, 8), dim=32),
                   resolve_weights(str(tmp_path / "reid.pt"), stage="reid", model_name="embed_small"))
    assert "weights (64,), model (32,)" in str(error.value) and "model_args" in str(error.value)
    assert "classes" not in str(error.value)
