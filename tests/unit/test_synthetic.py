"""The synthetic generator: deterministic, planted structure, column-built (no object per interaction)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datamodules.synthetic import generate_synthetic


def _sequences(raw) -> dict[str, np.ndarray]:
    inter = raw.interactions
    return {u: g["item_id"].str.slice(1).astype(np.int64).to_numpy() for u, g in inter.groupby("user_id", sort=False)}


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate_synthetic(seed=3), generate_synthetic(seed=3), generate_synthetic(seed=4)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions["item_id"].equals(c.interactions["item_id"])


def test_sequences_follow_the_planted_structure():
    raw = generate_synthetic(num_users=2000, num_items=600, num_topics=12, min_len=8, max_len=30, p_follow=0.6, seed=0)
    inter, items = raw.interactions, raw.items
    # ids are Arrow-backed strings, not Python objects per row
    assert inter["user_id"].dtype == "str" and inter["item_id"].dtype == "str" and inter["timestamp"].dtype == np.int64
    assert not any(dtype == object for dtype in inter.dtypes)  # noqa: E721 (a dtype, compared by value)
    topic = items["categories"].map(lambda c: int(c[0].split("_")[1])).to_numpy()
    seqs = _sequences(raw)
    assert len(seqs) == 2000
    lengths = np.array([len(s) for s in seqs.values()])
    # every user gets its drawn length (8..30): the pool of unseen items (100 per user) never runs out
    assert lengths.max() == 30 and lengths.min() == 8 and abs(lengths.mean() - 19) < 0.5
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert (inter.groupby("user_id", sort=False)["timestamp"].diff().dropna() > 0).all()
    # each user's items come from at most two topics (topics_per_user=2)
    assert max(len(set(topic[s])) for s in seqs.values()) <= 2
    # the chain: the most common successor of an item is one fixed item of the same topic,
    # and about p_follow of the steps follow it (a few chained items were seen already)
    pairs = pd.DataFrame(np.concatenate([np.stack([s[:-1], s[1:]], 1) for s in seqs.values()]), columns=["a", "b"])
    top = pairs.groupby("a")["b"].agg(lambda b: b.value_counts().index[0])
    assert (topic[top.index] == topic[top.to_numpy()]).all()
    followed = (pairs["b"].to_numpy() == top.loc[pairs["a"]].to_numpy()).mean()
    assert 0.5 < followed < 0.75
    # popularity: the items drawn most often are drawn far more than the median item
    counts = inter["item_id"].value_counts().to_numpy()
    assert counts[:10].mean() > 3 * np.median(counts)


def test_a_user_who_has_seen_every_item_of_its_topics_stops_there():
    raw = generate_synthetic(num_users=300, num_items=24, num_topics=12, min_len=6, max_len=6, topics_per_user=2, seed=0)
    lengths = raw.interactions.groupby("user_id").size()
    assert (lengths == 4).all()  # two topics of two items each: four distinct items, then nothing new
    assert not raw.interactions.duplicated(["user_id", "item_id"]).any()


def test_item_text_names_its_topic_words_and_number():
    raw = generate_synthetic(num_users=10, num_items=240, num_topics=12, seed=1)
    by_topic: dict[str, set[str]] = {}
    for text, cats, item_id in zip(raw.items["text"], raw.items["categories"], raw.items["item_id"]):
        words = text.split()
        assert words[-1] == "#" + item_id[1:]
        by_topic.setdefault(cats[0], set()).update(words[:-1])
    # topics' own words do not overlap beyond the shared filler
    vocab = list(by_topic.values())
    filler = set("the a new old great small classic modern story tale journey night day life world".split())
    assert all(not ((vocab[i] & vocab[j]) - filler) for i in range(len(vocab)) for j in range(i + 1, len(vocab)))


@pytest.mark.parametrize("kwargs", [{"num_items": 5, "num_topics": 6}, {"min_len": 1}, {"min_len": 9, "max_len": 8}, {"num_users": 0}])
def test_bad_sizes_name_the_setting(kwargs):
    with pytest.raises(ValueError, match="data.synthetic"):
        generate_synthetic(**kwargs)
