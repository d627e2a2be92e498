"""Issue 18, mutmut's survivors in dmengine/tasks.py: the task writes every L4 service makes,
driven against a real LMDB store with a fixed clock, each answer compared whole — the
``task.finished`` event and the IF-4 charging entry as queued in the outbox, the metrics,
the history, the refusals (their class, text and ``where``) and the retry backoff."""
from __future__ import annotations

import asyncio
import logging
import pathlib
from typing import Any, Awaitable, Callable

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from dmengine.config import BrokerConfig
from dmengine.errors import (InvalidTransition, NotFound, ServiceError, UnknownResource,
                             ValidationError)
from dmengine.metrics import TaskMetrics
from dmengine.model import (Content, Device, ExecOp, Job, OutboxEntry, QueryOp, Subscription,
                            Task, TaskResult, TaskState, UpdateOp)
from dmengine.store.lmdb import LmdbStore
from dmengine.tasks import Tasks, TaskData, operation_name, task_data

S = TaskState
NOW = 1_800_000_000.0
SHA = "ab" * 32


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, store: LmdbStore, tasks: Tasks, metrics: TaskMetrics, clock: Clock):
        self.store, self.tasks, self.metrics, self.clock = store, tasks, metrics, clock

    async def task(self, task_id: str = "t1", *, op: Any = None, state: TaskState = S.PENDING,
                   **kw: Any) -> Task:
        t = await self.tasks.create(Task(task_id=task_id, dev_id=kw.pop("dev_id", "IMEI:1"),
                                         op=op or QueryOp(nodes=["./DevInfo/Mod"]), **kw))
        if state != S.PENDING:
            t = await self.store.transition(task_id, state, cause="set up")
        return t

    async def subscribe(self, topic: str) -> None:
        await self.store.create_subscription(Subscription(
            sub_id=f"sub-{topic}", url="http://127.0.0.1:9/hook", topics=[topic],
            secret="s" * 32, all_owners=True))

    async def outbox(self) -> list[OutboxEntry]:
        return await self.store.due_entries(NOW + 10**6, limit=1000)


def run(tmp_path: pathlib.Path, scenario: Callable[[World], Awaitable[None]], *,
        config: BrokerConfig | None = None, metrics: bool = True) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=1 << 24)
        clock = Clock()
        m = TaskMetrics(CollectorRegistry())
        tasks = Tasks(store, config or BrokerConfig(), m if metrics else None, clock)
        try:
            await scenario(World(store, tasks, m, clock))
        finally:
            await store.close()
    asyncio.run(main())


# --- create, count_made ---------------------------------------------------------------------

def test_create_counts_the_task_by_operation_and_state(tmp_path):
    async def scenario(w: World) -> None:
        t = await w.task("t1")
        assert (await w.store.get_task("t1")).task_id == t.task_id == "t1"
        await w.task("t2", op=ExecOp(uri="./X"))
        await w.task("t3", op=ExecOp(uri="./Y"))
        assert w.metrics.created == {"QUERY": 1, "EXEC": 2}
        assert w.metrics.transitions == {"PENDING": 3}
    run(tmp_path, scenario)


def test_count_made_sums_a_batch_per_operation_and_state(tmp_path):
    async def scenario(w: World) -> None:
        batch = [Task(task_id=f"b{i}", dev_id="IMEI:1", op=QueryOp(nodes=["./A"]),
                      state=S.PENDING if i < 3 else S.NOTIFIED) for i in range(5)]
        batch.append(Task(task_id="u", dev_id="IMEI:1", op=UpdateOp(), state=S.PENDING))
        w.tasks.count_made(batch)
        assert w.metrics.created == {"QUERY": 5, "UPDATE": 1}
        assert w.metrics.transitions == {"PENDING": 4, "NOTIFIED": 2}
        w.tasks.count_made([])
        assert w.metrics.created == {"QUERY": 5, "UPDATE": 1}
    run(tmp_path, scenario)


