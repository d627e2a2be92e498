"""Issue 18: ``dmengine/scheduler.py`` step by step, with exact expectations — its mutants
survived the end-to-end job tests, which see only where a campaign ends.  In process (the
memory store, a loopback gateway that records what it is handed or fails as told, a clock the
test moves), so each test takes milliseconds: what ``notify`` writes and sends (package #0
decoded and verified), the result-alert follow-ups, a pass's expiry, job start, stop rule,
stages, end time, budgets (batch, concurrency, in-flight cap, token buckets), retries, and
the guard that fails one task instead of the pass."""
from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from datetime import datetime, timezone
from typing import Any

import msgspec
import pytest

from dmengine.auth import RESYNC_NONCE_ASCII
from dmengine.broker import Broker
from dmengine.config import BrokerConfig
from dmengine.errors import GatewayError, StoreError
from dmengine.metrics import TaskMetrics
from dmengine.model import (BootstrapOp, Device, DmAccount, Job, JobState, QueryOp, Selection,
                            Stage, StopRule, Task, TaskResult, TaskState, TimeWindow, UpdateOp)
from dmengine.notify.base import RetryPolicy
from dmengine.notify.loopback import LoopbackGateway
from dmengine.notify.pkg0 import parse_pkg0
from dmengine.scheduler import Scheduler
from dmengine.store.memory import MemoryStore
from prometheus_client import CollectorRegistry
from conftest import Clock

S = TaskState
J = JobState
OP = QueryOp(nodes=["./DevInfo/Mod"])
FUMO = UpdateOp(content_id="fw")
ACCEPTED = TaskResult(statuses={"Exec ./FUMO/1/DownloadAndUpdate": 202})
NONCE = b"n0nce-16-bytes!!"
#: Monday 2024-01-01 00:00 UTC (the windows' tests); others use the real time (the store stamps
#: `created` and `updated` with it)
MONDAY = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
H = 3600
DAY = 86400


def device(i: int, **kw: Any) -> Device:
    imei = f"35693803{i:07d}"
    acc = kw.pop("account", DmAccount(server_id="dmengine", client_name=f"dev{i}",
                                      client_password="cpw", server_password="spw",
                                      server_nonce=base64.b64encode(NONCE).decode()))
    kw.setdefault("msisdn", f"+4917{i:08d}")
    return Device(dev_id=f"IMEI:{imei}", imei=imei, capability="cap-x", account=acc, **kw)


class World:
    def __init__(self, n: int = 4, *, clock: Clock | None = None, gateway: bool = True,
                 devices: list[Device] | None = None, **cfg: Any) -> None:
        self.clock = clock or Clock(time.time())
        self.store = MemoryStore()
        self.sent: list[tuple[str, bytes]] = []
        #: what the gateway does next: None (accept), or a GatewayError to raise
        self.fail: GatewayError | None = None
        self.on_send: Any = None
        cfg.setdefault("retry_delays", (10.0, 20.0, 40.0))
        self.config = BrokerConfig(retry_jitter=0.0, **cfg)
        self.metrics = TaskMetrics(CollectorRegistry())
        gw = LoopbackGateway(self._receive, retry=RetryPolicy(attempts=1)) if gateway else None
        self.broker = Broker(self.store, gw, config=self.config, clock=self.clock,
                             metrics=self.metrics)
        self.scheduler: Scheduler = self.broker.scheduler
        self.tasks = self.broker.tasks
        self._devices = devices if devices is not None else [device(i) for i in range(n)]

    async def _receive(self, msisdn: str, pkg0: bytes) -> bool:
        if self.on_send is not None:
            await self.on_send(msisdn)
        if self.fail is not None:
            raise self.fail
        self.sent.append((msisdn, pkg0))
        return True

    async def __aenter__(self) -> "World":
        await self.store.import_devices(self._devices)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert await self.store.check() == []
        await self.store.close()

    async def task(self, tid: str = "t1", i: int = 0, **kw: Any) -> Task:
        kw.setdefault("op", OP)
        kw.setdefault("deadline", self.clock.now + 10_000)
        (t,) = await self.store.create_tasks([Task(task_id=tid, dev_id=device(i).dev_id,
                                                   correlator=tid, **kw)])
        return t

    async def last(self, tid: str) -> tuple[str, str | None]:
        h = (await self.store.task_history(tid, limit=1000)).items[-1]
        return h.to_state.value, h.cause


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def session_of(cause: str | None) -> int:
    m = re.search(r"session ([0-9A-F]+)[);]", cause or "")
    assert m is not None, cause
    return int(m.group(1), 16)


# --- notify ----------------------------------------------------------------------------------

def test_notify_sends_a_verified_package0_and_writes_notified():
    async def main() -> None:
        async with World() as w:
            t = await w.task(attempts=0)
            now = w.clock.now
            got = await w.scheduler.notify(t)
            assert got.state == S.NOTIFIED and got.attempts == 1
            assert got.next_attempt == now + 10.0               # retry_delays[0]
            state, cause = await w.last("t1")
            sid = session_of(cause)
            assert cause == f"package #0 sent via loopback (session {sid:X})"
            (msisdn, pkg0), = w.sent
            assert msisdn == device(0).msisdn
            p = parse_pkg0(pkg0, "spw", NONCE)
            assert p.verified and not p.resync
            assert (p.server_id, p.session_id, p.ui_mode, p.initiator) == ("dmengine", sid, 1, 1)
            # the device's account name leads its session to the record
            assert w.broker.sessions.by_username["dev0"] == device(0).dev_id
            assert w.metrics.notifications == {"sent": 1} and w.metrics.retries == 0
            assert w.metrics.by_gateway == {("loopback", "sent"): 1}
            assert w.metrics.lag.count == 1
    run(main())


def test_notify_again_counts_a_retry_and_takes_the_next_delay():
    async def main() -> None:
        async with World(resync_after=None) as w:
            t = await w.task(state=S.NOTIFIED, attempts=1)
            got = await w.scheduler.notify(t)
            assert got.attempts == 2 and got.next_attempt == w.clock.now + 20.0
            assert w.metrics.retries == 1
            t = await w.task("t2", 1, state=S.NOTIFIED, attempts=7)      # past the last delay
            got = await w.scheduler.notify(t)
            assert got.next_attempt == w.clock.now + 40.0
    run(main())


def test_notify_lag_counts_from_the_pass_start_or_the_call():
    async def main() -> None:
        clock = Clock(1000.0)
        async with World(clock=clock) as w:
            async def later(msisdn: str) -> None:
                clock.now += 3.0                   # the gateway took 3 s
            w.on_send = later
            await w.scheduler.notify(await w.task(), due=990.0)
            assert w.metrics.lag.total == 13.0
            await w.scheduler.notify(await w.task("t2", 1))
            assert w.metrics.lag.total == 16.0
    run(main())


def test_notify_with_opt_in_asks_the_user_and_the_ui_mode_is_configurable():
    async def main() -> None:
        async with World(notify_ui_mode=2) as w:
            await w.scheduler.notify(await w.task(b_optin=True))
            await w.scheduler.notify(await w.task("t2", 1))
            assert [parse_pkg0(p).ui_mode for _, p in w.sent] == [3, 2]
    run(main())


def test_notify_resynchronises_the_nonce_after_resync_after_attempts():
    async def main() -> None:
        async with World(resync_after=2, resync_window=500.0) as w:
            now = w.clock.now
            await w.scheduler.notify(await w.task(state=S.NOTIFIED, attempts=1))
            assert parse_pkg0(w.sent[-1][1], "spw", NONCE).verified
            assert (await w.store.get_device(device(0).dev_id)).account.resync_until is None
            t = await w.scheduler.notify(await w.task("t2", 1, state=S.NOTIFIED, attempts=2))
            p = parse_pkg0(w.sent[-1][1], "spw", b"\0" * 4, accept_resync=True)
            assert p.resync and p.nonce == RESYNC_NONCE_ASCII
            acc = (await w.store.get_device(device(1).dev_id)).account
            assert acc.resync_until == now + 500.0
            _, cause = await w.last("t2")
            assert cause == f"package #0 (nonce re-synchronisation) sent via loopback " \
                            f"(session {session_of(cause):X})"
            assert t.attempts == 3
        async with World(resync_after=None) as w:
            await w.scheduler.notify(await w.task(state=S.NOTIFIED, attempts=50))
            assert parse_pkg0(w.sent[-1][1], "spw", NONCE).verified
    run(main())


def test_notify_signs_with_the_server_key_when_there_is_no_password():
    async def main() -> None:
        acc = DmAccount(server_id="dmengine", client_name="k0", client_password="c",
                        server_key="key-material", server_nonce=base64.b64encode(NONCE).decode())
        async with World(devices=[device(0, account=acc)]) as w:
            await w.scheduler.notify(await w.task())
            from dmengine.notify.pkg0 import compute_digest_key
            pkg0 = w.sent[-1][1]
            assert pkg0[:16] == compute_digest_key(b"key-material", NONCE, pkg0[16:])
    run(main())


def test_notify_without_a_way_to_wake_the_device_waits():
    async def main() -> None:
        devs = [device(0, msisdn=None), device(1, account=None), device(2)]
        async with World(devices=devs) as w:
            for tid, i, why in (("a", 0, "device has no MSISDN"),
                                ("b", 1, "device has no DM account")):
                t = await w.scheduler.notify(await w.task(tid, i, attempts=1))
                assert t.state == S.PENDING and t.next_attempt == w.clock.now + 20.0
                assert t.attempts == 1
                assert await w.last(tid) == ("PENDING", f"waiting: {why}")
            assert w.sent == [] and w.metrics.notifications == {}
        async with World(gateway=False) as w:
            t = await w.scheduler.notify(await w.task(state=S.NOTIFIED, attempts=1))
            assert t.state == S.NOTIFIED
            assert await w.last("t1") == ("NOTIFIED", "waiting: no notification gateway")
    run(main())


