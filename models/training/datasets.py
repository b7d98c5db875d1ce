"""Training and evaluation examples for the four stages, held in memory.

Two kinds of sources give the same in-memory datasets:

* **synthetic scenes** (:class:`~models.training.scenes.SceneGenerator`):
  a split is a range of clip seeds (:class:`~models.training.config.SplitConfig`),
  so the held-out split is simply other seeds, and every example is exact
  ground truth rendered on the fly at start-up (deterministic by seed);
* **real formats**: COCO JSON with RLE or polygon masks (detect, segment),
  Flying Chairs / Sintel / Middlebury ``.flo`` pairs (flow) and a
  UCF101/Kinetics class-per-folder video tree (action).

Preprocessing is the pipeline's own: images go through
:func:`stages.common.frames_to_batch` at the stage's ``input_size`` preset
(imported from ``stages/<task>.py``), so training sees exactly the pixels the
stage feeds the model. Images are stored as uint8 (lossless, since the stage
itself rounds to uint8 before dividing by 255) and become float in [0, 1] per batch.

Evaluation sets also keep ground truth at the *source* resolution, because
that is where the stages report (segment upsamples logits, flow rescales its
field), so metrics measure what the pipeline outputs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES
from blinkflow.models.training.config import DataConfig, SplitConfig
from blinkflow.models.training.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, DatasetError, read_image, read_video_frames  # noqa: F401

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- presets


def stage_options(task: str) -> Any:
    """The stage's default options: the single source of the inference presets."""
    import importlib

    module = importlib.import_module(f"blinkflow.stages.{task}")
    return getattr(module, f"{task.capitalize()}Options")()


def input_size(task: str, data: DataConfig) -> tuple[int, int] | None:
    """[height, width] the model sees: the config's, else the stage's preset (None: source size)."""
    size = data.input_size if data.input_size is not None else stage_options(task).input_size
    return (int(size[0]), int(size[1])) if size is not None else None


def clip_len(data: DataConfig) -> int:
    return data.clip_len if data.clip_len is not None else stage_options("action").clip_len


def to_model_input(images: list[np.ndarray], size: tuple[int, int] | None) -> torch.Tensor:
    """(N, 3, h, w) uint8: the stage's own resize (:func:`stages.common.frames_to_batch`), kept lossless."""
    from blinkflow.frame import Frame
    from blinkflow.stages.common import frames_to_batch

    frames = [Frame(stream_id="train", index=i, pts=0.0, image=image) for i, image in enumerate(images)]
    batch = frames_to_batch(frames, torch.device("cpu"), size=size)
    return batch.mul_(255.0).round_().to(torch.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W) class map to ``size`` by centre-aligned nearest neighbour (classes must not blend)."""
    tensor = torch.from_numpy(np.ascontiguousarray(labels)).float()[None, None]
    return F.interpolate(tensor, size=size, mode="nearest-exact")[0, 0].to(torch.uint8)


def resize_flow(flow: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 2) flow in source pixels to (2, h, w) in ``size`` pixels: area-averaged, vectors rescaled."""
    tensor = torch.from_numpy(np.ascontiguousarray(flow, dtype=np.float32)).permute(2, 0, 1)[None]
    height, width = flow.shape[:2]
    pooled = F.adaptive_avg_pool2d(tensor, size) if (height, width) != tuple(size) else tensor
    scale = torch.tensor([size[1] / width, size[0] / height]).view(1, 2, 1, 1)
    return (pooled * scale)[0]


# --------------------------------------------------------------------------- datasets


class DetectionExamples(Dataset):
    """Images at source size (the detectors resize internally) with boxes (x1, y1, x2, y2) and labels."""

    def __init__(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], classes: list[str]):
        self.images, self.targets, self.classes = images, targets, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "target": self.targets[i], "image_id": i + 1}


