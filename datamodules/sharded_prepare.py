"""Preparation on Ray Data (``data.engine=ray``), for inputs no single process should hold.

The same column code as :func:`datamodules.preprocess.prepare`, run per bucket of users:

1. the interactions are read in pieces by Ray Data tasks (a Parquet row group each with
   :class:`~datamodules.parquet_dataset.ParquetFolder`, or the blocks of a reader's in-memory
   table); each task looks its item ids up in the catalog (built once on the driver and handed to
   every task by reference through the object store) and tags each row with its user's bucket,
   a hash of the raw user id;
2. Ray Data groups the rows by bucket (a shuffle of its own, on a column of ``num_buckets``
   values) and each bucket runs dedupe, the minimum-interactions filter, the users' numbering by
   first appearance and the leave-one-out split (:func:`prepare_bucket`);
3. the users' dense indices are their bucket's offset plus their number in the bucket, and the
   result is written as Parquet parts, one row per user (``sequences/``), beside ``items.parquet``.

A user's rows all land in one bucket, so every per-user rule gives what the single-process path
gives; only the numbering of users differs (bucket by bucket instead of by first appearance over
the whole input). The driver holds the catalog and per-bucket counts, never the interactions.
"""

from __future__ import annotations

import json
import logging
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from datamodules.leave_one_out import group_starts, user_time_order
from datamodules.parquet_dataset import ParquetFolder, Piece, id_strings
from datamodules.preprocess import SEQUENCES, PreparedDataset, arrow_strings, index_coded, item_codes, items_table, write_atomic
from datamodules.raw_dataset import DataFormatError, RawDataset

log = logging.getLogger(__name__)

KEYED = pa.schema([("bucket", pa.int32()), ("user_id", pa.large_string()), ("item_idx", pa.int64()), ("timestamp", pa.int64()), ("order", pa.int64())])
BUCKET_USERS = pa.schema(
    [
        ("bucket", pa.int32()),
        ("local_idx", pa.int64()),  # -1: a user dropped by the minimum-interactions filter
        ("user_id", pa.large_string()),
        ("num_interactions", pa.int64()),  # after dedupe
        ("item_idx", pa.large_list(pa.int64())),  # in time order (file order breaking ties)
        ("timestamp", pa.large_list(pa.int64())),
        ("valid_position", pa.int32()),
        ("test_position", pa.int32()),
    ]
)


def user_buckets(user_ids: pa.Array, num_buckets: int) -> np.ndarray:
    """The bucket of each raw user id: pandas' fixed-key SipHash of the string, so every process
    of every node gives a user the same bucket."""
    hashes = pd.util.hash_array(np.asarray(user_ids.to_numpy(zero_copy_only=False), dtype=object), categorize=False)
    return (hashes % np.uint64(num_buckets)).astype(np.int32)


def keyed_rows(rows: pa.Table, catalog: pa.Array, num_buckets: int, where: str, row_offset: int) -> pa.Table:
    """Rows ``user_id``, ``item_id``, ``timestamp``, ``order`` as :data:`KEYED` (item indices, user
    buckets); an unknown item id or a missing id names ``where`` and its row (``order`` +
    ``row_offset``)."""
    if rows.num_rows == 0:
        return KEYED.empty_table()
    first = int(rows["order"][0].as_py()) + row_offset  # the rows of one task are contiguous
    user_ids = id_strings(rows["user_id"], where, "user_id", first)
    item_ids = id_strings(rows["item_id"], where, "item_id", first)
    return pa.table(
        {
            "bucket": pa.array(user_buckets(user_ids, num_buckets)),
            "user_id": user_ids.cast(pa.large_string()),
            "item_idx": pa.array(item_codes(item_ids, catalog, where, first)),
            "timestamp": pc.cast(rows["timestamp"], pa.int64()).combine_chunks(),
            "order": rows["order"].combine_chunks(),
        },
        schema=KEYED,
    )


