"""The device port's handler (L4): what a DM session reports becomes task progress.

The server calls :meth:`DeviceSessions.account_for` before a message is checked and
:meth:`DeviceSessions.on_events` with what the session engine reported, before the reply is
built (so commands queued there go out in that reply).  Only an authenticated session acts:
the events of one that has not authenticated are dropped (issue 13).

Per session the handler keeps a :class:`SessionWork`: the device record it proved and a
:class:`TaskRun` per task being worked on.  Command handles are typed
(:class:`CommandHandle`), not ad-hoc tuples.  A FUMO task stays IN_PROGRESS after its Exec
until the device's Generic Alert 1226 with the task's correlator reports the result, possibly
in a later session; a task interrupted by a session that ended early goes back to PENDING and
is retried with backoff.
"""
from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, NamedTuple

import msgspec

from . import auth, logs
from .bounded import BoundedDict
from .bulk import FINAL_JOB_STATES, early_start_allowed, job_task, stage_boundary
from .commands import Commands
from .config import BrokerConfig
from .devices import CarrierCallback, check_device_policy, imei_of
from .errors import Conflict, InvalidTransition, NotFound, ServiceError, StoreError
from .events import (AuthFailed, Authenticated, CommandNotDelivered, DeviceIdentified, GenericAlert, NonceIssued,
                     ResultsReceived, ServerNonceReceived, SessionEnded, StatusReceived,
                     UserAlertAnswered)
from .message import Command, Item
from .model import (FINAL_TASK_STATES, BootstrapOp, Device, DmAccount, ExecOp, Task, TaskResult,
                    TaskState, UpdateOp)
from .status import describe_fumo_result, fumo_result_is_success, status_is_success
from .store.base import Store, Waypoint
from .tasks import Tasks

log = logging.getLogger("dmengine.sessions")

S = TaskState
_FUMO_TYPE_PREFIX = "org.openmobilealliance.dm.firmwareupdate."
#: the DM status of an Exec whose result comes later, by Generic Alert 1226
ACCEPTED_FOR_PROCESSING = 202


class CommandHandle(NamedTuple):
    """What a queued command is known by in the session's events."""
    task_id: str
    kind: str          # "cmd" (the operation's commands) or "optin" (the 1101 confirm)
    position: int = 0  # of the command among the task's commands


@dataclass
class TaskRun:
    """One task being worked on in one DM session."""

    task: Task
    outstanding: int = 0                     # queued commands not answered yet
    statuses: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    failed: tuple[str, int] | None = None    # (cause, dm status)
    waiting_alert: bool = False              # Exec accepted; the result comes by 1226
    done: bool = False
    #: the "waiting for the result alert" move, held back when the result alert is in the
    #: same message: written with the outcome that alert reports (one write, not two; the
    #: history keeps both steps), or by itself after the message if no outcome took it
    held_move: Waypoint | None = None


@dataclass
class SessionWork:
    dev_id: str | None = None                # the record the session proved
    runs: dict[str, TaskRun] = field(default_factory=dict)
    reported: set[str] = field(default_factory=set)   # correlators of alerts in this session
    authenticated: Authenticated | None = None   # until DeviceIdentified writes the record
    #: nonces rotated in the message being handled (slot → base64), written with the
    #: DeviceIdentified update when the message has one, else by themselves after it
    nonces: dict[str, str] = field(default_factory=dict)
    #: the correlators of the Generic Alerts the message being handled carries
    alerts_now: frozenset[str] = frozenset()
    #: the DeviceIdentified update (DevId, changes) held back for the write of the outcome
    #: that message's Generic Alert reports (one write, not two); written after the message
    #: by itself when no outcome took it
    device_write: tuple[str, dict[str, Any]] | None = None


BY_USERNAME_SIZE = 200_000
STARTED = "device connected; commands sent"     #: the cause of a task's IN_PROGRESS move


class _Recent(BoundedDict[str, str]):
    """Keeps its ``size`` most recently set keys (one set again becomes the newest)."""

    def __init__(self, size: int) -> None:
        super().__init__(size, refresh=True)


