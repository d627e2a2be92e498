"""IBulkOperationsManagerServices routes of the API (L5): jobs (campaigns over many devices).

``createDeployments`` (POST /v1/jobs: an operation, a device selection and a schedule),
``doBulkOperation`` (POST /v1/operations/bulk: the same for a list of targets named by
MSISDN, IMEI or DevId), the list form of ``doBootstrap`` (POST /v1/bootstrap with
``targets``: :func:`bulk_bootstrap`, called by :mod:`dmengine.wsi.app`'s handler),
``getJob``, ``getJobs``, ``getJobsByDate``, ``pauseJob``, ``restartJob``, ``cancelJob`` and
``getTasks``.  The work is done by :class:`dmengine.bulk.Jobs` (``engine.broker.jobs``); these
handlers translate HTTP and JSON.

Bodies and answers are camelCase (``bOptin``, ``stopRule.maxFailureRatio``); an operation keeps
the shape ``doOperation`` takes (``{"operation": "UPDATE", "contentId": …}``).  Listings answer
``{"items": [...], "nextCursor": str | null}``.  Errors keep the app's one shape and name the
field: a body that does not decode gives the msgspec path (``$.stages[0].percent``), a request
the job service refuses gives the field it names (``stages[1].percent``,
``operation.content_id``, ``targets[3].msisdn``).  A task in an answer goes through
:func:`dmengine.model.redact_task` and shows no operation detail; a job carries no secret.

Who asked: a job's ``owner`` is the caller's system (:mod:`dmengine.wsi.security`); an admin
may name another in the body's ``owner``.  Listings show a non-admin only its system's jobs;
a route about one job answers 404 for another system's (the security middleware checks it).
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec
from aiohttp import web
from msgspec import Meta

from .. import bootstrap
from ..broker import Broker
from ..bulk import Jobs, JobView, view
from ..devices import imei_of, parse_time
from ..errors import InvalidRequest, ServiceError, ValidationError
from ..model import (ID_PATTERN, Count, DevId, Device, Job, JobState, Name, OptId, Selection,
                     Stage, StopRule, Tac, Task, TaskState, TimeWindow, new_id, redact_task)
from ..store.base import DEFAULT_PAGE, MAX_PAGE, Page
from .common import ENGINE, broker_of, jobs_of
from .middleware import decode_body, json_response, optional_body
from .openapi import operation
from .schemas import (BootstrapJobCreated, JobCreated, JobOut, JobPage, OperationIn, PageQuery,
                      Target, TaskPage, camel_path, task_summary, to_model, to_view)
from .security import owner_for_new, owner_scope

routes = web.RouteTableDef()
TAG = "IBulkOperationsManagerServices"

#: the owner of a job when the body names none (one API key today: issue 15 brings identities)
DEFAULT_OWNER = "api"
#: per-target errors listed in a refusal of doBulkOperation / bulk doBootstrap
MAX_LISTED_ERRORS = 1000
#: the upper bound of getJobsByDate when ``to`` is not given (year 9999)
FAR_FUTURE = 253402300799.0

J = JobState


# --- request bodies -----------------------------------------------------------------------------


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    pass


class SelectionBody(_Body):
    """The devices of a job: ``devIds``, or a query (``capability``, ``tac``, ``model`` =
    ./DevInfo/Mod, ``firmware`` = ./DevDetail/FwV; every filter given must match)."""
    dev_ids: list[DevId] = []
    capability: OptId = None
    tac: Union[Tac, None] = None
    model: Union[Name, None] = None
    firmware: Union[Name, None] = None


class WindowBody(_Body):
    """A daily window, seconds since midnight in the device's time zone (else the job's
    ``tz``, else UTC), end exclusive, over midnight when ``end < start``; ``days`` 0 = Monday."""
    start: Annotated[int, Meta(ge=0, le=86400)]
    end: Annotated[int, Meta(ge=0, le=86400)]
    days: list[Annotated[int, Meta(ge=0, le=6)]] = msgspec.field(
        default_factory=lambda: list(range(7)))


class StopRuleBody(_Body):
    """Pause the job when ``failed / finished >= maxFailureRatio`` after ``minFinished``."""
    max_failure_ratio: Annotated[float, Meta(ge=0, le=1)] = 1.0
    min_finished: Count = 0


class StageBody(_Body):
    """A staged-rollout group: up to ``percent`` of the targets (counted from the start);
    the next group begins when these are final and at least ``successThreshold`` of them
    succeeded, or — with ``approval`` — on restartJob."""
    percent: Annotated[float, Meta(gt=0, le=100)]
    success_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.0
    approval: bool = False


class JobBody(_Body):
    """What createDeployments and doBulkOperation share: the operation and the schedule."""
    operation: OperationIn  # type: ignore[valid-type]
    name: Name = ""
    owner: Union[Name, None] = None
    b_optin: bool = False
    accept_device_policy: Literal[10, 20, 30, 40] = 10
    test_cycle: bool = False
    rate_limit: Union[Annotated[float, Meta(gt=0)], None] = None
    concurrency: Union[Annotated[int, Meta(ge=1)], None] = None
    windows: list[WindowBody] = []
    tz: Union[Annotated[str, Meta(max_length=64)], None] = None
    stop_rule: Union[StopRuleBody, None] = None
    stages: list[StageBody] = []
    priority: int = 0
    start_at: Union[Annotated[float, Meta(ge=0)], None] = None
    end_at: Union[Annotated[float, Meta(ge=0)], None] = None


class CreateDeploymentsRequest(JobBody, kw_only=True):
    selection: SelectionBody


class BulkOperationRequest(JobBody, kw_only=True):
    targets: Annotated[list[Target], Meta(min_length=1)]


class ControlRequest(_Body):
    """The optional body of pauseJob / cancelJob: why (kept as the job's cause)."""
    cause: Union[Annotated[str, Meta(max_length=512)], None] = None


# --- JSON of answers ------------------------------------------------------------------------------


def job_json(v: JobView) -> Any:
    """A job as getJob shows it (:data:`dmengine.wsi.schemas.JobOut`): the record's fields
    (``op`` as ``operation``, in the shape doOperation takes) and what is derived from it:
    ``final``, ``succeeded``, ``failed`` (FAILED + EXPIRED), ``progress`` (final / targets),
    ``rate`` (tasks finished per second since the start) and ``etaSeconds``.  ``total`` is
    the tasks made so far."""
    job = v.job
    return to_view(job, JobOut, operation=None if job.op is None else to_view(job.op),
                   final=v.final, succeeded=v.succeeded, failed=v.failed,
                   progress=float(v.progress), rate=v.rate, eta_seconds=v.eta_s)


def task_json(task: Task) -> Any:
    """A task as getTasks lists it (getTaskById has the whole record)."""
    return task_summary(redact_task(task))


def job_page(page: Page[Job], now: float) -> web.Response:
    return json_response(JobPage(items=[job_json(view(j, now)) for j in page.items],
                                 next_cursor=page.next_cursor))


# --- helpers ------------------------------------------------------------------------------------


_broker = broker_of
_jobs = jobs_of


def _query(request: web.Request, known: set[str]) -> dict[str, str]:
    q = request.query
    for name in q:
        if name not in known:
            raise ValidationError(f"unknown query parameter {name!r} (known: "
                                  f"{', '.join(sorted(known))})", where=name)
    return {k: q[k] for k in q}


def _limit(q: dict[str, str]) -> int:
    try:
        limit = int(q.get("limit", DEFAULT_PAGE))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise ValidationError(f"limit is a number 1..{MAX_PAGE}", where="limit")
    return limit


def _enum(cls: Any, q: dict[str, str], name: str) -> Any:
    v = q.get(name)
    if v is None or v == "":
        return None
    try:
        return cls(v.upper())
    except ValueError:
        raise ValidationError(f"{name} is one of {', '.join(m.value for m in cls)}, not {v!r}",
                              where=name) from None


def _time(q: dict[str, str], name: str, default: float) -> float:
    v = q.get(name)
    if v is None or v == "":
        return default
    try:
        return parse_time(v)
    except ValueError:
        raise ValidationError(f"{name} is epoch seconds or an ISO-8601 time, not {v!r}",
                              where=name) from None


_ID_RE = re.compile(ID_PATTERN)


def _schedule(body: JobBody, owner: str) -> dict[str, Any]:
    """Jobs.create's keyword arguments from the body's schedule."""
    return dict(
        name=body.name, owner=owner,
        b_optin=body.b_optin, accept_device_policy=body.accept_device_policy,
        test_cycle=body.test_cycle, rate_limit=body.rate_limit, concurrency=body.concurrency,
        windows=[TimeWindow(start=w.start, end=w.end, days=list(w.days)) for w in body.windows],
        tz=body.tz,
        stop_rule=StopRule(max_failure_ratio=body.stop_rule.max_failure_ratio,
                           min_finished=body.stop_rule.min_finished)
        if body.stop_rule is not None else None,
        stages=[Stage(percent=s.percent, success_threshold=s.success_threshold,
                      approval=s.approval) for s in body.stages],
        priority=body.priority, start_at=body.start_at, end_at=body.end_at)


async def _create(request: web.Request, body: JobBody, selection: Selection) -> web.Response:
    # a refusal names the service's field: the error middleware puts it in the body's names
    # (``end_at`` → ``endAt``, ``operation.content_id`` → ``operation.contentId``)
    job = await _jobs(request).create(
        to_model(body.operation), selection,
        **_schedule(body, owner_for_new(request, body.owner, DEFAULT_OWNER)))
    return json_response(JobCreated(job_id=job.job_id, state=job.state, targets=job.targets),
                         201)


async def resolve_targets(broker: Broker, targets: list[Target]
                          ) -> tuple[list[Device], web.Response | None]:
    """Each target's device, in order; or an answer listing every target that names no
    device (or names it wrongly), each with its index: ``where: targets[3].msisdn``."""
    devices: list[Device] = []
    errors: list[dict[str, Any]] = []
    statuses: set[int] = set()
    for i, t in enumerate(targets):
        try:
            devices.append(await broker.resolve_target(msisdn=t.msisdn, imei=t.imei,
                                                        dev_id=t.dev_id))
        except (ServiceError, ValidationError) as exc:
            where = exc.where or "target"
            if where.startswith("target"):
                where = f"targets[{i}]" + where[len("target"):]
            else:
                where = f"targets[{i}]"
            where = camel_path(where) or where
            if isinstance(exc, ServiceError):
                code, status = exc.code, exc.http_status
            else:
                code, status = "invalid", 400
            statuses.add(status)
            errors.append({"error": code, "message": str(exc), "where": where})
    if not errors:
        return devices, None
    first = errors[0]
    status = statuses.pop() if len(statuses) == 1 else 400
    more = f" (and {len(errors) - 1} more: see errors)" if len(errors) > 1 else ""
    return devices, json_response({
        "error": first["error"], "message": f"{len(errors)} of {len(targets)} targets cannot "
                                            f"be used; {first['message']}{more}",
        "where": first["where"], "errors": errors[:MAX_LISTED_ERRORS]}, status)


# --- routes -------------------------------------------------------------------------------------


@routes.post("/v1/jobs", name="createDeployments")
@operation("Create a job from a device selection", body=CreateDeploymentsRequest,
           answers={201: JobCreated}, errors=(400, 404, 409), tag=TAG)
async def create_deployments(request: web.Request) -> web.Response:
    """A job over a selection (``devIds`` or a device query) → 201 ``{jobId, state, targets}``;
    RUNNING at once unless ``startAt`` is later, COMPLETED when nothing matched."""
    body: CreateDeploymentsRequest = await decode_body(request, CreateDeploymentsRequest)
    sel = body.selection
    # checked here too (Jobs.create checks it once the job record exists): a refused
    # selection leaves no job behind
    query = sel.capability or sel.tac or sel.model or sel.firmware
    if sel.dev_ids and query:
        raise InvalidRequest("name devices or give a query, not both", where="selection")
    if not sel.dev_ids and not query:
        raise InvalidRequest("a job needs devices: devIds or a query (capability, tac, model, "
                             "firmware)", where="selection")
    for i, d in enumerate(sel.dev_ids):
        if _ID_RE.match(d) is None:
            raise ValidationError(f"not a DevId: {d!r}", where=f"selection.devIds[{i}]")
    if sel.capability is not None and _ID_RE.match(sel.capability) is None:
        raise ValidationError(f"not a capability oid: {sel.capability!r}",
                              where="selection.capability")
    return await _create(request, body, Selection(
        dev_ids=list(sel.dev_ids), capability=sel.capability, tac=sel.tac, model=sel.model,
        firmware=sel.firmware))


@routes.post("/v1/operations/bulk", name="doBulkOperation")
@operation("Run an operation on a list of devices (a job)", body=BulkOperationRequest,
           answers={201: JobCreated}, errors=(400, 404, 409), tag=TAG)
async def do_bulk_operation(request: web.Request) -> web.Response:
    """doOperation for a list of targets (``{msisdn|imei|devId}`` each) → a job over those
    devices, 201 ``{jobId, state, targets}``.  Nothing is made when a target names no device:
    the answer lists each such target (``errors``, ``where: targets[i].msisdn``)."""
    body: BulkOperationRequest = await decode_body(request, BulkOperationRequest)
    devices, refusal = await resolve_targets(_broker(request), body.targets)
    if refusal is not None:
        return refusal
    # a device named twice (by MSISDN and by IMEI, say) is one target
    return await _create(request, body, Selection(
        dev_ids=list(dict.fromkeys(d.dev_id for d in devices))))


async def bulk_bootstrap(request: web.Request, targets: list[Target], *, security: str,
                         pin: str | None, server_id: str | None, name: str = "",
                         owner: str | None = None) -> web.Response:
    """doBootstrap for a list of targets: a job (no operation of its own: its tasks are the
    bootstraps) with one task per device, each delivered at once → 201 ``{jobId, taskIds}``
    (``taskIds[i]`` for ``targets[i]``; a device named twice gets one task).  The job
    completes when every task is final."""
    if security not in bootstrap.SECURITY_METHODS:
        raise InvalidRequest(f"unknown security {security!r}", where="security")
    if security in ("USERPIN", "USERPIN_NETWORKID") and not pin:
        raise InvalidRequest(f"{security} security needs the PIN", where="pin")
    owner = owner_for_new(request, owner, DEFAULT_OWNER)
    broker = _broker(request)
    devices, refusal = await resolve_targets(broker, targets)
    if refusal is not None:
        return refusal
    if security in ("NETWORKID", "USERPIN_NETWORKID"):
        for i, d in enumerate(devices):
            if not (d.imei or imei_of(d.dev_id)):
                raise InvalidRequest(f"device {d.dev_id!r} has no IMEI, the {security} key",
                                     where=f"targets[{i}]")
    distinct = list(dict.fromkeys(d.dev_id for d in devices))
    store = request.app[ENGINE].store
    assert store is not None
    now = broker.jobs.clock()
    # ``targets`` is the number of tasks to come: the job completes once that many are final
    job = await store.create_job(Job(
        job_id=new_id("j"), state=J.RUNNING, name=name,
        owner=owner, op=None,
        selection=Selection(dev_ids=distinct), targets=len(distinct), started=now))
    task_of: dict[str, str] = {}
    for i, dev_id in enumerate(distinct):
        try:
            task_of[dev_id] = await broker.do_bootstrap(dev_id=dev_id, server_id=server_id,
                                                        security=security, pin=pin,
                                                        job_id=job.job_id, owner=owner)
        except Exception as exc:
            # the job keeps the tasks made so far and completes with them
            await store.update_job(job.job_id, {"targets": i, "cause": f"stopped at device "
                                                f"{dev_id}: {exc}"[:1000]})
            if isinstance(exc, (ServiceError, ValidationError)):
                idx = next(k for k, d in enumerate(devices) if d.dev_id == dev_id)
                exc.where = f"targets[{idx}]"
            raise
    return json_response(BootstrapJobCreated(
        job_id=job.job_id, task_ids=[task_of[d.dev_id] for d in devices]), 201)


class JobsQuery(PageQuery, kw_only=True):
    """``state`` (any case), ``owner``: only those jobs."""
    state: Union[JobState, None] = None
    owner: Union[Name, None] = None


class JobsByDateQuery(PageQuery, kw_only=True, rename={"start": "from", "end": "to"}):
    """Jobs created in ``[from, to)``: epoch seconds or ISO 8601 (default: all)."""
    start: Union[Annotated[str, Meta(max_length=64)], None] = None
    end: Union[Annotated[str, Meta(max_length=64)], None] = None


class TasksQuery(PageQuery, kw_only=True):
    """``state`` (any case): only the tasks in it."""
    state: Union[TaskState, None] = None


@routes.get("/v1/jobs", name="getJobs")
@operation("The jobs", query=JobsQuery, answers={200: JobPage}, errors=(400,), tag=TAG)
async def get_jobs(request: web.Request) -> web.Response:
    """``?state=&owner=&cursor=&limit=`` → ``{items: [job], nextCursor}``."""
    q = _query(request, {"state", "owner", "cursor", "limit"})
    jobs = _jobs(request)
    owner = q.get("owner") or None
    mine = owner_scope(request)          # a non-admin lists its system's jobs only
    if mine is not None and owner not in (None, mine):
        return job_page(Page([], None), 0.0)
    page = await jobs.list(state=_enum(JobState, q, "state"), owner=mine or owner,
                           cursor=q.get("cursor") or None, limit=_limit(q))
    return job_page(page, jobs.clock())


@routes.get("/v1/jobs/by-date", name="getJobsByDate")
@operation("The jobs created in a time range", query=JobsByDateQuery, answers={200: JobPage},
           errors=(400,), tag=TAG)
async def get_jobs_by_date(request: web.Request) -> web.Response:
    """Jobs created in ``[from, to)`` (epoch seconds or ISO 8601; default: all), oldest
    first: ``?from=&to=&cursor=&limit=`` → ``{items, nextCursor}``."""
    q = _query(request, {"from", "to", "cursor", "limit"})
    start = _time(q, "from", 0.0)
    end = _time(q, "to", FAR_FUTURE)
    if not 0 <= start <= FAR_FUTURE:
        raise ValidationError("from is out of range", where="from")
    if not start < end <= FAR_FUTURE:
        raise ValidationError("to must be after from (and before the year 10000)", where="to")
    jobs = _jobs(request)
    page = await jobs.by_date(start, end, cursor=q.get("cursor") or None, limit=_limit(q),
                              owner=owner_scope(request))
    return job_page(page, jobs.clock())


@routes.get("/v1/jobs/{jobId}", name="getJob")
@operation("A job: counts, progress, rate, ETA", answers={200: JobOut}, errors=(404,),
           tag=TAG)
async def get_job(request: web.Request) -> web.Response:
    """The job, its counts per task state, progress, rate and ETA (read in O(1))."""
    return json_response(job_json(await _jobs(request).view(request.match_info["jobId"])))


async def _cause(request: web.Request) -> str | None:
    body = await optional_body(request, ControlRequest)
    return None if body is None else body.cause


async def _after(request: web.Request, jobs: Jobs, job: Job) -> web.Response:
    return json_response(job_json(view(job, jobs.clock())))


@routes.post("/v1/jobs/{jobId}/pause", name="pauseJob")
@operation("Pause a job", body=ControlRequest, body_required=False, answers={200: JobOut},
           errors=(400, 404, 409), tag=TAG)
async def pause_job(request: web.Request) -> web.Response:
    """No new notifications; sessions under way finish.  Body (optional): ``{cause}``."""
    cause = await _cause(request)
    jobs = _jobs(request)
    job_id = request.match_info["jobId"]
    job = await (jobs.pause(job_id, cause) if cause else jobs.pause(job_id))
    return await _after(request, jobs, job)


@routes.post("/v1/jobs/{jobId}/restart", name="restartJob")
@operation("Resume a paused job", body=ControlRequest, body_required=False, answers={200: JobOut},
           errors=(400, 404, 409), tag=TAG)
async def restart_job(request: web.Request) -> web.Response:
    """Resumes a paused job where it stopped (and approves the next stage of a staged
    rollout that waits)."""
    await _cause(request)             # a body, if any, must still be well-formed
    jobs = _jobs(request)
    return await _after(request, jobs, await jobs.restart(request.match_info["jobId"]))


@routes.post("/v1/jobs/{jobId}/cancel", name="cancelJob")
@operation("Cancel a job", body=ControlRequest, body_required=False, answers={200: JobOut},
           errors=(400, 404, 409), tag=TAG)
async def cancel_job(request: web.Request) -> web.Response:
    """Tasks not final are cancelled (one in a session stops there), finished ones kept.
    Body (optional): ``{cause}``."""
    cause = await _cause(request)
    jobs = _jobs(request)
    job_id = request.match_info["jobId"]
    job = await (jobs.cancel(job_id, cause) if cause else jobs.cancel(job_id))
    return await _after(request, jobs, job)


@routes.get("/v1/jobs/{jobId}/tasks", name="getTasks")
@operation("A job's tasks", query=TasksQuery, answers={200: TaskPage}, errors=(400, 404),
           tag=TAG)
async def get_tasks(request: web.Request) -> web.Response:
    """The job's tasks in creation order: ``?state=&cursor=&limit=`` → ``{items, nextCursor}``."""
    q = _query(request, {"state", "cursor", "limit"})
    page = await _jobs(request).tasks_of(request.match_info["jobId"],
                                         state=_enum(TaskState, q, "state"),
                                         cursor=q.get("cursor") or None, limit=_limit(q))
    return json_response(TaskPage(items=[task_json(t) for t in page.items],
                                  next_cursor=page.next_cursor))


__all__ = ["routes", "bulk_bootstrap", "job_json", "task_json", "CreateDeploymentsRequest",
           "BulkOperationRequest", "DEFAULT_OWNER"]
