"""``/ready`` over real HTTP: 200 when the engine should get work, 503 naming each cause that
it should not — a closed store, a dead writer thread, an unreachable package-0 gateway, a
server draining for its shutdown.  ``/health`` stays liveness."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from typing import Any, AsyncIterator

import aiohttp
import lmdb
import pytest
import uvloop

from dmengine.engine import Engine, EngineConfig
from dmengine.model import Device, DmAccount, QueryOp
from dmengine.notify.http import HttpCallbackGateway
from dmengine.notify.loopback import LoopbackGateway
from dmengine.simulator.device import DeviceProfile
from dmengine.simulator.fleet import FaultShares, Fleet
from dmengine.store.lmdb import LmdbStore
from dmengine.wsi import system

CHECKS = {"store": "ok", "writer": "ok", "gateway": "ok", "draining": "ok"}


@contextlib.asynccontextmanager
async def engine(tmp_path: Any, *, store: Any = None, gateway: Any = None,
                 **cfg: Any) -> AsyncIterator[Engine]:
    e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0, **cfg),
               store=store, gateway=gateway)
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


async def get(url: str) -> tuple[int, Any]:
    """No key: /ready is public like /health."""
    async with aiohttp.ClientSession() as http, http.get(url) as r:
        return r.status, await r.json()


def assert_not_ready(status: int, body: Any, where: str) -> None:
    assert status == 503, body
    assert set(body) == {"error", "message", "where"}, body
    assert body["error"] == "not_ready" and body["where"] == where, body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_when_all_is_well_and_documented_public(tmp_path):
    async def main() -> None:
        async with engine(tmp_path, gateway=LoopbackGateway(lambda m, p: True)) as e:
            assert await get(e.api_url + "ready") == (200, {"status": "ready", "checks": CHECKS})
            assert ("ready", e.api_url + "ready") in e.urls()
            status, doc = await get(e.api_url + "openapi.json")
            op = doc["paths"]["/ready"]["get"]
            assert op["operationId"] == "ready" and op["security"] == []
            assert set(op["responses"]) >= {"200", "503"}
    uvloop.run(main())


def test_not_ready_when_the_store_is_closed(tmp_path):
    async def main() -> None:
        async with engine(tmp_path) as e:
            assert e.broker is not None and e.store is not None
            await e.broker.stop()                  # nobody else touches the store meanwhile
            await e.store.close()
            status, body = await get(e.api_url + "ready")
            assert_not_ready(status, body, "store")
            assert "closed" in body["message"]
    uvloop.run(main())


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_not_ready_when_the_writer_died(tmp_path):
    """The fault where a real one surfaces: an lmdb.Error out of the writer's periodic
    stale-reader sweep (outside the per-batch error handling) ends the writer thread."""
    async def main() -> None:
        store = LmdbStore(tmp_path / "store", reader_check_interval=0.05)
        async with engine(tmp_path, store=store) as e:
            assert (await get(e.api_url + "ready"))[0] == 200

            def sweep_fails() -> int:
                raise lmdb.Error("injected: mdb_reader_check: Input/output error")
            store.reader_check = sweep_fails           # type: ignore[method-assign]
            for _ in range(200):
                if not store._thread.is_alive():
                    break
                await asyncio.sleep(0.01)
            status, body = await get(e.api_url + "ready")
            assert_not_ready(status, body, "writer")
            assert body["message"].startswith("writer: store writer thread died")
    uvloop.run(main())


def test_not_ready_while_the_gateway_is_unreachable(tmp_path, monkeypatch):
    """A package-0 gateway on a port nobody listens on: 503 naming the gateway (its address
    only: a gateway URL may carry credentials in its query); the check is reused for
    GATEWAY_CHECK_TTL, then the gateway, now listening, makes the engine ready."""
    monkeypatch.setattr(system, "GATEWAY_CHECK_TTL", 0.5)
    port = closed_port()

    async def main() -> None:
        gw = HttpCallbackGateway(f"http://127.0.0.1:{port}/push?password=hunter2")
        async with engine(tmp_path, gateway=gw, allow_private_callbacks=True) as e:
            status, body = await get(e.api_url + "ready")
            assert_not_ready(status, body, "gateway")
            assert f"gateway http://127.0.0.1:{port} unreachable" in body["message"]
            assert "hunter2" not in body["message"] and "/push" not in body["message"]
            server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", port)
            try:
                status, body = await get(e.api_url + "ready")    # still the cached answer
                assert_not_ready(status, body, "gateway")
                await asyncio.sleep(0.6)
                assert await get(e.api_url + "ready") == (200, {"status": "ready",
                                                                "checks": CHECKS})
            finally:
                server.close()
                await server.wait_closed()
            # /health is liveness: a gateway down does not make the process dead
            assert (await get(e.api_url + "health"))[0] == 200
    uvloop.run(main())


def test_not_ready_while_draining_for_a_shutdown(tmp_path):
    """A device notified for a task that stops answering after package 1 keeps an
    authenticated session open (the server's package 2 carries the Get); the shutdown waits for it
    (up to the deadline), and meanwhile /ready says draining while the API port answers."""
    async def main() -> None:
        prof = DeviceProfile()
        fleet = Fleet(prof, 1, seed=5, faults=FaultShares(timeout=1.0))
        e = Engine(EngineConfig(data_dir=str(tmp_path / "var"), device_port=0, api_port=0,
                                server_overrides={"shutdown_deadline": 3.0}),
                   gateway=LoopbackGateway(fleet.on_pkg0))
        await e.start()
        prof.server_url = e.device_url
        stopping = None
        try:
            d = fleet.devices[0]
            await e.store.create_device(Device(
                dev_id=d.dev_id, msisdn=d.msisdn,
                account=DmAccount(server_id="dmengine", client_name=d.username,
                                  client_password=d.client_secret,
                                  server_password=d.server_secret,
                                  client_nonce=base64.b64encode(d.client_nonce).decode(),
                                  server_nonce=base64.b64encode(d.server_nonce).decode())))
            # package 0 → the device's session → the server's Get → no answer
            await e.broker.do_operation(QueryOp(nodes=["./DevInfo/Mod"]), msisdn=d.msisdn)
            for _ in range(300):
                if e.server is not None and e.server.sessions:
                    break
                await asyncio.sleep(0.01)
            assert e.server is not None and e.server.sessions, "the session did not open"
            assert (await get(e.api_url + "ready"))[0] == 200
            stopping = asyncio.ensure_future(e.stop())
            await asyncio.sleep(0.2)
            assert not stopping.done(), "the shutdown did not wait for the open session"
            status, body = await get(e.api_url + "ready")
            assert_not_ready(status, body, "draining")
            assert body["message"] == "draining: the server is shutting down"
        finally:
            fleet.close()
            if stopping is None:
                await e.stop()
            else:
                await stopping
    uvloop.run(main())
