"""IDeviceManagerServices routes of the API (L5): device records.

``createDeviceInstance`` (POST /v1/devices), ``importDeviceInstances`` (POST
/v1/devices/import, a streamed CSV or NDJSON body), ``getDeviceInstanceByDeviceID`` (GET
/v1/devices/{devId}: a DevId or a bare IMEI), ``updateDeviceInstance`` (PATCH, a JSON
merge-patch), ``deleteDeviceInstance`` (DELETE) and ``getDeviceInstances`` (GET /v1/devices:
lookup by MSISDN or IMEI, or a query by capability, TAC, model, firmware version and last
contact, cursor-paged).  Every device an answer carries goes through
:func:`dmengine.model.redact`: no password, key or nonce leaves.  The work is done by
:mod:`dmengine.devices` and the store; these handlers translate HTTP.

JSON is camelCase (``devId``, ``lastContact``, ``account.clientPassword``), NDJSON import rows
and CSV columns too (:data:`dmengine.devices.CSV_CAMEL`: ``devId``, ``clientPassword``…; the
snake_case names of earlier versions, ``dev_id``, ``client_password``…, are accepted as well);
a CSV's row errors name the column as its header spelled it.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

import msgspec
from aiohttp import web
from msgspec import Meta

from ..devices import DeviceImport, device_changes, find_device, import_format, parse_time
from ..errors import ApiError, NotFound, ValidationError
from ..model import Device, redact
from ..store.base import DEFAULT_PAGE, MAX_PAGE, DeviceQuery, Page
from .common import engine_of, store_of
from .middleware import decode_body, json_response
from .openapi import operation
from .schemas import (ID_SCHEMA, DevicePage, DevicePatch, DeviceRow, DeviceView, ImportReport,
                      PageQuery, RowErrorView, _In, camel_path, patch_changes, to_model, to_view)

routes = web.RouteTableDef()
TAG = "IDeviceManagerServices"

#: a devId segment may hold any character of a DevId but "/" ("%2F" works)
DEV = "/v1/devices/{devId}"


def _flag(request: web.Request, name: str) -> bool:
    v = request.query.get(name, "false").lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise ApiError(f"{name} is true or false, not {v!r}", code="invalid", where=name)


def device_json(dev: Device) -> Any:
    return to_view(redact(dev))


@routes.post("/v1/devices", name="createDeviceInstance")
@operation("Add a device record", body=DeviceView, answers={201: DeviceView},
           errors=(400, 409), tag=TAG)
async def create_device(request: web.Request) -> web.Response:
    """``devId`` (e.g. ``IMEI:356938035643809``), ``imei``, ``msisdn``, ``capability``,
    ``account`` (the DM account: ``serverId``, ``authScheme``, ``clientName``,
    ``clientPassword``…), ``tz``.  A devId, IMEI or MSISDN already on record is a 409."""
    dev: Device = to_model(await decode_body(request, DeviceView))
    return json_response(device_json(await store_of(request).create_device(dev)), 201)


class ImportQuery(_In):
    """``upsert``: replace devices that exist (default: such rows are rejected);
    ``format``: csv or ndjson (default: by the Content-Type)."""
    upsert: bool = False
    format: Union[Annotated[str, Meta(pattern="^(csv|ndjson)$")], None] = None


class _RowDecoder:
    """An NDJSON row in the API's names (``devId``…), unknown fields ignored."""

    def __init__(self) -> None:
        self._decoder = msgspec.json.Decoder(DeviceRow)

    def decode(self, line: bytes) -> Device:
        return to_model(self._decoder.decode(line))  # type: ignore[no-any-return]


@routes.post("/v1/devices/import", name="importDeviceInstances")
@operation("Import device records (CSV or NDJSON)", query=ImportQuery,
           raw_body={"text/csv": {"type": "string"},
                     "application/x-ndjson": {"type": "string"}},
           answers={200: ImportReport}, errors=(400, 415), tag=TAG)
async def import_devices(request: web.Request) -> web.Response:
    """A streamed body: CSV (``text/csv``, a header row naming the columns in camelCase:
    ``devId``, ``imei``, ``msisdn``, ``capability``, ``tz``, ``lastContact``, the account's
    ``serverId``, ``authScheme``, ``clientName``, ``clientPassword``, ``clientKey``,
    ``clientNonce``, ``serverPassword``, ``serverKey``, ``serverNonce``, and ``./DevInfo/…`` /
    ``./DevDetail/…`` nodes; the snake_case names ``dev_id``, ``client_password``… are
    accepted too) or NDJSON (``application/x-ndjson``, one device object per line, as
    createDeviceInstance takes it).  Answers the counts and the first rejected rows with line
    and column (CSV, as the header spelled it) or field (NDJSON)."""
    q = request.query
    for name in q:
        if name not in ("upsert", "format"):
            raise ApiError(f"unknown query parameter {name!r}", code="invalid", where=name)
    try:
        fmt = import_format(request.content_type, q.get("format"))
    except ValidationError as exc:
        raise ApiError(str(exc), code="invalid", where=exc.where) from None
    upsert = _flag(request, "upsert")
    broker = engine_of(request).broker
    server_id = getattr(getattr(broker, "config", None), "server_id", None) or "dmengine"
    imp = DeviceImport(store_of(request), fmt, replace=upsert, server_id=server_id,
                       row_decoder=_RowDecoder() if fmt == "ndjson" else None)
    try:
        try:
            async for data in request.content.iter_any():
                await imp.feed(data)
            result = await imp.finish()
        except ValidationError as exc:       # the CSV header: ``where`` is its column
            raise ApiError(str(exc), code="invalid", where=exc.where) from None
    finally:
        await imp.close()
    where = camel_path if fmt == "ndjson" else (lambda w: w)
    return json_response(ImportReport(
        rows=result.rows, created=result.created, replaced=result.replaced,
        rejected=result.rejected,
        errors=[RowErrorView(line=e.line, where=where(e.where), message=e.message)
                for e in result.errors],
        errors_omitted=result.errors_omitted))


