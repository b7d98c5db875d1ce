"""Re-identification: the metric-learning losses on embeddings whose answer is known, the embedding net,
`blinkflow train reid`, the shipped weights, and the track stage keeping an ID by appearance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blinkflow.errors import ConfigError
from blinkflow.models.training.reid import batch_hard_triplet, nt_xent, retrieval_scores

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "train" / "smoke-reid.yaml"


# --------------------------------------------------------------------------- losses


def test_batch_hard_triplet_takes_the_hardest_positive_and_negative():
    # on a line: identity 0 at 0 and 1, identity 1 at 3 and 5. Anchor 3's hardest positive is 5 (d = 2) and
    # its hardest negative is 1 (d = 2): relu(2 - 2 + 0.5) = 0.5; every other anchor clears the margin
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet(x, labels, margin=0.5).item() == pytest.approx(0.5 / 4, abs=1e-5)
    assert batch_hard_triplet(x, labels, margin=0.0).item() == pytest.approx(0.0, abs=1e-5)
    # swapping the middle two labels makes every anchor's hardest pair wrong: the loss rises
    assert batch_hard_triplet(x, torch.tensor([0, 1, 0, 1]), margin=0.5).item() > 1.0


def test_batch_hard_triplet_skips_anchors_without_a_positive_and_has_gradients():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]], requires_grad=True)
    loss = batch_hard_triplet(x, torch.tensor([0, 0, 1]), margin=4.0)  # anchor 2 has no positive
    # anchors 0 and 1: d(a, p) = 1, nearest negative 4 and 3: relu(1 - 4 + 4) and relu(1 - 3 + 4)
    assert loss.item() == pytest.approx((1.0 + 2.0) / 2, abs=1e-5)
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_nt_xent_on_orthogonal_pairs_has_its_closed_form():
    # two identities, two views each, views identical and identities orthogonal: each row's logits over
    # the others are [1, 0, 0] at temperature 1, so the loss is -log(e / (e + 2))
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    loss = nt_xent(z, torch.tensor([0, 0, 1, 1]), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-5)
    # a lower temperature sharpens the softmax: a separated batch costs less
    assert nt_xent(z, torch.tensor([0, 0, 1, 1]), temperature=0.1).item() < loss.item()


def test_nt_xent_with_two_views_equals_simclr():
    """SimCLR's formulation: 2N views, row i's positive is its other view, cross-entropy over the other 2N - 1."""
    torch.manual_seed(0)
    n, tau = 5, 0.2
    z = torch.randn(2 * n, 8)
    labels = torch.arange(n).repeat(2)
    zn = F.normalize(z, dim=1)
    sim = (zn @ zn.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    assert nt_xent(z, labels, tau).item() == pytest.approx(F.cross_entropy(sim, target).item(), abs=1e-5)


def test_retrieval_scores_on_known_rankings():
    perfect = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=float)
    assert retrieval_scores(perfect, np.array([0, 0, 1, 1]))["top1"] == 1.0
    assert retrieval_scores(perfect, np.array([0, 0, 1, 1]))["map"] == pytest.approx(1.0)
    # labels crossed: every nearest neighbour is wrong, each positive is ranked 2nd or 3rd
    crossed = retrieval_scores(perfect, np.array([0, 1, 0, 1]))
    assert crossed["top1"] == 0.0 and 0.3 < crossed["map"] < 0.6


def test_loss_is_picked_by_the_config_and_checked():
    from blinkflow.models.training.config import load_train_config

    assert load_train_config(SMOKE, ["reid.loss=ntxent"], task="reid").reid.loss == "ntxent"
    with pytest.raises(ConfigError, match="reid.loss"):
        load_train_config(SMOKE, ["reid.loss=arcface"], task="reid")


# --------------------------------------------------------------------------- the net


@pytest.mark.slow  # scipy / torch model build: over 0.5 s on the shared VM
def test_embedding_net_outputs_unit_vectors_of_its_size():
    from blinkflow.models.registry import build_model
    from blinkflow.models.reid import INPUT_SIZE, crops_to_batch

    model = build_model("embed_small", task="reid").eval()
    assert sum(p.numel() for p in model.parameters()) < 250_000  # well under the ~1 MB budget
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    crops = crops_to_batch(image, [[10, 10, 50, 90], [100, 20, 101, 21], [150, 100, 200, 200]])  # tiny, off-edge
    assert crops.shape == (3, 3, *INPUT_SIZE) and 0.0 <= crops.min() and crops.max() <= 1.0
    with torch.no_grad():
        out = model(crops)
    assert out.shape == (3, 64)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    assert crops_to_batch(image, np.zeros((0, 4))).shape == (0, 3, *INPUT_SIZE)


# --------------------------------------------------------------------------- training and shipped weights


@pytest.mark.slow
def test_smoke_training_reduces_the_loss_and_ships_loadable_weights(tmp_path, monkeypatch):
    from blinkflow.models import weights
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.train import Runtime, main

    monkeypatch.setattr(weights, "WEIGHTS_DIR", tmp_path / "weights")
    cfg = load_train_config(SMOKE, [f"out_dir={tmp_path / 'run'}"], task="reid")
    summary = main(cfg, resume=False, ship=True, runtime=Runtime(progress=False))
    probe = [loss for _, loss in summary["history"]["probe_loss"]]
    assert probe[-1] < 0.7 * probe[0]
    assert summary["metrics"]["map"] > summary["metrics"]["untrained_map"]
    state = torch.load(summary["shipped"], weights_only=True)
    assert Path(summary["shipped"]).name == "reid-embed_small.pt" and "project.weight" in state
    entry = weights.read_manifest(tmp_path / "weights")["weights"][0]
    assert entry["stage"] == "reid" and "top1" in entry["metrics"]


@pytest.mark.slow
def test_shipped_weights_beat_an_untrained_net_on_held_out_identities():
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.reid import retrieval
    from blinkflow.models.training.tasks import make_task
    from blinkflow.models.training.train import make_loader
    from blinkflow.models.weights import WEIGHTS_DIR, load_shipped, read_manifest

    entry = next(e for e in read_manifest()["weights"] if e["stage"] == "reid")
    assert entry["size"] < 1_000_000
    torch.load(WEIGHTS_DIR / entry["file"], weights_only=True)  # plain tensors only
    shipped, _ = load_shipped("reid", "embed_small")
    cfg = load_train_config(REPO / "configs" / "train" / "reid.yaml", ["data.val.clips=6"], task="reid")
    task = make_task(cfg)
    loader = make_loader(task, task.eval_set(), 16, train=False)
    torch.manual_seed(0)
    untrained = task.build_model(None).eval()
    trained, baseline = retrieval(shipped, loader, torch.device("cpu")), retrieval(untrained, loader, torch.device("cpu"))
    assert trained["map"] > baseline["map"] + 0.1
    assert trained["top1"] >= baseline["top1"]


def test_shipped_entry_is_reproducible_from_configs_train_reid_yaml():
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.weights import WEIGHTS_DIR, read_manifest, sha256_file

    entry = next(e for e in read_manifest()["weights"] if e["stage"] == "reid")
    cfg = load_train_config(REPO / "configs" / "train" / "reid.yaml", task="reid")
    assert entry["config"] == cfg.to_dict() and entry["file"] == f"reid-{cfg.model}.pt"
    assert entry["sha256"] == sha256_file(WEIGHTS_DIR / entry["file"])
    assert entry["metrics"]["map"] > entry["metrics"]["untrained_map"]


@pytest.mark.slow
def test_shipped_metrics_are_those_of_the_file():
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.train import run_eval
    from blinkflow.models.weights import read_manifest

    recorded = next(e for e in read_manifest()["weights"] if e["stage"] == "reid")["metrics"]
    result = run_eval(load_train_config(REPO / "configs" / "train" / "reid.yaml", task="reid"), weights="shipped")
    assert result["data"] == recorded["evaluated_on"]
    for name, value in result["metrics"].items():
        # the untrained baseline is a fresh random net, so it depends on the torch build's init (on the 2.14.1+cu130
        # wheel untrained top-1 is 0.698 against 0.707 recorded, while the file's own figures match to the digit)
        tolerance = 0.02 if name.startswith("untrained_") else 1e-6
        assert value == pytest.approx(recorded[name], abs=tolerance), name


# --------------------------------------------------------------------------- the tracker


def _occlusion_clip(t: int) -> tuple[np.ndarray, list[str]]:
    """Object a moves right, is hidden for frames 10..24 and comes back standing still far to the left of
    where its motion would have taken it; object b, same class, appears during the gap far to the right."""
    boxes, names = [], []
    if t < 10:
        boxes.append([20 + 8.0 * t, 50, 50 + 8.0 * t, 90])
        names.append("a")
    elif t >= 25:
        boxes.append([40, 60, 70, 100])
        names.append("a")
    if t >= 18:
        boxes.append([250, 150, 280, 190])
        names.append("b")
    return np.array(boxes, dtype=float).reshape(-1, 4), names


def _owners(options, embed) -> dict[int, set[str]]:
    from blinkflow.stages.track import StreamTracker, _Detections

    tracker, owners = StreamTracker(options), {}
    for t in range(40):
        boxes, names = _occlusion_clip(t)
        embeddings = np.stack([embed(n) for n in names]) if names else None
        tracker.step(t, _Detections(boxes, np.full(len(boxes), 0.9), ["car"] * len(boxes), embeddings))
        for track in tracker.tracks:
            if track.id is not None and track.det is not None:
                owners.setdefault(track.id, set()).add(names[track.det])
    return owners


@pytest.mark.slow  # scipy / torch model build: over 0.5 s on the shared VM
def test_embeddings_keep_an_id_across_an_occlusion_where_iou_alone_switches():
    from blinkflow.stages.track import TrackOptions

    rng = np.random.default_rng(0)
    looks = {"a": rng.normal(size=16), "b": rng.normal(size=16)}

    def embed(name: str) -> np.ndarray:  # the same look with a little noise on every frame
        return looks[name] + 0.1 * rng.normal(size=16)

    options = {"confirm_hits": 2, "max_lost_frames": 30}
    iou_only = _owners(TrackOptions(**options), embed)
    assert iou_only == {1: {"a"}, 2: {"b"}, 3: {"a"}}  # a comes back away from its prediction: a new ID
    with_appearance = _owners(TrackOptions(**options, appearance_weight=0.5), embed)
    assert with_appearance == {1: {"a"}, 2: {"b"}}  # a gets its ID back; b, unlike it, does not take it


@pytest.mark.slow
def test_track_stage_re_identifies_with_the_shipped_net():
    """End to end on drawn frames: the stage embeds the crops itself with the shipped re-ID net."""
    from blinkflow.config import StageConfig
    from blinkflow.frame import Frame
    from blinkflow.stages.track import TrackOptions, TrackStage

    stripes = np.indices((40, 30)).sum(axis=0) % 8 < 4
    looks = {"a": np.where(stripes[..., None], [230, 40, 40], [250, 220, 60]),
             "b": np.full((40, 30, 3), [40, 90, 220])}

    def run(weight: float) -> dict[int, set[str]]:
        stage = TrackStage(StageConfig(options=TrackOptions(boxes_from="det", confirm_hits=2, max_lost_frames=30,
                                                            appearance_weight=weight)))
        stage.setup()
        owners: dict[int, set[str]] = {}
        for t in range(40):
            boxes, names = _occlusion_clip(t)
            image = np.full((240, 320, 3), 90, dtype=np.uint8)
            for (x1, y1, _, _), name in zip(boxes.astype(int), names):
                image[y1:y1 + 40, x1:x1 + 30] = looks[name]
            frame = Frame("cam", t, t / 25, image)
            frame.results["det"] = {"boxes": boxes.tolist(), "scores": [0.9] * len(boxes), "classes": ["car"] * len(boxes)}
            stage.process([frame])
            for tid, name in zip(frame.results["det"]["track_ids"], names):
                if tid is not None:
                    owners.setdefault(tid, set()).add(name)
        stage.teardown()
        return owners

    assert len(run(0.0)) == 3
    assert run(0.5) == {1: {"a"}, 2: {"b"}}


def _gap_clip(t: int, back: int, twin: bool) -> tuple[np.ndarray, list[str]]:
    """Object a walks right and is gone from frame 10; it comes back at frame ``back`` near where it was last
    seen. With ``twin``, a look-alike of it (same class, size and look) shows for frames 12-15 far away."""
    boxes, names = [], []
    if t < 10:
        boxes.append([100 + 6.0 * t, 50, 130 + 6.0 * t, 90])
        names.append("a")
    elif t >= back:
        boxes.append([160 - 2.0 * (t - back), 90, 190 - 2.0 * (t - back), 130])
        names.append("a")
    if twin and 12 <= t < 16:
        boxes.append([20, 200, 50, 240])
        names.append("twin")
    return np.array(boxes, dtype=float).reshape(-1, 4), names


def _gap_owners(back: int, twin: bool = False, **options) -> dict[int, set[str]]:
    from blinkflow.stages.track import StreamTracker, TrackOptions, _Detections

    look = np.random.default_rng(1).normal(size=16)
    tracker, owners = StreamTracker(TrackOptions(confirm_hits=2, max_lost_frames=30, **options)), {}
    for t in range(back + 10):
        boxes, names = _gap_clip(t, back, twin)
        embeddings = np.stack([look for _ in names]) if names else None  # the twin looks exactly alike
        tracker.step(t, _Detections(boxes, np.full(len(boxes), 0.9), ["car"] * len(boxes), embeddings))
        for track in tracker.tracks:
            if track.id is not None and track.det is not None:
                owners.setdefault(track.id, set()).add(names[track.det])
    return owners


def test_a_track_out_of_view_longer_than_max_lost_frames_is_re_identified():
    """Gone for 50 frames (more than max_lost_frames): IoU alone has ended its track, appearance keeps it for
    reid_max_lost_frames and takes it back; past that horizon it is a new object."""
    assert _gap_owners(60) == {1: {"a"}, 2: {"a"}}  # IoU only
    assert _gap_owners(60, appearance_weight=0.5) == {1: {"a"}}
    assert _gap_owners(60, appearance_weight=0.5, reid_max_lost_frames=40) == {1: {"a"}, 2: {"a"}}


def test_re_identification_is_gated_by_motion_and_size():
    """A look-alike far from where the track was last seen, a few frames after it was lost, is not the object
    (reid_max_speed); without the gate it takes the ID. A box of another size is not it either (reid_max_scale)."""
    gated = _gap_owners(60, twin=True, appearance_weight=0.5)
    assert gated == {1: {"a"}, 2: {"twin"}}
    ungated = _gap_owners(60, twin=True, appearance_weight=0.5, reid_max_speed=1000.0)
    assert ungated[1] == {"a", "twin"}

    from blinkflow.stages.track import StreamTracker, TrackOptions, Track, KalmanBox

    tracker = StreamTracker(TrackOptions(appearance_weight=0.5))
    track = Track(KalmanBox(np.array([100.0, 100, 130, 140])), "car", 0.9, 0, seen_box=np.array([100.0, 100, 130, 140]))
    near = np.array([[102.0, 100, 132, 140], [95.0, 90, 155, 170], [108.0, 110, 122, 128]])  # same, 2x, 0.45x size
    assert tracker._plausible([track], near).tolist() == [[True, True, False]]


def test_windows_of_one_real_track_are_positives_in_a_training_batch():
    """Real identities are windows of a track: two windows of one object share a label in the batch (positives),
    never each other's negatives; synthetic identities keep a label each."""
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.reid import IdentityCrops
    from blinkflow.models.training.tasks import make_task

    task = make_task(load_train_config(SMOKE, ["reid.crops_per_identity=2"], task="reid"))
    crops = [torch.zeros((3, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    identities = IdentityCrops(crops).extended([(crops[0], "clip#1"), (crops[1], "clip#1"), (crops[0], "clip#2")])
    _, labels = task.collate([identities[i] for i in range(5)], train=True)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 2, 2, 3, 3]


def test_real_clip_options_stay_out_of_a_synthetic_only_record():
    from blinkflow.models.training.config import load_train_config

    plain = load_train_config(SMOKE, task="reid").to_dict()["reid"]
    assert "real_clips" not in plain and "real_window" not in plain
    real = load_train_config(SMOKE, ["reid.real_clips=[a.mp4]"], task="reid").to_dict()["reid"]
    assert real["real_clips"] == ["a.mp4"] and real["real_window"] == 16
