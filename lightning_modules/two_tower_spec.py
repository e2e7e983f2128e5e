"""A two-tower model's architecture as plain data, and the model rebuilt from it.

``describe(model)`` records everything needed to rebuild a ``TwoTowerModel`` with the same
parameter shapes (the Hugging Face configs of both backbones included), as JSON-able containers;
``build_from_spec`` rebuilds it with fresh weights, for a state dict to be loaded into. Neither
needs the pretrained checkpoint the encoder came from, the dataset or the training config.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, GPT2Config, GPT2Model, PreTrainedModel

from lightning_modules.item_tower import ItemTower
from lightning_modules.two_tower_model import TwoTowerModel
from lightning_modules.user_tower import UserTower

SPEC_KIND = "towerrec.two_tower"


def _hf_config(module: PreTrainedModel) -> dict[str, Any]:
    config = module.config
    out = config.to_dict()
    out["_attn_implementation"] = getattr(config, "_attn_implementation", None) or "eager"
    return out


def describe(model: TwoTowerModel) -> dict[str, Any]:
    """The architecture of ``model`` as plain containers (see module docstring)."""
    it, ut = model.item_tower, model.user_tower
    encoder = None
    if it.encoder is not None:
        encoder = {"config": _hf_config(it.encoder), "has_pooler": getattr(it.encoder, "pooler", None) is not None}
    return {
        "kind": SPEC_KIND,
        "dim": it.dim,
        "temperature": model.temperature,
        "normalize": model.normalize,
        "dropout_targets": model.dropout_targets,
        "item_tower": {
            "num_items": it.num_items,
            "pooling": it.pooling,
            "use_id_embedding": it.id_embedding is not None,
            "freeze_encoder": it.freeze_encoder,
            "unfreeze_top_layers": it.unfreeze_top_layers,
            "dropout": it.dropout.p,
            "id_dropout": it.id_dropout,
            "chunk_size": it.chunk_size,
            "static_width": it.static_width,
            "encoder": encoder,
        },
        "user_tower": {"gpt2": _hf_config(ut.gpt)},
    }


def _build_encoder(spec: dict[str, Any]) -> PreTrainedModel:
    config = dict(spec["config"])
    attn = config.pop("_attn_implementation", "eager")
    hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
    encoder = AutoModel.from_config(hf_config, attn_implementation=attn)
    if not spec.get("has_pooler", False) and getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None  # trained without one: the same parameters as the saved model
    return encoder


def build_from_spec(spec: dict[str, Any], token_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> TwoTowerModel:
    """A ``TwoTowerModel`` of the described architecture, with fresh weights.

    ``token_ids`` / ``attention_mask`` ([num_items, width]) are the catalog's text tokens,
    required when the item tower has an encoder.
    """
    if spec.get("kind") != SPEC_KIND:
        raise ValueError(f"not a two-tower model description (kind {spec.get('kind')!r}, expected {SPEC_KIND!r})")
    it = spec["item_tower"]
    encoder = _build_encoder(it["encoder"]) if it["encoder"] is not None else None
    item_tower = ItemTower(
        it["num_items"],
        spec["dim"],
        encoder,
        token_ids if encoder is not None else None,
        attention_mask if encoder is not None else None,
        pooling=it["pooling"],
        use_id_embedding=it["use_id_embedding"],
        freeze_encoder=it["freeze_encoder"],
        unfreeze_top_layers=it["unfreeze_top_layers"],
        dropout=it["dropout"],
        chunk_size=it["chunk_size"],
        static_width=it.get("static_width", False),
        id_dropout=it["id_dropout"],
    )
    gpt_config = dict(spec["user_tower"]["gpt2"])
    attn = gpt_config.pop("_attn_implementation", "eager")
    gpt_config.pop("model_type", None)
    config = GPT2Config(**gpt_config)
    config._attn_implementation = attn
    user_tower = UserTower(GPT2Model(config), spec["dim"])
    return TwoTowerModel(item_tower, user_tower, temperature=spec["temperature"], normalize=spec["normalize"], dropout_targets=spec["dropout_targets"])
