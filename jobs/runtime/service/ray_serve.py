"""``serve.backend=ray``: the same FastAPI app as a Ray Serve deployment of ``serve.replicas``
replicas behind Ray Serve's HTTP proxy. The replicas share one live state (the durable log and
the users' live events) held by a Ray actor, so any replica's answer reflects every event and
new item acknowledged by any other."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from omegaconf import DictConfig

from jobs.runtime.config.ray_cluster import ray_session
from jobs.runtime.tracking.console import say

log = logging.getLogger(__name__)

STATE_ACTOR = "towerrec-live-state"


def app_builder(options: dict[str, Any], state_actor, access, max_body_bytes: int):
    """What each replica runs once: its own model, the shared live state, the app."""

    def build():
        import faiss
        import torch

        from serving.app import create_app
        from serving.live_state import RemoteLiveState
        from serving.recommender import Recommender

        faiss.omp_set_num_threads(1)
        threads = options.get("torch_threads")
        if threads:
            torch.set_num_threads(threads)
        kwargs = {k: v for k, v in options.items() if k != "torch_threads"}
        service = Recommender(**kwargs, state=RemoteLiveState(state_actor))  # state_dir & co. go unused: the actor holds the state
        return create_app(service, access, max_body_bytes)

    return build


def serve_on_ray(cfg: DictConfig, options: dict[str, Any], access) -> None:
    """Run the deployment until SIGINT/SIGTERM; shuts down what it started."""
    import ray
    from ray import serve

    from serving.live_state import LiveState

    v = cfg.serve
    with ray_session(cfg):
        state_actor = (
            ray.remote(LiveState)
            .options(name=STATE_ACTOR, num_cpus=0, max_concurrency=64)
            .remote(options["state_dir"], options["max_history"], options["fsync"], options["max_live_users"])
        )
        stats = ray.get(state_actor.stats.remote())
        serve.start(http_options={"host": v.host, "port": v.port})
        ingress = serve.ingress(app_builder(options | {"torch_threads": v.torch_threads}, state_actor, access, v.max_body_bytes))()
        deployment = serve.deployment(ingress, name="towerrec", num_replicas=v.replicas, ray_actor_options={"num_cpus": 0})
        serve.run(deployment.bind(), name="towerrec", route_prefix="/")
        say("serve: %s on Ray Serve, %d replica(s) (log %s, offset %d)", options["bundle_path"], v.replicas, stats["log"], stats["log_offset"])
        say("serve: listening on http://%s:%d (API description: /docs, /openapi.json)", v.host, v.port)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.shutdown()
        ray.get(state_actor.close.remote())
