"""The deployment broker (L4): IDeploymentBrokerServices for one device at a time, and the
assembly of the L4 services the device port and the API use.

``doOperation`` creates a task and wakes the device with package #0; ``doBootstrap`` gives a
device a fresh DM account.  The work itself is done by one module per concern:

* :mod:`dmengine.tasks` — task creation, state moves, the end of a task and its outbox entries;
* :mod:`dmengine.commands` — operation → SyncML commands, prepared once per operation;
* :mod:`dmengine.sessions` — the device port's handler: session events → task progress;
* :mod:`dmengine.bulk` — jobs: selection, creation, control, counts;
* :mod:`dmengine.scheduler` — DMSCHED: jobs' pacing, windows, stages and stop rules,
  notifications, retries, expiry, the supervised loop.

The broker is the device port's ``DeviceHandler`` through its ``sessions`` (``account_for``,
``on_events`` and ``on_session_closed`` are theirs).  It keeps only per-session bookkeeping in
memory; everything a restart needs is in the store.
"""
from __future__ import annotations

import base64
import collections
import logging
import os
import secrets
import time
from typing import Any, Callable

from . import bootstrap
from .bulk import Jobs
from .commands import TEMPLATE_CACHE_SIZE, Commands
from .config import BrokerConfig
from .content import ContentService
from .devices import CarrierCallback, imei_of
from .errors import GatewayError, InvalidRequest, NotFound, UnknownResource
from .identity import current_owner
from .metrics import TaskMetrics
from .model import (BootstrapOp, Device, DiagOp, DmAccount, HistoryEntry, Task, TaskState,
                    UpdateOp, new_id)
from .notify.base import Gateway
from .scheduler import Scheduler
from .sessions import DeviceSessions
from .store.base import DEFAULT_PAGE, Page, Store
from .tasks import TaskData, Tasks, operation_name, task_data

log = logging.getLogger("dmengine.broker")

S = TaskState


