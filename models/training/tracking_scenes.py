"""Hard synthetic sequences for tracking: occlusions, exits and re-entries, crossings, fast objects.

:class:`TrackingScene` is a :class:`~models.training.scenes.SceneGenerator` whose objects follow a
scripted *pattern* instead of the clip's action, drawn from the seed like everything else (same
rendering, textures, ground truth and flow). The training clips never use it, so the datasets the
shipped weights were trained on are unchanged; the tracking bench renders it on held-out seeds.

Patterns (each also has wandering objects, one of them of the key object's class and size but with
its own texture, so that only appearance tells them apart):

* ``occlusion``: a large static object in front (a pillar, a parked car) and an object walking
  behind it, fully hidden for many frames; its speed after the occluder is drawn anew (people slow
  down or hurry behind things), so the motion model's guess of where it comes out is only a guess;
* ``re-entry``: an object leaves through a side edge, stays out of view for a while and comes back
  through the same edge at another height, moving back in;
* ``crossing``: two objects of one class and size (textures differ) walk towards each other, one
  passes in front of the other, both slowing down while it covers the other (as people do when
  passing), and both go on their way;
* ``fast``: a small object moving 8-14 px a frame (a quarter of its size or more) that bounces off
  the frame's edges, so its motion reverses abruptly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from blinkflow.models.training.scenes import _BOUND_RADIUS, _TWO_PI, SHAPES, SceneGenerator, _Pose, _SceneObject

PATTERNS = ("occlusion", "re-entry", "crossing", "fast")


@dataclass(frozen=True)
class _Path:
    """Piecewise-linear motion through waypoints (held before the first and after the last), slow spin."""

    times: tuple[float, ...]
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    radius: float
    angle0: float
    spin: float

    def pose(self, t: float) -> _Pose:
        cx, cy = float(np.interp(t, self.times, self.xs)), float(np.interp(t, self.times, self.ys))
        return _Pose(cx, cy, self.angle0 + self.spin * t, self.radius)


class TrackingScene(SceneGenerator):
    """A clip of one tracking ``pattern`` (see the module docstring); still camera, constant lighting.

    ``num_frames`` is the length the script is planned for (every pattern's event happens within it).
    """

    def __init__(self, seed: int, pattern: str, width: int = 320, height: int = 240, num_frames: int = 64) -> None:
        if pattern not in PATTERNS:
            raise ValueError(f"unknown tracking pattern {pattern!r}; valid: {PATTERNS}")
        self.pattern, self.num_frames = pattern, num_frames
        super().__init__(seed, width, height, num_objects=4, action="static", lighting=False, background_motion=False)

    def _random_objects(self, rng: np.random.Generator) -> list[_SceneObject]:
        """Wanderers at the back, then the pattern's objects (front-most last)."""
        size = min(self.width, self.height)
        key_shape, key_radius = str(rng.choice(SHAPES)), size * rng.uniform(0.08, 0.11)
        scripted = getattr(self, f"_{self.pattern.replace('-', '_')}")(rng, key_radius)
        look_alike = self._random_wander(rng, key_radius * rng.uniform(0.95, 1.05))  # same class and size
        other = self._random_wander(rng, size * rng.uniform(0.08, 0.13))
        motions = [(key_shape, look_alike), (str(rng.choice(SHAPES)), other)]
        motions += [(key_shape if shape is None else shape, motion) for shape, motion in scripted]
        return [self._make_object(rng, i, shape, motion) for i, (shape, motion) in enumerate(motions)]

    # ----------------------------------------------------------------- patterns: [(shape or None = key, motion)]

    def _path(self, rng: np.random.Generator, points: list[tuple[float, float, float]], radius: float) -> _Path:
        times, xs, ys = zip(*points)
        return _Path(tuple(times), tuple(xs), tuple(ys), radius, rng.uniform(0, _TWO_PI), rng.uniform(-0.01, 0.01))

    def _occlusion(self, rng: np.random.Generator, radius: float) -> list[tuple[str | None, _Path]]:
        w, h = self.width, self.height
        big = min(w, h) * rng.uniform(0.19, 0.23)  # the size of the base scenes' largest objects
        ox, oy = w / 2 + rng.uniform(-20, 20), h / 2 + rng.uniform(-20, 20)
        direction = float(rng.choice([-1.0, 1.0]))
        before, after = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0)
        cover = 0.75 * big  # half the occluder square's side
        start = ox - direction * (cover + radius * _BOUND_RADIUS + before * rng.uniform(4, 10))
        t_mid = abs(ox - start) / before
        end_t = self.num_frames + 50
        walker = self._path(rng, [(0, start, oy), (t_mid, ox, oy), (end_t, ox + direction * after * (end_t - t_mid), oy)],
                            radius)
        occluder = _Path((0.0,), (ox,), (oy,), big, rng.uniform(0, _TWO_PI), 0.0)  # still: a pillar
        return [(None, walker), ("square", occluder)]

    def _re_entry(self, rng: np.random.Generator, radius: float) -> list[tuple[str | None, _Path]]:
        w, h = self.width, self.height
        reach = radius * _BOUND_RADIUS
        side = float(rng.choice([-1.0, 1.0]))  # the edge it leaves by: left (-1) or right (+1)
        edge_out = w + reach + 2 if side > 0 else -reach - 2
        speed_out, speed_in = rng.uniform(2.0, 4.0), rng.uniform(2.0, 4.0)
        y_out = rng.uniform(0.25, 0.75) * h
        y_in = float(np.clip(y_out + rng.choice([-1.0, 1.0]) * rng.uniform(30, 70), reach, h - reach))
        x0 = edge_out - side * speed_out * rng.uniform(14, 24)  # fully inside, 14-24 frames from gone
        t_out = abs(edge_out - x0) / speed_out
        t_back = t_out + rng.uniform(10, 25)  # frames out of view
        end_t = self.num_frames + 50
        path = [(0, x0, y_out), (t_out, edge_out, y_out), (t_back, edge_out, y_in),
                (end_t, edge_out - side * speed_in * (end_t - t_back), y_in)]
        return [(None, self._path(rng, path, radius))]

    def _crossing(self, rng: np.random.Generator, radius: float) -> list[tuple[str | None, _Path]]:
        w, h = self.width, self.height
        meet_x, meet_y = w / 2 + rng.uniform(-30, 30), h / 2 + rng.uniform(-30, 30)
        t_meet = rng.uniform(24, 34)
        paths = []
        for direction in (-1.0, 1.0):
            speed, slow = rng.uniform(1.5, 3.5), rng.uniform(0.8, 1.5)
            slant = rng.uniform(-0.15, 0.15) * speed  # px down per frame: near-horizontal walks
            t_slow = radius / 2 / slow  # the slow stretch: centres within a radius of each other
            x_in, x_out = meet_x + direction * radius / 2, meet_x - direction * radius / 2
            t_in, t_out = t_meet - t_slow, t_meet + t_slow
            y_mid = meet_y + rng.uniform(-0.2, 0.2) * radius
            x_start, x_end = x_in + direction * speed * t_in, x_out - direction * speed * (self.num_frames + 50 - t_out)
            points = [(0, x_start, y_mid - slant * t_in), (t_in, x_in, y_mid), (t_out, x_out, y_mid),
                      (self.num_frames + 50, x_end, y_mid + slant * (self.num_frames + 50 - t_out))]
            paths.append((None, self._path(rng, points, radius * rng.uniform(0.97, 1.03))))
        return paths

    def _fast(self, rng: np.random.Generator, radius: float) -> list[tuple[str | None, _Path]]:
        w, h = self.width, self.height
        reach = radius * _BOUND_RADIUS
        speed, heading = rng.uniform(8, 14), rng.uniform(0, _TWO_PI)
        start = (rng.uniform(reach, w - reach), rng.uniform(reach, h - reach))
        points = [(float(t), *_bounce(start, speed, heading, t, (reach, w - reach), (reach, h - reach)))
                  for t in range(self.num_frames + 2)]
        return [(None, self._path(rng, points, radius))]


def _bounce(start: tuple[float, float], speed: float, heading: float, t: float, xs: tuple[float, float],
            ys: tuple[float, float]) -> tuple[float, float]:
    """Position at ``t`` of a point moving straight from ``start`` and reflecting off the box's walls."""
    def fold(p: float, lo: float, hi: float) -> float:
        span = hi - lo
        q = (p - lo) % (2 * span)
        return lo + (q if q <= span else 2 * span - q)

    return (fold(start[0] + speed * math.cos(heading) * t, *xs), fold(start[1] + speed * math.sin(heading) * t, *ys))

