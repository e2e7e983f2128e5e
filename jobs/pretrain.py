"""``python -m jobs.pretrain experiment=...``: next-item pretraining of both towers (optional MLM on
item text); writes the run's model bundle (jobs/runtime/training/stage_job.py)."""

from functools import partial

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.training.stage_job import run_stage_job

run = partial(run_stage_job, stage="pretrain")
main = hydra_main("pretrain", run)

if __name__ == "__main__":
    main()
