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
from typing import Any, Awaitable, Callable

import msgspec

from .config import BrokerConfig
from .errors import CodecError, GatewayError, StoreError
from .metrics import TaskMetrics
from .model import FINAL_TASK_STATES, BootstrapOp, DmAccount, Task, TaskState
from .notify.base import Gateway
from .notify.pkg0 import build_pkg0
from .sessions import DeviceSessions, stored_nonce
from .store.base import Store
from .tasks import Tasks

log = logging.getLogger("dmengine.scheduler")

S = TaskState
#: failed passes in a row after which health() reports the scheduler
FAILED_PASSES_UNHEALTHY = 3


class Scheduler:
    def __init__(self, store: Store, tasks: Tasks, sessions: DeviceSessions,
                 gateway: Gateway | None, config: BrokerConfig, *,
                 metrics: TaskMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.tasks = tasks
        self.sessions = sessions
        self.gateway = gateway
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.failed_passes = 0                 # scheduler passes failed in a row
        self.last_error: str | None = None
        self.last_pass: float | None = None
        self._loop_task: asyncio.Task[None] | None = None

    # --- notification ----------------------------------------------------------------------

    async def notify(self, task: Task) -> Task:
        """Sends package #0 for ``task``'s device and moves the task to NOTIFIED (or keeps it
        PENDING with a later retry when the gateway failed for now)."""
        now = self.clock()
        device = await self.store.get_device(task.dev_id)
        acc = device.account
        delay = self.tasks.retry_delay(task.attempts)
        if self.gateway is None or not device.msisdn or acc is None:
            # Nothing to wake it with: the task waits for the device's own session.
            why = ("no notification gateway" if self.gateway is None else
                   "device has no MSISDN" if not device.msisdn else "device has no DM account")
            return await self.tasks.move(task.task_id, task.state, cause=f"waiting: {why}",
                                         changes={"next_attempt": now + delay})
        if acc.client_name:
            self.sessions.by_username[acc.client_name] = device.dev_id
        session_id = self.new_session_id()
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
            return await self.tasks.move(task.task_id, S.FAILED,
                                         cause=f"package #0 not built: {exc}",
                                         changes={"finished": now, "next_attempt": None})
        # NOTIFIED is written before the send: a fast device may open its session (and move
        # the task to IN_PROGRESS) before the gateway call returns.
        task = await self.tasks.move(
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
                return await self.tasks.move(
                    task.task_id, S.PENDING, cause=f"notification failed, will retry: {exc}")
            return await self.tasks.move(
                task.task_id, S.FAILED, cause=f"notification refused: {exc}",
                changes={"finished": now, "next_attempt": None})
        if self.metrics is not None:
            self.metrics.notification("sent")
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
        """One scheduler pass: expire tasks past their deadline, re-notify devices that did
        not connect.  Returns how many tasks it touched."""
        now = self.clock()
        touched = 0
        for task in await self.store.tasks_expiring(now):
            if task.state in FINAL_TASK_STATES:
                continue
            await self._guarded(task, self.tasks.finish(
                task, S.EXPIRED, "deadline passed before the device answered"))
            touched += 1
        for task in await self.store.tasks_due(now):
            if task.state not in (S.PENDING, S.NOTIFIED) or self.sessions.in_session(task.task_id):
                continue
            if isinstance(task.op, BootstrapOp):
                continue
            if task.attempts >= self.config.max_notifications:
                await self._guarded(task, self.tasks.finish(
                    task, S.EXPIRED, f"device did not connect after {task.attempts} notifications"))
            else:
                await self._guarded(task, self.notify(task))
            touched += 1
        return touched

    async def _guarded(self, task: Task, step: Awaitable[Any]) -> None:
        """One task's step of a pass: a store error is left for the next pass; any other fault
        fails that task with its cause instead of ending the pass (and with it every other
        task's notifications, retries and expiry)."""
        try:
            await step
        except StoreError:
            raise
        except Exception as exc:
            log.exception("scheduler: task %s failed", task.task_id)
            try:
                await self.tasks.finish(task, S.FAILED,
                                        f"internal error: {type(exc).__name__}: {exc}")
            except Exception:
                log.exception("scheduler: task %s could not be failed", task.task_id)

    async def run(self) -> None:
        """The loop (until cancelled), supervised: a failed pass is logged, counted and tried
        again after ``tick_interval``."""
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

    def health(self) -> list[str]:
        """What is wrong with the scheduler, for ``/health`` (empty when nothing is)."""
        problems = []
        loop = self._loop_task
        if loop is None:
            problems.append("scheduler not started")
        elif loop.done():
            why = "cancelled" if loop.cancelled() else repr(loop.exception())
            problems.append(f"scheduler loop ended: {why}")
        if self.failed_passes >= FAILED_PASSES_UNHEALTHY:
            problems.append(f"scheduler: {self.failed_passes} passes failed in a row "
                            f"(last: {self.last_error})")
        return problems


__all__ = ["Scheduler"]
