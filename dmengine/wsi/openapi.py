"""The OpenAPI 3.1 document of the API and its interactive docs page (L5).

Each handler says what it takes and answers with :func:`operation`; :func:`build_document`
walks the app's routes and writes one operation per route: ``operationId`` is the route's
``name=`` (the seeds' operation name, DESIGN.md §3), the path parameters come from the route's
path, the query parameters from a Struct (its fields), the bodies from the request and answer
Structs through ``msgspec.json.schema_components`` (JSON Schema 2020-12, which OpenAPI 3.1
uses as is), and every operation lists the error shape.  A route without :func:`operation`
is still in the document (any JSON in, any JSON out), so nothing the app serves is missing.

``GET /openapi.json`` serves the document and ``GET /docs`` a Swagger UI page; both, and the
page's assets (``/docs/{asset}``, from the ``swagger-ui-py`` package — served by the app
itself: no CDN, it works offline), are readable without a key.

For modules added later (the session and subscription routes)::

    @routes.post("/v1/login", name="login")
    @operation("Log in", body=LoginRequest, answers={200: UserSession}, public=True,
               errors=(400, 401))
    async def login(request): ...
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import re
from typing import Any, Callable, Mapping

import msgspec
from aiohttp import web

from .. import __version__
from .schemas import ErrorBody

__all__ = ["operation", "Op", "build_document", "routes", "DOCS_ASSETS", "openapi_bytes", "DOC_CACHE",
           "API_KEY_HEADER"]

API_KEY_HEADER = "X-API-Key"

#: the id rule without "/" (a path segment): see dmengine.model.ID_PATTERN
SEGMENT_PATTERN = r"^[A-Za-z0-9:._+@=-]+$"

ERROR_TEXT = {
    400: "The request is wrong; `where` names the field, parameter or header.",
    401: "No key, or a wrong one (or an expired session).",
    403: "The caller's role does not allow this.",
    404: "No such resource (or route).",
    409: "In conflict with the record's state (exists already, not in a state for this).",
    413: "The body is larger than the limit.",
    415: "A media type the route does not read.",
    416: "A range outside the content.",
    422: "The upload does not match what was declared (size, sha256).",
    429: "Too many requests: try again after `Retry-After` seconds.",
    503: "The store cannot write (or is closed); try again later.",
}


@dataclasses.dataclass(frozen=True)
class Op:
    """What a route takes and answers, for the document."""

    summary: str
    body: Any = None                          #: request Struct (application/json)
    raw_body: Mapping[str, Any] | None = None  #: {media type: JSON Schema} of a streamed body
    body_required: bool = True
    query: Any = None                         #: Struct whose fields are the query parameters
    path: Mapping[str, Any] = dataclasses.field(default_factory=dict)  #: param → schema
    #: status → a Struct (JSON), a tuple of Structs (one of them), None (no body) or
    #: ``{media type: JSON Schema}``
    answers: Mapping[int, Any] = dataclasses.field(default_factory=dict)
    errors: tuple[int, ...] = (400, 404)
    public: bool = False
    tag: str | None = None
    headers: Mapping[str, Any] = dataclasses.field(default_factory=dict)  #: request headers


def operation(summary: str, **kw: Any) -> Callable[[Any], Any]:
    """Declares what a handler takes and answers (see :class:`Op`); ``answers`` maps a
    status to a Struct (JSON), None (no body) or ``{media type: schema}``."""
    op = Op(summary, **kw)

    def deco(fn: Any) -> Any:
        fn.__openapi__ = op
        return fn
    return deco


# --- the document -------------------------------------------------------------------------------

_REF = "#/components/schemas/{name}"


def _path_template(resource: Any) -> str | None:
    info = resource.get_info()
    path = info.get("path") or info.get("formatter")
    if path is None:
        return None
    return re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)


def _doc_of(fn: Any) -> str | None:
    doc = inspect.getdoc(fn)
    return doc or None


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route of ``app`` (HEAD routes aside)."""
    routes = [r for r in app.router.routes() if r.method != "HEAD" and r.name]
    specs: list[tuple[Any, Op | None]] = [(r, getattr(r.handler, "__openapi__", None))
                                          for r in routes]
    # every type named by a spec, one schema_components call for all of them
    types: list[Any] = [ErrorBody]
    for _, op in specs:
        if op is None:
            continue
        for t in (op.body, op.query, *op.answers.values()):
            for x in (t if isinstance(t, tuple) else (t,)):
                if x is not None and not isinstance(x, Mapping) and x not in types:
                    types.append(x)
    out, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema = {id(t): s for t, s in zip(types, out)}
    query_components = set()

    paths: dict[str, dict[str, Any]] = {}
    for route, op in specs:
        template = _path_template(route.resource)
        if template is None:
            continue
        item = paths.setdefault(template, {})
        method = route.method.lower()
        item[method] = _operation(route, op, template, schema, components, query_components)

    for name in query_components:
        components.pop(name, None)
    components["ErrorBody"] = components.get("ErrorBody") or schema[id(ErrorBody)]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dmengine DMWSI API",
            "version": __version__,
            "description": (
                "The OMA DM Web Services Interface of dmengine: operations on one device or "
                "on many, tasks and jobs, device records and capabilities, content, "
                "diagnostics.  Bodies and answers are JSON in camelCase; listings answer "
                "`{items, nextCursor}`; every error is `{error, message, where}`.  Send the "
                f"API key as `{API_KEY_HEADER}` (or `Authorization: Bearer KEY`)."),
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
                "bearer": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def _json_content(s: Any) -> dict[str, Any]:
    return {"application/json": {"schema": s}}


