"""A finished training stage -> its model bundle (inference/bundle.py): the model with the weights
of the best epoch, the catalog and users as the datamodule holds them (or, on a Ray run's driver,
as a catalog view reads them piece by piece), the tokenizer files and the resolved config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.sequence_datamodule import CatalogView, SequenceDataModule
from inference.bundle import Catalog, UserPieces, UserTable, save_bundle
from jobs.runtime.config.run_folder import BUNDLE_DIR
from jobs.runtime.config.text_encodings import install_frozen_text
from lightning_modules.hf_backbones import load_tokenizer
from lightning_modules.two_tower_model import TwoTowerModel

log = logging.getLogger(__name__)


def full_histories(dm: SequenceDataModule) -> list[np.ndarray]:
    """Each user's whole chronological history: training items (cold-start ones included: in
    production every item is known), then the valid and the test item."""
    return [np.append(h, t).astype(np.int64) for h, t in zip(dm.history("test", seen=True), dm.test_targets)]


def catalog_of(dm: SequenceDataModule | CatalogView, model: TwoTowerModel) -> Catalog:
    """The datamodule's items with the item tower's own token ids."""
    tower = model.item_tower
    tokens = mask = None
    if tower.encoder is not None:
        tokens, mask = tower.token_ids.cpu().numpy(), tower.attention_mask.cpu().numpy()
    return Catalog(
        item_ids=np.asarray(dm.item_ids, dtype=object),
        titles=list(dm.item_titles),
        texts=list(dm.item_texts),
        categories=[list(c) for c in dm.item_categories],
        train_counts=np.asarray(dm.item_train_counts, dtype=np.float64),
        cold=np.asarray(dm.cold_mask, dtype=bool),
        token_ids=tokens,
        attention_mask=mask,
    )


def users_of(dm: SequenceDataModule | CatalogView) -> UserTable | UserPieces:
    """The datamodule's users; a driver's catalog view gives them piece by piece, read again from the prepared data."""
    if isinstance(dm, CatalogView):
        return UserPieces(dm.num_users, dm.user_pieces)
    return UserTable(np.asarray(dm.raw_user_ids(), dtype=object), full_histories(dm))


def export_bundle(
    run_dir: Path,
    cfg: DictConfig,
    dm: SequenceDataModule | CatalogView,
    model: TwoTowerModel,
    state: dict[str, torch.Tensor],
    stage: str,
    metrics: dict[str, float] | None = None,
    lineage: dict | None = None,
) -> Path:
    """Load ``state`` (the best epoch's weights) into ``model`` and write ``run_dir/bundle``."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{stage}: the checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    it = cfg.model.item_tower
    if not model.item_tower.frozen_text_cached:  # a tower built for the export (a Ray run's driver): the mapped encodings
        install_frozen_text(model.item_tower, dm.data_dir, it.tokenizer, it.max_text_tokens)
    tokenizer = load_tokenizer(it.tokenizer) if model.item_tower.encoder is not None else None
    folder = save_bundle(
        Path(run_dir) / BUNDLE_DIR,
        model,
        catalog_of(dm, model),
        users_of(dm),
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        max_seq_len=int(cfg.data.max_seq_len),
        stage=stage,
        metrics=metrics,
        lineage=lineage,
        tokenizer=tokenizer,
    )
    log.info("%s: model bundle written to %s", stage, folder)
    return folder
