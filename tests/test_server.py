"""The device port end to end: simulated devices over real HTTP against a running server.

Everything is real: the uvloop/httptools server, the codecs, the session engine, the
simulator's HTTP client, the FUMO file server (aiohttp), package 0 through the loopback
gateway.  Each test runs on uvloop and on the stock asyncio loop.
"""
from __future__ import annotations

import asyncio

import pytest
import uvloop
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from dmengine import _wbxml
from dmengine.message import Command, Item, Message, Meta, SyncHdr
from dmengine.metrics import DeviceMetrics
from dmengine.notify.loopback import LoopbackGateway
from dmengine.notify.pkg0 import build_pkg0
from dmengine.server import DmServer, MemoryDeviceHandler, ServerConfig
from dmengine.simulator.device import DeviceProfile, FaultPlan
from dmengine.simulator.fleet import FaultShares, Fleet, HttpClient

try:
    from dmengine import xmlcodec as _xmlmod
except ImportError:
    from dmengine import _xml as _xmlmod


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request):
    lp = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    errors: list[dict] = []
    lp.set_exception_handler(lambda _l, ctx: errors.append(ctx))
    yield lp
    lp.run_until_complete(lp.shutdown_asyncgens())
    lp.close()
    assert not errors, errors


class Rig:
    """A running server, its handler and metrics, and a fleet registered with it."""

    def __init__(self, server, handler, metrics, fleet):
        self.server, self.handler, self.metrics, self.fleet = server, handler, metrics, fleet

    def events(self, kind: str, dev=None) -> list:
        return [e for d, e in self.handler.events
                if type(e).__name__ == kind and (dev is None or d == dev.dev_id)]

    def count(self, name: str, **labels) -> float:
        v = self.metrics.registry.get_sample_value(name, labels or None)
        return v or 0.0

    async def close(self):
        self.fleet.close()
        await self.server.shutdown(0.5)


async def _rig(n: int = 2, *, encoding: str = "wbxml", auth: str = "md5",
               faults: FaultShares | None = None, profile_kw: dict | None = None,
               **server_kw) -> Rig:
    handler = MemoryDeviceHandler()
    metrics = DeviceMetrics(CollectorRegistry())
    server_kw.setdefault("tick", 0.05)
    srv = await DmServer(ServerConfig(require_auth=auth, **server_kw), handler,
                         metrics=metrics).start()
    profile = DeviceProfile(server_url=srv.url, encoding=encoding, auth=auth,
                            **(profile_kw or {}))
    fleet = Fleet(profile, n, faults=faults, client=HttpClient(timeout=10))
    for dev in fleet.devices:
        handler.add_account(dev.account())
    return Rig(srv, handler, metrics, fleet)


@pytest.mark.parametrize("encoding", ["xml", "wbxml"])
def test_full_session_get_replace_exec_with_md5(loop, encoding):
    async def main():
        rig = await _rig(2, encoding=encoding)
        dev = rig.fleet.devices[0]
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV"),
                                       Item(target="./DevInfo/Mod")]),
            Command(name="Replace", items=[Item(target="./FUMO/1/PkgName", data="fw-2.4")]),
            Command(name="Exec", items=[Item(target="./Diag/Ping")]),
            Command(name="Delete", items=[Item(target="./DevInfo")]),
        ]
        try:
            rep = await rig.fleet.run_session(dev)
            other = await rig.fleet.run_session(rig.fleet.devices[1])
        finally:
            await rig.close()
        assert rep.outcome == "completed" and rep.messages == 2, rep
        assert other.outcome == "completed" and other.messages == 1
        assert [e.scheme for e in rig.events("Authenticated", dev)] == ["md5"]
        ident = rig.events("DeviceIdentified", dev)[0]
        assert ident.alert == 1201 and ident.devinfo["Mod"] == "EX100"
        st = {e.cmd: e.status for e in rig.events("StatusReceived", dev)}
        assert st == {"Get": 200, "Replace": 200, "Exec": 200, "Delete": 405}
        res = rig.events("ResultsReceived", dev)[0]
        assert [(uri, data) for uri, _f, _t, data in res.items] == [
            ("./DevDetail/FwV", "2.3.9"), ("./DevInfo/Mod", "EX100")]
        assert dev.value("./FUMO/1/PkgName") == "fw-2.4"
        assert [e.reason for e in rig.events("SessionEnded", dev)] == ["completed"]
        assert not rig.server.sessions and not rig.server.by_key
        assert rig.count("dmengine_device_sessions_started_total") == 2
        assert rig.count("dmengine_device_sessions_ended_total", reason="completed") == 2
        assert rig.count("dmengine_device_messages_received_total", encoding=encoding) == 3
        assert rig.count("dmengine_device_messages_sent_total", encoding=encoding) == 3
        assert rig.count("dmengine_device_sessions_in_flight") == 0
        text = generate_latest(rig.metrics.registry).decode()
        assert "dmengine_device_request_seconds_bucket" in text
    loop.run_until_complete(main())


