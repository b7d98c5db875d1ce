"""The training package fine-tunes the converted real weights (``init: shipped``): on a COCO-format
folder keeping the COCO head (YOLOX), and on the synthetic scenes with a fresh class head (DeepLab)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from blinkflow.models.training.config import load_train_config

TRAIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"


def finetune(task: str, tmp_path: Path, *overrides: str) -> dict:
    from blinkflow.models.training.train import Runtime, main

    cfg = load_train_config(TRAIN_CONFIGS / f"finetune-{task}.yaml", [f"out_dir={tmp_path / task}", *overrides], task=task)
    return main(cfg, resume=False, runtime=Runtime(device=torch.device("cpu"), progress=False))


@pytest.mark.slow
def test_yolox_fine_tunes_from_its_coco_weights_on_a_coco_folder(tmp_path):
    summary = finetune("detect", tmp_path)
    probes = [loss for _, loss in summary["history"]["probe_loss"]]
    assert probes[-1] < probes[0]  # measured 5.35 -> 5.06 in 4 steps
    assert summary["classes"][18] == "dog" and len(summary["classes"]) == 91  # the init's COCO head, kept
    assert summary["metrics"]["map50"] > 0.3  # still a working COCO detector on the two sample images


@pytest.mark.slow
def test_deeplab_fine_tunes_on_the_synthetic_scenes_with_a_fresh_class_head(tmp_path, caplog):
    with caplog.at_level("INFO", logger="blinkflow.models.training.train"):
        summary = finetune("segment", tmp_path)
    probes = [loss for _, loss in summary["history"]["probe_loss"]]
    assert probes[-1] < 0.6 * probes[0]  # measured 1.59 -> 0.58 in 6 steps
    assert "2 class-dependent tensors start fresh (logits.bias" in caplog.text


@pytest.mark.slow
def test_yolox_training_loss_falls_on_one_real_image():
    """Three SGD steps on dog.jpg's three objects: the YOLOX loss (SimOTA, IoU, BCE) is wired right."""
    import numpy as np
    from PIL import Image

    from tests.conftest import load_shipped

    model = load_shipped("detect", "yolox_nano")
    image = torch.from_numpy(np.array(Image.open(Path(__file__).parent / "data" / "originals" / "dog.jpg")))
    image = image.permute(2, 0, 1).float() / 255
    target = {"boxes": torch.tensor([[133.0, 207, 326, 543], [54, 137, 572, 423], [466, 78, 692, 171]]),
              "labels": torch.tensor([18, 2, 8])}  # dog, bicycle, truck (COCO ids)
    # one image, full model: lr 3e-4 with momentum overshot from the 5th step on (square and rect letterbox alike)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    model.train()
    losses = []
    for _ in range(4):
        loss_dict = model([image], [target])
        assert set(loss_dict) == {"loss_box", "loss_obj", "loss_cls"}
        loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.slow
def test_shipping_a_yolox_fine_tune_keeps_megvii_as_its_source(tmp_path, monkeypatch):
    """`train --ship` over converted weights, on a copy of the weights folder: provenance and licence stay."""
    import json
    import shutil

    from blinkflow.cli import main as cli
    from blinkflow.models import weights

    copy = tmp_path / "weights"
    copy.mkdir()
    for name in ("manifest.json", "detect-yolox_nano.pt"):
        shutil.copy(weights.WEIGHTS_DIR / name, copy / name)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", copy)
    original = next(e for e in weights.read_manifest(copy)["weights"] if e["model"] == "yolox_nano")
    assert cli(["train", "detect", "--config", str(TRAIN_CONFIGS / "finetune-detect.yaml"), "--set",
                f"out_dir={tmp_path / 'run'}", "--set", "epochs=1", "--ship", "--no-progress", "--fresh"]) == 0
    entry = next(e for e in json.loads((copy / "manifest.json").read_text())["weights"] if e["model"] == "yolox_nano")
    assert entry["derived_from"] == original["source"] and entry["licence"] == original["licence"]
    assert entry["metrics"]["initialised_from"] == f"shipped (sha256 {original['sha256']})"
    assert entry["sha256"] != original["sha256"]


def test_a_coco_file_naming_other_categories_gets_a_fresh_head_for_its_own(tmp_path):
    """finetune-detect.yaml: a file sharing categories with COCO keeps the init's 80-class head; one whose
    annotations use none of them trains a head for the file's own categories (it was refused)."""
    import json
    import shutil

    from blinkflow.models.training.tasks import make_task

    sample = Path(__file__).resolve().parent / "data" / "coco"
    coco = json.loads((sample / "detections.json").read_text())
    for image in coco["images"]:
        shutil.copy(sample / image["file_name"], tmp_path / image["file_name"])

    def task_on(rename: dict[str, str]):
        cats = [{**c, "name": rename.get(c["name"], c["name"])} for c in coco["categories"]]
        path = tmp_path / f"coco-{len(rename)}.json"
        path.write_text(json.dumps({**coco, "categories": cats}))
        cfg = load_train_config(TRAIN_CONFIGS / "finetune-detect.yaml", [f"data.train_path={path}", f"data.val_path={path}",
                                                                        f"out_dir={tmp_path / 'run'}"], task="detect")
        return make_task(cfg), sorted(c["name"] for c in cats)

    task, _ = task_on({})
    assert len(task.init_classes()) == 91 and task.init_classes()[18] == "dog"  # all COCO names: the COCO head
    used = {a["category_id"] for a in coco["annotations"]}
    task, names = task_on({c["name"]: f"my-{c['name']}" for c in coco["categories"] if c["id"] in used})
    assert task.init_classes() is None
    classes = task.train_set().classes
    assert classes[0] == "background" and sorted(classes[1:]) == names and "my-person" in classes
    task, _ = task_on({"person": "forklift"})  # some still COCO's: the COCO head, the forklifts ignored
    assert len(task.init_classes()) == 91
