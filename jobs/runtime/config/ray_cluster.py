"""Starting or joining Ray for a job: embedded local Ray by default, a cluster by address."""

from __future__ import annotations

import logging
import math
import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from omegaconf import DictConfig

from jobs.runtime.tracking.console import say

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 60.0


class PlacementError(RuntimeError):
    """The cluster cannot run the job as configured (resources it lacks, storage it cannot reach)."""


@dataclass(frozen=True)
class Needs:
    """What a job places on the cluster: ``count`` bundles of ``cpus`` and ``gpus`` each, each
    bundle on a single node; ``keys`` are the config keys that set them (named in errors)."""

    what: str
    count: int
    cpus: float
    gpus: float
    keys: str

    def per_bundle(self) -> dict[str, float]:
        """One bundle's Ray resources (GPU only when it needs one)."""
        return {"CPU": self.cpus, "GPU": self.gpus} if self.gpus else {"CPU": self.cpus}


def train_needs(cfg: DictConfig) -> Needs:
    hw = cfg.hardware
    gpus = (hw.gpus_per_worker or 1) if hw.accelerator == "gpu" else 0
    return Needs(
        "Ray Train worker",
        int(hw.num_workers),
        cpus_per_worker(cfg),
        gpus,
        f"hardware={hw.name}: hardware.num_workers={hw.num_workers}, hardware.cpus_per_worker={hw.cpus_per_worker}, hardware.gpus_per_worker={hw.gpus_per_worker if gpus else 0}",
    )


def infer_needs(cfg: DictConfig) -> Needs:
    i = cfg.infer
    return Needs(
        "Ray Data inference actor",
        int(i.num_actors),
        float(i.cpus_per_actor),
        float(i.gpus_per_actor),
        f"infer.num_actors={i.num_actors}, infer.cpus_per_actor={i.cpus_per_actor}, infer.gpus_per_actor={i.gpus_per_actor}",
    )


