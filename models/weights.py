"""Weight sources and safe loading.

A stage's ``weights:`` setting is one of

* ``null``: random initialisation (kind ``"random"``);
* ``"shipped"``: the project's own weights in ``models/weights/``, listed with
  their sha256, classes, training config and eval metrics in ``manifest.json``;
* a torchvision enum member name such as ``"DEFAULT"`` or ``"COCO_V1"``: the
  torchvision checkpoint, taken from the local torch hub cache only (the
  pipeline never downloads; the error says how to pre-fetch it);
* a path to a ``.pt`` file (kind ``"file"``), verified against a
  ``manifest.json`` beside it or a ``<file>.sha256`` sidecar when present.

:func:`resolve_weights` runs on the driver and is cheap (no torch import);
:func:`load_state` runs in the worker. Every file is read with
``torch.load(weights_only=True)``, so a checkpoint that carries Python code is
refused instead of executed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blinkflow.errors import BlinkflowError
from blinkflow.files import atomic_path, sha256_bytes, sha256_file, write_atomic

log = logging.getLogger(__name__)

#: the shipped weights and their manifest; tests monkeypatch this
WEIGHTS_DIR = Path(__file__).parent / "weights"
MANIFEST_NAME = "manifest.json"

_TORCHVISION_MEMBER = re.compile(r"[A-Z][A-Z0-9_]*")
#: torch.hub names files "<name>-<sha256 prefix>.<ext>"
_HUB_HASH = re.compile(r"-([a-f0-9]{8,})\.")


class WeightsError(BlinkflowError):
    """Weights that cannot be found, verified or loaded; the message names the file or source."""


@dataclass(frozen=True)
class WeightsSpec:
    """Where a stage's weights come from, resolved once on the driver."""

    source: str | None
    kind: str  # "random" | "shipped" | "file" | "torchvision"
    path: Path | None = None
    sha256: str | None = None
    classes: list[str] | None = None
    torchvision_enum: str | None = None  # "Enum.MEMBER"
    metrics: dict | None = None
    #: the file's verified contents once read (``with_checkpoint_classes``): loaded from, not read again
    contents: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        """How messages name these weights: the file when there is one, else the source."""
        return str(self.path) if self.path is not None else repr(self.source)


# --------------------------------------------------------------------------- resolve


def resolve_weights(
    source: str | None, *, stage: str, model_name: str, base_dir: Path | None = None
) -> WeightsSpec:
    """Turn a config's ``weights:`` value into a :class:`WeightsSpec` (no torch import)."""
    if source is None:
        return WeightsSpec(source=None, kind="random")
    if source == "shipped":
        return _resolve_shipped(stage, model_name)
    if _TORCHVISION_MEMBER.fullmatch(source):
        return _resolve_torchvision(source, stage=stage, model_name=model_name)
    return _resolve_file(source, stage=stage, base_dir=base_dir)


def _resolve_shipped(stage: str, model_name: str) -> WeightsSpec:
    manifest = read_manifest(WEIGHTS_DIR)
    for entry in manifest["weights"]:
        if entry.get("stage") == stage and entry.get("model") == model_name:
            return WeightsSpec(
                source="shipped",
                kind="shipped",
                path=WEIGHTS_DIR / entry["file"],
                sha256=entry.get("sha256"),
                classes=entry.get("classes"),
                metrics=entry.get("metrics"),
            )
    shipped = sorted(f"{e.get('stage')}/{e.get('model')}" for e in manifest["weights"])
    raise WeightsError(
        f"stages.{stage}.weights: no shipped weights for model {model_name}; shipped: {shipped}; "
        f"train them with `blinkflow train {stage}` or set weights: null"
    )


