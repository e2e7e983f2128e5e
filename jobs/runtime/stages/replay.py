"""``jobs.replay``: streaming (prequential) evaluation of the whole loop on time-ordered data.

The dataset is cut in time (``replay.cutoff_quantile`` of the timestamps). A model is trained
(the experiment's pipeline) on everything before the cut; items that first appear after it are
left out of that catalog. Then every later interaction is played in time order against the
service's core (``serving.recommender.Recommender``, the code behind the HTTP API): before each
event the user's top-K is asked for and the event's item is scored (rank among unseen items:
NDCG@K, Recall@K), then the event is ingested. An item seen for the first time is added from its
text just before its first event, so new items are recommendable and counted. Variants:

- ``frozen``: the model and the histories as at the cut (events are not ingested);
- ``live``: histories updated by every event, the model frozen;
- ``updated``: ``live`` plus an incremental update (jobs.update) every ``replay.update_every``
  events, hot-reloaded.

Writes per-event ranks (``events.parquet``), per-variant and per-time-bucket metrics, the update
cost and freshness figures, a plot of NDCG@K over stream time, and ``results.md``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig

from datamodules.parquet_dataset import write_raw_parquet
from jobs.runtime.config.run_folder import create_run_folder, run_log_file, write_metrics
from jobs.runtime.config.schema import validate
from jobs.runtime.stages.pipeline import run_pipeline
from jobs.runtime.stages.update import run_update
from jobs.runtime.tracking.console import say
from serving.recommender import Recommender, ServiceError

log = logging.getLogger(__name__)

VARIANTS = ("frozen", "live", "updated")


def split_in_time(raw, quantile: float) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, int]:
    """(interactions before the cut, the stream after it in time order, the items known before
    the cut, the cut timestamp)."""
    inter = raw.interactions.reset_index(drop=True).copy()
    inter["order"] = np.arange(len(inter))
    cut = int(np.quantile(inter["timestamp"].to_numpy(), quantile))
    before = inter[inter["timestamp"] < cut]
    stream = inter[inter["timestamp"] >= cut].sort_values(["timestamp", "order"], kind="mergesort")
    items = raw.items.reset_index(drop=True)
    known = items[items["item_id"].astype(str).isin(set(before["item_id"].astype(str)))]
    return before, stream, known, cut


def ndcg_at(rank: int | None, k: int) -> float:
    return 1.0 / math.log2(rank + 2) if rank is not None and rank < k else 0.0


def play(
    service: Recommender, stream: pd.DataFrame, items: pd.DataFrame, k: int, variant: str, update=None, update_every: int = 0
) -> tuple[pd.DataFrame, list[dict]]:
    """Play the stream against ``service``; returns per-event rows and the updates made."""
    texts = items.set_index(items["item_id"].astype(str))
    rows, updates = [], []
    since_update = 0
    for user, item, ts in zip(stream["user_id"].astype(str), stream["item_id"].astype(str), stream["timestamp"]):
        new_item = service.model.index_of(item) is None
        if new_item:
            row = texts.loc[item]
            service.add_item(item, str(row["text"]), list(row["categories"]), str(row.get("title", row["text"]))[:200])
        rank = None
        scored = True
        try:
            ids = [it["item_id"] for it in service.recommend(user_id=user, k=k)["items"]]
            rank = ids.index(item) if item in ids else None
        except ServiceError as e:  # only "no history yet" is expected
            if e.status != 404 or e.field != "user_id":
                raise
            scored = False  # a user's first event: nothing to recommend from yet
        rows.append(
            {
                "variant": variant,
                "timestamp": int(ts),
                "user_id": user,
                "item_id": item,
                "scored": scored,
                "rank": -1 if rank is None else rank,
                "new_item": new_item,
            }
        )
        if variant != "frozen":
            service.ingest(user, item, float(ts))
            since_update += 1
        if variant == "updated" and update is not None and since_update >= update_every:
            updates.append(update(service))
            since_update = 0
    return pd.DataFrame(rows), updates


def summarise(events: pd.DataFrame, k: int, buckets: int) -> tuple[dict[str, float], pd.DataFrame]:
    scored = events[events["scored"]].copy()
    scored["ndcg"] = [ndcg_at(r if r >= 0 else None, k) for r in scored["rank"]]
    scored["hit"] = (scored["rank"] >= 0) & (scored["rank"] < k)
    edges = np.quantile(events["timestamp"], np.linspace(0, 1, buckets + 1))
    scored["bucket"] = np.clip(np.searchsorted(edges, scored["timestamp"], side="right") - 1, 0, buckets - 1)
    metrics = {}
    # the events of users the model knew at the cut (those the frozen variant scores): the
    # same events for every variant, so the variants compare like for like
    frozen = events[events["variant"] == "frozen"]
    known = frozen["scored"].to_numpy() if len(frozen) else None
    for variant, g in events.groupby("variant", sort=False) if known is not None else ():
        sub = g.reset_index(drop=True)[known]
        hits = (sub["rank"] >= 0) & (sub["rank"] < k)
        metrics[f"{variant}/known_users/ndcg@{k}"] = float(np.mean([ndcg_at(r if r >= 0 else None, k) for r in sub["rank"]])) if len(sub) else float("nan")
        metrics[f"{variant}/known_users/recall@{k}"] = float(hits.mean()) if len(sub) else float("nan")
        metrics[f"{variant}/known_users/events"] = float(len(sub))
    per_bucket = scored.groupby(["variant", "bucket"]).agg(ndcg=("ndcg", "mean"), recall=("hit", "mean"), events=("ndcg", "size")).reset_index()
    for variant, g in scored.groupby("variant"):
        metrics[f"{variant}/ndcg@{k}"] = float(g["ndcg"].mean())
        metrics[f"{variant}/recall@{k}"] = float(g["hit"].mean())
        metrics[f"{variant}/events_scored"] = float(len(g))
        new = g[g["new_item"]]
        metrics[f"{variant}/new_item_events"] = float(len(new))
        metrics[f"{variant}/new_item_recall@{k}"] = float(new["hit"].mean()) if len(new) else float("nan")
    return metrics, per_bucket


def plot(per_bucket: pd.DataFrame, k: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for variant, g in per_bucket.groupby("variant"):
        ax.plot(g["bucket"] + 1, g["ndcg"], marker="o", label=variant)
    ax.set(xlabel="stream time bucket (equal numbers of events, oldest first)", ylabel=f"prequential NDCG@{k}", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_replay(cfg: DictConfig) -> dict[str, float]:
    """``jobs.replay``: see the module docstring."""
    validate(cfg)
    r = cfg.replay
    run_dir = create_run_folder(cfg)
    with run_log_file(run_dir):
        raw = instantiate(cfg.data.reader, _convert_="all")
        before, stream, known, cut = split_in_time(raw, r.cutoff_quantile)
        if r.max_events:
            stream = stream.head(r.max_events)
        new_items = sorted(set(stream["item_id"].astype(str)) - set(known["item_id"].astype(str)))
        say(
            "replay: %s cut at timestamp %d: %d interactions before, %d after (%d items first seen after the cut); run folder %s",
            cfg.data.name,
            cut,
            len(before),
            len(stream),
            len(new_items),
            run_dir,
        )
        write_raw_parquet(run_dir / "before_cut", before[["user_id", "item_id", "timestamp"]], known)
        train = cfg.copy()
        train.job = "pipeline"
        train.data.name = f"{cfg.data.name}_before_{cut}"
        train.data.reader = {"_target_": "datamodules.parquet_dataset.read_raw_parquet", "folder": str(run_dir / "before_cut"), "name": train.data.name}
        train.pipeline.batch_infer = False
        train.paths.output_dir = str(run_dir / "train")
        run_pipeline(train)
        bundle = run_dir / "train" / "finetune" / "bundle"
        if not bundle.is_dir():  # reused stages live in an earlier pipeline's folders
            bundle = Path(json.loads((run_dir / "train" / "stages.json").read_text())["finetune"]) / "bundle"
        all_events, metrics, updates_all = [], {}, []
        for variant in r.variants:
            state = run_dir / "state" / variant
            service = Recommender(bundle, state, fsync=False, user_cache_size=0)
            update = None
            if variant == "updated":
                update = updater(cfg, run_dir, state, updates_all)
            start = time.perf_counter()
            say("replay: variant %s over %d events%s", variant, len(stream), f", an update every {r.update_every} events" if variant == "updated" else "")
            events, _ = play(service, stream, raw.items, r.k, variant, update, r.update_every)
            metrics[f"{variant}/seconds"] = time.perf_counter() - start
            all_events.append(events)
            if variant == "live":
                metrics |= freshness(service, stream)
            service.close()
        events = pd.concat(all_events, ignore_index=True)
        events.to_parquet(run_dir / "events.parquet", index=False)
        summary, per_bucket = summarise(events, r.k, r.buckets)
        metrics |= summary
        if updates_all:
            metrics["updated/updates"] = float(len(updates_all))
            metrics["updated/update_seconds_mean"] = float(np.mean([u["update_seconds"] for u in updates_all]))
            metrics["updated/update_to_serving_seconds_mean"] = float(np.mean([u["to_serving_seconds"] for u in updates_all]))
        per_bucket.to_csv(run_dir / "per_bucket.csv", index=False)
        plot(per_bucket, r.k, run_dir / "ndcg_over_time.png", f"{cfg.experiment_name}: prequential NDCG@{r.k} after the cut (seed {cfg.seed})")
        write_metrics(run_dir, metrics)
        table = results_table(metrics, r.k, list(r.variants))
        (run_dir / "results.md").write_text(table + "\n")
    print(table)
    return metrics


def updater(cfg: DictConfig, run_dir: Path, state: Path, records: list):
    """A function that runs jobs.update on the service's log and hot-reloads the result."""

    def update(service: Recommender) -> dict:
        ucfg = cfg.copy()
        ucfg.job = "update"
        ucfg["update"].bundle = str(service.bundle_path)
        ucfg["update"].state_dir = str(state)
        ucfg["update"].result_file = str(run_dir / "updates" / "result.json")
        ucfg.paths.outputs_root = str(run_dir / "updates")
        start = time.perf_counter()
        run_update(ucfg)
        result = json.loads((run_dir / "updates" / "result.json").read_text())
        seconds = time.perf_counter() - start
        if not result["noop"]:
            service.reload(result["bundle"])
        out = {"update_seconds": seconds, "to_serving_seconds": time.perf_counter() - start, "model_version": service.model.version}
        records.append(out)
        return out

    return update


