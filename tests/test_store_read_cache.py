"""The LMDB store's read cache (``LmdbStore._get``): devices, content, capabilities and tasks
are decoded once and kept until a commit writes their key; never stale after a write returned."""
from __future__ import annotations

import asyncio
import threading

import msgspec
import pytest

from dmengine.errors import NotFound
from dmengine.model import Content, Device, QueryOp, Task, TaskState
from dmengine.store import kv
from dmengine.store.lmdb import LmdbStore


def dev(n: int, **kw) -> Device:
    imei = f"{35000000000000 + n:015d}"
    return Device(dev_id=f"IMEI:{imei}", imei=imei, **kw)



def got_v(d: Device) -> int:
    return d.version


def test_a_record_read_twice_is_decoded_once(tmp_path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            d = await s.create_device(dev(1, tz="A"))
            a = await s.get_device(d.dev_id)
            b = await s.get_device(d.dev_id)
            assert a is b and a.tz == "A"
        finally:
            await s.close()
    asyncio.run(main())


def test_a_polled_task_is_decoded_once_and_every_write_of_it_is_seen(tmp_path) -> None:
    """getTaskById's read: the same object while the task has not changed; after each kind
    of task write (the Cython transition's common case, a transition with changes, an
    update) the next read has it."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            await s.create_task(Task(task_id="t1", dev_id="IMEI:1", op=QueryOp(nodes=["./A"])))
            a = await s.get_task("t1")
            assert (await s.get_task("t1")) is a and a.state == TaskState.PENDING
            await s.transition("t1", TaskState.NOTIFIED, cause="sent")
            b = await s.get_task("t1")
            assert b.state == TaskState.NOTIFIED and (await s.get_task("t1")) is b
            await s.transition("t1", TaskState.IN_PROGRESS, changes={"attempts": 3})
            c = await s.get_task("t1")
            assert (c.state, c.attempts) == (TaskState.IN_PROGRESS, 3)
            await s.update_task(msgspec.structs.replace(c, deadline=9e9))
            d = await s.get_task("t1")
            assert d.deadline == 9e9 and d.state == TaskState.IN_PROGRESS
            await s.transition("t1", TaskState.SUCCEEDED, cause="done")
            assert (await s.get_task("t1")).state == TaskState.SUCCEEDED
        finally:
            await s.close()
    asyncio.run(main())


def test_a_counted_download_keeps_the_package_record_decoded(tmp_path) -> None:
    """Every device of a campaign downloads the same package: the count written by one
    download is in the record the next device reads, and that record is the one the write
    made (kept, not dropped and decoded again)."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            await s.create_content(Content(content_id="fw", name="fw.bin", size=4,
                                           sha256="ab" * 32))
            assert (await s.get_content("fw")).downloads == 0
            for n in (1, 2, 3):
                counted = await s.count_download("fw")
                got = await s.get_content("fw")
                assert got.downloads == n and got is counted
        finally:
            await s.close()
    asyncio.run(main())


