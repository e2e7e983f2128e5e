"""Raw data as Parquet, the simplest way to bring your own data (``data=parquet
data.reader.folder=...``; also what the incremental update and the streaming replay write).

The folder holds two parts, each one file or a folder of shards (``*.parquet`` at any depth, read
in the order of their paths):

- ``interactions.parquet`` or ``interactions/``: ``user_id`` (str), ``item_id`` (str), ``timestamp``
  (int64), in order (the order, file by file, breaks timestamp ties);
- ``items.parquet`` or ``items/``: ``item_id`` (str), ``text`` (str), ``categories`` (list of str),
  and optionally ``title`` (str).

:class:`ParquetFolder` reads the interactions in pieces (one Parquet row group each), so that
``data.engine=ray`` prepares them without any one process holding them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.preprocess import item_codes
from datamodules.raw_dataset import INTERACTION_COLUMNS, DataFormatError, RawDataset

PARTS = ("interactions", "items")


def write_raw_parquet(folder: str | Path, interactions: pd.DataFrame, items: pd.DataFrame) -> Path:
    """Write the two files (atomically each) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in (("interactions", interactions), ("items", items)):
        tmp = folder / f".{name}.parquet.partial"
        pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), tmp)
        tmp.replace(folder / f"{name}.parquet")
    return folder


@dataclass(frozen=True)
class Piece:
    """One row group of one interactions file: ``first_row`` is its first row's place in the whole
    input (file after file), ``file_row`` its place in its file."""

    path: str
    row_group: int
    first_row: int
    file_row: int
    num_rows: int


def id_strings(column: pa.ChunkedArray | pa.Array, where: str, field: str, first_row: int) -> pa.Array:
    """An id column as Arrow strings; a missing id is an error naming ``where`` and its row
    (``first_row`` + its position)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        row = int(np.flatnonzero(np.asarray(arr.is_null()))[0])
        raise DataFormatError(where, f"interaction row {first_row + row} has no {field}", field=field)
    return arr if arr.type in (pa.string(), pa.large_string()) else pc.cast(arr, pa.large_string())


class ParquetFolder:
    """A reader of the folder described above: whole (:meth:`read`, for one process) or in pieces
    (:meth:`pieces` and :meth:`read_piece`, for Ray Data tasks). Errors name the file, the row and
    the column."""

    def __init__(self, folder: str, name: str = "parquet"):
        self.folder = Path(folder)
        self.name = name
        if not self.folder.is_dir():
            raise DataFormatError(str(self.folder), "no such folder (data.reader.folder)")

    def files(self, part: str) -> list[Path]:
        single, shards = self.folder / f"{part}.parquet", self.folder / part
        if single.is_file():
            return [single]
        found = sorted(shards.rglob("*.parquet")) if shards.is_dir() else []
        if not found:
            raise DataFormatError(str(single), f"no such file, and no {shards}/ of *.parquet shards")
        return found

    def pieces(self) -> list[Piece]:
        """Every row group of the interactions, in order; the columns are checked from the files'
        footers (nothing else is read)."""
        out, first_row = [], 0
        for path in self.files("interactions"):
            try:
                meta = pq.ParquetFile(path).metadata
            except (OSError, pa.ArrowInvalid) as e:
                raise DataFormatError(str(path), f"not a readable Parquet file ({e})") from None
            names = set(meta.schema.names)
            missing = [c for c in INTERACTION_COLUMNS if c not in names]
            if missing:
                raise DataFormatError(str(path), f"interactions lack column '{missing[0]}'", field=missing[0])
            file_row = 0
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if rows:
                    out.append(Piece(str(path), g, first_row, file_row, rows))
                first_row, file_row = first_row + rows, file_row + rows
        return out

    def num_interactions(self) -> int:
        return sum(p.num_rows for p in self.pieces())

    @staticmethod
    def read_piece(piece: Piece) -> pa.Table:
        """The piece's rows as ``user_id``, ``item_id`` (strings), ``timestamp`` and ``order``
        (int64: the row's place in the whole input); a missing value names its file and row."""
        try:
            table = pq.ParquetFile(piece.path).read_row_group(piece.row_group, columns=list(INTERACTION_COLUMNS))
        except (OSError, pa.ArrowInvalid) as e:
            raise DataFormatError(piece.path, f"row group {piece.row_group} is not readable ({e})") from None
        ts = table["timestamp"].combine_chunks()
        if ts.null_count:
            row = int(np.flatnonzero(np.asarray(ts.is_null()))[0])
            raise DataFormatError(piece.path, f"interaction row {piece.file_row + row} has no timestamp", field="timestamp")
        try:
            timestamp = pc.cast(ts, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataFormatError(piece.path, f"timestamps are not integers ({e})", field="timestamp") from None
        return pa.table(
            {
                "user_id": id_strings(table["user_id"], piece.path, "user_id", piece.file_row),
                "item_id": id_strings(table["item_id"], piece.path, "item_id", piece.file_row),
                "timestamp": timestamp,
                "order": pa.array(np.arange(piece.first_row, piece.first_row + piece.num_rows, dtype=np.int64)),
            }
        )

    def read_items(self) -> pd.DataFrame:
        frames = []
        for path in self.files("items"):
            try:
                frames.append(pd.read_parquet(path))
            except (OSError, pa.ArrowInvalid) as e:
                raise DataFormatError(str(path), f"not a readable Parquet file ({e})") from None
        items = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        if "item_id" in items.columns:
            items = items.assign(item_id=items["item_id"].astype(str))
        if "categories" in items.columns:
            items = items.assign(categories=[list(c) if c is not None else [] for c in items["categories"]])
        return items

    def read(self) -> RawDataset:
        """Everything, in one process (what ``data.engine=local`` prepares); an item id that is not
        in the items names its file and row here, where both are known."""
        items = self.read_items()
        catalog = pa.array(items["item_id"], type=pa.large_string()) if "item_id" in items.columns else None
        tables = []
        for piece in self.pieces():
            table = self.read_piece(piece)
            if catalog is not None:
                item_codes(table["item_id"].combine_chunks(), catalog, piece.path, piece.file_row)
            tables.append(table)
        inter = pa.concat_tables(tables).drop(["order"]).to_pandas() if tables else pd.DataFrame({c: [] for c in INTERACTION_COLUMNS})
        return RawDataset(self.name, inter, items)


def read_raw_parquet(folder: str, name: str = "parquet") -> RawDataset:
    """The dataset in ``folder`` (see the module docstring), read whole."""
    return ParquetFolder(folder, name).read()
