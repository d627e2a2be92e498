"""Hot path: a DM session step (L2) and one device-port request (L3), in process.

* ``session pkg1->2`` (../shared/bench-messages msg_a, WBXML): decode package 1 -> new
  DmSession -> receive (MD5 check, nonce, DevInfo) -> queue the 50 management commands of
  msg_b (prepared once, as a campaign shares them) -> next_message -> encode.  Baseline: the
  codec alone (decode msg_a + encode the same reply), as ``bench session`` measures it.
* ``session pkg3->4``: a session waiting for package 3 (made outside the timing, one per
  round) takes msg_c (50 Status + 20 Results) and answers the last message.  Baseline: the
  codec alone.
* ``device port pkg1->2``: one HTTP request through ``DeviceConnection.data_received`` with a
  transport that only counts (no socket): httptools, admission, decode, the session table,
  the engine, the handler hooks, encode, the HTTP reply.  Baseline: the raw httptools echo
  protocol of ``bench server`` on the same bytes.  The socket and loop costs both pay in
  ``bench server`` are not here; this is what the device port adds on top of them.
"""
from __future__ import annotations

import asyncio
from typing import Any

import httptools
import pytest

from bench.hot.conftest import BENCH_MESSAGES, shared_file
from dmengine import _wbxml, auth
from dmengine._session import DmSession, SessionConfig, prepare

USER, SECRET, NONCE = "dmclient", "bench-secret", bytes(range(16))


class Messages:
    def __init__(self) -> None:
        self.raw_a = shared_file(BENCH_MESSAGES, "msg_a.wbxml").read_bytes()
        self.raw_b = shared_file(BENCH_MESSAGES, "msg_b.wbxml").read_bytes()
        self.raw_c = shared_file(BENCH_MESSAGES, "msg_c.wbxml").read_bytes()
        model_b = _wbxml.decode(self.raw_b)
        commands = model_b.commands[3:]
        for c in commands:
            c.cmd_id = None
        self.pairs = [(h, prepare(c)) for h, c in enumerate(commands)]
        self.cfg = SessionConfig(server_id="acme-dms", server_uri="https://dm.example.com/oma-dm",
                                 encoding="wbxml")
        self.account = auth.DmAccount(
            dev_id=model_b.hdr.target, username=USER, client_secret=SECRET, client_nonce=NONCE,
            server_id="acme-dms", server_secret="srv-secret", server_nonce=NONCE)
        self.cred = auth.md5_digest(USER, SECRET, NONCE)

    def pkg1(self) -> Any:
        m = _wbxml.decode(self.raw_a)
        m.hdr.cred.data = self.cred      # msg_a's Cred is fictional: a valid digest instead
        return m

    def step12(self) -> bytes:
        s = DmSession(self.cfg, session_key="b", resp_uri="https://dm.example.com/oma-dm/b",
                      now=0.0)
        s.receive(self.pkg1(), now=1.0, account=self.account)
        s.queue_many(self.pairs)
        out = _wbxml.encode(s.next_message(now=1.0))
        s.keep_reply_bytes(out)           # as the device port does with a session that goes on
        return out

    def waiting(self) -> DmSession:
        s = DmSession(self.cfg, session_key="b", resp_uri="https://dm.example.com/oma-dm/b",
                      now=0.0)
        s.receive(self.pkg1(), now=1.0, account=self.account)
        s.queue_many(self.pairs)
        s.keep_reply_bytes(_wbxml.encode(s.next_message(now=1.0)))
        return s


@pytest.fixture(scope="module")
def msgs() -> Messages:
    return Messages()


def test_session_pkg1_to_pkg2(benchmark, msgs):
    benchmark.group = "session pkg1->2 (msg_a, MD5, 50 commands out)"
    out = benchmark(msgs.step12)
    assert len(_wbxml.decode(out).commands) == 53       # 3 Status + 50 commands


def test_session_pkg1_to_pkg2_codec_alone(benchmark, msgs):
    benchmark.group = "session pkg1->2 (msg_a, MD5, 50 commands out)"
    reply = _wbxml.decode(msgs.step12())

    def codec() -> bytes:
        msgs.pkg1()
        return _wbxml.encode(reply)
    benchmark(codec)


