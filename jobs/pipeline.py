"""``python -m jobs.pipeline experiment=...``: pretrain -> finetune -> evaluate, each in its own
run folder under the pipeline's, each reading the previous stage's files; prints a results table."""
from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from jobs import evaluate
from jobs.config_schema import register, validate
from jobs.run_folder import create_run_folder, run_log_file, write_metrics
from jobs.training import run_stage_job

log = logging.getLogger(__name__)


def stage_config(cfg: DictConfig, job: str, run_dir: Path, **values: object) -> DictConfig:
    """A copy of the pipeline config for one stage, writing into ``run_dir/job``."""
    c = cfg.copy()
    c.job = job
    c.paths.output_dir = str(run_dir / job)
    for key, value in values.items():
        c[key] = value
    return c


def results_table(metrics: dict[str, float], ks: tuple[int, ...] = (10, 20)) -> str:
    """Markdown table: model vs most-popular on the test split."""
    names = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "mrr")] + ["coverage@10", "diversity@10"]
    rows = [("two-tower (ours)", "evaluate/test/"), ("most popular", "evaluate/popularity/test/")]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, prefix in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics.get(prefix + n, float('nan')):.4f}" for n in names) + " |")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, float]:
    validate(cfg)
    run_dir = create_run_folder(cfg)
    metrics: dict[str, float] = {}
    with run_log_file(run_dir):
        init_from = None
        if cfg.pretrain.enabled:
            pre = stage_config(cfg, "pretrain", run_dir)
            metrics.update({f"pretrain/{k}": v for k, v in run_stage_job(pre, "pretrain").items()})
            init_from = pre.paths.output_dir
        fin = stage_config(cfg, "finetune", run_dir, init_from=init_from)
        metrics.update({f"finetune/{k}": v for k, v in run_stage_job(fin, "finetune").items()})
        ev = stage_config(cfg, "evaluate", run_dir, checkpoint=fin.paths.output_dir)
        metrics.update({f"evaluate/{k}": v for k, v in evaluate.run(ev).items()})
        write_metrics(run_dir, metrics)
        table = results_table(metrics)
        (run_dir / "results.md").write_text(table + "\n")
        log.info("results (%s, test split):\n%s", cfg.experiment_name, table)
    print(table)
    return metrics


register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
