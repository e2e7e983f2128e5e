"""``data.engine=ray``: preparation on Ray Data (a real embedded Ray), users bucketed by a hash of
their raw id, compared with the single-process path on the same input after mapping raw ids;
bring-your-own Parquet read in pieces (a folder of shards, several row groups each)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datamodules.parquet_dataset import ParquetFolder
from datamodules.preprocess import load_prepared, prepare
from datamodules.raw_dataset import DataFormatError
from datamodules.sequence_datamodule import SequenceDataModule
from datamodules.sharded_prepare import prepare_sharded
from datamodules.synthetic import generate_synthetic
from tests.conftest import TINY, compose_config


def awkward_raw(seed: int = 0):
    """Synthetic data made awkward: repeated (user, item) pairs, timestamp ties broken only by file
    order, users left with too few interactions, integer user ids, shuffled rows."""
    raw = generate_synthetic(num_users=150, num_items=80, num_topics=6, min_len=3, max_len=15, seed=seed)
    inter = raw.interactions
    rng = np.random.default_rng(seed)
    repeats = inter.sample(n=120, random_state=seed).assign(timestamp=lambda d: d["timestamp"] + rng.integers(-5, 5, len(d)))
    ties = inter.sample(n=60, random_state=seed + 1)
    short = pd.DataFrame({"user_id": ["short-a", "short-a", "short-b"], "item_id": inter["item_id"].iloc[:3].to_list(), "timestamp": [5, 6, 7]})
    inter = pd.concat([inter, repeats, ties, short], ignore_index=True).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    inter["timestamp"] = inter["timestamp"] // 4  # many ties
    return raw.__class__(raw.name, inter, raw.items)


def write_shards(folder, raw, shards: int = 3, row_group: int = 200):
    """The raw data as a folder of interaction shards (several row groups each) and item shards."""
    (folder / "interactions").mkdir(parents=True)
    (folder / "items").mkdir()
    for i, part in enumerate(np.array_split(np.arange(len(raw.interactions)), shards)):
        pq.write_table(
            pa.Table.from_pandas(raw.interactions.iloc[part], preserve_index=False), folder / "interactions" / f"part-{i}.parquet", row_group_size=row_group
        )
    for i, part in enumerate(np.array_split(np.arange(len(raw.items)), 2)):
        pq.write_table(pa.Table.from_pandas(raw.items.iloc[part], preserve_index=False), folder / "items" / f"part-{i}.parquet")
    return folder


def by_raw_id(folder) -> dict:
    """What a prepared folder holds, in raw ids: each user's training items, valid and test item."""
    dm = SequenceDataModule(folder)
    dm.setup()
    ids = dm.item_ids
    return {
        "items": list(zip(ids, dm.item_texts, dm.item_titles, map(tuple, dm.item_categories), strict=True)),
        "users": {
            str(dm.user_ids[u]): (tuple(ids[dm.train_sequences[i]]), ids[dm.valid_targets[i]], ids[dm.test_targets[i]]) for i, u in enumerate(dm.user_index)
        },
    }


def counts(folder) -> dict:
    meta = json.loads((folder / "meta.json").read_text())
    return {k: meta[k] for k in ("num_users", "num_items", "num_interactions", "dropped_repeats", "dropped_users")}


def test_sharded_and_single_process_preparation_give_the_same_users_items_histories_and_split(tmp_path, shared_ray):
    raw = awkward_raw()
    source = ParquetFolder(str(write_shards(tmp_path / "raw", raw)), "awkward")
    assert len(source.pieces()) >= 6  # 3 shards of several row groups: read in pieces

    single = prepare(source.read(), tmp_path / "single")
    sharded = prepare_sharded(source, tmp_path / "sharded", num_buckets=4)
    from_memory = prepare_sharded(raw, tmp_path / "from-memory", num_buckets=3)

    expected = by_raw_id(single.folder)
    assert counts(single.folder)["dropped_repeats"] > 0 and counts(single.folder)["dropped_users"] == 2  # the awkward parts are there
    for folder in (sharded.folder, from_memory.folder):
        assert counts(folder) == counts(single.folder)
        got = by_raw_id(folder)
        assert got["items"] == expected["items"]
        assert got["users"] == expected["users"]
    # sharded for real: every bucket holds users, numbered bucket after bucket
    seqs = pq.read_table(sharded.folder / "sequences").to_pandas().sort_values("user_idx")
    assert sorted(seqs["bucket"].unique()) == [0, 1, 2, 3]
    assert (np.diff(seqs["bucket"].to_numpy()) >= 0).all() and (seqs["user_idx"].to_numpy() == np.arange(len(seqs))).all()
    assert load_prepared(sharded.folder) is not None and not (sharded.folder / "sequences.partial").exists()


def test_a_bad_row_in_a_shard_is_named_by_its_file_and_row_on_both_engines(tmp_path, shared_ray):
    raw = awkward_raw()
    folder = write_shards(tmp_path / "raw", raw)
    shard = folder / "interactions" / "part-1.parquet"
    table = pq.read_table(shard).to_pandas()
    table.loc[250, "item_id"] = "no-such-item"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), shard, row_group_size=200)
    source = ParquetFolder(str(folder), "awkward")
    with pytest.raises(DataFormatError, match=r"part-1\.parquet.*interaction row 250 names unknown item_id 'no-such-item'"):
        prepare(source.read(), tmp_path / "single")
    with pytest.raises(Exception, match=r"part-1\.parquet.*interaction row 250 names unknown item_id 'no-such-item'"):
        prepare_sharded(source, tmp_path / "sharded", num_buckets=2)
    assert load_prepared(tmp_path / "sharded") is None  # nothing half-written passes for prepared


def test_data_parquet_prepares_on_the_configured_engine_and_auto_picks_ray_by_size(tmp_path, shared_ray):
    from jobs.runtime.config.assembly import build_datamodule, data_engine

    raw = awkward_raw(seed=1)
    folder = write_shards(tmp_path / "byo", raw)
    base = [o for o in TINY if not o.startswith("data.reader.")] + ["data=parquet", f"data.reader.folder={folder}", "data.max_seq_len=10"]

    def tiny_cfg(*overrides: str):
        return compose_config("pretrain", [*base, *overrides], tmp_path)

    dms = {}
    for engine in ("local", "ray"):
        cfg = tiny_cfg(f"data.engine={engine}", "data.ray.num_buckets=3", f"paths.data_dir={tmp_path / engine}")
        dms[engine] = build_datamodule(cfg)
        assert json.loads((tmp_path / engine / "parquet" / "meta.json").read_text()).get("engine", "local") == engine
    assert dms["ray"].num_users == dms["local"].num_users and dms["ray"].item_train_counts.tolist() == dms["local"].item_train_counts.tolist()
    # auto: ray only from data.ray.auto_min_interactions on, counted from the shards' footers
    cfg = tiny_cfg("data.ray.auto_min_interactions=1000000")
    assert data_engine(cfg, ParquetFolder(str(folder))) == "local"
    cfg = tiny_cfg(f"data.ray.auto_min_interactions={len(raw.interactions)}")
    assert data_engine(cfg, ParquetFolder(str(folder))) == "ray"
