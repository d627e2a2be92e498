"""HttpCallbackGateway against a small aiohttp server on a free loopback port."""
from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest
from aiohttp import web

from dmengine.errors import GatewayError
from dmengine.notify.base import DeliveryState, RetryPolicy
from dmengine.notify.http import HttpCallbackGateway
from dmengine.notify.pkg0 import build_pkg0, parse_pkg0

SECRET = "srv-secret-42"
NONCE = bytes.fromhex("0123456789abcdeffedcba9876543210")
PKG0 = build_pkg0("acme-dms", SECRET, NONCE, 0x1A2B, ui_mode=2)


class SmsCentre:
    """Answers from a script of (status, json-or-text) per request; records what it got."""

    def __init__(self, script, *, delay: float = 0.0):
        self.script = list(script)
        self.delay = delay
        self.requests: list[tuple[dict, dict]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((await request.json(), dict(request.headers)))
        if self.delay:
            await asyncio.sleep(self.delay)
        status, answer = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        if isinstance(answer, dict):
            return web.json_response(answer, status=status)
        return web.Response(status=status, text=answer)


async def serve(centre: SmsCentre):
    app = web.Application()
    app.router.add_post("/sms/push", centre.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/sms/push"


def run(centre: SmsCentre, body, **kw):
    slept: list[float] = []

    async def sleep(d):
        slept.append(d)

    async def main():
        runner, url = await serve(centre)
        try:
            kw.setdefault("retry", RetryPolicy(attempts=3, base_delay=0.2, jitter=0.0))
            async with HttpCallbackGateway(url, sleep=sleep, **kw) as gw:
                return await body(gw)
        finally:
            await runner.cleanup()

    return asyncio.run(main()), slept


def test_accepted_and_body_shape():
    centre = SmsCentre([(200, {"id": "m-1"})])
    (d, gw), slept = run(centre, lambda gw: _send(gw), headers={"Authorization": "Bearer t0k"})
    assert d.state is DeliveryState.ACCEPTED and d.message_id == "m-1" and d.attempts == 1
    assert slept == [] and gw.sent == 1
    ((body, headers),) = centre.requests
    assert set(body) == {"msisdn", "pkg0", "content_type", "wap_application_id"}
    assert body["msisdn"] == "+4915112345678"
    assert body["content_type"] == "application/vnd.syncml.notification"
    assert body["wap_application_id"] == "x-wap-application:syncml.dm"
    assert base64.b64decode(body["pkg0"]) == PKG0
    assert parse_pkg0(base64.b64decode(body["pkg0"]), SECRET, NONCE).session_id_text == "1A2B"
    assert headers["Authorization"] == "Bearer t0k"
    assert headers["Content-Type"] == "application/json"


async def _send(gw, msisdn="+4915112345678"):
    return await gw.send(msisdn, PKG0), gw


def test_queued_reported_distinctly():
    centre = SmsCentre([(202, {"status": "queued"})])
    (d, _), _ = run(centre, _send)
    assert d.state is DeliveryState.QUEUED and not d.accepted


@pytest.mark.parametrize("status", [400, 403, 404, 422])
def test_4xx_not_retried(status):
    centre = SmsCentre([(status, "no such subscriber")])

    async def body(gw):
        with pytest.raises(GatewayError) as ei:
            await gw.send("4915112345678", PKG0)
        return ei.value, gw

    (err, gw), slept = run(centre, body)
    assert not err.retryable and str(status) in str(err) and "no such subscriber" in str(err)
    assert len(centre.requests) == 1 and slept == [] and gw.retries == 0


def test_5xx_retried_then_accepted():
    centre = SmsCentre([(503, "busy"), (500, "oops"), (201, "")])
    (d, gw), slept = run(centre, _send)
    assert d.accepted and d.attempts == 3 and d.message_id is None
    assert len(centre.requests) == 3 and slept == [0.2, 0.4] and gw.retries == 2
    assert all(base64.b64decode(b["pkg0"]) == PKG0 for b, _ in centre.requests)


def test_5xx_gives_up_after_attempts():
    centre = SmsCentre([(502, "bad gateway")])

    async def body(gw):
        with pytest.raises(GatewayError) as ei:
            await gw.send("4915112345678", PKG0)
        return ei.value, gw

    (err, gw), slept = run(centre, body)
    assert err.retryable and "3 attempts" in str(err) and "502" in str(err)
    assert len(centre.requests) == 3 and slept == [0.2, 0.4] and gw.failed == 1


def test_429_is_retryable():
    centre = SmsCentre([(429, "slow down"), (200, {"message_id": 77})])
    (d, _), slept = run(centre, _send)
    assert d.accepted and d.message_id == "77" and slept == [0.2]


def test_timeout_retried():
    centre = SmsCentre([(200, {})], delay=0.5)

    async def body(gw):
        with pytest.raises(GatewayError) as ei:
            await gw.send("4915112345678", PKG0)
        return ei.value, gw

    (err, gw), slept = run(centre, body, timeout=0.05,
                           retry=RetryPolicy(attempts=2, base_delay=0.1, jitter=0.0))
    assert err.retryable and "Timeout" in str(err)
    assert slept == [0.1] and gw.retries == 1
    # each attempt reached the server or timed out before it did (a loaded machine)
    assert len(centre.requests) <= 2


def test_connections_are_kept_alive_and_closed_with_the_gateway():
    centre = SmsCentre([(200, {})])
    peers: set = set()

    async def main():
        runner, url = await serve(centre)
        try:
            async with HttpCallbackGateway(url) as gw:
                for _ in range(5):
                    await gw.send("4915112345678", PKG0)
                assert gw._pool.idle == 1            # one connection carried all five
            assert gw._pool.idle == 0
        finally:
            await runner.cleanup()

    orig = SmsCentre.handle

    async def handle(self, request):
        peers.add(request.transport.get_extra_info("peername"))
        return await orig(self, request)
    SmsCentre.handle = handle
    try:
        asyncio.run(main())
    finally:
        SmsCentre.handle = orig
    assert len(centre.requests) == 5 and len(peers) == 1


def test_a_kept_alive_connection_the_peer_closed_is_replaced():
    """The SMS centre closes idle connections (keep-alive timeout): the next send goes out
    on a new connection instead of failing."""
    async def main():
        got = []

        async def client(reader, writer):
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(next(l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
                    .split(b":")[1])
            got.append(await reader.readexactly(n))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            writer.close()                     # says keep-alive, then closes anyway
        srv = await asyncio.start_server(client, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        try:
            async with HttpCallbackGateway(f"http://127.0.0.1:{port}/p",
                                           retry=RetryPolicy(attempts=1)) as gw:
                for _ in range(3):
                    d = await gw.send("4915112345678", PKG0)
                    assert d.state is DeliveryState.ACCEPTED
                    await asyncio.sleep(0.05)
        finally:
            srv.close()
        return got

    assert len(asyncio.run(main())) == 3


def test_at_most_max_connections_are_opened():
    centre = SmsCentre([(200, {})], delay=0.02)
    peers: set = set()
    orig = SmsCentre.handle

    async def handle(self, request):
        peers.add(request.transport.get_extra_info("peername"))
        return await orig(self, request)

    async def main():
        runner, url = await serve(centre)
        try:
            async with HttpCallbackGateway(url, max_connections=3) as gw:
                got = await asyncio.gather(*(gw.send("4915112345678", PKG0) for _ in range(20)))
                assert all(d.state is DeliveryState.ACCEPTED for d in got)
                assert gw._pool.idle <= 3
        finally:
            await runner.cleanup()

    SmsCentre.handle = handle
    try:
        asyncio.run(main())
    finally:
        SmsCentre.handle = orig
    assert len(centre.requests) == 20 and 1 <= len(peers) <= 3


def test_header_injection_in_configured_headers_is_refused():
    with pytest.raises(ValueError, match="header"):
        HttpCallbackGateway("http://127.0.0.1:9/p", headers={"X-A": "b\r\nX-Evil: 1"})
