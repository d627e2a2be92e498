"""The LMDB write path after the speed work: import details, argument checks, append mode,
map growth between batches.  Same contract on both stores where it applies."""
from __future__ import annotations

import asyncio
import pathlib

import pytest

from dmengine.errors import ValidationError
from dmengine.model import Device, QueryOp, Task, TaskState
from dmengine.store.lmdb import LmdbStore
from dmengine.store.memory import MemoryStore


def dev(i: int, **kw) -> Device:
    return Device(dev_id=f"IMEI:35{i:013d}", imei=f"35{i:013d}", msisdn=f"+4917{i:08d}", **kw)


@pytest.fixture(params=["lmdb", "memory"])
def make_store(request, tmp_path):
    def make(**kw):
        if request.param == "lmdb":
            return LmdbStore(tmp_path / "env", **kw)
        return MemoryStore()
    return make


def test_replaced_device_keeps_its_created_time(make_store):
    async def main() -> None:
        s = make_store()
        first = await s.create_device(dev(1))
        assert first.created > 0
        await asyncio.sleep(0.01)
        rep = await s.import_devices([dev(1, capability="cap-b")], replace=True)
        assert rep.replaced == 1
        again = await s.get_device(dev(1).dev_id)
        assert again.capability == "cap-b"
        assert again.created == first.created
        assert again.updated > first.created
        await s.close()
    asyncio.run(main())


def test_import_rejects_a_non_device_entry_alone(make_store):
    async def main() -> None:
        s = make_store()
        rep = await s.import_devices([dev(2), "not a device", dev(3)])   # type: ignore[list-item]
        assert rep.created == 2
        assert [(i, where) for i, where, _ in rep.rejected] == [(1, "$")]
        assert (await s.get_device(dev(3).dev_id)).msisdn == dev(3).msisdn
        assert await s.check() == []
        await s.close()
    asyncio.run(main())


@pytest.mark.parametrize("kw,where", [
    ({"dm_status": "200"}, "dm_status"),
    ({"result_code": 1.5}, "result_code"),
    ({"cause": 42}, "cause"),
])
def test_transition_arguments_are_checked(make_store, kw, where):
    async def main() -> None:
        s = make_store()
        await s.create_task(Task(task_id="t1", dev_id="IMEI:1", op=QueryOp(nodes=["./A"])))
        with pytest.raises(ValidationError) as ei:
            await s.transition("t1", TaskState.NOTIFIED, **kw)
        assert where in (ei.value.where or "")
        task = await s.get_task("t1")
        assert task.state == TaskState.PENDING         # nothing written
        assert len((await s.task_history("t1")).items) == 1
        await s.close()
    asyncio.run(main())


def test_append_path_and_a_key_below_the_last(tmp_path: pathlib.Path):
    """Ascending ids go in with MDB_APPEND; an id that sorts below the last one must still
    land (the append path may not be taken for it) and every index must agree."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "env")
        await s.import_devices([dev(i) for i in range(100, 400)])
        await s.import_devices([dev(i) for i in range(0, 50)])        # below the last key
        await s.create_device(dev(60))
        page = await s.list_devices(limit=1000)
        ids = [d.dev_id for d in page.items]
        assert len(ids) == 351 and ids == sorted(ids)
        assert (await s.device_by_msisdn(dev(7).msisdn)).dev_id == dev(7).dev_id
        assert await s.check() == []
        await s.close()
    asyncio.run(main())


def test_map_grows_between_batches_without_losing_writes(tmp_path: pathlib.Path):
    async def main() -> None:
        s = LmdbStore(tmp_path / "env", map_size=1 << 17)
        await asyncio.gather(*(s.create_task(Task(task_id=f"m{i}", dev_id="IMEI:9",
                                                  op=QueryOp(nodes=["./DevInfo/Mod"])))
                               for i in range(3000)))
        await asyncio.gather(*(s.transition(f"m{i}", TaskState.NOTIFIED, cause="sent")
                               for i in range(3000)))
        assert s.map_grows >= 1
        for i in (0, 1499, 2999):
            assert (await s.get_task(f"m{i}")).state == TaskState.NOTIFIED
        assert await s.check() == []
        await s.close()
        s2 = LmdbStore(tmp_path / "env")                          # reopened: all on disk
        assert (await s2.get_task("m2999")).state == TaskState.NOTIFIED
        await s2.close()
    asyncio.run(main())
