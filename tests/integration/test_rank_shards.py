"""``data.shard_by_rank``: each rank of a real torch.distributed group (2 processes, gloo) reads only
its own users' rows of a prepared folder, in both layouts (``split.parquet`` of the single-process
engine and the per-user ``sequences/`` parts of ``data.engine=ray``), and the two ranks together
give what one process reading everything gives."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.preprocess import prepare
from datamodules.sequence_datamodule import SequenceDataModule, TrainSequences
from datamodules.sharded_prepare import prepare_sharded
from datamodules.synthetic import generate_synthetic
from jobs.runtime.config.ray_cluster import free_loopback_port

MAX_SEQ_LEN, COLD_ITEMS, EPOCHS = 4, 3, 2


def windows_of(data: TrainSequences, rows) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in data[int(i)]) for i in rows]


def one_rank(rank: int, port: int, folders: list[str], out: str) -> None:
    """What one rank sees of each folder: its shard, the global counts, and per epoch the windows
    (as item tuples) and users its training sampler scheduled; its validation users."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    seen = {}
    for folder in folders:
        dm = SequenceDataModule(folder, max_seq_len=MAX_SEQ_LEN, batch_size=8, cold_items=COLD_ITEMS, cold_seed=3, rank=rank, world_size=2)
        dm.setup()
        epochs = []
        loader = dm.train_dataloader()  # once, as Lightning does; its sampler is drawn anew every epoch
        for _ in range(EPOCHS):
            order = list(iter(loader.sampler))
            data = loader.dataset
            epochs.append({"windows": windows_of(data, order), "users": dm.user_index[data.sequence[order]].tolist(), "batches": len(loader)})
        val = dm.val_dataloader()
        val_users = [int(u) for batch in val for u in batch["users"]]
        seen[folder] = {
            "shard": dm.shard,
            "num_users": dm.num_users,
            "counts": dm.item_train_counts,
            "cold": dm.cold_mask,
            "epochs": epochs,
            "sampler_lines": dm.train_sampler.epochs,
            "val_users": val_users,
            "val_batches": len(val),
            "raw_ids": dict(zip(dm.user_index.tolist(), dm.raw_user_ids().tolist(), strict=True)),
        }
    dist.destroy_process_group()
    Path(out, f"rank-{rank}.pkl").write_bytes(pickle.dumps(seen))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, shared_ray) -> dict[str, Path]:
    raw = generate_synthetic(num_users=90, num_items=40, num_topics=4, min_len=3, max_len=14, seed=5)
    base = tmp_path_factory.mktemp("rank-shards")
    single = prepare(raw, base / "single").folder
    # split.parquet in many row groups, so a rank's filter has groups to skip
    pq.write_table(pq.read_table(single / "split.parquet"), single / "split.parquet", row_group_size=64)
    sharded = prepare_sharded(raw, base / "sharded", num_buckets=3).folder
    return {"split": single, "sequences": sharded}


