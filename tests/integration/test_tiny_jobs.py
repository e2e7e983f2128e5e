"""The jobs end to end on tiny synthetic data: run folders, files of DESIGN.md section 4, accuracy."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from inference.bundle import read_manifest
from jobs import pipeline
from tests.conftest import ROOT, TINY


def recompute_ndcg10(run_dir: Path) -> float:
    truth = pd.read_parquet(run_dir / "test_split.parquet").set_index("user_id")["item_id"]
    recs = pd.read_parquet(run_dir / "test_recommendations.parquet")
    total = 0.0
    for user, items in zip(recs["user_id"], recs["item_ids"]):
        hits = np.flatnonzero(np.asarray(items[:10]) == truth[user])
        total += 1.0 / math.log2(hits[0] + 2) if hits.size else 0.0
    return total / len(recs)


def test_pipeline_writes_every_file_and_beats_popularity(tiny_cfg):
    cfg = tiny_cfg("pipeline", "pretrain.max_epochs=5", "finetune.max_epochs=5", "data.batch_size=16")
    metrics = pipeline.run(cfg)
    root = Path(cfg.paths.output_dir)
    for stage in ("pretrain", "finetune"):
        assert (root / stage / "config.yaml").is_file() and (root / stage / "run.log").is_file()
        assert json.loads((root / stage / "metrics.json").read_text())["val/ndcg@10"] > 0
        assert json.loads((root / stage / "bundle" / "config.json").read_text())["job"] == stage
        assert read_manifest(root / stage / "bundle")["stage"] == stage
    ev = root / "evaluate"
    saved = json.loads((ev / "metrics.json").read_text())
    assert saved["test/ndcg@10"] == metrics["evaluate/test/ndcg@10"]
    # planted structure: the model must beat most-popular by a clear margin
    assert saved["test/ndcg@10"] > 3 * saved["popularity/test/ndcg@10"]
    assert saved["test/ndcg@10"] - saved["popularity/test/ndcg@10"] > 0.1
    # anyone can recompute the metric from the files
    assert abs(recompute_ndcg10(ev) - saved["test/ndcg@10"]) < 1e-9
    recs = pd.read_parquet(ev / "test_recommendations.parquet")
    assert len(recs) == 120 and all(0 < len(x) <= 50 for x in recs["item_ids"])
    assert all(len(x) == len(s) for x, s in zip(recs["item_ids"], recs["scores"]))
    assert all(np.all(np.diff(s) <= 0) for s in recs["scores"])
    # seen items never come back
    inter = pd.read_parquet(Path(cfg.paths.data_dir) / "synthetic" / "split.parquet")
    items = pd.read_parquet(Path(cfg.paths.data_dir) / "synthetic" / "items.parquet")["item_id"].to_numpy()
    users = pd.read_parquet(Path(cfg.paths.data_dir) / "synthetic" / "users.parquet")["user_id"].to_numpy()
    seen = inter[inter["split"] != "test"].groupby("user_idx")["item_idx"].apply(lambda s: set(items[s]))
    for user, recommended in zip(recs["user_id"], recs["item_ids"]):
        assert not seen[int(np.flatnonzero(users == user)[0])] & set(recommended)
    assert "two-tower (ours)" in (root / "results.md").read_text()
    recs = pd.read_parquet(root / "batch_infer" / "recommendations.parquet")
    assert list(recs.columns) == ["user_id", "item_ids", "scores"] and len(recs) == 120
    assert set(json.loads((root / "stages.json").read_text())) == {"pretrain", "finetune", "evaluate", "batch_infer"}

    # the same pipeline again: every stage is reused, nothing retrains
    again = pipeline.run(tiny_cfg("pipeline", "pretrain.max_epochs=5", "finetune.max_epochs=5", "data.batch_size=16"))
    assert again == metrics
    records = [json.loads(p.read_text()) for p in sorted((Path(cfg.paths.outputs_root) / "pipeline").glob("*/*/stages.json"))]
    assert len(records) == 2 and records[0] == records[1]  # the second run points at the first run's folders
    stages = records[0]
    # a changed stage config reruns that stage and what follows, not what precedes it
    forced = tiny_cfg("pipeline", "pretrain.max_epochs=5", "finetune.max_epochs=4", "data.batch_size=16")
    pipeline.run(forced)
    latest = json.loads((Path(forced.paths.output_dir) / "stages.json").read_text())
    assert latest["pretrain"] == stages["pretrain"] and latest["finetune"] != stages["finetune"]


def test_three_commands_from_the_shell(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOWERREC_ROOT": str(tmp_path)}
    args = [*TINY, "pretrain.max_epochs=1", "finetune.max_epochs=1"]
    for job in ("pretrain", "finetune", "evaluate"):
        proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {job: sorted((tmp_path / "outputs" / job).glob("*/*")) for job in ("pretrain", "finetune", "evaluate")}
    assert all(len(r) == 1 for r in runs.values())
    fin_cfg = (runs["finetune"][0] / "config.yaml").read_text()
    assert f"init_from: {runs['pretrain'][0] / 'bundle'}" in fin_cfg  # 'latest' resolved on the driver, recorded
    assert "(the latest pretrain run)" in (runs["finetune"][0] / "run.log").read_text()
    for name in ("metrics.json", "test_split.parquet", "test_recommendations.parquet", "config.yaml"):
        assert (runs["evaluate"][0] / name).is_file()


def test_bad_override_fails_fast_with_the_key(tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "TOWERREC_ROOT": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain", "experiment=tiny", "trainer.max_epoch=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "max_epoch" in proc.stderr and "TrainerConfig" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_cold_start_items_are_ranked_from_text_alone(tiny_cfg):
    cfg = tiny_cfg(
        "pipeline", "pretrain.enabled=false", "finetune.max_epochs=4", "data.batch_size=16", "data.cold_start.num_items=8", "pipeline.batch_infer=false"
    )
    metrics = pipeline.run(cfg)
    ev = {k.removeprefix("evaluate/"): v for k, v in metrics.items() if k.startswith("evaluate/")}
    assert ev["cold_items"] == 8
    assert ev["test_cold/num_users"] >= 8 and ev["test_cold/num_users"] + ev["test_warm/num_users"] == ev["test/num_users"] == 120
    # never trained on, a cold item has no popularity; the text tower still ranks it
    assert ev["popularity/test_cold/ndcg@10"] == 0.0
    assert ev["test_cold/ndcg@10"] > 0.05
    # the split into cold and warm users is a partition of the test users
    whole = ev["test_cold/ndcg@10"] * ev["test_cold/num_users"] + ev["test_warm/ndcg@10"] * ev["test_warm/num_users"]
    assert abs(whole / 120 - ev["test/ndcg@10"]) < 1e-6


def test_weight_averaging_is_what_validation_sees_and_what_is_saved(tiny_cfg):
    from inference.bundle import read_weights
    from jobs.runtime.config.run_folder import create_run_folder
    from jobs.runtime.training.local_fit import local_fit

    cfg = tiny_cfg("finetune", "finetune.max_epochs=2", "data.batch_size=16", "trainer.ema_decay=0.9", "init_from=null")
    run_dir = create_run_folder(cfg)
    local_fit(cfg, "finetune", run_dir)
    best = torch.load(next((run_dir / "checkpoints").glob("best-*.ckpt")), weights_only=False)
    live = {k.removeprefix("model."): v for k, v in best["current_model_state"].items() if k.startswith("model.")}
    averaged = {k.removeprefix("model."): v for k, v in best["state_dict"].items() if k.startswith("model.")}
    saved = read_weights(run_dir / "bundle")
    name = "item_tower.id_embedding.weight"
    assert not torch.equal(live[name], averaged[name])  # the average lags the live weights
    assert all(torch.equal(saved[k], averaged[k]) for k in averaged)  # and it is the model kept
