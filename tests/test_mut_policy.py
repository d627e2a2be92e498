"""Issue 18: acceptDevicePolicy mutants that went unnoticed — the TAC compared on fewer than 8
digits, and a carrier callback (policy 40) that raises, times out, answers non-200 or
something other than accept, or is not configured, being taken as "accept".

Driven the way it happens: the record is under another IMEI than the phone that answers the
notification (a replaced phone), through the real engine (LMDB store, device port over HTTP,
simulated devices) and, for policy 40, a real HTTP carrier endpoint."""
from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web

from dmengine.errors import InvalidRequest
from dmengine.devices import check_device_policy, http_carrier_callback
from dmengine.model import Device, QueryOp, TaskState

from test_broker_e2e import World, run_world

S = TaskState


def _policy(policy: int, record_imei: str | None, reported: str, callback=None):
    record = Device(dev_id=f"IMEI:{record_imei}" if record_imei else "MSISDN-1", imei=record_imei)
    return asyncio.run(check_device_policy(policy, record, reported, task_id="t1",
                                           callback=callback))


@pytest.mark.parametrize("reported,accept", [
    ("IMEI:356938039999999", True),     # the 8-digit TAC of the record, another serial
    ("IMEI:356938031234567", True),
    ("IMEI:356938129999999", False),    # first 6 digits equal, digits 7–8 differ: another TAC
    ("IMEI:356938049999999", False),    # only the 8th digit differs
    ("IMEI:456938039999999", False),    # only the 1st differs
    ("MSISDN:+4917000000001", False),   # no IMEI reported at all
])
def test_policy_10_compares_all_8_tac_digits(reported, accept):
    d = _policy(10, "356938035643809", reported)
    assert d.accept is accept, d.cause
    assert not d.same_device
    assert "TAC" in d.cause and ("refused" in d.cause) is not accept


def test_policy_10_without_an_imei_on_record_refuses():
    assert not _policy(10, None, "IMEI:356938039999999").accept


def test_the_same_device_passes_every_policy_and_others_by_their_rule():
    for policy in (10, 20, 30, 40):
        d = _policy(policy, "356938035643809", "IMEI:356938035643809")
        assert d.accept and d.same_device
    assert _policy(30, "490154203237518", "IMEI:356938035643809").accept
    assert not _policy(20, "490154203237518", "IMEI:356938035643809").accept
    assert _policy(20, None, "IMEI:356938035643809").accept
    d = _policy(99, "490154203237518", "IMEI:356938035643809")
    assert not d.accept and "unknown acceptDevicePolicy 99" in d.cause


def test_policy_10_end_to_end_same_6_digits_is_refused(tmp_path):
    """The phone that answers (simulator IMEI 35693803…) is not accepted for a record whose
    IMEI shares only its first 6 digits."""
    async def scenario(w: World) -> None:
        dev = w.device(0)
        assert dev.dev_id.startswith("IMEI:35693803")
        record_imei = "35693812" + "9999999"
        await w.register(dev, imei=record_imei, dev_id=f"IMEI:{record_imei}")
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn,
                                          accept_device_policy=10)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.FAILED and "acceptDevicePolicy 10" in task.cause, task.cause
        assert task.result is None or not task.result.nodes     # nothing was read
    run_world(tmp_path, scenario)


# --- policy 40: the carrier's answer ------------------------------------------------------

