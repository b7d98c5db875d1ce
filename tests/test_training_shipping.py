"""Training on one machine and shipping from another: device 'auto', action flips,
flow EPE on moving pixels, the manifest lock and `blinkflow eval --record`."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.models.classes import SYNTHETIC_ACTIONS
from blinkflow.models.training.config import load_train_config
from blinkflow.errors import ConfigError

TRAIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_device_auto_is_the_gpu_when_there_is_one():
    from blinkflow.stages.common import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "auto:0"])
def test_training_device_is_validated(device):
    with pytest.raises(ConfigError, match=rf"^device: expected 'cpu', 'cuda', 'cuda:N' or 'auto', got '{device}'"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"device={device}"])


def test_mirrored_action_labels_swap_left_and_right_only():
    from blinkflow.models.training.tasks import _mirrored_labels

    mirror = _mirrored_labels(list(SYNTHETIC_ACTIONS))
    left, right = SYNTHETIC_ACTIONS.index("slide-left"), SYNTHETIC_ACTIONS.index("slide-right")
    assert mirror[left] == right and mirror[right] == left
    others = [i for i in range(len(SYNTHETIC_ACTIONS)) if i not in (left, right)]
    assert mirror[others].tolist() == others
    # real class folders without a mirror partner keep their label
    assert _mirrored_labels(["Walk left", "Walk right", "Jump"]).tolist() == [1, 0, 2]


def test_action_flips_mirror_the_clip_and_swap_its_label(tmp_path):
    from blinkflow.models.training.tasks import make_task

    cfg = load_train_config(TRAIN_CONFIGS / "smoke-action.yaml", [f"out_dir={tmp_path}", "data.flip=true"], task="action")
    task = make_task(cfg)
    task.train_set()  # learns the class list, hence the mirror map
    left, right = SYNTHETIC_ACTIONS.index("slide-left"), SYNTHETIC_ACTIONS.index("slide-right")
    clip = torch.arange(3 * 2 * 4 * 5, dtype=torch.uint8).view(3, 2, 4, 5)
    items = [{"clip": clip, "label": torch.tensor(left)} for _ in range(64)]
    torch.manual_seed(0)
    clips, labels = task.collate(items, train=True)
    flipped = labels == right
    assert 0 < int(flipped.sum()) < 64  # about half, each one mirrored
    original = clip.float() / 255
    assert torch.equal(clips[flipped], original.flip(-1).expand(int(flipped.sum()), -1, -1, -1, -1))
    assert torch.equal(clips[~flipped], original.expand(int((~flipped).sum()), -1, -1, -1, -1))
    assert bool((labels[~flipped] == left).all())
    # evaluation batches are never flipped
    _, eval_labels = task.collate(items, train=False)
    assert bool((eval_labels == left).all())


class _ConstantFlow(torch.nn.Module):
    """Predicts the same (u, v) everywhere, in model-input pixels."""

    def __init__(self, u: float, v: float) -> None:
        super().__init__()
        self.uv = torch.tensor([u, v]).view(1, 2, 1, 1)

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.uv.expand(first.shape[0], 2, *first.shape[-2:])


def test_flow_epe_on_moving_pixels_hand_computed(tmp_path):
    from blinkflow.models.training.datasets import FlowExamples
    from blinkflow.models.training.tasks import make_task
    from blinkflow.models.training.train import make_loader

    cfg = load_train_config(TRAIN_CONFIGS / "smoke-flow.yaml", [f"out_dir={tmp_path}"], task="flow")
    task = make_task(cfg)
    h, w = 4, 4
    truth = np.zeros((h, w, 2), np.float32)
    truth[0, :, 0] = 3.0  # one row of 4 pixels moves 3 px right; the rest is still
    image = torch.zeros(1, 3, h, w, dtype=torch.uint8)
    flow_in = torch.from_numpy(truth).permute(2, 0, 1)[None]
    dataset = FlowExamples(image, image, flow_in, [(torch.from_numpy(truth), torch.ones(h, w, dtype=torch.bool))])
    scores = task.evaluate(_ConstantFlow(1.0, 0.0), make_loader(task, dataset, 1, train=False), torch.device("cpu"))
    assert scores["moving_fraction"] == pytest.approx(4 / 16)
    assert scores["epe_moving"] == pytest.approx(2.0)  # |3 - 1| on the moving row
    assert scores["epe_moving_zero_flow"] == pytest.approx(3.0)
    assert scores["epe"] == pytest.approx((4 * 2.0 + 12 * 1.0) / 16)  # still pixels are off by the 1 px predicted
    assert scores["epe_zero_flow"] == pytest.approx(4 * 3.0 / 16)


def _ship_one(folder: str, stage: str) -> None:
    from blinkflow.models.weights import save_shipped

    save_shipped(torch.nn.Linear(2, 2), stage=stage, model_name="tiny", classes=None, config={"stage": stage},
                 metrics={"value": 1.0}, out_dir=Path(folder))


@pytest.mark.slow
def test_runs_shipping_at_once_all_land_in_the_manifest(tmp_path):
    from blinkflow.models.weights import read_manifest

    stages = ["segment", "flow", "action", "detect"] * 3
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.starmap(_ship_one, [(str(tmp_path), f"{s}{i}") for i, s in enumerate(stages)])
    entries = read_manifest(tmp_path)["weights"]
    assert sorted(e["stage"] for e in entries) == sorted(f"{s}{i}" for i, s in enumerate(stages))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_run_killed_while_shipping_leaves_the_shipped_weights_its_manifest_pins(tmp_path, monkeypatch):
    from blinkflow.models.weights import WeightsSpec, read_manifest, read_verified, save_shipped

    save_shipped(torch.nn.Linear(2, 2), stage="flow", model_name="tiny", classes=None, config={}, metrics={},
                 out_dir=tmp_path)

    def killed_half_way(obj, target):
        Path(target).write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_shipped(torch.nn.Linear(2, 2), stage="flow", model_name="tiny", classes=None, config={}, metrics={},
                     out_dir=tmp_path)
    entry = read_manifest(tmp_path)["weights"][0]
    state = read_verified(WeightsSpec(source="shipped", kind="shipped", path=tmp_path / entry["file"], sha256=entry["sha256"]))
    assert set(state) == {"weight", "bias"} and not list(tmp_path.glob(".*partial*"))


def test_record_replaces_metrics_and_keeps_how_the_weights_were_trained(tmp_path):
    from blinkflow.models.weights import WeightsError, record_metrics, save_shipped

    save_shipped(torch.nn.Linear(2, 2), stage="flow", model_name="tiny", classes=None, config={},
                 metrics={"epe": 0.5, "train_seconds": 12.0, "steps": 30, "epochs": 2, "trained_on": "cuda (GPU)"},
                 out_dir=tmp_path)
    entry = record_metrics("flow", "tiny", {"epe": 0.4999, "evaluated_on": "here"}, folder=tmp_path)
    assert entry["metrics"] == {"epe": 0.4999, "evaluated_on": "here", "train_seconds": 12.0, "steps": 30,
                                "epochs": 2, "trained_on": "cuda (GPU)"}
    assert json.loads((tmp_path / "manifest.json").read_text())["weights"][0]["metrics"] == entry["metrics"]
    with pytest.raises(WeightsError, match="no segment entry for tiny; ship the weights first"):
        record_metrics("segment", "tiny", {}, folder=tmp_path)


def test_cli_eval_record_writes_this_machines_numbers(tmp_path, monkeypatch, capsys):
    from blinkflow.models import weights
    from blinkflow.cli import main as cli

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    config = str(TRAIN_CONFIGS / "smoke-flow.yaml")
    out = f"out_dir={tmp_path / 'run'}"
    assert cli(["train", "flow", "--config", config, "--set", out, "--set", "epochs=1", "--ship", "--no-progress"]) == 0
    manifest = tmp_path / "weights" / "manifest.json"
    entry = json.loads(manifest.read_text())["weights"][0]
    entry["metrics"]["epe"] = 123.0  # as if evaluated elsewhere
    manifest.write_text(json.dumps({"weights": [entry]}))
    capsys.readouterr()
    assert cli(["eval", "flow", "--config", config, "--set", out, "--weights", "shipped", "--record"]) == 0
    recorded = json.loads(manifest.read_text())["weights"][0]["metrics"]
    assert recorded["epe"] != 123.0 and f"epe {recorded['epe']:.4f}" in capsys.readouterr().out
    assert recorded["trained_on"].startswith("cpu") and recorded["steps"] == entry["metrics"]["steps"]
    assert cli(["eval", "flow", "--config", config, "--set", out, "--record"]) == 2
    assert "--record: only the shipped weights" in capsys.readouterr().err


def test_record_keeps_what_the_weights_were_initialised_from(tmp_path):
    from blinkflow.models.weights import record_metrics, save_shipped

    save_shipped(torch.nn.Linear(2, 2), stage="detect", model_name="tiny", classes=None, config={},
                 metrics={"map": 0.2, "steps": 4, "initialised_from": "shipped (sha256 abc)"}, out_dir=tmp_path)
    entry = record_metrics("detect", "tiny", {"map": 0.21, "evaluated_on": "here"}, folder=tmp_path)
    assert entry["metrics"]["initialised_from"] == "shipped (sha256 abc)" and entry["metrics"]["map"] == 0.21


def test_cli_eval_record_refuses_overrides_that_change_what_is_measured(tmp_path, monkeypatch, capsys):
    import shutil

    from blinkflow.cli import main as cli
    from blinkflow.models import weights

    for name in ("manifest.json", "segment-unet_small.pt"):  # a copy: the manifest is what --record writes
        shutil.copy(weights.WEIGHTS_DIR / name, tmp_path / name)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    config = str(TRAIN_CONFIGS / "segment.yaml")
    argv = ["eval", "segment", "--config", config, "--weights", "shipped", "--record", "--set", f"out_dir={tmp_path}"]
    assert cli([*argv, "--set", "data.val.clips=1", "--set", "data.val.samples_per_clip=1", "--set", "threads=2"]) == 2
    err = capsys.readouterr().err
    assert "--record: the --set overrides change data.val.clips, data.val.samples_per_clip, so the metrics" in err
    assert len(err.strip().splitlines()) == 1
    copy = tmp_path / "fewer-val-clips.yaml"  # the YAML itself changed: it recorded 8 examples' figure as the 24's
    text = Path(config).read_text().replace("../../tests/data", str(TRAIN_CONFIGS.parent.parent / "tests" / "data"))
    copy.write_text(text.replace("clips: 24", "clips: 2", 1))  # (the backgrounds, training-only, moved along)
    assert "clips: 2" in copy.read_text()
    assert cli(["eval", "segment", "--config", str(copy), "--weights", "shipped", "--record", "--set", f"out_dir={tmp_path}"]) == 2
    assert "evaluates differently from the config the manifest records for segment/unet_small (data.val.clips)" in capsys.readouterr().err


def test_shipping_over_converted_weights_keeps_their_source_and_licence(tmp_path, monkeypatch, capsys):
    """On a copy of the shipped manifest: fine-tuned YOLOX-nano stays Megvii's derivative, under its licence."""
    import shutil

    from blinkflow.cli import main as cli
    from blinkflow.models import weights

    shutil.copy(weights.WEIGHTS_DIR / "manifest.json", tmp_path / "manifest.json")
    original = next(e for e in weights.read_manifest(tmp_path)["weights"] if e["model"] == "yolox_nano")
    weights.save_shipped(torch.nn.Linear(2, 2), stage="detect", model_name="yolox_nano", classes=original["classes"],
                         config={}, metrics={"map": 0.2, "initialised_from": "shipped (sha256 x)"}, out_dir=tmp_path)
    entry = next(e for e in weights.read_manifest(tmp_path)["weights"] if e["model"] == "yolox_nano")
    assert "source" not in entry and entry["derived_from"] == original["source"]
    assert entry["licence"] == original["licence"] == "Apache-2.0 (YOLOX, Megvii)"
    # shipped again (a second fine-tune): still derived from the original
    weights.save_shipped(torch.nn.Linear(2, 2), stage="detect", model_name="yolox_nano", classes=None, config={},
                         metrics={}, out_dir=tmp_path)
    again = next(e for e in weights.read_manifest(tmp_path)["weights"] if e["model"] == "yolox_nano")
    assert again["derived_from"] == original["source"] and again["licence"] == original["licence"]
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path)
    assert cli(["weights", "list"]) == 0
    listed = capsys.readouterr().out.split("detect/yolox_nano")[1].split("\n")[1]
    assert "licence: Apache-2.0 (YOLOX, Megvii)" in listed
    assert f"source: fine-tuned by Blinkflow from {original['source']['origin']}" in listed


def test_shipping_over_self_trained_weights_adds_no_provenance(tmp_path):
    from blinkflow.models.weights import read_manifest, save_shipped

    for _ in range(2):
        save_shipped(torch.nn.Linear(2, 2), stage="flow", model_name="tiny", classes=None, config={}, metrics={},
                     out_dir=tmp_path)
    entry = read_manifest(tmp_path)["weights"][0]
    assert "derived_from" not in entry and "licence" not in entry
