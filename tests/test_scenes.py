"""models.training.scenes: determinism, exact ground truth, actions and exports."""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES
from blinkflow.models.training.scenes import SceneGenerator, export_action_tree, export_coco, export_flo

W, H = 96, 72
SEEDS = [0, 1, 2, 3]


def scene(seed: int = 0, action: str | None = None, **kwargs) -> SceneGenerator:
    return SceneGenerator(seed, W, H, action=action, **kwargs)


def frame_bytes(frame) -> list[bytes]:
    return [frame.image.tobytes(), frame.flow.tobytes(), frame.valid.tobytes(), frame.semantic.tobytes(),
            frame.instance_masks.tobytes(), frame.boxes.tobytes(), frame.labels.tobytes()]


def bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    x0 = np.clip(np.floor(x).astype(int), 0, width - 2)
    y0 = np.clip(np.floor(y).astype(int), 0, height - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    image = image.astype(np.float32)
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def actor_track(generator: SceneGenerator, n: int) -> list[tuple[float, float, int]]:
    """(centroid x, centroid y, area) of the actor (the last, front object) over n frames."""
    actor = generator.num_objects - 1
    track = []
    for frame in generator.frames(n):
        mask = frame.instance_masks[list(frame.instance_ids).index(actor)]
        ys, xs = np.nonzero(mask)
        track.append((xs.mean(), ys.mean(), int(mask.sum())))
    return track


def test_same_seed_gives_the_same_bytes():
    assert frame_bytes(scene(7).render(3)) == frame_bytes(scene(7).render(3))


def test_different_seeds_give_different_scenes():
    assert scene(7).render(0).image.tobytes() != scene(8).render(0).image.tobytes()


def test_render_is_random_access():
    *_, last = scene(5).frames(6)
    assert frame_bytes(last) == frame_bytes(scene(5).render(5))


def test_render_image_matches_the_full_render():
    generator = scene(9)
    assert all(np.array_equal(generator.render_image(t), generator.render(t).image) for t in (0, 13))


def test_frame_shapes_and_types():
    frame = scene(1).render(0)
    k = len(frame.labels)
    assert frame.image.shape == (H, W, 3) and frame.image.dtype == np.uint8
    assert frame.boxes.shape == (k, 4) and frame.boxes.dtype == np.float32
    assert frame.labels.dtype == np.int64 and set(frame.labels) <= set(range(1, len(SYNTHETIC_CLASSES)))
    assert frame.instance_masks.shape == (k, H, W) and frame.instance_masks.dtype == bool
    assert frame.semantic.shape == (H, W) and frame.semantic.dtype == np.uint8
    assert frame.flow.shape == (H, W, 2) and frame.flow.dtype == np.float32
    assert frame.valid.shape == (H, W) and frame.valid.dtype == bool


def test_action_is_fixed_per_clip_and_drawn_from_the_seed():
    generator = scene(11)
    assert generator.action_name in SYNTHETIC_ACTIONS
    assert {f.action for f in generator.frames(4)} == {SYNTHETIC_ACTIONS.index(generator.action_name)}
    assert scene(11).action_name == generator.action_name


@pytest.mark.parametrize("seed", SEEDS)
def test_boxes_enclose_exactly_their_masks(seed):
    for frame in scene(seed).frames(3):
        for box, mask in zip(frame.boxes, frame.instance_masks):
            ys, xs = np.nonzero(mask)
            assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1)


@pytest.mark.parametrize("seed", SEEDS)
def test_instance_masks_and_labels_make_the_semantic_map(seed):
    frame = scene(seed).render(2)
    assert frame.instance_masks.sum(axis=0).max() <= 1  # visible masks never overlap
    semantic = np.zeros((H, W), dtype=np.uint8)
    for label, mask in zip(frame.labels, frame.instance_masks):
        semantic[mask] = label
    assert np.array_equal(semantic, frame.semantic)


@pytest.mark.parametrize("action", SYNTHETIC_ACTIONS)
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_warping_by_the_flow_reproduces_the_next_frame(seed, action):
    generator = scene(seed, action, lighting=False)
    for t in (0, 7):
        now, later = generator.render(t), generator.render(t + 1)
        x = np.arange(W)[None, :] + now.flow[..., 0]
        y = np.arange(H)[:, None] + now.flow[..., 1]
        error = np.abs(bilinear(later.image, x, y) - now.image)[now.valid]
        assert now.valid.mean() > 0.5
        assert error.mean() < 2.0


def test_moving_content_leaves_some_pixels_without_a_correspondence():
    generator = scene(3, "slide-left", lighting=False)
    frame = generator.render(0)
    assert not frame.valid.all()  # the moving background leaves the frame on one side


