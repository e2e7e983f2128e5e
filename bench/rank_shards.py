"""What one training worker holds of the data, with and without ``data.shard_by_rank``.

For each size: synthetic interactions prepared once (``datamodules.preprocess.prepare``), then two
torch.distributed ranks (gloo, spawned processes) set up the training datamodule as a Ray Train
worker does and draw one epoch of training windows: first as without it (``all``: every rank
reads every user), then sharded (each rank its own users). Each rank samples its own USS every
10 ms (psutil) and reports its peak above its USS after the imports (the data's share), and the
interaction rows it read. Slopes are fitted on log-log over the sizes.

    python bench/rank_shards.py --interactions 2000000 8000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_rank(rank: int, port: int, folder: str, sharded: bool, out: str) -> None:
    """One rank: its USS after the imports (the baseline), then its peak USS, sampled every 10 ms
    by a thread of its own, while it sets up the datamodule and draws an epoch of windows."""
    import psutil
    import torch.distributed as dist

    from datamodules.sequence_datamodule import SequenceDataModule

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    me = psutil.Process()
    baseline = me.memory_full_info().uss / 2**20
    peak, stop = [baseline], threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], me.memory_full_info().uss / 2**20)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    dm = SequenceDataModule(folder, max_seq_len=50, batch_size=64, rank=rank if sharded else 0, world_size=2 if sharded else 1)
    dm.setup()
    loader = dm.train_dataloader()
    windows = sum(1 for _ in loader.sampler)
    seconds = time.perf_counter() - started
    time.sleep(0.05)
    stop.set()
    thread.join()
    line = {
        "rows_read": dm.shard["rows_read"],
        "windows": windows,
        "setup_s": round(seconds, 2),
        "baseline_uss_mib": round(baseline, 1),
        "peak_uss_mib": round(peak[0], 1),
    }
    Path(out, f"rank-{rank}.json").write_text(json.dumps(line | {"data_uss_mib": round(peak[0] - baseline, 1)}))
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(folder: Path, sharded: bool) -> list[dict]:
    import torch.multiprocessing as mp

    from jobs.runtime.config.ray_cluster import free_loopback_port

    out = Path(tempfile.mkdtemp(prefix="rank-shards-"))
    mp.start_processes(one_rank, args=(free_loopback_port(), str(folder), sharded, str(out)), nprocs=2, join=True, start_method="spawn")
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0]) if len(xs) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interactions", type=int, nargs="+", default=[2_000_000, 8_000_000])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--out", default=str(ROOT / "docs" / "rank_shards.json"))
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from datamodules.preprocess import prepare
    from datamodules.synthetic import generate_synthetic

    rows = []
    work = Path(tempfile.mkdtemp(prefix="rank-shards-data-"))
    for n in args.interactions:
        raw = generate_synthetic(num_users=n // 40, num_items=args.items, num_topics=50, min_len=20, max_len=60, seed=0)
        prepared = prepare(raw, work / str(n))
        del raw
        for mode in ("all", "sharded"):
            ranks = run_ranks(prepared.folder, mode == "sharded")
            row = {"interactions": prepared.num_interactions, "users": prepared.num_users, "mode": mode, "ranks": ranks}
            rows.append(row)
            print(
                f"{prepared.num_interactions:>11,} interactions  {mode:<8}"
                + "".join(
                    f"  rank {r}: {x['rows_read']:>10,} rows, data USS {x['data_uss_mib']:>7,.0f} MiB (peak {x['peak_uss_mib']:,.0f}), {x['setup_s']:.1f} s"
                    for r, x in enumerate(ranks)
                ),
                flush=True,
            )
    summary = {}
    for mode in ("all", "sharded"):
        mine = [r for r in rows if r["mode"] == mode]
        xs = [r["interactions"] for r in mine]
        data = [max(x["data_uss_mib"] for x in r["ranks"]) for r in mine]
        peak = [max(x["peak_uss_mib"] for x in r["ranks"]) for r in mine]
        # slopes of log memory against log interactions: of the data's USS (above the imports) and of the whole process's
        summary[mode] = {"data_uss_slope": round(slope(xs, data), 3), "peak_uss_slope": round(slope(xs, peak), 3), "data_uss_mib": data}
    summary["ratio_sharded_to_all"] = [round(s / a, 3) for s, a in zip(summary["sharded"]["data_uss_mib"], summary["all"]["data_uss_mib"], strict=True)]
    print(json.dumps(summary, indent=2))
    Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