class SegmentationExamples(Dataset):
    """Model-input images with class maps at input size (training) and at source size (``native``, evaluation).

    ``pairs``: for the consistency term, each image's partner (frame t + gap of the same clip) and its class map.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, native: list[torch.Tensor] | None, classes: list[str],
                 pairs: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.images, self.labels, self.native, self.classes, self.pairs = images, labels, native, classes, pairs

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"image": self.images[i], "label": self.labels[i]}
        if self.native is not None:
            item["native"] = self.native[i]
        if self.pairs is not None:
            item["pair_image"], item["pair_label"] = self.pairs[0][i], self.pairs[1][i]
        return item


class FlowExamples(Dataset):
    """Model-input image pairs, flow at input size in input pixels, and (evaluation) source-size flow and validity."""

    def __init__(self, first: torch.Tensor, second: torch.Tensor, flow: torch.Tensor,
                 native: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.first, self.second, self.flow, self.native = first, second, flow, native
        self.classes = None

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {"first": self.first[i], "second": self.second[i], "flow": self.flow[i].float()}
        if self.native is not None:
            item["native_flow"], item["native_valid"] = self.native[i]
        return item


class ClipExamples(Dataset):
    """Action clips (3, T, h, w) uint8 at the stage's input size and clip length, with class indices."""

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        self.clips, self.labels, self.classes = clips, labels, classes

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"clip": self.clips[i], "label": self.labels[i]}


# --------------------------------------------------------------------------- synthetic


def scene_seeds(split: SplitConfig) -> range:
    return range(split.first_seed, split.first_seed + split.clips)


def sample_times(split: SplitConfig) -> list[int]:
    """Frame indices sampled from each clip: 0, frame_step, 2 * frame_step, ..."""
    return [k * split.frame_step for k in range(split.samples_per_clip)]


def _scene(seed: int, data: DataConfig, action: str | None = None, split: SplitConfig | None = None):
    """Clip ``seed``; over a real background when the split has them and the seed draws one."""
    from blinkflow.models.training.scenes import SceneGenerator

    background = None
    if split is not None and (split.backgrounds or split.clutter_fraction):
        from blinkflow.models.training.backgrounds import clip_background

        background = clip_background(seed, split, data.width, data.height)
    return SceneGenerator(seed, data.width, data.height, data.num_objects, action, background=background)


def _progress(iterable: Any, desc: str, total: int) -> Iterator:
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="clip", leave=False, disable=None)


def synthetic_detection(data: DataConfig, split: SplitConfig) -> DetectionExamples:
    images, targets = [], []
    for seed in _progress(scene_seeds(split), "render detect", split.clips):
        scene = _scene(seed, data, split=split)
        for t in sample_times(split):
            frame = scene.render(t)
            images.append(torch.from_numpy(frame.image).permute(2, 0, 1).contiguous())
            targets.append({"boxes": torch.from_numpy(frame.boxes), "labels": torch.from_numpy(frame.labels)})
    return DetectionExamples(images, targets, list(SYNTHETIC_CLASSES))


def synthetic_segmentation(data: DataConfig, split: SplitConfig, size: tuple[int, int], native: bool,
                           pair_gap: int = 0) -> SegmentationExamples:
    """Sampled frames of each clip; ``pair_gap > 0`` also renders frame t + pair_gap of every sample."""
    images, labels, natives, pair_images, pair_labels = [], [], [], [], []
    for seed in _progress(scene_seeds(split), "render segment", split.clips):
        scene = _scene(seed, data, split=split)
        frames = [scene.render(t) for t in sample_times(split)]
        images.append(to_model_input([f.image for f in frames], size))
        labels += [resize_labels(f.semantic, size) for f in frames]
        natives += [torch.from_numpy(f.semantic) for f in frames] if native else []
        if pair_gap:
            partners = [scene.render(t + pair_gap) for t in sample_times(split)]
            pair_images.append(to_model_input([f.image for f in partners], size))
            pair_labels += [resize_labels(f.semantic, size) for f in partners]
    pairs = (torch.cat(pair_images), torch.stack(pair_labels)) if pair_gap else None
    return SegmentationExamples(torch.cat(images), torch.stack(labels), natives or None, list(SYNTHETIC_CLASSES), pairs)