def _resolve_file(source: str, *, stage: str, base_dir: Path | None) -> WeightsSpec:
    path = _locate(source, base_dir)
    if not path.is_file():
        raise WeightsError(f"stages.{stage}.weights: file {str(path)!r} does not exist")
    entry = manifest_entry_for(path)
    sha256 = entry.get("sha256") if entry else None
    if sha256 is None:
        sha256 = _read_sidecar(path)
    return WeightsSpec(
        source=source,
        kind="file",
        path=path,
        sha256=sha256,
        classes=entry.get("classes") if entry else None,
        metrics=entry.get("metrics") if entry else None,
    )


def _locate(source: str, base_dir: Path | None) -> Path:
    """Relative paths are tried against the working directory, then against ``base_dir``."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path
    beside = Path(base_dir) / path
    return beside if beside.exists() else path


def manifest_entry_for(path: Path) -> dict | None:
    """The manifest entry of a weights file, from the manifest beside it (None: none lists it)."""
    manifest_path = path.parent / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    for entry in read_manifest(path.parent, foreign_ok=True)["weights"]:
        if entry.get("file") == path.name:
            return entry
    return None


def _read_sidecar(path: Path) -> str | None:
    """A ``<file>.sha256`` holds the hex digest, optionally followed by the name (sha256sum style)."""
    sidecar = path.with_name(path.name + ".sha256")
    if not sidecar.is_file():
        return None
    try:
        tokens = sidecar.read_bytes().decode("ascii").split()
    except UnicodeDecodeError:
        tokens = []
    if not tokens or not re.fullmatch(r"[0-9a-fA-F]{64}", tokens[0]):
        raise WeightsError(f"{sidecar}: expected a 64-digit sha256 hex digest")
    return tokens[0].lower()


def _resolve_torchvision(member_name: str, *, stage: str, model_name: str) -> WeightsSpec:
    enum_name = _torchvision_enum_name(model_name, stage)
    member = _torchvision_member(model_name, enum_name, member_name, stage)
    path = _hub_checkpoints_dir() / os.path.basename(member.url)
    qualified = f"{enum_name}.{member.name}"
    if not path.is_file():
        raise WeightsError(
            f"stages.{stage}.weights: torchvision weights {qualified} are not in the local cache ({path}); "
            f"the pipeline does not download. On a machine with internet run "
            f"`python -c \"import torchvision; torchvision.models.get_weight('{qualified}').get_state_dict()\"` "
            f"then copy ~/.cache/torch/hub/checkpoints/{path.name} to {path.parent}/"
        )
    categories = member.meta.get("categories")
    return WeightsSpec(
        source=member_name,
        kind="torchvision",
        path=path,
        # torchvision keeps '__background__'/'N/A' entries so label ids match the checkpoint
        classes=list(categories) if categories is not None else None,
        torchvision_enum=qualified,
        metrics=dict(member.meta.get("_metrics", {})) or None,
    )


def _torchvision_enum_name(model_name: str, stage: str) -> str:
    from blinkflow.models.registry import get_model_entry

    enum_name = get_model_entry(model_name).torchvision_weights
    if enum_name is None:
        raise WeightsError(
            f"stages.{stage}.weights: model {model_name} is not a torchvision model, so it has no "
            f"torchvision weights; use 'shipped', a .pt file or null"
        )
    return enum_name


def _torchvision_member(model_name: str, enum_name: str, member_name: str, stage: str) -> Any:
    """torchvision's weights enum of the builder named like our backend, and its member."""
    from torchvision.models import get_model_weights

    enum_cls = get_model_weights(model_name)
    try:
        return getattr(enum_cls, member_name)
    except AttributeError:
        valid = list(dict.fromkeys(["DEFAULT", *enum_cls.__members__]))  # DEFAULT is also an alias member
        raise WeightsError(
            f"stages.{stage}.weights: {enum_name} has no member {member_name!r}; valid: {valid}"
        ) from None


def _hub_checkpoints_dir() -> Path:
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


# --------------------------------------------------------------------------- load