@pytest.mark.parametrize("auth", ["basic", "hmac"])
def test_basic_and_hmac_authentication(loop, auth):
    async def main():
        rig = await _rig(1, auth=auth)
        dev = rig.fleet.devices[0]
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/SwV")])]
        try:
            rep = await rig.fleet.run_session(dev)
        finally:
            await rig.close()
        assert rep.outcome == "completed", rep
        assert rig.events("Authenticated", dev)[0].scheme == auth
        assert rig.events("ResultsReceived", dev)[0].items[0][3] == "2.3.9_r1"
    loop.run_until_complete(main())


def test_wrong_credentials_fail_cleanly(loop):
    async def main():
        rig = await _rig(1)
        dev = rig.fleet.devices[0]
        dev.faults = FaultPlan(wrong_credentials=True)
        try:
            rep = await rig.fleet.run_session(dev)
        finally:
            await rig.close()
        assert rep.outcome in ("auth_failed", "aborted"), rep
        assert rig.events("AuthFailed", dev)
        assert not rig.events("Authenticated", dev)
        assert not rig.server.sessions
    loop.run_until_complete(main())


@pytest.mark.parametrize("same_session", [True, False])
def test_fumo_download_and_update_reports_1226(loop, same_session):
    firmware = bytes(range(256)) * 40

    async def main():
        app = web.Application()

        async def fw(request):
            return web.Response(body=firmware, content_type="application/octet-stream")
        app.router.add_get("/fw/pkg.bin", fw)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        rig = await _rig(2, profile_kw={"report_in_same_session": same_session},
                         faults=None)
        ok, bad = rig.fleet.devices
        bad.faults = FaultPlan(fail_update=410)
        for dev in (ok, bad):
            rig.handler.queue_on_connect[dev.dev_id] = [
                Command(name="Replace", items=[Item(target="./FUMO/1/PkgVersion",
                                                    data="2.4.1")]),
                Command(name="Replace", items=[Item(
                    target="./FUMO/1/DownloadAndUpdate/PkgURL",
                    data=f"http://127.0.0.1:{port}/fw/pkg.bin")]),
                Command(name="Exec", correlator=f"job-{dev.index}",
                        items=[Item(target="./FUMO/1/DownloadAndUpdate")]),
            ]
        try:
            await rig.fleet.run_session(ok)
            await rig.fleet.run_session(bad)
            await rig.fleet.wait_idle(10)
        finally:
            await rig.close()
            await runner.cleanup()
        assert {r.outcome for r in rig.fleet.reports} == {"completed"}
        for dev, code in ((ok, "200"), (bad, "410")):
            execs = [e for e in rig.events("StatusReceived", dev) if e.cmd == "Exec"]
            assert execs[0].status == 202
            ga = rig.events("GenericAlert", dev)
            assert len(ga) == 1, rig.handler.events
            assert ga[0].correlator == f"job-{dev.index}" and ga[0].data == code
            assert ga[0].source == "./FUMO/1"
            assert ga[0].type == "org.openmobilealliance.dm.firmwareupdate.downloadandupdate"
            assert not dev.pending_alerts
            # later-session mode: the alert came in a second session of the device
            assert len(rig.events("DeviceIdentified", dev)) == (1 if same_session else 2)
        assert ok.fwv == "2.4.1" and ok.value("./DevDetail/FwV") == "2.4.1"
        assert ok.fumo_state == 100 and bad.fwv == "2.3.9" and bad.fumo_state == 80
        assert rig.fleet.stats.downloads == 2
        assert rig.fleet.stats.download_bytes == 2 * len(firmware)
    loop.run_until_complete(main())