def test_without_metrics_every_write_still_works(tmp_path):
    async def scenario(w: World) -> None:
        assert w.tasks.metrics is None
        await w.task("t1", state=S.IN_PROGRESS)
        w.tasks.count_made([await w.store.get_task("t1")])
        moved = await w.tasks.finish(await w.store.get_task("t1"), S.SUCCEEDED, "done")
        assert moved is not None and moved.state == S.SUCCEEDED
        assert w.metrics.created == {} and w.metrics.transitions == {}
        assert w.metrics.charging == {}
    run(tmp_path, scenario, metrics=False)


# --- move -------------------------------------------------------------------------------------

def _finished_payload(task: Task, state: str, **kw: Any) -> dict[str, Any]:
    p = {"type": "task.finished", "time": NOW, "task_id": task.task_id, "job_id": task.job_id,
         "dev_id": task.dev_id, "owner": task.owner, "operation": operation_name(task.op),
         "state": state, "cause": None, "dm_status": None, "result_code": None,
         "test_cycle": task.test_cycle, "attempts": task.attempts, "result": None}
    p.update(kw)
    return p


def test_a_final_move_queues_task_finished_while_someone_subscribes(tmp_path):
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        t = await w.task("t1", state=S.IN_PROGRESS, owner="crm", test_cycle=True)
        moved = await w.tasks.move("t1", S.FAILED, cause="bad", dm_status=404, result_code=7,
                                   changes={"attempts": 3,
                                            "result": TaskResult(statuses={"Get ./A": 404})})
        assert moved.state == S.FAILED and moved.cause == "bad" and moved.attempts == 3
        (entry,) = await w.outbox()
        assert entry.kind == "webhook" and entry.topic == "task" and entry.due == NOW
        assert entry.entry_id.startswith("ev")
        assert entry.payload == _finished_payload(
            t, "FAILED", cause="bad", dm_status=404, result_code=7, attempts=3,
            result={"statuses": {"Get ./A": 404}})
        assert w.metrics.transitions == {"PENDING": 1, "FAILED": 1}
    run(tmp_path, scenario)


def test_the_event_reads_the_task_itself_and_keeps_the_callers_entries(tmp_path):
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        t = await w.task("t1", state=S.IN_PROGRESS, job_id=None,
                         op=ExecOp(uri="./Reboot"))
        t = await w.store.transition("t1", S.IN_PROGRESS,
                                     changes={"result": TaskResult(fumo_result=250)})
        mine = OutboxEntry(entry_id="evmine", kind="webhook", topic="task", due=NOW,
                           payload={"type": "mine"})
        await w.tasks.move("t1", S.SUCCEEDED, enqueue=[mine])     # no task=: read here
        entries = {e.entry_id: e for e in await w.outbox()}
        assert set(entries) - {"evmine"} and entries["evmine"].payload == {"type": "mine"}
        (ev,) = [e for k, e in entries.items() if k != "evmine"]
        # the result as on record (the move did not change it), attempts likewise
        assert ev.payload == _finished_payload(t, "SUCCEEDED", result={"fumo_result": 250})
    run(tmp_path, scenario)


def test_no_event_without_subscribers_nor_for_a_move_that_is_not_final(tmp_path):
    async def scenario(w: World) -> None:
        await w.task("t1", state=S.IN_PROGRESS)
        await w.tasks.move("t1", S.SUCCEEDED, cause="ok")
        await w.subscribe("job")                          # another topic is nobody for tasks
        await w.task("t2", state=S.IN_PROGRESS)
        await w.tasks.move("t2", S.CANCELLED)
        await w.subscribe("task")
        await w.task("t3")
        await w.tasks.move("t3", S.NOTIFIED, cause="sms sent")
        await w.tasks.move("t3", S.IN_PROGRESS)
        assert await w.outbox() == []
        assert w.metrics.transitions == {"PENDING": 3, "SUCCEEDED": 1, "CANCELLED": 1,
                                         "NOTIFIED": 1, "IN_PROGRESS": 1}
    run(tmp_path, scenario)


