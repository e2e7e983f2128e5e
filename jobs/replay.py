"""``python -m jobs.replay experiment=ml100k [replay.update_every=2000]``: streaming (prequential)
evaluation of the loop after a time cut: frozen model and histories, live histories, live
histories plus incremental updates (jobs/runtime/stages/replay.py)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.stages.replay import run_replay as run

main = hydra_main("replay", run)

if __name__ == "__main__":
    main()
