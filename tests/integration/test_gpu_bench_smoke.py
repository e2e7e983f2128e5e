"""bench/train_throughput.py (what bench/gpu_check.sh runs on a GPU) runs where only the GPU
image's packages exist: a CPU smoke run in a process that cannot import Ray, Hydra, OmegaConf,
wandb, FAISS, pandas or pyarrow, for the plain loop (with the profiler, the shared encoding and the
bank) and for DeepSpeed ZeRO-3 with CPU offload and activation checkpointing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_ON_THE_GPU_IMAGE = ["ray", "hydra", "omegaconf", "wandb", "faiss", "pandas", "pyarrow", "fastapi", "uvicorn"]
BARE = """
import importlib.abc, importlib.machinery, runpy, sys
BLOCKED = set(sys.argv[1].split(","))
class Refuse(importlib.abc.Loader):
    def create_module(self, spec): return None
    def exec_module(self, module): raise ImportError(f"{module.__name__} is not on the GPU image")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        # a spec that fails when loaded (probes by find_spec, as torch makes, still see it)
        return importlib.machinery.ModuleSpec(name, Refuse()) if name.split(".")[0] in BLOCKED else None
sys.meta_path.insert(0, Block())
sys.argv = ["bench/train_throughput.py", *sys.argv[2:]]
runpy.run_path("bench/train_throughput.py", run_name="__main__")
"""
SMOKE = ["--device", "cpu", "--scale", "tiny", "--batch-size", "8", "--num-items", "300", "--negatives", "16", "--steps", "2", "--warmup", "1"]


@pytest.mark.parametrize(
    "args",
    [
        ["--strategy", "plain", "--shared-encoding", "--bank-refresh-steps", "2", "--profile", "{tmp}/profile.txt"],
        ["--strategy", "deepspeed_stage_3_offload", "--activation-checkpointing"],
    ],
    ids=["plain-profiled-shared-bank", "zero3-offload-checkpointed"],
)
def test_the_gpu_bench_runs_without_the_packages_the_gpu_image_lacks(args, tmp_path):
    bare = tmp_path / "bare.py"
    bare.write_text(BARE)
    out = tmp_path / "result.json"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = os.environ | {"PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    run = subprocess.run(
        [sys.executable, str(bare), ",".join(NOT_ON_THE_GPU_IMAGE), *SMOKE, *args, "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["strategy"] == args[1] and result["timed_steps"] == 2
    assert result["samples_per_second"] > 0 and result["text_tokens_per_second"] > 0 and result["tflops_per_step"] > 0
    assert result["activation_checkpointing"] == ("--activation-checkpointing" in args)
    if "--profile" in args:
        assert "Self CPU" in (tmp_path / "profile.txt").read_text()


def test_the_bare_process_does_refuse_those_packages(tmp_path):
    """The check above means something: in that process, importing Ray fails."""
    probe = tmp_path / "probe.py"
    probe.write_text(BARE.replace('runpy.run_path("bench/train_throughput.py", run_name="__main__")', "import ray"))
    run = subprocess.run([sys.executable, str(probe), "ray"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "ray is not on the GPU image" in run.stderr
