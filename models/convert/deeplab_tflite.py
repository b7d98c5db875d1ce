"""DeepLab v3 MobileNetV2 (PASCAL VOC) from the uint8 TFLite file to ``deeplabv3_mobilenet_v2``.

The TFLite graph (``MLIR Converted``, 72 ops) holds 55 convolutions: the
MobileNetV2 trunk (``MobilenetV2/Conv``, ``MobilenetV2/expanded_conv[_N]/
{expand,depthwise,project}``) and the head (``aspp0``, ``image_pooling``,
``concat_projection``, ``logits/semantic``), BatchNorm folded into every conv.
Each conv's weight and bias are dequantised (``scale * (q - zero_point)``, per
channel where the file quantises per channel; the int32 biases carry their own
scale), transposed from TFLite's layouts (OHWI for convs, 1HWO for depthwise
convs) to torch's OIHW, and placed by the TF layer name of the weight tensor
(the text before ``/Conv2D_Fold``, ``/depthwise_Fold`` or ``/Conv2D``). Every
conv of the backend must get exactly one tensor pair of its shape, stride and
dilation, and every conv of the graph must have a place; anything else is
refused. The graph ends in an argmax over the upsampled logits; the backend
returns the logits themselves.

The file is read with the TFLite flatbuffer schema that ``ai-edge-litert``
ships (imported on use).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blinkflow.models.classes import voc_classes
from blinkflow.models.weights import WeightsError

CLASSES = voc_classes()
MODEL_ARGS: dict[str, Any] = {}

_HEAD = {
    "aspp0": "aspp0.0",
    "image_pooling": "image_pooling.0",
    "concat_projection": "concat_projection.0",
    "logits/semantic": "logits",
}
_BLOCK = re.compile(r"MobilenetV2/expanded_conv(?:_(\d+))?/(expand|depthwise|project)")
#: numpy dtypes of the TFLite tensor types a conv's weight or bias may have
_DTYPES = {"FLOAT32": np.float32, "INT32": np.int32, "UINT8": np.uint8, "INT8": np.int8}
_SAME = 0  # tflite Padding.SAME


@dataclass(frozen=True)
class GraphConv:
    """One CONV_2D / DEPTHWISE_CONV_2D of the graph, its constants dequantised to float32."""

    scope: str
    depthwise: bool
    weight: np.ndarray  # torch layout (O, I/groups, H, W)
    bias: np.ndarray
    stride: tuple[int, int]
    dilation: tuple[int, int]
    same_padding: bool


def convert(source: Path, data: bytes | None = None) -> dict:
    """The graph's conv weights and biases under the ``deeplabv3_mobilenet_v2`` backend's names."""
    import torch

    from blinkflow.models.deeplab_mnv2 import DeepLabV3MobileNetV2

    convs = {name: module for name, module in DeepLabV3MobileNetV2(len(CLASSES)).named_modules()
             if isinstance(module, torch.nn.Conv2d)}
    state: dict[str, torch.Tensor] = {}
    for conv in read_convs(source, data):
        name = torch_name(source, conv.scope)
        if name not in convs:
            raise WeightsError(f"{source}: layer {conv.scope} maps to {name}, which the backend does not have")
        if f"{name}.weight" in state:
            raise WeightsError(f"{source}: layer {conv.scope} appears twice; not the expected DeepLab graph")
        _check_fits(source, conv, name, convs[name])
        state[f"{name}.weight"] = torch.from_numpy(conv.weight.copy())
        state[f"{name}.bias"] = torch.from_numpy(conv.bias.copy())
    missing = sorted(name for name in convs if f"{name}.weight" not in state)
    if missing:
        raise WeightsError(f"{source}: no tensors for {len(missing)} backend convs ({', '.join(missing[:3])}, ...)")
    return state


def torch_name(source: Path, scope: str) -> str:
    """The backend conv of a TF layer: ``MobilenetV2/expanded_conv_3/expand`` -> ``backbone.4.conv.0.0``."""
    if scope in _HEAD:
        return _HEAD[scope]
    if scope == "MobilenetV2/Conv":
        return "backbone.0.0"
    match = _BLOCK.fullmatch(scope)
    if match is None:
        raise WeightsError(f"{source}: unexpected layer {scope!r}; not the DeepLab v3 MobileNetV2 graph")
    block, part = int(match[1] or 0) + 1, match[2]
    # the first block has no expansion conv, so its depthwise and projection come one place earlier
    places = {"depthwise": "conv.0.0", "project": "conv.1"} if block == 1 else \
        {"expand": "conv.0.0", "depthwise": "conv.1.0", "project": "conv.2"}
    if part not in places:
        raise WeightsError(f"{source}: unexpected layer {scope!r} (the first block has no expansion)")
    return f"backbone.{block}.{places[part]}"


def _check_fits(source: Path, conv: GraphConv, name: str, module: Any) -> None:
    found = (tuple(conv.weight.shape), tuple(conv.bias.shape), conv.stride, conv.dilation, conv.depthwise)
    wanted = (tuple(module.weight.shape), (module.out_channels,), tuple(module.stride), tuple(module.dilation),
              module.groups > 1)
    if found != wanted or not conv.same_padding:
        raise WeightsError(
            f"{source}: layer {conv.scope} (weight, bias, stride, dilation, depthwise = {found}, SAME padding "
            f"{conv.same_padding}) does not fit {name} {wanted}"
        )


# ---------------------------------------------------------------------------- reading the flatbuffer


def read_convs(source: Path, data: bytes | None = None) -> list[GraphConv]:
    """Every convolution of the file's (single) subgraph (``data``: its bytes when already read), in graph
    order; align_corners resizes checked."""
    schema = _schema()
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(
            data if data is not None else Path(source).read_bytes(), 0))
        graph = model.subgraphs[0]
        ops = [(_op_name(schema, model, op), op) for op in graph.operators]
        convs = [_graph_conv(schema, model, graph, op, name == "DEPTHWISE_CONV_2D")
                 for name, op in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D")]
        resizes = [op for name, op in ops if name == "RESIZE_BILINEAR"]
    except WeightsError as exc:
        raise WeightsError(f"{source}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any malformed flatbuffer is the same user-facing error
        raise WeightsError(f"{source}: not a readable TFLite model ({type(exc).__name__}: {exc})") from None
    if not resizes or not all(op.builtinOptions.alignCorners for op in resizes):
        raise WeightsError(f"{source}: expected bilinear resizes with align_corners=True, as in TF1 DeepLab")
    return convs


def _schema() -> Any:
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise WeightsError("reading a .tflite file needs the TFLite schema: pip install ai-edge-litert") from None
    return schema_py_generated


def _op_name(schema: Any, model: Any, op: Any) -> str:
    code = model.operatorCodes[op.opcodeIndex]
    number = max(code.builtinCode, code.deprecatedBuiltinCode)  # small codes live in the deprecated field
    return next((k for k, v in vars(schema.BuiltinOperator).items() if v == number and not k.startswith("_")), "?")


def _graph_conv(schema: Any, model: Any, graph: Any, op: Any, depthwise: bool) -> GraphConv:
    weight_tensor = graph.tensors[op.inputs[1]]
    if len(op.inputs) < 3 or op.inputs[2] < 0:
        raise WeightsError(f"layer {_scope(weight_tensor)} has no bias")
    weight = _dequantised(schema, model, weight_tensor)
    # TFLite keeps OHWI for convs and 1HWO for depthwise convs; torch wants OIHW and (O, 1, H, W)
    weight = weight.transpose(3, 0, 1, 2) if depthwise else weight.transpose(0, 3, 1, 2)
    options = op.builtinOptions
    return GraphConv(
        scope=_scope(weight_tensor),
        depthwise=depthwise,
        weight=np.ascontiguousarray(weight),
        bias=_dequantised(schema, model, graph.tensors[op.inputs[2]]),
        stride=(options.strideH, options.strideW),
        dilation=(options.dilationHFactor, options.dilationWFactor),
        same_padding=options.padding == _SAME,
    )


def _scope(tensor: Any) -> str:
    """``MobilenetV2/Conv/Conv2D_Fold;MobilenetV2/Conv/weights_quant/...`` -> ``MobilenetV2/Conv``."""
    return tensor.name.decode().split(";")[0].rsplit("/", 1)[0]


def _dequantised(schema: Any, model: Any, tensor: Any) -> np.ndarray:
    """A constant tensor as float32: ``scale * (q - zero_point)``, per channel along the quantised axis."""
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    dtype = _DTYPES.get(names.get(tensor.type))
    data = model.buffers[tensor.buffer].data
    if dtype is None or data is None:
        raise WeightsError(f"tensor {tensor.name.decode()!r} is not a constant of a supported type")
    values = np.frombuffer(np.asarray(data, dtype=np.uint8).tobytes(), dtype=dtype).reshape(tensor.shape)
    quant = tensor.quantization
    if quant is None or quant.scale is None or len(quant.scale) == 0:
        return values.astype(np.float32)
    shape = [1] * values.ndim
    if len(quant.scale) > 1:  # per channel
        shape[quant.quantizedDimension] = -1
    scale = np.asarray(quant.scale, np.float64).reshape(shape)
    zero_point = np.asarray(quant.zeroPoint, np.float64).reshape(shape)
    return (scale * (values.astype(np.float64) - zero_point)).astype(np.float32)


# ---------------------------------------------------------------------------- fp16 storage


def storage_check(model32: Any, model16: Any) -> dict:
    """Class maps on a seeded textured image: fp16 storage is ok when >= 99.9% of pixels keep their class."""
    image = probe_image()
    logits32 = model32(image)["out"]
    logits16 = model16(image)["out"]
    agreement = float((logits32.argmax(1) == logits16.argmax(1)).float().mean())
    change = float((logits32 - logits16).abs().max())
    return {"ok": agreement >= 0.999, "pixel_agreement": round(agreement, 6), "max_logit_change": round(change, 4),
            "probe": "seeded texture, 257x320"}


def probe_image() -> Any:
    """A smooth random colour texture (odd height, even width: both TF ``SAME`` paddings)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 24, 30, generator=generator)
    return F.interpolate(noise, size=(257, 320), mode="bicubic", align_corners=False).clamp(0, 1)
