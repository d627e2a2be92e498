"""IDeviceManagerServices routes of the API (L5): device records.

``createDeviceInstance`` (POST /v1/devices), ``importDeviceInstances`` (POST
/v1/devices/import, a streamed CSV or NDJSON body), ``getDeviceInstanceByDeviceID`` (GET
/v1/devices/{devId}: a DevId or a bare IMEI), ``updateDeviceInstance`` (PATCH, a JSON
merge-patch), ``deleteDeviceInstance`` (DELETE) and ``getDeviceInstances`` (GET /v1/devices:
lookup by MSISDN or IMEI, or a query by capability, TAC, model, firmware version and last
contact, cursor-paged).  Every device an answer carries goes through
:func:`dmengine.model.redact`: no password, key or nonce leaves.  The work is done by
:mod:`dmengine.devices` and the store; these handlers translate HTTP.
"""
from __future__ import annotations

import msgspec
from aiohttp import web

from ..devices import DeviceImport, device_changes, find_device, import_format, parse_time
from ..errors import NotFound, ValidationError
from ..model import Device, redact
from ..store.base import DEFAULT_PAGE, MAX_PAGE, DeviceQuery, Page, Store
from .app import ENGINE, decode_body, json_response, read_json_body

routes = web.RouteTableDef()

#: a devId segment may hold any character of a DevId but "/" ("%2F" works)
DEV = "/v1/devices/{devId}"


def _store(request: web.Request) -> Store:
    store = request.app[ENGINE].store
    assert store is not None
    return store


def _flag(request: web.Request, name: str) -> bool:
    v = request.query.get(name, "false").lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ValidationError(f"{name} is true or false, not {v!r}", where=name)


@routes.post("/v1/devices", name="createDeviceInstance")
async def create_device(request: web.Request) -> web.Response:
    dev: Device = await decode_body(request, Device)
    return json_response(redact(await _store(request).create_device(dev)), 201)


@routes.post("/v1/devices/import", name="importDeviceInstances")
async def import_devices(request: web.Request) -> web.Response:
    """A streamed body: CSV (``text/csv``, a header row naming the columns) or NDJSON
    (``application/x-ndjson``, one device object per line); ``?format=csv|ndjson`` overrides
    the media type.  ``?upsert=true`` replaces devices that exist (default: such rows are
    rejected).  Answers the counts and the first rejected rows with line and column."""
    q = request.query
    for name in q:
        if name not in ("upsert", "format"):
            raise ValidationError(f"unknown query parameter {name!r}", where=name)
    fmt = import_format(request.content_type, q.get("format"))
    upsert = _flag(request, "upsert")
    engine = request.app[ENGINE]
    broker = engine.broker
    server_id = getattr(getattr(broker, "config", None), "server_id", None) or "dmengine"
    imp = DeviceImport(_store(request), fmt, replace=upsert, server_id=server_id)
    try:
        async for data in request.content.iter_any():
            await imp.feed(data)
        result = await imp.finish()
    finally:
        await imp.close()
    return json_response(result)


@routes.get(DEV, name="getDeviceInstanceByDeviceID")
async def get_device(request: web.Request) -> web.Response:
    """``devId``: the record's DevId (``IMEI:356938035643809``) or a bare IMEI (15 digits)."""
    return json_response(redact(await find_device(_store(request), request.match_info["devId"])))


@routes.patch(DEV, name="updateDeviceInstance")
async def update_device(request: web.Request) -> web.Response:
    """A JSON merge-patch: ``imei``, ``msisdn``, ``capability``, ``tz`` and ``account`` (merged
    field by field); null removes a field; other fields are refused naming the field."""
    body = await read_json_body(request)
    try:
        patch = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise ValidationError(f"body is not JSON: {exc}", where="$") from None
    if not isinstance(patch, dict):
        raise ValidationError("the body is a JSON object of the fields to change", where="$")
    changes = device_changes(patch)
    store = _store(request)
    dev = await find_device(store, request.match_info["devId"])
    return json_response(redact(await store.update_device(dev.dev_id, changes)))


@routes.delete(DEV, name="deleteDeviceInstance")
async def delete_device(request: web.Request) -> web.Response:
    store = _store(request)
    dev = await find_device(store, request.match_info["devId"])
    await store.delete_device(dev.dev_id)
    return web.Response(status=204)


_QUERY_PARAMS = {"capability", "tac", "model", "firmware", "last_contact_after",
                 "last_contact_before", "limit", "cursor", "msisdn", "imei"}


def _time_param(request: web.Request, name: str) -> float | None:
    v = request.query.get(name)
    if v is None:
        return None
    try:
        return parse_time(v)
    except ValueError:
        raise ValidationError(f"{name} is epoch seconds or an ISO-8601 time, not {v!r}",
                              where=name) from None


def _page(page: Page[Device]) -> web.Response:
    return json_response({"items": [redact(d) for d in page.items],
                          "next_cursor": page.next_cursor})


@routes.get("/v1/devices", name="getDeviceInstances")
async def get_devices(request: web.Request) -> web.Response:
    """``?msisdn=`` or ``?imei=``: that device (a page of one, or empty).  Otherwise a query:
    ``capability``, ``tac``, ``model`` (./DevInfo/Mod), ``firmware`` (./DevDetail/FwV),
    ``last_contact_after`` / ``last_contact_before`` (epoch seconds or ISO 8601), ``limit``
    (1..10000, default 100), ``cursor``.  A page may hold fewer than ``limit`` devices and still
    have a ``next_cursor`` (each page examines a bounded number of records): page on until
    ``next_cursor`` is null."""
    q = request.query
    for name in q:
        if name not in _QUERY_PARAMS:
            raise ValidationError(f"unknown query parameter {name!r} (known: "
                                  f"{', '.join(sorted(_QUERY_PARAMS))})", where=name)
    store = _store(request)
    lookups = [n for n in ("msisdn", "imei") if n in q]
    if lookups:
        others = [n for n in q if n not in ("msisdn", "imei")]
        if len(lookups) > 1 or others:
            raise ValidationError("msisdn and imei are exact lookups: give one and nothing else",
                                  where=(lookups[1:] or others)[0])
        name = lookups[0]
        value = q[name]
        if name == "msisdn" and value.startswith(" "):
            value = "+" + value[1:]       # an unencoded "+" arrives as a space
        try:
            dev = await (store.device_by_msisdn(value) if name == "msisdn"
                         else store.device_by_imei(value))
        except NotFound:
            return _page(Page([], None))
        return _page(Page([dev], None))
    try:
        limit = int(q.get("limit", DEFAULT_PAGE))
    except ValueError:
        raise ValidationError(f"limit is a number 1..{MAX_PAGE}", where="limit") from None
    query = DeviceQuery(capability=q.get("capability"), tac=q.get("tac"), model=q.get("model"),
                        firmware=q.get("firmware"),
                        contact_after=_time_param(request, "last_contact_after"),
                        contact_before=_time_param(request, "last_contact_before"))
    page = await store.query_devices(query, cursor=q.get("cursor"), limit=limit)
    return _page(page)