def test_a_move_of_a_final_or_unknown_task_is_refused_without_an_event(tmp_path):
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        await w.task("t1", state=S.FAILED)
        with pytest.raises(InvalidTransition):
            await w.tasks.move("t1", S.CANCELLED)
        stale = (await w.store.get_task("t1"))
        with pytest.raises(InvalidTransition):      # the caller's copy says final too
            await w.tasks.move("t1", S.EXPIRED, task=stale)
        with pytest.raises(NotFound):
            await w.tasks.move("nope", S.CANCELLED)
        assert await w.outbox() == []
        assert "CANCELLED" not in w.metrics.transitions
    run(tmp_path, scenario)


def test_a_move_is_logged_at_debug_with_its_ids(tmp_path, caplog):
    async def scenario(w: World) -> None:
        await w.task("t1", job_id=None)
        await w.store.create_job(Job(job_id="j1"))
        await w.task("t2", job_id="j1")
        with caplog.at_level(logging.DEBUG, logger="dmengine.tasks"):
            await w.tasks.move("t1", S.NOTIFIED, cause="sms sent")
            await w.tasks.move("t1", S.IN_PROGRESS)
            await w.tasks.move("t2", S.NOTIFIED)
        a, b, c = [r for r in caplog.records if r.name == "dmengine.tasks"]
        assert a.getMessage() == "task moved to NOTIFIED: sms sent"
        assert b.getMessage() == "task moved to IN_PROGRESS: "
        assert (a.dm_task, a.dm_device) == ("t1", "IMEI:1") and not hasattr(a, "dm_job")
        assert (c.dm_task, c.dm_job, c.dm_device) == ("t2", "j1", "IMEI:1")
    run(tmp_path, scenario)


# --- get, history, cancel ----------------------------------------------------------------------

def test_get_answers_the_task_data_whole(tmp_path):
    async def scenario(w: World) -> None:
        await w.task("t1", op=ExecOp(uri="./X"), test_cycle=True)
        t = await w.store.transition("t1", S.FAILED, cause="no", changes={
            "attempts": 2, "result": TaskResult(message="m")})
        data = await w.tasks.get("t1")
        assert data == TaskData(task_id="t1", status="FAILED", dev_id="IMEI:1",
                                operation="EXEC", job_id=None, test_cycle=True, attempts=2,
                                created=t.created, updated=t.updated, finished=t.finished,
                                cause="no", result=TaskResult(message="m"), record=t)
        assert task_data(t) == data
        assert task_data(Task(task_id="t", dev_id="d", op=ExecOp(uri="./X"),
                              job_id="j7")).job_id == "j7"
        with pytest.raises(UnknownResource) as e:
            await w.tasks.get("nope")
        assert (str(e.value), e.value.where) == ("no task 'nope'", "taskId")
    run(tmp_path, scenario)


def test_history_lists_every_move_and_open_tasks_are_the_devices(tmp_path):
    async def scenario(w: World) -> None:
        await w.task("t1")
        await w.tasks.move("t1", S.NOTIFIED, cause="sms")
        await w.tasks.move("t1", S.FAILED, cause="gone", dm_status=500)
        await w.task("t2")
        await w.task("t3", dev_id="IMEI:2")
        hist = await w.tasks.history("t1")
        assert [(h.from_state, h.to_state, h.cause, h.dm_status) for h in hist] == [
            (None, S.PENDING, None, None), (S.PENDING, S.NOTIFIED, "sms", None),
            (S.NOTIFIED, S.FAILED, "gone", 500)]
        assert [t.task_id for t in await w.tasks.open_for_device("IMEI:1")] == ["t2"]
        # more moves than one page of the store's listing holds (DEFAULT_PAGE 100)
        for i in range(120):
            await w.store.transition("t2", S.NOTIFIED, cause=f"n{i}")
        hist = await w.tasks.history("t2")
        assert [h.cause for h in hist] == [None] + [f"n{i}" for i in range(120)]
        assert [h.seq for h in hist] == list(range(1, 122))
    run(tmp_path, scenario)


