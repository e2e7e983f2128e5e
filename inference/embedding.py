"""Embedding the catalog and the users with a trained two-tower model, batch by batch.

Plain functions, usable in this process or inside Ray actors (``jobs.batch_infer`` wraps them).
Embeddings are the model's own outputs (``catalog``/``user_vectors``, normalised when the model
normalises); a score is their inner product divided by the model's temperature.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.bundle import load_bundle
from lightning_modules.two_tower_model import TwoTowerModel


@dataclass
class UserHistories:
    """Every user's whole history: the recent items the user tower reads and the full seen set."""

    items: np.ndarray  # [U, max_seq_len] int64, the last max_seq_len items, right-padded with 0
    lengths: np.ndarray  # [U] int64, real items in each row of ``items``
    seen: list[np.ndarray]  # every item of each user's history (train + valid + test)


def load_embedding_model(bundle_path: str | Path, device: str = "cpu") -> TwoTowerModel:
    """The bundle's model in eval mode on ``device`` (inference/bundle.py; no dataset needed)."""
    return load_bundle(bundle_path, device).model


def user_histories(histories: list[np.ndarray], max_seq_len: int) -> UserHistories:
    """Right-padded last ``max_seq_len`` items of each history, their lengths, and the seen sets."""
    items = np.zeros((len(histories), max_seq_len), dtype=np.int64)
    lengths = np.zeros(len(histories), dtype=np.int64)
    for row, hist in enumerate(histories):
        if len(hist) == 0:
            raise ValueError(f"user row {row} has an empty history; it cannot be embedded")
        recent = hist[-max_seq_len:]
        items[row, : len(recent)] = recent
        lengths[row] = len(recent)
    return UserHistories(items, lengths, [np.asarray(h, dtype=np.int64) for h in histories])


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def embed_items(model: TwoTowerModel, item_idx: np.ndarray) -> np.ndarray:
    """Vectors of the given catalog items, [B, dim] float32 (as ``model.catalog_vectors()`` rows)."""
    idx = torch.tensor(np.asarray(item_idx), dtype=torch.long, device=_device(model))
    if idx.numel() and (idx.min() < 0 or idx.max() >= model.item_tower.num_items):
        raise ValueError(f"item indices must lie in [0, {model.item_tower.num_items}), got {idx.min().item()}..{idx.max().item()}")
    return model.item_vectors(idx).float().cpu().numpy()


@torch.no_grad()
def embed_users(model: TwoTowerModel, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """User vectors after the last real item of each right-padded row, [B, dim] float32."""
    lengths_t = torch.tensor(np.asarray(lengths), dtype=torch.long)
    if lengths_t.numel() == 0:
        return np.zeros((0, model.item_tower.dim), dtype=np.float32)
    if lengths_t.min() < 1:
        raise ValueError("every user row needs at least one item (length >= 1)")
    width = int(lengths_t.max())
    device = _device(model)
    items_t = torch.tensor(np.asarray(items)[:, :width], dtype=torch.long, device=device)
    mask = (torch.arange(width)[None, :] < lengths_t[:, None]).to(device)
    return model.user_vectors(items_t, mask).float().cpu().numpy()


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def embed_catalog(model: TwoTowerModel, num_items: int, batch_size: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Every item's vector in this process, ``batch_size`` items at a time: [num_items, dim]."""
    out = []
    for s in _batches(num_items, batch_size):
        out.append(embed_items(model, np.arange(s.start, s.stop)))
        if progress:
            progress(s.stop - s.start)
    return np.concatenate(out) if out else np.zeros((0, model.item_tower.dim), dtype=np.float32)


def embed_all_users(model: TwoTowerModel, users: UserHistories, batch_size: int, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Every user's vector in this process, ``batch_size`` users at a time: [U, dim]."""
    out = []
    for s in _batches(len(users.lengths), batch_size):
        out.append(embed_users(model, users.items[s], users.lengths[s]))
        if progress:
            progress(s.stop - s.start)
    return np.concatenate(out) if out else np.zeros((0, model.item_tower.dim), dtype=np.float32)
