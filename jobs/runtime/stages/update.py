"""``jobs.update``: an incremental fine-tune from what the service logged since a bundle was made.

From the parent bundle and the log records after its consumed offset: the catalog grows by the
new items (the item tower's trained rows kept, new id rows start at zero), each user's history
gains its events, and a fine-tuning stage (the usual local / Ray Train launch, strategies and
hardware) starts from the parent's weights on the users with new events plus a replay sample
of the others (``update.replay_fraction``, against forgetting). The result is a new bundle with
the next model version and its lineage (parent, log offsets consumed).

The run folder is named after the parent and the offsets, so running the update twice on the
same log is a no-op, and a run killed midway leaves no bundle (and the served one untouched);
the next run finishes the job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from datamodules.parquet_dataset import write_raw_parquet
from inference.bundle import MANIFEST, Catalog, UserTable, load_bundle, read_manifest, save_bundle
from jobs.runtime.config.run_folder import BUNDLE_DIR, find_latest_run, resolve_bundle, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.tracking.console import say
from jobs.runtime.training.checkpoints import restore_config
from jobs.runtime.training.stage_job import run_stage_job
from serving.event_log import FORGET, read_log, state_file, user_hash

log = logging.getLogger(__name__)


def state_dir_of(cfg: DictConfig, key: str) -> Path:
    value = OmegaConf.select(cfg, key)
    return Path(value) if value else Path(cfg.paths.outputs_root).resolve() / "serve" / "state"


def parent_bundle(cfg: DictConfig) -> Path:
    """``update.bundle``; 'latest' prefers the newest update of the experiment over its fine-tunes."""
    if cfg["update"].bundle == "latest":
        for job in ("update", "finetune"):
            try:
                return find_latest_run(cfg.paths.outputs_root, job, cfg.experiment_name) / BUNDLE_DIR
            except FileNotFoundError:
                continue
    return resolve_bundle(cfg["update"].bundle, cfg.paths.outputs_root, "finetune", cfg.experiment_name, key="update.bundle")


def update_data(parent, records: list[dict], replay_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, list[str]], Catalog]:
    """(interactions to train on, items, every user's full history, the grown catalog)."""
    cat = parent.catalog
    new_items = []
    known = set(str(i) for i in cat.item_ids)
    for r in records:
        if r["kind"] == "item" and r["item_id"] not in known:
            known.add(r["item_id"])
            new_items.append(r)
    item_ids = [str(i) for i in cat.item_ids] + [r["item_id"] for r in new_items]
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "text": list(cat.texts) + [r["text"] for r in new_items],
            "title": list(cat.titles) + [r.get("title") or r["text"][:80] for r in new_items],
            "categories": [list(c) for c in cat.categories] + [list(r.get("categories") or []) for r in new_items],
        }
    )
    histories = {str(u): [item_ids[i] for i in h] for u, h in zip(parent.users.user_ids, parent.users.histories)}
    active: set[str] = set()
    by_hash = {user_hash(u): u for u in histories} if any(r["kind"] == FORGET for r in records) else {}
    for r in records:  # in log order: a user forgotten, then back, starts again from nothing
        if r["kind"] == "event":
            histories.setdefault(r["user_id"], []).append(r["item_id"])
            active.add(r["user_id"])
        elif r["kind"] == FORGET:
            forgotten = by_hash.get(r["user_hash"])  # their logged events were erased at the forget
            if forgotten is not None:
                histories.pop(forgotten, None)
                active.discard(forgotten)
    rng = np.random.default_rng(seed)
    chosen = [u for u in histories if u in active or rng.random() < replay_fraction]
    users, items_col, stamps = [], [], []
    for u in chosen:
        h = histories[u]
        users += [u] * len(h)
        items_col += h
        stamps += list(range(len(h)))
    interactions = pd.DataFrame({"user_id": users, "item_id": items_col, "timestamp": np.asarray(stamps, dtype=np.int64)})
    counts = pd.Series(items_col).value_counts()
    catalog = Catalog(
        item_ids=np.asarray(item_ids, dtype=object),
        titles=list(items["title"]),
        texts=list(items["text"]),
        categories=list(items["categories"]),
        train_counts=np.asarray([float(counts.get(i, 0)) for i in item_ids]),
        cold=np.zeros(len(item_ids), dtype=bool),
    )
    return interactions, items, histories, catalog


