"""``blinkflow bench models``: the real pretrained models' quality on real data, judged against truth.

Every figure comes from the repository's own real media (``tests/data``, see its SOURCES.md):

* detect (``yolox_nano``): COCO mAP@0.5 and mAP@[.5:.95] on the two COCO sample images' 43 thing
  annotations (pycocotools; the panoptic sample's 7 stuff annotations are no detection truth), and
  the boxes found in ``dog.jpg``;
* segment (``deeplabv3_mobilenet_v2``): mIoU on the COCO sample images with COCO's instance masks
  mapped to VOC's 20 classes (stuff and unannotated pixels are background, COCO things without a VOC
  twin are ignored);
* flow (``raft_large``): EPE on the Middlebury-format pair with ground truth, at 6/12/20 refinement
  iterations, against zero flow; photometric warp error on consecutive bikes.mp4 frames against zero flow;
* action (``i3d``): top-1 on ``arm_wrestling.mp4`` (Kinetics "arm wrestling") and ``cricket_rgb.gif``.

Detect and segment run through their stages (postprocessing included), flow and action call the
model with the stages' preprocessing. The section is written to ``docs/models.md``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from blinkflow.bench.common import REPO_ROOT, machine_info, machine_line, markdown_table, save_json, write_section
from blinkflow.models.classes import COCO_TO_VOC
from blinkflow.models.weights import load_shipped

log = logging.getLogger(__name__)

DATA = REPO_ROOT / "tests" / "data"
MODELS_DOC = REPO_ROOT / "docs" / "models.md"

IGNORE = 255
#: COCO's thing categories have ids 1..90; panoptic stuff categories come after
THING_MAX_ID = 90


def bench_models(quick: bool = False, write: bool = True) -> dict[str, Any]:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    results = {
        "detect": detect_quality(),
        "segment": segment_quality(),
        "flow": flow_quality(pairs=3 if quick else 12, iterations=(6, 12) if quick else (6, 12, 20)),
        "action": action_quality(frames=16 if quick else 64),
    }
    results["seconds"] = round(time.perf_counter() - started, 1)
    body = render(results, machine_info())
    print(body)
    if write:
        write_section("models", body, MODELS_DOC)
        save_json("models", results)
    return results


# ---------------------------------------------------------------------------- detect


def _stage(task: str, model: str, **options: Any) -> Any:
    from blinkflow.config import StageConfig, structure_dataclass
    from blinkflow.registry import stages

    cls = stages.get(task)
    cfg = StageConfig(model=model, weights="shipped", batch=1, device="cpu",
                      options=structure_dataclass(cls.Options, options, f"stages.{task}.options"))
    stage = cls(cfg)
    stage.setup("cpu")
    return stage


def _image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.array(Image.open(path).convert("RGB"))


def _run(stage: Any, image: np.ndarray, index: int = 0) -> dict:
    from blinkflow.frame import Frame

    frame = Frame("bench", index, float(index), image)
    stage.process([frame])
    return frame.results[stage.name]


def detect_quality() -> dict[str, Any]:
    """mAP of yolox_nano on the COCO sample (a low score cut, as COCO evaluation expects) and dog.jpg's boxes."""
    from blinkflow.models.formats import detections_to_coco

    coco = things_only(json.loads((DATA / "coco" / "detections.json").read_text()))
    stage = _stage("detect", "yolox_nano", score_threshold=0.01, max_detections=100)
    found = []
    for image in coco["images"]:
        result = _run(stage, _image(DATA / "coco" / image["file_name"]))
        found += detections_to_coco(result, image["id"], first_id=len(found) + 1)
    map50, map_all = coco_map(coco, found)
    dog_stage = _stage("detect", "yolox_nano", score_threshold=0.5)
    dog = _run(dog_stage, _image(DATA / "originals" / "dog.jpg"))
    return {"map50": map50, "map": map_all, "annotations": len(coco["annotations"]),
            "dog": [f"{name} {score:.2f}" for name, score in zip(dog["classes"], dog["scores"])]}


def things_only(coco: dict) -> dict:
    """The sample is panoptic: its stuff annotations (sky, grass: category ids above 90) are no detection truth."""
    things = [c for c in coco["categories"] if c["id"] <= THING_MAX_ID]
    ids = {c["id"] for c in things}
    return {**coco, "categories": things, "annotations": [a for a in coco["annotations"] if a["category_id"] in ids]}


