"""models.training: configs, presets, readers, metrics, the train loop, resume, the CLI and Ray Train."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from blinkflow.models.classes import SYNTHETIC_ACTIONS, SYNTHETIC_CLASSES
from blinkflow.models.training import datasets as ds
from blinkflow.models.training import metrics
from blinkflow.models.training.config import DataConfig, load_train_config
from blinkflow.errors import BlinkflowError, ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_CONFIGS = REPO_ROOT / "configs" / "train"
TASKS = ["detect", "segment", "flow", "action"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def smoke_config(task: str, tmp_path: Path, *overrides: str):
    return load_train_config(TRAIN_CONFIGS / f"smoke-{task}.yaml", [f"out_dir={tmp_path / task}", *overrides], task=task)


def quiet_runtime():
    from blinkflow.models.training.train import Runtime

    return Runtime(progress=False)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("task", TASKS)
def test_shipping_and_smoke_configs_load(task):
    for name in (f"{task}.yaml", f"smoke-{task}.yaml"):
        cfg = load_train_config(TRAIN_CONFIGS / name, task=task)
        assert cfg.task == task


def test_unknown_config_key_names_its_path():
    with pytest.raises(ConfigError, match=r"^optim\.learning_rate: unknown key; valid keys here: optimizer, lr"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["optim.learning_rate=0.1"])


def test_overlapping_held_out_seeds_are_rejected():
    with pytest.raises(ConfigError, match=r"^data\.val\.first_seed: seeds 5\.\.8 overlap the training seeds 0\.\.15; move"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["data.val.first_seed=5"])


def test_config_for_another_task_is_rejected():
    with pytest.raises(ConfigError, match=r"^task: the config trains 'segment' but the command asked for 'flow'"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", task="flow")


def test_missing_dataset_path_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.train_path: .*nope\.json' does not exist"):
        load_train_config(TRAIN_CONFIGS / "smoke-detect.yaml", [f"data.train_path={tmp_path / 'nope.json'}"])


# --------------------------------------------------------------------------- presets


def test_sizes_default_to_the_stage_presets():
    from blinkflow.stages.action import ActionOptions
    from blinkflow.stages.flow import FlowOptions
    from blinkflow.stages.segment import SegmentOptions

    data = DataConfig()
    assert ds.input_size("segment", data) == tuple(SegmentOptions().input_size)
    assert ds.input_size("flow", data) == tuple(FlowOptions().input_size)
    assert ds.input_size("action", data) == tuple(ActionOptions().input_size)
    assert ds.clip_len(data) == ActionOptions().clip_len
    assert ds.input_size("detect", data) is None  # the detector's own resize, as the stage does


def test_model_input_is_exactly_what_the_stage_feeds():
    from blinkflow.frame import Frame
    from blinkflow.stages.common import frames_to_batch

    image = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    stage = frames_to_batch([Frame("s", 0, 0.0, image)], torch.device("cpu"), size=(64, 80))
    assert torch.equal(ds.to_model_input([image], (64, 80)).float() / 255.0, stage)


def test_resized_flow_is_rescaled_to_the_new_pixels():
    flow = np.zeros((72, 96, 2), np.float32)
    flow[..., 0], flow[..., 1] = 3.0, -2.0
    resized = ds.resize_flow(flow, (36, 24))
    assert resized.shape == (2, 36, 24)
    assert torch.allclose(resized[0], torch.tensor(3.0 * 24 / 96)) and torch.allclose(resized[1], torch.tensor(-2.0 * 36 / 72))


def test_synthetic_held_out_labels_are_the_generator_ground_truth():
    from blinkflow.models.training.config import SplitConfig
    from blinkflow.models.training.scenes import SceneGenerator

    data = DataConfig(width=64, height=48)
    split = SplitConfig(first_seed=7, clips=1, samples_per_clip=2, frame_step=5)
    examples = ds.synthetic_segmentation(data, split, (32, 32), native=True)
    truth = SceneGenerator(7, 64, 48, 3).render(5).semantic
    assert np.array_equal(examples.native[1].numpy(), truth)
    assert examples.labels.shape == (2, 32, 32) and examples.images.dtype == torch.uint8


def test_consistency_pairs_are_the_next_frames_and_stay_aligned_through_augmentation():
    from blinkflow.models.training.config import SplitConfig
    from blinkflow.models.training.scenes import SceneGenerator
    from blinkflow.models.training.tasks import make_task

    data = DataConfig(width=64, height=48)
    split = SplitConfig(first_seed=7, clips=1, samples_per_clip=2, frame_step=5)
    examples = ds.synthetic_segmentation(data, split, (32, 32), native=False, pair_gap=2)
    partner_images, partner_labels = examples.pairs
    assert torch.equal(partner_images[1], ds.to_model_input([SceneGenerator(7, 64, 48, 3).render(7).image], (32, 32))[0])
    assert torch.equal(partner_labels[0], ds.resize_labels(SceneGenerator(7, 64, 48, 3).render(2).semantic, (32, 32)))
    # a pair is cropped and flipped alike: partners equal to their samples stay equal, samples differ from each other
    task = make_task(load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["consistency.weight=1", "data.crop=[24, 24]"]))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 6, (6, 32, 32), dtype=torch.uint8)
    items = [{"image": im, "label": la, "pair_image": im, "pair_label": la} for im, la in zip(images, labels)]
    torch.manual_seed(3)
    batch_images, batch_labels, _, paired = task.collate(items, train=True)
    assert paired and batch_images.shape == (12, 3, 24, 24)
    assert torch.equal(batch_images[:6], batch_images[6:]) and torch.equal(batch_labels[:6], batch_labels[6:])
    assert not torch.equal(batch_images[0], batch_images[1])


def test_paired_segment_loss_adds_the_weighted_disagreement(tmp_path):
    from blinkflow.models.training.tasks import make_task, pair_disagreement
    from blinkflow.models.training.train import main

    cfg = smoke_config("segment", tmp_path, "consistency.weight=2.5", "epochs=1")
    task = make_task(cfg)
    torch.manual_seed(0)
    model = task.build_model(SYNTHETIC_CLASSES)
    items = [task.train_set()[i] for i in range(3)]
    images, labels, natives, paired = task.collate(items)
    assert paired and len(images) == 6
    logits = model(images)["out"]
    cross_entropy = torch.nn.functional.cross_entropy(logits, labels)
    disagreement = pair_disagreement(logits, labels)
    assert disagreement.item() > 0  # an untrained net does not see two frames alike
    assert task.loss(model, (images, labels, natives, paired)).item() == pytest.approx((cross_entropy + 2.5 * disagreement).item(), rel=1e-5)
    summary = main(cfg, resume=False, runtime=quiet_runtime())
    assert summary["steps"] == 8 and all(math.isfinite(loss) for _, loss in summary["history"]["train_loss"])


def test_pair_disagreement_counts_only_pixels_of_one_true_class_in_both_frames():
    from blinkflow.models.training.tasks import pair_disagreement

    labels = torch.zeros(2, 2, 2, dtype=torch.long)
    labels[1, 0, 0] = 1  # the partner's top-left pixel changed class: it does not count
    logits = torch.zeros(2, 2, 2, 2)
    assert pair_disagreement(logits, labels).item() == 0.0  # the same probabilities everywhere
    logits[1, 0, 0, 0] = 5.0  # differs only where the class changed
    assert pair_disagreement(logits, labels).item() == 0.0
    logits[1, 0, 1, 1] = math.log(3.0)  # the partner says (1/4, 3/4) at one counted pixel, the sample (1/2, 1/2)
    one_pixel = 0.5 * ((0.5 - 0.25) * math.log(0.5 / 0.25) + (0.5 - 0.75) * math.log(0.5 / 0.75))
    assert pair_disagreement(logits, labels).item() == pytest.approx(one_pixel / 3, rel=1e-5)
    # the hardest third of the 3 counted pixels is the one that disagrees
    assert pair_disagreement(logits, labels, hardest=1 / 3).item() == pytest.approx(one_pixel, rel=1e-5)


def test_pair_disagreement_leaves_out_pixels_near_a_class_boundary():
    from blinkflow.models.training.tasks import pair_disagreement

    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, 6:] = 1  # a class edge between columns 5 and 6, in both frames
    logits = torch.zeros(2, 2, 8, 8)
    logits[1, 1, :, 4] = math.log(3.0)  # the frames disagree on column 4 only: 2 px from the edge
    assert pair_disagreement(logits, labels).item() > 0
    assert pair_disagreement(logits, labels, margin=1).item() > 0  # column 4 is 2 px away: it still counts
    assert pair_disagreement(logits, labels, margin=2).item() == 0.0  # now within the margin
    labels[1, 0, 0] = 1  # the partner's corner changes class: its neighbourhood leaves the count as well
    logits = torch.zeros(2, 2, 8, 8)
    logits[1, 1, 1, 1] = 2.0  # the frames disagree next to that corner only
    assert pair_disagreement(logits, labels).item() > 0
    assert pair_disagreement(logits, labels, margin=1).item() == 0.0


def test_consistency_is_for_synthetic_segment_training_only(tmp_path):
    with pytest.raises(ConfigError, match=r"^consistency\.weight: only the segment task .* not 'flow'; set it to 0"):
        load_train_config(TRAIN_CONFIGS / "smoke-flow.yaml", ["consistency.weight=1"])
    coco = tmp_path / "a.json"
    coco.write_text("{}")
    with pytest.raises(ConfigError, match=r"^consistency\.weight: needs frame pairs of synthetic clips, but data\.train_path"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["consistency.weight=1", f"data.train_path={coco}"])
    with pytest.raises(ConfigError, match=r"^consistency\.gap: "):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["consistency.gap=0"])


def test_synthetic_action_clips_are_balanced():
    from blinkflow.models.training.config import SplitConfig

    split = SplitConfig(first_seed=0, clips=14, samples_per_clip=1)
    clips = ds.synthetic_clips(DataConfig(width=32, height=32), split, (16, 16), length=2)
    assert clips.clips.shape == (14, 3, 2, 16, 16)
    assert np.bincount(clips.labels.numpy()).tolist() == [2] * len(SYNTHETIC_ACTIONS)


# --------------------------------------------------------------------------- metrics


def test_box_map_of_perfect_detections_is_one():
    targets = [{"boxes": [[10, 10, 50, 40], [60, 5, 90, 30]], "labels": [1, 2]}]
    predictions = [{"boxes": [[10, 10, 50, 40], [60, 5, 90, 30]], "labels": [1, 2], "scores": [0.9, 0.8]}]
    assert metrics.box_map(predictions, targets, num_classes=3) == pytest.approx({"map": 1.0, "map50": 1.0, "map75": 1.0})


def test_box_map_hand_computed_cases():
    targets = [{"boxes": [[0, 0, 100, 100]], "labels": [1]}]
    # IoU 0.6: a hit at 0.5, a miss at 0.75
    shifted = [{"boxes": [[0, 0, 100, 60]], "labels": [1], "scores": [0.9]}]
    result = metrics.box_map(shifted, targets, num_classes=2)
    assert result["map50"] == pytest.approx(1.0) and result["map75"] == 0.0
    # a false positive ranked above the true positive: precision 1/2 at recall 1, so AP 0.5
    ranked = [{"boxes": [[200, 200, 240, 240], [0, 0, 100, 100]], "labels": [1, 1], "scores": [0.9, 0.8]}]
    assert metrics.box_map(ranked, targets, num_classes=2)["map50"] == pytest.approx(0.5)
    # the right box with the wrong class finds nothing
    assert metrics.box_map([{"boxes": [[0, 0, 100, 100]], "labels": [2], "scores": [1.0]}], targets, 3)["map50"] == 0.0


def test_segmentation_scores_hand_computed():
    target = np.array([[0, 0], [1, 1]])
    prediction = np.array([[0, 1], [1, 1]])
    confusion = metrics.confusion_matrix(prediction, target, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]
    scores = metrics.segmentation_scores(confusion)
    # class 0: 1 / (1 + 1); class 1: 2 / (2 + 1); class 2 absent from both, so not averaged
    assert scores["iou"] == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert scores["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(0.75)


def test_topk_accuracy_hand_computed():
    logits = [[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]]
    assert metrics.topk_accuracy(logits, [2, 1], ks=(1, 2, 5)) == {"top1": 0.0, "top2": 1.0, "top5": 1.0}
    assert metrics.topk_accuracy(logits, [1, 0], ks=(1,)) == {"top1": 1.0}


def test_topk_accuracy_breaks_ties_like_argmax_and_fails_non_finite_rows():
    # a collapsed model (constant logits) is right only where argmax is: class 0
    assert metrics.topk_accuracy(np.zeros((7, 7)), np.arange(7), ks=(1, 5)) == {"top1": 1 / 7, "top5": 5 / 7}
    assert metrics.topk_accuracy(np.full((7, 7), np.nan), np.arange(7), ks=(1, 5)) == {"top1": 0.0, "top5": 0.0}
    logits = [[0.1, np.inf, 0.4], [0.9, 0.05, 0.05]]  # the first row is non-finite, the second is right
    assert metrics.topk_accuracy(logits, [1, 0], ks=(1,)) == {"top1": 0.5}


def test_flow_metrics_are_the_shared_ones_and_agree_with_hand_cases():
    from blinkflow.models import metrics_flow

    assert metrics.epe is metrics_flow.epe and metrics.fl_all is metrics_flow.fl_all
    truth = np.zeros((4, 4, 2), np.float32)
    off_by_one, off_by_four = truth + [1.0, 0.0], truth + [0.0, 4.0]
    assert metrics.epe(off_by_one, truth) == pytest.approx(1.0) and metrics.fl_all(off_by_one, truth) == 0.0
    assert metrics.epe(off_by_four, truth) == pytest.approx(4.0) and metrics.fl_all(off_by_four, truth) == 1.0


def test_flow_is_evaluated_in_the_truths_pixels():
    from blinkflow.models.training.tasks import _at_truth_size

    flow = torch.ones(2, 32, 40)  # 1 px right and down at a 40x32 model input
    resampled = _at_truth_size(flow, torch.zeros(64, 120, 2))
    assert resampled.shape == (64, 120, 2)
    assert np.allclose(resampled[..., 0], 3.0) and np.allclose(resampled[..., 1], 2.0)


# --------------------------------------------------------------------------- readers


def test_coco_reader_converts_boxes_and_rle_masks(real_media):
    coco = ds.read_coco(real_media / "coco" / "detections.json")
    detections = ds.coco_detection(coco)
    assert len(detections) == 2 and detections.classes[:2] == ["background", "person"]
    first = json.loads((real_media / "coco" / "detections.json").read_text())["annotations"][0]
    x, y, w, h = first["bbox"]
    assert [x, y, x + w, y + h] in detections[0]["target"]["boxes"].tolist()
    image = coco.images[0]
    semantic = ds.coco_semantic_map(coco, image, {first["category_id"]: 1})
    assert semantic.shape == (image["height"], image["width"]) and semantic.sum() >= first["area"] * 0.9


def test_coco_categories_that_are_not_model_classes_are_an_error(real_media):
    coco = ds.read_coco(real_media / "coco" / "detections.json")
    with pytest.raises(BlinkflowError, match=r"none of its categories .* are classes of the model \(disc, square"):
        ds.coco_detection(coco, list(SYNTHETIC_CLASSES))


def test_coco_polygon_masks_are_filled(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 3, "bbox": [2, 4, 10, 6], "iscrowd": 0, "area": 60,
                             "segmentation": [[2, 4, 12, 4, 12, 10, 2, 10]]}],
            "categories": [{"id": 3, "name": "square"}]}
    (tmp_path / "a.json").write_text(json.dumps(coco))
    examples = ds.coco_segmentation(ds.read_coco(tmp_path / "a.json"), (16, 16), list(SYNTHETIC_CLASSES))
    native = examples.native[0].numpy()
    assert set(np.unique(native)) == {0, SYNTHETIC_CLASSES.index("square")}
    assert native[6, 5] == SYNTHETIC_CLASSES.index("square") and native[15, 25] == 0


def test_flying_chairs_pairs_are_read(real_media):
    from blinkflow.models.metrics_flow import read_flo

    pairs = ds.find_flow_pairs(real_media / "flow")
    assert [p.name for p in pairs[0]] == ["00001_img1.ppm", "00001_img2.ppm", "00001_flow.flo"]
    examples = ds.flow_pairs_dataset(pairs, (32, 32))
    native_flow, valid = examples.native[0]
    assert np.array_equal(native_flow.numpy(), read_flo(pairs[0][2])) and bool(valid.all())
    assert examples.flow.shape == (1, 2, 32, 32)


def _write_png(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(path)


def test_sintel_and_middlebury_layouts_are_found(tmp_path):
    from blinkflow.models.metrics_flow import write_flo

    flow = np.zeros((8, 10, 2), np.float32)
    (tmp_path / "sintel/training/flow/alley").mkdir(parents=True)
    write_flo(tmp_path / "sintel/training/flow/alley/frame_0001.flo", flow)
    for name in ("frame_0001.png", "frame_0002.png"):
        _write_png(tmp_path / "sintel/training/clean/alley" / name)
    (tmp_path / "middlebury/other-gt-flow/Venus").mkdir(parents=True)
    write_flo(tmp_path / "middlebury/other-gt-flow/Venus/flow10.flo", flow)
    for name in ("frame10.png", "frame11.png"):
        _write_png(tmp_path / "middlebury/other-data/Venus" / name)
    sintel = ds.find_flow_pairs(tmp_path / "sintel")
    assert [p.name for p in sintel[0][:2]] == ["frame_0001.png", "frame_0002.png"]
    middlebury = ds.find_flow_pairs(tmp_path / "middlebury")
    assert [p.name for p in middlebury[0][:2]] == ["frame10.png", "frame11.png"]
    with pytest.raises(BlinkflowError, match="no .flo file with both of its images"):
        ds.find_flow_pairs(tmp_path / "middlebury" / "other-data")


def test_video_tree_is_read_with_class_per_folder(tmp_path):
    from blinkflow.models.training.scenes import export_action_tree

    export_action_tree(tmp_path / "tree", clips_per_class=1, num_frames=4, width=32, height=32)
    classes, videos = ds.find_video_tree(tmp_path / "tree")
    assert classes == SYNTHETIC_ACTIONS  # the order of classInd.txt, not alphabetical
    clips = ds.video_tree_dataset(tmp_path / "tree", length=6, size=(16, 16), classes=list(SYNTHETIC_ACTIONS))
    assert clips.clips.shape == (7, 3, 6, 16, 16)
    assert sorted(clips.labels.tolist()) == list(range(7))
    assert torch.equal(clips.clips[0][:, 4], clips.clips[0][:, 5])  # a short video repeats its last frame


def test_a_class_index_that_leaves_out_a_folder_or_is_malformed_says_where(tmp_path):
    import shutil

    video = REPO_ROOT / "tests" / "data" / "video" / "realshort.mp4"
    for name in ("walk", "run"):
        (tmp_path / name).mkdir()
        shutil.copy(video, tmp_path / name / "a.mp4")
    shutil.copy(video, tmp_path / "run" / "b.m4v")  # a suffix the pipeline reads: training reads it too
    (tmp_path / ".ipynb_checkpoints").mkdir()  # a hidden folder became class 0 of a shipped model
    assert ds.find_video_tree(tmp_path)[0] == ["run", "walk"]
    (tmp_path / "classInd.txt").write_text("1 walk\n2 run\n")
    classes, videos = ds.find_video_tree(tmp_path)
    assert classes == ["walk", "run"] and sorted((v.name, c) for v, c in videos) == [("a.mp4", 0), ("a.mp4", 1), ("b.m4v", 1)]
    (tmp_path / "classInd.txt").write_text("1 walk\n2 Run\n")  # the run clips were dropped, silently
    with pytest.raises(BlinkflowError, match="classInd.txt: names no class 'run', a folder of the tree"):
        ds.find_video_tree(tmp_path)
    (tmp_path / "classInd.txt").write_text("1 walk\n2run\n")  # was an IndexError traceback
    with pytest.raises(BlinkflowError, match=r"classInd.txt:2: '2run' is not '<number> <class>'"):
        ds.find_video_tree(tmp_path)


# --------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_smoke_training_lowers_the_loss(task, tmp_path):
    from blinkflow.models.training.train import main

    summary = main(smoke_config(task, tmp_path), resume=False, runtime=quiet_runtime())
    (_, first), (_, last) = summary["history"]["probe_loss"][0], summary["history"]["probe_loss"][-1]
    assert last < 0.75 * first, summary["history"]["probe_loss"]
    primary = {"detect": "map50", "segment": "miou", "flow": "epe", "action": "top1"}[task]
    assert primary in summary["metrics"]
    assert (tmp_path / task / "checkpoint.pt").is_file() and (tmp_path / task / "metrics.json").is_file()


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    from blinkflow.models.training import train

    cfg = smoke_config("segment", tmp_path, "epochs=2", "eval_every=1")
    train.main(cfg, resume=False, runtime=quiet_runtime())
    uninterrupted = torch.load(tmp_path / "segment" / "checkpoint.pt", weights_only=True)

    killed = smoke_config("segment", tmp_path / "killed", "epochs=2", "eval_every=1")
    real_epoch, calls = train.train_one_epoch, []

    def dies_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed after the first checkpoint
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(killed, resume=True, runtime=quiet_runtime())
    saved = torch.load(tmp_path / "killed" / "segment" / "checkpoint.pt", weights_only=True)
    assert set(saved) >= {"model", "optimizer", "scheduler", "epoch", "step", "config"} and saved["epoch"] == 1
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    summary = train.main(killed, resume=True, runtime=quiet_runtime())
    resumed = torch.load(tmp_path / "killed" / "segment" / "checkpoint.pt", weights_only=True)
    assert summary["epochs"] == 2 and resumed["step"] == uninterrupted["step"]
    for key, value in uninterrupted["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_resuming_with_another_config_is_refused(tmp_path):
    from blinkflow.models.training.train import CheckpointError, main

    main(smoke_config("segment", tmp_path, "epochs=1"), resume=False, runtime=quiet_runtime())
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: it was trained with a different config \(differs in: seed\)"):
        main(smoke_config("segment", tmp_path, "epochs=1", "seed=1"), resume=True, runtime=quiet_runtime())


@pytest.mark.slow
def test_init_starts_from_given_weights_and_records_them(tmp_path):
    """Fine-tuning: with a learning rate of 0 the trained parameters are exactly the init file's, and
    without ``init`` they are not; the run records the file with its sha256 (the manifest gets it)."""
    from blinkflow.models.training.tasks import make_task
    from blinkflow.models.training.train import main
    from blinkflow.models.weights import sha256_file

    main(smoke_config("segment", tmp_path / "first", "epochs=1"), resume=False, runtime=quiet_runtime())
    start = tmp_path / "start.pt"
    torch.save(torch.load(tmp_path / "first" / "segment" / "checkpoint.pt", weights_only=True)["model"], start)
    task = make_task(smoke_config("segment", tmp_path))
    names = [name for name, _ in task.build_model(task.default_classes).named_parameters()]  # not the BN statistics

    def parameters_after(*overrides: str) -> tuple[dict, dict]:
        out = tmp_path / f"run{len(overrides)}"
        summary = main(smoke_config("segment", out, "epochs=1", "optim.lr=0.0", *overrides), resume=False,
                       runtime=quiet_runtime())
        trained = torch.load(out / "segment" / "checkpoint.pt", weights_only=True)["model"]
        return {n: trained[n] for n in names}, summary

    initial = torch.load(start, weights_only=True)
    fine_tuned, summary = parameters_after(f"init={start}")
    assert all(torch.equal(fine_tuned[n], initial[n]) for n in names)
    assert summary["initialised_from"] == f"{start} (sha256 {sha256_file(start)})"
    scratch, summary = parameters_after()
    assert not all(torch.equal(scratch[n], initial[n]) for n in names) and summary["initialised_from"] is None


def test_init_that_does_not_exist_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^init: .*nope\.pt.* does not exist; name a weights file, 'shipped' or null$"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"init={tmp_path / 'nope.pt'}"])


def test_cli_trains_ships_and_evaluates(tmp_path, monkeypatch, capsys, real_media):
    from blinkflow.models import weights
    from blinkflow.cli import main as cli

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    config = str(TRAIN_CONFIGS / "smoke-segment.yaml")
    out = f"out_dir={tmp_path / 'run'}"
    assert cli(["train", "segment", "--config", config, "--set", out, "--set", "epochs=1", "--ship", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "weights" / "manifest.json").read_text())
    entry = manifest["weights"][0]
    assert entry["file"] == "segment-unet_small.pt" and entry["classes"] == SYNTHETIC_CLASSES
    assert "miou" in entry["metrics"] and entry["config"]["model_args"] == {"base_width": 8}
    capsys.readouterr()
    assert cli(["eval", "segment", "--config", config, "--set", out, "--weights", "shipped"]) == 0
    assert f"miou {entry['metrics']['miou']:.4f}" in capsys.readouterr().out  # same weights, same held-out split
    assert cli(["eval", "segment", "--config", config, "--set", out, "--data", str(real_media / "coco" / "detections.json")]) == 2
    assert "none of its categories" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_reads_an_exported_coco_dataset(tmp_path):
    from blinkflow.models.training.scenes import SceneGenerator, export_coco
    from blinkflow.models.training.train import main, run_eval

    cfg = smoke_config("detect", tmp_path, "epochs=1")
    main(cfg, resume=False, runtime=quiet_runtime())
    export_coco(SceneGenerator(123, 96, 72), tmp_path / "coco.json", num_frames=2)
    result = run_eval(cfg, data=str(tmp_path / "coco.json"))
    assert result["examples"] == 2 and set(result["metrics"]) == {"map", "map50", "map75"}


# --------------------------------------------------------------------------- Ray Train


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    try:
        import ray.train  # noqa: F401 - needs the ray[train] extra
    except ImportError:
        pytest.skip("ray[train] is not installed")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_ray_train_with_two_workers_trains_and_resumes(tmp_path, monkeypatch, ray_two_cpus):
    from blinkflow.models.training.distributed import train_distributed

    monkeypatch.chdir(tmp_path)  # a relative out_dir: the workers write there, the records keep it as written
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["out_dir=segment", "epochs=2", "eval_every=1"])
    summary = train_distributed(cfg, workers=2, resume=False)
    # 16 clips x 2 frames, sharded over 2 workers, 4 per batch: 4 steps per epoch
    assert summary["workers"] == 2 and summary["steps"] == 8 and summary["epochs"] == 2
    assert summary["history"]["probe_loss"][-1][1] < summary["history"]["probe_loss"][0][1]
    assert list((tmp_path / "segment" / "ray-train").glob("checkpoint_*"))
    assert torch.load(tmp_path / "segment" / "checkpoint.pt", weights_only=True)["config"] == cfg.to_dict()
    again = train_distributed(cfg, workers=2, resume=True)  # everything done: resumes at the end
    assert again["steps"] == 8 and again["history"] == summary["history"]


def test_workers_refuse_to_start_over_a_run_without_workers_that_got_further(tmp_path):
    """--workers resumes from Ray Train's checkpoints only: a single-process run's finished epochs were thrown away
    and its checkpoint.pt overwritten from step 0, without a word."""
    from blinkflow.models.training.distributed import RAY_RUN_NAME, _check_no_plain_run_ahead, train_distributed

    cfg = smoke_config("segment", tmp_path)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True)
    torch.save({"step": 8, "epoch": 1}, out_dir / "checkpoint.pt")
    with pytest.raises(ConfigError, match=r"checkpoint.pt: a run without --workers got to step 8 and Ray Train has "
                                          r"none; resume it without --workers, or pass --fresh"):
        train_distributed(cfg, workers=1, resume=True)  # before Ray starts
    (out_dir / RAY_RUN_NAME / "checkpoint_000001").mkdir(parents=True)
    torch.save({"step": 4, "epoch": 0}, out_dir / RAY_RUN_NAME / "checkpoint_000001" / "checkpoint.pt")
    with pytest.raises(ConfigError, match="Ray Train's last is at step 4"):
        _check_no_plain_run_ahead(out_dir)
    torch.save({"step": 8, "epoch": 1}, out_dir / RAY_RUN_NAME / "checkpoint_000001" / "checkpoint.pt")
    _check_no_plain_run_ahead(out_dir)  # rank 0 writes checkpoint.pt beside Ray's own: the same step


@pytest.mark.slow
def test_ray_train_refuses_cuda_workers_on_a_cluster_without_gpus(tmp_path, ray_two_cpus):
    import ray

    from blinkflow.models.training.distributed import train_distributed

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has GPUs")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' with --workers 1 needs 1 GPUs but the Ray cluster has 0"):
        train_distributed(smoke_config("segment", tmp_path, "device=cuda"), workers=1, resume=False)


# --------------------------------------------------------------------------- shipped weights

def third_party(entry: dict) -> bool:
    """Converted third-party weights, or weights fine-tuned from them."""
    return bool(entry.get("source") or entry.get("derived_from"))


def shipped_entry(task: str) -> dict:
    from blinkflow.models.weights import WEIGHTS_DIR, read_manifest

    # the self-trained entries; converted third-party weights carry a "source", fine-tunes of them "derived_from"
    entries = [e for e in read_manifest(WEIGHTS_DIR)["weights"] if e["stage"] == task and not third_party(e)]
    assert len(entries) == 1, f"models/weights/manifest.json: expected one self-trained {task} entry, got {len(entries)}"
    return entries[0]


@pytest.mark.parametrize("task", TASKS)
def test_shipped_weights_are_verified_and_reproducible_from_their_config(task, tmp_path):
    from blinkflow.models.weights import WEIGHTS_DIR, WeightsError, load_state, resolve_weights, sha256_file
    from blinkflow.models.training.tasks import make_task

    entry = shipped_entry(task)
    path = WEIGHTS_DIR / entry["file"]
    assert entry["sha256"] == sha256_file(path) and entry["size"] == path.stat().st_size
    # the manifest's config is exactly configs/train/<task>.yaml: `blinkflow train <task> --config ... --ship` reproduces the file
    cfg = load_train_config(TRAIN_CONFIGS / f"{task}.yaml", task=task)
    assert entry["config"] == cfg.to_dict() and entry["model"] == cfg.model
    assert entry["file"] == f"{task}-{cfg.model}.pt"
    task_ = make_task(cfg)
    assert entry["classes"] == task_.default_classes
    spec = resolve_weights("shipped", stage=task, model_name=cfg.model)
    assert spec.sha256 == entry["sha256"]
    load_state(task_.build_model(spec.classes), spec)  # sha256 checked, every tensor matched by name and shape
    # a replaced file is refused
    tampered = tmp_path / entry["file"]
    tampered.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        load_state(task_.build_model(spec.classes), dataclasses.replace(spec, path=tampered))


def test_shipped_weights_fit_the_size_budget():
    from blinkflow.models.weights import WEIGHTS_DIR, read_manifest

    entries = read_manifest(WEIGHTS_DIR)["weights"]
    own = sum((WEIGHTS_DIR / e["file"]).stat().st_size for e in entries if not third_party(e))
    converted = sum((WEIGHTS_DIR / e["file"]).stat().st_size for e in entries if third_party(e))
    total = sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir() if p.is_file())
    assert own <= 30e6, f"self-trained weights hold {own / 1e6:.1f} MB (budget 30 MB)"
    assert converted <= 45e6, f"converted real weights hold {converted / 1e6:.1f} MB (budget 45 MB)"
    assert total <= 75e6, f"models/weights/ holds {total / 1e6:.1f} MB (budget 75 MB)"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_shipped_metrics_are_those_of_the_files(task):
    """Re-evaluate each shipped file on its held-out synthetic split: the manifest's numbers are the file's."""
    from blinkflow.models.training.train import run_eval

    entry = shipped_entry(task)
    cfg = load_train_config(TRAIN_CONFIGS / f"{task}.yaml", task=task)
    result = run_eval(cfg, weights="shipped")
    recorded = entry["metrics"]
    assert result["data"] == recorded["evaluated_on"]
    for name, value in result["metrics"].items():
        assert value == pytest.approx(recorded[name], abs=1e-6), name


@pytest.mark.parametrize("document, problem", [
    ({"images": 3, "annotations": [], "categories": []}, "'images' is not a list"),
    ({"images": [{"id": 1}], "annotations": [], "categories": []}, "images[0] has no 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"category_id": 1, "bbox": [0, 0, 1, 1]}],
      "categories": [{"id": 1, "name": "car"}]}, "annotations[0] has no 'image_id'"),
    ({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": "x"}],
      "categories": [{"id": 1, "name": "car"}]}, "annotations[0].bbox is not [x, y, width, height]"),
    ({"images": [], "annotations": [], "categories": [{"id": "1"}]}, "categories[0] has no 'id'"),
])
def test_a_malformed_coco_file_is_one_line_naming_the_entry(tmp_path, document, problem):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ds.DatasetError, match=re.escape(f"c.json: not a COCO instances file ({problem}")):
        ds.read_coco(path)


def test_an_image_too_large_or_of_another_size_than_its_entry_is_one_line(tmp_path, monkeypatch):
    """A 195-megapixel PNG (PIL's DecompressionBombError is no OSError) and an entry whose height and width disagree
    with its image (an IndexError painting the masks) were tracebacks."""
    from PIL import Image

    from blinkflow.models.training.media import read_image

    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 48 is then over twice the limit
    with pytest.raises(ds.DatasetError, match=r"a.png: the image is too large to train on .*; downscale it"):
        read_image(tmp_path / "a.png")
    monkeypatch.undo()
    document = {"images": [{"id": 1, "file_name": "a.png", "height": 100, "width": 100}], "annotations": [],
                "categories": [{"id": 1, "name": "car"}]}
    (tmp_path / "c.json").write_text(json.dumps(document))
    with pytest.raises(ds.DatasetError, match=r"c.json: image 1 is 64x48 on disk but its entry says 100x100; fix"):
        ds.coco_segmentation(ds.read_coco(tmp_path / "c.json"), (32, 32))


def test_a_negative_worker_count_is_refused(capsys):
    from blinkflow.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["train", "detect", "--config", "configs/train/smoke-detect.yaml", "--workers", "-1"])
    assert caught.value.code == 2 and "argument --workers: -1 is below 0; give 0 or more" in capsys.readouterr().err


# --------------------------------------------------------------------------- bad input under --workers, readers, CLI


@pytest.fixture
def ray_train():
    """Ray Train importable, for tests that stop before (or without) starting Ray."""
    pytest.importorskip("ray")
    try:
        import ray.train.torch  # noqa: F401 - needs the ray[train] extra
    except ImportError:
        pytest.skip("ray[train] is not installed")


@pytest.fixture
def no_ray_cluster(monkeypatch, ray_train):
    """A Ray 'cluster' of two CPUs and no GPU, without starting Ray."""
    import ray

    from blinkflow import ray_session

    monkeypatch.setattr(ray_session, "start_ray", lambda *a, **k: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})


def test_a_worker_shard_smaller_than_a_batch_is_refused_before_ray_starts(tmp_path, monkeypatch, ray_train):
    from blinkflow import ray_session
    from blinkflow.models.training.distributed import train_distributed

    monkeypatch.setattr(ray_session, "start_ray", lambda *a, **k: pytest.fail("Ray started"))
    cfg = smoke_config("segment", tmp_path, "batch_size=32")  # 16 clips x 2 frames: 16 per worker
    with pytest.raises(ConfigError, match=r"^batch_size: 32 is more than each worker's shard of the training set "
                                          r"\(16 of 32 examples over 2 workers\), so no step would be taken"):
        train_distributed(cfg, workers=2, resume=False)


def test_a_worker_whose_shard_holds_no_full_batch_stops_with_one_line(tmp_path):
    """Data the driver cannot count (real files): each worker checks its shard once loaded."""
    from blinkflow.models.training.distributed import seeded_shards
    from blinkflow.models.training.train import Runtime, main

    class SecondWorker(Runtime):
        def prepare_loader(self, loader):
            return seeded_shards(loader, self.rank, self.world_size)

    cfg = smoke_config("segment", tmp_path, "batch_size=32")
    with pytest.raises(ConfigError, match=r"^batch_size: 32 is more than each worker's shard .*\(16 of 32 examples"):
        main(cfg, resume=False, runtime=SecondWorker(rank=1, world_size=2, progress=False))
    assert not (tmp_path / "segment" / "checkpoint.pt").exists()


def test_a_workers_blinkflow_error_reaches_the_driver_as_one_line(ray_train):
    from blinkflow.models.training.distributed import _fit

    class FailingTrainer:
        def fit(self):
            error = RuntimeError("Training failed due to worker errors:\nTraceback (most recent call last): ...")
            error.worker_failures = {1: ConfigError("batch_size: too big; set it lower"), 0: RuntimeError("peer gone")}
            raise error

    with pytest.raises(BlinkflowError, match=r"^batch_size: too big; set it lower$"):
        _fit(FailingTrainer())


def test_cuda_workers_on_a_cluster_without_gpus_are_refused(tmp_path, monkeypatch, no_ray_cluster):
    import ray.train.torch

    from blinkflow.models.training.distributed import train_distributed

    # Ray would wait for the GPUs forever: fail at once if training is set up at all
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", lambda *a, **k: pytest.fail("training was started"))

    cfg = smoke_config("segment", tmp_path, "device=cuda")
    with pytest.raises(ConfigError, match=r"^device: 'cuda' with --workers 2 needs 2 GPUs but the Ray cluster has 0; "
                                          r"set device to cpu or auto"):
        train_distributed(cfg, workers=2, resume=False)


def test_workers_record_out_dir_as_written(tmp_path, monkeypatch, no_ray_cluster):
    """The driver resolves out_dir for the workers, but the config they record (checkpoint, manifest) is the YAML's."""
    import ray.train.torch

    from blinkflow.models import weights
    from blinkflow.models.training.distributed import train_distributed
    from blinkflow.models.training.train import Runtime, main

    class InProcessTrainer:  # runs the loop here with what the driver hands its workers
        def __init__(self, loop, *, train_loop_config, **_):
            self.config = train_loop_config

        def fit(self):
            config = self.config
            main(config["cfg"], resume=False, ship=config["ship"],
                 runtime=Runtime(progress=False, out_dir=Path(config.get("out_dir", config["cfg"].out_dir))))
            return type("Result", (), {"error": None})()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", InProcessTrainer)
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.chdir(tmp_path)
    cfg = load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", ["out_dir=runs/rel", "epochs=1"], task="segment")
    train_distributed(cfg, workers=2, resume=False, ship=True)
    entry = weights.read_manifest(tmp_path / "weights")["weights"][0]
    assert entry["config"] == cfg.to_dict() and entry["config"]["out_dir"] == "runs/rel"
    checkpoint = torch.load(tmp_path / "runs" / "rel" / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"]["out_dir"] == "runs/rel"


def test_worker_shards_are_shuffled_from_the_configs_seed(tmp_path, monkeypatch, ray_train):
    """Ray's prepare_data_loader keeps a DistributedSampler it finds; its own one would be seeded 0."""
    import ray.train.torch
    from torch.utils.data.distributed import DistributedSampler

    from blinkflow.models.training.distributed import RayRuntime
    from blinkflow.models.training.train import make_loader
    from blinkflow.models.training.tasks import make_task

    monkeypatch.setattr(ray.train.torch, "prepare_data_loader", lambda loader, **_: loader)
    orders = {}
    for seed in (0, 5):
        cfg = smoke_config("segment", tmp_path, f"seed={seed}", "data.train.clips=4")
        task = make_task(cfg)
        runtime = RayRuntime(rank=0, world_size=2)
        loader = runtime.prepare_loader(make_loader(task, task.train_set(), 2, train=True, seed=cfg.seed))
        assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.seed == seed
        runtime.set_epoch(loader, 1)
        orders[seed] = list(loader.sampler)
    assert orders[0] != orders[5] and len(orders[0]) == 4  # 8 examples, half each


def _tiny_coco(folder: Path, annotations: list[dict], image: dict | None = None) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(folder / "a.png")
    coco = {"images": [image or {"id": 5, "file_name": "a.png", "width": 30, "height": 20}],
            "annotations": [{"id": i + 1, "image_id": 5, "category_id": 3, "iscrowd": 0, **a} for i, a in enumerate(annotations)],
            "categories": [{"id": 3, "name": "square"}]}
    (folder / "a.json").write_text(json.dumps(coco))
    return folder / "a.json"


def test_coco_boxes_of_zero_width_or_height_are_dropped(tmp_path, caplog):
    path = _tiny_coco(tmp_path, [{"bbox": [2, 4, 10, 6]}, {"bbox": [5, 5, 0, 6]}, {"bbox": [5, 5, 4, 0]}])
    with caplog.at_level("WARNING", logger="blinkflow.models.training.datasets"):
        detections = ds.coco_detection(ds.read_coco(path), list(SYNTHETIC_CLASSES))
    assert detections[0]["target"]["boxes"].tolist() == [[2.0, 4.0, 12.0, 10.0]]
    assert "2 boxes of zero width or height are ignored" in caplog.text


def test_coco_images_without_height_and_width_take_the_decoded_size(tmp_path):
    square = [[2, 4, 12, 4, 12, 10, 2, 10]]
    path = _tiny_coco(tmp_path, [{"bbox": [2, 4, 10, 6], "area": 60, "segmentation": square}],
                      image={"id": 5, "file_name": "a.png"})
    examples = ds.coco_segmentation(ds.read_coco(path), (16, 16), list(SYNTHETIC_CLASSES))
    native = examples.native[0].numpy()
    assert native.shape == (20, 30) and (native == SYNTHETIC_CLASSES.index("square")).sum() == 60


@pytest.mark.parametrize("override, problem", [
    ("model_args.depth=3", r"unexpected keyword argument 'depth'"),
    ("model_args.base_width=-4", r""),
])
def test_model_args_the_builder_rejects_are_one_line(override, problem):
    with pytest.raises(ConfigError, match=rf"^model_args: unet_small cannot be built with .*{problem}.*\); "
                                          r"its arguments are: base_width$"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [override])


def test_reid_refuses_real_dataset_paths(tmp_path, real_media):
    from blinkflow.models.training.train import run_eval

    coco = str(real_media / "coco" / "detections.json")
    with pytest.raises(ConfigError, match=r"^data\.train_path: reid trains and is evaluated on synthetic identities"):
        load_train_config(TRAIN_CONFIGS / "smoke-reid.yaml", [f"data.train_path={coco}"], task="reid")
    cfg = smoke_config("reid", tmp_path)
    with pytest.raises(ConfigError, match=r"^--data: reid is evaluated on synthetic identities .*; drop --data$"):
        run_eval(cfg, data=coco)


def test_sideways_refuses_ship_workers_and_fresh(tmp_path, capsys):
    """--fresh was accepted and meant nothing: Sideways has no checkpoint to resume."""
    from blinkflow.cli import main as cli

    config = str(TRAIN_CONFIGS / "smoke-action.yaml")
    for flag in (["--ship"], ["--workers", "2"], ["--fresh"]):
        assert cli(["train", "action", "--config", config, "--sideways", *flag,
                    "--set", f"out_dir={tmp_path}", "--set", "epochs=1"]) == 2
        err = capsys.readouterr().err
        assert f"--sideways: cannot be combined with {flag[0]};" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "sideways.json").exists()


@pytest.mark.parametrize("flag", [["--stages", "3"], ["--sideways-executor", "ray"]])
def test_sideways_options_without_sideways_are_refused(flag, tmp_path, capsys):
    """They were ignored: an ordinary training ran."""
    from blinkflow.cli import main as cli

    config = str(TRAIN_CONFIGS / "smoke-action.yaml")
    assert cli(["train", "action", "--config", config, *flag, "--set", f"out_dir={tmp_path}", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"blinkflow: error: {flag[0]}: only with --sideways; add --sideways or drop {flag[0]}"
    assert not any(tmp_path.iterdir()), "nothing trained"


def test_sideways_stage_count_is_checked_by_argparse(capsys):
    """--stages 0 named a 'depth_parallel' option that training does not have."""
    from blinkflow.cli import main as cli

    with pytest.raises(SystemExit) as caught:
        cli(["train", "action", "--config", str(TRAIN_CONFIGS / "smoke-action.yaml"), "--sideways", "--stages", "0"])
    assert caught.value.code == 2 and "argument --stages: 0 is below 1" in capsys.readouterr().err


def test_the_readme_sideways_command_runs(tmp_path, monkeypatch, capsys):
    """The README showed configs/train/action.yaml, whose cosine schedule, warm-up and device: auto --sideways
    refuses; its command (with a tiny run and a temporary out_dir) must train."""
    import shlex

    from blinkflow.cli import main as cli

    monkeypatch.chdir(REPO_ROOT)  # its --config is relative to the clone
    lines = [line for line in (REPO_ROOT / "README.md").read_text().splitlines()
             if line.startswith("blinkflow train") and "--sideways" in line]
    assert len(lines) == 1, lines
    words = shlex.split(lines[0].split(" #", 1)[0])
    tiny = ["epochs=1", "data.train.clips=7", "data.val.clips=7", f"out_dir={tmp_path}"]
    assert cli([*words[1:], *(a for o in tiny for a in ("--set", o))]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "sideways.json").read_text())["results"][0]["steps"] == 1


def test_sideways_refuses_what_it_would_ignore(capsys):
    """init, sgd, a schedule, clipping, a GPU: Sideways trained a fresh model with AdamW at a constant lr anyway."""
    from blinkflow.cli import main as cli

    config = str(TRAIN_CONFIGS / "smoke-action.yaml")
    for setting, message in (("init=shipped", "--sideways: init: 'shipped' is not supported"),
                             ("optim.optimizer=sgd", "--sideways: optim.optimizer: 'sgd' is not supported"),
                             ("optim.schedule=cosine", "set optim.schedule='constant'")):
        assert cli(["train", "action", "--config", config, "--sideways", "--set", setting]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def test_eval_of_a_missing_weights_file_names_the_option(tmp_path, capsys):
    from blinkflow.cli import main as cli

    config = str(TRAIN_CONFIGS / "smoke-segment.yaml")
    assert cli(["eval", "segment", "--config", config, "--weights", str(tmp_path / "missing.pt")]) == 2
    assert re.search(r"error: --weights: file '.*missing\.pt' does not exist", capsys.readouterr().err)


def test_eval_checks_a_weights_files_pin_before_reading_it(tmp_path, monkeypatch, capsys):
    """eval read a --weights file (for the classes a checkpoint records) before its sha256 sidecar was checked:
    a swapped file was deserialised, a 2 MB zip bomb to 2.6 GB, before the mismatch was reported."""
    from blinkflow.cli import main as cli

    path = tmp_path / "seg.pt"
    torch.save({"model": {}, "classes": ["background", "x"]}, path)
    (tmp_path / "seg.pt.sha256").write_text("0" * 64 + "  seg.pt\n")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("the file was read before its pin was checked"))
    config = str(TRAIN_CONFIGS / "smoke-segment.yaml")
    assert cli(["eval", "segment", "--config", config, "--weights", str(path), "--set", f"out_dir={tmp_path}"]) == 2
    assert "seg.pt: sha256 mismatch" in capsys.readouterr().err


def test_an_out_dir_that_is_a_file_is_refused_before_training(tmp_path):
    """It was reported only when the first checkpoint was written, after an epoch's work."""
    taken = tmp_path / "runs"
    taken.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^out_dir: '.*runs' is a file; give the folder"):
        load_train_config(TRAIN_CONFIGS / "smoke-segment.yaml", [f"out_dir={taken}"])


def test_eval_of_another_stages_checkpoint_names_the_weights_option(tmp_path, capsys):
    """The task check named the pipeline config's key (stages.segment.weights) for eval's --weights."""
    from blinkflow.cli import main

    path = tmp_path / "flow.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "config": {"task": "flow"}}, path)
    assert main(["eval", "segment", "--config", "configs/train/smoke-segment.yaml", "--weights", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"blinkflow: error: --weights: {path} is a checkpoint of `blinkflow "
                                              "train flow`")


def test_shipping_a_net_of_other_model_args_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """--ship of a smoke config replaced segment-unet_small.pt with a quarter-width net `weights: shipped` cannot
    load (the stage builds the model with its defaults)."""
    from blinkflow.cli import main
    from blinkflow.models import weights

    import shutil

    (tmp_path / "weights").mkdir()  # the repo's manifest, in a folder that is not the repo's should it ship after all
    shutil.copy(weights.WEIGHTS_DIR / "manifest.json", tmp_path / "weights")
    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    assert main(["train", "segment", "--config", "configs/train/smoke-segment.yaml", "--ship", "--set",
                 f"out_dir={tmp_path / 'run'}"]) == 2
    assert ("--ship: model_args {'base_width': 8} build another unet_small than the shipped segment-unet_small.pt ({})"
            in capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused before training


def test_a_shipped_training_config_without_the_repository_says_why_its_data_is_missing(tmp_path, monkeypatch):
    """Installed, configs/train/detect.yaml's backgrounds and finetune-detect.yaml's COCO sample are the
    repository's tests/data: "does not exist; fix the path" did not say that the package never carries them."""
    import shutil

    from blinkflow import resources
    from blinkflow.errors import ConfigError
    from blinkflow.models.training.config import load_train_config

    shipped = tmp_path / "site" / "blinkflow" / "configs"
    shutil.copytree(resources.configs_dir() / "train", shipped / "train")
    monkeypatch.setattr(resources, "configs_dir", lambda: shipped)
    with pytest.raises(ConfigError, match=r"data\.train\.backgrounds\.0: .* an installed package does not carry.*"
                                          r"--set data\.train\.backgrounds=null"):
        load_train_config(shipped / "train" / "detect.yaml", task="detect")
    with pytest.raises(ConfigError, match=r"data\.train_path: .*--set data\.train_path=YOUR\.json"):
        load_train_config(shipped / "train" / "finetune-detect.yaml", task="detect")
    mine = tmp_path / "mine.yaml"  # a user's own config: no such hint
    shutil.copy(shipped / "train" / "detect.yaml", mine)
    with pytest.raises(ConfigError) as error:
        load_train_config(mine, task="detect")
    assert "installed package" not in str(error.value)
