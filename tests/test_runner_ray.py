"""The Ray runner: equivalence with the local runner, ordering, affinity, faults."""

from __future__ import annotations

import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from blinkflow.config import load_config  # noqa: E402
from blinkflow.frame import Outcome  # noqa: E402
from blinkflow.runners.local import LocalRunner  # noqa: E402
from blinkflow.errors import ConfigError  # noqa: E402
from blinkflow.runners.ray import RayRunner  # noqa: E402
from blinkflow.sinks import MemorySink  # noqa: E402
from tests.conftest import write_test_video  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def run(runner_cls, cfg):
    sink = MemorySink()
    summary = runner_cls(cfg, sinks=[sink]).run()
    return summary, sink.results


def comparable(results):
    return [(r.stream_id, r.index, r.outcome.value, r.reuse_of, r.error, repr(r.results)) for r in results]


def two_clips(tmp_path, frames=(9, 7)):
    return [
        {"type": "file", "path": str(write_test_video(tmp_path / f"c{i}.mp4", frames=n))} for i, n in enumerate(frames)
    ]


@pytest.mark.slow
def test_ray_outputs_equal_local_outputs(ray_local, tmp_path):
    cfg = load_config(data={
        # results copied, not moved along the decoder's vectors (as this test was written: with them the gate
        # reuses the frames after the failed frame 4 from it, and they fail too, "nothing to carry over")
        "sources": [{**clip, "motion_vectors": False} for clip in two_clips(tmp_path)],
        # one gate call per clip (the batch's old default), as this test was written: chaos counts the frames each
        # replica saw, and smaller gate waves spread a clip over both replicas differently from the local runner
        "gate": {"enabled": True, "threshold": 0.02, "batch": 64},
        "stages": {"chaos": {"batch": 3, "replicas": 2, "options": {"fail_indices": [4]}}},
    })
    local_summary, local_results = run(LocalRunner, cfg)
    ray_summary, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    assert ray_summary.totals == local_summary.totals
    assert ray_summary.totals["failed"] == 2  # frame 4 of each clip


@pytest.mark.slow
def test_ray_model_stages_match_local(ray_local, tmp_path):
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (5, 4)),
        "stages": {
            "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]}},
            "chaos": {"options": {"hold": 2}},
        },
    })
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)


@pytest.mark.slow
def test_ray_matches_local_with_region_recompute_on_partial_frames(ray_local, tmp_path):
    """The gate's partial frames: detect merges a crop with its last boxes, segment pastes tiles; both keep
    per-stream state, so each stream sticks to one replica in order and the runners agree exactly."""
    sources = [{"type": "synthetic", "id": f"syn{i}", "seed": 7 - 3 * i, "width": 160, "height": 120, "num_frames": 8,
                "num_objects": 3 - i} for i in range(2)]
    cfg = load_config(data={
        "sources": sources,
        "gate": {"enabled": True},
        "stages": {
            "detect": {"batch": 3, "replicas": 2, "options": {"score_threshold": 0.05, "crop_max_area": 0.9, "crop_reuse": True}},
            "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [64, 64]}},
        },
    })
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    crops = [r for r in local_results if "crop" in (r.results.get("detect") or {})]
    assert crops, "no partial frame ran the detector on a crop"


@pytest.mark.slow
def test_ray_matches_local_with_letterboxed_canvases_on_partial_frames(ray_local):
    """crop_reuse: letterbox (YOLOX): the changed regions packed into one canvas per partial frame, merged with
    the stream's last boxes, identically in both runners, with the detector on two replicas."""
    from pathlib import Path

    parking = Path(__file__).resolve().parent / "data" / "static" / "car-detection-19s.mp4"
    cfg = load_config(data={
        "sources": [{"type": "file", "id": "parking", "path": str(parking), "resize": [384, 216], "max_frames": 24,
                     "motion_vectors": True}],
        "gate": {"enabled": True, "refresh": {"detect": 4}},
        "stages": {"detect": {"model": "yolox_nano", "weights": "shipped", "batch": 2, "replicas": 2,
                              "options": {"score_threshold": 0.3, "crop_reuse": "letterbox",
                                          "model_args": {"input_size": [320, 320]}}}},
    })
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    canvases = [r for r in local_results if r.outcome.value == "processed" and "regions" in (r.results["detect"].get("crop") or {})]
    assert canvases, "no partial frame ran the detector on a canvas"


