"""Depth-parallel model stages (MPVN) and Sideways training: splits, schedules, Ray, bench, training."""

from __future__ import annotations

import itertools
import json
import time

import pytest

torch = pytest.importorskip("torch")

from blinkflow.models.depth import (
    DepthClock,
    DepthSplitError,
    StreamingDepth,
    add_temporal_skips,
    balanced_partition,
    depth_units,
    pipelined_steps,
    split_model,
)
from blinkflow.models.registry import build_model

TINY_CAUSAL = {"widths": [8, 16, 24, 32], "stem_width": 8}
MID_BLOCK = [1, 9, 1, 1, 1, 1, 1, 1, 1, 1]  # unit costs that put the K=2 boundary inside block 0 (a pair crosses it)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def causal_model(**args):
    torch.manual_seed(0)
    return build_model("causal3d_small", task="action", num_classes=5, **(args or TINY_CAUSAL)).eval()


def frames(n=7, batch=2, size=32):
    return [torch.rand(batch, 3, size, size) for _ in range(n)]


def frame_by_frame(model, inputs):
    outputs, state = [], None
    with torch.no_grad():
        for frame in inputs:
            logits, state = model.step(frame, state)
            outputs.append(logits)
    return outputs


# --------------------------------------------------------------------------- splitting


def _video(name):
    return build_model(name, task="action", num_classes=5), torch.rand(1, 3, 4, 32, 32)


def _per_frame(name):
    import torchvision

    return getattr(torchvision.models, name)(num_classes=5), torch.rand(2, 3, 32, 32)


FAMILIES = {
    "r3d_18": lambda: _video("r3d_18"),
    "r2plus1d_18": lambda: _video("r2plus1d_18"),
    "s3d": lambda: (build_model("s3d", task="action", num_classes=5), torch.rand(1, 3, 5, 32, 32)),
    "resnet18 (per frame)": lambda: _per_frame("resnet18"),
    "mobilenet_v3_small (per frame)": lambda: _per_frame("mobilenet_v3_small"),
    "causal3d_small": lambda: (causal_model(), torch.rand(2, 3, 4, 32, 32)),
    "i3d": lambda: (build_model("i3d", task="action", num_classes=7), torch.rand(1, 3, 8, 64, 64)),
}


@pytest.mark.parametrize("family, k", [
    ("r3d_18", 2), ("r2plus1d_18", 3), ("s3d", 3), ("resnet18 (per frame)", 3), ("mobilenet_v3_small (per frame)", 2),
    ("causal3d_small", 2), ("causal3d_small", 3), ("i3d", 2), ("i3d", 4),
])
def test_split_model_equals_the_monolithic_model(family, k):
    model, example = FAMILIES[family]()
    model.eval()
    split = split_model(model, k, example_input=example, repeats=1)
    assert split.num_stages == k and split.cost_kind == "seconds"
    units = [name for stage in split.stages for name in stage.names]
    assert units == [u.name for u in depth_units(model)[0]], "stages are contiguous and cover every unit in order"
    with torch.no_grad():
        torch.testing.assert_close(split(example), model(example), rtol=1e-5, atol=1e-5)
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in split.parameters()), "stages share the model's parameters"


def test_video_resnets_split_at_residual_block_boundaries():
    model, _ = _video("r2plus1d_18")
    names = [u.name for u in depth_units(model)[0]]
    assert names == ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["head"]


def test_balanced_partition_minimises_the_slowest_stage():
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        costs = (torch.rand(7, generator=generator) * 10).tolist()
        for k in (1, 2, 3, 4):
            ranges = balanced_partition(costs, k)
            assert ranges[0][0] == 0 and ranges[-1][1] == len(costs) and len(ranges) == k
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            best = min(
                max(sum(costs[s:e]) for s, e in zip((0, *cuts), (*cuts, len(costs))))
                for cuts in itertools.combinations(range(1, len(costs)), k - 1)
            )
            assert max(sum(costs[s:e]) for s, e in ranges) == pytest.approx(best)