@pytest.fixture(scope="module")
def ranks(folders, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("rank-results")
    names = [str(f) for f in folders.values()]
    mp.start_processes(one_rank, args=(free_loopback_port(), names, str(out)), nprocs=2, join=True, start_method="spawn")
    return [pickle.loads((out / f"rank-{r}.pkl").read_bytes()) for r in range(2)]


def read_whole_and_ranks(folders, ranks, layout):
    """The layout's folder, one process's datamodule over all of it, and what each rank saw of it."""
    folder = folders[layout]
    whole = SequenceDataModule(folder, max_seq_len=MAX_SEQ_LEN, cold_items=COLD_ITEMS, cold_seed=3)
    whole.setup()
    return folder, whole, [r[str(folder)] for r in ranks]


@pytest.mark.parametrize("layout", ["split", "sequences"])
def test_two_ranks_read_disjoint_users_whose_rows_together_are_the_whole_data(folders, ranks, layout):
    folder, whole, (a, b) = read_whole_and_ranks(folders, ranks, layout)
    (lo0, hi0), (lo1, hi1) = a["shard"]["user_idx"], b["shard"]["user_idx"]
    assert lo0 == 0 and hi0 == lo1 and hi1 == whole.num_users == a["num_users"] == b["num_users"]
    assert abs((hi0 - lo0) - (hi1 - lo1)) <= 1  # about half the users each
    # each rank held only its users' interactions (train, valid and test rows), and together all of them
    lengths = whole.seen_train_sequences.lengths() + 2
    assert a["shard"]["rows_read"] == lengths[:hi0].sum() and b["shard"]["rows_read"] == lengths[hi0:].sum()
    if layout == "split":
        assert a["shard"]["rows_read"] + b["shard"]["rows_read"] == pq.read_metadata(folder / "split.parquet").num_rows
    # the raw ids match the single reader's for every user
    assert a["raw_ids"] | b["raw_ids"] == dict(zip(whole.user_index.tolist(), whole.raw_user_ids().tolist(), strict=True))
    # what must be global is: the training counts and the cold items drawn
    np.testing.assert_array_equal(a["counts"], whole.item_train_counts)
    np.testing.assert_array_equal(b["counts"], whole.item_train_counts)
    assert a["cold"].sum() == COLD_ITEMS and (a["cold"] == whole.cold_mask).all() and (b["cold"] == whole.cold_mask).all()


@pytest.mark.parametrize("layout", ["split", "sequences"])
def test_every_epoch_the_ranks_train_on_disjoint_windows_that_together_cover_the_data(folders, ranks, layout):
    folder, whole, (a, b) = read_whole_and_ranks(folders, ranks, layout)
    data = TrainSequences(whole.train_sequences, MAX_SEQ_LEN)
    everything = Counter(zip(whole.user_index[data.sequence].tolist(), windows_of(data, range(len(data))), strict=True))
    assert max(everything.values()) == 1  # a (user, window) pair names one window
    for epoch in range(EPOCHS):
        ea, eb = a["epochs"][epoch], b["epochs"][epoch]
        assert ea["batches"] == eb["batches"] and len(ea["windows"]) == len(eb["windows"])  # the same steps on both ranks
        pa_, pb_ = (Counter(zip(e["users"], e["windows"], strict=True)) for e in (ea, eb))
        assert not pa_.keys() & pb_.keys(), f"epoch {epoch}: both ranks trained on {sorted(pa_.keys() & pb_.keys())[:3]}"
        assert pa_.keys() | pb_.keys() == everything.keys()  # together every window of every user
        # both step through as many windows as the larger rank has; the smaller wraps around its own
        assert sum(pa_.values()) == sum(pb_.values()) == max(len(pa_), len(pb_))
        # the sampler's own lines (what ShardReport writes on a Ray run) say the same
        for rank, pairs in ((a, pa_), (b, pb_)):
            users = {u for u, _ in pairs}
            line = rank["sampler_lines"][epoch]
            assert line["users"] == len(users) and line["first_user"] == min(users) and line["last_user"] == max(users)
            assert line["windows_local"] == len(pairs) and line["windows"] == sum(pairs.values())
    assert a["epochs"][0]["windows"] != a["epochs"][1]["windows"]  # a fresh order each epoch


@pytest.mark.parametrize("layout", ["split", "sequences"])
def test_validation_users_are_sharded_alike_and_padded_to_the_same_batches(folders, ranks, layout):
    folder, whole, (a, b) = read_whole_and_ranks(folders, ranks, layout)
    assert a["val_batches"] == b["val_batches"] and len(a["val_users"]) == len(b["val_users"])
    lo1 = b["shard"]["user_idx"][0]
    assert all(u < lo1 for u in a["val_users"]) and all(u >= lo1 for u in b["val_users"])
    assert set(a["val_users"]) | set(b["val_users"]) == set(whole.user_index.tolist())


@pytest.mark.parametrize("layout", ["split", "sequences"])
def test_a_drivers_catalog_view_gives_the_datamodules_counts_cold_items_and_users_written_piece_by_piece(folders, layout, tmp_path):
    from datamodules.sequence_datamodule import CatalogView
    from inference.bundle import UserPieces, UserTable, _write_users
    from jobs.runtime.training.bundle_export import full_histories

    dm = SequenceDataModule(folders[layout], max_seq_len=MAX_SEQ_LEN, cold_items=COLD_ITEMS, cold_seed=3)
    dm.setup()
    view = CatalogView(folders[layout], cold_items=COLD_ITEMS, cold_seed=3, piece_users=7)  # 90 users: 13 pieces
    assert dm.cold_mask.sum() == COLD_ITEMS
    np.testing.assert_array_equal(view.cold_mask, dm.cold_mask)
    np.testing.assert_array_equal(view.item_train_counts, dm.item_train_counts)
    assert (view.num_items, view.num_users) == (dm.num_items, dm.num_users)
    assert list(view.item_ids) == list(dm.item_ids) and view.item_texts == dm.item_texts and view.item_categories == dm.item_categories
    assert len(list(view.user_pieces())) == 13
    whole, pieces = tmp_path / "whole.parquet", tmp_path / "pieces.parquet"
    _write_users(UserTable(np.asarray(dm.raw_user_ids(), dtype=object), full_histories(dm)), whole)
    assert _write_users(UserPieces(view.num_users, view.user_pieces), pieces) == 90
    assert pq.read_table(pieces).equals(pq.read_table(whole))
