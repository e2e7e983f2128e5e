"""The whole pipeline on Ray with DeepSpeed ZeRO-2 and two CPU workers (issue's done-when command)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from inference.bundle import read_manifest
from tests.integration.test_ray_training import ZERO_FILES, zero_files

pytestmark = pytest.mark.usefixtures("shared_ray")


def test_pipeline_on_ray_with_deepspeed_writes_every_file(tiny_cfg):
    cfg = tiny_cfg(
        "pipeline",
        "launcher=ray",
        "strategy=deepspeed_stage_2",
        "hardware=cpu",
        "hardware.num_workers=2",
        "cluster.num_cpus=4",
        "strategy.collective_timeout_s=120",
        "infer.use_ray=true",
        "infer.num_actors=2",
        "pretrain.max_epochs=2",
        "finetune.max_epochs=2",
        "data.batch_size=16",
    )
    from jobs import pipeline

    metrics = pipeline.run(cfg)
    root = Path(cfg.paths.output_dir)
    for stage in ("pretrain", "finetune"):
        for name in ("config.yaml", "metrics.json", "run.log", "bundle/manifest.json", "bundle/model.safetensors"):
            assert (root / stage / name).is_file(), f"{stage}/{name}"
        assert read_manifest(root / stage / "bundle")["lineage"]["ray_run"]
        assert zero_files(root / stage / "bundle") == ZERO_FILES["deepspeed_stage_2"]  # ZeRO-2 ran on both workers
    for name in ("metrics.json", "test_split.parquet", "test_recommendations.parquet"):
        assert (root / "evaluate" / name).is_file()
    recs = pd.read_parquet(root / "batch_infer" / "recommendations.parquet")
    items = pd.read_parquet(root / "batch_infer" / "item_embeddings.parquet")
    assert len(recs) == 120 and len(items) == 60
    assert metrics["evaluate/test/ndcg@10"] > metrics["evaluate/popularity/test/ndcg@10"]
    assert json.loads((root / "metrics.json").read_text())["evaluate/test/ndcg@10"] == metrics["evaluate/test/ndcg@10"]
