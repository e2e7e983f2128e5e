"""LightningDataModule over a prepared dataset: training sequences and full-ranking evaluation batches."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from datamodules.leave_one_out import SPLITS, TEST, TRAIN, VALID, group_starts, positions_and_counts, split_codes
from datamodules.preprocess import SEQUENCES, load_prepared
from datamodules.ragged import Ragged, gc_paused


def _split_codes(path: Path, column: pa.ChunkedArray) -> np.ndarray:
    """Index into SPLITS of each row of the ``split`` column (dictionary-encoded or plain strings)."""
    arr = column.combine_chunks()
    if not pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_encode()
    names = arr.dictionary.to_pylist()
    unknown = [n for n in names if n not in SPLITS]
    if unknown or arr.null_count:
        raise ValueError(f"{path}: field 'split' holds {unknown[0] if unknown else 'null'!r}, expected one of {SPLITS}")
    lookup = np.array([SPLITS.index(n) for n in names], dtype=np.int8)
    return lookup[arr.indices.to_numpy(zero_copy_only=False)]


class TrainSequences(Dataset):
    """Windows of each user's training sequence: inputs s[t-L..t-1] predict targets s[t-L+1..t].

    Windows are cut from the end of each sequence, every ``max_seq_len`` items (``windows='all'``)
    or only the last one; each is a (start, end) pair into the flat item array, computed for
    all users at once.
    """

    def __init__(self, sequences: Ragged | list[np.ndarray], max_seq_len: int, windows: str = "all"):
        seqs = Ragged.from_arrays(sequences)
        lengths = seqs.lengths()
        per_seq = np.where(lengths >= 2, (lengths - 2) // max_seq_len + 1, 0)
        if windows == "last":
            per_seq = np.minimum(per_seq, 1)
        seq = np.repeat(np.arange(len(seqs), dtype=np.int64), per_seq)
        first = np.cumsum(per_seq) - per_seq
        back = np.arange(len(seq), dtype=np.int64) - np.repeat(first, per_seq)  # 0 = the last window
        end = lengths[seq] - back * max_seq_len
        self.values = seqs.values
        self.sequence = seq  # the sequence (user row) each window is cut from
        self.ends = seqs.offsets[seq] + end
        self.starts = seqs.offsets[seq] + np.maximum(0, end - max_seq_len - 1)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.values[self.starts[i] : self.ends[i]]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class RankShardSampler(Sampler[int]):
    """One rank's training windows when each rank holds only its own users (``data.shard_by_rank``):
    every epoch a fresh permutation of the rank's windows, wrapped around to ``total`` so that all
    ranks step the same number of batches (as torch's DistributedSampler pads its shards). Keeps a
    line per epoch of what it scheduled: the window count and the distinct users (global user_idx)
    those windows come from, with the smallest and largest."""

    def __init__(self, data: TrainSequences, user_index: np.ndarray, total: int):
        if len(data) == 0:
            raise ValueError(f"data.shard_by_rank: this rank's users (user_idx {int(user_index[0]) if len(user_index) else '-'}..) have no training window")
        self.data, self.user_index, self.total = data, user_index, total
        self.epochs: list[dict[str, int]] = []

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.data)).numpy()
        order = np.resize(order, self.total)  # wraps around: a few windows twice on the ranks with fewer
        users = self.user_index[np.flatnonzero(np.bincount(self.data.sequence[order], minlength=len(self.user_index)))]  # sorted, O(windows)
        self.epochs.append(
            {"windows_local": len(self.data), "windows": len(order), "users": len(users), "first_user": int(users[0]), "last_user": int(users[-1])}
        )
        return iter(order.tolist())


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

    def __init__(
        self, users: np.ndarray, histories: Ragged | list[np.ndarray], targets: np.ndarray, max_seq_len: int, seen: Ragged | list[np.ndarray] | None = None
    ):
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


def _all_reduce(values: np.ndarray, op: str) -> np.ndarray:
    """``values`` summed ('sum') or maximised ('max') over the ranks of torch.distributed's
    default group (on the GPU with NCCL, which reduces no CPU tensors)."""
    import torch.distributed as dist

    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.cpu().numpy()


def _user_range(lo: int, hi: int) -> list[tuple[str, str, int]]:
    """A Parquet filter on user_idx in [lo, hi): row groups outside it are skipped by their statistics."""
    return [("user_idx", ">=", lo), ("user_idx", "<", hi)]


def read_items(data_dir: Path) -> tuple[int, np.ndarray, list, list, list]:
    """The catalog of a prepared dataset: its size, item ids, texts, titles and category lists
    (one Python object per item, none per interaction)."""
    items = pq.read_table(Path(data_dir) / "items.parquet")
    with gc_paused():
        texts = items["text"].to_pylist()
        titles = items["title"].to_pylist() if "title" in items.column_names else list(texts)
        return items.num_rows, items["item_id"].to_numpy(), texts, titles, items["categories"].to_pylist()


def read_users(data_dir: Path, lo: int = 0, hi: int | None = None) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray, np.ndarray]:
    """Users lo <= user_idx < hi (all with ``hi`` None) of a prepared dataset, either layout: their
    raw ids and user_idx, and, ordered by user and position, every row's item_idx with each user's
    offsets into them (a user's rows are its whole history: train..., valid, test)."""
    data_dir = Path(data_dir)
    if (data_dir / SEQUENCES).is_dir():  # prepared by data.engine=ray
        return SequenceDataModule._read_sequences(data_dir / SEQUENCES, lo, hi)
    users = data_dir / "users.parquet"
    user_ids = pq.read_table(users, columns=["user_id"], filters=_user_range(lo, hi) if hi is not None else None)["user_id"]
    user_col, item_col, offsets = SequenceDataModule._read_split(data_dir / "split.parquet", lo, hi)
    return user_ids, user_col, item_col, offsets


def pick_cold_items(test_counts: np.ndarray, cold_items: int, seed: int) -> np.ndarray:
    """Boolean mask of ``cold_items`` items drawn (seeded) among those some user holds out as its
    test item (``test_counts`` > 0, a vector over the catalog)."""
    mask = np.zeros(len(test_counts), dtype=bool)
    candidates = np.flatnonzero(test_counts)
    if cold_items > len(candidates):
        raise ValueError(f"data.cold_start.num_items={cold_items}: only {len(candidates)} distinct test items to hold out")
    mask[np.random.default_rng(seed).choice(candidates, size=cold_items, replace=False)] = True
    return mask


class CatalogView:
    """What a driver needs of a prepared dataset to build the model and write its bundle, without
    holding its users: the catalog, the items' training counts and the cold-start mask, each a
    vector over the catalog, computed by reading the users ``piece_users`` at a time (the values
    :class:`SequenceDataModule` computes holding them all). :meth:`user_pieces` reads them again,
    piece by piece, for whoever writes them out."""

    PIECE_USERS = 65_536  # the bundle's users.parquet row group: about 3 M interactions, ~250 MB at the peak of a piece

    def __init__(self, data_dir: str | Path, cold_items: int = 0, cold_seed: int = 0, piece_users: int = PIECE_USERS):
        self.data_dir = Path(data_dir)
        prepared = load_prepared(self.data_dir)
        if prepared is None:
            raise ValueError(f"{self.data_dir}: not a complete prepared dataset (meta.json or a data file is missing)")
        self.num_users, self.piece_users = prepared.num_users, piece_users
        self.num_items, self.item_ids, self.item_texts, self.item_titles, self.item_categories = read_items(self.data_dir)
        counts, tests = np.zeros(self.num_items, dtype=np.int64), np.zeros(self.num_items, dtype=np.int64)
        for _, offsets, items in self.user_pieces():  # one pass: the training counts and the test items
            train = np.ones(len(items), dtype=bool)
            train[offsets[1:] - 1] = train[offsets[1:] - 2] = False
            counts += np.bincount(items[train], minlength=self.num_items)
            tests += np.bincount(items[offsets[1:] - 1], minlength=self.num_items)
        self.cold_mask = pick_cold_items(tests, cold_items, cold_seed) if cold_items else np.zeros(self.num_items, dtype=bool)
        counts[self.cold_mask] = 0  # cold items never reach training
        self.item_train_counts = counts.astype(np.float64)

    def user_pieces(self) -> Iterator[tuple[pa.ChunkedArray, np.ndarray, np.ndarray]]:
        """The users in order, ``piece_users`` at a time: raw ids, offsets and item indices (whole histories)."""
        pool = pa.default_memory_pool()
        for lo in range(0, self.num_users, self.piece_users):
            user_ids, _, items, offsets = read_users(self.data_dir, lo, min(lo + self.piece_users, self.num_users))
            yield user_ids, offsets, items
            del user_ids, items, offsets
            # Arrow's allocator (mimalloc) keeps the pages a piece freed and, piece after piece,
            # more of them: the driver's memory grew with the number of users until handed back here
            pool.release_unused()


class SequenceDataModule(pl.LightningDataModule):
    """Serves training windows and valid/test full-ranking batches from ``split.parquet``.

    With ``world_size`` > 1 (``data.shard_by_rank`` on a multi-worker run) each rank reads only
    its own users: the contiguous range ``user_idx`` in [U*rank/W, U*(rank+1)/W), row groups
    chosen by their statistics, so no rank reads the others' interactions. What must be global is
    reduced over torch.distributed: the items' training counts (the sampled softmax and the
    popularity baseline), the test items that cold-start items are drawn from, and the number of
    training windows and validation users, which every rank pads to the largest by wrapping
    around its own (the users a rank repeats are counted once when validation gathers)."""

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
        rank: int = 0,
        world_size: int = 1,
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
        self.rank, self.world_size = rank, world_size
        self.train_sampler: RankShardSampler | None = None
        self._loaded = False

    @property
    def sharded(self) -> bool:
        """Each rank holds only its own users (``world_size`` > 1)."""
        return self.world_size > 1

    def _global(self, values: np.ndarray, op: str = "sum") -> np.ndarray:
        return _all_reduce(values, op) if self.sharded else values

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        lo, hi = 0, None
        if self.sharded:
            prepared = load_prepared(self.data_dir)
            if prepared is None:
                raise ValueError(f"{self.data_dir}: not a complete prepared dataset (meta.json or a data file is missing)")
            total = prepared.num_users
            lo, hi = total * self.rank // self.world_size, total * (self.rank + 1) // self.world_size
            if hi == lo:
                raise ValueError(f"data.shard_by_rank: {total} users for {self.world_size} workers leave rank {self.rank} none")
        user_ids, self.user_index, item_col, offsets = read_users(self.data_dir, lo, hi)
        self.num_users = total if self.sharded else len(user_ids)
        self.first_user = lo  # user_ids[i] is the raw id of user_idx first_user + i
        self.shard = {"rank": self.rank, "world_size": self.world_size, "user_idx": [lo, lo + len(user_ids)], "rows_read": len(item_col)}
        self.num_items, self.item_ids, self.item_texts, self.item_titles, self.item_categories = read_items(self.data_dir)
        with gc_paused():
            self.user_ids = user_ids.to_numpy()
        self.valid_targets = item_col[offsets[1:] - 2]
        self.test_targets = item_col[offsets[1:] - 1]
        train_offsets = offsets - 2 * np.arange(len(offsets), dtype=np.int64)
        is_train = np.ones(len(item_col), dtype=bool)
        is_train[offsets[1:] - 1] = False
        is_train[offsets[1:] - 2] = False
        self.train_sequences = Ragged(item_col[is_train], train_offsets)
        del item_col, is_train
        pa.default_memory_pool().release_unused()  # what reading the users left in Arrow's pool
        self.cold_mask = self._pick_cold_items()
        # every seen item, cold ones included: what the ranking removes
        self.seen_train_sequences = self.train_sequences
        if self.cold_mask.any():  # cold items never reach training: their interactions are dropped
            self.train_sequences = self.train_sequences.keep_values(~self.cold_mask[self.train_sequences.values])
        counts = self._global(np.bincount(self.train_sequences.values, minlength=self.num_items))
        self.item_train_counts = counts.astype(np.float64)
        self._loaded = True

    def raw_user_ids(self) -> np.ndarray:
        """The raw id of each of this datamodule's users, in the order of ``user_index``."""
        return self.user_ids[self.user_index - self.first_user]

    @staticmethod
    def _read_split(path: Path, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each user's user_idx, the item_idx of split.parquet's rows (the users lo <= user_idx < hi,
        or all with ``hi`` None) ordered by user and position, and each user's offsets; checks, for all users
        at once, that each is split as train..., valid, test."""
        columns = ["user_idx", "item_idx", "position", "split"]
        table = pq.read_table(path, columns=columns, filters=_user_range(lo, hi) if hi is not None else None)
        user = table["user_idx"].to_numpy()
        position = table["position"].to_numpy()
        in_order = bool((user[1:] >= user[:-1]).all()) and bool(((position[1:] == position[:-1] + 1) | (position[1:] == 0)).all())
        if not in_order:  # prepare writes it in order; a file from elsewhere may not be
            perm = np.lexsort((position, user))
            table, user = table.take(pa.array(perm)), user[perm]
        item = table["item_idx"].to_numpy()
        codes = _split_codes(path, table["split"])
        offsets = group_starts(user)
        ends = offsets[1:]
        # in order, a user is well split iff its last row is test, the one before valid, and
        # every other row train: count the train rows instead of comparing each row
        if (
            (np.diff(offsets) < 2).any()
            or (codes[ends - 1] != TEST).any()
            or (codes[ends - 2] != VALID).any()
            or np.count_nonzero(codes == TRAIN) != len(codes) - 2 * len(ends)
        ):
            pos, counts = positions_and_counts(offsets)
            wrong = (codes != split_codes(pos, counts)) | (counts < 2)
            raise ValueError(f"{path}: user_idx {user[np.argmax(wrong)]} is not split as train..., valid, test")
        return user[offsets[:-1]], item, offsets

    @staticmethod
    def _read_sequences(folder: Path, lo: int = 0, hi: int | None = None) -> tuple[pa.ChunkedArray, np.ndarray, np.ndarray, np.ndarray]:
        """The per-user table of ``data.engine=ray`` (one row per user: its items in time order and
        its split positions; the users lo <= user_idx < hi, or all with ``hi`` None) as the users'
        raw ids and the arrays :meth:`_read_split` gives; checks that the users are numbered
        lo..hi-1 and split as train..., valid, test.

        Read a record batch at a time, each batch's items copied out and Arrow's freed pages handed
        back before the next: the whole table is never in memory as Arrow data beside its NumPy
        copy (at 50 M interactions a rank's peak was about 3x its items' bytes)."""
        dataset = pads.dataset(folder, format="parquet")
        where = None if hi is None else (pc.field("user_idx") >= lo) & (pc.field("user_idx") < hi)
        pool = pa.default_memory_pool()
        batches: list[tuple[np.ndarray, pa.Array, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        for batch in dataset.to_batches(columns=["user_idx", "user_id", "item_idx", "valid_position", "test_position"], filter=where):
            if batch.num_rows:
                lists = batch.column("item_idx")
                batches.append(
                    (
                        batch.column("user_idx").to_numpy(),
                        batch.column("user_id"),
                        np.diff(lists.offsets.to_numpy()).astype(np.int64),
                        lists.flatten().to_numpy().copy(),
                        batch.column("valid_position").to_numpy(),
                        batch.column("test_position").to_numpy(),
                    )
                )
            del batch
            pool.release_unused()
        batches.sort(key=lambda b: int(b[0][0]))  # the files are read in any order; each holds a range of users
        user, sizes, valid_position, test_position = (np.concatenate([b[k] for b in batches]) if batches else np.zeros(0, dtype=np.int64) for k in (0, 2, 4, 5))
        user_ids = pa.chunked_array([b[1] for b in batches], type=dataset.schema.field("user_id").type)
        item = np.concatenate([b[3] for b in batches]) if batches else np.zeros(0, dtype=np.int64)
        del batches
        offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        if len(user) > 1 and (np.diff(user) < 0).any():  # users interleaved across files: sort (a copy)
            order = np.argsort(user, kind="stable")
            sorted_rows = Ragged(item, offsets).take(order)
            item, offsets, sizes = sorted_rows.values, sorted_rows.offsets, sizes[order]
            user, user_ids, valid_position, test_position = user[order], user_ids.take(pa.array(order)), valid_position[order], test_position[order]
        end = lo + len(user) if hi is None else hi
        expected = np.arange(lo, lo + len(user))
        wrong = np.flatnonzero(user != expected)
        if len(wrong) or lo + len(user) != end:
            at = f"user_idx {user[wrong[0]]}" if len(wrong) else f"{len(user)} users found"
            raise ValueError(f"{folder}: field 'user_idx' is not {lo}..{end - 1} ({at})")
        wrong = (sizes < 3) | (valid_position != sizes - 2) | (test_position != sizes - 1)
        if wrong.any():
            raise ValueError(f"{folder}: user_idx {user[np.argmax(wrong)]} is not split as train..., valid, test")
        return user_ids, user, item, offsets

    def _pick_cold_items(self) -> np.ndarray:
        """Boolean mask of the items held out of all training: ``cold_items`` items drawn
        (seeded) among the test items, so that each is some user's test target."""
        if not self.cold_items:
            return np.zeros(self.num_items, dtype=bool)
        # the distinct test items of all users (of every rank's, when sharded)
        return pick_cold_items(self._global(np.bincount(self.test_targets, minlength=self.num_items)), self.cold_items, self.cold_seed)

    def history(self, split: str, seen: bool = False) -> Ragged:
        """Each user's history before the held-out item of ``split`` ('valid' or 'test'): the
        model's input, or with ``seen`` every item seen (cold-start items included)."""
        train = self.seen_train_sequences if seen else self.train_sequences
        if split == "valid":
            return train
        if split == "test":
            return train.append_each(self.valid_targets)
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
            hist, seen = hist.take(np.flatnonzero(keep)), seen.take(np.flatnonzero(keep))
        return EvalExamples(users, hist, targets, self.max_seq_len, seen)

    def train_dataloader(self) -> DataLoader:
        data = TrainSequences(self.train_sequences, self.max_seq_len, self.train_windows)
        if not self.sharded:
            return DataLoader(data, batch_size=self.batch_size, shuffle=True, collate_fn=collate_train, num_workers=self.num_workers, drop_last=False)
        total = int(self._global(np.array([len(data)]), "max")[0])
        self.train_sampler = RankShardSampler(data, self.user_index, total)
        return DataLoader(data, batch_size=self.batch_size, sampler=self.train_sampler, collate_fn=collate_train, num_workers=self.num_workers)

    def eval_dataloader(self, split: str, targets_kind: str = "all") -> DataLoader:
        examples = self.eval_dataset(split, targets_kind)
        data: Dataset = examples
        if self.sharded:  # every rank the same number of batches: its own users, wrapped around to the largest count
            total = int(self._global(np.array([len(examples)]), "max")[0])
            if not len(examples):
                raise ValueError(f"data.shard_by_rank: rank {self.rank} has no {split} users ({targets_kind})")
            data = Subset(examples, np.resize(np.arange(len(examples)), total).tolist())
        return DataLoader(data, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate_eval, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("valid")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")
