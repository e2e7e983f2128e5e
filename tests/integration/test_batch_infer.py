"""jobs.batch_infer end to end on a tiny trained pipeline: in process and on Ray Data actors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import inference.bundle as bundle_module
import jobs.runtime.stages.batch_inference as batch_infer_stage
from inference.bundle import BundleError, load_bundle
from inference.embedding import embed_all_users, embed_catalog, embed_items, embed_users, encode_catalog_text, load_embedding_model, user_histories
from inference.faiss_index import SeenItems
from jobs import batch_infer, pipeline
from lightning_modules.ranking_metrics import top_k
from tests.conftest import TINY, compose_config

TOP_K = 10
pytestmark = pytest.mark.usefixtures("shared_ray")
WALL: dict[str, float] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny pipeline trained once (1 epoch per stage); returns (root, finetune run folder)."""
    root = tmp_path_factory.mktemp("batch_infer")
    cfg = compose_config("pipeline", [*TINY, "pretrain.max_epochs=1", "finetune.max_epochs=1", "data.batch_size=16", f"paths.output_dir={root}/pipeline"], root)
    pipeline.run(cfg)
    return root, root / "pipeline" / "finetune"


@pytest.fixture(scope="module")
def runs(trained) -> dict[str, tuple[Path, dict[str, float]]]:
    """batch_infer in process and on 2 Ray Data actors, on the same checkpoint (each call's wall
    time, taken here, is in WALL)."""
    root, finetune = trained
    out = {}
    for name, extra in (
        ("local", ["infer.use_ray=false"]),
        ("ray", ["infer.use_ray=true", "cluster.num_cpus=2", "infer.num_actors=2"]),
        # an index shard per piece of items: the actors search two shards as one
        ("sharded", ["infer.use_ray=true", "infer.sharded=true", "cluster.num_cpus=2", "infer.num_actors=2", "infer.index.shard_items=30"]),
    ):
        cfg = compose_config(
            "batch_infer",
            [*TINY, f"checkpoint={finetune}", f"infer.top_k={TOP_K}", "infer.batch_size=16", f"paths.output_dir={root}/infer_{name}", *extra],
            root,
        )
        start = time.perf_counter()
        with pytest.MonkeyPatch.context() as mp:
            if name == "sharded":  # the driver (this process) must not load the model, the catalog or the histories
                for target in (batch_infer_stage, bundle_module):
                    for fn in ("load_bundle", "load_model", "_read_users", "_read_catalog", "read_user_rows"):
                        if hasattr(target, fn):
                            mp.setattr(target, fn, _refuse(fn))
            out[name] = (Path(cfg.paths.output_dir), batch_infer.run(cfg))
        WALL[name] = time.perf_counter() - start
    return out


def _refuse(name: str):
    def refused(*args, **kwargs):
        raise AssertionError(f"the driver called {name}; sharded inference must leave it to the actors")

    return refused


def full_histories_from_split(data_dir: Path) -> dict[str, list[str]]:
    """Raw user id -> every raw item id of the user's history in order, read straight from split.parquet."""
    split = pd.read_parquet(data_dir / "split.parquet").sort_values(["user_idx", "position"], kind="mergesort")
    items = pd.read_parquet(data_dir / "items.parquet")["item_id"].astype(str).to_numpy()
    users = pd.read_parquet(data_dir / "users.parquet")["user_id"].astype(str).to_numpy()
    return {users[u]: list(items[g["item_idx"].to_numpy()]) for u, g in split.groupby("user_idx")}


