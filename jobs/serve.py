"""``python -m jobs.serve serve.bundle=<run folder | pipeline run | bundle | latest> serve.port=8000``: the
real-time service over a model bundle: recommend, ingest events, add items, explain, generate
feeds, hot reload (jobs/runtime/service/launch.py, serving/)."""

from jobs.runtime.config.entry_point import hydra_main
from jobs.runtime.service.launch import run_serve as run

main = hydra_main("serve", run)

if __name__ == "__main__":
    main()