def cpus_per_worker(cfg: DictConfig) -> int:
    """``hardware.cpus_per_worker``, or this machine's cores shared among the workers when null."""
    hw = cfg.hardware
    return hw.cpus_per_worker or max(1, (os.cpu_count() or 1) // hw.num_workers)


def local_cpus(cfg: DictConfig) -> int:
    """Logical CPUs for an embedded Ray: at least the machine's cores, with room beside the
    Train workers or the inference actors for Ray's own tasks (Ray Data reads, the controller)."""
    hw, inf = cfg.hardware, cfg.infer
    need = max(hw.num_workers * cpus_per_worker(cfg), inf.num_actors * inf.cpus_per_actor) + 2
    return int(max(os.cpu_count() or 1, need))


def cluster_address(cfg: DictConfig) -> str | None:
    """``cluster.address``; in a job submitted with ``ray job submit`` (RAY_ADDRESS set by Ray),
    the cluster it runs on even with ``cluster=local``, since an embedded Ray cannot start there."""
    return cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None


@contextmanager
def ray_session(cfg: DictConfig, needs: Needs | None = None, shared: Mapping[str, str] | None = None, state_api: bool = False) -> Iterator[None]:
    """Ray for the duration of a job. Starts an embedded Ray (dashboard off unless configured)
    when ``cluster.address`` is null, joins the cluster otherwise; shuts down only what it started.
    On entry it says where the job runs (and the dashboard's address), and fails at once with a
    :class:`PlacementError` when the cluster cannot hold ``needs`` or, on a cluster, when a node
    cannot write the ``shared`` folders (folder -> the config key that sets it); Ray itself would
    wait for ever.

    ``state_api``: the embedded Ray also serves Ray's state API (the dashboard's HTTP server, on a
    free loopback port that every Ray process is told through ``RAY_API_SERVER_ADDRESS``). Ray
    Train's placement-group cleaner needs it to free the workers of a run whose controller died,
    as a Tune trial's does when Tune stops the trial; without it the cleaner never finds out."""
    import ray

    if ray.is_initialized():
        check_placement(cfg, needs, shared)
        yield
        return
    c = cfg.cluster
    address = cluster_address(cfg)
    env_vars = {k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "TOWERREC_", "HF_"))}
    env_vars.setdefault("WANDB_MODE", os.environ.get("WANDB_MODE", cfg.logger.wandb.mode))
    kwargs: dict = dict(include_dashboard=c.include_dashboard, log_to_driver=True, runtime_env={"env_vars": env_vars})
    if not address:
        # Ray Train's watcher for nodes being drained (spot preemption) has nothing to watch on a
        # Ray of this machine alone; it would cost every Train run another actor process.
        env_vars.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"))
    if not address and (state_api or c.include_dashboard):
        # Ray's state API clients find the server through the cluster's GCS, which they detect by
        # looking for GCS processes on the machine: with more than one Ray running here they fail.
        port = free_loopback_port()
        kwargs |= dict(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port)
        env_vars["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    if address:
        log.info("ray: joining the cluster at %s", address)
        context = ray.init(address=address, **kwargs)
    else:
        context = ray.init(num_cpus=c.num_cpus or local_cpus(cfg), **kwargs)
        log.info("ray: started an embedded local Ray with %s CPUs", ray.cluster_resources().get("CPU"))
    try:
        announce(address, getattr(context, "dashboard_url", None))
        check_placement(cfg, needs, shared)
        yield
    finally:
        ray.shutdown()


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_folders(cfg: DictConfig, storage: str) -> dict[str, str]:
    """What every node of a training job reads or writes, with the config key that sets it:
    Ray Train's storage, the data, the outputs."""
    folders = {str(cfg.paths.outputs_root): "paths.outputs_root", str(cfg.paths.data_dir): "paths.data_dir"}
    folders[storage] = "cluster.storage_path" if cfg.cluster.storage_path else "paths.outputs_root"
    return folders


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def describe_nodes(nodes: list[dict]) -> str:
    return (
        ", ".join(f"{n.get('NodeManagerAddress')} ({n['NodeID'][:8]}) {n['Resources'].get('CPU', 0):g} CPU/{n['Resources'].get('GPU', 0):g} GPU" for n in nodes)
        or "none"
    )


def announce(address: str | None, dashboard_url: str | None) -> None:
    nodes = alive_nodes()
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    where = f"the Ray cluster at {address}" if address else "an embedded local Ray"
    dashboard = f"; dashboard http://{dashboard_url}" if dashboard_url else ""
    say("ray: %s, %d node(s), %g CPU, %g GPU%s", where, len(nodes), cpus, gpus, dashboard)


def fits_on(node_resources: dict, needs: Needs) -> int:
    """How many of ``needs``' bundles one node holds (by its total resources, not what is free now:
    a busy cluster is worth waiting for, a too-small one is not)."""
    fit = math.inf
    if needs.cpus > 0:
        fit = min(fit, math.floor(node_resources.get("CPU", 0) / needs.cpus + 1e-9))
    if needs.gpus > 0:
        fit = min(fit, math.floor(node_resources.get("GPU", 0) / needs.gpus + 1e-9))
    return needs.count if fit == math.inf else int(fit)


def check_placement(cfg: DictConfig, needs: Needs | None, shared: Mapping[str, str] | None = None) -> None:
    """Raise :class:`PlacementError` naming the shortfall when the cluster can never place ``needs``
    (skipped with ``cluster.check_resources=false``, e.g. for an autoscaling cluster), and, on a
    cluster, when a node cannot write one of the ``shared`` folders."""
    if needs is None and not shared:
        return
    nodes = alive_nodes()
    address = cluster_address(cfg)
    where = f"the Ray cluster at {address}" if address else "the embedded local Ray"
    if needs is not None and cfg.cluster.check_resources:
        total_gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
        if needs.gpus > 0 and total_gpus == 0:
            raise PlacementError(
                f"{needs.what}s need {needs.gpus:g} GPU each ({needs.keys}), but {where} has no GPU "
                f"(nodes: {describe_nodes(nodes)}). Use hardware=cpu, or add GPU nodes."
            )
        placed = sum(fits_on(n["Resources"], needs) for n in nodes)
        if placed < needs.count:
            per = f"{needs.cpus:g} CPU" + (f" + {needs.gpus:g} GPU" if needs.gpus else "")
            raise PlacementError(
                f"{needs.count} {needs.what}(s) of {per} each ({needs.keys}) do not fit on {where}: "
                f"its nodes hold {placed} (nodes: {describe_nodes(nodes)}). Lower the count or the "
                f"per-worker resources, or add nodes; cluster.check_resources=false waits for an autoscaler instead."
            )
    if address and shared:
        probe_shared_folders(nodes, shared)


def _filesystem(folder: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(folder) if "://" in folder else (pafs.LocalFileSystem(), folder)


def probe_shared_folders(nodes: list[dict], folders: Mapping[str, str]) -> None:
    """Check that every node shares each folder with the driver (local paths or URIs such as
    s3://): the driver writes a marker file, each node must read it back and write a file of its
    own. :class:`PlacementError` names the node and the folder that failed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    markers = {}
    try:
        for folder, key in folders.items():  # noqa: B007 (the error below names the key being probed)
            fs, path = _filesystem(folder)
            fs.create_dir(path, recursive=True)
            marker = f"{path.rstrip('/')}/.towerrec-probe-{token}"
            with fs.open_output_stream(marker) as out:
                out.write(token.encode())
            markers[folder] = marker
    except Exception as e:
        remove_markers(markers)
        raise PlacementError(f"{key}={folder}: the job's driver cannot write there: {type(e).__name__}: {e}") from e

    @ray.remote(num_cpus=0, max_retries=0)
    def probe(markers: dict[str, str], token: str) -> list[tuple[str, str]]:
        failures = []
        for folder, marker in markers.items():
            try:
                fs, _ = _filesystem(folder)
                try:
                    with fs.open_input_stream(marker) as f:
                        seen = f.read().decode()
                except FileNotFoundError:
                    seen = None
                if seen != token:
                    failures.append((folder, f"does not see {folder}: a file the driver wrote there is not visible, so it is not shared storage"))
                    continue
                mine = f"{marker}-{uuid.uuid4().hex}"
                with fs.open_output_stream(mine) as out:
                    out.write(b"ok")
                fs.delete_file(mine)
            except Exception as e:  # noqa: BLE001 - reported to the driver with the folder's name
                failures.append((folder, f"cannot write {folder}: {type(e).__name__}: {e}"))
        return failures

    try:
        refs = {
            f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                markers, token
            )
            for n in nodes
        }
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        problems = []
        for node, ref in refs.items():
            if ref in pending:
                problems.append(f"node {node}: no answer within {PROBE_TIMEOUT_S:.0f} s")
                continue
            try:
                problems += [f"node {node} {failure} ({folders[folder]})" for folder, failure in ray.get(ref)]
            except Exception as e:  # noqa: BLE001 - a node that cannot even run the probe
                problems.append(f"node {node}: the probe failed: {e}")
    finally:
        remove_markers(markers)
    if problems:
        raise PlacementError(
            "shared storage: cluster.storage_path and paths.root_dir must be on storage that every node mounts "
            "(or an s3:// style URI):\n  " + "\n  ".join(problems)
        )


def remove_markers(markers: dict[str, str]) -> None:
    for folder, marker in markers.items():
        fs, _ = _filesystem(folder)
        fs.delete_file(marker)
