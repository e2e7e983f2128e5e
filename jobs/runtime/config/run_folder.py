"""The run folder contract (DESIGN.md section 4): config.yaml, metrics.json, bundle/, run.log; and
how jobs find other runs' bundles."""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from inference.bundle import MANIFEST, bundle_folder
from jobs.runtime.config.schema import ConfigError
from jobs.runtime.tracking.console import capture_output, is_quiet

log = logging.getLogger(__name__)

BUNDLE_DIR = "bundle"  # every training run folder's model bundle (inference/bundle.py)


class RunNotFoundError(ConfigError, FileNotFoundError):
    """A run named in the config (``init_from``, ``checkpoint``, ``serve.bundle``, ...) that is not there."""


def pin_absolute_paths(cfg: DictConfig) -> DictConfig:
    """Make the data, cache and output paths absolute: Ray workers run in other folders."""
    for key in ("root_dir", "data_dir", "cache_dir", "outputs_root"):
        cfg.paths[key] = str(Path(str(cfg.paths[key])).resolve())
    return cfg


def create_run_folder(cfg: DictConfig) -> Path:
    """Pin absolute paths and the run folder in the config, create it and write config.yaml."""
    run_dir = Path(str(cfg.paths.output_dir)).resolve()
    pin_absolute_paths(cfg)
    cfg.paths.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return run_dir


def write_metrics(run_dir: Path, metrics: dict[str, float]) -> Path:
    """Write the flat ``metrics.json`` (NaN/inf written as null so it stays valid JSON)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sorted(metrics.items())}
    path = Path(run_dir) / "metrics.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    tmp.replace(path)
    return path


@contextmanager
def run_log_file(run_dir: Path) -> Iterator[Path]:
    """Copy everything logged while the job runs into ``<run_dir>/run.log``; on a quiet console
    (jobs/runtime/tracking/console.py) everything printed goes there too instead of to the terminal."""
    path = Path(run_dir) / "run.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    try:
        with capture_output(path) if is_quiet() else nullcontext():
            yield path
    except Exception:  # the whole traceback, in run.log only (the console gets the message)
        handler.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "the job failed", None, sys.exc_info()))
        raise
    finally:
        root.removeHandler(handler)
        handler.close()


def _experiment_of(run_dir: Path) -> str | None:
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return None
    return OmegaConf.load(cfg_path).get("experiment_name")


def find_latest_run(outputs_root: str | Path, job: str, experiment_name: str) -> Path:
    """Newest ``<outputs_root>/<job>/<date>/<time>`` folder (or ``<job>`` stage of a pipeline run) of
    this experiment with a model bundle."""
    root = Path(outputs_root) / job
    candidates = [p.parent.parent for pattern in (f"*/*/{BUNDLE_DIR}/{MANIFEST}", f"*/{BUNDLE_DIR}/{MANIFEST}") for p in root.glob(pattern)]
    candidates += [p.parent.parent for p in (Path(outputs_root) / "pipeline").glob(f"*/*/{job}/{BUNDLE_DIR}/{MANIFEST}")]
    candidates = [c for c in candidates if _experiment_of(c) == experiment_name]
    if not candidates:
        raise FileNotFoundError(f"no finished '{job}' run of experiment '{experiment_name}' under {root} (looked for */*/{BUNDLE_DIR}/{MANIFEST})")
    return max(candidates, key=lambda c: (c / BUNDLE_DIR / MANIFEST).stat().st_mtime)


def resolve_bundle(spec: str, outputs_root: str | Path, job: str, experiment_name: str, key: str = "checkpoint") -> Path:
    """A run folder, a pipeline run folder (its ``job`` stage), a bundle folder or 'latest'
    (newest run of ``job``) -> the bundle folder.

    ``key`` names the config key the spec came from, for the error message."""
    if spec == "latest":
        path = find_latest_run(outputs_root, job, experiment_name) / BUNDLE_DIR
        log.info("using the latest %s run: %s", job, path.parent)
        return path
    path = Path(spec)
    found = bundle_folder(path, job)  # a bundle, a run folder, or a pipeline's run folder (its stage of that job)
    if found is not None:
        return found
    if (path / "checkpoints" / "model.ckpt").is_file() or path.suffix == ".ckpt":
        raise RunNotFoundError(
            f"config error at '{key}': {spec} holds a checkpoint of an older version (checkpoints/model.ckpt) and no model bundle; train it again with this version"
        )
    raise RunNotFoundError(
        f"config error at '{key}': {spec} is not a run folder with a model bundle ({BUNDLE_DIR}/{MANIFEST}), a pipeline run folder, a bundle folder, or 'latest'"
    )


def pin_hydra_output_dir(cfg: DictConfig) -> DictConfig:
    """Under ``@hydra.main``, make the run folder Hydra's own output folder (one per job of a
    ``-m`` multirun, else ``paths.output_dir``)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    return cfg
