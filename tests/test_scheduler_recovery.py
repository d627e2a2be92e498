"""Issue 14, the scheduler in-process (memory store, a recording loopback gateway, a clock the
test moves): what a restart puts back (``Scheduler.recover``), and retries of a paced job —
they go before its new tasks and, when over its rate, come back within a pass or two, not
after the whole claim lease."""
from __future__ import annotations

import asyncio
import time
from typing import Any

from dmengine.broker import Broker
from dmengine.config import BrokerConfig
from dmengine.model import (Device, DmAccount, Job, JobState, QueryOp, Selection, Task,
                            TaskResult, TaskState, UpdateOp)
from dmengine.notify.loopback import LoopbackGateway
from dmengine.store.memory import MemoryStore

S = TaskState
J = JobState


def device(i: int) -> Device:
    imei = f"35693803{i:07d}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+4917{i:08d}", capability="cap-x",
                  account=DmAccount(server_id="dmengine", client_name=f"dev{i}",
                                    client_password="cpw", server_password="spw"))


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


async def world(n: int, clock: Clock, **cfg: Any) -> tuple[MemoryStore, Broker, list[tuple[float, str]]]:
    store = MemoryStore()
    sent: list[tuple[float, str]] = []

    async def receive(msisdn: str, pkg0: bytes) -> bool:
        sent.append((clock.now, msisdn))       # the phones are off: nobody connects
        return True
    config = BrokerConfig(retry_jitter=0.0, **cfg)
    broker = Broker(store, LoopbackGateway(receive), config=config, clock=clock)
    await store.import_devices(device(i) for i in range(n))
    return store, broker, sent


def test_a_paced_jobs_retries_go_first_and_are_not_held_for_a_lease():
    """500 silent devices at 10 notifications/s (50 s to start them all), a retry after 5 s:
    the first devices are notified again after about 5 s — not once every target started, nor
    a claim lease (120 s) later — and the job's rate holds throughout."""
    async def main() -> None:
        clock = Clock(time.time())
        store, broker, sent = await world(500, clock, retry_delays=(5.0,), max_notifications=3)
        job = await broker.jobs.create(QueryOp(nodes=["./DevInfo/Mod"]),
                                       Selection(capability="cap-x"), rate_limit=10)
        start = clock.now
        for _ in range(30):
            await broker.scheduler.tick()
            clock.now += 1.0
        per_device: dict[str, list[float]] = {}
        for t, msisdn in sent:
            per_device.setdefault(msisdn, []).append(t - start)
        first = device(0).msisdn
        assert len(per_device[first]) >= 2, per_device[first]
        assert per_device[first][1] - per_device[first][0] <= 7.0, per_device[first]
        # the rate holds: at most 10 a second (plus the one token the bucket starts with)
        per_second: dict[int, int] = {}
        for t, _ in sent:
            per_second[round(t - start)] = per_second.get(round(t - start), 0) + 1
        assert max(per_second.values()) <= 10, per_second
        assert sum(per_second.values()) >= 250        # and it is used
        j = await store.get_job(job.job_id)
        assert j.total < 500                           # retries took part of the budget
        await store.close()
    asyncio.run(main())


def _task(tid: str, job_id: str, i: int, **kw: Any) -> Task:
    kw.setdefault("op", QueryOp(nodes=["./DevInfo/Mod"]))
    return Task(task_id=tid, job_id=job_id, dev_id=device(i).dev_id, correlator=tid, **kw)


def test_recover_puts_back_what_the_dead_process_held():
    async def main() -> None:
        clock = Clock(time.time())
        store, broker, _ = await world(8, clock)
        await store.create_job(Job(job_id="j", state=J.RUNNING))
        await store.create_job(Job(job_id="done", state=J.COMPLETED))
        now = clock.now
        fumo = UpdateOp(content_id="fw")
        accepted = TaskResult(statuses={"Exec ./FUMO/1/DownloadAndUpdate": 202})
        await store.create_tasks([
            _task("notified", "j", 0, state=S.NOTIFIED, next_attempt=now + 60, attempts=1),
            _task("claimed", "j", 1, next_attempt=now + 120),           # made, never notified
            _task("due", "j", 2, next_attempt=now - 1),                  # due anyway
            _task("cut", "j", 3, state=S.IN_PROGRESS, attempts=1),       # session cut off
            _task("asking", "j", 4, state=S.WAITING_USER, attempts=1),
            _task("fumo", "j", 5, state=S.IN_PROGRESS, op=fumo, result=accepted, attempts=1),
            _task("fumo-cut", "j", 6, state=S.IN_PROGRESS, op=fumo, attempts=1),
            _task("other", "done", 7, state=S.IN_PROGRESS, attempts=1),  # not an open job
        ])
        n = await broker.scheduler.recover()
        got = {t.task_id: t for t in (await store.tasks_by_job("j", limit=100)).items}
        back = {tid for tid, t in got.items() if t.state == S.PENDING and t.next_attempt == now}
        assert back == {"notified", "claimed", "cut", "asking", "fumo-cut"} and n == 5
        assert got["due"].next_attempt == now - 1 and got["due"].history_len == 1
        # a FUMO Exec the device accepted is not sent again: its outcome comes by alert
        assert got["fumo"].state == S.IN_PROGRESS and got["fumo"].history_len == 1
        assert (await store.get_task("other")).state == S.IN_PROGRESS
        assert got["cut"].attempts == 1                  # a restart is not a notification
        # and the next pass notifies them at once
        await broker.scheduler.tick()
        after = {t.task_id: t.state for t in (await store.tasks_by_job("j", limit=100)).items}
        assert all(after[t] == S.NOTIFIED for t in back | {"due"}), after
        assert await store.check() == []
        await store.close()
    asyncio.run(main())


def test_recover_leaves_tasks_in_their_own_backoff_alone():
    """A task the dead process last touched more than a claim lease ago is in its ordinary
    backoff: a restart does not notify it early."""
    async def main() -> None:
        clock = Clock(time.time() + 3600)               # restarted an hour later
        store, broker, _ = await world(2, clock)
        await store.create_job(Job(job_id="j", state=J.RUNNING))
        await store.create_tasks([
            _task("waiting", "j", 0, state=S.NOTIFIED, next_attempt=clock.now + 600, attempts=2),
            _task("cut", "j", 1, state=S.IN_PROGRESS, attempts=1)])
        assert await broker.scheduler.recover() == 1
        assert (await store.get_task("waiting")).next_attempt == clock.now + 600
        assert (await store.get_task("cut")).state == S.PENDING
        await store.close()
    asyncio.run(main())
