"""Starting the real-time service (jobs.serve): one local process (FastAPI under uvicorn), or the
same app as a Ray Serve deployment (``serve.backend=ray``)."""

from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from jobs.runtime.config.run_folder import create_run_folder, resolve_bundle, run_log_file
from jobs.runtime.config.schema import ConfigError, validate
from jobs.runtime.tracking.console import say

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_of(cfg: DictConfig):
    """The service's keys (``serve.keys_file`` and the environment) and Host names; refuses a
    non-loopback bind without a key."""
    from serving.access import ENV_KEYS, Access, AccessError

    try:
        access = Access.from_sources(os.environ, cfg.serve.keys_file, tuple(cfg.serve.allowed_hosts))
    except AccessError as e:
        raise ConfigError(f"config error at 'serve.keys_file': {e}") from None
    if access.open and not is_loopback(cfg.serve.host):
        raise ConfigError(
            f"config error at 'serve.keys_file': the service would bind to {cfg.serve.host}, which is not loopback, with no API key; "
            f"give keys in serve.keys_file or {', '.join(ENV_KEYS)} so no endpoint is open to the network"
        )
    return access


def service_options(cfg: DictConfig, bundle: Path) -> dict:
    v = cfg.serve
    state_dir = v.state_dir or str(Path(cfg.paths.outputs_root).resolve() / "serve" / "state")
    return {
        "bundle_path": str(bundle.resolve()),
        "state_dir": state_dir,
        "max_history": v.max_history,
        "max_live_users": v.max_live_users,
        "explain_window": v.explain_window,
        "reason_template": v.reason_template,
        "fsync": v.fsync,
        "user_cache_size": v.user_cache_size,
        "bundle_roots": [str(Path(r).resolve()) for r in (v.bundle_roots if v.bundle_roots is not None else [cfg.paths.outputs_root])],
    }


def run_serve(cfg: DictConfig) -> dict[str, float]:
    """``jobs.serve``: load the bundle, replay the durable log, serve until stopped."""
    validate(cfg)
    access = access_of(cfg)
    bundle = resolve_bundle(cfg.serve.bundle, cfg.paths.outputs_root, "finetune", cfg.experiment_name, key="serve.bundle")
    run_dir = create_run_folder(cfg)
    options = service_options(cfg, bundle)
    backend = cfg.serve.backend.value if hasattr(cfg.serve.backend, "value") else cfg.serve.backend
    with run_log_file(run_dir):
        import faiss
        import torch

        faiss.omp_set_num_threads(1)  # many small searches in parallel request threads
        if cfg.serve.torch_threads:
            torch.set_num_threads(cfg.serve.torch_threads)
        if backend == "ray":
            from jobs.runtime.service.ray_serve import serve_on_ray

            serve_on_ray(cfg, options, access)
            return {}
        import uvicorn

        from serving.app import create_app
        from serving.recommender import Recommender

        service = Recommender(**options)
        scheduler = None
        if cfg.serve["update"].every_events or cfg.serve["update"].every_seconds:
            from jobs.runtime.service.update_schedule import UpdateScheduler

            scheduler = UpdateScheduler(service, cfg, options["state_dir"], run_dir)
            scheduler.start()
            say(
                "serve: incremental updates every %s",
                f"{cfg.serve['update'].every_events} logged records" if cfg.serve["update"].every_events else f"{cfg.serve['update'].every_seconds} s",
            )
        health = service.health()
        app = create_app(service, access, cfg.serve.max_body_bytes)
        say(
            "serve: %s (model version %d, %d items, %d known users; log %s, offset %d)",
            bundle,
            health["model_version"],
            health["items"],
            health["known_users"],
            health["log"],
            health["log_offset"],
        )
        say("serve: listening on http://%s:%d (API description: /docs, /openapi.json; logs in %s)", cfg.serve.host, cfg.serve.port, run_dir / "run.log")
        try:
            uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning", access_log=False)
        finally:
            if scheduler is not None:
                scheduler.stop()
            service.close()
    return {}
