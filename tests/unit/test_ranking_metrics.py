"""Full-ranking metrics against hand-computed rankings: seen items removed, ties, NaN."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.full_ranking import popularity_scorer, rank_batches
from lightning_modules.ranking_metrics import category_matrix, intra_list_diversity, metrics_from_ranks, target_ranks, top_k

NONE = torch.full((1, 1), -1)


def test_rank_counts_only_unseen_items_above_the_target():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5]])
    assert target_ranks(scores, torch.tensor([3]), NONE).item() == 4
    seen = torch.tensor([[0, 2]])  # two better items are already seen
    assert target_ranks(scores, torch.tensor([3]), seen).item() == 2


def test_ties_rank_the_target_last_and_constant_scores_get_nothing():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5]])
    assert target_ranks(scores, torch.tensor([2]), NONE).item() == 4
    constant = torch.zeros(1, 1000)
    rank = target_ranks(constant, torch.tensor([0]), NONE)
    assert rank.item() == 1000
    assert metrics_from_ranks(rank, (10,))["ndcg@10"] == 0.0


def test_nan_never_counts_as_a_hit():
    assert math.isinf(target_ranks(torch.tensor([[float("nan"), 0.1, 0.2]]), torch.tensor([0]), NONE).item())
    all_nan = torch.full((2, 5), float("nan"))
    m = metrics_from_ranks(target_ranks(all_nan, torch.tensor([0, 3]), torch.full((2, 1), -1)), (10,))
    assert m == {"recall@10": 0.0, "ndcg@10": 0.0, "mrr@10": 0.0}
    other_nan = torch.tensor([[float("nan"), 0.5, 0.1]])  # a NaN competitor does not outrank the target
    assert target_ranks(other_nan, torch.tensor([1]), NONE).item() == 1


def test_seen_target_cannot_be_a_hit():
    assert math.isinf(target_ranks(torch.tensor([[0.1, 0.9]]), torch.tensor([1]), torch.tensor([[1]])).item())


def test_metric_values_by_hand():
    ranks = torch.tensor([1.0, 3.0, 11.0, math.inf])
    m = metrics_from_ranks(ranks, (10, 20))
    assert m["recall@10"] == pytest.approx(2 / 4)
    assert m["recall@20"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(12)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3) / 4)


def test_top_k_skips_seen_and_nan():
    scores = torch.tensor([[0.1, float("nan"), 0.9, 0.5, 0.3]])
    idx, _ = top_k(scores, torch.tensor([[2]]), 3)
    assert idx.tolist() == [[3, 4, 0]]


def test_diversity_and_coverage():
    feats = category_matrix([["A"], ["A"], ["B"], []])
    assert intra_list_diversity(torch.tensor([[0, 1]]), feats) == pytest.approx(0.0)
    assert intra_list_diversity(torch.tensor([[0, 2]]), feats) == pytest.approx(1.0)
    assert intra_list_diversity(torch.tensor([[0, 1, 2]]), feats) == pytest.approx(2 / 3)
    # coverage@K: the share of the catalog in at least one top-K list (here K = 2 of 5 items)
    from lightning_modules.ranking_metrics import RankingAccumulator

    five = category_matrix([["A"], ["A"], ["B"], [], ["B"]])
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.0], [0.9, 0.1, 0.8, 0.0, 0.0]])  # top 2: [0, 1] and [0, 2]
    acc = RankingAccumulator(5, ks=(2,), categories=five)
    acc.update(scores, torch.tensor([0, 0]), torch.full((2, 1), -1))
    m = acc.compute()
    assert m["coverage@2"] == pytest.approx(3 / 5)
    assert m["diversity@2"] == pytest.approx((0.0 + 1.0) / 2)
    same = RankingAccumulator(5, ks=(2,))
    same.update(scores[[0, 0]], torch.tensor([0, 0]), torch.full((2, 1), -1))
    assert same.compute()["coverage@2"] == pytest.approx(2 / 5)  # two users, one list: less of the catalog


def test_popularity_baseline_through_the_shared_ranker():
    counts = torch.tensor([5.0, 9.0, 1.0, 5.0])
    batch = {"targets": torch.tensor([3, 2]), "seen": torch.tensor([[1, -1], [0, 3]]), "items": torch.zeros(2, 1, dtype=torch.long)}
    acc = rank_batches(popularity_scorer(counts), [batch], num_items=4, ks=(1, 2))
    # order by count, ties by index: 1, 0, 3, 2. user 0 (1 seen): 0, 3 -> rank 2. user 1 (0, 3 seen): 1, 2 -> rank 2
    assert torch.cat(acc.ranks).tolist() == [2.0, 2.0]
    assert acc.compute()["recall@2"] == 1.0 and acc.compute()["recall@1"] == 0.0


def test_gathered_shards_count_each_user_once():
    from lightning_modules.ranking_metrics import RankingAccumulator

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.3, 0.2, 0.1]])
    targets, seen, users = torch.tensor([0, 0, 2]), torch.full((3, 1), -1), torch.tensor([7, 8, 9])
    whole = RankingAccumulator(3, ks=(1, 2))
    whole.update(scores, targets, seen, users)
    shards = [RankingAccumulator(3, ks=(1, 2)), RankingAccumulator(3, ks=(1, 2))]
    shards[0].update(scores[[0, 2]], targets[[0, 2]], seen[[0, 2]], users[[0, 2]])
    shards[1].update(scores[[1, 0]], targets[[1, 0]], seen[[1, 0]], users[[1, 0]])  # user 7 again, as padding
    fields = iter(("ranks", "lists", "list_scores", "users"))  # the order merge_gathered gathers them

    def all_gather(local: torch.Tensor) -> torch.Tensor:  # what every rank receives: [world, ...]
        name = next(fields)
        assert torch.equal(local, torch.cat(getattr(shards[0], name)))
        return torch.stack([torch.cat(getattr(shard, name)) for shard in shards])

    shards[0].merge_gathered(all_gather)
    assert sorted(torch.cat(shards[0].users).tolist()) == [7, 8, 9]
    assert shards[0].compute() == whole.compute()
