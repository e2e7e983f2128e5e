"""The columnar data path (prepare, the split, the datamodule's start-up) against straightforward
per-row and per-user references, and the data stage of bench/scale.py in quick mode."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.leave_one_out import leave_one_out_split, user_time_order
from datamodules.preprocess import index_interactions, prepare
from datamodules.ragged import Ragged
from datamodules.raw_dataset import DataFormatError, RawDataset
from datamodules.sequence_datamodule import SequenceDataModule, TrainSequences

ROOT = Path(__file__).resolve().parents[2]


def random_raw(kind: str, seed: int = 0, n: int = 2500, stamps: np.ndarray | None = None) -> RawDataset:
    """Interactions with repeated (user, item) pairs, timestamp ties and users too short to keep;
    ``kind`` is the id columns' dtype: 'object' (Python strings) or 'str' (Arrow strings)."""
    rng = np.random.default_rng(seed)
    users = [f"u{u}" for u in rng.integers(0, 120, n)] + [f"short{k}" for k in range(30) for _ in range(k % 5)]
    items = [f"i{i}" for i in rng.integers(0, 60, len(users))]
    ts = rng.integers(0, 40, len(users)) if stamps is None else stamps[: len(users)]
    inter = pd.DataFrame({"user_id": pd.Series(users, dtype=kind), "item_id": pd.Series(items, dtype=kind), "timestamp": np.asarray(ts, dtype=np.int64)})
    catalog = pd.DataFrame({"item_id": [f"i{i}" for i in range(70)], "text": [f"t{i}" for i in range(70)], "categories": [[f"c{i % 4}"] for i in range(70)]})
    return RawDataset("random", inter, catalog)


