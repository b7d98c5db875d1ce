"""Flow and action: backends, stages, the causal 3D net, I3D inflation and flow metrics.

Inputs are tiny (32-64 px frames, clips of 4-8 frames); only mvit_v2_s runs at
its fixed 16x224x224, once, with batch 1. Weights are random (weights: null).
"""

from __future__ import annotations

import numpy as np
import pytest

from blinkflow.models.classes import SYNTHETIC_ACTIONS
from blinkflow.models.registry import build_model, model_names
from blinkflow.config import StageConfig
from blinkflow.errors import BlinkflowError, StageError
from blinkflow.frame import Frame, GateMark

torch = pytest.importorskip("torch")


def make_frames(count: int, stream: str = "cam", height: int = 48, width: int = 64, start: int = 0) -> list[Frame]:
    rng = np.random.default_rng(start)
    return [
        Frame(stream, i, i / 10.0, rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for i in range(start, start + count)
    ]


def randomize_batchnorm(model) -> None:
    """Non-trivial running statistics, so eval-mode BN equivalence tests mean something."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


# --------------------------------------------------------------------------- flow backends


def flow_model_args(name: str) -> dict | None:
    return {"num_flow_updates": 2} if name.startswith("raft") else None


@pytest.mark.parametrize("name", model_names("flow"))
def test_flow_backend_returns_full_size_pixel_flow(name, real_media):
    from PIL import Image

    model = build_model(name, task="flow", **(flow_model_args(name) or {})).eval()
    images = [np.array(Image.open(real_media / "flow" / f"00001_img{i}.ppm")) for i in (1, 2)]
    img1, img2 = (torch.from_numpy(im).permute(2, 0, 1)[None].float() / 255 for im in images)
    with torch.no_grad():
        flow = model(img1, img2)
    assert flow.shape == (1, 2, 50, 50) and torch.isfinite(flow).all()
    model.train()
    with torch.no_grad():
        predictions = model(img1, img2)  # finest first: FlowNetS's is at 1/4, RAFT's last iteration at full size
    finest = (13, 13) if name == "flownet_s_small" else (50, 50)
    assert isinstance(predictions, list) and tuple(predictions[0].shape[-2:]) == finest
    assert all(p.shape[:2] == (1, 2) for p in predictions)


def test_flownet_s_small_multiscale_training_outputs():
    from blinkflow.models.flownet import multiscale_epe_loss

    model = build_model("flownet_s_small", task="flow").train()
    assert 1_000_000 <= sum(p.numel() for p in model.parameters()) <= 3_000_000
    img = torch.rand(2, 3, 40, 72)
    predictions = model(img, img)
    assert [tuple(p.shape[-2:]) for p in predictions] == [(10, 18), (5, 9), (3, 5), (2, 3)]
    loss = multiscale_epe_loss(predictions, torch.zeros(2, 2, 40, 72))
    loss.backward()
    assert loss.item() > 0 and model.predict2.weight.grad is not None



def test_bare_torchvision_raft_checkpoint_loads_into_the_wrapper(tmp_path):
    from blinkflow.models.weights import load_state, resolve_weights

    source = build_model("raft_small", task="flow")
    path = tmp_path / "raft_small.pt"
    torch.save(source.net.state_dict(), path)  # torchvision's own key names, without the "net." prefix
    target = build_model("raft_small", task="flow")
    load_state(target, resolve_weights(str(path), stage="flow", model_name="raft_small"))
    torch.testing.assert_close(target.state_dict(), source.state_dict())


# --------------------------------------------------------------------------- flow stage


def make_flow_stage(name: str = "flownet_s_small", **options):
    from blinkflow.stages.flow import Flow

    options.setdefault("input_size", [64, 64])
    options.setdefault("model_args", flow_model_args(name))
    stage = Flow(StageConfig(model=name, options=Flow.Options(**options)))
    stage.setup("cpu")
    return stage


# raft_large takes as long as the rest of the flow models together on 2 cores, and raft_small runs the same
# code path: its case is in the slow tier
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "raft_large" else n
                                  for n in model_names("flow")])
def test_flow_stage_keeps_the_previous_frame_across_calls(name):
    stage = make_flow_stage(name)
    frames = make_frames(3, height=48, width=66)
    returned = stage.process(frames[:2]) + stage.process(frames[2:])
    assert returned == frames  # nothing held
    assert "flow" not in frames[0].results  # the first frame has no predecessor
    for frame in frames[1:]:
        result = frame.results["flow"]
        assert set(result) == {"flow", "scale", "pair", "magnitude_mean", "magnitude_max"}
        assert result["flow"].dtype == np.float16 and result["flow"].shape == (2, 24, 33)
        assert result["scale"] == 2 and result["pair"] == [frame.index - 1, frame.index]
        assert 0.0 <= result["magnitude_mean"] <= result["magnitude_max"]
        assert np.isfinite(result["flow"]).all()


def test_flow_pairs_skip_reused_frames_and_separate_streams():
    stage = make_flow_stage()
    a, b = make_frames(3, "a"), make_frames(2, "b")
    a[1].gate = GateMark(reuse_of=0)
    stage.process([a[0], b[0], a[1], b[1], a[2]])
    assert "flow" not in a[1].results and "flow" not in b[0].results
    assert a[2].results["flow"]["pair"] == [0, 2]
    assert b[1].results["flow"]["pair"] == [0, 1]


def test_flow_is_not_paired_across_a_change_of_frame_size():
    """A camera reconnecting at another resolution: both frames are resized to the model's input, but their
    pixels do not correspond, so the first frame of the new size starts afresh (it was paired: ~54 px of flow
    on a still scene), within one call and across calls."""
    stage = make_flow_stage()
    small, large = make_frames(4, height=48, width=64), make_frames(4, height=40, width=80)
    stage.process([small[0], small[1], large[2]])
    stage.process([large[3]])
    assert small[1].results["flow"]["pair"] == [0, 1]
    assert "flow" not in large[2].results
    assert large[3].results["flow"]["pair"] == [2, 3]
    back = make_frames(1, height=48, width=64, start=4)[0]
    stage.process([back])  # ...and back, across calls
    assert "flow" not in back.results


def test_flow_end_stream_forgets_the_previous_frame():
    stage = make_flow_stage()
    frames = make_frames(3)
    stage.process(frames[:2])
    assert stage.end_stream("cam") == []
    stage.process(frames[2:])
    assert "flow" not in frames[2].results


def test_flow_vectors_are_in_half_resolution_pixels():
    """A constant 1-px flow at the 64x64 model input is 2 source px on a 128-wide frame, 1 half-res px."""
    stage = make_flow_stage()
    stage.model = lambda first, second: torch.stack([torch.ones_like(first[:, 0]), torch.zeros_like(first[:, 0])], 1)
    frames = make_frames(2, height=32, width=128)
    stage.process(frames)
    result = frames[1].results["flow"]
    assert result["flow"].shape == (2, 16, 64)
    np.testing.assert_allclose(result["flow"][0], 1.0)
    np.testing.assert_allclose(result["flow"][1], 0.0)
    assert result["magnitude_mean"] == pytest.approx(2.0) and result["magnitude_max"] == pytest.approx(2.0)


def test_flow_bad_input_size_is_a_stage_error():
    from blinkflow.stages.flow import Flow

    with pytest.raises(StageError, match="options.input_size"):
        Flow(StageConfig(options=Flow.Options(input_size=[64])))
    # a side of 100 000 passed and asked torch for terabytes at the first batch
    with pytest.raises(StageError, match=r"options\.input_size: expected \[height, width\] with both in 16\.\.8192"):
        Flow(StageConfig(options=Flow.Options(input_size=[100_000, 100_000])))


# --------------------------------------------------------------------------- action stage


def action_options_for(name: str) -> dict:
    """The smallest clip each backend accepts (see models.action)."""
    if name == "mvit_v2_s":
        return {"clip_len": 16, "stride": 16, "input_size": [224, 224]}
    if name == "s3d":
        return {"clip_len": 5, "stride": 5, "input_size": [32, 32]}
    return {"clip_len": 4, "stride": 4, "input_size": [32, 32]}


def make_action_stage(name: str = "causal3d_small", **options):
    from blinkflow.stages.action import Action

    options.setdefault("input_size", [32, 32])
    stage = Action(StageConfig(model=name, options=Action.Options(**options)))
    stage.setup("cpu")
    return stage


# mvit_v2_s only takes 16x224x224 clips: its case is in the slow tier
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mvit_v2_s" else n
                                  for n in model_names("action")])
def test_action_stage_labels_a_full_clip(name):
    options = action_options_for(name)
    stage = make_action_stage(name, **options)
    frames = make_frames(options["clip_len"], height=32, width=32)
    returned = stage.process(frames)
    assert returned == frames
    for frame in frames:
        result = frame.results["action"]
        assert set(result) == {"window", "top"} and result["window"] == [0, options["clip_len"] - 1]
        scores = [t["score"] for t in result["top"]]
        assert len(result["top"]) == 3 and scores == sorted(scores, reverse=True)
        assert all(t["label"] in SYNTHETIC_ACTIONS and 0.0 <= t["score"] <= 1.0 for t in result["top"])


def test_action_returns_every_frame_once_in_order_with_a_covering_window():
    stage = make_action_stage(clip_len=4, stride=2)
    frames = make_frames(11, height=32, width=32)
    frames[4].gate = GateMark(reuse_of=3)
    frames[6].fail("detect", "boom")
    returned = []
    for batch in (frames[0:3], frames[3:4], frames[4:8], frames[8:11]):
        returned += stage.process(batch)
    assert [f.index for f in returned] == list(range(10))  # frame 10 waits for the window [8, ...]
    returned += stage.flush()
    assert [f.index for f in returned] == list(range(11))
    assert frames[10].results["action"]["window"] == [7, 10]  # the tail [8, 10] reaching back to sample 7
    assert "action" not in frames[6].results  # failed frames get no result
    for frame in (f for f in returned if not f.is_failed):
        first, last = frame.results["action"]["window"]
        assert first <= frame.index <= last
    assert stage.held_count("cam") == 0


@pytest.mark.parametrize("hold", [True, False])
def test_action_clips_never_span_a_new_frame_size_or_a_restart(hold):
    """A camera back at another resolution: frame 3 (160x96) was labelled from a clip mixing both sizes; a
    restart gave frames 4, 5, 0, 1 the window [4, 1]."""
    stage = make_action_stage(clip_len=4, stride=2, hold=hold)
    small, large = make_frames(3, height=48, width=64), make_frames(5, height=96, width=160, start=3)
    returned = stage.process(small) + stage.process(large) + stage.flush()
    assert [f.index for f in returned] == list(range(8))
    for frame in returned:
        first, last = frame.results.get("action", {}).get("window", [frame.index, frame.index])
        assert (first <= 2) == (last <= 2) and first <= last  # no window spans the change of size
    stage = make_action_stage(clip_len=4, stride=2, hold=hold)
    again = make_frames(3, height=32, width=32)
    returned = stage.process(make_frames(6, height=32, width=32)) + stage.process(again) + stage.flush()
    assert [f.index for f in returned] == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    for position, frame in enumerate(returned):  # without holding, frames before a first window get none
        first, last = frame.results.get("action", {}).get("window", [frame.index, frame.index])
        assert first <= last and (last <= 2 if position >= 6 else last <= 5)
        assert first <= frame.index <= last or not hold


def test_action_first_completed_window_wins():
    stage = make_action_stage(clip_len=4, stride=2)
    frames = make_frames(6, height=32, width=32)
    assert stage.process(frames) == frames
    # frames 2 and 3 are also in the window [2, 5], but [0, 3] completed first
    assert [f.results["action"]["window"] for f in frames] == [[0, 3]] * 4 + [[2, 5]] * 2


def test_action_windows_of_two_streams_share_one_forward():
    stage = make_action_stage(clip_len=2, stride=2)
    calls = []
    model = stage.model
    stage.model = lambda clips: calls.append(clips.shape[0]) or model(clips)
    a, b = make_frames(2, "a", 32, 32), make_frames(2, "b", 32, 32, start=5)
    returned = stage.process([a[0], b[0], a[1], b[1]])
    assert calls == [2]
    assert [f.key for f in returned if f.stream_id == "a"] == [("a", 0), ("a", 1)]
    assert b[1].results["action"]["window"] == [5, 6]


def test_action_end_stream_runs_a_padded_partial_window():
    stage = make_action_stage(clip_len=8, stride=4)
    frames = make_frames(3, height=32, width=32)
    assert stage.process(frames) == []
    released = stage.end_stream("cam")
    assert released == frames
    assert all(f.results["action"]["window"] == [0, 2] for f in frames)
    assert stage.held_count("cam") == 0 and stage.end_stream("cam") == []


def test_action_held_frames_stay_bounded():
    clip_len, stride, rate = 4, 2, 2
    stage = make_action_stage(clip_len=clip_len, stride=stride, sampling_rate=rate)
    frames = make_frames(30, height=16, width=16)
    returned = []
    for frame in frames:
        returned += stage.process([frame])
        assert stage.held_count("cam") <= clip_len * rate + stride
    returned += stage.flush()
    assert [f.index for f in returned] == list(range(30))
    assert frames[1].results["action"]["window"] == [0, 6]  # samples 0, 2, 4, 6


def test_action_without_holding_every_frame_leaves_at_once_with_the_latest_window_whatever_the_batches():
    """hold: false (live): no frame waits for its clip; each gets the latest window completed at or before it
    (the one it completes included), frames before the first window none, however the frames are batched."""
    def labels(batches):
        stage = make_action_stage(clip_len=4, stride=2, hold=False)
        frames = make_frames(11, height=32, width=32)
        frames[5].gate = GateMark(reuse_of=4)  # reused: not sampled, but labelled like the others
        returned = []
        for start, end in batches:
            batch = frames[start:end]
            assert stage.process(batch) == batch and stage.held_count("cam") == 0
            returned += batch
        assert stage.flush() == [] and stage.end_stream("cam") == []
        return [f.results.get("action", {}).get("window") for f in returned]

    one_by_one = labels([(i, i + 1) for i in range(11)])
    # samples are the active frames 0..4, 6..10: windows complete at samples 3, 5, 7, 9 = frames 3, 6, 8, 10
    assert one_by_one == [None] * 3 + [[0, 3]] * 3 + [[2, 6]] * 2 + [[4, 8]] * 2 + [[7, 10]]
    assert labels([(0, 4), (4, 11)]) == labels([(0, 11)]) == one_by_one


def test_action_hold_follows_the_run_mode_unless_set():
    from blinkflow.config import load_config

    def hold(mode, **options):
        cfg = load_config(data={"sources": [], "runtime": {"mode": mode},
                                "stages": {"action": {"options": {"input_size": [32, 32], **options}}}})
        return cfg.stages["action"].options.hold

    assert hold("archive") is True and hold("live") is False
    assert hold("live", hold=True) is True and hold("archive", hold=False) is False


def test_action_frames_between_distant_windows_carry_the_previous_result():
    stage = make_action_stage(clip_len=2, stride=3)
    frames = make_frames(7, height=16, width=16)
    returned = stage.process(frames)  # windows: samples [0, 1] and [3, 4]; 2 and 5 lie between windows
    assert [f.index for f in returned] == [0, 1, 2, 3, 4, 5]  # 6 starts the window [6, 7]
    windows = [f.results["action"]["window"] for f in returned]
    assert windows == [[0, 1], [0, 1], [0, 1], [3, 4], [3, 4], [3, 4]]



def test_action_failed_batch_leaves_the_state_for_the_retry():
    stage = make_action_stage(clip_len=2, stride=2)
    frames = make_frames(4, height=16, width=16)
    assert stage.process(frames[:2]) == frames[:2]
    model = stage.model

    def broken(clips):
        raise RuntimeError("out of memory")

    stage.model = broken
    with pytest.raises(RuntimeError):
        stage.process(frames[2:])
    assert stage.held_count("cam") == 0
    stage.model = model
    assert stage.process(frames[2:]) == frames[2:]  # the runner's retry: each frame returned once
    assert frames[3].results["action"]["window"] == [2, 3]


def test_action_final_window_failure_fails_the_tail_instead_of_losing_it():
    stage = make_action_stage(clip_len=4, stride=4)
    frames = make_frames(6, height=16, width=16)
    assert stage.process(frames) == frames[:4]

    def broken(clips):
        raise RuntimeError("device lost")

    stage.model = broken
    released = stage.flush()
    assert released == frames[4:]
    assert all(f.is_failed and "action" in f.error and "action" not in f.results for f in released)

def test_action_one_streams_failing_final_clip_fails_only_its_own_tail():
    stage = make_action_stage(clip_len=4, stride=4)
    good, bad = make_frames(6, height=16, width=16), make_frames(6, stream="bad", height=16, width=16)
    for frame in bad:
        frame.image[:] = 255  # the clip the model fails on
    assert stage.process(good + bad) == good[:4] + bad[:4]
    model = stage.model

    def fails_on_white(clips):
        if bool((clips > 0.99).all(dim=(1, 2, 3, 4)).any()):
            raise RuntimeError("device lost")
        return model(clips)

    stage.model = fails_on_white
    released = stage.flush()
    assert sorted((f.stream_id, f.index) for f in released) == sorted([("cam", 4), ("cam", 5), ("bad", 4), ("bad", 5)])
    assert all(f.is_failed and "device lost" in f.error for f in released if f.stream_id == "bad")
    assert all(not f.is_failed and f.results["action"]["window"] == [2, 5] for f in released if f.stream_id == "cam")


def test_action_clip_shape_mismatch_is_a_stage_error():
    from blinkflow.stages.action import Action

    stage = Action(StageConfig(model="s3d", options=Action.Options(clip_len=4, input_size=[32, 32])))
    with pytest.raises(StageError, match="clip_len >= 5"):
        stage.setup("cpu")


# --------------------------------------------------------------------------- causal 3D net


def causal_net():
    model = build_model("causal3d_small", task="action", num_classes=5)
    randomize_batchnorm(model)
    return model.eval()


def test_causal3d_streaming_equals_clip_mode():
    model = causal_net()
    clip = torch.rand(2, 3, 8, 32, 32)
    with torch.no_grad():
        per_step_clip, _ = model.forward_steps(clip)
        state, streamed = model.init_state(), []
        for t in range(clip.shape[2]):
            logits, state = model.step(clip[:, :, t], state)
            streamed.append(logits)
        first_half, half_state = model.forward_steps(clip[:, :, :3])
        second_half, _ = model.forward_steps(clip[:, :, 3:], half_state)
    assert len(state) == len(model.blocks)
    torch.testing.assert_close(torch.stack(streamed, dim=1), per_step_clip, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([first_half, second_half], dim=1), per_step_clip, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(clip), per_step_clip[:, -1])


def test_causal3d_never_looks_at_future_frames():
    model = causal_net()
    clip = torch.rand(1, 3, 6, 32, 32)
    changed = clip.clone()
    changed[:, :, 4:] = torch.rand(1, 3, 2, 32, 32)
    with torch.no_grad():
        before, _ = model.forward_steps(clip)
        after, _ = model.forward_steps(changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


# --------------------------------------------------------------------------- I3D inflation


def test_inflated_conv_kernel_sums_back_to_the_2d_kernel():
    from blinkflow.models.i3d import inflate_conv2d

    conv2d = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    conv3d = inflate_conv2d(conv2d, time_kernel=5)
    assert isinstance(conv3d, torch.nn.Conv3d) and conv3d.weight.shape == (4, 3, 5, 3, 3)
    torch.testing.assert_close(conv3d.weight.sum(dim=2), conv2d.weight)


def test_inflated_resnet18_on_a_static_clip_matches_the_image_network():
    import torchvision

    from blinkflow.models.i3d import inflate_module

    net2d = torchvision.models.resnet18(weights=None)
    net2d.fc = torch.nn.Identity()
    randomize_batchnorm(net2d)
    net2d.eval()
    net3d = inflate_module(net2d, time_kernel=3).eval()
    assert isinstance(net2d.conv1, torch.nn.Conv2d)  # the original is left untouched
    image = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = net2d(image)
        got = net3d(image.unsqueeze(2).repeat(1, 1, 4, 1, 1))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- flow files and metrics


def test_read_flo_reads_the_middlebury_sample(real_media):
    from blinkflow.models.metrics_flow import read_flo

    flow = read_flo(real_media / "flow" / "00001_flow.flo")
    assert flow.shape == (50, 50, 2) and flow.dtype == np.float32
    raw = np.fromfile(real_media / "flow" / "00001_flow.flo", dtype="<f4")
    np.testing.assert_array_equal(flow.ravel(), raw[3:])


def test_epe_of_zero_flow_is_the_mean_ground_truth_length(real_media):
    from blinkflow.models.metrics_flow import epe, read_flo

    gt = read_flo(real_media / "flow" / "00001_flow.flo")
    by_hand = np.mean(np.sqrt(gt[..., 0].astype(np.float64) ** 2 + gt[..., 1].astype(np.float64) ** 2))
    assert epe(np.zeros_like(gt), gt) == pytest.approx(by_hand, rel=1e-6)
    assert epe(gt, gt) == 0.0
    assert epe(np.moveaxis(gt, -1, 0), np.moveaxis(gt, -1, 0), layout="chw") == 0.0


def test_epe_averages_over_valid_pixels_only():
    from blinkflow.models.metrics_flow import epe

    gt = np.zeros((2, 2, 2), np.float32)
    pred = np.zeros_like(gt)
    pred[0, 0] = (3.0, 4.0)  # error 5 at one pixel
    valid = np.array([[True, True], [False, False]])
    assert epe(pred, gt) == pytest.approx(1.25)
    assert epe(pred, gt, valid) == pytest.approx(2.5)


def test_write_flo_read_flo_round_trip(tmp_path):
    from blinkflow.models.metrics_flow import read_flo, write_flo

    flow = np.random.default_rng(1).normal(size=(7, 5, 2)).astype(np.float32)
    path = write_flo(tmp_path / "x.flo", flow)
    np.testing.assert_array_equal(read_flo(path), flow)


def test_truncated_flo_is_a_clear_error_naming_the_file(tmp_path, real_media):
    from blinkflow.models.metrics_flow import FlowFileError, read_flo

    data = (real_media / "flow" / "00001_flow.flo").read_bytes()
    truncated = tmp_path / "truncated.flo"
    truncated.write_bytes(data[:-10])
    with pytest.raises(FlowFileError, match="truncated.flo: truncated") as caught:
        read_flo(truncated)
    assert isinstance(caught.value, BlinkflowError)
    bad_magic = tmp_path / "bad.flo"
    bad_magic.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(FlowFileError, match="bad.flo: not a .flo file"):
        read_flo(bad_magic)


def test_fl_all_counts_kitti_outliers():
    from blinkflow.models.metrics_flow import fl_all

    gt = np.zeros((1, 4, 2), np.float32)
    gt[0, :, 0] = (10.0, 10.0, 100.0, 0.0)
    pred = gt.copy()
    pred[0, 0, 0] += 4.0  # 4 px > 3 and 40% > 5%: outlier
    pred[0, 1, 0] += 2.0  # 2 px <= 3: fine
    pred[0, 2, 0] += 4.0  # 4 px > 3 but 4% <= 5% of 100: fine
    pred[0, 3, 1] += 3.5  # 3.5 px > 3 on zero flow: outlier
    assert fl_all(pred, gt) == pytest.approx(0.5)
    assert fl_all(gt, gt) == 0.0


def test_a_clip_longer_than_the_causal_nets_reach_and_cpu_half_precision_are_said_once(caplog):
    from blinkflow.stages.action import Action

    with caplog.at_level("WARNING"):
        stage = Action(StageConfig(model="causal3d_small", precision="bf16",
                                   options=Action.Options(input_size=[32, 32], clip_len=16, stride=16)))
        stage.setup("cpu")
        for start in (0, 16):
            stage.process(make_frames(16, height=32, width=32, start=start))
    said = [r.getMessage() for r in caplog.records]
    assert sum("clip_len: 16 frames, but causal3d_small sees only the last 9" in m for m in said) == 1
    assert sum("precision bf16 is for GPUs" in m for m in said) <= 1  # once a process, not on every forward



def test_the_final_window_reaches_back_for_a_whole_clip_and_pads_only_a_short_stream():
    """The tail's window was padded by repeating its last frame (frames 4-5 of a 6-frame stream: 4, 5, 5, 5); the
    model then read the end of a rotation as a bounce on 3 of 18 synthetic clips, where the last 4 real frames
    gave the right label on every one. It takes the samples before the tail now."""
    import torch

    stage = make_action_stage(clip_len=4, stride=4)
    seen = []
    model = stage.model

    def recording(clips):
        seen.append(clips.clone())
        return model(clips)

    frames = make_frames(6, height=16, width=16)
    for i, frame in enumerate(frames):
        frame.image[:] = 40 * i  # each frame its own gray level
    stage.process(frames)
    stage.model = recording
    stage.flush()
    levels = [round(float(seen[-1][0, :, t].mean()) * 255 / 40) for t in range(4)]
    assert levels == [2, 3, 4, 5] and frames[5].results["action"]["window"] == [2, 5]
    short = make_frames(2, stream="short", height=16, width=16)
    assert stage.process(short) == [] and [f.results["action"]["window"] for f in stage.flush()] == [[0, 1], [0, 1]]
