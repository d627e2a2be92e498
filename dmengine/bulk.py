"""Jobs (L4): IBulkOperationsManagerServices — campaigns over many devices.

A job is an operation, a selection of devices and a schedule.  Creating one writes the job and
its *targets* (one compact row per device, in selection order: ``store.add_job_targets``) and
nothing else: a million-device job never holds a million Python objects, and its tasks are
made by the scheduler in batches as pacing lets them start (``store.create_job_tasks``, which
moves the job's counters in the same write).  So a job's counts of tasks per state are read
in O(1) from the job record, and ``targets - total`` is what has not started yet.

Job life (DESIGN.md §4): SCHEDULED → RUNNING ⇄ PAUSED → COMPLETED | CANCELLED | FAILED.
``pause`` stops new notifications (sessions under way finish); ``restart`` resumes (and is the
approval a staged rollout waits for); ``cancel`` cancels every task not final — a task whose
session is under way stops there (its late outcome is dropped) — and keeps the finished ones.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import msgspec

from . import logs
from .config import BrokerConfig
from .errors import InvalidRequest, NotFound, ServiceError, UnknownResource
from .model import (FINAL_TASK_STATES, ID_PATTERN, BootstrapOp, Job, JobState, Selection, Stage, StopRule,
                    Task, TaskState, TimeWindow, UpdateOp, new_id)
from .store.base import DeviceQuery, Page, Store, all_pages
from .tasks import Tasks

J = JobState
log = logging.getLogger("dmengine.bulk")
S = TaskState

_ID = re.compile(ID_PATTERN)
#: dev_ids written per store write while a job's selection is resolved
TARGET_CHUNK = 10_000
#: a job record keeps the device list of its selection up to this many (else only targets do)
RECORD_DEV_IDS = 100
#: tasks in flight: made, not final (a pause lets them finish)
IN_FLIGHT = (S.PENDING, S.NOTIFIED, S.IN_PROGRESS, S.WAITING_USER)
OPEN_JOB_STATES = (J.SCHEDULED, J.RUNNING, J.PAUSED)


class JobView(msgspec.Struct, kw_only=True):
    """A job as the API shows it: the record, and what is derived from it in O(1)."""

    job: Job
    started: int                 # tasks made so far
    final: int                   # of them, final
    succeeded: int
    failed: int                  # FAILED + EXPIRED
    progress: float              # final / targets
    rate: float | None           # tasks finished per second since the job started
    eta_s: float | None          # seconds to the last target at that rate


def final_count(job: Job) -> int:
    return sum(n for s, n in job.counts.items() if s in FINAL_TASK_STATES) + \
        sum(n for s, n in job.test_counts.items() if s in FINAL_TASK_STATES)


def in_flight(job: Job) -> int:
    return job.total - final_count(job)


def view(job: Job, now: float) -> JobView:
    final = final_count(job)
    ok = job.counts.get(S.SUCCEEDED, 0) + job.test_counts.get(S.SUCCEEDED, 0)
    bad = sum(c.get(s, 0) for c in (job.counts, job.test_counts)
              for s in (S.FAILED, S.EXPIRED))
    rate = eta = None
    # an ended job's rate is over its run, not until now (else it fell with every read)
    end = min(now, job.finished) if job.finished is not None else now
    if job.started is not None and end > job.started and final:
        rate = final / (end - job.started)
        eta = (job.targets - final) / rate if job.state in (J.RUNNING, J.SCHEDULED) else None
    return JobView(job=job, started=job.total, final=final, succeeded=ok, failed=bad,
                   progress=final / job.targets if job.targets else 1.0, rate=rate, eta_s=eta)


def stage_boundary(job: Job) -> int:
    """How many targets the current stage lets the job start."""
    if not job.stages or job.stage >= len(job.stages):
        return job.targets
    return min(job.targets, math.ceil(job.targets * job.stages[job.stage].percent / 100.0))


@dataclass
class Jobs:
    store: Store
    tasks: Tasks
    config: BrokerConfig
    clock: Callable[[], float] = time.time
    carrier_callback_configured: bool = False     #: set by the broker (policy 40)

    async def create(self, op: Any, selection: Selection, *, name: str = "", owner: str = "",
                     b_optin: bool = False, accept_device_policy: int = 10,
                     test_cycle: bool = False, rate_limit: float | None = None,
                     concurrency: int | None = None, windows: Sequence[TimeWindow] = (),
                     tz: str | None = None, stop_rule: StopRule | None = None,
                     stages: Sequence[Stage] = (), priority: int = 0,
                     start_at: float | None = None, end_at: float | None = None) -> Job:
        """createDeployments: the job and its targets; RUNNING at once unless ``start_at`` is
        later (the scheduler starts it then)."""
        if isinstance(op, BootstrapOp):
            raise InvalidRequest("bootstrap jobs are made by doBootstrap", where="operation")
        if accept_device_policy == 40 and not self.carrier_callback_configured:
            raise InvalidRequest("acceptDevicePolicy 40 asks the carrier, and no carrier "
                                 "callback is configured", where="acceptDevicePolicy")
        _check_schedule(stages, windows, tz, start_at, end_at)
        if isinstance(op, UpdateOp) and op.content_id is not None:
            try:
                await self.store.get_content(op.content_id)
            except NotFound:
                raise UnknownResource(f"no content {op.content_id!r}",
                                      where="operation.content_id") from None
        now = self.clock()
        running = start_at is None or start_at <= now
        job = Job(job_id=new_id("j"), name=name, owner=owner, op=op, b_optin=b_optin,
                  accept_device_policy=accept_device_policy,  # type: ignore[arg-type]
                  test_cycle=test_cycle, rate_limit=rate_limit, concurrency=concurrency,
                  windows=list(windows), tz=tz, stop_rule=stop_rule, stages=list(stages),
                  priority=priority, start_at=start_at, end_at=end_at,
                  # a long device list stays in the job's targets, not in its record (which
                  # every counter move of the job rewrites)
                  selection=selection if len(selection.dev_ids) <= RECORD_DEV_IDS
                  else msgspec.structs.replace(selection, dev_ids=[]),
                  state=J.SCHEDULED)
        _check_selection(selection)          # before anything is written
        job = await self.store.create_job(job)
        n = await self._select(job, selection)
        if n == 0:
            return await self.store.update_job(job.job_id, {
                "state": J.COMPLETED, "finished": now, "cause": "no device matched the selection"})
        if running:
            job = await self.store.update_job(job.job_id, {"state": J.RUNNING, "started": now})
        else:
            job = await self.store.get_job(job.job_id)
        log.info("job created: %d devices, %s", n, job.state.value, extra=logs.ids(job=job.job_id))
        return job

    async def _select(self, job: Job, selection: Selection) -> int:
        """Writes the job's targets, TARGET_CHUNK at a time (never all in memory)."""
        total = 0
        if selection.dev_ids:
            seen: set[str] = set()
            ids = [d for d in selection.dev_ids if not (d in seen or seen.add(d))]  # type: ignore[func-returns-value]
            for i in range(0, len(ids), TARGET_CHUNK):
                total = await self.store.add_job_targets(job.job_id, ids[i:i + TARGET_CHUNK])
            return total
        query = DeviceQuery(capability=selection.capability, tac=selection.tac,
                            model=selection.model, firmware=selection.firmware)
        cursor: str | None = None
        while True:
            # dev_ids only: a capability or TAC selection reads its index, not the records
            page: Page[str] = await self.store.query_device_ids(query, cursor=cursor,
                                                                limit=TARGET_CHUNK,
                                                                scan_limit=10 * TARGET_CHUNK)
            if page.items:
                total = await self.store.add_job_targets(job.job_id, page.items)
            cursor = page.next_cursor
            if cursor is None:
                return total

    async def get(self, job_id: str) -> Job:
        try:
            return await self.store.get_job(job_id)
        except NotFound:
            raise UnknownResource(f"no job {job_id!r}", where="jobId") from None

    async def view(self, job_id: str) -> JobView:
        return view(await self.get(job_id), self.clock())

    async def pause(self, job_id: str, cause: str = "paused by the caller") -> Job:
        job = await self.get(job_id)
        if job.state not in (J.SCHEDULED, J.RUNNING):
            raise ServiceError(f"job {job_id} is {job.state.value}: only a scheduled or running "
                               "job can be paused", where="jobId")
        return await self.store.update_job(job_id, {"state": J.PAUSED, "cause": cause},
                                           expect_state=job.state)

    async def restart(self, job_id: str) -> Job:
        """Resumes a paused job; at the end of a stage that waited (for approval, or because
        its success threshold was missed) it is the approval: the next stage begins."""
        job = await self.get(job_id)
        if job.state != J.PAUSED:
            raise ServiceError(f"job {job_id} is {job.state.value}, not PAUSED", where="jobId")
        v = view(job, self.clock())
        # the stop rule starts counting afresh: the caller has seen the failures so far
        changes: dict[str, Any] = {"state": J.RUNNING, "cause": "restarted by the caller",
                                   "base_final": v.final, "base_failed": v.failed}
        if job.started is None:
            changes["started"] = self.clock()
        if job.stages and job.stage < len(job.stages) - 1 and job.total >= stage_boundary(job) \
                and in_flight(job) == 0:
            changes["stage"] = job.stage + 1
        return await self.store.update_job(job_id, changes, expect_state=J.PAUSED)

    async def cancel(self, job_id: str, cause: str = "job cancelled by the caller") -> Job:
        job = await self.get(job_id)
        if job.state not in OPEN_JOB_STATES:
            raise ServiceError(f"job {job_id} is {job.state.value} already", where="jobId")
        # the job first: no task of it starts from now on
        job = await self.store.update_job(job_id, {"state": J.CANCELLED, "cause": cause,
                                                   "finished": self.clock()},
                                          expect_state=job.state)
        for state in IN_FLIGHT:
            while True:
                page = await self.store.tasks_by_job(job_id, state=state, limit=500)
                if not page.items:
                    break
                for task in page.items:
                    await self.tasks.finish(task, S.CANCELLED, cause)
        return await self.store.get_job(job_id)

    async def list(self, *, state: JobState | None = None, owner: str | None = None,
                   cursor: str | None = None, limit: int = 100) -> Page[Job]:
        return await _owned(lambda c, n: self.store.list_jobs(state=state, cursor=c, limit=n),
                            owner, cursor, limit)

    async def by_date(self, start: float, end: float, *, cursor: str | None = None,
                      limit: int = 100, owner: str | None = None) -> Page[Job]:
        return await _owned(lambda c, n: self.store.jobs_by_date(start, end, cursor=c, limit=n),
                            owner, cursor, limit)

    async def tasks_of(self, job_id: str, *, state: TaskState | None = None,
                       cursor: str | None = None, limit: int = 100) -> Page[Task]:
        await self.get(job_id)
        return await self.store.tasks_by_job(job_id, state=state, cursor=cursor, limit=limit)

    def task_for(self, job: Job, dev_id: str, now: float) -> Task:
        """The task a job makes for one of its targets."""
        return job_task(job, dev_id, now, self.config.task_ttl)


