"""RAFT (large) from the original princeton-vl checkpoint to torchvision's ``raft_large``.

The architectures are the same; only the names differ. The original keeps a
``module.`` prefix (DataParallel), calls the encoders ``fnet``/``cnet``, and
stores each downsampling norm twice (``norm3`` and ``downsample.1`` are one
module), so ``norm3`` is checked equal to its twin and dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from blinkflow.models.weights import WeightsError

CLASSES = None
MODEL_ARGS: dict[str, Any] = {}

#: (original pattern, torchvision replacement), applied in order to the name without ``module.``
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^fnet\.", "feature_encoder."),
    (r"^cnet\.", "context_encoder."),
    (r"^(\w+_encoder)\.conv1\.", r"\1.convnormrelu.0."),
    (r"^(\w+_encoder)\.norm1\.", r"\1.convnormrelu.1."),
    (r"^(\w+_encoder)\.conv2\.", r"\1.conv."),
    (r"\.(layer\d\.\d)\.conv(\d)\.", r".\1.convnormrelu\2.0."),
    (r"\.(layer\d\.\d)\.norm(\d)\.", r".\1.convnormrelu\2.1."),
    (r"^update_block\.encoder\.convc(\d)\.", r"update_block.motion_encoder.convcorr\1.0."),
    (r"^update_block\.encoder\.convf(\d)\.", r"update_block.motion_encoder.convflow\1.0."),
    (r"^update_block\.encoder\.conv\.", "update_block.motion_encoder.conv.0."),
    (r"^update_block\.gru\.conv([zrq])(\d)\.", r"update_block.recurrent_block.convgru\2.conv\1."),
    (r"^update_block\.mask\.0\.", "mask_predictor.convrelu.0."),
    (r"^update_block\.mask\.2\.", "mask_predictor.conv."),
)
_NORM3 = re.compile(r"\.layer\d\.\d\.norm3\.")


def convert(source: Path, data: bytes | None = None) -> dict:
    """The checkpoint's tensors under the ``raft_large`` backend's names (``net.`` + torchvision's); ``data``:
    the file's bytes when already read (and verified)."""
    import io

    import torch

    try:
        original = torch.load(io.BytesIO(data) if data is not None else source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing error
        raise WeightsError(f"{source}: not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(original, dict):
        raise WeightsError(f"{source}: expected a state dict, got {type(original).__name__}")
    state = {key.removeprefix("module."): value for key, value in original.items()}
    _check_norm3_twins(source, state)
    return {"net." + rename(key): value.float() if value.is_floating_point() else value
            for key, value in state.items() if not _NORM3.search(key)}


def rename(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def _check_norm3_twins(source: Path, state: dict) -> None:
    import torch

    for key, value in state.items():
        if _NORM3.search(key):
            twin = re.sub(r"\.norm3\.", ".downsample.1.", key)
            if twin not in state or not torch.equal(state[twin], value):
                raise WeightsError(f"{source}: {key} differs from {twin}; not the original RAFT layout")


def storage_check(model32: Any, model16: Any) -> dict:
    """Flow on a seeded textured pair moved by a known shift: fp16 storage is ok within 0.01 px."""

    first, second = probe_pair()
    flow32 = model32(first, second)
    flow16 = model16(first, second)
    change = float((flow32 - flow16).norm(dim=1).max())
    return {"ok": change <= 0.01, "max_flow_change_px": round(change, 5), "probe": "seeded texture, 128x160"}


def probe_pair() -> tuple[Any, Any]:
    """A smooth random texture and the same texture shifted (2, 1) pixels: real-looking flow for checks."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 40, 48, generator=generator)
    texture = F.interpolate(noise, size=(136, 168), mode="bicubic", align_corners=False).clamp(0, 1)
    return texture[..., 4:132, 4:164], texture[..., 3:131, 2:162]