def prepare_bucket(rows: pa.Table, num_items: int, min_user_interactions: int, dedupe: bool) -> pa.Table:
    """One bucket's users as :data:`BUCKET_USERS`: today's column code on the bucket's rows put back
    in input order. Kept users are numbered from 0 by first appearance, with their whole history in
    time order; dropped ones (too few interactions) come with ``local_idx`` -1 and their count."""
    if rows.num_rows == 0:
        return BUCKET_USERS.empty_table()
    order = rows["order"].to_numpy()
    perm = np.argsort(order, kind="stable")
    rows = rows.take(pa.array(perm))
    bucket = int(rows["bucket"][0].as_py())
    user_ids = rows["user_id"].combine_chunks()
    indexed = index_coded(user_ids, rows["item_idx"].to_numpy(), rows["timestamp"].to_numpy(), num_items, min_user_interactions, dedupe)
    frame = indexed.frame
    by_user = user_time_order(frame["user_idx"].to_numpy(), frame["timestamp"].to_numpy(), frame["order"].to_numpy())
    offsets = group_starts(frame["user_idx"].to_numpy()[by_user])
    sizes = np.diff(offsets).astype(np.int64)
    kept = len(sizes)
    offsets_arr = pa.array(offsets, type=pa.int64())
    items = pa.LargeListArray.from_arrays(offsets_arr, pa.array(frame["item_idx"].to_numpy()[by_user], type=pa.int64()))
    times = pa.LargeListArray.from_arrays(offsets_arr, pa.array(frame["timestamp"].to_numpy()[by_user], type=pa.int64()))

    short_ids, short_sizes = indexed.short_user_ids, indexed.short_sizes
    empty = pa.LargeListArray.from_arrays(pa.array(np.zeros(len(short_ids) + 1, dtype=np.int64)), pa.array([], type=pa.int64()))
    return pa.concat_tables(
        [
            pa.table(
                {
                    "bucket": pa.array(np.full(kept, bucket, dtype=np.int32)),
                    "local_idx": pa.array(np.arange(kept, dtype=np.int64)),
                    "user_id": indexed.user_ids,
                    "num_interactions": pa.array(sizes),
                    "item_idx": items,
                    "timestamp": times,
                    "valid_position": pa.array((sizes - 2).astype(np.int32)),
                    "test_position": pa.array((sizes - 1).astype(np.int32)),
                },
                schema=BUCKET_USERS,
            ),
            pa.table(
                {
                    "bucket": pa.array(np.full(len(short_ids), bucket, dtype=np.int32)),
                    "local_idx": pa.array(np.full(len(short_ids), -1, dtype=np.int64)),
                    "user_id": short_ids,
                    "num_interactions": pa.array(short_sizes),
                    "item_idx": empty,
                    "timestamp": empty,
                    "valid_position": pa.array(np.full(len(short_ids), -1, dtype=np.int32)),
                    "test_position": pa.array(np.full(len(short_ids), -1, dtype=np.int32)),
                },
                schema=BUCKET_USERS,
            ),
        ]
    )


def _with_offsets(batch: pa.Table, offsets: dict[int, int]) -> pa.Table:
    """The kept users of a batch with their dense index (bucket offset + local number)."""
    batch = batch.filter(pc.greater_equal(batch["local_idx"], 0))
    base = np.array([offsets[int(b)] for b in batch["bucket"].to_numpy()], dtype=np.int64)
    return pa.table(
        {
            "user_idx": pa.array(base + batch["local_idx"].to_numpy()),
            "user_id": batch["user_id"],
            "bucket": batch["bucket"],
            "item_idx": batch["item_idx"],
            "timestamp": batch["timestamp"],
            "valid_position": batch["valid_position"],
            "test_position": batch["test_position"],
        }
    )


def _read_pieces(batch: dict, catalog_ref: list, num_buckets: int) -> pa.Table:
    import ray

    catalog = ray.get(catalog_ref[0])
    tables = []
    for path, group, first_row, file_row, num_rows in zip(
        batch["path"], batch["row_group"], batch["first_row"], batch["file_row"], batch["num_rows"], strict=True
    ):
        piece = Piece(str(path), int(group), int(first_row), int(file_row), int(num_rows))
        tables.append(keyed_rows(ParquetFolder.read_piece(piece), catalog, num_buckets, piece.path, piece.file_row - piece.first_row))
    return pa.concat_tables(tables) if tables else KEYED.empty_table()


def _key_table(batch: pa.Table, catalog_ref: list, num_buckets: int, where: str) -> pa.Table:
    import ray

    return keyed_rows(batch, ray.get(catalog_ref[0]), num_buckets, where, 0)


