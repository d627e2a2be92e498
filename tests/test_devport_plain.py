"""The device port's plain-request path (``_devport.ConnBase._plain``), over real HTTP.

A whole plain DM request (``POST`` to the DM path or a RespURI, HTTP/1.1, a Content-Length
body, no header with a meaning beyond its value) is read straight from the bytes instead of
through llhttp.  What must hold:

* every request is answered exactly as llhttp's path answers it: the same request sequence
  fed whole (plain requests take the new path) and 7 bytes per read (never whole: llhttp reads
  everything) to two identical servers' own connection objects (only the socket replaced, so
  the reads are exactly those) gets byte-identical replies and the same close, over generated
  requests (header spellings and order, whitespace, extra and special headers, paths, bodies,
  pipelining); and over a real socket, the replies are those bytes;
* plain and llhttp-read requests pipelined in one read are answered in order;
* a request split over reads, or one after a plain request in the same read, is read whole;
* the keep-alive timeout restarts after a plain request.
"""
from __future__ import annotations

import asyncio
import itertools
import socket

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmengine import _wbxml
from dmengine.server import DmServer, MemoryDeviceHandler, ServerConfig
from dmengine.simulator.device import DeviceProfile, VirtualDevice

WBXML = "application/vnd.syncml.dm+wbxml"
HOST = "dm.example.com:8080"      # the Host every generated request names: the same RespURIs


def _pkg1(i: int) -> bytes:
    prof = DeviceProfile(server_url="http://dm.example.com/dm", encoding="wbxml", auth="none")
    return VirtualDevice(i, prof).session(session_id=format(1 + i, "X")).first().body


BODIES = [_pkg1(i) for i in range(4)]