def test_notify_of_an_unknown_device_or_an_unbuildable_package_fails_the_task():
    async def main() -> None:
        no_secret = DmAccount(server_id="dmengine", client_name="x", client_password="c")
        async with World(devices=[device(0, account=no_secret)]) as w:
            t = await w.scheduler.notify(await w.task(next_attempt=w.clock.now))
            assert t.state == S.FAILED and t.finished is not None and t.next_attempt is None
            state, cause = await w.last("t1")
            assert cause.startswith("package #0 not built: ") and "secret" in cause, cause
            (t,) = await w.store.create_tasks([Task(task_id="t2", dev_id="IMEI:none", op=OP,
                                                    correlator="t2", next_attempt=5.0)])
            t = await w.scheduler.notify(t)
            assert t.state == S.FAILED and t.finished is not None and t.next_attempt is None
            assert await w.last("t2") == ("FAILED", "no such device")
            assert w.sent == []
    run(main())


def test_notify_gateway_failures():
    async def main() -> None:
        async with World() as w:
            w.fail = GatewayError("busy", retryable=True)
            t = await w.scheduler.notify(await w.task(attempts=0))
            assert t.state == S.PENDING and t.attempts == 1
            assert t.next_attempt == w.clock.now + 10.0
            assert await w.last("t1") == ("PENDING", "notification failed, will retry: "
                                                     "loopback: gave up after 1 attempts: busy")
            assert w.metrics.notifications == {"failed": 1}
            assert w.metrics.by_gateway == {("loopback", "failed"): 1}
            w.fail = GatewayError("no such subscriber", retryable=False)
            t = await w.scheduler.notify(await w.task("t2", 1))
            assert t.state == S.FAILED and t.finished is not None and t.next_attempt is None
            assert await w.last("t2") == ("FAILED", "notification refused: no such subscriber")
            assert w.metrics.lag.count == 0

            # the device came while the gateway was failing: its session has the task
            async def came(msisdn: str) -> None:
                await w.store.transition("t3", S.IN_PROGRESS, cause="device connected")
            w.on_send = came
            t = await w.scheduler.notify(await w.task("t3", 2))
            assert t.state == S.IN_PROGRESS and await w.last("t3") == \
                ("IN_PROGRESS", "device connected")
    run(main())


def test_notify_in_the_devices_time_zone_waits_for_the_jobs_window():
    async def main() -> None:
        clock = Clock(MONDAY)                      # 01:00 in Berlin, 00:00 UTC
        devs = [device(0, tz="Europe/Berlin"), device(1, tz="UTC"), device(2)]
        async with World(devices=devs, clock=clock) as w:
            job = Job(job_id="j", windows=[TimeWindow(start=H, end=2 * H)], tz="Asia/Tokyo")
            t = await w.scheduler.notify(await w.task("a", 0), job)
            assert t.state == S.NOTIFIED                         # inside, in Berlin
            t = await w.scheduler.notify(await w.task("b", 1), job)
            assert t.state == S.PENDING and t.next_attempt == MONDAY + H
            assert await w.last("b") == ("PENDING", "outside the job's window in the device's "
                                                    "time zone")
            # no zone of its own: the window is the job's, applied by the pass, not here
            assert (await w.scheduler.notify(await w.task("c", 2), job)).state == S.NOTIFIED
            assert (await w.scheduler.notify(await w.task("d", 1),
                                             Job(job_id="j"))).state == S.NOTIFIED
    run(main())


# --- the result alert's follow-ups -----------------------------------------------------------

async def accepted(w: World, tid: str, i: int, **kw: Any) -> Task:
    return await w.task(tid, i, op=FUMO, state=S.IN_PROGRESS, result=ACCEPTED, **kw)


def test_follow_up_wakes_the_device_and_doubles_the_wait():
    async def main() -> None:
        async with World(alert_wait=5.0, alert_followups=3) as w:
            t = await accepted(w, "t1", 0, attempts=1, followups=1)
            got = await w.scheduler.notify(t)            # IN_PROGRESS: a follow-up
            assert got.state == S.IN_PROGRESS and got.followups == 2 and got.attempts == 2
            assert got.next_attempt == w.clock.now + 5.0 * 4
            _, cause = await w.last("t1")
            sid = session_of(cause)
            assert cause == (f"no result alert yet: device woken to report (follow-up 2 of 3, "
                             f"package #0 via loopback, session {sid:X}; the package is not "
                             f"sent again)")
            p = parse_pkg0(w.sent[-1][1], "spw", NONCE)
            assert p.verified and p.session_id == sid and p.ui_mode == 1
            assert w.broker.sessions.by_username["dev0"] == device(0).dev_id
            assert w.metrics.notifications == {"sent": 1}
            assert w.metrics.retries == 0
    run(main())


def test_follow_ups_end_after_alert_followups():
    async def main() -> None:
        async with World(alert_followups=2) as w:
            t = await accepted(w, "t1", 0, followups=2, next_attempt=w.clock.now)
            got = await w.scheduler.follow_up(t)
            assert got.state == S.IN_PROGRESS and got.next_attempt is None
            assert await w.last("t1") == ("IN_PROGRESS", "no result alert after 2 wake-up(s): "
                                          "waiting for the device until the deadline")
            assert w.sent == []
            t = await accepted(w, "t2", 1, followups=1)
            assert (await w.scheduler.follow_up(t)).followups == 2
    run(main())


def test_follow_up_without_a_way_to_wake_the_device():
    async def main() -> None:
        devs = [device(0, msisdn=None), device(1, account=None)]
        async with World(devices=devs) as w:
            for tid, i, why in (("a", 0, "device has no MSISDN"),
                                ("b", 1, "device has no DM account")):
                got = await w.scheduler.follow_up(await accepted(w, tid, i,
                                                                 next_attempt=w.clock.now))
                assert got.next_attempt is None and got.followups == 0
                assert await w.last(tid) == (
                    "IN_PROGRESS", f"no result alert yet and no way to wake the device ({why}): "
                                   f"waiting for it until the deadline")
            (t,) = await w.store.create_tasks([Task(
                task_id="c", dev_id="IMEI:gone", op=FUMO, correlator="c", state=S.IN_PROGRESS,
                result=ACCEPTED)])
            await w.scheduler.follow_up(t)
            assert (await w.last("c"))[1] == ("no result alert yet and no way to wake the "
                                              "device (no such device): waiting for it until "
                                              "the deadline")
        async with World(gateway=False) as w:
            await w.scheduler.follow_up(await accepted(w, "t1", 0))
            assert "(no notification gateway)" in (await w.last("t1"))[1]
    run(main())


def test_follow_up_waits_for_the_window_and_survives_an_unbuildable_package():
    async def main() -> None:
        clock = Clock(MONDAY)
        no_secret = DmAccount(server_id="dmengine", client_name="x", client_password="c")
        devs = [device(0, tz="UTC"), device(1, account=no_secret), device(2, tz="UTC")]
        async with World(devices=devs, clock=clock) as w:
            job = Job(job_id="j", windows=[TimeWindow(start=H, end=2 * H)])
            got = await w.scheduler.follow_up(await accepted(w, "a", 0), job)
            assert got.next_attempt == MONDAY + H and got.followups == 0
            assert await w.last("a") == ("IN_PROGRESS", "result alert follow-up waits for the "
                                         "job's window in the device's time zone")
            got = await w.scheduler.follow_up(await accepted(w, "b", 1, next_attempt=1.0))
            assert got.next_attempt is None
            _, cause = await w.last("b")
            assert cause.startswith("no result alert yet; package #0 not built (") and \
                cause.endswith("): waiting for the device until the deadline"), cause
            clock.now = MONDAY + H                   # inside: woken
            assert (await w.scheduler.follow_up(await accepted(w, "c", 2), job)).followups == 1
            assert w.sent and w.sent[-1][0] == device(2).msisdn
    run(main())


def test_follow_up_of_a_task_that_moved_meanwhile_or_a_failing_gateway():
    async def main() -> None:
        async with World() as w:
            t = await accepted(w, "t1", 0)
            await w.store.transition("t1", S.SUCCEEDED, cause="its alert came")
            got = await w.scheduler.follow_up(t)
            assert got is t and w.sent == []
            t = await accepted(w, "t2", 1, attempts=1)
            w.fail = GatewayError("down", retryable=True)
            got = await w.scheduler.follow_up(t)
            assert got.state == S.IN_PROGRESS and got.followups == 1 and got.attempts == 2
            assert w.metrics.notifications == {"failed": 1}
            assert (await w.store.get_task("t2")).followups == 1
    run(main())


def test_session_ids_are_16_bit_and_never_zero():
    ids = {Scheduler.new_session_id() for _ in range(3000)}
    assert min(ids) >= 1 and max(ids) <= 0xFFFF and len(ids) > 2500
    assert max(ids) > 0xF000                                  # the whole range is used


# --- the pass: expiry, jobs ------------------------------------------------------------------

def test_tick_expires_tasks_past_their_deadline():
    async def main() -> None:
        async with World() as w:
            now = w.clock.now
            await w.task("old", 0, deadline=now - 1, state=S.NOTIFIED, next_attempt=now + 99)
            await w.task("edge", 1, deadline=now, state=S.NOTIFIED, next_attempt=now + 99)
            await w.task("young", 2, deadline=now + 1, state=S.NOTIFIED, next_attempt=now + 99)
            assert await w.scheduler.tick() == 2
            assert await w.last("old") == ("EXPIRED", "deadline passed before the device "
                                                      "answered")
            assert (await w.store.get_task("edge")).state == S.EXPIRED
            assert (await w.store.get_task("young")).state == S.NOTIFIED
            assert w.metrics.passes.count == 1 and w.metrics.expiries == 2
            assert await w.scheduler.tick() == 0
    run(main())


