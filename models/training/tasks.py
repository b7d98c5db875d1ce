"""What differs between the four stages' training: data, batches, loss and evaluation.

Each :class:`Task` knows

* its examples: the training set and the held-out set (synthetic seeds or a real dataset);
* ``collate``: examples to a batch, with the training-only augmentation;
* ``loss``: the model's training loss on a batch (the model is in train mode):
  detect: torchvision's own detection losses (SSD's hard-negative-mined
  classification + smooth-L1 boxes, RetinaNet's focal loss, Faster R-CNN's RPN
  + ROI losses); segment: per-pixel cross-entropy, plus the frame-to-frame
  consistency term when ``consistency.weight > 0``; flow: FlowNet's multi-scale
  end-point error (RAFT: its sequence loss, EPE weighted 0.8^i); action: cross-entropy;
  reid: batch-hard triplet or NT-Xent on crop embeddings (models/training/reid.py);
* ``evaluate``: the metrics on a loader (the model is in eval mode), measured
  where the stage reports: segment and flow at the source resolution.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES
from blinkflow.models.training import datasets as ds
from blinkflow.models.training import metrics, reid
from blinkflow.models.training.config import REID_DATA, TrainConfig

log = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model)


class Task:
    """Shared plumbing; subclasses fill in data, batches, loss and metrics."""

    name = ""
    #: the metric that decides whether a run is good, and whether higher is better
    primary, higher_is_better = "", True
    default_classes: list[str] | None = None

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.input_size = ds.input_size(self.name, cfg.data)

    def train_set(self) -> Any:
        data = self.cfg.data
        return self.real_set(data.train_path, self.init_classes()) if data.train_path else self.synthetic_set(data.train, native=False)

    def init_classes(self) -> list[str] | None:
        """The classes of the ``init`` weights (fine-tuning keeps their head; the data's other categories are
        ignored, with a warning), else None: training data labelled with none of them gets its own classes, on a
        fresh head over the init's trunk."""
        if self.cfg.init is None:
            return None
        from blinkflow.models.weights import resolve_weights

        classes = resolve_weights(self.cfg.init, stage=self.name, model_name=self.cfg.model).classes
        named = self.data_classes(self.cfg.data.train_path) if classes and self.cfg.data.train_path else None
        if named and not set(named) & set(classes[1:]):
            log.info("%s: none of its categories (%s) are classes of the init %s; training a fresh head for its %d",
                     self.cfg.data.train_path, ", ".join(named[:5]), self.cfg.init, len(named))
            return None
        return classes

    def data_classes(self, path: str) -> list[str] | None:
        """The class names a real dataset's examples are labelled with (None: the format does not say them up
        front)."""
        return None

    def eval_set(self, path: str | None = None, classes: list[str] | None = None) -> Any:
        """The held-out set: ``path`` (a real dataset), else ``data.val_path``, else the synthetic val split."""
        path = path or self.cfg.data.val_path
        return self.real_set(path, classes) if path else self.synthetic_set(self.cfg.data.val, native=True)

    def build_model(self, classes: list[str] | None) -> torch.nn.Module:
        from blinkflow.models.registry import build_model

        return build_model(self.cfg.model, task=self.name, num_classes=len(classes), **self.cfg.model_args)

    def synthetic_set(self, split: Any, native: bool) -> Any:
        raise NotImplementedError

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        raise NotImplementedError

    def collate(self, items: list[dict], train: bool = False) -> Any:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        raise NotImplementedError


def _images(items: list[dict], key: str) -> torch.Tensor:
    return torch.stack([item[key] for item in items]).float().div_(255.0)


def _hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


