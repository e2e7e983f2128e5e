"""LightningDataModule over a prepared dataset: training sequences and full-ranking evaluation batches."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class TrainSequences(Dataset):
    """Windows of each user's training sequence: inputs s[t-L..t-1] predict targets s[t-L+1..t]."""

    def __init__(self, sequences: list[np.ndarray], max_seq_len: int, windows: str = "all"):
        self.samples: list[np.ndarray] = []
        for seq in sequences:
            end = len(seq)
            while end >= 2:
                self.samples.append(seq[max(0, end - max_seq_len - 1) : end])
                if windows == "last":
                    break
                end -= max_seq_len

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.samples[i]


def collate_train(chunks: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Right-pad windows; ``targets`` is -1 where there is nothing to predict."""
    length = max(len(c) for c in chunks) - 1
    items = torch.zeros(len(chunks), length, dtype=torch.long)
    targets = torch.full((len(chunks), length), -1, dtype=torch.long)
    mask = torch.zeros(len(chunks), length, dtype=torch.bool)
    for b, chunk in enumerate(chunks):
        n = len(chunk) - 1
        items[b, :n] = torch.tensor(chunk[:-1])
        targets[b, :n] = torch.tensor(chunk[1:])
        mask[b, :n] = True
    return {"items": items, "mask": mask, "targets": targets}


class EvalExamples(Dataset):
    """One example per user: the history before the held-out item, the item, and every seen item.

    ``seen`` defaults to the history; it differs when cold-start items were dropped from the
    model's input but must still be removed from the ranking.
    """

    def __init__(self, users: np.ndarray, histories: list[np.ndarray], targets: np.ndarray, max_seq_len: int, seen: list[np.ndarray] | None = None):
        self.users = users
        self.histories = histories
        self.targets = targets
        self.max_seq_len = max_seq_len
        self.seen = seen if seen is not None else histories

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, int, int, np.ndarray]:
        return int(self.users[i]), self.histories[i], int(self.targets[i]), self.max_seq_len, self.seen[i]


def collate_eval(rows: list[tuple[int, np.ndarray, int, int, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Right-padded recent history (at most max_seq_len) and the full seen set padded with -1."""
    max_seq_len = rows[0][3]
    length = max(1, max(min(len(r[1]), max_seq_len) for r in rows))
    seen_len = max(1, max(len(r[4]) for r in rows))
    items = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    seen = torch.full((len(rows), seen_len), -1, dtype=torch.long)
    for b, (_, hist, _, _, seen_items) in enumerate(rows):
        recent = hist[-max_seq_len:]
        items[b, : len(recent)] = torch.tensor(recent)
        mask[b, : len(recent)] = True
        seen[b, : len(seen_items)] = torch.tensor(seen_items)
    return {
        "users": torch.tensor([r[0] for r in rows], dtype=torch.long),
        "items": items,
        "mask": mask,
        "seen": seen,
        "targets": torch.tensor([r[2] for r in rows], dtype=torch.long),
    }


class SequenceDataModule(pl.LightningDataModule):
    """Serves training windows and valid/test full-ranking batches from ``split.parquet``."""

    def __init__(
        self,
        data_dir: str | Path,
        max_seq_len: int = 50,
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        train_windows: str = "all",
        cold_items: int = 0,
        cold_seed: int = 0,
    ):
        super().__init__()  # argument values are checked by the config schema, before any data is read
        self.data_dir = Path(data_dir)
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.train_windows = train_windows
        self.cold_items = cold_items
        self.cold_seed = cold_seed
        self._loaded = False

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        split = pd.read_parquet(self.data_dir / "split.parquet")
        items = pd.read_parquet(self.data_dir / "items.parquet")
        users = pd.read_parquet(self.data_dir / "users.parquet")
        self.num_items = len(items)
        self.num_users = len(users)
        self.item_ids = items["item_id"].to_numpy()
        self.user_ids = users["user_id"].to_numpy()
        self.item_texts = items["text"].tolist()
        self.item_titles = items["title"].tolist() if "title" in items.columns else list(self.item_texts)
        self.item_categories = [list(c) for c in items["categories"]]
        split = split.sort_values(["user_idx", "position"], kind="mergesort")
        user_col = split["user_idx"].to_numpy()
        item_col = split["item_idx"].to_numpy()
        split_col = split["split"].astype(str).to_numpy()
        bounds = np.flatnonzero(np.diff(user_col)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(user_col)]])
        self.user_index = user_col[starts]
        self.train_sequences, self.valid_targets, self.test_targets = [], [], []
        for s, e in zip(starts, ends):
            kinds = split_col[s:e]
            if kinds[-1] != "test" or kinds[-2] != "valid" or (kinds[:-2] != "train").any():
                raise ValueError(f"{self.data_dir / 'split.parquet'}: user_idx {user_col[s]} is not split as train..., valid, test")
            self.train_sequences.append(item_col[s : e - 2])
            self.valid_targets.append(item_col[e - 2])
            self.test_targets.append(item_col[e - 1])
        self.valid_targets = np.asarray(self.valid_targets)
        self.test_targets = np.asarray(self.test_targets)
        self.cold_mask = self._pick_cold_items()
        # every seen item, cold ones included: what the ranking removes
        self.seen_train_sequences = self.train_sequences
        if self.cold_mask.any():  # cold items never reach training: their interactions are dropped
            self.train_sequences = [seq[~self.cold_mask[seq]] for seq in self.train_sequences]
        counts = np.bincount(np.concatenate(self.train_sequences), minlength=self.num_items)
        self.item_train_counts = counts.astype(np.float64)
        self._loaded = True

    def _pick_cold_items(self) -> np.ndarray:
        """Boolean mask of the items held out of all training: ``cold_items`` items drawn
        (seeded) among the test items, so that each is some user's test target."""
        mask = np.zeros(self.num_items, dtype=bool)
        if self.cold_items:
            candidates = np.unique(self.test_targets)
            if self.cold_items > len(candidates):
                raise ValueError(f"data.cold_start.num_items={self.cold_items}: only {len(candidates)} distinct test items to hold out")
            rng = np.random.default_rng(self.cold_seed)
            mask[rng.choice(candidates, size=self.cold_items, replace=False)] = True
        return mask

    def history(self, split: str, seen: bool = False) -> list[np.ndarray]:
        """Each user's history before the held-out item of ``split`` ('valid' or 'test'): the
        model's input, or with ``seen`` every item seen (cold-start items included)."""
        train = self.seen_train_sequences if seen else self.train_sequences
        if split == "valid":
            return train
        if split == "test":
            return [np.append(seq, v) for seq, v in zip(train, self.valid_targets)]
        raise ValueError(f"unknown split '{split}'")

    def eval_dataset(self, split: str, targets_kind: str = "all") -> EvalExamples:
        """Evaluation examples of ``split``; ``targets_kind`` 'cold' or 'warm' keeps the users
        whose held-out item is (is not) a cold-start item."""
        targets = self.valid_targets if split == "valid" else self.test_targets
        users, hist = self.user_index, self.history(split)
        seen = self.history(split, seen=True) if self.cold_mask.any() else hist
        if targets_kind != "all":
            if targets_kind not in ("cold", "warm"):
                raise ValueError(f"targets_kind must be 'all', 'cold' or 'warm', got '{targets_kind}'")
            keep = self.cold_mask[targets] == (targets_kind == "cold")
            users, targets = users[keep], targets[keep]
            hist = [h for h, k in zip(hist, keep) if k]
            seen = [h for h, k in zip(seen, keep) if k]
        return EvalExamples(users, hist, targets, self.max_seq_len, seen)

    def train_dataloader(self) -> DataLoader:
        data = TrainSequences(self.train_sequences, self.max_seq_len, self.train_windows)
        return DataLoader(data, batch_size=self.batch_size, shuffle=True, collate_fn=collate_train, num_workers=self.num_workers, drop_last=False)

    def eval_dataloader(self, split: str, targets_kind: str = "all") -> DataLoader:
        return DataLoader(self.eval_dataset(split, targets_kind), batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_eval, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