def run_update(cfg: DictConfig) -> dict[str, float]:
    """``jobs.update``: see the module docstring."""
    validate(cfg)
    start_time = time.perf_counter()
    parent_path = parent_bundle(cfg).resolve()
    manifest = read_manifest(parent_path)
    state_dir = state_dir_of(cfg, "update.state_dir")
    start = int(manifest.get("lineage", {}).get("log_offset_consumed", 0))
    records = list(read_log(state_dir, start))
    events = sum(r["kind"] == "event" for r in records)
    items = sum(r["kind"] == "item" for r in records)
    forgets = sum(r["kind"] == FORGET for r in records)  # a forgotten user must leave the bundle: reason enough to update
    result: dict[str, object] = {"bundle": str(parent_path), "noop": True, "parent": str(parent_path)}
    if events < cfg["update"].min_events and not items and not forgets:
        say(
            "update: %d new event(s) in %s since offset %d (update.min_events=%d): nothing to do; %s stays",
            events,
            state_file(state_dir),
            start,
            cfg["update"].min_events,
            parent_path,
        )
        _write_result(cfg, result)
        return {"update/noop": 1.0}
    end = records[-1]["offset"] + 1
    key = hashlib.sha256((parent_path / MANIFEST).read_bytes()).hexdigest()[:10]
    version = int(manifest["model_version"]) + 1
    run_dir = Path(cfg.paths.outputs_root).resolve() / "update" / f"{cfg.experiment_name}-v{version}-{key}-{start}-{end}"
    if (run_dir / BUNDLE_DIR / MANIFEST).is_file():
        say("update: offsets %d..%d of %s were already consumed into %s; nothing to do", start, end - 1, state_file(state_dir), run_dir / BUNDLE_DIR)
        _write_result(cfg, result | {"bundle": str(run_dir / BUNDLE_DIR)})
        return {"update/noop": 1.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.paths.output_dir = str(run_dir)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    with run_log_file(run_dir):
        say(
            "update: model version %d from %s with log offsets %d..%d (%d events, %d new items); logs in %s",
            version,
            parent_path,
            start,
            end - 1,
            events,
            items,
            run_dir / "run.log",
        )
        parent = load_bundle(parent_path)
        interactions, item_frame, histories, catalog = update_data(parent, records, cfg["update"].replay_fraction, cfg.seed)
        write_raw_parquet(run_dir / "raw", interactions, item_frame)
        train_cfg = stage_config(cfg, parent, parent_path, run_dir)
        shutil.rmtree(run_dir / "train" / BUNDLE_DIR, ignore_errors=True)  # left by a run killed after training
        metrics = run_stage_job(train_cfg, "finetune")
        trained = load_bundle(run_dir / "train" / BUNDLE_DIR)
        index = {str(i): n for n, i in enumerate(catalog.item_ids)}
        if list(trained.catalog.item_ids) != list(catalog.item_ids):
            raise RuntimeError(f"{run_dir / 'train'}: the trained catalog's items differ from the grown catalog")
        catalog.token_ids, catalog.attention_mask = trained.catalog.token_ids, trained.catalog.attention_mask
        users = UserTable(np.asarray(list(histories), dtype=object), [np.asarray([index[i] for i in h], dtype=np.int64) for h in histories.values()])
        lineage = {
            "parent": {"path": str(parent_path), "model_version": parent.model_version},
            "log": str(state_file(state_dir)),
            "log_offset_start": start,
            "log_offset_consumed": end,
            "events": events,
            "new_items": items,
            "forgotten_users": forgets,
            "init_from": str(parent_path),
        }
        save_bundle(
            run_dir / BUNDLE_DIR,
            trained.model,
            catalog,
            users,
            trained.config,
            max_seq_len=trained.max_seq_len,
            stage="update",
            model_version=version,
            parent=lineage["parent"],
            lineage=lineage,
            metrics=metrics,
            tokenizer=parent.load_tokenizer(),
        )
        shutil.rmtree(run_dir / "train" / BUNDLE_DIR)  # the same weights are in the update's bundle
        seconds = time.perf_counter() - start_time
        out = {
            **{f"train/{k}" if not k.startswith(("val/", "train/")) else k: v for k, v in metrics.items()},
            "update/seconds": seconds,
            "update/events": float(events),
            "update/forgotten_users": float(forgets),
            "update/new_items": float(items),
            "update/model_version": float(version),
            "update/noop": 0.0,
        }
        write_metrics(run_dir, out)
        say(
            "update: model version %d written to %s in %.0f s (val/ndcg@10 %.4f)",
            version,
            run_dir / BUNDLE_DIR,
            seconds,
            metrics.get("val/ndcg@10", float("nan")),
        )
    _write_result(cfg, result | {"bundle": str(run_dir / BUNDLE_DIR), "noop": False, "seconds": seconds})
    return out


def stage_config(cfg: DictConfig, parent, parent_path: Path, run_dir: Path) -> DictConfig:
    """The parent's training config, fine-tuning on the update's data with this job's launch settings."""
    train = restore_config(parent.config)
    train.job = "finetune"
    train.seed = cfg.seed
    train.init_from = str(parent_path)
    train.run_name = None
    train.data.name = "update"
    train.data.reader = {"_target_": "datamodules.parquet_dataset.read_raw_parquet", "folder": str(run_dir / "raw"), "name": "update"}
    train.data.cold_start.num_items = 0
    train.finetune.max_epochs = cfg["update"].max_epochs
    train.finetune.lr = cfg["update"].lr
    for section in ("launcher", "strategy", "hardware", "cluster", "logger", "debug", "verbose"):
        train[section] = cfg[section]
    train.trainer.enable_progress_bar = cfg.trainer.enable_progress_bar
    train.paths = OmegaConf.merge(train.paths, {k: str(cfg.paths[k]) for k in ("root_dir", "cache_dir", "outputs_root")})
    train.paths.data_dir = str(run_dir / "data")
    train.paths.output_dir = str(run_dir / "train")
    return train


def _write_result(cfg: DictConfig, result: dict) -> None:
    if cfg["update"].result_file:
        path = Path(cfg["update"].result_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(result) + "\n")
        tmp.replace(path)
