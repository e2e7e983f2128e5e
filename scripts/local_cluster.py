"""A real multi-node Ray cluster on this one machine, for trying cluster launches locally.

    python scripts/local_cluster.py up [--nodes 2] [--cpus-per-node 2] [--port 6391] [--dashboard-port 8265]
    python scripts/local_cluster.py down

Each node is its own ``ray start --block`` process (the first with ``--head``, the dashboard and the
job server), bound to 127.0.0.1, with its own ports and a temp dir under ``--dir``
(default /tmp/towerrec-cluster). ``down`` stops exactly the nodes that ``up`` started (their
process ids are kept in ``<dir>/cluster.json``), never another Ray on the machine; ``ray stop``
would stop every Ray of this user.

Token authentication is on: the token is read from ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token`` and created there if missing. Clients (``ray job submit``, jobs joining with
``cluster.address``) need ``RAY_AUTH_MODE=token`` in their environment.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
STATE = "cluster.json"


def free_ports(n: int, avoid: set[int]) -> list[int]:
    """``n`` distinct ports that nothing listens on now (and not in ``avoid``)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in avoid and port not in ports and port < 60000:
            ports.append(port)
    return ports


def token_file() -> Path:
    """The cluster's auth token, created (like ``ray get-auth-token --generate``) when missing."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not path.is_file() or not path.read_text().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path


def ray_executable() -> str:
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.is_file() else (shutil.which("ray") or "ray")


def node_command(i: int, args: argparse.Namespace, temp_dir: Path, taken: set[int]) -> list[str]:
    """``ray start`` for node ``i``: every port chosen here so that nodes on one host never collide."""
    node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env, client = free_ports(7, taken)
    low = 20000 + 1000 * i  # each node's workers get their own range of ports
    taken.update({node_manager, object_manager, agent_http, agent_grpc, metrics, runtime_env, client})
    cmd = [
        ray_executable(),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={HOST}",
        f"--num-cpus={args.cpus_per_node}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--min-worker-port={low}",
        f"--max-worker-port={low + 999}",
        f"--resources={json.dumps({f'local_node_{i}': 1})}",
    ]
    if args.object_store_memory:
        cmd.append(f"--object-store-memory={args.object_store_memory}")
    if i == 0:
        cmd += [
            "--head",
            f"--port={args.port}",
            "--include-dashboard=true",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={args.dashboard_port}",
            f"--ray-client-server-port={client}",
        ]
    else:
        cmd += [f"--address={HOST}:{args.port}"]
    return cmd


def wait_for_nodes(address: str, n: int, timeout: float, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """Until ``n`` nodes are alive in the cluster; fails with the node's log if a ``ray start`` exits."""
    import ray

    deadline = time.monotonic() + timeout
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        while True:
            for proc, log in zip(procs, logs):
                if proc.poll() is not None:
                    raise SystemExit(f"local_cluster: `ray start` exited with {proc.returncode}; see {log}:\n{log.read_text()[-3000:]}")
            alive = sum(1 for node in ray.nodes() if node["Alive"])
            if alive >= n:
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"local_cluster: {alive} of {n} nodes alive after {timeout:.0f} s; logs in {logs[0].parent}")
            time.sleep(0.5)
    finally:
        ray.shutdown()


def up(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    state = folder / STATE
    if state.is_file():
        raise SystemExit(f"local_cluster: {state} exists; run `python scripts/local_cluster.py down --dir {folder}` first")
    folder.mkdir(parents=True, exist_ok=True)
    # jobs submitted to the cluster run `python` from the environment that started it
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file()), PATH=path)
    # a worker node starts while the head's GCS may still be coming up: Ray gives it 5 s, too few on a busy machine
    env.setdefault("RAY_gcs_rpc_server_connect_timeout_s", "60")
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=env["RAY_AUTH_TOKEN_PATH"])  # this process's ray.init too
    taken = {args.port, args.dashboard_port}
    procs, logs, pids = [], [], []
    for i in range(args.nodes):
        temp_dir = folder / f"node{i}"  # short: Ray's socket paths live under it (108-byte limit)
        temp_dir.mkdir(exist_ok=True)
        log = folder / f"node{i}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(node_command(i, args, temp_dir, taken), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=folder)
        procs.append(proc)
        logs.append(log)
        pids.append(proc.pid)
        state.write_text(json.dumps({"pids": pids, "address": f"{HOST}:{args.port}", "dashboard": f"http://{HOST}:{args.dashboard_port}"}, indent=1))
        if i == 0:
            wait_for_nodes(f"{HOST}:{args.port}", 1, args.timeout, procs, logs)
    wait_for_nodes(f"{HOST}:{args.port}", args.nodes, args.timeout, procs, logs)
    print(f"local_cluster: {args.nodes} Ray node(s) of {args.cpus_per_node} CPUs up; state and logs in {folder}")
    print(f"  address:   {HOST}:{args.port}        (cluster=remote cluster.address={HOST}:{args.port})")
    print(f"  dashboard: http://{HOST}:{args.dashboard_port}   (ray job submit --address http://{HOST}:{args.dashboard_port})")
    print(f"  token:     {env['RAY_AUTH_TOKEN_PATH']}   (clients: export RAY_AUTH_MODE=token)")


def down(args: argparse.Namespace) -> None:
    folder = Path(args.dir)
    state = folder / STATE
    if not state.is_file():
        print(f"local_cluster: nothing to stop ({state} does not exist)")
        return
    pids = json.loads(state.read_text())["pids"]
    for pid in reversed(pids):  # worker nodes first, the head last
        try:
            os.kill(pid, signal.SIGTERM)  # `ray start --block` drains and stops its node's processes
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline and any(alive(pid) for pid in pids):
        time.sleep(0.5)
    for pid in pids:  # what is left of a node that did not stop in time: its whole process group
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    state.unlink()
    print(f"local_cluster: stopped {len(pids)} node(s) started from {folder}")


def alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:  # not our child (another `up` started it): ask the kernel
        try:
            os.kill(pid, 0)
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except (ProcessLookupError, FileNotFoundError):
            return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--dir",
        default=os.environ.get("TOWERREC_CLUSTER_DIR", "/tmp/towerrec-cluster"),
        help="state, logs and each node's Ray temp dir (default $TOWERREC_CLUSTER_DIR or /tmp/towerrec-cluster)",
    )
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--port", type=int, default=6391, help="the head's GCS port")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job server")
    parser.add_argument("--object-store-memory", type=int, default=None, help="bytes of object store per node (default: Ray's share of memory)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for nodes to come up or stop")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.cpus_per_node < 1:
        parser.error("--nodes and --cpus-per-node must be at least 1")
    (up if args.action == "up" else down)(args)


if __name__ == "__main__":
    main()
