"""Preprocessing, the chronological leave-one-out split and the datamodule's batches, on hand-made data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datamodules.leave_one_out import leave_one_out_split
from datamodules.preprocess import load_prepared, prepare
from datamodules.raw_dataset import DataFormatError, RawDataset
from datamodules.sequence_datamodule import SequenceDataModule, TrainSequences, collate_train


def raw(rows: list[tuple[str, str, int]], items=("a", "b", "c", "d", "e")) -> RawDataset:
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    inter["timestamp"] = inter["timestamp"].astype(np.int64)
    its = pd.DataFrame({"item_id": list(items), "text": [f"text {i}" for i in items], "categories": [[i.upper()] for i in items]})
    return RawDataset("hand", inter, its)


ROWS = [
    ("u1", "a", 10),
    ("u2", "b", 5),
    ("u1", "c", 30),
    ("u1", "b", 20),
    ("u2", "d", 7),
    ("u2", "a", 7),
    ("u2", "e", 9),
    ("u1", "d", 30),
]


def test_split_is_chronological_with_file_order_breaking_ties(tmp_path):
    prepare(raw(ROWS), tmp_path)
    split = pd.read_parquet(tmp_path / "split.parquet")
    items = pd.read_parquet(tmp_path / "items.parquet").set_index("item_idx")["item_id"]
    users = pd.read_parquet(tmp_path / "users.parquet").set_index("user_idx")["user_id"]
    got = {(users[u], items[i], s) for u, i, s in zip(split.user_idx, split.item_idx, split.split.astype(str))}
    # u1: a(10) b(20) c(30, row 2) d(30, row 7) -> c before d by file order
    # u2: b(5) d(7, row 4) a(7, row 5) e(9)
    assert got == {
        ("u1", "a", "train"),
        ("u1", "b", "train"),
        ("u1", "c", "valid"),
        ("u1", "d", "test"),
        ("u2", "b", "train"),
        ("u2", "d", "train"),
        ("u2", "a", "valid"),
        ("u2", "e", "test"),
    }
    assert list(users) == ["u1", "u2"]  # numbered by first appearance
    assert list(items) == ["a", "b", "c", "d", "e"]  # item file order
    inter = pd.read_parquet(tmp_path / "interactions.parquet")
    assert set(inter.columns) >= {"user_idx", "item_idx", "user_id", "item_id", "timestamp"}


def test_split_needs_three_interactions_per_user():
    df = pd.DataFrame({"user_idx": [0, 0], "item_idx": [1, 2], "timestamp": [1, 2], "order": [0, 1]})
    with pytest.raises(ValueError, match="fewer than 3"):
        leave_one_out_split(df)


def test_repeats_and_short_users_are_dropped_and_counted(tmp_path, caplog):
    rows = ROWS + [("u1", "a", 40), ("u3", "a", 1), ("u3", "b", 2)]
    prepared = prepare(raw(rows), tmp_path)
    assert (prepared.num_users, prepared.num_items, prepared.num_interactions) == (2, 5, 8)
    assert "dropped 1 repeated" in caplog.text and "1 users" in caplog.text
    assert load_prepared(tmp_path, fingerprint="") is not None
    assert load_prepared(tmp_path, fingerprint="other") is None


def test_unknown_item_and_empty_input_are_errors(tmp_path):
    with pytest.raises(DataFormatError, match="unknown item_id 'zzz'"):
        prepare(raw(ROWS + [("u1", "zzz", 50)]), tmp_path)
    with pytest.raises(DataFormatError, match="no interactions"):
        prepare(raw([]), tmp_path)
    with pytest.raises(DataFormatError, match="duplicate item_id 'a'"):
        prepare(raw(ROWS, items=("a", "a", "b", "c", "d", "e")), tmp_path)


def test_train_windows_cover_the_sequence_from_its_end():
    seq = np.arange(7)
    windows = list(TrainSequences([seq], max_seq_len=3, windows="all"))
    assert [list(w) for w in windows] == [[3, 4, 5, 6], [0, 1, 2, 3]]
    assert [list(w) for w in TrainSequences([seq], 3, "last")] == [[3, 4, 5, 6]]
    assert len(TrainSequences([np.arange(1)], 3)) == 0
    batch = collate_train([np.array([3, 4, 5, 6]), np.array([7, 8])])
    assert batch["items"].tolist() == [[3, 4, 5], [7, 0, 0]]
    assert batch["targets"].tolist() == [[4, 5, 6], [8, -1, -1]]
    assert batch["mask"].tolist() == [[True, True, True], [True, False, False]]


def test_eval_batches_hold_history_target_and_seen(tmp_path):
    prepare(raw(ROWS), tmp_path)
    dm = SequenceDataModule(tmp_path, max_seq_len=2, batch_size=8, eval_batch_size=8)
    dm.setup()
    # item_idx: a0 b1 c2 d3 e4; u1 = a b | c | d ; u2 = b d | a | e
    valid = next(iter(dm.val_dataloader()))
    assert valid["targets"].tolist() == [2, 0]
    assert valid["items"].tolist() == [[0, 1], [1, 3]]
    assert valid["seen"].tolist() == [[0, 1], [1, 3]]
    test = next(iter(dm.test_dataloader()))
    assert test["targets"].tolist() == [3, 4]
    assert test["items"].tolist() == [[1, 2], [3, 0]]  # the last max_seq_len=2 items
    assert test["seen"].tolist() == [[0, 1, 2], [1, 3, 0]]  # every seen item, not only the recent ones
    assert dm.item_train_counts.tolist() == [1, 2, 0, 1, 0]
    train = next(iter(dm.train_dataloader()))
    assert sorted(train["targets"][train["targets"] >= 0].tolist()) == [1, 3]


def test_cold_start_items_never_reach_training_but_stay_seen(tmp_path):
    prepare(raw(ROWS), tmp_path)

    # item_idx: a0 b1 c2 d3 e4; u1 = a b | c | d ; u2 = b d | a | e. Test items: d3, e4.
    def module(seed: int) -> SequenceDataModule:
        dm = SequenceDataModule(tmp_path, max_seq_len=4, cold_items=1, cold_seed=seed)
        dm.setup()
        return dm

    by_seed = {seed: int(np.flatnonzero(module(seed).cold_mask)[0]) for seed in range(20)}
    assert set(by_seed.values()) == {3, 4}  # drawn among the test items only
    assert all(int(np.flatnonzero(module(seed).cold_mask)[0]) == item for seed, item in by_seed.items())  # seeded
    dm = module(next(seed for seed, item in by_seed.items() if item == 3))
    assert [s.tolist() for s in dm.train_sequences] == [[0, 1], [1]]  # d (3) dropped from u2's training
    assert dm.item_train_counts[3] == 0
    test = next(iter(dm.test_dataloader()))
    assert test["items"].tolist() == [[0, 1, 2], [1, 0, 0]]  # the model's input has no cold item
    assert test["seen"].tolist() == [[0, 1, 2], [1, 3, 0]]  # but d is still removed from u2's ranking
    cold = next(iter(dm.eval_dataloader("test", "cold")))
    warm = next(iter(dm.eval_dataloader("test", "warm")))
    assert cold["targets"].tolist() == [3] and cold["users"].tolist() == [0]
    assert warm["targets"].tolist() == [4] and warm["users"].tolist() == [1]
    with pytest.raises(ValueError, match="only 2 distinct test items"):
        SequenceDataModule(tmp_path, cold_items=3).setup()


def _sequences_file(path, users: list[tuple[int, list[int]]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table(
            {
                "user_idx": pa.array([u for u, _ in users], pa.int64()),
                "user_id": pa.array([f"u{u}" for u, _ in users]),
                "item_idx": pa.array([h for _, h in users], pa.list_(pa.int64())),
                "valid_position": pa.array([len(h) - 2 for _, h in users], pa.int64()),
                "test_position": pa.array([len(h) - 1 for _, h in users], pa.int64()),
            }
        ),
        path,
    )


def test_read_users_orders_the_users_of_sequence_files_listed_out_of_user_order(tmp_path):
    from datamodules.sequence_datamodule import SEQUENCES, read_users

    folder = tmp_path / SEQUENCES
    folder.mkdir()
    _sequences_file(folder / "a.parquet", [(2, [5, 6, 7]), (3, [8, 9, 1, 2])])  # read first, holds the later users
    _sequences_file(folder / "b.parquet", [(0, [1, 2, 3]), (1, [4, 4, 5])])
    ids, users, items, offsets = read_users(tmp_path)
    assert ids.to_pylist() == ["u0", "u1", "u2", "u3"]
    assert offsets.tolist() == [0, 3, 6, 9, 13]
    assert items.tolist() == [1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 1, 2]
    assert users.tolist() == [0, 1, 2, 3]
    ids, users, items, offsets = read_users(tmp_path, 1, 3)  # a range across both files
    assert ids.to_pylist() == ["u1", "u2"] and users.tolist() == [1, 2]
    assert items.tolist() == [4, 4, 5, 5, 6, 7] and offsets.tolist() == [0, 3, 6]


def test_read_users_orders_users_interleaved_across_sequence_files(tmp_path):
    from datamodules.sequence_datamodule import SEQUENCES, read_users

    folder = tmp_path / SEQUENCES
    folder.mkdir()
    _sequences_file(folder / "a.parquet", [(1, [4, 4, 5]), (2, [5, 6, 7])])  # each file's users are in order,
    _sequences_file(folder / "b.parquet", [(0, [1, 2, 3]), (3, [8, 9, 1, 2])])  # their ranges overlap
    ids, users, items, offsets = read_users(tmp_path)
    assert ids.to_pylist() == ["u0", "u1", "u2", "u3"] and users.tolist() == [0, 1, 2, 3]
    assert items.tolist() == [1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 1, 2] and offsets.tolist() == [0, 3, 6, 9, 13]


def test_read_users_names_the_first_user_missing_from_the_sequence_files(tmp_path):
    from datamodules.sequence_datamodule import SEQUENCES, read_users

    folder = tmp_path / SEQUENCES
    folder.mkdir()
    _sequences_file(folder / "a.parquet", [(0, [1, 2, 3]), (2, [5, 6, 7])])
    with pytest.raises(ValueError, match="field 'user_idx' is not 0..1 \\(user_idx 2\\)"):
        read_users(tmp_path)
