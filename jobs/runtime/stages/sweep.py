"""Sweeps: a Ray Tune search over config keys, every trial a full (distributed) training stage
with its own Ray Train workers, an ASHA scheduler stopping weak trials on the validation metric
reported each epoch.

Pattern (Ray Train v2): every trial is a Tune function (``ray_fit.sweep_trial``) that runs a
``TorchTrainer`` of its own, with Tune's ``TuneReportCallback`` passing each epoch's report on to
Tune. The trial's function holds no core (the Train workers hold them); ``max_concurrent_trials``
bounds the Train runs in flight. When ASHA stops a trial Tune ends its actor, and with it the Train
controller; Ray Train's placement-group cleaner then frees the workers, which needs Ray's state
API (``ray_session(state_api=True)``).

Writes into the sweep's run folder: ``trials.parquet`` (one row per trial: sampled values,
best metric, status, epochs, seconds, when it started and last reported), ``best_config.yaml``,
``experiment/<name>.yaml`` (the best trial as a Hydra experiment that jobs.pipeline runs),
``trials/<trial>/`` (each trial's config, TensorBoard and wandb runs), ``optuna.journal`` (the
Optuna study, with ``sweep.searcher=optuna``), ``metrics.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import DictConfig, OmegaConf
from ray import tune

from jobs.runtime.config.ray_cluster import cpus_per_worker, ray_session, shared_folders, train_needs
from jobs.runtime.config.run_folder import create_run_folder, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.tracking.console import say
from jobs.runtime.tracking.wandb_runs import log_job_result, trial_tracker
from jobs.runtime.training.ray_fit import storage_of, sweep_trial

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[3] / "conf"
# What a trial's function asks of the cluster: a sliver of the head node's own resource (one per
# cluster), so the trials' functions run beside the driver and hold no core the workers need.
TRIAL_RESOURCES = {"node:__internal_head__": 0.001}
# Keys TrialRecord adds to every result Tune gets from a trial.
STOPPED_BY_SCHEDULER, STARTED_AT, REPORTED_AT = "stopped_by_scheduler", "trial_started_at", "reported_at"


def search_space(params: dict[str, Any]) -> dict[str, Any]:
    """Tune domains for ``sweep.params`` (config key -> {type, values | lower, upper}), already
    checked by the config schema (``validate``)."""
    space: dict[str, Any] = {}
    for key, spec in params.items():
        kind = spec["type"]
        if kind == "choice":
            space[key] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            space[key] = tune.grid_search(list(spec["values"]))
        else:  # uniform, loguniform, randint
            space[key] = getattr(tune, kind)(spec["lower"], spec["upper"])
    return space


def concurrency(cfg: DictConfig) -> int:
    """Trials that fit at once: the configured bound, else the cluster's CPUs (or GPUs) over a trial's need."""
    import ray

    if cfg.sweep.max_concurrent_trials:
        return int(cfg.sweep.max_concurrent_trials)
    hw, total = cfg.hardware, ray.cluster_resources()
    if hw.accelerator == "gpu":
        return max(1, int(total.get("GPU", 0) // (hw.num_workers * (hw.gpus_per_worker or 1))))
    return max(1, int(total.get("CPU", 1) // (hw.num_workers * cpus_per_worker(cfg))))


class TrialRecord(tune.Callback):
    """Stamps every result Tune gets from a trial with when the trial started, when the result
    came, and whether Tune stopped the trial on it. Tune marks the result on which it stops a
    trial ``done``; here only ASHA stops trials (there are no stop criteria), and a Train run that
    ends by itself sends no such result. Tune keeps the last result in the trial's state, so a
    resumed sweep keeps the record."""

    def __init__(self) -> None:
        self.started: dict[str, float] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.started[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        result[STARTED_AT] = self.started.get(trial.trial_id, math.nan)
        result[REPORTED_AT] = time.time()
        result[STOPPED_BY_SCHEDULER] = bool(result.get("done"))


def best_of_trial(result, metric: str, mode: str) -> float:
    df = result.metrics_dataframe
    if df is None or metric not in df:
        return math.nan
    values = df[metric].dropna()
    return float(values.max() if mode == "max" else values.min()) if len(values) else math.nan


def trials_table(results, cfg: DictConfig) -> pd.DataFrame:
    """One row per trial: its sampled values, best and last metric, status, epochs, seconds, and
    when it started and last reported (seconds since the epoch). STOPPED_EARLY: ASHA stopped it
    with epochs left (ASHA also has a rung at max_t when max_t is grace_period times a power of
    reduction_factor; a trial it stops there has run them all)."""
    s = cfg.sweep
    max_epochs = cfg[s.stage].max_epochs
    rows = []
    for r in results:
        overrides = (r.config or {}).get("overrides", {})
        metrics = r.metrics or {}
        epochs = int(metrics.get("epochs_completed", 0))
        status = "ERROR" if r.error else ("STOPPED_EARLY" if metrics.get(STOPPED_BY_SCHEDULER) and epochs < max_epochs else "COMPLETED")
        row = {"trial": Path(r.path).name if r.path else "", "status": status, "epochs": epochs}
        row |= {k: (v.item() if hasattr(v, "item") else v) for k, v in overrides.items()}
        row |= {f"best_{s.metric}": best_of_trial(r, s.metric, s.mode), f"last_{s.metric}": float(metrics.get(s.metric, math.nan))}
        row["seconds"] = float(metrics.get("time_total_s", math.nan))
        row["started_at"], row["last_report_at"] = float(metrics.get(STARTED_AT, math.nan)), float(metrics.get(REPORTED_AT, math.nan))
        rows.append(row)
    return pd.DataFrame(rows)


def best_experiment(cfg: DictConfig, overrides: dict[str, Any], name: str, note: str) -> str:
    """The base experiment file with the best trial's values set: a Hydra experiment."""
    base = CONF / "experiment" / f"{cfg.experiment_name}.yaml"
    doc = yaml.safe_load(base.read_text()) if base.is_file() else {}
    doc = doc or {}
    defaults = doc.pop("defaults", None)
    body = OmegaConf.create(doc)
    for key, value in overrides.items():
        OmegaConf.update(body, key, value.item() if hasattr(value, "item") else value, force_add=True)
    body.experiment_name = name
    out = {"defaults": defaults} if defaults else {}
    out |= OmegaConf.to_container(body)
    return f"# @package _global_\n# {note}\n" + yaml.safe_dump(out, sort_keys=False)


