"""Runs named MovieLens-100K recipes (rows of bench/ml100k_ablations.yaml) over seeds through
``python -m jobs.pipeline`` and tabulates the test metrics, mean and spread over seeds.

Every run is an ordinary pipeline run in its own outputs folder, so each row's figures can be
reproduced from its command alone. Runs already finished (a metrics.json in their folder) are
read, not rerun; ``--jobs 2`` runs two at a time (each with half of the cores).

  python bench/ml100k_ablations.py --rows ours id_only --seeds 0 1 2
  python bench/ml100k_ablations.py --rows all --seeds 0 --table docs/ablations_table.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("ndcg@10", "recall@10", "mrr@10", "coverage@10", "diversity@10")
# every run: no batch inference, no dashboards; --launcher local also drops Ray (the same
# training loop in one process, for quick ablations)
COMMON = ["pipeline.batch_infer=false", "logger=none", "trainer.enable_progress_bar=false"]
LOCAL = ["launcher=local", "strategy=auto"]


def load_rows(path: Path) -> dict[str, dict]:
    rows = yaml.safe_load(path.read_text())
    for name, row in rows.items():
        if not isinstance(row, dict) or "overrides" not in row:
            raise ValueError(f"{path}: row '{name}' needs 'overrides' (a list of Hydra overrides)")
    return rows


def command(row: dict, seed: int, out: Path, threads: int, launcher: str = "local") -> list[str]:
    extra = LOCAL if launcher == "local" else [f"hardware.cpus_per_worker={threads}"]
    extra = extra + [f"hardware.torch_threads={threads}"]
    return [sys.executable, "-m", "jobs.pipeline", "experiment=ml100k", *row["overrides"], f"seed={seed}", *COMMON, *extra, f"paths.outputs_root={out}"]


def finetune_commands(row: dict, seed: int, out: Path, threads: int, pretrain_dir: Path) -> list[list[str]]:
    """A fine-tuning-only row: jobs.finetune from another row's pretraining stage, then jobs.evaluate."""
    common = [f"seed={seed}", "logger=none", "trainer.enable_progress_bar=false", *LOCAL, f"hardware.torch_threads={threads}", f"paths.outputs_root={out}"]
    fin = [
        sys.executable,
        "-m",
        "jobs.finetune",
        "experiment=ml100k",
        *row["overrides"],
        f"init_from={pretrain_dir}",
        *common,
        f"paths.output_dir={out}/finetune",
    ]
    ev = [sys.executable, "-m", "jobs.evaluate", "experiment=ml100k", f"checkpoint={out}/finetune", *common, f"paths.output_dir={out}/evaluate"]
    return [fin, ev]


def run_one(name: str, row: dict, seed: int, out_root: Path, threads: int, launcher: str) -> dict[str, float]:
    out = out_root / name / f"seed{seed}"
    result = out / "metrics.json"
    if result.is_file():
        return json.loads(result.read_text())
    earlier = sorted(out.glob("pipeline/*/*/metrics.json"))  # a finished run of an older version of this script
    if earlier and "wall_seconds" in (m := json.loads(earlier[-1].read_text())):
        result.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        return m
    if "pretrain_of" in row:  # reuse the pretraining stage of another row's run (same seed)
        found = sorted((out_root / row["pretrain_of"] / f"seed{seed}").glob("pipeline/*/*/pretrain"))
        if not found:
            raise RuntimeError(f"{name}: run row '{row['pretrain_of']}' seed {seed} first (its pretraining stage is the starting point)")
        cmds = finetune_commands(row, seed, out, threads, found[-1])
    else:
        cmds = [command(row, seed, out, threads, launcher)]
    out.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with open(out / "run.log", "w") as log:
        for cmd in cmds:
            log.write("$ " + shlex.join(cmd[1:]) + "\n")
            log.flush()
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
            if rc:
                raise RuntimeError(f"{name} seed {seed}: {cmd[2]} failed (exit {rc}); see {out / 'run.log'}")
    if "pretrain_of" in row:
        metrics = {f"{job}/{k}": v for job in ("finetune", "evaluate") for k, v in json.loads((out / job / "metrics.json").read_text()).items()}
    else:
        metrics = json.loads(sorted(out.glob("pipeline/*/*/metrics.json"))[-1].read_text())
    metrics["wall_seconds"] = time.perf_counter() - start
    result.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    print(f"{name} seed {seed}: test ndcg@10 {metrics['evaluate/test/ndcg@10']:.4f} ({metrics['wall_seconds']:.0f} s)", flush=True)
    return metrics


