"""Device names as configs give them (``cpu``, ``auto``, ``cuda:N``) and the torch device they mean.

Shared by the stages and the training package; torch is imported inside the function.
"""

from __future__ import annotations

from typing import Any

from blinkflow.errors import StageError

#: the device names a stage or a training run accepts
DEVICE_PATTERN = r"cpu|auto|cuda(:\d+)?"


def resolve_device(device: str, where: str = "device") -> Any:
    """Return a torch.device, with a clear error when CUDA is asked for but absent.

    ``auto`` is the first CUDA GPU when there is one, else the CPU (training
    configs use it so that one file trains on a GPU and evaluates anywhere).
    """
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"{where}: {device!r} needs a CUDA GPU and this machine has none; set {where.rsplit('.', 1)[-1]}: "
                         "cpu (or auto)")
    return torch.device(device)
