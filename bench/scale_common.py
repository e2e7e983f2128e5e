"""What every stage of bench/scale.py shares: one measurement per row, taken in a fresh process.

A row is a dict with at least ``stage`` (data, train, infer, index), ``step`` (what was timed,
for example ``generate``), ``size`` (the x of the growth plot), ``unit`` (what ``size`` counts:
rows, items, users), ``seconds`` and ``peak_rss_mb``; a stage may add its own fields
(samples_per_s, users_per_s, ...). Rows of one (stage, step) at growing sizes give that step's
log-log slope (bench/scale.py).
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import traceback
from collections.abc import Callable
from typing import Any


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(queue, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    try:
        result = fn(*args, **kwargs)
        queue.put(("ok", result, peak_rss_mb()))
    except BaseException:  # noqa: BLE001 - handed to the parent, which raises it
        queue.put(("error", traceback.format_exc(), peak_rss_mb()))


def in_fresh_process(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Run ``fn(*args, **kwargs)`` in a new (spawned) process; return its result and that
    process's peak RSS in MiB, so each size's memory is its own and not the largest so far.
    ``fn`` must be a module-level function and its result picklable; an exception in the child
    is raised here with the child's traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args, kwargs))
    proc.start()
    status, payload, rss = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its process:\n{payload}")
    return payload, rss


def row(stage: str, step: str, size: int, unit: str, seconds: float, peak_rss: float, **extra: Any) -> dict:
    """One measurement in the shared row format."""
    return {"stage": stage, "step": step, "size": int(size), "unit": unit, "seconds": float(seconds), "peak_rss_mb": float(peak_rss), **extra}


def say(message: str) -> None:
    print(message, flush=True)
    sys.stdout.flush()
