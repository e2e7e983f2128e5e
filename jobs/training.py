"""Training one stage (pretrain or finetune): the same Lightning fit in one process
(``launcher=local``) or in every Ray Train worker (``launcher=ray``, see jobs/ray_training.py)."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint

from datamodules.sequence_datamodule import SequenceDataModule
from jobs.assembly import build_datamodule, build_model, build_module, build_trainer, finish_wandb
from jobs.config_schema import JobConfig, validate
from jobs.tracking import log_job_result
from jobs.run_folder import MODEL_CKPT, create_run_folder, resolve_model_checkpoint, run_log_file, write_metrics
from lightning_modules.retrieval_module import RetrievalModule

log = logging.getLogger(__name__)

CKPT_FORMAT = "towerrec.two_tower/1"


# ---- the consolidated checkpoint -------------------------------------------------------------
def save_model_checkpoint(path: Path, model_state: dict[str, torch.Tensor], cfg: DictConfig, extra: dict | None = None) -> Path:
    """The consolidated single-file fp32 checkpoint later stages read (loads with weights_only=True)."""
    payload = {
        "format": CKPT_FORMAT,
        "state_dict": {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu() for k, v in model_state.items()},
        "config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "meta": extra or {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".ckpt.partial")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_model_checkpoint(path: Path) -> dict:
    """Read a consolidated checkpoint (weights_only=True) and check its format."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not a consolidated model checkpoint (format {CKPT_FORMAT})")
    return payload


def restore_config(plain: dict) -> DictConfig:
    """A config dict stored in a checkpoint, typed again by the schema."""
    return OmegaConf.merge(OmegaConf.structured(JobConfig), plain)


def model_state_from_lightning(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(TwoTowerModel state dict in fp32, epoch) from a Lightning checkpoint: a file, or a
    DeepSpeed ZeRO checkpoint folder whose shards are gathered into one fp32 state dict."""
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        states = sorted(path.glob("checkpoint/*model_states.pt"))  # ZeRO-2: mp_rank_00_..., ZeRO-3: zero_pp_rank_0_mp_rank_00_...
        client = torch.load(states[0], map_location="cpu", weights_only=False)
        epoch = int(client.get("epoch", -1))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state, epoch = ckpt["state_dict"], int(ckpt["epoch"])
    model_state = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith("model."):
            model_state[key[len("model.") :]] = value.float() if value.is_floating_point() else value
    if not model_state:
        raise ValueError(f"{path}: no 'model.' weights in this checkpoint")
    return model_state, epoch


# ---- building and fitting ------------------------------------------------------------------
def build_stage(cfg: DictConfig, stage: str) -> tuple[SequenceDataModule, RetrievalModule]:
    """Seeded datamodule and LightningModule of ``stage``; fine-tuning loads ``init_from``."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    if cfg.strategy.activation_checkpointing:
        model.user_tower.gpt.gradient_checkpointing_enable()
        if model.item_tower.encoder is not None and not model.item_tower.encoder_frozen:
            model.item_tower.encoder.gradient_checkpointing_enable()
    module = build_module(cfg, stage, model, dm)
    if stage == "finetune" and cfg.init_from:
        ckpt = resolve_model_checkpoint(cfg.init_from, cfg.paths.outputs_root, "pretrain", cfg.experiment_name)
        module.load_pretrained(load_model_checkpoint(ckpt)["state_dict"], str(ckpt))
    return dm, module


class FailAtStep(Callback):
    """Fault injection: kills this worker at a global step, once per run folder."""

    def __init__(self, step: int, rank: int, marker: Path):
        self.step, self.rank, self.marker = step, rank, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"killed rank {self.rank} at step {self.step}\n")
            log.warning("debug.fail_at_step: killing rank %d at step %d", self.rank, self.step)
            os._exit(17)


class LossRecorder(Callback):
    """Debugging: every rank appends (step, loss) to <run>/debug/losses-rank<r>.jsonl."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"losses-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


class ScoreRecorder(Callback):
    """Debugging: rank 0 saves the first validation batch of every epoch with the live model's
    scores, to <run>/debug/scores-epoch<e>.pt, so a reloaded checkpoint can be compared."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and trainer.global_rank == 0 and not trainer.sanity_checking:
            self.folder.mkdir(parents=True, exist_ok=True)
            saved = {k: batch[k].cpu() for k in ("users", "items", "mask")} | {"scores": outputs.detach().float().cpu()}
            torch.save(saved, self.folder / f"scores-epoch{trainer.current_epoch}.pt")