def test_files_schemas_and_metrics(runs, trained):
    run_dir, metrics = runs["ray"]
    recs = pq.read_table(run_dir / "recommendations.parquet")
    assert recs.schema.field("user_id").type == pa.string()
    assert recs.schema.field("item_ids").type == pa.list_(pa.string())
    assert recs.schema.field("scores").type == pa.list_(pa.float32())
    for name, key in (("item_embeddings", "item_id"), ("user_embeddings", "user_id")):
        t = pq.read_table(run_dir / f"{name}.parquet")
        assert t.schema.field(key).type == pa.string() and t.schema.field("embedding").type == pa.list_(pa.float32())
        assert {len(e) for e in t.column("embedding").to_pylist()} == {32}
    assert pq.read_table(run_dir / "item_embeddings.parquet").num_rows == 60
    assert recs.num_rows == pq.read_table(run_dir / "user_embeddings.parquet").num_rows == 120
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["infer/num_users"] == 120 and saved["infer/num_items"] == 60
    for key in ("infer/seconds_embed_items", "infer/seconds_embed_users"):  # model compute was timed
        assert saved[key] > 0 and saved[key] == pytest.approx(metrics[key])
    parts = [saved[f"infer/seconds_{p}"] for p in ("load", "embed", "build_index", "search", "write")]
    total = saved["infer/seconds_total"]
    assert min(parts) >= 0 and 0.95 * total <= sum(parts) <= total  # the parts add up to the whole
    assert total <= WALL["ray"]  # the job's total is no more than the call took, timed from outside
    inside = saved["infer/seconds_ray_start"] + saved["infer/seconds_embed_items_wall"] + saved["infer/seconds_embed_users_wall"]
    assert 0 < inside <= saved["infer/seconds_embed"]  # Ray's start and both passes, timed inside the embedding
    assert (run_dir / "config.yaml").is_file() and "batch_infer" in (run_dir / "run.log").read_text()


def test_ray_and_in_process_agree(runs):
    local = pd.read_parquet(runs["local"][0] / "recommendations.parquet")
    ray_ = pd.read_parquet(runs["ray"][0] / "recommendations.parquet")
    assert list(local["user_id"]) == list(ray_["user_id"])
    for a, b, sa, sb in zip(local["item_ids"], ray_["item_ids"], local["scores"], ray_["scores"]):
        assert list(a) == list(b)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-5)
    for name in ("item_embeddings", "user_embeddings"):
        ea = np.stack(pd.read_parquet(runs["local"][0] / f"{name}.parquet")["embedding"])
        eb = np.stack(pd.read_parquet(runs["ray"][0] / f"{name}.parquet")["embedding"])
        np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-5)


def _by_id(folder: Path, name: str, key: str) -> pd.DataFrame:
    return pd.read_parquet(folder / f"{name}.parquet").sort_values(key, kind="mergesort").reset_index(drop=True)


def test_sharded_equals_in_process_item_for_item(runs):
    """infer.sharded=true (actors read their own users, map the index, write their own parts)
    gives the in-process run's recommendations, scores and vectors for every user and item."""
    local, sharded = runs["local"][0], runs["sharded"][0]
    a, b = _by_id(local, "recommendations", "user_id"), _by_id(sharded, "recommendations", "user_id")
    assert len(a) == 120 and list(a["user_id"]) == list(b["user_id"])
    for ia, ib, sa, sb in zip(a["item_ids"], b["item_ids"], a["scores"], b["scores"]):
        assert list(ia) == list(ib)
        np.testing.assert_allclose(sa, sb, rtol=0, atol=1e-5)
    for name, key in (("item_embeddings", "item_id"), ("user_embeddings", "user_id")):
        ea, eb = _by_id(local, name, key), _by_id(sharded, name, key)
        assert list(ea[key]) == list(eb[key])
        np.testing.assert_allclose(np.stack(ea["embedding"]), np.stack(eb["embedding"]), rtol=0, atol=1e-5)
    la, lb = (json.loads((r / "metrics.json").read_text()) for r in (local, sharded))
    for key in ("infer/num_users", "infer/num_items", "infer/mean_list_length", "infer/num_short_lists"):
        assert la[key] == lb[key]


