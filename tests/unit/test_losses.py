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


def head_slope(logq_correction: bool, n: int = 500, batch: int = 16, head: int = 50, steps: int = 400) -> float:
    """One user context, positives drawn from a long-tailed popularity p, in-batch negatives only:
    fit a free logit per item and return the slope of the head items' logits against log p. The
    full softmax's optimum is logit = log p + c: slope 1."""
    p = 1 / (torch.arange(1, n + 1).float() + 10)
    p /= p.sum()
    torch.manual_seed(0)
    loss = SampledSoftmaxLoss(p * 1e6, num_negatives=0, logq_correction=logq_correction)
    logit = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([logit], lr=0.2)
    for _ in range(steps):
        positives = torch.multinomial(p, batch, replacement=True)
        cand, labels, log_q = loss.candidates(positives)
        opt.zero_grad()
        loss(logit[cand].expand(batch, -1), labels, log_q).backward()
        opt.step()
    x, y = p[:head].log(), logit.detach()[:head]
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def test_logq_removes_the_popularity_bias_of_in_batch_negatives():
    """Popular items are negatives in more batches: uncorrected, the fitted logits lose popularity
    (slope near 0); with logQ they recover the full softmax's log p (slope near 1)."""
    assert 0.8 < head_slope(logq_correction=True) < 1.3
    assert head_slope(logq_correction=False) < 0.4
    counts = torch.tensor([100.0, 1.0])
    _, _, log_q = SampledSoftmaxLoss(counts, num_negatives=0).candidates(torch.tensor([0, 1]))
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


def _drawn_frequencies(loss: SampledSoftmaxLoss, draws: int, seed: int) -> torch.Tensor:
    items = loss.sample(draws, generator=torch.Generator().manual_seed(seed))
    return torch.bincount(items, minlength=loss.proposal.numel()).double() / draws


def test_the_samplers_draw_the_proposal_that_logq_assumes():
    counts = torch.tensor([50.0, 0, 3, 20, 1, 7, 0, 100, 2, 9])
    allowed = torch.ones(10, dtype=torch.bool)
    allowed[[1, 5]] = False
    draws = 400_000
    for sampler, alpha in (("uniform", 1.0), ("popularity", 1.0), ("popularity", 0.5)):
        for mask in (None, allowed):
            loss = SampledSoftmaxLoss(counts, num_negatives=8, sampler=sampler, popularity_alpha=alpha, allowed=mask)
            freq = _drawn_frequencies(loss, draws, seed=3)
            expected = loss.proposal.double()
            # each frequency within 5 standard errors of its probability (a fixed seed: no flakes)
            tolerance = 5 * torch.sqrt(expected * (1 - expected) / draws) + 1e-12
            assert ((freq - expected).abs() <= tolerance).all(), (sampler, alpha, mask, freq, expected)
            if mask is not None:
                assert freq[~mask].sum() == 0  # excluded items are never drawn
            # a chi-square goodness of fit over the allowed items (df <= 9: 99.9% quantile 27.9)
            keep = expected > 0
            chi2 = (((freq - expected) ** 2 / expected)[keep]).sum() * draws
            assert chi2 < 27.9, (sampler, alpha, mask, float(chi2))


def test_the_popularity_sampler_inverts_its_cumulative_weights_at_the_edges():
    loss = SampledSoftmaxLoss(torch.tensor([0.0, 3.0, 0.0]), sampler="popularity", allowed=torch.tensor([True, True, False]))
    assert loss.cdf.dtype == torch.float64
    # u = 0 falls on the first item with weight, u rounded up to the total on the last allowed one
    assert loss.sample(1000, generator=torch.Generator().manual_seed(0)).unique().tolist() == [0, 1]
    assert loss.last_allowed == 1


def test_drawing_negatives_does_no_work_over_the_whole_catalog():
    """Structure, not timing: every tensor an op makes while drawing has the draws' size (no
    normalisation, cumulative sum or multinomial over the catalog per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.append((str(func), max((t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)), default=0)))
            return out

    n = 100_000
    counts = torch.arange(n, dtype=torch.float64) % 17
    allowed = torch.rand(n, generator=torch.Generator().manual_seed(0)) > 0.1
    for sampler in ("uniform", "popularity"):
        for mask in (None, allowed):
            loss = SampledSoftmaxLoss(counts, num_negatives=64, sampler=sampler, allowed=mask)
            with Sizes() as seen:
                drawn = loss.sample(64)
            assert drawn.shape == (64,)
            assert seen.ops and max(size for _, size in seen.ops) <= 64, seen.ops
            assert not {op.split(".")[1] for op, _ in seen.ops} & {"multinomial", "cumsum", "sum", "div"}, seen.ops