def new_secret(nbytes: int = 12) -> str:
    return secrets.token_urlsafe(nbytes)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Broker:
    """doOperation / doBootstrap / getTaskById / getTaskHistory / cancelTask, over the L4
    services it assembles (``tasks``, ``commands``, ``sessions``, ``jobs``, ``scheduler``)."""

    def __init__(self, store: Store, gateway: Gateway | None, *,
                 config: BrokerConfig | None = None,
                 clock: Callable[[], float] = time.time,
                 carrier_callback: CarrierCallback | None = None,
                 content: ContentService | None = None,
                 metrics: TaskMetrics | None = None) -> None:
        self.store = store
        self.gateway = gateway
        self.config = config or BrokerConfig()
        self.clock = clock
        self.content = content
        self.tasks = Tasks(store, self.config, metrics, clock)
        self.commands = Commands(store, self.config, content)
        self.sessions = DeviceSessions(store, self.tasks, self.commands, self.config,
                                       carrier_callback=carrier_callback, clock=clock)
        self.jobs = Jobs(store, self.tasks, self.config, clock,
                         carrier_callback_configured=carrier_callback is not None)
        self.scheduler = Scheduler(store, self.tasks, self.sessions, self.jobs, gateway,
                                   self.config, metrics=metrics, clock=clock)

    # --- the device port's handler, the scheduler ------------------------------------------

    @property
    def carrier_callback(self) -> CarrierCallback | None:
        return self.sessions.carrier_callback

    @carrier_callback.setter
    def carrier_callback(self, callback: CarrierCallback | None) -> None:
        self.sessions.carrier_callback = callback
        self.jobs.carrier_callback_configured = callback is not None

    async def account_for(self, dev_id: str | None, username: str | None) -> Any:
        return await self.sessions.account_for(dev_id, username)

    async def on_events(self, session: Any, events: list[Any]) -> None:
        await self.sessions.on_events(session, events)

    async def on_session_closed(self, session: Any, reason: str) -> None:
        await self.sessions.on_session_closed(session, reason)

    async def tick(self) -> int:
        return await self.scheduler.tick()

    def start(self) -> None:
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()

    def health(self) -> list[str]:
        return self.scheduler.health()

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
                           notify: bool = True, owner: str | None = None) -> str:
        """Creates the task for ``op`` (an UpdateOp/QueryOp/SetOp/ExecOp/DiagOp) on one device,
        sends the first notification, and returns the task id.  ``owner``: who asked (default:
        the system of the API call being served, :func:`dmengine.identity.current_owner`)."""
        if isinstance(op, BootstrapOp):
            raise InvalidRequest("use doBootstrap for BOOTSTRAP", where="operation")
        if accept_device_policy == 40 and self.carrier_callback is None:
            # refused now, not when the device answers with another IMEI days later
            raise InvalidRequest("acceptDevicePolicy 40 asks the carrier, and no carrier "
                                 "callback is configured", where="acceptDevicePolicy")
        device = await self.resolve_target(msisdn=msisdn, imei=imei, dev_id=dev_id)
        if isinstance(op, UpdateOp):
            await self.commands.content_for(op, device)          # refuse a package that cannot fit now
        now = self.clock()
        task_id = new_id("t")
        task = Task(task_id=task_id, dev_id=device.dev_id, op=op, job_id=job_id,
                    b_optin=b_optin, accept_device_policy=accept_device_policy,  # type: ignore[arg-type]
                    test_cycle=test_cycle, state=S.PENDING, next_attempt=now,
                    deadline=deadline if deadline is not None else now + self.config.task_ttl,
                    correlator=task_id,
                    owner=owner if owner is not None else current_owner() or "")
        task = await self.tasks.create(task)
        if notify:
            await self.scheduler.notify(task)
        return task_id

    async def get_task_by_id(self, task_id: str) -> TaskData:
        return await self.tasks.get(task_id)

    async def get_task(self, task_id: str) -> Task:
        """The task record (what getTaskById shows); UnknownResource naming ``taskId``."""
        try:
            return await self.store.get_task(task_id)
        except NotFound:
            raise UnknownResource(f"no task {task_id!r}", where="taskId") from None

    async def get_task_history(self, task_id: str) -> list[HistoryEntry]:
        return await self.tasks.history(task_id)

    async def task_history_page(self, task_id: str, *, cursor: str | None = None,
                                limit: int = DEFAULT_PAGE) -> Page[HistoryEntry]:
        """getTaskHistory one page at a time, oldest entry first."""
        try:
            return await self.store.task_history(task_id, cursor=cursor, limit=limit)
        except NotFound:
            raise UnknownResource(f"no task {task_id!r}", where="taskId") from None

    async def get_diagnostics(self, *, dev_id: str | None = None, task_id: str | None = None,
                              limit: int = 10, owner: str | None = None) -> list[Task]:
        """getDiagnostics: the DIAG tasks of one device, the latest ``limit`` of them newest
        first (their results hold the values read), or the one DIAG task ``task_id``.
        ``owner``: only that system's tasks (None: every system's — an admin's view)."""
        if task_id is not None:
            try:
                task = await self.store.get_task(task_id)
            except NotFound:
                raise UnknownResource(f"no task {task_id!r}", where="taskId") from None
            if not isinstance(task.op, DiagOp):
                raise InvalidRequest(f"task {task_id!r} is a {operation_name(task.op)}, "
                                     "not a DIAG", where="taskId")
            if dev_id is not None and task.dev_id != dev_id:
                raise UnknownResource(f"device {dev_id!r} has no task {task_id!r}",
                                      where="taskId")
            return [task]
        if dev_id is None:
            raise InvalidRequest("name the device (devId) or the task (taskId)", where="devId")
        try:
            await self.store.get_device(dev_id)
        except NotFound:
            raise UnknownResource(f"no device {dev_id!r}", where="devId") from None
        latest: collections.deque[Task] = collections.deque(maxlen=limit)
        cursor: str | None = None
        while True:             # oldest first: the last ``limit`` DIAG tasks are the latest
            page = await self.store.tasks_by_device(dev_id, cursor=cursor)
            latest.extend(t for t in page.items if isinstance(t.op, DiagOp)
                          and (owner is None or t.owner == owner))
            cursor = page.next_cursor
            if cursor is None:
                break
        return list(reversed(latest))

    async def cancel_task(self, task_id: str, *, cause: str = "cancelled by the caller") -> Task:
        task = await self.tasks.cancel(task_id, cause)
        self.sessions.drop_task(task_id)      # a session working on it drops it
        return task

    async def do_bootstrap(self, *, msisdn: str | None = None, imei: str | None = None,
                           dev_id: str | None = None, server_id: str | None = None,
                           client_name: str | None = None, security: str = "NETWORKID",
                           pin: str | None = None, deliver: bool = True,
                           job_id: str | None = None, owner: str | None = None) -> str:
        """Gives the device a fresh DM account: generated credentials, stored with the device
        (API reads never show them), delivered as a DM-profile bootstrap message (WBXML with
        HMAC, PROTOCOL.md §10) through the gateway.  Returns the task id.  A bootstrap gets no
        response: the task SUCCEEDS when the device first opens a session with the new account.
        ``job_id``: the job the task belongs to (the list form of doBootstrap); ``owner``: who
        asked (default: the system of the API call being served).

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
        self.sessions.by_username[account.client_name] = device.dev_id
        now = self.clock()
        task = await self.tasks.create(Task(
            task_id=new_id("t"), dev_id=device.dev_id, job_id=job_id,
            op=BootstrapOp(account=account, security=security),  # type: ignore[arg-type]
            state=S.PENDING, next_attempt=None, deadline=now + self.config.task_ttl,
            owner=owner if owner is not None else current_owner() or ""))
        if not deliver:
            return task.task_id
        msg = bootstrap.build_message(bootstrap.BootstrapAccount(
            server_id=account.server_id, server_url=self.config.server_url,
            client_name=account.client_name, client_password=account.client_password or "",
            client_nonce=client_nonce, server_password=account.server_password or "",
            server_nonce=server_nonce), device.dev_id)
        body, content_type = bootstrap.secure(msg, security, key)
        if self.gateway is None or not device.msisdn:
            await self.tasks.finish(task, S.FAILED, "no gateway or no MSISDN to deliver the bootstrap")
            return task.task_id
        try:
            delivery = await self.gateway.send_bootstrap(device.msisdn, body, content_type)
        except GatewayError as exc:
            await self.tasks.finish(task, S.FAILED, f"bootstrap not delivered: {exc}")
            return task.task_id
        await self.tasks.move(task.task_id, S.NOTIFIED,
                              cause=f"bootstrap {delivery.state.value} by {delivery.gateway}",
                              changes={"attempts": 1})
        return task.task_id


__all__ = ["Broker", "BrokerConfig", "TaskData", "task_data", "operation_name",
           "TEMPLATE_CACHE_SIZE"]