def test_downloads_counted_while_a_write_waits_go_in_that_write(tmp_path) -> None:
    """A campaign's devices download the same package at once: the counts made while one
    write of the record waits for the writer join it (far fewer write ops than downloads),
    every count is in the record, each caller gets the record of a commit that holds its own
    count, and a package that is not there fails every caller."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            await s.create_content(Content(content_id="fw", name="fw.bin", size=4,
                                           sha256="ab" * 32))
            ops = s.ops
            got = await asyncio.gather(*(s.count_download("fw") for _ in range(50)))
            assert s.ops - ops < 10
            assert (await s.get_content("fw")).downloads == 50 == max(c.downloads for c in got)
            assert all(c.downloads >= 1 for c in got)
            one = await s.count_download("fw")            # alone: its own write
            assert one.downloads == 51
            gone = await asyncio.gather(*(s.count_download("nope") for _ in range(3)),
                                        return_exceptions=True)
            assert [type(e) for e in gone] == [NotFound] * 3
            assert (await s.count_download("fw")).downloads == 52    # nothing left pending
            # a caller that goes away (its device's connection dropped) does not cancel the
            # write the others wait for, nor its own count
            waits = [asyncio.ensure_future(s.count_download("fw")) for _ in range(5)]
            waits[0].cancel()
            rest = await asyncio.gather(*waits[1:])
            assert waits[0].cancelled() and max(c.downloads for c in rest) == 57
        finally:
            await s.close()
    asyncio.run(main())


def test_every_kind_of_write_is_seen_by_the_next_read(tmp_path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            d = await s.create_device(dev(1, tz="A"))
            assert (await s.get_device(d.dev_id)).tz == "A"
            await s.update_device(d.dev_id, {"tz": "B"})
            assert (await s.get_device(d.dev_id)).tz == "B"
            await s.put_device(dev(1, tz="C"))
            assert (await s.get_device(d.dev_id)).tz == "C"
            await s.import_devices([dev(1, tz="D")], replace=True)
            assert (await s.get_device(d.dev_id)).tz == "D"
            await s.update_device(d.dev_id, {"last_contact": 5.0}, expect_version=got_v(
                await s.get_device(d.dev_id)))
            got = await s.get_device(d.dev_id)
            assert got.tz == "D" and got.last_contact == 5.0
            await s.delete_device(d.dev_id)
            with pytest.raises(NotFound):
                await s.get_device(d.dev_id)
        finally:
            await s.close()
    asyncio.run(main())


def test_a_read_that_spans_a_commit_is_not_kept(tmp_path, monkeypatch) -> None:
    """A read whose snapshot is older than a commit that wrote its key must not be cached:
    here the first read decodes the old record, then (before it could cache it) a write
    of the same device commits; the next read must see the write."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            d = await s.create_device(dev(1, tz="old"))
            plain_get = LmdbStore._get_now
            raced = False

            def racing_get(self, db, cls, k, key, kind):
                # the read is done; before it is cached, another thread's write of the same
                # device commits (the writer thread answers that thread's own loop)
                nonlocal raced
                rec = plain_get(self, db, cls, k, key, kind)
                if not raced and db == "devices":
                    raced = True
                    t = threading.Thread(target=lambda: asyncio.run(
                        s.update_device(d.dev_id, {"tz": "new"})))
                    t.start()
                    t.join(30)
                return rec
            monkeypatch.setattr(LmdbStore, "_get_now", racing_get)
            first = await s.get_device(d.dev_id)
            assert raced and first.tz == "old"    # read before the write committed
            monkeypatch.setattr(LmdbStore, "_get_now", plain_get)
            assert (await s.get_device(d.dev_id)).tz == "new"
        finally:
            await s.close()
    asyncio.run(main())


def test_the_cache_is_bounded_and_can_be_off(tmp_path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "a", read_cache_size=3)
        try:
            for n in range(10):
                await s.create_device(dev(n))
                await s.get_device(dev(n).dev_id)
            assert len(s._cache) == 3
        finally:
            await s.close()
        off = LmdbStore(tmp_path / "b", read_cache_size=0)
        try:
            d = await off.create_device(dev(1))
            a = await off.get_device(d.dev_id)
            b = await off.get_device(d.dev_id)
            assert a == b and a is not b and not off._cache
        finally:
            await off.close()
        with pytest.raises(ValueError, match="read_cache_size"):
            LmdbStore(tmp_path / "c", read_cache_size=-1)
    asyncio.run(main())


def test_content_and_capabilities_are_refreshed_on_write(tmp_path) -> None:
    from dmengine.model import Capability, Content

    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            c = await s.create_content(Content(content_id="fw1", name="fw", size=3,
                                               sha256="0" * 64))
            assert (await s.get_content(c.content_id)).downloads == 0
            await s.count_download(c.content_id)
            assert (await s.get_content(c.content_id)).downloads == 1
            cap = await s.create_capability(Capability(oid="cap1", make="one"))
            assert (await s.get_capability(cap.oid)).make == "one"
            await s.update_capability(cap.oid, {"make": "two"})
            assert (await s.get_capability(cap.oid)).make == "two"
        finally:
            await s.close()
    asyncio.run(main())


