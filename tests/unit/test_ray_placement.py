"""The fail-fast checks of a cluster job, on described nodes (tests/integration/test_cluster_launch.py
runs them against a real two-node cluster)."""

from __future__ import annotations

import pytest

from jobs.runtime.config import ray_cluster
from jobs.runtime.config.ray_cluster import Needs, PlacementError, check_placement, fits_on, infer_needs, train_needs
from jobs.runtime.config.schema import ConfigError, validate
from tests.conftest import compose_config


def node(cpus: float, gpus: float = 0, name: str = "10.0.0.1") -> dict:
    return {"Alive": True, "NodeManagerAddress": name, "NodeID": "ab" * 28, "Resources": {"CPU": cpus, "GPU": gpus} if gpus else {"CPU": cpus}}


def test_a_node_holds_whole_bundles_only():
    two_cpu = Needs("worker", 4, cpus=2, gpus=0, keys="k")
    assert fits_on({"CPU": 5}, two_cpu) == 2
    assert fits_on({"CPU": 1}, two_cpu) == 0
    gpu = Needs("worker", 4, cpus=8, gpus=1, keys="k")
    assert fits_on({"CPU": 64, "GPU": 8}, gpu) == 8
    assert fits_on({"CPU": 16, "GPU": 8}, gpu) == 2  # CPUs bind first
    assert fits_on({"CPU": 64}, gpu) == 0
    assert fits_on({}, Needs("actor", 3, cpus=0, gpus=0, keys="k")) == 3  # zero-resource bundles fit anywhere


@pytest.fixture
def cluster_cfg(tmp_path):
    def make(*overrides: str):
        return compose_config(
            "pretrain",
            ["experiment=tiny", "launcher=ray", "cluster=remote", "cluster.address=10.0.0.1:6379", f"cluster.storage_path={tmp_path}/ray", *overrides],
            tmp_path,
        )

    return make


def test_gpu_workers_on_a_cluster_without_gpus_fail_naming_the_hardware(cluster_cfg, monkeypatch):
    monkeypatch.setattr(ray_cluster, "alive_nodes", lambda: [node(16), node(16, name="10.0.0.2")])
    cfg = cluster_cfg("hardware=gpu1")
    with pytest.raises(PlacementError, match=r"need 1 GPU each \(hardware=gpu1.*has no GPU \(nodes: 10.0.0.1 .*10.0.0.2"):
        check_placement(cfg, train_needs(cfg))


def test_more_workers_than_the_nodes_hold_fail_naming_the_counts(cluster_cfg, monkeypatch):
    monkeypatch.setattr(ray_cluster, "alive_nodes", lambda: [node(3), node(3)])  # 6 CPUs, but 2 per node of 2
    cfg = cluster_cfg("hardware.num_workers=3", "hardware.cpus_per_worker=2")
    with pytest.raises(
        PlacementError, match=r"3 Ray Train worker\(s\) of 2 CPU each \(hardware=cpu: hardware.num_workers=3, hardware.cpus_per_worker=2.*nodes hold 2"
    ):
        check_placement(cfg, train_needs(cfg))
    ok = cluster_cfg("hardware.num_workers=2", "hardware.cpus_per_worker=2")
    check_placement(ok, train_needs(ok))  # one on each node
    infer = cluster_cfg("infer.num_actors=4", "infer.cpus_per_actor=2")
    with pytest.raises(PlacementError, match=r"infer.num_actors=4, infer.cpus_per_actor=2"):
        check_placement(infer, infer_needs(infer))


def test_check_resources_false_leaves_the_waiting_to_ray(cluster_cfg, monkeypatch):
    monkeypatch.setattr(ray_cluster, "alive_nodes", lambda: [node(2)])
    cfg = cluster_cfg("hardware=gpu1", "cluster.check_resources=false")
    check_placement(cfg, train_needs(cfg))


def test_a_relative_root_dir_is_refused_inside_a_ray_job(tmp_path, monkeypatch):
    cfg = compose_config("pretrain", ["experiment=tiny"], tmp_path)
    cfg.paths.root_dir = "."
    validate(cfg)  # outside a Ray job: the current folder is the user's
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ConfigError, match=r"'paths.root_dir'.*Ray's temporary copy of --working-dir"):
        validate(cfg)
    cfg.paths.root_dir = str(tmp_path)
    validate(cfg)
