"""Shared fixtures: configs composed from conf/ into a temporary root, tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from jobs.runtime.config.schema import register

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_DASHBOARD_ENABLED", "0")
ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register()


def compose_config(job: str, overrides: list[str], root: Path) -> DictConfig:
    """Compose ``conf/<job>.yaml`` with overrides, writing everything under ``root``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=job, overrides=[f"paths.root_dir={root}", *overrides])


TINY = [
    "experiment=tiny",
    "launcher=local",
    "strategy=auto",
    "infer.use_ray=false",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "data.reader.num_users=120",
    "data.reader.num_items=60",
    "data.reader.num_topics=6",
    "data.reader.max_len=20",
]


@pytest.fixture(scope="module")
def shared_ray():
    """One embedded Ray for every in-process Ray test of a test file: a job finding Ray up uses it
    and leaves it running (jobs/runtime/config/ray_cluster.py: ray_session), so each test saves a
    Ray start and shutdown. Started as a job's embedded Ray would be, with 4 CPUs; stopped after the
    file, so its idle workers do not slow the tests of other files (clusters, servers) on 2 cores."""
    import ray

    env_vars = {"WANDB_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # as ray_session sets them
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env_vars})
    yield
    ray.shutdown()


@pytest.fixture
def tiny_cfg(tmp_path: Path):
    """A factory of tiny synthetic configs for any job, rooted in tmp_path."""

    def make(job: str = "pipeline", *overrides: str) -> DictConfig:
        return compose_config(job, [*TINY, *overrides], tmp_path)

    return make


# The longest groups of the suite (see docs/benchmarks.md, "Test suite"), started first under
# pytest-xdist so that no long one is left to run last on one worker while the other idles.
LONG_FIRST = (  # longest first, by the grouped durations of docs/benchmarks.md
    "tests/integration/test_ray_training.py",
    "tests/integration/test_cluster_launch.py",
    "cluster-readme-recipe",
    "sweep-resume",
    "tests/integration/test_sweep.py",
    "tests/integration/test_ray_pipeline.py",
    "sweep-optuna",
    "tests/integration/test_serve.py",
    "tests/integration/test_tiny_jobs.py",
    "tests/integration/test_scale_train.py",
    "tests/integration/test_update_loop.py",
    "tests/integration/test_batch_infer.py",
)


def _grouped(config) -> bool:
    """Whether this process collects for ``--dist loadgroup``: on a pytest-xdist worker the option
    ``dist`` is rewritten to "no" and ``loadgroup`` is set instead, and it is the workers'
    collection (their node ids, their order) that the controller schedules."""
    return config.getoption("dist", "no") == "loadgroup" or bool(getattr(config.option, "loadgroup", False))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist with ``--dist loadgroup`` (what ``make test`` runs): each test file is one
    group and runs on one worker, so its module fixtures (``shared_ray``, a sweep, a cluster) start
    once; a test marked ``xdist_group("<name>")`` runs apart from its file. The groups of
    ``LONG_FIRST`` are scheduled first. Without xdist nothing changes: files run in their order."""
    if not _grouped(config):
        return
    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))

    def rank(item) -> int:
        group = item.get_closest_marker("xdist_group").args[0]
        return LONG_FIRST.index(group) if group in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: the order inside a group, and among the rest, is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """pytest-xdist marks a test's group in its node id (``...::test@group``); a test without one
    is scheduled alone and its file's module fixtures start again on every worker. Refuse to run
    rather than silently run the suite ungrouped (pytest 9.2 with xdist 3.8 did: setup.cfg)."""
    ungrouped = [nodeid for nodeid in ids if "@" not in nodeid]
    if node.config.getoption("dist", "no") == "loadgroup" and ungrouped:
        raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} tests (first: {ungrouped[0]}): see setup.cfg's pin of pytest")
