"""A training job end to end: checks, references to other runs resolved, run folder, log file,
the fit (in this process or on Ray Train), metrics.json and the model bundle."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from jobs.runtime.config.run_folder import BUNDLE_DIR, create_run_folder, resolve_bundle, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.tracking.console import StageProgress, say
from jobs.runtime.tracking.wandb_runs import log_job_result

log = logging.getLogger(__name__)


def resolve_init_from(cfg: DictConfig, stage: str) -> str | None:
    """Turn ``init_from`` into a bundle folder here on the driver, so a missing pretraining run
    fails in a second instead of inside a Ray worker; returns what it was given."""
    given = cfg.init_from
    if stage == "finetune" and given:
        cfg.init_from = str(resolve_bundle(given, cfg.paths.outputs_root, "pretrain", cfg.experiment_name, key="init_from").resolve())
    return given


def run_stage_job(cfg: DictConfig, stage: str) -> dict[str, float]:
    """Train ``stage`` ('pretrain' or 'finetune') as configured; returns the best epoch's metrics."""
    validate(cfg)
    given = resolve_init_from(cfg, stage)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        log.info("%s: run folder %s", stage, run_dir)
        if stage == "finetune" and given:
            say("finetune: starting from %s%s", cfg.init_from, " (the latest pretrain run)" if given == "latest" else "")
        log.debug("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        launcher = cfg.launcher.value if hasattr(cfg.launcher, "value") else cfg.launcher
        where = (
            "in this process"
            if launcher == "local"
            else f"on Ray Train ({cfg.hardware.num_workers} worker(s), {cfg.strategy.name.value if hasattr(cfg.strategy.name, 'value') else cfg.strategy.name})"
        )
        if launcher != "local":  # once, here, rather than by every worker at once
            from jobs.runtime.config.assembly import prepare_data
            from jobs.runtime.config.text_encodings import frozen_text_once

            frozen_text_once(cfg, stage, prepare_data(cfg).folder)
        say("%s: training %s; logs in %s", stage, where, run_dir / "run.log")
        monitor = cfg.trainer.monitor
        with StageProgress(run_dir, stage, cfg[stage].max_epochs, monitor, cfg.trainer.enable_progress_bar):
            if launcher == "local":
                from jobs.runtime.training.local_fit import local_fit

                metrics = local_fit(cfg, stage, run_dir)
            else:
                from jobs.runtime.training.ray_fit import ray_fit

                metrics = ray_fit(cfg, stage, run_dir)
        say(
            "%s: best %s %.4f at epoch %d of %d (%.0f s)",
            stage,
            monitor,
            metrics.get(monitor, float("nan")),
            metrics["train/best_epoch"],
            metrics["train/epochs"],
            metrics["train/seconds"],
        )
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"model": run_dir / BUNDLE_DIR})
    return metrics