def test_package0_starts_a_server_initiated_session(loop):
    async def main():
        rig = await _rig(3)
        gw = LoopbackGateway(rig.fleet.on_pkg0)
        dev = rig.fleet.devices[1]
        dev.server_nonce = b"\x10" * 16
        try:
            pkg0 = build_pkg0("dmengine", dev.server_secret, dev.server_nonce, 0x1A2B)
            delivery = await gw.send(dev.msisdn, pkg0)
            assert delivery.accepted
            await rig.fleet.wait_idle(10)
            # a package 0 with a wrong digest is dropped by the device
            await gw.send(dev.msisdn, build_pkg0("dmengine", "nope", dev.server_nonce, 7))
            await rig.fleet.wait_idle(10)
        finally:
            await gw.close()
            await rig.close()
        ident = rig.events("DeviceIdentified", dev)
        assert len(ident) == 1
        assert ident[0].alert == 1200 and ident[0].session_id == "1A2B"
        assert [r.outcome for r in rig.fleet.reports] == ["completed", "pkg0_rejected"]
        assert rig.fleet.stats.notifications == 2
    loop.run_until_complete(main())


def test_dropped_connection_resumes_the_session(loop):
    async def main():
        rig = await _rig(1)
        dev = rig.fleet.devices[0]
        dev.faults = FaultPlan(drop=True)
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        try:
            rep = await rig.fleet.run_session(dev)
        finally:
            await rig.close()
        assert rep.outcome == "completed" and rep.messages == 2, rep
        assert rig.events("ResultsReceived", dev)
        assert rig.fleet.client.connects >= 2          # it came back on a new connection
        assert not rig.server.sessions
    loop.run_until_complete(main())


def test_silent_device_session_expires_and_handler_is_told(loop):
    async def main():
        rig = await _rig(1, session_idle_timeout=0.2)
        dev = rig.fleet.devices[0]
        dev.faults = FaultPlan(timeout=True)
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        try:
            rep = await rig.fleet.run_session(dev)
            assert rep.outcome == "device_timeout"
            assert len(rig.server.sessions) == 1
            for _ in range(100):
                if not rig.server.sessions:
                    break
                await asyncio.sleep(0.05)
        finally:
            await rig.close()
        assert not rig.server.sessions and not rig.server.by_key
        assert rig.handler.closed == [(dev.dev_id, "timeout")]
        assert [e.handle for e in rig.events("CommandNotDelivered", dev)] == [(dev.dev_id, 0)]
        assert rig.count("dmengine_device_sessions_ended_total", reason="timeout") == 1
    loop.run_until_complete(main())


def _raw_pkg1(dev_id: str, session_id: str, msg_id: str = "1", target: str = "x") -> Message:
    return Message(hdr=SyncHdr(ver_dtd="1.2", ver_proto="DM/1.2", session_id=session_id,
                               msg_id=msg_id, target=target, source=dev_id),
                   commands=[Command(name="Alert", cmd_id="1", data="1201"),
                             Command(name="Replace", cmd_id="2",
                                     items=[Item(source="./DevInfo/DevId", data=dev_id)])],
                   final=True)


