"""Package #0 through the REAL Kannel (Debian bearerbox + smsbox, kannel-extras fakesmsc).

Each test sends with ``KannelGateway`` and checks what the fake SMSC received — both the
fakesmsc stderr line and bearerbox's access log — byte for byte: UDH 06 05 04 0B 84 23 F0,
WSP push header <tid> 06 03 C4 AF 87, then exactly the package #0 we built, whose digest
``parse_pkg0`` verifies with the server secret and nonce.
"""
from __future__ import annotations

import asyncio
import random
import urllib.request
from urllib.parse import quote_from_bytes

import aiohttp
import pytest
import uvloop

from dmengine.errors import GatewayError
from dmengine.notify.base import DeliveryState, RetryPolicy
from dmengine.notify.kannel import KannelGateway
from dmengine.notify.pkg0 import build_pkg0, parse_pkg0
from dmengine.notify.wsp import MAX_PKG0_IN_ONE_SMS, WDP_UDH, decode_sms_notification, parse_push

try:                                      # tests/ is not a package: pytest puts it on sys.path
    from kannel import Kannel, free_ports, kannel  # noqa: F401  (kannel is the fixture)
except ImportError:                       # pragma: no cover - when run as the tests package
    from tests.kannel import Kannel, free_ports, kannel  # noqa: F401

SERVER_ID = "acme-dms"
SECRET = "srv-secret-42"
NONCE = bytes.fromhex("0123456789abcdeffedcba9876543210")
SENDER = "12345"


def gateway(k: Kannel, **kw) -> KannelGateway:
    kw.setdefault("sender", SENDER)
    return KannelGateway(k.sendsms_base, k.username, k.password, **kw)


def check_arrived(k: Kannel, msisdn: str, sent_body: bytes, pkg0: bytes, *, count: int = 1,
                  secret=SECRET, nonce=NONCE):
    """The last SMS to ``msisdn`` is our UDH + WSP push + exactly ``pkg0``, in both records."""
    (fs, al), *_ = k.wait_for_sms(to=msisdn, count=count)[-1:]
    # fakesmsc stderr line
    assert fs.sender == SENDER and fs.receiver == msisdn
    assert fs.kind == "data", fs.line
    assert fs.udh == WDP_UDH, fs.line
    assert fs.data == sent_body, fs.line
    # bearerbox access log: exact hex, 8-bit coding
    assert al.smsc == "FAKE" and al.receiver == msisdn
    assert al.udh == WDP_UDH and al.msg == sent_body, al.line
    assert al.coding == 1, al.line
    # decode as a device would, and verify the digest
    push = parse_push(fs.data)
    assert push.pdu_type == 0x06 and push.headers == bytes.fromhex("C4AF87")
    assert push.tid == sent_body[0]
    got = decode_sms_notification(fs.udh, fs.data)
    assert got == pkg0
    return parse_pkg0(got, secret, nonce)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_vector09_notification_arrives_byte_exact(kannel, vectors_dir, method, loop):
    pkg0 = (vectors_dir / "09-pkg0-notification.bin").read_bytes()
    msisdn = {("GET", "asyncio"): "4915112345678", ("POST", "asyncio"): "4915112345679",
              ("GET", "uvloop"): "4915112345680", ("POST", "uvloop"): "4915112345681"}[method, loop]

    async def main():
        async with gateway(kannel, method=method) as gw:
            return await gw.send(msisdn, pkg0)

    d = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    assert d.state is DeliveryState.ACCEPTED and d.accepted
    assert d.detail.startswith("0: Accepted"), d.detail
    assert d.attempts == 1 and d.wire["udh"] == WDP_UDH
    assert d.wire["body"][1:] == bytes.fromhex("0603C4AF87") + pkg0
    p = check_arrived(kannel, msisdn, d.wire["body"], pkg0)
    assert p.verified and p.server_id == "acme-dms" and p.session_id_text == "1A2B"
    assert (p.ui_mode, p.initiator, p.version) == (2, 1, 11)


def test_awkward_bytes_and_full_size_arrive_intact(kannel):
    """Bytes Kannel's URL/log encodings could mangle (NUL, space, '+', '%', '&', CR, LF, high
    bytes) in the vendor part, at the largest package #0 one SMS carries (127 bytes)."""
    awkward = b"\x00 +%&\r\n\xff\x80=?#;/"
    sid = "srv id+%&"
    fixed = 16 + 8 + len(sid.encode())
    vendor = (awkward * 20)[:MAX_PKG0_IN_ONE_SMS - fixed]
    pkg0 = build_pkg0(sid, SECRET, NONCE, 0x2B, ui_mode=3, initiator=1, vendor=vendor)
    assert len(pkg0) == MAX_PKG0_IN_ONE_SMS
    results = {}

    async def main():
        for method, msisdn in (("GET", "4915100000001"), ("POST", "4915100000002")):
            async with gateway(kannel, method=method) as gw:
                results[msisdn] = await gw.send(msisdn, pkg0)

    asyncio.run(main())
    for msisdn, d in results.items():
        assert d.accepted and len(d.wire["body"]) == 133
        p = check_arrived(kannel, msisdn, d.wire["body"], pkg0)
        assert p.vendor == vendor and p.server_id == sid and p.session_id_text == "2B"


