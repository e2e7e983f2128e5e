"""Masked-language modelling of item text in pretraining."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from jobs.runtime.config.assembly import build_datamodule, build_model, build_module
from lightning_modules.pretrain_module import mask_tokens


def test_mask_tokens_only_touches_real_non_special_tokens():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (64, 20), generator=gen)
    ids[:, 0] = 101  # [CLS]
    attention = torch.ones_like(ids)
    attention[:, 15:] = 0
    special = ids == 101
    inputs, labels = mask_tokens(ids, attention, special, mask_id=103, vocab=100, probability=0.3, generator=gen)
    picked = labels != -100
    assert not picked[:, 0].any() and not picked[:, 15:].any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(inputs[~picked], ids[~picked])
    frac_masked = (inputs[picked] == 103).float().mean().item()
    assert 0.7 < frac_masked < 0.9  # about 80% become [MASK]
    assert 0.2 < picked.float().sum().item() / attention[:, 1:].sum().item() < 0.4


def test_mlm_adds_a_loss_that_trains_the_encoder(tiny_cfg, tmp_path):
    """The training loss is next-item + mlm_weight x MLM, and the MLM part reaches the encoder (the
    next-item loss trains the unfrozen encoder too, so a gradient alone would not show it)."""
    cfg = tiny_cfg("pretrain", "pretrain.mlm_weight=0.5", "pretrain.max_epochs=1", "trainer.limit_train_batches=2")
    pl.seed_everything(0)
    dm = build_datamodule(cfg)
    module = build_module(cfg, "pretrain", build_model(cfg, dm), dm)
    batch = next(iter(dm.train_dataloader()))
    word_embeddings = module.model.item_tower.encoder.embeddings.word_embeddings.weight
    assert module.mlm_head.predictions.decoder.weight is word_embeddings  # tied
    torch.manual_seed(1)  # the same draws (dropout, masked tokens) for the parts and the total
    next_item, mlm = module.next_item_loss(batch), module.mlm_loss()
    torch.manual_seed(1)
    total = module.training_step(batch, 0)
    assert mlm.item() > 0 and mlm.requires_grad
    assert torch.allclose(total, next_item + 0.5 * mlm, rtol=1e-6)
    (from_next_item,) = torch.autograd.grad(next_item, word_embeddings, retain_graph=True)
    (from_total,) = torch.autograd.grad(total, word_embeddings)
    assert from_total.abs().sum() > 0
    assert not torch.allclose(from_total, from_next_item)  # MLM's share of the encoder's gradient


def test_mlm_needs_a_trainable_encoder(tiny_cfg):
    from jobs.runtime.config.schema import validate

    cfg = tiny_cfg("pretrain", "pretrain.mlm_weight=0.5", "model.item_tower.freeze_encoder=true")
    with pytest.raises(ValueError, match="pretrain.mlm_weight"):
        validate(cfg)