def load_shipped(stage: str, model_name: str) -> tuple[Any, WeightsSpec]:
    """A backend built for its shipped weights' classes, with them loaded (sha256-checked), in eval mode."""
    from blinkflow.models.registry import build_model

    spec = resolve_weights("shipped", stage=stage, model_name=model_name)
    kwargs = {"num_classes": len(spec.classes)} if spec.classes else {}
    model = build_model(model_name, task=stage, **kwargs)
    load_state(model, spec)
    return model.eval(), spec


def load_state(model: Any, spec: WeightsSpec, *, fresh_head: bool = False) -> list[str]:
    """Load verified weights into ``model`` in place; a no-op for random initialisation.

    ``fresh_head`` (fine-tuning on other classes): tensors whose shape differs from the model's (the
    class-dependent layers) keep their fresh initialisation instead of being an error; their names
    are returned.
    """
    if spec.kind == "random":
        return []
    state = _extract_state_dict(spec.contents if spec.contents is not None else read_verified(spec), spec)
    state = _strip_prefix(state, "module.")  # DistributedDataParallel checkpoints
    state = _align_to_model(state, model)
    state = _reconcile_torchvision_extras(state, model)
    fresh = _fresh_head(model, state) if fresh_head else []
    state.update({key: model.state_dict()[key] for key in fresh})
    _check_compatible(model, state, spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # what the checks above did not foresee: still the file's fault, in one line
        raise WeightsError(f"{spec.label}: the weights do not load into this model ({_torch_reason(exc)})") from None
    log.info("loaded %s weights from %s%s", spec.kind, spec.path, f"; new class head: {fresh}" if fresh else "")
    return fresh


def read_verified(spec: WeightsSpec) -> Any:
    """The file's contents, loaded only after its sha256 pin (when it has one) holds. The file is read once:
    the bytes checked are the bytes loaded (a file replaced between a check and a second read would load
    unchecked)."""
    if spec.path is None or not spec.path.is_file():
        raise WeightsError(f"{spec.label}: weights file does not exist")
    try:
        data = spec.path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"{spec.path}: cannot read the weights file ({exc.strerror or exc})") from None
    _verify_checksum(spec, data)
    return _safe_torch_load(spec.path, data)


def with_checkpoint_classes(spec: WeightsSpec, stage: str) -> WeightsSpec:
    """``spec`` with the class list its file records when it is one of our training checkpoints and no manifest
    names its classes (a fine-tuned model's own classes, not a stage's defaults). A checkpoint trained for
    another stage is refused. Read, like every weights file, only once its sha256 pin holds."""
    if spec.kind != "file" or spec.classes:
        return spec
    obj = read_verified(spec)
    spec = dataclasses.replace(spec, contents=obj)  # loaded from these bytes: the file is read once
    if not (isinstance(obj, dict) and isinstance(obj.get("model"), dict)):
        return spec  # a plain state dict: no record of its classes
    task = (obj.get("config") or {}).get("task") if isinstance(obj.get("config"), dict) else None
    if task and task != stage:
        raise WeightsError(f"stages.{stage}.weights: {spec.label} is a checkpoint of `blinkflow train {task}`, "
                           f"not of the {stage} stage; use it in stages.{task}, or weights trained for {stage}")
    classes = obj.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(name, str) for name in classes):
        return dataclasses.replace(spec, classes=list(classes))
    return spec


def _fresh_head(model: Any, state: dict) -> list[str]:
    """The class-dependent tensors: those differing from the model's in their first (class) dimension alone. A
    tensor differing otherwise is another net (other widths), which _check_compatible refuses: every such tensor
    started fresh, a fine-tune trained from scratch while it recorded the weights it came from."""
    expected = model.state_dict()
    fresh = []
    for key, value in state.items():
        have, want = tuple(getattr(value, "shape", ())), tuple(expected[key].shape) if key in expected else None
        if want is not None and have != want and len(have) == len(want) >= 1 and have[1:] == want[1:]:
            fresh.append(key)
    return fresh


