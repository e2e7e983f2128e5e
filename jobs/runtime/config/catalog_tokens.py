"""The catalog's token ids and attention masks, tokenised once per prepared dataset, tokenizer and
width, into ``<data folder>/tokens/<key>/`` (two ``.npy`` files), and memory-mapped by every process
that builds the item tower: the training workers of a node share one copy in the page cache, and
none of them tokenises the catalog at start-up.

The job's driver makes them beside the prepared data (``prepare_data``), before any worker starts;
a process that finds them missing (a folder prepared elsewhere) makes them itself, written to a
private folder and renamed into place, so concurrent writers cannot leave a half-written pair."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from lightning_modules.hf_backbones import load_tokenizer, resolve_pretrained
from lightning_modules.item_tower import tokenize_catalog

log = logging.getLogger(__name__)

FILES = ("token_ids.npy", "attention_mask.npy")


def tokens_folder(data_dir: Path, tokenizer: str, max_tokens: int) -> Path:
    """Where the tokens of ``data_dir``'s items live for this tokenizer and width: the key covers
    the prepared data (its fingerprint, or the items file's size and time when it has none)."""
    meta = data_dir / "meta.json"
    fingerprint = json.loads(meta.read_text()).get("fingerprint", "") if meta.is_file() else ""
    items = (data_dir / "items.parquet").stat()
    key = {"tokenizer": resolve_pretrained(tokenizer), "max_tokens": max_tokens, "items": fingerprint or [items.st_size, items.st_mtime_ns]}
    return data_dir / "tokens" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def ensure_tokens(data_dir: str | Path, tokenizer: str, max_tokens: int, texts: list[str] | None = None) -> Path:
    """The folder of ``data_dir``'s tokens, tokenised and written first if missing (``texts``: the
    items' texts, if already read); a folder that is there is not opened."""
    data_dir = Path(data_dir)
    folder = tokens_folder(data_dir, tokenizer, max_tokens)
    if all((folder / f).is_file() for f in FILES):
        return folder
    if texts is None:
        texts = pq.read_table(data_dir / "items.parquet", columns=["text"])["text"].to_pylist()
    log.info("data: tokenising %d item texts once into %s", len(texts), folder)
    ids, mask = tokenize_catalog(load_tokenizer(tokenizer), texts, max_tokens)
    writing = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(writing, ignore_errors=True)
    writing.mkdir(parents=True)
    for name, tensor in zip(FILES, (ids, mask), strict=True):
        np.save(writing / name, tensor.numpy())
    try:
        writing.rename(folder)
    except OSError:  # another process put its (identical) pair in place first
        shutil.rmtree(writing, ignore_errors=True)
    return folder


def catalog_tokens(data_dir: str | Path, tokenizer: str, max_tokens: int, texts: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks of every item of ``data_dir`` (as
    :func:`~lightning_modules.item_tower.tokenize_catalog` gives them), memory-mapped copy-on-write;
    made first if missing (:func:`ensure_tokens`)."""
    folder = ensure_tokens(data_dir, tokenizer, max_tokens, texts)
    ids_arr, mask_arr = (np.load(folder / f, mmap_mode="c") for f in FILES)
    items = Path(data_dir) / "items.parquet"
    rows = len(texts) if texts is not None else pq.ParquetFile(items).metadata.num_rows
    if ids_arr.shape[0] != rows or mask_arr.shape != ids_arr.shape:
        raise ValueError(f"{folder}: tokens for {ids_arr.shape[0]} items, but {items} has {rows}: remove the folder to tokenise again")
    return torch.from_numpy(ids_arr), torch.from_numpy(mask_arr)
