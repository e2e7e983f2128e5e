"""One training stage (pretrain or finetune) in this process (``launcher=local``), and the
seeded build of a stage that every Ray Train worker runs too (jobs/runtime/training/ray_fit.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from datamodules.sequence_datamodule import SequenceDataModule
from inference.bundle import read_weights
from jobs.runtime.config.assembly import build_datamodule, build_model, build_module, build_trainer, finish_wandb
from jobs.runtime.config.text_encodings import install_frozen_text
from jobs.runtime.training.bundle_export import export_bundle
from jobs.runtime.training.callbacks import stage_callbacks
from jobs.runtime.training.checkpoints import model_state_from_lightning
from lightning_modules.retrieval_module import RetrievalModule

log = logging.getLogger(__name__)


def build_stage(cfg: DictConfig, stage: str) -> tuple[SequenceDataModule, RetrievalModule]:
    """Seeded datamodule and LightningModule of ``stage``; fine-tuning starts from the weights
    of the bundle in ``init_from`` (already resolved to a bundle folder by the driver)."""
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    if cfg.strategy.activation_checkpointing:
        model.enable_activation_checkpointing()
    module = build_module(cfg, stage, model, dm)
    if stage == "finetune" and cfg.init_from:
        module.load_pretrained(read_weights(cfg.init_from), str(cfg.init_from))
    # a fully frozen encoder's catalog encodings: memory-mapped from the prepared data (made once)
    install_frozen_text(module.model.item_tower, dm.data_dir, cfg.model.item_tower.tokenizer, cfg.model.item_tower.max_text_tokens)
    return dm, module


def best_val_metrics(history: list[dict[str, float]], monitor: str) -> dict[str, float]:
    """Validation metrics of the epoch that scored best on ``monitor``."""
    if not history:
        raise RuntimeError("no validation epoch was recorded")
    return dict(max(history, key=lambda h: h.get(monitor, float("-inf"))))


def local_fit(cfg: DictConfig, stage: str, run_dir: Path) -> dict[str, float]:
    """Fit ``stage`` in this process (no Ray), keep the best epoch, write its model bundle."""
    dm, module = build_stage(cfg, stage)
    monitor = cfg.trainer.monitor
    checkpoint_cb = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), filename="best-{epoch:03d}", monitor=monitor, mode="max", save_top_k=1, save_last=True
    )
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
    metrics = best_val_metrics(module.val_history, monitor)
    metrics.update({"train/seconds": seconds, "train/best_epoch": float(best_epoch), "train/epochs": float(trainer.current_epoch)})
    lineage = {"best_epoch": best_epoch, "source": checkpoint_cb.best_model_path, "init_from": cfg.init_from if stage == "finetune" else None}
    export_bundle(run_dir, cfg, dm, module.model.cpu(), state, stage, metrics, lineage)
    log.info("%s: best %s = %.4f at epoch %d (%.0f s)", stage, monitor, metrics.get(monitor, float("nan")), best_epoch, seconds)
    return metrics
