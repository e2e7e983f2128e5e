"""Lightning callbacks every training stage may get: the epoch history, the per-epoch report to
Ray Train, weight averaging, and the debugging and fault-injection ones."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

from jobs.runtime.tracking.console import write_progress

log = logging.getLogger(__name__)


class FailAtStep(Callback):
    """Fault injection: kills this worker at a global step, once per run folder."""

    def __init__(self, step: int, rank: int, marker: Path):
        self.step, self.rank, self.marker = step, rank, marker

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank and not self.marker.exists():
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"killed rank {self.rank} at step {self.step}\n")
            log.warning("debug.fail_at_step: killing rank %d at step %d", self.rank, self.step)
            os._exit(17)


class HoldAtStep(Callback):
    """Fault tests: every rank waits at a global step (first attempt only: a marker per rank in the
    run folder) for at most ``seconds``, so that a test can kill a worker mid-run, not after it ended."""

    def __init__(self, step: int, folder: Path, seconds: float = 300.0):
        self.step, self.folder, self.seconds = step, folder, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        marker = self.folder / f"held-rank{trainer.global_rank}"
        if trainer.global_step == self.step and not marker.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"pid {os.getpid()} held at step {self.step}\n")
            log.warning("debug.hold_at_step: rank %d waits at step %d for up to %.0f s", trainer.global_rank, self.step, self.seconds)
            time.sleep(self.seconds)


class LossRecorder(Callback):
    """Debugging: every rank appends (step, loss) to <run>/debug/losses-rank<r>.jsonl."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"losses-rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "loss": float(outputs["loss"])}) + "\n")


class ScoreRecorder(Callback):
    """Debugging: rank 0 saves the first validation batch of every epoch with the live model's
    scores, to <run>/debug/scores-epoch<e>.pt, so a reloaded checkpoint can be compared."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and trainer.global_rank == 0 and not trainer.sanity_checking:
            self.folder.mkdir(parents=True, exist_ok=True)
            saved = {k: batch[k].cpu() for k in ("users", "items", "mask")} | {"scores": outputs.detach().float().cpu()}
            torch.save(saved, self.folder / f"scores-epoch{trainer.current_epoch}.pt")


class EpochHistory(Callback):
    """Rank 0 appends one line per epoch to <run>/metrics_history.jsonl: the mean training loss
    and the validation metrics (what jobs.report plots)."""

    def __init__(self, path: Path):
        self.path, self.losses = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # runs after the epoch's validation
        if trainer.global_rank == 0 and not trainer.sanity_checking:
            row = {"epoch": trainer.current_epoch, "step": trainer.global_step, "train/loss": sum(self.losses) / max(1, len(self.losses))}
            row |= {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        self.losses = []


class StepTimes(Callback):
    """Benchmarks: each rank writes <run>/debug/step_times-rank<r>.json: wall-clock (epoch
    seconds) start and end of every training step with its samples, of every validation epoch
    and of each of its batches with their users (the catalog's vectors are computed before the
    first batch), and the process's peak RSS, so steady-state throughput can be told apart from
    the start-up."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.record: dict = {"fit_start": None, "world_size": 1, "steps": [], "validations": []}
        self._start = self._epoch_start = 0.0
        self._batches: list[dict] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.record["fit_start"], self.record["world_size"] = time.time(), trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["steps"].append({"start": self._start, "end": time.time(), "samples": int(batch["items"].shape[0])})

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start, self._batches = time.time(), []

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._start = time.time()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batches.append({"start": self._start, "end": time.time(), "users": int(batch["users"].numel())})

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.record["validations"].append({"start": self._epoch_start, "end": time.time(), "batches": self._batches})

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # after the epoch's validation
        import resource

        self.record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"step_times-rank{trainer.global_rank}.json").write_text(json.dumps(self.record))


class TrainingProgress(Callback):
    """Rank 0 keeps <run>/progress.json current (epoch, phase, batch): the console's bar reads it."""

    def __init__(self, run_dir: Path, every_s: float = 0.5):
        self.run_dir, self.every_s, self.last = run_dir, every_s, 0.0

    def _write(self, trainer, phase: str, batch: int, batches: int, force: bool = False) -> None:
        now = time.monotonic()
        if trainer.global_rank == 0 and (force or now - self.last >= self.every_s):
            self.last = now
            write_progress(self.run_dir, epoch=trainer.current_epoch, phase=phase, batch=batch, batches=batches)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write(trainer, "train", batch_idx + 1, int(trainer.num_training_batches))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, "validate", 0, 1, force=True)


class ShardReport(Callback):
    """``data.shard_by_rank``: every rank appends one line per training epoch to
    <run>/shards/rank-<r>.jsonl: its node, the user_idx range and interaction rows it read, and
    what its sampler scheduled that epoch (windows, distinct users and the first and last)."""

    def __init__(self, folder: Path):
        self.folder = folder

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm.train_sampler is None or not dm.train_sampler.epochs:
            return
        import ray

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        line = {"epoch": trainer.current_epoch, "node_id": node, "pid": os.getpid()} | dm.shard | dm.train_sampler.epochs[-1]
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank-{dm.rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def stage_callbacks(cfg: DictConfig, run_dir: Path) -> list[Callback]:
    """The callbacks every fit gets: the epoch history (and progress for the console's bar),
    plus the averaging and debug ones configured."""
    callbacks: list[Callback] = [EpochHistory(run_dir / "metrics_history.jsonl")]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TrainingProgress(run_dir))
    if cfg.trainer.ema_decay is not None:
        from pytorch_lightning.callbacks import EMAWeightAveraging

        # swaps the average in for validation and puts it in every checkpoint's state_dict
        callbacks.append(EMAWeightAveraging(decay=cfg.trainer.ema_decay, use_buffers=False))
    if cfg.debug.fail_at_step is not None:
        callbacks.append(FailAtStep(cfg.debug.fail_at_step, cfg.debug.fail_rank, run_dir / "debug" / "fault_injected"))
    if cfg.debug.hold_at_step is not None:
        callbacks.append(HoldAtStep(cfg.debug.hold_at_step, run_dir / "debug"))
    if cfg.debug.record_losses:
        callbacks.append(LossRecorder(run_dir / "debug"))
    if cfg.debug.record_scores:
        callbacks.append(ScoreRecorder(run_dir / "debug"))
    if cfg.debug.record_step_times:
        callbacks.append(StepTimes(run_dir / "debug"))
    return callbacks


class EpochReport(Callback):
    """Reports every epoch's metrics and a checkpoint to Ray (what RayTrainReportCallback does),
    staging the checkpoint in a folder of its own: Ray's callback derives its folder from the job
    id and run name alone, so concurrent Tune trials on one node overwrote and deleted each
    other's checkpoints."""

    CHECKPOINT_NAME = "checkpoint.ckpt"

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        import ray.train

        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        # epochs_completed: what a sweep's ASHA counts (Tune's training_iteration starts again at 1 in a resumed trial)
        metrics |= {"epoch": trainer.current_epoch, "epochs_completed": trainer.current_epoch + 1, "step": trainer.global_step}
        staging = tempfile.mkdtemp(prefix=f"towerrec-ckpt-rank{trainer.global_rank}-")
        try:
            trainer.save_checkpoint(str(Path(staging) / self.CHECKPOINT_NAME), weights_only=False)
            ray.train.report(metrics=metrics, checkpoint=ray.train.Checkpoint.from_directory(staging))
            trainer.strategy.barrier()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
