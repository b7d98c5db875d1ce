"""Real backgrounds behind synthetic objects (models.training.backgrounds): hard negatives with exact labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blinkflow.models.training import backgrounds as bg
from blinkflow.models.training import datasets as ds
from blinkflow.models.training.config import load_train_config, resolved_backgrounds
from blinkflow.models.training.scenes import SceneGenerator
from blinkflow.errors import BlinkflowError, ConfigError

TRAIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def pool(real_media):
    return bg.background_pool((str(real_media / "coco"), str(real_media / "video" / "realshort.mp4")))


def test_the_pool_holds_every_image_and_every_fourth_video_frame(pool, real_media):
    # two COCO photographs, then realshort.mp4's 36 frames at a step of 4
    assert len(pool) == 2 + 9
    assert all(frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 for frame in pool)
    assert pool[0].shape != pool[-1].shape  # each frame at its own size: crops are cut from the original


def test_a_clip_draws_the_same_background_every_time_and_clips_differ(pool):
    first = bg.draw_background(pool, 12, 96, 72)
    assert first.shape == (72, 96, 3) and first.dtype == np.float32
    assert 0 <= first.min() and first.max() <= 255
    np.testing.assert_array_equal(first, bg.draw_background(pool, 12, 96, 72))
    assert not np.array_equal(first, bg.draw_background(pool, 13, 96, 72))
    assert first.std() > 5  # real texture, not a flat fill


def test_the_real_fraction_picks_that_share_of_clips_by_seed():
    picked = [bg.uses_real_background(seed, 0.3) for seed in range(2000)]
    assert 0.27 < np.mean(picked) < 0.33
    assert picked == [bg.uses_real_background(seed, 0.3) for seed in range(2000)]
    assert not any(bg.uses_real_background(seed, 0.0) for seed in range(200))
    assert all(bg.uses_real_background(seed, 1.0) for seed in range(200))


def test_a_real_background_keeps_the_objects_labels_and_flow_exact(pool):
    image = bg.draw_background(pool, 5, 96, 72)
    plain = SceneGenerator(5, 96, 72, lighting=False).render(3)
    real = SceneGenerator(5, 96, 72, lighting=False, background=image).render(3)
    np.testing.assert_array_equal(real.semantic, plain.semantic)
    np.testing.assert_array_equal(real.boxes, plain.boxes)
    np.testing.assert_array_equal(real.labels, plain.labels)
    objects = plain.semantic > 0
    np.testing.assert_array_equal(real.image[objects], plain.image[objects])  # the same textured shapes
    expected = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(real.image[~objects], expected[~objects])  # the photograph, unmoved
    assert np.all(real.flow[~objects] == 0)  # a still background: zero flow, as the ground truth says
    later = SceneGenerator(5, 96, 72, lighting=False, background=image).render(9)
    still = (later.semantic == 0) & ~objects
    np.testing.assert_array_equal(later.image[still], real.image[still])


def test_a_background_of_the_wrong_size_is_refused(pool):
    with pytest.raises(ValueError, match=r"background image is \(72, 96, 3\), the scene needs \(48, 64, 3\)"):
        SceneGenerator(1, 64, 48, background=bg.draw_background(pool, 1, 96, 72))


def test_a_split_with_backgrounds_puts_them_behind_its_share_of_clips(tmp_path, real_media):
    coco = str(real_media / "coco")
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"out_dir={tmp_path}"])
    plain = ds.synthetic_segmentation(cfg.data, cfg.data.train, (64, 64), native=True)
    cfg.data.train.backgrounds, cfg.data.train.real_fraction = [coco], 0.5
    real = ds.synthetic_segmentation(cfg.data, cfg.data.train, (64, 64), native=True)
    assert real.labels.equal(plain.labels)  # the labels are the procedural clips' own
    assert all(a.equal(b) for a, b in zip(real.native, plain.native))
    per_clip = cfg.data.train.samples_per_clip
    for i, seed in enumerate(ds.scene_seeds(cfg.data.train)):
        clip = slice(i * per_clip, (i + 1) * per_clip)
        same = real.images[clip].equal(plain.images[clip])
        assert same != bg.uses_real_background(seed, 0.5), f"clip {seed}"
    assert 0 < sum(bg.uses_real_background(s, 0.5) for s in ds.scene_seeds(cfg.data.train)) < cfg.data.train.clips


def test_detection_examples_get_real_backgrounds_too(tmp_path, real_media):
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-detect.yaml", [f"out_dir={tmp_path}", "data.train.clips=4"])
    plain = ds.synthetic_detection(cfg.data, cfg.data.train)
    cfg.data.train.backgrounds, cfg.data.train.real_fraction = [str(real_media / "coco")], 1.0
    real = ds.synthetic_detection(cfg.data, cfg.data.train)
    assert all(a["boxes"].equal(b["boxes"]) for a, b in zip(real.targets, plain.targets))
    assert not any(a.equal(b) for a, b in zip(real.images, plain.images))


def test_background_config_errors_name_the_key(tmp_path, real_media):
    video = real_media / "video" / "realshort.mp4"
    with pytest.raises(ConfigError, match=r"^data\.train\.backgrounds: real backgrounds are for the detect and segment tasks, not 'flow'"):
        load_train_config(TRAIN_CONFIGS / "smoke-flow.yaml", [f"data.train.backgrounds=[{video}]"])
    with pytest.raises(ConfigError, match=r"^data\.val\.backgrounds\.1: 'nope\.mp4' does not exist; fix the path"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"data.val.backgrounds=[{video}, nope.mp4]"])
    coco = real_media / "coco" / "detections.json"
    with pytest.raises(ConfigError, match=r"^data\.train\.backgrounds: data\.train_path is a real dataset"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"data.train_path={coco}", f"data.train.backgrounds=[{video}]"])
    with pytest.raises(ConfigError, match=r"^data\.train\.real_fraction: "):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["data.train.real_fraction=1.5"])


def test_relative_background_paths_are_found_beside_the_config(tmp_path, real_media):
    (tmp_path / "media").symlink_to(real_media / "video")
    config = tmp_path / "segment.yaml"
    config.write_text((TRAIN_CONFIGS / "smoke-segment.yaml").read_text())
    cfg = load_train_config(config, ["data.train.backgrounds=[media/realshort.mp4]"])
    assert resolved_backgrounds(cfg.data.train) == (str(tmp_path / "media" / "realshort.mp4"),)
    assert cfg.to_dict()["data"]["train"]["backgrounds"] == ["media/realshort.mp4"]  # recorded as written
    images = ds.synthetic_segmentation(cfg.data, cfg.data.train, (64, 64), native=False).images
    assert len(images) == cfg.data.train.clips * cfg.data.train.samples_per_clip


def test_unusable_background_files_are_one_line_errors(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with pytest.raises(BlinkflowError, match=rf"^{notes}: not an image or video .*; list images, videos or folders$"):
        bg.background_pool((str(notes),))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BlinkflowError, match=rf"^{empty}: no images or videos in the folder"):
        bg.background_pool((str(empty),))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(BlinkflowError, match=rf"^{broken}: ") as caught:
        bg.background_pool((str(broken),))
    assert "\n" not in str(caught.value)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"JFIF but truncated")
    with pytest.raises(BlinkflowError, match=rf"^{photo}: cannot read the image"):
        bg.background_pool((str(photo),))


def test_the_evaluation_names_the_real_backgrounds_it_used(tmp_path, real_media):
    from blinkflow.models.training.train import describe_eval_set

    tree = real_media / "video" / "tree.avi"
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"data.val.backgrounds=[{tree}]", "data.val.real_fraction=1"])
    assert describe_eval_set(cfg).endswith("(4 clips x 2, 96x72), 100% of them over real backgrounds from tree.avi")
    plain = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml")
    assert describe_eval_set(plain).endswith("(4 clips x 2, 96x72)")


def test_dead_leaves_cover_the_frame_with_clutter_of_every_size():
    leaves = bg.dead_leaves(4, 96, 72)
    assert leaves.shape == (72, 96, 3) and leaves.dtype == np.float32
    np.testing.assert_array_equal(leaves, bg.dead_leaves(4, 96, 72))
    assert not np.array_equal(leaves, bg.dead_leaves(5, 96, 72))
    edges = np.abs(np.diff(leaves, axis=1)).max(axis=2) > 20  # a colour step: the edge of a leaf
    assert edges.mean() > 0.1  # cluttered everywhere, unlike the smooth procedural backgrounds
    smooth = SceneGenerator(4, 96, 72, num_objects=1, lighting=False).render_image(0).astype(np.float32)
    assert edges.mean() > 5 * (np.abs(np.diff(smooth, axis=1)).max(axis=2) > 20).mean()


def test_clutter_takes_the_share_after_the_real_backgrounds():
    seeds = range(3000)
    real = [bg.uses_real_background(s, 0.4) for s in seeds]
    clutter = [bg.uses_clutter(s, 0.4, 0.3) for s in seeds]
    assert not any(r and c for r, c in zip(real, clutter))
    assert 0.37 < np.mean(real) < 0.43 and 0.27 < np.mean(clutter) < 0.33
    assert not any(bg.uses_clutter(s, 0.4, 0.0) for s in range(200))


def test_a_split_with_clutter_and_no_real_files_draws_dead_leaves(tmp_path):
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"out_dir={tmp_path}", "data.train.clutter_fraction=1"])
    real = ds.synthetic_segmentation(cfg.data, cfg.data.train, (64, 64), native=False)
    cfg.data.train.clutter_fraction = 0.0
    plain = ds.synthetic_segmentation(cfg.data, cfg.data.train, (64, 64), native=False)
    assert real.labels.equal(plain.labels)
    first = SceneGenerator(0, 96, 72, background=bg.dead_leaves(0, 96, 72)).render(0)
    assert ds.to_model_input([first.image], (64, 64)).equal(real.images[:1])


def test_clutter_config_errors_name_the_key(real_media):
    with pytest.raises(ConfigError, match=r"^data\.train\.clutter_fraction: clutter backgrounds are for the detect and segment tasks, not 'action'"):
        load_train_config(TRAIN_CONFIGS / "smoke-action.yaml", ["data.train.clutter_fraction=0.2"])
    video = real_media / "video" / "realshort.mp4"
    with pytest.raises(ConfigError, match=r"^data\.val\.clutter_fraction: 0\.6 plus real_fraction 0\.5 is more than all the clips"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"data.val.backgrounds=[{video}]", "data.val.clutter_fraction=0.6"])
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["data.val.clutter_fraction=0.6"])  # no real files: fine
    from blinkflow.models.training.train import describe_eval_set

    assert describe_eval_set(cfg).endswith(", 60% over clutter (dead leaves)")