async def _post(port: int, path: str, bodies: list[bytes], ctype: str) -> list:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(b)}\r\n\r\n".encode() + b for b in bodies))
    out = []
    for _ in bodies:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode().split("\r\n")
        hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(hdrs["content-length"]))
        out.append((int(lines[0].split()[1]), hdrs, body))
    writer.close()
    return out


def test_pipelined_dm_requests_answered_in_order_in_their_encoding(loop):
    async def main():
        rig = await _rig(2, auth="none")
        a, b = rig.fleet.devices
        try:
            bodies = [_wbxml.encode(_raw_pkg1(a.dev_id, "1")), _wbxml.encode(_raw_pkg1(b.dev_id, "2"))]
            res = await _post(rig.server.port, "/dm", bodies, "application/vnd.syncml+wbxml")
            xml = await _post(rig.server.port, "/dm", [_xmlmod.encode(_raw_pkg1(a.dev_id, "3"))],
                              "application/vnd.syncml.dm+xml; charset=utf-8")
        finally:
            await rig.close()
        assert [r[0] for r in res] == [200, 200]
        assert all(r[1]["content-type"] == "application/vnd.syncml+wbxml" for r in res)
        assert all(r[1]["cache-control"] == "no-store, private" for r in res)
        replies = [_wbxml.decode(r[2]) for r in res]
        assert [m.hdr.target for m in replies] == [a.dev_id, b.dev_id]
        assert [m.hdr.session_id for m in replies] == ["1", "2"]
        tokens = {m.hdr.resp_uri.rsplit("/", 1)[1] for m in replies}
        assert len(tokens) == 2 and all(len(t) >= 16 for t in tokens)
        assert replies[0].hdr.resp_uri.startswith(f"http://127.0.0.1:{rig.server.port}/dm/")
        assert xml[0][1]["content-type"] == "application/vnd.syncml.dm+xml"
        assert _xmlmod.decode(xml[0][2]).hdr.target == a.dev_id
    loop.run_until_complete(main())


def test_unknown_session_token_gets_a_clean_end(loop):
    async def main():
        rig = await _rig(1, auth="none")
        try:
            msg = _raw_pkg1("IMEI:1", "9", msg_id="3")
            msg.commands = [Command(name="Status", cmd_id="1", msg_ref="1", cmd_ref="0",
                                    cmd="SyncHdr", data="200")]
            (status, _, body), = await _post(rig.server.port, "/dm/expiredtoken12345",
                                            [_wbxml.encode(msg)],
                                            "application/vnd.syncml.dm+wbxml")
        finally:
            await rig.close()
        assert status == 200
        reply = _wbxml.decode(body)
        assert reply.final and reply.hdr.target == "IMEI:1" and reply.hdr.session_id == "9"
        st, alert = reply.commands
        assert (st.cmd, st.msg_ref, st.data) == ("SyncHdr", "3", "404")
        assert (alert.name, alert.data) == ("Alert", "1223")
        assert not rig.server.sessions
    loop.run_until_complete(main())


def test_restarted_package1_replaces_the_old_session(loop):
    async def main():
        rig = await _rig(1, auth="none")
        dev = rig.fleet.devices[0]
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        body = _wbxml.encode(_raw_pkg1(dev.dev_id, "77"))
        try:
            (s1, _, r1), = await _post(rig.server.port, "/dm", [body], "application/vnd.syncml.dm+wbxml")
            assert len(rig.server.sessions) == 1
            first = next(iter(rig.server.sessions))
            rig.handler.queue_on_connect[dev.dev_id] = [
                Command(name="Get", items=[Item(target="./DevDetail/SwV")])]
            (s2, _, r2), = await _post(rig.server.port, "/dm", [body], "application/vnd.syncml.dm+wbxml")
            assert len(rig.server.sessions) == 1 and first not in rig.server.sessions
        finally:
            await rig.close()
        assert s1 == s2 == 200
        assert _wbxml.decode(r1).hdr.resp_uri != _wbxml.decode(r2).hdr.resp_uri
        assert ("IMEI:356938030000000", "restarted") in rig.handler.closed
    loop.run_until_complete(main())


