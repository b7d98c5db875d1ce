"""Procedural synthetic scenes with exact ground truth (numpy only).

A :class:`SceneGenerator` draws everything about a clip from its seed when it
is built: a background, ``num_objects`` textured shapes with a depth order, a
trajectory per object, a lighting curve and one action. Rendering frame ``t``
uses no randomness, so any frame can be rendered on its own (random access) and
the same seed always gives the same bytes.

Geometry. Each object is a shape defined in its own *local* coordinates (it
fits inside radius 1.1) and placed by a similarity transform

    p = c(t) + s(t) * R(theta(t)) @ l          (pixel centres are integer coords)

Rendering inverse-maps every pixel of the object's bounding square to ``l``,
tests the shape and evaluates the texture at ``l``. Because the texture is a
function of ``l``, the forward flow is analytic: the surface point seen at
pixel ``p`` at time ``t`` is at ``A_{t+1} A_t^{-1} p`` at ``t + 1``. The
background is a texture of ``(x - vx t, y - vy t)``, i.e. it translates
globally, so its flow is ``(vx, vy)`` everywhere. Masks are exact (no
anti-aliasing); textures are smooth (sinusoids, soft checkers, bilinear value
noise) so that resampling a frame along the flow reproduces the next frame.

``valid`` marks pixels whose correspondence at ``t + 1`` lands inside the frame
and whose four neighbouring pixels at ``t + 1`` all belong to the same surface
(object or background), i.e. the point is not occluded and not at a boundary
where bilinear sampling would mix surfaces.

Actions. The front object, also the largest, is the *actor*; the clip's action
governs its motion:

* ``static``: it stays still;
* ``slide-left`` / ``slide-right``: it moves horizontally at a constant speed
  (about 1% of the frame width per frame) and wraps around once fully outside;
* ``rotate``: it spins in place (its shape is never a disc or a ring, so the
  rotation shows in the silhouette, not only the texture);
* ``grow`` / ``shrink``: its scale changes geometrically between 0.6x and 1.5x
  over a cycle of 40-64 frames, then restarts;
* ``bounce``: it moves up and back down periodically (|sin|, 16-28 frames).

Slides, grow and shrink are monotone from frame 0 for at least 40 frames. The other objects
*wander* mildly and smoothly (small sinusoidal translation, slow spin, a few
percent of scale wobble), so that the actor's motion is what tells actions
apart. A slow global translation of the background and a sinusoidal brightness
change (``lighting=True``) apply to every clip.

Exports: :func:`export_coco` (COCO JSON with RLE masks), :func:`export_flo`
(Flying-Chairs-style ``.ppm``/``.flo`` pairs), :func:`export_action_tree`
(UCF101/Kinetics-style ``<class>/<clip>.mp4`` folders).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES

log = logging.getLogger(__name__)

SHAPES: list[str] = SYNTHETIC_CLASSES[1:]
#: every shape fits inside this radius in local coordinates
_BOUND_RADIUS = 1.1
#: value-noise lattices are periodic with this many cells, so any coordinate can be sampled
_NOISE_CELLS = 32
_TWO_PI = 2.0 * math.pi
_FLO_MAGIC = 202021.25


@dataclass
class SceneFrame:
    """One rendered frame with its exact ground truth.

    ``boxes`` are ``x1, y1, x2, y2`` with ``x2``/``y2`` exclusive (max pixel + 1),
    so ``x2 - x1`` is the number of visible columns. Only objects with at least one
    visible pixel are listed; ``instance_ids`` identify objects across frames.
    """

    index: int
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (K, 4) float32
    labels: np.ndarray  # (K,) int64 indices into SYNTHETIC_CLASSES (1..)
    instance_ids: np.ndarray  # (K,) int64, stable per object over the clip
    instance_masks: np.ndarray  # (K, H, W) bool, visible pixels
    semantic: np.ndarray  # (H, W) uint8 class map, 0 = background
    flow: np.ndarray  # (H, W, 2) float32 forward flow t -> t+1 (dx, dy)
    valid: np.ndarray  # (H, W) bool, correspondence at t+1 visible and in frame
    action: int  # index into SYNTHETIC_ACTIONS, the same for the whole clip

    @property
    def action_name(self) -> str:
        return SYNTHETIC_ACTIONS[self.action]


# --------------------------------------------------------------------------- textures


def _value_noise(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear value noise on a periodic lattice; ``u``/``v`` in cells, any shape that broadcasts."""
    rows, cols = table.shape
    u_floor, v_floor = np.floor(u), np.floor(v)
    fu, fv = (u - u_floor).astype(np.float32), (v - v_floor).astype(np.float32)
    i0, j0 = u_floor.astype(np.int64) % cols, v_floor.astype(np.int64) % rows
    i1, j1 = (i0 + 1) % cols, (j0 + 1) % rows
    top = table[j0, i0] + (table[j0, i1] - table[j0, i0]) * fu
    bottom = table[j1, i0] + (table[j1, i1] - table[j1, i0]) * fu
    return top + (bottom - top) * fv


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, period: float, table: np.ndarray) -> np.ndarray:
    """A smooth pattern in [0, 1] of rotated coordinates (u, v); smooth so warping stays exact."""
    if kind == "stripes":
        return 0.5 + 0.5 * np.sin(u * (_TWO_PI / period))
    if kind == "checker":
        product = np.sin(u * (_TWO_PI / period)) * np.sin(v * (_TWO_PI / period))
        return 0.5 + 0.5 * np.tanh(2.0 * product)
    return _value_noise(table, u / (0.5 * period), v / (0.5 * period))  # "noise"