@routes.get(DEV, name="getDeviceInstanceByDeviceID")
@operation("A device record (by DevId or bare IMEI)", answers={200: DeviceView},
           errors=(404,), tag=TAG)
async def get_device(request: web.Request) -> web.Response:
    """``devId``: the record's DevId (``IMEI:356938035643809``) or a bare IMEI (15 digits)."""
    return json_response(device_json(await find_device(store_of(request),
                                                       request.match_info["devId"])))


@routes.patch(DEV, name="updateDeviceInstance")
@operation("Change a device record", body=DevicePatch, answers={200: DeviceView},
           errors=(400, 404, 409), tag=TAG)
async def update_device(request: web.Request) -> web.Response:
    """A JSON merge-patch: ``imei``, ``msisdn``, ``capability``, ``tz`` and ``account`` (merged
    field by field); null removes a field; other fields are refused naming the field."""
    patch = await decode_body(request, DevicePatch)
    changes = device_changes(patch_changes(patch, Device))
    store = store_of(request)
    dev = await find_device(store, request.match_info["devId"])
    return json_response(device_json(await store.update_device(dev.dev_id, changes)))


@routes.delete(DEV, name="deleteDeviceInstance")
@operation("Remove a device record", answers={204: None}, errors=(404,), tag=TAG)
async def delete_device(request: web.Request) -> web.Response:
    store = store_of(request)
    dev = await find_device(store, request.match_info["devId"])
    await store.delete_device(dev.dev_id)
    return web.Response(status=204)


_Id = Union[Annotated[str, Meta(min_length=1, max_length=128, extra_json_schema=ID_SCHEMA)],
            None]
_When = Union[Annotated[str, Meta(max_length=64, description="epoch seconds or ISO 8601")],
              None]


class DevicesQuery(PageQuery, kw_only=True):
    """``msisdn`` or ``imei``: that device (a page of one, or empty), nothing else given.
    Otherwise a query whose filters must all match."""
    msisdn: Union[Annotated[str, Meta(max_length=32)], None] = None
    imei: Union[Annotated[str, Meta(max_length=32)], None] = None
    capability: _Id = None
    tac: Union[Annotated[str, Meta(pattern="^[0-9]{8}$")], None] = None
    model: Union[Annotated[str, Meta(max_length=256)], None] = None
    firmware: Union[Annotated[str, Meta(max_length=256)], None] = None
    last_contact_after: _When = None
    last_contact_before: _When = None


_QUERY_PARAMS = set(DevicesQuery.__struct_encode_fields__)


def _time_param(request: web.Request, name: str) -> float | None:
    v = request.query.get(name)
    if v is None:
        return None
    try:
        return parse_time(v)
    except ValueError:
        raise ApiError(f"{name} is epoch seconds or an ISO-8601 time, not {v!r}",
                       code="invalid", where=name) from None


def _page(page: Page[Device]) -> web.Response:
    return json_response(DevicePage(items=[device_json(d) for d in page.items],
                                    next_cursor=page.next_cursor))


@routes.get("/v1/devices", name="getDeviceInstances")
@operation("Find device records", query=DevicesQuery, answers={200: DevicePage},
           errors=(400,), tag=TAG)
async def get_devices(request: web.Request) -> web.Response:
    """``?msisdn=`` or ``?imei=``: that device (a page of one, or empty).  Otherwise a query:
    ``capability``, ``tac``, ``model`` (./DevInfo/Mod), ``firmware`` (./DevDetail/FwV),
    ``lastContactAfter`` / ``lastContactBefore`` (epoch seconds or ISO 8601), ``limit``
    (1..10000, default 100), ``cursor``.  A page may hold fewer than ``limit`` devices and still
    have a ``nextCursor`` (each page examines a bounded number of records): page on until
    ``nextCursor`` is null."""
    q = request.query
    for name in q:
        if name not in _QUERY_PARAMS:
            raise ApiError(f"unknown query parameter {name!r} (known: "
                           f"{', '.join(sorted(_QUERY_PARAMS))})", code="invalid", where=name)
    store = store_of(request)
    lookups = [n for n in ("msisdn", "imei") if n in q]
    if lookups:
        others = [n for n in q if n not in ("msisdn", "imei")]
        if len(lookups) > 1 or others:
            raise ApiError("msisdn and imei are exact lookups: give one and nothing else",
                           code="invalid", where=(lookups[1:] or others)[0])
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
        raise ApiError(f"limit is a number 1..{MAX_PAGE}", code="invalid",
                       where="limit") from None
    query = DeviceQuery(capability=q.get("capability"), tac=q.get("tac"), model=q.get("model"),
                        firmware=q.get("firmware"),
                        contact_after=_time_param(request, "lastContactAfter"),
                        contact_before=_time_param(request, "lastContactBefore"))
    page = await store.query_devices(query, cursor=q.get("cursor"), limit=limit)
    return _page(page)


__all__ = ["routes", "device_json", "DevicesQuery", "ImportQuery"]
