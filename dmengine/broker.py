"""The deployment broker (L4): IDeploymentBrokerServices for one device at a time.

``doOperation`` creates a task, wakes the device with package #0, and — when the device opens
its DM session — queues the operation's commands on that session and records the outcome.
The broker is the device port's ``DeviceHandler``: the server calls :meth:`account_for`
before a message is checked and :meth:`on_events` with what the session engine reported,
before the reply is built (so commands queued there go out in that reply).

Task life (DESIGN.md §4): PENDING → NOTIFIED → IN_PROGRESS → (WAITING_USER) → SUCCEEDED |
FAILED | CANCELLED | EXPIRED.  A FUMO task stays IN_PROGRESS after its Exec until the device's
Generic Alert 1226 with the task's correlator reports the result, possibly in a later session.
A task interrupted by a session that ended early goes back to PENDING and is retried with
backoff; a device that never answers its notifications expires the task.

The broker keeps only per-session bookkeeping in memory; everything a restart needs is in
the store.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec

from . import auth, bootstrap
from ._session import DmSession, prepare
from .content import ContentService
from .devices import CarrierCallback, check_device_policy, imei_of
from .errors import (CodecError, CommandRejected, GatewayError, InvalidRequest, NotFound, ServiceError, StoreError,
                     UnknownResource)
from .events import (Authenticated, CommandNotDelivered, DeviceIdentified, GenericAlert, NonceIssued,
                     ResultsReceived, ServerNonceReceived, SessionEnded, StatusReceived,
                     UserAlertAnswered)
from .message import Command, Item, Meta
from .metrics import TaskMetrics
from .model import (FINAL_TASK_STATES, BootstrapOp, Capability, Content, DiagOp, DmAccount,
                    Device, ExecOp, FumoMode, HistoryEntry, OutboxEntry, QueryOp, SetOp, Task,
                    TaskResult, TaskState, UpdateOp, new_id)
from .notify.base import Gateway
from .notify.pkg0 import build_pkg0
from .status import describe_fumo_result, fumo_result_is_success, status_is_success
from .store.base import Store, all_pages

log = logging.getLogger("dmengine.broker")

S = TaskState

#: Seconds between notification attempts: attempt k waits RETRY_DELAYS[min(k, len-1)].
DEFAULT_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0)
DEFAULT_MAX_NOTIFICATIONS = 4          #: notifications before a silent device expires the task
DEFAULT_TASK_TTL = 7 * 86400.0         #: deadline of a task that names none
DEFAULT_OPTIN_TIMEOUT = 300            #: MAXDT of the opt-in confirm alert, seconds
DEFAULT_DEFAULT_FUMO_PATH = "./FUMO/1"
TEMPLATE_CACHE_SIZE = 1024             #: distinct operations whose prepared commands are kept
#: Nodes a DIAG reads when the capability names none (DevDetail and DevInfo leaves).
DEFAULT_DIAG_NODES = ("./DevDetail/FwV", "./DevDetail/SwV", "./DevDetail/HwV",
                      "./DevDetail/DevTyp", "./DevDetail/OEM", "./DevInfo/Man",
                      "./DevInfo/Mod", "./DevInfo/Lang")

_FUMO_TYPE_PREFIX = "org.openmobilealliance.dm.firmwareupdate."


@dataclass
class BrokerConfig:
    server_id: str = "dmengine"
    content_base_url: str = "http://127.0.0.1:8080/content"
    server_url: str = "http://127.0.0.1:8080/dm"     #: the device port, written into bootstraps
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    max_notifications: int = DEFAULT_MAX_NOTIFICATIONS
    task_ttl: float = DEFAULT_TASK_TTL
    optin_timeout: int = DEFAULT_OPTIN_TIMEOUT
    optin_text: str = "Your operator wants to manage this device. Accept?"
    default_fumo_path: str = DEFAULT_DEFAULT_FUMO_PATH
    diag_nodes: tuple[str, ...] = DEFAULT_DIAG_NODES
    notify_ui_mode: int = 0            #: package-0 ui-mode (2 informative, 3 user interaction)
    #: notifications of a task signed with the device's stored nonce before package #0 goes out
    #: signed with the re-synchronisation nonce (PROTOCOL.md §8.2): a device that lost its
    #: nonces drops the first ones as forged; None: never re-synchronise
    resync_after: int | None = 2
    resync_window: float = 86400.0     #: how long the device may then open with that nonce
    #: the reading of "0x00000000" our package #0 uses (the session accepts both)
    resync_nonce: bytes = auth.RESYNC_NONCE_ASCII
    tick_interval: float = 1.0         #: how often the scheduler loop looks for due tasks


class TaskData(msgspec.Struct, kw_only=True):
    """What ``getTaskById`` returns: the seeds' TaskData with ``status`` (``getStatus()``)."""

    task_id: str
    status: str
    dev_id: str
    operation: str
    job_id: str | None
    test_cycle: bool
    attempts: int
    created: float
    updated: float
    finished: float | None
    cause: str | None
    result: TaskResult | None
    record: Task


def operation_name(op: Any) -> str:
    """The DMWSI name of an operation record (its msgspec tag: UPDATE, QUERY, ...)."""
    return str(type(op).__struct_config__.tag)


