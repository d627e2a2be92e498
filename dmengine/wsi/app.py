"""The DMWSI API port (L5): the aiohttp app assembled from the package's parts.

* :mod:`.middleware` — the one error shape ``{"error", "message", "where"}`` and body limits;
* :mod:`.schemas` — request and answer bodies as msgspec Structs, camelCase on the wire;
* :mod:`.openapi` — the OpenAPI 3.1 document (``/openapi.json``) and the docs page (``/docs``);
* one module per interface: :mod:`.deployments` (IDeploymentBrokerServices), :mod:`.jobs`
  (IBulkOperationsManagerServices), :mod:`.devices` and :mod:`.capabilities`
  (IDeviceManagerServices), :mod:`.content`, :mod:`.diagnostics`, :mod:`.subscriptions`
  (push), and :mod:`.system` (health, metrics).

Every route but the public ones (:func:`dmengine.wsi.security.is_public`: health, metrics,
the OpenAPI document, the docs page and its assets, ``login``) needs an API key or a
userSession token (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``), checked by
:func:`dmengine.wsi.security.guard`: who, how often (429), what (the route → role
table :data:`dmengine.wsi.security.ROLE_OF`), whose (another system's task or job is a 404),
and the audit of every call that changes something.  The app has ONE middleware
(:func:`api_middleware`): the error shape and the API metrics around the authentication
(whatever goes wrong inside answers in the one shape), with what a route needs (its metrics
label, whether it is public, its role) worked out once per route, not per call.  It was two
aiohttp middlewares (errors, then authentication): each layer costs a coroutine frame and a
partial call per request, and getTaskById's benchmark (bench/bench_api.py) is mostly such
per-request overhead.

Hardening (issue 13): JSON bodies are read with a cap (:data:`MAX_JSON_BODY`) that holds for
chunked bodies too, and only the content upload and the device import stream more; answers
that include a task or a device are redacted (:func:`dmengine.model.redact`,
:func:`dmengine.model.redact_task`); the key check compares the header's bytes as sent, so a
key that is not UTF-8 is a 401, not a 500; ``/health`` answers 503 when the store cannot write.
"""
from __future__ import annotations

import importlib.util
import ssl
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..identity import Identities
from . import capabilities, content, deployments, devices, diagnostics, jobs, openapi, system
from .common import ENGINE, Services
from .middleware import (MAX_JSON_BODY, MAX_UPLOAD, Handler, decode_body, error_answer,
                         error_response, json_response, label_of, read_json_body)
from .schemas import Target
from .security import IDENTITY_KEY, ROLE_OF, guard, install, required_role
from .security import is_public as security_public

#: the route modules of the app, in the order their routes are added
INTERFACES = (system, openapi, deployments, jobs, devices, capabilities, content, diagnostics)
#: route modules that may not be there yet (others work on them); each has ``routes``
OPTIONAL_INTERFACES = ("subscriptions",)


def api_middleware(engine: Services, identities: Identities) -> Middleware:
    """The app's one middleware: every answer in the one error shape and counted in the API
    metrics (by route, status and role); every call but the public ones through
    :func:`dmengine.wsi.security.guard` (who, how often, what, whose, the audit) first.

    Per route — its metrics label, whether it is public (by its name or its path template),
    the role it needs — is worked out on its first call and kept (one entry per route of the
    app: the router's 404/405 routes, made per request, are worked out each time and not
    kept; their path decides whether they are public, e.g. a missing file under /docs/)."""
    metrics = getattr(engine, "api_metrics", None)
    #: route → (label, public, role needed)
    known: dict[Any, tuple[str, bool, str | None]] = {}
    clock = time.perf_counter

    @web.middleware
    async def api(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = clock()
        route = request.match_info.route
        info = known.get(route)
        if info is None:
            info = _route_info(route, request.path)
            if route.resource is not None:
                known[route] = info
        label, public, need = info
        # the role label: the caller's once its key passed every check (the handler ran
        # with it), else anonymous
        ident = None
        try:
            if public:
                resp = await handler(request)
            else:
                resp, ident = await guard(request, handler, identities, route.name, need)
        except Exception as exc:
            resp = error_answer(request, exc)
            ident = request.get(IDENTITY_KEY)
        if metrics is not None:
            metrics.observe(label, resp.status, "anonymous" if ident is None else ident.role,
                            clock() - t0)
        return resp
    return api


def _route_info(route: Any, path: str) -> tuple[str, bool, str | None]:
    """(metrics label, public, role needed) of a route; of the router's 404/405 (no
    resource) by the path asked for, with no role to check."""
    name = route.name
    resource = route.resource
    if resource is None:
        return label_of(route), security_public(name, path), None
    return (label_of(route), security_public(name, resource.canonical),
            required_role(name))


def make_app(engine: Services) -> web.Application:
    identities = getattr(engine, "identity", None)
    if identities is None:
        assert engine.store is not None
        identities = Identities(engine.store)
    # client_max_size bounds what aiohttp itself buffers (request.read/post): the JSON limit.
    # The content upload and the device import stream request.content.
    app = web.Application(middlewares=[api_middleware(engine, identities)],
                          client_max_size=MAX_JSON_BODY)
    app[ENGINE] = engine
    install(app, identities)     # identities (keys, users, sessions), login/keys/users/audit
    app[openapi.DOC_CACHE] = {}
    app[system.GATEWAY_CACHE] = {}      # /ready's gateway check, reused a few seconds
    for module in INTERFACES:
        app.add_routes(module.routes)
    for name in OPTIONAL_INTERFACES:
        if importlib.util.find_spec(f"{__package__}.{name}") is not None:
            module = importlib.import_module(f"{__package__}.{name}")
            app.add_routes(module.routes)
    return app


async def start_api(engine: Services, host: str, port: int, *,
                    ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serves the API on ``host:port`` (HTTPS with ``ssl_context``); returns the runner and
    the bound port."""
    runner = web.AppRunner(make_app(engine), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    return runner, runner.addresses[0][1]


__all__ = ["make_app", "api_middleware", "start_api", "ROLE_OF", "ENGINE", "Services",
           "MAX_JSON_BODY", "MAX_UPLOAD", "Target", "decode_body", "json_response",
           "error_response", "read_json_body"]
