"""What a process pays to import the stack: with the environment's bytecode (``make env``
compiles every installed module at install time) against compiling from source, as every
process did before with ``PYTHONDONTWRITEBYTECODE`` set. An empty ``PYTHONPYCACHEPREFIX`` makes
Python ignore the ``__pycache__`` folders, so the baseline compiles each import from source and
writes nothing. Both in the same run, alternating, each import in a fresh process.

    .venv/bin/python bench/import_times.py            # module, source s, bytecode s, ratio
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = ["torch", "pytorch_lightning", "ray.train", "ray.tune", "deepspeed", "transformers.models.gpt2.modeling_gpt2", "jobs.pipeline", "jobs.sweep"]
ROOT = Path(__file__).resolve().parents[1]


def seconds(module: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    base = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    base.pop("PYTHONPYCACHEPREFIX", None)
    print(f"{'module':<42}{'source s':>10}{'bytecode s':>12}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as empty:
        for module in MODULES:
            source = seconds(module, {**base, "PYTHONPYCACHEPREFIX": empty})
            compiled = seconds(module, base)
            print(f"{module:<42}{source:>10.2f}{compiled:>12.2f}{source / compiled:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
