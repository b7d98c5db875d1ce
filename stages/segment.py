"""Semantic segmentation: a class per pixel at the frame's own resolution.

Result per frame, ``frame.results["segment"]``::

    {"mask": {"format": "png", "data": <PNG bytes of the (H, W) uint8 class map>,
              "height": H, "width": W},          # SOURCE resolution
     "classes": [str, ...],                      # the vocabulary; mask value i is classes[i]
     "areas": {class_name: pixel_count, ...}}    # only classes present; sums to H * W

The model runs at ``input_size``; its logits are upsampled bilinearly to the
source size before the argmax, which gives smoother borders than upsampling
the class map.

Region-level reuse (``tile_reuse``, with the gate's ``tiles``): the stage keeps
each stream's logits at model-input size. On a frame the gate marks
``partial`` it runs the model only on crops around the changed tiles (each
horizontal run of changed tiles plus ``tile_halo`` model-input pixels of
context, aligned to the model's stride; one crop around all of them when that
costs less), pastes the crops' logits for the tiles
plus half the halo into the cached logits, and takes the class map from those.
When the crops would cost a full forward or more, the frame runs in full.
With ``tile_context`` (models with a features/head split: DeepLab) the stage
also keeps the stream's backbone features and the crops' global pooling sees
them, the crops' own features pasted in: the frame's context, not the crop's.
With ``tile_update`` layers (``auto`` picks it for DeepLab) no crops run: the
stage keeps every trunk block's output and recomputes each block only over the
changed tiles plus half the halo, reading its input around them from that cache
(:mod:`models.region_update`); the head runs on their feature cells.
Such a result also carries ``"tiles": {"recomputed", "total", "area"}``, where
``area`` is the fraction of a full forward the crops (or the layers' FLOPs) cost,
and ``"update": "layers"`` for the layered update. With the cache, the
stage is temporal (each stream sticks to one replica, in order).

Specks (``min_region``): connected regions of one class smaller than
``min_region`` model-input pixels take the logits of the nearest pixel outside
such specks, and a class can win a pixel of the upsampled map only where it
wins a model pixel nearby (bilinear upsampling of logits otherwise makes
slivers where a third class wins between two others). Regions that small are
below what the model resolves: they are mostly wrong and they come and go
between near-identical frames (measured in docs/skipping.md). All of it works
at the model's input size, on the logits the map is made from; the cached
logits stay as the model gave them, so tile recompute and full recompute clean
the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from blinkflow.config import GateConfig, StageConfig, _field
from blinkflow.errors import StageError
from blinkflow.frame import Frame
from blinkflow.registry import register_stage
from blinkflow.gate.tiles import EIGHT_CONNECTED, tile_edges, tile_runs, tiles_of_touched_regions
from blinkflow.models.classes import SYNTHETIC_CLASSES
from blinkflow.stages.common import by_frame_size, follows, region_base, run_with_regions
from blinkflow.stages.model_stage import ModelStage, checked_input_size, pick_classes

log = logging.getLogger(__name__)

TASK = "segment"
#: the class map is stored as uint8 PNG
MAX_CLASSES = 256


@dataclass
class SegmentOptions:
    """Options of the segment stage (``stages.segment.options``)."""

    input_size: list[int] | None = _field(
        factory=lambda: [256, 256],
        doc="[height, width] the model runs at (frames of any size batch together); null: each frame's own size",
    )
    classes: list[str] | None = _field(
        None, "class names (index 0 = background) for random or own weights without a class list"
    )
    model_args: dict[str, Any] | None = _field(None, "extra builder arguments, e.g. {base_width: 24} for unet_small")
    tile_reuse: bool = _field(
        True, "on frames the gate marks partial, recompute only the changed tiles and paste them into the stream's "
        "cached logits (the stage then keeps per-stream state: stream affinity across replicas)",
    )
    tile_halo: int = _field(32, "context around each recomputed tile, in model-input pixels (receptive field)", lo=0, hi=4096)
    tile_context: bool = _field(
        True, "with tile_reuse, a crop's global pooling sees the whole frame: the stream's cached backbone features "
        "with the crops' features pasted in (DeepLab's image pooling otherwise sees only the crop and labels it "
        "differently). Applies to models with a features/head split (deeplabv3_mobilenet_v2); others run crops plainly",
    )
    tile_regions: bool = _field(
        True, "with tile_reuse, a partial frame also recomputes every tile of each region of the stream's last class "
        "map (connected pixels of one object class) that its changed tiles touch: an object whose part changed is "
        "recomputed whole, since a sliver of it left in an unchanged tile (the fresh frame may show none of it) "
        "halves the frame's mIoU (docs/skipping.md)",
    )
    tile_update: Literal["auto", "layers", "crops"] = _field(
        "auto", "with tile_reuse, how a partial frame recomputes its changed tiles. layers: the trunk block by block "
        "over the tiles (plus tile_halo / 2 pixels), reading the stream's cached activations of every block around "
        "them, so each layer's border sees the last frame instead of zero padding and no halo is computed "
        "(DeepLab; 1.6 M floats a stream at 384x216). crops: the model on crops with tile_halo pixels of context. "
        "auto: layers where the model supports it (deeplabv3_mobilenet_v2), crops otherwise",
    )
    tile_batch: Literal["auto", "on", "off"] = _field(
        "auto", "with tile_reuse, a partial frame's crops go through the model in one call, each padded (zeros, "
        "bottom and right) to the largest: one launch instead of one per crop, for the padding's compute. auto: "
        "on a GPU only (launches cost there, FLOPs do not); the padded area counts in the frame's cost",
    )
    feature_reuse: int = _field(
        0, "feature-level reuse (Deep Feature Flow): the backbone runs on every Nth frame the stage computes; the "
        "frames between warp that frame's backbone features along the decoder's motion vectors (the source's "
        "motion_vectors: true) and run only the head. 0: off; needs a model with a features/head split "
        "(deeplabv3_mobilenet_v2). Gate keyframes and frames without motion vectors always run in full",
        lo=0, hi=1000,
    )
    feature_reuse_adapt: bool = _field(
        True, "with feature_reuse, each stream's interval moves at every key the backbone computes in full: the "
        "previous key's features, warped onto the new key's frame, are scored against it (mask mIoU; the head once "
        "more, counted in the frame's cost). It grows by one (to at most twice feature_reuse) while the checks' "
        "averaged loss would keep 3/4 of the budget 1 - feature_reuse_target over the warped frames, and halves "
        "(down to 1: no warping, checked every feature_reuse full runs) when it would not",
    )
    feature_reuse_target: float = _field(
        0.95, "mask mIoU that warped frames keep on average against running the backbone (feature_reuse_adapt)",
        lo=0.0, hi=1.0,
    )
    feature_reuse_change: float = _field(
        0.03, "with feature_reuse, a frame is warped only while at most this fraction of it differs from the key's "
        "pixels moved along the same motion (the gate's change measure at its defaults); more is new content a "
        "warp cannot show (a car driving in), so the backbone runs. 1: off",
        lo=0.0, hi=1.0,
    )
    keep_margin: float | None = _field(
        None, "hysteresis: a pixel keeps the class the stream's previous mask gave it (at model-input size) unless "
        "another class's logit beats that class's by more than this; a class that wins a frame by a hair (specks "
        "on leaves, a dog in a parked car's shadow) no longer blinks on and off (the stage then keeps per-stream "
        "state). 2: the segmenter agrees with itself from frame to frame at 0.96 instead of 0.60 on tree.avi "
        "(docs/skipping.md). null = off",
        lo=0.0, hi=100.0,
    )
    min_region: int = _field(
        256, "connected regions of one class smaller than this many model-input pixels (16x16) take the class of "
        "the nearest larger region (specks the model cannot resolve, which flicker from frame to frame; the best "
        "per-frame mIoU on the held-out scenes, docs/skipping.md); 0: keep all",
        lo=0, hi=10**6,
    )


@dataclass
class _FeatureKey:
    """A stream's last backbone features (1, C, h, w), from frame ``index`` of size ``source``, and the
    backward motion accumulated since (source pixels; None: no motion yet)."""

    index: int
    features: Any
    source: tuple[int, int]
    motion: np.ndarray | None = None
    warped: int = 0  # frames computed from these features since
    complete: bool = True  # every frame since carried motion vectors
    last: int = -1  # the latest frame whose motion ``motion`` holds (the key's own index until one follows)
    signal: np.ndarray | None = None  # the key frame's pixels as the gate sees them (feature_reuse_change)
    step: np.ndarray | None = None  # the latest frame's one-frame motion: an intra picture's guess


#: feature_reuse_change measures change as the gate does at its defaults (downscale, pixel_threshold, blur)
_GATE_DEFAULTS = GateConfig()
NEW_CONTENT_KEY = "segment_new_content"  # frame.meta: where the frame showed new content (feature_reuse_change)
#: a key's check leaves out the new content grown by this many frame pixels (the backbone's output stride):
#: the masks of a car reach past its changed pixels, and a sliver of it would halve the mIoU
NEW_CONTENT_MARGIN = 16
#: feature_reuse_adapt: the weight of the latest check in a stream's averaged loss
RATE_WEIGHT = 0.3


@dataclass
class _Interval:
    """A stream's feature-reuse interval (frames per backbone run) and the full runs since its last check."""

    frames: int
    since_check: int = 0
    loss: float | None = None  # the mIoU the checks lost, averaged (RATE_WEIGHT on the latest)


