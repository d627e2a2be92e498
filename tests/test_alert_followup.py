"""Issue 14: an accepted FUMO Exec whose device never sends its Generic Alert 1226 is not left
waiting until its deadline: after ``alert_wait`` the scheduler wakes the device (package #0) so
that it reports, doubling the wait, ``alert_followups`` times at most — and the package is
neither pushed nor downloaded twice.

Real engine (LMDB, device port over HTTP, loopback gateway) and simulated phones.  The phones
here never start a session of their own to report (``alert=1201`` sessions are dropped, as a
phone out of coverage after its reboot): only a package #0 brings them back.
"""
from __future__ import annotations

import asyncio
from typing import Any

from dmengine.broker import BrokerConfig
from dmengine.model import TaskState, UpdateOp
from dmengine.simulator.device import DeviceProfile

from test_broker_e2e import World, run_world, upload_firmware

S = TaskState
FAST = BrokerConfig(retry_delays=(0.3,), tick_interval=0.05, retry_jitter=0.0,
                    alert_wait=0.4, alert_followups=2)


def _no_reports_of_their_own(w: World) -> dict[str, int]:
    """The phones drop the sessions they would start themselves to report; returns the
    package #0 count per MSISDN (every session they do run is one a package #0 started)."""
    fleet = w.fleet
    run_session = fleet.run_session
    pkg0: dict[str, int] = {}

    async def only_when_woken(dev: Any, **kw: Any) -> Any:
        if kw.get("alert") == 1201:
            return None
        pkg0[dev.msisdn] = pkg0.get(dev.msisdn, 0) + 1
        return await run_session(dev, **kw)
    fleet.run_session = only_when_woken          # type: ignore[method-assign]
    return pkg0


async def _history(w: World, tid: str) -> list[tuple[str, str | None]]:
    return [(h.to_state.value, h.cause) for h in await w.broker.get_task_history(tid)]


def test_a_silent_device_is_woken_to_report_and_gets_no_second_exec(tmp_path):
    async def scenario(w: World) -> None:
        sessions = _no_reports_of_their_own(w)
        dev = w.device(0)
        await w.register(dev)
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED}, timeout=20)
        history = await _history(w, tid)
        assert task.state == S.SUCCEEDED, history
        assert task.cause.startswith("firmware updated"), task.cause
        # one follow-up brought the report: two sessions in all, both from a package #0
        assert task.followups == 1 and sessions == {dev.msisdn: 2}, (task.followups, sessions)
        woken = [c for s, c in history if c and "device woken to report" in c]
        assert len(woken) == 1 and "follow-up 1 of 2" in woken[0], history
        # the package went out once: one download, one Exec accepted
        assert (await w.store.get_content(cid)).downloads == 1
        accepted = [c for s, c in history if c and "accepted; waiting for the result" in c]
        assert len(accepted) == 1, history
    run_world(tmp_path, scenario, broker=FAST,
              profile=DeviceProfile(report_in_same_session=False))


def test_follow_ups_are_bounded_then_the_task_waits_for_its_deadline(tmp_path):
    async def scenario(w: World) -> None:
        sessions = _no_reports_of_their_own(w)
        dev = w.device(1)
        await w.register(dev)
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        # the Exec is accepted in the first session; then the phone is off for good
        for _ in range(400):
            history = await _history(w, tid)
            if any(c and "accepted; waiting for the result" in c for _, c in history):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"the Exec was never accepted: {history}")
        w.silent.add(dev.msisdn)
        for _ in range(400):             # 0.8 s and 1.6 s later, then the last word
            history = await _history(w, tid)
            if any(c and "waiting for the device until the deadline" in c for _, c in history):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"follow-ups never ended: {history}")
        task = await w.store.get_task(tid)
        assert task.state == S.IN_PROGRESS and task.next_attempt is None, task
        assert task.followups == 2
        woken = [c for _, c in history if c and "device woken to report" in c]
        assert ["follow-up 1 of 2" in woken[0], "follow-up 2 of 2" in woken[1]] == [True, True]
        assert len(woken) == 2, history
        # the last word is in the history and nothing more is due for it
        assert "no result alert after 2 wake-up(s)" in history[-1][1], history[-1]
        assert sessions == {dev.msisdn: 1}       # the wake-ups reached a phone that is off
        assert (await w.store.get_content(cid)).downloads == 1
        assert task.deadline is not None         # it still expires at its deadline
    run_world(tmp_path, scenario, broker=FAST,
              profile=DeviceProfile(report_in_same_session=False))
