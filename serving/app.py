"""The HTTP JSON API over a ``Recommender``: FastAPI, served by uvicorn (one process) or as a
Ray Serve deployment. OpenAPI at /openapi.json (and /docs); Prometheus text at /metrics.

Every refused request gets a 4xx with ``{"error": <what is wrong>, "field": <where>}`` and
leaves the service and its state as they were. Who may call what: serving/access.py (API keys
with scopes, Host names).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field

from serving.access import Access
from serving.recommender import Recommender, ServiceError, model_age_seconds

ItemId = Annotated[str, Field(min_length=1, max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Body):
    user_id: ItemId | None = None
    history: list[ItemId] | None = Field(default=None, max_length=10_000)
    k: int = Field(default=10, ge=1, le=1000)
    exclude: list[ItemId] = Field(default_factory=list, max_length=10_000)
    diversity: float = Field(default=0.0, ge=0.0, le=1.0)
    explain: bool = False


class EventRequest(_Body):
    user_id: ItemId
    item_id: ItemId
    ts: float | None = None


class ItemRequest(_Body):
    item_id: ItemId
    text: str = Field(min_length=1, max_length=20_000)
    categories: list[Annotated[str, Field(max_length=256)]] = Field(default_factory=list, max_length=100)
    title: str | None = Field(default=None, max_length=1000)


class GenerateRequest(_Body):
    user_id: ItemId | None = None
    history: list[ItemId] | None = Field(default=None, max_length=10_000)
    length: int = Field(default=10, ge=1, le=200)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    no_repeat: bool = True
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    diversity: float = Field(default=0.0, ge=0.0, le=1.0)


class ReloadRequest(_Body):
    bundle: str | None = Field(default=None, max_length=4096)


class ErrorBody(BaseModel):
    """What every refused request gets back."""

    error: str
    field: str | None = None


ERROR_MEANINGS = {
    400: "malformed JSON, or a Host this service does not answer to (field: host)",
    401: "keys are configured and the request has none, or an unknown one",
    403: "the key's scope is too low (or, for /admin/reload, the bundle is outside serve.bundle_roots)",
    404: "an unknown user_id or item_id",
    409: "the item_id is already in the catalog",
    413: "the body is over serve.max_body_bytes",
    422: "a field with a wrong value or type, or an unknown field",
    503: "the service's state could not be written; nothing was recorded, try again",
}


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI responses of a route: the refusals every route can give (Host, keys) and ``codes``."""
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}  # JSON also where the route answers text
    return {code: {"model": ErrorBody, "description": ERROR_MEANINGS[code], "content": body} for code in (400, 401, 403, *codes)}


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 before the app reads it."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes", "field": "body"})
        if declared is not None:  # a declared size within the limit: the server reads no more than that
            return await self.app(scope, receive, send)
        body, more = b"", True  # streamed without a size: read it here, up to the limit
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, receive, send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, {"error": f"request body over {self.max_bytes} bytes", "field": "body"})
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]}
    )
    await send({"type": "http.response.body", "body": data})


def _field_of(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def create_app(service: Recommender, access: Access | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The API over ``service``, every request checked by ``access`` (default: no keys, loopback
    Host names only)."""
    access = access or Access()
    app = FastAPI(
        title="towerrec", version="1", summary="Real-time two-tower recommendations: recommend, learn from events, add items, explain, generate feeds"
    )
    registry = CollectorRegistry()
    requests = Counter("towerrec_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=registry)
    latency = Histogram(
        "towerrec_request_seconds",
        "HTTP request latency by endpoint",
        ["endpoint"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
    )
    events = Counter("towerrec_events_ingested_total", "events acknowledged (durably logged)", registry=registry)
    items_added = Counter("towerrec_items_added_total", "new items added from their text", registry=registry)
    version = Gauge("towerrec_model_version", "version of the model being served", registry=registry)
    age = Gauge("towerrec_model_age_seconds", "seconds since the served model's bundle was written", registry=registry)
    catalog = Gauge("towerrec_catalog_items", "items the service can recommend", registry=registry)
    updates = Gauge("towerrec_updates", "incremental updates by outcome since the service started", ["outcome"], registry=registry)
    app.state.service = service

    @app.middleware("http")
    async def guard(request: Request, call_next):
        verdict = access.check(request.url.path, request.headers.get("host"), request.headers.get("authorization"))
        if isinstance(verdict, tuple):
            status, message, field = verdict
            return JSONResponse({"error": message, "field": field}, status_code=status)
        request.state.scope = verdict
        return await call_next(request)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - start)
        return response

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return JSONResponse({"error": f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}", "field": "body"}, status_code=400)
        field = _field_of(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            return JSONResponse({"error": f"unknown field '{field}'", "field": field}, status_code=422)
        return JSONResponse({"error": f"{field}: {first['msg']}", "field": field}, status_code=422)

    @app.get("/healthz", responses=refusals())
    def healthz(request: Request) -> dict[str, Any]:
        health = service.health()
        if request.state.scope not in ("open", "admin"):  # where the files live is for admins
            health = {k: v for k, v in health.items() if k not in ("bundle", "log")}
        return health

    @app.get("/metrics", response_class=PlainTextResponse, responses=refusals())
    def metrics() -> PlainTextResponse:
        m = service.model
        version.set(m.version)
        age.set(model_age_seconds(m))
        catalog.set(m.num_items)
        for outcome in ("updates", "failures", "running"):
            if outcome in service.update_stats:
                updates.labels(outcome).set(service.update_stats[outcome])
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.post("/recommend", responses=refusals(404, 413, 422))
    def recommend(body: RecommendRequest) -> dict[str, Any]:
        return service.recommend(body.user_id, body.history, body.k, body.exclude, body.diversity, body.explain)

    @app.post("/events", responses=refusals(404, 413, 422, 503))
    def ingest(body: EventRequest) -> dict[str, Any]:
        out = service.ingest(body.user_id, body.item_id, body.ts)
        events.inc()
        return out

    @app.get("/users/{user_id}", responses=refusals(404, 422))
    def user(user_id: str) -> dict[str, Any]:
        return service.user_state(user_id)

    @app.delete("/users/{user_id}", responses=refusals(422, 503))
    def forget(user_id: str) -> dict[str, Any]:
        return service.forget_user(user_id)

    @app.post("/items", responses=refusals(409, 413, 422, 503))
    def add_item(body: ItemRequest) -> dict[str, Any]:
        out = service.add_item(body.item_id, body.text, body.categories, body.title)
        items_added.inc()
        return out

    @app.post("/generate", responses=refusals(404, 413, 422))
    def generate(body: GenerateRequest) -> dict[str, Any]:
        return service.generate(body.user_id, body.history, body.length, body.temperature, body.top_p, body.no_repeat, body.seed, body.diversity)

    @app.post("/admin/reload", responses=refusals(404, 413, 422))
    def reload(body: ReloadRequest | None = None) -> dict[str, Any]:
        return service.reload(body.bundle if body else None)

    return app
