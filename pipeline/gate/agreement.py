"""Agreement measures: how well a carried-over result matches a fresh one (the stages' ``agreement``
uses them; the driver scores audit frames with them)."""

from __future__ import annotations

from typing import Any

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (N, 4) and (M, 4) numpy boxes in x1, y1, x2, y2: ``torchvision.ops.box_iou``, with 0 where
    two boxes have no area between them (torchvision gives 0/0 there)."""
    import torch
    from torchvision.ops import box_iou as torch_box_iou

    a, b = np.asarray(a, dtype=np.float64).reshape(-1, 4), np.asarray(b, dtype=np.float64).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    return np.nan_to_num(torch_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy(), nan=0.0)


def box_f1(carried: dict[str, Any], fresh: dict[str, Any], iou_threshold: float = 0.5,
           ignore_below: float | None = None) -> float:
    """F1 of carried boxes against fresh ones: greedy one-to-one matching, same label, IoU >= threshold.

    Two empty results agree perfectly (1.0); fresh boxes are matched best-score first. With
    ``ignore_below``, an unmatched box of either side scoring below it counts neither way (it may still
    match): a box held by the detector's score hysteresis exists or not depending on which earlier frames
    the detector saw, not on these pixels.
    """
    a, b = _box_array(carried), _box_array(fresh)
    if ignore_below is not None:
        sa = np.asarray(carried.get("scores") or [1.0] * len(a), dtype=np.float64)
        sb = np.asarray(fresh.get("scores") or [1.0] * len(b), dtype=np.float64)
        matches, used_a, used_b = _greedy_matches(carried, fresh, a, b, iou_threshold)
        missed = int(((~used_a) & (sa >= ignore_below)).sum() + ((~used_b) & (sb >= ignore_below)).sum())
        return 1.0 if matches == 0 and missed == 0 else 2.0 * matches / (2.0 * matches + missed)
    if len(a) == 0 and len(b) == 0:
        return 1.0
    if len(a) == 0 or len(b) == 0:
        return 0.0
    matches, _, _ = _greedy_matches(carried, fresh, a, b, iou_threshold)
    return 2.0 * matches / (len(a) + len(b))


def unmatched_boxes(carried: dict[str, Any], fresh: dict[str, Any], iou_threshold: float = 0.5) -> list[list[float]]:
    """The boxes of either side that ``box_f1`` leaves unmatched: where the two results disagree."""
    a, b = _box_array(carried), _box_array(fresh)
    _, used_a, used_b = _greedy_matches(carried, fresh, a, b, iou_threshold)
    return [*a[~used_a].tolist(), *b[~used_b].tolist()]


def _box_array(result: dict[str, Any]) -> np.ndarray:
    """A detect-style result's boxes as an (N, 4) float array."""
    return np.asarray(result.get("boxes") or [], dtype=np.float64).reshape(-1, 4)


def _greedy_matches(carried: dict[str, Any], fresh: dict[str, Any], a: np.ndarray, b: np.ndarray,
                    iou_threshold: float) -> tuple[int, np.ndarray, np.ndarray]:
    """Matches of ``box_f1`` and which boxes of each side were matched."""
    used, used_b = np.zeros(len(a), dtype=bool), np.zeros(len(b), dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return 0, used, used_b
    la, lb = list(carried.get("labels") or [0] * len(a)), list(fresh.get("labels") or [0] * len(b))
    iou = box_iou(a, b)
    iou[np.asarray(la)[:, None] != np.asarray(lb)[None, :]] = 0.0
    matches = 0
    for j in range(len(b)):  # fresh results are sorted best first
        candidates = np.where(~used & (iou[:, j] >= iou_threshold), iou[:, j], -1.0)
        i = int(np.argmax(candidates))
        if candidates[i] >= iou_threshold:
            used[i] = used_b[j] = True
            matches += 1
    return matches, used, used_b


def mask_miou(carried: np.ndarray, fresh: np.ndarray) -> float:
    """Mean IoU over the classes present in either class map (1.0 for identical maps)."""
    if carried.shape != fresh.shape:
        return 0.0
    num = int(max(carried.max(initial=0), fresh.max(initial=0))) + 1
    joint = np.bincount(carried.ravel().astype(np.int64) * num + fresh.ravel(), minlength=num * num).reshape(num, num)
    inter = np.diag(joint).astype(np.float64)
    union = joint.sum(0) + joint.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 1.0


#: an adapted reuse bound grows only while its span keeps this share of the agreement budget (1 - target); the
#: rest is left to what the linear drift model does not see (a box born between two runs, mask flicker)
BOUND_SHARE = 0.75
#: an adapted reuse bound grows to at most this many times the configured one. Drift is smooth; a new object
#: is not, and a detector refreshed every 30 frames would miss it for 30
BOUND_GROWTH = 2
#: refresh bounds that may grow further. A small new object, under the carry band (carry_until), is seen by the
#: segmenter on the partial frame it changes and by the detector only at its refresh, so only the masks' bound
#: can grow without making new boxes later (4: the real clips' still stretches, docs/skipping.md)
REFRESH_GROWTH = {"segment": 4}


def span_meets(score: float, staleness: int, span: int, target: float, share: float = 1.0) -> bool:
    """Whether a span of ``span`` reused frames after a fresh one agrees with ``target`` on average, given an
    audit that scored results ``staleness`` frames old at ``score``.

    Drift below what the gate sees adds up about linearly, so reuse loses ``(1 - score) / staleness`` a frame
    and the span (the fresh frame and ``span`` reused ones) ``rate * span / 2`` on average; it may spend
    ``share`` of the budget ``1 - target``."""
    rate = (1.0 - score) / max(1, staleness)
    return rate * span / 2.0 <= share * (1.0 - target) + 1e-9


def moved_bound(bound: int, top: int, score: float, staleness: int, target: float, share: float = BOUND_SHARE) -> int:
    """A reuse bound moved by one after an audit: up (to at most ``top``) when a span one frame longer would
    still keep ``share`` of the budget on average, down (to at least 1) when the current one does not."""
    if span_meets(score, staleness, bound + 1, target, share):
        return min(top, bound + 1)
    if not span_meets(score, staleness, bound, target, share):
        return max(1, bound - 1)
    return bound
