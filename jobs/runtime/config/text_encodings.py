"""A fully frozen text encoder's pooled output for every catalog item, computed once per prepared
dataset, catalog tokens and encoder weights into ``<data folder>/encodings/<key>/text.npy``, and
memory-mapped by every process that trains the item tower: no training worker runs the encoder
over the catalog at start-up, and the workers of a node read one copy from the page cache.

The key covers the tokens' folder (itself keyed by the prepared data, tokenizer and width), the
pooling and a digest of the encoder's weights, so a fine-tuning run from a bundle whose encoder
differs gets its own file. A Ray job's driver writes the file before any worker starts
(:func:`frozen_text_once`); a process that finds it missing (weights the driver could not know,
such as a sweep trial's) computes it itself, writing to a private file that is renamed into place,
so concurrent writers cannot leave a half-written one. A tower that is not fully frozen (trained
or partly unfrozen encoder) keeps computing what it needs, as before."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from jobs.runtime.config.catalog_tokens import catalog_tokens, tokens_folder
from jobs.runtime.tracking.console import say
from lightning_modules.item_tower import ItemTower

log = logging.getLogger(__name__)

FILE = "text.npy"


def frozen_text_wanted(cfg: DictConfig) -> bool:
    """Whether ``cfg``'s item tower has a text encoder that is frozen whole (its output cacheable)."""
    it = cfg.model.item_tower
    return bool(it.use_text and it.freeze_encoder and not it.unfreeze_top_layers)


def encoder_digest(encoder: torch.nn.Module) -> str:
    """SHA-256 of the encoder's state: every tensor's name, dtype, shape and bytes, in key order."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encodings_path(data_dir: Path, tokenizer: str, max_tokens: int, tower: ItemTower) -> Path:
    tokens = tokens_folder(data_dir, tokenizer, max_tokens)
    assert tower.encoder is not None
    key = {"tokens": tokens.name, "pooling": tower.pooling, "encoder": encoder_digest(tower.encoder), "items": tower.num_items}
    return data_dir / "encodings" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] / FILE


def install_frozen_text(tower: ItemTower, data_dir: str | Path | None, tokenizer: str, max_tokens: int) -> Path | None:
    """Give a fully frozen ``tower`` its catalog encodings from ``data_dir``'s file, computing
    and writing the file first if it is missing; returns the file, or None (and changes nothing)
    when the tower has no fully frozen encoder or no prepared folder."""
    if data_dir is None or not tower.caches_frozen_text:
        return None
    path = encodings_path(Path(data_dir), tokenizer, max_tokens, tower)
    if not path.is_file():
        start = time.perf_counter()
        say("item tower: encoding %d item texts once with the frozen text encoder", tower.num_items)
        text = tower.encode_catalog_text().cpu().float().numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        writing = path.with_name(f"{FILE}.partial-{os.getpid()}.npy")
        np.save(writing, text)
        os.replace(writing, path)  # whole or not at all; a concurrent writer's file is identical
        log.info("item tower: encoded %d item texts once with the frozen encoder into %s (%.1f s)", tower.num_items, path, time.perf_counter() - start)
    text = np.load(path, mmap_mode="c")
    if text.ndim != 2 or text.shape[0] != tower.num_items:
        raise ValueError(f"{path}: encodings of shape {list(text.shape)}, but the catalog has {tower.num_items} items: remove the folder to encode again")
    tower.set_frozen_text(torch.from_numpy(text))
    log.info("item tower: frozen text encodings of %d items memory-mapped from %s", tower.num_items, path)
    return path


def catalog_item_tower(cfg: DictConfig, stage: str, data_dir: Path) -> ItemTower:
    """The stage's item tower built alone, as a worker builds it (same seed), from the prepared
    catalog's tokens (not the users), with the encoder weights of ``init_from`` when fine-tuning."""
    from inference.bundle import read_weights
    from jobs.runtime.config.assembly import build_item_tower

    it = cfg.model.item_tower
    torch.manual_seed(cfg.seed)  # as the workers' seed_everything: a randomly initialised encoder matches theirs
    token_ids, attention = catalog_tokens(data_dir, it.tokenizer, it.max_text_tokens)
    tower = build_item_tower(cfg, token_ids.shape[0], token_ids, attention)
    if stage == "finetune" and cfg.init_from:
        prefix = "item_tower.encoder."
        weights = {k[len(prefix) :]: v for k, v in read_weights(cfg.init_from).items() if k.startswith(prefix)}
        assert tower.encoder is not None
        tower.encoder.load_state_dict(weights)
    return tower


def frozen_text_once(cfg: DictConfig, stage: str, data_dir: Path) -> Path | None:
    """On a Ray job's driver, before the workers start: the encodings file of the stage's item
    tower (:func:`catalog_item_tower`) made (:func:`install_frozen_text`). None when the config
    has no fully frozen encoder. The workers build the same tower (same seed and weights) and find the file."""
    if not frozen_text_wanted(cfg):
        return None
    it = cfg.model.item_tower
    return install_frozen_text(catalog_item_tower(cfg, stage, data_dir), data_dir, it.tokenizer, it.max_text_tokens)
