"""Job results to Weights & Biases: the final metrics table and artefacts by reference.

Training curves, the config and system metrics are logged during training by Lightning's
WandbLogger (rank zero); this adds, once a job ends, a run of ``job_type=<job>`` in the same
group with the final metrics as a table and the checkpoint / recommendation files as
reference artefacts (nothing is uploaded but their paths and checksums). Offline by default.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def wandb_mode(cfg: DictConfig) -> str | None:
    """'offline' / 'online', or None when wandb is off (config or WANDB_MODE=disabled)."""
    mode = os.environ.get("WANDB_MODE", cfg.logger.wandb.mode)
    return None if not cfg.logger.wandb.enabled or mode == "disabled" else mode


def log_job_result(cfg: DictConfig, run_dir: Path, metrics: dict[str, float], artifacts: dict[str, Path] | None = None) -> None:
    """Log the final metrics table and reference artefacts of a finished job."""
    mode = wandb_mode(cfg)
    if mode is None:
        return
    import wandb

    w = cfg.logger.wandb
    run = wandb.init(
        dir=str(run_dir),
        project=w.project,
        entity=w.entity,
        group=w.group or cfg.experiment_name,
        job_type=cfg.job,
        name=f"{cfg.experiment_name}-{cfg.job}-{run_dir.parent.name}-{run_dir.name}",
        tags=list(w.tags),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        mode=mode,
        reinit="create_new",
    )
    try:
        run.log({"final_metrics": wandb.Table(columns=["metric", "value"], data=[[k, float(v)] for k, v in sorted(metrics.items())])})
        run.summary.update({k: float(v) for k, v in metrics.items()})
        for name, path in (artifacts or {}).items():
            if Path(path).exists():
                artifact = wandb.Artifact(name=f"{cfg.experiment_name}-{cfg.job}-{name}".replace("/", "-"), type=name)
                artifact.add_reference(Path(path).resolve().as_uri())
                run.log_artifact(artifact)
    finally:
        run.finish()


def trial_tracker(cfg: DictConfig, group: str, run_root: Path):
    """A Ray Tune callback logging every trial to its own wandb run from the driver process:
    the trial's sampled values and full config, and each epoch's report. The driver outlives
    the trials, so a trial that ASHA stops still has its run written completely."""
    mode = wandb_mode(cfg)
    if mode is None:
        return None
    import wandb
    from ray import tune

    w = cfg.logger.wandb
    base = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)

    class WandbTrialRuns(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, object] = {}

        def _run(self, trial):
            if trial.trial_id not in self.runs:
                overrides = trial.config.get("overrides", {})
                folder = run_root / "trials" / str(trial)
                folder.mkdir(parents=True, exist_ok=True)
                self.runs[trial.trial_id] = wandb.init(
                    dir=str(folder),
                    project=w.project,
                    entity=w.entity,
                    group=group,
                    job_type="trial",
                    name=str(trial),
                    tags=list(w.tags),
                    config=base | {"trial": overrides},
                    mode=mode,
                    reinit="create_new",
                )
            return self.runs[trial.trial_id]

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._run(trial).log(metrics, step=int(result.get("training_iteration", 0)))

        def _end(self, trial, state: str) -> None:
            run = self.runs.pop(trial.trial_id, None) or self._run(trial)
            run.summary["trial_state"] = state
            run.finish(exit_code=0 if state != "error" else 1)
            self.runs.pop(trial.trial_id, None)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._end(trial, "complete")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._end(trial, "error")

    return WandbTrialRuns()
