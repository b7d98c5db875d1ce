"""Draw a frame's results on its pixels with torchvision's drawing utilities.

Masks use ``draw_segmentation_masks``, boxes ``draw_bounding_boxes``, the flow
inset ``flow_to_image``; the action label and the gate's decision are drawn as
a caption box along the top edge.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blinkflow.frame import FrameResult

#: a fixed palette so a class keeps its colour across frames and runs
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


def colour(index: int) -> tuple[int, int, int]:
    return PALETTE[index % len(PALETTE)]


def draw_overlay(result: FrameResult, layers: list[str]) -> np.ndarray:
    """Return an RGB uint8 (H, W, 3) image with the requested result layers drawn."""
    import torch

    image = torch.from_numpy(np.ascontiguousarray(result.image)).permute(2, 0, 1).contiguous()
    results = result.results
    if "segment" in layers and results.get("segment"):
        image = _draw_masks(image, results["segment"])
    if "detect" in layers and results.get("detect"):
        image = _draw_boxes(image, results["detect"])
    if "flow" in layers and isinstance(results.get("flow"), dict) and results["flow"].get("flow") is not None:
        image = _draw_flow_inset(image, results["flow"]["flow"])
    image = _draw_caption(image, _caption(result, layers))
    return image.permute(1, 2, 0).numpy()


def _draw_masks(image, segment: dict[str, Any]):
    import torch
    from torchvision.utils import draw_segmentation_masks

    from blinkflow.stages.common import decode_class_map

    class_map = torch.from_numpy(decode_class_map(segment["mask"]["data"]).astype(np.int64))
    present = [int(c) for c in torch.unique(class_map).tolist() if c != 0]
    if not present or tuple(class_map.shape) != tuple(image.shape[-2:]):
        return image
    masks = torch.stack([class_map == c for c in present])
    return draw_segmentation_masks(image, masks, alpha=0.45, colors=[colour(c) for c in present])


def _draw_boxes(image, detect: dict[str, Any]):
    import torch
    from torchvision.utils import draw_bounding_boxes

    if not detect.get("boxes"):
        return image
    boxes = torch.tensor(detect["boxes"], dtype=torch.float32).reshape(-1, 4)
    labels = [f"{name} {score:.2f}" for name, score in zip(detect["classes"], detect["scores"])]
    track_ids = detect.get("track_ids") or [None] * len(labels)  # with the track stage: "#7 car 0.91"
    labels = [label if track_id is None else f"#{track_id} {label}" for label, track_id in zip(labels, track_ids)]
    colours = [colour(int(label)) for label in detect["labels"]]
    # drawn as corners, whatever order a custom backend gives them in (torchvision refuses x2 < x1 and fails the
    # whole video); a box with a NaN or infinite corner is not drawn
    boxes = torch.cat([torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])], dim=1)
    finite = torch.isfinite(boxes).all(dim=1).tolist()
    if not all(finite):
        boxes = boxes[torch.tensor(finite)]
        labels, colours = [x for x, ok in zip(labels, finite) if ok], [x for x, ok in zip(colours, finite) if ok]
    return draw_bounding_boxes(image, boxes, labels=labels, colors=colours, width=2) if len(boxes) else image


def _draw_flow_inset(image, flow: np.ndarray):
    """Paste the colour-coded flow into the top-right quarter-width corner."""
    import torch
    import torch.nn.functional as F
    from torchvision.utils import flow_to_image

    flow_image = flow_to_image(torch.from_numpy(np.asarray(flow, dtype=np.float32)))
    height, width = image.shape[-2:]
    inset_w = min(width, max(8, width // 4))  # a frame under 8 pixels wide has the inset over all of it
    inset_h = max(8, int(round(inset_w * flow_image.shape[-2] / flow_image.shape[-1])))
    inset = F.interpolate(flow_image[None].float(), size=(inset_h, inset_w), mode="nearest")[0].byte()
    out = image.clone()
    out[:, : min(inset_h, height), width - inset_w :] = inset[:, : min(inset_h, height)]
    return out


def _caption(result: FrameResult, layers: list[str]) -> str:
    parts = [f"{result.stream_id} #{result.index}"]
    if result.reuse_of is not None:
        parts.append(f"reused from #{result.reuse_of}")
    gate = result.results.get("gate") or {}
    if gate.get("decision") == "refresh":  # some stages ran, the others were carried over
        parts.append(f"{'+'.join(gate.get('stages') or [])} fresh, rest from #{gate.get('keyframe')}")
    action = result.results.get("action")
    if "action" in layers and action and action.get("top"):
        best = action["top"][0]
        parts.append(f"{best['label']} {best['score']:.2f}")
    if result.error:
        parts.append("FAILED")
    return " | ".join(parts)


def _draw_caption(image, text: str):
    import torch
    from torchvision.utils import draw_bounding_boxes

    width = image.shape[-1]
    box = torch.tensor([[0.0, 0.0, float(width - 1), 12.0]])
    return draw_bounding_boxes(image, box, labels=[text], colors=[(255, 255, 255)], fill=False, width=1)
