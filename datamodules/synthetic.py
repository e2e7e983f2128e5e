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
    """Generate users' interaction sequences and item texts with planted topic/chain structure."""
    if num_topics < 1 or num_items < num_topics:
        raise ValueError(f"data.synthetic: need num_items ({num_items}) >= num_topics ({num_topics}) >= 1")
    if not 2 <= min_len <= max_len:
        raise ValueError(f"data.synthetic: need 2 <= min_len ({min_len}) <= max_len ({max_len})")
    rng = np.random.default_rng(seed)
    topic_of = np.arange(num_items) % num_topics
    rng.shuffle(topic_of)
    popularity = 1.0 / np.power(rng.permutation(num_items) + 1.0, popularity_exponent)
    members = [np.flatnonzero(topic_of == t) for t in range(num_topics)]
    successor = np.empty(num_items, dtype=np.int64)
    for items in members:
        order = rng.permutation(items)
        successor[order] = np.roll(order, -1)
    words_per_topic = max(1, len(_WORDS) // num_topics)

    def topic_words(t: int) -> list[str]:
        start = (t * words_per_topic) % len(_WORDS)
        return [_WORDS[(start + k) % len(_WORDS)] for k in range(words_per_topic)]

    texts = []
    for i in range(num_items):
        tw = topic_words(int(topic_of[i]))
        picked = rng.choice(tw, size=min(3, len(tw)), replace=False)
        filler = rng.choice(_FILLER, size=2, replace=False)
        texts.append(f"{filler[0]} {picked[0]} {filler[1]} {' '.join(picked[1:])} #{i}")
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(num_items)],
            "text": texts,
            "categories": [[f"topic_{int(t)}"] for t in topic_of],
        }
    )

    k = min(topics_per_user, num_topics)
    users, item_ids, stamps = [], [], []
    # users start at random moments over about four months and act over months, so their sequences interleave in
    # time (a time cut then splits users, not just whole sequences); a separate generator keeps
    # the draws of everything else as they were
    starts = 1_000_000_000 + np.random.default_rng(seed + 1).integers(0, 10_000_000, size=num_users)
    for u in range(num_users):
        clock = int(starts[u])
        liked = rng.choice(num_topics, size=k, replace=False)
        length = int(rng.integers(min_len, max_len + 1))
        seen: set[int] = set()
        prev = -1
        for _ in range(length):
            item = -1
            if prev >= 0 and rng.random() < p_follow:
                item = int(successor[prev])
            if item < 0 or item in seen:
                pool = np.concatenate([members[t] for t in liked])
                pool = pool[[p not in seen for p in pool]]
                if pool.size == 0:
                    break
                weights = popularity[pool] / popularity[pool].sum()
                item = int(rng.choice(pool, p=weights))
            seen.add(item)
            users.append(f"u{u}")
            item_ids.append(f"i{item}")
            clock += 5_000 * int(rng.integers(1, 600))  # hours to weeks apart: sequences overlap in time
            stamps.append(clock)
            prev = item
    interactions = pd.DataFrame({"user_id": users, "item_id": item_ids, "timestamp": np.asarray(stamps, dtype=np.int64)})
    return RawDataset(name=f"synthetic(seed={seed})", interactions=interactions, items=items)