def buckets_for(num_interactions: int, rows_per_bucket: int, num_buckets: int | None) -> int:
    """``num_buckets`` if given, else enough buckets of at most ``rows_per_bucket`` rows each."""
    if num_buckets is not None:
        if num_buckets < 1:
            raise ValueError(f"data.ray.num_buckets must be >= 1, got {num_buckets}")
        return num_buckets
    return max(1, -(-num_interactions // rows_per_bucket))


def prepare_sharded(
    source: ParquetFolder | RawDataset,
    out_dir: str | Path,
    min_user_interactions: int = 3,
    dedupe: bool = True,
    fingerprint: str = "",
    num_buckets: int | None = None,
    rows_per_bucket: int = 4_000_000,
) -> PreparedDataset:
    """Prepare ``source`` on the running Ray (see the module docstring) into ``out_dir``:
    ``items.parquet``, ``sequences/`` and ``meta.json`` (written last: a folder without it is
    prepared again)."""
    import ray
    import ray.data
    from ray.data.aggregate import Count, Sum

    if min_user_interactions < 3:
        raise ValueError("data.min_user_interactions must be >= 3 (train, valid and test need one each)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)
    items = source.read_items() if isinstance(source, ParquetFolder) else source.items
    items_out = items_table(source.name, items)
    catalog_ref = [ray.put(pa.array(items_out["item_id"], type=pa.large_string()))]  # in a list: tasks fetch it by reference

    if isinstance(source, ParquetFolder):
        pieces = source.pieces()
        total = sum(p.num_rows for p in pieces)
        if total == 0:
            raise DataFormatError(source.name, "there are no interactions")
        buckets = buckets_for(total, rows_per_bucket, num_buckets)
        keyed = ray.data.from_items([vars(p) for p in pieces], override_num_blocks=len(pieces)).map_batches(
            partial(_read_pieces, catalog_ref=catalog_ref, num_buckets=buckets), batch_size=1, batch_format="numpy"
        )
    else:
        inter = source.interactions
        total = len(inter)
        if total == 0:
            raise DataFormatError(source.name, "there are no interactions")
        buckets = buckets_for(total, rows_per_bucket, num_buckets)
        table = pa.table(
            {
                "user_id": arrow_strings(inter["user_id"], source.name, "user_id"),
                "item_id": arrow_strings(inter["item_id"], source.name, "item_id"),
                "timestamp": pa.array(inter["timestamp"].to_numpy(dtype=np.int64)),
                "order": pa.array(np.arange(total, dtype=np.int64)),
            }
        )
        keyed = ray.data.from_arrow(table).map_batches(
            partial(_key_table, catalog_ref=catalog_ref, num_buckets=buckets, where=source.name), batch_size=None, batch_format="pyarrow"
        )
    log.info("%s: preparing %d interactions on Ray Data in %d bucket(s) of users", source.name, total, buckets)
    users = (
        keyed.groupby("bucket")
        .map_groups(
            partial(prepare_bucket, num_items=len(items_out), min_user_interactions=min_user_interactions, dedupe=dedupe),
            batch_format="pyarrow",
        )
        .materialize()
    )
    counts = users.add_column("kept", lambda b: pc.greater_equal(b["local_idx"], 0), batch_format="pyarrow")
    rows = counts.select_columns(["bucket", "kept", "num_interactions"]).groupby(["bucket", "kept"]).aggregate(Count(), Sum("num_interactions")).take_all()
    kept_users = {int(r["bucket"]): int(r["count()"]) for r in rows if r["kept"]}
    kept_rows = sum(int(r["sum(num_interactions)"]) for r in rows if r["kept"])
    dropped_users = sum(int(r["count()"]) for r in rows if not r["kept"])
    dropped_rows = sum(int(r["sum(num_interactions)"]) for r in rows if not r["kept"])
    dropped_repeats = total - kept_rows - dropped_rows
    num_users = sum(kept_users.values())
    if num_users == 0:
        raise DataFormatError(source.name, f"no user has at least {min_user_interactions} interactions")
    offsets, start = {}, 0
    for b in range(buckets):
        offsets[b] = start
        start += kept_users.get(b, 0)

    writing = out / f"{SEQUENCES}.partial"
    shutil.rmtree(writing, ignore_errors=True)
    users.map_batches(partial(_with_offsets, offsets=offsets), batch_format="pyarrow", batch_size=None).write_parquet(str(writing))
    shutil.rmtree(out / SEQUENCES, ignore_errors=True)
    writing.rename(out / SEQUENCES)
    write_atomic(items_out, out / "items.parquet")
    if dropped_repeats or dropped_users:
        log.warning(
            "%s: dropped %d repeated (user, item) interactions and %d users (%d interactions) with fewer than %d interactions",
            source.name,
            dropped_repeats,
            dropped_users,
            dropped_rows,
            min_user_interactions,
        )
    meta = {
        "name": source.name,
        "fingerprint": fingerprint,
        "layout": SEQUENCES,
        "engine": "ray",
        "num_buckets": buckets,
        "num_users": num_users,
        "num_items": len(items_out),
        "num_interactions": kept_rows,
        "dropped_repeats": dropped_repeats,
        "dropped_users": dropped_users,
        "reader_skipped": getattr(source, "skipped", {}),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("%s prepared on Ray Data in %s: %d users, %d items, %d interactions", source.name, out, num_users, len(items_out), kept_rows)
    return PreparedDataset(out, num_users, len(items_out), kept_rows)
