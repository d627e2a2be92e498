"""Issue 14, restart safety: ``kill -9`` the server in the middle of a firmware campaign and
start it again on the same data directory.

A real ``python -m dmengine serve`` process with ``--gateway http:URL``: package #0 comes as
JSON to an aiohttp listener in this process, which hands it to a simulator ``Fleet`` whose
devices run their DM sessions against the server's device port.  The job (a FUMO UPDATE over
300 devices, rate-limited so that it is mid-way after a second or two) is created in-process
before the first start, with the devices, their capability and the firmware.  The server is
killed with SIGKILL from inside this process at one of two moments — when the gateway listener
gets package #0 number KILL_AFTER (a burst of notifications going out: tasks written NOTIFIED,
some packages sent, some not), or when a device executes firmware Exec number KILL_AT_EXEC
(sessions, downloads and Exec answers under way) — then started again.  Then:

* the job goes on to COMPLETED;
* no task is lost: every target has exactly one task, every task is final, the job's counters
  are the tasks' states, the store's checker finds nothing wrong;
* no device got a firmware Exec twice unless the recorded outcome called for a retry: a
  device may see a second Exec only if its task was put back for a retry (its session was cut
  off before the server recorded the Exec's answer), and never once the server recorded the
  Exec as accepted (the outcome then comes by Generic Alert).  Execs are counted on the
  simulator side (``ClientSession._exec``).

A phone that could not report its FUMO result (the server went away mid-session) reports it
in a session of its own later; the fleet does the same after the restart, once a second.

A phone whose Exec answer the kill cut off reports the download's failure (503) in package 1
of its next session: that report is the task's outcome, and the task is not started again
before it is read (the record and the phone then agree, which the test checks).
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import os
import pprint
import re
import signal
import subprocess
import sys
import time
from typing import Any

import lmdb
import msgspec
import pytest
import uvloop
from aiohttp import web

from dmengine.config import BrokerConfig
from dmengine.bulk import Jobs
from dmengine.content import ContentService
from dmengine.model import (FINAL_TASK_STATES, Capability, Device, DmAccount, Job, JobState,
                            Selection, TaskState, UpdateOp)
from dmengine.simulator.device import ClientSession, DeviceProfile
from dmengine.simulator.fleet import Fleet
from dmengine.store.base import all_pages
from dmengine.store.lmdb import LmdbStore, open_dbs, open_env
from dmengine.tasks import Tasks
from test_cli_serve import close_pipes

S = TaskState
J = JobState
N = 300
RATE = 60.0                       # notifications per second: ~5 s of campaign
KILL_AFTER = 100                  # package #0 received: the second burst is going out
KILL_AT_EXEC = 30                 # firmware Execs done: in the second burst's sessions
FIRMWARE = bytes((i * 7 + 3) & 0xFF for i in range(40_000))
LINE = re.compile(r"^(device port|API|API key): (\S+)$")
DEADLINE = 50.0                   # seconds for the whole scenario
# what the task history says when the server sends a task's commands to the device, and when
# it records a FUMO Exec as accepted (dmengine/sessions.py)
SENT = "device connected; commands sent"
ACCEPTED = "accepted; waiting for the result alert"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_server(data: str, gateway_url: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    with open(os.path.join(data, "serve.log"), "a") as log:
        p = subprocess.Popen([sys.executable, "-m", "dmengine", "serve", "--data", data,
                              "--device-port", "0", "--api-port", "0",
                              "--gateway", f"http:{gateway_url}",
                              "--allow-private-callbacks"],     # the gateway is on loopback
                             stdout=subprocess.PIPE, stderr=log, text=True)
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 30
    assert p.stdout is not None
    while "API key" not in seen:
        assert time.monotonic() < deadline, f"serve printed only {seen}"
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"serve exited with {p.wait()}: {server_log(data)}")
        m = LINE.match(line.strip())
        if m:
            seen[m.group(1)] = m.group(2)
    return p, seen


def server_log(data: str) -> str:
    try:
        with open(os.path.join(data, "serve.log")) as f:
            return f.read()[-4000:]
    except OSError:
        return ""


class JobReader:
    """Reads the job record from the LMDB environment the server writes (readers in another
    process are fine with LMDB)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.env: Any = None
        self.dbs: dict[str, Any] = {}

    def job(self, job_id: str) -> Job:
        for _ in range(3):
            try:
                if self.env is None:
                    self.env = open_env(self.path, readonly=True)
                    self.dbs = open_dbs(self.env, create=False)
                with self.env.begin(db=self.dbs["jobs"]) as txn:
                    raw = txn.get(job_id.encode())
                assert raw is not None
                return msgspec.msgpack.decode(raw, type=Job)
            except lmdb.Error:          # the writer grew the map: open it again
                self.close()
        raise AssertionError("cannot read the job")

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None


