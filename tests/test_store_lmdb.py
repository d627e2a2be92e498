"""LMDB-only behaviour: map growth, two processes on one environment, stale readers,
group commit, schema migrations, backup / restore / check (functions and CLI)."""
from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import lmdb
import pytest

from dmengine.errors import NotFound, StoreError
from dmengine.model import Device, Job, QueryOp, SchemaRecord, Task, TaskState
from dmengine.store import admin
from dmengine.store.kv import _enc
from dmengine.store.lmdb import LmdbStore, open_dbs, open_env

ROOT = pathlib.Path(__file__).resolve().parent.parent


def devices(prefix: int, n: int) -> list[Device]:
    return [Device(dev_id=f"IMEI:{prefix}{i:012d}", imei=f"{prefix}{i:012d}",
                   msisdn=f"+{prefix}{i:012d}", capability="cap-a",
                   devinfo={"./DevInfo/Mod": "X1", "./DevInfo/Man": "Acme"})
            for i in range(n)]


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_map_grows_instead_of_failing(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "env", map_size=1 << 16)
        rep = await s.import_devices(devices(351, 3000), chunk=1000)
        assert rep.created == 3000 and not rep.rejected
        assert s.map_grows >= 3
        assert (await s.device_by_msisdn("+351000000002999")).dev_id == "IMEI:351000000002999"
        # many small concurrent writes also cross a growth
        await s.create_job(Job(job_id="g"))
        await asyncio.gather(*(s.create_task(Task(task_id=f"g{i}", dev_id="IMEI:1", job_id="g",
                                                  op=QueryOp(nodes=["./DevInfo/Mod"])))
                               for i in range(2000)))
        assert (await s.get_job("g")).counts == {TaskState.PENDING: 2000}
        assert await s.check() == []
        await s.close()
    asyncio.run(main())


def test_map_limit_is_an_error_not_a_crash(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "env", map_size=1 << 16, max_map_size=1 << 18)
        with pytest.raises(StoreError, match="map full"):
            await s.import_devices(devices(352, 5000), chunk=5000)
        assert (await s.counts())["devices"] == 0        # the failed chunk left nothing behind
        await s.create_job(Job(job_id="still-works"))
        # an op too big for the limit sharing a transaction with small ones: they still land
        def big(ctx) -> None:  # type: ignore[no-untyped-def]
            for i in range(3000):
                ctx.put("audit", i.to_bytes(8, "big"), b"x" * 200)

        def small(n: int):  # type: ignore[no-untyped-def]
            return lambda ctx: ctx.put("meta", b"small%d" % n, b"1")
        results, errors = s._run([(small(1), None, None, None), (big, None, None, None),
                                  (small(2), None, None, None)])
        assert list(errors) == [1] and isinstance(errors[1], StoreError)
        assert (await s.counts())["audit"] == 0
        landed = await s._read(lambda t: (t.get("meta", b"small1"), t.get("meta", b"small2")))
        assert landed == (b"1", b"1")
        assert await s.check() == []
        await s.close()
    asyncio.run(main())


def test_group_commit_batches_concurrent_writers(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "env")
        b0 = s.batches
        await s.create_job(Job(job_id="b"))
        await s.create_tasks([Task(task_id=f"b{i}", dev_id="IMEI:1", job_id="b",
                                   op=QueryOp(nodes=["./X"])) for i in range(300)])
        await asyncio.gather(*(s.transition(f"b{i}", TaskState.NOTIFIED) for i in range(300)))
        assert s.ops - b0 >= 302
        assert s.batches - b0 < 150      # 300 concurrent transitions shared transactions
        flags = s.env.flags()
        assert flags["sync"] and flags["metasync"] and not flags["map_async"]
        big = await s.tasks_by_job("b", limit=1000)   # a big page: read off the loop
        assert len(big.items) == 300
        await s.close()
    asyncio.run(main())


