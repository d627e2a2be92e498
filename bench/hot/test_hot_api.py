"""Hot path: an API lookup (L5), ``GET /v1/tasks/{taskId}`` (getTaskById) over real HTTP.

The engine runs in this process (``Engine`` with an LMDB store in a temporary directory, the
API on a loopback port); a QUERY task is made through the API.  One benchmark call is one
request on a keep-alive connection from a raw asyncio client on the same loop: the key check,
the store read, the redacted camelCase answer.

Baseline: a bare aiohttp handler answering the same path with the same bytes (no middleware,
no store), on the same loop, through the same client — what the API's own work costs on top
of aiohttp (``bench api`` measures the same with the server in its own process).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dmengine.engine import Engine, EngineConfig
from dmengine.model import Device

KEY = "k-hot-bench-0123456789abcdef"
IMEI = "356938035643809"


class KeepAlive:
    """One keep-alive HTTP/1.1 connection that sends a fixed GET and reads the answer."""

    def __init__(self, port: int, path: str, key: str) -> None:
        self.port = port
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"X-API-Key: {key}\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)

    async def get(self) -> tuple[int, bytes]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        n = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                n = int(line[15:])
        return status, await self.reader.readexactly(n)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@pytest.fixture(scope="module")
def engine(loop, tmp_path_factory) -> Iterator[tuple[Engine, str]]:
    data = tmp_path_factory.mktemp("hot-api")
    e = Engine(EngineConfig(data_dir=str(data / "var"), device_port=0, api_port=0, api_key=KEY))

    async def setup() -> str:
        await e.start()
        assert e.store is not None
        await e.store.put_device(Device(dev_id=f"IMEI:{IMEI}", imei=IMEI,
                                        msisdn="+491701234567"))
        async with aiohttp.ClientSession() as http:
            async with http.post(e.api_url + "v1/operations", headers={"X-API-Key": KEY},
                                 json={"target": {"imei": IMEI}, "operation": {
                                     "operation": "QUERY", "nodes": ["./DevInfo/Mod"]}}) as r:
                body = await r.json()
                assert r.status == 201, body
                return str(body["taskId"])
    task_id = loop.run_until_complete(setup())
    yield e, task_id
    loop.run_until_complete(e.stop())


def _api_port(e: Engine) -> int:
    return int(e.api_url.rstrip("/").rsplit(":", 1)[1])


def _bench(benchmark: Any, loop: asyncio.AbstractEventLoop, conn: KeepAlive) -> bytes:
    loop.run_until_complete(conn.open())
    try:
        status, body = loop.run_until_complete(conn.get())
        assert status == 200, body
        benchmark(lambda: loop.run_until_complete(conn.get()))
        return body
    finally:
        conn.close()


def test_api_get_task(benchmark, loop, engine):
    e, task_id = engine
    benchmark.group = "api getTaskById (keep-alive, same loop)"
    body = _bench(benchmark, loop, KeepAlive(_api_port(e), f"/v1/tasks/{task_id}", KEY))
    assert task_id.encode() in body


def test_api_get_task_bare_aiohttp(benchmark, loop, engine):
    e, task_id = engine
    benchmark.group = "api getTaskById (keep-alive, same loop)"
    port = _api_port(e)

    async def answer_of_the_api() -> bytes:
        c = KeepAlive(port, f"/v1/tasks/{task_id}", KEY)
        await c.open()
        try:
            return (await c.get())[1]
        finally:
            c.close()
    same = loop.run_until_complete(answer_of_the_api())

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=same, content_type="application/json")
    app = web.Application()
    app.router.add_get("/v1/tasks/{taskId}", handler)
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    try:
        bare_port = runner.addresses[0][1]
        assert _bench(benchmark, loop, KeepAlive(bare_port, f"/v1/tasks/{task_id}", KEY)) == same
    finally:
        loop.run_until_complete(runner.cleanup())
