"""Raw dataset -> Parquet files with dense indices (raw ids kept) and the leave-one-out split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.leave_one_out import argsort_pairs, leave_one_out_split, time_rank
from datamodules.ragged import gc_paused
from datamodules.raw_dataset import DataFormatError, RawDataset

log = logging.getLogger(__name__)

FILES = ("interactions.parquet", "items.parquet", "users.parquet", "split.parquet")
# what data.engine=ray writes instead (datamodules/sharded_prepare.py): the items and a folder of
# Parquet parts with one row per user (the whole history, its split positions)
SEQUENCES = "sequences"
SHARDED_FILES = ("items.parquet", SEQUENCES)


@dataclass(frozen=True)
class PreparedDataset:
    """Where a prepared dataset lives and its sizes."""

    folder: Path
    num_users: int
    num_items: int
    num_interactions: int


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.partial")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(path)


def arrow_strings(values: pd.Series, where: str, field: str) -> pa.Array:
    """One Arrow string array of an id column: Arrow-backed strings as they are (large_string),
    object strings converted once (string, as pandas writes them); a missing id is an error
    naming its row."""
    arr = pa.array(values, from_pandas=True)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.null_count:
        row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise DataFormatError(where, f"interaction row {row} has no {field}", field=field)
    return arr if arr.type in (pa.string(), pa.large_string()) else pc.cast(arr, pa.large_string())


def _codes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The int64 NumPy view of integer Arrow data (nulls must have been ruled out)."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def _first_in_time(user: np.ndarray, item: np.ndarray, timestamp: np.ndarray, num_items: int) -> np.ndarray | None:
    """Mask of the first interaction in time (file order breaking ties) of every (user, item)
    pair, or None when no pair repeats (one integer sort tells)."""
    key = user * num_items + item
    if not (np.diff(np.sort(key)) == 0).any():
        return None
    by_key = np.argsort(key)
    new_pair = np.ones(len(key), dtype=bool)
    new_pair[1:] = key[by_key[1:]] != key[by_key[:-1]]
    pair = np.empty(len(key), dtype=np.int64)  # dense pair number, so (pair, time rank) fits one int64
    pair[by_key] = np.cumsum(new_pair) - 1
    del key, by_key, new_pair
    perm = argsort_pairs(pair, time_rank(timestamp))
    first = np.ones(len(perm), dtype=bool)
    first[1:] = pair[perm[1:]] != pair[perm[:-1]]
    keep = np.zeros(len(perm), dtype=bool)
    keep[perm[first]] = True
    return keep


@dataclass
class IndexedInteractions:
    """Interactions with dense indices, in input order, after dedupe and the short-user filter:
    columns user_idx, item_idx (int64), user_id (Arrow strings), timestamp, order (int64: the row's
    place in the input), and item_id when the raw ids were given."""

    frame: pd.DataFrame
    user_ids: pa.Array  # raw id of each user_idx, numbered by first appearance
    dropped_repeats: int
    dropped_users: int
    dropped_rows: int
    short_user_ids: pa.Array  # the dropped users' raw ids, and their interactions after dedupe
    short_sizes: np.ndarray


def index_coded(user_ids: pa.Array, item: np.ndarray, timestamp: np.ndarray, num_items: int, min_user_interactions: int, dedupe: bool) -> IndexedInteractions:
    """The column code of preparation, on rows whose items are already catalog indices: dense user
    indices (by first appearance), dedupe and the short-user filter, with Arrow hashing and NumPy
    integer sorts, so no Python object is made per interaction. Every row may be dropped (an empty
    frame): callers say whether that is an error."""
    encoded = pc.dictionary_encode(user_ids)
    user = _codes(encoded.indices)
    keep = _first_in_time(user, item, timestamp, num_items) if dedupe else None
    if keep is None:
        keep = np.ones(len(user), dtype=bool)
    dropped_repeats = int(len(keep) - np.count_nonzero(keep))
    sizes = np.bincount(user[keep], minlength=len(encoded.dictionary))
    short = (sizes > 0) & (sizes < min_user_interactions)
    keep &= ~short[user]
    rows = np.flatnonzero(keep)
    # users numbered by first appearance among the kept rows (a hash keeps first-seen order)
    kept_user = user[rows]
    first_seen = _codes(pc.unique(pa.array(kept_user, type=pa.int64())))
    renumber = np.full(len(encoded.dictionary), -1, dtype=np.int64)
    renumber[first_seen] = np.arange(len(first_seen), dtype=np.int64)
    frame = pd.DataFrame(
        {
            "user_idx": renumber[kept_user],
            "item_idx": item[rows],
            "user_id": user_ids.take(pa.array(rows)).to_pandas(),
            "timestamp": timestamp[rows],
            "order": rows.astype(np.int64),
        }
    )
    short_users = np.flatnonzero(short)
    return IndexedInteractions(
        frame,
        encoded.dictionary.take(pa.array(first_seen, type=pa.int64())).cast(pa.large_string()),
        dropped_repeats,
        int(short_users.size),
        int(sizes[short_users].sum()),
        encoded.dictionary.take(pa.array(short_users, type=pa.int64())).cast(pa.large_string()),
        sizes[short_users].astype(np.int64),
    )


def item_codes(item_ids: pa.Array, catalog: pa.Array, where: str, first_row: int = 0) -> np.ndarray:
    """The catalog index of each item id; an id not in the catalog is an error naming its row
    (``first_row`` + its position)."""
    item = np.asarray(pc.fill_null(pc.index_in(item_ids, value_set=catalog.cast(item_ids.type)), -1)).astype(np.int64)
    unknown = np.flatnonzero(item < 0)
    if unknown.size:
        row = int(unknown[0])
        raise DataFormatError(where, f"interaction row {first_row + row} names unknown item_id '{item_ids[row].as_py()}'", field="item_id")
    return item


def index_interactions(raw: RawDataset, catalog: pa.Array, min_user_interactions: int, dedupe: bool) -> IndexedInteractions:
    """:func:`index_coded` on a reader's in-memory interactions, their item ids looked up in
    ``catalog``; the frame keeps the raw item ids too."""
    inter = raw.interactions
    if len(inter) == 0:
        raise DataFormatError(raw.name, "there are no interactions")
    item_ids = arrow_strings(inter["item_id"], raw.name, "item_id")
    item = item_codes(item_ids, catalog, raw.name)
    user_ids = arrow_strings(inter["user_id"], raw.name, "user_id")
    indexed = index_coded(user_ids, item, inter["timestamp"].to_numpy(dtype=np.int64), len(catalog), min_user_interactions, dedupe)
    if len(indexed.frame) == 0:
        raise DataFormatError(raw.name, f"no user has at least {min_user_interactions} interactions")
    frame = indexed.frame
    frame.insert(3, "item_id", item_ids.take(pa.array(frame["order"].to_numpy())).to_pandas())
    return indexed


def items_table(name: str, items: pd.DataFrame) -> pd.DataFrame:
    """The prepared items table: the reader's items in their order, numbered, with a title
    (the text where a reader has none); an empty catalog or a repeated id is an error."""
    items = items.reset_index(drop=True)
    if items.empty:
        raise DataFormatError(name, "the item catalog is empty")
    dup = items["item_id"].duplicated()
    if dup.any():
        raise DataFormatError(name, f"duplicate item_id '{items.loc[dup, 'item_id'].iloc[0]}' in the items", field="item_id")
    with gc_paused():  # one list per item: see gc_paused
        return pd.DataFrame(
            {
                "item_idx": np.arange(len(items), dtype=np.int64),
                "item_id": items["item_id"].astype(str),
                "text": items["text"].astype(str),
                # a short display name (explanations, the service); readers without one: the text
                "title": (items["title"] if "title" in items.columns else items["text"]).astype(str),
                "categories": [list(c) if c is not None else [] for c in items["categories"]],
            }
        )


def prepare(raw: RawDataset, out_dir: str | Path, min_user_interactions: int = 3, dedupe: bool = True, fingerprint: str = "") -> PreparedDataset:
    """Write interactions/items/users/split Parquet files into ``out_dir`` and return their sizes.

    Items keep the item file's order (all of them form the catalog, interacted or not);
    users are numbered by first appearance. Duplicated (user, item) pairs keep their first
    interaction in time when ``dedupe``; users with fewer than ``min_user_interactions``
    are dropped. Both counts are logged and stored in ``meta.json``.
    """
    if min_user_interactions < 3:
        raise ValueError("data.min_user_interactions must be >= 3 (train, valid and test need one each)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items_out = items_table(raw.name, raw.items)
    catalog = pa.array(items_out["item_id"], type=pa.large_string())
    indexed = index_interactions(raw, catalog, min_user_interactions, dedupe)
    inter = indexed.frame
    if indexed.dropped_repeats or indexed.dropped_users:
        log.warning(
            "%s: dropped %d repeated (user, item) interactions and %d users (%d interactions) with fewer than %d interactions",
            raw.name,
            indexed.dropped_repeats,
            indexed.dropped_users,
            indexed.dropped_rows,
            min_user_interactions,
        )
    dropped_dupes, dropped_users = indexed.dropped_repeats, indexed.dropped_users
    num_users = len(indexed.user_ids)
    split = leave_one_out_split(inter[["user_idx", "item_idx", "timestamp", "order"]])

    users_out = pd.DataFrame(
        {
            "user_idx": np.arange(num_users, dtype=np.int64),
            "user_id": indexed.user_ids.to_pandas(),
            "num_interactions": np.bincount(inter["user_idx"].to_numpy(), minlength=num_users),
        }
    )
    write_atomic(inter, out / "interactions.parquet")
    write_atomic(items_out, out / "items.parquet")
    write_atomic(users_out, out / "users.parquet")
    write_atomic(split, out / "split.parquet")
    meta = {
        "name": raw.name,
        "fingerprint": fingerprint,
        "num_users": num_users,
        "num_items": len(items_out),
        "num_interactions": len(inter),
        "dropped_repeats": dropped_dupes,
        "dropped_users": dropped_users,
        "reader_skipped": raw.skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("%s prepared in %s: %d users, %d items, %d interactions", raw.name, out, num_users, len(items_out), len(inter))
    return PreparedDataset(out, num_users, len(items_out), len(inter))


def load_prepared(folder: str | Path, fingerprint: str | None = None) -> PreparedDataset | None:
    """The prepared dataset in ``folder`` if complete (and made with ``fingerprint``), else None."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if not all((folder / f).exists() for f in (SHARDED_FILES if meta.get("layout") == SEQUENCES else FILES)):
        return None
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        return None
    return PreparedDataset(folder, meta["num_users"], meta["num_items"], meta["num_interactions"])
