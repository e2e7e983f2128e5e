"""``python -m jobs.update [update.bundle=<bundle | run | latest>] [update.state_dir=<service log>]``: an
incremental fine-tune on what the service logged since a bundle was made; writes the next model
version as a new bundle (jobs/runtime/stages/update.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.update import run_update as run

main = hydra_main("update", run)

if __name__ == "__main__":
    main()