def task_data(task: Task) -> TaskData:
    return TaskData(task_id=task.task_id, status=task.state.value, dev_id=task.dev_id,
                    operation=operation_name(task.op), job_id=task.job_id,
                    test_cycle=task.test_cycle, attempts=task.attempts, created=task.created,
                    updated=task.updated, finished=task.finished, cause=task.cause,
                    result=task.result, record=task)


def new_secret(nbytes: int = 12) -> str:
    return secrets.token_urlsafe(nbytes)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- per-session bookkeeping --------------------------------------------------------------


@dataclass
class _TaskRun:
    """One task being worked on in one DM session."""

    task: Task
    outstanding: int = 0                     # queued commands not answered yet
    statuses: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)
    failed: tuple[str, int] | None = None    # (cause, dm status)
    waiting_alert: bool = False              # FUMO: Exec accepted, result comes by 1226
    done: bool = False


@dataclass
class _SessionWork:
    dev_id: str | None = None                # the record the session stands for
    runs: dict[str, _TaskRun] = field(default_factory=dict)
    authenticated: Authenticated | None = None   # until DeviceIdentified writes the record


class Broker:
    """doOperation / doBootstrap / getTaskById / getTaskHistory / cancelTask, and the device
    port's handler."""

    def __init__(self, store: Store, gateway: Gateway | None, *,
                 config: BrokerConfig | None = None,
                 clock: Callable[[], float] = time.time,
                 carrier_callback: CarrierCallback | None = None,
                 content: ContentService | None = None,
                 metrics: TaskMetrics | None = None) -> None:
        self.store = store
        self.metrics = metrics
        self.content = content
        self.gateway = gateway
        self.config = config or BrokerConfig()
        self.clock = clock
        self.carrier_callback = carrier_callback
        self._sessions: dict[int, _SessionWork] = {}
        #: DM user name → device record, for devices we notified: a device that answers with
        #: another DevId (acceptDevicePolicy) is found through the account it authenticates with.
        self._by_username: dict[str, str] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self.failed_passes = 0                 # scheduler passes failed in a row
        self.last_error: str | None = None
        self.last_pass: float | None = None
        #: operation -> its commands prepared once (checked and sized) and shared by the DM
        #: sessions of every task that runs it: a campaign's million tasks of one SET or QUERY
        #: cost one prepare, not a million (see _session_commands)
        self._templates: dict[tuple[Any, ...], list[Any]] = {}

    # --- every task write goes through these two (metrics) ------------------------------

    async def _create(self, task: Task) -> Task:
        task = await self.store.create_task(task)
        if self.metrics is not None:
            self.metrics.task_created(operation_name(task.op))
            self.metrics.task_moved(task.state.value)
        return task

    async def _move(self, task_id: str, to_state: TaskState, **kw: Any) -> Task:
        task = await self.store.transition(task_id, to_state, **kw)
        if self.metrics is not None:
            self.metrics.task_moved(to_state.value)
        return task

    # --- DMWSI operations ------------------------------------------------------------------

    async def resolve_target(self, *, msisdn: str | None = None, imei: str | None = None,
                             dev_id: str | None = None) -> Device:
        """The device a request names by MSISDN, IMEI or DevId (exactly one)."""
        given = [(k, v) for k, v in (("msisdn", msisdn), ("imei", imei), ("dev_id", dev_id)) if v]
        if len(given) != 1:
            raise InvalidRequest("name the target device by exactly one of msisdn, imei, dev_id",
                               where="target")
        kind, value = given[0]
        try:
            if kind == "msisdn":
                return await self.store.device_by_msisdn(value)
            if kind == "imei":
                return await self.store.device_by_imei(value)
            return await self.store.get_device(value)
        except NotFound:
            raise UnknownResource(f"no device with {kind} {value!r}",
                                  where=f"target.{kind}") from None

    async def do_operation(self, op: Any, *, msisdn: str | None = None, imei: str | None = None,
                           dev_id: str | None = None, b_optin: bool = False,
                           accept_device_policy: int = 10, test_cycle: bool = False,
                           deadline: float | None = None, job_id: str | None = None,
                           notify: bool = True) -> str:
        """Creates the task for ``op`` (an UpdateOp/QueryOp/SetOp/ExecOp/DiagOp) on one device,
        sends the first notification, and returns the task id."""
        if isinstance(op, BootstrapOp):
            raise InvalidRequest("use doBootstrap for BOOTSTRAP", where="operation")
        device = await self.resolve_target(msisdn=msisdn, imei=imei, dev_id=dev_id)
        if isinstance(op, UpdateOp):
            await self._content_for(op, device)          # refuse a package that cannot fit now
        now = self.clock()
        task_id = new_id("t")
        task = Task(task_id=task_id, dev_id=device.dev_id, op=op, job_id=job_id,
                    b_optin=b_optin, accept_device_policy=accept_device_policy,  # type: ignore[arg-type]
                    test_cycle=test_cycle, state=S.PENDING, next_attempt=now,
                    deadline=deadline if deadline is not None else now + self.config.task_ttl,
                    correlator=task_id)
        task = await self._create(task)
        if notify:
            await self.notify(task)
        return task_id

    async def get_task_by_id(self, task_id: str) -> TaskData:
        try:
            return task_data(await self.store.get_task(task_id))
        except NotFound:
            raise UnknownResource(f"no task {task_id!r}", where="taskId") from None

    async def get_task_history(self, task_id: str) -> list[HistoryEntry]:
        return await all_pages(lambda c: self.store.task_history(task_id, cursor=c))

    async def cancel_task(self, task_id: str, *, cause: str = "cancelled by the caller") -> Task:
        task = await self.store.get_task(task_id)
        if task.state in FINAL_TASK_STATES:
            raise ServiceError(f"task {task_id} is already {task.state.value}", where="taskId")
        task = await self._move(task_id, S.CANCELLED, cause=cause,
                                           changes={"finished": self.clock(),
                                                    "next_attempt": None})
        for work in self._sessions.values():   # a session working on it drops it
            run = work.runs.get(task_id)
            if run is not None:
                run.done = True
        return task

    async def do_bootstrap(self, *, msisdn: str | None = None, imei: str | None = None,
                           dev_id: str | None = None, server_id: str | None = None,
                           client_name: str | None = None, security: str = "NETWORKID",
                           pin: str | None = None, deliver: bool = True) -> str:
        """Gives the device a fresh DM account: generated credentials, stored with the device
        (API reads never show them), delivered as a DM-profile bootstrap message (WBXML with
        HMAC, PROTOCOL.md §10) through the gateway.  Returns the task id.  A bootstrap gets no
        response: the task SUCCEEDS when the device first opens a session with the new account.

        The NETWORKID key is the device's IMEI digits (the engine keeps no IMSI)."""
        if security not in bootstrap.SECURITY_METHODS:
            raise InvalidRequest(f"unknown security {security!r}", where="security")
        device = await self.resolve_target(msisdn=msisdn, imei=imei, dev_id=dev_id)
        network_id = device.imei or imei_of(device.dev_id)
        try:
            key = bootstrap.mac_key(security, network_id=network_id, pin=pin)
        except ValueError as exc:
            raise InvalidRequest(str(exc), where="security") from None
        client_nonce, server_nonce = os.urandom(16), os.urandom(16)
        account = DmAccount(server_id=server_id or self.config.server_id,
                            client_name=client_name or f"dm{secrets.token_hex(6)}",
                            client_password=new_secret(), server_password=new_secret(),
                            client_nonce=b64(client_nonce), server_nonce=b64(server_nonce))
        # pending until the device uses it: a bootstrap that is lost on the way must not
        # lock the device out of the account it has
        await self.store.update_device(device.dev_id, {"pending_account": account})
        self._by_username[account.client_name] = device.dev_id
        now = self.clock()
        task = await self._create(Task(
            task_id=new_id("t"), dev_id=device.dev_id,
            op=BootstrapOp(account=account, security=security),  # type: ignore[arg-type]
            state=S.PENDING, next_attempt=None, deadline=now + self.config.task_ttl))
        if not deliver:
            return task.task_id
        msg = bootstrap.build_message(bootstrap.BootstrapAccount(
            server_id=account.server_id, server_url=self.config.server_url,
            client_name=account.client_name, client_password=account.client_password or "",
            client_nonce=client_nonce, server_password=account.server_password or "",
            server_nonce=server_nonce), device.dev_id)
        body, content_type = bootstrap.secure(msg, security, key)
        if self.gateway is None or not device.msisdn:
            await self._finish(task, S.FAILED, "no gateway or no MSISDN to deliver the bootstrap")
            return task.task_id
        try:
            delivery = await self.gateway.send_bootstrap(device.msisdn, body, content_type)
        except GatewayError as exc:
            await self._finish(task, S.FAILED, f"bootstrap not delivered: {exc}")
            return task.task_id
        await self._move(task.task_id, S.NOTIFIED,
                                    cause=f"bootstrap {delivery.state.value} by {delivery.gateway}",
                                    changes={"attempts": 1})
        return task.task_id

    # --- notification, retries, expiry ---------------------------------------------------

    async def notify(self, task: Task) -> Task:
        """Sends package #0 for ``task``'s device and moves the task to NOTIFIED (or keeps it
        PENDING with a later retry when the gateway failed for now)."""
        now = self.clock()
        device = await self.store.get_device(task.dev_id)
        acc = device.account
        delay = self._retry_delay(task.attempts)
        if self.gateway is None or not device.msisdn or acc is None:
            # Nothing to wake it with: the task waits for the device's own session.
            why = ("no notification gateway" if self.gateway is None else
                   "device has no MSISDN" if not device.msisdn else "device has no DM account")
            return await self._move(task.task_id, task.state, cause=f"waiting: {why}",
                                               changes={"next_attempt": now + delay})
        if acc.client_name:
            self._by_username[acc.client_name] = device.dev_id
        session_id = self._new_session_id()
        resync = self.config.resync_after is not None and task.attempts >= self.config.resync_after
        if resync:
            # the device may have lost its nonces: sign with the well-known one and let its
            # package 1 use it too for a while (the session then hands out fresh nonces)
            acc = msgspec.structs.replace(acc, resync_until=now + self.config.resync_window)
            await self.store.update_device(device.dev_id, {"account": acc})
        try:
            pkg0 = self._pkg0(acc, task, resync, session_id)
        except CodecError as exc:
            # the record cannot be notified at all (a server id too long for package #0, no
            # server credentials): this task fails with the cause, the others go on
            return await self._move(task.task_id, S.FAILED, cause=f"package #0 not built: {exc}",
                                    changes={"finished": now, "next_attempt": None})
        # NOTIFIED is written before the send: a fast device may open its session (and move
        # the task to IN_PROGRESS) before the gateway call returns.
        task = await self._move(
            task.task_id, S.NOTIFIED,
            cause=f"package #0{' (nonce re-synchronisation)' if resync else ''} sent via "
                  f"{self.gateway.name} (session {session_id:X})",
            changes={"next_attempt": now + delay, "attempts": task.attempts + 1})
        try:
            await self.gateway.send(device.msisdn, pkg0)
        except GatewayError as exc:
            if self.metrics is not None:
                self.metrics.notification("failed")
            current = await self.store.get_task(task.task_id)
            if current.state != S.NOTIFIED:
                return current                 # the device came anyway
            if exc.retryable:
                return await self._move(
                    task.task_id, S.PENDING, cause=f"notification failed, will retry: {exc}")
            return await self._move(
                task.task_id, S.FAILED, cause=f"notification refused: {exc}",
                changes={"finished": now, "next_attempt": None})
        if self.metrics is not None:
            self.metrics.notification("sent")
        return task

    def _pkg0(self, acc: DmAccount, task: Task, resync: bool, session_id: int) -> bytes:
        return build_pkg0(acc.server_id, acc.server_password or None,
                          self.config.resync_nonce if resync else _nonce(acc.server_nonce),
                          session_id,
                          ui_mode=3 if task.b_optin else self.config.notify_ui_mode, initiator=1,
                          server_key=acc.server_key.encode() if acc.server_key else None)

    @staticmethod
    def _new_session_id() -> int:
        """The SessionID package #0 names: 16 bits from the system's random source (whoever
        sees a few of them must not be able to tell the next)."""
        return secrets.randbelow(0xFFFF) + 1

    def _retry_delay(self, attempts: int) -> float:
        d = self.config.retry_delays
        return d[min(attempts, len(d) - 1)]

    async def tick(self) -> int:
        """One scheduler pass: expire tasks past their deadline, re-notify devices that did
        not connect.  Returns how many tasks it touched."""
        now = self.clock()
        touched = 0
        for task in await self.store.tasks_expiring(now):
            if task.state in FINAL_TASK_STATES:
                continue
            await self._guarded(task, self._finish(task, S.EXPIRED,
                                                   "deadline passed before the device answered"))
            touched += 1
        for task in await self.store.tasks_due(now):
            if task.state not in (S.PENDING, S.NOTIFIED) or self._in_session(task.task_id):
                continue
            if isinstance(task.op, BootstrapOp):
                continue
            if task.attempts >= self.config.max_notifications:
                await self._guarded(task, self._finish(
                    task, S.EXPIRED, f"device did not connect after {task.attempts} notifications"))
            else:
                await self._guarded(task, self.notify(task))
            touched += 1
        return touched

    async def _guarded(self, task: Task, step: Awaitable[Any]) -> None:
        """One task's step of a scheduler pass: a store error is left for the next pass; any
        other fault fails that task with its cause instead of ending the pass (and with it
        every other task's notifications, retries and expiry)."""
        try:
            await step
        except StoreError:
            raise
        except Exception as exc:
            log.exception("scheduler: task %s failed", task.task_id)
            try:
                await self._finish(task, S.FAILED, f"internal error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("scheduler: task %s could not be failed", task.task_id)

    async def run(self) -> None:
        """The scheduler loop (until cancelled).  It is supervised: a failed pass is logged,
        counted and retried after ``tick_interval``; ``health()`` reports passes that keep
        failing and a loop that is gone."""
        while True:
            try:
                await self.tick()
            except Exception as exc:           # (CancelledError is not an Exception)
                log.exception("scheduler pass failed")
                self.failed_passes += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            else:
                self.failed_passes = 0
                self.last_error = None
            self.last_pass = self.clock()
            await asyncio.sleep(self.config.tick_interval)

    def health(self) -> list[str]:
        """What is wrong with the scheduler, for ``/health`` (empty when nothing is)."""
        problems = []
        loop = self._loop_task
        if loop is None:
            problems.append("scheduler not started")
        elif loop.done():
            why = "cancelled" if loop.cancelled() else repr(loop.exception())
            problems.append(f"scheduler loop ended: {why}")
        if self.failed_passes >= 3:
            problems.append(f"scheduler: {self.failed_passes} passes failed in a row "
                            f"(last: {self.last_error})")
        return problems

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None

    def _in_session(self, task_id: str) -> bool:
        return any(task_id in w.runs and not w.runs[task_id].done
                   for w in self._sessions.values())

    # --- the device port's handler ---------------------------------------------------------

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
                              client_nonce=_nonce(acc.client_nonce) if acc.client_nonce else None,
                              server_id=acc.server_id,
                              server_secret=acc.server_password or None,
                              server_key=None if acc.server_password else acc.server_key,
                              server_nonce=_nonce(acc.server_nonce) if acc.server_nonce else None,
                              resync=acc.resync_until is not None and self.clock() < acc.resync_until)

    async def on_events(self, session: Any, events: list[Any]) -> None:
        if not getattr(session, "authenticated", False):
            # Nothing a device sends acts before its session authenticated: not a Generic
            # Alert, not a nonce, not DevInfo.  What such a session reports is only its end.
            work = self._sessions.pop(id(session), None)
            if work is not None:
                await self._settle(work, "session ended before it authenticated")
            return
        work = self._sessions.setdefault(id(session), _SessionWork())
        for ev in events:
            try:
                await self._on_event(session, work, ev)
            except StoreError as exc:
                # An outcome that cannot be recorded (disk full, writer gone) must not be
                # acknowledged: the error ends the session (the device is told 500) and its
                # tasks are tried again later, instead of the session going on without them.
                log.error("store failed while handling %s: %s", type(ev).__name__, exc)
                raise

    async def on_session_closed(self, session: Any, reason: str) -> None:
        work = self._sessions.pop(id(session), None)
        if work is not None:
            await self._settle(work, f"session closed ({reason})")

    async def _on_event(self, session: Any, work: _SessionWork, ev: Any) -> None:
        if isinstance(ev, DeviceIdentified):
            await self._on_identified(session, work, ev)
        elif isinstance(ev, StatusReceived):
            await self._on_status(session, work, ev)
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
                await self._retry_later(run.task, f"session ended before the device answered "
                                                  f"({ev.reason})")
        elif isinstance(ev, Authenticated):
            work.authenticated = ev          # its account change goes with _on_identified's write
            await self._adopt_pending_account(session, work, ev)
        elif isinstance(ev, NonceIssued):
            await self._save_nonce(session, work, "client_nonce", ev.nonce)
        elif isinstance(ev, ServerNonceReceived):
            await self._save_nonce(session, work, "server_nonce", ev.nonce)
        elif isinstance(ev, SessionEnded):
            self._sessions.pop(id(session), None)
            await self._settle(work, f"session ended ({ev.reason})")

    async def _adopt_pending_account(self, session: Any, work: _SessionWork,
                                     ev: Authenticated) -> None:
        """The device proved its bootstrapped account: it becomes the account (before the
        nonces this session issues are saved into it)."""
        device = await self._session_record(session, work)
        pending = device.pending_account if device is not None else None
        if device is None or pending is None or ev.username != pending.client_name:
            return
        await self.store.update_device(device.dev_id, {"account": pending,
                                                       "pending_account": None})

    @staticmethod
    def _after_authentication(acc: DmAccount | None, ev: Authenticated | None) -> DmAccount | None:
        """The account once the device authenticated, when that changes it (else None): a
        re-synchronisation is over; the device holds the nonce the session issued
        (NonceIssued), and for us the well-known one it used, until it sends another
        (ServerNonceReceived)."""
        if acc is None or ev is None:
            return None
        if ev.resync_nonce is not None:
            return msgspec.structs.replace(acc, server_nonce=b64(ev.resync_nonce), resync_until=None)
        if acc.resync_until is not None:
            return msgspec.structs.replace(acc, resync_until=None)
        return None

    async def _save_nonce(self, session: Any, work: _SessionWork, slot: str,
                          nonce: bytes) -> None:
        """Stores a rotated nonce in the record whose account this (authenticated) session
        proved: the one account_for found for its Source and user name, never a record an
        unverified Source merely names."""
        device = await self._session_record(session, work)
        if device is None or device.account is None:
            return
        acc = msgspec.structs.replace(device.account, **{slot: b64(nonce)})
        await self.store.update_device(device.dev_id, {"account": acc})

    async def _session_record(self, session: Any, work: _SessionWork) -> Device | None:
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

    async def _on_identified(self, session: Any, work: _SessionWork, ev: DeviceIdentified) -> None:
        record = await self._record_for(ev.dev_id, getattr(session, "username", None))
        if record is None:
            log.info("unknown device %s connected; nothing to do", ev.dev_id)
            return
        work.dev_id = record.dev_id
        now = self.clock()
        changes: dict[str, Any] = {"last_contact": now,
                                   "devinfo": {f"./DevInfo/{k}": str(v) for k, v in ev.devinfo.items()}}
        account = self._after_authentication(record.account, work.authenticated)
        if account is not None:
            changes["account"] = account
        work.authenticated = None
        await self.store.update_device(record.dev_id, changes)
        tasks = await self._open_tasks(record.dev_id)
        for task in tasks:
            if isinstance(task.op, BootstrapOp):
                if getattr(session, "username", None) != task.op.account.client_name:
                    continue                   # still on its old account: not arrived yet
                # The first session with the bootstrapped account: the bootstrap worked.
                task = await self._move(task.task_id, S.IN_PROGRESS,
                                                   cause="device connected with the new account")
                await self._finish(task, S.SUCCEEDED, "device opened a session with the new account")
                continue
            if task.state == S.IN_PROGRESS and _waiting_alert(task):
                continue                       # FUMO: the result comes as a Generic Alert
            if self._in_session(task.task_id):
                continue                       # another live session of the device has it
            if ev.dev_id != record.dev_id:
                decision = await check_device_policy(task.accept_device_policy, record, ev.dev_id,
                                                     task_id=task.task_id,
                                                     callback=self.carrier_callback)
                if not decision.accept:
                    await self._finish(task, S.FAILED, decision.cause)
                    continue
            await self._start_task(session, work, task)

    async def _record_for(self, reported: str | None, username: str | None) -> Device | None:
        """The device record a connecting device stands for: by its DevId, by the IMEI in it,
        or (a replaced phone answering a notification) by the DM account it authenticates with."""
        candidates: list[Callable[[], Awaitable[Device]]] = []
        if reported:
            candidates.append(lambda: self.store.get_device(reported))
            imei = imei_of(reported)
            if imei:
                candidates.append(lambda: self.store.device_by_imei(imei))
        if username and username in self._by_username:
            candidates.append(lambda: self.store.get_device(self._by_username[username]))
        for lookup in candidates:
            try:
                return await lookup()
            except NotFound:
                continue
        return None

    async def _open_tasks(self, dev_id: str) -> list[Task]:
        tasks = await all_pages(lambda c: self.store.tasks_by_device(dev_id, cursor=c))
        return [t for t in tasks if t.state not in FINAL_TASK_STATES]

    async def _start_task(self, session: Any, work: _SessionWork, task: Task) -> None:
        run = _TaskRun(task=task)
        work.runs[task.task_id] = run
        if task.b_optin:
            task = await self._move(task.task_id, S.WAITING_USER,
                                               cause="asking the user (opt-in)",
                                               changes={"next_attempt": None})
            run.task = task
            params = f"MAXDT={self.config.optin_timeout}&DR=1"
            session.queue((task.task_id, "optin"), Command(
                name="Alert", data="1101",
                items=[Item(data=params), Item(data=self.config.optin_text)]))
            run.outstanding = 1
            return
        task = await self._move(task.task_id, S.IN_PROGRESS,
                                           cause="device connected; commands sent",
                                           changes={"next_attempt": None})
        run.task = task
        await self._queue_work(session, run)

    async def _queue_work(self, session: Any, run: _TaskRun) -> None:
        task = run.task
        try:
            commands = await self._session_commands(session, task)
        except ServiceError as exc:
            run.done = True
            await self._finish(task, S.FAILED, str(exc))
            return
        for i, cmd in enumerate(commands):
            session.queue((task.task_id, "cmd", i), cmd)
        run.outstanding = len(commands)
        if not commands:
            run.done = True
            await self._finish(task, S.SUCCEEDED, "nothing to do")

    @staticmethod
    def _template_key(task: Task) -> tuple[Any, ...] | None:
        """What a task's commands depend on, when that is the operation alone (QUERY, SET,
        EXEC with its correlator, DIAG naming its nodes); None when they depend on the device
        too (UPDATE: its content and FUMO node; DIAG from the capability)."""
        op = task.op
        if isinstance(op, (QueryOp, SetOp)) or (isinstance(op, DiagOp) and op.nodes):
            return (msgspec.msgpack.encode(op),)
        if isinstance(op, ExecOp):
            return (msgspec.msgpack.encode(op), task.correlator)
        return None

    async def _session_commands(self, session: Any, task: Task) -> list[Any]:
        """The commands to queue for ``task``: for our own session engine, the operation's
        prepared commands, shared with every other task of the same operation."""
        key = self._template_key(task) if isinstance(session, DmSession) else None
        if key is not None:
            hit = self._templates.get(key)
            if hit is not None:
                return hit
        commands = await self._commands_for(task)
        if key is None:
            return commands
        try:
            prepared = [prepare(c) for c in commands]
        except CommandRejected:
            return commands                     # queue() refuses them and says why
        if len(self._templates) >= TEMPLATE_CACHE_SIZE:
            del self._templates[next(iter(self._templates))]     # the oldest
        self._templates[key] = prepared
        return prepared

    async def _commands_for(self, task: Task) -> list[Command]:
        op = task.op
        if isinstance(op, QueryOp):
            return [Command(name="Get", items=[Item(target=u) for u in op.nodes])]
        if isinstance(op, DiagOp):
            nodes = list(op.nodes) or list(await self._diag_nodes(task))
            return [Command(name="Get", items=[Item(target=u) for u in nodes])]
        if isinstance(op, SetOp):
            out = []
            for ch in op.changes:
                meta = None
                if ch.format != "chr" or ch.type:
                    meta = Meta(format=ch.format if ch.format != "chr" else None, type=ch.type)
                item = Item(target=ch.uri, meta=meta,
                            data=None if ch.action == "Delete" else (ch.value or ""))
                out.append(Command(name=ch.action, items=[item]))
            return out
        if isinstance(op, ExecOp):
            return [Command(name="Exec", correlator=task.correlator,
                            items=[Item(target=op.uri, data=op.data)])]
        if isinstance(op, UpdateOp):
            device = await self.store.get_device(task.dev_id)
            content, fumo, mode = await self._content_for(op, device)
            url = f"{self.config.content_base_url.rstrip('/')}/{content.content_id}"
            node = "Download" if mode == FumoMode.DOWNLOAD_THEN_UPDATE else "DownloadAndUpdate"
            return [
                Command(name="Replace", items=[Item(target=f"{fumo}/{node}/PkgURL", data=url)]),
                Command(name="Exec", correlator=task.correlator,
                        items=[Item(target=f"{fumo}/{node}")]),
            ]
        raise ServiceError(f"operation {type(op).__name__} cannot run in a DM session",
                           where="operation")

    async def _diag_nodes(self, task: Task) -> tuple[str, ...]:
        device = await self.store.get_device(task.dev_id)
        cap = await self._capability(device)
        if cap is not None and "diag" in cap.mo_paths:
            return tuple(p.strip() for p in cap.mo_paths["diag"].split(",") if p.strip())
        return self.config.diag_nodes

    async def _capability(self, device: Device) -> Capability | None:
        if not device.capability:
            return None
        try:
            return await self.store.get_capability(device.capability)
        except NotFound:
            return None

    async def _content_for(self, op: UpdateOp, device: Device) -> tuple[Content, str, FumoMode]:
        """The firmware package of an UPDATE: the one named, or the one the content store picks
        for the device's capability and current firmware (the DevDetail/FwV snapshot, learned
        from its sessions).  Raises ServiceError naming the field when none fits."""
        cap = await self._capability(device)
        fw = device.devdetail.get("./DevDetail/FwV")
        if op.content_id is None and not (fw and device.capability and self.content):
            raise ServiceError("the device's capability or firmware version is unknown: name the "
                               "content, or read ./DevDetail/FwV first (QUERY or DIAG)",
                               where="operation.content_id")
        if self.content is not None and device.capability and fw:
            try:
                content = await self.content.pick_for_update(device.capability, fw, op.content_id)
            except ServiceError as exc:
                raise ServiceError(str(exc), where=f"operation.{exc.where or 'content_id'}") \
                    from None
        else:
            content_id = op.content_id
            assert content_id is not None      # None without a known firmware raised above
            try:
                content = await self.store.get_content(content_id)
            except NotFound:
                raise UnknownResource(f"no content {content_id!r}",
                                      where="operation.content_id") from None
            if content.capability and device.capability and \
                    content.capability != device.capability:
                raise ServiceError(f"content {content.content_id} is for capability "
                                   f"{content.capability}, the device is {device.capability}",
                                   where="operation.content_id")
        fumo = op.fumo_path or (cap.mo_paths.get("fumo") if cap else None) \
            or self.config.default_fumo_path
        mode = cap.fumo_mode if cap else FumoMode.DOWNLOAD_AND_UPDATE
        return content, fumo.rstrip("/"), mode

    def _run_of(self, work: _SessionWork, handle: Any) -> _TaskRun | None:
        if not isinstance(handle, tuple) or not handle:
            return None
        run = work.runs.get(handle[0])
        if run is None or run.done:
            return None
        return run

    async def _on_status(self, session: Any, work: _SessionWork, ev: StatusReceived) -> None:
        run = self._run_of(work, ev.handle)
        if run is None or ev.handle[1] == "optin":
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
            run.failed = (f"{ev.cmd} {ev.target or ''} failed with status {ev.status}".strip(),
                          ev.status)
        if ev.cmd == "Exec" and isinstance(run.task.op, UpdateOp) and status_is_success(ev.status):
            run.waiting_alert = True
        if run.outstanding <= 0:
            await self._complete(run)

    async def _complete(self, run: _TaskRun) -> None:
        run.done = True
        task = run.task
        learned = {k: v for k, v in run.nodes.items() if k.startswith("./DevDetail/")}
        if learned:       # keep the device's DevDetail snapshot (firmware version for UPDATE)
            try:
                device = await self.store.get_device(task.dev_id)
                await self.store.update_device(task.dev_id,
                                               {"devdetail": {**device.devdetail, **learned}})
            except NotFound:
                pass
        before = task.result or TaskResult()        # earlier sessions of the same task
        result = TaskResult(statuses={**before.statuses, **run.statuses},
                            nodes={**before.nodes, **run.nodes}, fumo_result=before.fumo_result)
        if run.failed is not None:
            cause, status = run.failed
            await self._finish(task, S.FAILED, cause, dm_status=status or None, result=result)
        elif run.waiting_alert:
            await self._move(task.task_id, S.IN_PROGRESS,
                                        cause="firmware update accepted; waiting for the result "
                                              "alert", changes={"result": result})
        else:
            await self._finish(task, S.SUCCEEDED, "all commands succeeded", result=result)

    async def _on_user_answer(self, session: Any, work: _SessionWork,
                              ev: UserAlertAnswered) -> None:
        run = self._run_of(work, ev.handle)
        if run is None:
            return
        task = run.task
        if ev.status == 200:
            run.task = await self._move(task.task_id, S.IN_PROGRESS,
                                                   cause="the user accepted", dm_status=200)
            await self._queue_work(session, run)
            return
        run.done = True
        if ev.status == 304:
            await self._finish(task, S.FAILED, "declined by the user", dm_status=304)
        elif ev.status == 408:
            await self._finish(task, S.EXPIRED, "the user did not answer in time", dm_status=408)
        elif ev.status == 214:
            await self._finish(task, S.FAILED, "cancelled by the user", dm_status=214)
        else:
            await self._finish(task, S.FAILED, f"the device could not ask the user "
                                                f"(status {ev.status})", dm_status=ev.status)

    async def _on_generic_alert(self, session: Any, work: _SessionWork, ev: GenericAlert) -> None:
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
        try:
            code = int(_text(ev.data).strip())
        except ValueError:
            await self._finish(task, S.FAILED, f"unreadable FUMO result {ev.data!r}")
            return
        kind = (ev.type or "").removeprefix(_FUMO_TYPE_PREFIX)
        result = msgspec.structs.replace(task.result or TaskResult(), fumo_result=code)
        if not fumo_result_is_success(code):
            await self._finish(task, S.FAILED, f"firmware {kind or 'update'} failed: {code} "
                                               f"{describe_fumo_result(code)}",
                               result_code=code, result=result)
            return
        if kind == "download" and isinstance(task.op, UpdateOp):
            # Download then Update: the package is on the device; install it now, in this session.
            device = await self.store.get_device(task.dev_id)
            _content, fumo, _mode = await self._content_for(task.op, device)
            correlator = f"{task.task_id}.u"
            task = await self._move(task.task_id, S.IN_PROGRESS,
                                               cause="download complete; installing",
                                               result_code=code,
                                               changes={"correlator": correlator,
                                                        "result": result})
            run = _TaskRun(task=task, outstanding=1)
            work.runs[task.task_id] = run
            session.queue((task.task_id, "cmd", 0), Command(
                name="Exec", correlator=correlator, items=[Item(target=f"{fumo}/Update")]))
            return
        await self._forget_firmware(task.dev_id)   # the old FwV is stale now
        await self._finish(task, S.SUCCEEDED, f"firmware updated: {code} "
                                              f"{describe_fumo_result(code)}",
                           result_code=code, result=result)

    async def _forget_firmware(self, dev_id: str) -> None:
        try:
            device = await self.store.get_device(dev_id)
        except NotFound:
            return
        if "./DevDetail/FwV" in device.devdetail:
            snapshot = {k: v for k, v in device.devdetail.items() if k != "./DevDetail/FwV"}
            await self.store.update_device(dev_id, {"devdetail": snapshot})

    async def _settle(self, work: _SessionWork, why: str) -> None:
        """The session is over: tasks it did not finish go back for a retry."""
        for run in work.runs.values():
            if run.done:
                continue
            run.done = True
            if run.outstanding > 0 or run.task.state == S.WAITING_USER:
                await self._retry_later(run.task, f"{why} before the device answered")
            else:
                await self._complete(run)

    async def _retry_later(self, task: Task, cause: str) -> None:
        try:
            current = await self.store.get_task(task.task_id)
        except NotFound:
            return
        if current.state in FINAL_TASK_STATES:
            return
        if current.state == S.WAITING_USER:
            # No answer to the opt-in question before the session ended: ask again next time.
            current = await self._move(task.task_id, S.IN_PROGRESS, cause=cause)
        await self._move(task.task_id, S.PENDING, cause=cause,
                                    changes={"next_attempt": self.clock()
                                             + self._retry_delay(current.attempts)})

    async def _finish(self, task: Task, state: TaskState, cause: str, *,
                      dm_status: int | None = None, result_code: int | None = None,
                      result: TaskResult | None = None) -> Task | None:
        changes: dict[str, Any] = {"finished": self.clock(), "next_attempt": None}
        if result is not None:
            changes["result"] = msgspec.structs.replace(result, message=cause)
        enqueue: list[OutboxEntry] = []
        if state == S.SUCCEEDED and not task.test_cycle:
            enqueue.append(OutboxEntry(
                entry_id=new_id("o"), kind="charging", due=self.clock(),
                payload={"event": "task_succeeded", "task_id": task.task_id,
                         "dev_id": task.dev_id,
                         "operation": operation_name(task.op),
                         "job_id": task.job_id}))
        try:
            return await self._move(task.task_id, state, cause=cause,
                                               dm_status=dm_status, result_code=result_code,
                                               changes=changes, enqueue=enqueue)
        except StoreError as exc:
            # A task cancelled meanwhile is final already: its late outcome is dropped.
            log.info("task %s not moved to %s: %s", task.task_id, state.value, exc)
            return None


def _waiting_alert(task: Task) -> bool:
    if not isinstance(task.op, UpdateOp) or task.result is None:
        return False
    return any(k.startswith("Exec") and status_is_success(v) for k, v in task.result.statuses.items())


def _nonce(text: str | None) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        return text.encode()


def _text(data: Any) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return str(data)


__all__ = ["Broker", "BrokerConfig", "TaskData", "task_data"]
