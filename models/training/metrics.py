"""Evaluation metrics of the four stages.

* detect: COCO box mAP (IoU 0.50:0.95) and mAP@0.5 with pycocotools' ``COCOeval``;
* segment: mean IoU and pixel accuracy from an accumulated confusion matrix;
* flow: end-point error and KITTI Fl-all, re-exported from :mod:`models.metrics_flow`;
* action: top-1 and top-5 accuracy.

Boxes here are ``x1, y1, x2, y2`` as the detectors output them; the COCO
conversion to ``x, y, w, h`` happens inside :func:`box_map`.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Sequence

import numpy as np

from blinkflow.models.metrics_flow import endpoint_errors, epe, fl_all  # noqa: F401 - re-exported

__all__ = ["box_map", "confusion_matrix", "segmentation_scores", "topk_accuracy", "epe", "fl_all", "endpoint_errors"]


def _coco_ground_truth(targets: Sequence[dict], num_classes: int) -> dict:
    """An in-memory COCO dataset; annotation ids start at 1 because COCOeval treats id 0 as 'unmatched'."""
    images, annotations = [], []
    for image_id, target in enumerate(targets, start=1):
        images.append({"id": image_id})
        for box, label in zip(np.asarray(target["boxes"], dtype=float).reshape(-1, 4), np.asarray(target["labels"])):
            x1, y1, x2, y2 = box.tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0,
            })
    categories = [{"id": c} for c in range(1, num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _coco_detections(predictions: Sequence[dict]) -> list[dict]:
    results = []
    for image_id, prediction in enumerate(predictions, start=1):
        boxes = np.asarray(prediction["boxes"], dtype=float).reshape(-1, 4)
        for box, label, score in zip(boxes, np.asarray(prediction["labels"]), np.asarray(prediction["scores"])):
            x1, y1, x2, y2 = box.tolist()
            results.append({"image_id": image_id, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(score)})
    return results


def box_map(predictions: Sequence[dict], targets: Sequence[dict], num_classes: int) -> dict[str, float]:
    """COCO box metrics of per-image ``{"boxes", "labels", "scores"}`` against ``{"boxes", "labels"}``.

    Returns ``map`` (AP at IoU 0.50:0.95), ``map50`` and ``map75``, as COCOeval computes them (101-point
    interpolation, up to 100 detections per image). No detections at all scores 0.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} images")
    detections = _coco_detections(predictions)
    if not detections:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        ground_truth = COCO()
        ground_truth.dataset = _coco_ground_truth(targets, num_classes)
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(detections), iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # COCOeval reports -1 where no ground truth exists; no ground truth at all means nothing to find
    stats = [max(0.0, float(v)) for v in evaluator.stats[:3]]
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}


def confusion_matrix(prediction: Any, target: Any, num_classes: int, ignore_index: int | None = None) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = true class, columns = predicted class."""
    prediction = np.asarray(prediction, dtype=np.int64).ravel()
    target = np.asarray(target, dtype=np.int64).ravel()
    if prediction.shape != target.shape:
        raise ValueError(f"prediction has {prediction.size} pixels, target {target.size}")
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    counts = np.bincount(target[keep] * num_classes + prediction[keep], minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict[str, Any]:
    """``miou`` (mean over the classes present in the truth or the prediction), ``pixel_accuracy``
    and ``iou`` per class (None for a class absent from both)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    present = union > 0
    iou = np.divide(true_positive, union, out=np.zeros_like(true_positive), where=present)
    total = confusion.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_accuracy": float(true_positive.sum() / total) if total else 0.0,
        "iou": [float(v) if p else None for v, p in zip(iou, present)],
    }


def topk_accuracy(logits: Any, labels: Any, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``top{k}`` = fraction of rows whose label is among the k highest scores (k capped at the class count).

    Ties are broken as argmax breaks them (lower class index first); rows with non-finite logits count as wrong.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and N labels, got {logits.shape} and {labels.shape}")
    # rank of the true class = classes scoring higher, plus tied classes with a lower index (argmax order),
    # so a collapsed model with constant logits is not scored as perfect
    true_scores = logits[np.arange(len(labels)), labels][:, None]
    lower_index = np.arange(logits.shape[1])[None, :] < labels[:, None]
    rank = ((logits > true_scores) | ((logits == true_scores) & lower_index)).sum(axis=1)
    # a row with NaN or inf logits has no meaningful ranking: count it as wrong
    rank[~np.isfinite(logits).all(axis=1)] = logits.shape[1]
    return {f"top{k}": float((rank < min(k, logits.shape[1])).mean()) if len(labels) else 0.0 for k in ks}