async def prepare(data: str, fleet: Fleet) -> str:
    """Devices, capability, firmware and the job, written before the server starts."""
    store = LmdbStore(os.path.join(data, "store"))
    try:
        await store.create_capability(Capability(
            oid="cap-ex100", make="Acme", model="EX100", firmware_versions=["2.3.9", "2.4.0"],
            mo_paths={"fumo": "./FUMO/1"}))
        rep = await store.import_devices(Device(
            dev_id=d.dev_id, imei=d.dev_id.split(":", 1)[1], msisdn=d.msisdn,
            capability="cap-ex100",
            account=DmAccount(server_id="dmengine", client_name=d.username,
                              client_password=d.client_secret, server_password=d.server_secret,
                              client_nonce=b64(d.client_nonce) if d.client_nonce else None,
                              server_nonce=b64(d.server_nonce) if d.server_nonce else None))
            for d in fleet.devices)
        assert rep.created == N and not rep.rejected, rep

        async def chunks() -> Any:
            for i in range(0, len(FIRMWARE), 8192):
                yield FIRMWARE[i:i + 8192]
        content = await ContentService(store, os.path.join(data, "content")).ingest(
            chunks(), name="ex100-2.4.0.bin", sha256=hashlib.sha256(FIRMWARE).hexdigest(),
            capability="cap-ex100", from_version="2.3.9", to_version="2.4.0")
        cfg = BrokerConfig()
        job = await Jobs(store, Tasks(store, cfg), cfg).create(
            UpdateOp(content_id=content.content_id), Selection(capability="cap-ex100"),
            name="restart-safety", rate_limit=RATE)
        assert job.state == J.RUNNING and job.targets == N
        return job.job_id
    finally:
        await store.close()


