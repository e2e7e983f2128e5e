"""What makes a module under ``jobs/`` an entry point: ``@hydra.main`` over ``conf/<name>.yaml``
calling one plain ``run(cfg) -> dict[str, float]`` in Hydra's own run folder, with the console
set up (quiet by default; ``-v`` or ``verbose=true`` for the full stream)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig

from inference.bundle import BundleError
from jobs.runtime.config.ray_cluster import PlacementError
from jobs.runtime.config.run_folder import pin_hydra_output_dir
from jobs.runtime.config.schema import ConfigError, register
from jobs.runtime.tracking.console import setup_console, strip_verbose_flag

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"


def hydra_main(config_name: str, run: Callable[[DictConfig], dict[str, float]]) -> Callable[[], None]:
    """The ``main()`` of an entry point: composes ``conf/<config_name>.yaml`` with the command
    line's overrides and calls ``run`` on it."""
    register()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)
    def hydra_entry(cfg: DictConfig) -> None:
        setup_console(bool(cfg.verbose))
        try:
            run(pin_hydra_output_dir(cfg))
        except (ConfigError, PlacementError, BundleError) as e:
            if cfg.verbose:
                raise
            # a mistake in the config or a cluster that cannot run it: the message says what and
            # where; the traceback is in the run's run.log (or shown with -v)
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(1) from None

    def main() -> None:
        if strip_verbose_flag(sys.argv):
            sys.argv.append("verbose=true")
        hydra_entry()

    return main
