"""Incremental updates on a schedule, run by the service (``serve.update.every_events`` or
``every_seconds``): ``jobs.update`` in a child process on the service's own log, then a hot
reload of the new bundle (no request fails meanwhile: the old model serves until the new one is
ready). A failed or killed update leaves the served model as it was; the next one retries."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger(__name__)


class UpdateScheduler(threading.Thread):
    """A daemon thread that watches the log and runs an update when one is due."""

    def __init__(self, service, cfg: DictConfig, state_dir: str, run_dir: Path, poll_s: float = 1.0):
        super().__init__(name="towerrec-updates", daemon=True)
        schedule = cfg.serve["update"]
        self.service, self.state_dir, self.run_dir, self.poll_s = service, state_dir, Path(run_dir), poll_s
        self.every_events, self.every_seconds = schedule.every_events, schedule.every_seconds
        self.overrides = list(schedule.overrides)
        self.paths = {k: str(cfg.paths[k]) for k in ("root_dir", "data_dir", "cache_dir", "outputs_root")}
        self.experiment = cfg.experiment_name
        self.stop_event = threading.Event()
        self.last_offset = service.state.stats()["log_offset"]
        self.last_time = time.monotonic()
        service.update_stats = {"updates": 0, "failures": 0, "running": 0, "last_update_seconds": float("nan"), "last_start_to_serving_seconds": float("nan")}

    def due(self, offset: int) -> bool:
        if self.every_events is not None and offset - self.last_offset >= self.every_events:
            return True
        return self.every_seconds is not None and offset > self.last_offset and time.monotonic() - self.last_time >= self.every_seconds

    def run(self) -> None:
        while not self.stop_event.wait(self.poll_s):
            offset = self.service.state.stats()["log_offset"]
            if self.due(offset):
                self.last_offset, self.last_time = offset, time.monotonic()
                self.update_once()

    def update_once(self) -> None:
        stats = self.service.update_stats
        stats["running"] = 1
        start = time.perf_counter()
        result_file = self.run_dir / "updates" / f"result-{int(time.time() * 1000)}.json"
        args = [
            sys.executable,
            "-m",
            "jobs.update",
            f"update.bundle={self.service.bundle_path}",
            f"update.state_dir={self.state_dir}",
            f"update.result_file={result_file}",
            f"experiment_name={self.experiment}",
            *[f"paths.{k}={v}" for k, v in self.paths.items()],
            *self.overrides,
        ]
        try:
            log_path = self.run_dir / "updates" / "jobs.update.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "a") as out:
                code = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT).returncode
            if code != 0 or not result_file.is_file():
                raise RuntimeError(f"jobs.update exited with {code}; see {log_path}")
            result = json.loads(result_file.read_text())
            if not result["noop"]:
                # counted before the swap, taken back if the reload fails: a health check that
                # sees the new model version (read first) sees the update counted
                stats["updates"] += 1
                try:
                    self.service.reload(result["bundle"])
                except Exception:
                    stats["updates"] -= 1
                    raise
                stats["last_update_seconds"] = float(result.get("seconds", float("nan")))
                stats["last_start_to_serving_seconds"] = time.perf_counter() - start
                log.info("update: serving model version %d from %s", self.service.model.version, result["bundle"])
        except Exception as e:  # noqa: BLE001 - the service keeps serving the model it has; counted and logged
            stats["failures"] += 1
            log.error("update failed, still serving model version %d: %s", self.service.model.version, e)
        finally:
            stats["running"] = 0

    def stop(self) -> None:
        self.stop_event.set()