def test_session_cap_answers_503_before_decoding(loop):
    async def main():
        rig = await _rig(2, max_sessions=1, session_idle_timeout=30)
        a, _ = rig.fleet.devices
        a.faults = FaultPlan(timeout=True)    # leaves its session parked
        rig.handler.queue_on_connect[a.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        try:
            rep = await rig.fleet.run_session(a)
            assert rep.outcome == "device_timeout" and len(rig.server.sessions) == 1
            # garbage body: a 503 proves it was never decoded (decoding would say 400)
            (status, hdrs, _), = await _post(rig.server.port, "/dm", [b"\x00garbage"],
                                             "application/vnd.syncml.dm+wbxml")
            # the parked session itself is still served on its RespURI
            token = next(iter(rig.server.sessions))
            (s2, _, _), = await _post(rig.server.port, f"/dm/{token}", [b"\x00garbage"],
                                      "application/vnd.syncml.dm+wbxml")
        finally:
            await rig.close()
        assert status == 503 and hdrs["retry-after"] == "5"
        assert s2 == 400
        assert rig.count("dmengine_device_rejected_total", cap="sessions") == 1
    loop.run_until_complete(main())


class SlowHandler(MemoryDeviceHandler):
    """Waits in a hook: requests stay pending until ``gate`` opens."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def account_for(self, dev_id, username):
        self.entered.set()
        await self.gate.wait()
        return await super().account_for(dev_id, username)


def test_pending_cap_503_and_graceful_shutdown_lets_sessions_finish(loop):
    async def main():
        handler = SlowHandler()
        srv = await DmServer(ServerConfig(require_auth="none", max_pending=1, tick=0.05),
                             handler).start()
        fleet = Fleet(DeviceProfile(server_url=srv.url, auth="none"), 2, retry_503=0)
        a, b = fleet.devices
        try:
            ta = asyncio.ensure_future(fleet.run_session(a))
            await asyncio.wait_for(handler.entered.wait(), 5)
            rb = await fleet.run_session(b)                   # pending cap reached
            assert rb.outcome == "http_503"
            # SIGTERM-style shutdown while a's request is in its hook: a still finishes
            stop = asyncio.ensure_future(srv.shutdown(5.0))
            await asyncio.sleep(0.1)
            handler.gate.set()
            ra = await asyncio.wait_for(ta, 5)
            await stop
        finally:
            fleet.close()
        assert ra.outcome == "completed", ra
        assert not srv.sessions and not srv.connections
    loop.run_until_complete(main())


def test_many_devices_concurrently_with_faults(loop):
    async def main():
        rig = await _rig(40, faults=FaultShares(drop=0.2, decline_optin=0.3),
                         session_idle_timeout=30)
        confirm = Command(name="Alert", data="1101",
                          items=[Item(data="MAXDT=30"), Item(data="Update now?")])
        for dev in rig.fleet.devices:
            rig.handler.queue_on_connect[dev.dev_id] = [
                confirm, Command(name="Get", items=[Item(target="./DevInfo/Lang")])]
        try:
            stats = await rig.fleet.run(sessions_per_device=1, concurrency=20)
        finally:
            await rig.close()
        assert stats.outcomes == {"completed": 40}, stats.outcomes
        answers = [e.status for e in rig.events("UserAlertAnswered")]
        declined = sum(d.faults.decline_optin for d in rig.fleet.devices)
        assert sorted(answers).count(304) == declined and len(answers) == 40
        assert len(rig.events("ResultsReceived")) == 40
        assert not rig.server.sessions
    loop.run_until_complete(main())


def test_fleet_run_lanes_match_run_session_outcomes(loop):
    """Fleet.run's callback lanes hand every unusual session to the coroutine path: wrong
    credentials, a device that stops answering, a dropped connection, FUMO jobs and plain
    sessions end as run_session ends them; a second run reuses (or replaces) the pooled
    connections the server closed meanwhile."""
    async def main():
        from aiohttp import web
        firmware = b"F" * 3000

        async def fw(request):
            return web.Response(body=firmware)
        app = web.Application()
        app.router.add_get("/fw/pkg.bin", fw)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        rig = await _rig(12, session_idle_timeout=30, keepalive_timeout=0.2)
        devs = rig.fleet.devices
        devs[0].faults = FaultPlan(wrong_credentials=True)
        devs[1].faults = FaultPlan(timeout=True)
        devs[2].faults = FaultPlan(drop=True)
        for dev in devs[1:6]:
            rig.handler.queue_on_connect[dev.dev_id] = [
                Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        rig.handler.queue_on_connect[devs[6].dev_id] = [
            Command(name="Replace", items=[Item(target="./FUMO/1/DownloadAndUpdate/PkgURL",
                                                data=f"http://127.0.0.1:{port}/fw/pkg.bin")]),
            Command(name="Exec", correlator="j", items=[Item(target="./FUMO/1/DownloadAndUpdate")])]
        try:
            stats = await rig.fleet.run(sessions_per_device=1, concurrency=4)
            first = dict(stats.outcomes)
            await asyncio.sleep(0.5)                  # the server closes the idle connections
            await rig.fleet.run(sessions_per_device=1, concurrency=4)
            await rig.fleet.wait_idle(10)
        finally:
            await rig.close()
            await runner.cleanup()
        assert first == {"completed": 10, "auth_failed": 1, "device_timeout": 1}, first
        by_dev: dict[str, list[str]] = {}
        for r in rig.fleet.reports:
            by_dev.setdefault(r.dev_id, []).append(r.outcome)
        # three failed tries in each session: the fifth failure of the account starts its
        # brute-force backoff, so the sixth try is answered 503 (ServerConfig.brute_force)
        assert by_dev[devs[0].dev_id] == ["auth_failed", "http_503"]
        assert by_dev[devs[1].dev_id] == ["device_timeout", "completed"]   # Get only once
        assert all(o == ["completed"] * 2 for d, o in by_dev.items()
                   if d not in (devs[0].dev_id, devs[1].dev_id))
        assert len(rig.events("ResultsReceived")) == 4           # devices 2-5, once each
        ga = rig.events("GenericAlert", devs[6])
        assert len(ga) == 1 and ga[0].data == "200" and rig.fleet.stats.downloads == 1
        assert rig.fleet.stats.messages == sum(r.messages for r in rig.fleet.reports)
        assert rig.fleet.client.connects >= 5                    # new ones after the close
    loop.run_until_complete(main())


def test_fleet_run_lane_503_retries_and_errors_surface(loop):
    """A 503 answer on a lane goes to the coroutine path (retried there); an exception in
    the device's code surfaces from Fleet.run instead of vanishing in a callback."""
    async def main():
        handler = SlowHandler()
        handler.gate.set()
        srv = await DmServer(ServerConfig(require_auth="none", max_pending=1, tick=0.05),
                             handler).start()
        fleet = Fleet(DeviceProfile(server_url=srv.url, auth="none"), 6, retry_503=50)
        resumed: list[tuple] = []
        drive = fleet._drive

        def spy(*args):
            resumed.append(args[7:])
            return drive(*args)
        fleet._drive = spy  # type: ignore[method-assign]
        try:
            await fleet.run(sessions_per_device=1, concurrency=6)   # connections now pooled
            handler.gate.clear()
            asyncio.get_running_loop().call_later(0.2, handler.gate.set)
            stats = await fleet.run(sessions_per_device=2, concurrency=6)
            assert stats.outcomes == {"completed": 18}, stats.outcomes
            assert stats.rejected_503 > 0
            assert stats.messages == 18 + stats.rejected_503
            assert any(r and r[0] and r[0][0] == "response" and r[0][1] == 503 for r in resumed)

            def boom(self, body):
                raise RuntimeError("device bug")
            from dmengine.simulator.device import ClientSession
            orig = ClientSession.receive
            ClientSession.receive = boom
            try:
                with pytest.raises(RuntimeError, match="device bug"):
                    await fleet.run(sessions_per_device=1, concurrency=2)
            finally:
                ClientSession.receive = orig
            await fleet.wait_idle(5)
        finally:
            fleet.close()
            await srv.shutdown(0.5)
    loop.run_until_complete(main())


def test_tls_session(loop, tmp_path):
    import ssl

    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "c.pem")
    cert.private_key_pem.write_to_path(tmp_path / "k.pem")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    async def main():
        handler = MemoryDeviceHandler()
        srv = await DmServer(ServerConfig(tls_cert=str(tmp_path / "c.pem"),
                                          tls_key=str(tmp_path / "k.pem")), handler).start()
        fleet = Fleet(DeviceProfile(server_url=srv.url), 1, client=HttpClient(ssl_context=ctx))
        handler.add_account(fleet.devices[0].account())
        try:
            rep = await fleet.run_session(fleet.devices[0])
        finally:
            fleet.close()
            await srv.shutdown(0.5)
        assert srv.url.startswith("https://") and rep.outcome == "completed", rep
        assert handler.events_of("Authenticated")
    loop.run_until_complete(main())




