"""Diagnostics routes of the API (L5): ``getDiagnostics``.

A diagnosis is a ``doOperation`` with ``DIAG`` (the nodes to read, else the capability's or
the engine's default DevDetail/DevInfo leaves); its task's result holds what the device
answered.  ``getDiagnostics`` (GET /v1/diagnostics) hands those results back: ``?devId=``
the device's latest DIAG tasks, newest first (``limit``, default 10), or ``?taskId=`` one
DIAG task.  Each item: the values read (node URI → value), the DM status of each read and
the task's state.  The tasks come from :meth:`dmengine.broker.Broker.get_diagnostics`.
"""
from __future__ import annotations

from typing import Annotated, Union

from aiohttp import web
from msgspec import Meta

from ..devices import find_device
from ..errors import ApiError, NotFound, UnknownResource
from ..model import DiagOp, Task, redact_task
from .common import broker_of, store_of
from .middleware import json_response, parse_query
from .openapi import operation
from .schemas import ID_SCHEMA, Diagnostics, DiagnosticsPage, _In
from .security import owner_scope

routes = web.RouteTableDef()
TAG = "diagnostics"

IdParam = Union[Annotated[str, Meta(min_length=1, max_length=128, extra_json_schema=ID_SCHEMA)],
                None]


class DiagnosticsQuery(_In):
    """``devId`` (a DevId or a bare IMEI) or ``taskId`` (or both: the task must be the
    device's); ``limit``: how many of the device's latest DIAG tasks."""
    dev_id: IdParam = None
    task_id: IdParam = None
    limit: Annotated[int, Meta(ge=1, le=100)] = 10


def diagnostics_of(task: Task) -> Diagnostics:
    op = task.op
    r = task.result
    return Diagnostics(task_id=task.task_id, dev_id=task.dev_id, status=task.state,
                       nodes=list(op.nodes) if isinstance(op, DiagOp) else [],
                       values=dict(r.nodes) if r is not None else {},
                       statuses=dict(r.statuses) if r is not None else {},
                       created=task.created, finished=task.finished, cause=task.cause)


@routes.get("/v1/diagnostics", name="getDiagnostics")
@operation("Results of DIAG operations", query=DiagnosticsQuery,
           answers={200: DiagnosticsPage}, errors=(400, 404), tag=TAG)
async def get_diagnostics(request: web.Request) -> web.Response:
    """The device's latest DIAG results (``devId``) or one DIAG task's (``taskId``),
    ``{items, nextCursor}`` (``nextCursor`` is null: ``limit`` bounds the answer)."""
    q = parse_query(request, DiagnosticsQuery)
    if q.dev_id is None and q.task_id is None:
        raise ApiError("name the device (devId) or the task (taskId)", code="invalid",
                       where="devId")
    dev_id = None
    if q.dev_id is not None:
        try:
            dev_id = (await find_device(store_of(request), q.dev_id)).dev_id
        except NotFound:
            raise UnknownResource(f"no device {q.dev_id!r}", where="devId") from None
    tasks = await broker_of(request).get_diagnostics(dev_id=dev_id, task_id=q.task_id,
                                                     limit=q.limit, owner=owner_scope(request))
    return json_response(DiagnosticsPage(items=[diagnostics_of(redact_task(t)) for t in tasks],
                                         next_cursor=None))
