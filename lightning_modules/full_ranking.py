"""Scoring users against the whole catalog, batch by batch, shared by validation and jobs.evaluate."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from lightning_modules.ranking_metrics import DEFAULT_KS, RankingAccumulator
from lightning_modules.two_tower_model import TwoTowerModel

Scorer = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def model_scorer(model: TwoTowerModel) -> Scorer:
    """A scorer giving [B, N] logits of each user's history against the (cached) catalog vectors."""
    catalog = model.catalog_vectors()

    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.score(model.user_vectors(batch["items"], batch["mask"]), catalog)

    return score


def popularity_scorer(item_counts: torch.Tensor) -> Scorer:
    """Most-popular baseline: training counts, ties broken by item index (a total order)."""
    counts = torch.as_tensor(item_counts, dtype=torch.float64)
    n = counts.numel()
    scores = (counts - torch.arange(n, dtype=torch.float64) / (n + 1)).float()

    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return scores.to(batch["targets"].device).expand(batch["targets"].shape[0], -1)

    return score


@torch.no_grad()
def rank_batches(
    scorer: Scorer,
    batches: Iterable[dict[str, torch.Tensor]],
    num_items: int,
    ks: tuple[int, ...] = DEFAULT_KS,
    categories: torch.Tensor | None = None,
    keep_lists: int = 0,
    device: torch.device | str = "cpu",
) -> RankingAccumulator:
    """Score every batch with ``scorer`` and accumulate ranks and top lists."""
    acc = RankingAccumulator(num_items, ks, categories, keep_lists)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        acc.update(scorer(batch), batch["targets"], batch["seen"])
    return acc
