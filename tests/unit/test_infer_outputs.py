"""Batch inference's output files are written in row groups: the same rows whatever the group size."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.runtime.stages import batch_inference


@pytest.mark.parametrize("rows_per_group", [1_000_000, 3])
def test_outputs_read_back_the_same_in_any_number_of_row_groups(tmp_path, monkeypatch, rows_per_group):
    monkeypatch.setattr(batch_inference, "ROWS_PER_GROUP", rows_per_group)
    rng = np.random.default_rng(0)
    users, items, k, d = 8, 12, 4, 3
    bundle = SimpleNamespace(
        users=SimpleNamespace(user_ids=np.array([f"u{i}" for i in range(users)], dtype=object)),
        catalog=SimpleNamespace(item_ids=np.array([f"i{i}" for i in range(items)], dtype=object)),
    )
    ids = rng.integers(0, items, size=(users, k))
    ids[2, 2:] = -1  # a user with fewer than k unseen items
    scores = rng.standard_normal((users, k)).astype(np.float32)
    item_vecs, user_vecs = rng.standard_normal((items, d)).astype(np.float32), rng.standard_normal((users, d)).astype(np.float32)
    batch_inference.write_outputs(tmp_path, bundle, item_vecs, user_vecs, ids, scores)

    recs = pq.read_table(tmp_path / "recommendations.parquet")
    assert recs.num_rows == users and pq.ParquetFile(tmp_path / "recommendations.parquet").num_row_groups == -(-users // rows_per_group)
    rows = recs.to_pylist()
    assert [r["user_id"] for r in rows] == [f"u{i}" for i in range(users)]
    for u, r in enumerate(rows):
        real = ids[u][ids[u] >= 0]
        assert r["item_ids"] == [f"i{j}" for j in real]
        assert r["scores"] == pytest.approx(scores[u][: len(real)].tolist())
    emb = pq.read_table(tmp_path / "user_embeddings.parquet").to_pydict()
    assert emb["user_id"] == [f"u{i}" for i in range(users)] and np.allclose(np.array(emb["embedding"]), user_vecs)
    emb = pq.read_table(tmp_path / "item_embeddings.parquet").to_pydict()
    assert emb["item_id"] == [f"i{i}" for i in range(items)] and np.allclose(np.array(emb["embedding"]), item_vecs)
