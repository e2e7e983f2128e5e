"""A sparse id table (model.item_tower.sparse_ids): the id embedding's gradient and AdamW update
cover only the rows of the step, and otherwise train as the dense table does."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jobs.runtime.config.assembly import SPARSE_IDS_MIN_ITEMS, sparse_ids_of
from lightning_modules.sparse_adamw import SparseRowAdamW, clip_grad_norm_


def _pair(rows: int = 50, dim: int = 6) -> tuple[nn.Module, nn.Module]:
    """The same little model twice: a dense and a sparse id table, each with a dense head."""
    torch.manual_seed(0)
    dense = nn.ModuleDict({"ids": nn.Embedding(rows, dim), "head": nn.Linear(dim, 1)})
    sparse = copy.deepcopy(dense)
    sparse["ids"].sparse = True
    return dense, sparse


def _groups(model: nn.Module, decay: float) -> list[dict]:
    return [{"params": [model["ids"].weight], "weight_decay": decay}, {"params": list(model["head"].parameters()), "weight_decay": 0.01}]


def _step(model: nn.Module, opt: torch.optim.Optimizer, rows: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    opt.zero_grad()
    """The head sees the first three rows only, the others add a term of their own: rows do not
    interact through the head, so a row's update depends on its own history alone."""
    ids = model["ids"]
    loss = (model["head"](ids(rows[:3])) ** 2).mean() + ids(rows[:1]).sum() + 0.1 * (ids(rows[3:]) ** 2).sum()  # row 0 used twice
    loss.backward()
    if clip is not None:
        clip_grad_norm_(list(model.parameters()), clip)
    opt.step()
    return loss.detach()


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_rows_in_every_step_train_exactly_as_with_dense_adamw_and_untouched_rows_never_change(decay):
    dense, sparse = _pair()
    dense_opt = torch.optim.AdamW(_groups(dense, decay), lr=0.05)
    sparse_opt = SparseRowAdamW(_groups(sparse, decay), lr=0.05)
    always = torch.tensor([1, 4, 7])
    start = sparse["ids"].weight.detach().clone()
    for step in range(6):
        rows = torch.cat([always, torch.tensor([10 + step % 2, 20 + step % 2])])  # 10/11, 20/21: every other step
        dense_loss, sparse_loss = _step(dense, dense_opt, rows), _step(sparse, sparse_opt, rows)
        assert sparse["ids"].weight.grad is not None and sparse["ids"].weight.grad.is_sparse
        # until a row comes back after a step without it, dense and lazy agree everywhere (dense
        # AdamW decays every row each step; lazy decay only the rows of the step)
        if step < (1 if decay else 2):
            assert torch.allclose(dense_loss, sparse_loss, atol=1e-6)
    w_dense, w_sparse = dense["ids"].weight.detach(), sparse["ids"].weight.detach()
    assert torch.allclose(w_sparse[always], w_dense[always], atol=1e-6)  # the same update and moments
    for p, q in zip(dense["head"].parameters(), sparse["head"].parameters()):
        assert torch.allclose(p, q, atol=1e-6)  # the dense parameters: AdamW's own step
    never = torch.tensor([r for r in range(50) if r not in {1, 4, 7, 10, 11, 20, 21}])
    assert torch.equal(w_sparse[never], start[never])  # untouched rows keep weights...
    assert not sparse_opt.state[sparse["ids"].weight]["exp_avg"][never].any()  # ...and zero moments
    # lazy Adam: a row absent from a step does not move in it (dense AdamW keeps moving it by its momentum)
    assert not torch.allclose(w_sparse[10], w_dense[10], atol=1e-6)


