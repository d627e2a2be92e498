"""The DMWSI API port (L5): aiohttp, JSON bodies as msgspec Structs, one error shape.

This first cut carries the IDeploymentBrokerServices routes issue 7 needs from outside
(doOperation, getTaskById, getTaskHistory, cancelTask), the device and capability records a
task needs, content upload, health and Prometheus metrics.  Every route but ``/health`` and
``/metrics`` needs the API key (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``).
Errors are ``{"error": code, "message": ..., "where": field or null}``.

Hardening (issue 13): JSON bodies are read with a cap (:data:`MAX_JSON_BODY`) that holds for
chunked bodies too, and only the content upload streams more; answers that include a task or
a device are redacted (:func:`dmengine.model.redact`, :func:`dmengine.model.redact_task`);
the key check compares the header's bytes as sent, so a key that is not UTF-8 is a 401, not
a 500; ``/health`` answers 503 when the store cannot write.
"""
from __future__ import annotations

import hmac
import ssl
from typing import Annotated, Any, Awaitable, Callable, Literal, Protocol, Union

import msgspec
from msgspec import Meta
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..broker import Broker
from ..content import DEFAULT_MEDIA_TYPE, ContentService, media_type_problem
from ..errors import (AlreadyExists, ApiError, ContentError, DmError, NotFound, ServiceError,
                      StoreError, ValidationError)
from ..model import Capability, Operation, redact_task
from ..store.base import Store


class Services(Protocol):
    """What the API needs from the assembled engine (dmengine.engine.Engine provides it)."""

    api_key: str
    registry: Any                      # prometheus CollectorRegistry
    broker: Broker | None
    store: Store | None
    content: ContentService | None


ENGINE: web.AppKey[Services] = web.AppKey("engine")
MAX_JSON_BODY = 1024 * 1024          #: largest JSON request body
MAX_UPLOAD = 2 * 1024 ** 3           #: largest content upload (ContentService.max_size)

_json = msgspec.json.Encoder()
PUBLIC = frozenset({"/health", "/metrics"})


class Target(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    msisdn: Union[str, None] = None
    imei: Union[str, None] = None
    dev_id: Union[str, None] = None


class DoOperationRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target: Target
    operation: Operation
    bOptin: bool = False
    acceptDevicePolicy: Literal[10, 20, 30, 40] = 10
    testCycle: bool = False
    deadline: Union[float, None] = None


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=_json.encode(obj), status=status, content_type="application/json")


def error_response(status: int, code: str, message: str, where: str | None = None) -> web.Response:
    return json_response({"error": code, "message": message, "where": where}, status)


def body_too_large() -> ApiError:
    return ApiError(f"request body larger than {MAX_JSON_BODY} bytes", code="too_large",
                    http_status=413, where="$")


async def read_json_body(request: web.Request) -> bytes:
    """The request body, refused with 413 as soon as more than :data:`MAX_JSON_BODY` bytes
    have arrived.  Checking Content-Length alone let a chunked body (which declares no length)
    through to be buffered whole; here the count is kept while reading."""
    if request.content_length is not None and request.content_length > MAX_JSON_BODY:
        raise body_too_large()
    body = bytearray()
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > MAX_JSON_BODY:
            raise body_too_large()


async def decode_body(request: web.Request, cls: type[Any]) -> Any:
    body = await read_json_body(request)
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        msg = str(exc)
        i = msg.rfind(" - at `")
        where = msg[i + 7:-1] if i >= 0 else "$"
        raise ValidationError(msg, where=where) from None
    except msgspec.DecodeError as exc:
        raise ValidationError(f"body is not JSON: {exc}", where="$") from None