def synthetic_flow(data: DataConfig, split: SplitConfig, size: tuple[int, int], native: bool) -> FlowExamples:
    firsts, seconds, flows, natives = [], [], [], []
    for seed in _progress(scene_seeds(split), "render flow", split.clips):
        scene = _scene(seed, data)
        for t in sample_times(split):
            frame = scene.render(t)
            pair = to_model_input([frame.image, scene.render_image(t + 1)], size)
            firsts.append(pair[0])
            seconds.append(pair[1])
            flows.append(resize_flow(frame.flow, size).half())  # |flow| < 64 px: fp16 keeps 0.03 px
            if native:
                natives.append((torch.from_numpy(frame.flow), torch.from_numpy(frame.valid)))
    return FlowExamples(torch.stack(firsts), torch.stack(seconds), torch.stack(flows), natives or None)


def synthetic_clips(data: DataConfig, split: SplitConfig, size: tuple[int, int], length: int) -> ClipExamples:
    """Clip seed s shows action ``SYNTHETIC_ACTIONS[s % 7]``, so the classes are balanced."""
    clips, labels = [], []
    for seed in _progress(scene_seeds(split), "render action", split.clips):
        action = seed % len(SYNTHETIC_ACTIONS)
        scene = _scene(seed, data, SYNTHETIC_ACTIONS[action])
        for start in sample_times(split):
            frames = [scene.render_image(t) for t in range(start, start + length)]
            clips.append(to_model_input(frames, size).transpose(0, 1))  # (T, 3, h, w) -> (3, T, h, w)
            labels.append(action)
    return ClipExamples(torch.stack(clips), torch.tensor(labels), list(SYNTHETIC_ACTIONS))


# --------------------------------------------------------------------------- COCO


@dataclass
class CocoData:
    """A COCO instances file: images (with resolved paths), annotations per image and category names."""

    path: Path
    images: list[dict]
    annotations: dict[int, list[dict]]
    categories: dict[int, str]


