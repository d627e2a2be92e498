"""The DMWSI API port (L5): the aiohttp app assembled from the package's parts.

* :mod:`.middleware` — the one error shape ``{"error", "message", "where"}`` and body limits;
* :mod:`.schemas` — request and answer bodies as msgspec Structs, camelCase on the wire;
* :mod:`.openapi` — the OpenAPI 3.1 document (``/openapi.json``) and the docs page (``/docs``);
* one module per interface: :mod:`.deployments` (IDeploymentBrokerServices), :mod:`.jobs`
  (IBulkOperationsManagerServices), :mod:`.devices` and :mod:`.capabilities`
  (IDeviceManagerServices), :mod:`.content`, :mod:`.diagnostics`, :mod:`.subscriptions`
  (push), and :mod:`.system` (health, metrics).

Every route but the public ones (:func:`is_public`: health, metrics, the OpenAPI document,
the docs page and its assets, ``login``) needs an API key or a userSession token (``X-API-Key:
KEY`` or ``Authorization: Bearer KEY``), checked by
:func:`dmengine.wsi.security.authenticate`: who, how often (429), what (the route → role
table :data:`dmengine.wsi.security.ROLE_OF`), whose (another system's task or job is a 404),
and the audit of every call that changes something.  Middlewares run in the order
``[errors, authenticate]``: the error middleware is outermost, so whatever goes wrong inside
answers in the one shape.

Hardening (issue 13): JSON bodies are read with a cap (:data:`MAX_JSON_BODY`) that holds for
chunked bodies too, and only the content upload and the device import stream more; answers
that include a task or a device are redacted (:func:`dmengine.model.redact`,
:func:`dmengine.model.redact_task`); the key check compares the header's bytes as sent, so a
key that is not UTF-8 is a 401, not a 500; ``/health`` answers 503 when the store cannot write.
"""
from __future__ import annotations

import importlib.util
import ssl

from aiohttp import web

from . import capabilities, content, deployments, devices, diagnostics, jobs, openapi, system
from .common import ENGINE, Services
from .middleware import (MAX_JSON_BODY, MAX_UPLOAD, decode_body, error_response, errors,
                         json_response, read_json_body)
from .schemas import Target
from .security import ROLE_OF, authenticate

#: paths anyone may read; the docs page's assets live under /docs/
PUBLIC = frozenset({"/health", "/ready", "/metrics", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/docs/",)

#: the route modules of the app, in the order their routes are added
INTERFACES = (system, openapi, deployments, jobs, devices, capabilities, content, diagnostics)
#: route modules that may not be there yet (others work on them); each has ``routes``
OPTIONAL_INTERFACES = ("subscriptions",)


def is_public(path: str) -> bool:
    return path in PUBLIC or path.startswith(PUBLIC_PREFIXES)


#: the key check of the first cut, now the security middleware (dmengine/wsi/security.py)
require_key = authenticate


def make_app(engine: Services) -> web.Application:
    # client_max_size bounds what aiohttp itself buffers (request.read/post): the JSON limit.
    # The content upload and the device import stream request.content.
    app = web.Application(middlewares=[errors, authenticate], client_max_size=MAX_JSON_BODY)
    app[ENGINE] = engine
    from . import security       # identities (keys, users, sessions), login/keys/users/audit
    identities = getattr(engine, "identity", None)
    if identities is None:
        from ..identity import Identities
        assert engine.store is not None
        identities = Identities(engine.store)
    security.install(app, identities)
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


__all__ = ["make_app", "start_api", "require_key", "authenticate", "ROLE_OF", "is_public", "ENGINE", "Services",
           "PUBLIC", "PUBLIC_PREFIXES", "MAX_JSON_BODY", "MAX_UPLOAD", "Target", "decode_body",
           "json_response", "error_response", "read_json_body", "errors"]