def test_many_random_notifications_concurrently(kannel):
    rng = random.Random(20261123)
    cases = []
    for i in range(24):
        sid = "".join(rng.choice("abcdefghij-.") for _ in range(rng.randint(1, 30)))
        secret = rng.randbytes(rng.randint(0, 20))
        nonce = rng.randbytes(rng.choice([0, 4, 16]))
        room = MAX_PKG0_IN_ONE_SMS - 24 - len(sid)
        pkg0 = build_pkg0(sid, secret, nonce, rng.randint(1, 0xFFFF), ui_mode=rng.randint(0, 3),
                          vendor=rng.randbytes(rng.randint(0, room)))
        cases.append((f"49170{i:07d}", pkg0, secret, nonce))

    async def main():
        async with gateway(kannel) as gw:
            return await asyncio.gather(*(gw.send(m, p) for m, p, _, _ in cases))

    deliveries = asyncio.run(main())
    assert len({d.wire["body"][0] for d in deliveries}) == len(cases)     # distinct TIDs
    for (msisdn, pkg0, secret, nonce), d in zip(cases, deliveries):
        assert d.accepted, d
        assert check_arrived(kannel, msisdn, d.wire["body"], pkg0, secret=secret,
                             nonce=nonce).verified


def test_oversized_refused_before_sending(kannel):
    msisdn = "4915100000099"
    too_big = build_pkg0(SERVER_ID, SECRET, NONCE, 7, vendor=b"v" * (MAX_PKG0_IN_ONE_SMS - 31))
    assert len(too_big) == MAX_PKG0_IN_ONE_SMS + 1
    marker = build_pkg0(SERVER_ID, SECRET, NONCE, 8)

    async def main():
        async with gateway(kannel) as gw:
            with pytest.raises(GatewayError) as ei:
                await gw.send(msisdn, too_big)
            assert not ei.value.retryable and "133" in str(ei.value)
            assert gw.failed == 1 and gw.retries == 0
            return await gw.send(msisdn, marker)       # sent after the refusal

    d = asyncio.run(main())
    check_arrived(kannel, msisdn, d.wire["body"], marker)
    # the marker arrived, the oversized one (refused earlier) did not
    assert len([m for m in kannel.fakesmsc_messages() if m.receiver == msisdn]) == 1
    assert len([e for e in kannel.access_log_entries() if e.receiver == msisdn]) == 1


def test_wrong_password_is_not_retried(kannel):
    slept = []

    async def sleep(d):
        slept.append(d)

    async def main():
        async with KannelGateway(kannel.sendsms_base, kannel.username, "wrong", sleep=sleep) as gw:
            with pytest.raises(GatewayError) as ei:
                await gw.send("4915100000010", build_pkg0(SERVER_ID, SECRET, NONCE, 9))
            return gw, ei.value

    gw, err = asyncio.run(main())
    assert not err.retryable and "403" in str(err)
    assert gw.retries == 0 and slept == []


def test_invalid_msisdn_refused(kannel):
    async def main():
        async with gateway(kannel) as gw:
            for bad in ("", "12", "49 151", "4915&to=1", "+49abc"):
                with pytest.raises(GatewayError) as ei:
                    await gw.send(bad, build_pkg0(SERVER_ID, SECRET, NONCE, 9))
                assert not ei.value.retryable

    asyncio.run(main())


@pytest.mark.parametrize("sequential", [True, False])
def test_rate_limit_on_real_kannel(kannel, sequential):
    """rate 10/s, burst 3, 8 messages: the first 3 go at once, each later one waits for a
    token.  A fake clock makes the arithmetic exact; the messages really go through Kannel."""
    now = [1000.0]
    slept = []

    async def sleep(d):
        slept.append(round(d, 9))
        now[0] += d if sequential else 0.0
        await asyncio.sleep(0)

    pkgs = [build_pkg0(SERVER_ID, SECRET, NONCE, 100 + i) for i in range(8)]
    base = "4916000001" if sequential else "4916000002"

    async def main():
        async with gateway(kannel, rate=10.0, burst=3, clock=lambda: now[0], sleep=sleep) as gw:
            if sequential:
                return [await gw.send(f"{base}{i}", p) for i, p in enumerate(pkgs)]
            return await asyncio.gather(*(gw.send(f"{base}{i}", p) for i, p in enumerate(pkgs)))

    deliveries = asyncio.run(main())
    if sequential:      # clock advances by each wait: every later message waits one interval
        assert slept == [0.1] * 5
    else:               # all arrive at once: the n-th beyond the burst waits n intervals
        assert slept == [0.1, 0.2, 0.3, 0.4, 0.5]
    for i, (p, d) in enumerate(zip(pkgs, deliveries)):
        assert d.accepted
        assert check_arrived(kannel, f"{base}{i}", d.wire["body"], p).session_id == 100 + i


