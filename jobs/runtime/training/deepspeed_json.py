"""The DeepSpeed JSON our jobs train with, from plain values: Ray Train's workers
(jobs/runtime/training/ray_strategies.py) and bench/train_throughput.py build it here, so the bench
measures the jobs' DeepSpeed. Imports neither Ray nor Hydra (it runs on a bare GPU image)."""

from __future__ import annotations

from typing import Any

import torch


def deepspeed_json(
    zero_stage: int,
    micro_batch_size: int,
    bf16: bool,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    gradient_clipping: float | None = None,
) -> dict[str, Any]:
    """ZeRO ``zero_stage`` with optional CPU offload; gradient accumulation is left to the Lightning
    Trainer's ``accumulate_grad_batches``, as Lightning requires."""
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": torch.cuda.is_available(), "contiguous_gradients": True}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if offload_parameters:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_clipping": gradient_clipping or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # our AdamW (torch) is used with offload too (DeepSpeed refuses a client optimizer with
        # offload unless told otherwise); DeepSpeedCPUAdam would need a JIT-compiled op
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