def job_task(job: Job, dev_id: str, now: float, task_ttl: float) -> Task:
    """The task ``job`` makes for its target ``dev_id`` (deadline: the job's, else its end,
    else ``task_ttl`` from now)."""
    task_id = new_id("t")
    deadline = job.deadline or job.end_at or now + task_ttl
    return Task(task_id=task_id, dev_id=dev_id, op=job.op, job_id=job.job_id,  # type: ignore[arg-type]
                b_optin=job.b_optin, accept_device_policy=job.accept_device_policy,
                test_cycle=job.test_cycle, state=S.PENDING, deadline=deadline,
                correlator=task_id, owner=job.owner)


def window_wait(windows: list[TimeWindow], tz: str | None, now: float) -> float:
    """0 when ``now`` is inside one of the daily ``windows`` (seconds since local midnight in
    ``tz``, UTC when None; a window whose end is before its start runs over midnight), else the
    seconds until the next one opens (inf when none ever does)."""
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo
    zone = ZoneInfo(tz or "UTC")
    local = datetime.fromtimestamp(now, zone)
    sec = local.hour * 3600 + local.minute * 60 + local.second
    day = local.weekday()
    for w in windows:
        if w.start < w.end:
            if day in w.days and w.start <= sec < w.end:
                return 0.0
        else:                          # over midnight: the evening of a listed day …
            if (day in w.days and sec >= w.start) or ((day - 1) % 7 in w.days and sec < w.end):
                return 0.0             # … or the morning after it
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    best = float("inf")
    for d in range(8):
        date = (midnight + timedelta(days=d)).replace(tzinfo=None)
        for w in windows:
            if (day + d) % 7 not in w.days:
                continue
            opens = (date + timedelta(seconds=w.start)).replace(tzinfo=zone).timestamp()
            if opens > now:
                best = min(best, opens - now)
    return best


