"""A bank of stale negatives: sampled negative items whose text encodings are reused for a few steps.

Nearly all of a fine-tuning step's FLOPs go to the BERT tower encoding every candidate item
with its activations kept for the backward pass. The negatives need no gradient through the
text encoder to be useful: the bank draws ``size`` negatives from the sampler's proposal, encodes
their text once without gradients, and serves them as the sampled negatives of the next
``refresh_steps`` steps. They are encoded in the encoder's current mode, dropout included, as the
positives are: negatives encoded without dropout would differ from every positive in a way the
model could learn to recognise (and every item is encoded without dropout at evaluation). The projection and id embedding still apply fresh, with
gradients; the positives of each step go through the encoder as before. With
``refresh_steps=1`` and ``size`` equal to the number of negatives, a step scores exactly what
fresh encoding scores (only the encoder's gradient through the negatives is left out).
``RetrievalModule.next_item_loss`` merges the bank's encodings with the fresh ones (``merge``).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.item_tower import ItemTower
from lightning_modules.sampled_softmax import SampledSoftmaxLoss


class NegativeBank(nn.Module):
    """``size`` sampled negatives and their pooled text encodings, redrawn every ``refresh_steps``."""

    def __init__(self, size: int, refresh_steps: int):
        super().__init__()
        if size < 1 or refresh_steps < 1:
            raise ValueError(f"NegativeBank: size and refresh_steps must be >= 1, got {size} and {refresh_steps}")
        self.size = size
        self.refresh_steps = refresh_steps
        self.steps = 0  # training steps served since the bank was built
        self.refreshes = 0
        self.items: torch.Tensor | None = None  # the drawn negatives (with repeats, as drawn)
        self.unique: torch.Tensor | None = None  # their distinct items, sorted
        self.text: torch.Tensor | None = None  # pooled encodings of ``unique``

    def draw(self, loss: SampledSoftmaxLoss, tower: ItemTower, device: torch.device) -> torch.Tensor:
        """This step's sampled negatives; redraws and re-encodes them every ``refresh_steps`` calls."""
        if self.items is None or self.steps % self.refresh_steps == 0 or self.items.device != device:
            self.refresh(loss, tower, device)
        self.steps += 1
        assert self.items is not None  # refresh() draws them
        return self.items

    @torch.no_grad()
    def refresh(self, loss: SampledSoftmaxLoss, tower: ItemTower, device: torch.device) -> None:
        self.items = loss.sample(self.size).to(device)
        self.unique = torch.unique(self.items)
        self.text = None
        if tower.encoder is not None and not tower.encoder_frozen:  # a frozen tower caches its text itself
            self.text = tower.encode_text(self.unique)
        self.refreshes += 1

    def merge(self, fresh: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One table of encodings (sorted distinct items, their texts): the ``fresh`` ones (with
        gradients) and the bank's stale ones of every other item. The bank must hold encodings."""
        if self.unique is None or self.text is None:
            raise RuntimeError("NegativeBank.merge: the bank holds no text encodings (drawn with a trainable text encoder)")
        items, text = fresh
        stale = ~torch.isin(self.unique, items)
        merged = torch.cat([items, self.unique[stale]])
        order = torch.argsort(merged)
        return merged[order], torch.cat([text, self.text[stale].to(text.dtype)])[order]