def _verify_checksum(spec: WeightsSpec, data: bytes) -> None:
    assert spec.path is not None
    if spec.sha256 is not None:
        actual = sha256_bytes(data)
        if actual != spec.sha256.lower():
            raise WeightsError(
                f"{spec.path}: sha256 mismatch (expected {spec.sha256}, got {actual}); "
                f"the file is corrupt or was replaced — re-download or retrain it"
            )
        return
    match = _HUB_HASH.search(spec.path.name) if spec.kind == "torchvision" else None
    if match:  # torch.hub's own convention: the name carries a prefix of the digest
        actual = sha256_bytes(data)
        if not actual.startswith(match.group(1)):
            raise WeightsError(
                f"{spec.path}: sha256 mismatch (expected prefix {match.group(1)}, got {actual}); "
                f"the file is corrupt or was replaced — re-download it"
            )


def _safe_torch_load(path: Path, data: bytes) -> Any:
    """``data`` (the contents of ``path``, named in messages) loaded with ``weights_only``, after the checks."""
    import io
    import warnings

    import torch

    _refuse_compressed(path, data)
    _refuse_code_in_a_bare_pickle(path, data)
    try:
        with warnings.catch_warnings():  # torch's own warnings (a sparse tensor's checks) came before the one line
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - text files, truncated zips and pickles all fail in their own way
        _refuse_code(path, data)
        raise WeightsError(
            f"{path}: cannot read {path.name}: not a valid torch weights file ({_torch_reason(exc)}); "
            f"re-export it with torch.save(model.state_dict(), path)"
        ) from None


def _refuse_code_in_a_bare_pickle(path: Path, data: bytes) -> None:
    """A bare pickle of protocol 3 or later (torch.save writes a zip, or protocol 2 in its legacy format) is
    scanned for code before torch sees it: torch would print its own warning about the protocol first."""
    if len(data) >= 2 and data[0] == 0x80 and data[1] >= 3:
        _refuse_code(path, data)


def _refuse_code(path: Path, data: bytes) -> None:
    """The file's refusal in one line when it references globals outside ``weights_only``'s allowlist."""
    code = _unsafe_globals(data)
    if code:
        raise WeightsError(
            f"{path}: refusing to load {path.name}: it contains Python code (not a plain state dict; it "
            f"references {', '.join(code[:3])}); re-export it with torch.save(model.state_dict(), path)") from None


def _refuse_compressed(path: Path, data: bytes) -> None:
    """torch.save stores its records uncompressed; a compressed one inflates to whatever size it declares (a
    2 MB file to 2.6 GB) inside torch.load, before any check could look at it."""
    import io
    import zipfile

    try:
        if not zipfile.is_zipfile(io.BytesIO(data)):
            return  # a legacy or foreign file: torch.load's own checks refuse it
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            packed = [info.filename for info in archive.infolist() if info.compress_type != zipfile.ZIP_STORED]
    except (OSError, zipfile.BadZipFile):
        return  # unreadable: torch.load says how, in the usual one line
    if packed:
        raise WeightsError(f"{path}: refusing to load {path.name}: its records are compressed ({packed[0]}), which "
                           "torch.save never does and which could inflate to any size; re-export it with "
                           "torch.save(model.state_dict(), path)")


def _torch_reason(exc: Exception) -> str:
    """The informative line of torch's multi-line loading error, shortened."""
    if isinstance(exc, KeyError) or str(exc).strip("'\" ").isdigit():  # torch's pickle reader on a byte it
        return "its bytes are not a pickle torch.save writes"              # does not know: KeyError('101')
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "Re-running")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(boilerplate)]
    reason = (useful or lines or [type(exc).__name__])[-1]
    return reason if len(reason) <= 120 else reason[:117] + "..."


#: pickles at the head of torch's legacy (non-zip) format: magic number, protocol, system info, the object, its keys
LEGACY_PICKLES = 5