async def a_job(w: World, n: int, **kw: Any) -> Job:
    return await w.broker.jobs.create(OP, Selection(dev_ids=[device(i).dev_id
                                                             for i in range(n)]), **kw)


async def states(w: World, job_id: str) -> list[TaskState]:
    return [t.state for t in (await w.store.tasks_by_job(job_id, limit=1000)).items]


def test_a_scheduled_job_starts_at_its_time():
    async def main() -> None:
        async with World(8) as w:
            now = w.clock.now
            job = await a_job(w, 2, start_at=now + 10)
            assert await w.scheduler.tick() == 0
            assert (await w.store.get_job(job.job_id)).state == J.SCHEDULED
            w.clock.now = now + 10
            assert await w.scheduler.tick() == 2
            j = await w.store.get_job(job.job_id)
            assert (j.state, j.started, j.cause) == (J.RUNNING, now + 10, "start time reached")
            assert await states(w, job.job_id) == [S.NOTIFIED, S.NOTIFIED]
            # a SCHEDULED job without a start time is left alone
            await w.store.create_job(Job(job_id="never", op=OP, state=J.SCHEDULED))
            await w.store.add_job_targets("never", [device(5).dev_id])
            await w.scheduler.tick()
            assert (await w.store.get_job("never")).state == J.SCHEDULED
    run(main())


def test_many_open_jobs_are_paged():
    async def main() -> None:
        async with World(1) as w:
            for i in range(501):
                await w.store.create_job(Job(job_id=f"j{i:04d}", state=J.SCHEDULED,
                                             start_at=w.clock.now - 1))
            for i in range(501):
                await w.store.create_job(Job(job_id=f"r{i:04d}", state=J.RUNNING))
            jobs = await w.scheduler._open_jobs(w.clock.now)
            assert len(jobs) == 1002
            assert all(j.state == J.RUNNING for j in jobs.values())
    run(main())


def test_a_job_starts_its_tasks_with_a_lease_and_notifies_them():
    async def main() -> None:
        async with World(4, claim_lease=77.0) as w:
            job = await a_job(w, 3)
            assert await w.scheduler.tick() == 3
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            assert [t.dev_id for t in tasks] == [device(i).dev_id for i in range(3)]
            assert all(t.state == S.NOTIFIED and t.attempts == 1 for t in tasks)
            assert all(t.next_attempt == w.clock.now + 10.0 for t in tasks)
            assert sorted(m for m, _ in w.sent) == sorted(device(i).msisdn for i in range(3))
            assert w.metrics.created == {"QUERY": 3}
            assert (await w.store.get_job(job.job_id)).total == 3
            assert await w.scheduler.tick() == 0               # nothing due, nothing new
    run(main())


def test_the_lease_holds_a_task_the_pass_could_not_notify():
    async def main() -> None:
        async with World(2, claim_lease=77.0, notify_parallel=1) as w:
            job = await a_job(w, 1)
            seen: list[float | None] = []

            async def look(msisdn: str) -> None:
                (t,) = (await w.store.tasks_by_job(job.job_id, limit=5)).items
                seen.append(t.next_attempt)
            w.on_send = look
            await w.scheduler.tick()
            assert seen == [w.clock.now + 10.0]   # written NOTIFIED (before the send) …
            # … and before that the lease: a made task is nobody else's to claim
            made = []
            orig = w.store.create_job_tasks

            async def spy(job_id: str, total: int, tasks: list[Task], **kw: Any) -> list[Task]:
                made.extend(tasks)
                return await orig(job_id, total, tasks, **kw)
            w.store.create_job_tasks = spy  # type: ignore[method-assign]
            job2 = await a_job(w, 2)
            await w.scheduler.tick()
            assert [t.next_attempt for t in made] == [w.clock.now + 77.0] * 2
            assert job2.job_id
    run(main())


def count_writes(w: World) -> list[int]:
    """Counts the store's write ops from now on (``[n]``, updated as they are made)."""
    n = [0]
    orig = w.store._write

    def counted(op: Any, prefetch: Any = None) -> Any:
        n[0] += 1
        return orig(op, prefetch)
    w.store._write = counted  # type: ignore[method-assign]
    return n


def test_a_pass_makes_and_notifies_its_job_tasks_in_one_write():
    """A job's next tasks are made and — those whose devices can be woken now — moved to
    NOTIFIED in the same write, before their packages #0 go out; each history still shows the
    creation and the notification.  A device without an MSISDN gets its task made PENDING and
    then the waiting move of ``notify``; a send that fails moves its task back to PENDING."""
    async def main() -> None:
        devs = [device(0), device(1, msisdn=None), device(2), device(3)]
        async with World(devices=devs) as w:
            job = await a_job(w, 4)
            writes = count_writes(w)
            seen: dict[str, S] = {}

            async def look(msisdn: str) -> None:      # the state when the package goes out
                for t in (await w.store.tasks_by_job(job.job_id, limit=9)).items:
                    seen.setdefault(t.dev_id, t.state)
                if msisdn == devs[3].msisdn:
                    raise GatewayError("SMSC busy", retryable=True)
            w.on_send = look
            assert await w.scheduler.tick() == 4
            # the batch (made + 3 NOTIFIED), the MSISDN-less task's wait, the failed send's
            # move back: 3 writes where a make and a move per task were 6
            assert writes[0] == 3
            assert seen[devs[0].dev_id] == S.NOTIFIED and seen[devs[2].dev_id] == S.NOTIFIED
            assert [m for m, _ in w.sent] == [devs[0].msisdn, devs[2].msisdn]
            by_dev = {t.dev_id: t for t in (await w.store.tasks_by_job(job.job_id,
                                                                        limit=9)).items}
            for d, want in ((devs[0], S.NOTIFIED), (devs[1], S.PENDING), (devs[2], S.NOTIFIED),
                            (devs[3], S.PENDING)):
                assert by_dev[d.dev_id].state == want
            t0 = by_dev[devs[0].dev_id]
            assert (t0.attempts, t0.next_attempt) == (1, w.clock.now + 10.0)
            hist = (await w.store.task_history(t0.task_id)).items
            assert [h.to_state for h in hist] == [S.PENDING, S.NOTIFIED]
            assert session_of(hist[1].cause) == parse_pkg0(w.sent[0][1]).session_id
            assert (await w.last(by_dev[devs[1].dev_id].task_id)) == (
                "PENDING", "waiting: device has no MSISDN")
            assert (await w.last(by_dev[devs[3].dev_id].task_id))[1] == (
                "notification failed, will retry: loopback: gave up after 1 attempts: "
                "SMSC busy")
            assert [h.to_state for h in (await w.store.task_history(
                by_dev[devs[3].dev_id].task_id)).items] == [S.PENDING, S.NOTIFIED, S.PENDING]
            assert w.metrics.transitions == {"PENDING": 6, "NOTIFIED": 3}
            j = await w.store.get_job(job.job_id)
            assert j.counts == {S.NOTIFIED: 2, S.PENDING: 2}
    run(main())


def test_a_job_batch_past_a_gone_device_its_lag_and_its_log_lines(caplog):
    """The rest of a batch is planned past a target whose device is gone (that task fails
    by itself); the lag of each package #0 counts from the pass's start; each NOTIFIED move
    made with the batch has its debug line with the move's cause."""
    async def main() -> None:
        clock = Clock(1000.0)
        async with World(4, clock=clock, notify_parallel=1) as w:
            job = await a_job(w, 4)
            await w.store.delete_device(device(0).dev_id)
            writes = count_writes(w)

            async def slow(msisdn: str) -> None:
                clock.now += 3.0
            w.on_send = slow
            make = w.store.create_job_tasks

            async def slow_make(*a: Any, **kw: Any) -> list[Task]:
                clock.now += 2.0                    # the batch's write takes its time too
                return await make(*a, **kw)
            w.store.create_job_tasks = slow_make  # type: ignore[method-assign]
            with caplog.at_level(logging.DEBUG, logger="dmengine.tasks"):
                assert await w.scheduler.tick() == 4
            assert writes[0] == 2                   # the batch; the gone device's failure
            assert len(w.sent) == 3
            # all due at the pass's start, before the batch was written
            assert w.metrics.lag.total == 5.0 + 8.0 + 11.0
            by_dev = {t.dev_id: t for t in (await w.store.tasks_by_job(job.job_id,
                                                                        limit=9)).items}
            assert await w.last(by_dev[device(0).dev_id].task_id) == ("FAILED",
                                                                     "no such device")
            lines = [r.getMessage() for r in caplog.records
                     if r.getMessage().startswith("task moved to NOTIFIED")]
            assert len(lines) == 3
            assert all(re.fullmatch(r"task moved to NOTIFIED: package #0 sent via loopback "
                                    r"\(session [0-9A-F]+\)", m) for m in lines), lines
    run(main())


def test_budgets_batch_concurrency_and_the_in_flight_cap():
    async def main() -> None:
        async with World(12, job_batch=4, max_in_flight=7) as w:
            job = await a_job(w, 10, concurrency=5)
            assert await w.scheduler.tick() == 4                   # job_batch
            assert await w.scheduler.tick() == 1                   # concurrency 5
            other = await a_job(w, 10)
            # everything in flight: 5 + 2 more of the other job under the overall cap of 7
            assert await w.scheduler.tick() == 2
            assert (await w.store.get_job(other.job_id)).total == 2
            for t in (await w.store.tasks_by_job(job.job_id, limit=10)).items:
                await end(w, t, S.SUCCEEDED)
            w.clock.now += 0.001
            assert await w.scheduler.tick() == 5                   # 5 free under the cap
            j = await w.store.get_job(job.job_id)
            o = await w.store.get_job(other.job_id)
            assert j.total + o.total == 12 and j.total <= 10 and o.total >= 2
    run(main())