@pytest.mark.parametrize("kill_at", ["pkg0", "exec"])
def test_kill_9_mid_job_and_restart(tmp_path, kill_at):
    """``kill_at``: SIGKILL when the gateway receives package #0 number KILL_AFTER (a burst
    of notifications going out), or when a device executes firmware Exec number
    KILL_AT_EXEC (sessions, downloads and result reports under way)."""
    data = str(tmp_path / "var")
    os.makedirs(data)
    execs: collections.Counter[str] = collections.Counter()
    orig_exec = ClientSession._exec
    server: dict[str, Any] = {"proc": None, "killed_at": None}

    def kill() -> None:
        if server["killed_at"] is None:
            server["proc"].send_signal(signal.SIGKILL)
            server["killed_at"] = time.monotonic()

    def counting_exec(self: ClientSession, cmd: Any) -> int:
        if any("/FUMO/" in (it.target or "") for it in cmd.items or ()):
            execs[self.device.dev_id] += 1
            if kill_at == "exec" and sum(execs.values()) == KILL_AT_EXEC:
                kill()
        return orig_exec(self, cmd)

    async def main() -> None:
        t_start = time.monotonic()
        prof = DeviceProfile()
        fleet = Fleet(prof, N, seed=11)
        job_id = await prepare(data, fleet)
        pkg0s = collections.Counter[str]()
        in_session: set[str] = set()
        run_session = fleet.run_session

        async def tracked_session(dev: Any, **kw: Any) -> Any:
            in_session.add(dev.dev_id)
            try:
                return await run_session(dev, **kw)
            finally:
                in_session.discard(dev.dev_id)
        fleet.run_session = tracked_session              # type: ignore[method-assign]

        async def on_pkg0(request: web.Request) -> web.Response:
            body = await request.json()
            pkg0s["total"] += 1
            if kill_at == "pkg0" and pkg0s["total"] == KILL_AFTER:
                kill()         # mid-burst: some notifications sent, some not yet
            ok = await fleet.on_pkg0(body["msisdn"], base64.b64decode(body["pkg0"]))
            if not ok:
                return web.json_response({"error": "no such device"}, status=404)
            return web.json_response({"id": str(pkg0s["total"])})

        app = web.Application()
        app.router.add_post("/pkg0", on_pkg0)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]          # type: ignore[union-attr]
        gateway_url = f"http://127.0.0.1:{port}/pkg0"
        reader = JobReader(os.path.join(data, "store"))
        try:
            proc, urls = await asyncio.to_thread(start_server, data, gateway_url)
            server["proc"] = proc
            prof.server_url = urls["device port"]
            while server["killed_at"] is None:
                assert proc.poll() is None, f"server died: {server_log(data)}"
                assert time.monotonic() - t_start < DEADLINE, \
                    f"only {pkg0s['total']} pkg0s, {sum(execs.values())} Execs"
                await asyncio.sleep(0.02)
            assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
            close_pipes(proc)
            await fleet.wait_idle(15)                 # sessions cut off by the kill end
            before = reader.job(job_id)
            assert before.state == J.RUNNING and 0 < before.total < N, before
            in_flight = {s: n for s, n in before.counts.items() if s not in FINAL_TASK_STATES}
            reader.close()

            # the same data directory, new ports
            proc, urls = await asyncio.to_thread(start_server, data, gateway_url)
            server["proc"] = proc
            prof.server_url = urls["device port"]
            end = t_start + DEADLINE
            while True:
                assert proc.poll() is None, f"server died: {server_log(data)}"
                job = reader.job(job_id)
                if job.state != J.RUNNING:
                    break
                assert time.monotonic() < end, (
                    f"job stuck: total {job.total}/{job.targets}, counts {job.counts}; "
                    f"before the kill {before.total} made, in flight {in_flight}")
                # a phone that could not report its FUMO result reports it on its own
                for dev in fleet.devices:
                    if dev.pending_alerts and dev.dev_id not in in_session:
                        fleet.spawn(fleet.run_session(dev, alert=1201))
                await asyncio.sleep(1.0)
            assert job.state == J.COMPLETED, job.cause
            await fleet.wait_idle(10)
            reader.close()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            reader.close()
            p = server["proc"]
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
            if p is not None:
                close_pipes(p)
            await runner.cleanup()
            fleet.close()

        # --- what the store says
        store = LmdbStore(os.path.join(data, "store"))
        try:
            job = await store.get_job(job_id)
            assert job.total == job.targets == N
            tasks = await all_pages(lambda c: store.tasks_by_job(job_id, cursor=c, limit=1000))
            assert len(tasks) == N
            assert sorted(t.dev_id for t in tasks) == sorted(d.dev_id for d in fleet.devices)
            assert all(t.state in FINAL_TASK_STATES for t in tasks), \
                collections.Counter(t.state for t in tasks)
            assert dict(collections.Counter(t.state for t in tasks)) == dict(job.counts)
            assert await store.check() == []
            # Execs: a second one only after the server put the task back for a retry, and
            # never after it had recorded the Exec as accepted
            # Execs: each one the device got is a sending of the task's commands the history
            # records; a second sending only while the record did not show the Exec
            # accepted (a session cut off before the device's answer was written), never
            # once it did (the outcome then comes by Generic Alert, in whatever session)
            twice = 0
            for t in tasks:
                hist = (await store.task_history(t.task_id, limit=1000)).items
                story = pprint.pformat((t.dev_id, execs[t.dev_id],
                                        [(h.from_state, h.to_state, h.cause) for h in hist]))
                sent = 0
                accepted = False
                for h in hist:
                    if h.cause == SENT:
                        assert not accepted, story
                        sent += 1
                    elif h.to_state == S.PENDING:
                        assert not accepted, story        # no retry after the acceptance
                    if h.cause and ACCEPTED in h.cause:
                        accepted = True
                assert 1 <= execs[t.dev_id] <= sent, story
                twice += execs[t.dev_id] > 1
            # a task fails only by its device's own report: the download the kill broke
            for t in tasks:
                if t.state != S.SUCCEEDED:
                    assert t.state == S.FAILED and t.result is not None \
                        and t.result.fumo_result == 503, (t.task_id, t.state, t.cause)
            print(f"\nkilled with {before.total} tasks made ({in_flight} in flight); "
                  f"{twice} devices got a second Exec; final counts {dict(job.counts)}; "
                  f"{sum(execs.values())} Execs to {len(execs)} devices; "
                  f"{time.monotonic() - t_start:.1f} s")
            # the record and the phone agree: new firmware exactly where the task succeeded
            by_dev = {t.dev_id: t for t in tasks}
            differ = [d.dev_id for d in fleet.devices
                      if (d.fwv != "2.3.9") != (by_dev[d.dev_id].state == S.SUCCEEDED)]
            assert not differ, (
                f"{len(differ)} devices run the new firmware but their task is "
                f"{by_dev[differ[0]].state.value} ({by_dev[differ[0]].cause})")
        finally:
            await store.close()

    mp = pytest.MonkeyPatch()
    mp.setattr(ClientSession, "_exec", counting_exec)
    try:
        uvloop.run(main())
    finally:
        mp.undo()
