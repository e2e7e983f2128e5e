"""The model bundle: one self-contained folder with all a trained two-tower model needs to score.

Layout (format ``towerrec.model_bundle``, version 1)::

    manifest.json      format and version, model version and lineage, sizes, metrics, and the
                       size and sha256 of every other file (checked on load)
    spec.json          the architecture (lightning_modules/two_tower_spec.py), HF configs included
    config.json        the resolved training config (plain containers; for the record and for
                       jobs that continue training, never needed to load)
    model.safetensors  fp32 weights (no pickled code)
    catalog.parquet    one row per item index: item_id, title, text, categories, train_count
                       (training popularity), cold (held out of training), and the item
                       tower's token_ids / attention_mask
    users.parquet      one row per user index: user_id and the whole history (item indices,
                       oldest first), what a service or batch job serves a known user from
    tokenizer/         the item tower's tokenizer files (encoding new items' text)

``load_bundle`` needs no dataset, no Hydra and no Ray. A bundle is written to a temporary
folder and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.two_tower_spec import build_from_spec, describe

BUNDLE_FORMAT = "towerrec.model_bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
SPEC = "spec.json"
CONFIG = "config.json"
CATALOG = "catalog.parquet"
USERS = "users.parquet"
TOKENIZER = "tokenizer"
USERS_ROW_GROUP = 65_536


class BundleError(ValueError):
    """A bundle that cannot be read: names the file and what is wrong with it."""

    def __init__(self, path: str | Path, problem: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path}: {problem}")


def _row_of(ids: np.ndarray) -> dict[str, int]:
    """Raw id -> row, for lookups by id."""
    return {str(i): n for n, i in enumerate(ids)}


@dataclass
class Catalog:
    """The items as the model sees them; row i is item index i."""

    item_ids: np.ndarray  # [N] str, raw ids
    titles: list[str]
    texts: list[str]
    categories: list[list[str]]
    train_counts: np.ndarray  # [N] float64, interactions in the training data
    cold: np.ndarray  # [N] bool, held out of training (scored from text alone)
    token_ids: np.ndarray | None = None  # [N, W] int64, None for an id-only item tower
    attention_mask: np.ndarray | None = None  # [N, W] int64
    _index: dict[str, int] | None = field(default=None, repr=False)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int | None:
        """The item index of a raw id, or None when the catalog does not have it."""
        if self._index is None:
            self._index = _row_of(self.item_ids)
        return self._index.get(str(item_id))


@dataclass
class UserTable:
    """Known users: raw ids and whole histories (item indices, oldest first); row i is user index i."""

    user_ids: np.ndarray  # [U] str
    histories: list[np.ndarray]
    _index: dict[str, int] | None = field(default=None, repr=False)

    def index_of(self, user_id: str) -> int | None:
        if self._index is None:
            self._index = _row_of(self.user_ids)
        return self._index.get(str(user_id))


@dataclass
class ModelBundle:
    """A loaded bundle: the ready model (eval mode), its catalog, users and records."""

    path: Path
    manifest: dict[str, Any]
    spec: dict[str, Any]
    config: dict[str, Any]
    model: TwoTowerModel
    catalog: Catalog
    users: UserTable

    @property
    def model_version(self) -> int:
        return int(self.manifest["model_version"])

    @property
    def max_seq_len(self) -> int:
        """How many recent items of a history the user tower reads."""
        return int(self.manifest["inputs"]["max_seq_len"])

    def load_tokenizer(self):
        """The item tower's tokenizer from the bundle's own files (None for an id-only tower)."""
        folder = self.path / TOKENIZER
        if not folder.is_dir():
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---- writing -----------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _list_column(rows: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """An [n, w] matrix as a list<type> column."""
    n, w = rows.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * w), pa.array(rows.reshape(-1), type=arrow_type))


def _ragged_column(rows: list[np.ndarray], arrow_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.concatenate(rows) if rows else np.zeros(0)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, type=arrow_type))


def _catalog_table(catalog: Catalog) -> pa.Table:
    n = catalog.num_items
    columns: dict[str, Any] = {
        "item_idx": pa.array(np.arange(n, dtype=np.int64)),
        "item_id": pa.array([str(i) for i in catalog.item_ids], type=pa.string()),
        "title": pa.array(list(catalog.titles), type=pa.string()),
        "text": pa.array(list(catalog.texts), type=pa.string()),
        "categories": pa.array([list(c) for c in catalog.categories], type=pa.list_(pa.string())),
        "train_count": pa.array(np.asarray(catalog.train_counts, dtype=np.float64)),
        "cold": pa.array(np.asarray(catalog.cold, dtype=bool)),
    }
    if catalog.token_ids is not None:
        columns["token_ids"] = _list_column(np.asarray(catalog.token_ids, dtype=np.int64), pa.int64())
        columns["attention_mask"] = _list_column(np.asarray(catalog.attention_mask, dtype=np.int8), pa.int8())
    return pa.table(columns)


@dataclass
class UserPieces:
    """Known users to be written piece by piece, so that no process holds them all: ``pieces()``
    yields (raw ids, offsets, item indices) for consecutive users in user index order, each
    user's items its whole history (oldest first)."""

    num_users: int
    pieces: Callable[[], Iterable[tuple[Any, np.ndarray, np.ndarray]]]


