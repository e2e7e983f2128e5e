"""Batch inference from a model bundle alone: recommendations for every user the bundle knows.

Embeds the catalog and every user (from the whole history: train, valid and test items) with the
bundle's model, on a pool of Ray Data actors (``infer.use_ray=true``) or in this process,
builds a FAISS index over the item vectors (``infer.index``) and keeps each user's ``infer.top_k``
best unseen items. Writes recommendations.parquet, item_embeddings.parquet,
user_embeddings.parquet and metrics.json into the run folder.

Every step is linear in users and in items (bench/scale_infer.py measures it): the catalog's text
is encoded once and reused for the users' histories; on Ray, a batch carries only row numbers,
and what every actor needs (the users' recent items, the text encodings) is put in the object
store once; seen items and recommendations stay NumPy / Arrow arrays, never one Python object per
user or recommendation; FAISS is searched ``rows_per_search`` users at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from inference.bundle import ModelBundle, load_bundle
from inference.embedding import (
    UserHistories,
    embed_all_users,
    embed_catalog,
    embed_items,
    embed_users,
    encode_catalog_text,
    load_embedding_model,
    user_histories,
)
from inference.faiss_index import IndexChoice, auto_index, build_index, search_unseen
from jobs.runtime.config.ray_cluster import infer_needs, ray_session
from jobs.runtime.config.run_folder import create_run_folder, resolve_bundle, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.stages.sharded_inference import recommendations_table, sharded_batch_infer, vector_column
from jobs.runtime.tracking.console import say
from jobs.runtime.tracking.wandb_runs import log_job_result

log = logging.getLogger(__name__)


def _shared(value):
    """A value handed to a Ray Data actor: object-store references are fetched (zero-copy for
    NumPy arrays: every actor of a node reads the same shared memory)."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class CatalogEmbedder:
    """Ray Data actor: loads the bundle's model once, then embeds batches of item indices
    (``data``), returning their vectors and, for a text tower, their pooled text encodings
    (which the users' pass reuses instead of running the text encoder again)."""

    def __init__(self, bundle_path: str, device: str):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(bundle_path, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        key = np.asarray(batch["data"], dtype=np.int64)
        encoded = encode_catalog_text(self.model, key)
        order = np.argsort(key, kind="stable")  # ``encoded`` is in sorted item order
        key = key[order]
        out = {"key": key, "embedding": embed_items(self.model, key, encoded)}
        if encoded is not None:
            out["text"] = encoded[1].float().cpu().numpy()
        out["seconds"] = np.full(len(key), (time.perf_counter() - t0) / max(1, len(key)))  # compute time, spread over the rows
        return out


class UserEmbedder:
    """Ray Data actor: embeds batches of user rows (``data``) from the right-padded recent items and
    lengths of every user and the catalog's text encodings, each put in Ray's object store once
    by the driver (a batch carries only its row numbers)."""

    def __init__(self, bundle_path: str, device: str, shared: dict):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(bundle_path, device)
        self.items, self.lengths = _shared(shared["items"]), _shared(shared["lengths"])
        text = _shared(shared["text"])
        self.encoded = None if text is None else (torch.arange(len(text), device=device), torch.tensor(text, device=device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        key = np.asarray(batch["data"], dtype=np.int64)
        vectors = embed_users(self.model, self.items[key], self.lengths[key], self.encoded)
        return {"key": key, "embedding": vectors, "seconds": np.full(len(key), (time.perf_counter() - t0) / max(1, len(key)))}


def _collect(ds, n: int, what: str, columns: tuple[str, ...]) -> tuple[dict[str, np.ndarray], float]:
    """The dataset's columns ordered by ``key`` (each of 0..n-1 exactly once), and the actors'
    compute seconds summed."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("key", "seconds", *columns)}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for name, values in parts.items():
            values.append(batch[name])
    key = np.concatenate(parts["key"]) if parts["key"] else np.zeros(0, np.int64)
    if len(key) != n or not np.array_equal(np.sort(key), np.arange(n)):
        raise RuntimeError(f"Ray Data returned {len(key)} {what} rows, expected each of 0..{n - 1} exactly once")
    order = np.argsort(key)
    out = {name: np.concatenate(parts[name])[order].astype(np.float32) for name in columns}
    return out, float(np.concatenate(parts["seconds"]).sum())


def _map(ds, fn, cfg: DictConfig, kwargs: dict):
    """``fn`` (an actor class) over ``ds`` on a pool of ``infer.num_actors`` actors."""
    import ray

    i = cfg.infer
    return ds.map_batches(
        fn,
        fn_constructor_kwargs=kwargs,
        batch_size=i.batch_size,
        compute=ray.data.ActorPoolStrategy(size=i.num_actors),
        num_cpus=i.cpus_per_actor,
        num_gpus=i.gpus_per_actor,
        batch_format="numpy",
    )


def _rows(n: int, cfg: DictConfig):
    """Row numbers 0..n-1 as a Ray dataset (column ``data``), in at least one block per actor, so
    small inputs still spread over the pool. The blocks are put by this process: no read tasks,
    which would wait for ever for a CPU that the actors hold on a cluster of ``num_actors`` CPUs."""
    import ray

    i = cfg.infer
    blocks = max(1, min(n, max(i.num_actors, -(-n // i.batch_size))))
    return ray.data.from_numpy(np.array_split(np.arange(n, dtype=np.int64), blocks))


def embed_with_ray(
    cfg: DictConfig, bundle_path: Path, num_items: int, users: UserHistories, with_text: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Item and user vectors from pools of ``infer.num_actors`` Ray Data actors: the catalog first
    (vectors and text encodings), then the users, whose inputs are put in the object store once.

    ``with_text``: the item tower has a text encoder. Returns the vectors with the seconds of each
    pass (wall) and the actors' compute seconds (summed over actors).
    """
    import ray

    device = "cuda" if cfg.infer.gpus_per_actor > 0 else "cpu"
    path = str(bundle_path.resolve())
    t0 = time.perf_counter()
    items = _map(_rows(num_items, cfg), CatalogEmbedder, cfg, {"bundle_path": path, "device": device})
    got, sec_items = _collect(items, num_items, "item", ("embedding", "text") if with_text else ("embedding",))
    t1 = time.perf_counter()
    shared = {"items": ray.put(users.items), "lengths": ray.put(users.lengths), "text": ray.put(got["text"]) if with_text else None}
    n_users = len(users.lengths)
    vectors = _map(_rows(n_users, cfg), UserEmbedder, cfg, {"bundle_path": path, "device": device, "shared": shared})
    user_got, sec_users = _collect(vectors, n_users, "user", ("embedding",))
    t2 = time.perf_counter()
    return got["embedding"], user_got["embedding"], {"items": t1 - t0, "users": t2 - t1, "items_compute": sec_items, "users_compute": sec_users}


def embed_in_process(cfg: DictConfig, bundle: ModelBundle, users: UserHistories) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The same embeddings computed in this process (``infer.use_ray=false``), with the seconds each took."""
    device = "cuda" if cfg.hardware.accelerator == "gpu" and torch.cuda.is_available() else "cpu"
    model = bundle.model.to(device)
    t0 = time.perf_counter()
    encoded = encode_catalog_text(model)
    item_vecs = embed_catalog(model, bundle.catalog.num_items, cfg.infer.batch_size, encoded=encoded)
    t1 = time.perf_counter()
    user_vecs = embed_all_users(model, users, cfg.infer.batch_size, encoded=encoded)
    t2 = time.perf_counter()
    return item_vecs, user_vecs, {"items": t1 - t0, "users": t2 - t1, "items_compute": t1 - t0, "users_compute": t2 - t1}


ROWS_PER_GROUP = 1_000_000  # rows per Parquet row group: list offsets stay within int32 (100 M users x top-100 overflow one)


def _write_in_row_groups(path: Path, num_rows: int, table_of: Callable[[slice], pa.Table]) -> None:
    """Write ``table_of(rows)`` for successive slices of ``ROWS_PER_GROUP`` rows as one file: memory
    and list offsets bounded by a row group, whatever the number of users or items."""
    writer = None
    try:
        for start in range(0, max(num_rows, 1), ROWS_PER_GROUP):
            table = table_of(slice(start, min(num_rows, start + ROWS_PER_GROUP)))
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def write_outputs(run_dir: Path, bundle: ModelBundle, item_vecs: np.ndarray, user_vecs: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> None:
    """recommendations.parquet, item_embeddings.parquet and user_embeddings.parquet with raw ids."""
    users = pa.array(bundle.users.user_ids.astype(str), type=pa.string())
    catalog_ids = pa.array(bundle.catalog.item_ids.astype(str), type=pa.string())

    _write_in_row_groups(run_dir / "recommendations.parquet", len(users), lambda rows: recommendations_table(users[rows], ids[rows], scores[rows], catalog_ids))
    _write_in_row_groups(
        run_dir / "item_embeddings.parquet",
        len(catalog_ids),
        lambda rows: pa.table({"item_id": catalog_ids[rows], "embedding": vector_column(item_vecs[rows])}),
    )
    _write_in_row_groups(
        run_dir / "user_embeddings.parquet", len(users), lambda rows: pa.table({"user_id": users[rows], "embedding": vector_column(user_vecs[rows])})
    )


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
    if cfg.infer.sharded:
        t0 = time.perf_counter()
        with ray_session(cfg, infer_needs(cfg), {str(cfg.paths.outputs_root): "paths.outputs_root"}):
            ray_start = time.perf_counter() - t0
            metrics = sharded_batch_infer(cfg, bundle_path, run_dir, index_choice)
        return metrics | {"infer/seconds_ray_start": ray_start, "infer/seconds_total": time.perf_counter() - t0}
    t_start = time.perf_counter()
    bundle = load_bundle(bundle_path)
    num_items = bundle.catalog.num_items
    users = user_histories(bundle.users.histories, bundle.max_seq_len)
    temperature = float(bundle.model.temperature)
    t_loaded = time.perf_counter()
    log.info("batch_infer: %d users, %d items, %s", len(users.lengths), num_items, "Ray Data actors" if cfg.infer.use_ray else "in process")
    t_embed = time.perf_counter()
    ray_start = 0.0
    if cfg.infer.use_ray:
        with ray_session(cfg, infer_needs(cfg), {str(cfg.paths.outputs_root): "paths.outputs_root"}):
            ray_start = time.perf_counter() - t_embed
            item_vecs, user_vecs, sec = embed_with_ray(cfg, bundle_path, num_items, users, bundle.model.item_tower.encoder is not None)
    else:
        item_vecs, user_vecs, sec = embed_in_process(cfg, bundle, users)
    sec_embed = time.perf_counter() - t_embed
    log.info(
        "embedding took %.1fs (%d items %.2fs, %d users %.2fs; model compute %.2fs and %.2fs)",
        sec_embed,
        num_items,
        sec["items"],
        len(users.lengths),
        sec["users"],
        sec["items_compute"],
        sec["users_compute"],
    )

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
        "infer/seconds_ray_start": ray_start,  # 0 in process
        "infer/seconds_embed_items_wall": sec["items"],  # the catalog's pass, actors' start included
        "infer/seconds_embed_users_wall": sec["users"],
        "infer/seconds_embed_items": sec["items_compute"],  # model compute, summed over actors
        "infer/seconds_embed_users": sec["users_compute"],
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
        say(
            "batch_infer: %s with %s; logs in %s",
            bundle,
            f"{cfg.infer.num_actors} Ray Data actor(s)" if cfg.infer.use_ray else "this process",
            run_dir / "run.log",
        )
        metrics = batch_infer(cfg, bundle, run_dir)
        say(
            "batch_infer: top %d for %d users in %.0f s -> %s",
            cfg.infer.top_k,
            metrics["infer/num_users"],
            metrics["infer/seconds_total"],
            run_dir / "recommendations.parquet",
        )
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"recommendations": run_dir / "recommendations.parquet", "item_embeddings": run_dir / "item_embeddings.parquet"})
    return metrics
