"""YOLOX-nano from Megvii's ONNX export to the ``yolox_nano`` backend (:mod:`models.yolox`).

The export folded every BatchNorm into its conv, so the file holds one weight and
one bias per conv, and only the head's prediction convs kept their names
(``head.cls_preds.0.weight``); the others are ``onnx::Conv_NNNN``. The exporter
writes the convs in the order the forward ran them, so the k-th Conv node is the
k-th name of :func:`conv_order`, written out from YOLOX's forward. Each pairing is
checked against the backend: weight and bias shapes, groups, stride and padding,
and the named head tensors against their names; any difference refuses the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blinkflow.models.classes import coco_categories
from blinkflow.models.weights import WeightsError

CLASSES = coco_categories()
MODEL_ARGS: dict[str, Any] = {}

#: fp16 storage must not move the raw head outputs more than the onnxruntime equivalence test allows
RAW_TOLERANCE = 1e-3
SCORE_TOLERANCE = 1e-3
BOX_TOLERANCE_PX = 0.5


def conv_order() -> list[str]:
    """The backend's conv modules in YOLOX's forward order (the order of the export's Conv nodes)."""
    darknet = "backbone.backbone"
    names = [f"{darknet}.stem.conv.conv"]
    names += _dw(f"{darknet}.dark2.0") + _csp(f"{darknet}.dark2.1", 1)
    names += _dw(f"{darknet}.dark3.0") + _csp(f"{darknet}.dark3.1", 3)
    names += _dw(f"{darknet}.dark4.0") + _csp(f"{darknet}.dark4.1", 3)
    names += _dw(f"{darknet}.dark5.0") + [f"{darknet}.dark5.1.conv1.conv", f"{darknet}.dark5.1.conv2.conv"]
    names += _csp(f"{darknet}.dark5.2", 1)
    names += ["backbone.lateral_conv0.conv"] + _csp("backbone.C3_p4", 1)
    names += ["backbone.reduce_conv1.conv"] + _csp("backbone.C3_p3", 1)
    names += _dw("backbone.bu_conv2") + _csp("backbone.C3_n3", 1)
    names += _dw("backbone.bu_conv1") + _csp("backbone.C3_n4", 1)
    for k in range(3):
        names += [f"head.stems.{k}.conv"] + _dw(f"head.cls_convs.{k}.0") + _dw(f"head.cls_convs.{k}.1")
        names += [f"head.cls_preds.{k}"] + _dw(f"head.reg_convs.{k}.0") + _dw(f"head.reg_convs.{k}.1")
        names += [f"head.reg_preds.{k}", f"head.obj_preds.{k}"]
    return names


def _dw(prefix: str) -> list[str]:
    return [f"{prefix}.dconv.conv", f"{prefix}.pconv.conv"]


def _csp(prefix: str, bottlenecks: int) -> list[str]:
    """CSPLayer runs conv1, conv2, then the bottlenecks on conv1's output, then conv3."""
    names = [f"{prefix}.conv1.conv", f"{prefix}.conv2.conv"]
    for i in range(bottlenecks):
        names += [f"{prefix}.m.{i}.conv1.conv", *_dw(f"{prefix}.m.{i}.conv2")]
    return names + [f"{prefix}.conv3.conv"]


STEM = "backbone.backbone.stem.conv.conv"


def convert(source: Path, data: bytes | None = None) -> dict:
    """The export's conv weights and biases under the backend's names, fp32."""
    import torch

    from blinkflow.models.yolox import PIXEL_SCALE, YOLOX

    graph = _load_graph(source, data)
    model = YOLOX(num_classes=len(CLASSES))
    convs = dict(model.named_modules())
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    order = conv_order()
    if len(nodes) != len(order):
        raise WeightsError(f"{source}: {len(nodes)} Conv nodes, YOLOX-nano has {len(order)}; not the expected export")
    tensors = _initializers(graph)
    state, used = {}, set()
    for node, name in zip(nodes, order):
        weight, bias = _conv_params(source, node, tensors, name)
        _check_conv(source, node, name, convs[name], weight, bias)
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.from_numpy(weight.copy()), torch.from_numpy(bias.copy())
        used.update(node.input[1:3])
    _check_all_used(source, tensors, used)
    # the export feeds 0..255 pixels to the stem; the backend feeds 0..1 (so fine-tuning does not see a stem
    # whose gradients are 255 times the rest's): the same function with the stem's weights scaled by 255
    state[f"{STEM}.weight"] = state[f"{STEM}.weight"] * PIXEL_SCALE
    return state


def _load_graph(source: Path, data: bytes | None) -> Any:
    import onnx

    try:
        return (onnx.load_model_from_string(data) if data is not None else onnx.load(str(source))).graph
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user-facing error
        raise WeightsError(f"{source}: not a readable ONNX model ({type(exc).__name__})") from None


def _initializers(graph: Any) -> dict[str, Any]:
    from onnx import numpy_helper

    return {init.name: numpy_helper.to_array(init) for init in graph.initializer}


def _conv_params(source: Path, node: Any, tensors: dict, name: str) -> tuple[Any, Any]:
    import numpy as np

    if len(node.input) != 3 or node.input[1] not in tensors or node.input[2] not in tensors:
        raise WeightsError(f"{source}: Conv {node.name} ({name}) lacks a stored weight or bias; BN not folded?")
    weight, bias = tensors[node.input[1]], tensors[node.input[2]]
    if weight.dtype != np.float32 or bias.dtype != np.float32:
        raise WeightsError(f"{source}: Conv {node.name} ({name}) is {weight.dtype}, expected float32")
    return weight, bias


def _check_conv(source: Path, node: Any, name: str, conv: Any, weight: Any, bias: Any) -> None:
    """Refuse a pairing whose shapes, groups, stride, padding or (head) name differ from the backend's."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    found = _describe(weight.shape, bias.shape, attrs.get("group", 1), attrs.get("strides", (1, 1)),
                      attrs.get("pads", (0, 0, 0, 0)))
    wanted = _describe(conv.weight.shape, conv.bias.shape, conv.groups, conv.stride, conv.padding * 2)
    if found != wanted:
        raise WeightsError(f"{source}: Conv {node.name} has {found}; {name} needs {wanted}; not YOLOX-nano's layout")
    stored = node.input[1]
    if not stored.startswith("onnx::") and stored != f"{name}.weight":
        raise WeightsError(f"{source}: Conv {node.name} holds {stored}, expected {name}.weight; convs out of order")


def _describe(weight: Any, bias: Any, groups: int, stride: Any, padding: Any) -> str:
    return (f"weight {tuple(weight)}, bias {tuple(bias)}, groups {groups}, stride {tuple(stride)}, "
            f"padding {tuple(padding)}")


def _check_all_used(source: Path, tensors: dict, used: set) -> None:
    """Every weight-like initializer (rank >= 2, or named like a conv parameter) must have been converted."""
    extra = sorted(
        name for name, value in tensors.items()
        if name not in used and (value.ndim >= 2 or name.startswith(("head.", "onnx::Conv_")))
    )
    if extra:
        raise WeightsError(f"{source}: tensors YOLOX-nano has no place for: {extra[:3]} ({len(extra)} in all)")


def storage_check(model32: Any, model16: Any) -> dict:
    """Raw head outputs and decoded top boxes on a seeded textured image: fp16 storage is ok within
    1e-3 (raw outputs and scores) and 0.5 px (boxes), else the importer stores fp32."""
    images = [probe_image()]
    batch, ratios = model32.letterbox(images)
    raw32, raw16 = model32.raw(batch), model16.raw(batch)
    raw_change = float((raw32 - raw16).abs().max())
    scores32 = (raw32[0, :, 4:5] * raw32[0, :, 5:]).max(dim=1).values
    scores16 = (raw16[0, :, 4:5] * raw16[0, :, 5:]).max(dim=1).values
    top = scores32.topk(100).indices  # the same points in both: a rank change would compare different boxes
    score_change = float((scores32[top] - scores16[top]).abs().max())
    box_change = float(((model32.decode(raw32)[0, top] - model16.decode(raw16)[0, top]) / ratios[0]).abs().max())
    ok = raw_change <= RAW_TOLERANCE and score_change <= SCORE_TOLERANCE and box_change <= BOX_TOLERANCE_PX
    return {
        "ok": bool(ok), "max_raw_change": round(raw_change, 6), "max_score_change": round(score_change, 6),
        "max_box_change_px": round(box_change, 4), "probe": "seeded texture with shapes, 360x480, top 100 points",
    }


def probe_image() -> Any:
    """A deterministic RGB [0, 1] image with smooth texture and a few solid shapes, so some points score."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 24, 32, generator=generator)
    image = F.interpolate(noise, size=(360, 480), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    image[:, 60:200, 40:180] = torch.tensor([0.9, 0.2, 0.1]).view(3, 1, 1)
    image[:, 180:330, 260:440] = torch.tensor([0.1, 0.3, 0.8]).view(3, 1, 1)
    return image
