"""FAISS search against brute force on small random vectors: flat/ivf/hnsw, seen items excluded."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from inference.faiss_index import AUTO_EXACT_MAX_ITEMS, auto_index, build_index, open_shards, search_unseen, trained_index, training_rows

N, D, U, K = 300, 16, 40, 10


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((N, D)).astype(np.float32)
    users = rng.standard_normal((U, D)).astype(np.float32)
    seen = [rng.choice(N, size=rng.integers(0, 60), replace=False) for _ in range(U)]
    return items, users, seen


def brute_force(items: np.ndarray, users: np.ndarray, seen: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = users.astype(np.float64) @ items.T.astype(np.float64)
    for row, s in enumerate(seen):
        scores[row, s] = -np.inf
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def assert_valid_lists(items, users, seen, ids, scores) -> None:
    for row in range(len(users)):
        got = ids[row][ids[row] >= 0]
        assert not set(got) & set(seen[row].tolist())
        assert len(set(got.tolist())) == len(got)
        np.testing.assert_allclose(scores[row, : len(got)], items[got] @ users[row], rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(scores[row, : len(got)]) <= 1e-6)


@pytest.mark.parametrize("kind,params", [("flat", {}), ("ivf", {"nlist": 8, "nprobe": 8})])
def test_exact_indexes_match_brute_force(data, kind, params):
    items, users, seen = data
    ids, scores = search_unseen(build_index(items, kind, **params), users, seen, K)
    want_ids, want_scores = brute_force(items, users, seen, K)
    assert ids.shape == scores.shape == (U, K) and scores.dtype == np.float32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,params", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {"hnsw_m": 16, "ef_search": 64})])
def test_approximate_indexes_recall_and_exclude_seen(data, kind, params):
    items, users, seen = data
    ids, scores = search_unseen(build_index(items, kind, **params), users, seen, K)
    assert_valid_lists(items, users, seen, ids, scores)
    want_ids, _ = brute_force(items, users, seen, K)
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / K for a, b in zip(ids, want_ids)])
    assert recall >= (0.95 if kind == "hnsw" else 0.5)


def test_ivf_caps_nlist_to_catalog_size():
    rng = np.random.default_rng(1)
    items = rng.standard_normal((20, 8)).astype(np.float32)
    index = build_index(items, "ivf", nlist=64, nprobe=64)
    assert index.nlist == 20 and index.nprobe == 20
    users = rng.standard_normal((5, 8)).astype(np.float32)
    ids, _ = search_unseen(index, users, [np.array([], dtype=np.int64)] * 5, 20)
    np.testing.assert_array_equal(ids, brute_force(items, users, [np.array([], dtype=np.int64)] * 5, 20)[0])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_k_larger_than_unseen_returns_only_unseen(kind):
    rng = np.random.default_rng(2)
    items = rng.standard_normal((20, 8)).astype(np.float32)
    users = rng.standard_normal((3, 8)).astype(np.float32)
    seen = [np.arange(15), np.arange(5, 20), np.array([0, 0, 1, -1])]  # duplicates and -1 padding are tolerated
    ids, scores = search_unseen(build_index(items, kind, nlist=4, nprobe=4), users, seen, 10)
    assert ids.shape == (3, 10)
    for row, expect_unseen in ((0, set(range(15, 20))), (1, set(range(5)))):
        got = ids[row][ids[row] >= 0]
        assert set(got.tolist()) == expect_unseen
        assert np.all(ids[row, 5:] == -1) and np.all(np.isneginf(scores[row, 5:]))
        order = np.argsort(-(items[got] @ users[row]))
        np.testing.assert_array_equal(got, got[order])
    assert (ids[2] >= 0).all() and not {0, 1} & set(ids[2].tolist())


def test_k_larger_than_catalog_pads():
    items = np.eye(4, dtype=np.float32)
    ids, scores = search_unseen(build_index(items), np.array([[4.0, 3.0, 2.0, 1.0]], np.float32), [np.array([1])], 6)
    np.testing.assert_array_equal(ids, [[0, 2, 3, -1, -1, -1]])
    np.testing.assert_allclose(scores[0, :3], [4.0, 2.0, 1.0])


def test_errors_name_what_is_wrong():
    items = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="kind must be one of"):
        build_index(items, "annoy")
    with pytest.raises(ValueError, match="NaN"):
        build_index(np.full((5, 4), np.nan, np.float32))
    with pytest.raises(ValueError, match=r"\[num_users, 4\]"):
        search_unseen(build_index(items), np.ones((2, 3), np.float32), [np.array([])] * 2, 3)
    with pytest.raises(ValueError, match="seen"):
        search_unseen(build_index(items), np.ones((2, 4), np.float32), [np.array([])], 3)


def test_auto_is_exact_for_small_catalogs_and_ivfpq_beyond():
    assert auto_index(1_682).kind == "flat" and auto_index(AUTO_EXACT_MAX_ITEMS).kind == "flat"
    assert auto_index(AUTO_EXACT_MAX_ITEMS + 1).kind == "ivfpq"  # the threshold, exactly
    big = auto_index(1_000_000)
    assert big.kind == "ivfpq" and big.params["nlist"] == 2000 and big.params["refine_factor"] >= 1
    vectors = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    index = build_index(vectors, big.kind, **big.params)  # build_index takes auto's params as they are
    assert isinstance(index, faiss.IndexRefineFlat)  # exact re-ranking ...
    assert isinstance(faiss.downcast_index(index.base_index), faiss.IndexIVFPQFastScan)  # ... of IVF-PQ candidates
    assert isinstance(build_index(vectors, auto_index(50).kind), faiss.IndexFlat)


def structured_vectors(n: int, d: int = 64, num_users: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    axes = np.linalg.qr(rng.standard_normal((d, d)))[0]
    item_scale, user_scale = 1.0 / np.sqrt(np.arange(1, d + 1)), 1.0 / np.arange(1, d + 1) ** 1.5
    item_mean = 0.3 * np.linalg.norm(item_scale) * axes[0]
    user_mean = 2.0 * np.linalg.norm(user_scale) * (axes[0] + axes[1]) / np.sqrt(2)
    items = (item_mean + (rng.standard_normal((n, d)) * item_scale) @ axes).astype(np.float32)
    users = (user_mean + (rng.standard_normal((num_users, d)) * user_scale) @ axes.T).astype(np.float32)
    return items, users


def test_autos_approximate_setting_keeps_recall_at_100_on_structured_vectors():
    """The approximate branch of auto (forced here on 20,000 items) against exact search, on vectors shaped
    like a trained model's: items with a slowly decaying spectrum and cosine ~0.3 to their mean,
    users concentrated on a few directions (bench/scale.py measures 1 M items)."""
    n = 20_000
    items, users = structured_vectors(n)
    choice = auto_index(n, exact_max_items=10_000)
    assert choice.kind == "ivfpq"
    none = [np.array([], dtype=np.int64)] * len(users)
    exact, _ = search_unseen(build_index(items, "flat"), users, none, 100)
    found, scores = search_unseen(build_index(items, choice.kind, **choice.params), users, none, 100)
    np.testing.assert_allclose(scores[:, 0], np.einsum("ud,ud->u", items[found[:, 0]], users), rtol=1e-5)  # re-ranked: exact scores
    recall = np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(found, exact)])
    assert recall >= 0.95, recall


def test_batch_inference_takes_the_index_from_the_config(tmp_path):
    from jobs.runtime.stages.batch_inference import index_choice
    from tests.conftest import compose_config

    cfg = compose_config("batch_infer", ["experiment=tiny"], tmp_path)
    assert cfg.infer.index.kind.value == "auto"  # the default
    assert index_choice(cfg, 300).kind == "flat" and index_choice(cfg, 2_000_000) == auto_index(2_000_000)
    cfg = compose_config("batch_infer", ["experiment=tiny", "infer.index.kind=ivf", "infer.index.nlist=16", "infer.index.nprobe=4"], tmp_path)
    assert index_choice(cfg, 300).kind == "ivf" and index_choice(cfg, 300).params == {"nlist": 16, "nprobe": 4}
    cfg = compose_config("batch_infer", ["experiment=tiny", "infer.index.kind=hnsw", "infer.index.ef_search=64"], tmp_path)
    assert index_choice(cfg, 300).params == {"hnsw_m": 32, "ef_search": 64}
    cfg = compose_config("batch_infer", ["experiment=tiny", "infer.index.kind=ivfpq", "infer.index.refine_factor=8"], tmp_path)
    assert index_choice(cfg, 300).params == {"nlist": 64, "nprobe": 8, "pq_m": None, "refine_factor": 8}


def test_seen_items_as_one_flat_array_give_the_same_lists(data):
    """SeenItems (CSR: offsets + one array) filters exactly as one array per user, whatever the
    order of rows the depth grouping searches them in."""
    from inference.faiss_index import SeenItems

    items, users, seen = data
    flat = SeenItems.from_lists(seen)
    assert len(flat) == U and [s.tolist() for s in flat] == [s.tolist() for s in seen]
    index = build_index(items)
    for rows_per_search in (3, 4096):  # many search calls (rows of mixed depths) and one
        got = search_unseen(index, users, flat, K, rows_per_search=rows_per_search)
        want = search_unseen(index, users, seen, K)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], brute_force(items, users, seen, K)[0])
    keys, counts = SeenItems.from_lists([np.array([3, 3, -1, 7]), np.array([], np.int64), np.array([N, 1])]).keys(N)
    np.testing.assert_array_equal(keys, [3, 7, 2 * N + 1])  # duplicates and out-of-range ids dropped
    np.testing.assert_array_equal(counts, [2, 0, 1])


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_an_index_mapped_from_its_file_searches_as_the_built_one(data, kind, tmp_path):
    """Sharded batch inference's actors open the index written once, memory-mapped read-only
    (jobs/runtime/stages/sharded_inference.py): every kind gives the built index's results."""
    items, users, seen = data
    built = build_index(items, kind, nlist=8, nprobe=4, pq_m=8)
    faiss.write_index(built, str(tmp_path / "items.faiss"))
    mapped = faiss.read_index(str(tmp_path / "items.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    ids_a, scores_a = search_unseen(built, users, seen, K)
    ids_b, scores_b = search_unseen(mapped, users, seen, K)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)


def sharded_build(items: np.ndarray, kind: str, bounds: list[int], folder, **params) -> faiss.Index:
    """The index built as sharded batch inference builds it: trained once on the training rows
    alone, each block of rows added to its own copy and written, the files opened as one."""
    rows = training_rows(len(items), kind, params.get("nlist", 64))
    trained = trained_index(items if rows is None else items[rows], kind, len(items), **params)
    faiss.write_index(trained, str(folder / "trained.faiss"))
    paths = []
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard = faiss.read_index(str(folder / "trained.faiss"))
        shard.add(items[lo:hi])
        paths.append(folder / f"items-{s}.faiss")
        faiss.write_index(shard, str(paths[-1]))
    return open_shards(paths)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw", "ivfpq"])
def test_one_shard_built_from_the_training_rows_alone_is_the_whole_catalogs_index(data, kind, tmp_path):
    items, users, seen = data
    params = {"nlist": 8, "nprobe": 4, "pq_m": 8}
    ids_a, scores_a = search_unseen(build_index(items, kind, **params), users, seen, K)
    ids_b, scores_b = search_unseen(sharded_build(items, kind, [0, N], tmp_path, **params), users, seen, K)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(scores_a, scores_b)


def test_a_flat_index_in_three_mapped_shards_gives_the_whole_indexs_lists(data, tmp_path):
    items, users, seen = data
    sharded = sharded_build(items, "flat", [0, 90, 200, N], tmp_path)
    assert isinstance(sharded, faiss.IndexShards) and sharded.ntotal == N
    ids_a, scores_a = search_unseen(build_index(items, "flat"), users, seen, K)
    ids_b, scores_b = search_unseen(sharded, users, seen, K)
    np.testing.assert_array_equal(ids_a, ids_b)  # shard s's ids offset by the rows before it: catalog rows
    np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-6)


def test_ivfpq_in_four_shards_of_one_trained_index_keeps_the_whole_indexs_recall(tmp_path):
    n = 20_000
    items, users = structured_vectors(n)
    choice = auto_index(n, exact_max_items=10_000)
    none = [np.array([], dtype=np.int64)] * len(users)
    exact, _ = search_unseen(build_index(items, "flat"), users, none, 100)
    whole, _ = search_unseen(build_index(items, choice.kind, **choice.params), users, none, 100)
    found, scores = search_unseen(sharded_build(items, choice.kind, [0, 5_000, 10_000, 15_000, n], tmp_path, **choice.params), users, none, 100)
    np.testing.assert_allclose(scores[:, 0], np.einsum("ud,ud->u", items[found[:, 0]], users), rtol=1e-5)  # re-ranked in each shard: exact
    recall = {name: np.mean([len(np.intersect1d(a, b)) / 100 for a, b in zip(ids, exact)]) for name, ids in (("whole", whole), ("shards", found))}
    assert recall["shards"] >= 0.95 and recall["shards"] >= recall["whole"] - 0.01, recall
