"""The API port's own routes (L5): liveness (``/health``), readiness (``/ready``) and
Prometheus metrics, readable without a key.

``/health`` says whether this process can work at all (a dead one should be restarted);
``/ready`` whether it should be sent work now (a load balancer or Kubernetes takes it out of
rotation while it is not): the store is open, its writer thread alive, the package-0 gateway
reachable and the server not draining for a shutdown.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from msgspec import Struct
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .common import ENGINE
from .middleware import error_response, json_response
from .openapi import operation
from .schemas import Health

routes = web.RouteTableDef()
TAG = "system"

#: seconds a gateway check is reused: /ready is polled every few seconds by every balancer,
#: and a TCP connect per poll to the SMS centre would be noise on its side
GATEWAY_CHECK_TTL = 5.0
#: seconds a gateway connect may take before the gateway counts as unreachable
GATEWAY_CONNECT_TIMEOUT = 1.0
#: the order of the checks in an answer
READY_CHECKS = ("store", "writer", "gateway", "draining")
#: the last gateway check (make_app puts an empty dict here: a started app is frozen)
GATEWAY_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("ready_gateway_cache", dict)


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
    procs = getattr(engine, "device_processes", None)  # serve --device-processes
    if procs is not None and (problems := procs.health()):
        return error_response(503, "unhealthy", "; ".join(problems), "device_processes")
    return json_response(Health(status="ok"))


@routes.get("/metrics", name="metrics")
@operation("Prometheus metrics", answers={200: {"text/plain": {"type": "string"}}},
           errors=(), public=True, tag=TAG)
async def metrics(request: web.Request) -> web.Response:
    """This process's metrics; with device processes (``serve --device-processes``) theirs
    added in (``metrics.MergedRegistry``: one server, one set of series)."""
    engine = request.app[ENGINE]
    registry = engine.registry
    procs = getattr(engine, "device_processes", None)
    if procs is not None:
        from ..metrics import MergedRegistry
        registry = MergedRegistry(registry, await procs.scrape())
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Ready(Struct, kw_only=True):
    """``status`` is ``ready``; ``checks`` maps each check (store, writer, gateway, draining)
    to ``ok``."""
    status: str
    checks: dict[str, str]


@routes.get("/ready", name="ready")
@operation("Should the engine be sent work now", answers={200: Ready}, errors=(503,),
           public=True, tag=TAG)
async def ready(request: web.Request) -> web.Response:
    """200 when the store is open, its writer thread alive, the package-0 gateway reachable
    (a TCP connect, reused for a few seconds) and the server not draining; else 503 in the
    error shape, ``where`` naming the checks that failed (comma-separated: ``store``,
    ``writer``, ``gateway``, ``draining``) and ``message`` saying why for each."""
    engine = request.app[ENGINE]
    problems = {name: why for name, why in (await readiness(request.app, engine)).items()
                if why is not None}
    if problems:
        return error_response(503, "not_ready",
                              "; ".join(f"{k}: {v}" for k, v in problems.items()),
                              ",".join(problems))
    return json_response(Ready(status="ready", checks=dict.fromkeys(READY_CHECKS, "ok")))


async def readiness(app: web.Application, engine: Any) -> dict[str, str | None]:
    """Each check of :data:`READY_CHECKS` → None (fine) or why not."""
    out: dict[str, str | None] = dict.fromkeys(READY_CHECKS)
    store = engine.store
    fault = "no store" if store is None else store.fault()
    if fault is not None:
        # Store.fault() names a dead or stopped writer thread, else a closed store
        out["writer" if "writer" in fault else "store"] = fault
    server = getattr(engine, "server", None)
    if getattr(engine, "draining", False) or getattr(server, "draining", False):
        out["draining"] = "the server is shutting down"
    out["gateway"] = await _gateway_problem(app, getattr(engine, "gateway", None))
    return out


async def _gateway_problem(app: web.Application, gateway: Any) -> str | None:
    """Why the package-0 gateway cannot be reached, or None.  No gateway configured is not a
    readiness problem (devices still reach the device port on their own).  A gateway with a
    ``probe()`` coroutine is asked; one with a ``url`` gets a TCP connect to its host and
    port; one with neither (in-process, loopback) is reachable."""
    if gateway is None:
        return None
    cache = app[GATEWAY_CACHE]
    now = time.monotonic()
    pending = cache.get("pending")
    if pending is not None and cache.get("gateway") is gateway \
            and now - cache["at"] < GATEWAY_CHECK_TTL:
        return await asyncio.shield(pending)    # one check shared by the polls meanwhile
    fut = asyncio.ensure_future(_check_gateway(gateway))
    cache.update(pending=fut, at=now, gateway=gateway)
    return await asyncio.shield(fut)


async def _check_gateway(gateway: Any) -> str | None:
    probe = getattr(gateway, "probe", None)
    if probe is not None:
        try:
            return await asyncio.wait_for(probe(), GATEWAY_CONNECT_TIMEOUT)   # type: ignore[no-any-return]
        except Exception as exc:
            return f"gateway probe failed: {type(exc).__name__}: {exc}"
    url = getattr(gateway, "url", None)
    if not isinstance(url, str):
        return None
    parts = urlsplit(url)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return f"gateway URL has no valid port: {parts.scheme}://{parts.hostname}"
    # scheme://host:port only: the path and query of a gateway URL may carry its credentials
    where = f"{parts.scheme}://{host}:{port}"
    if not host:
        return f"gateway URL names no host: {where}"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                           GATEWAY_CONNECT_TIMEOUT)
    except asyncio.TimeoutError:
        return f"gateway {where} did not accept a connection within {GATEWAY_CONNECT_TIMEOUT} s"
    except OSError as exc:
        return f"gateway {where} unreachable: {exc.strerror or exc}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None
