"""``stages.X.compile``: torch.compile of a model stage's forward, checked in config, equal to the eager
forward on the CPU (inductor) and, where there is one, on a GPU with CUDA graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.config import load_config
from blinkflow.errors import ConfigError
from blinkflow.frame import Frame
from blinkflow.registry import stages as stage_registry
from blinkflow.stages.common import decode_class_map

PARKING = Path(__file__).resolve().parent / "data" / "static" / "car-detection-19s.mp4"


@pytest.mark.parametrize("stage, message", [
    ({"compile": "fastest"}, r"stages\.segment\.compile"),
    ({"compile": "default", "depth_parallel": 2}, r"stages\.segment\.compile: 'default' compiles the whole model"),
])
def test_compile_is_checked_in_config(stage, message):
    with pytest.raises(ConfigError, match=message):
        load_config(data={"stages": {"segment": stage}})


def _frames(count: int, size: tuple[int, int]) -> list[Frame]:
    import av

    frames = []
    with av.open(str(PARKING)) as container:
        for index, decoded in enumerate(container.decode(video=0)):
            if index == count:
                break
            frames.append(Frame("s", index, index / 25, np.array(decoded.to_image().resize(size))))
    return frames


def _class_maps(compile_mode: str, device: str = "cpu", precision: str = "fp32") -> tuple[list[np.ndarray], object]:
    cfg = load_config(data={"stages": {"segment": {"model": "unet_small", "batch": 2, "device": device,
                                                   "precision": precision, "compile": compile_mode,
                                                   "options": {"input_size": [64, 96]}}}})
    torch.manual_seed(0)  # random weights: the same model both times
    stage = stage_registry.get("segment")(cfg.stages["segment"])
    stage.setup(device)
    frames = stage.process(_frames(4, (192, 108)))
    return [decode_class_map(f.results["segment"]["mask"]["data"]) for f in frames], stage.model


@pytest.mark.slow
def test_a_compiled_segmenter_gives_the_eager_class_maps_on_the_cpu(one_torch_thread):
    eager, _ = _class_maps("off")
    compiled, model = _class_maps("default")
    assert model._compiled_call_impl is not None  # the forward went through torch.compile (inductor)
    agreement = [float((a == b).mean()) for a, b in zip(eager, compiled)]
    assert min(agreement) >= 0.999, agreement  # reordered float sums move a pixel at a class border at most


@pytest.mark.needs_cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_compiled_segmenter_with_cuda_graphs_gives_the_eager_class_maps_on_a_gpu():
    eager, _ = _class_maps("off", "cuda:0", "fp16")
    compiled, _ = _class_maps("reduce-overhead", "cuda:0", "fp16")
    agreement = [float((a == b).mean()) for a, b in zip(eager, compiled)]
    assert min(agreement) >= 0.99, agreement


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto picks the GPU here: nothing compiles on a CPU")
def test_compiling_on_the_cpu_and_device_auto_are_said_at_setup(caplog):
    """A compiled forward took 79 s on the first CPU frame with no word of compiling; ``device: auto`` logged
    "on auto", not the device it chose."""
    cfg = load_config(data={"stages": {"segment": {"model": "unet_small", "device": "auto", "compile": "reduce-overhead",
                                                   "options": {"input_size": [64, 96]}}}})
    stage = stage_registry.get("segment")(cfg.stages["segment"])
    with caplog.at_level("INFO", logger="blinkflow.stages.model_stage"):
        stage.setup("auto")  # torch.compile is lazy: nothing compiles before a forward
    lines = [r.getMessage() for r in caplog.records]
    assert ("stages.segment.compile: reduce-overhead on cpu compiles the forward for each new batch shape first "
            "(minutes on a CPU); its CUDA graphs apply on GPUs only") in lines
    assert any(line.startswith("segment: unet_small") and line.endswith("on cpu (auto)") for line in lines), lines
