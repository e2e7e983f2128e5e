"""Raw data as two Parquet files, the simplest way to bring your own data (and what the
incremental update and the streaming replay write):

- ``interactions.parquet``: ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int64), in order
  (the order breaks timestamp ties);
- ``items.parquet``: ``item_id`` (str), ``text`` (str), ``categories`` (list of str), and
  optionally ``title`` (str).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from datamodules.raw_dataset import DataFormatError, RawDataset


def write_raw_parquet(folder: str | Path, interactions: pd.DataFrame, items: pd.DataFrame) -> Path:
    """Write the two files (atomically each) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in (("interactions", interactions), ("items", items)):
        tmp = folder / f".{name}.parquet.partial"
        pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), tmp)
        tmp.replace(folder / f"{name}.parquet")
    return folder


def read_raw_parquet(folder: str, name: str = "parquet") -> RawDataset:
    """The dataset in ``folder`` (see the module docstring); errors name the file and column."""
    folder_path = Path(folder)
    frames = {}
    for part in ("interactions", "items"):
        path = folder_path / f"{part}.parquet"
        if not path.is_file():
            raise DataFormatError(str(path), "no such file")
        try:
            frames[part] = pd.read_parquet(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise DataFormatError(str(path), f"not a readable Parquet file ({e})") from None
    inter = frames["interactions"].astype({"user_id": str, "item_id": str}, errors="ignore")
    if "timestamp" in inter.columns:
        inter["timestamp"] = inter["timestamp"].astype("int64")
    items = frames["items"]
    if "item_id" in items.columns:
        items = items.assign(item_id=items["item_id"].astype(str))
    if "categories" in items.columns:
        items = items.assign(categories=[list(c) if c is not None else [] for c in items["categories"]])
    return RawDataset(name, inter, items)
