"""Mean and spread over seeds of ``jobs.replay`` runs (their metrics.json), as a markdown table.

    for s in 0 1 2; do python -m jobs.replay experiment=ml100k launcher=local strategy=auto logger=none \\
        seed=$s replay.update_every=2000 paths.output_dir=outputs/replay/ml100k-seed$s; done
    python bench/replay_seeds.py outputs/replay/ml100k-seed0 outputs/replay/ml100k-seed1 outputs/replay/ml100k-seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

COLUMNS = [
    ("ndcg@10", "NDCG@10"),
    ("recall@10", "Recall@10"),
    ("known_users/ndcg@10", "NDCG@10, users known at the cut"),
    ("known_users/recall@10", "Recall@10, users known at the cut"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    runs = {run: json.loads((run / "metrics.json").read_text()) for run in args.runs}
    variants = [v for v in ("frozen", "live", "updated") if all(f"{v}/ndcg@10" in m for m in runs.values())]
    print("| variant | " + " | ".join(name for _, name in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for v in variants:
        cells = []
        for key, _ in COLUMNS:
            values = [m[f"{v}/{key}"] for m in runs.values()]
            spread = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.4f} ± {spread:.4f} ({' / '.join(f'{x:.4f}' for x in values)})")
        print(f"| {v} | " + " | ".join(cells) + " |")
    if all("updated/ndcg@10" in m and "live/ndcg@10" in m for m in runs.values()):
        gains = [m["updated/ndcg@10"] - m["live/ndcg@10"] for m in runs.values()]
        print(f"\nupdated - live, NDCG@10 per seed: {' / '.join(f'{g:+.4f}' for g in gains)} (mean {statistics.mean(gains):+.4f})")
        seconds = [m["updated/update_seconds_mean"] for m in runs.values() if "updated/update_seconds_mean" in m]
        if seconds:
            print(f"seconds per update, mean per seed: {' / '.join(f'{s:.1f}' for s in seconds)}")


if __name__ == "__main__":
    main()
