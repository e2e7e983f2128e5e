"""Stage ``infer`` of bench/scale.py: batch inference (jobs.batch_infer) at growing users x items.

    python bench/scale_infer.py                      # 100k x 100k, 100k x 1M, 1M x 1M (about 20 min on 2 cores)
    python bench/scale_infer.py --configs 20000x20000 --paths local ray1 ray2
    python bench/scale_infer.py --quick              # a few thousand users and items, under a minute

For each configuration (users x items) it writes a model bundle once (synthetic data from
``datamodules.synthetic.generate_synthetic`` + ``datamodules.preprocess.prepare``, and the tiny
two-tower model of conf/model/tiny.yaml with fresh, UNTRAINED weights: the cost of inference does
not depend on what the weights are), then runs ``jobs.runtime.stages.batch_inference.batch_infer`` on
it, top-100, ``infer.index.kind=auto``, once per path: in this process (``infer.use_ray=false``)
and on Ray Data with 1 and 2 actors, each in a fresh process. A row gives the users/s of the
whole job (load, embed, index, search, write) and its seconds per phase. Peak RSS is the
driver's; Ray's actors are separate processes and not counted in it.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from scale_common import in_fresh_process, row, say  # noqa: E402

TOP_K = 100
DEFAULT_CONFIGS = [(100_000, 100_000), (100_000, 1_000_000), (1_000_000, 1_000_000)]
QUICK_CONFIGS = [(2_000, 3_000)]
PATHS = ("local", "ray1", "ray2", "sharded2")  # sharded2: infer.sharded=true on 2 actors
# inference's Ray processes: actor classes and the index's tasks
ACTORS = ("CatalogEmbedder", "UserEmbedder", "CatalogPart", "UserPart", "train_index_file", "add_index_shard", "join_text_file")
# the tiny model of conf/model/tiny.yaml and the synthetic data's shape (histories of 5..15 items)
TINY_MODEL = {"dim": 32, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "max_text_tokens": 24, "n_layer": 2, "n_head": 2}
HISTORY = {"min_len": 5, "max_len": 15}
MAX_SEQ_LEN = 20


def synthetic_histories(num_users: int, num_items: int, seed: int) -> tuple[list[str], list[str], list[str], list[np.ndarray], list[str]]:
    """Item ids, texts, topics, each user's whole history (item indices, oldest first) and user ids,
    from the synthetic generator prepared as every job reads data."""
    import pandas as pd
    import pyarrow.parquet as pq

    from datamodules.preprocess import prepare
    from datamodules.synthetic import generate_synthetic

    raw = generate_synthetic(num_users=num_users, num_items=num_items, num_topics=max(1, min(100, num_items // 10)), seed=seed, **HISTORY)
    with tempfile.TemporaryDirectory() as tmp:
        prepare(raw, tmp)
        items = pq.read_table(Path(tmp) / "items.parquet", columns=["item_id", "text", "categories"])
        users = pq.read_table(Path(tmp) / "users.parquet", columns=["user_id"])["user_id"].to_pylist()
        split = pq.read_table(Path(tmp) / "split.parquet", columns=["user_idx", "item_idx", "position"]).to_pandas()
    split = split.sort_values(["user_idx", "position"], kind="mergesort")
    values = split["item_idx"].to_numpy(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(split["user_idx"].to_numpy(), minlength=len(users)))])
    histories = np.split(values, offsets[1:-1])
    topics = [c[0] if len(c) else "" for c in items["categories"].to_pylist()]
    del pd
    return items["item_id"].to_pylist(), items["text"].to_pylist(), topics, histories, users


def write_bundle(folder: Path, item_ids: list[str], texts: list[str], topics: list[str], histories: list[np.ndarray], user_ids: list[str]) -> Path:
    """A bundle of the tiny two-tower model (fresh weights) over this catalog and these users."""
    import torch

    from inference.bundle import Catalog, UserTable, save_bundle
    from lightning_modules.hf_backbones import build_bert_encoder, build_gpt2, load_tokenizer
    from lightning_modules.item_tower import ItemTower, tokenize_catalog
    from lightning_modules.two_tower_model import TwoTowerModel
    from lightning_modules.user_tower import UserTower

    torch.manual_seed(0)
    m = TINY_MODEL
    tokenizer = load_tokenizer("minilm")
    encoder = build_bert_encoder(None, tokenizer.vocab_size, m["hidden"], m["layers"], m["heads"], m["intermediate"], 0.1)
    tokens, mask = tokenize_catalog(tokenizer, texts, m["max_text_tokens"])
    n = len(item_ids)
    item_tower = ItemTower(n, m["dim"], encoder, tokens, mask, freeze_encoder=False)
    model = TwoTowerModel(item_tower, UserTower(build_gpt2(m["n_layer"], m["n_head"], m["dim"], MAX_SEQ_LEN, 0.1), m["dim"]))
    catalog = Catalog(
        item_ids=np.asarray(item_ids, dtype=object),
        titles=list(texts),
        texts=list(texts),
        categories=[[t] for t in topics],
        train_counts=np.bincount(np.concatenate(histories), minlength=n).astype(np.float64),
        cold=np.zeros(n, dtype=bool),
        token_ids=tokens.numpy(),
        attention_mask=mask.numpy(),
    )
    users = UserTable(np.asarray(user_ids, dtype=object), histories)
    return save_bundle(folder, model, catalog, users, {"bench": "scale_infer", "untrained": True}, max_seq_len=MAX_SEQ_LEN, stage="bench", tokenizer=tokenizer)


def build_bundle(folder: Path, num_users: int, num_items: int, seed: int = 0) -> dict:
    """Write the bundle of one configuration (in its own process: see ``run_stage``); returns the
    seconds it took to make the data and to write the bundle."""
    t0 = time.perf_counter()
    item_ids, texts, topics, histories, user_ids = synthetic_histories(num_users, num_items, seed)
    t1 = time.perf_counter()
    write_bundle(folder, item_ids, texts, topics, histories, user_ids)
    return {"data_s": t1 - t0, "bundle_s": time.perf_counter() - t1, "users": len(user_ids), "interactions": int(sum(len(h) for h in histories))}


def infer_config(root: Path, path: str, batch_size: int):
    """The batch_infer config of one path: ``local`` (in process), ``ray1`` / ``ray2`` (Ray Data
    actors, everything gathered on the driver), ``sharded2`` (``infer.sharded=true``, 2 actors)."""
    from hydra import compose, initialize_config_dir

    from jobs.runtime.config.schema import register

    register()
    actors = path.removeprefix("ray").removeprefix("sharded") if path != "local" else "1"
    ray = [f"infer.use_ray={path != 'local'}", f"infer.sharded={path.startswith('sharded')}", f"infer.num_actors={actors}", "cluster.include_dashboard=false"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name="batch_infer",
            overrides=[
                f"paths.root_dir={root}",
                "experiment=tiny",
                "logger=none",
                f"infer.top_k={TOP_K}",
                "infer.index.kind=auto",
                f"infer.batch_size={batch_size}",
                *ray,
            ],
        )


def _sample_memory(stop, peaks: dict[str, float]) -> None:
    """Every 0.5 s: this process's USS, and the summed USS and PSS of inference's Ray processes
    (descendants of this process whose title names an actor class of ACTORS). USS leaves out pages
    shared with another process (a file both map, Ray's object store); PSS counts each shared page
    in equal parts, so the PSS sum is what the actors cost the node together."""
    import psutil

    me = psutil.Process()
    while not stop.wait(0.5):
        peaks["driver_uss"] = max(peaks["driver_uss"], me.memory_full_info().uss / 2**20)
        uss = pss = 0.0
        for child in me.children(recursive=True):
            try:
                if any(name in " ".join(child.cmdline()) for name in ACTORS):
                    info = child.memory_full_info()
                    uss, pss = uss + info.uss / 2**20, pss + info.pss / 2**20
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peaks["actors_uss"], peaks["actors_pss"] = max(peaks["actors_uss"], uss), max(peaks["actors_pss"], pss)


def measure(bundle: Path, path: str, run_dir: Path, batch_size: int) -> dict[str, float]:
    """One batch inference (the job's library function, what ``jobs.batch_infer`` runs) on ``path``,
    with the peak memory of the driver and of the actors sampled (``_sample_memory``)."""
    import os
    import threading

    os.environ.setdefault("RAY_DASHBOARD_ENABLED", "0")
    os.environ.setdefault("WANDB_MODE", "disabled")
    logging.basicConfig(level=logging.WARNING)
    from jobs.runtime.stages.batch_inference import batch_infer, index_choice

    cfg = infer_config(run_dir, path, batch_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    stop, peaks = threading.Event(), {"driver_uss": 0.0, "actors_uss": 0.0, "actors_pss": 0.0}
    sampler = threading.Thread(target=_sample_memory, args=(stop, peaks), daemon=True)
    sampler.start()
    try:
        metrics = batch_infer(cfg, bundle, run_dir)
    finally:
        stop.set()
        sampler.join()
    metrics["index"] = index_choice(cfg, int(metrics["infer/num_items"])).kind
    return metrics | {f"mem_{k}": v for k, v in peaks.items()}


PHASES = {
    "load": "load",
    "ray_start": "ray_start",
    "embed_items": "embed_items_wall",
    "embed_users": "embed_users_wall",
    "build_index": "build_index",
    "search": "search",
    "write": "write",
}
# sharded: the catalog and users stages each embed and write in their actors, users' search included
# (search and write: summed over the actors)
SHARDED_PHASES = PHASES | {"embed_items": "items_stage", "build_index": "index_stage", "embed_users": "users_stage"}


def run_stage(
    configs: list[tuple[int, int]] | None = None,
    out_dir: Path = ROOT / "outputs" / "bench_scale",
    quick: bool = False,
    paths: tuple[str, ...] = PATHS,
    big_paths: tuple[str, ...] = PATHS,
    big_users: int = 1_000_000,
    batch_size: int = 2048,
) -> list[dict]:
    """Rows of stage ``infer``: for each (users, items) configuration, each path's seconds and users/s.
    Configurations with at least ``big_users`` users run only ``big_paths`` (all by default; fewer
    to save time: the search, the longest phase there, is the same on every path)."""
    configs = configs or (QUICK_CONFIGS if quick else DEFAULT_CONFIGS)
    if quick:  # each Ray path starts Ray and two actor pools (15-30 s on 2 busy cores): one of them shows it runs
        paths = tuple(p for p in paths if p != "ray1")
    out_dir = Path(out_dir) / "infer"
    rows: list[dict] = []
    for users, items in configs:
        folder = out_dir / f"bundle_u{users}_i{items}"
        if (folder / "manifest.json").is_file():
            say(f"infer: {users:,} users x {items:,} items: bundle {folder} (made earlier)")
        else:
            made, rss = in_fresh_process(build_bundle, folder, users, items)
            say(
                f"infer: {users:,} users x {items:,} items: data {made['data_s']:.0f} s, bundle {made['bundle_s']:.0f} s ({made['interactions']:,} interactions, peak {rss:,.0f} MiB); untrained tiny model"
            )
        for path in paths if users < big_users else [p for p in paths if p in big_paths]:
            metrics, rss = in_fresh_process(measure, folder, path, out_dir / f"run_u{users}_i{items}_{path}", batch_size)
            n_users = int(metrics["infer/num_users"])
            seconds = metrics["infer/seconds_total"]
            names = SHARDED_PHASES if path.startswith("sharded") else PHASES
            phases = {name: round(metrics[f"infer/seconds_{key}"], 3) for name, key in names.items()}
            # one step per path and catalog, so that a step's slope is against users at a fixed catalog
            rows.append(
                row(
                    "infer",
                    f"{path}_{_label(items)}_items",
                    n_users,
                    "users",
                    seconds,
                    rss,
                    path=path,
                    items=int(metrics["infer/num_items"]),
                    users_per_s=n_users / seconds,
                    index=metrics["index"],
                    top_k=TOP_K,
                    untrained=True,
                    phases=phases,
                    driver_uss_mb=metrics["mem_driver_uss"],
                    actors_uss_mb=metrics["mem_actors_uss"],
                    actors_pss_mb=metrics["mem_actors_pss"],
                )
            )
            shutil.rmtree(out_dir / f"run_u{users}_i{items}_{path}", ignore_errors=True)  # a 1 M-user run writes about 1 GB
            say(
                f"  {path:8s} {seconds:7.1f} s  {n_users / seconds:9,.0f} users/s  index {metrics['index']}  driver peak {rss:,.0f} MiB "
                f"(USS {metrics['mem_driver_uss']:,.0f})  actors USS {metrics['mem_actors_uss']:,.0f} PSS {metrics['mem_actors_pss']:,.0f} MiB  "
                + "  ".join(f"{k} {v:.1f}" for k, v in phases.items())
            )
    return rows


def _label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def table(rows: list[dict]) -> str:
    lines = [
        "| users | items | path | index | seconds | users/s | load | ray start | embed items | embed users | build index | search | write | driver peak MiB | driver USS | actors USS | actors PSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r["phases"]
        lines.append(
            f"| {r['size']:,} | {r['items']:,} | {r['path']} | {r['index']} | {r['seconds']:.1f} | {r['users_per_s']:,.0f} | "
            + " | ".join(f"{p[k]:.1f}" for k in PHASES)
            + f" | {r['peak_rss_mb']:,.0f} | {r['driver_uss_mb']:,.0f} | {r['actors_uss_mb']:,.0f} | {r['actors_pss_mb']:,.0f} |"
        )
    return "\n".join(lines)


def _config(text: str) -> tuple[int, int]:
    users, _, items = text.lower().partition("x")
    return int(users), int(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", type=_config, default=None, help="USERSxITEMS, e.g. 100000x1000000")
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--quick", action="store_true", help="a few thousand users and items")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_scale")
    args = parser.parse_args()
    rows = run_stage(args.configs, args.out, args.quick, tuple(args.paths))
    print("Tiny two-tower model with UNTRAINED weights (inference speed does not depend on training); top-100, infer.index.kind=auto.")
    print(table(rows))


if __name__ == "__main__":
    main()
