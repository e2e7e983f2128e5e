"""``python -m jobs.batch_infer checkpoint=<finetune run folder | bundle | latest>``: top-K recommendations
for every user of a model bundle, from the bundle alone (Ray Data actors + FAISS;
jobs/runtime/stages/batch_inference.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.batch_inference import run_batch_infer as run

main = hydra_main("batch_infer", run)

if __name__ == "__main__":
    main()