def test_higher_priority_jobs_take_the_shared_budget_first():
    async def main() -> None:
        async with World(12, max_in_flight=3) as w:
            low = await a_job(w, 5, priority=1)
            high = await a_job(w, 5, priority=9)
            assert await w.scheduler.tick() == 3
            assert (await w.store.get_job(high.job_id)).total == 3
            assert (await w.store.get_job(low.job_id)).total == 0
    run(main())


def test_rate_limits_per_job_and_overall():
    async def main() -> None:
        clock = Clock(time.time())
        async with World(12, clock=clock, retry_delays=(1000.0,)) as w:
            job = await a_job(w, 10, rate_limit=2.0)
            # a bucket starts with one token and holds a second's worth at most
            assert await w.scheduler.tick() == 1
            clock.now += 0.5
            assert await w.scheduler.tick() == 1
            clock.now += 10
            assert await w.scheduler.tick() == 2
            clock.now += 0.25
            assert await w.scheduler.tick() == 0
            assert (await w.store.get_job(job.job_id)).total == 4
        async with World(12, clock=Clock(time.time()), max_notify_rate=3.0) as w:
            await a_job(w, 10)
            assert await w.scheduler.tick() == 1
            w.clock.now += 1
            assert await w.scheduler.tick() == 3
        async with World(12, clock=Clock(time.time()), max_notify_rate=0.5) as w:
            await a_job(w, 10, rate_limit=100.0)
            assert await w.scheduler.tick() == 0                   # under one token
            w.clock.now += 1
            assert await w.scheduler.tick() == 1
            w.clock.now += 1
            assert await w.scheduler.tick() == 0
    run(main())


def test_take_tokens_arithmetic():
    w = World(0)
    sch = w.scheduler
    job = Job(job_id="j", rate_limit=4.0)
    assert sch._take_tokens(job, 100.0, 0) == 0
    assert sch._take_tokens(job, 100.0, 10) == 1              # starts with min(rate, 1)
    assert sch._take_tokens(job, 100.25, 10) == 1             # 0 + 0.25 * 4
    assert sch._take_tokens(job, 102.0, 10) == 4              # capped at a second's worth
    assert sch._take_tokens(job, 102.0, 10) == 0
    assert sch._take_tokens(job, 102.5, 1) == 1 and sch._buckets["j"] == (1.0, 102.5)
    slow = Job(job_id="s", rate_limit=0.25)
    assert sch._take_tokens(slow, 0.0, 5) == 0                # min(0.25, 1) tokens
    assert sch._take_tokens(slow, 3.0, 5) == 1                # 0.25 + 0.75, capped at 1
    assert sch._take_tokens(slow, 100.0, 5) == 1              # a long wait: still at most 1
    assert sch._take_tokens(Job(job_id="free"), 0.0, 7) == 7  # no rate: no limit
    assert "free" not in sch._buckets and "" not in sch._buckets


def test_the_stop_rule_pauses_the_job_with_its_cause():
    async def main() -> None:
        async with World(8) as w:
            job = await a_job(w, 8, stop_rule=StopRule(max_failure_ratio=0.5, min_finished=4),
                              concurrency=4)
            await w.scheduler.tick()
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            for t, st in zip(tasks, (S.FAILED, S.SUCCEEDED, S.FAILED)):
                await end(w, t, st)
            assert await w.scheduler.tick() == 3                 # 3 final: under min_finished
            await end(w, tasks[3], S.SUCCEEDED)     # 2 of 4 failed: 50 % >= 50 %
            assert await w.scheduler.tick() == 0
            j = await w.store.get_job(job.job_id)
            assert j.state == J.PAUSED
            assert j.cause == "stopped by its error threshold: 2 of 4 tasks failed (50% >= 50%)"
            # restarted: the count starts afresh from here
            await w.broker.jobs.restart(job.job_id)
            assert await w.scheduler.tick() == 1
            assert (await w.store.get_job(job.job_id)).state == J.RUNNING
    run(main())


def test_the_stop_rule_below_its_ratio_and_with_min_finished_zero():
    async def main() -> None:
        async with World(8) as w:
            job = await a_job(w, 6, stop_rule=StopRule(max_failure_ratio=0.5), concurrency=3)
            await w.scheduler.tick()
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[0], S.SUCCEEDED)
            await end(w, tasks[1], S.SUCCEEDED)
            await end(w, tasks[2], S.FAILED)        # 1 of 3: 33 % < 50 %
            assert await w.scheduler.tick() == 3
            assert (await w.store.get_job(job.job_id)).state == J.RUNNING
        async with World(8) as w:
            job = await a_job(w, 4, stop_rule=StopRule(max_failure_ratio=1.0), concurrency=1)
            await w.scheduler.tick()                             # nothing final: no 0/0
            (t,) = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, t, S.EXPIRED)
            assert await w.scheduler.tick() == 0
            assert (await w.store.get_job(job.job_id)).cause == \
                "stopped by its error threshold: 1 of 1 tasks failed (100% >= 100%)"
    run(main())


async def end(w: World, t: Task, state: TaskState) -> None:
    """The task's session ends it: IN_PROGRESS, then ``state`` (a success comes from a
    session only)."""
    if t.state != S.IN_PROGRESS:
        t = await w.tasks.move(t.task_id, S.IN_PROGRESS, cause="session")
    assert await w.tasks.finish(t, state, "x") is not None


async def finish_all(w: World, job_id: str, state: TaskState = S.SUCCEEDED) -> None:
    for t in (await w.store.tasks_by_job(job_id, limit=1000)).items:
        if t.state not in (S.SUCCEEDED, S.FAILED, S.EXPIRED, S.CANCELLED):
            await end(w, t, state)


def test_stages_go_on_pause_for_approval_or_for_a_missed_threshold():
    async def main() -> None:
        async with World(10) as w:
            job = await a_job(w, 10, stages=[Stage(percent=20), Stage(percent=50, approval=True),
                                             Stage(percent=100, success_threshold=0.9)])
            assert await w.scheduler.tick() == 2
            assert await w.scheduler.tick() == 0                 # the stage is full
            j = await w.store.get_job(job.job_id)
            assert (j.stage, j.state) == (0, J.RUNNING)
            await finish_all(w, job.job_id)
            assert await w.scheduler.tick() == 0
            j = await w.store.get_job(job.job_id)
            assert (j.stage, j.cause) == (1, "stage 1 of 3 (20 %) done (100% succeeded)")
            assert await w.scheduler.tick() == 3
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[2], S.FAILED)
            await finish_all(w, job.job_id)
            await w.scheduler.tick()
            j = await w.store.get_job(job.job_id)
            assert j.state == J.PAUSED and j.stage == 1
            assert j.cause == ("stage 2 of 3 (50 %) done (80% succeeded): waiting for approval "
                               "(restartJob)")
            await w.broker.jobs.restart(job.job_id)
            assert await w.scheduler.tick() == 5
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[5], S.FAILED)
            await finish_all(w, job.job_id)
            await w.scheduler.tick()
            j = await w.store.get_job(job.job_id)
            assert j.state == J.COMPLETED and j.finished == w.clock.now
            assert j.cause == "all 10 tasks final: 8 succeeded, 2 failed"
    run(main())


def test_a_stage_below_its_success_threshold_pauses():
    async def main() -> None:
        async with World(10) as w:
            job = await a_job(w, 4, stages=[Stage(percent=50, success_threshold=0.5),
                                            Stage(percent=100)])
            await w.scheduler.tick()
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[0], S.FAILED)
            await end(w, tasks[1], S.SUCCEEDED)     # 50 %: not below
            await w.scheduler.tick()
            assert (await w.store.get_job(job.job_id)).stage == 1
        async with World(10) as w:
            job = await a_job(w, 4, stages=[Stage(percent=50, success_threshold=0.6),
                                            Stage(percent=100)])
            await w.scheduler.tick()
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[0], S.FAILED)
            await end(w, tasks[1], S.SUCCEEDED)
            await w.scheduler.tick()
            j = await w.store.get_job(job.job_id)
            assert j.state == J.PAUSED
            assert j.cause == ("stage 1 of 2 (50 %) done with 50% succeeded, below its "
                               "threshold 60%: restartJob goes on")
    run(main())


def test_a_job_outside_its_window_starts_nothing():
    async def main() -> None:
        clock = Clock(MONDAY)
        async with World(4, clock=clock) as w:
            job = await a_job(w, 2, windows=[TimeWindow(start=H, end=2 * H)], tz="UTC")
            assert await w.scheduler.tick() == 0
            clock.now = MONDAY + H
            assert await w.scheduler.tick() == 2
            assert (await w.store.get_job(job.job_id)).total == 2
    run(main())


def test_the_end_time_expires_what_is_left_and_completes_the_job():
    async def main() -> None:
        async with World(8) as w:
            now = w.clock.now
            job = await a_job(w, 6, end_at=now + 100, concurrency=3)
            # the tasks' own deadline later than the job's end: the end expires them
            await w.store.update_job(job.job_id, {"deadline": now + 1000})
            await w.scheduler.tick()
            tasks = (await w.store.tasks_by_job(job.job_id, limit=10)).items
            await end(w, tasks[0], S.SUCCEEDED)
            await end(w, tasks[1], S.FAILED)
            w.clock.now = now + 100
            assert await w.scheduler.tick() == 1         # the third's retry was due, then the end
            j = await w.store.get_job(job.job_id)
            assert j.state == J.COMPLETED and j.finished == now + 100
            assert j.cause == "end time reached: 1 succeeded, 2 failed or expired, 3 never started"
            assert await w.last(tasks[2].task_id) == ("EXPIRED", "the job's end time passed")
    run(main())


