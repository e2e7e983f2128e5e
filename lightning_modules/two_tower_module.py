"""Two-tower retrieval fine-tuning, starting from pretrained tower weights."""

from __future__ import annotations

import logging

import torch

from lightning_modules.retrieval_module import RetrievalModule

log = logging.getLogger(__name__)


class TwoTowerModule(RetrievalModule):
    """Retrieval fine-tuning: sampled softmax (in-batch + sampled negatives, logQ) by default."""

    def load_pretrained(self, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
        """Load the TwoTowerModel weights of an earlier run; every tensor must match, except that
        the item-id embedding may have grown (a catalog with new items appended: trained rows
        are kept as they are, new rows start at zero)."""
        key = "item_tower.id_embedding.weight"
        own = self.model.state_dict().get(key)
        if key in state_dict and own is not None and state_dict[key].shape[0] < own.shape[0] and state_dict[key].shape[1:] == own.shape[1:]:
            grown = torch.zeros_like(own)
            grown[: state_dict[key].shape[0]] = state_dict[key]
            log.info("fine-tune: item-id embedding grown from %d to %d rows (new items start at zero)", state_dict[key].shape[0], own.shape[0])
            state_dict = {**state_dict, key: grown}
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{source}: pretrained weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}); were both stages run with the same model config?"
            )
        log.info("fine-tune: initialised from %s", source or "pretrained weights")
