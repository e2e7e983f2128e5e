"""A 4-trial ASHA sweep on 2 CPUs with real Ray Tune over Ray Train v2, offline wandb per trial,
the report, Hydra multirun and the TensorBoard dashboard."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import optuna
import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir

from jobs.runtime.tracking.report_page import write_report
from jobs.runtime.tracking.wandb_offline import logged
from tests.conftest import CONF, ROOT, TINY, compose_config

SWEEP = [
    "sweep=tiny",
    *TINY,
    "strategy=ddp",
    "logger=default",
    "finetune.max_epochs=3",
    "data.batch_size=8",
    "cluster.num_cpus=2",
    "hardware.cpus_per_worker=1",
    "init_from=null",
]


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory):
    """The sweep as a user runs it, in its own process."""
    root = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "WANDB_MODE": "offline", "TOWERREC_ROOT": str(root), "RAY_DASHBOARD_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", *SWEEP], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (root / "outputs" / "sweep").glob("*/*")
    cfg = compose_config("sweep", SWEEP, root)
    return cfg, run_dir, json.loads((run_dir / "metrics.json").read_text()), proc.stdout


def test_asha_stops_a_trial_and_the_next_ones_still_run(sweep_run):
    cfg, run_dir, metrics, stdout = sweep_run
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 4 and metrics["sweep/trials"] == 4
    assert (trials["status"] != "ERROR").all()
    # STOPPED_EARLY is Tune's record: the result on which ASHA stopped the trial, with epochs left
    stopped = trials[trials["status"] == "STOPPED_EARLY"]
    assert len(stopped) >= 1 and metrics["sweep/stopped_early"] == len(stopped)
    last_results = {t: tune_last_result(run_dir, t) for t in trials["trial"]}
    stopped_by_tune = {t for t, r in last_results.items() if r["stopped_by_scheduler"] and r["epochs_completed"] < cfg.finetune.max_epochs}
    assert stopped_by_tune == set(stopped["trial"])
    # a trial that started after the first stop got its workers and trained
    after = trials[trials["started_at"] > stopped["last_report_at"].min()]
    assert len(after) >= 1 and (after["epochs"] >= 1).all() and after["best_val/ndcg@10"].notna().all()
    assert {"finetune.lr", "model.user_tower.dropout", "best_val/ndcg@10", "seconds", "epochs", "started_at", "last_report_at"} <= set(trials.columns)
    assert metrics["sweep/placement_groups_left"] == 0  # stopped trials freed their resources
    assert "STOPPED_EARLY" in stdout and "run it: python -m jobs.pipeline" in stdout  # the printed table


def test_best_trial_becomes_an_experiment_the_pipeline_composes(sweep_run, tmp_path):
    cfg, run_dir, metrics, _ = sweep_run
    files = list((run_dir / "experiment").glob("*.yaml"))
    assert len(files) == 1
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    shutil.copy(files[0], conf / "experiment" / files[0].name)
    best = pd.read_parquet(run_dir / "trials.parquet").sort_values("best_val/ndcg@10").iloc[-1]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        composed = compose(config_name="pipeline", overrides=[f"experiment={files[0].stem}"])
    assert composed.finetune.lr == pytest.approx(best["finetune.lr"])
    assert composed.model.user_tower.dropout == pytest.approx(best["model.user_tower.dropout"])
    assert composed.data.name == "synthetic" and composed.model.scale == "tiny"


def test_every_trial_has_an_offline_wandb_run_with_its_metrics(sweep_run):
    cfg, run_dir, _, _ = sweep_run
    trial_dirs = sorted((run_dir / "trials").iterdir())
    assert len(trial_dirs) == 4
    for trial in trial_dirs:  # per-step scalars in TensorBoard, per-epoch history beside them
        assert list(trial.glob("tensorboard/events.out.tfevents.*")) and (trial / "metrics_history.jsonl").is_file()
    runs = sorted(run_dir.glob("trials/*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 4  # one wandb run per trial, grouped under the sweep
    for path in runs:
        keys = logged(path)
        assert {"val/ndcg@10", "train/loss", "training_iteration"} <= keys["history"]
        assert {"trial", "finetune", "model", "data"} <= keys["config"]
        assert "trial_state" in keys["summary"]


def test_report_renders_with_its_plots(sweep_run):
    _, run_dir, _, _ = sweep_run
    page = write_report(run_dir)
    text = page.read_text()
    for name in ("curves.png", "trials.png", "accuracy_vs_diversity.png"):
        assert (page.parent / name).stat().st_size > 1000
        assert f"src='{name}'" in text
    assert "STOPPED_EARLY" in text and "sweep/trials" in text


def test_hydra_multirun_over_a_small_grid(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOWERREC_ROOT": str(tmp_path)}
    args = [*TINY, "finetune.max_epochs=1", "init_from=null", "finetune.lr=1e-3,3e-3"]
    proc = subprocess.run([sys.executable, "-m", "jobs.finetune", "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "multirun" / "finetune").glob("*/*/*/metrics.json"))
    assert len(runs) == 2
    lrs = sorted(yaml.safe_load((run.parent / "config.yaml").read_text())["finetune"]["lr"] for run in runs)
    assert lrs == pytest.approx([1e-3, 3e-3])  # one run per value of the grid


def tune_last_result(run_dir, trial: str) -> dict:
    """The last result Tune wrote into a trial's folder (``result.json``, one JSON line per result)."""
    (folder,) = (run_dir.parents[3] / "outputs" / "ray").glob(f"*/{trial}")
    return json.loads((folder / "result.json").read_text().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_serves_tensorboard_on_loopback(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.dashboard", "--logdir", str(tmp_path), "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status is None:
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).status
            except OSError:
                time.sleep(0.5)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.xdist_group("sweep-resume")  # its own sweep: may run beside the others (tests/conftest.py)
def test_a_sweep_whose_driver_died_resumes_under_the_same_name(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOWERREC_ROOT": str(tmp_path), "RAY_DASHBOARD_ENABLED": "0"}
    # 2 trials (the lr grid, one dropout sample), killed once the first has started
    args = [sys.executable, "-m", "jobs.sweep", *SWEEP, "logger=none", "run_name=resume-me", "sweep.num_samples=1"]
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "outputs" / "ray" / "resume-me"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(list(trials.glob("sweep_trial_*"))) < 1 and first.poll() is None:
            time.sleep(0.5)
        assert first.poll() is None, "the sweep ended before it could be interrupted"
        started = {p.name for p in trials.glob("sweep_trial_*")}
    finally:
        os.killpg(first.pid, 9)  # the driver dies, and its Ray with it
        first.wait(timeout=60)
    second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "sweep: resuming" in second.stdout + second.stderr
    (table,) = (tmp_path / "outputs" / "sweep").glob("*/*/trials.parquet")
    resumed = pd.read_parquet(table)
    assert len(resumed) == 2 and (resumed["status"] != "ERROR").all() and (resumed["epochs"] >= 1).all()
    assert started and started <= set(resumed["trial"])  # the trials started before the kill were carried on, not drawn again


@pytest.mark.xdist_group("sweep-optuna")
def test_optuna_searcher_runs_a_sweep(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOWERREC_ROOT": str(tmp_path), "RAY_DASHBOARD_ENABLED": "0"}
    args = ["sweep=tiny_optuna", *SWEEP[1:], "logger=none", "finetune.max_epochs=2"]
    proc = subprocess.run([sys.executable, "-m", "jobs.sweep", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (table,) = (tmp_path / "outputs" / "sweep").glob("*/*/trials.parquet")
    trials = pd.read_parquet(table)
    assert len(trials) == 3 and (trials["status"] != "ERROR").all()
    assert trials["finetune.lr"].between(1e-4, 1e-2).all() and set(trials["finetune.loss.num_negatives"]) <= {16, 64}
    # Optuna's own study (kept by the sweep) holds the 3 trials, with the very values the trials ran
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(table.parent / "optuna.journal")))
    (study_name,) = optuna.get_all_study_names(storage)
    chosen = optuna.load_study(study_name=study_name, storage=storage).trials
    assert len(chosen) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in chosen)
    asked = sorted((t.params["overrides/finetune.lr"], t.params["overrides/finetune.loss.num_negatives"]) for t in chosen)
    ran = sorted(zip(trials["finetune.lr"], trials["finetune.loss.num_negatives"]))
    assert [lr for lr, _ in asked] == pytest.approx([lr for lr, _ in ran]) and [n for _, n in asked] == [n for _, n in ran]
