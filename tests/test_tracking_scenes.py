"""The hard tracking sequences (models/training/tracking_scenes.py) do what each pattern says, from their truth."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.models.training.tracking_scenes import PATTERNS, TrackingScene

FRAMES = 96


def visibility(scene: TrackingScene) -> tuple[np.ndarray, np.ndarray]:
    """(objects, frames): visible pixel counts, and visible box centres (NaN when hidden), from the owner maps."""
    count = np.zeros((len(scene._objects), FRAMES))
    centre = np.full((len(scene._objects), FRAMES, 2), np.nan)
    for t in range(FRAMES):
        owner = scene._owner_map(scene._layers(t, with_local=False))
        for k in range(len(scene._objects)):
            ys, xs = np.nonzero(owner == k + 1)
            count[k, t] = len(xs)
            if len(xs):
                centre[k, t] = [(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2]
    return count, centre


def longest_gap(visible: np.ndarray) -> int:
    """The longest run of hidden frames between two visible ones."""
    seen = np.flatnonzero(visible)
    return int(np.diff(seen).max() - 1) if len(seen) > 1 else 0


@pytest.mark.parametrize("seed", [1_000_100, 1_000_104])
def test_each_pattern_has_its_hard_case(seed):
    scenes = {p: TrackingScene(seed + i, p, num_frames=FRAMES) for i, p in enumerate(PATTERNS)}
    for scene in scenes.values():  # a look-alike of the key object: same class, its own texture
        look_alike, key = scene._objects[0], scene._objects[-2 if scene.pattern == "occlusion" else -1]
        assert look_alike.label == key.label and look_alike.texture is not key.texture

    count, centre = visibility(scenes["occlusion"])
    assert count[-1].min() > 0 and longest_gap(count[-2] > 0) >= 5  # the occluder always seen, the walker hidden
    assert np.isfinite(centre[-2, 0]).all() and np.isfinite(centre[-2, :, 0]).sum() > 20

    count, centre = visibility(scenes["re-entry"])
    gap = longest_gap(count[-1] > 0)
    assert gap >= 10  # out of view for at least 10 frames, then back
    seen = np.flatnonzero(count[-1] > 0)
    last = int(np.argmax(np.diff(seen) > 1))
    before, after = centre[-1, seen[last]], centre[-1, seen[last + 1]]  # last seen, first seen again
    width = scenes["re-entry"].width
    assert (before[0] < width / 2) == (after[0] < width / 2)  # through the edge it left by

    count, centre = visibility(scenes["crossing"])
    a, b = centre[-2], centre[-1]
    dx = a[:, 0] - b[:, 0]
    assert np.nanmax(dx) > 0 > np.nanmin(dx)  # they swap sides: a crossing
    assert count[-2].min() == 0 or count[-1].min() == 0 or np.nanmin(np.abs(dx)) < 5  # one covers the other

    _, centre = visibility(scenes["fast"])
    step = np.linalg.norm(np.diff(centre[-1], axis=0), axis=1)
    assert np.nanmedian(step) >= 7  # px per frame
    velocity = np.diff(centre[-1], axis=0)
    assert (np.sign(velocity[1:]) * np.sign(velocity[:-1]) < 0).any()  # it bounced off an edge


def test_tracking_scenes_are_deterministic_and_leave_the_base_scenes_alone():
    from blinkflow.models.training.scenes import SceneGenerator

    one, two = TrackingScene(1_000_101, "re-entry"), TrackingScene(1_000_101, "re-entry")
    assert np.array_equal(one.render_image(20), two.render_image(20))
    base = SceneGenerator(1_000_101, num_objects=4, action="static", lighting=False, background_motion=False)
    assert np.array_equal(base._background.padded, one._background.padded)  # the same draws up to the objects
    with pytest.raises(ValueError, match="unknown tracking pattern"):
        TrackingScene(0, "teleport")
