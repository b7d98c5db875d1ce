"""Re-identification by metric learning: losses, identity crops, retrieval metrics and the ``reid`` task.

Losses (both on L2-normalised embeddings, labels = identity per row; ``reid.loss`` picks one):

* :func:`batch_hard_triplet`: the triplet loss with batch-hard mining (Hermans et al. 2017, "In
  defense of the triplet loss"): each anchor's *farthest* positive and *nearest* negative in the
  batch, ``relu(d(a, p) - d(a, n) + margin)``, Euclidean distances, averaged over anchors;
* :func:`nt_xent`: the normalised-temperature cross-entropy of SimCLR (Chen et al. 2020): cosine
  similarities over a temperature, each row's positives against every other row of the batch. With
  two crops per identity it is exactly SimCLR's NT-Xent; with more, each positive is one term
  (the supervised-contrastive form of Khosla et al. 2020, which reduces to it).

Data: P identities x K crops per batch. An identity is one object of one synthetic clip
(:class:`models.training.scenes.SceneGenerator`: the same instance over frames, partly covered by
the others at times, under the clip's changing light); its crops are cut by its ground-truth
(visible) box at ``samples_per_clip`` frames ``frame_step`` apart. A dataset item is one identity
with all its crops; ``collate`` draws K of them and augments (brightness, contrast, flips).

Metrics: every held-out crop queries all the others (cosine similarity): top-1 (its nearest is the
same identity) and mAP; the same for an untrained net of the same seed, as the baseline.
The task itself (``ReidTask``) is in models/training/tasks.py with the other stages'.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from blinkflow.models.training.config import TrainConfig

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n, n); the epsilon keeps sqrt's gradient finite on the diagonal."""
    squared = (embeddings[:, None, :] - embeddings[None, :, :]).pow(2).sum(-1)
    return (squared + 1e-12).sqrt()


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Mean over anchors of relu(hardest positive distance - hardest negative distance + margin).

    Anchors without a positive or without a negative in the batch are left out (0 if none is left).
    """
    dist = pairwise_distances(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positive, negative = same & ~eye, ~same
    hardest_positive = torch.where(positive, dist, torch.zeros_like(dist)).amax(dim=1)
    hardest_negative = torch.where(negative, dist, torch.full_like(dist, float("inf"))).amin(dim=1)
    valid = positive.any(dim=1) & negative.any(dim=1)
    if not valid.any():
        return embeddings.sum() * 0.0
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent: -log softmax of each positive pair's similarity / temperature over the row's other entries.

    ``embeddings`` are L2-normalised here (cosine similarity); the mean is over all (anchor, positive) pairs.
    """
    z = F.normalize(embeddings, dim=1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    logits = logits.masked_fill(eye, float("-inf"))  # a row never competes with itself
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    if not positive.any():
        return embeddings.sum() * 0.0
    return -log_prob[positive].mean()


LOSSES = {"triplet": batch_hard_triplet, "ntxent": nt_xent}


def reid_loss(cfg: TrainConfig, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if cfg.reid.loss == "triplet":
        return batch_hard_triplet(embeddings, labels, cfg.reid.margin)
    return nt_xent(embeddings, labels, cfg.reid.temperature)


# --------------------------------------------------------------------------- retrieval metrics


def retrieval_scores(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Each row queries all the others by cosine similarity: top-1 accuracy and mAP (rows with a positive)."""
    z = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sim = z @ z.T
    np.fill_diagonal(sim, -np.inf)
    top1, precisions = [], []
    for i in range(len(z)):
        others = np.arange(len(z)) != i
        relevant = (labels == labels[i]) & others
        if not relevant.any():
            continue
        order = np.argsort(-sim[i][others], kind="stable")
        hits = relevant[others][order]
        top1.append(float(hits[0]))
        ranks = np.flatnonzero(hits) + 1
        precisions.append(float(np.mean(np.arange(1, len(ranks) + 1) / ranks)))
    return {"top1": float(np.mean(top1)) if top1 else 0.0, "map": float(np.mean(precisions)) if precisions else 0.0,
            "queries": len(top1)}


# --------------------------------------------------------------------------- data


class IdentityCrops(Dataset):
    """One item per identity: all its crops, (M, 3, h, w) uint8, and its object (``group``): identities of one
    object (windows of one real track) share it, so they are positives of each other, never negatives."""

    def __init__(self, crops: list[torch.Tensor], groups: list[str] | None = None) -> None:
        self.crops = crops
        self.groups = groups if groups is not None else [f"synthetic#{i}" for i in range(len(crops))]

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"crops": self.crops[i], "identity": i, "group": self.groups[i]}

    def extended(self, more: list[tuple[torch.Tensor, str]]) -> "IdentityCrops":
        return IdentityCrops(self.crops + [c for c, _ in more], self.groups + [g for _, g in more])


def synthetic_identities(cfg: TrainConfig, split: Any, size: tuple[int, int]) -> IdentityCrops:
    """The objects of the split's clips, each an identity with its crops over the sampled frames."""
    from blinkflow.models.reid import crops_to_batch
    from blinkflow.models.training import datasets as ds

    data, identities = cfg.data, []
    for seed in ds._progress(ds.scene_seeds(split), "render reid", split.clips):
        scene = ds._scene(seed, data)
        per_instance: dict[int, list[torch.Tensor]] = {}
        for t in ds.sample_times(split):
            frame = scene.render(t)
            keep = [k for k, box in enumerate(frame.boxes) if min(box[2] - box[0], box[3] - box[1]) >= cfg.reid.min_box]
            if not keep:
                continue
            crops = crops_to_batch(frame.image, frame.boxes[keep], size).mul_(255).round_().to(torch.uint8)
            for k, crop in zip(keep, crops):
                per_instance.setdefault(int(frame.instance_ids[k]), []).append(crop)
        identities += [torch.stack(c) for c in per_instance.values() if len(c) >= 2]
    if not identities:
        raise ValueError("no identity has two crops; raise samples_per_clip or lower reid.min_box")
    return IdentityCrops(identities)


def real_identities(cfg: TrainConfig, size: tuple[int, int], held_out: bool) -> list[tuple[torch.Tensor, str]]:
    """Identities of real appearance: (crops (M, 3, h, w) uint8, track name) per window of ``reid.real_window``
    frames of each confirmed track in ``reid.real_clips``, from the training part of each clip's frames or from
    its held-out tail (``reid.real_holdout``). Windows of one track share the track name (the same object)."""
    windows = []
    for clip in cfg.reid.real_clips:
        tracked = _tracked_clip(clip, cfg.reid.real_detector)
        cut = round(len(tracked) * (1.0 - cfg.reid.real_holdout))
        per_window: dict[tuple[int, int], list[torch.Tensor]] = {}
        for index, image, boxes, ids in tracked[cut:] if held_out else tracked[:cut]:
            if index % cfg.reid.real_step:
                continue
            keep = [k for k, (box, tid) in enumerate(zip(boxes, ids))
                    if tid is not None and min(box[2] - box[0], box[3] - box[1]) >= cfg.reid.min_box]
            if not keep:
                continue
            from blinkflow.models.reid import crops_to_batch

            crops = crops_to_batch(image, np.asarray(boxes)[keep], size).mul_(255).round_().to(torch.uint8)
            for k, crop in zip(keep, crops):
                per_window.setdefault((ids[k], index // cfg.reid.real_window), []).append(crop)
        windows += [(torch.stack(c), f"{clip}#{tid}") for (tid, _), c in sorted(per_window.items()) if len(c) >= 2]
    log.info("%d real identity windows (%s)", len(windows), "held out" if held_out else "training")
    return windows


_TRACKED: dict[tuple[str, str], list] = {}


def _tracked_clip(clip: str, detector_config: str) -> list[tuple[int, np.ndarray, list, list]]:
    """(index, image, boxes, track ids) of every frame of ``clip``: the config's detect stage, then the track stage
    with its defaults (IoU only), run here frame by frame. Cached per process (train and held-out sets share it)."""
    key = (clip, detector_config)
    if key not in _TRACKED:
        from blinkflow.config import StageConfig, load_config
        from blinkflow.frame import Frame
        from blinkflow.models.training.media import read_video_frames
        from blinkflow.registry import stages
        from blinkflow.schema import resolve_path
        from blinkflow.stages.track import TrackStage

        repo = Path(__file__).resolve().parents[2]
        pipeline = load_config(resolve_path(detector_config, repo))
        detect = stages.get("detect")(pipeline.stages["detect"])
        track = TrackStage(StageConfig())
        detect.setup("cpu")
        track.setup("cpu")
        out = []
        for index, image in enumerate(read_video_frames(resolve_path(clip, repo), max_frames=10**6)):
            frame = Frame("clip", index, index / 25.0, image)
            detect.process([frame])
            track.process([frame])
            result = frame.results.get("detect") or {}
            out.append((index, image, result.get("boxes", []), result.get("track_ids", [])))
        detect.teardown()
        track.teardown()
        _TRACKED[key] = out
    return _TRACKED[key]


def augment(images: torch.Tensor) -> torch.Tensor:
    """Lighting (per-crop brightness and contrast) and horizontal flips, from torch's global RNG."""
    n = len(images)
    gain = 1.0 + 0.3 * (torch.rand(n, 1, 1, 1) * 2 - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    contrast = 1.0 + 0.2 * (torch.rand(n, 1, 1, 1) * 2 - 1)
    images = ((images - mean) * contrast + mean) * gain
    flip = torch.rand(n) < 0.5
    images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return images.clamp_(0.0, 1.0)


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def retrieval(model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    embeddings, labels = [], []
    for images, batch_labels in loader:
        embeddings.append(model(images.to(device)).float().cpu())
        labels.append(batch_labels)
    return retrieval_scores(torch.cat(embeddings).numpy(), torch.cat(labels).numpy())