class EpochHistory(Callback):
    """Rank 0 appends one line per epoch to <run>/metrics_history.jsonl: the mean training loss
    and the validation metrics (what jobs.report plots)."""

    def __init__(self, path: Path):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs after the epoch's validation
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "train/loss": sum(self.losses) / max(1, len(self.losses))}
            row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.losses = []


def stage_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """The callbacks every fit gets: the epoch history, plus the debug ones configured."""
    callbacks: list[Callback] = [EpochHistory(run_dir / "metrics_history.jsonl")]
    if cfg.trainer.ema_decay is not None:
        from pytorch_lightning.callbacks import EMAWeightAveraging

        # swaps the average in for validation and puts it in every checkpoint's state_dict
        callbacks.append(EMAWeightAveraging(decay=cfg.trainer.ema_decay, use_buffers=False))
    if cfg.debug.fail_at_step is not None:
        callbacks.append(FailAtStep(cfg.debug.fail_at_step, cfg.debug.fail_rank, run_dir / "debug" / "fault_injected"))
    if cfg.debug.record_losses:
        callbacks.append(LossRecorder(run_dir / "debug"))
    if cfg.debug.record_scores:
        callbacks.append(ScoreRecorder(run_dir / "debug"))
    return callbacks


def best_val_metrics(history: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """Validation metrics of the epoch that scored best on ``monitor``."""
    if not history:
        raise RuntimeError("no validation epoch was recorded")
    return dict(max(history, key=lambda h: h.get(monitor, float("-inf"))))


def local_fit(cfg: DictConfig, stage: str, run_dir: Path) -> dict[str, float]:
    """Fit ``stage`` in this process (no Ray), keep the best epoch, write checkpoints/model.ckpt."""
    validate(cfg)
    dm, module = build_stage(cfg, stage)
    monitor = cfg.trainer.monitor
    checkpoint_cb = ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="best-{epoch:03d}", monitor=monitor, mode="max", save_top_k=1, save_last=True)
    callbacks = [checkpoint_cb, EarlyStopping(monitor=monitor, mode="max", patience=cfg.trainer.early_stopping_patience), *stage_callbacks(cfg, run_dir)]
    trainer = build_trainer(cfg, stage, run_dir, callbacks)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        finish_wandb()
    seconds = time.perf_counter() - start
    if not checkpoint_cb.best_model_path:
        raise RuntimeError(f"{stage}: no checkpoint was saved (did validation run? monitor '{monitor}')")
    state, best_epoch = model_state_from_lightning(checkpoint_cb.best_model_path)
    save_model_checkpoint(run_dir / MODEL_CKPT, state, cfg, {"stage": stage, "best_epoch": best_epoch, "source": checkpoint_cb.best_model_path})
    metrics = best_val_metrics(module.val_history, monitor)
    metrics.update({"train/seconds": seconds, "train/best_epoch": float(best_epoch), "train/epochs": float(trainer.current_epoch)})
    log.info("%s: best %s = %.4f at epoch %d (%.0f s)", stage, monitor, metrics.get(monitor, float("nan")), best_epoch, seconds)
    return metrics


def run_stage_job(cfg: DictConfig, stage: str) -> dict[str, float]:
    """A training job end to end: run folder, log file, training (local or Ray), metrics.json."""
    validate(cfg)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        log.info("%s: run folder %s", stage, run_dir)
        log.info("resolved config:\n%s", OmegaConf.to_yaml(cfg, resolve=True))
        launcher = cfg.launcher.value if hasattr(cfg.launcher, "value") else cfg.launcher
        if launcher == "local":
            metrics = local_fit(cfg, stage, run_dir)
        else:
            from jobs.ray_training import ray_fit

            metrics = ray_fit(cfg, stage, run_dir)
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"model": run_dir / MODEL_CKPT})
    return metrics
