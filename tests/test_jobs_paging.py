"""Issue 14: paging over a job's 100,000 tasks with cursors (real LMDB, store level).

The job's tasks are made as the scheduler makes them — ``add_job_targets`` then
``create_job_tasks`` in batches — in three states, so that both listings are walked:
``tasks_by_job`` (every task once, in creation order) and ``tasks_by_job(state=...)`` (every
task of that state once, in order, nothing of another state)."""
from __future__ import annotations

import asyncio
import time

from dmengine.model import Job, JobState, QueryOp, Task, TaskState
from dmengine.store.lmdb import LmdbStore

S = TaskState
N = 100_000
BATCH = 5_000
STATES = (S.PENDING, S.NOTIFIED, S.SUCCEEDED)
OP = QueryOp(nodes=["./DevInfo/Mod"])


def state_of(i: int) -> TaskState:
    return STATES[i % 3] if i % 7 else S.FAILED


async def make_job(store: LmdbStore) -> None:
    await store.create_job(Job(job_id="big", state=JobState.RUNNING))
    dev = [f"IMEI:{356938000000000 + i}" for i in range(N)]
    for i in range(0, N, 10_000):
        await store.add_job_targets("big", dev[i:i + 10_000])
    total = 0
    while total < N:
        ids = await store.job_targets("big", total, BATCH)
        made = await store.create_job_tasks("big", total, [
            Task(task_id=f"t{total + k:06d}", dev_id=d, op=OP, job_id="big",
                 state=state_of(total + k), next_attempt=1e9 + total + k)
            for k, d in enumerate(ids)])
        total += len(made)


async def walk(store: LmdbStore, state: TaskState | None) -> list[Task]:
    out: list[Task] = []
    cursor = None
    while True:
        page = await store.tasks_by_job("big", state=state, cursor=cursor, limit=1000)
        assert len(page.items) <= 1000
        out.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            return out
        assert page.items, "a page with a cursor onward is never empty here"


async def walk_from(store: LmdbStore, cursor: str | None) -> list[Task]:
    out: list[Task] = []
    while cursor is not None:
        page = await store.tasks_by_job("big", cursor=cursor, limit=1000)
        out.extend(page.items)
        cursor = page.next_cursor
    return out


def test_paging_over_100k_tasks(tmp_path):
    async def main() -> None:
        t0 = time.monotonic()
        store = LmdbStore(tmp_path / "store")
        try:
            await make_job(store)
            job = await store.get_job("big")
            want: dict[TaskState, int] = {}
            for i in range(N):
                want[state_of(i)] = want.get(state_of(i), 0) + 1
            assert job.targets == N and job.total == N and job.counts == want
            made = time.monotonic() - t0

            every = await walk(store, None)
            assert len(every) == N
            assert [t.task_id for t in every] == [f"t{i:06d}" for i in range(N)]   # once, in order
            assert [t.seq for t in every] == sorted(t.seq for t in every)
            assert len({t.dev_id for t in every}) == N
            for st, n in want.items():
                got = await walk(store, st)
                assert len(got) == n, (st, len(got), n)
                assert all(t.state == st for t in got)
                ids = [t.task_id for t in got]
                assert ids == [f"t{i:06d}" for i in range(N) if state_of(i) == st]
            assert (await store.tasks_by_job("big", state=S.CANCELLED)).items == []
            # a task changing state between two pages: the listing by job still has every
            # task once, the listing by state sees it in its new state
            first = await store.tasks_by_job("big", limit=1000)
            mid = next(t for t in every[50_000:] if t.state == S.PENDING)
            await store.transition(mid.task_id, S.IN_PROGRESS)
            rest = await walk_from(store, first.next_cursor)
            assert [t.task_id for t in first.items + rest] == [f"t{i:06d}" for i in range(N)]
            assert [t.task_id for t in await walk(store, S.IN_PROGRESS)] == [mid.task_id]
            assert len(await walk(store, S.PENDING)) == want[S.PENDING] - 1
            assert time.monotonic() - t0 < 60, f"made in {made:.1f} s, walked in " \
                                              f"{time.monotonic() - t0 - made:.1f} s"
        finally:
            await store.close()

    asyncio.run(main())
