"""The pipeline: pretrain -> finetune -> evaluate -> batch_infer, each
in its own run folder under the pipeline's and each reading the previous stage's files. A stage
that already finished for the same config (in an earlier pipeline run) is reused, not rerun,
unless ``pipeline.force=true``. Prints a results table."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from jobs.runtime.config.ray_cluster import ray_session
from jobs.runtime.config.run_folder import create_run_folder, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.stages.batch_inference import run_batch_infer
from jobs.runtime.stages.evaluation import run_evaluate
from jobs.runtime.tracking.console import say
from jobs.runtime.training.stage_job import run_stage_job

log = logging.getLogger(__name__)

STAGE_RECORD = "stage.json"
STAGE_FORMAT = 2  # bump when what a stage writes changes (2: model bundles replace model.ckpt)
# Config sections that change what a stage computes; paths, loggers, cluster and debug do not.
RESULT_KEYS = ("data", "model", "trainer", "strategy", "hardware", "seed", "experiment_name", "infer")


def stage_config(cfg: DictConfig, job: str, run_dir: Path, **values: object) -> DictConfig:
    """A copy of the pipeline config for one stage, writing into ``run_dir/job``."""
    c = cfg.copy()
    c.job = job
    c.paths.output_dir = str(run_dir / job)
    c.logger.wandb.group = cfg.logger.wandb.group or f"{cfg.experiment_name}-pipeline-{run_dir.parent.name}-{run_dir.name}"
    if cfg.run_name:
        c.run_name = f"{cfg.run_name}-{job}"
    for key, value in values.items():
        c[key] = value
    return c


def stage_fingerprint(cfg: DictConfig, job: str, upstream: str = "") -> str:
    """Hash of what determines a stage's result, chained to the fingerprint of its input stage."""
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    key = {k: plain[k] for k in RESULT_KEYS} | {"job": job, "upstream": upstream, "format": STAGE_FORMAT}
    if job in ("pretrain", "finetune"):
        key["stage"] = plain[job]
        key["trainer"] = {k: v for k, v in plain["trainer"].items() if k not in ("enable_progress_bar", "log_every_n_steps")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def find_finished(outputs_root: str | Path, job: str, fingerprint: str) -> Path | None:
    """The newest earlier pipeline stage folder that finished with this fingerprint."""
    found = []
    for record in Path(outputs_root).glob(f"pipeline/*/*/{job}/{STAGE_RECORD}"):
        data = json.loads(record.read_text())
        if data.get("fingerprint") == fingerprint and data.get("finished"):
            found.append(record.parent)
    return max(found, key=lambda p: (p / STAGE_RECORD).stat().st_mtime) if found else None


def run_or_reuse(cfg: DictConfig, job: str, upstream: str, runner: Callable[[DictConfig], dict[str, float]]) -> tuple[Path, str, dict[str, float]]:
    """Run one stage, or reuse an identical finished one; returns (folder, fingerprint, metrics)."""
    fingerprint = stage_fingerprint(cfg, job, upstream)
    if not cfg.pipeline.force:
        done = find_finished(cfg.paths.outputs_root, job, fingerprint)
        if done is not None:
            say("%s: reusing the finished run in %s (same config; pipeline.force=true reruns it)", job, done)
            return done, fingerprint, json.loads((done / "metrics.json").read_text())
    metrics = runner(cfg)
    folder = Path(cfg.paths.output_dir)
    (folder / STAGE_RECORD).write_text(json.dumps({"job": job, "fingerprint": fingerprint, "finished": True}, indent=2) + "\n")
    return folder, fingerprint, metrics


def results_table(metrics: dict[str, float], ks: tuple[int, ...] = (10, 20)) -> str:
    """Markdown table: model vs most-popular on the test split."""
    names = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall", "mrr")] + ["coverage@10", "diversity@10"]
    rows = [("two-tower (ours)", "evaluate/test/"), ("most popular", "evaluate/popularity/test/")]
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, prefix in rows:
        lines.append(f"| {label} | " + " | ".join(f"{metrics.get(prefix + n, float('nan')):.4f}" for n in names) + " |")
    return "\n".join(lines)


def run_pipeline(cfg: DictConfig) -> dict[str, float]:
    """``jobs.pipeline``: every stage in order (finished identical stages reused); prints the results table."""
    validate(cfg)
    run_dir = create_run_folder(cfg)
    metrics: dict[str, float] = {}
    say("pipeline %s: run folder %s", cfg.experiment_name, run_dir)
    launcher = cfg.launcher.value if hasattr(cfg.launcher, "value") else cfg.launcher
    uses_ray = launcher != "local" or (cfg.pipeline.batch_infer and cfg.infer.use_ray)
    # one Ray session for every stage: Ray is not safe to shut down and start again in one process
    # while its background threads live (a driver could crash between stages)
    with run_log_file(run_dir), ray_session(cfg) if uses_ray else nullcontext():
        folders: dict[str, str] = {}

        def stage(job: str, upstream: str, runner, **values) -> tuple[Path, str]:
            folder, fingerprint, m = run_or_reuse(stage_config(cfg, job, run_dir, **values), job, upstream, runner)
            metrics.update({f"{job}/{k}": v for k, v in m.items()})
            folders[job] = str(folder)
            return folder, fingerprint

        init_from, upstream = None, ""
        if cfg.pretrain.enabled:
            pre_dir, upstream = stage("pretrain", "", lambda c: run_stage_job(c, "pretrain"))
            init_from = str(pre_dir)
        fin_dir, fin_print = stage("finetune", upstream, lambda c: run_stage_job(c, "finetune"), init_from=init_from)
        stage("evaluate", fin_print, run_evaluate, checkpoint=str(fin_dir))
        if cfg.pipeline.batch_infer:
            stage("batch_infer", fin_print, run_batch_infer, checkpoint=str(fin_dir))
        (run_dir / "stages.json").write_text(json.dumps(folders, indent=2) + "\n")
        write_metrics(run_dir, metrics)
        table = results_table(metrics)
        (run_dir / "results.md").write_text(table + "\n")
        log.info("results (%s, test split):\n%s", cfg.experiment_name, table)
    print(table)
    return metrics
