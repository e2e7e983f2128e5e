"""Stage ``train`` of bench/scale.py: sampled-softmax fine-tuning as the catalog grows.

    python bench/scale_train.py                         # 10 k, 100 k, 1 M items; 1 and 2 Ray workers
    python bench/scale_train.py --items 10000 100000 --workers 1 --steps 40
    python bench/scale_train.py --quick                 # tiny catalogs, a few steps (a smoke test)

The measured path is the job's: ``jobs.finetune``'s config (experiment=tiny: a 2-layer BERT item
tower, frozen so every item's text encoding is computed once and cached, plus an id embedding;
a 2-layer GPT-2 user tower) composed with overrides, launched by the same Ray Train functions
(jobs/runtime/training/ray_fit.py: ``torch_trainer`` in a ``ray_session``; ddp on CPU workers), with the
run's ``debug.record_step_times`` callback timing each step. Only the model-bundle export that
``ray_fit`` does after training is left out: it is not training.

Synthetic data (datamodules.synthetic) with a fixed number of users, so only the catalog grows;
it is prepared once per catalog size (in its own process) and shared by the worker counts.

Rows (bench/scale_common.py), one fresh process per (catalog, workers):
- ``step_1_worker``, ``step_2_workers``: seconds per training step in the steady state (the steps after
  ``warmup``), with ``samples_per_s`` over all workers. It must not grow with the catalog.
- ``startup_1_worker``, ``startup_2_workers``: seconds from the launch to the end of the first step: Ray, data
  loading, tokenising the catalog and caching its text encodings (once per run).
- ``validate_full_ranking``: seconds per validated user of the full-ranking validation batches
  (every item scored, seen items removed), which grows with the catalog by nature;
  ``catalog_s`` is the catalog's vectors computed once per validation.
``peak_rss_mb`` is the largest peak RSS of a Ray Train worker (each records its own).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scale_common import in_fresh_process, row, say  # noqa: E402

STAGE = "train"
DEFAULT_ITEMS = (10_000, 100_000, 1_000_000)
DEFAULT_WORKERS = (1, 2)


def overrides(items: int, users: int, workers: int, steps: int, warmup: int, val_batches: int, root: Path, extra: tuple[str, ...] = ()) -> list[str]:
    """The fine-tuning job's config for one measurement (conf/finetune.yaml + experiment=tiny)."""
    return [
        "experiment=tiny",
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'runs' / f'items{items}-workers{workers}'}",
        "init_from=null",
        "launcher=ray",
        "strategy=ddp",
        "logger=none",
        f"hardware.num_workers={workers}",
        f"data.reader.num_items={items}",
        f"data.reader.num_users={users}",
        "model.item_tower.freeze_encoder=true",
        "finetune.max_epochs=1",
        f"trainer.limit_train_batches={warmup + steps}",
        f"trainer.limit_val_batches={val_batches}",
        "data.eval_batch_size=64",  # a batch scores 64 x N items: 256 MB at 1 M items (256 per batch: 1 GB and copies)
        "trainer.enable_progress_bar=false",
        "debug.record_step_times=true",
        *extra,
    ]


def compose(args: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from jobs.runtime.config.schema import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="finetune", overrides=args)


def fine_tune(runs: list[list[str]]) -> list[dict]:
    """Fine-tuning runs on Ray Train as ``jobs.finetune`` launches them, in one Ray session (its
    start-up paid once; each run gets new worker processes); returns, per run, the time its
    data was ready and its launch time, and every worker's step-time record."""
    import os

    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("RAY_DASHBOARD_ENABLED", "0")
    from jobs.runtime.config.ray_cluster import ray_session, shared_folders, train_needs
    from jobs.runtime.config.schema import validate

    cfgs = [compose(args) for args in runs]
    for cfg in cfgs:
        validate(cfg)
    widest = max(cfgs, key=lambda c: c.hardware.num_workers)
    with ray_session(widest, train_needs(widest), shared_folders(widest, storage_of(widest))):
        return [fine_tune_once(cfg) for cfg in cfgs]


def storage_of(cfg) -> str:
    from jobs.runtime.training.ray_fit import storage_of as job_storage

    return job_storage(cfg)


def fine_tune_once(cfg) -> dict:
    from jobs.runtime.config.assembly import prepare_data
    from jobs.runtime.config.run_folder import create_run_folder
    from jobs.runtime.training.ray_fit import run_name_of, torch_trainer

    # a run of the same name would resume from its checkpoint (jobs/runtime/training/ray_fit.py): start afresh
    name = run_name_of(cfg, Path(cfg.paths.output_dir))
    shutil.rmtree(Path(storage_of(cfg)) / name, ignore_errors=True)
    shutil.rmtree(cfg.paths.output_dir, ignore_errors=True)
    run_dir = create_run_folder(cfg)
    start = time.perf_counter()
    prepared = prepare_data(cfg)  # as the job does on the driver, once; reused by later runs
    data = {"seconds": time.perf_counter() - start, "users": prepared.num_users, "interactions": prepared.num_interactions}
    launched = time.time()
    result = torch_trainer(cfg, "finetune", run_dir, name, storage_of(cfg)).fit()
    if result.error:
        raise RuntimeError(f"bench/scale_train.py: the Ray Train run in {run_dir} failed") from result.error
    shutil.rmtree(Path(storage_of(cfg)) / name, ignore_errors=True)  # its checkpoints: not needed here
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "debug").glob("step_times-rank*.json"))]
    if len(records) != cfg.hardware.num_workers:
        raise RuntimeError(f"bench/scale_train.py: expected {cfg.hardware.num_workers} step-time records in {run_dir / 'debug'}, found {len(records)}")
    return {"launched": launched, "records": records, "data": data, "items": prepared.num_items, "workers": cfg.hardware.num_workers}


