"""FAISS inner-product indexes over item vectors and top-K search that skips each user's seen items."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import faiss
import numpy as np

INDEX_KINDS = ("flat", "ivf", "hnsw", "ivfpq")
NLIST = 64  # IVF lists when none are given

# infer.index.kind=auto: exact search up to this many items, IVF-PQ with exact re-ranking above
# (bench/scale.py measures every kind; docs/benchmarks.md, "Scale")
AUTO_EXACT_MAX_ITEMS = 100_000
# refine 8 x k, not 16: on a quiet machine the re-ranking's random reads were the slowest part
# (1M items: recall@100 0.975 at 5,547 q/s against 0.991 at 4,185 q/s, exact 390-450 q/s)
AUTO_IVFPQ = {"nprobe": 256, "refine_factor": 8}


@dataclass(frozen=True)
class IndexChoice:
    kind: str
    params: dict = field(default_factory=dict)


def auto_index(num_items: int, exact_max_items: int = AUTO_EXACT_MAX_ITEMS) -> IndexChoice:
    """The index ``infer.index.kind=auto`` builds for a catalog of ``num_items``: exact (flat) while
    a full scan is cheap, IVF-PQ with exact re-ranking beyond (2 sqrt(N) lists), at the setting
    that bench/scale.py measured to keep recall@100 >= 0.95 against exact search at 1M items."""
    if num_items <= exact_max_items:
        return IndexChoice("flat")
    return IndexChoice("ivfpq", {"nlist": int(2 * np.sqrt(num_items))} | AUTO_IVFPQ)


def build_index(vectors: np.ndarray, kind: str = "flat", **params: Any) -> faiss.Index:
    """An inner-product index over ``vectors`` [N, d]; row i gets id i. ``params``: the settings
    of :func:`trained_index` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ``pq_m``, ``refine_factor``).

    ``flat``: exact (IndexFlatIP). ``ivf``: IndexIVFFlat with ``nlist`` lists (capped to N), ``nprobe``
    probed per query. ``ivfpq``: IVF with 4-bit product-quantized codes and exact re-ranking (see
    :func:`trained_index`). ``hnsw``: IndexHNSWFlat by inner product with ``hnsw_m`` links per node and
    ``ef_search`` (graph built at faiss's default efConstruction 40: on vectors shaped like a
    trained model's, larger values and the reduction to Euclidean search both measured lower recall).
    The IVF kinds are trained on the rows :func:`training_rows` picks. The same index, built in
    shards that are added in parallel, is :func:`trained_index` + :func:`open_shards`.
    """
    x = _checked(vectors)
    rows = training_rows(len(x), kind, params.get("nlist", NLIST))
    index = trained_index(x if rows is None else x[rows], kind, len(x), **params)
    index.add(x)
    return index


def _checked(vectors: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"item vectors must be a non-empty [num_items, dim] matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("item vectors contain NaN or inf; the model produced broken embeddings")
    return x


def _lists(kind: str, num_items: int, nlist: int) -> int:
    if kind == "ivfpq":
        return max(1, min(nlist, num_items // 39))  # k-means wants about 39 points per list
    return min(nlist, num_items)


def training_rows(num_items: int, kind: str, nlist: int = NLIST) -> np.ndarray | None:
    """The catalog rows an index of ``kind`` over ``num_items`` items is trained on, sorted: every
    row up to 64 per list, else 64 per list drawn with a fixed seed (so a sharded build, which
    reads only these rows, trains the index the whole-catalog build trains); None for the kinds
    that train on nothing (flat, hnsw)."""
    kind = str(getattr(kind, "value", kind))
    if kind not in ("ivf", "ivfpq"):
        return None
    lists = _lists(kind, num_items, nlist)
    if num_items <= 64 * lists:
        return np.arange(num_items)
    return np.sort(np.random.default_rng(0).choice(num_items, 64 * lists, replace=False))


def trained_index(
    sample: np.ndarray,
    kind: str,
    num_items: int,
    nlist: int = NLIST,
    nprobe: int = 8,
    hnsw_m: int = 32,
    ef_search: int = 128,
    pq_m: int | None = None,
    refine_factor: int = 8,
) -> faiss.Index:
    """An empty inner-product index of ``kind`` for a catalog of ``num_items`` items, trained on
    ``sample`` (the vectors of :func:`training_rows`; for flat and hnsw only their dimension is
    used). Items are then added to it, or to copies of it, one per shard (:func:`open_shards`).

    ``ivfpq``: IVF over ``nlist`` lists with 4-bit product-quantized codes scanned by SIMD
    (fast-scan), and the ``refine_factor`` x k best candidates re-ranked by their exact inner
    product, so the scores returned are exact. ``pq_m`` sub-quantizers (null: one per 2 dimensions)."""
    kind = str(getattr(kind, "value", kind))
    x = _checked(sample)
    d = x.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = ef_search
        return hnsw
    if kind not in ("ivf", "ivfpq"):
        raise ValueError(f"build_index: kind must be one of {INDEX_KINDS}, got {kind!r}")
    lists = _lists(kind, num_items, nlist)
    if kind == "ivf":
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x)
        ivf.nprobe = min(nprobe, lists)
        return ivf
    m = pq_m or (d // 2 if d % 2 == 0 else d)
    if d % m:
        raise ValueError(f"infer.index.pq_m={m} must divide the vector dimension {d}")
    # index_factory is typed to return Index; faiss hands back the concrete class, here the
    # IndexRefineFlat that the ",RFlat" suffix wraps around the IVF index
    index = cast(faiss.IndexRefineFlat, faiss.index_factory(d, f"IVF{lists},PQ{m}x4fs,RFlat", faiss.METRIC_INNER_PRODUCT))
    index.train(x)
    faiss.extract_index_ivf(index).nprobe = min(nprobe, lists)
    index.k_factor = refine_factor
    return index


def open_shards(paths: Sequence[str | Path], mmap: bool = True) -> faiss.Index:
    """The index whose shards (each a copy of one trained index with a consecutive block of the
    catalog's rows added) are the files ``paths``, in row order: the one shard itself, or a
    ``faiss.IndexShards`` that searches every shard and merges their results, shard s's ids
    offset by the rows of the shards before it, so ids are catalog rows as in one index. With
    ``mmap`` each file is memory-mapped read-only: the processes of a node share its pages."""
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    indexes = [faiss.read_index(str(p), flags) for p in paths]
    if not indexes:
        raise ValueError("open_shards: no index files given")
    if len(indexes) == 1:
        return indexes[0]
    # faiss's defaults: not threaded (faiss's own threads search each shard), successive ids
    shards = faiss.IndexShards(indexes[0].d)
    if not shards.successive_ids:
        raise RuntimeError("faiss.IndexShards: this faiss does not default to successive ids")
    for index in indexes:
        shards.add_shard(index)  # faiss's Python wrapper keeps a reference to each shard
    return shards


@dataclass(frozen=True)
class SeenItems:
    """Every user's seen items as one flat array: row ``r``'s are ``items[offsets[r]:offsets[r + 1]]``
    (CSR), so a million users are two arrays, not a million Python objects."""

    offsets: np.ndarray  # [U + 1] int64, non-decreasing, offsets[0] == 0
    items: np.ndarray  # [offsets[-1]] int64

    @classmethod
    def from_lists(cls, seen: Sequence[np.ndarray]) -> SeenItems:
        """One array per user (any ints, duplicates and out-of-range values allowed)."""
        arrays = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seen]
        counts = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        items = np.concatenate(arrays) if counts.sum() else np.zeros(0, np.int64)
        return cls(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), items)

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    def row(self, r: int) -> np.ndarray:
        return self.items[self.offsets[r] : self.offsets[r + 1]]

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, r: int) -> np.ndarray:
        if not -self.num_rows <= r < self.num_rows:
            raise IndexError(f"row {r} of {self.num_rows}")
        return self.row(r % self.num_rows)

    def keys(self, num_items: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct in-range (row, item) pairs as sorted keys ``row * num_items + item``, and
        the count per row: one sort over every user at once."""
        rows = np.repeat(np.arange(self.num_rows, dtype=np.int64), np.diff(self.offsets))
        ok = (self.items >= 0) & (self.items < num_items)
        keys = np.unique(rows[ok] * num_items + self.items[ok])
        return keys, np.bincount(keys // max(num_items, 1), minlength=self.num_rows).astype(np.int64)


def _gather(keys: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``keys[starts[i] : starts[i] + counts[i]]`` for every i, concatenated, without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=keys.dtype)
    first = np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return keys[first + np.arange(total)]


def _drop_seen(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray, seen_keys: np.ndarray, num_items: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove seen items (keys ``row * num_items + item`` of these ``rows``) and FAISS's -1 fillers
    from sorted result rows; keep the first ``k``."""
    hit_keys = rows.astype(np.int64)[:, None] * num_items + ids
    drop = (ids < 0) | np.isin(hit_keys, seen_keys)
    order = np.argsort(drop, axis=1, kind="stable")[:, :k]  # kept hits first, in FAISS's (best-first) order
    out_ids = np.take_along_axis(np.where(drop, -1, ids), order, axis=1)
    out_scores = np.take_along_axis(np.where(drop, -np.inf, scores), order, axis=1).astype(np.float32)
    if out_ids.shape[1] < k:  # fewer candidates than k (tiny catalog): pad
        pad = k - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=-1)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    return out_ids, out_scores


def search_unseen(
    index: faiss.Index, queries: np.ndarray, seen: Sequence[np.ndarray] | SeenItems, k: int, rows_per_search: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` items per query by inner product, best first, never an item of the query's seen
    items (``seen``: one array per query, or a :class:`SeenItems`).

    Returns ``(ids, scores)``, both [U, k]; where fewer than ``k`` unseen items are found the rows
    end with id -1 and score -inf. Each query is searched ``k + (its seen count)`` deep (queries
    are grouped by seen count so one search call of ``rows_per_search`` queries serves similar
    depths), capped at the index size. Memory beyond the results is per search call, not per user.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise ValueError(f"user vectors must be [num_users, {index.d}] to match the item index, got shape {q.shape}")
    seen = seen if isinstance(seen, SeenItems) else SeenItems.from_lists(seen)
    if seen.num_rows != q.shape[0]:
        raise ValueError(f"need one seen-item list per user: {q.shape[0]} users, {seen.num_rows} seen lists")
    if k < 1:
        raise ValueError(f"search_unseen: k must be >= 1, got {k}")
    n = index.ntotal
    ids = np.full((q.shape[0], k), -1, dtype=np.int64)
    scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
    if q.shape[0] == 0:
        return ids, scores
    keys, seen_counts = seen.keys(n)
    key_starts = np.concatenate([[0], np.cumsum(seen_counts)[:-1]]).astype(np.int64)
    by_depth = np.argsort(seen_counts, kind="stable")
    for start in range(0, len(by_depth), rows_per_search):
        rows = by_depth[start : start + rows_per_search]
        depth = int(min(n, k + seen_counts[rows].max()))
        found_scores, found_ids = index.search(q[rows], depth)
        rows_keys = _gather(keys, key_starts[rows], seen_counts[rows])
        ids[rows], scores[rows] = _drop_seen(rows, found_ids, found_scores, rows_keys, n, k)
    return ids, scores
