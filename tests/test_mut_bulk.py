"""Issue 18: ``dmengine/bulk.py`` (jobs) piece by piece, with exact expectations — its mutants
survived the end-to-end job tests, which see only the outcome of a whole campaign.  In process
(the memory store, a clock the test sets), so each test takes milliseconds: the derived view of
a job, stage boundaries, the daily windows, the checks of createDeployments (each error naming
its field), pause / restart / cancel, listings by owner, the task a job makes, and the metrics'
tally of jobs and tasks."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

import pytest

from dmengine.broker import Broker
from dmengine.bulk import (RECORD_DEV_IDS, TARGET_CHUNK, JobTally, early_start_allowed,
                           final_count, in_flight, job_task, stage_boundary, view, window_wait)
from dmengine.config import BrokerConfig
from dmengine.errors import InvalidRequest, NotFound, ServiceError, UnknownResource
from dmengine.model import (BootstrapOp, Content, Device, DmAccount, Job, JobState, QueryOp,
                            Selection, Stage, StopRule, Task, TaskState, TimeWindow, UpdateOp)
from dmengine.store.memory import MemoryStore
from conftest import Clock

S = TaskState
J = JobState
OP = QueryOp(nodes=["./DevInfo/Mod"])
#: Monday 2024-01-01 00:00 UTC
MONDAY = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
H = 3600
DAY = 86400


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def broker(clock: Clock, n: int = 0, **kw: Any) -> tuple[MemoryStore, Broker]:
    store = MemoryStore()
    b = Broker(store, None, config=BrokerConfig(retry_jitter=0.0, task_ttl=500.0), clock=clock,
               **kw)
    await store.import_devices(
        Device(dev_id=f"IMEI:{356938030000000 + i}", imei=f"{356938030000000 + i}",
               capability="cap-x" if i % 2 == 0 else "cap-y") for i in range(n))
    return store, b


async def targets(store: MemoryStore, job_id: str) -> list[str]:
    out: list[str] = []
    while batch := await store.job_targets(job_id, len(out), 5000):
        out += batch
    return out


def ids(n: int, start: int = 0) -> list[str]:
    return [f"IMEI:{356938030000000 + i}" for i in range(start, start + n)]


# --- the job's derived view ------------------------------------------------------------------

def test_counts_final_and_in_flight_over_both_tallies():
    job = Job(job_id="j", total=12,
              counts={S.SUCCEEDED: 2, S.FAILED: 1, S.EXPIRED: 1, S.CANCELLED: 1, S.PENDING: 3},
              test_counts={S.SUCCEEDED: 1, S.NOTIFIED: 1, S.IN_PROGRESS: 1, S.WAITING_USER: 1})
    assert final_count(job) == 6
    assert in_flight(job) == 6


def test_view_of_a_running_job():
    job = Job(job_id="j", state=J.RUNNING, targets=10, total=6, started=100.0,
              counts={S.SUCCEEDED: 2, S.FAILED: 1, S.EXPIRED: 1, S.PENDING: 1},
              test_counts={S.SUCCEEDED: 1, S.FAILED: 1})
    v = view(job, 104.0)
    assert (v.started, v.final, v.succeeded, v.failed) == (6, 6, 3, 3)
    assert v.progress == 0.6
    assert v.rate == 6 / 4.0
    assert v.eta_s == pytest.approx(4 / 1.5)
    # a scheduled job has an ETA too; a paused one has none
    assert view(Job(job_id="j", state=J.SCHEDULED, targets=10, total=6, started=100.0,
                    counts={S.SUCCEEDED: 6}), 104.0).eta_s == pytest.approx(4 / 1.5)
    assert view(msgspec_replace(job, state=J.PAUSED), 104.0).eta_s is None


def test_view_of_an_ended_job_keeps_its_rate():
    job = Job(job_id="j", state=J.COMPLETED, targets=4, total=4, started=100.0, finished=110.0,
              counts={S.SUCCEEDED: 4})
    for now in (110.0, 500.0):
        v = view(job, now)
        assert v.rate == 0.4 and v.eta_s is None and v.progress == 1.0
    # before its end (a clock behind the record's): up to now
    assert view(job, 105.0).rate == 0.8


def test_view_without_a_rate():
    base = dict(job_id="j", state=J.RUNNING, targets=4, total=2)
    assert view(Job(**base, counts={S.SUCCEEDED: 2}), 100.0).rate is None          # not started
    v = view(Job(**base, started=100.0, counts={S.SUCCEEDED: 2}), 100.0)           # no time yet
    assert v.rate is None and v.eta_s is None
    v = view(Job(**base, started=90.0, counts={S.PENDING: 2}), 100.0)              # none final
    assert v.rate is None and v.eta_s is None and v.progress == 0.0
    v = view(Job(job_id="j", state=J.COMPLETED, targets=0), 100.0)                # no target
    assert v.progress == 1.0 and v.final == 0


def msgspec_replace(job: Job, **kw: Any) -> Job:
    import msgspec
    return msgspec.structs.replace(job, **kw)


def test_stage_boundary():
    st = [Stage(percent=25), Stage(percent=50.5), Stage(percent=100)]
    assert stage_boundary(Job(job_id="j", targets=10)) == 10
    assert stage_boundary(Job(job_id="j", targets=10, stages=st)) == 3          # ceil(2.5)
    assert stage_boundary(Job(job_id="j", targets=10, stages=st, stage=1)) == 6  # ceil(5.05)
    assert stage_boundary(Job(job_id="j", targets=10, stages=st, stage=2)) == 10
    assert stage_boundary(Job(job_id="j", targets=10, stages=st, stage=3)) == 10  # past the last
    assert stage_boundary(Job(job_id="j", targets=8, stages=st)) == 2            # exact: no +1
    assert stage_boundary(Job(job_id="j", targets=10, stages=[Stage(percent=100)])) == 10


# --- daily windows ---------------------------------------------------------------------------

def test_window_wait_inside_before_and_after_a_window():
    w = [TimeWindow(start=1 * H, end=2 * H)]
    assert window_wait(w, None, MONDAY + 1 * H) == 0.0               # start inclusive
    assert window_wait(w, None, MONDAY + 2 * H - 1) == 0.0
    assert window_wait(w, None, MONDAY + 1 * H - 1) == 1.0           # opens in a second
    assert window_wait(w, None, MONDAY + 1800) == 1800.0
    assert window_wait(w, None, MONDAY + 2 * H) == DAY - H           # end exclusive: tomorrow
    assert window_wait(w, "UTC", MONDAY + 2 * H) == DAY - H
    assert window_wait([], None, MONDAY) == math.inf
    assert window_wait([TimeWindow(start=H, end=2 * H, days=[])], None, MONDAY) == math.inf


def test_window_wait_by_weekday_and_a_week_ahead():
    tue = [TimeWindow(start=1 * H, end=2 * H, days=[1])]
    assert window_wait(tue, None, MONDAY + 1 * H) == DAY              # Monday: Tuesday's
    assert window_wait(tue, None, MONDAY + DAY + 90 * 60) == 0.0
    # Monday's window, just closed: the next one is seven days on
    mon = [TimeWindow(start=1 * H, end=2 * H, days=[0])]
    assert window_wait(mon, None, MONDAY + 3 * H) == 7 * DAY - 2 * H
    # the soonest of several windows
    two = [TimeWindow(start=10 * H, end=11 * H), TimeWindow(start=5 * H, end=6 * H)]
    assert window_wait(two, None, MONDAY + 4 * H) == 1 * H
    assert window_wait(two, None, MONDAY + 7 * H) == 3 * H
    # in the last hour of Sunday the next opening is Monday's
    assert window_wait(mon, None, MONDAY + 6 * DAY + 23 * H) == 2 * H


def test_window_wait_over_midnight():
    w = [TimeWindow(start=22 * H, end=2 * H, days=[0])]              # Monday 22:00 - 02:00
    assert window_wait(w, None, MONDAY + 22 * H) == 0.0
    assert window_wait(w, None, MONDAY + 23 * H) == 0.0
    assert window_wait(w, None, MONDAY + DAY + 1 * H) == 0.0          # Tuesday morning
    assert window_wait(w, None, MONDAY + DAY + 2 * H) == 7 * DAY - 4 * H   # closed at 02:00
    assert window_wait(w, None, MONDAY + 1 * H) == 21 * H             # Sunday was not listed
    assert window_wait(w, None, MONDAY + 21 * H) == 1 * H
    # Sunday's window runs into Monday morning
    sun = [TimeWindow(start=22 * H, end=2 * H, days=[6])]
    assert window_wait(sun, None, MONDAY + 1 * H) == 0.0


def test_window_wait_in_the_devices_zone():
    w = [TimeWindow(start=1 * H, end=2 * H)]
    # midnight UTC is 01:00 in Berlin (winter) and 19:00 the day before in New York
    assert window_wait(w, "Europe/Berlin", MONDAY) == 0.0
    assert window_wait(w, "America/New_York", MONDAY) == 6 * H
    assert window_wait(w, None, MONDAY) == 1 * H


def test_early_start_allowed():
    st = [Stage(percent=50), Stage(percent=100)]
    job = Job(job_id="j", state=J.RUNNING, op=OP, targets=10, total=4, stages=st)
    assert early_start_allowed(job, None, MONDAY)
    assert not early_start_allowed(msgspec_replace(job, total=5), None, MONDAY)   # stage full
    assert not early_start_allowed(msgspec_replace(job, state=J.PAUSED), None, MONDAY)
    assert not early_start_allowed(msgspec_replace(job, state=J.SCHEDULED), None, MONDAY)
    assert not early_start_allowed(msgspec_replace(job, op=None), None, MONDAY)
    win = msgspec_replace(job, windows=[TimeWindow(start=1 * H, end=2 * H)], tz="Europe/Berlin")
    assert early_start_allowed(win, None, MONDAY)                  # the job's zone: 01:00
    assert not early_start_allowed(win, "UTC", MONDAY)             # the device's zone: 00:00
    assert early_start_allowed(win, "UTC", MONDAY + H)


# --- createDeployments -----------------------------------------------------------------------

def test_create_writes_the_job_as_asked():
    async def main() -> None:
        clock = Clock(MONDAY)
        store, b = await broker(clock)
        stop = StopRule(max_failure_ratio=0.5, min_finished=3)
        stages = [Stage(percent=10, success_threshold=0.9), Stage(percent=100, approval=True)]
        win = [TimeWindow(start=H, end=2 * H, days=[0, 1])]
        job = await b.jobs.create(OP, Selection(dev_ids=ids(3) + ids(2)), name="n1", owner="op",
                                  b_optin=True, accept_device_policy=30, test_cycle=True,
                                  rate_limit=2.5, concurrency=7, windows=win, tz="Europe/Berlin",
                                  stop_rule=stop, stages=stages, priority=4,
                                  end_at=MONDAY + 99)
        assert job.job_id.startswith("j") and job.op == OP
        assert (job.name, job.owner, job.b_optin, job.accept_device_policy, job.test_cycle) == \
            ("n1", "op", True, 30, True)
        assert (job.rate_limit, job.concurrency, job.windows, job.tz, job.stop_rule) == \
            (2.5, 7, win, "Europe/Berlin", stop)
        assert (job.stages, job.priority, job.start_at, job.end_at) == \
            (stages, 4, None, MONDAY + 99)
        assert job.state == J.RUNNING and job.started == MONDAY and job.total == 0
        assert job.targets == 3                              # the repeated devices once
        assert job.selection == Selection(dev_ids=ids(3) + ids(2))
        assert await store.job_targets(job.job_id, 0, 10) == ids(3)
        assert await store.get_job(job.job_id) == job
    run(main())


def test_create_starts_later_or_now():
    async def main() -> None:
        clock = Clock(MONDAY)
        store, b = await broker(clock)
        later = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY + 1)
        assert later.state == J.SCHEDULED and later.started is None and later.targets == 1
        assert later.start_at == MONDAY + 1
        now = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY)
        assert now.state == J.RUNNING and now.started == MONDAY
        past = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY - 5)
        assert past.state == J.RUNNING
    run(main())


def test_a_long_device_list_stays_out_of_the_record():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        kept = await b.jobs.create(OP, Selection(dev_ids=ids(RECORD_DEV_IDS)))
        assert kept.selection.dev_ids == ids(RECORD_DEV_IDS)
        big = await b.jobs.create(OP, Selection(dev_ids=ids(RECORD_DEV_IDS + 1)))
        assert big.selection == Selection() and big.targets == RECORD_DEV_IDS + 1
        assert await store.job_targets(big.job_id, RECORD_DEV_IDS, 5) == \
            ids(1, start=RECORD_DEV_IDS)
    run(main())


def test_targets_written_in_chunks_keep_every_device_in_order():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        n = TARGET_CHUNK + 3
        job = await b.jobs.create(OP, Selection(dev_ids=ids(n)))
        assert job.targets == n
        assert await targets(store, job.job_id) == ids(n)
    run(main())


def test_a_query_selection_pages_through_the_devices():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY), n=9)
        job = await b.jobs.create(OP, Selection(capability="cap-x"))
        assert job.targets == 5 and job.state == J.RUNNING
        assert sorted(await store.job_targets(job.job_id, 0, 10)) == \
            [d for i, d in enumerate(ids(9)) if i % 2 == 0]
        none = await b.jobs.create(OP, Selection(capability="cap-z"))
        assert none.state == J.COMPLETED and none.targets == 0
        assert none.cause == "no device matched the selection" and none.finished == MONDAY
    run(main())


def test_a_query_selection_over_more_than_a_chunk():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        n = TARGET_CHUNK + 2
        await store.import_devices(Device(dev_id=d, capability="cap-big") for d in ids(n))
        job = await b.jobs.create(OP, Selection(capability="cap-big"))
        assert job.targets == n
        assert sorted(await targets(store, job.job_id)) == sorted(ids(n))
    run(main())


def refused(exc: pytest.ExceptionInfo[Any], cls: type, where: str, text: str) -> None:
    assert type(exc.value) is cls, exc.value
    assert exc.value.where == where, exc.value.where
    assert str(exc.value) == text, str(exc.value)


def test_create_refusals_name_their_field():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        create = b.jobs.create
        sel = Selection(dev_ids=ids(1))
        cases: list[tuple[Any, type, str, str]] = [
            (create(BootstrapOp(account=DmAccount(server_id="s")), sel), InvalidRequest, "operation",
             "bootstrap jobs are made by doBootstrap"),
            (create(OP, sel, accept_device_policy=40), InvalidRequest, "acceptDevicePolicy",
             "acceptDevicePolicy 40 asks the carrier, and no carrier callback is configured"),
            (create(UpdateOp(content_id="nope"), sel), UnknownResource,
             "operation.content_id", "no content 'nope'"),
            (create(OP, Selection(dev_ids=ids(1), capability="c")), InvalidRequest, "selection",
             "name devices or give a query, not both"),
            (create(OP, Selection()), InvalidRequest, "selection",
             "a job needs devices: dev_ids or a query (capability, tac, model, firmware)"),
            (create(OP, Selection(dev_ids=ids(2) + ["bad id"])), InvalidRequest,
             "selection.dev_ids[2]", "not a device id: 'bad id'"),
            (create(OP, Selection(dev_ids=["x" * 129])), InvalidRequest,
             "selection.dev_ids[0]", f"not a device id: {'x' * 129!r}"),
            (create(OP, Selection(dev_ids=ids(1), firmware="1.0")), InvalidRequest,
             "selection", "name devices or give a query, not both"),
            (create(OP, Selection(dev_ids=[""])), InvalidRequest, "selection.dev_ids[0]",
             "not a device id: ''"),
            (create(OP, sel, stages=[Stage(percent=50), Stage(percent=50)]), InvalidRequest,
             "stages[1].percent", "stages must grow: each percent above the one before"),
            (create(OP, sel, stages=[Stage(percent=50), Stage(percent=40),
                                     Stage(percent=100)]), InvalidRequest,
             "stages[1].percent", "stages must grow: each percent above the one before"),
            (create(OP, sel, stages=[Stage(percent=20), Stage(percent=90)]), InvalidRequest,
             "stages[1]", "the last stage must be 100 percent"),
            (create(OP, sel, stages=[Stage(percent=50)]), InvalidRequest,
             "stages[0]", "the last stage must be 100 percent"),
            (create(OP, sel, windows=[TimeWindow(start=5, end=6), TimeWindow(start=7, end=7)]),
             InvalidRequest, "windows[1]", "an empty window"),
            (create(OP, sel, tz="Mars/Olympus"), InvalidRequest, "tz",
             "unknown time zone 'Mars/Olympus'"),
            (create(OP, sel, tz="../etc"), InvalidRequest, "tz", "unknown time zone '../etc'"),
            (create(OP, sel, start_at=MONDAY + 10, end_at=MONDAY + 10), InvalidRequest,
             "end_at", "end_at must be after start_at"),
        ]
        for coro, cls, where, text in cases:
            with pytest.raises(ServiceError) as exc:
                await coro
            refused(exc, cls, where, text)
        # nothing was written by a refused request
        assert (await store.list_jobs(limit=100)).items == []
        # the limits themselves are allowed
        assert (await create(OP, Selection(dev_ids=["x"]))).targets == 1     # one character
        ok = await create(OP, Selection(dev_ids=["x" * 128]), start_at=MONDAY,
                          end_at=MONDAY + 0.5, tz="Europe/Berlin",
                          stages=[Stage(percent=0.5), Stage(percent=100)],
                          windows=[TimeWindow(start=7, end=6)])
        assert ok.targets == 1
        await store.create_content(Content(content_id="fw", name="fw.bin", size=1,
                                            sha256="0" * 64))
        fw = await create(UpdateOp(content_id="fw"), sel)
        assert fw.op == UpdateOp(content_id="fw")
        assert (await create(UpdateOp(), sel)).targets == 1
    run(main())


def test_policy_40_allowed_when_a_carrier_callback_is_configured():
    async def main() -> None:
        async def carrier(*a: Any) -> bool:
            return True
        store, b = await broker(Clock(MONDAY), carrier_callback=carrier)
        job = await b.jobs.create(OP, Selection(dev_ids=ids(1)), accept_device_policy=40)
        assert job.accept_device_policy == 40
    run(main())


# --- job control -----------------------------------------------------------------------------

async def job_with_tasks(store: MemoryStore, b: Broker, states: list[TaskState], *,
                         job_state: JobState = J.RUNNING, **kw: Any) -> Job:
    """A job of ``len(states) + 2`` targets whose first tasks are made in ``states`` (their
    ids: ``t0``, ``t1`` … of the first job made so, then ``<job id>-t0`` …)."""
    job = await b.jobs.create(OP, Selection(dev_ids=ids(len(states) + 2)), **kw)
    tag = "" if await _free(store, "t0") else f"{job.job_id}-"
    await store.create_job_tasks(job.job_id, 0, [
        Task(task_id=f"{tag}t{i}", dev_id=d, op=OP, job_id=job.job_id, correlator=f"{tag}t{i}",
             state=st) for i, (d, st) in enumerate(zip(ids(len(states)), states))])
    if job_state != J.RUNNING:
        await store.update_job(job.job_id, {"state": job_state})
    return await store.get_job(job.job_id)


async def _free(store: MemoryStore, task_id: str) -> bool:
    try:
        await store.get_task(task_id)
    except NotFound:
        return True
    return False


def test_get_and_unknown_jobs():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        job = await b.jobs.create(OP, Selection(dev_ids=ids(1)))
        assert await b.jobs.get(job.job_id) == job
        assert (await b.jobs.view(job.job_id)).job == job
        for call in (b.jobs.get("j-none"), b.jobs.view("j-none"), b.jobs.pause("j-none"),
                     b.jobs.restart("j-none"), b.jobs.cancel("j-none"),
                     b.jobs.tasks_of("j-none")):
            with pytest.raises(UnknownResource) as exc:
                await call
            refused(exc, UnknownResource, "jobId", "no job 'j-none'")
    run(main())


def test_pause_and_its_refusals():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        job = await b.jobs.create(OP, Selection(dev_ids=ids(1)))
        p = await b.jobs.pause(job.job_id)
        assert p.state == J.PAUSED and p.cause == "paused by the caller"
        with pytest.raises(ServiceError) as exc:
            await b.jobs.pause(job.job_id)
        refused(exc, ServiceError, "jobId", f"job {job.job_id} is PAUSED: only a scheduled or "
                                            "running job can be paused")
        later = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY + 60)
        p = await b.jobs.pause(later.job_id, cause="why not")
        assert p.state == J.PAUSED and p.cause == "why not"
    run(main())


def test_restart_counts_afresh_and_approves_the_next_stage():
    async def main() -> None:
        clock = Clock(MONDAY)
        store, b = await broker(clock)
        stages = [Stage(percent=50), Stage(percent=100)]
        # 6 targets, stage 1 = 3 of them, all final: restart is the approval
        job = await b.jobs.create(OP, Selection(dev_ids=ids(6)), stages=stages)
        await store.create_job_tasks(job.job_id, 0, [
            Task(task_id=f"t{i}", dev_id=d, op=OP, job_id=job.job_id, correlator=f"t{i}",
                 state=st) for i, (d, st) in enumerate(zip(ids(3), (S.SUCCEEDED, S.FAILED,
                                                                   S.EXPIRED)))])
        await b.jobs.pause(job.job_id)
        other = await b.jobs.create(OP, Selection(dev_ids=ids(1)))
        with pytest.raises(ServiceError) as exc:
            await b.jobs.restart(other.job_id)
        refused(exc, ServiceError, "jobId", f"job {other.job_id} is RUNNING, not PAUSED")
        clock.now += 5
        r = await b.jobs.restart(job.job_id)
        assert r.state == J.RUNNING and r.cause == "restarted by the caller"
        assert (r.base_final, r.base_failed) == (3, 2)
        assert r.stage == 1 and r.started == MONDAY                 # started kept
        # in the last stage there is no next one
        await b.jobs.pause(job.job_id)
        assert (await b.jobs.restart(job.job_id)).stage == 1
    run(main())


def test_restart_keeps_the_stage_while_it_has_room_or_tasks_in_flight():
    async def main() -> None:
        clock = Clock(MONDAY)
        store, b = await broker(clock)
        stages = [Stage(percent=50), Stage(percent=100)]
        job = await b.jobs.create(OP, Selection(dev_ids=ids(6)), stages=stages)
        await store.create_job_tasks(job.job_id, 0, [
            Task(task_id=f"t{i}", dev_id=d, op=OP, job_id=job.job_id, correlator=f"t{i}",
                 state=S.SUCCEEDED) for i, d in enumerate(ids(2))])
        await b.jobs.pause(job.job_id)
        assert (await b.jobs.restart(job.job_id)).stage == 0       # 2 of 3 started
        await store.create_job_tasks(job.job_id, 2, [
            Task(task_id="t2", dev_id=ids(1, 2)[0], op=OP, job_id=job.job_id, correlator="t2")])
        await b.jobs.pause(job.job_id)
        assert (await b.jobs.restart(job.job_id)).stage == 0       # t2 in flight
        # a job paused before it ever started gets its start time at the restart
        later = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY + 60)
        await b.jobs.pause(later.job_id)
        clock.now = MONDAY + 7
        r = await b.jobs.restart(later.job_id)
        assert r.started == MONDAY + 7 and r.state == J.RUNNING
    run(main())


def test_cancel_cancels_every_task_in_flight_and_keeps_the_final_ones():
    async def main() -> None:
        clock = Clock(MONDAY)
        store, b = await broker(clock)
        states = [S.PENDING, S.NOTIFIED, S.IN_PROGRESS, S.WAITING_USER, S.SUCCEEDED, S.FAILED]
        job = await job_with_tasks(store, b, states)
        clock.now += 3
        c = await b.jobs.cancel(job.job_id, cause="stop it")
        assert c.state == J.CANCELLED and c.cause == "stop it" and c.finished == MONDAY + 3
        got = {t.task_id: t for t in (await store.tasks_by_job(job.job_id, limit=50)).items}
        assert [got[f"t{i}"].state for i in range(6)] == \
            [S.CANCELLED] * 4 + [S.SUCCEEDED, S.FAILED]
        assert all(got[f"t{i}"].cause == "stop it" for i in range(4))
        assert c.counts.get(S.CANCELLED) == 4 and in_flight(c) == 0   # the answer is re-read
        with pytest.raises(ServiceError) as exc:
            await b.jobs.cancel(job.job_id)
        refused(exc, ServiceError, "jobId", f"job {job.job_id} is CANCELLED already")
        # the default cause; a paused and a scheduled job can be cancelled too
        j = await job_with_tasks(store, b, [S.PENDING], job_state=J.PAUSED)
        c = await b.jobs.cancel(j.job_id)
        assert c.state == J.CANCELLED and c.cause == "job cancelled by the caller"
        (t,) = (await store.tasks_by_job(j.job_id, limit=5)).items
        assert t.state == S.CANCELLED and t.cause == "job cancelled by the caller"
        j = await b.jobs.create(OP, Selection(dev_ids=ids(1)), start_at=MONDAY + 99)
        c = await b.jobs.cancel(j.job_id)
        assert c.state == J.CANCELLED and c.finished == MONDAY + 3
    run(main())


def test_cancel_pages_through_many_tasks():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        job = await job_with_tasks(store, b, [S.PENDING] * 1203)
        c = await b.jobs.cancel(job.job_id)
        assert c.counts == {S.CANCELLED: 1203}
    run(main())


def test_listings_by_owner_state_and_date():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        made = []
        for i in range(7):
            made.append(await b.jobs.create(OP, Selection(dev_ids=ids(1)),
                                            owner="a" if i % 3 == 0 else "b"))
            await asyncio.sleep(0.002)        # the store stamps `created`: one apart
        all_ids = [j.job_id for j in made]
        page = await b.jobs.list(limit=100)
        assert sorted(j.job_id for j in page.items) == sorted(all_ids)
        # owner a: jobs 0, 3, 6 — two a page, the cursor exact
        got, cursor = [], None
        while True:
            page = await b.jobs.list(owner="a", cursor=cursor, limit=2)
            assert len(page.items) <= 2 and all(j.owner == "a" for j in page.items)
            got += [j.job_id for j in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(got) == sorted(all_ids[i] for i in (0, 3, 6))
        assert (await b.jobs.list(owner="nobody", limit=3)).items == []
        await b.jobs.pause(made[1].job_id)
        assert [j.job_id for j in (await b.jobs.list(state=J.PAUSED)).items] == [made[1].job_id]
        assert (await b.jobs.list(state=J.PAUSED, owner="a")).items == []
        t = [j.created for j in made]
        d = await b.jobs.by_date(t[1], t[4])
        assert [j.job_id for j in d.items] == all_ids[1:4]
        d = await b.jobs.by_date(t[0], t[6] + 1, owner="b", limit=3)
        assert [j.job_id for j in d.items] == [all_ids[i] for i in (1, 2, 4)]
        d = await b.jobs.by_date(t[0], t[6] + 1, owner="b", limit=3, cursor=d.next_cursor)
        assert [j.job_id for j in d.items] == [all_ids[5]]
    run(main())


def test_tasks_of_a_job():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        job = await job_with_tasks(store, b, [S.PENDING, S.SUCCEEDED, S.PENDING])
        page = await b.jobs.tasks_of(job.job_id, limit=2)
        assert [t.task_id for t in page.items] == ["t0", "t1"] and page.next_cursor
        page = await b.jobs.tasks_of(job.job_id, cursor=page.next_cursor)
        assert [t.task_id for t in page.items] == ["t2"]
        page = await b.jobs.tasks_of(job.job_id, state=S.PENDING)
        assert [t.task_id for t in page.items] == ["t0", "t2"]
    run(main())


def test_the_task_a_job_makes():
    job = Job(job_id="j1", op=OP, b_optin=True, accept_device_policy=20, test_cycle=True,
              owner="op")
    t = job_task(job, "IMEI:1", 1000.0, 50.0)
    assert t.task_id.startswith("t") and t.correlator == t.task_id
    assert (t.dev_id, t.op, t.job_id, t.b_optin, t.accept_device_policy, t.test_cycle,
            t.state, t.owner) == ("IMEI:1", OP, "j1", True, 20, True, S.PENDING, "op")
    assert t.deadline == 1050.0
    assert job_task(msgspec_replace(job, end_at=2000.0), "d", 1000.0, 50.0).deadline == 2000.0
    assert job_task(msgspec_replace(job, end_at=2000.0, deadline=3000.0), "d", 1000.0,
                    50.0).deadline == 3000.0
    assert job_task(job, "d", 0.0, 50.0).task_id != t.task_id

    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        assert b.jobs.task_for(job, "d", 100.0).deadline == 600.0     # the config's task_ttl
    run(main())


# --- the metrics' tally ----------------------------------------------------------------------

def test_job_tally_counts_open_and_settled_jobs():
    async def main() -> None:
        clock = Clock(time.time())       # the store stamps jobs' `created` by the real clock
        store, b = await broker(clock)
        tally = JobTally(store, clock)
        assert tally.settled(Job(job_id="x", state=J.COMPLETED))
        assert not tally.settled(Job(job_id="x", state=J.CANCELLED, total=1,
                                     counts={S.PENDING: 1}))
        assert not tally.settled(Job(job_id="x", state=J.RUNNING))
        assert tally.settled(Job(job_id="x", state=J.FAILED))
        # an ended job from before the tally started
        old = await job_with_tasks(store, b, [S.SUCCEEDED, S.FAILED])
        await store.update_job(old.job_id, {"state": J.COMPLETED})
        running = await job_with_tasks(store, b, [S.PENDING, S.SUCCEEDED], priority=1)
        tasks, jobs, out = await tally.refresh()
        assert jobs == {"COMPLETED": 1, "RUNNING": 1}
        assert tasks == {"SUCCEEDED": 2, "FAILED": 1, "PENDING": 1}
        assert out == [(running.job_id, 0.25, None)]
        # new jobs, one of them finished at once; one cancelled with a task still moving
        clock.now += 10
        second = await job_with_tasks(store, b, [S.NOTIFIED], priority=5)
        quick = await b.jobs.create(OP, Selection(capability="none"))
        assert quick.state == J.COMPLETED
        await b.jobs.cancel(running.job_id)
        tasks, jobs, out = await tally.refresh()
        assert jobs == {"COMPLETED": 2, "CANCELLED": 1, "RUNNING": 1}, jobs
        assert tasks == {"SUCCEEDED": 2, "FAILED": 1, "CANCELLED": 1, "NOTIFIED": 1}, tasks
        assert [o[0] for o in out] == [second.job_id]
        # refreshing again counts nothing twice
        clock.now += 10
        assert await tally.refresh() == (tasks, jobs, out)
        # the RUNNING ones: priority first, then the older
        clock.now += 10
        third = await job_with_tasks(store, b, [S.SUCCEEDED], priority=5)
        fourth = await job_with_tasks(store, b, [S.PENDING], priority=9)
        tasks, jobs, out = await tally.refresh()
        assert [o[0] for o in out] == [fourth.job_id, second.job_id, third.job_id]
        assert jobs == {"COMPLETED": 2, "CANCELLED": 1, "RUNNING": 3}
        assert out[2][1] == pytest.approx(1 / 3) and out[2][2] is None   # no time passed
        # a job ends: it moves from the open ones to the settled tally, once
        await b.jobs.cancel(fourth.job_id)
        clock.now += 1
        tasks2, jobs2, out2 = await tally.refresh()
        assert jobs2 == {"COMPLETED": 2, "CANCELLED": 2, "RUNNING": 2}
        assert tasks2 == {"SUCCEEDED": 3, "FAILED": 1, "CANCELLED": 2, "NOTIFIED": 1}, tasks2
        clock.now += 1000
        assert (await tally.refresh())[1] == jobs2
    run(main())


def test_job_tally_sees_a_job_made_and_ended_between_refreshes():
    async def main() -> None:
        clock = Clock(time.time())
        store, b = await broker(clock)
        tally = JobTally(store, clock)
        assert await tally.refresh() == ({}, {}, [])
        clock.now += 5
        j = await job_with_tasks(store, b, [S.SUCCEEDED, S.SUCCEEDED])
        await store.update_job(j.job_id, {"state": J.COMPLETED})
        cancelled = await job_with_tasks(store, b, [S.PENDING])
        await store.update_job(cancelled.job_id, {"state": J.CANCELLED})   # tasks not yet
        clock.now += 5
        tasks, jobs, out = await tally.refresh()
        assert jobs == {"COMPLETED": 1, "CANCELLED": 1} and out == []
        assert tasks == {"SUCCEEDED": 2, "PENDING": 1}
        for t in (await store.tasks_by_job(cancelled.job_id, limit=5)).items:
            await b.tasks.finish(t, S.CANCELLED, "late")
        clock.now += 5
        tasks, jobs, out = await tally.refresh()
        assert jobs == {"COMPLETED": 1, "CANCELLED": 1}
        assert tasks == {"SUCCEEDED": 2, "CANCELLED": 1}
        # a deleted open job is dropped, not an error
        clock.now += 5
        assert (await tally.refresh())[1] == jobs
    run(main())


# --- what the first mutation run left (issue 18) ---------------------------------------------

def test_every_query_filter_selects_alone():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        await store.import_devices([
            Device(dev_id="IMEI:356938031111111", imei="356938031111111",
                   devinfo={"./DevInfo/Mod": "EX100"}, devdetail={"./DevDetail/FwV": "2.0"}),
            Device(dev_id="IMEI:490154202222222", imei="490154202222222",
                   devinfo={"./DevInfo/Mod": "EX200"}, devdetail={"./DevDetail/FwV": "2.0"}),
            Device(dev_id="IMEI:490154203333333", imei="490154203333333",
                   devinfo={"./DevInfo/Mod": "EX100"}, devdetail={"./DevDetail/FwV": "3.1"})])
        for sel, want in ((Selection(tac="49015420"), 2), (Selection(model="EX100"), 2),
                          (Selection(firmware="3.1"), 1), (Selection(model="EX300"), 0)):
            job = await b.jobs.create(OP, sel)
            assert job.targets == want, (sel, job)
    run(main())


def test_default_page_sizes_and_a_paged_listing_without_owner():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        made = [await b.jobs.create(OP, Selection(dev_ids=ids(1))) for _ in range(101)]
        page = await b.jobs.list()
        assert len(page.items) == 100 and page.next_cursor is not None
        rest = await b.jobs.list(cursor=page.next_cursor)
        assert [j.job_id for j in page.items + rest.items] == sorted(j.job_id for j in made)
        page = await b.jobs.by_date(0, 2 ** 40)
        assert len(page.items) == 100
        job = await job_with_tasks(store, b, [S.PENDING] * 101)
        assert len((await b.jobs.tasks_of(job.job_id)).items) == 100
    run(main())


def test_create_defaults_and_its_log_line(caplog):
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        with caplog.at_level(logging.INFO, logger="dmengine.bulk"):
            job = await b.jobs.create(OP, Selection(dev_ids=ids(2)))
        assert (job.name, job.owner, job.b_optin, job.accept_device_policy, job.test_cycle,
                job.rate_limit, job.concurrency, job.windows, job.tz, job.stop_rule,
                job.stages, job.priority, job.start_at, job.end_at) == \
            ("", "", False, 10, False, None, None, [], None, None, [], 0, None, None)
        (rec,) = [r for r in caplog.records if r.name == "dmengine.bulk"]
        assert rec.getMessage() == "job created: 2 devices, RUNNING"
        assert rec.dm_job == job.job_id
        assert b.jobs.task_for(job, "IMEI:7", 100.0).dev_id == "IMEI:7"
    run(main())


def test_view_counts_successes_only_when_there_are_some():
    v = view(Job(job_id="j", targets=2, total=2, counts={S.FAILED: 1},
                 test_counts={S.EXPIRED: 1}), 0.0)
    assert (v.succeeded, v.failed, v.final) == (0, 2, 2)


def test_window_wait_reads_seconds_and_fractions():
    # a 30-second window at 01:59:30 (sec = h*3600 + m*60 + s exactly)
    w = [TimeWindow(start=7170, end=7200)]
    assert window_wait(w, None, MONDAY + 7185) == 0.0
    assert window_wait(w, None, MONDAY + 7169) == 1.0
    # a fraction of a second is kept: the wait ends when the window opens, not a bit after
    assert window_wait([TimeWindow(start=H, end=2 * H)], None, MONDAY + 1800.5) == 1799.5
    # a window not on today's list does not hide the next one of the same day
    two = [TimeWindow(start=10 * H, end=11 * H, days=[3]), TimeWindow(start=5 * H, end=6 * H,
                                                                   days=[0])]
    assert window_wait(two, None, MONDAY + 4 * H) == 1 * H


def test_restart_in_the_last_stage_does_not_step_past_it():
    async def main() -> None:
        store, b = await broker(Clock(MONDAY))
        job = await b.jobs.create(OP, Selection(dev_ids=ids(4)),
                                  stages=[Stage(percent=50), Stage(percent=100)])
        await store.update_job(job.job_id, {"stage": 1})
        await store.create_job_tasks(job.job_id, 0, [
            Task(task_id=f"t{i}", dev_id=d, op=OP, job_id=job.job_id, correlator=f"t{i}",
                 state=S.SUCCEEDED) for i, d in enumerate(ids(4))])
        await b.jobs.pause(job.job_id)
        assert (await b.jobs.restart(job.job_id)).stage == 1
    run(main())


def test_job_tally_of_old_jobs_counts_each_once():
    """Jobs created long before the tally's clock (not in its recent-ids memo): each counted
    once over many refreshes."""
    async def main() -> None:
        clock = Clock(time.time() + 5000)
        store, b = await broker(clock)
        done = await job_with_tasks(store, b, [S.SUCCEEDED])
        await store.update_job(done.job_id, {"state": J.COMPLETED})
        await job_with_tasks(store, b, [S.PENDING])
        tally = JobTally(store, clock)
        for _ in range(3):
            tasks, jobs, _ = await tally.refresh()
            assert jobs == {"COMPLETED": 1, "RUNNING": 1}, jobs
            assert tasks == {"SUCCEEDED": 1, "PENDING": 1}, tasks
            clock.now += 1
    run(main())


def test_job_tally_of_a_job_ended_with_tasks_still_moving():
    async def main() -> None:
        clock = Clock(time.time())
        store, b = await broker(clock)
        tally = JobTally(store, clock)
        job = await job_with_tasks(store, b, [S.PENDING, S.SUCCEEDED])
        assert (await tally.refresh())[1] == {"RUNNING": 1}
        await store.update_job(job.job_id, {"state": J.CANCELLED})     # its tasks: later
        clock.now += 1
        tasks, jobs, out = await tally.refresh()
        assert jobs == {"CANCELLED": 1} and tasks == {"PENDING": 1, "SUCCEEDED": 1}
        assert out == []
        for t in (await store.tasks_by_job(job.job_id, limit=5)).items:
            if t.state == S.PENDING:
                await b.tasks.finish(t, S.CANCELLED, "late")
        clock.now += 1
        tasks, jobs, _ = await tally.refresh()
        assert jobs == {"CANCELLED": 1} and tasks == {"CANCELLED": 1, "SUCCEEDED": 1}
    run(main())


def test_job_tally_sees_a_job_that_ended_within_the_last_second():
    async def main() -> None:
        clock = Clock(time.time())
        store, b = await broker(clock)
        tally = JobTally(store, clock)
        await tally.refresh()
        job = await job_with_tasks(store, b, [S.SUCCEEDED])
        await store.update_job(job.job_id, {"state": J.COMPLETED})
        clock.now = (await store.get_job(job.job_id)).created      # made at this very time
        assert (await tally.refresh())[1] == {"COMPLETED": 1}
    run(main())


def test_job_tally_orders_running_jobs_by_their_start():
    async def main() -> None:
        clock = Clock(time.time())
        store, b = await broker(clock)
        first = await job_with_tasks(store, b, [S.PENDING])      # created first …
        second = await job_with_tasks(store, b, [S.PENDING])
        await store.update_job(first.job_id, {"started": clock.now + 50})   # … started last
        await store.update_job(second.job_id, {"started": clock.now + 10})
        _, _, out = await JobTally(store, clock).refresh()
        assert [o[0] for o in out] == [second.job_id, first.job_id]
    run(main())