def test_cancel_moves_the_task_and_refuses_unknown_and_final_ones(tmp_path):
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        await w.task("t1", state=S.NOTIFIED, next_attempt=NOW + 60)
        t = await w.tasks.cancel("t1", "by the operator")
        # (the store stamps ``finished`` with its own time of the write)
        assert (t.state, t.cause, t.finished, t.next_attempt) == (
            S.CANCELLED, "by the operator", t.updated, None)
        (ev,) = await w.outbox()
        assert ev.payload["state"] == "CANCELLED" and ev.payload["cause"] == "by the operator"
        with pytest.raises(ServiceError) as e:
            await w.tasks.cancel("t1", "again")
        assert type(e.value) is ServiceError
        assert (str(e.value), e.value.where) == ("task t1 is already CANCELLED", "taskId")
        with pytest.raises(UnknownResource) as e2:
            await w.tasks.cancel("nope", "x")
        assert (str(e2.value), e2.value.where) == ("no task 'nope'", "taskId")
    run(tmp_path, scenario)


# --- charging ------------------------------------------------------------------------------------

async def _device(w: World, dev_id: str = "IMEI:356938035643809") -> Device:
    return await w.store.create_device(Device(
        dev_id=dev_id, imei="356938035643809", msisdn="+4915100000001",
        devinfo={"./DevInfo/Mod": "EX100"}))


def test_charging_event_names_the_device_and_the_package(tmp_path):
    async def scenario(w: World) -> None:
        dev = await _device(w)
        await w.store.create_content(Content(content_id="c1", name="fw.bin", size=1, sha256=SHA,
                                             to_version="2.4.0"))
        t = await w.task("t1", dev_id=dev.dev_id, op=UpdateOp(content_id="c1"), owner="crm")
        e = await w.tasks.charging_event(t, S.SUCCEEDED, "installed", result_code=200)
        assert (e.kind, e.topic, e.due) == ("charging", "charging", NOW)
        assert e.entry_id.startswith("ev")
        assert e.payload == {"time": NOW, "task_id": "t1", "owner": "crm",
                             "dev_id": dev.dev_id, "imei": "356938035643809",
                             "msisdn": "+4915100000001", "devinfo": {"./DevInfo/Mod": "EX100"},
                             "operation": "UPDATE", "content_id": "c1",
                             "content_version": "2.4.0", "result": "SUCCEEDED",
                             "result_code": 200, "cause": "installed"}
        await w.store.create_job(Job(job_id="j1"))
        e = await w.tasks.charging_event(
            Task(task_id="t9", dev_id=dev.dev_id, op=ExecOp(uri="./X"), job_id="j1"),
            S.SUCCEEDED, "ok", result_code=None)
        assert (e.payload["task_id"], e.payload["job_id"]) == ("t9", "j1")
        # the package the session used wins over the one named
        e = await w.tasks.charging_event(t, S.SUCCEEDED, "x", result_code=None,
                                         package=("c9", None))
        assert (e.payload["content_id"], "content_version" in e.payload) == ("c9", False)
        assert "result_code" not in e.payload
    run(tmp_path, scenario)


def test_charging_event_without_device_or_content_records(tmp_path):
    async def scenario(w: World) -> None:
        t = await w.task("t1", dev_id="IMEI:9", op=UpdateOp(content_id="gone"), job_id=None)
        e = await w.tasks.charging_event(t, S.SUCCEEDED, "ok", result_code=250)
        assert e.payload == {"time": NOW, "task_id": "t1", "dev_id": "IMEI:9",
                             "operation": "UPDATE", "content_id": "gone", "result": "SUCCEEDED",
                             "result_code": 250, "cause": "ok"}
        # an UPDATE that named no package, and other operations: no content fields
        for tid, op in (("t2", UpdateOp()), ("t3", QueryOp(nodes=["./A"]))):
            t = await w.task(tid, dev_id="IMEI:9", op=op)
            e = await w.tasks.charging_event(t, S.SUCCEEDED, "ok", result_code=None)
            assert e.payload == {"time": NOW, "task_id": tid, "dev_id": "IMEI:9",
                                 "operation": operation_name(op), "result": "SUCCEEDED",
                                 "cause": "ok"}
    run(tmp_path, scenario)