def test_large_objects_both_ways_over_http(loop):
    """A 6 KB PkgData from the server to a device advertising MaxMsgSize 1500, and a 5 KB
    node value back to a server advertising 2048: both travel in chunks with MoreData."""
    blob = bytes(range(256)) * 24

    async def main():
        rig = await _rig(1, encoding="wbxml", max_msg_size=2048,
                         profile_kw={"max_msg_size": 1500})
        dev = rig.fleet.devices[0]
        dev._set("./Diag/Log", ("chr", "G", None, "log line\n" * 560))
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Replace", items=[Item(target="./FUMO/1/Update/PkgData",
                                                meta=Meta(format="bin"), data=blob)]),
            Command(name="Get", items=[Item(target="./Diag/Log")]),
        ]
        try:
            rep = await rig.fleet.run_session(dev)
        finally:
            await rig.close()
        assert rep.outcome == "completed", rep
        assert rep.messages >= 6
        assert dev.pkg_data == blob
        st = {e.cmd: e.status for e in rig.events("StatusReceived", dev)}
        assert st == {"Replace": 200, "Get": 200}
        res = rig.events("ResultsReceived", dev)[0]
        assert res.items[0][3] == "log line\n" * 560
    loop.run_until_complete(main())


def test_retransmitted_message_gets_the_same_reply_and_bad_version_its_status(loop):
    async def main():
        rig = await _rig(1, auth="none")
        dev = rig.fleet.devices[0]
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Get", items=[Item(target="./DevDetail/FwV")])]
        body = _wbxml.encode(_raw_pkg1(dev.dev_id, "42"))
        ctype = "application/vnd.syncml.dm+wbxml"
        try:
            (_, _, r1), = await _post(rig.server.port, "/dm", [body], ctype)
            token = _wbxml.decode(r1).hdr.resp_uri.rsplit("/", 1)[1]
            again = _raw_pkg1(dev.dev_id, "42", msg_id="1")
            # the device did not get the answer and sends package 1 again, to its RespURI
            (_, _, r2), = await _post(rig.server.port, f"/dm/{token}",
                                      [_wbxml.encode(again)], ctype)
            old = _raw_pkg1("IMEI:9", "5")
            old.hdr.ver_dtd, old.hdr.ver_proto = "1.1", "DM/1.1"
            (s3, _, r3), = await _post(rig.server.port, "/dm", [_wbxml.encode(old)], ctype)
        finally:
            await rig.close()
        assert _wbxml.decode(r2).astuple() == _wbxml.decode(r1).astuple()
        assert s3 == 200
        bad = _wbxml.decode(r3)
        codes = [(c.name, c.data) for c in bad.commands]
        assert codes[0][0] == "Status" and codes[0][1] in ("505", "513")
        assert codes[-1] == ("Alert", "1223")
        assert rig.count("dmengine_device_sessions_ended_total", reason="protocol_error") == 1
    loop.run_until_complete(main())


