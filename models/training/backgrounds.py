"""Real photographs behind synthetic objects: hard negatives with exact labels.

Procedural backgrounds are smooth (gradients, soft patterns), so models trained
only on them have never seen the sharp, cluttered texture of real footage and
call parts of it objects: on the static real clip of ``bench skip``
(``tree.avi``) the procedural-only segmenter painted six classes into every
frame and the detector found 19 boxes, none of them there, and both flickered
between near-identical frames. A split's ``backgrounds`` lists real images or videos;
for a share of its clips (``real_fraction``, chosen by clip seed) a random
crop of one of their frames, flipped and recoloured, replaces the procedural
background. The objects, their motion and their labels are those of the seed's
procedural clip, so ground truth stays exact and the real pixels are, by
construction, background: hard negatives, as in the detection notes of the
seed lecture, without a labelled real dataset.

``clutter_fraction`` of the clips get a procedural clutter background instead
(:func:`dead_leaves`): flat ellipses of every size over each other, like
foliage, which the three real files in ``tests/data`` do not show and on
which the detector still found boxes.

The real background stays still (a static camera), so its flow is zero and
the clip's flow ground truth stays exact too. Everything is a function of the
clip seed and the files, so a split is reproducible.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

import numpy as np

from blinkflow.models.training.config import SplitConfig, resolved_backgrounds
from blinkflow.errors import BlinkflowError
from blinkflow.models.training.media import IMAGE_SUFFIXES, VIDEO_SUFFIXES, DatasetError, read_image, read_video_frames

log = logging.getLogger(__name__)

#: a video contributes every this-many-th frame (neighbours are near-duplicates)
VIDEO_FRAME_STEP = 4
#: at most this many frames per video, so one long file cannot dominate the pool
MAX_FRAMES_PER_VIDEO = 120
#: a crop covers this share of the largest crop of the target aspect that fits (uniform)
CROP_SCALE = (0.35, 1.0)
#: salt mixed into the clip seed: the background draw never shifts the scene's own random numbers
_SALT = 0x6B67


class BackgroundError(BlinkflowError):
    """A background file that cannot be used; the message names it and the fix."""


def _iter_files(paths: list[str]) -> list[Path]:
    """Files of ``paths`` (a folder contributes its images and videos, sorted)."""
    usable = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    files: list[Path] = []
    for value in paths:
        path = Path(value)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in usable)
            if not found:
                raise BackgroundError(f"{path}: no images or videos in the folder; add some or drop it from backgrounds")
            files += found
        elif path.suffix.lower() in usable:
            files.append(path)
        else:
            raise BackgroundError(f"{path}: not an image or video ({', '.join(usable)}); list images, videos or folders")
    return files


def _video_frames(path: Path) -> list[np.ndarray]:
    try:
        return read_video_frames(path, VIDEO_FRAME_STEP * MAX_FRAMES_PER_VIDEO, VIDEO_FRAME_STEP)
    except BlinkflowError as exc:
        raise BackgroundError(str(exc)) from None


def _file_frames(path: Path) -> list[np.ndarray]:
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = _video_frames(path)
    else:
        try:
            frames = [read_image(path)]
        except DatasetError as exc:
            raise BackgroundError(str(exc)) from None
    if not frames:
        raise BackgroundError(f"{path}: no frames decoded; replace the file or drop it from backgrounds")
    return frames


@functools.lru_cache(maxsize=4)
def background_pool(paths: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    """Every usable frame of ``paths`` (uint8 RGB at its own size); decoded once per process."""
    frames: list[np.ndarray] = []
    for path in _iter_files(list(paths)):
        frames += _file_frames(path)
    log.info("background pool: %d frames from %d path(s)", len(frames), len(paths))
    return tuple(frames)


def _clip_draw(seed: int) -> float:
    """Clip ``seed``'s uniform draw that picks its kind of background."""
    return float(np.random.default_rng([seed, _SALT, 0]).random())


def uses_real_background(seed: int, fraction: float) -> bool:
    """Whether clip ``seed`` of a split with ``real_fraction`` gets a real background."""
    return fraction > 0 and _clip_draw(seed) < fraction


def uses_clutter(seed: int, real_fraction: float, clutter_fraction: float) -> bool:
    """Whether clip ``seed`` gets a clutter background: the next ``clutter_fraction`` of the draw after the
    real backgrounds' share (0 when the split has no real backgrounds), so the two never overlap."""
    return clutter_fraction > 0 and real_fraction <= _clip_draw(seed) < real_fraction + clutter_fraction