USERS_SCHEMA = pa.schema([("user_idx", pa.int64()), ("user_id", pa.string()), ("history", pa.large_list(pa.int64()))])


def _write_users(users: UserTable | UserPieces, path: Path) -> int:
    """Write users.parquet in row groups of USERS_ROW_GROUP users; returns the number of users."""
    if isinstance(users, UserTable):
        pq.write_table(_users_table(users), path, row_group_size=USERS_ROW_GROUP)
        return len(users.user_ids)
    written = 0
    with pq.ParquetWriter(path, USERS_SCHEMA) as writer:
        for ids, offsets, items in users.pieces():
            ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else pa.array(ids)
            n = len(offsets) - 1
            if len(ids) != n:
                raise ValueError(f"{path}: a piece of users has {len(ids)} ids and {n} histories")
            history = pa.LargeListArray.from_arrays(pa.array(np.asarray(offsets, dtype=np.int64)), pa.array(np.asarray(items, dtype=np.int64)))
            piece = pa.table([pa.array(np.arange(written, written + n, dtype=np.int64)), ids.cast(pa.string()), history], schema=USERS_SCHEMA)
            writer.write_table(piece, row_group_size=USERS_ROW_GROUP)
            written += n
    if written != users.num_users:
        raise ValueError(f"{path}: {written} users written, {users.num_users} expected")
    return written


def _users_table(users: UserTable) -> pa.Table:
    return pa.table(
        {
            "user_idx": pa.array(np.arange(len(users.user_ids), dtype=np.int64)),
            "user_id": pa.array([str(u) for u in users.user_ids], type=pa.string()),
            "history": _ragged_column([np.asarray(h, dtype=np.int64) for h in users.histories], pa.int64()),
        }
    )


