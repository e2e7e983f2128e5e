"""One training stage (pretrain or finetune) in one process: the function a launcher runs."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from jobs.assembly import build_datamodule, build_model, build_module, build_trainer
from jobs.config_schema import JobConfig, validate
from jobs.run_folder import MODEL_CKPT, resolve_model_checkpoint
from lightning_modules.two_tower_model import TwoTowerModel

log = logging.getLogger(__name__)

CKPT_FORMAT = "towerrec.two_tower/1"


def save_model_checkpoint(path: Path, model: TwoTowerModel, cfg: DictConfig, extra: dict | None = None) -> Path:
    """The consolidated single-file fp32 checkpoint later stages read (loads with weights_only=True)."""
    payload = {
        "format": CKPT_FORMAT,
        "state_dict": {k: v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu() for k, v in model.state_dict().items()},
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
    cfg = OmegaConf.merge(OmegaConf.structured(JobConfig), plain)
    return cfg


def lightning_state_to_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TwoTowerModel part ('model.' keys) of a LightningModule state dict."""
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def train_stage(cfg: DictConfig, stage: str, run_dir: Path) -> dict[str, float]:
    """Fit ``stage`` ('pretrain' or 'finetune'), keep the best epoch by validation metric,
    write ``checkpoints/model.ckpt`` and return the best validation metrics."""
    validate(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.hardware.torch_threads:
        torch.set_num_threads(cfg.hardware.torch_threads)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    if stage == "finetune" and cfg.init_from:
        ckpt = resolve_model_checkpoint(cfg.init_from, cfg.paths.outputs_root, "pretrain", cfg.experiment_name)
        module = build_module(cfg, stage, model, dm)
        module.load_pretrained(load_model_checkpoint(ckpt)["state_dict"], str(ckpt))
    else:
        module = build_module(cfg, stage, model, dm)
    monitor = cfg.trainer.monitor
    checkpoint_cb = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="best-{epoch:03d}",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_last=True,
        save_weights_only=False,
    )
    callbacks = [checkpoint_cb, EarlyStopping(monitor=monitor, mode="max", patience=cfg.trainer.early_stopping_patience)]
    trainer = build_trainer(cfg, stage, run_dir, callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    best_path = checkpoint_cb.best_model_path
    if not best_path:
        raise RuntimeError(f"{stage}: no checkpoint was saved (did validation run? monitor '{monitor}')")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(lightning_state_to_model(best["state_dict"]))
    best_epoch = int(best["epoch"])
    save_model_checkpoint(run_dir / MODEL_CKPT, model, cfg, {"stage": stage, "best_epoch": best_epoch, "source": str(best_path)})
    metrics = _best_val_metrics(module, monitor)
    metrics.update({"train/seconds": seconds, "train/best_epoch": float(best_epoch), "train/epochs": float(trainer.current_epoch)})
    log.info("%s: best %s = %.4f at epoch %d (%.0f s)", stage, monitor, metrics.get(monitor, float("nan")), best_epoch, seconds)
    return metrics


def _best_val_metrics(module, monitor: str) -> dict[str, float]:
    """Validation metrics of the epoch that scored best on ``monitor``."""
    if not module.val_history:
        raise RuntimeError("no validation epoch was recorded")
    return dict(max(module.val_history, key=lambda h: h.get(monitor, float("-inf"))))


def run_stage_job(cfg: DictConfig, stage: str) -> dict[str, float]:
    """A training job end to end: run folder, log file, training, metrics.json."""
    from jobs.run_folder import create_run_folder, run_log_file, write_metrics

    validate(cfg)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        log.info("%s: run folder %s", stage, run_dir)
        metrics = train_stage(cfg, stage, run_dir)
        write_metrics(run_dir, metrics)
    return metrics
