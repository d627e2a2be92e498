"""IDeviceManagerServices routes of the API (L5): device capabilities.

A capability is a make/model/firmware line of devices: its oid, its TACs (a device's IMEI
prefix finds it), the management objects it supports (``moPaths``, e.g. ``{"fumo":
"./FUMO/1"}``) and its FUMO mode.  ``createDeviceCapability`` (POST /v1/capabilities),
``getDeviceCapabilityByOid`` (GET /v1/capabilities/{oid}), ``updateDeviceCapability`` (PATCH,
a JSON merge-patch), ``deleteDeviceCapability`` (DELETE) and ``getDeviceCapabilities`` (GET
/v1/capabilities, paged).  No service stands in front of these records: the handlers use the
store, which validates every write (a TAC already another capability's is a 409).
"""
from __future__ import annotations

from aiohttp import web

from ..errors import ApiError, NotFound, UnknownResource
from ..model import Capability
from .common import store_of
from .middleware import decode_body, json_response, parse_query
from .openapi import operation
from .schemas import (CapabilityPage, CapabilityPatch, CapabilityView, PageQuery, patch_changes,
                      to_model, to_view)

routes = web.RouteTableDef()
TAG = "IDeviceManagerServices"
CAP = "/v1/capabilities/{oid}"


async def _get(request: web.Request, oid: str) -> Capability:
    try:
        return await store_of(request).get_capability(oid)
    except NotFound:
        raise UnknownResource(f"no capability {oid!r}", where="oid") from None


@routes.post("/v1/capabilities", name="createDeviceCapability")
@operation("Add a device capability", body=CapabilityView, answers={201: CapabilityView},
           errors=(400, 409), tag=TAG)
async def create_capability(request: web.Request) -> web.Response:
    """A make/model/firmware line: ``oid``, ``make``, ``model``, ``firmwareVersions``,
    ``tacs``, ``moPaths``, ``fumoMode``.  An oid or a TAC that exists already is a 409."""
    cap = to_model(await decode_body(request, CapabilityView))
    return json_response(to_view(await store_of(request).create_capability(cap)), 201)


@routes.get(CAP, name="getDeviceCapabilityByOid")
@operation("A device capability", answers={200: CapabilityView}, errors=(404,), tag=TAG)
async def get_capability(request: web.Request) -> web.Response:
    return json_response(to_view(await _get(request, request.match_info["oid"])))


@routes.patch(CAP, name="updateDeviceCapability")
@operation("Change a device capability", body=CapabilityPatch, answers={200: CapabilityView},
           errors=(400, 404, 409), tag=TAG)
async def update_capability(request: web.Request) -> web.Response:
    """A JSON merge-patch: the fields given replace the stored ones, null puts a field back
    to its default; ``oid`` and the times are the record's own."""
    patch = await decode_body(request, CapabilityPatch)
    changes = patch_changes(patch, Capability)
    if not changes:
        raise ApiError("nothing to update", code="invalid", where="$")
    oid = request.match_info["oid"]
    try:
        cap = await store_of(request).update_capability(oid, changes)
    except NotFound as exc:
        if exc.kind != "capability":
            raise
        raise UnknownResource(f"no capability {oid!r}", where="oid") from None
    return json_response(to_view(cap))


@routes.delete(CAP, name="deleteDeviceCapability")
@operation("Remove a device capability", answers={204: None}, errors=(404,), tag=TAG)
async def delete_capability(request: web.Request) -> web.Response:
    oid = request.match_info["oid"]
    await _get(request, oid)
    try:
        await store_of(request).delete_capability(oid)
    except NotFound:
        raise UnknownResource(f"no capability {oid!r}", where="oid") from None
    return web.Response(status=204)


@routes.get("/v1/capabilities", name="getDeviceCapabilities")
@operation("The device capabilities", query=PageQuery, answers={200: CapabilityPage},
           errors=(400,), tag=TAG)
async def list_capabilities(request: web.Request) -> web.Response:
    """Every capability by oid, ``{items, nextCursor}``."""
    q = parse_query(request, PageQuery)
    page = await store_of(request).list_capabilities(cursor=q.cursor, limit=q.limit)
    return json_response(CapabilityPage(items=[to_view(c) for c in page.items],
                                        next_cursor=page.next_cursor))