def _unsafe_globals(data: bytes) -> list[str]:
    """The globals outside ``weights_only``'s allowlist that the file references, found by reading opcodes
    only: torch lists them for its own zip checkpoints; a bare pickle (which torch's unpickler may reject
    before reaching a global, e.g. protocol 5) is scanned here."""
    import io
    import pickletools
    import zipfile

    import torch

    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)))
        except Exception:  # noqa: BLE001 - a damaged zip: reported as unreadable
            return []
    stream, names = io.BytesIO(data), []
    for _ in range(LEGACY_PICKLES):  # torch's legacy format is a few pickles in a row (magic, ..., the object)
        try:
            names += _pickle_globals(pickletools.genops(stream))
        except Exception:  # noqa: BLE001 - no further pickle (the raw storages follow), or not a pickle at all
            break
    return [name for name in names if not _allowed_global(name)]


def _pickle_globals(ops: Any) -> list[str]:
    """``module.name`` of every GLOBAL / STACK_GLOBAL / INST, tracking the memo for protocol 4."""
    names: list[str] = []
    recent: list[Any] = []  # values pushed lately; only strings matter for STACK_GLOBAL
    memo: dict[int, Any] = {}
    for opcode, arg, _ in ops:
        if opcode.name in ("GLOBAL", "INST"):
            names.append(".".join(str(arg).split(" ", 1)))
        elif opcode.name == "STACK_GLOBAL" and len(recent) >= 2:
            names.append(f"{recent[-2]}.{recent[-1]}")
        elif opcode.name == "MEMOIZE" and recent:
            memo[len(memo)] = recent[-1]
        elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and recent:
            memo[int(arg)] = recent[-1]
        elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
            recent.append(memo.get(int(arg)))
        elif opcode.name not in ("FRAME", "PROTO", "MEMOIZE"):
            recent.append(arg if isinstance(arg, str) else None)
        del recent[:-2]
    return names


def _allowed_global(name: str) -> bool:
    """What ``weights_only`` accepts: tensor rebuilders, storages, dtypes, a few containers."""
    name = name.replace("__builtin__.", "builtins.")  # protocol 2 spells builtins the Python 2 way
    if name.startswith("torch._utils._rebuild") or name == "collections.OrderedDict":
        return True
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        return name in _get_allowed_globals()
    except Exception:  # noqa: BLE001 - a private torch API; without it trust only tensor storage types
        return name.startswith("torch.") and name.endswith("Storage")


def _extract_state_dict(obj: Any, spec: WeightsSpec) -> dict:
    """Accept a plain state dict or our training checkpoint ``{"model": state_dict, ...}``."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        raise WeightsError(f"{spec.label}: not a state dict (got {type(obj).__name__})")
    return obj


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def _align_to_model(state: dict, model: Any) -> dict:
    """Add the model's wrapper prefix (e.g. ``net.``) when a bare checkpoint fits a wrapped model."""
    model_keys = set(model.state_dict())
    if model_keys & set(state):
        return state
    for key in sorted(model_keys):
        prefix = key.rsplit(".", 1)[0].split(".")[0] + "."
        if {prefix + k for k in state} == model_keys:
            return {prefix + k: v for k, v in state.items()}
    return state


def _reconcile_torchvision_extras(state: dict, model: Any) -> dict:
    """Bridge two harmless differences between torchvision's checkpoints and our builders.

    Pretrained torchvision detectors use FrozenBatchNorm, whose checkpoints have
    no ``num_batches_tracked`` buffers (our BatchNorm keeps its own); and the
    segmentation checkpoints carry ``aux_classifier`` weights for a training-only
    head that our builders leave out.
    """
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not (k.startswith("aux_classifier.") and k not in expected)}
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    return state


