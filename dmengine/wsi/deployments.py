"""IDeploymentBrokerServices routes of the API (L5): operations on one device and their tasks.

``doOperation`` (POST /v1/operations), ``doBootstrap`` (POST /v1/bootstrap: one device, or a
list → a job, :func:`dmengine.wsi.jobs.bulk_bootstrap`), ``getTaskById`` (GET
/v1/tasks/{taskId}: the seeds' TaskData, ``status`` its ``getStatus()``), ``getTaskHistory``
(GET /v1/tasks/{taskId}/history, paged) and ``cancelTask``.  The work is done by
:class:`dmengine.broker.Broker`; a task in an answer goes through
:func:`dmengine.model.redact_task` (a bootstrap carries the account it provisions).
"""
from __future__ import annotations

import msgspec
from aiohttp import web

from ..bounded import BoundedDict
from ..errors import ApiError
from ..model import Task, redact_task
from .common import broker_of
from .middleware import decode_body, json_response, parse_query
from .openapi import operation
from .schemas import (BootstrapJobCreated, DoBootstrapRequest, DoOperationRequest, HistoryPage,
                      PageQuery, TaskCancelled, TaskCreated, TaskDataView, task_data, to_model,
                      to_view)

routes = web.RouteTableDef()
TAG = "IDeploymentBrokerServices"


@routes.post("/v1/operations", name="doOperation")
@operation("Run an operation on one device", body=DoOperationRequest,
           answers={201: TaskCreated}, errors=(400, 404, 409), tag=TAG)
async def do_operation(request: web.Request) -> web.Response:
    """Creates the task and wakes the device (package #0): UPDATE (FUMO), QUERY (Get
    nodes), SET (Replace/Add/Delete), EXEC, DIAG.  The device is named by MSISDN, IMEI or
    DevId.  Answers ``{taskId}``; follow it with getTaskById."""
    req = await decode_body(request, DoOperationRequest)
    t = req.target
    task_id = await broker_of(request).do_operation(
        to_model(req.operation), msisdn=t.msisdn, imei=t.imei, dev_id=t.dev_id,
        b_optin=req.b_optin, accept_device_policy=req.accept_device_policy,
        test_cycle=req.test_cycle, deadline=req.deadline)
    return json_response(TaskCreated(task_id=task_id), 201)


@routes.post("/v1/bootstrap", name="doBootstrap")
@operation("Bootstrap one device or a list", body=DoBootstrapRequest,
           answers={201: (TaskCreated, BootstrapJobCreated)}, errors=(400, 404, 409), tag=TAG)
async def do_bootstrap(request: web.Request) -> web.Response:
    """A fresh DM account for the device, delivered as a bootstrap message (package #0).
    ``target``: one device → ``{taskId}``; ``targets``: a list → a job with a task per
    device, ``{jobId, taskIds}``."""
    req = await decode_body(request, DoBootstrapRequest)
    if (req.target is None) == (req.targets is None) or req.targets == []:
        raise ApiError("give target (one device) or targets (a non-empty list)",
                       code="invalid", where="$.targets" if req.targets == [] else "$.target")
    if req.targets is not None:
        from .jobs import bulk_bootstrap
        return await bulk_bootstrap(request, req.targets, security=req.security, pin=req.pin,
                                    server_id=req.server_id, name=req.name or "",
                                    owner=req.owner)
    t = req.target
    assert t is not None
    task_id = await broker_of(request).do_bootstrap(
        msisdn=t.msisdn, imei=t.imei, dev_id=t.dev_id, server_id=req.server_id,
        security=req.security, pin=req.pin)
    return json_response(TaskCreated(task_id=task_id), 201)


@routes.get("/v1/tasks/{taskId}", name="getTaskById")
@operation("A task (TaskData)", answers={200: TaskDataView}, errors=(404,), tag=TAG)
async def get_task_by_id(request: web.Request) -> web.Response:
    """The task: ``status`` (PENDING, NOTIFIED, IN_PROGRESS, WAITING_USER, SUCCEEDED,
    FAILED, CANCELLED, EXPIRED), device, operation, options, timestamps, attempts and the
    result (DM statuses, FUMO result code, node values)."""
    task = await broker_of(request).get_task(request.match_info["taskId"])
    hit = _ANSWERS.get(task.task_id)
    if hit is not None and (hit[0] is task or hit[0] == task):
        body = hit[1]
    else:
        body = _json.encode(task_data(redact_task(task)))
        _ANSWERS[task.task_id] = (task, body)        # (the oldest entry goes when full)
    return web.Response(body=body, content_type="application/json")


#: getTaskById's last answer per task: the record it was made of and its bytes.  A task is
#: polled again and again (an OSS waiting for its status) and mostly has not changed: the
#: record read is compared whole with the one kept (msgspec compares every field, nested ones
#: too, in C), so an answer is reused only for the very same content, whatever store or
#: engine it came from; building and encoding the TaskData view was a third of the route's
#: own work.  Bounded: past ANSWER_CACHE_SIZE tasks the oldest entry goes.
ANSWER_CACHE_SIZE = 4096
_ANSWERS: BoundedDict[str, tuple[Task, bytes]] = BoundedDict(ANSWER_CACHE_SIZE)
_json = msgspec.json.Encoder()


@routes.get("/v1/tasks/{taskId}/history", name="getTaskHistory")
@operation("A task's state changes", query=PageQuery, answers={200: HistoryPage},
           errors=(400, 404), tag=TAG)
async def get_task_history(request: web.Request) -> web.Response:
    """Every state change of the task, oldest first (time, from, to, cause, DM status,
    result code), ``{items, nextCursor}``."""
    q = parse_query(request, PageQuery)
    page = await broker_of(request).task_history_page(request.match_info["taskId"],
                                                     cursor=q.cursor, limit=q.limit)
    return json_response(HistoryPage(items=[to_view(h) for h in page.items],
                                     next_cursor=page.next_cursor))


@routes.post("/v1/tasks/{taskId}/cancel", name="cancelTask")
@operation("Cancel a task", answers={200: TaskCancelled}, errors=(404, 409), tag=TAG)
async def cancel_task(request: web.Request) -> web.Response:
    """A task not final is cancelled (a session working on it stops there); a final one is
    a 409."""
    task = await broker_of(request).cancel_task(request.match_info["taskId"])
    return json_response(TaskCancelled(task_id=task.task_id, status=task.state))
