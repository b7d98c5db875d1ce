"""A real two-node Ray cluster on this machine: stages placed on both nodes."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from blinkflow.config import load_config  # noqa: E402
from blinkflow.runners.ray import RayRunner  # noqa: E402
from blinkflow.sinks import MemorySink  # noqa: E402
from tests.conftest import write_test_video  # noqa: E402


@pytest.fixture
def two_node_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head_node": 2}})
    cluster.add_node(num_cpus=1, resources={"worker_node": 2})
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_stages_run_on_both_nodes_of_a_cluster(two_node_cluster, tmp_path):
    clip = write_test_video(tmp_path / "a.mp4", frames=10)
    cfg = load_config(data={
        "sources": [{"type": "file", "path": str(clip)}],
        "gate": {"enabled": False},
        "stages": {
            "chaos": {"resources": {"num_cpus": 0.5, "custom": {"head_node": 1}}},
            "segment": {"model": "unet_small", "batch": 2, "options": {"input_size": [32, 32]},
                        "resources": {"num_cpus": 0.5, "custom": {"worker_node": 1}}},
        },
        "runtime": {"runner": "ray", "address": two_node_cluster.address},
    })
    sink = MemorySink()
    runner = RayRunner(cfg, sinks=[sink])
    placements = {}
    original = runner._start_pools

    def start_and_record():
        pools = original()
        for pool in pools:
            placements[pool.spec.name] = ray.get(pool.actors[0].node_id.remote())
        return pools

    runner._start_pools = start_and_record
    summary = runner.run()
    assert summary.totals["processed"] == 10
    assert placements["chaos"] != placements["segment"], "the two stages must be on different nodes"
    assert [r.index for r in sink.results] == list(range(10))
    assert all("segment" in r.results and "chaos" in r.results for r in sink.results)
    assert len(two_node_cluster.list_all_nodes()) == 2


def test_unknown_cluster_address_is_a_clear_error(tmp_path):
    from blinkflow.errors import BlinkflowError

    if ray.is_initialized():
        ray.shutdown()
    clip = write_test_video(tmp_path / "a.mp4", frames=2)
    cfg = load_config(data={"sources": [{"type": "file", "path": str(clip)}], "runtime": {"address": "127.0.0.1:1"}})
    with pytest.raises(BlinkflowError, match="runtime.address: cannot connect to the Ray cluster at '127.0.0.1:1'"):
        RayRunner(cfg).run()