def test_clipping_counts_sparse_rows_like_torch_counts_the_dense_gradient():
    dense, sparse = _pair()
    rows = torch.tensor([3, 3, 9, 2])
    for model in (dense, sparse):
        loss = (model["head"](model["ids"](rows)) ** 2).sum() * 100
        loss.backward()
    expected = torch.nn.utils.clip_grad_norm_(list(dense.parameters()), 0.5)
    got = clip_grad_norm_(list(sparse.parameters()), 0.5)
    assert torch.isclose(got, expected, rtol=1e-5)
    assert torch.allclose(sparse["ids"].weight.grad.to_dense(), dense["ids"].weight.grad, atol=1e-6)
    assert torch.allclose(sparse["head"].weight.grad, dense["head"].weight.grad, atol=1e-6)


def test_the_optimizer_state_round_trips_through_a_state_dict():
    _, sparse = _pair()
    opt = SparseRowAdamW(_groups(sparse, 0.0), lr=0.05)
    _step(sparse, opt, torch.tensor([1, 2]))
    again = SparseRowAdamW(_groups(sparse, 0.0), lr=0.05)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))
    w = sparse["ids"].weight
    assert torch.equal(again.state[w]["exp_avg"], opt.state[w]["exp_avg"]) and float(again.state[w]["step"]) == 1.0


def test_auto_is_sparse_for_large_catalogs_and_never_with_deepspeed(tiny_cfg):
    cfg = tiny_cfg("finetune")
    assert cfg.model.item_tower.sparse_ids == "auto"
    assert not sparse_ids_of(cfg, SPARSE_IDS_MIN_ITEMS - 1) and sparse_ids_of(cfg, SPARSE_IDS_MIN_ITEMS)
    assert not sparse_ids_of(tiny_cfg("finetune", "strategy=deepspeed_stage_2"), 10 * SPARSE_IDS_MIN_ITEMS)
    assert sparse_ids_of(tiny_cfg("finetune", "model.item_tower.sparse_ids=true"), 10)
    assert not sparse_ids_of(tiny_cfg("finetune", "model.item_tower.sparse_ids=false"), 10 * SPARSE_IDS_MIN_ITEMS)


def test_a_sparse_id_table_trains_through_the_lightning_module(tiny_cfg, tmp_path):
    """One seeded fine-tuning epoch with the id table sparse: the module picks SparseRowAdamW,
    clips the sparse gradient, and the losses match the dense table's while every row used
    is used in every step (the first step), then stay close."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    from jobs.runtime.config.assembly import build_datamodule, build_model, build_module, build_trainer

    class Losses(Callback):
        def __init__(self):
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

    runs = {}
    for sparse in ("false", "true"):
        cfg = tiny_cfg(
            "finetune",
            "finetune.max_epochs=1",
            "trainer.limit_train_batches=4",
            "data.batch_size=16",
            "init_from=null",
            f"model.item_tower.sparse_ids={sparse}",
            "trainer.gradient_clip_val=0.5",
        )
        pl.seed_everything(cfg.seed, workers=True)
        dm = build_datamodule(cfg)
        module = build_module(cfg, "finetune", build_model(cfg, dm), dm)
        recorder = Losses()
        trainer = build_trainer(cfg, "finetune", tmp_path / sparse, [recorder])
        trainer.fit(module, datamodule=dm)
        assert isinstance(trainer.optimizers[0], SparseRowAdamW) == (sparse == "true")
        assert module.model.item_tower.id_embedding.sparse == (sparse == "true")
        runs[sparse] = recorder.losses
    assert len(runs["true"]) == 4
    assert runs["true"][0] == pytest.approx(runs["false"][0], abs=1e-6)  # before any update
    assert runs["true"] == pytest.approx(runs["false"], abs=0.05)  # lazy moments: close, not equal


def test_ray_ddp_does_not_broadcast_the_catalog_buffers_every_step(tiny_cfg):
    """The towers' buffers (the catalog's token ids and masks, sampling tables) are constant and
    alike on every rank: broadcasting them before every forward cost most of a step at 1 M items."""
    from jobs.runtime.training.ray_strategies import build_strategy

    strategy = build_strategy(tiny_cfg("finetune", "launcher=ray", "strategy=ddp"), "32-true")
    assert strategy._ddp_kwargs["forward_sync_buffers"] is False
