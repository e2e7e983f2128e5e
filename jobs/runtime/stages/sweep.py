"""Sweeps: a Ray Tune search over config keys, every trial a full
(distributed) training stage with its own Ray Train workers, an ASHA scheduler stopping weak
trials on the validation metric reported each epoch.

Pattern: ``Tuner(TorchTrainer)`` on Ray Train v1 (``RAY_TRAIN_V2_ENABLED=0``, set below before
Ray is imported). On Ray 2.60 a Tune trial that launches a Train v2 ``TorchTrainer`` left its
placement group behind when ASHA stopped it, and the next trial's workers never started; with
this pattern a stopped trial frees its resources (tests/integration/test_sweep.py checks it).

Writes into the sweep's run folder: ``trials.parquet`` (one row per trial: sampled values,
best metric, status, epochs, seconds), ``best_config.yaml``, ``experiment/<name>.yaml`` (the
best trial as a Hydra experiment that jobs.pipeline runs), ``trials/<trial>/`` (each trial's
config, TensorBoard and wandb runs), ``metrics.json``.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")

import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from jobs.runtime.config.ray_cluster import cpus_per_worker, ray_session, shared_folders, train_needs  # noqa: E402
from jobs.runtime.config.run_folder import create_run_folder, run_log_file, write_metrics  # noqa: E402
from jobs.runtime.config.schema import validate  # noqa: E402
from jobs.runtime.tracking.console import say  # noqa: E402
from jobs.runtime.tracking.wandb_runs import log_job_result, trial_tracker  # noqa: E402
from jobs.runtime.training.ray_fit import run_config, storage_of, torch_trainer  # noqa: E402

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[3] / "conf"


def search_space(params: dict[str, Any]) -> dict[str, Any]:
    """Tune domains for ``sweep.params`` (config key -> {type, values | lower, upper}), already
    checked by the config schema (``validate``)."""
    from ray import tune

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


def best_of_trial(result, metric: str, mode: str) -> float:
    df = result.metrics_dataframe
    if df is None or metric not in df:
        return math.nan
    values = df[metric].dropna()
    return float(values.max() if mode == "max" else values.min()) if len(values) else math.nan


def trials_table(results, cfg: DictConfig) -> pd.DataFrame:
    """One row per trial: its sampled values, best and last metric, status, epochs and seconds."""
    s, stage = cfg.sweep, cfg.sweep.stage
    rows = []
    for r in results:
        overrides = (r.config or {}).get("train_loop_config", {}).get("overrides", {})
        metrics = r.metrics or {}
        epochs = int(metrics.get("training_iteration", 0))
        status = "ERROR" if r.error else ("STOPPED_EARLY" if epochs < cfg[stage].max_epochs else "COMPLETED")
        row = {"trial": Path(r.path).name if r.path else "", "status": status, "epochs": epochs}
        row |= {k: (v.item() if hasattr(v, "item") else v) for k, v in overrides.items()}
        row |= {f"best_{s.metric}": best_of_trial(r, s.metric, s.mode), f"last_{s.metric}": float(metrics.get(s.metric, math.nan))}
        row["seconds"] = float(metrics.get("time_total_s", math.nan))
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


def leftover_placement_groups() -> int:
    """Placement groups still held once every trial ended (stopped trials must free theirs)."""
    import ray

    left = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    if left:
        log.warning("sweep: %d placement group(s) still held after the sweep: %s", len(left), [pg["placement_group_id"] for pg in left])
    return len(left)


def run_sweep(cfg: DictConfig) -> dict[str, float]:
    """``jobs.sweep``: run the search, tabulate the trials, export the best as an experiment."""
    from ray import tune
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
    metrics: dict[str, float] = {}
    with run_log_file(run_dir), ray_session(cfg, train_needs(cfg), shared_folders(cfg, storage)):
        trainer = torch_trainer(cfg, s.stage, run_dir, name, storage, extra={"group": name})
        scheduler = None
        if s.scheduler.enabled:
            scheduler = ASHAScheduler(
                time_attr="training_iteration",
                max_t=cfg[s.stage].max_epochs,
                grace_period=s.scheduler.grace_period,
                reduction_factor=s.scheduler.reduction_factor,
            )
        searcher = None
        if (s.searcher.value if hasattr(s.searcher, "value") else s.searcher) == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch()
        path = str(Path(storage) / name)
        if s.resume and tune.Tuner.can_restore(path):
            say("sweep: resuming %s", path)
            tuner = tune.Tuner.restore(path, trainable=trainer, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainer,
                param_space={"train_loop_config": {"overrides": space}},
                tune_config=tune.TuneConfig(
                    metric=s.metric,
                    mode=s.mode,
                    num_samples=s.num_samples,
                    scheduler=scheduler,
                    search_alg=searcher,
                    max_concurrent_trials=concurrency(cfg),
                ),
                run_config=run_config(cfg, name, storage, callbacks=[t for t in [trial_tracker(cfg, name, run_dir)] if t]),
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
        print(table.to_string(index=False))
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