def _operation(route: Any, op: Op | None, template: str, schema: dict[Any, Any],
               components: dict[str, Any], query_components: set[str]) -> dict[str, Any]:
    error_ref = {"$ref": _REF.format(name="ErrorBody")}
    params: list[dict[str, Any]] = []
    for name in re.findall(r"\{(\w+)\}", template):
        ps = (op.path.get(name) if op is not None else None) or {
            "type": "string", "minLength": 1, "maxLength": 128, "pattern": SEGMENT_PATTERN}
        params.append({"name": name, "in": "path", "required": True, "schema": ps})
    out: dict[str, Any] = {"operationId": route.name}
    doc = _doc_of(route.handler)
    if op is None:
        out["summary"] = route.name
        if doc:
            out["description"] = doc
        if route.method in ("POST", "PUT", "PATCH"):
            out["requestBody"] = {"required": False, "content": _json_content({})}
        out["responses"] = {"2XX": {"description": "done", "content": _json_content({})},
                            "default": {"description": "an error",
                                        "content": _json_content(error_ref)}}
        if params:
            out["parameters"] = params
        return out
    out["summary"] = op.summary
    if doc:
        out["description"] = doc
    if op.tag:
        out["tags"] = [op.tag]
    if op.query is not None:
        ref = schema[id(op.query)]
        name = ref["$ref"].rsplit("/", 1)[1]
        qs = components[name]
        query_components.add(name)
        required = set(qs.get("required", ()))
        for pname, ps in qs.get("properties", {}).items():
            ps = dict(ps)
            desc = ps.pop("description", None)
            p: dict[str, Any] = {"name": pname, "in": "query", "required": pname in required,
                                 "schema": ps}
            if desc:
                p["description"] = desc
            params.append(p)
    for hname, hs in op.headers.items():
        params.append({"name": hname, "in": "header", "required": False, "schema": hs})
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {"required": op.body_required,
                              "content": _json_content(schema[id(op.body)])}
    elif op.raw_body is not None:
        out["requestBody"] = {"required": op.body_required,
                              "content": {m: {"schema": s} for m, s in op.raw_body.items()}}
    responses: dict[str, Any] = {}
    for status, t in op.answers.items():
        if t is None:
            responses[str(status)] = {"description": "done, no body"}
        elif isinstance(t, tuple):
            responses[str(status)] = {"description": "done", "content": _json_content(
                {"anyOf": [schema[id(x)] for x in t]})}
        elif isinstance(t, Mapping):
            responses[str(status)] = {"description": "done",
                                      "content": {m: {"schema": s} for m, s in t.items()}}
        else:
            responses[str(status)] = {"description": "done",
                                      "content": _json_content(schema[id(t)])}
    errs = set(op.errors)
    if op.body is not None or op.raw_body is not None:
        errs |= {400, 413}
    if not op.public:
        errs |= {401, 403, 429}
    errs.add(503)
    for status in sorted(errs):
        responses[str(status)] = {"description": ERROR_TEXT.get(status, "an error"),
                                  "content": _json_content(error_ref)}
    responses["default"] = {"description": "an error", "content": _json_content(error_ref)}
    out["responses"] = responses
    if op.public:
        out["security"] = []
    return out


