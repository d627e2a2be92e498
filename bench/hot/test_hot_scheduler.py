"""Hot path: a scheduler pass (L4) over an LMDB store, as ``bench jobs`` (b) times it.

The store holds one RUNNING QUERY job with 10,000 tasks, nine in ten final and the rest due
only in 11 days.  Before each timed pass (outside the timing) 100 more tasks of new devices
are made due now; the pass (``Scheduler.tick()``: expiry, the jobs' step, claims of due work,
notifications) notifies them: device read, NOTIFIED written, package #0 built and handed to a
loopback gateway whose callback only counts.

The store lives in /dev/shm (``ram_dir``): the pass's own work, not the shared disk's fsync
latency (which moved the busy pass's fastest round by 1.75x between runs here).

Baseline: the idle pass over the same store (nothing due): what a pass costs before it does
any work, so the busy pass's ratio to it reads as the cost of the 100 notifications.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from dmengine.broker import Broker
from dmengine.config import BrokerConfig
from dmengine.model import Device, DmAccount, Job, JobState, QueryOp, Task, TaskState
from dmengine.notify.loopback import LoopbackGateway
from dmengine.store.lmdb import LmdbStore

DUE = 100              # tasks due in each timed pass
STORED = 10_000        # filler tasks in the job
ROUNDS = 150           # timed busy passes
FAR = 11 * 86400.0
OP = QueryOp(nodes=["./DevInfo/Mod"])


def _device(i: int) -> Device:
    imei = f"{356938000000000 + i}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+49170{i:08d}",
                  account=DmAccount(server_id="acme-dms", client_name=f"dev{i}",
                                    client_password=f"cpw{i}", server_password=f"spw{i}",
                                    client_key="DV4giKozqa1xsMX/tjaQjQ==",
                                    server_key="qIUiuFQooZcVh8cn6FkGFQ=="))


class Counting:
    """A loopback gateway's receiver that only counts."""

    def __init__(self) -> None:
        self.n = 0

    async def __call__(self, msisdn: str, pkg0: bytes) -> bool:
        self.n += 1
        return True


class World:
    def __init__(self, store: LmdbStore, sched: Any, counting: Counting) -> None:
        self.store = store
        self.sched = sched
        self.counting = counting
        self.next_device = 0
        self.next_task = 0

    async def grow(self) -> None:
        now = time.time()
        await self.store.create_job(Job(job_id="hot", state=JobState.RUNNING, op=OP))
        ids = [f"IMEI:{100000000000000 + i}" for i in range(STORED)]
        await self.store.add_job_targets("hot", ids)
        tasks = [Task(task_id=f"f{i:08d}", dev_id=d, op=OP, job_id="hot", state=TaskState.SUCCEEDED,
                      finished=now) if i % 10 else
                 Task(task_id=f"f{i:08d}", dev_id=d, op=OP, job_id="hot", next_attempt=now + FAR,
                      deadline=now + 2 * FAR) for i, d in enumerate(ids)]
        await self.store.create_job_tasks("hot", 0, tasks)

    async def add_due(self) -> None:
        job = await self.store.get_job("hot")
        first = self.next_device
        self.next_device += DUE
        ids = [_device(first + i).dev_id for i in range(DUE)]
        await self.store.add_job_targets("hot", ids)
        now = time.time()
        await self.store.create_job_tasks("hot", job.total, [
            Task(task_id=f"d{first + i:08d}", dev_id=d, op=OP, job_id="hot", next_attempt=now - 1,
                 deadline=now + FAR) for i, d in enumerate(ids)])


@pytest.fixture(scope="module")
def world(loop, ram_dir) -> Iterator[World]:
    store = LmdbStore(str(ram_dir / "sched"))
    counting = Counting()
    sched = Broker(store, LoopbackGateway(counting), config=BrokerConfig()).scheduler
    w = World(store, sched, counting)

    async def setup() -> None:
        # devices for every busy pass (the benchmark's own rounds and pytest-benchmark's
        # warm-up), imported in one go
        await store.import_devices(_device(i) for i in range(DUE * (ROUNDS + 20)))
        await w.grow()
    loop.run_until_complete(setup())
    yield w
    loop.run_until_complete(store.close())


def test_scheduler_pass_100_due(benchmark, loop, world):
    benchmark.group = f"scheduler pass ({STORED:,} tasks stored)"

    def setup() -> tuple[tuple[()], dict[str, Any]]:
        loop.run_until_complete(world.add_due())
        return (), {}

    def one() -> int:
        before = world.counting.n
        touched = loop.run_until_complete(world.sched.tick())
        assert touched == DUE and world.counting.n - before == DUE, (touched, world.counting.n)
        return touched
    benchmark.pedantic(one, setup=setup, rounds=ROUNDS, warmup_rounds=3)


def test_scheduler_pass_idle(benchmark, loop, world):
    benchmark.group = f"scheduler pass ({STORED:,} tasks stored)"

    def one() -> int:
        touched = loop.run_until_complete(world.sched.tick())
        assert touched == 0, touched
        return touched
    benchmark(one)