def test_session_pkg3_to_pkg4(benchmark, msgs):
    benchmark.group = "session pkg3->4 (msg_c: 50 Status + 20 Results in)"

    def step(s: DmSession) -> Any:
        s.receive(_wbxml.decode(msgs.raw_c), now=2.0, account=msgs.account)
        return _wbxml.encode(s.next_message(now=2.0))

    benchmark.pedantic(step, setup=lambda: ((msgs.waiting(),), {}), rounds=2000, warmup_rounds=50)


def test_session_pkg3_to_pkg4_codec_alone(benchmark, msgs):
    benchmark.group = "session pkg3->4 (msg_c: 50 Status + 20 Results in)"
    probe = msgs.waiting()
    probe.receive(_wbxml.decode(msgs.raw_c), now=2.0, account=msgs.account)
    reply = probe.next_message(now=2.0)
    assert probe.ended

    def codec() -> bytes:
        _wbxml.decode(msgs.raw_c)
        return _wbxml.encode(reply)
    benchmark(codec)


# --- one device-port request, in process ------------------------------------------------------


class CountingTransport:
    """What DeviceConnection needs of a transport; counts the bytes written."""

    def __init__(self) -> None:
        self.writes = 0
        self.bytes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self.bytes += len(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _pkg1_requests(n: int) -> list[bytes]:
    """Package 1 (WBXML, no credentials, DevInfo + Alert 1201) of ``n`` simulated devices, each
    a whole HTTP request, as ``bench server`` sends them."""
    from bench.bench_server import _pkg1_bodies, _post
    return [_post(8080, b) for b in _pkg1_bodies(n)]


class Echo(asyncio.Protocol):
    """The raw httptools echo server of ``bench server`` (answers each POST with its body)."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport
        self.p = httptools.HttpRequestParser(self)
        self.body = bytearray()

    def data_received(self, data: bytes) -> None:
        self.p.feed_data(data)

    def on_message_begin(self) -> None:
        self.body = bytearray()

    def on_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_message_complete(self) -> None:
        b = bytes(self.body)
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.syncml.dm+wbxml\r\n"
                     b"Content-Length: %d\r\nCache-Control: no-store, private\r\n\r\n"
                     % len(b) + b)


@pytest.fixture(scope="module")
def requests() -> list[bytes]:
    return _pkg1_requests(2000)


def test_device_port_pkg1_to_pkg2(benchmark, loop, requests):
    """A fresh session per request (package 1 without commands: the reply ends it), through
    the compiled HTTP path and handle_dm, with the handler of ``bench server``."""
    from bench.bench_server import _BenchHandler
    from dmengine.server import DeviceConnection, DmServer, ServerConfig

    benchmark.group = "device port pkg1->2 (in process, no socket)"
    srv = DmServer(ServerConfig(require_auth="none", max_sessions=300_000, max_pending=10_000,
                                session_idle_timeout=3600), _BenchHandler("none"))
    loop.run_until_complete(srv.start())
    try:
        conn = DeviceConnection(srv)
        t = CountingTransport()
        conn.connection_made(t)    # type: ignore[arg-type]
        it = iter(range(1 << 62))

        def one() -> None:
            conn.data_received(requests[next(it) % len(requests)])
        for _ in range(len(requests)):          # warm: codecs loaded, caches filled
            one()
        before = t.writes
        benchmark(one)
        assert t.writes > before and srv.pending == 0 and not srv.sessions
        conn.connection_lost(None)
    finally:
        loop.run_until_complete(srv.shutdown(0.1))


def test_device_port_pkg1_to_pkg2_echo(benchmark, requests):
    benchmark.group = "device port pkg1->2 (in process, no socket)"
    e = Echo()
    t = CountingTransport()
    e.connection_made(t)    # type: ignore[arg-type]
    it = iter(range(1 << 62))

    def one() -> None:
        e.data_received(requests[next(it) % len(requests)])
    benchmark(one)
    assert t.writes > 0
