"""Tasks (L4): creation, state moves, the end of a task and what it leaves in the outbox.

Every task write of the services goes through :class:`Tasks`, so that the metrics, the history
(the store writes an entry per move) and the events follow one rule, each outbox entry written
in the same transaction as the move:

* a task that reaches a final state leaves a ``task.finished`` event (topic ``task``: the store
  keeps it only while someone subscribes to task events, see dmengine/webhooks.py);
* a task that SUCCEEDS outside a test cycle leaves its IF-4 charging event (kind ``charging``:
  time, device — DevId, IMEI, MSISDN, DevInfo —, operation, package, result), which the store
  also appends to its charging log.

Task life (DESIGN.md §4): PENDING → NOTIFIED → IN_PROGRESS → (WAITING_USER) → SUCCEEDED |
FAILED | CANCELLED | EXPIRED.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import msgspec

from . import logs
from .config import BrokerConfig
from .errors import (Conflict, InvalidTransition, NotFound, ServiceError, StoreError,
                     UnknownResource)
from .metrics import TaskMetrics
from .model import (FINAL_TASK_STATES, ChargingEvent, Device, HistoryEntry, OutboxEntry, Task,
                    TaskResult, TaskState, UpdateOp, new_id)
from .store.base import Store, Waypoint, all_pages

log = logging.getLogger("dmengine.tasks")
_rng = random.Random()        # retry jitter: spreading load, nothing secret

S = TaskState


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


@dataclass
class Tasks:
    """The task writes of every L4 service (and their metrics)."""

    store: Store
    config: BrokerConfig
    metrics: TaskMetrics | None = None
    clock: Callable[[], float] = time.time

    async def create(self, task: Task) -> Task:
        task = await self.store.create_task(task)
        self.count_made([task])
        return task

    def count_made(self, tasks: Sequence[Task]) -> None:
        """The metrics of tasks the store just made, whichever write made them (one task,
        a job's batch, a target started early)."""
        if self.metrics is None or not tasks:
            return
        made = Counter((operation_name(t.op), t.state.value) for t in tasks)
        for (operation, state), n in made.items():
            self.metrics.task_created(operation, n)
            self.metrics.task_moved(state, n)

    async def move(self, task_id: str, to_state: TaskState, *, task: Task | None = None,
                   device: tuple[str, Mapping[str, Any]] | None = None, **kw: Any) -> Task:
        """One state move (``kw``: the store's ``transition`` arguments).  A move to a final
        state carries its ``task.finished`` event (``task``: the record as the caller read
        it, else it is read here for the event's fields).  ``device``: (DevId, changes) of a
        device update that goes in the same write (``Store.update_device_and_move``); it is
        written even when the move is refused, which then raises as without it."""
        if to_state in FINAL_TASK_STATES:
            if task is None:
                try:
                    task = await self.store.get_task(task_id)
                except NotFound:
                    task = None               # the move below says NotFound
            if task is not None and task.state not in FINAL_TASK_STATES \
                    and await self.store.has_subscribers("task"):
                kw["enqueue"] = [*kw.get("enqueue", ()), self.task_event(task, to_state, kw)]
        if device is not None:
            _, outcome = await self.move_with_device(device, task_id, to_state, **kw)
            if isinstance(outcome, StoreError):
                raise outcome
            return outcome
        task = await self.store.transition(task_id, to_state, **kw)
        self.moved(task, kw.get("cause"), kw.get("waypoint"))
        return task

    async def move_with_device(self, device: tuple[str, Mapping[str, Any]], task_id: str,
                               to_state: TaskState, **kw: Any) -> tuple[Device, Task | StoreError]:
        """A device update (DevId, changes) and a move of one of its tasks in one write
        (``Store.update_device_and_move``): the device as written, and the task moved or the
        store's refusal of the move (the device update stands either way).  A move to a final
        state goes through :meth:`move` (``device=``), which adds its event."""
        record, outcome = await self.store.update_device_and_move(device[0], device[1], task_id,
                                                                  to_state, **kw)
        if not isinstance(outcome, StoreError):
            self.moved(outcome, kw.get("cause"), kw.get("waypoint"))
        return record, outcome

    def moved(self, task: Task, cause: str | None, waypoint: Waypoint | None = None) -> None:
        """Counts a move the store made (and the waypoint it passed first): the store's
        writes that move tasks without :meth:`move` count theirs here."""
        if self.metrics is not None:
            if waypoint is not None:
                self.metrics.task_moved(waypoint[0].value)
            self.metrics.task_moved(task.state.value)
        if log.isEnabledFor(logging.DEBUG):     # one line per move: debug only (campaigns)
            log.debug("task moved to %s: %s", task.state.value, cause or "",
                      extra=logs.ids(task=task.task_id, job=task.job_id, device=task.dev_id))

    async def get(self, task_id: str) -> TaskData:
        try:
            return task_data(await self.store.get_task(task_id))
        except NotFound:
            raise UnknownResource(f"no task {task_id!r}", where="taskId") from None

    async def history(self, task_id: str) -> list[HistoryEntry]:
        return await all_pages(lambda c: self.store.task_history(task_id, cursor=c))

    async def open_for_device(self, dev_id: str) -> list[Task]:
        return await self.store.open_tasks_for_device(dev_id)

    async def cancel(self, task_id: str, cause: str) -> Task:
        try:
            task = await self.store.get_task(task_id)
        except NotFound:       # as get(): the 404 names the field, like the 409 below
            raise UnknownResource(f"no task {task_id!r}", where="taskId") from None
        if task.state in FINAL_TASK_STATES:
            raise ServiceError(f"task {task_id} is already {task.state.value}", where="taskId")
        return await self.move(task_id, S.CANCELLED, task=task, cause=cause,
                               changes={"finished": self.clock(), "next_attempt": None})

    def task_event(self, task: Task, state: TaskState, move: dict[str, Any]) -> OutboxEntry:
        """The ``task.finished`` event of ``task`` moving to the final ``state`` (``move``:
        the transition's arguments: cause, codes, the result among the changes)."""
        changes = move.get("changes") or {}
        result = changes.get("result", task.result)
        now = self.clock()
        return OutboxEntry(
            entry_id=new_id("ev"), kind="webhook", topic="task", due=now,
            payload={"type": "task.finished", "time": now, "task_id": task.task_id,
                     "job_id": task.job_id, "dev_id": task.dev_id,
                     "owner": getattr(task, "owner", ""),
                     "operation": operation_name(task.op), "state": state.value,
                     "cause": move.get("cause"), "dm_status": move.get("dm_status"),
                     "result_code": move.get("result_code"), "test_cycle": task.test_cycle,
                     "attempts": changes.get("attempts", task.attempts),
                     "result": msgspec.to_builtins(result) if result is not None else None})

    async def charging_event(self, task: Task, state: TaskState, cause: str, *,
                             result_code: int | None,
                             package: tuple[str, str | None] | None = None) -> OutboxEntry:
        """The IF-4 charging entry of a task that completed: the device as on record now
        (DevId, IMEI, MSISDN, DevInfo), the operation, the package (``package``: the content
        id and version the session used; else the one the UPDATE named) and the result."""
        now = self.clock()
        ev: dict[str, Any] = {"time": now, "task_id": task.task_id, "job_id": task.job_id,
                              "owner": getattr(task, "owner", ""), "dev_id": task.dev_id,
                              "operation": operation_name(task.op), "result": state.value,
                              "result_code": result_code, "cause": cause}
        try:
            device = await self.store.get_device(task.dev_id)
        except NotFound:
            device = None
        if device is not None:
            ev.update(imei=device.imei, msisdn=device.msisdn, devinfo=dict(device.devinfo))
        if package is None and isinstance(task.op, UpdateOp) and task.op.content_id:
            try:
                content = await self.store.get_content(task.op.content_id)
                package = (content.content_id, content.to_version)
            except NotFound:
                package = (task.op.content_id, None)
        if package is not None:
            ev.update(content_id=package[0], content_version=package[1])
        entry_id = new_id("ev")
        # the payload is the log's record (store/kv.py keeps it in the charging log)
        try:
            record = msgspec.convert({**ev, "event_id": entry_id}, ChargingEvent)
        except msgspec.ValidationError as exc:       # never keeps the task from finishing
            log.warning("charging event of task %s without its device details: %s",
                        task.task_id, exc)
            for k in ("imei", "msisdn", "devinfo", "cause"):
                ev.pop(k, None)
            record = msgspec.convert({**ev, "event_id": entry_id}, ChargingEvent)
        payload = msgspec.to_builtins(record)
        payload.pop("event_id", None)
        # topic: queued for delivery only while someone subscribes; logged in any case
        return OutboxEntry(entry_id=entry_id, kind="charging", topic="charging", due=now,
                           payload=payload)

    def retry_delay(self, attempts: int) -> float:
        """The wait before attempt ``attempts + 1``: the configured backoff with jitter."""
        d = self.config.retry_delays
        j = self.config.retry_jitter
        base = d[min(attempts, len(d) - 1)]
        return base * (1.0 + _rng.uniform(-j, j)) if j else base

    async def retry_later(self, task: Task, cause: str) -> None:
        """An interrupted task goes back to PENDING, due again after its backoff."""
        try:
            current = await self.store.get_task(task.task_id)
        except NotFound:
            return
        if current.state in FINAL_TASK_STATES:
            return
        if current.state == S.WAITING_USER:
            # No answer to the opt-in question before the session ended: ask again next time.
            current = await self.move(task.task_id, S.IN_PROGRESS, cause=cause)
        await self.move(task.task_id, S.PENDING, cause=cause,
                        changes={"next_attempt": self.clock() + self.retry_delay(current.attempts)})

    async def finish(self, task: Task, state: TaskState, cause: str, *,
                     dm_status: int | None = None, result_code: int | None = None,
                     result: TaskResult | None = None,
                     package: tuple[str, str | None] | None = None,
                     device: tuple[str, Mapping[str, Any]] | None = None,
                     waypoint: Waypoint | None = None) -> Task | None:
        """Moves ``task`` to a final state with its ``task.finished`` event; a success outside
        a test cycle queues its charging event in the same write (``package``: the content id
        and version an UPDATE installed, when the session knows it).  None when the task was
        final already (cancelled meanwhile: its late outcome is dropped).  ``device``: a
        device update written with the move (see :meth:`move`); ``waypoint``: a move the task
        makes first, in the same write (``Store.transition``)."""
        changes: dict[str, Any] = {"finished": self.clock(), "next_attempt": None}
        if result is not None:
            changes["result"] = msgspec.structs.replace(result, message=cause)
        enqueue: list[OutboxEntry] = []
        if state == S.SUCCEEDED and not task.test_cycle:
            enqueue.append(await self.charging_event(task, state, cause, result_code=result_code,
                                                     package=package))
        try:
            moved = await self.move(task.task_id, state, task=task, device=device, cause=cause,
                                    dm_status=dm_status, result_code=result_code,
                                    changes=changes, enqueue=enqueue, waypoint=waypoint)
            if enqueue and self.metrics is not None:
                self.metrics.charged(operation_name(task.op))
            return moved
        except (Conflict, InvalidTransition) as exc:
            # refused because the task is final already; a store that cannot write is not
            # caught here: its caller must not take the outcome as recorded
            log.info("task %s not moved to %s: %s", task.task_id, state.value, exc)
            return None


__all__ = ["Tasks", "TaskData", "task_data", "operation_name"]
