"""Turns a validated config into ready objects: prepared data, datamodule, towers, LightningModule, Trainer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from datamodules.parquet_dataset import ParquetFolder
from datamodules.preprocess import PreparedDataset, load_prepared, prepare
from datamodules.raw_dataset import RawDataset
from datamodules.sequence_datamodule import CatalogView, SequenceDataModule
from jobs.runtime.config.catalog_tokens import catalog_tokens, ensure_tokens
from jobs.runtime.tracking.console import say
from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2, load_tokenizer
from lightning_modules.item_tower import ItemTower, tokenize_catalog
from lightning_modules.negative_bank import NegativeBank
from lightning_modules.pretrain_module import PretrainModule
from lightning_modules.ranking_metrics import category_matrix
from lightning_modules.retrieval_module import RetrievalModule
from lightning_modules.sampled_softmax import SampledSoftmaxLoss
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.two_tower_module import TwoTowerModule
from lightning_modules.user_tower import UserTower

log = logging.getLogger(__name__)

PREPARE_VERSION = 3  # bump when preprocessing (or the synthetic generator) changes what it writes
# model.item_tower.sparse_ids=auto: a sparse id table from this many items on (below it the dense
# AdamW step over the table costs little, and small runs keep their exact dense results)
SPARSE_IDS_MIN_ITEMS = 100_000


def data_fingerprint(cfg: DictConfig) -> str:
    reader = OmegaConf.to_container(cfg.data.reader, resolve=True)
    reader.pop("cache_dir", None)
    key = {"reader": reader, "min_user_interactions": cfg.data.min_user_interactions, "dedupe": cfg.data.dedupe, "v": PREPARE_VERSION}
    engine = _value(cfg.data.engine)
    if engine == "ray":  # the users' numbering depends on the engine and its buckets ('auto': on the data)
        key["engine"] = {"num_buckets": cfg.data.ray.num_buckets, "rows_per_bucket": cfg.data.ray.rows_per_bucket}
    elif engine == "local":
        key["engine"] = "local"
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_data(cfg: DictConfig) -> PreparedDataset:
    """Read and preprocess the configured dataset into ``data_dir/<name>``, unless already there."""
    folder = Path(cfg.paths.data_dir) / cfg.data.name
    fingerprint = data_fingerprint(cfg)
    ready = load_prepared(folder, fingerprint)
    if ready is not None:
        log.info("data: reusing %s (%d users, %d items)", folder, ready.num_users, ready.num_items)
        _tokens_once(cfg, folder)
        return ready
    source = instantiate(cfg.data.reader, _convert_="all")
    engine = data_engine(cfg, source)
    say(
        "data: reading %s and preparing it in %s (%s; once, later runs reuse it)",
        cfg.data.name,
        folder,
        "on Ray Data" if engine == "ray" else "in this process",
    )
    if engine == "ray":
        from datamodules.sharded_prepare import prepare_sharded
        from jobs.runtime.config.ray_cluster import ray_session

        with ray_session(cfg):
            prepared = prepare_sharded(
                source, folder, cfg.data.min_user_interactions, cfg.data.dedupe, fingerprint, cfg.data.ray.num_buckets, cfg.data.ray.rows_per_bucket
            )
    else:
        raw = source.read() if isinstance(source, ParquetFolder) else source
        prepared = prepare(raw, folder, cfg.data.min_user_interactions, cfg.data.dedupe, fingerprint)
    say("data: %d users, %d items, %d interactions", prepared.num_users, prepared.num_items, prepared.num_interactions)
    _tokens_once(cfg, folder)
    return prepared


def _tokens_once(cfg: DictConfig, folder: Path) -> None:
    """The catalog's tokens beside the prepared data (made once; later calls find them)."""
    it = cfg.model.item_tower
    if it.use_text:
        ensure_tokens(folder, it.tokenizer, it.max_text_tokens)


def data_engine(cfg: DictConfig, source: ParquetFolder | RawDataset) -> str:
    """``data.engine`` resolved: 'auto' is 'ray' from ``data.ray.auto_min_interactions`` on (a
    Parquet folder's size comes from its files' footers, a reader's table from its length)."""
    engine = _value(cfg.data.engine)
    if engine != "auto":
        return engine
    size = source.num_interactions() if isinstance(source, ParquetFolder) else len(source.interactions)
    return "ray" if size >= cfg.data.ray.auto_min_interactions else "local"


