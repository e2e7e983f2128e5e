"""Softmax losses over the catalog: sampled (in-batch + sampled negatives, logQ corrected) or full."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SampledSoftmaxLoss(nn.Module):
    """Cross-entropy over a candidate set: the batch's positives plus ``num_negatives`` sampled items.

    Candidates are deduplicated, so an item never appears both as a row's positive and as a
    negative of the same row. With ``logq_correction`` each candidate's logit is reduced by
    log of its expected number of occurrences in the candidate set,
    ``log(M * p_data(j) + S * q(j))`` for M positives drawn from the data distribution
    ``p_data`` (training item frequencies) and S negatives drawn from the proposal ``q``,
    which removes the popularity bias of in-batch negatives.

    Drawing costs no work over the whole catalog per step: the uniform sampler draws indices
    (into the allowed items when some are excluded); the popularity sampler inverts a cumulative
    distribution built once (a binary search per draw).
    """

    # buffers (registered in __init__); allowed_idx is None when every item may be sampled
    allowed_idx: torch.Tensor | None
    data_p: torch.Tensor
    proposal: torch.Tensor

    def __init__(
        self,
        item_counts: torch.Tensor,
        num_negatives: int = 256,
        sampler: str = "uniform",
        logq_correction: bool = True,
        popularity_alpha: float = 1.0,
        allowed: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        counts = torch.as_tensor(item_counts, dtype=torch.float64)
        data_p = (counts + 1e-3) / (counts + 1e-3).sum()
        if sampler == "uniform":
            proposal = torch.full_like(counts, 1.0 / counts.numel())
        elif sampler == "popularity":
            proposal = (counts + 1.0) ** popularity_alpha
        else:
            raise ValueError(f"SampledSoftmaxLoss: sampler must be 'uniform' or 'popularity', got {sampler!r}")
        if allowed is not None:  # items held out of training (cold start) are never sampled
            proposal = proposal * torch.as_tensor(allowed, dtype=torch.float64)
        if not proposal.sum() > 0:
            raise ValueError("SampledSoftmaxLoss: no item may be sampled (every item is excluded by 'allowed')")
        self.uniform = sampler == "uniform"
        allowed_idx = torch.nonzero(proposal > 0).squeeze(1)
        # uniform: the allowed items (an index into them per draw), or None when all are allowed
        self.register_buffer("allowed_idx", None if allowed_idx.numel() == counts.numel() else allowed_idx, persistent=False)
        # popularity: the cumulative weights and the last sampleable item, which a draw rounded up
        # to the total falls back on. Float64 (exact to ~1e-16 of the total), so a plain attribute
        # that follows the device: a buffer would be cast by half-precision training
        self.cdf = None if self.uniform else torch.cumsum(proposal, 0)
        self.last_allowed = int(allowed_idx[-1])
        proposal = proposal / proposal.sum()
        self.register_buffer("data_p", data_p.float(), persistent=False)
        self.register_buffer("proposal", proposal.float(), persistent=False)
        self.num_items = counts.numel()
        self.num_negatives = num_negatives
        self.logq_correction = logq_correction
        self.label_smoothing = label_smoothing

    def sample(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` negatives drawn from the proposal (with replacement), on the loss's device."""
        device = self.proposal.device
        if self.uniform:
            if self.allowed_idx is None:
                return torch.randint(self.num_items, (count,), generator=generator, device=device)
            return self.allowed_idx[torch.randint(self.allowed_idx.numel(), (count,), generator=generator, device=device)]
        cdf = self.cdf
        assert cdf is not None  # built in __init__ for every sampler but the uniform one
        if cdf.device != device:
            cdf = self.cdf = cdf.to(device)
        u = torch.rand(count, generator=generator, device=device, dtype=torch.float64) * cdf[-1]
        # the first item whose cumulative weight exceeds u: item i with probability weight_i / total
        return torch.searchsorted(cdf, u, right=True).clamp_(max=self.last_allowed)

    def candidates(
        self, positives: torch.Tensor, generator: torch.Generator | None = None, sampled: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unique candidate items [C], label of each positive in them [M], log Q of each candidate [C]).

        ``sampled``: negatives drawn from the proposal already (a bank of them), instead of
        ``num_negatives`` fresh draws."""
        if sampled is None:
            sampled = self.sample(self.num_negatives, generator).to(positives.device) if self.num_negatives else positives[:0]
        cand, inverse = torch.unique(torch.cat([positives, sampled]), return_inverse=True)
        labels = inverse[: positives.numel()]
        log_q = torch.log(positives.numel() * self.data_p[cand] + sampled.numel() * self.proposal[cand])
        return cand, labels, log_q

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of [M, C] logits (already divided by the temperature)."""
        if self.logq_correction:
            logits = logits - log_q.unsqueeze(0)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)


def full_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the whole catalog: [M, N] logits, [M] target items; ``excluded``
    items (held out of training) are not part of the softmax."""
    if excluded is not None and excluded.any():
        logits = logits.masked_fill(excluded, float("-inf"))
        if label_smoothing:  # smoothing mass only over the items in the softmax
            logp = F.log_softmax(logits, dim=-1)
            nll = -logp.gather(1, targets.unsqueeze(1)).squeeze(1)
            uniform = -logp.masked_fill(excluded, 0.0).sum(-1) / (~excluded).sum()
            return ((1 - label_smoothing) * nll + label_smoothing * uniform).mean()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
