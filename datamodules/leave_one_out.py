"""Chronological leave-one-out split: per user, last = test, the one before = valid, rest = train.

Everything here is integer column work (sorts and offsets), so 20 M interactions split in
seconds and hold no Python object per interaction.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")
TRAIN, VALID, TEST = range(len(SPLITS))


def argsort_unique(key: np.ndarray, rows_per_bucket: int = 1 << 17) -> np.ndarray:
    """argsort of distinct non-negative int64 keys in about linear time: a linear (radix) pass on
    the keys' top bits, then one cache-sized sort per bucket. A single argsort of 20 M keys runs
    out of cache and grows like n^1.5 on this machine; this stays near n."""
    n = len(key)
    buckets = n // rows_per_bucket
    if buckets < 2:
        return np.argsort(key)
    top_bit = int(key.max()).bit_length()
    shift = max(0, top_bit - buckets.bit_length())
    bucket = (key >> shift).astype(np.int16 if buckets < 2**14 else np.int32)  # values < 2 * buckets
    perm = np.argsort(bucket, kind="stable")  # a radix sort for 16-bit keys
    ends = np.cumsum(np.bincount(bucket))
    del bucket
    sorted_key = key[perm]
    start = 0
    for end in ends.tolist():
        if end - start > 1:
            perm[start:end] = perm[start:end][np.argsort(sorted_key[start:end])]
        start = end
    return perm


def argsort_pairs(major: np.ndarray, minor_rank: np.ndarray) -> np.ndarray:
    """Rows sorted by ``major`` then ``minor_rank`` (a permutation of 0..n-1, so every pair is
    unique): one argsort of a combined int64 key when it fits, else a lexsort."""
    n = len(major)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    low = int(major.min())
    if (int(major.max()) - low + 1) * n < 2**63:
        return argsort_unique((major.astype(np.int64) - low) * n + minor_rank)
    return np.lexsort((minor_rank, major))


def time_rank(timestamp: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """Each row's place (0..n-1) when sorted by timestamp, ties broken by ``order`` and then by
    row position (None: the rows are in file order already)."""
    n = len(timestamp)
    if order is None or (np.diff(order) > 0).all():
        tiebreak = np.arange(n, dtype=np.int64)
    else:
        tiebreak = np.empty(n, dtype=np.int64)
        tiebreak[np.argsort(order, kind="stable")] = np.arange(n, dtype=np.int64)
    by_time = argsort_pairs(timestamp, tiebreak)
    rank = np.empty(n, dtype=np.int64)
    rank[by_time] = np.arange(n, dtype=np.int64)
    return rank


def user_time_order(user: np.ndarray, timestamp: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
    """The permutation sorting rows by user, then timestamp, then ``order`` (as a stable sort
    on the three would), at the cost of two integer argsorts instead of three stable sorts."""
    return argsort_pairs(user, time_rank(timestamp, order))


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Offsets (with the end appended) of the runs of equal values in an already sorted array."""
    n = len(sorted_keys)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    bounds = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    return np.concatenate(([0], bounds, [n])).astype(np.int64)


def positions_and_counts(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows grouped by ``offsets``: each row's position in its group and its group's size."""
    sizes = np.diff(offsets)
    counts = np.repeat(sizes, sizes)
    position = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1], sizes)
    return position, counts


def split_codes(position: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Index into SPLITS of each row: the last of its user is test, the one before valid."""
    from_end = counts - 1 - position
    codes = np.full(len(position), TRAIN, dtype=np.int8)
    codes[from_end == 1] = VALID
    codes[from_end == 0] = TEST
    return codes


def leave_one_out_split(interactions: pd.DataFrame) -> pd.DataFrame:
    """Return the interactions with ``position`` and ``split`` columns, sorted by user and time.

    Needs columns user_idx, item_idx, timestamp and ``order`` (the original file order),
    which breaks timestamp ties so the split is deterministic. Users need at least three
    interactions (one each for train, valid and test).
    """
    for col in ("user_idx", "item_idx", "timestamp", "order"):
        if col not in interactions.columns:
            raise KeyError(f"leave_one_out_split: missing column '{col}'")
    user = interactions["user_idx"].to_numpy()
    perm = user_time_order(user, interactions["timestamp"].to_numpy(), interactions["order"].to_numpy())
    df = interactions.take(perm).reset_index(drop=True)
    offsets = group_starts(user[perm])
    position, counts = positions_and_counts(offsets)
    short = np.flatnonzero(np.diff(offsets) < 3)
    if short.size:
        bad = int(user[perm][offsets[short[0]]])
        raise ValueError(f"leave_one_out_split: user_idx {bad} has fewer than 3 interactions")
    df["position"] = position.astype(np.int32)
    df["split"] = pd.Categorical.from_codes(split_codes(position, counts), categories=list(SPLITS))
    return df