def build_datamodule(cfg: DictConfig) -> SequenceDataModule:
    """The stage's datamodule, set up. With ``data.shard_by_rank`` in a process of a
    torch.distributed group (a Ray Train worker) it reads only this rank's users."""
    prepared = prepare_data(cfg)
    rank, world_size = 0, 1
    if cfg.data.shard_by_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    dm = SequenceDataModule(
        prepared.folder,
        max_seq_len=cfg.data.max_seq_len,
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.eval_batch_size,
        num_workers=cfg.data.num_workers,
        train_windows=_value(cfg.data.train_windows),
        cold_items=cfg.data.cold_start.num_items,
        cold_seed=cfg.data.cold_start.seed,
        rank=rank,
        world_size=world_size,
    )
    dm.setup()
    return dm


def build_catalog_view(cfg: DictConfig) -> CatalogView:
    """What a Ray run's driver needs to build the model and write the bundle: the catalog and
    catalog-sized vectors, the users read piece by piece (never held at once)."""
    return CatalogView(prepare_data(cfg).folder, cold_items=cfg.data.cold_start.num_items, cold_seed=cfg.data.cold_start.seed)


def _value(x):
    return x.value if hasattr(x, "value") else x


def sparse_ids_of(cfg: DictConfig, num_items: int) -> bool:
    """``model.item_tower.sparse_ids`` resolved for a catalog of ``num_items`` (DeepSpeed: dense)."""
    choice = cfg.model.item_tower.sparse_ids
    if choice == "auto":
        return num_items >= SPARSE_IDS_MIN_ITEMS and _value(cfg.strategy.name) != "deepspeed"
    return bool(choice)


def build_model(cfg: DictConfig, dm: SequenceDataModule | CatalogView) -> TwoTowerModel:
    """Both towers from ``cfg.model`` for the datamodule's (or catalog view's) catalog."""
    m, it, ut = cfg.model, cfg.model.item_tower, cfg.model.user_tower
    token_ids = attention = None
    if it.use_text:
        if dm.data_dir is not None:  # tokenised once per prepared dataset
            token_ids, attention = catalog_tokens(dm.data_dir, it.tokenizer, it.max_text_tokens, dm.item_texts)
        else:  # a catalog not read from a prepared folder
            token_ids, attention = tokenize_catalog(load_tokenizer(it.tokenizer), dm.item_texts, it.max_text_tokens)
    item_tower = build_item_tower(cfg, dm.num_items, token_ids, attention)
    if dm.cold_mask.any():
        item_tower.set_cold_items(torch.as_tensor(dm.cold_mask))
    gpt = build_gpt2(ut.n_layer, ut.n_head, ut.n_embd, max(cfg.data.max_seq_len, 8), ut.dropout, m.attn_implementation)
    return TwoTowerModel(item_tower, UserTower(gpt, m.dim), temperature=m.temperature, normalize=m.normalize, dropout_targets=it.dropout_targets)


def build_item_tower(cfg: DictConfig, num_items: int, token_ids: torch.Tensor | None, attention: torch.Tensor | None) -> ItemTower:
    """The item tower of ``cfg.model`` for a catalog of ``num_items`` (its tokens given when it reads text)."""
    m, it = cfg.model, cfg.model.item_tower
    encoder = None
    if it.use_text:
        vocab = load_tokenizer(it.tokenizer).vocab_size
        encoder = build_bert_encoder(it.pretrained, vocab, it.hidden_size, it.num_layers, it.num_heads, it.intermediate_size, it.dropout, m.attn_implementation)
    return ItemTower(
        num_items,
        m.dim,
        encoder,
        token_ids,
        attention,
        pooling=_value(it.pooling),
        use_id_embedding=it.use_id_embedding,
        freeze_encoder=it.freeze_encoder,
        unfreeze_top_layers=it.unfreeze_top_layers,
        dropout=it.dropout,
        id_dropout=it.id_dropout,
        chunk_size=it.chunk_size,
        static_width=it.static_width,
        compile_encoder=it.compile,
        sparse_ids=it.use_id_embedding and sparse_ids_of(cfg, num_items),
    )


