"""Stage ``cluster`` of bench/scale.py: the sharded path on a real two-node Ray cluster on this machine.

    python bench/scale.py --stages cluster             # 5 M, 20 M and 100 M interactions, 1 M items
    python bench/scale.py --stages cluster --quick --out /tmp/q   # tiny sizes: the same path in minutes
    python bench/scale_cluster.py --sizes 5000000 --items 1000000 # one size, prints the rows

One cluster for every size (scripts/local_cluster.py: two ``ray start`` nodes of 2 CPUs, each its
own raylet and object store); for each size, in this order:

1. ``generate``: synthetic interactions written as Parquet shards of ``SHARD_USERS`` users each by
   a fresh process that holds one shard at a time (users ``s<k>-u<n>``, items ``i<n>``; every shard
   draws its own planted structure, which costs nothing here: the bench measures memory and time,
   not accuracy);
2. ``prepare``: ``data=parquet data.engine=ray`` prepared on the cluster by a fresh driver process
   calling the job's own ``prepare_data`` (Ray Data tasks on both nodes);
3. ``train``: ``python -m jobs.finetune`` on the cluster: 2 Ray Train workers (one per node,
   ``data.shard_by_rank=true``), one epoch of ``STEPS`` steps (``trainer.limit_train_batches``)
   with validation on ``VAL_BATCHES`` batches (sampled users, as at scale), then the driver writes
   the model bundle, its users piece by piece;
4. ``infer``: ``python -m jobs.batch_infer infer.sharded=true`` on the cluster: 2 actors per pool,
   top-100, the index memory-mapped by the user actors.

While each of steps 2-4 runs, a thread reads ``/proc/<pid>/smaps_rollup`` of the step's driver and
of every process under the two nodes every ``SAMPLE_S`` seconds: RSS, PSS (shared pages split
among the processes that map them) and USS (private pages). Each process is named by its role at
that moment (its Ray process title: a pooled Ray worker may run preparation tasks, then an actor).
A row per (step, role): the largest peak USS, PSS and RSS over that role's processes, their
number, and for training and inference the rows each node handled (from the workers' and actors'
``shards/`` logs). The growth table fits the slope of log peak USS against log size per row; the
issue's bounds: driver <= 0.1, training workers and inference actors <= 0.15.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_common import in_fresh_process, row, say  # noqa: E402

STAGE = "cluster"
DEFAULT_SIZES = (5_000_000, 20_000_000, 100_000_000)
QUICK_SIZES = (20_000, 60_000)
ROWS_PER_USER = 50  # 100 M interactions: 2 M users
DEFAULT_ITEMS, QUICK_ITEMS = 1_000_000, 2_000
SHARD_USERS = 100_000  # users per generated Parquet shard (5 M interactions)
STEPS, VAL_BATCHES = 50, 2
SAMPLE_S = 1.0
BOUNDS = {"driver": 0.1, "train_worker": 0.15, "user_actor": 0.15, "item_actor": 0.15}


# ---- 1. generation: one shard of users at a time --------------------------------------------
def generate(raw: str, interactions: int, items: int, seed: int = 0) -> dict:
    """Write ``raw``/interactions/part-<k>.parquet (row groups of 1 M rows) and ``raw``/items.parquet."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datamodules.synthetic import generate_synthetic

    users = max(interactions // ROWS_PER_USER, 4)
    folder = Path(raw) / "interactions"
    folder.mkdir(parents=True, exist_ok=True)
    start, written = time.perf_counter(), 0
    for k, lo in enumerate(range(0, users, SHARD_USERS)):
        n = min(SHARD_USERS, users - lo)
        data = generate_synthetic(num_users=n, num_items=items, num_topics=50, min_len=ROWS_PER_USER - 10, max_len=ROWS_PER_USER + 10, seed=seed + k)
        table = pa.Table.from_pandas(data.interactions.reset_index(drop=True), preserve_index=False)
        table = table.set_column(
            table.schema.get_field_index("user_id"),
            "user_id",
            pc.binary_join_element_wise(pa.scalar(f"s{k}", pa.large_string()), pc.cast(table["user_id"], pa.large_string()), pa.scalar("-", pa.large_string())),
        )
        pq.write_table(table, folder / f"part-{k:05d}.parquet", row_group_size=1_000_000)
        written += table.num_rows
        if k == 0:
            pq.write_table(pa.Table.from_pandas(data.items.reset_index(drop=True), preserve_index=False), Path(raw) / "items.parquet")
        del data, table
    return {"seconds": time.perf_counter() - start, "interactions": written, "users": users, "items": items}


# ---- the cluster --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Two local nodes (scripts/local_cluster.py) with their own token; ``down`` stops only them."""

    def __init__(self, folder: Path, object_store_bytes: int):
        self.folder = folder
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(folder / "token"), WANDB_MODE="disabled", RAY_DASHBOARD_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        port = free_port()
        script = [sys.executable, str(ROOT / "scripts" / "local_cluster.py")]
        up = [*script, "up", "--dir", str(folder), "--nodes", "2", "--cpus-per-node", "2", "--port", str(port), "--dashboard-port", str(free_port())]
        subprocess.run([*up, "--object-store-memory", str(object_store_bytes)], env=self.env, check=True, capture_output=True, text=True, timeout=300)
        self.down_cmd = [*script, "down", "--dir", str(folder)]
        self.address = f"127.0.0.1:{port}"
        self.node_pids = json.loads((folder / "cluster.json").read_text())["pids"]  # the head first

    def down(self) -> None:
        subprocess.run(self.down_cmd, env=self.env, timeout=180, capture_output=True)


# ---- memory of every process, by role -------------------------------------------------------
ROLES = (
    ("RayTrainWorker", "train_worker"),
    ("UserPart", "user_actor"),
    ("CatalogPart", "item_actor"),
    ("train_index_file", "index_task"),  # the index's tasks (jobs/runtime/stages/sharded_inference.py)
    ("add_index_shard", "index_task"),
    ("join_text_file", "index_task"),
    ("ray::IDLE", "idle_worker"),
)


def role_of(cmdline: str) -> str:
    for key, role in ROLES:
        if key in cmdline:
            return role
    if cmdline.startswith("ray::"):
        name = cmdline[5:].split(" ")[0]
        # Ray Data's operator tasks (ReadParquet, MapBatches(...), a groupby's shuffle) run preparation
        if re.match(r"(Read|MapBatches|Map|FlatMap|Filter|Write|Aggregate|HashShuffle|_shuffle|reduce|Repartition|Split)", name) or "->" in name:
            return "data_task"
        return "ray_actor:" + name.split(".")[0]
    return "ray_system"  # raylet, gcs, the node's log monitor and agents


def smaps_rollup(pid: int) -> tuple[float, float, float] | None:
    """(RSS, PSS, USS) of a process in MiB, or None when it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].endswith(":"):
                    fields[parts[0][:-1]] = int(parts[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0) + fields.get("Private_Hugetlb", 0)
    return fields.get("Rss", 0) / 1024, fields.get("Pss", 0) / 1024, uss / 1024


class Sampler:
    """Peak RSS, PSS and USS per (process, role) of a step's driver and of everything under the nodes."""

    def __init__(self, node_pids: list[int], driver_pid: int):
        self.node_pids, self.driver_pid = node_pids, driver_pid
        self.peaks: dict[tuple[int, str], dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _processes(self) -> list[tuple[int, str, str]]:
        import psutil

        out = [(self.driver_pid, "driver", "driver")]
        for node, pid in enumerate(self.node_pids):
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    cmd = " ".join(child.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                out.append((child.pid, role_of(cmd), "head" if node == 0 else f"node{node}"))
        return out

    def _run(self) -> None:
        while True:
            for pid, role, node in self._processes():
                got = smaps_rollup(pid)
                if got is None:
                    continue
                peak = self.peaks.setdefault((pid, role), {"pid": pid, "role": role, "node": node, "rss": 0.0, "pss": 0.0, "uss": 0.0})
                peak["rss"], peak["pss"], peak["uss"] = max(peak["rss"], got[0]), max(peak["pss"], got[1]), max(peak["uss"], got[2])
            if self.stop.wait(SAMPLE_S):
                return

    def by_role(self) -> dict[str, dict]:
        roles: dict[str, dict] = {}
        for p in self.peaks.values():
            r = roles.setdefault(p["role"], {"processes": 0, "rss": 0.0, "pss": 0.0, "uss": 0.0, "nodes": set()})
            r["processes"] += 1
            r["nodes"].add(p["node"])
            for k in ("rss", "pss", "uss"):
                r[k] = max(r[k], p[k])
        return roles


def run_sampled(cmd: list[str], env: dict, node_pids: list[int], log: Path, timeout: float) -> tuple[float, dict, dict[int, str]]:
    """Run ``cmd`` (a job's driver) to the end while sampling; its seconds, peaks by role, and the
    node of every process seen (pid -> head or node1)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with Sampler(node_pids, proc.pid) as sampler:
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
    if code != 0:
        raise RuntimeError(f"bench/scale_cluster.py: {' '.join(cmd[:3])} failed ({code}); its output: {log}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - start, sampler.by_role(), {p["pid"]: p["node"] for p in sampler.peaks.values()}


# ---- 2-4. the job steps ---------------------------------------------------------------------
def job_overrides(cluster: Cluster, work: Path, raw: Path, name: str, quick: bool) -> list[str]:
    return [
        "experiment=tiny",
        "launcher=ray",
        "cluster=remote",
        f"cluster.address={cluster.address}",
        f"cluster.storage_path={work / 'ray'}",
        f"paths.root_dir={work / 'root'}",
        "logger=none",
        "data=parquet",
        f"data.reader.folder={raw}",
        f"data.name={name}",
        "data.engine=ray",
        "data.shard_by_rank=true",
        "hardware.num_workers=2",
        "hardware.cpus_per_worker=2",
        "strategy=ddp",
        "trainer.enable_progress_bar=false",
        "data.eval_batch_size=64",
        *(["data.batch_size=32"] if quick else []),
    ]


def prepare_in_process(overrides: list[str]) -> dict:
    """The job's own preparation (``prepare_data``: Ray Data on the cluster), in this process."""
    from hydra import compose, initialize_config_dir

    from jobs.runtime.config.assembly import prepare_data
    from jobs.runtime.config.ray_cluster import ray_session, train_needs
    from jobs.runtime.config.schema import register, validate

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=overrides)
    validate(cfg)
    with ray_session(cfg, train_needs(cfg), []):
        prepared = prepare_data(cfg)
    return {"users": prepared.num_users, "items": prepared.num_items, "interactions": prepared.num_interactions}


def rows_by_node(lines: list[dict], node_names: dict[int, str], rows_of) -> dict[str, int]:
    """Rows handled per node, from shard-log lines carrying the pid of the process that handled them."""
    out: dict[str, int] = {}
    for line in lines:
        node = node_names.get(line["pid"], "?")
        out[node] = out.get(node, 0) + rows_of(line)
    return out


def read_jsonl(paths) -> list[dict]:
    return [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]


def measure_size(cluster: Cluster, work: Path, interactions: int, items: int, quick: bool) -> list[dict]:
    name = f"cluster{interactions}"
    raw = work / "raw" / name
    shutil.rmtree(raw, ignore_errors=True)
    gen, gen_rss = in_fresh_process(generate, str(raw), interactions, items)
    n = gen["interactions"]
    say(f"cluster: {n:,} interactions, {gen['users']:,} users, {items:,} items generated in {gen['seconds']:.0f} s (peak {gen_rss:.0f} MiB)")
    rows = [row(STAGE, "generate/generator", n, "interactions", gen["seconds"], gen_rss, uss_mb=gen_rss, pss_mb=gen_rss, processes=1, users=gen["users"])]
    common = job_overrides(cluster, work, raw, name, quick)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    env = cluster.env

    prep_cmd = [sys.executable, __file__, "--prepare", json.dumps(common)]
    seconds, roles, _ = run_sampled(prep_cmd, env, cluster.node_pids, logs / f"{name}-prepare.log", 7200)
    rows += role_rows("prepare", n, seconds, roles, users=gen["users"])

    out = work / "root" / "outputs" / f"finetune-{name}"
    train_cmd = [
        sys.executable,
        "-m",
        "jobs.finetune",
        *common,
        "init_from=null",
        f"paths.output_dir={out}",
        f"run_name={name}",
        "finetune.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}",
        f"trainer.limit_val_batches={VAL_BATCHES}",
    ]
    seconds, roles, pid_nodes = run_sampled(train_cmd, env, cluster.node_pids, logs / f"{name}-train.log", 7200)
    shard_lines = read_jsonl(sorted((out / "shards").glob("rank-*.jsonl")))
    trained = rows_by_node(shard_lines, pid_nodes, lambda line: line["rows_read"])
    rows += role_rows("train", n, seconds, roles, users=gen["users"], rows_read_by_node=trained)

    infer_out = work / "root" / "outputs" / f"infer-{name}"
    infer_cmd = [
        sys.executable,
        "-m",
        "jobs.batch_infer",
        *common,
        f"checkpoint={out / 'bundle'}",
        f"paths.output_dir={infer_out}",
        "infer.sharded=true",
        "infer.num_actors=2",
        "infer.top_k=100",
    ]
    seconds, roles, pid_nodes = run_sampled(infer_cmd, env, cluster.node_pids, logs / f"{name}-infer.log", 7200)
    piece_lines = read_jsonl(sorted((infer_out / "shards").glob("users-*.jsonl")))
    inferred = rows_by_node(piece_lines, pid_nodes, lambda line: line["stop"] - line["start"])
    if sum(inferred.values()) != gen["users"]:
        raise RuntimeError(f"bench/scale_cluster.py: the actors' logs name {sum(inferred.values())} users, not {gen['users']}")
    rows += role_rows("infer", n, seconds, roles, users=gen["users"], users_by_node=inferred)
    for r in rows:
        say("  " + ", ".join(f"{k}={v:,.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("stage", "unit")))
    shutil.rmtree(raw, ignore_errors=True)  # the next size's input needs the disk
    shutil.rmtree(work / "root" / "data", ignore_errors=True)
    shutil.rmtree(work / "ray", ignore_errors=True)
    return rows


def role_rows(step: str, size: int, seconds: float, roles: dict[str, dict], **extra) -> list[dict]:
    out = []
    for role, r in sorted(roles.items()):
        if role in ("idle_worker", "ray_system") or role.startswith("ray_actor:"):
            continue  # Ray's own processes: counted in the row of the step's "ray" total below
        handled = {k: v for k, v in extra.items() if k.endswith("_by_node")} if role in ("train_worker", "user_actor") else {}
        out.append(
            row(
                STAGE,
                f"{step}/{role}",
                size,
                "interactions",
                seconds,
                r["rss"],
                uss_mb=r["uss"],
                pss_mb=r["pss"],
                processes=r["processes"],
                nodes=",".join(sorted(r["nodes"])),
                users=extra["users"],
                **handled,
            )
        )
    ray_own = [r for role, r in roles.items() if role in ("idle_worker", "ray_system") or role.startswith("ray_actor:")]
    if ray_own:
        out.append(
            row(
                STAGE,
                f"{step}/ray_processes",
                size,
                "interactions",
                seconds,
                max(r["rss"] for r in ray_own),
                uss_mb=max(r["uss"] for r in ray_own),
                pss_mb=max(r["pss"] for r in ray_own),
                processes=sum(r["processes"] for r in ray_own),
                growth=False,
            )
        )
    return out


def run_stage(out_dir: Path, quick: bool = False, sizes: tuple[int, ...] | None = None, items: int | None = None) -> list[dict]:
    sizes = sizes or (QUICK_SIZES if quick else DEFAULT_SIZES)
    items = items or (QUICK_ITEMS if quick else DEFAULT_ITEMS)
    work = Path(out_dir).resolve()
    folder = Path(f"/tmp/trb{os.getpid()}")  # short: Ray's socket paths live under it
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    cluster = Cluster(folder, (1 if quick else 3) << 30)
    try:
        say(f"cluster: 2 nodes of 2 CPUs at {cluster.address}")
        rows: list[dict] = []
        for n in sizes:
            rows += measure_size(cluster, work, n, items, quick)
            (work / "scale_cluster.partial.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")  # a later size may fail
        return rows
    finally:
        cluster.down()
        shutil.rmtree(folder, ignore_errors=True)


def uss_slopes(rows: list[dict]) -> list[dict]:
    """Slope of log peak USS against log size for each (step, role) measured at two sizes or more,
    with the issue's bound where it sets one."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["stage"] == STAGE and r.get("growth", True) and "uss_mb" in r:
            groups.setdefault(r["step"], []).append(r)
    out = []
    for step, group in groups.items():
        sizes = np.array([r["size"] for r in group], dtype=np.float64)
        if len(np.unique(sizes)) < 2:
            continue
        slope = float(np.polyfit(np.log(sizes), np.log([max(r["uss_mb"], 1e-3) for r in group]), 1)[0])
        bound = BOUNDS.get(step.split("/")[1])
        out.append(
            {"step": step, "sizes": sorted({int(s) for s in sizes}), "uss_slope": slope, "bound": bound, "within": None if bound is None else slope <= bound}
        )
    return out


def table(rows: list[dict]) -> str:
    """The stage's Markdown: per size and (step, role) the peaks, then the USS slopes."""
    mine = [r for r in rows if r["stage"] == STAGE]
    lines = [
        "| interactions | step / role | seconds | processes | nodes | peak USS MiB | peak PSS MiB | peak RSS MiB | rows per node |",
        "|---:|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in mine:
        per_node = r.get("rows_read_by_node") or r.get("users_by_node") or ""
        if per_node:
            per_node = ", ".join(f"{k} {v:,}" for k, v in sorted(per_node.items())) + (" interactions" if "rows_read_by_node" in r else " users")
        lines.append(
            f"| {r['size']:,} | {r['step']} | {r['seconds']:.1f} | {r.get('processes', '')} | {r.get('nodes', '')} | {r['uss_mb']:,.0f} | {r['pss_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {per_node} |"
        )
    lines += ["", "| step / role | sizes | slope of log peak USS | bound | within |", "|---|---|---:|---:|---|"]
    for s in uss_slopes(mine):
        bound = "" if s["bound"] is None else f"{s['bound']:.2f}"
        within = "" if s["within"] is None else ("yes" if s["within"] else "**no**")
        lines.append(f"| {s['step']} | {', '.join(f'{x:,}' for x in s['sizes'])} | {s['uss_slope']:.2f} | {bound} | {within} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--items", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "scale_cluster")
    parser.add_argument("--prepare", help=argparse.SUPPRESS)  # a step's driver: the overrides as JSON
    args = parser.parse_args()
    if args.prepare:
        print(json.dumps(prepare_in_process(json.loads(args.prepare))))
        return
    rows = run_stage(args.out, args.quick, tuple(args.sizes) if args.sizes else None, args.items)
    (args.out / "scale_cluster.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