def test_sharded_actors_write_one_part_per_piece_and_the_index_they_map(runs, trained):
    run_dir, metrics = runs["sharded"]
    assert metrics["infer/sharded"] == 1 and metrics["infer/num_user_pieces"] == metrics["infer/num_item_pieces"] == 2
    for name, rows, starts in (("recommendations", 120, [0, 60]), ("user_embeddings", 120, [0, 60]), ("item_embeddings", 60, [0, 30])):
        parts = sorted((run_dir / f"{name}.parquet").iterdir())
        assert [p.name for p in parts] == [f"part-{s:012d}.parquet" for s in starts]  # one per piece, none half-written
        assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == rows
    schema = pq.read_schema(run_dir / "recommendations.parquet" / "part-000000000000.parquet")
    assert schema.field("item_ids").type == pa.list_(pa.string()) and schema.field("scores").type == pa.list_(pa.float32())
    # two index shards (infer.index.shard_items=30), each a Ray task's, listed in row order
    listing = json.loads((run_dir / "index" / "shards.json").read_text())
    assert listing["files"] == ["items-00000.faiss", "items-00001.faiss"] and listing["rows"] == [30, 30] and metrics["infer/num_index_shards"] == 2
    assert not (run_dir / "index" / "trained.faiss").exists()
    shards = [faiss.read_index(str(run_dir / "index" / f)) for f in listing["files"]]
    assert all(shard.d == 32 for shard in shards)
    items = _by_id(run_dir, "item_embeddings", "item_id")
    # the shards' rows are the item vectors by catalog row, and text.npy the catalog's frozen encodings
    model = load_embedding_model(trained[1] / "bundle")
    order = np.argsort(model_item_ids(trained[1]))
    rows = np.concatenate([shard.reconstruct_n(0, shard.ntotal) for shard in shards])
    np.testing.assert_allclose(rows[order], np.stack(items["embedding"]), rtol=0, atol=1e-6)
    text = np.load(run_dir / "index" / "text.npy")
    np.testing.assert_allclose(text, encode_catalog_text(model)[1].numpy(), rtol=0, atol=1e-5)
    assert not (run_dir / "index" / ".text-parts").exists()
    saved = json.loads((run_dir / "metrics.json").read_text())
    stages = saved["infer/seconds_items_stage"] + saved["infer/seconds_index_stage"] + saved["infer/seconds_users_stage"]
    assert 0 < stages <= saved["infer/seconds_total"] <= WALL["sharded"]


def model_item_ids(finetune: Path) -> np.ndarray:
    return pq.read_table(finetune / "bundle" / "catalog.parquet", columns=["item_id"])["item_id"].to_numpy(zero_copy_only=False).astype(str)


def test_sharded_without_ray_is_refused_by_name(tmp_path):
    cfg = compose_config("batch_infer", [*TINY, f"checkpoint={tmp_path}", "infer.use_ray=false", "infer.sharded=true"], tmp_path)
    with pytest.raises(ValueError, match="infer.sharded"):
        batch_infer.run(cfg)


def test_scores_equal_the_model_and_seen_items_never_come_back(runs, trained):
    root, finetune = trained
    bundle = load_bundle(finetune / "bundle")
    model, item_ids = bundle.model, bundle.catalog.item_ids.astype(str)
    histories = full_histories_from_split(Path(bundle.config["paths"]["data_dir"]) / bundle.config["data"]["name"])
    item_index = {item: i for i, item in enumerate(item_ids)}
    for name in ("local", "ray", "sharded"):
        recs = pd.read_parquet(runs[name][0] / "recommendations.parquet")
        assert len(recs) == len(histories)
        for user, items, scores in zip(recs["user_id"], recs["item_ids"], recs["scores"]):
            assert len(items) == TOP_K == len(scores)  # 60 items, at most 20 seen
            assert not set(items) & set(histories[user])
            assert np.all(np.diff(scores) <= 0)
    # a direct computation for a few users: the model's score over the catalog, seen items masked
    recs = pd.read_parquet(runs["ray"][0] / "recommendations.parquet").set_index("user_id")
    users = list(recs.index[:5]) + [max(histories, key=lambda u: len(histories[u]))]
    seq = bundle.max_seq_len
    with torch.no_grad():
        catalog = model.catalog_vectors()
        for user in users:
            full = torch.tensor([item_index[i] for i in histories[user]])
            recent = full[-seq:][None]
            logits = model.score(model.user_vectors(recent, torch.ones_like(recent, dtype=torch.bool)), catalog)
            idx, values = top_k(logits, full[None], TOP_K)
            assert list(recs.loc[user, "item_ids"]) == list(item_ids[idx[0].numpy()])
            np.testing.assert_allclose(recs.loc[user, "scores"], values[0].numpy(), rtol=0, atol=1e-5)