def test_has_subscribers_follows_subscriptions(tmp_path) -> None:
    from dmengine.model import Subscription

    async def main() -> None:
        for size in (100, 0):
            s = LmdbStore(tmp_path / f"db{size}", read_cache_size=size)
            try:
                assert not await s.has_subscribers("task")
                assert not await s.has_subscribers("task")          # cached
                await s.create_subscription(Subscription(sub_id="s1", url="https://x.example/h",
                                                         topics=["task"], secret="k" * 32))
                assert await s.has_subscribers("task")
                assert not await s.has_subscribers("job")
                await s.delete_subscription("s1")
                assert not await s.has_subscribers("task")
            finally:
                await s.close()
    asyncio.run(main())


_OTHER_PROCESS = """
import asyncio, sys
from dmengine.store.lmdb import LmdbStore

async def main(path, dev_id, tz, topic):
    s = LmdbStore(path)
    try:
        await s.update_device(dev_id, {"tz": tz})
        if topic:
            from dmengine.model import Subscription
            await s.create_subscription(Subscription(sub_id="s1", url="http://x.test/h",
                                                     topics=[topic], secret="s" * 32, owner="o"))
    finally:
        await s.close()
asyncio.run(main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) > 4 else ""))
"""


def _other_process_writes(path, dev_id: str, tz: str, topic: str = "") -> None:
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(path), dev_id, tz, topic],
                   check=True, timeout=60)


def test_a_write_by_another_process_is_seen_by_the_next_read(tmp_path) -> None:
    """A second process with the store open (a second device process, a CLI verb) writes a
    record this process has cached: the next read here has the new record, in a later turn
    of the loop and off the loop alike.  Fails without the written-keys log: the cached
    object would be answered."""
    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            d = await s.create_device(dev(1, tz="A"))
            a = await s.get_device(d.dev_id)
            assert (await s.get_device(d.dev_id)) is a and a.tz == "A"
            assert not await s.has_subscribers("task")
            await asyncio.to_thread(_other_process_writes, tmp_path / "db", d.dev_id, "B",
                                    "task")
            await asyncio.sleep(0)            # the next turn: the look at the log is due
            b = await s.get_device(d.dev_id)
            assert b.tz == "B"
            assert await s.has_subscribers("task")
            assert (await s.get_device(d.dev_id)) is b      # and cached again
            # this process's own writes stay cached without a look at the log
            await s.update_device(d.dev_id, {"tz": "C"})
            assert (await s.get_device(d.dev_id)).tz == "C"
        finally:
            await s.close()
    asyncio.run(main())

    # off the loop (a CLI verb's synchronous reads): every cached read looks
    s = LmdbStore(tmp_path / "db")
    try:
        d1 = s._get_sync("devices", Device, dev(1).dev_id, "device")
        assert d1.tz == "C"
        _other_process_writes(tmp_path / "db", d1.dev_id, "D")
        assert s._get_sync("devices", Device, d1.dev_id, "device").tz == "D"
    finally:
        asyncio.run(s.close())


def test_a_reader_behind_the_pruned_log_forgets_everything(tmp_path, monkeypatch) -> None:
    """Entries older than CACHE_LOG_KEEP are pruned; a process that had not looked since
    an entry it needed was pruned clears its whole cache rather than answer a stale record."""
    from dmengine.store import lmdb as lmdb_mod
    monkeypatch.setattr(lmdb_mod, "CACHE_LOG_KEEP", -1.0)        # every entry is old
    monkeypatch.setattr(lmdb_mod, "CACHE_LOG_PRUNE_INTERVAL", 0.0)

    async def main() -> None:
        s = LmdbStore(tmp_path / "db")
        try:
            d = await s.create_device(dev(1, tz="A"))
            other = await s.create_device(dev(2, tz="X"))
            assert (await s.get_device(d.dev_id)).tz == "A"
            await asyncio.to_thread(_other_process_writes, tmp_path / "db", d.dev_id, "B")
            await s.update_device(other.dev_id, {"tz": "Y"})   # this commit prunes the log
            await asyncio.sleep(0)
            assert (await s.get_device(d.dev_id)).tz == "B"
        finally:
            await s.close()
    asyncio.run(main())
