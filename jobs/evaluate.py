"""``python -m jobs.evaluate checkpoint=<run folder | model.ckpt | latest>``: full-ranking test metrics.

Writes metrics.json (model and most-popular baseline, valid and test), test_split.parquet
and test_recommendations.parquet (top 50 from the history before the held-out item).
"""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import DictConfig

from datamodules.sequence_datamodule import SequenceDataModule
from jobs.assembly import build_datamodule, build_model
from jobs.config_schema import register, validate
from jobs.run_folder import create_run_folder, pin_hydra_output_dir, resolve_model_checkpoint, run_log_file, write_metrics
from jobs.tracking import log_job_result
from jobs.training import load_model_checkpoint, restore_config
from lightning_modules.full_ranking import model_scorer, popularity_scorer, rank_batches
from lightning_modules.ranking_metrics import category_matrix

log = logging.getLogger(__name__)


def write_test_files(run_dir: Path, dm: SequenceDataModule, lists: torch.Tensor, scores: torch.Tensor) -> None:
    """test_split.parquet and test_recommendations.parquet with raw ids (DESIGN.md section 4)."""
    users = dm.user_ids[dm.user_index]
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


def evaluate_checkpoint(ckpt_path: Path, run_dir: Path, keep: int = 50) -> dict[str, float]:
    """Rank valid and test items for every user with the checkpoint's model and the popularity baseline."""
    payload = load_model_checkpoint(ckpt_path)
    train_cfg = restore_config(payload["config"])
    dm = build_datamodule(train_cfg)
    model = build_model(train_cfg, dm)
    model.load_state_dict(payload["state_dict"])
    model.eval()
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


def run(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        ckpt = resolve_model_checkpoint(cfg.checkpoint, cfg.paths.outputs_root, "finetune", cfg.experiment_name)
        log.info("evaluate: %s -> %s", ckpt, run_dir)
        metrics = evaluate_checkpoint(ckpt, run_dir, cfg.eval_batches_keep)
        write_metrics(run_dir, metrics)
        log_job_result(cfg, run_dir, metrics, {"test_recommendations": run_dir / "test_recommendations.parquet"})
        log.info("test ndcg@10 %.4f (popularity %.4f)", metrics["test/ndcg@10"], metrics["popularity/test/ndcg@10"])
    return metrics


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run(pin_hydra_output_dir(cfg))


if __name__ == "__main__":
    main()
