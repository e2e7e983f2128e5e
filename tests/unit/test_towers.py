"""Shapes, causality and masking of both towers; freezing and caching of the text encoder."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2
from lightning_modules.item_tower import ItemTower
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower

N, D = 12, 16


def tiny_text_tower(**kwargs) -> ItemTower:
    torch.manual_seed(0)
    encoder = build_bert_encoder(None, vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, dropout=0.0)
    ids = torch.randint(5, 50, (N, 6))
    mask = torch.ones(N, 6, dtype=torch.long)
    mask[::2, 4:] = 0  # some texts are shorter
    return ItemTower(N, D, encoder, ids, mask, dropout=0.0, **kwargs)


def tiny_model(**kwargs) -> TwoTowerModel:
    torch.manual_seed(0)
    user = UserTower(build_gpt2(n_layer=2, n_head=2, n_embd=8, max_positions=16, dropout=0.0), D)
    return TwoTowerModel(tiny_text_tower(**kwargs), user).eval()


def test_item_tower_shapes_and_id_only():
    tower = tiny_text_tower()
    assert tower(torch.tensor([[0, 3], [5, 5]])).shape == (2, 2, D)
    assert tower.all_vectors().shape == (N, D)
    ids_only = ItemTower(N, D, encoder=None, use_id_embedding=True)
    assert ids_only(torch.arange(N)).shape == (N, D)
    with pytest.raises(ValueError, match="use_id_embedding"):
        ItemTower(N, D, encoder=None, use_id_embedding=False)


def test_padding_tokens_do_not_change_the_text_vector():
    """Item 0's text is 4 of 6 tokens; encoded beside item 1 (6 tokens), its two padded positions go
    through the encoder, and only the attention mask keeps them out of its vector."""
    tower = tiny_text_tower(use_id_embedding=False).eval()
    pair = torch.tensor([0, 1])
    before = tower.encode_text(pair)  # encoded afresh on every call (only forward caches)
    tower.token_ids[0, 4:] = 7
    assert torch.allclose(before, tower.encode_text(pair), atol=1e-6)
    tower.attention_mask[0, 4:] = 1  # the same tokens, attended to: now they move the vector
    assert not torch.allclose(before[0], tower.encode_text(pair)[0], atol=1e-4)


def test_freezing_and_partial_unfreezing():
    frozen = tiny_text_tower(freeze_encoder=True)
    assert frozen.encoder_frozen and not any(p.requires_grad for p in frozen.encoder.parameters())
    frozen.train()
    assert not frozen.encoder.training  # a frozen encoder never runs dropout
    top = tiny_text_tower(freeze_encoder=True, unfreeze_top_layers=1)
    grads = {n.split(".")[2] if n.startswith("encoder.layer") else n.split(".")[0]: p.requires_grad for n, p in top.encoder.named_parameters()}
    assert grads["embeddings"] is False and grads["0"] is False and grads["1"] is True
    with pytest.raises(ValueError, match="unfreeze_top_layers"):
        tiny_text_tower(freeze_encoder=True, unfreeze_top_layers=3)


def test_frozen_text_is_cached_once():
    tower = tiny_text_tower(freeze_encoder=True)
    calls = []
    original = tower.encode_text
    tower.encode_text = lambda idx: calls.append(len(idx)) or original(idx)
    tower(torch.tensor([1, 2]))
    tower(torch.tensor([3]))
    assert calls == [N]  # the whole catalog, once


def test_user_tower_is_causal_and_ignores_padding():
    model = tiny_model()
    items = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    states = model.user_states(items, mask)
    assert states.shape == (2, 5, D)
    changed = items.clone()
    changed[0, 3] = 9  # a later item cannot change earlier states
    assert torch.allclose(states[0, :3], model.user_states(changed, mask)[0, :3], atol=1e-6)
    assert not torch.allclose(states[0, 3], model.user_states(changed, mask)[0, 3])
    padded = items.clone()
    padded[1, 2:] = 11  # what sits in padding does not matter
    assert torch.allclose(model.user_vectors(items, mask), model.user_vectors(padded, mask), atol=1e-6)
    assert torch.allclose(model.user_vectors(items, mask)[1], states[1, 1], atol=1e-6)  # last real position


def test_scores_are_dot_products_over_temperature():
    model = tiny_model()
    model.temperature = 0.5
    u, v = torch.randn(3, D), torch.randn(4, D)
    assert torch.allclose(model.score(u, v), (u @ v.T) / 0.5)


def test_cold_items_are_represented_by_their_text_alone():
    tower = tiny_text_tower().eval()
    cold = torch.zeros(N, dtype=torch.bool)
    cold[[1, 4]] = True
    before = tower.all_vectors()
    tower.set_cold_items(cold)
    after = tower.all_vectors()
    with torch.no_grad():
        text_only = tower.text_proj(tower.encode_text(torch.tensor([1, 4])))
    assert torch.allclose(after[[1, 4]], text_only, atol=1e-5)
    assert torch.equal(after[~cold], before[~cold])
    ids_only = ItemTower(N, D, encoder=None).eval()
    ids_only.set_cold_items(cold)
    assert ids_only.all_vectors()[cold].abs().sum() == 0  # no text: nothing to rank a cold item by
    with pytest.raises(ValueError, match="shape"):
        tower.set_cold_items(torch.zeros(N + 1, dtype=torch.bool))


def test_dropout_applies_to_inputs_not_to_scored_items_by_default():
    torch.manual_seed(0)
    tower = ItemTower(N, D, encoder=None, dropout=0.5).train()
    user = UserTower(build_gpt2(n_layer=1, n_head=2, n_embd=8, max_positions=16, dropout=0.0), D)
    model = TwoTowerModel(tower, user).train()
    clean = tower.id_embedding.weight
    assert torch.equal(model.item_vectors(torch.arange(N)), clean)
    assert not torch.equal(tower(torch.arange(N)), clean)  # the user tower's inputs get dropout
    noisy = TwoTowerModel(tower, user, dropout_targets=True).train()
    assert not torch.equal(noisy.item_vectors(torch.arange(N)), clean)


def test_partially_unfrozen_encoder_reuses_the_frozen_layers_output():
    cached = tiny_text_tower(freeze_encoder=True, unfreeze_top_layers=1).eval()
    plain = tiny_text_tower(freeze_encoder=True, unfreeze_top_layers=1, cache_frozen_layers_max_bytes=0).eval()
    idx = torch.tensor([0, 3, 7, 10])
    got = cached.encode_text(idx)
    assert cached._bottom_cache is not None and plain._frozen_bottom_states() is None
    assert torch.allclose(got, plain.encode_text(idx), atol=1e-5)  # same as running every layer
    got.sum().backward()  # gradients reach the trainable top layer only
    top, bottom = cached.encoder.encoder.layer[1], cached.encoder.encoder.layer[0]
    assert top.output.dense.weight.grad is not None and top.output.dense.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bottom.parameters())


def test_encoding_in_length_sorted_chunks_keeps_each_items_vector():
    tower = tiny_text_tower().eval()
    idx = torch.tensor([5, 0, 11, 3, 8, 1, 6])
    whole = torch.cat([tower.encode_text(i.view(1)) for i in idx])
    tower.chunk_size = 2
    assert torch.allclose(tower.encode_text(idx), whole, atol=1e-5)


def test_id_dropout_leaves_some_items_to_their_text_in_training_only():
    tower = tiny_text_tower(id_dropout=0.5).train()
    torch.manual_seed(1)
    got = tower(torch.arange(N))
    with torch.no_grad():
        text = tower.text_proj(tower.encode_text(torch.arange(N)))
    text_only = torch.isclose(got, text, atol=1e-5).all(dim=1)
    assert 0 < int(text_only.sum()) < N  # some items lost their id embedding, not all
    assert torch.allclose(tower.eval()(torch.arange(N)), text + tower.id_embedding.weight, atol=1e-5)


@pytest.mark.parametrize("setup", ["trainable", "frozen", "top_layer"])
def test_new_items_are_scored_from_text_and_old_items_unchanged(setup):
    kwargs = {"trainable": {"freeze_encoder": False}, "frozen": {"freeze_encoder": True}, "top_layer": {"freeze_encoder": True, "unfreeze_top_layers": 1}}[
        setup
    ]
    tower = tiny_text_tower(**kwargs).eval()
    before = tower.all_vectors()  # fills the frozen caches where there are any
    ids = torch.randint(5, 50, (3, 8))  # wider than the catalog's 6 tokens
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[1, 5:] = 0
    new = tower.add_items(ids, mask)
    assert new.tolist() == [N, N + 1, N + 2] and tower.num_items == N + 3 and tower.cold[N:].all()
    after = tower.all_vectors()
    assert torch.allclose(after[:N], before, atol=1e-5)
    with torch.no_grad():  # a new item's vector is its text's projection, no id embedding
        alone = ItemTower(3, D, tower.encoder, ids, mask, dropout=0.0, use_id_embedding=False, **kwargs).eval()
        alone.text_proj = tower.text_proj
        assert torch.allclose(after[N:], alone.all_vectors(), atol=1e-5)
    assert tower.id_embedding.weight.shape[0] == N + 3 and tower.id_embedding.weight[N:].abs().sum() == 0


def test_the_catalog_is_tokenised_in_chunks_as_in_one_call():
    from lightning_modules.hf_backbones import load_tokenizer
    from lightning_modules.item_tower import tokenize_catalog

    tokenizer = load_tokenizer("minilm")
    texts = ["a b c", "the longest text of them all, with many words", "x", "hello world " * 30] * 5
    for max_tokens in (8, 24, 100):
        whole = tokenizer(texts, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
        ids, mask = tokenize_catalog(tokenizer, texts, max_tokens, chunk=3)
        assert torch.equal(ids, whole["input_ids"]) and torch.equal(mask, whole["attention_mask"])
