"""Cluster launches as users do them, against real Ray clusters started with ``ray start``
(scripts/local_cluster.py: one ``ray start --block`` process per node, on 127.0.0.1, with its
own ports and temp dir): the README's two-node recipe run as written (``ray job submit
--working-dir .``, ``ray job logs``), a 2-worker training across two nodes that survives a
killed worker with its checkpoints and outputs on the shared folder, and jobs that the
cluster cannot place failing at once with the shortfall named.

Each test stops only the nodes it started; the Ray token lives in the test's own folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
RECIPE_HEADING = "### Run it locally as a two-node cluster"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env(folder: Path) -> dict:
    env = dict(
        os.environ,
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(folder / "token"),
        TOWERREC_CLUSTER_DIR=str(folder),
        WANDB_MODE="disabled",
        PYTHONFAULTHANDLER="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    env.pop("RAY_ADDRESS", None)
    return env


@contextmanager
def cluster_folder():
    """A short folder (Ray's socket paths live under it) with the test's own Ray token; on exit
    the nodes started from it are stopped (only those) and it is removed."""
    folder = Path(tempfile.mkdtemp(prefix="trc", dir="/tmp"))
    env = cluster_env(folder)
    try:
        yield folder, env
    finally:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "local_cluster.py"), "down", "--dir", str(folder)], env=env, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def start_two_nodes(folder: Path, env: dict) -> str:
    port = free_port()
    up = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "local_cluster.py"),
            "up",
            "--nodes",
            "2",
            "--cpus-per-node",
            "2",
            "--port",
            str(port),
            "--dashboard-port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert up.returncode == 0, up.stdout + up.stderr
    return f"127.0.0.1:{port}"


@pytest.fixture
def cluster_dir():
    with cluster_folder() as (folder, env):
        yield folder, env


@pytest.fixture(scope="module")
def two_nodes_shared():
    """One cluster for the placement checks (they never start a worker), then the killed-worker run."""
    with cluster_folder() as (folder, env):
        yield folder, env, start_two_nodes(folder, env)


def readme_recipe() -> list[str]:
    """The commands of the README's two-node recipe, one per entry (continuation lines joined)."""
    text = README.read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index(RECIPE_HEADING) :], re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def nodes_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                alive.append(pid)
        except (ProcessLookupError, FileNotFoundError):
            pass
    return alive


def ray_cli(env: dict, *args: str) -> str:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def ray_list(env: dict, address: str, kind: str, *args: str) -> list[dict]:
    """``ray list <kind>`` as JSON rows (the CLI prints a sentence, not ``[]``, when there are none)."""
    out = ray_cli(env, "list", kind, "--address", address, *args, "--format", "json", "--limit", "1000")
    return [] if out.strip() == "No resource in the cluster" else json.loads(out)


def train_workers(env: dict, address: str) -> list[dict]:
    """Every Ray Train worker the cluster has run (alive or dead), with its node and pid."""
    return ray_list(env, address, "actors", "--filter", "class_name=RayTrainWorker", "--detail")


def drivers(env: dict, address: str) -> list[str]:
    """The ids of every driver (a job's Python process) that has joined the cluster."""
    return [j["job_id"] for j in ray_list(env, address, "jobs") if j.get("type") == "DRIVER"]


def head_node(env: dict, address: str) -> str:
    nodes = json.loads(ray_cli(env, "list", "nodes", "--address", address, "--format", "json"))
    return next(n["node_id"] for n in nodes if n["is_head_node"])