def test_the_end_time_pages_through_many_tasks():
    async def main() -> None:
        n = 510
        async with World(n, job_batch=n) as w:
            now = w.clock.now
            job = await a_job(w, n, end_at=now + 100)
            assert await w.scheduler.tick() == n
            w.clock.now = now + 100
            await w.scheduler.tick()
            j = await w.store.get_job(job.job_id)
            assert j.counts == {S.EXPIRED: n} and j.state == J.COMPLETED
    run(main())


# --- retries ---------------------------------------------------------------------------------

def test_retries_notify_again_and_expire_after_max_notifications():
    async def main() -> None:
        async with World(4, max_notifications=2, resync_after=None) as w:
            now = w.clock.now
            await w.task("a", 0, state=S.NOTIFIED, attempts=1, next_attempt=now)
            await w.task("b", 1, state=S.NOTIFIED, attempts=2, next_attempt=now)
            await w.task("c", 2, state=S.PENDING, attempts=0, next_attempt=now)
            await w.task("later", 3, state=S.NOTIFIED, attempts=1, next_attempt=now + 1)
            assert await w.scheduler.tick() == 3
            assert (await w.store.get_task("a")).attempts == 2
            assert await w.last("b") == ("EXPIRED", "device did not connect after 2 "
                                                    "notifications")
            assert (await w.store.get_task("c")).state == S.NOTIFIED
            assert (await w.store.get_task("later")).attempts == 1
            assert sorted(m for m, _ in w.sent) == sorted([device(0).msisdn, device(2).msisdn])
    run(main())


def test_retries_skip_what_is_not_theirs():
    async def main() -> None:
        async with World(8) as w:
            now = w.clock.now
            await w.store.create_job(Job(job_id="paused", op=OP, state=J.PAUSED))
            acc = DmAccount(server_id="dmengine", client_name="b", client_password="c",
                            server_password="s")
            await w.task("boot", 0, op=BootstrapOp(account=acc), next_attempt=now)
            await w.task("ask", 1, state=S.WAITING_USER, next_attempt=now)
            await w.task("busy", 2, state=S.IN_PROGRESS, next_attempt=now)      # no alert due
            await w.task("paused", 3, job_id="paused", next_attempt=now)
            await w.task("open", 5, state=S.NOTIFIED, attempts=1, next_attempt=now)
            w.broker.sessions.in_session = lambda tid: tid == "open"  # type: ignore
            assert await w.scheduler.tick() == 0
            assert w.sent == []
            for tid in ("boot", "ask", "busy", "paused", "open"):
                assert (await w.store.get_task(tid)).history_len == 1, tid
    run(main())


def test_a_due_follow_up_is_sent_by_the_pass_and_not_counted_against_notifications():
    async def main() -> None:
        async with World(2, max_notifications=1) as w:
            await accepted(w, "t1", 0, attempts=5, next_attempt=w.clock.now)
            assert await w.scheduler.tick() == 1
            t = await w.store.get_task("t1")
            assert t.state == S.IN_PROGRESS and t.followups == 1 and len(w.sent) == 1
    run(main())


def test_retries_of_a_job_outside_its_window_are_released_until_it_opens():
    async def main() -> None:
        clock = Clock(MONDAY + 3 * H)
        async with World(4, clock=clock, claim_lease=30 * H) as w:
            job = await a_job(w, 2, windows=[TimeWindow(start=1 * H, end=2 * H)])
            await w.store.create_job_tasks(job.job_id, 0, [Task(
                task_id="r", dev_id=device(0).dev_id, op=OP, job_id=job.job_id, correlator="r",
                state=S.NOTIFIED, attempts=1, next_attempt=clock.now)])
            assert await w.scheduler.tick() == 1
            t = await w.store.get_task("r")
            assert t.next_attempt == MONDAY + 25 * H and t.attempts == 1 and w.sent == []
        async with World(4, clock=Clock(MONDAY + 3 * H), claim_lease=60.0) as w:
            job = await a_job(w, 2, windows=[TimeWindow(start=1 * H, end=2 * H)])
            await w.store.create_job_tasks(job.job_id, 0, [Task(
                task_id="r", dev_id=device(0).dev_id, op=OP, job_id=job.job_id, correlator="r",
                state=S.NOTIFIED, attempts=1, next_attempt=w.clock.now)])
            await w.scheduler.tick()
            # the window opens after the lease: the lease decides
            assert (await w.store.get_task("r")).next_attempt == w.clock.now + 60.0
    run(main())


def test_retries_over_the_rate_come_back_spread_at_the_rate():
    async def main() -> None:
        async with World(6, tick_interval=0.1, claim_lease=500.0) as w:
            now = w.clock.now
            job = await a_job(w, 6, rate_limit=2.0)
            await w.store.create_job_tasks(job.job_id, 0, [Task(
                task_id=f"r{i}", dev_id=device(i).dev_id, op=OP, job_id=job.job_id,
                correlator=f"r{i}", state=S.NOTIFIED, attempts=1, next_attempt=now)
                for i in range(4)])
            assert await w.scheduler.tick() == 4
            got = {t.task_id: t for t in (await w.store.tasks_by_job(job.job_id,
                                                                      limit=10)).items}
            sent = [t for t in got.values() if t.attempts == 2]
            held = sorted(t.next_attempt - now for t in got.values() if t.attempts == 1)
            assert len(sent) == 1 and held == [0.5, 1.0, 1.5]
        async with World(6, tick_interval=2.0, max_notify_rate=4.0) as w:
            now = w.clock.now
            job = await a_job(w, 6)
            await w.store.create_job_tasks(job.job_id, 0, [Task(
                task_id=f"r{i}", dev_id=device(i).dev_id, op=OP, job_id=job.job_id,
                correlator=f"r{i}", state=S.NOTIFIED, attempts=1, next_attempt=now)
                for i in range(3)])
            await w.scheduler.tick()
            held = sorted(t.next_attempt - now for t in
                          (await w.store.tasks_by_job(job.job_id, limit=10)).items
                          if t.attempts == 1)
            assert held == [2.0, 2.0]                        # at least a pass apart
    run(main())


def test_release_of_a_task_that_moved_is_dropped():
    async def main() -> None:
        async with World(2) as w:
            t = await w.task("t1", 0, next_attempt=w.clock.now)
            await w.store.transition("t1", S.IN_PROGRESS, cause="device came")
            await w.scheduler._release(t, w.clock.now + 5)          # no error
            assert (await w.store.get_task("t1")).state == S.IN_PROGRESS
            t2 = await w.task("t2", 1, next_attempt=w.clock.now)
            await w.scheduler._release(t2, w.clock.now + 5)
            assert (await w.store.get_task("t2")).next_attempt == w.clock.now + 5
    run(main())


def test_notifications_of_a_pass_go_at_most_notify_parallel_at_once():
    async def main() -> None:
        async with World(6, notify_parallel=2) as w:
            now = w.clock.now
            for i in range(6):
                await w.task(f"t{i}", i, next_attempt=now)
            live, peak = 0, 0

            async def slow(msisdn: str) -> None:
                nonlocal live, peak
                live += 1
                peak = max(peak, live)
                await asyncio.sleep(0.01)
                live -= 1
            w.on_send = slow
            assert await w.scheduler.tick() == 6
            assert peak == 2 and len(w.sent) == 6
    run(main())


# --- the guard -------------------------------------------------------------------------------

def test_a_fault_in_one_task_fails_that_task_and_the_pass_goes_on(caplog):
    async def main() -> None:
        async with World(3) as w:
            now = w.clock.now
            for i in range(3):
                await w.task(f"t{i}", i, next_attempt=now)
            real = w.scheduler._pkg0

            def broken(acc: Any, task: Task, *a: Any) -> bytes:
                if task.task_id == "t1":
                    raise ValueError("boom")
                return real(acc, task, *a)
            w.scheduler._pkg0 = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                assert await w.scheduler.tick() == 3
            assert await w.last("t1") == ("FAILED", "internal error: ValueError: boom")
            assert {(await w.store.get_task(t)).state for t in ("t0", "t2")} == {S.NOTIFIED}
            assert "scheduler: task t1 failed" in caplog.text
    run(main())


def test_a_store_error_ends_the_pass_for_the_next_one():
    async def main() -> None:
        async with World(2) as w:
            await w.task("t0", 0, next_attempt=w.clock.now)

            async def gone(task_id: str) -> Any:
                raise StoreError("disk on fire")
            w.store.get_device = gone  # type: ignore[method-assign]
            with pytest.raises(StoreError):
                await w.scheduler.tick()
    run(main())


def test_a_task_that_cannot_even_be_failed_is_logged(caplog):
    async def main() -> None:
        async with World(2) as w:
            t = await w.task("t0", 0)

            async def bad() -> None:
                raise RuntimeError("x")

            async def refuse(*a: Any, **k: Any) -> Any:
                raise RuntimeError("cannot")
            w.tasks.finish = refuse  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                await w.scheduler._guarded(t, bad())
            assert "scheduler: task t0 could not be failed" in caplog.text
    run(main())


# --- recovery and the loop -------------------------------------------------------------------