def clip_background(seed: int, split: SplitConfig, width: int, height: int) -> np.ndarray | None:
    """Clip ``seed``'s background under ``split``: a real one, clutter, or None for the procedural one."""
    if uses_real_background(seed, split.real_share):
        return draw_background(background_pool(resolved_backgrounds(split)), seed, width, height)
    if uses_clutter(seed, split.real_share, split.clutter_fraction):
        return dead_leaves(seed, width, height)
    return None


def dead_leaves(seed: int, width: int, height: int) -> np.ndarray:
    """A procedural clutter background (float32 RGB): the "dead leaves" model of natural images, flat
    ellipses of one hue family, sizes drawn from a power law (r^-3, so every scale is equally covered),
    painted over each other until the frame is covered about 2.5 times. Foliage, gravel and crowds
    look like it, and the synthetic-trained detector found boxes in it."""
    rng = np.random.default_rng([seed, _SALT, 2])
    base = rng.uniform(30, 220, 3)
    spread = rng.uniform(10, 60)
    r_min, r_max = rng.uniform(2.0, 3.5), rng.uniform(8.0, 16.0)  # below the smallest shape's radius (19 px)
    leaf_area = math.pi * r_min**2 * 2 * math.log(r_max / r_min) / (1 - (r_min / r_max) ** 2) * 0.675  # mean aspect
    count = int(2.5 * width * height / leaf_area)
    radii = r_min / np.sqrt(1 - rng.random(count) * (1 - (r_min / r_max) ** 2))  # inverse CDF of r^-3
    centres = rng.uniform((-r_max, -r_max), (width + r_max, height + r_max), (count, 2))
    aspects, angles = rng.uniform(0.35, 1.0, count), rng.uniform(0, math.pi, count)
    colours = np.clip(base * rng.uniform(0.45, 1.35, (count, 1)) + rng.normal(0, spread, (count, 3)), 0, 255)
    image = np.empty((height, width, 3), np.float32)
    image[:] = base
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    for (cx, cy), radius, aspect, angle, colour in zip(centres, radii, aspects, angles, colours):
        x0, x1 = max(0, int(cx - radius)), min(width, int(cx + radius) + 2)
        y0, y1 = max(0, int(cy - radius)), min(height, int(cy + radius) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        dx, dy = xs[None, x0:x1] - cx, ys[y0:y1, None] - cy
        c, s = math.cos(angle), math.sin(angle)
        inside = ((dx * c + dy * s) / radius) ** 2 + ((dy * c - dx * s) / (radius * aspect)) ** 2 <= 1
        image[y0:y1, x0:x1][inside] = colour
    return image


def draw_background(pool: tuple[np.ndarray, ...], seed: int, width: int, height: int) -> np.ndarray:
    """Clip ``seed``'s background: a random crop of a random pool frame, at the target aspect, resized to
    ``height x width``, maybe mirrored, with a random colour gain (float32 RGB in [0, 255])."""
    rng = np.random.default_rng([seed, _SALT, 1])
    frame = pool[int(rng.integers(len(pool)))]
    crop = _random_crop(frame, rng, width / height)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = _resized(crop, width, height)
    gain = rng.uniform(0.7, 1.3) * rng.uniform(0.85, 1.15, 3)  # brightness, then a colour cast
    if rng.random() < 0.15:
        image = image.mean(axis=2, keepdims=True).repeat(3, axis=2)  # now and then a grey camera
    return np.clip(image * gain.astype(np.float32), 0, 255).astype(np.float32)


def _random_crop(frame: np.ndarray, rng: np.random.Generator, aspect: float) -> np.ndarray:
    height, width = frame.shape[:2]
    full_w = min(width, height * aspect)  # the largest crop of the target aspect that fits
    scale = rng.uniform(*CROP_SCALE)
    crop_w = max(2, round(full_w * scale))
    crop_h = max(2, min(height, round(crop_w / aspect)))
    y0 = int(rng.integers(height - crop_h + 1))
    x0 = int(rng.integers(width - crop_w + 1))
    return frame[y0 : y0 + crop_h, x0 : x0 + crop_w]


def _resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].permute(1, 2, 0).numpy()
