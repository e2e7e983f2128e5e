"""Ray 2.60: Tune trials that each run a Train v2 TorchTrainer hang once Tune stops one, unless
Ray serves its state API. Ray, Tune and Train only; 2 CPUs; a few minutes.

    .venv/bin/python docs/ray_tune_train_v2_hang.py              # Ray started with include_dashboard=False
    .venv/bin/python docs/ray_tune_train_v2_hang.py --state-api  # the same with the dashboard's HTTP server

Four trials one at a time, each a TorchTrainer of 2 workers x 1 CPU under ASHA. Without the state
API: ASHA stops the first trial, Tune ends its actor and with it the Train controller, but the
controller's placement group stays (placement groups live as long as the job that made them), so
the second trial's workers never start; after ``--timeout`` seconds the script prints the
placement groups still held and exits 1. With ``--state-api`` all four trials run and none is left.

Why: Train v2 leaves the placement group of a controller that died to a detached
PlacementGroupCleaner (ray/train/v2/_internal/callbacks/placement_group_callback.py), which asks
``ray.util.state.get_actor`` every second whether the controller is alive
(ray/train/v2/_internal/execution/controller/placement_group_cleaner.py). That is an HTTP request
to the dashboard, which ``include_dashboard=False`` starts without its HTTP server
(ray/_private/services.py, start_api_server); the cleaner logs "State API may be temporarily
unavailable" and keeps asking. The client also finds the server by looking for GCS processes on
the machine and fails when there is more than one Ray, hence RAY_API_SERVER_ADDRESS below.
"""

import os
import socket
import sys
import tempfile
import threading
import time

import ray
from ray import train, tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler

STORAGE = tempfile.mkdtemp()


def train_loop(config: dict) -> None:
    for epoch in range(3):
        time.sleep(1)
        train.report({"score": config["lr"] * (epoch + 1)})


def trial(config: dict) -> None:
    run_config = train.RunConfig(name=tune.get_context().get_trial_name(), storage_path=STORAGE, callbacks=[TuneReportCallback()])
    TorchTrainer(train_loop, train_loop_config=config, scaling_config=train.ScalingConfig(num_workers=2), run_config=run_config).fit()


def held_placement_groups() -> list[str]:
    return [pg["placement_group_id"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]


def give_up_after(seconds: float) -> None:
    time.sleep(seconds)
    print(f"HANG: still running after {seconds:.0f} s; placement groups held: {held_placement_groups()}", flush=True)
    os._exit(1)


if __name__ == "__main__":
    timeout = float(sys.argv[sys.argv.index("--timeout") + 1]) if "--timeout" in sys.argv else 300.0
    if "--state-api" in sys.argv:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
        ray.init(num_cpus=2, include_dashboard=True, dashboard_port=port, runtime_env={"env_vars": env})
    else:
        ray.init(num_cpus=2, include_dashboard=False)
    threading.Thread(target=give_up_after, args=(timeout,), daemon=True).start()
    results = tune.Tuner(
        tune.with_resources(trial, {"node:__internal_head__": 0.01}),  # the trial itself holds no CPU
        param_space={"lr": tune.grid_search([1.0, 0.001, 1.0, 0.001])},
        tune_config=tune.TuneConfig(
            metric="score", mode="max", max_concurrent_trials=1, scheduler=ASHAScheduler(time_attr="training_iteration", max_t=3, grace_period=1)
        ),
        run_config=tune.RunConfig(storage_path=STORAGE, name="hang"),
    ).fit()
    deadline = time.monotonic() + 30  # the cleaner checks once a second
    while held_placement_groups() and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"OK: {len(results)} trials, {[r.metrics.get('training_iteration') for r in results]} reports; placement groups held: {held_placement_groups()}")