def read_coco(path: str | Path) -> CocoData:
    """Parse a COCO JSON; ``file_name`` is relative to the JSON's folder (or absolute)."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read the COCO file ({exc.strerror or exc}); pass a COCO instances JSON") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); pass a COCO instances JSON") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(coco, dict) or key not in coco]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no {missing[0]!r} list)")
    problem = _coco_problem(coco)
    if problem:
        raise DatasetError(f"{path}: not a COCO instances file ({problem}); pass a COCO instances JSON")
    annotations: dict[int, list[dict]] = {image["id"]: [] for image in coco["images"]}
    for annotation in coco["annotations"]:
        annotations.setdefault(annotation["image_id"], []).append(annotation)
    images = [{**image, "path": path.parent / image["file_name"]} for image in coco["images"]]
    categories = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    return CocoData(path, images, annotations, categories)


#: what each COCO list's entries need here: (key, type it must have)
_COCO_FIELDS = {"images": (("id", int), ("file_name", str)),
                "annotations": (("image_id", int), ("category_id", int)),
                "categories": (("id", int), ("name", str))}


def _coco_problem(coco: dict) -> str | None:
    """What in ``coco`` the readers below could not take, as words naming the entry; None when nothing."""
    for key, fields in _COCO_FIELDS.items():
        if not isinstance(coco[key], list):
            return f"{key!r} is not a list"
        for number, entry in enumerate(coco[key]):
            wrong = [f for f, kind in fields if not isinstance(entry, dict) or not isinstance(entry.get(f), kind)
                     or isinstance(entry.get(f), bool)]
            if wrong:
                return f"{key}[{number}] has no {wrong[0]!r} of the right type"
            bbox = entry.get("bbox") if key == "annotations" else None
            if bbox is not None and not (isinstance(bbox, list) and len(bbox) == 4
                                         and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
                return f"annotations[{number}].bbox is not [x, y, width, height]"
    return None


def annotated_categories(coco: CocoData) -> list[str]:
    """The names of the categories its annotations use (a file may list more: COCO's panoptic stuff, say)."""
    used = {a.get("category_id") for annotations in coco.annotations.values() for a in annotations}
    return sorted(name for cid, name in coco.categories.items() if cid in used)


def coco_label_map(coco: CocoData, classes: list[str] | None) -> tuple[list[str], dict[int, int]]:
    """(classes, category id -> class index). ``classes=None`` takes the file's own, background first;
    otherwise categories are matched by name, and a file sharing none of them is an error."""
    if classes is None:
        classes = ["background", *(coco.categories[k] for k in sorted(coco.categories))]
    mapping = {cid: classes.index(name) for cid, name in coco.categories.items() if name in classes[1:]}
    if not mapping:
        raise DatasetError(
            f"{coco.path}: none of its categories ({', '.join(sorted(coco.categories.values())[:5])}, ...) are classes "
            f"of the model ({', '.join(classes[1:])}); evaluate weights trained on these categories"
        )
    dropped = sorted(set(coco.categories.values()) - set(classes))
    if dropped:
        log.warning("%s: %d categories are not model classes and their objects are ignored: %s (the model's head is "
                    "kept since the file shares %d of its classes)", coco.path, len(dropped), dropped[:5], len(mapping))
    return classes, mapping


_read_image = read_image  # the name the readers below use
def _coco_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    """The annotation's mask from RLE (compressed or not) or polygons, via pycocotools."""
    from pycocotools import mask as mask_utils

    segmentation = annotation.get("segmentation")
    if not segmentation:
        raise DatasetError(f"annotation {annotation.get('id')} of image {annotation.get('image_id')} has no "
                           f"'segmentation'; segment data needs RLE or polygon masks")
    if isinstance(segmentation, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def coco_detection(coco: CocoData, classes: list[str] | None = None) -> DetectionExamples:
    """Boxes of the non-crowd annotations whose category is a class (COCO xywh -> x1y1x2y2);
    zero-width or zero-height boxes are dropped (the detectors' losses refuse them)."""
    classes, mapping = coco_label_map(coco, classes)
    images, targets, degenerate = [], [], 0
    for image in coco.images:
        pixels = _read_image(image["path"])
        candidates = [a for a in coco.annotations[image["id"]] if a["category_id"] in mapping and not a.get("iscrowd", 0)]
        kept = [a for a in candidates if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        degenerate += len(candidates) - len(kept)
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in kept)]
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous())
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([mapping[a["category_id"]] for a in kept], dtype=torch.int64),
        })
    if degenerate:
        log.warning("%s: %d boxes of zero width or height are ignored", coco.path, degenerate)
    return DetectionExamples(images, targets, classes)


def coco_semantic_map(coco: CocoData, image: dict, mapping: dict[int, int],
                      decoded_size: tuple[int, int] | None = None) -> np.ndarray:
    """(H, W) class map painted from the image's masks, larger first so small objects stay on top.
    The size is the entry's height and width, which COCO files may leave out: then ``decoded_size``."""
    height, width = image.get("height"), image.get("width")
    if not (isinstance(height, int) and isinstance(width, int)):
        if decoded_size is None:
            raise DatasetError(f"{coco.path}: image {image['id']} has no 'height' and 'width'; add them to the entry")
        height, width = decoded_size
    if decoded_size is not None and tuple(decoded_size) != (height, width):  # the masks would not fit the image
        raise DatasetError(f"{coco.path}: image {image['id']} is {decoded_size[1]}x{decoded_size[0]} on disk but its "
                           f"entry says {width}x{height}; fix its 'width' and 'height'")
    semantic = np.zeros((height, width), dtype=np.uint8)
    kept = [a for a in coco.annotations[image["id"]] if a["category_id"] in mapping]
    for annotation in sorted(kept, key=lambda a: -a.get("area", 0)):
        semantic[_coco_mask(annotation, height, width)] = mapping[annotation["category_id"]]
    return semantic


