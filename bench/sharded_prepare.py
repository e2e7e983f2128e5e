"""Preparation on one process against preparation on Ray Data, and the catalog tokenised per
process against tokens made once and memory-mapped, on the same input in one run.

    python bench/sharded_prepare.py [--interactions 2000000] [--items 100000] [--buckets 4]

Each preparation runs in a fresh process, so its peak is its own: the driver's ``ru_maxrss`` and
its unique memory (USS, sampled every 0.2 s; RSS also counts the pages of Ray's shared object
store that the driver touches). Ray Data's worker processes are not counted: the point is what
the driver must hold. Prints a
Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_uss(stop: threading.Event, peak: list[float]) -> None:
    """The driver's unique memory (USS: pages no other process shares, so the object store's
    shared memory that Ray maps into the driver is left out), sampled every 0.2 s."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.2):
        peak[0] = max(peak[0], me.memory_full_info().uss / 2**30)


def child(kind: str, raw: str, out: str, buckets: int) -> None:
    import resource

    from datamodules.parquet_dataset import ParquetFolder

    source = ParquetFolder(raw, "bench")
    stop, uss = threading.Event(), [0.0]
    sampler = threading.Thread(target=_peak_uss, args=(stop, uss), daemon=True)
    sampler.start()
    start = time.perf_counter()
    if kind == "local":
        from datamodules.preprocess import prepare

        prepared = prepare(source.read(), out)
    else:
        import ray

        from datamodules.sharded_prepare import prepare_sharded

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=2 << 30)
        prepared = prepare_sharded(source, out, num_buckets=buckets)
        ray.shutdown()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"kind": kind, "seconds": seconds, "driver_peak_gb": peak, "driver_uss_gb": uss[0], "users": prepared.num_users}))


def tokens(folder: str) -> dict:
    import pyarrow.parquet as pq

    from jobs.runtime.config.catalog_tokens import catalog_tokens
    from lightning_modules.hf_backbones import load_tokenizer
    from lightning_modules.item_tower import tokenize_catalog

    texts = pq.read_table(Path(folder) / "items.parquet", columns=["text"])["text"].to_pylist()
    start = time.perf_counter()
    tokenize_catalog(load_tokenizer("minilm"), texts, 32)
    per_process = time.perf_counter() - start
    start = time.perf_counter()
    catalog_tokens(folder, "minilm", 32, texts)  # the driver, once
    once = time.perf_counter() - start
    start = time.perf_counter()
    ids, mask = catalog_tokens(folder, "minilm", 32)  # every later process
    int(ids.sum()) + int(mask.sum())  # touch every page
    mapped = time.perf_counter() - start
    return {"items": len(texts), "tokenise_s": per_process, "make_once_s": once, "map_s": mapped}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--interactions", type=int, default=2_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, raw, out, buckets = args.child
        child(kind, raw, out, int(buckets))
        return
    from datamodules.parquet_dataset import write_raw_parquet
    from datamodules.synthetic import generate_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        users = args.interactions // 20
        raw = generate_synthetic(num_users=users, num_items=args.items, num_topics=50, min_len=10, max_len=30, seed=0)
        write_raw_parquet(Path(tmp) / "raw", raw.interactions, raw.items)
        rows = {}
        for kind in ("local", "ray"):
            proc = subprocess.run(
                [sys.executable, __file__, "--child", kind, str(Path(tmp) / "raw"), str(Path(tmp) / kind), str(args.buckets)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            rows[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        tok = tokens(str(Path(tmp) / "local"))
    n = len(raw.interactions)
    print(f"{n:,} interactions, {rows['local']['users']:,} users, {args.items:,} items; Ray Data: {args.buckets} buckets, 2 CPUs")
    print("| preparation | seconds | driver peak RSS (ru_maxrss) | driver peak USS (sampled) |\n|---|---:|---:|---:|")
    for kind in ("local", "ray"):
        r = rows[kind]
        print(f"| {kind} | {r['seconds']:.1f} | {r['driver_peak_gb']:.2f} GB | {r['driver_uss_gb']:.2f} GB |")
    ray_, local = rows["ray"], rows["local"]
    print(
        f"ratio ray/local: {ray_['seconds'] / local['seconds']:.2f}x time, {ray_['driver_peak_gb'] / local['driver_peak_gb']:.2f}x peak RSS, "
        f"{ray_['driver_uss_gb'] / local['driver_uss_gb']:.2f}x peak USS"
    )
    print(
        f"catalog of {tok['items']:,} items: tokenised in {tok['tokenise_s']:.1f} s (what each process paid), made once in {tok['make_once_s']:.1f} s, "
        f"then mapped in {tok['map_s']:.3f} s ({tok['tokenise_s'] / tok['map_s']:.0f}x less)"
    )


if __name__ == "__main__":
    main()
