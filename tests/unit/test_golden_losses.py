"""Pins the first training losses of a seeded tiny run: any change to data, towers, loss or
initialisation that alters training shows up here. Update the numbers only on purpose."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from jobs.runtime.config.assembly import build_datamodule, build_model, build_module, build_trainer

GOLDEN = {
    "pretrain": [4.90358, 4.5788, 4.60006, 4.37651, 4.34072],
    # negatives drawn by index (randint) since issue #13, not torch.multinomial: the same
    # distribution, other draws
    "finetune": [4.95732, 4.80463, 4.52832, 4.49236, 4.54782],
}


class LossRecorder(Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_first_losses_of_a_seeded_tiny_run(stage, tiny_cfg, tmp_path):
    cfg = tiny_cfg(stage, f"{stage}.max_epochs=1", "trainer.limit_train_batches=5", "data.batch_size=16", "init_from=null")
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg, stage, build_model(cfg, dm), dm)
    recorder = LossRecorder()
    build_trainer(cfg, stage, tmp_path / "run", [recorder]).fit(module, datamodule=dm)
    assert recorder.losses == pytest.approx(GOLDEN[stage], abs=2e-4)