def early_start_allowed(job: Job, tz: str | None, now: float) -> bool:
    """Whether a device of the job that connected on its own may start its pending target
    now: the job runs, its stage has room, and its window (in the device's zone ``tz``, else
    the job's) is open.  No notification is spent on it, so the rate limit does not apply."""
    if job.state != JobState.RUNNING or job.op is None or job.total >= stage_boundary(job):
        return False
    return not job.windows or window_wait(job.windows, tz or job.tz, now) == 0


async def _owned(fetch: Callable[[str | None, int], Awaitable[Page[Job]]], owner: str | None,
                 cursor: str | None, limit: int) -> Page[Job]:
    """A page of jobs, only ``owner``'s when given (no owner index: pages of the listing are
    read and filtered; never more than a page at a time, so the cursor stays exact)."""
    if owner is None:
        return await fetch(cursor, limit)
    out: list[Job] = []
    while len(out) < limit:
        page = await fetch(cursor, limit - len(out))
        out.extend(j for j in page.items if j.owner == owner)
        cursor = page.next_cursor
        if cursor is None:
            break
    return Page(out, cursor)


def _check_selection(selection: Selection) -> None:
    query = selection.capability or selection.tac or selection.model or selection.firmware
    if selection.dev_ids and query:
        raise InvalidRequest("name devices or give a query, not both", where="selection")
    if not selection.dev_ids and not query:
        raise InvalidRequest("a job needs devices: dev_ids or a query (capability, tac, "
                             "model, firmware)", where="selection")
    for i, d in enumerate(selection.dev_ids):
        if not isinstance(d, str) or not 0 < len(d) <= 128 or not _ID.match(d):
            raise InvalidRequest(f"not a device id: {d!r}", where=f"selection.dev_ids[{i}]")