def coco_segmentation(coco: CocoData, size: tuple[int, int], classes: list[str] | None = None) -> SegmentationExamples:
    classes, mapping = coco_label_map(coco, classes)
    images, labels, natives = [], [], []
    for image in coco.images:
        pixels = _read_image(image["path"])
        semantic = coco_semantic_map(coco, image, mapping, pixels.shape[:2])
        images.append(to_model_input([pixels], size))
        labels.append(resize_labels(semantic, size))
        natives.append(torch.from_numpy(semantic))
    return SegmentationExamples(torch.cat(images), torch.stack(labels), natives, classes)


# --------------------------------------------------------------------------- .flo pairs


def find_flow_pairs(root: str | Path) -> list[tuple[Path, Path, Path]]:
    """(first image, second image, .flo) triples in any of the three common layouts under ``root``:

    * Flying Chairs: ``NNNNN_img1.ppm``, ``NNNNN_img2.ppm``, ``NNNNN_flow.flo`` side by side;
    * Sintel: ``<pass>/<scene>/frame_NNNN.png`` with ``flow/<scene>/frame_NNNN.flo`` (pass: clean or final);
    * Middlebury: ``other-data/<scene>/frame10.png`` and ``frame11.png`` with ``other-gt-flow/<scene>/flow10.flo``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory; pass the folder that holds the .flo files")
    pairs = [_pair_for(flo, root) for flo in sorted(root.rglob("*.flo"))]
    found = [pair for pair in pairs if pair is not None]
    if not found:
        raise DatasetError(
            f"{root}: no .flo file with both of its images found; expected Flying Chairs (NNNNN_img1.ppm, "
            f"NNNNN_img2.ppm, NNNNN_flow.flo), Sintel or Middlebury layouts"
        )
    return found


def _pair_for(flo: Path, root: Path) -> tuple[Path, Path, Path] | None:
    chairs = re.fullmatch(r"(.+)_flow\.flo", flo.name)
    if chairs:
        return _existing(flo.parent, f"{chairs[1]}_img1", f"{chairs[1]}_img2", flo)
    numbered = re.fullmatch(r"(frame_?|flow)(\d+)\.flo", flo.name)
    if not numbered:
        return None
    number, digits = int(numbered[2]), len(numbered[2])
    names = (f"frame{number}", f"frame{number + 1}") if numbered[1] == "flow" else (
        f"frame_{number:0{digits}d}", f"frame_{number + 1:0{digits}d}")
    for folder in _image_folders(flo, root):
        pair = _existing(folder, *names, flo)
        if pair is not None:
            return pair
    return None


def _image_folders(flo: Path, root: Path) -> list[Path]:
    """Where a Sintel/Middlebury flow file's images live: same scene name under a sibling tree."""
    scene = flo.parent.name
    trees = flo.parent.parent.parent
    candidates = [trees / "clean" / scene, trees / "final" / scene, trees / "other-data" / scene, flo.parent]
    return [folder for folder in candidates if folder.is_dir()]


def _existing(folder: Path, first: str, second: str, flo: Path) -> tuple[Path, Path, Path] | None:
    for suffix in IMAGE_SUFFIXES:
        a, b = folder / f"{first}{suffix}", folder / f"{second}{suffix}"
        if a.is_file() and b.is_file():
            return a, b, flo
    return None


