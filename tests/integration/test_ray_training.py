"""Ray Train with real Ray and real DeepSpeed on CPU: 2 workers, ddp / ZeRO-2 / ZeRO-3,
consolidation into the model bundle, 1-vs-2-worker equivalence, and recovery from a killed worker."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.bundle import load_bundle, read_manifest
from jobs.runtime.training.stage_job import run_stage_job
from tests.conftest import TINY, compose_config

RAY = ["launcher=ray", "cluster.num_cpus=4", "logger=none", "strategy.collective_timeout_s=120"]
pytestmark = pytest.mark.usefixtures("shared_ray")


def losses(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "debug" / f"losses-rank{rank}.jsonl").read_text().splitlines()]


def zero_files(bundle_dir: Path) -> list[str]:
    """The DeepSpeed ZeRO files of the checkpoint a bundle was consolidated from (none for ddp)."""
    source = Path(read_manifest(bundle_dir)["lineage"]["source"])
    assert source.is_dir(), source
    return sorted(p.name for p in source.rglob("*_states.pt"))


# what each strategy's checkpoint holds: proof that DeepSpeed ran, at that ZeRO stage, on 2 ranks
ZERO_FILES = {
    "ddp": [],
    "deepspeed_stage_2": ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"],
    "deepspeed_stage_3": [
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ],
}


def best_validated_epoch(run_dir: Path) -> int:
    rows = [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]
    return int(max(rows, key=lambda r: r["val/ndcg@10"])["epoch"])


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_two_workers_train_and_the_consolidated_checkpoint_scores_like_the_live_model(strategy, tiny_cfg):
    cfg = tiny_cfg(
        "pretrain",
        *RAY,
        f"strategy={strategy}",
        "hardware.num_workers=2",
        "pretrain.max_epochs=2",
        "data.batch_size=16",
        "debug.record_losses=true",
        "debug.record_scores=true",
    )
    metrics = run_stage_job(cfg, "pretrain")
    run_dir = Path(cfg.paths.output_dir)
    assert zero_files(run_dir / "bundle") == ZERO_FILES[strategy]  # not a silent fall-back to DDP
    for rank in (0, 1):
        steps = [x["loss"] for x in losses(run_dir, rank)]
        assert len(steps) >= 8
        assert sum(steps[-3:]) / 3 < sum(steps[:3]) / 3  # the loss falls
    bundle = load_bundle(run_dir / "bundle")  # the ZeRO shards gathered into one fp32 model
    best_epoch = bundle.manifest["lineage"]["best_epoch"]
    assert best_epoch == best_validated_epoch(run_dir)  # the epoch that validated best is the one kept
    rows = [json.loads(line) for line in (run_dir / "metrics_history.jsonl").read_text().splitlines()]
    assert metrics["val/ndcg@10"] == pytest.approx(max(r["val/ndcg@10"] for r in rows))
    live = torch.load(run_dir / "debug" / f"scores-epoch{best_epoch}.pt", weights_only=True)
    model = bundle.model
    with torch.no_grad():
        reloaded = model.score(model.user_vectors(live["items"], live["mask"]), model.catalog_vectors())
    assert torch.allclose(reloaded, live["scores"], atol=1e-4), (reloaded - live["scores"]).abs().max()


SAME_FIRST_STEPS = [
    *RAY,
    "strategy=ddp",
    "pretrain.max_epochs=1",
    "trainer.limit_train_batches=3",
    "debug.record_losses=true",
    "data.train_windows=last",
    "data.reader.min_len=24",
    "data.reader.max_len=30",
    "model.item_tower.dropout=0",
    "model.user_tower.dropout=0",
]


@pytest.fixture(scope="module")
def one_worker_losses(tmp_path_factory) -> list[float]:
    """The first losses of one ddp worker with batch 16 and the dense id table (run once for both
    two-worker runs below)."""
    root = tmp_path_factory.mktemp("one_worker")
    one = compose_config("pretrain", [*TINY, *SAME_FIRST_STEPS, "hardware.num_workers=1", "data.batch_size=16"], root)
    run_stage_job(one, "pretrain")
    return [x["loss"] for x in losses(Path(one.paths.output_dir), 0)]


@pytest.mark.parametrize("two_sparse", ["false", "true"], ids=["dense", "two-workers-sparse-ids"])
def test_ddp_one_and_two_workers_give_the_same_first_losses(two_sparse, one_worker_losses, tiny_cfg):
    """With a sparse id table the two workers all-reduce sparse gradients (gloo) and update only
    the rows of the step (SparseRowAdamW); the full softmax uses every row in every step, so
    their losses are those of one worker with the dense table."""
    two = tiny_cfg("pretrain", *SAME_FIRST_STEPS, "hardware.num_workers=2", "data.batch_size=8", f"model.item_tower.sparse_ids={two_sparse}")
    run_stage_job(two, "pretrain")
    pair = [(a["loss"] + b["loss"]) / 2 for a, b in zip(losses(Path(two.paths.output_dir), 0), losses(Path(two.paths.output_dir), 1))]
    assert len(one_worker_losses) == len(pair) == 3
    assert one_worker_losses == pytest.approx(pair, abs=1e-4)


def test_a_killed_worker_resumes_from_the_latest_checkpoint(tiny_cfg):
    cfg = tiny_cfg(
        "pretrain",
        *RAY,
        "strategy=ddp",
        "hardware.num_workers=2",
        "pretrain.max_epochs=3",
        "data.batch_size=32",
        "debug.record_losses=true",
        "debug.fail_at_step=6",
        "debug.fail_rank=1",
        "trainer.max_failures=1",
    )
    metrics = run_stage_job(cfg, "pretrain")
    run_dir = Path(cfg.paths.output_dir)
    assert (run_dir / "debug" / "fault_injected").is_file()
    steps = [x["step"] for x in losses(run_dir, 0)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1, f"restarted from scratch: {steps}"  # resumed after the epoch-0 checkpoint
    assert steps[-1] == max(steps) and metrics["train/epochs"] == 3
    assert load_bundle(run_dir / "bundle").manifest["lineage"]["best_epoch"] == best_validated_epoch(run_dir)


def test_a_run_started_again_with_the_same_name_resumes(tiny_cfg):
    base = [*RAY, "strategy=ddp", "hardware.num_workers=1", "data.batch_size=32", "debug.record_losses=true", "run_name=resume-me"]
    first = tiny_cfg("pretrain", *base, "pretrain.max_epochs=1")
    run_stage_job(first, "pretrain")
    steps_first = [x["step"] for x in losses(Path(first.paths.output_dir), 0)]
    second = tiny_cfg("pretrain", *base, "pretrain.max_epochs=2", "paths.output_dir=" + str(Path(first.paths.output_dir).parent / "again"))
    metrics = run_stage_job(second, "pretrain")
    steps_second = [x["step"] for x in losses(Path(second.paths.output_dir), 0)]
    assert steps_second[0] > steps_first[-1] - 1  # continued after epoch 0, not from step 0
    assert metrics["train/epochs"] == 2


def test_ray_workers_map_the_frozen_text_encodings_the_driver_wrote_and_never_encode(tiny_cfg, capfd):
    cfg = tiny_cfg("pretrain", *RAY, "strategy=ddp", "hardware.num_workers=2", "pretrain.max_epochs=1", "model.item_tower.freeze_encoder=true")
    run_stage_job(cfg, "pretrain")
    (path,) = (Path(cfg.paths.data_dir) / "synthetic").glob("encodings/*/text.npy")
    # the workers' own words, which Ray sends to this driver's stderr a little after the run (and
    # deduplicates: the second worker's same line may come as "[repeated 1x across cluster]")
    mapped = re.compile(rf"RayTrainWorker pid=\d+\S* item tower: frozen text encodings of \d+ items memory-mapped from {re.escape(str(path))}")
    seen, deadline = "", time.monotonic() + 30
    while time.monotonic() < deadline and not mapped.search(seen):
        seen += capfd.readouterr().err
        time.sleep(0.5)
    time.sleep(2)  # a worker's later line, had it encoded, would come with or after it
    seen += capfd.readouterr().err
    assert mapped.search(seen), seen[-3000:]
    worker_lines = [line for line in seen.splitlines() if "RayTrainWorker" in line and "item tower" in line]
    # a worker that had not found the file would have said so ("encoding N item texts once") and cached its own
    assert not [line for line in worker_lines if "texts once" in line or "cached frozen text encodings" in line], worker_lines


def test_a_large_catalogs_frozen_text_is_encoded_by_ray_actors_in_pieces_into_the_file_the_driver_would_write(tiny_cfg, monkeypatch):
    from jobs.runtime.config import text_encodings
    from jobs.runtime.config.assembly import build_datamodule
    from lightning_modules.item_tower import ItemTower

    cfg = tiny_cfg("pretrain", *RAY, "hardware.num_workers=2", "model.item_tower.freeze_encoder=true")
    data_dir = Path(build_datamodule(cfg).data_dir)
    it = cfg.model.item_tower
    tower = text_encodings.catalog_item_tower(cfg, "pretrain", data_dir)
    expected = tower.encode_catalog_text().numpy()  # what the driver's own pass writes
    path = text_encodings.encodings_path(data_dir, it.tokenizer, it.max_text_tokens, tower)
    monkeypatch.setattr(text_encodings, "PIECE_ITEMS", 16)  # pieces of 16 items over the 2 actors
    assert tower.num_items > 2 * 16

    def no_driver_pass(self):
        raise AssertionError("the driver ran the encoder over the catalog")

    monkeypatch.setattr(ItemTower, "encode_catalog_text", no_driver_pass)  # the actors are other processes
    assert text_encodings.frozen_text_once(cfg, "pretrain", data_dir, ray_pass_items=1) == path
    np.testing.assert_allclose(np.load(path), expected, atol=1e-6)
    assert not list(path.parent.glob("*.partial-*"))  # the private file was renamed into place

    path.unlink()
    rows = text_encodings.encode_on_ray(cfg, "pretrain", data_dir, path, tower.num_items, expected.shape[1])
    assert sum(rows.values()) == tower.num_items and all(len(node) == 56 for node in rows)  # every row, by Ray node id
    np.testing.assert_allclose(np.load(path), expected, atol=1e-6)
    # an actor whose tower would not give the driver's key (other weights, other tokens) refuses to write
    with pytest.raises(Exception, match="not the driver's"):
        text_encodings.encode_on_ray(cfg, "pretrain", data_dir, path.with_name("elsewhere.npy"), tower.num_items, expected.shape[1])
    assert not list(path.parent.glob("*.partial-*")) and not path.with_name("elsewhere.npy").exists()