def reference_prepare(raw: RawDataset, min_len: int, dedupe: bool) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The rules of prepare() one row at a time: interactions (file order) and split rows, users."""
    rows = [(str(u), str(i), int(t), k) for k, (u, i, t) in enumerate(zip(raw.interactions.user_id, raw.interactions.item_id, raw.interactions.timestamp))]
    if dedupe:
        first: dict[tuple[str, str], tuple[int, int]] = {}
        for u, i, t, k in rows:
            if (u, i) not in first or (t, k) < first[(u, i)]:
                first[(u, i)] = (t, k)
        rows = [r for r in rows if first[(r[0], r[1])] == (r[2], r[3])]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0]] = counts.get(r[0], 0) + 1
    rows = [r for r in rows if counts[r[0]] >= min_len]
    users: list[str] = []
    for r in rows:
        if r[0] not in users:
            users.append(r[0])
    item_idx = {item: k for k, item in enumerate(raw.items.item_id)}
    inter = pd.DataFrame(
        [(users.index(u), item_idx[i], u, i, t, k) for u, i, t, k in rows],
        columns=["user_idx", "item_idx", "user_id", "item_id", "timestamp", "order"],
    )
    split_rows = []
    for u in range(len(users)):
        mine = sorted((r for r in rows if r[0] == users[u]), key=lambda r: (r[2], r[3]))
        for p, (_, i, t, k) in enumerate(mine):
            kind = "test" if p == len(mine) - 1 else "valid" if p == len(mine) - 2 else "train"
            split_rows.append((u, item_idx[i], t, k, p, kind))
    split = pd.DataFrame(split_rows, columns=["user_idx", "item_idx", "timestamp", "order", "position", "split"])
    split = split.astype({"position": np.int32, "split": pd.CategoricalDtype(["train", "valid", "test"])})
    return inter, split, users


@pytest.mark.parametrize("dedupe,min_len", [(True, 3), (True, 6), (False, 3)])
def test_prepare_matches_the_row_by_row_rules_for_object_and_arrow_strings(tmp_path, dedupe, min_len):
    written = {}
    for kind in ("object", "str"):
        raw = random_raw(kind)
        prepare(raw, tmp_path / kind, min_user_interactions=min_len, dedupe=dedupe)
        written[kind] = {f: pd.read_parquet(tmp_path / kind / f"{f}.parquet") for f in ("interactions", "split", "users", "items")}
    ref_inter, ref_split, ref_users = reference_prepare(random_raw("object"), min_len, dedupe)
    for files in written.values():
        inter, split, users = files["interactions"], files["split"], files["users"]
        pd.testing.assert_frame_equal(inter, ref_inter)  # values, dtypes and row order
        pd.testing.assert_frame_equal(split, ref_split)
        assert users["user_id"].tolist() == ref_users
        assert users["num_interactions"].tolist() == [int((ref_inter.user_idx == u).sum()) for u in range(len(ref_users))]
    for f in ("interactions", "split", "users", "items"):  # and the same files whatever the input's string type
        pd.testing.assert_frame_equal(written["object"][f], written["str"][f])


def test_no_object_column_in_the_indexed_interactions_or_the_split():
    raw = random_raw("object")
    catalog = pa.array(raw.items["item_id"], type=pa.large_string())
    indexed = index_interactions(raw, catalog, min_user_interactions=3, dedupe=True)
    assert not any(dtype == object for dtype in indexed.frame.dtypes), indexed.frame.dtypes  # noqa: E721 (a dtype, compared by value)
    split = leave_one_out_split(indexed.frame[["user_idx", "item_idx", "timestamp", "order"]])
    assert not any(dtype == object for dtype in split.dtypes), split.dtypes  # noqa: E721 (a dtype, compared by value)
    assert split["split"].cat.codes.dtype == np.int8


def test_timestamps_too_wide_for_one_sort_key_fall_back_to_the_same_order(tmp_path):
    rng = np.random.default_rng(1)
    wide = rng.choice(np.array([-(2**62), 0, 2**62], dtype=np.int64), 3000)  # (span + 1) * rows overflows int64
    raw = random_raw("str", stamps=wide)
    prepare(raw, tmp_path)
    _, ref_split, _ = reference_prepare(raw, 3, True)
    split = pd.read_parquet(tmp_path / "split.parquet")
    pd.testing.assert_frame_equal(split, ref_split)


def test_user_time_order_is_a_stable_sort_on_user_time_and_order():
    rng = np.random.default_rng(2)
    user, ts = rng.integers(0, 30, 5000), rng.integers(0, 20, 5000)
    order = rng.permutation(5000)
    assert (user_time_order(user, ts, order) == np.lexsort((order, ts, user))).all()
    assert (user_time_order(user, ts) == np.lexsort((ts, user))).all()


def test_missing_ids_are_errors_naming_row_and_field(tmp_path):
    raw = random_raw("object")
    raw.interactions.loc[7, "user_id"] = None
    with pytest.raises(DataFormatError, match="field 'user_id'.*row 7 has no user_id"):
        prepare(raw, tmp_path)


def per_user_reference(folder: Path) -> dict[int, list[tuple[int, str]]]:
    split = pd.read_parquet(folder / "split.parquet")
    out: dict[int, list[tuple[int, str]]] = {}
    for u, i, _p, s in sorted(zip(split.user_idx, split.item_idx, split.position, split.split.astype(str)), key=lambda r: (r[0], r[2])):
        out.setdefault(int(u), []).append((int(i), s))
    return out


@pytest.mark.parametrize("cold_items", [0, 3])
def test_datamodule_matches_a_per_user_reference(tmp_path, cold_items):
    prepare(random_raw("str"), tmp_path)
    dm = SequenceDataModule(tmp_path, max_seq_len=4, cold_items=cold_items, cold_seed=1)
    dm.setup()
    ref = per_user_reference(tmp_path)
    assert dm.user_index.tolist() == sorted(ref)
    cold = set(np.flatnonzero(dm.cold_mask).tolist())
    assert len(cold) == cold_items
    for k, u in enumerate(dm.user_index):
        rows = ref[int(u)]
        seen = [i for i, s in rows if s == "train"]
        train = [i for i in seen if i not in cold]
        assert [s for _, s in rows][-2:] == ["valid", "test"]
        assert dm.valid_targets[k] == rows[-2][0] and dm.test_targets[k] == rows[-1][0]
        assert dm.train_sequences[k].tolist() == train
        assert dm.history("valid", seen=True)[k].tolist() == seen
        assert dm.history("test")[k].tolist() == train + [rows[-2][0]]
    counts = np.bincount([i for seq in ref.values() for i, s in seq if s == "train" and i not in cold], minlength=dm.num_items)
    assert dm.item_train_counts.tolist() == counts.tolist()
    if cold_items:
        picked = dm.eval_dataset("test", "cold")
        keep = [k for k, t in enumerate(dm.test_targets) if t in cold]
        assert picked.users.tolist() == dm.user_index[keep].tolist()
        assert [h.tolist() for h in picked.histories] == [dm.history("test")[k].tolist() for k in keep]
        assert [h.tolist() for h in picked.seen] == [dm.history("test", seen=True)[k].tolist() for k in keep]


def test_a_shuffled_string_split_reads_the_same_and_a_mislabelled_one_names_the_user(tmp_path):
    prepare(random_raw("str"), tmp_path)
    before = SequenceDataModule(tmp_path)
    before.setup()
    table = pd.read_parquet(tmp_path / "split.parquet")
    table["split"] = table["split"].astype(str)  # plain strings, not a dictionary
    table = table.sample(frac=1.0, random_state=0)  # and not in (user, position) order

    def write(frame: pd.DataFrame) -> None:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp_path / "split.parquet")

    write(table)
    after = SequenceDataModule(tmp_path)
    after.setup()
    assert after.user_index.tolist() == before.user_index.tolist()
    assert [s.tolist() for s in after.train_sequences] == [s.tolist() for s in before.train_sequences]
    assert after.test_targets.tolist() == before.test_targets.tolist() and after.valid_targets.tolist() == before.valid_targets.tolist()
    table.loc[(table.user_idx == 5) & (table.split == "valid"), "split"] = "train"
    write(table)
    with pytest.raises(ValueError, match="user_idx 5 is not split as train..., valid, test"):
        SequenceDataModule(tmp_path).setup()


def loop_windows(seq: np.ndarray, max_seq_len: int, windows: str) -> list[list[int]]:
    """TrainSequences' windows the plain way: from the end, every max_seq_len items."""
    out, end = [], len(seq)
    while end >= 2:
        out.append(seq[max(0, end - max_seq_len - 1) : end].tolist())
        if windows == "last":
            break
        end -= max_seq_len
    return out


