"""A fully frozen text encoder's catalog encodings are computed once, beside the prepared data, and
memory-mapped by every later process that trains the tower (jobs/runtime/config/text_encodings.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from jobs.runtime.config.assembly import build_datamodule, build_model
from jobs.runtime.config.text_encodings import encodings_path, frozen_text_once, install_frozen_text
from jobs.runtime.training.local_fit import build_stage

FROZEN = "model.item_tower.freeze_encoder=true"


def count_encoder_calls(tower) -> list[int]:
    calls = [0]
    tower.encoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def encodings_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "encodings").glob("*/*.npy"))


def test_the_first_build_encodes_the_catalog_once_and_the_next_maps_it_without_running_the_encoder(tiny_cfg):
    cfg = tiny_cfg("pretrain", FROZEN)
    dm, module = build_stage(cfg, "pretrain")
    (path,) = encodings_files(Path(dm.data_dir))
    written = path.stat().st_mtime_ns
    first = module.model.item_tower
    assert first.frozen_text_cached

    dm2, module2 = build_stage(cfg, "pretrain")  # a second process of the same stage: same seed, same weights
    tower = module2.model.item_tower
    calls = count_encoder_calls(tower)
    vectors = tower.eval().all_vectors()
    assert calls[0] == 0  # the catalog's encodings came from the file
    assert encodings_files(Path(dm2.data_dir)) == [path] and path.stat().st_mtime_ns == written
    # the same vectors as a tower that runs its own encoder over the catalog
    own = build_model(cfg, build_datamodule(cfg)).item_tower
    own.load_state_dict(tower.state_dict())
    own_calls = count_encoder_calls(own)
    assert torch.allclose(own.eval().all_vectors(), vectors, atol=1e-6)
    assert own_calls[0] > 0
    assert np.allclose(np.load(path), own.encode_catalog_text().numpy(), atol=1e-6)


def test_other_encoder_weights_get_their_own_file_and_a_trained_encoder_none(tiny_cfg):
    cfg = tiny_cfg("pretrain", FROZEN)
    dm, module = build_stage(cfg, "pretrain")
    tower = module.model.item_tower
    it = cfg.model.item_tower
    before = encodings_path(Path(dm.data_dir), it.tokenizer, it.max_text_tokens, tower)
    with torch.no_grad():
        next(tower.encoder.parameters()).add_(0.5)  # as a bundle whose encoder was trained would have it
    after = install_frozen_text(tower, dm.data_dir, it.tokenizer, it.max_text_tokens)
    assert after is not None and after != before and encodings_files(Path(dm.data_dir)) == sorted([before, after])

    trained = tiny_cfg("pretrain")  # the tiny model trains its encoder: nothing cached, nothing written
    dm_t, module_t = build_stage(trained, "pretrain")
    assert not module_t.model.item_tower.frozen_text_cached
    assert install_frozen_text(module_t.model.item_tower, dm_t.data_dir, it.tokenizer, it.max_text_tokens) is None
    assert encodings_files(Path(dm.data_dir)) == sorted([before, after])


def test_the_drivers_tower_alone_gives_the_workers_key(tiny_cfg):
    cfg = tiny_cfg("pretrain", FROZEN)
    dm = build_datamodule(cfg)
    path = frozen_text_once(cfg, "pretrain", Path(dm.data_dir))  # the Ray driver: the catalog only
    _, module = build_stage(cfg, "pretrain")  # what a worker builds
    it = cfg.model.item_tower
    assert path == encodings_path(Path(dm.data_dir), it.tokenizer, it.max_text_tokens, module.model.item_tower)
    assert frozen_text_once(tiny_cfg("pretrain"), "pretrain", Path(dm.data_dir)) is None  # a trained encoder: nothing to do


def test_an_encodings_file_of_another_size_is_refused_naming_it(tiny_cfg):
    cfg = tiny_cfg("pretrain", FROZEN)
    dm, module = build_stage(cfg, "pretrain")
    (path,) = encodings_files(Path(dm.data_dir))
    np.save(path, np.zeros((3, 4), dtype=np.float32))
    tower = build_model(cfg, dm).item_tower
    tower.load_state_dict(module.model.item_tower.state_dict())
    it = cfg.model.item_tower
    with pytest.raises(ValueError, match=str(path)):
        install_frozen_text(tower, dm.data_dir, it.tokenizer, it.max_text_tokens)
