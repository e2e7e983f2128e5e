"""Ray Train launch of a training stage: TorchTrainer over ``hardware.num_workers`` workers, each
running the same Lightning fit; checkpoints reported every epoch (best k kept by the monitor),
dead workers restarted from the latest checkpoint, the best one written as the model bundle."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jobs.runtime.config.ray_cluster import ray_session, shared_folders, train_needs

# Torch, Lightning and the models are imported where they are used: a sweep's Tune trial and the
# Train controller it starts load this module for torch_trainer alone (importing them takes
# seconds of CPU in every such process).

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict) -> None:
    """What every Ray Train worker runs. Plain and importable: ``config`` holds the resolved
    job config (plain containers), the stage and the run folder."""
    import ray.train
    from pytorch_lightning.callbacks import EarlyStopping
    from ray.train.lightning import RayLightningEnvironment, prepare_trainer

    from jobs.runtime.config.assembly import build_trainer, finish_wandb, precision_of
    from jobs.runtime.training.callbacks import EpochReport, ShardReport, stage_callbacks
    from jobs.runtime.training.checkpoints import restore_config
    from jobs.runtime.training.local_fit import build_stage
    from jobs.runtime.training.ray_strategies import build_strategy

    cfg = restore_config(config["cfg"])
    stage, run_dir = config["stage"], Path(config["run_dir"])
    if "trial" in config:  # a Tune trial: its sampled values, its own folder and wandb run
        trial = config["trial"]
        cfg = apply_overrides(cfg, config["overrides"])
        run_dir = run_dir / "trials" / trial
        cfg.paths.output_dir = str(run_dir)
        cfg.logger.wandb.enabled = False  # the sweep's driver logs each trial to wandb (jobs/runtime/stages/sweep.py)
        cfg.run_name = trial
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    dm, module = build_stage(cfg, stage)
    deepspeed = (cfg.strategy.name.value if hasattr(cfg.strategy.name, "value") else cfg.strategy.name) == "deepspeed"
    callbacks = [
        EpochReport(),
        EarlyStopping(monitor=cfg.trainer.monitor, mode="max", patience=cfg.trainer.early_stopping_patience),
        *stage_callbacks(cfg, run_dir),
        *([ShardReport(run_dir / "shards")] if dm.sharded else []),
    ]
    trainer = build_trainer(
        cfg,
        stage,
        run_dir,
        callbacks,
        devices="auto",
        num_nodes=1,  # Ray places the workers; each worker is one Lightning process
        strategy=build_strategy(cfg, precision_of(cfg)),
        plugins=[RayLightningEnvironment()],
        enable_checkpointing=False,
        use_distributed_sampler=not dm.sharded,  # sharded: each rank's loaders hold its own users already
        gradient_clip_val=None if deepspeed else cfg.trainer.gradient_clip_val,
    )
    trainer = prepare_trainer(trainer)
    resume = ray.train.get_checkpoint()
    try:
        if resume is None:
            trainer.fit(module, datamodule=dm)
            return
        with resume.as_directory() as folder:
            ckpt_path = Path(folder) / EpochReport.CHECKPOINT_NAME
            log.info("resuming %s from %s", stage, ckpt_path)
            trainer.fit(module, datamodule=dm, ckpt_path=str(ckpt_path))
    finally:
        finish_wandb()


def apply_overrides(cfg: DictConfig, overrides: dict) -> DictConfig:
    """A copy of ``cfg`` with dotted keys set (type-checked by the schema) and validated."""
    from jobs.runtime.config.schema import validate

    cfg = cfg.copy()
    for key, value in overrides.items():
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise KeyError(f"sweep.params: '{key}' is not a config key")
        OmegaConf.update(cfg, key, value.item() if hasattr(value, "item") else value, merge=False)
    validate(cfg)
    return cfg


def consolidate(checkpoint, run_dir: Path, cfg: DictConfig, stage: str, metrics: dict[str, float], lineage: dict) -> int:
    """Write a reported Ray checkpoint as the stage's model bundle (built here, on the driver,
    from a catalog view: the users are read and written piece by piece, so the driver's memory
    does not grow with them); returns the checkpoint's epoch."""
    from jobs.runtime.config.assembly import build_catalog_view, build_model
    from jobs.runtime.training.bundle_export import export_bundle
    from jobs.runtime.training.callbacks import EpochReport
    from jobs.runtime.training.checkpoints import model_state_from_lightning

    with checkpoint.as_directory() as folder:
        state, epoch = model_state_from_lightning(Path(folder) / EpochReport.CHECKPOINT_NAME)
    dm = build_catalog_view(cfg)
    model = build_model(cfg, dm)
    export_bundle(
        run_dir, cfg, dm, model, state, stage, metrics | {"train/best_epoch": float(epoch)}, lineage | {"best_epoch": epoch, "source": checkpoint.path}
    )
    return epoch