def test_split_follows_the_given_costs():
    model = causal_model()  # units: stem, blocks.i.temporal and blocks.i.spatial for i in 0..3, head
    split = split_model(model, 2, costs=[1, 6, 1, 1, 1, 1, 1, 1, 1, 1])
    assert [s.names for s in split.stages] == [["stem", "blocks.0.temporal"], [
        "blocks.0.spatial", "blocks.1.temporal", "blocks.1.spatial", "blocks.2.temporal", "blocks.2.spatial",
        "blocks.3.temporal", "blocks.3.spatial", "head"]]


def test_depth_parallel_on_a_stage_that_cannot_split_its_model_is_a_config_error():
    """detect runs its model whole: depth_parallel there reserved K idle slice actors (or refused to start
    with a misleading CPU count); now the config names the key. action takes it."""
    from blinkflow.config import load_config
    from blinkflow.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^stages\.detect\.depth_parallel: 4, but the detect stage cannot split "):
        load_config(data={"stages": {"detect": {"depth_parallel": 4}}})
    assert load_config(data={"stages": {"action": {"depth_parallel": 2}}}).stages["action"].depth_parallel == 2


def test_split_rejects_more_stages_than_units_and_unknown_models():
    with pytest.raises(DepthSplitError, match="10 depth units"):
        split_model(causal_model(), 11)
    with pytest.raises(DepthSplitError, match="cannot split"):
        split_model(torch.nn.Linear(3, 3), 2)
    import torchvision

    # features and a classifier, but not features -> pool -> flatten -> classifier: refused, not split wrongly
    for name in ("densenet121", "squeezenet1_1"):
        with pytest.raises(DepthSplitError, match=r"^cannot split (DenseNet|SqueezeNet) by depth"):
            split_model(getattr(torchvision.models, name)(num_classes=5), 2)


# --------------------------------------------------------------------------- streaming schedules


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sequential_streaming_equals_frame_by_frame(k):
    model, inputs = causal_model(), frames()
    reference = frame_by_frame(model, inputs)
    outputs = StreamingDepth(split_model(model, k), "sequential").run(inputs)
    assert [o.source_frame for o in outputs] == list(range(len(inputs)))
    assert all(o.lag == 0 for o in outputs)
    for output, expected in zip(outputs, reference):
        torch.testing.assert_close(output.logits, expected, rtol=1e-5, atol=1e-6)


class Recorder:
    """A ``run`` for DepthClock that records (tick, stage, input) and labels its outputs."""

    def __init__(self, clock):
        self.clock, self.calls = clock, []

    def __call__(self, k, value):
        self.calls.append((self.clock.tick, k, value))
        return f"s{k}@{self.clock.tick}"


@pytest.mark.parametrize("k", [2, 3, 4])
def test_pipelined_stage_consumes_the_previous_stage_output_of_the_previous_tick(k):
    clock = DepthClock(k, "pipelined")
    record = Recorder(clock)
    lasts = [clock.advance(f"frame{t}", record)[0] for t in range(8)]
    for tick, stage, value in record.calls:
        expected = f"frame{tick}" if stage == 0 else f"s{stage - 1}@{tick - 1}"
        assert value == expected
    # every stage works at every tick once the pipeline is full
    assert {(t, s) for t, s, _ in record.calls} == {(t, s) for t in range(8) for s in range(k) if t >= s}
    assert lasts[: k - 1] == [None] * (k - 1)
    assert [slot.frame for slot in lasts[k - 1 :]] == [t - (k - 1) for t in range(k - 1, 8)]
    assert clock.nominal_lag == k - 1 <= k


@pytest.mark.parametrize("k", [2, 3])
def test_pipelined_output_is_frame_t_minus_k_plus_1_exactly(k):
    model, inputs = causal_model(), frames()
    reference = frame_by_frame(model, inputs)
    outputs = StreamingDepth(split_model(model, k), "pipelined").run(inputs, drain=True)
    assert len(outputs) == len(inputs) + k - 1
    assert all(o.logits is None for o in outputs[: k - 1])
    done = outputs[k - 1 :]
    assert [o.source_frame for o in done] == list(range(len(inputs)))
    assert {o.lag for o in done} == {k - 1}
    for output in done:
        torch.testing.assert_close(output.logits, reference[output.source_frame], rtol=1e-5, atol=1e-6)


