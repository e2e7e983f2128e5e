"""Latency of the real-time service against request rate, on loopback, beside the in-process floor.

    python bench/serve_latency.py                      # the newest ml100k pipeline's bundle
    python bench/serve_latency.py --bundle outputs/pipeline/<date>/<time> --rates 50 100 200 400

Starts ``python -m jobs.serve`` on the bundle (127.0.0.1, a free port, a fresh state folder)
and drives it from this process, open loop: at each fixed rate, requests are sent on a fixed
schedule for ``--seconds`` seconds, and each latency is counted from its scheduled send time
(so queueing in the client or the server is included). Endpoints: /recommend for known users
(after one warm-up pass over them: their vectors are then cached until their next event),
/recommend with a fresh random history every time (every request runs the user tower), with
explain, with diversity 0.5, and /events (durable: fsync before the reply). Rates stop rising
for an endpoint once its p99 passes 50 ms. The floor is the bare in-process cost of one user
tower forward plus one index search, measured here on the same bundle. ``--ray`` also measures
/recommend through Ray Serve's proxy (one replica). Prints a markdown table, writes JSON and a
plot of p50/p99 against rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

P99_STOP_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def newest_bundle() -> Path:
    found = sorted((ROOT / "outputs" / "pipeline").glob("*/*/finetune/bundle/manifest.json"), key=lambda p: p.stat().st_mtime)
    found = [p.parent for p in found if json.loads((p.parent / "config.json").read_text()).get("experiment_name") == "ml100k"]
    if not found:
        raise SystemExit("no ml100k pipeline bundle under outputs/pipeline: run `make run` first, or pass --bundle")
    return found[-1]


def start_server(bundle: Path, state: Path, backend: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "jobs.serve",
        f"serve.bundle={bundle}",
        f"serve.port={port}",
        f"serve.state_dir={state}",
        f"serve.backend={backend}",
        "logger=none",
        f"paths.root_dir={state.parent}",
    ]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled"})
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the service did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


async def drive(url: str, path: str, bodies: list[dict], rate: float, seconds: float) -> dict[str, float]:
    """Open-loop load: request i is due at start + i / rate; latency counts from that moment."""
    import aiohttp

    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=512)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(i: int, due: float) -> None:
            nonlocal errors
            try:
                async with session.post(url + path, json=bodies[i % len(bodies)]) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
                return
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter() + 0.05
        tasks = []
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    latencies.sort()
    q = lambda p: 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else float("nan")  # noqa: E731
    return {
        "rate": rate,
        "sent": n,
        "ok": len(latencies),
        "errors": errors,
        "achieved_rps": len(latencies) / wall,
        "p50_ms": q(0.50),
        "p99_ms": q(0.99),
        "max_ms": q(1.0),
    }


def floor_ms(bundle: Path, users: list[str], repeats: int = 300) -> dict[str, float]:
    """In process: one user tower forward plus one index search, the part no server can avoid."""
    import numpy as np
    import torch

    from inference.bundle import load_bundle
    from inference.faiss_index import build_index, search_unseen

    b = load_bundle(bundle)
    with torch.no_grad():
        index = build_index(b.model.catalog_vectors().numpy(), "flat")
    times = []
    window = b.max_seq_len
    for i in range(repeats):
        hist = b.users.histories[b.users.index_of(users[i % len(users)])]
        items = torch.as_tensor(hist[-window:])[None]
        t0 = time.perf_counter()
        with torch.no_grad():
            u = b.model.user_vectors(items, torch.ones_like(items, dtype=torch.bool)).numpy()
        search_unseen(index, u, [np.asarray(hist)], 10)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(0.99 * len(times))]}


def run_endpoint(url: str, name: str, path: str, bodies: list[dict], rates: list[float], seconds: float) -> list[dict]:
    rows = []
    for rate in rates:
        row = asyncio.run(drive(url, path, bodies, rate, seconds)) | {"endpoint": name}
        rows.append(row)
        print(f"  {name:<22} {rate:>6.0f}/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}", flush=True)
        if row["p99_ms"] > P99_STOP_MS:
            break
    return rows


def plot(rows: list[dict], floor: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(r["endpoint"] for r in rows):
        rs = [r for r in rows if r["endpoint"] == name]
        (line,) = ax.plot([r["rate"] for r in rs], [r["p99_ms"] for r in rs], marker="o", label=f"{name} p99")
        ax.plot([r["rate"] for r in rs], [r["p50_ms"] for r in rs], marker=".", linestyle="--", color=line.get_color(), label=f"{name} p50")
    ax.axhline(floor["p50_ms"], color="gray", linestyle=":", label="in-process floor (p50)")
    ax.axhline(20, color="red", linewidth=0.8, label="target p99 (20 ms)")
    ax.set(xscale="log", yscale="log", xlabel="requests / s (open loop)", ylabel="latency (ms)", title="towerrec service latency on loopback (2 cores)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--rates", type=float, nargs="+", default=[50, 100, 200, 400, 800])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--ray", action="store_true", help="also measure /recommend through Ray Serve (one replica)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "serve_latency")
    args = ap.parse_args()
    from inference.bundle import bundle_folder, load_bundle

    bundle = bundle_folder(args.bundle) if args.bundle else newest_bundle()
    b = load_bundle(bundle)
    rng = random.Random(0)
    users = [str(u) for u in b.users.user_ids]
    items = [str(i) for i in b.catalog.item_ids]
    hist_rng = random.Random(1)
    fresh = [{"history": hist_rng.sample(items, hist_rng.randint(5, 50)), "k": 10} for _ in range(20_000)]
    endpoints = [
        ("recommend", "/recommend", [{"user_id": u, "k": 10} for u in users]),
        ("recommend (uncached)", "/recommend", fresh),
        ("recommend+explain", "/recommend", [{"user_id": u, "k": 10, "explain": True} for u in users]),
        ("recommend+diversity", "/recommend", [{"user_id": u, "k": 10, "diversity": 0.5} for u in users]),
        ("events", "/events", [{"user_id": f"bench-{rng.randrange(10_000)}", "item_id": rng.choice(items)} for _ in range(5000)]),
    ]
    floor = floor_ms(bundle, users)
    print(f"bundle {bundle}; floor (user tower + index search, in process): p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ["local"] + (["ray"] if args.ray else []):
            proc, url = start_server(bundle, Path(tmp) / backend / "state", backend)
            try:
                asyncio.run(drive(url, "/recommend", endpoints[0][2], 100, len(users) / 100))  # warm-up: every known user once
                for name, path, bodies in endpoints if backend == "local" else endpoints[:1]:
                    label = name if backend == "local" else f"{name} (Ray Serve)"
                    rows += run_endpoint(url, label, path, bodies, args.rates, args.seconds)
            finally:
                stop_server(proc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"bundle": str(bundle), "floor": floor, "rows": rows}, indent=1))
    plot(rows, floor, args.out.with_suffix(".png"))
    print("\n| endpoint | rate (req/s) | achieved | p50 ms | p99 ms | max ms | errors |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['endpoint']} | {r['rate']:.0f} | {r['achieved_rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {r['errors']} |")
    print(f"| floor: user tower + index search, in process | | | {floor['p50_ms']:.2f} | {floor['p99_ms']:.2f} | | |")
    print(f"\nwrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
