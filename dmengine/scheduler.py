"""The scheduler (L4): the clock of the services — notifications (package #0), retries, expiry.

One pass (:meth:`Scheduler.tick`) expires tasks past their deadline and re-notifies devices
that did not connect, with backoff; the loop (:meth:`Scheduler.run`) runs a pass every
``tick_interval`` seconds.  Errors are handled per task (that task fails with its cause, the
pass goes on), and the loop is supervised: a failed pass is logged, counted and retried, and
:meth:`Scheduler.health` tells ``/health`` when passes keep failing or the loop is gone.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Awaitable, Callable, Collection, Mapping, NamedTuple

import msgspec

from .bulk import IN_FLIGHT, Jobs, JobView, in_flight, stage_boundary, view, window_wait
from . import logs
from .config import BrokerConfig
from .errors import CodecError, Conflict, GatewayError, InvalidTransition, NotFound, StoreError
from .metrics import TaskMetrics
from .model import (FINAL_TASK_STATES, BootstrapOp, Device, DmAccount, Job, JobState, Task,
                    TaskState)
from .notify.base import Gateway
from .notify.pkg0 import build_pkg0
from .sessions import DeviceSessions, stored_nonce, waiting_alert
from .store.base import Store, Waypoint
from .supervised import Supervision
from .tasks import Tasks

log = logging.getLogger("dmengine.scheduler")

S = TaskState
J = JobState


class _Send(NamedTuple):
    """A notification ready to go: where, what, and the NOTIFIED move written before it."""
    msisdn: str
    pkg0: bytes
    resync_until: float | None      # the device's account is written first (nonce re-sync)
    move: Waypoint


_NONE_READY: Mapping[str, _Send] = {}


class Scheduler:
    def __init__(self, store: Store, tasks: Tasks, sessions: DeviceSessions, jobs: Jobs,
                 gateway: Gateway | None, config: BrokerConfig, *,
                 metrics: TaskMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tasks = tasks
        self.sessions = sessions
        self.jobs = jobs
        self.gateway = gateway
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.loop = Supervision("scheduler", clock, log)
        self._buckets: dict[str, tuple[float, float]] = {}   # job id ("" overall) -> tokens, time
        #: the clock when the running pass began: the tasks it notifies were due by then
        #: (dmengine_scheduler_lag_seconds counts from it)
        self._pass_start: float | None = None
        #: the running pass started a full ``job_batch`` of a job that had room for more:
        #: the loop runs the next pass at once instead of after ``tick_interval``
        self._full_batch = False

    # --- notification ----------------------------------------------------------------------

    async def notify(self, task: Task, job: Job | None = None, *,
                     due: float | None = None) -> Task:
        """Sends package #0 for ``task``'s device and moves the task to NOTIFIED (or keeps it
        PENDING with a later retry when the gateway failed for now).  A job task whose device
        is outside the job's window in the device's own time zone waits for the window."""
        if task.state == S.IN_PROGRESS:
            return await self.follow_up(task, job)
        now = self.clock()
        try:
            device: Device | None = await self.store.get_device(task.dev_id)
        except NotFound:
            device = None
        plan = self._plan(task, job, device, now)
        if not isinstance(plan, _Send):
            state, cause, changes = plan
            return await self.tasks.move(task.task_id, state, cause=cause, changes=changes)
        if plan.resync_until is not None:
            assert device is not None
            await self.store.update_device(device.dev_id,
                                           {"account": {"resync_until": plan.resync_until}})
        if task.attempts and self.metrics is not None:
            self.metrics.task_retried()
        # NOTIFIED is written before the send: a fast device may open its session (and move
        # the task to IN_PROGRESS) before the gateway call returns.
        state, cause, changes = plan.move
        task = await self.tasks.move(task.task_id, state, cause=cause, changes=changes)
        return await self._send(task, plan, now if due is None else due)

    def _plan(self, task: Task, job: Job | None, device: Device | None,
              now: float) -> _Send | Waypoint:
        """What notifying ``task`` (PENDING or NOTIFIED) takes now: the package #0 to send
        with the NOTIFIED move written before it, or — when it cannot go now — the move that
        says why (the device is gone, outside the job's window, nothing to wake it with, no
        package #0 can be built for it)."""
        if device is None:
            return S.FAILED, "no such device", {"finished": now, "next_attempt": None}
        acc = device.account
        delay = self.tasks.retry_delay(task.attempts)
        if job is not None and job.windows and device.tz:
            wait = window_wait(job.windows, device.tz, now)
            if wait > 0:
                return (S.PENDING, "outside the job's window in the device's time zone",
                        {"next_attempt": now + wait})
        if self.gateway is None or not device.msisdn or acc is None:
            # Nothing to wake it with: the task waits for the device's own session.
            why = ("no notification gateway" if self.gateway is None else
                   "device has no MSISDN" if not device.msisdn else "device has no DM account")
            return task.state, f"waiting: {why}", {"next_attempt": now + delay}
        if acc.client_name:
            self.sessions.by_username[acc.client_name] = device.dev_id
        session_id = self.new_session_id()
        resync = self.config.resync_after is not None and task.attempts >= self.config.resync_after
        resync_until = None
        if resync:
            # the device may have lost its nonces: sign with the well-known one and let its
            # package 1 use it too for a while (the session then hands out fresh nonces)
            resync_until = now + self.config.resync_window
        try:
            pkg0 = self._pkg0(acc, task, resync, session_id)
        except CodecError as exc:
            # the record cannot be notified at all (a server id too long for package #0, no
            # server credentials): this task fails with the cause, the others go on
            return (S.FAILED, f"package #0 not built: {exc}",
                    {"finished": now, "next_attempt": None})
        return _Send(device.msisdn, pkg0, resync_until, (
            S.NOTIFIED,
            f"package #0{' (nonce re-synchronisation)' if resync else ''} sent via "
            f"{self.gateway.name} (session {session_id:X})",
            {"next_attempt": now + delay, "attempts": task.attempts + 1}))

    async def _send(self, task: Task, plan: _Send, due: float) -> Task:
        """Hands ``plan``'s package #0 to the gateway (``task``: already NOTIFIED); a failed
        send moves the task back to PENDING (retryable) or fails it.  ``due``: when the
        notification was due (the start of the pass that took the task, or of the call)."""
        assert self.gateway is not None
        try:
            await self.gateway.send(plan.msisdn, plan.pkg0)
        except GatewayError as exc:
            if self.metrics is not None:
                self.metrics.notification("failed", self.gateway.name)
            current = await self.store.get_task(task.task_id)
            if current.state != S.NOTIFIED:
                return current                 # the device came anyway
            if exc.retryable:
                return await self.tasks.move(
                    task.task_id, S.PENDING, cause=f"notification failed, will retry: {exc}")
            return await self.tasks.move(
                task.task_id, S.FAILED, cause=f"notification refused: {exc}",
                changes={"finished": self.clock(), "next_attempt": None})
        if self.metrics is not None:
            self.metrics.notification("sent", self.gateway.name, lag=self.clock() - due)
        return task

    async def follow_up(self, task: Task, job: Job | None = None) -> Task:
        """A task whose Exec the device accepted (FUMO, or an Exec answered 202) and whose
        result alert (1226) has not come ``alert_wait`` seconds later: package #0 wakes the
        device so that it opens a session and reports.  The task stays IN_PROGRESS — a
        session skips a task waiting for its alert, so the package is neither pushed nor
        downloaded twice.  The waits double; after ``alert_followups`` wake-ups the task
        waits for its deadline without more (each step is in the task's history)."""
        now = self.clock()
        cfg = self.config
        k = task.followups + 1
        quiet = {"next_attempt": None}
        try:
            if task.followups >= cfg.alert_followups:
                return await self.tasks.move(
                    task.task_id, S.IN_PROGRESS, expect_state=S.IN_PROGRESS, changes=quiet,
                    cause=f"no result alert after {task.followups} wake-up(s): waiting for "
                          f"the device until the deadline")
            try:
                device = await self.store.get_device(task.dev_id)
            except NotFound:
                device = None
            acc = device.account if device is not None else None
            if self.gateway is None or device is None or not device.msisdn or acc is None:
                why = ("no notification gateway" if self.gateway is None else
                       "no such device" if device is None else
                       "device has no MSISDN" if not device.msisdn else "device has no DM account")
                return await self.tasks.move(
                    task.task_id, S.IN_PROGRESS, expect_state=S.IN_PROGRESS, changes=quiet,
                    cause=f"no result alert yet and no way to wake the device ({why}): "
                          f"waiting for it until the deadline")
            if job is not None and job.windows and device.tz:
                wait = window_wait(job.windows, device.tz, now)
                if wait > 0:
                    return await self.tasks.move(
                        task.task_id, S.IN_PROGRESS, expect_state=S.IN_PROGRESS,
                        cause="result alert follow-up waits for the job's window in the "
                              "device's time zone", changes={"next_attempt": now + wait})
            if acc.client_name:
                self.sessions.by_username[acc.client_name] = device.dev_id
            session_id = self.new_session_id()
            try:
                pkg0 = self._pkg0(acc, task, False, session_id)
            except CodecError as exc:
                return await self.tasks.move(
                    task.task_id, S.IN_PROGRESS, expect_state=S.IN_PROGRESS, changes=quiet,
                    cause=f"no result alert yet; package #0 not built ({exc}): waiting for "
                          f"the device until the deadline")
            # written before the send, as notify() does: the device may report at once
            task = await self.tasks.move(
                task.task_id, S.IN_PROGRESS, expect_state=S.IN_PROGRESS,
                cause=f"no result alert yet: device woken to report (follow-up {k} of "
                      f"{cfg.alert_followups}, package #0 via {self.gateway.name}, session "
                      f"{session_id:X}; the package is not sent again)",
                changes={"next_attempt": now + cfg.alert_wait * 2 ** k,
                         "followups": k, "attempts": task.attempts + 1})
        except (Conflict, InvalidTransition):
            return task                        # its alert came meanwhile: nothing to wake
        try:
            await self.gateway.send(device.msisdn, pkg0)
        except GatewayError as exc:
            # the next follow-up (or the deadline) comes as planned; a gateway that is down
            # now is no reason to wake the device sooner
            log.warning("scheduler: result-alert follow-up of task %s not sent: %s",
                        task.task_id, exc)
            if self.metrics is not None:
                self.metrics.notification("failed", self.gateway.name)
            return task
        if self.metrics is not None:
            self.metrics.notification("sent", self.gateway.name)
        return task

    def _pkg0(self, acc: DmAccount, task: Task, resync: bool, session_id: int) -> bytes:
        return build_pkg0(acc.server_id, acc.server_password or None,
                          self.config.resync_nonce if resync else stored_nonce(acc.server_nonce),
                          session_id,
                          ui_mode=3 if task.b_optin else self.config.notify_ui_mode, initiator=1,
                          server_key=acc.server_key.encode() if acc.server_key else None)

    @staticmethod
    def new_session_id() -> int:
        """The SessionID package #0 names: 16 bits from the system's random source (whoever
        sees a few of them must not be able to tell the next)."""
        return secrets.randbelow(0xFFFF) + 1

    # --- the pass and the loop ---------------------------------------------------------------

    async def tick(self) -> int:
        """One scheduler pass: expire tasks past their deadline, move the jobs on (start,
        stages, stop rule, completion) and start their next tasks within their budgets, and
        re-notify devices that did not connect.  Its cost grows with the work due, not with
        the tasks stored.  Returns how many tasks it touched."""
        now = self.clock()
        t0 = time.perf_counter()
        self._pass_start = now
        touched = 0
        for task in await self.store.tasks_expiring(now):
            if task.state in FINAL_TASK_STATES:
                continue
            await self._guarded(task, self.tasks.finish(
                task, S.EXPIRED, "deadline passed before the device answered"))
            touched += 1
        jobs = await self._open_jobs(now)
        # work already begun first: retries take the jobs' rate budgets before new tasks do
        # (else a paced job's retries would wait until all its targets were started)
        touched += await self._retries(jobs, now)
        touched += await self._run_jobs(jobs, now)
        if self.metrics is not None:
            self.metrics.scheduler_pass(time.perf_counter() - t0)
        return touched

    # --- jobs (DMSCHED) ------------------------------------------------------------------------

    async def _open_jobs(self, now: float) -> dict[str, Job]:
        """RUNNING jobs (SCHEDULED ones whose start time came are started here)."""
        out: dict[str, Job] = {}
        for state in (J.SCHEDULED, J.RUNNING):
            cursor: str | None = None
            while True:
                page = await self.store.list_jobs(state=state, cursor=cursor, limit=500)
                for job in page.items:
                    if job.state == J.SCHEDULED:
                        if job.start_at is None or job.start_at > now:
                            continue
                        job = await self.store.update_job(
                            job.job_id, {"state": J.RUNNING, "started": now,
                                         "cause": "start time reached"},
                            expect_state=J.SCHEDULED)
                    out[job.job_id] = job
                cursor = page.next_cursor
                if cursor is None:
                    break
        return out

    async def _run_jobs(self, jobs: dict[str, Job], now: float) -> int:
        touched = 0
        total_in_flight = sum(in_flight(j) for j in jobs.values())
        for job in sorted(jobs.values(), key=lambda j: -j.priority):
            try:
                started = await self._run_job(job, now, total_in_flight)
            except (Conflict, InvalidTransition):
                continue                   # the job changed under us (paused, cancelled)
            total_in_flight += started
            touched += started
        return touched

    async def _run_job(self, job: Job, now: float, total_in_flight: int) -> int:
        """One job's step: returns how many of its tasks it started."""
        if job.end_at is not None and now >= job.end_at:
            await self._end_job(job, now)
            return 0
        v = view(job, now)
        rule = job.stop_rule
        if rule is not None:
            final, failed = v.final - job.base_final, v.failed - job.base_failed
            if final >= max(rule.min_finished, 1) and failed / final >= rule.max_failure_ratio:
                await self.store.update_job(job.job_id, {
                    "state": J.PAUSED,
                    "cause": f"stopped by its error threshold: {failed} of {final} tasks "
                             f"failed ({failed / final:.0%} >= {rule.max_failure_ratio:.0%})"},
                    expect_state=J.RUNNING)
                return 0
        boundary = stage_boundary(job)
        if job.op is None or job.total >= boundary:
            # (a job without an operation — doBootstrap for a list — made its tasks itself)
            if in_flight(job) == 0:
                await self._stage_done(job, v)
            return 0
        if job.windows and window_wait(job.windows, job.tz, now) > 0:
            return 0                       # outside the job's window: nothing new starts
        room = min(boundary - job.total, self.config.job_batch)
        if job.concurrency is not None:
            room = min(room, job.concurrency - in_flight(job))
        if self.config.max_in_flight is not None:
            room = min(room, self.config.max_in_flight - total_in_flight)
        room = self._take_tokens(job, now, room)
        if room <= 0:
            return 0
        full = room == self.config.job_batch      # the batch, not the job, bounds it
        dev_ids = await self.store.job_targets(job.job_id, job.total, room)
        lease = now + self.config.claim_lease
        tasks = []
        for dev_id in dev_ids:
            t = self.jobs.task_for(job, dev_id, now)
            tasks.append(msgspec.structs.replace(t, next_attempt=lease))  # ours to notify
        started = await self._start(job, tasks, now)
        self._full_batch |= full
        return started

    async def _start(self, job: Job, tasks: list[Task], now: float) -> int:
        """A job's next tasks: made, and those whose devices can be woken now moved on to
        NOTIFIED in the same write (one write where a make and a move per task were the
        main process's largest share of a campaign); then their packages #0 go out.  A
        task that cannot be notified now is made PENDING and goes the way of :meth:`notify`
        (its window, its device gone, no way to wake it)."""
        plans: dict[str, _Send] = {}
        devices = await self.store.get_devices([t.dev_id for t in tasks])
        for t in tasks:
            device = devices.get(t.dev_id)
            if device is None:
                continue
            plan = self._plan(t, job, device, now)
            if isinstance(plan, _Send) and plan.resync_until is None:
                plans[t.task_id] = plan
        created = await self.store.create_job_tasks(
            job.job_id, job.total, tasks, moves={k: p.move for k, p in plans.items()})
        self.tasks.count_made(tasks)            # made PENDING, whichever moved on at once
        for t in created:
            if t.task_id in plans:
                self.tasks.moved(t, plans[t.task_id].move[1])
        await self._notify_all(created, {job.job_id: job}, plans)
        return len(created)

    async def _stage_done(self, job: Job, v: JobView) -> None:
        """Every task the stage allowed is final: the next stage, a pause, or the end."""
        if job.total >= job.targets:
            await self.store.update_job(job.job_id, {
                "state": J.COMPLETED, "finished": self.clock(),
                "cause": f"all {job.targets} tasks final: {v.succeeded} succeeded, "
                         f"{v.failed} failed"}, expect_state=J.RUNNING)
            return
        stage = job.stages[job.stage]
        ratio = v.succeeded / v.final if v.final else 1.0
        name = f"stage {job.stage + 1} of {len(job.stages)} ({stage.percent:g} %)"
        if ratio < stage.success_threshold:
            await self.store.update_job(job.job_id, {
                "state": J.PAUSED,
                "cause": f"{name} done with {ratio:.0%} succeeded, below its threshold "
                         f"{stage.success_threshold:.0%}: restartJob goes on"},
                expect_state=J.RUNNING)
        elif stage.approval:
            await self.store.update_job(job.job_id, {
                "state": J.PAUSED, "cause": f"{name} done ({ratio:.0%} succeeded): waiting for "
                                            "approval (restartJob)"}, expect_state=J.RUNNING)
        else:
            await self.store.update_job(job.job_id, {
                "stage": job.stage + 1, "cause": f"{name} done ({ratio:.0%} succeeded)"},
                expect_state=J.RUNNING)

    async def _end_job(self, job: Job, now: float) -> None:
        """The job's end time: tasks not final expire, targets not started never will."""
        for state in IN_FLIGHT:
            while True:
                page = await self.store.tasks_by_job(job.job_id, state=state, limit=500)
                if not page.items:
                    break
                for task in page.items:
                    await self._guarded(task, self.tasks.finish(
                        task, S.EXPIRED, "the job's end time passed"))
        job = await self.store.get_job(job.job_id)
        v = view(job, now)
        await self.store.update_job(job.job_id, {
            "state": J.COMPLETED, "finished": now,
            "cause": f"end time reached: {v.succeeded} succeeded, {v.failed} failed or expired, "
                     f"{job.targets - job.total} never started"}, expect_state=J.RUNNING)

    def _take_tokens(self, job: Job, now: float, want: int) -> int:
        """Notifications the job may start now under its rate and the overall rate (token
        buckets refilled by the clock; a bucket holds at most a second's worth)."""
        if want <= 0:
            return 0
        n = want
        for key, rate in ((job.job_id, job.rate_limit), ("", self.config.max_notify_rate)):
            if rate is None:
                continue
            tokens, last = self._buckets.get(key, (min(rate, 1.0), now))
            tokens = min(max(rate, 1.0), tokens + (now - last) * rate)
            self._buckets[key] = (tokens, now)
            n = min(n, int(tokens))
        for key, rate in ((job.job_id, job.rate_limit), ("", self.config.max_notify_rate)):
            if rate is not None and n > 0:
                tokens, last = self._buckets[key]
                self._buckets[key] = (tokens - n, last)
        return n

    async def _retries(self, jobs: dict[str, Job], now: float) -> int:
        """Tasks due again (re-notification after backoff), claimed with a lease."""
        claimed = await self.store.claim_due(now, self.config.claim_page, self.config.claim_lease)
        todo = []
        later: list[tuple[Task, float]] = []     # claimed, not sent now: when they may go
        over_rate: dict[str, int] = {}
        touched = 0
        for task in claimed:
            if self.sessions.in_session(task.task_id):
                continue
            # due: a notification again, or the follow-up of an accepted Exec whose result
            # alert has not come (the device is woken to report; nothing is sent twice)
            followup = task.state == S.IN_PROGRESS and waiting_alert(task)
            if task.state not in (S.PENDING, S.NOTIFIED) and not followup:
                continue
            if isinstance(task.op, BootstrapOp):
                continue
            job = jobs.get(task.job_id) if task.job_id else None
            if task.job_id and (job is None or job.state != J.RUNNING):
                continue                   # paused or over: the lease runs out, it waits
            touched += 1
            if not followup and task.attempts >= self.config.max_notifications:
                await self._guarded(task, self.tasks.finish(
                    task, S.EXPIRED, f"device did not connect after {task.attempts} notifications"))
            elif job is not None and job.windows and window_wait(job.windows, job.tz, now) > 0:
                later.append((task, now + window_wait(job.windows, job.tz, now)))
            elif job is not None and self._take_tokens(job, now, 1) < 1:
                # over its rate: due again when the job's budget has room for it (not after
                # the whole lease), spread at the rate
                k = over_rate[job.job_id] = over_rate.get(job.job_id, 0) + 1
                rate = min(r for r in (job.rate_limit, self.config.max_notify_rate) if r)
                later.append((task, now + max(self.config.tick_interval, k / rate)))
            else:
                todo.append(task)
        await self._notify_all(todo, jobs)
        await asyncio.gather(*(self._release(t, at) for t, at in later
                               if at < now + self.config.claim_lease))
        return touched

    async def _release(self, task: Task, at: float) -> None:
        """A claimed task this pass does not notify is due again at ``at`` (sooner than its
        lease would let it be)."""
        try:
            await self.store.update_task(msgspec.structs.replace(task, next_attempt=at))
        except (Conflict, InvalidTransition, NotFound):
            pass                           # it moved meanwhile (the device came): theirs now

    async def _notify_all(self, tasks: list[Task], jobs: dict[str, Job],
                          ready: Mapping[str, _Send] = _NONE_READY) -> None:
        """Notifications of one pass, ``notify_parallel`` under way at once (their store
        writes share the group commit).  ``ready``: tasks already NOTIFIED whose package #0
        only has to be sent (:meth:`_start`)."""
        # a sliding window, not chunks: a chunk waited for its slowest notification before
        # the next one began, and the device port sat idle meanwhile
        window = asyncio.Semaphore(max(1, self.config.notify_parallel))
        due = self.clock() if self._pass_start is None else self._pass_start

        async def one(t: Task) -> None:
            async with window:
                plan = ready.get(t.task_id)
                await self._guarded(t, self._send(t, plan, due) if plan is not None else
                                    self.notify(t, jobs.get(t.job_id or ""), due=due))
        await asyncio.gather(*(one(t) for t in tasks))

    async def _guarded(self, task: Task, step: Awaitable[Any]) -> None:
        """One task's step of a pass: a store error is left for the next pass; any other fault
        fails that task with its cause instead of ending the pass (and with it every other
        task's notifications, retries and expiry)."""
        try:
            await step
        except StoreError:
            raise
        except Exception as exc:
            ids = logs.ids(task=task.task_id, job=task.job_id, device=task.dev_id)
            log.exception("scheduler: task %s failed", task.task_id, extra=ids)
            try:
                await self.tasks.finish(task, S.FAILED,
                                        f"internal error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("scheduler: task %s could not be failed", task.task_id, extra=ids)

    async def recover(self, *, lost: Collection[str] | None = None) -> int:
        """After a restart no session is open and no notification of the old process is under
        way.  The job tasks it had in hand are due again at once — the interruption was the
        server's, not the device's, so no backoff and no lease is waited out: tasks cut off
        mid-session go back to PENDING, except those whose outcome comes by alert (a FUMO
        Exec the device accepted is not sent again); tasks it claimed or notified within the
        last ``claim_lease`` (a package #0 that may never have gone out: NOTIFIED is written
        before the send) are notified again.  Pacing still holds: they are claimed and
        notified by the passes, within the job's rate.  Returns how many were put back.

        ``lost``: a device process exited (``serve --device-processes``) and the sessions it
        held are gone; ``lost`` is the tasks the live device processes' sessions hold.  Only
        tasks cut off mid-session are put back then — those in no session of this process
        nor of ``lost`` — since the notifications are this process's and still valid."""
        now = self.clock()
        recent = now - self.config.claim_lease
        n = 0
        for state in (J.RUNNING, J.PAUSED):
            cursor: str | None = None
            while True:
                page = await self.store.list_jobs(state=state, cursor=cursor, limit=500)
                for job in page.items:
                    # PENDING first: tasks put back below are not looked at twice
                    for ts in ((S.IN_PROGRESS, S.WAITING_USER) if lost is not None else
                               (S.PENDING, S.NOTIFIED, S.IN_PROGRESS, S.WAITING_USER)):
                        tcur: str | None = None
                        while True:
                            tp = await self.store.tasks_by_job(job.job_id, state=ts, cursor=tcur,
                                                               limit=500)
                            for task in tp.items:
                                if self.sessions.in_session(task.task_id):
                                    continue
                                if lost is not None and task.task_id in lost:
                                    continue
                                if ts in (S.PENDING, S.NOTIFIED):
                                    if task.next_attempt is None or task.next_attempt <= now \
                                            or task.updated < recent:
                                        continue       # due anyway, or in its own backoff
                                    cause = "the server restarted: notifying again"
                                elif waiting_alert(task):
                                    continue
                                elif lost is not None:
                                    cause = ("the device process that held its session "
                                             "exited before the device answered")
                                else:
                                    cause = "the server restarted before the device answered"
                                try:
                                    await self.tasks.move(task.task_id, S.PENDING, cause=cause,
                                                          expect_state=ts,
                                                          changes={"next_attempt": now})
                                except (Conflict, InvalidTransition):
                                    continue           # the device came meanwhile
                                n += 1
                                if self.sessions.in_session(task.task_id):
                                    # the device connected while this was written: the task
                                    # is its session's (which may have moved it just before)
                                    try:
                                        await self.tasks.move(
                                            task.task_id, S.IN_PROGRESS, expect_state=S.PENDING,
                                            cause="device connected; its session has the task",
                                            changes={"next_attempt": None})
                                    except (Conflict, InvalidTransition):
                                        pass
                            tcur = tp.next_cursor
                            if tcur is None:
                                break
                cursor = page.next_cursor
                if cursor is None:
                    break
        if n:
            log.info("scheduler: %d job tasks of the %s due again", n,
                     "exited device process" if lost is not None else "previous process")
        return n

    async def run(self) -> None:
        """The loop (until cancelled), supervised: a failed pass is logged, counted and tried
        again after ``tick_interval``."""
        try:
            await self.recover()
        except Exception:
            log.exception("scheduler: recovery after the restart failed")
        while True:
            self._full_batch = False
            await self.loop.run_pass(self.tick)
            # job_batch bounds the work of one pass, not a job's pace (its concurrency and
            # rate do): after a pass that started a full batch of a job with room for more,
            # the next comes at once.  Waiting a tick each time held a job without a
            # concurrency cap to job_batch per tick plus pass (5,000 a second by default).
            await asyncio.sleep(0 if self._full_batch else self.config.tick_interval)

    def start(self) -> None:
        self.loop.start(self.run)

    async def stop(self) -> None:
        await self.loop.stop()

    def health(self) -> list[str]:
        """What is wrong with the scheduler, for ``/health`` (empty when nothing is)."""
        return self.loop.health()


__all__ = ["Scheduler", "window_wait"]
