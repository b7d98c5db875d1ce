"""configs/coco-pretrained.yaml: valid as it ships, and every stage names torchvision weights that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "coco-pretrained.yaml"
EXPECTED = {
    "detect": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "segment": "lraspp_mobilenet_v3_large",
    "flow": "raft_small",
    "action": "r3d_18",
}


def test_coco_pretrained_config_validates(capsys):
    from blinkflow.cli import main

    assert main(["validate", str(CONFIG)]) == 0
    assert "ok" in capsys.readouterr().out


def test_coco_pretrained_config_uses_torchvision_default_weights():
    from blinkflow.config import load_config

    cfg = load_config(CONFIG)
    assert {name: cfg.stages[name].model for name in cfg.enabled_stages()} == EXPECTED
    assert {cfg.stages[name].weights for name in EXPECTED} == {"DEFAULT"}


@pytest.mark.parametrize("stage, model", sorted(EXPECTED.items()))
def test_coco_pretrained_weights_name_a_real_torchvision_checkpoint(stage, model):
    """Resolved the way the worker does, short of the cache lookup (no download here)."""
    from blinkflow.models.weights import _torchvision_enum_name, _torchvision_member

    member = _torchvision_member(model, _torchvision_enum_name(model, stage), "DEFAULT", stage)
    assert member.url.endswith(".pth")
