"""What makes training cheap on accelerators stays correct: no trainable parameter without a
gradient (DDP with find_unused_parameters=False), activation checkpointing, chunk sizes chosen
from the device's memory, and the bank of stale negative item vectors."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from jobs.runtime.config.assembly import build_datamodule, build_model, build_module
from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2
from lightning_modules.item_tower import ItemTower, activation_bytes_per_item, auto_chunk_size
from lightning_modules.negative_bank import NegativeBank
from lightning_modules.retrieval_module import RetrievalModule
from lightning_modules.sampled_softmax import SampledSoftmaxLoss
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower
from tests.unit.test_towers import tiny_text_tower


@pytest.mark.parametrize(
    "stage, overrides",
    [
        ("finetune", []),
        ("pretrain", ["pretrain.mlm_weight=0.5"]),
        ("finetune", ["finetune.loss.bank_refresh_steps=2", "finetune.loss.bank_size=32"]),
        # the packaged MiniLM carries BERT's pooler, which the tower never uses
        ("finetune", ["model.item_tower.pretrained=minilm", "model.item_tower.hidden_size=384", "model.item_tower.num_heads=12"]),
    ],
    ids=["finetune", "pretrain-mlm", "finetune-bank", "finetune-minilm-unfrozen"],
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
    assert (module.negative_bank is not None) == ("bank" in " ".join(overrides))
    assert [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert "model.user_tower.gpt.wte.weight" in frozen  # read through inputs_embeds only


# ---- item tower: chunks by memory, text widths without per-chunk host reads -------------------
def test_chunk_size_follows_the_device_and_its_free_memory():
    base = dict(hidden=768, layers=12, heads=12, tokens=32)
    assert auto_chunk_size("cpu", None, **base) == 256  # CPU: what it always was
    assert auto_chunk_size("cuda", None, **base) == 256  # unknown free memory: the same
    per_item = activation_bytes_per_item(768, 12, 12, 32)
    assert per_item == 32 * (34 * 768 + 5 * 12 * 32) * 12  # bf16, about 10.8 MB
    # an H200 with 100 GiB free: a quarter of it holds 2,498 items -> 2,048 (a power of two)
    assert auto_chunk_size("cuda", 100 * 2**30, **base) == 2048
    # twice the text tokens, or fp32 activations: half as many items
    assert auto_chunk_size("cuda", 100 * 2**30, hidden=768, layers=12, heads=12, tokens=64) == 1024
    assert auto_chunk_size("cuda", 100 * 2**30, **base, bytes_per_value=4) == 1024
    # large (24 x 1024): 878 items fit -> 512; a nearly full card: the floor; a tiny model: the cap
    assert auto_chunk_size("cuda", 100 * 2**30, hidden=1024, layers=24, heads=16, tokens=32) == 512
    assert auto_chunk_size("cuda", 2**28, **base) == 64
    assert auto_chunk_size("cuda", 100 * 2**30, hidden=32, layers=2, heads=2, tokens=24) == 8192


def test_auto_chunk_size_on_a_cpu_is_the_old_fixed_size():
    tower = tiny_text_tower(chunk_size="auto")
    assert tower.chunk_size_on(torch.device("cpu")) == 256


@pytest.mark.parametrize("static_width", [False, True])
def test_chunked_encoding_reads_the_host_once_per_call_and_keeps_each_vector(static_width, monkeypatch):
    tower = tiny_text_tower(chunk_size=2, static_width=static_width).eval()
    idx = torch.tensor([5, 0, 11, 3, 8, 1, 6])
    whole = torch.cat([tiny_text_tower().eval().encode_text(i.view(1)) for i in idx])
    reads = []
    for name in ("item", "tolist", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    got = tower.encode_text(idx)
    monkeypatch.undo()
    assert torch.allclose(got, whole, atol=1e-5)
    assert reads == ([] if static_width else ["tolist"])  # 4 chunks: one read of all their widths, or none


# ---- activation checkpointing -----------------------------------------------------------------
def _tiny_module(dropout: float = 0.1, **tower) -> RetrievalModule:
    torch.manual_seed(0)
    encoder = build_bert_encoder(None, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, dropout=dropout)
    ids = torch.randint(5, 50, (40, 6))
    mask = torch.ones(40, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    item_tower = ItemTower(40, 16, encoder, ids, mask, dropout=dropout, **{"freeze_encoder": False, **tower})
    user_tower = UserTower(build_gpt2(n_layer=2, n_head=2, n_embd=16, max_positions=16, dropout=dropout), 16)
    loss = SampledSoftmaxLoss(torch.ones(40), num_negatives=8)
    return RetrievalModule(TwoTowerModel(item_tower, user_tower), loss).train()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(40, (6, 9), generator=g)
    mask = torch.ones(6, 8, dtype=torch.bool)
    mask[3:, 6:] = False
    targets = torch.where(mask, items[:, 1:], torch.full_like(mask, -1, dtype=torch.long))
    return {"items": items[:, :-1], "mask": mask, "targets": targets}


def _grads_and_saved_bytes(module: RetrievalModule) -> tuple[dict[str, torch.Tensor], int]:
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    module.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks and sampled negatives in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = module.next_item_loss(_batch())
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}, sum(saved)


@pytest.mark.parametrize("tower", [{}, {"freeze_encoder": True, "unfreeze_top_layers": 1}], ids=["trainable", "top-layer"])
def test_activation_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(tower):
    plain = _tiny_module(**tower)
    checkpointed = copy.deepcopy(plain)
    checkpointed.model.enable_activation_checkpointing()
    expected, plain_bytes = _grads_and_saved_bytes(plain)
    got, checkpointed_bytes = _grads_and_saved_bytes(checkpointed)
    assert expected.keys() == got.keys()
    assert any(name.startswith("model.item_tower.encoder.encoder.layer.1.") for name in expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
    assert checkpointed_bytes < 0.6 * plain_bytes  # the blocks' activations were not kept


# ---- bank of stale negatives ------------------------------------------------------------------
def _bank_and_fresh(refresh_steps: int, size: int = 8) -> tuple[RetrievalModule, RetrievalModule]:
    fresh = _tiny_module(dropout=0.0)
    banked = copy.deepcopy(fresh)
    banked.negative_bank = NegativeBank(size, refresh_steps)
    return fresh, banked


def _loss_and_grads(module: RetrievalModule, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = module.next_item_loss(_batch(seed))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_step(module, reference, seed: int, skip: str | None = None) -> tuple[dict, dict]:
    """One step of ``module`` and of ``reference``: the same loss, gradients on the same
    parameters, equal gradients (except those whose names start with ``skip``)."""
    expected, expected_grads = _loss_and_grads(reference, seed)
    got, grads = _loss_and_grads(module, seed)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        if skip is None or not name.startswith(skip):
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return grads, expected_grads


def test_bank_refreshed_every_step_scores_like_fresh_encoding():
    fresh, banked = _bank_and_fresh(refresh_steps=1)
    differed = 0
    for seed in range(3):
        bank_grads, fresh_grads = _assert_same_step(banked, fresh, seed, skip="model.item_tower.encoder.")
        # the negatives' text carries no encoder gradient: only the positives' and the histories'
        # do (visible when some negative is not a positive: 40 items, all 8 may be positives)
        own = ~torch.isin(banked.negative_bank.items, _batch(seed)["targets"])
        encoder = [n for n in fresh_grads if n.startswith("model.item_tower.encoder.")]
        same = torch.allclose(torch.cat([bank_grads[n].flatten() for n in encoder]), torch.cat([fresh_grads[n].flatten() for n in encoder]))
        assert encoder and same == (not own.any())
        differed += not same
    assert differed and banked.negative_bank.refreshes == 3


def test_a_bank_is_reused_for_refresh_steps_steps_and_encodes_only_the_positives_in_between():
    _, banked = _bank_and_fresh(refresh_steps=3, size=16)
    tower = banked.model.item_tower
    encoded: list[int] = []
    original = tower.encode_text
    tower.encode_text = lambda idx: encoded.append(idx.numel()) or original(idx)
    drawn = []
    for seed in range(7):
        _loss_and_grads(banked, seed)
        drawn.append(banked.negative_bank.items.clone())
    assert banked.negative_bank.refreshes == 3  # steps 0, 3, 6
    assert torch.equal(drawn[0], drawn[2]) and not torch.equal(drawn[2], drawn[3])
    histories = [torch.unique(_batch(s)["items"]).numel() for s in range(7)]
    positives = [torch.unique(_batch(s)["targets"][_batch(s)["targets"] >= 0]).numel() for s in range(7)]
    banks = [torch.unique(drawn[s]).numel() for s in (0, 3, 6)]
    # encoder calls, each step: the user tower's inputs, the bank's distinct items when it is
    # refreshed, the distinct positives; never the negatives otherwise
    expected = []
    for step in range(7):
        expected += [histories[step], *([banks[step // 3]] if step % 3 == 0 else []), positives[step]]
    assert encoded == expected


# ---- fused optimiser --------------------------------------------------------------------------
@pytest.mark.parametrize("device, fused", [("cpu", None), ("cuda", True)])
def test_adamw_is_fused_when_training_on_cuda(device, fused):
    module = _tiny_module()
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))  # what the strategy says
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is fused


def test_the_encoder_is_never_compiled_on_a_cpu():
    tower = tiny_text_tower(static_width=True, compile_encoder=True)
    tower.encode_text(torch.arange(5))
    assert not tower._compiled
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in tower.encoder.modules())


@pytest.mark.parametrize("top_layers, checkpointing", [(0, False), (1, True)], ids=["all-layers-train", "top-layer-trains-checkpointed"])
def test_compiled_layers_score_the_same_with_a_few_graphs_that_steps_do_not_add_to(top_layers, checkpointing):
    """What compile=true does on a GPU, traced here by dynamo with its eager backend: every path
    (the encoder's forward, or the trainable layers over the cached frozen ones) runs the compiled
    layers, with no graph break, and later steps of the same static shapes compile nothing new."""
    from torch._dynamo.utils import counters

    tower = tiny_text_tower(static_width=True, chunk_size=4, freeze_encoder=top_layers > 0, unfreeze_top_layers=top_layers)
    if checkpointing:
        tower.encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    items = torch.arange(tower.num_items)
    expected = tower.eval()(items)
    torch._dynamo.reset()
    counters.clear()
    tower.compile_layers(backend="eager", dynamic=False)
    torch.testing.assert_close(tower(items), expected)
    tower.train()
    graphs = []
    for _ in range(3):
        tower(torch.randperm(tower.num_items)[:7]).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert 1 <= graphs[0] <= 3 and graphs == [graphs[0]] * 3
    assert sum(counters["graph_break"].values()) == 0 and not counters["recompiles"]
    assert all(layer._compiled_call_impl is not None for layer in tower.encoder.encoder.layer)
    torch._dynamo.reset()


# ---- one encoder pass for the histories and the scored items ----------------------------------
@pytest.mark.parametrize("loss", ["sampled", "full", "bank"])
def test_shared_item_encoding_gives_the_same_loss_and_gradients_in_one_encoder_pass(loss):
    plain = _tiny_module(dropout=0.0)
    if loss == "full":
        plain.sampled_loss = None
    if loss == "bank":
        plain.negative_bank = NegativeBank(8, refresh_steps=2)
    shared = copy.deepcopy(plain)
    shared.shared_item_encoding = True
    encoded: list[int] = []
    original = shared.model.item_tower.encode_text
    shared.model.item_tower.encode_text = lambda idx: encoded.append(idx.numel()) or original(idx)
    for seed in range(2):
        _assert_same_step(shared, plain, seed)
    batches = [_batch(seed) for seed in range(2)]
    histories = [set(b["items"].flatten().tolist()) for b in batches]
    if loss == "full":
        assert encoded == [40, 40]  # the catalog, once per step (not once more for the histories)
    elif loss == "bank":  # the bank's items at its refresh, then histories and positives together
        positives = [set(b["targets"][b["targets"] >= 0].tolist()) for b in batches]
        assert len(encoded) == 3 and encoded[1:] == [len(h | p) for h, p in zip(histories, positives)]
    else:
        assert len(encoded) == 2 and all(n >= len(h) for n, h in zip(encoded, histories))


def test_the_bank_encodes_its_negatives_with_dropout_as_the_positives_are():
    module = _tiny_module(dropout=0.5)
    bank = NegativeBank(16, refresh_steps=5)
    tower = module.model.item_tower
    bank.refresh(module.sampled_loss, tower, torch.device("cpu"))
    with torch.no_grad():
        clean = tower.eval().encode_text(bank.unique)
    assert tower.train().encoder.training and not torch.allclose(bank.text, clean)  # not the eval-mode encoding