CHILD_WRITER = """
import asyncio, sys
from dmengine.model import Device
from dmengine.store.lmdb import LmdbStore
async def main(path, prefix, n):
    s = LmdbStore(path, map_size=1 << 16)
    for i in range(0, n, 100):
        await asyncio.gather(*(s.create_device(Device(dev_id=f"IMEI:{prefix}{j:012d}",
                                                      imei=f"{prefix}{j:012d}"))
                               for j in range(i, min(n, i + 100))))
    print("grows", s.map_grows, flush=True)
    await s.close()
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_two_processes_share_one_environment(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "env"

    async def main() -> None:
        s = LmdbStore(path, map_size=1 << 16)
        await s.create_device(Device(dev_id="IMEI:parent-0"))
        child = subprocess.Popen([sys.executable, "-c", CHILD_WRITER, str(path), "353", "3000"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True)
        # the parent keeps writing and reading while the child writes (and grows the map)
        i = 0
        while child.poll() is None or i < 50:
            await s.create_device(Device(dev_id=f"IMEI:parent-{i + 1}"))
            await s.list_devices(limit=50)
            i += 1
            await asyncio.sleep(0.005)
        out, err = child.communicate()
        assert child.returncode == 0, err
        assert int(out.split()[1]) >= 1 or s.map_grows >= 1
        assert (await s.get_device("IMEI:353000000002999")).imei == "353000000002999"
        counts = await s.counts()
        assert counts["devices"] == 3000 + i + 1 and counts["dev_imei"] == 3000
        await s.create_device(Device(dev_id="IMEI:after-child"))   # past the child's growth
        assert await s.check() == []
        await s.close()
    asyncio.run(main())


CHILD_READER = """
import sys, time, lmdb
env = lmdb.open(sys.argv[1], max_dbs=64)
txn = env.begin()
print("reading", flush=True)
time.sleep(60)
"""


def test_stale_readers_are_cleared(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "env"
    s = LmdbStore(path, reader_check_interval=0.05)
    try:
        child = subprocess.Popen([sys.executable, "-c", CHILD_READER, str(path)],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline() == "reading\n"
        assert f" {child.pid} " in f" {s.env.readers()} ".replace("\n", " ")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        # the writer's periodic sweep frees the dead process's slot
        deadline = time.monotonic() + 20
        while f" {child.pid} " in f" {s.env.readers()} ".replace("\n", " "):
            assert time.monotonic() < deadline, s.env.readers()
            time.sleep(0.02)
        assert s.stale_readers_cleared >= 1
        assert s.reader_check() == 0
    finally:
        s.close_sync()


def test_schema_migrations_run_on_open(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "env"
    LmdbStore(path).close_sync()
    env = open_env(path)
    dbs = open_dbs(env)
    with env.begin(write=True) as txn:      # pretend the environment is from version 0
        txn.put(b"schema", _enc.encode(SchemaRecord(version=0)), db=dbs["meta"])
    env.close()
    ran = []

    def v0_to_v1(txn) -> None:  # type: ignore[no-untyped-def]
        ran.append(0)
        txn.put("meta", b"migrated-marker", b"1")
    s = LmdbStore(path, migrations={0: v0_to_v1}, schema_version=1)
    try:
        assert s.schema == (0, 1) and ran == [0]
    finally:
        s.close_sync()
    s = LmdbStore(path, migrations={0: v0_to_v1}, schema_version=1)   # only once
    s.close_sync()
    assert ran == [0]
    with pytest.raises(StoreError, match="newer"):
        LmdbStore(path, schema_version=0)
    with pytest.raises(StoreError, match="no migration"):
        LmdbStore(path, schema_version=model_schema() + 1)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmengine.store.admin", "store", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_backup_restore_check_cli(tmp_path: pathlib.Path) -> None:
    env_dir, bak, restored = tmp_path / "env", tmp_path / "bak", tmp_path / "restored"

    async def fill_and_backup_online() -> None:
        s = LmdbStore(env_dir)
        await s.import_devices(devices(354, 500))
        await s.create_job(Job(job_id="j"))
        await s.create_task(Task(task_id="t", dev_id="IMEI:354000000000001", job_id="j",
                                 op=QueryOp(nodes=["./DevInfo/Mod"])))
        await s.transition("t", TaskState.NOTIFIED)
        # online: another process backs up while this one keeps the environment open
        r = cli("backup", str(bak), "--data", str(env_dir))
        assert r.returncode == 0, r.stderr
        await s.transition("t", TaskState.IN_PROGRESS)    # after the snapshot
        await s.backup(tmp_path / "bak2")                  # the in-process online backup
        await s.close()
    asyncio.run(fill_and_backup_online())
    assert (bak / "data.mdb").stat().st_size < (env_dir / "data.mdb").stat().st_size
    r = cli("check", "--data", str(bak))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    r = cli("backup", str(bak), "--data", str(env_dir))
    assert r.returncode == 2 and "already holds" in r.stderr

    r = cli("restore", str(bak), "--data", str(restored))
    assert r.returncode == 0, r.stderr

    async def verify() -> None:
        s = LmdbStore(restored)
        assert (await s.get_task("t")).state is TaskState.NOTIFIED    # the snapshot's state
        assert (await s.counts())["devices"] == 500
        await s.close()
        s = LmdbStore(tmp_path / "bak2")
        assert (await s.get_task("t")).state is TaskState.IN_PROGRESS
        await s.close()
    asyncio.run(verify())
    r = cli("restore", str(bak), "--data", str(restored))
    assert r.returncode == 2 and "--force" in r.stderr
    assert cli("restore", str(bak), "--data", str(restored), "--force").returncode == 0

    # damage an index behind the store's back: check names it and exits 1
    env = open_env(env_dir)
    dbs = open_dbs(env)
    with env.begin(write=True) as txn:
        assert txn.delete(b"+354000000000007", db=dbs["dev_msisdn"])
        txn.put(b"t\x00\x00\x00\x00\x09", b"\x80", db=dbs["history"])
    env.close()
    r = cli("check", "--data", str(env_dir))
    assert r.returncode == 1
    assert "dev_msisdn: missing entry b'+354000000000007'" in r.stdout
    assert "history: task b't' has entries" in r.stdout
    assert admin.check(env_dir) != []
    # a damaged backup is refused by restore
    with pytest.raises(StoreError, match="fails its check"):
        admin.restore(env_dir, tmp_path / "other")
    r = cli("check", "--data", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no LMDB environment" in r.stderr


def test_register_cli_adds_the_subcommands() -> None:
    import argparse
    ap = argparse.ArgumentParser()
    admin.register_cli(ap.add_subparsers(dest="cmd"))
    a = ap.parse_args(["store", "backup", "/tmp/x", "--data", "/tmp/y"])
    assert a.path == "/tmp/x" and a.data == "/tmp/y" and callable(a.func)
    a = ap.parse_args(["store", "check"])
    assert a.data == admin.DEFAULT_DATA_DIR
    with pytest.raises(SystemExit):
        ap.parse_args(["store", "explode"])
    assert isinstance(lmdb.version(), tuple)


def test_a_key_lmdb_refuses_fails_only_its_caller(tmp_path: pathlib.Path) -> None:
    async def main() -> None:
        s = LmdbStore(tmp_path / "env")
        long_id = "x" * 1000          # longer than LMDB's key limit (511 bytes)
        res = await asyncio.gather(s.update_device(long_id, {"tz": "UTC"}),
                                   *(s.create_job(Job(job_id=f"ok{i}")) for i in range(10)),
                                   return_exceptions=True)
        assert isinstance(res[0], StoreError) and not isinstance(res[0], lmdb.Error)
        assert all(isinstance(r, Job) for r in res[1:])
        with pytest.raises(NotFound):
            await s.get_device(long_id)
        assert (await s.counts())["jobs"] == 10
        await s.close()
    asyncio.run(main())


def model_schema() -> int:
    from dmengine.model import SCHEMA_VERSION
    return SCHEMA_VERSION


def test_schema_2_environment_gets_its_dev_targets_index(tmp_path: pathlib.Path) -> None:
    """Jobs stored before the device → target index (schema 2): on open, the targets of open
    jobs whose tasks are not made yet are indexed, so a device of theirs that connects on its
    own is found; made and finished ones are not."""
    from dmengine.model import Job, JobState, QueryOp, Task
    path = tmp_path / "env"
    ids = [f"IMEI:{i}" for i in range(5)]

    async def make() -> None:
        s = LmdbStore(path)
        try:
            for jid, state in (("run", JobState.RUNNING), ("done", JobState.RUNNING)):
                await s.create_job(Job(job_id=jid, state=state, op=QueryOp(nodes=["./X"])))
                await s.add_job_targets(jid, ids)
            await s.create_job_tasks("run", 0, [Task(task_id="t0", dev_id="IMEI:0", job_id="run",
                                                     op=QueryOp(nodes=["./X"]))])
            await s.update_job("done", {"state": JobState.COMPLETED})
        finally:
            await s.close()
    asyncio.run(make())
    env = open_env(path)
    dbs = open_dbs(env)
    with env.begin(write=True) as txn:      # as schema 2 left it: no index rows
        txn.drop(dbs["dev_targets"], delete=False)
        txn.put(b"schema", _enc.encode(SchemaRecord(version=2)), db=dbs["meta"])
    env.close()

    async def read() -> None:
        s = LmdbStore(path)
        try:
            assert s.schema == (2, model_schema())
            assert await s.pending_job_targets("IMEI:0") == []          # made already
            assert await s.pending_job_targets("IMEI:3") == ["run"]      # "done" is final
            assert await s.check() == []
        finally:
            await s.close()
    asyncio.run(read())


def test_schema_1_environment_gets_its_job_state_index(tmp_path: pathlib.Path) -> None:
    """An environment written before the job-state index (schema 1) is migrated when opened:
    its jobs are listed by state at once, and the checker finds the index sound."""
    from dmengine.model import Job, JobState
    path = tmp_path / "env"

    async def make() -> None:
        s = LmdbStore(path)
        try:
            await s.create_job(Job(job_id="run-1"))
            await s.update_job("run-1", {"state": JobState.RUNNING})
            await s.create_job(Job(job_id="sched-1"))
        finally:
            await s.close()
    asyncio.run(make())
    env = open_env(path)
    dbs = open_dbs(env)
    with env.begin(write=True) as txn:      # as schema 1 left it: no index rows
        txn.drop(dbs["job_state"], delete=False)
        txn.put(b"schema", _enc.encode(SchemaRecord(version=1)), db=dbs["meta"])
    env.close()

    async def read() -> None:
        s = LmdbStore(path)
        try:
            assert s.schema == (1, model_schema())
            assert [j.job_id for j in (await s.list_jobs(state=JobState.RUNNING)).items] \
                == ["run-1"]
            assert [j.job_id for j in (await s.list_jobs(state=JobState.SCHEDULED)).items] \
                == ["sched-1"]
            assert await s.check() == []
        finally:
            await s.close()
    asyncio.run(read())