@pytest.mark.slow
def test_ray_matches_local_with_object_weighted_change_and_tiles_in_context(ray_local):
    """object_weight: the driver hands the gate each stream's boxes audit_lag frames late, in both runners
    alike; frames of small change carry the boxes over and run the segmenter alone on its changed tiles
    (carry_until), block by block around the stream's cached activations (tile_update), grown to the regions of
    its last mask they touch (tile_regions); with region_budget each
    audit also says
    where the results disagreed, and tiles the audits found harmless count less, alike in both. The segmenter's
    masks lean to the stream's previous ones (keep_margin) on two replicas: each stream sticks to one."""
    from tests.test_runner_threaded import object_weighted_parking

    cfg = object_weighted_parking(max_frames=72, segment_replicas=2)
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    gates = [r.results["gate"] for r in local_results]
    assert any("weighted" in g and g["weighted"] > g["changed"] for g in gates), "no change on a known object"
    tiles = [r.results["segment"]["tiles"] for r in local_results
             if r.outcome is Outcome.PROCESSED and "tiles" in r.results["segment"]]
    assert any(t.get("update") == "layers" for t in tiles), "no partial frame recomputed the trunk block by block"
    grown = [r for r in local_results if r.outcome is Outcome.PROCESSED and "tiles" in r.results["segment"]
             and r.results["segment"]["tiles"]["recomputed"] > r.results["gate"]["tiles"]["changed"]]
    assert grown, "no partial frame grew its tiles to the regions of the last mask they touch (tile_regions)"
    assert any(g.get("carried") == ["detect"] for g in gates), "no frame carried the boxes over a small change"
    assert any(g.get("discounted_tiles", 0) > 0 for g in gates), "no audit found a changed tile harmless"
    cfg.stages["segment"].options.keep_margin = None
    _, plain = run(LocalRunner, cfg)
    assert any(a.results["segment"]["mask"]["data"] != b.results["segment"]["mask"]["data"] for a, b in
               zip(local_results, plain) if a.outcome is Outcome.PROCESSED and b.outcome is Outcome.PROCESSED), \
        "the masks did not lean on the previous ones anywhere: the replicas' stream affinity went untested"


