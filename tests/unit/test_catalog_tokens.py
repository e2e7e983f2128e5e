"""The catalog is tokenised once, beside the prepared data, and memory-mapped by whoever builds
the item tower afterwards (jobs/runtime/config/catalog_tokens.py)."""

from __future__ import annotations

import torch

from jobs.runtime.config.assembly import build_datamodule, build_model, prepare_data
from jobs.runtime.config.catalog_tokens import FILES, catalog_tokens, tokens_folder
from lightning_modules.hf_backbones import load_tokenizer
from lightning_modules.item_tower import tokenize_catalog


def test_preparation_tokenises_the_catalog_once_and_the_item_tower_maps_those_tokens(tiny_cfg, monkeypatch):
    cfg = tiny_cfg("pretrain")
    it = cfg.model.item_tower
    prepared = prepare_data(cfg)
    folder = tokens_folder(prepared.folder, it.tokenizer, it.max_text_tokens)
    assert all((folder / f).is_file() for f in FILES)
    written = [(folder / f).stat().st_mtime_ns for f in FILES]

    dm = build_datamodule(cfg)
    expected_ids, expected_mask = tokenize_catalog(load_tokenizer(it.tokenizer), dm.item_texts, it.max_text_tokens)

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the catalog was tokenised again")

    monkeypatch.setattr("jobs.runtime.config.catalog_tokens.tokenize_catalog", no_tokenising)
    model = build_model(cfg, dm)
    assert torch.equal(model.item_tower.token_ids, expected_ids) and torch.equal(model.item_tower.attention_mask, expected_mask)
    assert [(folder / f).stat().st_mtime_ns for f in FILES] == written


def test_tokens_missing_from_a_prepared_folder_are_made_by_the_first_process_that_needs_them(tiny_cfg):
    cfg = tiny_cfg("pretrain", "model.item_tower.max_text_tokens=8")  # another width: another key, not made yet
    prepared = prepare_data(tiny_cfg("pretrain"))
    folder = tokens_folder(prepared.folder, cfg.model.item_tower.tokenizer, 8)
    assert not folder.exists()
    ids, mask = catalog_tokens(prepared.folder, cfg.model.item_tower.tokenizer, 8)
    assert ids.shape == mask.shape and ids.shape[0] == prepared.num_items and ids.shape[1] <= 8
    assert all((folder / f).is_file() for f in FILES) and not list(folder.parent.glob("*.partial-*"))


def test_tokens_that_do_not_match_the_items_file_are_refused_with_the_folder_named(tiny_cfg):
    import numpy as np
    import pytest

    cfg = tiny_cfg("pretrain")
    it = cfg.model.item_tower
    prepared = prepare_data(cfg)
    folder = tokens_folder(prepared.folder, it.tokenizer, it.max_text_tokens)
    for name in FILES:  # a pair left by another catalog: one item short
        np.save(folder / name, np.load(folder / name)[:-1])
    with pytest.raises(ValueError, match=f"{folder}: tokens for {prepared.num_items - 1} items"):
        catalog_tokens(prepared.folder, it.tokenizer, it.max_text_tokens)