def _check_compatible(model: Any, state: dict, spec: WeightsSpec) -> None:
    _check_plain_tensors(state, spec)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{spec.label}: the weights do not fit this model architecture "
            f"(missing keys: {_first(missing)}; unexpected keys: {_first(unexpected)})"
        )
    mismatched = [k for k in expected if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)]
    if not mismatched:
        return
    key = mismatched[-1]  # the head is last; its mismatch is the informative one
    got, want = tuple(getattr(state[key], "shape", ())), tuple(expected[key].shape)
    has_classes = getattr(model, "embedding_dim", None) is None  # a head of classes, not an embedding
    if got[1:] == want[1:] and len(got) >= 1 and has_classes:
        n_file, n_model = _class_counts(got[0], want[0], spec, model)
        raise WeightsError(
            f"{spec.label}: the weights have {n_file} classes but the model was built for {n_model}; "
            f"give options.classes {n_file - n_model:+d} names (the list holds the background too, first) "
            "or use matching weights"
        )
    raise WeightsError(f"{spec.label}: shape mismatch for {key}: weights {got}, model {want}; the weights were made "
                       "with other model settings (model_args): use theirs or weights made with these")


def _check_plain_tensors(state: dict, spec: WeightsSpec) -> None:
    """Every value a dense real tensor: an int, a sparse, quantized, nested or complex one fails inside
    load_state_dict with a traceback, or (complex) loads with its imaginary part dropped."""
    import torch

    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            kind = type(value).__name__
        elif value.layout != torch.strided or value.is_nested:
            kind = "sparse or nested tensor"
        elif value.is_meta:
            kind = "meta tensor (a shape without values)"
        elif value.is_quantized or value.is_complex():
            kind = f"{value.dtype} tensor"
        else:
            continue
        raise WeightsError(f"{spec.label}: {key} is a {kind}, not a plain dense tensor of numbers; re-export the "
                           "weights with torch.save(model.state_dict(), path)")


def _class_counts(rows_file: int, rows_model: int, spec: WeightsSpec, model: Any) -> tuple[int, int]:
    """Class counts from head rows; detection heads have anchors x classes rows, so divide out."""
    if spec.classes and rows_file % len(spec.classes) == 0:
        per_class = rows_file // len(spec.classes)
        if rows_model % per_class == 0:
            return len(spec.classes), rows_model // per_class
    n_model = getattr(model, "num_classes", None)
    if isinstance(n_model, int) and n_model > 0 and rows_model % n_model == 0:
        per_class = rows_model // n_model
        if rows_file % per_class == 0:
            return rows_file // per_class, n_model
    return rows_file, rows_model


