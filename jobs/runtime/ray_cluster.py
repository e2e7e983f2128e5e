"""Starting or joining Ray for a job: embedded local Ray by default, a cluster by address."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from omegaconf import DictConfig

log = logging.getLogger(__name__)


def cpus_per_worker(cfg: DictConfig) -> int:
    """``hardware.cpus_per_worker``, or this machine's cores shared among the workers when null."""
    hw = cfg.hardware
    return hw.cpus_per_worker or max(1, (os.cpu_count() or 1) // hw.num_workers)


def local_cpus(cfg: DictConfig) -> int:
    """Logical CPUs for an embedded Ray: at least the machine's cores, with room beside the
    Train workers or the inference actors for Ray's own tasks (Ray Data reads, the controller)."""
    hw, inf = cfg.hardware, cfg.infer
    need = max(hw.num_workers * cpus_per_worker(cfg), inf.num_actors * inf.cpus_per_actor) + 2
    return int(max(os.cpu_count() or 1, need))


@contextmanager
def ray_session(cfg: DictConfig) -> Iterator[None]:
    """Ray for the duration of a job. Starts an embedded Ray (dashboard off unless configured)
    when ``cluster.address`` is null, joins the cluster otherwise; shuts down only what it started."""
    import ray

    if ray.is_initialized():
        yield
        return
    c = cfg.cluster
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "TOWERREC_", "HF_"))}
    env_vars.setdefault("WANDB_MODE", os.environ.get("WANDB_MODE", cfg.logger.wandb.mode))
    kwargs = dict(include_dashboard=c.include_dashboard, log_to_driver=True, runtime_env={"env_vars": env_vars})
    if c.address:
        log.info("ray: joining the cluster at %s", c.address)
        ray.init(address=c.address, **kwargs)
    else:
        ray.init(num_cpus=c.num_cpus or local_cpus(cfg), **kwargs)
        log.info("ray: started an embedded local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    try:
        yield
    finally:
        ray.shutdown()