@dataclass(frozen=True)
class _Texture:
    """A base colour blended with a second colour through a pattern, in local coordinates."""

    kind: str  # "stripes" | "checker" | "noise"
    base: np.ndarray  # (3,) float32
    alt: np.ndarray  # (3,) float32
    period: float  # in the coordinates the texture is evaluated in
    cos_o: float
    sin_o: float
    table: np.ndarray  # (_NOISE_CELLS, _NOISE_CELLS) float32

    @classmethod
    def random(cls, rng: np.random.Generator, period: float) -> "_Texture":
        base = rng.uniform(40, 215, 3)
        alt = np.clip(base + rng.choice([-1, 1], 3) * rng.uniform(40, 90, 3), 20, 235)
        angle = rng.uniform(0, math.pi)
        table = rng.random((_NOISE_CELLS, _NOISE_CELLS)).astype(np.float32)
        kind = str(rng.choice(["stripes", "checker", "noise"]))
        return cls(kind, base.astype(np.float32), alt.astype(np.float32), period, math.cos(angle), math.sin(angle), table)

    def colour(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """RGB float32 of shape ``broadcast(x, y).shape + (3,)``."""
        u = x * self.cos_o + y * self.sin_o
        v = -x * self.sin_o + y * self.cos_o
        m = _pattern(self.kind, u, v, self.period, self.table)[..., None]
        return self.base + (self.alt - self.base) * m


# --------------------------------------------------------------------------- shapes


def _shape_mask(shape: str, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Inside test in local coordinates; every shape fits within radius ``_BOUND_RADIUS``."""
    if shape == "disc":
        return lx * lx + ly * ly <= 1.0
    if shape == "ring":
        r2 = lx * lx + ly * ly
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        return (np.abs(lx) <= 0.75) & (np.abs(ly) <= 0.75)
    if shape == "cross":
        ax, ay = np.abs(lx), np.abs(ly)
        return ((ax <= 0.3) & (ay <= 1.0)) | ((ay <= 0.3) & (ax <= 1.0))
    if shape == "triangle":  # equilateral, inscribed in the unit circle, apex up (image y points down)
        inside = ly <= 0.5
        for angle in (math.radians(210), math.radians(330)):
            inside &= lx * math.cos(angle) + ly * math.sin(angle) <= 0.5
        return inside
    raise ValueError(f"unknown shape {shape!r}; valid: {SHAPES}")


# --------------------------------------------------------------------------- motion


@dataclass(frozen=True)
class _Pose:
    cx: float
    cy: float
    angle: float
    scale: float  # pixels per local unit

    def to_local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inverse transform: l = R(-angle) (p - c) / scale."""
        c, s = math.cos(self.angle) / self.scale, math.sin(self.angle) / self.scale
        dx, dy = x - self.cx, y - self.cy
        return c * dx + s * dy, -s * dx + c * dy

    def to_pixels(self, lx: np.ndarray, ly: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Forward transform: p = c + scale R(angle) l."""
        c, s = math.cos(self.angle) * self.scale, math.sin(self.angle) * self.scale
        return self.cx + c * lx - s * ly, self.cy + s * lx + c * ly


@dataclass(frozen=True)
class _Wander:
    """Mild, bounded, smooth motion of the non-actor objects."""

    cx: float
    cy: float
    radius: float
    amp: tuple[float, float]
    period: tuple[float, float]
    phase: tuple[float, float]
    angle0: float
    spin: float
    wobble: float
    wobble_period: float

    def pose(self, t: float) -> _Pose:
        cx = self.cx + self.amp[0] * math.sin(_TWO_PI * t / self.period[0] + self.phase[0])
        cy = self.cy + self.amp[1] * math.sin(_TWO_PI * t / self.period[1] + self.phase[1])
        scale = self.radius * (1.0 + self.wobble * math.sin(_TWO_PI * t / self.wobble_period))
        return _Pose(cx, cy, self.angle0 + self.spin * t, scale)


@dataclass(frozen=True)
class _ActorMotion:
    """The actor's motion for one action; see the module docstring."""

    action: str
    cx: float
    cy: float
    radius: float
    angle0: float
    rate: float  # px/frame (slides), rad/frame (rotate), amplitude in px (bounce)
    period: float  # frames per grow/shrink cycle or per bounce
    x_range: tuple[float, float]  # wrap-around interval of the centre for slides

    def pose(self, t: float) -> _Pose:
        cx, cy, angle, scale = self.cx, self.cy, self.angle0, self.radius
        if self.action in ("slide-left", "slide-right"):
            direction = -1.0 if self.action == "slide-left" else 1.0
            lo, hi = self.x_range
            cx = lo + (self.cx + direction * self.rate * t - lo) % (hi - lo)
        elif self.action == "rotate":
            angle = self.angle0 + self.rate * t
        elif self.action in ("grow", "shrink"):
            phase = (t / self.period) % 1.0
            phase = phase if self.action == "grow" else 1.0 - phase
            scale = self.radius * 0.6 * (1.5 / 0.6) ** phase
        elif self.action == "bounce":
            cy = self.cy - self.rate * abs(math.sin(math.pi * t / self.period))
        return _Pose(cx, cy, angle, scale)


@dataclass(frozen=True)
class _SceneObject:
    object_id: int
    label: int
    shape: str
    texture: _Texture
    motion: _Wander | _ActorMotion


@dataclass(frozen=True)
class _Layer:
    """The pixels of one object at one time: its bounding window and inside mask."""

    obj: _SceneObject
    pose: _Pose
    window: tuple[slice, slice]
    mask: np.ndarray  # bool, window-sized
    lx: np.ndarray
    ly: np.ndarray


# --------------------------------------------------------------------------- background


def _wavevector(width: int, height: int, period: float, angle: float) -> tuple[int, int]:
    """Whole cycles per tile along x and y, so that a pattern of about ``period`` px tiles seamlessly."""
    kx, ky = round(width * math.cos(angle) / period), round(height * math.sin(angle) / period)
    return (kx, ky) if (kx, ky) != (0, 0) else (1, 0)


def _background_tile(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A seamless (periodic) ``height x width`` RGB tile: gradient + value noise + pattern.

    Periodicity lets the background translate forever: every component has a whole
    number of cycles across the tile.
    """
    x = np.arange(width, dtype=np.float32)[None, :] / width  # tile coordinates in [0, 1)
    y = np.arange(height, dtype=np.float32)[:, None] / height
    gx, gy = [(1, 0), (0, 1), (1, 1), (1, -1)][rng.integers(4)]
    ramp = 0.5 + 0.5 * np.cos(_TWO_PI * (gx * x + gy * y) + rng.uniform(0, _TWO_PI))
    low, high = rng.uniform(20, 120, 3).astype(np.float32), rng.uniform(110, 230, 3).astype(np.float32)
    image = low + (high - low) * ramp[..., None]
    cells = rng.uniform(10, 24)
    nx, ny = max(2, round(width / cells)), max(2, round(height / cells))
    noise = _value_noise(rng.random((ny, nx), dtype=np.float32), x * nx, y * ny) - 0.5
    image += (rng.uniform(10, 40) * noise)[..., None]
    period, angle = rng.uniform(14, 32), rng.uniform(0, math.pi)
    k1 = _wavevector(width, height, period, angle)
    k2 = _wavevector(width, height, period, angle + math.pi / 2)
    phase1, phase2 = (_TWO_PI * (k[0] * x + k[1] * y) for k in (k1, k2))
    kind = rng.integers(3)
    if kind == 0:  # stripes
        pattern = 0.5 + 0.5 * np.sin(phase1)
    elif kind == 1:  # soft checker
        pattern = 0.5 + 0.5 * np.tanh(2.0 * np.sin(phase1) * np.sin(phase2))
    else:  # fine value noise
        fx, fy = max(2, round(2 * width / period)), max(2, round(2 * height / period))
        pattern = _value_noise(rng.random((fy, fx), dtype=np.float32), x * fx, y * fy)
    colour = rng.uniform(30, 230, 3).astype(np.float32)
    weight = rng.uniform(0.1, 0.35)
    return image + weight * (colour - image) * pattern[..., None]


def _wrap_padded(tile: np.ndarray) -> np.ndarray:
    height, width = tile.shape[:2]
    return np.pad(tile, ((0, height + 1), (0, width + 1), (0, 0)), mode="wrap")


@dataclass(frozen=True)
class _Background:
    """A seamless tile translating at ``velocity`` px/frame.

    The background is *defined* as the bilinear interpolant of the tile at
    ``(x - vx t, y - vy t)``, so its flow is exactly ``velocity`` and a frame costs
    four shifted slices (the sub-pixel offset is the same for every pixel).
    """

    velocity: tuple[float, float]
    padded: np.ndarray  # the tile, wrap-padded to (2H + 1, 2W + 1, 3)

    @classmethod
    def random(cls, rng: np.random.Generator, width: int, height: int, speed: float) -> "_Background":
        heading = rng.uniform(0, _TWO_PI)
        tile = _background_tile(rng, width, height)
        return cls((speed * math.cos(heading), speed * math.sin(heading)), _wrap_padded(tile))

    @classmethod
    def still(cls, image: np.ndarray) -> "_Background":
        """A fixed image (a real photograph): a static camera, so its flow is zero."""
        return cls((0.0, 0.0), _wrap_padded(np.asarray(image, dtype=np.float32)))

    def render(self, t: float) -> np.ndarray:
        height, width = (self.padded.shape[0] - 1) // 2, (self.padded.shape[1] - 1) // 2
        ox, oy = -self.velocity[0] * t, -self.velocity[1] * t  # background coordinate of pixel (0, 0)
        fx, fy = ox - math.floor(ox), oy - math.floor(oy)
        ix, iy = math.floor(ox) % width, math.floor(oy) % height
        window = self.padded[iy : iy + height + 1, ix : ix + width + 1]
        if fx == 0.0 and fy == 0.0:
            return window[:height, :width].copy()
        image = np.multiply(window[:height, :width], np.float32((1 - fx) * (1 - fy)))
        scratch = np.empty_like(image)  # in-place accumulation: no full-frame temporaries
        for part, weight in (
            (window[:height, 1:], fx * (1 - fy)),
            (window[1:, :width], (1 - fx) * fy),
            (window[1:, 1:], fx * fy),
        ):
            image += np.multiply(part, np.float32(weight), out=scratch)
        return image


# --------------------------------------------------------------------------- generator


class SceneGenerator:
    """A deterministic synthetic clip: ``render(t)`` gives frame ``t`` with exact ground truth.

    ``lighting=False`` keeps the brightness constant and ``background_motion=False``
    keeps the background still (useful in tests and for clean flow targets).
    ``background`` (an ``height x width x 3`` image, e.g. a real photograph)
    replaces the procedural background and stays still; the objects are those
    the seed draws either way (models.training.backgrounds).
    """

    def __init__(
        self,
        seed: int,
        width: int = 320,
        height: int = 240,
        num_objects: int = 3,
        action: str | None = None,
        *,
        lighting: bool = True,
        background_motion: bool = True,
        background: np.ndarray | None = None,
    ) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"scene size {width}x{height} is too small (min 16x16)")
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {num_objects}")
        if action is not None and action not in SYNTHETIC_ACTIONS:
            raise ValueError(f"unknown action {action!r}; valid: {SYNTHETIC_ACTIONS}")
        self.seed, self.width, self.height, self.num_objects = seed, width, height, num_objects
        rng = np.random.default_rng(seed)
        self.action_name: str = action if action is not None else str(rng.choice(SYNTHETIC_ACTIONS))
        self.action: int = SYNTHETIC_ACTIONS.index(self.action_name)
        self._xs = np.arange(width, dtype=np.float32)
        self._ys = np.arange(height, dtype=np.float32)
        self._background = self._random_background(rng, background_motion)  # drawn either way: same objects
        if background is not None:
            self._background = self._still_background(background)
        self._objects = self._random_objects(rng)  # back to front; the actor is last
        light = (rng.uniform(0.08, 0.18), rng.uniform(60, 150), rng.uniform(0, _TWO_PI))  # drawn either way
        self._light = light if lighting else None

    # ----------------------------------------------------------------- clip set-up

    def _random_background(self, rng: np.random.Generator, moving: bool) -> _Background:
        speed = rng.uniform(0.1, 0.5) * self.width / 320
        return _Background.random(rng, self.width, self.height, speed if moving else 0.0)

    def _still_background(self, image: np.ndarray) -> _Background:
        if image.shape != (self.height, self.width, 3):
            raise ValueError(f"background image is {image.shape}, the scene needs ({self.height}, {self.width}, 3)")
        return _Background.still(image)

    def _random_objects(self, rng: np.random.Generator) -> list[_SceneObject]:
        size = min(self.width, self.height)
        objects = []
        for object_id in range(self.num_objects - 1):
            radius = size * rng.uniform(0.08, 0.13)
            shape = str(rng.choice(SHAPES))
            objects.append(self._make_object(rng, object_id, shape, self._random_wander(rng, radius)))
        actor_shapes = [s for s in SHAPES if s not in ("disc", "ring")] if self.action_name == "rotate" else SHAPES
        actor_motion = self._random_actor_motion(rng, radius=size * rng.uniform(0.15, 0.19))
        objects.append(self._make_object(rng, self.num_objects - 1, str(rng.choice(actor_shapes)), actor_motion))
        return objects

    @staticmethod
    def _make_object(rng: np.random.Generator, object_id: int, shape: str, motion) -> _SceneObject:
        # the texture period is 8-16 pixels whatever the object's size
        texture = _Texture.random(rng, period=rng.uniform(8, 16) / motion.radius)
        return _SceneObject(object_id, SYNTHETIC_CLASSES.index(shape), shape, texture, motion)

    def _random_wander(self, rng: np.random.Generator, radius: float) -> _Wander:
        w, h = self.width, self.height
        return _Wander(
            cx=rng.uniform(radius, w - radius),
            cy=rng.uniform(radius, h - radius),
            radius=radius,
            amp=(w * rng.uniform(0.02, 0.06), h * rng.uniform(0.02, 0.06)),
            period=(rng.uniform(80, 200), rng.uniform(80, 200)),
            phase=(rng.uniform(0, _TWO_PI), rng.uniform(0, _TWO_PI)),
            angle0=rng.uniform(0, _TWO_PI),
            spin=rng.uniform(-0.015, 0.015),
            wobble=rng.uniform(0.0, 0.04),
            wobble_period=rng.uniform(60, 160),
        )

    def _random_actor_motion(self, rng: np.random.Generator, radius: float) -> _ActorMotion:
        w, h, action = self.width, self.height, self.action_name
        reach = radius * _BOUND_RADIUS * (1.5 if action in ("grow", "shrink") else 1.0)
        cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.6) * h
        rate, period = 0.0, 64.0
        if action in ("slide-left", "slide-right"):
            rate = w * rng.uniform(0.009, 0.015)
            edge = min(reach + 1, w / 2)  # start fully visible at the side it leaves from
            cx = w - edge if action == "slide-left" else edge
        elif action == "rotate":
            rate = rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.12)
        elif action in ("grow", "shrink"):
            period = rng.uniform(40, 64)
        elif action == "bounce":
            rate, period = h * rng.uniform(0.15, 0.25), rng.uniform(16, 28)
            cy = min(h - reach, 0.55 * h + rate / 2)  # bounce upward from low in the frame
        return _ActorMotion(action, cx, cy, radius, rng.uniform(0, _TWO_PI), rate, period, (-reach, w + reach))

    # ----------------------------------------------------------------- rendering

    def frames(self, n: int, start: int = 0) -> Iterator[SceneFrame]:
        """Frames ``start .. start + n - 1``."""
        for t in range(start, start + n):
            yield self.render(t)

    def render(self, t: int) -> SceneFrame:
        """Frame ``t`` with its ground truth; the same ``t`` always gives the same frame."""
        layers = self._layers(t, with_local=True)
        owner = self._owner_map(layers)
        image = self._background.render(t)
        flow = np.empty((self.height, self.width, 2), dtype=np.float32)
        flow[...] = self._background.velocity
        for layer in layers:
            self._paint(layer, t, image, flow)
        next_owner = self._owner_map(self._layers(t + 1, with_local=False))
        return SceneFrame(
            index=t,
            image=self._finish(image, t),
            flow=flow,
            valid=self._valid(flow, owner, next_owner),
            action=self.action,
            **self._instances(owner),
        )

    def render_image(self, t: int) -> np.ndarray:
        """Only the pixels of frame ``t`` (equal to ``render(t).image``), for video sources: about
        half the cost of :meth:`render`, which also works out flow, validity and instances."""
        image = self._background.render(t)
        for layer in self._layers(t, with_local=True):
            self._paint(layer, t, image, flow=None)
        return self._finish(image, t)

    def _finish(self, image: np.ndarray, t: int) -> np.ndarray:
        """Global lighting, then rounding to uint8."""
        gain = self._gain(t)
        if gain != 1.0:
            image *= np.float32(gain)
        return np.clip(image + 0.5, 0, 255).astype(np.uint8)

    def _layers(self, t: int, *, with_local: bool) -> list[_Layer]:
        """Each object's window and inside mask at time ``t``, back to front."""
        layers = []
        for obj in self._objects:
            pose = obj.motion.pose(float(t))
            reach = pose.scale * _BOUND_RADIUS
            x0, x1 = max(0, math.floor(pose.cx - reach)), min(self.width, math.ceil(pose.cx + reach) + 1)
            y0, y1 = max(0, math.floor(pose.cy - reach)), min(self.height, math.ceil(pose.cy + reach) + 1)
            if x0 >= x1 or y0 >= y1:
                continue  # entirely outside the frame
            lx, ly = pose.to_local(self._xs[None, x0:x1], self._ys[y0:y1, None])
            mask = _shape_mask(obj.shape, lx, ly)
            if not with_local:
                lx = ly = np.empty(0)
            layers.append(_Layer(obj, pose, (slice(y0, y1), slice(x0, x1)), mask, lx, ly))
        return layers

    @staticmethod
    def _paint_owner(owner: np.ndarray, layer: _Layer) -> None:
        owner[layer.window][layer.mask] = layer.obj.object_id + 1

    def _owner_map(self, layers: list[_Layer]) -> np.ndarray:
        """Which surface each pixel shows: 0 background, object_id + 1 otherwise (front wins)."""
        owner = np.zeros((self.height, self.width), dtype=np.int16)
        for layer in layers:
            self._paint_owner(owner, layer)
        return owner

    def _paint(self, layer: _Layer, t: int, image: np.ndarray, flow: np.ndarray | None) -> None:
        """Texture and analytic flow (p_{t+1} = A_{t+1} l) of one object; later layers overwrite."""
        lx, ly = layer.lx[layer.mask], layer.ly[layer.mask]
        image[layer.window][layer.mask] = layer.obj.texture.colour(lx, ly)
        if flow is None:
            return
        x_now, y_now = layer.pose.to_pixels(lx, ly)
        x_next, y_next = layer.obj.motion.pose(float(t + 1)).to_pixels(lx, ly)
        flow[layer.window][layer.mask] = np.stack([x_next - x_now, y_next - y_now], axis=-1)

    def _gain(self, t: int) -> float:
        if self._light is None:
            return 1.0
        amp, period, phase = self._light
        return 1.0 + amp * math.sin(_TWO_PI * t / period + phase)

    def _valid(self, flow: np.ndarray, owner: np.ndarray, next_owner: np.ndarray) -> np.ndarray:
        """In frame at t+1, and all four bilinear neighbours there show the same surface."""
        h, w = owner.shape
        x = self._xs[None, :] + flow[..., 0]
        y = self._ys[:, None] + flow[..., 1]
        valid = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
        # top-left neighbour, kept one short of the last row/column so all four exist
        x0 = np.clip(x, 0, w - 2).astype(np.int32)
        y0 = np.clip(y, 0, h - 2).astype(np.int32)
        top_left = y0 * w + x0
        flat_next, flat_owner = next_owner.ravel(), owner
        for offset in (0, 1, w, w + 1):
            valid &= flat_next.take(top_left + offset) == flat_owner
        return valid

    def _instances(self, owner: np.ndarray) -> dict[str, np.ndarray]:
        """Visible instance masks, boxes and labels, and the semantic map, from the owner map."""
        masks, boxes, labels, ids = [], [], [], []
        semantic = np.zeros(owner.shape, dtype=np.uint8)
        for obj in self._objects:
            mask = owner == obj.object_id + 1
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue  # fully occluded or outside the frame
            semantic[mask] = obj.label
            masks.append(mask)
            boxes.append((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
            labels.append(obj.label)
            ids.append(obj.object_id)
        return {
            "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(labels, dtype=np.int64),
            "instance_ids": np.asarray(ids, dtype=np.int64),
            "instance_masks": np.asarray(masks, dtype=bool).reshape(-1, *owner.shape),
            "semantic": semantic,
        }


# --------------------------------------------------------------------------- exports


def _as_frames(generator_or_frames: SceneGenerator | Iterable[SceneFrame], num_frames: int) -> Iterable[SceneFrame]:
    if isinstance(generator_or_frames, SceneGenerator):
        return generator_or_frames.frames(num_frames)
    return generator_or_frames


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_annotations(frame: SceneFrame, image_id: int, first_id: int) -> list[dict]:
    annotations = []
    for k, (box, label, mask) in enumerate(zip(frame.boxes, frame.labels, frame.instance_masks)):
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append(
            {
                "id": first_id + k,
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": int(mask.sum()),
                "iscrowd": 0,
                "segmentation": _rle(mask),
                "instance_id": int(frame.instance_ids[k]),
            }
        )
    return annotations


def export_coco(
    generator_or_frames: SceneGenerator | Iterable[SceneFrame],
    path: str | Path,
    *,
    num_frames: int = 16,
    image_dir: str | Path | None = None,
) -> Path:
    """Write a COCO instances JSON (RLE masks, xywh boxes) and the frames as PNG.

    Images go to ``image_dir`` (default ``<path stem>_images`` beside the JSON);
    ``file_name`` is relative to the JSON's folder. ``num_frames`` applies when a
    generator is given.
    """
    from PIL import Image

    path = Path(path)
    image_dir = Path(image_dir) if image_dir is not None else path.parent / f"{path.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for frame in _as_frames(generator_or_frames, num_frames):
        image_id = len(images) + 1
        file = image_dir / f"{image_id:06d}.png"
        Image.fromarray(frame.image).save(file)
        height, width = frame.image.shape[:2]
        images.append(
            {"id": image_id, "file_name": os.path.relpath(file, path.parent), "width": width, "height": height,
             "frame_index": frame.index, "action": frame.action_name}
        )
        annotations += _coco_annotations(frame, image_id, first_id=len(annotations) + 1)
    categories = [{"id": i, "name": name, "supercategory": "shape"} for i, name in enumerate(SYNTHETIC_CLASSES) if i]
    coco = {"info": {"description": "Blinkflow synthetic scenes"}, "images": images,
            "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(coco))
    log.info("wrote %d images and %d annotations to %s", len(images), len(annotations), path)
    return path


def _write_flo(path: Path, flow: np.ndarray) -> None:
    """Middlebury .flo: float32 magic 202021.25, int32 width, int32 height, float32 (H, W, 2)."""
    height, width = flow.shape[:2]
    with open(path, "wb") as handle:
        np.asarray([_FLO_MAGIC], dtype="<f4").tofile(handle)
        np.asarray([width, height], dtype="<i4").tofile(handle)
        np.ascontiguousarray(flow, dtype="<f4").tofile(handle)


def _write_ppm(path: Path, image: np.ndarray) -> None:
    height, width = image.shape[:2]
    with open(path, "wb") as handle:
        handle.write(f"P6\n{width} {height}\n255\n".encode("ascii"))
        handle.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())


def export_flo(
    generator_or_frames: SceneGenerator | Iterable[SceneFrame], directory: str | Path, *, num_frames: int = 16
) -> int:
    """Write consecutive frame pairs Flying-Chairs style: ``NNNNN_img1.ppm``, ``NNNNN_img2.ppm``,
    ``NNNNN_flow.flo`` (numbered from 00001), plus ``NNNNN_valid.png`` (255 = valid flow).

    Frames must be consecutive (``index`` increasing by 1). Returns the number of pairs.
    """
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous: SceneFrame | None = None
    pairs = 0
    for frame in _as_frames(generator_or_frames, num_frames):
        if previous is not None:
            if frame.index != previous.index + 1:
                raise ValueError(f"export_flo needs consecutive frames; got {previous.index} then {frame.index}")
            pairs += 1
            stem = directory / f"{pairs:05d}"
            _write_ppm(stem.with_name(f"{stem.name}_img1.ppm"), previous.image)
            _write_ppm(stem.with_name(f"{stem.name}_img2.ppm"), frame.image)
            _write_flo(stem.with_name(f"{stem.name}_flow.flo"), previous.flow)
            Image.fromarray(previous.valid.astype(np.uint8) * 255).save(stem.with_name(f"{stem.name}_valid.png"))
        previous = frame
    log.info("wrote %d flow pairs to %s", pairs, directory)
    return pairs


def _encode_clip(path: Path, frames: Iterable[SceneFrame], width: int, height: int, fps: int, codec: str) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame.image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def _clip_seed(seed: int, action_index: int, clip: int) -> int:
    return int(np.random.SeedSequence([seed, action_index, clip]).generate_state(1)[0])


def export_action_tree(
    directory: str | Path,
    clips_per_class: int,
    *,
    num_frames: int = 16,
    width: int = 112,
    height: int = 112,
    fps: int = 8,
    num_objects: int = 3,
    seed: int = 0,
    codec: str = "libx264",
) -> list[Path]:
    """Write ``directory/<action>/<action>_NNNN.mp4`` clips (UCF101/Kinetics folder layout)
    and ``classInd.txt`` (``1 static`` ...). Width and height must be even (yuv420p)."""
    if width % 2 or height % 2:
        raise ValueError(f"clip size {width}x{height} must be even for yuv420p")
    directory = Path(directory)
    paths = []
    for action_index, action in enumerate(SYNTHETIC_ACTIONS):
        (directory / action).mkdir(parents=True, exist_ok=True)
        for clip in range(clips_per_class):
            scene = SceneGenerator(_clip_seed(seed, action_index, clip), width, height, num_objects, action)
            path = directory / action / f"{action}_{clip:04d}.mp4"
            _encode_clip(path, scene.frames(num_frames), width, height, fps, codec)
            paths.append(path)
    lines = [f"{i + 1} {name}" for i, name in enumerate(SYNTHETIC_ACTIONS)]
    (directory / "classInd.txt").write_text("\n".join(lines) + "\n")
    log.info("wrote %d clips to %s", len(paths), directory)
    return paths
