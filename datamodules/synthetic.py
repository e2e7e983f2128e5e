"""Synthetic interaction data with planted structure, any size, deterministic by seed.

Structure: items belong to topics and each topic's items form a chain; users like a few
topics. A user's next item is, with probability ``p_follow``, the successor of the
previous item in its topic chain (a sequential signal), else an item of one of the user's
topics drawn by popularity (a taste signal). Item text names the topic with its own words,
so a text tower can learn what the id tower must memorise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from datamodules.raw_dataset import RawDataset

_WORDS = (
    "river mountain forest ocean desert island valley canyon glacier meadow "
    "robot rocket planet galaxy comet laser engine circuit signal orbit "
    "castle dragon knight wizard sword crown tower quest legend potion "
    "detective murder clue alibi witness suspect trial prison heist secret "
    "kitchen recipe garden bakery coffee pepper lemon honey butter spice "
    "soccer tennis boxing racing sailing climbing skiing rowing chess surfing "
    "violin piano guitar drums opera choir jazz ballet poetry canvas "
    "doctor nurse clinic virus fever surgery cure lab patient medicine "
    "market bank stock profit trade coin budget loan tax invoice "
    "school teacher lesson exam library chalk pupil essay campus lecture "
    "farm tractor barn harvest cattle wheat orchard sheep fence plough "
    "winter summer autumn spring storm thunder rain snow breeze frost"
).split()
_FILLER = "the a new old great small classic modern story tale journey night day life world".split()


def generate_synthetic(
    num_users: int = 500,
    num_items: int = 300,
    num_topics: int = 12,
    min_len: int = 8,
    max_len: int = 40,
    topics_per_user: int = 2,
    p_follow: float = 0.6,
    popularity_exponent: float = 0.8,
    seed: int = 0,
) -> RawDataset:
    """Generate users' interaction sequences and item texts with planted topic/chain structure.

    Column operations only: every user takes its next step at once, so the cost is linear in
    the interactions and nothing holds a Python object per interaction (ids are Arrow strings).
    """
    if num_topics < 1 or num_items < num_topics:
        raise ValueError(f"data.synthetic: need num_items ({num_items}) >= num_topics ({num_topics}) >= 1")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"data.synthetic: need 2 <= min_len ({min_len}) <= max_len ({max_len})")
    if num_users < 1:
        raise ValueError(f"data.synthetic: need num_users ({num_users}) >= 1")
    rng = np.random.default_rng(seed)
    topic_of = np.arange(num_items) % num_topics
    rng.shuffle(topic_of)
    popularity = 1.0 / np.power(rng.permutation(num_items) + 1.0, popularity_exponent)
    catalog = _Catalog(topic_of, popularity, num_topics, rng)
    items = pd.DataFrame(
        {
            "item_id": _ids("i", np.arange(num_items)),
            "text": _item_texts(topic_of, num_topics, rng),
            "categories": [[f"topic_{t}"] for t in topic_of.tolist()],
        }
    )
    # users start at random moments over about four months and act over months, so their
    # sequences interleave in time (a time cut then splits users, not just whole sequences)
    starts = 1_000_000_000 + np.random.default_rng(seed + 1).integers(0, 10_000_000, size=num_users)
    liked = _distinct_topics(num_users, num_topics, min(topics_per_user, num_topics), rng)
    lengths = rng.integers(min_len, max_len + 1, size=num_users)
    history, count = _walk(catalog, liked, lengths, p_follow, rng)
    users = np.repeat(np.arange(num_users), count)
    item_col = history[np.arange(max_len)[None, :] < count[:, None]]
    # hours to weeks apart: sequences overlap in time
    gaps = 5_000 * rng.integers(1, 600, size=len(users), dtype=np.int64)
    clock = np.cumsum(gaps)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])[count > 0]
    stamps = starts[users] + clock - np.repeat(clock[first] - gaps[first], count[count > 0])
    interactions = pd.DataFrame({"user_id": _ids("u", users), "item_id": _ids("i", item_col), "timestamp": stamps.astype(np.int64)})
    return RawDataset(name=f"synthetic(seed={seed})", interactions=interactions, items=items)


class _Catalog:
    """Items grouped by topic: each topic's chain (``successor``) and popularity draws within a topic."""

    def __init__(self, topic_of: np.ndarray, popularity: np.ndarray, num_topics: int, rng: np.random.Generator):
        perm = rng.permutation(len(topic_of))
        # items grouped by topic, in random order within it: the order of each topic's chain
        self.order = perm[np.argsort(topic_of[perm], kind="stable")]
        topics = topic_of[self.order]
        self.start = np.searchsorted(topics, np.arange(num_topics))
        self.end = np.append(self.start[1:], len(topics))
        nxt = np.roll(self.order, -1)
        nxt[self.end - 1] = self.order[self.start]  # each chain closes on itself
        self.successor = np.empty(len(topic_of), dtype=np.int64)
        self.successor[self.order] = nxt
        # cumulative popularity within each topic, offset by the topic number: one sorted key
        # for every topic, so a draw in topic t is a binary search for t + u, u in [0, 1)
        weight = popularity[self.order]
        cum = np.cumsum(weight)
        before = np.repeat(cum[self.start] - weight[self.start], self.end - self.start)
        total = np.repeat(cum[self.end - 1] - before[self.start], self.end - self.start)
        self.key = topics + (cum - before) / total
        self.popularity = popularity

    def draw(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``topics``, by popularity within that topic."""
        pos = np.searchsorted(self.key, topics + rng.random(len(topics)), side="right")
        return self.order[np.clip(pos, self.start[topics], self.end[topics] - 1)]

    def draw_uniform(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``topics``, uniformly within that topic (away from the popular head)."""
        size = self.end[topics] - self.start[topics]
        return self.order[self.start[topics] + (rng.random(len(topics)) * size).astype(np.int64)]

    def draw_unseen(self, topics: np.ndarray, seen: np.ndarray, rng: np.random.Generator) -> int:
        """One item of ``topics`` not in ``seen``, by popularity; -1 when every one was seen."""
        pool = np.concatenate([self.order[self.start[t] : self.end[t]] for t in topics])
        pool = pool[~np.isin(pool, seen)]
        if pool.size == 0:
            return -1
        return int(rng.choice(pool, p=self.popularity[pool] / self.popularity[pool].sum()))


def _walk(
    catalog: _Catalog, liked: np.ndarray, lengths: np.ndarray, p_follow: float, rng: np.random.Generator, tries: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Every user's sequence, one step for all users at a time: follow the chain from the previous
    item with ``p_follow``, else (or when that item was seen) draw by popularity from a liked topic
    an item the user has not seen. Draws that hit a seen item are retried (``tries`` times by
    popularity, then uniformly within the topic, then, for the rare rows left, from the exact pool
    of unseen items); a user whose liked topics are all seen stops early. Returns [users, max_len]
    items (-1 pads) and each user's count."""
    num_users, max_len = len(lengths), int(lengths.max())
    history = np.full((num_users, max_len), -1, dtype=np.int64)
    count = np.zeros(num_users, dtype=np.int64)
    done = np.zeros(num_users, dtype=bool)
    for step in range(max_len):
        act = np.flatnonzero((lengths > step) & ~done)
        seen = history[:, :step][act]
        prev = np.where(count[act] > 0, history[act, np.maximum(count[act] - 1, 0)], -1)
        item = np.where((prev >= 0) & (rng.random(len(act)) < p_follow), catalog.successor[np.maximum(prev, 0)], -1)
        todo = (item < 0) | (seen == item[:, None]).any(axis=1)
        for draw in [catalog.draw] * tries + [catalog.draw_uniform] * 2 * tries:
            rows = np.flatnonzero(todo)
            if rows.size == 0:
                break
            topics = liked[act[rows], rng.integers(0, liked.shape[1], size=rows.size)]
            item[rows] = draw(topics, rng)
            todo[rows] = (seen[rows] == item[rows, None]).any(axis=1)
        for r in np.flatnonzero(todo):  # rare: only when most of the liked topics' items were seen
            item[r] = catalog.draw_unseen(liked[act[r]], seen[r], rng)
        stuck = item < 0
        done[act[stuck]] = True
        ok = act[~stuck]
        history[ok, count[ok]] = item[~stuck]
        count[ok] += 1
    return history, count


def _distinct_topics(num_users: int, num_topics: int, k: int, rng: np.random.Generator, chunk: int = 100_000) -> np.ndarray:
    """``k`` distinct topics per user (the first ``k`` of a random order, a chunk of users at a time)."""
    out = np.empty((num_users, k), dtype=np.int64)
    for s in range(0, num_users, chunk):
        n = min(chunk, num_users - s)
        out[s : s + n] = np.argsort(rng.random((n, num_topics)), axis=1)[:, :k]
    return out


def _item_texts(topic_of: np.ndarray, num_topics: int, rng: np.random.Generator) -> list[str]:
    """Each item's text: two filler words and three of its topic's words, then its number."""
    per_topic = max(1, len(_WORDS) // num_topics)
    topic_words = (np.arange(num_topics)[:, None] * per_topic + np.arange(per_topic)[None, :]) % len(_WORDS)
    n = len(topic_of)
    picks = np.argsort(rng.random((n, per_topic)), axis=1)[:, : min(3, per_topic)]
    words = np.asarray(_WORDS, dtype=object)[topic_words[topic_of[:, None], picks]]
    filler = np.asarray(_FILLER, dtype=object)[np.argsort(rng.random((n, len(_FILLER))), axis=1)[:, :2]]
    return [f"{f[0]} {w[0]} {f[1]} {' '.join(w[1:])} #{i}" for i, (f, w) in enumerate(zip(filler.tolist(), words.tolist()))]


def _ids(prefix: str, numbers: np.ndarray) -> pd.Series:
    """``prefix`` + number as an Arrow-backed string column (no Python string per row)."""
    return pd.Series(pc.binary_join_element_wise(prefix, pc.cast(pa.array(numbers), pa.string()), ""), dtype="str")
