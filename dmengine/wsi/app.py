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
and the audit of every call that changes something.  The app has NO aiohttp middleware:
every route's handler is wrapped, when the app is made, in what every call goes through
(:func:`api_wrapper`): the error shape and the API metrics around the authentication
(whatever goes wrong inside answers in the one shape), with what a route needs (its metrics
label, whether it is public, its role) worked out once per route, not per call; a catch-all
route, tried after every other, takes the paths no route has through the same wrapper (401
before 404 / 405).  It was two aiohttp middlewares, then one: aiohttp adds a middleware of
its own as soon as there is one, and the two layers cost ~15,000 instructions a request —
getTaskById's benchmark (bench/bench_api.py) is mostly such per-request overhead.

Hardening (issue 13): JSON bodies are read with a cap (:data:`MAX_JSON_BODY`) that holds for
chunked bodies too, and only the content upload and the device import stream more; answers
that include a task or a device are redacted (:func:`dmengine.model.redact`,
:func:`dmengine.model.redact_task`); the key check compares the header's bytes as sent, so a
key that is not UTF-8 is a 401, not a 500; ``/health`` answers 503 when the store cannot write.
"""
from __future__ import annotations

import functools
import importlib.util
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from ..identity import Identities
from ..metrics import RouteCalls
from . import (capabilities, content, deployments, devices, diagnostics, jobs, openapi, security,
               system)
from .common import ENGINE, Services
from .middleware import (MAX_JSON_BODY, MAX_UPLOAD, Handler, decode_body, error_answer,
                         error_response, json_response, read_json_body)
from .schemas import Target
from .security import IDENTITY_KEY, ROLE_OF, guard, install, required_role
from .security import is_public as security_public

#: the route modules of the app, in the order their routes are added
INTERFACES = (system, openapi, deployments, jobs, devices, capabilities, content, diagnostics)
#: route modules that may not be there yet (others work on them); each has ``routes``
OPTIONAL_INTERFACES = ("subscriptions",)


def api_wrapper(engine: Services, identities: Identities) -> Callable[..., Handler]:
    """What every call goes through (module docstring): ``wrap(handler, name, path)`` answers
    the handler of one route wrapped in it — every answer in the one error shape and counted
    in the API metrics (by route, status and role); every call but the public ones through
    :func:`dmengine.wsi.security.guard` (who, how often, what, whose, the audit) first.

    Per route — its metrics label, whether it is public (by its name or its path template),
    the role it needs — is worked out once, when it is wrapped.  ``name=None, path=None`` is
    the catch-all of the paths no route has (:func:`_unrouted`): its label is ``unmatched``
    and the path asked for decides whether it is public (e.g. a missing file under /docs/),
    with no role to check.

    Why not an aiohttp middleware: with any middleware at all aiohttp runs its own
    ``current_app`` middleware too, and the chain of the two cost ~15,000 instructions per
    request (a pass-through middleware on the bare handler of bench/bench_api.py: 164k → 180k)
    — more than the whole authentication."""
    metrics = getattr(engine, "api_metrics", None)
    clock = time.perf_counter

    def wrap(handler: Handler, name: str | None, path: str | None) -> Handler:
        routed = path is not None
        label = name or path or "unmatched"
        need = required_role(name) if routed else None
        always_public = routed and security_public(name, path or "")
        calls: RouteCalls | None = None      # the route's metrics, from its first call on

        async def api(request: web.Request) -> web.StreamResponse:
            nonlocal calls
            t0 = clock()
            # the role label: the caller's once its key passed every check (the handler ran
            # with it), else anonymous
            ident = None
            try:
                if always_public or (not routed and security_public(None, request.path)):
                    resp = await handler(request)
                else:
                    resp, ident = await guard(request, handler, identities, name, need)
            except Exception as exc:
                resp = error_answer(request, exc)
                ident = request.get(IDENTITY_KEY)
            if metrics is not None:
                if calls is None:
                    calls = metrics.route(label)
                calls.observe(resp.status, "anonymous" if ident is None else ident.role,
                              clock() - t0)
            return resp
        return functools.update_wrapper(api, handler)
    return wrap


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """The catch-all route's handler: what the router answered for a path no route has —
    405 with the methods the path has, else 404 — raised, so that the wrapper answers it in
    the one error shape (after the key check: an unknown path tells an anonymous caller
    nothing).  Only the error path pays for asking every resource again."""
    allowed: set[str] = set()
    this = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is this:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def make_app(engine: Services) -> web.Application:
    identities = getattr(engine, "identity", None)
    if identities is None:
        assert engine.store is not None
        identities = Identities(engine.store)
    # client_max_size bounds what aiohttp itself buffers (request.read/post): the JSON limit.
    # The content upload and the device import stream request.content.
    app = web.Application(client_max_size=MAX_JSON_BODY)
    app[ENGINE] = engine
    install(app, identities)     # identities (keys, users, sessions), login/keys/users/audit
    app[openapi.DOC_CACHE] = {}
    app[system.GATEWAY_CACHE] = {}      # /ready's gateway check, reused a few seconds
    tables = [security.routes] + [module.routes for module in INTERFACES]
    for optional in OPTIONAL_INTERFACES:
        if importlib.util.find_spec(f"{__package__}.{optional}") is not None:
            tables.append(importlib.import_module(f"{__package__}.{optional}").routes)
    wrap = api_wrapper(engine, identities)
    for table in tables:
        for rd in table:
            assert isinstance(rd, web.RouteDef), rd
            web.RouteDef(rd.method, rd.path, wrap(rd.handler, rd.kwargs.get("name"), rd.path),
                         rd.kwargs).register(app.router)
    # last: the router tries it only after every route (its index key is "/").  No name: it
    # is not an operation (the OpenAPI document lists the named routes), and the audit names
    # such a call by its method and the path asked for.
    app.router.add_route("*", "/{tail:.*}", wrap(_unrouted, None, None))
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


__all__ = ["make_app", "api_wrapper", "start_api", "ROLE_OF", "ENGINE", "Services",
           "MAX_JSON_BODY", "MAX_UPLOAD", "Target", "decode_body", "json_response",
           "error_response", "read_json_body"]
