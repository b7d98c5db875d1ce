"""Class vocabularies: the synthetic scenes' and the real pretrained models'.

Index 0 is background for detection and segmentation, as in torchvision's
conventions. The synthetic scene generator, the training code, the shipped
weights and the stages all use these lists, so they never disagree. The real
vocabularies are text files in ``models/labels/`` (one name a line), read on use.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

SYNTHETIC_CLASSES: list[str] = ["background", "disc", "square", "triangle", "ring", "cross"]

#: per-clip action labels of the synthetic scenes
SYNTHETIC_ACTIONS: list[str] = ["static", "slide-left", "slide-right", "rotate", "grow", "shrink", "bounce"]

LABELS_DIR = Path(__file__).parent / "labels"

#: torchvision's VideoClassification preset for Kinetics-400 (r3d, mc3, r2plus1d, s3d; causal3d centres with it too)
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


@lru_cache(maxsize=None)
def _read(name: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in (LABELS_DIR / name).read_text().splitlines() if line.strip())


def coco_categories() -> list[str]:
    """91 entries indexed by COCO category id: ``__background__`` at 0 and ``N/A`` in COCO's gaps."""
    return list(_read("coco91.txt"))


def coco80_to_category_id() -> list[int]:
    """The COCO category id of each of the 80 contiguous class indices detectors predict."""
    return [i for i, name in enumerate(coco_categories()) if i > 0 and name != "N/A"]


#: COCO category name -> VOC class name (the 20 VOC classes all have a COCO twin)
COCO_TO_VOC = {
    "airplane": "aeroplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
    "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow", "dining table": "diningtable",
    "dog": "dog", "horse": "horse", "motorcycle": "motorbike", "person": "person", "potted plant": "pottedplant",
    "sheep": "sheep", "couch": "sofa", "train": "train", "tv": "tvmonitor",
}
#: a VOC class's COCO spelling (six differ: motorbike is motorcycle), for outputs that file both vocabularies together
VOC_TO_COCO = {voc: coco for coco, voc in COCO_TO_VOC.items()}


def voc_classes() -> list[str]:
    """PASCAL VOC: background and the 20 object classes, in the segmenters' logit order."""
    return list(_read("voc21.txt"))


def kinetics400_classes() -> list[str]:
    """Kinetics-400 action names in the order of the I3D logits (DeepMind's label_map.txt)."""
    return list(_read("kinetics400.txt"))
