"""Batch inference that never gathers on the driver (``infer.sharded=true``, on Ray).

Three Ray stages, each reading its own inputs from the bundle's files and writing its own outputs
into the run folder (on a cluster: shared storage that every node reaches):

1. **catalog**: a pool of ``infer.num_actors`` Ray Data actors, each given pieces of item rows,
   encodes their text once, embeds them, and writes ``item_embeddings.parquet/part-<first
   row>.parquet`` and, for a text tower, the pooled text encodings of those rows;
2. **index**: one Ray task builds the FAISS index (``infer.index``) from the item parts into
   ``index/items.faiss`` and joins the text parts into ``index/text.npy`` block by block;
3. **users**: a pool of actors, each given pieces of user rows, reads only those rows of the
   bundle's users.parquet (ids and whole histories), memory-maps the index and the text
   encodings (file-backed pages, shared by every actor of a node instead of a private copy in
   each), embeds its users, searches their unseen top-k and writes
   ``recommendations.parquet/part-<first row>.parquet`` and ``user_embeddings.parquet/part-...``.

The driver reads the manifest and Parquet footers, hands out (start, stop) row pieces and sums the
small per-piece rows the actors return into metrics.json: no vector, history or recommendation
passes through it. Each output is a folder of Parquet parts with the schema of the in-process
path's single file (``pq.read_table`` and ``pd.read_parquet`` read either); parts are written
under a temporary name and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from inference.bundle import CATALOG, USERS, BundleError, list_matrix, read_manifest, read_rows, read_user_rows, verify_files
from inference.embedding import embed_all_users, embed_items, encode_catalog_text, load_embedding_model, user_histories
from inference.faiss_index import IndexChoice, SeenItems, build_index, search_unseen

log = logging.getLogger(__name__)

PIECE_ROWS = 65_536  # users or items per piece handed to an actor (at least one piece per actor)
RECOMMENDATIONS = "recommendations.parquet"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
USER_EMBEDDINGS = "user_embeddings.parquet"
INDEX_DIR = "index"
INDEX_FILE = "items.faiss"
TEXT_FILE = "text.npy"
TEXT_PARTS = ".text-parts"  # under INDEX_DIR while the catalog stage runs; removed once text.npy is whole
SHARDS_DIR = "shards"  # per actor: the pieces of users it wrote, with its node (users-<pid>.jsonl)


def pieces(n: int, num_actors: int, piece_rows: int = PIECE_ROWS) -> list[tuple[int, int]]:
    """Rows 0..n-1 as contiguous (start, stop) pieces of at most ``piece_rows``, at least one per
    actor while there are rows enough."""
    count = max(1, min(n, max(num_actors, -(-n // piece_rows))))
    bounds = np.linspace(0, n, count + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def part_name(start: int) -> str:
    return f"part-{start:012d}.parquet"


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename to ``path``: a reader sees the whole file or none."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save given a path would append .npy to it
        np.save(f, array)


def vector_column(vectors: np.ndarray) -> pa.Array:
    """An [n, d] float32 matrix as a list<float32> column."""
    n, d = vectors.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * d), pa.array(vectors.reshape(-1), type=pa.float32()))


def recommendations_table(user_ids: pa.Array, ids: np.ndarray, scores: np.ndarray, catalog_ids: pa.Array) -> pa.Table:
    """user_id, item_ids (raw ids, one Arrow take: no Python string per recommendation) and
    scores of top-k rows ``ids`` / ``scores`` [n, k], each cut before its -1 fillers."""
    keep = ids >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32))
    return pa.table(
        {
            "user_id": user_ids,
            "item_ids": pa.ListArray.from_arrays(offsets, catalog_ids.take(pa.array(ids[keep]))),
            "scores": pa.ListArray.from_arrays(offsets, pa.array(scores.astype(np.float32)[keep], type=pa.float32())),
        }
    )


def _piece(batch: dict[str, np.ndarray]) -> tuple[int, int]:
    if len(batch["start"]) != 1:
        raise RuntimeError(f"an inference actor expects one piece per batch, got {len(batch['start'])}")
    return int(batch["start"][0]), int(batch["stop"][0])


def _device(gpus_per_actor: float) -> str:
    return "cuda" if gpus_per_actor > 0 else "cpu"


class CatalogPart:
    """Ray Data actor: the model once, then per piece of item rows their vectors (a Parquet part)
    and pooled text encodings (an .npy part), written where the index task finds them."""

    def __init__(self, bundle_path: str, run_dir: str, device: str, batch_size: int):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(bundle_path, device)
        self.catalog = Path(bundle_path) / CATALOG
        self.run_dir, self.batch_size = Path(run_dir), batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        start, stop = _piece(batch)
        key = np.arange(start, stop, dtype=np.int64)
        encoded = encode_catalog_text(self.model, key)
        vectors = np.concatenate([embed_items(self.model, key[s : s + self.batch_size], encoded) for s in range(0, len(key), self.batch_size)])
        ids = read_rows(self.catalog, ["item_id"], start, stop)["item_id"].cast(pa.string())
        t1 = time.perf_counter()
        table = pa.table({"item_id": ids, "embedding": vector_column(vectors)})
        _write_atomic(self.run_dir / ITEM_EMBEDDINGS / part_name(start), lambda p: pq.write_table(table, p))
        if encoded is not None:
            text = encoded[1].float().cpu().numpy()
            _write_atomic(self.run_dir / INDEX_DIR / TEXT_PARTS / f"{start:012d}.npy", lambda p: _save_npy(p, text))
        return {"rows": np.array([stop - start]), "seconds_compute": np.array([t1 - t0]), "seconds_write": np.array([time.perf_counter() - t1])}


def build_index_files(run_dir: str, num_items: int, kind: str, params: dict, with_text: bool) -> dict[str, float]:
    """Ray task: the item index from the item parts (checked to cover rows 0..num_items-1 in
    order) into index/items.faiss, and the text parts joined into index/text.npy."""
    t0 = time.perf_counter()
    root = Path(run_dir)
    parts = sorted((root / ITEM_EMBEDDINGS).glob("part-*.parquet"))
    starts = [int(p.stem.removeprefix("part-")) for p in parts]
    matrices = [list_matrix(pq.read_table(p, columns=["embedding"])["embedding"], p, "embedding", np.float32) for p in parts]
    sizes = [len(m) for m in matrices]
    if starts != list(np.cumsum([0, *sizes[:-1]])) or sum(sizes) != num_items:
        raise RuntimeError(f"{root / ITEM_EMBEDDINGS}: parts at rows {starts} of {sizes} rows do not cover the catalog's {num_items} items in order")
    vectors = np.concatenate(matrices)
    del matrices
    index = build_index(vectors, kind, **params)
    del vectors
    (root / INDEX_DIR).mkdir(exist_ok=True)
    _write_atomic(root / INDEX_DIR / INDEX_FILE, lambda p: faiss.write_index(index, str(p)))
    t1 = time.perf_counter()
    if with_text:
        text_parts = [root / INDEX_DIR / TEXT_PARTS / f"{s:012d}.npy" for s in starts]
        first = np.load(text_parts[0], mmap_mode="r")

        def join(path: Path) -> None:
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, first.shape[1]))
            for start, part in zip(starts, text_parts):
                block = np.load(part, mmap_mode="r")
                out[start : start + len(block)] = block
            out.flush()
            del out

        _write_atomic(root / INDEX_DIR / TEXT_FILE, join)
        for part in text_parts:
            part.unlink()
        (root / INDEX_DIR / TEXT_PARTS).rmdir()
    return {"seconds_index": t1 - t0, "seconds_text": time.perf_counter() - t1}


class UserPart:
    """Ray Data actor: the model once, the index and the catalog's text encodings memory-mapped,
    then per piece of user rows: read those rows' histories, embed, search the unseen top-k,
    write the piece's recommendations and user vectors."""

    def __init__(self, bundle_path: str, run_dir: str, device: str, batch_size: int, top_k: int, max_seq_len: int, num_items: int, with_text: bool):
        torch.set_grad_enabled(False)
        self.model = load_embedding_model(bundle_path, device)
        self.temperature = np.float32(float(self.model.temperature))
        self.bundle = Path(bundle_path)
        self.run_dir, self.batch_size, self.top_k, self.max_seq_len, self.num_items = Path(run_dir), batch_size, top_k, max_seq_len, num_items
        index_dir = self.run_dir / INDEX_DIR
        self.index = faiss.read_index(str(index_dir / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        self.encoded = None
        if with_text:
            text = np.load(index_dir / TEXT_FILE, mmap_mode="c")  # copy-on-write: never written, so the pages stay the file's
            self.encoded = (torch.arange(len(text), device=device), torch.from_numpy(text).to(device))
        self.item_ids = pq.read_table(Path(bundle_path) / CATALOG, columns=["item_id"])["item_id"].combine_chunks().cast(pa.string())

    def _histories(self, start: int, stop: int) -> tuple[pa.Array, SeenItems]:
        user_ids, offsets, values = read_user_rows(self.bundle, self.num_items, start, stop)
        counts = np.diff(offsets)
        if len(counts) and counts.min() == 0:  # named by its row of the file, not of the piece
            raise BundleError(self.bundle / USERS, f"row {start + int(np.argmin(counts))} has an empty history; it cannot be embedded")
        return user_ids, SeenItems(offsets, values)

    def _record(self, start: int, stop: int) -> None:
        """One line per piece in ``<run>/shards/users-<pid>.jsonl``: which node and process wrote which users."""
        import json

        import ray

        folder = self.run_dir / SHARDS_DIR
        folder.mkdir(exist_ok=True)
        line = {"start": start, "stop": stop, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        with open(folder / f"users-{os.getpid()}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        start, stop = _piece(batch)
        user_ids, seen = self._histories(start, stop)
        users = user_histories(seen, self.max_seq_len)
        vectors = embed_all_users(self.model, users, self.batch_size, encoded=self.encoded)
        t1 = time.perf_counter()
        ids, inner = search_unseen(self.index, vectors, users.seen, self.top_k)
        scores = inner / self.temperature
        t2 = time.perf_counter()
        recs = recommendations_table(user_ids, ids, scores, self.item_ids)
        _write_atomic(self.run_dir / RECOMMENDATIONS / part_name(start), lambda p: pq.write_table(recs, p))
        emb = pa.table({"user_id": user_ids, "embedding": vector_column(vectors)})
        _write_atomic(self.run_dir / USER_EMBEDDINGS / part_name(start), lambda p: pq.write_table(emb, p))
        lengths = (ids >= 0).sum(axis=1)
        self._record(start, stop)
        return {
            "rows": np.array([stop - start]),
            "listed": np.array([int(lengths.sum())]),
            "short": np.array([int((lengths < self.top_k).sum())]),
            "seconds_embed": np.array([t1 - t0]),
            "seconds_search": np.array([t2 - t1]),
            "seconds_write": np.array([time.perf_counter() - t2]),
        }


def _run_pool(cfg: DictConfig, rows: list[tuple[int, int]], actor: type, kwargs: dict) -> dict[str, float]:
    """``actor`` over the pieces ``rows`` on ``infer.num_actors`` actors; the per-piece rows it
    returns, summed by column. The pieces are put by this process (no read tasks: they would wait
    for a CPU that the actors hold on a cluster of ``num_actors`` CPUs)."""
    import ray

    i = cfg.infer
    ds = ray.data.from_items([{"start": a, "stop": b} for a, b in rows], override_num_blocks=len(rows))
    out = ds.map_batches(
        actor,
        fn_constructor_kwargs=kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(i.num_actors, len(rows))),
        num_cpus=i.cpus_per_actor,
        num_gpus=i.gpus_per_actor,
        batch_format="numpy",
    )
    got = out.take_all()
    if len(got) != len(rows):
        raise RuntimeError(f"{actor.__name__}: {len(got)} of {len(rows)} pieces came back")
    return {name: float(sum(r[name] for r in got)) for name in got[0]} if got else {}


def sharded_batch_infer(cfg: DictConfig, bundle_path: Path, run_dir: Path, choice_of: Callable[[DictConfig, int], IndexChoice]) -> dict[str, float]:
    """Embed, index, search and write on Ray without gathering on the driver; the counts and
    timings of metrics.json. Runs inside a Ray session. ``choice_of``: the index for a catalog
    size (batch_inference.index_choice)."""
    import ray

    t_start = time.perf_counter()
    bundle_path = bundle_path.resolve()
    manifest = read_manifest(bundle_path)
    verify_files(bundle_path, manifest, [USERS])  # the actors check the model's files themselves
    num_items, num_users = int(manifest["num_items"]), int(manifest["num_users"])
    footer_rows = pq.ParquetFile(bundle_path / USERS).metadata.num_rows
    if footer_rows != num_users:
        raise BundleError(bundle_path / USERS, f"has {footer_rows} rows; manifest.json says {num_users} users")
    with_text = "token_ids" in pq.read_schema(bundle_path / CATALOG).names
    max_seq_len = int(manifest["inputs"]["max_seq_len"])
    for name in (ITEM_EMBEDDINGS, RECOMMENDATIONS, USER_EMBEDDINGS):
        (run_dir / name).mkdir()
    if with_text:
        (run_dir / INDEX_DIR / TEXT_PARTS).mkdir(parents=True)
    i = cfg.infer
    device = _device(i.gpus_per_actor)
    common = {"bundle_path": str(bundle_path), "run_dir": str(run_dir.resolve()), "device": device, "batch_size": int(i.batch_size)}
    item_pieces, user_pieces = pieces(num_items, i.num_actors), pieces(num_users, i.num_actors)
    log.info("batch_infer (sharded): %d items in %d pieces, %d users in %d pieces", num_items, len(item_pieces), num_users, len(user_pieces))
    t_loaded = time.perf_counter()

    items = _run_pool(cfg, item_pieces, CatalogPart, common)
    t_items = time.perf_counter()
    choice = choice_of(cfg, num_items)
    task = ray.remote(num_cpus=max(1.0, float(i.cpus_per_actor)))(build_index_files)
    index = ray.get(task.remote(str(run_dir.resolve()), num_items, choice.kind, dict(choice.params), with_text))
    t_index = time.perf_counter()
    users = _run_pool(
        cfg,
        user_pieces,
        UserPart,
        common | {"top_k": int(i.top_k), "max_seq_len": max_seq_len, "num_items": num_items, "with_text": with_text},
    )
    t_users = time.perf_counter()
    if int(items["rows"]) != num_items or int(users["rows"]) != num_users:
        raise RuntimeError(f"the actors wrote {int(items['rows'])} of {num_items} items and {int(users['rows'])} of {num_users} users")
    log.info(
        "sharded: catalog %.2fs, index %s %s %.2fs, users %.2fs (embed %.2fs, search %.2fs, write %.2fs summed over actors)",
        t_items - t_loaded,
        choice.kind,
        choice.params,
        t_index - t_items,
        t_users - t_index,
        users["seconds_embed"],
        users["seconds_search"],
        users["seconds_write"],
    )
    return {
        "infer/num_users": float(num_users),
        "infer/num_items": float(num_items),
        "infer/top_k": float(i.top_k),
        "infer/mean_list_length": users["listed"] / num_users if num_users else 0.0,
        "infer/num_short_lists": users["short"],
        "infer/sharded": 1.0,
        "infer/num_item_pieces": float(len(item_pieces)),
        "infer/num_user_pieces": float(len(user_pieces)),
        "infer/seconds_load": t_loaded - t_start,  # the manifest, users.parquet's checksum and footer
        # wall time of each stage, actors' start included
        "infer/seconds_items_stage": t_items - t_loaded,
        "infer/seconds_index_stage": t_index - t_items,
        "infer/seconds_users_stage": t_users - t_index,
        # inside the stages, summed over actors (or the index task)
        "infer/seconds_embed_items": items["seconds_compute"],
        "infer/seconds_build_index": index["seconds_index"],
        "infer/seconds_join_text": index["seconds_text"],
        "infer/seconds_embed_users": users["seconds_embed"],
        "infer/seconds_search": users["seconds_search"],
        "infer/seconds_write": items["seconds_write"] + users["seconds_write"],
        "infer/seconds_total": time.perf_counter() - t_start,
    }