async def _carrier(behaviour: str) -> tuple[web.AppRunner, str, list[dict]]:
    asked: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        asked.append(await request.json())
        if behaviour == "accept":
            return web.json_response({"decision": "accept"})
        if behaviour == "reject":
            return web.json_response({"decision": "reject"})
        if behaviour == "500":
            return web.json_response({"decision": "accept"}, status=500)
        if behaviour == "202":
            return web.json_response({"decision": "accept"}, status=202)
        if behaviour == "slow":
            await asyncio.sleep(3.0)
            return web.json_response({"decision": "accept"})
        if behaviour == "not json":
            return web.Response(text="accept")
        if behaviour == "other json":
            return web.json_response(["accept"])
        if behaviour == "redirect":                 # to an answer that would accept
            raise web.HTTPFound("/accept")
        raise AssertionError(behaviour)

    async def accept(request: web.Request) -> web.Response:
        return web.json_response({"decision": "accept"})

    app = web.Application()
    app.router.add_post("/policy", handler)
    app.router.add_route("*", "/accept", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/policy", asked


@pytest.mark.parametrize("behaviour,accept", [
    ("accept", True), ("reject", False), ("500", False), ("202", False), ("slow", False),
    ("not json", False), ("other json", False), ("redirect", False)])
def test_http_carrier_callback_accepts_only_a_200_accept(behaviour, accept):
    async def main() -> None:
        runner, url, asked = await _carrier(behaviour)
        try:
            cb = http_carrier_callback(url, timeout=0.5)
            record = Device(dev_id="IMEI:490154203237518", imei="490154203237518",
                            msisdn="+4917000000001")
            t0 = time.monotonic()
            d = await check_device_policy(40, record, "IMEI:356938035643809", task_id="t9",
                                          callback=cb)
            assert d.accept is accept, d.cause
            assert time.monotonic() - t0 < 2.5           # the timeout, not the carrier, ends it
            if behaviour == "slow":
                assert "TimeoutError" in d.cause
            assert asked == [{"task_id": "t9", "dev_id": "IMEI:490154203237518",
                              "msisdn": "+4917000000001", "imei_on_record": "490154203237518",
                              "reported_dev_id": "IMEI:356938035643809"}]
        finally:
            await runner.cleanup()
    asyncio.run(main())


@pytest.mark.parametrize("carrier", ["raises", "slow", "500", "none"])
def test_policy_40_end_to_end_a_broken_or_missing_carrier_refuses(tmp_path, carrier):
    async def scenario(w: World) -> None:
        runner = None
        if carrier == "raises":
            async def raising(record, reported, task_id):
                raise RuntimeError("carrier adapter bug")
            w.broker.sessions.carrier_callback = raising
        elif carrier in ("slow", "500"):
            runner, url, _asked = await _carrier(carrier)
            w.broker.sessions.carrier_callback = http_carrier_callback(url, timeout=0.5)
        else:
            assert w.broker.carrier_callback is None       # nothing configured: refused now
            with pytest.raises(InvalidRequest) as ei:
                await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                            msisdn=w.device(0).msisdn, accept_device_policy=40)
            assert ei.value.where == "acceptDevicePolicy"

            async def accepting(record, reported, task_id):
                return True
            # a task made while a callback was configured, answered after a restart without
            # one (the session is the second check)
            w.broker.sessions.carrier_callback = accepting
        try:
            dev = w.device(0)
            await w.register(dev, imei="490154203237518", dev_id="IMEI:490154203237518")
            tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                              msisdn=dev.msisdn, accept_device_policy=40)
            if carrier == "none":
                w.broker.sessions.carrier_callback = None
            task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
            assert task.state == S.FAILED, task.cause
            assert "acceptDevicePolicy 40" in task.cause
            want = {"raises": "RuntimeError", "slow": "TimeoutError", "500": "rejected",
                    "none": "no carrier callback configured"}[carrier]
            assert want in task.cause, task.cause
        finally:
            if runner is not None:
                await runner.cleanup()
    run_world(tmp_path, scenario)


def test_a_carrier_url_the_guard_refuses_is_a_refusal_without_a_request():
    """An outgoing-URL guard that refuses the carrier's address (loopback here): reject, and
    the carrier is never asked."""
    from dmengine.urlguard import UrlGuard

    async def main() -> None:
        runner, url, asked = await _carrier("accept")
        try:
            cb = http_carrier_callback(url, guard=UrlGuard())
            record = Device(dev_id="IMEI:490154203237518", imei="490154203237518")
            assert await cb(record, "IMEI:356938035643809", "t1") is False
            assert asked == []
            assert await http_carrier_callback(url)(record, "IMEI:356938035643809", "t1") is True
            assert len(asked) == 1
        finally:
            await runner.cleanup()
    asyncio.run(main())