def _first(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# --------------------------------------------------------------------------- manifest


def read_manifest(folder: Path | None = None, foreign_ok: bool = False) -> dict:
    """The manifest of a weights folder as ``{"weights": [entry, ...]}``; empty when absent, or (``foreign_ok``:
    a .pt beside it) when it is another tool's manifest.json, one without a 'weights' list (blinkflow label's)."""
    path = Path(folder if folder is not None else WEIGHTS_DIR) / MANIFEST_NAME
    if not path.is_file():
        return {"weights": []}
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: invalid JSON ({exc})") from None
    if isinstance(data, list):  # tolerate a bare list of entries
        data = {"weights": data}
    if not isinstance(data, dict) or not isinstance(data.get("weights"), list):
        if foreign_ok:
            log.debug("%s: no 'weights' list, so not a weights manifest; ignored", path)
            return {"weights": []}
        raise WeightsError(f"{path}: expected an object with a 'weights' list")
    for number, entry in enumerate(data["weights"]):
        problem = _entry_problem(entry)
        if problem:
            raise WeightsError(f"{path}: weights.{number}: {problem}; fix the entry or remove the manifest")
    return data


#: what each manifest entry field must be when present (the loader trusts them)
_ENTRY_TYPES = {"file": str, "sha256": str, "classes": list, "metrics": dict, "stage": str, "model": str}


def _entry_problem(entry: Any) -> str | None:
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    for key, kind in _ENTRY_TYPES.items():
        if key in entry and entry[key] is not None and not isinstance(entry[key], kind):
            return f"{key} must be a {kind.__name__}, got {type(entry[key]).__name__}"
    if isinstance(entry.get("classes"), list) and not all(isinstance(c, str) for c in entry["classes"]):
        return "classes must be a list of names"
    return None


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Pretty-printed, key-sorted and entry-sorted, so diffs of the manifest stay small."""
    entries = sorted(manifest["weights"], key=lambda e: (e.get("stage", ""), e.get("model", "")))
    path = Path(folder) / MANIFEST_NAME
    return write_atomic(path, json.dumps({**manifest, "weights": entries}, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def manifest_lock(folder: Path):
    """Hold an exclusive lock on the folder's manifest for a read-modify-write."""
    import fcntl

    with open(Path(folder) / ".manifest.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_metrics(stage: str, model_name: str, metrics: dict, folder: Path | None = None) -> dict:
    """Replace the held-out metrics of a shipped entry (keeping how it was trained); return the entry.

    Used after training on another machine: the manifest must hold the numbers
    that re-evaluating the file here gives.
    """
    folder = Path(folder) if folder is not None else WEIGHTS_DIR
    with manifest_lock(folder):
        manifest = read_manifest(folder)
        matches = [e for e in manifest["weights"] if (e.get("stage"), e.get("model")) == (stage, model_name)]
        if not matches:
            raise WeightsError(f"{folder / MANIFEST_NAME}: no {stage} entry for {model_name}; ship the weights first")
        # how the file was made (fine-tuned from what, too) does not change when it is re-evaluated here
        how_made = ("train_seconds", "epochs", "steps", "trained_on", "initialised_from")
        kept = {k: v for k, v in matches[0]["metrics"].items() if k in how_made}
        matches[0]["metrics"] = {**metrics, **kept}
        write_manifest(folder, manifest)
    return matches[0]


def save_shipped(
    model: Any,
    *,
    stage: str,
    model_name: str,
    classes: list[str] | None,
    config: dict,
    metrics: dict,
    out_dir: Path | None = None,
) -> Path:
    """Write ``<stage>-<model>.pt`` (a plain state dict) and record it in the manifest.

    Replacing converted third-party weights (an entry with a ``source``, e.g. fine-tuned with ``init:
    shipped``) keeps their provenance: the new entry's ``derived_from`` is the original's source and its
    ``licence`` still applies. A licence is never dropped silently, so this holds for any run over them.
    """
    import torch

    folder = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stage}-{model_name}.pt"
    state = {k: v.detach().cpu().contiguous() for k, v in _strip_prefix(model.state_dict(), "module.").items()}
    with atomic_path(path) as temp:  # a run killed mid-write leaves the shipped file its manifest pins
        torch.save(state, temp)
        digest, size = sha256_file(temp), temp.stat().st_size
    entry = {
        "stage": stage,
        "model": model_name,
        "file": path.name,
        "sha256": digest,
        "size": size,
        "classes": list(classes) if classes is not None else None,
        "config": config,
        "metrics": metrics,
        "created": _dt.date.today().isoformat(),
    }
    with manifest_lock(folder):  # runs of other stages may ship at the same moment
        manifest = read_manifest(folder)
        replaced = [e for e in manifest["weights"] if (e.get("stage"), e.get("model")) == (stage, model_name)]
        others = [e for e in manifest["weights"] if (e.get("stage"), e.get("model")) != (stage, model_name)]
        entry.update(_provenance(replaced[0]) if replaced else {})
        write_manifest(folder, {**manifest, "weights": [*others, entry]})
    log.info("saved %s weights for %s to %s", stage, model_name, path)
    return path


def _provenance(replaced: dict) -> dict:
    """``derived_from`` and ``licence`` of the entry a new file replaces: its source (or, when it was itself
    derived, what it was derived from); none for self-trained weights."""
    origin = replaced.get("source") or replaced.get("derived_from")
    if not isinstance(origin, dict):
        return {}
    licence = replaced.get("licence") or origin.get("licence")
    return {"derived_from": origin, **({"licence": licence} if licence else {})}