def _request(body: bytes, *, path: str = "/dm", headers: list[tuple[str, str]] | None = None,
             version: str = "HTTP/1.1", method: str = "POST", sep: str = ": ") -> bytes:
    if headers is None:
        headers = [("Host", HOST), ("Content-Type", WBXML), ("Content-Length", str(len(body)))]
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}{sep}{v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


async def _server(**kw) -> DmServer:
    counter = itertools.count()
    kw.setdefault("require_auth", "none")
    kw.setdefault("port", 0)
    srv = DmServer(ServerConfig(**kw), MemoryDeviceHandler(),
                   random_token=lambda: f"tok{next(counter):013d}")
    return await srv.start()


async def _read_replies(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    """``n`` whole HTTP replies as bytes (fewer if the server closes first)."""
    out: list[bytes] = []
    while len(out) < n:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        out.append(head + (await asyncio.wait_for(reader.readexactly(length), 5)
                           if length else b""))
    return out


def _run(coro):
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class Recorder:
    """A transport that records what the server writes and whether it closed."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _feed(data: bytes, step: int | None, **cfg) -> tuple[bytes, bool]:
    """What a fresh server writes for ``data`` read whole (``step`` None) or ``step`` bytes
    per read (a request is then never whole in one read: llhttp reads it), and whether it
    closed the connection.  The server's own DeviceConnection, session engine and codecs;
    only the socket is replaced by ``Recorder``."""
    from dmengine.server import DeviceConnection
    srv = await _server(**cfg)
    try:
        conn = DeviceConnection(srv)
        t = Recorder()
        conn.connection_made(t)
        chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
        for c in chunks:
            if t.closed:
                break
            conn.data_received(c)
        await asyncio.sleep(0)          # (nothing here waits: the replies are all written)
        if not t.closed:
            conn.connection_lost(None)
        return bytes(t.out), t.closed
    finally:
        await srv.shutdown(0.1)


def _diff(a: tuple[bytes, bool], b: tuple[bytes, bool]) -> str:
    """Where the two servers' answers part (for the assertion message)."""
    x, y = a[0], b[0]
    i = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return (f"whole read: {x[max(0, i - 80):i + 40]!r} (closed {a[1]}), byte-split reads: "
            f"{y[max(0, i - 80):i + 40]!r} (closed {b[1]}), at byte {i}")


async def _both(data: bytes, **cfg) -> tuple[tuple[bytes, bool], tuple[bytes, bool]]:
    """Both servers' answers without interim ``100 Continue`` responses: whether one is owed
    depends on the reads (none once the body is read; RFC 9110 §10.1.1), on either path."""
    out = []
    for step in (None, 7):
        data_out, closed = await _feed(data, step, **cfg)
        out.append((data_out.replace(b"HTTP/1.1 100 Continue\r\n\r\n", b""), closed))
    return out[0], out[1]


# --- generated requests: the plain path answers as llhttp's does ------------------------------

_NAMES = {"host": ["Host", "host", "HOST", "hOsT"],
          "ctype": ["Content-Type", "content-type", "CONTENT-TYPE"],
          "clen": ["Content-Length", "content-length", "CONTENT-LENGTH"]}
_CTYPES = [WBXML, "application/vnd.syncml+wbxml", "application/vnd.syncml.dm+wbxml; charset=x",
           "Application/Vnd.Syncml.Dm+Wbxml", "text/plain", "application/vnd.syncml.dm+xml"]
_EXTRA = [("User-Agent", "dev/1.0"), ("Accept", WBXML), ("X-Wap-Profile", '"http://x/p.xml"'),
          ("Connection", "keep-alive"), ("Connection", "close"), ("Expect", "100-continue"),
          ("Accept-Charset", "utf-8"), ("Accept-Charset", "iso-8859-1"),
          ("Transfer-Encoding", "identity"), ("X-Syncml-Hmac", "algorithm=MD5, username=u, mac=m"),
          ("Upgrade", "h2c"), ("Cache-Control", "no-cache")]
_PATHS = ["/dm", "/dm", "/dm", "/dm?x=1", "/dm/", "/dm/tok0000000000099", "/dmx", "/dm/a/b"]


@st.composite
def _requests(draw) -> bytes:
    body = BODIES[draw(st.integers(0, len(BODIES) - 1))]
    if draw(st.booleans()):
        body = body[:draw(st.integers(0, len(body)))]      # a short or empty body
    headers = [(draw(st.sampled_from(_NAMES["host"])), HOST),
               (draw(st.sampled_from(_NAMES["ctype"])), draw(st.sampled_from(_CTYPES)))]
    clen = str(len(body))
    if draw(st.integers(0, 9)) == 0:
        clen = draw(st.sampled_from(["0" + clen, "+" + clen, clen + " ", "x"]))
    headers.append((draw(st.sampled_from(_NAMES["clen"])), clen))
    if draw(st.integers(0, 9)) == 0:
        headers.append(("Content-Length", str(len(body))))   # a second one
    headers += draw(st.lists(st.sampled_from(_EXTRA), max_size=2))
    headers = draw(st.permutations(headers))
    sep = draw(st.sampled_from([": ", ":", ":  ", ":\t"]))
    method = draw(st.sampled_from(["POST"] * 6 + ["GET", "PUT"]))
    version = draw(st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0"]))
    return _request(body, path=draw(st.sampled_from(_PATHS)), headers=headers, version=version,
                    method=method, sep=sep)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_requests(), min_size=1, max_size=3))
def test_plain_path_answers_exactly_as_llhttp(reqs):
    whole, split = _run(_both(b"".join(reqs)))
    assert whole == split, _diff(whole, split)
    assert whole[0], "no reply at all"


# --- hand-made cases ----------------------------------------------------------------------------


def test_plain_and_llhttp_requests_pipelined_in_one_read_answered_in_order():
    reqs = [
        _request(BODIES[0]),                                                   # plain
        _request(BODIES[1], headers=[("Host", HOST), ("Content-Type", WBXML),
                                     ("Connection", "keep-alive"),
                                     ("Content-Length", str(len(BODIES[1])))]),  # llhttp
        _request(BODIES[2]),                                                   # plain again
        b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n",                           # llhttp: 404
        _request(BODIES[3]),
    ]
    whole, split = _run(_both(b"".join(reqs)))
    assert whole == split

    async def real() -> list[bytes]:     # and over a real socket, in one write
        srv = await _server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"".join(reqs))
            out = await _read_replies(reader, len(reqs))
            writer.close()
            return out
        finally:
            await srv.shutdown(0.2)
    replies = _run(real())
    assert b"".join(replies) == whole[0]
    statuses = [r.split(b" ", 2)[1] for r in replies]
    assert statuses == [b"200", b"200", b"200", b"404", b"200"]
    targets = [_wbxml.decode(r.split(b"\r\n\r\n", 1)[1]).hdr.target
               for r in replies if r.startswith(b"HTTP/1.1 200")]
    assert targets == [VirtualDevice(i, DeviceProfile()).dev_id for i in range(4)]


