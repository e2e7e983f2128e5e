"""User tower: GPT-2 over the sequence of item vectors (``inputs_embeds``), projected to ``dim``."""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2Model


class UserTower(nn.Module):
    """Causal GPT-2 reading item representations; every position is a user state."""

    def __init__(self, gpt: GPT2Model, dim: int):
        super().__init__()
        self.gpt = gpt
        # the tower feeds ``inputs_embeds``: GPT-2's token embedding never gets a gradient, and
        # a trainable parameter without one breaks DDP with find_unused_parameters=False
        gpt.get_input_embeddings().requires_grad_(False)
        width = gpt.config.n_embd
        self.inp = nn.Identity() if width == dim else nn.Linear(dim, width)
        self.out = nn.Identity() if width == dim else nn.Linear(width, dim)

    def forward(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] item vectors, [B, L] bool mask (right-padded) -> [B, L, dim] user states."""
        hidden = self.gpt(inputs_embeds=self.inp(item_vectors), attention_mask=mask.long()).last_hidden_state
        return self.out(hidden)

    def last(self, item_vectors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The state after each user's last real item: [B, dim]."""
        states = self.forward(item_vectors, mask)
        last = mask.long().sum(dim=1).clamp(min=1) - 1
        return states[torch.arange(states.shape[0], device=states.device), last]

    def out_device(self) -> torch.device:
        return next(self.parameters()).device
