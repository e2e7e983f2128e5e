"""``python -m jobs.finetune experiment=... [init_from=<pretrain run | bundle | latest | null>]``: two-tower
retrieval fine-tuning; writes the run's model bundle (jobs/runtime/training/stage_job.py)."""

from functools import partial

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.training.stage_job import run_stage_job

run = partial(run_stage_job, stage="finetune")
main = hydra_main("finetune", run)

if __name__ == "__main__":
    main()
