"""Issue 13, engine: the scheduler loop survives a task it cannot notify (item 8) and a
bootstrap keeps the device's account until the device uses the new one (item 10).  Driven
through the real engine (LMDB store, device port over raw HTTP, API over HTTP)."""
from __future__ import annotations

import asyncio
import base64
import time

import aiohttp
import msgspec

from dmengine.broker import BrokerConfig
from dmengine.engine import Engine
from dmengine.model import Device, QueryOp, TaskState
from dmengine.notify.loopback import LoopbackGateway

from test_security_devport import (CLIENT_NONCE, VICTIM, account, alert, cred_md5, devinfo,
                                   message, post, run_engine, status_of_synchdr)

S = TaskState
PASSWORD = "pw-" + "x" * 12


# --- 8. the scheduler loop ------------------------------------------------------------------


def test_a_task_that_cannot_be_notified_fails_alone_and_the_loop_goes_on(tmp_path):
    """A server id longer than package #0 allows made build_pkg0 raise outside any try: the
    loop ended, nothing was notified again, and /health still said ok."""
    sent: list[str] = []

    async def on_pkg0(msisdn: str, pkg0: bytes) -> object:
        sent.append(msisdn)
        return True

    async def scenario(engine: Engine) -> None:
        store = engine.store
        bad = msgspec.structs.replace(account("bad"), server_id="s" * 256)
        await store.create_device(Device(dev_id="IMEI:111111111111111", msisdn="+15550011",
                                         account=bad))
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        broker = engine.broker
        bad_task = await broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                             dev_id="IMEI:111111111111111", notify=False)
        good_task = await broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), dev_id=VICTIM,
                                              notify=False)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            bad_state = (await store.get_task(bad_task)).state
            good_state = (await store.get_task(good_task)).state
            # (NOTIFIED is written before the send: wait for the send too)
            if bad_state == S.FAILED and good_state == S.NOTIFIED and sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)                 # a send to the bad device would come now
        bad_rec = await store.get_task(bad_task)
        assert bad_rec.state == S.FAILED and "package #0" in bad_rec.cause
        assert (await store.get_task(good_task)).state == S.NOTIFIED
        assert sent == ["+15550001"]
        async with aiohttp.ClientSession() as http:
            async with http.get(engine.api_url + "health") as r:
                assert r.status == 200, await r.text()

    run_engine(tmp_path, scenario, gateway=LoopbackGateway(on_pkg0),
               broker=BrokerConfig(tick_interval=0.05))


def test_health_reports_a_scheduler_that_keeps_failing(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        real = store.claim_due

        async def broken(now: float, *args: object, **kw: object) -> list:
            raise RuntimeError("index corrupted")
        store.claim_due = broken          # every pass fails, on a fault the loop never saw
        try:
            async with aiohttp.ClientSession() as http:
                status, body = 200, ""
                for _ in range(100):
                    async with http.get(engine.api_url + "health") as r:
                        status, body = r.status, await r.text()
                    if status == 503:
                        break
                    await asyncio.sleep(0.05)
                assert status == 503 and "index corrupted" in body and "scheduler" in body
                store.claim_due = real    # the fault goes away: so does the alarm
                for _ in range(100):
                    async with http.get(engine.api_url + "health") as r:
                        status = r.status
                    if status == 200:
                        break
                    await asyncio.sleep(0.05)
                assert status == 200
        finally:
            store.claim_due = real

    run_engine(tmp_path, scenario, broker=BrokerConfig(tick_interval=0.02))


# --- 10. a bootstrap keeps the old account until the new one is used ------------------------


def test_failed_bootstrap_does_not_lock_the_device_out(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        async with aiohttp.ClientSession() as http:
            async with http.post(engine.api_url + "v1/bootstrap",
                                 headers={"X-API-Key": engine.api_key},
                                 json={"target": {"devId": VICTIM}}) as r:
                assert r.status == 201, await r.text()
                tid = (await r.json())["taskId"]
        task = await store.get_task(tid)
        assert task.state == S.FAILED                 # the gateway refused the delivery
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim",
            cred=cred_md5("victim", PASSWORD, CLIENT_NONCE)))
        assert status == 200 and status_of_synchdr(reply) == "212", reply

    async def refuse(msisdn: str, body: bytes, ctype: str) -> object:
        return False                                  # the SMSC does not know the number

    async def no_pkg0(msisdn: str, pkg0: bytes) -> object:
        return True

    run_engine(tmp_path, scenario,
               gateway=LoopbackGateway(no_pkg0, bootstrap_callback=refuse))


def test_bootstrapped_account_takes_over_when_the_device_uses_it(tmp_path):
    async def scenario(engine: Engine) -> None:
        store = engine.store
        await store.create_device(Device(dev_id=VICTIM, msisdn="+15550001",
                                         account=account("victim")))
        tid = await engine.broker.do_bootstrap(dev_id=VICTIM)
        device = await store.get_device(VICTIM)
        new = device.pending_account
        assert new is not None and device.account.client_name == "victim"
        # the old account still works meanwhile (the bootstrap may not have arrived)
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim", session_id="A1",
            cred=cred_md5("victim", PASSWORD, CLIENT_NONCE)))
        assert status_of_synchdr(reply) == "212", reply
        assert (await store.get_task(tid)).state != S.SUCCEEDED
        # the device uses the bootstrapped account: it becomes the account
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name=new.client_name, session_id="A2",
            cred=cred_md5(new.client_name, new.client_password,
                          base64.b64decode(new.client_nonce))))
        assert status_of_synchdr(reply) == "212", reply
        for _ in range(100):
            device = await store.get_device(VICTIM)
            if device.pending_account is None:
                break
            await asyncio.sleep(0.02)
        assert device.pending_account is None
        assert device.account.client_name == new.client_name
        assert (await store.get_task(tid)).state == S.SUCCEEDED
        # and the old one no longer opens a session
        status, reply = await post(engine.device_url, message(
            VICTIM, alert(1, 1201) + devinfo(2, VICTIM), name="victim", session_id="A3",
            cred=cred_md5("victim", PASSWORD, CLIENT_NONCE)))
        assert status_of_synchdr(reply) == "401", reply

    async def accept(msisdn: str, body: bytes, ctype: str) -> object:
        return True

    async def no_pkg0(msisdn: str, pkg0: bytes) -> object:
        return True

    run_engine(tmp_path, scenario,
               gateway=LoopbackGateway(no_pkg0, bootstrap_callback=accept))
