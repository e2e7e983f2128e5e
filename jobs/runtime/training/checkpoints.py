"""Reading training checkpoints back: Lightning files and DeepSpeed ZeRO folders -> fp32 model
weights; configs stored as plain containers -> typed configs again."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from jobs.runtime.config.schema import JobConfig


def restore_config(plain: dict) -> DictConfig:
    """A config dict stored as plain containers (a bundle, a Ray worker's input), typed again by the schema."""
    return OmegaConf.merge(OmegaConf.structured(JobConfig), plain)


def model_state_from_lightning(path: str | Path) -> tuple[dict[str, torch.Tensor], int]:
    """(TwoTowerModel state dict in fp32, epoch) from a Lightning checkpoint: a file, or a
    DeepSpeed ZeRO checkpoint folder whose shards are gathered into one fp32 state dict."""
    path = Path(path)
    if path.is_dir():
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        states = sorted(path.glob("checkpoint/*model_states.pt"))  # ZeRO-2: mp_rank_00_..., ZeRO-3: zero_pp_rank_0_mp_rank_00_...
        client = torch.load(states[0], map_location="cpu", weights_only=False)
        epoch = int(client.get("epoch", -1))
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        state, epoch = ckpt["state_dict"], int(ckpt["epoch"])
    model_state = {}
    for key, value in state.items():
        key = key.removeprefix("_forward_module.")
        if key.startswith("model."):
            model_state[key[len("model.") :]] = value.float() if value.is_floating_point() else value
    if not model_state:
        raise ValueError(f"{path}: no 'model.' weights in this checkpoint")
    return model_state, epoch
