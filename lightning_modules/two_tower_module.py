"""Two-tower retrieval fine-tuning, starting from pretrained tower weights."""
from __future__ import annotations

import logging

import torch

from lightning_modules.retrieval_module import RetrievalModule

log = logging.getLogger(__name__)


class TwoTowerModule(RetrievalModule):
    """Retrieval fine-tuning: sampled softmax (in-batch + sampled negatives, logQ) by default."""

    def load_pretrained(self, state_dict: dict[str, torch.Tensor], source: str = "") -> None:
        """Load the TwoTowerModel weights of a pretraining run; every tensor must match."""
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        if missing or unexpected:
            raise ValueError(f"{source}: pretrained weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}); were both stages run with the same model config?")
        log.info("fine-tune: initialised from %s", source or "pretrained weights")
