"""A COCO-style JSON sink: detections as boxes, segmentation as per-class RLE masks.

The file loads with ``pycocotools.coco.COCO``. Beyond the COCO fields it keeps
the video structure (as in COCO-style video datasets such as YouTube-VIS)::

    {"info": {...},
     "videos":      [{"id": 1, "name": <stream id>}],
     "images":      [{"id", "video_id", "frame_id", "file_name": "<stream>/<frame:06d>",
                      "width", "height", "pts", "outcome"}],          # one per frame
     "categories":  [{"id", "name", "supercategory": "object"}],
     "annotations": [{"id", "image_id", "video_id", "frame_id", "category_id", "bbox", "area",
                      "iscrowd": 0, "score", "task": "detect"},
                     {..., "segmentation": {"size": [h, w], "counts": <RLE string>},
                      "task": "segment"}]}

A segmentation annotation is ``pycocotools.mask.encode`` of ``class_map ==
c`` for each class present in the frame, background (index 0) excluded: one
mask of every object of the class together (semantic, not instances; filter
on ``task`` to evaluate boxes or masks alone: a class's mask beside its boxes
would count as one more object). Category ids are fixed by name, the same in
every file: a COCO class has its COCO id (person 1, car 3), any other name a
stable id of 1000 or more made from the name, so one name has one id whether a
detector or a segmenter produced it (a VOC class under its COCO name: the segmenter's ``motorbike`` is
``motorcycle``, 4), and the categories of several videos' files agree (their image, video and annotation ids
count from 1 in each file: merging files renumbers those). Frames that were dropped or
failed get an image entry and no annotations. Everything is written when the
sink closes, atomically; the output depends only on the results, so the same
input gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from blinkflow.config import SinkConfig
from blinkflow.frame import FrameResult
from blinkflow.registry import register_sink
from blinkflow.sinks import AtomicFile, Sink, said_whole_at_the_end

log = logging.getLogger(__name__)


@register_sink("coco")
class CocoSink(Sink):
    """Detections and masks of every frame as one COCO-style JSON file."""

    #: the SinkConfig settings it reads (config: another's, set, is an error)
    settings = frozenset({"path"})
    check_pipeline = staticmethod(said_whole_at_the_end)  # live runs: held until the end, said at load

    needs_path = True  # config checks that a path is given

    def __init__(self, cfg: SinkConfig) -> None:
        super().__init__(cfg)
        self.file = AtomicFile(cfg.path)
        self.videos: dict[str, int] = {}
        self.categories: dict[str, dict[str, Any]] = {}
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.closed = False

    def write(self, result: FrameResult) -> None:
        video_id = self.videos.setdefault(result.stream_id, len(self.videos) + 1)
        image_id = len(self.images) + 1
        self.images.append({
            "id": image_id, "video_id": video_id, "frame_id": result.index,
            "file_name": f"{result.stream_id}/{result.index:06d}", "width": result.width, "height": result.height,
            "pts": round(float(result.pts), 6), "outcome": result.outcome.value,
        })
        where = {"image_id": image_id, "video_id": video_id, "frame_id": result.index}
        if result.outcome.value == "failed":
            return  # a later stage failed on it: what the earlier ones found is not the frame's answer
        if result.results.get("detect"):
            self._add_detections(result.results["detect"], where)
        if result.results.get("segment"):
            self._add_masks(result.results["segment"], where)

    def _category(self, name: str, task: str) -> int:
        from blinkflow.models.classes import VOC_TO_COCO

        name = VOC_TO_COCO.get(name, name)  # the segmenter's VOC "motorbike" is the detector's COCO "motorcycle"
        entry = self.categories.get(name)
        if entry is None:
            entry = self.categories[name] = {"id": category_id(name), "name": name, "supercategory": "object"}
            clash = [other for other, c in self.categories.items() if c["id"] == entry["id"] and other != name]
            if clash:  # one in about a million for a thousand names: said rather than merged
                raise ValueError(f"coco sink: classes {clash[0]!r} and {name!r} have one category id; rename one")
        return entry["id"]

    def _add_detections(self, detect: dict[str, Any], where: dict[str, int]) -> None:
        from blinkflow.models.formats import detections_to_coco

        ids = {name: self._category(name, "detect") for name in detect["classes"]}
        for annotation in detections_to_coco(detect, where["image_id"], ids, first_id=len(self.annotations) + 1):
            annotation.update(where, task="detect")
            annotation["bbox"] = [round(float(v), 3) for v in annotation["bbox"]]
            annotation["area"] = round(float(annotation["area"]), 3)
            annotation["score"] = round(float(annotation["score"]), 5)
            self.annotations.append(annotation)

    def _add_masks(self, segment: dict[str, Any], where: dict[str, int]) -> None:
        from pycocotools import mask as mask_utils

        class_map = class_map_of(segment)
        classes = segment["classes"]
        for index in np.unique(class_map):
            if index == 0 or index >= len(classes):
                continue  # background, or a value outside the vocabulary
            rle = mask_utils.encode(np.asfortranarray((class_map == index).astype(np.uint8)))
            self.annotations.append({
                "id": len(self.annotations) + 1, **where, "category_id": self._category(classes[index], "segment"),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0, "score": 1.0, "task": "segment",
            })

    def document(self) -> dict[str, Any]:
        return {
            "info": {"description": "blinkflow detections and segmentation masks", "version": "1.0"},
            "videos": [{"id": vid, "name": name} for name, vid in self.videos.items()],
            "images": self.images,
            "categories": sorted(self.categories.values(), key=lambda c: c["id"]),
            "annotations": self.annotations,
        }

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with self.file.temp.open("w", encoding="utf-8") as handle:
            json.dump(self.document(), handle, separators=(",", ":"))
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.file.commit()
        log.info("wrote %d images and %d annotations to %s", len(self.images), len(self.annotations), self.file.path)

    def abort(self) -> None:
        self.closed = True
        self.file.discard()


def category_id(name: str) -> int:
    """A category's id in every file: COCO's for a COCO class name, else 1000 + a number made from the name
    (first-seen order gave person 1 in one video's file and 2 in another's)."""
    import hashlib

    from blinkflow.models.classes import coco_categories

    coco = _coco_ids(tuple(coco_categories()))
    if name in coco:
        return coco[name]
    return 1000 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) % 10**12


def _coco_ids(names: tuple[str, ...]) -> dict[str, int]:
    return {name: index for index, name in enumerate(names) if index > 0 and name != "N/A"}


def class_map_of(segment: dict[str, Any]) -> np.ndarray:
    """The (H, W) uint8 class map of a segment result (PNG bytes in memory, base64 in JSONL)."""
    import base64

    from blinkflow.stages.common import decode_class_map

    data = segment["mask"]["data"]
    if isinstance(data, str):
        data = base64.b64decode(data)
    return decode_class_map(data)