def coco_map(truth: dict, found: list[dict]) -> tuple[float, float]:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {**truth, "annotations": [{**a, "iscrowd": a.get("iscrowd", 0)} for a in truth["annotations"]]}
        gt.createIndex()
        dt = gt.loadRes(found) if found else None
        if dt is None:
            return 0.0, 0.0
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    return round(float(evaluation.stats[1]), 4), round(float(evaluation.stats[0]), 4)


# ---------------------------------------------------------------------------- segment


def segment_quality(input_size: list[int] | None = None) -> dict[str, Any]:
    """mIoU of deeplabv3_mobilenet_v2 on the COCO sample images (at their own size by default), COCO masks
    mapped to VOC."""
    from blinkflow.models.classes import voc_classes
    from blinkflow.stages.common import decode_class_map

    coco = json.loads((DATA / "coco" / "detections.json").read_text())
    classes = voc_classes()
    stage = _stage("segment", "deeplabv3_mobilenet_v2", input_size=input_size)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for image in coco["images"]:
        truth = voc_truth(coco, image, classes)
        predicted = decode_class_map(_run(stage, _image(DATA / "coco" / image["file_name"]))["mask"]["data"])
        valid = truth != IGNORE
        confusion += np.bincount(truth[valid].astype(np.int64) * len(classes) + predicted[valid],
                                 minlength=len(classes) ** 2).reshape(len(classes), len(classes))
    return miou_from_confusion(confusion, classes)


def voc_truth(coco: dict, image: dict, classes: list[str]) -> np.ndarray:
    """The image's VOC class map from its COCO panoptic masks: stuff (sky, grass) is VOC background, things
    without a VOC twin (truck, sports ball) are ignored."""
    from pycocotools import mask as mask_utils

    names = {c["id"]: c["name"] for c in coco["categories"]}
    truth = np.zeros((image["height"], image["width"]), dtype=np.uint8)
    for annotation in sorted((a for a in coco["annotations"] if a["image_id"] == image["id"]),
                             key=lambda a: -a.get("area", 0)):  # small objects last: they stay on top
        segmentation = annotation["segmentation"]
        if isinstance(segmentation, list):
            segmentation = mask_utils.merge(mask_utils.frPyObjects(segmentation, image["height"], image["width"]))
        elif isinstance(segmentation.get("counts"), list):
            segmentation = mask_utils.frPyObjects(segmentation, image["height"], image["width"])
        mask = mask_utils.decode(segmentation).astype(bool)
        voc = COCO_TO_VOC.get(names[annotation["category_id"]])
        stuff = annotation["category_id"] > THING_MAX_ID
        truth[mask] = 0 if stuff else classes.index(voc) if voc else IGNORE
    return truth