#: tile_update layers: the most of a full forward a layered update may cost; past it the frame runs in full. The
#: saving is then a tenth at most, while the cached activations left around the regions (several frames old after
#: a run of partial frames) steer everything recomputed beside them: at 95% of a forward a partial frame of the
#: parking lot at 250x141 agreed with the full run on 0.714 of its pixels (1.0 run in full); the bench's clips
#: kept their figures (their layered updates cost less)
LAYERS_MOST = 0.9


@dataclass
class _TileCache:
    """A stream's last logits at model-input size (C, h, w), from frame ``index`` of size ``source``, and with
    ``tile_context`` the backbone features they came from (1, C', h / 16, w / 16)."""

    index: int
    logits: Any
    source: tuple[int, int]
    features: Any = None
    activations: list[Any] | None = None  # tile_update layers: every trunk block's output (1, C, h, w)
    cells: Any = None  # tile_update layers: the head's logits on the feature cells (1, C, h / 16, w / 16)
    class_map: np.ndarray | None = None  # tile_regions: the class map those logits gave (H, W)


@register_stage(TASK)
class Segment(ModelStage):
    """A per-pixel class map, its PNG encoding and per-class areas per frame."""

    name = TASK
    Options = SegmentOptions
    default_model = "unet_small"
    stream_caches = ("_tiles", "_keys", "_decoders", "_intervals", "_shown")
    run_keys = ("tiles", "features", "feature_check", "new_content")  # what the run cost, not what the frame shows
    #: crops start on multiples of this (model-input pixels), so pooling grids line up with the full frame's
    tile_align: ClassVar[int] = 16

    @classmethod
    def is_temporal(cls, cfg: StageConfig | None) -> bool:
        options = getattr(cfg, "options", None)
        if options is None:
            return True
        return bool(options.tile_reuse or options.feature_reuse or options.keep_margin is not None)

    def __init__(self, cfg: StageConfig | None) -> None:
        super().__init__(cfg)
        checked_input_size(self.name, self.options.input_size, "[256, 256], or null", optional=True)
        self.classes: list[str] = []
        self._tiles: dict[str, _TileCache] = {}
        self._keys: dict[str, _FeatureKey] = {}
        self._intervals: dict[str, _Interval] = {}  # feature_reuse_adapt: per stream
        self._decoders: dict[str, Any] = {}  # per stream: the decoder's motion state, when no gate turned the vectors
        self._shown: dict[str, tuple[int, Any]] = {}  # keep_margin: per stream, (frame index, its model-size winners)
        self._head_share: dict[tuple[int, ...], float] = {}  # feature size -> the head's share of a forward
        self._tile_context = False  # check_model: crops pool over the cached whole-frame features
        self._tile_layers = False  # check_model: partial frames recompute the trunk block by block
        self._full_flops: dict[tuple[int, int], int] = {}  # tile_update layers: a whole forward's, per input size

    def build_model(self, spec: Any) -> Any:
        self.classes = pick_classes(self.name, spec.classes, self.options.classes, SYNTHETIC_CLASSES)
        if len(self.classes) > MAX_CLASSES:
            raise StageError(
                f"stages.{self.name}.options.classes: {len(self.classes)} classes do not fit the uint8 mask; "
                f"use at most {MAX_CLASSES}"
            )
        return self.build_backend(num_classes=len(self.classes))

    @classmethod
    def check_config(cls, cfg: Any, name: str) -> None:
        """feature_reuse warps along the decoder's motion vectors on frames the gate sends without tiles: a source
        that exports none, or a gate with tiles, never warps (every frame runs the backbone), said at load."""
        super().check_config(cfg, name)
        if not cfg.stages[name].options.feature_reuse:
            return
        where = f"stages.{name}.options.feature_reuse"
        for i, source in enumerate(cfg.sources):
            if source.type != "file":
                log.warning("%s: sources.%d (%s) exports no decoder motion vectors, so its frames are never warped",
                            where, i, source.type)
            elif not getattr(source.options, "motion_vectors", True):
                log.warning("%s: sources.%d exports no motion vectors, so its frames are never warped (every frame "
                            "runs the backbone); set sources.%d.motion_vectors: true", where, i, i)
        if cfg.gate.enabled and cfg.gate.tiles:
            log.warning("%s: with gate.tiles the gate's refreshes recompute their changed tiles instead, so no frame is "
                        "warped; set gate.tiles: null to warp between the gate's keyframes", where)

    def check_model(self, model: Any) -> None:
        split = hasattr(model, "features") and hasattr(model, "head")
        self._tile_context = bool(self.options.tile_reuse and self.options.tile_context and split)
        if self.options.feature_reuse and not split:
            raise StageError(f"stages.{self.name}.options.feature_reuse: model {self.model_name!r} has no "
                             "features/head split; use deeplabv3_mobilenet_v2 or set feature_reuse: 0")
        layered = hasattr(model, "update_activations")
        if self.options.tile_update == "layers" and not layered:
            raise StageError(f"stages.{self.name}.options.tile_update: model {self.model_name!r} cannot recompute "
                             "its layers over regions; use deeplabv3_mobilenet_v2 or tile_update: crops (or auto)")
        self._tile_layers = bool(self.options.tile_reuse and self.options.tile_update != "crops" and layered)

    def describe(self) -> str:
        return f", {len(self.classes)} classes"

    def warmup_inputs(self) -> tuple | None:
        import torch

        batch = torch.zeros(1, 3, *(self.options.input_size or (256, 256)), device=self._device)
        return (batch.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else batch,)

    @staticmethod
    def follow_motion(result: Any, motion: Any, height: int, width: int) -> Any:
        """The class map warped along the motion (nearest class), its areas recounted."""
        from blinkflow.gate.motion import warp_backward
        from blinkflow.stages.common import class_map_of, encode_class_map

        if not (isinstance(result, dict) and "mask" in result):
            return result
        class_map = warp_backward(class_map_of(result), motion)
        counts = np.bincount(class_map.ravel(), minlength=len(result.get("classes", [])))
        classes = result.get("classes") or [str(i) for i in range(len(counts))]
        areas: dict[str, int] = {}
        for index in np.flatnonzero(counts):
            name = classes[index] if index < len(classes) else str(index)
            areas[name] = areas.get(name, 0) + int(counts[index])
        return dict(result, mask=dict(result["mask"], data=encode_class_map(class_map)), areas=areas)

    @staticmethod
    def agreement(carried: Any, fresh: Any) -> dict[str, float] | None:
        """Mean IoU of the two class maps over the classes present in either."""
        from blinkflow.gate.agreement import mask_miou
        from blinkflow.stages.common import class_map_of

        return {"mask_iou": round(mask_miou(class_map_of(carried), class_map_of(fresh)), 6)}

    @staticmethod
    def disagreement(carried: Any, fresh: Any, height: int, width: int) -> np.ndarray | None:
        """The pixels the two class maps label differently."""
        from blinkflow.stages.common import class_map_of

        a, b = class_map_of(carried), class_map_of(fresh)
        return a != b if a.shape == b.shape == (height, width) else None

    def process(self, frames: list[Frame]) -> list[Frame]:
        if not self.options.feature_reuse:
            run_with_regions(self.active(frames), self._try_patch, self._run_full)
            return frames
        # feature reuse: frame by frame in stream order, since each frame may start the features the next warp
        for frame in frames:
            self._follow_motion(frame)
            if not frame.runs(self.name):
                continue
            if (frame.mark.tiles or {}).get("changed") is not None:  # changed tiles: recomputed, not warped
                if not self._try_patch(frame):
                    self._run_full([frame])
            elif self._can_warp(frame):
                self._run_warped(frame)
            else:
                self._run_full([frame])
        return frames

    # ------------------------------------------------------------------ full frames and tiles

    def _run_full(self, frames: list[Frame]) -> None:
        for group in self._batches(frames):
            features = activations = cells = None
            if self._tile_layers and any(frame.mark.tiles for frame in group):
                logits, features, activations, cells = self._logits_and_activations(group)
            elif self.options.feature_reuse or self._tile_context:
                logits, features = self._logits_and_features(group)
            else:
                logits = self._logits(group)
            for position, (frame, frame_logits) in enumerate(zip(group, logits)):
                one = slice(position, position + 1)
                frame_features = None if features is None else features[one]
                class_map = self._class_map(frame_logits, frame)
                result = self._result(class_map)
                if self.options.feature_reuse:
                    new_content = frame.meta.pop(NEW_CONTENT_KEY, None)
                    check = self._check_warp(frame, class_map, new_content)
                    if new_content is not None:
                        result["new_content"] = round(float(new_content.mean()), 4)
                    if check is not None:
                        result["feature_check"] = check
                    self._keys[frame.stream_id] = self._new_key(frame, frame_features)
                frame.results[self.name] = result
                self._remember(frame, frame_logits, class_map, frame_features,
                               None if activations is None else [a[one] for a in activations],
                               None if cells is None else cells[one])

    # ------------------------------------------------------------------ feature-level reuse

    def _follow_motion(self, frame: Frame) -> None:
        """Add this frame's decoder motion (``meta["mvs"]``, reused frames too) to its stream's key. The gate
        turns the source's vectors into that field; without a gate (or with its motion off) this stage does."""
        from blinkflow.gate.motion import INTRA_KEY, MOTION_KEY, attach_decoder_motion, compose_motion

        attach_decoder_motion(frame, self._decoders)  # a no-op once the gate did
        key = self._keys.get(frame.stream_id)
        if key is None or frame.index <= max(key.index, key.last):
            return  # the key's own frame, or one seen again (a batch retried frame by frame): composed already
        step = frame.meta.get(MOTION_KEY)
        if step is None or frame.index != max(key.index, key.last) + 1:
            key.complete = False  # no vectors, or frames in between never came (dropped): the motion is not whole
        else:
            step = np.asarray(step, dtype=np.float32)
            if frame.meta.get(INTRA_KEY) and key.step is not None and key.step.shape == step.shape:
                # an intra picture's field is zeros, not its motion: the frame before's, at constant velocity (a
                # panning camera's I-frame was warped as if the pan had stopped; a still scene's step is zeros)
                step = key.step
            key.motion = compose_motion(step, key.motion)
            key.step = step
        key.last = frame.index

    def _can_warp(self, frame: Frame) -> bool:
        """Warp the key's features onto ``frame`` unless the key is stale, motion is missing, or the gate
        asks for a fresh look (a keyframe: new content, a cut, an audit). Frames with changed tiles never get
        here: they recompute those (warping them instead cost the parking lot's masks 0.92 -> 0.89 there)."""
        key = self._keys.get(frame.stream_id)
        decision = (frame.results.get("gate") or {}).get("decision")
        # the motion must run from the key to this very frame (not to a later one, as for a frame retried)
        if not (key is not None and key.complete and frame.index == key.last > key.index
                and key.source == (frame.height, frame.width)
                and key.warped + 1 < self._interval(frame.stream_id).frames and decision in (None, "refresh")):
            return False
        new = self._new_content(key, frame)
        if new is not None and new.mean() > self.options.feature_reuse_change:
            frame.meta[NEW_CONTENT_KEY] = new  # taken off again by _run_full, in this call
            return False
        return True

    def _new_content(self, key: _FeatureKey, frame: Frame) -> np.ndarray | None:
        """Where ``frame`` differs from the key's pixels moved along the motion since the key (the gate's
        change measure, on its downscaled signal): what a warp of the key's features cannot show. None: off."""
        if self.options.feature_reuse_change >= 1.0 or key.signal is None:
            return None
        from blinkflow.gate.signal import gray_signal, measured_change

        # same frame size as the key (_can_warp), so the same signal shape
        signal = gray_signal(frame.image, _GATE_DEFAULTS.downscale)
        return measured_change(key.signal, signal, _GATE_DEFAULTS, key.motion)

    def _new_key(self, frame: Frame, features: Any) -> _FeatureKey:
        from blinkflow.gate.motion import MOTION_KEY

        signal = None
        if self.options.feature_reuse_change < 1.0:
            from blinkflow.gate.signal import gray_signal

            signal = gray_signal(frame.image, _GATE_DEFAULTS.downscale)
        step = frame.meta.get(MOTION_KEY)  # how the key frame itself moved from the one before
        return _FeatureKey(frame.index, features, (frame.height, frame.width), signal=signal,
                           step=None if step is None else np.asarray(step, dtype=np.float32))

    def _interval(self, stream_id: str) -> _Interval:
        return self._intervals.setdefault(stream_id, _Interval(self.options.feature_reuse))

    def _warped_logits(self, key: _FeatureKey, frame: Frame) -> tuple[Any, Any]:
        """The head on the key's features moved along the motion since the key: (logits (C, h, w), features)."""
        size = tuple(self.options.input_size) if self.options.input_size is not None else (frame.height, frame.width)
        with self.inference():
            warped = warp_features(key.features, key.motion, key.source)
            return self.model.head(warped, size)[0], warped

    def _check_warp(self, frame: Frame, class_map: np.ndarray, new_content: np.ndarray | None = None
                    ) -> dict[str, Any] | None:
        """At a key the backbone computed in full (``class_map``): how well the previous key, warped onto this
        frame, agrees with it, and the stream's interval moved by that (feature_reuse_adapt). None when there
        is nothing to check: no key, or one nothing was warped from (at interval 1: every feature_reuse runs)."""
        from blinkflow.gate.agreement import BOUND_GROWTH, BOUND_SHARE, mask_miou

        key, interval = self._keys.get(frame.stream_id), self._interval(frame.stream_id)
        interval.since_check += 1
        if not (self.options.feature_reuse_adapt and key is not None and key.complete and key.motion is not None
                and key.source == (frame.height, frame.width) and frame.index > key.index):
            return None
        # a key nothing was warped from says nothing about warping (a quiet stretch of reused frames would
        # grow the interval for the moving ones); at interval 1 nothing is, so a check comes every few runs
        if not (key.warped or (interval.frames == 1 and interval.since_check >= self.options.feature_reuse)):
            return None
        # a key run for new content is judged outside it: no warp was asked to show it
        kept = None if new_content is None else ~_new_at_pixels(new_content, class_map.shape)
        if kept is not None and kept.mean() < 0.5:
            return None  # mostly new: nothing to judge the warps by
        logits, _ = self._warped_logits(key, frame)
        warped = self._class_map(logits, frame)
        score = mask_miou(warped, class_map) if kept is None else mask_miou(warped[kept], class_map[kept])
        # one check is a poor sample: a speck class that comes and goes halves a frame's mIoU, so the loss is
        # averaged over the checks. That flicker does not grow with the staleness as drift does: every warped
        # frame is taken to lose what the stalest one did (the span's average then is span / (span + 1) of it)
        loss = 1.0 - score
        interval.loss = loss if interval.loss is None else RATE_WEIGHT * loss + (1 - RATE_WEIGHT) * interval.loss
        budget = BOUND_SHARE * (1.0 - self.options.feature_reuse_target)

        def meets(span: int) -> bool:  # span: warped frames after the key
            return interval.loss * span / (span + 1) <= budget + 1e-9

        span, top = interval.frames - 1, BOUND_GROWTH * self.options.feature_reuse - 1
        # bursts (a car drives through a still scene) go wrong at once: halve on a miss, grow by one on a pass
        span = min(top, span + 1) if meets(span + 1) else (span // 2 if not meets(span) else span)
        interval.frames = span + 1
        interval.since_check = 0
        return {"key": key.index, "mask_iou": round(score, 4), "interval": interval.frames,
                "area": self._head_share.get(tuple(key.features.shape[-2:]), 0.0)}

    def _run_warped(self, frame: Frame) -> None:
        """The head on the key's features moved along the motion since the key (Deep Feature Flow)."""
        key = self._keys[frame.stream_id]
        logits, warped = self._warped_logits(key, frame)
        key.warped += 1
        class_map = self._class_map(logits, frame)
        result = self._result(class_map)
        result["features"] = {"key": key.index, "area": self._head_share.get(tuple(key.features.shape[-2:]), 0.0)}
        frame.results[self.name] = result
        self._remember(frame, logits, class_map, warped)

    def _logits_and_features(self, frames: list[Frame]) -> tuple[Any, Any]:
        """(N, C, h, w) logits and the backbone features they came from; the first time at a size, the
        FLOPs of both halves are counted, for the cost a warped frame reports."""
        batch = self._input_batch(frames)
        with self.inference():
            features = self.model.features(batch)
            if self.options.feature_reuse and tuple(features.shape[-2:]) not in self._head_share:
                self._head_share[tuple(features.shape[-2:])] = head_share(self.model, batch[:1], features[:1])
            return self.model.head(features, batch.shape[-2:]), features

    def _logits_and_activations(self, frames: list[Frame]) -> tuple[Any, Any, list[Any], Any]:
        """Like :meth:`_logits_and_features`, with every trunk block's output and the head's logits on the
        feature cells: what a partial frame of these streams recomputes regions of (tile_update layers)."""
        batch = self._input_batch(frames)
        with self.inference():
            activations = self.model.activations(batch)
            features = activations[-1]
            if self.options.feature_reuse and tuple(features.shape[-2:]) not in self._head_share:
                self._head_share[tuple(features.shape[-2:])] = head_share(self.model, batch[:1], features[:1])
            cells = self.model.head_cells(features)
            return self.model.upsample(cells, batch.shape[-2:]), features, activations, cells

    def _remember(self, frame: Frame, logits: Any, class_map: np.ndarray, features: Any = None,
                  activations: list[Any] | None = None, cells: Any = None) -> None:
        """Keep the logits (with ``tile_context`` the features, with tile_update layers every block's output and
        the head's cells) when the gate may send partial frames of this stream next."""
        if self.options.tile_reuse and frame.mark.tiles:
            kept = features.float().clone() if self._tile_context and features is not None else None
            layers = [a.float().clone() for a in activations] if self._tile_layers and activations is not None else None
            self._tiles[frame.stream_id] = _TileCache(frame.index, logits.float().clone(), (frame.height, frame.width),
                                                      kept, layers, None if layers is None else cells.float().clone(),
                                                      class_map)
        else:
            self._tiles.pop(frame.stream_id, None)

    def _try_patch(self, frame: Frame) -> bool:
        cache = self._patchable_cache(frame)
        if cache is None:
            return False
        changed = self._recomputed_tiles(frame, cache)
        if not self._saves(cache, frame.mark.tiles["grid"], changed):
            return False
        self._run_patch(frame, cache, changed)
        return True

    def _patchable_cache(self, frame: Frame) -> _TileCache | None:
        """The stream's cache when ``frame``'s changed tiles can be pasted into it, else None."""
        tiles = frame.mark.tiles
        cache = self._tiles.get(frame.stream_id)
        if (self.options.tile_reuse and tiles and tiles.get("changed") is not None and cache is not None
                and cache.index == region_base(tiles, self.name) and cache.source == (frame.height, frame.width)):
            return cache
        return None

    def _recomputed_tiles(self, frame: Frame, cache: _TileCache) -> list[int]:
        """The gate's changed tiles, with ``tile_regions`` grown to every tile of each cached region they touch."""
        grid, changed = frame.mark.tiles["grid"], frame.mark.tiles["changed"]
        if not (self.options.tile_regions and changed and cache.class_map is not None):
            return changed
        return tiles_of_touched_regions(cache.class_map, grid, changed)

    def _saves(self, cache: _TileCache, grid: list[int], changed: list[int]) -> bool:
        """Whether recomputing ``changed`` costs less than a full forward (layers: less than LAYERS_MOST of one);
        else the frame runs in full (and exactly)."""
        size = tuple(cache.logits.shape[-2:])
        if cache.activations is not None:
            return self._layers_cost(self._layer_rects(grid, changed, size), size) < LAYERS_MOST
        return self._crops_cost(self._merged_crops(grid, changed, size)) < size[0] * size[1]

    def _run_patch(self, frame: Frame, cache: _TileCache, changed: list[int]) -> None:
        """Recompute ``changed`` tiles (+ halo) of a partial frame and paste them into the cached logits."""
        import torch

        from blinkflow.stages.common import frames_to_batch

        if cache.activations is not None:
            self._run_layers(frame, cache, changed)
            return
        size = tuple(cache.logits.shape[-2:])
        grid = frame.mark.tiles["grid"]
        crops = self._merged_crops(grid, changed, size)
        with torch.inference_mode():
            logits = cache.logits.clone()
            image = frames_to_batch([frame], self._device, size=size, channels_last=self.cfg.channels_last)
            if cache.features is not None:
                outs, features = self._crops_in_context(image, crops, cache.features)
            else:
                outs, features = self._crops_alone(image, crops), None
            for ((cy0, _, cx0, _), pastes), out in zip(crops, outs):
                for py0, py1, px0, px1 in pastes:
                    logits[:, py0:py1, px0:px1] = out[:, py0 - cy0 : py1 - cy0, px0 - cx0 : px1 - cx0]
        cost = self._crops_cost(crops)
        if self.options.feature_reuse:
            # warps start from a full run only: patched features mix fresh tiles with the cache (warped before
            # perhaps), and warping them drifted far more (mask mIoU 0.33 against the next full run, parking lot)
            self._keys.pop(frame.stream_id, None)
        class_map = self._class_map(logits, frame)
        result = self._result(class_map)
        result["tiles"] = {"recomputed": len(changed), "total": grid[0] * grid[1], "area": round(cost / (size[0] * size[1]), 4)}
        frame.results[self.name] = result
        self._tiles[frame.stream_id] = _TileCache(frame.index, logits, cache.source, features, class_map=class_map)

    def _run_layers(self, frame: Frame, cache: _TileCache, changed: list[int]) -> None:
        """Recompute the changed tiles (+ half the halo) block by block through the trunk, the cached activations
        around them, and the head on their feature cells; paste them into the cached logits (tile_update layers)."""
        import torch

        from blinkflow.stages.common import frames_to_batch

        size = tuple(cache.logits.shape[-2:])
        grid = frame.mark.tiles["grid"]
        rects = self._layer_rects(grid, changed, size)
        with torch.inference_mode(), self.autocast():
            image = frames_to_batch([frame], self._device, size=size, channels_last=self.cfg.channels_last)
            activations, trunk_flops = self.model.update_activations(image, cache.activations, rects)
            activations = [a.float() for a in activations]
            features = activations[-1]
            context = features.mean(dim=(2, 3), keepdim=True)  # the whole frame's, the regions' pasted in
            cells = cache.cells.clone()
            for y0, y1, x0, x1 in self.model.head_rects(size, rects):
                cells[..., y0:y1, x0:x1] = self.model.head_cells(features[..., y0:y1, x0:x1], context).float()
            upsampled = self.model.upsample(cells, size)[0]
            logits = cache.logits.clone()
            for y0, y1, x0, x1 in self._layer_pastes(grid, changed, size):
                logits[:, y0:y1, x0:x1] = upsampled[:, y0:y1, x0:x1]
        if self.options.feature_reuse:
            self._keys.pop(frame.stream_id, None)  # warps start from a full run only (as after crops)
        class_map = self._class_map(logits, frame)
        result = self._result(class_map)
        result["tiles"] = {"recomputed": len(changed), "total": grid[0] * grid[1],
                           "area": round(self._layers_cost(rects, size, trunk_flops), 4), "update": "layers"}
        frame.results[self.name] = result
        self._tiles[frame.stream_id] = _TileCache(frame.index, logits, cache.source, features, activations, cells,
                                                  class_map)

    def _layer_rects(self, grid: list[int], changed: list[int], size: tuple[int, int]) -> list[tuple]:
        """The regions a layered update recomputes: each run of changed tiles plus half the halo (the pastes of
        the crops, whose halo it does not need), and every cell the upsample reads for a changed tile's pixels
        (with tile_halo 0 up to a cell beyond the paste: a tile's top and left rows were interpolated from cells
        left as they were). The half halo pasted around them may read such cells: unchanged content there, as
        the gate saw it."""
        pastes = self._layer_pastes(grid, changed, size)
        covered = self.model.head_rects(size, pastes)  # the cells a paste's own update recomputes
        reads = self.model.reading_rects(size, self._runs(grid, changed, size))
        return pastes + [rect for rect in reads if not _within(self.model.head_rects(size, [rect])[0], covered)]

    def _layer_pastes(self, grid: list[int], changed: list[int], size: tuple[int, int]) -> list[tuple]:
        """What a layered update pastes into the cached logits: each run of changed tiles plus half the halo."""
        return [paste for _, paste in self._crops(grid, changed, size)]

    def _layers_cost(self, rects: list[tuple], size: tuple[int, int], trunk_flops: int | None = None) -> float:
        """The layered update's share of a whole forward's FLOPs (trunk and head); ``trunk_flops``: what the
        update spent on the trunk, when it ran (else planned)."""
        if size not in self._full_flops:
            self._full_flops[size] = self.model.region_flops(size)
        spent = self.model.region_flops(size, rects) if trunk_flops is None else trunk_flops + self.model.head_flops(size, rects)
        return spent / self._full_flops[size]

    def _crops_alone(self, image: Any, crops: list[tuple[tuple, list[tuple]]]) -> list[Any]:
        """Each crop's logits (C, h, w), the model seeing only the crop."""
        with self.autocast():
            return [out["out"][0, :, :h, :w].float()
                    for out, (h, w) in self._crop_calls(lambda batch: self.model(batch), image, crops)]

    def _batches_crops(self) -> bool:
        batch = self.options.tile_batch
        return batch == "on" or (batch == "auto" and getattr(self._device, "type", "cpu") == "cuda")

    def _crop_calls(self, call: Any, image: Any, crops: list[tuple[tuple, list[tuple]]]) -> list[tuple[Any, tuple]]:
        """``call`` on each crop of ``image``: (its output with a batch dimension of 1, the crop's (h, w)). With
        tile_batch, one call on the crops zero-padded to the largest (outputs still padded: slice to (h, w))."""
        import torch

        pieces = [image[..., cy0:cy1, cx0:cx1] for (cy0, cy1, cx0, cx1), _ in crops]
        sizes = [tuple(piece.shape[-2:]) for piece in pieces]
        if len(pieces) < 2 or not self._batches_crops():
            return [(call(piece), size) for piece, size in zip(pieces, sizes)]
        height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
        padded = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2])) for p in pieces])
        out = call(padded)
        split = (lambda i: {k: v[i : i + 1] for k, v in out.items()}) if isinstance(out, dict) else (lambda i: out[i : i + 1])
        return [(split(i), size) for i, size in enumerate(sizes)]

    def _crops_cost(self, crops: list[tuple[tuple, list[tuple]]]) -> int:
        """Model-input pixels the crops cost: their own areas, or (tile_batch) the padded batch's."""
        areas = [((cy1 - cy0), (cx1 - cx0)) for (cy0, cy1, cx0, cx1), _ in crops]
        if len(areas) >= 2 and self._batches_crops():
            return len(areas) * max(h for h, _ in areas) * max(w for _, w in areas)
        return sum(h * w for h, w in areas)

    def _crops_in_context(self, image: Any, crops: list[tuple[tuple, list[tuple]]], cached: Any) -> tuple[list[Any], Any]:
        """Each crop's logits with the whole frame's global pooling: the crops' backbone features pasted into the
        cached features of the frame (crops start on the stride, so feature cells line up), their mean the
        context every crop's head pools. Returns the logits and the patched features, the next cache."""
        stride = self.tile_align
        features = cached.clone()
        crop_features = []
        with self.autocast():
            for (out, (h, w)), ((cy0, cy1, cx0, cx1), pastes) in zip(self._crop_calls(self.model.features, image, crops), crops):
                crop = out[..., : -(-h // stride), : -(-w // stride)].float()
                crop_features.append(crop)
                for py0, py1, px0, px1 in pastes:
                    fy0, fy1, fx0, fx1 = py0 // stride, -(-py1 // stride), px0 // stride, -(-px1 // stride)
                    oy, ox = cy0 // stride, cx0 // stride
                    features[..., fy0:fy1, fx0:fx1] = crop[..., fy0 - oy : fy1 - oy, fx0 - ox : fx1 - ox]
            context = features.mean(dim=(2, 3), keepdim=True)
            outs = [self.model.head(crop, (cy1 - cy0, cx1 - cx0), context=context)[0].float()
                    for crop, ((cy0, cy1, cx0, cx1), _) in zip(crop_features, crops)]
        return outs, features

    def _merged_crops(self, grid: list[int], changed: list[int], size: tuple[int, int]) -> list[tuple[tuple, list[tuple]]]:
        """(crop, pastes) to run: one crop per run of changed tiles, or a single crop around them all when that
        costs less (the halos of runs in neighbouring rows overlap, and a model call on overlap is paid twice)."""
        rects = self._crops(grid, changed, size)
        if len(rects) < 2:
            return [(crop, [paste]) for crop, paste in rects]
        crops = [crop for crop, _ in rects]
        union = (min(c[0] for c in crops), max(c[1] for c in crops), min(c[2] for c in crops), max(c[3] for c in crops))
        separate = self._crops_cost([(crop, []) for crop in crops])
        if (union[1] - union[0]) * (union[3] - union[2]) <= separate:
            return [(union, [paste for _, paste in rects])]
        return [(crop, [paste]) for crop, paste in rects]

    @staticmethod
    def _runs(grid: list[int], changed: list[int], size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """Each run of changed tiles as a rectangle (y0, y1, x0, x1) of model-input pixels."""
        ys, xs = tile_edges(grid[0], size[0]), tile_edges(grid[1], size[1])
        return [(ys[row], ys[row + 1], xs[first], xs[last]) for row, first, last in tile_runs(changed, grid)]

    def _crops(self, grid: list[int], changed: list[int], size: tuple[int, int]) -> list[tuple[tuple, tuple]]:
        """(crop, paste) rectangles (y0, y1, x0, x1) in model-input pixels, one per run of changed tiles."""
        height, width = size
        halo, margin, align = self.options.tile_halo, self.options.tile_halo // 2, self.tile_align
        rects = []
        for y0, y1, x0, x1 in self._runs(grid, changed, size):
            crop = (max(0, (y0 - halo) // align * align), min(height, -(-(y1 + halo) // align) * align),
                    max(0, (x0 - halo) // align * align), min(width, -(-(x1 + halo) // align) * align))
            paste = (max(crop[0], y0 - margin), min(crop[1], y1 + margin), max(crop[2], x0 - margin), min(crop[3], x1 + margin))
            rects.append((crop, paste))
        return rects

    # ------------------------------------------------------------------ helpers

    def _batches(self, frames: list[Frame]) -> list[list[Frame]]:
        """One batch with a fixed input_size; otherwise one per distinct frame size."""
        if not frames or self.options.input_size is not None:
            return [frames] if frames else []
        return by_frame_size(frames)

    def _logits(self, frames: list[Frame]) -> Any:
        """(N, C, h, w) logits at the model input size."""
        batch = self._input_batch(frames)
        with self.inference():
            return self.model(batch)["out"]

    def _input_batch(self, frames: list[Frame]) -> Any:
        """The frames as one model-input batch: at ``input_size``, or their own size when it is null."""
        from blinkflow.stages.common import frames_to_batch

        size = tuple(self.options.input_size) if self.options.input_size is not None else None
        return frames_to_batch(frames, self._device, size=size, channels_last=self.cfg.channels_last)

    def _class_map(self, logits: Any, frame: Frame) -> np.ndarray:
        """(C, h, w) logits to the frame's (H, W) class map, without specks below ``min_region``, and with
        ``keep_margin`` leaning to the stream's previous classes."""
        import torch

        winners = None
        if self.options.keep_margin is not None:
            logits = self._leaning(logits, frame)
        if self.options.min_region > 0:
            logits, winners = cleaned_logits(logits, self.options.min_region)
        if self.options.keep_margin is not None:
            winners = logits.max(dim=0).indices if winners is None else torch.from_numpy(winners)
            self._shown[frame.stream_id] = (frame.index, winners.byte())  # classes fit uint8
        return self._to_source_class_map(logits, frame)

    def _leaning(self, logits: Any, frame: Frame) -> Any:
        """``logits`` with ``keep_margin`` added to the class each pixel had in the stream's previous mask (a copy;
        cached logits stay as the model gave them). Nothing to lean on after a cut, a restart or a resize."""
        import torch

        shown = self._shown.get(frame.stream_id)
        if shown is None or not follows(shown[0], frame) or tuple(shown[1].shape) != tuple(logits.shape[-2:]):
            return logits
        previous = torch.nn.functional.one_hot(shown[1].long().to(logits.device), logits.shape[0]).permute(2, 0, 1)
        return logits.float() + float(self.options.keep_margin) * previous

    @staticmethod
    def _to_source_class_map(logits: Any, frame: Frame) -> np.ndarray:
        """(C, h, w) logits to an (H, W) uint8 class map at the frame's resolution; one frame at a
        time, so a batch of large frames never holds C x H x W floats for all of them at once."""
        import torch
        import torch.nn.functional as F

        logits = logits.float()[None]
        if tuple(logits.shape[-2:]) != (frame.height, frame.width):
            logits = F.interpolate(logits, size=(frame.height, frame.width), mode="bilinear", align_corners=False)
        return logits.max(dim=1).indices[0].to(torch.uint8).cpu().numpy()  # max: torch's argmax is slower on CPU

    def _result(self, class_map: np.ndarray) -> dict[str, Any]:
        from blinkflow.stages.common import encode_class_map

        counts = np.bincount(class_map.ravel(), minlength=len(self.classes))
        areas: dict[str, int] = {}
        for index in np.flatnonzero(counts):
            name = self.classes[index]
            areas[name] = areas.get(name, 0) + int(counts[index])  # tolerate repeated names ("N/A")
        height, width = class_map.shape
        return {
            "mask": {"format": "png", "data": encode_class_map(class_map), "height": height, "width": width},
            "classes": list(self.classes),
            "areas": areas,
        }


def _new_at_pixels(new_content: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The new content (on the gate's downscaled signal) grown by NEW_CONTENT_MARGIN, at the (H, W) pixels."""
    from scipy import ndimage

    from blinkflow.gate.motion import field_at_pixels

    margin = max(1, round(NEW_CONTENT_MARGIN / _GATE_DEFAULTS.downscale))
    grown = ndimage.binary_dilation(new_content, np.ones((2 * margin + 1,) * 2, bool))
    return field_at_pixels(grown, shape[0], shape[1])


def warp_features(features: Any, motion: np.ndarray | None, source: tuple[int, int]) -> Any:
    """``features`` (1, C, h, w) moved along a backward motion field (source pixels, see
    :mod:`blinkflow.gate.motion`): ``out[p] = features[p - motion(p)]``, bilinear, borders repeated."""
    import torch
    import torch.nn.functional as F

    if motion is None or not np.any(motion):
        return features
    height, width = features.shape[-2:]
    field = torch.from_numpy(np.ascontiguousarray(motion, dtype=np.float32)).permute(2, 0, 1)[None].to(features.device)
    field = F.adaptive_avg_pool2d(field, (height, width))  # each feature cell moves by the mean motion under it
    # source pixels -> feature pixels -> grid_sample's [-1, 1] (align_corners=False: pixel centres at (i + 0.5) / n)
    xs = (torch.arange(width, device=features.device) + 0.5)[None, :] - field[0, 0] * (width / source[1])
    ys = (torch.arange(height, device=features.device) + 0.5)[:, None] - field[0, 1] * (height / source[0])
    grid = torch.stack([xs / width * 2 - 1, ys / height * 2 - 1], dim=-1)[None].to(features.dtype)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


def head_share(model: Any, image: Any, features: Any) -> float:
    """The head's share of a whole forward's FLOPs (one image): what a warped frame costs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as trunk:
        model.features(image)
    with FlopCounterMode(display=False) as head:
        model.head(features, image.shape[-2:])
    total = trunk.get_total_flops() + head.get_total_flops()
    return round(head.get_total_flops() / total, 4) if total else 0.0


def speck_mask(class_map: np.ndarray, min_pixels: int) -> np.ndarray | None:
    """The pixels of ``class_map`` in connected regions (8-connected, one class) smaller than
    ``min_pixels``; ``None`` when there are none (or when every pixel is in one)."""
    return speck_regions(class_map, min_pixels)[0]


#: speck regions beyond which their boxes are not kept: a busy map is cheaper in one transform of the whole map
MAX_SPECK_BOXES = 64


def speck_regions(class_map: np.ndarray, min_pixels: int) -> tuple[np.ndarray | None, list[tuple[slice, slice]] | None]:
    """:func:`speck_mask` and the bounding box of each speck region (None past :data:`MAX_SPECK_BOXES` regions).

    Each class is labelled only inside a window that holds all of its small regions (:func:`_class_window`),
    not over the whole map: at 720p a real frame has a few specks, and labelling the background everywhere was
    most of the cleaning's time.
    """
    from scipy import ndimage

    specks = np.zeros(class_map.shape, bool)
    boxes: list[tuple[slice, slice]] | None = []
    counts = np.bincount(class_map.ravel())
    for value in np.flatnonzero(counts):
        mask = class_map == value
        found = _class_window(mask, min_pixels, covers_most=2 * counts[value] > class_map.size)
        if found is None:
            continue
        window, open_sides = found
        regions, _ = ndimage.label(mask[window], structure=EIGHT_CONNECTED)
        small = np.bincount(regions.ravel()) < min_pixels
        small[0] = False  # label 0 is "not this class"
        for edge in _open_edges(regions, open_sides):
            small[edge] = False  # it goes on outside the window, into a strip of this class alone: a large region
        if not small.any():
            continue
        specks[window] |= small[regions]
        if boxes is not None and len(boxes) + int(small.sum()) > MAX_SPECK_BOXES:
            boxes = None
        if boxes is not None:
            boxes.extend(_offset(box, window) for label, box in enumerate(ndimage.find_objects(regions), start=1)
                         if box is not None and small[label])
    if not specks.any() or specks.all():
        return None, []
    return specks, boxes


def _offset(box: tuple[slice, slice], window: tuple[slice, slice]) -> tuple[slice, slice]:
    """A box found inside ``window``, in the map's coordinates."""
    return (slice(window[0].start + box[0].start, window[0].start + box[0].stop),
            slice(window[1].start + box[1].start, window[1].start + box[1].stop))


def _class_window(mask: np.ndarray, min_pixels: int, covers_most: bool
                  ) -> tuple[tuple[slice, slice], tuple[bool, ...]] | None:
    """Where one class's small regions can be: (the window, which of its top/bottom/left/right sides are open),
    or None when the class fills the map (one large region).

    Either the class's own bounding box (closed: no region leaves it), or, for a class that covers most of the
    map (``covers_most``), the other classes' bounding box grown by a pixel, when it is smaller: everything outside it is this class. A side of that
    box stays open only where the strip beyond it (rows or columns of this class alone, full width or height)
    has at least ``min_pixels``, so a region that reaches the side is joined to the strip and is large; a side
    with a thinner strip moves to the map's edge.
    """
    height, width = mask.shape
    y0, y1, x0, x1 = _bounding_box(mask) or (0, 0, 0, 0)
    if not covers_most:  # the others' box is larger than this class's: not worth finding
        return (slice(y0, y1), slice(x0, x1)), (False, False, False, False)
    others = _bounding_box(~mask)
    if others is None:
        return None
    oy0, oy1, ox0, ox1 = others
    oy0, ox0, oy1, ox1 = max(0, oy0 - 1), max(0, ox0 - 1), min(height, oy1 + 1), min(width, ox1 + 1)
    oy0 = oy0 if oy0 * width >= min_pixels else 0
    oy1 = oy1 if (height - oy1) * width >= min_pixels else height
    ox0 = ox0 if ox0 * height >= min_pixels else 0
    ox1 = ox1 if (width - ox1) * height >= min_pixels else width
    if (oy1 - oy0) * (ox1 - ox0) < (y1 - y0) * (x1 - x0):
        return (slice(oy0, oy1), slice(ox0, ox1)), (oy0 > 0, oy1 < height, ox0 > 0, ox1 < width)
    return (slice(y0, y1), slice(x0, x1)), (False, False, False, False)


def _bounding_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the True pixels (ends exclusive), or None when there are none."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _open_edges(regions: np.ndarray, open_sides: tuple[bool, ...]) -> list[np.ndarray]:
    """The labels on each open side (top, bottom, left, right) of a labelled window."""
    edges = (regions[0, :], regions[-1, :], regions[:, 0], regions[:, -1])
    return [np.unique(edge) for edge, is_open in zip(edges, open_sides) if is_open]


#: the margin around a speck region its nearest-pixel transform starts with (doubled until it is enough)
SOURCE_MARGIN = 8


def speck_sources(specks: np.ndarray, boxes: list[tuple[slice, slice]] | None
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((rows, cols) of the speck pixels, (rows, cols) of the nearest pixel outside the specks for each).

    The transform runs on a window around each speck region (``boxes``, from :func:`speck_regions`), grown
    until every pixel's nearest source is nearer than the window's open edges, so that no pixel outside
    could be nearer (a region near the middle of a busy map needs the whole map, which it then gets). The
    same sources as one transform over the whole map (tested), for a few hundred pixels of work a speck
    instead of the whole map's (≈ 50 ms at 720p for a frame with two specks). Without boxes (a busy map), or
    when their windows would cover the map, one transform over the whole map.
    """
    height, width = specks.shape
    whole = (slice(0, height), slice(0, width))
    margin = 2 * SOURCE_MARGIN
    if boxes is None or sum((r.stop - r.start + margin) * (c.stop - c.start + margin) for r, c in boxes) >= specks.size:
        return _window_sources(specks, None, (0, height, 0, width), whole)
    done = np.zeros(specks.shape, bool)
    targets: list[tuple[np.ndarray, np.ndarray]] = []
    sources: list[tuple[np.ndarray, np.ndarray]] = []
    for rows, cols in boxes:
        margin = SOURCE_MARGIN
        # the whole map always answers: it has no open edge, and not every pixel of it is a speck
        while (found := _window_sources(specks, done, (max(0, rows.start - margin), min(height, rows.stop + margin),
                                                       max(0, cols.start - margin), min(width, cols.stop + margin)),
                                        (rows, cols))) is None:
            margin *= 2
        (ty, tx), (sy, sx) = found
        done[ty, tx] = True
        targets.append((ty, tx))
        sources.append((sy, sx))
    join = lambda pairs, k: np.concatenate([pair[k] for pair in pairs]) if pairs else np.zeros(0, np.intp)  # noqa: E731
    return (join(targets, 0), join(targets, 1)), (join(sources, 0), join(sources, 1))


def _window_sources(specks: np.ndarray, done: np.ndarray | None, window: tuple[int, int, int, int],
                    box: tuple[slice, slice]) -> Any:
    """The speck pixels of ``box`` not ``done`` yet (all, without ``done``) and their nearest sources inside
    ``window``; None when some pixel's source is not nearer than an open edge of the window (a nearer one could
    be outside)."""
    from scipy import ndimage

    y0, y1, x0, x1 = window
    inside = specks[y0:y1, x0:x1]
    if inside.all():
        return None  # no pixel to take from in the window (the transform's indices would be meaningless)
    distance, (rows, cols) = ndimage.distance_transform_edt(inside, return_indices=True)
    ty, tx = np.nonzero(specks[box] if done is None else specks[box] & ~done[box])
    ty, tx = ty + box[0].start, tx + box[1].start
    wy, wx = ty - y0, tx - x0
    height, width = specks.shape
    edge = np.full(ty.shape, np.inf)
    for is_open, gap in ((y0 > 0, wy + 1), (y1 < height, y1 - y0 - wy), (x0 > 0, wx + 1), (x1 < width, x1 - x0 - wx)):
        if is_open:
            edge = np.minimum(edge, gap)
    if (distance[wy, wx] >= edge).any():
        return None
    return (ty, tx), (rows[wy, wx] + y0, cols[wy, wx] + x0)


def cleaned_logits(logits: Any, min_pixels: int) -> tuple[Any, np.ndarray]:
    """(C, h, w) logits without specks and with no room for slivers once upsampled, and their (h, w) uint8
    argmax (which the cleaning computes anyway):

    * the pixels of specks (regions of the argmax smaller than ``min_pixels``) get the logits of the
      nearest pixel outside them;
    * a class is ruled out where it wins no pixel of the 3x3 neighbourhood, so the bilinear upsampling
      cannot make a sliver of a third class between two regions (where it is second best on both sides).

    Only the argmax goes to the host (the regions are scipy's); the speck pixels' logits are copied, and the
    neighbourhoods grown and applied, where the logits are: on a GPU at 720p about 2 MB a frame cross between
    host and device, not the 34 MB of whole-map index arrays and class masks sent to the device before.
    """
    import torch

    device = logits.device
    winners_here = logits.max(dim=0).indices.to(torch.uint8)  # max: torch's argmax is slower on CPU
    winners = winners_here.cpu().numpy()
    specks, boxes = speck_regions(winners, min_pixels)
    if specks is not None:
        targets, sources = speck_sources(specks, boxes)  # every other pixel is its own source
        to, source = (torch.from_numpy(np.stack(targets)).to(device), torch.from_numpy(np.stack(sources)).to(device))
        logits = logits.clone()
        logits[:, to[0], to[1]] = logits[:, source[0], source[1]]
        winners = winners.copy()
        winners[targets] = winners[sources]
        winners_here = torch.from_numpy(winners).to(device)
    classes = torch.arange(logits.shape[0], dtype=torch.uint8, device=device)[:, None, None]
    nearby = _grown(winners_here[None] == classes)
    # finite: the upsampling weighs neighbours, and 0 * -inf would be NaN
    # a pixel's winner wins its own neighbourhood, so ruling classes out leaves the argmax as it is
    return logits.float().masked_fill(~nearby, _RULED_OUT), winners


def _grown(masks: Any) -> Any:
    """(C, h, w) boolean masks (a tensor) dilated by one pixel in all 8 directions (3x3), by shifted ORs."""
    tall = masks.clone()
    tall[:, 1:] |= masks[:, :-1]
    tall[:, :-1] |= masks[:, 1:]
    grown = tall.clone()
    grown[:, :, 1:] |= tall[:, :, :-1]
    grown[:, :, :-1] |= tall[:, :, 1:]
    return grown


#: a logit no class reaches (logits of trained models stay within tens)
_RULED_OUT = -1e4


def _within(window: tuple[int, int, int, int], windows: list[tuple[int, int, int, int]]) -> bool:
    """Whether ``window`` (y0, y1, x0, x1) lies inside one of ``windows``."""
    y0, y1, x0, x1 = window
    return any(a <= y0 and y1 <= b and c <= x0 and x1 <= d for a, b, c, d in windows)