def test_recover_pages_through_many_tasks_and_jobs():
    async def main() -> None:
        async with World(1) as w:
            now = w.clock.now
            for k in range(2):
                jid = f"z{k}"                   # after the 500 x… jobs: on the second page
                await w.store.create_job(Job(job_id=jid, state=J.PAUSED if k else J.RUNNING))
                await w.store.create_tasks([
                    Task(task_id=f"{jid}-{i}", dev_id=device(0).dev_id, op=OP, job_id=jid,
                         correlator=f"{jid}-{i}", state=S.IN_PROGRESS, attempts=1)
                    for i in range(505)])
            for i in range(500):
                await w.store.create_job(Job(job_id=f"x{i:03d}", state=J.RUNNING))
            assert await w.scheduler.recover() == 1010
            assert {t.next_attempt for t in (await w.store.tasks_by_job(
                "z1", state=S.PENDING, limit=1000)).items} == {now}
    run(main())


def test_recover_leaves_a_task_whose_device_connected_to_its_session():
    async def main() -> None:
        async with World(2) as w:
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            await w.task("t", 0, job_id="j", state=S.IN_PROGRESS, attempts=1)
            calls = {"n": 0}

            def in_session(tid: str) -> bool:
                calls["n"] += 1
                return tid == "t" and calls["n"] > 1   # connected while the move was written
            w.broker.sessions.in_session = in_session  # type: ignore[method-assign]
            assert await w.scheduler.recover() == 1
            t = await w.store.get_task("t")
            assert t.state == S.IN_PROGRESS and t.next_attempt is None
            assert await w.last("t") == ("IN_PROGRESS",
                                         "device connected; its session has the task")
    run(main())


def test_the_loop_runs_passes_until_stopped_and_reports_health():
    async def main() -> None:
        async with World(2, tick_interval=0.01) as w:
            await w.task("t0", 0, next_attempt=w.clock.now)
            w.scheduler.start()
            for _ in range(500):
                if w.sent:
                    break
                await asyncio.sleep(0.01)
            assert len(w.sent) == 1 and w.scheduler.health() == []
            await w.scheduler.stop()
            assert w.scheduler.health() == ["scheduler not started"]   # the loop is gone
    run(main())


def test_the_loop_runs_the_next_pass_at_once_after_a_full_batch():
    """``job_batch`` bounds a pass, not a job's pace: after a pass that started a full batch
    of a job with room for more, the next pass comes at once (not a tick later) — even when
    a job after it in the same pass had less to start; once the job's concurrency is taken,
    the loop waits its tick again."""
    async def main() -> None:
        async with World(10, tick_interval=30.0, job_batch=2) as w:
            job = await a_job(w, 8, concurrency=5, priority=9)
            # after the first job in each pass; one task, never a full batch
            other = await w.broker.jobs.create(OP, Selection(dev_ids=[device(8).dev_id]),
                                               priority=1)
            w.scheduler.start()
            try:
                for _ in range(90):             # well under a second, far under the tick
                    if len(w.sent) >= 6:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.05)
                # 2 + 2 + 1 (the concurrency) of the first job, 1 of the other
                assert len(w.sent) == 6
                assert (await w.store.get_job(job.job_id)).total == 5
                assert (await w.store.get_job(other.job_id)).total == 1
            finally:
                await w.scheduler.stop()
    run(main())


def test_the_loop_waits_its_tick_when_no_batch_was_full():
    async def main() -> None:
        async with World(8, tick_interval=0.05, job_batch=2) as w:
            await a_job(w, 8, concurrency=5)
            passes = 0
            real = w.scheduler.tick

            async def counted() -> int:
                nonlocal passes
                passes += 1
                return await real()
            w.scheduler.tick = counted  # type: ignore[method-assign]
            w.scheduler.start()
            try:
                for _ in range(300):
                    if len(w.sent) >= 5:
                        break
                    await asyncio.sleep(0.01)
                assert len(w.sent) == 5
                before = passes
                await asyncio.sleep(0.5)
                # a pass a tick (about 10 in 0.5 s); a loop that did not wait ran thousands
                assert 2 <= passes - before <= 25
            finally:
                await w.scheduler.stop()
    run(main())


def test_recover_after_a_device_process_exited_puts_back_only_its_cut_sessions(caplog):
    """``recover(lost=…)``: a device process exited — tasks cut off mid-session (in no session
    of this process and not held by a live device process) go back to PENDING, due now, with
    the device process's cause; those the live processes hold and those this process's
    sessions hold stay; PENDING and NOTIFIED tasks are not looked at (their notifications are
    this process's and still valid)."""
    async def main() -> None:
        async with World(8, claim_lease=100.0) as w:
            now = w.clock.now
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            await w.store.create_tasks([
                _t("a-cut", 0, state=S.IN_PROGRESS, attempts=1),
                _t("b-held", 1, state=S.IN_PROGRESS, attempts=1),
                _t("c-cut", 2, state=S.WAITING_USER, attempts=1),
                _t("d-mine", 3, state=S.IN_PROGRESS, attempts=1),
                _t("e-sent", 4, state=S.NOTIFIED, next_attempt=now + 50, attempts=1),
                _t("f-wait", 5, state=S.PENDING, next_attempt=now + 50),
                _t("g-cut", 6, state=S.IN_PROGRESS, attempts=1)])
            w.broker.sessions.in_session = lambda tid: tid == "d-mine"  # type: ignore
            with caplog.at_level(logging.INFO, logger="dmengine.scheduler"):
                assert await w.scheduler.recover(lost={"b-held"}) == 3
            for tid in ("a-cut", "c-cut", "g-cut"):
                t = await w.store.get_task(tid)
                assert (t.state, t.next_attempt) == (S.PENDING, now), tid
                assert await w.last(tid) == ("PENDING", "the device process that held its "
                                                        "session exited before the device "
                                                        "answered")
            for tid in ("b-held", "d-mine", "e-sent", "f-wait"):
                assert (await w.store.get_task(tid)).history_len == 1, tid
            assert "scheduler: 3 job tasks of the exited device process due again" in \
                [r.getMessage() for r in caplog.records]
    run(main())


def test_a_failed_recovery_does_not_stop_the_loop(caplog):
    async def main() -> None:
        async with World(2, tick_interval=0.01) as w:
            async def broken() -> int:
                raise RuntimeError("no")
            w.scheduler.recover = broken  # type: ignore[method-assign]
            await w.task("t0", 0, next_attempt=w.clock.now)
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                w.scheduler.start()
                for _ in range(500):
                    if w.sent:
                        break
                    await asyncio.sleep(0.01)
                await w.scheduler.stop()
            assert len(w.sent) == 1
            assert "scheduler: recovery after the restart failed" in \
                [r.getMessage() for r in caplog.records]
    run(main())


# --- what the first mutation run left (issue 18) -----------------------------------------------

def test_a_jobs_step_does_not_overwrite_a_job_the_caller_changed_meanwhile():
    """The pass read the job RUNNING; the caller paused it before the pass's write: every
    write of the step expects RUNNING and is refused (Conflict), the caller's pause stays."""
    from dmengine.bulk import view as job_view
    from dmengine.errors import Conflict

    async def main() -> None:
        async with World(8) as w:
            now = w.clock.now
            cases = {
                "complete": (2, []),
                "threshold": (4, [Stage(percent=50, success_threshold=0.9), Stage(percent=100)]),
                "approval": (4, [Stage(percent=50, approval=True), Stage(percent=100)]),
                "next": (4, [Stage(percent=50), Stage(percent=100)]),
            }
            for name, (targets, stages) in cases.items():
                await w.store.create_job(Job(job_id=name, op=OP, state=J.RUNNING, stages=stages))
                await w.store.add_job_targets(name, [device(i).dev_id for i in range(targets)])
                n = 2
                await w.store.create_job_tasks(name, 0, [Task(
                    task_id=f"{name}{i}", dev_id=device(i).dev_id, op=OP, job_id=name,
                    correlator=f"{name}{i}", state=S.SUCCEEDED if i else S.FAILED)
                    for i in range(n)])
                stale = await w.store.get_job(name)
                await w.broker.jobs.pause(name, cause="the caller's")
                with pytest.raises(Conflict):
                    await w.scheduler._stage_done(stale, job_view(stale, now))
                got = await w.store.get_job(name)
                assert (got.state, got.cause, got.stage) == (J.PAUSED, "the caller's", 0), name
            # the end time and the stop rule likewise
            await w.store.create_job(Job(job_id="end", op=OP, state=J.RUNNING, end_at=now - 1))
            stale = await w.store.get_job("end")
            await w.broker.jobs.pause("end", cause="the caller's")
            with pytest.raises(Conflict):
                await w.scheduler._end_job(stale, now)
            assert (await w.store.get_job("end")).state == J.PAUSED
            await w.store.create_job(Job(job_id="stop", op=OP, state=J.RUNNING,
                                         stop_rule=StopRule(max_failure_ratio=0.1)))
            await w.store.add_job_targets("stop", [device(0).dev_id, device(1).dev_id])
            await w.store.create_job_tasks("stop", 0, [Task(
                task_id="stop0", dev_id=device(0).dev_id, op=OP, job_id="stop",
                correlator="stop0", state=S.FAILED)])
            stale = await w.store.get_job("stop")
            await w.broker.jobs.pause("stop", cause="the caller's")
            with pytest.raises(Conflict):
                await w.scheduler._run_job(stale, now, 0)
            assert (await w.store.get_job("stop")).cause == "the caller's"
            # and the pass goes on past such a job
            await w.broker.jobs.restart("stop")
            assert await w.scheduler.tick() >= 0
    run(main())