def test_multi_rate_clock_updates_the_deep_stage_every_n_ticks_and_reuses_its_output():
    clock = DepthClock(2, "pipelined", rates=[1, 3])
    record = Recorder(clock)
    lasts = [clock.advance(f"frame{t}", record)[0] for t in range(9)]
    deep_ticks = [t for t, stage, _ in record.calls if stage == 1]
    assert deep_ticks == [3, 6]  # tick 0 has nothing from stage 0 yet; then every third tick
    assert [v for t, stage, v in record.calls if stage == 1] == ["s0@2", "s0@5"]
    assert lasts[3] is lasts[4] is lasts[5], "between updates the last output is re-emitted, not recomputed"
    assert [s.frame for s in lasts[3:]] == [2, 2, 2, 5, 5, 5]


@pytest.mark.parametrize("mode", ["pipelined", "sequential"])
def test_multi_rate_drain_brings_out_the_last_frame_the_slow_stage_takes(mode):
    """With rates [1, 2] the deep stage takes every second frame; the drained run gives the last of them in
    either mode (sequential used to drain nothing and lost it), and one more tick gives nothing new."""
    streaming = StreamingDepth(split_model(causal_model(), 2), mode, rates=[1, 2])
    outputs = streaming.run(frames(n=4), drain=True)
    fed = sorted({o.source_frame for o in outputs if o.source_frame is not None})
    assert fed[-1] == 3, fed
    assert streaming.tick(None).source_frame in fed


def test_multi_rate_state_is_the_deep_stage_run_on_the_subsampled_sequence():
    model, inputs = causal_model(), frames(n=8)
    split = split_model(model, 2, costs=[1] * 10)  # the deep stage holds blocks 2 and 3, with their buffers
    assert split.stages[1].init_state() == [None, None]
    outputs = StreamingDepth(split, "pipelined", rates=[1, 2]).run(inputs, drain=True)
    fed = sorted({o.source_frame for o in outputs if o.source_frame is not None})
    assert fed == [1, 3, 5, 7]  # stage 1 updates on even ticks with stage 0's output of the tick before
    shallow, deep = split.stages
    expected, state = {}, None
    with torch.no_grad():
        # stage 0 sees every frame in order; stage 1 only the subsampled ones, carrying its own state
        shallow_state, shallow_out = None, []
        for frame in inputs:
            y, shallow_state = shallow.stream(frame.unsqueeze(2), shallow_state)
            shallow_out.append(y)
        for frame_index in fed:
            y, state = deep.stream(shallow_out[frame_index], state)
            expected[frame_index] = split.finish(y)
    for output in outputs:
        if output.logits is not None:
            torch.testing.assert_close(output.logits, expected[output.source_frame], rtol=1e-5, atol=1e-6)
    reference = frame_by_frame(model, inputs)
    assert (expected[7] - reference[7]).abs().max() > 1e-4, "a subsampled deep stage is not the frame-by-frame model"


def test_predictive_mode_attributes_the_lagged_output_to_the_current_frame():
    model, inputs = causal_model(), frames()
    split = split_model(model, 3)
    pipelined = StreamingDepth(split, "pipelined").run(inputs)
    predictive = StreamingDepth(split, "predictive").run(inputs, drain=True)
    assert len(predictive) == len(inputs), "predictive mode does not drain past the last frame"
    for p, q in zip(pipelined, predictive):
        assert (q.logits is None) == (p.logits is None)
        if q.logits is not None:
            assert q.attributed_frame == q.tick and q.lag == 0 and q.information_lag == 2
            torch.testing.assert_close(q.logits, p.logits)