#: a holder the app gets before it is frozen; the document is built on first use
DOC_CACHE: web.AppKey[dict[str, bytes]] = web.AppKey("openapi_document", dict)


def openapi_bytes(app: web.Application) -> bytes:
    """The document as JSON bytes, built once per app (its routes are frozen by then)."""
    cache = app.get(DOC_CACHE)
    if cache is not None and "doc" in cache:
        return cache["doc"]
    data = msgspec.json.encode(build_document(app))
    if cache is not None and app.frozen:
        cache["doc"] = data
    return data


# --- routes: the document and the docs page ------------------------------------------------------

routes = web.RouteTableDef()

#: the docs page's assets: file name in the swagger-ui-py package → content type
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_INIT_JS = b"""window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    displayOperationId: true,
    displayRequestDuration: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""
_DOCS_HTML = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dmengine API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body>
</html>
"""
#: the page loads nothing but the app's own URLs
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; font-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_assets: dict[str, bytes] = {"init.js": _INIT_JS}


def asset(name: str) -> bytes | None:
    """An asset's bytes (read once from the swagger-ui-py package), or None."""
    data = _assets.get(name)
    if data is None and name in DOCS_ASSETS:
        data = (importlib.resources.files("swagger_ui") / "static" / name).read_bytes()
        _assets[name] = data
    return data


def _asset_schema() -> dict[str, Any]:
    return {"type": "string", "enum": sorted([*DOCS_ASSETS, "init.js"])}


@routes.get("/openapi.json", name="getOpenApi")
@operation("This document (OpenAPI 3.1)", answers={200: {"application/json": {
    "type": "object"}}}, public=True, errors=(), tag="documentation")
async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=openapi_bytes(request.app), content_type="application/json")


@routes.get("/docs", name="getDocs")
@operation("The interactive documentation (Swagger UI)",
           answers={200: {"text/html": {"type": "string"}}}, public=True, errors=(),
           tag="documentation")
async def get_docs(request: web.Request) -> web.Response:
    return web.Response(body=_DOCS_HTML, content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": DOCS_CSP,
                                 "X-Content-Type-Options": "nosniff"})


@routes.get("/docs/{asset}", name="getDocsAsset")
@operation("An asset of the documentation page", path={"asset": _asset_schema()},
           answers={200: {m: {"type": "string"} for m in
                          sorted({"text/javascript", "text/css", "image/png"})}},
           public=True, errors=(404,), tag="documentation")
async def get_docs_asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    data = asset(name)
    if data is None:
        raise web.HTTPNotFound()
    ctype = DOCS_ASSETS.get(name, "text/javascript")
    return web.Response(body=data, content_type=ctype,
                        headers={"Cache-Control": "public, max-age=86400",
                                 "X-Content-Type-Options": "nosniff"})
