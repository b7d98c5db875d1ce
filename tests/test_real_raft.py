"""RAFT large from the original princeton-vl checkpoint: the renaming, and the shipped weights' flow.

The original (``raft-sintel.pth``, 21 MB) is not in the repository; its key names, shapes and dtypes
are (``tests/data/originals/raft-sintel.keys.txt``), so the converter is tested on a checkpoint of
exactly that layout with random values, written to ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

DATA = Path(__file__).resolve().parent / "data"


def original_layout() -> list[tuple[str, tuple[int, ...], str]]:
    rows = []
    for line in (DATA / "originals" / "raft-sintel.keys.txt").read_text().splitlines():
        name, shape, dtype = line.split()
        rows.append((name, () if shape == "scalar" else tuple(int(s) for s in shape.split("x")), dtype))
    return rows


def fake_original(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint laid out like the original: random values, each norm3 equal to its downsample twin."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, dtype in original_layout():
        if dtype == "int64":
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator) * 0.05
    for name in list(state):
        if ".norm3." in name:
            state[name] = state[name.replace(".norm3.", ".downsample.1.")].clone()
    torch.save(state, path)
    return state


def test_every_original_tensor_lands_on_torchvision_raft_large_once(tmp_path):
    from torchvision.models.optical_flow import raft_large

    from blinkflow.models.convert.raft_pth import convert

    original = fake_original(tmp_path / "raft.pth")
    state = convert(tmp_path / "raft.pth")
    expected = {"net." + key for key in raft_large(weights=None).state_dict()}
    assert set(state) == expected
    # a tensor reaches its torchvision name unchanged (the layer1 conv of the context encoder, say)
    assert torch.equal(state["net.context_encoder.layer1.0.convnormrelu1.0.weight"],
                       original["module.cnet.layer1.0.conv1.weight"])
    assert torch.equal(state["net.update_block.recurrent_block.convgru2.convq.weight"],
                       original["module.update_block.gru.convq2.weight"])


def test_the_converted_backend_computes_what_torchvision_raft_large_computes(tmp_path):
    from torchvision.models.optical_flow import raft_large

    from blinkflow.models.convert.raft_pth import convert, probe_pair
    from blinkflow.models.registry import build_model

    fake_original(tmp_path / "raft.pth")
    state = convert(tmp_path / "raft.pth")
    ours = build_model("raft_large", task="flow", num_flow_updates=4)
    ours.load_state_dict(state, strict=True)
    reference = raft_large(weights=None)
    reference.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, strict=True)
    first, second = probe_pair()
    with torch.inference_mode():
        flow = ours.eval()(first, second)
        expected = reference.eval()(first * 2 - 1, second * 2 - 1, num_flow_updates=4)[-1]
    assert torch.equal(flow, expected)


def test_a_norm3_that_is_not_its_downsample_twin_is_refused(tmp_path):
    from blinkflow.models.convert.raft_pth import convert
    from blinkflow.models.weights import WeightsError

    state = fake_original(tmp_path / "raft.pth")
    state["module.cnet.layer2.0.norm3.weight"] += 1.0
    torch.save(state, tmp_path / "raft.pth")
    with pytest.raises(WeightsError, match="norm3") as error:
        convert(tmp_path / "raft.pth")
    assert "raft.pth" in str(error.value) and "\n" not in str(error.value)


def test_an_unexpected_file_is_refused_before_conversion(tmp_path):
    from blinkflow.models.convert import import_weights
    from blinkflow.models.weights import WeightsError

    fake_original(tmp_path / "raft-sintel.pth")  # the right name, not the pinned bytes
    with pytest.raises(WeightsError, match="not a known original"):
        import_weights(str(tmp_path / "raft-sintel.pth"), out_dir=tmp_path / "out")
    with pytest.raises(WeightsError, match="not the pinned original") as error:
        from blinkflow.models.convert import IMPORTERS, verify_source

        verify_source(IMPORTERS["raft_large"], tmp_path / "raft-sintel.pth", (tmp_path / "raft-sintel.pth").read_bytes())
    assert "90630d2e7d48" in str(error.value)


def test_shipped_raft_beats_zero_flow_on_the_real_pair_with_ground_truth():
    from PIL import Image

    from blinkflow.models.metrics_flow import read_flo
    from tests.conftest import load_shipped

    model = load_shipped("flow", "raft_large")  # num_flow_updates: the builder's default, 12
    first, second = (torch.from_numpy(np.array(Image.open(DATA / "flow" / f"00001_img{i}.ppm"))).permute(2, 0, 1)[None]
                     .float() / 255 for i in (1, 2))
    truth = torch.from_numpy(read_flo(DATA / "flow" / "00001_flow.flo")).permute(2, 0, 1)[None]
    with torch.inference_mode():
        epe = float((model.eval()(first, second) - truth).norm(dim=1).mean())
    zero = float(truth.norm(dim=1).mean())
    assert epe < 0.4 * zero, (epe, zero)  # measured: 0.52 px against 1.78 px for zero flow
