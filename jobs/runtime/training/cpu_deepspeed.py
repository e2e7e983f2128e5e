"""DeepSpeed under Lightning on CPUs (DeepSpeed's CPU accelerator, gloo): what Ray Train's CPU
workers and the CPU smoke runs of bench/train_throughput.py share. Imports neither Ray nor Hydra."""

from __future__ import annotations

import torch
from pytorch_lightning.strategies import DDPStrategy

SHM_COMM_OP = "deepspeed_shm_comm"


class CPUDeepSpeedMixin:
    """Put before a ``DeepSpeedStrategy`` subclass. Lightning's DeepSpeedStrategy assumes CUDA in
    three places; this only removes those assumptions (and skips DeepSpeed's JIT-compiled
    shared-memory op). Used only when the accelerator is the CPU."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        # DeepSpeedStrategy.setup_environment refuses non-CUDA accelerators; its parent's does the rest.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy.setup_distributed, without the CUDA device-index validation.
        import deepspeed.ops
        from lightning_fabric.utilities.seed import reset_seed

        # DeepSpeed would JIT-compile its shared-memory all-reduce op here, behind a file lock in
        # the torch extensions folder that a killed worker leaves held (every later run then
        # waits forever). Plain gloo collectives do the same work.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
