"""The API's one error shape and body limits (L5).

Every error the API answers has one shape, :class:`dmengine.wsi.schemas.ErrorBody`:
``{"error": code, "message": ..., "where": field | null}``.  ``where`` names the field in the
request's own names: a msgspec path of a body (``$.operation.nodes[0]``, ``$.devId``), a query
parameter (``limit``), a header (``X-API-Key``).  A service or store error names a record's
field (``target.dev_id``, ``$.account.client_name``): :func:`error_answer` turns it into the API's
camelCase (``target.devId``); an :class:`~dmengine.errors.ApiError` is taken as already in the
API's names.  Routes that do not exist (404), methods a route does not take (405) and any
error nobody expected (500, logged with its traceback, never shown) get the same shape.

Bodies: JSON bodies are read with a cap (:data:`MAX_JSON_BODY`) that holds for chunked bodies
too (:func:`read_json_body`); only the content upload and the device import stream more.
"""
from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

import msgspec
from aiohttp import web

from ..errors import (AlreadyExists, ApiError, DmError, NotFound, ServiceError, StoreError,
                      ValidationError)
from .schemas import camel_path

log = logging.getLogger("dmengine.wsi")

MAX_JSON_BODY = 1024 * 1024          #: largest JSON request body
MAX_UPLOAD = 2 * 1024 ** 3           #: largest content upload (ContentService.max_size)

_json = msgspec.json.Encoder()
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def msgspec_where(exc: msgspec.ValidationError) -> str:
    """The field a msgspec error is about: its ``$.path``, with the field's name added when
    the error is a missing or unknown field (msgspec gives the path of the object)."""
    msg = str(exc)
    i = msg.rfind(" - at `")
    where = msg[i + 7:-1] if i >= 0 and msg.endswith("`") else "$"
    for marker in ("missing required field `", "unknown field `"):
        j = msg.find(marker)
        if j >= 0:
            k = msg.find("`", j + len(marker))
            if k > 0:
                return f"{where}.{msg[j + len(marker):k]}"
    return where


def decode_json(body: bytes, cls: Any) -> Any:
    try:
        return msgspec.json.decode(body, type=cls)
    except msgspec.ValidationError as exc:
        raise ApiError(str(exc), code="invalid", where=msgspec_where(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError(f"body is not JSON: {exc}", code="invalid", where="$") from None


async def decode_body(request: web.Request, cls: Any) -> Any:
    """The JSON body decoded as ``cls`` (a request Struct); 400 naming the field."""
    return decode_json(await read_json_body(request), cls)


async def optional_body(request: web.Request, cls: Any) -> Any:
    """The body as ``cls``, or None when there is none (or it is blank)."""
    if not request.body_exists:
        return None
    body = await read_json_body(request)
    if not body.strip():
        return None
    return decode_json(body, cls)


def parse_query(request: web.Request, cls: Any) -> Any:
    """The query string as ``cls`` (a Struct whose fields are the parameters): an unknown
    parameter or a bad value is a 400 naming the parameter."""
    q = request.query
    names = set(cls.__struct_encode_fields__)
    for name in q:
        if name not in names:
            raise ApiError(f"unknown query parameter {name!r} (known: "
                           f"{', '.join(sorted(names))})", code="invalid", where=name)
    try:
        return msgspec.convert({k: q[k] for k in q}, cls, strict=False)
    except msgspec.ValidationError as exc:
        where = msgspec_where(exc)
        raise ApiError(str(exc).replace(" - at `$.", " - parameter `"), code="invalid",
                       where=where[2:] if where.startswith("$.") else where) from None


def _error_of(exc: Exception) -> tuple[int, str, str, str | None]:
    """(HTTP status, code, message, where) of an error a handler raised."""
    if isinstance(exc, ApiError):
        return exc.http_status, exc.code, str(exc), exc.where
    if isinstance(exc, ValidationError):
        return 400, "invalid", str(exc), camel_path(exc.where)
    if isinstance(exc, NotFound):
        return 404, "not_found", str(exc), None
    if isinstance(exc, AlreadyExists):
        return 409, "already_exists", str(exc), None
    if isinstance(exc, ServiceError):
        return exc.http_status, exc.code, str(exc), camel_path(exc.where)
    if isinstance(exc, StoreError):
        return 503, "store_error", str(exc), None
    return 400, "bad_request", str(exc), camel_path(getattr(exc, "where", None))


#: error codes of the router's and aiohttp's own HTTP errors
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def error_answer(request: web.Request, exc: Exception) -> web.Response:
    """The answer, in the one error shape, of what a handler (or the authentication before
    it) raised; re-raises an HTTPException below 400 (a redirect is an answer, not an
    error)."""
    if isinstance(exc, DmError):
        status, code, message, where = _error_of(exc)
        resp = error_response(status, code, message, where)
        if status == 413:
            resp.force_close()       # the rest of the body is not worth reading
        return resp
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        code = _HTTP_CODES.get(exc.status, "http_error")
        message = exc.reason
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        resp = error_response(exc.status, code, message, None)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                resp.headers[name] = exc.headers[name]
        return resp
    log.error("unexpected error in %s %s", request.method, request.path, exc_info=exc)
    return error_response(500, "internal", "internal error (logged by the server)", None)


__all__ = ["error_answer", "json_response",
           "error_response", "read_json_body", "decode_body", "decode_json", "optional_body",
           "parse_query", "msgspec_where", "body_too_large", "MAX_JSON_BODY", "MAX_UPLOAD"]
