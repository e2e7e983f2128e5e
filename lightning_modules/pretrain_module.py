"""Pretraining: causal next-item prediction at every position, plus optional MLM on item text."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from lightning_modules.item_tower import bert_embeddings
from lightning_modules.retrieval_module import RetrievalModule


def mask_tokens(
    ids: torch.Tensor, attention: torch.Tensor, special: torch.Tensor, mask_id: int, vocab: int, probability: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: pick ``probability`` of real, non-special tokens; 80% [MASK], 10% random, 10% kept.

    Returns (masked input ids, labels with -100 where nothing is predicted).
    """
    can = attention.bool() & ~special
    pick = (torch.rand(ids.shape, generator=generator, device=ids.device) < probability) & can
    labels = torch.where(pick, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator, device=ids.device)
    inputs = ids.clone()
    inputs[pick & (roll < 0.8)] = mask_id
    rand = pick & (roll >= 0.8) & (roll < 0.9)
    inputs[rand] = torch.randint(vocab, ids.shape, generator=generator, device=ids.device)[rand]
    return inputs, labels


class PretrainModule(RetrievalModule):
    """Next-item pretraining of both towers; ``mlm_weight`` > 0 adds masked-language modelling
    of item text on the item tower's encoder (which then must have trainable layers)."""

    special_ids: torch.Tensor  # a buffer, registered in __init__ with MLM

    def __init__(
        self,
        *args,
        mlm_weight: float = 0.0,
        mlm_probability: float = 0.15,
        mlm_batch_items: int = 64,
        mask_token_id: int | None = None,
        special_token_ids: tuple[int, ...] = (),
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.mlm_weight = mlm_weight
        self.mlm_probability = mlm_probability
        self.mlm_batch_items = mlm_batch_items
        self.mlm_head: BertOnlyMLMHead | None = None
        if mlm_weight > 0:
            encoder = self.model.item_tower.encoder
            if encoder is None or self.model.item_tower.encoder_frozen:
                raise ValueError(
                    "pretrain.mlm_weight > 0 needs a text encoder with trainable layers (model.item_tower.freeze_encoder=false or model.item_tower.unfreeze_top_layers > 0)"
                )
            if mask_token_id is None:
                raise ValueError("MLM needs the tokenizer's mask token id")
            self.mlm_head = BertOnlyMLMHead(encoder.config)
            # Module.__getattr__ types word_embeddings Tensor | Module; in the BERT family it is the token nn.Embedding
            self.mlm_head.predictions.decoder.weight = cast(nn.Embedding, bert_embeddings(encoder).word_embeddings).weight
            # the head's forward adds decoder.bias only: one bias, else `predictions.bias` is a
            # trainable parameter that never gets a gradient (as BertForMaskedLM ties them)
            self.mlm_head.predictions.bias = self.mlm_head.predictions.decoder.bias
            self.mask_token_id = mask_token_id
            self.register_buffer("special_ids", torch.tensor(sorted(set(special_token_ids)), dtype=torch.long), persistent=False)

    def mlm_loss(self) -> torch.Tensor:
        tower = self.model.item_tower
        encoder, head = tower.encoder, self.mlm_head
        if encoder is None or head is None:
            raise RuntimeError("PretrainModule.mlm_loss: MLM is off (pretrain.mlm_weight = 0)")
        warm = (~tower.cold).nonzero().squeeze(1)  # held-out (cold-start) items' text is never fitted
        items = warm[torch.randint(warm.numel(), (self.mlm_batch_items,), device=warm.device)]
        ids, attention = tower.token_ids[items], tower.attention_mask[items]
        special = torch.isin(ids, self.special_ids)
        inputs, labels = mask_tokens(ids, attention, special, self.mask_token_id, encoder.config.vocab_size, self.mlm_probability)
        hidden = encoder(input_ids=inputs, attention_mask=attention).last_hidden_state
        logits = head(hidden)
        if not (labels >= 0).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.next_item_loss(batch)
        bs = batch["items"].shape[0]
        self.log("train/next_item_loss", loss, batch_size=bs)
        if self.mlm_head is not None:
            mlm = self.mlm_loss()
            self.log("train/mlm_loss", mlm, batch_size=bs)
            loss = loss + self.mlm_weight * mlm
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        return loss
