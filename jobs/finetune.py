"""``python -m jobs.finetune experiment=...``: two-tower retrieval fine-tuning, from a pretraining run (``init_from``)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jobs.run_folder import pin_hydra_output_dir
from jobs.config_schema import register
from jobs.training import run_stage_job


def run(cfg: DictConfig) -> dict[str, float]:
    return run_stage_job(cfg, "finetune")


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
def main(cfg: DictConfig) -> None:
    run(pin_hydra_output_dir(cfg))


if __name__ == "__main__":
    main()
