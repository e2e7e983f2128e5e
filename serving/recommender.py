"""The real-time recommender, without HTTP: a model bundle, its item index, and what was learned
live (events, new items), with recommend / ingest / add_item / generate / reload.

Every request works on one immutable snapshot of the model (``ServingModel``); a reload builds
the next snapshot beside the serving one and swaps a reference, so no request ever sees half of
a reload. New items grow the serving snapshot under its write lock; requests hold its read lock.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inference.bundle import BundleError, ModelBundle, bundle_folder, load_bundle
from inference.faiss_index import build_index, search_unseen
from serving.event_log import StateWriteError
from serving.live_state import DuplicateItemError, LiveState

log = logging.getLogger(__name__)


MIN_TEMPERATURE = 0.01  # /generate: below it (and above 0) the softmax overflows


class ServiceError(Exception):
    """A request the service refuses: an HTTP status, a message, and the field at fault."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class Batcher:
    """Runs the user tower for concurrent requests together: one thread takes every pending
    request (up to ``max_batch`` histories) and computes them in one forward pass, so requests
    share the model's per-call overhead and never compete for the cores or the GIL."""

    def __init__(self, compute, max_batch: int = 64):
        import queue

        self.compute, self.max_batch = compute, max_batch
        self.queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()  # None: stop()
        self.batches = self.rows = 0
        threading.Thread(target=self._loop, name="towerrec-batcher", daemon=True).start()

    def submit(self, m: ServingModel, histories: list[list[int]]) -> np.ndarray:
        """[len(histories), d] user vectors; blocks until computed."""
        from concurrent.futures import Future

        future: Future = Future()
        self.queue.put((m, histories, future))
        return future.result()

    def _loop(self) -> None:
        import queue

        while True:
            first = self.queue.get()
            if first is None:  # stop()
                return
            pending = [first]
            rows = len(pending[0][1])
            while rows < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # stop after this batch
                    break
                pending.append(item)
                rows += len(item[1])
            by_model: dict[int, list[tuple]] = {}
            for item in pending:
                by_model.setdefault(id(item[0]), []).append(item)
            for group in by_model.values():
                histories = [h for _, hs, _ in group for h in hs]
                try:
                    vectors = self.compute(group[0][0], histories)
                except Exception as e:  # noqa: BLE001 - handed to every waiting request, which raises it
                    for _, _, future in group:
                        future.set_exception(e)
                    continue
                self.batches += 1
                self.rows += len(histories)
                start = 0
                for _, hs, future in group:
                    future.set_result(vectors[start : start + len(hs)])
                    start += len(hs)

    def stop(self) -> None:
        """End the thread once the requests already queued are answered."""
        self.queue.put(None)