def test_a_charging_event_that_does_not_validate_drops_the_device_details(tmp_path, caplog):
    async def scenario(w: World) -> None:
        dev = await _device(w)
        t = await w.task("t1", dev_id=dev.dev_id)
        long = "c" * 1025                     # longer than a cause may be
        with caplog.at_level(logging.WARNING, logger="dmengine.tasks"):
            e = await w.tasks.charging_event(t, S.SUCCEEDED, long, result_code=200)
        assert e.payload == {"time": NOW, "task_id": "t1", "dev_id": dev.dev_id,
                             "operation": "QUERY", "result": "SUCCEEDED", "result_code": 200}
        (rec,) = [r for r in caplog.records if r.name == "dmengine.tasks"]
        assert rec.getMessage().startswith(
            "charging event of task t1 without its device details: ")
        assert "cause" in rec.getMessage()
        # the same without a device record (no device details to drop)
        t = await w.task("t2", dev_id="IMEI:404")
        e = await w.tasks.charging_event(t, S.SUCCEEDED, long, result_code=None)
        assert e.payload == {"time": NOW, "task_id": "t2", "dev_id": "IMEI:404",
                             "operation": "QUERY", "result": "SUCCEEDED"}
    run(tmp_path, scenario)


# --- retries -------------------------------------------------------------------------------------

def test_retry_delay_follows_the_configured_backoff(tmp_path):
    async def scenario(w: World) -> None:
        d = [w.tasks.retry_delay(a) for a in range(5)]
        assert d == [10.0, 20.0, 40.0, 40.0, 40.0]
    run(tmp_path, scenario, config=BrokerConfig(retry_delays=(10.0, 20.0, 40.0),
                                                retry_jitter=0.0))


def test_retry_delay_jitter_stays_within_its_bounds(tmp_path):
    async def scenario(w: World) -> None:
        seen = [w.tasks.retry_delay(1) for _ in range(400)]
        assert all(16.0 <= s <= 24.0 for s in seen), (min(seen), max(seen))
        assert min(seen) < 18.0 and max(seen) > 22.0          # spread, both ways
        assert len(set(seen)) > 300
    run(tmp_path, scenario, config=BrokerConfig(retry_delays=(10.0, 20.0), retry_jitter=0.2))


def test_retry_later_puts_the_task_back_due_after_its_backoff(tmp_path):
    async def scenario(w: World) -> None:
        t = await w.task("t1", state=S.IN_PROGRESS)
        await w.store.transition("t1", S.IN_PROGRESS, changes={"attempts": 2})
        await w.tasks.retry_later(t, "session ended")
        t = await w.store.get_task("t1")
        assert (t.state, t.cause, t.next_attempt) == (S.PENDING, "session ended", NOW + 30.0)
        # a task waiting for the user is asked again next time: through IN_PROGRESS
        await w.task("t2", state=S.WAITING_USER)
        await w.tasks.retry_later(await w.store.get_task("t2"), "no answer")
        hist = await w.tasks.history("t2")
        assert [(h.to_state, h.cause) for h in hist[-2:]] == [
            (S.IN_PROGRESS, "no answer"), (S.PENDING, "no answer")]
        assert (await w.store.get_task("t2")).next_attempt == NOW + 1.0
        # final meanwhile, or gone: left alone
        done = await w.task("t3", state=S.CANCELLED)
        await w.tasks.retry_later(done, "late")
        assert (await w.store.get_task("t3")).state == S.CANCELLED
        await w.tasks.retry_later(Task(task_id="nope", dev_id="IMEI:1", op=ExecOp(uri="./X")),
                                  "late")
    run(tmp_path, scenario, config=BrokerConfig(retry_delays=(1.0, 5.0, 30.0, 99.0),
                                                retry_jitter=0.0))


# --- finish --------------------------------------------------------------------------------------

