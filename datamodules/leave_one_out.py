"""Chronological leave-one-out split: per user, last = test, the one before = valid, rest = train."""
from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "valid", "test")


def leave_one_out_split(interactions: pd.DataFrame) -> pd.DataFrame:
    """Return the interactions with ``position`` and ``split`` columns, sorted by user and time.

    Needs columns user_idx, item_idx, timestamp and ``order`` (the original file order),
    which breaks timestamp ties so the split is deterministic. Users need at least three
    interactions (one each for train, valid and test).
    """
    for col in ("user_idx", "item_idx", "timestamp", "order"):
        if col not in interactions.columns:
            raise KeyError(f"leave_one_out_split: missing column '{col}'")
    df = interactions.sort_values(["user_idx", "timestamp", "order"], kind="mergesort").reset_index(drop=True)
    counts = df.groupby("user_idx", sort=False)["item_idx"].transform("size").to_numpy()
    if counts.size and counts.min() < 3:
        bad = int(df.loc[counts < 3, "user_idx"].iloc[0])
        raise ValueError(f"leave_one_out_split: user_idx {bad} has fewer than 3 interactions")
    position = df.groupby("user_idx", sort=False).cumcount().to_numpy()
    split = np.full(len(df), "train", dtype=object)
    split[position == counts - 1] = "test"
    split[position == counts - 2] = "valid"
    df["position"] = position.astype(np.int32)
    df["split"] = pd.Categorical(split, categories=list(SPLITS))
    return df