def test_lighting_changes_brightness_but_not_geometry():
    lit, flat = scene(4, lighting=True), scene(4, lighting=False)
    a, b = lit.render(30), flat.render(30)
    assert not np.array_equal(a.image, b.image)
    assert np.array_equal(a.semantic, b.semantic) and np.array_equal(a.flow, b.flow)


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_slides_move_the_actor_steadily_sideways(seed):
    for action, sign in (("slide-left", -1), ("slide-right", 1)):
        xs = np.array([x for x, _, _ in actor_track(scene(seed, action), 10)])
        assert np.all(sign * np.diff(xs) > 0.3) and sign * (xs[-1] - xs[0]) > 5


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_grow_and_shrink_change_the_actor_area(seed):
    for action, sign in (("grow", 1), ("shrink", -1)):
        areas = np.array([a for _, _, a in actor_track(scene(seed, action), 19)], dtype=float)
        # a small shape grows ~1-2% a frame, which pixel rounding can hide for a few frames
        assert np.all(sign * np.diff(areas) > -0.03 * areas[1:])
        coarse = areas[::9]
        assert np.all(sign * np.log(coarse[1:] / coarse[:-1]) > np.log(1.1))


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_rotate_spins_the_actor_in_place(seed):
    generator = scene(seed, "rotate")
    track = actor_track(generator, 6)
    first, last = (generator.render(t) for t in (0, 5))
    actor = generator.num_objects - 1
    a = first.instance_masks[list(first.instance_ids).index(actor)]
    b = last.instance_masks[list(last.instance_ids).index(actor)]
    assert abs(track[-1][0] - track[0][0]) < 1.5 and abs(track[-1][1] - track[0][1]) < 1.5
    assert (a & b).sum() / (a | b).sum() < 0.95  # the silhouette turned


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_bounce_goes_up_and_comes_back_down(seed):
    ys = np.array([y for _, y, _ in actor_track(scene(seed, "bounce"), 30)])
    steps = np.diff(ys)
    assert ys.min() < ys[0] - 5  # up is -y
    assert (steps < -0.2).any() and (steps > 0.2).any()


@pytest.mark.parametrize("seed", SEEDS[:2])
def test_static_keeps_the_actor_still(seed):
    track = np.array(actor_track(scene(seed, "static"), 8))
    assert np.ptp(track[:, 0]) < 0.5 and np.ptp(track[:, 1]) < 0.5 and np.ptp(track[:, 2]) == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside pycocotools under numpy 2
def test_coco_export_round_trips_through_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    frames = list(scene(2).frames(3))
    path = export_coco(frames, tmp_path / "scenes.json")
    coco = COCO(str(path))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == SYNTHETIC_CLASSES[1:]
    for image_id, frame in zip(sorted(coco.getImgIds()), frames):
        assert (tmp_path / coco.imgs[image_id]["file_name"]).is_file()
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(annotations) == len(frame.labels)
        for ann, box, label, mask in zip(annotations, frame.boxes, frame.labels, frame.instance_masks):
            assert np.array_equal(coco.annToMask(ann).astype(bool), mask)
            assert ann["category_id"] == label
            assert ann["bbox"] == pytest.approx([box[0], box[1], box[2] - box[0], box[3] - box[1]])


def test_flo_export_writes_chairs_style_pairs(tmp_path):
    generator = scene(6)
    pairs = export_flo(generator, tmp_path, num_frames=3)
    assert pairs == 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("00001")) == [
        "00001_flow.flo", "00001_img1.ppm", "00001_img2.ppm", "00001_valid.png"]
    raw = (tmp_path / "00002_flow.flo").read_bytes()
    assert np.frombuffer(raw[:4], "<f4")[0] == np.float32(202021.25)
    assert tuple(np.frombuffer(raw[4:12], "<i4")) == (W, H) and len(raw) == 12 + H * W * 2 * 4
    assert np.array_equal(np.frombuffer(raw[12:], "<f4").reshape(H, W, 2), generator.render(1).flow)
    assert (tmp_path / "00001_img2.ppm").read_bytes().startswith(f"P6\n{W} {H}\n255\n".encode())


def test_flo_export_refuses_non_consecutive_frames(tmp_path):
    generator = scene(6)
    with pytest.raises(ValueError, match="consecutive"):
        export_flo([generator.render(0), generator.render(2)], tmp_path)


def test_action_tree_has_one_folder_per_action_with_decodable_clips(tmp_path):
    import av

    paths = export_action_tree(tmp_path, 1, num_frames=4, width=32, height=32)
    assert sorted(p.parent.name for p in paths) == sorted(SYNTHETIC_ACTIONS)
    with av.open(str(paths[0])) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4
    assert (tmp_path / "classInd.txt").read_text().splitlines()[0] == "1 static"
