"""Full-ranking evaluation of a model bundle on the valid and test split of its dataset.

Writes metrics.json (model and most-popular baseline, valid and test), test_split.parquet
and test_recommendations.parquet (top 50 from the history before the held-out item).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig, OmegaConf

from datamodules.sequence_datamodule import SequenceDataModule
from inference.bundle import CATALOG, BundleError, ModelBundle, load_bundle
from jobs.runtime.config.assembly import build_datamodule
from jobs.runtime.config.run_folder import create_run_folder, resolve_bundle, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.tracking.console import say
from jobs.runtime.tracking.wandb_runs import log_job_result
from jobs.runtime.training.checkpoints import restore_config
from lightning_modules.full_ranking import model_scorer, popularity_scorer, rank_batches
from lightning_modules.ranking_metrics import category_matrix

log = logging.getLogger(__name__)


def write_test_files(run_dir: Path, dm: SequenceDataModule, lists: torch.Tensor, scores: torch.Tensor) -> None:
    """test_split.parquet and test_recommendations.parquet with raw ids (DESIGN.md section 4)."""
    users = dm.raw_user_ids()
    pq.write_table(pa.table({"user_id": users.astype(str), "item_id": dm.item_ids[dm.test_targets].astype(str)}), run_dir / "test_split.parquet")
    ids = dm.item_ids[lists.numpy()].astype(str)
    scores = scores.numpy().astype(np.float32)
    keep = np.isfinite(scores)  # seen items (and NaN scores) sit at -inf: never recommended
    table = pa.table(
        {
            "user_id": pa.array(users.astype(str)),
            "item_ids": pa.array([row[k] for row, k in zip(ids, keep)], type=pa.list_(pa.string())),
            "scores": pa.array([row[k] for row, k in zip(scores, keep)], type=pa.list_(pa.float32())),
        }
    )
    pq.write_table(table, run_dir / "test_recommendations.parquet")


def check_same_catalog(bundle: ModelBundle, dm: SequenceDataModule) -> None:
    """The bundle must score the dataset's own items, in the same order, with the same held-out ones."""
    path = bundle.path / CATALOG
    if len(bundle.catalog.item_ids) != dm.num_items or not np.array_equal(bundle.catalog.item_ids.astype(str), np.asarray(dm.item_ids).astype(str)):
        raise BundleError(path, f"its {bundle.catalog.num_items} items are not the {dm.num_items} items of {dm.data_dir / 'items.parquet'} in the same order")
    if not np.array_equal(bundle.catalog.cold, dm.cold_mask):
        raise BundleError(path, f"its cold-start items differ from those data.cold_start picks in {dm.data_dir}")


def evaluate_bundle(bundle_path: Path, run_dir: Path, keep: int = 50, paths: DictConfig | None = None) -> dict[str, float]:
    """Rank valid and test items for every user with the bundle's model and the popularity baseline.

    The dataset is the one the bundle was trained on, found under ``paths`` (this job's data
    and cache folders; by default those recorded in the bundle)."""
    bundle = load_bundle(bundle_path)
    train_cfg = restore_config(bundle.config)
    if paths is not None:
        train_cfg.paths.data_dir, train_cfg.paths.cache_dir = str(paths.data_dir), str(paths.cache_dir)
        if OmegaConf.select(train_cfg, "data.reader.cache_dir", default=None) is not None:
            train_cfg.data.reader.cache_dir = str(paths.cache_dir)
    dm = build_datamodule(train_cfg)
    check_same_catalog(bundle, dm)
    model = bundle.model
    ks = tuple(train_cfg.trainer.metrics_ks)
    cats = category_matrix(dm.item_categories)
    metrics: dict[str, float] = {}
    with torch.no_grad():
        scorer = model_scorer(model)
        for split in ("valid", "test"):
            acc = rank_batches(scorer, dm.eval_dataloader(split), dm.num_items, ks, cats, keep_lists=keep if split == "test" else 0)
            metrics.update({f"{split}/{k}": v for k, v in acc.compute().items()})
            if split == "test":
                lists, scores = acc.top_lists()
                write_test_files(run_dir, dm, lists[:, :keep], scores[:, :keep])
        pop = popularity_scorer(dm.item_train_counts)
        for split in ("valid", "test"):
            acc = rank_batches(pop, dm.eval_dataloader(split), dm.num_items, ks, cats)
            metrics.update({f"popularity/{split}/{k}": v for k, v in acc.compute().items()})
        if dm.cold_mask.any():  # test users whose item was held out of training vs the rest
            for kind in ("cold", "warm"):
                loader = dm.eval_dataloader("test", kind)
                for prefix, s in (("", scorer), ("popularity/", pop)):
                    acc = rank_batches(s, loader, dm.num_items, ks, cats)
                    metrics.update({f"{prefix}test_{kind}/{k}": v for k, v in acc.compute().items()})
                metrics[f"test_{kind}/num_users"] = float(len(loader.dataset))
            metrics["cold_items"] = float(dm.cold_mask.sum())
    metrics["test/num_users"] = float(len(dm.test_targets))
    return metrics


def run_evaluate(cfg: DictConfig) -> dict[str, float]:
    """``jobs.evaluate``: evaluate the bundle that ``checkpoint`` names."""
    validate(cfg)
    bundle = resolve_bundle(cfg.checkpoint, cfg.paths.outputs_root, "finetune", cfg.experiment_name)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        say("evaluate: full ranking with %s; logs in %s", bundle, run_dir / "run.log")
        metrics = evaluate_bundle(bundle, run_dir, cfg.eval_batches_keep, cfg.paths)
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"test_recommendations": run_dir / "test_recommendations.parquet"})
        say(
            "evaluate: test ndcg@10 %.4f, recall@10 %.4f (most popular: %.4f, %.4f) over %d users",
            metrics["test/ndcg@10"],
            metrics["test/recall@10"],
            metrics["popularity/test/ndcg@10"],
            metrics["popularity/test/recall@10"],
            metrics["test/num_users"],
        )
    return metrics