def run_name_of(cfg: DictConfig, run_dir: Path) -> str:
    return cfg.run_name or f"{cfg.experiment_name}-{cfg.job}-{run_dir.parent.name}-{run_dir.name}"


def torch_trainer(cfg: DictConfig, stage: str, run_dir: Path, name: str, storage: str, extra: dict | None = None, callbacks: list | None = None):
    """The TorchTrainer of one stage: scaling from ``cfg.hardware``, best-k checkpoints by the
    monitor, restarts of dead workers. ``extra`` goes into the workers' config and ``callbacks``
    into the run's (a Tune trial's values and name, and its report to Tune)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    hw = cfg.hardware
    # the resources the placement check counted; Ray sets each worker's torch threads to its CPUs
    scaling = ScalingConfig(num_workers=hw.num_workers, use_gpu=hw.accelerator == "gpu", resources_per_worker=train_needs(cfg).per_bundle())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "stage": stage, "run_dir": str(run_dir), **(extra or {})},
        scaling_config=scaling,
        run_config=run_config(cfg, name, storage, callbacks),
    )


def sweep_trial(config: dict, cfg: DictConfig, stage: str, run_dir: str, train_storage: str) -> None:
    """One trial, run by Tune in an actor of its own: a Ray Train run of ``stage`` with the
    trial's sampled values (``config["overrides"]``), named after the trial, so that a resumed
    sweep resumes it from its latest checkpoint; every report of its workers goes on to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial = tune.get_context().get_trial_name()
    extra = {"overrides": config["overrides"], "trial": trial}
    torch_trainer(cfg, stage, Path(run_dir), trial, train_storage, extra=extra, callbacks=[TuneReportCallback()]).fit()


def run_config(cfg: DictConfig, name: str, storage: str, callbacks: list | None = None):
    """A Ray Train run named ``name`` under ``storage``; started again with the same name it
    resumes from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        name=name,
        callbacks=callbacks or None,
        storage_path=storage,
        checkpoint_config=CheckpointConfig(
            num_to_keep=cfg.trainer.keep_checkpoints, checkpoint_score_attribute=cfg.trainer.monitor, checkpoint_score_order="max"
        ),
        failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
    )


def storage_of(cfg: DictConfig) -> str:
    return cfg.cluster.storage_path or str(Path(cfg.paths.outputs_root).resolve() / "ray")


def ray_fit(cfg: DictConfig, stage: str, run_dir: Path) -> dict[str, float]:
    """Launch ``stage`` on Ray Train and write the best epoch's consolidated checkpoint."""
    hw, monitor = cfg.hardware, cfg.trainer.monitor
    storage, name = storage_of(cfg), run_name_of(cfg, run_dir)
    trainer = torch_trainer(cfg, stage, run_dir, name, storage)
    log.info("ray: %s with %d worker(s), strategy %s; checkpoints in %s/%s", stage, hw.num_workers, cfg.strategy.name, storage, name)
    start = time.perf_counter()
    with ray_session(cfg, train_needs(cfg), shared_folders(cfg, storage)):
        result = trainer.fit()
    seconds = time.perf_counter() - start
    if result.error:
        raise RuntimeError(f"{stage}: Ray Train run {name} failed") from result.error
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if monitor in m]
    if not ranked:
        raise RuntimeError(f"{stage}: Ray Train run {name} reported no checkpoint with '{monitor}'")
    checkpoint, reported = max(ranked, key=lambda cm: cm[1][monitor])
    metrics = {k: float(v) for k, v in reported.items() if k.startswith("val/")}
    metrics.update({"train/seconds": seconds, "train/epochs": float(result.metrics.get("epoch", reported.get("epoch", 0))) + 1})
    lineage = {"ray_run": name, "init_from": cfg.init_from if stage == "finetune" else None}
    best_epoch = consolidate(checkpoint, run_dir, cfg, stage, metrics, lineage)
    metrics["train/best_epoch"] = float(best_epoch)
    log.info("%s: best %s = %.4f at epoch %d (%.0f s)", stage, monitor, metrics[monitor], best_epoch, seconds)
    return metrics