@web.middleware
async def errors_and_auth(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    if request.path not in PUBLIC:
        key = request.app[ENGINE].api_key
        given = request.headers.get("X-API-Key") or ""
        auth = request.headers.get("Authorization", "")
        if not given and auth.startswith("Bearer "):
            given = auth[7:]
        # aiohttp keeps header bytes that are not UTF-8 as surrogates: encoding them back the
        # same way compares exactly the bytes sent (a plain encode() raised: 500)
        sent = given.encode("utf-8", "surrogateescape")
        if not sent or not hmac.compare_digest(sent, key.encode()):
            return error_response(401, "unauthorized", "missing or wrong API key", "X-API-Key")
    try:
        return await handler(request)
    except ApiError as exc:
        resp = error_response(exc.http_status, exc.code, str(exc), exc.where)
        if exc.http_status == 413:
            resp.force_close()       # the rest of the body is not worth reading
        return resp
    except ValidationError as exc:
        return error_response(400, "invalid", str(exc), exc.where)
    except NotFound as exc:
        return error_response(404, "not_found", str(exc), None)
    except AlreadyExists as exc:
        return error_response(409, "already_exists", str(exc), None)
    except ServiceError as exc:
        return error_response(exc.http_status, exc.code, str(exc), exc.where)
    except StoreError as exc:
        return error_response(503, "store_error", str(exc), None)
    except DmError as exc:
        return error_response(400, "bad_request", str(exc), getattr(exc, "where", None))


routes = web.RouteTableDef()


@routes.get("/health", name="health")
async def health(request: web.Request) -> web.Response:
    """200 ``{"status": "ok"}``, or 503 naming what is wrong: a dead store writer or a closed
    store (every write would fail, so a load balancer should stop sending work here), or a
    scheduler loop that ended or keeps failing (no task would be notified, retried or
    expired again)."""
    engine = request.app[ENGINE]
    store = engine.store
    fault = "no store" if store is None else store.fault()
    if fault is not None:
        return error_response(503, "unhealthy", fault, "store")
    problems = engine.broker.health() if engine.broker is not None else ["no broker"]
    if problems:
        return error_response(503, "unhealthy", "; ".join(problems), "scheduler")
    return json_response({"status": "ok"})


@routes.get("/metrics", name="metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[ENGINE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@routes.get("/docs", name="docs")
async def docs(request: web.Request) -> web.Response:
    rows = "".join(f"<li><code>{r.method} {r.resource.canonical}</code> — {r.name}</li>"
                   for r in request.app.router.routes() if r.name and r.resource is not None)
    return web.Response(text=f"<!doctype html><title>dmengine API</title><h1>dmengine API</h1>"
                             f"<p>Send the API key as <code>X-API-Key</code>.</p><ul>{rows}</ul>",
                        content_type="text/html")


@routes.post("/v1/operations", name="doOperation")
async def do_operation(request: web.Request) -> web.Response:
    req: DoOperationRequest = await decode_body(request, DoOperationRequest)
    broker = request.app[ENGINE].broker
    assert broker is not None
    task_id = await broker.do_operation(
        req.operation, msisdn=req.target.msisdn, imei=req.target.imei, dev_id=req.target.dev_id,
        b_optin=req.bOptin, accept_device_policy=req.acceptDevicePolicy,
        test_cycle=req.testCycle, deadline=req.deadline)
    return json_response({"taskId": task_id}, 201)


class DoBootstrapRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target: Union[Target, None] = None
    #: the list form: a job with one bootstrap task per device (dmengine.wsi.jobs)
    targets: Union[list[Target], None] = None
    security: Literal["NETWORKID", "USERPIN", "USERPIN_NETWORKID", "NONE"] = "NETWORKID"
    pin: Union[str, None] = None
    serverId: Union[str, None] = None
    name: Union[Annotated[str, Meta(max_length=256)], None] = None     # of the job (targets)
    owner: Union[Annotated[str, Meta(max_length=256)], None] = None    # of the job (targets)


@routes.post("/v1/bootstrap", name="doBootstrap")
async def do_bootstrap(request: web.Request) -> web.Response:
    """``target``: one device → ``{taskId}``; ``targets``: a list → ``{jobId, taskIds}``."""
    req: DoBootstrapRequest = await decode_body(request, DoBootstrapRequest)
    if (req.target is None) == (req.targets is None) or req.targets == []:
        raise ValidationError("give target (one device) or targets (a non-empty list)",
                              where="$.targets" if req.targets == [] else "$.target")
    if req.targets is not None:
        from .jobs import bulk_bootstrap
        return await bulk_bootstrap(request, req.targets, security=req.security, pin=req.pin,
                                    server_id=req.serverId, name=req.name or "",
                                    owner=req.owner)
    broker = request.app[ENGINE].broker
    assert broker is not None
    assert req.target is not None
    task_id = await broker.do_bootstrap(msisdn=req.target.msisdn, imei=req.target.imei,
                                        dev_id=req.target.dev_id, server_id=req.serverId,
                                        security=req.security, pin=req.pin)
    return json_response({"taskId": task_id}, 201)


@routes.get("/v1/tasks/{taskId}", name="getTaskById")
async def get_task_by_id(request: web.Request) -> web.Response:
    broker = request.app[ENGINE].broker
    assert broker is not None
    data = await broker.get_task_by_id(request.match_info["taskId"])
    # a bootstrap task carries the account it provisions: passwords and nonces
    return json_response(msgspec.structs.replace(data, record=redact_task(data.record)))


@routes.get("/v1/tasks/{taskId}/history", name="getTaskHistory")
async def get_task_history(request: web.Request) -> web.Response:
    broker = request.app[ENGINE].broker
    assert broker is not None
    return json_response(await broker.get_task_history(request.match_info["taskId"]))


@routes.post("/v1/tasks/{taskId}/cancel", name="cancelTask")
async def cancel_task(request: web.Request) -> web.Response:
    broker = request.app[ENGINE].broker
    assert broker is not None
    task = await broker.cancel_task(request.match_info["taskId"])
    return json_response({"taskId": task.task_id, "status": task.state.value})


@routes.post("/v1/capabilities", name="createDeviceCapability")
async def create_capability(request: web.Request) -> web.Response:
    cap: Capability = await decode_body(request, Capability)
    store = request.app[ENGINE].store
    assert store is not None
    return json_response(await store.create_capability(cap), 201)


@routes.post("/v1/content", name="uploadContent")
async def upload_content(request: web.Request) -> web.Response:
    """Body: the raw package; metadata in the query (name, sha256, capability, from, to)."""
    q = request.query
    if "name" not in q:
        raise ValidationError("query parameter name is required", where="name")
    content_type = q.get("type", DEFAULT_MEDIA_TYPE)
    problem = media_type_problem(content_type)
    if problem is not None:       # it becomes a response header of every download
        raise ContentError(f"content type {content_type!r} {problem}", where="type")
    content = request.app[ENGINE].content
    assert content is not None

    async def chunks() -> Any:
        async for chunk in request.content.iter_chunked(256 * 1024):
            yield chunk

    size = request.content_length
    rec = await content.ingest(chunks(), name=q["name"], sha256=q.get("sha256"), size=size,
                               capability=q.get("capability"), from_version=q.get("from"),
                               to_version=q.get("to"),
                               content_type=content_type)
    return json_response(rec, 201)


def make_app(engine: Services) -> web.Application:
    # client_max_size bounds what aiohttp itself buffers (request.read/post): the JSON limit.
    # The content upload streams request.content and is bounded by ContentService.max_size.
    app = web.Application(middlewares=[errors_and_auth], client_max_size=MAX_JSON_BODY)
    app[ENGINE] = engine
    app.add_routes(routes)
    from . import devices          # IDeviceManagerServices (imports this module's helpers)
    app.add_routes(devices.routes)
    from . import jobs             # IBulkOperationsManagerServices: jobs (same helpers)
    app.add_routes(jobs.routes)
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