def miou_from_confusion(confusion: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Mean IoU over the classes present in the truth or the prediction; per-class IoU beside it."""
    tp = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return {"miou": round(float(np.nanmean(iou)), 4),
            "pixel_accuracy": round(float(tp.sum() / max(confusion.sum(), 1)), 4),
            "per_class": {classes[i]: round(float(iou[i]), 3) for i in np.flatnonzero(present)}}


# ---------------------------------------------------------------------------- flow


def _tensor(image: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0


def flow_quality(pairs: int = 12, iterations: tuple[int, ...] = (6, 12, 20)) -> dict[str, Any]:
    import torch

    from blinkflow.models.metrics_flow import read_flo

    model, _ = load_shipped("flow", "raft_large")
    first, second = (_tensor(_image(DATA / "flow" / f"00001_img{i}.ppm")) for i in (1, 2))
    truth = torch.from_numpy(read_flo(DATA / "flow" / "00001_flow.flo")).permute(2, 0, 1)[None]
    epe = {}
    with torch.inference_mode():
        for count in iterations:
            model.num_flow_updates = count
            epe[count] = round(float((model(first, second) - truth).norm(dim=1).mean()), 3)
        model.num_flow_updates = 12
        warp = warp_errors(model, bikes_pairs(pairs))
    return {"epe": epe, "epe_zero_flow": round(float(truth.norm(dim=1).mean()), 3), **warp}


def bikes_pairs(count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Consecutive frames from bikes.mp4 (evenly spread pairs), at the source's 640x272."""
    from blinkflow.config import SourceConfig
    from blinkflow.sources import decode_file

    cfg = SourceConfig(type="file", path=str(DATA / "video" / "bikes.mp4"))
    frames = [f.image for f in decode_file(DATA / "video" / "bikes.mp4", "bikes", cfg)]
    starts = range(0, len(frames) - 1, max(1, (len(frames) - 1) // count))
    return [(frames[i], frames[i + 1]) for i in list(starts)[:count]]


def warp_errors(model: Any, pairs: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Mean absolute gray-level error of frame 2 warped back along the flow onto frame 1, against zero flow."""
    import torch
    import torch.nn.functional as F

    flow_err, zero_err = [], []
    for a, b in pairs:
        first, second = _tensor(a), _tensor(b)
        flow = model(first, second)
        height, width = first.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        gx = (xs + flow[0, 0]) / (width - 1) * 2 - 1
        gy = (ys + flow[0, 1]) / (height - 1) * 2 - 1
        inside = (gx.abs() <= 1) & (gy.abs() <= 1)
        warped = F.grid_sample(second, torch.stack([gx, gy], -1)[None], align_corners=True)
        flow_err.append(float(((warped - first).abs().mean(1)[0] * 255)[inside].mean()))
        zero_err.append(float(((second - first).abs().mean(1)[0] * 255)[inside].mean()))
    return {"warp_error": round(float(np.mean(flow_err)), 2), "warp_error_zero_flow": round(float(np.mean(zero_err)), 2),
            "pairs": len(pairs)}


# ---------------------------------------------------------------------------- action


def action_quality(frames: int = 64) -> dict[str, Any]:
    import torch

    model, spec = load_shipped("action", "i3d")
    out = {}
    for name, clip in (("arm_wrestling.mp4", video_clip(DATA / "video" / "arm_wrestling.mp4", frames)),
                       ("cricket_rgb.gif", gif_clip(DATA / "originals" / "cricket_rgb.gif", frames))):
        with torch.inference_mode():
            probs = model(clip).softmax(-1)[0]
        top = probs.topk(3)
        out[name] = [f"{spec.classes[i]} {p:.4f}" for p, i in zip(top.values.tolist(), top.indices.tolist())]
    return {"frames": frames, **out}


def _centre_crop(images: list[np.ndarray], size: int = 224) -> Any:
    import torch
    import torch.nn.functional as F

    clip = torch.from_numpy(np.stack(images)).permute(3, 0, 1, 2).float() / 255.0  # C, T, H, W
    height, width = clip.shape[-2:]
    scale = size / min(height, width)
    clip = F.interpolate(clip, size=(round(height * scale), round(width * scale)), mode="bilinear", align_corners=False)
    top, left = (clip.shape[-2] - size) // 2, (clip.shape[-1] - size) // 2
    return clip[..., top:top + size, left:left + size][None]


def video_clip(path: Path, frames: int) -> Any:
    from blinkflow.config import SourceConfig
    from blinkflow.sources import decode_file

    cfg = SourceConfig(type="file", path=str(path))
    images = [f.image for f in decode_file(path, "clip", cfg)]
    start = max(0, (len(images) - frames) // 2)
    return _centre_crop(images[start:start + frames])


def gif_clip(path: Path, frames: int) -> Any:
    from PIL import Image, ImageSequence

    with Image.open(path) as gif:
        images = [np.array(f.convert("RGB")) for f in ImageSequence.Iterator(gif)]
    return _centre_crop(images[:frames])


# ---------------------------------------------------------------------------- report


def render(results: dict[str, Any], info: dict[str, Any]) -> str:
    d, s, f, a = results["detect"], results["segment"], results["flow"], results["action"]
    epe = ", ".join(f"{k} it: **{v}**" for k, v in f["epe"].items())
    rows = [
        ["detect", "yolox_nano", f"COCO sample ({d['annotations']} annotations): mAP@0.5 **{d['map50']}**, "
                                 f"mAP@[.5:.95] **{d['map']}**; dog.jpg: {', '.join(d['dog'])}"],
        ["segment", "deeplabv3_mobilenet_v2", f"COCO sample mapped to VOC: mIoU **{s['miou']}**, pixel accuracy "
                                              f"{s['pixel_accuracy']} (per class: "
                                              + ", ".join(f"{k} {v}" for k, v in s["per_class"].items()) + ")"],
        ["flow", "raft_large", f"EPE on the .flo pair {epe} (zero flow {f['epe_zero_flow']}); bikes.mp4 warp error "
                               f"**{f['warp_error']}** gray levels vs {f['warp_error_zero_flow']} for zero flow "
                               f"({f['pairs']} pairs)"],
        ["action", "i3d", f"{a['frames']} frames, 224x224: arm_wrestling.mp4 → {'; '.join(a['arm_wrestling.mp4'])}; "
                          f"cricket_rgb.gif → {'; '.join(a['cricket_rgb.gif'])}"],
    ]
    return (f"Measured by `blinkflow bench models` in {results['seconds']} s. {machine_line(info)}\n\n"
            + markdown_table(["stage", "backend", "quality on real data (truth: the files' own annotations)"], rows))