def _check_schedule(stages: Sequence[Stage], windows: Sequence[TimeWindow], tz: str | None,
                    start_at: float | None, end_at: float | None) -> None:
    last = 0.0
    for i, st in enumerate(stages):
        if st.percent <= last:
            raise InvalidRequest("stages must grow: each percent above the one before",
                                 where=f"stages[{i}].percent")
        last = st.percent
    if stages and stages[-1].percent != 100:
        raise InvalidRequest("the last stage must be 100 percent", where=f"stages[{len(stages) - 1}]")
    for i, w in enumerate(windows):
        if w.start == w.end:
            raise InvalidRequest("an empty window", where=f"windows[{i}]")
    if tz is not None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidRequest(f"unknown time zone {tz!r}", where="tz") from None
    if start_at is not None and end_at is not None and end_at <= start_at:
        raise InvalidRequest("end_at must be after start_at", where="end_at")


#: job states a job never leaves (its task counts no longer change)
FINAL_JOB_STATES = (J.COMPLETED, J.CANCELLED, J.FAILED)


class JobTally:
    """Jobs and their tasks per state, for the metrics (``dmengine_jobs``, ``dmengine_tasks``,
    the progress of RUNNING jobs), from the jobs' own counters (the store keeps a job's task
    counts per state in its record: no task is read).

    A refresh reads the open jobs (SCHEDULED, RUNNING, PAUSED: through the store's job-state
    index) and the jobs created since the last refresh; a job that left the open states is
    read again until it is *settled* (final, no task in flight: a cancelled job's tasks are
    cancelled after the job), then its counts join the tally of settled jobs, which never
    changes again.  So a refresh costs O(open jobs + new jobs), never O(jobs ever made) nor
    O(tasks); only the first one lists every final job once.  Single-operation tasks (no job) are not counted:
    the store has no global per-state counters."""

    #: seconds of overlap when listing new jobs by creation time (a job's ``created`` stamp is
    #: taken in the write, a moment before it can be read)
    SLACK = 300.0

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._open: dict[str, Job] = {}        # open or not yet settled: read every time
        self._final_jobs: dict[str, int] = {}
        self._final_tasks: dict[str, int] = {}
        self._counted: dict[str, float] = {}   # final jobs counted lately -> their created
        self._mark: float | None = None        # when the last refresh began

    @staticmethod
    def settled(job: Job) -> bool:
        return job.state in FINAL_JOB_STATES and in_flight(job) == 0

    def _add_final(self, job: Job, now: float) -> None:
        if job.job_id in self._counted:
            return
        self._final_jobs[job.state.value] = self._final_jobs.get(job.state.value, 0) + 1
        for counts in (job.counts, job.test_counts):
            for state, n in counts.items():
                key = TaskState(state).value
                self._final_tasks[key] = self._final_tasks.get(key, 0) + n
        if job.created >= now - 2 * self.SLACK:
            self._counted[job.job_id] = job.created

    async def refresh(self) -> tuple[dict[str, int], dict[str, int],
                                     list[tuple[str, float, float | None]]]:
        """(tasks per state, jobs per state, RUNNING jobs as (job id, progress, ETA seconds),
        highest priority first, then oldest)."""
        now = self.clock()
        if self._mark is None:
            for state in FINAL_JOB_STATES:
                for job in await all_pages(
                        lambda c, s=state: self.store.list_jobs(state=s, cursor=c, limit=1000)):
                    if self.settled(job):
                        self._add_final(job, now)
                    else:
                        self._open[job.job_id] = job
            self._mark = now
        opened: dict[str, Job] = {}
        for state in OPEN_JOB_STATES:
            for job in await all_pages(
                    lambda c, s=state: self.store.list_jobs(state=s, cursor=c, limit=1000)):
                opened[job.job_id] = job
        for job_id in self._open.keys() - opened.keys():
            try:
                job = await self.store.get_job(job_id)
            except NotFound:
                continue
            if self.settled(job):
                self._add_final(job, now)
            else:                  # its last tasks are still moving (or it moved meanwhile)
                opened[job_id] = job
        lo = self._mark - self.SLACK
        for job in await all_pages(
                lambda c: self.store.jobs_by_date(lo, now + 1.0, cursor=c, limit=1000)):
            if job.job_id in opened or job.job_id in self._open \
                    or job.state not in FINAL_JOB_STATES:
                continue
            if self.settled(job):
                self._add_final(job, now)
            else:
                opened[job.job_id] = job
        self._counted = {k: t for k, t in self._counted.items() if t >= lo - self.SLACK}
        self._mark = now
        self._open = opened
        jobs = dict(self._final_jobs)
        tasks = dict(self._final_tasks)
        for job in opened.values():
            jobs[job.state.value] = jobs.get(job.state.value, 0) + 1
            for counts in (job.counts, job.test_counts):
                for state, n in counts.items():
                    key = TaskState(state).value
                    tasks[key] = tasks.get(key, 0) + n
        running = sorted((j for j in opened.values() if j.state == J.RUNNING),
                         key=lambda j: (-j.priority, j.started or j.created, j.job_id))
        out = []
        for job in running:
            v = view(job, now)
            out.append((job.job_id, v.progress, v.eta_s))
        return tasks, jobs, out


__all__ = ["Jobs", "JobView", "JobTally", "view", "stage_boundary", "final_count", "in_flight",
           "TARGET_CHUNK", "FINAL_JOB_STATES", "window_wait", "early_start_allowed", "job_task"]
