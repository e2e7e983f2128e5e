"""Incremental updates on a schedule, run by the service (``serve.update.every_events`` or
``every_seconds``): ``jobs.update`` in a child process on the service's own log, then a hot
reload of the new bundle (no request fails meanwhile: the old model serves until the new one is
ready). A failed or killed update leaves the served model as it was; the next one retries. An
update that runs past ``serve.update.timeout_seconds`` is killed (its whole process group) and
counted as failed; stopping the scheduler ends a running update the same way."""

from __future__ import annotations

import json
import logging
import os
import signal
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
        self.timeout_s = schedule.timeout_seconds
        self.child: subprocess.Popen | None = None
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
                pid, code = self._run_child(args, out)
            if self.stop_event.is_set():
                raise RuntimeError(f"the service is stopping; jobs.update (pid {pid}) was ended")
            if code is None:
                raise RuntimeError(f"jobs.update (pid {pid}) ran past serve.update.timeout_seconds={self.timeout_s} and was killed; see {log_path}")
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
            if self.stop_event.is_set():
                log.info("update ended: the service is stopping; still serving model version %d", self.service.model.version)
                return
            stats["failures"] += 1
            log.error("update failed, still serving model version %d: %s", self.service.model.version, e)
        finally:
            stats["running"] = 0

    def _run_child(self, args: list[str], out) -> tuple[int, int | None]:
        """The update's pid and exit code; None when it ran past the timeout or the scheduler
        stopped (then it was ended)."""
        self.child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    return self.child.pid, self.child.wait(timeout=min(self.poll_s, max(0.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    if self.stop_event.is_set() or time.monotonic() >= deadline:
                        self._end_child()
                        return self.child.pid, None
        finally:
            self.child = None

    def _end_child(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the update's process group (it and what it started), SIGKILL after ``grace_s``."""
        child = self.child
        if child is None or child.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop scheduling; a running update is ended; returns once the thread finished."""
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=timeout_s)
