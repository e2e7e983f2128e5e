"""The two towers together: score(user, item) = <u, v> / temperature (optionally on unit vectors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from lightning_modules.item_tower import ItemTower
from lightning_modules.user_tower import UserTower


class TwoTowerModel(nn.Module):
    """A user tower reading item vectors from an item tower; both map into one space."""

    def __init__(self, item_tower: ItemTower, user_tower: UserTower, temperature: float = 1.0, normalize: bool = False, dropout_targets: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        self.item_tower = item_tower
        self.user_tower = user_tower
        self.temperature = temperature
        self.normalize = normalize
        self.dropout_targets = dropout_targets  # apply the item tower's dropout to scored items too

    def enable_activation_checkpointing(self) -> None:
        """Recompute every GPT-2 block, and every BERT block when any of them trains, in the
        backward pass instead of keeping their activations (non-reentrant torch checkpointing,
        dropout replayed with the same random state: the same gradients, less memory)."""
        modules: list[PreTrainedModel] = [self.user_tower.gpt]
        encoder = self.item_tower.encoder
        if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
            modules.append(encoder)
        for module in modules:
            kwargs = {"use_reentrant": False}
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.normalize else x

    def user_states(self, items: torch.Tensor, mask: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """User vectors at every position: [B, L, dim]. ``encoded``: see ``ItemTower.forward``."""
        return self._out(self.user_tower(self.item_tower(items, encoded=encoded), mask))

    def user_vectors(self, items: torch.Tensor, mask: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """One vector per user, after the last item of the history: [B, dim]. ``encoded``: see ``ItemTower.forward``."""
        return self._out(self.user_tower.last(self.item_tower(items, encoded=encoded), mask))

    def item_vectors(self, item_idx: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Vectors of items being scored. ``encoded``: see ``ItemTower.forward``."""
        return self._out(self.item_tower(item_idx, dropout=self.dropout_targets, encoded=encoded))

    def catalog_vectors(self) -> torch.Tensor:
        """Every item's vector without gradients (evaluation)."""
        return self._out(self.item_tower.all_vectors())

    def catalog_vectors_train(self, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Every item's vector with gradients (full-softmax training)."""
        idx = torch.arange(self.item_tower.num_items, device=self.user_tower.out_device())
        return self.item_vectors(idx, encoded=encoded)

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """[U, d] x [N, d] -> [U, N] logits."""
        return users @ items.T / self.temperature
