"""Batch inference that never gathers on the driver (``infer.sharded=true``, on Ray).

Three Ray stages, each reading its own inputs from the bundle's files and writing its own outputs
into the run folder (on a cluster: shared storage that every node reaches):

1. **catalog**: a pool of ``infer.num_actors`` Ray Data actors, each given pieces of item rows,
   encodes their text once, embeds them, and writes ``item_embeddings.parquet/part-<first
   row>.parquet`` and, for a text tower, the pooled text encodings of those rows;
2. **index**: Ray tasks build the FAISS index (``infer.index``) from the item parts: one trains
   it on a sample (the rows ``faiss_index.training_rows`` picks, read part by part), then one per
   shard of ``infer.index.shard_items`` rows adds its own parts to a copy of it and writes
   ``index/items.faiss`` (one shard) or ``index/items-<s>.faiss``, in parallel across the nodes;
   ``index/shards.json`` lists them. Another task joins the text parts into ``index/text.npy``
   block by block;
3. **users**: a pool of actors, each given pieces of user rows, reads only those rows of the
   bundle's users.parquet (ids and whole histories), memory-maps the index's shards (searched
   as one ``faiss.IndexShards``, ids offset to catalog rows) and the text
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

import json
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
from inference.faiss_index import NLIST, IndexChoice, SeenItems, open_shards, search_unseen, trained_index, training_rows

log = logging.getLogger(__name__)

PIECE_ROWS = 65_536  # users or items per piece handed to an actor (at least one piece per actor)
RECOMMENDATIONS = "recommendations.parquet"
ITEM_EMBEDDINGS = "item_embeddings.parquet"
USER_EMBEDDINGS = "user_embeddings.parquet"
INDEX_DIR = "index"
INDEX_FILE = "items.faiss"  # the index when it is one shard; items-<s>.faiss for shard s of several
TRAINED_FILE = "trained.faiss"  # the trained, empty index that every shard copies (removed once they are written)
SHARD_LIST = "shards.json"  # the shard files in row order, written once every shard is
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


def index_shards(item_pieces: list[tuple[int, int]], shard_items: int) -> list[list[tuple[int, int]]]:
    """The catalog's pieces (start, stop), in order, grouped into index shards of at least
    ``shard_items`` rows each (the last one may be smaller): whole pieces, so a shard's task reads
    whole item parts."""
    shards: list[list[tuple[int, int]]] = [[]]
    for piece in item_pieces:
        if shards[-1] and shards[-1][-1][1] - shards[-1][0][0] >= shard_items:
            shards.append([])
        shards[-1].append(piece)
    return [s for s in shards if s]


def _item_part(root: Path, start: int, stop: int) -> np.ndarray:
    """The item vectors of catalog rows start..stop-1, from the catalog stage's part of that piece."""
    path = root / ITEM_EMBEDDINGS / part_name(start)
    if not path.is_file():
        raise RuntimeError(f"{path}: the catalog stage wrote no part for item rows {start}..{stop - 1}")
    matrix = list_matrix(pq.read_table(path, columns=["embedding"])["embedding"], path, "embedding", np.float32)
    if len(matrix) != stop - start:
        raise RuntimeError(f"{path}: {len(matrix)} rows, expected {stop - start} (item rows {start}..{stop - 1})")
    return matrix


def train_index_file(run_dir: str, num_items: int, item_pieces: list[tuple[int, int]], kind: str, params: dict) -> dict[str, float]:
    """Ray task: the empty index of ``kind`` trained on the catalog's training rows alone
    (faiss_index.training_rows: at most 64 per list), read part by part, into index/trained.faiss."""
    t0 = time.perf_counter()
    root = Path(run_dir)
    rows = training_rows(num_items, kind, int(params.get("nlist", NLIST)))
    blocks = []
    for start, stop in item_pieces:
        if rows is None:  # flat, hnsw: nothing to train, the dimension from one row
            blocks.append(_item_part(root, start, stop)[:1])
            break
        wanted = rows[(rows >= start) & (rows < stop)]
        if len(wanted):
            blocks.append(_item_part(root, start, stop)[wanted - start])
    sample = np.concatenate(blocks)
    index = trained_index(sample, kind, num_items, **params)
    (root / INDEX_DIR).mkdir(exist_ok=True)
    _write_atomic(root / INDEX_DIR / TRAINED_FILE, lambda p: faiss.write_index(index, str(p)))
    return {"seconds": time.perf_counter() - t0, "rows": float(len(sample))}


def add_index_shard(run_dir: str, name: str, item_pieces: list[tuple[int, int]]) -> dict:
    """Ray task: a copy of the trained index with the item vectors of ``item_pieces`` (consecutive
    catalog rows) added, written as index/``name``; holds one shard's vectors, not the catalog's."""
    import ray

    t0 = time.perf_counter()
    root = Path(run_dir)
    index = faiss.read_index(str(root / INDEX_DIR / TRAINED_FILE))
    for start, stop in item_pieces:
        index.add(_item_part(root, start, stop))
    _write_atomic(root / INDEX_DIR / name, lambda p: faiss.write_index(index, str(p)))
    return {"seconds": time.perf_counter() - t0, "rows": index.ntotal, "node": ray.get_runtime_context().get_node_id()}