def summarise(result: dict, warmup: int) -> dict:
    """Steady-state seconds per step and samples/s (rank 0's clock; every rank steps together
    under ddp), start-up, and full-ranking validation cost per user."""
    records = result["records"]
    steps = records[0]["steps"]
    if len(steps) <= warmup + 1:
        raise RuntimeError(f"bench/scale_train.py: only {len(steps)} training steps were run, need more than warmup={warmup} + 1")
    steady = steps[warmup:]
    elapsed = steady[-1]["end"] - steady[0]["start"]
    samples = sum(sum(s["samples"] for s in r["steps"][warmup:]) for r in records)
    batches = [b for r in records for v in r["validations"] for b in v["batches"]]
    users = sum(b["users"] for b in batches)
    val_batch_s = max(sum(b["end"] - b["start"] for b in r["validations"][-1]["batches"]) for r in records)
    per_rank_users = users / len(records)
    catalog_s = max(r["validations"][-1]["batches"][0]["start"] - r["validations"][-1]["start"] for r in records)
    return {
        "step_s": elapsed / len(steady),
        "samples_per_s": samples / elapsed,
        "steps": len(steady),
        "startup_s": steps[0]["end"] - result["launched"],
        "first_step_s": steps[0]["end"] - steps[0]["start"],
        "validate_s_per_user": val_batch_s / per_rank_users,
        "validated_users": users,
        "catalog_s": catalog_s,
        "worker_peak_rss_mb": max(r["peak_rss_mb"] for r in records),
    }


def run_stage(
    items: tuple[int, ...] = DEFAULT_ITEMS,
    workers: tuple[int, ...] = DEFAULT_WORKERS,
    out_dir: Path = ROOT / "outputs" / "bench" / "scale_train",
    quick: bool = False,
    users: int = 20_000,
    steps: int = 60,
    warmup: int = 10,
    val_batches: int = 4,
    extra: tuple[str, ...] = (),
) -> list[dict]:
    """Rows of stage ``train`` for every catalog size and worker count (see the module's doc).
    ``extra``: more config overrides for every run (``key=value``)."""
    if quick:  # two tiny catalogs, one worker, small batches: the whole path in seconds
        items, workers, users, steps, warmup, val_batches = (300, 600), (1,), 300, 4, 2, 2
        extra = ("data.batch_size=16", "data.eval_batch_size=32", *extra)
    out_dir = Path(out_dir).resolve()
    # one process per catalog size (quick: one for all): its data prepared once, one Ray start
    groups = [list(items)] if quick else [[n] for n in items]
    rows: list[dict] = []
    for group in groups:
        runs = [overrides(n, users, w, steps, warmup, val_batches, out_dir, extra) for n in group for w in workers]
        results, driver_rss = in_fresh_process(fine_tune, runs)
        for result in results:
            rows += result_rows(result, warmup, workers[0], driver_rss)
    return rows


def result_rows(result: dict, warmup: int, first_workers: int, driver_rss: float) -> list[dict]:
    n, w, data = result["items"], result["workers"], result["data"]
    s = summarise(result, warmup)
    peak = s["worker_peak_rss_mb"]
    say(
        f"train: {n:,} items, {data['users']:,} users, {data['interactions']:,} interactions; {w} worker(s): {s['step_s']:.3f} s/step, "
        f"{s['samples_per_s']:.0f} samples/s; start-up {s['startup_s']:.0f} s; validation {1e3 * s['validate_s_per_user']:.2f} ms/user; worker peak {peak:.0f} MiB"
    )
    fields = dict(workers=w, driver_peak_rss_mb=driver_rss)
    workers = f"{w}_worker" + ("s" if w > 1 else "")
    out = [
        row(STAGE, f"step_{workers}", n, "items", s["step_s"], peak, samples_per_s=s["samples_per_s"], steps=s["steps"], **fields),
        row(STAGE, f"startup_{workers}", n, "items", s["startup_s"], peak, first_step_s=s["first_step_s"], **fields),
    ]
    if w == first_workers:
        out.append(
            row(STAGE, "validate_full_ranking", n, "items", s["validate_s_per_user"], peak, users=s["validated_users"], catalog_s=s["catalog_s"], **fields)
        )
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| step | items | seconds | samples/s | peak RSS MiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        rate = f"{r['samples_per_s']:.0f}" if "samples_per_s" in r else ""
        seconds = f"{r['seconds'] * 1e3:.2f} ms/user" if r["step"] == "validate_full_ranking" else f"{r['seconds']:.3f}"
        lines.append(f"| {r['step']} | {r['size']:,} | {seconds} | {rate} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=list(DEFAULT_ITEMS))
    parser.add_argument("--workers", type=int, nargs="+", default=list(DEFAULT_WORKERS))
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=60, help="measured steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench" / "scale_train")
    parser.add_argument("--quick", action="store_true", help="tiny catalogs and few steps (a smoke test)")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. model.item_tower.sparse_ids=false")
    args = parser.parse_args(argv)
    rows = run_stage(tuple(args.items), tuple(args.workers), args.out, args.quick, args.users, args.steps, args.warmup, extra=tuple(args.overrides))
    print(markdown(rows))
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
