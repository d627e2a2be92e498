"""The API port's own routes (L5): health and Prometheus metrics, readable without a key."""
from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .common import ENGINE
from .middleware import error_response, json_response
from .openapi import operation
from .schemas import Health

routes = web.RouteTableDef()
TAG = "system"


@routes.get("/health", name="health")
@operation("Is the engine able to work", answers={200: Health}, errors=(503,), public=True,
           tag=TAG)
async def health(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}``, or 503 naming what is wrong: a dead store writer or a closed
    store (every write would fail, so a load balancer should stop sending work here), a
    scheduler loop that ended or keeps failing (no task would be notified, retried or
    expired again), or a push dispatcher in trouble."""
    engine = request.app[ENGINE]
    store = engine.store
    fault = "no store" if store is None else store.fault()
    if fault is not None:
        return error_response(503, "unhealthy", fault, "store")
    problems = engine.broker.health() if engine.broker is not None else ["no broker"]
    if problems:
        return error_response(503, "unhealthy", "; ".join(problems), "scheduler")
    hooks = getattr(engine, "webhooks", None)          # the push dispatcher (webhooks.py)
    if hooks is not None and (problems := hooks.health()):
        return error_response(503, "unhealthy", "; ".join(problems), "webhooks")
    return json_response(Health(status="ok"))


@routes.get("/metrics", name="metrics")
@operation("Prometheus metrics", answers={200: {"text/plain": {"type": "string"}}},
           errors=(), public=True, tag=TAG)
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ENGINE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