def test_finish_a_success_charges_it_in_the_same_write(tmp_path):
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        await w.subscribe("charging")
        dev = await _device(w)
        await w.task("t1", dev_id=dev.dev_id, op=ExecOp(uri="./X"), state=S.IN_PROGRESS,
                     next_attempt=NOW + 5)
        t = await w.store.get_task("t1")
        moved = await w.tasks.finish(t, S.SUCCEEDED, "all good", dm_status=200,
                                     result_code=1200, result=TaskResult(nodes={"./A": "1"}),
                                     package=("c1", "2.0"))
        assert (moved.state, moved.cause, moved.finished, moved.next_attempt) == (
            S.SUCCEEDED, "all good", moved.updated, None)
        assert moved.result == TaskResult(nodes={"./A": "1"}, message="all good")
        (h,) = (await w.tasks.history("t1"))[-1:]
        assert (h.dm_status, h.result_code) == (200, 1200)
        by_kind = {e.kind: e for e in await w.outbox()}
        assert set(by_kind) == {"webhook", "charging"}
        assert by_kind["webhook"].payload["result"] == {"nodes": {"./A": "1"},
                                                        "message": "all good"}
        ch = by_kind["charging"].payload
        assert (ch["content_id"], ch["content_version"], ch["result_code"], ch["cause"]) == (
            "c1", "2.0", 1200, "all good")
        (logged,) = (await w.store.charging_events()).items
        assert (logged.task_id, logged.event_id) == ("t1", by_kind["charging"].entry_id)
        assert w.metrics.charging == {"EXEC": 1}
    run(tmp_path, scenario)


def test_finish_charges_neither_a_failure_nor_a_test_cycle(tmp_path):
    async def scenario(w: World) -> None:
        await w.task("t1", state=S.IN_PROGRESS)
        moved = await w.tasks.finish(await w.store.get_task("t1"), S.FAILED, "no")
        assert moved.result is None and moved.state == S.FAILED
        await w.task("t2", state=S.IN_PROGRESS, test_cycle=True)
        await w.tasks.finish(await w.store.get_task("t2"), S.SUCCEEDED, "yes")
        assert (await w.store.charging_events()).items == []
        assert w.metrics.charging == {}
    run(tmp_path, scenario)


def test_finish_of_a_task_final_already_drops_the_late_outcome(tmp_path, caplog):
    async def scenario(w: World) -> None:
        t = await w.task("t1", state=S.IN_PROGRESS)
        await w.tasks.cancel("t1", "operator")
        with caplog.at_level(logging.INFO, logger="dmengine.tasks"):
            assert await w.tasks.finish(t, S.SUCCEEDED, "late") is None
        assert (await w.store.get_task("t1")).state == S.CANCELLED
        assert (await w.store.charging_events()).items == []
        assert w.metrics.charging == {}
        (rec,) = [r for r in caplog.records if r.name == "dmengine.tasks"]
        assert rec.getMessage() == ("task t1 not moved to SUCCEEDED: "
                                    "task 't1': CANCELLED -> SUCCEEDED is not a legal move")
        # a write the store refuses for another reason is the caller's to see
        await w.task("t2", state=S.IN_PROGRESS)
        with pytest.raises(ValidationError):
            await w.tasks.finish(await w.store.get_task("t2"), S.FAILED, "x" * 1025)
    run(tmp_path, scenario)


def test_operation_names_are_the_dmwsi_tags():
    assert [operation_name(o) for o in (UpdateOp(), QueryOp(nodes=["./A"]), ExecOp(uri="./X"))] \
        == ["UPDATE", "QUERY", "EXEC"]
    assert msgspec.to_builtins(ExecOp(uri="./X"))["operation"] == "EXEC"


def test_the_event_of_a_move_describes_the_record_as_the_caller_read_it(tmp_path):
    """``task=``: the record the caller read is the event's (no second read); the store's
    copy changed since (a retry counted) does not show in it."""
    async def scenario(w: World) -> None:
        await w.subscribe("task")
        await w.task("t1", state=S.IN_PROGRESS)
        seen = await w.store.get_task("t1")
        await w.store.transition("t1", S.IN_PROGRESS, changes={"attempts": 4})
        await w.tasks.finish(seen, S.FAILED, "no")
        await w.task("t2", state=S.IN_PROGRESS)
        seen2 = await w.store.get_task("t2")
        await w.store.transition("t2", S.IN_PROGRESS, changes={"attempts": 5})
        await w.tasks.move("t2", S.EXPIRED, task=seen2)
        got = {e.payload["task_id"]: e.payload["attempts"] for e in await w.outbox()}
        assert got == {"t1": 0, "t2": 0}
    run(tmp_path, scenario)