class DeviceSessions:
    """The ``DeviceHandler`` of the device port (see ``server.DeviceHandler``)."""

    def __init__(self, store: Store, tasks: Tasks, commands: Commands, config: BrokerConfig, *,
                 carrier_callback: CarrierCallback | None = None,
                 clock: Callable[[], float]) -> None:
        self.store = store
        self.tasks = tasks
        self.commands = commands
        self.config = config
        self.carrier_callback = carrier_callback
        self.clock = clock
        self.works: dict[int, SessionWork] = {}
        #: task id -> its run in a live session (O(1) for the scheduler's per-task question;
        #: a run that is done or whose session ended is dropped when next looked at)
        self.running: dict[str, TaskRun] = {}
        #: DM user name → device record, for devices we notified or bootstrapped: a device that
        #: answers with another DevId (acceptDevicePolicy) is found through its account.  Kept
        #: for the most recent BY_USERNAME_SIZE names only (a campaign notifies millions)
        self.by_username: _Recent = _Recent(BY_USERNAME_SIZE)

    def in_session(self, task_id: str) -> bool:
        """A live session of the device works on the task (the scheduler leaves it alone)."""
        run = self.running.get(task_id)
        if run is None:
            return False
        if run.done:
            del self.running[task_id]
            return False
        return True

    def _add_run(self, work: SessionWork, run: TaskRun) -> None:
        work.runs[run.task.task_id] = run
        self.running[run.task.task_id] = run

    def drop_task(self, task_id: str) -> None:
        """A cancelled task: sessions working on it stop recording its outcome."""
        run = self.running.pop(task_id, None)
        if run is not None:
            run.done = True

    # --- the DeviceHandler hooks ---------------------------------------------------------

    async def account_for(self, dev_id: str | None, username: str | None) -> auth.DmAccount | None:
        device = await self._record_for(dev_id, username)
        if device is None:
            return None
        acc = device.account
        pending = device.pending_account
        if pending is not None and (acc is None or (username and username == pending.client_name)):
            acc = pending                      # the device uses its bootstrapped account
        if acc is None or (username and acc.client_name and username != acc.client_name):
            return None
        if not acc.client_password and not acc.client_key:
            # neither a password nor its key: no credentials the device could prove, and
            # none may be taken for "" (MD5 of an empty password is anyone's)
            log.warning("device %s has a DM account without a password or key: refused",
                        device.dev_id)
            return None
        return auth.DmAccount(dev_id=dev_id or device.dev_id, username=acc.client_name,
                              client_secret=acc.client_password or None,
                              client_key=None if acc.client_password else acc.client_key,
                              client_nonce=stored_nonce(acc.client_nonce) if acc.client_nonce else None,
                              server_id=acc.server_id,
                              server_secret=acc.server_password or None,
                              server_key=None if acc.server_password else acc.server_key,
                              server_nonce=stored_nonce(acc.server_nonce) if acc.server_nonce else None,
                              resync=acc.resync_until is not None and self.clock() < acc.resync_until)

    async def on_events(self, session: Any, events: list[Any]) -> None:
        if not getattr(session, "authenticated", False):
            # Nothing a device sends acts before its session authenticated: not a Generic
            # Alert, not a nonce, not DevInfo.  What such a session reports is only its end.
            for ev in events:
                if isinstance(ev, AuthFailed):     # the device claimed an id it did not prove
                    logs.bind(session=getattr(session, "session_key", None),
                              device=getattr(session, "device_id", None))
                    log.info("authentication failed (%s, %s side): %s", ev.scheme, ev.side,
                             ev.reason)
            work = self.works.pop(id(session), None)
            if work is not None:
                await self._settle(work, "session ended before it authenticated")
            return
        work = self.works.setdefault(id(session), SessionWork())
        # every line logged for this message names the session and its device (dmengine/logs.py)
        logs.bind(session=getattr(session, "session_key", None), device=work.dev_id)
        # Results the device reports in this very message (a Generic Alert for an Exec of an
        # earlier session, say one the server never saw answered): their tasks are not started
        # again before the report is read — the report is their outcome
        work.alerts_now = frozenset(ev.correlator for ev in events
                                    if isinstance(ev, GenericAlert) and ev.correlator)
        work.reported.update(work.alerts_now)
        what = ""                               # what was being written, for the log
        try:
            for ev in events:
                what = type(ev).__name__
                await self._on_event(session, work, ev)
            for run in list(work.runs.values()):
                if run.held_move is not None:   # no outcome of this message took it
                    what = f"the held move of task {run.task.task_id}"
                    await self._write_held(run)
            if work.device_write is not None:   # no outcome of this message took it
                what = "the device's record"
                dev_id, changes = work.device_write
                work.device_write = None
                await self.store.update_device(dev_id, changes)
            if work.nonces:
                what = "the session's nonces"
                await self._save_nonces(session, work)
        except StoreError as exc:
            # An outcome that cannot be recorded (disk full, writer gone) must not be
            # acknowledged: the error ends the session (the device is told 500) and its
            # tasks are tried again later, instead of the session going on without them.
            log.error("store failed while handling %s: %s", what, exc)
            raise

    async def on_session_closed(self, session: Any, reason: str) -> None:
        work = self.works.pop(id(session), None)
        if work is not None:
            logs.bind(session=getattr(session, "session_key", None), device=work.dev_id)
            log.debug("session closed (%s)", reason)
            await self._settle(work, f"session closed ({reason})")

    async def _on_event(self, session: Any, work: SessionWork, ev: Any) -> None:
        if isinstance(ev, DeviceIdentified):
            await self._on_identified(session, work, ev)
        elif isinstance(ev, StatusReceived):
            await self._on_status(work, ev)
        elif isinstance(ev, ResultsReceived):
            run = self._run_of(work, ev.handle)
            if run is not None:
                for uri, _fmt, _typ, data in ev.items:
                    if uri is not None:
                        run.nodes[uri] = _text(data)
                run.outstanding -= 1            # the Results a successful Get owed
                if run.outstanding <= 0:
                    await self._complete(run)
        elif isinstance(ev, UserAlertAnswered):
            await self._on_user_answer(session, work, ev)
        elif isinstance(ev, GenericAlert):
            await self._on_generic_alert(session, work, ev)
        elif isinstance(ev, CommandNotDelivered):
            run = self._run_of(work, ev.handle)
            if run is not None and not run.done and run.failed is None:
                run.failed = (f"command not delivered: {ev.reason}", 0)
                run.outstanding = 0
                run.done = True
                await self.tasks.retry_later(run.task, f"session ended before the device "
                                                       f"answered ({ev.reason})")
        elif isinstance(ev, Authenticated):
            work.authenticated = ev          # its account change goes with _on_identified's write
            await self._adopt_pending_account(session, work, ev)
        elif isinstance(ev, NonceIssued):
            work.nonces["client_nonce"] = _b64(ev.nonce)      # saved after the message
        elif isinstance(ev, ServerNonceReceived):
            work.nonces["server_nonce"] = _b64(ev.nonce)
        elif isinstance(ev, SessionEnded):
            self.works.pop(id(session), None)
            await self._settle(work, f"session ended ({ev.reason})")

    # --- the device and its account --------------------------------------------------------

    async def _adopt_pending_account(self, session: Any, work: SessionWork,
                                     ev: Authenticated) -> None:
        """The device proved its bootstrapped account: it becomes the account (before the
        nonces this session issues are saved into it)."""
        device = await self._session_record(session, work)
        pending = device.pending_account if device is not None else None
        if device is None or pending is None or ev.username != pending.client_name:
            return
        # only if nothing changed the record since it was read (a newer bootstrap, say)
        await self.store.update_device(device.dev_id, {"account": pending,
                                                       "pending_account": None},
                                       expect_version=device.version)

    @staticmethod
    def _after_authentication(acc: DmAccount | None, ev: Authenticated | None) -> DmAccount | None:
        """The account once the device authenticated, when that changes it (else None): a
        re-synchronisation is over; the device holds the nonce the session issued
        (NonceIssued), and for us the well-known one it used, until it sends another
        (ServerNonceReceived)."""
        if acc is None or ev is None:
            return None
        if ev.resync_nonce is not None:
            return msgspec.structs.replace(acc, server_nonce=_b64(ev.resync_nonce),
                                           resync_until=None)
        if acc.resync_until is not None:
            return msgspec.structs.replace(acc, resync_until=None)
        return None

    async def _save_nonces(self, session: Any, work: SessionWork) -> None:
        """Stores the nonces rotated in this message in the record whose account this
        (authenticated) session proved: the one account_for found for its Source and user
        name, never a record an unverified Source merely names."""
        patch, work.nonces = work.nonces, {}
        device = await self._session_record(session, work)
        if device is None or device.account is None:
            return
        # a patch of those fields, merged in the store's write: no read-modify-write here
        await self.store.update_device(device.dev_id, {"account": patch})

    async def _session_record(self, session: Any, work: SessionWork) -> Device | None:
        """The device record of an authenticated session (found once, then by its id)."""
        if work.dev_id is not None:
            try:
                return await self.store.get_device(work.dev_id)
            except NotFound:
                return None
        record = await self._record_for(session.device_id, getattr(session, "username", None))
        if record is not None:
            work.dev_id = record.dev_id
        return record

    async def _record_for(self, reported: str | None, username: str | None) -> Device | None:
        """The device record a connecting device stands for: by its DevId, by the IMEI in it,
        or (a replaced phone answering a notification) by the DM account it authenticates with."""
        candidates: list[Callable[[], Awaitable[Device]]] = []
        if reported:
            candidates.append(lambda: self.store.get_device(reported))
            imei = imei_of(reported)
            if imei:
                candidates.append(lambda: self.store.device_by_imei(imei))
        if username and username in self.by_username:
            candidates.append(lambda: self.store.get_device(self.by_username[username]))
        for lookup in candidates:
            try:
                return await lookup()
            except NotFound:
                continue
        return None

    async def _on_identified(self, session: Any, work: SessionWork, ev: DeviceIdentified) -> None:
        record = await self._record_for(ev.dev_id, getattr(session, "username", None))
        if record is None:
            log.info("unknown device %s connected; nothing to do", ev.dev_id)
            return
        work.dev_id = record.dev_id
        logs.bind(session=getattr(session, "session_key", None), device=record.dev_id)
        log.debug("device identified in an authenticated session")
        changes: dict[str, Any] = {"last_contact": self.clock(),
                                   "devinfo": {f"./DevInfo/{k}": str(v) for k, v in ev.devinfo.items()}}
        account = self._after_authentication(record.account, work.authenticated)
        if account is not None:
            changes["account"] = account
        work.authenticated = None
        if work.nonces and record.account is not None:
            # the nonces this message rotated go in the same write (one op, not two)
            changes["account"] = (msgspec.structs.replace(account, **work.nonces)
                                  if account is not None else dict(work.nonces))
            work.nonces = {}
        tasks = await self.tasks.open_for_device(record.dev_id)
        first = self._plain_first(work, ev, record, tasks)
        if first is None and work.alerts_now and ev.dev_id == record.dev_id \
                and not any(self._may_start(work, t) for t in tasks):
            # the message reports an outcome (the second session of a FUMO update): the
            # device update goes with the write of that outcome
            work.device_write = (record.dev_id, changes)
        elif first is None:
            record = await self.store.update_device(record.dev_id, changes)
        else:
            # the common case (a notified device comes for its task): the device update and
            # the task's IN_PROGRESS move in one write
            run = TaskRun(task=first)
            self._add_run(work, run)
            try:
                record, moved = await self.tasks.move_with_device(
                    (record.dev_id, changes), first.task_id, S.IN_PROGRESS, cause=STARTED,
                    changes={"next_attempt": None})
            except BaseException:
                run.done = True      # not started: the session's end must not settle it
                raise
            tasks = [t for t in tasks if t is not first]
            if isinstance(moved, Task):
                run.task = moved
                await self._queue_work(session, run, record)
            else:                              # cancelled or ended meanwhile
                run.done = True
                log.info("task %s not started: %s", first.task_id, moved)
        for task in tasks:
            if isinstance(task.op, BootstrapOp):
                if getattr(session, "username", None) != task.op.account.client_name:
                    continue                   # still on its old account: not arrived yet
                # The first session with the bootstrapped account: the bootstrap worked.
                task = await self.tasks.move(task.task_id, S.IN_PROGRESS,
                                             cause="device connected with the new account")
                await self.tasks.finish(task, S.SUCCEEDED,
                                        "device opened a session with the new account")
                continue
            if not self._may_start(work, task):
                continue
            if ev.dev_id != record.dev_id:
                decision = await check_device_policy(task.accept_device_policy, record, ev.dev_id,
                                                     task_id=task.task_id,
                                                     callback=self.carrier_callback)
                if not decision.accept:
                    await self.tasks.finish(task, S.FAILED, decision.cause)
                    continue
            await self._start_task(session, work, task, device=record)
        if ev.dev_id == record.dev_id:    # (another DevId: the device policy decides, later)
            await self._start_early_targets(session, work, record)

    def _plain_first(self, work: SessionWork, ev: DeviceIdentified, record: Device,
                     tasks: list[Task]) -> Task | None:
        """The task the loop below would start first, when starting it is a plain move to
        IN_PROGRESS (no bootstrap, no opt-in, the device under its own DevId) and no task
        before it needs anything else: it can go in the device update's write."""
        if ev.dev_id != record.dev_id:
            return None
        for task in tasks:
            if isinstance(task.op, BootstrapOp):
                return None
            if not self._may_start(work, task):
                continue                       # skipped below too
            return None if task.b_optin else task
        return None

    def _may_start(self, work: SessionWork, task: Task) -> bool:
        """The loop of ``_on_identified`` may start or end ``task``; else it skips it: its
        result comes as a Generic Alert, the device reports its outcome right now, or another
        live session of the device has it."""
        return isinstance(task.op, BootstrapOp) or not (
            (task.state == S.IN_PROGRESS and waiting_alert(task))
            or task.correlator in work.reported or self.in_session(task.task_id))

    async def _start_early_targets(self, session: Any, work: SessionWork, record: Device) -> None:
        """A device that connected on its own runs the task of a job that selected it but
        whose pacing has not reached it yet (its target moves up to be the job's next; see
        ``Store.start_job_target``), when the job runs, its stage has room and its window is
        open.  One index read per session when there is none (the common case)."""
        job_ids = await self.store.pending_job_targets(record.dev_id)
        if not job_ids:
            return
        now = self.clock()
        for job_id in job_ids:
            try:
                job = await self.store.get_job(job_id)
            except NotFound:
                continue
            ended = job.state in FINAL_JOB_STATES
            if (ended and job.op is None) or (not ended
                                              and not early_start_allowed(job, record.tz, now)):
                continue
            task = job_task(job, record.dev_id, now, self.config.task_ttl)   # (ended: the
            # store only forgets the target, so the index does not keep ended jobs' rows)
            created = await self.store.start_job_target(job_id, task, stage_boundary(job))
            if created is None:
                continue
            self.tasks.count_made([created])
            log.info("device %s connected on its own: its task %s of job %s starts now",
                     record.dev_id, created.task_id, job_id)
            await self._start_task(session, work, created, device=record)

    # --- a task's commands and their answers ---------------------------------------------

    async def _start_task(self, session: Any, work: SessionWork, task: Task, *,
                          device: Device | None = None) -> None:
        """Starts ``task`` in this session (``device``: its record as just written, when the
        caller has it: the commands need not read it again)."""
        run = TaskRun(task=task)
        self._add_run(work, run)
        if task.b_optin:
            task = await self.tasks.move(task.task_id, S.WAITING_USER,
                                         cause="asking the user (opt-in)",
                                         changes={"next_attempt": None})
            run.task = task
            params = f"MAXDT={self.config.optin_timeout}&DR=1"
            session.queue(CommandHandle(task.task_id, "optin"), Command(
                name="Alert", data="1101",
                items=[Item(data=params), Item(data=self.config.optin_text)]))
            run.outstanding = 1
            return
        task = await self.tasks.move(task.task_id, S.IN_PROGRESS, cause=STARTED,
                                     changes={"next_attempt": None})
        run.task = task
        await self._queue_work(session, run, device)

    async def _queue_work(self, session: Any, run: TaskRun, device: Device | None = None) -> None:
        task = run.task
        try:
            commands = await self.commands.for_session(session, task, device=device)
        except ServiceError as exc:
            run.done = True
            await self.tasks.finish(task, S.FAILED, str(exc))
            return
        for i, cmd in enumerate(commands):
            session.queue(CommandHandle(task.task_id, "cmd", i), cmd)
        run.outstanding = len(commands)
        if not commands:
            run.done = True
            await self.tasks.finish(task, S.SUCCEEDED, "nothing to do")

    def _run_of(self, work: SessionWork, handle: Any) -> TaskRun | None:
        if not isinstance(handle, CommandHandle):
            return None
        run = work.runs.get(handle.task_id)
        if run is None or run.done:
            return None
        return run

    async def _on_status(self, work: SessionWork, ev: StatusReceived) -> None:
        run = self._run_of(work, ev.handle)
        if run is None or ev.handle.kind == "optin":
            return
        key = f"{ev.cmd} {ev.target}" if ev.target else ev.cmd
        if ev.index >= 0:
            key = f"{key} [{ev.index}]"
        run.statuses[key] = ev.status
        if ev.index >= 0:
            return                              # statuses inside Atomic/Sequence: recorded only
        if ev.cmd == "Get" and status_is_success(ev.status) and ev.status != 204:
            pass                                # still owes its Results: counted there
        else:
            run.outstanding -= 1
        if not status_is_success(ev.status) and run.failed is None:
            what = f"{ev.cmd} {ev.target}" if ev.target else ev.cmd
            run.failed = (f"{what} failed with status {ev.status}", ev.status)
        if ev.cmd == "Exec" and status_is_success(ev.status) and (
                isinstance(run.task.op, UpdateOp)
                or (isinstance(run.task.op, ExecOp) and ev.status == ACCEPTED_FOR_PROCESSING)):
            run.waiting_alert = True            # the outcome comes by Generic Alert 1226
        if run.outstanding <= 0:
            await self._complete(run, work)

    async def _complete(self, run: TaskRun, work: SessionWork | None = None) -> None:
        run.done = True
        task = run.task
        learned = {k: v for k, v in run.nodes.items() if k.startswith("./DevDetail/")}
        if learned:       # keep the device's DevDetail snapshot (firmware version for UPDATE)
            await self._change_devdetail(task.dev_id, lambda snap: {**snap, **learned})
        before = task.result or TaskResult()        # earlier sessions of the same task
        result = TaskResult(statuses={**before.statuses, **run.statuses},
                            nodes={**before.nodes, **run.nodes}, fumo_result=before.fumo_result)
        if run.failed is not None:
            cause, status = run.failed
            await self.tasks.finish(task, S.FAILED, cause, dm_status=status or None, result=result)
        elif run.waiting_alert:
            what = "firmware update" if isinstance(task.op, UpdateOp) else "Exec"
            # a device that never reports is woken again then (scheduler.follow_up)
            wake = self.clock() + self.config.alert_wait if self.config.alert_followups else None
            run.held_move = (S.IN_PROGRESS, f"{what} accepted; waiting for the result alert",
                             {"result": result, "next_attempt": wake})
            if work is None or not task.correlator or task.correlator not in work.alerts_now:
                await self._write_held(run)
            # else the result alert is further on in this message: held for its outcome's write
        else:
            await self.tasks.finish(task, S.SUCCEEDED, "all commands succeeded", result=result)

    async def _write_held(self, run: TaskRun) -> None:
        """Writes the run's held move by itself."""
        assert run.held_move is not None
        (state, cause, changes), run.held_move = run.held_move, None
        try:
            await self.tasks.move(run.task.task_id, state, cause=cause, changes=changes)
        except (Conflict, InvalidTransition):
            pass                               # final meanwhile (its alert came first): kept

    async def _on_user_answer(self, session: Any, work: SessionWork,
                              ev: UserAlertAnswered) -> None:
        run = self._run_of(work, ev.handle)
        if run is None:
            return
        task = run.task
        if ev.status == 200:
            run.task = await self.tasks.move(task.task_id, S.IN_PROGRESS,
                                             cause="the user accepted", dm_status=200)
            await self._queue_work(session, run)
            return
        run.done = True
        if ev.status == 304:
            await self.tasks.finish(task, S.FAILED, "declined by the user", dm_status=304)
        elif ev.status == 408:
            await self.tasks.finish(task, S.EXPIRED, "the user did not answer in time",
                                    dm_status=408)
        elif ev.status == 214:
            await self.tasks.finish(task, S.FAILED, "cancelled by the user", dm_status=214)
        else:
            await self.tasks.finish(task, S.FAILED, f"the device could not ask the user "
                                                    f"(status {ev.status})", dm_status=ev.status)

    async def _on_generic_alert(self, session: Any, work: SessionWork, ev: GenericAlert) -> None:
        if not ev.correlator:
            log.info("generic alert without correlator from %s: %s", work.dev_id, ev.type)
            return
        try:
            task = await self.store.task_by_correlator(ev.correlator)
        except NotFound:
            log.info("generic alert for unknown correlator %r", ev.correlator)
            return
        if task.dev_id != work.dev_id:
            # a correlator is no capability: only the device the task is for may report it
            log.warning("device %s reported a generic alert for task %s of device %s: ignored",
                        work.dev_id, task.task_id, task.dev_id)
            return
        if task.state in FINAL_TASK_STATES:
            return
        run = work.runs.get(task.task_id)
        waypoint = None
        if run is not None:
            run.done = True                    # the alert is the outcome; statuses after it are not
            waypoint, run.held_move = run.held_move, None   # written with the outcome
        fumo = isinstance(task.op, UpdateOp)
        held = work.device_write
        device = held if held is not None and held[0] == task.dev_id else None
        if device is not None:                 # written with the outcome below, or after
            work.device_write = None           # the message if no final move takes it
        if not await self._alert_outcome(session, work, ev, task, fumo, device, waypoint) \
                and device is not None:
            work.device_write = device         # written after the message, by itself

    async def _alert_outcome(self, session: Any, work: SessionWork, ev: GenericAlert,
                             task: Task, fumo: bool,
                             device: tuple[str, dict[str, Any]] | None,
                             waypoint: Waypoint | None) -> bool:
        """What a Generic Alert reports, recorded; whether ``device`` (the held device
        update) went in the write of a final move.  ``waypoint``: the run's held "waiting
        for the result alert" move, written first in the outcome's write."""
        try:
            code = int(_text(ev.data).strip())
        except ValueError:
            await self.tasks.finish(task, S.FAILED, f"unreadable {'FUMO ' if fumo else ''}result "
                                                    f"{ev.data!r}", device=device,
                                    waypoint=waypoint)
            return True
        # the session's statuses are in the held move's result when it is not written yet
        before = waypoint[2]["result"] if waypoint is not None else task.result
        result = msgspec.structs.replace(before or TaskResult(), fumo_result=code)
        if not fumo:
            # a generic Exec answered by an alert: its data is the outcome, nothing more is
            # known about it (it did not update firmware)
            state = S.SUCCEEDED if status_is_success(code) else S.FAILED
            await self.tasks.finish(task, state, f"Exec {'completed' if state == S.SUCCEEDED else 'failed'}: "
                                                 f"result {code} ({ev.type or 'no type'})",
                                    result_code=code, result=result, device=device,
                                    waypoint=waypoint)
            return True
        kind = (ev.type or "").removeprefix(_FUMO_TYPE_PREFIX)
        if not fumo_result_is_success(code):
            await self.tasks.finish(task, S.FAILED, f"firmware {kind or 'update'} failed: {code} "
                                                    f"{describe_fumo_result(code)}",
                                    result_code=code, result=result, device=device,
                                    waypoint=waypoint)
            return True
        if kind == "download":
            assert isinstance(task.op, UpdateOp)
            # Download then Update: the package is on the device; install it now, in this session.
            record = await self.store.get_device(task.dev_id)
            _content, node, _mode = await self.commands.content_for(task.op, record)
            correlator = f"{task.task_id}.u"
            task = await self.tasks.move(task.task_id, S.IN_PROGRESS,
                                         cause="download complete; installing", result_code=code,
                                         changes={"correlator": correlator, "result": result},
                                         waypoint=waypoint)
            run = TaskRun(task=task, outstanding=1)
            self._add_run(work, run)
            session.queue(CommandHandle(task.task_id, "cmd", 0), Command(
                name="Exec", correlator=correlator, items=[Item(target=f"{node}/Update")]))
            return False
        package = await self._package_of(task)
        await self._forget_firmware(task.dev_id)   # the old FwV is stale now
        await self.tasks.finish(task, S.SUCCEEDED,
                                f"firmware updated: {code} {describe_fumo_result(code)}",
                                result_code=code, result=result, package=package,
                                device=device, waypoint=waypoint)
        return True

    async def _package_of(self, task: Task) -> tuple[str, str | None] | None:
        """The content id and version an UPDATE installed (for its charging event): the one
        it named, else the one the content store picks for the device's firmware before the
        update (read before that snapshot is forgotten)."""
        op = task.op
        if not isinstance(op, UpdateOp) or op.content_id is not None:
            return None                        # named: the charging event has it already
        try:
            device = await self.store.get_device(task.dev_id)
            content, _node, _mode = await self.commands.content_for(op, device)
        except (NotFound, ServiceError):
            return None
        return content.content_id, content.to_version

    async def _forget_firmware(self, dev_id: str) -> None:
        await self._change_devdetail(
            dev_id, lambda snap: {k: v for k, v in snap.items() if k != "./DevDetail/FwV"})

    async def _change_devdetail(self, dev_id: str,
                                change: Callable[[dict[str, str]], dict[str, str]]) -> None:
        """A read-modify-write of the DevDetail snapshot that loses no concurrent update: the
        write names the version it read, and is done again on a conflict."""
        for _ in range(5):
            try:
                device = await self.store.get_device(dev_id)
            except NotFound:
                return
            snapshot = change(dict(device.devdetail))
            if snapshot == device.devdetail:
                return
            try:
                await self.store.update_device(dev_id, {"devdetail": snapshot},
                                               expect_version=device.version)
                return
            except Conflict:
                continue
        log.warning("device %s: DevDetail snapshot not updated (kept changing)", dev_id)

    async def _settle(self, work: SessionWork, why: str) -> None:
        """The session is over: tasks it did not finish go back for a retry."""
        for task_id, run in work.runs.items():
            if self.running.get(task_id) is run:
                del self.running[task_id]
            if run.done:
                continue
            run.done = True
            if run.outstanding > 0 or run.task.state == S.WAITING_USER:
                await self.tasks.retry_later(run.task, f"{why} before the device answered")
            else:
                await self._complete(run)


def waiting_alert(task: Task) -> bool:
    """The task's Exec was accepted in an earlier session and its outcome comes by alert."""
    if task.result is None:
        return False
    if isinstance(task.op, UpdateOp):
        return any(k.startswith("Exec") and status_is_success(v)
                   for k, v in task.result.statuses.items())
    if isinstance(task.op, ExecOp):
        return any(k.startswith("Exec") and v == ACCEPTED_FOR_PROCESSING
                   for k, v in task.result.statuses.items())
    return False


def stored_nonce(text: str | None) -> bytes:
    """A nonce as the store keeps it (base64 text) → its bytes."""
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return text.encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _text(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


__all__ = ["DeviceSessions", "SessionWork", "TaskRun", "CommandHandle", "stored_nonce",
           "waiting_alert"]