def build_module(cfg: DictConfig, stage: str, model: TwoTowerModel, dm: SequenceDataModule) -> RetrievalModule:
    """The LightningModule of ``stage`` ('pretrain' or 'finetune')."""
    s = cfg[stage]
    loss = bank = None
    if _value(s.loss.kind) == "sampled_softmax":
        if s.loss.bank_refresh_steps:
            bank = NegativeBank(s.loss.bank_size or s.loss.num_negatives, s.loss.bank_refresh_steps)
        loss = SampledSoftmaxLoss(
            torch.as_tensor(dm.item_train_counts),
            s.loss.num_negatives,
            _value(s.loss.sampler),
            s.loss.logq_correction,
            s.loss.popularity_alpha,
            allowed=torch.as_tensor(~dm.cold_mask),
            label_smoothing=cfg.trainer.label_smoothing,
        )
    common = dict(
        sampled_loss=loss,
        lr=s.lr,
        encoder_lr_scale=cfg.trainer.encoder_lr_scale,
        weight_decay=cfg.trainer.weight_decay,
        warmup_steps=cfg.trainer.warmup_steps,
        lr_schedule=_value(cfg.trainer.lr_schedule),
        train_positions=_value(s.train_positions),
        ks=tuple(cfg.trainer.metrics_ks),
        item_categories=category_matrix(dm.item_categories),
        label_smoothing=cfg.trainer.label_smoothing,
        negative_bank=bank,
        shared_item_encoding=cfg.model.item_tower.shared_encoding,
    )
    if stage == "pretrain":
        mask_id, specials = None, ()
        if s.mlm_weight > 0:
            tokenizer = load_tokenizer(cfg.model.item_tower.tokenizer)
            mask_id, specials = tokenizer.mask_token_id, tuple(tokenizer.all_special_ids)
        return PretrainModule(
            model,
            mlm_weight=s.mlm_weight,
            mlm_probability=s.mlm_probability,
            mlm_batch_items=s.mlm_batch_items,
            mask_token_id=mask_id,
            special_token_ids=specials,
            **common,
        )
    return TwoTowerModule(model, **common)


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """TensorBoard and wandb (offline by default) loggers writing inside the run folder."""
    loggers: list = []
    if cfg.logger.tensorboard.enabled:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    mode = os.environ.get("WANDB_MODE", cfg.logger.wandb.mode)
    if cfg.logger.wandb.enabled and mode != "disabled":
        import wandb
        from pytorch_lightning.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                save_dir=str(run_dir),
                project=cfg.logger.wandb.project,
                entity=cfg.logger.wandb.entity,
                group=cfg.logger.wandb.group,
                tags=list(cfg.logger.wandb.tags),
                name=f"{cfg.experiment_name}-{cfg.job}-{run_dir.parent.name}-{run_dir.name}",
                mode=mode,
                # write the offline run file every half second: a worker that Ray stops (an ASHA
                # decision) gets no chance to flush at exit
                settings=wandb.Settings(x_transaction_log_flush_interval=0.5),
            )
        )
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for lg in loggers:
        lg.log_hyperparams(plain)
    return loggers


def precision_of(cfg: DictConfig) -> str:
    return cfg.hardware.precision or cfg.trainer.precision


def finish_wandb() -> None:
    """End this process's wandb run, so the next fit starts its own (Lightning reuses a live one)."""
    import sys

    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()


def build_trainer(cfg: DictConfig, stage: str, run_dir: Path, callbacks: list, **distributed) -> pl.Trainer:
    """The Lightning Trainer of a stage; ``distributed`` (strategy, plugins, devices, ...) comes
    from the Ray launcher and replaces the single-process defaults."""
    t, hw = cfg.trainer, cfg.hardware
    options = dict(accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, gradient_clip_val=t.gradient_clip_val)
    options.update(distributed)
    return pl.Trainer(
        **options,
        precision=precision_of(cfg),
        max_epochs=cfg[stage].max_epochs,
        accumulate_grad_batches=cfg.strategy.gradient_accumulation_steps,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        enable_progress_bar=False,  # the console draws its own bar from the run folder (jobs/runtime/tracking/console.py)
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        logger=build_loggers(cfg, run_dir) or False,
        callbacks=callbacks,
    )
