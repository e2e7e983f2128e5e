"""Full-ranking metrics: Recall/HR, NDCG, MRR at K, catalog coverage and intra-list diversity.

Ranking is over the whole catalog with the user's seen items removed. Ties count against
the model (the target ranks below every other item of equal score) and a NaN score never
counts as a hit, so a constant or broken model scores zero rather than high.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_KS = (10, 20, 50)


def mask_seen(scores: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """Copy of ``scores`` [B, N] with NaN and seen items (``seen`` [B, S], -1 padded) set to -inf."""
    out = torch.nan_to_num(scores.float(), nan=float("-inf"))
    rows, cols = torch.nonzero(seen >= 0, as_tuple=True)
    out[rows, seen[rows, cols]] = float("-inf")
    return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items, seen ones removed; inf when it cannot be a hit."""
    raw_target = scores.float().gather(1, targets[:, None]).squeeze(1)
    masked = mask_seen(scores, seen)
    t = masked.gather(1, targets[:, None])
    ahead = (masked >= t).sum(dim=1) - 1  # the target itself is >= itself
    ranks = ahead.double() + 1.0
    dead = torch.isnan(raw_target) | torch.isinf(t.squeeze(1))
    return torch.where(dead, torch.full_like(ranks, math.inf), ranks)


def metrics_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...] = DEFAULT_KS) -> dict[str, float]:
    """Mean Recall@K (= HR@K with one held-out item), NDCG@K and MRR@K over users."""
    out: dict[str, float] = {}
    r = ranks.double()
    for k in ks:
        hit = r <= k
        out[f"recall@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = torch.where(hit, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).mean().item()
        out[f"mrr@{k}"] = torch.where(hit, 1.0 / r, torch.zeros_like(r)).mean().item()
    return out


def top_k(scores: torch.Tensor, seen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best ``k`` unseen items per row (indices, scores), best first."""
    masked = mask_seen(scores, seen)
    k = min(k, masked.shape[1])
    values, idx = torch.topk(masked, k, dim=1)
    return idx, values


def category_matrix(categories: list[list[str]]) -> torch.Tensor:
    """Row-normalised multi-hot category vectors, [num_items, num_categories]."""
    names = sorted({c for cats in categories for c in cats})
    col = {c: j for j, c in enumerate(names)}
    m = torch.zeros(len(categories), max(1, len(names)))
    for i, cats in enumerate(categories):
        for c in cats:
            m[i, col[c]] = 1.0
    return torch.nn.functional.normalize(m, dim=1)


def intra_list_diversity(lists: torch.Tensor, features: torch.Tensor) -> float:
    """Mean over lists of the mean pairwise (1 - cosine similarity) of the items' feature vectors."""
    if lists.shape[1] < 2:
        return 0.0
    v = features[lists]  # [U, K, C]
    sim = v @ v.transpose(1, 2)
    k = lists.shape[1]
    off = (sim.sum(dim=(1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(dim=1)) / (k * (k - 1))
    return float((1.0 - off).mean().item())


class RankingAccumulator:
    """Collects target ranks and top-K lists batch by batch; ``compute`` gives the metric dict."""

    def __init__(self, num_items: int, ks: tuple[int, ...] = DEFAULT_KS, categories: torch.Tensor | None = None, keep_lists: int = 0):
        self.num_items = num_items
        self.ks = tuple(sorted(ks))
        self.categories = categories
        self.keep_lists = keep_lists
        self.ranks: list[torch.Tensor] = []
        self.lists: list[torch.Tensor] = []
        self.list_scores: list[torch.Tensor] = []
        self.users: list[torch.Tensor] = []

    def update(self, scores: torch.Tensor, targets: torch.Tensor, seen: torch.Tensor, users: torch.Tensor | None = None) -> None:
        self.ranks.append(target_ranks(scores, targets, seen).cpu())
        idx, values = top_k(scores, seen, max(self.ks[-1], self.keep_lists))
        self.lists.append(idx.cpu())
        self.list_scores.append(values.cpu())
        if users is not None:
            self.users.append(users.cpu())

    def merge_gathered(self, gather) -> None:
        """Replace this rank's results by every rank's (``gather``: tensor -> [world, ...] tensor),
        each user counted once (distributed samplers repeat a few users to even out shards)."""
        ranks, lists, scores, users = (gather(torch.cat(x)) for x in (self.ranks, self.lists, self.list_scores, self.users))
        users = users.reshape(-1).cpu()
        uniq, inverse = torch.unique(users, return_inverse=True)
        position = torch.arange(len(users))
        keep = torch.full((len(uniq),), len(users)).scatter_reduce(0, inverse, position, reduce="amin")
        self.ranks = [ranks.reshape(-1).cpu()[keep]]
        self.lists = [lists.reshape(-1, lists.shape[-1]).cpu()[keep]]
        self.list_scores = [scores.reshape(-1, scores.shape[-1]).cpu()[keep]]
        self.users = [users[keep]]

    def compute(self) -> dict[str, float]:
        ranks = torch.cat(self.ranks)
        out = metrics_from_ranks(ranks, self.ks)
        lists = torch.cat(self.lists)
        k = min(10, lists.shape[1])
        out[f"coverage@{k}"] = len(np.unique(lists[:, :k].numpy())) / self.num_items
        if self.categories is not None:
            out[f"diversity@{k}"] = intra_list_diversity(lists[:, :k], self.categories)
        return out

    def top_lists(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.lists), torch.cat(self.list_scores)