def test_fumo_download_then_update_in_two_execs(loop):
    firmware = b"\x7fFW" * 1000

    async def main():
        app = web.Application()

        async def fw(request):
            return web.Response(body=firmware)
        app.router.add_get("/p.bin", fw)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        rig = await _rig(1)
        dev = rig.fleet.devices[0]
        rig.handler.queue_on_connect[dev.dev_id] = [
            Command(name="Replace", items=[Item(target="./FUMO/1/Download/PkgURL",
                                                data=f"http://127.0.0.1:{port}/p.bin")]),
            Command(name="Exec", correlator="dl", items=[Item(target="./FUMO/1/Download")])]
        try:
            await rig.fleet.run_session(dev)
            assert dev.fumo_state == 50 and dev.pkg_data == firmware
            rig.handler.queue_on_connect[dev.dev_id] = [
                Command(name="Exec", correlator="up", items=[Item(target="./FUMO/1/Update")])]
            await rig.fleet.run_session(dev)
        finally:
            await rig.close()
            await runner.cleanup()
        ga = [(e.correlator, e.type.rsplit(".", 1)[1], e.data)
              for e in rig.events("GenericAlert", dev)]
        assert ga == [("dl", "download", "200"), ("up", "update", "200")]
        assert dev.fwv == "2.3.10" and dev.fumo_state == 100
    loop.run_until_complete(main())