def flow_pairs_dataset(pairs: list[tuple[Path, Path, Path]], size: tuple[int, int]) -> FlowExamples:
    from blinkflow.models.metrics_flow import read_flo

    firsts, seconds, flows, natives = [], [], [], []
    for first, second, flo in pairs:
        flow = read_flo(flo)
        images = [_read_image(first), _read_image(second)]
        if images[0].shape[:2] != flow.shape[:2]:
            raise DatasetError(f"{flo}: flow is {flow.shape[1]}x{flow.shape[0]} but {first.name} is "
                               f"{images[0].shape[1]}x{images[0].shape[0]}; the pair does not belong together")
        pair = to_model_input(images, size)
        firsts.append(pair[0])
        seconds.append(pair[1])
        # invalid pixels of KITTI-style data are stored as huge values; treat those as invalid
        valid = np.all(np.abs(flow) < 1e9, axis=-1)
        flow = np.where(valid[..., None], flow, 0.0).astype(np.float32)
        flows.append(resize_flow(flow, size).half())
        natives.append((torch.from_numpy(flow), torch.from_numpy(valid)))
    return FlowExamples(torch.stack(firsts), torch.stack(seconds), torch.stack(flows), natives)


# --------------------------------------------------------------------------- video tree


def find_video_tree(root: str | Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes and (video, class index) of a ``root/<class>/<clip>.<ext>`` tree (UCF101, Kinetics).

    The class order comes from a UCF101 ``classInd.txt`` (``1 ApplyEyeMakeup``) when one exists,
    else from the sorted folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a directory; pass the folder that holds one sub-folder per class")
    # hidden folders (.ipynb_checkpoints, .git) are no classes: one became class 0 of a shipped model
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    index_file = root / "classInd.txt"
    classes = _class_index(index_file, folders) if index_file.is_file() else folders
    videos = [(video, classes.index(name)) for name in folders
              for video in sorted((root / name).iterdir()) if video.suffix.lower() in VIDEO_SUFFIXES]
    if not videos:
        raise DatasetError(f"{root}: no videos found in <class>/<clip>.mp4 sub-folders (or .avi, .mkv, .mov, ...)")
    return classes, videos


def _class_index(index_file: Path, folders: list[str]) -> list[str]:
    """The classes of a UCF101 ``classInd.txt`` (``<number> <name>`` a line), in its order; every class folder of
    the tree must be one of them (a folder it does not name was left out of training, silently)."""
    classes = []
    for number, line in enumerate(index_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{index_file}:{number}: {line.strip()!r} is not '<number> <class>' (e.g. '1 ApplyEyeMakeup')")
        classes.append(parts[1])
    unnamed = [name for name in folders if name not in classes]
    if unnamed:
        raise DatasetError(f"{index_file}: names no class {unnamed[0]!r}, a folder of the tree ({len(unnamed)} such); "
                           "add it (class names are case-sensitive) or move the folder out")
    return classes


def read_clip(path: Path, length: int, size: tuple[int, int]) -> torch.Tensor:
    """(3, T, h, w) uint8: the first ``length`` frames, RGB as the pipeline decodes them (the last repeats if short)."""
    images = read_video_frames(path, length)
    if not images:
        raise DatasetError(f"{path}: no frames decoded; replace the clip or drop it")
    images += [images[-1]] * (length - len(images))
    return to_model_input(images, size).transpose(0, 1)


def video_tree_dataset(root: str | Path, length: int, size: tuple[int, int], classes: list[str] | None = None) -> ClipExamples:
    """Clips of a video tree; with ``classes`` (the model's), folders are matched to them by name."""
    tree_classes, videos = find_video_tree(root)
    if classes is not None:
        unknown = sorted({tree_classes[label] for _, label in videos} - set(classes))
        if unknown:
            raise DatasetError(f"{root}: classes {unknown[:5]} are not classes of the model ({', '.join(classes)}); "
                               f"evaluate weights trained on these classes")
        videos = [(video, classes.index(tree_classes[label])) for video, label in videos]
    clips = [read_clip(video, length, size) for video, _ in videos]
    return ClipExamples(torch.stack(clips), torch.tensor([label for _, label in videos]), classes or tree_classes)
