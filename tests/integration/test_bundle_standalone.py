"""A trained model travels as its bundle alone: with the data folder, the download cache and the
run's other files gone, it loads, scores exactly like the live model did, and batch inference
runs from it unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import torch

from inference.bundle import load_bundle, read_manifest
from jobs import batch_infer, pipeline
from tests.conftest import TINY, compose_config


def test_scores_from_the_bundle_alone_equal_the_live_model(tmp_path):
    root = tmp_path / "train"
    cfg = compose_config(
        "pipeline",
        [*TINY, "pretrain.max_epochs=2", "finetune.max_epochs=2", "data.batch_size=16", "debug.record_scores=true", f"paths.output_dir={root}/pipeline"],
        root,
    )
    pipeline.run(cfg)
    finetune = root / "pipeline" / "finetune"
    best_epoch = read_manifest(finetune / "bundle")["lineage"]["best_epoch"]
    live = torch.load(finetune / "debug" / f"scores-epoch{best_epoch}.pt", weights_only=True)
    before = pd.read_parquet(root / "pipeline" / "batch_infer" / "recommendations.parquet")

    # what a colleague receives: the bundle folder, nothing else
    elsewhere = tmp_path / "received" / "bundle"
    shutil.copytree(finetune / "bundle", elsewhere)
    shutil.rmtree(root)
    assert not root.exists()

    bundle = load_bundle(elsewhere)
    with torch.no_grad():
        scores = bundle.model.score(bundle.model.user_vectors(live["items"], live["mask"]), bundle.model.catalog_vectors())
    assert torch.equal(scores, live["scores"]), (scores - live["scores"]).abs().max()

    infer = compose_config("batch_infer", [*TINY, f"checkpoint={elsewhere}", f"paths.output_dir={tmp_path}/infer"], tmp_path / "fresh")
    batch_infer.run(infer)
    after = pd.read_parquet(Path(infer.paths.output_dir) / "recommendations.parquet")
    assert list(after["user_id"]) == list(before["user_id"])
    assert [list(x) for x in after["item_ids"]] == [list(x) for x in before["item_ids"]]
    assert not (tmp_path / "fresh" / "data").exists()  # no dataset was read or rebuilt