def save_bundle(
    folder: str | Path,
    model: TwoTowerModel,
    catalog: Catalog,
    users: UserTable | UserPieces,
    config: dict[str, Any],
    *,
    max_seq_len: int,
    stage: str,
    model_version: int = 1,
    parent: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write ``model`` (its current weights, as fp32) and everything it scores with as a bundle
    in ``folder``, which must not exist yet. Returns the folder."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"{folder}: a bundle is written once; this folder exists already")
    spec = describe(model)
    if catalog.num_items != model.item_tower.num_items:
        raise ValueError(f"the catalog has {catalog.num_items} items, the model {model.item_tower.num_items}")
    if (catalog.token_ids is None) != (model.item_tower.encoder is None):
        raise ValueError("the catalog must carry token ids exactly when the item tower has a text encoder")
    tmp = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        from safetensors.torch import save_file

        state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": BUNDLE_FORMAT})
        (tmp / SPEC).write_text(json.dumps(spec, indent=1, default=str) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
        pq.write_table(_catalog_table(catalog), tmp / CATALOG)
        # row groups of 64k users: a batch job reading one piece of users reads little more than it
        num_users = _write_users(users, tmp / USERS)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[path.relative_to(tmp).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": FORMAT_VERSION,
            "model_version": int(model_version),
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "stage": stage,
            "parent": parent,
            "lineage": lineage or {},
            "num_items": catalog.num_items,
            "num_users": num_users,
            "dim": model.item_tower.dim,
            "inputs": {"max_seq_len": int(max_seq_len)},
            "metrics": {k: float(v) for k, v in (metrics or {}).items()},
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ---- reading -----------------------------------------------------------------------------
def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def bundle_folder(path: str | Path, stage: str = "finetune") -> Path | None:
    """The bundle a path names: a bundle folder, a run folder holding ``bundle/``, or a pipeline
    run folder holding ``<stage>/bundle/``; None when it names none."""
    path = Path(path)
    for candidate in (path, path / "bundle", path / stage / "bundle"):
        if (candidate / MANIFEST).is_file():
            return candidate
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the bundle in ``folder``, its format and version checked."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise BundleError(path, "no such file: not a model bundle (expected a folder written by a training job, holding manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(path, f"not valid JSON ({e}); the file is damaged or truncated") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(path, f"format {manifest.get('format') if isinstance(manifest, dict) else None!r} is not {BUNDLE_FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(path, f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise BundleError(path, f"format_version {version} is newer than this code reads ({FORMAT_VERSION}); update towerrec to load it")
    for key in ("model_version", "files", "num_items", "inputs"):
        if key not in manifest:
            raise BundleError(path, f"lacks the key '{key}'")
    inside = Path(folder).resolve()
    for name in manifest["files"]:
        if not isinstance(name, str) or Path(name).is_absolute() or not (inside / name).resolve().is_relative_to(inside):
            raise BundleError(path, f"lists the file {name!r}, which is not inside the bundle")
    return manifest


def verify_files(folder: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> None:
    """Check that each listed file (all by default) exists with its recorded size and sha256."""
    folder = Path(folder)
    for name, record in manifest["files"].items():
        if names is not None and name not in names:
            continue
        path = folder / name
        if not path.is_file():
            raise BundleError(path, "missing from the bundle (listed in manifest.json)")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise BundleError(path, f"is {size} bytes, manifest.json says {record['bytes']}: the file is truncated or was replaced")
        if _sha256(path) != record["sha256"]:
            raise BundleError(path, "sha256 does not match manifest.json: the file is damaged or was replaced")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(path, f"not valid JSON ({e})") from None


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The bundle's fp32 state dict (checked against the manifest), without building the model."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest, [WEIGHTS])
    return _load_weights(folder / WEIGHTS)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise BundleError(path, f"cannot read the weights ({e})") from None


def list_matrix(column: pa.ChunkedArray, path: Path, name: str, dtype: type = np.int64) -> np.ndarray:
    """A list column whose rows all have one length as an [n, width] matrix of ``dtype``."""
    flat = column.combine_chunks()
    lengths = flat.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise BundleError(path, f"column '{name}' has rows of different lengths")
    width = int(lengths[0]) if len(lengths) else 0
    return flat.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False).reshape(len(lengths), width)


def read_rows(path: Path, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows ``start..stop-1`` of a Parquet file, reading only the row groups they lie in."""
    try:
        f = pq.ParquetFile(path)
        groups: list[int] = []
        first = row = 0
        for g in range(f.metadata.num_row_groups):
            n = f.metadata.row_group(g).num_rows
            if row + n > start and row < stop:
                if not groups:
                    first = row
                groups.append(g)
            row += n
        if stop > row:
            raise BundleError(path, f"has {row} rows, rows {start}..{stop - 1} were asked for")
        return f.read_row_groups(groups, columns=columns).slice(start - first, stop - start)
    except (pa.ArrowInvalid, OSError, KeyError) as e:
        raise BundleError(path, f"cannot read rows {start}..{stop - 1} of columns {columns} ({e})") from None


def _histories(table: pa.Table, path: Path, num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``history`` column as CSR (offsets from 0, item indices), checked against the catalog."""
    hist = table["history"].combine_chunks()
    offsets = np.asarray(hist.offsets, dtype=np.int64)
    values = hist.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]].astype(np.int64)
    if len(values) and (values.min() < 0 or values.max() >= num_items):
        raise BundleError(path, f"histories name item indices outside the catalog's 0..{num_items - 1}")
    return offsets - offsets[0], values


def read_user_rows(folder: str | Path, num_items: int, start: int, stop: int) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Users ``start..stop-1`` of a bundle's users.parquet, reading only their row groups: their
    raw ids and their whole histories as CSR (offsets, item indices)."""
    path = Path(folder) / USERS
    table = read_rows(path, ["user_id", "history"], start, stop)
    offsets, values = _histories(table, path, num_items)
    return table["user_id"].combine_chunks().cast(pa.string()), offsets, values


def _read_catalog(path: Path) -> Catalog:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleError(path, f"cannot read the catalog ({e})") from None
    for col in ("item_idx", "item_id", "title", "text", "categories", "train_count", "cold"):
        if col not in table.column_names:
            raise BundleError(path, f"lacks the column '{col}'")
    idx = table["item_idx"].to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise BundleError(path, "item_idx must run 0..N-1 in row order")
    item_ids = np.asarray(table["item_id"].to_pylist(), dtype=object)
    if len(set(item_ids.tolist())) != len(item_ids):
        raise BundleError(path, "item_id values repeat")
    tokens = mask = None
    if "token_ids" in table.column_names:
        tokens = list_matrix(table["token_ids"], path, "token_ids")
        mask = list_matrix(table["attention_mask"], path, "attention_mask")
        if tokens.shape != mask.shape:
            raise BundleError(path, f"token_ids {tokens.shape} and attention_mask {mask.shape} differ in shape")
    return Catalog(
        item_ids=item_ids,
        titles=table["title"].to_pylist(),
        texts=table["text"].to_pylist(),
        categories=[list(c or []) for c in table["categories"].to_pylist()],
        train_counts=table["train_count"].to_numpy().astype(np.float64),
        cold=table["cold"].to_numpy(zero_copy_only=False).astype(bool),
        token_ids=tokens,
        attention_mask=mask,
    )


def _read_users(path: Path, num_items: int) -> UserTable:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleError(path, f"cannot read the users ({e})") from None
    for col in ("user_idx", "user_id", "history"):
        if col not in table.column_names:
            raise BundleError(path, f"lacks the column '{col}'")
    offsets, values = _histories(table, path, num_items)
    histories = [values[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    return UserTable(np.asarray(table["user_id"].to_pylist(), dtype=object), histories)


def _build_model(
    folder: Path, spec: dict[str, Any], catalog_path: Path, tokens: tuple[torch.Tensor, torch.Tensor] | None, cold: np.ndarray, device: str | torch.device
) -> TwoTowerModel:
    """The model of ``spec`` with the bundle's weights, in eval mode on ``device``."""
    has_encoder = spec["item_tower"].get("encoder") is not None
    if has_encoder != (tokens is not None):
        raise BundleError(
            catalog_path,
            f"token_ids are {'missing' if has_encoder else 'present'}, but spec.json's item tower {'has' if has_encoder else 'has no'} text encoder",
        )
    try:
        model = build_from_spec(spec, *(tokens if tokens is not None else (None, None)))
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(folder / SPEC, f"does not describe a buildable model ({type(e).__name__}: {e})") from None
    state = _load_weights(folder / WEIGHTS)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(folder / WEIGHTS, f"the weights do not fit the architecture in spec.json: {str(e)[:600]}") from None
    if cold.any():
        model.item_tower.set_cold_items(torch.as_tensor(cold))
    return model.to(device).eval()


def _check_sizes(folder: Path, spec: dict[str, Any], manifest: dict[str, Any], num_items: int) -> None:
    n = spec.get("item_tower", {}).get("num_items")
    if not (num_items == n == manifest["num_items"]):
        raise BundleError(folder / CATALOG, f"has {num_items} items; spec.json says {n} and manifest.json {manifest['num_items']}")


def load_bundle(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> ModelBundle:
    """Load the bundle in ``folder`` into a ready model (eval mode, on ``device``) with its
    catalog and users. ``verify`` checks every file's size and sha256 against the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    spec = _read_json(folder / SPEC)
    config = _read_json(folder / CONFIG)
    catalog = _read_catalog(folder / CATALOG)
    _check_sizes(folder, spec, manifest, catalog.num_items)
    users = _read_users(folder / USERS, catalog.num_items)
    tokens = None
    if catalog.token_ids is not None:
        tokens = (torch.as_tensor(catalog.token_ids), torch.as_tensor(catalog.attention_mask))
    model = _build_model(folder, spec, folder / CATALOG, tokens, catalog.cold, device)
    return ModelBundle(folder, manifest, spec, config, model, catalog, users)


def load_model(folder: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> TwoTowerModel:
    """Only the bundle's model (eval mode, on ``device``): reads the spec, the weights and the
    catalog's token and cold columns, not the users or the texts, so each of many workers
    (Ray Data actors) loads it in a fraction of ``load_bundle``'s time at a million users."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest, [SPEC, WEIGHTS, CATALOG])
    spec = _read_json(folder / SPEC)
    path = folder / CATALOG
    try:
        names = pq.read_schema(path).names
        wanted = [c for c in ("item_idx", "cold", "token_ids", "attention_mask") if c in names]
        table = pq.read_table(path, columns=wanted)
    except (pa.ArrowInvalid, OSError) as e:
        raise BundleError(path, f"cannot read the catalog ({e})") from None
    for col in ("item_idx", "cold"):
        if col not in table.column_names:
            raise BundleError(path, f"lacks the column '{col}'")
    _check_sizes(folder, spec, manifest, table.num_rows)
    tokens = None
    if "token_ids" in table.column_names:
        ids, mask = list_matrix(table["token_ids"], path, "token_ids"), list_matrix(table["attention_mask"], path, "attention_mask")
        if ids.shape != mask.shape:
            raise BundleError(path, f"token_ids {ids.shape} and attention_mask {mask.shape} differ in shape")
        tokens = (torch.as_tensor(ids), torch.as_tensor(mask))
    return _build_model(folder, spec, path, tokens, table["cold"].to_numpy(zero_copy_only=False).astype(bool), device)
