"""Embedding the catalog and the users with a trained two-tower model, batch by batch.

Plain functions, usable in this process or inside Ray actors (``jobs.batch_infer`` wraps them).
Embeddings are the model's own outputs (``catalog``/``user_vectors``, normalised when the model
normalises); a score is their inner product divided by the model's temperature.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.bundle import load_model
from inference.faiss_index import SeenItems
from lightning_modules.two_tower_model import TwoTowerModel


@dataclass
class UserHistories:
    """Every user's whole history: the recent items the user tower reads and the full seen set."""

    items: np.ndarray  # [U, max_seq_len] int64, the last max_seq_len items, right-padded with 0
    lengths: np.ndarray  # [U] int64, real items in each row of ``items``
    seen: SeenItems  # every item of each user's history (train + valid + test), one flat array


def load_embedding_model(bundle_path: str | Path, device: str = "cpu") -> TwoTowerModel:
    """The bundle's model in eval mode on ``device`` (inference/bundle.py; no dataset, and neither
    the users nor the catalog's texts are read)."""
    return load_model(bundle_path, device)


def user_histories(histories: Sequence[np.ndarray] | SeenItems, max_seq_len: int) -> UserHistories:
    """Right-padded last ``max_seq_len`` items of each history, their lengths, and the seen sets,
    computed for all users at once (no loop over users)."""
    seen = histories if isinstance(histories, SeenItems) else SeenItems.from_lists(histories)
    counts = np.diff(seen.offsets)
    if len(counts) and counts.min() == 0:
        raise ValueError(f"user row {int(np.argmin(counts))} has an empty history; it cannot be embedded")
    lengths = np.minimum(counts, max_seq_len).astype(np.int64)
    starts = seen.offsets[1:] - lengths
    position = np.arange(max_seq_len, dtype=np.int64)
    real = position[None, :] < lengths[:, None]
    items = np.where(real, seen.items[np.where(real, starts[:, None] + position[None, :], 0)] if len(seen.items) else 0, 0).astype(np.int64)
    return UserHistories(items, lengths, seen)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


Encoded = tuple[torch.Tensor, torch.Tensor]  # (item indices, sorted; their pooled text encodings): see ItemTower.forward

TEXT_SLAB = 65_536  # items per call of the text encoder when the catalog's text is encoded (it sorts each slab by length)


@torch.no_grad()
def encode_catalog_text(model: TwoTowerModel, item_idx: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> Encoded | None:
    """The pooled text encodings of catalog items (all by default), computed once so that item
    and user vectors reuse them: without them every batch of users runs the text encoder again
    over every item of its histories. None for an id-only item tower."""
    tower = model.item_tower
    if tower.encoder is None:
        return None
    device = _device(model)
    idx = torch.arange(tower.num_items, device=device) if item_idx is None else torch.as_tensor(np.sort(np.asarray(item_idx)), dtype=torch.long, device=device)
    parts = []
    for chunk in idx.split(TEXT_SLAB):
        parts.append(tower.encode_text(chunk))
        if progress:
            progress(chunk.numel())
    text = torch.cat(parts) if parts else torch.zeros((0, tower.encoder.config.hidden_size), device=device)
    return idx, text


def _encoded_on(encoded: Encoded | None, device: torch.device) -> Encoded | None:
    return None if encoded is None else (encoded[0].to(device), encoded[1].to(device))


@torch.no_grad()
def embed_items(model: TwoTowerModel, item_idx: np.ndarray, encoded: Encoded | None = None) -> np.ndarray:
    """Vectors of the given catalog items, [B, dim] float32 (as ``model.catalog_vectors()`` rows).
    ``encoded``: their text encodings already computed (``encode_catalog_text``)."""
    idx = torch.tensor(np.asarray(item_idx), dtype=torch.long, device=_device(model))
    if idx.numel() and (idx.min() < 0 or idx.max() >= model.item_tower.num_items):
        raise ValueError(f"item indices must lie in [0, {model.item_tower.num_items}), got {idx.min().item()}..{idx.max().item()}")
    return model.item_vectors(idx, encoded=_encoded_on(encoded, idx.device)).float().cpu().numpy()


@torch.no_grad()
def embed_users(model: TwoTowerModel, items: np.ndarray, lengths: np.ndarray, encoded: Encoded | None = None) -> np.ndarray:
    """User vectors after the last real item of each right-padded row, [B, dim] float32.
    ``encoded``: the text encodings of (at least) every item in ``items`` (``encode_catalog_text``)."""
    lengths_t = torch.tensor(np.asarray(lengths), dtype=torch.long)
    if lengths_t.numel() == 0:
        return np.zeros((0, model.item_tower.dim), dtype=np.float32)
    if lengths_t.min() < 1:
        raise ValueError("every user row needs at least one item (length >= 1)")
    width = int(lengths_t.max())
    device = _device(model)
    items_t = torch.tensor(np.asarray(items)[:, :width], dtype=torch.long, device=device)
    mask = (torch.arange(width)[None, :] < lengths_t[:, None]).to(device)
    return model.user_vectors(items_t, mask, encoded=_encoded_on(encoded, device)).float().cpu().numpy()


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def embed_catalog(
    model: TwoTowerModel, num_items: int, batch_size: int, progress: Callable[[int], None] | None = None, encoded: Encoded | None = None
) -> np.ndarray:
    """Every item's vector in this process, ``batch_size`` items at a time: [num_items, dim].
    ``encoded``: the catalog's text encodings when already computed."""
    encoded = encoded if encoded is not None else encode_catalog_text(model)
    out = []
    for s in _batches(num_items, batch_size):
        out.append(embed_items(model, np.arange(s.start, s.stop), encoded))
        if progress:
            progress(s.stop - s.start)
    return np.concatenate(out) if out else np.zeros((0, model.item_tower.dim), dtype=np.float32)


def embed_all_users(
    model: TwoTowerModel, users: UserHistories, batch_size: int, progress: Callable[[int], None] | None = None, encoded: Encoded | None = None
) -> np.ndarray:
    """Every user's vector in this process, ``batch_size`` users at a time: [U, dim].
    ``encoded``: the catalog's text encodings when already computed."""
    encoded = encoded if encoded is not None else encode_catalog_text(model)
    out = []
    for s in _batches(len(users.lengths), batch_size):
        out.append(embed_users(model, users.items[s], users.lengths[s], encoded))
        if progress:
            progress(s.stop - s.start)
    return np.concatenate(out) if out else np.zeros((0, model.item_tower.dim), dtype=np.float32)