@pytest.mark.parametrize("windows", ["all", "last"])
def test_train_windows_match_the_loop(windows):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 100, n) for n in rng.integers(0, 23, 200)]
    for max_seq_len in (1, 3, 7, 50):
        got = [w.tolist() for w in TrainSequences(seqs, max_seq_len, windows)]
        assert got == [w for s in seqs for w in loop_windows(s, max_seq_len, windows)]


def test_ragged_operations_match_lists():
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, 50, n) for n in rng.integers(0, 6, 40)]
    r = Ragged.from_arrays(seqs)
    assert len(r) == 40 and [s.tolist() for s in r] == [s.tolist() for s in seqs] and r[-1].tolist() == seqs[-1].tolist()
    tails = rng.integers(0, 50, 40)
    assert [s.tolist() for s in r.append_each(tails)] == [s.tolist() + [t] for s, t in zip(seqs, tails)]
    assert [s.tolist() for s in r.keep_values(r.values % 3 != 0)] == [[v for v in s.tolist() if v % 3] for s in seqs]
    rows = np.array([5, 0, 39, 5])
    assert [s.tolist() for s in r.take(rows)] == [seqs[k].tolist() for k in rows]
    with pytest.raises(IndexError):
        r[40]
    with pytest.raises(ValueError, match="offsets"):
        Ragged(np.arange(3), np.array([0, 2]))


def test_bench_data_stage_quick_mode_runs(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import scale_data

    rows = scale_data.run_stage(out_dir=tmp_path, quick=True)
    steps = ["generate", "prepare", "split", "datamodule"]
    assert [(r["stage"], r["step"]) for r in rows] == [("data", s) for s in steps] * len(scale_data.QUICK_ROWS)
    assert [r["target_rows"] for r in rows[:: len(steps)]] == list(scale_data.QUICK_ROWS)
    assert all(0.8 * r["target_rows"] < r["size"] < 1.2 * r["target_rows"] for r in rows)
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 50 and r["unit"] == "interactions" for r in rows)
    assert all((r["users"], r["items"]) == scale_data.shape(r["target_rows"]) for r in rows)
    assert not any(tmp_path.iterdir())  # each size's files are deleted once measured
