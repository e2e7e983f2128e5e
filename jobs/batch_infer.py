"""``python -m jobs.batch_infer checkpoint=<finetune run folder | model.ckpt | latest>``: recommendations for every user.

Embeds the catalog and every user (from the whole history: train, valid and test items) with the
checkpoint's model, on a pool of Ray Data actors (``infer.use_ray=true``) or in this process,
builds a FAISS index over the item vectors (``infer.index``) and keeps each user's ``infer.top_k``
best unseen items. Writes recommendations.parquet, item_embeddings.parquet,
user_embeddings.parquet and metrics.json into the run folder.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from datamodules.sequence_datamodule import SequenceDataModule
from inference.embedding import (
    UserHistories,
    checkpoint_config,
    embed_all_users,
    embed_catalog,
    embed_items,
    embed_users,
    full_histories,
    load_embedding_model,
    user_histories,
)
from inference.faiss_index import build_index, search_unseen
from jobs.assembly import build_datamodule
from jobs.config_schema import register, validate
from jobs.ray_cluster import ray_session
from jobs.tracking import log_job_result
from jobs.run_folder import create_run_folder, pin_hydra_output_dir, resolve_model_checkpoint, run_log_file, write_metrics

log = logging.getLogger(__name__)


ITEM, USER = 0, 1  # the ``kind`` of a work row


class Embedder:
    """Ray Data actor: loads the checkpoint's model once, then embeds batches of work rows.

    A row is an item (``kind`` ITEM, its index in ``items[0]``) or a user (``kind`` USER, right-padded
    recent items and ``length``), so one actor pool serves the catalog and the users.
    """

    def __init__(self, ckpt_path: str, data_dir: str, device: str):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(ckpt_path, device, data_dir=data_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kind, items = batch["kind"], batch["items"]
        vectors = np.zeros((len(kind), self.model.item_tower.dim), dtype=np.float32)
        seconds = np.zeros(len(kind), dtype=np.float64)  # compute time, spread over the rows of each kind
        for k in (ITEM, USER):
            rows = np.flatnonzero(kind == k)
            if rows.size == 0:
                continue
            t0 = time.perf_counter()
            vectors[rows] = embed_items(self.model, items[rows, 0]) if k == ITEM else embed_users(self.model, items[rows], batch["length"][rows])
            seconds[rows] = (time.perf_counter() - t0) / rows.size
        return {"kind": kind, "key": batch["key"], "embedding": vectors, "seconds": seconds}


def check_infer_config(cfg: DictConfig) -> None:
    """Cross-field checks of ``infer.*``; raises ValueError naming the key."""
    i = cfg.infer
    for key, value, low in (
        ("infer.top_k", i.top_k, 1),
        ("infer.batch_size", i.batch_size, 1),
        ("infer.num_actors", i.num_actors, 1),
        ("infer.index.nlist", i.index.nlist, 1),
        ("infer.index.nprobe", i.index.nprobe, 1),
        ("infer.index.hnsw_m", i.index.hnsw_m, 2),
        ("infer.index.ef_search", i.index.ef_search, 1),
    ):
        if value < low:
            raise ValueError(f"config error at '{key}': must be >= {low}, got {value}")
    if i.cpus_per_actor < 0 or i.gpus_per_actor < 0:
        raise ValueError("config error at 'infer.cpus_per_actor' / 'infer.gpus_per_actor': must be >= 0")
    if not cfg.checkpoint:
        raise ValueError("config error at 'checkpoint': batch_infer needs a fine-tuning run folder, a model.ckpt or 'latest'")


def work_rows(num_items: int, users: UserHistories) -> list[dict[str, object]]:
    """One row per catalog item, then one per user, all with the same columns (see ``Embedder``)."""
    width = users.items.shape[1]
    item_items = np.zeros((num_items, width), dtype=np.int64)
    item_items[:, 0] = np.arange(num_items)
    rows: list[dict[str, object]] = [{"kind": ITEM, "key": i, "items": item_items[i], "length": 1} for i in range(num_items)]
    rows += [{"kind": USER, "key": r, "items": users.items[r], "length": int(users.lengths[r])} for r in range(len(users.lengths))]
    return rows


def _ordered(kind: np.ndarray, key: np.ndarray, vectors: np.ndarray, which: int, n: int) -> np.ndarray:
    """The [n, dim] vectors of rows of kind ``which``, ordered by key; every key 0..n-1 exactly once."""
    sel = kind == which
    k = key[sel]
    if len(k) != n or not np.array_equal(np.sort(k), np.arange(n)):
        name = "item" if which == ITEM else "user"
        raise RuntimeError(f"Ray Data returned {len(k)} {name} rows, expected each of 0..{n - 1} exactly once")
    return vectors[sel][np.argsort(k)].astype(np.float32)


def embed_with_ray(cfg: DictConfig, ckpt: Path, data_dir: str, num_items: int, users: UserHistories) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Item and user vectors from a pool of ``infer.num_actors`` Ray Data actors.

    Returns them with the actors' compute seconds for items and for users (summed over actors).
    """
    import ray

    i = cfg.infer
    rows = work_rows(num_items, users)
    # at least one block per actor, so small inputs still spread over the pool
    blocks = min(len(rows), max(i.num_actors, -(-len(rows) // i.batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=max(1, blocks))
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"ckpt_path": str(ckpt.resolve()), "data_dir": data_dir, "device": "cuda" if i.gpus_per_actor > 0 else "cpu"},
        batch_size=i.batch_size,
        compute=ray.data.ActorPoolStrategy(size=i.num_actors),
        num_cpus=i.cpus_per_actor,
        num_gpus=i.gpus_per_actor,
        batch_format="numpy",
    )
    parts: dict[str, list[np.ndarray]] = {"kind": [], "key": [], "embedding": [], "seconds": []}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in parts.items():
            values.append(batch[name])
    kind, key, vectors, seconds = (np.concatenate(parts[name]) for name in ("kind", "key", "embedding", "seconds"))
    item_vecs = _ordered(kind, key, vectors, ITEM, num_items)
    user_vecs = _ordered(kind, key, vectors, USER, len(users.lengths))
    return item_vecs, user_vecs, float(seconds[kind == ITEM].sum()), float(seconds[kind == USER].sum())


def embed_in_process(cfg: DictConfig, ckpt: Path, dm: SequenceDataModule, users: UserHistories) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The same embeddings computed in this process (``infer.use_ray=false``), with the seconds each took."""
    device = "cuda" if cfg.hardware.accelerator == "gpu" and torch.cuda.is_available() else "cpu"
    model = load_embedding_model(ckpt, device, dm=dm)
    t0 = time.perf_counter()
    item_vecs = embed_catalog(model, dm.num_items, cfg.infer.batch_size)
    t1 = time.perf_counter()
    user_vecs = embed_all_users(model, users, cfg.infer.batch_size)
    t2 = time.perf_counter()
    return item_vecs, user_vecs, t1 - t0, t2 - t1


def _vector_column(vectors: np.ndarray) -> pa.Array:
    """An [n, d] float32 matrix as a list<float32> column."""
    n, d = vectors.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d), pa.array(vectors.reshape(-1), type=pa.float32()))


def _ragged_column(values: np.ndarray, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """Rows of ``values`` [n, k] restricted to ``keep`` (a prefix per row) as a list column."""
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[keep], type=arrow_type))


def write_outputs(run_dir: Path, dm: SequenceDataModule, item_vecs: np.ndarray, user_vecs: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """recommendations.parquet, item_embeddings.parquet and user_embeddings.parquet with raw ids."""
    users = dm.user_ids[dm.user_index].astype(str)
    keep = ids >= 0
    rec_items = np.where(keep, dm.item_ids[np.where(keep, ids, 0)].astype(str), "")
    pq.write_table(
        pa.table(
            {
                "user_id": pa.array(users, type=pa.string()),
                "item_ids": _ragged_column(rec_items, keep, pa.string()),
                "scores": _ragged_column(scores.astype(np.float32), keep, pa.float32()),
            }
        ),
        run_dir / "recommendations.parquet",
    )
    pq.write_table(
        pa.table({"item_id": pa.array(dm.item_ids.astype(str), type=pa.string()), "embedding": _vector_column(item_vecs)}),
        run_dir / "item_embeddings.parquet",
    )
    pq.write_table(pa.table({"user_id": pa.array(users, type=pa.string()), "embedding": _vector_column(user_vecs)}), run_dir / "user_embeddings.parquet")


def batch_infer(cfg: DictConfig, ckpt: Path, run_dir: Path) -> dict[str, float]:
    """Embed, index, search and write; returns the counts and timings of metrics.json."""
    t_start = time.perf_counter()
    train_cfg = checkpoint_config(ckpt)
    data_dir = str(Path(train_cfg.paths.data_dir).resolve())
    train_cfg.paths.data_dir = data_dir
    dm = build_datamodule(train_cfg)
    users = user_histories(full_histories(dm), int(train_cfg.data.max_seq_len))
    temperature = float(train_cfg.model.temperature)  # what build_model gives the model
    t_loaded = time.perf_counter()
    log.info("batch_infer: %d users, %d items, %s", len(users.lengths), dm.num_items, "Ray Data actors" if cfg.infer.use_ray else "in process")
    t_embed = time.perf_counter()
    if cfg.infer.use_ray:
        with ray_session(cfg):
            item_vecs, user_vecs, sec_items, sec_users = embed_with_ray(cfg, ckpt, data_dir, dm.num_items, users)
    else:
        item_vecs, user_vecs, sec_items, sec_users = embed_in_process(cfg, ckpt, dm, users)
    sec_embed = time.perf_counter() - t_embed
    log.info("embedding took %.1fs (model compute: %d items %.2fs, %d users %.2fs)", sec_embed, dm.num_items, sec_items, len(users.lengths), sec_users)

    ix = cfg.infer.index
    t0 = time.perf_counter()
    index = build_index(item_vecs, str(getattr(ix.kind, "value", ix.kind)), ix.nlist, ix.nprobe, ix.hnsw_m, ix.ef_search)
    t1 = time.perf_counter()
    ids, inner = search_unseen(index, user_vecs, users.seen, int(cfg.infer.top_k))
    scores = inner / np.float32(temperature)
    t2 = time.perf_counter()
    write_outputs(run_dir, dm, item_vecs, user_vecs, ids, scores)
    t3 = time.perf_counter()
    lengths = (ids >= 0).sum(axis=1)
    log.info("index %s: built in %.2fs, searched in %.2fs; wrote %s", getattr(ix.kind, "value", ix.kind), t1 - t0, t2 - t1, run_dir)
    return {
        "infer/num_users": float(len(users.lengths)),
        "infer/num_items": float(dm.num_items),
        "infer/top_k": float(cfg.infer.top_k),
        "infer/mean_list_length": float(lengths.mean()) if len(lengths) else 0.0,
        "infer/num_short_lists": float((lengths < cfg.infer.top_k).sum()),
        "infer/seconds_load": t_loaded - t_start,
        "infer/seconds_embed": sec_embed,
        "infer/seconds_embed_items": sec_items,
        "infer/seconds_embed_users": sec_users,
        "infer/seconds_build_index": t1 - t0,
        "infer/seconds_search": t2 - t1,
        "infer/seconds_write": t3 - t2,
        "infer/seconds_total": t3 - t_start,
    }


def run(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    check_infer_config(cfg)
    ckpt = resolve_model_checkpoint(cfg.checkpoint, cfg.paths.outputs_root, "finetune", cfg.experiment_name)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        log.info("batch_infer: %s -> %s", ckpt, run_dir)
        metrics = batch_infer(cfg, ckpt, run_dir)
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"recommendations": run_dir / "recommendations.parquet", "item_embeddings": run_dir / "item_embeddings.parquet"})
    return metrics


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="batch_infer")
def main(cfg: DictConfig) -> None:
    run(pin_hydra_output_dir(cfg))


if __name__ == "__main__":
    main()
