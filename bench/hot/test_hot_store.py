"""Hot path: a group-committed batch of task transitions in the LMDB store (L0), on tmpfs.

``store commit batch``: 256 callers each move their own task one step (NOTIFIED →
IN_PROGRESS → PENDING → NOTIFIED …) at once, as the device port and the scheduler do under
load; ``LmdbStore.transition`` reads the task, moves its state, appends a history entry, moves
its job-state index row and the job's counters, and the writer thread commits what is queued
in one transaction with a real sync before any caller is answered.  One benchmark call is the
whole batch (256 acknowledged transitions).

Baseline: raw py-lmdb on an environment opened with the store's flags (``sync=True,
metasync=True``): one write transaction putting 256 task-sized records and 256 history-sized
records, committed — the commit with none of the store's work.

Both live in /dev/shm (``ram_dir``): the sync is still called but costs nothing, so what is
measured is the CPU work of a batch (the shared disk's fsync latency moved it 1.6x between
runs); ``bench store`` measures durable transitions per second on disk.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import lmdb
import pytest

from dmengine.model import Job, Task, TaskState, UpdateOp
from dmengine.store.lmdb import LmdbStore

CALLERS = 256
MOVES = (TaskState.NOTIFIED, TaskState.IN_PROGRESS, TaskState.PENDING)


@pytest.fixture(scope="module")
def store(loop, ram_dir) -> Iterator[LmdbStore]:
    s = LmdbStore(str(ram_dir / "store"))

    async def setup() -> None:
        await s.create_job(Job(job_id="hot-job"))
        await s.create_tasks([Task(task_id=f"ht{i:06d}", dev_id=f"IMEI:{350000000000000 + i}",
                                   job_id="hot-job", op=UpdateOp(content_id="fw-2"),
                                   correlator=f"corr{i}") for i in range(CALLERS)])
    loop.run_until_complete(setup())
    yield s
    loop.run_until_complete(s.close())


def test_store_commit_batch(benchmark, loop, store):
    benchmark.group = f"store commit batch ({CALLERS} transitions, tmpfs)"
    ids = [f"ht{i:06d}" for i in range(CALLERS)]
    step = iter(range(1 << 62))

    async def batch(to: TaskState) -> None:
        await asyncio.gather(*(store.transition(t, to, cause="bench", dm_status=200)
                               for t in ids))

    def one() -> None:
        loop.run_until_complete(batch(MOVES[next(step) % 3]))
    ops0 = store.ops
    benchmark(one)
    assert store.ops - ops0 >= CALLERS


def test_store_commit_batch_raw_lmdb(benchmark, ram_dir):
    """The same number of records, committed with py-lmdb alone."""
    benchmark.group = f"store commit batch ({CALLERS} transitions, tmpfs)"
    env = lmdb.open(str(ram_dir / "raw"), map_size=256 << 20, max_dbs=4, sync=True,
                    metasync=True, writemap=False, map_async=False)
    tasks = env.open_db(b"tasks")
    history = env.open_db(b"history")
    task_value = os.urandom(600)          # about a task record with its operation and counters
    hist_value = os.urandom(120)          # about one history entry
    keys = [f"ht{i:06d}".encode() for i in range(CALLERS)]
    step = iter(range(1 << 62))

    def one() -> None:
        n = next(step).to_bytes(4, "big")
        with env.begin(write=True) as txn:
            for k in keys:
                txn.put(k, task_value, db=tasks)
                txn.put(k + b"\x00" + n, hist_value, db=history)
    try:
        benchmark(one)
    finally:
        env.close()


# --- device reads through a full read cache ----------------------------------------------

#: devices in the store; the read cache holds a tenth of them, so nearly every read of a
#: campaign's next devices misses and evicts (as at 1M devices with the default 100k cache)
READ_DEVICES = 20_000
READ_CACHE = 2_000
READS = 500


def _devices(n: int) -> list:
    from dmengine.model import Device
    return [Device(dev_id=f"IMEI:{350000000000000 + i}") for i in range(n)]


@pytest.fixture(scope="module")
def read_stores(loop, ram_dir) -> Iterator[tuple[LmdbStore, LmdbStore]]:
    cached = LmdbStore(str(ram_dir / "cached"), read_cache_size=READ_CACHE)
    plain = LmdbStore(str(ram_dir / "plain"), read_cache_size=0)

    async def setup() -> None:
        devices = _devices(READ_DEVICES)
        for s in (cached, plain):
            await s.import_devices(devices)
    loop.run_until_complete(setup())
    yield cached, plain
    for s in (cached, plain):
        loop.run_until_complete(s.close())


def _reader(loop, store: LmdbStore):
    """One call: the next READS devices in a cycle over all of them (so every read misses a
    cache that holds a tenth of them, and each miss evicts its oldest entry)."""
    ids = [f"IMEI:{350000000000000 + i}" for i in range(READ_DEVICES)]
    at = [0]

    async def reads() -> None:
        i = at[0]
        for k in range(i, i + READS):
            await store.get_device(ids[k % READ_DEVICES])
        at[0] = (i + READS) % READ_DEVICES

    def one() -> None:
        loop.run_until_complete(reads())
    return one


def test_store_device_reads_full_cache(benchmark, loop, read_stores):
    """Misses of a full read cache (decode + keep + evict the oldest).  Before the cache was
    an OrderedDict, each eviction walked the deleted slots at the front of a plain dict:
    ~100 µs per miss at 100,000 entries, growing with the cache (issue 16)."""
    benchmark.group = f"device reads, {READS} misses of a full read cache ({READ_CACHE:,})"
    cached, _ = read_stores
    one = _reader(loop, cached)
    for _ in range(READ_DEVICES // READS):     # fill the cache: the benchmark sees a full one
        one()
    benchmark(one)
    assert len(cached._cache) == READ_CACHE


def test_store_device_reads_no_cache(benchmark, loop, read_stores):
    """The same reads with the read cache off (decode every time): the baseline."""
    benchmark.group = f"device reads, {READS} misses of a full read cache ({READ_CACHE:,})"
    _, plain = read_stores
    benchmark(_reader(loop, plain))