@pytest.mark.xdist_group("cluster-readme-recipe")  # its own cluster: may run beside the others
def test_the_readmes_two_node_recipe_runs_as_written(cluster_dir):
    folder, env = cluster_dir
    port, dashboard = free_port(), free_port()
    commands = readme_recipe()
    assert commands[0].startswith(". .venv/bin/activate") and commands[-1] == "python scripts/local_cluster.py down"

    def as_run_here(command: str) -> str:  # the same commands, on free ports, in this test's folder
        return (
            command.replace(". .venv/bin/activate", f". {BIN}/activate")
            .replace("--port 6391", f"--port {port}")
            .replace("127.0.0.1:6391", f"127.0.0.1:{port}")
            .replace("8265", str(dashboard))
            .replace("/tmp/towerrec-cluster", str(folder))
        )

    script = "set -euo pipefail\n" + "\n".join(as_run_here(c) for c in commands[:-1])
    started = time.time()
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Job 'towerrec-tiny-1' succeeded" in out
    assert "ray: the Ray cluster at" in out and f"dashboard http://127.0.0.1:{dashboard}" in out  # printed by the job
    logs_tail = out.split("Job 'towerrec-tiny-1' succeeded", 1)[1]
    assert "| most popular |" in logs_tail  # `ray job logs ... | tail -n 3`: the end of the pipeline's report
    assert "SUCCEEDED" in logs_tail  # `ray job list`

    # every file of the pipeline's contract, under paths.root_dir (the shared folder)
    runs = sorted((folder / "shared" / "outputs" / "pipeline").glob("*/*"))
    assert len(runs) == 1, runs
    run = runs[0]
    for stage in ("pretrain", "finetune"):
        for name in ("config.yaml", "metrics.json", "run.log", "bundle/manifest.json", "bundle/model.safetensors", "bundle/catalog.parquet"):
            assert (run / stage / name).is_file(), f"{stage}/{name}"
    for name in ("metrics.json", "test_split.parquet", "test_recommendations.parquet"):
        assert (run / "evaluate" / name).is_file(), f"evaluate/{name}"
    # batch inference ran sharded (infer.sharded=true): the actors' parts and the index they mapped, on shared storage
    for name in ("recommendations.parquet", "item_embeddings.parquet", "user_embeddings.parquet"):
        assert sorted(p.name for p in (run / "batch_infer" / name).iterdir())[0] == "part-000000000000.parquet", f"batch_infer/{name}"
    for name in ("metrics.json", "index/items.faiss", "index/shards.json", "index/text.npy"):
        assert (run / "batch_infer" / name).is_file(), f"batch_infer/{name}"
    pieces = [json.loads(line) for f in (run / "batch_infer" / "shards").glob("users-*.jsonl") for line in f.read_text().splitlines()]
    spans, users = sorted((p["start"], p["stop"]) for p in pieces), json.loads((run / "batch_infer" / "metrics.json").read_text())["infer/num_users"]
    assert spans[0][0] == 0 and spans[-1][1] == users and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), pieces  # every user once
    recs = pq.read_table(run / "batch_infer" / "recommendations.parquet")
    assert recs.num_rows == json.loads((run / "batch_infer" / "metrics.json").read_text())["infer/num_users"] > 0
    assert json.loads((run / "metrics.json").read_text())["evaluate/test/ndcg@10"] > 0
    # each training worker read only its own users' rows (data.shard_by_rank=true), every epoch of both stages
    num_users = json.loads((run / "finetune" / "bundle" / "manifest.json").read_text())["num_users"]
    for stage in ("pretrain", "finetune"):
        lines = [json.loads(line) for f in sorted((run / stage / "shards").glob("rank-*.jsonl")) for line in f.read_text().splitlines()]
        epochs = sorted({line["epoch"] for line in lines})
        assert epochs == list(range(len(epochs))) and epochs, f"{stage}: {lines}"
        for epoch in epochs:
            ranks = sorted((line for line in lines if line["epoch"] == epoch), key=lambda line: line["rank"])
            assert [r["rank"] for r in ranks] == [0, 1] and len({r["node_id"] for r in ranks}) == 2, ranks  # one on each node
            (lo0, hi0), (lo1, hi1) = ranks[0]["user_idx"], ranks[1]["user_idx"]
            assert lo0 == 0 and hi0 == lo1 and hi1 == num_users, ranks  # disjoint, and together every user
            for r in ranks:
                assert r["user_idx"][0] <= r["first_user"] <= r["last_user"] < r["user_idx"][1], r  # trained on its own users only
                assert 0.4 < r["rows_read"] / sum(x["rows_read"] for x in ranks) < 0.6, ranks  # about half the rows each
            assert ranks[0]["windows"] == ranks[1]["windows"] == max(r["windows_local"] for r in ranks)  # the same steps on both
    assert any((folder / "shared" / "ray").glob("*/checkpoint_*"))  # Ray Train's checkpoints: cluster.storage_path
    assert (folder / "shared" / "data" / "synthetic").is_dir()

    # the two training workers of each stage ran on the two nodes
    address = f"127.0.0.1:{port}"
    workers = train_workers(env, address)
    assert len({w["node_id"] for w in workers}) == 2, [(w["node_id"][:8], w["pid"]) for w in workers]
    # nothing was written through a current folder: not in the job's working-dir copy, not in the checkout
    for copy in folder.glob("node*/session_*/runtime_resources/working_dir_files/*"):
        assert not (copy / "outputs").exists() and not (copy / "data").exists(), copy
    assert not [p for p in (ROOT / "outputs" / "pipeline").glob("*/*") if p.stat().st_mtime > started]

    # the recipe's last command stops exactly the nodes it started
    pids = json.loads((folder / "cluster.json").read_text())["pids"]
    assert len(nodes_alive(pids)) == 2
    down = subprocess.run(["bash", "-c", as_run_here(commands[-1])], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert nodes_alive(pids) == [] and not (folder / "cluster.json").exists()


def stage_command(address: str, shared: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.pretrain",
        "experiment=tiny",
        "launcher=ray",
        "cluster=remote",
        f"cluster.address={address}",
        f"paths.root_dir={shared}/root",
        f"cluster.storage_path={shared}/ray",
        "logger=none",
        *overrides,
    ]


@pytest.mark.parametrize(
    ("overrides", "shortfall"),
    [
        (["hardware=gpu1"], "need 1 GPU each"),
        (["hardware.num_workers=3", "hardware.cpus_per_worker=2"], "do not fit on the Ray cluster"),
        (["cluster.storage_path=/proc/towerrec-cannot-write"], "cluster.storage_path=/proc/towerrec-cannot-write"),
    ],
    ids=["no-gpu", "too-few-cpus", "unwritable-storage"],
)
def test_a_job_the_cluster_cannot_place_fails_at_once_naming_the_shortfall(two_nodes_shared, overrides, shortfall):
    folder, env, address = two_nodes_shared
    shared = folder / "shared"
    drivers_before = drivers(env, address)
    proc = subprocess.run(stage_command(address, shared, *overrides), cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert error and shortfall in error[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr  # the message, not a stack (that is in run.log)
    # refused at once: the job joined the cluster, and asked it for nothing (no placement group, no Train actor)
    assert len(drivers(env, address)) == len(drivers_before) + 1
    assert ray_list(env, address, "placement-groups") == []
    assert [a["class_name"] for a in ray_list(env, address, "actors") if "Train" in a["class_name"]] == []
    assert not (shared / "ray").exists() or not any((shared / "ray").rglob("checkpoint_*"))


def test_two_workers_on_two_nodes_survive_a_killed_worker_with_outputs_on_shared_storage(two_nodes_shared):
    # the placement checks' cluster (they ran before it and started no worker); its own shared folder
    folder, env, address = two_nodes_shared
    shared, elsewhere = folder / "shared-killed", folder / "cwd"
    elsewhere.mkdir()
    cmd = stage_command(
        address,
        shared,
        "strategy=ddp",
        "hardware.num_workers=2",
        "hardware.cpus_per_worker=2",
        "pretrain.max_epochs=4",
        "data.batch_size=32",
        "trainer.max_failures=1",
        "debug.record_losses=true",
        "debug.hold_at_step=20",
        "run_name=two-nodes",
        "strategy.collective_timeout_s=120",
    )
    job = subprocess.Popen(cmd, cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # every rank waits at step 20 (the second epoch: the first epoch's checkpoint is registered),
        # so the kill lands mid-run however loaded the machine is; then kill the worker on the other node
        head = head_node(env, address)
        deadline = time.monotonic() + 300
        held = shared / "root" / "outputs" / "pretrain"
        while not list(held.glob("*/*/debug/held-rank1")) or not list(held.glob("*/*/debug/held-rank0")):
            assert job.poll() is None, job.stdout.read()[-4000:]
            assert time.monotonic() < deadline, "no rank held at step 20 after 300 s"
            time.sleep(0.2)
        while not (shared / "ray" / "two-nodes" / "checkpoint_manager_snapshot.json").is_file():  # Ray registered epoch 1's
            assert time.monotonic() < deadline, "no registered checkpoint after 300 s"
            time.sleep(0.2)
        alive = [w for w in train_workers(env, address) if w["state"] == "ALIVE"]
        assert len({w["node_id"] for w in alive}) == 2, alive  # one worker on each node
        victim = next(w for w in alive if w["node_id"] != head)
        os.kill(victim["pid"], signal.SIGKILL)
        out, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-6000:]

    run = next((shared / "root" / "outputs" / "pretrain").glob("*/*"))
    log = (run / "run.log").read_text()
    assert "resuming pretrain from" in log or "resuming pretrain from" in out, log[-4000:]
    steps = [json.loads(line)["step"] for line in (run / "debug" / "losses-rank0.jsonl").read_text().splitlines()]
    restart = next((i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]), None)
    assert restart is not None and steps[restart] > 1, f"not restarted, or restarted from scratch: {steps}"
    # after the restart the new worker group runs on both nodes again
    workers = train_workers(env, address)
    assert victim["pid"] in [w["pid"] for w in workers if w["state"] == "DEAD"]
    assert sum(w["state"] == "DEAD" for w in workers) >= 2 and len({w["node_id"] for w in workers}) == 2
    # the consolidated model and the metrics are in the run folder on the shared storage
    assert (run / "bundle" / "model.safetensors").is_file() and (run / "bundle" / "manifest.json").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/epochs"] == 4 and metrics["val/ndcg@10"] > 0
    assert list((shared / "ray" / "two-nodes").glob("checkpoint_*"))
    assert not any(elsewhere.iterdir())  # nothing through the job's current folder