@pytest.mark.slow
def test_ray_matches_local_with_feature_reuse_on_gate_refreshes(ray_local, one_torch_thread):
    """The segmenter's feature-level reuse keeps per-stream features, the motion since them and its adapted
    interval: with the gate on, its refreshes run only the head on warped features, identically in both runners.
    (One torch thread here as in each actor: with two, a convolution sums in another order, and a warped frame's
    class map came out one pixel different.)"""
    from pathlib import Path

    bikes = Path(__file__).resolve().parent / "data" / "video" / "bikes.mp4"
    cfg = load_config(data={
        "sources": [{"type": "file", "id": "bikes", "path": str(bikes), "resize": [160, 68], "max_frames": 16,
                     "motion_vectors": True}],
        "gate": {"enabled": True, "threshold": 0.25, "tiles": None, "refresh": {"segment": 1}, "max_reuse": 8},
        "stages": {"segment": {"model": "deeplabv3_mobilenet_v2", "weights": "shipped", "batch": 2,
                               "options": {"input_size": None, "feature_reuse": 4}}},
    })
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    warped = [r for r in local_results if r.outcome is Outcome.PROCESSED and "features" in r.results["segment"]]
    assert warped and all(r.results["gate"]["decision"] == "refresh" for r in warped)
    # the interval's checks (feature_reuse_adapt, on by default) run and move it alike in both runners
    checks = [r.results["segment"]["feature_check"] for r in local_results
              if r.outcome is Outcome.PROCESSED and "feature_check" in r.results["segment"]]
    assert checks and all(0 <= c["mask_iou"] <= 1 and 1 <= c["interval"] <= 8 for c in checks)
    # and the keys run for new content (feature_reuse_change), which the pan brings in
    assert any("new_content" in r.results["segment"] for r in local_results if r.outcome is Outcome.PROCESSED)


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True])
def test_ray_matches_local_with_segment_refreshes(ray_local, adaptive):
    """A refresh runs the segmenter alone and the driver carries the boxes over; with adaptive and
    adapt_bounds, its audit moves the bound a few frames later. The same in both runners."""
    cfg = load_config(data={
        "sources": [{"type": "synthetic", "id": "still", "seed": 7, "width": 96, "height": 64, "num_frames": 14,
                     "num_objects": 2, "action": "static", "static_camera": True}],
        # lighting off: the scene's drift is mostly its lighting, which gives the refreshes something to refresh
        "gate": {"enabled": True, "refresh": {"segment": 2}, "max_reuse": 8, "adaptive": adaptive,
                 "adapt_bounds": adaptive, "audit_lag": 2, "batch": 2, "lighting": False},
        "stages": {"detect": {"batch": 2}, "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]}}},
    })
    _, local_results = run(LocalRunner, cfg)
    _, ray_results = run(RayRunner, cfg)
    assert comparable(ray_results) == comparable(local_results)
    refreshes = [r.index for r in local_results if r.results["gate"]["decision"] == "refresh"]
    # the first refresh agrees (the scene barely moves): adaptive gives the segmenter one frame more
    assert refreshes[:2] == ([3, 7] if adaptive else [3, 6])


@pytest.mark.slow
def test_per_stream_order_with_a_holding_temporal_stage_and_replicas(ray_local, tmp_path):
    sources = two_clips(tmp_path, (8, 8)) + [{"type": "synthetic", "id": "syn", "width": 64, "height": 48, "num_frames": 8}]
    cfg = load_config(data={"sources": sources, "stages": {"chaos": {"replicas": 2, "batch": 2, "options": {"hold": 3}}}})
    summary, results = run(RayRunner, cfg)
    for stream in ("c0", "c1", "syn"):
        mine = [r for r in results if r.stream_id == stream]
        assert [r.index for r in mine] == list(range(8))
        # stream affinity: one replica saw the whole stream, so its per-stream counter runs 1..8
        assert [r.results["chaos"]["seen"] for r in mine] == list(range(1, 9))
    assert summary.totals["processed"] == 24


@pytest.mark.slow
def test_killed_actor_is_restarted_and_no_frame_vanishes(ray_local, tmp_path):
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (40, 40)),
        "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 30}}},
        "runtime": {"max_in_flight": 4},
    })
    runner = RayRunner(cfg, sinks=[MemorySink()])
    killer = threading.Thread(target=_kill_first_actor_when_busy, args=(runner,), daemon=True)
    killer.start()
    summary = runner.run()
    killer.join(timeout=30)
    assert runner.killed, "the test must actually kill an actor"
    totals = summary.totals
    assert totals["decoded"] == 80
    assert totals["processed"] + totals["failed"] == 80
    assert totals["processed"] >= 76, "in-flight frames are retried once on the restarted actor"
    results = runner.sinks[0].results
    for stream in ("c0", "c1"):
        assert [r.index for r in results if r.stream_id == stream] == list(range(40))