def test_gateway_down_retries_then_fails():
    """Nothing listens on the port: connection refused is retryable, retried with backoff,
    then reported as GatewayError(retryable=True)."""
    (port,) = free_ports(1)
    slept = []

    async def sleep(d):
        slept.append(d)

    async def main():
        policy = RetryPolicy(attempts=4, base_delay=0.5, factor=2.0, max_delay=1.5, jitter=0.0)
        async with KannelGateway(f"http://127.0.0.1:{port}", "tester", "testpw", retry=policy,
                                 sleep=sleep, timeout=5.0) as gw:
            with pytest.raises(GatewayError) as ei:
                await gw.send("4915100000020", build_pkg0(SERVER_ID, SECRET, NONCE, 9))
            return gw, ei.value

    gw, err = asyncio.run(main())
    assert err.retryable and "4 attempts" in str(err)
    assert isinstance(err.__cause__, GatewayError) and err.__cause__.retryable
    assert isinstance(err.__cause__.__cause__, aiohttp.ClientConnectorError)
    assert slept == [0.5, 1.0, 1.5]
    assert gw.retries == 3 and gw.failed == 1 and gw.sent == 0


def test_smsc_offline_is_queued_then_delivered():
    """With the fake SMSC disconnected smsbox still answers 202, but "3: Queued": reported as
    QUEUED, not accepted.  When the SMSC comes back, Kannel delivers it, byte-exact."""
    msisdn = "4915100000030"
    pkg0 = build_pkg0(SERVER_ID, SECRET, NONCE, 0x30, ui_mode=1)
    with Kannel(with_smsc=False) as k:

        async def main():
            async with gateway(k) as gw:
                d = await gw.send(msisdn, pkg0)
                return gw, d

        gw, d = asyncio.run(main())
        assert d.state is DeliveryState.QUEUED and not d.accepted
        assert d.detail.startswith("3: Queued"), d.detail
        assert gw.queued == 1
        k.start_fakesmsc()
        check_arrived(k, msisdn, d.wire["body"], pkg0)


def test_kannel_truncates_past_one_sms_which_is_why_we_refuse(kannel):
    """REAL-PARTS.md pitfall, checked on the real thing: with max-messages = 1 a body one byte
    over 133 is answered "0: Accepted" and cut to 133 bytes.  KannelGateway refuses it first
    (test_oversized_refused_before_sending)."""
    msisdn = "4915100000040"
    body = bytes(range(134))
    url = (f"{kannel.sendsms_base}/cgi-bin/sendsms?username={kannel.username}"
           f"&password={kannel.password}&to={msisdn}&from={SENDER}&coding=1"
           f"&udh={quote_from_bytes(WDP_UDH, safe='')}&text={quote_from_bytes(body, safe='')}")
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.status == 202 and r.read().startswith(b"0: Accepted")
    ((fs, al),) = kannel.wait_for_sms(to=msisdn)
    assert fs.data == body[:133] and al.msg == body[:133] and al.udh == WDP_UDH


def test_delivery_reports_reach_our_dlr_url(kannel):
    """dlr-url/dlr-mask pass through KannelGateway (encoded once): the fake SMSC acks (8)
    and then reports delivered (1) to our callback, for GET and POST."""
    from aiohttp import web

    reports: list[dict[str, str]] = []

    async def dlr(request: web.Request) -> web.Response:
        reports.append(dict(request.query))
        return web.Response(text="ok")

    async def main():
        app = web.Application()
        app.router.add_get("/dlr", dlr)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            for method, msisdn in (("GET", "4915100000050"), ("POST", "4915100000051")):
                url = f"http://127.0.0.1:{port}/dlr?status=%d&to=%p&m={method}"
                async with gateway(kannel, method=method, dlr_url=url, dlr_mask=31) as gw:
                    d = await gw.send(msisdn, build_pkg0(SERVER_ID, SECRET, NONCE, 0x50))
                    assert d.accepted
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while len(reports) < 4 and loop.time() < deadline:
                await asyncio.sleep(0.02)
        finally:
            await runner.cleanup()

    asyncio.run(main())
    for method, msisdn in (("GET", "4915100000050"), ("POST", "4915100000051")):
        mine = [r["status"] for r in reports if r.get("m") == method]
        assert sorted(mine) == ["1", "8"], reports       # SMSC ack (8), delivered (1)
        assert all(r["to"] == msisdn for r in reports if r.get("m") == method), reports
