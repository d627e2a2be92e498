"""Issue 7 end to end: doOperation / doBootstrap through the real engine (LMDB store, device
port over HTTP, package 0 through a loopback gateway) against simulated devices."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import pathlib
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
import uvloop
from aiohttp import web

from dmengine import bootstrap
from dmengine.broker import BrokerConfig
from dmengine.engine import Engine, EngineConfig
from dmengine.errors import ServiceError
from dmengine.model import (Capability, Device, DiagOp, DmAccount, ExecOp, NodeChange, QueryOp,
                            SetOp, TaskState, UpdateOp)
from dmengine.notify.loopback import LoopbackGateway
from dmengine.simulator.device import DeviceProfile, FaultPlan, VirtualDevice
from dmengine.simulator.fleet import Fleet

S = TaskState
FIRMWARE = bytes((i * 7 + 3) & 0xFF for i in range(40_000))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class World:
    """One engine + one fleet of simulated devices wired through a loopback gateway."""

    def __init__(self, engine: Engine, fleet: Fleet, silent: set[str]) -> None:
        self.engine = engine
        self.fleet = fleet
        self.silent = silent          # MSISDNs whose phones are off (notification swallowed)

    @property
    def broker(self) -> Any:
        return self.engine.broker

    @property
    def store(self) -> Any:
        return self.engine.store

    def device(self, i: int) -> VirtualDevice:
        return self.fleet.devices[i]

    async def register(self, dev: VirtualDevice, *, imei: str | None = "same",
                       dev_id: str | None = None, capability: str | None = "cap-ex100",
                       msisdn: str | None = "same") -> Device:
        rec = Device(
            dev_id=dev_id or dev.dev_id,
            imei=dev.dev_id.split(":", 1)[1] if imei == "same" else imei,
            msisdn=dev.msisdn if msisdn == "same" else msisdn,
            capability=capability,
            account=DmAccount(server_id="dmengine", client_name=dev.username,
                              client_password=dev.client_secret,
                              server_password=dev.server_secret,
                              client_nonce=b64(dev.client_nonce) if dev.client_nonce else None,
                              server_nonce=b64(dev.server_nonce) if dev.server_nonce else None))
        return await self.store.create_device(rec)

    async def wait_state(self, task_id: str, states: set[TaskState], timeout: float = 15.0) -> Any:
        end = asyncio.get_running_loop().time() + timeout
        while True:
            task = await self.store.get_task(task_id)
            if task.state in states:
                return task
            if asyncio.get_running_loop().time() > end:
                history = await self.broker.get_task_history(task_id)
                raise AssertionError(f"task {task_id} stuck in {task.state}: "
                                     f"{[(h.to_state, h.cause) for h in history]}")
            await asyncio.sleep(0.02)


def run_world(tmp_path: pathlib.Path, scenario: Callable[[World], Awaitable[None]], *,
              profile: DeviceProfile | None = None, n: int = 4,
              broker: BrokerConfig | None = None, faults: dict[int, FaultPlan] | None = None,
              carrier_callback_url: str | None = None,
              bootstrap_receiver: Any = None) -> None:
    async def main() -> None:
        prof = profile or DeviceProfile()
        fleet = Fleet(prof, n, seed=7)
        for i, plan in (faults or {}).items():
            fleet.devices[i].faults = plan
        silent: set[str] = set()

        async def on_pkg0(msisdn: str, pkg0: bytes) -> object:
            if msisdn in silent:
                return True                     # accepted by the SMSC, the phone is off
            return await fleet.on_pkg0(msisdn, pkg0)

        world_ref: list[World] = []

        async def on_bootstrap(msisdn: str, body: bytes, ctype: str) -> object:
            return await bootstrap_receiver(world_ref[0], msisdn, body, ctype)

        gateway = LoopbackGateway(on_pkg0,
                                  bootstrap_callback=on_bootstrap if bootstrap_receiver else None)
        bcfg = broker or BrokerConfig(retry_delays=(0.3,), tick_interval=0.05)
        engine = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                                     broker=bcfg, carrier_callback_url=carrier_callback_url),
                        gateway=gateway)
        await engine.start()
        prof.server_url = engine.device_url
        world = World(engine, fleet, silent)
        world_ref.append(world)
        await world.store.create_capability(Capability(
            oid="cap-ex100", make="Acme", model="EX100", firmware_versions=["2.3.9", "2.4.0"],
            mo_paths={"fumo": "./FUMO/1", "diag": "./Diag/Battery,./Diag/Signal,"
                                                  "./Diag/Network/Operator"}))
        try:
            await scenario(world)
        finally:
            await fleet.wait_idle(timeout=10)
            fleet.close()
            await engine.stop()

    uvloop.run(main())


async def upload_firmware(world: World, *, from_version: str = "2.3.9") -> str:
    async def chunks():
        for i in range(0, len(FIRMWARE), 8192):
            yield FIRMWARE[i:i + 8192]
    rec = await world.engine.content.ingest(chunks(), name="ex100-2.4.0.bin",
                                            sha256=hashlib.sha256(FIRMWARE).hexdigest(),
                                            capability="cap-ex100", from_version=from_version,
                                            to_version="2.4.0")
    return rec.content_id


# --- each operation ------------------------------------------------------------------------


def test_query_reads_node_values(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod", "./DevDetail/FwV"]),
                                          msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert task.result.nodes == {"./DevInfo/Mod": "EX100", "./DevDetail/FwV": "2.3.9"}
        data = await w.broker.get_task_by_id(tid)
        assert data.status == "SUCCEEDED" and data.operation == "QUERY"
        states = [h.to_state for h in await w.broker.get_task_history(tid)]
        assert states == [S.PENDING, S.NOTIFIED, S.IN_PROGRESS, S.SUCCEEDED]
    run_world(tmp_path, scenario)


def test_set_changes_the_device_tree(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(1)
        await w.register(dev)
        tid = await w.broker.do_operation(SetOp(changes=[
            NodeChange(uri="./DMAcc/1/Name", value="Carrier DM")]), imei=dev.dev_id[5:])
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert dev.value("./DMAcc/1/Name") == "Carrier DM"
        assert task.result.statuses == {"Replace ./DMAcc/1/Name": 200}
    run_world(tmp_path, scenario)


def test_set_on_missing_node_fails_with_the_dm_status(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        tid = await w.broker.do_operation(SetOp(changes=[
            NodeChange(uri="./Nope/Here", value="x")]), dev_id=dev.dev_id)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.FAILED
        assert "404" in task.cause
        hist = await w.broker.get_task_history(tid)
        assert hist[-1].dm_status == 404
    run_world(tmp_path, scenario)


def test_exec_and_diag(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(2)
        await w.register(dev)
        exec_tid = await w.broker.do_operation(ExecOp(uri="./Diag/Ping"), msisdn=dev.msisdn)
        diag_tid = await w.broker.do_operation(DiagOp(), msisdn=dev.msisdn)
        t1 = await w.wait_state(exec_tid, {S.SUCCEEDED, S.FAILED})
        t2 = await w.wait_state(diag_tid, {S.SUCCEEDED, S.FAILED})
        assert t1.state == S.SUCCEEDED, t1.cause
        assert t2.state == S.SUCCEEDED, t2.cause
        # DIAG reads the diagnostics nodes the capability names.
        assert t2.result.nodes == {"./Diag/Battery": "87", "./Diag/Signal": "-71",
                                   "./Diag/Network/Operator": "Acme Mobile"}
    run_world(tmp_path, scenario)


def test_update_downloads_from_the_device_port_and_waits_for_1226(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        await w.store.update_device(dev.dev_id, {"devdetail": {"./DevDetail/FwV": "2.3.9"}})
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert task.result.fumo_result == 200
        assert dev.fwv != "2.3.9"                       # the device installed it
        assert w.fleet.stats.download_bytes == len(FIRMWARE)
        content = await w.store.get_content(cid)
        assert content.downloads == 1
        hist = await w.broker.get_task_history(tid)
        assert hist[-1].result_code == 200
        assert any("waiting for the result alert" in (h.cause or "") for h in hist)
        # success of a real (not test) task leaves a charging event (in the charging log;
        # queued for delivery too while someone subscribes: tests/test_webhooks.py)
        logged = (await w.store.charging_events()).items
        assert [e.task_id for e in logged] == [tid]
    run_world(tmp_path, scenario)


def test_update_result_in_a_later_session_and_test_cycle_has_no_charging(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(3)
        await w.register(dev)
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn,
                                          test_cycle=True)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED and task.test_cycle
        due = await w.store.due_entries(10 ** 12)
        assert not [e for e in due if e.kind == "charging"]
        assert (await w.store.charging_events()).items == []
    run_world(tmp_path, scenario, profile=DeviceProfile(report_in_same_session=False))


@pytest.mark.parametrize("code", [410, 402, 503])
def test_fumo_failure_codes_fail_the_task(tmp_path, code):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.FAILED
        assert task.result.fumo_result == code
        assert str(code) in task.cause
        assert (await w.broker.get_task_history(tid))[-1].result_code == code
    run_world(tmp_path, scenario, faults={0: FaultPlan(fail_update=code)})


def test_update_refuses_content_for_another_firmware(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        await w.store.update_device(dev.dev_id, {"devdetail": {"./DevDetail/FwV": "1.0"}})
        cid = await upload_firmware(w, from_version="2.3.9")
        with pytest.raises(ServiceError) as ei:
            await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        assert ei.value.where == "operation.from_version"
        assert "updates from firmware '2.3.9'" in str(ei.value)
    run_world(tmp_path, scenario)


def test_update_picks_the_package_by_capability_and_learned_firmware(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        with pytest.raises(ServiceError) as ei:       # firmware not known yet
            await w.broker.do_operation(UpdateOp(), msisdn=dev.msisdn)
        assert ei.value.where == "operation.content_id"
        other = await upload_firmware(w, from_version="1.0")     # does not fit 2.3.9
        fits = await upload_firmware(w, from_version="2.3.9")
        assert other != fits
        # a DIAG/QUERY teaches the engine the firmware version (DevDetail snapshot)
        q = await w.broker.do_operation(QueryOp(nodes=["./DevDetail/FwV"]), msisdn=dev.msisdn)
        await w.wait_state(q, {S.SUCCEEDED})
        assert (await w.store.get_device(dev.dev_id)).devdetail["./DevDetail/FwV"] == "2.3.9"
        tid = await w.broker.do_operation(UpdateOp(), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert (await w.store.get_content(fits)).downloads == 1
        assert (await w.store.get_content(other)).downloads == 0
        # the old version is stale after the update: not kept in the snapshot
        assert "./DevDetail/FwV" not in (await w.store.get_device(dev.dev_id)).devdetail
    run_world(tmp_path, scenario)


# --- device that never connects, retries, expiry ------------------------------------------


def test_device_never_connects_retries_then_expires(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        w.silent.add(dev.msisdn)
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.EXPIRED, S.SUCCEEDED, S.FAILED})
        assert task.state == S.EXPIRED
        assert task.attempts == 3
        causes = [h.cause for h in await w.broker.get_task_history(tid)]
        assert sum("sent via loopback" in (c or "") for c in causes) == 3
        # the third one (resync_after=2) is signed with the re-synchronisation nonce
        assert sum("package #0 (nonce re-synchronisation)" in (c or "") for c in causes) == 1
        assert "did not connect after 3 notifications" in causes[-1]
    run_world(tmp_path, scenario,
              broker=BrokerConfig(retry_delays=(0.2,), max_notifications=3, tick_interval=0.05))


def test_deadline_expires_a_task(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        w.silent.add(dev.msisdn)
        loop = asyncio.get_running_loop()
        import time
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn,
                                          deadline=time.time() + 0.3)
        task = await w.wait_state(tid, {S.EXPIRED})
        assert "deadline" in task.cause
        assert loop is asyncio.get_running_loop()
    run_world(tmp_path, scenario,
              broker=BrokerConfig(retry_delays=(60.0,), tick_interval=0.05))


def test_device_initiated_session_picks_up_pending_task(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(1)
        await w.register(dev, msisdn=None)            # nothing to wake it with
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevDetail/HwV"]), dev_id=dev.dev_id)
        task = await w.store.get_task(tid)
        assert task.state == S.PENDING and "no MSISDN" in task.cause
        report = await w.fleet.run_session(dev)       # the phone polls on its own (Alert 1201)
        assert report.outcome == "completed", report
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED and task.result.nodes == {"./DevDetail/HwV": "1.0"}
        device = await w.store.get_device(dev.dev_id)
        assert device.last_contact and device.devinfo["./DevInfo/Mod"] == "EX100"
    run_world(tmp_path, scenario)


# --- acceptDevicePolicy ---------------------------------------------------------------------


@pytest.mark.parametrize("policy,record_imei,accept", [
    (10, "35693803" + "9999999", True),      # same TAC as the phone that answers
    (10, "49015420" + "3237518", False),     # other TAC
    (20, None, True),                        # no IMEI on record
    (20, "35693803" + "9999999", False),     # an IMEI on record that differs
    (30, "49015420" + "3237518", True),      # anything goes
])
def test_accept_device_policy(tmp_path, policy, record_imei, accept):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        # The record is under another DevId (the phone was replaced); same MSISDN and account.
        rec_id = f"IMEI:{record_imei}" if record_imei else "MSISDN-4479000000"
        await w.register(dev, imei=record_imei, dev_id=rec_id)
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn,
                                          accept_device_policy=policy)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        if accept:
            assert task.state == S.SUCCEEDED, task.cause
        else:
            assert task.state == S.FAILED
            assert f"acceptDevicePolicy {policy}" in task.cause
    run_world(tmp_path, scenario)


@pytest.mark.parametrize("decision", ["accept", "reject"])
def test_accept_device_policy_40_asks_the_carrier(tmp_path, decision):
    asked: list[dict] = []

    async def main_with_carrier() -> None:
        async def handler(request: web.Request) -> web.Response:
            asked.append(await request.json())
            return web.json_response({"decision": decision})
        app = web.Application()
        app.router.add_post("/policy", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    async def scenario(w: World) -> None:
        runner, port = await main_with_carrier()
        from dmengine.devices import http_carrier_callback
        w.broker.carrier_callback = http_carrier_callback(f"http://127.0.0.1:{port}/policy")
        try:
            dev = w.device(0)
            await w.register(dev, imei="490154203237518", dev_id="IMEI:490154203237518")
            tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]),
                                              msisdn=dev.msisdn, accept_device_policy=40)
            task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
            assert task.state == (S.SUCCEEDED if decision == "accept" else S.FAILED), task.cause
            assert asked and asked[0]["reported_dev_id"] == dev.dev_id
            assert asked[0]["imei_on_record"] == "490154203237518"
        finally:
            await runner.cleanup()
    run_world(tmp_path, scenario)


# --- opt-in ---------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,state,cause", [
    ("accept", S.SUCCEEDED, "all commands succeeded"),
    ("decline", S.FAILED, "declined by the user"),
    ("timeout", S.EXPIRED, "did not answer"),
    ("cancel", S.FAILED, "cancelled by the user"),
])
def test_opt_in(tmp_path, answer, state, cause):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Man"]), msisdn=dev.msisdn,
                                          b_optin=True)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED, S.EXPIRED})
        assert task.state == state
        assert cause in task.cause
        states = [h.to_state for h in await w.broker.get_task_history(tid)]
        assert S.WAITING_USER in states
    run_world(tmp_path, scenario, profile=DeviceProfile(ui_answer=answer))


# --- cancel ---------------------------------------------------------------------------------


def test_task_cancelled_mid_session_keeps_cancelled(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        broker = w.broker
        original = broker.on_events
        cancelled: list[str] = []

        async def on_events(session, events):       # cancel as soon as the device is in session
            await original(session, events)
            for work in list(broker.sessions.works.values()):
                for task_id in list(work.runs):
                    if task_id not in cancelled:
                        cancelled.append(task_id)
                        await broker.cancel_task(task_id)
        broker.on_events = on_events                  # the server calls handler.on_events
        tid = await broker.do_operation(QueryOp(nodes=["./DevInfo/Man"]), msisdn=dev.msisdn)
        await w.fleet.wait_idle(timeout=10)
        task = await w.store.get_task(tid)
        assert cancelled == [tid]
        assert task.state == S.CANCELLED
        with pytest.raises(ServiceError):
            await broker.cancel_task(tid)              # already final
    run_world(tmp_path, scenario)


# --- bootstrap ------------------------------------------------------------------------------


def test_bootstrap_then_first_session_with_the_new_account(tmp_path):
    received: list[tuple[str, str]] = []

    async def device_side(w: World, msisdn: str, body: bytes, ctype: str) -> object:
        dev = w.fleet.by_msisdn[msisdn]
        msg = bootstrap.verify(body, ctype, dev.dev_id.split(":")[1].encode())  # NETWORKID = IMEI
        values = {c.items[0].target: c.items[0].data for c in msg.commands}
        base = "./DMAcc/dmengine/AppAuth"
        dev.username = values[f"{base}/1/AAuthName"]
        dev.client_secret = values[f"{base}/1/AAuthSecret"]
        dev.server_secret = values[f"{base}/2/AAuthSecret"]
        raw = lambda v: v.encode() if isinstance(v, str) else v   # noqa: E731 (OPAQUE → str if UTF-8)
        dev.client_nonce = raw(values[f"{base}/1/AAuthData"])
        dev.server_nonce = raw(values[f"{base}/2/AAuthData"])
        received.append((dev.username, ctype))
        w.fleet.spawn(w.fleet.run_session(dev))      # the client opens a session to the new server
        return True

    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        old_secret = dev.client_secret
        tid = await w.broker.do_bootstrap(msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert received and "SEC=NETWORKID; MAC=" in received[0][1]
        record = await w.store.get_device(dev.dev_id)
        assert record.account.client_name == dev.username
        assert record.account.client_password == dev.client_secret != old_secret
        # an old credential no longer works: the device record only knows the new account
        assert (await w.broker.account_for(dev.dev_id, "dev0")) is None
        # the same through the API (doBootstrap), USERPIN without a PIN is refused by field
        hdrs = {"X-API-Key": w.engine.api_key}
        async with aiohttp.ClientSession() as http:
            async with http.post(w.engine.api_url + "v1/bootstrap", headers=hdrs, json={
                    "target": {"msisdn": dev.msisdn}, "security": "USERPIN"}) as r:
                body = await r.json()
                assert r.status == 400 and body["where"] == "security"
            async with http.post(w.engine.api_url + "v1/bootstrap", headers=hdrs, json={
                    "target": {"msisdn": dev.msisdn}}) as r:
                assert r.status == 201
                tid2 = (await r.json())["taskId"]
        task2 = await w.wait_state(tid2, {S.SUCCEEDED, S.FAILED})
        assert task2.state == S.SUCCEEDED, task2.cause
        assert len(received) == 2
    run_world(tmp_path, scenario, bootstrap_receiver=device_side)


def test_bootstrap_with_a_wrong_key_is_refused_by_the_device(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        body, ctype = bootstrap.secure(bootstrap.build_message(bootstrap.BootstrapAccount(
            server_id="evil", server_url="http://x/dm", client_name="a", client_password="b",
            client_nonce=b"1", server_password="c", server_nonce=b"2"), dev.dev_id),
            "NETWORKID", b"not-the-imei")
        with pytest.raises(Exception) as ei:
            bootstrap.verify(body, ctype, dev.dev_id.split(":")[1].encode())
        assert "MAC" in str(ei.value)
    run_world(tmp_path, scenario)


# --- the API port -------------------------------------------------------------------------


def test_api_do_operation_and_get_task(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        url = w.engine.api_url
        hdrs = {"X-API-Key": w.engine.api_key}
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "v1/operations", json={
                    "target": {"msisdn": dev.msisdn},
                    "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Lang"]}}) as r:
                assert r.status == 401                 # no key
            async with http.post(url + "v1/operations", headers=hdrs, json={
                    "target": {"msisdn": dev.msisdn},
                    "operation": {"operation": "QUERY", "nodes": [1]}}) as r:
                body = await r.json()
                assert r.status == 400 and body["where"] == "$.operation.nodes[0]"
            async with http.post(url + "v1/operations", headers=hdrs, json={
                    "target": {"msisdn": "+1000"},
                    "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Lang"]}}) as r:
                body = await r.json()
                assert r.status == 404 and body["where"] == "target.msisdn"
            async with http.post(url + "v1/operations", headers=hdrs, json={
                    "target": {"msisdn": dev.msisdn}, "bOptin": False,
                    "operation": {"operation": "QUERY", "nodes": ["./DevInfo/Lang"]}}) as r:
                assert r.status == 201
                tid = (await r.json())["taskId"]
            await w.wait_state(tid, {S.SUCCEEDED})
            async with http.get(url + f"v1/tasks/{tid}", headers=hdrs) as r:
                data = await r.json()
                assert data["status"] == "SUCCEEDED"
                assert data["result"]["nodes"] == {"./DevInfo/Lang": "en-US"}
            async with http.get(url + f"v1/devices/{dev.dev_id}", headers=hdrs) as r:
                data = await r.json()
                assert data["account"]["clientPassword"] == "***"    # secrets never shown
            async with http.get(url + "metrics") as r:
                text = await r.text()
                assert "dmengine_device_messages_received_total" in text
    run_world(tmp_path, scenario)


def test_set_add_replace_delete_and_exec_with_data(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        tid = await w.broker.do_operation(SetOp(changes=[
            NodeChange(uri="./DMAcc/1/Ext", action="Add", format="node"),
            NodeChange(uri="./DMAcc/1/Ext/Note", action="Add", value="hello"),
            NodeChange(uri="./DMAcc/1/Name", action="Replace", value="X"),
        ]), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert dev.value("./DMAcc/1/Ext/Note") == "hello"
        tid = await w.broker.do_operation(SetOp(changes=[
            NodeChange(uri="./DMAcc/1/Ext/Note", action="Delete")]), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        assert dev.node("./DMAcc/1/Ext/Note") is None
        tid = await w.broker.do_operation(ExecOp(uri="./Diag/Ping", data="8.8.8.8"),
                                          msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.state == S.SUCCEEDED and task.result.statuses == {"Exec ./Diag/Ping": 200}
    run_world(tmp_path, scenario)


def test_update_download_then_update_capability(tmp_path):
    async def scenario(w: World) -> None:
        from dmengine.model import FumoMode
        await w.store.update_capability("cap-ex100",
                                        {"fumo_mode": FumoMode.DOWNLOAD_THEN_UPDATE})
        dev = w.device(0)
        await w.register(dev)
        cid = await upload_firmware(w)
        tid = await w.broker.do_operation(UpdateOp(content_id=cid), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED}, timeout=20)
        assert task.state == S.SUCCEEDED, task.cause
        causes = [h.cause for h in await w.broker.get_task_history(tid)]
        assert any("download complete; installing" in (c or "") for c in causes), causes
        assert task.correlator == f"{tid}.u"          # the Update's own correlator
        assert dev.fwv != "2.3.9"
        assert task.result.statuses.get("Replace ./FUMO/1/Download/PkgURL") == 200
    run_world(tmp_path, scenario)


def test_gateway_failure_is_retried_by_the_scheduler(tmp_path):
    async def scenario(w: World) -> None:
        from dmengine.errors import GatewayError
        from dmengine.notify.base import RetryPolicy
        dev = w.device(0)
        await w.register(dev)
        gw = w.engine.gateway
        gw.retry = RetryPolicy(attempts=2, base_delay=0.01)
        real = gw.callback
        calls: list[str] = []

        async def flaky(msisdn: str, pkg0: bytes) -> object:
            calls.append(msisdn)
            if len(calls) <= 2:                        # the SMSC is down for the first send
                raise GatewayError("SMSC down", retryable=True)
            return await real(msisdn, pkg0)
        gw.callback = flaky
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED, S.EXPIRED})
        assert task.state == S.SUCCEEDED, task.cause
        causes = [h.cause for h in await w.broker.get_task_history(tid)]
        assert any("notification failed, will retry" in (c or "") for c in causes), causes
        assert len(calls) == 3
        assert w.engine.task_metrics.notifications == {"failed": 1, "sent": 1}
    run_world(tmp_path, scenario)


def test_non_retryable_gateway_refusal_fails_the_task(tmp_path):
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev, msisdn="+4915199999999")     # no phone with that number
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), dev_id=dev.dev_id)
        task = await w.wait_state(tid, {S.FAILED})
        assert "notification refused" in task.cause
    run_world(tmp_path, scenario)


async def _query_after_factory_reset(w: World) -> tuple[VirtualDevice, Any]:
    """Device 0 forgets the nonces its record holds; a QUERY for it runs to a final state."""
    dev = w.device(0)
    await w.register(dev)
    dev.client_nonce, dev.server_nonce = b"forgotten-client", b"forgotten-server"
    tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=dev.msisdn)
    return dev, await w.wait_state(tid, {S.SUCCEEDED, S.EXPIRED, S.FAILED})


def test_device_that_lost_its_nonces_is_resynchronised(tmp_path):
    # a device that forgot its nonces (a factory reset) drops our package #0 as forged; after
    # resync_after notifications package #0 is signed with the well-known nonce, the device
    # opens its session with it, and the session hands out fresh nonces (PROTOCOL.md §8.2)
    from dmengine import auth

    async def scenario(w: World) -> None:
        dev, task = await _query_after_factory_reset(w)
        tid = task.task_id
        assert task.state == S.SUCCEEDED, task.cause
        causes = [h.cause or "" for h in await w.broker.get_task_history(tid)]
        sent = [c for c in causes if "sent via loopback" in c]
        assert len(sent) == 3 and "re-synchronisation" in sent[2]
        assert not any("re-synchronisation" in c for c in sent[:2])
        assert w.fleet.stats.outcomes["pkg0_rejected"] == 2
        rec = await w.store.get_device(dev.dev_id)
        assert rec.account.resync_until is None
        assert dev.client_nonce not in auth.RESYNC_NONCES            # the session's fresh one
        assert base64.b64decode(rec.account.client_nonce) == dev.client_nonce
        # in step again: the next task needs one plain package #0
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevDetail/FwV"]), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.EXPIRED, S.FAILED})
        assert task.state == S.SUCCEEDED, task.cause
        causes = [h.cause or "" for h in await w.broker.get_task_history(tid)]
        assert [c for c in causes if "sent via loopback" in c][0].startswith("package #0 sent")
        assert not any("re-synchronisation" in c for c in causes)
    run_world(tmp_path, scenario, broker=BrokerConfig(retry_delays=(0.2,), tick_interval=0.05))


def test_device_without_resync_support_still_expires(tmp_path):
    async def scenario(w: World) -> None:
        dev, task = await _query_after_factory_reset(w)
        assert task.state == S.EXPIRED and w.fleet.stats.outcomes["pkg0_rejected"] == 3
        rec = await w.store.get_device(dev.dev_id)
        assert rec.account.resync_until is not None       # it would have been let in
    run_world(tmp_path, scenario, profile=DeviceProfile(resync=False),
              broker=BrokerConfig(retry_delays=(0.2,), max_notifications=3, tick_interval=0.05))


def test_query_reports_a_status_per_node_and_a_generic_exec_its_own_outcome(tmp_path):
    """Issue 14's fixes: a QUERY of two nodes has a DM status for each (one Get each), and
    an EXEC the device answers 202 then reports by Generic Alert is the Exec's outcome (not
    "firmware updated", and the device's firmware snapshot is kept)."""
    async def scenario(w: World) -> None:
        dev = w.device(0)
        await w.register(dev)
        tid = await w.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod", "./DevInfo/Nope"]),
                                          msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED})
        assert task.result.statuses == {"Get ./DevInfo/Mod": 200, "Get ./DevInfo/Nope": 404}
        assert task.state == S.FAILED and "./DevInfo/Nope" in task.cause
        await w.store.update_device(dev.dev_id, {"devdetail": {"./DevDetail/FwV": "2.3.9"}})
        tid = await w.broker.do_operation(ExecOp(uri="./FUMO/1/Update"), msisdn=dev.msisdn)
        task = await w.wait_state(tid, {S.SUCCEEDED, S.FAILED}, timeout=20)
        history = [(h.to_state, h.cause) for h in await w.broker.get_task_history(tid)]
        assert task.result.statuses == {"Exec ./FUMO/1/Update": 202}, history
        # (the simulated device has no package to install: its alert reports 410)
        assert task.state == S.FAILED and task.cause.startswith("Exec failed: result 410"), history
        assert any("waiting for the result alert" in (c or "") for _, c in history), history
        assert task.result.fumo_result == 410
        device = await w.store.get_device(dev.dev_id)
        assert device.devdetail.get("./DevDetail/FwV") == "2.3.9"
    run_world(tmp_path, scenario)
