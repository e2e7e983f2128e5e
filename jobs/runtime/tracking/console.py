"""What a job's console shows: by default each stage starting, a progress bar per training stage,
what was reused, the results; every other line (library logs, warnings, Ray's and the workers'
output) goes to the run's ``run.log`` only. ``-v`` on the command line (or ``verbose=true``)
shows the full stream on the console as well.

Quiet mode works at the file-descriptor level inside a run (``capture_output``), so output
from anything (C++ code, Ray's forwarded worker output, libraries' own handlers) lands in the
run's log; the console keeps a duplicate of the terminal taken at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

CONSOLE_LOGGER = "towerrec.console"
OWN_PACKAGES = ("jobs", "inference", "lightning_modules", "datamodules", "serving", "towerrec")
PROGRESS_FILE = "progress.json"
HISTORY_FILE = "metrics_history.jsonl"

_console = logging.getLogger(CONSOLE_LOGGER)


class _State:
    quiet = False
    terminal: TextIO | None = None


def strip_verbose_flag(argv: list[str]) -> bool:
    """Remove ``-v`` / ``--verbose`` from ``argv`` (Hydra would reject them); True if present."""
    found = False
    for flag in ("-v", "--verbose"):
        while flag in argv[1:]:
            argv.remove(flag)
            found = True
    return found


def _for_console(record: logging.LogRecord) -> bool:
    if record.name == CONSOLE_LOGGER or record.levelno >= logging.ERROR:
        return True
    return record.levelno >= logging.WARNING and record.name.split(".")[0] in OWN_PACKAGES


def setup_console(verbose: bool) -> None:
    """Configure logging for a command-line job: the console shows the progress lines (quiet)
    or every log record (verbose); each run's run.log gets everything (run_folder.run_log_file)."""
    _State.terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    _State.quiet = not verbose
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    handler = logging.StreamHandler(_State.terminal)
    if verbose:
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_for_console)
    root.addHandler(handler)
    logging.captureWarnings(True)
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own bars (ours writes to the terminal directly)


def is_quiet() -> bool:
    return _State.quiet


def say(message: str, *args: object) -> None:
    """A line for the console (and, like every record, for the run's log)."""
    _console.info(message, *args)


@contextmanager
def capture_output(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def write_progress(run_dir: Path, **state: object) -> None:
    """Rank zero's position in training, for the driver's progress bar (atomic replace)."""
    tmp = run_dir / f".{PROGRESS_FILE}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(run_dir / PROGRESS_FILE)


class StageProgress:
    """A console bar of one training stage's epochs, drawn by the driver from the files that
    rank zero writes into the run folder (progress.json, metrics_history.jsonl), so it works the
    same for a local fit and for Ray Train workers on other machines. Only on a terminal."""

    def __init__(self, run_dir: Path, stage: str, max_epochs: int, monitor: str, enabled: bool = True):
        self.run_dir, self.stage, self.max_epochs, self.monitor = Path(run_dir), stage, max_epochs, monitor
        self.enabled = enabled and _State.terminal is not None and _State.terminal.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    def __enter__(self) -> StageProgress:
        if self.enabled:
            from tqdm import tqdm

            try:
                width = os.get_terminal_size(_State.terminal.fileno()).columns
            except OSError:
                width = 0
            self._bar = tqdm(
                total=self.max_epochs,
                file=_State.terminal,
                ncols=min(width, 140) if width >= 60 else 100,
                leave=True,
                disable=False,
                bar_format=f"{self.stage:>11} {{percentage:3.0f}}%|{{bar:24}}| {{desc}} [{{elapsed}}<{{remaining}}]",
            )
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._update()
            self._bar.close()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self._update()
            except (OSError, ValueError):  # a file being replaced right now: next time
                continue

    def _update(self) -> None:
        history = []
        path = self.run_dir / HISTORY_FILE
        if path.is_file():
            history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        progress = {}
        if (self.run_dir / PROGRESS_FILE).is_file():
            progress = json.loads((self.run_dir / PROGRESS_FILE).read_text())
        done = len({h["epoch"] for h in history})
        epoch = int(progress.get("epoch", done))
        fraction = progress.get("batch", 0) / max(1, progress.get("batches", 1)) if progress.get("phase") == "train" and epoch >= done else 0.0
        self._bar.n = min(self.max_epochs, done + fraction)
        text = f"epoch {min(epoch + 1, self.max_epochs)}/{self.max_epochs}"
        if progress.get("phase") == "validate" and epoch >= done:
            text += " validating"
        scores = [h[self.monitor] for h in history if self.monitor in h]
        if scores:
            text += f" | {self.monitor} {scores[-1]:.4f} (best {max(scores):.4f})"
        self._bar.set_description_str(text, refresh=False)
        self._bar.refresh()


def elapsed(start: float) -> str:
    seconds = time.perf_counter() - start
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
