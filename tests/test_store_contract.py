"""The store contract (store/base.py), run against both LMDB and memory."""
from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from dmengine.errors import (AlreadyExists, Conflict, InvalidTransition, NotFound, StoreClosed,
                             StoreError, ValidationError)
from dmengine.model import (AuditEntry, Capability, Content, DmAccount, Device, ExecOp, Job,
                            JobState, OutboxEntry, QueryOp, Task, TaskResult, TaskState, UpdateOp,
                            redact)
from dmengine.store.base import Page, Store
from dmengine.store.lmdb import LmdbStore
from dmengine.store.memory import MemoryStore

Body = Callable[[Store], Awaitable[Any]]


@pytest.fixture(params=["memory", "lmdb"])
def use(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Callable[[Body], Any]:
    def runner(body: Body) -> Any:
        async def main() -> Any:
            s: Store = (MemoryStore() if request.param == "memory"
                        else LmdbStore(tmp_path / "env", map_size=1 << 20))
            try:
                res = await body(s)
                assert await s.check() == []
                return res
            finally:
                await s.close()
        return asyncio.run(main())
    return runner


def dev(n: int, **kw: Any) -> Device:
    imei = kw.pop("imei", f"35693803{n:07d}")
    return Device(dev_id=f"IMEI:{imei}", imei=imei, msisdn=kw.pop("msisdn", f"+4917{n:08d}"), **kw)


def task(tid: str, **kw: Any) -> Task:
    kw.setdefault("dev_id", "IMEI:356938035643809")
    kw.setdefault("op", QueryOp(nodes=["./DevInfo/Mod"]))
    return Task(task_id=tid, **kw)


# --- devices --------------------------------------------------------------------------


def test_device_crud_and_lookups(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        acc = DmAccount(server_id="acme-dms", client_name="dmclient01", client_password="clientpw-1",
                        client_key="DV4giKozqa1xsMX/tjaQjQ==", server_password="srv-secret-42")
        d = await s.create_device(dev(1, capability="cap-a", account=acc, devinfo={"./DevInfo/Mod": "X1"}))
        assert d.created > 0 and d.updated >= d.created
        got = await s.get_device(d.dev_id)
        assert got == d and got.account.client_password == "clientpw-1"  # type: ignore[union-attr]
        assert (await s.device_by_msisdn("+491700000001")).dev_id == d.dev_id
        assert (await s.device_by_imei(d.imei)).dev_id == d.dev_id  # type: ignore[arg-type]
        assert [x.dev_id for x in (await s.devices_by_tac("35693803")).items] == [d.dev_id]
        assert [x.dev_id for x in (await s.devices_by_capability("cap-a")).items] == [d.dev_id]
        r = redact(got)
        assert r.account.client_password == "***" and r.account.client_key == "***"  # type: ignore[union-attr]
        assert r.account.server_key is None and b"clientpw-1" not in msgspec.json.encode(r)  # type: ignore[union-attr]
        with pytest.raises(AlreadyExists):
            await s.create_device(dev(1))
        # update: new MSISDN moves the index, capability change too
        u = await s.update_device(d.dev_id, {"msisdn": "+491799999999", "capability": "cap-b"})
        assert u.created == d.created and u.msisdn == "+491799999999"
        with pytest.raises(NotFound):
            await s.device_by_msisdn("+491700000001")
        assert (await s.device_by_msisdn("+491799999999")).dev_id == d.dev_id
        assert (await s.devices_by_capability("cap-a")).items == []
        with pytest.raises(ValidationError) as ei:
            await s.update_device(d.dev_id, {"dev_id": "IMEI:1"})
        assert ei.value.where == "$.dev_id"
        await s.delete_device(d.dev_id)
        for fn, arg in ((s.get_device, d.dev_id), (s.device_by_msisdn, "+491799999999"),
                        (s.device_by_imei, d.imei), (s.delete_device, d.dev_id)):
            with pytest.raises(NotFound):
                await fn(arg)  # type: ignore[operator]
        assert (await s.devices_by_tac("35693803")).items == []
    use(body)


def test_invalid_device_is_refused_with_the_field_and_nothing_written(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        with pytest.raises(ValidationError) as ei:
            await s.create_device(dev(2, msisdn="0049-170-123"))
        assert ei.value.where == "$.msisdn"
        with pytest.raises(ValidationError) as ei:
            await s.put_device(Device(dev_id="IMEI:1", imei="12ab"))
        assert ei.value.where == "$.imei"
        with pytest.raises(ValidationError) as ei:
            await s.create_device(dev(3, account=DmAccount(server_id="")))
        assert ei.value.where == "$.account.server_id"
        with pytest.raises(ValidationError) as ei:
            await s.create_device(Device(dev_id="bad id with spaces"))
        assert ei.value.where == "$.dev_id"
        assert (await s.list_devices()).items == []
        # a valid update that makes the record invalid is refused too; the old one stays
        d = await s.create_device(dev(4))
        with pytest.raises(ValidationError) as ei:
            await s.update_device(d.dev_id, {"imei": "x"})
        assert ei.value.where == "$.imei"
        with pytest.raises(ValidationError):
            await s.update_device(d.dev_id, {"no_such_field": 1})
        assert await s.get_device(d.dev_id) == d
        counts = await s.counts()
        assert counts["devices"] == 1 and counts["dev_msisdn"] == 1 and counts["dev_tac"] == 1
    use(body)


def test_msisdn_and_imei_are_unique(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        a = await s.create_device(dev(5))
        with pytest.raises(AlreadyExists) as ei:
            await s.create_device(dev(6, msisdn=a.msisdn))
        assert ei.value.kind == "msisdn"
        with pytest.raises(AlreadyExists) as ei:
            await s.put_device(Device(dev_id="IMEI:other", imei=a.imei))
        assert ei.value.kind == "imei"
        b = await s.create_device(dev(7))
        with pytest.raises(AlreadyExists):
            await s.update_device(b.dev_id, {"msisdn": a.msisdn})
        assert (await s.device_by_msisdn(a.msisdn)).dev_id == a.dev_id  # type: ignore[arg-type]
        # put_device replaces a device and its index rows
        c = await s.put_device(Device(dev_id=b.dev_id, msisdn="+4930111111"))
        assert c.imei is None and c.created == b.created
        with pytest.raises(NotFound):
            await s.device_by_imei(b.imei)  # type: ignore[arg-type]
    use(body)


def test_paging_with_cursors(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        for i in range(25):
            await s.create_device(dev(100 + i))
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            p = await s.devices_by_tac("35693803", cursor=cursor, limit=10)
            assert isinstance(p, Page)
            seen += [d.dev_id for d in p.items]
            pages += 1
            cursor = p.next_cursor
            if cursor is None:
                break
        assert pages == 3 and seen == sorted(seen) and len(set(seen)) == 25
        everything = await s.list_devices(limit=25)
        assert len(everything.items) == 25 and everything.next_cursor is None
        with pytest.raises(ValidationError) as ei:
            await s.list_devices(cursor="%%%")
        assert ei.value.where == "cursor"
        with pytest.raises(ValidationError) as ei:
            await s.list_devices(limit=0)
        assert ei.value.where == "limit"
        foreign = (await s.list_devices(limit=1)).next_cursor
        with pytest.raises(ValidationError):
            await s.devices_by_tac("35693803", cursor=foreign)
    use(body)


def test_import_devices_reports_bad_records(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_device(dev(1))
        batch = [dev(10), dev(11, msisdn="nope"), dev(12, msisdn="+491700000001"), dev(13), dev(1)]
        rep = await s.import_devices(batch, chunk=2)
        assert rep.created == 2 and rep.replaced == 1
        assert sorted((i, w) for i, w, _ in rep.rejected) == [(1, "$.msisdn"), (2, "$.msisdn")]
        assert (await s.device_by_msisdn("+491700000013")).dev_id == dev(13).dev_id
        rep = await s.import_devices([dev(10)], replace=False)
        assert rep.created == 0 and rep.rejected[0][1] == "$.dev_id"
        assert (await s.counts())["devices"] == 3
        # duplicates inside one chunk; a replaced device frees its old MSISDN in the same chunk
        rep = await s.import_devices([dev(20), dev(21, msisdn="+491700000020"),
                                      Device(dev_id="IMEI:other22", imei=dev(20).imei),
                                      dev(13, msisdn="+491700000099"),
                                      dev(23, msisdn="+491700000013"), dev(20)])
        assert rep.created == 2 and rep.replaced == 2
        assert sorted((i, w) for i, w, _ in rep.rejected) == [(1, "$.msisdn"), (2, "$.imei")]
        assert (await s.device_by_msisdn("+491700000013")).dev_id == dev(23).dev_id
        assert (await s.device_by_msisdn("+491700000099")).dev_id == dev(13).dev_id
    use(body)


def test_open_tasks_for_device(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        d = await s.create_device(dev(1))
        other = await s.create_device(dev(2))
        ts = [await s.create_task(Task(task_id=f"ot{i}", dev_id=d.dev_id,
                                       op=QueryOp(nodes=["./DevInfo/Mod"]))) for i in range(3)]
        await s.create_task(Task(task_id="ot-other", dev_id=other.dev_id,
                                 op=QueryOp(nodes=["./DevInfo/Mod"])))
        await s.transition("ot1", TaskState.CANCELLED, cause="x")
        assert [t.task_id for t in await s.open_tasks_for_device(d.dev_id)] == ["ot0", "ot2"]
        assert await s.open_tasks_for_device("IMEI:000000000000000") == []
        assert ts[0].state == TaskState.PENDING
    use(body)


def test_versioned_device_updates(use: Callable[[Body], Any]) -> None:
    """Every update bumps the version; a write that names a stale version is refused
    (Conflict) and changes nothing — a read-modify-write retries instead of losing an
    update made meanwhile."""
    async def body(s: Store) -> None:
        d = await s.create_device(dev(1))
        u1 = await s.update_device(d.dev_id, {"devdetail": {"./DevDetail/FwV": "1"}})
        assert u1.version == d.version + 1
        u2 = await s.update_device(d.dev_id, {"tz": "UTC"}, expect_version=u1.version)
        assert u2.version == u1.version + 1
        with pytest.raises(Conflict):
            await s.update_device(d.dev_id, {"devdetail": {}}, expect_version=u1.version)
        assert (await s.get_device(d.dev_id)).devdetail == {"./DevDetail/FwV": "1"}
        with pytest.raises(ValidationError) as ei:
            await s.update_device(d.dev_id, {"version": 99})
        assert ei.value.where == "$.version"
        again = await s.put_device(msgspec.structs.replace(u2, tz=None))
        assert again.version == u2.version + 1
    use(body)


def test_update_device_merges_an_account_patch(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        acc = DmAccount(server_id="acme-dms", client_name="c1", client_password="pw1",
                        client_nonce="bm9uY2U=")
        d = await s.create_device(dev(1, account=acc))
        u = await s.update_device(d.dev_id, {"account": {"client_password": "pw2",
                                                         "client_nonce": None}})
        assert u.account == DmAccount(server_id="acme-dms", client_name="c1",
                                      client_password="pw2")
        assert (await s.get_device(d.dev_id)).account == u.account
        with pytest.raises(ValidationError) as ei:
            await s.update_device(d.dev_id, {"account": {"client_pasword": "x"}})
        assert ei.value.where == "$.account.client_pasword"
        with pytest.raises(ValidationError) as ei:
            await s.update_device(d.dev_id, {"account": {"client_password": 5}})
        assert ei.value.where == "$.account.client_password"
        # a device without an account gets one; it needs a server id
        e = await s.create_device(dev(2))
        with pytest.raises(ValidationError) as ei:
            await s.update_device(e.dev_id, {"account": {"client_name": "c2"}})
        assert ei.value.where == "$.account.server_id"
        e = await s.update_device(e.dev_id, {"account": {"client_name": "c2",
                                                         "server_id": "acme-dms"}})
        assert e.account is not None and e.account.client_name == "c2"
        # a removed account
        e = await s.update_device(e.dev_id, {"account": None})
        assert e.account is None
    use(body)


def _query_fleet() -> list[Device]:
    out = []
    for i in range(60):
        out.append(dev(200 + i, imei=f"{35693803 if i % 2 else 35000000}{i:07d}",
                       capability="cap-a" if i % 3 == 0 else "cap-b",
                       devinfo={"./DevInfo/Mod": "X1" if i % 4 == 0 else "X2"},
                       devdetail={"./DevDetail/FwV": "1.0" if i % 5 == 0 else "1.1"},
                       last_contact=None if i % 6 == 0 else 1000.0 + i))
    return out


def test_query_devices_filters_and_pages(use: Callable[[Body], Any]) -> None:
    from dmengine.store.base import DeviceQuery
    fleet = _query_fleet()

    def expected(q: DeviceQuery) -> list[str]:
        out = []
        for d in fleet:
            lc = d.last_contact
            if (q.capability is None or d.capability == q.capability) and \
                    (q.tac is None or (d.imei or "")[:8] == q.tac) and \
                    (q.model is None or d.devinfo.get("./DevInfo/Mod") == q.model) and \
                    (q.firmware is None or d.devdetail.get("./DevDetail/FwV") == q.firmware) and \
                    (q.contact_after is None or (lc is not None and lc >= q.contact_after)) and \
                    (q.contact_before is None or (lc is not None and lc < q.contact_before)):
                out.append(d.dev_id)
        return sorted(out)

    async def all_of(s: Store, q: DeviceQuery, limit: int, scan: int) -> tuple[list[str], int]:
        seen: list[str] = []
        cursor, pages = None, 0
        while True:
            p = await s.query_devices(q, cursor=cursor, limit=limit, scan_limit=scan)
            assert len(p.items) <= limit
            seen += [d.dev_id for d in p.items]
            pages += 1
            cursor = p.next_cursor
            if cursor is None:
                return seen, pages

    async def body(s: Store) -> None:
        rep = await s.import_devices(fleet)
        assert rep.created == 60
        queries = [DeviceQuery(), DeviceQuery(capability="cap-a"), DeviceQuery(tac="35693803"),
                   DeviceQuery(tac="35693803", capability="cap-b", model="X2"),
                   DeviceQuery(model="X1"), DeviceQuery(firmware="1.0"),
                   DeviceQuery(firmware="1.0", capability="cap-a"),
                   DeviceQuery(contact_after=1030.0), DeviceQuery(contact_before=1010.0),
                   DeviceQuery(contact_after=1010.0, contact_before=1020.0, model="X2"),
                   DeviceQuery(model="nope"), DeviceQuery(capability="cap-none")]
        for q in queries:
            want = expected(q)
            for limit, scan in ((100, 1000), (7, 7), (3, 10), (5, 1)):
                got, _ = await all_of(s, q, limit, scan)
                # every match once; the order is the index's (by TAC / capability / dev_id)
                assert sorted(got) == want and len(set(got)) == len(got), (q, limit, scan)
        # a page examines at most scan_limit records (at least limit): rare matches come in
        # short pages that still carry a cursor
        p = await s.query_devices(DeviceQuery(model="X1"), limit=5, scan_limit=5)
        assert len(p.items) <= 5 and p.next_cursor is not None
        got, pages = await all_of(s, DeviceQuery(model="X1"), 5, 5)
        assert pages == 12 and len(got) == 15
        # the cursor belongs to its query's index
        c = (await s.query_devices(DeviceQuery(), limit=1)).next_cursor
        with pytest.raises(ValidationError) as ei:
            await s.query_devices(DeviceQuery(tac="35693803"), cursor=c)
        assert ei.value.where == "cursor"
        with pytest.raises(ValidationError) as ei:
            await s.query_devices(DeviceQuery(tac="3569"))
        assert ei.value.where == "tac"
        with pytest.raises(ValidationError) as ei:
            await s.query_devices(DeviceQuery(), limit=0)
        assert ei.value.where == "limit"
        # a deleted device is gone from the query, an updated one found by its new values
        await s.delete_device(fleet[0].dev_id)
        await s.update_device(fleet[1].dev_id, {"devdetail": {"./DevDetail/FwV": "9.9"}})
        got, _ = await all_of(s, DeviceQuery(firmware="9.9"), 10, 100)
        assert got == [fleet[1].dev_id]
        got, _ = await all_of(s, DeviceQuery(capability="cap-a"), 10, 100)
        assert fleet[0].dev_id not in got
    use(body)


# --- capabilities -----------------------------------------------------------------------


def test_query_device_ids_pages_as_query_devices(use: Callable[[Body], Any]) -> None:
    """The ids-only query (a job's selection) gives the dev_ids of query_devices, in its order,
    page for page, cursors included — whether the index decides alone or records are read."""
    from dmengine.store.base import DeviceQuery
    fleet = _query_fleet()

    async def body(s: Store) -> None:
        await s.import_devices(fleet)
        for q in (DeviceQuery(capability="cap-a"), DeviceQuery(tac="35693803"),
                  DeviceQuery(tac="35693803", capability="cap-b"),
                  DeviceQuery(capability="cap-b", model="X2"), DeviceQuery(firmware="1.0"),
                  DeviceQuery(contact_after=1030.0), DeviceQuery(capability="cap-none"),
                  DeviceQuery()):
            for limit, scan in ((100, 1000), (7, 7), (3, 10), (5, 1)):
                c1 = c2 = None
                while True:
                    full = await s.query_devices(q, cursor=c1, limit=limit, scan_limit=scan)
                    ids = await s.query_device_ids(q, cursor=c2, limit=limit, scan_limit=scan)
                    assert ids.items == [d.dev_id for d in full.items], (q, limit, scan)
                    assert ids.next_cursor == full.next_cursor
                    c1 = c2 = full.next_cursor
                    if c1 is None:
                        break
        with pytest.raises(ValidationError):
            await s.query_device_ids(DeviceQuery(), limit=0)
    use(body)


def test_capabilities(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        c = await s.create_capability(Capability(oid="cap-x1", make="Acme", model="X1",
                                                 firmware_versions=["1.0", "1.1"],
                                                 tacs=["35693803", "35693804"],
                                                 mo_paths={"fumo": "./FUMO/1"}))
        assert (await s.get_capability("cap-x1")) == c
        assert (await s.capability_by_tac("35693804")).oid == "cap-x1"
        with pytest.raises(AlreadyExists):
            await s.create_capability(Capability(oid="cap-x1"))
        with pytest.raises(AlreadyExists) as ei:
            await s.create_capability(Capability(oid="cap-x2", tacs=["35693803"]))
        assert ei.value.kind == "tac"
        with pytest.raises(ValidationError) as ei:
            await s.create_capability(Capability(oid="cap-x3", tacs=["123"]))
        assert ei.value.where == "$.tacs[0]"
        u = await s.update_capability("cap-x1", {"tacs": ["35693805"], "model": "X1b"})
        assert u.model == "X1b" and u.created == c.created
        with pytest.raises(NotFound):
            await s.capability_by_tac("35693803")
        assert (await s.capability_by_tac("35693805")).oid == "cap-x1"
        assert [x.oid for x in (await s.list_capabilities()).items] == ["cap-x1"]
        with pytest.raises(NotFound):
            await s.update_capability("cap-none", {"model": "Z"})
        with pytest.raises(ValidationError) as ei:
            await s.update_capability("cap-x1", {"tacs": ["1"]})
        assert ei.value.where == "$.tacs[0]"
        with pytest.raises(ValidationError) as ei:
            await s.update_capability("cap-x1", {"oid": "other"})
        assert ei.value.where == "$.oid"
        # concurrent updates of different fields both land (applied inside the transaction)
        await asyncio.gather(s.update_capability("cap-x1", {"make": "Acme2"}),
                             s.update_capability("cap-x1", {"firmware_versions": ["2.0"]}))
        both = await s.get_capability("cap-x1")
        assert both.make == "Acme2" and both.firmware_versions == ["2.0"]
        await s.delete_capability("cap-x1")
        with pytest.raises(NotFound):
            await s.capability_by_tac("35693805")
    use(body)


# --- jobs and tasks ---------------------------------------------------------------------


def test_jobs(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        a = await s.create_job(Job(job_id="job-a", name="fw 1.1", created=1000.0, rate_limit=50.0))
        b = await s.create_job(Job(job_id="job-b", created=2000.0))
        await s.create_job(Job(job_id="job-c", created=3000.0))
        assert a.counts == {} and a.total == 0
        with pytest.raises(AlreadyExists):
            await s.create_job(Job(job_id="job-a"))
        r = await s.update_job("job-a", {"state": JobState.RUNNING}, expect_state=JobState.SCHEDULED)
        assert r.state is JobState.RUNNING
        with pytest.raises(Conflict):
            await s.update_job("job-a", {"state": JobState.PAUSED}, expect_state=JobState.SCHEDULED)
        with pytest.raises(ValidationError) as ei:
            await s.update_job("job-a", {"counts": {}})
        assert ei.value.where == "$.counts"
        with pytest.raises(ValidationError) as ei:
            await s.update_job("job-a", {"rate_limit": -1.0})
        assert ei.value.where == "$.rate_limit"
        with pytest.raises(NotFound):
            await s.update_job("nope", {"name": "x"})
        assert [j.job_id for j in (await s.list_jobs(state=JobState.RUNNING)).items] == ["job-a"]
        p = await s.jobs_by_date(1500.0, 3500.0, limit=1)
        assert [j.job_id for j in p.items] == ["job-b"] and p.next_cursor
        p2 = await s.jobs_by_date(1500.0, 3500.0, cursor=p.next_cursor, limit=1)
        assert [j.job_id for j in p2.items] == ["job-c"]
        assert (await s.jobs_by_date(0, 1000.0)).items == []
        assert b.created == 2000.0
    use(body)


def test_jobs_by_state_follow_every_move_and_page(use: Callable[[Body], Any]) -> None:
    """list_jobs(state=) reads the job-state index: each job is listed under its current
    state only, through every move, page after page (what a scheduler pass reads)."""
    async def body(s: Store) -> None:
        for i in range(7):
            await s.create_job(Job(job_id=f"job-{i}", created=1000.0 + i))

        async def ids(state: JobState, limit: int = 2) -> list[str]:
            out, cursor = [], None
            while True:
                p = await s.list_jobs(state=state, cursor=cursor, limit=limit)
                assert len(p.items) <= limit
                out += [j.job_id for j in p.items]
                if p.next_cursor is None:
                    return out
                cursor = p.next_cursor
        assert await ids(JobState.SCHEDULED) == [f"job-{i}" for i in range(7)]
        for i in (1, 3, 5):
            await s.update_job(f"job-{i}", {"state": JobState.RUNNING})
        await s.update_job("job-3", {"state": JobState.PAUSED})
        await s.update_job("job-5", {"state": JobState.COMPLETED, "finished": 2000.0})
        await s.update_job("job-0", {"name": "renamed"})          # no move: index unchanged
        assert await ids(JobState.SCHEDULED) == ["job-0", "job-2", "job-4", "job-6"]
        assert await ids(JobState.RUNNING) == ["job-1"]
        assert await ids(JobState.PAUSED) == ["job-3"]
        assert await ids(JobState.COMPLETED) == ["job-5"]
        assert await ids(JobState.CANCELLED) == []
        assert [j.name for j in (await s.list_jobs(state=JobState.SCHEDULED, limit=1)).items] \
            == ["renamed"]                                 # the record, read fresh
        # a state's cursor does not page another state's listing
        p = await s.list_jobs(state=JobState.SCHEDULED, limit=1)
        with pytest.raises(ValidationError) as ei:
            await s.list_jobs(state=JobState.RUNNING, cursor=p.next_cursor)
        assert ei.value.where == "cursor"
        with pytest.raises(ValidationError) as ei:
            await s.list_jobs(state="BOGUS")           # type: ignore[arg-type]
        assert ei.value.where == "state"
    use(body)


def test_task_life_history_and_job_counters(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="j1"))
        t1 = await s.create_task(task("t1", job_id="j1", correlator="corr-1", next_attempt=100.0))
        t2 = await s.create_task(task("t2", job_id="j1", dev_id="IMEI:2"))
        t3 = await s.create_task(task("t3", job_id="j1", test_cycle=True))
        assert t1.seq < t2.seq < t3.seq and t1.version == 1 and t1.history_len == 1
        with pytest.raises(AlreadyExists):
            await s.create_task(task("t1"))
        with pytest.raises(NotFound):
            await s.create_task(task("t9", job_id="nojob"))
        j = await s.get_job("j1")
        assert j.total == 3 and j.counts == {"PENDING": 2} and j.test_counts == {"PENDING": 1}
        assert [t.task_id for t in await s.tasks_due(200.0)] == ["t1"]
        assert (await s.task_by_correlator("corr-1")).task_id == "t1"

        n = await s.transition("t1", TaskState.NOTIFIED, cause="pkg0 sent")
        assert n.state is TaskState.NOTIFIED and n.version == 2 and n.history_len == 2
        await s.transition("t1", TaskState.IN_PROGRESS, expect_state=TaskState.NOTIFIED)
        with pytest.raises(Conflict):
            await s.transition("t1", TaskState.SUCCEEDED, expect_state=TaskState.NOTIFIED)
        with pytest.raises(InvalidTransition):
            await s.transition("t2", TaskState.SUCCEEDED)        # PENDING -> SUCCEEDED
        with pytest.raises(ValidationError):
            await s.transition("t2", "BOGUS")  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await s.transition("nope", TaskState.NOTIFIED)
        done = await s.transition("t1", TaskState.SUCCEEDED, dm_status=200, result_code=200,
                                  changes={"result": TaskResult(fumo_result=200,
                                                                statuses={"Exec": 202})})
        assert done.finished is not None and done.result.fumo_result == 200  # type: ignore[union-attr]
        with pytest.raises(InvalidTransition):
            await s.transition("t1", TaskState.FAILED)
        assert await s.tasks_due(200.0) == []                     # final: out of the due index
        await s.transition("t3", TaskState.CANCELLED, cause="test over")

        h = await s.task_history("t1")
        assert [(e.seq, e.from_state, e.to_state) for e in h.items] == [
            (1, None, "PENDING"), (2, "PENDING", "NOTIFIED"), (3, "NOTIFIED", "IN_PROGRESS"),
            (4, "IN_PROGRESS", "SUCCEEDED")]
        assert h.items[3].dm_status == 200 and h.items[1].cause == "pkg0 sent"
        with pytest.raises(NotFound):
            await s.task_history("nope")
        j = await s.get_job("j1")
        assert j.counts == {"PENDING": 1, "SUCCEEDED": 1} and j.test_counts == {"CANCELLED": 1}
        assert [t.task_id for t in (await s.tasks_by_job("j1")).items] == ["t1", "t2", "t3"]
        assert [t.task_id for t in (await s.tasks_by_job("j1", state=TaskState.PENDING)).items] == ["t2"]
        assert (await s.tasks_by_job("j1", state=TaskState.FAILED)).items == []
        assert [t.task_id for t in (await s.tasks_by_device("IMEI:356938035643809")).items] == ["t1", "t3"]
    use(body)


def test_update_task_is_optimistic(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        t = await s.create_task(task("u1", deadline=50.0))
        t2 = await s.update_task(msgspec.structs.replace(t, attempts=1, correlator="c9"))
        assert t2.version == t.version + 1
        with pytest.raises(Conflict):
            await s.update_task(msgspec.structs.replace(t, attempts=2))   # stale version
        with pytest.raises(InvalidTransition):
            await s.update_task(msgspec.structs.replace(t2, state=TaskState.FAILED))
        with pytest.raises(ValidationError) as ei:
            await s.update_task(msgspec.structs.replace(t2, accept_device_policy=15))
        assert ei.value.where == "$.accept_device_policy"
        assert (await s.task_by_correlator("c9")).attempts == 1
        assert [x.task_id for x in await s.tasks_expiring(60.0)] == ["u1"]
        assert await s.tasks_expiring(10.0) == []
    use(body)


def test_bad_transition_changes_write_nothing(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="j2"))
        await s.create_task(task("b1", job_id="j2"))
        before = await s.counts()
        with pytest.raises(ValidationError) as ei:
            await s.transition("b1", TaskState.NOTIFIED, changes={"attempts": -1})
        assert ei.value.where == "$.attempts"
        with pytest.raises(ValidationError):
            await s.transition("b1", TaskState.NOTIFIED, changes={"state": TaskState.FAILED})
        with pytest.raises(ValidationError) as ei:
            await s.transition("b1", TaskState.NOTIFIED,
                               enqueue=[OutboxEntry(entry_id="o1", kind="webhook", due=-1.0)])
        assert ei.value.where == "$.due"
        assert await s.counts() == before
        t = await s.get_task("b1")
        assert t.state is TaskState.PENDING and t.history_len == 1
        assert (await s.get_job("j2")).counts == {"PENDING": 1}
        # a good one with an outbox entry: both or neither
        await s.transition("b1", TaskState.NOTIFIED, changes={"attempts": 1, "next_attempt": 10.0},
                           enqueue=[OutboxEntry(entry_id="o1", kind="webhook", due=5.0,
                                                payload={"taskId": "b1"})])
        assert [e.entry_id for e in await s.due_entries(6.0)] == ["o1"]
        with pytest.raises(AlreadyExists):
            await s.transition("b1", TaskState.IN_PROGRESS,
                               enqueue=[OutboxEntry(entry_id="o1", kind="webhook", due=5.0)])
        assert (await s.get_task("b1")).state is TaskState.NOTIFIED
    use(body)


def test_create_tasks_is_all_or_nothing(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="bulk"))
        ok = [task(f"k{i}", job_id="bulk", op=UpdateOp(content_id="fw-2")) for i in range(50)]
        with pytest.raises(NotFound):
            await s.create_tasks(ok[:10] + [task("kx", job_id="missing")])
        with pytest.raises(ValidationError) as ei:
            await s.create_tasks(ok[:3] + [task("ky", op=ExecOp(uri=""))])
        assert ei.value.where == "$[3].op.uri"
        assert (await s.counts())["tasks"] == 0
        made = await s.create_tasks(ok)
        assert [t.seq for t in made] == sorted(t.seq for t in made)
        j = await s.get_job("bulk")
        assert j.total == 50 and j.counts == {"PENDING": 50}
        page = await s.tasks_by_job("bulk", limit=500)
        assert len(page.items) == 50 and page.next_cursor is None
    use(body)


def test_concurrent_transitions_keep_counters_exact(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="cc"))
        await s.create_tasks([task(f"c{i}", job_id="cc") for i in range(40)])

        async def drive(i: int) -> None:
            for st in (TaskState.NOTIFIED, TaskState.IN_PROGRESS,
                       TaskState.SUCCEEDED if i % 2 else TaskState.FAILED):
                await s.transition(f"c{i}", st)

        async def racer() -> int:     # illegal or stale moves racing the drivers
            lost = 0
            for i in range(40):
                try:
                    await s.transition(f"c{i}", TaskState.CANCELLED, expect_state=TaskState.PENDING)
                except (Conflict, InvalidTransition):
                    lost += 1
            return lost
        res = await asyncio.gather(*(drive(i) for i in range(40)), racer(),
                                   return_exceptions=True)
        cancelled = 40 - res[-1]  # type: ignore[operator]
        errs = [r for r in res[:-1] if isinstance(r, BaseException)]
        assert all(isinstance(e, InvalidTransition) for e in errs)
        j = await s.get_job("cc")
        assert sum(j.counts.values()) == 40 and j.counts.get(TaskState.CANCELLED, 0) == cancelled
    use(body)


# --- content, outbox, audit ------------------------------------------------------------


def test_content(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        c = await s.create_content(Content(content_id="fw-2", name="x1-2.0.bin", size=1234,
                                           sha256="ab" * 32, capability="cap-x1",
                                           from_version="1.0", to_version="2.0"))
        with pytest.raises(AlreadyExists):
            await s.create_content(c)
        with pytest.raises(ValidationError) as ei:
            await s.create_content(Content(content_id="fw-3", name="n", size=1, sha256="XYZ"))
        assert ei.value.where == "$.sha256"
        assert (await s.count_download("fw-2")).downloads == 1
        assert (await s.count_download("fw-2")).downloads == 2
        u = await s.update_content("fw-2", {"path": "/srv/fw/x1-2.0.bin"})
        assert u.downloads == 2 and u.created == c.created
        with pytest.raises(NotFound):
            await s.update_content("fw-none", {"path": "/x"})
        with pytest.raises(ValidationError) as ei:
            await s.update_content("fw-2", {"size": -5})
        assert ei.value.where == "$.size"
        assert [x.content_id for x in (await s.list_content()).items] == ["fw-2"]
        await s.delete_content("fw-2")
        with pytest.raises(NotFound):
            await s.get_content("fw-2")
    use(body)


def test_outbox(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        for i, due in enumerate((30.0, 10.0, 20.0)):
            await s.enqueue(OutboxEntry(entry_id=f"o{i}", kind="charging" if i else "webhook",
                                        due=due, payload={"n": i}, target="https://cb.example/x"))
        with pytest.raises(AlreadyExists):
            await s.enqueue(OutboxEntry(entry_id="o0", kind="webhook", due=1.0))
        assert [e.entry_id for e in await s.due_entries(25.0)] == ["o1", "o2"]
        assert [e.entry_id for e in await s.due_entries(100.0, limit=1)] == ["o1"]
        r = await s.retry("o1", due=40.0, error="HTTP 503")
        assert r.attempts == 1 and r.last_error == "HTTP 503"
        assert [e.entry_id for e in await s.due_entries(35.0)] == ["o2", "o0"]
        await s.ack("o2")
        with pytest.raises(NotFound):
            await s.ack("o2")
        assert [e.entry_id for e in await s.due_entries(100.0)] == ["o0", "o1"]
    use(body)


def test_audit(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        for i in range(5):
            e = await s.audit(AuditEntry(time=float(i), actor="op1", action="cancelJob",
                                         target=f"job-{i}", detail={"why": "test"}))
            assert e.seq == i + 1
        p = await s.audit_entries(limit=3)
        assert [e.target for e in p.items] == ["job-0", "job-1", "job-2"]
        p = await s.audit_entries(cursor=p.next_cursor)
        assert [e.seq for e in p.items] == [4, 5] and p.next_cursor is None
    use(body)


def test_audit_filters_page_with_a_bounded_scan(use: Callable[[Body], Any]) -> None:
    """actor / action / time filters: every match exactly once, page after page, even when a
    page examines fewer entries than it would need to fill up (short pages keep a cursor)."""
    async def body(s: Store) -> None:
        for i in range(30):
            await s.audit(AuditEntry(time=100.0 + i, actor=f"key:k{i % 3}",
                                     action="cancelJob" if i % 2 else "doOperation",
                                     target=f"/v1/x/{i}"))
        want = [e for e in (await s.audit_entries(limit=100)).items
                if e.actor == "key:k1" and e.action == "cancelJob" and 105 <= e.time < 125]
        assert want
        for limit, scan in ((100, 1000), (2, 2), (1, 5), (3, 1)):
            got: list[AuditEntry] = []
            cursor = None
            while True:
                p = await s.audit_entries(actor="key:k1", action="cancelJob", since=105.0,
                                          until=125.0, cursor=cursor, limit=limit,
                                          scan_limit=scan)
                assert len(p.items) <= limit
                got.extend(p.items)
                cursor = p.next_cursor
                if cursor is None:
                    break
            assert got == want, (limit, scan)
        assert (await s.audit_entries(actor="nobody")).items == []
    use(body)


def _h(n: int) -> str:
    import hashlib
    return hashlib.sha256(f"secret-{n}".encode()).hexdigest()


def test_api_keys(use: Callable[[Body], Any]) -> None:
    from dmengine.model import ApiKey

    async def body(s: Store) -> None:
        k = await s.create_api_key(ApiKey(key_id="k1", name="crm", role="operator",
                                          key_hash=_h(1), rate=5.0))
        assert k.created > 0
        assert await s.get_api_key("k1") == k
        assert (await s.api_key_by_hash(_h(1))).key_id == "k1"
        for bad in (_h(2), "zz", "", "00" * 40):
            with pytest.raises(NotFound):
                await s.api_key_by_hash(bad)
        with pytest.raises(AlreadyExists):                 # same id
            await s.create_api_key(ApiKey(key_id="k1", name="x", role="viewer", key_hash=_h(3)))
        with pytest.raises(AlreadyExists):                 # same key, another id
            await s.create_api_key(ApiKey(key_id="k9", name="x", role="viewer", key_hash=_h(1)))
        with pytest.raises(ValidationError) as ei:
            await s.create_api_key(ApiKey(key_id="k2", name="x", role="boss",  # type: ignore[arg-type]
                                          key_hash=_h(2)))
        assert ei.value.where == "$.role"
        with pytest.raises(ValidationError):
            await s.create_api_key(ApiKey(key_id="k2", name="x", role="viewer", key_hash="abc"))
        await s.create_api_key(ApiKey(key_id="k0", name="oss", role="admin", key_hash=_h(0)))
        r = await s.update_api_key("k1", {"revoked": 50.0, "revoked_by": "key:k0"})
        assert r.revoked == 50.0 and (await s.api_key_by_hash(_h(1))).revoked == 50.0
        for f in ("key_hash", "key_id", "created"):
            with pytest.raises(ValidationError) as ei:
                await s.update_api_key("k1", {f: "x"})
            assert ei.value.where == f"$.{f}"
        with pytest.raises(NotFound):
            await s.update_api_key("nope", {"revoked": 1.0})
        p = await s.list_api_keys(limit=1)
        assert [x.key_id for x in p.items] == ["k0"]
        p = await s.list_api_keys(cursor=p.next_cursor)
        assert [x.key_id for x in p.items] == ["k1"] and p.next_cursor is None
    use(body)


def test_users(use: Callable[[Body], Any]) -> None:
    from dmengine.model import User

    async def body(s: Store) -> None:
        u = await s.create_user(User(name="alice@care", role="viewer", password_hash="scrypt$x"))
        assert (await s.get_user("alice@care")) == u and u.created > 0
        with pytest.raises(AlreadyExists):
            await s.create_user(User(name="alice@care", role="admin", password_hash="y"))
        assert (await s.update_user("alice@care", {"role": "operator"})).role == "operator"
        with pytest.raises(ValidationError):
            await s.update_user("alice@care", {"name": "bob"})
        assert [x.name for x in (await s.list_users()).items] == ["alice@care"]
        await s.delete_user("alice@care")
        for call in (s.get_user("alice@care"), s.delete_user("alice@care"),
                     s.update_user("alice@care", {"role": "viewer"})):
            with pytest.raises(NotFound):
                await call
    use(body)


def test_sessions_expire_and_are_purged(use: Callable[[Body], Any]) -> None:
    from dmengine.model import UserSession

    async def body(s: Store) -> None:
        for i in range(5):
            await s.create_session(UserSession(token_hash=_h(i), session_id=f"s{i}", kind="key",
                                               subject="k1", expires=100.0 + i))
        with pytest.raises(AlreadyExists):
            await s.create_session(UserSession(token_hash=_h(0), session_id="sx", kind="user",
                                               subject="bob", expires=1.0))
        assert (await s.get_session(_h(3))).session_id == "s3"
        with pytest.raises(NotFound):
            await s.get_session("not-hex")
        await s.delete_session(_h(4))                      # logout
        with pytest.raises(NotFound):
            await s.get_session(_h(4))
        with pytest.raises(NotFound):
            await s.delete_session(_h(4))
        assert await s.purge_sessions(101.0, limit=1) == 1     # s0 (earliest first)
        assert await s.purge_sessions(101.0) == 1              # s1
        assert await s.purge_sessions(101.0) == 0
        with pytest.raises(NotFound):
            await s.get_session(_h(1))
        assert (await s.get_session(_h(2))).expires == 102.0
    use(body)


def test_closed_store_refuses(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.close()
        with pytest.raises(StoreClosed):
            await s.create_job(Job(job_id="late"))
        assert isinstance(StoreClosed("x"), StoreError)
        return None

    with pytest.raises(StoreClosed):   # the runner's own check() after close refuses too
        use(body)


def test_an_op_failing_after_writing_is_rolled_back_alone(use: Callable[[Body], Any]) -> None:
    """The discipline is check-then-write; an op that breaks it anyway (here: on purpose) must
    leave nothing behind, and ops sharing its transaction must still commit."""
    async def body(s: Store) -> None:
        async def bad() -> None:
            def op(ctx: Any) -> None:
                ctx.put("devices", b"IMEI:ghost", b"\x80")
                raise RuntimeError("boom after a write")
            await s._write(op)  # type: ignore[attr-defined]
        good = [s.create_device(dev(200 + i)) for i in range(20)]
        res = await asyncio.gather(bad(), *good, return_exceptions=True)
        assert isinstance(res[0], RuntimeError)
        assert all(isinstance(r, Device) for r in res[1:])
        with pytest.raises(NotFound):
            await s.get_device("IMEI:ghost")
        assert (await s.counts())["devices"] == 20
    use(body)


def test_every_state_pair_moves_or_is_refused(use: Callable[[Body], Any]) -> None:
    from dmengine.model import TASK_TRANSITIONS
    pairs = [(a, b) for a in TaskState for b in TaskState]

    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="tbl"))
        await s.create_tasks([task(f"p-{a}-{b}", job_id="tbl", state=a) for a, b in pairs])
        res = await asyncio.gather(*(s.transition(f"p-{a}-{b}", b) for a, b in pairs),
                                   return_exceptions=True)
        for (a, b), r in zip(pairs, res):
            if b in TASK_TRANSITIONS[a]:
                assert isinstance(r, Task) and r.state is b, (a, b, r)
            else:
                assert isinstance(r, InvalidTransition), (a, b, r)
                assert (await s.get_task(f"p-{a}-{b}")).history_len == 1
        j = await s.get_job("tbl")
        assert sum(j.counts.values()) == len(pairs)
        assert j.counts[TaskState.SUCCEEDED] == 8 + 2      # 8 born SUCCEEDED + 2 legal moves
    use(body)


# --- jobs at scale: targets, tasks made in batches, claims with leases ------------------


def test_job_targets_keep_order_and_page_by_start_and_limit(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="tg"))
        ids = [f"IMEI:{356938035000000 + i}" for i in range(25)]
        assert await s.add_job_targets("tg", ids[:10]) == 10
        assert await s.add_job_targets("tg", ids[10:]) == 25       # appended after the first
        assert await s.add_job_targets("tg", []) == 25
        j = await s.get_job("tg")
        assert j.targets == 25 and j.total == 0 and j.counts == {}
        assert await s.job_targets("tg", 0, 100) == ids
        # pages by start/limit: every target once, in selection order
        seen: list[str] = []
        start = 0
        while True:
            page = await s.job_targets("tg", start, 7)
            assert len(page) <= 7
            if not page:
                break
            seen.extend(page)
            start += len(page)
        assert seen == ids
        assert await s.job_targets("tg", 24, 5) == ids[24:]
        assert await s.job_targets("tg", 25, 5) == []
        assert await s.job_targets("tg", 1000, 5) == []
        # the targets of one job never show in another's
        await s.create_job(Job(job_id="tg2"))
        assert await s.add_job_targets("tg2", ["IMEI:1"]) == 1
        assert await s.job_targets("tg", 0, 100) == ids
        assert await s.job_targets("tg2", 0, 100) == ["IMEI:1"]
        for start, limit in ((0, 0), (-1, 5)):
            with pytest.raises(ValidationError):
                await s.job_targets("tg", start, limit)
    use(body)


def test_job_targets_of_a_missing_job(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        before = await s.counts()
        with pytest.raises(NotFound):
            await s.add_job_targets("nojob", ["IMEI:1", "IMEI:2"])
        assert await s.counts() == before                        # nothing written
        with pytest.raises(NotFound):
            await s.job_targets("nojob", 0, 10)
        await s.create_job(Job(job_id="empty"))
        assert await s.job_targets("empty", 0, 10) == []          # a job without targets: none
    use(body)


def _job_task(tid: str, job: str = "jt", **kw: Any) -> Task:
    return task(tid, job_id=job, dev_id=kw.pop("dev_id", f"IMEI:{tid}"), **kw)


def test_transition_changes_of_next_attempt_and_attempts_keep_the_due_index(
        use: Callable[[Body], Any]) -> None:
    """The plain-changes path (next_attempt / attempts only): the due row follows the next
    attempt, is dropped when it is cleared or the task ends; bad values are refused."""
    async def body(s: Store) -> None:
        await s.create_task(task("d1", next_attempt=100.0))
        assert [t.task_id for t in await s.tasks_due(150.0)] == ["d1"]
        t = await s.transition("d1", TaskState.NOTIFIED,
                               changes={"next_attempt": 300.0, "attempts": 1})
        assert t.next_attempt == 300.0 and t.attempts == 1 and t.version == 2
        assert await s.tasks_due(250.0) == []
        assert [x.task_id for x in await s.tasks_due(350.0)] == ["d1"]
        t = await s.transition("d1", TaskState.NOTIFIED, changes={"next_attempt": 300.0})
        assert [x.task_id for x in await s.tasks_due(350.0)] == ["d1"]      # same: kept
        t = await s.transition("d1", TaskState.IN_PROGRESS, changes={"next_attempt": None})
        assert t.next_attempt is None and await s.tasks_due(1e12) == []
        t = await s.transition("d1", TaskState.PENDING, changes={"next_attempt": 50})
        assert [x.task_id for x in await s.tasks_due(60.0)] == ["d1"]
        for bad in ({"next_attempt": -1.0}, {"attempts": -1}, {"attempts": "2"}):
            with pytest.raises(ValidationError):
                await s.transition("d1", TaskState.NOTIFIED, changes=bad)
        t = await s.transition("d1", TaskState.FAILED, changes={"next_attempt": 70.0})
        assert await s.tasks_due(1e12) == []                      # final: no due row
        h = (await s.task_history("d1")).items
        assert [x.to_state for x in h][-1] == TaskState.FAILED
    use(body)


def test_a_pending_target_started_early_trades_places(use: Callable[[Body], Any]) -> None:
    """start_job_target: the device's target becomes the job's next task; the target that
    was next takes its place; tasks made in order afterwards skip nobody and make nobody
    twice."""
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="jt", state=JobState.RUNNING))
        ids = [f"IMEI:{i}" for i in range(6)]
        await s.add_job_targets("jt", ids)
        assert await s.pending_job_targets("IMEI:4") == ["jt"]
        await s.create_job_tasks("jt", 0, [_job_task("a0", dev_id="IMEI:0")])
        assert await s.pending_job_targets("IMEI:0") == []       # made: not pending
        early = await s.start_job_target("jt", _job_task("e4", dev_id="IMEI:4"), 6)
        assert early is not None and early.task_id == "e4"
        assert await s.job_targets("jt", 0, 10) == ["IMEI:0", "IMEI:4", "IMEI:2", "IMEI:3",
                                                    "IMEI:1", "IMEI:5"]
        assert await s.pending_job_targets("IMEI:4") == []
        assert await s.pending_job_targets("IMEI:1") == ["jt"]
        j = await s.get_job("jt")
        assert j.total == 2 and j.counts == {TaskState.PENDING: 2}
        # a second early start of the same device, or of a made one: nothing
        assert await s.start_job_target("jt", _job_task("x4", dev_id="IMEI:4"), 6) is None
        assert await s.start_job_target("jt", _job_task("x0", dev_id="IMEI:0"), 6) is None
        # the next in order: positions 2.. (IMEI:2, 3, 1, 5) — each once
        rest = await s.job_targets("jt", 2, 10)
        await s.create_job_tasks("jt", 2, [_job_task(f"r{i}", dev_id=d) for i, d in enumerate(rest)])
        assert sorted(t.dev_id for t in (await s.tasks_by_job("jt", limit=100)).items) == sorted(ids)
        # the stage boundary and the job's state are respected
        await s.create_job(Job(job_id="j2", state=JobState.RUNNING))
        await s.add_job_targets("j2", ids)
        assert await s.start_job_target("j2", _job_task("s5", job="j2", dev_id="IMEI:5"), 0) is None
        await s.update_job("j2", {"state": JobState.PAUSED})
        assert await s.start_job_target("j2", _job_task("p5", job="j2", dev_id="IMEI:5"), 6) is None
        assert (await s.get_job("j2")).total == 0
        assert await s.pending_job_targets("IMEI:5") == ["j2"]
        with pytest.raises(ValidationError):
            await s.start_job_target("j2", _job_task("w", job="jt", dev_id="IMEI:5"), 6)
        await s.update_job("j2", {"state": JobState.CANCELLED})     # ended: forgotten
        assert await s.start_job_target("j2", _job_task("c5", job="j2", dev_id="IMEI:5"), 6) is None
        assert await s.pending_job_targets("IMEI:5") == []
    use(body)


def test_create_job_tasks_moves_the_counters_in_the_same_write(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="jt", state=JobState.RUNNING))
        await s.add_job_targets("jt", [f"IMEI:{i}" for i in range(10)])
        made = await s.create_job_tasks("jt", 0, [_job_task(f"a{i}", dev_id=f"IMEI:{i}")
                                                  for i in range(4)])
        assert [t.task_id for t in made] == ["a0", "a1", "a2", "a3"]
        assert [t.seq for t in made] == sorted(t.seq for t in made)
        assert all(t.version == 1 and t.history_len == 1 and t.state is TaskState.PENDING
                   for t in made)
        j = await s.get_job("jt")
        assert j.total == 4 and j.counts == {TaskState.PENDING: 4} and j.targets == 10
        more = await s.create_job_tasks("jt", 4, [_job_task(f"b{i}", test_cycle=i == 0)
                                                  for i in range(3)])
        assert len(more) == 3
        j = await s.get_job("jt")
        assert j.total == 7 and j.counts == {TaskState.PENDING: 6}
        assert j.test_counts == {TaskState.PENDING: 1}
        page = await s.tasks_by_job("jt", limit=100)
        assert [t.task_id for t in page.items] == ["a0", "a1", "a2", "a3", "b0", "b1", "b2"]
        assert await s.create_job_tasks("jt", 7, []) == []
        assert (await s.get_job("jt")).total == 7
    use(body)


def test_create_job_tasks_refusals_write_nothing(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="jt", state=JobState.RUNNING))
        await s.create_job(Job(job_id="other", state=JobState.RUNNING))
        await s.create_job_tasks("jt", 0, [_job_task("first")])
        before = await s.counts()
        job_before = await s.get_job("jt")

        async def refused(exc: type[Exception], *args: Any) -> None:
            with pytest.raises(exc):
                await s.create_job_tasks(*args)
            assert await s.counts() == before
            j = await s.get_job("jt")
            assert (j.total, j.counts, j.test_counts) == \
                (job_before.total, job_before.counts, job_before.test_counts)

        # another claimer made tasks since this one read the job: its count is stale
        await refused(Conflict, "jt", 0, [_job_task("x1"), _job_task("x2")])
        await refused(Conflict, "jt", 5, [_job_task("x1")])
        # a task of another job, an invalid task, a task id taken, the same id twice
        await refused(ValidationError, "jt", 1, [_job_task("x1"), _job_task("x2", job="other")])
        await refused(ValidationError, "jt", 1, [_job_task("x1", op=ExecOp(uri=""))])
        await refused(AlreadyExists, "jt", 1, [_job_task("x1"), _job_task("first")])
        await refused(AlreadyExists, "jt", 1, [_job_task("x1"), _job_task("x2"), _job_task("x1")])
        await refused(NotFound, "nojob", 0, [_job_task("x1", job="nojob")])
        # the job is not RUNNING (paused, scheduled, over): no task of it starts
        for st in (JobState.PAUSED, JobState.SCHEDULED, JobState.CANCELLED, JobState.COMPLETED):
            await s.update_job("jt", {"state": st})
            await refused(Conflict, "jt", 1, [_job_task("x1")])
        await s.update_job("jt", {"state": JobState.RUNNING})
        made = await s.create_job_tasks("jt", 1, [_job_task("x1")])   # and now it may
        assert [t.task_id for t in made] == ["x1"] and (await s.get_job("jt")).total == 2
    use(body)


def test_create_job_tasks_racing_claimers_make_each_batch_once(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="jt", state=JobState.RUNNING))
        res = await asyncio.gather(*(s.create_job_tasks("jt", 0, [_job_task(f"r{k}-{i}")
                                                                  for i in range(5)])
                                     for k in range(6)), return_exceptions=True)
        won = [r for r in res if isinstance(r, list)]
        assert len(won) == 1 and all(isinstance(r, Conflict) for r in res if r not in won)
        j = await s.get_job("jt")
        assert j.total == 5 and j.counts == {TaskState.PENDING: 5}
        assert (await s.counts())["tasks"] == 5
    use(body)


def test_claim_due_leases_the_tasks_it_returns(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="cl"))
        await s.create_tasks([_job_task(f"d{i}", job="cl", next_attempt=100.0 + i)
                              for i in range(10)] +
                             [_job_task("later", job="cl", next_attempt=500.0),
                              _job_task("never", job="cl"),
                              _job_task("done", job="cl", next_attempt=50.0,
                                        state=TaskState.SUCCEEDED),
                              _job_task("gone", job="cl", next_attempt=60.0)])
        await s.transition("gone", TaskState.CANCELLED)         # final after it was due
        # the limit holds; earliest first; final tasks and tasks without a time never come
        first = await s.claim_due(200.0, 4, 30.0)
        assert [t.task_id for t in first] == ["d0", "d1", "d2", "d3"]
        assert all(t.next_attempt == 230.0 for t in first)
        assert (await s.get_task("d0")).next_attempt == 230.0     # written, not just returned
        rest = await s.claim_due(200.0, 100, 30.0)
        assert [t.task_id for t in rest] == [f"d{i}" for i in range(4, 10)]
        # nobody gets a claimed task again before its lease ends ...
        assert await s.claim_due(200.0, 100, 30.0) == []
        assert await s.claim_due(229.9, 100, 30.0) == []
        # ... and it is due again when the lease ran out (its claimer did nothing)
        again = await s.claim_due(230.0, 100, 10.0)
        assert sorted(t.task_id for t in again) == [f"d{i}" for i in range(10)]
        assert await s.claim_due(239.0, 100, 10.0) == []
        late = await s.claim_due(600.0, 100, 10.0)
        assert sorted(t.task_id for t in late) == sorted(["later"] + [f"d{i}" for i in range(10)])
        got = {t.task_id for t in await s.claim_due(10_000.0, 100, 10.0)}
        assert not got & {"never", "done", "gone"}
        # claiming keeps the task's state, history and job counters as they were
        t = await s.get_task("d0")
        assert t.state is TaskState.PENDING and t.history_len == 1
        assert (await s.get_job("cl")).counts == {TaskState.PENDING: 12,
                                                  TaskState.SUCCEEDED: 1,
                                                  TaskState.CANCELLED: 1}
        # a task that ends while claimed leaves the due index: never claimed again
        await s.transition("d1", TaskState.NOTIFIED)
        await s.transition("d1", TaskState.FAILED)
        assert "d1" not in {t.task_id for t in await s.claim_due(1e6, 100, 10.0)}
        with pytest.raises(ValidationError):
            await s.claim_due(1e6, 0, 10.0)
    use(body)


def test_concurrent_claimers_never_share_a_task(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="cc"))
        await s.create_tasks([_job_task(f"c{i:03d}", job="cc", next_attempt=10.0 + i / 1000)
                              for i in range(300)])
        res = await asyncio.gather(*(s.claim_due(100.0, 40, 60.0) for _ in range(10)))
        ids = [t.task_id for r in res for t in r]
        assert all(len(r) <= 40 for r in res)
        assert len(ids) == len(set(ids)) == 300
        assert await s.claim_due(159.0, 100, 60.0) == []
    use(body)


# --- push: subscriptions, event entries, dead letters, the charging log (webhooks.py) ----------


def _sub(sid: str, topics: list[str], **kw: Any) -> Any:
    from dmengine.model import Subscription
    return Subscription(sub_id=sid, url="https://hooks.example/x", topics=topics,
                        secret="whsec_" + "k" * 40, **kw)


def test_subscriptions_crud_and_topic_gated_entries(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        # no subscriber: an entry with a topic is not written (nobody pays for it)
        ev = OutboxEntry(entry_id="ev1", kind="webhook", topic="task", due=1.0)
        assert (await s.enqueue(ev)).entry_id == "ev1"
        assert await s.due_entries(10.0) == []
        a = await s.create_subscription(_sub("s-a", ["task", "charging"], job_id="j1"))
        assert a.created > 0 and (await s.get_subscription("s-a")) == a
        with pytest.raises(AlreadyExists):
            await s.create_subscription(_sub("s-a", ["job"]))
        with pytest.raises(ValidationError) as ei:
            await s.create_subscription(_sub("s-b", ["bogus"]))
        assert ei.value.where == "$.topics[0]"
        await s.create_subscription(_sub("s-b", ["job"]))
        await s.enqueue(ev)
        await s.enqueue(OutboxEntry(entry_id="ev2", kind="webhook", topic="job", due=2.0))
        assert [e.entry_id for e in await s.due_entries(10.0)] == ["ev1", "ev2"]
        p = await s.list_subscriptions(limit=1)
        assert [x.sub_id for x in p.items] == ["s-a"]
        p = await s.list_subscriptions(cursor=p.next_cursor)
        assert [x.sub_id for x in p.items] == ["s-b"] and p.next_cursor is None
        await s.delete_subscription("s-b")
        with pytest.raises(NotFound):
            await s.delete_subscription("s-b")
        with pytest.raises(NotFound):
            await s.get_subscription("s-b")
        await s.enqueue(OutboxEntry(entry_id="ev3", kind="webhook", topic="job", due=3.0))
        assert [e.entry_id for e in await s.due_entries(10.0)] == ["ev1", "ev2"]
    use(body)


def test_claim_fan_out_retry_dead_letter_replay(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        for i in range(5):
            await s.enqueue(OutboxEntry(entry_id=f"e{i}", kind="webhook", due=10.0 + i))
        got = await s.claim_entries(12.0, 10, 30.0)
        assert [e.entry_id for e in got] == ["e0", "e1", "e2"]
        assert all(e.due == 42.0 for e in got)
        assert [e.entry_id for e in await s.claim_entries(13.0, 10, 30.0)] == ["e3"]
        assert await s.claim_entries(13.0, 10, 30.0) == []             # claimed: hidden
        assert [e.entry_id for e in await s.claim_entries(43.0, 2, 30.0)] == ["e4", "e0"]
        # fan-out: the event leaves, its deliveries come, in one write
        d = [OutboxEntry(entry_id=f"e1.s{k}", kind="webhook", target=f"s{k}", due=50.0,
                         payload={"eventId": "e1"}) for k in range(3)]
        made = await s.fan_out("e1", d)
        assert [x.entry_id for x in made] == ["e1.s0", "e1.s1", "e1.s2"]
        with pytest.raises(NotFound):
            await s.fan_out("e1", d)
        assert await s.fan_out("e2", []) == []                       # nobody listens: dropped
        r = await s.retry("e1.s0", due=60.0, error="HTTP 500")
        assert r.attempts == 1
        dl = await s.dead_letter("e1.s0", error="HTTP 503")
        assert dl.entry.attempts == 2 and dl.error == "HTTP 503" and dl.time > 0
        assert "e1.s0" not in {e.entry_id for e in await s.due_entries(1e9)}
        with pytest.raises(NotFound):
            await s.dead_letter("e1.s0")
        await s.dead_letter("e1.s1")
        p = await s.dead_letters(limit=1)
        assert [x.entry.entry_id for x in p.items] == ["e1.s0"]
        p = await s.dead_letters(cursor=p.next_cursor)
        assert [x.entry.entry_id for x in p.items] == ["e1.s1"] and p.next_cursor is None
        assert (await s.get_dead_letter("e1.s0")).entry.payload == {"eventId": "e1"}
        back = await s.replay_dead_letter("e1.s0", due=70.0)
        assert back.attempts == 0 and back.due == 70.0 and back.payload == {"eventId": "e1"}
        with pytest.raises(NotFound):
            await s.replay_dead_letter("e1.s0", due=70.0)
        assert "e1.s0" in {e.entry_id for e in await s.due_entries(70.0)}
        assert [x.entry.entry_id for x in (await s.dead_letters()).items] == ["e1.s1"]
    use(body)


def test_concurrent_entry_claimers_never_share_an_entry(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        for i in range(200):
            await s.enqueue(OutboxEntry(entry_id=f"c{i:03d}", kind="webhook", due=1.0 + i / 1e3))
        res = await asyncio.gather(*(s.claim_entries(10.0, 30, 60.0) for _ in range(10)))
        ids = [e.entry_id for r in res for e in r]
        assert len(ids) == len(set(ids)) == 200
    use(body)


def test_charging_entries_are_logged_in_the_same_write(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        # without a charging subscriber the event is logged, not queued
        await s.enqueue(OutboxEntry(entry_id="ch1", kind="charging", topic="charging", due=1.0,
                                    payload={"time": 100.0, "task_id": "t1", "dev_id": "IMEI:1",
                                             "imei": "356938035643809", "operation": "UPDATE",
                                             "content_id": "fw-1", "content_version": "2.4.0",
                                             "result": "SUCCEEDED",
                                             "devinfo": {"./DevInfo/Mod": "EX100"}}))
        assert await s.due_entries(1e9) == []
        await s.create_subscription(_sub("s-c", ["charging"]))
        await s.enqueue(OutboxEntry(entry_id="ch2", kind="charging", topic="charging", due=1.0,
                                    payload={"time": 50.0, "task_id": "t2"}))
        assert [e.entry_id for e in await s.due_entries(1e9)] == ["ch2"]
        with pytest.raises(ValidationError) as ei:
            await s.enqueue(OutboxEntry(entry_id="ch3", kind="charging", due=1.0,
                                        payload={"time": "yesterday"}))
        assert ei.value.where == "$.payload.time"
        log = (await s.charging_events()).items
        assert [(e.event_id, e.time) for e in log] == [("ch2", 50.0), ("ch1", 100.0)]
        assert log[1].devinfo == {"./DevInfo/Mod": "EX100"} and log[1].content_version == "2.4.0"
        assert [e.event_id for e in (await s.charging_events(start=60.0)).items] == ["ch1"]
        assert [e.event_id for e in (await s.charging_events(end=60.0)).items] == ["ch2"]
        p = await s.charging_events(limit=1)
        assert p.next_cursor is not None
        assert [e.event_id for e in (await s.charging_events(cursor=p.next_cursor)).items] == \
            ["ch1"]
        # acknowledged deliveries leave the log as it is
        await s.ack("ch2")
        assert len((await s.charging_events()).items) == 2
    use(body)


def test_charging_log_retention_prunes_the_oldest(use: Callable[[Body], Any]) -> None:
    """prune_charging: events older than ``before`` go, then the oldest beyond the newest
    ``keep``, at most ``limit`` per call; queued deliveries stay."""
    async def body(s: Store) -> None:
        await s.create_subscription(_sub("s-c", ["charging"]))
        for i in range(10):
            await s.enqueue(OutboxEntry(entry_id=f"ch{i}", kind="charging", topic="charging",
                                        due=1.0, payload={"time": 100.0 + i, "task_id": f"t{i}"}))

        async def log() -> list[str]:
            return [e.event_id for e in (await s.charging_events(limit=100)).items]
        assert await s.prune_charging(before=100.0) == 0          # none older than that
        assert await s.prune_charging(before=103.0) == 3           # 100, 101, 102 go
        assert await log() == [f"ch{i}" for i in range(3, 10)]
        assert await s.prune_charging(keep=5, limit=1) == 1        # bounded per call
        assert await s.prune_charging(keep=5) == 1
        assert await s.prune_charging(keep=5) == 0
        assert await log() == [f"ch{i}" for i in range(5, 10)]
        # both bounds at once: the stricter wins
        assert await s.prune_charging(before=107.0, keep=4) == 2
        assert await log() == ["ch7", "ch8", "ch9"]
        assert await s.prune_charging() == 0                       # no bound: nothing goes
        assert len(await s.due_entries(1e9, limit=100)) == 10      # deliveries untouched
        with pytest.raises(ValidationError) as ei:
            await s.prune_charging(keep=-1)
        assert ei.value.where == "keep"
    use(body)


def test_job_events_are_written_with_the_job_move(use: Callable[[Body], Any]) -> None:
    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="jq", targets=20))
        await s.update_job("jq", {"state": JobState.RUNNING})   # no subscriber: no event
        assert await s.due_entries(1e12) == []
        await s.create_subscription(_sub("s-j", ["job"]))
        await s.create_tasks([task(f"q{i:02d}", job_id="jq") for i in range(20)])
        await s.update_job("jq", {"state": JobState.PAUSED, "cause": "break"})
        await s.update_job("jq", {"cause": "still"})            # no state change: no event
        for i in range(20):
            await s.transition(f"q{i:02d}", TaskState.CANCELLED, changes={"finished": 1.0})
        await s.update_job("jq", {"state": JobState.CANCELLED})
        events = [e.payload for e in await s.due_entries(1e12)]
        kinds = [(p["type"], p.get("previous"), p["state"], p.get("percent")) for p in events]
        assert kinds == [("job.state", "RUNNING", "PAUSED", None)] + \
            [("job.progress", None, "PAUSED", pc) for pc in range(10, 101, 10)] + \
            [("job.state", "PAUSED", "CANCELLED", None)]
        assert events[0]["cause"] == "break" and events[-1]["counts"] == {"CANCELLED": 20}
        assert all(e.topic == "job" for e in await s.due_entries(1e12))
    use(body)


def test_update_device_and_move_is_one_write_and_a_refused_move_keeps_the_update(
        use: Callable[[Body], Any]) -> None:
    """A session's first message: the device update and its task's IN_PROGRESS move in one
    write op (the store counts one); a move the task refuses (cancelled meanwhile) comes back
    as the error, and the device update is written all the same."""
    from dmengine.model import TaskState as S

    async def body(s: Store) -> None:
        d = await s.create_device(dev(1))
        await s.create_task(task("t1", dev_id=d.dev_id, state=S.NOTIFIED, next_attempt=50.0))
        await s.create_task(task("t2", dev_id=d.dev_id))
        ops = getattr(s, "ops", None)
        d2, moved = await s.update_device_and_move(d.dev_id, {"tz": "X"}, "t1",
                                                   S.IN_PROGRESS, cause="started",
                                                   changes={"next_attempt": None})
        if ops is not None:
            assert s.ops == ops + 1                # one op (LMDB counts its writer's ops)
        assert isinstance(moved, Task) and moved.state == S.IN_PROGRESS
        assert moved.next_attempt is None and moved.cause == "started"
        assert d2.tz == "X" and (await s.get_device(d.dev_id)).tz == "X"
        assert (await s.get_task("t1")).state == S.IN_PROGRESS
        assert [h.to_state for h in (await s.task_history("t1")).items][-1] == S.IN_PROGRESS
        await s.transition("t2", S.CANCELLED, cause="cancelled by the caller")
        d3, refused = await s.update_device_and_move(d.dev_id, {"tz": "Y"}, "t2",
                                                     S.IN_PROGRESS, cause="started")
        assert isinstance(refused, InvalidTransition), refused
        assert d3.tz == "Y" and (await s.get_device(d.dev_id)).tz == "Y"
        assert (await s.get_task("t2")).state == S.CANCELLED
        _, missing = await s.update_device_and_move(d.dev_id, {"tz": "Z"}, "nope",
                                                    S.IN_PROGRESS, cause="started")
        assert isinstance(missing, NotFound) and (await s.get_device(d.dev_id)).tz == "Z"
    use(body)


def test_a_move_through_a_waypoint_is_one_write_with_both_history_steps(
        use: Callable[[Body], Any]) -> None:
    """``transition(..., waypoint=…)``: the task's move to the waypoint (its own history entry,
    its changes) and then the named move, in one write op; a waypoint the task refuses (it
    was cancelled) writes neither."""
    from dmengine.model import TaskResult
    from dmengine.model import TaskState as S

    async def body(s: Store) -> None:
        d = await s.create_device(dev(1))
        await s.create_task(task("t1", dev_id=d.dev_id, state=S.IN_PROGRESS))
        await s.create_task(task("t2", dev_id=d.dev_id, state=S.IN_PROGRESS))
        ops = getattr(s, "ops", None)
        waiting = (S.IN_PROGRESS, "waiting for the result alert",
                   {"result": TaskResult(statuses={"Exec": 202}), "next_attempt": 99.0})
        done = await s.transition("t1", S.SUCCEEDED, cause="updated", result_code=200,
                                  changes={"finished": 5.0}, waypoint=waiting)
        if ops is not None:
            assert s.ops == ops + 1
        assert done.state == S.SUCCEEDED and done.result is not None
        assert done.result.statuses == {"Exec": 202}       # the waypoint's changes stand
        hist = (await s.task_history("t1")).items
        assert [(h.to_state, h.cause) for h in hist[-2:]] == [
            (S.IN_PROGRESS, "waiting for the result alert"), (S.SUCCEEDED, "updated")]
        await s.transition("t2", S.CANCELLED, cause="cancelled by the caller")
        n = len((await s.task_history("t2")).items)
        with pytest.raises(InvalidTransition):
            await s.transition("t2", S.SUCCEEDED, cause="updated", waypoint=waiting)
        assert len((await s.task_history("t2")).items) == n
        assert (await s.get_task("t2")).result is None
    use(body)


def test_job_tasks_made_and_moved_on_in_one_write(use: Callable[[Body], Any]) -> None:
    """``create_job_tasks(..., moves=…)``: the tasks named are made and moved on in the same
    write (the scheduler's NOTIFIED before package #0 goes out) — each with its creation and
    its move in the history, the job's counters at the new state, the move's changes kept;
    the others are made as they are.  A move the new task refuses, or one naming a task not
    in the batch, writes nothing."""
    from dmengine.model import TaskState as S

    async def body(s: Store) -> None:
        await s.create_job(Job(job_id="mv", state=JobState.RUNNING))
        ops = getattr(s, "ops", None)
        batch = [task(f"m{i}", job_id="mv", dev_id=f"IMEI:35693803000000{i}", next_attempt=50.0)
                 for i in range(3)]
        sent = (S.NOTIFIED, "package #0 sent via test (session 1F)",
                {"next_attempt": 70.0, "attempts": 1})
        made = await s.create_job_tasks("mv", 0, batch, moves={"m0": sent, "m2": sent})
        if ops is not None:
            assert s.ops == ops + 1
        assert [(t.state, t.attempts, t.next_attempt) for t in made] == [
            (S.NOTIFIED, 1, 70.0), (S.PENDING, 0, 50.0), (S.NOTIFIED, 1, 70.0)]
        assert made[0] == await s.get_task("m0")
        hist = (await s.task_history("m0")).items
        assert [(h.from_state, h.to_state, h.cause) for h in hist] == [
            (None, S.PENDING, None),
            (S.PENDING, S.NOTIFIED, "package #0 sent via test (session 1F)")]
        assert len((await s.task_history("m1")).items) == 1
        j = await s.get_job("mv")
        assert j.total == 3 and j.counts == {S.NOTIFIED: 2, S.PENDING: 1}
        # due again when the move said, not when the made task said
        assert [t.task_id for t in await s.tasks_due(60.0)] == ["m1"]
        assert sorted(t.task_id for t in await s.tasks_due(80.0)) == ["m0", "m1", "m2"]
        more = [task("m3", job_id="mv", dev_id="IMEI:356938030000003")]
        with pytest.raises(InvalidTransition):
            await s.create_job_tasks("mv", 3, more, moves={"m3": (S.SUCCEEDED, "no", {})})
        with pytest.raises(ValidationError) as e:
            await s.create_job_tasks("mv", 3, more, moves={"m9": sent})
        assert e.value.where == "$.moves"
        with pytest.raises(NotFound):
            await s.get_task("m3")
        assert (await s.get_job("mv")).total == 3
    use(body)


def test_devices_read_together(use: Callable[[Body], Any]) -> None:
    """``get_devices``: those that exist, by DevId, as ``get_device`` reads them (unknown and
    over-long ids left out, not an error)."""
    async def body(s: Store) -> None:
        a = await s.create_device(dev(1))
        b = await s.create_device(dev(2, tz="Europe/Berlin"))
        got = await s.get_devices([b.dev_id, "IMEI:000000000000000", a.dev_id, "x" * 600])
        assert got == {a.dev_id: await s.get_device(a.dev_id),
                       b.dev_id: await s.get_device(b.dev_id)}
        assert await s.get_devices([]) == {}
        # a batch larger than an inline read (LMDB: read off the event loop)
        await s.import_devices([dev(100 + i) for i in range(250)])
        many = await s.get_devices([dev(100 + i).dev_id for i in range(250)])
        assert len(many) == 250 and many[dev(349).dev_id].msisdn == dev(349).msisdn
    use(body)
