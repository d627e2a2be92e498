"""Issue 18: FUMO mutants that went unnoticed — only 200 counted as success (the vendor range
250–299 untested), an unreadable result counted as success, and the wait-for-alert guard
removed (the package is then pushed and downloaded twice).  Through the real engine and
simulated phones over HTTP, as tests/test_broker_e2e.py."""
from __future__ import annotations

import asyncio

import pytest

from dmengine.message import Command, Item, Meta
from dmengine.model import TaskState, UpdateOp
from dmengine.simulator.device import DeviceProfile, FaultPlan
from dmengine.status import fumo_result_is_success, status_is_success

from test_broker_e2e import FIRMWARE, World, run_world, upload_firmware

S = TaskState


@pytest.mark.parametrize("code,success", [
    (199, False), (200, True), (250, True), (251, True), (299, True), (300, False),
    (400, False), (410, False), (500, False)])
def test_fumo_and_dm_success_ranges(code, success):
    assert fumo_result_is_success(code) is success
    assert status_is_success(code) is success


@pytest.mark.parametrize("code", [250, 299])
def test_vendor_success_codes_succeed_the_update(tmp_path, code):
    """250–299 are "successful, vendor specified" (PROTOCOL.md §9.4): the task succeeds,
    keeps the code, and the device's firmware is forgotten (it changed)."""
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        await w.store.update_device(dev.dev_id, {"devdetail": {"./DevDetail/FwV": "2.3.9"}})
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert task.result.fumo_result == code
        assert f"firmware updated: {code} Successful, vendor specified" == task.cause
        assert (await w.broker.get_task_history(tid))[-1].result_code == code
        assert "./DevDetail/FwV" not in (await w.store.get_device(dev.dev_id)).devdetail
        assert [e.task_id for e in (await w.store.charging_events()).items] == [tid]
    run_world(tmp_path, scenario, faults={0: FaultPlan(fail_update=code)})


@pytest.mark.parametrize("data", ["OK", "", "2OO"])
def test_an_unreadable_result_fails_the_update(tmp_path, data):
    """A Generic Alert whose data is no number is no success: the task fails naming it."""
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        real_run_job = w.fleet.run_job

        async def garbled(d, job):        # the phone's firmware client writes junk in its 1226
            result = await real_run_job(d, job)
            for i, a in enumerate(d.pending_alerts):
                it = a.items[0]
                d.pending_alerts[i] = Command(
                    name="Alert", data=a.data, correlator=a.correlator,
                    items=[Item(source=it.source, meta=Meta(type=it.meta.type, format="chr"),
                                data=data)])
            return result
        w.fleet.run_job = garbled
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.FAILED, task.cause
        assert task.cause.startswith("unreadable FUMO result"), task.cause
        assert (await w.store.charging_events()).items == []
    run_world(tmp_path, scenario, profile=DeviceProfile(report_in_same_session=False))


def test_a_session_while_the_update_installs_does_not_push_the_package_again(tmp_path):
    """The Exec was accepted; before the phone reports (it is still installing) it opens
    another session.  The task waits for the alert: no second Replace/Exec, one download,
    one "waiting for the result alert" in the history."""
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        real_run_job = w.fleet.run_job
        installing = asyncio.Event()
        release = asyncio.Event()
        jobs: list[str] = []

        async def slow_install(d, job):
            jobs.append(job.kind)
            if len(jobs) == 1:
                installing.set()
                await release.wait()       # the first update takes a while
            return await real_run_job(d, job)
        w.fleet.run_job = slow_install
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        await asyncio.wait_for(installing.wait(), 15)
        task = await w.wait_state(tid, {S.IN_PROGRESS})
        # the phone connects on its own (a 1201 session) while the update is still running
        rep = await w.fleet.run_session(dev, alert=1201)
        assert rep.outcome == "completed", rep
        await asyncio.sleep(0.2)
        release.set()
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert len(jobs) == 1, jobs                       # the package was pushed once
        assert w.fleet.stats.download_bytes == len(FIRMWARE)
        assert (await w.store.get_content(cid)).downloads == 1
        hist = await w.broker.get_task_history(tid)
        waits = [h for h in hist if "waiting for the result alert" in (h.cause or "")]
        assert len(waits) == 1, [(h.to_state, h.cause) for h in hist]
        assert [h.to_state for h in hist].count(S.SUCCEEDED) == 1
    run_world(tmp_path, scenario, profile=DeviceProfile(report_in_same_session=False))


async def _update_one_device(w: World):
    """doOperation UPDATE for one registered device, to its final state: (device, task,
    store writes from doOperation on)."""
    dev = w.device(0)
    await w.register(dev)
    cid = await upload_firmware(w)
    before = w.store.ops
    tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
    task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
    assert task.state == S.SUCCEEDED, task.cause
    return dev, task, w.store.ops - before


def test_the_result_alerts_message_writes_the_device_with_the_outcome(tmp_path):
    """The FUMO update's second session (its package 1 carries DevInfo and the result alert):
    the device update (nonces, DevInfo, last contact) goes in the write of the final move —
    the writes from doOperation to SUCCEEDED are the task's creation, its notification, the
    first session's device-and-start write, the accepted-Exec move, the download count and
    that one (six; seven when the device update is written alone) — and nothing of it is
    lost: the device authenticates a third session with the nonces it was given, and its
    last contact is the second session's."""
    async def scenario(w: World) -> None:
        dev, task, writes = await _update_one_device(w)
        assert writes == 6
        rec = await w.store.get_device(dev.dev_id)
        assert rec.last_contact is not None and rec.last_contact >= task.finished - 5
        # the nonces of the alert session were stored: a third session authenticates
        from dmengine.model import QueryOp
        tid2 = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn)
        assert (await w.wait_state(tid2, {S.SUCCEEDED, S.FAILED})).state == S.SUCCEEDED
    run_world(tmp_path, scenario, profile=DeviceProfile(report_in_same_session=False))


def test_the_accepted_exec_and_its_result_alert_in_one_message_are_one_write(tmp_path):
    """The common FUMO session (the phone reports in the message that answers the Exec): the
    "waiting for the result alert" move is written in the write of the outcome, not before
    it — five writes from doOperation to SUCCEEDED (task, notification, device-and-start,
    the download count, the outcome; six when the waiting move is written alone) — and the
    history still shows both steps, the final result carrying the session's statuses."""
    async def scenario(w: World) -> None:
        _dev, task, writes = await _update_one_device(w)
        assert writes == 5
        hist = await w.broker.get_task_history(task.task_id)
        causes = [h.cause or "" for h in hist]
        waiting = [i for i, c in enumerate(causes) if "waiting for the result alert" in c]
        assert len(waiting) == 1 and waiting[0] == len(hist) - 2, causes
        assert hist[-1].to_state == TaskState.SUCCEEDED
        assert any(k.startswith("Exec") for k in task.result.statuses), task.result
        assert task.result.fumo_result == 200
    run_world(tmp_path, scenario, profile=DeviceProfile(report_in_same_session=True))