def cell(values: list[float], digits: int = 4) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def train_seconds(m: dict[str, float]) -> float:
    return m.get("pretrain/train/seconds", 0.0) + m.get("finetune/train/seconds", 0.0)


def table(results: dict[str, list[dict[str, float]]], rows: dict[str, dict], prefix: str = "evaluate/test/") -> str:
    head = "| row | seeds | " + " | ".join(f"test {m}" for m in METRICS) + " | valid ndcg@10 | train s | overrides of `experiment=ml100k` |"
    lines = [head, "|---" * (len(METRICS) + 5) + "|"]
    for name, runs in results.items():
        cols = [cell([r[prefix + m] for r in runs]) for m in METRICS]
        valid = cell([r["evaluate/valid/ndcg@10"] for r in runs])
        secs = cell([train_seconds(r) for r in runs], 0)
        over = " ".join(rows[name]["overrides"]) or "(none)"
        if "pretrain_of" in rows[name]:
            over = f"jobs.finetune {over} init_from=<pretrain stage of row {rows[name]['pretrain_of']}>"
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cols) + f" | {valid} | {secs} | `{over}` |")
    return "\n".join(lines)


def cold_table(results: dict[str, list[dict[str, float]]]) -> str:
    """Rows that held items out of training: test users whose item is cold vs warm."""
    lines = [
        "| row | seeds | users cold / warm | cold ndcg@10 | cold recall@10 | warm ndcg@10 | warm recall@10 | popularity cold ndcg@10 | popularity warm ndcg@10 |",
        "|---" * 9 + "|",
    ]
    for name, runs in results.items():
        if "evaluate/test_cold/ndcg@10" not in runs[0]:
            continue
        users = f"{runs[0]['evaluate/test_cold/num_users']:.0f} / {runs[0]['evaluate/test_warm/num_users']:.0f}"
        cols = [
            cell([r[f"evaluate/{p}test_{kind}/{m}"] for r in runs])
            for p, kind, m in (
                ("", "cold", "ndcg@10"),
                ("", "cold", "recall@10"),
                ("", "warm", "ndcg@10"),
                ("", "warm", "recall@10"),
                ("popularity/", "cold", "ndcg@10"),
                ("popularity/", "warm", "ndcg@10"),
            )
        ]
        lines.append(f"| {name} | {len(runs)} | {users} | " + " | ".join(cols) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", default=["all"], help="row names of the YAML file, or 'all'")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--file", type=Path, default=ROOT / "bench" / "ml100k_ablations.yaml")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "ablations")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time")
    p.add_argument("--launcher", choices=["local", "ray"], default="local", help="ray: the README's way (embedded Ray); local: one process")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--table", type=Path, help="also write the markdown table here")
    p.add_argument("--print-commands", action="store_true", help="print each run's command and exit")
    args = p.parse_args()
    rows = load_rows(args.file)
    names = list(rows) if args.rows == ["all"] else args.rows
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"{args.file}: no row named {unknown}; rows: {list(rows)}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    out = args.out.resolve()
    if args.print_commands:
        for n in names:
            for s in args.seeds:
                if "pretrain_of" in rows[n]:
                    pre = out / rows[n]["pretrain_of"] / f"seed{s}" / "pipeline" / "<date>" / "<time>" / "pretrain"
                    for c in finetune_commands(rows[n], s, out / n / f"seed{s}", threads, pre):
                        print("python " + shlex.join(c[1:]))
                    continue
                print(
                    shlex.join(command(rows[n], s, out / n / f"seed{s}", threads, args.launcher)[1:]).replace("-m jobs.pipeline", "python -m jobs.pipeline", 1)
                )
        return
    jobs = [(n, s) for n in names for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda job: run_one(job[0], rows[job[0]], job[1], out, threads, args.launcher), jobs))
    results: dict[str, list[dict[str, float]]] = {}
    for (n, _), m in zip(jobs, done):
        results.setdefault(n, []).append(m)
    text = table(results, rows)
    cold = cold_table(results)
    if cold:
        text += "\n\n" + cold
    print(text)
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
