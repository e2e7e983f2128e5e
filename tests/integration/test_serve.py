"""The real-time service over real HTTP on loopback: a server process started as a user starts it
(``python -m jobs.serve``) on a tiny trained bundle. Every loop here is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from inference.bundle import load_bundle
from jobs import pipeline
from tests.conftest import ROOT, TINY, compose_config

MAX_BODY = 4096


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 60.0) -> None:
    """Polls condition() until it holds; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Server:
    """A ``jobs.serve`` process on loopback; stopped (killed if need be) by ``stop``."""

    def __init__(self, root: Path, bundle: Path, state: Path, *extra: str, host: str = "127.0.0.1", env: dict | None = None, key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}  # what wait_ready's /healthz sends
        args = [
            sys.executable,
            "-m",
            "jobs.serve",
            f"serve.bundle={bundle}",
            f"serve.port={self.port}",
            f"serve.host={host}",
            f"serve.state_dir={state}",
            f"serve.max_body_bytes={MAX_BODY}",
            f"paths.root_dir={root}",
            "logger=none",
            *extra,
        ]
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("TOWERREC_")}, "WANDB_MODE": "disabled", **(env or {})}
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_ready(self, timeout: float = 120.0) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.proc.stdout.read()[-3000:]}")
            try:
                if requests.get(self.url + "/healthz", headers=self.headers, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:  # not listening yet, or a proxy waiting for its replicas
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not answer /healthz")

    def post(self, path: str, body: dict | None = None, **kw) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=30, **kw)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny pipeline trained once (local, no Ray): its folders and its bundle."""
    root = tmp_path_factory.mktemp("serve")
    cfg = compose_config(
        "pipeline",
        [*TINY, "pretrain.max_epochs=2", "finetune.max_epochs=2", "data.batch_size=16", "pipeline.batch_infer=false", f"paths.output_dir={root}/pipeline"],
        root,
    )
    pipeline.run(cfg)
    run = root / "pipeline"
    return {
        "root": root,
        "run": run,
        "finetune": run / "finetune" / "bundle",
        "pretrain": run / "pretrain" / "bundle",
        "bundle": load_bundle(run / "finetune" / "bundle"),
    }


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    s = Server(trained["root"], trained["run"], tmp_path_factory.mktemp("state")).wait_ready()
    yield s
    s.stop()


def a_user(trained, n: int = 0) -> str:
    return str(trained["bundle"].users.user_ids[n])


def test_every_endpoint_answers(server, trained):
    health = requests.get(server.url + "/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["items"] == 60 and health["known_users"] == 120
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/recommend", "/events", "/items", "/generate", "/admin/reload", "/healthz", "/metrics"} <= set(spec["paths"])
    user = a_user(trained)
    rec = server.post("/recommend", {"user_id": user, "k": 5, "explain": True}).json()
    assert len(rec["items"]) == 5 and rec["model_version"] == 1
    history = set(trained["bundle"].catalog.item_ids[trained["bundle"].users.histories[0]])
    assert not {it["item_id"] for it in rec["items"]} & history  # seen items are excluded
    assert all(it["title"] and np.isfinite(it["score"]) for it in rec["items"])
    scores = [it["score"] for it in rec["items"]]
    assert scores == sorted(scores, reverse=True)
    for it in rec["items"]:  # explanations name history items, from their titles
        assert 1 <= len(it["because"]) <= 2 and all(b["item_id"] in history for b in it["because"])
        for b in it["because"]:  # a measured fall in score when left out, else the best single-item affinity
            assert (b["evidence"] == "occlusion" and b["contribution"] > 0) or (b["evidence"] == "affinity" and len(it["because"]) == 1)
        assert it["reason"].startswith("Because you watched ") and it["because"][0]["title"] in it["reason"]
    assert server.post("/events", {"user_id": "someone-new", "item_id": "i3"}).status_code == 200
    assert requests.get(server.url + "/users/someone-new", timeout=10).json()["history"] == ["i3"]
    assert len(server.post("/recommend", {"user_id": "someone-new", "k": 3}).json()["items"]) == 3  # served from its events
    feed = server.post("/generate", {"user_id": user, "length": 4, "seed": 1}).json()
    assert len(feed["items"]) == 4 and all(0 < it["prob"] <= 1 for it in feed["items"])
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    assert 'towerrec_requests_total{endpoint="/recommend",status="200"}' in metrics
    assert "towerrec_request_seconds_bucket" in metrics and "towerrec_model_version 1.0" in metrics
    assert "towerrec_events_ingested_total 1.0" in metrics


BAD = [
    ("/recommend", {"user_id": "nobody-at-all"}, 404, "user_id"),
    ("/recommend", {"history": ["i1", "no-such-item"]}, 404, "history[1]"),
    ("/recommend", {"history": []}, 422, "history"),
    ("/recommend", {}, 422, "user_id"),
    ("/recommend", {"history": ["i1"], "k": 0}, 422, "k"),
    ("/recommend", {"history": ["i1"], "k": 61}, 422, "k"),
    ("/recommend", {"history": ["i1"], "k": "5"}, 422, "k"),
    ("/recommend", {"history": "i1"}, 422, "history"),
    ("/recommend", {"history": ["i1"], "diversity": 1.5}, 422, "diversity"),
    ("/recommend", {"history": ["i1"], "exclude": ["zzz"]}, 404, "exclude[0]"),
    ("/recommend", {"history": ["i1"], "colour": "red"}, 422, "colour"),
    ("/events", {"user_id": "u", "item_id": "no-such-item"}, 404, "item_id"),
    ("/events", {"user_id": "u"}, 422, "item_id"),
    ("/events", {"user_id": 7, "item_id": "i1"}, 422, "user_id"),
    ("/items", {"item_id": "i1", "text": "again"}, 409, "item_id"),
    ("/items", {"item_id": "x", "text": ""}, 422, "text"),
    ("/generate", {"history": ["i1"], "top_p": 0}, 422, "top_p"),
    ("/generate", {"history": ["i1"], "length": 60}, 422, "length"),
    ("/generate", {"history": ["i1"], "temperature": -1}, 422, "temperature"),
]


@pytest.mark.parametrize("path,body,status,field", BAD, ids=[f"{p}-{f}-{s}" for p, _, s, f in BAD])
def test_bad_input_is_refused_naming_the_field_and_changes_nothing(server, path, body, status, field):
    before = requests.get(server.url + "/healthz", timeout=10).json()
    r = server.post(path, body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and r.json()["error"]
    after = requests.get(server.url + "/healthz", timeout=10).json()
    assert (after["log_offset"], after["items"], after["live_users"]) == (before["log_offset"], before["items"], before["live_users"])


def test_malformed_and_oversized_bodies(server):
    r = requests.post(server.url + "/recommend", data=b'{"history": ["i1"', headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "body" and "malformed JSON" in r.json()["error"]
    r = requests.post(
        server.url + "/events", data=json.dumps({"user_id": "x" * MAX_BODY, "item_id": "i1"}), headers={"content-type": "application/json"}, timeout=10
    )
    assert r.status_code == 413 and r.json()["field"] == "body"
    chunks = (b"x" * 1024 for _ in range(8))  # no Content-Length: counted as it streams in
    r = requests.post(server.url + "/events", data=chunks, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == 413
    assert requests.get(server.url + "/healthz", timeout=10).status_code == 200


def test_an_event_changes_the_next_recommendation(server, trained):
    user = a_user(trained, 5)
    before = {it["item_id"]: it["score"] for it in server.post("/recommend", {"user_id": user, "k": 20}).json()["items"]}
    watched = list(before)[:2]
    for item in watched:
        assert server.post("/events", {"user_id": user, "item_id": item}).status_code == 200
    after = {it["item_id"]: it["score"] for it in server.post("/recommend", {"user_id": user, "k": 20}).json()["items"]}
    assert not set(watched) & set(after)  # now seen
    common = set(before) & set(after)
    assert common and any(abs(before[i] - after[i]) > 1e-4 for i in common)  # the user's vector moved


def test_a_new_item_is_recommendable_at_once_from_its_text(server, trained):
    catalog = trained["bundle"].catalog
    text = catalog.texts[7].replace("#7", "#new")  # the words of an existing item
    r = server.post("/items", {"item_id": "fresh-1", "text": text, "categories": catalog.categories[7]})
    assert r.status_code == 200 and r.json()["item_idx"] == 60
    everything = server.post("/recommend", {"history": ["i1", "i2"], "k": 59}).json()["items"]
    assert "fresh-1" in [it["item_id"] for it in everything]
    assert server.post("/events", {"user_id": "fan", "item_id": "fresh-1"}).status_code == 200  # it can be consumed too
    assert server.post("/recommend", {"user_id": "fan", "k": 3}).status_code == 200


def test_generate_respects_no_repeat_and_a_seed(server, trained):
    user = a_user(trained, 3)
    history = set(trained["bundle"].catalog.item_ids[trained["bundle"].users.histories[3]])
    body = {"user_id": user, "length": 12, "temperature": 1.0, "top_p": 0.95, "seed": 42}
    first = [it["item_id"] for it in server.post("/generate", body).json()["items"]]
    again = [it["item_id"] for it in server.post("/generate", body).json()["items"]]
    other = [it["item_id"] for it in server.post("/generate", body | {"seed": 43}).json()["items"]]
    assert first == again and first != other
    assert len(set(first)) == 12 and not set(first) & history
    greedy = [it["item_id"] for it in server.post("/generate", {"user_id": user, "length": 1, "temperature": 0}).json()["items"]]
    assert greedy == [server.post("/recommend", {"user_id": user, "k": 1}).json()["items"][0]["item_id"]]


def test_mmr_raises_intra_list_diversity_as_the_knob_rises(server, trained):
    vectors = trained["bundle"].model.catalog_vectors().numpy()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {str(i): n for n, i in enumerate(trained["bundle"].catalog.item_ids)}

    def ild(items: list[str]) -> float:
        v = unit[[index[i] for i in items if i in index]]  # items added live by other tests are left out
        sims = v @ v.T
        return float(1 - sims[np.triu_indices(len(v), 1)].mean())

    knobs = [0.0, 0.3, 0.7, 1.0]
    means = []
    for knob in knobs:
        lists = [server.post("/recommend", {"user_id": a_user(trained, n), "k": 10, "diversity": knob}).json()["items"] for n in range(10)]
        means.append(np.mean([ild([it["item_id"] for it in items]) for items in lists]))
    assert all(b >= a - 1e-6 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0] + 0.05, means


def test_reload_loads_only_from_the_bundle_roots_and_names_no_server_path(server, trained):
    outside = server.post("/admin/reload", {"bundle": str(trained["pretrain"])})  # the bundle roots: <root>/outputs
    assert outside.status_code == 403 and outside.json()["field"] == "bundle" and str(trained["root"]) not in outside.text
    assert requests.get(server.url + "/healthz", timeout=10).json()["bundle"] == str(trained["run"] / "finetune" / "bundle")


def test_reload_under_concurrent_load_fails_no_request(trained, tmp_path):
    s = Server(trained["root"], trained["run"], tmp_path / "state", f"serve.bundle_roots=[{trained['root']}]").wait_ready()
    try:
        user = a_user(trained, 1)
        errors, done = [], []
        stop = threading.Event()

        def client() -> None:
            for _ in range(400):  # bounded
                if stop.is_set():
                    return
                try:
                    r = s.post("/recommend", {"user_id": user, "k": 5})
                    (done if r.status_code == 200 else errors).append(r.status_code)
                except requests.RequestException as e:
                    errors.append(repr(e))

        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: len(done) >= 10)  # the load is on
        before = s.post("/recommend", {"user_id": user, "k": 5}).json()["items"]
        r = s.post("/admin/reload", {"bundle": str(trained["pretrain"])})
        assert r.status_code == 200, r.text
        after = s.post("/recommend", {"user_id": user, "k": 5}).json()["items"]
        served_at_reload = len(done)
        wait_until(lambda: len(done) >= served_at_reload + 10)  # and carries on after the reload
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert errors == [] and len(done) > 20
        assert [it["score"] for it in before] != [it["score"] for it in after]  # another model answers now
        assert requests.get(s.url + "/healthz", timeout=10).json()["bundle"] == str(trained["pretrain"].resolve())
    finally:
        s.stop()


def test_kill_9_under_concurrent_writers_loses_no_acknowledged_event(trained, tmp_path):
    state = tmp_path / "state"
    s = Server(trained["root"], trained["run"], state).wait_ready()
    writers = 4
    acked: dict[int, list[str]] = {w: [] for w in range(writers)}
    threads: list[threading.Thread] = []
    try:
        assert s.post("/items", {"item_id": "kept-item", "text": "plough sheep wheat"}).status_code == 200
        started = threading.Barrier(writers + 1)

        def write(w: int) -> None:
            started.wait()
            for n in range(400):  # bounded; the kill ends it sooner
                item = "kept-item" if n == 3 else f"i{(n * 7 + w) % 60}"
                try:
                    r = requests.post(s.url + "/events", json={"user_id": f"crash-{w}", "item_id": item}, timeout=10)
                except requests.RequestException:
                    return  # the service is gone: this event was not acknowledged
                if r.status_code == 200:
                    acked[w].append(item)

        threads += [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        started.wait()
        wait_until(lambda: sum(map(len, acked.values())) >= 40, timeout=120)
    finally:
        s.stop(signal.SIGKILL)  # while the writers are still sending
    for t in threads:
        t.join(timeout=60)
    assert all(len(a) < 400 for a in acked.values())  # the kill came mid-stream
    again = Server(trained["root"], trained["run"], state).wait_ready()
    try:
        for w, items in acked.items():
            history = requests.get(again.url + f"/users/crash-{w}", timeout=10).json()["history"]
            # every acknowledged event, in order; at most the one in flight at the kill besides
            assert history[: len(items)] == items and len(history) - len(items) <= 1, w
        assert again.post("/recommend", {"history": ["kept-item"], "k": 2}).status_code == 200
    finally:
        again.stop()


def test_a_second_service_on_the_same_state_folder_stops_and_the_first_serves_on(server, trained):
    second = Server(trained["root"], trained["run"], server.state)
    out, _ = second.proc.communicate(timeout=120)
    assert second.proc.returncode != 0
    assert f"{server.state}: another process (pid {server.proc.pid}) writes this state folder" in out
    assert server.post("/events", {"user_id": "after-refusal", "item_id": "i3"}).status_code == 200
    assert requests.get(server.url + "/users/after-refusal", timeout=10).json()["history"] == ["i3"]


READ_KEY, WRITE_KEY, ADMIN_KEY = "read-key-0123456789", "write-key-0123456789", "admin-key-0123456789"
# every endpoint, the scope it needs, and a body it accepts
ENDPOINTS = [
    ("post", "/recommend", "read", {"history": ["i1"], "k": 2}),
    ("post", "/generate", "read", {"history": ["i1"], "length": 2, "seed": 0}),
    ("get", "/healthz", "read", None),
    ("post", "/events", "write", {"user_id": "guarded-user", "item_id": "i2"}),
    ("get", "/users/guarded-user", "admin", None),
    ("delete", "/users/nobody-to-forget", "admin", None),
    ("post", "/items", "admin", {"item_id": "guarded", "text": "barn sheep"}),
    ("get", "/metrics", "admin", None),
    ("get", "/openapi.json", "admin", None),
    ("get", "/docs", "admin", None),
]


def test_off_loopback_every_endpoint_needs_a_key_of_its_scope_and_no_key_reaches_the_run_folder(trained, tmp_path):
    refused = Server(trained["root"], trained["run"], tmp_path / "a", host="0.0.0.0")
    out, _ = refused.proc.communicate(timeout=120)
    assert refused.proc.returncode != 0 and "not loopback, with no API key" in out and "serve.keys_file" in out
    keys = tmp_path / "keys"
    keys.write_text(f"# one key per line\nread {READ_KEY}\nwrite {WRITE_KEY}\n")
    s = Server(
        trained["root"], trained["run"], tmp_path / "b", f"serve.keys_file={keys}", host="0.0.0.0", env={"TOWERREC_ADMIN_TOKEN": ADMIN_KEY}, key=READ_KEY
    )
    s.wait_ready()
    scopes = {"read": READ_KEY, "write": WRITE_KEY, "admin": ADMIN_KEY}
    order = list(scopes)

    def call(method, path, body, key=None, **headers):
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.request(method, s.url + path, json=body, headers=auth | headers, timeout=30)

    try:
        for method, path, need, body in ENDPOINTS:
            assert call(method, path, body).status_code == 401, path
            assert call(method, path, body, "not-a-key-0123456789").status_code == 401, path
            for scope, key in scopes.items():  # a scope reaches what it and the scopes below it may
                expected = 200 if order.index(scope) >= order.index(need) else 403
                assert call(method, path, body if path != "/items" else body | {"item_id": f"guarded-{scope}"}, key).status_code == expected, (path, scope)
        assert call("post", "/admin/reload", {}, WRITE_KEY).status_code == 403
        assert call("post", "/admin/reload", {}, ADMIN_KEY).status_code == 200
        # the refused writes changed nothing: the user holds the write and admin keys' events only
        assert call("get", "/users/guarded-user", None, ADMIN_KEY).json()["history"] == ["i2", "i2"]
        assert "bundle" not in call("get", "/healthz", None, READ_KEY).json()  # server paths are for admins
        assert call("get", "/healthz", None, ADMIN_KEY).json()["bundle"] == str(trained["finetune"].resolve())
        wrong_host = call("post", "/recommend", {"history": ["i1"], "k": 2}, ADMIN_KEY, Host="attacker.example")
        assert wrong_host.status_code == 400 and wrong_host.json()["field"] == "host"
    finally:
        s.stop()
    written = [f.read_bytes() for f in trained["root"].rglob("*") if f.is_file() and f.stat().st_size < 5_000_000]
    assert any(str(keys).encode() in data for data in written)  # the serve run's config.yaml names the keys file...
    assert not any(key.encode() in data for data in written for key in scopes.values())  # ...and no file holds a key


def test_a_loopback_service_answers_loopback_host_names_only(server):
    ok = requests.post(server.url + "/recommend", json={"history": ["i1"], "k": 2}, headers={"Host": f"localhost:{server.port}"}, timeout=10)
    assert ok.status_code == 200
    rebound = requests.post(server.url + "/recommend", json={"history": ["i1"], "k": 2}, headers={"Host": f"attacker.example:{server.port}"}, timeout=10)
    assert rebound.status_code == 400 and rebound.json()["field"] == "host"
    assert requests.post(server.url + "/admin/reload", json={}, headers={"Host": "attacker.example"}, timeout=10).status_code == 400


def test_ray_serve_replicas_share_events_and_new_items(trained, tmp_path):
    s = Server(trained["root"], trained["run"], tmp_path / "state", "serve.backend=ray", "serve.replicas=2", "cluster.num_cpus=2").wait_ready(timeout=400)
    try:
        assert s.post("/events", {"user_id": "ray-user", "item_id": "i9"}).status_code == 200
        assert s.post("/items", {"item_id": "ray-item", "text": "barn plough sheep"}).status_code == 200
        for _ in range(8):  # requests spread over both replicas: each sees the event and the item
            assert requests.get(s.url + "/users/ray-user", timeout=60).json()["history"] == ["i9"]
            items = [it["item_id"] for it in s.post("/recommend", {"user_id": "ray-user", "k": 60}).json()["items"]]
            assert "ray-item" in items and "i9" not in items
        assert s.post("/recommend", {"user_id": "ray-user", "k": 0}).status_code == 422
    finally:
        s.stop(signal.SIGINT)
    from serving.event_log import read_log

    assert [(r["offset"], r["kind"]) for r in read_log(tmp_path / "state")] == [(0, "event"), (1, "item")]


# ---- races and bounds: the concurrent POSTs end to end; the tests after it each failed on the
# code before its fix
def test_concurrent_posts_of_one_new_item_give_one_success_and_one_catalog_row(server):
    from concurrent.futures import ThreadPoolExecutor

    from serving.event_log import read_log

    body = {"item_id": "posted-twice", "text": "barn sheep plough"}
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: server.post("/items", body).status_code, range(8)))
    assert codes == [200] + [409] * 7
    n = requests.get(server.url + "/healthz", timeout=10).json()["items"]
    items = [it["item_id"] for it in server.post("/recommend", {"history": ["i1"], "k": n - 1}).json()["items"]]
    assert items.count("posted-twice") == 1
    assert [r["item_id"] for r in read_log(server.state) if r["kind"] == "item"].count("posted-twice") == 1


def test_seen_items_never_come_back_however_short_max_history(trained, tmp_path):
    from serving.recommender import Recommender

    service = Recommender(trained["finetune"], tmp_path / "state", max_history=2)
    try:
        watched = ["i3", "i5", "i8", "i13", "i21"]
        for item in watched:
            service.ingest("forgetful", item)
        assert service.user_state("forgetful")["live_events"] == 2  # the model reads the last two only
        rest = service.model.num_items - len(watched)
        ranked = [it["item_id"] for it in service.recommend("forgetful", k=rest)["items"]]
        assert len(ranked) == rest and not set(watched) & set(ranked)
        feed = service.generate("forgetful", length=rest, seed=0)["items"]  # no_repeat
        assert not set(watched) & {it["item_id"] for it in feed}
    finally:
        service.close()


def test_user_vector_cache_keys_are_never_reused_by_a_later_snapshot(trained):
    import gc

    from serving.recommender import _load_serving_model

    first = _load_serving_model(trained["finetune"])
    key = first.snapshot
    del first
    gc.collect()  # with id() as the key, a later snapshot could take the freed one's
    later = [_load_serving_model(trained["finetune"]) for _ in range(2)]
    assert key not in {m.snapshot for m in later} and later[0].snapshot != later[1].snapshot


def test_text_the_tokenizer_cannot_encode_is_refused_before_it_is_logged(trained, tmp_path):
    from serving.event_log import read_log
    from serving.recommender import Recommender, ServiceError

    service = Recommender(trained["finetune"], tmp_path / "state")
    try:  # a lone surrogate: JSON carries it, the tokenizer refuses it (over HTTP the request schema does)
        with pytest.raises(ServiceError, match="tokenizer cannot encode it") as refused:
            service.add_item("surrogate", "\ud800 lone")
        assert refused.value.status == 422 and refused.value.field == "text"
        assert service.add_item("fine", "barn sheep")["offset"] == 0
    finally:
        service.close()
    assert [r["item_id"] for r in read_log(tmp_path / "state")] == ["fine"]
    Recommender(trained["finetune"], tmp_path / "state").close()  # the next start works


def test_the_state_refuses_a_second_record_of_one_item_id_whoever_sends_it(tmp_path):
    from serving.live_state import DuplicateItemError, LiveState

    state = LiveState(tmp_path / "state")  # what replicas share: their models may not have the item yet
    try:
        state.append("item", item_id="x", text="one")
        with pytest.raises(DuplicateItemError, match="'x' is already in the catalog"):
            state.append("item", item_id="x", text="two")
        assert [r["text"] for r in state.items_since(0)] == ["one"] and state.log.next_offset == 1
    finally:
        state.close()


def test_generate_refuses_a_temperature_that_overflows_the_softmax(server):
    tiny = server.post("/generate", {"history": ["i1"], "length": 2, "temperature": 1e-39, "seed": 0})
    assert tiny.status_code == 422 and tiny.json()["field"] == "temperature"
    assert server.post("/generate", {"history": ["i1"], "length": 2, "temperature": 0.0}).status_code == 200
    assert server.post("/generate", {"history": ["i1"], "length": 2, "temperature": 0.01, "seed": 0}).status_code == 200


def test_delete_user_forgets_them_over_http(server, trained):
    user = a_user(trained, 5)
    assert server.post("/events", {"user_id": user, "item_id": "i4"}).status_code == 200
    live = requests.get(server.url + f"/users/{user}", timeout=10).json()["live_events"]  # earlier tests' events too
    gone = requests.delete(server.url + f"/users/{user}", timeout=30)
    assert gone.status_code == 200 and gone.json()["erased_events"] == live >= 1
    assert requests.get(server.url + f"/users/{user}", timeout=10).status_code == 404
    assert server.post("/recommend", {"user_id": user, "k": 2}).status_code == 404


def test_the_api_description_documents_every_refusal_with_its_body(server):
    spec = requests.get(server.url + "/openapi.json", timeout=10).json()
    every = {"400", "401", "403"}
    expected = {
        ("get", "/healthz"): every,
        ("get", "/metrics"): every,
        ("post", "/recommend"): every | {"404", "413", "422"},
        ("post", "/generate"): every | {"404", "413", "422"},
        ("post", "/events"): every | {"404", "413", "422", "503"},
        ("get", "/users/{user_id}"): every | {"404", "422"},
        ("delete", "/users/{user_id}"): every | {"422", "503"},
        ("post", "/items"): every | {"409", "413", "422", "503"},
        ("post", "/admin/reload"): every | {"404", "413", "422"},
    }
    assert {(m, p) for p, ops in spec["paths"].items() for m in ops} == set(expected)
    for (method, path), codes in expected.items():
        responses = spec["paths"][path][method]["responses"]
        assert set(responses) == codes | {"200"}, (method, path)
        for code in codes:
            assert responses[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
    assert set(spec["components"]["schemas"]["ErrorBody"]["properties"]) == {"error", "field"}