def test_pipelined_steps_in_clip_mode_equal_the_streamed_schedule_with_temporal_skips():
    model, inputs = causal_model(), frames()
    split = split_model(model, 3)
    clip = torch.stack(inputs, dim=2)
    before = [o.logits for o in StreamingDepth(split, "predictive").run(inputs)]
    add_temporal_skips(split, clip, num_classes=5)
    zero_init = [o.logits for o in StreamingDepth(split, "predictive").run(inputs)]
    for a, b in zip(before, zero_init):
        assert (a is None and b is None) or torch.equal(a, b), "zero-initialised skips change nothing"
    for stage in split.stages[:-1]:
        torch.nn.init.normal_(stage.skip.fc.weight)
    streamed = StreamingDepth(split, "predictive").run(inputs)
    with torch.no_grad():
        steps = pipelined_steps(split, clip)
    for output in streamed[2:]:
        assert output.skip_frames == [output.tick - 1, output.tick - 2]  # stage s's skip lags 1 + s ticks
        torch.testing.assert_close(output.logits, steps[:, output.tick], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_depth_pipeline_streams_and_clips_equal_the_in_process_model(ray_local):
    from blinkflow.depth_parallel import DepthPipeline

    model, inputs = causal_model(), frames(n=6, batch=1)
    reference = frame_by_frame(model, inputs)
    pipeline = DepthPipeline(split_model(model, 2, costs=MID_BLOCK), threads=1)  # activations cross as a pair
    try:
        for mode in ("sequential", "pipelined"):
            report = pipeline.stream(inputs, mode)
            done = [o for o in report.outputs if o.logits is not None]
            assert [o.source_frame for o in done] == list(range(6))
            assert {o.lag for o in done} == {0 if mode == "sequential" else 1}
            for output in done:
                torch.testing.assert_close(output.logits, reference[output.source_frame], rtol=1e-5, atol=1e-6)
            assert len(report.latency_s) == 6 and len(report.busy_s) == 2 and min(report.busy_s) > 0
        multi = pipeline.stream(inputs, "pipelined", rates=[1, 2])
        in_process = StreamingDepth(split_model(model, 2, costs=MID_BLOCK), "pipelined", rates=[1, 2]).run(
            inputs, drain=True)
        assert [o.source_frame for o in multi.outputs] == [o.source_frame for o in in_process]
        for a, b in zip(multi.outputs, in_process):
            if b.logits is not None:
                torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-6)
        clips = [torch.rand(2, 3, 4, 32, 32) for _ in range(3)]
        with torch.no_grad():
            for got, clip in zip(pipeline(clips), clips):
                torch.testing.assert_close(got, model(clip), rtol=1e-5, atol=1e-6)
    finally:
        pipeline.close()


