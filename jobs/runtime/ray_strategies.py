"""Lightning strategies for Ray Train workers: DDP, DeepSpeed on GPUs, DeepSpeed on CPUs (gloo)."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
from omegaconf import DictConfig
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy

from jobs.runtime.cpu_deepspeed import CPUDeepSpeedMixin



class CPURayDeepSpeedStrategy(CPUDeepSpeedMixin, RayDeepSpeedStrategy):
    """RayDeepSpeedStrategy for CPU workers (DeepSpeed's CPU accelerator, gloo)."""


def deepspeed_config(cfg: DictConfig, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON built from the strategy, data and trainer configs (gradient accumulation
    comes from the Lightning Trainer's ``accumulate_grad_batches``, as Lightning requires)."""
    st = cfg.strategy
    zero: dict[str, Any] = {"stage": st.zero_stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True}
    if st.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if st.offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_clipping": cfg.trainer.gradient_clip_val,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # our AdamW (torch) is used with offload too; DeepSpeedCPUAdam would need a compiled op
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_strategy(cfg: DictConfig, precision: str):
    """The Ray strategy for ``cfg.strategy`` on ``cfg.hardware.accelerator``."""
    name = cfg.strategy.name.value if hasattr(cfg.strategy.name, "value") else cfg.strategy.name
    on_gpu = cfg.hardware.accelerator == "gpu"
    timeout = timedelta(seconds=cfg.strategy.collective_timeout_s)
    if name == "ddp":
        # no broadcast of the buffers before every forward: the towers' and the loss's buffers
        # (token ids and masks of the whole catalog, the cold mask, sampling tables) are constant and
        # built alike on every rank, and at a million items the broadcast was most of a step
        # (they are still synced once, when DDP wraps the model)
        return RayDDPStrategy(find_unused_parameters=cfg.strategy.find_unused_parameters, timeout=timeout, forward_sync_buffers=False)
    if name == "deepspeed":
        config = deepspeed_config(cfg, bf16=precision.startswith("bf16"))
        return RayDeepSpeedStrategy(config=config, timeout=timeout) if on_gpu else CPURayDeepSpeedStrategy(config=config, timeout=timeout)
    raise ValueError(f"strategy.name={name!r} cannot run under Ray (use ddp or deepspeed)")