class DetectTask(Task):
    name, primary = "detect", "map50"
    default_classes = SYNTHETIC_CLASSES

    def synthetic_set(self, split: Any, native: bool) -> Any:
        return ds.synthetic_detection(self.cfg.data, split)

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        return ds.coco_detection(ds.read_coco(path), classes)

    def data_classes(self, path: str) -> list[str] | None:
        return ds.annotated_categories(ds.read_coco(path))

    def collate(self, items: list[dict], train: bool = False) -> Any:
        """Source-size images and their targets; the detector resizes both itself, as at inference."""
        images = [item["image"].float().div_(255.0) for item in items]
        targets = [dict(item["target"]) for item in items]
        if train and self.cfg.data.flip:
            for i, flip in enumerate(torch.rand(len(items)) < 0.5):
                if flip:
                    images[i] = images[i].flip(-1)
                    targets[i]["boxes"] = _hflip_boxes(targets[i]["boxes"], images[i].shape[-1])
        return images, targets

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, targets = batch
        return [i.to(device) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        images, targets = batch
        return sum(model(images, targets).values())

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        predictions, targets = [], []
        for batch in loader:
            images, batch_targets = self.to_device(batch, device)
            outputs = model(images)
            predictions += [{k: v.cpu().numpy() for k, v in o.items()} for o in outputs]
            targets += [{k: v.cpu().numpy() for k, v in t.items()} for t in batch_targets]
        return metrics.box_map(predictions, targets, num_classes=len(loader.dataset.classes))


class SegmentTask(Task):
    name, primary = "segment", "miou"
    default_classes = SYNTHETIC_CLASSES

    def train_set(self) -> Any:
        data, consistency = self.cfg.data, self.cfg.consistency
        if data.train_path or consistency.weight == 0:
            return super().train_set()
        return ds.synthetic_segmentation(data, data.train, self.input_size, native=False, pair_gap=consistency.gap)

    def synthetic_set(self, split: Any, native: bool) -> Any:
        return ds.synthetic_segmentation(self.cfg.data, split, self.input_size, native)

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        return ds.coco_segmentation(ds.read_coco(path), self.input_size, classes)

    def data_classes(self, path: str) -> list[str] | None:
        return ds.annotated_categories(ds.read_coco(path))

    def collate(self, items: list[dict], train: bool = False) -> Any:
        """(images, labels, natives, paired). Paired batches hold the N samples, then their N partners."""
        paired = "pair_image" in items[0]
        images = _images(items, "image")
        labels = torch.stack([item["label"] for item in items]).long()
        if paired:
            images = torch.cat([images, _images(items, "pair_image")])
            labels = torch.cat([labels, torch.stack([item["pair_label"] for item in items]).long()])
        natives = [item["native"].long() for item in items] if "native" in items[0] else None
        if train:
            images, labels = self._augment(images, labels, groups=2 if paired else 1)
        return images, labels, natives, paired

    def _augment(self, images: torch.Tensor, labels: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """A random crop (the same scale as the full input: the net is fully convolutional) and flips.
        ``groups``: the batch is that many equal parts whose i-th samples are flipped alike (a pair stays aligned)."""
        if self.cfg.data.crop is not None:
            crop_h, crop_w = (min(c, s) for c, s in zip(self.cfg.data.crop, images.shape[-2:]))
            top = int(torch.randint(images.shape[-2] - crop_h + 1, ()))
            left = int(torch.randint(images.shape[-1] - crop_w + 1, ()))
            images = images[..., top : top + crop_h, left : left + crop_w]
            labels = labels[..., top : top + crop_h, left : left + crop_w]
        if self.cfg.data.flip:
            flip = (torch.rand(len(images) // groups) < 0.5).repeat(groups)
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            labels = torch.where(flip.view(-1, 1, 1), labels.flip(-1), labels)
        return images.contiguous(), labels.contiguous()

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, labels, natives, paired = batch
        return images.to(device), labels.to(device), natives, paired

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        images, labels, _, paired = batch
        logits = model(images)["out"]
        loss = F.cross_entropy(logits, labels)
        if paired:
            consistency = self.cfg.consistency
            loss = loss + consistency.weight * pair_disagreement(logits, labels, consistency.hardest, consistency.margin)
        return loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        """Confusion at the source resolution: logits upsampled bilinearly, then argmax (as the stage does)."""
        num_classes = len(loader.dataset.classes)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        for batch in loader:
            images, labels, natives, _ = self.to_device(batch, device)
            logits = model(images)["out"].float()
            for item_logits, label in zip(logits, natives if natives is not None else labels):
                size = tuple(label.shape[-2:])
                if tuple(item_logits.shape[-2:]) != size:
                    item_logits = F.interpolate(item_logits[None], size=size, mode="bilinear", align_corners=False)[0]
                prediction = item_logits.argmax(dim=0).cpu().numpy()
                confusion += metrics.confusion_matrix(prediction, label.cpu().numpy(), num_classes)
        return metrics.segmentation_scores(confusion)


def pair_disagreement(logits: torch.Tensor, labels: torch.Tensor, hardest: float = 1.0, margin: int = 0) -> torch.Tensor:
    """Symmetric KL between the class probabilities of the first and second half of the batch (each sample
    and its partner frame), averaged over the pixels whose true class is the same in both; ``hardest < 1``
    averages only that fraction of them, those where the two frames disagree most.

    Cross-entropy alone lets a net hesitate between two wrong classes and pick a different one on the next,
    nearly identical frame; that flicker is what temporal reuse cannot match (docs/skipping.md). It happens
    on few pixels, so a plain mean over every pixel gives it little weight. Pixels within ``margin`` of a
    class boundary in either frame do not count: an edge that moved changes them legitimately, and asking
    them to agree would blur the edges."""
    first, second = logits.float().log_softmax(dim=1).chunk(2)
    before, after = labels.chunk(2)
    counted = before == after
    if margin > 0:
        counted &= _interior(before, margin) & _interior(after, margin)
    divergence = 0.5 * ((first.exp() - second.exp()) * (first - second)).sum(dim=1)[counted]
    if hardest < 1.0 and divergence.numel():
        divergence = divergence.topk(max(1, round(hardest * divergence.numel()))).values
    return divergence.mean() if divergence.numel() else logits.sum() * 0.0


def _interior(labels: torch.Tensor, margin: int) -> torch.Tensor:
    """(N, H, W) True where every pixel within ``margin`` (a square) has the same class."""
    classes = labels.float()[:, None]
    size = 2 * margin + 1
    highest = F.max_pool2d(classes, size, stride=1, padding=margin)
    lowest = -F.max_pool2d(-classes, size, stride=1, padding=margin)
    return (highest == lowest)[:, 0]


class FlowTask(Task):
    name, primary, higher_is_better = "flow", "epe", False

    def build_model(self, classes: list[str] | None) -> torch.nn.Module:
        from blinkflow.models.registry import build_model

        return build_model(self.cfg.model, task=self.name, **self.cfg.model_args)

    def synthetic_set(self, split: Any, native: bool) -> Any:
        return ds.synthetic_flow(self.cfg.data, split, self.input_size, native)

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        return ds.flow_pairs_dataset(ds.find_flow_pairs(path), self.input_size)

    def collate(self, items: list[dict], train: bool = False) -> Any:
        natives = [(item["native_flow"], item["native_valid"]) for item in items] if "native_flow" in items[0] else None
        flow = torch.stack([item["flow"] for item in items])
        return _images(items, "first"), _images(items, "second"), flow, natives

    def to_device(self, batch: Any, device: torch.device) -> Any:
        first, second, flow, natives = batch
        return first.to(device), second.to(device), flow.to(device), natives

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        from blinkflow.models.flownet import RaftFlow, multiscale_epe_loss

        first, second, flow, _ = batch
        predictions = model(first, second)
        if isinstance(unwrap(model), RaftFlow):  # RAFT's sequence loss: later refinements weigh more
            return multiscale_epe_loss(predictions, flow, weights=tuple(0.8**i for i in range(len(predictions))))
        return multiscale_epe_loss(predictions, flow)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        """EPE and Fl-all over the valid pixels at the ground truth's resolution, plus the zero-flow baseline."""
        sums = {"epe": 0.0, "fl_all": 0.0, "epe_zero_flow": 0.0, "epe_model_input": 0.0}
        moving_sums = {"epe_moving": 0.0, "epe_moving_zero_flow": 0.0}
        pixels, moving_pixels, pairs = 0, 0, 0
        for batch in loader:
            first, second, flow, natives = self.to_device(batch, device)
            predicted = model(first, second).float()
            sums["epe_model_input"] += float(torch.linalg.vector_norm(predicted - flow, dim=1).mean(dim=(1, 2)).sum())
            pairs += len(first)
            for item, (true_flow, valid) in zip(predicted, natives or _input_truth(flow)):
                estimate, truth, mask = _at_truth_size(item, true_flow), true_flow.numpy(), valid.numpy()
                count = int(mask.sum())
                if count == 0:
                    continue
                sums["epe"] += metrics.epe(estimate, truth, mask) * count
                sums["fl_all"] += metrics.fl_all(estimate, truth, mask) * count
                sums["epe_zero_flow"] += metrics.epe(np.zeros_like(truth), truth, mask) * count
                pixels += count
                # where things move by a pixel or more: near-static pixels would hide an estimator that predicts ~0
                moving = mask & (np.linalg.norm(truth, axis=-1) >= MOVING_PX)
                count = int(moving.sum())
                if count:
                    moving_sums["epe_moving"] += metrics.epe(estimate, truth, moving) * count
                    moving_sums["epe_moving_zero_flow"] += metrics.epe(np.zeros_like(truth), truth, moving) * count
                    moving_pixels += count
        scores = {key: value / max(pixels, 1) for key, value in sums.items()}
        scores.update({key: value / max(moving_pixels, 1) for key, value in moving_sums.items()})
        scores["moving_fraction"] = moving_pixels / max(pixels, 1)
        scores["epe_model_input"] = sums["epe_model_input"] / max(pairs, 1)
        return scores


#: a pixel "moves" when its true flow is at least this long (EPE on moving pixels)
MOVING_PX = 1.0


def _input_truth(flow: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Without source-size truth, the input-size target with every pixel valid."""
    return [(f.permute(1, 2, 0).cpu(), torch.ones(f.shape[-2:], dtype=torch.bool)) for f in flow]


def _at_truth_size(flow: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(2, h, w) flow in model-input pixels -> (H, W, 2) in the truth's pixels (bilinear, vectors rescaled)."""
    height, width = truth.shape[:2]
    in_h, in_w = flow.shape[-2:]
    if (in_h, in_w) != (height, width):
        flow = F.interpolate(flow[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    scale = torch.tensor([width / in_w, height / in_h], device=flow.device).view(2, 1, 1)
    return (flow * scale).permute(1, 2, 0).cpu().numpy()


class ActionTask(Task):
    name, primary = "action", "top1"
    default_classes = SYNTHETIC_ACTIONS

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__(cfg)
        self.clip_len = ds.clip_len(cfg.data)
        self._mirror: torch.Tensor | None = None  # class -> mirrored class, from the training set's classes

    def train_set(self) -> Any:
        dataset = super().train_set()
        self._mirror = _mirrored_labels(dataset.classes)
        return dataset

    def synthetic_set(self, split: Any, native: bool) -> Any:
        return ds.synthetic_clips(self.cfg.data, split, self.input_size, self.clip_len)

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        return ds.video_tree_dataset(path, self.clip_len, self.input_size, classes)

    def collate(self, items: list[dict], train: bool = False) -> Any:
        clips, labels = _images(items, "clip"), torch.stack([item["label"] for item in items])
        if train and self.cfg.data.flip:
            clips, labels = self._flip(clips, labels)
        return clips, labels

    def _flip(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Random horizontal flips; a mirrored slide-left is a slide-right, so those labels swap."""
        mirror = self._mirror if self._mirror is not None else torch.arange(int(labels.max()) + 1)
        flip = torch.rand(len(clips)) < 0.5
        clips = torch.where(flip.view(-1, 1, 1, 1, 1), clips.flip(-1), clips)
        return clips.contiguous(), torch.where(flip, mirror[labels], labels)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        clips, labels = batch
        return clips.to(device), labels.to(device)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        clips, labels = batch
        return F.cross_entropy(model(clips), labels)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        logits, labels = [], []
        for batch in loader:
            clips, batch_labels = self.to_device(batch, device)
            logits.append(model(clips).float().cpu())
            labels.append(batch_labels.cpu())
        return metrics.topk_accuracy(torch.cat(logits).numpy(), torch.cat(labels).numpy(), ks=(1, 5))


def _mirrored_labels(classes: list[str]) -> torch.Tensor:
    """Class index -> the index of its mirror image (left and right swap in any class name)."""
    index = {name: i for i, name in enumerate(classes)}

    def mirror(name: str) -> str:
        for a, b in (("left", "right"), ("right", "left")):
            if a in name:
                return name.replace(a, b)
        return name

    return torch.tensor([index.get(mirror(name), i) for i, name in enumerate(classes)])


class ReidTask(Task):
    """Metric learning of the track stage's appearance embeddings; losses, identity crops and retrieval
    metrics are in :mod:`models.training.reid`. A dataset item is one identity with all its crops."""

    name, primary = "reid", "map"

    def __init__(self, cfg: TrainConfig) -> None:
        from blinkflow.models.reid import INPUT_SIZE

        self.cfg = cfg  # no stage preset to read: the crop size is the net's own
        size = cfg.data.input_size or INPUT_SIZE
        self.input_size = (int(size[0]), int(size[1]))
        self._baseline: dict[str, float] | None = None

    def build_model(self, classes: list[str] | None) -> torch.nn.Module:
        from blinkflow.models.registry import build_model

        return build_model(self.cfg.model, task=self.name, **self.cfg.model_args)

    def synthetic_set(self, split: Any, native: bool) -> Any:
        identities = reid.synthetic_identities(self.cfg, split, self.input_size)
        if not self.cfg.reid.real_clips or split is not self.cfg.data.train:
            return identities  # the held-out real identities are scored apart (evaluate: real_top1, real_map)
        return identities.extended(reid.real_identities(self.cfg, self.input_size, held_out=False))

    def real_set(self, path: str, classes: list[str] | None) -> Any:
        from blinkflow.errors import ConfigError

        # the config check and run_eval refuse real data first; this names the input should a new caller not
        raise ConfigError(f"{path}: {REID_DATA}; drop it")

    def collate(self, items: list[dict], train: bool = False) -> Any:
        """Training: K random crops of each of the P identities, augmented, labelled by batch position;
        evaluation: every crop, labelled by identity."""
        images, labels, groups = [], [], {}
        for item in items:
            crops = item["crops"]
            if train:
                k = self.cfg.reid.crops_per_identity
                pick = torch.randperm(len(crops))[:k] if len(crops) >= k else torch.randint(len(crops), (k,))
                crops = crops[pick]
            images.append(crops)
            label = groups.setdefault(item.get("group", item["identity"]), len(groups))  # one object, one label
            labels += [label if train else item["identity"]] * len(crops)
        batch = torch.cat(images).float().div_(255.0)
        return (reid.augment(batch) if train else batch), torch.tensor(labels)

    def to_device(self, batch: Any, device: torch.device) -> Any:
        images, labels = batch
        return images.to(device), labels.to(device)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        return reid.reid_loss(self.cfg, model(images), labels)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, device: torch.device) -> dict[str, Any]:
        scores = reid.retrieval(model, loader, device)
        if self._baseline is None:  # an untrained net of the same init: what training bought
            torch.manual_seed(self.cfg.seed)
            self._baseline = reid.retrieval(self.build_model(None).to(device).eval(), loader, device)
        real = self._real_scores(model, device) if self.cfg.reid.real_clips else {}
        return {**scores, "untrained_top1": self._baseline["top1"], "untrained_map": self._baseline["map"], **real}

    def _real_scores(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Retrieval among the real clips' held-out identities (labelled by track: windows of one object match)."""
        held_out = reid.real_identities(self.cfg, self.input_size, held_out=True)
        if not held_out:
            return {}
        crops = torch.cat([c for c, _ in held_out]).float().div_(255.0)
        labels = np.concatenate([[i] * len(c) for i, (c, group) in enumerate(held_out)])
        names = {g: i for i, g in enumerate(dict.fromkeys(g for _, g in held_out))}
        labels = np.array([names[held_out[i][1]] for i in labels])
        with torch.no_grad():
            embeddings = model(crops.to(device)).float().cpu().numpy()
        scores = reid.retrieval_scores(embeddings, labels)
        return {"real_top1": scores["top1"], "real_map": scores["map"], "real_queries": scores["queries"]}


TASK_CLASSES: dict[str, type[Task]] = {"detect": DetectTask, "segment": SegmentTask, "flow": FlowTask, "action": ActionTask,
                                       "reid": ReidTask}


def make_task(cfg: TrainConfig) -> Task:
    return TASK_CLASSES[cfg.task](cfg)