def test_unknown_checkpoint_is_named(tmp_path):
    cfg = compose_config("batch_infer", [*TINY, f"checkpoint={tmp_path}/nowhere", "infer.use_ray=false"], tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        batch_infer.run(cfg)


def test_user_histories_keep_the_last_items_and_every_seen_item():
    users = user_histories([np.array([5, 6, 7, 8]), np.array([3])], max_seq_len=3)
    np.testing.assert_array_equal(users.items, [[6, 7, 8], [3, 0, 0]])
    np.testing.assert_array_equal(users.lengths, [3, 1])
    assert [s.tolist() for s in users.seen] == [[5, 6, 7, 8], [3]]
    with pytest.raises(ValueError, match="user row 1 has an empty history"):
        user_histories([np.array([2]), np.array([], dtype=np.int64)], 3)
    flat = user_histories(SeenItems(np.array([0, 4, 5, 7]), np.array([5, 6, 7, 8, 3, 1, 2])), max_seq_len=3)  # one flat array
    np.testing.assert_array_equal(flat.items, [[6, 7, 8], [3, 0, 0], [1, 2, 0]])
    np.testing.assert_array_equal(flat.lengths, [3, 1, 2])


def test_embedding_functions_match_the_model_in_any_batch(trained):
    _, finetune = trained
    model = load_embedding_model(finetune / "bundle")
    with torch.no_grad():
        catalog = model.catalog_vectors().numpy()
    np.testing.assert_allclose(embed_items(model, np.array([7, 0, 59])), catalog[[7, 0, 59]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(embed_catalog(model, 60, batch_size=7), catalog, rtol=0, atol=1e-5)
    users = user_histories([np.array([1, 2, 3, 4, 5]), np.array([9, 8])], max_seq_len=20)
    together = embed_users(model, users.items, users.lengths)
    for row in range(2):  # padding to the longer row changes nothing
        np.testing.assert_allclose(together[row], embed_users(model, users.items[row : row + 1], users.lengths[row : row + 1])[0], rtol=0, atol=1e-5)
    with pytest.raises(BundleError, match="no-such"):
        load_embedding_model(finetune / "no-such")


def test_the_text_encoder_runs_once_per_catalog_item_not_per_history_item(trained):
    """Users' histories reuse the catalog's text encodings: embedding the catalog and every user
    runs the text encoder over each item once, and gives the model's own vectors."""
    _, finetune = trained
    bundle = load_bundle(finetune / "bundle")
    model = load_embedding_model(finetune / "bundle")
    encoded_rows: list[int] = []
    model.item_tower.encoder.register_forward_pre_hook(lambda m, args, kwargs: encoded_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    users = user_histories(bundle.users.histories, bundle.max_seq_len)
    encoded = encode_catalog_text(model)
    items = embed_catalog(model, 60, batch_size=16, encoded=encoded)
    vectors = embed_all_users(model, users, batch_size=16, encoded=encoded)
    assert sum(encoded_rows) == 60
    with torch.no_grad():
        np.testing.assert_allclose(items, bundle.model.catalog_vectors().numpy(), rtol=0, atol=1e-5)
        mask = torch.arange(users.items.shape[1])[None, :] < torch.as_tensor(users.lengths)[:, None]
        want = bundle.model.user_vectors(torch.as_tensor(users.items), mask).numpy()
    np.testing.assert_allclose(vectors, want, rtol=0, atol=1e-5)