def test_a_task_that_cannot_be_expired_at_the_jobs_end_does_not_stop_the_end(caplog):
    async def main() -> None:
        async with World(4) as w:
            now = w.clock.now
            job = await a_job(w, 2, end_at=now + 100)
            await w.store.update_job(job.job_id, {"deadline": now + 1000})
            await w.scheduler.tick()
            real = w.tasks.finish
            calls = {"n": 0}

            async def flaky(task: Task, *a: Any, **k: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 1:
                    raise RuntimeError("cannot now")
                return await real(task, *a, **k)
            w.tasks.finish = flaky  # type: ignore[method-assign]
            w.clock.now = now + 100
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                await w.scheduler.tick()
            j = await w.store.get_job(job.job_id)
            assert j.state == J.COMPLETED, j
            states = sorted(t.state.value for t in
                            (await w.store.tasks_by_job(job.job_id, limit=5)).items)
            assert states == ["EXPIRED", "FAILED"], states
            assert "scheduler: task " in caplog.text and " failed" in caplog.text
    run(main())


def test_the_stop_rule_counts_from_the_restart():
    async def main() -> None:
        async with World(2) as w:
            rule = StopRule(max_failure_ratio=0.5, min_finished=4)
            # since the restart (base 4 final, 2 failed): 4 final, 2 failed -> 50 %: stop
            await w.store.create_job(Job(job_id="a", op=OP, state=J.RUNNING, stop_rule=rule))
            await w.store.add_job_targets("a", [f"IMEI:{i}" for i in range(10)])
            await w.store.update_job("a", {"base_final": 4, "base_failed": 2})
            await w.store.create_job_tasks("a", 0, [Task(
                task_id=f"a{i}", dev_id=f"IMEI:{i}", op=OP, job_id="a", correlator=f"a{i}",
                state=S.FAILED if i < 4 else S.SUCCEEDED) for i in range(8)])
            assert await w.scheduler._run_job(await w.store.get_job("a"), w.clock.now, 0) == 0
            assert (await w.store.get_job("a")).cause == \
                "stopped by its error threshold: 2 of 4 tasks failed (50% >= 50%)"
            # 4 final, 1 failed since the restart -> 25 %: goes on
            await w.store.create_job(Job(job_id="b", op=OP, state=J.RUNNING, stop_rule=rule))
            await w.store.add_job_targets("b", [f"IMEI:{i}" for i in range(10)])
            await w.store.update_job("b", {"base_final": 4, "base_failed": 2})
            await w.store.create_job_tasks("b", 0, [Task(
                task_id=f"b{i}", dev_id=f"IMEI:{i}", op=OP, job_id="b", correlator=f"b{i}",
                state=S.FAILED if i < 3 else S.SUCCEEDED) for i in range(8)])
            await w.scheduler._run_job(await w.store.get_job("b"), w.clock.now, 0)
            assert (await w.store.get_job("b")).state == J.RUNNING
    run(main())


def test_a_jobs_window_in_its_own_zone_and_to_the_second():
    async def main() -> None:
        win = [TimeWindow(start=H, end=2 * H)]
        # 01:00 UTC is 10:00 in Tokyo: outside the job's window there
        async with World(4, clock=Clock(MONDAY + H)) as w:
            job = await a_job(w, 2, windows=win, tz="Asia/Tokyo")
            assert await w.scheduler.tick() == 0
            assert (await w.store.get_job(job.job_id)).total == 0
        # half a second before it opens
        async with World(4, clock=Clock(MONDAY + H - 0.5)) as w:
            job = await a_job(w, 2, windows=win)
            assert await w.scheduler.tick() == 0
            w.clock.now = MONDAY + H
            assert await w.scheduler.tick() == 2
    run(main())


def test_a_follow_up_does_not_overwrite_a_task_that_moved_meanwhile():
    """follow_up was handed the task as the pass read it (IN_PROGRESS); the task is PENDING
    now (a restart put it back): every branch's write expects IN_PROGRESS and is dropped."""
    async def main() -> None:
        clock = Clock(MONDAY)
        no_secret = DmAccount(server_id="dmengine", client_name="x", client_password="c")
        devs = [device(0), device(1, msisdn=None), device(2, tz="UTC"),
                device(3, account=no_secret), device(4)]
        async with World(devices=devs, clock=clock, alert_followups=2) as w:
            job = Job(job_id="j", windows=[TimeWindow(start=H, end=2 * H)])
            cases = [("limit", 0, {"followups": 2}, None), ("nowake", 1, {}, None),
                     ("window", 2, {}, job), ("nopkg", 3, {}, None), ("wake", 4, {}, None)]
            for tid, i, kw, j in cases:
                stale = await accepted(w, tid, i, **kw)
                await w.store.transition(tid, S.PENDING, cause="put back")
                got = await w.scheduler.follow_up(stale, j)
                assert got is stale, tid
                t = await w.store.get_task(tid)
                assert t.state == S.PENDING and t.history_len == 2, (tid, t)
            assert w.sent == []
    run(main())


def test_follow_up_waits_grow_as_powers_of_two_and_are_counted_by_gateway(caplog):
    async def main() -> None:
        async with World(alert_wait=5.0, alert_followups=5) as w:
            got = await w.scheduler.follow_up(await accepted(w, "t1", 0, followups=2))
            assert got.followups == 3 and got.next_attempt == w.clock.now + 5.0 * 8
            assert w.metrics.by_gateway == {("loopback", "sent"): 1}
            w.fail = GatewayError("down", retryable=True)
            with caplog.at_level(logging.WARNING, logger="dmengine.scheduler"):
                await w.scheduler.follow_up(await accepted(w, "t2", 1))
            assert w.metrics.by_gateway == {("loopback", "sent"): 1, ("loopback", "failed"): 1}
            assert [r.getMessage() for r in caplog.records if r.name == "dmengine.scheduler"] \
                == ["scheduler: result-alert follow-up of task t2 not sent: "
                    "loopback: gave up after 1 attempts: down"]
    run(main())


def test_follow_up_windows_in_the_devices_zone():
    async def main() -> None:
        win = Job(job_id="j", windows=[TimeWindow(start=H, end=2 * H)])
        devs = [device(0, tz="Asia/Tokyo"), device(1, tz="UTC"), device(2, tz="UTC")]
        async with World(devices=devs, clock=Clock(MONDAY + H)) as w:
            # 10:00 in Tokyo: outside; no job: no window at all
            got = await w.scheduler.follow_up(await accepted(w, "a", 0), win)
            assert got.followups == 0 and got.next_attempt == MONDAY + 16 * H  # 01:00 Tokyo
            assert (await w.scheduler.follow_up(await accepted(w, "b", 1))).followups == 1
        async with World(devices=devs, clock=Clock(MONDAY + H - 0.5)) as w:
            got = await w.scheduler.follow_up(await accepted(w, "c", 2), win)
            assert got.followups == 0 and got.next_attempt == MONDAY + H
    run(main())


def test_recover_causes_skips_and_its_log_line(caplog):
    async def main() -> None:
        async with World(8, claim_lease=100.0) as w:
            now = w.clock.now
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            # in id order within each state: the skipped ones first, the others after them
            await w.store.create_tasks([
                _t("a-due", 0, state=S.NOTIFIED, next_attempt=now, attempts=1),
                _t("b-busy", 1, state=S.NOTIFIED, next_attempt=now + 50, attempts=1),
                _t("c-back", 2, state=S.NOTIFIED, next_attempt=now + 50, attempts=1),
                _t("d-busy", 3, state=S.IN_PROGRESS, attempts=1),
                _t("e-cut", 4, state=S.IN_PROGRESS, attempts=1),
                _t("f-ask", 5, state=S.WAITING_USER, attempts=1)])
            w.broker.sessions.in_session = lambda tid: tid.endswith("-busy")  # type: ignore
            with caplog.at_level(logging.INFO, logger="dmengine.scheduler"):
                assert await w.scheduler.recover() == 3
            assert await w.last("c-back") == ("PENDING", "the server restarted: notifying again")
            assert await w.last("e-cut") == ("PENDING", "the server restarted before the "
                                                        "device answered")
            assert await w.last("f-ask") == ("PENDING", "the server restarted before the "
                                                        "device answered")
            for tid in ("a-due", "b-busy", "d-busy"):
                assert (await w.store.get_task(tid)).history_len == 1, tid
            assert "scheduler: 3 job tasks of the previous process due again" in \
                [r.getMessage() for r in caplog.records]
    run(main())


def _t(tid: str, i: int, **kw: Any) -> Task:
    return Task(task_id=tid, dev_id=device(i).dev_id, op=OP, job_id="j", correlator=tid, **kw)


def test_recover_at_the_edge_of_the_lease():
    async def main() -> None:
        async with World(2, claim_lease=100.0) as w:
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            (t,) = await w.store.create_tasks([_t("t", 0, state=S.NOTIFIED, attempts=1,
                                                  next_attempt=w.clock.now + 500)])
            w.clock.now = t.updated + 100.0         # touched exactly a lease ago: put back
            assert await w.scheduler.recover() == 1
        async with World(2, claim_lease=100.0) as w:
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            (t,) = await w.store.create_tasks([_t("t", 0, state=S.NOTIFIED, attempts=1,
                                                  next_attempt=w.clock.now + 50)])
            w.clock.now = t.next_attempt            # due at this very moment: due anyway
            assert await w.scheduler.recover() == 0
    run(main())


def test_the_pass_lag_counts_from_the_pass_start_and_its_time_is_measured():
    async def main() -> None:
        clock = Clock(1000.0)
        async with World(2, clock=clock, notify_parallel=1) as w:
            await w.task("a", 0, next_attempt=1000.0)
            await w.task("b", 1, next_attempt=1000.0)

            async def slow(msisdn: str) -> None:
                clock.now += 3.0
            w.on_send = slow
            await w.scheduler.tick()
            assert w.metrics.lag.total == 3.0 + 6.0          # both due at the pass start
            assert w.metrics.passes.count == 1 and 0 <= w.metrics.passes.total < 60
    run(main())


def test_an_expiry_that_fails_does_not_stop_the_pass(caplog):
    async def main() -> None:
        async with World(4, max_notifications=1) as w:
            now = w.clock.now
            await w.task("old", 0, deadline=now - 1, state=S.NOTIFIED, next_attempt=now + 99)
            await w.task("spent", 1, state=S.NOTIFIED, attempts=1, next_attempt=now)
            real = w.tasks.finish
            failing = {"old", "spent"}

            async def flaky(task: Task, *a: Any, **k: Any) -> Any:
                if task.task_id in failing:
                    failing.discard(task.task_id)
                    raise RuntimeError("cannot now")
                return await real(task, *a, **k)
            w.tasks.finish = flaky  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                assert await w.scheduler.tick() == 2
            assert (await w.store.get_task("old")).state == S.FAILED
            assert (await w.store.get_task("spent")).state == S.FAILED
            msgs = [r.getMessage() for r in caplog.records]
            assert "scheduler: task old failed" in msgs and "scheduler: task spent failed" in msgs
    run(main())


def test_retries_skip_one_task_and_go_on_to_the_next():
    async def main() -> None:
        async with World(8) as w:
            now = w.clock.now
            await w.store.create_job(Job(job_id="paused", op=OP, state=J.PAUSED))
            acc = DmAccount(server_id="dmengine", client_name="b", client_password="c",
                            server_password="s")
            # claimed oldest first: each skipped task is due before the one that goes
            await w.task("busy", 0, state=S.NOTIFIED, attempts=1, next_attempt=now - 9)
            await w.task("ask", 1, state=S.WAITING_USER, next_attempt=now - 8)
            await w.task("boot", 2, op=BootstrapOp(account=acc), next_attempt=now - 7)
            await w.task("paused", 3, job_id="paused", next_attempt=now - 6)
            await w.task("go", 4, state=S.NOTIFIED, attempts=1, next_attempt=now)
            w.broker.sessions.in_session = lambda tid: tid == "busy"  # type: ignore
            assert await w.scheduler.tick() == 1
            assert (await w.store.get_task("go")).attempts == 2
            assert [m for m, _ in w.sent] == [device(4).msisdn]
    run(main())


def test_retries_in_the_jobs_window_zone_and_inside_it():
    async def main() -> None:
        win = [TimeWindow(start=H, end=2 * H)]

        async def world_with_retry(clock: Clock, tz: str | None) -> World:
            w = World(4, clock=clock, claim_lease=30 * H)
            await w.__aenter__()
            job = await a_job(w, 2, windows=win, tz=tz)
            await w.store.create_job_tasks(job.job_id, 0, [Task(
                task_id="r", dev_id=device(0).dev_id, op=OP, job_id=job.job_id,
                correlator="r", state=S.NOTIFIED, attempts=1, next_attempt=clock.now)])
            return w
        # 01:00 UTC is 10:00 in Tokyo: held until 01:00 Tokyo (16:00 UTC)
        w = await world_with_retry(Clock(MONDAY + H), "Asia/Tokyo")
        await w.scheduler.tick()
        assert (await w.store.get_task("r")).next_attempt == MONDAY + 16 * H
        await w.__aexit__()
        # inside the window: sent now
        w = await world_with_retry(Clock(MONDAY + H), None)
        await w.scheduler.tick()
        assert (await w.store.get_task("r")).attempts == 2
        await w.__aexit__()
        # half a second before it opens: held until it opens
        w = await world_with_retry(Clock(MONDAY + H - 0.5), None)
        await w.scheduler.tick()
        t = await w.store.get_task("r")
        assert t.attempts == 1 and t.next_attempt == MONDAY + H
        await w.__aexit__()
    run(main())


def test_a_job_that_changed_under_the_pass_does_not_stop_the_others():
    async def main() -> None:
        async with World(4) as w:
            high = await a_job(w, 1, priority=9)
            low = await a_job(w, 1, priority=1)
            stale = await w.store.get_job(high.job_id)
            await w.broker.jobs.pause(high.job_id)
            fresh = await w.store.get_job(low.job_id)
            n = await w.scheduler._run_jobs({high.job_id: stale, low.job_id: fresh},
                                            w.clock.now)
            assert n == 1 and (await w.store.get_job(low.job_id)).total == 1
            assert (await w.store.get_job(high.job_id)).total == 0
    run(main())


def test_one_notification_at_a_time_when_notify_parallel_is_one():
    async def main() -> None:
        async with World(3, notify_parallel=1) as w:
            for i in range(3):
                await w.task(f"t{i}", i, next_attempt=w.clock.now)
            live, peak = 0, 0

            async def slow(msisdn: str) -> None:
                nonlocal live, peak
                live += 1
                peak = max(peak, live)
                await asyncio.sleep(0.01)
                live -= 1
            w.on_send = slow
            await w.scheduler.tick()
            assert peak == 1 and len(w.sent) == 3
    run(main())


def test_the_pass_hands_each_task_its_job_for_the_devices_window():
    async def main() -> None:
        # 01:00 UTC: inside the job's window in its zone (UTC); 10:00 in the device's Tokyo
        devs = [device(0, tz="Asia/Tokyo"), device(1)]
        async with World(devices=devs, clock=Clock(MONDAY + H)) as w:
            job = await a_job(w, 2, windows=[TimeWindow(start=H, end=2 * H)])
            await w.scheduler.tick()
            got = {t.dev_id: t for t in (await w.store.tasks_by_job(job.job_id,
                                                                     limit=5)).items}
            tokyo = got[device(0).dev_id]
            assert tokyo.state == S.PENDING and tokyo.next_attempt == MONDAY + 16 * H
            assert got[device(1).dev_id].state == S.NOTIFIED
    run(main())


def test_the_guards_log_lines_name_the_task_job_and_device(caplog):
    async def main() -> None:
        async with World(2) as w:
            await w.store.create_job(Job(job_id="j", state=J.RUNNING))
            (t,) = await w.store.create_tasks([_t("t", 1)])

            async def bad() -> None:
                raise ValueError("boom")
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                await w.scheduler._guarded(t, bad())
                w.tasks.finish = lambda *a, **k: bad()  # type: ignore[method-assign]
                await w.scheduler._guarded(t, bad())
            recs = [r for r in caplog.records if r.name == "dmengine.scheduler"]
            assert [r.getMessage() for r in recs] == ["scheduler: task t failed",
                                                      "scheduler: task t failed",
                                                      "scheduler: task t could not be failed"]
            for r in recs:
                assert (r.dm_task, r.dm_job, r.dm_device) == ("t", "j", device(1).dev_id)
    run(main())


def test_session_ids_cover_1_to_0xffff(monkeypatch):
    from dmengine import scheduler as mod
    asked = []

    def edge(value: int) -> Any:
        def randbelow(n: int) -> int:
            asked.append(n)
            return value if value >= 0 else n + value
        return randbelow
    monkeypatch.setattr(mod.secrets, "randbelow", edge(0))
    assert Scheduler.new_session_id() == 1
    monkeypatch.setattr(mod.secrets, "randbelow", edge(-1))
    assert Scheduler.new_session_id() == 0xFFFF
    assert asked == [0xFFFF, 0xFFFF]


def test_failing_passes_are_logged_and_reported(caplog):
    async def main() -> None:
        async with World(1, tick_interval=0.01) as w:
            async def broken() -> int:
                raise RuntimeError("disk")
            w.scheduler.tick = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="dmengine.scheduler"):
                w.scheduler.start()
                for _ in range(500):
                    if w.scheduler.loop.failed_passes >= 5:
                        break
                    await asyncio.sleep(0.01)
                problems = w.scheduler.health()
                await w.scheduler.stop()
            assert any(p.startswith("scheduler: ") and "passes failed in a row (last: "
                       "RuntimeError: disk)" in p for p in problems), problems
            assert "scheduler pass failed" in [r.getMessage() for r in caplog.records]
    run(main())


