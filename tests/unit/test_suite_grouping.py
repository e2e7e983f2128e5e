"""``make test`` runs the suite on pytest-xdist workers with one group per test file, so a file's
module fixtures (an embedded Ray, a sweep, a cluster) start once. pytest 9.2 with pytest-xdist 3.8
silently grouped nothing; this runs two small files with the Makefile's own xdist options and
checks where each test ran."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict

from tests.conftest import ROOT

FILES = ("tests/unit/test_losses.py", "tests/unit/test_ranking_metrics.py")


def _makefile_xdist_options() -> list[str]:
    (line,) = [raw for raw in (ROOT / "Makefile").read_text().splitlines() if raw.startswith("XDIST ?=")]
    return shlex.split(line.split("?=", 1)[1])


def test_make_tests_xdist_options_run_each_file_on_one_worker_as_its_own_group():
    options = _makefile_xdist_options()
    assert "loadgroup" in options
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *options, *FILES]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ran = re.findall(r"^\[(gw\d+)\] .*?PASSED (\S+?)::(\S+?)@(\S+)\s*$", proc.stdout, flags=re.M)
    collected = int(re.search(r"(\d+) passed", proc.stdout).group(1))
    assert len(ran) == collected > len(FILES)  # every test that passed came back with a group
    workers: dict[str, set[str]] = defaultdict(set)
    for worker, path, _test, group in ran:
        assert group == path  # a test file is its own group
        workers[path].add(worker)
    assert set(workers) == set(FILES)
    assert all(len(w) == 1 for w in workers.values()), dict(workers)