def join_text_file(run_dir: str, num_items: int, item_pieces: list[tuple[int, int]]) -> float:
    """Ray task: the catalog stage's text parts joined block by block into index/text.npy (a
    memory-mapped file, never whole in memory); returns its seconds."""
    t0 = time.perf_counter()
    root = Path(run_dir)
    text_parts = [root / INDEX_DIR / TEXT_PARTS / f"{start:012d}.npy" for start, _ in item_pieces]
    first = np.load(text_parts[0], mmap_mode="r")

    def join(path: Path) -> None:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(num_items, first.shape[1]))
        for (start, stop), part in zip(item_pieces, text_parts):
            block = np.load(part, mmap_mode="r")
            if len(block) != stop - start:
                raise RuntimeError(f"{part}: {len(block)} rows, expected {stop - start} (item rows {start}..{stop - 1})")
            out[start:stop] = block
        out.flush()
        del out

    _write_atomic(root / INDEX_DIR / TEXT_FILE, join)
    for part in text_parts:
        part.unlink()
    (root / INDEX_DIR / TEXT_PARTS).rmdir()
    return time.perf_counter() - t0


def open_item_index(run_dir: Path, num_items: int) -> faiss.Index:
    """The index the index stage wrote (index/shards.json: its shard files in row order), every
    shard memory-mapped read-only; checked to hold the catalog's ``num_items`` rows."""
    listing = run_dir / INDEX_DIR / SHARD_LIST
    if not listing.is_file():
        raise RuntimeError(f"{listing}: missing; the index stage did not finish")
    files = json.loads(listing.read_text())["files"]
    index = open_shards([run_dir / INDEX_DIR / f for f in files])
    if index.ntotal != num_items:
        raise RuntimeError(f"{listing}: its {len(files)} shard(s) hold {index.ntotal} items, the catalog has {num_items}")
    return index


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
        self.index = open_item_index(self.run_dir, num_items)
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
        # one piece in flight per actor: the next piece waits for an idle actor, on any node. With
        # Ray Data's default of several, the first actor ready (on the driver's node, where the
        # pieces are put) could queue them all: at 5 M interactions both pieces went to one actor
        compute=ray.data.ActorPoolStrategy(size=min(i.num_actors, len(rows)), max_tasks_in_flight_per_actor=1),
        num_cpus=i.cpus_per_actor,
        num_gpus=i.gpus_per_actor,
        batch_format="numpy",
    )
    got = out.take_all()
    if len(got) != len(rows):
        raise RuntimeError(f"{actor.__name__}: {len(got)} of {len(rows)} pieces came back")
    return {name: float(sum(r[name] for r in got)) for name in got[0]} if got else {}


def build_item_index(
    run_dir: Path, num_items: int, item_pieces: list[tuple[int, int]], choice: IndexChoice, shard_items: int, cpus: float, with_text: bool
) -> dict[str, float]:
    """The index stage, as Ray tasks (none on the driver, which only lists file names): the index
    trained once on a sample of the item parts, then one task per shard of ``shard_items`` rows
    adding its own parts to a copy of it, in parallel across the nodes, beside the text join;
    index/shards.json names the shards once all are written. Returns its timings and counts."""
    import ray

    root = str(run_dir.resolve())
    remote = ray.remote(num_cpus=max(1.0, cpus))
    text = remote(join_text_file).remote(root, num_items, item_pieces) if with_text else None
    trained = ray.get(remote(train_index_file).remote(root, num_items, item_pieces, choice.kind, dict(choice.params)))
    groups = index_shards(item_pieces, shard_items)
    names = [INDEX_FILE] if len(groups) == 1 else [f"items-{s:05d}.faiss" for s in range(len(groups))]
    shards = ray.get([remote(add_index_shard).remote(root, name, group) for name, group in zip(names, groups)])
    if sum(s["rows"] for s in shards) != num_items:
        raise RuntimeError(f"the index shards hold {sum(s['rows'] for s in shards)} items, the catalog has {num_items}")
    folder = run_dir / INDEX_DIR
    listing = {"files": names, "rows": [s["rows"] for s in shards], "kind": choice.kind, "params": dict(choice.params)}
    _write_atomic(folder / SHARD_LIST, lambda p: p.write_text(json.dumps(listing, indent=1)))
    (folder / TRAINED_FILE).unlink()
    log.info("index: %d shard(s) of %s built on %d node(s)", len(shards), [s["rows"] for s in shards], len({s["node"] for s in shards}))
    return {
        "seconds_train": trained["seconds"],
        "seconds_shards": sum(s["seconds"] for s in shards),
        "shards": float(len(shards)),
        "seconds_text": ray.get(text) if text is not None else 0.0,
    }


def sharded_batch_infer(cfg: DictConfig, bundle_path: Path, run_dir: Path, choice_of: Callable[[DictConfig, int], IndexChoice]) -> dict[str, float]:
    """Embed, index, search and write on Ray without gathering on the driver; the counts and
    timings of metrics.json. Runs inside a Ray session. ``choice_of``: the index for a catalog
    size (batch_inference.index_choice)."""

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
    index = build_item_index(run_dir, num_items, item_pieces, choice, int(i.index.shard_items), float(i.cpus_per_actor), with_text)
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
        "infer/seconds_build_index": index["seconds_train"] + index["seconds_shards"],
        "infer/num_index_shards": index["shards"],
        "infer/seconds_join_text": index["seconds_text"],
        "infer/seconds_embed_users": users["seconds_embed"],
        "infer/seconds_search": users["seconds_search"],
        "infer/seconds_write": items["seconds_write"] + users["seconds_write"],
        "infer/seconds_total": time.perf_counter() - t_start,
    }