@pytest.mark.slow
def test_a_dead_slice_actor_is_started_again_and_the_clips_still_equal_the_model(ray_local):
    """The OOM killer takes one of the K slice actors: the next call starts the K afresh and gives the model's
    outputs (it used to fail every later clip of the run with ActorDiedError)."""
    from blinkflow.depth_parallel import DepthPipeline

    model = causal_model()
    pipeline = DepthPipeline(split_model(model, 2), threads=1)
    try:
        clips = [torch.rand(1, 3, 4, 32, 32) for _ in range(2)]
        pipeline(clips)
        dead = pipeline.actors[1]
        ray_local.kill(dead)
        with torch.no_grad():
            expected = [model(clip) for clip in clips]
        for got, want in zip(pipeline(clips), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert dead not in pipeline.actors and len(pipeline.actors) == 2
    finally:
        pipeline.close()


@pytest.mark.slow
def test_slice_actors_that_cannot_be_placed_are_one_error_and_none_is_left(ray_local, monkeypatch):
    """More slice actors than the cluster has room for: the start gives up with the one-line advice and kills
    the actors it asked for (it raised AttributeError and left them pending)."""
    from blinkflow import depth_parallel
    from blinkflow.errors import BlinkflowError

    monkeypatch.setattr(depth_parallel.DepthPipeline._wait_ready, "__defaults__", (3.0,))
    with pytest.raises(BlinkflowError, match=r"^depth_parallel: could not start 2 stage actors with num_cpus=3, "):
        depth_parallel.DepthPipeline(split_model(causal_model(), 2), num_cpus=3, threads=1)  # 4 CPUs: room for one
    deadline = time.monotonic() + 30  # the placed actor's CPUs come back once it is killed
    while ray_local.available_resources().get("CPU", 0) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 4, ray_local.available_resources()


@pytest.mark.slow
def test_compiled_graph_transport_gives_the_monolithic_outputs(ray_local):
    """The Compiled Graph path (the GPU default, here on CPU with shared-memory tensor channels)."""
    from blinkflow.depth_parallel import DepthPipeline

    model = causal_model()
    pipeline = DepthPipeline(split_model(model, 2), threads=1, transport="compiled")
    try:
        assert pipeline.transport == "compiled"
        clips = [torch.rand(2, 3, 4, 32, 32) for _ in range(4)]  # more clips than one in flight
        with torch.no_grad():
            expected = [model(clip) for clip in clips]
        for got, want in zip(pipeline(clips), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    finally:
        pipeline.close()


def test_threaded_depth_pipeline_gives_the_monolithic_outputs_with_its_stages_at_work_together(monkeypatch):
    """K slice threads, no Ray: clip batches pipelined through them equal the whole model's outputs, each stage
    runs in one thread of its own, and some call of the second stage runs while the first works on the next."""
    import threading
    import time

    from blinkflow.depth_parallel import SliceWorker, ThreadedDepthPipeline

    calls = []
    forward = SliceWorker.forward

    def timed(self, x):
        started = time.monotonic()
        time.sleep(0.02)  # long enough for the stages' calls to meet
        try:
            return forward(self, x)
        finally:
            calls.append((id(self), threading.current_thread().name, started, time.monotonic()))

    monkeypatch.setattr(SliceWorker, "forward", timed)
    model = causal_model()
    before = torch.get_num_threads()
    pipeline = ThreadedDepthPipeline(split_model(model, 2, costs=MID_BLOCK), ["cpu", "cpu"])
    try:
        assert torch.get_num_threads() == before  # threads of this process: its torch settings are left alone
        clips = [torch.rand(2, 3, 4, 32, 32) for _ in range(5)]  # more than the K + 1 in flight
        with torch.inference_mode():
            expected = [model(clip) for clip in clips]
            got = pipeline(clips)
        for output, want in zip(got, expected, strict=True):
            torch.testing.assert_close(output, want, rtol=1e-5, atol=1e-6)
    finally:
        pipeline.close()
    first, second = (sorted({c[0] for c in calls}, key=[c[0] for c in calls].index))
    threads = {worker: {c[1] for c in calls if c[0] == worker} for worker in (first, second)}
    assert all(len(names) == 1 for names in threads.values()) and threads[first] != threads[second]
    spans = {worker: [(c[2], c[3]) for c in calls if c[0] == worker] for worker in (first, second)}
    assert any(a < d and c < b for a, b in spans[first] for c, d in spans[second]), "the stages never overlapped"


def test_threaded_runner_action_depth_parallel_2_equals_depth_parallel_1(monkeypatch):
    from blinkflow.depth_parallel import ThreadedDepthPipeline
    from blinkflow.runners.threaded import ThreadedRunner
    from blinkflow.sinks import MemorySink

    pipelines = []
    call = ThreadedDepthPipeline.__call__
    monkeypatch.setattr(ThreadedDepthPipeline, "__call__", lambda self, batches: pipelines.append(self) or call(self, batches))

    def run(k):
        sink = MemorySink()
        summary = ThreadedRunner(_action_config(k), sinks=[sink]).run()
        return summary, [(r.stream_id, r.index, r.outcome.value, repr(r.results)) for r in sink.results]

    whole_summary, whole = run(1)
    assert pipelines == []
    split_summary, split = run(2)
    assert split == whole and split_summary.totals == whole_summary.totals
    assert all("action" in r[3] for r in split)
    assert pipelines and all(p.num_stages == 2 for p in pipelines), "depth_parallel: 2 ran on two slice threads"
    assert not any(lane._thread.is_alive() for p in pipelines for lane in p.lanes)  # closed with the stage


def _action_config(k):
    from blinkflow.config import load_config

    return load_config(data={
        "sources": [{"type": "synthetic", "id": "syn", "width": 64, "height": 48, "num_frames": 8}],
        "stages": {"action": {
            "model": "causal3d_small", "batch": 4, "depth_parallel": k,
            "options": {"clip_len": 4, "stride": 2, "input_size": [32, 32], "model_args": TINY_CAUSAL},
        }},
    })


@pytest.mark.slow
def test_ray_runner_action_depth_parallel_2_equals_depth_parallel_1(ray_local):
    from blinkflow.runners.local import LocalRunner
    from blinkflow.runners.ray import RayRunner
    from blinkflow.sinks import MemorySink

    def run(k):
        sink = MemorySink()
        summary = RayRunner(_action_config(k), sinks=[sink]).run()
        return summary, [(r.stream_id, r.index, r.outcome.value, repr(r.results)) for r in sink.results]

    whole_summary, whole = run(1)
    slices_before = _slice_actors(ray_local)
    split_summary, split = run(2)
    assert split == whole
    assert split_summary.totals == whole_summary.totals and split_summary.totals["processed"] == 8
    assert all("action" in r[3] for r in split)
    assert _slice_actors(ray_local) - slices_before == 2, "depth_parallel: 2 ran the model on two slice actors"
    local = MemorySink()
    LocalRunner(_action_config(2), sinks=[local]).run()  # the local runner runs the K slices in sequence in process
    assert [(r.stream_id, r.index, r.outcome.value, repr(r.results)) for r in local.results] == whole


def _slice_actors(ray) -> int:
    """Slice actors ever started in this Ray instance (dead ones included)."""
    return sum(a.get("ActorClassName") == "SliceWorker" for a in ray._private.state.actors().values())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_bench_depth_quick_writes_a_well_formed_section(ray_local, tmp_path):
    from blinkflow.bench.depth import bench_depth

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    result = bench_depth(quick=True, write=True, doc=doc)
    text = doc.read_text()
    assert "<!-- bench:other -->\nkept" in text
    section = text.split("<!-- bench:depth -->", 1)[1].split("<!-- /bench:depth -->", 1)[0]
    assert "## Depth-parallel stages" in section and "Sideways training vs ordinary backprop" in section
    tables = [line for line in section.splitlines() if line.startswith("|")]
    depth_rows = [line for line in tables if line.count("|") == 11]  # 10 columns
    assert len(depth_rows) == 2 * 2 + 4 + 2, "two tables: header, rule, monolithic and 3 (stream) or 1 (clip) K=2 rows"
    assert len([line for line in tables if line.count("|") == 8]) == 2 + 2, "Sideways: header, rule, two methods"
    assert any("| monolithic (in process) | 1 |" in line for line in tables)
    assert any("| depth-parallel Ray actors | 2 | pipelined |" in line for line in tables)
    stream = {v.schedule: v for v in result["stream"]}
    assert stream["pipelined"].lag == "1" and stream["sequential"].lag == "0"
    assert stream["pipelined"].max_diff < 1e-4 and result["clip"][1].max_diff < 1e-4
    assert len(stream["pipelined"].busy) == 2 and all(0 < b <= 1 for b in stream["pipelined"].busy)
    assert [r["method"] for r in result["sideways"]["results"]] == ["sideways K=2 (local)", "ordinary backprop (clip mode)"]


# --------------------------------------------------------------------------- Sideways


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_train_action_sideways_lowers_the_loss(tmp_path, capsys):
    from blinkflow.cli import main

    code = main(["train", "action", "--sideways", "--config", "configs/train/smoke-action.yaml",
                 "--set", f"out_dir={tmp_path}", "--set", "epochs=3"])
    assert code == 0
    report = json.loads((tmp_path / "sideways.json").read_text())
    sideways, backprop = report["results"]
    assert sideways["method"] == "sideways K=2 (local)" and backprop["method"].startswith("ordinary backprop")
    assert sideways["steps"] == backprop["steps"] == 12
    assert sideways["last_loss"] < sideways["first_loss"]
    assert (tmp_path / "sideways.pt").is_file()
    assert "sideways K=2 (local)" in capsys.readouterr().out


def test_train_sideways_with_clips_shorter_than_its_stages_is_one_line(tmp_path, capsys):
    """Three stages on two-frame clips: the top stage never sees a frame, so nothing trains; one line naming
    data.clip_len (it was a StatisticsError traceback)."""
    from blinkflow.cli import main

    code = main(["train", "action", "--sideways", "--stages", "3", "--config", "configs/train/smoke-action.yaml",
                 "--set", f"out_dir={tmp_path}", "--set", "data.clip_len=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "data.clip_len: 2 frames, but --stages 3 needs clips of at least 3" in err


def test_every_compared_method_trains_on_the_same_batches_in_the_same_order(tmp_path, monkeypatch):
    """One shuffling loader was shared: Sideways got epochs 0..E-1 of the shuffle, backprop the next E (and
    other flips and dropout draws); now two Sideways runs and backprop see the same batches and learn alike."""
    from blinkflow.models.causal3d import CausalConv3DNet
    from blinkflow.models.training import sideways
    from blinkflow.models.training.config import load_train_config

    seen = {}
    train_clip, forward_steps = sideways.LocalSideways.train_clip, CausalConv3DNet.forward_steps

    def spy_sideways(self, clips, labels):
        if not hasattr(self, "spy_run"):  # each run its own key (an id() was reused once the first run was freed)
            self.spy_run = sum(key != "backprop" for key in seen)
        seen.setdefault(self.spy_run, []).append((clips.clone(), labels.clone()))
        return train_clip(self, clips, labels)

    def spy_backprop(self, clips, *args, **kwargs):
        if self.training:  # not the held-out evaluation
            seen.setdefault("backprop", []).append(clips.clone())
        return forward_steps(self, clips, *args, **kwargs)

    monkeypatch.setattr(sideways.LocalSideways, "train_clip", spy_sideways)
    monkeypatch.setattr(CausalConv3DNet, "forward_steps", spy_backprop)
    cfg = load_train_config("configs/train/smoke-action.yaml", [f"out_dir={tmp_path}", "epochs=2",
                            "data.train.clips=14", "data.val.clips=7"], task="action")
    first, second, backprop = sideways.compare(cfg, 2, ("local", "local"))["results"]
    runs = [batches for key, batches in seen.items() if key != "backprop"]
    assert len(runs) == 2 and len(runs[0]) == len(seen["backprop"]) == 4
    for (clips, labels), (again, again_labels), exact in zip(*runs, seen["backprop"]):
        assert torch.equal(clips, again) and torch.equal(labels, again_labels) and torch.equal(clips, exact)
    # same batches, flips and dropout draws: the second run learns exactly like the first
    assert (first["first_loss"], first["last_loss"], first["metrics"]) == (
        second["first_loss"], second["last_loss"], second["metrics"])


def test_sideways_module_docstring_runs_this_module():
    """It said `python -m models.training.sideways`: the repository folder, which only imports from a clone's root."""
    import re

    from blinkflow.models.training import sideways

    assert re.findall(r"python -m ([\w.]+)", sideways.__doc__) == [sideways.__name__]


def test_sideways_module_finds_its_config_anywhere_and_refuses_what_it_would_ignore(tmp_path, monkeypatch, capsys):
    """Run outside the repository: the default config is the shipped one (it was a ConfigError traceback),
    and a cosine schedule is refused in one line as `blinkflow train --sideways` refuses it (it was ignored)."""
    from blinkflow.models.training.sideways import main

    monkeypatch.chdir(tmp_path)
    assert main(["--set", "optim.schedule=cosine", "--set", "epochs=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--sideways: optim.schedule: 'cosine' is not supported" in err, err
    assert not (tmp_path / "runs").exists(), "nothing trained"


def test_sideways_module_user_errors_are_one_line(tmp_path, capsys):
    from blinkflow.models.training.sideways import main

    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.yaml: config file not found" in err, err


@pytest.mark.parametrize("stages, message", [("0", "argument --stages: 0 is below 1"),
                                             ("two", "argument --stages: 'two' is not a whole number")])
def test_sideways_module_stage_count_is_checked_by_argparse(stages, message, tmp_path, capsys):
    """--stages 0 was a DepthSplitError traceback about a 'depth_parallel' option training does not have."""
    from blinkflow.models.training.sideways import main

    with pytest.raises(SystemExit) as caught:
        main(["--stages", stages, "--set", f"out_dir={tmp_path}", "--set", "epochs=1"])
    assert caught.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("costs", [None, MID_BLOCK], ids=["block boundary", "mid-block boundary"])
def test_sideways_stage_gradient_comes_from_the_stage_above_one_tick_earlier(costs):
    from blinkflow.models.training.config import OptimConfig
    from blinkflow.models.training.sideways import LocalSideways

    model = causal_model().train()
    split = split_model(model, 2, costs=costs)
    before = [p.detach().clone() for p in split.stages[0].parameters()]
    runner = LocalSideways(split, OptimConfig(lr=0.01, weight_decay=0.0))
    calls = []
    for k, worker in enumerate(runner.workers):
        original = worker.tick

        def spy(x, grad, labels, scale, k=k, original=original):
            calls.append((k, x is not None, grad is not None))
            return original(x, grad, labels, scale)

        worker.tick = spy
    loss = runner.train_clip(torch.rand(2, 3, 4, 32, 32), torch.tensor([0, 1]))
    assert loss > 0
    # tick 0: only stage 0 has input; tick 1: stage 1 starts, stage 0 has no gradient yet; tick 2 on: both
    assert calls == [(0, True, False), (1, False, False), (0, True, False), (1, True, False),
                     (0, True, True), (1, True, False), (0, True, True), (1, True, False)]
    assert any(not torch.equal(a, b) for a, b in zip(before, split.stages[0].parameters())), "stage 0 learned"


@pytest.mark.slow  # seconds: the fast tier keeps under 2 minutes
def test_sideways_executors_side_by_side_learn_alike(ray_local, tmp_path):
    """`--sideways-executor both`: the Ray run got the next epochs' batches and its actors their own dropout
    draws, so its losses differed from the in-process run's by more than the executors do."""
    from blinkflow.models.training.config import load_train_config
    from blinkflow.models.training.sideways import compare

    cfg = load_train_config("configs/train/smoke-action.yaml", [f"out_dir={tmp_path}", "epochs=2",
                            "data.train.clips=14", "data.val.clips=7"], task="action")
    local, remote = compare(cfg, 2, ("local", "ray"), baseline=False)["results"]
    for key in ("first_loss", "last_loss"):
        assert remote[key] == pytest.approx(local[key], abs=1e-3), key


@pytest.mark.slow
def test_ray_sideways_learns_exactly_like_in_process_sideways(ray_local):
    from blinkflow.models.training.config import OptimConfig
    from blinkflow.models.training.sideways import LocalSideways, RaySideways

    optim = OptimConfig(lr=0.01, weight_decay=0.0)
    models = [causal_model(**TINY_CAUSAL, dropout=0.0).train() for _ in range(2)]  # no dropout: no RNG to differ
    splits = [split_model(m, 2, costs=MID_BLOCK) for m in models]
    clip, labels = torch.rand(2, 3, 4, 32, 32), torch.tensor([0, 1])
    local, remote = LocalSideways(splits[0], optim), RaySideways(splits[1], optim)
    try:
        for _ in range(2):
            assert remote.train_clip(clip, labels) == pytest.approx(local.train_clip(clip, labels), rel=1e-5)
        remote.sync(splits[1])
    finally:
        remote.close()
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
