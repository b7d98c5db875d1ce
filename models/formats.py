"""Conversions between the detect stage's result dict and COCO annotations.

The detect stage writes, per frame::

    {"boxes": [[x1, y1, x2, y2], ...],   # source pixels, floats
     "labels": [int, ...],               # index into the stage's class list
     "classes": [str, ...],              # the class name of each label
     "scores": [float, ...]}

COCO stores ``bbox`` as ``[x, y, width, height]`` and a ``category_id``. The
two conversions are exact inverses for boxes whose coordinates are exactly
representable sums (integers, or the halves/quarters COCO boxes usually are);
arbitrary floats can differ in the last bit because x2 = x + w is rounded.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def detections_to_coco(
    result: Mapping[str, Any],
    image_id: int,
    category_ids: Mapping[str, int] | None = None,
    *,
    first_id: int = 1,
) -> list[dict[str, Any]]:
    """COCO annotations (with ``score``, usable as results or as a dataset) for one image.

    ``category_ids`` maps class names to COCO category ids; ``None`` uses each
    label as its category id, which is right for torchvision's COCO weights
    (their class list keeps the 'N/A' gaps so index == COCO id).
    """
    annotations = []
    rows = zip(result["boxes"], result["labels"], result["classes"], result["scores"])
    for offset, (box, label, name, score) in enumerate(rows):
        x1, y1, x2, y2 = box
        width, height = x2 - x1, y2 - y1
        annotations.append(
            {
                "id": first_id + offset,
                "image_id": image_id,
                "category_id": _category_id(label, name, category_ids),
                "bbox": [x1, y1, width, height],
                "area": width * height,
                "iscrowd": 0,
                "score": score,
            }
        )
    return annotations


def _category_id(label: int, name: str, category_ids: Mapping[str, int] | None) -> int:
    if category_ids is None:
        return int(label)
    try:
        return int(category_ids[name])
    except KeyError:
        raise ValueError(f"class {name!r} has no COCO category id; known: {sorted(category_ids)}") from None


def coco_to_detections(annotations: Iterable[Mapping[str, Any]], categories: Iterable[Mapping[str, Any]]) -> dict:
    """One image's COCO annotations as a detect result; labels are the COCO category ids.

    Ground-truth annotations have no score, so they get 1.0. Annotations of
    several images must be split by ``image_id`` first.
    """
    annotations = list(annotations)
    image_ids = {a["image_id"] for a in annotations}
    if len(image_ids) > 1:
        raise ValueError(f"annotations of {len(image_ids)} images given; split them by image_id first")
    names = {int(c["id"]): str(c["name"]) for c in categories}
    result: dict[str, list] = {"boxes": [], "labels": [], "classes": [], "scores": []}
    for annotation in annotations:
        x, y, width, height = annotation["bbox"]
        category = int(annotation["category_id"])
        if category not in names:
            raise ValueError(f"annotation {annotation.get('id')} has category_id {category}, not in categories")
        result["boxes"].append([x, y, x + width, y + height])
        result["labels"].append(category)
        result["classes"].append(names[category])
        result["scores"].append(annotation.get("score", 1.0))
    return result
