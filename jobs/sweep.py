"""``python -m jobs.sweep sweep=<name>``: a Ray Tune search over config keys, each trial a full
training stage on Ray Train, weak trials stopped by ASHA (jobs/runtime/stages/sweep.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.sweep import run_sweep as run

main = hydra_main("sweep", run)

if __name__ == "__main__":
    main()
