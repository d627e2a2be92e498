"""Content routes of the API (L5): firmware packages and other content.

``uploadContent`` (POST /v1/content: the raw package as the body, its metadata in the
query), ``getContent`` (GET /v1/content/{contentId}: the record and its ``downloadUrl``),
``listContent`` (GET /v1/content, paged, ``?capability=``) and ``deleteContent`` (DELETE).
The work is done by :class:`dmengine.content.ContentService`: an upload streams to disk with
its sha256 checked (a mismatch is a 422 naming ``sha256`` or ``size``) and is bounded by the
service's ``max_size`` (413); devices download from the device port.  The record's file name
is the engine's own and not shown.
"""
from __future__ import annotations

from typing import Annotated, Any, Union

from aiohttp import web
from msgspec import Meta

from ..content import DEFAULT_MEDIA_TYPE, download_url, media_type_problem
from ..errors import ApiError, ContentError, NotFound, UnknownResource
from ..model import Content, Name
from .common import content_of, engine_of
from .middleware import json_response, parse_query
from .openapi import operation
from .schemas import ID_SCHEMA, ContentPage, ContentView, PageQuery, _In, to_view

routes = web.RouteTableDef()
TAG = "content"

OptId = Union[Annotated[str, Meta(min_length=1, max_length=128, extra_json_schema=ID_SCHEMA)],
              None]


class UploadQuery(_In, rename={"from_version": "from", "to_version": "to",
                               "content_type": "type"}):
    """``name`` of the package; ``sha256`` (hex) and the body's Content-Length are checked
    when given; ``capability`` it is for; ``from`` / ``to`` firmware versions (no ``from``:
    a full image); ``type``: the media type devices get it with."""
    name: Annotated[str, Meta(min_length=1, max_length=256)]
    sha256: Union[Annotated[str, Meta(max_length=64, extra_json_schema={
        "pattern": "^[0-9a-fA-F]{64}$"})], None] = None
    capability: OptId = None
    from_version: Union[Name, None] = None
    to_version: Union[Name, None] = None
    content_type: Annotated[str, Meta(max_length=128)] = DEFAULT_MEDIA_TYPE


class ContentQuery(PageQuery, kw_only=True):
    """``capability``: only the packages for it (a page may hold fewer than ``limit`` and
    still have a ``nextCursor``)."""
    capability: OptId = None


def content_json(request: web.Request, c: Content) -> Any:
    base = getattr(getattr(engine_of(request).broker, "config", None), "content_base_url",
                   None)
    url = download_url(c.content_id, base.rsplit("/content", 1)[0]) if base else None
    return to_view(c, ContentView, download_url=url)


@routes.post("/v1/content", name="uploadContent")
@operation("Upload a package", query=UploadQuery,
           raw_body={"application/octet-stream": {"type": "string", "format": "binary"}},
           answers={201: ContentView}, errors=(400, 409, 413, 422), tag=TAG)
async def upload_content(request: web.Request) -> web.Response:
    """The body is the package itself (streamed to disk, never held whole); the answer is
    the record with its ``contentId``, ``sha256`` and ``size``."""
    if "name" not in request.query:        # the first check, as before the query Struct
        raise ApiError("query parameter name is required", code="invalid", where="name")
    q = parse_query(request, UploadQuery)
    problem = media_type_problem(q.content_type)
    if problem is not None:       # it becomes a response header of every download
        raise ContentError(f"content type {q.content_type!r} {problem}", where="type")

    async def chunks() -> Any:
        async for chunk in request.content.iter_chunked(256 * 1024):
            yield chunk

    rec = await content_of(request).ingest(
        chunks(), name=q.name, sha256=q.sha256, size=request.content_length,
        capability=q.capability, from_version=q.from_version, to_version=q.to_version,
        content_type=q.content_type)
    return json_response(content_json(request, rec), 201)


async def _get(request: web.Request) -> Content:
    cid = request.match_info["contentId"]
    try:
        return await content_of(request).get(cid)
    except NotFound:
        raise UnknownResource(f"no content {cid!r}", where="contentId") from None


@routes.get("/v1/content/{contentId}", name="getContent")
@operation("A package's record", answers={200: ContentView}, errors=(404,), tag=TAG)
async def get_content(request: web.Request) -> web.Response:
    """The record: name, size, sha256, capability, versions, media type, downloads so far
    and the URL devices fetch it from."""
    return json_response(content_json(request, await _get(request)))


@routes.get("/v1/content", name="listContent")
@operation("The packages", query=ContentQuery, answers={200: ContentPage}, errors=(400,),
           tag=TAG)
async def list_content(request: web.Request) -> web.Response:
    q = parse_query(request, ContentQuery)
    page = await content_of(request).list_page(capability=q.capability, cursor=q.cursor,
                                               limit=q.limit)
    return json_response(ContentPage(items=[content_json(request, c) for c in page.items],
                                     next_cursor=page.next_cursor))


@routes.delete("/v1/content/{contentId}", name="deleteContent")
@operation("Remove a package", answers={204: None}, errors=(404,), tag=TAG)
async def delete_content(request: web.Request) -> web.Response:
    """The record, then the file (a download already streaming may fail)."""
    await _get(request)
    try:
        await content_of(request).delete(request.match_info["contentId"])
    except NotFound:
        raise UnknownResource(f"no content {request.match_info['contentId']!r}",
                              where="contentId") from None
    return web.Response(status=204)
