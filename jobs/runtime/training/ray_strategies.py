"""Lightning strategies for Ray Train workers: DDP, DeepSpeed on GPUs, DeepSpeed on CPUs (gloo)."""

from __future__ import annotations

from datetime import timedelta

from omegaconf import DictConfig
from ray.train.lightning import RayDDPStrategy, RayDeepSpeedStrategy

from jobs.runtime.training.cpu_deepspeed import CPUDeepSpeedMixin
from jobs.runtime.training.deepspeed_json import deepspeed_json


class CPURayDeepSpeedStrategy(CPUDeepSpeedMixin, RayDeepSpeedStrategy):
    """RayDeepSpeedStrategy for CPU workers (DeepSpeed's CPU accelerator, gloo)."""


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
        st = cfg.strategy
        config = deepspeed_json(
            st.zero_stage, cfg.data.batch_size, precision.startswith("bf16"), st.offload_optimizer, st.offload_parameters, cfg.trainer.gradient_clip_val
        )
        return RayDeepSpeedStrategy(config=config, timeout=timeout) if on_gpu else CPURayDeepSpeedStrategy(config=config, timeout=timeout)
    raise ValueError(f"strategy.name={name!r} cannot run under Ray (use ddp or deepspeed)")
