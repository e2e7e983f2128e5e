"""``python -m jobs.pipeline experiment=...``: pretrain -> finetune -> evaluate -> batch_infer, reusing
finished identical stages, ending with the results table (jobs/runtime/stages/pipeline.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.pipeline import run_pipeline as run

main = hydra_main("pipeline", run)

if __name__ == "__main__":
    main()