def test_only_running_jobs_and_due_scheduled_ones_start():
    async def main() -> None:
        async with World(6) as w:
            now = w.clock.now
            paused = await a_job(w, 1)
            await w.broker.jobs.pause(paused.job_id)
            # in id order: the first scheduled job is not due yet, the second is
            for jid, at in (("sa-late", now + 60), ("sb-due", now + 5)):
                await w.store.create_job(Job(job_id=jid, op=OP, state=J.SCHEDULED,
                                             start_at=at))
                await w.store.add_job_targets(jid, [device(4).dev_id])
            late = await w.store.get_job("sa-late")
            due = await w.store.get_job("sb-due")
            w.clock.now = now + 5
            assert await w.scheduler.tick() == 1
            assert (await w.store.get_job(due.job_id)).state == J.RUNNING
            assert (await w.store.get_job(late.job_id)).state == J.SCHEDULED
            assert (await w.store.get_job(paused.job_id)).total == 0
    run(main())


def test_notify_hands_an_accepted_exec_its_job_and_waits_to_the_second():
    async def main() -> None:
        devs = [device(0, tz="Asia/Tokyo"), device(1, tz="UTC")]
        job = Job(job_id="j", windows=[TimeWindow(start=H, end=2 * H)])
        async with World(devices=devs, clock=Clock(MONDAY + H)) as w:
            got = await w.scheduler.notify(await accepted(w, "a", 0), job)
            assert got.followups == 0 and got.next_attempt == MONDAY + 16 * H
        async with World(devices=devs, clock=Clock(MONDAY + H - 0.5)) as w:
            got = await w.scheduler.notify(await w.task("b", 1), job)
            assert got.state == S.PENDING and got.next_attempt == MONDAY + H
    run(main())
