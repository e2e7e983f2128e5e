"""Batch inference from a model bundle alone: recommendations for every user the bundle knows.

Embeds the catalog and every user (from the whole history: train, valid and test items) with the
bundle's model, on a pool of Ray Data actors (``infer.use_ray=true``) or in this process,
builds a FAISS index over the item vectors (``infer.index``) and keeps each user's ``infer.top_k``
best unseen items. Writes recommendations.parquet, item_embeddings.parquet,
user_embeddings.parquet and metrics.json into the run folder.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from inference.bundle import ModelBundle, load_bundle
from inference.embedding import UserHistories, embed_all_users, embed_catalog, embed_items, embed_users, load_embedding_model, user_histories
from inference.faiss_index import IndexChoice, auto_index, build_index, search_unseen
from jobs.runtime.config_schema import validate
from jobs.runtime.console import say
from jobs.runtime.ray_cluster import infer_needs, ray_session
from jobs.runtime.run_folder import create_run_folder, resolve_bundle, run_log_file, write_metrics
from jobs.runtime.tracking import log_job_result

log = logging.getLogger(__name__)


ITEM, USER = 0, 1  # the ``kind`` of a work row


class Embedder:
    """Ray Data actor: loads the bundle's model once, then embeds batches of work rows.

    A row is an item (``kind`` ITEM, its index in ``items[0]``) or a user (``kind`` USER, right-padded
    recent items and ``length``), so one actor pool serves the catalog and the users.
    """

    def __init__(self, bundle_path: str, device: str):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(bundle_path, device)

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


def embed_with_ray(cfg: DictConfig, bundle_path: Path, num_items: int, users: UserHistories) -> tuple[np.ndarray, np.ndarray, float, float]:
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
        fn_constructor_kwargs={"bundle_path": str(bundle_path.resolve()), "device": "cuda" if i.gpus_per_actor > 0 else "cpu"},
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


def embed_in_process(cfg: DictConfig, bundle: ModelBundle, users: UserHistories) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The same embeddings computed in this process (``infer.use_ray=false``), with the seconds each took."""
    device = "cuda" if cfg.hardware.accelerator == "gpu" and torch.cuda.is_available() else "cpu"
    model = bundle.model.to(device)
    t0 = time.perf_counter()
    item_vecs = embed_catalog(model, bundle.catalog.num_items, cfg.infer.batch_size)
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


def write_outputs(run_dir: Path, bundle: ModelBundle, item_vecs: np.ndarray, user_vecs: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """recommendations.parquet, item_embeddings.parquet and user_embeddings.parquet with raw ids."""
    users = bundle.users.user_ids.astype(str)
    item_ids = bundle.catalog.item_ids.astype(str)
    keep = ids >= 0
    rec_items = np.where(keep, item_ids[np.where(keep, ids, 0)], "")
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
        pa.table({"item_id": pa.array(item_ids, type=pa.string()), "embedding": _vector_column(item_vecs)}),
        run_dir / "item_embeddings.parquet",
    )
    pq.write_table(pa.table({"user_id": pa.array(users, type=pa.string()), "embedding": _vector_column(user_vecs)}), run_dir / "user_embeddings.parquet")


def index_choice(cfg: DictConfig, num_items: int) -> IndexChoice:
    """``infer.index``: ``auto`` picks by catalog size (inference/faiss_index.py: auto_index)."""
    ix = cfg.infer.index
    kind = str(getattr(ix.kind, "value", ix.kind))
    if kind == "auto":
        choice = auto_index(num_items)
        log.info("infer.index.kind=auto: %s %s for %d items", choice.kind, choice.params, num_items)
        return choice
    params = {
        "ivf": {"nlist": ix.nlist, "nprobe": ix.nprobe},
        "hnsw": {"hnsw_m": ix.hnsw_m, "ef_search": ix.ef_search},
        "ivfpq": {"nlist": ix.nlist, "nprobe": ix.nprobe, "pq_m": ix.pq_m, "refine_factor": ix.refine_factor},
    }.get(kind, {})
    return IndexChoice(kind, params)


def batch_infer(cfg: DictConfig, bundle_path: Path, run_dir: Path) -> dict[str, float]:
    """Embed, index, search and write; returns the counts and timings of metrics.json."""
    t_start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    num_items = bundle.catalog.num_items
    users = user_histories(bundle.users.histories, bundle.max_seq_len)
    temperature = float(bundle.model.temperature)
    t_loaded = time.perf_counter()
    log.info("batch_infer: %d users, %d items, %s", len(users.lengths), num_items, "Ray Data actors" if cfg.infer.use_ray else "in process")
    t_embed = time.perf_counter()
    if cfg.infer.use_ray:
        with ray_session(cfg, infer_needs(cfg), {str(cfg.paths.outputs_root): "paths.outputs_root"}):
            item_vecs, user_vecs, sec_items, sec_users = embed_with_ray(cfg, bundle_path, num_items, users)
    else:
        item_vecs, user_vecs, sec_items, sec_users = embed_in_process(cfg, bundle, users)
    sec_embed = time.perf_counter() - t_embed
    log.info("embedding took %.1fs (model compute: %d items %.2fs, %d users %.2fs)", sec_embed, num_items, sec_items, len(users.lengths), sec_users)

    choice = index_choice(cfg, num_items)
    t0 = time.perf_counter()
    index = build_index(item_vecs, choice.kind, **choice.params)
    t1 = time.perf_counter()
    ids, inner = search_unseen(index, user_vecs, users.seen, int(cfg.infer.top_k))
    scores = inner / np.float32(temperature)
    t2 = time.perf_counter()
    write_outputs(run_dir, bundle, item_vecs, user_vecs, ids, scores)
    t3 = time.perf_counter()
    lengths = (ids >= 0).sum(axis=1)
    log.info("index %s %s: built in %.2fs, searched in %.2fs; wrote %s", choice.kind, choice.params, t1 - t0, t2 - t1, run_dir)
    return {
        "infer/num_users": float(len(users.lengths)),
        "infer/num_items": float(num_items),
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


def run_batch_infer(cfg: DictConfig) -> dict[str, float]:
    """``jobs.batch_infer``: recommendations from the bundle that ``checkpoint`` names."""
    validate(cfg)
    bundle = resolve_bundle(cfg.checkpoint, cfg.paths.outputs_root, "finetune", cfg.experiment_name)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        say("batch_infer: %s with %s; logs in %s", bundle, f"{cfg.infer.num_actors} Ray Data actor(s)" if cfg.infer.use_ray else "this process", run_dir / "run.log")
        metrics = batch_infer(cfg, bundle, run_dir)
        say("batch_infer: top %d for %d users in %.0f s -> %s", cfg.infer.top_k, metrics["infer/num_users"], metrics["infer/seconds_total"], run_dir / "recommendations.parquet")
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"recommendations": run_dir / "recommendations.parquet", "item_embeddings": run_dir / "item_embeddings.parquet"})
    return metrics
