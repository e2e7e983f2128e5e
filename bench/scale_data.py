"""Stage ``data`` of bench/scale.py: how the data path's cost grows with the number of interactions.

    python bench/scale_data.py                      # 1 M, 5 M and 20 M interactions
    python bench/scale_data.py --rows 1000000 5000000 --out-dir /tmp/scale_data
    python bench/scale_data.py --quick              # 20 k and 80 k: a check that it runs

For each size, synthetic data with ``rows / 20`` users (20 interactions each on average, 10 to 30)
and as many items as users, at most 1 M: at 20 M interactions, 1 M users and 1 M items. Four
steps, each in a fresh process so its peak RSS is its own:

- ``generate``: ``generate_synthetic`` (then the raw data is written to Parquet, untimed, for the
  next steps);
- ``prepare``: ``prepare`` on the raw data read back from Parquet (dense ids, dedupe, short users,
  the split, four Parquet files);
- ``split``: the leave-one-out split alone, on the prepared interactions;
- ``datamodule``: ``SequenceDataModule.setup()`` and the training windows (``TrainSequences``).

The peak RSS of a step includes the interpreter and its imports (torch for the datamodule) and the
data the step reads. Each size's files are deleted once it is measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from scale_common import in_fresh_process, row, say  # noqa: E402

DEFAULT_ROWS = (1_000_000, 5_000_000, 20_000_000)
QUICK_ROWS = (20_000, 80_000)
ROWS_PER_USER = 20
MAX_ITEMS = 1_000_000
MAX_SEQ_LEN = 50


def shape(rows: int) -> tuple[int, int]:
    """(users, items) for about ``rows`` interactions."""
    users = max(rows // ROWS_PER_USER, 10)
    return users, max(min(users, MAX_ITEMS), 12)


def generate_step(rows: int, folder: str, seed: int = 0) -> dict:
    """Time the generator; write its data to ``folder``/raw for the next steps."""
    from datamodules.parquet_dataset import write_raw_parquet
    from datamodules.synthetic import generate_synthetic

    users, items = shape(rows)
    start = time.perf_counter()
    raw = generate_synthetic(num_users=users, num_items=items, min_len=ROWS_PER_USER // 2, max_len=ROWS_PER_USER * 3 // 2, seed=seed)
    seconds = time.perf_counter() - start
    write_raw_parquet(Path(folder) / "raw", raw.interactions, raw.items)
    return {"seconds": seconds, "rows": len(raw.interactions), "users": users, "items": items}


def prepare_step(folder: str) -> dict:
    """Time ``prepare`` on the raw data (read before the clock starts)."""
    from datamodules.parquet_dataset import read_raw_parquet
    from datamodules.preprocess import prepare

    raw = read_raw_parquet(str(Path(folder) / "raw"), name="synthetic")
    start = time.perf_counter()
    prepared = prepare(raw, Path(folder) / "prepared")
    return {"seconds": time.perf_counter() - start, "prepared_rows": prepared.num_interactions}


def split_step(folder: str) -> dict:
    """Time the leave-one-out split alone on the prepared interactions."""
    import pandas as pd

    from datamodules.leave_one_out import leave_one_out_split

    inter = pd.read_parquet(Path(folder) / "prepared" / "interactions.parquet", columns=["user_idx", "item_idx", "timestamp", "order"])
    start = time.perf_counter()
    split = leave_one_out_split(inter)
    return {"seconds": time.perf_counter() - start, "split_rows": len(split)}


def datamodule_step(folder: str) -> dict:
    """Time the datamodule's start-up: reading the prepared files, the split check, the
    sequences and the training windows."""
    from datamodules.sequence_datamodule import SequenceDataModule

    start = time.perf_counter()
    dm = SequenceDataModule(Path(folder) / "prepared", max_seq_len=MAX_SEQ_LEN)
    dm.setup()
    windows = len(dm.train_dataloader().dataset)
    return {"seconds": time.perf_counter() - start, "windows": windows}


def run_stage(rows: list[int] | tuple[int, ...] = DEFAULT_ROWS, out_dir: Path | None = None, quick: bool = False, seed: int = 0) -> list[dict]:
    """One row per (step, size) in bench/scale_common.py's format; ``quick`` runs QUICK_ROWS."""
    sizes = QUICK_ROWS if quick else tuple(rows)
    own_base = out_dir is None
    base = Path(tempfile.mkdtemp(prefix="scale_data_")) if own_base else Path(out_dir)
    results: list[dict] = []
    for size in sizes:
        folder = base / f"rows_{size}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            gen, rss = in_fresh_process(generate_step, size, str(folder), seed)
            users, items, n = gen["users"], gen["items"], gen["rows"]
            say(f"data: {n:,} interactions ({users:,} users, {items:,} items): generate {gen['seconds']:.1f} s, {rss:,.0f} MiB")
            results.append(row("data", "generate", n, "interactions", gen["seconds"], rss, users=users, items=items, target_rows=size))
            for step, fn in (("prepare", prepare_step), ("split", split_step), ("datamodule", datamodule_step)):
                out, rss = in_fresh_process(fn, str(folder))
                seconds = out.pop("seconds")
                say(f"data: {n:,} interactions: {step} {seconds:.1f} s, {rss:,.0f} MiB")
                results.append(row("data", step, n, "interactions", seconds, rss, users=users, items=items, target_rows=size, **out))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    if own_base:
        shutil.rmtree(base, ignore_errors=True)
    return results


def table(rows: list[dict]) -> str:
    lines = ["| interactions | users | items | step | seconds | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']:,} | {r['users']:,} | {r['items']:,} | {r['step']} | {r['seconds']:.2f} | {r['peak_rss_mb']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=list(DEFAULT_ROWS), help="interactions per size")
    parser.add_argument("--out-dir", type=Path, default=None, help="where each size's files go while it is measured (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_ROWS} only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(table(run_stage(args.rows, args.out_dir, args.quick, args.seed)))


if __name__ == "__main__":
    main()
