"""LMDB (group commit, write buffer, batch prefetch, rollback-and-replay) against memory (one op
at a time): random concurrent operation mixes must give the same answers, the same keys in every
database, and a clean check on both."""
from __future__ import annotations

import asyncio
import pathlib
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmengine.model import Device, Job, OutboxEntry, QueryOp, Task, TaskState
from dmengine.store.kv import DBS, KVStore
from dmengine.store.lmdb import LmdbStore
from dmengine.store.memory import MemoryStore

N_DEV = 6
N_TASK = 6
STATES = list(TaskState)


def _dev(i: int, m: int) -> Device:
    imei = f"3569380300000{i:02d}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=f"+4917000000{m:02d}")


op_st = st.one_of(
    st.tuples(st.just("put_device"), st.integers(0, N_DEV - 1), st.integers(0, 3)),
    st.tuples(st.just("create_device"), st.integers(0, N_DEV - 1), st.integers(0, 3)),
    st.tuples(st.just("delete_device"), st.integers(0, N_DEV - 1)),
    st.tuples(st.just("import"), st.lists(st.tuples(st.integers(0, N_DEV - 1),
                                                    st.integers(0, 3)), max_size=4)),
    st.tuples(st.just("create_task"), st.integers(0, N_TASK - 1), st.booleans(),
              st.sampled_from(STATES[:4])),
    st.tuples(st.just("transition"), st.integers(0, N_TASK - 1), st.sampled_from(STATES),
              st.booleans()),
    st.tuples(st.just("enqueue"), st.integers(0, 3), st.integers(1, 50)),
    st.tuples(st.just("ack"), st.integers(0, 3)),
)


def _call(s: KVStore, op: tuple[Any, ...]) -> Any:
    kind = op[0]
    if kind == "put_device":
        return s.put_device(_dev(op[1], op[2]))
    if kind == "create_device":
        return s.create_device(_dev(op[1], op[2]))
    if kind == "delete_device":
        return s.delete_device(_dev(op[1], 0).dev_id)
    if kind == "import":
        # one chunk: a multi-chunk import interleaves differently (both orders are serial)
        return s.import_devices([_dev(i, m) for i, m in op[1]], chunk=10)
    if kind == "create_task":
        return s.create_task(Task(task_id=f"t{op[1]}", dev_id="IMEI:1", job_id="j" if op[2] else None,
                                  state=op[3], op=QueryOp(nodes=["./DevInfo/Mod"]),
                                  next_attempt=float(op[1] + 1), correlator=f"c{op[1]}"))
    if kind == "transition":
        changes = {"next_attempt": 100.0 + op[1]} if op[3] else None
        return s.transition(f"t{op[1]}", op[2], changes=changes)
    if kind == "enqueue":
        return s.enqueue(OutboxEntry(entry_id=f"o{op[1]}", kind="webhook", due=float(op[2])))
    if kind == "ack":
        return s.ack(f"o{op[1]}")
    raise AssertionError(kind)


def _shape(r: Any) -> Any:
    """An answer without its timestamps."""
    if isinstance(r, BaseException):
        return (type(r).__name__, str(r))
    if isinstance(r, Device):
        return ("dev", r.dev_id, r.imei, r.msisdn)
    if isinstance(r, Task):
        return ("task", r.task_id, r.state, r.seq, r.version, r.history_len, r.next_attempt)
    if isinstance(r, OutboxEntry):
        return ("out", r.entry_id, r.due)
    if r is None:
        return None
    return ("report", r.created, r.replaced, sorted((i, w) for i, w, _ in r.rejected))


async def _run(s: KVStore, rounds: list[list[tuple[Any, ...]]]) -> tuple[list[Any], dict[str, list[bytes]]]:
    await s.create_job(Job(job_id="j", created=1.0))
    answers = []
    for ops in rounds:
        res = await asyncio.gather(*(_call(s, op) for op in ops), return_exceptions=True)
        answers += [_shape(r) for r in res]
    assert await s.check() == []
    keys = await s._read(lambda txn: {db: [k for k, _ in txn.scan(db, b"", None)] for db in DBS})
    await s.close()
    return answers, keys


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds=st.lists(st.lists(op_st, min_size=1, max_size=12), min_size=1, max_size=4))
def test_lmdb_and_memory_agree(rounds: list[list[tuple[Any, ...]]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        lm = asyncio.run(_run(LmdbStore(pathlib.Path(d) / "env", map_size=1 << 16), rounds))
    mem = asyncio.run(_run(MemoryStore(), rounds))
    assert lm[0] == mem[0]
    for db in DBS:
        if db == "meta":
            continue
        assert lm[1][db] == mem[1][db], db