@pytest.mark.slow
def test_a_restarted_actor_that_cannot_set_up_fails_its_frames_and_the_run_goes_on(ray_local, tmp_path):
    """Killed, the chaos actor comes back on a 'node' without its file: its set-up fails. The run used to die
    with an AttributeError traceback (no failed frames, sinks not committed); now every frame it would have
    computed fails with the set-up error, in one line, and every frame still has its outcome."""
    marker = tmp_path / "gone"
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (30, 30)),
        "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 20, "fail_setup_if": str(marker)}}},
        "runtime": {"max_in_flight": 4},
    })
    runner = RayRunner(cfg, sinks=[MemorySink()])

    def kill_after_setup() -> None:
        deadline = time.time() + 60
        while time.time() < deadline and not (runner.pools and runner.accounting.totals()["processed"] >= 6):
            time.sleep(0.01)
        marker.touch()  # the restarted incarnation's set-up will fail
        ray.kill(runner.pools[0].actors[0], no_restart=False)

    killer = threading.Thread(target=kill_after_setup, daemon=True)
    killer.start()
    summary = runner.run()
    killer.join(timeout=30)
    totals = summary.totals
    assert totals["decoded"] == 60 and totals["processed"] + totals["failed"] == 60
    assert 0 < totals["failed"] and totals["processed"] >= 6
    failed = [r for r in runner.sinks[0].results if r.outcome.value == "failed"]
    assert all("injected set-up failure" in r.error and "\n" not in r.error for r in failed), failed[0].error
    for stream in ("c0", "c1"):
        assert [r.index for r in runner.sinks[0].results if r.stream_id == stream] == list(range(30))


@pytest.mark.slow
def test_a_stage_failing_at_a_streams_end_stops_the_ray_run_as_it_stops_the_local_one(ray_local, tmp_path):
    """Only a restarted actor's set-up failure fails frames and goes on; any other error of a call (here the
    stage's end_stream) was swallowed as one and blamed on a restart that never happened."""
    from blinkflow.runners.local import LocalRunner

    from blinkflow.errors import StageError

    cfg = load_config(data={"sources": two_clips(tmp_path, (6,)), "stages": {"chaos": {"options": {"fail_end": True}}}})
    for runner_cls in (LocalRunner, RayRunner):  # one line, the same in both (Ray's wrapper carried colours, a pid)
        with pytest.raises(StageError) as caught:
            runner_cls(cfg, sinks=[MemorySink()]).run()
        assert str(caught.value).startswith("stages.chaos: ending stream 'c0' failed (RuntimeError: chaos: injected "
                                            "failure ending stream c0); the frames it held are lost")


@pytest.mark.slow
def test_the_stage_totals_keep_a_dead_actors_work_with_metrics_off(ray_local, tmp_path):
    """Metrics off, the actors were drained only at the end: the summary's per-stage frames lost all the dead
    incarnation's work (here about half). They are drained twice a second now, metrics on or off."""
    cfg = load_config(data={
        "sources": two_clips(tmp_path, (40, 40)),
        "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 100}}},
        "runtime": {"max_in_flight": 4},
    })
    runner = RayRunner(cfg, sinks=[MemorySink()])
    killer = threading.Thread(target=_kill_first_actor_when_busy, args=(runner, 40), daemon=True)
    killer.start()
    summary = runner.run()
    killer.join(timeout=30)
    assert runner.killed and summary.totals["processed"] + summary.totals["failed"] == 80
    # 80 frames, and more for the retried chain, less what the dead one did since its last drain (half a second)
    assert summary.stage_frames["chaos"] >= 64, summary.stage_frames


@pytest.mark.slow
def test_a_run_that_fails_kills_its_actors_at_once_instead_of_waiting_for_their_teardown(ray_local, tmp_path):
    """A sink fails with four slow calls in flight: each actor's teardown queued behind them (up to 30 s an
    actor, one after another; a second Ctrl-C waited as long). After a failure the actors are killed at once."""
    class Failing(MemorySink):
        def write(self, result):
            raise OSError("disk full")

    cfg = load_config(data={"sources": two_clips(tmp_path, (40, 40)),
                            "stages": {"chaos": {"batch": 2, "options": {"sleep_ms": 5000}}},
                            "runtime": {"max_in_flight": 4}})
    runner = RayRunner(cfg, sinks=[Failing()])
    started = time.monotonic()
    with pytest.raises(OSError, match="disk full"):
        runner.run()
    # the first result comes after ~5 s; waiting out the teardown behind three more calls took 15 s more
    assert time.monotonic() - started < 14


