"""The learning loop on tiny synthetic data: events and new items logged by the service ->
jobs.update (warm start, grown catalog, new bundle version with lineage) -> hot reload ->
changed scores; a second update on the same log does nothing; a killed update leaves the
served model intact; the service runs updates on its own schedule."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import torch

from inference.bundle import read_manifest, read_weights
from jobs import pipeline
from jobs.runtime.stages.update import run_update
from serving.recommender import Recommender
from tests.conftest import ROOT, TINY, compose_config
from tests.integration.test_serve import Server

UPDATE = ["update.max_epochs=1", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loop")
    cfg = compose_config(
        "pipeline",
        [*TINY, "pretrain.max_epochs=2", "finetune.max_epochs=2", "data.batch_size=16", "pipeline.batch_infer=false", f"paths.output_dir={root}/pipeline"],
        root,
    )
    pipeline.run(cfg)
    return {"root": root, "run": root / "pipeline", "bundle": root / "pipeline" / "finetune" / "bundle"}


def update_cfg(trained, state: Path, root: Path, *extra: str):
    return compose_config("update", [*TINY, *UPDATE, f"update.bundle={trained['bundle']}", f"update.state_dir={state}", *extra], root)


def test_an_update_learns_the_log_and_a_second_one_does_nothing(trained, tmp_path):
    service = Recommender(trained["bundle"], tmp_path / "state")
    user = str(service.model.bundle.users.user_ids[0])
    service.add_item("late-item", "plough sheep barn wheat", ["topic_x"])
    for item in ["i1", "i2", "i3", "late-item", "i5"]:
        service.ingest(user, item)
    for item in ["late-item", "i7", "i8", "i9"]:
        service.ingest("newcomer", item)
    before = service.recommend(user_id=user, k=5)["items"]

    metrics = run_update(update_cfg(trained, tmp_path / "state", tmp_path))
    assert metrics["update/noop"] == 0 and metrics["update/events"] == 9 and metrics["update/new_items"] == 1
    folder = next((tmp_path / "outputs" / "update").glob("*/bundle"))
    manifest = read_manifest(folder)
    assert manifest["model_version"] == 2 and manifest["stage"] == "update"
    assert manifest["lineage"]["log_offset_start"] == 0 and manifest["lineage"]["log_offset_consumed"] == 10
    assert manifest["parent"]["model_version"] == 1 and manifest["num_items"] == 61
    assert read_weights(folder)["item_tower.id_embedding.weight"].shape[0] == 61
    # the same log again: nothing to do, no new folder
    assert run_update(update_cfg(trained, tmp_path / "state", tmp_path))["update/noop"] == 1
    assert len(list((tmp_path / "outputs" / "update").glob("*/bundle"))) == 1

    service.reload(folder)
    assert service.model.version == 2
    state = service.user_state(user)
    assert state["live_events"] == 0 and state["history"][-5:] == ["i1", "i2", "i3", "late-item", "i5"]  # in the stored history now, not twice
    assert service.user_state("newcomer")["history"] == ["late-item", "i7", "i8", "i9"]
    after = service.recommend(user_id=user, k=5)["items"]
    assert [(i["item_id"], round(i["score"], 4)) for i in after] != [(i["item_id"], round(i["score"], 4)) for i in before]
    service.ingest(user, "i11")  # events after the update are live again
    assert service.user_state(user)["live_events"] == 1
    # and 'latest' continues from the update, with only the new event to learn
    latest = run_update(compose_config("update", [*TINY, *UPDATE, f"update.state_dir={tmp_path / 'state'}"], tmp_path))
    assert latest["update/noop"] == 0 and latest["update/events"] == 1 and latest["update/model_version"] == 3
    service.close()


def test_a_killed_update_leaves_the_served_model_intact(trained, tmp_path):
    state = tmp_path / "state"
    server = Server(trained["root"], trained["run"], state, f"serve.bundle_roots=[{tmp_path}]").wait_ready()
    try:
        user = "i-will-be-updated"
        for item in ["i1", "i4", "i9", "i16"]:
            assert server.post("/events", {"user_id": user, "item_id": item}).status_code == 200
        before = server.post("/recommend", {"user_id": user, "k": 5}).json()
        served = {p.name: p.read_bytes() for p in trained["bundle"].iterdir() if p.is_file()}
        env = {**os.environ, "WANDB_MODE": "disabled"}
        args = [
            sys.executable,
            "-m",
            "jobs.update",
            *TINY,
            *UPDATE,
            f"update.bundle={trained['bundle']}",
            f"update.state_dir={state}",
            f"paths.root_dir={tmp_path}",
        ]
        killed = subprocess.run([*args, "debug.fail_at_step=1", "debug.fail_rank=0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert killed.returncode == 17, killed.stdout[-2000:] + killed.stderr[-2000:]  # died mid-training
        assert not list((tmp_path / "outputs" / "update").glob("*/bundle"))  # no half bundle
        assert {p.name: p.read_bytes() for p in trained["bundle"].iterdir() if p.is_file()} == served
        assert requests.get(server.url + "/healthz", timeout=10).json()["model_version"] == 1
        assert server.post("/recommend", {"user_id": user, "k": 5}).json() == before
        finished = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-2000:]
        bundle = next((tmp_path / "outputs" / "update").glob("*/bundle"))
        assert server.post("/admin/reload", {"bundle": str(bundle)}).json()["model_version"] == 2
        assert server.post("/recommend", {"user_id": user, "k": 5}).json()["items"] != before["items"]
    finally:
        server.stop()


def test_the_service_updates_itself_on_schedule_without_failing_a_request(trained, tmp_path):
    overrides = (
        "[" + ",".join(f"'{o}'" for o in ("launcher=local", "strategy=auto", "logger=none", "update.max_epochs=1", "trainer.enable_progress_bar=false")) + "]"
    )
    server = Server(trained["root"], trained["run"], tmp_path / "state", "serve.update.every_events=5", f"serve.update.overrides={overrides}").wait_ready()
    try:
        errors, done, stop = [], [], threading.Event()

        def client() -> None:
            for _ in range(2000):  # bounded
                if stop.is_set():
                    return
                r = server.post("/recommend", {"history": ["i1", "i2"], "k": 5})
                (done if r.status_code == 200 else errors).append(r.status_code)
                time.sleep(0.01)

        thread = threading.Thread(target=client)
        thread.start()
        before = server.post("/recommend", {"history": ["i1", "i2"], "k": 5}).json()["items"]
        for n in range(5):
            assert server.post("/events", {"user_id": "scheduled", "item_id": f"i{n + 20}"}).status_code == 200
        deadline = time.monotonic() + 180
        health = {}
        while time.monotonic() < deadline:
            health = requests.get(server.url + "/healthz", timeout=10).json()
            if health["model_version"] == 2:
                break
            time.sleep(0.5)
        stop.set()
        thread.join(timeout=60)
        assert health["model_version"] == 2 and health["update_updates"] == 1 and health["update_failures"] == 0, health
        assert errors == [] and len(done) > 10
        assert server.post("/recommend", {"history": ["i1", "i2"], "k": 5}).json()["items"] != before
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert "towerrec_model_version 2.0" in metrics and 'towerrec_updates{outcome="updates"} 1.0' in metrics
    finally:
        server.stop()


def test_the_id_embedding_grows_with_trained_rows_kept():
    from lightning_modules.hf_backbones import build_gpt2
    from lightning_modules.item_tower import ItemTower
    from lightning_modules.two_tower_model import TwoTowerModel
    from lightning_modules.two_tower_module import TwoTowerModule
    from lightning_modules.user_tower import UserTower

    def model(n: int) -> TwoTowerModel:
        return TwoTowerModel(ItemTower(n, 8, None), UserTower(build_gpt2(1, 2, 8, 8, 0.0), 8))

    small, big = model(5), TwoTowerModule(model(7))
    big.load_pretrained(small.state_dict(), "small")
    weight = big.model.item_tower.id_embedding.weight
    assert torch.equal(weight[:5], small.item_tower.id_embedding.weight) and weight[5:].abs().sum() == 0
    with pytest.raises(RuntimeError):  # a catalog that shrank is no continuation
        TwoTowerModule(model(4)).load_pretrained(small.state_dict(), "small")


def _scheduler(trained, tmp_path, timeout_s: float):
    from jobs.runtime.service.update_schedule import UpdateScheduler

    cfg = compose_config(
        "serve",
        [
            *TINY,
            f"serve.bundle={trained['bundle']}",
            "serve.update.every_events=1",
            f"serve.update.timeout_seconds={timeout_s}",
            "serve.update.overrides=['launcher=local']",
        ],
        tmp_path,
    )
    service = Recommender(trained["bundle"], tmp_path / "state")
    scheduler = UpdateScheduler(service, cfg, str(tmp_path / "state"), tmp_path / "run", poll_s=0.1)
    service.ingest("someone", "i3")  # an update is due (serve.update.every_events=1)
    return service, scheduler


def test_an_update_past_its_timeout_is_killed_and_counted_failed(trained, tmp_path, caplog):
    import re

    import psutil

    service, scheduler = _scheduler(trained, tmp_path, timeout_s=2.0)
    try:
        start = time.monotonic()
        with caplog.at_level("ERROR", logger="jobs.runtime.service.update_schedule"):
            scheduler.update_once()
        assert time.monotonic() - start < 30  # killed at 2 s, not left to finish (an update takes longer)
        assert service.update_stats["failures"] == 1 and service.update_stats["updates"] == 0 and service.model.version == 1
        found = re.search(r"jobs.update \(pid (\d+)\) ran past serve.update.timeout_seconds=2.0 and was killed", caplog.text)
        assert found, caplog.text
        assert not psutil.pid_exists(int(found.group(1)))
    finally:
        service.close()


def test_stopping_the_scheduler_ends_a_running_update(trained, tmp_path):
    import psutil

    service, scheduler = _scheduler(trained, tmp_path, timeout_s=600.0)
    try:
        scheduler.start()
        deadline = time.monotonic() + 60
        while scheduler.child is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child = scheduler.child
        assert child is not None, "no update started"
        start = time.monotonic()
        scheduler.stop()
        assert not scheduler.is_alive() and time.monotonic() - start < 45
        assert not psutil.pid_exists(child.pid)  # ended and reaped
        assert service.update_stats["failures"] == 0 and service.model.version == 1
    finally:
        service.close()


def test_a_forgotten_user_leaves_the_service_at_once_and_the_next_bundle_entirely(trained, tmp_path):
    import pandas as pd

    from inference.bundle import load_bundle
    from serving.recommender import ServiceError

    service = Recommender(trained["bundle"], tmp_path / "state")
    user = str(service.model.bundle.users.user_ids[3])  # trained on, with a stored history
    try:
        for item in ["i1", "i2"]:
            service.ingest(user, item)
            service.ingest("neighbour", item)
        assert service.forget_user(user) == {"user_id": user, "offset": 4, "erased_events": 2}
        for ask in (lambda: service.user_state(user), lambda: service.recommend(user_id=user, k=3)):
            with pytest.raises(ServiceError, match="unknown user_id") as gone:
                ask()
            assert gone.value.status == 404
        assert service.user_state("neighbour")["live_events"] == 2

        metrics = run_update(update_cfg(trained, tmp_path / "state", tmp_path, "update.min_events=100"))  # the forget alone is reason to update
        assert metrics["update/noop"] == 0 and metrics["update/forgotten_users"] == 1 and metrics["update/events"] == 2
        run = next((tmp_path / "outputs" / "update").glob("*-v2-*"))
        bundle = load_bundle(run / "bundle")
        parent_users = {str(u) for u in service.model.bundle.users.user_ids}
        assert user not in {str(u) for u in bundle.users.user_ids} and parent_users - {user} <= {str(u) for u in bundle.users.user_ids}
        raw = pd.read_parquet(run / "raw" / "interactions.parquet")  # what the update trained on
        assert len(raw) and user not in set(raw["user_id"].astype(str))
        service.reload(run / "bundle")
        service.ingest(user, "i9")  # back later: a new user, from nothing
        assert service.user_state(user)["history"] == ["i9"]
    finally:
        service.close()
