"""YOLOX's training loss: SimOTA assignment, IoU loss on boxes, BCE on objectness and classes.

As in YOLOX (Ge et al. 2021): candidate points for a ground-truth box are those whose
centre lies inside it or within 2.5 strides of its centre; each box takes its
``k`` cheapest candidates, ``k`` = the sum of its 10 best IoUs (at least 1), with
cost = class BCE + 3 x (-log IoU) (+ a large penalty outside both regions); a point
claimed by several boxes keeps the cheapest. Losses over the assigned points: 5 x
(1 - IoU^2), BCE of the class logit against the IoU (one-hot), BCE of objectness on
every point; divided by the number of assigned points. The L1 term YOLOX adds in its
last epochs is left out: fine-tuning here is short.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

CENTRE_RADIUS = 2.5
REG_WEIGHT = 5.0


def yolox_loss(model, images: list[Tensor], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The loss dict of ``model`` (a :class:`models.yolox.YOLOX` in train mode) on images and torchvision targets."""
    batch, ratios = model.letterbox(images)
    levels = model.head_outputs(batch)
    box_raw = torch.cat([box.flatten(2) for box, _, _ in levels], 2).permute(0, 2, 1)
    obj = torch.cat([o.flatten(2) for _, o, _ in levels], 2).permute(0, 2, 1)[..., 0]
    cls = torch.cat([c.flatten(2) for _, _, c in levels], 2).permute(0, 2, 1)
    size = tuple(batch.shape[-2:])
    grid, strides = model._grid(box_raw.shape[1], box_raw.device, box_raw.dtype, size)
    boxes = model.decode(box_raw, size)
    totals = {"loss_box": boxes.new_zeros(()), "loss_obj": boxes.new_zeros(()), "loss_cls": boxes.new_zeros(())}
    assigned = 0
    for i, target in enumerate(targets):
        gt_boxes = target["boxes"].detach().to(boxes.dtype) * ratios[i]
        gt_classes = head_classes(model, target["labels"])
        matched, gt_index = simota(boxes[i].detach(), cls[i].detach(), obj[i].detach(), gt_boxes, gt_classes,
                                   (grid + 0.5) * strides, strides[:, 0])
        obj_target = torch.zeros_like(obj[i])
        obj_target[matched] = 1.0
        totals["loss_obj"] = totals["loss_obj"] + F.binary_cross_entropy_with_logits(obj[i], obj_target, reduction="sum")
        if matched.numel():
            iou = box_iou(boxes[i][matched], gt_boxes[gt_index]).diagonal()
            cls_target = F.one_hot(gt_classes[gt_index], cls.shape[-1]).to(cls.dtype) * iou.detach()[:, None]
            totals["loss_box"] = totals["loss_box"] + REG_WEIGHT * (1 - iou.pow(2)).sum()
            totals["loss_cls"] = totals["loss_cls"] + F.binary_cross_entropy_with_logits(
                cls[i][matched], cls_target, reduction="sum")
        assigned += int(matched.numel())
    return {name: value / max(assigned, 1) for name, value in totals.items()}


def head_classes(model, labels: Tensor) -> Tensor:
    """Stage labels (COCO category ids, or 1..C for own classes) to head class indices."""
    lookup = torch.full((int(model.num_classes),), -1, dtype=torch.int64, device=labels.device)
    lookup[model.label_of_class.to(labels.device)] = torch.arange(len(model.label_of_class), device=labels.device)
    index = lookup[labels.long()]
    if (index < 0).any():
        raise ValueError(f"yolox: labels {labels[index < 0].tolist()} have no head class (background or a COCO gap)")
    return index


def simota(boxes: Tensor, cls: Tensor, obj: Tensor, gt_boxes: Tensor, gt_classes: Tensor, centres: Tensor,
           strides: Tensor) -> tuple[Tensor, Tensor]:
    """(assigned point indices, the ground-truth box of each) by SimOTA's dynamic-k matching."""
    if len(gt_boxes) == 0:
        return boxes.new_zeros(0, dtype=torch.int64), boxes.new_zeros(0, dtype=torch.int64)
    in_box, in_centre = _candidates(gt_boxes, centres, strides)
    candidate = (in_box | in_centre).any(0)
    if not candidate.any():
        return boxes.new_zeros(0, dtype=torch.int64), boxes.new_zeros(0, dtype=torch.int64)
    points = candidate.nonzero()[:, 0]
    iou = box_iou(gt_boxes, boxes[points])
    probs = (cls[points].sigmoid() * obj[points, None].sigmoid()).sqrt().nan_to_num(0.5)
    onehot = F.one_hot(gt_classes, cls.shape[-1]).to(probs.dtype)
    cls_cost = F.binary_cross_entropy(probs[None].expand(len(gt_boxes), -1, -1).clamp(1e-6, 1 - 1e-6),
                                      onehot[:, None].expand(-1, len(points), -1), reduction="none").sum(-1)
    both = (in_box & in_centre)[:, points]
    cost = cls_cost + 3.0 * -torch.log(iou + 1e-8) + 1e5 * (~both)
    return _dynamic_k(cost, iou, points)


def _candidates(gt_boxes: Tensor, centres: Tensor, strides: Tensor) -> tuple[Tensor, Tensor]:
    x, y = centres[None, :, 0], centres[None, :, 1]
    in_box = (x > gt_boxes[:, None, 0]) & (x < gt_boxes[:, None, 2]) & (y > gt_boxes[:, None, 1]) & (y < gt_boxes[:, None, 3])
    cx, cy = (gt_boxes[:, 0] + gt_boxes[:, 2]) / 2, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2
    radius = CENTRE_RADIUS * strides[None, :]
    in_centre = ((x - cx[:, None]).abs() < radius) & ((y - cy[:, None]).abs() < radius)
    return in_box, in_centre


def _dynamic_k(cost: Tensor, iou: Tensor, points: Tensor) -> tuple[Tensor, Tensor]:
    matching = torch.zeros_like(cost, dtype=torch.bool)
    ks = iou.topk(min(10, iou.shape[1]), dim=1).values.sum(1).int().clamp(min=1)
    for g, k in enumerate(ks.tolist()):
        matching[g, cost[g].topk(min(k, cost.shape[1]), largest=False).indices] = True
    contested = matching.sum(0) > 1
    if contested.any():  # a point claimed by several boxes keeps the cheapest
        cheapest = cost[:, contested].argmin(0)
        matching[:, contested] = False
        matching[cheapest, contested.nonzero()[:, 0]] = True
    gt_index, column = matching.nonzero(as_tuple=True)
    return points[column], gt_index