def freshness(service: Recommender, stream: pd.DataFrame, samples: int = 50) -> dict[str, float]:
    """Seconds from an event's arrival to a recommendation that reflects it: ingest, then recommend."""
    times = []
    users = stream["user_id"].astype(str).unique()[:samples]
    items = [i for i in stream["item_id"].astype(str).unique() if service.model.index_of(i) is not None][:samples]
    for user, item in zip(users, items):
        start = time.perf_counter()
        service.ingest(user, item)
        service.recommend(user_id=user, k=10)
        times.append(time.perf_counter() - start)
    return {"live/event_to_reflected_recommendation_ms_p50": 1000 * float(np.median(times))} if times else {}


def results_table(metrics: dict[str, float], k: int, variants: list[str]) -> str:
    lines = [
        f"| variant | NDCG@{k} | Recall@{k} | events scored | NDCG@{k}, users known at the cut | Recall@{k}, users known at the cut | their events | new-item events | new-item Recall@{k} | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in variants:
        g = lambda key, v=v: metrics.get(f"{v}/{key}", float("nan"))  # noqa: E731
        lines.append(
            f"| {v} | {g(f'ndcg@{k}'):.4f} | {g(f'recall@{k}'):.4f} | {g('events_scored'):.0f} | {g(f'known_users/ndcg@{k}'):.4f} | "
            f"{g(f'known_users/recall@{k}'):.4f} | {g('known_users/events'):.0f} | {g('new_item_events'):.0f} | {g(f'new_item_recall@{k}'):.4f} | {g('seconds'):.0f} |"
        )
    if "updated/updates" in metrics:
        lines.append(
            f"\n{metrics['updated/updates']:.0f} updates, {metrics['updated/update_seconds_mean']:.1f} s each on average (start to serving {metrics['updated/update_to_serving_seconds_mean']:.1f} s)"
        )
    if "live/event_to_reflected_recommendation_ms_p50" in metrics:
        lines.append(
            f"event to a recommendation that reflects it (ingest + recommend, in process): {metrics['live/event_to_reflected_recommendation_ms_p50']:.1f} ms (median)"
        )
    return "\n".join(lines)