def test_under_ray_a_stage_names_only_the_gpus_its_actor_is_granted(monkeypatch):
    """Inside an actor Ray numbers the GPUs it grants from cuda:0: cuda:1 with one GPU granted was an invalid
    ordinal at set-up, and cuda with num_gpus 0 used GPU 0 unreserved (Ray leaves CUDA_VISIBLE_DEVICES unset
    then); an actor that asked for no GPU now sees none, so auto means its CPU."""
    from blinkflow.runners.ray import _only_granted_gpus

    def stage(device, gpus):
        return {"runtime": {"runner": "ray"}, "stages": {"chaos": {"device": device, "resources": {"num_gpus": gpus}}}}

    with pytest.raises(ConfigError, match=r"^stages\.chaos\.device: 'cuda:1', but its actor sees only the 1 GPU\(s\)"):
        load_config(data=stage("cuda:1", 0.5))
    with pytest.raises(ConfigError, match=r"^stages\.chaos\.device: 'cuda', but resources\.num_gpus is 0, so Ray"):
        load_config(data=stage("cuda", 0))
    assert load_config(data=stage("cuda:1", 2)).stages["chaos"].device == "cuda:1"
    assert load_config(data={**stage("cuda:1", 0), "runtime": {"runner": "local"}})  # in-process: every GPU is seen
    driver = {"runtime": {"runner": "ray"}, "stages": {"detect": {}, "track": {"device": "cuda:1"}}}
    assert load_config(data=driver).stages["track"].device == "cuda:1"  # track runs in the driver, not an actor
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # what Ray sets for an actor it granted a GPU; undone after
    _only_granted_gpus(1.0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    _only_granted_gpus(0.0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""


def test_a_custom_resource_a_local_instance_lacks_is_one_line_not_a_run_that_waits_forever():
    """resources.custom on a local instance: Ray waited forever to place the actor (no word said); CPUs and
    GPUs were checked, custom resources not. On a cluster (runtime.address) an autoscaler may add the node."""
    from blinkflow.graph import build_graph
    from blinkflow.runners.ray import check_room_for_actors

    data = {"stages": {"chaos": {"replicas": 2, "resources": {"custom": {"gpu_node": 1}}}}}
    cfg = load_config(data=data)
    with pytest.raises(ConfigError, match=r"^runtime: the stage actors reserve 2 of the custom resource 'gpu_node' but "
                                          r"the cluster has 0 \(chaos 2 x 1 CPU \+ 1 gpu_node\).*drop resources\.custom"):
        check_room_for_actors(cfg, build_graph(cfg), {"CPU": 8.0, "GPU": 0.0})
    check_room_for_actors(cfg, build_graph(cfg), {"CPU": 8.0, "gpu_node": 2.0})  # room: nothing said
    joined = load_config(data={**data, "runtime": {"address": "127.0.0.1:6379"}})
    check_room_for_actors(joined, build_graph(joined), {"CPU": 8.0})  # a cluster may grow: a warning only


def _kill_first_actor_when_busy(runner, after: int = 10):
    runner.killed = False
    deadline = time.time() + 60
    while time.time() < deadline:
        if runner.pools and runner.accounting.totals()["processed"] >= after:
            ray.kill(runner.pools[0].actors[0], no_restart=False)
            runner.killed = True
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_live_mode_drops_oldest_frames_under_overload(ray_local, tmp_path):
    from tests.test_runner_threaded import check_live_overload_drops_the_oldest_frames

    check_live_overload_drops_the_oldest_frames(RayRunner, tmp_path)
