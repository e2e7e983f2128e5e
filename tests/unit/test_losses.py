"""The sampled softmax (in-batch + sampled negatives, logQ) against a direct computation."""
from __future__ import annotations

import math

import torch

from lightning_modules.sampled_softmax import SampledSoftmaxLoss, full_softmax_loss


def test_candidates_are_unique_and_labels_point_at_positives():
    loss = SampledSoftmaxLoss(torch.tensor([5.0, 1, 1, 3, 0, 0]), num_negatives=8, sampler="uniform")
    gen = torch.Generator().manual_seed(0)
    positives = torch.tensor([3, 0, 3, 1])
    cand, labels, log_q = loss.candidates(positives, generator=gen)
    assert cand.tolist() == sorted(set(cand.tolist()))
    assert cand[labels].tolist() == positives.tolist()
    p = (torch.tensor([5.0, 1, 1, 3, 0, 0]) + 1e-3) / (10 + 6e-3)
    expected = torch.log(4 * p[cand] + 8 * (1 / 6))
    assert torch.allclose(log_q, expected, atol=1e-6)


def test_loss_equals_direct_cross_entropy_with_logq():
    torch.manual_seed(0)
    counts = torch.tensor([10.0, 2, 0, 7, 1])
    loss = SampledSoftmaxLoss(counts, num_negatives=3, sampler="popularity", logq_correction=True)
    users, items = torch.randn(4, 6), torch.randn(5, 6)
    positives = torch.tensor([0, 3, 3, 1])
    cand, labels, log_q = loss.candidates(positives, generator=torch.Generator().manual_seed(1))
    logits = users @ items[cand].T / 0.7
    got = loss(logits, labels, log_q)
    total = 0.0
    for m in range(4):
        row = [float(users[m] @ items[c] / 0.7 - log_q[j]) for j, c in enumerate(cand.tolist())]
        pos = row[cand.tolist().index(int(positives[m]))]
        total += -(pos - math.log(sum(math.exp(x) for x in row)))
    assert abs(got.item() - total / 4) < 1e-5
    plain = SampledSoftmaxLoss(counts, num_negatives=3, logq_correction=False)
    assert not torch.isclose(plain(logits, labels, log_q), got)


def test_logq_removes_the_popularity_bias_of_in_batch_negatives():
    counts = torch.tensor([100.0, 1.0])
    loss = SampledSoftmaxLoss(counts, num_negatives=0)
    _, labels, log_q = loss.candidates(torch.tensor([0, 1]))
    assert log_q[0] > log_q[1]  # the popular item is penalised more as a candidate


def test_full_softmax_is_cross_entropy_over_the_catalog():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    assert abs(full_softmax_loss(logits, torch.tensor([0])).item() - expected) < 1e-6


def test_items_held_out_of_training_are_never_candidates_nor_in_the_softmax():
    counts = torch.tensor([5.0, 1, 0, 3])
    allowed = torch.tensor([True, True, False, True])
    for sampler in ("uniform", "popularity"):
        loss = SampledSoftmaxLoss(counts, num_negatives=200, sampler=sampler, allowed=allowed)
        cand, _, _ = loss.candidates(torch.tensor([0, 3]), generator=torch.Generator().manual_seed(0))
        assert 2 not in cand.tolist() and loss.proposal[2] == 0
    logits = torch.tensor([[2.0, 0.0, 9.0, -1.0]])
    excluded = ~allowed
    reduced = torch.tensor([[2.0, 0.0, -1.0]])
    assert torch.isclose(full_softmax_loss(logits, torch.tensor([0]), excluded), full_softmax_loss(reduced, torch.tensor([0])))
    smoothed = full_softmax_loss(logits, torch.tensor([0]), excluded, label_smoothing=0.2)
    assert torch.isclose(smoothed, torch.nn.functional.cross_entropy(reduced, torch.tensor([0]), label_smoothing=0.2))
    assert smoothed > full_softmax_loss(logits, torch.tensor([0]), excluded)
