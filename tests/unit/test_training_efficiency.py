"""What makes training cheap on accelerators stays correct: no trainable parameter without a
gradient (DDP with find_unused_parameters=False), activation checkpointing, chunk sizes chosen
from the device's memory, and the bank of stale negative item vectors."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from jobs.runtime.assembly import build_datamodule, build_model, build_module


@pytest.mark.parametrize(
    "stage, overrides",
    [
        ("finetune", []),
        ("pretrain", ["pretrain.mlm_weight=0.5"]),
        # the packaged MiniLM carries BERT's pooler, which the tower never uses
        ("finetune", ["model.item_tower.pretrained=minilm", "model.item_tower.hidden_size=384", "model.item_tower.num_heads=12"]),
    ],
    ids=["finetune", "pretrain-mlm", "finetune-minilm-unfrozen"],
)
def test_every_trainable_parameter_gets_a_gradient_in_one_step(stage, overrides, tiny_cfg):
    cfg = tiny_cfg(stage, "init_from=null", *overrides)
    pl.seed_everything(0)
    dm = build_datamodule(cfg)
    module = build_module(cfg, stage, build_model(cfg, dm), dm).train()
    loss = module.next_item_loss(next(iter(dm.train_dataloader())))
    if getattr(module, "mlm_head", None) is not None:
        loss = loss + module.mlm_loss()
    loss.backward()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert any(n.startswith("model.item_tower.encoder.") for n in trainable)  # the BERT does train
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert "model.user_tower.gpt.wte.weight" in frozen  # read through inputs_embeds only
