"""How the cost grows with the data, the catalog and the users: every stage at growing sizes.

    python bench/scale.py                         # the default run (under 45 minutes on 2 cores)
    python bench/scale.py --stages data index     # some stages
    python bench/scale.py --quick --out /tmp/s    # tiny sizes, a minute or two (tests use it)

Stages (each size measured in a fresh process, so each peak RSS is that size's own):

- ``data`` (bench/scale_data.py): synthetic interactions at 1 M, 5 M and 20 M rows: generation,
  preparation to Parquet, the leave-one-out split, datamodule start-up.
- ``train`` (bench/scale_train.py): sampled-softmax fine-tuning steps with catalogs of 10 k,
  100 k and 1 M items on 1 and 2 Ray workers; validation by full ranking, per user.
- ``infer`` (bench/scale_infer.py): batch inference for 100 k and 1 M users over 100 k and 1 M
  items, in process and through Ray Data with 1 and 2 actors.
- ``index`` (bench/scale_index.py): FAISS exact against IVF, HNSW and IVF-PQ at 100 k and 1 M items.
- ``cluster`` (bench/scale_cluster.py): the sharded path on a real two-node Ray cluster on this
  machine at 5 M, 20 M and 100 M interactions (1 M items): preparation on Ray Data, one training
  epoch on 2 workers (one per node), sharded batch inference; the peak USS and PSS of every
  process by role, the rows each node handled, and the slope of USS against size.

For every (stage, step) measured at two sizes or more it fits the slope of log(seconds) and of
log(peak RSS) against log(size) and compares it with the slope the step should have (1 for work
proportional to the size; 0 for a training step, whose cost must not depend on the catalog).
Writes ``scale.json`` and ``scale_growth.png`` into ``--out`` (default docs/) and, unless
``--quick``, replaces the "Scale" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_common import say  # noqa: E402

STAGES = ("data", "train", "infer", "index", "cluster")
BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
# the slope a step should have against its size; steps not named here should grow linearly
EXPECTED_SLOPE = {("train", "step_1_worker"): 0.0, ("train", "step_2_workers"): 0.0}
SLOPE_TOLERANCE = 0.25


def run_stage(stage: str, out_dir: Path, quick: bool) -> list[dict]:
    """The rows of one stage (its module's ``run_stage`` with its default or quick sizes)."""
    module = __import__(f"scale_{stage}")
    folder = out_dir / stage
    folder.mkdir(parents=True, exist_ok=True)
    return module.run_stage(out_dir=folder, quick=quick)


def slopes(rows: list[dict]) -> list[dict]:
    """Least-squares slope of log(seconds) and log(peak RSS) against log(size) per (stage, step)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r.get("growth", True):
            groups.setdefault((r["stage"], r["step"]), []).append(r)
    out = []
    for (stage, step), group in groups.items():
        sizes = np.array([r["size"] for r in group], dtype=np.float64)
        if len(np.unique(sizes)) < 2:
            continue
        x = np.log(sizes)
        time_slope = float(np.polyfit(x, np.log([max(r["seconds"], 1e-9) for r in group]), 1)[0])
        memory_slope = float(np.polyfit(x, np.log([r["peak_rss_mb"] for r in group]), 1)[0])
        expected = EXPECTED_SLOPE.get((stage, step), 1.0)
        out.append(
            {
                "stage": stage,
                "step": step,
                "unit": group[0]["unit"],
                "sizes": sorted({int(s) for s in sizes}),
                "time_slope": time_slope,
                "memory_slope": memory_slope,
                "expected": expected,
                "within": time_slope <= expected + SLOPE_TOLERANCE,
            }
        )
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Log-log time and peak RSS against size, one panel pair per stage, one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in STAGES if any(r["stage"] == s and r.get("growth", True) for r in rows)]
    fig, axes = plt.subplots(len(stages), 2, figsize=(12, 3.6 * len(stages)), squeeze=False)
    for (ax_t, ax_m), stage in zip(axes, stages):
        steps: dict[str, list[dict]] = {}
        for r in rows:
            if r["stage"] == stage and r.get("growth", True):
                steps.setdefault(r["step"], []).append(r)
        for step, group in steps.items():
            group = sorted(group, key=lambda r: r["size"])
            sizes = [r["size"] for r in group]
            ax_t.plot(sizes, [r["seconds"] for r in group], marker="o", label=step)
            ax_m.plot(sizes, [r["peak_rss_mb"] / 1024 for r in group], marker="o", label=step)
        unit = next(r["unit"] for r in rows if r["stage"] == stage)
        for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS, GiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(unit)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{stage}: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: float) -> str:
    return f"{value:,.3g}" if value < 100 else f"{value:,.0f}"


def markdown(rows: list[dict], fitted: list[dict], runs: dict, out: str) -> str:
    lines = ["| stage | command | date | CPUs | minutes |", "|---|---|---|---|---|"]
    lines += [f"| {stage} | `{r['command']}` | {r['date']} | {r['cpus']} ({r['machine']}) | {r['minutes']:.1f} |" for stage, r in runs.items()]
    lines += [
        "",
        f"Raw rows: `{out}/scale.json`; plots: `{out}/scale_growth.png`.",
        "",
        "### Growth",
        "",
        "| stage | step | sizes | slope of log time | slope of log peak RSS | expected time slope | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in fitted:
        sizes = ", ".join(f"{s:,}" for s in f["sizes"])
        lines.append(
            f"| {f['stage']} | {f['step']} | {sizes} {f['unit']} | {f['time_slope']:.2f} | {f['memory_slope']:.2f} | {f['expected']:.0f} | {'yes' if f['within'] else '**no**'} |"
        )
    lines += ["", "### Measurements", "", "| stage | step | size | seconds | peak RSS MiB | also |", "|---|---|---|---|---|---|"]
    skip = {"stage", "step", "size", "unit", "seconds", "peak_rss_mb", "growth"}
    for r in rows:
        if "setting" in r or r["stage"] == "cluster":
            continue  # the index's settings and the cluster's roles have their own tables
        also = ", ".join(f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r.items() if k not in skip)
        lines.append(f"| {r['stage']} | {r['step']} | {r['size']:,} {r['unit']} | {_fmt(r['seconds'])} | {r['peak_rss_mb']:,.0f} | {also} |")
    cluster_rows = [r for r in rows if r["stage"] == "cluster"]
    if cluster_rows:
        import scale_cluster

        lines += ["", "### Cluster: memory per process and role", "", scale_cluster.table(cluster_rows)]
    index_rows = [r for r in rows if r["stage"] == "index" and not r.get("growth", True)]
    if index_rows:
        import scale_index

        lines += ["", "### Retrieval index settings", "", index_rows[0].get("source", ""), "", scale_index.table(index_rows)]
    return "\n".join(lines) + "\n"


def write_section(doc: Path, body: str) -> None:
    """Replace the text between the scale markers of ``doc`` (appended when missing)."""
    text = doc.read_text()
    block = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def merge(previous: Path, rows: list[dict], runs: dict) -> tuple[list[dict], dict]:
    """The rows and runs of ``previous`` (a scale.json) for the stages not run now, with this
    run's: ``--stages index`` refreshes the index rows and keeps the rest, each stage saying
    which run measured it."""
    if not previous.is_file():
        return rows, runs
    old = json.loads(previous.read_text())
    kept = [r for r in old["rows"] if r["stage"] not in runs]
    merged_runs = {stage: r for stage, r in old.get("runs", {}).items() if stage not in runs} | runs
    order = {stage: i for i, stage in enumerate(STAGES)}
    return sorted(kept + rows, key=lambda r: order[r["stage"]]), dict(sorted(merged_runs.items(), key=lambda kv: order[kv[0]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every stage runs, measures nothing useful")
    parser.add_argument("--out", type=Path, default=None, help="where scale.json and scale_growth.png go (default docs/; --quick: required)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for the stages' files (default: a temporary folder)")
    args = parser.parse_args()
    if args.quick and args.out is None:
        parser.error("--quick needs --out (quick figures do not belong in docs/)")
    out = args.out or ROOT / "docs"
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/scale.py" + (" --stages " + " ".join(args.stages) if args.stages != list(STAGES) else "") + (" --quick" if args.quick else "")
    rows: list[dict] = []
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="scale-", dir=args.work) as work:
        for stage in args.stages:
            say(f"== stage {stage}")
            t0 = time.perf_counter()
            rows += run_stage(stage, Path(work), args.quick)
            minutes = (time.perf_counter() - t0) / 60
            runs[stage] = {"command": command, "date": date.today().isoformat(), "cpus": os.cpu_count(), "machine": platform.machine(), "minutes": minutes}
            say(f"== stage {stage}: {minutes * 60:.0f} s")
    if not args.quick:  # a run of some stages keeps the other stages' rows of the last run
        rows, runs = merge(out / "scale.json", rows, runs)
    fitted = slopes(rows)
    (out / "scale.json").write_text(json.dumps({"runs": runs, "slopes": fitted, "rows": rows}, indent=1, default=str) + "\n")
    plot(rows, out / "scale_growth.png")
    body = markdown(rows, fitted, runs, os.path.relpath(out, ROOT))
    if not args.quick:
        write_section(ROOT / "docs" / "benchmarks.md", body)
    print(body)


if __name__ == "__main__":
    main()