class ReadWriteLock:
    """Many readers or one writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._readers:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class ServingModel:
    """One model version as served: the bundle's model, the catalog (grown by new items) and
    the FAISS index over its item vectors."""

    bundle: ModelBundle
    item_ids: list[str]
    titles: list[str]
    categories: list[list[str]]
    vectors: np.ndarray  # [N, d] float32, the model's item vectors
    unit: np.ndarray  # [N, d] the same, unit length (diversity works on cosines)
    index: Any  # faiss.Index over ``vectors``
    loaded_at: float
    consumed_offset: int  # log records before this offset are already in the bundle
    max_text_tokens: int
    tokenizer: Any = None
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    _index_of: dict[str, int] = field(default_factory=dict)
    # this snapshot's number, never given to another (the user-vector cache's key; an id() is
    # reused once a snapshot is freed)
    snapshot: int = field(default_factory=itertools.count().__next__)

    @property
    def version(self) -> int:
        return self.bundle.model_version

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def index_of(self, item_id: str) -> int | None:
        return self._index_of.get(item_id)


def _load_serving_model(path: str | Path) -> ServingModel:
    bundle = load_bundle(path)
    model = bundle.model
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # frozen now: the item tower serves text encodings from its cache
    with torch.no_grad():
        vectors = model.catalog_vectors().float().numpy()  # also fills the frozen text caches
    item_ids = [str(i) for i in bundle.catalog.item_ids]
    cfg = bundle.config.get("model", {}).get("item_tower", {})
    return ServingModel(
        bundle=bundle,
        item_ids=item_ids,
        titles=list(bundle.catalog.titles),
        categories=[list(c) for c in bundle.catalog.categories],
        vectors=vectors,
        unit=unit_rows(vectors),
        index=build_index(vectors, "flat"),
        loaded_at=time.time(),
        consumed_offset=int(bundle.manifest.get("lineage", {}).get("log_offset_consumed", 0)),
        max_text_tokens=int(cfg.get("max_text_tokens", bundle.catalog.token_ids.shape[1] if bundle.catalog.token_ids is not None else 32)),
        tokenizer=bundle.load_tokenizer(),
        _index_of={item: n for n, item in enumerate(item_ids)},
    )


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def mmr(candidates: np.ndarray, relevance: np.ndarray, unit: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """Maximal marginal relevance: pick ``k`` of ``candidates`` one by one, each maximising
    (1 - diversity) * relevance - diversity * (max cosine to those picked); relevance is scaled
    to [0, 1] over the candidates so the knob means the same for any model. Returns positions."""
    n = len(candidates)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    span = float(relevance.max() - relevance.min())
    rel = (relevance - relevance.min()) / span if span > 0 else np.ones(n)
    sims = unit[candidates] @ unit[candidates].T
    chosen = [int(np.argmax(rel))]
    closest = sims[chosen[0]].copy()
    free = np.ones(n, dtype=bool)
    free[chosen[0]] = False
    while len(chosen) < min(k, n):
        value = (1.0 - diversity) * rel - diversity * closest
        value[~free] = -np.inf
        pick = int(np.argmax(value))
        chosen.append(pick)
        free[pick] = False
        closest = np.maximum(closest, sims[pick])
    return np.asarray(chosen, dtype=np.int64)


class Recommender:
    """The service's core. Thread-safe; every public method may be called concurrently."""

    def __init__(
        self,
        bundle_path: str | Path,
        state_dir: str | Path | None = None,
        max_history: int = 500,
        explain_window: int = 10,
        reason_template: str = "Because you watched {items}",
        fsync: bool = True,
        state: Any = None,
        user_cache_size: int = 100_000,
        bundle_roots: Sequence[str | Path] | None = None,
        max_live_users: int = 100_000,
    ):
        """``state``: a shared ``LiveState`` (or its Ray proxy); else one over ``state_dir``.
        ``user_cache_size``: user vectors kept, keyed by model snapshot and the history window
        the user tower reads (an event or a reload changes the key: never stale); 0 = off.
        ``bundle_roots``: the folders :meth:`reload` may load a bundle from (None: anywhere)."""
        self.bundle_roots = None if bundle_roots is None else [Path(r).resolve() for r in bundle_roots]
        self.explain_window = explain_window
        self.user_cache_size = user_cache_size
        self._user_cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._user_cache_lock = threading.Lock()
        self.cache_hits = self.cache_misses = 0
        self.batcher = Batcher(lambda m, histories: self._user_vectors(m, histories).numpy())
        self.reason_template = reason_template
        self.bundle_path = Path(bundle_path)
        if state is None:
            if state_dir is None:
                raise TypeError("Recommender: give a state_dir, or a shared state")
            state = LiveState(state_dir, max_history, fsync, max_live_users)
        self.state = state
        self._model = _load_serving_model(self.bundle_path)
        self._reload_lock = threading.Lock()
        self._synced = 0  # item records before this log offset are in the serving model
        self.update_stats: dict[str, float] = {}  # filled by a scheduler of incremental updates, if any
        self._sync_items()

    # ---- state ------------------------------------------------------------------------------
    @property
    def model(self) -> ServingModel:
        return self._model

    def _sync_items(self) -> None:
        """Add the items logged (by this process or another replica) that the model lacks."""
        if not self.state.items_since(self._synced):  # the common case: nothing new, no lock taken
            return
        with self._reload_lock:
            records = self.state.items_since(self._synced)
            missing = [r for r in records if self._model.index_of(r["item_id"]) is None]
            if missing:
                self._add_to_model(self._model, missing)
            if records:
                self._synced = records[-1]["offset"] + 1

    def history_of(self, m: ServingModel, user_id: str | None, history: Sequence[str] | None) -> tuple[list[int], list[str], set[int]]:
        """(item indices, where each came from) of a request's history: ``history`` if given,
        else the user's stored history plus every event ingested since the model was made; and
        the items of every event logged for the user, also those older than the ``max_history``
        live events the model reads (never recommended again; empty for a given history)."""
        if history is not None:
            idx = []
            for n, item in enumerate(history):
                i = m.index_of(str(item))
                if i is None:
                    raise ServiceError(404, f"unknown item_id {item!r}", f"history[{n}]")
                idx.append(i)
            return idx, ["request"] * len(idx), set()
        if user_id is None:
            raise ServiceError(422, "give a user_id or a history", "user_id")
        stored: list[int] = []
        u = m.bundle.users.index_of(user_id)
        view = self.state.user_view(user_id)
        forgotten = view["forgotten_at"]
        if forgotten is not None and forgotten >= m.consumed_offset:  # forgotten since this bundle was made: its history is not used
            u = None
        if u is not None:
            stored = m.bundle.users.histories[u].tolist()
        live = [item for offset, item in view["live"] if offset >= m.consumed_offset]
        if u is None and not live:
            raise ServiceError(404, f"unknown user_id {user_id!r}: no stored history and no ingested event; send events or a history", "user_id")
        found = stored + [m.index_of(item) for item in live]  # None: an item the model lacks
        seen = {i for i in map(m.index_of, view["seen"]) if i is not None}
        return [i for i in found if i is not None], ["stored"] * len(stored) + ["live"] * len(live), seen

    def user_state(self, user_id: str) -> dict[str, Any]:
        m = self._model
        idx, sources, _ = self.history_of(m, user_id, None)
        return {"user_id": user_id, "history": [m.item_ids[i] for i in idx], "live_events": sources.count("live"), "model_version": m.version}

    # ---- model compute ------------------------------------------------------------------------
    def _user_vector(self, m: ServingModel, history: list[int]) -> np.ndarray:
        """One user's vector, from the cache when this model has seen this history window."""
        key = (m.snapshot, tuple(history[-m.bundle.max_seq_len :]))
        if self.user_cache_size:
            with self._user_cache_lock:
                hit = self._user_cache.get(key)
                if hit is not None:
                    self._user_cache.move_to_end(key)
                    self.cache_hits += 1
                    return hit
        vector = self.batcher.submit(m, [history])[0]
        if self.user_cache_size:
            with self._user_cache_lock:
                self.cache_misses += 1
                self._user_cache[key] = vector
                while len(self._user_cache) > self.user_cache_size:
                    self._user_cache.popitem(last=False)
        return vector

    def _user_vectors(self, m: ServingModel, sequences: list[list[int]]) -> torch.Tensor:
        """User vectors after each sequence's last item (each cut to the model's window)."""
        window = m.bundle.max_seq_len
        rows = [s[-window:] for s in sequences]
        width = max(len(r) for r in rows)
        items = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for n, r in enumerate(rows):
            items[n, : len(r)] = torch.as_tensor(r)
            mask[n, : len(r)] = True
        with torch.no_grad():
            return m.bundle.model.user_vectors(items, mask).float()

    def recommend(
        self,
        user_id: str | None = None,
        history: Sequence[str] | None = None,
        k: int = 10,
        exclude: Sequence[str] = (),
        diversity: float = 0.0,
        explain: bool = False,
    ) -> dict[str, Any]:
        self._sync_items()
        m = self._model  # one snapshot for the whole request
        with m.lock.read():
            hist, _, logged = self.history_of(m, user_id, history)
            if not hist:
                raise ServiceError(422, "the history is empty", "history")
            if not 1 <= k <= m.num_items:
                raise ServiceError(422, f"k must be in [1, {m.num_items}] (the catalog's size), got {k}", "k")
            seen = set(hist) | logged
            for n, item in enumerate(exclude):
                i = m.index_of(str(item))
                if i is None:
                    raise ServiceError(404, f"unknown item_id {item!r}", f"exclude[{n}]")
                seen.add(i)
            user = self._user_vector(m, hist)
            depth = k if diversity <= 0 else min(m.num_items, max(4 * k, 50))
            ids, inner = search_unseen(m.index, user[None], [np.fromiter(seen, dtype=np.int64)], depth)
            keep = ids[0] >= 0
            ids, inner = ids[0][keep], inner[0][keep]
            if diversity > 0 and len(ids):
                order = mmr(ids, inner, m.unit, k, diversity)
                ids, inner = ids[order], inner[order]
            ids, inner = ids[:k], inner[:k]
            temperature = float(m.bundle.model.temperature)
            items = [{"item_id": m.item_ids[i], "score": float(s) / temperature, "title": m.titles[i]} for i, s in zip(ids, inner)]
            if explain and items:
                self._explain(m, hist, ids, inner, items)
        return {"items": items, "model_version": m.version}

    def _explain(self, m: ServingModel, hist: list[int], ids: np.ndarray, inner: np.ndarray, items: list[dict]) -> None:
        """Why each item: among the last ``explain_window`` history items, those whose removal
        lowers the item's score most (occlusion: ``contribution`` is the fall in score). Where no
        single removal lowers it (a long history spreads the credit), the history item for which
        the model alone scores the item highest (``affinity``: the score given a history of that
        one item) stands as the reason instead."""
        window = min(self.explain_window, len(hist))
        positions = list(range(len(hist) - window, len(hist)))
        without = [hist[:p] + hist[p + 1 :] for p in positions] if window >= 2 else []
        alone = [[hist[p]] for p in positions]
        users = self.batcher.submit(m, without + alone)  # one batch: [2 * window or 1, d]
        temperature = float(m.bundle.model.temperature)
        candidates = m.vectors[ids].T  # [d, k]
        drop = (inner[None, :] - users[: len(without)] @ candidates) / temperature if without else np.zeros((0, len(ids)))
        affinity = users[len(without) :] @ candidates / temperature  # [window, k]
        for col, it in enumerate(items):
            chosen = [(r, "occlusion") for r in np.argsort(-drop[:, col], kind="stable")[:2] if drop[r, col] > 0]
            if not chosen:
                chosen = [(int(np.argmax(affinity[:, col])), "affinity")]
            it["because"] = [
                {
                    "item_id": m.item_ids[hist[positions[r]]],
                    "title": m.titles[hist[positions[r]]],
                    "evidence": kind,
                    "contribution": float(drop[r, col]) if kind == "occlusion" else None,
                    "affinity": float(affinity[r, col]),
                }
                for r, kind in chosen
            ]
            it["reason"] = self.reason_template.format(items=" and ".join(b["title"] for b in it["because"]))

    def generate(
        self,
        user_id: str | None = None,
        history: Sequence[str] | None = None,
        length: int = 10,
        temperature: float = 1.0,
        top_p: float = 1.0,
        no_repeat: bool = True,
        seed: int | None = None,
        diversity: float = 0.0,
    ) -> dict[str, Any]:
        """A feed sampled item by item from the user tower's softmax over the catalog, each step
        conditioned on the history plus what was generated so far."""
        if 0 < temperature < MIN_TEMPERATURE:  # logits / 1e-39 overflow: no distribution left to sample
            raise ServiceError(422, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {temperature}", "temperature")
        self._sync_items()
        m = self._model
        generator = torch.Generator().manual_seed(seed if seed is not None else int(time.time_ns() % 2**63))
        with m.lock.read():
            hist, _, logged = self.history_of(m, user_id, history)
            if not hist:
                raise ServiceError(422, "the history is empty", "history")
            banned = torch.zeros(m.num_items, dtype=torch.bool)
            if no_repeat:
                banned[hist] = True
                banned[list(logged)] = True
            if no_repeat and length > m.num_items - int(banned.sum()):
                raise ServiceError(422, f"length {length} exceeds the {m.num_items - int(banned.sum())} items not yet seen", "length")
            vectors = torch.from_numpy(m.vectors)
            unit = torch.from_numpy(m.unit)
            closest = torch.full((m.num_items,), -1.0)
            sequence = list(hist)
            out: list[dict[str, Any]] = []
            for _ in range(length):
                logits = vectors @ torch.from_numpy(self._user_vector(m, sequence)) / float(m.bundle.model.temperature)
                if diversity > 0 and out:
                    logits = logits - diversity * closest.clamp(min=0) * logits.std()
                logits = logits.masked_fill(banned, float("-inf"))
                if temperature == 0:
                    pick = int(torch.argmax(logits))
                    probs = torch.zeros_like(logits)
                    probs[pick] = 1.0
                else:
                    probs = torch.softmax(logits / temperature, dim=0)
                    if top_p < 1.0:
                        sorted_p, order = torch.sort(probs, descending=True)
                        cut = int(torch.searchsorted(torch.cumsum(sorted_p, 0), torch.tensor(top_p))) + 1
                        nucleus = torch.zeros_like(probs)
                        nucleus[order[:cut]] = probs[order[:cut]]
                        probs = nucleus / nucleus.sum()
                    pick = int(torch.multinomial(probs, 1, generator=generator))
                out.append({"item_id": m.item_ids[pick], "title": m.titles[pick], "prob": float(probs[pick])})
                sequence.append(pick)
                if no_repeat:
                    banned[pick] = True
                closest = torch.maximum(closest, unit @ unit[pick])
        return {"items": out, "model_version": m.version}

    # ---- learning live --------------------------------------------------------------------------
    def ingest(self, user_id: str, item_id: str, ts: float | None = None) -> dict[str, Any]:
        """Record one event durably; the next request for this user reflects it."""
        self._sync_items()
        if self._model.index_of(item_id) is None:
            raise ServiceError(404, f"unknown item_id {item_id!r}", "item_id")
        record = self._append("event", user_id=user_id, item_id=item_id, ts=float(ts) if ts is not None else time.time())
        return {"offset": record["offset"], "user_id": user_id, "item_id": item_id}

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Log a record durably; a write that failed (disk full, I/O error) is a 503 that says
        nothing was recorded, and the next request may try again."""
        try:
            return self.state.append(kind, **fields)
        except DuplicateItemError:  # logged by another replica since this one's check
            raise ServiceError(409, f"item_id {fields['item_id']!r} is already in the catalog", "item_id") from None
        except StateWriteError as e:
            raise ServiceError(503, f"the {kind} was not recorded: the service's state could not be written; try again", None) from e

    def forget_user(self, user_id: str) -> dict[str, Any]:
        """Erase the user's events from the live state and the log, and stop using their stored
        history; the next ``jobs.update`` drops them from the bundle's tables."""
        try:
            out = self.state.forget(user_id)
        except StateWriteError as e:
            raise ServiceError(503, "the user was not forgotten: the service's state could not be written; try again", None) from e
        with self._user_cache_lock:  # vectors computed from their histories
            self._user_cache.clear()
        return {"user_id": user_id, **out}

    def add_item(self, item_id: str, text: str, categories: Sequence[str] = (), title: str | None = None) -> dict[str, Any]:
        """Encode a new item from its text and make it recommendable at once (durably logged)."""
        self._sync_items()
        with self._reload_lock:  # one writer of new items at a time; a reload waits for it
            m = self._model
            if m.index_of(item_id) is not None:
                raise ServiceError(409, f"item_id {item_id!r} is already in the catalog", "item_id")
            if m.tokenizer is None or m.bundle.model.item_tower.encoder is None:
                raise ServiceError(422, "this model has no text tower: it cannot score an item from its text", "text")
            try:  # what every restart will do with it, before it is made durable
                m.tokenizer([text], truncation=True, max_length=m.max_text_tokens)
            except Exception as e:  # the tokenizer's own error types vary (Rust, Python)
                raise ServiceError(422, f"text: the item tower's tokenizer cannot encode it ({type(e).__name__})", "text") from None
            record = {"item_id": item_id, "text": text, "categories": list(categories), "title": title or text[:80]}
            logged = self._append("item", **record)  # durable first, then served
        self._sync_items()
        return {"offset": logged["offset"], "item_id": item_id, "item_idx": self._model.index_of(item_id)}

    def _add_to_model(self, m: ServingModel, records: list[dict[str, Any]]) -> None:
        tower = m.bundle.model.item_tower
        enc = m.tokenizer([r["text"] for r in records], padding="longest", truncation=True, max_length=m.max_text_tokens, return_tensors="pt")
        with m.lock.write():
            new = tower.add_items(enc["input_ids"], enc["attention_mask"])
            with torch.no_grad():
                vectors = m.bundle.model.item_vectors(new).float().numpy()
            m.vectors = np.concatenate([m.vectors, vectors])
            m.unit = np.concatenate([m.unit, unit_rows(vectors)])
            m.index.add(np.ascontiguousarray(vectors))
            for r in records:
                m._index_of[r["item_id"]] = len(m.item_ids)
                m.item_ids.append(r["item_id"])
                m.titles.append(r.get("title") or r["text"][:80])
                m.categories.append(list(r.get("categories") or []))

    def reload(self, bundle_path: str | Path | None = None) -> dict[str, Any]:
        """Load a (newer) bundle beside the serving one, re-add the logged new items it lacks,
        then swap: requests in flight finish on the old model, later ones use the new one."""
        with self._reload_lock:
            path = self.bundle_path
            if bundle_path:
                wanted = Path(bundle_path).resolve()
                if self.bundle_roots is not None and not any(wanted.is_relative_to(root) for root in self.bundle_roots):
                    raise ServiceError(403, "bundle: not under a folder this service may load bundles from (serve.bundle_roots)", "bundle")
                found = bundle_folder(wanted)
                if found is None:
                    raise ServiceError(404, "bundle: no model bundle there (a bundle folder or a run folder holding bundle/)", "bundle")
                path = found.resolve()
            start = time.perf_counter()
            try:
                fresh = _load_serving_model(path)
            except BundleError as e:  # the old model keeps serving; the reply names the bundle's file, not where it lives
                raise ServiceError(422, f"bundle: {e.path.name} {e.problem}", "bundle") from None
            missing = [r for r in self.state.items_since(0) if fresh.index_of(r["item_id"]) is None]
            if missing:
                self._add_to_model(fresh, missing)
            old = self._model
            self._model, self.bundle_path = fresh, path
        with self._user_cache_lock:  # the old snapshot's vectors are never asked for again
            self._user_cache.clear()
        log.info("reloaded %s: model version %d -> %d in %.1f s", path, old.version, fresh.version, time.perf_counter() - start)
        return {"model_version": fresh.version, "previous_version": old.version, "bundle": str(path), "seconds": time.perf_counter() - start}

    def health(self) -> dict[str, Any]:
        m = self._model
        return (
            self.state.stats()
            | {
                "status": "ok",
                "bundle": str(self.bundle_path),
                "model_version": m.version,
                "model_age_seconds": model_age_seconds(m),
                "serving_seconds": time.time() - m.loaded_at,
                "items": m.num_items,
                "known_users": len(m.bundle.users.user_ids),
                "user_cache_hits": self.cache_hits,
                "user_cache_misses": self.cache_misses,
                "batches": self.batcher.batches,
                "batched_rows": self.batcher.rows,
            }
            | {f"update_{k}": v for k, v in self.update_stats.items()}
        )

    def close(self) -> None:
        self.batcher.stop()
        self.state.close()


def model_age_seconds(m: ServingModel) -> float:
    created = m.bundle.manifest.get("created")
    if not created:
        return math.nan
    from datetime import datetime

    return time.time() - datetime.fromisoformat(created).timestamp()