def test_fleet_run_lanes_survive_timeouts_and_lost_connections(loop):
    """A lane whose exchange gets no answer in time, or whose connection is lost, ends that
    session as http_error (after one retry on a new connection, as run_session does) and the
    run still ends."""
    async def main():
        handler = SlowHandler()
        handler.gate.set()
        srv = await DmServer(ServerConfig(require_auth="none", tick=0.05), handler).start()
        fleet = Fleet(DeviceProfile(server_url=srv.url, auth="none"), 8,
                      client=HttpClient(timeout=0.3))
        try:
            await fleet.run(sessions_per_device=1, concurrency=4)    # connections pooled
            assert fleet.stats.outcomes == {"completed": 8}
            handler.gate.clear()                  # the server stops answering: timeouts
            await asyncio.wait_for(fleet.run(sessions_per_device=1, concurrency=4), 10)
            assert fleet.stats.outcomes["http_error"] == 8, fleet.stats.outcomes
            assert any("no answer" in r.detail for r in fleet.reports)
            handler.gate.set()
            await fleet.run(sessions_per_device=1, concurrency=4)    # fine again
            assert fleet.stats.outcomes["completed"] == 16, fleet.stats.outcomes
            # the server goes away with requests in flight: lost, retried, refused
            handler.gate.clear()
            run = asyncio.ensure_future(fleet.run(sessions_per_device=1, concurrency=4))
            await asyncio.sleep(0.1)
            await srv.shutdown(0.0)
            handler.gate.set()
            await asyncio.wait_for(run, 10)
            assert fleet.stats.sessions == 32
            assert fleet.stats.outcomes["completed"] + fleet.stats.outcomes["http_error"] \
                + fleet.stats.outcomes.get("http_503", 0) == 32, fleet.stats.outcomes
        finally:
            fleet.close()
            await srv.shutdown(0.1)
    loop.run_until_complete(main())