def leftover_placement_groups(wait_s: float = 60.0) -> int:
    """Placement groups still held once every trial ended. A stopped trial's are removed by Ray
    Train's cleaner, which checks every second whether the trial's controller is still alive; this
    waits up to ``wait_s`` for them to go."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        left = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        log.warning("sweep: %d placement group(s) still held after the sweep: %s", len(left), [pg["placement_group_id"] for pg in left])
    return len(left)


def optuna_searcher(run_dir: Path, study_name: str):
    """Optuna's TPE sampler, its study kept in ``<run>/optuna.journal`` (every value it chose, and the result)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(storage=JournalStorage(JournalFileBackend(str(run_dir / "optuna.journal"))), study_name=study_name)


def run_sweep(cfg: DictConfig) -> dict[str, float]:
    """``jobs.sweep``: run the search, tabulate the trials, export the best as an experiment."""
    from ray.tune.schedulers import ASHAScheduler

    validate(cfg)
    s = cfg.sweep
    params = OmegaConf.to_container(s.params, resolve=True)
    space = search_space(params)
    if s.metric != cfg.trainer.monitor:
        log.warning("sweep.metric %s differs from trainer.monitor %s (which picks each trial's checkpoints)", s.metric, cfg.trainer.monitor)
    run_dir = create_run_folder(cfg)
    name = cfg.run_name or f"sweep-{s.name}-{run_dir.parent.name}-{run_dir.name}"
    storage = storage_of(cfg)
    path = str(Path(storage) / name)
    metrics: dict[str, float] = {}
    with run_log_file(run_dir), ray_session(cfg, train_needs(cfg), shared_folders(cfg, storage), state_api=True):
        # every trial's Train run under the sweep's Tune folder, named after its trial
        trial_fn = tune.with_parameters(sweep_trial, cfg=cfg, stage=s.stage, run_dir=str(run_dir), train_storage=str(Path(path) / "train"))
        trainable = tune.with_resources(trial_fn, TRIAL_RESOURCES)
        if s.resume and tune.Tuner.can_restore(path):
            say("sweep: resuming %s", path)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
        else:
            scheduler = None
            if s.scheduler.enabled:
                scheduler = ASHAScheduler(
                    time_attr="epochs_completed",
                    max_t=cfg[s.stage].max_epochs,
                    grace_period=s.scheduler.grace_period,
                    reduction_factor=s.scheduler.reduction_factor,
                    stop_last_trials=False,  # no STOP for every trial at max_t: its Train run ends by itself
                )
            searcher = optuna_searcher(run_dir, name) if (s.searcher.value if hasattr(s.searcher, "value") else s.searcher) == "optuna" else None
            tracker = trial_tracker(cfg, name, run_dir)
            tuner = tune.Tuner(
                trainable,
                param_space={"overrides": space},
                tune_config=tune.TuneConfig(
                    metric=s.metric,
                    mode=s.mode,
                    num_samples=s.num_samples,
                    scheduler=scheduler,
                    search_alg=searcher,
                    max_concurrent_trials=concurrency(cfg),
                ),
                run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[TrialRecord(), *([tracker] if tracker else [])]),
            )
        say("sweep %s: %d sample(s) of %s, stage %s; results in %s, logs in %s", s.name, s.num_samples, list(params), s.stage, path, run_dir / "run.log")
        start = time.perf_counter()
        results = tuner.fit()
        seconds = time.perf_counter() - start
        left = leftover_placement_groups()
    table = trials_table(results, cfg)
    table.to_parquet(run_dir / "trials.parquet", index=False)
    best_col = f"best_{s.metric}"
    ok = table.dropna(subset=[best_col])
    if ok.empty:
        raise RuntimeError(f"sweep {s.name}: no trial reported {s.metric}; see {run_dir / 'run.log'}")
    best_row = ok.loc[ok[best_col].idxmax() if s.mode == "max" else ok[best_col].idxmin()]
    best_overrides = {k: best_row[k] for k in params}
    exp_name = f"{cfg.experiment_name}_sweep_{s.name}_best"
    text = best_experiment(cfg, best_overrides, exp_name, f"best trial {best_row['trial']} of sweep {s.name}: {s.metric} = {best_row[best_col]:.4f}")
    (run_dir / "experiment").mkdir(exist_ok=True)
    (run_dir / "experiment" / f"{exp_name}.yaml").write_text(text)
    (run_dir / "best_config.yaml").write_text(yaml.safe_dump({k: (v.item() if hasattr(v, "item") else v) for k, v in best_overrides.items()}))
    if s.export_best_to_conf:
        (CONF / "experiment" / f"{exp_name}.yaml").write_text(text)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        clock = {c: pd.to_datetime(table[c], unit="s").dt.strftime("%H:%M:%S") for c in ("started_at", "last_report_at")}
        print(table.assign(**clock).to_string(index=False))
    print(
        f"\nbest: {best_row['trial']} {s.metric}={best_row[best_col]:.4f}\nrun it: python -m jobs.pipeline 'hydra.searchpath=[file://{run_dir}]' experiment={exp_name}"
    )
    metrics = {
        "sweep/trials": float(len(table)),
        "sweep/stopped_early": float((table["status"] == "STOPPED_EARLY").sum()),
        "sweep/errors": float((table["status"] == "ERROR").sum()),
        f"sweep/best/{s.metric}": float(best_row[best_col]),
        "sweep/seconds": seconds,
        "sweep/placement_groups_left": float(left),
    }
    write_metrics(run_dir, metrics)
    cfg.logger.wandb.group = name
    log_job_result(cfg, run_dir, metrics, {"trials": run_dir / "trials.parquet"})
    return metrics
