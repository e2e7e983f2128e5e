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
from omegaconf import DictConfig

from datamodules.sequence_datamodule import SequenceDataModule
from jobs.assembly import build_datamodule, build_model
from jobs.training import load_model_checkpoint, restore_config
from lightning_modules.two_tower_model import TwoTowerModel


@dataclass
class UserHistories:
    """Every user's whole history: the recent items the user tower reads and the full seen set."""

    items: np.ndarray  # [U, max_seq_len] int64, the last max_seq_len items, right-padded with 0
    lengths: np.ndarray  # [U] int64, real items in each row of ``items``
    seen: list[np.ndarray]  # every item of each user's history (train + valid + test)


def checkpoint_config(ckpt_path: str | Path) -> DictConfig:
    """The training config stored in a consolidated checkpoint, typed by the schema."""
    return restore_config(load_model_checkpoint(Path(ckpt_path))["config"])


def load_embedding_model(
    ckpt_path: str | Path, device: str = "cpu", dm: SequenceDataModule | None = None, data_dir: str | None = None
) -> TwoTowerModel:
    """The checkpoint's model in eval mode on ``device``, rebuilt from its stored config.

    ``dm``: an already built datamodule of the same data (else built from the stored config);
    ``data_dir``: overrides the stored ``paths.data_dir`` (e.g. made absolute for Ray workers).
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model checkpoint")
    payload = load_model_checkpoint(path)
    cfg = restore_config(payload["config"])
    if data_dir is not None:
        cfg.paths.data_dir = data_dir
    if dm is None:
        dm = build_datamodule(cfg)
    model = build_model(cfg, dm)
    model.load_state_dict(payload["state_dict"])
    return model.to(device).eval()


def full_histories(dm: SequenceDataModule) -> list[np.ndarray]:
    """Each user's whole chronological history: training items (cold-start ones included: in
    production every item is known), then the valid and the test item."""
    return [np.append(h, t).astype(np.int64) for h, t in zip(dm.history("test", seen=True), dm.test_targets)]


def user_histories(histories: list[np.ndarray], max_seq_len: int) -> UserHistories:
    """Right-padded last ``max_seq_len`` items of each history, their lengths, and the seen sets."""
    if max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be >= 1, got {max_seq_len}")
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
    if batch_size < 1:
        raise ValueError(f"infer.batch_size must be >= 1, got {batch_size}")
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
