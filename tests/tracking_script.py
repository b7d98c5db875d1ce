"""The scripted clip of tests/test_tracking_events.py: three objects whose every box is known, and the
frames drawn from them (tests/scripted_stage.py is the detector that outputs these boxes)."""

from __future__ import annotations

from typing import Any

import numpy as np

WIDTH, HEIGHT, FRAMES = 320, 240, 60


# --------------------------------------------------------------------------- the script


def car_box(t: int) -> list[float] | None:
    """Drives left to right through the 'gate' line (x = 160); hidden at frames 40..42 (an occlusion)."""
    if 40 <= t <= 42:
        return None
    x = 10 + 4.5 * t
    return [x, 60.0, x + 30, 80.0]


def car_score(t: int) -> float:
    return 0.3 if 30 <= t <= 33 else 0.9  # a low-score stretch: only ByteTrack's second association keeps it


def person_box(t: int) -> list[float] | None:
    """Walks down from frame 10, through the 'road' line (y = 100) and into the 'yard' zone; gone from frame 50."""
    if not 10 <= t < 50:
        return None
    y = (t - 10) * 4.5
    return [230.0, y, 250.0, y + 40]


def parked_box(t: int) -> list[float]:
    """Parked on the 'gate' line, its bottom centre jittering +-2 px across it: never a crossing."""
    dx = 2.0 if t % 2 else -2.0
    return [145.0 + dx, 170.0, 175.0 + dx, 200.0]


OBJECTS = {  # name: (class, box(t), score(t), colour)
    "car": ("car", car_box, car_score, (255, 60, 60)),
    "person": ("person", person_box, lambda t: 0.95, (60, 255, 60)),
    "parked": ("car", parked_box, lambda t: 0.8, (60, 60, 255)),
}


def scripted_detections(t: int) -> dict[str, Any]:
    boxes, scores, classes = [], [], []
    for cls, box_of, score_of, _ in OBJECTS.values():
        box = box_of(t)
        if box is not None:
            boxes.append(box)
            scores.append(score_of(t))
            classes.append(cls)
    return {"boxes": boxes, "scores": scores, "classes": classes, "labels": [1] * len(boxes)}


def draw(t: int) -> np.ndarray:
    image = np.full((HEIGHT, WIDTH, 3), 20, dtype=np.uint8)
    for _, box_of, _, colour in OBJECTS.values():
        box = box_of(t)
        if box is not None:
            x1, y1, x2, y2 = (round(v) for v in box)
            image[max(0, y1):max(0, y2), max(0, x1):max(0, x2)] = colour
    return image
