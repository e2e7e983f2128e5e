"""Raw dataset -> Parquet files with dense indices (raw ids kept) and the leave-one-out split."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.leave_one_out import leave_one_out_split
from datamodules.raw_dataset import DataFormatError, RawDataset

log = logging.getLogger(__name__)

FILES = ("interactions.parquet", "items.parquet", "users.parquet", "split.parquet")


@dataclass(frozen=True)
class PreparedDataset:
    """Where a prepared dataset lives and its sizes."""

    folder: Path
    num_users: int
    num_items: int
    num_interactions: int


def _write(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".parquet.partial")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    tmp.replace(path)


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
    items = raw.items.reset_index(drop=True)
    if items.empty:
        raise DataFormatError(raw.name, "the item catalog is empty")
    dup = items["item_id"].duplicated()
    if dup.any():
        raise DataFormatError(raw.name, f"duplicate item_id '{items.loc[dup, 'item_id'].iloc[0]}' in the items", field="item_id")
    inter = raw.interactions.reset_index(drop=True).copy()
    if inter.empty:
        raise DataFormatError(raw.name, "there are no interactions")
    inter["order"] = np.arange(len(inter), dtype=np.int64)
    item_index = pd.Index(items["item_id"])
    inter["item_idx"] = item_index.get_indexer(inter["item_id"])
    unknown = inter["item_idx"] < 0
    if unknown.any():
        first = inter.loc[unknown].iloc[0]
        raise DataFormatError(raw.name, f"interaction row {int(first['order'])} names unknown item_id '{first['item_id']}'", field="item_id")

    dropped_dupes = 0
    if dedupe:
        ordered = inter.sort_values(["user_id", "timestamp", "order"], kind="mergesort")
        keep = ~ordered.duplicated(["user_id", "item_id"], keep="first")
        dropped_dupes = int((~keep).sum())
        inter = ordered[keep].sort_values("order", kind="mergesort")
    sizes = inter.groupby("user_id", sort=False)["item_id"].transform("size")
    short = sizes < min_user_interactions
    dropped_users = int(inter.loc[short, "user_id"].nunique())
    dropped_rows = int(short.sum())
    inter = inter.loc[~short].reset_index(drop=True)
    if inter.empty:
        raise DataFormatError(raw.name, f"no user has at least {min_user_interactions} interactions")
    if dropped_dupes or dropped_users:
        log.warning(
            "%s: dropped %d repeated (user, item) interactions and %d users (%d interactions) with fewer than %d interactions",
            raw.name, dropped_dupes, dropped_users, dropped_rows, min_user_interactions,
        )

    user_ids = pd.unique(inter["user_id"])
    inter["user_idx"] = pd.Index(user_ids).get_indexer(inter["user_id"])
    inter = inter[["user_idx", "item_idx", "user_id", "item_id", "timestamp", "order"]].astype(
        {"user_idx": np.int64, "item_idx": np.int64, "timestamp": np.int64}
    )
    split = leave_one_out_split(inter)

    items_out = pd.DataFrame(
        {
            "item_idx": np.arange(len(items), dtype=np.int64),
            "item_id": items["item_id"].astype(str),
            "text": items["text"].astype(str),
            # a short display name (explanations, the service); readers without one: the text
            "title": (items["title"] if "title" in items.columns else items["text"]).astype(str),
            "categories": [list(c) if c is not None else [] for c in items["categories"]],
        }
    )
    users_out = pd.DataFrame(
        {
            "user_idx": np.arange(len(user_ids), dtype=np.int64),
            "user_id": user_ids.astype(str),
            "num_interactions": inter.groupby("user_idx")["item_idx"].size().to_numpy(),
        }
    )
    _write(inter, out / "interactions.parquet")
    _write(items_out, out / "items.parquet")
    _write(users_out, out / "users.parquet")
    _write(split[["user_idx", "item_idx", "timestamp", "order", "position", "split"]], out / "split.parquet")
    meta = {
        "name": raw.name,
        "fingerprint": fingerprint,
        "num_users": len(user_ids),
        "num_items": len(items),
        "num_interactions": len(inter),
        "dropped_repeats": dropped_dupes,
        "dropped_users": dropped_users,
        "reader_skipped": raw.skipped,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    log.info("%s prepared in %s: %d users, %d items, %d interactions", raw.name, out, len(user_ids), len(items), len(inter))
    return PreparedDataset(out, len(user_ids), len(items), len(inter))


def load_prepared(folder: str | Path, fingerprint: str | None = None) -> PreparedDataset | None:
    """The prepared dataset in ``folder`` if complete (and made with ``fingerprint``), else None."""
    folder = Path(folder)
    meta_path = folder / "meta.json"
    if not meta_path.is_file() or not all((folder / f).is_file() for f in FILES):
        return None
    meta = json.loads(meta_path.read_text())
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        return None
    return PreparedDataset(folder, meta["num_users"], meta["num_items"], meta["num_interactions"])
