"""``python -m jobs.evaluate checkpoint=<finetune run folder | bundle | latest>``: full-ranking valid and test
metrics of a model bundle against the most-popular baseline, with test_split.parquet and
test_recommendations.parquet beside metrics.json (jobs/runtime/stages/evaluation.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.evaluation import run_evaluate as run

main = hydra_main("evaluate", run)

if __name__ == "__main__":
    main()