def test_a_request_split_over_reads_and_one_after_a_plain_request_are_read_whole():
    async def main() -> list[bytes]:
        srv = await _server()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            a, b, c = (_request(x) for x in BODIES[:3])
            # a whole plain request and the first half of the next in one read, the rest and
            # a third request later
            writer.write(a + b[:40])
            await asyncio.sleep(0.05)
            writer.write(b[40:-5])
            await asyncio.sleep(0.05)
            writer.write(b[-5:] + c)
            out = await _read_replies(reader, 3)
            writer.close()
            return out
        finally:
            await srv.shutdown(0.2)
    replies = _run(main())
    assert [r[:12] for r in replies] == [b"HTTP/1.1 200"] * 3
    targets = [_wbxml.decode(r.split(b"\r\n\r\n", 1)[1]).hdr.target for r in replies]
    assert targets == [VirtualDevice(i, DeviceProfile()).dev_id for i in range(3)]


def test_keepalive_restarts_after_a_plain_request():
    """keepalive_timeout 0.6 s: plain requests every 0.25 s for 1.5 s keep the connection
    open; once they stop it closes after the timeout."""
    async def main() -> tuple[int, float]:
        srv = await _server(keepalive_timeout=0.6, tick=0.05)
        loop = asyncio.get_running_loop()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            answered = 0
            for i in range(6):
                writer.write(_request(BODIES[i % 4]))
                answered += len(await _read_replies(reader, 1))
                await asyncio.sleep(0.25)
            t0 = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""   # closed by the server
            writer.close()
            return answered, loop.time() - t0
        finally:
            await srv.shutdown(0.2)
    answered, idle = _run(main())
    assert answered == 6
    assert 0.2 < idle < 1.5, idle


@pytest.mark.parametrize("raw", [
    # a bare LF ends a header line: llhttp's path decides (400)
    b"POST /dm HTTP/1.1\r\nHost: x\nContent-Type: " + WBXML.encode() + b"\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    # obs-fold
    b"POST /dm HTTP/1.1\r\nHost: x\r\n y\r\nContent-Type: " + WBXML.encode() + b"\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    # a space before the colon
    b"POST /dm HTTP/1.1\r\nHost : x\r\nContent-Type: " + WBXML.encode() + b"\r\n"
    b"Content-Length: 3\r\n\r\nabc",
    # Content-Length and Transfer-Encoding: chunked together
    b"POST /dm HTTP/1.1\r\nHost: x\r\nContent-Type: " + WBXML.encode() + b"\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    # a control byte in a value
    b"POST /dm HTTP/1.1\r\nHost: x\x01y\r\nContent-Type: " + WBXML.encode() + b"\r\n"
    b"Content-Length: 3\r\n\r\nabc",
])
def test_malformed_requests_are_llhttps_to_refuse(raw):
    whole, split = _run(_both(raw + _request(BODIES[0])))
    assert whole == split
    out, closed = whole
    assert out.startswith(b"HTTP/1.1 400 ") and closed, whole

    async def real() -> bytes:           # and as an attacker sends it, over a real socket:
        srv = await _server()            # 400, closed, the request behind it never answered
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(raw + _request(BODIES[0]))
            got = await asyncio.wait_for(reader.read(), 5)      # until the server closes
            writer.close()
            return got
        finally:
            await srv.shutdown(0.2)
    got = _run(real())
    assert got == out and got.count(b"HTTP/1.1 ") == 1
